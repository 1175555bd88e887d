//! Bills in live operation, through the in-process pipeline (no Kafka):
//! final bills do not depend on arrival order across months (packs), on
//! event-time order (duplicates), on events stamped far in the future, or on
//! one bad pack in an account record. Every figure is exact; every count
//! counts each record (a set would hide a duplicate).

mod common;

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{decode_account, BillRecord, BillStatus, BillingConfig, PackItem, Rules};
use gatebill::config::Config;
use gatebill::metrics::Metrics;
use gatebill::pipeline::Records;
use gatebill::pipeline::{headers, now_ms, InputMessage, Pipeline, Settings};
use gatebill::store::{OutboxRecord, Store};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;

const EVENTS: &str = "events";
const ACCOUNTS: &str = "accounts";

fn settings() -> Settings {
    let topics = Settings {
        input_topic: EVENTS.into(),
        accounts_topic: ACCOUNTS.into(),
        output_topic: "bills".into(),
        dead_letter_topic: "dead".into(),
        ..Settings::from_config(&Config::default())
    };
    assert_eq!((topics.dedupe_window_messages, topics.max_future_ms, topics.dedupe_window_secs), (1_000_000, 3_600_000, 72 * 3600));
    topics
}

/// Default prices, no trial; the free tier as configured by `free_tier`.
fn rules(free_tier: Option<(u64, u64)>) -> Rules {
    let mut cfg = BillingConfig { trial_periods: vec![], ..BillingConfig::default() };
    if let Some((calls, bytes)) = free_tier {
        cfg.free_tier.calls_per_month = calls;
        cfg.free_tier.public_out_bytes_per_month = bytes;
    }
    cfg.validate().unwrap()
}

fn open(dir: &std::path::Path, rules: Rules) -> Pipeline {
    Pipeline::new(Arc::new(Store::open(dir).unwrap()), rules, settings(), Metrics::new()).unwrap()
}

/// An event from a public client to a mock backend: `bytes` public outbound.
fn event(id: &str, account: &str, time: &str, bytes: u64) -> Vec<u8> {
    format!(
        r#"{{"request_id":"{id}","account_id":"{account}","region":"ap-guangzhou","time":"{time}","client_network":"public","request_bytes":10,"response_bytes":{bytes},"backend":{{"type":"mock"}}}}"#
    )
    .into_bytes()
}

/// A batch of input-topic messages on partition 0, from offset `first`.
fn batch<'a>(first: i64, payloads: &'a [(String, Vec<u8>)]) -> Vec<InputMessage<'a>> {
    payloads
        .iter()
        .enumerate()
        .map(|(i, (key, p))| InputMessage {
            topic: EVENTS,
            partition: 0,
            offset: first + i as i64,
            key: Some(key.as_bytes()),
            payload: Some(p),
            headers: vec![],
        })
        .collect()
}

/// A pipeline over a new store in `dir` that has applied one account record.
fn open_with_account(dir: &std::path::Path, id: &str, record: &[u8]) -> Pipeline {
    let mut p = open(dir, rules(None));
    p.apply_accounts(&[account_message(0, id, record)]).unwrap();
    p
}

fn account_message<'a>(offset: i64, key: &'a str, payload: &'a [u8]) -> InputMessage<'a> {
    InputMessage { topic: ACCOUNTS, partition: 0, offset, key: Some(key.as_bytes()), payload: Some(payload), headers: vec![] }
}

/// The bill records in the outbox (the newest per key), by key.
fn bills_in_outbox(p: &Pipeline) -> BTreeMap<String, BillRecord> {
    let mut out = BTreeMap::new();
    for (_, r) in p.outbox().unwrap() {
        if r.topic == "bills" {
            let b: BillRecord = serde_json::from_slice(&r.payload).unwrap();
            assert!(out.insert(b.key(), b).is_none(), "one outbox record per bill key");
        }
    }
    out
}

/// Every dead letter in the outbox, in order.
fn dead_letters(p: &Pipeline) -> Vec<OutboxRecord> {
    p.outbox().unwrap().into_iter().map(|(_, r)| r).filter(|r| r.topic == "dead").collect()
}

fn header<'r>(r: &'r OutboxRecord, name: &str) -> &'r str {
    std::str::from_utf8(&r.headers.iter().find(|(k, _)| k == name).unwrap().1).unwrap()
}

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

const GIB: u64 = 1 << 30;

/// The issue's reproduction, first batch: account `A` (activated 2015, pack
/// `pk-1` of 1 GiB public outbound valid in 2021), 1 GiB on 2021-04-10 and 0
/// bytes on 2021-05-03, processed (offsets 0 and 1), nothing emitted yet.
fn pack_account_with_april_and_may(dir: &std::path::Path) -> Pipeline {
    let record = br#"{"account_id":"A","activated_at":"2015-01-01T00:00:00+08:00","resource_packs":[
        {"id":"pk-1","item":"public_out_bytes","quantity":1073741824,
         "valid_from":"2021-01-01T00:00:00+08:00","valid_until":"2022-01-01T00:00:00+08:00"}]}"#;
    let mut p = open_with_account(dir, "A", record);
    let first = [
        ("A".to_string(), event("r-apr", "A", "2021-04-10T12:00:00+08:00", GIB)),
        ("A".to_string(), event("r-may", "A", "2021-05-03T12:00:00+08:00", 0)),
    ];
    p.process(&batch(0, &first)).unwrap();
    p
}

