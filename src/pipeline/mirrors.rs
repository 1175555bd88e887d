//! What the pipeline knows of the store in memory, beyond the pending
//! batch, each behind the only operations that change it, so that its
//! invariant holds in one place: the dirty marks known to be on disk
//! ([`KnownMarks`]) and each ingested account-month's usage totals
//! ([`MonthTotalsMirror`]). Plain data over interned ids; it imports
//! nothing of the pipeline.

use crate::billing::calendar::Month;
use crate::billing::usage::{MonthTotals, MonthUsage};
use crate::changelog::{block_of, block_span};
use rustc_hash::FxBuildHasher;
use std::collections::hash_map::Entry;
use std::collections::HashMap;

/// Most entries [`KnownMarks`] keeps (about 24 MB): past it, it starts
/// empty again.
const KNOWN_MARKS_MAX: usize = 1 << 20;

/// Most entries the month totals keep over a pipeline and the shards it is
/// split into (about 60 bytes each).
pub const MONTH_TOTALS_MAX: usize = 1 << 20;

/// Account-months (by interned id) whose dirty mark, with this partition,
/// is on disk: a batch skips writing it again.
///
/// Invariant: only ever a subset of the marks on disk. An entry goes in
/// after the batch that wrote the mark is written ([`KnownMarks::written`])
/// and out when an emission stages the month's clearing, before that is
/// written ([`KnownMarks::clearing`]); anything else that could change the
/// marks empties it ([`KnownMarks::forget`]: an abandoned or failed step, a
/// partition's state reloaded, account records applied, a reset of the
/// interned ids). A missing entry costs one write; a wrong one would lose a
/// bill, so when in doubt it is emptied. It relies on steps going one at a
/// time (a batch staged with a mark skipped, then an emission clearing
/// that month written first, would lose the mark).
#[derive(Default)]
pub struct KnownMarks {
    marks: HashMap<(u32, Month), i32, FxBuildHasher>,
}

impl KnownMarks {
    /// Whether the mark of `(account, month)` with `partition` is on disk.
    pub fn is_on_disk(&self, account: u32, month: Month, partition: i32) -> bool {
        self.marks.get(&(account, month)) == Some(&partition)
    }

    /// The marks a batch wrote, once it is written.
    pub fn written(&mut self, marks: impl IntoIterator<Item = (u32, Month, i32)>) {
        self.marks.extend(marks.into_iter().map(|(a, m, p)| ((a, m), p)));
        if self.marks.len() > KNOWN_MARKS_MAX {
            self.forget();
        }
    }

    /// An emission stages the clearing of a month's mark (before it is
    /// written): a batch after it marks the month again.
    pub fn clearing(&mut self, account: u32, month: Month) {
        self.marks.remove(&(account, month));
    }

    /// Forgets every mark.
    pub fn forget(&mut self) {
        self.marks.clear();
    }
}

/// Values per (interned account, month) mirrored from the store, at most
/// `max_entries` of them, and whether the map is *complete*: it holds
/// every account-month with usage on disk that its pipeline can be fed, so
/// a month it lacks has none and its value starts empty. What both usage
/// mirrors ([`MonthTotalsMirror`], [`BlockMirror`]) share: completeness is
/// lost for good by [`MonthMap::forget`], and kept by
/// [`MonthMap::reloaded`] only while nothing was mirrored.
struct MonthMap<V> {
    values: HashMap<(u32, Month), V, FxBuildHasher>,
    complete: bool,
    max_entries: usize,
}

impl<V> MonthMap<V> {
    fn new(store_has_no_usage: bool, max_entries: usize) -> Self {
        MonthMap { values: HashMap::default(), complete: store_has_no_usage, max_entries }
    }

    /// The value of `key`: at its first use `empty()` when the map is
    /// complete, else `read()` (from the store).
    fn entry<E>(&mut self, key: (u32, Month), empty: impl FnOnce() -> V, read: impl FnOnce() -> Result<V, E>) -> Result<&mut V, E> {
        Ok(match self.values.entry(key) {
            Entry::Occupied(o) => o.into_mut(),
            Entry::Vacant(v) if self.complete => v.insert(empty()),
            Entry::Vacant(v) => v.insert(read()?),
        })
    }

