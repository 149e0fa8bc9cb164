//! The shuffler's error type and how each case maps to a gRPC status.

use hush_protocol::TaskId;
use hush_server::ServerError;

/// Errors of a shuffler. Internal details (storage) are logged, not sent to peers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A failure no request caused: storage, a corrupt record, the configuration, I/O at
    /// startup, a failed blocking task (`INTERNAL`), or a key rotation that cannot pick an id
    /// (`FAILED_PRECONDITION`).
    #[error(transparent)]
    Server(#[from] ServerError),
    /// The task exists with other parameters. `ALREADY_EXISTS`.
    #[error("task {0} already exists at this shuffler with other parameters; use another task id")]
    TaskConflict(TaskId),
    /// The request is malformed. `INVALID_ARGUMENT`.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Over a rate limit or the buffer bound. `RESOURCE_EXHAUSTED`.
    #[error("{0}")]
    Overloaded(String),
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::TaskConflict(_) => Status::already_exists(e.to_string()),
            Error::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
            Error::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            Error::Server(s) => s.to_status("shuffler"),
        }
    }
}

hush_server::server_error_conversions!(Error);

/// The shuffler's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
