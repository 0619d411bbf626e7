//! Bulk export over HTTP (FHIR Bulk Data Access IG 2.0.0, export.html): the kick-off at the
//! system, Patient and Group levels (GET with query parameters, or POST with a `Parameters`
//! body), the status URL (202 with `X-Progress` while running, the manifest when complete,
//! DELETE to cancel) and the output files, each answered only to the token that started it.

use actix_web::http::{StatusCode, header};
use actix_web::{HttpRequest, HttpResponse, web};
use serde_json::{Value, json};

use super::AppState;
use super::negotiation::require_json_body;
use super::request::{operation_parameters, parse_instant, read_optional_body};
use crate::access::RequestContext;
use crate::error::AppError;
use crate::fhir::document::format_instant;
use crate::fhir::outcome::{IssueCode, OperationOutcome};
use crate::service::export::{
    ExportLevel, ExportRequest, ExportStatus, MAX_EXPORT_PATIENTS, MAX_TYPE_FILTERS,
};

/// Output formats this server writes: NDJSON under its names in the IG.
const NDJSON_FORMATS: &[&str] = &["application/fhir+ndjson", "application/ndjson", "ndjson"];
/// Most bytes of a kick-off's `Parameters` body.
const MAX_PARAMETERS_BODY: usize = 256 * 1024;
/// Seconds a client is asked to wait before polling again.
const RETRY_AFTER_SECONDS: u32 = 2;

/// Starts an export of every resource the token may search.
#[utoipa::path(get, path = "/fhir/$export", tag = "bulk data",
    params(
        ("Prefer" = String, Header, description = "Must be `respond-async`"),
        ("_outputFormat" = Option<String>, Query, description = "application/fhir+ndjson (default), application/ndjson or ndjson"),
        ("_since" = Option<String>, Query, description = "Only resources changed after this instant"),
        ("_type" = Option<String>, Query, description = "Comma-separated resource types to export"),
        ("_typeFilter" = Option<String>, Query, description = "Type?search: export of that type only what it matches (repeatable, or comma-separated)"),
    ),
    responses(
        (status = 202, description = "Accepted; poll the Content-Location header's status URL", body = OperationOutcome),
        (status = 400, description = "Missing Prefer: respond-async, or a malformed or unsupported parameter", body = OperationOutcome),
        (status = 401, description = "No valid bearer token", body = OperationOutcome),
        (status = 403, description = "The token may not search a type the export needs", body = OperationOutcome),
        (status = 503, description = "Too many exports running", body = OperationOutcome),
    ))]
pub async fn export_system(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    kick_off(&state, &ctx, &req, ExportLevel::System, Vec::new()).await
}

/// Starts an export of every resource the token may search, parameters in a `Parameters` body.
#[utoipa::path(post, path = "/fhir/$export", tag = "bulk data",
    params(("Prefer" = String, Header, description = "Must be `respond-async`")),
    request_body(content = Option<super::response::Resource>, description = "`Parameters`: `_outputFormat`, `_since` (valueInstant), `_type`, `_typeFilter` (valueString, repeatable)", content_type = "application/fhir+json"),
    responses(
        (status = 202, description = "Accepted; poll the Content-Location header's status URL", body = OperationOutcome),
        (status = 400, description = "Missing Prefer: respond-async, or a malformed or unsupported parameter", body = OperationOutcome),
        (status = 403, description = "The token may not search a type the export needs", body = OperationOutcome),
        (status = 415, description = "Body is not FHIR JSON", body = OperationOutcome),
    ))]
pub async fn export_system_post(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let body = parameters_body(&req, payload).await?;
    kick_off(&state, &ctx, &req, ExportLevel::System, body).await
}

/// Starts an export of the resources in patient compartments.
#[utoipa::path(get, path = "/fhir/Patient/$export", tag = "bulk data",
    params(
        ("Prefer" = String, Header, description = "Must be `respond-async`"),
        ("_outputFormat" = Option<String>, Query, description = "application/fhir+ndjson (default), application/ndjson or ndjson"),
        ("_since" = Option<String>, Query, description = "Only resources changed after this instant"),
        ("_type" = Option<String>, Query, description = "Comma-separated resource types to export"),
        ("_typeFilter" = Option<String>, Query, description = "Type?search: export of that type only what it matches"),
    ),
    responses(
        (status = 202, description = "Accepted; poll the Content-Location header's status URL", body = OperationOutcome),
        (status = 400, description = "Missing Prefer: respond-async, or a malformed or unsupported parameter", body = OperationOutcome),
        (status = 403, description = "The token may not search a type the export needs", body = OperationOutcome),
    ))]
