//! The failures every hush server shares, whatever its role: storage, corrupt records, an
//! unusable configuration, I/O at startup, a failed blocking task, a key rotation that cannot
//! pick an id. Each role's error type wraps this one; to a peer every case but [`ServerError::Keys`]
//! is `INTERNAL` with a pointer to the operator's log, never the detail.

use std::path::PathBuf;

/// A failure no request caused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// sled failed.
    #[error("storage error: {0}")]
    Storage(#[from] sled::Error),
    /// The PostgreSQL store failed: no connection, a query refused, a transaction that kept
    /// conflicting.
    #[error("database error: {0}")]
    Database(String),
    /// Another process holds the database.
    #[error(
        "the database in {} is in use by another process; stop it, or give this one another data_dir",
        .0.display()
    )]
    InUse(PathBuf),
    /// The data directory cannot be created.
    #[error("cannot create the data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A stored record does not decode: the database is corrupt or from another version.
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
    /// A key rotation could not pick an id. `FAILED_PRECONDITION`.
    #[error(transparent)]
    Keys(#[from] hush_protocol::keys::KeySetError),
    /// An I/O error at startup (binding, data directory).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A blocking task panicked or was cancelled.
    #[error("internal task failed: {0}")]
    Join(String),
}

impl ServerError {
    /// A record named `what` that does not decode.
    pub fn corrupt(what: &'static str, detail: impl ToString) -> Self {
        ServerError::Corrupt {
            what,
            detail: detail.to_string(),
        }
    }

    /// The status a peer sees: the detail of an internal failure is logged here and only a
    /// pointer to `party`'s log is sent.
    pub fn to_status(&self, party: &str) -> tonic::Status {
        match self {
            ServerError::Keys(_) => tonic::Status::failed_precondition(self.to_string()),
            _ => {
                tracing::error!(error = %self, "internal error");
                tonic::Status::internal(format!("internal error; see the {party}'s log"))
            }
        }
    }
}

impl From<tokio::task::JoinError> for ServerError {
    fn from(e: tokio::task::JoinError) -> Self {
        ServerError::Join(e.to_string())
    }
}

/// For a role's error type (which has a `Server(ServerError)` variant): the constructors
/// `corrupt` and `config`, and `From` for every failure [`ServerError`] wraps: sled, I/O, a
/// failed blocking task, a key set change.
#[macro_export]
macro_rules! server_error_conversions {
    ($t:ty) => {
        impl $t {
            /// A stored record named `what` that does not decode.
            pub fn corrupt(what: &'static str, detail: impl ToString) -> Self {
                Self::Server($crate::ServerError::corrupt(what, detail))
            }

            /// An unusable configuration, found at startup.
            pub fn config(why: String) -> Self {
                Self::Server($crate::ServerError::Config(why))
            }
        }
        impl From<$crate::error::private::SledError> for $t {
            fn from(e: $crate::error::private::SledError) -> Self {
                Self::Server(e.into())
            }
        }
        impl From<std::io::Error> for $t {
            fn from(e: std::io::Error) -> Self {
                Self::Server(e.into())
            }
        }
        impl From<$crate::error::private::JoinError> for $t {
            fn from(e: $crate::error::private::JoinError) -> Self {
                Self::Server(e.into())
            }
        }
        impl From<$crate::error::private::KeySetError> for $t {
            fn from(e: $crate::error::private::KeySetError) -> Self {
                Self::Server(e.into())
            }
        }
    };
}

#[doc(hidden)]
pub mod private {
    pub use hush_protocol::keys::KeySetError;
    pub use sled::Error as SledError;
    pub use tokio::task::JoinError;
}
