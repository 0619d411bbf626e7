//! Per-request plumbing: the request id and [`RequestContext`] (the one place a request's
//! identity is established), access logging, query parameters, `Prefer` and `If-Match`.

use std::future::ready;
use std::time::Instant;

use actix_web::body::MessageBody;
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderName, HeaderValue};
use actix_web::middleware::Next;
use actix_web::{FromRequest, HttpMessage as _, HttpRequest, web};
use futures_util::StreamExt as _;
use futures_util::future::LocalBoxFuture;
use tracing::Instrument as _;

use super::AppState;
use crate::access::{AuthError, Principal, ReceiptSlot, RequestContext, Slot};
use crate::error::AppError;
use crate::fhir::document::VersionId;

pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");
/// The receipt of the ledger entry a response produced (design.md, "Receipt").
pub const LEDGER_ENTRY_HEADER: HeaderName = HeaderName::from_static("x-ledger-entry");

/// The server-assigned id of the request being served (stored in request extensions).
#[derive(Debug, Clone)]
struct RequestId(String);

/// Middleware: assigns the request id, runs the request inside a tracing span that carries
/// it, echoes it in `X-Request-Id`, returns the ledger receipt the request produced in
/// `X-Ledger-Entry` (on errors too), and logs one line per request. Only method, path and
/// status are logged: query strings and bodies may hold PHI.
pub async fn request_context(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let request_id = uuid::Uuid::new_v4().to_string();
    let receipt = ReceiptSlot::default();
    req.extensions_mut().insert(RequestId(request_id.clone()));
    req.extensions_mut().insert(receipt.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %req.method(),
        path = %req.path(),
    );
    let started = Instant::now();
    let mut response = next.call(req).instrument(span.clone()).await?;
    if let Ok(value) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(REQUEST_ID_HEADER, value);
    }
    if let Some(value) = receipt.get().and_then(|r| HeaderValue::from_str(&r).ok()) {
        response.headers_mut().insert(LEDGER_ENTRY_HEADER, value);
    }
    let elapsed = started.elapsed();
    if let Some(metrics) = crate::metrics::metrics() {
        let request = response.request();
        let interaction = crate::metrics::interaction(
            request.method().as_str(),
            request.match_pattern().as_deref(),
        );
        metrics.observe_request(interaction, response.status().as_u16(), elapsed);
    }
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            elapsed_us = elapsed.as_micros() as u64,
            "request handled"
        );
    });
    Ok(response)
}

/// Authentication: every handler that takes a [`RequestContext`] needs a valid bearer
/// token; the public endpoints (metadata, checkpoint, key, tiles, SMART configuration,
/// health, OpenAPI) do not take one. A request without valid credentials is counted into
/// its address's aggregate refusal entry and answered 401 (429 past the address's limit)
/// before its handler runs.
impl FromRequest for RequestContext {
    type Error = AppError;
    type Future = LocalBoxFuture<'static, Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _payload: &mut Payload) -> Self::Future {
        let request_id = req
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone())
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        let receipt = req
            .extensions()
            .get::<ReceiptSlot>()
            .cloned()
            .unwrap_or_default();
        let mut ctx = RequestContext {
            receipt,
            principal: Principal::Anonymous,
            request_id,
            rule: Slot::default(),
            confined: Slot::default(),
            consents: Default::default(),
        };
        let Some(state) = req.app_data::<web::Data<AppState>>().cloned() else {
            return Box::pin(ready(Err(AppError::Internal(
                "application state missing".into(),
            ))));
        };
        match bearer_token(req).and_then(|token| state.tokens.verify(token)) {
            Ok(identity) => {
                ctx.principal = Principal::Token(identity);
                Box::pin(ready(Ok(ctx)))
            }
            Err(error) => {
                let source = req.peer_addr().map(|address| address.ip());
                let refusal = state.ledger.refuse_unauthenticated(&ctx, error, source);
                Box::pin(ready(Err(refusal)))
            }
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is
/// case-insensitive, RFC 6750 section 2.1).
fn bearer_token(req: &HttpRequest) -> Result<&str, AuthError> {
    let value = req
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?;
    let text = value.to_str().map_err(|_| AuthError::NotBearer)?;
    let (scheme, token) = text.split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::NotBearer);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(AuthError::Malformed);
    }
    Ok(token)
}

