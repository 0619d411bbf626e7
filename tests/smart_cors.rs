//! Browser SMART apps: CORS for configured origins only (preflights answered without a
//! token and never counted as refusals), and SMART discovery — the SMART configuration and
//! the CapabilityStatement name the identity provider's endpoints exactly when configured.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::{BASE_URL, Reply, TestDb, call, call_as_is, get, post};
use fhirledger::access::smart::SmartAuthorization;
use fhirledger::fhir::capability::OAUTH_URIS_EXTENSION;
use jsonwebtoken::jwk::JwkSet;
use serde_json::{Value, json};

const APP: &str = "https://app.example.org";
const OTHER: &str = "https://evil.example.net";
const ISSUER: &str = "https://idp.example.org/realms/ehr";

fn preflight(path: &str, origin: &str, method: &str, headers: &str) -> TestRequest {
    TestRequest::default()
        .method(actix_web::http::Method::OPTIONS)
        .uri(path)
        .insert_header(("Origin", origin))
        .insert_header(("Access-Control-Request-Method", method))
        .insert_header(("Access-Control-Request-Headers", headers))
}

/// A header's comma-separated values, lowercased.
fn listed(reply: &Reply, name: &str) -> Vec<String> {
    reply
        .header(name)
        .unwrap_or_default()
        .split(',')
        .map(|v| v.trim().to_ascii_lowercase())
        .filter(|v| !v.is_empty())
        .collect()
}

fn has_cors_headers(reply: &Reply) -> bool {
    reply
        .headers
        .keys()
        .any(|name| name.as_str().starts_with("access-control-"))
}

/// Writes the aggregated refusals now; returns how many entries that made.
async fn flush_refusals(state: &fhirledger::api::AppState) -> usize {
    let ledger = state.ledger.clone();
    actix_web::rt::task::spawn_blocking(move || ledger.flush_refusals(true))
        .await
        .unwrap()
        .unwrap()
}

async fn preflights_from_configured_origins_are_answered(db: TestDb) {
    let state = db.state_configured(|options| {
        options.cors_origins = vec![APP.into(), "http://localhost:3000".into()];
    });
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;

    let asked = "authorization, content-type, if-match, if-none-exist, prefer";
    for (path, method) in [
        ("/fhir/Patient", "POST"),
        ("/fhir/Patient/p1", "PUT"),
        ("/fhir/Patient/p1", "PATCH"),
        ("/fhir/Patient/p1", "DELETE"),
        ("/fhir", "POST"),
        ("/ledger/checkpoint", "GET"),
    ] {
        let reply = call_as_is(&app, preflight(path, APP, method, asked)).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "{method} {path}: {}",
            reply.text()
        );
        assert_eq!(
            reply.header("access-control-allow-origin").as_deref(),
            Some(APP)
        );
        let methods = listed(&reply, "access-control-allow-methods");
        for expected in ["get", "post", "put", "patch", "delete", "options"] {
            assert!(methods.contains(&expected.into()), "{methods:?}");
        }
        let headers = listed(&reply, "access-control-allow-headers");
        for expected in [
            "authorization",
            "content-type",
            "if-match",
            "if-none-match",
            "if-none-exist",
            "if-modified-since",
            "prefer",
            "accept",
        ] {
            assert!(headers.contains(&expected.into()), "{headers:?}");
        }
        // Cookies are not how SMART apps authenticate.
        assert!(reply.header("access-control-allow-credentials").is_none());
        assert!(reply.header("access-control-max-age").is_some());
    }
    let reply = call_as_is(
        &app,
        preflight(
            "/fhir/Patient",
            "http://localhost:3000",
            "GET",
            "authorization",
        ),
    )
    .await;
    assert_eq!(
        reply.header("access-control-allow-origin").as_deref(),
        Some("http://localhost:3000")
    );

    // Another origin, or a near miss of a configured one, is not allowed.
    for origin in [
        OTHER,
        "https://app.example.org:8443",
        "http://app.example.org",
    ] {
        let reply = call_as_is(
            &app,
            preflight("/fhir/Patient", origin, "GET", "authorization"),
        )
        .await;
        assert!(
            !reply.status.is_server_error(),
            "{origin}: {}",
            reply.status
        );
        assert!(
            reply.header("access-control-allow-origin").is_none(),
            "{origin}"
        );
    }
    // A header or method outside the lists is not allowed either.
    let reply = call_as_is(&app, preflight("/fhir/Patient", APP, "GET", "x-custom")).await;
    assert!(reply.header("access-control-allow-origin").is_none());
    let reply = call_as_is(&app, preflight("/fhir/Patient", APP, "TRACE", "")).await;
    assert!(reply.header("access-control-allow-origin").is_none());

    // None of these preflights needed a token, and none was counted as a refusal.
    assert_eq!(flush_refusals(&state).await, 0);
}

