//! `gatebill replay --input-file`: the same pipeline (decode, dedupe,
//! aggregate, RocksDB batches, bills) fed from an archive of access logs,
//! newline-delimited JSON, plain or gzip, or stdin. Bills go to the output
//! topic, or with `--output-file` to NDJSON (dead letters beside it).
//!
//! Offsets are line numbers stored under the topic name `file:<path>`, so a
//! replay of the same file into the same state directory resumes after the
//! last line it wrote.

use crate::billing::event::DecodeError;
use crate::billing::scan::Billable;
use crate::config::Checked;
pub use crate::delivery::base64;
use crate::delivery::{Delivery, FileDelivery, InputPosition, OutboxDelivery};
use crate::driver::{RunSummary, WorkerError};
use crate::metrics::Metrics;
use crate::pipeline::batch::decode_message;
use crate::pipeline::{now_ms, shard_of, BatchStats, InputMessage, Pipeline, Settings};
use crate::store::{Store, StoreError};
use rayon::prelude::*;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Lines decoded together (the write batch is `worker.file_batch_size` lines).
const CHUNK_LINES: usize = 32_768;

/// Shards a new file replay splits its accounts into ([`Pipeline::split`]),
/// whatever the machine: dedupe windows are measured per shard (its
/// watermark), so the count is fixed for the same archive to give the same
/// bills everywhere; `worker.threads` only says how many threads run them.
pub const FILE_SHARDS: u32 = 16;

/// The shard count of the replay of `topic` into `store`: as recorded when
/// the replay started (in the meta column family: positions are kept per
/// shard and a line's shard must never change, so a resumed replay keeps
/// its count); 1 for a replay that began before replays were sharded (a
/// position without a recorded count); else `new`, recorded now, before
/// any shard writes.
fn shard_count(store: &Store, topic: &str, new: u32) -> Result<u32, StoreError> {
    let key = format!("shards:{topic}");
    if let Some(v) = store.meta(&key)? {
        if let Ok(b) = <[u8; 4]>::try_from(v.as_slice()) {
            return Ok(u32::from_be_bytes(b).max(1));
        }
    }
    if !store.partitions(topic)?.is_empty() {
        return Ok(1);
    }
    store.put_meta(&key, &new.to_be_bytes())?;
    Ok(new)
}

/// Writes every shard's pending batch (one write each) and adds what they
/// wrote to the summary.
fn flush_shards(pool: &rayon::ThreadPool, shards: &mut [Pipeline], summary: &mut RunSummary) -> Result<(), StoreError> {
    let mut s = BatchStats::default();
    for r in on_shards(pool, shards, vec![(); shards.len()], |p, ()| p.flush()) {
        let r = r?;
        s.billed += r.billed;
        s.rejected += r.rejected;
        s.duplicates += r.duplicates;
    }
    summary.batches += 1;
    summary.messages += s.billed + s.rejected + s.duplicates;
    summary.billed += s.billed;
    summary.rejected += s.rejected;
    summary.duplicates += s.duplicates;
    Ok(())
}

/// Runs `f` on each shard with its work item on the pool's threads (each
/// shard a task, so a thread that finishes early takes the next shard);
/// results in shard order.
fn on_shards<W: Send, R: Send>(
    pool: &rayon::ThreadPool,
    shards: &mut [Pipeline],
    work: Vec<W>,
    f: impl Fn(&mut Pipeline, W) -> R + Sync,
) -> Vec<R> {
    pool.install(|| shards.par_iter_mut().zip(work).map(|(p, w)| f(p, w)).collect())
}

/// One line decoded, as a message of its shard's partition.
type Decoded<'a> = (InputMessage<'a>, Result<Billable<'a>, DecodeError>);

