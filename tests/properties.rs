//! Property tests of the billing core: bills do not depend on event order,
//! batch boundaries or merge splits; every metered unit is accounted for
//! exactly once; packs never give more than they hold nor serve usage outside
//! their window; amounts are never negative.

use gatebill::billing::account::ResourcePack;
use gatebill::billing::entitlements::free_tier_window;
use gatebill::billing::reference::{aggregate_messages, bills, Ledger};
use gatebill::billing::{compute_bills, AccountRecord, BillingConfig, HourUsage, Month, MonthUsage, PackItem, PackSource, Rules};
use proptest::prelude::*;
use std::collections::BTreeMap;

/// 2019-06-01 .. 2022-01-01 in seconds.
const T0: i64 = 1_559_347_200;
const T1: i64 = 1_640_995_200;

fn rules_with_small_free_tier() -> Rules {
    let mut cfg = BillingConfig::default();
    cfg.free_tier.calls_per_month = 50_000;
    cfg.free_tier.public_out_bytes_per_month = 5_000_000;
    cfg.validate().unwrap()
}

fn arb_account() -> impl Strategy<Value = Option<AccountRecord>> {
    let pack = (0u8..2, 1u64..200_000, T0..T1, 3_600i64..40_000_000, 0u8..10).prop_map(|(item, q, from, len, id)| ResourcePack {
        id: format!("pk-{id}"),
        item: if item == 0 { PackItem::Calls } else { PackItem::PublicOutBytes },
        quantity: q,
        valid_from: from,
        valid_until: from + len,
    });
    proptest::option::weighted(
        0.85,
        (T0..T1, prop::collection::vec(pack, 0..4)).prop_map(|(activated_at, mut packs)| {
            packs.sort_by(|a, b| a.id.cmp(&b.id));
            packs.dedup_by(|a, b| a.id == b.id);
            AccountRecord { account_id: "acct".into(), activated_at, resource_packs: packs, pricing: vec![], spend_alerts: vec![] }
        }),
    )
}

/// Hours of usage: (instant in seconds, calls, frontend errors, bytes by region).
fn arb_hours() -> impl Strategy<Value = Vec<(i64, u64, u64, BTreeMap<String, u64>)>> {
    prop::collection::vec(
        (
            T0..T1,
            0u64..80_000,
            0u64..100,
            prop::collection::btree_map(prop::sample::select(vec!["ap-a", "ap-b", "ap-c"]).prop_map(String::from), 1u64..3_000_000, 0..3),
        )
            .prop_map(|(t, c, f, b)| (t, c + f, f, b)),
        1..40,
    )
}

