//! Two workers in one consumer group: a worker that lost partitions emits no
//! bill for their accounts, also when the account records change (issue 11,
//! "Done when" 4).

mod common;

use common::{config, fixture, wait_for_closed_bills};
use gatebill::billing::BillRecord;
use gatebill::config::Config;
use gatebill::kafka;
use gatebill::store::Store;
use gatebill::worker::{self, Mode, RunOptions, RunSummary};
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// End offsets of the output topic now.
fn output_ends(cfg: &Config) -> BTreeMap<i32, i64> {
    let probe = kafka::plain_consumer(&cfg.kafka, "probe").unwrap();
    (0..cfg.kafka.partitions).map(|p| (p, probe.fetch_watermarks(&cfg.kafka.output_topic, p, Duration::from_secs(10)).unwrap().1)).collect()
}

/// The bill records on the output topic from `from` to its end, in order.
fn bill_records_since(cfg: &Config, from: &BTreeMap<i32, i64>) -> Vec<BillRecord> {
    let consumer = kafka::plain_consumer(&cfg.kafka, "probe-read").unwrap();
    let (ends, _) = kafka::assign_to_end(&consumer, &cfg.kafka.output_topic, |p, low, _| {
        Ok::<_, kafka::KafkaSetupError>(from.get(&p).copied().unwrap_or(low))
    })
    .unwrap();
    let mut out = Vec::new();
    kafka::read_to_end(&consumer, ends, Duration::from_secs(30), |m| {
        out.push(serde_json::from_slice::<BillRecord>(m.payload().unwrap()).unwrap());
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap();
    out
}

/// Waits until the records since `from` stop growing (and are not empty).
async fn settled_records_since(cfg: &Config, from: &BTreeMap<i32, i64>) -> Vec<BillRecord> {
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let mut last = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = bill_records_since(cfg, from);
        if !now.is_empty() && now.len() == last {
            return now;
        }
        assert!(std::time::Instant::now() < deadline, "the output never settled: {} records", now.len());
        last = now.len();
    }
}

fn spawn_worker(cfg: &Config) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<RunSummary>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let checked = cfg.clone().checked().unwrap();
    let handle = tokio::spawn(async move {
        worker::run(&checked, RunOptions { mode: Mode::Live, fault: None }, async move {
            let _ = rx.await;
        })
        .await
        .unwrap()
    });
    (tx, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_lost_partitions_emits_no_bill_for_their_accounts_when_records_change() {
    let mut f = fixture(11, 3_000, 4).await;
    f.cfg.kafka.partitions = 4;
    let w1 = f.cfg.clone();
    let mut w2 = config(&f.cluster, f.dir.path(), "w2");
    w2.kafka.group_id = w1.kafka.group_id.clone();
    w2.kafka.partitions = 4;

    // W1 alone bills everything.
    let (stop1, h1) = spawn_worker(&w1);
    wait_for_closed_bills(&w1, &f.expected, Duration::from_secs(90)).await;

    let mut billed_by_w1: BTreeMap<String, u64> = BTreeMap::new();
    for r in bill_records_since(&w1, &BTreeMap::new()) {
        billed_by_w1.insert(r.key(), r.revision);
    }

    // W2 joins with an empty state directory: the group moves half of the
    // partitions to it, and it restores them from the changelog (bills
    // included, so it emits nothing new for them).
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    w2.metrics.address = format!("127.0.0.1:{port}");
    let (stop2, h2) = spawn_worker(&w2);
    wait_for_restores(&w2.metrics.address).await;
    let all: BTreeSet<String> = f.expected.values().map(|b| b.content.account_id.clone()).collect();

    // Every account record is replaced: activated long ago (no free tier in
    // the traffic's months) with a calls pack `pk-new` that covers every
    // call, so every bill changes. (Tombstones no longer delete a record:
    // rule book section 8.)
    let changed = output_ends(&w1);
    let producer: FutureProducer = kafka::client_config(&w1.kafka, &[]).create().unwrap();
    for a in &all {
        let record = format!(
            r#"{{"account_id":"{a}","activated_at":"2000-01-01T00:00:00+08:00","resource_packs":[{{"id":"pk-new","item":"calls","quantity":1000000000,"valid_from":"2019-01-01T00:00:00+08:00","valid_until":"2022-01-01T00:00:00+08:00"}}]}}"#
        );
        let r: FutureRecord<'_, str, [u8]> = FutureRecord::to(&w1.kafka.accounts_topic).key(a.as_str()).payload(record.as_bytes());
        producer.send(r, Duration::from_secs(10)).await.unwrap();
    }
    let after = settled_records_since(&w1, &changed).await;
    stop1.send(()).unwrap();
    stop2.send(()).unwrap();
    h1.await.unwrap();
    h2.await.unwrap();

    // One record per bill: its owner's. Had W1 also billed W2's accounts,
    // their keys would appear twice.
    let mut per_key: BTreeMap<String, Vec<(u64, Vec<String>)>> = BTreeMap::new();
    for r in bill_records_since(&w1, &changed) {
        let packs = r.content.deductions.iter().map(|d| d.pack_id.clone()).collect();
        per_key.entry(r.key()).or_default().push((r.revision, packs));
    }
    assert_eq!(after.len(), per_key.len());
    assert_eq!(per_key.len(), f.expected.len(), "every bill restated once");
    for (key, records) in &per_key {
        assert_eq!(records.len(), 1, "{key}: {records:?}");
        assert_eq!(records[0].1, ["pk-new"], "{key}: the new record's pack, and no free tier, now");
    }
    // W1's store: the accounts of the partitions W2 took are left marked
    // for when the partitions come back, their bills untouched; its own
    // accounts restated.
    let store = Store::open(&w1.worker.state_dir).unwrap();
    let moved: BTreeSet<String> = store.dirty().unwrap().into_iter().map(|(a, _, _)| a).collect();
    assert!(!moved.is_empty() && moved.len() < all.len(), "W2 took {} of {} accounts", moved.len(), all.len());
    for (a, m, s) in store.bill_states().unwrap() {
        let key = format!("{a}/{m}");
        let expected_revision = if moved.contains(&a) { billed_by_w1[&key] } else { per_key[&key][0].0 };
        assert_eq!(s.revision, expected_revision, "{key} in W1's store");
    }
}

/// Waits until the worker serving metrics at `address` has restored some
/// partitions (the group gave it its share), and a little longer.
async fn wait_for_restores(address: &str) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut body = String::new();
        if let Ok(mut c) = std::net::TcpStream::connect(address) {
            let _ = c.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
            let _ = c.read_to_string(&mut body);
        }
        if body.lines().any(|l| l.contains("restore_seconds{")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the second worker never restored a partition");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
}
