//! The access-event wire format (spec section 10) and its decoder.
//!
//! `decode_event` turns message bytes into a validated [`AccessEvent`] or a
//! [`DecodeError`] whose [`RejectReason`] code is what the worker writes on
//! the dead-letter message. It never panics, whatever the bytes.

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// Largest byte count accepted on an event (exclusive): 2^53.
pub const MAX_BYTE_COUNT: u64 = 1 << 53;
/// Earliest accepted event time: 1970-01-01T00:00:00Z, in epoch ms.
pub const MIN_TIME_MS: i64 = 0;
/// First instant after the latest accepted event time: 10000-01-01T00:00:00Z.
pub const MAX_TIME_MS: i64 = 253_402_300_800_000;

/// Why a message was rejected. The `code` is stable: operators filter the
/// dead-letter topic on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Not UTF-8, not JSON, truncated, or nested too deeply.
    MalformedJson,
    /// A required field is absent or `null`.
    MissingField,
    /// A field has the wrong type or a value outside its domain.
    InvalidValue,
    /// A backend path the rule book does not define (spec section 2).
    UnsupportedTrafficPath,
    /// The message key is not the event's `account_id` (events must be keyed
    /// by account so that one account's events, and their duplicates, share a
    /// partition).
    KeyMismatch,
    /// The event time is further ahead of the wall clock than
    /// `worker.max_future_secs`: not trusted, so it moves no watermark,
    /// closes no month and prunes no dedupe state.
    FutureTime,
    /// An account record was applied without one or more of its resource
    /// packs, which are invalid; the detail names each one. The dead letter is
    /// a copy of the record: the rest of it (activation, valid packs) applies.
    InvalidResourcePack,
    /// A repeated `request_id` whose billed content (time, account, region,
    /// metered bytes and classification) differs from the copy already
    /// counted: an input error, not a retry. The first copy stays counted.
    ConflictingDuplicate,
    /// A tombstone (null value) on the accounts topic: it does not delete
    /// billing history, so it is not applied and the account's last record
    /// stays in force (rule book section 8).
    AccountTombstone,
    /// An account record was applied without one or more of its pricing
    /// terms (rule book section 11.3), which are invalid or overlap another
    /// term of the same kind; the detail names each one. The rest of the
    /// record applies.
    InvalidPricing,
}

impl RejectReason {
    /// Every reason, for metrics and documentation.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::MalformedJson,
        RejectReason::MissingField,
        RejectReason::InvalidValue,
        RejectReason::UnsupportedTrafficPath,
        RejectReason::KeyMismatch,
        RejectReason::FutureTime,
        RejectReason::InvalidResourcePack,
        RejectReason::ConflictingDuplicate,
        RejectReason::AccountTombstone,
        RejectReason::InvalidPricing,
    ];

    /// The stable reason code written to dead-letter headers.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::MalformedJson => "malformed_json",
            RejectReason::MissingField => "missing_field",
            RejectReason::InvalidValue => "invalid_value",
            RejectReason::UnsupportedTrafficPath => "unsupported_traffic_path",
            RejectReason::KeyMismatch => "key_mismatch",
            RejectReason::FutureTime => "future_time",
            RejectReason::InvalidResourcePack => "invalid_resource_pack",
            RejectReason::ConflictingDuplicate => "conflicting_duplicate",
            RejectReason::AccountTombstone => "account_tombstone",
            RejectReason::InvalidPricing => "invalid_pricing",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A message that cannot be billed, with a reason code and a human detail.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct DecodeError {
    /// The machine-readable reason.
    pub reason: RejectReason,
    /// What exactly is wrong, for the person reading the dead-letter topic.
    pub detail: String,
}

impl DecodeError {
    /// Builds an error.
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        DecodeError { reason, detail: detail.into() }
    }
}

/// Parses typed JSON, mapping errors to reason codes. A syntax error from the
/// typed parse of well-formed JSON (serde_json reports some type mismatches,
/// and its recursion limit, as syntax) is an `invalid_value`, not
/// `malformed_json`.
pub(crate) fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(bytes).map_err(|err| {
        let mut e = from_serde(err);
        if e.reason == RejectReason::MalformedJson && serde_json::from_slice::<de::IgnoredAny>(bytes).is_ok() {
            e.reason = RejectReason::InvalidValue;
        }
        e
    })
}

