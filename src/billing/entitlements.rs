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

/// Takes `want` from the eligible packs in order, recording what each gave.
fn draw(packs: &mut [Pack], hour: i64, mut want: u64, taken: &mut BTreeMap<usize, u64>) -> u64 {
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
        for (&hour, h) in &usage.hours {
            let billable = h.calls.saturating_sub(h.frontend_error_calls);
            if rules.in_trial(hour) {
                d.trial_calls += billable;
                d.trial_public_out_bytes += h.public_out_total();
                continue;
            }
            let [free_calls_taken, free_bytes_taken, bought_calls_taken, bought_bytes_taken] = &mut taken;
            let left = draw(&mut free_calls, hour, billable, free_calls_taken);
            d.chargeable_calls += draw(&mut bought_calls, hour, left, bought_calls_taken);
            for (region, &bytes) in &h.public_out_bytes {
                let left = draw(&mut free_bytes, hour, bytes, free_bytes_taken);
                let left = draw(&mut bought_bytes, hour, left, bought_bytes_taken);
                if left > 0 {
                    match d.chargeable_bytes.get_mut(region.as_ref()) {
                        Some(v) => *v += left,
                        None => {
                            d.chargeable_bytes.insert(region.to_string(), left);
                        }
                    }
                }
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
