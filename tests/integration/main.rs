//! hush's cross-crate integration tests: one binary, one module per area.

mod aggregation;
mod client_adoption;
mod client_runtime;
mod collection;
mod docs_samples;
mod fuzz_regressions;
mod key_directory;
mod probes;
mod report_path;
mod results;
mod shuffler;
mod surface;
mod tls;
