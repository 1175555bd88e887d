//! Broker faults, injected with the mock cluster: request errors on Produce,
//! Fetch and OffsetCommit, round-trip delays, and a broker outage longer than
//! the producer's delivery timeout. The worker keeps running, retries what it
//! must, and ends with exactly the pure core's bills; no outbox record is lost.

mod common;

use common::{
    assert_bills_match, assert_dead_letters_once, assert_no_repeated_bills, fixture, read_bills, read_dead_letters, wait_for_closed_bills,
    Fixture,
};
use gatebill::worker::{self, Mode, RunOptions, RunSummary};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::time::Duration;

/// Runs the live worker while `during` injects faults, until every bill is final.
async fn run_with<F, Fut>(f: &Fixture, during: F) -> RunSummary
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = f.cfg.clone();
    let handle = tokio::spawn(async move {
        worker::run(&cfg.clone().checked().unwrap(), RunOptions { mode: Mode::Live, fault: None }, async move {
            let _ = rx.await;
        })
        .await
    });
    during().await;
    wait_for_closed_bills(&f.cfg, &f.expected, Duration::from_secs(120)).await;
    tx.send(()).unwrap();
    handle.await.unwrap().expect("the worker survives broker faults")
}

fn check(f: &Fixture, s: &RunSummary) {
    eprintln!("faults: {s:?}");
    assert_eq!(s.billed, f.truth.unique_events);
    let table = read_bills(&f.cfg, &f.cfg.kafka.output_topic);
    assert_bills_match(&table, &f.expected);
    assert_no_repeated_bills(&table);
    assert_dead_letters_once(&read_dead_letters(&f.cfg), f.truth.malformed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_errors_on_produce_fetch_and_commit_are_retried() {
    let f = fixture(21, 3_000, 4).await;
    let s = run_with(&f, || async {
        let retriable = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 10];
        f.cluster.request_errors(RDKafkaApiKey::Produce, &retriable);
        f.cluster.request_errors(RDKafkaApiKey::Fetch, &retriable);
        f.cluster.request_errors(RDKafkaApiKey::OffsetCommit, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT; 10]);
    })
    .await;
    check(&f, &s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_broker_round_trips() {
    let f = fixture(22, 3_000, 4).await;
    let s = run_with(&f, || async {
        f.cluster.broker_round_trip_time(1, Duration::from_millis(150)).unwrap();
    })
    .await;
    check(&f, &s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_stay_in_the_outbox_until_delivered() {
    let mut f = fixture(24, 3_000, 4).await;
    // The outbox path (kafka.transactions = false).
    f.cfg.kafka.transactions = false;
    // Permanent (non-retriable) produce errors: the records fail delivery.
    f.cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 40]);
    let s = run_with(&f, || async {}).await;
    assert!(s.delivery_failures > 0, "the injected errors failed some deliveries: {s:?}");
    check(&f, &s);
}

/// The same errors with transactions: a transaction with a failed record
/// aborts, its batch is forgotten and read again. (The mock cluster shows
/// the records of aborted transactions, so dead letters and bill repeats
/// are not counted here; see tests/transactions.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_deliveries_in_a_transaction_abort_it_and_the_batch_is_read_again() {
    let f = fixture(25, 3_000, 4).await;
    assert!(f.cfg.kafka.transactions);
    f.cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 40]);
    let s = run_with(&f, || async {}).await;
    assert!(s.aborted > 0, "the injected errors aborted some transactions: {s:?}");
    assert_eq!((s.billed, s.duplicates, s.reread), (f.truth.unique_events, f.truth.duplicates, 0));
    assert_bills_match(&read_bills(&f.cfg, &f.cfg.kafka.output_topic), &f.expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_longer_than_the_delivery_timeout_loses_no_outbox_record() {
    let mut f = fixture(23, 3_000, 4).await;
    f.cfg.kafka.properties.insert("message.timeout.ms".into(), "1500".into());
    let s = run_with(&f, || async {
        // Let the worker consume and start producing, then take the broker away
        // for three delivery timeouts.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        f.cluster.broker_down(1).unwrap();
        tokio::time::sleep(Duration::from_millis(4500)).await;
        f.cluster.broker_up(1).unwrap();
    })
    .await;
    check(&f, &s);
}
