//! The Kafka driver around the pipeline: `run` (a consumer-group member that
//! never stops) and `replay` (bounded: from the earliest offsets, or a time,
//! to the end offsets seen at start). Both share one loop:
//!
//! 1. gather a batch (up to `batch_size` messages or `batch_wait_ms`);
//! 2. `Pipeline::process`: one synced RocksDB write with usage, dedupe keys,
//!    next offsets, dirty marks and dead letters;
//! 3. produce the outbox and delete what the broker acknowledged;
//! 4. commit offsets to the group (for lag tools only: the store decides
//!    where to resume);
//! 5. every `emit_interval_ms`, recompute changed bills into the outbox.

use crate::config::Checked;
use crate::driver::{apply_account_messages, load_accounts, poll_now};
pub use crate::driver::{RunSummary, WorkerError};
use crate::gathered::Gathered;
use crate::kafka::{self, KafkaSetupError};
use crate::metrics::{Health, Metrics};
use crate::pipeline::{now_ms, InputMessage, Pipeline, Settings};
use crate::store::{Store, StoreError};
use futures_util::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Which loop to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `gatebill run`: consumer group, forever.
    Live,
    /// `gatebill replay`: bounded.
    Replay {
        /// Start partitions without stored state at this event-log time (epoch
        /// ms) instead of the earliest offset.
        from_ms: Option<i64>,
        /// Show a progress bar.
        progress: bool,
    },
}

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
}

/// A crash point of the restart tests: runs `$then` when the run was asked
/// to stop at `$point` ([`RunOptions::fault`]); nothing at all without the
/// `fault-injection` feature.
macro_rules! fault_point {
    ($worker:expr, $point:expr, $then:block) => {
        #[cfg(feature = "fault-injection")]
        if $worker.opts.fault == Some($point) $then
    };
}

/// Options of one worker run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Live or replay.
    pub mode: Mode,
    /// Simulated crash point (tests; looked at only with the
    /// `fault-injection` feature).
    pub fault: Option<FaultPoint>,
}

impl RunOptions {
    /// A run in `mode` with no crash point.
    pub fn new(mode: Mode) -> Self {
        RunOptions { mode, fault: None }
    }
}

/// The input partitions this worker owns, as the rebalance callback alone
/// tells it (never by asking the consumer), and those revoked since the loop
/// last looked.
#[derive(Debug, Default)]
pub struct Ownership {
    assigned: BTreeSet<i32>,
    revoked: BTreeSet<i32>,
    /// Bumped on every change, so the loop looks only when something changed.
    version: u64,
}

impl Ownership {
    /// Partitions given to this worker (added to what it owns).
    pub fn assign(&mut self, partitions: impl IntoIterator<Item = i32>) {
        self.assigned.extend(partitions);
        self.version += 1;
    }

    /// Partitions taken away (all of them for an eager rebalance).
    pub fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>) {
        for p in partitions {
            self.assigned.remove(&p);
            self.revoked.insert(p);
        }
        self.version += 1;
    }

    /// The partitions owned now.
    pub fn assigned(&self) -> Vec<i32> {
        self.assigned.iter().copied().collect()
    }

    /// The partitions revoked since the last call.
    pub fn take_revoked(&mut self) -> BTreeSet<i32> {
        std::mem::take(&mut self.revoked)
    }
}

/// Consumer context: on assignment, positions each partition at the offset
/// the state store holds (or the beginning when it holds none), so a group
/// offset never decides where billing resumes; records every assignment and
/// revocation in the shared [`Ownership`].
pub struct StoreOffsets {
    store: Arc<Store>,
    topic: String,
    ownership: Arc<Mutex<Ownership>>,
    restorer: Restorer,
}

