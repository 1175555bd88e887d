//! The state changelog: what a worker writes to Kafka so that another worker
//! can take over a partition with its state, and what that worker reads back
//! ([`Restore`]). Records to bytes and back and the rule that decides which
//! records a restore applies are pure; `Restored::write` applies the result
//! to the store in one batch. The worker produces the records in its Kafka
//! transactions (or through the outbox without them) and reads them back
//! with `kafka::read_partition` (`worker.rs`, `Restorer`).
//!
//! One compacted topic with as many partitions as the input: input
//! partition p's state goes to changelog partition p. Format 3 (this one);
//! keys (first byte the kind):
//!
//! | key | value | a restore keeps |
//! | --- | --- | --- |
//! | `k` + account-month + block | the block's usage, absolute ([`encode_block`]: the hours of one [`BLOCK_HOURS`] block, compactly) | per block, the record with the highest `next_offset` header at most the last `o`; the month is its blocks together |
//! | `e` + hour + sequence | one batch's additions to the hour's dedupe bucket: last offset, topic hash, hashes | per key, as for `k`; a bucket is its records in sequence order |
//! | `b` + account-month | the last emitted bill state | the highest revision, marked to be sent again if unconfirmed ([`Restore::offer_bill`]) |
//! | `o` | next offset and watermark of the input partition | the highest next offset |
//!
//! A record's size follows what one batch changed (one account-day, one
//! batch's hashes in one bucket), never the month so far. When the store
//! drops a dedupe bucket (its window passed, or it restarted empty), the
//! bucket's `e` records are deleted with tombstones (a key with no value),
//! so the compacted topic holds about what the stores hold: usage per
//! account-day, the live buckets, a bill state per account-month and a
//! position.
//!
//! Older formats are still read, as the base that later records replace.
//! Format 2 wrote `h` + account-month + hour start records (an hour alone,
//! a whole `MonthUsage` encoding) instead of `k`: an hour's usage is the
//! later (by `next_offset`) of its `h` record and its block's `k` record.
//! Format 1 wrote `u` (a month's usage so far) and `d` (one batch's hashes,
//! keyed by the batch) records: a month's hours without a later record come
//! from its latest `u` record, a bucket is its `d` records in order then its
//! `e` records. Old records are never rewritten or deleted, so they stay in
//! the topic; [`Restore::format1`] and [`Restore::format2`] count them
//! (README, "Upgrading the changelog format").

use crate::billing::calendar::Month;
use crate::billing::usage::{merge_encoded, MonthUsage};
use crate::store::{account_month_key, decode_bill_state, decode_partition_state, encode_bill_state, encode_partition_state};
use crate::store::{parse_account_month_key, BillState, PartitionState, Store, StoreError};
use std::collections::BTreeMap;

/// Header: the input partition's next offset after the batch that wrote
/// the record (decimal).
pub const NEXT_OFFSET: &str = "gatebill.next_offset";

/// Header of a bill state produced before its bill (see
/// [`Restore::offer_bill`]): the bill may not have reached the output topic.
/// The same record without it, produced after the bill was acknowledged,
/// confirms it.
pub const UNCONFIRMED: &str = "gatebill.unconfirmed";

/// Whether a changelog record (by its key) is produced unconfirmed first and
/// confirmed once what it stands for is acknowledged: a bill state, or an
/// emitted alert's identity.
pub fn needs_confirmation(key: Option<&[u8]>) -> bool {
    matches!(key.and_then(<[u8]>::first), Some(b'b' | b'a'))
}

/// One change of a partition's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// An account-month's hours in one block of [`BLOCK_HOURS`], absolute.
    UsageBlock {
        /// Account.
        account: String,
        /// Month.
        month: Month,
        /// The block ([`block_of`]).
        block: i32,
        /// The block's hours with usage ([`encode_block`]).
        usage: Vec<u8>,
    },
    /// Format 2: an account-hour's usage, absolute.
    UsageHour {
        /// Account.
        account: String,
        /// Month.
        month: Month,
        /// UTC epoch second the local hour starts at.
        hour_start: i64,
        /// Encoded `MonthUsage` holding that hour alone.
        usage: Vec<u8>,
    },
    /// Request-id hashes one batch added to an hour's dedupe bucket: the
    /// bucket's record number `seq` (0, 1, ... since it started empty).
    Dedupe {
        /// Event hour (epoch hours).
        hour: i64,
        /// The record's number within the bucket.
        seq: u32,
        /// The offset of the batch's last message in the bucket.
        last_offset: i64,
        /// Hash of the input topic.
        topic: u64,
        /// 16-byte hashes.
        hashes: Vec<u8>,
    },
    /// The last emitted bill of an account-month.
    Bill {
        /// Account.
        account: String,
        /// Month.
        month: Month,
        /// Its state.
        state: BillState,
    },
    /// Where the input partition stands.
    Position(PartitionState),
    /// A usage alert emitted: its identity ([`crate::store::alert_key`])
    /// and record. The next owner of the partition does not emit it again.
    Alert {
        /// The identity.
        key: Vec<u8>,
        /// The alert record as emitted.
        record: Vec<u8>,
    },
    /// Format 1: an account-month's usage so far (read as the base of its
    /// hours).
    MonthUsage {
        /// Account.
        account: String,
        /// Month.
        month: Month,
        /// Encoded `MonthUsage`.
        usage: Vec<u8>,
    },
    /// Format 1: request-id hashes a batch added to an hour's bucket.
    DedupeBatch {
        /// Event hour (epoch hours).
        hour: i64,
        /// The offset of the batch's last message in the bucket.
        last_offset: i64,
        /// The bucket restarted empty before these hashes.
        reset: bool,
        /// Hash of the input topic.
        topic: u64,
        /// 16-byte hashes.
        hashes: Vec<u8>,
    },
    /// A record deleted (a tombstone: the key with no value): a dedupe
    /// record of a bucket the store dropped.
    Gone {
        /// The deleted record's key.
        key: Vec<u8>,
    },
}

/// Hours in a usage block: a batch writes, for each account-month and block
/// of this many hours it touched, the block's usage so far, absolute. A day
/// keeps the records few (one or two per account-month and batch while
/// events arrive in time order, whatever the month's age) and each bounded
/// (at most 24 hours); see BENCHMARKS.md, "Changelog". Part of the format:
/// a record's key names its block by this length.
pub const BLOCK_HOURS: i64 = 24;

/// The block of the hour starting at `hour_start` (UTC epoch second):
/// blocks are [`BLOCK_HOURS`] long from the epoch, so a local hour belongs
/// to one block whatever the zone.
pub fn block_of(hour_start: i64) -> i32 {
    hour_start.div_euclid(BLOCK_HOURS * 3600) as i32
}

/// The hours of `block`: hour starts in `from..to`.
pub fn block_span(block: i32) -> (i64, i64) {
    let from = i64::from(block) * BLOCK_HOURS * 3600;
    (from, from + BLOCK_HOURS * 3600)
}

