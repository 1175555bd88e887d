//! Bill emission: which account-months to recompute (dirty, closed, or
//! later months of an account with packs), the bills computed in chunks on
//! every core, and each changed bill's next record with its revision and
//! status ([`super::policy`]). The `Emitter` owns what emission keeps
//! between runs (when provisional bills were sent); what it reads of the
//! other rooms comes borrowed (`Reads`).

use super::accounts::AccountTable;
use super::alerts::{self, AlertOut};
use super::batch::par_slices;
use super::context::Context;
use super::ingest::Ingest;
use super::numbers::OutboxNumbers;
use super::policy::{self, next_record, Emitted};
use super::positions::Positions;
use crate::billing::alerts::AlertKind;
use crate::billing::bill::{compute_bills, BillRecord, BillStatus};
use crate::billing::calendar::Month;
use crate::billing::entitlements::months_are_independent;
use crate::billing::usage::MonthUsage;
use crate::billing::Bill;
use crate::changelog::Change;
use crate::metrics::Metrics;
use crate::store::{outbox_alert_key, outbox_bill_key, Batch, BillState, OutboxRecord, StoreError};
use std::collections::{BTreeMap, HashMap};

/// Bills computed and written per atomic batch by [`super::Pipeline::emit`].
const EMIT_CHUNK: usize = 1024;

/// What emission keeps between runs.
#[derive(Default)]
pub(super) struct Emitter {
    /// When each key (a hash of account and month) whose last record is
    /// provisional was emitted, wall-clock ms: the next provisional one
    /// waits `provisional_interval_ms`. In memory only: after a restart a
    /// key's next provisional bill goes out at the first emission.
    provisional_sent: HashMap<u64, i64>,
}

/// What an emission reads of the other rooms: the settings and store, the
/// partitions' clocks and assignment, the account records.
pub(super) struct Reads<'a> {
    pub(super) cx: &'a Context,
    pub(super) positions: &'a Positions,
    pub(super) accounts: &'a AccountTable,
}

/// What a staged emission chunk brings memory up to once it is written
/// ([`Emitter::written`]).
pub(super) struct EmissionWritten {
    /// The status of each bill record written.
    statuses: Vec<BillStatus>,
    /// Each bill written, by [`bill_key_hash`]: when it went out
    /// provisional, `None` when not provisional.
    sent: Vec<(u64, Option<i64>)>,
    /// The kind of each alert written.
    alerts: Vec<AlertKind>,
}

impl Emitter {
    /// What an emission will recompute ([`Reads::bills_to_recompute`]), to
    /// be taken a chunk at a time with [`Reads::next_chunk`].
    pub(super) fn plan(&self, r: &Reads<'_>, now: i64, force_idle: bool) -> Result<EmissionPlan, StoreError> {
        let todo = r.bills_to_recompute(&self.provisional_sent, now, force_idle)?.into_iter().collect();
        Ok(EmissionPlan { todo, next: 0, now, force_idle })
    }

    /// Memory brought in line with a written emission chunk: the bills
    /// counted, and when provisional ones were sent.
    pub(super) fn written(&mut self, metrics: &Metrics, w: EmissionWritten) {
        for status in w.statuses {
            metrics.bills_emitted.with_label_values(&[status.as_str()]).inc();
        }
        for kind in w.alerts {
            metrics.alerts_emitted.with_label_values(&[kind.as_str()]).inc();
        }
        for (key, at) in w.sent {
            match at {
                Some(at) => self.provisional_sent.insert(key, at),
                None => self.provisional_sent.remove(&key),
            };
        }
    }

    /// Forgets when provisional bills were sent: the next emission sends
    /// every change (a clean stop's last emission).
    pub(super) fn release_provisional_holds(&mut self) {
        self.provisional_sent.clear();
    }
}