/// How long a restore's changelog read may see no record before it gives
/// up. It runs inside the rebalance callback, once per partition assigned,
/// so it is kept short. A read_committed reader also stops at a dead
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
    /// Restores `partition` when another worker moved it past what this
    /// store holds: the store has no position for it, or the group's
    /// committed offset is ahead of the stored one. Reads the partition's
    /// changelog from its start and writes the result in one batch. Returns
    /// the records read, or `None` when nothing needed restoring or the
    /// read did not reach the end (then the stored state, consistent in
    /// itself, is kept).
    fn restore(&self, store: &Store, input_topic: &str, partition: i32) -> Result<Option<u64>, WorkerError> {
        let local = store.partition(input_topic, partition)?.map(|s| s.next_offset);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(input_topic, partition);
        let committed = match self.group.committed_offsets(tpl, Duration::from_secs(10)) {
            Ok(c) => c.find_partition(input_topic, partition).and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            }),
            Err(e) => {
                tracing::warn!(error = %e, partition, "cannot read the group's committed offset; restoring from the changelog");
                None
            }
        };
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
            return self.raise_bill_states(store, input_topic, partition);
        }
        let started = Instant::now();
        self.metrics.partitions_restoring.inc();
        let label = partition.to_string();
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
            offer_changelog_record(&mut restore, partition, m);
            Ok::<_, WorkerError>(())
        });
        self.metrics.partitions_restoring.dec();
        let (_, end) = read?;
        let (records, bytes) = (restore.records, restore.bytes);
        self.metrics.restore_records.with_label_values(&[&label]).inc_by(records);
        self.metrics.restore_bytes.with_label_values(&[&label]).inc_by(bytes);
        let Some(end) = end else {
            tracing::error!(
                partition,
                records,
                patience_secs = RESTORE_PATIENCE.as_secs(),
                "the changelog partition was not read to its end (no record within the patience); keeping the stored state, the partition resumes from it (with an empty store: from the input's beginning, and bill revisions restart); check the broker and the changelog topic"
            );
            return Ok(None);
        };
        let mut restored = restore.finish();
        restored.changelog_end = Some(end);
        let position = restored.position.map(|p| p.next_offset);
        restored.write(store, input_topic, partition, first_since_unclean_stop)?;
        let seconds = crate::metrics::rounded(started.elapsed().as_secs_f64(), 3);
        self.metrics.restore_seconds.with_label_values(&[&label]).set(seconds);
        tracing::info!(
            partition,
            records,
            bytes,
            seconds,
            account_months = restored.usage.len(),
            bills = restored.bills.len(),
            ?position,
            stored_before = ?local,
            ?committed,
            "partition restored from the changelog"
        );
        Ok(Some(records))
    }

    /// Records the changelog's end offsets of `partitions`, given up now,
    /// as seen by this store ([`Store::changelog_seen`]). An end that cannot
    /// be read is left as it was (a later restore reads more).
    fn note_changelog_end(&self, store: &Store, partitions: &[i32]) {
        let mut b = store.batch();
        for &p in partitions {
            match self.changelog.fetch_watermarks(&self.topic, p, Duration::from_secs(5)) {
                Ok((_, high)) => b.put_changelog_seen(p, high),
                Err(e) => {
                    tracing::warn!(error = %e, partition = p, "cannot read the changelog's end; the partition's next restore reads its bill states from further back")
                }
            }
        }
        if let Err(e) = store.write(b) {
            tracing::warn!(error = %e, "cannot record the changelog's ends; the partitions' next restores read their bill states from further back");
        }
    }

    /// For a store that keeps its own state of `partition`: reads the bill
    /// states written to the changelog since this store last saw it
    /// ([`Store::changelog_seen`]; never seen: from the start) and raises
    /// the revisions held to them, marking their months to be recomputed
    /// (a next revision follows where this store's bill differs).
    fn raise_bill_states(&self, store: &Store, input_topic: &str, partition: i32) -> Result<Option<u64>, WorkerError> {
        let from = store.changelog_seen(partition)?.unwrap_or(0);
        let mut restore = crate::changelog::Restore::bills_only();
        let (_, end) = kafka::read_partition(&self.changelog, &self.topic, partition, from, RESTORE_PATIENCE, |m| {
            if crate::changelog::is_bill_state(m.key()) {
                offer_changelog_record(&mut restore, partition, m);
            } else {
                restore.records += 1;
            }
            Ok::<_, WorkerError>(())
        })?;
        let records = restore.records;
        let label = partition.to_string();
        self.metrics.restore_records.with_label_values(&[&label]).inc_by(records);
        self.metrics.restore_bytes.with_label_values(&[&label]).inc_by(restore.bytes);
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

/// Hands a changelog record to a restore (skipped with a warning when it
/// lacks its key, value or next-offset header, or cannot be read).
fn offer_changelog_record(restore: &mut crate::changelog::Restore, partition: i32, m: &BorrowedMessage<'_>) {
    let next_offset = m
        .headers()
        .and_then(|h| h.iter().find(|x| x.key == crate::changelog::NEXT_OFFSET))
        .and_then(|x| std::str::from_utf8(x.value?).ok()?.parse::<i64>().ok());
    let (Some(next_offset), Some(key), Some(value)) = (next_offset, m.key(), m.payload()) else {
        tracing::warn!(partition, offset = m.offset(), "changelog record without key, value or next-offset header; skipped");
        return;
    };
    let confirmed = !m.headers().is_some_and(|h| h.iter().any(|x| x.key == crate::changelog::UNCONFIRMED));
    match crate::changelog::Change::decode(key, value) {
        Ok(change) => restore.offer_bill(next_offset, change, key.len() + value.len(), confirmed),
        Err(e) => tracing::warn!(error = %e, partition, offset = m.offset(), "unreadable changelog record; skipped"),
    }
}

impl ClientContext for StoreOffsets {}

impl ConsumerContext for StoreOffsets {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                for &p in &partitions {
                    // Here, before the partition is read: its state, if another
                    // worker moved it on (see `Restorer::restore`).
                    if let Err(e) = self.restorer.restore(&self.store, &self.topic, p) {
                        tracing::error!(error = %e, partition = p, "restoring from the changelog failed; the partition resumes from the stored state");
                    }
                    let offset = match self.store.partition(&self.topic, p) {
                        Ok(Some(s)) => Offset::Offset(s.next_offset),
                        Ok(None) => Offset::Beginning,
                        Err(e) => {
                            tracing::error!(error = %e, partition = p, "cannot read stored offset; starting the partition from the beginning");
                            Offset::Beginning
                        }
                    };
                    tracing::info!(partition = p, ?offset, "partition assigned; resuming from the state store's offset");
                    let _ = tpl.set_partition_offset(&self.topic, p, offset);
                }
                let r = if cooperative { base.incremental_assign(tpl) } else { base.assign(tpl) };
                match r {
                    Ok(()) => self.ownership.lock().expect("not poisoned").assign(partitions),
                    Err(e) => tracing::error!(error = %e, "assign failed"),
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                // What this worker wrote to their changelog is known: if it
                // gets one back, only bill states written after now are read.
                self.restorer.note_changelog_end(&self.store, &partitions);
                self.ownership.lock().expect("not poisoned").revoke(partitions);
                let r = if cooperative { base.incremental_unassign(tpl) } else { base.unassign() };
                if let Err(e) = r {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; unassigning");
                let mut ownership = self.ownership.lock().expect("not poisoned");
                let all = ownership.assigned();
                ownership.revoke(all);
                let _ = base.unassign();
            }
        }
    }
}

