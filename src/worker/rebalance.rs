//! The rebalance callback and what it hands the loop. librdkafka calls it
//! from inside the consumer's poll; it only records: it positions each
//! assigned partition at the offset the store holds (a local read), assigns
//! it paused, and notes it and every revocation in the shared
//! [`Ownership`]. The loop ([`Owned::follow`], after every message it
//! gathers and at the start of every step) decides what to restore from the
//! changelog and when, and resumes the partitions after.

use super::restore::Restorer;
use crate::driver::WorkerError;
use crate::gathered::Gathered;
use crate::pipeline::{now_ms, Pipeline};
use crate::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, RebalanceProtocol, StreamConsumer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::ClientContext;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The input partitions this worker owns, as the rebalance callback alone
/// tells it (never by asking the consumer), and the changes the loop has
/// not acted on yet.
#[derive(Debug, Default)]
pub struct Ownership {
    assigned: BTreeSet<i32>,
    /// Assigned (paused) since the loop last looked, with the offset each
    /// was positioned at.
    pending: BTreeMap<i32, Offset>,
    revoked: BTreeSet<i32>,
    /// For partitions revoked since the loop last looked: the changelog's
    /// end offsets as last read before the revocation.
    changelog_seen: BTreeMap<i32, i64>,
    /// Bumped on every change, so the loop looks only when something changed.
    version: u64,
}

/// What changed since the loop last looked ([`Ownership::take_changes`]).
#[derive(Debug, Default)]
pub struct Changes {
    /// Partitions revoked (some may be assigned again since).
    pub revoked: BTreeSet<i32>,
    /// Partitions assigned and paused, with the offset each was positioned
    /// at: the loop restores them, positions them again if the restore
    /// moved them, and resumes them.
    pub assigned: BTreeMap<i32, Offset>,
    /// The changelog's ends read before the revocations.
    pub changelog_seen: BTreeMap<i32, i64>,
    /// The partitions owned now.
    pub owned: Vec<i32>,
}

impl Ownership {
    /// Partitions given to this worker (added to what it owns), positioned
    /// at `offsets`.
    pub fn assign(&mut self, offsets: impl IntoIterator<Item = (i32, Offset)>) {
        for (p, offset) in offsets {
            self.assigned.insert(p);
            self.pending.insert(p, offset);
        }
        self.version += 1;
    }

    /// Partitions taken away (all of them for an eager rebalance), with the
    /// changelog's ends as last read before.
    pub fn revoke(&mut self, partitions: impl IntoIterator<Item = i32>, changelog_ends: &BTreeMap<i32, i64>) {
        for p in partitions {
            self.assigned.remove(&p);
            self.pending.remove(&p);
            self.revoked.insert(p);
            if let Some(end) = changelog_ends.get(&p) {
                self.changelog_seen.insert(p, *end);
            }
        }
        self.version += 1;
    }

    /// The partitions owned now.
    pub fn assigned(&self) -> Vec<i32> {
        self.assigned.iter().copied().collect()
    }

    /// The changes since the last call, or `None` when there were none
    /// since `seen` (the version last acted on, updated).
    pub fn take_changes(&mut self, seen: &mut u64) -> Option<Changes> {
        if self.version == *seen {
            return None;
        }
        *seen = self.version;
        Some(Changes {
            revoked: std::mem::take(&mut self.revoked),
            assigned: std::mem::take(&mut self.pending),
            changelog_seen: std::mem::take(&mut self.changelog_seen),
            owned: self.assigned(),
        })
    }
}

/// The partitions a worker owns, and what it does when they change: the
/// loop's side of the rebalance callback.
pub struct Owned {
    /// What the rebalance callback says this worker owns.
    pub ownership: Arc<Mutex<Ownership>>,
    /// The [`Ownership`] version last acted on.
    seen: u64,
    /// The partitions owned, as last handed to the pipeline.
    pub assigned: Vec<i32>,
    /// Restores partitions assigned from the changelog.
    restorer: Restorer,
    /// The input topic.
    topic: String,
}

impl Owned {
    /// Nothing owned yet.
    pub fn new(restorer: Restorer, topic: &str) -> Owned {
        Owned { ownership: Arc::default(), seen: 0, assigned: Vec::new(), restorer, topic: topic.to_string() }
    }

