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
use crate::service::audit_events::AuditQuery;

/// Answers a search of AuditEvents (from `GET` or `POST _search` on the type).
pub(super) async fn search(
    state: &AppState,
    ctx: &RequestContext,
    req: &HttpRequest,
    params: Vec<(String, String)>,
) -> Result<HttpResponse, AppError> {
    let format = params
        .iter()
        .find(|(name, _)| name == "_format")
        .map(|(_, value)| value.clone());
    let (query, link_params) = AuditQuery::parse(
        state.resources.search_index().registry(),
        &params,
        super::search::handling(req),
    )?;
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