/// Decodes a chunk's lines on the pool's threads (one slice each) and sorts
/// them by shard (an event by its account's, a line that does not decode to
/// shard 0), each shard's in line order.
fn decode_by_shard<'a>(pool: &rayon::ThreadPool, chunk: &'a Chunk, topic: &'a str, count: u32) -> Vec<Vec<Vec<Decoded<'a>>>> {
    let per = chunk.spans.len().div_ceil(pool.current_num_threads()).max(1);
    let slices: Vec<Vec<Vec<Decoded<'a>>>> = pool.install(|| {
        chunk
            .spans
            .par_chunks(per)
            .map(|slice| {
                let mut out: Vec<Vec<Decoded<'a>>> = (0..count).map(|_| Vec::with_capacity(slice.len() / count as usize + 1)).collect();
                for (from, to, line) in slice {
                    let mut m = InputMessage {
                        topic,
                        partition: 0,
                        offset: line - 1,
                        key: None,
                        payload: Some(&chunk.buf[*from..*to]),
                        headers: vec![],
                    };
                    let d = decode_message(&m, false);
                    let shard = d.as_ref().map_or(0, |b| shard_of(&b.account_id, count));
                    m.partition = shard as i32;
                    out[shard as usize].push((m, d));
                }
                out
            })
            .collect()
    });
    // Per shard, its lines of each slice, slices in order.
    let mut by_shard: Vec<Vec<Vec<Decoded<'a>>>> = (0..count).map(|_| Vec::with_capacity(slices.len())).collect();
    for slice in slices {
        for (shard, items) in slice.into_iter().enumerate() {
            by_shard[shard].push(items);
        }
    }
    by_shard
}

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
    /// Blank lines (nothing but whitespace) in the chunk, not processed
    /// before: skipped, counted in [`RunSummary::blank_lines`].
    blank: u64,
    /// The input ended with this chunk.
    done: bool,
}

impl Chunk {
    /// The chunk's lines as messages of partition 0, offset = line number - 1
    /// (the accounts file; events go by [`decode_by_shard`]).
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
                blank: 0,
                done: false,
            });
            c.buf.clear();
            c.spans.clear();
            c.blank = 0;
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
                    // Already processed, or blank (counted once, when first read).
                    c.blank += u64::from(lineno > start);
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

/// The pipeline's settings for a replay of `input`: offsets under
/// `file:<path>`, no key check, no changelog.
/// Bytes at the start of an input file that identify it (with how many
/// there were, when the file was shorter).
const FINGERPRINT_BYTES: usize = 1 << 20;

/// The meta key under which an input's fingerprint is kept.
fn fingerprint_key(topic: &str) -> String {
    format!("input:{topic}")
}

/// A stored fingerprint: how many bytes were hashed, and their xxh3-128.
fn decode_fingerprint(v: &[u8]) -> Option<(usize, u128)> {
    let len = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let hash = u128::from_be_bytes(v.get(8..24)?.try_into().ok()?);
    Some((usize::try_from(len).ok()?, hash))
}

/// Whether an input whose first bytes are `head` (at most
/// [`FINGERPRINT_BYTES`]) has the stored fingerprint: its first `len`
/// bytes hash alike (a file that grew since keeps its identity).
fn matches_fingerprint(head: &[u8], (len, hash): (usize, u128)) -> bool {
    head.len() >= len && xxhash_rust::xxh3::xxh3_128(&head[..len]) == hash
}

