//! Transaction and batch Bundles and conditional interactions on both backends: Synthea
//! transaction Bundles and bulk NDJSON (with conditional references) load and resolve, a
//! failing transaction changes nothing and leaves no write in the ledger, HL7's example
//! Bundles behave as the spec says, and conditional create/update/delete give the 0/1/many
//! outcomes.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::collections::BTreeMap;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use common::{TestDb, call, fixtures_dir, get, post, put, read_json, searchset_ids};
use serde_json::{Value, json};

fn statuses(bundle: &Value) -> Vec<String> {
    bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["response"]["status"].as_str().unwrap().to_owned())
        .collect()
}

/// Every `reference` string anywhere in a JSON value.
fn references(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, member) in map {
                match (key.as_str(), member) {
                    ("reference", Value::String(r)) => found.push(r.clone()),
                    _ => references(member, found),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| references(i, found)),
        _ => {}
    }
}

fn counts(db: &TestDb) -> (i64, i64) {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct N {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = db.connect();
    let versions: N = diesel::sql_query("SELECT COUNT(*) AS n FROM resource_versions")
        .get_result(&mut conn)
        .unwrap();
    let entries: N = diesel::sql_query("SELECT COUNT(*) AS n FROM ledger_entries")
        .get_result(&mut conn)
        .unwrap();
    (versions.n, entries.n)
}

async fn synthea_transactions_load_and_resolve(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    for file in [
        "Clemente_Kreiger_1484a42d-0eaf-4654-9cbf-6b050a5cd73b.json",
        "Luigi_Wiegand_e27d88b0-c5e5-4042-ad49-184f6a900ee3.json",
    ] {
        let bundle = read_json(&fixtures_dir().join("fhir/synthea").join(file));
        let reply = call(&app, post("/fhir", &bundle)).await;
        assert_eq!(reply.status, StatusCode::OK, "{file}: {}", reply.text());
        let response = reply.json();
        assert_eq!(response["type"], "transaction-response");
        let entries = bundle["entry"].as_array().unwrap();
        assert_eq!(
            statuses(&response),
            vec!["201 Created"; entries.len()],
            "{file}"
        );

        // Every urn:uuid reference was rewritten to the resource its entry became.
        let mut by_full_url = BTreeMap::new();
        for (entry, answer) in entries.iter().zip(response["entry"].as_array().unwrap()) {
            let location = answer["response"]["location"].as_str().unwrap();
            let local: Vec<&str> = location.split('/').take(2).collect();
            by_full_url.insert(
                entry["fullUrl"].as_str().unwrap().to_owned(),
                local.join("/"),
            );
        }
        let patient = by_full_url
            .values()
            .find(|r| r.starts_with("Patient/"))
            .unwrap()
            .clone();
        for answer in response["entry"].as_array().unwrap() {
            let mut found = Vec::new();
            references(&answer["resource"], &mut found);
            for reference in found {
                assert!(
                    !reference.starts_with("urn:uuid:"),
                    "{file}: {reference} left unresolved"
                );
            }
        }
        // The patient's Observations are found by reference search.
        let observations = entries
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Observation")
            .count();
        let found = call(
            &app,
            get(&format!(
                "/fhir/Observation?subject={patient}&_count=1000&_total=accurate"
            )),
        )
        .await
        .json();
        assert_eq!(found["total"], observations, "{file}");
        let everything_encounters = entries
            .iter()
            .filter(|e| e["resource"]["resourceType"] == "Encounter")
            .count();
        let found = call(&app, get(&format!("/fhir/Encounter?patient={patient}")))
            .await
            .json();
        assert_eq!(searchset_ids(&found).len(), everything_encounters, "{file}");
    }
}

/// Bulk NDJSON as transaction Bundles of PUTs, in an order where conditional references
/// (`Organization?identifier=…`) point at resources already loaded.
async fn bulk_ndjson_loads_with_conditional_references(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let dir = fixtures_dir().join("fhir/synthea/bulk-ndjson");
    let order = [
        "Organization.000.ndjson",
        "Location.000.ndjson",
        "Practitioner.000.ndjson",
        "PractitionerRole.000.ndjson",
        "Patient.000.ndjson",
        "Device.000.ndjson",
        "AllergyIntolerance.000.ndjson",
        "Encounter.first100.ndjson",
        "Condition.first100.ndjson",
        "Immunization.000.ndjson",
        "MedicationRequest.first100.ndjson",
        "Procedure.first100.ndjson",
    ];
    let mut loaded = 0;
    let mut conditional_before = 0;
    for file in order {
        let text = std::fs::read_to_string(dir.join(file)).unwrap();
        let resources: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        for chunk in resources.chunks(50) {
            let entries: Vec<Value> = chunk
                .iter()
                .map(|r| {
                    let mut found = Vec::new();
                    references(r, &mut found);
                    conditional_before += found.iter().filter(|r| r.contains('?')).count();
                    let url = format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap());
                    json!({"fullUrl": format!("urn:uuid:{}", r["id"].as_str().unwrap()), "resource": r, "request": {"method": "PUT", "url": url}})
                })
                .collect();
            let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
            let reply = call(&app, post("/fhir", &bundle)).await;
            assert_eq!(reply.status, StatusCode::OK, "{file}: {}", reply.text());
            loaded += chunk.len();
        }
    }
    assert!(loaded > 600, "{loaded}");
    assert!(conditional_before > 100, "{conditional_before}");
    // No conditional reference is left in anything stored, and they point at real resources.
    let encounters = call(&app, get("/fhir/Encounter?_count=1000")).await.json();
    let mut found = Vec::new();
    references(&encounters, &mut found);
    assert!(!found.is_empty());
    for reference in &found {
        assert!(!reference.contains('?'), "{reference}");
    }
    let organization = found
        .iter()
        .find(|r| r.starts_with("Organization/"))
        .unwrap();
    assert_eq!(
        call(&app, get(&format!("/fhir/{organization}")))
            .await
            .status,
        StatusCode::OK
    );
    let with_provider = call(
        &app,
        get(&format!(
            "/fhir/Encounter?service-provider={organization}&_summary=count"
        )),
    )
    .await
    .json();
    assert!(with_provider["total"].as_i64().unwrap() > 0);
}

