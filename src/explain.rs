//! `gatebill explain ACCOUNT MONTH`: reads one account's usage and record
//! from a state directory, opened read-only as a RocksDB secondary instance
//! (no lock: it works beside a running worker, which keeps running, and on
//! a stopped worker's directory), explains the month with the pure core
//! ([`crate::billing::explain`]) and renders it as tables or JSON.

use crate::billing::explain::{explain, Explanation};
use crate::billing::{decode_account, BillStatus, Month, PackItem, Rules};
use crate::inspect::{human_bytes, printable};
use crate::metrics::thousands as n;
use crate::store::{BillState, Store, StoreError};
use comfy_table::Table;
use serde::Serialize;
use std::fmt::Write;
use std::path::Path;

/// Why an account-month cannot be explained.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The state directory cannot be read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No usage for the month in this state directory.
    #[error(
        "no usage of account {account} in {month} in {dir}: check the account id and month (YYYY-MM), and that this is the \
         state directory of the worker that owns the account's partition (with several workers, each holds its own partitions)"
    )]
    NoUsage {
        /// Account.
        account: String,
        /// Month.
        month: Month,
        /// State directory.
        dir: String,
    },
}

/// An explanation with what the worker last emitted for the month.
#[derive(Debug, Serialize)]
pub struct Explained {
    /// The explanation.
    #[serde(flatten)]
    pub explanation: Explanation,
    /// The last emitted revision, if any (its content hash may be older
    /// than this explanation's when usage arrived since).
    pub emitted: Option<Emitted>,
}

/// The last bill revision the worker emitted.
#[derive(Debug, Serialize)]
pub struct Emitted {
    /// Revision.
    pub revision: u64,
    /// Status.
    pub status: BillStatus,
    /// Its content hash.
    pub content_hash: String,
}

/// Explains `month` of `account` from the state directory `dir`.
pub fn from_state_dir(dir: &Path, account: &str, month: Month, rules: &Rules) -> Result<Explained, ExplainError> {
    let store = Store::open_read_only(dir)?;
    let usages = store.account_months(account)?;
    // An unreadable or deleted (empty) record bills as unknown, as the worker does.
    let record = store.account(account)?.and_then(|b| decode_account(&b).ok());
    let explanation = explain(account, record.as_ref(), &usages, month, rules).ok_or_else(|| ExplainError::NoUsage {
        account: account.to_string(),
        month,
        dir: dir.display().to_string(),
    })?;
    let emitted = store.bill_state_many(&[(account, month)])?.pop().flatten().map(|s: BillState| Emitted {
        revision: s.revision,
        status: s.status,
        content_hash: s.content_hash,
    });
    Ok(Explained { explanation, emitted })
}

fn takes(t: &[crate::billing::entitlements::Take]) -> String {
    if t.is_empty() {
        return "-".into();
    }
    t.iter().map(|t| format!("{} {}", printable(&t.pack_id), n(t.quantity))).collect::<Vec<_>>().join("; ")
}

