//! The dead letter of a message: its original bytes, key and headers, plus
//! gatebill's headers (reason, detail, source). Two guarantees on top:
//!
//! * no input can pose as gatebill: an original header named `gatebill.…`
//!   (any case) is carried as `original.gatebill.…`;
//! * a dead letter always fits what the producer may send
//!   (`message.max.bytes`): one that would not is cut ([`fit`]) and says so
//!   (`gatebill.truncated`, with the original value's length and SHA-256),
//!   so that a message near the input's size limit never blocks its
//!   partition (a record the producer refuses aborts its transaction, and
//!   the batch would be read again forever).

use super::message::{headers, InputMessage};
use crate::billing::event::DecodeError;
use crate::store::OutboxRecord;
use sha2::{Digest, Sha256};

/// librdkafka's default `message.max.bytes`: the limit a dead letter is
/// cut to when `[kafka.properties]` sets none.
pub const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// Bytes librdkafka counts for a record besides its key, value and headers
/// (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`, 36, rounded up).
const RECORD_OVERHEAD: usize = 64;

/// Bytes librdkafka counts per header besides its name and value (two
/// length varints of at most 5 bytes).
const HEADER_OVERHEAD: usize = 10;

/// Room kept below `message.max.bytes` for framing the estimate above may
/// miss: 4 KiB, or a quarter of a (tiny) limit.
fn budget(message_max_bytes: usize) -> usize {
    message_max_bytes - (message_max_bytes / 4).min(4096)
}

/// The dead letter of `m`, rejected for `err`, for `topic`, cut to fit
/// `max_bytes` (the settings' `dead_letter_topic` and
/// `dead_letter_max_bytes`).
pub(super) fn dead_letter(topic: &str, max_bytes: usize, m: &InputMessage, err: &DecodeError) -> OutboxRecord {
    let mut h: Vec<(String, Vec<u8>)> = Vec::with_capacity(m.headers.len() + 8);
    h.extend(m.headers.iter().map(|(k, v)| (carried_name(k), v.clone())));
    let carried = h.len();
    h.push((headers::REASON.into(), err.reason.code().as_bytes().to_vec()));
    h.push((headers::DETAIL.into(), err.detail.as_bytes().to_vec()));
    h.push((headers::SOURCE_TOPIC.into(), m.topic.as_bytes().to_vec()));
    h.push((headers::SOURCE_PARTITION.into(), m.partition.to_string().into_bytes()));
    h.push((headers::SOURCE_OFFSET.into(), m.offset.to_string().into_bytes()));
    let mut record = OutboxRecord {
        topic: topic.to_string(),
        key: m.key.map(<[u8]>::to_vec),
        payload: m.payload.map(<[u8]>::to_vec).unwrap_or_default(),
        headers: h,
        partition: None,
    };
    fit(&mut record, carried, max_bytes);
    record
}

/// The name an original header is carried under: as is, or with
/// [`headers::CARRIED_PREFIX`] when it starts with `gatebill.` in any case.
pub fn carried_name(name: &str) -> String {
    let ours = name.get(..9).is_some_and(|p| p.eq_ignore_ascii_case("gatebill."));
    if ours {
        format!("{}{name}", headers::CARRIED_PREFIX)
    } else {
        name.to_string()
    }
}

/// The size librdkafka checks against `message.max.bytes`, estimated from
/// above.
pub fn wire_size(r: &OutboxRecord) -> usize {
    RECORD_OVERHEAD
        + r.key.as_ref().map_or(0, Vec::len)
        + r.payload.len()
        + r.headers.iter().map(|(k, v)| HEADER_OVERHEAD + k.len() + v.len()).sum::<usize>()
}

