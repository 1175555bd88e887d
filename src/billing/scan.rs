//! The decoder's fast path: one pass over the message bytes, no allocation,
//! fields borrowed from the message.
//!
//! It accepts only what it can decide without doubt: UTF-8, strings without
//! escapes, integers in plain notation, scalar unknown fields (and scalar
//! backend fields that do not apply to the backend type), no duplicate
//! fields, and an event that passes every check of [`decode_event`] and
//! [`classify`](super::classify::classify). Anything else, every malformed or
//! invalid message included, goes to the full decoder, which gives the
//! reason code and the detail. So the fast path never decides a rejection,
//! and an event it accepts is the event the full decoder would accept, field
//! for field (a property test in this module holds it to that).

use super::classify::{classify_legs, BackendRef, Legs, Metered};
use super::event::{decode_event, rfc3339_millis, AccessEvent, DecodeError, Network, MAX_BYTE_COUNT, MAX_TIME_MS, MIN_TIME_MS};
use std::borrow::Cow;

/// What the pipeline needs of an accepted event: the dedupe key, where the
/// usage goes, and what it adds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Billable<'a> {
    /// The dedupe key.
    pub request_id: Cow<'a, str>,
    /// The billed account.
    pub account_id: Cow<'a, str>,
    /// Region of the API service.
    pub region: Cow<'a, str>,
    /// Event time, UTC epoch milliseconds.
    pub time_ms: i64,
    /// What the event adds to its hour.
    pub metered: Metered,
}

impl Billable<'static> {
    /// From a fully decoded event.
    pub fn from_event(e: AccessEvent, metered: Metered) -> Self {
        Billable {
            request_id: Cow::Owned(e.request_id),
            account_id: Cow::Owned(e.account_id),
            region: Cow::Owned(e.region),
            time_ms: e.time_ms,
            metered,
        }
    }
}

/// Decodes, validates and classifies one event: the fast path when it
/// applies, else the full decoder (same result, and the reasons for errors).
pub fn decode_billable(bytes: &[u8]) -> Result<Billable<'_>, DecodeError> {
    if let Some(b) = fast(bytes) {
        return Ok(b);
    }
    let e = decode_event(bytes)?;
    let m = super::classify::classify(&e)?;
    Ok(Billable::from_event(e, m))
}

struct Scanner<'a> {
    /// The message, known to be UTF-8.
    s: &'a str,
    b: &'a [u8],
    i: usize,
    /// Where the message's quotes and special characters are, found before
    /// parsing starts (lines up to [`Structure::MAX_LEN`] bytes).
    structure: Option<Structure>,
}

impl<'a> Scanner<'a> {
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    fn peek(&mut self) -> Option<u8> {
        self.ws();
        self.b.get(self.i).copied()
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A string without escapes or control characters.
    fn str(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let end = match &self.structure {
            Some(st) => st.next_special(start)?,
            None => start + find_special(&self.b[start..])?,
        };
        if self.b[end] != b'"' {
            return None;
        }
        self.i = end + 1;
        // Both ends are ASCII quotes, hence character boundaries.
        self.s.get(start..end)
    }

    /// A non-negative integer in plain notation that fits in a u64.
    fn uint(&mut self) -> Option<u64> {
        self.ws();
        let start = self.i;
        let mut v = 0u64;
        while let Some(c @ b'0'..=b'9') = self.b.get(self.i).copied() {
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        let n = self.i - start;
        if n == 0 || (n > 1 && self.b[start] == b'0') || matches!(self.b.get(self.i), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        Some(v)
    }

    fn literal(&mut self, word: &[u8]) -> bool {
        self.ws();
        let hit = self.b[self.i..].starts_with(word);
        if hit {
            self.i += word.len();
        }
        hit
    }

    fn boolean(&mut self) -> Option<bool> {
        if self.literal(b"true") {
            Some(true)
        } else if self.literal(b"false") {
            Some(false)
        } else {
            None
        }
    }

    fn network(&mut self) -> Option<Network> {
        network(self.str()?)
    }

    /// Skips a scalar value; objects and arrays are left to the full decoder.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.str().map(drop),
            b't' => self.literal(b"true").then_some(()),
            b'f' => self.literal(b"false").then_some(()),
            b'n' => self.literal(b"null").then_some(()),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    /// A JSON number, by the grammar: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        let digits = |s: &mut Self| {
            let start = s.i;
            while s.b.get(s.i).is_some_and(u8::is_ascii_digit) {
                s.i += 1;
            }
            s.i - start
        };
        if self.b.get(self.i) == Some(&b'-') {
            self.i += 1;
        }
        let start = self.i;
        let n = digits(self);
        if n == 0 || (n > 1 && self.b[start] == b'0') {
            return None;
        }
        if self.b.get(self.i) == Some(&b'.') {
            self.i += 1;
            (digits(self) > 0).then_some(())?;
        }
        if let Some(b'e' | b'E') = self.b.get(self.i) {
            self.i += 1;
            if let Some(b'+' | b'-') = self.b.get(self.i) {
                self.i += 1;
            }
            (digits(self) > 0).then_some(())?;
        }
        Some(())
    }

    /// After a member: `,` (more) or `}` (done).
    fn next_member(&mut self) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.i += 1;
                Some(true)
            }
            b'}' => {
                self.i += 1;
                Some(false)
            }
            _ => None,
        }
    }
}

