//! The processing pipeline between the input and the state store, with no
//! Kafka in it: decode, dedupe, aggregate, and one atomic write per batch;
//! bill emission into the outbox; outbox acknowledgement. The Kafka driver
//! (`worker/`) and the file replay feed it messages and deliver what it
//! stages or leaves in the outbox.
//!
//! [`Pipeline`] composes rooms, each a type that owns its state and the
//! only code that changes it, in its own file; none of them imports this
//! one (they import each other and `context::Context`, what every room
//! reads): the input partitions' positions and clocks (`positions.rs`), the
//! pending batch and the mirrors it is checked against (`ingest.rs`),
//! emission (`emit.rs`), the account table (`accounts.rs`), the numbers of
//! dead letters and changelog records (`numbers.rs`), and the outbox's way
//! out (`outbox.rs`). What crosses rooms is here: a step staged by one
//! room and applied to several ([`Staged`]), and the split into shards.

mod accounts;
mod alerts;
pub mod batch;
mod context;
pub mod dead_letter;
pub mod emit;
mod ingest;
mod message;
mod mirrors;
mod numbers;
mod outbox;
pub mod policy;
mod positions;
pub mod rules_change;

pub use context::{shard_of, Settings, Shard};
pub use message::{headers, BatchStats, InputMessage};
pub use outbox::{Drained, OUTBOX_PAGE};

use crate::billing::config::Rules;
use crate::billing::event::DecodeError;
use crate::billing::scan::Billable;
use crate::metrics::Metrics;
use crate::store::{Batch, OutboxRecord, Store, StoreError};
use accounts::AccountTable;
use context::Context;
use emit::{Emission, EmissionPlan, EmissionWritten, Emitter, Reads};
use ingest::{Ingest, InputWritten};
use numbers::OutboxNumbers;
use positions::Positions;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// The pipeline over one state store: its rooms, and what they all read.
pub struct Pipeline {
    /// The store, rules, settings, metrics and shard every room reads.
    cx: Context,
    /// The input partitions' positions and clocks, and the assignment.
    positions: Positions,
    /// The batch being built, and the mirrors of the store it is checked
    /// against (dedupe, month totals, known dirty marks).
    ingest: Ingest,
    /// When provisional bills were sent.
    emitter: Emitter,
    /// The account records, mirrored from the store.
    accounts: AccountTable,
    /// The next numbers of dead letters and changelog records.
    numbers: OutboxNumbers,
    /// What opening with these rules marked for recomputation
    /// ([`rules_change::mark_changed_months`]).
    rules_change: rules_change::RulesChange,
}

/// Wall-clock now in epoch ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Construction, the split into shards, and the rooms' state read or set
/// from outside.
impl Pipeline {
    /// A pipeline over an opened store; loads account records and offsets.
    pub fn new(store: Arc<Store>, rules: Rules, settings: Settings, metrics: Arc<Metrics>) -> Result<Pipeline, StoreError> {
        // Rules other than the stored bills' restate the months they change.
        let change = rules_change::mark_changed_months(&store, &rules)?;
        let accounts = AccountTable::load(&store)?;
        let mut p = Pipeline::with_accounts(Context { store, rules, settings, metrics, shard: None }, accounts)?;
        p.rules_change = change;
        Ok(p)
    }

    /// What opening this pipeline found of a change of billing rules: the
    /// account-months marked for recomputation (section 11.2).
    pub fn rules_change(&self) -> rules_change::RulesChange {
        self.rules_change
    }

    /// Splits this pipeline into `count` pipelines over the same store and
    /// input, shard `i` of them ([`Shard`]) holding the account records of
    /// its accounts (moved out of this one) and numbering its dead letters
    /// `i` modulo `count`, apart from the others. The caller feeds each only
    /// its accounts' events, as partition `i`; then [`Pipeline::join`].
    /// Nothing may be pending here.
    pub fn split(&mut self, count: u32) -> Result<Vec<Pipeline>, StoreError> {
        let count = count.max(1);
        let cx = &self.cx;
        self.accounts
            .split(count)
            .into_iter()
            .enumerate()
            .map(|(i, accounts)| {
                // The shards share the dedupe mirror's memory budget.
                let settings = Settings { dedupe_memory_bytes: cx.settings.dedupe_memory_bytes / count as usize, ..cx.settings.clone() };
                let shard = Some(Shard { index: i as u32, count });
                let cx = Context { store: cx.store.clone(), rules: cx.rules.clone(), settings, metrics: cx.metrics.clone(), shard };
                Pipeline::with_accounts(cx, accounts)
            })
            .collect()
    }

    /// Takes back the account records of pipelines made by
    /// [`Pipeline::split`] (whose pending batches must be flushed) and
    /// reads the positions they wrote.
    pub fn join(&mut self, shards: Vec<Pipeline>) -> Result<(), StoreError> {
        let mut written = Vec::new();
        self.accounts.reserve(shards.iter().map(|s| s.accounts.len()).sum());
        for shard in shards {
            written.extend(shard.positions.partitions());
            self.accounts.absorb(shard.accounts);
        }
        // The shards numbered dead letters apart; this one goes on after them.
        self.numbers.rejoined(&self.cx.store)?;
        self.cx.shard = None;
        // The shards wrote usage this pipeline did not see.
        self.ingest.forget_totals();
        self.reload_partitions(&written)
    }

