//! The account-record wire format (spec section 10): activation time and
//! purchased resource packs.

use super::calendar::Month;
use super::config::{PriceList, TierConfig};
use super::event::{check_object, parse, truncate, DecodeError, EventTime, RejectReason};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a resource pack pays for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PackItem {
    /// API calls.
    Calls,
    /// Public outbound bytes.
    PublicOutBytes,
}

impl PackItem {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PackItem::Calls => "calls",
            PackItem::PublicOutBytes => "public_out_bytes",
        }
    }
}

/// A purchased or campaign resource pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourcePack {
    /// Unique within the account; ties in expiry are broken by the smaller id.
    pub id: String,
    /// What the pack pays for.
    pub item: PackItem,
    /// Calls or bytes the pack holds in total, across months.
    pub quantity: u64,
    /// Start of validity, UTC epoch seconds (inclusive).
    pub valid_from: i64,
    /// End of validity, UTC epoch seconds (exclusive).
    pub valid_until: i64,
}

/// One account's record from the accounts topic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRecord {
    /// The account.
    pub account_id: String,
    /// When the gateway was activated, UTC epoch seconds.
    pub activated_at: i64,
    /// Purchased or campaign packs (the valid ones; see [`DecodedAccount`]).
    pub resource_packs: Vec<ResourcePack>,
    /// The account's own pricing terms (section 11.3; the valid ones).
    pub pricing: Vec<PricingTerm>,
    /// The account's own spend lines (section 12; the valid ones), in the
    /// bill's currency.
    pub spend_alerts: Vec<Decimal>,
}

/// Most decimal places of a discount.
pub const MAX_DISCOUNT_SCALE: u32 = 6;

/// What a pricing term changes (section 11.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TermKind {
    /// Every charge line at `unit_price x (1 - discount)`; in [0, 1).
    Discount(Decimal),
    /// A price list that replaces the price version's (its currency is
    /// the version's).
    Prices(PriceList),
}

impl TermKind {
    /// The wire name of the kind.
    pub fn as_str(&self) -> &'static str {
        match self {
            TermKind::Discount(_) => "discount",
            TermKind::Prices(_) => "prices",
        }
    }
}

/// One of an account's pricing terms: a kind and the months it covers,
/// `[from, until)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PricingTerm {
    /// The term's id, if the record gives one (shown on bills).
    pub id: Option<String>,
    /// The first month covered.
    pub from: Month,
    /// The first month no longer covered; `None`: open-ended.
    pub until: Option<Month>,
    /// What it changes.
    pub kind: TermKind,
}

impl PricingTerm {
    /// Whether the term covers `month`.
    pub fn covers(&self, month: Month) -> bool {
        self.from <= month && self.until.is_none_or(|u| month < u)
    }

    /// Whether two terms cover a month in common.
    fn overlaps(&self, other: &PricingTerm) -> bool {
        self.until.is_none_or(|u| other.from < u) && other.until.is_none_or(|u| self.from < u)
    }
}

impl AccountRecord {
    /// The record's terms covering `month`: (discount, prices), at most one
    /// of each (overlapping terms of a kind were left out when decoding).
    pub fn terms(&self, month: Month) -> (Option<&PricingTerm>, Option<&PricingTerm>) {
        let of = |discount: bool| self.pricing.iter().find(|t| t.covers(month) && matches!(t.kind, TermKind::Discount(_)) == discount);
        (of(true), of(false))
    }
}

/// A pricing term left out of an account record, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedTerm {
    /// Position in `pricing`, from 0.
    pub index: usize,
    /// What is wrong with it.
    pub why: String,
}

/// A resource pack left out of an account record, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RejectedPack {
    /// Position in `resource_packs`, from 0.
    pub index: usize,
    /// The pack's id, when it has a usable one.
    pub id: Option<String>,
    /// What is wrong with it.
    pub why: String,
}

