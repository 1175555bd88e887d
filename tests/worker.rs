//! The streaming worker end to end against librdkafka's in-process mock
//! cluster: bills on the output topic equal the pure core's bills for the
//! same events; restarts (after a committed batch, and between the RocksDB
//! write and the produce) lose and double nothing; malformed messages land
//! once on the dead-letter topic; replay equals live; bills validate against
//! the schema; `inspect --json` shows what was emitted.

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{decode_account, Bill, Rules};
use gatebill::config::Config;
use gatebill::gen::{self, GenSpec, GenTruth};
use gatebill::inspect::{self, BillTable};
use gatebill::worker::{self, FaultPoint, Mode, RunOptions, RunSummary};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

struct Fixture {
    cluster: MockCluster<'static, DefaultProducerContext>,
    cfg: Config,
    truth: GenTruth,
    expected: BTreeMap<String, Bill>,
    _dir: tempfile::TempDir,
}

fn config(cluster: &MockCluster<'static, DefaultProducerContext>, dir: &std::path::Path, name: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.kafka.group_id = format!("gatebill-{name}");
    cfg.worker.state_dir = dir.join(name);
    cfg.worker.batch_size = 700;
    cfg.worker.batch_wait_ms = 50;
    cfg.worker.emit_interval_ms = 100;
    cfg.worker.idle_after_secs = 1;
    cfg.worker.dedupe_window_hours = 24 * 400;
    cfg.metrics.address = String::new();
    // A crashed member is evicted after the session timeout; keep it short.
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
    cfg
}

/// A mock cluster with 4-partition topics, accounts and 6,000 generated
/// messages (2% duplicates, 1% malformed), and the core's bills for them.
async fn fixture(seed: u64) -> Fixture {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path(), "live");
    for t in [&cfg.kafka.input_topic, &cfg.kafka.accounts_topic, &cfg.kafka.output_topic, &cfg.kafka.dead_letter_topic, "replayed-bills"] {
        cluster.create_topic(t, 4, 1).unwrap();
    }
    let spec = GenSpec {
        events: 6_000,
        accounts: 40,
        skew: 1.0,
        start_ms: 1_603_123_200_000, // 2020-10-20T00:00:00+08:00
        days: 45,
        duplicates: 0.02,
        malformed: 0.01,
        seed,
    };
    let truth = gatebill::cli::generate(&cfg.kafka, &spec, true, 0).await.unwrap();
    // The pure core over the same messages.
    let rules = Rules::default();
    let mut msgs = Vec::new();
    gen::events(&spec, |m| msgs.push(m.payload));
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), &rules);
    assert_eq!(r.rejected.len() as u64, truth.malformed);
    let accounts: BTreeMap<_, _> =
        gen::accounts(spec.accounts, seed).iter().map(|m| decode_account(&m.payload).unwrap()).map(|a| (a.account_id.clone(), a)).collect();
    let expected = bills(&r.ledger, &accounts, &rules).into_iter().map(|b| (format!("{}/{}", b.content.account_id, b.month), b)).collect();
    Fixture { cluster, cfg, truth, expected, _dir: dir }
}

fn read_bills(cfg: &Config, topic: &str) -> BillTable {
    let (consumer, ends) = inspect::open(&cfg.kafka, topic).unwrap();
    let mut table = BillTable::default();
    inspect::read_to_end(&consumer, ends, &mut table, Duration::from_secs(30));
    table
}

/// Every dead letter: (reason, source partition, source offset).
fn read_dead_letters(cfg: &Config) -> Vec<(String, String, String)> {
    let (consumer, mut ends) = inspect::open(&cfg.kafka, &cfg.kafka.dead_letter_topic).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ends.is_empty() && std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = BaseConsumer::poll(&consumer, Duration::from_millis(200)) {
            let h = m.headers().unwrap();
            let get = |name: &str| {
                h.iter()
                    .find(|x| x.key == name)
                    .map(|x| String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
                    .unwrap_or_default()
            };
            out.push((get("gatebill.reason"), get("gatebill.source.partition"), get("gatebill.source.offset")));
            if ends.get(&m.partition()).is_some_and(|e| m.offset() + 1 >= *e) {
                ends.remove(&m.partition());
            }
        }
    }
    let _ = consumer.unassign();
    out
}

