//! `Patient/{id}/$everything` end to end on both backends: exactly the patient's
//! compartment (R4 Patient CompartmentDefinition, also through parameters other than
//! `subject`), paging, `_type`/`_since`, deletions, 404/410/400, the ledger entry; and that
//! every search parameter the CapabilityStatement lists is accepted by a search.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use common::{TestDb, call, create_each, get, link, local, put};
use serde_json::{Value, json};

/// `Type/id` of every entry, in order.
fn entry_keys(bundle: &Value) -> Vec<String> {
    assert_eq!(bundle["type"], "searchset", "{bundle}");
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| {
                    assert_eq!(e["search"]["mode"], "match", "{e}");
                    format!(
                        "{}/{}",
                        e["resource"]["resourceType"].as_str().unwrap(),
                        e["resource"]["id"].as_str().unwrap()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| (*k).to_owned()).collect()
}

/// What patient `pa` owns: every way into the compartment the test exercises.
const A_RECORD: &[&str] = &[
    "Patient/pa",
    "Observation/oa1",
    "Observation/oa2",
    "Observation/shared",
    "Condition/ca1",
    "Encounter/ea1",
    "AllergyIntolerance/aa1",
    "Patient/pa-linked",
];

async fn seed<S, B>(app: &S)
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let code = json!({"coding": [{"system": "http://loinc.org", "code": "8302-2"}]});
    let observation = |id: &str, subject: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final", "code": code,
               "subject": {"reference": subject}})
    };
    let condition = |id: &str, subject: &str| {
        json!({"resourceType": "Condition", "id": id, "subject": {"reference": subject},
               "code": {"text": "x"}})
    };
    let encounter = |id: &str, subject: &str| {
        json!({"resourceType": "Encounter", "id": id, "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
               "subject": {"reference": subject}})
    };
    let mut shared = observation("shared", "Patient/pb");
    // In A's compartment through `performer`, in B's through `subject`.
    shared["performer"] = json!([{"reference": "Patient/pa"}]);
    let resources = [
        json!({"resourceType": "Patient", "id": "pa", "name": [{"family": "Alpha"}]}),
        json!({"resourceType": "Patient", "id": "pb", "name": [{"family": "Beta"}]}),
        // Another Patient record linked to pa (Patient.link, the `link` parameter).
        json!({"resourceType": "Patient", "id": "pa-linked",
               "link": [{"other": {"reference": "Patient/pa"}, "type": "seealso"}]}),
        json!({"resourceType": "Practitioner", "id": "dr", "name": [{"family": "Doctor"}]}),
        observation("oa1", "Patient/pa"),
        // An absolute reference to this server counts as the same patient.
        observation("oa2", "http://fhir.test/fhir/Patient/pa"),
        observation("ob1", "Patient/pb"),
        observation("odr", "Practitioner/dr"),
        shared,
        condition("ca1", "Patient/pa"),
        condition("cb1", "Patient/pb"),
        encounter("ea1", "Patient/pa"),
        encounter("eb1", "Patient/pb"),
        json!({"resourceType": "AllergyIntolerance", "id": "aa1",
               "patient": {"reference": "Patient/pa"}}),
        json!({"resourceType": "AllergyIntolerance", "id": "ab1",
               "patient": {"reference": "Patient/pb"}}),
        // Deleted below: must not appear.
        observation("oa-deleted", "Patient/pa"),
    ];
    create_each(app, resources).await;
    let deleted = call(
        app,
        TestRequest::delete().uri("/fhir/Observation/oa-deleted"),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
}