impl Reads<'_> {
    /// Whether a month is closed for a bill whose events come from
    /// `partition` (-1 when unknown: the most advanced partition decides).
    fn month_closed(&self, month: Month, partition: i32, now: i64, force_idle: bool) -> bool {
        let s = &self.cx.settings;
        let wm = self.positions.watermark(partition, now, s.idle_after_ms, force_idle);
        policy::month_closed(self.cx.rules.calendar.month_end(month) * 1000, s.grace_ms, wm)
    }

    /// The account-months whose bills are to be recomputed, with the
    /// partition their events come from (-1 when unknown): the dirty ones,
    /// the provisional ones whose month has closed, and the later months of
    /// accounts with packs among them; then only those of partitions this
    /// pipeline owns ([`Positions::owns`]): a worker that lost a partition
    /// leaves its accounts' bills to the new owner, also when an account
    /// record changed (the dirty marks stay for when it comes back). A
    /// provisional bill sent (`sent`) less than the interval ago waits.
    fn bills_to_recompute(
        &self,
        sent: &HashMap<u64, i64>,
        now: i64,
        force_idle: bool,
    ) -> Result<BTreeMap<(String, Month), i32>, StoreError> {
        let store = &self.cx.store;
        let mut todo: BTreeMap<(String, Month), i32> = BTreeMap::new();
        let mut unknown: Vec<(String, Month)> = Vec::new();
        for (a, m, p) in store.dirty()? {
            if p < 0 {
                unknown.push((a.clone(), m));
            }
            todo.insert((a, m), p);
        }
        // Marks without a partition (stores written before marks kept it):
        // the partition of the month's last bill.
        let keys: Vec<(&str, Month)> = unknown.iter().map(|(a, m)| (a.as_str(), *m)).collect();
        for ((a, m), state) in keys.iter().zip(store.bill_state_many(&keys)?) {
            if let Some(s) = state {
                todo.insert((a.to_string(), *m), s.partition);
            }
        }
        for (a, m, s) in store.bill_states()? {
            if s.status == BillStatus::Provisional
                && !todo.contains_key(&(a.clone(), m))
                && self.month_closed(m, s.partition, now, force_idle)
            {
                todo.insert((a, m), s.partition);
            }
        }
        self.add_later_pack_months(&mut todo)?;
        // A provisional bill sent less than the interval ago waits (its
        // dirty mark stays on disk), unless its month has closed since.
        let interval = self.cx.settings.provisional_interval_ms;
        if interval > 0 && !sent.is_empty() {
            todo.retain(|(a, m), p| {
                let recent = sent.get(&bill_key_hash(a, *m)).is_some_and(|&at| now - at < interval);
                !recent || self.month_closed(*m, *p, now, force_idle)
            });
        }
        let before = todo.len();
        todo.retain(|_, p| self.positions.owns(*p));
        if todo.len() < before {
            tracing::debug!(bills = before - todo.len(), "bills of partitions this worker does not own are left to their owner");
        }
        Ok(todo)
    }

    /// A pack's balance runs across months: a change to one month of an
    /// account with packs can change every later month's deductions. Adds
    /// those later months to `todo` (to be restated where they change), and
    /// marks them dirty on disk first, so a stop between emission chunks
    /// leaves them to the next emission. Accounts without packs bill each
    /// month on its own: no walk.
    fn add_later_pack_months(&self, todo: &mut BTreeMap<(String, Month), i32>) -> Result<(), StoreError> {
        // Per account with packs: its earliest month to recompute, and the
        // partition its events come from.
        let mut earliest: BTreeMap<&str, (Month, i32)> = BTreeMap::new();
        for ((a, m), p) in todo.iter() {
            if !months_are_independent(self.accounts.get(a)) {
                let e = earliest.entry(a.as_str()).or_insert((*m, *p));
                *e = ((e.0).min(*m), (e.1).max(*p));
            }
        }
        let store = &self.cx.store;
        let mut later = Vec::new();
        let mut scan = store.usage_scan();
        for (a, (from, partition)) in earliest {
            for m in scan.months_after(a, from)? {
                later.push(((a.to_string(), m), partition));
            }
        }
        // Marked dirty on disk before any chunk clears the month that caused
        // them: a stop between chunks leaves them to the next emission.
        let mut marks = store.batch();
        for (key, partition) in later {
            if let std::collections::btree_map::Entry::Vacant(e) = todo.entry(key) {
                marks.mark_dirty(&e.key().0, e.key().1, partition);
                e.insert(partition);
            }
        }
        if !marks.is_empty() {
            store.write(marks)?;
        }
        Ok(())
    }

    /// Computes the next chunk of up to 1,024 bills of `plan`: the records
    /// of the changed ones, and the bill states and cleared dirty marks to
    /// write with them. Writes nothing: the caller delivers the records
    /// where it wants and stages the chunk ([`stage`]). `None` when the
    /// plan is done.
    pub(super) fn next_chunk(&self, plan: &mut EmissionPlan) -> Result<Option<Emission>, StoreError> {
        let (from, to) = (plan.next, (plan.next + EMIT_CHUNK).min(plan.todo.len()));
        if from >= to {
            return Ok(None);
        }
        plan.next = to;
        let chunk = &plan.todo[from..to];
        let (now, force_idle) = (plan.now, plan.force_idle);
        // Bills are read, computed and turned into records on every core,
        // each slice reading its bill states and usage in one multi-get.
        let computed = par_slices(chunk, 64, |slice| self.changes(slice, now, force_idle));
        if computed.len() != chunk.len() {
            // A slice's read failed: its one error is in the results.
            return Err(computed.into_iter().find_map(Result::err).expect("a failed read leaves its error"));
        }
        let mut out = Emission { records: Vec::new(), states: Vec::with_capacity(chunk.len()), alerts: Vec::new(), now };
        for (((account, month), _), change) in chunk.iter().zip(computed) {
            let Recomputed { bill, mut alerts } = change?;
            let state = bill.map(|(record, state)| {
                out.records.push(record);
                state
            });
            out.states.push((account.clone(), *month, state));
            out.alerts.append(&mut alerts);
        }
        Ok(Some(out))
    }

    /// The changes of a slice of a plan's bills, read in one multi-get of
    /// their bill states and usage; a failed read is the one result. An
    /// account whose packs span months is computed with all its months (the
    /// plan is in account order: the slice keeps the last such account's
    /// bills; one split between two slices is computed twice).
    fn changes(&self, slice: &[((String, Month), i32)], now: i64, force_idle: bool) -> Vec<Result<Recomputed, StoreError>> {
        let store = &self.cx.store;
        let keys: Vec<(&str, Month)> = slice.iter().map(|((a, m), _)| (a.as_str(), *m)).collect();
        // Usage by multi-get only for accounts whose months are billed
        // on their own; the others are read whole below (reading their
        // month here too would merge its operands twice).
        let independent: Vec<bool> = keys.iter().map(|(a, _)| months_are_independent(self.accounts.get(a))).collect();
        let alone: Vec<(&str, Month)> = keys.iter().zip(&independent).filter(|(_, i)| **i).map(|(k, _)| *k).collect();
        let (prevs, raws) = match (store.bill_state_many(&keys), store.usage_raw_many(&alone)) {
            (Ok(p), Ok(r)) => (p, r),
            (Err(e), _) | (_, Err(e)) => return vec![Err(e)],
        };
        let mut raws = raws.into_iter();
        let raws: Vec<Option<Vec<u8>>> = independent.iter().map(|i| if *i { raws.next().flatten() } else { None }).collect();
        let mut scan = store.usage_scan();
        let mut together: Option<(&str, Vec<Bill>, BTreeMap<Month, MonthUsage>)> = None;
        slice
            .iter()
            .zip(prevs.into_iter().zip(raws))
            .map(|(((account, month), dirty_partition), (prev, raw))| {
                let partition = if *dirty_partition >= 0 { *dirty_partition } else { prev.as_ref().map_or(-1, |s| s.partition) };
                let record = self.accounts.get(account);
                let alone;
                let (bill, months, all) = if months_are_independent(record) {
                    alone = match raw {
                        Some(raw) => BTreeMap::from([(*month, MonthUsage::decode(&raw)?)]),
                        None => BTreeMap::new(),
                    };
                    let bill = compute_bills(account, record, &alone, &self.cx.rules).pop();
                    (bill, &alone, None)
                } else {
                    if together.as_ref().is_none_or(|(a, _, _)| a != account) {
                        let months = scan.account_months(account)?;
                        together = Some((account.as_str(), compute_bills(account, record, &months, &self.cx.rules), months));
                    }
                    let (_, bills, months) = together.as_ref().expect("set above");
                    (bills.iter().find(|b| b.month == *month).cloned(), months, Some(bills.as_slice()))
                };
                let candidates = bill.as_ref().map(|b| alerts::candidates(self.cx, record, b, all)).unwrap_or_default();
                let change = self.bill_change(account, *month, partition, prev.as_ref(), bill, now, force_idle);
                let revision = change.as_ref().map(|(_, s)| s.revision).or(prev.as_ref().map(|s| s.revision));
                let alerts = match revision {
                    Some(revision) if !candidates.is_empty() => {
                        alerts::new_alerts(self.cx, account, *month, record, months, candidates, revision, partition)?
                    }
                    _ => Vec::new(),
                };
                Ok(Recomputed { bill: change, alerts })
            })
            .collect()
    }

    /// A recomputed bill's next record (keyed as in the outbox) and state,
    /// `None` when it has not changed since the last record (`prev`).
    #[allow(clippy::too_many_arguments)]
    fn bill_change(
        &self,
        account: &str,
        month: Month,
        partition: i32,
        prev: Option<&BillState>,
        bill: Option<Bill>,
        now: i64,
        force_idle: bool,
    ) -> BillChange {
        let bill = bill?;
        let closed = self.month_closed(month, partition, now, force_idle);
        let last = prev.map(|s| Emitted { revision: s.revision, status: s.status, content_hash: &s.content_hash });
        let (revision, status) = next_record(last, &bill.content_hash, closed)?;
        let key = format!("{account}/{month}");
        let record = OutboxRecord {
            topic: self.cx.settings.output_topic.clone(),
            key: Some(key.clone().into_bytes()),
            payload: BillRecord::json_from_content(&bill.content_json, revision, status, &bill.content_hash),
            headers: vec![],
            partition: None,
        };
        Some(((outbox_bill_key(&key), record), BillState { revision, status, content_hash: bill.content_hash, partition }))
    }
}

