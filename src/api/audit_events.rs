//! `GET /fhir/AuditEvent?patient=…`: the patient's view of who touched their record, as a
//! searchset of AuditEvents generated from the ledger (see `service::audit_events`). Paged
//! newest first by a sealed cursor (the leaf index to continue below).

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use serde_json::json;

use super::AppState;
use super::negotiation::response_format;
use crate::access::RequestContext;
use crate::error::AppError;
use crate::service::audit_events::{AuditQuery, DateTest};

/// Default and largest page sizes.
const DEFAULT_COUNT: usize = 50;
const MAX_COUNT: usize = 1000;

/// Answers a search of AuditEvents (from `GET` or `POST _search` on the type).
pub(super) async fn search(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    params: Vec<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let mut query = AuditQuery {
        count: DEFAULT_COUNT,
        ..AuditQuery::default()
    };
    let mut format = None;
    let mut link_params = Vec::new();
    let invalid = |name: &str, message: String| AppError::BadRequest {
        message,
        expression: Some(name.to_owned()),
    };
    for (name, value) in &params {
        let once = |slot: &Option<String>| {
            if slot.is_some() {
                Err(invalid(
                    name,
                    format!("parameter '{name}' is given more than once"),
                ))
            } else {
                Ok(())
            }
        };
        match name.as_str() {
            "patient" => {
                once(&query.patient)?;
                let id = value.strip_prefix("Patient/").unwrap_or(value);
                crate::fhir::ResourceId::parse(id)
                    .map_err(|_| invalid(name, "patient must be Patient/<id> or an id".into()))?;
                query.patient = Some(id.to_owned());
            }
            "entity" => {
                once(&query.entity)?;
                if value.split('/').count() != 2 {
                    return Err(invalid(name, "entity must be Type/id".into()));
                }
                query.entity = Some(value.clone());
            }
            "agent" => {
                once(&query.agent)?;
                query.agent = Some(value.clone());
            }
            "date" => query.dates.push(DateTest::parse(value).ok_or_else(|| {
                invalid(
                    name,
                    format!("'{value}' is not a date with an optional ge/gt/le/lt/eq prefix"),
                )
            })?),
            "_count" => {
                query.count = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_COUNT).contains(n))
                    .ok_or_else(|| {
                        invalid(name, format!("_count must be from 1 to {MAX_COUNT}"))
                    })?;
            }
            "_cursor" => {
                query.cursor = Some(value.clone());
                continue;
            }
            "_format" => {
                format = Some(value.clone());
                continue;
            }
            other => {
                let shown: String = other.chars().take(64).collect();
                return Err(invalid(
                    &shown,
                    format!(
                        "unknown or unsupported parameter '{shown}' for AuditEvent (patient, entity, agent, \
                         date, _count are)"
                    ),
                ));
            }
        }
        link_params.push((name.clone(), value.clone()));
    }
    let format = response_format(req, format.as_deref())?;
    let page = state.resources.audit_events(ctx, query).await?;

    let self_base = format!("{}/AuditEvent", state.fhir_base());
    let link = |extra: Option<(String, String)>| {
        let mut pairs = link_params.clone();
        pairs.extend(extra);
        let query = serde_urlencoded::to_string(&pairs).unwrap_or_default();
        if query.is_empty() {
            self_base.clone()
        } else {
            format!("{self_base}?{query}")
        }
    };
    let mut links = vec![json!({"relation": "self", "url": link(None)})];
    if let Some(next) = page.next {
        links.push(json!({"relation": "next", "url": link(Some(("_cursor".into(), next)))}));
    }
    let entries: Vec<_> = page
        .events
        .iter()
        .map(|event| {
            json!({
                "fullUrl": format!("{self_base}/{}", event["id"].as_str().unwrap_or_default()),
                "resource": event,
                "search": {"mode": "match"},
            })
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "link": links,
        "entry": entries,
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, format.content_type()))
        .body(bundle.to_string()))
}
