//! Hostile input that used to give wrong or unfinished bills (issue 25):
//! month totals past what a bill carries exactly, one request id with two
//! contents, and replays stopped before the end of their input.

mod common;

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{decode_account, BillRecord, Rules};
use gatebill::config::Config;
use gatebill::file_replay::{replay_file, Accounts, Sink};
use gatebill::kafka;
use gatebill::store::OutboxRecord;
use gatebill::worker::{self, FaultPoint, Mode, RunOptions};
use rust_decimal::Decimal;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// 2^53 - 1: the largest byte count an event may carry, and the largest
/// month total a bill carries.
const MAX: u64 = 9_007_199_254_740_991;

fn event(id: &str, time: &str, response_bytes: u64) -> String {
    format!(
        r#"{{"request_id":"{id}","account_id":"acct-1","region":"ap-guangzhou","time":"{time}","client_network":"public","request_bytes":10,"response_bytes":{response_bytes},"backend":{{"type":"mock"}}}}"#
    )
}

/// The issue's input: 2,049 events of 2^53 - 1 bytes in one hour, one of
/// 10,000 bytes an hour later.
fn overflowing() -> Vec<String> {
    let mut v: Vec<String> = (0..2049).map(|i| event(&format!("big-{i}"), "2021-05-03T10:00:00+08:00", MAX)).collect();
    v.push(event("small", "2021-05-03T11:00:00+08:00", 10_000));
    v
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn file_bills(out: &Path) -> BTreeMap<String, BillRecord> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<BillRecord>(l).unwrap())
        .map(|r| (r.key(), r))
        .collect()
}

/// A file replay's dead letters: (reason, detail, payload).
fn file_dead_letters(out: &Path) -> Vec<(String, String, String)> {
    std::fs::read_to_string(format!("{}.dead-letters", out.display()))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|v| {
            let h = |k: &str| v["headers"][k].as_str().unwrap_or_default().to_string();
            (h("gatebill.reason"), h("gatebill.detail"), v["payload"].as_str().unwrap_or_default().to_string())
        })
        .collect()
}

fn file_config(dir: &Path, name: &str) -> Config {
    let mut cfg = Config::default();
    cfg.worker.state_dir = dir.join(format!("{name}.state"));
    cfg
}

