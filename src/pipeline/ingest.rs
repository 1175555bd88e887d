//! The way in ([`Ingest`]): input messages admitted at their partition's
//! position, decoded events checked (event time, request-id repeats,
//! month totals) and aggregated into the pending batch, which is then
//! staged as one write: usage deltas, dirty marks, dead letters, dedupe
//! keys, positions and changelog records. With it, what the batch checks
//! against in memory: the dedupe mirror, the month totals, the dirty marks
//! known to be on disk, and the interned ids they are keyed by.

use super::batch::{content_hash, decode_all, encode_cells, DedupeCache, DedupeWindow, HourCell, Interner, Pending, Seen};
use super::context::{Context, Settings};
use super::message::{BatchStats, InputMessage};
use super::mirrors::{BlockMirror, BlockValues, KnownMarks, MonthTotalsMirror, BLOCK_MIRROR_MAX, MONTH_TOTALS_MAX};
use super::numbers::OutboxNumbers;
use super::positions::Positions;
use crate::billing::calendar::{Month, PlaceCache};
use crate::billing::event::{DecodeError, RejectReason};
use crate::billing::scan::Billable;
use crate::billing::usage::{MonthUsage, TotalOverflow, MAX_MONTH_TOTAL};
use crate::changelog::Change;
use crate::store::{Batch, PartitionState, Store, StoreError};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// The batch being built since the last write, and the mirrors of the
/// store it is checked against.
pub struct Ingest {
    /// The batch being built since the last flush.
    pending: Pending,
    /// Request ids seen in the dedupe window, mirrored from the store.
    dedupe: DedupeCache,
    /// Each event's billing month and local hour.
    place: PlaceCache,
    /// Each month's end, epoch ms (late events are counted in the metrics).
    month_ends: HashMap<Month, i64>,
    /// Account ids as small integers, for the keys below; reset past a
    /// million, with everything keyed by them.
    ids: Interner,
    /// Region ids as small integers.
    regions: Interner,
    /// The dirty marks known to be on disk ([`KnownMarks`]: a batch skips
    /// writing them again).
    known_dirty: KnownMarks,
    /// Each ingested account-month's usage totals ([`MonthTotalsMirror`]).
    totals: MonthTotalsMirror,
    /// Each ingested account-month's latest blocks ([`BlockMirror`]): the
    /// changelog's usage records, absolute, without reading the month.
    blocks: BlockMirror,
    /// The staged batch's cells, sorted: kept empty between batches, its
    /// capacity (and the pending cell map's) reused, so that a batch of
    /// many cells does not grow and fault in fresh tables each time.
    cells: Vec<((u32, i64, u32), HourCell)>,
}

/// What a staged input batch brings memory up to once it is written
/// ([`Ingest::written`]).
pub struct InputWritten {
    stats: BatchStats,
    /// The partitions read, with their new positions.
    touched: BTreeMap<i32, PartitionState>,
    /// The dirty marks the batch writes (by interned account id).
    marked: Vec<(u32, Month, i32)>,
    /// The blocks of usage the batch writes, absolute ([`BlockMirror::written`]).
    blocks: BlockValues,
}

impl InputWritten {
    /// The next input offset of each partition the batch read.
    pub fn positions(&self) -> BTreeMap<i32, i64> {
        self.touched.iter().map(|(p, s)| (*p, s.next_offset)).collect()
    }
}

/// The account-months of a staged batch: their usage cells' range among
/// the batch's sorted cells, and the partition of their first event.
struct MonthGroup<'a> {
    account: &'a str,
    id: u32,
    month: Month,
    partition: i32,
    cells: Range<usize>,
}