#[test]
fn a_late_earlier_month_spends_the_pack_and_restates_the_later_month() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pack_account_with_april_and_may(dir.path());
    let now = now_ms();
    assert_eq!(p.emit(now, false).unwrap(), 2);
    let b = bills_in_outbox(&p);
    let april = &b["A/2021-04"];
    assert_eq!((april.status, april.revision, april.content.total_amount), (BillStatus::Final, 1, dec("0.00")));
    assert_eq!(april.content.deductions.len(), 1);
    assert_eq!((april.content.deductions[0].pack_id.as_str(), april.content.deductions[0].quantity), ("pk-1", GIB));

    let second = [("A".to_string(), event("r-mar", "A", "2021-03-10T12:00:00+08:00", GIB))];
    p.process(&batch(2, &second)).unwrap();
    // March is new; April is restated because March spent the pack; May has no bytes and does not change.
    assert_eq!(p.emit(now, false).unwrap(), 2);
    let b = bills_in_outbox(&p);
    let march = &b["A/2021-03"];
    assert_eq!((march.content.total_amount, march.content.deductions[0].quantity), (dec("0.00"), GIB));
    assert_eq!(march.content.deductions[0].pack_id, "pk-1");
    let april = &b["A/2021-04"];
    assert_eq!((april.status, april.revision), (BillStatus::Restated, 2));
    assert_eq!(april.content.total_amount, dec("0.80"));
    assert_eq!(april.content.chargeable.public_out_bytes, GIB);
    assert!(april.content.deductions.is_empty());
    assert_eq!(b["A/2021-05"].revision, 1);
    assert_eq!(b["A/2021-05"].content.total_amount, dec("0.00"));
}

/// One generated history: account records and events (unique request ids
/// unless `duplicates`), in their original order.
struct History {
    accounts: Vec<(String, Vec<u8>)>,
    events: Vec<(String, Vec<u8>)>,
}

const MONTHS: [&str; 8] = ["2021-01", "2021-02", "2021-03", "2021-04", "2021-05", "2021-06", "2021-07", "2021-08"];

fn history(rng: &mut SmallRng, events: usize) -> History {
    let mut accounts = Vec::new();
    for a in 0..3 {
        let id = format!("acct-{a}");
        let mut packs = Vec::new();
        for k in 0..rng.random_range(0..4) {
            let item = if rng.random_bool(0.5) { "calls" } else { "public_out_bytes" };
            let qty = if item == "calls" { rng.random_range(1..30) } else { rng.random_range(1..40_000) };
            let from = rng.random_range(0..6);
            let until = rng.random_range(from + 1..=8);
            packs.push(format!(
                r#"{{"id":"pk-{k}","item":"{item}","quantity":{qty},"valid_from":"{}-{:02}T00:00:00+08:00","valid_until":"{}-01T00:00:00+08:00"}}"#,
                bound(from),
                rng.random_range(1..20),
                bound(until)
            ));
        }
        let activated = if rng.random_bool(0.5) { "2020-12-20T00:00:00+08:00" } else { "2019-03-01T00:00:00+08:00" };
        let record = format!(r#"{{"account_id":"{id}","activated_at":"{activated}","resource_packs":[{}]}}"#, packs.join(","));
        accounts.push((id, record.into_bytes()));
    }
    let mut out = Vec::new();
    for i in 0..events {
        let account = format!("acct-{}", rng.random_range(0..4)); // acct-3 has no record
        let time = format!(
            "{}-{:02}T{:02}:{:02}:00+08:00",
            MONTHS[rng.random_range(0..MONTHS.len())],
            rng.random_range(1..29),
            rng.random_range(0..24),
            rng.random_range(0..60)
        );
        let bytes = if rng.random_bool(0.3) { 0 } else { rng.random_range(1..20_000) };
        out.push((account.clone(), event(&format!("r{i}"), &account, &time, bytes)));
    }
    History { accounts, events: out }
}

/// The reference core's bills for a history (every repeat of a request id dropped).
fn reference(h: &History, rules: &Rules) -> BTreeMap<String, gatebill::billing::Bill> {
    let r = aggregate_messages(h.events.iter().map(|(_, p)| p.as_slice()), rules);
    let accounts = h.accounts.iter().map(|(id, raw)| (id.clone(), decode_account(raw).unwrap())).collect();
    bills(&r.ledger, &accounts, rules).into_iter().map(|b| (format!("{}/{}", b.content.account_id, b.month), b)).collect()
}

/// Feeds `stream` (events, with the account records placed at random
/// points) through the pipeline in batches of random sizes, emitting between
/// batches; returns the outbox's latest bill per key after a last emission.
fn feed(
    dir: &std::path::Path,
    h: &History,
    stream: &[(String, Vec<u8>)],
    rules: &Rules,
    rng: &mut SmallRng,
) -> BTreeMap<String, BillRecord> {
    let mut p = open(dir, rules.clone());
    feed_into(&mut p, &h.accounts, stream, 0, rng);
    p.emit(now_ms(), true).unwrap();
    bills_in_outbox(&p)
}

/// Feeds `stream` (input offsets from `first`) into `p` in batches of 1 to
/// 12 messages, with `accounts` applied at random points and emissions
/// between batches.
fn feed_into(p: &mut Pipeline, accounts: &[(String, Vec<u8>)], stream: &[(String, Vec<u8>)], first: usize, rng: &mut SmallRng) {
    let now = now_ms();
    let mut account_at: Vec<usize> = accounts.iter().map(|_| rng.random_range(0..=stream.len())).collect();
    account_at.sort_unstable();
    let (mut offset, mut next_account) = (0usize, 0usize);
    while offset < stream.len() || next_account < accounts.len() {
        while next_account < accounts.len() && account_at[next_account] <= offset {
            let (id, raw) = &accounts[next_account];
            p.apply_accounts(&[account_message((first + next_account) as i64, id, raw)]).unwrap();
            next_account += 1;
        }
        let n = rng.random_range(1..=12).min(stream.len() - offset);
        if n > 0 {
            p.process(&batch((first + offset) as i64, &stream[offset..offset + n])).unwrap();
            offset += n;
        }
        if rng.random_bool(0.6) {
            p.emit(now, false).unwrap();
        }
    }
}

fn assert_same_bills(got: &BTreeMap<String, BillRecord>, expected: &BTreeMap<String, gatebill::billing::Bill>) {
    for (k, b) in expected {
        let r = got.get(k).unwrap_or_else(|| panic!("no bill {k}"));
        assert_eq!(r.content, b.content, "bill {k} differs from the reference");
        assert_eq!(r.content_hash, b.content_hash);
    }
    assert_eq!(got.len(), expected.len(), "bills for keys the reference has none for");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(100))]

    /// Arrival order, batch sizes and emission points do not change the
    /// final bills, with packs spanning months and late months.
    #[test]
    fn latest_bills_equal_the_reference_in_any_order_and_batching(seed in any::<u64>(), events in 5usize..80) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let h = history(&mut rng, events);
        let rules = rules(Some((12, 30_000)));
        let expected = reference(&h, &rules);
        let mut stream = h.events.clone();
        stream.shuffle(&mut rng);
        let dir = tempfile::tempdir().unwrap();
        let got = feed(dir.path(), &h, &stream, &rules, &mut rng);
        assert_same_bills(&got, &expected);
    }
}

