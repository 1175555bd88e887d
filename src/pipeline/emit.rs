//! Bill emission: which account-months to recompute (dirty, closed, or
//! later months of an account with packs), the bills computed in chunks on
//! every core, and each changed bill's next record with its revision and
//! status ([`super::policy`]).

use super::batch::par_slices;
use super::policy::{self, effective_watermark, next_record, Emitted, PartitionClock};
use super::{After, Pipeline, Records, Staged, Step};
use crate::billing::bill::{compute_bills, BillRecord, BillStatus};
use crate::billing::calendar::Month;
use crate::billing::entitlements::months_are_independent;
use crate::billing::usage::MonthUsage;
use crate::billing::Bill;
use crate::changelog::Change;
use crate::store::{outbox_bill_key, BillState, OutboxRecord, StoreError};
use std::collections::BTreeMap;

/// Bills computed and written per atomic batch by [`Pipeline::emit`].
const EMIT_CHUNK: usize = 1024;

impl Pipeline {
    /// What is known of a partition for the closing policy.
    fn clock(&self, partition: i32) -> PartitionClock {
        PartitionClock {
            watermark_ms: self.partitions.get(&partition).map(|s| s.watermark_ms),
            next_offset: self.next_offset(partition).unwrap_or(0),
            end_offset: self.high_watermarks.get(&partition).copied(),
            last_input_ms: self.last_input_ms.get(&partition).copied(),
        }
    }

    /// Whether a month is closed for a bill whose events come from
    /// `partition` (-1 when unknown: the most advanced partition decides).
    fn month_closed(&self, month: Month, partition: i32, now: i64, force_idle: bool) -> bool {
        let idle_after = self.settings.idle_after_ms;
        let wm = if partition < 0 {
            self.partitions.keys().map(|p| effective_watermark(&self.clock(*p), now, idle_after, force_idle)).max().flatten()
        } else {
            effective_watermark(&self.clock(partition), now, idle_after, force_idle)
        };
        policy::month_closed(self.rules.calendar.month_end(month) * 1000, self.settings.grace_ms, wm)
    }

