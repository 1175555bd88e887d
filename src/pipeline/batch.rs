//! What the pipeline holds in memory between two writes: the batch being
//! built (usage cells, dead letters, offsets) and the mirror of the dedupe
//! buckets it checks request ids against. Nothing here is state of record:
//! a flush writes it in one batch, and a failed step discards it all.

use super::message::{BatchStats, InputMessage};
use crate::billing::calendar::Month;
use crate::billing::event::{truncate, DecodeError, RejectReason};
use crate::billing::scan::{decode_billable, Billable};
use crate::billing::usage::{encode_numbered, NumberedRow};
use crate::billing::Metered;
use crate::changelog::{dedupe_key, Change};
use crate::store::{Batch, BucketIndex, OutboxRecord, PartitionState, Store, StoreError};
use rayon::prelude::*;

/// Where the dedupe mirror reads what it does not hold yet: the state
/// store in the pipeline, a map in tests.
pub trait BucketSource {
    /// Every stored bucket of a partition: (event hour, last offset, topic
    /// hash, changelog records).
    fn dedupe_index(&self, partition: i32) -> Result<Vec<BucketIndex>, StoreError>;
    /// The request-id hashes of one bucket, 16 bytes each.
    fn dedupe_bucket(&self, partition: i32, hour: i64) -> Result<Vec<u8>, StoreError>;
}

impl BucketSource for Store {
    fn dedupe_index(&self, partition: i32) -> Result<Vec<BucketIndex>, StoreError> {
        Store::dedupe_index(self, partition)
    }

    fn dedupe_bucket(&self, partition: i32, hour: i64) -> Result<Vec<u8>, StoreError> {
        Store::dedupe_bucket(self, partition, hour)
    }
}
use rustc_hash::FxBuildHasher;

type FxHashMap<K, V> = std::collections::HashMap<K, V, FxBuildHasher>;
use std::collections::BTreeMap;

/// Small dense ids for strings (account and region ids) so that a batch's
/// map keys are integers, not allocations.
#[derive(Default)]
pub struct Interner {
    ids: FxHashMap<Box<str>, u32>,
    names: Vec<Box<str>>,
}

impl Interner {
    /// The id of a string, assigning the next one on first sight.
    pub fn intern(&mut self, s: &str) -> u32 {
        if let Some(id) = self.ids.get(s) {
            return *id;
        }
        let id = self.names.len() as u32;
        self.names.push(s.into());
        self.ids.insert(s.into(), id);
        id
    }

    /// The id of a string interned before.
    pub fn get(&self, s: &str) -> Option<u32> {
        self.ids.get(s).copied()
    }

    /// The string of an id.
    pub fn name(&self, id: u32) -> &str {
        &self.names[id as usize]
    }

    /// How many strings are interned.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// Whether nothing is interned.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// The sums of one (account, local hour, region) in the pending batch.
#[derive(Clone, Copy, Debug)]
pub struct HourCell {
    /// Billing month of the hour.
    pub month: Month,
    /// Partition of the first event (where the bill's watermark is read).
    pub partition: i32,
    /// Calls.
    pub calls: u64,
    /// Frontend-error calls.
    pub frontend_error_calls: u64,
    /// Private outbound bytes.
    pub private_out_bytes: u64,
    /// Inbound bytes.
    pub inbound_bytes: u64,
    /// Public outbound bytes in the cell's region.
    pub public_out_bytes: u64,
}

impl HourCell {
    /// An empty cell.
    pub fn new(month: Month, partition: i32) -> Self {
        HourCell { month, partition, calls: 0, frontend_error_calls: 0, private_out_bytes: 0, inbound_bytes: 0, public_out_bytes: 0 }
    }

