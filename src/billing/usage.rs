//! Month usage: per-local-hour buckets with per-region public bytes, a
//! commutative and associative merge, and a compact versioned encoding.
//!
//! A [`MonthUsage`] is flat: its hours are one sorted array, every hour's
//! public bytes one run of a second array, and the month's region names one
//! sorted table those runs index. Decoding a stored month makes a fixed
//! number of allocations (plus one per region name), not one per hour.

use super::classify::Metered;
use std::collections::BTreeMap;

/// Version byte of the current binary encoding.
pub const ENCODING_VERSION: u8 = 1;

/// Largest total any usage quantity of one account-month may reach: 2^53 - 1,
/// the bound the wire formats put on every integer (an access event's byte
/// counts are below 2^53), so every figure of a bill is exact in any JSON
/// reader. An event that would take a month's total past it is
/// dead-lettered ("usage overflow") and counts nowhere ([`MonthTotals::add`]);
/// so no hour, month, merge or changelog sum ever saturates or wraps, and
/// sums over months (a pack's deductions) stay below 2^64 for 2,048 months.
pub const MAX_MONTH_TOTAL: u64 = (1 << 53) - 1;

/// One account-month's totals of every quantity usage keeps: what
/// [`MAX_MONTH_TOTAL`] bounds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonthTotals {
    /// All calls, frontend errors included.
    pub calls: u64,
    /// Frontend-error calls.
    pub frontend_error_calls: u64,
    /// Public outbound bytes over all regions.
    pub public_out_bytes: u64,
    /// Private outbound bytes.
    pub private_out_bytes: u64,
    /// Inbound bytes.
    pub inbound_bytes: u64,
}

/// The quantity an event would take past [`MAX_MONTH_TOTAL`], with the total
/// it would reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TotalOverflow {
    /// The bill field: `calls`, `public_out_bytes`, ...
    pub quantity: &'static str,
    /// The month's total before the event.
    pub total: u64,
    /// What the event adds.
    pub adds: u64,
}

impl MonthTotals {
    /// The totals with one more event, or which quantity it would take past
    /// [`MAX_MONTH_TOTAL`].
    pub fn add(&self, m: &Metered) -> Result<MonthTotals, TotalOverflow> {
        let sum = |quantity: &'static str, total: u64, adds: u64| match total.checked_add(adds) {
            Some(v) if v <= MAX_MONTH_TOTAL => Ok(v),
            _ => Err(TotalOverflow { quantity, total, adds }),
        };
        Ok(MonthTotals {
            calls: sum("calls", self.calls, 1)?,
            frontend_error_calls: sum("frontend_error_calls", self.frontend_error_calls, u64::from(m.frontend_error))?,
            public_out_bytes: sum("public_out_bytes", self.public_out_bytes, m.public_out_bytes)?,
            private_out_bytes: sum("private_out_bytes", self.private_out_bytes, m.private_out_bytes)?,
            inbound_bytes: sum("inbound_bytes", self.inbound_bytes, m.inbound_bytes)?,
        })
    }
}

/// Usage of one account in one local hour, as an owned value: what tests and
/// builders put into a month with [`MonthUsage::add_hour`]. A month keeps
/// its hours flat and lends them out as [`HourView`]s.
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
    /// Public outbound bytes by gateway region; zero entries are ignored.
    pub public_out_bytes: BTreeMap<String, u64>,
}

/// One hour of a month: its counters, and where its public bytes end in
/// [`MonthUsage::public`] (they start where the previous hour's end).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    start: i64,
    /// calls, frontend-error calls, private outbound bytes, inbound bytes.
    counters: [u64; 4],
    public_end: u32,
}

/// One account's usage in one billing month, keyed by the UTC epoch second at
/// which each local hour starts.
///
/// Invariants (what makes the derived equality mean "same usage"): hours
/// ascending and distinct; each hour's public entries ascending by region
/// index, distinct, non-zero; `regions` ascending, distinct, and every one
/// named by some entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonthUsage {
    regions: Vec<std::sync::Arc<str>>,
    hours: Vec<Slot>,
    /// (index into `regions`, bytes), each hour's entries one run.
    public: Vec<(u32, u64)>,
}

