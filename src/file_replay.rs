//! `gatebill replay --input-file`: the same pipeline (decode, dedupe,
//! aggregate, RocksDB batches, bills) fed from an archive of access logs,
//! newline-delimited JSON, plain or gzip, or stdin. Bills go to the output
//! topic, or with `--output-file` to NDJSON (dead letters beside it).
//!
//! Offsets are line numbers stored under the topic name `file:<path>`, so a
//! replay of the same file into the same state directory resumes after the
//! last line it wrote.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::{now_ms, InputMessage, Pipeline, Settings};
use crate::store::{OutboxRecord, Store};
use crate::worker::{RunSummary, WorkerError};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where bills go.
pub enum Sink {
    /// The configured output and dead-letter topics.
    Kafka,
    /// NDJSON files: bills to this path, dead letters to `<path>.dead-letters`.
    File(PathBuf),
}

/// Opens the input: `-` is stdin; gzip is recognised by its magic bytes.
fn open_input(path: &Path) -> std::io::Result<Box<dyn BufRead>> {
    let raw: Box<dyn Read> = if path == Path::new("-") { Box::new(std::io::stdin()) } else { Box::new(std::fs::File::open(path)?) };
    let mut buf = BufReader::with_capacity(1 << 20, raw);
    let gz = buf.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz { Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(buf))) } else { Box::new(buf) })
}

/// Writes records to NDJSON files and syncs them.
fn write_files(out: &Path, records: &[(Vec<u8>, OutboxRecord)], bills_topic: &str) -> std::io::Result<()> {
    let dead_path = PathBuf::from(format!("{}.dead-letters", out.display()));
    let open = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p);
    let mut bills = std::io::BufWriter::new(open(out)?);
    let mut dead = std::io::BufWriter::new(open(&dead_path)?);
    for (_, r) in records {
        if r.topic == bills_topic {
            bills.write_all(&r.payload)?;
            bills.write_all(b"\n")?;
        } else {
            let headers: serde_json::Map<String, serde_json::Value> =
                r.headers.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into())).collect();
            let line = serde_json::json!({ "headers": headers, "payload": String::from_utf8_lossy(&r.payload) });
            serde_json::to_writer(&mut dead, &line)?;
            dead.write_all(b"\n")?;
        }
    }
    bills.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    dead.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Replays a file through the pipeline and emits every bill at the end.
pub async fn replay_file(cfg: &Config, input: &Path, sink: Sink, progress: bool) -> Result<RunSummary, WorkerError> {
    let rules = cfg.check()?;
    let store = Arc::new(Store::open(&cfg.worker.state_dir)?);
    let mut settings = Settings::from_config(cfg);
    let canonical = if input == Path::new("-") { PathBuf::from("-") } else { input.canonicalize().unwrap_or_else(|_| input.to_path_buf()) };
    settings.input_topic = format!("file:{}", canonical.display());
    settings.require_keys = false;
    let topic = settings.input_topic.clone();
    let metrics = Metrics::new();
    let mut pipeline = Pipeline::new(store, rules, settings, metrics.clone())?;
    let reader = open_input(input).map_err(|source| WorkerError::Input { path: input.to_path_buf(), source })?;
    let start = pipeline.next_offset(0).unwrap_or(0);
    let pb = progress.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(indicatif::ProgressStyle::with_template("{spinner} {pos} lines  {per_sec}  {elapsed}").expect("valid template"));
        pb
    });
    let mut summary = RunSummary::default();
    let batch_size = cfg.worker.batch_size;
    let mut lines: Vec<Vec<u8>> = Vec::with_capacity(batch_size);
    let mut first = 0i64;
    let mut lineno = 0i64;
    let mut iter = reader.split(b'\n');
    let started = std::time::Instant::now();
    loop {
        let next = iter.next();
        let done = next.is_none();
        if let Some(line) = next {
            let line = line.map_err(|source| WorkerError::Input { path: input.to_path_buf(), source })?;
            lineno += 1;
            if lineno <= start || line.iter().all(u8::is_ascii_whitespace) {
                if lines.is_empty() {
                    first = lineno;
                }
                // Already processed, or blank: keep the offset moving with an empty slot.
                lines.push(Vec::new());
            } else {
                if lines.is_empty() {
                    first = lineno;
                }
                lines.push(line);
            }
        }
        if lines.len() >= batch_size || (done && !lines.is_empty()) {
            let msgs: Vec<InputMessage> = lines
                .iter()
                .enumerate()
                .filter(|(_, l)| !l.is_empty())
                .map(|(i, l)| InputMessage {
                    topic: &topic,
                    partition: 0,
                    offset: first + i as i64 - 1,
                    key: None,
                    payload: Some(l),
                    headers: vec![],
                })
                .collect();
            if !msgs.is_empty() {
                let s = pipeline.process(&msgs)?;
                summary.batches += 1;
                summary.messages += msgs.len() as u64 - s.already_processed;
                summary.billed += s.billed;
                summary.rejected += s.rejected;
                summary.duplicates += s.duplicates;
            }
            if let Some(pb) = &pb {
                pb.inc(lines.len() as u64);
            }
            lines.clear();
        }
        if done {
            break;
        }
    }
    tracing::info!(process_seconds = started.elapsed().as_secs_f64(), "input processed");
    let processed_at = std::time::Instant::now();
    summary.bills_emitted = pipeline.emit(now_ms(), true)? as u64;
    let pending = pipeline.outbox()?;
    tracing::info!(emit_seconds = processed_at.elapsed().as_secs_f64(), bills = summary.bills_emitted, "bills computed");
    match sink {
        Sink::File(out) => {
            write_files(&out, &pending, &cfg.kafka.output_topic).map_err(|source| WorkerError::Input { path: out.clone(), source })?;
            pipeline.acknowledge(&pending)?;
        }
        Sink::Kafka => {
            crate::kafka::ensure_topics(&cfg.kafka).await?;
            let producer = crate::kafka::producer(&cfg.kafka)?;
            let delivered = crate::kafka::produce_all(&producer, &pending).await;
            summary.delivery_failures = (pending.len() - delivered.len()) as u64;
            pipeline.acknowledge(&delivered)?;
        }
    }
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(summary)
}
