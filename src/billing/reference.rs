//! The whole rule book applied to a finite list of messages at once: decode,
//! classify, drop repeated `request_id`s, aggregate, bill. Tests and the
//! `gen` ground truth use it as the reference the streaming worker must
//! match; the worker itself uses the same pieces incrementally.

use super::account::AccountRecord;
use super::bill::{compute_bills, Bill};
use super::calendar::Month;
use super::classify::{classify, Metered};
use super::config::Rules;
use super::event::{decode_event, AccessEvent, DecodeError};
use super::usage::MonthUsage;
use std::collections::{BTreeMap, HashSet};

/// Usage of every account: account id -> month -> usage.
pub type Ledger = BTreeMap<String, BTreeMap<Month, MonthUsage>>;

/// Adds one decoded, classified event to a ledger.
pub fn ingest(ledger: &mut Ledger, e: &AccessEvent, m: &Metered, rules: &Rules) {
    let (month, hour) = rules.calendar.place(e.time_ms);
    let months = match ledger.get_mut(&e.account_id) {
        Some(m) => m,
        None => ledger.entry(e.account_id.clone()).or_default(),
    };
    months.entry(month).or_default().add(hour, &e.region, m);
}

/// Decodes and classifies one message.
pub fn decode_and_classify(bytes: &[u8]) -> Result<(AccessEvent, Metered), DecodeError> {
    let e = decode_event(bytes)?;
    let m = classify(&e)?;
    Ok((e, m))
}

/// The result of billing a finite list of messages.
#[derive(Debug, Default)]
pub struct Reference {
    /// Aggregated usage of the accepted, first-seen events.
    pub ledger: Ledger,
    /// Messages rejected, with their errors, by position in the input.
    pub rejected: Vec<(usize, DecodeError)>,
    /// Events dropped because their `request_id` was seen before.
    pub duplicates: u64,
}

/// Decodes, classifies, de-duplicates (by `request_id`, exactly) and
/// aggregates messages.
pub fn aggregate_messages<'a>(messages: impl IntoIterator<Item = &'a [u8]>, rules: &Rules) -> Reference {
    let mut r = Reference::default();
    let mut seen = HashSet::new();
    for (i, bytes) in messages.into_iter().enumerate() {
        match decode_and_classify(bytes) {
            Ok((e, m)) => {
                if seen.insert(e.request_id.clone()) {
                    ingest(&mut r.ledger, &e, &m, rules);
                } else {
                    r.duplicates += 1;
                }
            }
            Err(err) => r.rejected.push((i, err)),
        }
    }
    r
}

/// Every bill of every account in a ledger.
pub fn bills(ledger: &Ledger, accounts: &BTreeMap<String, AccountRecord>, rules: &Rules) -> Vec<Bill> {
    ledger.iter().flat_map(|(id, months)| compute_bills(id, accounts.get(id), months, rules)).collect()
}
