//! `replay --input-file`: the pipeline fed from an NDJSON archive (plain or
//! gzip) with its accounts file gives the pure core's bills, dead-letters
//! the malformed lines, and resumes after the last line on a second run; it
//! bills like a topic replay with the accounts topic; without account
//! records it refuses to run unless told `--no-accounts`.

mod common;

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{decode_account, BillRecord, Rules};
use gatebill::config::Config;
use gatebill::file_replay::{replay_file, Accounts, Sink};
use gatebill::gen::{self, GenSpec};
use std::collections::BTreeMap;

/// `replay --input-file` to an output file, with an accounts file, to the end.
async fn replay_to_file(
    cfg: &Config,
    input: &std::path::Path,
    accounts: &std::path::Path,
    out: &std::path::Path,
) -> gatebill::worker::RunSummary {
    let accounts = Accounts::File(accounts.to_path_buf());
    replay_file(&cfg.clone().checked().unwrap(), input, accounts, Sink::File(out.to_path_buf()), false, std::future::pending())
        .await
        .unwrap()
}

#[tokio::test]
async fn file_replay_equals_the_core_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let spec = GenSpec {
        events: 8_000,
        accounts: 60,
        skew: 1.0,
        start_ms: 1_603_123_200_000,
        days: 45,
        duplicates: 0.02,
        malformed: 0.01,
        seed: 5,
    };
    for name in ["events.ndjson", "events.ndjson.gz"] {
        let input = dir.path().join(name);
        let truth = gatebill::traffic::write_file(&input, &spec).unwrap();
        let accounts = gatebill::traffic::accounts_file_for(&input);
        gatebill::traffic::write_accounts_file(&accounts, &spec).unwrap();
        let mut cfg = Config::default();
        cfg.worker.state_dir = dir.path().join(format!("{name}.state"));
        cfg.worker.file_batch_size = 1_000;
        let out = dir.path().join(format!("{name}.bills"));
        let s = replay_to_file(&cfg, &input, &accounts, &out).await;
        assert_eq!((s.billed, s.duplicates, s.rejected), (truth.unique_events, truth.duplicates, truth.malformed));

        let rules = Rules::default();
        let mut msgs = Vec::new();
        gen::events(&spec, |m| msgs.push(m.payload));
        let table: BTreeMap<_, _> = gen::accounts(spec.accounts, spec.seed)
            .iter()
            .map(|m| decode_account(&m.payload).unwrap())
            .map(|a| (a.account_id.clone(), a))
            .collect();
        let expected = bills(&aggregate_messages(msgs.iter().map(Vec::as_slice), &rules).ledger, &table, &rules);
        let got: BTreeMap<String, String> = std::fs::read_to_string(&out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<BillRecord>(l).unwrap())
            .map(|r| (r.key(), r.content_hash))
            .collect();
        let want: BTreeMap<String, String> =
            expected.into_iter().map(|b| (format!("{}/{}", b.content.account_id, b.content.month), b.content_hash)).collect();
        assert_eq!(got, want);
        let dead = std::fs::read_to_string(format!("{}.dead-letters", out.display())).unwrap();
        assert_eq!(dead.lines().count() as u64, truth.malformed);

        // A second run over the same file and state resumes after the last line.
        let again = replay_to_file(&cfg, &input, &accounts, &out).await;
        assert_eq!((again.messages, again.billed, again.bills_emitted), (0, 0, 0));
    }
}

/// The bills of an NDJSON file, key -> content hash.
fn hashes(path: &std::path::Path) -> BTreeMap<String, String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<BillRecord>(l).unwrap())
        .map(|r| (r.key(), r.content_hash))
        .collect()
}

/// One generated history, as a topic with the accounts topic (the mock
/// cluster) and as files written by `gen --output-file`: a backfill with
/// the accounts file bills exactly as the topic replay; one without account
/// records differs (every account unknown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_with_its_accounts_file_bills_as_the_topic_replay_with_the_accounts_topic() {
    let f = common::fixture(9, 4_000, 4).await;
    let mut topic_cfg = f.cfg.clone();
    topic_cfg.kafka.partitions = 4;
    common::replay(&topic_cfg).await;
    let topic: BTreeMap<String, String> =
        common::read_bills(&topic_cfg, &topic_cfg.kafka.output_topic).latest.into_iter().map(|(k, r)| (k, r.content_hash)).collect();
    assert_eq!(topic.len(), f.expected.len());

    // The same history through the command line, as the README shows it.
    let dir = f.dir.path();
    let bin = env!("CARGO_BIN_EXE_gatebill");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(bin).args(args).env_remove("GATEBILL_BROKERS").env_remove("GATEBILL_CONFIG").output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let events = dir.join("history.ndjson.gz");
    let (ok, said) = run(&[
        "gen",
        "--events",
        "4000",
        "--accounts",
        "40",
        "--seed",
        "9",
        "--start",
        "2020-10-20T00:00:00+08:00",
        "--days",
        "45",
        "--duplicates",
        "0.02",
        "--malformed",
        "0.01",
        "--output-file",
        events.to_str().unwrap(),
    ]);
    assert!(ok, "{said}");
    let accounts = dir.join("history.accounts.ndjson.gz");
    assert!(said.contains(&format!("40 account records to {}", accounts.display())), "{said}");
    let state = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let bills = dir.join("backfill.ndjson");
    let (ok, said) = run(&[
        "replay",
        "--input-file",
        events.to_str().unwrap(),
        "--accounts-file",
        accounts.to_str().unwrap(),
        "--output-file",
        bills.to_str().unwrap(),
        "--state-dir",
        &state("s-file"),
    ]);
    assert!(ok, "{said}");
    assert_eq!(hashes(&bills), topic, "the backfill's bills differ from the topic replay's");

    // Without account records: refused, saying how to give them.
    let unknown = dir.join("unknown.ndjson");
    let (ok, said) = run(&[
        "replay",
        "--input-file",
        events.to_str().unwrap(),
        "--output-file",
        unknown.to_str().unwrap(),
        "--state-dir",
        &state("s-none"),
    ]);
    assert!(!ok && said.contains("--accounts-file") && said.contains("--no-accounts"), "{said}");
    assert!(!unknown.exists());
    // On purpose: every account unknown, so the bills differ.
    let (ok, said) = run(&[
        "replay",
        "--input-file",
        events.to_str().unwrap(),
        "--no-accounts",
        "--output-file",
        unknown.to_str().unwrap(),
        "--state-dir",
        &state("s-none"),
    ]);
    assert!(ok, "{said}");
    let unknown = hashes(&unknown);
    assert_eq!(unknown.len(), topic.len());
    assert!(unknown.iter().filter(|(k, h)| topic.get(*k) != Some(*h)).count() > 0, "bills without accounts equal those with them");

    // The accounts topic, empty: refused too, naming the topic.
    f.cluster.create_topic("no-accounts", 4, 1).unwrap();
    let mut empty = topic_cfg.clone();
    empty.kafka.accounts_topic = "no-accounts".into();
    empty.worker.state_dir = dir.join("s-empty");
    let err = replay_file(
        &empty.clone().checked().unwrap(),
        &events,
        Accounts::Topic,
        Sink::File(dir.join("empty.ndjson")),
        false,
        std::future::pending(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("the accounts topic no-accounts") && err.to_string().contains("--accounts-file"), "{err}");
}
