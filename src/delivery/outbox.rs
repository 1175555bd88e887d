//! Delivery through the outbox: a step's records are written into the
//! outbox with its state, in one write; a drain produces them with the
//! idempotent producer and deletes what the broker acknowledged. A crash
//! between the two produces them again at the next start.

use super::position::count_produced;
use crate::kafka;
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::store::StoreError;
use rdkafka::producer::FutureProducer;
use std::sync::Arc;
use std::time::Instant;

/// The idempotent producer that drains the outbox.
pub struct OutboxDelivery {
    producer: FutureProducer,
    metrics: Arc<Metrics>,
}

impl OutboxDelivery {
    /// Drains the outbox through `producer`.
    pub fn new(producer: FutureProducer, metrics: Arc<Metrics>) -> Self {
        OutboxDelivery { producer, metrics }
    }

    /// Produces the outbox; returns how many records failed and stay in it.
    pub(super) async fn drain(&self, pipeline: &mut Pipeline) -> Result<u64, StoreError> {
        let t = Instant::now();
        let (producer, metrics) = (&self.producer, &*self.metrics);
        let drained = pipeline
            .drain_outbox(|page| async move {
                let delivered = kafka::produce_all(producer, &page).await;
                count_produced(metrics, delivered.iter().map(|(_, r)| r));
                Ok::<_, StoreError>(delivered)
            })
            .await?;
        if drained.offered > 0 {
            metrics.produce_seconds.observe(t.elapsed().as_secs_f64());
        }
        Ok(drained.failed)
    }
}
