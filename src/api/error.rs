//! The one place that decides what a client sees of an error: status, OperationOutcome
//! issue code and message. Internal detail (SQL, driver messages, key ids) is logged here
//! and never sent; 503 (this instance cannot serve now) stays apart from 500.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpResponse, ResponseError};

use super::negotiation::FHIR_JSON_UTF8;
use crate::access::AuthError;
use crate::error::AppError;
use crate::fhir::outcome::{IssueCode, OperationOutcome, Severity};
use crate::fhir::resource_types::TypeError;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: &str = "5";

impl AppError {
    fn issue(&self) -> (IssueCode, String, Option<String>) {
        match self {
            Self::Validation(e) | Self::Unprocessable(e) => {
                (e.code, e.message.clone(), e.expression.clone())
            }
            Self::BadRequest {
                message,
                expression,
            } => (IssueCode::Invalid, message.clone(), expression.clone()),
            Self::InvalidId(e) => (IssueCode::Value, e.to_string(), None),
            Self::UnknownType(TypeError::Unknown(_)) => {
                (IssueCode::NotFound, self.to_string(), None)
            }
            Self::UnknownType(TypeError::Unsupported(_)) => {
                (IssueCode::NotSupported, self.to_string(), None)
            }
            Self::Unauthenticated(_) => (IssueCode::Login, self.to_string(), None),
            Self::Forbidden { .. } => (IssueCode::Forbidden, self.to_string(), None),
            Self::NotFound(_) | Self::NoRoute(_) => (IssueCode::NotFound, self.to_string(), None),
            Self::Gone { .. } => (IssueCode::Deleted, self.to_string(), None),
            Self::Conflict(_) => (IssueCode::Conflict, self.to_string(), None),
            Self::PreconditionFailed(_) => (IssueCode::Conflict, self.to_string(), None),
            Self::PayloadTooLarge { .. } | Self::TooLarge(_) => {
                (IssueCode::TooLong, self.to_string(), None)
            }
            Self::TooManyRequests { .. } => (IssueCode::Throttled, self.to_string(), None),
            Self::RequestTimeout(_) => (IssueCode::Timeout, self.to_string(), None),
            Self::UnsupportedMediaType(_) | Self::NotAcceptable(_) | Self::MethodNotAllowed(_) => {
                (IssueCode::NotSupported, self.to_string(), None)
            }
            Self::Sealed(_) => (IssueCode::Transient, self.to_string(), None),
            Self::Unavailable(_) | Self::LedgerUnavailable(_) => (
                IssueCode::Transient,
                "the server cannot handle the request right now; retry later".into(),
                None,
            ),
            Self::Integrity { .. } | Self::Internal(_) => {
                (IssueCode::Exception, "internal server error".into(), None)
            }
        }
    }
}

impl AppError {
    /// The OperationOutcome a client sees for this error (also inside Bundle responses).
    pub fn outcome(&self) -> OperationOutcome {
        let (code, diagnostics, expression) = self.issue();
        OperationOutcome::single(Severity::Error, code, diagnostics, expression)
    }
}

impl AppError {
    /// The `WWW-Authenticate` challenge of a 401 or 403 (RFC 6750, section 3).
    pub(crate) fn bearer_challenge(&self) -> Option<String> {
        const REALM: &str = "Bearer realm=\"fhirledger\"";
        match self {
            Self::Unauthenticated(AuthError::Missing) | Self::TooManyRequests { .. } => {
                Some(REALM.into())
            }
            Self::Unauthenticated(error) => Some(format!(
                "{REALM}, error=\"invalid_token\", error_description=\"{}\"",
                error.to_string().replace(['"', '\\'], "'")
            )),
            Self::Forbidden { .. } => Some(format!("{REALM}, error=\"insufficient_scope\"")),
            _ => None,
        }
    }
}

impl ResponseError for AppError {
    fn status_code(&self) -> StatusCode {
        match self {
            Self::Validation(_) | Self::BadRequest { .. } | Self::InvalidId(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden { .. } => StatusCode::FORBIDDEN,
            Self::UnknownType(_) | Self::NotFound(_) | Self::NoRoute(_) => StatusCode::NOT_FOUND,
            Self::Gone { .. } => StatusCode::GONE,
            Self::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge { .. } | Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::NotAcceptable(_) => StatusCode::NOT_ACCEPTABLE,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Unavailable(_) | Self::LedgerUnavailable(_) | Self::Sealed(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Integrity { .. } | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        self.response_with(self.outcome(), FHIR_JSON_UTF8)
    }
}

impl AppError {
    /// The one builder of an error's response: its status, the headers that status carries
    /// (`Retry-After`, `WWW-Authenticate`, `ETag` of a deleted version), the log line, and
    /// `outcome` as the body in `content_type` (a failed transaction's outcome names its
    /// entry; every other error answers with [`Self::outcome`]).
    pub(crate) fn response_with(
        &self,
        outcome: OperationOutcome,
        content_type: &str,
    ) -> HttpResponse {
        let status = self.status_code();
        match self {
            // Logged with row ids only: the content is what we could not trust.
            Self::Integrity { .. } => {
                tracing::error!(error = %self, "stored data failed its integrity check")
            }
            Self::Internal(_) => tracing::error!(error = %self, "internal error"),
            Self::Unavailable(_) => tracing::warn!(error = %self, "answering 503"),
            Self::LedgerUnavailable(_) => {
                tracing::error!(error = %self, "ledger not writable: failing closed")
            }
            _ => tracing::debug!(status = status.as_u16(), "request refused"),
        }
        let mut response = HttpResponse::build(status);
        response.insert_header((header::CONTENT_TYPE, content_type));
        if let Self::Unavailable(_) | Self::LedgerUnavailable(_) | Self::Sealed(_) = self {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        if let Self::TooManyRequests { retry_after } = self {
            response.insert_header((header::RETRY_AFTER, retry_after.to_string()));
        }
        if let Some(challenge) = self.bearer_challenge() {
            response.insert_header((header::WWW_AUTHENTICATE, challenge));
        }
        if let Self::Gone { version_id, .. } = self {
            response.insert_header((header::ETAG, format!("W/\"{version_id}\"")));
        }
        response.body(outcome.to_json())
    }
}
