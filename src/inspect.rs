//! `gatebill inspect`: the latest revision of every bill on the output
//! topic, as a table or JSON lines, optionally following new records.

use crate::billing::{BillRecord, BillStatus};
use crate::config::KafkaConfig;
use crate::kafka::{self, KafkaSetupError};
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::Message;
use std::collections::BTreeMap;
use std::time::Duration;

/// Which bills to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this account.
    pub account: Option<String>,
    /// Only this month, `YYYY-MM`.
    pub month: Option<String>,
    /// Only this status.
    pub status: Option<BillStatus>,
}

impl Filter {
    /// Whether a record passes.
    pub fn accepts(&self, r: &BillRecord) -> bool {
        self.account.as_ref().is_none_or(|a| *a == r.content.account_id)
            && self.month.as_ref().is_none_or(|m| *m == r.content.month)
            && self.status.is_none_or(|s| s == r.status)
    }
}

/// Latest bill per key, read from a topic.
#[derive(Debug, Default)]
pub struct BillTable {
    /// Key -> latest revision.
    pub latest: BTreeMap<String, BillRecord>,
    /// Records that did not parse as bills.
    pub unreadable: u64,
    /// Bill records read, every one counted (repeats and older revisions too).
    pub records: u64,
    /// Records that repeat the revision already held for their key (a
    /// record delivered twice).
    pub repeats: u64,
}

impl BillTable {
    /// Takes a record if it is newer than what is held. Returns it if so.
    pub fn offer(&mut self, payload: &[u8]) -> Option<&BillRecord> {
        let Ok(r) = serde_json::from_slice::<BillRecord>(payload) else {
            self.unreadable += 1;
            return None;
        };
        self.records += 1;
        let key = r.key();
        if let Some(old) = self.latest.get(&key) {
            if old.revision == r.revision {
                self.repeats += 1;
            }
            if old.revision >= r.revision {
                return None;
            }
        }
        self.latest.insert(key.clone(), r);
        self.latest.get(&key)
    }
}

/// A consumer positioned at the beginning of every partition of `topic`,
/// with the end offsets seen now ([`kafka::assign_to_end`]); a topic that
/// does not exist is an error ([`kafka::require_topic`]).
pub fn open(k: &KafkaConfig, topic: &str) -> Result<(BaseConsumer, BTreeMap<i32, i64>), KafkaSetupError> {
    let consumer = kafka::plain_consumer(k, "gatebill-inspect")?;
    kafka::require_topic(&consumer, &k.brokers, topic)?;
    let (ends, _) = kafka::assign_to_end(&consumer, topic, |_, low, _| Ok::<_, KafkaSetupError>(low))?;
    Ok((consumer, ends))
}

/// Reads `topic` from the beginning to the end offsets seen at start (or
/// until no record came for `idle`) into `table`; returns what was read.
pub fn read_to_end(consumer: &BaseConsumer, ends: BTreeMap<i32, i64>, table: &mut BillTable, idle: Duration) -> kafka::ReadToEnd {
    let read = kafka::read_to_end(consumer, ends, idle, |m| {
        if let Some(p) = m.payload() {
            table.offer(p);
        }
        Ok::<_, std::convert::Infallible>(())
    });
    let Ok(read) = read;
    read
}

/// Renders alert records as a table: account, month, kind, what about,
/// the hour it happened in, the bill revision that found it.
pub fn render_alerts(alerts: &[serde_json::Value]) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header(["account", "month", "kind", "about", "hour", "bill revision"]);
    let text = |v: &serde_json::Value| printable(v.as_str().unwrap_or("?")).into_owned();
    for a in alerts {
        let about = match a["kind"].as_str() {
            Some("spend_threshold") => format!("{} {}", text(&a["threshold"]), text(&a["currency"])),
            _ => text(&a["subject"]),
        };
        t.add_row([text(&a["account_id"]), text(&a["month"]), text(&a["kind"]), about, text(&a["hour"]), a["revision"].to_string()]);
    }
    t
}

/// Renders bills as a table.
pub fn render_table<'a>(records: impl IntoIterator<Item = &'a BillRecord>) -> comfy_table::Table {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_FULL_CONDENSED);
    t.set_header([
        "account",
        "month",
        "rev",
        "status",
        "calls",
        "free/pack calls",
        "chargeable calls",
        "public out",
        "chargeable out",
        "total",
        "hash",
    ]);
    for r in records {
        let c = &r.content;
        let deducted: u64 = c.deductions.iter().filter(|d| d.item == crate::billing::PackItem::Calls).map(|d| d.quantity).sum();
        t.add_row([
            printable(&c.account_id).into_owned(),
            printable(&c.month).into_owned(),
            r.revision.to_string(),
            r.status.as_str().to_string(),
            c.usage.calls.to_string(),
            deducted.to_string(),
            c.chargeable.calls.to_string(),
            human_bytes(c.usage.public_out_bytes),
            human_bytes(c.chargeable.public_out_bytes),
            format!("{} {}", c.total_amount, printable(&c.currency)),
            printable(&r.content_hash.trim_start_matches("sha256:").chars().take(12).collect::<String>()).into_owned(),
        ]);
    }
    t
}

/// `s` safe to print on a terminal: control characters (C0, DEL, C1: an
/// ESC starting `ESC[2J`, which clears the screen, or a carriage return
/// that overwrites a line) and the Unicode bidirectional overrides (which
/// reorder what follows) are written as Rust escapes (`\u{1b}`, `\r`,
/// `\u{202e}`); a backslash becomes `\\`, so an escape in the output always
/// means a character that was escaped. Anything else is unchanged (JSON
/// output needs none of this: serde escapes control characters itself).
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| c == '\\' || c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !s.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Bytes in binary units, e.g. `1.50 GiB`.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}