    /// The account-months whose bills are to be recomputed, with the
    /// partition their events come from (-1 when unknown): the dirty ones,
    /// the provisional ones whose month has closed, and the later months of
    /// accounts with packs among them; then only those of partitions this
    /// pipeline owns ([`Pipeline::owns`]): a worker that lost a partition
    /// leaves its accounts' bills to the new owner, also when an account
    /// record changed (the dirty marks stay for when it comes back).
    fn bills_to_recompute(&self, now: i64, force_idle: bool) -> Result<BTreeMap<(String, Month), i32>, StoreError> {
        let mut todo: BTreeMap<(String, Month), i32> = BTreeMap::new();
        let mut unknown: Vec<(String, Month)> = Vec::new();
        for (a, m, p) in self.store.dirty()? {
            if p < 0 {
                unknown.push((a.clone(), m));
            }
            todo.insert((a, m), p);
        }
        // Marks without a partition (stores written before marks kept it):
        // the partition of the month's last bill.
        let keys: Vec<(&str, Month)> = unknown.iter().map(|(a, m)| (a.as_str(), *m)).collect();
        for ((a, m), state) in keys.iter().zip(self.store.bill_state_many(&keys)?) {
            if let Some(s) = state {
                todo.insert((a.to_string(), *m), s.partition);
            }
        }
        for (a, m, s) in self.store.bill_states()? {
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
        let interval = self.settings.provisional_interval_ms;
        if interval > 0 && !self.provisional_sent.is_empty() {
            todo.retain(|(a, m), p| {
                let recent = self.provisional_sent.get(&bill_key_hash(a, *m)).is_some_and(|&at| now - at < interval);
                !recent || self.month_closed(*m, *p, now, force_idle)
            });
        }
        let before = todo.len();
        todo.retain(|_, p| self.owns(*p));
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
        let mut later = Vec::new();
        let mut scan = self.store.usage_scan();
        for (a, (from, partition)) in earliest {
            for m in scan.month_list(a)? {
                if m > from {
                    later.push(((a.to_string(), m), partition));
                }
            }
        }
        // Marked dirty on disk before any chunk clears the month that caused
        // them: a stop between chunks leaves them to the next emission.
        let mut marks = self.store.batch();
        for (key, partition) in later {
            if let std::collections::btree_map::Entry::Vacant(e) = todo.entry(key) {
                marks.mark_dirty(&e.key().0, e.key().1, partition);
                e.insert(partition);
            }
        }
        if !marks.is_empty() {
            self.store.write(marks)?;
        }
        Ok(())
    }

    /// Forgets when provisional bills were sent: the next emission sends
    /// every change (a clean stop's last emission).
    pub fn release_provisional_holds(&mut self) {
        self.provisional_sent.clear();
    }

    /// Recomputes every dirty bill, and every provisional bill whose month
    /// has closed, and writes the changed records to the outbox with a higher
    /// revision: [`Pipeline::emission`] chunk by chunk, each committed to the
    /// outbox. Returns how many records were emitted.
    pub fn emit(&mut self, now: i64, force_idle: bool) -> Result<usize, StoreError> {
        let mut plan = self.emission(now, force_idle)?;
        let mut emitted = 0;
        while let Some(chunk) = self.next_emission(&mut plan)? {
            emitted += chunk.records.len();
            self.stage_emission(chunk, Records::Outbox)?.apply()?;
        }
        Ok(emitted)
    }

    /// What an emission will recompute ([`Pipeline::bills_to_recompute`]),
    /// to be taken a chunk at a time with [`Pipeline::next_emission`].
    pub fn emission(&self, now: i64, force_idle: bool) -> Result<EmissionPlan, StoreError> {
        let todo = self.bills_to_recompute(now, force_idle)?.into_iter().collect();
        Ok(EmissionPlan { todo, next: 0, now, force_idle })
    }

    /// Computes the next chunk of up to 1,024 bills of `plan`: the records
    /// of the changed ones, and the bill states and cleared dirty marks to
    /// write with them. Writes nothing: the caller delivers the records
    /// where it wants and stages the chunk with
    /// [`Pipeline::stage_emission`]. `None` when the plan is done.
    pub fn next_emission(&mut self, plan: &mut EmissionPlan) -> Result<Option<Emission>, StoreError> {
        let (from, to) = (plan.next, (plan.next + EMIT_CHUNK).min(plan.todo.len()));
        if from >= to {
            return Ok(None);
        }
        plan.next = to;
        let chunk = &plan.todo[from..to];
        let (now, force_idle) = (plan.now, plan.force_idle);
        // Bills are read, computed and turned into records on every core,
        // each slice reading its bill states and usage in one multi-get. An
        // account whose packs span months is computed with all its months
        // (the plan is in account order: the slice keeps the last such
        // account's bills; one split between two slices is computed twice).
        let this = &*self;
        let computed = par_slices(chunk, 64, |slice| -> Vec<Result<BillChange, StoreError>> {
            let keys: Vec<(&str, Month)> = slice.iter().map(|((a, m), _)| (a.as_str(), *m)).collect();
            // Usage by multi-get only for accounts whose months are billed
            // on their own; the others are read whole below (reading their
            // month here too would merge its operands twice).
            let independent: Vec<bool> = keys.iter().map(|(a, _)| months_are_independent(this.accounts.get(a))).collect();
            let alone: Vec<(&str, Month)> = keys.iter().zip(&independent).filter(|(_, i)| **i).map(|(k, _)| *k).collect();
            let (prevs, raws) = match (this.store.bill_state_many(&keys), this.store.usage_raw_many(&alone)) {
                (Ok(p), Ok(r)) => (p, r),
                (Err(e), _) | (_, Err(e)) => return vec![Err(e)],
            };
            let mut raws = raws.into_iter();
            let raws: Vec<Option<Vec<u8>>> = independent.iter().map(|i| if *i { raws.next().flatten() } else { None }).collect();
            let mut scan = this.store.usage_scan();
            let mut together: Option<(&str, Vec<Bill>)> = None;
            slice
                .iter()
                .zip(prevs.into_iter().zip(raws))
                .map(|(((account, month), dirty_partition), (prev, raw))| {
                    let partition = if *dirty_partition >= 0 { *dirty_partition } else { prev.as_ref().map_or(-1, |s| s.partition) };
                    let record = this.accounts.get(account);
                    let bill = if months_are_independent(record) {
                        match raw {
                            Some(raw) => {
                                let months = BTreeMap::from([(*month, MonthUsage::decode(&raw)?)]);
                                compute_bills(account, record, &months, &this.rules).pop()
                            }
                            None => None,
                        }
                    } else {
                        if together.as_ref().is_none_or(|(a, _)| a != account) {
                            let months = scan.account_months(account)?;
                            together = Some((account.as_str(), compute_bills(account, record, &months, &this.rules)));
                        }
                        together.as_ref().and_then(|(_, bills)| bills.iter().find(|b| b.month == *month).cloned())
                    };
                    Ok(this.bill_change(account, *month, partition, prev.as_ref(), bill, now, force_idle))
                })
                .collect()
        });
        if computed.len() != chunk.len() {
            // A slice's read failed: its one error is in the results.
            return Err(computed.into_iter().find_map(Result::err).expect("a failed read leaves its error"));
        }
        let mut out = Emission { records: Vec::new(), states: Vec::with_capacity(chunk.len()), now };
        for (((account, month), _), change) in chunk.iter().zip(computed) {
            let state = change?.map(|(record, state)| {
                out.records.push(record);
                state
            });
            out.states.push((account.clone(), *month, state));
        }
        Ok(Some(out))
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
            topic: self.settings.output_topic.clone(),
            key: Some(key.clone().into_bytes()),
            payload: BillRecord::json_from_content(&bill.content_json, revision, status, &bill.content_hash),
            headers: vec![],
            partition: None,
        };
        Some(((outbox_bill_key(&key), record), BillState { revision, status, content_hash: bill.content_hash, partition }))
    }

