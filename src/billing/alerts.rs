//! Usage alerts (rule book section 12): where, in the deduction walk of an
//! account's months, an allowance runs out or a month's running total
//! passes a line. A pure function of the same inputs as the bills, placed
//! by the same walk `explain` shows ([`deduct_traced`]) and priced by the
//! same lines ([`charge_lines`]), so an alert's hour is where the bill's own
//! arithmetic crosses.

use super::account::{AccountRecord, PackItem};
use super::bill::{charge_lines, month_pricing, total_of};
use super::calendar::Month;
use super::config::Rules;
use super::entitlements::{deduct_traced, HourTrace, PackSource};
use super::usage::MonthUsage;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What an alert is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// The month's free tier for one item is used up.
    FreeTierExhausted,
    /// A resource pack's balance reached 0.
    PackExhausted,
    /// The month's total reached or passed a threshold.
    SpendThreshold,
}

impl AlertKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::FreeTierExhausted => "free_tier_exhausted",
            AlertKind::PackExhausted => "pack_exhausted",
            AlertKind::SpendThreshold => "spend_threshold",
        }
    }
}

/// One crossing: its identity (month, kind, subject) and the hour it
/// happened in.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Crossing {
    /// The billing month.
    pub month: Month,
    /// What kind of alert.
    pub kind: AlertKind,
    /// The item (`calls`, `public_out_bytes`), the pack id, or the
    /// threshold (a decimal string, normalised: `100`, `99.5`).
    pub subject: String,
    /// The start of the hour (UTC epoch seconds) whose usage crossed.
    pub hour: i64,
}

/// An account's spend lines: the configuration's (`[billing.alerts]`) and
/// its record's own (`spend_alerts`), ascending, each once.
pub fn spend_lines(rules: &Rules, account: Option<&AccountRecord>) -> Vec<Decimal> {
    let own = account.map_or(&[][..], |a| a.spend_alerts.as_slice());
    let mut lines: Vec<Decimal> = rules.spend_thresholds.iter().chain(own).map(|t| t.normalize()).collect();
    lines.sort_unstable();
    lines.dedup();
    lines
}

/// Every crossing in an account's months, in walk order (months, hours;
/// within an hour: free tier, packs, thresholds ascending). `thresholds`
/// are the spend lines (configuration and account record together), each
/// above 0. Trial hours take nothing and cost nothing, so they cross
/// nothing.
pub fn crossings(
    account: Option<&AccountRecord>,
    usages: &BTreeMap<Month, MonthUsage>,
    rules: &Rules,
    thresholds: &[Decimal],
) -> Vec<Crossing> {
    let mut lines: Vec<Decimal> = thresholds.iter().filter(|t| **t > Decimal::ZERO).map(|t| t.normalize()).collect();
    lines.sort_unstable();
    lines.dedup();
    let packs: BTreeMap<&str, u64> = account
        .map(|a| a.resource_packs.iter().filter(|p| p.quantity > 0).map(|p| (p.id.as_str(), p.quantity)).collect())
        .unwrap_or_default();
    let mut walk = Walk {
        account,
        rules,
        lines,
        packs,
        out: Vec::new(),
        month: None,
        free: [0; 2],
        used: BTreeMap::new(),
        calls: 0,
        bytes: BTreeMap::new(),
        passed: 0,
    };
    let mut step = |t: HourTrace| walk.hour(t);
    deduct_traced(account, usages, rules, Some(&mut step));
    walk.out
}

/// The state of the walk [`crossings`] follows.
struct Walk<'a> {
    account: Option<&'a AccountRecord>,
    rules: &'a Rules,
    /// Spend lines, ascending.
    lines: Vec<Decimal>,
    /// Purchased packs with a balance to run out: id -> quantity.
    packs: BTreeMap<&'a str, u64>,
    out: Vec<Crossing>,
    /// The month walked, and in it: free-tier takes per item (calls,
    /// bytes), chargeable calls and bytes by region so far, and how many
    /// lines the running total has passed.
    month: Option<Month>,
    free: [u64; 2],
    calls: u64,
    bytes: BTreeMap<String, u64>,
    passed: usize,
    /// Taken from each purchased pack so far, across months.
    used: BTreeMap<String, u64>,
}

impl Walk<'_> {
    fn hour(&mut self, t: HourTrace) {
        if self.month != Some(t.month) {
            self.month = Some(t.month);
            (self.free, self.calls, self.passed) = ([0; 2], 0, 0);
            self.bytes.clear();
        }
        if t.trial {
            return;
        }
        let takes = t
            .calls_taken
            .iter()
            .map(|k| (PackItem::Calls, k))
            .chain(t.regions.iter().flat_map(|r| r.taken.iter().map(|k| (PackItem::PublicOutBytes, k))));
        let mut ran_out: Vec<Crossing> = Vec::new();
        for (item, take) in takes {
            match take.source {
                PackSource::FreeTier => {
                    let Some(ft) = &self.rules.free_tier else { continue };
                    let (slot, allowance) = match item {
                        PackItem::Calls => (0, ft.calls_per_month),
                        PackItem::PublicOutBytes => (1, ft.public_out_bytes_per_month),
                    };
                    let before = self.free[slot];
                    self.free[slot] += take.quantity;
                    if allowance > 0 && before < allowance && self.free[slot] >= allowance {
                        ran_out.push(self.crossing(&t, AlertKind::FreeTierExhausted, item.as_str().to_string()));
                    }
                }
                PackSource::Purchase => {
                    let Some(&quantity) = self.packs.get(take.pack_id.as_str()) else { continue };
                    let used = self.used.entry(take.pack_id.clone()).or_insert(0);
                    let before = *used;
                    *used += take.quantity;
                    if before < quantity && *used >= quantity {
                        ran_out.push(self.crossing(&t, AlertKind::PackExhausted, take.pack_id.clone()));
                    }
                }
            }
        }
        // Free tier first, then packs, each in id order (within an hour
        // several can run out; the order is only for a stable output).
        ran_out.sort_by(|a, b| (a.kind, &a.subject).cmp(&(b.kind, &b.subject)));
        self.out.append(&mut ran_out);
        let chargeable_bytes: u64 = t.regions.iter().map(|r| r.chargeable).sum();
        if t.chargeable_calls == 0 && chargeable_bytes == 0 {
            return;
        }
        self.calls += t.chargeable_calls;
        for r in t.regions.iter().filter(|r| r.chargeable > 0) {
            *self.bytes.entry(r.region.clone()).or_insert(0) += r.chargeable;
        }
        if self.passed == self.lines.len() {
            return;
        }
        let total = total_of(&charge_lines(&month_pricing(self.account, t.month, self.rules), self.calls, &self.bytes));
        while self.passed < self.lines.len() && total >= self.lines[self.passed] {
            let line = self.lines[self.passed].to_string();
            self.out.push(self.crossing(&t, AlertKind::SpendThreshold, line));
            self.passed += 1;
        }
    }

    fn crossing(&self, t: &HourTrace, kind: AlertKind, subject: String) -> Crossing {
        Crossing { month: t.month, kind, subject, hour: t.hour }
    }
}
