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

/// Issue 25, point 6: a file replay's dead letters lost the original bytes
/// (a byte that is not UTF-8 became U+FFFD), and a line of JSON with a byte
/// that is not UTF-8 in a string was `invalid_value` where README says
/// `malformed_json`. Now the dead-letter file keeps the exact bytes (in
/// `payload_base64` when they are not UTF-8), and the reason is the one the
/// Kafka path gives.
#[tokio::test]
async fn file_dead_letters_keep_the_exact_bytes_and_the_kafka_paths_reason() {
    use gatebill::pipeline::{headers, InputMessage, Pipeline, Settings};
    let dir = tempfile::tempdir().unwrap();
    let event = |id: &str| {
        format!(
            r#"{{"request_id":"{id}","account_id":"acct-1","region":"ap-guangzhou","time":"2021-05-02T10:00:00+08:00","client_network":"public","request_bytes":10,"response_bytes":1001,"backend":{{"type":"mock"}}}}"#
        )
        .into_bytes()
    };
    let mut in_string = event("r2");
    let at = in_string.windows(9).position(|w| w == b"guangzhou").unwrap() + 4;
    in_string[at] = 0xff;
    let not_json = vec![0xff, 0xfe, 0x00, b'{'];
    let unfinished = "{\"région\": ".as_bytes().to_vec();
    let lines = [event("r1"), in_string.clone(), not_json.clone(), unfinished.clone()];
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, lines.join(&b'\n')).unwrap();
    let mut cfg = Config::default();
    cfg.worker.state_dir = dir.path().join("state");
    let out = dir.path().join("bills.ndjson");
    let s = replay_file(&cfg.clone().checked().unwrap(), &input, Accounts::None, Sink::File(out.clone()), false, std::future::pending())
        .await
        .unwrap();
    assert_eq!((s.billed, s.rejected), (1, 3));
    let bills: Vec<BillRecord> = std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(bills.len(), 1);
    assert_eq!((bills[0].key(), bills[0].content.usage.calls, bills[0].content.usage.public_out_bytes), ("acct-1/2021-05".into(), 1, 1001));

    let dead: Vec<serde_json::Value> = std::fs::read_to_string(format!("{}.dead-letters", out.display()))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let got: Vec<(String, String, Option<String>, Option<String>)> = dead
        .iter()
        .map(|d| {
            let h = |name: &str| d["headers"][name].as_str().unwrap().to_string();
            let text = |name: &str| d.get(name).map(|v| v.as_str().unwrap().to_string());
            (h("gatebill.source.offset"), h("gatebill.reason"), text("payload"), text("payload_base64"))
        })
        .collect();
    let b64 = gatebill::file_replay::base64;
    assert_eq!(b64(&not_json), "//4Aew==");
    assert_eq!(
        got,
        vec![
            ("1".into(), "malformed_json".into(), None, Some(b64(&in_string))),
            ("2".into(), "malformed_json".into(), None, Some("//4Aew==".into())),
            ("3".into(), "malformed_json".into(), Some("{\"région\": ".into()), None),
        ]
    );

    // The Kafka path (keys checked): the same reasons, the same bytes.
    let store = std::sync::Arc::new(gatebill::store::Store::open(&dir.path().join("kafka")).unwrap());
    let mut p = Pipeline::new(store, Rules::default(), Settings::from_config(&cfg), gatebill::metrics::Metrics::new()).unwrap();
    let msgs: Vec<InputMessage> = lines[1..]
        .iter()
        .enumerate()
        .map(|(i, l)| InputMessage {
            topic: "events",
            partition: 0,
            offset: i as i64,
            key: Some(b"acct-1"),
            payload: Some(l.as_slice()),
            headers: vec![],
        })
        .collect();
    assert_eq!(p.process(&msgs).unwrap().rejected, 3);
    let kafka: Vec<(String, Vec<u8>)> = p
        .outbox()
        .unwrap()
        .into_iter()
        .filter(|(_, r)| r.topic == cfg.kafka.dead_letter_topic)
        .map(|(_, r)| {
            let reason = r.headers.iter().find(|(k, _)| k == headers::REASON).unwrap().1.clone();
            (String::from_utf8(reason).unwrap(), r.payload)
        })
        .collect();
    assert_eq!(
        kafka,
        vec![("malformed_json".into(), in_string), ("malformed_json".into(), not_json), ("malformed_json".into(), unfinished)]
    );
}
