//! Traffic for trying and testing gatebill, beside the generator
//! (`gen.rs`, which is pure): generated traffic written to Kafka topics or
//! NDJSON files, the embedded dev broker, and the demo.

use crate::config::{Config, KafkaConfig};
use crate::gen::{self, GenSpec};
use crate::inspect::{self, BillTable};
use crate::store::OutboxRecord;
use crate::worker::{self, Mode, RunOptions};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use std::path::PathBuf;
use std::time::Duration;

/// Any error, shown to the user as is.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The dev broker: librdkafka's mock cluster (one broker) holding the five
/// topics of `k`, `k.partitions` partitions each. The mock cluster cannot
/// create topics on request (it has no controller), so they are made here.
pub fn dev_cluster(k: &KafkaConfig) -> Result<MockCluster<'static, DefaultProducerContext>> {
    let cluster = MockCluster::new(1)?;
    for t in k.topics() {
        cluster.create_topic(t, k.partitions, 1)?;
    }
    Ok(cluster)
}

/// Writes generated messages to a topic in chunks, at an optional rate.
async fn write_messages(k: &KafkaConfig, topic: &str, msgs: Vec<gen::GenMessage>, rate: u64) -> Result<()> {
    let producer = crate::kafka::producer(k)?;
    let chunk = if rate > 0 { rate.clamp(1, 10_000) as usize } else { 20_000 };
    let started = std::time::Instant::now();
    let mut sent = 0u64;
    for part in msgs.chunks(chunk) {
        let recs: Vec<(Vec<u8>, OutboxRecord)> = part
            .iter()
            .map(|m| {
                (
                    Vec::new(),
                    OutboxRecord {
                        topic: topic.to_string(),
                        key: m.key.clone(),
                        payload: m.payload.clone(),
                        headers: vec![],
                        partition: None,
                    },
                )
            })
            .collect();
        let delivered = crate::kafka::produce_all(&producer, &recs).await;
        if delivered.len() != recs.len() {
            return Err(format!(
                "{} of {} messages to {topic} were not delivered; is the broker up at {}?",
                recs.len() - delivered.len(),
                recs.len(),
                k.brokers
            )
            .into());
        }
        sent += part.len() as u64;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
    }
    Ok(())
}

/// Generates and writes traffic; returns the generator's ground truth.
pub async fn generate(k: &KafkaConfig, spec: &GenSpec, accounts: bool, rate: u64) -> Result<gen::GenTruth> {
    crate::kafka::ensure_these_topics(k, &[&k.input_topic, &k.accounts_topic]).await?;
    if accounts {
        write_messages(k, &k.accounts_topic, gen::accounts(spec.accounts, spec.seed), 0).await?;
    }
    let mut msgs = Vec::with_capacity(spec.events as usize);
    let truth = gen::events(spec, |m| msgs.push(m));
    write_messages(k, &k.input_topic, msgs, rate).await?;
    Ok(truth)
}

/// The accounts file `gen --output-file` writes beside `events`:
/// `x.ndjson` -> `x.accounts.ndjson`, `x.ndjson.gz` -> `x.accounts.ndjson.gz`,
/// `x` -> `x.accounts.ndjson`.
pub fn accounts_file_for(events: &std::path::Path) -> std::path::PathBuf {
    let name = events.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let (stem, gz) = match name.strip_suffix(".gz") {
        Some(s) => (s, ".gz"),
        None => (name.as_str(), ""),
    };
    let stem = stem.strip_suffix(".ndjson").or_else(|| stem.strip_suffix(".jsonl")).or_else(|| stem.strip_suffix(".json")).unwrap_or(stem);
    events.with_file_name(format!("{stem}.accounts.ndjson{gz}"))
}

/// Writes the generated account records as NDJSON (gzip for `.gz`).
pub fn write_accounts_file(path: &std::path::Path, spec: &GenSpec) -> Result<()> {
    write_lines(path, gen::accounts(spec.accounts, spec.seed).iter().map(|m| m.payload.as_slice()))
}

