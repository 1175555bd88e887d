//! gatebill: a streaming usage aggregator for API-gateway billing.
//!
//! [`billing`] is the pure rule book; everything else (Kafka, RocksDB, the
//! command line) is built around it:
//!
//! - [`pipeline`]: decode, dedupe, aggregate, emit bills, against the store;
//! - [`store`]: the RocksDB state, written one atomic batch at a time;
//! - [`worker`]: the Kafka driver of `run` and `replay`; [`file_replay`]: the
//!   file driver of `replay --input-file`; [`driver`]: what both share;
//!   [`delivery`]: how either makes a staged step durable downstream;
//! - [`explain`]: why a bill is what it is, from a state directory;
//! - [`kafka`], [`metrics`], [`inspect`], [`gen`], [`traffic`], [`config`], [`cli`].

pub mod billing;
pub mod changelog;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod driver;
pub mod explain;
pub mod file_replay;
pub mod gathered;
pub mod gen;
pub mod inspect;
pub mod kafka;
pub mod metrics;
pub mod pipeline;
pub mod store;
pub mod traffic;
pub mod worker;