/// An account record as decoded: the record that applies (without its
/// invalid packs) and the packs left out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedAccount {
    /// What applies.
    pub record: AccountRecord,
    /// Packs left out (spec section 10: reported, the rest still applies).
    pub rejected: Vec<RejectedPack>,
    /// Pricing terms left out (section 11.3: reported, the rest applies).
    pub rejected_terms: Vec<RejectedTerm>,
    /// Spend lines left out, each as `#index: why`.
    pub rejected_alerts: Vec<String>,
}

impl DecodedAccount {
    /// The dead-letter errors reporting what was left out: the packs
    /// ([`DecodedAccount::rejection`]) and the pricing terms
    /// (`invalid_pricing`), each when there are any.
    pub fn rejections(&self) -> Vec<DecodeError> {
        let mut out: Vec<DecodeError> = self.rejection().into_iter().collect();
        if !self.rejected_terms.is_empty() {
            let each: Vec<String> = self.rejected_terms.iter().map(|r| format!("#{}: {}", r.index, r.why)).collect();
            out.push(self.left_out(RejectReason::InvalidPricing, "pricing term(s)", &each));
        }
        if !self.rejected_alerts.is_empty() {
            out.push(self.left_out(RejectReason::InvalidValue, "spend alert(s)", &self.rejected_alerts));
        }
        out
    }

    /// The dead-letter error reporting the packs left out, if any: reason
    /// `invalid_resource_pack`, the detail names each pack and what is wrong.
    pub fn rejection(&self) -> Option<DecodeError> {
        if self.rejected.is_empty() {
            return None;
        }
        let each: Vec<String> = self
            .rejected
            .iter()
            .map(|r| match &r.id {
                Some(id) => format!("#{} `{}`: {}", r.index, truncate(id, 64), r.why),
                None => format!("#{}: {}", r.index, r.why),
            })
            .collect();
        Some(self.left_out(RejectReason::InvalidResourcePack, "resource pack(s)", &each))
    }

    /// The error saying the record applied without `each` of its `what`.
    fn left_out(&self, reason: RejectReason, what: &str, each: &[String]) -> DecodeError {
        let account = truncate(&self.record.account_id, 64);
        let detail = format!("account `{account}` applied without {} invalid {what}: {}", each.len(), each.join("; "));
        DecodeError::new(reason, truncate(&detail, 1000))
    }
}

#[derive(Deserialize)]
struct RawAccount {
    account_id: String,
    activated_at: EventTime,
    #[serde(default)]
    resource_packs: Option<serde_json::Value>,
    #[serde(default)]
    pricing: Option<serde_json::Value>,
    #[serde(default)]
    spend_alerts: Option<serde_json::Value>,
}

/// The items of an optional array field of an account record (absent or
/// null: none), or why there are none (`field` is not an array: no
/// `item` of it applies).
fn items(value: Option<serde_json::Value>, field: &str, item: &str) -> Result<Vec<serde_json::Value>, String> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(values)) => Ok(values),
        Some(_) => Err(format!("`{field}` is not an array; no {item} applies")),
    }
}

/// Decodes an account's `spend_alerts`: the valid lines, and the others
/// described (`#index: why`).
fn decode_spend_alerts(value: Option<serde_json::Value>) -> (Vec<Decimal>, Vec<String>) {
    let values = match items(value, "spend_alerts", "line") {
        Ok(values) => values,
        Err(why) => return (Vec::new(), vec![format!("#0: {why}")]),
    };
    let mut lines = Vec::new();
    let mut rejected = Vec::new();
    for (i, v) in values.iter().enumerate() {
        match v.as_str().ok_or_else(|| "a line is a decimal string such as \"100.00\"".to_string()).and_then(super::config::spend_line) {
            Ok(d) => lines.push(d),
            Err(why) => rejected.push(format!("#{i}: {why}")),
        }
    }
    (lines, rejected)
}