    /// Past the size bound, forgets.
    fn bound(&mut self) {
        if self.values.len() > self.max_entries {
            self.forget();
        }
    }

    /// Partitions' state was reloaded (a restore may have written usage):
    /// complete only if it was, nothing was mirrored, and the store still
    /// has no usage (`store_has_no_usage`, asked only then).
    fn reloaded<E>(&mut self, store_has_no_usage: impl FnOnce() -> Result<bool, E>) -> Result<(), E> {
        self.complete = self.complete && self.values.is_empty() && store_has_no_usage()?;
        self.values.clear();
        Ok(())
    }

    /// Forgets every entry, and that the map was complete.
    fn forget(&mut self) {
        self.values.clear();
        self.complete = false;
    }
}

/// Each ingested account-month's usage totals, stored plus pending, so an
/// event that would take a total past
/// [`crate::billing::usage::MAX_MONTH_TOTAL`] is rejected before it counts.
///
/// Invariant: an entry is the month's exact total on disk plus what the
/// pending batch adds. It is read from the store at the month's first event,
/// unless the mirror is *complete*: it holds every account-month with usage
/// on disk that its pipeline can be fed, so a month it lacks has none.
/// Complete from a start on a store without usage (a new replay reads
/// nothing) for as long as its pipeline alone writes usage and it forgets
/// nothing; a file replay's shards hold disjoint accounts, so each shard's
/// mirror covers what it can be fed. Anything that may change usage behind
/// it or drop pending usage forgets it for good ([`MonthTotalsMirror::forget`]:
/// a discarded step, a reset of the interned ids, the size bound, a join;
/// [`MonthTotalsMirror::reloaded`] after a restore).
pub struct MonthTotalsMirror {
    totals: MonthMap<MonthTotals>,
}

impl MonthTotalsMirror {
    /// An empty mirror: complete when the store has no usage; keeping at
    /// most `max_entries`.
    pub fn new(store_has_no_usage: bool, max_entries: usize) -> Self {
        MonthTotalsMirror { totals: MonthMap::new(store_has_no_usage, max_entries) }
    }

    /// The totals of `(account, month)`, read with `read` (the stored
    /// month's totals) at its first use unless the mirror is complete.
    pub fn totals<E>(&mut self, account: u32, month: Month, read: impl FnOnce() -> Result<MonthTotals, E>) -> Result<&mut MonthTotals, E> {
        self.totals.entry((account, month), MonthTotals::default, read)
    }

    /// A batch was written: past the size bound, the mirror is forgotten.
    pub fn written(&mut self) {
        self.totals.bound();
    }

    /// Partitions' state was reloaded (a restore may have written usage):
    /// the mirror stays complete only if nothing was ingested and the
    /// store still has no usage (`store_has_no_usage`, asked only then).
    pub fn reloaded<E>(&mut self, store_has_no_usage: impl FnOnce() -> Result<bool, E>) -> Result<(), E> {
        self.totals.reloaded(store_has_no_usage)
    }

    /// Forgets every entry, and that the mirror was complete.
    pub fn forget(&mut self) {
        self.totals.forget();
    }
}

/// The blocks a batch wrote of each account-month it touched, absolute
/// (block, that block's usage alone), keyed by (interned account, month).
pub type BlockValues = Vec<((u32, Month), Vec<(i32, MonthUsage)>)>;

/// Account-months [`BlockMirror`] keeps before it forgets them all: its
/// entries hold up to [`RECENT_BLOCKS`] blocks each (at most 24 hours,
/// several hundred bytes), so about 100 MB at the bound. A worker billing
/// more account-months at once than this reads a month again at its next
/// batch after each forget.
pub const BLOCK_MIRROR_MAX: usize = 1 << 17;

/// How many of an account-month's latest blocks [`BlockMirror`] keeps.
pub const RECENT_BLOCKS: usize = 2;

