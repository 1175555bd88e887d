//! The state store: one RocksDB database holding every piece of state that
//! must change together (usage, dedupe keys, partition offsets, the outbox,
//! bill revisions, dirty marks, account records), written in one
//! `WriteBatch` per processing step.
//!
//! Durability: every batch is written with `sync = true`, so a batch that
//! returned is on disk before any record it implies is produced.

use crate::billing::calendar::Month;
use crate::billing::usage::{put_varint, read_varint, MonthUsage, UsageDecodeError};
use crate::billing::BillStatus;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Column family names, one constant each, and the list of all.
pub mod cf {
    /// (account, month) -> encoded `MonthUsage`.
    pub const USAGE: &str = "usage";
    /// (partition, event hour) -> the 128-bit hashes of the request ids seen
    /// in that hour, 16 bytes each, appended by a merge operator.
    pub const DEDUPE: &str = "dedupe";
    /// (partition, event hour) -> the input offset of the last event placed
    /// in that hour's dedupe bucket and a 64-bit hash of its input topic
    /// (8 + 8 bytes, BE): decides when the bucket expires.
    pub const DEDUPE_INDEX: &str = "dedupe_index";
    /// (topic, partition) -> next offset to read and event-time watermark.
    pub const OFFSETS: &str = "offsets";
    /// Records written but not yet acknowledged by the broker.
    pub const OUTBOX: &str = "outbox";
    /// (account, month) -> last emitted revision, status, content hash.
    pub const BILLS: &str = "bills";
    /// (account, month) -> partition: bills to recompute at the next emit.
    pub const DIRTY: &str = "dirty";
    /// account id -> raw account record JSON.
    pub const ACCOUNTS: &str = "accounts";
    /// Format version and counters.
    pub const META: &str = "meta";
    /// Usage alert identity (account-month, kind, subject) -> the alert
    /// record emitted for it: each identity is emitted once.
    pub const ALERTS: &str = "alerts";
    /// Every column family.
    pub const ALL: [&str; 10] = [USAGE, DEDUPE, DEDUPE_INDEX, OFFSETS, OUTBOX, BILLS, DIRTY, ACCOUNTS, META, ALERTS];
}

/// On-disk format version. A store written with another version is refused.
pub const STORE_FORMAT_VERSION: u32 = 3;
const META_VERSION_KEY: &[u8] = b"format_version";

/// What can go wrong with the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the lock.
    #[error(
        "state directory {0} is in use by another gatebill process (lock held on {0}/LOCK.gatebill); stop it or use another --state-dir"
    )]
    Locked(PathBuf),
    /// Written by an incompatible gatebill.
    #[error("state directory {dir} was written with state format {found}, this gatebill reads format {STORE_FORMAT_VERSION}; use the gatebill version that wrote it, or rebuild the state with `gatebill replay` into an empty directory")]
    Version {
        /// The directory.
        dir: PathBuf,
        /// Version found.
        found: u32,
    },
    /// RocksDB failed.
    #[error("state store error: {0}")]
    Rocks(#[from] rocksdb::Error),
    /// The directory cannot be created or locked.
    #[error("state directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The state directory setting is empty.
    #[error(
        "the state directory is empty (an empty --state-dir, GATEBILL_STATE_DIR=\"\" or worker.state_dir = \"\"); \
         give a directory, e.g. --state-dir gatebill-state, or unset the variable for the default"
    )]
    EmptyPath,
    /// The directory holds files that are not a gatebill store.
    #[error(
        "{dir} is not a gatebill state directory ({what}). gatebill does not turn a directory with other files \
         into its store; give an empty or new directory (--state-dir, GATEBILL_STATE_DIR or worker.state_dir), or the \
         state directory of an earlier gatebill run"
    )]
    Foreign {
        /// The directory.
        dir: PathBuf,
        /// What it is instead, e.g. `it holds notes.txt, photos`.
        what: String,
    },
    /// RocksDB cannot open the store: the message says why and what to do.
    #[error("cannot open the state store in {dir}: {detail}. {advice}")]
    Open {
        /// The directory.
        dir: PathBuf,
        /// RocksDB's own words.
        detail: String,
        /// What to do about it.
        advice: &'static str,
    },
    /// The billing time zone differs from the one the stored usage was
    /// aggregated in (its months and hours are that zone's).
    #[error(
        "billing.time_zone is {now}, but the usage in this state directory was aggregated by the months and hours of \
         {stored}: bills cannot be restated across time zones from it. Replay the input into an empty state directory \
         with the new time zone, or keep billing.time_zone = \"{stored}\""
    )]
    TimeZoneChanged {
        /// The zone of the stored usage.
        stored: String,
        /// The configured zone.
        now: String,
    },
    /// A stored value cannot be decoded.
    #[error("state store holds a corrupt value in `{cf}`: {detail}")]
    Corrupt {
        /// Column family.
        cf: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// What to do when RocksDB refuses to open a store, by its error kind.
const DAMAGED: &str = "The store's files are damaged (a CURRENT or MANIFEST file changed, truncated or removed; a full \
disk or a copy taken while a worker ran can do this). Move the directory aside (keep it to investigate) and rebuild \
the state into an empty directory: `gatebill replay` from the input topic, or `gatebill run`, which with \
transactions restores its partitions from the changelog";
const UNREADABLE: &str = "Check that the directory and every file in it can be read and written by this user, that \
the disk has space, and that no file was removed; if files are missing, move the directory aside and rebuild the \
state into an empty directory (`gatebill replay`, or `gatebill run` with transactions: it restores from the changelog)";
const OTHER: &str = "If the directory was written by another program or another RocksDB version, give gatebill an \
empty directory instead; otherwise move it aside and rebuild the state there (`gatebill replay`)";

impl StoreError {
    /// RocksDB's refusal to open `dir`, with what to do.
    fn open(dir: &Path, e: rocksdb::Error) -> StoreError {
        use rocksdb::ErrorKind as K;
        let advice = match e.kind() {
            K::Corruption => DAMAGED,
            K::IOError | K::NotFound if e.as_ref().contains("MANIFEST") || e.as_ref().contains("CURRENT") => DAMAGED,
            K::IOError | K::NotFound | K::Busy | K::TimedOut | K::TryAgain => UNREADABLE,
            _ => OTHER,
        };
        StoreError::Open { dir: dir.to_path_buf(), detail: e.into_string(), advice }
    }
}

/// Files of an unfinished first open of a store (no `CURRENT` yet): opening
/// it again finishes it.
fn is_store_scaffolding(name: &str) -> bool {
    matches!(name, "LOCK" | "LOG" | "LOCK.gatebill" | "RUNNING.gatebill") || name.starts_with("LOG.old.")
}

/// Refuses a directory that is not (and cannot become) a gatebill store
/// without losing something: one holding other files, one whose RocksDB
/// database lacks gatebill's column families, or one whose RocksDB files
/// lack `CURRENT`. A missing or empty directory is fine (a new store).
fn check_not_foreign(dir: &Path) -> Result<(), StoreError> {
    let io = |source| StoreError::Io { dir: dir.to_path_buf(), source };
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) if dir.exists() && !dir.is_dir() => {
            return Err(StoreError::Foreign { dir: dir.to_path_buf(), what: "it is a file".into() });
        }
        Err(e) => return Err(io(e)),
    };
    let mut names: Vec<String> = Vec::new();
    for e in entries {
        names.push(e.map_err(io)?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    if names.iter().any(|n| n == "CURRENT") {
        let cfs = DB::list_cf(&Options::default(), dir).map_err(|e| StoreError::open(dir, e))?;
        // Every gatebill store has `meta` (its format version, checked
        // after the open: an older gatebill's store is refused by version).
        if cfs.iter().any(|x| x == cf::META) {
            return Ok(());
        }
        return Err(StoreError::Foreign {
            dir: dir.to_path_buf(),
            what: format!("it holds a RocksDB database of another program, column families {}", cfs.join(", ")),
        });
    }
    let others: Vec<&String> = names.iter().filter(|n| !is_store_scaffolding(n)).collect();
    if others.is_empty() {
        return Ok(());
    }
    let rocks = others.iter().any(|n| n.starts_with("MANIFEST-") || n.ends_with(".sst") || n.starts_with("OPTIONS-"));
    if rocks {
        return Err(StoreError::Open {
            dir: dir.to_path_buf(),
            detail: "RocksDB files without their CURRENT file".into(),
            advice: DAMAGED,
        });
    }
    let shown: Vec<&str> = others.iter().take(5).map(|n| n.as_str()).collect();
    let what = if others.len() > shown.len() {
        format!("it holds {} and {} more entries", shown.join(", "), others.len() - shown.len())
    } else {
        format!("it holds {}", shown.join(", "))
    };
    Err(StoreError::Foreign { dir: dir.to_path_buf(), what })
}

impl From<UsageDecodeError> for StoreError {
    fn from(e: UsageDecodeError) -> Self {
        StoreError::Corrupt { cf: cf::USAGE, detail: e.to_string() }
    }
}

/// Where a partition stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionState {
    /// Next input offset to process.
    pub next_offset: i64,
    /// Largest event time seen, epoch ms (the event-time watermark).
    pub watermark_ms: i64,
}

