//! The store's one error type, [`StoreError`], and how a diesel error is classified into it.

use diesel::r2d2;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

/// Store failures, classified so the API can tell "try again later" (503) from a bug (500)
/// and a lost race (retry or 409).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("unique constraint violated")]
    UniqueViolation,
    #[error("database error: {0}")]
    Database(#[from] DieselError),
    #[error("migration failed: {0}")]
    Migration(String),
    /// Stored data that cannot be read back as it was written (a damaged row).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Maps a diesel error, keeping the kinds callers act upon.
    pub fn classify(error: DieselError) -> Self {
        match error {
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                Self::UniqueViolation
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                Self::Unavailable(info.message().to_owned())
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if is_sqlite_busy(info.message()) =>
            {
                Self::Unavailable(info.message().to_owned())
            }
            other => Self::Database(other),
        }
    }
}

/// SQLite reports a lock it waited for in vain only in the message (diesel has no kind for it).
fn is_sqlite_busy(message: &str) -> bool {
    message.contains("database is locked") || message.contains("database is busy")
}

impl From<r2d2::PoolError> for StoreError {
    fn from(error: r2d2::PoolError) -> Self {
        Self::Unavailable(error.to_string())
    }
}
