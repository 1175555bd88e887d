//! `gatebill replay --input-file`: the same pipeline (decode, dedupe,
//! aggregate, RocksDB batches, bills) fed from an archive of access logs,
//! newline-delimited JSON, plain or gzip, or stdin. Bills go to the output
//! topic, or with `--output-file` to NDJSON (dead letters beside it).
//!
//! Offsets are line numbers stored under the topic name `file:<path>`, so a
//! replay of the same file into the same state directory resumes after the
//! last line it wrote.

use crate::config::Checked;
use crate::metrics::Metrics;
use crate::pipeline::emit::Route;
use crate::pipeline::{now_ms, InputMessage, Pipeline, Settings};
use crate::store::{OutboxRecord, Store};
use crate::worker::{RunSummary, WorkerError};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Lines decoded together (the write batch is `worker.batch_size` lines).
const CHUNK_LINES: usize = 16_384;

/// Where bills go.
pub enum Sink {
    /// The configured output and dead-letter topics.
    Kafka,
    /// NDJSON files: bills to this path, dead letters to `<path>.dead-letters`.
    File(PathBuf),
}

/// Where the account records come from.
pub enum Accounts {
    /// Newline-delimited account records (plain or gzip). Offsets are line
    /// numbers stored under `file:<path>`: a resumed replay applies only
    /// the lines after the last one applied.
    File(PathBuf),
    /// The configured accounts topic, from the stored offsets to its end.
    Topic,
    /// None: every account is billed as unknown.
    None,
}

/// Opens the input: `-` is stdin; gzip is recognised by its magic bytes.
fn open_input(path: &Path) -> std::io::Result<Box<dyn BufRead + Send>> {
    let raw: Box<dyn Read + Send> = if path == Path::new("-") { Box::new(std::io::stdin()) } else { Box::new(std::fs::File::open(path)?) };
    let mut buf = BufReader::with_capacity(1 << 20, raw);
    let gz = buf.fill_buf()?.starts_with(&[0x1f, 0x8b]);
    Ok(if gz { Box::new(BufReader::with_capacity(1 << 20, flate2::read::MultiGzDecoder::new(buf))) } else { Box::new(buf) })
}

/// Lines of the input, read ahead by [`read_chunks`].
struct Chunk {
    buf: Vec<u8>,
    /// (start, end, line number) of each non-blank line not processed before.
    spans: Vec<(usize, usize, i64)>,
    /// Number of the last line read.
    last_line: i64,
    /// The input ended with this chunk.
    done: bool,
}

impl Chunk {
    /// The chunk's lines as messages of partition 0, offset = line number - 1.
    fn messages<'a>(&'a self, topic: &'a str) -> Vec<InputMessage<'a>> {
        self.spans
            .iter()
            .map(|(from, to, line)| InputMessage {
                topic,
                partition: 0,
                offset: line - 1,
                key: None,
                payload: Some(&self.buf[*from..*to]),
                headers: vec![],
            })
            .collect()
    }
}