    /// Adds one event (as [`crate::billing::MonthUsage::add`]: byte counts
    /// saturate).
    pub fn add(&mut self, m: &Metered) {
        self.calls += 1;
        self.frontend_error_calls += u64::from(m.frontend_error);
        self.private_out_bytes = self.private_out_bytes.saturating_add(m.private_out_bytes);
        self.inbound_bytes = self.inbound_bytes.saturating_add(m.inbound_bytes);
        self.public_out_bytes = self.public_out_bytes.saturating_add(m.public_out_bytes);
    }
}

/// The batch being built.
#[derive(Default)]
pub struct Pending {
    /// (account id, hour start, region id) -> sums.
    pub hours: FxHashMap<(u32, i64, u32), HourCell>,
    /// Partitions read, with their new offsets and watermarks.
    pub touched: BTreeMap<i32, PartitionState>,
    /// Dead letters with their outbox keys.
    pub dead_letters: Vec<(Vec<u8>, OutboxRecord)>,
    /// Counts.
    pub stats: BatchStats,
}

/// Encodes one account-month's cells (sorted by hour, then region) as a
/// usage delta: the bytes of the `MonthUsage` they sum to. Its regions are
/// numbered among themselves (a few), whatever the interner holds.
pub fn encode_cells(cells: &[((u32, i64, u32), HourCell)], regions: &Interner) -> Vec<u8> {
    let mut ids: Vec<u32> = cells.iter().filter(|(_, c)| c.public_out_bytes > 0).map(|((_, _, r), _)| *r).collect();
    ids.sort_unstable();
    ids.dedup();
    let names: Vec<&str> = ids.iter().map(|&r| regions.name(r)).collect();
    let mut rows: Vec<NumberedRow> = Vec::new();
    let mut entries: Vec<(u32, u64)> = Vec::new();
    let mut h = 0;
    while h < cells.len() {
        let hour = cells[h].0 .1;
        let mut counters = [0u64; 4];
        let start = entries.len();
        while h < cells.len() && cells[h].0 .1 == hour {
            let c = &cells[h].1;
            for (sum, v) in counters.iter_mut().zip([c.calls, c.frontend_error_calls, c.private_out_bytes, c.inbound_bytes]) {
                *sum = sum.saturating_add(v);
            }
            if c.public_out_bytes > 0 {
                let n = ids.binary_search(&cells[h].0 .2).expect("collected above");
                entries.push((n as u32, c.public_out_bytes));
            }
            h += 1;
        }
        rows.push(NumberedRow { hour_start: hour, counters, public: start..entries.len() });
    }
    encode_numbered(&names, &rows, &entries)
}

/// Decodes, classifies and checks the key of one input message.
pub fn decode_message<'m>(m: &InputMessage<'m>, require_keys: bool) -> Result<Billable<'m>, DecodeError> {
    let Some(payload) = m.payload else { return Err(tombstone()) };
    let b = decode_billable(payload)?;
    if !require_keys || m.key == Some(b.account_id.as_bytes()) {
        return Ok(b);
    }
    let key = m.key.map(|k| String::from_utf8_lossy(k).into_owned());
    Err(DecodeError::new(
        RejectReason::KeyMismatch,
        format!(
            "message key {} is not the account_id `{}`; producers must key events by account_id",
            key.map_or("(none)".to_string(), |k| format!("`{}`", truncate(&k, 64))),
            truncate(&b.account_id, 64)
        ),
    ))
}

/// The rejection of a tombstone (a message with a null value) on the
/// input topic: `malformed_json`, as an empty value is, with a detail that
/// says what it is (README, decisions).
pub fn tombstone() -> DecodeError {
    DecodeError::new(
        RejectReason::MalformedJson,
        "tombstone: the message has no value (null); an access event is a JSON object, and events cannot be deleted",
    )
}

/// Below this many items a batch is processed on one thread.
const PARALLEL_MIN: usize = 1024;

/// Maps a pure function over items, in order, split over the machine's cores
/// for large inputs (the result is the same as on one thread).
pub fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    par_slices(items, PARALLEL_MIN, |slice| slice.iter().map(&f).collect())
}

