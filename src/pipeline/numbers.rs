//! The numbers of the records the pipeline puts in the outbox under keys
//! of its own ([`OutboxNumbers`]): dead letters, numbered apart per shard
//! of a split pipeline, and changelog records, each with the input
//! position it was written at. Bills are keyed by account and month
//! instead (`emit.rs`).

use super::context::{Context, Settings, Shard};
use super::dead_letter;
use super::message::InputMessage;
use crate::billing::event::DecodeError;
use crate::changelog::Change;
use crate::store::{outbox_changelog_key, outbox_dead_letter_key, Batch, OutboxRecord, Store, StoreError};

/// The next numbers of the dead letters and changelog records in the outbox.
pub struct OutboxNumbers {
    /// The next dead letter's number; a shard's advance by the shard count
    /// ([`Context::shard`]), so shards sharing a store never reuse one.
    next_dead_letter: u64,
    /// Next sequence number of changelog records in the outbox.
    next_changelog: u64,
}

impl OutboxNumbers {
    /// The numbers following those in the store; a shard's first dead
    /// letter is the next number that is its index modulo the shard count.
    pub fn load(store: &Store, shard: Option<Shard>) -> Result<OutboxNumbers, StoreError> {
        let mut next_dead_letter = store.next_dead_letter_seq()?;
        if let Some(s) = shard {
            let (index, count) = (u64::from(s.index), u64::from(s.count));
            next_dead_letter += (index + count - next_dead_letter % count) % count;
        }
        Ok(OutboxNumbers { next_dead_letter, next_changelog: store.next_outbox_seq(b'c')? })
    }

    /// After the shards of a split wrote their dead letters: this pipeline
    /// (no longer split) goes on after them.
    pub fn rejoined(&mut self, store: &Store) -> Result<(), StoreError> {
        self.next_dead_letter = store.next_dead_letter_seq()?;
        Ok(())
    }

    /// A dead letter for a message, with its outbox key; counted in the
    /// metrics by reason.
    pub fn dead_letter(&mut self, cx: &Context, m: &InputMessage, err: &DecodeError) -> (Vec<u8>, OutboxRecord) {
        let key = outbox_dead_letter_key(self.next_dead_letter);
        self.next_dead_letter += cx.shard.map_or(1, |s| u64::from(s.count));
        cx.metrics.rejected.with_label_values(&[err.reason.code()]).inc();
        let s = &cx.settings;
        (key, dead_letter::dead_letter(&s.dead_letter_topic, s.dead_letter_max_bytes, m, err))
    }

    /// Queues a changelog record for input partition `partition` in `batch`
    /// (nothing without a changelog topic).
    pub fn put_change(&mut self, settings: &Settings, batch: &mut Batch<'_>, partition: i32, next_offset: i64, change: Change) {
        let Some(topic) = &settings.changelog_topic else { return };
        let gone = matches!(change, Change::Gone { .. });
        let (key, payload) = change.into_encoded();
        let mut headers = vec![(crate::changelog::NEXT_OFFSET.into(), next_offset.to_string().into_bytes())];
        if gone {
            headers.push((crate::changelog::TOMBSTONE.into(), Vec::new()));
        }
        let record = OutboxRecord { topic: topic.clone(), key: Some(key), payload, headers, partition: Some(partition) };
        batch.put_outbox(&outbox_changelog_key(self.next_changelog), record);
        self.next_changelog += 1;
    }
}
