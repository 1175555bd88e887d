//! Entitlements (spec sections 4-6): the free tier as a monthly pack with a
//! validity window, trial periods, purchased packs whose balance runs across
//! months, and the deduction order free tier -> packs -> pay-as-you-go.

use super::account::{AccountRecord, PackItem};
use super::calendar::{add_months, Month};
use super::config::Rules;
use super::usage::MonthUsage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a pack came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackSource {
    /// The monthly free-tier pack.
    FreeTier,
    /// A purchased or campaign pack from the account record.
    Purchase,
}

/// What one pack absorbed in one month.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Deduction {
    /// `free-tier/YYYY-MM` for the free tier, else the pack's id.
    pub pack_id: String,
    /// Free tier or purchase.
    pub source: PackSource,
    /// Calls or public outbound bytes.
    pub item: PackItem,
    /// Calls or bytes absorbed this month.
    pub quantity: u64,
}

/// The outcome of deduction for one month.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MonthDeduction {
    /// Billable calls (frontend errors excluded) inside a trial period.
    pub trial_calls: u64,
    /// Public outbound bytes inside a trial period.
    pub trial_public_out_bytes: u64,
    /// What each pack absorbed, sorted by (source, item, pack id).
    pub deductions: Vec<Deduction>,
    /// Calls left to pay for.
    pub chargeable_calls: u64,
    /// Public outbound bytes left to pay for, by gateway region (non-zero only).
    pub chargeable_bytes: BTreeMap<String, u64>,
}

/// The free tier's validity window `[from, until)` in UTC epoch seconds:
/// from the start of the activation month to the end of the day `months`
/// months after activation (same calendar day, clamped to the month's length).
pub fn free_tier_window(activated_at: i64, months: u32, rules: &Rules) -> (i64, i64) {
    let cal = &rules.calendar;
    let activation_date = cal.local_date(activated_at);
    let from = cal.month_start(cal.month_of(activated_at * 1000));
    let last_day = add_months(activation_date, months);
    let until = cal.day_start(last_day.succ_opt().unwrap_or(last_day));
    (from, until)
}

/// One pack during deduction.
struct Pack {
    id: String,
    source: PackSource,
    from: i64,
    until: i64,
    balance: u64,
}

/// What one pack gave in one hour (see [`deduct_traced`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Take {
    /// `free-tier/YYYY-MM` for the free tier, else the pack's id.
    pub pack_id: String,
    /// Free tier or purchase.
    pub source: PackSource,
    /// Calls or bytes taken.
    pub quantity: u64,
}

/// One region's public outbound bytes in one hour (see [`HourTrace`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RegionTrace {
    /// The gateway region.
    pub region: String,
    /// Public outbound bytes in the hour.
    pub bytes: u64,
    /// What each pack took, in deduction order.
    pub taken: Vec<Take>,
    /// Bytes left to pay for.
    pub chargeable: u64,
}

/// The deduction walk of one hour, as [`deduct_traced`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HourTrace {
    /// The month the hour is billed in.
    pub month: Month,
    /// The hour's start, UTC epoch seconds.
    pub hour: i64,
    /// Inside a trial period: nothing is drawn or charged.
    pub trial: bool,
    /// Calls in the hour, frontend errors included.
    pub calls: u64,
    /// Calls that failed in the gateway frontend (never billed).
    pub frontend_error_calls: u64,
    /// What each pack took of the billable calls, in deduction order.
    pub calls_taken: Vec<Take>,
    /// Calls left to pay for.
    pub chargeable_calls: u64,
    /// Public outbound bytes per region, in region order.
    pub regions: Vec<RegionTrace>,
}

/// Takes `want` from the eligible packs in order, recording what each gave
/// (and, with `log`, each take in order).
fn draw(packs: &mut [Pack], hour: i64, mut want: u64, taken: &mut BTreeMap<usize, u64>, mut log: Option<&mut Vec<Take>>) -> u64 {
    for (i, p) in packs.iter_mut().enumerate() {
        if want == 0 {
            break;
        }
        if p.balance == 0 || hour < p.from || hour >= p.until {
            continue;
        }
        let t = want.min(p.balance);
        p.balance -= t;
        want -= t;
        *taken.entry(i).or_insert(0) += t;
        if let Some(log) = log.as_deref_mut() {
            log.push(Take { pack_id: p.id.clone(), source: p.source, quantity: t });
        }
    }
    want
}

/// Whether each month's bill depends only on its own usage: true unless the
/// account has purchased packs, whose balance runs across months.
pub fn months_are_independent(account: Option<&AccountRecord>) -> bool {
    account.is_none_or(|a| a.resource_packs.is_empty())
}

/// Applies trial periods, the free tier and packs to every month, in
/// chronological order of months, hours, and (within an hour) regions.
pub fn deduct(account: Option<&AccountRecord>, usages: &BTreeMap<Month, MonthUsage>, rules: &Rules) -> BTreeMap<Month, MonthDeduction> {
    deduct_traced(account, usages, rules, None)
}