/// The way in: messages admitted, events checked and aggregated.
impl Ingest {
    /// Nothing pending; the month totals complete when the store has no
    /// usage ([`MonthTotalsMirror::new`]), bounded per shard.
    pub fn new(cx: &Context) -> Result<Ingest, StoreError> {
        let totals_max = MONTH_TOTALS_MAX / cx.shard.map_or(1, |s| s.count as usize);
        Ok(Ingest {
            pending: Pending::default(),
            dedupe: dedupe_cache(&cx.settings),
            place: PlaceCache::new(cx.rules.calendar),
            month_ends: HashMap::new(),
            ids: Interner::default(),
            regions: Interner::default(),
            known_dirty: KnownMarks::default(),
            totals: MonthTotalsMirror::new(cx.store.usage_is_empty()?, totals_max),
            blocks: BlockMirror::new(cx.store.usage_is_empty()?, BLOCK_MIRROR_MAX / cx.shard.map_or(1, |s| s.count as usize)),
            cells: Vec::new(),
        })
    }

    /// Adds messages to the pending batch: skips those processed before,
    /// decodes the others (on every core for large batches), then in order
    /// rejects, drops duplicates, aggregates.
    pub fn ingest(
        &mut self,
        cx: &Context,
        positions: &mut Positions,
        numbers: &mut OutboxNumbers,
        msgs: &[InputMessage],
        now: i64,
    ) -> Result<(), StoreError> {
        // 1. Skip what was processed before; advance offsets.
        let todo: Vec<&InputMessage> = msgs.iter().filter(|m| self.admit(positions, cx, m, now)).collect();
        cx.metrics.events_consumed.inc_by(todo.len() as u64);
        // 2. Decode and classify, on every core for large batches.
        let decoded = decode_all(&todo, cx.settings.require_keys);
        // 3. In order: reject, drop duplicates, aggregate.
        self.aggregate(cx, positions, numbers, todo.into_iter().zip(decoded), false, now)
    }

    /// Moves a partition's position in the pending batch to at least
    /// `next_offset`.
    pub fn advance_to(&mut self, positions: &Positions, partition: i32, next_offset: i64) {
        let state = self.position(positions, partition);
        state.next_offset = state.next_offset.max(next_offset);
    }

    /// A partition's state in the pending batch: first touched, what is stored.
    fn position(&mut self, positions: &Positions, partition: i32) -> &mut PartitionState {
        self.pending.touched.entry(partition).or_insert_with(|| positions.stored(partition))
    }

    /// Whether a message is new to the pending batch (its offset not
    /// processed before); advances its partition's offset if so.
    fn admit(&mut self, positions: &mut Positions, cx: &Context, m: &InputMessage, now: i64) -> bool {
        let state = self.position(positions, m.partition);
        if m.offset < state.next_offset {
            self.pending.stats.already_processed += 1;
            cx.metrics.input_reread.with_label_values(&[&m.partition.to_string()]).inc();
            return false;
        }
        state.next_offset = m.offset + 1;
        positions.heard_from(m.partition, now);
        true
    }