#[derive(Deserialize)]
struct RawTerm {
    #[serde(default)]
    id: Option<String>,
    effective_from: String,
    #[serde(default)]
    effective_until: Option<String>,
    #[serde(default)]
    discount: Option<serde_json::Value>,
    #[serde(default)]
    prices: Option<RawPrices>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrices {
    calls: Vec<TierConfig>,
    traffic_default: Vec<TierConfig>,
    #[serde(default)]
    traffic_regions: BTreeMap<String, Vec<TierConfig>>,
}

/// Checks one pricing term (not yet against the others).
fn decode_term(value: serde_json::Value) -> Result<PricingTerm, String> {
    let t: RawTerm = serde_json::from_value(value).map_err(|e| truncate(&e.to_string(), 200))?;
    let month = |field: &str, v: &str| {
        v.parse::<Month>().map_err(|e| format!("{field}: {e} (a term covers whole months of the billing time zone)"))
    };
    let from = month("effective_from", &t.effective_from)?;
    let until = t.effective_until.as_deref().map(|u| month("effective_until", u)).transpose()?;
    if until.is_some_and(|u| u <= from) {
        return Err("effective_until is not after effective_from (an empty or inverted window)".into());
    }
    if t.id.as_ref().is_some_and(|id| id.is_empty() || id.len() > 256) {
        return Err("`id` must be 1..=256 bytes".into());
    }
    let kind = match (t.discount, t.prices) {
        (Some(d), None) => {
            let text = d.as_str().ok_or("`discount` must be a decimal string such as \"0.15\", not a JSON number")?;
            let d: Decimal = text.trim().parse().map_err(|_| format!("discount `{}` is not a decimal number", truncate(text, 64)))?;
            if d.is_sign_negative() || d >= Decimal::ONE || d.scale() > MAX_DISCOUNT_SCALE {
                return Err(format!("discount {d} must be at least 0 and below 1, with at most {MAX_DISCOUNT_SCALE} decimal places"));
            }
            TermKind::Discount(d.normalize())
        }
        (None, Some(p)) => TermKind::Prices(
            PriceList::check("prices", String::new(), &p.calls, &p.traffic_default, &p.traffic_regions).map_err(|e| e.to_string())?,
        ),
        (Some(_), Some(_)) => return Err("a term has `discount` or `prices`, not both (give two terms)".into()),
        (None, None) => return Err("a term needs `discount` or `prices`".into()),
    };
    Ok(PricingTerm { id: t.id, from, until, kind })
}

/// Decodes an account's `pricing`: the valid terms, and those left out
/// (invalid, or overlapping another term of the same kind: both go).
fn decode_pricing(value: Option<serde_json::Value>) -> (Vec<PricingTerm>, Vec<RejectedTerm>) {
    let values = match items(value, "pricing", "term") {
        Ok(values) => values,
        Err(why) => return (Vec::new(), vec![RejectedTerm { index: 0, why }]),
    };
    let mut valid = Vec::new();
    let mut rejected = Vec::new();
    for (index, v) in values.into_iter().enumerate() {
        match decode_term(v) {
            Ok(t) => valid.push((index, t)),
            Err(why) => rejected.push(RejectedTerm { index, why }),
        }
    }
    let clashes = |i: usize| {
        let (_, t) = &valid[i];
        valid.iter().enumerate().find(|(j, (_, o))| *j != i && o.kind.as_str() == t.kind.as_str() && o.overlaps(t)).map(|(_, (k, _))| *k)
    };
    let overlapping: Vec<(usize, usize)> = (0..valid.len()).filter_map(|i| clashes(i).map(|k| (i, k))).collect();
    for &(i, other) in overlapping.iter().rev() {
        let (index, t) = valid.remove(i);
        let why = format!("a {} term overlapping term #{other} in the months it covers; neither applies", t.kind.as_str());
        rejected.push(RejectedTerm { index, why });
    }
    rejected.sort_by_key(|r| r.index);
    (valid.into_iter().map(|(_, t)| t).collect(), rejected)
}

#[derive(Deserialize)]
struct RawPack {
    id: String,
    item: PackItem,
    quantity: u64,
    valid_from: EventTime,
    valid_until: EventTime,
}

/// Epoch milliseconds to the first whole second at or after them. An hour
/// (identified by its start, a whole second) starts inside `[from, until)`
/// exactly when it starts inside `[ceil(from), ceil(until))`, so bounds with
/// fractions of a second compare exactly against hour starts.
pub(crate) fn ceil_secs(ms: i64) -> i64 {
    -(-ms).div_euclid(1000)
}

/// Checks one pack; `ids` are the ids of every earlier pack of the record,
/// valid or not (an id is taken by the first pack that names it).
fn decode_pack(value: serde_json::Value, ids: &mut Vec<String>) -> Result<ResourcePack, (Option<String>, String)> {
    let id = value.get("id").and_then(|v| v.as_str()).filter(|s| !s.is_empty() && s.len() <= 256).map(str::to_string);
    if let Some(id) = &id {
        if ids.contains(id) {
            return Err((Some(id.clone()), "the id is already used by an earlier pack of the record".into()));
        }
        ids.push(id.clone());
    }
    let p: RawPack = serde_json::from_value(value).map_err(|e| (id.clone(), truncate(&e.to_string(), 200)))?;
    if p.id.is_empty() || p.id.len() > 256 {
        return Err((None, "`id` must be 1..=256 bytes".into()));
    }
    if p.valid_from.0 >= p.valid_until.0 {
        return Err((id, "valid_from is not before valid_until (empty or inverted validity window)".into()));
    }
    Ok(ResourcePack {
        id: p.id,
        item: p.item,
        quantity: p.quantity,
        valid_from: ceil_secs(p.valid_from.0),
        valid_until: ceil_secs(p.valid_until.0),
    })
}

/// Decodes and validates an account record. A record without a valid
/// `account_id` or `activated_at` is an error; invalid resource packs are
/// left out and listed in [`DecodedAccount::rejected`].
pub fn decode_account_checked(bytes: &[u8]) -> Result<DecodedAccount, DecodeError> {
    check_object(bytes)?;
    let raw: RawAccount = parse(bytes)?;
    if raw.account_id.is_empty() || raw.account_id.len() > 256 {
        return Err(DecodeError::new(RejectReason::InvalidValue, "`account_id` must be 1..=256 bytes"));
    }
    let mut packs = Vec::new();
    let mut rejected = Vec::new();
    let values = items(raw.resource_packs, "resource_packs", "pack").unwrap_or_else(|why| {
        rejected.push(RejectedPack { index: 0, id: None, why });
        Vec::new()
    });
    let mut ids = Vec::new();
    for (index, value) in values.into_iter().enumerate() {
        match decode_pack(value, &mut ids) {
            Ok(p) => packs.push(p),
            Err((id, why)) => rejected.push(RejectedPack { index, id, why }),
        }
    }
    let (pricing, rejected_terms) = decode_pricing(raw.pricing);
    let (spend_alerts, rejected_alerts) = decode_spend_alerts(raw.spend_alerts);
    let record = AccountRecord {
        account_id: raw.account_id,
        activated_at: raw.activated_at.0.div_euclid(1000),
        resource_packs: packs,
        pricing,
        spend_alerts,
    };
    Ok(DecodedAccount { record, rejected, rejected_terms, rejected_alerts })
}

/// The account record that applies (invalid packs left out), or why none does.
pub fn decode_account(bytes: &[u8]) -> Result<AccountRecord, DecodeError> {
    decode_account_checked(bytes).map(|d| d.record)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub const SPEC_ACCOUNT: &str = r#"{
      "account_id": "1250000001",
      "activated_at": "2019-11-10T17:13:14+08:00",
      "resource_packs": [
        {"id": "pk-001", "item": "calls", "quantity": 5000000,
         "valid_from": "2020-03-01T00:00:00+08:00",
         "valid_until": "2021-03-01T00:00:00+08:00"}
      ]
    }"#;