async fn returns_exactly_the_patients_compartment(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;

    let reply = call(&app, get("/fhir/Patient/pa/$everything")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .unwrap()
            .starts_with("application/fhir+json")
    );
    let bundle = reply.json();
    let keys = entry_keys(&bundle);
    assert_eq!(keys.first().map(String::as_str), Some("Patient/pa"));
    let unique: BTreeSet<String> = keys.iter().cloned().collect();
    assert_eq!(unique.len(), keys.len(), "each resource once: {keys:?}");
    assert_eq!(unique, set(A_RECORD));
    assert_eq!(link(&bundle, "next"), None);
    assert_eq!(
        bundle["entry"][0]["fullUrl"],
        "http://fhir.test/fhir/Patient/pa"
    );

    let b = entry_keys(&call(&app, get("/fhir/Patient/pb/$everything")).await.json());
    assert_eq!(
        b.into_iter().collect::<BTreeSet<_>>(),
        set(&[
            "Patient/pb",
            "Observation/ob1",
            "Observation/shared",
            "Condition/cb1",
            "Encounter/eb1",
            "AllergyIntolerance/ab1",
        ])
    );

    // `_type` restricts the types (the patient too, when not named).
    let only = entry_keys(
        &call(
            &app,
            get("/fhir/Patient/pa/$everything?_type=Observation,Encounter"),
        )
        .await
        .json(),
    );
    assert_eq!(
        only.into_iter().collect::<BTreeSet<_>>(),
        set(&[
            "Observation/oa1",
            "Observation/oa2",
            "Observation/shared",
            "Encounter/ea1"
        ])
    );

    // Deleting a member takes it out; updating one keeps it once.
    let deleted = call(&app, TestRequest::delete().uri("/fhir/Condition/ca1")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let updated = call(
        &app,
        put(
            "/fhir/Observation/oa1",
            &json!({"resourceType": "Observation", "id": "oa1", "status": "amended",
                    "code": {"text": "y"}, "subject": {"reference": "Patient/pa"}}),
        ),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK);
    let after = call(&app, get("/fhir/Patient/pa/$everything")).await.json();
    let after_keys = entry_keys(&after);
    assert!(!after_keys.contains(&"Condition/ca1".to_owned()));
    assert_eq!(
        after_keys
            .iter()
            .filter(|k| *k == "Observation/oa1")
            .count(),
        1
    );
    let oa1 = after["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["id"] == "oa1")
        .unwrap();
    assert_eq!(oa1["resource"]["meta"]["versionId"], "2");
}

async fn pages_return_each_resource_once(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;
    for count in [1, 2, 3, 100] {
        let mut seen = Vec::new();
        let mut next = Some(format!("/fhir/Patient/pa/$everything?_count={count}"));
        let mut pages = 0;
        while let Some(path) = next {
            let reply = call(&app, get(&path)).await;
            assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
            let bundle = reply.json();
            let keys = entry_keys(&bundle);
            assert!(keys.len() <= count, "{path}: {keys:?}");
            seen.extend(keys);
            next = link(&bundle, "next").map(|url| local(&url));
            pages += 1;
            assert!(pages < 50, "paging does not end");
        }
        assert_eq!(seen.first().map(String::as_str), Some("Patient/pa"));
        let unique: BTreeSet<String> = seen.iter().cloned().collect();
        assert_eq!(unique.len(), seen.len(), "_count={count}: {seen:?}");
        assert_eq!(unique, set(A_RECORD), "_count={count}");
    }
    // A resource added between pages appears once, on a later page.
    let first = call(&app, get("/fhir/Patient/pa/$everything?_count=4"))
        .await
        .json();
    let created = call(
        &app,
        put(
            "/fhir/Encounter/ea2",
            &json!({"resourceType": "Encounter", "id": "ea2", "status": "planned",
                    "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                    "subject": {"reference": "Patient/pa"}}),
        ),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let mut seen = entry_keys(&first);
    let mut next = link(&first, "next").map(|url| local(&url));
    while let Some(path) = next {
        let bundle = call(&app, get(&path)).await.json();
        seen.extend(entry_keys(&bundle));
        next = link(&bundle, "next").map(|url| local(&url));
    }
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(unique.len(), seen.len(), "{seen:?}");
    assert!(unique.contains("Encounter/ea2"));
}

async fn since_type_and_errors(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;

    // `_since` after everything was written: only what changes later.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let updated = call(
        &app,
        put(
            "/fhir/AllergyIntolerance/aa1",
            &json!({"resourceType": "AllergyIntolerance", "id": "aa1",
                    "patient": {"reference": "Patient/pa"}, "criticality": "high"}),
        ),
    )
    .await;
    assert_eq!(updated.status, StatusCode::OK);
    let query = serde_urlencoded::to_string([("_since", since.as_str())]).unwrap();
    let reply = call(&app, get(&format!("/fhir/Patient/pa/$everything?{query}"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(entry_keys(&reply.json()), ["AllergyIntolerance/aa1"]);

    // Unknown and deleted patients.
    let missing = call(&app, get("/fhir/Patient/nobody/$everything")).await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(missing.outcome_issue()["code"], "not-found");
    let deleted = call(&app, TestRequest::delete().uri("/fhir/Patient/pb")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let gone = call(&app, get("/fhir/Patient/pb/$everything")).await;
    assert_eq!(gone.status, StatusCode::GONE);

    // Other types, unknown types, bad parameters, other methods.
    for (path, status) in [
        ("/fhir/Observation/oa1/$everything", StatusCode::BAD_REQUEST),
        ("/fhir/Nonsense/pa/$everything", StatusCode::NOT_FOUND),
        (
            "/fhir/Patient/pa/$everything?_type=Nonsense",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/Patient/pa/$everything?_count=0",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/Patient/pa/$everything?_since=yesterday",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/Patient/pa/$everything?_cursor=xyz",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/Patient/pa/$everything?start=2020",
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let reply = call(&app, get(path)).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
    }
    let post = call(
        &app,
        TestRequest::delete().uri("/fhir/Patient/pa/$everything"),
    )
    .await;
    assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
}

async fn everything_is_ledgered_with_every_disclosed_resource(db: TestDb) {
    let state = db.state();
    let ledger = state.ledger.clone();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    seed(&app).await;
    let reply = call(&app, get("/fhir/Patient/pa/$everything")).await;
    assert_eq!(reply.status, StatusCode::OK);
    // The record holds resources also in pb's and pa-linked's compartments: one entry per
    // patient, each naming only that patient's resources, under a lead entry naming none.
    let receipt = reply.header("x-ledger-entry").unwrap();
    let lead = ledger.entry_by_receipt(receipt).await.unwrap();
    let lead: Value = serde_json::from_slice(&lead.leaf_data).unwrap();
    assert_eq!(lead["action"], "everything");
    assert_eq!(lead["outcome"], "permit");
    assert_eq!(lead["patient"], Value::Null, "{lead}");
    assert_eq!(lead["resources"], json!([]), "{lead}");
    let mut parts = BTreeMap::new();
    for part in lead["parts"].as_array().unwrap() {
        let entry = ledger
            .entry_by_receipt(part.as_str().unwrap().to_owned())
            .await
            .unwrap();
        let entry: Value = serde_json::from_slice(&entry.leaf_data).unwrap();
        assert_eq!(entry["partOf"], lead["id"]);
        assert_eq!(entry["action"], "everything");
        let named: BTreeSet<String> = entry["resources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(r["versionId"], "1", "{r}");
                format!(
                    "{}/{}",
                    r["type"].as_str().unwrap(),
                    r["id"].as_str().unwrap()
                )
            })
            .collect();
        let text = entry.to_string();
        assert!(!text.contains("Alpha"), "no PHI: {text}");
        parts.insert(entry["patient"].as_str().unwrap().to_owned(), named);
    }
    assert_eq!(parts["Patient/pa"], set(A_RECORD));
    assert_eq!(parts["Patient/pb"], set(&["Observation/shared"]));
    assert_eq!(parts["Patient/pa-linked"], set(&["Patient/pa-linked"]));
    assert_eq!(parts.len(), 3);

    let missing = call(&app, get("/fhir/Patient/nobody/$everything")).await;
    let receipt = missing.header("x-ledger-entry").unwrap();
    let entry = ledger.entry_by_receipt(receipt).await.unwrap();
    let entry: Value = serde_json::from_slice(&entry.leaf_data).unwrap();
    assert_eq!(entry["action"], "everything");
    assert_eq!(entry["outcome"], "deny");
    assert_eq!(entry["resources"][0]["id"], "nobody");
}

/// Every parameter `/metadata` lists for Patient and Observation is accepted by a search
/// (`:missing` applies to every parameter type; `_id` and `_lastUpdated`, answered from
/// columns and never missing, take a value; composites also take a tuple of their shape),
/// so the statement lists only what works.
async fn every_listed_search_parameter_is_accepted(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;
    let statement = call(&app, get("/fhir/metadata")).await.json();
    let resources = statement["rest"][0]["resource"].as_array().unwrap();
    let mut composites = 0;
    for type_name in ["Patient", "Observation"] {
        let resource = resources.iter().find(|r| r["type"] == type_name).unwrap();
        let params = resource["searchParam"].as_array().unwrap();
        assert!(params.len() > 10, "{type_name}: {params:?}");
        for param in params {
            let name = param["name"].as_str().unwrap();
            let query = match name {
                "_id" => "_id=pa".to_owned(),
                "_lastUpdated" => "_lastUpdated=gt2000-01-01".to_owned(),
                _ => format!("{name}:missing=true"),
            };
            let reply = call(&app, get(&format!("/fhir/{type_name}?{query}"))).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{type_name}?{query}: {}",
                reply.text()
            );
            if param["type"] == "composite" {
                composites += 1;
                let value = match name.rsplit('-').next() {
                    Some("quantity") => "http://loinc.org|8480-6$gt100",
                    Some("date") => "http://loinc.org|8480-6$ge2020-01",
                    _ => "http://loinc.org|8480-6$text",
                };
                let reply = call(&app, get(&format!("/fhir/{type_name}?{name}={value}"))).await;
                assert_eq!(reply.status, StatusCode::OK, "{name}: {}", reply.text());
            }
        }
        for include in resource["searchInclude"].as_array().unwrap() {
            let query =
                serde_urlencoded::to_string([("_include", include.as_str().unwrap())]).unwrap();
            let reply = call(&app, get(&format!("/fhir/{type_name}?{query}"))).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{type_name}?{query}: {}",
                reply.text()
            );
        }
        for revinclude in resource["searchRevInclude"].as_array().unwrap() {
            let query =
                serde_urlencoded::to_string([("_revinclude", revinclude.as_str().unwrap())])
                    .unwrap();
            let reply = call(&app, get(&format!("/fhir/{type_name}?{query}"))).await;
            assert_eq!(
                reply.status,
                StatusCode::OK,
                "{type_name}?{query}: {}",
                reply.text()
            );
        }
    }
    // Observation's eight composites.
    assert_eq!(composites, 8);
}

on_both_backends!(
    returns_exactly_the_patients_compartment,
    pages_return_each_resource_once,
    since_type_and_errors,
    everything_is_ledgered_with_every_disclosed_resource,
    every_listed_search_parameter_is_accepted,
);
