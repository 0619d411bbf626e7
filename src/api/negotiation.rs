//! Content negotiation: FHIR JSON only (http.html#mime-type). Other requested formats get
//! 406, other request bodies 415.

use actix_web::HttpRequest;
use actix_web::http::header;

use crate::error::AppError;
use crate::fhir::patch::{JSON_PATCH, PatchFormat};

pub const FHIR_JSON: &str = "application/fhir+json";
pub const FHIR_JSON_UTF8: &str = "application/fhir+json; charset=utf-8";
pub const JSON_UTF8: &str = "application/json; charset=utf-8";

/// The media type a response is sent as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFormat {
    FhirJson,
    /// The client asked for plain `application/json` (and not FHIR JSON).
    Json,
}

impl ResponseFormat {
    pub fn content_type(self) -> &'static str {
        match self {
            Self::FhirJson => FHIR_JSON_UTF8,
            Self::Json => JSON_UTF8,
        }
    }
}

/// Decides the response format from `_format` (which overrides `Accept`, http.html#mime-type)
/// and the `Accept` header.
pub fn response_format(
    req: &HttpRequest,
    format_param: Option<&str>,
) -> Result<ResponseFormat, AppError> {
    if let Some(format) = format_param {
        return match format.trim() {
            "json" | FHIR_JSON => Ok(ResponseFormat::FhirJson),
            "application/json" => Ok(ResponseFormat::Json),
            other => Err(AppError::NotAcceptable(format!(
                "_format '{}' is not supported; this server speaks JSON only (json, application/fhir+json)",
                other.chars().take(64).collect::<String>()
            ))),
        };
    }
    let Some(accept) = req.headers().get(header::ACCEPT) else {
        return Ok(ResponseFormat::FhirJson);
    };
    let accept = accept
        .to_str()
        .map_err(|_| AppError::NotAcceptable("the Accept header is not valid text".into()))?;
    let mut plain_json = false;
    for media_range in accept.split(',') {
        let mut parts = media_range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let refused = parts.any(|p| {
            let p = p.trim();
            p.strip_prefix("q=")
                .is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
        });
        if refused {
            continue;
        }
        match media.as_str() {
            FHIR_JSON | "*/*" | "application/*" | "" => return Ok(ResponseFormat::FhirJson),
            "application/json" => plain_json = true,
            _ => {}
        }
    }
    if plain_json {
        Ok(ResponseFormat::Json)
    } else {
        Err(AppError::NotAcceptable(
            "this server answers in application/fhir+json or application/json only".into(),
        ))
    }
}

/// Checks that a request body is declared as FHIR JSON or JSON.
pub fn require_json_body(req: &HttpRequest) -> Result<(), AppError> {
    let Some(content_type) = req.headers().get(header::CONTENT_TYPE) else {
        return Err(AppError::UnsupportedMediaType(
            "the request has no Content-Type; send application/fhir+json".into(),
        ));
    };
    let media = content_type
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if media == FHIR_JSON || media == "application/json" {
        Ok(())
    } else {
        Err(AppError::UnsupportedMediaType(format!(
            "Content-Type '{}' is not supported; send application/fhir+json",
            media.chars().take(64).collect::<String>()
        )))
    }
}

/// The format of a PATCH body (http.html#patch): a JSON Patch document
/// (`application/json-patch+json`) or a FHIRPath Patch (a `Parameters` resource sent as FHIR
/// JSON). XML Patch and anything else: 415 naming the types that are accepted.
pub fn patch_format(req: &HttpRequest) -> Result<PatchFormat, AppError> {
    let media = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    match media.as_str() {
        JSON_PATCH => return Ok(PatchFormat::JsonPatch),
        "application/merge-patch+json" => return Ok(PatchFormat::MergePatch),
        FHIR_JSON | "application/json" => return Ok(PatchFormat::FhirPath),
        _ => {}
    }
    let sent = if media.is_empty() {
        "no Content-Type".to_owned()
    } else {
        format!(
            "Content-Type '{}'",
            media.chars().take(64).collect::<String>()
        )
    };
    Err(AppError::UnsupportedMediaType(format!(
        "PATCH with {sent} is not supported; send a JSON Patch document as {JSON_PATCH}, a \
         JSON Merge Patch as application/merge-patch+json, or a FHIRPath Patch (Parameters) as \
         {FHIR_JSON}"
    )))
}
