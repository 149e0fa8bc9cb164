//! # hush-protocol
//!
//! The wire formats, crypto and task configuration every hush party shares: ids and coarse
//! time, task configuration and budget purposes, HPKE envelopes and key sets, the report and
//! onion packet formats, the Prio3 wrapper, DP decoding, the key directory's signed-off set, the
//! client side of a link (endpoints, TLS client config, bearer tokens), the one retry policy, and
//! the generated `hush.v1` gRPC code with checked conversions into domain types.
//!
//! It never does I/O: no runtime, no storage, no servers, no files (server plumbing is
//! hush-server). Decoders are strict (no trailing bytes, no truncation) and errors name what was
//! wrong.

pub mod clock;
pub mod codec;
pub mod collect;
pub mod convert;
pub mod directory;
pub mod dp;
pub mod hpke;
pub mod ids;
pub mod keys;
pub mod link;
pub mod onion;
pub mod outcomes;

pub mod report;
pub mod retry;
pub mod task;
pub mod vdaf;

/// The protocol version. It is part of every HPKE info string, the VDAF context and replay tags,
/// so artifacts of one version never verify under another.
pub const VERSION: &str = "hush/1";

/// The generated `hush.v1` protobuf messages and gRPC clients and servers.
pub mod proto {
    /// Package `hush.v1`.
    #[allow(missing_docs, unreachable_pub, clippy::all, clippy::pedantic)]
    pub mod v1 {
        tonic::include_proto!("hush.v1");
    }

    /// The encoded `FileDescriptorSet` of every `hush.v1` proto, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/hush_descriptor.bin"));
}

pub use clock::{Clock, MockClock, SystemClock};
pub use codec::{Codec, DecodeError};
pub use hpke::{HpkeCiphertext, HpkeConfig, HpkeKeypair, Keyring, Label, Role};
pub use ids::{AggregationJobId, CollectionId, Interval, ReportId, ReportIdChecksum, TaskId, Time};
pub use outcomes::Outcomes;
pub use report::Report;
pub use task::{BudgetPurpose, Epsilon, MeasurementKind, TaskConfig, TaskParams};
pub use vdaf::{AggregateShare, Measurement, Vdaf, VerifyKey};
