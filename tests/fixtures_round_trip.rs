//! Real-world examples (HL7's R4 examples and US Core) are stored with PUT and read back
//! equal to what was sent, apart from the server-owned meta; the invalid US Core example
//! is refused.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{TestDb, call, fixtures_dir, get, put, read_json, without_server_meta};
use serde_json::Value;

/// Every JSON resource in `folder` that is an object of a type other than Bundle.
fn fixture_resources(folder: &str) -> Vec<(String, Value)> {
    let mut files: Vec<_> = std::fs::read_dir(fixtures_dir().join(folder))
        .unwrap_or_else(|e| panic!("fixtures/{folder}: {e}"))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .filter_map(|path| {
            let value = read_json(&path);
            let name = path.file_name()?.to_string_lossy().into_owned();
            (value.get("resourceType").is_some_and(|t| t != "Bundle")).then_some((name, value))
        })
        .collect()
}

const INVALID_US_CORE_EXAMPLE: &str = "diagnosticreport-cbc.json";

async fn every_example_round_trips(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let mut resources = fixture_resources("fhir/us-core");
    resources.extend(fixture_resources("fhir/hl7-r4"));
    assert!(
        resources.len() > 250,
        "expected the full fixture set, found {}",
        resources.len()
    );

    let mut stored = 0;
    for (file, resource) in &resources {
        let resource_type = resource["resourceType"].as_str().expect("resourceType");
        let id = resource["id"].as_str().expect("every example has an id");
        let path = format!("/fhir/{resource_type}/{id}");
        let reply = call(&app, put(&path, resource)).await;
        if file == INVALID_US_CORE_EXAMPLE {
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{file} must be refused: {}",
                reply.text()
            );
            let issue = reply.outcome_issue();
            assert!(
                issue["expression"][0]
                    .as_str()
                    .is_some_and(|e| e.contains("text")),
                "{issue}"
            );
            continue;
        }
        assert!(
            reply.status == StatusCode::CREATED || reply.status == StatusCode::OK,
            "{file}: PUT answered {}: {}",
            reply.status,
            reply.text()
        );
        let read = call(&app, get(&path)).await;
        assert_eq!(read.status, StatusCode::OK, "{file}: {}", read.text());
        let etag = read.header("etag").expect("etag");
        let version = read.json()["meta"]["versionId"]
            .as_str()
            .expect("versionId")
            .to_owned();
        assert_eq!(etag, format!("W/\"{version}\""));
        assert_eq!(
            without_server_meta(&read.json()),
            without_server_meta(resource),
            "{file} read back differently"
        );
        stored += 1;
    }
    // Examples sharing a type and id (US Core and HL7 both ship Patient/example) become
    // versions of one resource; every one of them was accepted.
    assert_eq!(stored, resources.len() - 1);
}

on_both_backends!(every_example_round_trips);