/// The last bill emitted for a key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BillState {
    /// Revision of the last record.
    pub revision: u64,
    /// Status of the last record.
    pub status: BillStatus,
    /// Content hash of the last record.
    pub content_hash: String,
    /// Input partition the account's events come from (-1 when unknown).
    pub partition: i32,
}

/// A record to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxRecord {
    /// Destination topic.
    pub topic: String,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Message value.
    pub payload: Vec<u8>,
    /// Message headers.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The partition to produce to; `None`: the producer's partitioner
    /// decides by key. Changelog records name theirs (input partition p's
    /// state goes to changelog partition p).
    pub partition: Option<i32>,
}

impl OutboxRecord {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.payload.len() + 64);
        put_bytes(&mut out, self.topic.as_bytes());
        match &self.key {
            Some(k) => {
                out.push(1);
                put_bytes(&mut out, k);
            }
            None => out.push(0),
        }
        put_bytes(&mut out, &self.payload);
        put_varint(&mut out, self.headers.len() as u64);
        for (k, v) in &self.headers {
            put_bytes(&mut out, k.as_bytes());
            put_bytes(&mut out, v);
        }
        // A trailing field, absent from records written before it existed.
        if let Some(p) = self.partition {
            put_varint(&mut out, u64::from(p as u32) + 1);
        }
        out
    }

    fn decode(b: &[u8]) -> Option<OutboxRecord> {
        let mut r = Cursor { b, pos: 0 };
        let topic = String::from_utf8(r.bytes()?.to_vec()).ok()?;
        let key = match r.byte()? {
            1 => Some(r.bytes()?.to_vec()),
            _ => None,
        };
        let payload = r.bytes()?.to_vec();
        let n = r.varint()?;
        let mut headers = Vec::new();
        for _ in 0..n {
            let k = String::from_utf8(r.bytes()?.to_vec()).ok()?;
            headers.push((k, r.bytes()?.to_vec()));
        }
        let partition = if r.pos < b.len() { Some((r.varint()?.checked_sub(1)? as u32) as i32) } else { None };
        Some(OutboxRecord { topic, key, payload, headers, partition })
    }
}

/// Decodes a stored outbox value.
pub fn decode_outbox(b: &[u8]) -> Option<OutboxRecord> {
    OutboxRecord::decode(b)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let v = *self.b.get(self.pos)?;
        self.pos += 1;
        Some(v)
    }
    fn varint(&mut self) -> Option<u64> {
        read_varint(self.b, &mut self.pos)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.varint()?).ok()?;
        let s = self.b.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
}

/// Reads accounts' months from the usage column family with one iterator
/// ([`Store::usage_scan`]); it sees the store as it was when made.
pub struct UsageScan<'s> {
    it: rocksdb::DBRawIteratorWithThreadMode<'s, DB>,
}