    fn with_accounts(cx: Context, accounts: AccountTable) -> Result<Pipeline, StoreError> {
        Ok(Pipeline {
            positions: Positions::load(&cx.store, &cx.settings.input_topic)?,
            numbers: OutboxNumbers::load(&cx.store, cx.shard)?,
            ingest: Ingest::new(&cx)?,
            emitter: Emitter::default(),
            accounts,
            cx,
            rules_change: rules_change::RulesChange::default(),
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.cx.store
    }

    /// Accounts with a record in the account table.
    pub fn accounts_known(&self) -> usize {
        self.accounts.len()
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.cx.metrics
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.cx.settings
    }

    /// Next input offset to process for a partition, if it has state.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.positions.next_offset(partition)
    }

    /// Records the partitions currently assigned: from now on only their
    /// accounts' bills are emitted ([`Pipeline::owns`]); newly assigned ones
    /// start their idle clock now.
    pub fn set_assignment(&mut self, assigned: &[i32], now: i64) {
        self.positions.set_assignment(assigned, now);
    }

    /// Reads the partitions' positions from the store again and forgets their
    /// dedupe buckets in memory: their state on disk was replaced (a restore
    /// from the changelog when they were assigned).
    pub fn reload_partitions(&mut self, partitions: &[i32]) -> Result<(), StoreError> {
        self.ingest.reloading(partitions);
        self.positions.reload(&self.cx.store, &self.cx.settings.input_topic, partitions)?;
        // A restore may have written usage.
        self.ingest.reloaded(&self.cx.store)
    }

    /// Whether bills of accounts whose events come from `partition` are this
    /// pipeline's to emit: every partition until an assignment is set, then
    /// the assigned ones. -1 (an account-month whose partition no mark or
    /// bill records) stays with whoever holds it.
    pub fn owns(&self, partition: i32) -> bool {
        self.positions.owns(partition)
    }

    /// Records a partition's end offset as last seen on the broker.
    pub fn set_high_watermark(&mut self, partition: i32, high: i64) {
        self.positions.set_high_watermark(partition, high);
    }

    /// Applies account records (accounts topic): stores each changed record
    /// and marks that account's months for recomputation. Bad records, and
    /// tombstones (which do not delete billing history: the last record
    /// stays in force, rule book section 8), go to the dead-letter topic
    /// through the outbox. Returns how many dead letters it put there: the
    /// caller delivers them without waiting for the next input batch.
    pub fn apply_accounts(&mut self, msgs: &[InputMessage]) -> Result<u64, StoreError> {
        // A changed record marks the account's months with the partition
        // of its first marked month, which may not be the one a batch
        // knows (an account whose events came from two partitions).
        self.ingest.forget_marks();
        self.accounts.apply(&self.cx, &mut self.numbers, msgs)
    }

    /// Every record waiting to be produced.
    pub fn outbox(&self) -> Result<Vec<(Vec<u8>, OutboxRecord)>, StoreError> {
        outbox::outbox(&self.cx.store, &self.cx.metrics)
    }

    /// The one way out of the outbox: hands it to `deliver` a page of
    /// [`OUTBOX_PAGE`] records at a time, in key order, and acknowledges the
    /// records `deliver` returns as delivered ([`Pipeline::acknowledge`]).
    /// Memory stays bounded by a page, however large the outbox. Returns
    /// the records offered and those not delivered (they stay for a retry).
    pub async fn drain_outbox<E, F, Fut>(&mut self, deliver: F) -> Result<Drained, E>
    where
        E: From<StoreError>,
        F: FnMut(Vec<(Vec<u8>, OutboxRecord)>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(Vec<u8>, OutboxRecord)>, E>>,
    {
        outbox::drain(&self.cx.store, &self.cx.metrics, deliver).await
    }

    /// Deletes delivered outbox records, unless a newer record replaced one
    /// since it was read (then the newer one is still to be produced).
    pub fn acknowledge(&mut self, delivered: &[(Vec<u8>, OutboxRecord)]) -> Result<(), StoreError> {
        outbox::acknowledge(&self.cx.store, delivered)
    }
}

/// The steps: input batches and emission chunks, each staged by its room
/// and applied to all.
impl Pipeline {
    /// Processes a batch of input-topic messages in one atomic write: usage,
    /// dedupe keys, partition offsets, dirty marks and dead letters.
    pub fn process(&mut self, msgs: &[InputMessage]) -> Result<BatchStats, StoreError> {
        self.ingest(msgs)?;
        self.flush()
    }

    /// Adds messages to the pending batch (nothing is written until
    /// [`Pipeline::flush`]); offsets already processed are skipped.
    pub fn ingest(&mut self, msgs: &[InputMessage]) -> Result<(), StoreError> {
        self.ingest_at(msgs, now_ms())
    }

    /// [`Pipeline::ingest`] with the wall clock given (epoch ms): it dates
    /// the partitions' last input and bounds trusted event times.
    pub fn ingest_at(&mut self, msgs: &[InputMessage], now: i64) -> Result<(), StoreError> {
        self.ingest.ingest(&self.cx, &mut self.positions, &mut self.numbers, msgs, now)
    }

    /// [`Pipeline::ingest_at`] for messages the caller decoded already
    /// (with [`batch::decode_message`]; a sharded file replay decodes on
    /// every core before it knows each event's shard), taken by value or
    /// by reference.
    pub fn ingest_decoded<'m, M: std::borrow::Borrow<InputMessage<'m>>>(
        &mut self,
        items: impl IntoIterator<Item = (M, Result<Billable<'m>, DecodeError>)>,
        now: i64,
    ) -> Result<(), StoreError> {
        self.ingest.aggregate(&self.cx, &mut self.positions, &mut self.numbers, items.into_iter(), true, now)
    }

    /// Moves a partition's position in the pending batch to at least
    /// `next_offset`: a sharded file replay advances every shard past each
    /// chunk, also one that had no line in it, so that a resumed replay
    /// starts after the chunk.
    pub fn advance_to(&mut self, partition: i32, next_offset: i64) {
        self.ingest.advance_to(&self.positions, partition, next_offset);
    }

    /// Messages ingested since the last flush (offsets already processed included).
    pub fn pending_messages(&self) -> u64 {
        self.ingest.pending_messages()
    }

    /// Writes everything pending in one atomic, synced batch: usage deltas,
    /// dedupe keys, offsets and watermarks, dirty marks, dead letters (and
    /// changelog records) in the outbox: [`Pipeline::stage`] with
    /// [`Records::Outbox`], applied.
    pub fn flush(&mut self) -> Result<BatchStats, StoreError> {
        self.stage(Records::Outbox)?.apply()
    }

    /// Computes the write of everything pending without writing it: the one
    /// way a batch reaches the store. The returned [`Staged`] borrows the
    /// pipeline until it is applied ([`Staged::apply`]) or abandoned
    /// ([`Staged::abandon`], or dropped), so a second step cannot be staged
    /// while one is (the dirty marks a batch skips rely on it: a batch
    /// staged with a mark skipped, then an emission that clears the month
    /// written before it, would lose the mark). With [`Records::Captured`]
    /// the dead letters and changelog records are handed to the caller to
    /// deliver first (in a Kafka transaction). Nothing in memory leads the
    /// store in between: what staging changed is reset by an abandon.
    pub fn stage(&mut self, records: Records) -> Result<Staged<'_>, StoreError> {
        let mut batch = records.batch(&self.cx.store);
        match self.ingest.stage(&self.cx, &self.positions, &mut self.numbers, &mut batch) {
            Ok(written) => {
                let positions = written.positions();
                Ok(self.staged(batch.into_staged(), positions, After::Input(written)))
            }
            Err(e) => {
                self.ingest.discard(&self.cx.settings);
                Err(e)
            }
        }
    }

    /// Recomputes every dirty bill, and every provisional bill whose month
    /// has closed, and writes the changed records to the outbox with a higher
    /// revision: [`Pipeline::emission`] chunk by chunk, each committed to the
    /// outbox. Returns how many records were emitted.
    pub fn emit(&mut self, now: i64, force_idle: bool) -> Result<usize, StoreError> {
        let mut plan = self.emission(now, force_idle)?;
        let mut emitted = 0;
        while let Some(chunk) = self.next_emission(&mut plan)? {
            emitted += chunk.records.len();
            self.stage_emission(chunk, Records::Outbox)?.apply()?;
        }
        Ok(emitted)
    }

    /// What an emission will recompute: every dirty bill, every provisional
    /// one whose month has closed, and the later months of accounts with
    /// packs among them, of the partitions this pipeline owns
    /// ([`Pipeline::owns`]); a provisional bill sent less than
    /// `provisional_interval_ms` ago waits. Taken a chunk at a time with
    /// [`Pipeline::next_emission`].
    pub fn emission(&self, now: i64, force_idle: bool) -> Result<EmissionPlan, StoreError> {
        self.emitter.plan(&self.reads(), now, force_idle)
    }

    /// Computes the next chunk of up to 1,024 bills of `plan`: the records
    /// of the changed ones, and the bill states and cleared dirty marks to
    /// write with them. Writes nothing: the caller delivers the records
    /// where it wants and stages the chunk with
    /// [`Pipeline::stage_emission`]. `None` when the plan is done.
    pub fn next_emission(&mut self, plan: &mut EmissionPlan) -> Result<Option<Emission>, StoreError> {
        self.reads().next_chunk(plan)
    }

    /// Stages a chunk of [`Pipeline::next_emission`] as one atomic write:
    /// the cleared dirty marks, the new bill states, and the records (into
    /// the outbox with [`Records::Outbox`]; with [`Records::Captured`] the
    /// caller delivers them, bills and their changelog records, before
    /// [`Staged::apply`]: a crash in between recomputes and delivers the
    /// same records again, as a crash between producing and acknowledging
    /// an outbox record would).
    pub fn stage_emission(&mut self, chunk: Emission, records: Records) -> Result<Staged<'_>, StoreError> {
        let mut batch = records.batch(&self.cx.store);
        let written = emit::stage(chunk, &mut batch, &self.cx, &self.positions, &mut self.ingest, &mut self.numbers);
        Ok(self.staged(batch.into_staged(), BTreeMap::new(), After::Emission(written)))
    }

    /// Forgets when provisional bills were sent: the next emission sends
    /// every change (a clean stop's last emission).
    pub fn release_provisional_holds(&mut self) {
        self.emitter.release_provisional_holds();
    }

    /// What an emission reads of the rooms.
    fn reads(&self) -> Reads<'_> {
        Reads { cx: &self.cx, positions: &self.positions, accounts: &self.accounts }
    }

