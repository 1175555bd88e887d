//! The ten worked examples of spec section 9, each asserting the spec's exact
//! figures. Billing time zone Asia/Shanghai, default prices, and, as the spec
//! says, "no trial unless said": every example but 9 runs without the default
//! trial period (which would cover examples 1 and 2, Nov 2019 - Jan 2020).

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{compute_bills, decode_account, AccountRecord, Bill, BillingConfig, HourUsage, Month, MonthUsage, PackItem, Rules};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::str::FromStr;

const GB: u64 = 1 << 30;

fn secs(t: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

/// Default configuration without trial periods.
fn no_trial() -> Rules {
    let mut cfg = BillingConfig::default();
    cfg.trial_periods.clear();
    cfg.validate().unwrap()
}

fn account_a() -> AccountRecord {
    decode_account(br#"{"account_id": "A", "activated_at": "2019-11-10T17:13:14+08:00"}"#).unwrap()
}

/// Usage with `calls` calls and `bytes` public bytes in ap-guangzhou, in the hour of `at`.
fn put(months: &mut BTreeMap<Month, MonthUsage>, at: &str, calls: u64, bytes: u64) {
    let rules = no_trial();
    let ms = secs(at) * 1000;
    let (month, hour) = rules.calendar.place(ms);
    let mut h = HourUsage { calls, ..Default::default() };
    if bytes > 0 {
        h.public_out_bytes.insert("ap-guangzhou".into(), bytes);
    }
    months.entry(month).or_default().add_hour(hour, &h);
}

fn bill_for<'a>(bills: &'a [Bill], month: &str) -> &'a Bill {
    bills.iter().find(|b| b.content.month == month).unwrap_or_else(|| panic!("no bill for {month}"))
}

fn event(id: &str, account: &str, time: &str, client: &str, response: u64, backend: &str, frontend_error: bool) -> Vec<u8> {
    format!(
        r#"{{"request_id":"{id}","account_id":"{account}","region":"ap-guangzhou","time":"{time}",
            "client_network":"{client}","frontend_error":{frontend_error},"request_bytes":100,
            "response_bytes":{response},"backend":{backend}}}"#
    )
    .into_bytes()
}

const MOCK: &str = r#"{"type":"mock"}"#;

#[test]
fn spec_example_1_seed_free_tier_window() {
    let mut m = BTreeMap::new();
    put(&mut m, "2019-11-20T10:00:00+08:00", 1_200_000, GB / 2);
    let b = compute_bills("A", Some(&account_a()), &m, &no_trial());
    let nov = bill_for(&b, "2019-11");
    assert_eq!(nov.content.chargeable.calls, 200_000);
    assert_eq!(nov.content.chargeable.public_out_bytes, 0);
    assert_eq!(nov.content.charges.len(), 1);
    assert_eq!(nov.content.charges[0].amount, dec("1.20"));
    assert_eq!(nov.content.total_amount.to_string(), "1.20");
    let free_calls: u64 = nov.content.deductions.iter().filter(|d| d.item == PackItem::Calls).map(|d| d.quantity).sum();
    assert_eq!(free_calls, 1_000_000);
}

#[test]
fn spec_example_2_no_carry_over() {
    let mut m = BTreeMap::new();
    put(&mut m, "2019-12-10T10:00:00+08:00", 300_000, 0);
    put(&mut m, "2020-01-10T10:00:00+08:00", 2_500_000, 0);
    let b = compute_bills("A", Some(&account_a()), &m, &no_trial());
    assert_eq!(bill_for(&b, "2019-12").content.chargeable.calls, 0);
    assert_eq!(bill_for(&b, "2019-12").content.total_amount.to_string(), "0.00");
    assert_eq!(bill_for(&b, "2020-01").content.chargeable.calls, 1_500_000);
    assert_eq!(bill_for(&b, "2020-01").content.total_amount, dec("9.00"));
}