impl UsageScan<'_> {
    /// The months of one account that have usage, in order.
    pub fn month_list(&mut self, account: &str) -> Result<Vec<Month>, StoreError> {
        self.months_from(account, None)
    }

    /// The months of one account after `month` that have usage, in order.
    /// Only those are read: a month's value is merged when the scan
    /// reaches it, and an account's earlier months may hold a month of
    /// hours each.
    pub fn months_after(&mut self, account: &str, month: Month) -> Result<Vec<Month>, StoreError> {
        self.months_from(account, Some(month.next()))
    }

    /// The months of one account from `from` on (`None`: the first) that
    /// have usage, in order.
    fn months_from(&mut self, account: &str, from: Option<Month>) -> Result<Vec<Month>, StoreError> {
        let mut out = Vec::new();
        self.each_from(account, from, |month, _| {
            out.push(month);
            Ok(())
        })?;
        Ok(out)
    }

    /// Every month of one account.
    pub fn account_months(&mut self, account: &str) -> Result<BTreeMap<Month, MonthUsage>, StoreError> {
        let mut out = BTreeMap::new();
        self.each_from(account, None, |month, v| {
            out.insert(month, MonthUsage::decode(v)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` with each (month, encoded usage) of one account from month
    /// `from` on (`None`: the first), in month order.
    fn each_from(
        &mut self,
        account: &str,
        from: Option<Month>,
        mut f: impl FnMut(Month, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = account_prefix(account);
        match from {
            Some(m) => self.it.seek(account_month_key(account, m)),
            None => self.it.seek(&prefix),
        }
        while let Some((k, v)) = self.it.item() {
            if !k.starts_with(&prefix) {
                break;
            }
            let (_, month) = parse_account_month_key(k).ok_or(StoreError::Corrupt { cf: cf::USAGE, detail: "bad key".into() })?;
            f(month, v)?;
            self.it.next();
        }
        Ok(self.it.status()?)
    }
}

/// Key of an (account, month): length-prefixed account id, then the month
/// ordinal big-endian, so one account's months are a contiguous prefix range.
pub fn account_month_key(account: &str, month: Month) -> Vec<u8> {
    let mut k = account_prefix(account);
    k.extend_from_slice(&month.ordinal().to_be_bytes());
    k
}

fn account_prefix(account: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(account.len() + 6);
    k.extend_from_slice(&(account.len() as u16).to_be_bytes());
    k.extend_from_slice(account.as_bytes());
    k
}

/// Inverse of [`account_month_key`].
pub fn parse_account_month_key(k: &[u8]) -> Option<(String, Month)> {
    let len = u16::from_be_bytes(k.get(..2)?.try_into().ok()?) as usize;
    let account = std::str::from_utf8(k.get(2..2 + len)?).ok()?.to_string();
    let ord = u32::from_be_bytes(k.get(2 + len..6 + len)?.try_into().ok()?);
    Some((account, Month::from_ordinal(ord)))
}

/// A dedupe bucket's index entry ([`Store::dedupe_index`]): event hour,
/// offset and topic hash of its last event, its changelog records.
pub type BucketIndex = (i64, i64, u64, u32);

/// The `offsets` entries of [`Store::changelog_seen`]: a name no Kafka
/// topic can have (`#` is not allowed in topic names).
const CHANGELOG_SEEN: &str = "#changelog-seen";

fn offset_key(topic: &str, partition: i32) -> Vec<u8> {
    let mut k = topic.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Dedupe bucket key: partition, then the event hour (sign-flipped big-endian
/// so the byte order is the time order). Pruning a partition's old hours is
/// one range delete.
fn dedupe_key(partition: i32, hour: i64) -> Vec<u8> {
    let mut k = partition.to_be_bytes().to_vec();
    k.extend_from_slice(&((hour as u64) ^ (1 << 63)).to_be_bytes());
    k
}

/// Outbox key of a bill: only the newest record per bill key is kept.
pub fn outbox_bill_key(bill_key: &str) -> Vec<u8> {
    let mut k = b"b".to_vec();
    k.extend_from_slice(bill_key.as_bytes());
    k
}

/// Outbox key of a usage alert: `a` + its identity ([`alert_key`]).
pub fn outbox_alert_key(identity: &[u8]) -> Vec<u8> {
    let mut k = b"a".to_vec();
    k.extend_from_slice(identity);
    k
}

/// The stored identity of a usage alert: the account-month key, the kind's
/// code, then the subject (item, pack id or threshold).
pub fn alert_key(account: &str, month: Month, kind: u8, subject: &str) -> Vec<u8> {
    let mut k = account_month_key(account, month);
    k.push(kind);
    k.extend_from_slice(subject.as_bytes());
    k
}

/// Outbox key of a dead letter: its sequence number.
pub fn outbox_dead_letter_key(seq: u64) -> Vec<u8> {
    let mut k = b"d".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Outbox key of a changelog record: `c` + sequence number, so a drain
/// produces a partition's changelog in the order it was written.
pub fn outbox_changelog_key(seq: u64) -> Vec<u8> {
    let mut k = b"c".to_vec();
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The RocksDB-backed state store.
pub struct Store {
    db: DB,
    dir: PathBuf,
    /// Held for the store's lifetime: a second process cannot open the
    /// directory for writing. `None` for a secondary (read-only) open.
    _lock: Option<File>,
    /// A secondary open's own directory (its info log), removed on drop.
    scratch: Option<PathBuf>,
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(s) = &self.scratch {
            let _ = std::fs::remove_dir_all(s);
        }
    }
}

/// Everything one step changes, applied atomically by [`Store::write`].
pub struct Batch<'a> {
    store: &'a Store,
    wb: WriteBatch,
    /// Outbox records kept out of the write batch, for a caller that
    /// delivers them itself before writing ([`Store::capturing_batch`]).
    captured: Option<Vec<OutboxRecord>>,
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, locking it, with the
    /// default memory bounds ([`StoreMemory::default`]).
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        Store::open_sized(dir, StoreMemory::default())
    }

    /// Opens (creating if needed) the store in `dir`, locking it, its
    /// memtables and block cache bounded by `memory`.
    pub fn open_sized(dir: &Path, memory: StoreMemory) -> Result<Store, StoreError> {
        if dir.as_os_str().is_empty() {
            return Err(StoreError::EmptyPath);
        }
        let io = |source| StoreError::Io { dir: dir.to_path_buf(), source };
        check_not_foreign(dir)?;
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = File::create(dir.join("LOCK.gatebill")).map_err(io)?;
        match fs4::fs_std::FileExt::try_lock_exclusive(&lock) {
            Ok(true) => {}
            Ok(false) => return Err(StoreError::Locked(dir.to_path_buf())),
            Err(e) => return Err(io(e)),
        }
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        let cfs = column_families(&mut opts, memory);
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| StoreError::open(dir, e))?;
        let store = Store { db, dir: dir.to_path_buf(), _lock: Some(lock), scratch: None };
        let meta = store.cf(cf::META);
        match store.db.get_cf(meta, META_VERSION_KEY)? {
            Some(v) => {
                let found = v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX);
                if found != STORE_FORMAT_VERSION {
                    return Err(StoreError::Version { dir: dir.to_path_buf(), found });
                }
            }
            None => store.db.put_cf(meta, META_VERSION_KEY, STORE_FORMAT_VERSION.to_be_bytes())?,
        }
        Ok(store)
    }

    /// Opens the store in `dir` for reading only, as a RocksDB secondary
    /// instance: no lock is taken, so it works beside a running worker
    /// (reading what the worker had written when it was opened) and on a
    /// stopped worker's directory. Writes nothing there; its own info log
    /// goes to a scratch directory removed on drop.
    pub fn open_read_only(dir: &Path) -> Result<Store, StoreError> {
        if dir.as_os_str().is_empty() {
            return Err(StoreError::EmptyPath);
        }
        if !dir.join("CURRENT").is_file() {
            return Err(StoreError::Io {
                dir: dir.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no gatebill state store here (give the worker's worker.state_dir)",
                ),
            });
        }
        let scratch = std::env::temp_dir().join(format!(
            "gatebill-secondary-{}-{}",
            std::process::id(),
            xxhash_rust::xxh3::xxh3_64(dir.as_os_str().as_encoded_bytes())
        ));
        let mut opts = Options::default();
        opts.set_max_open_files(-1);
        let cfs = column_families(&mut opts, StoreMemory::default());
        let opened =
            DB::open_cf_descriptors_as_secondary(&opts, dir, &scratch, cfs).and_then(|db| db.try_catch_up_with_primary().map(|()| db));
        let db = match opened {
            Ok(db) => db,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&scratch);
                return Err(StoreError::open(dir, e));
            }
        };
        let store = Store { db, dir: dir.to_path_buf(), _lock: None, scratch: Some(scratch) };
        let found = store
            .db
            .get_cf(store.cf(cf::META), META_VERSION_KEY)?
            .map(|v| v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(u32::MAX));
        if found != Some(STORE_FORMAT_VERSION) {
            return Err(StoreError::Version { dir: dir.to_path_buf(), found: found.unwrap_or(0) });
        }
        Ok(store)
    }
}

/// The column families with their options (merge operators included: usage
/// and dedupe values are merge operands until compaction, so every open,
/// a read-only one too, needs them), and the database-wide options.
/// The memory a store's RocksDB may hold by its own bounds: what
/// `worker.memtable_mb` and `worker.block_cache_mb` set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoreMemory {
    /// Bytes all memtables of the store may hold together: past it, the
    /// largest is flushed to disk. Default 128 MB.
    pub memtable_bytes: usize,
    /// Bytes of the block cache shared by every column family (data,
    /// index and filter blocks). Default 64 MB.
    pub block_cache_bytes: usize,
}