    /// A step staged, holding the pipeline until it is applied or abandoned.
    fn staged(
        &mut self,
        (wb, records): (rocksdb::WriteBatch, Vec<OutboxRecord>),
        positions: BTreeMap<i32, i64>,
        after: After,
    ) -> Staged<'_> {
        Staged { pipeline: self, step: Some(Step { wb, records, positions, after }) }
    }

    /// Writes a staged step and brings memory in line with it.
    fn write_step(&mut self, step: Step) -> Result<BatchStats, StoreError> {
        let t = Instant::now();
        self.cx.store.write_staged(step.wb)?;
        match step.after {
            After::Input(written) => {
                self.cx.metrics.batch_write_seconds.observe(t.elapsed().as_secs_f64());
                Ok(self.ingest.written(&self.cx, &mut self.positions, written))
            }
            After::Emission(written) => {
                self.emitter.written(&self.cx.metrics, written);
                Ok(BatchStats::default())
            }
        }
    }

    /// Forgets everything pending and every in-memory mirror of the store,
    /// after a failed or abandoned step: the next batch starts from what is
    /// on disk.
    fn discard_pending(&mut self) {
        self.ingest.discard(&self.cx.settings);
    }
}

/// How a staged step's records (dead letters, changelog records, bills)
/// travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Records {
    /// Into the outbox, in the step's own write: a drain delivers them.
    Outbox,
    /// Handed to the caller ([`Staged::take_records`]), who delivers them
    /// before [`Staged::apply`] (a Kafka transaction, a file).
    Captured,
}