fn network(s: &str) -> Option<Network> {
    match s {
        "public" => Some(Network::Public),
        "private" => Some(Network::Private),
        _ => None,
    }
}

/// Position of the first `"`, `\\` or control character: eight bytes at a
/// time while none of them is one (exact "has a byte" tests from Hacker's
/// Delight), then byte by byte.
fn find_special(b: &[u8]) -> Option<usize> {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(LO) & !x & HI;
    let mut i = 0;
    while let Some(word) = b.get(i..i + 8) {
        let w = u64::from_le_bytes(word.try_into().expect("8 bytes"));
        let special = has_zero(w ^ (LO * u64::from(b'"'))) | has_zero(w ^ (LO * u64::from(b'\\'))) | (w.wrapping_sub(LO * 0x20) & !w & HI);
        if special != 0 {
            break;
        }
        i += 8;
    }
    b[i..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).map(|p| p + i)
}

/// Stage 1 of the scan (as simd-json's): one bit per byte of the message,
/// set for quotes, backslashes and control characters, found before parsing
/// (16 bytes at a time with SSE2), so that finding where a string ends is a
/// bit scan.
struct Structure {
    len: usize,
    /// Bit `k % 64` of word `k / 64`: byte `k` is a `"`, `\\` or control
    /// character (bits past `len` are unset).
    special: [u64; Structure::WORDS],
}

impl Structure {
    const WORDS: usize = 16;
    /// Longer messages are scanned string by string instead.
    const MAX_LEN: usize = Self::WORDS * 64;

    fn of(b: &[u8]) -> Option<Structure> {
        if b.len() > Self::MAX_LEN {
            return None;
        }
        let mut st = Structure { len: b.len(), special: [0; Self::WORDS] };
        let mut blocks = b.chunks_exact(64);
        for (w, block) in blocks.by_ref().enumerate() {
            st.special[w] = special_mask(block.try_into().expect("64 bytes"));
        }
        let rest = blocks.remainder();
        if !rest.is_empty() {
            // Padded with spaces, which are not special.
            let mut block = [b' '; 64];
            block[..rest.len()].copy_from_slice(rest);
            st.special[b.len() / 64] = special_mask(&block);
        }
        Some(st)
    }

    /// Position of the first special byte at or after `from`, as
    /// [`find_special`] finds it.
    fn next_special(&self, from: usize) -> Option<usize> {
        let mut w = from / 64;
        let mut m = *self.special.get(w)? & (u64::MAX << (from % 64));
        loop {
            if m != 0 {
                return Some(w * 64 + m.trailing_zeros() as usize).filter(|p| *p < self.len);
            }
            w += 1;
            m = *self.special.get(w)?;
        }
    }
}

/// One bit per byte of a 64-byte block: set for `"`, `\\` and bytes below
/// 0x20.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
fn special_mask(block: &[u8; 64]) -> u64 {
    use std::arch::x86_64::{_mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8};
    let mut mask = 0u64;
    for k in 0..4 {
        // SAFETY: SSE2 is enabled (the cfg above); the load reads 16
        // bytes at 16 * k of a 64-byte array (unaligned loads allowed).
        let bits = unsafe {
            let v = _mm_loadu_si128(block.as_ptr().add(16 * k).cast());
            let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
            let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
            // Unsigned v <= 0x1f exactly when min(v, 0x1f) == v.
            let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
            _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control))
        };
        mask |= u64::from(bits as u16) << (16 * k);
    }
    mask
}

