//! Scaling during one stream (issue 11, "Done when" 2): one `gatebill run`
//! process, then three, then two after one of them is SIGKILLed, all in one
//! consumer group on the mock cluster, each with its own state directory.
//! Partitions move at every step and are restored from the changelog.

mod common;

use common::{committed, config, fixture_with, spawn_worker, stop_worker};
use gatebill::config::Config;
use gatebill::store::Store;
use std::time::{Duration, Instant};

/// Waits until the group committed at least `at_least` messages, with every
/// child still running.
async fn wait_committed(cfg: &Config, at_least: i64, children: &mut [&mut std::process::Child]) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while committed(cfg) < at_least {
        assert!(
            Instant::now() < deadline,
            "the workers committed {} of {at_least}; see the logs under {}",
            committed(cfg),
            cfg.worker.state_dir.parent().unwrap().display()
        );
        for c in children.iter_mut() {
            assert!(
                c.try_wait().unwrap().is_none(),
                "a worker exited; see the logs under {}",
                cfg.worker.state_dir.parent().unwrap().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_then_three_then_two_workers_with_a_kill_bill_exactly() {
    let mut f = fixture_with(41, 12_000, 6, 60, 1.0).await;
    let total = f.truth.messages as i64;
    let worker = |name: &str| {
        let mut c = config(&f.cluster, f.dir.path(), name);
        c.kafka.group_id = "gatebill-scaling".into();
        c.kafka.partitions = 6;
        // Small batches: the stream lasts long enough for the group to change.
        c.worker.batch_size = 40;
        c.worker.batch_wait_ms = 20;
        c
    };
    let (c1, c2, c3) = (worker("w1"), worker("w2"), worker("w3"));
    f.cfg = c1.clone();

    let mut w1 = spawn_worker(&c1, "info");
    wait_committed(&c1, total / 6, &mut [&mut w1]).await;
    let mut w2 = spawn_worker(&c2, "info");
    let mut w3 = spawn_worker(&c3, "info");
    wait_committed(&c1, total / 2, &mut [&mut w1, &mut w2, &mut w3]).await;
    w2.kill().unwrap(); // SIGKILL
    w2.wait().unwrap();
    let at_kill = committed(&c1);
    assert!(at_kill < total, "the stream was done ({at_kill} of {total}) before the kill: lengthen it");

    // The survivors take the killed worker's partitions over and finish.
    common::wait_for_closed_bills(&c1, &f.expected, Duration::from_secs(120)).await;
    assert!(stop_worker(&mut w1).success());
    assert!(stop_worker(&mut w3).success());

    common::assert_exact_after_moves(&c1, &f.expected, &f.truth);
    // Every worker billed part of the stream.
    for c in [&c1, &c2, &c3] {
        let store = Store::open(&c.worker.state_dir).unwrap();
        let read: i64 = (0..6).map(|p| store.partition(&c.kafka.input_topic, p).unwrap().map_or(0, |s| s.next_offset)).sum();
        assert!(read > 0, "{} processed nothing", c.worker.state_dir.display());
    }
}
