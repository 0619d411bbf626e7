//! The URL forms widely used FHIR clients build (fhir-kit-client, fhirpy): a base with a
//! trailing slash, compartment search, operations invoked by POST and `_count=0`.
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
use common::{TestDb, call, call_as_is, create, get, post, token_with};
use serde_json::{Value, json};

fn observation(patient: &str, code: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code}]},
           "subject": {"reference": format!("Patient/{patient}")}})
}

fn ids(bundle: &Value) -> BTreeSet<String> {
    common::searchset_ids(bundle).into_iter().collect()
}

/// Every `{base}/…/` form answers as without the slash: a transaction posted to `/fhir/`,
/// a system search at `/fhir/?_type=`, a type search and a read.
async fn a_trailing_slash_is_the_same_path(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let transaction = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "name": [{"family": "Slash"}]},
         "request": {"method": "POST", "url": "Patient"}}]});
    let reply = call(&app, post("/fhir/", &transaction)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["type"], "transaction-response");
    let location = reply.json()["entry"][0]["response"]["location"]
        .as_str()
        .unwrap()
        .to_owned();
    let id = location.split('/').nth(1).unwrap().to_owned();
    for path in [
        "/fhir/?_type=Patient&family=Slash".to_owned(),
        "/fhir/Patient/?family=Slash".to_owned(),
    ] {
        let reply = call(&app, get(&path)).await;
        assert_eq!(reply.status, StatusCode::OK, "{path}: {}", reply.text());
        assert_eq!(ids(&reply.json()), BTreeSet::from([id.clone()]), "{path}");
    }
    let read = call(&app, get(&format!("/fhir/Patient/{id}/"))).await;
    assert_eq!(read.status, StatusCode::OK, "{}", read.text());
    assert_eq!(read.json()["id"], id);
    let metadata = call(&app, get("/fhir/metadata/")).await;
    assert_eq!(metadata.status, StatusCode::OK);
}

