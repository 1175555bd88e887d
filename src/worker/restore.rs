//! Restoring a partition assigned to this worker from the changelog
//! ([`crate::changelog`]) when another worker moved it past what this store
//! holds. Run by a thread of its own ([`RestoreThread`]), one partition at a
//! time, while the partition is paused and the loop goes on polling the
//! consumer and processing the other partitions: a restore of any length
//! keeps the worker in its group.

use crate::config::KafkaConfig;
use crate::driver::WorkerError;
use crate::kafka::{self, KafkaSetupError};
use crate::metrics::Metrics;
use crate::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a restore's changelog read may see no record before it gives
/// up. It runs in the loop, once per partition assigned (the loop reads
/// nothing else meanwhile), so it is kept short. A read_committed reader also stops at a dead
/// writer's open transaction until the broker aborts it (at the writer's
/// `transaction.timeout.ms`, 60 s): a takeover sooner than 30 s before that
/// (a `session.timeout.ms` below 30 s) can stop short (README, Scaling).
/// Waiting the transaction timeout out instead made a resumed zombie on
/// tansu, whose own open transaction held its restore, stop too late to
/// learn it was fenced (tests/zombie.rs).
const RESTORE_PATIENCE: Duration = Duration::from_secs(30);

/// Brings a partition assigned to this worker up to the state its last
/// owner left in the changelog ([`crate::changelog`]).
pub struct Restorer {
    /// Reads changelog partitions by assignment.
    changelog: BaseConsumer,
    /// A client of the worker's group that never joins it: asks for the
    /// group's committed offsets.
    group: BaseConsumer,
    topic: String,
    metrics: Arc<Metrics>,
    /// Workers write the changelog in transactions with the offsets: a
    /// record past the committed offset (none committed: 0) never committed.
    transactions: bool,
    /// The last run of this store did not stop cleanly (with transactions):
    /// every partition is restored at its first assignment, whatever its
    /// stored position, since a crash between a transaction's commit and
    /// the state write leaves committed changes (bill revisions, which do
    /// not move the position) only in the changelog.
    unclean: bool,
    /// Partitions restored since this worker started.
    restored: Mutex<BTreeSet<i32>>,
}

impl Restorer {
    /// The restorer of a worker of `k`'s group; `unclean`: the last run on
    /// this store did not stop cleanly.
    pub(super) fn new(k: &KafkaConfig, metrics: Arc<Metrics>, unclean: bool) -> Result<Restorer, KafkaSetupError> {
        Ok(Restorer {
            changelog: kafka::restore_consumer(k, &format!("{}-changelog", k.group_id))?,
            group: kafka::plain_consumer(k, &k.group_id)?,
            topic: k.changelog_topic.clone(),
            metrics,
            transactions: k.transactions,
            unclean: k.transactions && unclean,
            restored: Mutex::default(),
        })
    }

