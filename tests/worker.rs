//! The streaming worker end to end against librdkafka's in-process mock
//! cluster: bills on the output topic equal the pure core's bills for the
//! same events; restarts (after a committed batch, and between the RocksDB
//! write and the produce) lose and double nothing; malformed messages land
//! once on the dead-letter topic; replay equals live; bills validate against
//! the schema; `inspect --json` shows what was emitted.

mod common;

use common::{
    assert_bills_match, assert_dead_letters_once, assert_no_repeated_bills, config, fixture, read_bills, read_dead_letters, replay,
    run_live_until_done,
};
use gatebill::gen;
use gatebill::inspect;
use gatebill::worker::{self, FaultPoint, Mode, RunOptions};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_run_bills_equal_the_core_and_replay_equals_live() {
    let f = fixture(11, 6_000, 4).await;
    let s = run_live_until_done(&f.cfg, &f.expected).await;
    assert_eq!(s.billed, f.truth.unique_events, "{s:?}");
    assert_eq!(s.duplicates, f.truth.duplicates);
    assert_eq!(s.rejected, f.truth.malformed);
    let live = read_bills(&f.cfg, &f.cfg.kafka.output_topic);
    assert_bills_match(&live, &f.expected);
    // Months of 2020 closed long ago: with the idle fallback they are final.
    assert!(live.latest.values().all(|r| r.status == gatebill::billing::BillStatus::Final), "all final");

    // Dead letters: exactly once each, with a reason, the good messages billed.
    let dead = read_dead_letters(&f.cfg);
    assert_dead_letters_once(&dead, f.truth.malformed);
    assert_no_repeated_bills(&live);
    let reasons: HashSet<&str> = dead.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(reasons, HashSet::from(["malformed_json", "missing_field", "invalid_value", "unsupported_traffic_path"]));

    // Replay of the same topic into a fresh state directory and another topic.
    let mut rc = config(&f.cluster, f.dir.path(), "replay");
    rc.kafka.output_topic = "replayed-bills".into();
    let s = replay(&rc).await;
    assert_eq!(s.billed, f.truth.unique_events);
    let replayed = read_bills(&rc, "replayed-bills");
    let live_hashes: BTreeMap<_, _> = live.latest.iter().map(|(k, r)| (k.clone(), r.content_hash.clone())).collect();
    let replay_hashes: BTreeMap<_, _> = replayed.latest.iter().map(|(k, r)| (k.clone(), r.content_hash.clone())).collect();
    assert_eq!(live_hashes, replay_hashes);

    // Bills on the topic validate against the schema.
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/bill-record.schema.json")).unwrap())
            .unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    for r in live.latest.values() {
        let json = serde_json::to_value(r).unwrap();
        assert!(v.is_valid(&json), "{json}");
    }

    // `gatebill inspect --json` shows what was emitted.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_gatebill"))
        .args(["inspect", "--json", "--brokers", &f.cfg.kafka.brokers, "--output-topic", &f.cfg.kafka.output_topic])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown: BTreeMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<gatebill::billing::BillRecord>(l).unwrap())
        .map(|r| (r.key(), r.content_hash))
        .collect();
    assert_eq!(shown, live_hashes);
    let filtered = std::process::Command::new(env!("CARGO_BIN_EXE_gatebill"))
        .args(["inspect", "--json", "--brokers", &f.cfg.kafka.brokers, "--account", gen::SEED_ACCOUNT, "--month", "2020-11"])
        .output()
        .unwrap();
    let lines: Vec<String> = String::from_utf8(filtered.stdout).unwrap().lines().map(String::from).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_between_write_and_produce_and_after_commit_lose_and_double_nothing() {
    let f = fixture(12, 6_000, 4).await;
    let opts = |fault| RunOptions { mode: Mode::Live, fault: Some(fault) };
    // Crash right after the 2nd batch write, before anything of it is produced.
    let s = worker::run(&f.cfg.clone().checked().unwrap(), opts(FaultPoint::AfterWrite(2)), std::future::pending()).await.unwrap();
    assert!(s.crashed);
    // Restart; crash after the 3rd batch was written, produced and committed.
    let s = worker::run(&f.cfg.clone().checked().unwrap(), opts(FaultPoint::AfterCommit(3)), std::future::pending()).await.unwrap();
    assert!(s.crashed);
    // Restart once more and run to the end.
    run_live_until_done(&f.cfg, &f.expected).await;
    let table = read_bills(&f.cfg, &f.cfg.kafka.output_topic);
    assert_bills_match(&table, &f.expected);
    let calls: u64 = table.latest.values().map(|r| r.content.usage.calls).sum();
    assert_eq!(calls, f.truth.unique_events, "every event counted exactly once");
    assert_no_repeated_bills(&table);
    let dead = read_dead_letters(&f.cfg);
    assert_dead_letters_once(&dead, f.truth.malformed);
    // Revisions only go up per key.
    let (consumer, mut ends) = inspect::open(&f.cfg.kafka, &f.cfg.kafka.output_topic).unwrap();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    while !ends.is_empty() {
        let Some(Ok(m)) = BaseConsumer::poll(&consumer, Duration::from_secs(5)) else { panic!("output topic ended early") };
        let r: gatebill::billing::BillRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
        let prev = last.insert(r.key(), r.revision);
        assert!(prev.is_none_or(|p| p <= r.revision), "revision of {} went from {prev:?} to {}", r.key(), r.revision);
        if ends.get(&m.partition()).is_some_and(|e| m.offset() + 1 >= *e) {
            ends.remove(&m.partition());
        }
    }
}
