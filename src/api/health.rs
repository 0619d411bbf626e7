//! Liveness (`/healthz`: the process answers) and readiness (`/readyz`: the database answers
//! and the keys are loaded — the server cannot start without them).

use actix_web::{HttpResponse, web};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready`, `unavailable`, or `sealed` (a sealed start waiting for key shares).
    pub status: &'static str,
}

/// Operational metrics in Prometheus's text format (see [`crate::metrics`]): counts and
/// latencies only, no request content, so it needs no token. Off the FHIR path.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain"),
        (status = 503, description = "Metrics could not be set up"),
    ))]
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    let Some(metrics) = crate::metrics::metrics() else {
        return HttpResponse::ServiceUnavailable().finish();
    };
    let (open, idle) = state.resources.pool_usage();
    metrics
        .pool_connections
        .with_label_values(&["idle"])
        .set(i64::from(idle));
    metrics
        .pool_connections
        .with_label_values(&["in_use"])
        .set(i64::from(open.saturating_sub(idle)));
    match metrics.render() {
        Ok(text) => HttpResponse::Ok()
            .content_type("text/plain; version=0.0.4; charset=utf-8")
            .body(text),
        Err(error) => {
            tracing::warn!(%error, "metrics not rendered");
            HttpResponse::ServiceUnavailable().finish()
        }
    }
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "operations",
    responses((status = 200, description = "The process answers", body = Health)))]
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(Health { status: "ok" })
}

/// The database is reachable and the keys are loaded.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    responses(
        (status = 200, description = "Ready to serve", body = Health),
        (status = 503, description = "The database does not answer", body = Health),
    ))]
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.resources.ping().await {
        Ok(()) => HttpResponse::Ok().json(Health { status: "ready" }),
        Err(error) => {
            tracing::warn!(%error, "readiness check failed");
            HttpResponse::ServiceUnavailable().json(Health {
                status: "unavailable",
            })
        }
    }
}
