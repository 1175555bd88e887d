//! The processing pipeline between the input and the state store, with no
//! Kafka in it: decode, dedupe, aggregate, and one atomic write per batch;
//! bill emission into the outbox; outbox acknowledgement. The Kafka driver
//! (`worker.rs`) feeds it messages and produces what it leaves in the outbox.

mod accounts;
pub mod batch;
pub mod dead_letter;
pub mod emit;
mod message;
mod mirrors;
mod outbox;
pub mod policy;

pub use message::{headers, BatchStats, InputMessage};

use crate::billing::account::decode_account;
use crate::billing::calendar::{Month, PlaceCache};
use crate::billing::config::Rules;
use crate::billing::event::{DecodeError, RejectReason};
use crate::billing::scan::Billable;
use crate::billing::usage::merge_encoded;
use crate::billing::usage::{TotalOverflow, MAX_MONTH_TOTAL};
use crate::changelog::Change;
use crate::metrics::Metrics;
use crate::store::{outbox_dead_letter_key, OutboxRecord, PartitionState, Store, StoreError};
use accounts::AccountTable;
use batch::{content_hash, decode_all, encode_cells, DedupeCache, DedupeWindow, HourCell, Interner, Pending, Seen};
use mirrors::{KnownMarks, MonthTotalsMirror, MONTH_TOTALS_MAX};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

/// Outbox records handed to a sink at a time by [`Pipeline::drain_outbox`].
pub const OUTBOX_PAGE: usize = 4096;

/// What one [`Pipeline::drain_outbox`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Records handed to the sink.
    pub offered: u64,
    /// Records the sink did not deliver; they stay in the outbox.
    pub failed: u64,
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
    /// Whether to drop repeated request_ids.
    pub dedupe: bool,
    /// Dedupe window behind the partition watermark, seconds.
    pub dedupe_window_secs: i64,
    /// Dedupe window in input messages per partition.
    pub dedupe_window_messages: i64,
    /// Bytes of request-id hashes the dedupe mirror keeps in memory past a
    /// write, about ([`DedupeCache::shrink_to_budget`]).
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

/// The pipeline over one state store.
pub struct Pipeline {
    store: Arc<Store>,
    rules: Rules,
    settings: Settings,
    metrics: Arc<Metrics>,
    accounts: AccountTable,
    /// Cache of the stored partition states of the input topic.
    partitions: HashMap<i32, PartitionState>,
    /// Wall-clock ms of the last input message (or of the assignment) per
    /// assigned partition: a partition is idle only while it is assigned and
    /// quiet, never merely because a rebalance or restart paused reading.
    last_input_ms: HashMap<i32, i64>,
    /// When each key (a hash of account and month) whose last record is
    /// provisional was emitted, wall-clock ms: the next provisional one
    /// waits `provisional_interval_ms`. In memory only: after a restart a
    /// key's next provisional bill goes out at the first emission.
    provisional_sent: HashMap<u64, i64>,
    /// Last known end offset per partition: a partition with a backlog is
    /// never idle, however long it waits for its turn.
    high_watermarks: HashMap<i32, i64>,
    /// The input partitions this pipeline bills: `None` (file replay, a
    /// pipeline without a consumer group) bills every one; a worker sets it
    /// from its assignment ([`Pipeline::set_assignment`]).
    owned: Option<std::collections::BTreeSet<i32>>,
    next_dead_letter: u64,
    /// The accounts this pipeline is fed, when it is one of several
    /// ([`Pipeline::split`]); its dead-letter numbers advance by the shard
    /// count.
    shard: Option<Shard>,
    /// Next sequence number of changelog records in the outbox.
    next_changelog: u64,
    /// The batch being built since the last flush.
    pending: Pending,
    /// Request ids seen in the dedupe window, mirrored from the store.
    dedupe: DedupeCache,
    place: PlaceCache,
    month_ends: HashMap<Month, i64>,
    ids: Interner,
    regions: Interner,
    /// The dirty marks known to be on disk ([`KnownMarks`]: a batch skips
    /// writing them again).
    known_dirty: KnownMarks,
    /// Each ingested account-month's usage totals ([`MonthTotalsMirror`]).
    totals: MonthTotalsMirror,
}