/// How often (in messages) gathering a batch from librdkafka's queue looks
/// at the batch deadline and at a stop request.
const CHECK_EVERY: usize = 1024;

/// Counts acknowledged (committed) records by topic.
fn count_produced<'a>(metrics: &Metrics, records: impl Iterator<Item = &'a crate::store::OutboxRecord>) {
    let mut by_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for r in records {
        *by_topic.entry(r.topic.as_str()).or_default() += 1;
    }
    for (topic, n) in by_topic {
        metrics.records_produced.with_label_values(&[topic]).inc_by(n);
    }
}

/// Produces the outbox; returns how many records failed and stay in it.
async fn flush(pipeline: &mut Pipeline, producer: &FutureProducer, metrics: &Metrics) -> Result<u64, StoreError> {
    let t = Instant::now();
    let drained = pipeline
        .drain_outbox(|page| async move {
            let delivered = kafka::produce_all(producer, &page).await;
            count_produced(metrics, delivered.iter().map(|(_, r)| r));
            Ok::<_, StoreError>(delivered)
        })
        .await?;
    if drained.offered > 0 {
        metrics.produce_seconds.observe(t.elapsed().as_secs_f64());
    }
    Ok(drained.failed)
}

/// Drains the outbox: with the idempotent producer ([`flush`]), or, with
/// transactions, one transaction per page (records that a worker without
/// transactions left there).
async fn flush_outbox(
    pipeline: &mut Pipeline,
    producer: &FutureProducer,
    txn: Option<&kafka::Transactional>,
    metrics: &Metrics,
) -> Result<u64, WorkerError> {
    let Some(txn) = txn else { return Ok(flush(pipeline, producer, metrics).await?) };
    let drained = pipeline
        .drain_outbox(|page| async move {
            let records: Vec<crate::store::OutboxRecord> = page.iter().map(|(_, r)| r.clone()).collect();
            match txn.commit(&records, TopicPartitionList::new(), None).await {
                Ok(()) => {
                    count_produced(metrics, records.iter());
                    Ok(page)
                }
                Err(kafka::TxnError::Aborted(why)) => {
                    tracing::warn!(%why, "outbox transaction aborted; the records stay in the outbox");
                    Ok(Vec::new())
                }
                Err(e) => Err(WorkerError::from(e)),
            }
        })
        .await?;
    Ok(drained.failed)
}

/// Runs the worker until `shutdown` resolves (live), the end offsets are
/// reached (replay), or a fault point (tests). Every exit, errors and fault
/// points included, goes through [`Worker::teardown`].
pub async fn run(cfg: &Checked, opts: RunOptions, shutdown: impl Future<Output = ()>) -> Result<RunSummary, WorkerError> {
    let mut worker = Worker::start(cfg, opts).await?;
    tokio::pin!(shutdown);
    let result = loop {
        match worker.step(&mut shutdown).await {
            Ok(Step::Continue) => {}
            Ok(Step::Stop) => break worker.finish().await,
            Ok(Step::Crash) => {
                worker.summary.crashed = true;
                break Ok(());
            }
            Err(e) => break Err(e),
        }
    };
    worker.teardown();
    result.map(|()| worker.summary)
}

/// What the loop does after a step.
enum Step {
    /// Read on.
    Continue,
    /// Shutdown asked for, or the replay reached its ends: finish cleanly.
    Stop,
    /// A fault point (tests): stop as a crash would, without finishing.
    Crash,
}

/// The worker of `run` and `replay`: its clients, its pipeline and its
/// timers, built once by [`Worker::start`] from the checked configuration.
pub struct Worker {
    opts: RunOptions,
    input_topic: String,
    state_dir: std::path::PathBuf,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    pipeline: Pipeline,
    producer: FutureProducer,
    /// The transactional producer (`kafka.transactions`); `None`: the
    /// outbox is drained by `producer`.
    txn: Option<kafka::Transactional>,
    /// Replay: where each partition started, to rewind to before anything
    /// of it is stored.
    starts: BTreeMap<i32, i64>,
    accounts: BaseConsumer,
    /// Shared so that a batch of messages borrowed from it (no copy per
    /// message) can be gathered while the worker itself is borrowed mutably.
    consumer: Arc<StreamConsumer<StoreOffsets>>,
    /// Replay: the end offsets seen at start.
    ends: BTreeMap<i32, i64>,
    progress: Option<indicatif::ProgressBar>,
    summary: RunSummary,
    batch_size: usize,
    batch_wait: Duration,
    emit_every: Duration,
    last_emit: Instant,
    /// Emission chunks begun (transactions), for [`FaultPoint::BeforeBillsProduced`].
    emission_chunks: u64,
    started: Instant,
    lag_every: Duration,
    last_sizes: Option<Instant>,
    end_offsets: EndOffsets,
    /// What `/healthz` answers from: commits, aborts, lag.
    health: Arc<Health>,
    /// What the rebalance callback says this worker owns.
    ownership: Arc<Mutex<Ownership>>,
    /// The [`Ownership`] version last acted on.
    ownership_seen: u64,
    /// The partitions owned, as last handed to the pipeline.
    assigned: Vec<i32>,
    /// The buffer batches are gathered in, kept for its capacity.
    gathered: Gathered,
}