#[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
fn special_mask(block: &[u8; 64]) -> u64 {
    block.iter().enumerate().fold(0u64, |m, (k, &c)| m | (u64::from(c == b'"' || c == b'\\' || c < 0x20) << k))
}

/// The field names the fast path knows, at either level.
#[derive(Clone, Copy)]
enum Field {
    RequestId,
    AccountId,
    Region,
    Time,
    ClientNetwork,
    FrontendError,
    RequestBytes,
    ResponseBytes,
    Backend,
    Type,
    InCloud,
    Address,
    Other,
}

/// Names a key by its length, then a fixed-size compare (no `memcmp` call).
fn field(key: &str) -> Field {
    fn is<const N: usize>(k: &[u8], name: &[u8; N]) -> bool {
        <[u8; N]>::try_from(k).is_ok_and(|a| &a == name)
    }
    let k = key.as_bytes();
    match k.len() {
        4 if is(k, b"time") => Field::Time,
        4 if is(k, b"type") => Field::Type,
        6 if is(k, b"region") => Field::Region,
        7 if is(k, b"backend") => Field::Backend,
        7 if is(k, b"address") => Field::Address,
        8 if is(k, b"in_cloud") => Field::InCloud,
        10 if is(k, b"request_id") => Field::RequestId,
        10 if is(k, b"account_id") => Field::AccountId,
        13 if is(k, b"request_bytes") => Field::RequestBytes,
        14 if is(k, b"response_bytes") => Field::ResponseBytes,
        14 if is(k, b"client_network") => Field::ClientNetwork,
        14 if is(k, b"frontend_error") => Field::FrontendError,
        _ => Field::Other,
    }
}

/// Marks field `bit` as seen; `None` on a repeat (the full decoder reports
/// duplicate fields).
fn once(seen: &mut u16, bit: u16) -> Option<()> {
    (*seen & (1 << bit) == 0).then(|| *seen |= 1 << bit)
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Scf,
    Mock,
}

/// The backend fields that apply to some backend types only are `Some(None)`
/// when present with a scalar value of another type or domain: ignored where
/// the field does not apply, left to the full decoder where it does.
#[derive(Default)]
struct RawBackend<'a> {
    kind: Option<Kind>,
    region: Option<Option<&'a str>>,
    in_cloud: Option<Option<bool>>,
    address: Option<Option<Network>>,
    request_bytes: Option<u64>,
    response_bytes: Option<u64>,
}

fn backend<'a>(p: &mut Scanner<'a>) -> Option<RawBackend<'a>> {
    p.eat(b'{')?;
    let mut b = RawBackend::default();
    let mut seen = 0u16;
    loop {
        let key = p.str()?;
        p.eat(b':')?;
        match field(key) {
            Field::Type => {
                once(&mut seen, 0)?;
                b.kind = Some(match p.str()? {
                    "http" => Kind::Http,
                    "scf" => Kind::Scf,
                    "mock" => Kind::Mock,
                    _ => return None,
                });
            }
            Field::Region => {
                once(&mut seen, 1)?;
                b.region = Some(if p.peek()? == b'"' { Some(p.str()?) } else { p.skip_scalar().map(|()| None)? });
            }
            Field::InCloud => {
                once(&mut seen, 2)?;
                b.in_cloud = Some(match p.peek()? {
                    b't' | b'f' => Some(p.boolean()?),
                    _ => p.skip_scalar().map(|()| None)?,
                });
            }
            Field::Address => {
                once(&mut seen, 3)?;
                b.address = Some(if p.peek()? == b'"' { network(p.str()?) } else { p.skip_scalar().map(|()| None)? });
            }
            Field::RequestBytes => {
                once(&mut seen, 4)?;
                b.request_bytes = Some(p.uint()?);
            }
            Field::ResponseBytes => {
                once(&mut seen, 5)?;
                b.response_bytes = Some(p.uint()?);
            }
            _ => p.skip_scalar()?,
        }
        if !p.next_member()? {
            return Some(b);
        }
    }
}

fn id(v: Option<&str>) -> Option<&str> {
    v.filter(|s| !s.is_empty() && s.len() <= 256)
}

