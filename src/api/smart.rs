//! Public discovery documents for SMART clients: `/.well-known/smart-configuration` (SMART
//! App Launch 2.x), naming the trusted identity provider's endpoints when they are
//! configured, and `/.well-known/jwks.json`, the local issuer's public key.

use actix_web::{HttpResponse, web};
use serde_json::{Value, json};

use super::AppState;
use crate::access::scopes::LEDGER_READ_SCOPE;
use crate::error::AppError;

/// What SMART clients need to know: which scopes this server reads and, when configured,
/// the endpoints of the trusted identity provider that issues its tokens (the server issues
/// none itself); otherwise where the local issuer's key is.
#[utoipa::path(get, path = "/.well-known/smart-configuration", tag = "access",
    responses((status = 200, description = "SMART configuration", body = Object)))]
pub async fn smart_configuration(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(document(&state))
}

/// The server's own capabilities: it reads v1 and v2 scopes (scopes.rs), and confines
/// `patient/` scopes to the token's patient and `user/` scopes to its `fhirUser`.
const SERVER_CAPABILITIES: &[&str] = &[
    "permission-v1",
    "permission-v2",
    "permission-patient",
    "permission-user",
];

/// The SMART configuration (SMART App Launch 2.x, conformance.html). Only what is known is
/// said: without a configured provider there is no issuer, endpoint or grant type to name,
/// so the document lists the server's own capabilities and scopes and nothing more.
fn document(state: &AppState) -> Value {
    let mut capabilities: Vec<&str> = SERVER_CAPABILITIES.to_vec();
    let mut scopes: Vec<&str> = vec![
        "system/*.cruds",
        "system/*.rs",
        "system/*.read",
        "system/*.write",
        "patient/*.cruds",
        "patient/*.rs",
        "patient/*.read",
        "patient/*.write",
        "user/*.cruds",
        "user/*.rs",
        "user/*.read",
        "user/*.write",
        LEDGER_READ_SCOPE,
    ];
    let Some(smart) = state.smart.as_deref() else {
        let mut document = json!({
            "capabilities": capabilities,
            "scopes_supported": scopes,
        });
        if state.local_jwks.is_some() {
            document["jwks_uri"] = json!(format!("{}/.well-known/jwks.json", state.base_url));
        }
        return document;
    };
    capabilities.extend(smart.capabilities.iter().map(String::as_str));
    scopes.extend(smart.launch_scopes());
    let mut document = json!({
        "issuer": smart.issuer,
        "token_endpoint": smart.token_endpoint,
        "grant_types_supported": smart.grant_types,
        "capabilities": capabilities,
        "scopes_supported": scopes,
    });
    if let Some(endpoint) = &smart.authorization_endpoint {
        document["authorization_endpoint"] = json!(endpoint);
        // SMART 2.x requires PKCE with S256 of every authorization server, and the code
        // flow is the only one it defines (app-launch.html#step-3).
        document["response_types_supported"] = json!(["code"]);
        document["code_challenge_methods_supported"] = json!(["S256"]);
    }
    let methods = smart.token_endpoint_auth_methods();
    if !methods.is_empty() {
        document["token_endpoint_auth_methods_supported"] = json!(methods);
    }
    for (name, value) in [
        ("jwks_uri", &smart.jwks_uri),
        ("introspection_endpoint", &smart.introspection_endpoint),
        ("revocation_endpoint", &smart.revocation_endpoint),
        ("registration_endpoint", &smart.registration_endpoint),
        ("management_endpoint", &smart.management_endpoint),
    ] {
        if let Some(value) = value {
            document[name] = json!(value);
        }
    }
    document
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