impl Records {
    /// A batch whose records travel this way.
    fn batch(self, store: &Store) -> Batch<'_> {
        match self {
            Records::Outbox => store.batch(),
            Records::Captured => store.capturing_batch(),
        }
    }
}

/// A step computed and not yet written ([`Pipeline::stage`],
/// [`Pipeline::stage_emission`]): written by [`Staged::apply`] once its
/// records are delivered, or forgotten by [`Staged::abandon`] (as it is
/// when dropped unapplied, on an early return). It borrows the pipeline
/// mutably, so nothing else can be staged, ingested or emitted meanwhile:
///
/// ```compile_fail
/// # fn twice(p: &mut gatebill::pipeline::Pipeline) {
/// use gatebill::pipeline::Records;
/// let first = p.stage(Records::Captured).unwrap();
/// let second = p.stage(Records::Captured).unwrap(); // error: `*p` is already borrowed
/// first.apply().unwrap();
/// # }
/// ```
///
/// One after the other:
///
/// ```
/// # fn twice(p: &mut gatebill::pipeline::Pipeline) {
/// use gatebill::pipeline::Records;
/// let first = p.stage(Records::Captured).unwrap();
/// first.apply().unwrap();
/// let second = p.stage(Records::Captured).unwrap();
/// second.abandon();
/// # }
/// ```
#[must_use = "a staged step is written by apply, or forgotten by abandon"]
pub struct Staged<'p> {
    pipeline: &'p mut Pipeline,
    /// `None` once applied or abandoned.
    step: Option<Step>,
}

impl Staged<'_> {
    /// The captured records to deliver before [`Staged::apply`] (empty with
    /// [`Records::Outbox`], or when taken already).
    pub fn take_records(&mut self) -> Vec<OutboxRecord> {
        self.step.as_mut().map(|s| std::mem::take(&mut s.records)).unwrap_or_default()
    }

    /// The next input offset of each partition the batch read, once
    /// written (empty for an emission).
    pub fn positions(&self) -> &BTreeMap<i32, i64> {
        static NONE: BTreeMap<i32, i64> = BTreeMap::new();
        self.step.as_ref().map_or(&NONE, |s| &s.positions)
    }

    /// The pipeline as it was before this step (its stored positions).
    pub fn pipeline(&self) -> &Pipeline {
        self.pipeline
    }

    /// Writes the step (one atomic, synced write) and brings memory in line
    /// with it. A failed write forgets everything pending, as an abandon.
    pub fn apply(mut self) -> Result<BatchStats, StoreError> {
        let step = self.step.take().expect("a staged step is applied once");
        let result = self.pipeline.write_step(step);
        if result.is_err() {
            self.pipeline.discard_pending();
        }
        result
    }

    /// Forgets a step that was not delivered (and everything pending): the
    /// next batch starts from what is on disk, and the input must be read
    /// again from [`Pipeline::next_offset`].
    pub fn abandon(mut self) {
        self.step = None;
        self.pipeline.discard_pending();
    }

    /// Entries the step writes (tests).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.step.as_ref().map_or(0, |s| s.wb.len())
    }
}

impl Drop for Staged<'_> {
    fn drop(&mut self) {
        if self.step.take().is_some() {
            self.pipeline.discard_pending();
        }
    }
}

impl std::fmt::Debug for Staged<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let records = self.step.as_ref().map_or(0, |s| s.records.len());
        f.debug_struct("Staged").field("records", &records).field("positions", self.positions()).finish_non_exhaustive()
    }
}

/// What a [`Staged`] holds: the write, its captured records, and what
/// memory is brought up to after it.
struct Step {
    wb: rocksdb::WriteBatch,
    records: Vec<OutboxRecord>,
    positions: BTreeMap<i32, i64>,
    after: After,
}

/// What [`Staged::apply`] brings memory up to after the write, each room's
/// own.
enum After {
    Input(InputWritten),
    Emission(EmissionWritten),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::calendar::Month;
    use crate::billing::BillRecord;
    use crate::billing::BillStatus;
    use std::collections::BTreeMap;

    const TOPIC: &str = "events";

