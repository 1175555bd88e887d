//! Micro benchmarks: decoding and classifying an event (full decoder and
//! fast path), aggregating a batch
//! into month usage, computing a bill, decoding stored months and computing
//! their bills as emission does, and the state store's batch write with and
//! without dedupe keys. `cargo bench --bench core`.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use gatebill::billing::reference::{aggregate_messages, decode_and_classify};
use gatebill::billing::scan::decode_billable;
use gatebill::billing::{compute_bills, Month, MonthUsage, Rules};
use gatebill::gen::{self, GenSpec};
use gatebill::metrics::Metrics;
use gatebill::pipeline::{InputMessage, Pipeline, Settings};
use gatebill::store::Store;
use std::collections::BTreeMap;
use std::sync::Arc;

fn events(n: u64, duplicates: f64) -> Vec<Vec<u8>> {
    let spec =
        GenSpec { events: n, accounts: 1_000, skew: 1.0, start_ms: 1_603_123_200_000, days: 30, duplicates, malformed: 0.0, seed: 1 };
    let mut out = Vec::new();
    gen::events(&spec, |m| out.push(m.payload));
    out
}

fn settings(dedupe: bool) -> Settings {
    Settings {
        input_topic: "events".into(),
        accounts_topic: "accounts".into(),
        output_topic: "bills".into(),
        dead_letter_topic: "dead".into(),
        alerts_topic: "alerts".into(),
        dedupe,
        dedupe_window_secs: 72 * 3600,
        dedupe_window_messages: 1_000_000,
        dedupe_memory_bytes: 64 << 20,
        max_future_ms: 3_600_000,
        grace_ms: 7_200_000,
        idle_after_ms: 300_000,
        require_keys: false,
        changelog_topic: None,
        provisional_interval_ms: 0,
        dead_letter_max_bytes: gatebill::pipeline::dead_letter::DEFAULT_MESSAGE_MAX_BYTES,
    }
}

fn bench(c: &mut Criterion) {
    let evs = events(10_000, 0.0);
    let rules = Rules::default();

    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_and_classify", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % evs.len();
            decode_and_classify(&evs[i]).unwrap()
        })
    });
    g.bench_function("decode_billable_fast_path", |b| {
        let mut i = 0;
        b.iter(|| {
            i = (i + 1) % evs.len();
            decode_billable(&evs[i]).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("aggregate");
    g.throughput(Throughput::Elements(evs.len() as u64));
    g.bench_function("batch_of_10000_into_month_usage", |b| b.iter(|| aggregate_messages(evs.iter().map(Vec::as_slice), &rules)));
    g.finish();

    let ledger = aggregate_messages(evs.iter().map(Vec::as_slice), &rules).ledger;
    let (account, months) = ledger.iter().next().unwrap();
    c.bench_function("compute_bill_of_the_busiest_account", |b| b.iter(|| compute_bills(account, None, months, &rules)));

    // What emission does per account: decode each stored month, compute the
    // bills. Over every account of the batch (most have a few events).
    type Stored<'a> = Vec<(&'a String, Vec<(Month, Vec<u8>)>)>;
    let stored: Stored<'_> = ledger.iter().map(|(a, months)| (a, months.iter().map(|(m, u)| (*m, u.encode())).collect())).collect();
    let bills: usize = stored.iter().map(|(_, m)| m.len()).sum();
    let mut g = c.benchmark_group("emit");
    g.throughput(Throughput::Elements(bills as u64));
    g.bench_function(format!("decode_and_compute_{bills}_bills"), |b| {
        b.iter(|| {
            let mut n = 0;
            for (account, months) in &stored {
                let months: BTreeMap<Month, MonthUsage> = months.iter().map(|(m, raw)| (*m, MonthUsage::decode(raw).unwrap())).collect();
                n += compute_bills(account, None, &months, &rules).len();
            }
            assert_eq!(n, bills);
        })
    });
    g.finish();

    for dedupe in [false, true] {
        let mut g = c.benchmark_group("store");
        g.throughput(Throughput::Elements(evs.len() as u64));
        g.sample_size(10);
        let name = if dedupe { "process_batch_of_10000_with_dedupe" } else { "process_batch_of_10000_without_dedupe" };
        g.bench_function(name, |b| {
            b.iter_batched(
                || {
                    let dir = tempfile::tempdir().unwrap();
                    let store = Arc::new(Store::open(dir.path()).unwrap());
                    (dir, Pipeline::new(store, Rules::default(), settings(dedupe), Metrics::new()).unwrap())
                },
                |(dir, mut p)| {
                    let msgs: Vec<InputMessage> = evs
                        .iter()
                        .enumerate()
                        .map(|(i, e)| InputMessage {
                            topic: "events",
                            partition: 0,
                            offset: i as i64,
                            key: None,
                            payload: Some(e),
                            headers: vec![],
                        })
                        .collect();
                    p.process(&msgs).unwrap();
                    (dir, p)
                },
                BatchSize::PerIteration,
            )
        });
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