/// Maps a function over contiguous slices of items, in order, one slice per
/// core when there are at least `min` items (else one slice); `f` returns
/// one result per item of its slice.
pub fn par_slices<T: Sync, R: Send>(items: &[T], min: usize, f: impl Fn(&[T]) -> Vec<R> + Sync) -> Vec<R> {
    // Rayon's pool: the threads (and their allocator heaps) live for the
    // whole process instead of being started per batch.
    let threads = rayon::current_num_threads().min(8);
    if threads < 2 || items.len() < min.max(2) {
        return f(items);
    }
    let chunk = items.len().div_ceil(threads);
    let parts: Vec<Vec<R>> = items.par_chunks(chunk).map(&f).collect();
    let mut out = Vec::with_capacity(items.len());
    for part in parts {
        out.extend(part);
    }
    out
}

/// Decodes messages in order, on every core for large batches (decoding is pure).
pub fn decode_all<'m>(msgs: &[&'m InputMessage<'m>], require_keys: bool) -> Vec<Result<Billable<'m>, DecodeError>> {
    par_map(msgs, |m| decode_message(m, require_keys))
}

/// One partition-hour of request-id hashes, as stored plus what the pending
/// batch added.
struct Bucket {
    /// Request-id key ([`DedupeEntry`]) -> billed-content hash of the copy
    /// counted; `None` until read from the store.
    seen: Option<FxHashMap<u64, u64>>,
    /// Entries added since the last write, as stored.
    new: Vec<u128>,
    /// Input offset of the last event placed in this hour.
    last_offset: i64,
    /// Hash of the input topic of that event ([`topic_hash`]).
    topic: u64,
    /// The bucket expired and restarted empty since the last write: the
    /// stored hashes are to be replaced, not appended to.
    reset: bool,
    /// Changed since the last write.
    touched: bool,
    /// The cache's write count ([`DedupeCache::write_changes`]) when an
    /// event last went into this bucket.
    used: u64,
    /// Changelog records of the bucket (numbered 0..records).
    records: u32,
    /// Changelog records of the bucket this one replaced when it restarted
    /// empty, to be deleted (tombstones) with the next write.
    dropped: u32,
}

/// The memory a set of request-id entries holds, about: hashbrown keeps 8
/// slots per 7 usable, each 16 bytes and a control byte.
fn set_bytes(s: &FxHashMap<u64, u64>) -> usize {
    s.capacity().div_ceil(7) * 8 * 17
}

/// What [`DedupeCache::insert`] found for a request id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// First copy: recorded, to be counted.
    New,
    /// A repeat of the copy counted, with the same billed content.
    Repeat,
    /// A repeat whose billed content differs from the copy counted
    /// (`counted`, its [`content_hash`]): an input error.
    Conflict {
        /// The content hash of the copy counted.
        counted: u64,
    },
}

/// A dedupe entry as stored (16 bytes): the high 64 bits of the request id's
/// xxh3-128 hash (the key), then the [`content_hash`] of the copy counted.
/// Stores written before content hashes (the whole 128-bit id hash) read
/// as the same key with the id hash's low half as "content", which
/// [`DedupeEntry::legacy_content`] recognises as a repeat of any content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeEntry {
    /// The request id's key.
    pub key: u64,
    /// What the counted copy bills, hashed.
    pub content: u64,
}

impl DedupeEntry {
    /// The entry of a request id (its xxh3-128 hash) and content hash.
    pub fn new(id: u128, content: u64) -> Self {
        DedupeEntry { key: (id >> 64) as u64, content }
    }

    /// The 16 stored bytes, as a big-endian integer.
    pub fn stored(self) -> u128 {
        (u128::from(self.key) << 64) | u128::from(self.content)
    }

    /// (key, content) of a stored entry.
    pub fn split(stored: u128) -> (u64, u64) {
        ((stored >> 64) as u64, stored as u64)
    }

    /// The "content" of an entry stored before content hashes: the low half
    /// of the id's own hash.
    pub fn legacy_content(id: u128) -> u64 {
        id as u64
    }
}

