//! Price versions and account pricing in the billing core (rule book
//! section 11, issue 29): each month priced by the version in force at its
//! first instant, named on the bill; a version added in the future changes
//! no bill; a discount applied to the exact product of each line and
//! rounded once; an account's own prices for the months its term covers;
//! overlapping terms left out and reported while the rest of the record
//! applies; `explain` of a discounted month summing to the bill.

mod common;

use gatebill::billing::explain::explain;
use gatebill::billing::{
    compute_bills, decode_account_checked, BillingConfig, ConfigError, Month, MonthUsage, PackItem, RejectReason, Rules,
};
use rust_decimal::Decimal;
use std::collections::BTreeMap;

const GIB: u64 = 1 << 30;

fn dec(s: &str) -> Decimal {
    s.parse().unwrap()
}

/// No trial periods; `extra` TOML (price versions) appended to `[billing]`.
fn rules(extra: &str) -> Rules {
    let mut cfg = BillingConfig::from_toml(&format!("trial_periods = []\n{extra}")).unwrap();
    cfg.trial_periods.clear();
    cfg.validate().unwrap()
}

/// A `[[price_versions]]` entry with flat call and traffic prices.
fn version(id: &str, from: &str, calls: &str, traffic: &str) -> String {
    format!("[[price_versions]]\nid = \"{id}\"\neffective_from = \"{from}\"\ncalls = [{{ price = \"{calls}\" }}]\ntraffic_default = [{{ price = \"{traffic}\" }}]\n")
}

/// A version from January 2021 with cheaper calls and traffic.
const JANUARY_2021: &str = r#"
[prices]
id = "list-2020"
[[price_versions]]
id = "list-2021"
effective_from = "2021-01-01T00:00:00+08:00"
calls = [{ up_to = 10000000, price = "0.05" }, { price = "0.02" }]
traffic_default = [{ price = "0.50" }]
"#;

use common::put_usage as put;

/// 2,000,000 calls and 2 GiB in the last hour of 2020 and again in the
/// first hour of 2021 (no account record: no free tier).
fn across_new_year(rules: &Rules) -> BTreeMap<Month, MonthUsage> {
    let mut m = BTreeMap::new();
    put(rules, &mut m, "2020-12-31T23:30:00+08:00", 2_000_000, &[("ap-guangzhou", 2 * GIB)]);
    put(rules, &mut m, "2021-01-01T00:00:00+08:00", 2_000_000, &[("ap-guangzhou", 2 * GIB)]);
    m
}

