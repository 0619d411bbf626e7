//! The patient's and auditor's page, `/portal`: its files, built into the binary (plain
//! HTML, CSS and JavaScript modules, no toolchain and nothing fetched from another host),
//! served under a Content-Security-Policy that lets the page talk to this server and, for
//! a SMART launch, to the identity provider's token endpoint only; and `/portal/config.json`,
//! what the page needs for that launch. The page itself is described in docs/portal.md.

use actix_web::http::header;
use actix_web::{HttpResponse, web};
use serde_json::json;

use super::AppState;

/// Where the page is served.
const PORTAL_PATH: &str = "/portal";

/// The scopes the portal asks the identity provider for: the patient's own record to read
/// and search (its access history included), and its Consents to grant and revoke.
const PORTAL_SCOPE: &str = "openid fhirUser launch/patient patient/*.rs patient/Consent.cu";

/// The page's files: name, media type, content.
const FILES: &[(&str, &str, &str)] = &[
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("portal/index.html"),
    ),
    (
        "portal.js",
        "text/javascript; charset=utf-8",
        include_str!("portal/portal.js"),
    ),
    (
        "verify.js",
        "text/javascript; charset=utf-8",
        include_str!("portal/verify.js"),
    ),
    (
        "portal.css",
        "text/css; charset=utf-8",
        include_str!("portal/portal.css"),
    ),
    ("icon.svg", "image/svg+xml", include_str!("portal/icon.svg")),
];

/// The page's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(PORTAL_PATH, web::get().to(page))
        .route("/portal/config.json", web::get().to(config))
        .route("/portal/{file}", web::get().to(file));
}

async fn page(state: web::Data<AppState>) -> HttpResponse {
    serve(&state, "index.html")
}

async fn file(state: web::Data<AppState>, name: web::Path<String>) -> HttpResponse {
    serve(&state, &name)
}

/// The SMART standalone launch's settings, when the identity provider has an authorization
/// endpoint and a client id for the portal; `{}` otherwise (the page then offers the token
/// form only).
async fn config(state: web::Data<AppState>) -> HttpResponse {
    let launch = state.smart.as_deref().and_then(|smart| {
        Some(json!({
            "client_id": smart.portal_client_id.as_deref()?,
            "authorization_endpoint": smart.authorization_endpoint.as_deref()?,
            "token_endpoint": smart.token_endpoint,
            "redirect_uri": format!("{}{PORTAL_PATH}", state.base_url),
            "aud": format!("{}/fhir", state.base_url),
            "scope": PORTAL_SCOPE,
        }))
    });
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(launch.unwrap_or_else(|| json!({})))
}

fn serve(state: &AppState, name: &str) -> HttpResponse {
    let Some((_, media_type, content)) = FILES.iter().find(|(file, ..)| *file == name) else {
        return HttpResponse::NotFound().finish();
    };
    HttpResponse::Ok()
        .content_type(*media_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, content_policy(state)))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(*content)
}

/// Scripts, styles and requests from this server only (no inline script, so injected markup
/// cannot run), the identity provider's token endpoint for a SMART launch, and no framing.
fn content_policy(state: &AppState) -> String {
    let provider = state
        .smart
        .as_deref()
        .filter(|smart| smart.portal_client_id.is_some())
        .and_then(|smart| origin(&smart.token_endpoint))
        .map(|origin| format!(" {origin}"))
        .unwrap_or_default();
    format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
         connect-src 'self'{provider}; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    )
}

/// `scheme://host[:port]` of an absolute URL (its ASCII origin, as CSP names sources).
fn origin(url: &str) -> Option<String> {
    let origin = url::Url::parse(url).ok()?.origin();
    origin.is_tuple().then(|| origin.ascii_serialization())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_of_endpoints() {
        assert_eq!(
            origin("https://idp.example.org:8443/realms/x/token"),
            Some("https://idp.example.org:8443".to_owned())
        );
        assert_eq!(
            origin("https://idp.example.org"),
            Some("https://idp.example.org".to_owned())
        );
        assert_eq!(origin("idp.example.org/token"), None);
    }
}