/// One hour of a [`MonthUsage`], borrowed.
#[derive(Clone, Copy, Debug)]
pub struct HourView<'a> {
    /// UTC epoch second at which the local hour starts.
    pub hour_start: i64,
    /// All calls, frontend errors included.
    pub calls: u64,
    /// Calls the gateway itself rejected (never billable).
    pub frontend_error_calls: u64,
    /// Private outbound bytes (recorded, free).
    pub private_out_bytes: u64,
    /// Inbound bytes (recorded, free).
    pub inbound_bytes: u64,
    public: &'a [(u32, u64)],
    regions: &'a [std::sync::Arc<str>],
}

impl<'a> HourView<'a> {
    /// Public outbound bytes by gateway region, in region order, non-zero.
    pub fn public_out_bytes(&self) -> impl ExactSizeIterator<Item = (&'a str, u64)> + 'a {
        let regions = self.regions;
        self.public.iter().map(move |&(r, b)| (&*regions[r as usize], b))
    }

    /// Public outbound bytes over all regions.
    pub fn public_out_total(&self) -> u64 {
        self.public.iter().fold(0u64, |a, (_, b)| a.saturating_add(*b))
    }

    /// The hour as an owned value.
    pub fn to_owned(&self) -> HourUsage {
        HourUsage {
            calls: self.calls,
            frontend_error_calls: self.frontend_error_calls,
            private_out_bytes: self.private_out_bytes,
            inbound_bytes: self.inbound_bytes,
            public_out_bytes: self.public_out_bytes().map(|(r, b)| (r.to_string(), b)).collect(),
        }
    }
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
        let i = self.slot(hour_start);
        let c = &mut self.hours[i].counters;
        c[0] += 1;
        c[1] += u64::from(m.frontend_error);
        c[2] = c[2].saturating_add(m.private_out_bytes);
        c[3] = c[3].saturating_add(m.inbound_bytes);
        if m.public_out_bytes > 0 {
            self.add_public(i, region, m.public_out_bytes);
        }
    }

    /// Adds an owned hour's usage to the hour bucket `hour_start`.
    pub fn add_hour(&mut self, hour_start: i64, h: &HourUsage) {
        let i = self.slot(hour_start);
        self.add_counters(i, [h.calls, h.frontend_error_calls, h.private_out_bytes, h.inbound_bytes]);
        for (r, &b) in &h.public_out_bytes {
            if b > 0 {
                self.add_public(i, r, b);
            }
        }
    }

    /// Adds another month's usage to this one. Commutative and associative.
    pub fn merge(&mut self, other: &MonthUsage) {
        for h in other.hours() {
            self.add_view(&h);
        }
    }

    /// Adds one hour of another month's usage to this one.
    pub fn add_view(&mut self, h: &HourView<'_>) {
        let i = self.slot(h.hour_start);
        self.add_counters(i, [h.calls, h.frontend_error_calls, h.private_out_bytes, h.inbound_bytes]);
        for (r, b) in h.public_out_bytes() {
            self.add_public(i, r, b);
        }
    }

    /// The hour starting at `hour_start` alone (empty when it has no usage).
    pub fn only_hour(&self, hour_start: i64) -> MonthUsage {
        let mut out = MonthUsage::default();
        if let Some(h) = self.hour(hour_start) {
            out.add_view(&h);
        }
        out
    }

    /// The hours starting in `from..to` alone (empty when none has usage).
    pub fn hours_between(&self, from: i64, to: i64) -> MonthUsage {
        let mut out = MonthUsage::default();
        let first = self.hours.partition_point(|s| s.start < from);
        for i in (first..self.hours.len()).take_while(|&i| self.hours[i].start < to) {
            out.add_view(&self.view(i));
        }
        out
    }

    /// The hours in chronological order.
    pub fn hours(&self) -> impl ExactSizeIterator<Item = HourView<'_>> + '_ {
        (0..self.hours.len()).map(|i| self.view(i))
    }

