//! Usage alerts at emission (rule book section 12): which alerts a
//! recomputed bill shows crossed, which of those were never emitted, and
//! their records. Each identity goes out once: `emit::stage` writes its
//! record, its identity and a changelog record in the bills' batch.

use super::context::Context;
use crate::billing::alerts::{crossings, spend_lines, AlertKind};
use crate::billing::calendar::Month;
use crate::billing::entitlements::PackSource;
use crate::billing::usage::MonthUsage;
use crate::billing::{AccountRecord, Bill, PackItem};
use crate::store::{alert_key, OutboxRecord, StoreError};
use std::collections::BTreeMap;

/// An alert to emit: its identity ([`alert_key`]), its record, its kind,
/// and the input partition of its account (whose changelog carries it).
#[derive(Debug)]
pub struct AlertOut {
    pub(super) key: Vec<u8>,
    pub(super) record: OutboxRecord,
    pub(super) kind: AlertKind,
    pub(super) partition: i32,
}

/// The code of an alert kind in its identity ([`alert_key`]).
fn alert_code(kind: AlertKind) -> u8 {
    match kind {
        AlertKind::FreeTierExhausted => 1,
        AlertKind::PackExhausted => 2,
        AlertKind::SpendThreshold => 3,
    }
}

/// The alerts a bill shows crossed (rule book section 12), without
/// their hours: the month's free tier of an item used up, a pack whose
/// deductions through this month reach its quantity (with `all`, the
/// account's bills, when it has packs), and the spend lines the total
/// reaches. Cheap: read off the bill, no walk.
pub(super) fn candidates(cx: &Context, record: Option<&AccountRecord>, bill: &Bill, all: Option<&[Bill]>) -> Vec<(AlertKind, String)> {
    let rules = &cx.rules;
    let mut out = Vec::new();
    if let Some(ft) = &rules.free_tier {
        for d in bill.content.deductions.iter().filter(|d| d.source == PackSource::FreeTier) {
            let allowance = match d.item {
                PackItem::Calls => ft.calls_per_month,
                PackItem::PublicOutBytes => ft.public_out_bytes_per_month,
            };
            if allowance > 0 && d.quantity >= allowance {
                out.push((AlertKind::FreeTierExhausted, d.item.as_str().to_string()));
            }
        }
    }
    if let (Some(r), Some(all)) = (record, all) {
        for p in r.resource_packs.iter().filter(|p| p.quantity > 0) {
            let of = |b: &Bill| {
                b.content
                    .deductions
                    .iter()
                    .filter(|d| d.pack_id == p.id && d.source == PackSource::Purchase)
                    .map(|d| d.quantity)
                    .sum::<u64>()
            };
            let this = of(bill);
            let through: u64 = all.iter().filter(|b| b.month <= bill.month).map(of).sum();
            if this > 0 && through >= p.quantity && through - this < p.quantity {
                out.push((AlertKind::PackExhausted, p.id.clone()));
            }
        }
    }
    for line in spend_lines(rules, record) {
        if bill.content.total_amount >= line {
            out.push((AlertKind::SpendThreshold, line.to_string()));
        }
    }
    out
}

/// The alerts of `candidates` not emitted before (one multi-get of
/// their identities), each placed in its hour by the walk
/// ([`crossings`], run only when one is new) and made a record: found
/// by the bill of `revision`, to go out keyed by the account.
#[allow(clippy::too_many_arguments)]
pub(super) fn new_alerts(
    cx: &Context,
    account: &str,
    month: Month,
    record: Option<&AccountRecord>,
    months: &BTreeMap<Month, MonthUsage>,
    candidates: Vec<(AlertKind, String)>,
    revision: u64,
    partition: i32,
) -> Result<Vec<AlertOut>, StoreError> {
    let keys: Vec<Vec<u8>> = candidates.iter().map(|(kind, subject)| alert_key(account, month, alert_code(*kind), subject)).collect();
    let emitted = cx.store.alerts_emitted(&keys)?;
    if emitted.iter().all(|e| *e) {
        return Ok(Vec::new());
    }
    let rules = &cx.rules;
    let walk = crossings(record, months, rules, &spend_lines(rules, record));
    let mut out = Vec::new();
    for (((kind, subject), key), _) in candidates.into_iter().zip(keys).zip(emitted).filter(|(_, e)| !e) {
        let Some(c) = walk.iter().find(|c| c.month == month && c.kind == kind && c.subject == subject) else { continue };
        let hour = rules.calendar.local_rfc3339(c.hour);
        let mut fields = serde_json::json!({
            "account_id": account,
            "month": month.to_string(),
            "time_zone": rules.time_zone,
            "kind": kind.as_str(),
            "subject": subject,
            "hour": hour,
            "revision": revision,
        });
        match kind {
            AlertKind::FreeTierExhausted => fields["item"] = subject.clone().into(),
            AlertKind::PackExhausted => {
                let item = record.and_then(|r| r.resource_packs.iter().find(|p| p.id == subject)).map(|p| p.item.as_str());
                fields["pack_id"] = subject.clone().into();
                fields["item"] = item.into();
            }
            AlertKind::SpendThreshold => {
                fields["threshold"] = subject.clone().into();
                fields["currency"] = rules.version(month).prices.currency.clone().into();
            }
        }
        let payload = serde_json::to_vec(&fields).expect("an alert serializes");
        let record = OutboxRecord {
            topic: cx.settings.alerts_topic.clone(),
            key: Some(account.as_bytes().to_vec()),
            payload,
            headers: vec![],
            partition: None,
        };
        out.push(AlertOut { key, record, kind, partition });
    }
    Ok(out)
}
