//! The aggregator's error type and how each case maps to a gRPC status.

use hush_protocol::TaskId;
use hush_server::ServerError;

/// Errors of the aggregator roles. Each variant documents the gRPC status it becomes; internal
/// details (storage, crypto) are logged, not sent to peers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A failure no request caused: storage, a corrupt record, the configuration, I/O at
    /// startup, a failed blocking task (`INTERNAL`), or a key rotation that cannot pick an id
    /// (`FAILED_PRECONDITION`).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The task is not provisioned here. `NOT_FOUND`.
    #[error("task {0} is not provisioned at this aggregator")]
    UnknownTask(TaskId),
    /// The task exists with other parameters. `ALREADY_EXISTS`.
    #[error(
        "task {0} already exists with other parameters; delete it first or use another task id"
    )]
    TaskConflict(TaskId),
    /// The request is malformed or does not fit the task. `INVALID_ARGUMENT`.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// An aggregation job id was reused with other contents. `ALREADY_EXISTS`.
    #[error("aggregation job {0} already ran with other contents")]
    JobConflict(String),
    /// The request is for the other role. `FAILED_PRECONDITION`.
    #[error("{0}")]
    WrongRole(String),
    /// A URL this process was given does not fit its TLS setting (a client of another
    /// party; never the answer to a request). `INVALID_ARGUMENT`.
    #[error("configuration error: {0}")]
    Link(#[from] hush_protocol::link::LinkError),
    /// The peer aggregator failed or refused. `UNAVAILABLE`.
    #[error("peer aggregator: {0}")]
    Peer(#[from] tonic::Status),
    /// Too many requests in flight. `RESOURCE_EXHAUSTED`.
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// The privacy budget of a window does not cover the collection. `FAILED_PRECONDITION`.
    #[error(
        "privacy budget exhausted: window {window} has ε {left} left of its {purpose} budget and \
         this collection needs ε {needed}; nothing was spent"
    )]
    OverBudget {
        /// The window.
        window: hush_protocol::Time,
        /// ε left.
        left: hush_protocol::Epsilon,
        /// ε per collection.
        needed: hush_protocol::Epsilon,
        /// "routine" or "alert".
        purpose: &'static str,
    },
    /// The interval overlaps a batch collected before without being equal to it.
    /// `FAILED_PRECONDITION`.
    #[error(
        "the interval overlaps the batch {start}+{duration} s collected before (window {window} \
         is in both): collect exactly that batch again, or an interval disjoint from every \
         collected batch; nothing was spent"
    )]
    BatchOverlap {
        /// A window in both.
        window: hush_protocol::Time,
        /// The earlier batch's start.
        start: hush_protocol::Time,
        /// Its duration in seconds.
        duration: u64,
    },
    /// The batch was collected as often as the task allows. `FAILED_PRECONDITION`.
    #[error(
        "the batch was collected {routine} times for routine use and {alert} times for alerts; \
         the task allows one routine collection per batch{}, so this {purpose} collection is \
         refused; nothing was spent",
        if *max > 0 { format!(" and {max} in all") } else { String::new() }
    )]
    BatchExhausted {
        /// Routine collections so far.
        routine: u32,
        /// Alert collections so far.
        alert: u32,
        /// The refused purpose.
        purpose: &'static str,
        /// The task's `max_collections_per_batch`.
        max: u32,
    },
    /// Too few reports for a collection. `FAILED_PRECONDITION`. The message never holds the
    /// count: exact counts never leave the aggregators (the operator's log has it).
    #[error(
        "the interval holds fewer reports than the task's min_batch_size of {min}; \
         collect a longer interval or wait for more reports (nothing was spent)"
    )]
    BatchTooSmall {
        /// Reports in the interval (for the operator's log only).
        count: u64,
        /// The task's minimum.
        min: u64,
    },
    /// The two aggregators did not aggregate the same reports. `FAILED_PRECONDITION`. The
    /// message must not hold a report count: it reaches the collector.
    #[error("the aggregators disagree on the reports of the interval: {0}")]
    Mismatch(String),
    /// The interval is older than the task's retention: its aggregates were deleted.
    #[error(
        "the interval starts at {start}, before this task's retention of {retention_s} s (everything older than {cutoff} is deleted); collect newer windows"
    )]
    PastRetention {
        /// Start of the interval.
        start: u64,
        /// The oldest time kept.
        cutoff: u64,
        /// The task's retention.
        retention_s: u64,
    },
    /// A collection id was reused for another request. `ALREADY_EXISTS`.
    #[error("collection {0} already ran with another request; use a fresh collection id")]
    CollectionConflict(String),
    /// The collection cannot run yet. `UNAVAILABLE`.
    #[error("{0}")]
    NotReady(String),
    /// Missing or wrong credentials. `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials for something else. `PERMISSION_DENIED`.
    #[error("{0}")]
    PermissionDenied(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::UnknownTask(_) => Status::not_found(e.to_string()),
            Error::TaskConflict(_) | Error::JobConflict(_) | Error::CollectionConflict(_) => {
                Status::already_exists(e.to_string())
            }
            Error::InvalidRequest(_) | Error::Link(_) => Status::invalid_argument(e.to_string()),
            Error::WrongRole(_)
            | Error::OverBudget { .. }
            | Error::BatchOverlap { .. }
            | Error::BatchExhausted { .. }
            | Error::BatchTooSmall { .. }
            | Error::PastRetention { .. }
            | Error::Mismatch(_) => Status::failed_precondition(e.to_string()),
            Error::NotReady(_) => Status::unavailable(e.to_string()),
            Error::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            Error::PermissionDenied(_) => Status::permission_denied(e.to_string()),
            Error::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            Error::Peer(s) => Status::unavailable(format!("peer aggregator: {}", s.message())),
            Error::Server(s) => s.to_status("aggregator"),
        }
    }
}

hush_server::server_error_conversions!(Error);

/// The aggregator's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