/// Creates an NDJSON file, gzip-compressed when its name ends in `.gz`.
fn create_ndjson(path: &std::path::Path) -> Result<Box<dyn std::io::Write>> {
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::write::GzEncoder::new(std::io::BufWriter::new(file), flate2::Compression::fast()))
    } else {
        Box::new(std::io::BufWriter::with_capacity(1 << 20, file))
    })
}

/// Writes lines as NDJSON (gzip for `.gz`).
fn write_lines<'a>(path: &std::path::Path, lines: impl Iterator<Item = &'a [u8]>) -> Result<()> {
    use std::io::Write;
    let mut out = create_ndjson(path)?;
    for l in lines {
        out.write_all(l)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Writes generated events as NDJSON (gzip for `.gz`).
pub fn write_file(path: &std::path::Path, spec: &GenSpec) -> Result<gen::GenTruth> {
    let mut out = create_ndjson(path)?;
    let mut err = None;
    let truth = gen::events(spec, |m| {
        // A line must stay one line: payloads with a newline (none are generated) would split.
        if err.is_none() {
            err = out.write_all(&m.payload).and_then(|_| out.write_all(b"\n")).err();
        }
    });
    if let Some(e) = err {
        return Err(e.into());
    }
    out.flush()?;
    drop(out);
    Ok(truth)
}

/// `gatebill demo`: an embedded broker, `events` generated events of
/// November 2020 for `accounts` accounts, the worker until they are
/// consumed, and the bills read back and printed.
pub async fn demo(events: u64, accounts: u64) -> Result<()> {
    let state = tempdir_like()?;
    let mut cfg = Config::default();
    cfg.kafka.partitions = 4;
    let cluster = dev_cluster(&cfg.kafka)?;
    cfg.kafka.brokers = cluster.bootstrap_servers();
    cfg.worker.state_dir = state.clone();
    cfg.metrics.address = String::new();
    println!("1/4 embedded broker at {} (librdkafka mock cluster)", cfg.kafka.brokers);
    let spec = GenSpec {
        events,
        accounts: accounts.max(1),
        skew: 1.0,
        start_ms: chrono::DateTime::parse_from_rfc3339("2020-11-01T00:00:00+08:00").expect("valid").timestamp_millis(),
        days: 30,
        duplicates: 0.01,
        malformed: 0.001,
        seed: 2019,
    };
    let t = generate(&cfg.kafka, &spec, true, 0).await?;
    println!(
        "2/4 wrote {} account records and {} events of November 2020 ({} duplicates, {} malformed)",
        spec.accounts, t.messages, t.duplicates, t.malformed
    );
    let cfg = cfg.checked()?;
    let s = worker::run(&cfg, RunOptions::new(Mode::Replay { from_ms: None, progress: false }), std::future::pending()).await?;
    println!(
        "3/4 worker consumed {} messages: {} billed, {} duplicates dropped, {} dead-lettered, {} bills emitted",
        s.messages, s.billed, s.duplicates, s.rejected, s.bills_emitted
    );
    let (consumer, ends) = inspect::open(&cfg.kafka, &cfg.kafka.output_topic)?;
    let mut table = BillTable::default();
    inspect::read_to_end(&consumer, ends, &mut table, Duration::from_secs(30));
    println!("4/4 bills read back from {}:", cfg.kafka.output_topic);
    let mut rows: Vec<_> = table.latest.values().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.content.total_amount));
    let seed = table.latest.values().find(|r| r.content.account_id == gen::SEED_ACCOUNT);
    let mut shown: Vec<_> = rows.iter().take(10).copied().collect();
    if let Some(s) = seed {
        if !shown.iter().any(|r| r.key() == s.key()) {
            shown.insert(0, s);
        }
    }
    println!("{}", inspect::render_table(shown.iter().copied()));
    println!("({} of {} bills shown, largest first)", shown.len(), rows.len());
    if let Some(s) = seed {
        println!("\nSeed account {} (activated {}), {}:", gen::SEED_ACCOUNT, gen::SEED_ACTIVATION, s.content.month);
        println!("{}", serde_json::to_string_pretty(s)?);
    }
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}

fn tempdir_like() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("gatebill-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