/// Default service: no route matched.
pub async fn no_route(req: HttpRequest) -> Result<actix_web::HttpResponse, AppError> {
    Err(AppError::NoRoute(format!(
        "{} {}",
        req.method(),
        req.path()
    )))
}

/// Query parameters of a request, checked against the ones an interaction understands.
#[derive(Debug, Default)]
pub struct QueryParams(Vec<(String, String)>);

impl QueryParams {
    /// Parses the query string; any parameter not in `allowed`, or given twice, is refused
    /// with 400 naming it (the server never silently ignores what it does not understand).
    pub fn parse(req: &HttpRequest, allowed: &[&str]) -> Result<Self, AppError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
            .map_err(|_| AppError::bad_request("the query string is malformed"))?;
        Self::checked(pairs, allowed)
    }

    /// [`Self::parse`] of parameters from elsewhere (an operation's `Parameters` body).
    pub fn checked(pairs: Vec<(String, String)>, allowed: &[&str]) -> Result<Self, AppError> {
        for (index, (name, _)) in pairs.iter().enumerate() {
            let shown: String = name.chars().take(64).collect();
            if !allowed.contains(&name.as_str()) {
                return Err(AppError::BadRequest {
                    message: format!(
                        "unknown or unsupported parameter '{shown}' for this interaction"
                    ),
                    expression: Some(shown),
                });
            }
            if pairs.iter().take(index).any(|(n, _)| n == name) {
                return Err(AppError::BadRequest {
                    message: format!("parameter '{shown}' is given more than once"),
                    expression: Some(shown),
                });
            }
        }
        Ok(Self(pairs))
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `Prefer: return=…` (http.html#return).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnPreference {
    Minimal,
    Representation,
    OperationOutcome,
}

pub fn return_preference(req: &HttpRequest) -> ReturnPreference {
    let mut preference = ReturnPreference::Representation;
    for value in req
        .headers()
        .get_all(header::HeaderName::from_static("prefer"))
    {
        let Ok(text) = value.to_str() else { continue };
        for token in text.split([',', ';']) {
            match token.trim().to_ascii_lowercase().as_str() {
                "return=minimal" => preference = ReturnPreference::Minimal,
                "return=representation" => preference = ReturnPreference::Representation,
                "return=operationoutcome" => preference = ReturnPreference::OperationOutcome,
                _ => {}
            }
        }
    }
    preference
}

/// Parses `If-Match: W/"3"` (or `"3"`) into a version id.
pub fn if_match(req: &HttpRequest) -> Result<Option<VersionId>, AppError> {
    let Some(value) = req.headers().get(header::IF_MATCH) else {
        return Ok(None);
    };
    let invalid = || AppError::BadRequest {
        message: "If-Match must be an ETag such as W/\"3\"".into(),
        expression: Some("If-Match".into()),
    };
    let text = value.to_str().map_err(|_| invalid())?.trim();
    let text = text.strip_prefix("W/").unwrap_or(text);
    let inner = text
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .ok_or_else(invalid)?;
    parse_version_id(inner).map(Some).map_err(|_| invalid())
}

/// A version id as the server writes them: a positive integer.
pub fn parse_version_id(text: &str) -> Result<VersionId, AppError> {
    VersionId::parse(text).ok_or_else(|| AppError::BadRequest {
        message: format!(
            "'{}' is not a version id of this server",
            text.chars().take(32).collect::<String>()
        ),
        expression: None,
    })
}

/// The page size of history when `_count` is not given, and its bound.
const DEFAULT_HISTORY_COUNT: i64 = 50;
const MAX_HISTORY_COUNT: i64 = 1000;

/// Reads the body up to `limit` bytes; larger bodies get 413 without being read further.
pub(crate) async fn read_body(
    req: &HttpRequest,
    payload: web::Payload,
    limit: usize,
) -> Result<Vec<u8>, AppError> {
    let body = read_optional_body(req, payload, limit).await?;
    if body.is_empty() {
        return Err(AppError::bad_request(
            "the request has no body; send a FHIR resource",
        ));
    }
    Ok(body)
}

/// [`read_body`] where no body is allowed (an operation invoked by POST without
/// parameters): empty when there is none.
pub(crate) async fn read_optional_body(
    req: &HttpRequest,
    mut payload: web::Payload,
    limit: usize,
) -> Result<Vec<u8>, AppError> {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(AppError::PayloadTooLarge { limit });
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| {
            AppError::bad_request(format!("the request body could not be read: {e}"))
        })?;
        if body.len() + chunk.len() > limit {
            return Err(AppError::PayloadTooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

pub(crate) fn parse_count(value: Option<&str>) -> Result<i64, AppError> {
    let Some(text) = value else {
        return Ok(DEFAULT_HISTORY_COUNT);
    };
    match text.parse::<i64>() {
        Ok(count) if (1..=MAX_HISTORY_COUNT).contains(&count) => Ok(count),
        _ => Err(AppError::BadRequest {
            message: format!("_count must be an integer from 1 to {MAX_HISTORY_COUNT}"),
            expression: Some("_count".into()),
        }),
    }
}

/// Parses a FHIR `instant` (RFC 3339 with a time zone) into µs since the epoch.
pub(crate) fn parse_instant(text: &str) -> Result<i64, AppError> {
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_micros())
        .map_err(|_| AppError::BadRequest {
            message: "_since must be an instant such as 2026-01-01T00:00:00Z".into(),
            expression: Some("_since".into()),
        })
}

/// The parameters of an operation's `Parameters` body as name and text value (a
/// `valueReference` as its reference); `_type` given several times is joined as a list.
pub(crate) fn operation_parameters(body: &[u8]) -> Result<Vec<(String, String)>, AppError> {
    let invalid = |message: &str| AppError::BadRequest {
        message: format!("the body must be a FHIR Parameters resource: {message}"),
        expression: Some("Parameters".into()),
    };
    let parameters: serde_json::Value =
        serde_json::from_slice(body).map_err(|_| invalid("it is not valid JSON"))?;
    if parameters["resourceType"] != "Parameters" {
        return Err(invalid("resourceType is not Parameters"));
    }
    let mut pairs: Vec<(String, String)> = Vec::new();
    let Some(list) = parameters.get("parameter") else {
        return Ok(pairs);
    };
    let list = list
        .as_array()
        .ok_or_else(|| invalid("parameter is not a list"))?;
    for (index, parameter) in list.iter().enumerate() {
        let name = parameter["name"]
            .as_str()
            .ok_or_else(|| invalid(&format!("parameter[{index}] has no name")))?;
        let value = [
            "valueString",
            "valueCode",
            "valueUri",
            "valueInstant",
            "valueDateTime",
        ]
        .iter()
        .find_map(|key| parameter[*key].as_str().map(str::to_owned))
        .or_else(|| parameter["valueInteger"].as_i64().map(|n| n.to_string()))
        .or_else(|| {
            parameter["valuePositiveInt"]
                .as_i64()
                .map(|n| n.to_string())
        })
        .or_else(|| {
            parameter["valueReference"]["reference"]
                .as_str()
                .map(str::to_owned)
        })
        .ok_or_else(|| {
            invalid(&format!(
                "parameter[{index}] ({name}) has no supported value[x]"
            ))
        })?;
        match pairs.iter_mut().find(|(n, _)| n == name) {
            Some((_, joined)) if name == "_type" => {
                joined.push(',');
                joined.push_str(&value);
            }
            _ => pairs.push((name.to_owned(), value)),
        }
    }
    Ok(pairs)
}
