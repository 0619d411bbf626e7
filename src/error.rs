//! The application error: what can go wrong in a request, independent of HTTP.
//!
//! Error tiers (house style): `anyhow` only in `main` and tests; each layer has its own
//! `thiserror` type (`StoreError`, `ValidationError`, `IntegrityError`, `KeyError`); the
//! request path converts them into [`AppError`], and `api::error` alone decides what a
//! client sees of each (status, OperationOutcome issue code, message). Driver types stay in
//! their layer: diesel's errors become `StoreError` inside `store/`.

use crate::fhir::ValidationError;
use crate::fhir::bundle_request::BundleError;
use crate::fhir::document::VersionId;
use crate::fhir::patch::PatchError;
use crate::fhir::resource_types::{InvalidId, TypeError};
use crate::fhir::search_query::SearchError;
use crate::fhir::searchset::RenderError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Validation(#[from] ValidationError),
    /// A malformed request other than its resource body (header, parameter, id).
    #[error("{message}")]
    BadRequest {
        message: String,
        expression: Option<String>,
    },
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    #[error(transparent)]
    UnknownType(#[from] TypeError),
    /// No valid bearer token: 401 with `WWW-Authenticate`.
    #[error(transparent)]
    Unauthenticated(#[from] crate::access::AuthError),
    /// The token may not do this: 403, naming the rule that refused. `patients` are the
    /// compartments (`Patient/<id>`) of a resource refused after it was read for the check,
    /// so that the refusal appears in those patients' views of the ledger.
    #[error("{message} (rule: {rule})")]
    Forbidden {
        rule: &'static str,
        message: String,
        patients: Vec<String>,
    },
    #[error("{0} is not known")]
    NotFound(String),
    #[error("{resource}/{id} was deleted (version {version_id})")]
    Gone {
        resource: String,
        id: String,
        version_id: VersionId,
    },
    /// A well-formed request the server cannot carry out on the resource as it is (a
    /// PATCH that fails or yields an invalid resource, http.html#patch): 422.
    #[error(transparent)]
    Unprocessable(ValidationError),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PreconditionFailed(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A request whose work would exceed a bound (a PATCH's operations or result): 413.
    #[error("{0}")]
    TooLarge(String),
    /// Too many refused requests from this client: 429, retry after `retry_after` seconds.
    #[error(
        "too many requests without valid credentials from this address; retry in {retry_after} s"
    )]
    TooManyRequests { retry_after: u64 },
    /// The client stopped sending a request body it started: 408.
    #[error("{0}")]
    RequestTimeout(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    NotAcceptable(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("no such endpoint: {0}")]
    NoRoute(String),
    /// This instance cannot serve now (database unreachable, pool exhausted, busy).
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The server started sealed and has not been given enough master key shares: 503,
    /// saying how many more it needs.
    #[error("{0}")]
    Sealed(String),
    /// The ledger cannot be written: the request fails closed, returning nothing.
    #[error("ledger unavailable: {0}")]
    LedgerUnavailable(String),
    /// Stored data failed authentication: tampering, a moved row, or a wrong key.
    #[error("integrity failure for {resource}/{id}/_history/{version_id}")]
    Integrity {
        resource: String,
        id: String,
        version_id: VersionId,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl AppError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            expression: None,
        }
    }
}

impl From<StoreError> for AppError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(detail) => Self::Unavailable(detail),
            StoreError::UniqueViolation => {
                Self::Conflict("the resource was changed concurrently; retry".into())
            }
            StoreError::Database(e) => Self::Internal(e.to_string()),
            StoreError::Migration(e) | StoreError::Corrupt(e) => Self::Internal(e),
        }
    }
}

impl From<SearchError> for AppError {
    fn from(error: SearchError) -> Self {
        Self::BadRequest {
            message: error.message,
            expression: Some(error.parameter),
        }
    }
}

impl From<BundleError> for AppError {
    fn from(error: BundleError) -> Self {
        Self::BadRequest {
            message: error.message,
            expression: Some(error.expression),
        }
    }
}

impl From<RenderError> for AppError {
    fn from(error: RenderError) -> Self {
        Self::Internal(error.to_string())
    }
}

/// A ledger computation that failed over stored data (a tree hash that is missing, a size
/// out of range): the log is not as the server wrote it.
impl From<crate::ledger::LedgerError> for AppError {
    fn from(error: crate::ledger::LedgerError) -> Self {
        Self::Internal(format!("ledger: {error}"))
    }
}

impl From<PatchError> for AppError {
    fn from(error: PatchError) -> Self {
        match error {
            PatchError::Malformed(message) => Self::BadRequest {
                message,
                expression: None,
            },
            PatchError::Unprocessable(error) => Self::Unprocessable(error),
            PatchError::TooLarge(message) => Self::TooLarge(message),
        }
    }
}
