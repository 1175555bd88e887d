//! What every room of the pipeline reads and none changes: the store, the
//! rules, the settings, the metrics, and which shard of the accounts the
//! pipeline is fed ([`Context`]). The rooms (`positions.rs`, `ingest.rs`,
//! `emit.rs`, `accounts.rs`, `numbers.rs`, `outbox.rs`) take it borrowed;
//! only [`super::Pipeline`]'s split and join change the shard.

use super::dead_letter;
use crate::billing::config::Rules;
use crate::metrics::Metrics;
use crate::store::Store;
use std::sync::Arc;

/// What every room reads: owned by the pipeline, lent to each room's
/// operations.
pub struct Context {
    /// The state store every write goes to.
    pub store: Arc<Store>,
    /// The billing rules (the calendar's month ends among them).
    pub rules: Rules,
    /// The pipeline's settings.
    pub settings: Settings,
    /// The metrics it counts in.
    pub metrics: Arc<Metrics>,
    /// The accounts this pipeline is fed, when it is one of several
    /// ([`super::Pipeline::split`]); `None`: every account.
    pub shard: Option<Shard>,
}

/// The pipeline's settings, from the configuration.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Input topic (offsets are stored under its name).
    pub input_topic: String,
    /// Accounts topic.
    pub accounts_topic: String,
    /// Bill records go here.
    pub output_topic: String,
    /// Rejected messages go here.
    pub dead_letter_topic: String,
    /// Usage alerts go here.
    pub alerts_topic: String,
    /// Whether to drop repeated request_ids.
    pub dedupe: bool,
    /// Dedupe window behind the partition watermark, seconds.
    pub dedupe_window_secs: i64,
    /// Dedupe window in input messages per partition.
    pub dedupe_window_messages: i64,
    /// Bytes of request-id hashes the dedupe mirror keeps in memory past a
    /// write, about ([`super::batch::DedupeCache::shrink_to_budget`]).
    pub dedupe_memory_bytes: usize,
    /// Events stamped further than this ahead of the wall clock are
    /// dead-lettered (`future_time`), milliseconds.
    pub max_future_ms: i64,
    /// Grace after month end before a bill is final, milliseconds.
    pub grace_ms: i64,
    /// A partition idle this long follows the wall clock, milliseconds.
    pub idle_after_ms: i64,
    /// Require the message key to be the event's account_id (Kafka input);
    /// false for files, whose lines have no key.
    pub require_keys: bool,
    /// Where each batch's state changes also go ([`crate::changelog`]),
    /// through the outbox; `None` (file replay): nowhere.
    pub changelog_topic: Option<String>,
    /// A key's provisional bill goes out at most once per this long,
    /// milliseconds (0: at every emission).
    pub provisional_interval_ms: i64,
    /// The largest record the producer may send (its `message.max.bytes`):
    /// a dead letter that would be larger is cut to fit
    /// ([`dead_letter::fit`]); `usize::MAX` where dead letters go to a file.
    pub dead_letter_max_bytes: usize,
}

impl Settings {
    /// Settings from a checked configuration.
    pub fn from_config(cfg: &crate::config::Config) -> Settings {
        Settings {
            input_topic: cfg.kafka.input_topic.clone(),
            accounts_topic: cfg.kafka.accounts_topic.clone(),
            output_topic: cfg.kafka.output_topic.clone(),
            dead_letter_topic: cfg.kafka.dead_letter_topic.clone(),
            alerts_topic: cfg.kafka.alerts_topic.clone(),
            dedupe: cfg.worker.dedupe,
            dedupe_window_secs: cfg.worker.dedupe_window_hours as i64 * 3600,
            dedupe_window_messages: i64::try_from(cfg.worker.dedupe_window_messages).unwrap_or(i64::MAX),
            dedupe_memory_bytes: crate::config::mb_bytes(cfg.worker.dedupe_memory_mb),
            max_future_ms: cfg.worker.max_future_secs as i64 * 1000,
            grace_ms: cfg.worker.grace_period_secs as i64 * 1000,
            idle_after_ms: cfg.worker.idle_after_secs as i64 * 1000,
            require_keys: true,
            changelog_topic: Some(cfg.kafka.changelog_topic.clone()),
            provisional_interval_ms: i64::try_from(cfg.worker.provisional_interval_secs.saturating_mul(1000)).unwrap_or(i64::MAX),
            dead_letter_max_bytes: cfg
                .kafka
                .properties
                .get("message.max.bytes")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(dead_letter::DEFAULT_MESSAGE_MAX_BYTES),
        }
    }
}

/// One of several pipelines over one store that split the accounts between
/// them by a hash of the account id ([`shard_of`]; [`super::Pipeline::split`]): a
/// file replay runs one per shard, on every core, each shard's events
/// being its partition (see `file_replay.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This pipeline's shard, below `count`.
    pub index: u32,
    /// How many shards split the accounts.
    pub count: u32,
}

impl Shard {
    /// Whether an account is this shard's.
    pub fn holds(&self, account: &str) -> bool {
        shard_of(account, self.count) == self.index
    }
}

/// The shard of an account among `count`: a hash of its id, the same on
/// every machine and in every version (it places the events of a sharded
/// file replay, whose positions are kept per shard).
pub fn shard_of(account: &str, count: u32) -> u32 {
    (xxhash_rust::xxh3::xxh3_64(account.as_bytes()) % u64::from(count.max(1))) as u32
}