/// Stages a chunk of [`Reads::next_chunk`] into `batch`: the records, the
/// cleared dirty marks (out of the known marks at once: [`Ingest::clearing`]),
/// the new bill states, and with a changelog topic each state's changelog
/// record, for the partition's next owner to continue the revisions.
pub(super) fn stage(
    chunk: Emission,
    batch: &mut Batch<'_>,
    cx: &Context,
    positions: &Positions,
    ingest: &mut Ingest,
    numbers: &mut OutboxNumbers,
) -> EmissionWritten {
    for (key, record) in chunk.records {
        batch.put_outbox(&key, record);
    }
    let mut written = EmissionWritten { statuses: Vec::new(), sent: Vec::new(), alerts: Vec::new() };
    // Each alert once: its record, its identity, and (for the next owner of
    // its account's partition) a changelog record, in the bills' batch.
    for a in chunk.alerts {
        let payload = a.record.payload.clone();
        batch.put_alert(&a.key, &payload);
        batch.put_outbox(&outbox_alert_key(&a.key), a.record);
        if a.partition >= 0 {
            let next_offset = positions.next_offset(a.partition).unwrap_or(0);
            numbers.put_change(&cx.settings, batch, a.partition, next_offset, Change::Alert { key: a.key, record: payload });
        }
        written.alerts.push(a.kind);
    }
    for (account, month, state) in &chunk.states {
        batch.clear_dirty(account, *month);
        // Out of the known marks now, before the write: a batch after
        // it marks the month again.
        ingest.clearing(account, *month);
        if let Some(state) = state {
            batch.put_bill_state(account, *month, state);
            written.statuses.push(state.status);
            let at = (state.status == BillStatus::Provisional).then_some(chunk.now);
            written.sent.push((bill_key_hash(account, *month), at));
            // The next owner of the partition continues the revisions.
            if state.partition >= 0 {
                let change = Change::Bill { account: account.clone(), month: *month, state: state.clone() };
                let next_offset = positions.next_offset(state.partition).unwrap_or(0);
                numbers.put_change(&cx.settings, batch, state.partition, next_offset, change);
            }
        }
    }
    written
}

