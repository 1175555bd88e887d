//! Delivery to NDJSON files (`replay --output-file`): a step's records are
//! appended to the files and synced, then the step is written. A crash in
//! between writes the same records again at the next run, as a crash
//! between producing and acknowledging an outbox record would.

use super::position::Outcome;
use crate::driver::WorkerError;
use crate::pipeline::{Pipeline, Staged};
use crate::store::OutboxRecord;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bills to one file, usage alerts to `<file>.alerts`, dead letters to
/// `<file>.dead-letters`.
pub struct FileDelivery {
    out: PathBuf,
    bills_topic: String,
    alerts_topic: String,
}

impl FileDelivery {
    /// Bills (records of `bills_topic`) to `out`, alerts (of
    /// `alerts_topic`) to `<out>.alerts`, every other record to
    /// `<out>.dead-letters`.
    pub fn new(out: PathBuf, bills_topic: String, alerts_topic: String) -> Self {
        FileDelivery { out, bills_topic, alerts_topic }
    }

    /// Writes a staged step's records, then the step.
    pub(super) fn commit(&self, mut staged: Staged<'_>) -> Result<Outcome, WorkerError> {
        self.write(staged.take_records().iter())?;
        Ok(Outcome::Committed(staged.apply()?))
    }

    /// Writes the outbox to the files a page at a time (memory stays
    /// bounded however many records); returns 0 (a failed write is an
    /// error: the records stay in the outbox).
    pub(super) async fn drain(&self, pipeline: &mut Pipeline) -> Result<u64, WorkerError> {
        let drained = pipeline
            .drain_outbox(|page| {
                let written = self.write(page.iter().map(|(_, r)| r)).map(|()| page);
                std::future::ready(written)
            })
            .await?;
        Ok(drained.failed)
    }

    fn write<'a>(&self, records: impl Iterator<Item = &'a OutboxRecord>) -> Result<(), WorkerError> {
        write_files(&self.out, records, &self.bills_topic, &self.alerts_topic)
            .map_err(|source| WorkerError::Input { path: self.out.clone(), source })
    }
}

/// Standard base64 (RFC 4648, with padding): how a file replay's dead
/// letter carries bytes that are not UTF-8.
pub fn base64(bytes: &[u8]) -> String {
    base64::Engine::encode(&base64::engine::general_purpose::STANDARD, bytes)
}

/// Writes records to NDJSON files and syncs them: bills and alerts as
/// they are, dead letters as `{"headers": {..}, "payload": "<text>"}`, or with
/// `"payload_base64"` instead of `"payload"` when the bytes are not UTF-8.
fn write_files<'a>(
    out: &Path,
    records: impl Iterator<Item = &'a OutboxRecord>,
    bills_topic: &str,
    alerts_topic: &str,
) -> std::io::Result<()> {
    let dead_path = PathBuf::from(format!("{}.dead-letters", out.display()));
    let open = |p: &Path| std::fs::OpenOptions::new().create(true).append(true).open(p);
    let mut bills = std::io::BufWriter::new(open(out)?);
    let mut dead = std::io::BufWriter::new(open(&dead_path)?);
    let mut alerts = std::io::BufWriter::new(open(&alerts_path(out))?);
    for r in records {
        if r.topic == bills_topic || r.topic == alerts_topic {
            let to = if r.topic == bills_topic { &mut bills } else { &mut alerts };
            to.write_all(&r.payload)?;
            to.write_all(b"\n")?;
        } else {
            serde_json::to_writer(&mut dead, &dead_letter_line(r))?;
            dead.write_all(b"\n")?;
        }
    }
    bills.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    alerts.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    dead.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    Ok(())
}

/// Where a file replay writing bills to `out` writes its usage alerts.
fn alerts_path(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.alerts", out.display()))
}

/// A dead letter's line: its headers, and its exact bytes, as text when
/// they are UTF-8, else in base64 under another name (never U+FFFD in
/// place of a byte).
fn dead_letter_line(r: &OutboxRecord) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> =
        r.headers.iter().map(|(k, v)| (k.clone(), String::from_utf8_lossy(v).into_owned().into())).collect();
    match std::str::from_utf8(&r.payload) {
        Ok(text) => serde_json::json!({ "headers": headers, "payload": text }),
        Err(_) => serde_json::json!({ "headers": headers, "payload_base64": base64(&r.payload) }),
    }
}
