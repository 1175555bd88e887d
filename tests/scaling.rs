//! Scaling during one stream (issue 11, "Done when" 2): one `gatebill run`
//! process, then three, then two after one of them is SIGKILLed, all in one
//! consumer group on the mock cluster, each with its own state directory.
//! Partitions move at every step and are restored from the changelog.
//!
//! The default run is the short version (12,000 messages, 6 partitions).
//! The long version is `scripts/chaos.sh`; sizes come from
//! `GATEBILL_SCALING_EVENTS`, `GATEBILL_SCALING_PARTITIONS`,
//! `GATEBILL_SCALING_ACCOUNTS` and `GATEBILL_SCALING_BATCH`.

mod common;

use common::{committed, config, env_or, fixture_with, spawn_worker, stop_worker, wait_until};
use gatebill::store::Store;
use std::time::{Duration, Instant};

/// How long a step may take: 90 s, plus a second per 2,000 messages.
fn patience(total: i64) -> Duration {
    Duration::from_secs(90 + total as u64 / 2_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_then_three_then_two_workers_with_a_kill_bill_exactly() {
    let events = env_or("GATEBILL_SCALING_EVENTS", 12_000);
    let partitions = env_or("GATEBILL_SCALING_PARTITIONS", 6) as i32;
    let accounts = env_or("GATEBILL_SCALING_ACCOUNTS", 60);
    let batch = env_or("GATEBILL_SCALING_BATCH", 40) as usize;
    let started = Instant::now();
    let mut f = fixture_with(41, events, partitions, accounts, if accounts > 1_000 { 0.5 } else { 1.0 }).await;
    let total = f.truth.messages as i64;
    let worker = |name: &str| {
        let mut c = config(&f.cluster, f.dir.path(), name);
        c.kafka.group_id = "gatebill-scaling".into();
        c.kafka.partitions = partitions;
        // Small batches: the stream lasts long enough for the group to change.
        c.worker.batch_size = batch;
        c.worker.batch_wait_ms = 20;
        c
    };
    let (c1, c2, c3) = (worker("w1"), worker("w2"), worker("w3"));
    f.cfg = c1.clone();

    let mut w1 = spawn_worker(&c1, "info");
    wait_until("the workers commit a sixth", &c1, patience(total), || committed(&c1) >= total / 6, &mut [&mut w1]).await;
    let mut w2 = spawn_worker(&c2, "info");
    let mut w3 = spawn_worker(&c3, "info");
    wait_until("the workers commit half", &c1, patience(total), || committed(&c1) >= total / 2, &mut [&mut w1, &mut w2, &mut w3]).await;
    w2.kill().unwrap(); // SIGKILL
    w2.wait().unwrap();
    let at_kill = committed(&c1);
    assert!(at_kill < total, "the stream was done ({at_kill} of {total}) before the kill: lengthen it");

    // The survivors take the killed worker's partitions over and finish.
    common::wait_for_closed_bills(&c1, &f.expected, patience(total) + Duration::from_secs(30)).await;
    assert!(stop_worker(&mut w1).success());
    assert!(stop_worker(&mut w3).success());

    common::assert_exact_after_moves(&c1, &f.expected, &f.truth);
    // Every worker billed part of the stream.
    let mut positions = Vec::new();
    for c in [&c1, &c2, &c3] {
        let store = Store::open(&c.worker.state_dir).unwrap();
        let read: i64 = (0..partitions).map(|p| store.partition(&c.kafka.input_topic, p).unwrap().map_or(0, |s| s.next_offset)).sum();
        assert!(read > 0, "{} processed nothing", c.worker.state_dir.display());
        positions.push(read);
    }
    println!(
        "scaling: {total} messages ({} unique events, {} malformed), {partitions} partitions, {} bills; 1 -> 3 -> 2 workers, \
         one SIGKILLed at {at_kill} committed; summed stored positions per worker {positions:?}; {:.1} s",
        f.truth.unique_events,
        f.truth.malformed,
        f.expected.len(),
        started.elapsed().as_secs_f64()
    );
}
