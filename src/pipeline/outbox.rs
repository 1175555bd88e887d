//! The way out of the outbox: a paged drain any sink uses, and the
//! acknowledgement that deletes what was delivered unless it was replaced.
//! Functions of the store alone: the outbox is on disk, nothing of it is
//! kept in memory.

use crate::metrics::Metrics;
use crate::store::{OutboxRecord, Store, StoreError};

/// Outbox records handed to a sink at a time by a drain
/// ([`super::Pipeline::drain_outbox`]).
pub const OUTBOX_PAGE: usize = 4096;

/// What one drain ([`super::Pipeline::drain_outbox`]) did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Records handed to the sink.
    pub offered: u64,
    /// Records the sink did not deliver; they stay in the outbox.
    pub failed: u64,
}

/// Every record waiting to be produced.
pub fn outbox(store: &Store, metrics: &Metrics) -> Result<Vec<(Vec<u8>, OutboxRecord)>, StoreError> {
    let o = store.outbox()?;
    metrics.outbox_pending.set(o.len() as i64);
    Ok(o)
}

/// The one way out of the outbox: hands it to `deliver` a page of
/// [`OUTBOX_PAGE`] records at a time, in key order, and acknowledges the
/// records `deliver` returns as delivered ([`acknowledge`]). Memory stays
/// bounded by a page, however large the outbox. Returns the records
/// offered and those not delivered (they stay for a retry).
pub async fn drain<E, F, Fut>(store: &Store, metrics: &Metrics, mut deliver: F) -> Result<Drained, E>
where
    E: From<StoreError>,
    F: FnMut(Vec<(Vec<u8>, OutboxRecord)>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<(Vec<u8>, OutboxRecord)>, E>>,
{
    let mut after: Option<Vec<u8>> = None;
    let mut drained = Drained::default();
    loop {
        let page = store.outbox_page(after.as_deref(), OUTBOX_PAGE)?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let offered = page.len() as u64;
        let delivered = deliver(page).await?;
        drained.offered += offered;
        drained.failed += offered - delivered.len() as u64;
        acknowledge(store, &delivered)?;
        if drained.failed > 0 {
            // The sink is failing (a broker outage): leave the rest for
            // the next drain rather than wait out a timeout per page.
            break;
        }
    }
    metrics.outbox_pending.set(drained.failed as i64);
    Ok(drained)
}

/// Deletes delivered outbox records, unless a newer record replaced one
/// since it was read (then the newer one is still to be produced).
pub fn acknowledge(store: &Store, delivered: &[(Vec<u8>, OutboxRecord)]) -> Result<(), StoreError> {
    if delivered.is_empty() {
        return Ok(());
    }
    let mut batch = store.batch();
    let keys: Vec<&[u8]> = delivered.iter().map(|(k, _)| k.as_slice()).collect();
    let current = store.outbox_raw_many(&keys)?;
    for ((key, rec), current) in delivered.iter().zip(current) {
        // A bill's entry may have been replaced by a newer revision since
        // it was read; dead-letter keys are never reused.
        if key.first() == Some(&b'b') && current.as_deref().and_then(crate::store::decode_outbox).as_ref() != Some(rec) {
            continue;
        }
        batch.delete_outbox(key);
    }
    store.write(batch)
}
