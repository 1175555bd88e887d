//! The account table: account records applied to the store first, then
//! mirrored in memory; every month of a changed account marked for
//! recomputation, with the partition its events come from (emission leaves
//! the months of partitions the worker does not own to their owner).

use super::context::{shard_of, Context};
use super::message::InputMessage;
use super::numbers::OutboxNumbers;
use crate::billing::account::{decode_account, decode_account_checked, DecodedAccount};
use crate::billing::calendar::Month;
use crate::billing::event::{truncate, DecodeError, RejectReason};
use crate::billing::AccountRecord;
use crate::store::{Batch, PartitionState, Store, StoreError};
use std::borrow::Borrow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

/// The account records in memory, each keyed by its own `account_id`: a
/// map from id to record kept every id twice (at a million accounts, the
/// second copies and the wider entries were about 80 MB).
#[derive(Debug, Default)]
pub struct AccountTable(HashSet<ById>);

/// An account record that hashes and compares as its `account_id`, so the
/// table is looked up by `&str`.
#[derive(Debug)]
struct ById(AccountRecord);

impl Hash for ById {
    fn hash<H: Hasher>(&self, h: &mut H) {
        // Exactly what `str` hashes, as `Borrow<str>` requires.
        self.0.account_id.as_str().hash(h);
    }
}

impl PartialEq for ById {
    fn eq(&self, other: &Self) -> bool {
        self.0.account_id == other.0.account_id
    }
}

impl Eq for ById {}

impl Borrow<str> for ById {
    fn borrow(&self) -> &str {
        &self.0.account_id
    }
}

impl AccountTable {
    /// The records stored (each under its own account_id:
    /// [`AccountTable::apply`]); one that no longer decodes is left out.
    pub fn load(store: &Store) -> Result<AccountTable, StoreError> {
        let mut table = AccountTable::default();
        for (_, raw) in store.accounts()? {
            if let Ok(a) = decode_account(&raw) {
                table.insert(a);
            }
        }
        Ok(table)
    }

    /// The record of `account`.
    pub fn get(&self, account: &str) -> Option<&AccountRecord> {
        self.0.get(account).map(|r| &r.0)
    }

    /// Adds a record, or replaces the one with its `account_id`.
    pub fn insert(&mut self, record: AccountRecord) {
        self.0.replace(ById(record));
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Room for `more` records.
    pub fn reserve(&mut self, more: usize) {
        self.0.reserve(more);
    }

    /// Every record, the table left empty (its memory goes with them).
    pub fn take_all(&mut self) -> impl Iterator<Item = AccountRecord> {
        std::mem::take(&mut self.0).into_iter().map(|r| r.0)
    }

    /// Moves every record of `other` in.
    pub fn absorb(&mut self, mut other: AccountTable) {
        self.reserve(other.len());
        for r in other.take_all() {
            self.insert(r);
        }
    }

    /// Moves every record out into `count` tables, the records of shard `i`
    /// ([`shard_of`]) into the `i`-th.
    pub fn split(&mut self, count: u32) -> Vec<AccountTable> {
        let mut parts: Vec<AccountTable> = (0..count).map(|_| AccountTable::default()).collect();
        // Taken, not drained: the table's memory goes with it.
        for a in self.take_all() {
            parts[shard_of(&a.account_id, count) as usize].insert(a);
        }
        parts
    }

    /// Applies account records (accounts topic): stores each changed record
    /// and marks that account's months for recomputation, and mirrors it
    /// here once written. Bad records, and tombstones (which do not delete
    /// billing history: the last record stays in force, rule book section
    /// 8), go to the dead-letter topic through the outbox. Returns how many
    /// dead letters it put there: the caller delivers them without waiting
    /// for the next input batch.
    pub fn apply(&mut self, cx: &Context, numbers: &mut OutboxNumbers, msgs: &[InputMessage]) -> Result<u64, StoreError> {
        let mut batch = cx.store.batch();
        let mut dead = 0u64;
        // Records that change the table, applied to memory once written.
        let mut changed: HashMap<String, AccountRecord> = HashMap::new();
        for m in msgs {
            match checked(m) {
                Ok((a, payload)) => {
                    // Invalid packs and pricing terms are left out and
                    // reported (one dead letter per reason); the rest applies.
                    for err in a.rejections() {
                        put_dead_letter(cx, numbers, &mut batch, m, &err);
                        dead += 1;
                    }
                    self.stage_change(cx, &mut batch, &mut changed, a.record, payload)?;
                }
                Err(err) => {
                    put_dead_letter(cx, numbers, &mut batch, m, &err);
                    dead += 1;
                }
            }
        }
        let mut by_partition: BTreeMap<i32, i64> = BTreeMap::new();
        for m in msgs {
            let e = by_partition.entry(m.partition).or_insert(0);
            *e = (*e).max(m.offset + 1);
        }
        for (p, next) in by_partition {
            batch.put_partition(&cx.settings.accounts_topic, p, PartitionState { next_offset: next, watermark_ms: 0 });
        }
        // Written first, mirrored after: a failed write leaves the table as on disk.
        cx.store.write(batch)?;
        for (_, record) in changed {
            self.insert(record);
        }
        // Waiting in the outbox until the caller drains it.
        cx.metrics.outbox_pending.add(dead as i64);
        Ok(dead)
    }

    /// Stages an account record into `batch` when it changes the account
    /// (as last `changed` in this batch, or in the table): the record (as
    /// `payload`), and the account's months marked dirty.
    fn stage_change(
        &self,
        cx: &Context,
        batch: &mut Batch<'_>,
        changed: &mut HashMap<String, AccountRecord>,
        record: AccountRecord,
        payload: &[u8],
    ) -> Result<(), StoreError> {
        let current = changed.get(&record.account_id).or_else(|| self.get(&record.account_id));
        if current != Some(&record) {
            let account_id = record.account_id.clone();
            batch.put_account(&account_id, payload);
            let months = cx.store.account_month_list(&account_id)?;
            let partition = account_partition(&cx.store, &account_id, &months)?;
            for month in months {
                batch.mark_dirty(&account_id, month, partition);
            }
            changed.insert(account_id, record);
        }
        Ok(())
    }
}

/// An account record decoded and checked, with its bytes; or why it is
/// not applied: a tombstone, a key that is not its account_id, or bytes
/// that are no account record.
fn checked<'m>(m: &InputMessage<'m>) -> Result<(DecodedAccount, &'m [u8]), DecodeError> {
    let Some(payload) = m.payload else { return Err(tombstone(m.key)) };
    let a = decode_account_checked(payload)?;
    if m.key.is_some() && m.key != Some(a.record.account_id.as_bytes()) {
        return Err(DecodeError::new(RejectReason::KeyMismatch, "account record key is not its account_id"));
    }
    Ok((a, payload))
}