    /// Acts on what the rebalance callback recorded since the last look:
    /// notes the changelog's ends of partitions given up; drops the
    /// messages of revoked partitions from the batch being gathered
    /// ([`Gathered::drop_partitions`]: the worker no longer owns them, so it
    /// must not write their state or offsets; the partitions' next owner,
    /// this worker again after an eager rebalance, reads them from the
    /// stored position); restores and resumes the partitions assigned (a
    /// group member: `restore`); and hands the pipeline the partitions
    /// owned now.
    pub fn follow(
        &mut self,
        consumer: &StreamConsumer<StoreOffsets>,
        store: &Store,
        pipeline: &mut Pipeline,
        batch: &mut Gathered,
        restore: bool,
    ) -> Result<(), WorkerError> {
        let changes = self.ownership.lock().expect("not poisoned").take_changes(&mut self.seen);
        let Some(changes) = changes else { return Ok(()) };
        self.restorer.note_changelog_seen(store, &changes.changelog_seen);
        let dropped = batch.drop_partitions(&changes.revoked);
        if dropped > 0 {
            tracing::info!(
                messages = dropped,
                partitions = ?changes.revoked,
                "dropped messages of revoked partitions gathered before the revocation; the partitions' next owner reads them from the stored position"
            );
        }
        if restore {
            self.restore_assigned(consumer, store, &changes.assigned);
        }
        // Partitions (re)assigned since the last look may have been
        // restored on disk: the pipeline reads their state again.
        let added: Vec<i32> = changes.owned.iter().copied().filter(|p| !self.assigned.contains(p) || changes.revoked.contains(p)).collect();
        pipeline.reload_partitions(&added)?;
        if changes.owned != self.assigned {
            pipeline.set_assignment(&changes.owned, now_ms());
            self.assigned = changes.owned;
        }
        Ok(())
    }

    /// Restores partitions the callback assigned (paused) from the
    /// changelog, positions each again where the restore moved it, and
    /// resumes them. A restore that fails leaves the stored state.
    fn restore_assigned(&self, consumer: &StreamConsumer<StoreOffsets>, store: &Store, assigned: &BTreeMap<i32, Offset>) {
        if assigned.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &at) in assigned {
            if let Err(e) = self.restorer.restore(store, &self.topic, p) {
                tracing::error!(error = %e, partition = p, "restoring from the changelog failed; the partition resumes from the stored state");
            }
            let now = match store.partition(&self.topic, p) {
                Ok(Some(s)) => Offset::Offset(s.next_offset),
                _ => at,
            };
            // Read from where it was assigned, the offsets before the
            // restored position would only be skipped as processed.
            if now != at {
                if let Err(e) = consumer.seek(&self.topic, p, now, Duration::from_secs(10)) {
                    tracing::warn!(error = %e, partition = p, "cannot move the partition to its restored position; what is before it is read and skipped");
                }
            }
            tpl.add_partition(&self.topic, p);
        }
        if let Err(e) = consumer.resume(&tpl) {
            tracing::error!(error = %e, "cannot resume the partitions assigned");
        }
    }
}

/// Consumer context: records every assignment and revocation in the shared
/// [`Ownership`], so that a group offset never decides
/// where billing resumes and nothing slow runs inside librdkafka's poll.
pub struct StoreOffsets {
    pub(super) store: Arc<Store>,
    pub(super) topic: String,
    pub(super) ownership: Arc<Mutex<Ownership>>,
    /// The changelog's end offsets as last read ([`super::end_offsets`]).
    pub(super) changelog_ends: Arc<Mutex<BTreeMap<i32, i64>>>,
}

impl StoreOffsets {
    /// Where a partition resumes: the state store's next offset, or the
    /// beginning when it holds none (the loop positions it again if a
    /// restore moves it).
    fn stored_offset(&self, partition: i32) -> Offset {
        match self.store.partition(&self.topic, partition) {
            Ok(Some(s)) => Offset::Offset(s.next_offset),
            Ok(None) => Offset::Beginning,
            Err(e) => {
                tracing::error!(error = %e, partition, "cannot read stored offset; starting the partition from the beginning");
                Offset::Beginning
            }
        }
    }

