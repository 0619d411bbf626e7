//! Search over HTTP (search.html): `GET /fhir/{type}?…`, `POST /fhir/{type}/_search` and
//! `GET /fhir?_type=…`, answered with `searchset` Bundles whose links page by cursor.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::negotiation::response_format;
use crate::access::RequestContext;
use crate::clock::now_micros;
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::search_query::{Handling, SearchRequest, parse_search};
use crate::fhir::searchset::{self, SearchEntry, SearchMode};
use crate::service::search::SearchPage;

/// Search one type.
#[utoipa::path(get, path = "/fhir/{type}", tag = "fhir",
    params(
        ("type" = String, Path, description = "Resource type, e.g. Observation"),
        ("Prefer" = Option<String>, Header, description = "handling=strict (default) or handling=lenient"),
    ),
    responses(
        (status = 200, description = "searchset Bundle", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown or unsupported parameter, or malformed value", body = OperationOutcome),
        (status = 404, description = "Unknown resource type", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn search_type(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    let resource_type = state.resources.resolve_type(&path)?;
    let params = query_pairs(req.query_string())?;
    search_one_type(&state, &ctx, &req, &resource_type, params).await
}

/// Search a patient's compartment (search.html#compartments): `Patient/{id}/{type}` is the
/// search of `type` among the resources in that patient's compartment (by the compartment
/// rule access control and the ledger use), `Patient/{id}/*` of every type in it.
#[utoipa::path(get, path = "/fhir/{compartment}/{id}/{type}", tag = "fhir",
    params(
        ("compartment" = String, Path, description = "Patient (the only compartment searched here)"),
        ("id" = String, Path, description = "Logical id of the patient"),
        ("type" = String, Path, description = "Resource type in the compartment, or `*` for every one"),
    ),
    responses(
        (status = 200, description = "searchset Bundle", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Not the Patient compartment, a type outside it, or a malformed parameter", body = OperationOutcome),
        (status = 404, description = "Unknown resource type", body = OperationOutcome),
    ))]
pub async fn search_compartment(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String, String)>,
) -> Result<HttpResponse, AppError> {
    let (compartment, id, type_name) = path.into_inner();
    let compartment = state.resources.resolve_type(&compartment)?;
    if compartment.as_str() != "Patient" {
        return Err(AppError::BadRequest {
            message: format!(
                "only the Patient compartment can be searched here, not {compartment}'s"
            ),
            expression: None,
        });
    }
    let id = ResourceId::parse(&id)?;
    let index = state.resources.search_index();
    let types: Vec<String> = if type_name == "*" {
        // Every type of the compartment but Patient itself, which is read by id.
        index
            .compartment_rule()
            .types()
            .map(|(resource_type, _)| resource_type.to_owned())
            .filter(|t| {
                t != "Patient" && !crate::fhir::compartment::OPAQUE_TYPES.contains(&t.as_str())
            })
            .collect()
    } else {
        let resource_type = state.resources.resolve_type(&type_name)?;
        if !index.has_compartments(resource_type.as_str()) {
            return Err(AppError::BadRequest {
                message: format!("{resource_type} is not in the Patient compartment"),
                expression: None,
            });
        }
        vec![resource_type.to_string()]
    };
    let params = query_pairs(req.query_string())?;
    let self_base = format!("{}/Patient/{id}/{type_name}", state.fhir_base());
    let scope = Scope {
        self_base,
        type_link: None,
        in_compartment: Some(id.to_string()),
    };
    run(&state, &ctx, &req, types, params, scope).await
}

/// Search one type with the parameters in a form body.
#[utoipa::path(post, path = "/fhir/{type}/_search", tag = "fhir",
    params(("type" = String, Path, description = "Resource type")),
    request_body(content = String, content_type = "application/x-www-form-urlencoded", description = "Search parameters"),
    responses(
        (status = 200, description = "searchset Bundle", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown or unsupported parameter, or malformed value", body = OperationOutcome),
        (status = 415, description = "Body is not a form", body = OperationOutcome),
    ))]
pub async fn search_type_post(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, AppError> {
    let resource_type = state.resources.resolve_type(&path)?;
    let mut params = query_pairs(req.query_string())?;
    if !body.is_empty() {
        let media = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| v.trim().to_ascii_lowercase());
        if media.as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(AppError::UnsupportedMediaType(
                "POST _search takes its parameters as application/x-www-form-urlencoded".into(),
            ));
        }
        let text = std::str::from_utf8(&body)
            .map_err(|_| AppError::bad_request("the form body is not UTF-8"))?;
        params.extend(query_pairs(text)?);
    }
    search_one_type(&state, &ctx, &req, &resource_type, params).await
}

/// Search across types: `_type` names them; without it only `_id` and `_lastUpdated` apply.
#[utoipa::path(get, path = "/fhir", tag = "fhir",
    params(("_type" = Option<String>, Query, description = "Comma-separated resource types")),
    responses(
        (status = 200, description = "searchset Bundle", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Unknown or unsupported parameter, or malformed value", body = OperationOutcome),
    ))]