/// The hash of what a copy of an event bills: account, region, time and
/// the metered quantities (which the client network, the frontend flag,
/// the byte counts and the backend decide). Two copies of one request id
/// with different hashes are a conflict (spec section 8).
pub fn content_hash(b: &Billable<'_>) -> u64 {
    use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};
    let m = &b.metered;
    let mut figures = [0u8; 33];
    figures[..8].copy_from_slice(&b.time_ms.to_le_bytes());
    figures[8..16].copy_from_slice(&m.public_out_bytes.to_le_bytes());
    figures[16..24].copy_from_slice(&m.private_out_bytes.to_le_bytes());
    figures[24..32].copy_from_slice(&m.inbound_bytes.to_le_bytes());
    figures[32] = u8::from(m.frontend_error);
    // One-shot hashes chained by seed (the streaming hasher's setup costs
    // more than these short inputs).
    xxh3_64_with_seed(&figures, xxh3_64_with_seed(b.region.as_bytes(), xxh3_64(b.account_id.as_bytes())))
}

/// The dedupe window (see [`DedupeCache`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DedupeWindow {
    /// Hours within this many seconds of the partition's watermark are kept.
    pub event_time_secs: i64,
    /// Hours that received an event within this many input messages are kept.
    pub messages: i64,
}

impl DedupeWindow {
    /// Whether a bucket of `hour` whose last event was at `last_offset` of
    /// the same input topic (`same_topic`) is still live when the message at
    /// `offset` is checked, the partition's watermark being `watermark_ms`.
    /// Both measures only grow along a partition of one topic, so an expired
    /// bucket never comes back. Offsets of different topics (a file replay
    /// and a Kafka topic into one state directory) do not compare: across
    /// topics only the event-time window applies.
    pub fn live(&self, hour: i64, last_offset: i64, same_topic: bool, offset: i64, watermark_ms: i64) -> bool {
        (same_topic && offset - last_offset <= self.messages) || hour >= watermark_ms.div_euclid(1000).saturating_sub(self.event_time_secs)
    }
}

/// The 64-bit hash of an input topic name kept in the dedupe index.
pub fn topic_hash(topic: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(topic.as_bytes())
}

/// The dedupe state of the partitions the pipeline has seen: every live
/// bucket's last offset (the index, read from the store on a partition's
/// first use), and the hashes of the buckets used (read on first use).
///
/// The rule: a request id is a repeat when its (partition, event hour)
/// bucket is live and holds it. Liveness is decided at each message, in
/// input order, from the message's offset and the partition's watermark
/// ([`DedupeWindow::live`]); an expired bucket restarts empty. Nothing
/// depends on batch boundaries, restarts, or when expired buckets are
/// physically deleted, so `run` and `replay` decide alike.
///
/// Memory: a bucket's hashes stay in memory while the bucket is used; once
/// the sets held pass the budget, [`DedupeCache::shrink_to_budget`] drops
/// the sets of the buckets used least recently (never one used in the last
/// [`DEDUPE_RECENT_WRITES`] batches), which are read from the store again
/// at their next event, as after a restart. Decisions do not change; only where the hashes are read
/// from. Without the budget a worker's memory grew with every live hour
/// (72 hours of request ids by default), though only the newest hours get
/// events in a time-ordered stream.
pub struct DedupeCache {
    window: DedupeWindow,
    /// [`topic_hash`] of the input topic the pipeline reads.
    topic: u64,
    partitions: FxHashMap<i32, FxHashMap<i64, Bucket>>,
    /// Bytes of hash sets kept in memory past a write, about ([`set_bytes`]).
    budget: usize,
    /// Writes so far ([`DedupeCache::write_changes`]).
    clock: u64,
    /// Bucket sets read from the store, and their bytes ([`DedupeCache::take_reads`]).
    reads: (u64, u64),
    /// The capacity a new bucket's set starts with: the largest set
    /// touched by the last write, at most [`SET_HINT_MAX`]. In a
    /// time-ordered stream a partition's next hour fills about as its last
    /// did, and a set grown from empty rehashes a dozen times on the way.
    set_hint: usize,
}

/// The most entries a new bucket's set reserves ([`DedupeCache::set_hint`]).
const SET_HINT_MAX: usize = 1 << 16;

