//! Metrics (Prometheus text at `/metrics`) and liveness (`/healthz`). The
//! names live here, outside the pipeline logic.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::sync::Arc;
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

/// Serves `/metrics` and `/healthz` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, ctype, body) = match path {
                "/metrics" => ("200 OK", "text/plain; version=0.0.4", metrics.render()),
                "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
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
