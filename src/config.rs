//! The configuration file (TOML): Kafka, worker, metrics and billing
//! sections. Every field is documented with its unit and default, unknown
//! keys are rejected, and [`Config::check`] validates cross-field rules
//! before anything runs. The defaults are the `Default` impls here and
//! nowhere else; [`Config::resolve`] layers the file, the `GATEBILL_*`
//! environment and a subcommand's flags over them, in that order.

use crate::billing::config::{BillingConfig, Rules};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[kafka]`: brokers, topics, client properties.
    pub kafka: KafkaConfig,
    /// `[worker]`: batching, state, bill emission.
    pub worker: WorkerConfig,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
    /// `[billing]`: the rule book's parameters.
    pub billing: BillingConfig,
}

/// `[kafka]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,...`. Default `127.0.0.1:9092`.
    pub brokers: String,
    /// Access events in, keyed by account_id. Default `gateway-events`.
    pub input_topic: String,
    /// Account records (compacted). Default `gateway-accounts`.
    pub accounts_topic: String,
    /// Bill records out (compacted). Default `gateway-bills`.
    pub output_topic: String,
    /// Rejected messages with their reasons. Default `gateway-dead-letters`.
    pub dead_letter_topic: String,
    /// Usage alerts out (rule book section 12; key = account_id), written
    /// with the bills whose computation found them. Default `gateway-alerts`.
    pub alerts_topic: String,
    /// The workers' state changelog (compacted, as many partitions as the
    /// input): a partition that moves to another worker continues from the
    /// state it had. One per consumer group. Default `gatebill-changelog`.
    pub changelog_topic: String,
    /// Consumer group of `run`. Default `gatebill`.
    pub group_id: String,
    /// `run` and `replay` write bills, dead letters, the changelog and the
    /// input offsets in one Kafka transaction per batch (exactly once for
    /// `read_committed` readers; needs Kafka >= 2.5 or Redpanda). false:
    /// an idempotent producer drains the outbox, at least once. Default true.
    pub transactions: bool,
    /// The worker's `transactional.id`: stable across its restarts, unique
    /// among live workers (a second worker with the same id fences the
    /// first). Empty (default): `<group_id>-<hash of host name and state
    /// directory>`.
    pub transactional_id: String,
    /// Create missing topics (true) or stop with an error naming them (false). Default true.
    pub create_topics: bool,
    /// Partitions of topics gatebill creates. Default 6.
    pub partitions: i32,
    /// Replication factor of topics gatebill creates. Default 1.
    pub replication: i32,
    /// Raw librdkafka properties for every client (TLS, SASL, tuning), e.g.
    /// `"security.protocol" = "SASL_SSL"`. Applied after gatebill's own settings.
    pub properties: BTreeMap<String, String>,
}

impl KafkaConfig {
    /// Every topic gatebill reads or writes: input, accounts, bills, dead
    /// letters, alerts, changelog.
    pub fn topics(&self) -> [&str; 6] {
        [&self.input_topic, &self.accounts_topic, &self.output_topic, &self.dead_letter_topic, &self.alerts_topic, &self.changelog_topic]
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            input_topic: "gateway-events".into(),
            accounts_topic: "gateway-accounts".into(),
            output_topic: "gateway-bills".into(),
            dead_letter_topic: "gateway-dead-letters".into(),
            alerts_topic: "gateway-alerts".into(),
            changelog_topic: "gatebill-changelog".into(),
            group_id: "gatebill".into(),
            transactions: true,
            transactional_id: String::new(),
            create_topics: true,
            partitions: 6,
            replication: 1,
            properties: BTreeMap::new(),
        }
    }
}

