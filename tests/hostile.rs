//! Hostile input through the whole worker: a stream mixing valid events with
//! invalid UTF-8, truncated JSON, deeply nested JSON, numbers beyond 2^64,
//! negative and fractional byte counts, ~900 KB strings, missing JSON keys,
//! null message keys, wrong types and dates out of range. Nothing panics;
//! each bad message reaches the dead-letter topic once with a reason code
//! and a detail a person can act on; the valid ones are billed.

mod common;

use common::{config, read_bills};
use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::Rules;
use gatebill::kafka;
use gatebill::store::OutboxRecord;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

fn valid(i: usize) -> String {
    format!(
        r#"{{"request_id":"ok-{i}","account_id":"acct-{}","region":"ap-guangzhou","time":"2021-05-0{}T10:00:00+08:00","client_network":"public","request_bytes":10,"response_bytes":{},"backend":{{"type":"mock"}}}}"#,
        i % 3,
        1 + i % 9,
        1000 + i
    )
}

/// A hostile message: key, payload, expected reason code.
type Hostile = (Option<Vec<u8>>, Vec<u8>, &'static str);

fn hostile() -> Vec<Hostile> {
    let k = |s: &str| Some(s.as_bytes().to_vec());
    let v = valid(999);
    vec![
        (k("acct-0"), vec![0xff, 0xfe, 0x00, b'{'], "malformed_json"),
        (k("acct-0"), v.as_bytes()[..v.len() / 3].to_vec(), "malformed_json"),
        (k("acct-0"), format!("{}1{}", "[".repeat(50_000), "]".repeat(50_000)).into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace(r#""request_bytes":10"#, r#""request_bytes":99999999999999999999999"#).into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace(r#""request_bytes":10"#, r#""request_bytes":-10"#).into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace(r#""request_bytes":10"#, r#""request_bytes":1.5"#).into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace("ap-guangzhou", &"x".repeat(900_000)).into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace(r#""region":"ap-guangzhou","#, "").into_bytes(), "missing_field"),
        (None, v.clone().into_bytes(), "key_mismatch"),
        (k("acct-0"), v.replace(r#""client_network":"public""#, r#""client_network":7"#).into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace("2021-05-01T10:00:00+08:00", "10000-01-01T00:00:00Z").into_bytes(), "invalid_value"),
        (k("acct-0"), v.replace(r#""2021-05-01T10:00:00+08:00""#, "-1").into_bytes(), "invalid_value"),
        (k("acct-0"), b"null".to_vec(), "invalid_value"),
        (k("acct-0"), Vec::new(), "malformed_json"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_dead_lettered_once_and_valid_ones_billed() {
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path(), "hostile");
    common::create_topics(&cluster, &cfg, 2, &[]);
    // Valid and hostile messages interleaved.
    let bad = hostile();
    let mut records = Vec::new();
    let mut good = Vec::new();
    for i in 0..300 {
        let p = valid(i);
        good.push(p.clone());
        let key = format!("acct-{}", i % 3);
        records.push((
            Vec::new(),
            OutboxRecord {
                topic: cfg.kafka.input_topic.clone(),
                key: Some(key.into_bytes()),
                payload: p.into_bytes(),
                headers: vec![],
                partition: None,
            },
        ));
        if let Some((key, payload, _)) = bad.get(i / 20) {
            if i % 20 == 7 {
                records.push((
                    Vec::new(),
                    OutboxRecord {
                        topic: cfg.kafka.input_topic.clone(),
                        key: key.clone(),
                        payload: payload.clone(),
                        headers: vec![("trace".into(), b"t1".to_vec())],
                        partition: None,
                    },
                ));
            }
        }
    }
    let producer = kafka::producer(&cfg.kafka).unwrap();
    assert_eq!(kafka::produce_all(&producer, &records).await.len(), records.len());

    let s = common::replay(&cfg).await;
    assert_eq!(s.billed, 300);
    assert_eq!(s.rejected, bad.len() as u64);

    // Dead letters: one per hostile message, with reason, detail, source and original headers.
    let (consumer, mut ends) = gatebill::inspect::open(&cfg.kafka, &cfg.kafka.dead_letter_topic).unwrap();
    let mut reasons: HashMap<Vec<u8>, String> = HashMap::new();
    while !ends.is_empty() {
        let Some(Ok(m)) = BaseConsumer::poll(&consumer, Duration::from_secs(10)) else { panic!("dead-letter topic ended early") };
        let h = m.headers().unwrap();
        let get = |name: &str| h.iter().find(|x| x.key == name).and_then(|x| x.value).map(|v| String::from_utf8_lossy(v).into_owned());
        let detail = get("gatebill.detail").unwrap();
        assert!(!detail.is_empty() && detail.len() < 400, "detail is short and present: {detail}");
        assert_eq!(get("trace").as_deref(), Some("t1"), "original headers kept");
        assert!(get("gatebill.source.offset").is_some());
        let prev = reasons.insert(m.payload().unwrap_or_default().to_vec(), get("gatebill.reason").unwrap());
        assert!(prev.is_none(), "a hostile message was dead-lettered twice");
        if ends.get(&m.partition()).is_some_and(|e| m.offset() + 1 >= *e) {
            ends.remove(&m.partition());
        }
    }
    assert_eq!(reasons.len(), bad.len());
    for (_, payload, reason) in &bad {
        assert_eq!(reasons.get(payload).map(String::as_str), Some(*reason), "payload starting {:?}", &payload[..payload.len().min(40)]);
    }

    // The valid messages are billed exactly as the core bills them.
    let rules = Rules::default();
    let expected = bills(&aggregate_messages(good.iter().map(|g| g.as_bytes()), &rules).ledger, &BTreeMap::new(), &rules);
    let table = read_bills(&cfg, &cfg.kafka.output_topic);
    assert_eq!(table.latest.len(), expected.len());
    for b in expected {
        assert_eq!(table.latest[&format!("{}/{}", b.content.account_id, b.content.month)].content_hash, b.content_hash);
    }
}