fn to_months(hours: &[(i64, u64, u64, BTreeMap<String, u64>)], rules: &Rules) -> BTreeMap<Month, MonthUsage> {
    let mut months: BTreeMap<Month, MonthUsage> = BTreeMap::new();
    for (t, calls, fe, bytes) in hours {
        let (month, hour) = rules.calendar.place(t * 1000);
        let part = HourUsage { calls: *calls, frontend_error_calls: *fe, public_out_bytes: bytes.clone(), ..Default::default() };
        months.entry(month).or_default().add_hour(hour, &part);
    }
    months
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_unit_is_accounted_for_once_and_amounts_are_not_negative(account in arb_account(), hours in arb_hours()) {
        let rules = rules_with_small_free_tier();
        let months = to_months(&hours, &rules);
        for b in compute_bills("acct", account.as_ref(), &months, &rules) {
            let c = &b.content;
            let deducted = |item| c.deductions.iter().filter(|d| d.item == item).map(|d| d.quantity).sum::<u64>();
            prop_assert_eq!(c.usage.calls, c.usage.frontend_error_calls + c.usage.trial_calls + deducted(PackItem::Calls) + c.chargeable.calls);
            prop_assert_eq!(c.usage.public_out_bytes, c.usage.trial_public_out_bytes + deducted(PackItem::PublicOutBytes) + c.chargeable.public_out_bytes);
            prop_assert!(c.total_amount >= rust_decimal::Decimal::ZERO);
            prop_assert!(c.charges.iter().all(|l| l.amount >= rust_decimal::Decimal::ZERO && l.quantity > 0));
            prop_assert_eq!(c.charges.iter().map(|l| l.amount).sum::<rust_decimal::Decimal>(), c.total_amount);
            let priced_calls: u64 = c.charges.iter().filter(|l| l.item == PackItem::Calls).map(|l| l.quantity).sum();
            prop_assert_eq!(priced_calls, c.chargeable.calls);
        }
    }

    #[test]
    fn packs_never_give_more_than_they_hold_nor_outside_their_window(account in arb_account(), hours in arb_hours()) {
        let rules = rules_with_small_free_tier();
        let months = to_months(&hours, &rules);
        let bills = compute_bills("acct", account.as_ref(), &months, &rules);
        let Some(account) = account else {
            prop_assert!(bills.iter().all(|b| b.content.deductions.is_empty()));
            return Ok(());
        };
        let ft = rules.free_tier.clone().unwrap();
        let (free_from, free_until) = free_tier_window(account.activated_at, ft.months, &rules);
        let mut given: BTreeMap<String, u64> = BTreeMap::new();
        for b in &bills {
            let usage = &months[&b.month];
            for d in &b.content.deductions {
                // The usage this pack could serve: non-trial hours inside its window.
                let (from, until, cap) = match d.source {
                    PackSource::FreeTier => {
                        let cap = if d.item == PackItem::Calls { ft.calls_per_month } else { ft.public_out_bytes_per_month };
                        (free_from, free_until, cap)
                    }
                    PackSource::Purchase => {
                        let p = account.resource_packs.iter().find(|p| p.id == d.pack_id && p.item == d.item).unwrap();
                        (p.valid_from, p.valid_until, p.quantity)
                    }
                };
                let eligible: u64 = usage.hours()
                    .filter(|u| u.hour_start >= from && u.hour_start < until && !rules.in_trial(u.hour_start))
                    .map(|u| if d.item == PackItem::Calls { u.calls - u.frontend_error_calls } else { u.public_out_total() })
                    .sum();
                prop_assert!(d.quantity <= eligible, "{} gave {} but only {} was in its window", d.pack_id, d.quantity, eligible);
                let total = given.entry(format!("{}/{:?}", d.pack_id, d.item)).or_insert(0);
                *total += d.quantity;
                prop_assert!(*total <= cap, "{} gave {} of {}", d.pack_id, total, cap);
            }
        }
    }

    #[test]
    fn bills_do_not_depend_on_how_usage_was_split(account in arb_account(), hours in arb_hours(), split in 1usize..8) {
        let rules = rules_with_small_free_tier();
        let whole = compute_bills("acct", account.as_ref(), &to_months(&hours, &rules), &rules);
        // Merge the same hours in `split` partial ledgers, in reverse order.
        let mut merged: BTreeMap<Month, MonthUsage> = BTreeMap::new();
        let mut parts: Vec<_> = hours.chunks(split).map(|c| to_months(c, &rules)).collect();
        parts.reverse();
        for p in parts {
            for (m, u) in p {
                merged.entry(m).or_default().merge(&u);
            }
        }
        prop_assert_eq!(compute_bills("acct", account.as_ref(), &merged, &rules), whole);
    }

    #[test]
    fn bills_do_not_depend_on_event_order_or_batches(seed_events in prop::collection::vec((0u8..4, T0..T1, 0u64..5000, any::<bool>(), 0u8..3), 1..120), batch in 1usize..20) {
        let rules = Rules::default();
        let msgs: Vec<Vec<u8>> = seed_events.iter().enumerate().map(|(i, (a, t, bytes, fe, region))| {
            format!(r#"{{"request_id":"r{i}","account_id":"acct-{a}","region":"ap-{region}","time":{},"client_network":"public","frontend_error":{fe},"request_bytes":1,"response_bytes":{bytes},"backend":{{"type":"mock"}}}}"#, t * 1000).into_bytes()
        }).collect();
        let expected = bills(&aggregate_messages(msgs.iter().map(Vec::as_slice), &rules).ledger, &BTreeMap::new(), &rules);
        let mut ledger: Ledger = BTreeMap::new();
        let reversed: Vec<&[u8]> = msgs.iter().rev().map(Vec::as_slice).collect();
        for chunk in reversed.chunks(batch) {
            for (acct, months) in aggregate_messages(chunk.iter().copied(), &rules).ledger {
                for (m, u) in months {
                    ledger.entry(acct.clone()).or_default().entry(m).or_default().merge(&u);
                }
            }
        }
        prop_assert_eq!(bills(&ledger, &BTreeMap::new(), &rules), expected);
    }
}
