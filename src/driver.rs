//! What both drivers of the pipeline share, the Kafka worker (`worker.rs`:
//! `run` and `replay`) and the file replay (`file_replay.rs`): their
//! errors, their run summary, loading the accounts topic, polling a stop
//! request, and the crash points of the restart tests. Neither driver
//! imports the other; both import this.

use crate::kafka::{self, KafkaSetupError};
use crate::pipeline::{InputMessage, Pipeline};
use crate::store::StoreError;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Message, OwnedMessage};
use std::future::Future;
use std::time::Duration;

/// Where to stop abruptly, for restart tests: simulates a crash. Only a
/// build with the `fault-injection` feature (which the tests enable, see
/// Cargo.toml) looks at it: in a release build every [`fault_point!`] is
/// compiled out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultPoint {
    /// Return right after the n-th batch write, before producing anything.
    AfterWrite(u64),
    /// Return right after the n-th batch was written, produced and committed.
    AfterCommit(u64),
    /// Stop cleanly (as on shutdown) after the n-th batch was committed.
    StopAfter(u64),
    /// With transactions: return after the n-th batch's records were
    /// produced in its transaction, before the commit.
    BeforeTxnCommit(u64),
    /// With transactions: return after the n-th batch's transaction
    /// committed, before its state was written to the store.
    AfterTxnCommit(u64),
    /// With transactions: return after the n-th emission chunk's changelog
    /// records were produced in its transaction, before its bills were
    /// (a writer dying in the middle of an emission).
    BeforeBillsProduced(u64),
    /// The restore of partition `.0` waits `.1` seconds before it reads
    /// the changelog (a restore longer than `max.poll.interval.ms`).
    SlowRestore(i32, u64),
}

/// A crash point of the restart tests: runs `$then` when `$fault` (the
/// run's `Option<FaultPoint>`) is `$point`; nothing at all without the
/// `fault-injection` feature.
macro_rules! fault_point {
    ($fault:expr, $point:expr, $then:block) => {
        #[cfg(feature = "fault-injection")]
        if $fault == Some($point) $then
    };
}
pub(crate) use fault_point;

/// Why the worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigFileError),
    /// State store problem.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Kafka setup problem.
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    /// The transactional producer was fenced.
    #[error(transparent)]
    Transaction(#[from] kafka::TxnError),
    /// An input or output file cannot be read or written.
    #[error("{path}: {source}")]
    Input {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A backfill was to read the accounts topic, which holds no record.
    #[error(
        "the accounts topic {topic} at {brokers} holds no account record, so every account would be billed as unknown \
         (no free tier, no packs): pass --accounts-file FILE, or --no-accounts to bill every account as unknown on purpose"
    )]
    NoAccounts {
        /// The accounts topic.
        topic: String,
        /// Bootstrap servers.
        brokers: String,
    },
    /// The threads that run a file replay's shards cannot be started.
    #[error("cannot start {threads} threads for the shards: {source}; set worker.threads lower (0 = one per core)")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why.
        source: rayon::ThreadPoolBuildError,
    },
    /// A file replay's input path was replayed into this state directory
    /// before with other content.
    #[error(
        "{path} was replayed into this state directory before with other content (its first MiB differs), and the stored \
         position (line {line}) belongs to that content: replay this file into another --state-dir, or give back the file \
         that was replayed"
    )]
    OtherContent {
        /// The input.
        path: std::path::PathBuf,
        /// Where the stored position stands.
        line: i64,
    },
    /// The metrics address cannot be bound.
    #[error("cannot listen for metrics on {address}: {source}; pass --metrics-address with a free port, or \"\" to disable")]
    Metrics {
        /// Address.
        address: String,
        /// Why.
        source: std::io::Error,
    },
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Batches written.
    pub batches: u64,
    /// Input messages processed.
    pub messages: u64,
    /// Events billed.
    pub billed: u64,
    /// Messages dead-lettered.
    pub rejected: u64,
    /// Duplicates dropped.
    pub duplicates: u64,
    /// Input messages read again below a partition's stored position
    /// (skipped as already processed).
    pub reread: u64,
    /// Bill records emitted.
    pub bills_emitted: u64,
    /// Transactions aborted (their batches forgotten and read again).
    pub aborted: u64,
    /// Outbox records whose delivery failed and stayed in the outbox for a retry.
    pub delivery_failures: u64,
    /// Blank input lines skipped (`replay --input-file`; a line of
    /// nothing but whitespace is no message: neither billed nor
    /// dead-lettered, and not in `messages`).
    pub blank_lines: u64,
    /// Rebalances that assigned this worker partitions (live): 1 for a
    /// worker that joined once and kept its membership.
    pub assignments: u64,
    /// Whether the run stopped at a fault point.
    pub crashed: bool,
    /// A replay stopped (a signal) before the end of its input: it emitted
    /// no bill (spec section 8); run again, it resumes from its positions.
    pub interrupted: bool,
}

/// Polls a future once, without waiting: its output if it is ready.
pub(crate) fn poll_now<F: Future>(fut: F) -> Option<F::Output> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::pin!(fut).poll(&mut cx) {
        std::task::Poll::Ready(v) => Some(v),
        std::task::Poll::Pending => None,
    }
}

/// A consumed message as the pipeline's input.
fn to_input(m: &OwnedMessage) -> InputMessage<'_> {
    InputMessage {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        payload: m.payload(),
        headers: kafka::owned_headers(m.headers()),
    }
}

/// Applies account-topic messages, as read, to the pipeline's account
/// table; returns how many dead letters that put in the outbox.
pub(crate) fn apply_account_messages(pipeline: &mut Pipeline, msgs: &[OwnedMessage]) -> Result<u64, StoreError> {
    if msgs.is_empty() {
        return Ok(0);
    }
    let msgs: Vec<InputMessage> = msgs.iter().map(to_input).collect();
    pipeline.apply_accounts(&msgs)
}

/// Reads the accounts topic from the stored offsets to its current end;
/// returns how many dead letters that put in the outbox.
pub(crate) fn load_accounts(pipeline: &mut Pipeline, consumer: &BaseConsumer, topic: &str) -> Result<u64, WorkerError> {
    let store = pipeline.store().clone();
    let (ends, _) =
        kafka::assign_to_end(consumer, topic, |p, low, _| Ok::<_, WorkerError>(store.partition(topic, p)?.map_or(low, |s| s.next_offset)))?;
    let mut chunk: Vec<OwnedMessage> = Vec::new();
    let mut dead = 0;
    let read = kafka::read_to_end(consumer, ends, Duration::from_secs(120), |m| {
        chunk.push(m.detach());
        if chunk.len() >= 1000 {
            dead += apply_account_messages(pipeline, &chunk)?;
            chunk.clear();
        }
        Ok::<_, WorkerError>(())
    })?;
    dead += apply_account_messages(pipeline, &chunk)?;
    if !read.unfinished.is_empty() {
        tracing::warn!(partitions = ?read.unfinished, "accounts topic not read to its end: no record for 120 s; continuing, bills will be restated as records arrive");
    }
    tracing::info!(records = read.read, dead_letters = dead, "accounts table loaded");
    Ok(dead)
}