    #[test]
    fn decodes_the_spec_example() {
        let a = decode_account(SPEC_ACCOUNT.as_bytes()).unwrap();
        assert_eq!(a.activated_at, 1_573_377_194);
        assert_eq!(a.resource_packs.len(), 1);
        assert_eq!(a.resource_packs[0].quantity, 5_000_000);
        assert_eq!(a.resource_packs[0].item, PackItem::Calls);
    }

    #[test]
    fn invalid_packs_are_left_out_and_named_the_rest_applies() {
        let inverted = SPEC_ACCOUNT.replace("2021-03-01", "2019-03-01");
        let d = decode_account_checked(inverted.as_bytes()).unwrap();
        assert_eq!((d.record.activated_at, d.record.resource_packs.len()), (1_573_377_194, 0));
        assert_eq!(d.rejected.len(), 1);
        assert_eq!(d.rejected[0].id.as_deref(), Some("pk-001"));
        let err = d.rejection().unwrap();
        assert_eq!(err.reason, RejectReason::InvalidResourcePack);
        assert!(err.detail.contains("#0 `pk-001`: valid_from is not before valid_until"), "{}", err.detail);
        // A duplicate id (the later pack is left out), an unknown item, a bad
        // quantity and a pack without an id, beside a valid one.
        let packs = r#"[
            {"id": "pk-1", "item": "calls", "quantity": 5, "valid_from": 0, "valid_until": 1000},
            {"id": "pk-1", "item": "calls", "quantity": 7, "valid_from": 0, "valid_until": 1000},
            {"id": "pk-2", "item": "cpu", "quantity": 5, "valid_from": 0, "valid_until": 1000},
            {"id": "pk-3", "item": "calls", "quantity": -5, "valid_from": 0, "valid_until": 1000},
            {"item": "calls", "quantity": 5, "valid_from": 0, "valid_until": 1000}
        ]"#;
        let text = format!(r#"{{"account_id": "A", "activated_at": 0, "resource_packs": {packs}}}"#);
        let d = decode_account_checked(text.as_bytes()).unwrap();
        assert_eq!(d.record.resource_packs.len(), 1);
        assert_eq!(d.record.resource_packs[0].quantity, 5);
        let rejected: Vec<(usize, Option<&str>)> = d.rejected.iter().map(|r| (r.index, r.id.as_deref())).collect();
        assert_eq!(rejected, vec![(1, Some("pk-1")), (2, Some("pk-2")), (3, Some("pk-3")), (4, None)]);
        let detail = d.rejection().unwrap().detail;
        assert!(detail.contains("applied without 4 invalid resource pack(s)"), "{detail}");
        assert!(detail.contains("#4: missing field `id`"), "{detail}");
    }

    #[test]
    fn records_without_a_valid_account_id_or_activation_are_rejected_whole() {
        let no_activation = r#"{"account_id": "A", "resource_packs": []}"#;
        assert_eq!(decode_account_checked(no_activation.as_bytes()).unwrap_err().reason, RejectReason::MissingField);
        let bad_id = r#"{"account_id": "", "activated_at": 0}"#;
        assert_eq!(decode_account_checked(bad_id.as_bytes()).unwrap_err().reason, RejectReason::InvalidValue);
    }

    #[test]
    fn pack_bounds_with_fractions_round_up_to_the_next_whole_second() {
        let text = r#"{"account_id": "A", "activated_at": 0, "resource_packs": [
            {"id": "p", "item": "calls", "quantity": 1,
             "valid_from": "2021-01-01T00:00:00.500+08:00", "valid_until": "2021-02-01T00:00:00.001+08:00"}]}"#;
        let p = &decode_account(text.as_bytes()).unwrap().resource_packs[0];
        assert_eq!((p.valid_from, p.valid_until), (1_609_430_401, 1_612_108_801));
        assert_eq!(ceil_secs(-1500), -1);
        assert_eq!(ceil_secs(2000), 2);
    }
}
