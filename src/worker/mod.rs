//! The Kafka driver around the pipeline: `run` (a consumer-group member that
//! never stops) and `replay` (bounded: from the earliest offsets, or a time,
//! to the end offsets seen at start). Both share one loop ([`run`]), each
//! turn a [`Worker::step`]:
//!
//! 1. act on what the rebalance callback recorded ([`rebalance`]): restore
//!    newly assigned partitions from the changelog ([`restore`]), resume them;
//! 2. gather a batch (up to `batch_size` messages or `batch_wait_ms`);
//! 3. stage it in the pipeline and hand it to the run's [`Delivery`]: one
//!    synced RocksDB write with usage, dedupe keys, next offsets, dirty
//!    marks and dead letters, made durable downstream with the input
//!    position (through the outbox, or in a Kafka transaction);
//! 4. commit offsets to the group (for lag tools only: the store decides
//!    where to resume);
//! 5. every `emit_interval_ms`, recompute changed bills and deliver them.

mod end_offsets;
mod rebalance;
mod replay;
mod restore;

use crate::config::Checked;
use crate::delivery::{self, Delivery, GroupMetadata, InputPosition, OutboxDelivery, Outcome, TxnDelivery};
use crate::driver::{apply_account_messages, fault_point, load_accounts, poll_now};
pub use crate::driver::{FaultPoint, RunSummary, WorkerError};
use crate::gathered::Gathered;
use crate::kafka::{self, KafkaSetupError};
use crate::metrics::{Health, Metrics};
use crate::pipeline::{now_ms, BatchStats, Pipeline, Settings};
use crate::store::Store;
use end_offsets::{EndOffsets, Topics};
use futures_util::StreamExt;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, StreamConsumer};
use rdkafka::topic_partition_list::Offset;
use rebalance::Owned;
pub use rebalance::{Ownership, StoreOffsets};
use replay::Bounds;
use restore::{RestoreThread, Restorer};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
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

/// How often (in messages) gathering a batch from librdkafka's queue looks
/// at the batch deadline and at a stop request.
const CHECK_EVERY: usize = 1024;

/// A file in the state directory while a worker runs on it.
const RUNNING_MARKER: &str = "RUNNING.gatebill";

/// How often partition lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(15);

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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Read on.
    Continue,
    /// Shutdown asked for, or the replay reached its ends: finish cleanly.
    Stop,
    /// A fault point (tests): stop as a crash would, without finishing.
    Crash,
}

/// The loop's timings.
struct Timers {
    batch_size: usize,
    batch_wait: Duration,
    emit_every: Duration,
    last_emit: Instant,
    started: Instant,
}

/// The worker of `run` and `replay`: its clients, its pipeline and its
/// timers, built once by [`Worker::start`] from the checked configuration.
pub struct Worker {
    /// Crash point (tests; looked at only with `fault-injection`).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fault: Option<FaultPoint>,
    input_topic: String,
    state_dir: std::path::PathBuf,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    pipeline: Pipeline,
    /// How staged steps reach downstream (outbox or transactions).
    delivery: Delivery,
    /// Shared so that a batch of messages borrowed from it (no copy per
    /// message) can be gathered while the worker itself is borrowed mutably.
    consumer: Arc<StreamConsumer<StoreOffsets>>,
    accounts: BaseConsumer,
    owned: Owned,
    /// Replay: where it started, where it stops.
    bounds: Option<Bounds>,
    timers: Timers,
    end_offsets: EndOffsets,
    summary: RunSummary,
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
        match connect(cfg, opts, store, metrics, health).await {
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
}

/// The loop.
impl Worker {
    /// A consumer-group member (`run`), not a replay.
    fn live(&self) -> bool {
        self.bounds.is_none()
    }

