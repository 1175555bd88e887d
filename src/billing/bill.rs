//! The bill (spec sections 7-8 and the bill record of section 10): a pure
//! function of (account record or none, the account's month usages,
//! configuration), with a `content_hash` that is equal exactly when two bills
//! are equal.

use super::account::{AccountRecord, PackItem, PricingTerm, TermKind};
use super::calendar::Month;
use super::config::{PriceList, PriceVersion, Rules, Tier};
use super::entitlements::{deduct, Deduction};
use super::money::{discounted_line_amount, CALLS_UNIT_SIZE, GB};
use super::usage::MonthUsage;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Metered totals of the month.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageSummary {
    /// All calls, frontend errors and trial calls included.
    pub calls: u64,
    /// Calls rejected by the gateway itself (never billable).
    pub frontend_error_calls: u64,
    /// Billable calls made inside a trial period (not charged).
    pub trial_calls: u64,
    /// Public outbound bytes, trial included.
    pub public_out_bytes: u64,
    /// Private outbound bytes (free).
    pub private_out_bytes: u64,
    /// Inbound bytes (free).
    pub inbound_bytes: u64,
    /// Public outbound bytes inside a trial period (not charged).
    pub trial_public_out_bytes: u64,
    /// Public outbound bytes by gateway region.
    pub public_out_bytes_by_region: BTreeMap<String, u64>,
}

/// Quantities left to pay for after trial, free tier and packs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chargeable {
    /// Calls.
    pub calls: u64,
    /// Public outbound bytes, all regions.
    pub public_out_bytes: u64,
    /// Public outbound bytes by gateway region.
    pub public_out_bytes_by_region: BTreeMap<String, u64>,
}

/// One priced slice: an item, a region (traffic only) and a tier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChargeLine {
    /// `calls` or `public_out_bytes`.
    pub item: PackItem,
    /// Gateway region, for traffic lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Tier number, 1-based, in the configured order.
    pub tier: u32,
    /// Calls or bytes in this slice.
    pub quantity: u64,
    /// What `unit_price` is per: `10000 calls` or `GB`.
    pub unit: String,
    /// Base units (calls or bytes) in one `unit`: 10,000 or 1,073,741,824.
    pub unit_size: u64,
    /// Price per unit (the list price, before any discount).
    #[serde(with = "rust_decimal::serde::str")]
    pub unit_price: Decimal,
    /// The account's discount on this line (section 11.3), absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    pub discount: Option<Decimal>,
    /// `quantity / unit_size x unit_price x (1 - discount)`, rounded once
    /// to 2 places half away from zero.
    #[serde(with = "rust_decimal::serde::str")]
    pub amount: Decimal,
}

/// An account pricing term that applied to a bill (section 11.3).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedTerm {
    /// The term's id, when the account record gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `discount` or `prices`.
    pub kind: String,
    /// The first month the term covers, `YYYY-MM`.
    pub effective_from: String,
    /// The first month it no longer covers; absent: open-ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_until: Option<String>,
    /// The discount, for a discount term.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "rust_decimal::serde::str_option")]
    pub discount: Option<Decimal>,
}

impl AppliedTerm {
    fn of(t: &PricingTerm) -> AppliedTerm {
        AppliedTerm {
            id: t.id.clone(),
            kind: t.kind.as_str().to_string(),
            effective_from: t.from.to_string(),
            effective_until: t.until.map(|u| u.to_string()),
            discount: match t.kind {
                TermKind::Discount(d) => Some(d),
                TermKind::Prices(_) => None,
            },
        }
    }
}

/// What prices one account-month (sections 11.1 and 11.3): the version in
/// force at the month's first instant, the price list (the account's own
/// `prices` term, else the version's), the discount, and the terms that
/// applied.
pub struct MonthPricing<'a> {
    /// The price version in force.
    pub version: &'a PriceVersion,
    /// The tiers the month is priced with.
    pub list: &'a PriceList,
    /// The account's discount, if a term gives one.
    pub discount: Option<Decimal>,
    /// The terms that applied: prices, then discount.
    pub terms: Vec<&'a PricingTerm>,
}