/// The name a file replay's positions, dedupe buckets and shard count are
/// kept under (its "topic"): `file:<canonical path>`, where the input is
/// identified by content, not only by path. Its first MiB (or all of a
/// shorter file) is hashed and kept in the meta column family: an input
/// whose start matches an input replayed before under another path
/// resumes under that one's name; a path replayed before with other
/// content is refused (its stored position belongs to the other content).
/// Standard input (`-`) has no identity but its name.
fn input_topic(store: &Store, input: &Path) -> Result<String, WorkerError> {
    if input == Path::new("-") {
        return Ok("file:-".into());
    }
    let canonical = input.canonicalize().unwrap_or_else(|_| input.to_path_buf());
    let topic = format!("file:{}", canonical.display());
    let io = |source| WorkerError::Input { path: input.to_path_buf(), source };
    let mut head = Vec::with_capacity(FINGERPRINT_BYTES);
    std::fs::File::open(input).and_then(|f| f.take(FINGERPRINT_BYTES as u64).read_to_end(&mut head)).map_err(io)?;
    if let Some(stored) = store.meta(&fingerprint_key(&topic))?.as_deref().and_then(decode_fingerprint) {
        if matches_fingerprint(&head, stored) {
            return Ok(topic);
        }
        let line = store.partitions(&topic)?.into_values().map(|s| s.next_offset).min().unwrap_or(0);
        return Err(WorkerError::OtherContent { path: canonical, line });
    }
    for (key, v) in store.meta_with_prefix("input:")? {
        if decode_fingerprint(&v).is_some_and(|f| matches_fingerprint(&head, f)) {
            let other = key["input:".len()..].to_string();
            tracing::info!(input = %topic, replayed_as = %other, "this input starts as one replayed before under another path: resuming it");
            return Ok(other);
        }
    }
    let mut v = (head.len() as u64).to_be_bytes().to_vec();
    v.extend_from_slice(&xxhash_rust::xxh3::xxh3_128(&head).to_be_bytes());
    store.put_meta(&fingerprint_key(&topic), &v)?;
    Ok(topic)
}

fn file_settings(cfg: &Checked, topic: String, accounts: &Accounts) -> Settings {
    let mut settings = Settings::from_config(cfg);
    settings.input_topic = topic;
    settings.require_keys = false;
    // A file has no partitions to move between workers: no changelog.
    settings.changelog_topic = None;
    if let Accounts::File(f) = accounts {
        settings.accounts_topic = format!("file:{}", f.canonicalize().unwrap_or_else(|_| f.clone()).display());
    }
    settings
}

/// Replays a file through the pipeline and emits every bill at the end.
/// Stops at the first chunk boundary after `shutdown` resolves (a signal):
/// what was read is written, no bill is emitted, and the summary says it
/// was interrupted (spec section 8); run again, the replay resumes.
pub async fn replay_file(
    cfg: &Checked,
    input: &Path,
    accounts: Accounts,
    sink: Sink,
    progress: bool,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<RunSummary, WorkerError> {
    let mut shutdown = std::pin::pin!(shutdown);
    // Polled once now, so that a signal handler is in place from here on.
    let stop_asked = crate::driver::poll_now(shutdown.as_mut()).is_some();
    let mut pipeline = open_pipeline(cfg, input, &accounts, &sink)?;
    // The account records first: events are billed with them from the start.
    load_account_records(cfg, &mut pipeline, &accounts)?;
    let reader = open_input(input).map_err(|source| WorkerError::Input { path: input.to_path_buf(), source })?;
    let pb = progress.then(line_progress);
    let started = std::time::Instant::now();
    let summary = Shards::start(cfg, &mut pipeline)?.replay(reader, input, pb.as_ref(), stop_asked, shutdown.as_mut())?;
    tracing::info!(process_seconds = crate::metrics::rounded(started.elapsed().as_secs_f64(), 3), "input processed");
    let mut delivery = open_delivery(cfg, sink, &pipeline).await?;
    let summary = deliver(&mut delivery, &mut pipeline, summary).await?;
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    Ok(summary)
}

/// The pipeline of a replay of `input`: offsets under `file:<path>`, no key
/// check, no changelog; a file sink takes a dead letter of any size.
fn open_pipeline(cfg: &Checked, input: &Path, accounts: &Accounts, sink: &Sink) -> Result<Pipeline, WorkerError> {
    let store = Arc::new(Store::open_sized(&cfg.worker.state_dir, cfg.worker.store_memory())?);
    let mut settings = file_settings(cfg, input_topic(&store, input)?, accounts);
    if let Sink::File(_) = sink {
        settings.dead_letter_max_bytes = usize::MAX;
    }
    Ok(Pipeline::new(store, cfg.rules().clone(), settings, Metrics::new())?)
}

/// Loads the account records from where `accounts` says.
fn load_account_records(cfg: &Checked, pipeline: &mut Pipeline, accounts: &Accounts) -> Result<(), WorkerError> {
    match accounts {
        Accounts::File(f) => load_accounts_file(pipeline, f)?,
        Accounts::Topic => {
            let consumer = crate::kafka::plain_consumer(&cfg.kafka, &format!("{}-accounts", cfg.kafka.group_id))?;
            // Their dead letters go out with the replay's at the end.
            crate::driver::load_accounts(pipeline, &consumer, &cfg.kafka.accounts_topic)?;
            if pipeline.accounts_known() == 0 {
                return Err(WorkerError::NoAccounts { topic: cfg.kafka.accounts_topic.clone(), brokers: cfg.kafka.brokers.clone() });
            }
        }
        Accounts::None => {
            tracing::warn!("no account records (--no-accounts): every account is billed as unknown, without free tier or packs")
        }
    }
    Ok(())
}

/// The spinner of a file replay: lines read, their rate, time elapsed.
fn line_progress() -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {human_pos} lines  {rate}  {elapsed}")
            .expect("valid template")
            .with_key("rate", crate::metrics::progress_rate),
    );
    pb
}