    /// In input order: skips messages processed before (when `admit`; else
    /// the caller did), rejects, drops duplicates, aggregates. A failure
    /// forgets everything pending ([`Ingest::discard`]).
    pub fn aggregate<'m, M: Borrow<InputMessage<'m>>>(
        &mut self,
        cx: &Context,
        positions: &mut Positions,
        numbers: &mut OutboxNumbers,
        items: impl Iterator<Item = (M, Result<Billable<'m>, DecodeError>)>,
        admit: bool,
        now: i64,
    ) -> Result<(), StoreError> {
        let latest_trusted = now.saturating_add(cx.settings.max_future_ms);
        let mut consumed = 0u64;
        for (m, d) in items {
            let m = m.borrow();
            if admit {
                if !self.admit(positions, cx, m, now) {
                    continue;
                }
                consumed += 1;
            }
            match d {
                Ok(b) if b.time_ms > latest_trusted => {
                    self.reject(cx, numbers, m, &future_time(b.time_ms, now, cx.settings.max_future_ms));
                }
                Ok(b) => {
                    if let Err(e) = self.count(cx, numbers, m, &b) {
                        self.discard(&cx.settings);
                        return Err(e);
                    }
                }
                Err(err) => self.reject(cx, numbers, m, &err),
            }
        }
        cx.metrics.events_consumed.inc_by(consumed);
        Ok(())
    }

    /// Counts a trusted event, unless its request id is a repeat (dropped)
    /// or conflicts with the copy counted, or it would take its month's
    /// total past [`MAX_MONTH_TOTAL`] (both dead-lettered).
    fn count(&mut self, cx: &Context, numbers: &mut OutboxNumbers, m: &InputMessage, b: &Billable<'_>) -> Result<(), StoreError> {
        debug_assert!(cx.shard.is_none_or(|s| s.holds(&b.account_id)), "an event of another shard's account");
        let (month, hour) = self.place.place(b.time_ms);
        let mut recorded = None;
        if cx.settings.dedupe {
            let id = xxhash_rust::xxh3::xxh3_128(b.request_id.as_bytes());
            let content = content_hash(b);
            let wm = self.pending.touched.get(&m.partition).expect("touched in pass 1").watermark_ms;
            match self.dedupe.insert(cx.store.as_ref(), m.partition, m.offset, wm, hour, id, content)? {
                Seen::New => recorded = Some(id),
                Seen::Repeat => {
                    self.pending.stats.duplicates += 1;
                    return Ok(());
                }
                Seen::Conflict { .. } => {
                    self.reject(cx, numbers, m, &conflicting_duplicate(b, month));
                    return Ok(());
                }
            }
        }
        let account = self.ids.intern(&b.account_id);
        let store = &cx.store;
        let totals = self
            .totals
            .totals(account, month, || Ok::<_, StoreError>(store.usage(&b.account_id, month)?.map(|u| u.totals()).unwrap_or_default()))?;
        match totals.add(&b.metered) {
            Ok(t) => *totals = t,
            Err(overflow) => {
                if let Some(id) = recorded {
                    self.dedupe.unrecord(m.partition, hour, id);
                }
                self.reject(cx, numbers, m, &usage_overflow(&b.account_id, month, &overflow));
                return Ok(());
            }
        }
        self.add_to_hour(cx, m, b, account, (month, hour));
        Ok(())
    }

    /// Adds a counted event to its (account, hour, region) cell and its
    /// partition's watermark.
    fn add_to_hour(&mut self, cx: &Context, m: &InputMessage, b: &Billable<'_>, account: u32, (month, hour): (Month, i64)) {
        let end_ms = match self.month_ends.get(&month) {
            Some(e) => *e,
            None => *self.month_ends.entry(month).or_insert(cx.rules.calendar.month_end(month) * 1000),
        };
        let state = self.pending.touched.get_mut(&m.partition).expect("touched in pass 1");
        if end_ms + cx.settings.grace_ms <= state.watermark_ms {
            cx.metrics.late_events.inc();
        }
        state.watermark_ms = state.watermark_ms.max(b.time_ms);
        let region = self.regions.intern(&b.region);
        let cell = self.pending.hours.entry((account, hour, region)).or_insert(HourCell::new(month, m.partition));
        cell.add(&b.metered);
        self.pending.stats.billed += 1;
    }

    /// Sends a message of the pending batch to the dead-letter topic.
    fn reject(&mut self, cx: &Context, numbers: &mut OutboxNumbers, m: &InputMessage, err: &DecodeError) {
        let letter = numbers.dead_letter(cx, m, err);
        self.pending.dead_letters.push(letter);
        self.pending.stats.rejected += 1;
    }
}

/// The pending batch staged as one write, memory brought in line once it
/// is written, and the mirrors forgotten when the store may differ.
impl Ingest {
    /// Forgets everything pending and every in-memory mirror of the store,
    /// after a failed step: the next batch starts from what is on disk.
    pub fn discard(&mut self, settings: &Settings) {
        self.pending = Pending::default();
        self.dedupe = dedupe_cache(settings);
        self.known_dirty.forget();
        self.totals.forget();
        self.blocks.forget();
    }

