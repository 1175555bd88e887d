//! What enters the pipeline and what a batch reports: plain data that
//! depends on nothing else in the crate, so the batch being built
//! (`batch.rs`) and the pipeline (`mod.rs`) both use it without importing
//! each other.

/// Header names on dead-letter messages.
pub mod headers {
    /// Reason code, e.g. `malformed_json`.
    pub const REASON: &str = "gatebill.reason";
    /// Human-readable detail.
    pub const DETAIL: &str = "gatebill.detail";
    /// Source topic.
    pub const SOURCE_TOPIC: &str = "gatebill.source.topic";
    /// Source partition (decimal).
    pub const SOURCE_PARTITION: &str = "gatebill.source.partition";
    /// Source offset (decimal).
    pub const SOURCE_OFFSET: &str = "gatebill.source.offset";
    /// On a dead letter cut to fit the producer's `message.max.bytes`:
    /// what was cut, comma-separated, of `payload`, `headers` (the
    /// original message's headers, dropped from the last) and `key`.
    pub const TRUNCATED: &str = "gatebill.truncated";
    /// On a cut dead letter: the original value's length in bytes (decimal).
    pub const ORIGINAL_LENGTH: &str = "gatebill.original.length";
    /// On a cut dead letter: the SHA-256 of the original value, 64
    /// lowercase hex digits.
    pub const ORIGINAL_SHA256: &str = "gatebill.original.sha256";
    /// Prefix given to an original header whose name starts with
    /// `gatebill.` (any case): carried as `original.gatebill.…`, so that
    /// no input can pose as a gatebill header on its dead letter.
    pub const CARRIED_PREFIX: &str = "original.";
}

/// One input message, borrowed from wherever it was read.
#[derive(Clone, Debug)]
pub struct InputMessage<'a> {
    /// Topic it was read from.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Message value (`None` for a tombstone).
    pub payload: Option<&'a [u8]>,
    /// Message headers, carried to the dead-letter topic.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What one batch did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Events added to usage.
    pub billed: u64,
    /// Messages sent to the dead-letter topic.
    pub rejected: u64,
    /// Repeated request_ids dropped.
    pub duplicates: u64,
    /// Messages skipped because their offset was already processed.
    pub already_processed: u64,
}
