//! The OpenAPI document (`GET /openapi.json`, committed as `openapi/openapi.json`) and a
//! human docs page (`/docs`) that renders it with Swagger UI, served from the binary.

use std::sync::Arc;

use actix_web::{HttpResponse, web};
use utoipa::OpenApi;
use utoipa::openapi::path::Paths;
use utoipa_swagger_ui::Config;

use super::response::Resource;
use super::{health, ledger};
use crate::fhir::outcome::{Issue, IssueCode, OperationOutcome, Severity};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "fhirledger",
        description = "FHIR R4 server that stores every resource encrypted. Errors are FHIR OperationOutcome resources.",
        license(name = "Apache-2.0"),
    ),
    components(schemas(
        Resource, OperationOutcome, Issue, IssueCode, Severity, health::Health,
        ledger::LedgerKeyInfo, ledger::KeyChainView, crate::ledger::key_chain::ListedKey,
        crate::ledger::key_chain::Announcement, ledger::EntryView, ledger::EntriesPage, ledger::InclusionProof,
        ledger::ConsistencyProof, ledger::ReceiptView, ledger::CosignedInclusion,
        crate::service::ledger::WitnessStatus,
    )),
    tags(
        (name = "fhir", description = "FHIR R4 REST interactions (JSON only)"),
        (name = "bulk data", description = "Bulk export ($export, FHIR Bulk Data Access IG 2.0.0): kick-off, status, manifest and NDJSON files"),
        (name = "ledger", description = "The append-only Merkle ledger of every interaction: checkpoints, entries, receipts, proofs, tiles"),
        (name = "operations", description = "Health, readiness and this document"),
        (name = "access", description = "Discovery documents for SMART clients; every other operation marked with the bearer scheme needs a token"),
    ),
)]
pub struct ApiDoc;

/// The document of the operations in `paths` (the route table's), with what the derive
/// above declares and the per-type paths, pretty-printed and ending with a newline.
pub fn document(paths: Paths) -> String {
    let mut api = ApiDoc::openapi();
    api.paths = paths;
    let mut document = serde_json::to_value(api).unwrap_or_default();
    declare_fhir_media_type(&mut document);
    super::openapi_typed::add_typed_paths(&mut document);
    declare_bearer_authentication(&mut document);
    let mut text = serde_json::to_string_pretty(&document).unwrap_or_else(|_| "{}".to_owned());
    text.push('\n');
    text
}

/// utoipa labels every body `application/json`; bodies under `/fhir` are FHIR JSON.
fn declare_fhir_media_type(document: &mut serde_json::Value) {
    let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for (path, operations) in paths.iter_mut() {
        if !path.starts_with("/fhir") {
            continue;
        }
        let Some(operations) = operations.as_object_mut() else {
            continue;
        };
        for operation in operations.values_mut() {
            let mut bodies: Vec<&mut serde_json::Value> = Vec::new();
            if let Some(operation) = operation.as_object_mut() {
                for (key, value) in operation.iter_mut() {
                    match key.as_str() {
                        "requestBody" => bodies.push(value),
                        "responses" => {
                            if let Some(responses) = value.as_object_mut() {
                                bodies.extend(responses.values_mut());
                            }
                        }
                        _ => {}
                    }
                }
            }
            for body in bodies {
                if let Some(content) = body.get_mut("content").and_then(|c| c.as_object_mut())
                    && let Some(schema) = content.remove("application/json")
                {
                    content.insert(super::negotiation::FHIR_JSON.to_owned(), schema);
                }
            }
        }
    }
}

/// Paths served without a token.
const PUBLIC_PATHS: &[&str] = &[
    "/fhir/metadata",
    "/ledger/checkpoint",
    "/ledger/key",
    "/healthz",
    "/readyz",
    "/openapi.json",
];