#[tokio::test]
async fn a_month_total_past_2_pow_53_dead_letters_the_event_and_the_bill_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("big.ndjson");
    let lines = overflowing();
    write_lines(&input, &lines);
    let out = dir.path().join("big.bills");
    let cfg = file_config(dir.path(), "big").checked().unwrap();
    let s = replay_file(&cfg, &input, Accounts::None, Sink::File(out.clone()), false, std::future::pending()).await.unwrap();
    assert_eq!((s.billed, s.rejected, s.duplicates, s.bills_emitted), (1, 2049, 0, 1));
    let bill = &file_bills(&out)["acct-1/2021-05"];
    assert_eq!((bill.content.usage.calls, bill.content.usage.public_out_bytes), (1, MAX));
    assert_eq!(bill.content.chargeable.public_out_bytes, MAX);
    // The bill is the core's for the first event alone.
    let rules = Rules::default();
    let expected = bills(&aggregate_messages([lines[0].as_bytes()], &rules).ledger, &BTreeMap::new(), &rules);
    assert_eq!(bill.content_hash, expected[0].content_hash);
    assert_eq!(bill.content.total_amount, expected[0].content.total_amount);
    assert!(bill.content.total_amount > Decimal::from(1_000_000), "{}", bill.content.total_amount);
    let dead = file_dead_letters(&out);
    assert_eq!(dead.len(), 2049);
    for (reason, detail, _) in &dead {
        assert_eq!(reason, "invalid_value");
        assert!(detail.starts_with("usage overflow: "), "{detail}");
    }
    assert_eq!(dead[2048].2, lines[2049], "the 10,000-byte event an hour later is refused too");

    // A pack larger than any usage deducts the usage, no more.
    let accounts = dir.path().join("accounts.ndjson");
    let record = r#"{"account_id":"acct-1","activated_at":"2015-01-01T00:00:00+08:00","resource_packs":[{"id":"huge","item":"public_out_bytes","quantity":18446744073709551615,"valid_from":"2021-01-01T00:00:00+08:00","valid_until":"2022-01-01T00:00:00+08:00"}]}"#;
    std::fs::write(&accounts, format!("{record}\n")).unwrap();
    let out = dir.path().join("pack.bills");
    let cfg = file_config(dir.path(), "pack").checked().unwrap();
    let s = replay_file(&cfg, &input, Accounts::File(accounts), Sink::File(out.clone()), false, std::future::pending()).await.unwrap();
    assert_eq!((s.billed, s.rejected), (1, 2049));
    let bill = &file_bills(&out)["acct-1/2021-05"];
    let deducted: u64 = bill.content.deductions.iter().filter(|d| d.item.as_str() == "public_out_bytes").map(|d| d.quantity).sum();
    assert_eq!((bill.content.usage.public_out_bytes, deducted, bill.content.chargeable.public_out_bytes), (MAX, MAX, 0));
    let account = decode_account(record.as_bytes()).unwrap();
    let expected =
        bills(&aggregate_messages([lines[0].as_bytes()], &rules).ledger, &BTreeMap::from([("acct-1".to_string(), account)]), &rules);
    assert_eq!(bill.content_hash, expected[0].content_hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_replay_dead_letters_the_overflow_as_the_file_replay_does() {
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = common::config(&cluster, dir.path(), "overflow");
    common::create_topics(&cluster, &cfg, 2, &[]);
    let lines = overflowing();
    let records: Vec<(Vec<u8>, OutboxRecord)> = lines
        .iter()
        .map(|l| {
            let r = OutboxRecord {
                topic: cfg.kafka.input_topic.clone(),
                key: Some(b"acct-1".to_vec()),
                payload: l.clone().into_bytes(),
                headers: vec![],
                partition: None,
            };
            (Vec::new(), r)
        })
        .collect();
    let producer = kafka::producer(&cfg.kafka).unwrap();
    assert_eq!(kafka::produce_all(&producer, &records).await.len(), records.len());
    let s = common::replay(&cfg).await;
    assert_eq!((s.messages, s.billed, s.rejected), (2050, 1, 2049));
    let table = common::read_bills(&cfg, &cfg.kafka.output_topic);
    let rules = Rules::default();
    let expected = bills(&aggregate_messages([lines[0].as_bytes()], &rules).ledger, &BTreeMap::new(), &rules);
    assert_eq!(table.latest["acct-1/2021-05"].content_hash, expected[0].content_hash);
    let dead = common::read_dead_letters(&cfg);
    assert_eq!(dead.len(), 2049);
    assert!(dead.iter().all(|(reason, _, _)| reason == "invalid_value"), "{:?}", &dead[..3]);
}

#[tokio::test]
async fn one_request_id_with_two_contents_bills_the_first_copy_and_dead_letters_the_second_in_either_order() {
    let dir = tempfile::tempdir().unwrap();
    let a = event("same-id", "2021-05-03T10:00:00+08:00", 100);
    let b = event("same-id", "2021-05-03T10:00:00+08:00", 5 << 30);
    // (order, the copy counted, the copy dead-lettered, public bytes, total)
    for (name, order, dead_copy, public, total) in [("ab", [&a, &b], &b, 100, "0.00"), ("ba", [&b, &a], &a, 5u64 << 30, "4.00")] {
        let input = dir.path().join(format!("{name}.ndjson"));
        // A true repeat of the first copy after both: a duplicate, not a conflict.
        write_lines(&input, &[order[0].clone(), order[1].clone(), order[0].clone()]);
        let out = dir.path().join(format!("{name}.bills"));
        let cfg = file_config(dir.path(), name).checked().unwrap();
        let s = replay_file(&cfg, &input, Accounts::None, Sink::File(out.clone()), false, std::future::pending()).await.unwrap();
        assert_eq!((s.billed, s.duplicates, s.rejected), (1, 1, 1), "{name}");
        let bill = &file_bills(&out)["acct-1/2021-05"];
        assert_eq!((bill.content.usage.calls, bill.content.usage.public_out_bytes), (1, public), "{name}");
        assert_eq!(bill.content.total_amount, Decimal::from_str(total).unwrap(), "{name}");
        let dead = file_dead_letters(&out);
        assert_eq!(dead.len(), 1, "{name}");
        assert_eq!(dead[0].0, "conflicting_duplicate");
        assert!(dead[0].1.contains(r#"request_id "same-id""#), "{}", dead[0].1);
        assert_eq!(&dead[0].2, dead_copy);
    }
}

/// Generated history with its accounts file; the core's bills by key.
fn history(dir: &Path, events: u64) -> (PathBuf, PathBuf, gatebill::gen::GenTruth, BTreeMap<String, String>) {
    let spec = gatebill::gen::GenSpec {
        events,
        accounts: 40,
        skew: 1.0,
        start_ms: 1_603_123_200_000,
        days: 45,
        duplicates: 0.02,
        malformed: 0.01,
        seed: 11,
    };
    let input = dir.join("events.ndjson");
    let truth = gatebill::traffic::write_file(&input, &spec).unwrap();
    let accounts = gatebill::traffic::accounts_file_for(&input);
    gatebill::traffic::write_accounts_file(&accounts, &spec).unwrap();
    let rules = Rules::default();
    let mut msgs = Vec::new();
    gatebill::gen::events(&spec, |m| msgs.push(m.payload));
    let table: BTreeMap<_, _> = gatebill::gen::accounts(spec.accounts, spec.seed)
        .iter()
        .map(|m| decode_account(&m.payload).unwrap())
        .map(|a| (a.account_id.clone(), a))
        .collect();
    let expected = bills(&aggregate_messages(msgs.iter().map(Vec::as_slice), &rules).ledger, &table, &rules)
        .into_iter()
        .map(|b| (format!("{}/{}", b.content.account_id, b.content.month), b.content_hash))
        .collect();
    (input, accounts, truth, expected)
}

#[tokio::test]
async fn an_interrupted_file_replay_emits_no_bill_and_resumes_under_another_path() {
    let dir = tempfile::tempdir().unwrap();
    let (input, accounts, truth, expected) = history(dir.path(), 6_000);
    let lines = truth.unique_events + truth.duplicates + truth.malformed;
    let mut cfg = file_config(dir.path(), "stop");
    cfg.worker.file_batch_size = 1_000;
    let cfg = cfg.checked().unwrap();
    let out = dir.path().join("stop.bills");
    // Stopped at once: the first chunk of 1,000 lines is written, nothing billed.
    let first =
        replay_file(&cfg, &input, Accounts::File(accounts.clone()), Sink::File(out.clone()), false, std::future::ready(())).await.unwrap();
    assert!(first.interrupted);
    assert_eq!((first.messages, first.bills_emitted), (1_000, 0));
    assert_eq!(file_bills(&out).len(), 0);
    // The same content under another path resumes after those lines.
    let moved = dir.path().join("moved.ndjson");
    std::fs::rename(&input, &moved).unwrap();
    let second =
        replay_file(&cfg, &moved, Accounts::File(accounts.clone()), Sink::File(out.clone()), false, std::future::pending()).await.unwrap();
    assert!(!second.interrupted);
    assert_eq!(first.messages + second.messages, lines);
    assert_eq!(first.duplicates + second.duplicates, truth.duplicates);
    assert_eq!(file_dead_letters(&out).len() as u64, truth.malformed, "no dead letter written twice");
    let got: BTreeMap<String, String> = file_bills(&out).into_iter().map(|(k, r)| (k, r.content_hash)).collect();
    assert_eq!(got, expected);
    assert!(file_bills(&out).values().all(|r| r.revision == 1));
    // Other content at the path replayed first is refused, naming what to do.
    std::fs::write(&input, format!("{}\n", event("other", "2021-05-03T10:00:00+08:00", 1))).unwrap();
    let err = replay_file(&cfg, &input, Accounts::File(accounts), Sink::File(out), false, std::future::pending()).await.unwrap_err();
    assert!(err.to_string().contains("was replayed into this state directory before with other content"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_topic_replay_emits_no_bill_and_the_next_run_emits_each_once() {
    let f = common::fixture(21, 4_000, 2).await;
    let replay = |fault| RunOptions { mode: Mode::Replay { from_ms: None, progress: false }, fault };
    // Stopped cleanly after its first batch, as by SIGTERM.
    let first =
        worker::run(&f.cfg.clone().checked().unwrap(), replay(Some(FaultPoint::StopAfter(1))), std::future::pending()).await.unwrap();
    assert!(first.interrupted);
    assert_eq!((first.batches, first.bills_emitted), (1, 0));
    assert!(first.messages > 0 && first.messages < 4_000, "{}", first.messages);
    let second = worker::run(&f.cfg.clone().checked().unwrap(), replay(None), std::future::pending()).await.unwrap();
    assert!(!second.interrupted);
    assert_eq!(second.bills_emitted as usize, f.expected.len());
    let table = common::read_bills(&f.cfg, &f.cfg.kafka.output_topic);
    common::assert_bills_match(&table, &f.expected);
    assert!(table.latest.values().all(|r| r.revision == 1), "no bill restated");
}

#[test]
fn sigterm_during_a_file_replay_stops_it_cleanly_with_a_message_and_no_bill() {
    let dir = tempfile::tempdir().unwrap();
    let (input, accounts, truth, expected) = history(dir.path(), 300_000);
    let lines = truth.unique_events + truth.duplicates + truth.malformed;
    let (state, out, config) = (dir.path().join("state"), dir.path().join("bills.ndjson"), dir.path().join("gatebill.toml"));
    std::fs::write(&config, "[worker]\nfile_batch_size = 5000\n").unwrap();
    let replay = |input: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_gatebill"))
            .arg("replay")
            .arg("--input-file")
            .arg(input)
            .arg("--accounts-file")
            .arg(&accounts)
            .arg("--output-file")
            .arg(&out)
            .arg("--state-dir")
            .arg(&state)
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let child = replay(&input);
    // Stopped 200 ms after it opened its state directory.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !state.join("CURRENT").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(200));
    common::signal(&child, "TERM");
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    let stdout = String::from_utf8_lossy(&stopped.stdout);
    assert_eq!(stopped.status.code(), Some(1), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("replay interrupted before the end of its input"), "{stderr}");
    assert!(stdout.contains(", 0 bill records emitted"), "{stdout}");
    assert_eq!(file_bills(&out).len(), 0);
    let read: u64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(read < lines, "stopped before the end: {read} of {lines}");
    // Resumed under another path: the rest, each bill once.
    let moved = dir.path().join("moved.ndjson");
    std::fs::rename(&input, &moved).unwrap();
    let done = replay(&moved).wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&done.stdout);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let rest: u64 = stdout.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(read + rest, lines, "{stdout}");
    let got: BTreeMap<String, String> = file_bills(&out).into_iter().map(|(k, r)| (k, r.content_hash)).collect();
    assert_eq!(got, expected);
    assert_eq!(file_dead_letters(&out).len() as u64, truth.malformed);
}
