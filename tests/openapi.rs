//! The committed OpenAPI document is exactly what the server serves. After changing routes,
//! regenerate it with `UPDATE_OPENAPI=1 cargo test --test openapi` and commit the result.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::test;
use common::{TestDb, call, get};

const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");

#[actix_web::test]
async fn committed_document_matches_the_served_one() {
    let db = TestDb::sqlite();
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let reply = call(&app, get("/openapi.json")).await;
    assert_eq!(reply.status, actix_web::http::StatusCode::OK);
    let served = reply.text();

    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(COMMITTED, &served).expect("write openapi/openapi.json");
    }
    let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
    assert!(
        committed == served,
        "openapi/openapi.json differs from GET /openapi.json; run UPDATE_OPENAPI=1 cargo test --test openapi"
    );

    // Every FHIR route is described, with OperationOutcome errors.
    let document: serde_json::Value = serde_json::from_str(&served).unwrap();
    let paths = document["paths"].as_object().unwrap();
    for path in [
        "/fhir/metadata",
        "/fhir/{type}",
        "/fhir/{type}/{id}",
        "/fhir/{type}/{id}/_history",
        "/fhir/{type}/{id}/_history/{vid}",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            paths.contains_key(path),
            "{path} missing from the OpenAPI document"
        );
    }
    // Each type has its own paths, its search taking the parameters the CapabilityStatement
    // lists for it, so that generated clients can search by name.
    assert!(document["servers"][0]["url"].is_string());
    let statement = call(&app, get("/fhir/metadata")).await.json();
    let mut typed = 0;
    for resource in statement["rest"][0]["resource"].as_array().unwrap() {
        let name = resource["type"].as_str().unwrap();
        if name == "AuditEvent" {
            continue;
        }
        let search = &paths[&format!("/fhir/{name}")]["get"];
        let declared: std::collections::BTreeSet<&str> = search["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p["name"].as_str())
            .collect();
        let listed: std::collections::BTreeSet<&str> = resource["searchParam"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(declared, listed, "{name}");
        assert_eq!(search["operationId"], format!("search{name}"));
        for method in ["get", "put", "patch", "delete"] {
            assert!(
                paths[&format!("/fhir/{name}/{{id}}")][method].is_object(),
                "{name} {method}"
            );
        }
        typed += 1;
    }
    assert!(typed > 100, "{typed}");
    assert!(
        paths["/fhir/Patient"]["get"]["parameters"]
            .to_string()
            .contains("\"family\"")
    );
    let created = &paths["/fhir/Observation"]["post"]["responses"]["201"]["headers"];
    for header in ["Location", "ETag", "X-Ledger-Entry"] {
        assert!(created[header].is_object(), "{header}: {created}");
    }
    let read_404 = &document["paths"]["/fhir/{type}/{id}"]["get"]["responses"]["404"];
    assert!(
        read_404.to_string().contains("OperationOutcome"),
        "{read_404}"
    );
}

/// A path of the document with its parameters filled in.
fn concrete(path: &str) -> String {
    let mut concrete = path.to_owned();
    for (parameter, value) in [
        ("{type}", "Patient"),
        ("{compartment}", "Patient"),
        ("{id}", "routed-1"),
        ("{vid}", "1"),
        ("{index}", "0"),
        ("{receipt}", "no-such-receipt"),
        ("{L}", "0"),
        ("{N}", "000"),
    ] {
        concrete = concrete.replace(parameter, value);
    }
    concrete
}

/// Routes and documentation come from one registration: every operation the document lists
/// reaches a handler (whatever the handler then answers, it is not "no such endpoint" or
/// 405), and every other method on a documented path is refused with 405. The per-type
/// paths (`/fhir/Patient/{id}`) document, for generated clients, a part of what the generic
/// paths (`/fhir/{type}/{id}`) serve, so only the generic ones are held to the second rule.
#[actix_web::test]
async fn every_documented_operation_is_routed_and_no_other_method_is() {
    let db = TestDb::sqlite();
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let document = call(&app, get("/openapi.json")).await.json();
    let methods = ["get", "post", "put", "patch", "delete"];
    let mut checked = 0;
    for (path, operations) in document["paths"].as_object().unwrap() {
        let per_type = path
            .strip_prefix("/fhir/")
            .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()));
        let uri = concrete(path);
        for method in methods {
            let request = test::TestRequest::default()
                .method(method.to_uppercase().parse().unwrap())
                .uri(&uri)
                .insert_header(("content-type", "application/fhir+json"))
                .set_payload("{}");
            let reply = call(&app, request).await;
            let text = reply.text();
            if operations.get(method).is_some() {
                assert_ne!(reply.status.as_u16(), 405, "{method} {uri}: {text}");
                assert!(
                    !text.contains("no such endpoint"),
                    "{method} {uri} is documented but not routed: {text}"
                );
                checked += 1;
            } else if !per_type {
                assert_eq!(
                    reply.status.as_u16(),
                    405,
                    "{method} {uri} is not documented but answered: {text}"
                );
            }
        }
    }
    assert!(checked > 500, "{checked} operations checked");
}