/// How `month` of an account is priced.
pub fn month_pricing<'a>(account: Option<&'a AccountRecord>, month: Month, rules: &'a Rules) -> MonthPricing<'a> {
    let version = rules.version(month);
    let (discount, prices) = account.map_or((None, None), |a| a.terms(month));
    let list = match prices.map(|t| &t.kind) {
        Some(TermKind::Prices(p)) => p,
        _ => &version.prices,
    };
    let discount_value = match discount.map(|t| &t.kind) {
        Some(TermKind::Discount(d)) => Some(*d),
        _ => None,
    };
    MonthPricing { version, list, discount: discount_value, terms: prices.into_iter().chain(discount).collect() }
}

/// Everything a bill says, apart from its revision, status and timestamps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillContent {
    /// The account.
    pub account_id: String,
    /// Billing month, `YYYY-MM`.
    pub month: String,
    /// The billing time zone.
    pub time_zone: String,
    /// False when no account record was available (no free tier, no packs).
    pub account_known: bool,
    /// Metered totals.
    pub usage: UsageSummary,
    /// What each pack absorbed.
    pub deductions: Vec<Deduction>,
    /// After deductions.
    pub chargeable: Chargeable,
    /// Priced slices.
    pub charges: Vec<ChargeLine>,
    /// Sum of the rounded charge lines.
    #[serde(with = "rust_decimal::serde::str")]
    pub total_amount: Decimal,
    /// Currency code.
    pub currency: String,
    /// The price version that priced the month (section 11.1); absent when
    /// that is an unnamed `[billing.prices]` (bills as before versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price_version: Option<String>,
    /// The account's pricing terms that applied (section 11.3).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pricing_terms: Vec<AppliedTerm>,
}

/// A computed bill with its content hash.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bill {
    /// The month the bill is for.
    pub month: Month,
    /// The bill.
    pub content: BillContent,
    /// `sha256:<hex>` of the content's canonical JSON.
    pub content_hash: String,
    /// The content as JSON, exactly the bytes `content_hash` is taken of.
    pub content_json: Vec<u8>,
}

/// Lifecycle of a bill record (spec section 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillStatus {
    /// The month can still receive usage.
    Provisional,
    /// The month has closed.
    Final,
    /// A final bill changed by late usage or account data.
    Restated,
}

impl BillStatus {
    /// Wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            BillStatus::Provisional => "provisional",
            BillStatus::Final => "final",
            BillStatus::Restated => "restated",
        }
    }
}

/// The bill record as written to the output topic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BillRecord {
    /// The bill.
    #[serde(flatten)]
    pub content: BillContent,
    /// Increases with every record for the same key.
    pub revision: u64,
    /// provisional, final or restated.
    pub status: BillStatus,
    /// Hash of `content`; equal hashes mean equal bills.
    pub content_hash: String,
}

impl BillRecord {
    /// The record's JSON given its content's JSON ([`Bill::content_json`]):
    /// the same bytes as `serde_json::to_vec(&record)`, without serialising
    /// the content a second time.
    pub fn json_from_content(content_json: &[u8], revision: u64, status: BillStatus, content_hash: &str) -> Vec<u8> {
        debug_assert_eq!(content_json.last(), Some(&b'}'));
        let mut out = Vec::with_capacity(content_json.len() + 128);
        out.extend_from_slice(&content_json[..content_json.len() - 1]);
        out.extend_from_slice(format!(r#","revision":{revision},"status":"{}","content_hash":"#, status.as_str()).as_bytes());
        serde_json::to_writer(&mut out, content_hash).expect("a string serializes");
        out.push(b'}');
        out
    }

    /// The output-topic key: `<account_id>/<YYYY-MM>`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.content.account_id, self.content.month)
    }
}

/// Hash of a bill's content: SHA-256 of its canonical JSON (struct field
/// order, sorted maps), prefixed `sha256:`.
pub fn content_hash(content: &BillContent) -> String {
    hash_json(&serde_json::to_vec(content).expect("bill content serializes"))
}

fn hash_json(json: &[u8]) -> String {
    hash_name(Sha256::digest(json).into())
}

/// `sha256:` and the digest in lower-case hex.
fn hash_name(digest: [u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(7 + 64);
    s.push_str("sha256:");
    for b in digest {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 15)]));
    }
    s
}