async fn actual_requests_expose_the_headers_apps_need(db: TestDb) {
    let state = db.state_configured(|options| options.cors_origins = vec![APP.into()]);
    let app = test::init_service(fhirledger::api::build_app(state)).await;

    let created = call(
        &app,
        post("/fhir/Patient", &json!({"resourceType": "Patient"})).insert_header(("Origin", APP)),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    assert_eq!(
        created.header("access-control-allow-origin").as_deref(),
        Some(APP)
    );
    let exposed = listed(&created, "access-control-expose-headers");
    for name in [
        "location",
        "etag",
        "last-modified",
        "x-ledger-entry",
        "x-request-id",
    ] {
        assert!(exposed.contains(&name.into()), "{name} not in {exposed:?}");
        // Exposed because the server sets them on this response.
        assert!(created.header(name).is_some(), "{name} not set");
    }

    let location = created.header("location").unwrap();
    let path = location.strip_prefix(BASE_URL).unwrap();
    let read = call(&app, get(path).insert_header(("Origin", APP))).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(
        read.header("access-control-allow-origin").as_deref(),
        Some(APP)
    );
    assert!(listed(&read, "access-control-expose-headers").contains(&"etag".into()));

    // A refusal is readable too, so that the app sees why its token was refused.
    let refused = call_as_is(&app, get("/fhir/Patient").insert_header(("Origin", APP))).await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        refused.header("access-control-allow-origin").as_deref(),
        Some(APP)
    );
    assert!(listed(&refused, "access-control-expose-headers").contains(&"www-authenticate".into()));

    // Another origin's page gets the answer (non-browser clients are not blocked) but no
    // permission to read it.
    let other = call(&app, get(path).insert_header(("Origin", OTHER))).await;
    assert_eq!(other.status, StatusCode::OK);
    assert!(other.header("access-control-allow-origin").is_none());
}

async fn without_origins_there_are_no_cors_headers(db: TestDb) {
    let state = db.state();
    assert!(state.cors_origins.is_empty());
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;

    for path in [
        "/fhir/Patient",
        "/fhir/Patient/p1",
        "/fhir/metadata",
        "/fhir",
    ] {
        let reply = call_as_is(&app, preflight(path, APP, "GET", "authorization")).await;
        assert!(
            !reply.status.is_server_error(),
            "{path}: {} {}",
            reply.status,
            reply.text()
        );
        assert!(!has_cors_headers(&reply), "{path}: {:?}", reply.headers);
        assert!(reply.header("vary").is_none(), "{path}");
    }
    let reply = call(&app, get("/fhir/Patient").insert_header(("Origin", APP))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(!has_cors_headers(&reply), "{:?}", reply.headers);
    assert_eq!(flush_refusals(&state).await, 0);

    let statement = call_as_is(&app, get("/fhir/metadata")).await.json();
    assert_eq!(statement["rest"][0]["security"]["cors"], false);
}

/// A trusted identity provider's key set (its key is never used here).
fn provider_jwks() -> JwkSet {
    let key = ed25519_dalek::SigningKey::from_bytes(&rand::random());
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().to_bytes());
    serde_json::from_value(json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1", "use": "sig"}
    ]}))
    .unwrap()
}

fn provider() -> SmartAuthorization {
    SmartAuthorization {
        issuer: ISSUER.into(),
        jwks_uri: Some(format!("{ISSUER}/certs")),
        authorization_endpoint: Some(format!("{ISSUER}/auth")),
        token_endpoint: format!("{ISSUER}/token"),
        introspection_endpoint: Some(format!("{ISSUER}/token/introspect")),
        revocation_endpoint: None,
        registration_endpoint: None,
        management_endpoint: Some(format!("{ISSUER}/account/applications")),
        capabilities: vec![
            "launch-standalone".into(),
            "client-public".into(),
            "client-confidential-symmetric".into(),
            "context-standalone-patient".into(),
            "sso-openid-connect".into(),
        ],
        grant_types: vec!["authorization_code".into(), "client_credentials".into()],
        portal_client_id: Some("fhirledger-portal".into()),
    }
}

