//! Tests that run the real `hush` binary as processes: the whole cluster end to end, the demo,
//! crashes (SIGKILL) and restarts.
//!
//! Declared as a test target of hush-sim (which builds the binary) so cargo passes the binary's
//! path in `CARGO_BIN_EXE_hush`.

mod aggregator_crash;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod allocator;
mod analyst;
mod audit;
mod certs;
mod dashboard;
mod demo;
mod end_to_end;
mod first_hour;
mod load;
mod metrics;
mod replicas;
mod send;
mod served_demo;
mod shuffler_crash;
mod soak;
mod spans;
mod walkthrough;

use std::path::Path;

/// The `hush` binary cargo built for these tests.
pub(crate) fn hush_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_hush"))
}