/// `[worker]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// RocksDB state directory. Default `./gatebill-state`.
    pub state_dir: PathBuf,
    /// Most messages per batch of a Kafka input (one RocksDB write each).
    /// Default 10,000.
    pub batch_size: usize,
    /// `replay --input-file`: lines per write, over all shards. Larger
    /// writes touch each account-month once for more events (a 1M-event
    /// replay took about a quarter less CPU at 100,000 than at 10,000, for about
    /// 50 MB more memory); a stop loses at most this many lines' progress
    /// (resumed, never counted twice). Default 100,000.
    pub file_batch_size: usize,
    /// Longest wait to fill a batch, milliseconds. Default 200.
    pub batch_wait_ms: u64,
    /// Changed bills are recomputed and emitted at most this often, milliseconds. Default 5,000.
    pub emit_interval_ms: u64,
    /// A key's provisional bill is produced at most once per this many
    /// seconds; its first revision and every `final` and `restated` one go
    /// out at the next emission. 0: every emission. Default 60.
    pub provisional_interval_secs: u64,
    /// A month is final once the partition's event-time watermark passes its
    /// end plus this grace, seconds. Default 7,200 (2 h).
    pub grace_period_secs: u64,
    /// A partition with no new events for this long, seconds, is idle: its
    /// watermark advances with the wall clock so months can close. Default 300.
    pub idle_after_secs: u64,
    /// Drop repeated request_ids (exact, per partition). Default true.
    pub dedupe: bool,
    /// Dedupe window in event time: the request ids of an event hour are kept
    /// while the hour is within this many hours of the partition's
    /// watermark. Default 72.
    pub dedupe_window_hours: u64,
    /// Dedupe window in input order: the request ids of an event hour are
    /// also kept while that hour received an event within this many messages
    /// of the partition, however old the hour. Default 1,000,000.
    pub dedupe_window_messages: u64,
    /// Request-id hashes the dedupe mirror keeps in memory, MB (about):
    /// past it, the (partition, hour) buckets used least recently leave
    /// memory and are read back from the state store at their next event.
    /// Buckets that got events in the last 8 batches always stay. Default 64.
    pub dedupe_memory_mb: u64,
    /// RocksDB memtables, over every column family, MB: writes collect
    /// there and the largest is flushed to disk past it, so RSS rises and
    /// falls by up to this much. Smaller: less memory, more and smaller
    /// files to compact. At least 16. Default 128.
    pub memtable_mb: u64,
    /// RocksDB block cache (data, index and filter blocks read from disk),
    /// MB: it fills toward this as the state grows and then stays. At
    /// least 8. Default 64.
    pub block_cache_mb: u64,
    /// Events stamped more than this many seconds ahead of the wall clock
    /// are dead-lettered (`future_time`) and move no watermark. Default 3,600.
    pub max_future_secs: u64,
    /// `replay --input-file`: threads its shards run on (they are 16 for
    /// every replay, whatever the threads). 0: one per core this process
    /// may use. Default 0.
    pub threads: usize,
    /// `/healthz` answers 503 when no input batch committed for this many
    /// seconds while the partitions this worker owns have lag, or when the
    /// input's end offsets could not be read for this long plus one lag
    /// interval (15 s at most). At least 1. Default 60.
    pub health_stall_secs: u64,
}

/// Bytes of a setting in MB (saturating).
pub fn mb_bytes(mb: u64) -> usize {
    usize::try_from(mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
}

impl WorkerConfig {
    /// The state store's memory bounds (`memtable_mb`, `block_cache_mb`).
    pub fn store_memory(&self) -> crate::store::StoreMemory {
        crate::store::StoreMemory { memtable_bytes: mb_bytes(self.memtable_mb), block_cache_bytes: mb_bytes(self.block_cache_mb) }
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            state_dir: PathBuf::from("gatebill-state"),
            batch_size: 10_000,
            file_batch_size: 100_000,
            batch_wait_ms: 200,
            emit_interval_ms: 5_000,
            provisional_interval_secs: 60,
            grace_period_secs: 7_200,
            idle_after_secs: 300,
            dedupe: true,
            dedupe_window_hours: 72,
            dedupe_window_messages: 1_000_000,
            dedupe_memory_mb: 64,
            memtable_mb: 128,
            block_cache_mb: 64,
            max_future_secs: 3_600,
            threads: 0,
            health_stall_secs: 60,
        }
    }
}