/// Serialises into a buffer and hashes the bytes as they are written, a
/// block at a time while they are still in cache: the JSON and its hash in
/// one pass.
struct HashingWriter {
    out: Vec<u8>,
    hasher: Sha256,
    /// How much of `out` the hasher has taken.
    hashed: usize,
}

impl HashingWriter {
    /// SHA-256's block size: the hasher is fed whole blocks.
    const BLOCK: usize = 64;

    fn new(capacity: usize) -> Self {
        HashingWriter { out: Vec::with_capacity(capacity), hasher: Sha256::new(), hashed: 0 }
    }

    /// Hashes the whole blocks written since the last call.
    fn feed(&mut self) {
        let ready = (self.out.len() - self.hashed) / Self::BLOCK * Self::BLOCK;
        self.hasher.update(&self.out[self.hashed..self.hashed + ready]);
        self.hashed += ready;
    }

    /// The bytes written and the name of their hash.
    fn finish(mut self) -> (Vec<u8>, String) {
        self.hasher.update(&self.out[self.hashed..]);
        let name = hash_name(self.hasher.finalize().into());
        (self.out, name)
    }
}

impl std::io::Write for HashingWriter {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    #[inline]
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.out.extend_from_slice(buf);
        if self.out.len() - self.hashed >= 4 * Self::BLOCK {
            self.feed();
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The charge lines of one item (and region), the tiers' prices less
/// `discount`.
#[allow(clippy::too_many_arguments)]
fn price_tiers(
    item: PackItem,
    region: Option<&str>,
    quantity: u64,
    tiers: &[Tier],
    unit: &str,
    unit_size: u64,
    discount: Option<Decimal>,
    out: &mut Vec<ChargeLine>,
) {
    let mut lower = 0u64;
    for (i, t) in tiers.iter().enumerate() {
        if quantity <= lower {
            break;
        }
        let upper = t.up_to.unwrap_or(u64::MAX).min(quantity);
        let q = upper - lower;
        out.push(ChargeLine {
            item,
            region: region.map(String::from),
            tier: i as u32 + 1,
            quantity: q,
            unit: unit.to_string(),
            unit_size,
            unit_price: t.price,
            discount,
            amount: discounted_line_amount(q, t.price, unit_size, discount.unwrap_or_default()),
        });
        lower = upper;
    }
}

/// The charge lines of a month's chargeable calls and bytes (by region),
/// priced as `pricing` says: calls first, then each region in order.
pub fn charge_lines(pricing: &MonthPricing<'_>, calls: u64, bytes: &BTreeMap<String, u64>) -> Vec<ChargeLine> {
    let (list, discount) = (pricing.list, pricing.discount);
    let mut charges = Vec::new();
    price_tiers(PackItem::Calls, None, calls, &list.call_tiers, "10000 calls", CALLS_UNIT_SIZE, discount, &mut charges);
    for (region, b) in bytes {
        price_tiers(PackItem::PublicOutBytes, Some(region), *b, list.traffic_tiers(region), "GB", GB, discount, &mut charges);
    }
    charges
}

/// A bill's total: the sum of its rounded lines, from 0.00 (two places on
/// a bill with no lines).
pub fn total_of(lines: &[ChargeLine]) -> Decimal {
    lines.iter().fold(Decimal::new(0, 2), |sum, c| sum + c.amount)
}

/// Every month's bill for one account. `account` is `None` when no account
/// record is known: no free tier, no packs, `account_known: false`.
pub fn compute_bills(account_id: &str, account: Option<&AccountRecord>, usages: &BTreeMap<Month, MonthUsage>, rules: &Rules) -> Vec<Bill> {
    let deductions = deduct(account, usages, rules);
    usages
        .iter()
        .map(|(month, usage)| {
            let d = &deductions[month];
            let mut u = UsageSummary { trial_calls: d.trial_calls, trial_public_out_bytes: d.trial_public_out_bytes, ..Default::default() };
            for h in usage.hours() {
                u.calls += h.calls;
                u.frontend_error_calls += h.frontend_error_calls;
                u.private_out_bytes += h.private_out_bytes;
                u.inbound_bytes += h.inbound_bytes;
                for (r, b) in h.public_out_bytes() {
                    u.public_out_bytes += b;
                    match u.public_out_bytes_by_region.get_mut(r) {
                        Some(v) => *v += b,
                        None => {
                            u.public_out_bytes_by_region.insert(r.to_string(), b);
                        }
                    }
                }
            }
            let chargeable = Chargeable {
                calls: d.chargeable_calls,
                public_out_bytes: d.chargeable_bytes.values().sum(),
                public_out_bytes_by_region: d.chargeable_bytes.clone(),
            };
            let pricing = month_pricing(account, *month, rules);
            let charges = charge_lines(&pricing, d.chargeable_calls, &d.chargeable_bytes);
            let total_amount = total_of(&charges);
            let content = BillContent {
                account_id: account_id.to_string(),
                month: month.to_string(),
                time_zone: rules.time_zone.clone(),
                account_known: account.is_some(),
                usage: u,
                deductions: d.deductions.clone(),
                chargeable,
                charges,
                total_amount,
                currency: pricing.version.prices.currency.clone(),
                price_version: pricing.version.id.clone(),
                pricing_terms: pricing.terms.iter().map(|t| AppliedTerm::of(t)).collect(),
            };
            let mut w = HashingWriter::new(512 + 160 * content.charges.len());
            serde_json::to_writer(&mut w, &content).expect("bill content serializes");
            let (content_json, content_hash) = w.finish();
            Bill { month: *month, content, content_hash, content_json }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::Metered;

    #[test]
    fn record_json_from_content_json_is_serdes_record_json() {
        let mut u = MonthUsage::default();
        let m = Metered { frontend_error: false, public_out_bytes: 5_000_000_000, private_out_bytes: 1, inbound_bytes: 2 };
        u.add(1_604_000_000, "ap-guangzhou", &m);
        let months = BTreeMap::from([(Month::new(2020, 11).unwrap(), u)]);
        let bill = compute_bills("a\"b", None, &months, &Rules::default()).pop().unwrap();
        assert_eq!(bill.content_json, serde_json::to_vec(&bill.content).unwrap());
        assert_eq!(bill.content_hash, content_hash(&bill.content));
        assert_eq!(bill.content_hash, format!("sha256:{}", hex::encode(Sha256::digest(&bill.content_json))));
        for status in [BillStatus::Provisional, BillStatus::Final, BillStatus::Restated] {
            let rec = BillRecord { content: bill.content.clone(), revision: 7, status, content_hash: bill.content_hash.clone() };
            assert_eq!(
                String::from_utf8(BillRecord::json_from_content(&bill.content_json, 7, status, &bill.content_hash)).unwrap(),
                String::from_utf8(serde_json::to_vec(&rec).unwrap()).unwrap()
            );
        }
    }

    /// Written in pieces of every size around the block size, the hash is
    /// that of the whole.
    #[test]
    fn the_hashing_writer_hashes_what_it_wrote() {
        use std::io::Write;
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        for piece in [1, 3, 63, 64, 65, 200, 1000] {
            let mut w = HashingWriter::new(0);
            for c in data.chunks(piece) {
                w.write_all(c).unwrap();
            }
            let (out, name) = w.finish();
            assert_eq!(out, data);
            assert_eq!(name, hash_json(&data), "pieces of {piece}");
        }
    }
}