/// Cuts a dead letter whose [`wire_size`] is over the budget of
/// `message_max_bytes`; the first `carried` headers are the original
/// message's. What the original value was is kept in
/// [`headers::ORIGINAL_LENGTH`] and [`headers::ORIGINAL_SHA256`]; what was
/// cut in [`headers::TRUNCATED`]. In order, as far as needed: the original
/// headers from the last (only when the value cannot absorb the excess
/// alone), the tail of the value, the key, the tail of the detail.
pub fn fit(r: &mut OutboxRecord, mut carried: usize, message_max_bytes: usize) {
    let limit = budget(message_max_bytes);
    if wire_size(r) <= limit {
        return;
    }
    let digest = Sha256::digest(&r.payload);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    r.headers.push((headers::ORIGINAL_LENGTH.into(), r.payload.len().to_string().into_bytes()));
    r.headers.push((headers::ORIGINAL_SHA256.into(), hex.into_bytes()));
    // Sized with its longest value, set below.
    r.headers.push((headers::TRUNCATED.into(), b"headers,payload,key,detail".to_vec()));
    let mut cut: Vec<&str> = Vec::new();
    // The original headers go only if the value alone cannot make room.
    while carried > 0 && wire_size(r) - r.payload.len() > limit {
        carried -= 1;
        r.headers.remove(carried);
        if cut.is_empty() {
            cut.push("headers");
        }
    }
    let over = wire_size(r).saturating_sub(limit);
    if over > 0 && !r.payload.is_empty() {
        r.payload.truncate(r.payload.len().saturating_sub(over));
        cut.push("payload");
    }
    if wire_size(r) > limit && r.key.take().is_some() {
        cut.push("key");
    }
    let over = wire_size(r).saturating_sub(limit);
    if over > 0 {
        if let Some((_, detail)) = r.headers.iter_mut().find(|(k, _)| k == headers::DETAIL) {
            let text = String::from_utf8_lossy(detail).into_owned();
            let mut end = text.len().saturating_sub(over);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            *detail = text.as_bytes()[..end].to_vec();
            cut.push("detail");
        }
    }
    if let Some((_, v)) = r.headers.iter_mut().find(|(k, _)| k == headers::TRUNCATED) {
        *v = cut.join(",").into_bytes();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::event::RejectReason;

    fn header<'r>(r: &'r OutboxRecord, name: &str) -> Option<&'r str> {
        r.headers.iter().find(|(k, _)| k == name).map(|(_, v)| std::str::from_utf8(v).unwrap())
    }

    fn letter(max: usize, payload: &[u8], original: Vec<(String, Vec<u8>)>) -> OutboxRecord {
        let m = InputMessage { topic: "events", partition: 2, offset: 7, key: Some(b"acct"), payload: Some(payload), headers: original };
        dead_letter("dead", max, &m, &DecodeError::new(RejectReason::MalformedJson, "EOF while parsing"))
    }

    #[test]
    fn a_dead_letter_that_fits_is_the_original_with_our_headers() {
        let r = letter(DEFAULT_MESSAGE_MAX_BYTES, b"{", vec![("trace".into(), b"t".to_vec())]);
        assert_eq!((r.payload.as_slice(), r.key.as_deref()), (&b"{"[..], Some(&b"acct"[..])));
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["trace", "gatebill.reason", "gatebill.detail", "gatebill.source.topic", "gatebill.source.partition", "gatebill.source.offset"]
        );
    }

    #[test]
    fn original_headers_named_like_ours_are_carried_under_another_name() {
        let r = letter(
            DEFAULT_MESSAGE_MAX_BYTES,
            b"{",
            vec![
                ("gatebill.reason".into(), b"fake".to_vec()),
                ("GateBill.Detail".into(), b"x".to_vec()),
                ("gatebillx".into(), b"y".to_vec()),
            ],
        );
        let reasons: Vec<&str> =
            r.headers.iter().filter(|(k, _)| k == "gatebill.reason").map(|(_, v)| std::str::from_utf8(v).unwrap()).collect();
        assert_eq!(reasons, ["malformed_json"]);
        assert_eq!(header(&r, "original.gatebill.reason"), Some("fake"));
        assert_eq!(header(&r, "original.GateBill.Detail"), Some("x"));
        assert_eq!(header(&r, "gatebillx"), Some("y"));
    }

    #[test]
    fn a_dead_letter_over_the_limit_keeps_what_fits_and_says_so() {
        let payload = vec![b'x'; 1_100_000];
        let r = letter(DEFAULT_MESSAGE_MAX_BYTES, &payload, vec![("trace".into(), b"t".to_vec())]);
        assert!(wire_size(&r) <= DEFAULT_MESSAGE_MAX_BYTES - 4096, "{}", wire_size(&r));
        assert!(r.payload.len() > 990_000 && payload.starts_with(&r.payload), "{}", r.payload.len());
        assert_eq!(header(&r, "gatebill.truncated"), Some("payload"));
        assert_eq!(header(&r, "gatebill.original.length"), Some("1100000"));
        let sha: String = Sha256::digest(&payload).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(header(&r, "gatebill.original.sha256"), Some(sha.as_str()));
        assert_eq!((header(&r, "trace"), r.key.as_deref()), (Some("t"), Some(&b"acct"[..])));
    }

    #[test]
    fn original_headers_too_large_for_any_value_are_dropped_from_the_last() {
        let big = vec![b'h'; 600_000];
        let r = letter(DEFAULT_MESSAGE_MAX_BYTES, b"{\"a\":1", vec![("first".into(), big.clone()), ("second".into(), big)]);
        assert_eq!(header(&r, "gatebill.truncated"), Some("headers"));
        assert_eq!((r.payload.as_slice(), header(&r, "second")), (&b"{\"a\":1"[..], None));
        assert_eq!(header(&r, "first").map(str::len), Some(600_000));
        assert!(wire_size(&r) <= DEFAULT_MESSAGE_MAX_BYTES - 4096);
    }

    #[test]
    fn a_tiny_limit_cuts_down_to_the_detail() {
        let r = letter(1_000, &[b'x'; 2_000], vec![("h".into(), vec![0; 500])]);
        assert_eq!(header(&r, "gatebill.truncated"), Some("headers,payload"));
        assert!(wire_size(&r) <= 750, "{}", wire_size(&r));
        assert_eq!((r.payload.len(), r.key.as_deref()), (750 - (wire_size(&r) - r.payload.len()) - 11, Some(&b"acct"[..])));
        assert_eq!(header(&r, "gatebill.reason"), Some("malformed_json"));
    }
}