    fn settings() -> Settings {
        Settings {
            input_topic: TOPIC.into(),
            accounts_topic: "accounts".into(),
            output_topic: "bills".into(),
            dead_letter_topic: "dead".into(),
            alerts_topic: "alerts".into(),
            dedupe: true,
            dedupe_window_secs: 72 * 3600,
            dedupe_window_messages: 1_000_000,
            dedupe_memory_bytes: 64 << 20,
            max_future_ms: 3_600_000,
            grace_ms: 2 * 3600 * 1000,
            idle_after_ms: 300_000,
            require_keys: true,
            changelog_topic: None,
            provisional_interval_ms: 0,
            dead_letter_max_bytes: dead_letter::DEFAULT_MESSAGE_MAX_BYTES,
        }
    }

    fn open(dir: &std::path::Path) -> Pipeline {
        let store = Arc::new(Store::open(dir).unwrap());
        Pipeline::new(store, Rules::default(), settings(), Metrics::new()).unwrap()
    }

    fn event(id: &str, time: &str) -> Vec<u8> {
        format!(
            r#"{{"request_id":"{id}","account_id":"A","region":"ap-guangzhou","time":"{time}","client_network":"public","request_bytes":1,"response_bytes":100,"backend":{{"type":"mock"}}}}"#
        )
        .into_bytes()
    }