/// Puts the dead letter of an account record in the outbox.
fn put_dead_letter(cx: &Context, numbers: &mut OutboxNumbers, batch: &mut Batch<'_>, m: &InputMessage, err: &DecodeError) {
    let (key, record) = numbers.dead_letter(cx, m, err);
    batch.put_outbox(&key, record);
}

/// The input partition an account's events come from, as its months'
/// dirty marks or last bills record it (-1 when none does). Events are
/// keyed by account, so an account lives in one partition.
fn account_partition(store: &Store, account: &str, months: &[Month]) -> Result<i32, StoreError> {
    let keys: Vec<(&str, Month)> = months.iter().map(|m| (account, *m)).collect();
    if let Some(p) = store.dirty_many(&keys)?.into_iter().flatten().find(|p| *p >= 0) {
        return Ok(p);
    }
    Ok(store.bill_state_many(&keys)?.into_iter().flatten().map(|s| s.partition).find(|p| *p >= 0).unwrap_or(-1))
}

/// The rejection of a tombstone on the accounts topic.
fn tombstone(key: Option<&[u8]>) -> DecodeError {
    let account = key.map_or_else(|| "(no key)".to_string(), |k| format!("`{}`", truncate(&String::from_utf8_lossy(k), 64)));
    DecodeError::new(
        RejectReason::AccountTombstone,
        format!(
            "tombstone (null value) for account {account}: a tombstone does not delete billing history, so the account's last \
             record stays in force; to change the account, publish a new record for it"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, activated_at: i64) -> AccountRecord {
        AccountRecord { account_id: id.to_string(), activated_at, resource_packs: vec![], pricing: vec![], spend_alerts: vec![] }
    }

    #[test]
    fn the_account_table_is_keyed_by_each_records_own_id() {
        let mut t = AccountTable::default();
        t.insert(record("a", 1));
        t.insert(record("b", 2));
        // A later record of an account replaces the earlier one.
        t.insert(record("a", 3));
        assert_eq!(t.len(), 2);
        assert_eq!(t.get("a").map(|r| r.activated_at), Some(3));
        assert_eq!(t.get("b").map(|r| r.activated_at), Some(2));
        assert_eq!(t.get("c"), None);
        let mut other = AccountTable::default();
        other.insert(record("c", 4));
        other.insert(record("a", 5));
        t.absorb(other);
        let mut all: Vec<(String, i64)> = t.take_all().map(|r| (r.account_id, r.activated_at)).collect();
        all.sort();
        assert_eq!(all, vec![("a".to_string(), 5), ("b".to_string(), 2), ("c".to_string(), 4)]);
        assert_eq!(t.len(), 0);
    }
}
