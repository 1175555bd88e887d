//! Why a bill is what it is: one account-month's hours in the billing time
//! zone with what the free tier, each pack and each trial took in each hour,
//! where each price tier began, and each charge line's arithmetic. Computed
//! by the same functions as the bill ([`deduct_traced`] is [`deduct`] with
//! an observer, the lines and total are the bill's own), so the explanation
//! sums to the bill exactly.
//!
//! [`deduct`]: super::entitlements::deduct

use super::account::{AccountRecord, PackItem};
use super::bill::{compute_bills, month_pricing, AppliedTerm, BillContent};
use super::calendar::Month;
use super::config::{Rules, Tier};
use super::entitlements::{deduct_traced, HourTrace, RegionTrace, Take};
use super::money::exact_discounted_amount;
use super::usage::MonthUsage;
use rust_decimal::Decimal;
use serde::Serialize;
use std::collections::BTreeMap;

/// One account-month, explained.
#[derive(Clone, Debug, Serialize)]
pub struct Explanation {
    /// The account.
    pub account_id: String,
    /// `YYYY-MM`.
    pub month: String,
    /// The billing time zone the hours are shown in.
    pub time_zone: String,
    /// Whether an account record was known (free tier and packs apply).
    pub account_known: bool,
    /// Every hour with usage, in order.
    pub hours: Vec<ExplainedHour>,
    /// Where each price tier after the first began, in order.
    pub tier_starts: Vec<TierStart>,
    /// Each charge line with its arithmetic.
    pub charges: Vec<ExplainedCharge>,
    /// The bill's total: the sum of the rounded lines.
    pub total_amount: Decimal,
    /// Currency of the amounts.
    pub currency: String,
    /// The price version that priced the month (`None`: an unnamed
    /// `[billing.prices]`), and the month it took effect (`None`: since always).
    pub price_version: Option<String>,
    /// The first month of that version, `YYYY-MM`.
    pub price_version_from: Option<String>,
    /// The account's pricing terms that applied.
    pub pricing_terms: Vec<AppliedTerm>,
    /// The bill this explains (as the worker computes and emits it).
    pub bill: BillContent,
    /// The bill's content hash.
    pub content_hash: String,
}

/// One hour of the month.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainedHour {
    /// The hour's start in the billing time zone (RFC 3339).
    pub start: String,
    /// Inside a trial period: nothing drawn, nothing charged.
    pub trial: bool,
    /// Calls, frontend errors included.
    pub calls: u64,
    /// Calls that failed in the gateway frontend (never billed).
    pub frontend_error_calls: u64,
    /// What each pack took of the billable calls, in deduction order.
    pub calls_taken: Vec<Take>,
    /// Calls left to pay for in this hour.
    pub chargeable_calls: u64,
    /// The month's chargeable calls up to and including this hour.
    pub chargeable_calls_so_far: u64,
    /// Public outbound bytes per region.
    pub regions: Vec<ExplainedRegion>,
}

/// One region's public outbound bytes in one hour.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainedRegion {
    /// The walk: bytes, what each pack took, what is left to pay for.
    #[serde(flatten)]
    pub walk: RegionTrace,
    /// The month's chargeable bytes in this region up to and including this hour.
    pub chargeable_so_far: u64,
}

/// The hour in which a price tier after the first began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TierStart {
    /// Calls or public outbound bytes.
    pub item: PackItem,
    /// The region, for traffic.
    pub region: Option<String>,
    /// The tier that began (2 or more).
    pub tier: u32,
    /// Chargeable quantity of the month after which it applies.
    pub beyond: u64,
    /// The hour (billing time zone) in which the quantity passed `beyond`.
    pub hour: String,
}

/// A charge line and how its amount came about.
#[derive(Clone, Debug, Serialize)]
pub struct ExplainedCharge {
    /// Calls or public outbound bytes.
    pub item: PackItem,
    /// The region, for traffic.
    pub region: Option<String>,
    /// The tier, from 1.
    pub tier: u32,
    /// Calls or bytes in this tier.
    pub quantity: u64,
    /// The priced unit (`10000 calls`, `GB`).
    pub unit: String,
    /// Calls or bytes per priced unit.
    pub unit_size: u64,
    /// Price per unit (the list price).
    pub unit_price: Decimal,
    /// The account's discount on the line, if any.
    pub discount: Option<Decimal>,
    /// `quantity / unit_size x unit_price x (1 - discount)`, every digit.
    pub exact: String,
    /// Rounded to cents, half away from zero.
    pub amount: Decimal,
}