/// A history in random time order across eight months, with exact
/// duplicates a few messages after their originals (batches of 1 to 12
/// messages put boundaries between them).
fn shuffled_with_near_duplicates(rng: &mut SmallRng, h: &History) -> (Vec<(String, Vec<u8>)>, usize) {
    let mut stream = h.events.clone();
    stream.shuffle(rng);
    let mut duplicates = 0;
    let mut i = 0;
    while i < stream.len() {
        if rng.random_bool(0.25) {
            let at = (i + rng.random_range(1..6)).min(stream.len());
            stream.insert(at, stream[i].clone());
            duplicates += 1;
        }
        i += 1;
    }
    (stream, duplicates)
}

#[test]
fn duplicates_in_random_time_order_are_dropped_whatever_the_batch_boundaries() {
    for seed in 0..20 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let h = history(&mut rng, 150);
        let rules = rules(Some((12, 30_000)));
        let expected = reference(&h, &rules);
        let (stream, duplicates) = shuffled_with_near_duplicates(&mut rng, &h);
        assert!(duplicates > 20, "the history has duplicates");
        let dir = tempfile::tempdir().unwrap();
        let got = feed(dir.path(), &h, &stream, &rules, &mut rng);
        assert_same_bills(&got, &expected);
        let calls: u64 = got.values().map(|b| b.content.usage.calls).sum();
        assert_eq!(calls, 150, "seed {seed}: every event once, no repeat billed");
    }
}

#[test]
fn a_repeat_is_recognised_while_its_hour_had_an_event_within_the_message_window() {
    // Window of 3 messages and 1 hour of event time: the repeat of r1 three
    // messages later is recognised, four messages later it is not, whatever
    // the batches.
    for batch_size in [1, 2, 3, 10] {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        let s = Settings { dedupe_window_messages: 3, dedupe_window_secs: 3600, ..settings() };
        let mut p = Pipeline::new(store, rules(None), s, Metrics::new()).unwrap();
        let old = event("r1", "A", "2021-03-05T10:00:00+08:00", 1);
        let stream: Vec<(String, Vec<u8>)> = vec![
            ("A".into(), old.clone()),
            ("A".into(), event("x1", "A", "2021-06-05T10:00:00+08:00", 1)),
            ("A".into(), event("x2", "A", "2021-06-05T11:00:00+08:00", 1)),
            ("A".into(), old.clone()), // 3 after: a repeat
            ("A".into(), event("x3", "A", "2021-06-05T12:00:00+08:00", 1)),
            ("A".into(), event("x4", "A", "2021-06-05T13:00:00+08:00", 1)),
            ("A".into(), event("x5", "A", "2021-06-05T14:00:00+08:00", 1)),
            ("A".into(), event("x6", "A", "2021-06-05T15:00:00+08:00", 1)),
            ("A".into(), old.clone()), // 5 after the last r1: billed again
        ];
        let (mut dup, mut billed) = (0, 0);
        for (i, chunk) in stream.chunks(batch_size).enumerate() {
            let st = p.process(&batch((i * batch_size) as i64, chunk)).unwrap();
            dup += st.duplicates;
            billed += st.billed;
        }
        assert_eq!((billed, dup), (8, 1), "batch size {batch_size}");
    }
}

#[test]
fn an_event_stamped_far_in_the_future_is_dead_lettered_and_closes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), rules(None));
    let e = event("r1", "A", "2020-11-05T10:00:00+08:00", 100);
    let f = event("r-future", "A", "9999-12-31T00:00:00+08:00", 100);
    let now = now_ms();
    for (offset, payload) in [(0, &e), (1, &f), (2, &e)] {
        p.process(&batch(offset, &[("A".to_string(), payload.clone())])).unwrap();
        p.emit(now, false).unwrap();
    }
    let b = bills_in_outbox(&p);
    assert_eq!(b.len(), 1);
    let nov = &b["A/2020-11"];
    assert_eq!((nov.content.usage.calls, nov.status), (1, BillStatus::Provisional));
    let dead = dead_letters(&p);
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], headers::REASON), "future_time");
    assert_eq!(header(&dead[0], headers::SOURCE_OFFSET), "1");
    assert!(header(&dead[0], headers::DETAIL).contains("worker.max_future_secs = 3600"), "{}", header(&dead[0], headers::DETAIL));
    assert_eq!(dead[0].payload, f);
    // Within the limit is accepted: half an hour ahead.
    let soon = chrono::DateTime::from_timestamp_millis(now + 1_800_000).unwrap().to_rfc3339();
    let st = p.process(&batch(3, &[("A".to_string(), event("r-soon", "A", &soon, 1))])).unwrap();
    assert_eq!((st.billed, st.rejected), (1, 0));
}