/// The bills one emission recomputes, in account order, taken a chunk at a
/// time by [`super::Pipeline::next_emission`].
pub struct EmissionPlan {
    todo: Vec<((String, Month), i32)>,
    next: usize,
    now: i64,
    force_idle: bool,
}

impl EmissionPlan {
    /// Account-months the plan recomputes in all.
    pub fn len(&self) -> usize {
        self.todo.len()
    }

    /// Whether there is nothing to recompute.
    pub fn is_empty(&self) -> bool {
        self.todo.is_empty()
    }
}

/// One chunk of an emission: the bill records to deliver, and the bill
/// states (`None`: recomputed, unchanged) to write with them.
#[derive(Debug)]
pub struct Emission {
    /// The changed bills' records, keyed as in the outbox.
    pub records: Vec<(Vec<u8>, OutboxRecord)>,
    states: Vec<(String, Month, Option<BillState>)>,
    /// The alerts the bills' computations found, never emitted before.
    alerts: Vec<AlertOut>,
    /// The emission's time (when provisional records count as sent).
    now: i64,
}

/// The key of a bill in [`Emitter`]'s provisional-emission times.
fn bill_key_hash(account: &str, month: Month) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(account.as_bytes(), u64::from(month.ordinal()))
}

/// A recomputed bill's next record (keyed as in the outbox) and state;
/// `None`: unchanged since its last record.
type BillChange = Option<((Vec<u8>, OutboxRecord), BillState)>;

/// A recomputed bill's change and the alerts its computation found.
struct Recomputed {
    bill: BillChange,
    alerts: Vec<AlertOut>,
}