    /// Stages everything pending into `batch`, and empties it: usage deltas,
    /// dirty marks (but those known on disk), dead letters, dedupe keys,
    /// positions, and with a changelog topic the changelog records of them
    /// all. On an error the caller discards ([`Ingest::discard`]).
    pub fn stage(
        &mut self,
        cx: &Context,
        positions: &Positions,
        numbers: &mut OutboxNumbers,
        batch: &mut Batch<'_>,
    ) -> Result<InputWritten, StoreError> {
        let mut pending = std::mem::take(&mut self.pending);
        // Usage: one merge operand per account-month, its hours in order,
        // written in key order (RocksDB's memtable inserts sorted keys fastest).
        let mut cells = std::mem::take(&mut self.cells);
        cells.clear();
        cells.extend(pending.hours.drain());
        cells.sort_unstable_by_key(|(k, _)| *k);
        let groups = month_groups(&cells, &self.ids);
        let deltas: Vec<Vec<u8>> = groups.iter().map(|g| encode_cells(&cells[g.cells.clone()], &self.regions)).collect();
        for (g, delta) in groups.iter().zip(&deltas) {
            batch.merge_usage_encoded(g.account, g.month, delta);
        }
        // Dirty marks, but for months marked so already (with the same
        // partition) by a written batch and not cleared since.
        let mut marked = Vec::new();
        for g in groups.iter().filter(|g| !self.known_dirty.is_on_disk(g.id, g.month, g.partition)) {
            batch.mark_dirty(g.account, g.month, g.partition);
            marked.push((g.id, g.month, g.partition));
        }
        for (key, record) in std::mem::take(&mut pending.dead_letters) {
            batch.put_outbox(&key, record);
        }
        let (mut changes, blocks) = match cx.settings.changelog_topic {
            Some(_) => {
                let (changes, blocks) = usage_changes(&mut self.blocks, &cx.store, &groups, &deltas)?;
                (Some(changes), blocks)
            }
            None => (None, Vec::new()),
        };
        self.dedupe.write_changes(batch, changes.as_mut());
        for (p, s) in &pending.touched {
            batch.put_partition(&cx.settings.input_topic, *p, *s);
            if cx.settings.dedupe {
                self.dedupe.prune(batch, *p, s.next_offset - 1, s.watermark_ms, changes.as_mut());
            }
            if let Some(changes) = changes.as_mut() {
                changes.push((*p, Change::Position(*s)));
            }
        }
        for (p, change) in changes.into_iter().flatten() {
            let next_offset = pending.touched.get(&p).map_or_else(|| positions.next_offset(p).unwrap_or(0), |s| s.next_offset);
            numbers.put_change(&cx.settings, batch, p, next_offset, change);
        }
        // Both emptied, their capacity kept for the next batch.
        cells.clear();
        self.cells = cells;
        self.pending.hours = pending.hours;
        Ok(InputWritten { stats: pending.stats, touched: pending.touched, marked, blocks })
    }

    /// Memory brought in line with a written input batch: its positions,
    /// the dedupe mirror's budget, the marks now on disk. Returns the
    /// batch's counts.
    pub fn written(&mut self, cx: &Context, positions: &mut Positions, w: InputWritten) -> BatchStats {
        cx.metrics.events_billed.inc_by(w.stats.billed);
        cx.metrics.duplicates.inc_by(w.stats.duplicates);
        positions.written(w.touched);
        // The batch is written: idle buckets' hashes can be read back.
        let held = self.dedupe.shrink_to_budget();
        if cx.shard.is_none() {
            cx.metrics.dedupe_memory.set(held as i64);
        }
        let (reads, bytes) = self.dedupe.take_reads();
        cx.metrics.dedupe_reads.inc_by(reads);
        cx.metrics.dedupe_read_bytes.inc_by(bytes);
        // The marks and the hours' usage are on disk now.
        self.known_dirty.written(w.marked);
        self.blocks.written(w.blocks);
        // Interned ids only need to live as long as a batch (and
        // the known marks, keyed by them): a long-running worker
        // keeps the table bounded.
        if self.ids.len() > 1_000_000 {
            self.ids = Interner::default();
            self.known_dirty.forget();
            self.totals.forget();
            self.blocks.forget();
        }
        self.totals.written();
        w.stats
    }

