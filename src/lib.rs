//! gatebill: a streaming usage aggregator for API-gateway billing.
//!
//! [`billing`] is the pure rule book; the worker is built around it.

pub mod billing;