impl Worker {
    /// Opens the state, serves metrics, makes sure the topics exist,
    /// delivers what the last stop left in the outbox, loads the account
    /// table, and joins the group (live) or assigns the partitions to their
    /// ends (replay).
    pub async fn start(cfg: &Checked, opts: RunOptions) -> Result<Worker, WorkerError> {
        let store = Arc::new(Store::open_sized(&cfg.worker.state_dir, cfg.worker.store_memory())?);
        let metrics = Metrics::new();
        let health = Health::new(Duration::from_secs(cfg.worker.health_stall_secs), lag_every(cfg));
        let metrics_task = if cfg.metrics.address.is_empty() {
            None
        } else {
            let listener = tokio::net::TcpListener::bind(&cfg.metrics.address)
                .await
                .map_err(|source| WorkerError::Metrics { address: cfg.metrics.address.clone(), source })?;
            tracing::info!(address = %cfg.metrics.address, "serving /metrics and /healthz");
            Some(tokio::spawn(crate::metrics::serve(listener, metrics.clone(), health.clone())))
        };
        // A failed start stops the metrics endpoint too.
        match Worker::connect(cfg, opts, store, metrics, health).await {
            Ok(mut w) => {
                w.metrics_task = metrics_task;
                Ok(w)
            }
            Err(e) => {
                if let Some(t) = metrics_task {
                    t.abort();
                }
                Err(e)
            }
        }
    }

    /// The part of [`Worker::start`] after the metrics endpoint.
    async fn connect(
        cfg: &Checked,
        opts: RunOptions,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
        health: Arc<Health>,
    ) -> Result<Worker, WorkerError> {
        let k = &cfg.kafka;
        // Present while a worker runs on this store; removed by a clean stop.
        let running = cfg.worker.state_dir.join(RUNNING_MARKER);
        let unclean = running.exists();
        if unclean && k.transactions {
            tracing::warn!("the last run on this state directory did not stop cleanly: partitions are restored from the changelog as they are assigned");
        }
        std::fs::write(&running, b"").map_err(|source| WorkerError::Input { path: running.clone(), source })?;
        let ownership: Arc<Mutex<Ownership>> = Arc::default();
        let restorer = Restorer {
            changelog: kafka::restore_consumer(k, &format!("{}-changelog", k.group_id))?,
            group: kafka::plain_consumer(k, &k.group_id)?,
            topic: k.changelog_topic.clone(),
            metrics: metrics.clone(),
            transactions: k.transactions,
            unclean: k.transactions && unclean,
            restored: Mutex::default(),
        };
        let ctx = StoreOffsets { store: store.clone(), topic: k.input_topic.clone(), ownership: ownership.clone(), restorer };
        let clients = kafka::worker_clients(k, ctx).await?;
        let (producer, consumer, accounts) = (clients.producer, clients.events, clients.accounts);
        let mut pipeline = Pipeline::new(store.clone(), cfg.rules().clone(), Settings::from_config(cfg), metrics.clone())?;
        let txn = if k.transactions {
            let id = kafka::transactional_id(k, &cfg.worker.state_dir);
            tracing::info!(transactional_id = %id, "transactions on: bills, dead letters, changelog and offsets commit together");
            Some(kafka::Transactional::start(k, &id).await?)
        } else {
            None
        };
        let mut summary = RunSummary::default();
        // Anything written but not acknowledged before the last stop goes first.
        summary.delivery_failures += flush_outbox(&mut pipeline, &producer, txn.as_ref(), &metrics).await?;
        if load_accounts(&mut pipeline, &accounts, &k.accounts_topic)? > 0 {
            // The account records' dead letters go out now, not with the
            // first input batch (or, with transactions, at the stop).
            summary.delivery_failures += flush_outbox(&mut pipeline, &producer, txn.as_ref(), &metrics).await?;
        }
        let mut starts: BTreeMap<i32, i64> = BTreeMap::new();

        // Replay: the end offsets seen at start, and the assignment.
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        let mut progress: Option<indicatif::ProgressBar> = None;
        match &opts.mode {
            Mode::Live => {
                // A group member bills only what the group assigns it.
                pipeline.set_assignment(&[], now_ms());
                consumer
                    .subscribe(&[&k.input_topic])
                    .map_err(|source| KafkaSetupError::Client { what: format!("subscribing to {}", k.input_topic), source })?
            }
            Mode::Replay { from_ms, progress: show } => {
                let topic = k.input_topic.as_str();
                let mut all = Vec::new();
                let (replay_ends, total) = kafka::assign_to_end(&consumer, topic, |p, low, high| {
                    all.push(p);
                    let start = match (pipeline.next_offset(p), from_ms) {
                        (Some(next), _) => next,
                        (None, Some(t)) => {
                            let mut q = TopicPartitionList::new();
                            q.add_partition_offset(topic, p, Offset::Offset(*t)).expect("valid");
                            let found = consumer
                                .offsets_for_times(q, Duration::from_secs(10))
                                .map_err(|source| KafkaSetupError::Client { what: "finding offsets for --from".into(), source })?;
                            match found.find_partition(topic, p).map(|e| e.offset()) {
                                Some(Offset::Offset(o)) => o,
                                _ => high,
                            }
                        }
                        (None, None) => {
                            if low > 0 {
                                tracing::warn!(partition = p, log_start = low, "the partition's log starts at offset {low}: older events were deleted by retention and are not in this replay's bills");
                            }
                            low
                        }
                    };
                    starts.insert(p, start);
                    Ok::<_, KafkaSetupError>(start)
                })?;
                ends = replay_ends;
                // A replay assigns itself every partition: no rebalance callback.
                ownership.lock().expect("not poisoned").assign(all);
                if *show {
                    progress = Some(replay_progress(total));
                }
            }
        }
        // End offsets (lag, and idleness needs them) are asked for at once, then
        // every LAG_EVERY, or every idle period if that is shorter; the state
        // size gauges are refreshed as often.
        let lag_every = lag_every(cfg);
        let end_offsets = EndOffsets::start(clients.lag, k.input_topic.clone(), lag_every, health.clone())?;
        Ok(Worker {
            opts,
            input_topic: k.input_topic.clone(),
            state_dir: cfg.worker.state_dir.clone(),
            store,
            metrics,
            metrics_task: None,
            pipeline,
            producer,
            txn,
            starts,
            accounts,
            consumer: Arc::new(consumer),
            ends,
            progress,
            summary,
            batch_size: cfg.worker.batch_size,
            batch_wait: Duration::from_millis(cfg.worker.batch_wait_ms),
            emit_every: Duration::from_millis(cfg.worker.emit_interval_ms),
            last_emit: Instant::now(),
            emission_chunks: 0,
            started: Instant::now(),
            lag_every,
            last_sizes: None,
            end_offsets,
            health,
            ownership,
            ownership_seen: 0,
            assigned: Vec::new(),
            gathered: Gathered::default(),
        })
    }