    /// One turn of the loop: gather a batch (until it is full, the batch
    /// wait passes, or `shutdown` resolves), deliver it, commit; follow the
    /// accounts topic; emit changed bills when due; refresh lag and state
    /// gauges.
    async fn step(&mut self, shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>) -> Result<Step, WorkerError> {
        self.follow_ownership(&mut Gathered::default())?;
        if self.bounds.as_ref().is_some_and(|b| b.reached(&self.pipeline)) {
            return Ok(Step::Stop);
        }
        let mut batch = std::mem::take(&mut self.gathered);
        batch.clear();
        let stopping = self.gather(&mut batch, shutdown).await?;
        self.owned.drop_unrestored(&mut batch);
        let mut next = if stopping { Step::Stop } else { Step::Continue };
        if !batch.is_empty() {
            match self.write_batch(&batch).await? {
                Written::Done => {}
                Written::Aborted => return Ok(next),
                Written::Stop => next = Step::Stop,
                Written::Crash => return Ok(Step::Crash),
            }
        }
        self.gathered = batch;
        self.follow_accounts().await?;
        // A replay computes each bill once, at the end: provisional bills of
        // a half-read history would only be restated moments later.
        if self.live() && self.timers.last_emit.elapsed() >= self.timers.emit_every {
            if self.emit(now_ms(), false).await? {
                return Ok(Step::Crash);
            }
            self.timers.last_emit = Instant::now();
        }
        self.end_offsets.refresh(&mut self.pipeline, &self.metrics, &self.owned.assigned, &self.health, &self.store);
        Ok(next)
    }

    /// Gathers messages into `batch` until it is full, the batch wait
    /// passes, or `shutdown` resolves (`Ok(true)`). One stream for the whole
    /// batch (`recv` registers a waker per call); each message is copied
    /// into one buffer ([`Gathered`]), kept from batch to batch. What
    /// librdkafka has queued is taken without a timer or a wake-up per
    /// message; the deadline and a stop request are looked at every
    /// [`CHECK_EVERY`] messages and whenever the queue runs dry.
    async fn gather(
        &mut self,
        batch: &mut Gathered,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<bool, WorkerError> {
        let consumer = Arc::clone(&self.consumer);
        let mut stream = consumer.stream();
        let deadline = tokio::time::Instant::now() + self.timers.batch_wait;
        while batch.len() < self.timers.batch_size {
            let polled = if batch.len() % CHECK_EVERY != CHECK_EVERY - 1 { poll_now(stream.next()) } else { None };
            let next = match polled {
                Some(r) => r,
                None => tokio::select! {
                    biased;
                    _ = shutdown.as_mut() => return Ok(true),
                    r = tokio::time::timeout_at(deadline, stream.next()) => r.unwrap_or_default(),
                },
            };
            match next {
                Some(Ok(m)) => {
                    batch.push(&m);
                    // A rebalance runs its callback inside the poll.
                    self.follow_ownership(batch)?;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                None => break,
            }
        }
        Ok(false)
    }

    /// Stages a gathered batch and hands it to the delivery with the input
    /// position; counts it, publishes what it left in the outbox, commits
    /// the offsets to the group.
    async fn write_batch(&mut self, batch: &Gathered) -> Result<Written, WorkerError> {
        let msgs = batch.inputs();
        self.pipeline.ingest(&msgs)?;
        let staged = self.delivery.stage(&mut self.pipeline)?;
        let member = || self.consumer.group_metadata();
        let at = InputPosition {
            group: self.bounds.is_none().then_some(&member as &GroupMetadata),
            owned: &self.owned.assigned,
            topic: &self.input_topic,
        };
        let stats = match self.delivery.commit_batch(staged, &at).await? {
            Outcome::Committed(stats) => stats,
            Outcome::Aborted => {
                self.summary.aborted += 1;
                self.rewind();
                return Ok(Written::Aborted);
            }
            Outcome::Crashed => return Ok(Written::Crash),
        };
        self.health.batch_committed();
        self.count(&stats, msgs.len() as u64);
        fault_point!(self.fault, FaultPoint::AfterWrite(self.summary.batches), { return Ok(Written::Crash) });
        self.summary.delivery_failures += self.delivery.publish(&mut self.pipeline).await?;
        if self.live() {
            // With transactions the offsets are committed already; this
            // plain commit of the same offsets only helps brokers that do
            // not store transactional offset commits (the mock).
            self.commit_offsets(CommitMode::Async);
        }
        fault_point!(self.fault, FaultPoint::AfterCommit(self.summary.batches), { return Ok(Written::Crash) });
        fault_point!(self.fault, FaultPoint::StopAfter(self.summary.batches), { return Ok(Written::Stop) });
        Ok(Written::Done)
    }

    /// Adds a written batch to the summary and the progress bar.
    fn count(&mut self, stats: &BatchStats, messages: u64) {
        let summary = &mut self.summary;
        summary.batches += 1;
        summary.messages += messages;
        summary.billed += stats.billed;
        summary.rejected += stats.rejected;
        summary.duplicates += stats.duplicates;
        summary.reread += stats.already_processed;
        if let Some(b) = &self.bounds {
            b.advance(messages);
        }
    }

    /// Acts on what the rebalance callback recorded since the last look
    /// ([`Owned::follow`]).
    fn follow_ownership(&mut self, batch: &mut Gathered) -> Result<(), WorkerError> {
        self.owned.follow(&self.consumer, &self.store, &mut self.pipeline, batch)?;
        self.summary.assignments = self.owned.assignments;
        Ok(())
    }

    /// Keeps the accounts table current: applies what the accounts topic
    /// has now, and delivers the dead letters of its bad records at once
    /// (the outbox is otherwise drained only after an input batch or an
    /// emission through the outbox, and only at a stop with transactions).
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
            self.summary.delivery_failures += self.delivery.drain(&mut self.pipeline).await?;
        }
        Ok(())
    }
}

/// The stop.
impl Worker {
    /// The clean stop (shutdown asked for, or replay done): bills for
    /// everything processed, the outbox delivered, offsets committed.
    async fn finish(&mut self) -> Result<(), WorkerError> {
        let seconds = crate::metrics::rounded(self.timers.started.elapsed().as_secs_f64(), 3);
        tracing::info!(seconds, messages = self.summary.messages, "input read");
        // A replay stopped before its ends emits no bill: bills of a partly
        // read history would go out as final (spec section 8). Its dirty
        // marks stay on disk, so the run that resumes it emits them.
        self.summary.interrupted = self.bounds.as_ref().is_some_and(|b| !b.reached(&self.pipeline));
        if self.summary.interrupted {
            tracing::warn!(
                messages = self.summary.messages,
                "replay interrupted before the end of its input: no bill emitted; run the same command again to resume"
            );
        } else if self.final_emission().await? {
            self.summary.crashed = true;
            return Ok(());
        }
        let t = Instant::now();
        let left = self.delivery.drain(&mut self.pipeline).await?;
        self.summary.delivery_failures += left;
        tracing::info!(seconds = crate::metrics::rounded(t.elapsed().as_secs_f64(), 3), "outbox produced");
        if left > 0 {
            tracing::warn!(records = left, "records still in the outbox; they are produced at the next start");
        }
        if self.live() {
            self.commit_offsets(CommitMode::Sync);
        }
        if left == 0 {
            let _ = std::fs::remove_file(self.state_dir.join(RUNNING_MARKER));
        }
        Ok(())
    }