#[test]
fn spec_example_3_expiry_mid_month() {
    let mut m = BTreeMap::new();
    put(&mut m, "2020-11-05T10:00:00+08:00", 600_000, 0);
    put(&mut m, "2020-11-20T10:00:00+08:00", 600_000, 0);
    let b = compute_bills("A", Some(&account_a()), &m, &no_trial());
    assert_eq!(bill_for(&b, "2020-11").content.chargeable.calls, 600_000);
    assert_eq!(bill_for(&b, "2020-11").content.total_amount, dec("3.60"));

    // The last instant inside the window is free; the first after it is not.
    let rules = no_trial();
    let msgs = [
        event("in", "A", "2020-11-10T23:59:59.900+08:00", "public", 0, MOCK, false),
        event("out", "A", "2020-11-11T00:00:00.000+08:00", "public", 0, MOCK, false),
    ];
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), &rules);
    let accounts = BTreeMap::from([("A".to_string(), account_a())]);
    let b = bills(&r.ledger, &accounts, &rules);
    assert_eq!(b[0].content.usage.calls, 2);
    assert_eq!(b[0].content.chargeable.calls, 1);
    assert_eq!(b[0].content.deductions[0].quantity, 1);
}

#[test]
fn spec_example_4_month_boundary_in_billing_time_zone() {
    let rules = no_trial();
    let msgs = [event("r1", "B", "2020-01-31T16:30:00Z", "public", 0, MOCK, false)];
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), &rules);
    let b = bills(&r.ledger, &BTreeMap::new(), &rules);
    assert_eq!(b.len(), 1);
    assert_eq!(b[0].content.month, "2020-02");
}

#[test]
fn spec_example_5_traffic_classification() {
    let rules = no_trial();
    let http = r#"{"type":"http","region":"ap-guangzhou","in_cloud":true,"address":"private","request_bytes":2000,"response_bytes":9000}"#;
    let scf = r#"{"type":"scf","region":"ap-beijing","request_bytes":2000,"response_bytes":9000}"#;
    for (backend, public, private) in [(http, 10_000, 2_000), (scf, 12_000, 0)] {
        let msgs = [event("r1", "B", "2021-05-01T10:00:00+08:00", "public", 10_000, backend, false)];
        let r = aggregate_messages(msgs.iter().map(Vec::as_slice), &rules);
        let b = bills(&r.ledger, &BTreeMap::new(), &rules);
        assert_eq!(b[0].content.usage.public_out_bytes, public);
        assert_eq!(b[0].content.usage.private_out_bytes, private);
        assert_eq!(b[0].content.usage.inbound_bytes, 9_100);
    }
}

#[test]
fn spec_example_6_frontend_error() {
    let rules = no_trial();
    let msgs = [event("r1", "B", "2021-05-01T10:00:00+08:00", "public", 300, MOCK, true)];
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), &rules);
    let b = &bills(&r.ledger, &BTreeMap::new(), &rules)[0].content;
    assert_eq!(b.usage.calls, 1);
    assert_eq!(b.usage.frontend_error_calls, 1);
    assert_eq!(b.chargeable.calls, 0);
    assert_eq!(b.usage.public_out_bytes, 300);
    assert_eq!(b.chargeable.public_out_bytes, 300);
}

#[test]
fn spec_example_7_tiers() {
    let mut m = BTreeMap::new();
    put(&mut m, "2021-05-01T10:00:00+08:00", 120_000_000, 0);
    let b = compute_bills("C", None, &m, &no_trial());
    let c = &b[0].content;
    assert!(!c.account_known);
    assert_eq!(c.chargeable.calls, 120_000_000);
    let lines: Vec<(u32, u64, Decimal)> = c.charges.iter().map(|l| (l.tier, l.quantity, l.amount)).collect();
    assert_eq!(lines, vec![(1, 10_000_000, dec("60.00")), (2, 90_000_000, dec("360.00")), (3, 20_000_000, dec("60.00"))]);
    assert_eq!(c.total_amount.to_string(), "480.00");
}