    /// Restores `partition` when another worker moved it past what this
    /// store holds: the store has no position for it, or the group's
    /// committed offset is ahead of the stored one. Reads the partition's
    /// changelog from its start and writes the result in one batch. Returns
    /// the records read, or `None` when nothing needed restoring or the
    /// read did not reach the end (then the stored state, consistent in
    /// itself, is kept).
    fn restore(&self, store: &Store, input_topic: &str, partition: i32, wanted: &dyn Fn() -> bool) -> Result<Option<u64>, WorkerError> {
        let local = store.partition(input_topic, partition)?.map(|s| s.next_offset);
        let committed = self.committed(input_topic, partition);
        let first_since_unclean_stop = self.unclean && self.restored.lock().expect("not poisoned").insert(partition);
        // The stored state is at least as far as the group's: kept, but the
        // bill states another owner wrote since this store last saw the
        // changelog are read, so that no revision it sent is sent again
        // with other content (a broker that does not store transactional
        // offset commits, like the mock cluster, can show a committed
        // offset behind what the other owner processed).
        let keep_own = match (local, committed) {
            _ if first_since_unclean_stop => false,
            (Some(l), Some(c)) => c <= l,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if keep_own {
            return self.raise_bill_states(store, input_topic, partition, wanted);
        }
        self.read_whole(store, input_topic, partition, (local, committed), first_since_unclean_stop, wanted)
    }

    /// The group's committed offset of `partition`, if it has one (and it
    /// can be read).
    fn committed(&self, input_topic: &str, partition: i32) -> Option<i64> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(input_topic, partition);
        match self.group.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => c.find_partition(input_topic, partition).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            }),
            Err(e) => {
                tracing::warn!(error = %e, partition, "cannot read the group's committed offset; restoring from the changelog");
                None
            }
        }
    }

    /// Reads `partition`'s changelog from its start and writes what it
    /// holds in one batch (`overwrite`: over what the store has). `local`
    /// and `committed`: the stored and the group's positions.
    fn read_whole(
        &self,
        store: &Store,
        input_topic: &str,
        partition: i32,
        (local, committed): (Option<i64>, Option<i64>),
        overwrite: bool,
        wanted: &dyn Fn() -> bool,
    ) -> Result<Option<u64>, WorkerError> {
        let started = Instant::now();
        self.metrics.partitions_restoring.inc();
        // With transactions, whatever committed carries its offsets: records
        // past them (from 0 when none are committed) are of transactions
        // that did not commit, which some brokers deliver anyway.
        // The stored position counts as committed too: with transactions it
        // is written only after its transaction committed (a broker that
        // does not store transactional offset commits, like the mock
        // cluster, shows only the plain commit that follows, later).
        let known = match (committed, local) {
            (Some(c), Some(l)) => Some(c.max(l)),
            (c, l) => c.or(l),
        };
        let cut = if self.transactions { Some(known.unwrap_or(0)) } else { committed };
        let mut restore = crate::changelog::Restore::up_to(cut);
        let read = kafka::read_partition(&self.changelog, &self.topic, partition, 0, RESTORE_PATIENCE, |m| {
            still_wanted(&restore, wanted)?;
            offer_changelog_record(&mut restore, partition, m)
        });
        self.metrics.partitions_restoring.dec();
        let Some((_, end)) = ReadStop::finished(read, partition)? else { return Ok(None) };
        let (records, bytes) = (self.count_read(partition, &restore), restore.bytes);
        let Some(end) = end else {
            tracing::error!(
                partition,
                records,
                patience_secs = RESTORE_PATIENCE.as_secs(),
                "the changelog partition was not read to its end (no record within the patience); keeping the stored state, the partition resumes from it (with an empty store: from the input's beginning, and bill revisions restart); check the broker and the changelog topic"
            );
            return Ok(None);
        };
        warn_older_formats(partition, restore.format1, restore.format2);
        let mut restored = restore.finish();
        restored.changelog_end = Some(end);
        restored.write(store, input_topic, partition, overwrite)?;
        self.log_restored(partition, &restored, started, (local, committed), (records, bytes));
        Ok(Some(records))
    }

    /// Reports a restore read whole: its time in the metrics, what it
    /// wrote in the log.
    fn log_restored(
        &self,
        partition: i32,
        restored: &crate::changelog::Restored,
        started: Instant,
        (local, committed): (Option<i64>, Option<i64>),
        (records, bytes): (u64, u64),
    ) {
        let seconds = crate::metrics::rounded(started.elapsed().as_secs_f64(), 3);
        self.metrics.restore_seconds.with_label_values(&[&partition.to_string()]).set(seconds);
        tracing::info!(
            partition,
            records,
            bytes,
            seconds,
            account_months = restored.usage.len(),
            bills = restored.bills.len(),
            position = ?restored.position.map(|p| p.next_offset),
            stored_before = ?local,
            ?committed,
            "partition restored from the changelog"
        );
    }

    /// Counts what a read of `partition`'s changelog went through in the
    /// metrics; returns the records.
    fn count_read(&self, partition: i32, restore: &crate::changelog::Restore) -> u64 {
        let label = partition.to_string();
        self.metrics.restore_records.with_label_values(&[&label]).inc_by(restore.records);
        self.metrics.restore_bytes.with_label_values(&[&label]).inc_by(restore.bytes);
        restore.records
    }

    /// For a store that keeps its own state of `partition`: reads the bill
    /// states written to the changelog since this store last saw it
    /// ([`Store::changelog_seen`]; never seen: from the start) and raises
    /// the revisions held to them, marking their months to be recomputed
    /// (a next revision follows where this store's bill differs); and the
    /// alerts another owner emitted meanwhile, which this one then does
    /// not send again.
    fn raise_bill_states(
        &self,
        store: &Store,
        input_topic: &str,
        partition: i32,
        wanted: &dyn Fn() -> bool,
    ) -> Result<Option<u64>, WorkerError> {
        let from = store.changelog_seen(partition)?.unwrap_or(0);
        let mut restore = crate::changelog::Restore::bills_only();
        let read = kafka::read_partition(&self.changelog, &self.topic, partition, from, RESTORE_PATIENCE, |m| {
            still_wanted(&restore, wanted)?;
            if crate::changelog::needs_confirmation(m.key()) {
                offer_changelog_record(&mut restore, partition, m)
            } else {
                restore.records += 1;
                Ok(())
            }
        });
        let Some((_, end)) = ReadStop::finished(read, partition)? else { return Ok(None) };
        let records = self.count_read(partition, &restore);
        let Some(end) = end else {
            tracing::error!(
                partition,
                records,
                from,
                patience_secs = RESTORE_PATIENCE.as_secs(),
                "the changelog partition's bill states were not read to its end (no record within the patience); keeping the revisions held: one another owner sent may be sent again with other content; check the broker and the changelog topic"
            );
            return Ok(None);
        };
        let mut restored = restore.finish();
        restored.changelog_end = Some(end);
        restored.write(store, input_topic, partition, false)?;
        if records > 0 {
            tracing::info!(
                partition,
                records,
                from,
                end,
                bills = restored.bills.len(),
                "bill states read from the changelog; the stored state is kept"
            );
        }
        Ok(Some(records))
    }
}