fn bytes_ok(v: Option<u64>) -> Option<u64> {
    v.filter(|v| *v < MAX_BYTE_COUNT)
}

/// The fast path: `Some` only for an event the full decoder accepts as is.
pub fn fast(bytes: &[u8]) -> Option<Billable<'_>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut p = Scanner { s: text, b: bytes, i: 0, structure: Structure::of(bytes) };
    p.eat(b'{')?;
    let mut seen = 0u16;
    let (mut request_id, mut account_id, mut region, mut time, mut client_network) = (None, None, None, None, None);
    let (mut frontend_error, mut request_bytes, mut response_bytes, mut raw_backend) = (None, None, None, None);
    loop {
        let key = p.str()?;
        p.eat(b':')?;
        match field(key) {
            Field::RequestId => {
                once(&mut seen, 0)?;
                request_id = Some(p.str()?);
            }
            Field::AccountId => {
                once(&mut seen, 1)?;
                account_id = Some(p.str()?);
            }
            Field::Region => {
                once(&mut seen, 2)?;
                region = Some(p.str()?);
            }
            Field::Time => {
                once(&mut seen, 3)?;
                let ms = if p.peek()? == b'"' { rfc3339_millis(p.str()?).ok()? } else { i64::try_from(p.uint()?).ok()? };
                time = Some(ms).filter(|t| (MIN_TIME_MS..MAX_TIME_MS).contains(t));
            }
            Field::ClientNetwork => {
                once(&mut seen, 4)?;
                client_network = Some(p.network()?);
            }
            Field::FrontendError => {
                once(&mut seen, 5)?;
                frontend_error = if p.literal(b"null") { None } else { Some(p.boolean()?) };
            }
            Field::RequestBytes => {
                once(&mut seen, 6)?;
                request_bytes = Some(p.uint()?);
            }
            Field::ResponseBytes => {
                once(&mut seen, 7)?;
                response_bytes = Some(p.uint()?);
            }
            Field::Backend => {
                once(&mut seen, 8)?;
                raw_backend = Some(backend(&mut p)?);
            }
            _ => p.skip_scalar()?,
        }
        if !p.next_member()? {
            break;
        }
    }
    p.ws();
    if p.i != bytes.len() {
        return None;
    }
    let region = id(region)?;
    let b = raw_backend?;
    let backend = match b.kind? {
        Kind::Mock => {
            if b.request_bytes.unwrap_or(0) != 0 || b.response_bytes.unwrap_or(0) != 0 {
                return None;
            }
            BackendRef::Mock
        }
        // As in the full decoder, a field that does not apply to the backend
        // type is not looked at.
        Kind::Http => {
            let in_cloud = b.in_cloud.flatten()?;
            BackendRef::Http {
                region: if in_cloud { Some(id(b.region.flatten())?) } else { None },
                in_cloud,
                address: b.address.flatten()?,
                request_bytes: bytes_ok(b.request_bytes)?,
                response_bytes: bytes_ok(b.response_bytes)?,
            }
        }
        Kind::Scf => BackendRef::Scf {
            region: id(b.region.flatten())?,
            request_bytes: bytes_ok(b.request_bytes)?,
            response_bytes: bytes_ok(b.response_bytes)?,
        },
    };
    let legs = Legs {
        region,
        client_network: client_network?,
        frontend_error: frontend_error.unwrap_or(false),
        request_bytes: bytes_ok(request_bytes)?,
        response_bytes: bytes_ok(response_bytes)?,
        backend,
    };
    let metered = classify_legs(&legs).ok()?;
    Some(Billable {
        request_id: Cow::Borrowed(id(request_id)?),
        account_id: Cow::Borrowed(id(account_id)?),
        region: Cow::Borrowed(region),
        time_ms: time?,
        metered,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn slow(bytes: &[u8]) -> Result<Billable<'static>, DecodeError> {
        let e = decode_event(bytes)?;
        let m = super::super::classify::classify(&e)?;
        Ok(Billable::from_event(e, m))
    }

    const GEN_EVENT: &str = r#"{"request_id":"2a-0","account_id":"1250000027","service_id":"service-10","api_id":"api-466","region":"ap-shanghai","time":1604160590336,"client_network":"public","frontend_error":false,"status":200,"request_bytes":1392,"response_bytes":1576,"backend":{"type":"scf","region":"ap-guangzhou","request_bytes":588,"response_bytes":18232}}"#;

    #[test]
    fn the_common_event_takes_the_fast_path_with_the_full_decoders_result() {
        let f = fast(GEN_EVENT.as_bytes()).expect("fast path");
        assert!(matches!(f.account_id, Cow::Borrowed("1250000027")));
        assert_eq!(
            f.metered,
            Metered { frontend_error: false, public_out_bytes: 1576 + 588, private_out_bytes: 0, inbound_bytes: 1392 + 18232 }
        );
        assert_eq!(f, slow(GEN_EVENT.as_bytes()).unwrap());
        let spaced = r#" { "request_id" : "r" , "account_id":"a", "region":"x", "time":"2020-11-05T10:15:30.123+08:00",
            "client_network":"private", "frontend_error": null, "request_bytes":0, "response_bytes":7,
            "backend": {"type":"http","in_cloud":false,"address":"public","request_bytes":3,"response_bytes":4,"x":-1.5e3} }
"#;
        assert_eq!(fast(spaced.as_bytes()).expect("fast path").time_ms, 1_604_542_530_123);
        let unicode = GEN_EVENT.replace("1250000027", "caf\u{e9}-\u{4e2d}");
        assert_eq!(fast(unicode.as_bytes()).expect("fast path").account_id, "caf\u{e9}-\u{4e2d}");
        assert_eq!(fast(unicode.as_bytes()), slow(unicode.as_bytes()).ok());
    }

    #[test]
    fn backend_fields_that_do_not_apply_are_ignored_on_both_paths() {
        for (from, to) in [
            ("\"type\":\"scf\"", "\"type\":\"scf\",\"address\":\"n/a\",\"in_cloud\":\"x\""),
            ("\"type\":\"scf\",\"region\":\"ap-guangzhou\"", "\"type\":\"http\",\"in_cloud\":false,\"address\":\"public\",\"region\":5"),
            (
                "{\"type\":\"scf\",\"region\":\"ap-guangzhou\",\"request_bytes\":588,\"response_bytes\":18232}",
                "{\"type\":\"mock\",\"region\":true,\"in_cloud\":1,\"address\":null}",
            ),
        ] {
            let s = GEN_EVENT.replacen(from, to, 1);
            assert_ne!(s, GEN_EVENT, "{from}");
            let f = fast(s.as_bytes()).unwrap_or_else(|| panic!("fast path: {s}"));
            assert_eq!(Ok(f), slow(s.as_bytes()), "{s}");
        }
        // Where the field applies, a bad value is still rejected (by the full decoder).
        let s = GEN_EVENT.replacen("\"region\":\"ap-guangzhou\"", "\"region\":5", 1);
        assert!(fast(s.as_bytes()).is_none());
        assert_eq!(decode_billable(s.as_bytes()).unwrap_err().reason, super::super::event::RejectReason::InvalidValue);
    }

    #[test]
    fn a_leap_second_stays_in_its_month_on_both_paths() {
        let s = GEN_EVENT.replacen("1604160590336", "\"2020-11-30T23:59:60+08:00\"", 1);
        let f = fast(s.as_bytes()).expect("fast path");
        // 2020-11-30T23:59:59.999+08:00
        assert_eq!(f.time_ms, 1_606_751_999_999);
        assert_eq!(Ok(f), slow(s.as_bytes()));
    }

    #[test]
    fn what_the_fast_path_leaves_to_the_full_decoder() {
        for (from, to) in [
            ("\"2a-0\"", "\"2a\\u002d0\""),                                       // escape: accepted, but slowly
            ("\"status\":200", "\"status\":{\"a\":1}"),                           // nested unknown value
            ("\"status\":200", "\"status\":\"\u{1}\""),                           // control character
            ("\"status\":200", "\"request_bytes\":1"),                            // duplicate field: rejected
            ("\"request_bytes\":1392", "\"request_bytes\":01392"),                // leading zero: rejected
            ("\"request_bytes\":1392", "\"request_bytes\":1392.0"),               // float: rejected
            ("\"request_bytes\":1392", "\"request_bytes\":9007199254740992"),     // 2^53: rejected
            ("\"type\":\"scf\",\"region\":\"ap-guangzhou\"", "\"type\":\"scf\""), // missing region: rejected
            ("\"1250000027\"", "\"\""),                                           // empty id: rejected
        ] {
            let s = GEN_EVENT.replacen(from, to, 1);
            assert_ne!(s, GEN_EVENT, "{from}");
            assert!(fast(s.as_bytes()).is_none(), "{s}");
            assert_eq!(decode_billable(s.as_bytes()), slow(s.as_bytes()), "{s}");
        }
    }

    #[test]
    fn find_special_finds_the_first_quote_backslash_or_control_character() {
        for (s, want) in [
            ("abcdefghijklmnop\"", Some(16)),
            ("abcdefgh\\ijk\"", Some(8)),
            ("abcdefghijk\u{1f}\"", Some(11)),
            ("caf\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\"", Some(13)),
            ("abc\"", Some(3)),
            ("abcdefghijklmnopq", None),
            ("", None),
        ] {
            assert_eq!(find_special(s.as_bytes()), want, "{s:?}");
        }
    }

    proptest! {
        /// Stage 1's bit scan finds what the string-by-string search finds,
        /// from every position, in messages of every length up to and past
        /// the blocks' and the structure's bounds.
        #[test]
        fn the_structure_finds_what_find_special_finds(
            bytes in prop::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), Just(0x1fu8), Just(0x20), Just(0x7f), Just(0xff), Just(b'a')], 0..1100),
            sparse in 1usize..64,
        ) {
            // Mostly plain bytes, a special one every `sparse` on average.
            let bytes: Vec<u8> = bytes.iter().enumerate().map(|(k, &c)| if k % sparse == 0 { c } else { b'x' }).collect();
            match Structure::of(&bytes) {
                None => prop_assert!(bytes.len() > Structure::MAX_LEN),
                Some(st) => {
                    for from in 0..=bytes.len() {
                        prop_assert_eq!(st.next_special(from), find_special(&bytes[from..]).map(|p| p + from), "from {}", from);
                    }
                }
            }
        }
    }

    fn token() -> impl Strategy<Value = String> {
        prop_oneof![
            Just(String::new()),
            Just(" ".into()),
            Just("null".into()),
            Just("0".into()),
            Just("-1".into()),
            Just("1e3".into()),
            Just("00".into()),
            Just("18446744073709551616".into()),
            Just("9007199254740991".into()),
            Just("true".into()),
            Just("\"\"".into()),
            Just("\"http\"".into()),
            Just("\"mock\"".into()),
            Just("\"private\"".into()),
            Just("\"n/a\"".into()),
            Just("false".into()),
            Just("\"ap-guangzhou\"".into()),
            Just("\"2020-11-05T10:15:30+08:00\"".into()),
            Just("{}".into()),
            Just(",".into()),
            Just("\"a\\\"b\"".into()),
            Just("\"\u{e9}\"".into()),
            Just("\u{e9}".into()),
            "[a-z\":,{} 0-9]{1,3}",
        ]
    }

    proptest! {
        /// Mutate a valid event anywhere: whatever the fast path accepts, the
        /// full decoder accepts with the same fields.
        #[test]
        fn fast_path_never_disagrees_with_the_full_decoder(
            edits in prop::collection::vec((0usize..400, 0usize..4, token()), 1..4),
            base in prop_oneof![
                Just(GEN_EVENT.to_string()),
                Just(GEN_EVENT.replace("\"type\":\"scf\"", "\"type\":\"http\",\"in_cloud\":true,\"address\":\"public\"")),
                Just(GEN_EVENT.replace("\"type\":\"scf\"", "\"type\":\"scf\",\"in_cloud\":\"x\",\"address\":\"n/a\"")),
                Just(GEN_EVENT.replace(
                    "\"type\":\"scf\",\"region\":\"ap-guangzhou\"",
                    "\"type\":\"http\",\"in_cloud\":false,\"address\":\"public\",\"region\":5",
                )),
            ],
        ) {
            let mut s = base.into_bytes();
            for (at, cut, tok) in edits {
                let at = at.min(s.len());
                let end = (at + cut).min(s.len());
                s.splice(at..end, tok.into_bytes());
            }
            if let Some(f) = fast(&s) {
                prop_assert_eq!(Ok(f), slow(&s), "{}", String::from_utf8_lossy(&s));
            }
        }
    }
}
