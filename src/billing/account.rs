//! The account-record wire format (spec section 10): activation time and
//! purchased resource packs.

use super::event::{check_object, parse, truncate, DecodeError, EventTime, RejectReason};
use serde::{Deserialize, Serialize};

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
    /// Purchased or campaign packs.
    pub resource_packs: Vec<ResourcePack>,
}

#[derive(Deserialize)]
struct RawAccount {
    account_id: String,
    activated_at: EventTime,
    #[serde(default)]
    resource_packs: Option<Vec<RawPack>>,
}

#[derive(Deserialize)]
struct RawPack {
    id: String,
    item: PackItem,
    quantity: u64,
    valid_from: EventTime,
    valid_until: EventTime,
}

/// Decodes and validates an account record.
pub fn decode_account(bytes: &[u8]) -> Result<AccountRecord, DecodeError> {
    check_object(bytes)?;
    let raw: RawAccount = parse(bytes)?;
    if raw.account_id.is_empty() || raw.account_id.len() > 256 {
        return Err(DecodeError::new(RejectReason::InvalidValue, "`account_id` must be 1..=256 bytes"));
    }
    let mut packs = Vec::new();
    for p in raw.resource_packs.unwrap_or_default() {
        if p.id.is_empty() || p.id.len() > 256 {
            return Err(DecodeError::new(RejectReason::InvalidValue, "resource pack `id` must be 1..=256 bytes"));
        }
        if p.valid_from.0 >= p.valid_until.0 {
            return Err(DecodeError::new(
                RejectReason::InvalidValue,
                format!("resource pack `{}`: valid_from is not before valid_until", truncate(&p.id, 64)),
            ));
        }
        if packs.iter().any(|q: &ResourcePack| q.id == p.id) {
            return Err(DecodeError::new(RejectReason::InvalidValue, format!("resource pack id `{}` appears twice", truncate(&p.id, 64))));
        }
        packs.push(ResourcePack {
            id: p.id,
            item: p.item,
            quantity: p.quantity,
            valid_from: p.valid_from.0.div_euclid(1000),
            valid_until: p.valid_until.0.div_euclid(1000),
        });
    }
    Ok(AccountRecord { account_id: raw.account_id, activated_at: raw.activated_at.0.div_euclid(1000), resource_packs: packs })
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
    fn rejects_inverted_window_and_duplicate_ids() {
        let inverted = SPEC_ACCOUNT.replace("2021-03-01", "2019-03-01");
        assert_eq!(decode_account(inverted.as_bytes()).unwrap_err().reason, RejectReason::InvalidValue);
        let dup = SPEC_ACCOUNT.replace(
            "\"resource_packs\": [",
            "\"resource_packs\": [{\"id\": \"pk-001\", \"item\": \"calls\", \"quantity\": 1, \"valid_from\": 0, \"valid_until\": 1000},",
        );
        assert_eq!(decode_account(dup.as_bytes()).unwrap_err().reason, RejectReason::InvalidValue);
    }
}