    fn replay(&self) -> bool {
        matches!(self.opts.mode, Mode::Replay { .. })
    }

    /// Replay: every partition's stored position is at the end offset seen
    /// at start.
    fn ends_reached(&self) -> bool {
        self.ends.iter().all(|(p, end)| self.pipeline.next_offset(*p).is_some_and(|n| n >= *end))
    }

    /// One turn of the loop: gather a batch (until it is full, the batch
    /// wait passes, or `shutdown` resolves), write it, deliver the outbox,
    /// commit; follow the accounts topic; emit changed bills when due;
    /// refresh lag and state gauges.
    async fn step(&mut self, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> Result<Step, WorkerError> {
        self.follow_ownership(&mut Gathered::default())?;
        if self.replay() && self.ends_reached() {
            return Ok(Step::Stop);
        }
        let mut stopping = false;
        // One stream for the whole batch (`recv` registers a waker per
        // call); each message is copied into one buffer ([`Gathered`]),
        // kept from batch to batch.
        let consumer = Arc::clone(&self.consumer);
        let mut stream = consumer.stream();
        let mut batch = std::mem::take(&mut self.gathered);
        batch.clear();
        let deadline = tokio::time::Instant::now() + self.batch_wait;
        while batch.len() < self.batch_size {
            // What librdkafka has queued is taken without a timer or a
            // wake-up per message; the deadline and a stop request are
            // looked at every `CHECK_EVERY` messages and whenever the queue
            // runs dry.
            if batch.len() % CHECK_EVERY != CHECK_EVERY - 1 {
                if let Some(r) = poll_now(stream.next()) {
                    match r {
                        Some(Ok(m)) => {
                            batch.push(&m);
                            // A rebalance runs its callback inside the poll.
                            self.follow_ownership(&mut batch)?;
                            continue;
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "consumer error");
                            break;
                        }
                        None => break,
                    }
                }
            }
            tokio::select! {
                biased;
                _ = shutdown.as_mut() => { stopping = true; break; }
                r = tokio::time::timeout_at(deadline, stream.next()) => match r {
                    Err(_) | Ok(None) => break,
                    Ok(Some(Ok(m))) => {
                        batch.push(&m);
                        self.follow_ownership(&mut batch)?;
                    }
                    Ok(Some(Err(e))) => { tracing::warn!(error = %e, "consumer error"); break; }
                },
            }
        }
        if !batch.is_empty() {
            let msgs: Vec<InputMessage> = batch.inputs();
            let stats = if self.txn.is_some() {
                // Write after commit: the batch is staged, its records and
                // the offsets commit in one transaction, and only then is
                // the state written. A crash in between leaves the store
                // behind the group's offsets: the partition is restored
                // from the changelog (`Restorer`).
                self.pipeline.ingest(&msgs)?;
                let mut staged = self.pipeline.stage()?;
                let (records, positions) = (std::mem::take(&mut staged.records), staged.positions.clone());
                fault_point!(self, FaultPoint::BeforeTxnCommit(self.summary.batches + 1), {
                    self.txn.as_ref().expect("transactions on").produce_only(&records).await;
                    self.pipeline.abandon(staged);
                    return Ok(Step::Crash);
                });
                let committed = self.deliver(&records, &positions).await?;
                fault_point!(self, FaultPoint::AfterTxnCommit(self.summary.batches + 1), {
                    self.pipeline.abandon(staged);
                    return Ok(Step::Crash);
                });
                if !committed {
                    self.pipeline.abandon(staged);
                    self.rewind();
                    return Ok(if stopping { Step::Stop } else { Step::Continue });
                }
                let stats = self.pipeline.apply(staged)?;
                self.health.batch_committed();
                stats
            } else {
                let stats = self.pipeline.process(&msgs)?;
                self.health.batch_committed();
                stats
            };
            let summary = &mut self.summary;
            summary.batches += 1;
            summary.messages += msgs.len() as u64;
            summary.billed += stats.billed;
            summary.rejected += stats.rejected;
            summary.duplicates += stats.duplicates;
            summary.reread += stats.already_processed;
            if let Some(pb) = &self.progress {
                advance(pb, msgs.len() as u64);
            }
            fault_point!(self, FaultPoint::AfterWrite(self.summary.batches), { return Ok(Step::Crash) });
            if self.txn.is_none() {
                self.summary.delivery_failures += flush(&mut self.pipeline, &self.producer, &self.metrics).await?;
            }
            if self.opts.mode == Mode::Live {
                // With transactions the offsets are committed already; this
                // plain commit of the same offsets only helps brokers that
                // do not store transactional offset commits (the mock).
                commit(&self.consumer, &self.pipeline, &self.assigned, &self.input_topic, CommitMode::Async);
            }
            fault_point!(self, FaultPoint::AfterCommit(self.summary.batches), { return Ok(Step::Crash) });
            fault_point!(self, FaultPoint::StopAfter(self.summary.batches), { stopping = true });
        }
        self.gathered = batch;
        self.follow_accounts().await?;
        // A replay computes each bill once, at the end: provisional bills of
        // a half-read history would only be restated moments later.
        if !self.replay() && self.last_emit.elapsed() >= self.emit_every {
            if self.emit(now_ms(), false).await? {
                return Ok(Step::Crash);
            }
            self.last_emit = Instant::now();
        }
        self.end_offsets.report(&mut self.pipeline, &self.metrics, &self.assigned, &self.health);
        if self.last_sizes.is_none_or(|t| t.elapsed() >= self.lag_every) {
            self.last_sizes = Some(Instant::now());
            for (cf, bytes) in self.store.sizes() {
                self.metrics.state_bytes.with_label_values(&[cf]).set(bytes as i64);
            }
            for (kind, bytes) in self.store.memory() {
                self.metrics.rocksdb_memory.with_label_values(&[kind]).set(bytes as i64);
            }
        }
        Ok(if stopping { Step::Stop } else { Step::Continue })
    }

