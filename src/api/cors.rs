//! Cross-origin access for browser SMART apps (Fetch standard, "CORS protocol"): which
//! origins, methods and request headers are allowed, and which response headers a page may
//! read. Only exactly configured origins are allowed; without any, CORS is off.

use actix_cors::Cors;
use actix_web::http::{Method, header};

use super::request::{LEDGER_ENTRY_HEADER, REQUEST_ID_HEADER};

/// Request headers an app sends beyond the CORS-safelisted ones: the token, FHIR's
/// conditional and versioning headers (http.html) and `Prefer`.
const ALLOWED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "if-match",
    "if-none-match",
    "if-none-exist",
    "if-modified-since",
    "prefer",
    "accept",
];

/// How long a browser may reuse a preflight's answer, in seconds: origins change only with
/// a restart, and every FHIR request with a token would otherwise cost a second round trip.
const PREFLIGHT_MAX_AGE: usize = 3600;

/// The CORS middleware for `origins` (exact, as validated by the configuration). Credentials
/// (cookies) are not allowed: SMART apps send their token in `Authorization`.
pub fn cors(origins: &[String]) -> Cors {
    origins
        .iter()
        .fold(Cors::default(), |cors, origin| cors.allowed_origin(origin))
        .allowed_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allowed_headers(ALLOWED_HEADERS.iter().copied())
        // Every response header the server sets that is not CORS-safelisted, so that an app
        // can follow a `Location`, send an `ETag` back in `If-Match`, keep the ledger receipt
        // of what it did, quote the request id, and see why a token was refused and when to
        // retry.
        .expose_headers([
            header::LOCATION,
            header::ETAG,
            header::LAST_MODIFIED,
            LEDGER_ENTRY_HEADER,
            REQUEST_ID_HEADER,
            header::WWW_AUTHENTICATE,
            header::RETRY_AFTER,
        ])
        .max_age(PREFLIGHT_MAX_AGE)
}