fn assert_bills_match(table: &BillTable, expected: &BTreeMap<String, Bill>) {
    let got: BTreeMap<&String, &str> = table.latest.iter().map(|(k, r)| (k, r.content_hash.as_str())).collect();
    let want: BTreeMap<&String, &str> = expected.iter().map(|(k, b)| (k, b.content_hash.as_str())).collect();
    if got != want {
        for (k, b) in expected {
            if let Some(r) = table.latest.get(k) {
                assert_eq!(&r.content, &b.content, "bill {k} differs");
            }
        }
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "different bill keys");
    }
    assert_eq!(table.unreadable, 0);
}

async fn replay(cfg: &Config) -> RunSummary {
    worker::run(cfg, RunOptions { mode: Mode::Replay { from_ms: None, progress: false }, fault: None }, std::future::pending())
        .await
        .unwrap()
}

/// Runs `gatebill run` in-process until the output topic holds every expected
/// bill, final (the test months closed long ago; partitions idle for a second
/// follow the wall clock), then stops it.
async fn run_live_until_done(cfg: &Config, expected: &BTreeMap<String, Bill>) -> RunSummary {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = cfg.clone();
    let handle = tokio::spawn(async move {
        worker::run(&c, RunOptions { mode: Mode::Live, fault: None }, async move {
            let _ = rx.await;
        })
        .await
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let table = read_bills(cfg, &cfg.kafka.output_topic);
        let done = expected.iter().all(|(k, b)| {
            table.latest.get(k).is_some_and(|r| r.content_hash == b.content_hash && r.status == gatebill::billing::BillStatus::Final)
        });
        if done {
            break;
        }
        if std::time::Instant::now() > deadline {
            let missing: Vec<String> = expected
                .iter()
                .filter_map(|(k, b)| match table.latest.get(k) {
                    None => Some(format!("{k}: missing")),
                    Some(r) if r.content_hash != b.content_hash => Some(format!("{k}: different content")),
                    Some(r) if r.status != gatebill::billing::BillStatus::Final => Some(format!("{k}: {:?}", r.status)),
                    _ => None,
                })
                .collect();
            panic!("bills not all final and equal to the core's after 90 s: {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tx.send(()).unwrap();
    handle.await.unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_run_bills_equal_the_core_and_replay_equals_live() {
    let f = fixture(11).await;
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
    assert_eq!(dead.len() as u64, f.truth.malformed);
    let unique: HashSet<_> = dead.iter().map(|(_, p, o)| (p.clone(), o.clone())).collect();
    assert_eq!(unique.len(), dead.len(), "no dead letter twice");
    let reasons: HashSet<&str> = dead.iter().map(|(r, _, _)| r.as_str()).collect();
    assert_eq!(reasons, HashSet::from(["malformed_json", "missing_field", "invalid_value", "unsupported_traffic_path"]));

    // Replay of the same topic into a fresh state directory and another topic.
    let mut rc = config(&f.cluster, f._dir.path(), "replay");
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
    let f = fixture(12).await;
    let opts = |fault| RunOptions { mode: Mode::Live, fault: Some(fault) };
    // Crash right after the 2nd batch write, before anything of it is produced.
    let s = worker::run(&f.cfg, opts(FaultPoint::AfterWrite(2)), std::future::pending()).await.unwrap();
    assert!(s.crashed);
    // Restart; crash after the 3rd batch was written, produced and committed.
    let s = worker::run(&f.cfg, opts(FaultPoint::AfterCommit(3)), std::future::pending()).await.unwrap();
    assert!(s.crashed);
    // Restart once more and run to the end.
    run_live_until_done(&f.cfg, &f.expected).await;
    let table = read_bills(&f.cfg, &f.cfg.kafka.output_topic);
    assert_bills_match(&table, &f.expected);
    let calls: u64 = table.latest.values().map(|r| r.content.usage.calls).sum();
    assert_eq!(calls, f.truth.unique_events, "every event counted exactly once");
    let dead = read_dead_letters(&f.cfg);
    assert_eq!(dead.len() as u64, f.truth.malformed, "every malformed message dead-lettered exactly once");
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