    /// Acts on what the rebalance callback recorded since the last look:
    /// drops the messages of revoked partitions from the batch being
    /// gathered ([`Gathered::drop_partitions`]: the worker no longer owns
    /// them, so it must not write their state or offsets; the partitions' next
    /// owner, this worker again after an eager rebalance, reads them from the
    /// stored position) and hands the pipeline the partitions
    /// owned now.
    fn follow_ownership(&mut self, batch: &mut Gathered) -> Result<(), StoreError> {
        let (revoked, now) = {
            let mut o = self.ownership.lock().expect("not poisoned");
            if o.version == self.ownership_seen {
                return Ok(());
            }
            self.ownership_seen = o.version;
            (o.take_revoked(), o.assigned())
        };
        let dropped = batch.drop_partitions(&revoked);
        if dropped > 0 {
            tracing::info!(
                messages = dropped,
                partitions = ?revoked,
                "dropped messages of revoked partitions gathered before the revocation; the partitions' next owner reads them from the stored position"
            );
        }
        // Partitions (re)assigned since the last look may have been restored
        // on disk by the callback: the pipeline reads their state again.
        let added: Vec<i32> = now.iter().copied().filter(|p| !self.assigned.contains(p) || revoked.contains(p)).collect();
        self.pipeline.reload_partitions(&added)?;
        if now != self.assigned {
            self.pipeline.set_assignment(&now, now_ms());
            self.assigned = now;
        }
        Ok(())
    }