/// Maps a serde_json error to a reason code.
pub(crate) fn from_serde(err: serde_json::Error) -> DecodeError {
    use serde_json::error::Category;
    // serde quotes offending values; a 1 MB string must not become a 1 MB header.
    let detail = truncate(&err.to_string(), 300);
    let reason = match err.classify() {
        Category::Io | Category::Syntax | Category::Eof => RejectReason::MalformedJson,
        Category::Data if detail.starts_with("missing field") || detail.starts_with("invalid type: null") => RejectReason::MissingField,
        Category::Data => RejectReason::InvalidValue,
    };
    DecodeError { reason, detail }
}

/// Public or private network.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The public internet.
    Public,
    /// The cloud's private network.
    Private,
}

/// The backend an event was forwarded to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// An HTTP service.
    Http {
        /// Region of the backend when it is inside the cloud.
        region: Option<String>,
        /// Whether the backend is inside the cloud.
        in_cloud: bool,
        /// Whether the gateway reached it at a public or a private address.
        address: Network,
        /// Gateway to backend (outbound) bytes.
        request_bytes: u64,
        /// Backend to gateway (inbound) bytes.
        response_bytes: u64,
    },
    /// A serverless cloud function.
    Scf {
        /// Region of the function.
        region: String,
        /// Gateway to function (outbound) bytes.
        request_bytes: u64,
        /// Function to gateway (inbound) bytes.
        response_bytes: u64,
    },
    /// A mock backend: no backend leg.
    Mock,
}

/// One validated access event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEvent {
    /// Unique per request; the dedupe key.
    pub request_id: String,
    /// The billed account.
    pub account_id: String,
    /// Region of the API service (the gateway region).
    pub region: String,
    /// Event time, UTC epoch milliseconds.
    pub time_ms: i64,
    /// How the client reached the gateway.
    pub client_network: Network,
    /// Rejected by the gateway itself: not billable.
    pub frontend_error: bool,
    /// Client to gateway (inbound) bytes.
    pub request_bytes: u64,
    /// Gateway to client (outbound) bytes.
    pub response_bytes: u64,
    /// Where the request was forwarded.
    pub backend: Backend,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow)]
    request_id: Cow<'a, str>,
    #[serde(borrow)]
    account_id: Cow<'a, str>,
    #[serde(borrow)]
    region: Cow<'a, str>,
    time: EventTime,
    #[serde(default)]
    client_network: Option<Network>,
    #[serde(default)]
    frontend_error: Option<bool>,
    request_bytes: u64,
    response_bytes: u64,
    #[serde(borrow)]
    backend: RawBackend<'a>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendType {
    Http,
    Scf,
    Mock,
}

#[derive(Deserialize)]
struct RawBackend<'a> {
    #[serde(rename = "type", default)]
    kind: Option<BackendType>,
    #[serde(borrow, default)]
    region: Option<Loose<'a>>,
    #[serde(borrow, default)]
    in_cloud: Option<Loose<'a>>,
    #[serde(borrow, default)]
    address: Option<Loose<'a>>,
    #[serde(default)]
    request_bytes: Option<u64>,
    #[serde(default)]
    response_bytes: Option<u64>,
}

