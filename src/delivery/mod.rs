//! Delivery: how a staged step's records (dead letters, changelog records,
//! bills) are made durable downstream together with the input position.
//! One value per run, chosen once from the configuration; the drivers call
//! it without knowing which it is:
//!
//! - [`OutboxDelivery`] (`outbox.rs`): the records go into the outbox in the
//!   step's own write; a drain produces them with the idempotent producer
//!   and deletes what the broker acknowledged;
//! - [`TxnDelivery`] (`transactional.rs`, `kafka.transactions`): the records
//!   and the group offsets commit in one Kafka transaction, and only then is
//!   the step written (write after commit);
//! - [`FileDelivery`] (`file.rs`, `replay --output-file`): the records are
//!   appended to NDJSON files and synced, then the step is written.
//!
//! Every step goes through the pipeline's one protocol: stage
//! ([`Pipeline::stage`], [`Pipeline::stage_emission`]) -> a [`Staged`]
//! that this module applies or abandons.

mod file;
mod outbox;
mod position;
mod transactional;

pub use file::{base64, FileDelivery};
pub use outbox::OutboxDelivery;
pub use position::{group_offsets, GroupMetadata, InputPosition, Outcome};
pub use transactional::TxnDelivery;

use crate::driver::WorkerError;
use crate::pipeline::{Pipeline, Records, Staged};

/// The three ways of delivery.
pub enum Delivery {
    /// Through the outbox ([`OutboxDelivery`]).
    Outbox(OutboxDelivery),
    /// In Kafka transactions ([`TxnDelivery`]).
    Transactional(TxnDelivery),
    /// To NDJSON files ([`FileDelivery`]).
    File(FileDelivery),
}

/// What an emission delivered.
#[derive(Debug, Default)]
pub struct Emitted {
    /// Bill records delivered (or queued in the outbox).
    pub bills: u64,
    /// Records left in the outbox after it (a failing broker).
    pub failed: u64,
    /// Chunks whose transaction aborted (the emission stopped at the first).
    pub aborted: u64,
    /// A crash point was reached (tests).
    pub crashed: bool,
}

impl Delivery {
    /// How this delivery wants staged records: into the outbox, or handed
    /// over to deliver before the write.
    fn records(&self) -> Records {
        match self {
            Delivery::Outbox(_) => Records::Outbox,
            Delivery::Transactional(_) | Delivery::File(_) => Records::Captured,
        }
    }

    /// Stages what the pipeline has pending as this delivery wants it.
    pub fn stage<'p>(&self, pipeline: &'p mut Pipeline) -> Result<Staged<'p>, WorkerError> {
        Ok(pipeline.stage(self.records())?)
    }

    /// Makes a staged input batch durable with the input position.
    pub async fn commit_batch(&mut self, staged: Staged<'_>, at: &InputPosition<'_>) -> Result<Outcome, WorkerError> {
        match self {
            Delivery::Outbox(_) => Ok(Outcome::Committed(staged.apply()?)),
            Delivery::Transactional(t) => t.commit_batch(staged, at).await,
            Delivery::File(f) => f.commit(staged),
        }
    }

    /// Makes a staged emission chunk durable.
    async fn commit_emission(&mut self, staged: Staged<'_>, at: &InputPosition<'_>) -> Result<Outcome, WorkerError> {
        match self {
            Delivery::Outbox(_) => Ok(Outcome::Committed(staged.apply()?)),
            Delivery::Transactional(t) => t.commit_emission(staged, at).await,
            Delivery::File(f) => f.commit(staged),
        }
    }

    /// Emits the bills due ([`Pipeline::emission`]) a chunk at a time, each
    /// chunk one step; then [`Delivery::publish`]. A chunk not delivered
    /// ends the emission: its dirty marks stay for the next one.
    pub async fn emit(
        &mut self,
        pipeline: &mut Pipeline,
        now: i64,
        force_idle: bool,
        at: &InputPosition<'_>,
    ) -> Result<Emitted, WorkerError> {
        let mut out = Emitted::default();
        let mut plan = pipeline.emission(now, force_idle)?;
        while let Some(chunk) = pipeline.next_emission(&mut plan)? {
            let bills = chunk.records.len() as u64;
            let staged = pipeline.stage_emission(chunk, self.records())?;
            match self.commit_emission(staged, at).await? {
                Outcome::Committed(_) => out.bills += bills,
                Outcome::Aborted => {
                    out.aborted += 1;
                    break;
                }
                Outcome::Crashed => {
                    out.crashed = true;
                    return Ok(out);
                }
            }
        }
        out.failed = self.publish(pipeline).await?;
        Ok(out)
    }

    /// After a step: delivers what this delivery leaves in the outbox
    /// (the outbox delivery's records; nothing for the others, whose
    /// records went with their step). Returns the records that stay.
    pub async fn publish(&mut self, pipeline: &mut Pipeline) -> Result<u64, WorkerError> {
        match self {
            Delivery::Outbox(o) => Ok(o.drain(pipeline).await?),
            Delivery::Transactional(_) | Delivery::File(_) => Ok(0),
        }
    }

    /// Delivers everything in the outbox, whoever put it there (what the
    /// last stop left, the account records' dead letters, a file replay's
    /// dead letters): a page at a time. Returns the records that stay.
    pub async fn drain(&mut self, pipeline: &mut Pipeline) -> Result<u64, WorkerError> {
        match self {
            Delivery::Outbox(o) => Ok(o.drain(pipeline).await?),
            Delivery::Transactional(t) => t.drain(pipeline).await,
            Delivery::File(f) => f.drain(pipeline).await,
        }
    }
}
