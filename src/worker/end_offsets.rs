//! End offsets read by a thread of their own, so that the broker round
//! trips (seconds on a busy broker with many partitions) never stall the
//! processing loop: the input topic's (lag, and idleness needs them) and,
//! for a group member, the changelog's (what the rebalance callback notes
//! for partitions it gives up, [`super::rebalance`]).

use crate::kafka::KafkaSetupError;
use crate::metrics::{Health, Metrics};
use crate::pipeline::Pipeline;
use crate::store::Store;
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The latest end offsets, and the thread that reads them.
pub struct EndOffsets {
    latest: Arc<Mutex<HashMap<i32, i64>>>,
    stop: Arc<AtomicBool>,
    every: Duration,
    /// When the state size gauges were last refreshed.
    last_sizes: Option<Instant>,
}

/// End offsets by partition, shared between threads.
pub type SharedEnds = Arc<Mutex<BTreeMap<i32, i64>>>;

/// What the thread reads, and where it puts it.
pub struct Topics {
    /// The input topic.
    pub input: String,
    /// The changelog topic and where its ends go (a group member), or `None`.
    pub changelog: Option<(String, SharedEnds)>,
}

impl EndOffsets {
    /// Starts the thread: reads the ends at once, then every `every`.
    pub fn start(consumer: BaseConsumer, topics: Topics, every: Duration, health: Arc<Health>) -> Result<EndOffsets, KafkaSetupError> {
        let latest: Arc<Mutex<HashMap<i32, i64>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (l, st) = (latest.clone(), stop.clone());
        std::thread::Builder::new()
            .name("gatebill-lag".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let (n, read) = read_ends(&consumer, &topics.input, |p, high| {
                        l.lock().expect("not poisoned").insert(p, high);
                    });
                    health.end_offsets_tried(n > 0 && read == n);
                    if let Some((topic, ends)) = &topics.changelog {
                        read_ends(&consumer, topic, |p, high| {
                            ends.lock().expect("not poisoned").insert(p, high);
                        });
                    }
                    let until = Instant::now() + every;
                    while Instant::now() < until && !st.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(|e| KafkaSetupError::Thread(e.to_string()))?;
        Ok(EndOffsets { latest, stop, every, last_sizes: None })
    }

    /// Hands the latest end offsets to the pipeline, the lag gauges and
    /// the health; refreshes the state size gauges every period.
    pub fn refresh(&mut self, pipeline: &mut Pipeline, metrics: &Metrics, owned: &[i32], health: &Health, store: &Store) {
        self.report(pipeline, metrics, owned, health);
        if self.last_sizes.is_none_or(|t| t.elapsed() >= self.every) {
            self.last_sizes = Some(Instant::now());
            for (cf, bytes) in store.sizes() {
                metrics.state_bytes.with_label_values(&[cf]).set(bytes as i64);
            }
            for (kind, bytes) in store.memory() {
                metrics.rocksdb_memory.with_label_values(&[kind]).set(bytes as i64);
            }
        }
    }

    /// Hands the latest end offsets to the pipeline, the lag gauge, and
    /// the health (the lag of the partitions `owned`).
    fn report(&self, pipeline: &mut Pipeline, metrics: &Metrics, owned: &[i32], health: &Health) {
        let latest = self.latest.lock().expect("not poisoned").clone();
        let mut owned_lag = 0u64;
        for (p, high) in latest {
            pipeline.set_high_watermark(p, high);
            let next = pipeline.next_offset(p).unwrap_or(0);
            let lag = (high - next).max(0);
            metrics.partition_lag.with_label_values(&[&p.to_string()]).set(lag);
            if owned.contains(&p) {
                owned_lag += lag as u64;
            }
        }
        health.set_lag(owned_lag);
    }
}

/// Reads the end offset of every partition of `topic` into `put`; returns
/// the partitions there are and those read.
fn read_ends(consumer: &BaseConsumer, topic: &str, mut put: impl FnMut(i32, i64)) -> (i32, i32) {
    let n = crate::kafka::partition_counts(consumer, &[topic]).ok().and_then(|c| c.get(topic).copied()).unwrap_or(0);
    let mut read = 0;
    for p in 0..n {
        if let Ok((_, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(5)) {
            put(p, high);
            read += 1;
        }
    }
    (n, read)
}

impl Drop for EndOffsets {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
