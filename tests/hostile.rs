//! Hostile input through the whole worker: a stream mixing valid events with
//! invalid UTF-8, truncated JSON, deeply nested JSON, numbers beyond 2^64,
//! negative and fractional byte counts, ~900 KB strings, missing JSON keys,
//! null message keys, wrong types and dates out of range. Nothing panics;
//! each bad message reaches the dead-letter topic once with a reason code
//! and a detail a person can act on; the valid ones are billed. Then issue
//! 25's dead-letter points: a message too large to dead-letter whole, input
//! headers named like gatebill's, a tombstone on the input topic, and the
//! dead letters of account records while the worker runs.

mod common;

use common::{config, read_bills};
use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::Rules;
use gatebill::kafka;
use gatebill::store::OutboxRecord;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use sha2::Digest;
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

/// `event` with a byte of its region replaced by 0xff (not UTF-8).
fn not_utf8_in_a_string(event: &str) -> Vec<u8> {
    let mut b = event.as_bytes().to_vec();
    let at = event.find("guangzhou").unwrap() + 4;
    assert_eq!(b[at], b'g');
    b[at] = 0xff;
    b
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
        // Not UTF-8 inside a string of otherwise valid JSON: as bytes that are not JSON at all.
        (k("acct-0"), not_utf8_in_a_string(&v), "malformed_json"),
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

/// A dead letter as read back: key, value, headers in order.
type Letter = (Option<Vec<u8>>, Vec<u8>, Vec<(String, Vec<u8>)>);

/// Every dead letter on the topic, in order (one partition).
fn dead_letters(cfg: &gatebill::config::Config) -> Vec<Letter> {
    let (consumer, ends) = gatebill::inspect::open(&cfg.kafka, &cfg.kafka.dead_letter_topic).unwrap();
    let mut out = Vec::new();
    kafka::read_to_end(&consumer, ends, Duration::from_secs(30), |m| {
        out.push((m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default().to_vec(), kafka::owned_headers(m.headers())));
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap();
    out
}

/// The values of the headers named `name`, in order.
fn headers_named<'l>(letter: &'l Letter, name: &str) -> Vec<&'l str> {
    letter.2.iter().filter(|(k, _)| k == name).map(|(_, v)| std::str::from_utf8(v).unwrap()).collect()
}

/// A message to send: key, value, headers.
type Sent<'k> = (&'k str, Vec<u8>, Vec<(String, Vec<u8>)>);

/// Writes `records` to the input topic of `cfg`.
async fn send(cfg: &gatebill::config::Config, records: Vec<Sent<'_>>) {
    send_to(cfg, &cfg.kafka.input_topic, records).await
}

/// Writes `records` to `topic`.
async fn send_to(cfg: &gatebill::config::Config, topic: &str, records: Vec<Sent<'_>>) {
    let records: Vec<(Vec<u8>, OutboxRecord)> = records
        .into_iter()
        .map(|(key, payload, headers)| {
            let r = OutboxRecord { topic: topic.to_string(), key: Some(key.into()), payload, headers, partition: None };
            (Vec::new(), r)
        })
        .collect();
    let producer = kafka::producer(&cfg.kafka).unwrap();
    assert_eq!(kafka::produce_all(&producer, &records).await.len(), records.len());
}

/// The one bill of `valid(1)` (acct-1, May 2021, 1,001 public bytes and one
/// call, account unknown), read from the output topic.
fn assert_only_valid_1_billed(cfg: &gatebill::config::Config) {
    let table = read_bills(cfg, &cfg.kafka.output_topic);
    assert_eq!(table.latest.keys().collect::<Vec<_>>(), ["acct-1/2021-05"]);
    let bill = &table.latest["acct-1/2021-05"].content;
    assert_eq!((bill.usage.calls, bill.usage.public_out_bytes, bill.usage.inbound_bytes), (1, 1001, 10));
    let rules = Rules::default();
    let expected = bills(&aggregate_messages([valid(1).as_bytes()], &rules).ledger, &BTreeMap::new(), &rules);
    assert_eq!(bill, &expected[0].content);
}

