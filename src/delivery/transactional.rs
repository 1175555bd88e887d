//! Delivery in Kafka transactions (`kafka.transactions`): a step's records
//! and the group offsets of every partition owned commit in one
//! transaction, and only then is the step written (write after commit). A
//! crash in between leaves the store behind the group's offsets: the
//! partition is restored from the changelog when it is next assigned. An
//! aborted transaction forgets its step.

use super::position::{count_produced, InputPosition, Outcome};
use crate::driver::{fault_point, FaultPoint, WorkerError};
use crate::kafka::{Transactional, TxnError};
use crate::metrics::{Health, Metrics};
use crate::pipeline::{Pipeline, Staged};
use crate::store::OutboxRecord;
use rdkafka::topic_partition_list::TopicPartitionList;
use std::sync::Arc;
use std::time::Instant;

/// The transactional producer with what it reports to.
pub struct TxnDelivery {
    txn: Transactional,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    /// Crash point (tests; looked at only with `fault-injection`).
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    fault: Option<FaultPoint>,
    /// Batches committed, for [`FaultPoint::BeforeTxnCommit`] and
    /// [`FaultPoint::AfterTxnCommit`].
    batches: u64,
    /// Emission chunks begun, for [`FaultPoint::BeforeBillsProduced`].
    #[cfg_attr(not(feature = "fault-injection"), allow(dead_code))]
    chunks: u64,
}

impl TxnDelivery {
    /// Delivers through `txn`; `fault`: a crash point of the tests.
    pub fn new(txn: Transactional, metrics: Arc<Metrics>, health: Arc<Health>, fault: Option<FaultPoint>) -> Self {
        TxnDelivery { txn, metrics, health, fault, batches: 0, chunks: 0 }
    }

    /// An input batch: its records with the offsets, in one transaction
    /// (also without records: the offsets move), then its state.
    pub(super) async fn commit_batch(&mut self, mut staged: Staged<'_>, at: &InputPosition<'_>) -> Result<Outcome, WorkerError> {
        let records = staged.take_records();
        fault_point!(self.fault, FaultPoint::BeforeTxnCommit(self.batches + 1), {
            self.txn.produce_only(&records).await;
            staged.abandon();
            return Ok(Outcome::Crashed);
        });
        if !self.transact(&records, at.offsets(&staged), at).await? {
            staged.abandon();
            return Ok(Outcome::Aborted);
        }
        fault_point!(self.fault, FaultPoint::AfterTxnCommit(self.batches + 1), {
            staged.abandon();
            return Ok(Outcome::Crashed);
        });
        self.batches += 1;
        Ok(Outcome::Committed(staged.apply()?))
    }

    /// An emission chunk: its bills and their changelog records in one
    /// transaction with the stored offsets of the partitions owned, so that
    /// a worker that lost them is fenced rather than heard; then its state.
    /// A chunk with no record (every bill unchanged) is written at once.
    pub(super) async fn commit_emission(&mut self, mut staged: Staged<'_>, at: &InputPosition<'_>) -> Result<Outcome, WorkerError> {
        let records = staged.take_records();
        if records.is_empty() {
            return Ok(Outcome::Committed(staged.apply()?));
        }
        self.chunks += 1;
        fault_point!(self.fault, FaultPoint::BeforeBillsProduced(self.chunks), {
            self.txn.produce_changelog_only(&records).await;
            staged.abandon();
            return Ok(Outcome::Crashed);
        });
        if !self.transact(&records, at.offsets(&staged), at).await? {
            // The marks stay: the next emission tries again.
            staged.abandon();
            return Ok(Outcome::Aborted);
        }
        Ok(Outcome::Committed(staged.apply()?))
    }

    /// Produces `records` in one transaction with `offsets` and commits it.
    /// `Ok(false)`: aborted, nothing of it visible.
    async fn transact(&self, records: &[OutboxRecord], offsets: TopicPartitionList, at: &InputPosition<'_>) -> Result<bool, WorkerError> {
        let t = Instant::now();
        match self.txn.commit(records, offsets, at.group.and_then(|g| g())).await {
            Ok(()) => {
                self.health.other_committed();
                self.metrics.produce_seconds.observe(t.elapsed().as_secs_f64());
                self.metrics.transactions.with_label_values(&["committed"]).inc();
                count_produced(&self.metrics, records.iter());
                Ok(true)
            }
            Err(TxnError::Aborted(why)) => {
                self.health.aborted();
                self.metrics.transactions.with_label_values(&["aborted"]).inc();
                tracing::warn!(%why, records = records.len(), "transaction aborted: nothing of it is visible; its state is forgotten and its input read again");
                Ok(false)
            }
            Err(e) => {
                let outcome = if matches!(e, TxnError::Unusable(_)) { "unusable" } else { "fenced" };
                self.metrics.transactions.with_label_values(&[outcome]).inc();
                Err(e.into())
            }
        }
    }

    /// Drains the outbox (records a worker without transactions, or the
    /// account records' dead letters, left there): one transaction per
    /// page. An aborted page stays for the next drain.
    pub(super) async fn drain(&self, pipeline: &mut Pipeline) -> Result<u64, WorkerError> {
        let (txn, metrics) = (&self.txn, &*self.metrics);
        let drained = pipeline
            .drain_outbox(|page| async move {
                let records: Vec<OutboxRecord> = page.iter().map(|(_, r)| r.clone()).collect();
                match txn.commit(&records, TopicPartitionList::new(), None).await {
                    Ok(()) => {
                        count_produced(metrics, records.iter());
                        Ok(page)
                    }
                    Err(TxnError::Aborted(why)) => {
                        tracing::warn!(%why, "outbox transaction aborted; the records stay in the outbox");
                        Ok(Vec::new())
                    }
                    Err(e) => Err(WorkerError::from(e)),
                }
            })
            .await?;
        Ok(drained.failed)
    }
}
