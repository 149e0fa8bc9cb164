//! Support code of hush's integration tests: fixtures, in-process servers, and real processes.
//!
//! Tests that need servers start them on 127.0.0.1 with an ephemeral port and a temporary data
//! directory, and stop them.

pub mod browser;
pub mod cluster;
pub mod fixture;
pub mod fuzzing;
pub mod http;
pub mod mixnet;
pub mod process;

pub use fixture::{Failure, Fixture, for_tenant, free_addr, pinned_key_set, task_params};
