//! `gatebill explain` (issue 13): the explanation of a bill sums exactly to
//! the bill (usage, deductions, chargeable quantities, lines, total), shows
//! the deduction order inside an hour, and is read from a state directory
//! that a replay wrote.

mod common;

use gatebill::billing::explain::{explain, Explanation};
use gatebill::billing::{decode_account, BillingConfig, Month, PackItem, PackSource, Rules};
use gatebill::config::Config;
use gatebill::file_replay::{replay_file, Accounts, Sink};
use rust_decimal::Decimal;
use std::collections::BTreeMap;

/// Default configuration without trial periods (as the spec's examples).
fn no_trial() -> Rules {
    let mut cfg = BillingConfig::default();
    cfg.trial_periods.clear();
    cfg.validate().unwrap()
}

use common::put_usage as put;

/// Every figure of the explanation, summed, equals the bill's.
fn assert_sums_to_the_bill(e: &Explanation) {
    let b = &e.bill;
    let sum = |f: &dyn Fn(&gatebill::billing::explain::ExplainedHour) -> u64| e.hours.iter().map(f).sum::<u64>();
    assert_eq!(sum(&|h| h.calls), b.usage.calls, "calls");
    assert_eq!(sum(&|h| h.frontend_error_calls), b.usage.frontend_error_calls, "frontend errors");
    assert_eq!(sum(&|h| if h.trial { h.calls - h.frontend_error_calls } else { 0 }), b.usage.trial_calls, "trial calls");
    assert_eq!(sum(&|h| h.chargeable_calls), b.chargeable.calls, "chargeable calls");
    assert_eq!(e.hours.last().map_or(0, |h| h.chargeable_calls_so_far), b.chargeable.calls);
    // Every hour's calls: taken + chargeable = billable (outside trials).
    for h in e.hours.iter().filter(|h| !h.trial) {
        let taken: u64 = h.calls_taken.iter().map(|t| t.quantity).sum();
        assert_eq!(taken + h.chargeable_calls, h.calls - h.frontend_error_calls, "hour {}", h.start);
    }
    // Per pack and item, the hours' takes are the bill's deductions.
    let mut took: BTreeMap<(String, PackItem), u64> = BTreeMap::new();
    let mut bytes: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for h in &e.hours {
        for t in &h.calls_taken {
            *took.entry((t.pack_id.clone(), PackItem::Calls)).or_default() += t.quantity;
        }
        for r in &h.regions {
            let e = bytes.entry(r.walk.region.clone()).or_default();
            e.0 += r.walk.bytes;
            e.1 += r.walk.chargeable;
            for t in &r.walk.taken {
                *took.entry((t.pack_id.clone(), PackItem::PublicOutBytes)).or_default() += t.quantity;
            }
        }
    }
    let deducted: BTreeMap<(String, PackItem), u64> = b.deductions.iter().map(|d| ((d.pack_id.clone(), d.item), d.quantity)).collect();
    assert_eq!(took, deducted, "deductions");
    let all: BTreeMap<String, u64> = bytes.iter().map(|(r, (a, _))| (r.clone(), *a)).collect();
    assert_eq!(all, b.usage.public_out_bytes_by_region, "bytes per region");
    let chargeable: BTreeMap<String, u64> = bytes.iter().filter(|(_, (_, c))| *c > 0).map(|(r, (_, c))| (r.clone(), *c)).collect();
    assert_eq!(chargeable, b.chargeable.public_out_bytes_by_region, "chargeable bytes per region");
    let trial_bytes: u64 = e.hours.iter().filter(|h| h.trial).flat_map(|h| &h.regions).map(|r| r.walk.bytes).sum();
    assert_eq!(trial_bytes, b.usage.trial_public_out_bytes, "trial bytes");
    let mut lines: BTreeMap<String, u64> = BTreeMap::new();
    for c in e.charges.iter().filter(|c| c.item == PackItem::PublicOutBytes) {
        *lines.entry(c.region.clone().unwrap_or_default()).or_default() += c.quantity;
    }
    assert_eq!(lines, b.chargeable.public_out_bytes_by_region, "byte lines");
    // The lines: quantities are the chargeable ones, each amount is its
    // exact product rounded, and they add up to the total.
    let calls_lines: u64 = e.charges.iter().filter(|c| c.item == PackItem::Calls).map(|c| c.quantity).sum();
    assert_eq!(calls_lines, b.chargeable.calls);
    for c in &e.charges {
        let exact: Decimal = c.exact.parse().unwrap();
        assert_eq!(exact.round_dp_with_strategy(2, rust_decimal::RoundingStrategy::MidpointAwayFromZero), c.amount, "{c:?}");
    }
    assert_eq!(e.charges.iter().map(|c| c.amount).sum::<Decimal>(), e.total_amount);
    assert_eq!(e.total_amount, b.total_amount);
}