/// Region names a block record writes as a number (`i + 1` for
/// `KNOWN_REGIONS[i]`): the API gateway's regions. A name not in it is
/// written out. Append only: a record's numbers mean these names forever.
pub const KNOWN_REGIONS: &[&str] = &[
    "ap-guangzhou",
    "ap-shanghai",
    "ap-beijing",
    "ap-chengdu",
    "ap-chongqing",
    "ap-nanjing",
    "ap-hongkong",
    "ap-singapore",
    "ap-bangkok",
    "ap-jakarta",
    "ap-mumbai",
    "ap-seoul",
    "ap-tokyo",
    "na-siliconvalley",
    "na-ashburn",
    "na-toronto",
    "sa-saopaulo",
    "eu-frankfurt",
    "eu-moscow",
    "ap-shanghai-fsi",
    "ap-shenzhen-fsi",
    "ap-beijing-fsi",
    "ap-taipei",
    "ap-shenzhen",
    "ap-tianjin",
];

/// A block record's value: the block's hours ([`MonthUsage::encode_compact`]
/// from the block's start, region names by [`KNOWN_REGIONS`]).
pub fn encode_block(block: i32, usage: &MonthUsage) -> Vec<u8> {
    usage.encode_compact(block_span(block).0, KNOWN_REGIONS)
}

/// Inverse of [`encode_block`].
pub fn decode_block(block: i32, value: &[u8]) -> Result<MonthUsage, StoreError> {
    Ok(MonthUsage::decode_compact(value, block_span(block).0, KNOWN_REGIONS)?)
}

/// The key of a dedupe record.
pub fn dedupe_key(hour: i64, seq: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(13);
    k.push(b'e');
    k.extend_from_slice(&hour.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

impl Change {
    /// The record's key and value (a tombstone's value is empty and is
    /// produced as no value: [`TOMBSTONE`]).
    pub fn encode(&self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Change::UsageBlock { account, month, block, usage } => (block_key(account, *month, *block), usage.clone()),
            Change::UsageHour { account, month, hour_start, usage } => {
                let mut k = kind(b'h', &account_month_key(account, *month));
                k.extend_from_slice(&hour_start.to_be_bytes());
                (k, usage.clone())
            }
            Change::Dedupe { hour, seq, last_offset, topic, hashes } => {
                let mut v = Vec::with_capacity(16 + hashes.len());
                v.extend_from_slice(&last_offset.to_be_bytes());
                v.extend_from_slice(&topic.to_be_bytes());
                v.extend_from_slice(hashes);
                (dedupe_key(*hour, *seq), v)
            }
            Change::Bill { account, month, state } => (kind(b'b', &account_month_key(account, *month)), encode_bill_state(state)),
            Change::Position(s) => (vec![b'o'], encode_partition_state(s)),
            Change::Alert { key, record } => (kind(b'a', key), record.clone()),
            Change::Gone { key } => (key.clone(), Vec::new()),
            Change::MonthUsage { account, month, usage } => (kind(b'u', &account_month_key(account, *month)), usage.clone()),
            Change::DedupeBatch { hour, last_offset, reset, topic, hashes } => {
                let mut k = vec![b'd'];
                k.extend_from_slice(&hour.to_be_bytes());
                k.extend_from_slice(&last_offset.to_be_bytes());
                let mut v = vec![u8::from(*reset)];
                v.extend_from_slice(&last_offset.to_be_bytes());
                v.extend_from_slice(&topic.to_be_bytes());
                v.extend_from_slice(hashes);
                (k, v)
            }
        }
    }

    /// [`Change::encode`], moving the bytes a change already carries
    /// (usage, request-id hashes) instead of copying them.
    pub fn into_encoded(self) -> (Vec<u8>, Vec<u8>) {
        match self {
            Change::UsageBlock { account, month, block, usage } => (block_key(&account, month, block), usage),
            Change::Gone { key } => (key, Vec::new()),
            Change::Alert { key, record } => (kind(b'a', &key), record),
            other => other.encode(),
        }
    }

    /// A record read back (`value` `None`: a tombstone).
    pub fn decode(key: &[u8], value: Option<&[u8]>) -> Result<Change, StoreError> {
        let bad = |detail: &str| StoreError::Corrupt { cf: "changelog", detail: detail.into() };
        let Some(value) = value else { return Ok(Change::Gone { key: key.to_vec() }) };
        match key.first() {
            Some(b'k') if key.len() > 5 => {
                let (am, block) = key[1..].split_at(key.len() - 5);
                let (account, month) = parse_account_month_key(am).ok_or_else(|| bad("bad account-month key"))?;
                let block = i32::from_be_bytes(block.try_into().expect("4 bytes"));
                Ok(Change::UsageBlock { account, month, block, usage: value.to_vec() })
            }
            Some(b'h') if key.len() > 9 => {
                let (am, hour) = key[1..].split_at(key.len() - 9);
                let (account, month) = parse_account_month_key(am).ok_or_else(|| bad("bad account-month key"))?;
                let hour_start = i64::from_be_bytes(hour.try_into().expect("8 bytes"));
                Ok(Change::UsageHour { account, month, hour_start, usage: value.to_vec() })
            }
            Some(b'e') if key.len() == 13 && value.len() >= 16 && (value.len() - 16).is_multiple_of(16) => Ok(Change::Dedupe {
                hour: i64::from_be_bytes(key[1..9].try_into().expect("8 bytes")),
                seq: u32::from_be_bytes(key[9..13].try_into().expect("4 bytes")),
                last_offset: i64::from_be_bytes(value[..8].try_into().expect("8 bytes")),
                topic: u64::from_be_bytes(value[8..16].try_into().expect("8 bytes")),
                hashes: value[16..].to_vec(),
            }),
            Some(b'b') => {
                let (account, month) = parse_account_month_key(&key[1..]).ok_or_else(|| bad("bad account-month key"))?;
                Ok(Change::Bill { account, month, state: decode_bill_state(value)? })
            }
            Some(b'o') => Ok(Change::Position(decode_partition_state(value)?)),
            Some(b'a') if key.len() > 1 => Ok(Change::Alert { key: key[1..].to_vec(), record: value.to_vec() }),
            Some(b'u') => {
                let (account, month) = parse_account_month_key(&key[1..]).ok_or_else(|| bad("bad account-month key"))?;
                Ok(Change::MonthUsage { account, month, usage: value.to_vec() })
            }
            Some(b'd') if key.len() == 17 && value.len() >= 17 && (value.len() - 17).is_multiple_of(16) => Ok(Change::DedupeBatch {
                hour: i64::from_be_bytes(key[1..9].try_into().expect("8 bytes")),
                last_offset: i64::from_be_bytes(value[1..9].try_into().expect("8 bytes")),
                reset: value[0] == 1,
                topic: u64::from_be_bytes(value[9..17].try_into().expect("8 bytes")),
                hashes: value[17..].to_vec(),
            }),
            _ => Err(bad("unknown record kind")),
        }
    }
}

/// Header of a changelog record produced as a tombstone (no value); the
/// producer drops it ([`crate::kafka`]).
pub const TOMBSTONE: &str = "gatebill.tombstone";

/// The key of a usage block record: `k`, the account-month, the block.
fn block_key(account: &str, month: Month, block: i32) -> Vec<u8> {
    let mut k = kind(b'k', &account_month_key(account, month));
    k.extend_from_slice(&block.to_be_bytes());
    k
}

fn kind(k: u8, rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + 1);
    out.push(k);
    out.extend_from_slice(rest);
    out
}