/// The latest blocks ([`crate::changelog::BLOCK_HOURS`]) of each ingested
/// account-month's usage as on disk, so that a batch's changelog records
/// carry each block it touched, absolute, without reading the month so far
/// (whose size grows with the month).
///
/// Invariant, per account-month with an entry: every block at or after its
/// `floor` that has usage on disk is among its `blocks`, with its value on
/// disk. A block below the floor (a late event) is read from the stored
/// month. An entry is made at the month's first batch: empty when the
/// mirror is *complete* (as [`MonthTotalsMirror`]: a start on a store
/// without usage, nothing changed behind it since), else from the stored
/// month's latest blocks. Values change only once their batch is written
/// ([`BlockMirror::written`]); anything that may change usage behind it
/// forgets it ([`BlockMirror::forget`], [`BlockMirror::reloaded`]).
pub struct BlockMirror {
    months: MonthMap<RecentBlocks>,
}

/// One account-month's latest blocks ([`BlockMirror`]).
#[derive(Debug)]
struct RecentBlocks {
    floor: i32,
    /// (block, its usage), ascending by block: a vector of at most
    /// [`RECENT_BLOCKS`] between batches (a B-tree's node would take about
    /// 850 bytes for one entry, on each of up to [`BLOCK_MIRROR_MAX`]).
    blocks: Vec<(i32, MonthUsage)>,
}

impl RecentBlocks {
    /// From the month as stored (`None`: no usage).
    fn from_stored(month: Option<&MonthUsage>) -> RecentBlocks {
        let Some(m) = month.filter(|m| !m.is_empty()) else { return RecentBlocks::empty() };
        let mut latest: Vec<i32> = m.hours().map(|h| block_of(h.hour_start)).collect();
        latest.dedup();
        let keep = &latest[latest.len().saturating_sub(RECENT_BLOCKS)..];
        RecentBlocks { floor: keep[0], blocks: keep.iter().map(|&b| (b, stored_block(m, b))).collect() }
    }

    /// No usage on disk.
    fn empty() -> RecentBlocks {
        RecentBlocks { floor: i32::MIN, blocks: Vec::new() }
    }

    /// The block's usage, if kept.
    fn get(&self, block: i32) -> Option<&MonthUsage> {
        self.blocks.iter().find(|(b, _)| *b == block).map(|(_, u)| u)
    }

    /// Takes the blocks' new values, then keeps the latest [`RECENT_BLOCKS`];
    /// a block at or after the floor that leaves raises the floor past it.
    fn update(&mut self, values: Vec<(i32, MonthUsage)>) {
        for (block, usage) in values {
            match self.blocks.binary_search_by_key(&block, |(b, _)| *b) {
                Ok(i) => self.blocks[i].1 = usage,
                Err(i) => self.blocks.insert(i, (block, usage)),
            }
        }
        let leaving = self.blocks.len().saturating_sub(RECENT_BLOCKS);
        if leaving > 0 {
            let last_gone = self.blocks[leaving - 1].0;
            if last_gone >= self.floor {
                self.floor = last_gone + 1;
            }
            self.blocks.drain(..leaving);
        }
    }
}

/// The hours of `block` in a stored month.
fn stored_block(month: &MonthUsage, block: i32) -> MonthUsage {
    let (from, to) = block_span(block);
    month.hours_between(from, to)
}

impl BlockMirror {
    /// An empty mirror: complete when the store has no usage; keeping at
    /// most `max_entries` account-months.
    pub fn new(store_has_no_usage: bool, max_entries: usize) -> Self {
        BlockMirror { months: MonthMap::new(store_has_no_usage, max_entries) }
    }