/// Issue 25, point 2: a message of 1,100,000 bytes (the sender's and the
/// broker's limits allow it) makes a dead letter over the worker producer's
/// `message.max.bytes` (1,000,000). It used to abort its transaction, and
/// the batch was read again forever: the valid event after it was never
/// billed. Now the dead letter keeps what fits and says so.
///
/// The same without transactions (the dead letter stayed in the outbox, a
/// warning every 4 s), and with the worker's `message.max.bytes` raised in
/// `[kafka.properties]`: then the dead letter is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_too_large_to_dead_letter_whole_is_cut_and_its_partition_goes_on() {
    for (transactions, worker_limit) in [(true, None), (false, None), (true, Some("2000000"))] {
        eprintln!("transactions = {transactions}, message.max.bytes = {worker_limit:?}");
        let cluster = MockCluster::new(1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(&cluster, dir.path(), "large");
        cfg.kafka.transactions = transactions;
        if let Some(limit) = worker_limit {
            cfg.kafka.properties.insert("message.max.bytes".into(), limit.into());
        }
        common::create_topics(&cluster, &cfg, 1, &[]);
        // An event whose region is far over 256 bytes: invalid_value.
        let event = valid(1);
        let big = event.replace("ap-guangzhou", &"x".repeat(1_100_000 - event.len() + "ap-guangzhou".len())).into_bytes();
        assert_eq!(big.len(), 1_100_000);
        let mut sender = cfg.clone();
        sender.kafka.properties.insert("message.max.bytes".into(), "2000000".into());
        send(&sender, vec![("acct-1", big.clone(), vec![("trace".into(), b"t1".to_vec())]), ("acct-1", event.into_bytes(), vec![])]).await;

        let s = tokio::time::timeout(Duration::from_secs(90), common::replay(&cfg))
            .await
            .expect("the replay ends: the oversized message must not block its partition");
        assert_eq!((s.billed, s.rejected, s.aborted, s.delivery_failures), (1, 1, 0, 0));
        assert_only_valid_1_billed(&cfg);

        let dead = dead_letters(&cfg);
        assert_eq!(dead.len(), 1);
        let letter = &dead[0];
        assert_eq!(letter.0.as_deref(), Some(&b"acct-1"[..]));
        assert_eq!(headers_named(letter, "gatebill.reason"), ["invalid_value"]);
        assert_eq!(headers_named(letter, "trace"), ["t1"]);
        if worker_limit.is_some() {
            assert_eq!(letter.1, big, "under a raised limit the dead letter is whole");
            assert!(headers_named(letter, "gatebill.truncated").is_empty());
            continue;
        }
        let size = letter.0.as_ref().map_or(0, Vec::len) + letter.1.len() + letter.2.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        assert!(size < 1_000_000, "the dead letter fits the producer's limit: {size} bytes");
        assert!(letter.1.len() > 990_000, "what fits of the value is kept: {} bytes", letter.1.len());
        assert_eq!(&big[..letter.1.len()], &letter.1[..], "the value kept is the original's start");
        assert_eq!(headers_named(letter, "gatebill.truncated"), ["payload"]);
        assert_eq!(headers_named(letter, "gatebill.original.length"), ["1100000"]);
        let sha: String = sha2::Sha256::digest(&big).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(headers_named(letter, "gatebill.original.sha256"), [sha.as_str()]);
    }
}

/// Issue 25, point 7: an input message carrying headers named like
/// gatebill's (`gatebill.reason`, `gatebill.source.offset`) yielded a dead
/// letter with two of each, the sender's first. They are carried as
/// `original.gatebill.…` now; the `gatebill.…` names are ours alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_headers_named_like_gatebills_cannot_pose_as_ours() {
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path(), "posing");
    common::create_topics(&cluster, &cfg, 1, &[]);
    let posing = vec![
        ("gatebill.reason".to_string(), b"future_time".to_vec()),
        ("gatebill.source.offset".to_string(), b"999".to_vec()),
        ("Gatebill.Detail".to_string(), b"all fine".to_vec()),
        ("trace".to_string(), b"t1".to_vec()),
    ];
    send(&cfg, vec![("acct-1", b"{not json".to_vec(), posing), ("acct-1", valid(1).into_bytes(), vec![])]).await;
    let s = common::replay(&cfg).await;
    assert_eq!((s.billed, s.rejected), (1, 1));
    assert_only_valid_1_billed(&cfg);

    let dead = dead_letters(&cfg);
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    let names: Vec<&str> = letter.2.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "original.gatebill.reason",
            "original.gatebill.source.offset",
            "original.Gatebill.Detail",
            "trace",
            "gatebill.reason",
            "gatebill.detail",
            "gatebill.source.topic",
            "gatebill.source.partition",
            "gatebill.source.offset",
        ]
    );
    assert_eq!(headers_named(letter, "gatebill.reason"), ["malformed_json"]);
    assert_eq!(headers_named(letter, "gatebill.source.offset"), ["0"]);
    assert_eq!(headers_named(letter, "original.gatebill.reason"), ["future_time"]);
    assert_eq!(headers_named(letter, "original.gatebill.source.offset"), ["999"]);
    assert_eq!(headers_named(letter, "original.Gatebill.Detail"), ["all fine"]);
}