impl Default for StoreMemory {
    fn default() -> Self {
        StoreMemory { memtable_bytes: 128 << 20, block_cache_bytes: 64 << 20 }
    }
}

fn column_families(opts: &mut Options, memory: StoreMemory) -> Vec<ColumnFamilyDescriptor> {
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.increase_parallelism(2);
    // Every column family's memtables together stay under one bound (the
    // defaults allow 2 x 64 MB per column family, nine of them): the
    // largest one is flushed when the total passes it.
    opts.set_write_buffer_manager(&rocksdb::WriteBufferManager::new_write_buffer_manager(memory.memtable_bytes, false));
    // Point lookups (dedupe keys, usage of an account-month) are mostly
    // misses or hits on recent data: bloom filters answer misses without
    // reading blocks, and a shared block cache keeps hot blocks.
    let cache = rocksdb::Cache::new_lru_cache(memory.block_cache_bytes);
    let cfs = cf::ALL.iter().map(|name| {
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_bloom_filter(10.0, false);
        block.set_block_cache(&cache);
        block.set_cache_index_and_filter_blocks(true);
        let mut o = Options::default();
        o.set_block_based_table_factory(&block);
        o.set_compression_type(rocksdb::DBCompressionType::Lz4);
        if *name == cf::USAGE || *name == cf::DEDUPE {
            o.set_write_buffer_size(32 << 20);
        }
        if *name == cf::DEDUPE {
            // A batch appends the hashes it saw to its hours' buckets.
            o.set_merge_operator_associative("gatebill_dedupe_concat_v1", merge_concat);
        }
        if *name == cf::USAGE {
            // Usage is written as deltas and summed by RocksDB (the merge
            // is commutative and associative), so a batch never reads,
            // decodes and rewrites a whole month to add an hour.
            o.set_merge_operator_associative("gatebill_usage_sum_v1", merge_usage);
        }
        ColumnFamilyDescriptor::new(*name, o)
    });
    cfs.collect()
}