    /// The partitions' state on disk is about to be replaced (a restore):
    /// forgets their dedupe buckets and the known marks.
    pub fn reloading(&mut self, partitions: &[i32]) {
        for &p in partitions {
            self.dedupe.forget(p);
        }
        self.known_dirty.forget();
    }

    /// After a reload, which may have written usage: the month totals are
    /// read again ([`MonthTotalsMirror::reloaded`]).
    pub fn reloaded(&mut self, store: &Store) -> Result<(), StoreError> {
        self.totals.reloaded(|| store.usage_is_empty())?;
        self.blocks.reloaded(|| store.usage_is_empty())
    }

    /// An emission stages the clearing of a month's dirty mark (before it
    /// is written): out of the known marks now, so a batch after it marks
    /// the month again.
    pub fn clearing(&mut self, account: &str, month: Month) {
        if let Some(id) = self.ids.get(account) {
            self.known_dirty.clearing(id, month);
        }
    }

    /// Forgets the known marks: something else changed marks on disk
    /// (account records applied).
    pub fn forget_marks(&mut self) {
        self.known_dirty.forget();
    }

    /// Forgets the month totals and hours: others wrote usage (the shards
    /// of a split).
    pub fn forget_totals(&mut self) {
        self.totals.forget();
        self.blocks.forget();
    }

    /// Messages ingested since the last flush (offsets already processed included).
    pub fn pending_messages(&self) -> u64 {
        let s = &self.pending.stats;
        s.billed + s.rejected + s.duplicates + s.already_processed
    }
}

/// The account-months of `cells` (sorted), in the order their usage keys
/// are written (by account id's length, then id, then month).
fn month_groups<'i>(cells: &[((u32, i64, u32), HourCell)], ids: &'i Interner) -> Vec<MonthGroup<'i>> {
    let mut groups = Vec::new();
    let mut i = 0;
    while i < cells.len() {
        let ((id, _, _), first) = cells[i];
        let mut j = i;
        while j < cells.len() && cells[j].0 .0 == id && cells[j].1.month == first.month {
            j += 1;
        }
        groups.push(MonthGroup { account: ids.name(id), id, month: first.month, partition: first.partition, cells: i..j });
        i = j;
    }
    groups.sort_unstable_by(|a, b| (a.account.len(), a.account, a.month).cmp(&(b.account.len(), b.account, b.month)));
    groups
}

/// The changelog records of a batch's usage: each block of an
/// account-month it touched, absolute (on disk plus the batch's delta,
/// [`BlockMirror`]), for the partition of its events; and those values,
/// for the mirror once the batch is written.
fn usage_changes(
    mirror: &mut BlockMirror,
    store: &Store,
    groups: &[MonthGroup<'_>],
    deltas: &[Vec<u8>],
) -> Result<(Vec<(i32, Change)>, BlockValues), StoreError> {
    let mut changes = Vec::with_capacity(groups.len());
    let mut blocks = Vec::with_capacity(groups.len());
    for (g, delta) in groups.iter().zip(deltas) {
        let delta = MonthUsage::decode(delta)?;
        let absolute = mirror.absolute(g.id, g.month, &delta, || store.usage(g.account, g.month))?;
        for (block, usage) in &absolute {
            let usage = crate::changelog::encode_block(*block, usage);
            changes.push((g.partition, Change::UsageBlock { account: g.account.to_string(), month: g.month, block: *block, usage }));
        }
        blocks.push(((g.id, g.month), absolute));
    }
    Ok((changes, blocks))
}

/// An empty dedupe mirror for the settings' window and input topic.
fn dedupe_cache(s: &Settings) -> DedupeCache {
    DedupeCache::new(
        DedupeWindow { event_time_secs: s.dedupe_window_secs, messages: s.dedupe_window_messages },
        &s.input_topic,
        s.dedupe_memory_bytes,
    )
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
