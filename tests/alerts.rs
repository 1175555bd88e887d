//! Usage alerts in the billing core (rule book section 12, issue 30): the
//! hour in which the free tier, a pack or a spend line is crossed, by the
//! same walk and prices as the bill.

mod common;

use common::put_usage as put;
use gatebill::billing::alerts::{crossings, AlertKind, Crossing};
use gatebill::billing::{decode_account, BillingConfig, Month, MonthUsage, Rules};
use rust_decimal::Decimal;
use std::collections::BTreeMap;

fn no_trial() -> Rules {
    let mut cfg = BillingConfig::default();
    cfg.trial_periods.clear();
    cfg.validate().unwrap()
}

/// The UTC epoch second of an RFC 3339 hour start.
fn at(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp()
}

fn crossing(month: &str, kind: AlertKind, subject: &str, hour: &str) -> Crossing {
    Crossing { month: month.parse().unwrap(), kind, subject: subject.to_string(), hour: at(hour) }
}

/// The seed account (activated 2019-11-10, free until 2020-11-10): in June
/// 2020 its 1,000,000 free calls run out in the hour that brings them to
/// 1,100,000, and its free GB in the hour that brings the bytes past 1 GiB,
/// each item on its own.
#[test]
fn the_seed_accounts_free_tier_runs_out_mid_month_calls_and_bytes_separately() {
    let rules = no_trial();
    let seed = decode_account(br#"{"account_id": "1250000001", "activated_at": "2019-11-10T17:13:14+08:00"}"#).unwrap();
    let mut m: BTreeMap<Month, MonthUsage> = BTreeMap::new();
    put(&rules, &mut m, "2020-06-03T08:00:00+08:00", 0, &[("ap-guangzhou", 600 << 20)]);
    put(&rules, &mut m, "2020-06-05T10:00:00+08:00", 600_000, &[]);
    put(&rules, &mut m, "2020-06-12T15:00:00+08:00", 500_000, &[]);
    put(&rules, &mut m, "2020-06-18T09:00:00+08:00", 10, &[("ap-guangzhou", 400 << 20)]);
    put(&rules, &mut m, "2020-06-20T21:00:00+08:00", 0, &[("ap-beijing", 100 << 20)]);
    assert_eq!(
        crossings(Some(&seed), &m, &rules, &[]),
        [
            crossing("2020-06", AlertKind::FreeTierExhausted, "calls", "2020-06-12T15:00:00+08:00"),
            crossing("2020-06", AlertKind::FreeTierExhausted, "public_out_bytes", "2020-06-20T21:00:00+08:00"),
        ]
    );
    // 600 MiB + 400 MiB is 1000 MiB, 24 MiB short of the free GiB; exactly
    // 1 GiB would cross in the hour that reaches it.
    put(&rules, &mut m, "2020-06-18T09:00:00+08:00", 0, &[("ap-guangzhou", 24 << 20)]);
    let bytes: Vec<Crossing> = crossings(Some(&seed), &m, &rules, &[]).into_iter().filter(|c| c.subject == "public_out_bytes").collect();
    assert_eq!(bytes, [crossing("2020-06", AlertKind::FreeTierExhausted, "public_out_bytes", "2020-06-18T09:00:00+08:00")]);
    // Without an account record there is no free tier to run out.
    assert!(crossings(None, &m, &rules, &[]).is_empty());
}

/// A 1,500,000-call pack drawn over January and February 2020 runs out in
/// February, in the hour that takes its last call.
#[test]
fn a_pack_runs_out_in_the_second_month_it_serves() {
    let rules = no_trial();
    let a = decode_account(
        br#"{"account_id": "B", "activated_at": "2015-01-01T00:00:00+08:00", "resource_packs": [
            {"id": "pk-1", "item": "calls", "quantity": 1500000,
             "valid_from": "2020-01-01T00:00:00+08:00", "valid_until": "2021-01-01T00:00:00+08:00"}]}"#,
    )
    .unwrap();
    let mut m = BTreeMap::new();
    put(&rules, &mut m, "2020-01-20T12:00:00+08:00", 1_000_000, &[]);
    put(&rules, &mut m, "2020-02-03T09:00:00+08:00", 300_000, &[]);
    put(&rules, &mut m, "2020-02-17T11:00:00+08:00", 250_000, &[]);
    put(&rules, &mut m, "2020-02-18T11:00:00+08:00", 250_000, &[]);
    assert_eq!(crossings(Some(&a), &m, &rules, &[]), [crossing("2020-02", AlertKind::PackExhausted, "pk-1", "2020-02-17T11:00:00+08:00")]);
}

/// Lines at 500 and 700 over the default call tiers (0.06 to 10M, 0.04 to
/// 100M, then 0.03): 60M calls cost 260.00, 100M 420.00, 130M 510.00 (500
/// passed), 200M 720.00 (700 passed, in the third tier).
#[test]
fn a_spend_line_is_crossed_in_the_hour_the_running_total_passes_it_across_tiers() {
    let rules = no_trial();
    let mut m = BTreeMap::new();
    for (day, calls) in [("01", 60_000_000), ("02", 40_000_000), ("03", 30_000_000), ("04", 70_000_000)] {
        put(&rules, &mut m, &format!("2020-05-{day}T00:00:00+08:00"), calls, &[]);
    }
    let lines = [Decimal::new(700, 0), Decimal::new(500, 0), Decimal::new(50000, 2)];
    assert_eq!(
        crossings(None, &m, &rules, &lines),
        [
            crossing("2020-05", AlertKind::SpendThreshold, "500", "2020-05-03T00:00:00+08:00"),
            crossing("2020-05", AlertKind::SpendThreshold, "700", "2020-05-04T00:00:00+08:00"),
        ]
    );
    // Reaching a line exactly crosses it: 420.00 at 100M calls.
    assert_eq!(
        crossings(None, &m, &rules, &[Decimal::new(420, 0)]),
        [crossing("2020-05", AlertKind::SpendThreshold, "420", "2020-05-02T00:00:00+08:00")]
    );
    assert_eq!(at("2020-05-02T00:00:00+08:00"), 1_588_348_800);
}