/// A partition's state as read from its changelog, by the rules in the
/// module doc.
#[derive(Debug, Default)]
pub struct Restore {
    /// Per account-month and block, its absolute usage by the batch (next
    /// offset) that wrote it.
    blocks: BTreeMap<(String, Month), BlockVersions>,
    /// Format 2: per account-month and hour, as `blocks`.
    usage: BTreeMap<(String, Month), HourVersions>,
    /// Per dedupe record key (hour, seq): (last offset, topic, hashes) by
    /// the batch that wrote it; `None`: deleted.
    dedupe: BTreeMap<(i64, u32), Versions<Option<DedupeValue>>>,
    /// Format 1: per account-month, its usage so far by batch.
    months: BTreeMap<(String, Month), Versions<Vec<u8>>>,
    /// Format 1: dedupe records in log order, with their batch.
    batches: Vec<(i64, Change)>,
    /// Per account-month, the bill state kept and whether it was confirmed.
    bills: BTreeMap<(String, Month), (BillState, bool)>,
    /// Emitted alerts: identity -> record, and whether a confirmed copy
    /// was read.
    alerts: BTreeMap<Vec<u8>, (Vec<u8>, bool)>,
    position: Option<PartitionState>,
    /// Records of batches past this input offset are ignored (see
    /// [`Restore::up_to`]).
    cut: Option<i64>,
    /// Only bill states are kept ([`Restore::bills_only`]).
    bills_only: bool,
    /// Records read.
    pub records: u64,
    /// Bytes of keys and values read.
    pub bytes: u64,
    /// Records of format 1 read.
    pub format1: u64,
    /// Records of format 2 read (`h`).
    pub format2: u64,
}

/// A key's values by the next offset of the batch that wrote each (a later
/// record of the same batch, a retry, replaces it).
type Versions<T> = BTreeMap<i64, T>;

/// An account-month's hours: hour start -> its usage by batch.
type HourVersions = BTreeMap<i64, Versions<Vec<u8>>>;

/// An account-month's blocks: block -> its usage by batch.
type BlockVersions = BTreeMap<i32, Versions<Vec<u8>>>;

/// A dedupe record's value: last offset, topic hash, hashes.
type DedupeValue = (i64, u64, Vec<u8>);

/// One dedupe bucket as restored: its hashes in record order, the offset
/// and topic hash of its last event, and how many records it has in the
/// changelog (the next one's number).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RestoredBucket {
    /// Event hour (epoch hours).
    pub hour: i64,
    /// Offset of the bucket's last event.
    pub last_offset: i64,
    /// Hash of that event's input topic.
    pub topic: u64,
    /// 16-byte hashes.
    pub hashes: Vec<u8>,
    /// Records of the bucket in the changelog (numbered 0..records).
    pub records: u32,
}

/// One account-month's usage as restored (each part encoded `MonthUsage`):
/// a format-1 record of the month so far (`base`), the blocks with records
/// (block, its hours), and the hours with format-2 records written after
/// their block's record (hour start, that hour alone). An hour's usage is
/// its own record's if it has one, else its block's if that has a record,
/// else the base's.
#[derive(Debug, PartialEq, Eq)]
pub struct RestoredMonth {
    /// Account.
    pub account: String,
    /// Month.
    pub month: Month,
    /// Format 1's month so far, if any.
    pub base: Option<Vec<u8>>,
    /// Blocks.
    pub blocks: Vec<(i32, Vec<u8>)>,
    /// Format 2's hours, none older than its block's record.
    pub hours: Vec<(i64, Vec<u8>)>,
}

impl RestoredMonth {
    /// The month's usage, by the rule in the type's doc.
    pub fn usage(&self) -> Result<Vec<u8>, StoreError> {
        if self.base.is_none() && self.blocks.is_empty() {
            return Ok(merge_encoded(self.hours.iter().map(|(_, h)| h.as_slice()))?);
        }
        let own: std::collections::BTreeSet<i64> = self.hours.iter().map(|(h, _)| *h).collect();
        let blocks: std::collections::BTreeSet<i32> = self.blocks.iter().map(|(b, _)| *b).collect();
        let mut month = MonthUsage::default();
        if let Some(base) = &self.base {
            let base = MonthUsage::decode(base)?;
            for h in base.hours().filter(|h| !own.contains(&h.hour_start) && !blocks.contains(&block_of(h.hour_start))) {
                month.add_view(&h);
            }
        }
        for (b, value) in &self.blocks {
            for h in decode_block(*b, value)?.hours().filter(|h| !own.contains(&h.hour_start)) {
                month.add_view(&h);
            }
        }
        for (_, h) in &self.hours {
            month.merge(&MonthUsage::decode(h)?);
        }
        Ok(month.encode())
    }
}

/// What a restore writes into the state store.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    /// Where the input partition continues.
    pub position: Option<PartitionState>,
    /// Account-months with their usage.
    pub usage: Vec<RestoredMonth>,
    /// Dedupe buckets, each whole.
    pub dedupe: Vec<RestoredBucket>,
    /// The last bill per account-month.
    pub bills: Vec<(String, Month, BillState)>,
    /// Emitted alerts: identity and record.
    pub alerts: Vec<(Vec<u8>, Vec<u8>)>,
    /// The changelog partition's end offset the read reached: the next
    /// restore of a store that keeps its own state reads bill states from
    /// there ([`Store::changelog_seen`]).
    pub changelog_end: Option<i64>,
}

impl Restore {
    /// A restore that ignores records of batches ending past `committed`,
    /// the consumer group's committed offset: with transactions, those are
    /// records of transactions that did not commit, which a broker that
    /// delivers aborted data (tansu 0.6, the mock cluster) shows anyway.
    pub fn up_to(committed: Option<i64>) -> Restore {
        Restore { cut: committed, ..Restore::default() }
    }

    /// A restore that keeps only bill states: for a worker whose own state
    /// of the partition is at least as far as the group's committed offset
    /// (it keeps its usage, dedupe buckets and position) but which must not
    /// send a revision another owner sent while it did not own the
    /// partition.
    pub fn bills_only() -> Restore {
        Restore { bills_only: true, ..Restore::default() }
    }

