//! Transactions (issue 11, "Done when" 5 and 6) on librdkafka's mock
//! cluster: broker errors injected into the transaction protocol, and crash
//! points just before and just after a transaction commits, each followed
//! by a restart and by a move to a worker with an empty state directory.
//!
//! What the mock cluster cannot show (see RELIABILITY.md): it stores no
//! transactional offset commit, writes no commit or abort markers and
//! delivers the records of uncommitted transactions to `read_committed`
//! readers. These tests therefore assert the state (bills, counts, what was
//! read again), not the visibility of output records.

mod common;

use common::{assert_bills_match, config, fixture, read_bills, run_live_until_done};
use gatebill::store::Store;
use gatebill::worker::{self, FaultPoint, Mode, RunOptions, WorkerError};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

/// The input offsets stored for partitions 0..4.
fn stored(cfg: &gatebill::config::Config) -> Vec<i64> {
    let store = Store::open(&cfg.worker.state_dir).unwrap();
    (0..4).map(|p| store.partition(&cfg.kafka.input_topic, p).unwrap().map_or(0, |s| s.next_offset)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_transactional_offset_commit_aborts_and_rewinds_with_no_local_write() {
    let mut f = fixture(31, 2_000, 4).await;
    f.cfg.kafka.partitions = 4;
    // The group's generation moved on (as for a worker that lost its
    // partitions): the broker rejects the offsets of the first transaction.
    f.cluster.request_errors(RDKafkaApiKey::TxnOffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION]);
    let s = run_live_until_done(&f.cfg, &f.expected).await;
    assert_eq!(s.aborted, 1, "one transaction aborted");
    // The aborted batch was not written: read again, it is processed as new
    // (a local write would make it "already processed").
    assert_eq!(s.reread, 0);
    assert_eq!(s.messages, f.truth.messages);
    assert_eq!(s.billed, f.truth.unique_events);
    assert_eq!(s.duplicates, f.truth.duplicates);
    assert_bills_match(&read_bills(&f.cfg, &f.cfg.kafka.output_topic), &f.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retriable_errors_ending_a_transaction_are_retried() {
    let mut f = fixture(32, 2_000, 4).await;
    f.cfg.kafka.partitions = 4;
    f.cluster.request_errors(
        RDKafkaApiKey::EndTxn,
        &[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS,
        ],
    );
    let s = run_live_until_done(&f.cfg, &f.expected).await;
    assert_eq!(s.aborted, 0, "retried, not aborted");
    assert_eq!((s.messages, s.billed, s.duplicates, s.reread), (f.truth.messages, f.truth.unique_events, f.truth.duplicates, 0));
    assert_bills_match(&read_bills(&f.cfg, &f.cfg.kafka.output_topic), &f.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_producer_stops_cleanly_with_nothing_written() {
    let mut f = fixture(33, 1_000, 4).await;
    f.cfg.kafka.partitions = 4;
    // Another producer with this transactional.id bumped the epoch.
    f.cluster.request_errors(RDKafkaApiKey::EndTxn, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    let err = worker::run(&f.cfg.clone().checked().unwrap(), RunOptions { mode: Mode::Live, fault: None }, std::future::pending())
        .await
        .expect_err("a fenced worker stops");
    assert!(matches!(err, WorkerError::Transaction(gatebill::kafka::TxnError::Fenced(_))), "{err}");
    let message = err.to_string();
    assert!(message.contains("transactional.id") && message.contains("Restart it to rejoin"), "{message}");
    assert_eq!(stored(&f.cfg), vec![0, 0, 0, 0], "nothing of the fenced batch was written");
}

/// Runs a worker in `cfg` that crashes at `fault`, then finishes the stream
/// in `next` (the same state directory: a restart; another: a move) and
/// checks the bills and counts.
async fn crash_then_finish(seed: u64, fault: FaultPoint, moved: bool) {
    let mut f = fixture(seed, 2_000, 4).await;
    f.cfg.kafka.partitions = 4;
    let first = worker::run(&f.cfg.clone().checked().unwrap(), RunOptions { mode: Mode::Live, fault: Some(fault) }, std::future::pending())
        .await
        .unwrap();
    assert!(first.crashed, "{fault:?} was reached");
    let before = stored(&f.cfg);
    let next = if moved {
        let mut c = config(&f.cluster, f.dir.path(), "moved");
        c.kafka.group_id = f.cfg.kafka.group_id.clone();
        c.kafka.partitions = 4;
        c
    } else {
        f.cfg.clone()
    };
    // After a crash at a batch the first batch alone is stored; the second
    // (staged, its transaction committed or not) is not. At an emission
    // chunk every batch before it is stored (which may be all of them).
    let stored_sum = before.iter().sum::<i64>();
    assert!(stored_sum > 0, "{before:?}");
    if !matches!(fault, FaultPoint::BeforeBillsProduced(_)) {
        assert!(stored_sum < f.truth.messages as i64, "{before:?}");
    }
    let second = run_live_until_done(&next, &f.expected).await;
    assert_eq!(second.reread, 0, "nothing below a stored or restored position is read again");
    assert_eq!(first.messages + second.messages, f.truth.messages, "every message processed once");
    assert_eq!(first.billed + second.billed, f.truth.unique_events);
    assert_eq!(first.duplicates + second.duplicates, f.truth.duplicates);
    let table = read_bills(&next, &next.kafka.output_topic);
    assert_bills_match(&table, &f.expected);
    let calls: u64 = table.latest.values().map(|r| r.content.usage.calls).sum();
    assert_eq!(calls, f.truth.unique_events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_then_a_restart_is_exact() {
    crash_then_finish(34, FaultPoint::BeforeTxnCommit(2), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_before_the_commit_then_a_move_is_exact() {
    crash_then_finish(35, FaultPoint::BeforeTxnCommit(2), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_commit_then_a_restart_is_exact() {
    crash_then_finish(36, FaultPoint::AfterTxnCommit(2), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_the_commit_then_a_move_is_exact() {
    crash_then_finish(37, FaultPoint::AfterTxnCommit(2), true).await;
}

/// A writer dies in the middle of an emission: the chunk's bill states are
/// in the changelog (uncommitted, but the mock cluster shows them), its bills
/// are not on the output topic. The next owner must not take those states
/// as sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_an_emissions_changelog_and_its_bills_then_a_move_is_exact() {
    crash_then_finish(38, FaultPoint::BeforeBillsProduced(1), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_an_emissions_changelog_and_its_bills_then_a_restart_is_exact() {
    crash_then_finish(39, FaultPoint::BeforeBillsProduced(1), false).await;
}