/// Records, for partitions given up, the changelog's end offsets as
/// read before they were revoked ([`Store::changelog_seen`]): if one
/// comes back, only bill states written after them are read. An end
/// read before the revocation is at or before anything the next owner
/// writes; older than the revocation, it only makes that read longer.
pub(super) fn note_changelog_seen(store: &Store, ends: &BTreeMap<i32, i64>) {
    if ends.is_empty() {
        return;
    }
    let mut b = store.batch();
    for (&p, &end) in ends {
        b.put_changelog_seen(p, end);
    }
    if let Err(e) = store.write(b) {
        tracing::warn!(error = %e, "cannot record the changelog's ends; the partitions' next restores read their bill states from further back");
    }
}

/// A restore read records of changelog formats 1 or 2: says what they are
/// and what to do about them.
fn warn_older_formats(partition: i32, format1: u64, format2: u64) {
    if format1 + format2 > 0 {
        tracing::warn!(
            partition,
            format1_records = format1,
            format2_records = format2,
            "the changelog holds records of an older format (format 1: a gatebill before changelog format 2; format 2: before \
             format 3): read as the base that later records replace, but never rewritten or deleted, so the topic keeps them; \
             to shed them, see README, Upgrading the changelog format"
        );
    }
}

/// Why a changelog read stopped before its end.
enum ReadStop {
    /// The partition was revoked (or assigned again) meanwhile: the
    /// restore is dropped, nothing of it written.
    Cancelled,
    /// It failed.
    Failed(WorkerError),
}

impl From<KafkaSetupError> for ReadStop {
    fn from(e: KafkaSetupError) -> Self {
        ReadStop::Failed(e.into())
    }
}

impl ReadStop {
    /// A read's result: `None` when it was cancelled (logged).
    fn finished<T>(read: Result<T, ReadStop>, partition: i32) -> Result<Option<T>, WorkerError> {
        match read {
            Ok(t) => Ok(Some(t)),
            Err(ReadStop::Cancelled) => {
                tracing::info!(partition, "restore dropped: the partition was revoked while it was restored");
                Ok(None)
            }
            Err(ReadStop::Failed(e)) => Err(e),
        }
    }
}

/// Every 4,096 records of a read: whether the restore is still wanted.
fn still_wanted(restore: &crate::changelog::Restore, wanted: &dyn Fn() -> bool) -> Result<(), ReadStop> {
    if restore.records.is_multiple_of(4096) && !wanted() {
        return Err(ReadStop::Cancelled);
    }
    Ok(())
}