/// Spec example 3: the seed account's free tier ends 2020-11-10 23:59:59
/// (Asia/Shanghai): of 600,000 calls on Nov 5 and 600,000 on Nov 20, the
/// first are free, the second chargeable: 3.60.
#[test]
fn the_free_tier_ending_mid_month_is_explained_hour_by_hour() {
    let rules = no_trial();
    let a = decode_account(br#"{"account_id": "A", "activated_at": "2019-11-10T17:13:14+08:00"}"#).unwrap();
    let mut m = BTreeMap::new();
    put(&rules, &mut m, "2020-11-05T10:00:00+08:00", 600_000, &[]);
    put(&rules, &mut m, "2020-11-20T10:00:00+08:00", 600_000, &[]);
    let e = explain("A", Some(&a), &m, "2020-11".parse().unwrap(), &rules).unwrap();
    assert_sums_to_the_bill(&e);
    assert_eq!(e.hours.len(), 2);
    assert_eq!(e.hours[0].start, "2020-11-05T10:00:00+08:00");
    assert_eq!(e.hours[0].calls_taken.len(), 1);
    assert_eq!((e.hours[0].calls_taken[0].pack_id.as_str(), e.hours[0].calls_taken[0].quantity), ("free-tier/2020-11", 600_000));
    assert_eq!(e.hours[0].chargeable_calls, 0);
    assert_eq!(e.hours[1].start, "2020-11-20T10:00:00+08:00");
    assert!(e.hours[1].calls_taken.is_empty(), "the free tier ended on Nov 10");
    assert_eq!(e.hours[1].chargeable_calls, 600_000);
    assert_eq!(e.charges.len(), 1);
    assert_eq!((e.charges[0].quantity, e.charges[0].exact.as_str(), e.charges[0].amount.to_string()), (600_000, "3.6", "3.60".into()));
    assert_eq!(e.total_amount.to_string(), "3.60");
}

/// Two call packs and the free tier draw in the same hour: free tier
/// first, then the pack that expires first, then the other; the rest is
/// charged. Traffic in two regions shares the free tier's bytes in region
/// order.
#[test]
fn two_packs_and_the_free_tier_in_one_hour_show_the_deduction_order() {
    let rules = no_trial();
    let a = decode_account(
        br#"{"account_id": "B", "activated_at": "2020-10-01T00:00:00+08:00", "resource_packs": [
            {"id": "late", "item": "calls", "quantity": 300000, "valid_from": "2020-01-01T00:00:00+08:00", "valid_until": "2021-06-01T00:00:00+08:00"},
            {"id": "soon", "item": "calls", "quantity": 200000, "valid_from": "2020-01-01T00:00:00+08:00", "valid_until": "2020-12-01T00:00:00+08:00"}]}"#,
    )
    .unwrap();
    let gb = 1u64 << 30;
    let mut m = BTreeMap::new();
    put(&rules, &mut m, "2020-11-03T09:00:00+08:00", 400_000, &[]);
    // 1,000,000 free calls: 600,000 left; this hour takes them, then soon's
    // 200,000, then late's 300,000; 50,000 are charged.
    put(&rules, &mut m, "2020-11-03T10:00:00+08:00", 1_150_000, &[("ap-beijing", 3 * gb), ("ap-guangzhou", 2 * gb)]);
    let e = explain("B", Some(&a), &m, "2020-11".parse().unwrap(), &rules).unwrap();
    assert_sums_to_the_bill(&e);
    let h = &e.hours[1];
    let order: Vec<(&str, PackSource, u64)> = h.calls_taken.iter().map(|t| (t.pack_id.as_str(), t.source, t.quantity)).collect();
    assert_eq!(
        order,
        vec![
            ("free-tier/2020-11", PackSource::FreeTier, 600_000),
            ("soon", PackSource::Purchase, 200_000),
            ("late", PackSource::Purchase, 300_000)
        ]
    );
    assert_eq!(h.chargeable_calls, 50_000);
    let free_bytes = rules.free_tier.as_ref().unwrap().public_out_bytes_per_month;
    let taken: Vec<u64> = h.regions.iter().map(|r| r.walk.taken.iter().map(|t| t.quantity).sum()).collect();
    assert_eq!(taken.iter().sum::<u64>(), free_bytes.min(5 * gb), "the free tier's bytes, first region first");
    assert_eq!(h.regions[0].walk.region, "ap-beijing");
    assert_eq!(e.bill.chargeable.calls, 50_000);
}