    /// A clean stop's emission: every change, provisional ones held back by
    /// worker.provisional_interval_secs included; a replay's months closed
    /// (its partitions count as idle). `Ok(true)`: a fault point (tests).
    async fn final_emission(&mut self) -> Result<bool, WorkerError> {
        let t = Instant::now();
        let (cpu, bills_before) = (crate::metrics::process_cpu_seconds(), self.summary.bills_emitted);
        self.pipeline.release_provisional_holds();
        if self.emit(now_ms(), !self.live()).await? {
            return Ok(true);
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
        Ok(false)
    }

    /// Emits the bills due through the delivery, with the owned
    /// partitions' stored offsets (a transaction then fences a worker that
    /// lost them). `Ok(true)`: a fault point was reached (tests).
    async fn emit(&mut self, now: i64, force_idle: bool) -> Result<bool, WorkerError> {
        let member = || self.consumer.group_metadata();
        let at = InputPosition {
            group: self.bounds.is_none().then_some(&member as &GroupMetadata),
            owned: &self.owned.assigned,
            topic: &self.input_topic,
        };
        let e = self.delivery.emit(&mut self.pipeline, now, force_idle, &at).await?;
        self.summary.bills_emitted += e.bills;
        self.summary.delivery_failures += e.failed;
        self.summary.aborted += e.aborted;
        Ok(e.crashed)
    }

    /// After an aborted transaction: every partition owned is read again
    /// from its stored position (or where it started).
    fn rewind(&mut self) {
        for &p in &self.owned.assigned {
            let start = self.bounds.as_ref().and_then(|b| b.starts.get(&p).copied());
            let offset = self.pipeline.next_offset(p).or(start).map_or(Offset::Beginning, Offset::Offset);
            if let Err(e) = self.consumer.seek(&self.input_topic, p, offset, Duration::from_secs(10)) {
                tracing::warn!(error = %e, partition = p, "cannot rewind the partition after an aborted transaction");
            }
        }
    }

    /// Commits the stored next offsets of the partitions owned to the group.
    fn commit_offsets(&self, mode: CommitMode) {
        let tpl = delivery::group_offsets(&self.pipeline, &self.owned.assigned, &self.input_topic, &BTreeMap::new());
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, mode) {
                tracing::debug!(error = %e, "offset commit to the group failed (informational only; the state store holds the offsets)");
            }
        }
    }