/// [`deduct`], reporting every hour's walk to `trace` (in the same order)
/// when given: what `gatebill explain` prints. The results are the same.
pub fn deduct_traced(
    account: Option<&AccountRecord>,
    usages: &BTreeMap<Month, MonthUsage>,
    rules: &Rules,
    mut trace: Option<&mut dyn FnMut(HourTrace)>,
) -> BTreeMap<Month, MonthDeduction> {
    let cal = &rules.calendar;
    let free_window = match (account, &rules.free_tier) {
        (Some(a), Some(ft)) => Some((free_tier_window(a.activated_at, ft.months, rules), ft)),
        _ => None,
    };
    // Purchased packs per item, in consumption order: expiring first, then smaller id.
    let mut purchased: BTreeMap<PackItem, Vec<Pack>> = BTreeMap::new();
    if let Some(a) = account {
        for p in &a.resource_packs {
            purchased.entry(p.item).or_default().push(Pack {
                id: p.id.clone(),
                source: PackSource::Purchase,
                from: p.valid_from,
                until: p.valid_until,
                balance: p.quantity,
            });
        }
    }
    for packs in purchased.values_mut() {
        packs.sort_by(|a, b| (a.until, &a.id).cmp(&(b.until, &b.id)));
    }
    let mut bought_calls = purchased.remove(&PackItem::Calls).unwrap_or_default();
    let mut bought_bytes = purchased.remove(&PackItem::PublicOutBytes).unwrap_or_default();
    let mut out = BTreeMap::new();
    for (month, usage) in usages {
        let mut d = MonthDeduction::default();
        let (m_start, m_end) = (cal.month_start(*month), cal.month_end(*month));
        // This month's free-tier packs, one per item, if the month overlaps the window.
        let (mut free_calls, mut free_bytes) = (Vec::new(), Vec::new());
        if let Some(((from, until), ft)) = free_window {
            if m_start < until && m_end > from {
                for (packs, qty) in [(&mut free_calls, ft.calls_per_month), (&mut free_bytes, ft.public_out_bytes_per_month)] {
                    packs.push(Pack {
                        id: format!("free-tier/{month}"),
                        source: PackSource::FreeTier,
                        from: from.max(m_start),
                        until: until.min(m_end),
                        balance: qty,
                    });
                }
            }
        }
        // Quantity taken per pack index: [free calls, free bytes, bought calls, bought bytes].
        let mut taken: [BTreeMap<usize, u64>; 4] = Default::default();
        for h in usage.hours() {
            let hour = h.hour_start;
            let billable = h.calls.saturating_sub(h.frontend_error_calls);
            let mut t = trace.is_some().then(|| HourTrace {
                month: *month,
                hour,
                trial: false,
                calls: h.calls,
                frontend_error_calls: h.frontend_error_calls,
                calls_taken: Vec::new(),
                chargeable_calls: 0,
                regions: Vec::new(),
            });
            if rules.in_trial(hour) {
                d.trial_calls += billable;
                d.trial_public_out_bytes += h.public_out_total();
                if let (Some(f), Some(mut t)) = (trace.as_deref_mut(), t) {
                    t.trial = true;
                    t.regions = h
                        .public_out_bytes()
                        .map(|(r, bytes)| RegionTrace { region: r.to_string(), bytes, taken: Vec::new(), chargeable: 0 })
                        .collect();
                    f(t);
                }
                continue;
            }
            let [free_calls_taken, free_bytes_taken, bought_calls_taken, bought_bytes_taken] = &mut taken;
            let left = draw(&mut free_calls, hour, billable, free_calls_taken, t.as_mut().map(|t| &mut t.calls_taken));
            let chargeable = draw(&mut bought_calls, hour, left, bought_calls_taken, t.as_mut().map(|t| &mut t.calls_taken));
            d.chargeable_calls += chargeable;
            if let Some(t) = t.as_mut() {
                t.chargeable_calls = chargeable;
            }
            for (region, bytes) in h.public_out_bytes() {
                let mut r = t.as_ref().map(|_| RegionTrace { region: region.to_string(), bytes, taken: Vec::new(), chargeable: 0 });
                let left = draw(&mut free_bytes, hour, bytes, free_bytes_taken, r.as_mut().map(|r| &mut r.taken));
                let left = draw(&mut bought_bytes, hour, left, bought_bytes_taken, r.as_mut().map(|r| &mut r.taken));
                if let (Some(t), Some(mut r)) = (t.as_mut(), r) {
                    r.chargeable = left;
                    t.regions.push(r);
                }
                if left > 0 {
                    match d.chargeable_bytes.get_mut(region) {
                        Some(v) => *v += left,
                        None => {
                            d.chargeable_bytes.insert(region.to_string(), left);
                        }
                    }
                }
            }
            if let (Some(f), Some(t)) = (trace.as_deref_mut(), t) {
                f(t);
            }
        }
        let packs = [
            (&taken[0], &free_calls, PackItem::Calls),
            (&taken[1], &free_bytes, PackItem::PublicOutBytes),
            (&taken[2], &bought_calls, PackItem::Calls),
            (&taken[3], &bought_bytes, PackItem::PublicOutBytes),
        ];
        for (by_pack, packs, item) in packs {
            for (&i, &q) in by_pack {
                if q > 0 {
                    let p = &packs[i];
                    d.deductions.push(Deduction { pack_id: p.id.clone(), source: p.source, item, quantity: q });
                }
            }
        }
        d.deductions.sort_by(|a, b| (a.source, a.item, &a.pack_id).cmp(&(b.source, b.item, &b.pack_id)));
        out.insert(*month, d);
    }
    out
}