#[test]
fn an_invalid_pack_leaves_the_rest_of_the_account_record_applied() {
    let dir = tempfile::tempdir().unwrap();
    let record = br#"{"account_id":"C","activated_at":"2021-01-05T00:00:00+08:00","resource_packs":[
        {"id":"pk-empty","item":"public_out_bytes","quantity":1073741824,
         "valid_from":"2021-02-01T00:00:00+08:00","valid_until":"2021-02-01T00:00:00+08:00"}]}"#;
    let mut p = open_with_account(dir.path(), "C", record);
    p.process(&batch(0, &[("C".to_string(), event("r1", "C", "2021-02-10T12:00:00+08:00", 1_610_612_736))])).unwrap();
    p.emit(now_ms(), true).unwrap();
    let b = bills_in_outbox(&p);
    let feb = &b["C/2021-02"];
    assert!(feb.content.account_known);
    assert_eq!(feb.content.total_amount, dec("0.40"));
    let deducted: Vec<(&str, PackItem, u64)> = feb.content.deductions.iter().map(|d| (d.pack_id.as_str(), d.item, d.quantity)).collect();
    assert_eq!(deducted, vec![("free-tier/2021-02", PackItem::Calls, 1), ("free-tier/2021-02", PackItem::PublicOutBytes, GIB)]);
    let dead = dead_letters(&p);
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], headers::REASON), "invalid_resource_pack");
    assert_eq!(header(&dead[0], headers::SOURCE_TOPIC), ACCOUNTS);
    let detail = header(&dead[0], headers::DETAIL);
    assert!(detail.contains("#0 `pk-empty`: valid_from is not before valid_until"), "{detail}");
    assert_eq!(dead[0].payload, record.to_vec());
}

/// The same history through the Kafka worker: `replay` and `run` both drop
/// every near duplicate of a stream in random time order, in batches of 5.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_in_random_time_order_through_replay_and_run_equal_the_reference() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = common::config(&cluster, dir.path(), "live");
    // The default event-time window: the shuffled months lie far behind the watermark.
    cfg.worker.dedupe_window_hours = 72;
    cfg.worker.batch_size = 5;
    cfg.billing.trial_periods = vec![];
    cfg.billing.free_tier.calls_per_month = 12;
    cfg.billing.free_tier.public_out_bytes_per_month = 30_000;
    let rules = cfg.check().unwrap();
    common::create_topics(&cluster, &cfg, 2, &["replayed-bills"]);
    let mut rng = SmallRng::seed_from_u64(7);
    let h = history(&mut rng, 300);
    let expected = reference(&h, &rules);
    let (stream, duplicates) = shuffled_with_near_duplicates(&mut rng, &h);
    let producer = gatebill::kafka::producer(&cfg.kafka).unwrap();
    for (topic, msgs) in [(&cfg.kafka.accounts_topic, &h.accounts), (&cfg.kafka.input_topic, &stream)] {
        let recs: Vec<(Vec<u8>, OutboxRecord)> = msgs
            .iter()
            .map(|(k, p)| {
                (
                    Vec::new(),
                    OutboxRecord {
                        topic: topic.clone(),
                        key: Some(k.clone().into_bytes()),
                        payload: p.clone(),
                        headers: vec![],
                        partition: None,
                    },
                )
            })
            .collect();
        assert_eq!(gatebill::kafka::produce_all(&producer, &recs).await.len(), recs.len());
    }

    let mut rc = common::config(&cluster, dir.path(), "replay");
    rc.worker = cfg.worker.clone();
    rc.worker.state_dir = dir.path().join("replay");
    rc.billing = cfg.billing.clone();
    rc.kafka.output_topic = "replayed-bills".into();
    let s = common::replay(&rc).await;
    assert_eq!((s.billed, s.duplicates, s.rejected), (300, duplicates as u64, 0), "{s:?}");
    let replayed = common::read_bills(&rc, "replayed-bills");
    common::assert_bills_match(&replayed, &expected);
    common::assert_no_repeated_bills(&replayed);

    let s = common::run_live_until_done(&cfg, &expected).await;
    assert_eq!((s.billed, s.duplicates, s.rejected), (300, duplicates as u64, 0), "{s:?}");
    let live = common::read_bills(&cfg, &cfg.kafka.output_topic);
    common::assert_bills_match(&live, &expected);
    common::assert_no_repeated_bills(&live);
    assert!(common::read_dead_letters(&cfg).is_empty());
}