/// A partition's buckets as stored (their sets unread), at its first use.
fn read_index(store: &impl BucketSource, partition: i32) -> Result<FxHashMap<i64, Bucket>, StoreError> {
    let index = store.dedupe_index(partition)?;
    Ok(index
        .into_iter()
        .map(|(hour, last_offset, topic, records)| {
            (hour, Bucket { seen: None, new: Vec::new(), last_offset, topic, reset: false, touched: false, used: 0, records, dropped: 0 })
        })
        .collect())
}

/// Buckets used in this many of the latest writes keep their sets in memory
/// whatever the budget: a late event for the hour before, or a Kafka batch
/// that happened to hold nothing of a partition, must not cost a read of
/// the bucket's whole set.
pub const DEDUPE_RECENT_WRITES: u64 = 8;

impl DedupeCache {
    /// An empty mirror, for a pipeline reading `topic`, keeping about
    /// `budget` bytes of hashes in memory ([`DedupeCache::shrink_to_budget`]).
    pub fn new(window: DedupeWindow, topic: &str, budget: usize) -> Self {
        DedupeCache { window, topic: topic_hash(topic), partitions: FxHashMap::default(), budget, clock: 0, reads: (0, 0), set_hint: 0 }
    }

    /// Bytes of hash sets in memory, about ([`set_bytes`]).
    pub fn held_bytes(&self) -> usize {
        self.partitions.values().flat_map(|b| b.values()).filter_map(|b| b.seen.as_ref()).map(set_bytes).sum()
    }

    /// Once the last [`DedupeCache::write_changes`] is written to the
    /// store: while the hash sets in memory hold more than the budget,
    /// forgets those of the buckets used least recently, never one used in
    /// the last [`DEDUPE_RECENT_WRITES`] batches (a forgotten set is read
    /// again at its bucket's next event). Returns the bytes held after.
    pub fn shrink_to_budget(&mut self) -> usize {
        let mut held = self.held_bytes();
        if held <= self.budget {
            return held;
        }
        let recent = self.clock.saturating_sub(DEDUPE_RECENT_WRITES);
        let mut idle: Vec<&mut Bucket> = self
            .partitions
            .values_mut()
            .flat_map(|b| b.values_mut())
            .filter(|b| b.seen.is_some() && b.used < recent && !b.touched)
            .collect();
        idle.sort_unstable_by_key(|b| b.used);
        for b in idle {
            if held <= self.budget {
                break;
            }
            held -= b.seen.take().as_ref().map_or(0, set_bytes);
        }
        held
    }

