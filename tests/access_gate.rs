//! No way around the access gate: the attacks that once got answers about another patient's
//! record (issue 13), each tried again. A patient's app holds a `patient/` token for Alice;
//! Bob's record is what it must learn nothing about. Wherever the answer depended on Bob's
//! data (a right or a wrong guess, a record that exists or not), it must not any more.
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
use base64::Engine as _;
use common::{
    Reply, TestDb, call, call_as_is, create, get, post, put, token_for_purpose, token_with,
};
use serde_json::{Value, json};

const BOB_FAMILY: &str = "Quintavalle";
const LOINC: &str = "http://loinc.org";
const BOB_CODE: &str = "2345-7";

fn with_token(request: TestRequest, token: &str) -> TestRequest {
    request.insert_header(("Authorization", format!("Bearer {token}")))
}

fn coded_observation(patient: &str, code: &str) -> Value {
    json!({"resourceType": "Observation", "status": "final",
           "code": {"coding": [{"system": LOINC, "code": code}]},
           "subject": {"reference": format!("Patient/{patient}")}})
}

fn ids_of(reply: &Reply) -> BTreeSet<String> {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == "match")
                .filter_map(|e| e["resource"]["id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Alice and Bob, each with a coded Observation; Bob's performed by a Practitioner.
struct World {
    alice: String,
    bob: String,
    alice_obs: String,
    bob_obs: String,
    doctor: String,
}

async fn world<S, B>(app: &S) -> World
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let alice = create(
        app,
        json!({"resourceType": "Patient", "name": [{"family": "Alvarez"}]}),
    )
    .await;
    let bob = create(
        app,
        json!({"resourceType": "Patient", "name": [{"family": BOB_FAMILY}], "birthDate": "1970-01-01"}),
    )
    .await;
    let doctor = create(
        app,
        json!({"resourceType": "Practitioner", "name": [{"family": "House"}]}),
    )
    .await;
    let alice_obs = create(app, coded_observation(&alice, "1111-1")).await;
    let mut bobs = coded_observation(&bob, BOB_CODE);
    bobs["performer"] = json!([{"reference": format!("Practitioner/{doctor}")}]);
    let bob_obs = create(app, bobs).await;
    World {
        alice,
        bob,
        alice_obs,
        bob_obs,
        doctor,
    }
}

/// Two answers the attacker compares: same status, same issue code.
fn same_answer(right: &Reply, wrong: &Reply, what: &str) {
    assert_eq!(
        right.status,
        wrong.status,
        "{what}: a right and a wrong guess must get the same answer: {} / {}",
        right.text(),
        wrong.text()
    );
    if right.status != StatusCode::OK {
        assert_eq!(
            right.outcome_issue()["code"],
            wrong.outcome_issue()["code"],
            "{what}"
        );
    }
}

fn json_patch(path: &str, operations: &Value, token: &str) -> TestRequest {
    with_token(
        TestRequest::patch()
            .uri(path)
            .insert_header(("Content-Type", "application/json-patch+json"))
            .set_payload(serde_json::to_vec(operations).unwrap()),
        token,
    )
}

/// Finding 1: A tiny PATCH whose copies double an array is refused before it grows (413), and the
/// server keeps answering; so is a patch with too many operations.
async fn patches_are_bounded(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let admin = token_with("system/*.cruds", None, None);
    let patient = json!({"resourceType": "Patient", "id": "p", "name": [{"family": "Doe", "given": ["A", "B"]}]});
    assert_eq!(
        call(&app, put("/fhir/Patient/p", &patient)).await.status,
        StatusCode::CREATED
    );
    let mut doubling = Vec::new();
    for _ in 0..48 {
        doubling.push(json!({"op": "copy", "from": "/name/0/given", "path": "/name/0/given/-"}));
        doubling.push(json!({"op": "copy", "from": "/name", "path": "/name/-"}));
    }
    let reply = call_as_is(
        &app,
        json_patch("/fhir/Patient/p", &json!(doubling), &admin),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_eq!(reply.outcome_issue()["code"], "too-long");
    let many: Vec<Value> = (0..1001)
        .map(|_| json!({"op": "test", "path": "/id", "value": "p"}))
        .collect();
    let reply = call_as_is(&app, json_patch("/fhir/Patient/p", &json!(many), &admin)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    // Nothing was written, and the server still answers.
    let read = call(&app, get("/fhir/Patient/p")).await;
    assert_eq!(read.status, StatusCode::OK);
    assert_eq!(read.json()["meta"]["versionId"], "1");
}

/// Finding 2: PATCH and If-Match on another patient's record are refused before anything about
/// it is evaluated: the same 403 for a right and a wrong guess, for a current and a stale
/// version.
async fn writes_to_another_record_tell_nothing(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    let alices_app = token_with("patient/*.cruds", Some(&w.alice), None);
    let guess = |value: &str| {
        json!([{"op": "test", "path": "/birthDate", "value": value},
                                     {"op": "add", "path": "/active", "value": true}])
    };
    let bob = format!("/fhir/Patient/{}", w.bob);
    let right = call_as_is(&app, json_patch(&bob, &guess("1970-01-01"), &alices_app)).await;
    let wrong = call_as_is(&app, json_patch(&bob, &guess("1999-09-09"), &alices_app)).await;
    assert_eq!(right.status, StatusCode::FORBIDDEN, "{}", right.text());
    same_answer(&right, &wrong, "PATCH test on Bob's Patient");
    let code_guess =
        |code: &str| json!([{"op": "test", "path": "/code/coding/0/code", "value": code}]);
    let bob_obs = format!("/fhir/Observation/{}", w.bob_obs);
    let right = call_as_is(
        &app,
        json_patch(&bob_obs, &code_guess(BOB_CODE), &alices_app),
    )
    .await;
    let wrong = call_as_is(
        &app,
        json_patch(&bob_obs, &code_guess("0000-0"), &alices_app),
    )
    .await;
    assert_eq!(right.status, StatusCode::FORBIDDEN);
    same_answer(&right, &wrong, "PATCH test on Bob's Observation");

    // If-Match: the current version and a stale one get the same refusal, on every write.
    for version in ["1", "7"] {
        let etag = format!("W/\"{version}\"");
        let body = coded_observation(&w.alice, "1111-1");
        let mut update = body.clone();
        update["id"] = json!(w.bob_obs);
        let replies = [
            call_as_is(
                &app,
                with_token(put(&bob_obs, &update), &alices_app)
                    .insert_header(("If-Match", etag.clone())),
            )
            .await,
            call_as_is(
                &app,
                json_patch(&bob_obs, &json!([]), &alices_app)
                    .insert_header(("If-Match", etag.clone())),
            )
            .await,
            call_as_is(
                &app,
                with_token(TestRequest::delete().uri(&bob_obs), &alices_app)
                    .insert_header(("If-Match", etag.clone())),
            )
            .await,
        ];
        for reply in replies {
            assert_eq!(
                reply.status,
                StatusCode::FORBIDDEN,
                "If-Match {etag}: {}",
                reply.text()
            );
        }
    }
    // Bob's record is as it was.
    let read = call(&app, get(&bob_obs)).await;
    assert_eq!(read.json()["meta"]["versionId"], "1");
    // Alice's own record still takes a patch.
    let own = format!("/fhir/Observation/{}", w.alice_obs);
    let reply = call_as_is(&app, json_patch(&own, &code_guess("1111-1"), &alices_app)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
}

/// Finding 2, existence: for a confined token, an id in another patient's record and an id
/// that does not exist get the same refusal on every interaction by id; its own deleted
/// record still answers 410, and a missing version of its own resource 404.
async fn absent_and_outside_look_alike(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    let alices_app = token_with("patient/*.cruds", Some(&w.alice), None);
    let asks = |id: &str| {
        let path = format!("/fhir/Observation/{id}");
        vec![
            get(&path),
            get(&format!("{path}/_history/1")),
            get(&format!("{path}/_history")),
            TestRequest::delete().uri(&path),
            // An update of an id that is not there would create it: as telling as a read.
            put(
                &path,
                &json!({"resourceType": "Observation", "id": id, "status": "final",
                               "code": {"text": "mine"},
                               "subject": {"reference": format!("Patient/{}", w.alice)}}),
            ),
            TestRequest::patch()
                .uri(&path)
                .insert_header(("Content-Type", "application/json-patch+json"))
                .set_payload("[]"),
        ]
    };
    for (bobs, nobodys) in asks(&w.bob_obs)
        .into_iter()
        .zip(asks("no-such-observation"))
    {
        let bobs = call_as_is(&app, with_token(bobs, &alices_app)).await;
        let nobodys = call_as_is(&app, with_token(nobodys, &alices_app)).await;
        assert_eq!(bobs.status, StatusCode::FORBIDDEN, "{}", bobs.text());
        same_answer(&bobs, &nobodys, "Bob's record vs no record");
    }
    // Deleted: Bob's looks like any other refusal; Alice's own is Gone.
    for id in [&w.bob_obs, &w.alice_obs] {
        let path = format!("/fhir/Observation/{id}");
        assert_eq!(
            call(&app, TestRequest::delete().uri(&path)).await.status,
            StatusCode::NO_CONTENT
        );
    }
    let bobs = call_as_is(
        &app,
        with_token(
            get(&format!("/fhir/Observation/{}", w.bob_obs)),
            &alices_app,
        ),
    )
    .await;
    assert_eq!(bobs.status, StatusCode::FORBIDDEN, "{}", bobs.text());
    let own = call_as_is(
        &app,
        with_token(
            get(&format!("/fhir/Observation/{}", w.alice_obs)),
            &alices_app,
        ),
    )
    .await;
    assert_eq!(own.status, StatusCode::GONE, "{}", own.text());
    let version = call_as_is(
        &app,
        with_token(
            get(&format!("/fhir/Observation/{}/_history/9", w.alice_obs)),
            &alices_app,
        ),
    )
    .await;
    assert_eq!(version.status, StatusCode::NOT_FOUND, "{}", version.text());
    // Shared reference data is readable, so its absence is no secret.
    let missing = call_as_is(
        &app,
        with_token(get("/fhir/Practitioner/no-such-doctor"), &alices_app),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
}

/// Finding 3: Chains and `_has` are authorized on their own types and confined like any search.
async fn inner_searches_are_authorized_and_confined(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    let device = create(
        &app,
        json!({"resourceType": "Device", "patient": {"reference": format!("Patient/{}", w.bob)}}),
    )
    .await;
    let alices_app = token_with("patient/*.rs", Some(&w.alice), None);
    let ask = |path: String, token: String| {
        let app = &app;
        async move { call_as_is(app, with_token(get(&path), &token)).await }
    };
    // Who treated Bob, and which codes Bob's observations carry: nothing, for Alice.
    let who = ask(
        format!(
            "/fhir/Practitioner?_has:Observation:performer:subject=Patient/{}",
            w.bob
        ),
        alices_app.clone(),
    )
    .await;
    assert_eq!(ids_of(&who), BTreeSet::new());
    let code = ask(
        format!("/fhir/Practitioner?_has:Observation:performer:code={LOINC}|{BOB_CODE}"),
        alices_app.clone(),
    )
    .await;
    assert_eq!(ids_of(&code), BTreeSet::new());
    let chained = ask(
        format!("/fhir/Device?patient:Patient.family={BOB_FAMILY}"),
        alices_app.clone(),
    )
    .await;
    assert_eq!(ids_of(&chained), BTreeSet::new());
    // The same questions from an unconfined token do find them (the searches work).
    let admin = token_with("system/*.rs", None, None);
    let who = ask(
        format!(
            "/fhir/Practitioner?_has:Observation:performer:subject=Patient/{}",
            w.bob
        ),
        admin.clone(),
    )
    .await;
    assert_eq!(ids_of(&who), BTreeSet::from([w.doctor.clone()]));
    let chained = ask(
        format!("/fhir/Device?patient:Patient.family={BOB_FAMILY}"),
        admin,
    )
    .await;
    assert_eq!(ids_of(&chained), BTreeSet::from([device]));

    // Narrow system tokens may not search the inner type at all: 403, ledgered.
    let practitioners_only = token_with("system/Practitioner.rs", None, None);
    let refused = ask(
        format!(
            "/fhir/Practitioner?_has:Observation:performer:subject=Patient/{}",
            w.bob
        ),
        practitioners_only,
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    let devices_only = token_with("system/Device.rs", None, None);
    let refused = ask(
        format!("/fhir/Device?patient:Patient.family={BOB_FAMILY}"),
        devices_only,
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let entry = common::ledger_entries(&app, &refused).await.remove(0);
    assert_eq!(entry["outcome"], "deny");
    assert_eq!(entry["rule"], "scope");
}

fn transaction(entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

fn post_entry(resource: Value) -> Value {
    let url = resource["resourceType"].as_str().unwrap().to_owned();
    json!({"resource": resource, "request": {"method": "POST", "url": url}})
}

/// Finding 4: Conditional references in a transaction resolve with the requester's rights: a
/// guess about Bob's record matches nothing, right or wrong, and a match that resolves is
/// ledgered as a disclosure.
async fn conditional_references_resolve_with_the_requesters_rights(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let w = world(&app).await;
    let alices_app = token_with("patient/*.cruds", Some(&w.alice), None);
    let send = |bundle: Value| {
        let app = &app;
        let token = alices_app.clone();
        async move { call_as_is(app, with_token(post("/fhir", &bundle), &token)).await }
    };
    let focus_on = |code: &str| {
        let mut mine = coded_observation(&w.alice, "1111-1");
        mine["focus"] = json!([{"reference": format!("Observation?subject=Patient/{}&code={LOINC}|{code}", w.bob)}]);
        transaction(vec![post_entry(mine)])
    };
    let right = send(focus_on(BOB_CODE)).await;
    let wrong = send(focus_on("0000-0")).await;
    assert_eq!(
        right.status,
        StatusCode::PRECONDITION_FAILED,
        "{}",
        right.text()
    );
    same_answer(&right, &wrong, "focus = Bob's Observation by code");
    let subject_named = |family: &str| {
        let mut mine = coded_observation(&w.alice, "1111-1");
        mine["subject"] = json!({"reference": format!("Patient?family={family}")});
        transaction(vec![post_entry(mine)])
    };
    let right = send(subject_named(BOB_FAMILY)).await;
    let wrong = send(subject_named("Nobodyatall")).await;
    same_answer(&right, &wrong, "subject = Bob by family name");
    assert_eq!(right.status, StatusCode::PRECONDITION_FAILED);
    // Her own record resolves, and is written.
    let own = send(subject_named("Alvarez")).await;
    assert_eq!(own.status, StatusCode::OK, "{}", own.text());

    // A token without search on the referenced type may not make it look anything up.
    let writer = token_with("system/Observation.c", None, None);
    let reply = call_as_is(
        &app,
        with_token(post("/fhir", &subject_named(BOB_FAMILY)), &writer),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());

    // What a conditional reference resolved to is ledgered as disclosed, to its patient.
    let admin = token_with("system/*.cruds", None, None);
    let reply = call_as_is(
        &app,
        with_token(post("/fhir", &subject_named(BOB_FAMILY)), &admin),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let request = common::ledger_entries(&app, &reply).await[0]["request"].clone();
    let entries = all_entries(&app, &state).await;
    let lookup: Vec<&Value> = entries
        .iter()
        .filter(|e| e["request"] == request && e["action"] == "search")
        .collect();
    assert_eq!(lookup.len(), 1, "{lookup:?}");
    assert_eq!(lookup[0]["patient"], format!("Patient/{}", w.bob));
    assert_eq!(lookup[0]["resources"][0]["id"], w.bob);
}

/// Every sequenced ledger entry, parsed.
async fn all_entries<S, B>(app: &S, state: &fhirledger::api::AppState) -> Vec<Value>
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let ledger = state.ledger.clone();
    actix_web::rt::task::spawn_blocking(move || ledger.sequence_pending().unwrap())
        .await
        .unwrap();
    let mut entries = Vec::new();
    loop {
        let start = entries.len();
        let page = call(
            app,
            get(&format!(
                "/ledger/entries?start={start}&end={}",
                start + 1000
            )),
        )
        .await;
        assert_eq!(page.status, StatusCode::OK, "{}", page.text());
        let got = page.json()["entries"].as_array().unwrap().clone();
        if got.is_empty() {
            return entries;
        }
        entries.extend(got.into_iter().map(|e| e["entry"].clone()));
    }
}

/// Finding 5: A patient's token is confined on types R4's definition leaves out (Device, Task) and
/// may read, but not write, shared reference data.
async fn confined_tokens_stay_inside_on_every_type(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    let bobs_device = create(
        &app,
        json!({"resourceType": "Device", "patient": {"reference": format!("Patient/{}", w.bob)}}),
    )
    .await;
    let alices_device = create(
        &app,
        json!({"resourceType": "Device", "patient": {"reference": format!("Patient/{}", w.alice)}}),
    )
    .await;
    let alices_app = token_with("patient/*.cruds", Some(&w.alice), None);
    let as_alice = |request: TestRequest| {
        let app = &app;
        let request = with_token(request, &alices_app);
        async move { call_as_is(app, request).await }
    };
    let reply = as_alice(get(&format!("/fhir/Device/{bobs_device}"))).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = as_alice(get(&format!("/fhir/Device?patient=Patient/{}", w.bob))).await;
    assert_eq!(ids_of(&reply), BTreeSet::new());
    let reply = as_alice(get("/fhir/Device")).await;
    assert_eq!(ids_of(&reply), BTreeSet::from([alices_device.clone()]));
    let reply = as_alice(get(&format!("/fhir/Device/{alices_device}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    // A Task for Bob cannot be created; one for Alice can.
    let task = |patient: &str| {
        json!({"resourceType": "Task", "status": "requested", "intent": "order",
               "for": {"reference": format!("Patient/{patient}")}})
    };
    let reply = as_alice(post("/fhir/Task", &task(&w.bob))).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = as_alice(post("/fhir/Task", &task(&w.alice))).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    // Shared reference data: readable, not writable.
    let doctor = format!("/fhir/Practitioner/{}", w.doctor);
    assert_eq!(as_alice(get(&doctor)).await.status, StatusCode::OK);
    let overwrite =
        json!({"resourceType": "Practitioner", "id": w.doctor, "name": [{"family": "Quack"}]});
    let reply = as_alice(put(&doctor, &overwrite)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let reply = as_alice(post(
        "/fhir/Practitioner",
        &json!({"resourceType": "Practitioner", "name": [{"family": "Fake"}]}),
    ))
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let read = call(&app, get(&doctor)).await;
    assert_eq!(read.json()["name"][0]["family"], "House");
}

/// Found in review: a resource in two patients' records is changed only by a token that opens
/// both; Binary and Bundle are nobody's record, so closed to confined tokens; a type outside
/// R4's compartment that names a patient under another parameter is that patient's.
async fn confined_writes_need_every_record_open(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    let alices_app = token_with("patient/*.cruds", Some(&w.alice), None);
    let as_alice = |request: TestRequest| {
        let app = &app;
        let request = with_token(request, &alices_app);
        async move { call_as_is(app, request).await }
    };
    // Bob's Observation, performed by Alice: hers to read, not hers alone to change.
    let mut shared = coded_observation(&w.bob, BOB_CODE);
    shared["performer"] = json!([{"reference": format!("Patient/{}", w.alice)}]);
    let shared = create(&app, shared).await;
    let path = format!("/fhir/Observation/{shared}");
    assert_eq!(as_alice(get(&path)).await.status, StatusCode::OK);
    let mut changed = coded_observation(&w.alice, "1111-1");
    changed["id"] = json!(shared);
    for write in [
        TestRequest::delete().uri(&path),
        put(&path, &changed),
        json_patch(
            &path,
            &json!([{"op": "replace", "path": "/status", "value": "amended"}]),
            &alices_app,
        ),
    ] {
        let reply = as_alice(write).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
        assert!(!reply.text().contains(BOB_FAMILY));
    }
    let read = call(&app, get(&path)).await;
    assert_eq!(read.json()["meta"]["versionId"], "1");
    // The refusal is in both patients' records, each naming what was attempted.
    let reply = as_alice(TestRequest::delete().uri(&path)).await;
    let entries = common::ledger_entries(&app, &reply).await;
    let parts = &entries[1..];
    let patients: BTreeSet<String> = parts
        .iter()
        .map(|part| part["patient"].as_str().unwrap().to_owned())
        .collect();
    let both = [&w.alice, &w.bob].map(|p| format!("Patient/{p}"));
    assert_eq!(patients, BTreeSet::from(both), "{entries:?}");
    for part in parts {
        assert_eq!(part["outcome"], "deny");
        assert_eq!(part["resources"][0]["id"], shared, "{part}");
    }

    // Binary and Bundle: not readable, searchable or writable by a confined token.
    let binary = create(
        &app,
        json!({"resourceType": "Binary", "contentType": "text/plain", "data": "Ym9i",
               "securityContext": {"reference": format!("Patient/{}", w.alice)}}),
    )
    .await;
    let reply = as_alice(get(&format!("/fhir/Binary/{binary}"))).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(
        ids_of(&as_alice(get("/fhir/Binary")).await),
        BTreeSet::new()
    );
    let reply = as_alice(post(
        "/fhir/Bundle",
        &json!({"resourceType": "Bundle", "type": "collection"}),
    ))
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());

    // A VerificationResult about Bob (its `target`) is Bob's record.
    let verification = create(
        &app,
        json!({"resourceType": "VerificationResult", "status": "validated",
               "target": [{"reference": format!("Patient/{}", w.bob)}]}),
    )
    .await;
    let reply = as_alice(get(&format!("/fhir/VerificationResult/{verification}"))).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert_eq!(
        ids_of(&as_alice(get("/fhir/VerificationResult")).await),
        BTreeSet::new()
    );
}

/// Found in attack: `_revinclude` looked for every holder and withheld the other patients'
/// after, so how many there were (and whether they crowded hers out) showed. It looks only
/// inside the token's compartment now: nothing is withheld because nothing else was read.
async fn revincludes_look_only_inside(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    let mut hers = coded_observation(&w.alice, "1111-1");
    hers["performer"] = json!([{"reference": format!("Practitioner/{}", w.doctor)}]);
    let hers = create(&app, hers).await;
    let alices_app = token_with("patient/*.rs", Some(&w.alice), None);
    let reply = call_as_is(
        &app,
        with_token(
            get(&format!(
                "/fhir/Practitioner?_id={}&_revinclude=Observation:performer",
                w.doctor
            )),
            &alices_app,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let returned: BTreeSet<String> = reply.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(returned, BTreeSet::from([w.doctor.clone(), hers]));
    let entry = common::ledger_entries(&app, &reply).await.remove(0);
    assert_eq!(entry["outcome"], "permit");
    assert_eq!(entry["withheld"].as_u64().unwrap_or(0), 0, "{entry}");
    // An unconfined token gets both.
    let admin = token_with("system/*.rs", None, None);
    let reply = call_as_is(
        &app,
        with_token(
            get(&format!(
                "/fhir/Practitioner?_id={}&_revinclude=Observation:performer",
                w.doctor
            )),
            &admin,
        ),
    )
    .await;
    assert_eq!(
        reply.json()["entry"].as_array().unwrap().len(),
        3,
        "{}",
        reply.text()
    );
}

/// A search names at most 100 parameters: more is refused, not evaluated.
async fn searches_are_bounded(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let many: Vec<String> = (0..101).map(|i| format!("family=f{i}")).collect();
    let reply = call(&app, get(&format!("/fhir/Patient?{}", many.join("&")))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
    assert!(
        reply.text().contains("at most 100 parameters"),
        "{}",
        reply.text()
    );
    let values: Vec<String> = (0..1001).map(|i| format!("f{i}")).collect();
    let reply = call(
        &app,
        get(&format!("/fhir/Patient?family={}", values.join(","))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
}

/// The AuditEvents of a patient's view, read with that patient's token.
async fn patients_view<S, B>(
    app: &S,
    state: &fhirledger::api::AppState,
    patient: &str,
) -> Vec<Value>
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let ledger = state.ledger.clone();
    actix_web::rt::task::spawn_blocking(move || ledger.sequence_pending().unwrap())
        .await
        .unwrap();
    let token = token_with("patient/*.rs", Some(patient), None);
    let reply = call_as_is(app, with_token(get("/fhir/AuditEvent?_count=1000"), &token)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()["entry"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|e| e["resource"].clone())
        .collect()
}

/// The exact entry bytes an AuditEvent of the view carries.
fn leaf_data(event: &Value) -> String {
    let parts = event["extension"][0]["extension"].as_array().unwrap();
    let data = parts
        .iter()
        .find(|p| p["url"] == "leafData")
        .and_then(|p| p["valueBase64Binary"].as_str())
        .expect("leafData");
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(data)
            .unwrap(),
    )
    .unwrap()
}

fn interactions(view: &[Value]) -> Vec<(String, Vec<String>)> {
    view.iter()
        .map(|event| {
            let subtype = event["subtype"][0]["code"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let entities = event["entity"]
                .as_array()
                .map(|entities| {
                    entities
                        .iter()
                        .map(|e| e["what"]["reference"].as_str().unwrap().to_owned())
                        .collect()
                })
                .unwrap_or_default();
            (subtype, entities)
        })
        .collect()
}

/// Findings 6 and 7: Each patient's view shows the entries about their record, every kind of
/// record, deletions included, and nothing that names another patient.
async fn each_patients_view_is_their_own(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let w = world(&app).await;
    // A search that returns both patients' observations.
    let both = call(
        &app,
        get(&format!(
            "/fhir/Observation?code={LOINC}|1111-1,{LOINC}|{BOB_CODE}"
        )),
    )
    .await;
    assert_eq!(
        ids_of(&both),
        BTreeSet::from([w.alice_obs.clone(), w.bob_obs.clone()])
    );
    let alice_ref = json!({"reference": format!("Patient/{}", w.alice)});
    let appointment = create(
        &app,
        json!({"resourceType": "Appointment", "status": "booked",
               "participant": [{"actor": alice_ref, "status": "accepted"}]}),
    )
    .await;
    let org = create(
        &app,
        json!({"resourceType": "Organization", "name": "Payer"}),
    )
    .await;
    let coverage = create(
        &app,
        json!({"resourceType": "Coverage", "status": "active", "beneficiary": alice_ref,
               "payor": [{"reference": format!("Organization/{org}")}]}),
    )
    .await;
    let device = create(
        &app,
        json!({"resourceType": "Device", "patient": alice_ref}),
    )
    .await;
    let deleted = call(
        &app,
        TestRequest::delete().uri(&format!("/fhir/Observation/{}", w.alice_obs)),
    )
    .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);

    let view = patients_view(&app, &state, &w.alice).await;
    for event in &view {
        let bytes = leaf_data(event);
        for secret in [&w.bob, &w.bob_obs] {
            assert!(
                !bytes.contains(secret.as_str()),
                "Alice's view names Bob: {bytes}"
            );
        }
        assert!(!event.to_string().contains(w.bob_obs.as_str()));
    }
    let seen = interactions(&view);
    let has = |subtype: &str, reference: &str| {
        seen.iter()
            .any(|(s, entities)| s == subtype && entities.iter().any(|e| e.starts_with(reference)))
    };
    assert!(
        has("search", &format!("Observation/{}", w.alice_obs)),
        "{seen:?}"
    );
    assert!(
        has("delete", &format!("Observation/{}", w.alice_obs)),
        "{seen:?}"
    );
    for created in [
        format!("Appointment/{appointment}"),
        format!("Coverage/{coverage}"),
        format!("Device/{device}"),
    ] {
        assert!(has("create", &created), "{created} missing from {seen:?}");
    }
    // Bob's view has his half of the search, and nothing of Alice's.
    let view = patients_view(&app, &state, &w.bob).await;
    let seen = interactions(&view);
    assert!(
        seen.iter().any(|(s, e)| s == "search"
            && e.iter()
                .any(|r| r.starts_with(&format!("Observation/{}", w.bob_obs)))),
        "{seen:?}"
    );
    for event in &view {
        assert!(!leaf_data(event).contains(w.alice_obs.as_str()));
    }
}

fn consent(patient: &str, kind: &str, actor: Option<&str>) -> Value {
    let mut provision = json!({"type": kind});
    if let Some(actor) = actor {
        provision["actor"] = json!([{
            "role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "PRCP"}]},
            "reference": {"reference": actor},
        }]);
    }
    json!({
        "resourceType": "Consent", "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": format!("Patient/{patient}")},
        "provision": provision,
    })
}

/// Finding 8: Consent fails closed, a deny with exceptions still denies, only the patient or an
/// administrator writes a Consent, and many Consents are no outage.
async fn consent_fails_closed(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    // Alice permits her care team for treatment only.
    let mut for_treatment = consent(&w.alice, "permit", None);
    for_treatment["provision"]["purpose"] =
        json!([{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "TREAT"}]);
    create(&app, for_treatment).await;
    let alice_obs = format!("/fhir/Observation/{}", w.alice_obs);
    let no_purpose = token_with("user/*.rs", None, Some("Practitioner/p1"));
    let reply = call_as_is(&app, with_token(get(&alice_obs), &no_purpose)).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    let treating = token_for_purpose("user/*.rs", None, Some("Practitioner/p1"), Some("TREAT"));
    let reply = call_as_is(&app, with_token(get(&alice_obs), &treating)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());

    // Bob permits everyone, but denies everyone with an exception for one doctor: the
    // deny holds (exceptions are not evaluated, so they never open anything).
    create(&app, consent(&w.bob, "permit", None)).await;
    let mut deny = consent(&w.bob, "deny", None);
    deny["provision"]["provision"] = json!([{"type": "permit",
        "actor": [{"role": {"text": "x"}, "reference": {"reference": "Practitioner/p1"}}]}]);
    create(&app, deny).await;
    let reply = call_as_is(
        &app,
        with_token(get(&format!("/fhir/Observation/{}", w.bob_obs)), &treating),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());

    // A clinician cannot write herself a Consent, even in an emergency; the patient can,
    // for herself only.
    let write_consent = |token: String, patient: String| {
        let app = &app;
        let body = consent(&patient, "permit", Some("Practitioner/p9"));
        async move { call_as_is(app, with_token(post("/fhir/Consent", &body), &token)).await }
    };
    let writer = token_with("user/*.cruds", None, Some("Practitioner/p9"));
    let reply = write_consent(writer, w.bob.clone()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    assert!(reply.text().contains("consent-writer"), "{}", reply.text());
    let emergency = token_for_purpose(
        "user/*.cruds",
        None,
        Some("Practitioner/p9"),
        Some("ETREAT"),
    );
    let reply = write_consent(emergency, w.bob.clone()).await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN);
    let bobs_app = token_with("patient/*.cruds", Some(&w.bob), None);
    let reply = write_consent(bobs_app.clone(), w.bob.clone()).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    let reply = write_consent(bobs_app, w.alice.clone()).await;
    assert_eq!(
        reply.status,
        StatusCode::FORBIDDEN,
        "Bob writes no Consent for Alice"
    );
}

/// Finding 8: More active Consents than the old global cap do not stop clinicians: Consents are
/// found by the index, per patient or per requester.
async fn many_consents_are_no_outage(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let w = world(&app).await;
    create(&app, consent(&w.alice, "permit", Some("Practitioner/p1"))).await;
    // 10,001 Consents of other patients for other practitioners, in two transactions.
    for batch in 0..2 {
        let entries: Vec<Value> = (0..5_001)
            .map(|i| {
                post_entry(consent(
                    &format!("other-{batch}-{i}"),
                    "permit",
                    Some("Practitioner/p2"),
                ))
            })
            .collect();
        let reply = call(&app, post("/fhir", &transaction(entries))).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    let clinician = token_with("user/*.rs", None, Some("Practitioner/p1"));
    let reply = call_as_is(
        &app,
        with_token(
            get(&format!("/fhir/Observation/{}", w.alice_obs)),
            &clinician,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let reply = call_as_is(&app, with_token(get("/fhir/Observation"), &clinician)).await;
    assert_eq!(ids_of(&reply), BTreeSet::from([w.alice_obs.clone()]));
}

/// Finding 9: Requests with a bad token are refused 401, then 429 past the address's limit, and
/// ledgered as one entry per address and reason with the count, not one entry each.
async fn unauthenticated_refusals_are_limited_and_aggregated(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let before = all_entries(&app, &state).await.len();
    let attacker: std::net::SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let garbage = |address: std::net::SocketAddr| {
        get("/fhir/Patient")
            .insert_header(("Authorization", "Bearer garbage.token.here"))
            .peer_addr(address)
    };
    let mut statuses = std::collections::BTreeMap::new();
    let mut receipts = BTreeSet::new();
    for _ in 0..200 {
        let reply = call_as_is(&app, garbage(attacker)).await;
        *statuses.entry(reply.status.as_u16()).or_insert(0) += 1;
        if reply.status == StatusCode::TOO_MANY_REQUESTS {
            let wait: u64 = reply.header("retry-after").unwrap().parse().unwrap();
            assert!((1..=60).contains(&wait));
            assert_eq!(reply.outcome_issue()["code"], "throttled");
        }
        receipts.insert(reply.header("x-ledger-entry").unwrap());
    }
    assert_eq!(
        statuses,
        std::collections::BTreeMap::from([(401, 60), (429, 140)])
    );
    assert_eq!(receipts.len(), 2, "one aggregate per reason: {receipts:?}");
    // Another address is not limited by this one, and valid tokens are never limited.
    let neighbour: std::net::SocketAddr = "192.0.2.8:40000".parse().unwrap();
    assert_eq!(
        call_as_is(&app, garbage(neighbour)).await.status,
        StatusCode::UNAUTHORIZED
    );
    let valid = call(&app, get("/fhir/Patient").peer_addr(attacker)).await;
    assert_eq!(valid.status, StatusCode::OK);

    let ledger = state.ledger.clone();
    let written = actix_web::rt::task::spawn_blocking(move || ledger.flush_refusals(true))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(written, 3);
    let entries = all_entries(&app, &state).await;
    let refusals: Vec<&Value> = entries[before..]
        .iter()
        .filter(|e| e["action"] == "authenticate")
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    let from_attacker: u64 = refusals
        .iter()
        .filter(|e| e["source"] == "192.0.2.7")
        .map(|e| e["count"].as_u64().unwrap())
        .sum();
    assert_eq!(from_attacker, 200);
    for receipt in receipts {
        let entry = common::ledger_entry_by_receipt(&app, &receipt).await;
        assert_eq!(entry["actor"]["subject"], "anonymous");
        assert!(["malformed-token", "rate-limited"].contains(&entry["reason"].as_str().unwrap()));
    }
}

on_both_backends!(
    unauthenticated_refusals_are_limited_and_aggregated,
    patches_are_bounded,
    writes_to_another_record_tell_nothing,
    absent_and_outside_look_alike,
    inner_searches_are_authorized_and_confined,
    conditional_references_resolve_with_the_requesters_rights,
    confined_tokens_stay_inside_on_every_type,
    each_patients_view_is_their_own,
    consent_fails_closed,
    many_consents_are_no_outage,
    confined_writes_need_every_record_open,
    revincludes_look_only_inside,
    searches_are_bounded,
);