impl Store {
    /// The directory the store lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column family created at open")
    }

    /// Starts a batch.
    pub fn batch(&self) -> Batch<'_> {
        Batch { store: self, wb: WriteBatch::default(), captured: None }
    }

    /// A batch whose outbox records are captured instead of written: the
    /// caller delivers them (in a Kafka transaction) and then writes the
    /// rest with [`Store::write_staged`].
    pub fn capturing_batch(&self) -> Batch<'_> {
        Batch { store: self, wb: WriteBatch::default(), captured: Some(Vec::new()) }
    }

    /// Writes the state part of a staged batch ([`Batch::into_staged`]),
    /// atomically and synced, like [`Store::write`].
    pub fn write_staged(&self, wb: WriteBatch) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.write_opt(wb, &wo)?;
        Ok(())
    }

    /// Writes a batch atomically and durably (fsync of the WAL).
    pub fn write(&self, batch: Batch<'_>) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        // Synced: a batch that returned survives a power loss, so nothing is
        // produced (and no offset committed) on the strength of unsynced state.
        wo.set_sync(true);
        self.db.write_opt(batch.wb, &wo)?;
        Ok(())
    }

    /// A value of the meta column family (format version, shard counts).
    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf::META), key.as_bytes())?)
    }

    /// Every value of the meta column family whose key starts with `prefix`,
    /// in key order.
    pub fn meta_with_prefix(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::META), IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Writes a value of the meta column family, synced.
    pub fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db.put_cf_opt(self.cf(cf::META), key.as_bytes(), value, &wo)?;
        Ok(())
    }

    /// Where a partition stands, if this store has processed it.
    pub fn partition(&self, topic: &str, partition: i32) -> Result<Option<PartitionState>, StoreError> {
        let v = self.db.get_cf(self.cf(cf::OFFSETS), offset_key(topic, partition))?;
        v.map(|v| decode_partition_state(&v)).transpose()
    }

    /// How far this store has seen changelog partition `partition`: the end
    /// offset of the last restore's read, or the partition's end when the
    /// worker last gave it up (see `worker::Restorer`). Bill states past it
    /// are another worker's.
    pub fn changelog_seen(&self, partition: i32) -> Result<Option<i64>, StoreError> {
        Ok(self.partition(CHANGELOG_SEEN, partition)?.map(|s| s.next_offset))
    }

    /// Every partition of `topic` this store has processed.
    pub fn partitions(&self, topic: &str) -> Result<BTreeMap<i32, PartitionState>, StoreError> {
        let mut prefix = topic.as_bytes().to_vec();
        prefix.push(0);
        let mut out = BTreeMap::new();
        for item in self.db.prefix_iterator_cf(self.cf(cf::OFFSETS), &prefix) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) || k.len() != prefix.len() + 4 {
                break;
            }
            let p = i32::from_be_bytes(k[prefix.len()..].try_into().expect("4 bytes"));
            if let Some(s) = self.partition(topic, p)? {
                out.insert(p, s);
            }
        }
        Ok(out)
    }

    /// One account-month's usage.
    pub fn usage(&self, account: &str, month: Month) -> Result<Option<MonthUsage>, StoreError> {
        match self.db.get_pinned_cf(self.cf(cf::USAGE), account_month_key(account, month))? {
            Some(v) => Ok(Some(MonthUsage::decode(&v)?)),
            None => Ok(None),
        }
    }

    /// Many account-months' encoded usage in one multi-get, in the order asked
    /// (decode with [`MonthUsage::decode`]).
    pub fn usage_raw_many(&self, keys: &[(&str, Month)]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        self.account_months_raw(cf::USAGE, keys)
    }

    /// Many bill states in one multi-get, in the order asked.
    pub fn bill_state_many(&self, keys: &[(&str, Month)]) -> Result<Vec<Option<BillState>>, StoreError> {
        self.account_months_raw(cf::BILLS, keys)?.into_iter().map(|v| v.map(|v| decode_bill_state(&v)).transpose()).collect()
    }

    /// Which of these alert identities ([`alert_key`]) were emitted, one
    /// multi-get.
    pub fn alerts_emitted(&self, keys: &[Vec<u8>]) -> Result<Vec<bool>, StoreError> {
        let cf = self.cf(cf::ALERTS);
        self.db.multi_get_cf(keys.iter().map(|k| (cf, k.as_slice()))).into_iter().map(|r| Ok(r?.is_some())).collect()
    }

    /// Every emitted alert record, in identity order (account, month, kind, subject).
    pub fn alert_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::ALERTS), IteratorMode::Start) {
            out.push(item?.1.to_vec());
        }
        Ok(out)
    }

    /// The dirty marks of account-months (their partitions), one multi-get.
    pub fn dirty_many(&self, keys: &[(&str, Month)]) -> Result<Vec<Option<i32>>, StoreError> {
        Ok(self
            .account_months_raw(cf::DIRTY, keys)?
            .into_iter()
            .map(|v| v.map(|v| <[u8; 4]>::try_from(&v[..]).map(i32::from_be_bytes).unwrap_or(-1)))
            .collect())
    }

    /// Raw values of account-month keys in one column family, one multi-get.
    fn account_months_raw(&self, name: &str, keys: &[(&str, Month)]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let cf = self.cf(name);
        let ks: Vec<Vec<u8>> = keys.iter().map(|(a, m)| account_month_key(a, *m)).collect();
        self.db.multi_get_cf(ks.iter().map(|k| (cf, k))).into_iter().map(|r| Ok(r?)).collect()
    }

    /// The request-id hashes seen in one partition's hour: 16 bytes each.
    pub fn dedupe_bucket(&self, partition: i32, hour: i64) -> Result<Vec<u8>, StoreError> {
        let v = self.db.get_pinned_cf(self.cf(cf::DEDUPE), dedupe_key(partition, hour))?;
        match v {
            Some(v) if v.len() % 16 == 0 => Ok(v.to_vec()),
            Some(v) => Err(StoreError::Corrupt { cf: cf::DEDUPE, detail: format!("bucket of {} bytes", v.len()) }),
            None => Ok(Vec::new()),
        }
    }

    /// Every live dedupe bucket of a partition: (event hour, input offset of
    /// the last event placed in it, hash of that event's input topic, its
    /// records in the changelog: 0 for an entry written before changelog
    /// format 2).
    pub fn dedupe_index(&self, partition: i32) -> Result<Vec<BucketIndex>, StoreError> {
        let prefix = partition.to_be_bytes();
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::DEDUPE_INDEX), IteratorMode::From(&prefix, rocksdb::Direction::Forward)) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let bad = || StoreError::Corrupt { cf: cf::DEDUPE_INDEX, detail: "bad entry".into() };
            let hour = <[u8; 8]>::try_from(&k[4..]).map_err(|_| bad())?;
            if v.len() != 16 && v.len() != 20 {
                return Err(bad());
            }
            let last = i64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
            let topic = u64::from_be_bytes(v[8..16].try_into().expect("8 bytes"));
            let records = v.get(16..20).map_or(0, |r| u32::from_be_bytes(r.try_into().expect("4 bytes")));
            out.push(((u64::from_be_bytes(hour) ^ (1 << 63)) as i64, last, topic, records));
        }
        Ok(out)
    }

    /// The months of one account that have usage, in order (values not decoded).
    pub fn account_month_list(&self, account: &str) -> Result<Vec<Month>, StoreError> {
        self.usage_scan().month_list(account)
    }

    /// Every month of one account.
    pub fn account_months(&self, account: &str) -> Result<BTreeMap<Month, MonthUsage>, StoreError> {
        self.usage_scan().account_months(account)
    }

    /// Whether no account-month has usage.
    pub fn usage_is_empty(&self) -> Result<bool, StoreError> {
        let mut it = self.db.raw_iterator_cf(self.cf(cf::USAGE));
        it.seek_to_first();
        it.status()?;
        Ok(!it.valid())
    }

    /// A reader of many accounts' months through one RocksDB iterator
    /// (making an iterator costs more than a seek): for loops over accounts.
    pub fn usage_scan(&self) -> UsageScan<'_> {
        UsageScan { it: self.db.raw_iterator_cf(self.cf(cf::USAGE)) }
    }

    /// A stored account record (raw JSON).
    pub fn account(&self, account: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.db.get_cf(self.cf(cf::ACCOUNTS), account.as_bytes())?)
    }

    /// Every stored account record.
    pub fn accounts(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::ACCOUNTS), IteratorMode::Start) {
            let (k, v) = item?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// Every emitted bill's state.
    pub fn bill_states(&self) -> Result<Vec<(String, Month, BillState)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::BILLS), IteratorMode::Start) {
            let (k, v) = item?;
            let (a, m) = parse_account_month_key(&k).ok_or(StoreError::Corrupt { cf: cf::BILLS, detail: "bad key".into() })?;
            out.push((a, m, decode_bill_state(&v)?));
        }
        Ok(out)
    }

    /// Account-months waiting for a bill, with the partition they came from.
    pub fn dirty(&self) -> Result<Vec<(String, Month, i32)>, StoreError> {
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::DIRTY), IteratorMode::Start) {
            let (k, v) = item?;
            let (a, m) = parse_account_month_key(&k).ok_or(StoreError::Corrupt { cf: cf::DIRTY, detail: "bad key".into() })?;
            let p = <[u8; 4]>::try_from(&v[..]).map(i32::from_be_bytes).unwrap_or(-1);
            out.push((a, m, p));
        }
        Ok(out)
    }

    /// Every record waiting to be produced, in key order.
    pub fn outbox(&self) -> Result<Vec<(Vec<u8>, OutboxRecord)>, StoreError> {
        self.outbox_page(None, usize::MAX)
    }

    /// The raw outbox values under keys (to check they were not replaced), in one multi-get.
    pub fn outbox_raw_many(&self, keys: &[&[u8]]) -> Result<Vec<Option<Vec<u8>>>, StoreError> {
        let cf = self.cf(cf::OUTBOX);
        self.db.multi_get_cf(keys.iter().map(|k| (cf, *k))).into_iter().map(|r| Ok(r?)).collect()
    }

    /// Up to `limit` records waiting to be produced, in key order, starting
    /// after `after` (from the first when `None`).
    pub fn outbox_page(&self, after: Option<&[u8]>, limit: usize) -> Result<Vec<(Vec<u8>, OutboxRecord)>, StoreError> {
        let mode = match after {
            Some(k) => IteratorMode::From(k, rocksdb::Direction::Forward),
            None => IteratorMode::Start,
        };
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(cf::OUTBOX), mode) {
            let (k, v) = item?;
            if after == Some(&k[..]) {
                continue;
            }
            let r = OutboxRecord::decode(&v).ok_or(StoreError::Corrupt { cf: cf::OUTBOX, detail: "undecodable record".into() })?;
            out.push((k.to_vec(), r));
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The next free dead-letter sequence number.
    pub fn next_dead_letter_seq(&self) -> Result<u64, StoreError> {
        self.next_outbox_seq(b'd')
    }

    /// The next sequence number of outbox records keyed `prefix` + u64
    /// (dead letters `d`, changelog records `c`), from the last one waiting.
    pub fn next_outbox_seq(&self, prefix: u8) -> Result<u64, StoreError> {
        let mut it = self.db.iterator_cf(self.cf(cf::OUTBOX), IteratorMode::From(&[prefix + 1], rocksdb::Direction::Reverse));
        match it.next() {
            Some(item) => {
                let (k, _) = item?;
                if k.first() == Some(&prefix) && k.len() == 9 {
                    Ok(u64::from_be_bytes(k[1..].try_into().expect("8 bytes")) + 1)
                } else {
                    Ok(0)
                }
            }
            None => Ok(0),
        }
    }

    /// Flushes and compacts every column family (usage deltas summed into
    /// one value per account-month, deleted data dropped); returns the bytes
    /// of SST files per column family afterwards.
    pub fn compact_all(&self) -> Result<Vec<(&'static str, u64)>, StoreError> {
        let mut out = Vec::new();
        let mut opts = rocksdb::CompactOptions::default();
        // Rewrite the last level too, so deletions are dropped, not kept as tombstones.
        opts.set_bottommost_level_compaction(rocksdb::BottommostLevelCompaction::Force);
        for name in cf::ALL {
            let cf = self.cf(name);
            self.db.flush_cf(cf)?;
            self.db.compact_range_cf_opt(cf, None::<&[u8]>, None::<&[u8]>, &opts);
            out.push((name, self.db.property_int_value_cf(cf, "rocksdb.total-sst-files-size")?.unwrap_or(0)));
        }
        Ok(out)
    }

    /// Memory RocksDB holds, by kind: `memtables` (every column family's,
    /// flushing ones included), `block_cache` (shared) and `table_readers`
    /// (index and filter blocks outside the cache).
    pub fn memory(&self) -> Vec<(&'static str, u64)> {
        let sum = |property: &str| -> u64 {
            cf::ALL.iter().map(|name| self.db.property_int_value_cf(self.cf(name), property).ok().flatten().unwrap_or(0)).sum()
        };
        let cache = self.db.property_int_value_cf(self.cf(cf::USAGE), "rocksdb.block-cache-usage").ok().flatten().unwrap_or(0);
        vec![
            ("memtables", sum("rocksdb.size-all-mem-tables")),
            ("block_cache", cache),
            ("table_readers", sum("rocksdb.estimate-table-readers-mem")),
        ]
    }

    /// Approximate live data size in bytes per column family.
    pub fn sizes(&self) -> Vec<(&'static str, u64)> {
        cf::ALL
            .iter()
            .map(|name| {
                let v = self.db.property_int_value_cf(self.cf(name), "rocksdb.estimate-live-data-size").ok().flatten().unwrap_or(0)
                    + self.db.property_int_value_cf(self.cf(name), "rocksdb.cur-size-all-mem-tables").ok().flatten().unwrap_or(0);
                (*name, v)
            })
            .collect()
    }
}