/// Where the bills go: NDJSON files, or the output topic through the
/// outbox (the topics made sure of first).
async fn open_delivery(cfg: &Checked, sink: Sink, pipeline: &Pipeline) -> Result<Delivery, WorkerError> {
    Ok(match sink {
        Sink::File(out) => Delivery::File(FileDelivery::new(out, cfg.kafka.output_topic.clone(), cfg.kafka.alerts_topic.clone())),
        Sink::Kafka => {
            crate::kafka::ensure_topics(&cfg.kafka).await?;
            Delivery::Outbox(OutboxDelivery::new(crate::kafka::producer(&cfg.kafka)?, pipeline.metrics().clone()))
        }
    })
}

/// Emits every bill (all months closed: a replay's input has ended), unless
/// the replay was interrupted, then delivers what is left in the outbox
/// (the dead letters) a page at a time.
async fn deliver(delivery: &mut Delivery, pipeline: &mut Pipeline, mut summary: RunSummary) -> Result<RunSummary, WorkerError> {
    let (processed_at, cpu) = (std::time::Instant::now(), crate::metrics::process_cpu_seconds());
    if summary.interrupted {
        // An interrupted replay emits no bill (spec section 8): its dirty
        // marks stay for the run that resumes it.
        tracing::warn!(
            messages = summary.messages,
            "replay interrupted before the end of its input: no bill emitted; run the same command again to resume"
        );
    } else {
        let emitted = delivery.emit(pipeline, now_ms(), true, &InputPosition::default()).await?;
        summary.bills_emitted = emitted.bills;
        summary.delivery_failures += emitted.failed;
    }
    let cpu_us_per_bill = crate::metrics::cpu_us_per(cpu, summary.bills_emitted);
    tracing::info!(
        emit_seconds = crate::metrics::rounded(processed_at.elapsed().as_secs_f64(), 3),
        bills = summary.bills_emitted,
        cpu_us_per_bill,
        "bills computed"
    );
    summary.delivery_failures += delivery.drain(pipeline).await?;
    Ok(summary)
}

/// A replay's shards: the events split by account over pipelines, each
/// with its own batch, dedupe buckets and position (its partition), run on
/// every core; each shard's write is atomic for its own lines.
struct Shards<'p> {
    parent: &'p mut Pipeline,
    shards: Vec<Pipeline>,
    pool: rayon::ThreadPool,
    topic: String,
    count: u32,
    batch_size: u64,
    chunk_lines: usize,
}

impl<'p> Shards<'p> {
    /// Splits `parent` into its shards ([`shard_count`]) on threads kept
    /// for the whole replay (`worker.threads`; a thread that finishes its
    /// shard early takes the next).
    fn start(cfg: &Checked, parent: &'p mut Pipeline) -> Result<Shards<'p>, WorkerError> {
        let threads = match cfg.worker.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let topic = parent.settings().input_topic.clone();
        let count = shard_count(parent.store(), &topic, FILE_SHARDS)?;
        tracing::info!(shards = count, threads, "input split by account");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("gatebill-shard-{i}"))
            .build()
            .map_err(|source| WorkerError::Threads { threads, source })?;
        let shards = parent.split(count)?;
        let (batch_size, chunk_lines) = (cfg.worker.file_batch_size as u64, cfg.worker.file_batch_size.min(CHUNK_LINES));
        Ok(Shards { parent, shards, pool, topic, count, batch_size, chunk_lines })
    }

