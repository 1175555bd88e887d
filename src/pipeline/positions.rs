//! Where the pipeline stands in each input partition and which partitions
//! it owns ([`Positions`]): the stored positions (next offset, event-time
//! watermark), the clocks that decide when a partition is idle, and the
//! assignment that decides whose bills it emits. A batch's positions go
//! in once it is written; until then they are the pending batch's
//! (`ingest.rs`).

use super::policy::{effective_watermark, PartitionClock};
use crate::store::{PartitionState, Store, StoreError};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// The input partitions' positions and clocks, and the assignment.
pub struct Positions {
    /// Cache of the stored partition states of the input topic.
    partitions: HashMap<i32, PartitionState>,
    /// Wall-clock ms of the last input message (or of the assignment) per
    /// assigned partition: a partition is idle only while it is assigned and
    /// quiet, never merely because a rebalance or restart paused reading.
    last_input_ms: HashMap<i32, i64>,
    /// Last known end offset per partition: a partition with a backlog is
    /// never idle, however long it waits for its turn.
    high_watermarks: HashMap<i32, i64>,
    /// The input partitions this pipeline bills: `None` (file replay, a
    /// pipeline without a consumer group) bills every one; a worker sets it
    /// from its assignment ([`Positions::set_assignment`]).
    owned: Option<BTreeSet<i32>>,
}

impl Positions {
    /// The stored positions of `input_topic`'s partitions; no assignment
    /// (every partition owned), no clock yet.
    pub fn load(store: &Store, input_topic: &str) -> Result<Positions, StoreError> {
        Ok(Positions {
            partitions: store.partitions(input_topic)?.into_iter().collect(),
            last_input_ms: HashMap::new(),
            high_watermarks: HashMap::new(),
            owned: None,
        })
    }

    /// Next input offset to process for a partition, if it has state.
    pub fn next_offset(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|s| s.next_offset)
    }

    /// A partition's stored state (the default when it has none): where a
    /// pending batch starts from.
    pub fn stored(&self, partition: i32) -> PartitionState {
        self.partitions.get(&partition).copied().unwrap_or_default()
    }

    /// The partitions with a stored state.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.partitions.keys().copied()
    }

    /// Records the partitions currently assigned: from now on only their
    /// accounts' bills are emitted ([`Positions::owns`]); newly assigned
    /// ones start their idle clock now.
    pub fn set_assignment(&mut self, assigned: &[i32], now: i64) {
        self.owned = Some(assigned.iter().copied().collect());
        self.last_input_ms.retain(|p, _| assigned.contains(p));
        for p in assigned {
            self.last_input_ms.entry(*p).or_insert(now);
        }
    }

    /// Whether bills of accounts whose events come from `partition` are
    /// this pipeline's to emit: every partition until an assignment is
    /// set, then the assigned ones. -1 (an account-month whose partition no
    /// mark or bill records) stays with whoever holds it.
    pub fn owns(&self, partition: i32) -> bool {
        partition < 0 || self.owned.as_ref().is_none_or(|o| o.contains(&partition))
    }

    /// Records a partition's end offset as last seen on the broker.
    pub fn set_high_watermark(&mut self, partition: i32, high: i64) {
        self.high_watermarks.insert(partition, high);
    }

    /// A message of an assigned partition was read at `now`: its idle
    /// clock starts again.
    pub fn heard_from(&mut self, partition: i32, now: i64) {
        if let Some(t) = self.last_input_ms.get_mut(&partition) {
            *t = now;
        }
    }

    /// Reads the partitions' states from the store again (a restore
    /// replaced them).
    pub fn reload(&mut self, store: &Store, input_topic: &str, partitions: &[i32]) -> Result<(), StoreError> {
        for &p in partitions {
            match store.partition(input_topic, p)? {
                Some(s) => self.partitions.insert(p, s),
                None => self.partitions.remove(&p),
            };
        }
        Ok(())
    }

    /// The positions a batch wrote, once it is written.
    pub fn written(&mut self, touched: BTreeMap<i32, PartitionState>) {
        self.partitions.extend(touched);
    }

    /// The effective event-time watermark of `partition` for the closing
    /// policy ([`effective_watermark`]); for -1 (unknown), the most advanced
    /// partition's.
    pub fn watermark(&self, partition: i32, now: i64, idle_after_ms: i64, force_idle: bool) -> Option<i64> {
        if partition < 0 {
            self.partitions.keys().map(|p| effective_watermark(&self.clock(*p), now, idle_after_ms, force_idle)).max().flatten()
        } else {
            effective_watermark(&self.clock(partition), now, idle_after_ms, force_idle)
        }
    }

    /// What is known of a partition for the closing policy.
    fn clock(&self, partition: i32) -> PartitionClock {
        PartitionClock {
            watermark_ms: self.partitions.get(&partition).map(|s| s.watermark_ms),
            next_offset: self.next_offset(partition).unwrap_or(0),
            end_offset: self.high_watermarks.get(&partition).copied(),
            last_input_ms: self.last_input_ms.get(&partition).copied(),
        }
    }
}