#[test]
fn spec_example_8_traffic_over_free_tier() {
    let mut m = BTreeMap::new();
    put(&mut m, "2020-03-10T10:00:00+08:00", 1, 3 * GB + 512 * 1024 * 1024);
    let b = compute_bills("A", Some(&account_a()), &m, &no_trial());
    let c = &bill_for(&b, "2020-03").content;
    assert_eq!(c.chargeable.public_out_bytes, 2_684_354_560);
    let traffic: Vec<_> = c.charges.iter().filter(|l| l.item == PackItem::PublicOutBytes).collect();
    assert_eq!(traffic.len(), 1);
    assert_eq!(traffic[0].amount.to_string(), "2.00");
    assert_eq!(traffic[0].unit_price, dec("0.80"));
}

#[test]
fn spec_example_9_trial() {
    let mut m = BTreeMap::new();
    put(&mut m, "2020-02-13T10:00:00+08:00", 500_000, 2 * GB);
    put(&mut m, "2020-02-13T23:30:00+08:00", 100, 0);
    put(&mut m, "2020-02-20T10:00:00+08:00", 1_200_000, 0);
    let b = compute_bills("A", Some(&account_a()), &m, &Rules::default());
    let c = &bill_for(&b, "2020-02").content;
    assert_eq!(c.usage.trial_calls, 500_100);
    assert_eq!(c.usage.trial_public_out_bytes, 2 * GB);
    // The whole February free tier is still there for the 20th.
    assert_eq!(c.chargeable.calls, 200_000);
    assert_eq!(c.chargeable.public_out_bytes, 0);
    assert_eq!(c.total_amount, dec("1.20"));

    // Trial usage alone charges nothing and deducts nothing.
    let mut only_trial = BTreeMap::new();
    put(&mut only_trial, "2020-02-13T10:00:00+08:00", 5_000_000, 5 * GB);
    let b = compute_bills("A", Some(&account_a()), &only_trial, &Rules::default());
    assert!(b[0].content.deductions.is_empty());
    assert!(b[0].content.charges.is_empty());
    assert_eq!(b[0].content.total_amount.to_string(), "0.00");
}

#[test]
fn spec_example_10_duplicates_and_order() {
    let rules = no_trial();
    let once: Vec<Vec<u8>> = (0..1000)
        .map(|i| {
            let t = format!("2021-05-{:02}T{:02}:{:02}:00+08:00", 1 + i % 28, i % 24, i % 60);
            event(&format!("req-{i}"), &format!("acct-{}", i % 3), &t, "public", 1000 + i as u64, MOCK, i % 17 == 0)
        })
        .collect();
    let expected = bills(&aggregate_messages(once.iter().map(Vec::as_slice), &rules).ledger, &BTreeMap::new(), &rules);
    assert_eq!(expected.len(), 3);
    assert_eq!(expected.iter().map(|b| b.content.usage.calls).sum::<u64>(), 1000);

    // Twice, reversed, in batches of 7, each batch aggregated on its own and merged.
    let twice: Vec<&[u8]> = once.iter().chain(once.iter()).rev().map(Vec::as_slice).collect();
    let mut seen = std::collections::HashSet::new();
    let mut ledger: gatebill::billing::reference::Ledger = BTreeMap::new();
    for batch in twice.chunks(7) {
        let fresh: Vec<&[u8]> =
            batch.iter().copied().filter(|m| seen.insert(gatebill::billing::decode_event(m).unwrap().request_id)).collect();
        let part = aggregate_messages(fresh, &rules).ledger;
        for (acct, months) in part {
            for (month, usage) in months {
                ledger.entry(acct.clone()).or_default().entry(month).or_default().merge(&usage);
            }
        }
    }
    let got = bills(&ledger, &BTreeMap::new(), &rules);
    assert_eq!(got, expected);
    let hashes: Vec<&str> = got.iter().map(|b| b.content_hash.as_str()).collect();
    assert_eq!(hashes, expected.iter().map(|b| b.content_hash.as_str()).collect::<Vec<_>>());
}