    /// Stages a chunk of [`Pipeline::next_emission`] as one atomic write:
    /// the cleared dirty marks, the new bill states, and the records (into
    /// the outbox with [`Records::Outbox`]; with [`Records::Captured`] the
    /// caller delivers them, bills and their changelog records, before
    /// [`Staged::apply`]: a crash in between recomputes and delivers the
    /// same records again, as a crash between producing and acknowledging
    /// an outbox record would).
    pub fn stage_emission(&mut self, chunk: Emission, records: Records) -> Result<Staged<'_>, StoreError> {
        let step = self.stage_emission_step(chunk, records);
        Ok(Staged { pipeline: self, step: Some(step) })
    }

    fn stage_emission_step(&mut self, chunk: Emission, records: Records) -> Step {
        let store = self.store.clone();
        let mut batch = if records == Records::Captured { store.capturing_batch() } else { store.batch() };
        for (key, record) in &chunk.records {
            batch.put_outbox(key, record);
        }
        let mut statuses = Vec::new();
        let mut sent = Vec::new();
        for (account, month, state) in &chunk.states {
            batch.clear_dirty(account, *month);
            // Out of the known marks now, before the write: a batch after
            // it marks the month again.
            if let Some(id) = self.ids.get(account) {
                self.known_dirty.clearing(id, *month);
            }
            if let Some(state) = state {
                batch.put_bill_state(account, *month, state);
                statuses.push(state.status);
                let at = (state.status == BillStatus::Provisional).then_some(chunk.now);
                sent.push((bill_key_hash(account, *month), at));
                // The next owner of the partition continues the revisions.
                if state.partition >= 0 {
                    let change = Change::Bill { account: account.clone(), month: *month, state: state.clone() };
                    let next_offset = self.next_offset(state.partition).unwrap_or(0);
                    self.put_change(&mut batch, state.partition, next_offset, &change);
                }
            }
        }
        let (wb, records) = batch.into_staged();
        Step { wb, records, positions: BTreeMap::new(), after: After::Emission { statuses, sent } }
    }
}

/// The bills one emission recomputes, in account order, taken a chunk at a
/// time by [`Pipeline::next_emission`].
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
    /// The emission's time (when provisional records count as sent).
    now: i64,
}

/// The key of a bill in [`Pipeline`]'s provisional-emission times.
fn bill_key_hash(account: &str, month: Month) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(account.as_bytes(), u64::from(month.ordinal()))
}

/// A recomputed bill's next record (keyed as in the outbox) and state;
/// `None`: unchanged since its last record.
type BillChange = Option<((Vec<u8>, OutboxRecord), BillState)>;
