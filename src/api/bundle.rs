//! `POST /fhir` with a transaction or batch Bundle (http.html#transaction), and the
//! conditional interactions (`If-None-Exist` create, `PUT`/`DELETE /fhir/{type}?query`),
//! which run through the same planning and resolution as Bundle entries.

use actix_web::http::StatusCode;
use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use serde::Serialize;
use serde_json::value::RawValue;

use super::AppState;
use super::negotiation::{require_json_body, response_format};
use super::request::read_body;
use super::request::{QueryParams, ReturnPreference, return_preference};
use super::response::{etag, resource_response, write_response};
use super::search::{handling, searchset_json};
use crate::access::RequestContext;
use crate::clock::now_micros;
use crate::error::AppError;
use crate::fhir::bundle_request::{EntryUrl, Method, parse_bundle};
use crate::fhir::document::format_instant;
use crate::fhir::outcome::OperationOutcome;
use crate::service::WriteOutcome;
use crate::service::bundles::{ConditionalHeaders, Outcome};

/// Process a transaction or batch Bundle.
#[utoipa::path(post, path = "/fhir", tag = "fhir",
    params(("Prefer" = Option<String>, Header, description = "return=minimal | return=representation; handling=lenient for searches in entries")),
    request_body(content = super::response::Resource, content_type = "application/fhir+json", description = "A Bundle of type transaction or batch"),
    responses(
        (status = 200, description = "transaction-response or batch-response Bundle", body = super::response::Resource),
        (status = 400, description = "Not a transaction/batch Bundle, or an entry is invalid (transaction: nothing was written)", body = OperationOutcome),
        (status = 404, description = "A transaction entry names an unknown resource (nothing was written)", body = OperationOutcome),
        (status = 412, description = "A transaction entry's condition or If-Match failed (nothing was written)", body = OperationOutcome),
        (status = 413, description = "Body over the size limit", body = OperationOutcome),
    ))]
pub async fn process(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let query = QueryParams::parse(&req, &["_format", "_pretty"])?;
    let format = response_format(&req, query.get("_format"))?;
    require_json_body(&req)?;
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    let bundle = parse_bundle(&body, &state.fhir_base())?;
    let kind = bundle.kind;
    let urls: Vec<(Method, EntryUrl)> = bundle
        .entries
        .iter()
        .map(|e| (e.method, e.url.clone()))
        .collect();
    let results = match state
        .resources
        .process_bundle(&ctx, bundle, handling(&req))
        .await
    {
        Ok(results) => results,
        Err(failed) => {
            // A transaction is all or nothing: the failing entry's error is the answer.
            let mut outcome = failed.error.outcome();
            for issue in &mut outcome.issue {
                issue.expression = vec![format!("Bundle.entry[{}]", failed.index)];
                if let Some(diagnostics) = &mut issue.diagnostics {
                    *diagnostics = format!(
                        "entry {} failed, nothing was written: {diagnostics}",
                        failed.index
                    );
                }
            }
            return Ok(failed.error.response_with(outcome, format.content_type()));
        }
    };
    let minimal = return_preference(&req) == ReturnPreference::Minimal;
    let entries = results
        .iter()
        .zip(&urls)
        .map(|(result, (_, url))| response_entry(&state, result, url, minimal))
        .collect::<Result<Vec<_>, AppError>>()?;
    let bundle = ResponseBundle {
        resource_type: "Bundle",
        id: uuid::Uuid::new_v4().to_string(),
        bundle_type: match kind {
            crate::fhir::bundle_request::BundleKind::Transaction => "transaction-response",
            crate::fhir::bundle_request::BundleKind::Batch => "batch-response",
        },
        timestamp: format_instant(now_micros()),
        entry: entries,
    };
    let body = serde_json::to_string(&bundle)
        .map_err(|e| AppError::Internal(format!("response bundle: {e}")))?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(body))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseBundle {
    resource_type: &'static str,
    id: String,
    #[serde(rename = "type")]
    bundle_type: &'static str,
    timestamp: String,
    entry: Vec<ResponseEntry>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResponseEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    full_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<Box<RawValue>>,
    response: EntryResponse,
}

#[derive(Serialize, Default)]
#[serde(rename_all = "camelCase")]
struct EntryResponse {
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    etag: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_modified: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<Box<RawValue>>,
}

fn raw(json: String) -> Result<Box<RawValue>, AppError> {
    RawValue::from_string(json).map_err(|e| AppError::Internal(format!("response bundle: {e}")))
}

fn status_text(status: StatusCode) -> String {
    format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or_default()
    )
}