/// Issue 25, point 9: a tombstone (null value) on the input topic was
/// `malformed_json` "EOF while parsing"; the detail now says it is a
/// tombstone (the reason stays `malformed_json`, as for an empty value:
/// README, decisions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_on_the_input_topic_is_dead_lettered_as_a_tombstone() {
    use rdkafka::producer::FutureRecord;
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path(), "tombstone");
    common::create_topics(&cluster, &cfg, 1, &[]);
    let producer = kafka::producer(&cfg.kafka).unwrap();
    let tombstone: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&cfg.kafka.input_topic).key(&b"acct-1"[..]);
    producer.send(tombstone, Duration::from_secs(10)).await.unwrap();
    send(&cfg, vec![("acct-1", valid(1).into_bytes(), vec![])]).await;
    let s = common::replay(&cfg).await;
    assert_eq!((s.billed, s.rejected), (1, 1));
    assert_only_valid_1_billed(&cfg);

    let dead = dead_letters(&cfg);
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    assert_eq!((letter.0.as_deref(), letter.1.as_slice()), (Some(&b"acct-1"[..]), &b""[..]));
    assert_eq!(headers_named(letter, "gatebill.reason"), ["malformed_json"]);
    assert_eq!(
        headers_named(letter, "gatebill.detail"),
        ["tombstone: the message has no value (null); an access event is a JSON object, and events cannot be deleted"]
    );
    assert_eq!(headers_named(letter, "gatebill.source.offset"), ["0"]);
}

/// Issue 25, point 5: dead letters of account records (a key that is not
/// the record's `account_id`, a pack item `gpu`) reached the dead-letter
/// topic only at the worker's stop. They go out at once now, while it runs:
/// the one read when the worker loads the table, and the one that arrives
/// later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_dead_letters_reach_the_topic_while_the_worker_runs() {
    use gatebill::worker::{self, Mode, RunOptions};
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path(), "accounts");
    assert!(cfg.kafka.transactions);
    common::create_topics(&cluster, &cfg, 1, &[]);
    let record = |id: &str, item: &str| {
        format!(
            r#"{{"account_id":"{id}","activated_at":"2020-01-01T00:00:00+08:00","resource_packs":[{{"id":"p1","item":"{item}","quantity":100,"valid_from":"2021-01-01T00:00:00+08:00","valid_until":"2022-01-01T00:00:00+08:00"}}]}}"#
        )
        .into_bytes()
    };
    let accounts = cfg.kafka.accounts_topic.clone();
    send_to(&cfg, &accounts, vec![("acct-9", record("acct-8", "calls"), vec![])]).await;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = cfg.clone();
    let handle = tokio::spawn(async move {
        worker::run(&c.checked().unwrap(), RunOptions { mode: Mode::Live, fault: None }, async move {
            let _ = rx.await;
        })
        .await
    });
    let reasons = |n: usize| {
        let dead = dead_letters(&cfg);
        (dead.len() >= n).then(|| dead.iter().map(|l| headers_named(l, "gatebill.reason").join(",")).collect::<Vec<_>>())
    };
    let wait = |n: usize| {
        let handle = &handle;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            loop {
                assert!(!handle.is_finished(), "the worker stopped");
                if let Some(r) = reasons(n) {
                    return r;
                }
                assert!(std::time::Instant::now() < deadline, "{n} dead letter(s) not on the topic after 30 s while the worker runs");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(wait(1).await, ["key_mismatch"]);
    send_to(&cfg, &accounts, vec![("acct-7", record("acct-7", "gpu"), vec![])]).await;
    assert_eq!(wait(2).await, ["key_mismatch", "invalid_resource_pack"]);
    tx.send(()).unwrap();
    let s = tokio::time::timeout(Duration::from_secs(60), handle).await.unwrap().unwrap().unwrap();
    assert_eq!(s.delivery_failures, 0);
    // Delivered once: the stop found nothing left to send.
    assert_eq!(reasons(2).unwrap(), ["key_mismatch", "invalid_resource_pack"]);
}
