//! # hush-client
//!
//! The only hush code a service runs. It never sends a measurement in the clear, never talks to
//! an aggregator or a later shuffler (only to the first shuffler and its tenant's key directory),
//! and never blocks or fails the service's request path.
//!
//! The library a service embeds to report telemetry to hush: [`HushClient`] (the runtime: a
//! metrics registry and a background uploader, see [`runtime`]), [`HushLayer`] (a `tracing`
//! layer that records span durations as latencies) and [`ClientTask`] (the report path). The
//! report path
//! maps a latency to the task's bucket, applies the task's contribution bound (an out-of-range
//! value is an error unless the task clips), secret-shares the measurement with Prio3, seals one
//! share to each aggregator with HPKE, and wraps the report in one onion layer per shuffler, padded
//! to the task's fixed packet size.
//!
//! ```no_run
//! # fn demo(task: hush_client::ClientTask) -> Result<(), hush_client::ClientError> {
//! use std::time::{Duration, SystemTime, UNIX_EPOCH};
//! use hush_protocol::Time;
//!
//! let m = task.latency_event(Duration::from_millis(42))?;
//! let now = Time::from_secs(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs());
//! let packet = task.packet(&m, now)?; // send to the first shuffler
//! # let _ = packet; Ok(()) }
//! ```

pub mod config;
pub mod layer;
#[cfg(feature = "metrics")]
pub mod recorder;
pub mod report;
pub mod runtime;

pub use config::{
    ClientConfig, ConfigError, CounterMetric, LatencyMetric, RuntimeSettings, TaskSource,
};
pub use hush_protocol::directory::KeySet;
/// The protocol types a service handles: it needs no direct hush-protocol dependency.
pub use hush_protocol::{Epsilon, MeasurementKind, TaskConfig, TaskParams, Time};
pub use layer::HushLayer;
#[cfg(feature = "metrics")]
pub use recorder::{HushRecorder, LatencyUnit};
pub use report::{ClientError, ClientTask, Prepared};
pub use runtime::{
    ClientStats, Counter, Endpoints, HushClient, KeySource, Latency, RuntimeConfig, RuntimeError,
    fetch_key_set,
};