    fn msg(offset: i64, payload: &[u8]) -> InputMessage<'_> {
        InputMessage { topic: TOPIC, partition: 0, offset, key: Some(b"A"), payload: Some(payload), headers: vec![] }
    }

    /// Bill records in the outbox, by key.
    fn bills(p: &Pipeline) -> BTreeMap<String, BillRecord> {
        p.outbox()
            .unwrap()
            .into_iter()
            .filter(|(_, r)| r.topic == "bills")
            .map(|(_, r)| {
                let b: BillRecord = serde_json::from_slice(&r.payload).unwrap();
                (b.key(), b)
            })
            .collect()
    }

    #[test]
    fn a_month_marked_dirty_is_not_marked_again_until_an_emission_clears_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let march = Month::new(2021, 3).unwrap();
        let payloads: Vec<Vec<u8>> = (0..5).map(|i| event(&format!("r{i}"), "2021-03-05T10:00:00+08:00")).collect();
        // Writes one batch of the message at `offset`; the write's entries.
        let batch = |p: &mut Pipeline, offset: usize| {
            p.ingest(&[msg(offset as i64, &payloads[offset])]).unwrap();
            let staged = p.stage(Records::Captured).unwrap();
            let entries = staged.entries();
            staged.apply().unwrap();
            entries
        };
        let marked = vec![("A".to_string(), march, 0)];
        // The first batch marks March; the second (same month, same
        // partition, the mark still on disk) writes the same entries but it.
        let first = batch(&mut p, 0);
        assert_eq!(batch(&mut p, 1), first - 1);
        assert_eq!(p.store().dirty().unwrap(), marked);
        // An emission clears the mark: the next batch writes it again.
        assert_eq!(p.emit(now_ms(), false).unwrap(), 1);
        assert_eq!(p.store().dirty().unwrap(), vec![]);
        assert_eq!(batch(&mut p, 2), first);
        assert_eq!(p.store().dirty().unwrap(), marked);
        // A batch abandoned (not written) forgets what it knew: the next
        // one writes the mark, though it is on disk.
        p.ingest(&[msg(3, &payloads[3])]).unwrap();
        p.stage(Records::Captured).unwrap().abandon();
        assert_eq!(batch(&mut p, 3), first);
        assert_eq!(batch(&mut p, 4), first - 1);
        assert_eq!(p.store().usage("A", march).unwrap().unwrap().calls(), 5);
        assert_eq!(p.emit(now_ms(), false).unwrap(), 1);
        assert_eq!(bills(&p)["A/2021-03"].content.usage.calls, 5);
    }

    /// An event of account A at `time` with `bytes` response bytes.
    fn sized(id: &str, time: &str, bytes: u64) -> Vec<u8> {
        String::from_utf8(event(id, time)).unwrap().replace(r#""response_bytes":100"#, &format!(r#""response_bytes":{bytes}"#)).into_bytes()
    }

    /// Dead letters in the outbox: (reason, detail, payload).
    fn dead_letters(p: &Pipeline) -> Vec<(String, String, Vec<u8>)> {
        let header = |r: &OutboxRecord, name: &str| {
            r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).unwrap_or_default()
        };
        p.outbox()
            .unwrap()
            .into_iter()
            .filter(|(_, r)| r.topic == "dead")
            .map(|(_, r)| (header(&r, headers::REASON), header(&r, headers::DETAIL), r.payload.clone()))
            .collect()
    }

    #[test]
    fn a_repeat_with_other_billed_content_is_dead_lettered_and_counted_in_the_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let time = "2021-03-05T10:00:00+08:00";
        let (a, b, a_again) = (sized("same", time, 100), sized("same", time, 5 << 30), sized("same", time, 100));
        p.process(&[msg(0, &a), msg(1, &b)]).unwrap();
        // Across batches too, and a true repeat is still only a duplicate.
        let s = p.process(&[msg(2, &a_again), msg(3, &b)]).unwrap();
        assert_eq!((s.billed, s.duplicates, s.rejected), (0, 1, 1));
        let dead = dead_letters(&p);
        assert_eq!(dead.len(), 2);
        for (reason, detail, payload) in &dead {
            assert_eq!(reason, "conflicting_duplicate");
            assert!(detail.starts_with(r#"request_id "same" was counted before"#), "{detail}");
            assert_eq!(payload, &b);
        }
        assert_eq!(p.metrics().rejected.with_label_values(&["conflicting_duplicate"]).get(), 2);
        assert_eq!(p.emit(now_ms(), false).unwrap(), 1);
        let bill = &bills(&p)["A/2021-03"];
        assert_eq!((bill.content.usage.calls, bill.content.usage.public_out_bytes), (1, 100));
    }

    #[test]
    fn an_event_that_would_take_a_month_total_past_2_pow_53_is_dead_lettered_and_counts_nowhere() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let max = crate::billing::usage::MAX_MONTH_TOTAL;
        let big: Vec<Vec<u8>> = (0..3).map(|i| sized(&format!("big-{i}"), "2021-03-05T10:00:00+08:00", max)).collect();
        let small = sized("small", "2021-03-05T11:00:00+08:00", 10_000);
        let s = p.process(&[msg(0, &big[0]), msg(1, &big[1])]).unwrap();
        assert_eq!((s.billed, s.rejected), (1, 1));
        // The next batch reads the month's total from the store, as after a restart.
        let mut p = {
            drop(p);
            open(dir.path())
        };
        let s = p.process(&[msg(2, &big[2]), msg(3, &small)]).unwrap();
        assert_eq!((s.billed, s.rejected), (0, 2));
        let dead = dead_letters(&p);
        assert_eq!(dead.len(), 3);
        assert!(dead.iter().all(|(r, d, _)| r == "invalid_value" && d.starts_with("usage overflow: ")), "{dead:?}");
        assert_eq!(dead[2].2, small);
        // The month holds the first event alone.
        let usage = p.store().usage("A", Month::new(2021, 3).unwrap()).unwrap().unwrap();
        assert_eq!((usage.calls(), usage.totals().public_out_bytes), (1, max));
        assert_eq!(p.emit(now_ms(), false).unwrap(), 1);
        let bill = &bills(&p)["A/2021-03"];
        assert_eq!(
            (bill.content.usage.calls, bill.content.usage.public_out_bytes, bill.content.chargeable.public_out_bytes),
            (1, max, max)
        );
        // Usage written behind a pipeline's back (a restore from the
        // changelog into a store that had none) is read after the reload
        // that follows it.
        let fresh = tempfile::tempdir().unwrap();
        let mut q = open(fresh.path());
        let april = Month::new(2021, 4).unwrap();
        let mut written = crate::billing::usage::MonthUsage::default();
        let april_hour = 1_617_588_000; // 2021-04-05T10:00:00+08:00
        written.add(april_hour, "ap-guangzhou", &crate::billing::Metered { public_out_bytes: max, ..Default::default() });
        let mut batch = q.store().batch();
        batch.merge_usage_encoded("A", april, &written.encode());
        q.store().write(batch).unwrap();
        q.reload_partitions(&[0]).unwrap();
        let late = sized("april", "2021-04-05T10:00:00+08:00", 1);
        assert_eq!(q.process(&[msg(0, &late)]).unwrap().rejected, 1);
    }

    #[test]
    fn duplicates_are_dropped_across_restarts_and_replayed_offsets_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let e1 = event("r1", "2021-03-05T10:00:00+08:00");
        let e2 = event("r2", "2021-03-05T10:30:00+08:00");
        {
            let mut p = open(dir.path());
            let s = p.process(&[msg(0, &e1), msg(1, &e1)]).unwrap();
            assert_eq!((s.billed, s.duplicates), (1, 1));
        }
        let mut p = open(dir.path());
        assert_eq!(p.next_offset(0), Some(2));
        // Offsets 0 and 1 again (a redelivery), then the same event at a new offset, then a new one.
        let s = p.process(&[msg(0, &e1), msg(1, &e1), msg(2, &e1), msg(3, &e2)]).unwrap();
        assert_eq!(s, BatchStats { billed: 1, rejected: 0, duplicates: 1, already_processed: 2 });
        let usage = p.store().usage("A", Month::new(2021, 3).unwrap()).unwrap().unwrap();
        assert_eq!(usage.calls(), 2);
    }

    #[test]
    fn idle_hours_leave_memory_past_the_dedupe_budget_and_their_repeats_are_still_dropped() {
        // Twelve event hours of 100 ids, one batch each; then every id of
        // the first hour again with 50 new ones. Budget 0: only the hours
        // of the last DEDUPE_RECENT_WRITES batches stay in memory, the
        // others are read back when used.
        let run = |budget: usize| {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(Store::open(dir.path()).unwrap());
            let metrics = Metrics::new();
            let mut p =
                Pipeline::new(store, Rules::default(), Settings { dedupe_memory_bytes: budget, ..settings() }, metrics.clone()).unwrap();
            let time = |h: usize, i: usize| format!("2021-03-05T{h:02}:{:02}:{:02}+08:00", i / 60, i % 60);
            let mut offset = 0;
            let mut held = Vec::new();
            for h in 0..12 {
                let payloads: Vec<Vec<u8>> = (0..100).map(|i| event(&format!("h{h}-{i}"), &time(h, i))).collect();
                let msgs: Vec<InputMessage> = payloads.iter().enumerate().map(|(i, e)| msg(offset + i as i64, e)).collect();
                offset += 100;
                assert_eq!(p.process(&msgs).unwrap().billed, 100);
                held.push(metrics.dedupe_memory.get());
            }
            let again: Vec<Vec<u8>> = (0..150).map(|i| event(&format!("h0-{i}"), &time(0, i))).collect();
            let msgs: Vec<InputMessage> = again.iter().enumerate().map(|(i, e)| msg(offset + i as i64, e)).collect();
            let reads_before = metrics.dedupe_reads.get();
            let s = p.process(&msgs).unwrap();
            let calls = p.store().usage("A", Month::new(2021, 3).unwrap()).unwrap().unwrap().calls();
            (held, s.billed, s.duplicates, calls, metrics.dedupe_reads.get() - reads_before, metrics.dedupe_read_bytes.get())
        };
        let (held, billed, duplicates, calls, reads, read_bytes) = run(0);
        let (held_all, billed_all, duplicates_all, calls_all, reads_all, read_bytes_all) = run(usize::MAX);
        assert_eq!((billed, duplicates, calls), (50, 100, 1250));
        assert_eq!((billed_all, duplicates_all, calls_all), (50, 100, 1250));
        // The first hour's set was read back from the store (100 hashes),
        // only where it had left memory.
        assert_eq!((reads, read_bytes), (1, 100 * 16));
        assert_eq!((reads_all, read_bytes_all), (0, 0));
        // Every hour's set is the same size: unbounded, memory grows by one
        // set per hour; bounded, it stops at the recent batches' ones.
        let one = held_all[0];
        assert!(one > 100 * 16, "a set of 100 hashes holds {one} bytes");
        assert_eq!(held_all, (1..=12).map(|n| n * one).collect::<Vec<_>>());
        let recent = batch::DEDUPE_RECENT_WRITES as i64;
        assert_eq!(held, (1..=12).map(|n| n.min(recent) * one).collect::<Vec<_>>());
    }

    #[test]
    fn bad_input_is_dead_lettered_in_the_same_batch_with_its_reason() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let good = event("r1", "2021-03-05T10:00:00+08:00");
        let wrong_key = InputMessage { key: Some(b"B"), ..msg(2, &good) };
        let s = p.process(&[msg(0, b"{not json"), msg(1, &good), wrong_key]).unwrap();
        assert_eq!((s.billed, s.rejected), (1, 2));
        let dead: Vec<OutboxRecord> = p.outbox().unwrap().into_iter().map(|(_, r)| r).filter(|r| r.topic == "dead").collect();
        let reasons: Vec<&[u8]> = dead.iter().map(|r| r.headers.iter().find(|(k, _)| k == headers::REASON).unwrap().1.as_slice()).collect();
        assert_eq!(reasons, vec![&b"malformed_json"[..], &b"key_mismatch"[..]]);
        assert_eq!(dead[0].payload, b"{not json");
        assert_eq!(p.next_offset(0), Some(3));
    }

    /// With a provisional interval, a key's changed provisional bill waits
    /// until the interval has passed since its last one (its dirty mark
    /// stays); the first revision and a final one go out at once.
    #[test]
    fn provisional_bills_of_a_key_go_out_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let mut p =
            Pipeline::new(store, Rules::default(), Settings { provisional_interval_ms: 60_000, ..settings() }, Metrics::new()).unwrap();
        let t0 = chrono::DateTime::parse_from_rfc3339("2021-03-20T00:00:00+08:00").unwrap().timestamp_millis();
        let events: Vec<Vec<u8>> = (0..4).map(|i| event(&format!("r{i}"), "2021-03-05T10:00:00+08:00")).collect();
        let revision = |p: &Pipeline| {
            let b = &bills(p)["A/2021-03"];
            (b.revision, b.status, b.content.usage.calls)
        };
        p.process(&[msg(0, &events[0])]).unwrap();
        assert_eq!(p.emit(t0, false).unwrap(), 1, "the first revision goes out at once");
        p.process(&[msg(1, &events[1])]).unwrap();
        assert_eq!(p.emit(t0 + 5_000, false).unwrap(), 0, "5 s later: waits");
        p.process(&[msg(2, &events[2])]).unwrap();
        assert_eq!(p.emit(t0 + 59_999, false).unwrap(), 0, "still within the interval");
        assert_eq!(p.emit(t0 + 60_000, false).unwrap(), 1, "the interval has passed: the waiting change goes out");
        assert_eq!(revision(&p), (2, BillStatus::Provisional, 3));
        // The month closes (an April event moves the watermark past March's
        // end plus grace): the final bill does not wait.
        p.process(&[msg(3, &events[3]), msg(4, &event("r9", "2021-04-01T03:00:00+08:00"))]).unwrap();
        assert_eq!(p.emit(t0 + 61_000, false).unwrap(), 2, "March final, April's first revision");
        assert_eq!(revision(&p), (3, BillStatus::Final, 4));
        // A clean stop releases what is held back.
        p.process(&[msg(5, &event("r10", "2021-04-01T04:00:00+08:00"))]).unwrap();
        assert_eq!(p.emit(t0 + 62_000, false).unwrap(), 0, "April's change waits");
        p.release_provisional_holds();
        assert_eq!(p.emit(t0 + 62_000, false).unwrap(), 1, "released at the stop");
    }

    #[test]
    fn late_usage_after_final_restates_and_revisions_increase() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let e1 = event("r1", "2021-03-05T10:00:00+08:00");
        p.process(&[msg(0, &e1)]).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2021-03-20T00:00:00+08:00").unwrap().timestamp_millis();
        assert_eq!(p.emit(now, false).unwrap(), 1);
        let b = &bills(&p)["A/2021-03"];
        assert_eq!((b.revision, b.status), (1, BillStatus::Provisional));
        // An event of April moves the watermark past March's end plus grace.
        let e2 = event("r2", "2021-04-01T03:00:00+08:00");
        p.process(&[msg(1, &e2)]).unwrap();
        p.emit(now, false).unwrap();
        let b = &bills(&p)["A/2021-03"];
        assert_eq!((b.revision, b.status, b.content.usage.calls), (2, BillStatus::Final, 1));
        // A late March event restates the final bill.
        let e3 = event("r3", "2021-03-31T23:00:00+08:00");
        p.process(&[msg(2, &e3)]).unwrap();
        assert_eq!(p.emit(now, false).unwrap(), 1);
        let b = &bills(&p)["A/2021-03"];
        assert_eq!((b.revision, b.status, b.content.usage.calls), (3, BillStatus::Restated, 2));
        // Nothing changed: nothing emitted.
        assert_eq!(p.emit(now, false).unwrap(), 0);
    }

    #[test]
    fn an_account_record_recomputes_the_accounts_bills() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let e1 = event("r1", "2021-03-05T10:00:00+08:00");
        p.process(&[msg(0, &e1)]).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2021-03-20T00:00:00+08:00").unwrap().timestamp_millis();
        p.emit(now, false).unwrap();
        let before = bills(&p)["A/2021-03"].clone();
        assert!(!before.content.account_known);
        assert_eq!(before.content.chargeable.calls, 1);
        let record = br#"{"account_id":"A","activated_at":"2021-01-01T00:00:00+08:00"}"#;
        let m = InputMessage { topic: "accounts", partition: 0, offset: 0, key: Some(b"A"), payload: Some(record), headers: vec![] };
        p.apply_accounts(std::slice::from_ref(&m)).unwrap();
        p.emit(now, false).unwrap();
        let after = &bills(&p)["A/2021-03"];
        assert!(after.content.account_known);
        assert_eq!(after.content.chargeable.calls, 0);
        assert_eq!(after.revision, 2);
        // The same record again changes nothing.
        p.apply_accounts(&[InputMessage { offset: 1, ..m }]).unwrap();
        assert_eq!(p.emit(now, false).unwrap(), 0);
    }

    /// A worker that lost a partition leaves its accounts' bills to the new
    /// owner, also when their account records change; the marks wait on
    /// disk, with the partition, for when the partition comes back.
    #[test]
    fn account_records_of_partitions_not_owned_emit_no_bill() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        let ea = event("ra", "2021-03-05T10:00:00+08:00");
        let eb = String::from_utf8(event("rb", "2021-03-05T10:00:00+08:00")).unwrap().replace(r#""account_id":"A""#, r#""account_id":"B""#);
        let mb = InputMessage { topic: TOPIC, partition: 1, offset: 0, key: Some(b"B"), payload: Some(eb.as_bytes()), headers: vec![] };
        p.process(&[msg(0, &ea), mb]).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2021-03-20T00:00:00+08:00").unwrap().timestamp_millis();
        assert_eq!(p.emit(now, false).unwrap(), 2);

        p.set_assignment(&[0], now);
        let (ra, rb) = (
            br#"{"account_id":"A","activated_at":"2021-01-01T00:00:00+08:00"}"#,
            br#"{"account_id":"B","activated_at":"2021-01-01T00:00:00+08:00"}"#,
        );
        let record = |offset: i64, key: &'static [u8], payload: &'static [u8]| InputMessage {
            topic: "accounts",
            partition: 0,
            offset,
            key: Some(key),
            payload: Some(payload),
            headers: vec![],
        };
        p.apply_accounts(&[record(0, b"A", ra), record(1, b"B", rb)]).unwrap();
        assert_eq!(p.emit(now, false).unwrap(), 1);
        let out = bills(&p);
        assert_eq!((out["A/2021-03"].revision, out["A/2021-03"].content.account_known), (2, true));
        assert_eq!((out["B/2021-03"].revision, out["B/2021-03"].content.account_known), (1, false));
        assert_eq!(p.store().dirty().unwrap(), vec![("B".to_string(), Month { year: 2021, month: 3 }, 1)]);

        p.set_assignment(&[0, 1], now);
        assert_eq!(p.emit(now, false).unwrap(), 1);
        let b = &bills(&p)["B/2021-03"];
        assert_eq!((b.revision, b.content.account_known), (2, true));
    }

    #[test]
    fn acknowledged_records_leave_the_outbox_unless_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path());
        p.process(&[msg(0, &event("r1", "2021-03-05T10:00:00+08:00"))]).unwrap();
        let now = chrono::DateTime::parse_from_rfc3339("2021-03-20T00:00:00+08:00").unwrap().timestamp_millis();
        p.emit(now, false).unwrap();
        let sent = p.outbox().unwrap();
        assert_eq!(sent.len(), 1);
        // A newer revision replaces the entry before the old one is acknowledged.
        p.process(&[msg(1, &event("r2", "2021-03-06T10:00:00+08:00"))]).unwrap();
        p.emit(now, false).unwrap();
        p.acknowledge(&sent).unwrap();
        let left = p.outbox().unwrap();
        assert_eq!(left.len(), 1, "the newer revision is still to be produced");
        assert_ne!(left[0].1, sent[0].1);
        p.acknowledge(&left).unwrap();
        assert!(p.outbox().unwrap().is_empty());
    }
}
