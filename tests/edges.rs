//! Time and field edges (issue 9, point 6), each with exact figures: trial
//! bounds with fractions of a second against hour starts, a leap second at a
//! month's end, and backend fields that do not apply to the backend type.
//! Billing time zone Asia/Shanghai, default prices, no account record (so no
//! free tier).

use gatebill::billing::reference::{aggregate_messages, bills, decode_and_classify};
use gatebill::billing::scan::decode_billable;
use gatebill::billing::{compute_bills, Bill, BillingConfig, HourUsage, Month, MonthUsage, Rules};
use rust_decimal::Decimal;
use std::collections::BTreeMap;

const GB: u64 = 1 << 30;

/// Default rules without the default trial period.
fn no_trial() -> Rules {
    BillingConfig::from_toml("trial_periods = []").unwrap().validate().unwrap()
}

fn event(id: &str, time: &str, response: u64, backend: &str) -> Vec<u8> {
    format!(
        r#"{{"request_id":"{id}","account_id":"E","region":"ap-guangzhou","time":"{time}","client_network":"public",
            "request_bytes":100,"response_bytes":{response},"backend":{backend}}}"#
    )
    .into_bytes()
}

/// Bills of messages through the reference core, after checking that the
/// worker's decoder (fast path or full) reads each message the same way.
fn bill_messages(msgs: &[Vec<u8>], rules: &Rules) -> Vec<Bill> {
    for m in msgs {
        let (e, metered) = decode_and_classify(m).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(m)));
        let b = decode_billable(m).unwrap();
        assert_eq!((b.time_ms, b.metered), (e.time_ms, metered));
    }
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), rules);
    assert!(r.rejected.is_empty(), "{:?}", r.rejected);
    bills(&r.ledger, &BTreeMap::new(), rules)
}

#[test]
fn trial_bounds_with_fractions_of_a_second_are_exact_against_hour_starts() {
    let cfg =
        BillingConfig::from_toml("[[trial_periods]]\nfrom = \"2021-03-01T00:00:00.500+08:00\"\nuntil = \"2021-03-01T02:00:00.500+08:00\"")
            .unwrap();
    let rules = cfg.validate().unwrap();
    // Hours 00:00 .. 03:00 local on 2021-03-01: calls, public bytes.
    let mut months: BTreeMap<Month, MonthUsage> = BTreeMap::new();
    for (hour, calls, bytes) in [(0, 100_000, GB), (1, 200_000, 0), (2, 400_000, 2 * GB), (3, 800_000, 0)] {
        let ms = chrono::DateTime::parse_from_rfc3339(&format!("2021-03-01T{hour:02}:00:00+08:00")).unwrap().timestamp_millis();
        let (month, hour_start) = rules.calendar.place(ms);
        let mut h = HourUsage { calls, ..Default::default() };
        if bytes > 0 {
            h.public_out_bytes.insert("ap-guangzhou".into(), bytes);
        }
        months.entry(month).or_default().add_hour(hour_start, &h);
    }
    let b = compute_bills("T", None, &months, &rules);
    assert_eq!(b.len(), 1);
    let c = &b[0].content;
    assert_eq!(c.month, "2021-03");
    // The period starts after 00:00:00.000, so the 00:00 hour is charged; it
    // ends after 02:00:00.000, so the 02:00 hour is in the trial.
    assert_eq!(c.usage.trial_calls, 600_000);
    assert_eq!(c.usage.trial_public_out_bytes, 2 * GB);
    assert_eq!(c.chargeable.calls, 900_000);
    assert_eq!(c.chargeable.public_out_bytes, GB);
    // 900,000 / 10,000 x 0.06 = 5.40; 1 GB x 0.80 = 0.80.
    assert_eq!(c.total_amount, Decimal::new(620, 2));
}

