//! The billing core: the rule book of `spec/billing-rules.md` as pure functions.
//!
//! Architecture invariant: nothing in this module performs I/O. It does not
//! import tokio, rdkafka or rocksdb, and it never touches files or sockets.
//! Everything here is a function of its arguments, which is what makes a bill
//! reproducible from (usage, account record, configuration).

pub mod account;
pub mod alerts;
pub mod bill;
pub mod calendar;
pub mod classify;
pub mod config;

pub mod entitlements;
pub mod event;
pub mod explain;
pub mod money;
pub mod reference;
pub mod scan;
pub mod usage;

pub use account::{decode_account, decode_account_checked, DecodedAccount, RejectedPack, RejectedTerm};
pub use account::{AccountRecord, PackItem, PricingTerm, ResourcePack, TermKind};
pub use bill::{compute_bills, month_pricing, AppliedTerm, Bill, BillContent, BillRecord, BillStatus, ChargeLine};
pub use calendar::{BillingCalendar, Month};
pub use classify::{classify, Metered};
pub use config::Rules;
pub use config::{BillingConfig, ConfigError, PriceList, PriceVersion, PriceVersionConfig};
pub use entitlements::{Deduction, PackSource};
pub use event::{decode_event, AccessEvent, DecodeError, RejectReason};
pub use usage::{HourUsage, HourView, MonthUsage};
