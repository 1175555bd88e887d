//! What every delivery shares: where the input stands when a step is
//! delivered, what became of the step, and the count of what was delivered.

use crate::metrics::Metrics;
use crate::pipeline::{BatchStats, Pipeline, Staged};
use crate::store::OutboxRecord;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;

/// Where the input stands when a step is delivered: what a transaction
/// commits with its records so that a worker that lost its partitions is
/// fenced rather than heard. Ignored by the other deliveries.
#[derive(Default)]
pub struct InputPosition<'a> {
    /// Asks the consumer for its group's metadata (a live group member),
    /// else `None`: no offsets are committed.
    pub group: Option<&'a GroupMetadata<'a>>,
    /// The input partitions owned.
    pub owned: &'a [i32],
    /// The input topic.
    pub topic: &'a str,
}

impl InputPosition<'_> {
    /// The next offset of each partition owned: a staged batch's position
    /// where it has one, else the stored one; partitions with neither are
    /// left out. Empty without a group.
    pub(super) fn offsets(&self, staged: &Staged<'_>) -> TopicPartitionList {
        match self.group {
            Some(_) => group_offsets(staged.pipeline(), self.owned, self.topic, staged.positions()),
            None => TopicPartitionList::new(),
        }
    }
}

/// The next offset of each partition `owned`: from `ahead` (a staged
/// batch's positions), else the stored one; partitions with neither are
/// left out.
pub fn group_offsets(pipeline: &Pipeline, owned: &[i32], topic: &str, ahead: &BTreeMap<i32, i64>) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    for &p in owned {
        if let Some(next) = ahead.get(&p).copied().or_else(|| pipeline.next_offset(p)) {
            tpl.add_partition_offset(topic, p, Offset::Offset(next)).expect("valid offset");
        }
    }
    tpl
}

/// How a group member's consumer group metadata is asked for.
pub type GroupMetadata<'a> = dyn Fn() -> Option<ConsumerGroupMetadata> + Sync + 'a;

/// What became of a staged step.
#[derive(Debug)]
pub enum Outcome {
    /// Delivered and written.
    Committed(BatchStats),
    /// Not delivered (an aborted transaction): nothing of it is visible and
    /// it was forgotten; its input is to be read again from the stored
    /// positions.
    Aborted,
    /// A crash point was reached (tests, `fault-injection`): the worker
    /// stops as a crash would.
    Crashed,
}

/// Counts delivered records by topic.
pub(super) fn count_produced<'a>(metrics: &Metrics, records: impl Iterator<Item = &'a OutboxRecord>) {
    let mut by_topic: BTreeMap<&str, u64> = BTreeMap::new();
    for r in records {
        *by_topic.entry(r.topic.as_str()).or_default() += 1;
    }
    for (topic, n) in by_topic {
        metrics.records_produced.with_label_values(&[topic]).inc_by(n);
    }
}