#[test]
fn a_leap_second_is_billed_in_the_month_it_names() {
    let rules = no_trial();
    let msgs = vec![
        event("leap", "2020-11-30T23:59:60+08:00", 2 * GB, r#"{"type":"mock"}"#),
        event("leap-frac", "2020-11-30T23:59:60.750+08:00", GB / 2, r#"{"type":"mock"}"#),
    ];
    for m in &msgs {
        // 2020-11-30T23:59:59.999+08:00 on both decoders.
        assert_eq!(decode_billable(m).unwrap().time_ms, 1_606_751_999_999);
    }
    let b = bill_messages(&msgs, &rules);
    assert_eq!(b.len(), 1, "{:?}", b.iter().map(|b| &b.content.month).collect::<Vec<_>>());
    let c = &b[0].content;
    assert_eq!(c.month, "2020-11");
    assert_eq!(c.usage.calls, 2);
    assert_eq!(c.usage.public_out_bytes, 2 * GB + GB / 2);
    assert_eq!(c.chargeable.public_out_bytes, 2 * GB + GB / 2);
    // 2.5 GB x 0.80 = 2.00; 2 calls x 0.06 / 10,000 rounds to 0.00.
    assert_eq!(c.total_amount, Decimal::new(200, 2));
}

#[test]
fn backend_fields_that_do_not_apply_are_ignored_and_the_event_billed() {
    let rules = no_trial();
    let msgs = vec![
        // SCF in another region: the forwarded 1 GB is public.
        event(
            "scf",
            "2021-05-10T10:00:00+08:00",
            0,
            r#"{"type":"scf","region":"ap-beijing","address":"n/a","in_cloud":"x","request_bytes":1073741824,"response_bytes":5}"#,
        ),
        // HTTP outside the cloud at a public address: the forwarded 512 MB is public.
        event(
            "http",
            "2021-05-10T11:00:00+08:00",
            0,
            r#"{"type":"http","region":5,"in_cloud":false,"address":"public","request_bytes":536870912,"response_bytes":7}"#,
        ),
        // Mock: no backend leg, whatever the other fields say; 1,000 response bytes.
        event("mock", "2021-05-10T12:00:00+08:00", 1000, r#"{"type":"mock","region":[],"in_cloud":"n/a","address":0}"#),
    ];
    let public: Vec<u64> = msgs.iter().map(|m| decode_billable(m).unwrap().metered.public_out_bytes).collect();
    assert_eq!(public, [GB, GB / 2, 1000]);
    let b = bill_messages(&msgs, &rules);
    assert_eq!(b.len(), 1);
    let c = &b[0].content;
    assert_eq!(c.month, "2021-05");
    assert_eq!(c.usage.calls, 3);
    assert_eq!(c.usage.public_out_bytes, 1_610_613_736);
    assert_eq!(c.usage.inbound_bytes, 3 * 100 + 5 + 7);
    assert_eq!(c.chargeable.public_out_bytes, 1_610_613_736);
    // 1,610,613,736 / 2^30 x 0.80 = 1.2000074... -> 1.20; 3 calls -> 0.00.
    assert_eq!(c.total_amount, Decimal::new(120, 2));
}

#[test]
fn pack_bounds_with_fractions_of_a_second_are_exact_against_hour_starts() {
    let rules = no_trial();
    // A calls pack of 1,000,000 valid from 00:00:00.500 to 02:00:00.500: it
    // does not cover the 00:00 hour (which starts before it), and it covers
    // the 02:00 hour (which starts inside it). Activated 2015: no free tier.
    let account = gatebill::billing::decode_account(
        br#"{"account_id":"P","activated_at":"2015-01-01T00:00:00+08:00","resource_packs":[
            {"id":"pk-frac","item":"calls","quantity":1000000,
             "valid_from":"2021-03-01T00:00:00.500+08:00","valid_until":"2021-03-01T02:00:00.500+08:00"}]}"#,
    )
    .unwrap();
    let mut months: BTreeMap<Month, MonthUsage> = BTreeMap::new();
    for (hour, calls) in [(0, 100_000), (1, 200_000), (2, 400_000), (3, 800_000)] {
        let ms = chrono::DateTime::parse_from_rfc3339(&format!("2021-03-01T{hour:02}:00:00+08:00")).unwrap().timestamp_millis();
        let (month, hour_start) = rules.calendar.place(ms);
        months.entry(month).or_default().add_hour(hour_start, &HourUsage { calls, ..Default::default() });
    }
    let b = compute_bills("P", Some(&account), &months, &rules);
    let c = &b[0].content;
    let deducted: Vec<(&str, u64)> = c.deductions.iter().map(|d| (d.pack_id.as_str(), d.quantity)).collect();
    assert_eq!(deducted, [("pk-frac", 600_000)]);
    assert_eq!(c.chargeable.calls, 900_000);
    // 900,000 / 10,000 x 0.06 = 5.40.
    assert_eq!(c.total_amount, Decimal::new(540, 2));
}
