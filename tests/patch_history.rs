//! PATCH (JSON Patch, http.html#patch) and type- and system-level history
//! (http.html#history): the patch oracle over the shared RFC 6902 cases, and both
//! interactions end to end on both backends.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::collections::BTreeSet;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use common::{Reply, TestDb, call, get, post, put};
use fhirledger::fhir::patch::{PatchError, apply_json_patch, parse_json_patch};
use serde_json::{Value, json};

const PATCH_CASES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/fhir/patch-tests/json-patch-tests.json"
);

/// Every case of the shared JSON Patch suite: `expected` cases give exactly that document,
/// `error` cases fail (as a malformed document or as an operation that cannot be applied)
/// and never panic.
#[test]
fn json_patch_oracle() {
    let cases = common::read_json(std::path::Path::new(PATCH_CASES));
    let cases = cases.as_array().expect("the suite is an array of cases");
    assert!(!cases.is_empty());
    for case in cases {
        let comment = case["comment"].as_str().unwrap_or("(no comment)");
        if case["disabled"] == json!(true) {
            continue;
        }
        let body = serde_json::to_vec(&case["patch"]).unwrap();
        let result =
            parse_json_patch(&body).and_then(|patch| apply_json_patch(&case["doc"], &patch));
        match (case.get("expected"), case.get("error")) {
            (Some(expected), _) => match result {
                Ok(patched) => assert_eq!(&patched, expected, "{comment}"),
                Err(e) => panic!("{comment}: expected success, got {e}"),
            },
            (None, Some(error)) => match result {
                Ok(patched) => panic!("{comment}: expected error {error}, got {patched}"),
                Err(PatchError::Malformed(message)) => assert!(!message.is_empty(), "{comment}"),
                Err(PatchError::Unprocessable(e)) => {
                    assert!(e.expression.is_some(), "{comment}: {}", e.message)
                }
                Err(PatchError::TooLarge(message)) => {
                    panic!("{comment}: a small case hit a bound: {message}")
                }
            },
            (None, None) => panic!("{comment}: a case needs expected or error"),
        }
    }
}

fn json_patch(path: &str, operations: &Value) -> TestRequest {
    TestRequest::patch()
        .uri(path)
        .insert_header(("Content-Type", "application/json-patch+json"))
        .set_payload(serde_json::to_vec(operations).unwrap())
}

fn etag(reply: &Reply) -> String {
    reply.header("etag").unwrap_or_default()
}

/// The ledger entry a response produced (by its receipt).
async fn ledger_entry<S, B>(app: &S, reply: &Reply) -> Value
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let receipt = reply
        .header("x-ledger-entry")
        .unwrap_or_else(|| panic!("no receipt on {}: {}", reply.status, reply.text()));
    let resolved = call(app, get(&format!("/ledger/receipts/{receipt}"))).await;
    assert_eq!(resolved.status, StatusCode::OK, "{}", resolved.text());
    resolved.json()["entry"].clone()
}