pub async fn search_system(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    let mut params = query_pairs(req.query_string())?;
    let mut types = Vec::new();
    let mut type_param = None;
    params.retain(|(name, value)| {
        if name == "_type" {
            type_param = Some(value.clone());
            false
        } else {
            true
        }
    });
    if let Some(list) = &type_param {
        for name in list.split(',').map(str::trim) {
            let resource_type =
                state
                    .resources
                    .resolve_type(name)
                    .map_err(|_| AppError::BadRequest {
                        message: format!(
                            "_type names '{}', which is not a supported resource type",
                            name.chars().take(64).collect::<String>()
                        ),
                        expression: Some("_type".into()),
                    })?;
            types.push(resource_type.to_string());
        }
    }
    let scope = Scope {
        self_base: state.fhir_base(),
        type_link: type_param.map(|list| ("_type".to_owned(), list)),
        in_compartment: None,
    };
    run(&state, &ctx, &req, types, params, scope).await
}

/// Parses a query string or form body into name/value pairs (repeats allowed: repeated
/// parameters are ANDed).
fn query_pairs(text: &str) -> Result<Vec<(String, String)>, AppError> {
    serde_urlencoded::from_str(text)
        .map_err(|_| AppError::bad_request("the query string is malformed"))
}

/// `Prefer: handling=lenient` (search.html#errors).
pub(super) fn handling(req: &HttpRequest) -> Handling {
    let lenient = req
        .headers()
        .get_all(header::HeaderName::from_static("prefer"))
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .any(|token| token.trim().eq_ignore_ascii_case("handling=lenient"));
    if lenient {
        Handling::Lenient
    } else {
        Handling::Strict
    }
}

/// A type-level search, whose links point at `{base}/{type}`.
async fn search_one_type(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    resource_type: &crate::fhir::ResourceType,
    params: Vec<(String, String)>,
) -> Result<HttpResponse, AppError> {
    // AuditEvents are generated from the ledger, not stored: their own view answers.
    if resource_type.as_str() == "AuditEvent" {
        return super::audit_events::search(state, ctx, req, params).await;
    }
    let scope = Scope {
        self_base: format!("{}/{resource_type}", state.fhir_base()),
        type_link: None,
        in_compartment: None,
    };
    let types = vec![resource_type.to_string()];
    run(state, ctx, req, types, params, scope).await
}

/// Where a search runs, as its path says.
struct Scope {
    /// The URL its links start with.
    self_base: String,
    /// The `_type` parameter of a system-level search, kept in the Bundle's links.
    type_link: Option<(String, String)>,
    /// The patient compartment a compartment search names.
    in_compartment: Option<String>,
}

/// Parses, runs and renders one search.
async fn run(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    resource_types: Vec<String>,
    params: Vec<(String, String)>,
    scope: Scope,
) -> Result<HttpResponse, AppError> {
    let format_param = params
        .iter()
        .rev()
        .find(|(name, _)| name == "_format")
        .map(|(_, v)| v.clone());
    let format = response_format(req, format_param.as_deref())?;
    let index = state.resources.search_index();
    let mut request = parse_search(
        index.registry(),
        index,
        resource_types,
        &params,
        handling(req),
    )?;
    request.in_compartment = scope.in_compartment;
    let page = state.resources.search(ctx, request.clone()).await?;
    let body = searchset_json(state, &request, &page, &scope.self_base, scope.type_link)?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(body))
}

/// Renders one page of results as a searchset Bundle with its `self`/`next`/`previous`
/// links (also used for search entries of batch and transaction Bundles).
pub(super) fn searchset_json(
    state: &AppState,
    request: &SearchRequest,
    page: &SearchPage,
    self_base: &str,
    type_filter: Option<(String, String)>,
) -> Result<String, AppError> {
    let base = state.fhir_base();
    let link_params: Vec<(String, String)> = type_filter
        .into_iter()
        .chain(request.link_params.iter().cloned())
        .collect();
    let url = |cursor: Option<&str>| {
        let mut params = link_params.clone();
        if let Some(cursor) = cursor {
            params.push(("_cursor".into(), cursor.to_owned()));
        }
        let query = serde_urlencoded::to_string(&params).unwrap_or_default();
        if query.is_empty() {
            self_base.to_owned()
        } else {
            format!("{self_base}?{query}")
        }
    };
    let mut links = vec![("self", url(request.cursor.as_deref()))];
    if let Some(next) = &page.next {
        links.push(("next", url(Some(next))));
    }
    if let Some(previous) = &page.previous {
        links.push(("previous", url(Some(previous))));
    }
    let mut entries = Vec::new();
    for (mode, resources) in [
        (SearchMode::Match, &page.matches),
        (SearchMode::Include, &page.included),
    ] {
        for resource in resources {
            entries.push(SearchEntry {
                full_url: format!("{base}/{}/{}", resource.resource_type, resource.id),
                resource: searchset::subset(&resource.json, &request.elements)?,
                mode,
            });
        }
    }
    if !request.ignored.is_empty() {
        let names: Vec<&str> = request.ignored.iter().map(String::as_str).collect();
        let outcome = OperationOutcome::warning(format!(
            "ignored unsupported parameters (Prefer: handling=lenient): {}",
            names.join(", ")
        ));
        entries.push(SearchEntry {
            full_url: format!("urn:uuid:{}", uuid::Uuid::new_v4()),
            resource: searchset::raw(outcome.to_json())?,
            mode: SearchMode::Outcome,
        });
    }
    Ok(searchset::bundle_json(
        &crate::fhir::document::format_instant(now_micros()),
        page.total,
        &links,
        entries,
    )?)
}