/// A stop between two emission chunks loses no restatement: the later months
/// of an account with packs are marked dirty on disk before any chunk is
/// written. 1,023 other accounts put March (the late month) last in the first
/// chunk of 1,024 bills and April first in the second, which fails.
#[test]
fn a_stop_between_emission_chunks_still_restates_the_later_month() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pack_account_with_april_and_may(dir.path());
    let now = now_ms();
    p.emit(now, false).unwrap();
    assert_eq!(bills_in_outbox(&p)["A/2021-04"].content.total_amount, dec("0.00"));

    let mut second: Vec<(String, Vec<u8>)> =
        (0..1023).map(|i| format!("{i:04}")).map(|a| (a.clone(), event(&format!("o-{a}"), &a, "2021-06-01T12:00:00+08:00", 1))).collect();
    second.push(("A".to_string(), event("r-mar", "A", "2021-03-10T12:00:00+08:00", GIB)));
    p.process(&batch(2, &second)).unwrap();
    // The first chunk is delivered (by the caller) and committed; the stop
    // comes while the second is being delivered: it is never committed.
    let mut plan = p.emission(now, false).unwrap();
    let first = p.next_emission(&mut plan).unwrap().unwrap();
    assert_eq!(first.records.last().map(|(_, r)| r.key.clone().unwrap()), Some(b"A/2021-03".to_vec()));
    p.stage_emission(first, Records::Captured).unwrap().apply().unwrap();
    let stopped = p.next_emission(&mut plan).unwrap();
    assert!(stopped.is_some());
    drop((stopped, plan));
    // The next emission restates April: the pack was spent by March.
    p.emit(now, false).unwrap();
    let april = &bills_in_outbox(&p)["A/2021-04"];
    assert_eq!((april.status, april.revision, april.content.total_amount), (BillStatus::Restated, 2, dec("0.80")));
}

/// Issue 25, point 8 (rule book section 8): a tombstone on the accounts
/// topic removed the account's record, so its free tier and packs were gone
/// and its past bills were restated as an unknown account's. Now it is
/// dead-lettered (`account_tombstone`) and the last record stays in force,
/// in memory and in the store.
#[test]
fn an_account_tombstone_is_dead_lettered_and_the_last_record_stays() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = pack_account_with_april_and_may(dir.path());
    let now = now_ms();
    assert_eq!(p.emit(now, false).unwrap(), 2);
    let before = bills_in_outbox(&p);
    assert_eq!((before["A/2021-04"].content.total_amount, before["A/2021-04"].content.deductions[0].quantity), (dec("0.00"), GIB));

    let tombstone = InputMessage { payload: None, ..account_message(1, "A", b"") };
    assert_eq!(p.apply_accounts(&[tombstone]).unwrap(), 1);
    // Nothing to restate: the bills are those of the record in force.
    assert_eq!(p.emit(now, false).unwrap(), 0);
    assert_eq!(bills_in_outbox(&p), before);
    let dead = dead_letters(&p);
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], headers::REASON), "account_tombstone");
    assert_eq!((header(&dead[0], headers::SOURCE_TOPIC), header(&dead[0], headers::SOURCE_OFFSET)), (ACCOUNTS, "1"));
    assert_eq!(
        header(&dead[0], headers::DETAIL),
        "tombstone (null value) for account `A`: a tombstone does not delete billing history, so the account's last record \
         stays in force; to change the account, publish a new record for it"
    );
    assert_eq!((dead[0].key.as_deref(), dead[0].payload.as_slice()), (Some(&b"A"[..]), &b""[..]));

    // Reopened from the store, the pack still applies: March spends it and
    // April is restated to 0.80, as with the record never tombstoned.
    drop(p);
    let mut p = open(dir.path(), rules(None));
    p.process(&batch(2, &[("A".to_string(), event("r-mar", "A", "2021-03-10T12:00:00+08:00", GIB))])).unwrap();
    assert_eq!(p.emit(now, false).unwrap(), 2);
    let b = bills_in_outbox(&p);
    assert_eq!((b["A/2021-03"].content.deductions[0].pack_id.as_str(), b["A/2021-03"].content.total_amount), ("pk-1", dec("0.00")));
    let april = &b["A/2021-04"];
    assert!(april.content.account_known);
    assert_eq!((april.status, april.revision, april.content.total_amount), (BillStatus::Restated, 2, dec("0.80")));
}

/// Default rules without trials, with a price version `h2` from July 2021
/// whose calls cost `calls` per 10,000 (and `extra` TOML appended).
fn versioned(calls: &str, extra: &str) -> Rules {
    let text = format!(
        "trial_periods = []\n[[price_versions]]\nid = \"h2\"\neffective_from = \"2021-07-01T00:00:00+08:00\"\n\
         calls = [{{ price = \"{calls}\" }}]\ntraffic_default = [{{ price = \"0.80\" }}]\n{extra}"
    );
    BillingConfig::from_toml(&text).unwrap().validate().unwrap()
}

