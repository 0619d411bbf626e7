//! `GET` and `POST /fhir/Patient/{id}/$everything` (patient-operation-everything.html): the
//! patient's whole record as a `searchset` Bundle whose `next` links page by cursor.

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};

use super::AppState;
use super::negotiation::{require_json_body, response_format};
use super::request::QueryParams;
use super::request::{operation_parameters, parse_count, parse_instant, read_optional_body};
use crate::access::RequestContext;
use crate::clock::now_micros;
use crate::error::AppError;
use crate::fhir::ResourceId;
use crate::fhir::outcome::OperationOutcome;
use crate::fhir::searchset::{self, SearchEntry, SearchMode};
use crate::service::everything::EverythingQuery;

/// Parameters `$everything` understands. `start`/`end` (care dates) are not supported and
/// are refused like any unknown parameter.
const EVERYTHING_PARAMS: &[&str] = &["_format", "_pretty", "_count", "_since", "_type", "_cursor"];

/// The patient and every current resource in its compartment (R4 Patient
/// CompartmentDefinition), the patient first.
#[utoipa::path(get, path = "/fhir/{type}/{id}/$everything", tag = "fhir",
    params(
        ("type" = String, Path, description = "Patient (the only type with $everything here)"),
        ("id" = String, Path, description = "Logical id of the patient"),
        ("_count" = Option<i64>, Query, description = "Page size (1 to 1000, default 50)"),
        ("_since" = Option<String>, Query, description = "Only resources updated at or after this instant"),
        ("_type" = Option<String>, Query, description = "Comma-separated resource types to return"),
        ("_cursor" = Option<String>, Query, description = "Paging cursor from a `next` link"),
    ),
    responses(
        (status = 200, description = "searchset Bundle", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed or unknown parameter, or a type other than Patient", body = OperationOutcome),
        (status = 404, description = "Unknown resource type or patient", body = OperationOutcome),
        (status = 406, description = "Unsupported response format", body = OperationOutcome),
        (status = 410, description = "The patient is deleted", body = OperationOutcome),
        (status = 503, description = "Database unavailable", body = OperationOutcome),
    ))]
pub async fn everything(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let query = QueryParams::parse(&req, EVERYTHING_PARAMS)?;
    answer(&state, &ctx, &req, path.into_inner(), &query).await
}

/// Most bytes of a `Parameters` body for `$everything` (a handful of short parameters).
const MAX_PARAMETERS_BODY: usize = 64 * 1024;

/// `$everything` invoked by POST (operations.html#invoking): the parameters in the query
/// string, in a `Parameters` body, or both (each named once); no body is no parameters.
#[utoipa::path(post, path = "/fhir/{type}/{id}/$everything", tag = "fhir",
    params(
        ("type" = String, Path, description = "Patient (the only type with $everything here)"),
        ("id" = String, Path, description = "Logical id of the patient"),
    ),
    request_body(content = Option<super::response::Resource>, description = "Optional `Parameters` resource: `_count` (valueInteger), `_since` (valueInstant), `_type` (valueString or valueCode, repeatable), `_cursor` (valueString)", content_type = "application/fhir+json"),
    responses(
        (status = 200, description = "searchset Bundle", body = super::response::Resource, content_type = "application/fhir+json"),
        (status = 400, description = "Malformed body or parameter, or a type other than Patient", body = OperationOutcome),
        (status = 404, description = "Unknown resource type or patient", body = OperationOutcome),
        (status = 410, description = "The patient is deleted", body = OperationOutcome),
        (status = 413, description = "Body over the size limit", body = OperationOutcome),
        (status = 415, description = "Body is not FHIR JSON", body = OperationOutcome),
    ))]
pub async fn everything_post(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<(String, String)>,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let body = read_optional_body(&req, payload, MAX_PARAMETERS_BODY).await?;
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|_| AppError::bad_request("the query string is malformed"))?;
    if !body.is_empty() {
        require_json_body(&req)?;
        pairs.extend(operation_parameters(&body)?);
    }
    let query = QueryParams::checked(pairs, EVERYTHING_PARAMS)?;
    answer(&state, &ctx, &req, path.into_inner(), &query).await
}

/// `$everything` with its parameters gathered, however it was invoked.
async fn answer(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    (type_name, id): (String, String),
    query: &QueryParams,
) -> Result<HttpResponse, AppError> {
    let resource_type = state.resources.resolve_type(&type_name)?;
    if resource_type.as_str() != "Patient" {
        return Err(AppError::BadRequest {
            message: format!("$everything is supported on Patient only, not on {resource_type}"),
            expression: None,
        });
    }
    let id = ResourceId::parse(&id)?;
    let format = response_format(req, query.get("_format"))?;
    let types = query
        .get("_type")
        .map(|list| {
            list.split(',')
                .map(|name| {
                    state
                        .resources
                        .resolve_type(name.trim())
                        .map(|t| t.to_string())
                        .map_err(|_| AppError::BadRequest {
                            message: format!(
                                "_type names '{}', which is not a supported resource type",
                                name.chars().take(64).collect::<String>()
                            ),
                            expression: Some("_type".into()),
                        })
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let everything_query = EverythingQuery {
        patient: id.clone(),
        types,
        since: query.get("_since").map(parse_instant).transpose()?,
        count: parse_count(query.get("_count"))?,
        cursor: query.get("_cursor").map(str::to_owned),
    };
    let page = state
        .resources
        .patient_everything(ctx, everything_query.clone())
        .await?;

    let base = state.fhir_base();
    let mut paging = vec![("_count", everything_query.count.to_string())];
    for name in ["_since", "_type"] {
        if let Some(value) = query.get(name) {
            paging.push((name, value.to_owned()));
        }
    }
    let url = |cursor: Option<&str>| {
        let mut params = paging.clone();
        if let Some(cursor) = cursor {
            params.push(("_cursor", cursor.to_owned()));
        }
        let query = serde_urlencoded::to_string(&params).unwrap_or_default();
        format!("{base}/Patient/{id}/$everything?{query}")
    };
    let mut links = vec![("self", url(everything_query.cursor.as_deref()))];
    if let Some(next) = &page.next {
        links.push(("next", url(Some(next))));
    }
    let entries = page
        .resources
        .iter()
        .map(|resource| {
            Ok(SearchEntry {
                full_url: format!("{base}/{}/{}", resource.resource_type, resource.id),
                resource: searchset::raw(resource.json.clone())?,
                mode: SearchMode::Match,
            })
        })
        .collect::<Result<Vec<_>, AppError>>()?;
    let body = searchset::bundle_json(
        &crate::fhir::document::format_instant(now_micros()),
        None,
        &links,
        entries,
    )?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(body))
}
