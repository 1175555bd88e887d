//! Issue 27, "Done when" 2: the changelog's live content (the latest record
//! per key that is not a tombstone) follows what the store holds, not how
//! long the worker has run: a stream many times longer than the dedupe
//! windows leaves only the live buckets' dedupe records, one usage record
//! per account-month block of 12 hours, a bill state per account-month and a position; and a
//! second worker with an empty state directory restores from it and
//! finishes the stream with the core's bills.

mod common;

use common::{config, fixture, run_live_until_done};
use gatebill::store::Store;
use gatebill::worker::{self, FaultPoint, Mode, RunOptions};
use rdkafka::message::Message;
use std::collections::BTreeMap;
use std::time::Duration;

/// A changelog record: (partition, key), and its value's length (`None`:
/// a tombstone).
type Record = ((i32, Vec<u8>), Option<usize>);

/// Every record of the changelog topic, in log order per partition.
fn changelog(cfg: &gatebill::config::Config) -> Vec<Record> {
    let (consumer, ends) = gatebill::inspect::open(&cfg.kafka, &cfg.kafka.changelog_topic).unwrap();
    let mut out = Vec::new();
    gatebill::kafka::read_to_end(&consumer, ends, Duration::from_secs(30), |m| {
        out.push(((m.partition(), m.key().unwrap_or_default().to_vec()), m.payload().map(<[u8]>::len)));
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap();
    out
}

/// Live keys by kind (the key's first byte), and records by kind.
fn kinds(records: &[Record]) -> (BTreeMap<u8, usize>, BTreeMap<u8, usize>) {
    let mut latest: BTreeMap<&(i32, Vec<u8>), Option<usize>> = BTreeMap::new();
    let mut written: BTreeMap<u8, usize> = BTreeMap::new();
    for (key, value) in records {
        latest.insert(key, *value);
        *written.entry(key.1[0]).or_default() += 1;
    }
    let mut live: BTreeMap<u8, usize> = BTreeMap::new();
    for (key, value) in latest {
        if value.is_some() {
            *live.entry(key.1[0]).or_default() += 1;
        }
    }
    (live, written)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_changelogs_live_content_follows_the_store_and_restores_a_worker_that_finishes_the_stream() {
    let mut f = fixture(31, 6_000, 4).await;
    f.cfg.kafka.partitions = 4;
    // Windows far shorter than the stream (45 days, about 1,500 messages
    // per partition): buckets expire all along.
    f.cfg.worker.dedupe_window_hours = 1;
    f.cfg.worker.dedupe_window_messages = 200;
    f.cfg.worker.batch_size = 250;
    let w1 = f.cfg.clone();
    let opts = RunOptions { mode: Mode::Live, fault: Some(FaultPoint::StopAfter(16)) };
    let s1 = worker::run(&w1.clone().checked().unwrap(), opts, std::future::pending()).await.unwrap();
    assert!(s1.messages > f.truth.messages / 2 && s1.messages < f.truth.messages, "W1 read {} of {}", s1.messages, f.truth.messages);

    // What W1's store holds: live buckets' records, account-month blocks.
    let store = Store::open(&w1.worker.state_dir).unwrap();
    let bucket_records: u32 = (0..4).flat_map(|p| store.dedupe_index(p).unwrap()).map(|(_, _, _, records)| records).sum();
    let mut account_blocks = 0;
    let mut scan = store.usage_scan();
    for a in gatebill::gen::accounts(40, 31).iter().map(|m| gatebill::billing::decode_account(&m.payload).unwrap().account_id) {
        for usage in scan.account_months(&a).unwrap().values() {
            let mut blocks: Vec<i32> = usage.hours().map(|h| gatebill::changelog::block_of(h.hour_start)).collect();
            blocks.dedup();
            account_blocks += blocks.len();
        }
    }
    let bill_states = store.bill_states().unwrap().len();
    let positions = (0..4).filter(|p| store.partition(&w1.kafka.input_topic, *p).unwrap().is_some()).count();
    drop(scan);
    drop(store);

    let (live, written) = kinds(&changelog(&w1));
    eprintln!(
        "changelog by kind: written {written:?}, live {live:?}; store: {bucket_records} bucket records, {account_blocks} account-month blocks"
    );
    assert_eq!(live.get(&b'e').copied().unwrap_or(0), bucket_records as usize, "live dedupe records are the live buckets' ({written:?})");
    assert!(
        written[&b'e'] >= 4 * bucket_records as usize,
        "the stream was to outlast the windows many times: {} dedupe records written, {bucket_records} live",
        written[&b'e']
    );
    assert_eq!(live[&b'k'], account_blocks, "one usage record per account-month block");
    assert_eq!(live[&b'b'], bill_states, "one bill state per account-month");
    assert_eq!(live[&b'o'], positions, "one position per partition read");
    assert!(!["u", "d", "h"].iter().any(|k| live.contains_key(&k.as_bytes()[0])), "no record of an older format: {live:?}");

    // W2: same group, empty state directory: restores and finishes.
    let mut w2 = config(&f.cluster, f.dir.path(), "second");
    w2.kafka.group_id = w1.kafka.group_id.clone();
    w2.kafka.partitions = 4;
    w2.worker.dedupe_window_hours = 1;
    w2.worker.dedupe_window_messages = 200;
    let s2 = run_live_until_done(&w2, &f.expected).await;
    assert_eq!(s2.reread, 0, "W2 read input below W1's position");
    assert_eq!(s1.messages + s2.messages, f.truth.messages, "every message read once");
    common::assert_exact_after_moves(&w2, &f.expected, &f.truth);
}
