//! The account table: account records applied to the store first, then
//! mirrored in memory; every month of a changed account marked for
//! recomputation, with the partition its events come from (emission leaves
//! the months of partitions the worker does not own to their owner).

use super::{InputMessage, Pipeline};
use crate::billing::account::decode_account_checked;
use crate::billing::calendar::Month;
use crate::billing::event::{DecodeError, RejectReason};
use crate::billing::AccountRecord;
use crate::store::{PartitionState, StoreError};
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
    /// The record of `account`.
    pub fn get(&self, account: &str) -> Option<&AccountRecord> {
        self.0.get(account).map(|r| &r.0)
    }

    /// Adds a record, or replaces the one with its `account_id`.
    pub fn insert(&mut self, record: AccountRecord) {
        self.0.replace(ById(record));
    }

    /// Forgets `account`'s record.
    pub fn remove(&mut self, account: &str) {
        self.0.remove(account);
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
}

impl Pipeline {
    /// Applies account records (accounts topic): stores each changed record
    /// and marks that account's months for recomputation. Bad records go to
    /// the dead-letter topic; tombstones remove the record.
    pub fn apply_accounts(&mut self, msgs: &[InputMessage]) -> Result<(), StoreError> {
        // A changed record marks the account's months with the partition
        // of its first marked month, which may not be the one a batch
        // knows (an account whose events came from two partitions).
        self.known_dirty.clear();
        let store = self.store.clone();
        let mut batch = store.batch();
        // Records that change the table, applied to memory once written.
        let mut changed: HashMap<String, Option<AccountRecord>> = HashMap::new();
        for m in msgs {
            let decoded = match m.payload {
                None => None,
                Some(p) => match decode_account_checked(p) {
                    Ok(a) if m.key.is_some() && m.key != Some(a.record.account_id.as_bytes()) => {
                        let err = DecodeError::new(RejectReason::KeyMismatch, "account record key is not its account_id");
                        let (k, r) = self.dead_letter(m, &err);
                        batch.put_outbox(&k, &r);
                        continue;
                    }
                    Ok(a) => {
                        // Invalid packs are left out and reported; the rest applies.
                        if let Some(err) = a.rejection() {
                            let (k, r) = self.dead_letter(m, &err);
                            batch.put_outbox(&k, &r);
                        }
                        Some(a.record)
                    }
                    Err(err) => {
                        let (k, r) = self.dead_letter(m, &err);
                        batch.put_outbox(&k, &r);
                        continue;
                    }
                },
            };
            let account_id = match (&decoded, m.key) {
                (Some(a), _) => a.account_id.clone(),
                (None, Some(k)) => String::from_utf8_lossy(k).into_owned(),
                (None, None) => continue,
            };
            let current = match changed.get(&account_id) {
                Some(c) => c.as_ref(),
                None => self.accounts.get(&account_id),
            };
            if current == decoded.as_ref() {
                continue;
            }
            batch.put_account(&account_id, if decoded.is_some() { m.payload.unwrap_or_default() } else { b"" });
            let months = self.store.account_month_list(&account_id)?;
            let partition = self.account_partition(&account_id, &months)?;
            for month in months {
                batch.mark_dirty(&account_id, month, partition);
            }
            changed.insert(account_id, decoded);
        }
        let mut by_partition: BTreeMap<i32, i64> = BTreeMap::new();
        for m in msgs {
            let e = by_partition.entry(m.partition).or_insert(0);
            *e = (*e).max(m.offset + 1);
        }
        for (p, next) in by_partition {
            batch.put_partition(&self.settings.accounts_topic, p, PartitionState { next_offset: next, watermark_ms: 0 });
        }
        // Written first, mirrored after: a failed write leaves the table as on disk.
        self.store.write(batch)?;
        for (id, record) in changed {
            match record {
                // Its `account_id` is `id` (the key above came from it).
                Some(a) => self.accounts.insert(a),
                None => self.accounts.remove(&id),
            }
        }
        Ok(())
    }

    /// The input partition an account's events come from, as its months'
    /// dirty marks or last bills record it (-1 when none does). Events are
    /// keyed by account, so an account lives in one partition.
    fn account_partition(&self, account: &str, months: &[Month]) -> Result<i32, StoreError> {
        let keys: Vec<(&str, Month)> = months.iter().map(|m| (account, *m)).collect();
        if let Some(p) = self.store.dirty_many(&keys)?.into_iter().flatten().find(|p| *p >= 0) {
            return Ok(p);
        }
        Ok(self.store.bill_state_many(&keys)?.into_iter().flatten().map(|s| s.partition).find(|p| *p >= 0).unwrap_or(-1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, activated_at: i64) -> AccountRecord {
        AccountRecord { account_id: id.to_string(), activated_at, resource_packs: vec![] }
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
        t.remove("b");
        assert_eq!(t.get("b"), None);
        let mut other = AccountTable::default();
        other.insert(record("c", 4));
        other.insert(record("a", 5));
        t.absorb(other);
        let mut all: Vec<(String, i64)> = t.take_all().map(|r| (r.account_id, r.activated_at)).collect();
        all.sort();
        assert_eq!(all, vec![("a".to_string(), 5), ("c".to_string(), 4)]);
        assert_eq!(t.len(), 0);
    }
}