    /// What every exit does: the progress bar cleared, the metrics endpoint
    /// stopped.
    fn teardown(&mut self) {
        if let Some(pb) = self.bounds.as_mut().and_then(|b| b.progress.take()) {
            pb.finish_and_clear();
        }
        if let Some(t) = self.metrics_task.take() {
            t.abort();
        }
    }
}

/// The part of [`Worker::start`] after the metrics endpoint: the clients,
/// the pipeline and the delivery; what the last stop left in the outbox
/// delivered; the account table; the group joined, or the replay's
/// partitions assigned.
async fn connect(
    cfg: &Checked,
    opts: RunOptions,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
) -> Result<Worker, WorkerError> {
    let k = &cfg.kafka;
    let owned = open_owned(cfg, &opts, &store, &metrics)?;
    let changelog_ends: end_offsets::SharedEnds = Arc::default();
    let ctx = StoreOffsets {
        store: store.clone(),
        topic: k.input_topic.clone(),
        ownership: owned.ownership.clone(),
        changelog_ends: changelog_ends.clone(),
    };
    let clients = kafka::worker_clients(k, ctx).await?;
    let mut pipeline = Pipeline::new(store.clone(), cfg.rules().clone(), Settings::from_config(cfg), metrics.clone())?;
    let mut delivery = open_delivery(cfg, clients.producer, &metrics, &health, opts.fault).await?;
    let mut summary = RunSummary::default();
    // Anything written but not acknowledged before the last stop goes first.
    summary.delivery_failures += delivery.drain(&mut pipeline).await?;
    if load_accounts(&mut pipeline, &clients.accounts, &k.accounts_topic)? > 0 {
        // The account records' dead letters go out now, not with the
        // first input batch (or, with transactions, at the stop).
        summary.delivery_failures += delivery.drain(&mut pipeline).await?;
    }
    let bounds = join_or_assign(&clients.events, &mut pipeline, &owned, k, &opts.mode)?;
    // End offsets (lag, and idleness needs them) are asked for at once,
    // then every LAG_EVERY, or every idle period if that is shorter; the
    // state size gauges are refreshed as often.
    let topics = Topics { input: k.input_topic.clone(), changelog: bounds.is_none().then(|| (k.changelog_topic.clone(), changelog_ends)) };
    let end_offsets = EndOffsets::start(clients.lag, topics, lag_every(cfg), health.clone())?;
    Ok(Worker {
        fault: opts.fault,
        input_topic: k.input_topic.clone(),
        state_dir: cfg.worker.state_dir.clone(),
        store,
        metrics,
        health,
        metrics_task: None,
        pipeline,
        delivery,
        consumer: Arc::new(clients.events),
        accounts: clients.accounts,
        owned,
        bounds,
        timers: Timers::new(cfg),
        end_offsets,
        summary,
        gathered: Gathered::default(),
    })
}