/// A backend field that applies to some backend types only (spec section 10:
/// `in_cloud` and `address` to `http`, `region` to `http` inside the cloud
/// and to `scf`). Its type is checked where it applies; elsewhere any value
/// is ignored, like an unknown field.
enum Loose<'a> {
    Str(Cow<'a, str>),
    Bool(bool),
    /// A number, an array or an object: what it was, for the error detail.
    Other(&'static str),
}

impl<'de: 'a, 'a> Deserialize<'de> for Loose<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<Loose<'a>>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Loose<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Loose<'a>, E> {
                Ok(Loose::Str(Cow::Owned(s)))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Loose<'a>, E> {
                Ok(Loose::Bool(v))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Loose<'a>, E> {
                Ok(Loose::Other("a number"))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Loose<'a>, E> {
                Ok(Loose::Other("a number"))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Loose<'a>, E> {
                Ok(Loose::Other("a number"))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose<'a>, E> {
                Ok(Loose::Other("null"))
            }
            // Contents are skipped without recursion (serde_json's `ignore_value`).
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Loose<'a>, A::Error> {
                while seq.next_element::<de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an array"))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Loose<'a>, A::Error> {
                while map.next_entry::<de::IgnoredAny, de::IgnoredAny>()?.is_some() {}
                Ok(Loose::Other("an object"))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'a> Loose<'a> {
    fn describe(&self) -> String {
        match self {
            Loose::Str(s) => format!("the string `{}`", truncate(s, 64)),
            Loose::Bool(b) => format!("`{b}`"),
            Loose::Other(what) => (*what).to_string(),
        }
    }

    fn bad(&self, field: &str, expected: &str) -> DecodeError {
        DecodeError::new(RejectReason::InvalidValue, format!("`backend.{field}` must be {expected}, got {}", self.describe()))
    }

    fn string(self, field: &str) -> Result<Cow<'a, str>, DecodeError> {
        match self {
            Loose::Str(s) => Ok(s),
            other => Err(other.bad(field, "a string")),
        }
    }

    fn boolean(self, field: &str) -> Result<bool, DecodeError> {
        match self {
            Loose::Bool(b) => Ok(b),
            other => Err(other.bad(field, "true or false")),
        }
    }

    fn network(self, field: &str) -> Result<Network, DecodeError> {
        match &self {
            Loose::Str(s) if s == "public" => Ok(Network::Public),
            Loose::Str(s) if s == "private" => Ok(Network::Private),
            _ => Err(self.bad(field, "`public` or `private`")),
        }
    }
}

/// An event time: RFC 3339 with an offset, or integer epoch milliseconds.
pub(crate) struct EventTime(pub i64);

impl<'de> Deserialize<'de> for EventTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = EventTime;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 time with offset or integer epoch milliseconds")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<EventTime, E> {
                let ms =
                    rfc3339_millis(s).map_err(|e| E::custom(format!("time `{}` is not RFC 3339 with an offset: {e}", truncate(s, 64))))?;
                check_time(ms)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<EventTime, E> {
                check_time(v)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<EventTime, E> {
                check_time(i64::try_from(v).unwrap_or(i64::MAX))
            }
        }
        d.deserialize_any(V)
    }
}

/// UTC epoch milliseconds of an RFC 3339 time with an offset.
///
/// A leap second (`23:59:60`) belongs to the second, minute, day and month it
/// names. chrono reads it as `23:59:59` with a nanosecond field of 1e9 or
/// more, which `timestamp_millis` would carry into the next second (and, at
/// a month's end, the next month); here it is clamped to `23:59:59.999`.
pub fn rfc3339_millis(s: &str) -> Result<i64, chrono::ParseError> {
    let t = chrono::DateTime::parse_from_rfc3339(s)?;
    Ok(t.timestamp() * 1000 + i64::from(t.timestamp_subsec_millis().min(999)))
}

fn check_time<E: de::Error>(ms: i64) -> Result<EventTime, E> {
    if (MIN_TIME_MS..MAX_TIME_MS).contains(&ms) {
        Ok(EventTime(ms))
    } else {
        Err(E::custom(format!("time {ms} ms is outside 1970-01-01..9999-12-31")))
    }
}

/// Shortens a string for an error message.
pub fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

fn check_bytes(field: &str, v: u64) -> Result<u64, DecodeError> {
    if v < MAX_BYTE_COUNT {
        Ok(v)
    } else {
        Err(DecodeError::new(RejectReason::InvalidValue, format!("`{field}` = {v} is not below 2^53")))
    }
}

fn check_id(field: &str, v: &str) -> Result<(), DecodeError> {
    if v.is_empty() {
        Err(DecodeError::new(RejectReason::InvalidValue, format!("`{field}` is empty")))
    } else if v.len() > 256 {
        Err(DecodeError::new(RejectReason::InvalidValue, format!("`{field}` is longer than 256 bytes ({})", v.len())))
    } else {
        Ok(())
    }
}

