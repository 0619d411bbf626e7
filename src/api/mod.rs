//! HTTP: actix-web handlers, content negotiation, request context, error mapping and the
//! OpenAPI document. No SQL and no crypto here: handlers parse the request, call one
//! service function, and build the response.

pub mod audit_events;
pub mod bundle;
pub mod cors;
pub mod error;
pub mod everything;
pub mod export;
pub mod fhir;
pub mod health;
pub mod import;
pub mod ledger;
pub mod negotiation;
pub mod openapi;
pub mod openapi_typed;
pub mod portal;
pub mod registry;
pub mod request;
pub mod response;
pub mod routes;
pub mod search;
pub mod smart;

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::middleware::Condition;
use actix_web::{App, web};

use crate::access::TokenVerifier;
use crate::access::smart::SmartAuthorization;
use crate::service::ResourceService;
use crate::service::ledger::LedgerService;

/// Shared state of the HTTP layer.
#[derive(Clone)]
pub struct AppState {
    pub resources: ResourceService,
    pub ledger: LedgerService,
    /// Public base URL without a trailing slash, e.g. `https://fhir.example.org`.
    pub base_url: Arc<str>,
    pub max_body_bytes: usize,
    /// The CapabilityStatement, rendered once at start-up.
    pub capability_statement: Arc<str>,
    /// Verifies bearer tokens against the trusted issuers.
    pub tokens: Arc<TokenVerifier>,
    /// The local issuer's public keys (`/.well-known/jwks.json`), when it is on.
    pub local_jwks: Option<Arc<str>>,
    /// The trusted identity provider's SMART endpoints, when configured.
    pub smart: Option<Arc<SmartAuthorization>>,
    /// Browser origins allowed by CORS; empty: CORS is off.
    pub cors_origins: Arc<[String]>,
}

impl AppState {
    /// The FHIR base, e.g. `https://fhir.example.org/fhir`.
    pub fn fhir_base(&self) -> String {
        format!("{}/fhir", self.base_url)
    }
}

/// Builds the application: routes, request context middleware, CORS when origins are
/// configured, and a default service that answers unknown paths with an OperationOutcome.
/// Used by `serve` and by the tests.
pub fn build_app(
    state: AppState,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    // CORS sits inside the request context so that a preflight, which it answers without
    // reaching a route (and so without a token or a refusal), is still logged with its
    // request id. Off, it adds nothing: not even `Vary` or `Access-Control-Expose-Headers`.
    let cors = Condition::new(
        !state.cors_origins.is_empty(),
        cors::cors(&state.cors_origins),
    );
    App::new()
        .app_data(web::Data::new(state))
        .wrap(cors)
        .wrap(actix_web::middleware::from_fn(request::request_context))
        .configure(routes::configure)
        .default_service(web::to(request::no_route))
        // Outermost: `{base}/`, `{base}/Patient/` and the like, which clients build from a
        // base URL ending in a slash, are the paths without it.
        .wrap(actix_web::middleware::NormalizePath::trim())
}
