//! The way out of the outbox: a paged drain any sink uses, and the
//! acknowledgement that deletes what was delivered unless it was replaced.

use super::{Drained, Pipeline, OUTBOX_PAGE};
use crate::store::{OutboxRecord, StoreError};

impl Pipeline {
    /// Every record waiting to be produced.
    pub fn outbox(&self) -> Result<Vec<(Vec<u8>, OutboxRecord)>, StoreError> {
        let o = self.store.outbox()?;
        self.metrics.outbox_pending.set(o.len() as i64);
        Ok(o)
    }

    /// The one way out of the outbox: hands it to `deliver` a page of
    /// [`OUTBOX_PAGE`] records at a time, in key order, and acknowledges the
    /// records `deliver` returns as delivered ([`Pipeline::acknowledge`]).
    /// Memory stays bounded by a page, however large the outbox. Returns
    /// the records offered and those not delivered (they stay for a retry).
    pub async fn drain_outbox<E, F, Fut>(&mut self, mut deliver: F) -> Result<Drained, E>
    where
        E: From<StoreError>,
        F: FnMut(Vec<(Vec<u8>, OutboxRecord)>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<(Vec<u8>, OutboxRecord)>, E>>,
    {
        let mut after: Option<Vec<u8>> = None;
        let mut drained = Drained::default();
        loop {
            let page = self.store.outbox_page(after.as_deref(), OUTBOX_PAGE)?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            let offered = page.len() as u64;
            let delivered = deliver(page).await?;
            drained.offered += offered;
            drained.failed += offered - delivered.len() as u64;
            self.acknowledge(&delivered)?;
            if drained.failed > 0 {
                // The sink is failing (a broker outage): leave the rest for
                // the next drain rather than wait out a timeout per page.
                break;
            }
        }
        self.metrics.outbox_pending.set(drained.failed as i64);
        Ok(drained)
    }

    /// Deletes delivered outbox records, unless a newer record replaced one
    /// since it was read (then the newer one is still to be produced).
    pub fn acknowledge(&mut self, delivered: &[(Vec<u8>, OutboxRecord)]) -> Result<(), StoreError> {
        if delivered.is_empty() {
            return Ok(());
        }
        let mut batch = self.store.batch();
        let keys: Vec<&[u8]> = delivered.iter().map(|(k, _)| k.as_slice()).collect();
        let current = self.store.outbox_raw_many(&keys)?;
        for ((key, rec), current) in delivered.iter().zip(current) {
            // A bill's entry may have been replaced by a newer revision since
            // it was read; dead-letter keys are never reused.
            if key.first() == Some(&b'b') && current.as_deref().and_then(crate::store::decode_outbox).as_ref() != Some(rec) {
                continue;
            }
            batch.delete_outbox(key);
        }
        self.store.write(batch)
    }
}