async fn failing_transaction_changes_nothing(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let existing = json!({"resourceType": "Patient", "id": "keep", "name": [{"family": "Keep"}]});
    assert_eq!(
        call(&app, put("/fhir/Patient/keep", &existing))
            .await
            .status,
        StatusCode::CREATED
    );
    let before = counts(&db);
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"fullUrl": "urn:uuid:a", "resource": {"resourceType": "Patient", "name": [{"family": "New"}]}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:a"}}, "request": {"method": "POST", "url": "Observation"}},
        {"resource": {"resourceType": "Patient", "id": "keep", "name": [{"family": "Changed"}]}, "request": {"method": "PUT", "url": "Patient/keep", "ifMatch": "W/\"7\""}},
    ]});
    let reply = call(&app, post("/fhir", &bundle)).await;
    assert_eq!(
        reply.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        reply.text()
    );
    let issue = reply.outcome_issue();
    assert_eq!(issue["expression"][0], "Bundle.entry[2]");
    let after = counts(&db);
    assert_eq!(after.0, before.0, "no version written");
    // Only the refusal itself is ledgered: one deny entry, no create/update entries.
    assert_eq!(after.1, before.1 + 1);
    assert_eq!(
        call(&app, get("/fhir/Patient?family=new&_summary=count"))
            .await
            .json()["total"],
        0
    );
    assert_eq!(
        call(&app, get("/fhir/Patient/keep")).await.json()["name"][0]["family"],
        "Keep"
    );

    // An invalid resource in entry 1 fails the transaction before anything runs.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient"}, "request": {"method": "POST", "url": "Patient"}},
        {"resource": {"resourceType": "Patient", "gender": "unknown-value"}, "request": {"method": "POST", "url": "Patient"}},
    ]});
    let reply = call(&app, post("/fhir", &bundle)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.outcome_issue()["expression"][0], "Bundle.entry[1]");
    assert_eq!(counts(&db).0, before.0);
    // A reference to a full URL that is not in the Bundle.
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:missing"}}, "request": {"method": "POST", "url": "Observation"}},
    ]});
    assert_eq!(
        call(&app, post("/fhir", &bundle)).await.status,
        StatusCode::BAD_REQUEST
    );
    for bad in [
        json!({"resourceType": "Patient"}),
        json!({"resourceType": "Bundle", "type": "collection"}),
        json!({"resourceType": "Bundle", "type": "batch", "entry": [{"resource": {"resourceType": "Patient"}}]}),
    ] {
        assert_eq!(
            call(&app, post("/fhir", &bad)).await.status,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    assert_eq!(counts(&db).0, before.0);
}

async fn hl7_transaction_example(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let mut bundle = read_json(&fixtures_dir().join("fhir/hl7-r4/Bundle-bundle-transaction.json"));
    // As published it asks for an operation ($lookup) inside the transaction, which this
    // server does not support: the whole transaction is refused and nothing is written.
    let before = counts(&db);
    let reply = call(&app, post("/fhir", &bundle)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply.outcome_issue()["expression"][0]
            .as_str()
            .unwrap()
            .starts_with("Bundle.entry[")
    );
    assert_eq!(counts(&db).0, before.0);

    // Without that entry, and with the resources its conditions and If-Match expect.
    let entries = bundle["entry"].as_array_mut().unwrap();
    entries.retain(|e| e["request"]["url"] != "ValueSet/$lookup");
    for (id, versions) in [("123a", 2), ("234", 1), ("12334", 4)] {
        for _ in 0..versions {
            call(
                &app,
                put(
                    &format!("/fhir/Patient/{id}"),
                    &json!({"resourceType": "Patient", "id": id}),
                ),
            )
            .await;
        }
    }
    call(
        &app,
        post(
            "/fhir/Patient",
            &json!({"resourceType": "Patient", "identifier": [{"value": "123456"}]}),
        ),
    )
    .await;
    let reply = call(&app, post("/fhir", &bundle)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let response = reply.json();
    assert_eq!(
        statuses(&response),
        [
            "201 Created",      // POST Patient
            "201 Created",      // POST with If-None-Exist: nothing matched
            "201 Created",      // PUT Patient/123: new
            "201 Created",      // conditional PUT: nothing matched
            "200 OK",           // PUT Patient/123a with If-Match W/"2"
            "204 No Content",   // DELETE Patient/234
            "204 No Content",   // conditional DELETE
            "200 OK",           // GET Patient?name=peter
            "304 Not Modified", // GET Patient/12334 with If-None-Match W/"4"
        ]
    );
    assert_eq!(response["entry"][7]["resource"]["type"], "searchset");
    assert_eq!(
        call(&app, get("/fhir/Patient/234")).await.status,
        StatusCode::GONE
    );
    assert_eq!(
        call(&app, get("/fhir/Patient?identifier=123456&_summary=count"))
            .await
            .json()["total"],
        0
    );
    // The same transaction again: the If-None-Exist create now finds its match (200).
    let again = call(&app, post("/fhir", &bundle)).await;
    assert_ne!(again.status, StatusCode::INTERNAL_SERVER_ERROR);
}

async fn hl7_batch_example(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let patient = read_json(&fixtures_dir().join("fhir/hl7-r4/Patient-example.json"));
    assert_eq!(
        call(&app, put("/fhir/Patient/example", &patient))
            .await
            .status,
        StatusCode::CREATED
    );
    let batch =
        read_json(&fixtures_dir().join("fhir/hl7-r4/Bundle-bundle-request-medsallergies.json"));
    let expected =
        read_json(&fixtures_dir().join("fhir/hl7-r4/Bundle-bundle-response-medsallergies.json"));

    // Strict: each entry stands alone; the `_list` and STU3 `notgiven` searches are refused
    // in their own entries, the read succeeds.
    let reply = call(&app, post("/fhir", &batch)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let response = reply.json();
    assert_eq!(response["type"], "batch-response");
    let got = statuses(&response);
    assert_eq!(got[0], "200 OK");
    assert_eq!(response["entry"][0]["resource"]["id"], "example");
    for (i, status) in got.iter().enumerate().skip(1) {
        assert_eq!(status, "400 Bad Request", "entry {i}");
        assert_eq!(
            response["entry"][i]["response"]["outcome"]["resourceType"],
            "OperationOutcome"
        );
    }

    // Lenient: unsupported parameters are ignored, and the response has the shape HL7
    // gives beside the example: a Patient, then a searchset per search.
    let reply = call(
        &app,
        post("/fhir", &batch).insert_header(("Prefer", "handling=lenient")),
    )
    .await;
    let response = reply.json();
    let expected_entries = expected["entry"].as_array().unwrap();
    assert_eq!(
        response["entry"].as_array().unwrap().len(),
        expected_entries.len()
    );
    for (got, want) in response["entry"]
        .as_array()
        .unwrap()
        .iter()
        .zip(expected_entries)
    {
        assert_eq!(
            got["response"]["status"]
                .as_str()
                .unwrap()
                .split(' ')
                .next(),
            want["response"]["status"].as_str()
        );
        assert_eq!(
            got["resource"]["resourceType"],
            want["resource"]["resourceType"]
        );
    }
}

async fn conditional_interactions(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let patient = |family: &str| json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "42"}], "name": [{"family": family}]});
    let create = |body: Value| {
        post("/fhir/Patient", &body).insert_header(("If-None-Exist", "identifier=urn:mrn|42"))
    };

    let first = call(&app, create(patient("One"))).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let id = first.json()["id"].as_str().unwrap().to_owned();
    let second = call(&app, create(patient("Two"))).await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(second.json()["id"], id.as_str());
    assert_eq!(
        second.json()["name"][0]["family"],
        "One",
        "nothing was written"
    );
    call(&app, post("/fhir/Patient", &patient("Dup"))).await;
    assert_eq!(
        call(&app, create(patient("Three"))).await.status,
        StatusCode::PRECONDITION_FAILED
    );
    let bad = call(
        &app,
        post("/fhir/Patient", &patient("x")).insert_header(("If-None-Exist", "nonsense=1")),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    // Conditional update: 0 matches creates, 1 updates, 2 is 412.
    let body = json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "7"}], "name": [{"family": "Seven"}]});
    let made = call(&app, put("/fhir/Patient?identifier=urn:mrn|7", &body)).await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.text());
    let seven = made.json()["id"].as_str().unwrap().to_owned();
    let mut changed = body.clone();
    changed["name"][0]["family"] = json!("Sieben");
    let updated = call(&app, put("/fhir/Patient?identifier=urn:mrn|7", &changed)).await;
    assert_eq!(updated.status, StatusCode::OK);
    assert_eq!(updated.json()["id"], seven.as_str());
    assert_eq!(updated.json()["meta"]["versionId"], "2");
    assert_eq!(
        call(&app, put("/fhir/Patient?identifier=urn:mrn|42", &body))
            .await
            .status,
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        call(&app, put("/fhir/Patient", &body)).await.status,
        StatusCode::BAD_REQUEST
    );

    // Conditional delete.
    let reply = call(
        &app,
        TestRequest::delete().uri("/fhir/Patient?identifier=urn:mrn|42"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::PRECONDITION_FAILED);
    let reply = call(
        &app,
        TestRequest::delete().uri("/fhir/Patient?identifier=urn:mrn|7"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(
        call(&app, get(&format!("/fhir/Patient/{seven}")))
            .await
            .status,
        StatusCode::GONE
    );
    let reply = call(
        &app,
        TestRequest::delete().uri("/fhir/Patient?identifier=urn:mrn|7"),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::NO_CONTENT,
        "nothing matches any more"
    );
}

async fn concurrent_conditional_creates_make_one_resource(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let body =
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:race", "value": "1"}]});
    let requests = (0..8).map(|_| {
        call(
            &app,
            post("/fhir/Patient", &body).insert_header(("If-None-Exist", "identifier=urn:race|1")),
        )
    });
    let replies = futures_util::future::join_all(requests).await;
    let created = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    let found = replies
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!((created, found), (1, 7));
    assert_eq!(
        call(
            &app,
            get("/fhir/Patient?identifier=urn:race|1&_summary=count")
        )
        .await
        .json()["total"],
        1
    );
}

on_both_backends!(
    synthea_transactions_load_and_resolve,
    bulk_ndjson_loads_with_conditional_references,
    failing_transaction_changes_nothing,
    hl7_transaction_example,
    hl7_batch_example,
    conditional_interactions,
    concurrent_conditional_creates_make_one_resource,
);