/// The rejection of an event stamped too far ahead of the wall clock.
fn future_time(time_ms: i64, now: i64, max_future_ms: i64) -> DecodeError {
    let time = chrono::DateTime::from_timestamp_millis(time_ms).map_or_else(|| format!("{time_ms} ms"), |t| t.to_rfc3339());
    DecodeError::new(
        RejectReason::FutureTime,
        format!(
            "event time {time} is {} s ahead of the wall clock, more than worker.max_future_secs = {}; \
             check the gateway's clock, or raise worker.max_future_secs and replay this message",
            (time_ms - now) / 1000,
            max_future_ms / 1000
        ),
    )
}

/// The rejection of a repeated request id whose billed content differs
/// from the copy counted (spec section 8: the first copy stays counted).
fn conflicting_duplicate(b: &Billable<'_>, month: Month) -> DecodeError {
    let m = &b.metered;
    DecodeError::new(
        RejectReason::ConflictingDuplicate,
        format!(
            "request_id {:?} was counted before in this partition and hour with other billed content (time, account, region, \
             client network, frontend flag, byte counts or backend differ); this copy (account {:?}, month {month}, time {} ms, region {:?}, \
             public/private/inbound bytes {}/{}/{}, frontend_error {}) is not counted, the first stays; \
             give distinct calls distinct request ids",
            b.request_id, b.account_id, b.time_ms, b.region, m.public_out_bytes, m.private_out_bytes, m.inbound_bytes, m.frontend_error
        ),
    )
}

/// The rejection of an event that would take a month's usage total past
/// [`MAX_MONTH_TOTAL`] (spec section 8: it counts nowhere).
fn usage_overflow(account: &str, month: Month, o: &TotalOverflow) -> DecodeError {
    DecodeError::new(
        RejectReason::InvalidValue,
        format!(
            "usage overflow: {} {} added to account {account:?}'s {month} total of {} would exceed {MAX_MONTH_TOTAL} (2^53 - 1), \
             the most a bill carries exactly; the event is not counted. Check the gateway's byte counts",
            o.adds, o.quantity, o.total
        ),
    )
}

/// An empty dedupe mirror for the settings' window and input topic.
fn dedupe_cache(s: &Settings) -> DedupeCache {
    DedupeCache::new(
        DedupeWindow { event_time_secs: s.dedupe_window_secs, messages: s.dedupe_window_messages },
        &s.input_topic,
        s.dedupe_memory_bytes,
    )
}

/// Wall-clock now in epoch ms.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A partition's state in the pending batch: first touched, what is stored.
fn pending_position<'p>(pending: &'p mut Pending, stored: &HashMap<i32, PartitionState>, partition: i32) -> &'p mut PartitionState {
    pending.touched.entry(partition).or_insert_with(|| stored.get(&partition).copied().unwrap_or_default())
}

/// One of several pipelines over one store that split the accounts between
/// them by a hash of the account id ([`shard_of`]; [`Pipeline::split`]): a
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

impl Pipeline {
    /// A pipeline over an opened store; loads account records and offsets.
    pub fn new(store: Arc<Store>, rules: Rules, settings: Settings, metrics: Arc<Metrics>) -> Result<Pipeline, StoreError> {
        let mut accounts = AccountTable::default();
        for (_, raw) in store.accounts()? {
            // Stored under its own account_id (`apply_accounts`).
            if let Ok(a) = decode_account(&raw) {
                accounts.insert(a);
            }
        }
        Pipeline::with_accounts(store, rules, settings, metrics, accounts, None)
    }

