//! The configuration file (TOML): Kafka, worker, metrics and billing
//! sections. Every field is documented with its unit and default, unknown
//! keys are rejected, and [`Config::check`] validates cross-field rules
//! before anything runs. CLI flags and `GATEBILL_*` variables override the
//! common settings (see `cli.rs`).

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
    /// Consumer group of `run`. Default `gatebill`.
    pub group_id: String,
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

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            input_topic: "gateway-events".into(),
            accounts_topic: "gateway-accounts".into(),
            output_topic: "gateway-bills".into(),
            dead_letter_topic: "gateway-dead-letters".into(),
            group_id: "gatebill".into(),
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
    /// Most messages per batch (one RocksDB write each). Default 10,000.
    pub batch_size: usize,
    /// Longest wait to fill a batch, milliseconds. Default 200.
    pub batch_wait_ms: u64,
    /// Changed bills are recomputed and emitted at most this often, milliseconds. Default 5,000.
    pub emit_interval_ms: u64,
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
    /// Events stamped more than this many seconds ahead of the wall clock
    /// are dead-lettered (`future_time`) and move no watermark. Default 3,600.
    pub max_future_secs: u64,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            state_dir: PathBuf::from("gatebill-state"),
            batch_size: 10_000,
            batch_wait_ms: 200,
            emit_interval_ms: 5_000,
            grace_period_secs: 7_200,
            idle_after_secs: 300,
            dedupe: true,
            dedupe_window_hours: 72,
            dedupe_window_messages: 1_000_000,
            max_future_secs: 3_600,
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
        if w.batch_size == 0 {
            return bad("worker.batch_size must be at least 1".into());
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
        if w.max_future_secs > i64::MAX as u64 / 1000 {
            return bad("worker.max_future_secs is too large; use at most 9223372036854775".into());
        }
        Ok(self.billing.validate()?)
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
    }

    #[test]
    fn same_topic_twice_is_refused() {
        let mut cfg = Config::default();
        cfg.kafka.output_topic = cfg.kafka.input_topic.clone();
        let err = cfg.check().unwrap_err().to_string();
        assert!(err.contains("each topic has one role"), "{err}");
    }
}