pub async fn export_patients(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
) -> Result<HttpResponse, AppError> {
    kick_off(&state, &ctx, &req, ExportLevel::Patient, Vec::new()).await
}

/// Starts an export of the resources in patient compartments; `patient` narrows it.
#[utoipa::path(post, path = "/fhir/Patient/$export", tag = "bulk data",
    params(("Prefer" = String, Header, description = "Must be `respond-async`")),
    request_body(content = Option<super::response::Resource>, description = "`Parameters`: `_outputFormat`, `_since`, `_type`, `_typeFilter`, `patient` (valueReference, repeatable)", content_type = "application/fhir+json"),
    responses(
        (status = 202, description = "Accepted; poll the Content-Location header's status URL", body = OperationOutcome),
        (status = 400, description = "Missing Prefer: respond-async, or a malformed or unsupported parameter", body = OperationOutcome),
        (status = 403, description = "The token may not search a type the export needs", body = OperationOutcome),
    ))]
pub async fn export_patients_post(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let body = parameters_body(&req, payload).await?;
    kick_off(&state, &ctx, &req, ExportLevel::Patient, body).await
}

/// Starts an export of the resources in the compartments of a Group's patients.
#[utoipa::path(get, path = "/fhir/Group/{id}/$export", tag = "bulk data",
    params(
        ("id" = String, Path, description = "The Group's id"),
        ("Prefer" = String, Header, description = "Must be `respond-async`"),
        ("_outputFormat" = Option<String>, Query, description = "application/fhir+ndjson (default), application/ndjson or ndjson"),
        ("_since" = Option<String>, Query, description = "Only resources changed after this instant"),
        ("_type" = Option<String>, Query, description = "Comma-separated resource types to export"),
        ("_typeFilter" = Option<String>, Query, description = "Type?search: export of that type only what it matches"),
    ),
    responses(
        (status = 202, description = "Accepted; poll the Content-Location header's status URL", body = OperationOutcome),
        (status = 400, description = "Missing Prefer: respond-async, or a malformed or unsupported parameter", body = OperationOutcome),
        (status = 403, description = "The token may not read the Group or search a type the export needs", body = OperationOutcome),
        (status = 404, description = "No such Group", body = OperationOutcome),
    ))]
pub async fn export_group(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    let level = ExportLevel::Group(path.into_inner());
    kick_off(&state, &ctx, &req, level, Vec::new()).await
}

/// Starts an export of a Group's patients' records; `patient` narrows it.
#[utoipa::path(post, path = "/fhir/Group/{id}/$export", tag = "bulk data",
    params(
        ("id" = String, Path, description = "The Group's id"),
        ("Prefer" = String, Header, description = "Must be `respond-async`"),
    ),
    request_body(content = Option<super::response::Resource>, description = "`Parameters`: `_outputFormat`, `_since`, `_type`, `_typeFilter`, `patient` (valueReference, repeatable)", content_type = "application/fhir+json"),
    responses(
        (status = 202, description = "Accepted; poll the Content-Location header's status URL", body = OperationOutcome),
        (status = 400, description = "Missing Prefer: respond-async, or a malformed or unsupported parameter", body = OperationOutcome),
        (status = 403, description = "The token may not read the Group or search a type the export needs", body = OperationOutcome),
        (status = 404, description = "No such Group", body = OperationOutcome),
    ))]
pub async fn export_group_post(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    let body = parameters_body(&req, payload).await?;
    let level = ExportLevel::Group(path.into_inner());
    kick_off(&state, &ctx, &req, level, body).await
}

/// The status of an export: 202 while it runs, the manifest when complete, 500 with an
/// OperationOutcome when it failed.
#[utoipa::path(get, path = "/fhir/$export-status/{job}", tag = "bulk data",
    params(("job" = String, Path, description = "The job, from the kick-off's Content-Location")),
    responses(
        (status = 200, description = "Complete: the manifest", content_type = "application/json"),
        (status = 202, description = "In progress (X-Progress, Retry-After)"),
        (status = 404, description = "No such job for this token", body = OperationOutcome),
        (status = 500, description = "The export failed", body = OperationOutcome),
    ))]