    /// Splits this pipeline into `count` pipelines over the same store and
    /// input, shard `i` of them ([`Shard`]) holding the account records of
    /// its accounts (moved out of this one) and numbering its dead letters
    /// `i` modulo `count`, apart from the others. The caller feeds each only
    /// its accounts' events, as partition `i`; then [`Pipeline::join`].
    /// Nothing may be pending here.
    pub fn split(&mut self, count: u32) -> Result<Vec<Pipeline>, StoreError> {
        let count = count.max(1);
        let mut parts: Vec<AccountTable> = (0..count).map(|_| AccountTable::default()).collect();
        // Taken, not drained: the table's memory goes with it.
        for a in self.accounts.take_all() {
            parts[shard_of(&a.account_id, count) as usize].insert(a);
        }
        parts
            .into_iter()
            .enumerate()
            .map(|(i, accounts)| {
                let shard = Shard { index: i as u32, count };
                // The shards share the dedupe mirror's memory budget.
                let settings =
                    Settings { dedupe_memory_bytes: self.settings.dedupe_memory_bytes / count as usize, ..self.settings.clone() };
                Pipeline::with_accounts(self.store.clone(), self.rules.clone(), settings, self.metrics.clone(), accounts, Some(shard))
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
            written.extend(shard.partitions.keys().copied());
            self.accounts.absorb(shard.accounts);
        }
        // The shards numbered dead letters apart; this one goes on after them.
        self.next_dead_letter = self.store.next_dead_letter_seq()?;
        self.shard = None;
        // The shards wrote usage this pipeline did not see.
        self.totals.forget();
        self.reload_partitions(&written)
    }

    fn with_accounts(
        store: Arc<Store>,
        rules: Rules,
        settings: Settings,
        metrics: Arc<Metrics>,
        accounts: AccountTable,
        shard: Option<Shard>,
    ) -> Result<Pipeline, StoreError> {
        let partitions: HashMap<i32, PartitionState> = store.partitions(&settings.input_topic)?.into_iter().collect();
        let mut next_dead_letter = store.next_dead_letter_seq()?;
        if let Some(s) = shard {
            let (index, count) = (u64::from(s.index), u64::from(s.count));
            next_dead_letter += (index + count - next_dead_letter % count) % count;
        }
        let next_changelog = store.next_outbox_seq(b'c')?;
        let rules_calendar = rules.calendar;
        let dedupe = dedupe_cache(&settings);
        let totals = MonthTotalsMirror::new(store.usage_is_empty()?, MONTH_TOTALS_MAX / shard.map_or(1, |s| s.count as usize));
        Ok(Pipeline {
            store,
            rules,
            settings,
            metrics,
            accounts,
            partitions,
            last_input_ms: HashMap::new(),
            provisional_sent: HashMap::new(),
            high_watermarks: HashMap::new(),
            owned: None,
            next_dead_letter,
            shard,
            next_changelog,
            pending: Pending::default(),
            dedupe,
            place: PlaceCache::new(rules_calendar),
            month_ends: HashMap::new(),
            ids: Interner::default(),
            regions: Interner::default(),
            known_dirty: KnownMarks::default(),
            totals,
        })
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Accounts with a record in the account table.
    pub fn accounts_known(&self) -> usize {
        self.accounts.len()
    }

    /// The metrics it counts in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The settings.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Next input offset to process for a partition, if it has state.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|s| s.next_offset)
    }

    /// Records the partitions currently assigned: from now on only their
    /// accounts' bills are emitted ([`Pipeline::owns`]); newly assigned ones
    /// start their idle clock now.
    pub fn set_assignment(&mut self, assigned: &[i32], now: i64) {
        self.owned = Some(assigned.iter().copied().collect());
        self.last_input_ms.retain(|p, _| assigned.contains(p));
        for p in assigned {
            self.last_input_ms.entry(*p).or_insert(now);
        }
    }

    /// Reads the partitions' positions from the store again and forgets their
    /// dedupe buckets in memory: their state on disk was replaced (a restore
    /// from the changelog when they were assigned).
    pub fn reload_partitions(&mut self, partitions: &[i32]) -> Result<(), StoreError> {
        for &p in partitions {
            match self.store.partition(&self.settings.input_topic, p)? {
                Some(s) => self.partitions.insert(p, s),
                None => self.partitions.remove(&p),
            };
            self.dedupe.forget(p);
        }
        self.known_dirty.forget();
        // A restore may have written usage.
        let store = &self.store;
        self.totals.reloaded(|| store.usage_is_empty())?;
        Ok(())
    }

    /// Whether bills of accounts whose events come from `partition` are this
    /// pipeline's to emit: every partition until an assignment is set, then
    /// the assigned ones. -1 (an account-month whose partition no mark or
    /// bill records) stays with whoever holds it.
    pub fn owns(&self, partition: i32) -> bool {
        partition < 0 || self.owned.as_ref().is_none_or(|o| o.contains(&partition))
    }

    /// Records a partition's end offset as last seen on the broker.
    pub fn set_high_watermark(&mut self, partition: i32, high: i64) {
        self.high_watermarks.insert(partition, high);
    }

    /// A dead letter for a message, with its outbox key.
    fn dead_letter(&mut self, m: &InputMessage, err: &DecodeError) -> (Vec<u8>, OutboxRecord) {
        let key = outbox_dead_letter_key(self.next_dead_letter);
        self.next_dead_letter += self.shard.map_or(1, |s| u64::from(s.count));
        self.metrics.rejected.with_label_values(&[err.reason.code()]).inc();
        (key, dead_letter::dead_letter(&self.settings.dead_letter_topic, self.settings.dead_letter_max_bytes, m, err))
    }

    /// Sends a message of the pending batch to the dead-letter topic.
    fn reject(&mut self, m: &InputMessage, err: &DecodeError) {
        let letter = self.dead_letter(m, err);
        self.pending.dead_letters.push(letter);
        self.pending.stats.rejected += 1;
    }

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
        // 1. Skip what was processed before; advance offsets.
        let todo: Vec<&InputMessage> = msgs.iter().filter(|m| self.admit(m, now)).collect();
        self.metrics.events_consumed.inc_by(todo.len() as u64);
        // 2. Decode and classify, on every core for large batches.
        let decoded = decode_all(&todo, self.settings.require_keys);
        // 3. In order: reject, drop duplicates, aggregate.
        self.aggregate_or_discard(todo.into_iter().zip(decoded), false, now)
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
        self.aggregate_or_discard(items.into_iter(), true, now)
    }

