//! Handlers of the FHIR REST interactions on one resource, its history and the server's
//! capabilities (https://hl7.org/fhir/R4/http.html); the route table is `routes.rs`.

use std::time::UNIX_EPOCH;

use actix_web::http::header::{self, HttpDate};
use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::negotiation::{ResponseFormat, patch_format, require_json_body, response_format};
use super::request::{
    QueryParams, ReturnPreference, if_match, parse_version_id, return_preference,
};
use super::request::{parse_count, parse_instant, read_body};
use super::response::{etag, resource_response, write_response};
use crate::access::RequestContext;
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::fhir::bundle::{self, Bundle, Entry, EntryRequest, EntryResponse, Link};
use crate::fhir::document::{VersionId, format_instant};
use crate::fhir::outcome::OperationOutcome;
use crate::service::{DeleteOutcome, HistoryQuery, HistoryScanQuery, ScannedEntry, StoredResource};

/// Parameters every interaction accepts: `_format` picks the format; `_pretty` is a
/// presentation hint this server does not act on.
const COMMON_PARAMS: &[&str] = &["_format", "_pretty"];
const HISTORY_PARAMS: &[&str] = &["_format", "_pretty", "_count", "_since", "_cursor"];

/// What every instance-level interaction (`/fhir/{type}/{id}…`) checks first, in the
/// order that decides which error wins: type (404), id (400), parameters (400), format (406).
struct Instance {
    resource_type: crate::fhir::ResourceType,
    id: ResourceId,
    query: QueryParams,
    format: ResponseFormat,
}

fn instance(
    state: &AppState,
    req: &HttpRequest,
    type_name: &str,
    id: &str,
    allowed: &[&str],
) -> Result<Instance, AppError> {
    let resource_type = state.resources.resolve_type(type_name)?;
    let id = ResourceId::parse(id)?;
    let query = QueryParams::parse(req, allowed)?;
    let format = response_format(req, query.get("_format"))?;
    Ok(Instance {
        resource_type,
        id,
        query,
        format,
    })
}

/// The server's CapabilityStatement.
#[utoipa::path(get, path = "/fhir/metadata", tag = "fhir",
    params(("_format" = Option<String>, Query, description = "json or application/fhir+json")),
    responses(
        (status = 200, description = "CapabilityStatement", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 406, description = "Unsupported format", body = OperationOutcome),
    ))]
pub async fn metadata(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    let query = QueryParams::parse(&req, &["_format", "_pretty", "mode"])?;
    let format = response_format(&req, query.get("_format"))?;
    if let Some(mode) = query.get("mode").filter(|m| *m != "full") {
        return Err(AppError::BadRequest {
            message: format!(
                "mode '{}' is not supported; only mode=full",
                mode.chars().take(32).collect::<String>()
            ),
            expression: Some("mode".into()),
        });
    }
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(state.capability_statement.to_string()))
}

