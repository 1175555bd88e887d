//! Metrics (Prometheus text at `/metrics`) and liveness (`/healthz`). The
//! names live here, outside the pipeline logic.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// CPU seconds (user and system, every thread) this process has used, from
/// `/proc/self/stat` (10 ms resolution); `None` where that is not readable.
pub fn process_cpu_seconds() -> Option<f64> {
    cpu_seconds_of_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

fn cpu_seconds_of_stat(stat: &str) -> Option<f64> {
    // The command name (field 2) is parenthesised and may hold spaces;
    // utime and stime are fields 14 and 15, in USER_HZ (100 on Linux).
    let mut fields = stat.get(stat.rfind(')')? + 2..)?.split(' ');
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// CPU microseconds per item spent since `cpu_before` ([`process_cpu_seconds`]),
/// for logs, to 0.1 µs: `None` without a reading or items.
pub fn cpu_us_per(cpu_before: Option<f64>, items: u64) -> Option<f64> {
    cpu_us_per_item(cpu_before?, process_cpu_seconds()?, items)
}

/// CPU microseconds per item between two readings, to 0.1 µs (the readings
/// have 10 ms resolution: more digits would be noise, and their
/// difference's binary rounding shows as `559.9999999999997`).
fn cpu_us_per_item(before: f64, after: f64, items: u64) -> Option<f64> {
    (items > 0).then(|| rounded((after - before) * 1e6 / items as f64, 1))
}

/// `x` rounded to `decimals` decimal places, for log fields (a duration
/// logs as `seconds=1.234`, not `seconds=1.2340005671`).
pub fn rounded(x: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (x * scale).round() / scale
}

/// A progress bar's `{rate}` key: whole messages (or lines) per second
/// ([`per_second`]), not indicatif's `{per_sec}` with four decimals.
pub fn progress_rate(s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write) {
    let _ = w.write_str(&per_second(s.per_sec()));
}

/// A whole number with commas between thousands: `1,097,528`.
pub fn thousands(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A rate for people: whole items per second, `1,097,528/s` (not
/// indicatif's `1,097,527.7224/s`).
pub fn per_second(rate: f64) -> String {
    let whole = if rate.is_finite() && rate > 0.0 { rate.round() as u64 } else { 0 };
    format!("{}/s", thousands(whole))
}

/// Every metric the worker exports.
pub struct Metrics {
    /// The registry `/metrics` renders.
    pub registry: Registry,
    /// Input messages read.
    pub events_consumed: IntCounter,
    /// Events added to usage.
    pub events_billed: IntCounter,
    /// Messages sent to the dead-letter topic, by reason code.
    pub rejected: IntCounterVec,
    /// Events dropped as repeated request_ids.
    pub duplicates: IntCounter,
    /// Events for a month whose bill was already final.
    pub late_events: IntCounter,
    /// Bill records emitted, by status.
    pub bills_emitted: IntCounterVec,
    /// Usage alerts emitted, by kind.
    pub alerts_emitted: IntCounterVec,
    /// Seconds per synced RocksDB batch write.
    pub batch_write_seconds: Histogram,
    /// Seconds from producing a set of records to their acknowledgement.
    pub produce_seconds: Histogram,
    /// Records waiting in the outbox.
    pub outbox_pending: IntGauge,
    /// Bytes of request-id hashes the dedupe mirror holds in memory, about.
    pub dedupe_memory: IntGauge,
    /// Dedupe buckets' hash sets read from the state store (first use, or
    /// next use after they left memory).
    pub dedupe_reads: IntCounter,
    /// Bytes of those reads.
    pub dedupe_read_bytes: IntCounter,
    /// Messages behind the partition's end, by partition.
    pub partition_lag: IntGaugeVec,
    /// Estimated live state bytes, by column family.
    pub state_bytes: IntGaugeVec,
    /// Memory RocksDB holds, by kind (`memtables`, `block_cache`,
    /// `table_readers`).
    pub rocksdb_memory: IntGaugeVec,
    /// Input messages read again below the partition's stored position
    /// (skipped as already processed), by partition.
    pub input_reread: IntCounterVec,
    /// Changelog records read to restore a partition moved here, by partition.
    pub restore_records: IntCounterVec,
    /// Kafka transactions by outcome (`committed`, `aborted`, `fenced`,
    /// `unusable`: the abort failed).
    pub transactions: IntCounterVec,
    /// Records produced and acknowledged (committed, with transactions), by
    /// topic: the output rate `worker.provisional_interval_secs` bounds.
    pub records_produced: IntCounterVec,
    /// Changelog bytes (keys and values) read to restore, by partition.
    pub restore_bytes: IntCounterVec,
    /// Seconds the last restore of a partition took, by partition.
    pub restore_seconds: prometheus::GaugeVec,
    /// Partitions being restored right now.
    pub partitions_restoring: IntGauge,
}

impl Metrics {
    /// Builds and registers every metric.
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new_custom(Some("gatebill".into()), None).expect("valid prefix");
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique metric");
            c
        };
        let histogram = |name: &str, help: &str| {
            let buckets = prometheus::exponential_buckets(0.0005, 2.0, 16).expect("valid buckets");
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique metric");
            h
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique metric");
            g
        };
        let m = Metrics {
            events_consumed: counter("events_consumed_total", "Input messages read"),
            events_billed: counter("events_billed_total", "Events added to usage"),
            rejected: counter_vec("events_rejected_total", "Messages sent to the dead-letter topic", "reason"),
            duplicates: counter("duplicates_total", "Events dropped as repeated request_ids"),
            dedupe_reads: counter(
                "dedupe_bucket_reads_total",
                "Dedupe buckets' request-id sets read from the state store: first use since the start, or next use after leaving memory",
            ),
            dedupe_read_bytes: counter("dedupe_bucket_read_bytes_total", "Bytes of request-id hashes read by dedupe_bucket_reads_total"),
            late_events: counter(
                "late_events_total",
                "Events for a month that had already closed (month end plus grace behind the partition watermark) when they arrived",
            ),
            bills_emitted: counter_vec("bills_emitted_total", "Bill records emitted", "status"),
            alerts_emitted: counter_vec("alerts_emitted_total", "Usage alerts emitted (each identity once)", "kind"),
            batch_write_seconds: histogram("batch_write_seconds", "Seconds per synced RocksDB batch write"),
            produce_seconds: histogram("produce_seconds", "Seconds from producing records to their acknowledgement"),
            outbox_pending: {
                let g = IntGauge::new("outbox_pending", "Records waiting in the outbox").expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            dedupe_memory: {
                let g = IntGauge::new(
                    "dedupe_memory_bytes",
                    "Request-id hashes the dedupe mirror holds in memory after the last batch, bytes (about): at most worker.dedupe_memory_mb, or what the last 8 batches used if more",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            partition_lag: gauge_vec("partition_lag", "Messages behind the partition's end", "partition"),
            state_bytes: gauge_vec("state_bytes", "Estimated live state bytes", "column_family"),
            rocksdb_memory: gauge_vec(
                "rocksdb_memory_bytes",
                "Memory RocksDB holds: memtables (all column families together, at most worker.memtable_mb), the shared block cache (at most worker.block_cache_mb), table readers",
                "kind",
            ),
            input_reread: counter_vec(
                "input_reread_total",
                "Input messages read again below the partition's stored position (skipped as already processed)",
                "partition",
            ),
            transactions: counter_vec(
                "transactions_total",
                "Kafka transactions (records, changelog and offsets together) by outcome",
                "outcome",
            ),
            records_produced: counter_vec(
                "records_produced_total",
                "Records produced and acknowledged (committed, with transactions), by topic",
                "topic",
            ),
            restore_records: counter_vec("restore_records_total", "Changelog records read to restore a partition moved here", "partition"),
            restore_bytes: counter_vec("restore_bytes_total", "Changelog bytes read to restore a partition moved here", "partition"),
            restore_seconds: {
                let g =
                    prometheus::GaugeVec::new(Opts::new("restore_seconds", "Seconds the last restore of a partition took"), &["partition"])
                        .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            partitions_restoring: {
                let g =
                    IntGauge::new("partitions_restoring", "Partitions being restored from the changelog right now").expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique metric");
                g
            },
            registry,
        };
        for r in crate::billing::RejectReason::ALL {
            m.rejected.with_label_values(&[r.code()]);
        }
        Arc::new(m)
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }
}

/// Transactions aborted in a row (no commit between them) past which the
/// worker is not healthy: a transaction that cannot commit (a record the
/// broker refuses, a producer in trouble) is retried with the same batch,
/// and one abort alone is a retry, not a stall.
pub const UNHEALTHY_ABORTS: u32 = 5;

/// What `/healthz` decides from: written by the worker loop (commits,
/// aborts, lag) and its end-offset reader, read by the endpoint at each
/// request, so a loop that is stuck inside a call still shows as stuck.
#[derive(Debug)]
pub struct Health {
    state: std::sync::Mutex<HealthState>,
    /// `worker.health_stall_secs`.
    stall: Duration,
    /// How often the input's end offsets are read.
    end_offsets_every: Duration,
}

/// The worker's progress as [`Health`] holds it.
#[derive(Clone, Copy, Debug)]
pub struct HealthState {
    /// When the last input batch committed (with transactions; written,
    /// without), or the worker started.
    pub last_commit: Instant,
    /// Messages between the worker's positions and the input's end offsets,
    /// over the partitions it owns, as last measured.
    pub lag: u64,
    /// Since when `lag` has been above 0 without a break (`None`: it is 0).
    pub lag_since: Option<Instant>,
    /// Transactions aborted since the last commit.
    pub aborts_in_a_row: u32,
    /// When the input's end offsets were last read in full; `None` before
    /// the first try.
    pub end_offsets_read: Option<Instant>,
    /// When the reading of end offsets began (the first try).
    pub end_offsets_since: Option<Instant>,
}

impl HealthState {
    /// A worker that started at `now`.
    pub fn started(now: Instant) -> HealthState {
        HealthState { last_commit: now, lag: 0, lag_since: None, aborts_in_a_row: 0, end_offsets_read: None, end_offsets_since: None }
    }
}

/// The health decision, a pure function of the state and the time: `Ok`
/// while the worker makes progress, else why not. Not ok when
/// - `aborts_in_a_row` reached [`UNHEALTHY_ABORTS`];
/// - there has been lag for `stall` and no batch committed in that time;
/// - the input's end offsets could not be read for `stall` plus one
///   reading interval (the broker is unreachable: the lag is unknown).
pub fn health_verdict(s: &HealthState, now: Instant, stall: Duration, end_offsets_every: Duration) -> Result<(), String> {
    let secs = |d: Duration| d.as_secs();
    if s.aborts_in_a_row >= UNHEALTHY_ABORTS {
        return Err(format!(
            "{} transactions aborted in a row, none committed since: the batch cannot be delivered (see the log's \"transaction aborted\" lines)",
            s.aborts_in_a_row
        ));
    }
    if let Some(since) = s.lag_since {
        let stalled_since = since.max(s.last_commit);
        let stalled = now.saturating_duration_since(stalled_since);
        if s.lag > 0 && stalled >= stall {
            return Err(format!(
                "no batch committed for {} s while {} messages wait (lag; worker.health_stall_secs = {})",
                secs(now.saturating_duration_since(s.last_commit)),
                s.lag,
                secs(stall)
            ));
        }
    }
    if let Some(since) = s.end_offsets_since {
        let read = s.end_offsets_read.unwrap_or(since);
        let unread = now.saturating_duration_since(read);
        if unread >= stall + end_offsets_every {
            return Err(format!(
                "the input topic's end offsets could not be read for {} s: the broker is unreachable or not answering, so progress is unknown",
                secs(unread)
            ));
        }
    }
    Ok(())
}

impl Health {
    /// The health of a worker starting now.
    pub fn new(stall: Duration, end_offsets_every: Duration) -> Arc<Health> {
        Arc::new(Health { state: std::sync::Mutex::new(HealthState::started(Instant::now())), stall, end_offsets_every })
    }

    fn update(&self, f: impl FnOnce(&mut HealthState)) {
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// An input batch committed: progress.
    pub fn batch_committed(&self) {
        self.update(|s| {
            s.last_commit = Instant::now();
            s.aborts_in_a_row = 0;
        });
    }

    /// Some other transaction (an emission) committed: the broker takes
    /// transactions again.
    pub fn other_committed(&self) {
        self.update(|s| s.aborts_in_a_row = 0);
    }

    /// A transaction aborted.
    pub fn aborted(&self) {
        self.update(|s| s.aborts_in_a_row = s.aborts_in_a_row.saturating_add(1));
    }

    /// The lag measured now, over the partitions owned.
    pub fn set_lag(&self, lag: u64) {
        self.update(|s| {
            s.lag = lag;
            s.lag_since = if lag == 0 { None } else { Some(s.lag_since.unwrap_or_else(Instant::now)) };
        });
    }

    /// The end-offset reader tries (`ok`: read every partition's end).
    pub fn end_offsets_tried(&self, ok: bool) {
        self.update(|s| {
            let now = Instant::now();
            s.end_offsets_since.get_or_insert(now);
            if ok {
                s.end_offsets_read = Some(now);
            }
        });
    }

    /// The decision now ([`health_verdict`]).
    pub fn verdict(&self) -> Result<(), String> {
        let s = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        health_verdict(&s, Instant::now(), self.stall, self.end_offsets_every)
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped:
/// `/healthz` answers 200 `ok` while [`Health::verdict`] is ok, else 503
/// `not ok: <why>`.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, health: Arc<Health>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        let health = health.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" => match health.verdict() {
                    Ok(()) => ("200 OK", "text/plain", "ok\n".to_string()),
                    Err(why) => ("503 Service Unavailable", "text/plain", format!("not ok: {why}\n")),
                },
                _ => ("404 Not Found", "text/plain", "try /metrics or /healthz\n".to_string()),
            };
            let head = format!("HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cpu_seconds_come_from_utime_and_stime_whatever_the_command_name() {
        let stat = "4242 (gate bill) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 100 1000 200";
        assert_eq!(cpu_seconds_of_stat(stat), Some(3.0));
        assert_eq!(cpu_seconds_of_stat("4242 (short) S 1"), None);
        // This process: readable, and it moves when the process works.
        let before = process_cpu_seconds().expect("/proc/self/stat is readable on Linux");
        let started = std::time::Instant::now();
        let mut x = 0u64;
        while process_cpu_seconds().unwrap() < before + 0.05 && started.elapsed().as_secs() < 30 {
            for i in 0..100_000u64 {
                x = x.wrapping_mul(31).wrapping_add(i);
            }
            std::hint::black_box(x);
        }
        assert!(process_cpu_seconds().unwrap() >= before + 0.05, "50 ms of work did not show in /proc/self/stat");
    }

    use super::*;

    #[test]
    fn health_is_not_ok_without_commits_under_lag_or_through_an_abort_loop() {
        let t0 = Instant::now();
        let (stall, every) = (Duration::from_secs(60), Duration::from_secs(15));
        let at = |s: u64| t0 + Duration::from_secs(s);
        let started = HealthState::started(t0);
        // Idle: no lag, no commit for an hour, end offsets read: ok.
        let idle = HealthState { end_offsets_since: Some(t0), end_offsets_read: Some(at(3590)), ..started };
        assert_eq!(health_verdict(&idle, at(3600), stall, every), Ok(()));
        // Lag since 3,550 s after an hour idle: not yet 60 s of it.
        let lagging = HealthState { lag: 1_200, lag_since: Some(at(3550)), ..idle };
        assert_eq!(health_verdict(&lagging, at(3600), stall, every), Ok(()));
        // 60 s of lag without a commit: stalled.
        assert_eq!(
            health_verdict(&lagging, at(3610), stall, every),
            Err("no batch committed for 3610 s while 1200 messages wait (lag; worker.health_stall_secs = 60)".into())
        );
        // A commit 10 s ago under the same lag: progress.
        let committing = HealthState { last_commit: at(3600), ..lagging };
        assert_eq!(health_verdict(&committing, at(3610), stall, every), Ok(()));
        // Four aborts in a row are retries; five are a loop.
        let aborting = HealthState { aborts_in_a_row: 4, ..committing };
        assert_eq!(health_verdict(&aborting, at(3610), stall, every), Ok(()));
        assert_eq!(
            health_verdict(&HealthState { aborts_in_a_row: 5, ..aborting }, at(3610), stall, every),
            Err("5 transactions aborted in a row, none committed since: the batch cannot be delivered (see the log's \"transaction aborted\" lines)".into())
        );
        // The broker gone: no end offsets for 75 s (60 + one 15 s interval).
        assert_eq!(health_verdict(&idle, at(3664), stall, every), Ok(()));
        assert_eq!(
            health_verdict(&idle, at(3665), stall, every),
            Err("the input topic's end offsets could not be read for 75 s: the broker is unreachable or not answering, so progress is unknown".into())
        );
        // Never read since the first try.
        let never = HealthState { end_offsets_since: Some(at(10)), ..started };
        assert_eq!(health_verdict(&never, at(84), stall, every), Ok(()));
        assert!(health_verdict(&never, at(85), stall, every).is_err());
        // Before the first try (the worker still starting): ok.
        assert_eq!(health_verdict(&started, at(600), stall, every), Ok(()));
    }

    #[test]
    fn health_tracks_how_long_lag_lasts() {
        let h = Health::new(Duration::from_secs(60), Duration::from_secs(15));
        h.set_lag(5);
        let since = h.state.lock().unwrap().lag_since.unwrap();
        h.set_lag(7);
        assert_eq!(h.state.lock().unwrap().lag_since, Some(since), "lag since its start, not its last measure");
        h.set_lag(0);
        assert_eq!(h.state.lock().unwrap().lag_since, None);
        h.aborted();
        h.aborted();
        assert_eq!(h.state.lock().unwrap().aborts_in_a_row, 2);
        h.other_committed();
        assert_eq!(h.state.lock().unwrap().aborts_in_a_row, 0);
        assert_eq!(h.verdict(), Ok(()));
    }

    #[test]
    fn log_figures_are_rounded_and_rates_whole() {
        // 0.14 CPU seconds over 250 bills: 559.9999999999997 unrounded.
        assert_eq!((0.69 - 0.55) * 1e6 / 250.0, 559.9999999999997);
        assert_eq!(format!("{:?}", cpu_us_per_item(0.55, 0.69, 250).unwrap()), "560.0");
        assert_eq!(cpu_us_per_item(0.55, 0.69, 0), None);
        assert_eq!(format!("{:?}", rounded(1.234_000_567_1, 3)), "1.234");
        assert_eq!(format!("{:?}", rounded(559.94, 1)), "559.9");
        assert_eq!(per_second(1_097_527.722_4), "1,097,528/s");
        assert_eq!(per_second(999.4), "999/s");
        assert_eq!(per_second(0.0), "0/s");
        assert_eq!(per_second(f64::NAN), "0/s");
        assert_eq!(thousands(300_000), "300,000");
    }

    #[test]
    fn every_reason_code_is_exported_from_the_start() {
        let text = Metrics::new().render();
        for r in crate::billing::RejectReason::ALL {
            let line = format!("gatebill_events_rejected_total{{reason=\"{}\"}} 0", r.code());
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
        assert!(text.contains(r#"reason="future_time""#));
        assert!(text.contains(r#"reason="invalid_resource_pack""#));
    }
}
