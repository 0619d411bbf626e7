//! Public discovery documents for SMART clients: `/.well-known/smart-configuration` (SMART
//! App Launch 2.x) and `/.well-known/jwks.json`, the local issuer's public key.

use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;
use crate::access::scopes::LEDGER_READ_SCOPE;
use crate::error::AppError;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(
        "/.well-known/smart-configuration",
        web::get().to(smart_configuration),
    )
    .route("/.well-known/jwks.json", web::get().to(jwks));
}

/// What SMART clients need to know: this server verifies tokens it does not issue (there is
/// no authorization or token endpoint of its own; the deployment's identity provider has
/// them), which scopes it reads, and where the local issuer's key is.
#[utoipa::path(get, path = "/.well-known/smart-configuration", tag = "access",
    responses((status = 200, description = "SMART configuration", body = Object)))]
pub async fn smart_configuration(state: web::Data<AppState>) -> HttpResponse {
    let mut document = json!({
        "capabilities": ["permission-v1", "permission-v2", "permission-patient"],
        "scopes_supported": [
            "system/*.cruds", "system/*.rs", "system/*.read", "system/*.write",
            "patient/*.cruds", "patient/*.rs", "patient/*.read", "patient/*.write",
            LEDGER_READ_SCOPE,
        ],
        "token_endpoint_auth_methods_supported": [],
        "code_challenge_methods_supported": ["S256"],
    });
    if state.local_jwks.is_some() {
        document["jwks_uri"] = json!(format!("{}/.well-known/jwks.json", state.base_url));
    }
    HttpResponse::Ok().json(document)
}

/// The local issuer's public keys, for clients and tools that check its tokens.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "access",
    responses(
        (status = 200, description = "JSON Web Key Set", body = Object),
        (status = 404, description = "The local issuer is off", body = crate::fhir::outcome::OperationOutcome),
    ))]
pub async fn jwks(state: web::Data<AppState>) -> Result<HttpResponse, AppError> {
    let jwks = state
        .local_jwks
        .as_ref()
        .ok_or_else(|| AppError::NotFound("the local token issuer".into()))?;
    Ok(HttpResponse::Ok()
        .content_type("application/jwk-set+json")
        .body(jwks.to_string()))
}