/// Rule book section 11.2: a worker restarted with an edited version
/// restates exactly the months of that version whose bills change, and
/// nothing else; one restarted with a version added in the future of every
/// month restates nothing.
#[test]
fn a_restart_with_an_edited_price_version_restates_exactly_the_months_whose_bills_change() {
    let dir = tempfile::tempdir().unwrap();
    let now = now_ms();
    let mut p = open(dir.path(), versioned("0.05", ""));
    // F is in its free tier from June 15: its calls in July and August cost nothing at any price.
    p.apply_accounts(&[account_message(0, "F", br#"{"account_id":"F","activated_at":"2021-06-15T00:00:00+08:00"}"#)]).unwrap();
    let events: Vec<(String, Vec<u8>)> =
        [("P", "2021-06-10"), ("P", "2021-07-10"), ("P", "2021-08-10"), ("F", "2021-07-10"), ("F", "2021-08-10")]
            .iter()
            .enumerate()
            .map(|(i, (a, day))| (a.to_string(), event(&format!("r{i}"), a, &format!("{day}T12:00:00+08:00"), 0)))
            .collect();
    p.process(&batch(0, &events)).unwrap();
    assert_eq!(p.emit(now, true).unwrap(), 5);
    let first = bills_in_outbox(&p);
    assert_eq!(first["P/2021-07"].content.charges[0].unit_price, dec("0.05"));
    assert_eq!(first["P/2021-07"].content.price_version.as_deref(), Some("h2"));
    drop(p);

    // Edited: h2's calls now cost 0.04.
    let mut p = open(dir.path(), versioned("0.04", ""));
    let change = p.rules_change();
    assert_eq!((change.marked, change.billed), (4, 5), "h2's months are marked: P and F in July and August");
    assert_eq!(p.emit(now, true).unwrap(), 2, "only P's July and August bills change");
    let second = bills_in_outbox(&p);
    for key in ["P/2021-07", "P/2021-08"] {
        let b = &second[key];
        assert_eq!((b.status, b.revision, b.content.charges[0].unit_price), (BillStatus::Restated, 2, dec("0.04")), "{key}");
    }
    for key in ["P/2021-06", "F/2021-07", "F/2021-08"] {
        assert_eq!(second[key], first[key], "{key} is not emitted again");
    }
    drop(p);

    // The same rules again: nothing to restate.
    let mut p = open(dir.path(), versioned("0.04", ""));
    assert_eq!((p.rules_change().marked, p.emit(now, true).unwrap()), (0, 0));
    drop(p);
    // A version added in the future of every month: nothing marked, nothing emitted.
    let future = "[[price_versions]]\nid = \"2030\"\neffective_from = \"2030-01-01T00:00:00+08:00\"\n\
                  calls = [{ price = \"9\" }]\ntraffic_default = [{ price = \"9\" }]\n";
    let mut p = open(dir.path(), versioned("0.04", future));
    assert_eq!((p.rules_change().marked, p.rules_change().billed, p.emit(now, true).unwrap()), (0, 5, 0));
    assert_eq!(bills_in_outbox(&p), second);
}

/// The same history billed with and without a version in its future: the
/// bill records' bytes are identical.
#[test]
fn a_history_billed_with_a_future_price_version_gives_byte_identical_bills() {
    let mut rng = SmallRng::seed_from_u64(29);
    let h = history(&mut rng, 60);
    let future = "[[price_versions]]\nid = \"2030\"\neffective_from = \"2030-01-01T00:00:00+08:00\"\n\
                  calls = [{ price = \"9\" }]\ntraffic_default = [{ price = \"9\" }]\n";
    let mut payloads = Vec::new();
    for rules in [versioned("0.05", ""), versioned("0.05", future)] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path(), rules);
        feed_into(&mut p, &h.accounts, &h.events, 0, &mut SmallRng::seed_from_u64(7));
        p.emit(now_ms(), true).unwrap();
        let bills: Vec<Vec<u8>> = p.outbox().unwrap().into_iter().filter(|(_, r)| r.topic == "bills").map(|(_, r)| r.payload).collect();
        payloads.push(bills);
    }
    assert!(payloads[0].len() > 10, "{} bills", payloads[0].len());
    assert_eq!(payloads[0], payloads[1]);
}

#[test]
fn overlapping_pricing_terms_are_dead_lettered_and_the_rest_of_the_record_applies() {
    let dir = tempfile::tempdir().unwrap();
    let record = br#"{"account_id":"T","activated_at":"2015-01-01T00:00:00+08:00",
        "resource_packs":[{"id":"pk-1","item":"public_out_bytes","quantity":1073741824,
          "valid_from":"2021-01-01T00:00:00+08:00","valid_until":"2022-01-01T00:00:00+08:00"}],
        "pricing":[{"effective_from":"2021-01","discount":"0.10"},{"effective_from":"2021-02","effective_until":"2021-03","discount":"0.50"},
                   {"effective_from":"2021-01","prices":{"calls":[{"price":"1000"}],"traffic_default":[{"price":"2.00"}]}}]}"#;
    let mut p = open_with_account(dir.path(), "T", record);
    p.process(&batch(0, &[("T".to_string(), event("r1", "T", "2021-02-10T12:00:00+08:00", 2 * GIB))])).unwrap();
    p.emit(now_ms(), true).unwrap();
    let feb = &bills_in_outbox(&p)["T/2021-02"];
    // The pack takes 1 GiB; 1 GiB at the account's 2.00 and 1 call at 1000 per 10,000 (0.10), undiscounted.
    assert_eq!(feb.content.deductions[0].pack_id, "pk-1");
    assert_eq!(feb.content.total_amount, dec("2.10"));
    assert!(feb.content.charges.iter().all(|c| c.discount.is_none()));
    assert_eq!(feb.content.pricing_terms.iter().map(|t| t.kind.as_str()).collect::<Vec<_>>(), ["prices"]);
    let dead = dead_letters(&p);
    assert_eq!(dead.len(), 1);
    assert_eq!(header(&dead[0], headers::REASON), "invalid_pricing");
    let detail = header(&dead[0], headers::DETAIL);
    assert!(
        detail.contains("#0: a discount term overlapping term #1") && detail.contains("#1: a discount term overlapping term #0"),
        "{detail}"
    );
    assert_eq!(dead[0].payload, record.to_vec());
}