    /// Each block `delta` (a batch's usage of one account-month) touches,
    /// as it will be on disk once the batch is written: the stored block
    /// plus the delta's hours in it. `read` reads the stored month; it is
    /// called at most once, and only at the month's first batch (unless
    /// the mirror is complete) or for a block below the floor.
    pub fn absolute<E>(
        &mut self,
        account: u32,
        month: Month,
        delta: &MonthUsage,
        read: impl FnOnce() -> Result<Option<MonthUsage>, E>,
    ) -> Result<Vec<(i32, MonthUsage)>, E> {
        let mut read = Some(read);
        let mut stored: Option<Option<MonthUsage>> = None;
        let entry = self.months.entry((account, month), RecentBlocks::empty, || {
            let m = (read.take().expect("unread"))()?;
            let recent = RecentBlocks::from_stored(m.as_ref());
            stored = Some(m);
            Ok(recent)
        })?;
        let mut out: Vec<(i32, MonthUsage)> = Vec::with_capacity(2);
        for h in delta.hours() {
            let b = block_of(h.hour_start);
            if out.last().is_none_or(|(last, _)| *last != b) {
                let base = match entry.get(b) {
                    Some(known) => known.clone(),
                    None if b >= entry.floor => MonthUsage::default(),
                    None => {
                        if stored.is_none() {
                            stored = Some((read.take().expect("read once"))()?);
                        }
                        stored.as_ref().and_then(Option::as_ref).map(|m| stored_block(m, b)).unwrap_or_default()
                    }
                };
                out.push((b, base));
            }
            out.last_mut().expect("pushed").1.add_view(&h);
        }
        Ok(out)
    }

    /// A batch was written with these blocks' values (from
    /// [`BlockMirror::absolute`]); past the size bound, the mirror is
    /// forgotten.
    pub fn written(&mut self, updates: BlockValues) {
        for (key, blocks) in updates {
            if let Some(entry) = self.months.values.get_mut(&key) {
                entry.update(blocks);
            }
        }
        self.months.bound();
    }

    /// Partitions' state was reloaded (a restore may have written usage):
    /// as [`MonthTotalsMirror::reloaded`].
    pub fn reloaded<E>(&mut self, store_has_no_usage: impl FnOnce() -> Result<bool, E>) -> Result<(), E> {
        self.months.reloaded(store_has_no_usage)
    }

