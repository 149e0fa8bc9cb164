//! # hush-server
//!
//! What every hush server process shares, whatever its role (shuffler, leader, helper, the
//! collector's results service): the sled database ([`db`]), serving with limits and the one
//! shutdown signal ([`serve`]), TLS and peer identities ([`tls`]), bearer tokens ([`auth`]),
//! per-tenant bounds ([`quota`]), the HPKE key manager ([`keys`]), health and reflection
//! ([`probe`]), a span per request ([`trace`]), Prometheus metrics ([`metrics`]) and the error core ([`error`]).
//!
//! It never holds a role's logic: no report, packet or collection is handled here, and nothing
//! here logs a measurement or a sender's address above debug level.

pub mod auth;
pub mod db;
pub mod error;
pub mod keys;
pub mod metrics;
pub mod probe;
pub mod quota;
pub mod serve;
pub mod tls;
pub mod trace;

pub use error::ServerError;