    /// Keeps the accounts table current: applies what the accounts topic
    /// has now, and delivers the dead letters of its bad records at once
    /// (the outbox is otherwise drained only with an input batch or an
    /// emission without transactions, and only at a stop with them).
    async fn follow_accounts(&mut self) -> Result<(), WorkerError> {
        let mut updates = Vec::new();
        while updates.len() < 1000 {
            match self.accounts.poll(Duration::ZERO) {
                Some(Ok(m)) => updates.push(m.detach()),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "error reading accounts");
                    break;
                }
                None => break,
            }
        }
        if apply_account_messages(&mut self.pipeline, &updates)? > 0 {
            self.summary.delivery_failures += flush_outbox(&mut self.pipeline, &self.producer, self.txn.as_ref(), &self.metrics).await?;
        }
        Ok(())
    }

    /// The clean stop (shutdown asked for, or replay done): bills for
    /// everything processed, the outbox delivered, offsets committed.
    async fn finish(&mut self) -> Result<(), WorkerError> {
        tracing::info!(
            seconds = crate::metrics::rounded(self.started.elapsed().as_secs_f64(), 3),
            messages = self.summary.messages,
            "input read"
        );
        let t = Instant::now();
        let (cpu, bills_before) = (crate::metrics::process_cpu_seconds(), self.summary.bills_emitted);
        let replay = self.replay();
        // A replay stopped before its ends emits no bill: bills of a partly
        // read history would go out as final (spec section 8). Its dirty
        // marks stay on disk, so the run that resumes it emits them.
        self.summary.interrupted = replay && !self.ends_reached();
        if self.summary.interrupted {
            tracing::warn!(
                messages = self.summary.messages,
                "replay interrupted before the end of its input: no bill emitted; run the same command again to resume"
            );
        } else {
            // A clean stop emits every change, provisional ones held back by
            // worker.provisional_interval_secs included.
            self.pipeline.release_provisional_holds();
            if self.emit(now_ms(), replay).await? {
                self.summary.crashed = true;
                return Ok(());
            }
        }
        // CPU per bill: computed, serialised, produced and acknowledged
        // (committed), every thread of the process counted.
        let bills = self.summary.bills_emitted - bills_before;
        let cpu_us_per_bill = crate::metrics::cpu_us_per(cpu, bills);
        tracing::info!(
            seconds = crate::metrics::rounded(t.elapsed().as_secs_f64(), 3),
            bills,
            cpu_us_per_bill,
            "bills computed and produced"
        );
        let t = Instant::now();
        let left = flush_outbox(&mut self.pipeline, &self.producer, self.txn.as_ref(), &self.metrics).await?;
        self.summary.delivery_failures += left;
        tracing::info!(seconds = crate::metrics::rounded(t.elapsed().as_secs_f64(), 3), "outbox produced");
        if left > 0 {
            tracing::warn!(records = left, "records still in the outbox; they are produced at the next start");
        }
        if self.opts.mode == Mode::Live {
            commit(&self.consumer, &self.pipeline, &self.assigned, &self.input_topic, CommitMode::Sync);
        }
        if left == 0 {
            let _ = std::fs::remove_file(self.state_dir.join(RUNNING_MARKER));
        }
        Ok(())
    }

    /// Emits the bills due: through the outbox, or (transactions) one
    /// transaction per chunk with the owned partitions' offsets, so that a
    /// worker that lost them is fenced rather than heard. `Ok(true)`: a
    /// fault point was reached (tests); the worker stops as a crash would.
    async fn emit(&mut self, now: i64, force_idle: bool) -> Result<bool, WorkerError> {
        if self.txn.is_none() {
            self.summary.bills_emitted += self.pipeline.emit(now, force_idle)? as u64;
            self.summary.delivery_failures += flush(&mut self.pipeline, &self.producer, &self.metrics).await?;
            return Ok(false);
        }
        let mut plan = self.pipeline.emission(now, force_idle)?;
        while let Some(chunk) = self.pipeline.next_emission(&mut plan)? {
            let bills = chunk.records.len() as u64;
            let mut staged = self.pipeline.stage_emission(chunk)?;
            let records = std::mem::take(&mut staged.records);
            self.emission_chunks += u64::from(!records.is_empty());
            fault_point!(self, FaultPoint::BeforeBillsProduced(self.emission_chunks), {
                if !records.is_empty() {
                    self.txn.as_ref().expect("transactions on").produce_changelog_only(&records).await;
                    self.pipeline.abandon(staged);
                    return Ok(true);
                }
            });
            if records.is_empty() || self.deliver(&records, &BTreeMap::new()).await? {
                self.pipeline.apply(staged)?;
                self.summary.bills_emitted += bills;
            } else {
                // The marks stay: the next emission tries again.
                self.pipeline.abandon(staged);
                break;
            }
        }
        Ok(false)
    }

    /// Produces a staged batch's records in one transaction with the group
    /// offsets of every partition owned (live; `positions` ahead of the
    /// stored ones), and commits it. `Ok(false)`: aborted, nothing of it
    /// visible; the caller forgets the staged state.
    async fn deliver(&mut self, records: &[crate::store::OutboxRecord], positions: &BTreeMap<i32, i64>) -> Result<bool, WorkerError> {
        let txn = self.txn.clone().expect("transactions on");
        let group = if self.opts.mode == Mode::Live { self.consumer.group_metadata() } else { None };
        let offsets = if group.is_some() {
            owned_offsets(&self.pipeline, &self.assigned, &self.input_topic, positions)
        } else {
            TopicPartitionList::new()
        };
        let t = Instant::now();
        match txn.commit(records, offsets, group).await {
            Ok(()) => {
                self.health.other_committed();
                self.metrics.produce_seconds.observe(t.elapsed().as_secs_f64());
                self.metrics.transactions.with_label_values(&["committed"]).inc();
                count_produced(&self.metrics, records.iter());
                Ok(true)
            }
            Err(kafka::TxnError::Aborted(why)) => {
                self.health.aborted();
                self.metrics.transactions.with_label_values(&["aborted"]).inc();
                self.summary.aborted += 1;
                tracing::warn!(%why, records = records.len(), "transaction aborted: nothing of it is visible; its state is forgotten and its input read again");
                Ok(false)
            }
            Err(e) => {
                let outcome = if matches!(e, kafka::TxnError::Unusable(_)) { "unusable" } else { "fenced" };
                self.metrics.transactions.with_label_values(&[outcome]).inc();
                Err(e.into())
            }
        }
    }

    /// After an aborted transaction: every partition owned is read again
    /// from its stored position (or where it started).
    fn rewind(&mut self) {
        for &p in &self.assigned {
            let offset = match self.pipeline.next_offset(p).or_else(|| self.starts.get(&p).copied()) {
                Some(o) => Offset::Offset(o),
                None => Offset::Beginning,
            };
            if let Err(e) = self.consumer.seek(&self.input_topic, p, offset, Duration::from_secs(10)) {
                tracing::warn!(error = %e, partition = p, "cannot rewind the partition after an aborted transaction");
            }
        }
    }

    /// What every exit does: the progress bar cleared, the metrics endpoint
    /// stopped.
    fn teardown(&mut self) {
        if let Some(pb) = self.progress.take() {
            pb.finish_and_clear();
        }
        if let Some(t) = self.metrics_task.take() {
            t.abort();
        }
    }
}