async fn patch_interaction(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let body = json!({"resourceType": "Patient", "id": "p1", "active": true,
        "name": [{"family": "Before", "given": ["Test"]}], "gender": "female"});
    let created = call(&app, put("/fhir/Patient/p1", &body)).await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());

    // Success: a new version with the patched content, stored, ledgered as an update.
    let ops = json!([
        {"op": "test", "path": "/name/0/family", "value": "Before"},
        {"op": "replace", "path": "/name/0/family", "value": "After"},
        {"op": "remove", "path": "/active"},
        {"op": "add", "path": "/birthDate", "value": "1970-01-02"}
    ]);
    let patched = call(
        &app,
        json_patch("/fhir/Patient/p1", &ops).insert_header(("If-Match", "W/\"1\"")),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    assert_eq!(etag(&patched), "W/\"2\"");
    assert!(
        patched
            .header("location")
            .unwrap()
            .ends_with("/fhir/Patient/p1/_history/2")
    );
    let patched_body = patched.json();
    assert_eq!(patched_body["name"][0]["family"], "After");
    assert_eq!(patched_body["birthDate"], "1970-01-02");
    assert!(patched_body.get("active").is_none());
    assert_eq!(patched_body["meta"]["versionId"], "2");
    let read = call(&app, get("/fhir/Patient/p1")).await;
    assert_eq!(
        read.body, patched.body,
        "what PATCH returned is what is stored"
    );
    let entry = ledger_entry(&app, &patched).await;
    assert_eq!(entry["action"], "update");
    assert_eq!(entry["outcome"], "permit");
    assert_eq!(entry["resources"][0]["versionId"], "2");
    assert!(entry["resources"][0]["contentHash"].is_string());
    let history = call(&app, get("/fhir/Patient/p1/_history")).await.json();
    assert_eq!(history["entry"][0]["request"]["method"], "PATCH");
    assert_eq!(history["entry"][0]["request"]["url"], "Patient/p1");
    assert_eq!(history["entry"][0]["response"]["status"], "200 OK");

    // Prefer: return=minimal as for update.
    let minimal = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([{"op": "replace", "path": "/gender", "value": "male"}]),
        )
        .insert_header(("Prefer", "return=minimal")),
    )
    .await;
    assert_eq!(minimal.status, StatusCode::OK, "{}", minimal.text());
    assert!(minimal.body.is_empty());
    assert_eq!(etag(&minimal), "W/\"3\"");

    // Failures write nothing: the resource stays at version 3.
    let failed_test = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([
                {"op": "test", "path": "/name/0/family", "value": "Before"},
                {"op": "replace", "path": "/name/0/family", "value": "Never"}
            ]),
        ),
    )
    .await;
    assert_eq!(
        failed_test.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        failed_test.text()
    );
    assert_eq!(failed_test.outcome_issue()["code"], "processing");
    let denied = ledger_entry(&app, &failed_test).await;
    assert_eq!(denied["outcome"], "deny");

    let bad_path = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([{"op": "remove", "path": "/telecom/0"}]),
        ),
    )
    .await;
    assert_eq!(
        bad_path.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        bad_path.text()
    );

    let invalid_result = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([{"op": "add", "path": "/gender", "value": "sometimes"}]),
        ),
    )
    .await;
    assert_eq!(
        invalid_result.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        invalid_result.text()
    );
    let unknown_element = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([{"op": "add", "path": "/favouriteColour", "value": "red"}]),
        ),
    )
    .await;
    assert_eq!(
        unknown_element.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        unknown_element.text()
    );

    for (op, expression) in [
        (
            json!({"op": "replace", "path": "/id", "value": "p2"}),
            "Patient.id",
        ),
        (json!({"op": "remove", "path": "/id"}), "Patient.id"),
        (
            json!({"op": "replace", "path": "/resourceType", "value": "Group"}),
            "resourceType",
        ),
    ] {
        let reply = call(&app, json_patch("/fhir/Patient/p1", &json!([op]))).await;
        assert_eq!(
            reply.status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{op}: {}",
            reply.text()
        );
        assert_eq!(reply.outcome_issue()["expression"][0], expression, "{op}");
    }

    for malformed in [
        &b"{\"op\": \"add\"}"[..],
        b"[{\"op\": \"frobnicate\", \"path\": \"/a\"}]",
        b"[{\"op\": \"add\", \"path\": \"/a\"}]",
        b"not json",
    ] {
        let reply = call(
            &app,
            TestRequest::patch()
                .uri("/fhir/Patient/p1")
                .insert_header(("Content-Type", "application/json-patch+json"))
                .set_payload(malformed),
        )
        .await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
        assert_eq!(reply.outcome_issue()["severity"], "error");
    }

    let stale = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([{"op": "replace", "path": "/gender", "value": "other"}]),
        )
        .insert_header(("If-Match", "W/\"1\"")),
    )
    .await;
    assert_eq!(
        stale.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        stale.text()
    );

    // XML Patch and other media types: 415 naming the two formats accepted.
    let xml = call(
        &app,
        TestRequest::patch()
            .uri("/fhir/Patient/p1")
            .insert_header(("Content-Type", "application/xml-patch+xml"))
            .set_payload("<diff/>"),
    )
    .await;
    assert_eq!(xml.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let issue = xml.outcome_issue();
    let diagnostics = issue["diagnostics"].as_str().unwrap();
    assert!(
        diagnostics.contains("application/json-patch+json")
            && diagnostics.contains("application/fhir+json"),
        "{issue}"
    );
    let untyped = call(
        &app,
        TestRequest::patch()
            .uri("/fhir/Patient/p1")
            .set_payload("[]"),
    )
    .await;
    assert_eq!(untyped.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let after = call(&app, get("/fhir/Patient/p1")).await;
    assert_eq!(etag(&after), "W/\"3\"", "no failed patch wrote a version");
    assert_eq!(after.json()["name"][0]["family"], "After");
    let versions = call(&app, get("/fhir/Patient/p1/_history")).await.json();
    assert_eq!(versions["total"], 3);

    // Missing → 404, deleted → 410 (nothing written).
    let missing = call(
        &app,
        json_patch(
            "/fhir/Patient/nobody",
            &json!([{"op": "remove", "path": "/active"}]),
        ),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND, "{}", missing.text());
    let deleted = call(&app, TestRequest::delete().uri("/fhir/Patient/p1")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = call(
        &app,
        json_patch(
            "/fhir/Patient/p1",
            &json!([{"op": "replace", "path": "/gender", "value": "male"}]),
        ),
    )
    .await;
    assert_eq!(gone.status, StatusCode::GONE, "{}", gone.text());
    assert_eq!(gone.outcome_issue()["code"], "deleted");
    assert_eq!(
        call(&app, get("/fhir/Patient/p1/_history")).await.json()["total"],
        4
    );

    // Body size limit as for update.
    let small = test::init_service(fhirledger::api::build_app(
        db.state_with(fhirledger::crypto::MasterKey::generate(), 256),
    ))
    .await;
    let huge = json!([{"op": "add", "path": "/gender", "value": "x".repeat(1024)}]);
    assert_eq!(
        call(&small, json_patch("/fhir/Patient/p1", &huge))
            .await
            .status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
}

/// Concurrent patches each apply to the version they find: none is lost, none is applied
/// to a stale version.
async fn concurrent_patches_lose_nothing(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let body = json!({"resourceType": "Patient", "id": "many", "name": [{"family": "Base"}]});
    assert!(
        call(&app, put("/fhir/Patient/many", &body))
            .await
            .status
            .is_success()
    );
    let writers = 8;
    // `given` must exist for `add /name/0/given/-`.
    let init = call(
        &app,
        json_patch(
            "/fhir/Patient/many",
            &json!([{"op": "add", "path": "/name/0/given", "value": ["g"]}]),
        ),
    )
    .await;
    assert_eq!(init.status, StatusCode::OK, "{}", init.text());
    let requests = (0..writers).map(|i| {
        call(
            &app,
            json_patch(
                "/fhir/Patient/many",
                &json!([{"op": "add", "path": "/name/0/given/-", "value": format!("g{i}")}]),
            ),
        )
    });
    let replies = futures_util::future::join_all(requests).await;
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let current = call(&app, get("/fhir/Patient/many")).await.json();
    let given = current["name"][0]["given"].as_array().unwrap();
    assert_eq!(
        given.len(),
        writers + 1,
        "every patch applied to the latest version: {given:?}"
    );
    assert_eq!(current["meta"]["versionId"], (writers + 2).to_string());
}

/// Follows `next` links from `url`, returning every entry seen; `between` runs after the
/// first page.
async fn all_pages<S, B>(app: &S, url: &str, between: Option<(&str, Value)>) -> Vec<Value>
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let mut between = between;
    let mut seen = Vec::new();
    let mut url = url.to_owned();
    loop {
        let page = call(app, get(&url)).await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let bundle = page.json();
        assert_eq!(bundle["type"], "history");
        // One ledger entry per page (with a part per patient when they are several),
        // naming every version it disclosed.
        let page_entries = common::ledger_entries(app, &page).await;
        assert!(page_entries.iter().all(|e| e["action"] == "history"));
        let mut disclosed: Vec<String> = page_entries
            .iter()
            .flat_map(|e| e["resources"].as_array().unwrap().clone())
            .map(|r| format!("{}/{}/{}", r["type"], r["id"], r["versionId"]).replace('"', ""))
            .collect();
        disclosed.sort();
        let entries = bundle["entry"].as_array().cloned().unwrap_or_default();
        let mut with_content: Vec<String> = entries
            .iter()
            .filter(|e| e.get("resource").is_some())
            .map(|e| {
                format!(
                    "{}/{}/{}",
                    e["resource"]["resourceType"].as_str().unwrap(),
                    e["resource"]["id"].as_str().unwrap(),
                    e["resource"]["meta"]["versionId"].as_str().unwrap()
                )
            })
            .collect();
        with_content.sort();
        assert_eq!(disclosed, with_content);
        seen.extend(entries);
        if let Some((path, body)) = between.take() {
            assert!(call(app, put(path, &body)).await.status.is_success());
        }
        let next = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
            .map(|l| l["url"].as_str().unwrap().to_owned());
        match next {
            Some(next) => url = next.strip_prefix(common::BASE_URL).unwrap().to_owned(),
            None => return seen,
        }
    }
}

/// `Type/id/version` of a history entry (deletions have no resource: from fullUrl and etag).
fn version_name(entry: &Value) -> String {
    let full_url = entry["fullUrl"].as_str().unwrap();
    let tail: Vec<&str> = full_url.rsplitn(3, '/').collect();
    let version = entry["response"]["etag"]
        .as_str()
        .unwrap()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_owned();
    format!("{}/{}/{version}", tail[1], tail[0])
}

async fn type_and_system_history(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    // Versions of several resources and types, in this order.
    let mut written = Vec::new();
    for (path, body) in [
        (
            "/fhir/Patient/a",
            json!({"resourceType": "Patient", "id": "a", "gender": "female"}),
        ),
        (
            "/fhir/Patient/b",
            json!({"resourceType": "Patient", "id": "b", "gender": "male"}),
        ),
        (
            "/fhir/Observation/o",
            json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/a"}}),
        ),
        (
            "/fhir/Patient/a",
            json!({"resourceType": "Patient", "id": "a", "gender": "other"}),
        ),
    ] {
        let reply = call(&app, put(path, &body)).await;
        assert!(reply.status.is_success(), "{}", reply.text());
        written.push(reply);
    }
    let since = written[2].json()["meta"]["lastUpdated"]
        .as_str()
        .unwrap()
        .to_owned();
    let deleted = call(&app, TestRequest::delete().uri("/fhir/Patient/b")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let created = call(
        &app,
        post("/fhir/Patient", &json!({"resourceType": "Patient"})),
    )
    .await;
    let new_id = created.json()["id"].as_str().unwrap().to_owned();

    // System level: every version, newest first; the deletion without a resource.
    let system = call(&app, get("/fhir/_history")).await;
    assert_eq!(system.status, StatusCode::OK, "{}", system.text());
    let bundle = system.json();
    assert_eq!(bundle["type"], "history");
    assert!(bundle.get("total").is_none(), "total is not counted here");
    let entries = bundle["entry"].as_array().unwrap();
    let names: Vec<String> = entries.iter().map(version_name).collect();
    assert_eq!(
        names,
        [
            format!("Patient/{new_id}/1"),
            "Patient/b/2".into(),
            "Patient/a/2".into(),
            "Observation/o/1".into(),
            "Patient/b/1".into(),
            "Patient/a/1".into(),
        ]
    );
    assert_eq!(entries[0]["request"]["method"], "POST");
    assert_eq!(entries[0]["request"]["url"], "Patient");
    assert_eq!(entries[1]["request"]["method"], "DELETE");
    assert!(entries[1].get("resource").is_none());
    assert_eq!(entries[1]["response"]["status"], "204 No Content");
    assert_eq!(entries[2]["request"]["method"], "PUT");
    assert_eq!(entries[2]["resource"]["gender"], "other");
    assert_eq!(
        entries[3]["fullUrl"],
        format!("{}/fhir/Observation/o", common::BASE_URL)
    );
    let self_link = &bundle["link"][0];
    assert_eq!(self_link["relation"], "self");
    assert!(
        self_link["url"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}/fhir/_history?", common::BASE_URL))
    );
    let entries = common::ledger_entries(&app, &system).await;
    assert!(entries.iter().all(|e| e["action"] == "history"));
    let disclosed: BTreeSet<String> = entries
        .iter()
        .flat_map(|e| e["resources"].as_array().unwrap().clone())
        .map(|r| format!("{}/{}/{}", r["type"], r["id"], r["versionId"]))
        .collect();
    assert_eq!(disclosed.len(), 5, "the deletion discloses nothing");

    // Type level: only that type.
    let patients = call(&app, get("/fhir/Patient/_history")).await.json();
    let names: Vec<String> = patients["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(version_name)
        .collect();
    assert_eq!(
        names,
        [
            format!("Patient/{new_id}/1"),
            "Patient/b/2".into(),
            "Patient/a/2".into(),
            "Patient/b/1".into(),
            "Patient/a/1".into(),
        ]
    );
    let observations = call(&app, get("/fhir/Observation/_history")).await.json();
    assert_eq!(observations["entry"].as_array().unwrap().len(), 1);
    let encounters = call(&app, get("/fhir/Encounter/_history")).await;
    assert_eq!(encounters.status, StatusCode::OK);
    assert!(encounters.json().get("entry").is_none());

    // _since: versions at or after that instant.
    let recent = call(
        &app,
        get(&format!(
            "/fhir/_history?_since={}",
            since.replace('+', "%2B")
        )),
    )
    .await;
    assert_eq!(recent.status, StatusCode::OK, "{}", recent.text());
    let names: Vec<String> = recent.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(version_name)
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert_eq!(names.last().unwrap(), "Observation/o/1");
    let future = call(
        &app,
        get("/fhir/Patient/_history?_since=2999-01-01T00:00:00Z"),
    )
    .await
    .json();
    assert!(future.get("entry").is_none());

    // Paging: every version exactly once, also when a write lands between pages (the new
    // version sorts before the cursor, so it is on no later page).
    let before: Vec<String> = all_pages(&app, "/fhir/_history?_count=2", None)
        .await
        .iter()
        .map(version_name)
        .collect();
    assert_eq!(before.len(), 6);
    let during: Vec<String> = all_pages(
        &app,
        "/fhir/_history?_count=2",
        Some((
            "/fhir/Patient/a",
            json!({"resourceType": "Patient", "id": "a"}),
        )),
    )
    .await
    .iter()
    .map(version_name)
    .collect();
    assert_eq!(during, before);
    let typed: Vec<String> = all_pages(&app, "/fhir/Patient/_history?_count=1", None)
        .await
        .iter()
        .map(version_name)
        .collect();
    assert_eq!(typed.first().unwrap(), "Patient/a/3");
    assert_eq!(typed.len(), 6);
    let mut unique = typed.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), typed.len());

    // Errors: unknown or malformed parameters 400, unknown type 404, other methods 405.
    for url in [
        "/fhir/_history?_sort=x",
        "/fhir/Patient/_history?name=x",
        "/fhir/_history?_count=0",
        "/fhir/_history?_count=1001",
        "/fhir/_history?_since=yesterday",
        "/fhir/_history?_cursor=garbage",
        "/fhir/_history?_cursor=1_1_Nothing_a",
        "/fhir/_history?_before_version=2",
    ] {
        let reply = call(&app, get(url)).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{url}: {}",
            reply.text()
        );
        assert_eq!(reply.outcome_issue()["code"], "invalid", "{url}");
    }
    assert_eq!(
        call(&app, get("/fhir/Nothing/_history")).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(
            &app,
            post("/fhir/_history", &json!({"resourceType": "Patient"}))
        )
        .await
        .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        call(&app, TestRequest::delete().uri("/fhir/Patient/_history"))
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

/// FHIRPath Patch over HTTP and inside a transaction: applied, validated, stored as the
/// next version and ledgered as an update, like a JSON Patch.
async fn fhirpath_patch_interaction(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let body = json!({"resourceType": "Patient", "id": "fp", "birthDate": "1920-01-01",
        "name": [{"family": "Before"}]});
    assert_eq!(
        call(&app, put("/fhir/Patient/fp", &body)).await.status,
        StatusCode::CREATED
    );
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "replace"},
            {"name": "path", "valueString": "Patient.birthDate"},
            {"name": "value", "valueDate": "1930-01-01"}]},
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "deceased"},
            {"name": "value", "valueBoolean": false}]},
        {"name": "operation", "part": [
            {"name": "type", "valueCode": "add"},
            {"name": "path", "valueString": "Patient"},
            {"name": "name", "valueString": "contact"},
            {"name": "value", "part": [
                {"name": "name", "valueHumanName": {"family": "Kin"}},
                {"name": "telecom", "valueContactPoint": {"system": "phone", "value": "1"}}]}]}]});
    let patched = call(
        &app,
        TestRequest::patch()
            .uri("/fhir/Patient/fp")
            .insert_header(("Content-Type", "application/fhir+json"))
            .set_payload(serde_json::to_vec(&parameters).unwrap()),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{}", patched.text());
    let resource = patched.json();
    assert_eq!(resource["birthDate"], "1930-01-01");
    assert_eq!(
        resource["deceasedBoolean"], false,
        "a choice element gets its type"
    );
    assert_eq!(
        resource["contact"][0]["name"]["family"], "Kin",
        "a list, with a single name"
    );
    assert_eq!(resource["contact"][0]["telecom"][0]["value"], "1");
    assert_eq!(resource["meta"]["versionId"], "2");
    let entry = ledger_entry(&app, &patched).await;
    assert_eq!(entry["action"], "update");

    // A path that matches nothing: 422, nothing written.
    let missing = json!({"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
        {"name": "type", "valueCode": "replace"},
        {"name": "path", "valueString": "Patient.gender"},
        {"name": "value", "valueCode": "male"}]}]});
    let reply = call(
        &app,
        TestRequest::patch()
            .uri("/fhir/Patient/fp")
            .insert_header(("Content-Type", "application/fhir+json"))
            .set_payload(serde_json::to_vec(&missing).unwrap()),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );

    // In a transaction the Parameters resource is the entry's resource.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [{
        "resource": {"resourceType": "Parameters", "parameter": [{"name": "operation", "part": [
            {"name": "type", "valueCode": "delete"},
            {"name": "path", "valueString": "Patient.contact"}]}]},
        "request": {"method": "PATCH", "url": "Patient/fp"}}]});
    let reply = call(&app, post("/fhir", &bundle)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let read = call(&app, get("/fhir/Patient/fp")).await.json();
    assert!(read.get("contact").is_none(), "{read}");
    assert_eq!(read["meta"]["versionId"], "3");
}

on_both_backends!(
    fhirpath_patch_interaction,
    patch_interaction,
    concurrent_patches_lose_nothing,
    type_and_system_history,
);