/// Random price versions: `[billing.prices]` (named or not) and up to two
/// later versions at month starts of the history, with call tiers whose
/// bounds the history reaches.
fn random_versions(rng: &mut SmallRng) -> Rules {
    let call_prices = ["100", "250.5", "1000"];
    let mut text = String::from("trial_periods = []\n[free_tier]\ncalls_per_month = 12\npublic_out_bytes_per_month = 30000\n");
    if rng.random_bool(0.5) {
        text.push_str("[prices]\nid = \"base\"\n");
    }
    let mut months: Vec<usize> = (1..MONTHS.len()).collect();
    months.shuffle(rng);
    for (i, m) in months.iter().take(rng.random_range(0..=2)).enumerate() {
        let tier1 = call_prices[rng.random_range(0..3)];
        let tier2 = call_prices[rng.random_range(0..3)];
        let bytes = ["0.80", "0.50", "3"][rng.random_range(0..3)];
        text.push_str(&format!(
            "[[price_versions]]\nid = \"v{i}\"\neffective_from = \"{}-01T00:00:00+08:00\"\n\
             calls = [{{ up_to = 5, price = \"{tier1}\" }}, {{ price = \"{tier2}\" }}]\ntraffic_default = [{{ price = \"{bytes}\" }}]\n",
            MONTHS[*m]
        ));
    }
    BillingConfig::from_toml(&text).unwrap().validate().unwrap()
}