/// The topic replay's progress bar over `total` messages, the estimate
/// [`kafka::assign_to_end`] makes from the end offsets (transaction markers
/// and compacted or early-reported ends make it differ from what is read):
/// shown as `~total`, and raised to what was read when that passes it
/// ([`advance`]); the rate in whole messages per second.
fn replay_progress(total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {human_pos}/~{human_len} events  {rate}  ETA {eta}")
            .expect("valid template")
            .with_key("rate", crate::metrics::progress_rate),
    );
    pb
}

/// Moves the progress bar on by `n` messages, raising its length to the
/// position if the estimate was short: never more done than the total.
fn advance(pb: &indicatif::ProgressBar, n: u64) {
    pb.inc(n);
    if pb.length().is_some_and(|len| pb.position() > len) {
        pb.set_length(pb.position());
    }
}

/// A file in the state directory while a worker runs on it.
const RUNNING_MARKER: &str = "RUNNING.gatebill";

/// How often partition lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(15);

/// How often the input's end offsets are read (lag, and idleness needs
/// them): every [`LAG_EVERY`], or every idle period if that is shorter.
fn lag_every(cfg: &Checked) -> Duration {
    LAG_EVERY.min(Duration::from_secs(cfg.worker.idle_after_secs.max(1)))
}

/// End offsets of the input topic's partitions, asked of the broker by a
/// thread with its own client, so that the round trips (seconds on a busy
/// broker with many partitions) never stall the processing loop.
struct EndOffsets {
    latest: Arc<Mutex<HashMap<i32, i64>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl EndOffsets {
    fn start(consumer: BaseConsumer, topic: String, every: Duration, health: Arc<Health>) -> Result<EndOffsets, KafkaSetupError> {
        let latest: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let (l, st) = (latest.clone(), stop.clone());
        std::thread::Builder::new()
            .name("gatebill-lag".into())
            .spawn(move || {
                while !st.load(std::sync::atomic::Ordering::Relaxed) {
                    let n = crate::kafka::partition_counts(&consumer, &[&topic]).ok().and_then(|c| c.get(&topic).copied()).unwrap_or(0);
                    let mut read = 0;
                    for p in 0..n {
                        if let Ok((_, high)) = consumer.fetch_watermarks(&topic, p, Duration::from_secs(5)) {
                            l.lock().expect("not poisoned").insert(p, high);
                            read += 1;
                        }
                    }
                    health.end_offsets_tried(n > 0 && read == n);
                    let until = Instant::now() + every;
                    while Instant::now() < until && !st.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|e| KafkaSetupError::Thread(e.to_string()))?;
        Ok(EndOffsets { latest, stop })
    }

    /// Hands the latest end offsets to the pipeline, the lag gauge, and
    /// the health (the lag of the partitions `owned`).
    fn report(&self, pipeline: &mut Pipeline, metrics: &Metrics, owned: &[i32], health: &Health) {
        let latest = self.latest.lock().expect("not poisoned").clone();
        let mut owned_lag = 0u64;
        for (p, high) in latest {
            pipeline.set_high_watermark(p, high);
            let next = pipeline.next_offset(p).unwrap_or(0);
            let lag = (high - next).max(0);
            metrics.partition_lag.with_label_values(&[&p.to_string()]).set(lag);
            if owned.contains(&p) {
                owned_lag += lag as u64;
            }
        }
        health.set_lag(owned_lag);
    }
}

impl Drop for EndOffsets {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The next offset of each partition owned: from `positions` (a staged
/// batch's), else the stored one; partitions with neither are left out.
fn owned_offsets(pipeline: &Pipeline, owned: &[i32], topic: &str, positions: &BTreeMap<i32, i64>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &p in owned {
        if let Some(next) = positions.get(&p).copied().or_else(|| pipeline.next_offset(p)) {
            tpl.add_partition_offset(topic, p, Offset::Offset(next)).expect("valid offset");
        }
    }
    tpl
}

/// Commits the stored next offsets of the partitions owned to the group.
fn commit(consumer: &StreamConsumer<StoreOffsets>, pipeline: &Pipeline, owned: &[i32], topic: &str, mode: CommitMode) {
    let tpl = owned_offsets(pipeline, owned, topic, &BTreeMap::new());
    if tpl.count() > 0 {
        if let Err(e) = consumer.commit(&tpl, mode) {
            tracing::debug!(error = %e, "offset commit to the group failed (informational only; the state store holds the offsets)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_progress_never_shows_more_done_than_its_total() {
        // The end offsets promised 299,049 messages; 300,000 were read.
        let pb = replay_progress(299_049);
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        advance(&pb, 299_000);
        assert_eq!((pb.position(), pb.length()), (299_000, Some(299_049)));
        advance(&pb, 1_000);
        assert_eq!((pb.position(), pb.length()), (300_000, Some(300_000)));
    }

    #[test]
    fn ownership_follows_assign_and_revoke_callbacks() {
        let mut o = Ownership::default();
        o.assign([2, 0]);
        assert_eq!((o.assigned(), o.version), (vec![0, 2], 1));
        // Cooperative: only partition 2 moves away; then 5 arrives.
        o.revoke([2]);
        o.assign([5]);
        assert_eq!((o.assigned(), o.version), (vec![0, 5], 3));
        assert_eq!(o.take_revoked(), BTreeSet::from([2]));
        assert!(o.take_revoked().is_empty());
        // Eager: everything is revoked, then given back.
        o.revoke(o.assigned());
        assert!(o.assigned().is_empty());
        o.assign([0, 5]);
        assert_eq!(o.take_revoked(), BTreeSet::from([0, 5]));
        assert_eq!(o.assigned(), vec![0, 5]);
    }
}
