//! The leader: report ingest from the last shuffler, and the aggregation job driver.
//!
//! Ingest checks each report (decodes, known task, time window, opens the leader's share),
//! stores the accepted ones with their anti-replay entries in one transaction, flushes, and only
//! then answers. The job driver groups pending reports into jobs, runs `verify_init`, sends each job
//! to the helper with retries and backoff, finishes verification with the helper's verifier
//! messages and commits the job in one transaction.
//! Collection for tenants' collectors is [`collect`].

mod collect;
mod ingest;
mod jobs;

pub use collect::CollectionService;
pub use hush_protocol::collect::MAX_COLLECTION_BYTES;
pub use ingest::IngestService;
pub use jobs::{HelperClient, JobDriver, helper_client};