    /// Takes the next record of the partition's changelog, in log order.
    pub fn offer(&mut self, next_offset: i64, change: Change, bytes: usize) {
        self.offer_bill(next_offset, change, bytes, true);
    }

    /// [`Restore::offer`] for a record that may be a bill state produced
    /// before its bill (`confirmed == false`: it had the [`UNCONFIRMED`]
    /// header). With transactions a bill chunk produces its states first
    /// (so that a bill any reader saw has its revision here), then the
    /// bills, then the states again as confirmation. A broker that shows
    /// records of open or aborted transactions (the mock cluster, tansu) may
    /// show a state whose bill never reached the output topic: such a state
    /// is kept with its hash marked ([`crate::pipeline::policy::UNCONFIRMED_MARK`]),
    /// so that the bill is sent again above its revision.
    pub fn offer_bill(&mut self, next_offset: i64, change: Change, bytes: usize, confirmed: bool) {
        self.records += 1;
        self.bytes += bytes as u64;
        // Bill states are exempt: they only raise revisions, and a bill
        // record a broker delivered from an uncommitted transaction was
        // seen by readers too, so the next revision must be above it.
        let bill = matches!(change, Change::Bill { .. } | Change::Alert { .. });
        if !bill && (self.bills_only || self.cut.is_some_and(|c| next_offset > c)) {
            return;
        }
        match change {
            Change::UsageBlock { account, month, block, usage } => {
                self.blocks.entry((account, month)).or_default().entry(block).or_default().insert(next_offset, usage);
            }
            Change::UsageHour { account, month, hour_start, usage } => {
                self.format2 += 1;
                self.usage.entry((account, month)).or_default().entry(hour_start).or_default().insert(next_offset, usage);
            }
            Change::Dedupe { hour, seq, last_offset, topic, hashes } => {
                self.dedupe.entry((hour, seq)).or_default().insert(next_offset, Some((last_offset, topic, hashes)));
            }
            Change::MonthUsage { account, month, usage } => {
                self.format1 += 1;
                self.months.entry((account, month)).or_default().insert(next_offset, usage);
            }
            Change::DedupeBatch { .. } => {
                self.format1 += 1;
                self.batches.push((next_offset, change));
            }
            Change::Gone { key } => {
                if let Some(k) = parse_dedupe_key(&key) {
                    self.dedupe.entry(k).or_default().insert(next_offset, None);
                }
            }
            Change::Bill { account, month, state } => self.keep_bill(account, month, state, confirmed),
            Change::Alert { key, record } => {
                let held = self.alerts.entry(key).or_insert((record, confirmed));
                held.1 |= confirmed;
            }
            Change::Position(s) => {
                if self.position.is_none_or(|p| s.next_offset >= p.next_offset) {
                    self.position = Some(s);
                }
            }
        }
    }

    /// The highest revision; of equal ones a confirmation, else the later
    /// (a chunk sent again after an abort).
    fn keep_bill(&mut self, account: String, month: Month, state: BillState, confirmed: bool) {
        match self.bills.entry((account, month)) {
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert((state, confirmed));
            }
            std::collections::btree_map::Entry::Occupied(mut o) => {
                let (held, held_confirmed) = o.get();
                if state.revision > held.revision || (state.revision == held.revision && (confirmed || !held_confirmed)) {
                    o.insert((state, confirmed));
                }
            }
        }
    }

    /// The state to write: records of batches that ended at or before the
    /// last position read (bill states whatever their batch: they only
    /// raise revisions). Nothing at all when no position was read.
    pub fn finish(self) -> Restored {
        let bills = self.bills.into_iter().map(|((a, m), (s, confirmed))| (a, m, if confirmed { s } else { unconfirmed(s) })).collect();
        // An alert whose identity was never confirmed may not have reached
        // the alerts topic (a broker that shows an open or aborted
        // transaction's records): it is sent again.
        let alerts = self.alerts.into_iter().filter(|(_, (_, confirmed))| *confirmed).map(|(k, (r, _))| (k, r)).collect();
        let Some(position) = self.position else {
            return Restored { bills, alerts, ..Restored::default() };
        };
        let upto = position.next_offset;
        let usage = restored_months(self.months, self.blocks, self.usage, upto);
        let mut dedupe = format1_buckets(self.batches, upto);
        for ((hour, seq), by_batch) in self.dedupe {
            let Some(Some((last_offset, topic, hashes))) = as_of(by_batch, upto) else { continue };
            let b = bucket(&mut dedupe, hour);
            b.hashes.extend_from_slice(&hashes);
            (b.last_offset, b.topic, b.records) = (last_offset, topic, seq + 1);
        }
        Restored { position: Some(position), usage, dedupe, bills, alerts, changelog_end: None }
    }
}

/// Each account-month's usage as of `upto`: its format-1 month so far, its
/// blocks, and its format-2 hours written after their block's record.
fn restored_months(
    months: BTreeMap<(String, Month), Versions<Vec<u8>>>,
    blocks: BTreeMap<(String, Month), BlockVersions>,
    hours: BTreeMap<(String, Month), HourVersions>,
    upto: i64,
) -> Vec<RestoredMonth> {
    // Blocks with the next offset of the batch that wrote the kept record.
    type Parts = (Option<Vec<u8>>, Vec<(i32, i64, Vec<u8>)>, Vec<(i64, Vec<u8>)>);
    let mut out_of: BTreeMap<(String, Month), Parts> = BTreeMap::new();
    for (key, by_batch) in months {
        if let Some(base) = as_of(by_batch, upto) {
            out_of.insert(key, (Some(base), Vec::new(), Vec::new()));
        }
    }
    for (key, by_block) in blocks {
        let kept: Vec<(i32, i64, Vec<u8>)> = by_block.into_iter().filter_map(|(b, v)| latest(v, upto).map(|(at, u)| (b, at, u))).collect();
        if !kept.is_empty() {
            out_of.entry(key).or_insert_with(|| (None, Vec::new(), Vec::new())).1 = kept;
        }
    }
    for (key, by_hour) in hours {
        let month_blocks = out_of.get(&key).map_or(&[][..], |p| p.1.as_slice());
        let block_at = |h: i64| month_blocks.binary_search_by_key(&block_of(h), |x| x.0).ok().map(|i| month_blocks[i].1);
        let kept: Vec<(i64, Vec<u8>)> = by_hour
            .into_iter()
            .filter_map(|(h, v)| {
                let (at, u) = latest(v, upto)?;
                block_at(h).is_none_or(|b| b < at).then_some((h, u))
            })
            .collect();
        if !kept.is_empty() {
            out_of.entry(key).or_insert_with(|| (None, Vec::new(), Vec::new())).2 = kept;
        }
    }
    out_of
        .into_iter()
        .map(|((account, month), (base, blocks, hours))| RestoredMonth {
            account,
            month,
            base,
            blocks: blocks.into_iter().map(|(b, _, u)| (b, u)).collect(),
            hours,
        })
        .collect()
}