/// A backend byte count that the backend type requires.
fn leg_bytes(field: &str, v: Option<u64>, kind: &str) -> Result<u64, DecodeError> {
    let v = required(v, &format!("`backend.{field}` is required for an {kind} backend"))?;
    check_bytes(&format!("backend.{field}"), v)
}

fn required<T>(v: Option<T>, what: &str) -> Result<T, DecodeError> {
    v.ok_or_else(|| DecodeError::new(RejectReason::MissingField, what.to_string()))
}

/// Rejects a message that is valid JSON but not an object (`null`, `[]`, `7`)
/// as `invalid_value`, so that `missing_field` always means a real field.
pub(crate) fn check_object(bytes: &[u8]) -> Result<(), DecodeError> {
    // Not UTF-8 is `malformed_json` wherever the bad bytes are (the JSON
    // parser would call bytes inside a string a syntax error, but skip them
    // in an unknown field's value).
    if let Err(e) = std::str::from_utf8(bytes) {
        let at = e.valid_up_to();
        return Err(DecodeError::new(
            RejectReason::MalformedJson,
            format!(
                "the message is not UTF-8: byte 0x{:02x} at offset {at} does not continue a UTF-8 sequence; messages must be UTF-8 JSON",
                bytes[at]
            ),
        ));
    }
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => Ok(()),
        _ => match serde_json::from_slice::<de::IgnoredAny>(bytes) {
            Ok(_) => Err(DecodeError::new(RejectReason::InvalidValue, "the message is JSON but not an object")),
            Err(e) => Err(from_serde(e)),
        },
    }
}