    /// Moves a partition's position in the pending batch to at least
    /// `next_offset`: a sharded file replay advances every shard past each
    /// chunk, also one that had no line in it, so that a resumed replay
    /// starts after the chunk.
    pub fn advance_to(&mut self, partition: i32, next_offset: i64) {
        let state = pending_position(&mut self.pending, &self.partitions, partition);
        state.next_offset = state.next_offset.max(next_offset);
    }

    /// Whether a message is new to the pending batch (its offset not
    /// processed before); advances its partition's offset if so.
    fn admit(&mut self, m: &InputMessage, now: i64) -> bool {
        let state = pending_position(&mut self.pending, &self.partitions, m.partition);
        if m.offset < state.next_offset {
            self.pending.stats.already_processed += 1;
            self.metrics.input_reread.with_label_values(&[&m.partition.to_string()]).inc();
            return false;
        }
        state.next_offset = m.offset + 1;
        if let Some(t) = self.last_input_ms.get_mut(&m.partition) {
            *t = now;
        }
        true
    }

    fn aggregate_or_discard<'m, M: std::borrow::Borrow<InputMessage<'m>>>(
        &mut self,
        items: impl Iterator<Item = (M, Result<Billable<'m>, DecodeError>)>,
        admit: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let result = self.aggregate(items, admit, now);
        if result.is_err() {
            self.discard_pending();
        }
        result
    }

    /// In input order: skips messages processed before (when `admit`; else
    /// the caller did), rejects, drops duplicates, aggregates.
    fn aggregate<'m, M: std::borrow::Borrow<InputMessage<'m>>>(
        &mut self,
        items: impl Iterator<Item = (M, Result<Billable<'m>, DecodeError>)>,
        admit: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let latest_trusted = now.saturating_add(self.settings.max_future_ms);
        let mut consumed = 0u64;
        for (m, d) in items {
            let m = m.borrow();
            if admit {
                if !self.admit(m, now) {
                    continue;
                }
                consumed += 1;
            }
            let b = match d {
                Ok(b) if b.time_ms > latest_trusted => {
                    let err = future_time(b.time_ms, now, self.settings.max_future_ms);
                    self.reject(m, &err);
                    continue;
                }
                Ok(b) => b,
                Err(err) => {
                    self.reject(m, &err);
                    continue;
                }
            };
            debug_assert!(self.shard.is_none_or(|s| s.holds(&b.account_id)), "an event of another shard's account");
            let (month, hour) = self.place.place(b.time_ms);
            let mut recorded = None;
            if self.settings.dedupe {
                let id = xxhash_rust::xxh3::xxh3_128(b.request_id.as_bytes());
                let content = content_hash(&b);
                let wm = self.pending.touched.get(&m.partition).expect("touched in pass 1").watermark_ms;
                match self.dedupe.insert(self.store.as_ref(), m.partition, m.offset, wm, hour, id, content)? {
                    Seen::New => recorded = Some(id),
                    Seen::Repeat => {
                        self.pending.stats.duplicates += 1;
                        continue;
                    }
                    Seen::Conflict { .. } => {
                        self.reject(m, &conflicting_duplicate(&b, month));
                        continue;
                    }
                }
            }
            let account = self.ids.intern(&b.account_id);
            let store = &self.store;
            let totals = self.totals.totals(account, month, || {
                Ok::<_, StoreError>(store.usage(&b.account_id, month)?.map(|u| u.totals()).unwrap_or_default())
            })?;
            match totals.add(&b.metered) {
                Ok(t) => *totals = t,
                Err(overflow) => {
                    if let Some(id) = recorded {
                        self.dedupe.unrecord(m.partition, hour, id);
                    }
                    self.reject(m, &usage_overflow(&b.account_id, month, &overflow));
                    continue;
                }
            }
            let end_ms = match self.month_ends.get(&month) {
                Some(e) => *e,
                None => *self.month_ends.entry(month).or_insert(self.rules.calendar.month_end(month) * 1000),
            };
            let state = self.pending.touched.get_mut(&m.partition).expect("touched in pass 1");
            if end_ms + self.settings.grace_ms <= state.watermark_ms {
                self.metrics.late_events.inc();
            }
            state.watermark_ms = state.watermark_ms.max(b.time_ms);
            let region = self.regions.intern(&b.region);
            let cell = self.pending.hours.entry((account, hour, region)).or_insert(HourCell::new(month, m.partition));
            cell.add(&b.metered);
            self.pending.stats.billed += 1;
        }
        self.metrics.events_consumed.inc_by(consumed);
        Ok(())
    }

    /// Forgets everything pending and every in-memory mirror of the store,
    /// after a failed step: the next batch starts from what is on disk.
    fn discard_pending(&mut self) {
        self.pending = Pending::default();
        self.dedupe = dedupe_cache(&self.settings);
        self.known_dirty.forget();
        self.totals.forget();
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
        match self.stage_pending(records == Records::Captured) {
            Ok(step) => Ok(Staged { pipeline: self, step: Some(step) }),
            Err(e) => {
                self.discard_pending();
                Err(e)
            }
        }
    }

    /// Writes a staged step and brings memory in line with it.
    fn write_step(&mut self, step: Step) -> Result<BatchStats, StoreError> {
        let t = Instant::now();
        self.store.write_staged(step.wb)?;
        match step.after {
            After::Input { stats, touched, marked } => {
                self.metrics.batch_write_seconds.observe(t.elapsed().as_secs_f64());
                self.after_input(&stats, touched, marked);
                Ok(stats)
            }
            After::Emission { statuses, sent } => {
                for status in statuses {
                    self.metrics.bills_emitted.with_label_values(&[status.as_str()]).inc();
                }
                for (key, at) in sent {
                    match at {
                        Some(at) => self.provisional_sent.insert(key, at),
                        None => self.provisional_sent.remove(&key),
                    };
                }
                Ok(BatchStats::default())
            }
        }
    }

    /// Memory brought in line with a written input batch.
    fn after_input(&mut self, stats: &BatchStats, touched: BTreeMap<i32, PartitionState>, marked: Vec<(u32, Month, i32)>) {
        self.metrics.events_billed.inc_by(stats.billed);
        self.metrics.duplicates.inc_by(stats.duplicates);
        self.partitions.extend(touched);
        // The batch is written: idle buckets' hashes can be read back.
        let held = self.dedupe.shrink_to_budget();
        if self.shard.is_none() {
            self.metrics.dedupe_memory.set(held as i64);
        }
        let (reads, bytes) = self.dedupe.take_reads();
        self.metrics.dedupe_reads.inc_by(reads);
        self.metrics.dedupe_read_bytes.inc_by(bytes);
        // The marks are on disk now.
        self.known_dirty.written(marked);
        // Interned ids only need to live as long as a batch (and
        // the known marks, keyed by them): a long-running worker
        // keeps the table bounded.
        if self.ids.len() > 1_000_000 {
            self.ids = Interner::default();
            self.known_dirty.forget();
            self.totals.forget();
        }
        self.totals.written();
    }

    fn stage_pending(&mut self, capture: bool) -> Result<Step, StoreError> {
        let pending = std::mem::take(&mut self.pending);
        let store = self.store.clone();
        let mut batch = if capture { store.capturing_batch() } else { store.batch() };
        // Usage: one merge operand per account-month, its hours in order,
        // written in key order (RocksDB's memtable inserts sorted keys fastest).
        let mut cells: Vec<((u32, i64, u32), HourCell)> = pending.hours.into_iter().collect();
        cells.sort_unstable_by_key(|(k, _)| *k);
        let mut groups: Vec<(&str, Month, i32, std::ops::Range<usize>)> = Vec::new();
        let mut i = 0;
        while i < cells.len() {
            let ((account, _, _), first) = cells[i];
            let mut j = i;
            while j < cells.len() && cells[j].0 .0 == account && cells[j].1.month == first.month {
                j += 1;
            }
            groups.push((self.ids.name(account), first.month, first.partition, i..j));
            i = j;
        }
        groups.sort_unstable_by(|a, b| (a.0.len(), a.0, a.1).cmp(&(b.0.len(), b.0, b.1)));
        let deltas: Vec<Vec<u8>> = groups.iter().map(|(_, _, _, range)| encode_cells(&cells[range.clone()], &self.regions)).collect();
        for ((name, month, _, _), delta) in groups.iter().zip(&deltas) {
            batch.merge_usage_encoded(name, *month, delta);
        }
        // Dirty marks, but for months marked so already (with the same
        // partition) by a written batch and not cleared since.
        let mut marked = Vec::new();
        for (name, month, partition, range) in &groups {
            let account = cells[range.start].0 .0;
            if !self.known_dirty.is_on_disk(account, *month, *partition) {
                batch.mark_dirty(name, *month, *partition);
                marked.push((account, *month, *partition));
            }
        }
        for (key, record) in &pending.dead_letters {
            batch.put_outbox(key, record);
        }
        let mut changes: Option<Vec<(i32, Change)>> = self.settings.changelog_topic.as_ref().map(|_| Vec::new());
        if let Some(changes) = changes.as_mut() {
            // The changelog carries each month's usage absolute: what is on
            // disk plus this batch's delta.
            let keys: Vec<(&str, Month)> = groups.iter().map(|(a, m, _, _)| (*a, *m)).collect();
            for (((name, month, partition, _), delta), current) in groups.iter().zip(&deltas).zip(store.usage_raw_many(&keys)?) {
                let usage = match current {
                    Some(c) => merge_encoded([c.as_slice(), delta.as_slice()])?,
                    None => delta.clone(),
                };
                changes.push((*partition, Change::Usage { account: name.to_string(), month: *month, usage }));
            }
        }
        self.dedupe.write_changes(&mut batch, changes.as_mut());
        for (p, s) in &pending.touched {
            batch.put_partition(&self.settings.input_topic, *p, *s);
            if self.settings.dedupe {
                self.dedupe.prune(&mut batch, *p, s.next_offset - 1, s.watermark_ms);
            }
            if let Some(changes) = changes.as_mut() {
                changes.push((*p, Change::Position(*s)));
            }
        }
        if let Some(changes) = changes {
            let next: HashMap<i32, i64> = pending.touched.iter().map(|(p, s)| (*p, s.next_offset)).collect();
            for (p, change) in changes {
                let next_offset = next.get(&p).copied().unwrap_or_else(|| self.next_offset(p).unwrap_or(0));
                self.put_change(&mut batch, p, next_offset, &change);
            }
        }
        let positions = pending.touched.iter().map(|(p, s)| (*p, s.next_offset)).collect();
        let (wb, records) = batch.into_staged();
        Ok(Step { wb, records, positions, after: After::Input { stats: pending.stats, touched: pending.touched, marked } })
    }

    /// Queues a changelog record for input partition `partition` in `batch`
    /// (nothing without a changelog topic).
    pub(crate) fn put_change(&mut self, batch: &mut crate::store::Batch<'_>, partition: i32, next_offset: i64, change: &Change) {
        let Some(topic) = &self.settings.changelog_topic else { return };
        let (key, payload) = change.encode();
        let record = OutboxRecord {
            topic: topic.clone(),
            key: Some(key),
            payload,
            headers: vec![(crate::changelog::NEXT_OFFSET.into(), next_offset.to_string().into_bytes())],
            partition: Some(partition),
        };
        batch.put_outbox(&crate::store::outbox_changelog_key(self.next_changelog), &record);
        self.next_changelog += 1;
    }

    /// Messages ingested since the last flush (offsets already processed included).
    pub fn pending_messages(&self) -> u64 {
        let s = &self.pending.stats;
        s.billed + s.rejected + s.duplicates + s.already_processed
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

/// What [`Staged::apply`] brings memory up to after the write.
enum After {
    Input { stats: BatchStats, touched: BTreeMap<i32, PartitionState>, marked: Vec<(u32, Month, i32)> },
    Emission { statuses: Vec<crate::billing::BillStatus>, sent: Vec<(u64, Option<i64>)> },
}

#[cfg(test)]
mod tests {
    use super::*;
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
        assert_eq!(p.metrics.rejected.with_label_values(&["conflicting_duplicate"]).get(), 2);
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
