//! What FHIR responses naming one resource version carry: the body by `Prefer: return`,
//! `Location`, `ETag` and `Last-Modified` (http.html#create, http.html#versioning), and the
//! schema the OpenAPI document gives any resource body.

use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::StatusCode;
use actix_web::http::header::{self, HttpDate};
use actix_web::{HttpRequest, HttpResponse, HttpResponseBuilder};
use utoipa::ToSchema;

use super::AppState;
use super::negotiation::ResponseFormat;
use super::request::{ReturnPreference, return_preference};
use crate::fhir::document::{VersionId, VersionMeta};
use crate::fhir::outcome::OperationOutcome;
use crate::service::{StoredResource, WriteOutcome};

/// Any FHIR R4 resource in JSON form (<https://hl7.org/fhir/R4/json.html>); the server
/// validates it against the R4 definition of its `resourceType`.
#[derive(ToSchema)]
#[schema(example = json!({"resourceType": "Patient", "name": [{"family": "Chalmers", "given": ["Peter"]}]}))]
#[allow(dead_code)] // documents a shape; values are handled as JSON
pub struct Resource {
    #[schema(rename = "resourceType")]
    resource_type: String,
}

pub(crate) fn write_response(
    state: &AppState,
    req: &HttpRequest,
    format: ResponseFormat,
    outcome: &WriteOutcome,
) -> HttpResponse {
    let resource = &outcome.resource;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let location = format!(
        "{}/{}/{}/_history/{}",
        state.fhir_base(),
        resource.resource_type,
        resource.id,
        resource.meta.version_id
    );
    let mut response = resource_response(HttpResponse::build(status), format, resource);
    response.insert_header((header::LOCATION, location));
    match return_preference(req) {
        ReturnPreference::Representation => response.body(resource.json.clone()),
        ReturnPreference::Minimal => {
            response.content_type(format.content_type());
            response.finish()
        }
        ReturnPreference::OperationOutcome => {
            let verb = if outcome.created {
                "created"
            } else {
                "updated"
            };
            let message = format!(
                "{}/{} {verb}: version {}",
                resource.resource_type, resource.id, resource.meta.version_id
            );
            response.body(OperationOutcome::information(message).to_json())
        }
    }
}

/// Sets the headers every response naming one resource version carries.
pub(crate) fn resource_response(
    mut builder: HttpResponseBuilder,
    format: ResponseFormat,
    resource: &StoredResource,
) -> HttpResponseBuilder {
    builder
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .insert_header((header::ETAG, etag(resource.meta.version_id)))
        .insert_header((header::LAST_MODIFIED, http_date(resource.meta)));
    builder
}

pub(crate) fn etag(version_id: VersionId) -> String {
    format!("W/\"{version_id}\"")
}

pub(crate) fn http_date(meta: VersionMeta) -> HttpDate {
    let micros = u64::try_from(meta.last_updated).unwrap_or(0);
    HttpDate::from(UNIX_EPOCH + Duration::from_micros(micros))
}