#[test]
fn each_month_is_priced_by_the_version_in_force_at_its_first_instant_and_named() {
    let r = rules(JANUARY_2021);
    let bills = compute_bills("A", None, &across_new_year(&r), &r);
    let by_month: BTreeMap<String, _> = bills.iter().map(|b| (b.content.month.clone(), &b.content)).collect();
    let dec2020 = by_month["2020-12"];
    // 200 x 0.06 = 12.00 and 2 GB x 0.80 = 1.60.
    assert_eq!(dec2020.price_version.as_deref(), Some("list-2020"));
    let amounts: Vec<String> = dec2020.charges.iter().map(|c| format!("{} {}", c.unit_price, c.amount)).collect();
    assert_eq!(amounts, ["0.06 12.00", "0.80 1.60"]);
    assert_eq!(dec2020.total_amount, dec("13.60"));
    // The same usage an hour later: 200 x 0.05 = 10.00 and 2 GB x 0.50 = 1.00.
    let jan2021 = by_month["2021-01"];
    assert_eq!(jan2021.price_version.as_deref(), Some("list-2021"));
    let amounts: Vec<String> = jan2021.charges.iter().map(|c| format!("{} {}", c.unit_price, c.amount)).collect();
    assert_eq!(amounts, ["0.05 10.00", "0.50 1.00"]);
    assert_eq!(jan2021.total_amount, dec("11.00"));
    let json = String::from_utf8(bills[1].content_json.clone()).unwrap();
    assert!(json.ends_with(r#""currency":"CNY","price_version":"list-2021"}"#), "{json}");
}

#[test]
fn a_version_added_in_the_future_of_every_month_changes_no_bill() {
    let without = rules("");
    let usage = across_new_year(&without);
    let with = rules(&version("list-2030", "2030-01-01T00:00:00+08:00", "1.00", "9.00"));
    let a: Vec<Vec<u8>> = compute_bills("A", None, &usage, &without).into_iter().map(|b| b.content_json).collect();
    let b: Vec<Vec<u8>> = compute_bills("A", None, &usage, &with).into_iter().map(|b| b.content_json).collect();
    assert_eq!(a.len(), 2);
    assert_eq!(a, b, "byte-identical bills");
    // An unnamed [billing.prices] names no version: bills as before versions existed.
    assert!(!String::from_utf8(a[0].clone()).unwrap().contains("price_version"));
    // For the months it does cover, the new version prices them.
    let mut far = usage.clone();
    put(&with, &mut far, "2030-02-01T00:00:00+08:00", 10_000, &[]);
    let bills = compute_bills("A", None, &far, &with);
    assert_eq!((bills[2].content.price_version.as_deref(), bills[2].content.total_amount), (Some("list-2030"), dec("1.00")));
}

#[test]
fn version_errors_name_the_version() {
    let err = |extra: &str| BillingConfig::from_toml(extra).unwrap().validate().unwrap_err();
    let mid_month = version("v2", "2021-01-15T00:00:00+08:00", "0.05", "0.50");
    let e = err(&mid_month);
    assert!(matches!(&e, ConfigError::BadVersion { index: 0, id, .. } if id == "v2"), "{e}");
    assert!(e.to_string().contains("is not the first instant of a month in the billing time zone Asia/Shanghai"), "{e}");
    // A month start in UTC is not one in Asia/Shanghai.
    let utc = mid_month.replace("2021-01-15T00:00:00+08:00", "2021-01-01T00:00:00Z");
    assert!(err(&utc).to_string().contains("not the first instant of a month"));
    let twice = format!("{}{}", mid_month.replace("-15T", "-01T"), mid_month.replace("-15T", "-01T").replace("\"v2\"", "\"v3\""));
    let e = err(&twice);
    assert_eq!(e.to_string(), "billing.price_versions[1] (id `v3`): takes effect in the same month as `v2`");
    let bad_tiers =
        mid_month.replace("-15T", "-01T").replace(r#"calls = [{ price = "0.05" }]"#, r#"calls = [{ up_to = 5, price = "0.05" }]"#);
    assert_eq!(err(&bad_tiers).to_string(), "billing.price_versions[0].calls: the last tier must omit `up_to` (it is unbounded)");
}

/// An account activated long ago (no free tier) with a 15% discount from
/// January 2021 on.
const DISCOUNTED: &str = r#"{"account_id": "D", "activated_at": "2015-01-01T00:00:00+08:00",
    "pricing": [{"id": "deal-15", "effective_from": "2021-01", "discount": "0.15"}]}"#;

#[test]
fn a_fifteen_percent_discount_applies_to_each_lines_exact_product_rounded_once() {
    let r = rules("[[prices.traffic_regions.ap-hongkong]]\nprice = \"0.50\"\n");
    let d = decode_account_checked(DISCOUNTED.as_bytes()).unwrap();
    assert!(d.rejections().is_empty());
    let mut m = BTreeMap::new();
    // 12,345,678 calls: 10,000,000 in tier 1 (0.06), 2,345,678 in tier 2 (0.04);
    // traffic in two regions, the default price and Hong Kong's own.
    put(&r, &mut m, "2021-03-02T10:00:00+08:00", 12_345_678, &[("ap-guangzhou", 3 * GIB + 123_456_789), ("ap-hongkong", 5 * GIB + 7)]);
    let bill = compute_bills("D", Some(&d.record), &m, &r).pop().unwrap().content;
    type Line<'a> = (PackItem, Option<&'a str>, u32, Decimal, Option<Decimal>, Decimal);
    let lines: Vec<Line<'_>> =
        bill.charges.iter().map(|c| (c.item, c.region.as_deref(), c.tier, c.unit_price, c.discount, c.amount)).collect();
    let discount = Some(dec("0.15"));
    assert_eq!(
        lines,
        [
            // 1,000 x 0.06 x 0.85 = 51.00 exactly.
            (PackItem::Calls, None, 1, dec("0.06"), discount, dec("51.00")),
            // 234.5678 x 0.04 x 0.85 = 7.9753052 -> 7.98 (undiscounted 9.38 x 0.85 would be 7.97).
            (PackItem::Calls, None, 2, dec("0.04"), discount, dec("7.98")),
            // 3.1149... GB x 0.80 x 0.85 = 2.1181851... -> 2.12.
            (PackItem::PublicOutBytes, Some("ap-guangzhou"), 1, dec("0.80"), discount, dec("2.12")),
            // 5.0000000065... GB x 0.50 x 0.85 = 2.1250000027... -> 2.13.
            (PackItem::PublicOutBytes, Some("ap-hongkong"), 1, dec("0.50"), discount, dec("2.13")),
        ]
    );
    assert_eq!(bill.total_amount, dec("63.23"));
    assert_eq!(bill.pricing_terms.len(), 1);
    assert_eq!((bill.pricing_terms[0].id.as_deref(), bill.pricing_terms[0].kind.as_str()), (Some("deal-15"), "discount"));
    // The line on the wire: the list price, the discount, the discounted amount.
    let json = String::from_utf8(compute_bills("D", Some(&d.record), &m, &r).pop().unwrap().content_json).unwrap();
    assert!(
        json.contains(
            r#""tier":2,"quantity":2345678,"unit":"10000 calls","unit_size":10000,"unit_price":"0.04","discount":"0.15","amount":"7.98"}"#
        ),
        "{json}"
    );
    // explain shows every digit of each discounted product, and sums to the bill.
    let e = explain("D", Some(&d.record), &m, "2021-03".parse().unwrap(), &r).unwrap();
    let exact: Vec<&str> = e.charges.iter().map(|c| c.exact.as_str()).collect();
    assert_eq!(exact, ["51", "7.9753052", "2.118185104317963123321533203125", "2.125000002770684659481048583984375"]);
    for c in &e.charges {
        let rounded = c.exact.parse::<Decimal>().unwrap().round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero);
        assert_eq!((rounded, c.discount), (c.amount, discount));
    }
    assert_eq!(e.charges.iter().map(|c| c.amount).sum::<Decimal>(), e.bill.total_amount);
    assert_eq!(e.total_amount, bill.total_amount);
    // December 2020 is before the term: no discount, no terms on the bill.
    put(&r, &mut m, "2020-12-02T10:00:00+08:00", 12_345_678, &[]);
    let dec2020 = compute_bills("D", Some(&d.record), &m, &r).into_iter().next().unwrap().content;
    assert_eq!((dec2020.total_amount, dec2020.pricing_terms.len()), (dec("69.38"), 0));
    assert!(dec2020.charges.iter().all(|c| c.discount.is_none()));
}

