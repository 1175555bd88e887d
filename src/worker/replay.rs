//! A topic replay's bounds: where each partition starts (the stored
//! position, a time, or the log start) and the end offsets seen at start,
//! which it reads to; and its progress bar.

use crate::kafka::{self, KafkaSetupError};
use crate::pipeline::Pipeline;
use rdkafka::consumer::{Consumer, ConsumerContext};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::time::Duration;

/// Where a replay started and where it stops.
pub struct Bounds {
    /// Where each partition started, to rewind to before anything of it is
    /// stored.
    pub starts: BTreeMap<i32, i64>,
    /// The end offsets seen at start.
    pub ends: BTreeMap<i32, i64>,
    /// The progress bar, when asked for.
    pub progress: Option<indicatif::ProgressBar>,
}

impl Bounds {
    /// Assigns every partition of `topic` to `consumer`, each from the
    /// pipeline's stored position, else the first offset at `from_ms`
    /// (epoch ms), else the log start, to the end offsets seen now.
    pub fn assign<C: ConsumerContext + 'static>(
        consumer: &impl Consumer<C>,
        pipeline: &Pipeline,
        topic: &str,
        from_ms: Option<i64>,
        progress: bool,
    ) -> Result<Bounds, KafkaSetupError> {
        let mut starts = BTreeMap::new();
        let (ends, total) = kafka::assign_to_end(consumer, topic, |p, low, high| {
            let start = match (pipeline.next_offset(p), from_ms) {
                (Some(next), _) => next,
                (None, Some(t)) => offset_at(consumer, topic, p, t)?.unwrap_or(high),
                (None, None) => {
                    if low > 0 {
                        tracing::warn!(partition = p, log_start = low, "the partition's log starts at offset {low}: older events were deleted by retention and are not in this replay's bills");
                    }
                    low
                }
            };
            starts.insert(p, start);
            Ok::<_, KafkaSetupError>(start)
        })?;
        Ok(Bounds { starts, ends, progress: progress.then(|| replay_progress(total)) })
    }

    /// Every partition's stored position is at the end offset seen at start.
    pub fn reached(&self, pipeline: &Pipeline) -> bool {
        self.ends.iter().all(|(p, end)| pipeline.next_offset(*p).is_some_and(|n| n >= *end))
    }

    /// Moves the progress bar on by `n` messages.
    pub fn advance(&self, n: u64) {
        if let Some(pb) = &self.progress {
            advance(pb, n);
        }
    }
}

/// The first offset of `partition` at or after `time_ms`, if any.
fn offset_at<C: ConsumerContext + 'static>(
    consumer: &impl Consumer<C>,
    topic: &str,
    partition: i32,
    time_ms: i64,
) -> Result<Option<i64>, KafkaSetupError> {
    let mut q = TopicPartitionList::new();
    q.add_partition_offset(topic, partition, Offset::Offset(time_ms)).expect("valid");
    let found = consumer
        .offsets_for_times(q, Duration::from_secs(10))
        .map_err(|source| KafkaSetupError::Client { what: "finding offsets for --from".into(), source })?;
    Ok(match found.find_partition(topic, partition).map(|e| e.offset()) {
        Some(Offset::Offset(o)) => Some(o),
        _ => None,
    })
}

/// The topic replay's progress bar over `total` messages, the estimate
/// [`kafka::assign_to_end`] makes from the end offsets (transaction markers
/// and compacted or early-reported ends make it differ from what is read):
/// shown as `~total`, and raised to what was read when that passes it
/// ([`advance`]); the rate in whole messages per second.
fn replay_progress(total: u64) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(total);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {human_pos}/~{human_len} events  {rate}  ETA {eta}")
            .expect("valid template")
            .with_key("rate", crate::metrics::progress_rate),
    );
    pb
}

/// Moves the progress bar on by `n` messages, raising its length to the
/// position if the estimate was short: never more done than the total.
fn advance(pb: &indicatif::ProgressBar, n: u64) {
    pb.inc(n);
    if pb.length().is_some_and(|len| pb.position() > len) {
        pb.set_length(pb.position());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_progress_never_shows_more_done_than_its_total() {
        // The end offsets promised 299,049 messages; 300,000 were read.
        let pb = replay_progress(299_049);
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        advance(&pb, 299_000);
        assert_eq!((pb.position(), pb.length()), (299_000, Some(299_049)));
        advance(&pb, 1_000);
        assert_eq!((pb.position(), pb.length()), (300_000, Some(300_000)));
    }
}
