//! The rebalance callback and what it hands the loop. librdkafka calls it
//! from inside the consumer's poll; it only records: it positions each
//! assigned partition at the offset the store holds (a local read), assigns
//! it paused, and notes it and every revocation in the shared
//! [`Ownership`]. The loop ([`Owned::follow`], after every message it
//! gathers and at the start of every step) decides what to restore from the
//! changelog and when, and resumes the partitions after.

use super::restore::{note_changelog_seen, RestoreThread};
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
    /// The partitions owned and restored, as last handed to the pipeline:
    /// the ones it bills and whose offsets go to the group.
    pub assigned: Vec<i32>,
    /// Partitions assigned and paused while the restore thread restores
    /// them, with the generation of their assignment.
    restoring: BTreeMap<i32, u64>,
    /// Assignments seen, numbering restores.
    generation: u64,
    /// Restores partitions assigned from the changelog (`None`: a replay,
    /// which restores nothing).
    restores: Option<RestoreThread>,
    /// Rebalances that assigned partitions.
    pub assignments: u64,
    /// The input topic.
    topic: String,
}

impl Owned {
    /// Nothing owned yet; `restores`: the thread that restores what is
    /// assigned (a group member), or `None` (a replay).
    pub fn new(restores: Option<RestoreThread>, topic: &str) -> Owned {
        Owned {
            ownership: Arc::default(),
            seen: 0,
            assigned: Vec::new(),
            restoring: BTreeMap::new(),
            generation: 0,
            restores,
            assignments: 0,
            topic: topic.to_string(),
        }
    }

    /// Acts on what the rebalance callback recorded since the last look:
    /// notes the changelog's ends of partitions given up; cancels their
    /// restores; asks the restore thread for the partitions assigned (they
    /// stay paused); resumes those whose restore finished, at their
    /// restored position; drops the messages of partitions revoked or not
    /// yet restored from the batch being gathered
    /// ([`Gathered::drop_partitions`]: the worker must not write their state
    /// or offsets; whoever bills them next reads them from the stored
    /// position); and hands the pipeline the partitions it bills now.
    pub fn follow(
        &mut self,
        consumer: &StreamConsumer<StoreOffsets>,
        store: &Store,
        pipeline: &mut Pipeline,
        batch: &mut Gathered,
    ) -> Result<(), WorkerError> {
        let changes = self.ownership.lock().expect("not poisoned").take_changes(&mut self.seen);
        if let Some(c) = &changes {
            note_changelog_seen(store, &c.changelog_seen);
            self.ask_restores(c);
        }
        let restored = if self.restoring.is_empty() { BTreeSet::new() } else { self.resume_restored(consumer, store) };
        // Nothing changed and no restore finished (the common case, looked
        // at after every message): nothing to do.
        let Some(changes) = changes.or_else(|| {
            (!restored.is_empty()).then(|| Changes { owned: self.ownership.lock().expect("not poisoned").assigned(), ..Changes::default() })
        }) else {
            return Ok(());
        };
        let mut dropping = changes.revoked.clone();
        dropping.extend(self.restoring.keys());
        let dropped = batch.drop_partitions(&dropping);
        if dropped > 0 {
            tracing::info!(
                messages = dropped,
                partitions = ?dropping,
                "dropped messages of partitions revoked or not yet restored; they are read again from the stored position"
            );
        }
        // Partitions billed from now on, (re)assigned or restored since the
        // last look: the pipeline reads their state again.
        let active: Vec<i32> = changes.owned.iter().copied().filter(|p| !self.restoring.contains_key(p)).collect();
        let added: Vec<i32> =
            active.iter().copied().filter(|p| !self.assigned.contains(p) || changes.revoked.contains(p) || restored.contains(p)).collect();
        pipeline.reload_partitions(&added)?;
        if active != self.assigned {
            pipeline.set_assignment(&active, now_ms());
            self.assigned = active;
        }
        Ok(())
    }

    /// Drops from a batch about to be written the messages of partitions
    /// still being restored (assigned paused, but a fetch may have raced
    /// the pause): their state is the restore thread's to write.
    pub fn drop_unrestored(&self, batch: &mut Gathered) {
        if self.restoring.is_empty() {
            return;
        }
        let restoring: BTreeSet<i32> = self.restoring.keys().copied().collect();
        let dropped = batch.drop_partitions(&restoring);
        if dropped > 0 {
            tracing::info!(messages = dropped, partitions = ?restoring, "dropped messages of partitions not yet restored; they are read again from the restored position");
        }
    }

    /// Cancels the restores of partitions revoked and asks for those of
    /// partitions assigned (a replay's are billed at once).
    fn ask_restores(&mut self, changes: &Changes) {
        for p in &changes.revoked {
            if self.restoring.remove(p).is_some() {
                if let Some(r) = &self.restores {
                    r.cancel(*p);
                }
            }
        }
        if changes.assigned.is_empty() {
            return;
        }
        self.assignments += 1;
        let Some(r) = &self.restores else { return };
        self.generation += 1;
        for &p in changes.assigned.keys() {
            self.restoring.insert(p, self.generation);
            r.ask(p, self.generation);
        }
    }

    /// Resumes the partitions whose restore finished (and that are still
    /// wanted), each moved to its restored position first (also when the
    /// restore moved nothing: a message of it read before, and dropped, is
    /// read again). Returns them.
    fn resume_restored(&mut self, consumer: &StreamConsumer<StoreOffsets>, store: &Store) -> BTreeSet<i32> {
        let Some(r) = &self.restores else { return BTreeSet::new() };
        let mut tpl = TopicPartitionList::new();
        let mut restored = BTreeSet::new();
        for (p, generation) in r.finished() {
            if self.restoring.get(&p) != Some(&generation) {
                continue;
            }
            self.restoring.remove(&p);
            let at = match store.partition(&self.topic, p) {
                Ok(Some(s)) => Offset::Offset(s.next_offset),
                _ => Offset::Beginning,
            };
            if let Err(e) = consumer.seek(&self.topic, p, at, Duration::from_secs(10)) {
                tracing::warn!(error = %e, partition = p, "cannot move the partition to its restored position");
            }
            tpl.add_partition(&self.topic, p);
            restored.insert(p);
        }
        if tpl.count() > 0 {
            if let Err(e) = consumer.resume(&tpl) {
                tracing::error!(error = %e, "cannot resume the restored partitions");
            }
            tracing::info!(partitions = ?restored, "partitions restored; reading them");
        }
        restored
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