    /// Forgets every entry, and that the mirror was complete.
    pub fn forget(&mut self) {
        self.months.forget();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_marks_hold_what_was_written_until_cleared_or_forgotten() {
        let march = Month::new(2021, 3).unwrap();
        let mut k = KnownMarks::default();
        k.written([(1, march, 0), (2, march, 3)]);
        assert!(k.is_on_disk(1, march, 0) && k.is_on_disk(2, march, 3));
        assert!(!k.is_on_disk(1, march, 1), "another partition's mark is not this one");
        k.clearing(1, march);
        assert!(!k.is_on_disk(1, march, 0) && k.is_on_disk(2, march, 3));
        k.forget();
        assert!(!k.is_on_disk(2, march, 3));
    }

    #[test]
    fn a_complete_mirror_reads_nothing_until_it_is_forgotten_or_reloaded_onto_usage() {
        let march = Month::new(2021, 3).unwrap();
        let stored = MonthTotals { calls: 7, ..MonthTotals::default() };
        let read = || Ok::<_, ()>(stored);
        let unread = || -> Result<MonthTotals, ()> { panic!("a complete mirror reads nothing") };
        let mut m = MonthTotalsMirror::new(true, 10);
        assert_eq!(m.totals(1, march, unread).unwrap().calls, 0);
        // Reloaded after ingesting: no longer complete.
        m.reloaded(|| Ok::<_, ()>(true)).unwrap();
        assert_eq!(m.totals(1, march, read).unwrap().calls, 7);
        // Reloaded before ingesting, onto a store with usage: read.
        let mut m = MonthTotalsMirror::new(true, 10);
        m.reloaded(|| Ok::<_, ()>(false)).unwrap();
        assert_eq!(m.totals(1, march, read).unwrap().calls, 7);
        // Before ingesting, onto a store still without usage: complete.
        let mut m = MonthTotalsMirror::new(true, 10);
        m.reloaded(|| Ok::<_, ()>(true)).unwrap();
        assert_eq!(m.totals(1, march, unread).unwrap().calls, 0);
        // Past the bound, forgotten for good.
        let mut m = MonthTotalsMirror::new(true, 1);
        m.totals(1, march, unread).unwrap();
        m.totals(2, march, unread).unwrap();
        m.written();
        assert_eq!(m.totals(1, march, read).unwrap().calls, 7);
    }

    #[test]
    fn the_block_mirror_gives_each_block_absolute_reading_the_month_only_when_it_must() {
        let march = Month::new(2021, 3).unwrap();
        // Hour h of the test starts at h * 3600: block h / B (the epoch's blocks).
        const B: i64 = crate::changelog::BLOCK_HOURS;
        let hour = |h: i64, calls: u64| {
            let mut m = MonthUsage::default();
            for _ in 0..calls {
                m.add(h * 3600, "eu", &crate::billing::Metered { public_out_bytes: 10, ..Default::default() });
            }
            m
        };
        let of = |hours: &[(i64, u64)]| {
            let mut m = MonthUsage::default();
            for &(h, c) in hours {
                m.merge(&hour(h, c));
            }
            m
        };
        let calls = |out: &[(i32, MonthUsage)]| {
            out.iter().map(|(b, u)| (*b, u.hours().map(|h| (h.hour_start / 3600, h.calls)).collect::<Vec<_>>())).collect::<Vec<_>>()
        };
        let unread = || -> Result<Option<MonthUsage>, ()> { panic!("read the month") };
        // On disk: hours 1, B + 1, 2B + 1, 3B + 1 (blocks 0..=3) with 1..=4 calls.
        let disk = of(&[(1, 1), (B + 1, 2), (2 * B + 1, 3), (3 * B + 1, 4)]);
        let mut m = BlockMirror::new(false, 10);
        // The first batch reads the month: block 3 has hour 3B + 1 and
        // gains 3B + 2; block 4 is new. Blocks 2 and 3 are kept.
        let out = m.absolute(1, march, &of(&[(3 * B + 1, 2), (3 * B + 2, 1), (4 * B, 1)]), || Ok::<_, ()>(Some(disk.clone()))).unwrap();
        assert_eq!(calls(&out), vec![(3, vec![(3 * B + 1, 6), (3 * B + 2, 1)]), (4, vec![(4 * B, 1)])]);
        m.written(vec![((1, march), out)]);
        // Kept: blocks 3 and 4 (block 2 left, the floor past it). The next
        // batch reads nothing for them.
        let out = m.absolute(1, march, &of(&[(3 * B + 2, 1), (4 * B + 1, 1)]), unread).unwrap();
        assert_eq!(calls(&out), vec![(3, vec![(3 * B + 1, 6), (3 * B + 2, 2)]), (4, vec![(4 * B, 1), (4 * B + 1, 1)])]);
        m.written(vec![((1, march), out)]);
        // Block 5 is new (above the floor): nothing read.
        let out = m.absolute(1, march, &hour(5 * B + 1, 1), unread).unwrap();
        assert_eq!(calls(&out), vec![(5, vec![(5 * B + 1, 1)])]);
        m.written(vec![((1, march), out)]);
        // Block 2 (a late event) is below the floor: the month is read.
        let out = m.absolute(1, march, &hour(2 * B, 1), || Ok::<_, ()>(Some(disk.clone()))).unwrap();
        assert_eq!(calls(&out), vec![(2, vec![(2 * B, 1), (2 * B + 1, 3)])]);
        // Not written (an abandoned batch): nothing changed.
        let out = m.absolute(1, march, &hour(5 * B + 1, 1), unread).unwrap();
        assert_eq!(calls(&out), vec![(5, vec![(5 * B + 1, 2)])]);
        // A complete mirror (a store without usage) reads nothing; forgotten, it reads.
        let mut m = BlockMirror::new(true, 10);
        assert_eq!(calls(&m.absolute(1, march, &hour(B + 1, 1), unread).unwrap()), vec![(1, vec![(B + 1, 1)])]);
        m.forget();
        assert_eq!(calls(&m.absolute(1, march, &hour(B + 1, 1), || Ok::<_, ()>(Some(disk.clone()))).unwrap()), vec![(1, vec![(B + 1, 3)])]);
    }
}
