//! # hush-sim
//!
//! The in-process hush cluster and what runs on it: the demo, the load and chaos harness, the
//! soak test, and the simulation harness that tunes privacy against utility. The `hush` binary
//! (crate hush-cli) runs each as a command; the tests and the benches start the same cluster.
//!
//! Everything here runs on loopback with real servers, real sled and real crypto; it never
//! serves anything but 127.0.0.1 and never keeps a measurement past the run.

pub mod certs;
pub mod cluster;
pub mod demo;
pub mod load;
pub mod send;
pub mod sim;
pub mod soak;