#[test]
fn an_account_prices_term_replaces_the_version_for_the_two_months_it_covers() {
    let r = rules(JANUARY_2021);
    let record = r#"{"account_id": "P", "activated_at": "2015-01-01T00:00:00+08:00", "pricing": [
        {"effective_from": "2021-02", "effective_until": "2021-04",
         "prices": {"calls": [{"price": "0.01"}], "traffic_default": [{"price": "0.10"}]}}]}"#;
    let d = decode_account_checked(record.as_bytes()).unwrap();
    assert!(d.rejections().is_empty());
    let mut m = BTreeMap::new();
    for month in ["2021-01", "2021-02", "2021-03", "2021-04"] {
        put(&r, &mut m, &format!("{month}-10T12:00:00+08:00"), 1_000_000, &[("ap-guangzhou", 10 * GIB)]);
    }
    let totals: Vec<(String, Decimal, usize)> = compute_bills("P", Some(&d.record), &m, &r)
        .into_iter()
        .map(|b| (b.content.month.clone(), b.content.total_amount, b.content.pricing_terms.len()))
        .collect();
    // The version: 100 x 0.05 + 10 x 0.50 = 10.00; the term: 100 x 0.01 + 10 x 0.10 = 2.00.
    assert_eq!(
        totals,
        [
            ("2021-01".to_string(), dec("10.00"), 0),
            ("2021-02".to_string(), dec("2.00"), 1),
            ("2021-03".to_string(), dec("2.00"), 1),
            ("2021-04".to_string(), dec("10.00"), 0)
        ]
    );
    // The version stays named: the term replaced its tiers, not the currency or the record of which list was in force.
    let feb = compute_bills("P", Some(&d.record), &m, &r).remove(1).content;
    assert_eq!(feb.price_version.as_deref(), Some("list-2021"));
    assert_eq!((feb.pricing_terms[0].kind.as_str(), feb.pricing_terms[0].effective_until.as_deref()), ("prices", Some("2021-04")));
}

#[test]
fn overlapping_terms_of_one_kind_are_left_out_and_reported_and_the_rest_applies() {
    let record = r#"{"account_id": "O", "activated_at": "2015-01-01T00:00:00+08:00",
        "resource_packs": [{"id": "pk-1", "item": "calls", "quantity": 5, "valid_from": 0, "valid_until": 1000}],
        "pricing": [
          {"id": "a", "effective_from": "2021-01", "effective_until": "2021-06", "discount": "0.10"},
          {"id": "b", "effective_from": "2021-05", "discount": "0.20"},
          {"id": "c", "effective_from": "2021-03", "effective_until": "2021-05",
           "prices": {"calls": [{"price": "0.01"}], "traffic_default": [{"price": "0.10"}]}},
          {"id": "d", "effective_from": "2021-07", "effective_until": "2021-07", "discount": "0.05"},
          {"id": "e", "effective_from": "2021-09", "discount": 0.3}
        ]}"#;
    let d = decode_account_checked(record.as_bytes()).unwrap();
    // The pack and the prices term apply; both overlapping discounts, the empty window and the JSON number do not.
    assert_eq!(d.record.resource_packs.len(), 1);
    assert_eq!(d.record.pricing.iter().map(|t| t.id.as_deref().unwrap()).collect::<Vec<_>>(), ["c"]);
    let why: Vec<(usize, &str)> = d.rejected_terms.iter().map(|r| (r.index, r.why.as_str())).collect();
    assert_eq!(
        why,
        [
            (0, "a discount term overlapping term #1 in the months it covers; neither applies"),
            (1, "a discount term overlapping term #0 in the months it covers; neither applies"),
            (3, "effective_until is not after effective_from (an empty or inverted window)"),
            (4, "`discount` must be a decimal string such as \"0.15\", not a JSON number"),
        ]
    );
    let errors = d.rejections();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].reason, RejectReason::InvalidPricing);
    assert!(
        errors[0].detail.starts_with("account `O` applied without 4 invalid pricing term(s): #0: a discount term"),
        "{}",
        errors[0].detail
    );
}