/// Create a resource with a server-assigned id.
#[utoipa::path(post, path = "/fhir/{type}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type, e.g. Patient"),
        ("Prefer" = Option<String>, Header, description = "return=minimal | return=representation | return=OperationOutcome"),
    ),
    request_body(content = super::response::Resource, content_type = "application/fhir+json"),
    responses(
        (status = 201, description = "Created; Location, ETag and Last-Modified are set", body = super::response::Resource),
        (status = 400, description = "Malformed or invalid resource", body = OperationOutcome),
        (status = 404, description = "Unknown or unsupported resource type", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 413, description = "Body over the size limit", body = OperationOutcome),
        (status = 415, description = "Body is not FHIR JSON", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn create(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let resource_type = state.resources.resolve_type(&path)?;
    let query = QueryParams::parse(&req, COMMON_PARAMS)?;
    let format = response_format(&req, query.get("_format"))?;
    require_json_body(&req)?;
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    if req.headers().contains_key("if-none-exist") {
        return super::bundle::conditional_create(
            &state,
            &ctx,
            &req,
            resource_type.as_str(),
            &body,
        )
        .await;
    }
    let outcome = state.resources.create(&ctx, resource_type, body).await?;
    Ok(write_response(&state, &req, format, &outcome))
}

/// Update a resource, or create it with the id in the URL.
#[utoipa::path(put, path = "/fhir/{type}/{id}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("id" = String, Path, description = "Logical id"),
        ("If-Match" = Option<String>, Header, description = "Version the update applies to, e.g. W/\"2\""),
        ("Prefer" = Option<String>, Header, description = "return=minimal | return=representation | return=OperationOutcome"),
    ),
    request_body(content = super::response::Resource, content_type = "application/fhir+json"),
    responses(
        (status = 200, description = "Updated", body = super::response::Resource),
        (status = 201, description = "Created with the client's id", body = super::response::Resource),
        (status = 400, description = "Malformed or invalid resource, or id mismatch", body = OperationOutcome),
        (status = 404, description = "Unknown or unsupported resource type", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 409, description = "Too much concurrent change to apply the update", body = OperationOutcome),
        (status = 412, description = "If-Match does not name the current version", body = OperationOutcome),
        (status = 413, description = "Body over the size limit", body = OperationOutcome),
        (status = 415, description = "Body is not FHIR JSON", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn update(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let (type_name, id) = path.into_inner();
    let Instance {
        resource_type,
        id,
        format,
        ..
    } = instance(&state, &req, &type_name, &id, COMMON_PARAMS)?;
    let expected_version = if_match(&req)?;
    require_json_body(&req)?;
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    let outcome = state
        .resources
        .update(&ctx, resource_type, id, body, expected_version)
        .await?;
    Ok(write_response(&state, &req, format, &outcome))
}

/// Patch a resource with a JSON Patch document (RFC 6902) or a FHIRPath Patch (http.html#patch).
#[utoipa::path(patch, path = "/fhir/{type}/{id}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("id" = String, Path, description = "Logical id"),
        ("If-Match" = Option<String>, Header, description = "Version the patch applies to, e.g. W/\"2\""),
        ("Prefer" = Option<String>, Header, description = "return=minimal | return=representation | return=OperationOutcome"),
    ),
    request_body(content(
        (Vec<Object> = "application/json-patch+json"),
        (Object = "application/fhir+json"),
    ), description = "JSON Patch operations (RFC 6902), or a FHIRPath Patch Parameters resource (fhirpatch.html), applied to the current version; at most 1,000 (JSON Patch) or 100 (FHIRPath Patch) operations"),
    responses(
        (status = 200, description = "Patched: the new version", body = super::response::Resource),
        (status = 400, description = "Malformed patch document, id or If-Match", body = OperationOutcome),
        (status = 403, description = "The token may not update this resource", body = OperationOutcome),
        (status = 404, description = "Unknown type or resource", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 409, description = "Too much concurrent change to apply the patch", body = OperationOutcome),
        (status = 410, description = "The resource was deleted", body = OperationOutcome),
        (status = 412, description = "If-Match does not name the current version", body = OperationOutcome),
        (status = 413, description = "Body over the size limit, too many operations, or a result larger or deeper than allowed", body = OperationOutcome),
        (status = 415, description = "Body is neither application/json-patch+json nor a FHIRPath Patch as application/fhir+json", body = OperationOutcome),
        (status = 422, description = "The patch could not be applied (failed test, missing path) or its result is not a valid resource with the same type and id", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn patch(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let (type_name, id) = path.into_inner();
    let Instance {
        resource_type,
        id,
        format,
        ..
    } = instance(&state, &req, &type_name, &id, COMMON_PARAMS)?;
    let expected_version = if_match(&req)?;
    let format_of_patch = patch_format(&req)?;
    let body = read_body(&req, payload, state.max_body_bytes).await?;
    let outcome = state
        .resources
        .patch(
            &ctx,
            resource_type,
            id,
            format_of_patch,
            body,
            expected_version,
        )
        .await?;
    Ok(write_response(&state, &req, format, &outcome))
}

/// Read the current version of a resource.
#[utoipa::path(get, path = "/fhir/{type}/{id}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("id" = String, Path, description = "Logical id"),
        ("_format" = Option<String>, Query, description = "json or application/fhir+json"),
        ("_elements" = Option<String>, Query, description = "Comma-separated top-level elements to return (the rest left out, meta.tag SUBSETTED)"),
        ("_summary" = Option<String>, Query, description = "text, data or false"),
        ("If-None-Match" = Option<String>, Header, description = "ETag of the version the client holds: 304 when it is current"),
        ("If-Modified-Since" = Option<String>, Header, description = "HTTP date: 304 when the resource has not changed since"),
    ),
    responses(
        (status = 200, description = "The resource; ETag and Last-Modified are set", body = super::response::Resource),
        (status = 304, description = "Not modified since the version or date the client holds"),
        (status = 400, description = "Malformed id or parameter", body = OperationOutcome),
        (status = 404, description = "Unknown type or resource", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 410, description = "The resource was deleted", body = OperationOutcome),
        (status = 500, description = "Stored data failed its integrity check", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn read(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let (type_name, id) = path.into_inner();
    let Instance {
        resource_type,
        id,
        format,
        query,
    } = instance(&state, &req, &type_name, &id, READ_PARAMS)?;
    let shape = ReadShape::of(&query)?;
    let resource = state.resources.read(&ctx, resource_type, id).await?;
    if not_modified(&req, &resource) {
        return Ok(resource_response(HttpResponse::NotModified(), format, &resource).finish());
    }
    shaped_response(format, &resource, &shape)
}

/// Parameters of a read or vread: the format, and `_elements` or `_summary`.
const READ_PARAMS: &[&str] = &["_format", "_pretty", "_elements", "_summary"];

/// What of a resource a read returns (search.html#elements, #summary, which apply to reads
/// too).
enum ReadShape {
    Whole,
    Elements(Vec<String>),
    /// `_summary=text` (`true`) or `_summary=data` (`false`).
    Summary {
        text_only: bool,
    },
}

impl ReadShape {
    fn of(query: &QueryParams) -> Result<Self, AppError> {
        let refused = |name: &str, message: String| AppError::BadRequest {
            message,
            expression: Some(name.to_owned()),
        };
        match (query.get("_elements"), query.get("_summary")) {
            (Some(_), Some(_)) => Err(refused(
                "_summary",
                "_elements and _summary cannot be combined".into(),
            )),
            (Some(list), None) => Ok(Self::Elements(
                list.split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect(),
            )),
            (None, Some("false") | None) => Ok(Self::Whole),
            (None, Some("text")) => Ok(Self::Summary { text_only: true }),
            (None, Some("data")) => Ok(Self::Summary { text_only: false }),
            (None, Some(other)) => Err(refused(
                "_summary",
                format!(
                    "_summary={} is not supported on a read; use text, data or false, or _elements",
                    other.chars().take(32).collect::<String>()
                ),
            )),
        }
    }
}

/// The 200 of a read or vread, shaped as asked.
fn shaped_response(
    format: ResponseFormat,
    resource: &StoredResource,
    shape: &ReadShape,
) -> Result<HttpResponse, AppError> {
    let body = match shape {
        ReadShape::Whole => {
            return Ok(
                resource_response(HttpResponse::Ok(), format, resource).body(resource.json.clone())
            );
        }
        ReadShape::Elements(elements) => crate::fhir::searchset::subset(&resource.json, elements)?,
        ReadShape::Summary { text_only } => {
            crate::fhir::searchset::summary(&resource.json, *text_only)?
        }
    };
    Ok(resource_response(HttpResponse::Ok(), format, resource).body(body.get().to_owned()))
}

/// A conditional read (http.html#cread): `If-None-Match` naming the version read, or else
/// `If-Modified-Since` not before its last change, answers 304 without the body.
fn not_modified(req: &HttpRequest, resource: &StoredResource) -> bool {
    if let Some(tags) = req.headers().get(header::IF_NONE_MATCH) {
        let current = resource.meta.version_id.to_string();
        return tags.to_str().is_ok_and(|tags| {
            tags.split(',').map(str::trim).any(|tag| {
                tag == "*"
                    || tag
                        .trim_start_matches("W/")
                        .trim_matches('"')
                        .eq(current.as_str())
            })
        });
    }
    let Some(since) = req
        .headers()
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<HttpDate>().ok())
    else {
        return false;
    };
    // HTTP dates have whole seconds: the change counts from the second it happened in.
    let changed = u64::try_from(resource.meta.last_updated).unwrap_or(0) / 1_000_000;
    let since = std::time::SystemTime::from(since)
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    changed <= since
}

/// Read one version of a resource.
#[utoipa::path(get, path = "/fhir/{type}/{id}/_history/{vid}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("id" = String, Path, description = "Logical id"),
        ("vid" = String, Path, description = "Version id"),
        ("_format" = Option<String>, Query, description = "json or application/fhir+json"),
    ),
    responses(
        (status = 200, description = "That version", body = super::response::Resource),
        (status = 400, description = "Malformed id, version or parameter", body = OperationOutcome),
        (status = 404, description = "Unknown type, resource or version", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 410, description = "That version is a deletion", body = OperationOutcome),
        (status = 500, description = "Stored data failed its integrity check", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn vread(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, AppError> {
    let (type_name, id, vid) = path.into_inner();
    let Instance {
        resource_type,
        id,
        format,
        query,
    } = instance(&state, &req, &type_name, &id, READ_PARAMS)?;
    let shape = ReadShape::of(&query)?;
    let version_id = parse_version_id(&vid)?;
    let resource = state
        .resources
        .vread(&ctx, resource_type, id, version_id)
        .await?;
    shaped_response(format, &resource, &shape)
}

/// Delete a resource (its history remains).
#[utoipa::path(delete, path = "/fhir/{type}/{id}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("id" = String, Path, description = "Logical id"),
        ("If-Match" = Option<String>, Header, description = "Version the deletion applies to"),
    ),
    responses(
        (status = 204, description = "Deleted, or already deleted"),
        (status = 400, description = "Malformed id or If-Match", body = OperationOutcome),
        (status = 404, description = "Unknown type or resource", body = OperationOutcome),
        (status = 412, description = "If-Match does not name the current version", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn delete(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let (type_name, id) = path.into_inner();
    let Instance {
        resource_type,
        id,
        format,
        ..
    } = instance(&state, &req, &type_name, &id, COMMON_PARAMS)?;
    let expected_version = if_match(&req)?;
    let meta = match state
        .resources
        .delete(&ctx, resource_type.clone(), id.clone(), expected_version)
        .await?
    {
        DeleteOutcome::Deleted(meta) | DeleteOutcome::AlreadyDeleted(meta) => meta,
    };
    let mut response = HttpResponse::NoContent();
    response.insert_header((header::ETAG, etag(meta.version_id)));
    if return_preference(&req) == ReturnPreference::OperationOutcome {
        let outcome = OperationOutcome::information(format!("{resource_type}/{id} is deleted"));
        return Ok(HttpResponse::Ok()
            .insert_header((header::ETAG, etag(meta.version_id)))
            .insert_header((header::CONTENT_TYPE, format.content_type()))
            .body(outcome.to_json()));
    }
    Ok(response.finish())
}

/// The versions of one resource, newest first, as a `history` Bundle.
#[utoipa::path(get, path = "/fhir/{type}/{id}/_history", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("id" = String, Path, description = "Logical id"),
        ("_count" = Option<i64>, Query, description = "Page size (1 to 1000, default 50)"),
        ("_since" = Option<String>, Query, description = "Only versions updated at or after this instant"),
        ("_cursor" = Option<String>, Query, description = "Paging cursor from a `next` link"),
    ),
    responses(
        (status = 200, description = "history Bundle", body = super::response::Resource),
        (status = 400, description = "Malformed parameter", body = OperationOutcome),
        (status = 404, description = "Unknown type or resource", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn history(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let (type_name, id) = path.into_inner();
    let Instance {
        resource_type,
        id,
        query,
        format,
    } = instance(&state, &req, &type_name, &id, HISTORY_PARAMS)?;
    let history_query = HistoryQuery {
        count: parse_count(query.get("_count"))?,
        since: query.get("_since").map(parse_instant).transpose()?,
        cursor: query.get("_cursor").map(str::to_owned),
    };
    let page = state
        .resources
        .history(
            &ctx,
            resource_type.clone(),
            id.clone(),
            history_query.clone(),
        )
        .await?;

    let links = HistoryLinks {
        self_url: format!("{}/{resource_type}/{id}/_history", state.fhir_base()),
        paging: history_paging(history_query.count, query.get("_since")),
        cursor: history_query.cursor.clone().map(|text| ("_cursor", text)),
        next: page.next.clone().map(|text| ("_cursor", text)),
    };
    let entries = page.entries.into_iter().map(|entry| ScannedEntry {
        resource_type: resource_type.clone(),
        id: id.clone(),
        entry,
    });
    let body = history_bundle(&state, links, Some(page.total), entries)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(body))
}

/// The versions of every resource of one type, newest first, as a `history` Bundle.
#[utoipa::path(get, path = "/fhir/{type}/_history", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type"),
        ("_count" = Option<i64>, Query, description = "Page size (1 to 1000, default 50)"),
        ("_since" = Option<String>, Query, description = "Only versions updated at or after this instant"),
        ("_cursor" = Option<String>, Query, description = "Paging cursor from a `next` link"),
    ),
    responses(
        (status = 200, description = "history Bundle (without `total`)", body = super::response::Resource),
        (status = 400, description = "Malformed or unknown parameter", body = OperationOutcome),
        (status = 404, description = "Unknown or unsupported resource type", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn type_history(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    let resource_type = state.resources.resolve_type(&path)?;
    scan_history(&state, &ctx, &req, Some(resource_type)).await
}

/// The versions of every resource on the server, newest first, as a `history` Bundle.
#[utoipa::path(get, path = "/fhir/_history", tag = "fhir",
    params(
        ("_count" = Option<i64>, Query, description = "Page size (1 to 1000, default 50)"),
        ("_since" = Option<String>, Query, description = "Only versions updated at or after this instant"),
        ("_cursor" = Option<String>, Query, description = "Paging cursor from a `next` link"),
    ),
    responses(
        (status = 200, description = "history Bundle (without `total`)", body = super::response::Resource),
        (status = 400, description = "Malformed or unknown parameter", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn system_history(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    scan_history(&state, &ctx, &req, None).await
}

/// Type- and system-level history (http.html#history). `total` is left out: counting every
/// version of a type on each page would cost a scan per page.
async fn scan_history(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    resource_type: Option<crate::fhir::ResourceType>,
) -> Result<HttpResponse, AppError> {
    let query = QueryParams::parse(req, HISTORY_PARAMS)?;
    let format = response_format(req, query.get("_format"))?;
    let scan = HistoryScanQuery {
        resource_type: resource_type.clone(),
        count: parse_count(query.get("_count"))?,
        since: query.get("_since").map(parse_instant).transpose()?,
        cursor: query.get("_cursor").map(str::to_owned),
    };
    let page = state.resources.history_scan(ctx, scan.clone()).await?;
    let self_url = match &resource_type {
        Some(resource_type) => format!("{}/{resource_type}/_history", state.fhir_base()),
        None => format!("{}/_history", state.fhir_base()),
    };
    let links = HistoryLinks {
        self_url,
        paging: history_paging(scan.count, query.get("_since")),
        cursor: scan.cursor.clone().map(|text| ("_cursor", text)),
        next: page.next.clone().map(|text| ("_cursor", text)),
    };
    let body = history_bundle(state, links, None, page.entries)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(body))
}

/// The links of one history page: every link repeats `paging` (`_count`, `_since`); `self`
/// adds the cursor the page was asked with, `next` the cursor of the following page, and a
/// page after the first links back to the `first`.
struct HistoryLinks {
    self_url: String,
    paging: Vec<(&'static str, String)>,
    cursor: Option<(&'static str, String)>,
    next: Option<(&'static str, String)>,
}

fn history_paging(count: i64, since: Option<&str>) -> Vec<(&'static str, String)> {
    let mut paging = vec![("_count", count.to_string())];
    if let Some(since) = since {
        paging.push(("_since", since.to_owned()));
    }
    paging
}

/// Builds a `history` Bundle (instance, type or system level) from versions newest first.
fn history_bundle(
    state: &AppState,
    links: HistoryLinks,
    total: Option<i64>,
    entries: impl IntoIterator<Item = ScannedEntry>,
) -> Result<String, AppError> {
    let base = state.fhir_base();
    let with_params = |extra: Option<(&'static str, String)>| {
        let mut params = links.paging.clone();
        params.extend(extra);
        format!(
            "{}?{}",
            links.self_url,
            serde_urlencoded::to_string(&params).unwrap_or_default()
        )
    };
    let mut link = vec![Link {
        relation: "self",
        url: with_params(links.cursor.clone()),
    }];
    if links.cursor.is_some() {
        link.push(Link {
            relation: "first",
            url: with_params(None),
        });
    }
    if let Some(next) = links.next.clone() {
        link.push(Link {
            relation: "next",
            url: with_params(Some(next)),
        });
    }

    let entries = entries
        .into_iter()
        .map(
            |ScannedEntry {
                 resource_type,
                 id,
                 entry,
             }| {
                let resource = entry.json.map(bundle::raw_resource).transpose()?;
                let (status, url) = match entry.method.as_str() {
                    "POST" => ("201 Created", resource_type.to_string()),
                    "DELETE" => ("204 No Content", format!("{resource_type}/{id}")),
                    _ if entry.meta.version_id == VersionId::FIRST => {
                        ("201 Created", format!("{resource_type}/{id}"))
                    }
                    // PUT and PATCH that wrote a later version.
                    _ => ("200 OK", format!("{resource_type}/{id}")),
                };
                Ok(Entry {
                    full_url: format!("{base}/{resource_type}/{id}"),
                    resource,
                    request: EntryRequest {
                        method: entry.method,
                        url,
                    },
                    response: EntryResponse {
                        status: status.to_owned(),
                        etag: etag(entry.meta.version_id),
                        last_modified: format_instant(entry.meta.last_updated),
                    },
                })
            },
        )
        .collect::<Result<Vec<_>, serde_json::Error>>()
        .map_err(|e| AppError::Internal(format!("history bundle: {e}")))?;
    let now = format_instant(crate::clock::now_micros());
    Bundle::history(now, total, link, entries)
        .to_json()
        .map_err(|e| AppError::Internal(format!("history bundle: {e}")))
}