/// Adds random pricing terms (discounts, own prices, some overlapping) to
/// the history's account records.
fn with_random_terms(rng: &mut SmallRng, h: &mut History) {
    for (_, raw) in h.accounts.iter_mut() {
        let mut terms = Vec::new();
        for _ in 0..rng.random_range(0..3) {
            let from = rng.random_range(0..MONTHS.len());
            let until = if rng.random_bool(0.5) {
                format!(r#","effective_until":"{}""#, bound(rng.random_range(from + 1..=8)))
            } else {
                String::new()
            };
            let what = if rng.random_bool(0.5) {
                format!(r#""discount":"{}""#, ["0.15", "0.5", "0.333"][rng.random_range(0..3)])
            } else {
                r#""prices":{"calls":[{"price":"500"}],"traffic_default":[{"price":"1.25"}]}"#.to_string()
            };
            terms.push(format!(r#"{{"effective_from":"{}"{until},{what}}}"#, MONTHS[from]));
        }
        let text = String::from_utf8(raw.clone()).unwrap();
        *raw = format!(r#"{},"pricing":[{}]}}"#, &text[..text.len() - 1], terms.join(",")).into_bytes();
    }
}

/// A month bound of the history: its months, then September.
fn bound(m: usize) -> String {
    if m == 8 {
        "2021-09".to_string()
    } else {
        MONTHS[m].to_string()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    /// With random price versions and account terms, and the rules changed
    /// between two runs over one state directory, the latest bills are the
    /// reference core's on the whole history with the final rules.
    #[test]
    fn latest_bills_equal_the_reference_across_a_change_of_price_versions_and_terms(seed in any::<u64>(), events in 5usize..60) {
        let mut rng = SmallRng::seed_from_u64(seed);
        let mut h = history(&mut rng, events);
        with_random_terms(&mut rng, &mut h);
        let (first, second) = (random_versions(&mut rng), random_versions(&mut rng));
        let expected = reference(&h, &second);
        let mut stream = h.events.clone();
        stream.shuffle(&mut rng);
        let cut = rng.random_range(0..=stream.len());
        let dir = tempfile::tempdir().unwrap();
        let mut p = open(dir.path(), first);
        feed_into(&mut p, &h.accounts, &stream[..cut], 0, &mut rng);
        p.emit(now_ms(), true).unwrap();
        drop(p);
        let mut p = open(dir.path(), second);
        feed_into(&mut p, &[], &stream[cut..], cut, &mut rng);
        p.emit(now_ms(), true).unwrap();
        assert_same_bills(&bills_in_outbox(&p), &expected);
    }
}

/// Rules without trials, the free tier as `free_tier`, and spend lines.
fn alerting(free_tier: Option<(u64, u64)>, lines: &[&str]) -> Rules {
    let mut cfg = BillingConfig { trial_periods: vec![], ..BillingConfig::default() };
    if let Some((calls, bytes)) = free_tier {
        cfg.free_tier.calls_per_month = calls;
        cfg.free_tier.public_out_bytes_per_month = bytes;
    }
    cfg.alerts.spend_thresholds = lines.iter().map(|l| l.to_string()).collect();
    cfg.validate().unwrap()
}

/// Every usage alert in the outbox: (account, month, kind, subject) -> the record.
fn alerts_in_outbox(p: &Pipeline) -> BTreeMap<(String, String, String, String), serde_json::Value> {
    let mut out = BTreeMap::new();
    for (_, r) in p.outbox().unwrap() {
        if r.topic == "gateway-alerts" {
            let v: serde_json::Value = serde_json::from_slice(&r.payload).unwrap();
            let id = ["account_id", "month", "kind", "subject"].map(|f| v[f].as_str().unwrap().to_string());
            assert_eq!(r.key.as_deref(), Some(id[0].as_bytes()), "keyed by account");
            assert!(out.insert((id[0].clone(), id[1].clone(), id[2].clone(), id[3].clone()), v).is_none(), "one record per identity");
        }
    }
    out
}

/// Rule book 12: a spend line crossed in March 2021 is sent once, with the
/// hour the running total passed it; a late event in an earlier hour moves
/// the crossing earlier, restates the bill, and sends nothing again (the
/// first alert's hour stands), also after a restart.
#[test]
fn a_spend_alert_goes_out_once_and_a_late_earlier_crossing_does_not_send_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let rules = alerting(None, &["1.00", "2"]);
    let mut p = Pipeline::new(Arc::new(Store::open(dir.path()).unwrap()), rules.clone(), settings(), metrics.clone()).unwrap();
    let now = now_ms();
    let seven_tenths = 7 * GIB / 10;
    // 0.7 GiB at 0.80 per GB twice: 0.56, then 1.12 (the 1.00 line passed at 03-20 12:00).
    let first = [
        ("U".to_string(), event("r1", "U", "2021-03-10T12:00:00+08:00", seven_tenths)),
        ("U".to_string(), event("r2", "U", "2021-03-20T12:00:00+08:00", seven_tenths)),
    ];
    p.process(&batch(0, &first)).unwrap();
    assert_eq!(p.emit(now, true).unwrap(), 1);
    let sent = alerts_in_outbox(&p);
    assert_eq!(sent.len(), 1);
    let a = &sent[&("U".into(), "2021-03".into(), "spend_threshold".into(), "1".into())];
    assert_eq!(
        (a["hour"].as_str(), a["threshold"].as_str(), a["currency"].as_str(), a["revision"].as_u64()),
        (Some("2021-03-20T12:00:00+08:00"), Some("1"), Some("CNY"), Some(1))
    );
    assert_eq!(metrics.alerts_emitted.with_label_values(&["spend_threshold"]).get(), 1);

    // A late event on 03-05 puts 1.4 GiB (1.12) behind the 03-10 hour: the crossing moves earlier.
    p.process(&batch(2, &[("U".to_string(), event("r0", "U", "2021-03-05T08:00:00+08:00", seven_tenths))])).unwrap();
    assert_eq!(p.emit(now, true).unwrap(), 1, "the bill is restated");
    assert_eq!(bills_in_outbox(&p)["U/2021-03"].revision, 2);
    assert_eq!(alerts_in_outbox(&p), sent, "no second alert; the first one's hour stands");
    assert_eq!(metrics.alerts_emitted.with_label_values(&["spend_threshold"]).get(), 1);
    drop(p);

    // After a restart, the 2.00 line (2.8 GiB: 1.68 by 03-20, then 2.24 at 03-25 10:00) is the one new alert.
    let mut p = Pipeline::new(Arc::new(Store::open(dir.path()).unwrap()), rules, settings(), metrics.clone()).unwrap();
    p.process(&batch(3, &[("U".to_string(), event("r3", "U", "2021-03-25T10:00:00+08:00", seven_tenths))])).unwrap();
    assert_eq!(p.emit(now, true).unwrap(), 1);
    let after = alerts_in_outbox(&p);
    assert_eq!(after.len(), 2);
    assert_eq!(after[&("U".into(), "2021-03".into(), "spend_threshold".into(), "1".into())], sent.values().next().unwrap().clone());
    let two = &after[&("U".into(), "2021-03".into(), "spend_threshold".into(), "2".into())];
    assert_eq!((two["hour"].as_str(), two["revision"].as_u64()), (Some("2021-03-25T10:00:00+08:00"), Some(3)));
    assert_eq!(metrics.alerts_emitted.with_label_values(&["spend_threshold"]).get(), 2);
}

/// The alerts (identity and hour) a pipeline emitted for `stream`, fed in
/// batches of `size` with an emission after each, account records first.
fn alerts_of_run(
    h: &History,
    stream: &[(String, Vec<u8>)],
    rules: &Rules,
    size: usize,
) -> BTreeMap<(String, String, String, String), String> {
    let dir = tempfile::tempdir().unwrap();
    let mut p = open(dir.path(), rules.clone());
    let now = now_ms();
    for (i, (id, raw)) in h.accounts.iter().enumerate() {
        p.apply_accounts(&[account_message(i as i64, id, raw)]).unwrap();
    }
    for (i, part) in stream.chunks(size).enumerate() {
        p.process(&batch((i * size) as i64, part)).unwrap();
        p.emit(now, false).unwrap();
    }
    p.emit(now, true).unwrap();
    alerts_in_outbox(&p).into_iter().map(|(k, v)| (k, v["hour"].as_str().unwrap().to_string())).collect()
}

/// Rule book 12: for a time-ordered history whose account records do not
/// change, a replay (one emission at the end) and a live run (an emission
/// after every message) emit the same identities with the same hours: the
/// crossings of the reference core on the whole history.
#[test]
fn replay_and_live_runs_of_a_time_ordered_history_emit_the_same_alerts() {
    let mut found = 0;
    for seed in 0..8u64 {
        let mut rng = SmallRng::seed_from_u64(seed);
        let h = history(&mut rng, 150);
        let rules = alerting(Some((12, 30_000)), &["0.01", "0.02"]);
        let mut stream = h.events.clone();
        // The time field sorts as text (one offset, fixed width); ties keep their order.
        let time = |p: &[u8]| serde_json::from_slice::<serde_json::Value>(p).unwrap()["time"].as_str().unwrap().to_string();
        stream.sort_by_key(|(_, p)| time(p));
        let replay = alerts_of_run(&h, &stream, &rules, stream.len());
        let live = alerts_of_run(&h, &stream, &rules, 1);
        assert_eq!(live, replay, "seed {seed}");
        // The reference: every crossing of each account's whole history.
        let r = aggregate_messages(stream.iter().map(|(_, p)| p.as_slice()), &rules);
        let accounts: BTreeMap<String, gatebill::billing::AccountRecord> =
            h.accounts.iter().map(|(id, raw)| (id.clone(), decode_account(raw).unwrap())).collect();
        let mut want = BTreeMap::new();
        for (account, months) in &r.ledger {
            for c in gatebill::billing::alerts::crossings(accounts.get(account), months, &rules, &rules.spend_thresholds) {
                let hour = chrono::DateTime::from_timestamp(c.hour, 0).unwrap().with_timezone(&rules.calendar.tz).to_rfc3339();
                want.insert((account.clone(), c.month.to_string(), c.kind.as_str().to_string(), c.subject), hour);
            }
        }
        assert_eq!(replay, want, "seed {seed}");
        found += want.len();
    }
    assert!(found > 20, "{found} alerts over the seeds");
}