/// What the worker owns, nothing yet, with the thread that restores what
/// it is assigned (a group member; a replay restores nothing). Marks the
/// state directory as in use; a mark left by the last run (it did not stop
/// cleanly) makes every partition's first restore read the changelog.
fn open_owned(cfg: &Checked, opts: &RunOptions, store: &Arc<Store>, metrics: &Arc<Metrics>) -> Result<Owned, WorkerError> {
    let k = &cfg.kafka;
    let unclean = mark_running(&cfg.worker.state_dir)?;
    if unclean && k.transactions {
        tracing::warn!(
            "the last run on this state directory did not stop cleanly: partitions are restored from the changelog as they are assigned"
        );
    }
    let restores = match opts.mode {
        Mode::Live => {
            Some(RestoreThread::start(Restorer::new(k, metrics.clone(), unclean)?, store.clone(), k.input_topic.clone(), opts.fault)?)
        }
        Mode::Replay { .. } => None,
    };
    Ok(Owned::new(restores, &k.input_topic))
}

/// Live: subscribes to the input topic (a group member bills only what the
/// group assigns it). Replay: assigns every partition to its end offset
/// ([`Bounds`]) and records them as owned (no rebalance callback).
fn join_or_assign(
    consumer: &StreamConsumer<StoreOffsets>,
    pipeline: &mut Pipeline,
    owned: &Owned,
    k: &crate::config::KafkaConfig,
    mode: &Mode,
) -> Result<Option<Bounds>, WorkerError> {
    match mode {
        Mode::Live => {
            pipeline.set_assignment(&[], now_ms());
            consumer
                .subscribe(&[&k.input_topic])
                .map_err(|source| KafkaSetupError::Client { what: format!("subscribing to {}", k.input_topic), source })?;
            Ok(None)
        }
        Mode::Replay { from_ms, progress } => {
            let bounds = Bounds::assign(consumer, pipeline, &k.input_topic, *from_ms, *progress)?;
            owned.ownership.lock().expect("not poisoned").assign(bounds.ends.keys().map(|p| (*p, Offset::Invalid)));
            Ok(Some(bounds))
        }
    }
}

/// What became of a gathered batch.
enum Written {
    /// Delivered and written.
    Done,
    /// Its transaction aborted: the partitions were rewound.
    Aborted,
    /// Delivered and written; a fault point asks for a clean stop (tests).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    Stop,
    /// A fault point (tests).
    Crash,
}

impl Timers {
    fn new(cfg: &Checked) -> Timers {
        Timers {
            batch_size: cfg.worker.batch_size,
            batch_wait: Duration::from_millis(cfg.worker.batch_wait_ms),
            emit_every: Duration::from_millis(cfg.worker.emit_interval_ms),
            last_emit: Instant::now(),
            started: Instant::now(),
        }
    }
}

/// Marks the state directory as in use by a running worker (removed by a
/// clean stop); returns whether the last run left it marked (did not stop
/// cleanly).
fn mark_running(state_dir: &std::path::Path) -> Result<bool, WorkerError> {
    let running = state_dir.join(RUNNING_MARKER);
    let unclean = running.exists();
    std::fs::write(&running, b"").map_err(|source| WorkerError::Input { path: running.clone(), source })?;
    Ok(unclean)
}

/// The run's delivery: transactions (`kafka.transactions`), else the outbox
/// drained by the idempotent producer.
async fn open_delivery(
    cfg: &Checked,
    producer: rdkafka::producer::FutureProducer,
    metrics: &Arc<Metrics>,
    health: &Arc<Health>,
    fault: Option<FaultPoint>,
) -> Result<Delivery, WorkerError> {
    let k = &cfg.kafka;
    if !k.transactions {
        return Ok(Delivery::Outbox(OutboxDelivery::new(producer, metrics.clone())));
    }
    let id = kafka::transactional_id(k, &cfg.worker.state_dir);
    tracing::info!(transactional_id = %id, "transactions on: bills, dead letters, changelog and offsets commit together");
    let txn = kafka::Transactional::start(k, &id).await?;
    Ok(Delivery::Transactional(TxnDelivery::new(txn, metrics.clone(), health.clone(), fault)))
}

/// How often the input's end offsets are read (lag, and idleness needs
/// them): every [`LAG_EVERY`], or every idle period if that is shorter.
fn lag_every(cfg: &Checked) -> Duration {
    LAG_EVERY.min(Duration::from_secs(cfg.worker.idle_after_secs.max(1)))
}