/// The thread that restores partitions apart from the loop, one at a time
/// in the order asked.
pub struct RestoreThread {
    jobs: Option<mpsc::Sender<(i32, u64)>>,
    done: mpsc::Receiver<(i32, u64)>,
    /// The generation of the assignment each partition is to be restored
    /// for: a job of another generation (revoked, or assigned again since)
    /// is dropped.
    wanted: Arc<Mutex<HashMap<i32, u64>>>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RestoreThread {
    /// Starts the thread over `restorer`, writing into `store`.
    pub(super) fn start(
        restorer: Restorer,
        store: Arc<Store>,
        input_topic: String,
        fault: Option<crate::driver::FaultPoint>,
    ) -> Result<RestoreThread, KafkaSetupError> {
        let (jobs, inbox) = mpsc::channel::<(i32, u64)>();
        let (outbox, done) = mpsc::channel();
        let wanted: Arc<Mutex<HashMap<i32, u64>>> = Arc::default();
        let w = wanted.clone();
        let handle = std::thread::Builder::new()
            .name("gatebill-restore".into())
            .spawn(move || {
                for (partition, generation) in inbox {
                    let is_wanted = || w.lock().expect("not poisoned").get(&partition) == Some(&generation);
                    if !is_wanted() {
                        continue;
                    }
                    slow_restore(fault, partition);
                    if let Err(e) = restorer.restore(&store, &input_topic, partition, &is_wanted) {
                        tracing::error!(error = %e, partition, "restoring from the changelog failed; the partition resumes from the stored state");
                    }
                    if outbox.send((partition, generation)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| KafkaSetupError::Thread(e.to_string()))?;
        Ok(RestoreThread { jobs: Some(jobs), done, wanted, handle: Some(handle) })
    }

    /// Asks for `partition` to be restored for its assignment `generation`.
    pub(super) fn ask(&self, partition: i32, generation: u64) {
        self.wanted.lock().expect("not poisoned").insert(partition, generation);
        if let Some(jobs) = &self.jobs {
            let _ = jobs.send((partition, generation));
        }
    }

    /// Drops the restore of `partition`, asked or running.
    pub(super) fn cancel(&self, partition: i32) {
        self.wanted.lock().expect("not poisoned").remove(&partition);
    }

    /// The restores finished since the last call: (partition, generation).
    pub(super) fn finished(&self) -> Vec<(i32, u64)> {
        self.done.try_iter().collect()
    }
}

impl Drop for RestoreThread {
    fn drop(&mut self) {
        // Every restore cancelled, the queue closed: the thread ends after
        // at most one poll of its read.
        self.wanted.lock().expect("not poisoned").clear();
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The test crash point [`crate::driver::FaultPoint::SlowRestore`].
#[cfg_attr(not(feature = "fault-injection"), allow(unused_variables))]
fn slow_restore(fault: Option<crate::driver::FaultPoint>, partition: i32) {
    #[cfg(feature = "fault-injection")]
    if let Some(crate::driver::FaultPoint::SlowRestore(p, secs)) = fault {
        if p == partition {
            tracing::warn!(partition, secs, "fault point: the restore waits before it reads");
            std::thread::sleep(Duration::from_secs(secs));
        }
    }
}

/// Hands a changelog record (a tombstone: no value) to a restore; skipped
/// with a warning when it lacks its key or next-offset header, or cannot be
/// read.
fn offer_changelog_record(restore: &mut crate::changelog::Restore, partition: i32, m: &BorrowedMessage<'_>) -> Result<(), ReadStop> {
    let next_offset = m
        .headers()
        .and_then(|h| h.iter().find(|x| x.key == crate::changelog::NEXT_OFFSET))
        .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse::<i64>().ok());
    let (Some(next_offset), Some(key)) = (next_offset, m.key()) else {
        tracing::warn!(partition, offset = m.offset(), "changelog record without key or next-offset header; skipped");
        return Ok(());
    };
    let confirmed = !m.headers().is_some_and(|h| h.iter().any(|x| x.key == crate::changelog::UNCONFIRMED));
    match crate::changelog::Change::decode(key, m.payload()) {
        Ok(change) => restore.offer_bill(next_offset, change, key.len() + m.payload_len(), confirmed),
        Err(e) => tracing::warn!(error = %e, partition, offset = m.offset(), "unreadable changelog record; skipped"),
    }
    Ok(())
}