/// `Patient/{id}/{type}` searches that type inside the patient's compartment (by every
/// compartment parameter, not only `subject`), with the type's own parameters and paging;
/// `Patient/{id}/*` every type of it.
async fn compartment_search(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let alice = create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": "A"}]}),
    )
    .await;
    let bob = create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": "B"}]}),
    )
    .await;
    let weight = create(&app, observation(&alice, "29463-7")).await;
    let height = create(&app, observation(&alice, "8302-2")).await;
    let _bobs = create(&app, observation(&bob, "29463-7")).await;
    // In Alice's compartment as its performer.
    let mut performed = observation(&bob, "8867-4");
    performed["performer"] = json!([{"reference": format!("Patient/{alice}")}]);
    let performed = create(&app, performed).await;
    let condition = create(
        &app,
        json!({"resourceType": "Condition", "subject": {"reference": format!("Patient/{alice}")},
               "code": {"text": "asthma"}}),
    )
    .await;

    let reply = call(&app, get(&format!("/fhir/Patient/{alice}/Observation"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        ids(&reply.json()),
        BTreeSet::from([weight.clone(), height.clone(), performed.clone()])
    );
    assert_eq!(reply.json()["total"], 3);
    let reply = call(
        &app,
        get(&format!(
            "/fhir/Patient/{alice}/Observation?code=http://loinc.org|29463-7"
        )),
    )
    .await;
    assert_eq!(ids(&reply.json()), BTreeSet::from([weight.clone()]));
    // Paging stays in the compartment.
    let first = call(
        &app,
        get(&format!("/fhir/Patient/{alice}/Observation?_count=2")),
    )
    .await
    .json();
    let next = common::link(&first, "next").expect("a next page");
    assert!(
        next.contains(&format!("/Patient/{alice}/Observation?")),
        "{next}"
    );
    let second = call(&app, get(&common::local(&next))).await.json();
    let mut seen = ids(&first);
    seen.extend(ids(&second));
    assert_eq!(seen.len(), 3);
    // Every type.
    let reply = call(&app, get(&format!("/fhir/Patient/{alice}/*"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        ids(&reply.json()),
        BTreeSet::from([weight, height, performed.clone(), condition])
    );
    // Not a compartment type, not the Patient compartment: 400.
    let reply = call(&app, get(&format!("/fhir/Patient/{alice}/Practitioner"))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = call(&app, get(&format!("/fhir/Encounter/{alice}/Observation"))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    // A patient's app searching another patient's compartment finds only what is in hers
    // too (the Observation she performed), never Bob's own.
    let alices_app = token_with("patient/*.rs", Some(&alice), None);
    let reply = call_as_is(
        &app,
        get(&format!("/fhir/Patient/{bob}/Observation"))
            .insert_header(("Authorization", format!("Bearer {alices_app}"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(ids(&reply.json()), BTreeSet::from([performed]));
}

/// `$everything` by POST: no body, or its parameters in a `Parameters` resource.
async fn everything_by_post(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let alice = create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": "A"}]}),
    )
    .await;
    let obs = create(&app, observation(&alice, "29463-7")).await;
    let path = format!("/fhir/Patient/{alice}/$everything");
    let reply = call(&app, TestRequest::post().uri(&path)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        ids(&reply.json()),
        BTreeSet::from([alice.clone(), obs.clone()])
    );
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueCode": "Observation"}, {"name": "_count", "valueInteger": 1}]});
    let reply = call(&app, post(&path, &parameters)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(ids(&reply.json()), BTreeSet::from([obs]));
    let wrong = json!({"resourceType": "Parameters", "parameter": [{"name": "start", "valueDate": "2020-01-01"}]});
    let reply = call(&app, post(&path, &wrong)).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    let reply = call(&app, post(&path, &json!({"resourceType": "Patient"}))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
}

/// `_count=0` answers the total alone, as `_summary=count` does.
async fn count_zero_is_a_count(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    for family in ["Zero", "Zero", "Other"] {
        create(
            &app,
            json!({"resourceType": "Patient", "name": [{"family": family}]}),
        )
        .await;
    }
    let reply = call(
        &app,
        get("/fhir/Patient?family=Zero&_count=0&_totalMethod=count"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let bundle = reply.json();
    assert_eq!(bundle["total"], 2, "{bundle}");
    assert!(
        bundle["entry"].as_array().is_none_or(Vec::is_empty),
        "{bundle}"
    );
}

fn patch_as(path: &str, media: &str, body: &Value) -> TestRequest {
    TestRequest::patch()
        .uri(path)
        .insert_header(("Content-Type", media))
        .set_payload(serde_json::to_vec(body).unwrap())
}

/// PATCH as clients send it: fhirpy's `patch()` sends the members to change as a JSON object
/// under `application/json` (a JSON Merge Patch, RFC 7396); others send a JSON Patch array
/// under that type.
async fn merge_patches_and_json_typed_patches(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let id = create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": "M"}], "gender": "male"}),
    )
    .await;
    let path = format!("/fhir/Patient/{id}");
    let reply = call(
        &app,
        patch_as(
            &path,
            "application/json",
            &json!({"active": true, "gender": null}),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let patched = reply.json();
    assert_eq!(patched["active"], true);
    assert!(patched.get("gender").is_none(), "{patched}");
    assert_eq!(patched["name"][0]["family"], "M");
    assert_eq!(patched["meta"]["versionId"], "2");
    let reply = call(
        &app,
        patch_as(
            &path,
            "application/merge-patch+json",
            &json!({"birthDate": "1990-01-01"}),
        ),
    )
    .await;
    assert_eq!(reply.json()["birthDate"], "1990-01-01");
    let reply = call(
        &app,
        patch_as(
            &path,
            "application/json",
            &json!([{"op": "replace", "path": "/active", "value": false}]),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(reply.json()["active"], false);
    // Removing the id or making the resource invalid is refused, and nothing is written.
    let reply = call(
        &app,
        patch_as(&path, "application/json", &json!({"id": null})),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );
    let reply = call(
        &app,
        patch_as(&path, "application/json", &json!({"gender": 7})),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        reply.text()
    );
    let reply = call(
        &app,
        patch_as(&path, "application/merge-patch+json", &json!([1])),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert_eq!(
        call(&app, get(&path)).await.json()["meta"]["versionId"],
        "4"
    );
}

/// Reads take `_elements` and `_summary`, and conditional reads answer 304 (http.html#cread).
async fn shaped_and_conditional_reads(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let id = create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": "R"}], "gender": "other",
               "text": {"status": "generated", "div": "<div xmlns=\"http://www.w3.org/1999/xhtml\">R</div>"}}),
    )
    .await;
    let path = format!("/fhir/Patient/{id}");
    let subsetted = |resource: &Value| {
        resource["meta"]["tag"]
            .as_array()
            .is_some_and(|tags| tags.iter().any(|t| t["code"] == "SUBSETTED"))
    };
    let reply = call(&app, get(&format!("{path}?_elements=gender"))).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let read = reply.json();
    assert_eq!(read["gender"], "other");
    assert!(
        read.get("name").is_none() && read.get("text").is_none(),
        "{read}"
    );
    assert!(subsetted(&read), "{read}");
    assert!(reply.header("etag").is_some());
    let read = call(&app, get(&format!("{path}?_summary=text")))
        .await
        .json();
    assert!(
        read.get("text").is_some() && read.get("name").is_none(),
        "{read}"
    );
    let read = call(&app, get(&format!("{path}/_history/1?_summary=data")))
        .await
        .json();
    assert!(
        read.get("text").is_none() && read.get("name").is_some(),
        "{read}"
    );
    assert!(subsetted(&read));
    let read = call(&app, get(&format!("{path}?_summary=false")))
        .await
        .json();
    assert!(!subsetted(&read) && read.get("text").is_some());
    let reply = call(&app, get(&format!("{path}?_summary=true"))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());

    // Conditional reads.
    let current = call(&app, get(&path)).await;
    let etag = current.header("etag").unwrap();
    let modified = current.header("last-modified").unwrap();
    let reply = call(
        &app,
        get(&path).insert_header(("If-None-Match", etag.clone())),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("etag"), Some(etag.clone()));
    let reply = call(&app, get(&path).insert_header(("If-None-Match", "W/\"9\""))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let reply = call(
        &app,
        get(&path).insert_header(("If-Modified-Since", modified.clone())),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_MODIFIED);
    let old = "Sat, 01 Jan 2000 00:00:00 GMT";
    let reply = call(&app, get(&path).insert_header(("If-Modified-Since", old))).await;
    assert_eq!(reply.status, StatusCode::OK);
    // A new version makes the held ETag stale.
    let patched = call(
        &app,
        patch_as(
            &path,
            "application/merge-patch+json",
            &json!({"active": true}),
        ),
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    let reply = call(&app, get(&path).insert_header(("If-None-Match", etag))).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["active"], true);
}

on_both_backends!(
    shaped_and_conditional_reads,
    merge_patches_and_json_typed_patches,
    a_trailing_slash_is_the_same_path,
    compartment_search,
    everything_by_post,
    count_zero_is_a_count,
);
