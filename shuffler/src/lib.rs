//! hush mix node (shuffler).
//!
//! A shuffler takes batches of fixed-size onion packets, opens one HPKE layer of each with its
//! own key, refuses replays (a tag per packet, per key epoch), and stores what it peeled in the
//! open batch of the next hop the layer names. A batch leaves when it is full, or after a maximum
//! wait with at least a minimum number of packets; it is shuffled with ChaCha20 seeded from the
//! OS and sent to the next hop, and deleted only once acknowledged. A sender's address and
//! arrival time are never stored, forwarded, or logged above debug level; the packet file of an
//! open batch holds its packets in arrival order until the batch is forwarded.
//!
//! ```text
//! previous hop ──SubmitPackets──▶ peel (all cores) ─▶ packet file, sled: extent + tags ─▶ ack
//!                                                  batch closes ─▶ shuffle ─▶ next hop ─▶ delete
//! ```

pub mod admin;
pub mod config;
pub mod error;
pub mod ingest;
pub mod keys;
pub mod mix;
pub mod packets;
pub mod server;
pub mod shared;
pub mod store;
pub mod tags;
pub mod tasks;

pub use config::{HopKind, NextHopConfig, ShufflerConfig};
pub use error::{Error, Result};
pub use server::ShufflerNode;
