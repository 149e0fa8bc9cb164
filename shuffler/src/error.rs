//! The shuffler's error type and how each case maps to a gRPC status.

use hush_protocol::TaskId;

/// Errors of a shuffler. Internal details (storage) are logged, not sent to peers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// sled failed. `INTERNAL`.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// A stored record does not decode: the database is corrupt or from another version.
    /// `INTERNAL`.
    #[error("corrupt stored {what}: {detail}")]
    Corrupt {
        /// Which record.
        what: &'static str,
        /// What failed.
        detail: String,
    },
    /// The configuration is unusable. Only at startup.
    #[error("configuration error: {0}")]
    Config(String),
    /// The task exists with other parameters. `ALREADY_EXISTS`.
    #[error("task {0} already exists at this shuffler with other parameters; use another task id")]
    TaskConflict(TaskId),
    /// The request is malformed. `INVALID_ARGUMENT`.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// Over a rate limit or the buffer bound. `RESOURCE_EXHAUSTED`.
    #[error("{0}")]
    Overloaded(String),
    /// A key rotation could not pick an id. `FAILED_PRECONDITION`.
    #[error(transparent)]
    Keys(#[from] hush_protocol::keys::KeySetError),
    /// An I/O error at startup (binding, data directory).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A blocking task panicked or was cancelled. `INTERNAL`.
    #[error("internal task failed: {0}")]
    Join(String),
}

impl Error {
    pub(crate) fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        Error::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Status;
        match &e {
            Error::TaskConflict(_) => Status::already_exists(e.to_string()),
            Error::InvalidRequest(_) => Status::invalid_argument(e.to_string()),
            Error::Overloaded(_) => Status::resource_exhausted(e.to_string()),
            Error::Keys(_) => Status::failed_precondition(e.to_string()),
            Error::Storage(_)
            | Error::Corrupt { .. }
            | Error::Config(_)
            | Error::Io(_)
            | Error::Join(_) => {
                tracing::error!(error = %e, "internal error");
                Status::internal("internal error; see the shuffler's log")
            }
        }
    }
}

impl From<tokio::task::JoinError> for Error {
    fn from(e: tokio::task::JoinError) -> Self {
        Error::Join(e.to_string())
    }
}

/// The shuffler's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
