//! Crash equivalence: the worker runs as a child process (`gatebill run`) and
//! is SIGKILLed at random moments, restarted each time, then left to finish.
//! The final bills must equal the pure core's bills for the same messages
//! (the same `content_hash` per key as an uninterrupted run), the summed
//! usage must equal the generator's ground truth (nothing lost, nothing
//! counted twice), and every malformed message must be on the dead-letter
//! topic.
//!
//! The default run is the short version (20,000 messages, 4 kills). The long
//! version is `scripts/chaos.sh` (1,000,000 messages, 20 kills); sizes come
//! from `GATEBILL_CHAOS_EVENTS`, `GATEBILL_CHAOS_KILLS`,
//! `GATEBILL_CHAOS_PARTITIONS`, `GATEBILL_CHAOS_ACCOUNTS`, `GATEBILL_CHAOS_SKEW`,
//! `GATEBILL_CHAOS_BATCH`, `GATEBILL_CHAOS_EMIT_MS` and `GATEBILL_CHAOS_SEED`.

mod common;

use common::{assert_bills_match, env_or, fixture_with, read_bills, read_dead_letters, wait_for_closed_bills};
use rand::{Rng, SeedableRng};
use rdkafka::consumer::Consumer;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::HashSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn spawn_worker(config: &std::path::Path, log: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    Command::new(env!("CARGO_BIN_EXE_gatebill"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

/// (messages committed by the group, messages in the topic).
fn progress(cfg: &gatebill::config::Config, partitions: i32) -> (i64, i64) {
    let c = gatebill::kafka::plain_consumer(&cfg.kafka, &cfg.kafka.group_id).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(&cfg.kafka.input_topic, p);
    }
    let Ok(committed) = c.committed_offsets(tpl, Duration::from_secs(5)) else { return (0, i64::MAX) };
    let mut done = 0;
    let mut total = 0;
    for p in 0..partitions {
        let (_, high) = c.fetch_watermarks(&cfg.kafka.input_topic, p, Duration::from_secs(5)).unwrap();
        total += high;
        if let Some(Offset::Offset(o)) = committed.find_partition(&cfg.kafka.input_topic, p).map(|e| e.offset()) {
            done += o.min(high);
        }
    }
    (done, total)
}

/// Whether the group's committed offsets reached the end of every partition.
fn consumed(cfg: &gatebill::config::Config, partitions: i32) -> bool {
    let (done, total) = progress(cfg, partitions);
    done >= total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_doubles_nothing() {
    let events = env_or("GATEBILL_CHAOS_EVENTS", 20_000);
    let kills = env_or("GATEBILL_CHAOS_KILLS", 4);
    let partitions = env_or("GATEBILL_CHAOS_PARTITIONS", 8) as i32;
    let seed = env_or("GATEBILL_CHAOS_SEED", 7);
    let started = Instant::now();
    let accounts = env_or("GATEBILL_CHAOS_ACCOUNTS", 40);
    let skew = std::env::var("GATEBILL_CHAOS_SKEW").ok().and_then(|v| v.parse().ok()).unwrap_or(1.0);
    let mut f = fixture_with(seed, events, partitions, accounts, skew).await;
    f.cfg.worker.batch_size = env_or("GATEBILL_CHAOS_BATCH", 500) as usize;
    f.cfg.worker.emit_interval_ms = env_or("GATEBILL_CHAOS_EMIT_MS", 500);
    let config_path = f.dir.path().join("gatebill.toml");
    std::fs::write(&config_path, toml::to_string(&f.cfg).unwrap()).unwrap();
    let log = f.dir.path().join("worker.log");
    eprintln!("chaos: {events} messages in {partitions} partitions generated in {:.1?}", started.elapsed());

    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
    let mut survived = 0;
    for _ in 0..kills {
        let mut child = spawn_worker(&config_path, &log);
        // Wait until this worker makes progress (a restarted member first
        // waits for the killed one's session to expire), then kill it at a
        // random moment inside its processing.
        let (before, total) = progress(&f.cfg, partitions);
        let wait_until = Instant::now() + Duration::from_secs(30);
        while progress(&f.cfg, partitions).0 == before && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..400))).await;
        assert!(child.try_wait().unwrap().is_none(), "worker exited on its own; see {}", log.display());
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        survived += 1;
        let (after, _) = progress(&f.cfg, partitions);
        eprintln!("chaos: SIGKILL {survived}: {after} of {total} messages committed (was {before})");
        if after >= total {
            break;
        }
    }
    eprintln!("chaos: {survived} SIGKILLs survived after {:.1?}", started.elapsed());
    let mut child = spawn_worker(&config_path, &log);
    let deadline = Instant::now() + Duration::from_secs(60 + events / 2_000);
    while !consumed(&f.cfg, partitions) {
        assert!(Instant::now() < deadline, "input not consumed in time; see {}", log.display());
        assert!(child.try_wait().unwrap().is_none(), "worker exited on its own; see {}", log.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_for_closed_bills(&f.cfg, &f.expected, Duration::from_secs(120)).await;
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "SIGTERM must exit 0, got {status}");

    let table = read_bills(&f.cfg, &f.cfg.kafka.output_topic);
    assert_bills_match(&table, &f.expected);
    let calls: u64 = table.latest.values().map(|r| r.content.usage.calls).sum();
    assert_eq!(calls, f.truth.unique_events, "events lost or counted twice");
    let dead = read_dead_letters(&f.cfg);
    // Every record is read and counted; output is at least once under
    // SIGKILL (a kill between the broker's acknowledgement and the outbox
    // delete sends a record again, with the same source headers), so the
    // check is that every source is present, and the count is reported.
    let unique: HashSet<_> = dead.iter().map(|(_, p, o)| (p.clone(), o.clone())).collect();
    assert_eq!(unique.len() as u64, f.truth.malformed, "every malformed message on the dead-letter topic");
    eprintln!(
        "chaos: {} SIGKILLs, {} messages, {} unique events billed, {} duplicates dropped, {} malformed -> {} dead letters ({} distinct sources), {} bills equal to the core's, {:.1?}",
        survived,
        events,
        calls,
        f.truth.duplicates,
        f.truth.malformed,
        dead.len(),
        unique.len(),
        table.latest.len(),
        started.elapsed()
    );
}