    fn assign(&self, base: &BaseConsumer<Self>, tpl: &mut TopicPartitionList, cooperative: bool) {
        let offsets: Vec<(i32, Offset)> = tpl.elements().iter().map(|e| (e.partition(), self.stored_offset(e.partition()))).collect();
        for (p, offset) in &offsets {
            let _ = tpl.set_partition_offset(&self.topic, *p, *offset);
        }
        let r = if cooperative { base.incremental_assign(tpl) } else { base.assign(tpl) };
        if let Err(e) = r {
            tracing::error!(error = %e, "assign failed");
            return;
        }
        // Paused until the loop has restored them.
        if let Err(e) = base.pause(tpl) {
            tracing::error!(error = %e, "cannot pause the partitions assigned; they are read before a restore from the changelog");
        }
        tracing::info!(partitions = ?offsets, "partitions assigned at the state store's offsets, paused until the loop restores them");
        self.ownership.lock().expect("not poisoned").assign(offsets);
    }
}

impl ClientContext for StoreOffsets {}

impl ConsumerContext for StoreOffsets {
    fn rebalance(&self, base: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(base.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let partitions: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(base, tpl, cooperative),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(?partitions, "partitions revoked");
                let ends = self.changelog_ends.lock().expect("not poisoned").clone();
                self.ownership.lock().expect("not poisoned").revoke(partitions, &ends);
                let r = if cooperative { base.incremental_unassign(tpl) } else { base.unassign() };
                if let Err(e) = r {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error; unassigning");
                let ends = self.changelog_ends.lock().expect("not poisoned").clone();
                let mut ownership = self.ownership.lock().expect("not poisoned");
                let all = ownership.assigned();
                ownership.revoke(all, &ends);
                let _ = base.unassign();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at_start(partitions: impl IntoIterator<Item = i32>) -> Vec<(i32, Offset)> {
        partitions.into_iter().map(|p| (p, Offset::Beginning)).collect()
    }

    fn take_revoked(o: &mut Ownership) -> BTreeSet<i32> {
        let mut seen = u64::MAX;
        o.take_changes(&mut seen).map(|c| c.revoked).unwrap_or_default()
    }

    #[test]
    fn ownership_follows_assign_and_revoke_callbacks() {
        let none = BTreeMap::new();
        let mut o = Ownership::default();
        o.assign(at_start([2, 0]));
        assert_eq!((o.assigned(), o.version), (vec![0, 2], 1));
        // Cooperative: only partition 2 moves away; then 5 arrives.
        o.revoke([2], &none);
        o.assign(at_start([5]));
        assert_eq!((o.assigned(), o.version), (vec![0, 5], 3));
        assert_eq!(take_revoked(&mut o), BTreeSet::from([2]));
        assert!(take_revoked(&mut o).is_empty());
        // Eager: everything is revoked, then given back.
        o.revoke(o.assigned(), &none);
        assert!(o.assigned().is_empty());
        o.assign(at_start([0, 5]));
        assert_eq!(take_revoked(&mut o), BTreeSet::from([0, 5]));
        assert_eq!(o.assigned(), vec![0, 5]);
    }

    #[test]
    fn the_loop_takes_each_change_once_with_the_offsets_and_changelog_ends() {
        let mut o = Ownership::default();
        let mut seen = 0;
        assert!(o.take_changes(&mut seen).is_none());
        o.assign([(0, Offset::Beginning), (1, Offset::Offset(7))]);
        let c = o.take_changes(&mut seen).unwrap();
        assert_eq!(c.owned, vec![0, 1]);
        assert_eq!(c.assigned, BTreeMap::from([(0, Offset::Beginning), (1, Offset::Offset(7))]));
        assert!(c.revoked.is_empty());
        assert!(o.take_changes(&mut seen).is_none());
        // An eager rebalance: everything revoked, then some assigned back;
        // the changelog's ends as read before the revocation go with it.
        o.revoke([0, 1], &BTreeMap::from([(0, 40), (5, 9)]));
        o.assign([(1, Offset::Offset(9))]);
        let c = o.take_changes(&mut seen).unwrap();
        assert_eq!(c.owned, vec![1]);
        assert_eq!(c.revoked, BTreeSet::from([0, 1]));
        assert_eq!(c.assigned, BTreeMap::from([(1, Offset::Offset(9))]));
        assert_eq!(c.changelog_seen, BTreeMap::from([(0, 40)]));
        // Assigned, then revoked before the loop looked: nothing to restore.
        o.assign([(2, Offset::Beginning)]);
        o.revoke([2], &BTreeMap::new());
        let c = o.take_changes(&mut seen).unwrap();
        assert!(c.assigned.is_empty());
        assert_eq!(c.owned, vec![1]);
    }
}