pub async fn export_status(
    state: web::Data<AppState>,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    let job = path.into_inner();
    Ok(match state.resources.export_status(&ctx, &job).await? {
        ExportStatus::InProgress { resources_done } => HttpResponse::Accepted()
            .insert_header(("X-Progress", format!("{resources_done} resources written")))
            .insert_header((header::RETRY_AFTER, RETRY_AFTER_SECONDS.to_string()))
            .finish(),
        ExportStatus::Complete {
            transaction_time,
            request_url,
            files,
        } => {
            let base = state.fhir_base();
            let output: Vec<Value> = files
                .iter()
                .map(|file| {
                    json!({
                        "type": file.resource_type,
                        "url": format!("{base}/$export-file/{job}/{}", file.file_no),
                        "count": file.resource_count,
                    })
                })
                .collect();
            let manifest = json!({
                "transactionTime": format_instant(transaction_time),
                "request": request_url,
                "requiresAccessToken": true,
                "output": output,
                "error": [],
            });
            HttpResponse::Ok()
                .insert_header((header::CONTENT_TYPE, "application/json"))
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .body(manifest.to_string())
        }
        ExportStatus::Failed { error } => HttpResponse::build(StatusCode::INTERNAL_SERVER_ERROR)
            .insert_header((header::CONTENT_TYPE, "application/fhir+json"))
            .body(OperationOutcome::error(IssueCode::Exception, error).to_json()),
    })
}

/// Cancels an export, or deletes a finished one, with its files.
#[utoipa::path(delete, path = "/fhir/$export-status/{job}", tag = "bulk data",
    params(("job" = String, Path, description = "The job, from the kick-off's Content-Location")),
    responses(
        (status = 202, description = "Cancelled; its files are deleted", body = OperationOutcome),
        (status = 404, description = "No such job for this token", body = OperationOutcome),
    ))]
pub async fn export_cancel(
    state: web::Data<AppState>,
    ctx: RequestContext,
    path: web::Path<String>,
) -> Result<HttpResponse, AppError> {
    state
        .resources
        .cancel_export(&ctx, &path.into_inner())
        .await?;
    Ok(HttpResponse::Accepted()
        .insert_header((header::CONTENT_TYPE, "application/fhir+json"))
        .body(
            OperationOutcome::information("the export was cancelled and its files deleted")
                .to_json(),
        ))
}

/// One output file of a complete export, as NDJSON.
#[utoipa::path(get, path = "/fhir/$export-file/{job}/{file}", tag = "bulk data",
    params(
        ("job" = String, Path, description = "The job"),
        ("file" = i32, Path, description = "The file's number, from the manifest"),
    ),
    responses(
        (status = 200, description = "The resources, one per line", content_type = "application/fhir+ndjson"),
        (status = 404, description = "No such file for this token", body = OperationOutcome),
    ))]
pub async fn export_file(
    state: web::Data<AppState>,
    ctx: RequestContext,
    path: web::Path<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let (job, file) = path.into_inner();
    let file_no: i32 = file
        .parse()
        .map_err(|_| AppError::NotFound(format!("file {} of export", shown(&file))))?;
    let (_, ndjson) = state.resources.export_file(&ctx, &job, file_no).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "application/fhir+ndjson"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(ndjson))
}