/// Reads the input on a thread, `chunk_lines` lines per chunk, skipping
/// lines up to `start` (already processed) and blank ones. Chunks sent back
/// on the second channel are reused. The thread ends at the end of the input,
/// on an error (sent as the last item), or when the receiver is dropped.
fn read_chunks(
    mut reader: Box<dyn BufRead + Send>,
    chunk_lines: usize,
    start: i64,
) -> (std::sync::mpsc::Receiver<std::io::Result<Chunk>>, std::sync::mpsc::Sender<Chunk>) {
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let (recycle, reuse) = std::sync::mpsc::channel::<Chunk>();
    std::thread::spawn(move || {
        let mut lineno = 0i64;
        loop {
            let mut c = reuse.try_recv().unwrap_or_else(|_| Chunk {
                buf: Vec::with_capacity(chunk_lines * 512),
                spans: Vec::with_capacity(chunk_lines),
                last_line: 0,
                done: false,
            });
            c.buf.clear();
            c.spans.clear();
            while c.spans.len() < chunk_lines {
                let from = c.buf.len();
                match reader.read_until(b'\n', &mut c.buf) {
                    Ok(0) => {
                        c.done = true;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
                lineno += 1;
                let to = if c.buf.last() == Some(&b'\n') { c.buf.len() - 1 } else { c.buf.len() };
                if lineno <= start || c.buf[from..to].iter().all(u8::is_ascii_whitespace) {
                    // Already processed, or blank.
                    c.buf.truncate(from);
                    continue;
                }
                c.spans.push((from, to, lineno));
            }
            c.last_line = lineno;
            let done = c.done;
            if tx.send(Ok(c)).is_err() || done {
                return;
            }
        }
    });
    (rx, recycle)
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

/// Applies an accounts file's lines after the last one applied before.
fn load_accounts_file(pipeline: &mut Pipeline, path: &Path) -> Result<(), WorkerError> {
    let input = |source| WorkerError::Input { path: path.to_path_buf(), source };
    let reader = open_input(path).map_err(input)?;
    let topic = pipeline.settings().accounts_topic.clone();
    let start = pipeline.store().partition(&topic, 0)?.map_or(0, |s| s.next_offset);
    let (chunks, _recycle) = read_chunks(reader, 1_000, start);
    let mut applied = 0usize;
    for chunk in chunks.iter() {
        let chunk = chunk.map_err(input)?;
        let msgs = chunk.messages(&topic);
        applied += msgs.len();
        pipeline.apply_accounts(&msgs)?;
        if chunk.done {
            break;
        }
    }
    tracing::info!(file = %path.display(), records = applied, after_line = start, "account records loaded");
    Ok(())
}

/// Replays a file through the pipeline and emits every bill at the end.
pub async fn replay_file(cfg: &Checked, input: &Path, accounts: Accounts, sink: Sink, progress: bool) -> Result<RunSummary, WorkerError> {
    let rules = cfg.rules().clone();
    let store = Arc::new(Store::open(&cfg.worker.state_dir)?);
    let mut settings = Settings::from_config(cfg);
    let canonical = if input == Path::new("-") { PathBuf::from("-") } else { input.canonicalize().unwrap_or_else(|_| input.to_path_buf()) };
    settings.input_topic = format!("file:{}", canonical.display());
    settings.require_keys = false;
    // A file has no partitions to move between workers: no changelog.
    settings.changelog_topic = None;
    if let Accounts::File(f) = &accounts {
        settings.accounts_topic = format!("file:{}", f.canonicalize().unwrap_or_else(|_| f.clone()).display());
    }
    let topic = settings.input_topic.clone();
    let metrics = Metrics::new();
    let mut pipeline = Pipeline::new(store, rules, settings, metrics.clone())?;
    // The account records first: events are billed with them from the start.
    match &accounts {
        Accounts::File(f) => load_accounts_file(&mut pipeline, f)?,
        Accounts::Topic => {
            let consumer = crate::kafka::plain_consumer(&cfg.kafka, &format!("{}-accounts", cfg.kafka.group_id))?;
            crate::worker::load_accounts(&mut pipeline, &consumer, &cfg.kafka.accounts_topic)?;
            if pipeline.accounts_known() == 0 {
                return Err(WorkerError::NoAccounts { topic: cfg.kafka.accounts_topic.clone(), brokers: cfg.kafka.brokers.clone() });
            }
        }
        Accounts::None => {
            tracing::warn!("no account records (--no-accounts): every account is billed as unknown, without free tier or packs")
        }
    }
    let reader = open_input(input).map_err(|source| WorkerError::Input { path: input.to_path_buf(), source })?;
    let start = pipeline.next_offset(0).unwrap_or(0);
    let pb = progress.then(|| {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.set_style(indicatif::ProgressStyle::with_template("{spinner} {pos} lines  {per_sec}  {elapsed}").expect("valid template"));
        pb
    });
    let mut summary = RunSummary::default();
    let batch_size = cfg.worker.batch_size as u64;
    // A reader thread fills one buffer per chunk of lines (no allocation per
    // line) while this thread decodes and aggregates the previous chunk; a
    // write batch is flushed every `batch_size` lines.
    let chunk_lines = cfg.worker.batch_size.min(CHUNK_LINES);
    let (chunks, recycle) = read_chunks(reader, chunk_lines, start);
    let started = std::time::Instant::now();
    for chunk in chunks.iter() {
        let chunk = chunk.map_err(|source| WorkerError::Input { path: input.to_path_buf(), source })?;
        let msgs = chunk.messages(&topic);
        pipeline.ingest(&msgs)?;
        if let Some(pb) = &pb {
            pb.set_position(chunk.last_line as u64);
        }
        let done = chunk.done;
        if pipeline.pending_messages() >= batch_size || (done && pipeline.pending_messages() > 0) {
            let s = pipeline.flush()?;
            summary.batches += 1;
            summary.messages += s.billed + s.rejected + s.duplicates;
            summary.billed += s.billed;
            summary.rejected += s.rejected;
            summary.duplicates += s.duplicates;
        }
        drop(msgs);
        let _ = recycle.send(chunk);
        if done {
            break;
        }
    }
    tracing::info!(process_seconds = started.elapsed().as_secs_f64(), "input processed");
    let processed_at = std::time::Instant::now();
    summary.bills_emitted = match &sink {
        Sink::File(out) => {
            // Bills go straight to the file, a chunk at a time; each chunk
            // is committed after its lines are synced.
            let mut plan = pipeline.emission(now_ms(), true)?;
            let mut emitted = 0;
            while let Some(chunk) = pipeline.next_emission(&mut plan)? {
                write_files(out, &chunk.records, &cfg.kafka.output_topic)
                    .map_err(|source| WorkerError::Input { path: out.clone(), source })?;
                emitted += pipeline.commit_emission(chunk, Route::Delivered)?;
            }
            emitted
        }
        Sink::Kafka => pipeline.emit(now_ms(), true)?,
    } as u64;
    tracing::info!(emit_seconds = processed_at.elapsed().as_secs_f64(), bills = summary.bills_emitted, "bills computed");
    // Drain the outbox a page at a time (memory stays bounded however many bills).
    let drained = match &sink {
        Sink::File(out) => {
            let topic = &cfg.kafka.output_topic;
            pipeline
                .drain_outbox(|page| {
                    let written = write_files(out, &page, topic).map(|()| page);
                    std::future::ready(written.map_err(|source| WorkerError::Input { path: out.clone(), source }))
                })
                .await?
        }
        Sink::Kafka => {
            crate::kafka::ensure_topics(&cfg.kafka).await?;
            let producer = &crate::kafka::producer(&cfg.kafka)?;
            pipeline.drain_outbox(|page| async move { Ok::<_, WorkerError>(crate::kafka::produce_all(producer, &page).await) }).await?
        }
    };
    summary.delivery_failures += drained.failed;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(summary)
}