/// A trial period: its hours are shown as trial, nothing drawn or charged,
/// and they sum to the bill's trial calls and bytes (the default trial ends
/// 2020-02-14 00:00 Asia/Shanghai).
#[test]
fn trial_hours_are_explained_as_trial() {
    let rules = BillingConfig::default().validate().unwrap();
    let a = decode_account(br#"{"account_id": "A", "activated_at": "2019-11-10T17:13:14+08:00"}"#).unwrap();
    let mut m = BTreeMap::new();
    put(&rules, &mut m, "2020-02-13T23:00:00+08:00", 2_000_000, &[("ap-guangzhou", 5 << 30)]);
    put(&rules, &mut m, "2020-02-14T00:00:00+08:00", 1_500_000, &[("ap-guangzhou", 1 << 30)]);
    let e = explain("A", Some(&a), &m, "2020-02".parse().unwrap(), &rules).unwrap();
    assert_sums_to_the_bill(&e);
    assert_eq!(e.hours.iter().map(|h| h.trial).collect::<Vec<_>>(), [true, false]);
    assert!(e.hours[0].calls_taken.is_empty() && e.hours[0].chargeable_calls == 0);
    assert_eq!((e.bill.usage.trial_calls, e.bill.usage.trial_public_out_bytes), (2_000_000, 5 << 30));
    // After the trial: the free tier's 1,000,000 calls, then 500,000 charged.
    assert_eq!(e.hours[1].chargeable_calls, 500_000);
}

/// Through a replay into a state directory with an accounts file, read
/// back as `gatebill explain` does (a read-only open): the calls on both
/// sides of the free tier's last instant (spec example 3).
#[tokio::test]
async fn explain_reads_a_state_directory_written_by_a_replay() {
    let dir = tempfile::tempdir().unwrap();
    let event = |id: &str, time: &str| {
        format!(
            r#"{{"request_id":"{id}","account_id":"A","region":"ap-guangzhou","time":"{time}","client_network":"public","frontend_error":false,"request_bytes":100,"response_bytes":5000,"backend":{{"type":"mock"}}}}"#
        )
    };
    let lines = [
        event("in", "2020-11-10T23:59:59.900+08:00"),
        event("out", "2020-11-11T00:00:00.000+08:00"),
        event("late", "2020-11-20T10:00:00+08:00"),
    ];
    let input = dir.path().join("ev.ndjson");
    std::fs::write(&input, lines.join("\n")).unwrap();
    let accounts = dir.path().join("ev.accounts.ndjson");
    std::fs::write(&accounts, r#"{"account_id": "A", "activated_at": "2019-11-10T17:13:14+08:00"}"#).unwrap();
    let mut cfg = Config::default();
    cfg.billing.trial_periods.clear();
    cfg.worker.state_dir = dir.path().join("state");
    let checked = cfg.clone().checked().unwrap();
    let out = dir.path().join("bills.ndjson");
    let s = replay_file(&checked, &input, Accounts::File(accounts), Sink::File(out.clone()), false, std::future::pending()).await.unwrap();
    assert_eq!((s.billed, s.bills_emitted), (3, 1));

    let x = gatebill::explain::from_state_dir(&cfg.worker.state_dir, "A", "2020-11".parse().unwrap(), checked.rules()).unwrap();
    let e = &x.explanation;
    assert_sums_to_the_bill(e);
    assert_eq!(
        e.hours.iter().map(|h| (h.start.as_str(), h.chargeable_calls)).collect::<Vec<_>>(),
        [("2020-11-10T23:00:00+08:00", 0), ("2020-11-11T00:00:00+08:00", 1), ("2020-11-20T10:00:00+08:00", 1)]
    );
    // The bill the replay emitted is the one explained.
    let emitted: gatebill::billing::BillRecord = serde_json::from_str(std::fs::read_to_string(&out).unwrap().trim()).unwrap();
    assert_eq!(x.emitted.as_ref().map(|b| b.content_hash.as_str()), Some(emitted.content_hash.as_str()));
    assert_eq!(e.content_hash, emitted.content_hash);
    let text = gatebill::explain::render(&x);
    assert!(text.contains("free-tier/2020-11 1"), "{text}");
    assert!(text.contains("The worker emitted this bill as revision 1"), "{text}");
    // No usage: an error that says what to check.
    let err = gatebill::explain::from_state_dir(&cfg.worker.state_dir, "A", "2020-12".parse().unwrap(), checked.rules()).unwrap_err();
    assert!(err.to_string().contains("no usage of account A in 2020-12"), "{err}");
}

/// Beside a running `gatebill run` process (its state directory locked):
/// the read-only open explains a bill it emitted, equal to the record on
/// the output topic, and the worker goes on (it stops cleanly afterwards).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_works_beside_a_running_worker() {
    let f = common::fixture(13, 2_000, 2).await;
    let mut cfg = f.cfg.clone();
    cfg.kafka.partitions = 2;
    let mut w = common::spawn_worker(&cfg, "info");
    common::wait_for_closed_bills(&cfg, &f.expected, std::time::Duration::from_secs(90)).await;
    let seed = gatebill::gen::account_id(0);
    let on_topic = common::read_bills(&cfg, &cfg.kafka.output_topic);
    let (key, record) = on_topic.latest.iter().find(|(_, r)| r.content.account_id == seed).expect("a bill of the seed account");
    let month: Month = record.content.month.parse().unwrap();
    let x = gatebill::explain::from_state_dir(&cfg.worker.state_dir, &seed, month, cfg.clone().checked().unwrap().rules()).unwrap();
    assert_eq!(x.explanation.content_hash, record.content_hash, "{key}");
    assert_eq!(x.emitted.as_ref().map(|e| e.revision), Some(record.revision));
    assert_sums_to_the_bill(&x.explanation);
    assert!(w.try_wait().unwrap().is_none(), "the worker stopped");
    assert!(common::stop_worker(&mut w).success());
}
