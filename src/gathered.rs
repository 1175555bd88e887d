//! A batch of consumed Kafka messages copied into one buffer.
//!
//! `BorrowedMessage::detach` makes three heap allocations per message
//! (payload, key, topic name); keeping the borrowed messages instead pins
//! librdkafka's fetch buffers (whole fetch responses) until the batch is
//! written, which costs more memory than the messages themselves. A
//! [`Gathered`] batch copies each message's key and payload into one growing
//! buffer and keeps a fixed-size slot per message: no allocation per message
//! (headers aside, which gateway events do not carry), librdkafka's buffers
//! released as soon as each message is copied.

use crate::pipeline::InputMessage;
use rdkafka::message::Message;
use std::collections::BTreeSet;
use std::ops::Range;

/// Consumed messages, their bytes in one buffer.
#[derive(Debug, Default)]
pub struct Gathered {
    bytes: Vec<u8>,
    slots: Vec<Slot>,
    topics: Vec<String>,
}

#[derive(Debug)]
struct Slot {
    topic: u32,
    partition: i32,
    offset: i64,
    key: Option<Range<usize>>,
    payload: Option<Range<usize>>,
    headers: Vec<(String, Vec<u8>)>,
}

impl Gathered {
    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.slots.clear();
    }

    /// Copies `m` into the batch.
    pub fn push<M: Message>(&mut self, m: &M) {
        let topic = match self.topics.iter().rposition(|t| t == m.topic()) {
            Some(i) => i,
            None => {
                self.topics.push(m.topic().to_string());
                self.topics.len() - 1
            }
        };
        let key = m.key().map(|k| self.copy(k));
        let payload = m.payload().map(|p| self.copy(p));
        let headers = crate::kafka::owned_headers(m.headers());
        self.slots.push(Slot { topic: topic as u32, partition: m.partition(), offset: m.offset(), key, payload, headers });
    }

    fn copy(&mut self, b: &[u8]) -> Range<usize> {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(b);
        start..self.bytes.len()
    }

    /// Messages in the batch.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the batch holds no message.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Drops the messages of `partitions` (their bytes stay in the buffer
    /// until the batch is dropped). Returns how many were dropped.
    pub fn drop_partitions(&mut self, partitions: &BTreeSet<i32>) -> usize {
        if partitions.is_empty() {
            return 0;
        }
        let before = self.slots.len();
        self.slots.retain(|s| !partitions.contains(&s.partition));
        before - self.slots.len()
    }

    /// The messages, in the order they were pushed, as the pipeline reads them.
    pub fn inputs(&self) -> Vec<InputMessage<'_>> {
        self.slots
            .iter()
            .map(|s| InputMessage {
                topic: &self.topics[s.topic as usize],
                partition: s.partition,
                offset: s.offset,
                key: s.key.clone().map(|r| &self.bytes[r]),
                payload: s.payload.clone().map(|r| &self.bytes[r]),
                headers: s.headers.clone(),
            })
            .collect()
    }

    /// (partition, offset) of every message, in order.
    #[cfg(test)]
    fn positions(&self) -> Vec<(i32, i64)> {
        self.slots.iter().map(|s| (s.partition, s.offset)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
    use rdkafka::Timestamp;

    fn msg(topic: &str, partition: i32, offset: i64, key: Option<&[u8]>, payload: Option<&[u8]>) -> OwnedMessage {
        OwnedMessage::new(
            payload.map(<[u8]>::to_vec),
            key.map(<[u8]>::to_vec),
            topic.into(),
            Timestamp::NotAvailable,
            partition,
            offset,
            None,
        )
    }

    #[test]
    fn messages_read_back_as_pushed_tombstones_and_headers_included() {
        let mut g = Gathered::default();
        g.push(&msg("events", 3, 7, Some(b"k1"), Some(b"{\"a\":1}")));
        g.push(&msg("events", 1, 9, None, None));
        let with_headers = OwnedMessage::new(
            Some(b"x".to_vec()),
            Some(Vec::new()),
            "accounts".into(),
            Timestamp::NotAvailable,
            0,
            2,
            Some(OwnedHeaders::new().insert(Header { key: "trace", value: Some(b"t1".as_slice()) })),
        );
        g.push(&with_headers);
        let got: Vec<_> = g
            .inputs()
            .iter()
            .map(|m| {
                (m.topic.to_string(), m.partition, m.offset, m.key.map(<[u8]>::to_vec), m.payload.map(<[u8]>::to_vec), m.headers.clone())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("events".to_string(), 3, 7, Some(b"k1".to_vec()), Some(b"{\"a\":1}".to_vec()), vec![]),
                ("events".to_string(), 1, 9, None, None, vec![]),
                ("accounts".to_string(), 0, 2, Some(Vec::new()), Some(b"x".to_vec()), vec![("trace".to_string(), b"t1".to_vec())]),
            ]
        );
        assert_eq!((g.len(), g.topics.len()), (3, 2));
    }

    #[test]
    fn messages_gathered_before_a_revocation_are_dropped_later_ones_kept() {
        let mut g = Gathered::default();
        for (p, o) in [(0, 10), (1, 20), (0, 11), (2, 30)] {
            g.push(&msg("events", p, o, None, Some(format!("{p}/{o}").as_bytes())));
        }
        assert_eq!(g.drop_partitions(&BTreeSet::from([0])), 2);
        // Partition 0 comes back (eager rebalance): it restarts at the stored
        // offset 10, and what arrives now is kept.
        g.push(&msg("events", 0, 10, None, Some(b"0/10 again")));
        assert_eq!(g.drop_partitions(&BTreeSet::new()), 0);
        assert_eq!(g.positions(), [(1, 20), (2, 30), (0, 10)]);
        let payloads: Vec<&[u8]> = g.inputs().iter().map(|m| m.payload.unwrap()).collect();
        assert_eq!(payloads, [b"1/20".as_slice(), b"2/30", b"0/10 again"]);
    }
}