    /// The hour starting at `hour_start`, if it has usage.
    pub fn hour(&self, hour_start: i64) -> Option<HourView<'_>> {
        self.hours.binary_search_by_key(&hour_start, |s| s.start).ok().map(|i| self.view(i))
    }

    /// Whether the month has no hour.
    pub fn is_empty(&self) -> bool {
        self.hours.is_empty()
    }

    /// All calls in the month.
    pub fn calls(&self) -> u64 {
        self.hours.iter().map(|h| h.counters[0]).sum()
    }

    /// The month's totals, saturating (a month written through the pipeline
    /// is below [`MAX_MONTH_TOTAL`] in every quantity, so nothing saturates).
    pub fn totals(&self) -> MonthTotals {
        let mut t = MonthTotals::default();
        for s in &self.hours {
            t.calls = t.calls.saturating_add(s.counters[0]);
            t.frontend_error_calls = t.frontend_error_calls.saturating_add(s.counters[1]);
            t.private_out_bytes = t.private_out_bytes.saturating_add(s.counters[2]);
            t.inbound_bytes = t.inbound_bytes.saturating_add(s.counters[3]);
        }
        t.public_out_bytes = self.public.iter().fold(0u64, |a, (_, b)| a.saturating_add(*b));
        t
    }

    fn view(&self, i: usize) -> HourView<'_> {
        let s = &self.hours[i];
        let from = if i == 0 { 0 } else { self.hours[i - 1].public_end as usize };
        HourView {
            hour_start: s.start,
            calls: s.counters[0],
            frontend_error_calls: s.counters[1],
            private_out_bytes: s.counters[2],
            inbound_bytes: s.counters[3],
            public: &self.public[from..s.public_end as usize],
            regions: &self.regions,
        }
    }

    /// Index of the hour `hour_start`, inserted empty when absent (appending
    /// is the common case and costs no search).
    fn slot(&mut self, hour_start: i64) -> usize {
        let at = match self.hours.last() {
            Some(last) if last.start == hour_start => return self.hours.len() - 1,
            Some(last) if last.start < hour_start => self.hours.len(),
            None => 0,
            Some(_) => match self.hours.binary_search_by_key(&hour_start, |s| s.start) {
                Ok(i) => return i,
                Err(i) => i,
            },
        };
        let public_end = if at == 0 { 0 } else { self.hours[at - 1].public_end };
        self.hours.insert(at, Slot { start: hour_start, counters: [0; 4], public_end });
        at
    }

    fn add_counters(&mut self, i: usize, add: [u64; 4]) {
        for (c, v) in self.hours[i].counters.iter_mut().zip(add) {
            *c = c.saturating_add(v);
        }
    }

    /// Adds `bytes` (non-zero) of `region` to hour `i`.
    fn add_public(&mut self, i: usize, region: &str, bytes: u64) {
        let r = match self.regions.binary_search_by(|n| (**n).cmp(region)) {
            Ok(r) => r as u32,
            Err(r) => {
                // A new name: later names move up one index.
                self.regions.insert(r, region.into());
                for e in &mut self.public {
                    if e.0 >= r as u32 {
                        e.0 += 1;
                    }
                }
                r as u32
            }
        };
        let from = if i == 0 { 0 } else { self.hours[i - 1].public_end as usize };
        let to = self.hours[i].public_end as usize;
        match self.public[from..to].binary_search_by_key(&r, |e| e.0) {
            Ok(k) => {
                let v = &mut self.public[from + k].1;
                *v = v.saturating_add(bytes);
            }
            Err(k) => {
                self.public.insert(from + k, (r, bytes));
                for s in &mut self.hours[i..] {
                    s.public_end += 1;
                }
            }
        }
    }

    /// Encodes as: version, region table, then per hour the delta of its start
    /// and its counters as LEB128 varints.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(8 + self.regions.iter().map(|r| r.len() + 1).sum::<usize>() + self.hours.len() * 16 + self.public.len() * 6);
        out.push(ENCODING_VERSION);
        put_varint(&mut out, self.regions.len() as u64);
        for r in &self.regions {
            put_varint(&mut out, r.len() as u64);
            out.extend_from_slice(r.as_bytes());
        }
        self.encode_hours(&mut out, 0, 1);
        out
    }

    /// Encodes compactly, for a value whose hours start at or after
    /// `origin` and whose reader knows `origin` and the names `known` (the
    /// changelog's block records): no version byte; each region a varint,
    /// `i + 1` for `known[i]`, or 0 then its name; a unit code (0: hours,
    /// 1: minutes, 2: seconds, the largest that divides every hour start's
    /// distance from `origin`); then the hours as [`MonthUsage::encode`]
    /// writes them, starts counted from `origin` in that unit. Read back
    /// with [`MonthUsage::decode_compact`].
    pub fn encode_compact(&self, origin: i64, known: &[&str]) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.regions.len() + self.hours.len() * 12 + self.public.len() * 5);
        put_varint(&mut out, self.regions.len() as u64);
        for r in &self.regions {
            match known.iter().position(|k| *k == &**r) {
                Some(i) => put_varint(&mut out, i as u64 + 1),
                None => {
                    put_varint(&mut out, 0);
                    put_varint(&mut out, r.len() as u64);
                    out.extend_from_slice(r.as_bytes());
                }
            }
        }
        let code = UNITS.iter().position(|u| self.hours.iter().all(|s| s.start.wrapping_sub(origin) % u == 0)).expect("1 divides");
        out.push(code as u8);
        self.encode_hours(&mut out, origin, UNITS[code]);
        out
    }

    /// The hour count, then each hour: its start's distance from the one
    /// before (the first from `origin`, zigzag) in `unit`s, its counters
    /// and its public entries.
    fn encode_hours(&self, out: &mut Vec<u8>, origin: i64, unit: i64) {
        put_varint(out, self.hours.len() as u64);
        let mut prev = origin;
        let mut from = 0usize;
        for (i, s) in self.hours.iter().enumerate() {
            if i == 0 {
                put_varint(out, zigzag(s.start.wrapping_sub(origin) / unit));
            } else {
                put_varint(out, ((s.start - prev) / unit) as u64);
            }
            prev = s.start;
            for v in s.counters {
                put_varint(out, v);
            }
            let public = &self.public[from..s.public_end as usize];
            put_varint(out, public.len() as u64);
            for &(r, b) in public {
                put_varint(out, u64::from(r));
                put_varint(out, b);
            }
            from = s.public_end as usize;
        }
    }

    /// Decodes bytes written by [`MonthUsage::encode`] (or any encoder of the
    /// same format: a region table out of order, unused names, zero or
    /// repeated entries are put in canonical form, repeats summed).
    pub fn decode(bytes: &[u8]) -> Result<MonthUsage, UsageDecodeError> {
        Ok(Self::from_parsed(parse(bytes)?))
    }

    /// Decodes bytes written by [`MonthUsage::encode_compact`] with the same
    /// `origin` and `known` (any encoder of that format, as
    /// [`MonthUsage::decode`]).
    pub fn decode_compact(bytes: &[u8], origin: i64, known: &[&str]) -> Result<MonthUsage, UsageDecodeError> {
        Ok(Self::from_parsed(parse_compact(bytes, origin, known)?))
    }

    /// The month of parsed bytes, put in canonical form where they are not.
    fn from_parsed(Parsed { names, hours, public }: Parsed<'_>) -> MonthUsage {
        let mut canonical = names.windows(2).all(|w| w[0] < w[1]);
        let mut used = vec![false; names.len()];
        let mut from = 0;
        for s in &hours {
            let run = &public[from..s.public_end as usize];
            canonical &= run.iter().all(|e| e.1 > 0) && run.windows(2).all(|w| w[0].0 < w[1].0);
            for e in run {
                used[e.0 as usize] = true;
            }
            from = s.public_end as usize;
        }
        if canonical && used.iter().all(|u| *u) {
            return MonthUsage { regions: names.into_iter().map(std::sync::Arc::from).collect(), hours, public };
        }
        // Not as this encoder writes it: rebuild entry by entry.
        let mut m = MonthUsage { regions: Vec::new(), hours: Vec::with_capacity(hours.len()), public: Vec::new() };
        let mut from = 0;
        for s in hours {
            let i = m.slot(s.start);
            m.add_counters(i, s.counters);
            for &(idx, b) in &public[from..s.public_end as usize] {
                if b > 0 {
                    m.add_public(i, names[idx as usize], b);
                }
            }
            from = s.public_end as usize;
        }
        m
    }
}

