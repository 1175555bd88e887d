//! Month usage: per-local-hour buckets with per-region public bytes, a
//! commutative and associative merge, and a compact versioned encoding.

use super::classify::Metered;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A region name, shared by every hour that mentions it (decoding a month
/// allocates each region name once, not once per hour).
pub type Region = Arc<str>;

/// Version byte of the current binary encoding.
pub const ENCODING_VERSION: u8 = 1;

/// Usage of one account in one local hour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HourUsage {
    /// All calls, frontend errors included.
    pub calls: u64,
    /// Calls the gateway itself rejected (never billable).
    pub frontend_error_calls: u64,
    /// Private outbound bytes (recorded, free).
    pub private_out_bytes: u64,
    /// Inbound bytes (recorded, free).
    pub inbound_bytes: u64,
    /// Public outbound bytes by gateway region; only non-zero entries.
    pub public_out_bytes: BTreeMap<Region, u64>,
}

impl HourUsage {
    /// Adds one classified event that happened in `region`.
    pub fn add(&mut self, region: &str, m: &Metered) {
        self.calls += 1;
        self.frontend_error_calls += u64::from(m.frontend_error);
        self.private_out_bytes = self.private_out_bytes.saturating_add(m.private_out_bytes);
        self.inbound_bytes = self.inbound_bytes.saturating_add(m.inbound_bytes);
        if m.public_out_bytes > 0 {
            match self.public_out_bytes.get_mut(region) {
                Some(v) => *v = v.saturating_add(m.public_out_bytes),
                None => {
                    self.public_out_bytes.insert(region.into(), m.public_out_bytes);
                }
            }
        }
    }

    /// Adds another hour's usage to this one.
    pub fn merge(&mut self, other: &HourUsage) {
        self.calls = self.calls.saturating_add(other.calls);
        self.frontend_error_calls = self.frontend_error_calls.saturating_add(other.frontend_error_calls);
        self.private_out_bytes = self.private_out_bytes.saturating_add(other.private_out_bytes);
        self.inbound_bytes = self.inbound_bytes.saturating_add(other.inbound_bytes);
        for (r, b) in &other.public_out_bytes {
            let v = self.public_out_bytes.entry(r.clone()).or_insert(0);
            *v = v.saturating_add(*b);
        }
    }

    /// Public outbound bytes over all regions.
    pub fn public_out_total(&self) -> u64 {
        self.public_out_bytes.values().fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// One account's usage in one billing month, keyed by the UTC epoch second at
/// which each local hour starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonthUsage {
    /// Hour buckets in chronological order.
    pub hours: BTreeMap<i64, HourUsage>,
}

/// Why stored bytes could not be decoded as month usage.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UsageDecodeError {
    /// Written by a different (newer or older) encoding.
    #[error("month usage encoding version {0} is not supported (this build reads version {ENCODING_VERSION})")]
    Version(u8),
    /// Truncated or corrupt.
    #[error("month usage bytes are corrupt: {0}")]
    Corrupt(&'static str),
}

impl MonthUsage {
    /// Adds one classified event to the hour bucket `hour_start`.
    pub fn add(&mut self, hour_start: i64, region: &str, m: &Metered) {
        self.hours.entry(hour_start).or_default().add(region, m);
    }

    /// Adds another month's usage to this one. Commutative and associative.
    pub fn merge(&mut self, other: &MonthUsage) {
        for (h, u) in &other.hours {
            self.hours.entry(*h).or_default().merge(u);
        }
    }

    /// All calls in the month.
    pub fn calls(&self) -> u64 {
        self.hours.values().map(|h| h.calls).sum()
    }

    /// Encodes as: version, region table, then per hour the delta of its start
    /// and its counters as LEB128 varints.
    pub fn encode(&self) -> Vec<u8> {
        let mut public: Vec<(&str, u64)> = Vec::new();
        let mut spans = Vec::with_capacity(self.hours.len());
        for (h, u) in &self.hours {
            let start = public.len();
            public.extend(u.public_out_bytes.iter().map(|(r, b)| (r.as_ref(), *b)));
            spans.push((*h, u, start, public.len()));
        }
        let rows: Vec<HourRow<'_>> = spans
            .iter()
            .map(|(h, u, a, b)| HourRow {
                hour_start: *h,
                calls: u.calls,
                frontend_error_calls: u.frontend_error_calls,
                private_out_bytes: u.private_out_bytes,
                inbound_bytes: u.inbound_bytes,
                public: &public[*a..*b],
            })
            .collect();
        encode_rows(&rows)
    }