    /// Reads the input from the line after the one every shard has written,
    /// a chunk at a time: a reader thread fills one buffer per chunk (no
    /// allocation per line) while the shards decode and aggregate the
    /// previous chunk; every shard writes its batch once `batch_size` lines
    /// are pending in all. Stops early at a chunk boundary once `shutdown`
    /// resolves. Joins the shards back into the parent pipeline.
    fn replay(
        mut self,
        reader: Box<dyn BufRead + Send>,
        input: &Path,
        pb: Option<&indicatif::ProgressBar>,
        mut stop_asked: bool,
        mut shutdown: std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
    ) -> Result<RunSummary, WorkerError> {
        let mut summary = RunSummary::default();
        let start = (0..self.count as i32).zip(&self.shards).map(|(p, s)| s.next_offset(p).unwrap_or(0)).min().unwrap_or(0);
        let (chunks, recycle) = read_chunks(reader, self.chunk_lines, start);
        for chunk in chunks.iter() {
            let chunk = chunk.map_err(|source| WorkerError::Input { path: input.to_path_buf(), source })?;
            summary.blank_lines += chunk.blank;
            self.ingest(&chunk)?;
            if let Some(pb) = pb {
                pb.set_position(chunk.last_line as u64);
            }
            let done = chunk.done;
            let pending: u64 = self.shards.iter().map(Pipeline::pending_messages).sum();
            if pending >= self.batch_size || (done && pending > 0) {
                self.flush(&mut summary)?;
            }
            let _ = recycle.send(chunk);
            if done {
                break;
            }
            stop_asked = stop_asked || crate::driver::poll_now(shutdown.as_mut()).is_some();
            if stop_asked {
                // What is pending is written, so that the next run resumes after it.
                self.flush(&mut summary)?;
                summary.interrupted = true;
                break;
            }
        }
        self.parent.join(self.shards)?;
        Ok(summary)
    }

    /// Decodes a chunk on every core and hands each shard its lines; every
    /// shard's position moves past the chunk, also one with no line in it,
    /// so that a resumed replay starts after the chunk.
    fn ingest(&mut self, chunk: &Chunk) -> Result<(), StoreError> {
        let by_shard = decode_by_shard(&self.pool, chunk, &self.topic, self.count);
        let (now, last_line) = (now_ms(), chunk.last_line);
        let ingest = |p: &mut Pipeline, (shard, slices): (i32, Vec<Vec<Decoded>>)| {
            p.ingest_decoded(slices.into_iter().flatten(), now)?;
            p.advance_to(shard, last_line);
            Ok::<_, StoreError>(())
        };
        on_shards(&self.pool, &mut self.shards, (0..).zip(by_shard).collect(), ingest).into_iter().collect()
    }

    /// Writes every shard's pending batch ([`flush_shards`]).
    fn flush(&mut self, summary: &mut RunSummary) -> Result<(), StoreError> {
        flush_shards(&self.pool, &mut self.shards, summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gen::GenSpec;
    use std::collections::BTreeMap;

    /// The name a new input's positions are kept under.
    fn path_topic(input: &Path) -> String {
        format!("file:{}", input.canonicalize().unwrap().display())
    }

    fn bills(path: &Path) -> BTreeMap<String, String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<crate::billing::BillRecord>(l).unwrap())
            .map(|r| (r.key(), r.content_hash))
            .collect()
    }