/// Declares the bearer scheme, and on every operation that needs a token, the scheme and
/// its 401 and 403 answers.
fn declare_bearer_authentication(document: &mut serde_json::Value) {
    document["components"]["securitySchemes"]["bearer"] = serde_json::json!({
        "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
        "description": "A JWT from a trusted issuer: SMART scopes decide what it may do; the ledger API needs 'ledger.read'",
    });
    // Declared once, referred to by every operation that needs a token.
    for (name, media_type) in [
        ("Unauthenticated", super::negotiation::FHIR_JSON),
        ("UnauthenticatedJson", "application/json"),
    ] {
        document["components"]["responses"][name] = serde_json::json!({
            "description": "No valid bearer token (missing, malformed, expired, wrong issuer or audience, bad signature); WWW-Authenticate says why",
            "content": {media_type: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}},
        });
    }
    for (name, media_type) in [
        ("Forbidden", super::negotiation::FHIR_JSON),
        ("ForbiddenJson", "application/json"),
    ] {
        document["components"]["responses"][name] = serde_json::json!({
            "description": "The token's scopes do not allow this; the OperationOutcome names the rule",
            "content": {media_type: {"schema": {"$ref": "#/components/schemas/OperationOutcome"}}},
        });
    }
    let Some(paths) = document.get_mut("paths").and_then(|p| p.as_object_mut()) else {
        return;
    };
    for (path, operations) in paths.iter_mut() {
        let public = PUBLIC_PATHS.contains(&path.as_str())
            || path.starts_with("/ledger/tile")
            || path.starts_with("/.well-known/");
        let Some(operations) = operations.as_object_mut().filter(|_| !public) else {
            continue;
        };
        let media_type = if path.starts_with("/fhir") {
            super::negotiation::FHIR_JSON
        } else {
            "application/json"
        };
        let (unauthenticated, forbidden) = if media_type == super::negotiation::FHIR_JSON {
            ("Unauthenticated", "Forbidden")
        } else {
            ("UnauthenticatedJson", "ForbiddenJson")
        };
        for operation in operations.values_mut() {
            operation["security"] = serde_json::json!([{"bearer": []}]);
            operation["responses"]["401"] = response_ref(unauthenticated);
            operation["responses"]["403"] = response_ref(forbidden);
        }
    }
}

fn response_ref(name: &str) -> serde_json::Value {
    serde_json::json!({"$ref": format!("#/components/responses/{name}")})
}

/// The viewer's page and files.
pub fn viewer_routes(cfg: &mut web::ServiceConfig) {
    cfg.route(DOCS_PATH, web::get().to(docs))
        .route("/docs/{file}", web::get().to(docs_file));
}

/// Where the viewer's page and files are served.
const DOCS_PATH: &str = "/docs";

/// The viewer's configuration: it renders `/openapi.json`, and the public validator's
/// badge is off, so the page asks no other host for anything.
fn viewer_config() -> Arc<Config<'static>> {
    Arc::new(Config::from("/openapi.json").validator_url("none"))
}

/// `/docs` (and `/docs/`, which `NormalizePath::trim` makes `/docs`): Swagger UI's page,
/// from the files built into the binary (the `vendored` Swagger UI: nothing is fetched at
/// build time, at run time, or by the browser from another host).
async fn docs() -> HttpResponse {
    viewer_file("index.html")
}

/// `/docs/{file}`: the viewer's scripts, stylesheets and images.
async fn docs_file(file: web::Path<String>) -> HttpResponse {
    viewer_file(&file)
}

/// The page names its files relative to itself (`./swagger-ui.css`, `index.css`); at
/// `/docs` (no trailing slash) those would resolve to `/swagger-ui.css`, so each relative
/// `href`/`src` is made absolute under `/docs/`. The title names this server.
fn absolute_references(page: &str) -> String {
    let mut out = String::with_capacity(page.len() + 256);
    let mut rest = page;
    while let Some(at) = [" href=\"", " src=\""]
        .iter()
        .filter_map(|attribute| rest.find(attribute).map(|i| i + attribute.len()))
        .min()
    {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let value_end = rest.find('"').unwrap_or(rest.len());
        let value = &rest[..value_end];
        if !value.starts_with('/') && !value.starts_with('#') && !value.contains(':') {
            out.push_str(DOCS_PATH);
            out.push('/');
            out.push_str(value.strip_prefix("./").unwrap_or(value));
        } else {
            out.push_str(value);
        }
        rest = &rest[value_end..];
    }
    out.push_str(rest);
    out.replace("<title>Swagger UI</title>", "<title>fhirledger API</title>")
}

fn viewer_file(name: &str) -> HttpResponse {
    match utoipa_swagger_ui::serve(name, viewer_config()) {
        Ok(Some(file)) if name == "index.html" => HttpResponse::Ok()
            .content_type("text/html; charset=utf-8")
            .body(absolute_references(&String::from_utf8_lossy(&file.bytes))),
        Ok(Some(file)) => HttpResponse::Ok()
            .content_type(file.content_type)
            .body(file.bytes.into_owned()),
        Ok(None) => HttpResponse::NotFound().finish(),
        Err(error) => HttpResponse::InternalServerError().body(error.to_string()),
    }
}