/// The usage merge operator: the sum of the stored month and every delta.
/// Returns `None` (RocksDB reports corruption) if a value does not decode;
/// it never panics across the FFI boundary.
fn merge_usage(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    crate::billing::usage::merge_encoded(existing.into_iter().chain(operands)).ok()
}

/// The dedupe merge operator: the bucket's hashes, then each batch's.
fn merge_concat(_key: &[u8], existing: Option<&[u8]>, operands: &rocksdb::MergeOperands) -> Option<Vec<u8>> {
    let mut out = existing.map(<[u8]>::to_vec).unwrap_or_default();
    for op in operands {
        out.extend_from_slice(op);
    }
    Some(out)
}

/// A bill state as stored (and as the changelog carries it).
pub fn encode_bill_state(s: &BillState) -> Vec<u8> {
    let mut v = s.revision.to_be_bytes().to_vec();
    v.push(match s.status {
        BillStatus::Provisional => 0,
        BillStatus::Final => 1,
        BillStatus::Restated => 2,
    });
    v.extend_from_slice(&s.partition.to_be_bytes());
    v.extend_from_slice(s.content_hash.as_bytes());
    v
}

/// A partition state as stored (and as the changelog carries it): next
/// offset and watermark, 8 bytes each.
pub fn encode_partition_state(s: &PartitionState) -> Vec<u8> {
    let mut v = s.next_offset.to_be_bytes().to_vec();
    v.extend_from_slice(&s.watermark_ms.to_be_bytes());
    v
}

/// [`encode_partition_state`] read back.
pub fn decode_partition_state(v: &[u8]) -> Result<PartitionState, StoreError> {
    if v.len() != 16 {
        return Err(StoreError::Corrupt { cf: cf::OFFSETS, detail: format!("{} bytes", v.len()) });
    }
    Ok(PartitionState {
        next_offset: i64::from_be_bytes(v[..8].try_into().expect("8 bytes")),
        watermark_ms: i64::from_be_bytes(v[8..].try_into().expect("8 bytes")),
    })
}

/// [`encode_bill_state`] read back.
pub fn decode_bill_state(v: &[u8]) -> Result<BillState, StoreError> {
    let bad = || StoreError::Corrupt { cf: cf::BILLS, detail: "bad bill state".into() };
    if v.len() < 9 {
        return Err(bad());
    }
    let revision = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
    let status = match v[8] {
        0 => BillStatus::Provisional,
        1 => BillStatus::Final,
        2 => BillStatus::Restated,
        _ => return Err(bad()),
    };
    if v.len() < 13 {
        return Err(bad());
    }
    let partition = i32::from_be_bytes(v[9..13].try_into().expect("4 bytes"));
    let content_hash = String::from_utf8(v[13..].to_vec()).map_err(|_| bad())?;
    Ok(BillState { revision, status, content_hash, partition })
}