    /// The bills of the pure core for a generated history (dedupe on or off).
    fn core_bills(spec: &GenSpec, dedupe: bool) -> BTreeMap<String, String> {
        use crate::billing::reference::{aggregate_messages, bills};
        let rules = crate::billing::Rules::default();
        let mut msgs = Vec::new();
        crate::gen::events(spec, |m| msgs.push(m.payload));
        let table: BTreeMap<_, _> = crate::gen::accounts(spec.accounts, spec.seed)
            .iter()
            .map(|m| crate::billing::decode_account(&m.payload).unwrap())
            .map(|a| (a.account_id.clone(), a))
            .collect();
        let ledger = if dedupe {
            aggregate_messages(msgs.iter().map(Vec::as_slice), &rules).ledger
        } else {
            // Without dedupe every repeat is billed.
            let mut ledger = crate::billing::reference::Ledger::new();
            for (e, m) in msgs.iter().filter_map(|m| crate::billing::reference::decode_and_classify(m).ok()) {
                crate::billing::reference::ingest(&mut ledger, &e, &m, &rules);
            }
            ledger
        };
        bills(&ledger, &table, &rules)
            .into_iter()
            .map(|b| (format!("{}/{}", b.content.account_id, b.content.month), b.content_hash))
            .collect()
    }

    /// Every replay has 16 shards whatever its threads, and gives the
    /// core's bills; one stopped after some shards wrote their first batch
    /// and others did not (as a crash between the shards' writes leaves it)
    /// resumes each shard from its own position, on another thread count:
    /// every line counted once (dedupe off, so a line read twice would be
    /// billed twice), every malformed line dead-lettered once, the core's
    /// bills; a state directory from before replays were sharded (a
    /// partition-0 position, no recorded count) goes on with one shard.
    /// A checked configuration over a state directory `state` under `dir`.
    fn file_config(dir: &Path, state: &str, threads: usize, dedupe: bool) -> Checked {
        let mut cfg = Config::default();
        cfg.worker.state_dir = dir.join(state);
        cfg.worker.file_batch_size = 1_000;
        cfg.worker.threads = threads;
        cfg.worker.dedupe = dedupe;
        cfg.checked().unwrap()
    }

    /// As a crash between the shards' writes leaves it: the first chunk of
    /// `input` ingested by every shard, written by the even shards only.
    /// Returns what they wrote and the chunk's last line.
    fn write_the_even_shards(cfg: &Checked, input: &Path, accounts: &Path) -> (BatchStats, i64) {
        let store = Arc::new(Store::open(&cfg.worker.state_dir).unwrap());
        let settings = file_settings(cfg, path_topic(input), &Accounts::File(accounts.to_path_buf()));
        let topic = settings.input_topic.clone();
        let mut pipeline = Pipeline::new(store.clone(), cfg.rules().clone(), settings, Metrics::new()).unwrap();
        load_accounts_file(&mut pipeline, accounts).unwrap();
        let count = shard_count(&store, &topic, FILE_SHARDS).unwrap();
        let mut shards = pipeline.split(count).unwrap();
        let (chunks, _recycle) = read_chunks(open_input(input).unwrap(), 1_000, 0);
        let chunk = chunks.recv().unwrap().unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (i, slices) in decode_by_shard(&pool, &chunk, &topic, count).into_iter().enumerate() {
            shards[i].ingest_decoded(slices.into_iter().flatten(), now_ms()).unwrap();
            shards[i].advance_to(i as i32, chunk.last_line);
        }
        let mut written = BatchStats::default();
        for i in (0..count as usize).step_by(2) {
            let s = shards[i].flush().unwrap();
            written.billed += s.billed;
            written.rejected += s.rejected;
        }
        let positions = store.partitions(&topic).unwrap();
        assert_eq!(positions.keys().copied().collect::<Vec<_>>(), (0..count as i32).step_by(2).collect::<Vec<_>>());
        assert!(positions.values().all(|p| p.next_offset == chunk.last_line));
        (written, chunk.last_line)
    }

