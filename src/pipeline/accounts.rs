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
use std::collections::{BTreeMap, HashMap};

impl Pipeline {
    /// Applies account records (accounts topic): stores each changed record
    /// and marks that account's months for recomputation. Bad records go to
    /// the dead-letter topic; tombstones remove the record.
    pub fn apply_accounts(&mut self, msgs: &[InputMessage]) -> Result<(), StoreError> {
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
                Some(a) => self.accounts.insert(id, a),
                None => self.accounts.remove(&id),
            };
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
