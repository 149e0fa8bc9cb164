//! # hush-aggregator
//!
//! The two aggregators of hush. The **leader** receives reports from the last shuffler, opens its
//! share, and drives aggregation jobs; the **helper** verifies each job with the leader. Both keep
//! only aggregate shares (plus the leader's pending reports until they are aggregated) in sled,
//! and each publishes its HPKE configs and serves an admin API.
//!
//! [`Aggregator::start`](server::Aggregator::start) runs one role over a config
//! ([`AggregatorConfig`](config::AggregatorConfig)); the `hush aggregator` command wraps it.
//! The leader's code is [`leader`] (ingest, jobs, collection), the helper's [`helper`], and the
//! checks both run on a collection [`checks`].
//!
//! An aggregator never stores or logs an opened measurement (only aggregate shares), never
//! releases a share without noise and a budget entry, and never learns a client's address: its
//! reports come from the last shuffler.

pub mod admin;
pub mod audit;
pub mod checks;
pub mod client;
pub mod config;
pub mod error;
pub mod helper;
pub mod keys;
pub mod leader;
pub mod retention;
pub mod server;
pub mod shared;
pub mod store;
pub mod tasks;

pub use config::{AggregatorConfig, LeaderConfig};
pub use error::{Error, Result};
pub use server::{Aggregator, Secrets};