    /// Decodes bytes written by [`MonthUsage::encode`].
    pub fn decode(bytes: &[u8]) -> Result<MonthUsage, UsageDecodeError> {
        let mut rows = Vec::new();
        let mut public = Vec::new();
        parse_rows(bytes, &mut rows, &mut public)?;
        // One shared name per distinct region (a month has a handful).
        let mut names: Vec<Region> = Vec::new();
        let mut name = |r: &str| match names.iter().find(|n| n.as_ref() == r) {
            Some(n) => n.clone(),
            None => {
                names.push(r.into());
                names[names.len() - 1].clone()
            }
        };
        let hours = rows
            .into_iter()
            .map(|r| {
                let u = HourUsage {
                    calls: r.counters[0],
                    frontend_error_calls: r.counters[1],
                    private_out_bytes: r.counters[2],
                    inbound_bytes: r.counters[3],
                    public_out_bytes: public[r.public.clone()].iter().map(|(k, v)| (name(k), *v)).collect(),
                };
                (r.hour_start, u)
            })
            .collect();
        Ok(MonthUsage { hours })
    }
}

/// One decoded hour whose public bytes are a range of a shared list.
#[derive(Clone, Debug)]
struct RawRow {
    hour_start: i64,
    counters: [u64; 4],
    public: std::ops::Range<usize>,
}

/// Decodes encoded usage, appending its hours to `rows` and their public
/// bytes by region (borrowed from `bytes`) to `public`.
fn parse_rows<'a>(bytes: &'a [u8], rows: &mut Vec<RawRow>, public: &mut Vec<(&'a str, u64)>) -> Result<(), UsageDecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let version = r.byte()?;
    if version != ENCODING_VERSION {
        return Err(UsageDecodeError::Version(version));
    }
    let n_regions = r.len()?;
    let mut regions = Vec::with_capacity(n_regions);
    for _ in 0..n_regions {
        let len = r.len()?;
        let s = r.take(len)?;
        regions.push(std::str::from_utf8(s).map_err(|_| UsageDecodeError::Corrupt("region is not UTF-8"))?);
    }
    let n_hours = r.len()?;
    let mut prev = 0i64;
    for i in 0..n_hours {
        let h = if i == 0 {
            unzigzag(r.varint()?)
        } else {
            let d = r.varint()?;
            if d == 0 || d > i64::MAX as u64 {
                return Err(UsageDecodeError::Corrupt("hours out of order"));
            }
            prev.checked_add(d as i64).ok_or(UsageDecodeError::Corrupt("hour overflow"))?
        };
        prev = h;
        let counters = [r.varint()?, r.varint()?, r.varint()?, r.varint()?];
        let start = public.len();
        for _ in 0..r.len()? {
            let idx = usize::try_from(r.varint()?).unwrap_or(usize::MAX);
            let region = regions.get(idx).ok_or(UsageDecodeError::Corrupt("region index out of range"))?;
            public.push((*region, r.varint()?));
        }
        rows.push(RawRow { hour_start: h, counters, public: start..public.len() });
    }
    if r.pos != bytes.len() {
        return Err(UsageDecodeError::Corrupt("trailing bytes"));
    }
    Ok(())
}

/// Sums encoded month usages into one encoding, without building a
/// [`MonthUsage`]: the bytes equal decoding each, [`MonthUsage::merge`]-ing
/// them and encoding the sum. This is the store's merge operator.
pub fn merge_encoded<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>, UsageDecodeError> {
    let mut rows = Vec::new();
    let mut public = Vec::new();
    for p in parts {
        parse_rows(p, &mut rows, &mut public)?;
    }
    rows.sort_by_key(|r| r.hour_start);
    let mut merged: Vec<(i64, [u64; 4], std::ops::Range<usize>)> = Vec::with_capacity(rows.len());
    let mut sums: Vec<(&str, u64)> = Vec::with_capacity(public.len());
    let mut scratch: Vec<(&str, u64)> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let hour = rows[i].hour_start;
        let mut counters = [0u64; 4];
        scratch.clear();
        while i < rows.len() && rows[i].hour_start == hour {
            for (c, v) in counters.iter_mut().zip(rows[i].counters) {
                *c = c.saturating_add(v);
            }
            scratch.extend_from_slice(&public[rows[i].public.clone()]);
            i += 1;
        }
        scratch.sort_by_key(|(r, _)| *r);
        let start = sums.len();
        for (r, b) in &scratch {
            match sums[start..].last_mut() {
                Some((last, v)) if last == r => *v = v.saturating_add(*b),
                _ => sums.push((r, *b)),
            }
        }
        merged.push((hour, counters, start..sums.len()));
    }
    let rows: Vec<HourRow<'_>> = merged
        .iter()
        .map(|(h, c, p)| HourRow {
            hour_start: *h,
            calls: c[0],
            frontend_error_calls: c[1],
            private_out_bytes: c[2],
            inbound_bytes: c[3],
            public: &sums[p.clone()],
        })
        .collect();
    Ok(encode_rows(&rows))
}

/// One hour of usage as borrowed parts, for encoding without building a
/// [`MonthUsage`] first.
#[derive(Clone, Copy, Debug)]
pub struct HourRow<'a> {
    /// UTC epoch second at which the local hour starts.
    pub hour_start: i64,
    /// All calls.
    pub calls: u64,
    /// Frontend-error calls.
    pub frontend_error_calls: u64,
    /// Private outbound bytes.
    pub private_out_bytes: u64,
    /// Inbound bytes.
    pub inbound_bytes: u64,
    /// Public outbound bytes by region: sorted by region, distinct, non-zero.
    pub public: &'a [(&'a str, u64)],
}