/// The bucket of `hour` among `buckets`, added empty if absent.
fn bucket(buckets: &mut Vec<RestoredBucket>, hour: i64) -> &mut RestoredBucket {
    let at = match buckets.iter().position(|b| b.hour == hour) {
        Some(i) => i,
        None => {
            buckets.push(RestoredBucket { hour, ..RestoredBucket::default() });
            buckets.len() - 1
        }
    };
    &mut buckets[at]
}

/// Format 1's buckets as of `upto`: each hour's batch records in log order
/// (a reset empties the bucket first).
fn format1_buckets(batches: Vec<(i64, Change)>, upto: i64) -> Vec<RestoredBucket> {
    let mut out: Vec<RestoredBucket> = Vec::new();
    for (_, change) in batches.into_iter().filter(|(o, _)| *o <= upto) {
        let Change::DedupeBatch { hour, last_offset, reset, topic, hashes } = change else { continue };
        let b = bucket(&mut out, hour);
        if reset {
            b.hashes.clear();
        }
        b.hashes.extend_from_slice(&hashes);
        (b.last_offset, b.topic) = (last_offset, topic);
    }
    out
}

/// A key's value as of the last batch at or before `upto`.
fn as_of<T>(by_batch: Versions<T>, upto: i64) -> Option<T> {
    latest(by_batch, upto).map(|(_, v)| v)
}

/// A key's last batch at or before `upto` (its next offset) and its value then.
fn latest<T>(by_batch: Versions<T>, upto: i64) -> Option<(i64, T)> {
    by_batch.into_iter().take_while(|(o, _)| *o <= upto).last()
}

/// The (hour, seq) of a dedupe record's key.
fn parse_dedupe_key(key: &[u8]) -> Option<(i64, u32)> {
    if key.len() != 13 || key[0] != b'e' {
        return None;
    }
    Some((i64::from_be_bytes(key[1..9].try_into().ok()?), u32::from_be_bytes(key[9..13].try_into().ok()?)))
}

/// A bill state seen but not confirmed: its bill may or may not have
/// reached the output topic. It stays as it is (the next revision is above
/// it, a final one stays final), its hash marked so that the bill is sent
/// again when its month is recomputed, changed or not
/// ([`crate::pipeline::policy::next_record`]).
fn unconfirmed(s: BillState) -> BillState {
    use crate::pipeline::policy::UNCONFIRMED_MARK;
    if s.content_hash.starts_with(UNCONFIRMED_MARK) {
        return s;
    }
    BillState { content_hash: format!("{UNCONFIRMED_MARK}{}", s.content_hash), ..s }
}

impl Restored {
    /// Writes a partition's state restored from the changelog in one atomic
    /// batch: absolute usage (every restored month marked dirty, so its bill
    /// is recomputed and emitted only if it changed), dedupe buckets, bill
    /// states that raise the revision held, and the position, when it is
    /// ahead of the one held. Atomic because usage and position must agree:
    /// usage ahead of its position would be counted twice.
    ///
    /// `replace`: the partition's dedupe buckets held are dropped first (the
    /// store may hold state the changelog does not, after an unclean stop);
    /// usage the changelog has is overwritten either way.
    pub fn write(&self, store: &Store, input_topic: &str, partition: i32, replace: bool) -> Result<(), StoreError> {
        let r = self;
        let mut b = store.batch();
        if replace {
            for (hour, ..) in store.dedupe_index(partition)? {
                b.delete_dedupe(partition, hour);
            }
        }
        for m in &r.usage {
            b.put_usage_encoded(&m.account, m.month, &m.usage()?);
            b.mark_dirty(&m.account, m.month, partition);
        }
        // Each bucket whole, over what the store held of it.
        for d in &r.dedupe {
            b.delete_dedupe(partition, d.hour);
            if !d.hashes.is_empty() {
                b.append_dedupe(partition, d.hour, &d.hashes);
            }
            b.put_dedupe_index(partition, d.hour, d.last_offset, d.topic, d.records);
        }
        let keys: Vec<(&str, Month)> = r.bills.iter().map(|(a, m, _)| (a.as_str(), *m)).collect();
        for ((a, m, s), held) in r.bills.iter().zip(store.bill_state_many(&keys)?) {
            if held.is_none_or(|h| h.revision < s.revision) {
                b.put_bill_state(a, *m, s);
                // Recomputed even without restored usage: the record another
                // worker sent shows its state, not necessarily this store's
                // (a next revision follows when they differ; an unconfirmed
                // one is sent again either way). A month without usage
                // computes no bill and keeps the state.
                b.mark_dirty(a, *m, partition);
            }
        }
        // An alert any reader may have seen stays emitted (like a bill
        // state, whatever its batch).
        for (key, record) in &r.alerts {
            b.put_alert(key, record);
        }
        if let Some(end) = r.changelog_end {
            b.put_changelog_seen(partition, end);
        }
        if let Some(pos) = r.position {
            if store.partition(input_topic, partition)?.is_none_or(|held| held.next_offset < pos.next_offset) {
                b.put_partition(input_topic, partition, pos);
            }
        }
        store.write(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::BillStatus;

    const MARCH: Month = Month { year: 2021, month: 3 };
    /// 2021-03-05T10:00:00+08:00.
    const HOUR: i64 = 1_614_909_600;

    /// Account A's March restored from format-2 hours alone.
    fn month(hours: Vec<(i64, Vec<u8>)>) -> RestoredMonth {
        RestoredMonth { account: "A".into(), month: MARCH, base: None, blocks: Vec::new(), hours }
    }

    fn bill(revision: u64) -> BillState {
        BillState { revision, status: BillStatus::Final, content_hash: format!("h{revision}"), partition: 2 }
    }

    /// An alert's identity is restored only when a confirmed copy was read:
    /// an unconfirmed one alone may stand for a record that never reached
    /// the alerts topic, so the next owner sends it.
    #[test]
    fn an_alert_identity_is_restored_once_confirmed() {
        let alert =
            |subject: &str| Change::Alert { key: crate::store::alert_key("A", MARCH, 3, subject), record: subject.as_bytes().to_vec() };
        let mut r = Restore::bills_only();
        r.offer_bill(10, alert("100"), 1, false);
        r.offer_bill(10, alert("200"), 1, false);
        r.offer_bill(10, alert("200"), 1, true);
        r.offer_bill(11, alert("300"), 1, true);
        let restored = r.finish();
        let subjects: Vec<&[u8]> = restored.alerts.iter().map(|(_, record)| record.as_slice()).collect();
        assert_eq!(subjects, [&b"200"[..], b"300"]);
        assert!(needs_confirmation(Some(&alert("1").encode().0)) && needs_confirmation(Some(b"bX")) && !needs_confirmation(Some(b"kX")));
    }

    #[test]
    fn every_kind_of_record_reads_back_as_written() {
        for c in [
            Change::UsageBlock { account: "A".into(), month: MARCH, block: block_of(HOUR), usage: vec![1, 2, 3] },
            Change::UsageBlock { account: "A".into(), month: MARCH, block: -3, usage: vec![1] },
            Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![1, 2, 3] },
            Change::Dedupe { hour: -5, last_offset: 77, seq: 3, topic: 9, hashes: vec![7; 32] },
            Change::Bill { account: "B".into(), month: MARCH, state: bill(4) },
            Change::Position(PartitionState { next_offset: 10, watermark_ms: 1_000 }),
            Change::Alert { key: crate::store::alert_key("A", MARCH, 2, "100"), record: b"{}".to_vec() },
        ] {
            let (k, v) = c.encode();
            assert_eq!(Change::decode(&k, Some(&v)).unwrap(), c);
        }
        // A tombstone is the key with no value.
        let gone = Change::Gone { key: dedupe_key(-5, 3) };
        assert_eq!(Change::decode(&gone.encode().0, None).unwrap(), gone);
        assert!(Change::decode(b"x", Some(b"")).is_err());
        // Format 1's records read back too.
        for c in [
            Change::MonthUsage { account: "A".into(), month: MARCH, usage: vec![1, 2] },
            Change::DedupeBatch { hour: -5, last_offset: 77, reset: true, topic: 9, hashes: vec![7; 32] },
        ] {
            let (k, v) = c.encode();
            assert_eq!(Change::decode(&k, Some(&v)).unwrap(), c);
        }
    }

    /// A dedupe bucket is its records in sequence order; one that restarted
    /// empty deletes its earlier records (tombstones) and numbers from 0;
    /// the month's usage is its hours, each as of the last batch written.
    #[test]
    fn buckets_and_months_are_restored_from_their_records_tombstones_applied() {
        let at = |o: i64| Change::Position(PartitionState { next_offset: o, watermark_ms: 0 });
        let d = |seq, last_offset, fill| Change::Dedupe { hour: 7, seq, last_offset, topic: 1, hashes: vec![fill; 16] };
        let hour = |h: i64, v: u8| Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR + h * 3600, usage: vec![v] };
        let mut r = Restore::default();
        r.offer(10, d(0, 9, 1), 1);
        r.offer(10, hour(0, 1), 1);
        r.offer(20, d(1, 19, 2), 1);
        r.offer(20, hour(0, 2), 1);
        r.offer(20, hour(1, 5), 1);
        r.offer(20, Change::Dedupe { hour: 8, seq: 0, last_offset: 18, topic: 1, hashes: vec![9; 16] }, 1);
        // Hour 8's bucket expired: its only record deleted.
        r.offer(30, Change::Gone { key: dedupe_key(8, 0) }, 1);
        r.offer(30, at(30), 1);
        let done = r.finish();
        assert_eq!(done.usage, vec![month(vec![(HOUR, vec![2]), (HOUR + 3600, vec![5])])]);
        let hashes: Vec<u8> = [vec![1; 16], vec![2; 16]].concat();
        assert_eq!(done.dedupe, vec![RestoredBucket { hour: 7, last_offset: 19, topic: 1, hashes, records: 2 }]);
        // Hour 7 restarted empty: records 0 and 1 deleted, a new 0.
        let mut r = Restore::default();
        r.offer(10, d(0, 9, 1), 1);
        r.offer(20, d(1, 19, 2), 1);
        r.offer(40, Change::Gone { key: dedupe_key(7, 0) }, 1);
        r.offer(40, Change::Gone { key: dedupe_key(7, 1) }, 1);
        r.offer(40, d(0, 39, 3), 1);
        r.offer(40, at(40), 1);
        assert_eq!(r.finish().dedupe, vec![RestoredBucket { hour: 7, last_offset: 39, topic: 1, hashes: vec![3; 16], records: 1 }]);
    }

