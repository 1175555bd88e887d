//! Operator mistakes and what operators see (issue 25, points 10, 11, 14
//! and 15): `/healthz` follows the worker's progress, reading a topic that
//! does not exist is an error, control characters in ids are escaped in
//! tables, and blank lines of a file replay are counted.

mod common;

use common::{fixture, wait_for_closed_bills};
use gatebill::billing::{HourUsage, Month, MonthUsage, Rules};
use gatebill::worker::{self, Mode, RunOptions};
use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// A free local port's address.
fn free_address() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET path` on `address`: the status line and the body.
fn get(address: &str, path: &str) -> Option<(String, String)> {
    let mut s = std::net::TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    Some((head.lines().next()?.to_string(), body.to_string()))
}

/// Polls `/healthz` until `want` accepts the answer; panics after `within`.
async fn healthz_until(address: &str, within: Duration, want: impl Fn(&str, &str) -> bool) -> (String, String) {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        let a = address.to_string();
        let got = tokio::task::spawn_blocking(move || get(&a, "/healthz")).await.unwrap();
        if let Some((status, body)) = &got {
            if want(status, body) {
                return (status.clone(), body.clone());
            }
        }
        last = got;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("/healthz did not answer as wanted within {within:?}; last answer {last:?}");
}

const OK: &str = "HTTP/1.1 200 OK";
const NOT_OK: &str = "HTTP/1.1 503 Service Unavailable";

/// `gatebill run` in-process with `cfg`, until the sender is used.
fn spawn_live(
    cfg: &gatebill::config::Config,
) -> (tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<Result<worker::RunSummary, worker::WorkerError>>) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let cfg = cfg.clone().checked().unwrap();
    let handle = tokio::spawn(async move {
        worker::run(&cfg, RunOptions { mode: Mode::Live, fault: None }, async move {
            let _ = rx.await;
        })
        .await
    });
    (tx, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_while_the_broker_is_gone_and_ok_when_it_is_back() {
    let mut f = fixture(31, 1_000, 2).await;
    let address = free_address();
    f.cfg.metrics.address = address.clone();
    f.cfg.worker.health_stall_secs = 2;
    let (tx, handle) = spawn_live(&f.cfg);
    wait_for_closed_bills(&f.cfg, &f.expected, Duration::from_secs(120)).await;
    let (_, body) = healthz_until(&address, Duration::from_secs(30), |s, _| s == OK).await;
    assert_eq!(body, "ok\n");
    // Everything is read (no lag): the broker going away shows as end
    // offsets that cannot be read, after 2 s + one 1 s lag interval.
    f.cluster.broker_down(1).unwrap();
    let (_, body) = healthz_until(&address, Duration::from_secs(30), |s, _| s == NOT_OK).await;
    assert!(
        body.starts_with("not ok: the input topic's end offsets could not be read for ")
            && body.ends_with(" s: the broker is unreachable or not answering, so progress is unknown\n"),
        "{body}"
    );
    f.cluster.broker_up(1).unwrap();
    let (_, body) = healthz_until(&address, Duration::from_secs(60), |s, _| s == OK).await;
    assert_eq!(body, "ok\n");
    tx.send(()).unwrap();
    handle.await.unwrap().expect("the worker survives the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_is_503_through_a_transaction_abort_loop() {
    let mut f = fixture(32, 1_000, 2).await;
    assert!(f.cfg.kafka.transactions);
    let address = free_address();
    f.cfg.metrics.address = address.clone();
    // Every produce refused for a while: each batch's transaction aborts
    // and the batch is read again. A transaction uses up one to a few of
    // these errors (one per produce request) every half second or so:
    // 60 errors give well over UNHEALTHY_ABORTS aborts in a row, and run
    // out in time for the bills to close within the wait below also on a
    // loaded machine (300 took up to 150 s there).
    f.cluster.request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE; 60]);
    let (tx, handle) = spawn_live(&f.cfg);
    let (_, body) = healthz_until(&address, Duration::from_secs(60), |s, _| s == NOT_OK).await;
    let n: u32 = body
        .strip_prefix("not ok: ")
        .and_then(|b| b.strip_suffix(
            " transactions aborted in a row, none committed since: the batch cannot be delivered (see the log's \"transaction aborted\" lines)\n",
        ))
        .unwrap_or_else(|| panic!("{body}"))
        .parse()
        .unwrap();
    assert!(n >= gatebill::metrics::UNHEALTHY_ABORTS, "{body}");
    // The errors run out: transactions commit, the worker is healthy again.
    wait_for_closed_bills(&f.cfg, &f.expected, Duration::from_secs(120)).await;
    healthz_until(&address, Duration::from_secs(30), |s, b| s == OK && b == "ok\n").await;
    tx.send(()).unwrap();
    let s = handle.await.unwrap().unwrap();
    assert!(s.aborted >= u64::from(gatebill::metrics::UNHEALTHY_ABORTS), "{s:?}");
}

/// Runs the binary with `args` (no `GATEBILL_*` variable of the test's
/// environment), killing it after 60 s: its exit code and stderr.
fn gatebill(args: &[&str]) -> (Option<i32>, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_gatebill"));
    cmd.args(args).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("GATEBILL_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("gatebill {args:?} still runs after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (child.wait().unwrap().code(), err)
}

#[test]
fn inspect_and_count_topic_of_a_topic_that_does_not_exist_are_errors() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("gateway-bills", 2, 1).unwrap();
    let b = cluster.bootstrap_servers();
    let expected = format!(
        "error: kafka: topic nosuch does not exist on the broker at {b} (it has topics gateway-bills); check the topic name \
         (--output-topic, --topic, the configuration file or GATEBILL_*_TOPIC) and --brokers\n"
    );
    for args in [
        vec!["inspect", "--brokers", &b, "--output-topic", "nosuch"],
        vec!["inspect", "--brokers", &b, "--output-topic", "nosuch", "--follow"],
        vec!["count-topic", "--brokers", &b, "--topic", "nosuch"],
    ] {
        let (code, err) = gatebill(&args);
        assert_eq!((code, err.as_str()), (Some(1), expected.as_str()), "gatebill {args:?}");
    }
    // The topic that exists is read (an empty table) and exits 0.
    let (code, err) = gatebill(&["inspect", "--brokers", &b, "--output-topic", "gateway-bills"]);
    assert_eq!(code, Some(0), "{err}");
    // A month that is not YYYY-MM, before any broker is asked.
    for month in ["2020-13", "nov"] {
        let (code, err) = gatebill(&["inspect", "--brokers", &b, "--month", month]);
        assert_eq!(code, Some(2), "{err}");
        assert!(
            err.starts_with(&format!(
                "error: invalid value '{month}' for '--month <MONTH>': `{month}` is not a month; expected YYYY-MM, e.g. 2020-11"
            )),
            "{err}"
        );
    }
}

#[test]
fn control_characters_in_ids_and_regions_are_escaped_in_explain_and_inspect() {
    let rules = Rules::default();
    let account = "evil\u{1b}[2J";
    let (month, hour) = rules.calendar.place(1_605_000_000_000); // 2020-11-10
    let mut usage = MonthUsage::default();
    let mut h = HourUsage { calls: 3, ..Default::default() };
    h.public_out_bytes.insert("ap-\u{1b}[2Jguangzhou\r".into(), 1_000);
    usage.add_hour(hour, &h);
    let usages: BTreeMap<Month, MonthUsage> = [(month, usage)].into();
    let explanation = gatebill::billing::explain::explain(account, None, &usages, month, &rules).unwrap();
    let text = gatebill::explain::render(&gatebill::explain::Explained { explanation, emitted: None });
    assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    assert!(
        text.starts_with("Account evil\\u{1b}[2J, 2020-11 (hours in Asia/Shanghai), no account record: no free tier, no packs\n"),
        "{text}"
    );
    assert!(text.contains("| ap-\\u{1b}[2Jguangzhou\\r |"), "{text}");
    // The same bill as a row of inspect's table.
    let x = gatebill::billing::explain::explain(account, None, &usages, month, &rules).unwrap();
    let record = gatebill::billing::BillRecord {
        content: x.bill,
        revision: 1,
        status: gatebill::billing::BillStatus::Final,
        content_hash: x.content_hash,
    };
    let table = gatebill::inspect::render_table([&record]).to_string();
    assert!(!table.contains('\u{1b}'), "{table:?}");
    assert!(table.contains("evil\\u{1b}[2J"), "{table}");
    // JSON stays exact: serde escapes the character itself.
    assert!(serde_json::to_string(&record).unwrap().contains(r#""account_id":"evil\u001b[2J""#));
    // Plain text is untouched.
    assert_eq!(gatebill::inspect::printable("1250000001"), "1250000001");
    assert_eq!(gatebill::inspect::printable("a\\b\u{202e}c"), "a\\\\b\\u{202e}c");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_lines_of_a_file_replay_are_counted_once() {
    let dir = tempfile::tempdir().unwrap();
    let event = |i: u32| {
        format!(
            r#"{{"request_id":"r-{i}","account_id":"A","region":"ap-guangzhou","time":"2021-05-01T10:00:00+08:00","client_network":"public","request_bytes":10,"response_bytes":1000,"backend":{{"type":"mock"}}}}"#
        )
    };
    let input = dir.path().join("events.ndjson");
    std::fs::write(&input, format!("{}\n\n   \n{}\n\t\n", event(1), event(2))).unwrap();
    let mut cfg = gatebill::config::Config::default();
    cfg.worker.state_dir = dir.path().join("state");
    cfg.metrics.address = String::new();
    let cfg = cfg.checked().unwrap();
    let out = dir.path().join("bills.ndjson");
    let replay = || {
        gatebill::file_replay::replay_file(
            &cfg,
            &input,
            gatebill::file_replay::Accounts::None,
            gatebill::file_replay::Sink::File(out.clone()),
            false,
            std::future::pending(),
        )
    };
    let s = replay().await.unwrap();
    assert_eq!((s.messages, s.billed, s.blank_lines), (2, 2, 3), "{s:?}");
    // Resumed after its last line: nothing read again, nothing counted again.
    let s = replay().await.unwrap();
    assert_eq!((s.messages, s.blank_lines), (0, 0), "{s:?}");
}