    #[tokio::test]
    async fn a_sharded_replay_resumes_each_shard_from_its_own_position() {
        let dir = tempfile::tempdir().unwrap();
        let spec = GenSpec {
            events: 6_000,
            accounts: 50,
            skew: 1.0,
            start_ms: 1_603_123_200_000,
            days: 40,
            duplicates: 0.03,
            malformed: 0.01,
            seed: 11,
        };
        let input = dir.path().join("events.ndjson");
        let truth = crate::traffic::write_file(&input, &spec).unwrap();
        let accounts = crate::traffic::accounts_file_for(&input);
        crate::traffic::write_accounts_file(&accounts, &spec).unwrap();
        let config = |state: &str, threads: usize, dedupe: bool| file_config(dir.path(), state, threads, dedupe);
        let with_dedupe = core_bills(&spec, true);
        for threads in [1, 3] {
            let out = dir.path().join(format!("bills-{threads}.ndjson"));
            let cfg = config(&format!("clean-{threads}"), threads, true);
            let s = replay_file(&cfg, &input, Accounts::File(accounts.clone()), Sink::File(out.clone()), false, std::future::pending())
                .await
                .unwrap();
            assert_eq!((s.billed, s.duplicates, s.rejected), (truth.unique_events, truth.duplicates, truth.malformed));
            let store = Store::open(&cfg.worker.state_dir).unwrap();
            let topic = path_topic(&input);
            let positions = store.partitions(&topic).unwrap();
            assert_eq!(positions.len(), FILE_SHARDS as usize, "one position per shard, {threads} threads");
            assert!(positions.values().all(|p| p.next_offset == truth.messages as i64), "every shard past the last line");
            assert_eq!(bills(&out), with_dedupe, "{threads} threads");
        }

        // Dedupe off: the first chunk ingested by every shard; the even
        // shards write it, the odd ones do not.
        let cfg = config("crashed", 2, false);
        let (written, chunk_lines) = write_the_even_shards(&cfg, &input, &accounts);
        assert!(written.billed > 0 && written.billed < chunk_lines as u64);
        let out = dir.path().join("bills-crashed.ndjson");
        // Resumed on 5 threads: the count stays 16.
        let cfg = config("crashed", 5, false);
        let s = replay_file(&cfg, &input, Accounts::File(accounts.clone()), Sink::File(out.clone()), false, std::future::pending())
            .await
            .unwrap();
        let lines = truth.unique_events + truth.duplicates;
        assert_eq!((written.billed + s.billed, s.duplicates, written.rejected + s.rejected), (lines, 0, truth.malformed));
        assert_eq!(bills(&out), core_bills(&spec, false));
        let dead = std::fs::read_to_string(format!("{}.dead-letters", out.display())).unwrap();
        assert_eq!(dead.lines().count() as u64, truth.malformed, "each malformed line dead-lettered once");
        let topic = path_topic(&input);
        assert_eq!(Store::open(&cfg.worker.state_dir).unwrap().partitions(&topic).unwrap().len(), FILE_SHARDS as usize);

        // A directory from before sharding: partition 0 only, no count.
        legacy_directory_goes_on_with_one_shard(&config("legacy", 3, true), &input, &accounts, truth.unique_events, &with_dedupe).await;
    }

    /// A state directory from before sharding (a partition-0 position, no
    /// recorded count) replays `input` with one shard.
    async fn legacy_directory_goes_on_with_one_shard(
        cfg: &Checked,
        input: &Path,
        accounts: &Path,
        unique_events: u64,
        with_dedupe: &BTreeMap<String, String>,
    ) {
        let topic = path_topic(input);
        {
            let store = Store::open(&cfg.worker.state_dir).unwrap();
            let mut batch = store.batch();
            batch.put_partition(&topic, 0, crate::store::PartitionState::default());
            store.write(batch).unwrap();
        }
        let out = cfg.worker.state_dir.with_extension("bills.ndjson");
        let s = replay_file(cfg, input, Accounts::File(accounts.to_path_buf()), Sink::File(out.clone()), false, std::future::pending())
            .await
            .unwrap();
        assert_eq!(s.billed, unique_events);
        assert_eq!(&bills(&out), with_dedupe);
        assert_eq!(Store::open(&cfg.worker.state_dir).unwrap().partitions(&topic).unwrap().keys().copied().collect::<Vec<_>>(), vec![0]);
    }
}