/// Encodes hours given in ascending, distinct order; the bytes are those of
/// the [`MonthUsage`] with these hours ([`MonthUsage::encode`] uses it).
pub fn encode_rows(rows: &[HourRow<'_>]) -> Vec<u8> {
    let mut regions: Vec<&str> = rows.iter().flat_map(|h| h.public.iter().map(|(r, _)| *r)).collect();
    regions.sort_unstable();
    regions.dedup();
    let mut out = Vec::with_capacity(8 + rows.len() * 16);
    out.push(ENCODING_VERSION);
    put_varint(&mut out, regions.len() as u64);
    for r in &regions {
        put_varint(&mut out, r.len() as u64);
        out.extend_from_slice(r.as_bytes());
    }
    put_varint(&mut out, rows.len() as u64);
    let mut prev = 0i64;
    for (i, u) in rows.iter().enumerate() {
        if i == 0 {
            put_varint(&mut out, zigzag(u.hour_start));
        } else {
            put_varint(&mut out, (u.hour_start - prev) as u64);
        }
        prev = u.hour_start;
        for v in [u.calls, u.frontend_error_calls, u.private_out_bytes, u.inbound_bytes] {
            put_varint(&mut out, v);
        }
        put_varint(&mut out, u.public.len() as u64);
        for (r, b) in u.public {
            let idx = regions.binary_search(r).expect("region in table");
            put_varint(&mut out, idx as u64);
            put_varint(&mut out, *b);
        }
    }
    out
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends an unsigned LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint at `*pos`, advancing it; `None` when
/// truncated or longer than 64 bits.
pub fn read_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, UsageDecodeError> {
        let v = *self.b.get(self.pos).ok_or(UsageDecodeError::Corrupt("truncated"))?;
        self.pos += 1;
        Ok(v)
    }
    fn varint(&mut self) -> Result<u64, UsageDecodeError> {
        read_varint(self.b, &mut self.pos).ok_or(UsageDecodeError::Corrupt("truncated or overlong varint"))
    }
    fn len(&mut self) -> Result<usize, UsageDecodeError> {
        let v = self.varint()?;
        if v > (self.b.len() - self.pos) as u64 {
            return Err(UsageDecodeError::Corrupt("length beyond end"));
        }
        Ok(v as usize)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], UsageDecodeError> {
        let s = self.b.get(self.pos..self.pos + n).ok_or(UsageDecodeError::Corrupt("truncated"))?;
        self.pos += n;
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_month() -> impl Strategy<Value = MonthUsage> {
        prop::collection::btree_map(
            -100_000i64..100_000_000_000,
            (0u64..1 << 40, 0u64..1000, 0u64..1 << 50, 0u64..1 << 50, prop::collection::btree_map("[a-z-]{1,12}", 1u64..1 << 50, 0..4)),
            0..20,
        )
        .prop_map(|m| MonthUsage {
            hours: m
                .into_iter()
                .map(|(h, (c, f, p, i, pb))| {
                    let pb = pb.into_iter().map(|(r, b)| (Region::from(r), b)).collect();
                    (h, HourUsage { calls: c, frontend_error_calls: f, private_out_bytes: p, inbound_bytes: i, public_out_bytes: pb })
                })
                .collect(),
        })
    }

    proptest! {
        #[test]
        fn encoding_roundtrips(m in arb_month()) {
            prop_assert_eq!(MonthUsage::decode(&m.encode()).unwrap(), m);
        }

        #[test]
        fn merge_is_commutative_and_associative(a in arb_month(), b in arb_month(), c in arb_month()) {
            let mut ab = a.clone(); ab.merge(&b);
            let mut ba = b.clone(); ba.merge(&a);
            prop_assert_eq!(&ab, &ba);
            let mut ab_c = ab.clone(); ab_c.merge(&c);
            let mut bc = b.clone(); bc.merge(&c);
            let mut a_bc = a.clone(); a_bc.merge(&bc);
            prop_assert_eq!(ab_c, a_bc);
        }

        #[test]
        fn merging_encodings_equals_merging_months(a in arb_month(), b in arb_month(), c in arb_month()) {
            let mut sum = a.clone(); sum.merge(&b); sum.merge(&c);
            let merged = merge_encoded([a.encode().as_slice(), b.encode().as_slice(), c.encode().as_slice()]).unwrap();
            prop_assert_eq!(merged, sum.encode());
        }

        #[test]
        fn decode_of_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = MonthUsage::decode(&bytes);
        }
    }

    #[test]
    fn refuses_other_versions() {
        let mut b = MonthUsage::default().encode();
        b[0] = 9;
        assert_eq!(MonthUsage::decode(&b), Err(UsageDecodeError::Version(9)));
    }
}