    /// Bucket sets read from the store since the last call, and their
    /// bytes: a bucket's first use since the start, or its next use after
    /// [`DedupeCache::shrink_to_budget`] forgot its set.
    pub fn take_reads(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.reads)
    }

    /// Looks up the request id of the message at `offset` in `hour` and
    /// records it when new ([`Seen::New`]); a repeat with the same billed
    /// content is [`Seen::Repeat`], with other content [`Seen::Conflict`]
    /// (neither is recorded). `id` is the xxh3-128 hash of the request id,
    /// `content` the [`content_hash`] of what the copy bills; `watermark_ms`
    /// is the partition's watermark before the message.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(
        &mut self,
        store: &impl BucketSource,
        partition: i32,
        offset: i64,
        watermark_ms: i64,
        hour: i64,
        id: u128,
        content: u64,
    ) -> Result<Seen, StoreError> {
        let (window, topic) = (self.window, self.topic);
        let buckets = match self.partitions.get_mut(&partition) {
            Some(b) => b,
            None => self.partitions.entry(partition).or_insert(read_index(store, partition)?),
        };
        let (clock, hint) = (self.clock, self.set_hint);
        let empty = |reset, dropped| Bucket {
            seen: Some(FxHashMap::with_capacity_and_hasher(hint, FxBuildHasher)),
            new: Vec::new(),
            last_offset: offset,
            topic,
            reset,
            touched: true,
            used: clock,
            records: 0,
            dropped,
        };
        let bucket = buckets.entry(hour).or_insert_with(|| empty(false, 0));
        if !window.live(hour, bucket.last_offset, bucket.topic == topic, offset, watermark_ms) {
            *bucket = empty(true, bucket.records.max(bucket.dropped));
        }
        if bucket.seen.is_none() {
            let stored = store.dedupe_bucket(partition, hour)?;
            self.reads.0 += 1;
            self.reads.1 += stored.len() as u64;
            bucket.seen =
                Some(stored.chunks_exact(16).map(|c| DedupeEntry::split(u128::from_be_bytes(c.try_into().expect("16 bytes")))).collect());
        }
        let seen = bucket.seen.as_mut().expect("read above");
        let entry = DedupeEntry::new(id, content);
        let outcome = match seen.entry(entry.key) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(content);
                bucket.new.push(entry.stored());
                Seen::New
            }
            std::collections::hash_map::Entry::Occupied(o) => match *o.get() {
                counted if counted == content || counted == DedupeEntry::legacy_content(id) => Seen::Repeat,
                counted => Seen::Conflict { counted },
            },
        };
        bucket.last_offset = offset;
        bucket.topic = topic;
        bucket.touched = true;
        bucket.used = clock;
        Ok(outcome)
    }

    /// Takes back the request id [`DedupeCache::insert`] just recorded as new
    /// in `hour` of `partition` (the event was then rejected: it counts
    /// nowhere, so a later copy is not its repeat).
    pub fn unrecord(&mut self, partition: i32, hour: i64, id: u128) {
        let key = DedupeEntry::new(id, 0).key;
        if let Some(b) = self.partitions.get_mut(&partition).and_then(|p| p.get_mut(&hour)) {
            if let Some(seen) = b.seen.as_mut() {
                seen.remove(&key);
            }
            if b.new.last().is_some_and(|e| DedupeEntry::split(*e).0 == key) {
                b.new.pop();
            }
        }
    }

    /// Adds what changed since the last call to a write batch: per touched
    /// bucket, its new hashes (replacing the stored ones after a reset) and
    /// its last offset; with `changed`, the changelog records: the bucket's
    /// next numbered record, after tombstones of the records of a bucket it
    /// replaced.
    pub fn write_changes(&mut self, batch: &mut Batch<'_>, mut changed: Option<&mut Vec<(i32, Change)>>) {
        let mut largest = 0;
        for (p, buckets) in &mut self.partitions {
            for (hour, b) in buckets.iter_mut().filter(|(_, b)| b.touched) {
                largest = largest.max(b.seen.as_ref().map_or(0, |s| s.len()));
                if b.reset {
                    batch.delete_dedupe(*p, *hour);
                }
                // Taken, not drained: an idle bucket keeps no capacity.
                let hashes: Vec<u8> = std::mem::take(&mut b.new).into_iter().flat_map(u128::to_be_bytes).collect();
                if !hashes.is_empty() {
                    batch.append_dedupe(*p, *hour, &hashes);
                }
                if let Some(out) = changed.as_mut() {
                    for seq in 0..std::mem::take(&mut b.dropped) {
                        out.push((*p, Change::Gone { key: dedupe_key(*hour, seq) }));
                    }
                    out.push((*p, Change::Dedupe { hour: *hour, seq: b.records, last_offset: b.last_offset, topic: b.topic, hashes }));
                    b.records += 1;
                }
                batch.put_dedupe_index(*p, *hour, b.last_offset, b.topic, b.records);
                b.reset = false;
                b.touched = false;
            }
        }
        self.set_hint = largest.min(SET_HINT_MAX);
        self.clock += 1;
    }

    /// Forgets a partition's buckets (its state was replaced by a restore).
    pub fn forget(&mut self, partition: i32) {
        self.partitions.remove(&partition);
    }

    /// Deletes (from memory and, in the batch, from the store) a partition's
    /// buckets that have expired for every message after `last_offset`, the
    /// partition's watermark being `watermark_ms`; with `changed`, their
    /// changelog records too (tombstones).
    pub fn prune(
        &mut self,
        batch: &mut Batch<'_>,
        partition: i32,
        last_offset: i64,
        watermark_ms: i64,
        mut changed: Option<&mut Vec<(i32, Change)>>,
    ) {
        let (window, topic) = (self.window, self.topic);
        if let Some(buckets) = self.partitions.get_mut(&partition) {
            buckets.retain(|hour, b| {
                let live = window.live(*hour, b.last_offset, b.topic == topic, last_offset + 1, watermark_ms);
                if !live {
                    batch.delete_dedupe(partition, *hour);
                    if let Some(out) = changed.as_mut() {
                        for seq in 0..b.records.max(b.dropped) {
                            out.push((partition, Change::Gone { key: dedupe_key(*hour, seq) }));
                        }
                    }
                }
                live
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::usage::MonthUsage;

    /// Buckets as stored: (partition, hour) -> (last offset, topic hash, hashes).
    #[derive(Default)]
    struct Stored(BTreeMap<(i32, i64), (i64, u64, Vec<u128>)>);

    impl BucketSource for Stored {
        fn dedupe_index(&self, partition: i32) -> Result<Vec<BucketIndex>, StoreError> {
            Ok(self.0.iter().filter(|((p, _), _)| *p == partition).map(|((_, h), (last, topic, _))| (*h, *last, *topic, 0)).collect())
        }
        fn dedupe_bucket(&self, partition: i32, hour: i64) -> Result<Vec<u8>, StoreError> {
            Ok(self.0.get(&(partition, hour)).map(|(_, _, ids)| ids.iter().flat_map(|h| h.to_be_bytes()).collect()).unwrap_or_default())
        }
    }

    /// A request id's hash: `x` in the key half, a fixed low half.
    fn id(x: u64) -> u128 {
        (u128::from(x) << 64) | 0x5eed
    }

    #[test]
    fn dedupe_cache_reads_stored_buckets_and_restarts_expired_ones_empty() {
        let window = DedupeWindow { event_time_secs: 3600, messages: 100 };
        let topic = topic_hash("events");
        let mut stored = Stored::default();
        // Entries as a store from before content hashes holds them: the id's whole hash.
        stored.0.insert((0, 7200), (50, topic, vec![id(1), id(2)]));
        stored.0.insert((0, 10_800), (10, topic, vec![id(3)]));
        stored.0.insert((0, 14_400), (140, topic_hash("file:old.ndjson"), vec![id(4)]));
        let mut cache = DedupeCache::new(window, "events", usize::MAX);
        let wm = 100_000 * 1000; // far past every hour: only the message window keeps buckets
                                 // Hour 7200, last event at offset 50: live at offset 150, so 1 is a repeat.
        assert_eq!(cache.insert(&stored, 0, 150, wm, 7200, id(1), 77).unwrap(), Seen::Repeat);
        assert_eq!(cache.insert(&stored, 0, 151, wm, 7200, id(9), 77).unwrap(), Seen::New);
        // Hour 10800, last event at offset 10: expired at 152, so 3 is new again.
        assert_eq!(cache.insert(&stored, 0, 152, wm, 10_800, id(3), 77).unwrap(), Seen::New);
        // Hour 14400 was last touched by another input: offsets do not compare.
        assert_eq!(cache.insert(&stored, 0, 153, wm, 14_400, id(4), 77).unwrap(), Seen::New);
        // Another partition's buckets are its own.
        assert_eq!(cache.insert(&stored, 1, 0, wm, 7200, id(1), 77).unwrap(), Seen::New);
    }

    #[test]
    fn a_repeat_with_other_billed_content_is_a_conflict_and_the_first_copy_stays() {
        let window = DedupeWindow { event_time_secs: 3600, messages: 100 };
        let mut stored = Stored::default();
        let mut cache = DedupeCache::new(window, "events", usize::MAX);
        let wm = 7200 * 1000;
        assert_eq!(cache.insert(&stored, 0, 0, wm, 7200, id(1), 100).unwrap(), Seen::New);
        assert_eq!(cache.insert(&stored, 0, 1, wm, 7200, id(1), 100).unwrap(), Seen::Repeat);
        assert_eq!(cache.insert(&stored, 0, 2, wm, 7200, id(1), 5).unwrap(), Seen::Conflict { counted: 100 });
        // The first copy is what is written, and what a fresh cache reads back.
        let mut entries = Vec::new();
        for (_, buckets) in cache.partitions.iter_mut() {
            for b in buckets.values_mut() {
                entries.append(&mut b.new);
            }
        }
        assert_eq!(entries, vec![DedupeEntry::new(id(1), 100).stored()]);
        stored.0.insert((0, 7200), (2, topic_hash("events"), entries));
        let mut fresh = DedupeCache::new(window, "events", usize::MAX);
        assert_eq!(fresh.insert(&stored, 0, 3, wm, 7200, id(1), 5).unwrap(), Seen::Conflict { counted: 100 });
        assert_eq!(fresh.insert(&stored, 0, 4, wm, 7200, id(1), 100).unwrap(), Seen::Repeat);
        // A rejected new copy is taken back: the next copy is new.
        assert_eq!(fresh.insert(&stored, 0, 5, wm, 7200, id(2), 1).unwrap(), Seen::New);
        fresh.unrecord(0, 7200, id(2));
        assert_eq!(fresh.insert(&stored, 0, 6, wm, 7200, id(2), 2).unwrap(), Seen::New);
    }

    #[test]
    fn dedupe_window_counts_messages_within_one_topic_only() {
        let w = DedupeWindow { event_time_secs: 3600, messages: 10 };
        let wm = 100_000 * 1000;
        // (hour, last offset, same topic, offset) -> live
        for (hour, last, same, offset, live) in [
            (0, 5, true, 15, true),         // 10 messages later
            (0, 5, true, 16, false),        // 11 messages later, hour far behind the watermark
            (96_400, 5, true, 1_000, true), // within the event-time window
            (0, 5, false, 6, false),        // another input: offsets do not compare
            (96_400, 5, false, 6, true),    // ... but the event-time window applies
        ] {
            assert_eq!(w.live(hour, last, same, offset, wm), live, "hour {hour}, last {last}, same topic {same}, offset {offset}");
        }
        assert_ne!(topic_hash("gateway-events"), topic_hash("file:/tmp/a.ndjson"));
    }

    #[test]
    fn par_map_keeps_the_input_order() {
        let items: Vec<u64> = (0..10_000).collect();
        assert_eq!(par_map(&items, |x| x * 3), items.iter().map(|x| x * 3).collect::<Vec<_>>());
    }

    #[test]
    fn cells_encode_as_the_month_usage_they_sum_to() {
        let month = Month::new(2020, 11).unwrap();
        let metered =
            |public, private, fe| Metered { frontend_error: fe, public_out_bytes: public, private_out_bytes: private, inbound_bytes: 7 };
        // Regions first seen out of name order; an hour with no public bytes; one region twice.
        let events = [
            (1_604_160_000, "ap-shanghai", metered(100, 0, false)),
            (1_604_160_000, "ap-beijing", metered(3, 50, true)),
            (1_604_163_600, "ap-guangzhou", metered(0, 0, false)),
            (1_604_160_000, "ap-shanghai", metered(5, 1, false)),
            (1_604_167_200, "ap-beijing", metered(9, 0, false)),
        ];
        let mut regions = Interner::default();
        let mut cells: FxHashMap<(u32, i64, u32), HourCell> = FxHashMap::default();
        let mut reference = MonthUsage::default();
        for (hour, region, m) in &events {
            reference.add(*hour, region, m);
            cells.entry((0, *hour, regions.intern(region))).or_insert(HourCell::new(month, 0)).add(m);
        }
        let mut sorted: Vec<_> = cells.into_iter().collect();
        sorted.sort_unstable_by_key(|(k, _)| *k);
        assert_eq!(encode_cells(&sorted, &regions), reference.encode());
        assert_eq!(MonthUsage::decode(&encode_cells(&sorted, &regions)).unwrap().calls(), 5);
    }
}