fn oauth_uris(statement: &Value) -> Option<Vec<(String, String)>> {
    let extensions = statement["rest"][0]["security"]["extension"].as_array()?;
    let oauth = extensions
        .iter()
        .find(|e| e["url"] == OAUTH_URIS_EXTENSION)?;
    Some(
        oauth["extension"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["url"].as_str().unwrap().to_owned(),
                    e["valueUri"].as_str().unwrap().to_owned(),
                )
            })
            .collect(),
    )
}

const ENDPOINT_FIELDS: &[&str] = &[
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "introspection_endpoint",
    "revocation_endpoint",
    "registration_endpoint",
    "management_endpoint",
    "grant_types_supported",
    "response_types_supported",
    "token_endpoint_auth_methods_supported",
];

async fn smart_discovery_names_configured_endpoints(db: TestDb) {
    let smart = provider();
    let state = db.state_configured(|options| {
        options.trusted_issuers = vec![(ISSUER.into(), provider_jwks())];
        options.smart = Some(smart.clone());
    });
    let app = test::init_service(fhirledger::api::build_app(state)).await;

    let reply = call_as_is(&app, get("/.well-known/smart-configuration")).await;
    assert_eq!(reply.status, StatusCode::OK);
    let document = reply.json();
    assert_eq!(document["issuer"], ISSUER);
    assert_eq!(document["jwks_uri"], json!(smart.jwks_uri));
    assert_eq!(
        document["authorization_endpoint"],
        json!(smart.authorization_endpoint)
    );
    assert_eq!(document["token_endpoint"], smart.token_endpoint);
    assert_eq!(
        document["introspection_endpoint"],
        json!(smart.introspection_endpoint)
    );
    assert_eq!(
        document["management_endpoint"],
        json!(smart.management_endpoint)
    );
    // Not configured, so not claimed.
    assert!(document.get("revocation_endpoint").is_none());
    assert!(document.get("registration_endpoint").is_none());
    assert_eq!(document["response_types_supported"], json!(["code"]));
    assert_eq!(
        document["code_challenge_methods_supported"],
        json!(["S256"])
    );
    assert_eq!(document["grant_types_supported"], json!(smart.grant_types));
    assert_eq!(
        document["token_endpoint_auth_methods_supported"],
        json!(["client_secret_basic"])
    );
    let capabilities: Vec<&str> = document["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap())
        .collect();
    for own in [
        "permission-v1",
        "permission-v2",
        "permission-patient",
        "permission-user",
    ] {
        assert!(capabilities.contains(&own), "{capabilities:?}");
    }
    for configured in &smart.capabilities {
        assert!(
            capabilities.contains(&configured.as_str()),
            "{capabilities:?}"
        );
    }
    assert!(!capabilities.contains(&"launch-ehr"));
    assert!(!capabilities.contains(&"client-confidential-asymmetric"));
    let scopes = document["scopes_supported"].as_array().unwrap();
    for scope in [
        "openid",
        "fhirUser",
        "launch/patient",
        "patient/*.rs",
        "ledger.read",
    ] {
        assert!(scopes.contains(&json!(scope)), "{scope} not in {scopes:?}");
    }
    assert!(
        !scopes.contains(&json!("launch")),
        "no EHR launch configured"
    );

    let statement = call_as_is(&app, get("/fhir/metadata")).await.json();
    let security = &statement["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    let mut uris = oauth_uris(&statement).expect("oauth-uris extension");
    uris.sort();
    let mut expected = vec![
        (
            "authorize".to_owned(),
            smart.authorization_endpoint.unwrap(),
        ),
        ("token".to_owned(), smart.token_endpoint.clone()),
        (
            "introspect".to_owned(),
            smart.introspection_endpoint.unwrap(),
        ),
        ("manage".to_owned(), smart.management_endpoint.unwrap()),
    ];
    expected.sort();
    assert_eq!(uris, expected);
}

async fn backend_services_only_provider_has_no_authorize(db: TestDb) {
    let smart = SmartAuthorization {
        authorization_endpoint: None,
        capabilities: vec!["client-confidential-asymmetric".into()],
        grant_types: SmartAuthorization::default_grant_types(false),
        jwks_uri: None,
        introspection_endpoint: None,
        management_endpoint: None,
        portal_client_id: None,
        ..provider()
    };
    assert_eq!(smart.check(), Ok(()));
    let state = db.state_configured(|options| {
        options.trusted_issuers = vec![(ISSUER.into(), provider_jwks())];
        options.smart = Some(smart.clone());
    });
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let document = call_as_is(&app, get("/.well-known/smart-configuration"))
        .await
        .json();
    assert_eq!(document["token_endpoint"], smart.token_endpoint);
    assert_eq!(
        document["grant_types_supported"],
        json!(["client_credentials"])
    );
    assert_eq!(
        document["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    for absent in [
        "authorization_endpoint",
        "response_types_supported",
        "code_challenge_methods_supported",
        "jwks_uri",
    ] {
        assert!(document.get(absent).is_none(), "{absent}: {document}");
    }
    let statement = call_as_is(&app, get("/fhir/metadata")).await.json();
    assert_eq!(
        oauth_uris(&statement),
        Some(vec![("token".to_owned(), smart.token_endpoint)])
    );
}

async fn without_endpoints_nothing_is_claimed(db: TestDb) {
    // Trusting a provider is not knowing its endpoints.
    let state = db.state_trusting(vec![(ISSUER.into(), provider_jwks())]);
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let document = call_as_is(&app, get("/.well-known/smart-configuration"))
        .await
        .json();
    for absent in ENDPOINT_FIELDS
        .iter()
        .chain(&["code_challenge_methods_supported"])
    {
        assert!(document.get(*absent).is_none(), "{absent}: {document}");
    }
    let capabilities = document["capabilities"].as_array().unwrap();
    for launch in [
        "launch-standalone",
        "launch-ehr",
        "client-public",
        "sso-openid-connect",
    ] {
        assert!(!capabilities.contains(&json!(launch)), "{launch}");
    }
    assert!(capabilities.contains(&json!("permission-v2")));
    // The local issuer is on in tests: its key set is what verifies its tokens.
    assert_eq!(
        document["jwks_uri"],
        format!("{BASE_URL}/.well-known/jwks.json")
    );

    let statement = call_as_is(&app, get("/fhir/metadata")).await.json();
    let security = &statement["rest"][0]["security"];
    assert_eq!(security["service"][0]["coding"][0]["code"], "SMART-on-FHIR");
    assert!(security.get("extension").is_none(), "{security}");
    assert_eq!(oauth_uris(&statement), None);
}

/// The portal's SMART launch: its settings come from the provider's configuration and the
/// portal's client id, and its page may call the token endpoint's origin and no other.
async fn portal_launches_at_the_configured_provider(db: TestDb) {
    let smart = provider();
    let state = db.state_configured(|options| {
        options.trusted_issuers = vec![(ISSUER.into(), provider_jwks())];
        options.smart = Some(smart.clone());
    });
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let config = call_as_is(&app, get("/portal/config.json")).await.json();
    assert_eq!(config["client_id"], "fhirledger-portal");
    assert_eq!(
        config["authorization_endpoint"],
        smart.authorization_endpoint.clone().unwrap()
    );
    assert_eq!(config["token_endpoint"], smart.token_endpoint);
    assert_eq!(config["redirect_uri"], format!("{BASE_URL}/portal"));
    assert_eq!(config["aud"], format!("{BASE_URL}/fhir"));
    assert!(
        config["scope"]
            .as_str()
            .unwrap()
            .split(' ')
            .any(|scope| scope == "launch/patient"),
        "{config}"
    );
    let page = call_as_is(&app, get("/portal")).await;
    let policy = page.header("content-security-policy").unwrap();
    assert!(
        policy.contains("connect-src 'self' https://idp.example.org;"),
        "{policy}"
    );

    // Without the portal's client id, the provider is published but the page offers no
    // launch and may call nothing but this server.
    let state = db.state_configured(|options| {
        options.trusted_issuers = vec![(ISSUER.into(), provider_jwks())];
        options.smart = Some(SmartAuthorization {
            portal_client_id: None,
            ..provider()
        });
    });
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    assert_eq!(
        call_as_is(&app, get("/portal/config.json")).await.json(),
        json!({})
    );
    let page = call_as_is(&app, get("/portal")).await;
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("connect-src 'self';"), "{policy}");

    // A client id without an authorization endpoint is refused as configuration.
    let broken = SmartAuthorization {
        authorization_endpoint: None,
        capabilities: Vec::new(),
        ..provider()
    };
    assert_eq!(broken.check().unwrap_err().0, "FHIRLEDGER_PORTAL_CLIENT_ID");
}

on_both_backends!(
    portal_launches_at_the_configured_provider,
    preflights_from_configured_origins_are_answered,
    actual_requests_expose_the_headers_apps_need,
    without_origins_there_are_no_cors_headers,
    smart_discovery_names_configured_endpoints,
    backend_services_only_provider_has_no_authorize,
    without_endpoints_nothing_is_claimed,
);