/// `[metrics]`
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics` and `/healthz`; empty disables. Default `127.0.0.1:9898`.
    pub address: String,
    /// Log as JSON lines instead of text. Default false.
    pub json_logs: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { address: "127.0.0.1:9898".into(), json_logs: false }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value or combination is invalid.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The billing section is invalid.
    #[error("invalid configuration: {0}")]
    Billing(#[from] crate::billing::ConfigError),
}

impl Config {
    /// Reads a TOML file.
    pub fn load(path: &std::path::Path) -> Result<Config, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigFileError::Parse { path: path.into(), source: Box::new(source) })
    }

    /// Checks every rule and keeps the billing rules they yield: the one
    /// way to a [`Checked`] configuration, which is what the worker and the
    /// file replay take, so nothing checks twice.
    pub fn checked(self) -> Result<Checked, ConfigFileError> {
        let rules = self.check()?;
        Ok(Checked { config: self, rules })
    }

    /// Checks every rule; returns the billing rules.
    pub fn check(&self) -> Result<Rules, ConfigFileError> {
        let k = &self.kafka;
        let bad = |s: String| Err(ConfigFileError::Invalid(s));
        if k.brokers.trim().is_empty() {
            return bad("kafka.brokers is empty; give host:port[,host:port...]".into());
        }
        let topics = [
            ("input_topic", &k.input_topic),
            ("accounts_topic", &k.accounts_topic),
            ("output_topic", &k.output_topic),
            ("dead_letter_topic", &k.dead_letter_topic),
            ("alerts_topic", &k.alerts_topic),
            ("changelog_topic", &k.changelog_topic),
        ];
        for (i, (name, t)) in topics.iter().enumerate() {
            if t.is_empty() {
                return bad(format!("kafka.{name} is empty"));
            }
            for (other, u) in &topics[i + 1..] {
                if t == u {
                    return bad(format!("kafka.{name} and kafka.{other} are both `{t}`; each topic has one role"));
                }
            }
        }
        if k.partitions < 1 || k.replication < 1 {
            return bad("kafka.partitions and kafka.replication must be at least 1".into());
        }
        let w = &self.worker;
        if w.state_dir.as_os_str().is_empty() {
            return bad(crate::store::StoreError::EmptyPath.to_string());
        }
        if w.batch_size == 0 {
            return bad("worker.batch_size must be at least 1".into());
        }
        if w.file_batch_size == 0 {
            return bad("worker.file_batch_size must be at least 1".into());
        }
        if w.emit_interval_ms == 0 {
            return bad("worker.emit_interval_ms must be at least 1".into());
        }
        if w.dedupe && w.dedupe_window_hours == 0 {
            return bad("worker.dedupe_window_hours must be at least 1 when dedupe is on".into());
        }
        if w.dedupe && w.dedupe_window_messages == 0 {
            return bad("worker.dedupe_window_messages must be at least 1 when dedupe is on".into());
        }
        if !(16..=65_536).contains(&w.memtable_mb) {
            return bad(format!("worker.memtable_mb = {} is out of range; use 16 to 65536 (MB)", w.memtable_mb));
        }
        if !(8..=65_536).contains(&w.block_cache_mb) {
            return bad(format!("worker.block_cache_mb = {} is out of range; use 8 to 65536 (MB)", w.block_cache_mb));
        }
        if w.threads > 256 {
            return bad(format!("worker.threads = {} is more than 256; use 0 (one per core) or at most 256", w.threads));
        }
        if !(1..=86_400 * 365).contains(&w.health_stall_secs) {
            return bad(format!("worker.health_stall_secs = {} is out of range; use 1 to 31536000 (seconds)", w.health_stall_secs));
        }
        if w.max_future_secs > i64::MAX as u64 / 1000 {
            return bad("worker.max_future_secs is too large; use at most 9223372036854775".into());
        }
        Ok(self.billing.validate()?)
    }
}

/// A lookup of environment variables: the process environment in the
/// binary ([`process_env`]), a map in tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment (a variable that is not UTF-8 counts as unset).
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The variable naming the configuration file.
pub const CONFIG_VAR: &str = "GATEBILL_CONFIG";

/// One layer of the common settings over the configuration file: the
/// `GATEBILL_*` environment ([`Overrides::from_env`]) or a subcommand's
/// flags. `None` keeps the value of the layer below.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Overrides {
    /// `kafka.brokers`, `GATEBILL_BROKERS`.
    pub brokers: Option<String>,
    /// `kafka.input_topic`, `GATEBILL_INPUT_TOPIC`.
    pub input_topic: Option<String>,
    /// `kafka.accounts_topic`, `GATEBILL_ACCOUNTS_TOPIC`.
    pub accounts_topic: Option<String>,
    /// `kafka.output_topic`, `GATEBILL_OUTPUT_TOPIC`.
    pub output_topic: Option<String>,
    /// `kafka.dead_letter_topic`, `GATEBILL_DEAD_LETTER_TOPIC`.
    pub dead_letter_topic: Option<String>,
    /// `kafka.group_id`, `GATEBILL_GROUP_ID`.
    pub group_id: Option<String>,
    /// `kafka.partitions` (a flag of `dev-broker` only; no variable).
    pub partitions: Option<i32>,
    /// `worker.state_dir`, `GATEBILL_STATE_DIR`.
    pub state_dir: Option<PathBuf>,
    /// `metrics.address`, `GATEBILL_METRICS_ADDRESS` (empty disables).
    pub metrics_address: Option<String>,
    /// `metrics.json_logs`, `GATEBILL_JSON_LOGS` (true/false, 1/0, yes/no, on/off).
    pub json_logs: Option<bool>,
}

impl Overrides {
    /// The `GATEBILL_*` variables that are set (an empty one counts: an
    /// empty `GATEBILL_METRICS_ADDRESS` disables the endpoint).
    pub fn from_env(env: Env) -> Result<Overrides, ConfigFileError> {
        let json_logs = match env("GATEBILL_JSON_LOGS") {
            None => None,
            Some(v) => Some(match v.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" | "" => false,
                _ => return Err(ConfigFileError::Invalid(format!("GATEBILL_JSON_LOGS=`{v}`: use true or false"))),
            }),
        };
        Ok(Overrides {
            brokers: env("GATEBILL_BROKERS"),
            input_topic: env("GATEBILL_INPUT_TOPIC"),
            accounts_topic: env("GATEBILL_ACCOUNTS_TOPIC"),
            output_topic: env("GATEBILL_OUTPUT_TOPIC"),
            dead_letter_topic: env("GATEBILL_DEAD_LETTER_TOPIC"),
            group_id: env("GATEBILL_GROUP_ID"),
            partitions: None,
            state_dir: env("GATEBILL_STATE_DIR").map(PathBuf::from),
            metrics_address: env("GATEBILL_METRICS_ADDRESS"),
            json_logs,
        })
    }

    /// Writes the values this layer has over `cfg`.
    pub fn apply(self, cfg: &mut Config) {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        let k = &mut cfg.kafka;
        set(&mut k.brokers, self.brokers);
        set(&mut k.input_topic, self.input_topic);
        set(&mut k.accounts_topic, self.accounts_topic);
        set(&mut k.output_topic, self.output_topic);
        set(&mut k.dead_letter_topic, self.dead_letter_topic);
        set(&mut k.group_id, self.group_id);
        set(&mut k.partitions, self.partitions);
        set(&mut cfg.worker.state_dir, self.state_dir);
        set(&mut cfg.metrics.address, self.metrics_address);
        set(&mut cfg.metrics.json_logs, self.json_logs);
    }
}

impl Config {
    /// The configuration a subcommand runs with: the defaults, overridden by
    /// the file (`file`, else `GATEBILL_CONFIG`, else none), overridden by
    /// the environment, overridden by `flags`; checked.
    pub fn resolve(file: Option<&std::path::Path>, env: Env, flags: Overrides) -> Result<Checked, ConfigFileError> {
        let file = file.map(PathBuf::from).or_else(|| env(CONFIG_VAR).filter(|v| !v.is_empty()).map(PathBuf::from));
        let mut cfg = match &file {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        Overrides::from_env(env)?.apply(&mut cfg);
        flags.apply(&mut cfg);
        cfg.checked()
    }
}

/// A configuration that passed [`Config::check`], with the billing rules it
/// yields. Read it as a [`Config`]; change it only by taking the
/// configuration out ([`Checked::into_config`]) and checking it again.
#[derive(Clone, Debug)]
pub struct Checked {
    config: Config,
    rules: Rules,
}

impl Checked {
    /// The billing rules the configuration yields.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The configuration, to change and check again.
    pub fn into_config(self) -> Config {
        self.config
    }
}

impl Default for Checked {
    fn default() -> Checked {
        Config::default().checked().expect("the defaults pass the checks (tested)")
    }
}

impl std::ops::Deref for Checked {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_in_the_repo_parses_and_equals_the_defaults() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/gatebill.example.toml")).unwrap();
        let cfg: Config = toml::from_str(&text).unwrap();
        cfg.check().unwrap();
        assert_eq!(cfg, Config::default());
        // Its commented price change, uncommented, is a valid second version.
        let change: String = text
            .lines()
            .skip_while(|l| *l != "# [[billing.price_versions]]")
            .map_while(|l| l.strip_prefix("# "))
            .map(|l| format!("{l}\n"))
            .collect();
        assert!(change.contains("effective_from"), "{change}");
        let cfg: Config = toml::from_str(&format!("{text}\n{change}")).unwrap();
        let rules = cfg.billing.validate().unwrap();
        let version = rules.version("2021-03".parse().unwrap());
        assert_eq!((version.id.as_deref(), version.prices.call_tiers[1].price.to_string()), (Some("list-2020-12"), "0.03".into()));
        assert_eq!(rules.version("2020-11".parse().unwrap()).id, None);
    }

    #[test]
    fn store_memory_follows_the_settings_and_refuses_what_rocksdb_cannot_use() {
        let mut cfg = Config::default();
        assert_eq!(cfg.worker.store_memory(), crate::store::StoreMemory::default());
        assert_eq!(cfg.worker.store_memory().memtable_bytes, 134_217_728);
        assert_eq!(cfg.worker.store_memory().block_cache_bytes, 67_108_864);
        cfg.worker.memtable_mb = 32;
        cfg.worker.block_cache_mb = 16;
        cfg.check().unwrap();
        assert_eq!(cfg.worker.store_memory().memtable_bytes, 33_554_432);
        assert_eq!(cfg.worker.store_memory().block_cache_bytes, 16_777_216);
        cfg.worker.memtable_mb = 15;
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("worker.memtable_mb = 15 is out of range; use 16 to 65536"), "{err}");
        cfg.worker.memtable_mb = 16;
        cfg.worker.block_cache_mb = 7;
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("worker.block_cache_mb = 7 is out of range; use 8 to 65536"), "{err}");
    }

    #[test]
    fn an_empty_state_dir_from_the_environment_is_a_clear_error() {
        let env = |name: &str| (name == "GATEBILL_STATE_DIR").then(String::new);
        let err = Config::resolve(None, &env, Overrides::default()).unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid configuration: the state directory is empty (an empty --state-dir, GATEBILL_STATE_DIR=\"\" or \
             worker.state_dir = \"\"); give a directory, e.g. --state-dir gatebill-state, or unset the variable for the default"
        );
    }

    #[test]
    fn health_stall_secs_defaults_to_60_and_must_be_positive() {
        let mut cfg = Config::default();
        assert_eq!(cfg.worker.health_stall_secs, 60);
        cfg.worker.health_stall_secs = 0;
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("worker.health_stall_secs = 0 is out of range; use 1 to 31536000"), "{err}");
    }

    #[test]
    fn same_topic_twice_is_refused() {
        let mut cfg = Config::default();
        cfg.kafka.output_topic = cfg.kafka.input_topic.clone();
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("each topic has one role"), "{err}");
    }
}