/// The units of [`MonthUsage::encode_compact`]'s hour starts, by code.
const UNITS: [i64; 3] = [3600, 60, 1];

/// Encoded usage as read: the region table (borrowed from the bytes) and
/// the hours and entries in the layout of [`MonthUsage`], not yet checked
/// for its invariants beyond hour order and index range.
struct Parsed<'a> {
    names: Vec<&'a str>,
    hours: Vec<Slot>,
    public: Vec<(u32, u64)>,
}

fn parse(bytes: &[u8]) -> Result<Parsed<'_>, UsageDecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let version = r.byte()?;
    if version != ENCODING_VERSION {
        return Err(UsageDecodeError::Version(version));
    }
    let n_regions = r.len()?;
    let mut names = Vec::with_capacity(n_regions);
    for _ in 0..n_regions {
        names.push(r.name()?);
    }
    parse_hours(r, names, 0, 1)
}

/// Bytes of [`MonthUsage::encode_compact`], as [`parse`].
fn parse_compact<'a>(bytes: &'a [u8], origin: i64, known: &[&'a str]) -> Result<Parsed<'a>, UsageDecodeError> {
    let mut r = Reader { b: bytes, pos: 0 };
    let n_regions = r.len()?;
    let mut names = Vec::with_capacity(n_regions.min(bytes.len()));
    for _ in 0..n_regions {
        names.push(match r.varint()? {
            0 => r.name()?,
            i => *known.get(i as usize - 1).ok_or(UsageDecodeError::Corrupt("unknown region code"))?,
        });
    }
    let unit = *UNITS.get(usize::from(r.byte()?)).ok_or(UsageDecodeError::Corrupt("unknown unit"))?;
    parse_hours(r, names, origin, unit)
}

/// The hours after the region table (see `MonthUsage::encode_hours`).
fn parse_hours<'a>(mut r: Reader<'a>, names: Vec<&'a str>, origin: i64, unit: i64) -> Result<Parsed<'a>, UsageDecodeError> {
    let bytes = r.b;
    let n_regions = names.len();
    let n_hours = r.len()?;
    // An hour takes at least six bytes (its start, four counters, its entry
    // count) and an entry two: reserve no more than the bytes can hold.
    let left = bytes.len() - r.pos;
    if n_hours > left / 6 {
        return Err(UsageDecodeError::Corrupt("truncated"));
    }
    let mut hours = Vec::with_capacity(n_hours);
    let mut public = Vec::with_capacity((left - 6 * n_hours) / 2);
    let mut prev = origin;
    let overflow = UsageDecodeError::Corrupt("hour overflow");
    for i in 0..n_hours {
        let start = if i == 0 {
            unzigzag(r.varint()?).checked_mul(unit).and_then(|d| origin.checked_add(d)).ok_or(overflow.clone())?
        } else {
            let d = r.varint()?;
            if d == 0 || d > i64::MAX as u64 {
                return Err(UsageDecodeError::Corrupt("hours out of order"));
            }
            (d as i64).checked_mul(unit).and_then(|d| prev.checked_add(d)).ok_or(overflow.clone())?
        };
        prev = start;
        let counters = [r.varint()?, r.varint()?, r.varint()?, r.varint()?];
        for _ in 0..r.len()? {
            let idx = r.varint()?;
            if idx >= n_regions as u64 {
                return Err(UsageDecodeError::Corrupt("region index out of range"));
            }
            public.push((idx as u32, r.varint()?));
        }
        let public_end = u32::try_from(public.len()).map_err(|_| UsageDecodeError::Corrupt("too many entries"))?;
        hours.push(Slot { start, counters, public_end });
    }
    if r.pos != bytes.len() {
        return Err(UsageDecodeError::Corrupt("trailing bytes"));
    }
    Ok(Parsed { names, hours, public })
}

/// Sums encoded month usages into one encoding, without building a
/// [`MonthUsage`]: the bytes equal decoding each, [`MonthUsage::merge`]-ing
/// them and encoding the sum. This is the store's merge operator. Regions
/// are numbered once per part (a part's table against the names seen so
/// far): entries compare numbers, not names.
pub fn merge_encoded<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<u8>, UsageDecodeError> {
    let mut names: Vec<&str> = Vec::new();
    let mut rows: Vec<NumberedRow> = Vec::new();
    let mut entries: Vec<(u32, u64)> = Vec::new();
    let mut local: Vec<u32> = Vec::new();
    for part in parts {
        let p = parse(part)?;
        local.clear();
        for n in &p.names {
            local.push(match names.iter().position(|x| x == n) {
                Some(i) => i as u32,
                None => {
                    names.push(n);
                    (names.len() - 1) as u32
                }
            });
        }
        let mut from = 0;
        for s in p.hours {
            let start = entries.len();
            entries.extend(p.public[from..s.public_end as usize].iter().map(|&(r, b)| (local[r as usize], b)));
            from = s.public_end as usize;
            rows.push(NumberedRow { hour_start: s.start, counters: s.counters, public: start..entries.len() });
        }
    }
    rows.sort_by_key(|r| r.hour_start);
    let mut merged: Vec<NumberedRow> = Vec::with_capacity(rows.len());
    let mut sums: Vec<(u32, u64)> = Vec::with_capacity(entries.len());
    let mut scratch: Vec<(u32, u64)> = Vec::new();
    let mut i = 0;
    while i < rows.len() {
        let hour = rows[i].hour_start;
        let mut counters = [0u64; 4];
        scratch.clear();
        while i < rows.len() && rows[i].hour_start == hour {
            for (c, v) in counters.iter_mut().zip(rows[i].counters) {
                *c = c.saturating_add(v);
            }
            scratch.extend_from_slice(&entries[rows[i].public.clone()]);
            i += 1;
        }
        scratch.sort_unstable_by_key(|(r, _)| *r);
        let start = sums.len();
        for &(r, b) in &scratch {
            // As decoding does: a zero entry is no usage (this encoder
            // never writes one).
            if b == 0 {
                continue;
            }
            match sums[start..].last_mut() {
                Some((last, v)) if *last == r => *v = v.saturating_add(b),
                _ => sums.push((r, b)),
            }
        }
        merged.push(NumberedRow { hour_start: hour, counters, public: start..sums.len() });
    }
    Ok(encode_numbered(&names, &merged, &sums))
}

/// One hour of usage whose public bytes are a range of a shared list of
/// (region number, bytes) entries, for [`encode_numbered`].
#[derive(Clone, Debug)]
pub struct NumberedRow {
    /// UTC epoch second at which the local hour starts.
    pub hour_start: i64,
    /// Calls, frontend-error calls, private outbound bytes, inbound bytes.
    pub counters: [u64; 4],
    /// The hour's entries in the shared list.
    pub public: std::ops::Range<usize>,
}

/// Encodes hours given in ascending, distinct order, whose public bytes
/// are entries (region number, bytes): numbers index `names` (distinct
/// names, any order), distinct within an hour, in any order; a zero entry
/// is no usage. The bytes are those of the [`MonthUsage`] with these hours
/// (the format [`MonthUsage::encode`] writes): the table holds the names
/// used, sorted, and each hour's entries follow the table's order. The
/// names are sorted once; entries compare numbers.
pub fn encode_numbered(names: &[&str], rows: &[NumberedRow], entries: &[(u32, u64)]) -> Vec<u8> {
    // A name's place in the table, u32::MAX while unused.
    let mut rank = vec![u32::MAX; names.len()];
    for &(r, b) in entries {
        if b > 0 {
            rank[r as usize] = 0;
        }
    }
    let mut table: Vec<u32> = (0..names.len() as u32).filter(|&r| rank[r as usize] == 0).collect();
    table.sort_unstable_by_key(|&r| names[r as usize]);
    for (i, &r) in table.iter().enumerate() {
        rank[r as usize] = i as u32;
    }
    let mut out = Vec::with_capacity(8 + table.iter().map(|&r| names[r as usize].len() + 1).sum::<usize>() + rows.len() * 16);
    out.push(ENCODING_VERSION);
    put_varint(&mut out, table.len() as u64);
    for &r in &table {
        let name = names[r as usize];
        put_varint(&mut out, name.len() as u64);
        out.extend_from_slice(name.as_bytes());
    }
    put_varint(&mut out, rows.len() as u64);
    let mut prev = 0i64;
    let mut hour: Vec<(u32, u64)> = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        if i == 0 {
            put_varint(&mut out, zigzag(row.hour_start));
        } else {
            put_varint(&mut out, (row.hour_start - prev) as u64);
        }
        prev = row.hour_start;
        for v in row.counters {
            put_varint(&mut out, v);
        }
        hour.clear();
        hour.extend(entries[row.public.clone()].iter().filter(|(_, b)| *b > 0).map(|&(r, b)| (rank[r as usize], b)));
        hour.sort_unstable_by_key(|(r, _)| *r);
        put_varint(&mut out, hour.len() as u64);
        for &(r, b) in &hour {
            put_varint(&mut out, u64::from(r));
            put_varint(&mut out, b);
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
    /// A region name: its length, then UTF-8 bytes.
    fn name(&mut self) -> Result<&'a str, UsageDecodeError> {
        let len = self.len()?;
        std::str::from_utf8(self.take(len)?).map_err(|_| UsageDecodeError::Corrupt("region is not UTF-8"))
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

    /// Hours as a plain map: the model the flat month is checked against.
    type Model = BTreeMap<i64, HourUsage>;

    fn arb_model() -> impl Strategy<Value = Model> {
        prop::collection::btree_map(
            -100_000i64..100_000_000_000,
            (0u64..1 << 40, 0u64..1000, 0u64..1 << 50, 0u64..1 << 50, prop::collection::btree_map("[a-z-]{1,12}", 1u64..1 << 50, 0..4)),
            0..20,
        )
        .prop_map(|m| {
            m.into_iter()
                .map(|(h, (c, f, p, i, pb))| {
                    (h, HourUsage { calls: c, frontend_error_calls: f, private_out_bytes: p, inbound_bytes: i, public_out_bytes: pb })
                })
                .collect()
        })
    }

    /// The model's hours put into a month in the order `order` gives (a
    /// permutation key per hour), so hours and region names arrive out of order.
    fn month_of(model: &Model, order: &[u64]) -> MonthUsage {
        let hours: Vec<(&i64, &HourUsage)> = model.iter().collect();
        let mut idx: Vec<usize> = (0..hours.len()).collect();
        idx.sort_by_key(|&i| order.get(i).copied().unwrap_or(0));
        let hours: Vec<_> = idx.into_iter().map(|i| hours[i]).collect();
        let mut m = MonthUsage::default();
        for (h, u) in hours {
            m.add_hour(*h, u);
        }
        m
    }

    fn model_of(m: &MonthUsage) -> Model {
        m.hours().map(|h| (h.hour_start, h.to_owned())).collect()
    }

    fn arb_month() -> impl Strategy<Value = MonthUsage> {
        (arb_model(), prop::collection::vec(any::<u64>(), 20)).prop_map(|(model, order)| month_of(&model, &order))
    }

    /// One hour at 02:00 of a block starting 00:00, 3 calls, 5 public
    /// bytes in a known region and 7 in another: 18 bytes.
    #[test]
    fn the_compact_encoding_numbers_known_regions_and_counts_hours_from_the_origin() {
        let mut m = MonthUsage::default();
        let hour = HourUsage {
            calls: 3,
            public_out_bytes: [("eu".to_string(), 7), ("ap-x".to_string(), 5)].into_iter().collect(),
            ..HourUsage::default()
        };
        m.add_hour(86_400 + 7_200, &hour);
        let bytes = m.encode_compact(86_400, &["zz", "ap-x"]);
        // 2 regions: known #2, then "eu" by name; unit hours; 1 hour at +2
        // (zigzag 4); counters 3 0 0 0; 2 entries (region 0: 5, region 1: 7).
        assert_eq!(bytes, vec![2, 2, 0, 2, b'e', b'u', 0, 1, 4, 3, 0, 0, 0, 2, 0, 5, 1, 7]);
        assert_eq!(MonthUsage::decode_compact(&bytes, 86_400, &["zz", "ap-x"]).unwrap(), m);
        assert!(MonthUsage::decode_compact(&bytes, 86_400, &["zz"]).is_err(), "a region code past the known names");
        // Not on the hour grid: minutes.
        let mut m = MonthUsage::default();
        m.add_hour(86_400 + 1_800, &HourUsage { calls: 1, ..HourUsage::default() });
        assert_eq!(m.encode_compact(86_400, &[]), vec![0, 1, 1, 60, 1, 0, 0, 0, 0]);
    }

    proptest! {
        #[test]
        fn encoding_roundtrips(m in arb_month()) {
            prop_assert_eq!(MonthUsage::decode(&m.encode()).unwrap(), m);
        }

        /// The compact encoding reads back with its origin and known names,
        /// whatever the hours' distances from the origin (whole hours,
        /// minutes or seconds) and whichever names are known.
        #[test]
        fn the_compact_encoding_roundtrips(m in arb_month(), origin in -200_000i64..200_000, scale in 0usize..3, known in prop::collection::vec("[a-z-]{1,3}", 0..6)) {
            // Hour starts moved onto the unit grid of `scale` from `origin`.
            let mut grid = MonthUsage::default();
            for h in m.hours() {
                let start = origin + (h.hour_start - origin).rem_euclid(1 << 20) * UNITS[scale];
                grid.add_view(&HourView { hour_start: start, ..h });
            }
            let known: Vec<&str> = known.iter().map(String::as_str).collect();
            let bytes = grid.encode_compact(origin, &known);
            prop_assert_eq!(MonthUsage::decode_compact(&bytes, origin, &known).unwrap(), grid);
        }

        /// Built in any order, the flat month holds the model's hours, and
        /// encodes to the bytes the row encoder (the format's definition, and
        /// what the pipeline writes) gives for them.
        #[test]
        fn a_month_built_in_any_order_is_its_model(model in arb_model(), order in prop::collection::vec(any::<u64>(), 20)) {
            let m = month_of(&model, &order);
            prop_assert_eq!(&model_of(&m), &model);
            prop_assert_eq!(m.calls(), model.values().map(|h| h.calls).sum::<u64>());
            // Names numbered in first-seen order, not sorted: the encoder sorts them.
            let mut names: Vec<&str> = Vec::new();
            let mut entries: Vec<(u32, u64)> = Vec::new();
            let rows: Vec<NumberedRow> = model
                .iter()
                .map(|(start, h)| {
                    let from = entries.len();
                    for (r, b) in h.public_out_bytes.iter().rev() {
                        let n = names.iter().position(|x| *x == r.as_str()).unwrap_or_else(|| {
                            names.push(r);
                            names.len() - 1
                        });
                        entries.push((n as u32, *b));
                    }
                    NumberedRow {
                        hour_start: *start,
                        counters: [h.calls, h.frontend_error_calls, h.private_out_bytes, h.inbound_bytes],
                        public: from..entries.len(),
                    }
                })
                .collect();
            prop_assert_eq!(m.encode(), encode_numbered(&names, &rows, &entries));
            for (start, h) in &model {
                prop_assert_eq!(m.hour(*start).map(|v| v.to_owned()), Some(h.clone()));
            }
        }

        /// Adding events one by one equals adding their hours.
        #[test]
        fn adding_events_equals_adding_hours(events in prop::collection::vec((0i64..6, 0usize..3, 0u64..3, any::<bool>()), 0..40)) {
            let names = ["eu-frankfurt", "ap-guangzhou", "na-ashburn"];
            let mut by_event = MonthUsage::default();
            let mut model = Model::new();
            for (h, r, bytes, fe) in events {
                let start = 1_604_000_000 + h * 3600;
                let m = Metered { frontend_error: fe, public_out_bytes: bytes, private_out_bytes: 1, inbound_bytes: 2 };
                by_event.add(start, names[r], &m);
                let e = model.entry(start).or_default();
                e.calls += 1;
                e.frontend_error_calls += u64::from(fe);
                e.private_out_bytes += 1;
                e.inbound_bytes += 2;
                if bytes > 0 {
                    *e.public_out_bytes.entry(names[r].to_string()).or_insert(0) += bytes;
                }
            }
            prop_assert_eq!(model_of(&by_event), model);
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

    /// Bytes of the format that this encoder would not write (names out of
    /// order, an unused name, a zero entry, a repeated region) decode to the
    /// canonical month: equal to the one built from the same usage.
    #[test]
    fn decode_puts_other_writers_bytes_in_canonical_form() {
        let mut b = vec![ENCODING_VERSION, 3];
        for name in ["zz", "aa", "unused"] {
            b.push(name.len() as u8);
            b.extend_from_slice(name.as_bytes());
        }
        // One hour at 0: calls 5, then entries zz=7, aa=0, aa=3, zz=1.
        b.extend_from_slice(&[1, 0, 5, 0, 0, 0, 4, 0, 7, 1, 0, 1, 3, 0, 1]);
        let m = MonthUsage::decode(&b).unwrap();
        let mut want = MonthUsage::default();
        want.add_hour(
            0,
            &HourUsage { calls: 5, public_out_bytes: BTreeMap::from([("aa".into(), 3), ("zz".into(), 8)]), ..Default::default() },
        );
        assert_eq!(m, want);
        assert_eq!(m.hour(0).unwrap().public_out_bytes().collect::<Vec<_>>(), [("aa", 3), ("zz", 8)]);
        assert_eq!(MonthUsage::decode(&m.encode()).unwrap(), want);
        // The merge operator agrees with decoding.
        assert_eq!(merge_encoded([b.as_slice()]).unwrap(), want.encode());
        assert_eq!(merge_encoded([b.as_slice(), want.encode().as_slice()]).unwrap(), {
            let mut twice = want.clone();
            twice.merge(&want);
            twice.encode()
        });
    }

    #[test]
    fn refuses_other_versions() {
        let mut b = MonthUsage::default().encode();
        b[0] = 9;
        assert_eq!(MonthUsage::decode(&b), Err(UsageDecodeError::Version(9)));
    }
}