async fn parameters_body(
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<Vec<(String, String)>, AppError> {
    let body = read_optional_body(req, payload, MAX_PARAMETERS_BODY).await?;
    if body.is_empty() {
        return Ok(Vec::new());
    }
    require_json_body(req)?;
    operation_parameters(&body)
}

/// Reads a kick-off, queues its job and answers 202 with the status URL.
async fn kick_off(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    level: ExportLevel,
    body_parameters: Vec<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let asynchronous = req
        .headers()
        .get_all("Prefer")
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|preference| preference.trim().eq_ignore_ascii_case("respond-async"));
    if !asynchronous {
        return Err(AppError::BadRequest {
            message: "a bulk export runs asynchronously: send 'Prefer: respond-async'".into(),
            expression: Some("Prefer".into()),
        });
    }
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(req.query_string())
        .map_err(|_| AppError::bad_request("the query string is malformed"))?;
    if pairs.iter().any(|(name, _)| name == "patient") {
        return Err(AppError::BadRequest {
            message: "'patient' is a parameter of POST kick-offs (export.html#query-parameters)"
                .into(),
            expression: Some("patient".into()),
        });
    }
    pairs.extend(body_parameters);
    let mut request = ExportRequest {
        level,
        request_url: format!(
            "{}{}",
            state.base_url,
            req.uri()
                .path_and_query()
                .map_or(req.path(), |p| p.as_str())
        ),
        since: None,
        types: None,
        type_filters: Vec::new(),
        patients: Vec::new(),
    };
    let mut seen: Vec<&str> = Vec::new();
    for (name, value) in &pairs {
        let once = |seen: &mut Vec<&str>, name: &'static str| {
            if seen.contains(&name) {
                return Err(AppError::BadRequest {
                    message: format!("parameter '{name}' is given more than once"),
                    expression: Some(name.into()),
                });
            }
            seen.push(name);
            Ok(())
        };
        match name.as_str() {
            "_outputFormat" => {
                once(&mut seen, "_outputFormat")?;
                if !NDJSON_FORMATS.contains(&value.as_str()) {
                    return Err(AppError::BadRequest {
                        message: format!(
                            "_outputFormat '{}' is not supported: this server writes {}",
                            shown(value),
                            NDJSON_FORMATS.join(", ")
                        ),
                        expression: Some("_outputFormat".into()),
                    });
                }
            }
            "_since" => {
                once(&mut seen, "_since")?;
                parse_instant(value)?;
                request.since = Some(value.clone());
            }
            "_type" => request.types.get_or_insert_with(Vec::new).extend(
                value
                    .split(',')
                    .map(|t| t.trim().to_owned())
                    .filter(|t| !t.is_empty()),
            ),
            "_typeFilter" => request.type_filters.extend(split_type_filters(value)),
            "patient" => {
                let id = value
                    .strip_prefix("Patient/")
                    .ok_or_else(|| AppError::BadRequest {
                        message: format!(
                            "patient '{}' is not a Patient/id reference",
                            shown(value)
                        ),
                        expression: Some("patient".into()),
                    })?;
                request.patients.push(id.to_owned());
            }
            other => {
                return Err(AppError::BadRequest {
                    message: format!(
                        "unknown or unsupported parameter '{}' for $export",
                        shown(other)
                    ),
                    expression: Some(shown(other)),
                });
            }
        }
    }
    if request.type_filters.len() > MAX_TYPE_FILTERS {
        return Err(AppError::TooLarge(format!(
            "an export may hold at most {MAX_TYPE_FILTERS} _typeFilter searches"
        )));
    }
    if request.patients.len() > MAX_EXPORT_PATIENTS {
        return Err(AppError::TooLarge(format!(
            "an export may name at most {MAX_EXPORT_PATIENTS} patients"
        )));
    }
    if !request.patients.is_empty() && request.level == ExportLevel::System {
        return Err(AppError::BadRequest {
            message: "'patient' narrows a Patient- or Group-level export, not a system one".into(),
            expression: Some("patient".into()),
        });
    }
    let job = state.resources.start_export(ctx, request).await?;
    Ok(HttpResponse::Accepted()
        .insert_header((
            header::CONTENT_LOCATION,
            format!("{}/$export-status/{job}", state.fhir_base()),
        ))
        .insert_header((header::CONTENT_TYPE, "application/fhir+json"))
        .body(
            OperationOutcome::information("the export has started; poll the Content-Location URL")
                .to_json(),
        ))
}

/// `_typeFilter` values: several may share one parameter, separated by commas that are
/// followed by a type name and `?` (a comma inside a search value is part of it).
fn split_type_filters(value: &str) -> Vec<String> {
    let mut filters: Vec<String> = Vec::new();
    for part in value.split(',') {
        let starts_filter = part.split_once('?').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphabetic())
        });
        match filters.last_mut() {
            Some(last) if !starts_filter => {
                last.push(',');
                last.push_str(part);
            }
            _ => filters.push(part.to_owned()),
        }
    }
    filters
}

fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_filters_split_where_a_new_type_begins() {
        assert_eq!(
            split_type_filters("Observation?code=a,b&status=final,Patient?gender=female"),
            [
                "Observation?code=a,b&status=final".to_owned(),
                "Patient?gender=female".to_owned()
            ]
        );
        assert_eq!(
            split_type_filters("Condition?clinical-status=active"),
            ["Condition?clinical-status=active"]
        );
    }
}