/// The explanation as text: hours, tier starts, charge lines, total.
pub fn render(x: &Explained) -> String {
    let e = &x.explanation;
    let mut out = String::new();
    let known = if e.account_known { "account record known" } else { "no account record: no free tier, no packs" };
    let _ = writeln!(out, "Account {}, {} (hours in {}), {known}", printable(&e.account_id), e.month, e.time_zone);
    let _ = writeln!(out, "\nCalls, hour by hour (free tier first, then packs expiring first):");
    let mut calls = Table::new();
    calls.set_header(["hour", "calls", "frontend errors", "taken (pack quantity)", "chargeable", "month so far"]);
    for h in &e.hours {
        let taken = if h.trial { "trial: not billed".to_string() } else { takes(&h.calls_taken) };
        calls.add_row([h.start.clone(), n(h.calls), n(h.frontend_error_calls), taken, n(h.chargeable_calls), n(h.chargeable_calls_so_far)]);
    }
    let _ = writeln!(out, "{calls}");
    if e.hours.iter().any(|h| !h.regions.is_empty()) {
        let _ = writeln!(out, "\nPublic outbound bytes, hour by hour and region:");
        let mut bytes = Table::new();
        bytes.set_header(["hour", "region", "bytes", "taken (pack bytes)", "chargeable", "region's month so far"]);
        for h in &e.hours {
            for r in &h.regions {
                let taken = if h.trial { "trial: not billed".to_string() } else { takes(&r.walk.taken) };
                bytes.add_row([
                    h.start.clone(),
                    printable(&r.walk.region).into_owned(),
                    format!("{} ({})", n(r.walk.bytes), human_bytes(r.walk.bytes)),
                    taken,
                    n(r.walk.chargeable),
                    n(r.chargeable_so_far),
                ]);
            }
        }
        let _ = writeln!(out, "{bytes}");
    }
    if !e.bill.deductions.is_empty() {
        let _ = writeln!(out, "\nDeducted this month:");
        for d in &e.bill.deductions {
            let item = if d.item == PackItem::Calls { "calls" } else { "public outbound bytes" };
            let _ = writeln!(out, "  {}: {} {item}", printable(&d.pack_id), n(d.quantity));
        }
    }
    if !e.tier_starts.is_empty() {
        let _ = writeln!(out, "\nPrice tiers:");
        for t in &e.tier_starts {
            let what = match &t.region {
                None => "chargeable calls".to_string(),
                Some(r) => format!("chargeable bytes in {}", printable(r)),
            };
            let _ = writeln!(out, "  tier {} begins in the hour {}: past {} {what}", t.tier, t.hour, n(t.beyond));
        }
    }
    let version = match (&e.price_version, &e.price_version_from) {
        (Some(id), Some(from)) => format!("price version `{}`, in force since {from}", printable(id)),
        (Some(id), None) => format!("price version `{}` ([billing.prices], in force since always)", printable(id)),
        (None, Some(from)) => format!("the price version in force since {from}"),
        (None, None) => "[billing.prices] (no later price version covers this month)".to_string(),
    };
    let _ = writeln!(out, "\nPriced by {version}.");
    for t in &e.pricing_terms {
        let id = t.id.as_deref().map(|i| format!(" `{}`", printable(i))).unwrap_or_default();
        let until = t.effective_until.as_deref().map_or_else(|| "on".to_string(), |u| format!("until {u} (exclusive)"));
        let what = match t.discount {
            Some(d) => format!("discount {d}: every line at unit price x (1 - {d})"),
            None => "the account's own prices replace the version's tiers".to_string(),
        };
        let _ = writeln!(out, "Account term{id} ({}, from {} {until}): {what}.", t.kind, t.effective_from);
    }
    let discounted = e.charges.iter().any(|c| c.discount.is_some());
    let formula = if discounted { "quantity / unit size x unit price x (1 - discount)" } else { "quantity / unit size x unit price" };
    let _ = writeln!(out, "\nCharges ({formula}, rounded once to cents half away from zero):");
    let mut lines = Table::new();
    lines.set_header(["item", "tier", "quantity", "unit price", "exact", "amount"]);
    for c in &e.charges {
        let item = match (&c.item, &c.region) {
            (PackItem::Calls, _) => "calls".to_string(),
            (_, Some(r)) => format!("bytes {}", printable(r)),
            (_, None) => "bytes".to_string(),
        };
        lines.add_row([
            item,
            c.tier.to_string(),
            n(c.quantity),
            format!("{} per {}", c.unit_price, c.unit),
            match c.discount {
                Some(d) => format!("{} / {} x {} x (1 - {d}) = {}", n(c.quantity), n(c.unit_size), c.unit_price, c.exact),
                None => format!("{} / {} x {} = {}", n(c.quantity), n(c.unit_size), c.unit_price, c.exact),
            },
            c.amount.to_string(),
        ]);
    }
    let _ = writeln!(out, "{lines}");
    let _ = writeln!(out, "Total {} {} (the sum of the rounded lines); content hash {}", e.total_amount, e.currency, e.content_hash);
    match &x.emitted {
        Some(b) if b.content_hash == e.content_hash => {
            let _ = writeln!(out, "The worker emitted this bill as revision {} ({:?}).", b.revision, b.status);
        }
        Some(b) => {
            let _ = writeln!(
                out,
                "The worker's last emitted revision {} ({:?}) has content hash {}: the bill changed since (usage or the account record), \
                 and the next emission carries this one (a provisional bill within worker.provisional_interval_secs); or this \
                 explanation used other billing rules than the worker's (give explain the worker's --config).",
                b.revision, b.status, b.content_hash
            );
        }
        None => {
            let _ = writeln!(out, "The worker has not emitted this bill yet.");
        }
    }
    out
}