fn response_entry(
    state: &AppState,
    result: &Result<Outcome, AppError>,
    url: &EntryUrl,
    minimal: bool,
) -> Result<ResponseEntry, AppError> {
    let base = state.fhir_base();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(error) => {
            return Ok(ResponseEntry {
                full_url: None,
                resource: None,
                response: EntryResponse {
                    status: status_text(actix_web::ResponseError::status_code(error)),
                    outcome: Some(raw(error.outcome().to_json())?),
                    ..EntryResponse::default()
                },
            });
        }
    };
    let with_resource = |resource: &crate::service::StoredResource, status: StatusCode| {
        Ok::<_, AppError>(ResponseEntry {
            full_url: Some(format!("{base}/{}/{}", resource.resource_type, resource.id)),
            resource: if minimal {
                None
            } else {
                Some(raw(resource.json.clone())?)
            },
            response: EntryResponse {
                status: status_text(status),
                location: Some(format!(
                    "{}/{}/_history/{}",
                    resource.resource_type, resource.id, resource.meta.version_id
                )),
                etag: Some(etag(resource.meta.version_id)),
                last_modified: Some(format_instant(resource.meta.last_updated)),
                outcome: None,
            },
        })
    };
    match outcome {
        Outcome::Written { resource, created } => with_resource(
            resource,
            if *created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
        ),
        Outcome::Existing(resource) | Outcome::Read(resource) => {
            with_resource(resource, StatusCode::OK)
        }
        Outcome::Deleted(deleted) => Ok(ResponseEntry {
            full_url: None,
            resource: None,
            response: EntryResponse {
                status: status_text(StatusCode::NO_CONTENT),
                etag: deleted.as_ref().map(|(_, _, meta)| etag(meta.version_id)),
                ..EntryResponse::default()
            },
        }),
        Outcome::NotModified(meta) => Ok(ResponseEntry {
            full_url: None,
            resource: None,
            response: EntryResponse {
                status: status_text(StatusCode::NOT_MODIFIED),
                etag: Some(etag(meta.version_id)),
                ..EntryResponse::default()
            },
        }),
        Outcome::Searched { page, request } => {
            let self_base = format!("{base}/{}", url.resource_type);
            Ok(ResponseEntry {
                full_url: None,
                resource: Some(raw(searchset_json(
                    state, request, page, &self_base, None,
                )?)?),
                response: EntryResponse {
                    status: status_text(StatusCode::OK),
                    ..EntryResponse::default()
                },
            })
        }
    }
}

/// `PUT /fhir/{type}?criteria`: update the one matching resource, or create one.
#[utoipa::path(put, path = "/fhir/{type}", tag = "fhir",
    params(("type" = String, Path, description = "Resource type; the query holds the search criteria")),
    request_body(content = super::response::Resource, content_type = "application/fhir+json"),
    responses(
        (status = 200, description = "The one match was updated", body = super::response::Resource),
        (status = 201, description = "Nothing matched: created", body = super::response::Resource),
        (status = 400, description = "No or malformed criteria, or invalid resource", body = OperationOutcome),
        (status = 412, description = "The criteria match more than one resource", body = OperationOutcome),
    ))]
pub async fn conditional_update(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    require_json_body(&req)?;
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    conditional(&state, &ctx, &req, &path, Method::Put, Some(&body)).await
}

/// `DELETE /fhir/{type}?criteria`: delete the one matching resource.
#[utoipa::path(delete, path = "/fhir/{type}", tag = "fhir",
    params(("type" = String, Path, description = "Resource type; the query holds the search criteria")),
    responses(
        (status = 204, description = "Deleted, or nothing matched"),
        (status = 400, description = "No or malformed criteria", body = OperationOutcome),
        (status = 412, description = "The criteria match more than one resource", body = OperationOutcome),
    ))]
pub async fn conditional_delete(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    conditional(&state, &ctx, &req, &path, Method::Delete, None).await
}

/// `POST /fhir/{type}` with `If-None-Exist`: create unless the criteria match.
pub(super) async fn conditional_create(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    type_name: &str,
    body: &[u8],
) -> Result<HttpResponse, AppError> {
    conditional(state, ctx, req, type_name, Method::Post, Some(body)).await
}

async fn conditional(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    type_name: &str,
    method: Method,
    body: Option<&[u8]>,
) -> Result<HttpResponse, AppError> {
    let mut query: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|_| AppError::bad_request("the query string is malformed"))?;
    let format_param = query
        .iter()
        .find(|(name, _)| name == "_format")
        .map(|(_, v)| v.clone());
    query.retain(|(name, _)| !matches!(name.as_str(), "_format" | "_pretty"));
    let format = response_format(req, format_param.as_deref())?;
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let if_match = header(header::IF_MATCH);
    let if_none_exist = header(header::HeaderName::from_static("if-none-exist"));
    let url = EntryUrl {
        resource_type: type_name.to_owned(),
        id: None,
        version: None,
        query,
    };
    let operation = state.resources.plan(
        method,
        &url,
        body,
        ConditionalHeaders {
            if_match: if_match.as_deref(),
            if_none_exist: if_none_exist.as_deref(),
            if_none_match: None,
            patch_format: crate::fhir::patch::PatchFormat::JsonPatch,
        },
        crate::fhir::search_query::Handling::Strict,
    )?;
    match state.resources.execute(ctx, operation).await? {
        Outcome::Written { resource, created } => Ok(write_response(
            state,
            req,
            format,
            &WriteOutcome { resource, created },
        )),
        Outcome::Existing(resource) => Ok(resource_response(HttpResponse::Ok(), format, &resource)
            .body(match return_preference(req) {
                ReturnPreference::Minimal => String::new(),
                ReturnPreference::OperationOutcome => OperationOutcome::information(format!(
                    "{}/{} already matches If-None-Exist; nothing was created",
                    resource.resource_type, resource.id
                ))
                .to_json(),
                ReturnPreference::Representation => resource.json.clone(),
            })),
        Outcome::Deleted(deleted) => {
            let mut response = HttpResponse::NoContent();
            if let Some((_, _, meta)) = deleted {
                response.insert_header((header::ETAG, etag(meta.version_id)));
            }
            Ok(response.finish())
        }
        Outcome::Read(_) | Outcome::NotModified(_) | Outcome::Searched { .. } => Err(
            AppError::Internal("a conditional write produced a read".into()),
        ),
    }
}