impl Batch<'_> {
    /// Adds already encoded usage (see [`crate::billing::usage::encode_numbered`]) to an account-month.
    pub fn merge_usage_encoded(&mut self, account: &str, month: Month, encoded: &[u8]) {
        self.wb.merge_cf(self.store.cf(cf::USAGE), account_month_key(account, month), encoded);
    }

    /// Appends request-id hashes (16 bytes each) to a partition's hour.
    pub fn append_dedupe(&mut self, partition: i32, hour: i64, hashes: &[u8]) {
        self.wb.merge_cf(self.store.cf(cf::DEDUPE), dedupe_key(partition, hour), hashes);
    }

    /// Records the input offset (and input topic hash) of the last event
    /// placed in a partition's hour, and how many changelog records the
    /// bucket has.
    pub fn put_dedupe_index(&mut self, partition: i32, hour: i64, last_offset: i64, topic: u64, records: u32) {
        let mut v = last_offset.to_be_bytes().to_vec();
        v.extend_from_slice(&topic.to_be_bytes());
        v.extend_from_slice(&records.to_be_bytes());
        self.wb.put_cf(self.store.cf(cf::DEDUPE_INDEX), dedupe_key(partition, hour), v);
    }

    /// Forgets a partition's hour of request-id hashes (data and index entry).
    pub fn delete_dedupe(&mut self, partition: i32, hour: i64) {
        self.wb.delete_cf(self.store.cf(cf::DEDUPE), dedupe_key(partition, hour));
        self.wb.delete_cf(self.store.cf(cf::DEDUPE_INDEX), dedupe_key(partition, hour));
    }

    /// Sets how far this store has seen a changelog partition
    /// ([`Store::changelog_seen`]).
    pub fn put_changelog_seen(&mut self, partition: i32, end: i64) {
        self.put_partition(CHANGELOG_SEEN, partition, PartitionState { next_offset: end, watermark_ms: 0 });
    }

    /// Sets where a partition stands.
    pub fn put_partition(&mut self, topic: &str, partition: i32, s: PartitionState) {
        self.wb.put_cf(self.store.cf(cf::OFFSETS), offset_key(topic, partition), encode_partition_state(&s));
    }

    /// Replaces an account-month's usage with an absolute, encoded value
    /// (a changelog restore; the hot path merges deltas instead).
    pub fn put_usage_encoded(&mut self, account: &str, month: Month, encoded: &[u8]) {
        self.wb.put_cf(self.store.cf(cf::USAGE), account_month_key(account, month), encoded);
    }

    /// Queues a record for production (a capturing batch keeps it as it
    /// is, without a copy).
    pub fn put_outbox(&mut self, key: &[u8], r: OutboxRecord) {
        match &mut self.captured {
            Some(captured) => captured.push(r),
            None => self.wb.put_cf(self.store.cf(cf::OUTBOX), key, r.encode()),
        }
    }

    /// The batch's writes and its captured outbox records (empty for a
    /// batch that writes them), to deliver and then write separately.
    pub fn into_staged(self) -> (WriteBatch, Vec<OutboxRecord>) {
        (self.wb, self.captured.unwrap_or_default())
    }

    /// Records an emitted alert's identity with its record.
    pub fn put_alert(&mut self, identity: &[u8], record: &[u8]) {
        self.wb.put_cf(self.store.cf(cf::ALERTS), identity, record);
    }

    /// Sets a value of the meta column family.
    pub fn put_meta(&mut self, key: &str, value: &[u8]) {
        self.wb.put_cf(self.store.cf(cf::META), key.as_bytes(), value);
    }

    /// Removes a delivered record.
    pub fn delete_outbox(&mut self, key: &[u8]) {
        self.wb.delete_cf(self.store.cf(cf::OUTBOX), key);
    }

    /// Records the last emitted bill of a key.
    pub fn put_bill_state(&mut self, account: &str, month: Month, s: &BillState) {
        self.wb.put_cf(self.store.cf(cf::BILLS), account_month_key(account, month), encode_bill_state(s));
    }

    /// Marks an account-month for recomputation.
    pub fn mark_dirty(&mut self, account: &str, month: Month, partition: i32) {
        self.wb.put_cf(self.store.cf(cf::DIRTY), account_month_key(account, month), partition.to_be_bytes());
    }

    /// Clears a dirty mark.
    pub fn clear_dirty(&mut self, account: &str, month: Month) {
        self.wb.delete_cf(self.store.cf(cf::DIRTY), account_month_key(account, month));
    }

    /// Stores an account record.
    pub fn put_account(&mut self, account: &str, raw: &[u8]) {
        self.wb.put_cf(self.store.cf(cf::ACCOUNTS), account.as_bytes(), raw);
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.wb.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::usage::HourUsage;

    #[test]
    fn second_open_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let _a = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
        assert!(err.to_string().contains("in use by another gatebill process"));
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    }

    #[test]
    fn a_directory_that_is_not_a_gatebill_store_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "keep me").unwrap();
        std::fs::create_dir(dir.path().join("photos")).unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Foreign { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "{} is not a gatebill state directory (it holds notes.txt, photos). gatebill does not turn a directory with \
                 other files into its store; give an empty or new directory (--state-dir, GATEBILL_STATE_DIR or \
                 worker.state_dir), or the state directory of an earlier gatebill run",
                dir.path().display()
            )
        );
        assert_eq!(names(dir.path()), ["notes.txt", "photos"], "nothing was added");
        // A file where the directory should be.
        let file = dir.path().join("notes.txt");
        let err = Store::open(&file).err().unwrap().to_string();
        assert!(err.starts_with(&format!("{} is not a gatebill state directory (it is a file)", file.display())), "{err}");
        // Another program's RocksDB database.
        let other = tempfile::tempdir().unwrap();
        DB::open_default(other.path()).unwrap().put(b"k", b"v").unwrap();
        let err = Store::open(other.path()).err().unwrap().to_string();
        assert!(err.contains("(it holds a RocksDB database of another program, column families default)"), "{err}");
        // A missing directory, an empty one, and a first open cut short
        // (its lock file only) become stores; so does a store reopened.
        let fresh = tempfile::tempdir().unwrap();
        Store::open(&fresh.path().join("new")).unwrap();
        Store::open(fresh.path().join("new").as_path()).unwrap();
        let empty = tempfile::tempdir().unwrap();
        std::fs::write(empty.path().join("LOCK.gatebill"), "").unwrap();
        Store::open(empty.path()).unwrap();
    }

    #[test]
    fn an_empty_state_dir_path_is_a_clear_error() {
        for err in [Store::open(Path::new("")).err().unwrap(), Store::open_read_only(Path::new("")).err().unwrap()] {
            assert_eq!(
                err.to_string(),
                "the state directory is empty (an empty --state-dir, GATEBILL_STATE_DIR=\"\" or worker.state_dir = \"\"); \
                 give a directory, e.g. --state-dir gatebill-state, or unset the variable for the default"
            );
        }
    }

    #[test]
    fn a_corrupt_current_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let current = dir.path().join("CURRENT");
        let advice = "The store's files are damaged (a CURRENT or MANIFEST file changed, truncated or removed; a full disk or a copy \
                      taken while a worker ran can do this). Move the directory aside (keep it to investigate) and rebuild the state \
                      into an empty directory: `gatebill replay` from the input topic, or `gatebill run`, which with transactions \
                      restores its partitions from the changelog";
        // Not ending with a newline.
        std::fs::write(&current, "garbage").unwrap();
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Open { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "cannot open the state store in {}: Corruption: CURRENT file does not end with newline. {advice}",
                dir.path().display()
            )
        );
        let err = Store::open_read_only(dir.path()).err().unwrap().to_string();
        assert!(err.ends_with(advice), "{err}");
        // Naming a manifest that is not there.
        std::fs::write(&current, "MANIFEST-999999\n").unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert!(err.starts_with(&format!("cannot open the state store in {}: ", dir.path().display())), "{err}");
        assert!(err.contains("MANIFEST-999999") && err.ends_with(advice), "{err}");
        // No CURRENT at all beside RocksDB's files: not silently a new store.
        std::fs::remove_file(&current).unwrap();
        let err = Store::open(dir.path()).err().unwrap().to_string();
        assert_eq!(
            err,
            format!("cannot open the state store in {}: RocksDB files without their CURRENT file. {advice}", dir.path().display())
        );
    }

    /// Writes 48 MB of account records, 1 MB per write, and returns the
    /// memtables' bytes once no flush is pending (at most 10 s).
    fn memtables_after_48_mb(store: &Store) -> u64 {
        let value = vec![7u8; 1 << 20];
        for i in 0..48 {
            let mut b = store.batch();
            b.put_account(&format!("account-{i:03}"), &value);
            store.write(b).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let pending = store.db.property_int_value("rocksdb.num-running-flushes").unwrap().unwrap_or(0)
                + store.db.property_int_value_cf(store.cf(cf::ACCOUNTS), "rocksdb.mem-table-flush-pending").unwrap().unwrap_or(0);
            if pending == 0 || std::time::Instant::now() > deadline {
                return store.memory()[0].1;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn memtables_and_block_cache_are_bounded_as_configured() {
        let dir = tempfile::tempdir().unwrap();
        let small = StoreMemory { memtable_bytes: 16 << 20, block_cache_bytes: 8 << 20 };
        let store = Store::open_sized(dir.path(), small).unwrap();
        assert_eq!(store.db.property_int_value_cf(store.cf(cf::USAGE), "rocksdb.block-cache-capacity").unwrap(), Some(8 << 20));
        let held = memtables_after_48_mb(&store);
        assert!(held <= 16 << 20, "memtables hold {held} bytes with a 16 MB bound");
        let on_disk = store.db.property_int_value_cf(store.cf(cf::ACCOUNTS), "rocksdb.total-sst-files-size").unwrap().unwrap();
        assert!(on_disk > 0, "nothing was flushed");
        // The default bound (128 MB) keeps all 48 MB in memory.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.db.property_int_value_cf(store.cf(cf::USAGE), "rocksdb.block-cache-capacity").unwrap(), Some(64 << 20));
        let held = memtables_after_48_mb(&store);
        assert!(held >= 48 << 20, "memtables hold {held} bytes with the default bound");
    }

    #[test]
    fn other_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.db.put_cf(s.cf(cf::META), META_VERSION_KEY, 99u32.to_be_bytes()).unwrap();
        }
        let err = Store::open(dir.path()).err().unwrap();
        assert!(matches!(err, StoreError::Version { found: 99, .. }), "{err}");
    }

    #[test]
    fn one_usage_scan_reads_many_accounts_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let usage = |calls: u64| {
            let mut u = MonthUsage::default();
            u.add_hour(1_604_000_000, &HourUsage { calls, ..Default::default() });
            u
        };
        let (oct, nov, dec) = (Month::new(2020, 10).unwrap(), Month::new(2020, 11).unwrap(), Month::new(2020, 12).unwrap());
        // "a" is a prefix of "ab", and with length-prefixed keys "b" sorts
        // between them: each account's months stay its own.
        let mut b = s.batch();
        b.merge_usage_encoded("ab", dec, &usage(5).encode());
        b.merge_usage_encoded("a", nov, &usage(1).encode());
        b.merge_usage_encoded("ab", oct, &usage(4).encode());
        b.merge_usage_encoded("a", oct, &usage(2).encode());
        b.merge_usage_encoded("a", oct, &usage(3).encode());
        b.merge_usage_encoded("b", nov, &usage(6).encode());
        s.write(b).unwrap();
        let mut scan = s.usage_scan();
        // Later accounts first, then back: each read seeks afresh.
        assert_eq!(scan.month_list("b").unwrap(), vec![nov]);
        assert_eq!(scan.month_list("ab").unwrap(), vec![oct, dec]);
        let a = scan.account_months("a").unwrap();
        assert_eq!(a.keys().copied().collect::<Vec<_>>(), vec![oct, nov]);
        assert_eq!((a[&oct].calls(), a[&nov].calls()), (5, 1));
        assert_eq!(scan.month_list("nobody").unwrap(), Vec::<Month>::new());
        assert_eq!(scan.months_after("ab", oct).unwrap(), vec![dec]);
        assert_eq!(scan.months_after("ab", nov).unwrap(), vec![dec]);
        assert_eq!(scan.months_after("ab", dec).unwrap(), Vec::<Month>::new());
        assert_eq!(scan.months_after("b", oct).unwrap(), vec![nov]);
        assert_eq!(scan.account_months("ab").unwrap()[&dec].calls(), 5);
        // The one-off readers agree.
        assert_eq!(s.account_month_list("ab").unwrap(), vec![oct, dec]);
        assert_eq!(s.account_months("a").unwrap(), a);
    }

    #[test]
    fn batch_roundtrip_and_dedupe_pruning() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let m = Month::new(2020, 11).unwrap();
        let mut u = MonthUsage::default();
        u.add_hour(1_604_000_000, &HourUsage { calls: 3, ..Default::default() });
        let mut b = s.batch();
        b.merge_usage_encoded("acct", m, &u.encode());
        let mut delta = MonthUsage::default();
        delta.add_hour(1_604_000_000, &HourUsage { calls: 2, ..Default::default() });
        delta.add_hour(1_604_003_600, &HourUsage { calls: 5, ..Default::default() });
        b.merge_usage_encoded("acct", m, &delta.encode());
        b.append_dedupe(0, 3600, &[1; 16]);
        b.append_dedupe(0, 7200, &[2; 16]);
        b.append_dedupe(1, 0, &[3; 16]);
        b.put_partition("in", 0, PartitionState { next_offset: 42, watermark_ms: 7 });
        let rec = OutboxRecord {
            topic: "t".into(),
            key: None,
            payload: vec![0xff, 0],
            headers: vec![("h".into(), b"v".to_vec())],
            partition: None,
        };
        b.put_outbox(&outbox_dead_letter_key(5), rec.clone());
        s.write(b).unwrap();
        u.merge(&delta);
        assert_eq!(s.usage("acct", m).unwrap(), Some(u));
        assert_eq!(s.usage("acct", m).unwrap().unwrap().calls(), 10);
        assert_eq!(s.partition("in", 0).unwrap(), Some(PartitionState { next_offset: 42, watermark_ms: 7 }));
        assert_eq!(s.partitions("in").unwrap().len(), 1);
        assert_eq!(s.outbox().unwrap(), vec![(outbox_dead_letter_key(5), rec)]);
        assert_eq!(s.next_dead_letter_seq().unwrap(), 6);
        let mut b = s.batch();
        b.put_dedupe_index(0, 3600, 10, 7, 0);
        b.put_dedupe_index(0, -7200, 11, 7, 2);
        b.put_dedupe_index(1, 0, 12, 8, 1);
        s.write(b).unwrap();
        assert_eq!(s.dedupe_index(0).unwrap(), vec![(-7200, 11, 7, 2), (3600, 10, 7, 0)]);
        let mut b = s.batch();
        b.delete_dedupe(0, 3600);
        s.write(b).unwrap();
        assert_eq!(s.dedupe_index(0).unwrap(), vec![(-7200, 11, 7, 2)]);
        assert_eq!(s.dedupe_index(1).unwrap(), vec![(0, 12, 8, 1)]);
        let mut b = s.batch();
        b.append_dedupe(0, 7200, &[4; 16]);
        s.write(b).unwrap();
        assert_eq!(s.dedupe_bucket(0, 3600).unwrap(), Vec::<u8>::new());
        assert_eq!(s.dedupe_bucket(0, 7200).unwrap(), [[2u8; 16], [4; 16]].concat());
        assert_eq!(s.dedupe_bucket(1, 0).unwrap(), vec![3; 16]);
    }
}