/// Decodes and validates one access event from message bytes.
pub fn decode_event(bytes: &[u8]) -> Result<AccessEvent, DecodeError> {
    check_object(bytes)?;
    let raw: RawEvent = parse(bytes)?;
    let client_network = required(raw.client_network, "`client_network` is required (public or private)")?;
    check_id("request_id", &raw.request_id)?;
    check_id("account_id", &raw.account_id)?;
    check_id("region", &raw.region)?;
    let request_bytes = check_bytes("request_bytes", raw.request_bytes)?;
    let response_bytes = check_bytes("response_bytes", raw.response_bytes)?;
    let b = raw.backend;
    // Fields that do not apply to the backend type (`region` on an http
    // backend outside the cloud; `in_cloud` and `address` on scf; all
    // three on mock) are ignored, whatever their value.
    let backend = match required(b.kind, "`backend.type` is required (http, scf or mock)")? {
        BackendType::Mock => {
            for (name, v) in [("backend.request_bytes", b.request_bytes), ("backend.response_bytes", b.response_bytes)] {
                if v.unwrap_or(0) != 0 {
                    return Err(DecodeError::new(
                        RejectReason::InvalidValue,
                        format!("`{name}` must be 0 for a mock backend, got {}", v.unwrap_or(0)),
                    ));
                }
            }
            Backend::Mock
        }
        BackendType::Http => {
            let in_cloud = required(b.in_cloud, "`backend.in_cloud` is required for an http backend")?.boolean("in_cloud")?;
            let address = required(b.address, "`backend.address` is required for an http backend")?.network("address")?;
            let region = if in_cloud {
                let r = required(b.region, "`backend.region` is required for an http backend inside the cloud")?.string("region")?;
                check_id("backend.region", &r)?;
                Some(r.into_owned())
            } else {
                None
            };
            Backend::Http {
                region,
                in_cloud,
                address,
                request_bytes: leg_bytes("request_bytes", b.request_bytes, "http")?,
                response_bytes: leg_bytes("response_bytes", b.response_bytes, "http")?,
            }
        }
        BackendType::Scf => {
            let region = required(b.region, "`backend.region` is required for an scf backend")?.string("region")?;
            check_id("backend.region", &region)?;
            Backend::Scf {
                region: region.into_owned(),
                request_bytes: leg_bytes("request_bytes", b.request_bytes, "scf")?,
                response_bytes: leg_bytes("response_bytes", b.response_bytes, "scf")?,
            }
        }
    };
    Ok(AccessEvent {
        request_id: raw.request_id.into_owned(),
        account_id: raw.account_id.into_owned(),
        region: raw.region.into_owned(),
        time_ms: raw.time.0,
        client_network,
        frontend_error: raw.frontend_error.unwrap_or(false),
        request_bytes,
        response_bytes,
        backend,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SPEC_EVENT: &str = r#"{
      "request_id": "c0a8011e-5f7d-4b7e-9d1a-3f0e6c1a2b3c",
      "account_id": "1250000001",
      "service_id": "service-8xk2ab",
      "api_id": "api-41d9qz",
      "region": "ap-guangzhou",
      "time": "2020-11-05T10:15:30.123+08:00",
      "client_network": "public",
      "frontend_error": false,
      "status": 200,
      "request_bytes": 512,
      "response_bytes": 10000,
      "backend": {"type": "http", "region": "ap-guangzhou", "in_cloud": true,
                  "address": "private", "request_bytes": 2000, "response_bytes": 9000}
    }"#;

    fn reason(s: &str) -> RejectReason {
        decode_event(s.as_bytes()).unwrap_err().reason
    }

    #[test]
    fn decodes_the_spec_example() {
        let e = decode_event(SPEC_EVENT.as_bytes()).unwrap();
        assert_eq!(e.account_id, "1250000001");
        assert_eq!(e.time_ms, 1_604_542_530_123);
        assert_eq!(e.response_bytes, 10000);
        assert!(matches!(e.backend, Backend::Http { in_cloud: true, address: Network::Private, request_bytes: 2000, .. }));
    }

    #[test]
    fn epoch_millis_time_and_unknown_fields() {
        let s = SPEC_EVENT
            .replace("\"2020-11-05T10:15:30.123+08:00\"", "1604542530123")
            .replace("\"status\": 200", "\"status\": 200, \"new\": {\"x\": [1,2]}");
        assert_eq!(decode_event(s.as_bytes()).unwrap().time_ms, 1_604_542_530_123);
    }

    #[test]
    fn reason_codes() {
        assert_eq!(reason("{"), RejectReason::MalformedJson);
        assert_eq!(reason("\u{0}\u{1}"), RejectReason::MalformedJson);
        assert_eq!(reason(&SPEC_EVENT.replace("\"account_id\": \"1250000001\",", "")), RejectReason::MissingField);
        assert_eq!(reason(&SPEC_EVENT.replace("\"1250000001\"", "null")), RejectReason::MissingField);
        assert_eq!(reason(&SPEC_EVENT.replace("\"request_bytes\": 512", "\"request_bytes\": -1")), RejectReason::InvalidValue);
        assert_eq!(reason(&SPEC_EVENT.replace("\"request_bytes\": 512", "\"request_bytes\": 1.5")), RejectReason::InvalidValue);
        assert_eq!(
            reason(&SPEC_EVENT.replace("\"request_bytes\": 512", "\"request_bytes\": 99999999999999999999999")),
            RejectReason::InvalidValue
        );
        assert_eq!(
            reason(&SPEC_EVENT.replace("\"request_bytes\": 512", "\"request_bytes\": 9007199254740992")),
            RejectReason::InvalidValue
        );
        assert_eq!(reason(&SPEC_EVENT.replace("2020-11-05T10:15:30.123+08:00", "2020-11-05 10:15")), RejectReason::InvalidValue);
        assert_eq!(reason(&SPEC_EVENT.replace("\"2020-11-05T10:15:30.123+08:00\"", "-5")), RejectReason::InvalidValue);
        assert_eq!(reason(&SPEC_EVENT.replace("\"public\"", "\"intranet\"")), RejectReason::InvalidValue);
        assert_eq!(reason(&SPEC_EVENT.replace("\"in_cloud\": true,", "")), RejectReason::MissingField);
    }

    #[test]
    fn a_leap_second_stays_in_the_second_it_names() {
        let at = |t: &str| decode_event(SPEC_EVENT.replace("2020-11-05T10:15:30.123+08:00", t).as_bytes()).unwrap().time_ms;
        // 2020-11-30T23:59:59.999+08:00, not 2020-12-01T00:00:00+08:00.
        assert_eq!(at("2020-11-30T23:59:60+08:00"), 1_606_751_999_999);
        assert_eq!(at("2020-11-30T23:59:60.5+08:00"), 1_606_751_999_999);
        assert_eq!(at("2020-11-30T23:59:59.5+08:00"), 1_606_751_999_500);
        assert_eq!(rfc3339_millis("2020-11-30T23:59:60.999999+08:00"), Ok(1_606_751_999_999));
    }

    #[test]
    fn backend_fields_that_do_not_apply_are_ignored() {
        let backend = |b: &str| {
            let s = SPEC_EVENT.replacen(
                r#"{"type": "http", "region": "ap-guangzhou", "in_cloud": true,
                  "address": "private", "request_bytes": 2000, "response_bytes": 9000}"#,
                b,
                1,
            );
            assert_ne!(s, SPEC_EVENT);
            decode_event(s.as_bytes())
        };
        let scf = backend(
            r#"{"type": "scf", "region": "ap-beijing", "address": "n/a", "in_cloud": "x", "request_bytes": 7, "response_bytes": 8}"#,
        );
        assert_eq!(scf.unwrap().backend, Backend::Scf { region: "ap-beijing".into(), request_bytes: 7, response_bytes: 8 });
        let out =
            backend(r#"{"type": "http", "region": 5, "in_cloud": false, "address": "public", "request_bytes": 7, "response_bytes": 8}"#);
        assert_eq!(
            out.unwrap().backend,
            Backend::Http { region: None, in_cloud: false, address: Network::Public, request_bytes: 7, response_bytes: 8 }
        );
        let mock = backend(r#"{"type": "mock", "region": [1, {"a": 2}], "in_cloud": 3, "address": {"x": null}}"#);
        assert_eq!(mock.unwrap().backend, Backend::Mock);
        // Where a field applies, its type is still checked.
        for b in [
            r#"{"type": "http", "region": 5, "in_cloud": true, "address": "public", "request_bytes": 7, "response_bytes": 8}"#,
            r#"{"type": "http", "in_cloud": "x", "address": "public", "request_bytes": 7, "response_bytes": 8}"#,
            r#"{"type": "http", "in_cloud": false, "address": "n/a", "request_bytes": 7, "response_bytes": 8}"#,
            r#"{"type": "scf", "region": false, "request_bytes": 7, "response_bytes": 8}"#,
        ] {
            let err = backend(b).unwrap_err();
            assert_eq!(err.reason, RejectReason::InvalidValue, "{b}");
            assert!(err.detail.contains("backend."), "{}", err.detail);
        }
        let err = backend(r#"{"type": "scf", "address": "n/a", "request_bytes": 7, "response_bytes": 8}"#).unwrap_err();
        assert_eq!(err.reason, RejectReason::MissingField);
    }

    #[test]
    fn mock_backend_with_bytes_is_invalid() {
        let s = SPEC_EVENT.replace("\"type\": \"http\"", "\"type\": \"mock\"");
        let err = decode_event(s.as_bytes()).unwrap_err();
        assert_eq!(err.reason, RejectReason::InvalidValue);
        assert!(err.detail.contains("mock"), "{}", err.detail);
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_crash() {
        // Valid JSON, but not an object.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(reason(&deep), RejectReason::InvalidValue);
        // Deep nesting in an unknown field is skipped without recursion.
        let nested_unknown = SPEC_EVENT.replace("\"status\": 200", &format!("\"x\": {}1{}", "[".repeat(5000), "]".repeat(5000)));
        assert!(decode_event(nested_unknown.as_bytes()).is_ok());
        // Deep nesting where a value is expected hits the parser's recursion
        // limit (128); the JSON itself is well-formed, so the value is invalid.
        let deep_backend = format!(
            r#"{{"request_id":"r","account_id":"a","region":"x","time":0,"client_network":"public","request_bytes":0,"response_bytes":0,"backend":{}1{}}}"#,
            "[".repeat(5000),
            "]".repeat(5000)
        );
        assert_eq!(reason(&deep_backend), RejectReason::InvalidValue);
    }
}