    /// A writer died while producing its last batch (offsets 10..20): the
    /// usage it wrote for that batch is not applied, the position stays at
    /// the last complete batch, and the new owner reads the batch again.
    #[test]
    fn a_partly_produced_batch_is_not_applied() {
        let usage = |v: u8| Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![v] };
        let at = |o: i64| Change::Position(PartitionState { next_offset: o, watermark_ms: o * 100 });
        let mut r = Restore::default();
        r.offer(10, usage(1), 1);
        r.offer(10, Change::Dedupe { hour: 1, last_offset: 9, seq: 0, topic: 1, hashes: vec![1; 16] }, 1);
        r.offer(10, at(10), 1);
        r.offer(20, usage(2), 1);
        r.offer(20, Change::Dedupe { hour: 1, last_offset: 19, seq: 0, topic: 1, hashes: vec![2; 16] }, 1);
        // A record delivered twice (an outbox retry) changes nothing.
        r.offer(10, usage(1), 1);
        r.offer(10, Change::Bill { account: "A".into(), month: MARCH, state: bill(3) }, 1);
        r.offer(10, Change::Bill { account: "A".into(), month: MARCH, state: bill(2) }, 1);
        assert_eq!(r.records, 8);
        let done = r.finish();
        assert_eq!(done.position, Some(PartitionState { next_offset: 10, watermark_ms: 1_000 }));
        assert_eq!(done.usage, vec![month(vec![(HOUR, vec![1])])]);
        assert_eq!(done.dedupe.len(), 1);
        assert_eq!(done.bills, vec![("A".to_string(), MARCH, bill(3))]);
    }

    #[test]
    fn later_batches_replace_usage_and_positions_only_move_forward() {
        let mut r = Restore::default();
        r.offer(10, Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![1] }, 1);
        r.offer(10, Change::Position(PartitionState { next_offset: 10, watermark_ms: 0 }), 1);
        r.offer(30, Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![3] }, 1);
        r.offer(30, Change::Position(PartitionState { next_offset: 30, watermark_ms: 0 }), 1);
        // A stale record produced late (a restarted old owner's outbox).
        r.offer(20, Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![2] }, 1);
        r.offer(20, Change::Position(PartitionState { next_offset: 20, watermark_ms: 0 }), 1);
        let done = r.finish();
        assert_eq!(done.position.unwrap().next_offset, 30);
        assert_eq!(done.usage, vec![month(vec![(HOUR, vec![3])])]);
    }

    /// A writer died in the middle of a bill chunk: March's and April's
    /// states were produced before their bills (unconfirmed) and never
    /// confirmed; their earlier revisions were. Each keeps its revision and
    /// status, its hash marked: its bill is sent again, changed or not, and
    /// a final one stays final (a reader may have seen it).
    #[test]
    fn a_bill_state_produced_before_its_bill_and_not_confirmed_is_sent_again() {
        const APRIL: Month = Month { year: 2021, month: 4 };
        let b = |month: Month, revision: u64, status: BillStatus| Change::Bill {
            account: "A".into(),
            month,
            state: BillState { revision, status, content_hash: format!("h{revision}"), partition: 2 },
        };
        let mut r = Restore::default();
        r.offer_bill(10, b(MARCH, 1, BillStatus::Provisional), 1, false);
        r.offer_bill(10, b(MARCH, 1, BillStatus::Provisional), 1, true);
        r.offer_bill(10, b(APRIL, 2, BillStatus::Final), 1, false);
        r.offer_bill(10, b(APRIL, 2, BillStatus::Final), 1, true);
        // The dying writer's chunk: both unconfirmed.
        r.offer_bill(20, b(MARCH, 2, BillStatus::Final), 1, false);
        r.offer_bill(20, b(APRIL, 3, BillStatus::Restated), 1, false);
        // An older confirmation delivered late changes nothing.
        r.offer_bill(10, b(MARCH, 1, BillStatus::Provisional), 1, true);
        let done = r.finish();
        let state = |revision, status, content_hash: &str| BillState { revision, status, content_hash: content_hash.into(), partition: 2 };
        assert_eq!(
            done.bills,
            vec![
                ("A".to_string(), MARCH, state(2, BillStatus::Final, "?h2")),
                ("A".to_string(), APRIL, state(3, BillStatus::Restated, "?h3")),
            ]
        );
        // What the next owner sends for the same content: March final at
        // revision 3 (even if it does not see the month closed yet), April
        // restated at revision 4.
        use crate::pipeline::policy::{next_record, Emitted};
        fn emitted(s: &BillState) -> Option<Emitted<'_>> {
            Some(Emitted { revision: s.revision, status: s.status, content_hash: &s.content_hash })
        }
        assert_eq!(next_record(emitted(&done.bills[0].2), "h2", false), Some((3, BillStatus::Final)));
        assert_eq!(next_record(emitted(&done.bills[1].2), "h3", true), Some((4, BillStatus::Restated)));
    }

    /// Of two states of one revision, a confirmation wins over an
    /// unconfirmed one whatever the order, and of two unconfirmed ones (a
    /// chunk sent again after an abort) the later.
    #[test]
    fn of_equal_revisions_the_confirmed_then_the_later_state_is_kept() {
        let b = |hash: &str| Change::Bill {
            account: "A".into(),
            month: MARCH,
            state: BillState { revision: 2, status: BillStatus::Provisional, content_hash: hash.into(), partition: 2 },
        };
        let hash_of = |r: Restore| r.finish().bills[0].2.content_hash.clone();
        let mut r = Restore::default();
        r.offer_bill(10, b("a"), 1, false);
        r.offer_bill(10, b("b"), 1, false);
        r.offer_bill(10, b("b"), 1, true);
        assert_eq!(hash_of(r), "b");
        let mut r = Restore::default();
        r.offer_bill(10, b("a"), 1, true);
        r.offer_bill(10, b("b"), 1, false);
        assert_eq!(hash_of(r), "a");
        let mut r = Restore::default();
        r.offer_bill(10, b("a"), 1, false);
        r.offer_bill(10, b("b"), 1, false);
        assert_eq!(hash_of(r), "?b");
    }

    /// A worker gets a partition back whose stored state is at least as far
    /// as the group's committed offset (a broker that does not store
    /// transactional offset commits can show one behind what the other
    /// owner did): it keeps its usage and position and takes only the bill
    /// states that raise its revisions, their months marked to be
    /// recomputed, and how far it has now seen the changelog.
    #[test]
    fn a_store_that_keeps_its_own_state_takes_only_bill_states_that_raise_its_revisions() {
        const APRIL: Month = Month { year: 2021, month: 4 };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let state = |revision, hash: &str| BillState { revision, status: BillStatus::Provisional, content_hash: hash.into(), partition: 2 };
        let mut b = store.batch();
        b.put_usage_encoded("A", MARCH, &[7]);
        b.put_partition("in", 2, PartitionState { next_offset: 238, watermark_ms: 1 });
        b.put_bill_state("A", MARCH, &state(1, "mine"));
        b.put_bill_state("A", APRIL, &state(3, "mine"));
        store.write(b).unwrap();

        let mut r = Restore::bills_only();
        r.offer(400, Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![9] }, 1);
        r.offer(400, Change::Position(PartitionState { next_offset: 400, watermark_ms: 2 }), 1);
        r.offer(400, Change::Dedupe { hour: 1, last_offset: 399, seq: 0, topic: 1, hashes: vec![2; 16] }, 1);
        r.offer(27, Change::Bill { account: "A".into(), month: MARCH, state: state(2, "theirs") }, 1);
        r.offer(27, Change::Bill { account: "A".into(), month: APRIL, state: state(2, "theirs") }, 1);
        let mut done = r.finish();
        assert_eq!((done.position, done.usage.len(), done.dedupe.len()), (None, 0, 0));
        done.changelog_end = Some(500);
        done.write(&store, "in", 2, false).unwrap();

        assert_eq!(store.partition("in", 2).unwrap().unwrap().next_offset, 238);
        assert_eq!(store.usage_raw_many(&[("A", MARCH)]).unwrap(), vec![Some(vec![7])]);
        assert_eq!(store.dedupe_index(2).unwrap().len(), 0);
        assert_eq!(
            store.bill_states().unwrap(),
            vec![("A".to_string(), MARCH, state(2, "theirs")), ("A".to_string(), APRIL, state(3, "mine"))]
        );
        assert_eq!(store.dirty().unwrap(), vec![("A".to_string(), MARCH, 2)], "only the raised month is recomputed");
        assert_eq!(store.changelog_seen(2).unwrap(), Some(500));
    }

    /// A transaction that wrote offsets 20..30 did not commit (the group's
    /// offset is 20), and its records are delivered anyway: they are ignored.
    #[test]
    fn records_past_the_committed_offset_are_ignored() {
        let usage = |v: u8| Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR, usage: vec![v] };
        let at = |o: i64| Change::Position(PartitionState { next_offset: o, watermark_ms: o * 100 });
        let mut r = Restore::up_to(Some(20));
        r.offer(20, usage(1), 1);
        r.offer(20, at(20), 1);
        r.offer(30, usage(2), 1);
        r.offer(30, Change::Dedupe { hour: 1, last_offset: 29, seq: 0, topic: 1, hashes: vec![2; 16] }, 1);
        r.offer(30, at(30), 1);
        r.offer(30, Change::Bill { account: "A".into(), month: MARCH, state: bill(5) }, 1);
        let done = r.finish();
        assert_eq!(done.position.unwrap().next_offset, 20);
        assert_eq!(done.bills, vec![("A".to_string(), MARCH, bill(5))], "revisions only rise (a confirmed state)");
        assert_eq!(done.usage, vec![month(vec![(HOUR, vec![1])])]);
        assert!(done.dedupe.is_empty());
    }

    /// A changelog written by format 1 then format 2 (an upgraded group): a
    /// month is its format-1 month so far with the hours format 2 wrote
    /// replaced; a bucket its format-1 batches, then its format-2 records.
    #[test]
    fn format_1_records_are_the_base_that_format_2_records_replace() {
        use crate::billing::usage::MonthUsage;
        let hour = |h: i64, calls: u64| {
            let mut m = MonthUsage::default();
            for _ in 0..calls {
                m.add(HOUR + h * 3600, "eu", &crate::billing::Metered { public_out_bytes: 10, ..Default::default() });
            }
            m
        };
        let mut so_far = hour(0, 2);
        so_far.merge(&hour(1, 3));
        let mut r = Restore::default();
        r.offer(10, Change::MonthUsage { account: "A".into(), month: MARCH, usage: so_far.encode() }, 1);
        r.offer(10, Change::DedupeBatch { hour: 7, last_offset: 9, reset: false, topic: 1, hashes: vec![1; 16] }, 1);
        r.offer(10, Change::Position(PartitionState { next_offset: 10, watermark_ms: 0 }), 1);
        // Format 2 from offset 10 on: hour 1 grows to 4 calls, hour 2 is new.
        r.offer(20, Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR + 3600, usage: hour(1, 4).encode() }, 1);
        r.offer(20, Change::UsageHour { account: "A".into(), month: MARCH, hour_start: HOUR + 7200, usage: hour(2, 1).encode() }, 1);
        r.offer(20, Change::Dedupe { hour: 7, seq: 0, last_offset: 19, topic: 1, hashes: vec![2; 16] }, 1);
        r.offer(20, Change::Position(PartitionState { next_offset: 20, watermark_ms: 0 }), 1);
        assert_eq!(r.format1, 2);
        let done = r.finish();
        let usage = MonthUsage::decode(&done.usage[0].usage().unwrap()).unwrap();
        assert_eq!(usage.hours().map(|h| (h.hour_start - HOUR, h.calls)).collect::<Vec<_>>(), vec![(0, 2), (3600, 4), (7200, 1)]);
        let hashes: Vec<u8> = [vec![1; 16], vec![2; 16]].concat();
        assert_eq!(done.dedupe, vec![RestoredBucket { hour: 7, last_offset: 19, topic: 1, hashes, records: 1 }]);
    }

    /// Format 3's blocks: a block's latest record holds all its hours; a
    /// changelog written by format 2 then format 3 (an upgraded group)
    /// gives each hour the later of its own record and its block's.
    #[test]
    fn blocks_replace_older_hours_and_the_later_record_of_an_hour_wins() {
        use crate::billing::usage::MonthUsage;
        let hours = |hs: &[(i64, u64)]| {
            let mut m = MonthUsage::default();
            for &(h, calls) in hs {
                for _ in 0..calls {
                    m.add(HOUR + h * 3600, "eu", &crate::billing::Metered { public_out_bytes: 10, ..Default::default() });
                }
            }
            m.encode()
        };
        let b = block_of(HOUR);
        assert_eq!((block_of(block_span(b).0 - 1), block_span(b).0 <= HOUR, HOUR < block_span(b).1), (b - 1, true, true));
        // Hours 0..n of the test are in block b, hour n starts the next.
        let n = (block_span(b).1 - HOUR) / 3600;
        assert_eq!((block_of(HOUR + (n - 1) * 3600), block_of(HOUR + n * 3600)), (b, b + 1));
        let block = |blk: i32, hs: &[(i64, u64)]| Change::UsageBlock {
            account: "A".into(),
            month: MARCH,
            block: blk,
            usage: encode_block(blk, &MonthUsage::decode(&hours(hs)).unwrap()),
        };
        let hour = |h: i64, calls: u64| Change::UsageHour {
            account: "A".into(),
            month: MARCH,
            hour_start: HOUR + h * 3600,
            usage: hours(&[(h, calls)]),
        };
        let mut r = Restore::default();
        // Format 2: hours 0, 1 and n (block b + 1).
        r.offer(10, hour(0, 1), 1);
        r.offer(10, hour(1, 1), 1);
        r.offer(10, hour(n, 7), 1);
        // Format 3: block b with hours 0 and 1 grown, then hour 1 again in a
        // later block record; block b + 1's hour n keeps its format-2 record.
        r.offer(20, block(b, &[(0, 2), (1, 2)]), 1);
        r.offer(30, block(b, &[(0, 2), (1, 3), (2, 1)]), 1);
        // A format-2 record of hour 2 older than the block: replaced.
        r.offer(25, hour(2, 9), 1);
        r.offer(30, Change::Position(PartitionState { next_offset: 30, watermark_ms: 0 }), 1);
        // Past the position: ignored.
        r.offer(40, block(b, &[(0, 5)]), 1);
        assert_eq!((r.format1, r.format2), (0, 4));
        let done = r.finish();
        assert_eq!(done.usage.len(), 1);
        assert_eq!(done.usage[0].blocks.len(), 1);
        assert_eq!(done.usage[0].hours.iter().map(|(h, _)| (h - HOUR) / 3600).collect::<Vec<_>>(), vec![n]);
        let usage = MonthUsage::decode(&done.usage[0].usage().unwrap()).unwrap();
        assert_eq!(
            usage.hours().map(|h| ((h.hour_start - HOUR) / 3600, h.calls)).collect::<Vec<_>>(),
            vec![(0, 2), (1, 3), (2, 1), (n, 7)]
        );
        // A format-2 hour written after its block's record wins over the block.
        let mut r = Restore::default();
        r.offer(10, block(b, &[(0, 2), (1, 2)]), 1);
        r.offer(20, hour(1, 4), 1);
        r.offer(20, Change::Position(PartitionState { next_offset: 20, watermark_ms: 0 }), 1);
        let usage = MonthUsage::decode(&r.finish().usage[0].usage().unwrap()).unwrap();
        assert_eq!(usage.hours().map(|h| ((h.hour_start - HOUR) / 3600, h.calls)).collect::<Vec<_>>(), vec![(0, 2), (1, 4)]);
        // Format 1's month so far under blocks: a block replaces its hours of the base.
        let mut r = Restore::default();
        r.offer(10, Change::MonthUsage { account: "A".into(), month: MARCH, usage: hours(&[(0, 1), (n, 1)]) }, 1);
        r.offer(20, block(b, &[(1, 1)]), 1);
        r.offer(20, Change::Position(PartitionState { next_offset: 20, watermark_ms: 0 }), 1);
        let usage = MonthUsage::decode(&r.finish().usage[0].usage().unwrap()).unwrap();
        assert_eq!(usage.hours().map(|h| ((h.hour_start - HOUR) / 3600, h.calls)).collect::<Vec<_>>(), vec![(1, 1), (n, 1)]);
    }
}
