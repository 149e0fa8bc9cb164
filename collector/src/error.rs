//! The results service's error type and how each case maps to a gRPC status (and, through
//! [`crate::http`], to an HTTP status).

use hush_protocol::TaskId;
use hush_server::ServerError;

/// Errors of the collector's results service. Internal details (storage) are logged, not sent
/// to callers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A failure no request caused: storage, a corrupt record, the configuration, I/O at
    /// startup, a failed blocking task. `INTERNAL`.
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The task is not one of this service's. `NOT_FOUND`.
    #[error("task {0} is not one of this results service's tasks")]
    UnknownTask(TaskId),
    /// The request is malformed or does not fit the task. `INVALID_ARGUMENT`.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The feature is turned off in this service's configuration. `FAILED_PRECONDITION`.
    #[error("{0}")]
    Disabled(String),
    /// The answer is not there yet. `UNAVAILABLE`.
    #[error("{0}")]
    NotReady(String),
    /// Missing or wrong credentials. `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// The leader or a party of the cascade failed or refused. `UNAVAILABLE`.
    #[error("peer: {0}")]
    Peer(#[from] tonic::Status),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::UnknownTask(_) => Status::not_found(e.to_string()),
            Error::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
            Error::Disabled(_) => Status::failed_precondition(e.to_string()),
            Error::NotReady(_) => Status::unavailable(e.to_string()),
            Error::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
            Error::Peer(s) => Status::unavailable(format!("peer: {}", s.message())),
            Error::Server(s) => s.to_status("results service"),
        }
    }
}

hush_server::server_error_conversions!(Error);

/// The results service's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