/// Explains `month` of `account_id`. `usages` are all the account's months
/// (pack balances run across months); `None` when `month` has no usage.
pub fn explain(
    account_id: &str,
    account: Option<&AccountRecord>,
    usages: &BTreeMap<Month, MonthUsage>,
    month: Month,
    rules: &Rules,
) -> Option<Explanation> {
    let bill = compute_bills(account_id, account, usages, rules).into_iter().find(|b| b.month == month)?;
    let mut walk: Vec<HourTrace> = Vec::new();
    let mut keep = |t: HourTrace| {
        if t.month == month {
            walk.push(t);
        }
    };
    deduct_traced(account, usages, rules, Some(&mut keep));
    let local = |hour: i64| rules.calendar.local_rfc3339(hour);
    let pricing = month_pricing(account, month, rules);

    let mut hours = Vec::with_capacity(walk.len());
    let mut tier_starts = Vec::new();
    let mut calls_so_far = 0u64;
    let mut bytes_so_far: BTreeMap<String, u64> = BTreeMap::new();
    for t in walk {
        let start = local(t.hour);
        let before = calls_so_far;
        calls_so_far += t.chargeable_calls;
        tier_starts.extend(starts(PackItem::Calls, None, &pricing.list.call_tiers, before, calls_so_far, &start));
        let regions = t
            .regions
            .into_iter()
            .map(|r| {
                let so_far = bytes_so_far.entry(r.region.clone()).or_insert(0);
                let before = *so_far;
                *so_far += r.chargeable;
                let tiers = pricing.list.traffic_tiers(&r.region);
                tier_starts.extend(starts(PackItem::PublicOutBytes, Some(&r.region), tiers, before, *so_far, &start));
                ExplainedRegion { chargeable_so_far: *so_far, walk: r }
            })
            .collect();
        hours.push(ExplainedHour {
            start,
            trial: t.trial,
            calls: t.calls,
            frontend_error_calls: t.frontend_error_calls,
            calls_taken: t.calls_taken,
            chargeable_calls: t.chargeable_calls,
            chargeable_calls_so_far: calls_so_far,
            regions,
        });
    }
    let charges = bill
        .content
        .charges
        .iter()
        .map(|c| ExplainedCharge {
            item: c.item,
            region: c.region.clone(),
            tier: c.tier,
            quantity: c.quantity,
            unit: c.unit.clone(),
            unit_size: c.unit_size,
            unit_price: c.unit_price,
            discount: c.discount,
            exact: exact_discounted_amount(c.quantity, c.unit_price, c.unit_size, c.discount.unwrap_or_default()),
            amount: c.amount,
        })
        .collect();
    Some(Explanation {
        account_id: account_id.to_string(),
        month: month.to_string(),
        time_zone: rules.time_zone.clone(),
        account_known: account.is_some(),
        hours,
        tier_starts,
        charges,
        total_amount: bill.content.total_amount,
        currency: bill.content.currency.clone(),
        price_version: bill.content.price_version.clone(),
        price_version_from: pricing.version.from.map(|m| m.to_string()),
        pricing_terms: bill.content.pricing_terms.clone(),
        content_hash: bill.content_hash,
        bill: bill.content,
    })
}

/// The tiers after the first that begin when a month's chargeable quantity
/// goes from `before` to `after` in one hour: tier k+1 begins past tier k's
/// inclusive upper bound.
fn starts(item: PackItem, region: Option<&str>, tiers: &[Tier], before: u64, after: u64, hour: &str) -> Vec<TierStart> {
    tiers
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let beyond = t.up_to?;
            (i + 1 < tiers.len() && before <= beyond && after > beyond).then(|| TierStart {
                item,
                region: region.map(String::from),
                tier: i as u32 + 2,
                beyond,
                hour: hour.to_string(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::config::BillingConfig;
    use crate::billing::decode_account;
    use crate::billing::usage::HourUsage;

    fn rules() -> Rules {
        let mut c = BillingConfig::default();
        c.trial_periods.clear();
        c.validate().unwrap()
    }

    fn usage_at(rules: &Rules, months: &mut BTreeMap<Month, MonthUsage>, at: &str, calls: u64) {
        let ms = chrono::DateTime::parse_from_rfc3339(at).unwrap().timestamp_millis();
        let (m, hour) = rules.calendar.place(ms);
        months.entry(m).or_default().add_hour(hour, &HourUsage { calls, ..Default::default() });
    }

    /// No free tier (unknown account), calls over the first tier's bound
    /// in the second hour: tier 2 begins there, and the lines' quantities
    /// are the chargeable calls.
    #[test]
    fn a_tier_begins_in_the_hour_that_passes_its_bound() {
        let r = rules();
        let bound = r.versions[0].prices.call_tiers[0].up_to.expect("a bounded first tier");
        let mut months = BTreeMap::new();
        usage_at(&r, &mut months, "2021-03-01T10:00:00+08:00", bound - 5);
        usage_at(&r, &mut months, "2021-03-02T10:00:00+08:00", 10);
        let e = explain("X", None, &months, "2021-03".parse().unwrap(), &r).unwrap();
        assert_eq!(e.hours.len(), 2);
        assert_eq!(e.hours[1].chargeable_calls_so_far, bound + 5);
        assert_eq!(
            e.tier_starts,
            vec![TierStart { item: PackItem::Calls, region: None, tier: 2, beyond: bound, hour: "2021-03-02T10:00:00+08:00".into() }]
        );
        assert_eq!(e.charges.iter().map(|c| c.quantity).collect::<Vec<_>>(), vec![bound, 5]);
        assert_eq!(e.charges.iter().map(|c| c.amount).sum::<Decimal>(), e.total_amount);
    }

    /// A month without usage has nothing to explain.
    #[test]
    fn a_month_without_usage_is_none() {
        let r = rules();
        let mut months = BTreeMap::new();
        usage_at(&r, &mut months, "2021-03-01T10:00:00+08:00", 1);
        let a = decode_account(br#"{"account_id":"X","activated_at":"2021-01-01T00:00:00+08:00","resource_packs":[]}"#).unwrap();
        assert!(explain("X", Some(&a), &months, "2021-04".parse().unwrap(), &r).is_none());
    }
}
