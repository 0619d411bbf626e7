//! Bulk export (`$export`, Bulk Data Access IG 2.0.0): kick-off, status, manifest, files
//! and cancellation; what a token may export (system, a patient's own compartment, a
//! Group's members, `_type`, `_typeFilter`, `_since`); files only for the token that
//! started the job, sealed at rest; and every exported record ledgered to its patient.
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
use common::{Reply, TestApp, TestDb, call, call_as_is, create_each, local, put, token_with};
use fhirledger::access::local_issuer::TokenRequest;
use fhirledger::api::AppState;
use serde_json::{Value, json};

on_both_backends!(
    a_system_export_writes_every_resource_once_and_ledgers_each_patient,
    exports_hold_only_what_the_token_and_parameters_allow,
    jobs_and_files_belong_to_the_token_that_started_them,
    kick_off_errors_are_operation_outcomes,
    a_job_outlives_the_process_that_started_it,
);

fn with_token(request: TestRequest, token: &str) -> TestRequest {
    request.insert_header(("Authorization", format!("Bearer {token}")))
}

fn async_get(path: &str) -> TestRequest {
    TestRequest::get()
        .uri(path)
        .insert_header(("Prefer", "respond-async"))
        .insert_header(("Accept", "application/fhir+json"))
}

/// Two patients with two Observations each, and a Practitioner in no compartment.
async fn seed<S: TestApp<B>, B: actix_web::body::MessageBody>(app: &S) {
    let mut resources =
        vec![json!({"resourceType": "Practitioner", "id": "doc", "name": [{"family": "Who"}]})];
    for patient in ["p1", "p2"] {
        resources.push(json!({"resourceType": "Patient", "id": patient, "gender": "female"}));
        for n in 1..=2 {
            resources.push(json!({
                "resourceType": "Observation", "id": format!("{patient}-o{n}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": format!("code-{n}")}]},
                "subject": {"reference": format!("Patient/{patient}")}
            }));
        }
    }
    create_each(app, resources).await;
}

async fn run_jobs(state: &AppState) -> usize {
    let resources = state.resources.clone();
    tokio::task::spawn_blocking(move || resources.run_export_jobs())
        .await
        .unwrap()
        .unwrap()
}

/// Kicks off `path` with `token`, runs the job and returns the manifest.
async fn export<S: TestApp<B>, B: actix_web::body::MessageBody>(
    app: &S,
    state: &AppState,
    token: &str,
    path: &str,
) -> (String, Value) {
    let reply = call_as_is(app, with_token(async_get(path), token)).await;
    assert_eq!(
        reply.status,
        StatusCode::ACCEPTED,
        "{path}: {}",
        reply.text()
    );
    let status_url = local(&reply.header("content-location").unwrap());
    assert_eq!(run_jobs(state).await, 1);
    let reply = call_as_is(app, with_token(TestRequest::get().uri(&status_url), token)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    (status_url, reply.json())
}

/// Every resource of a manifest's files, by `Type/id`, with the file's type checked.
async fn exported<S: TestApp<B>, B: actix_web::body::MessageBody>(
    app: &S,
    token: &str,
    manifest: &Value,
) -> Vec<Value> {
    let mut resources = Vec::new();
    for output in manifest["output"].as_array().unwrap() {
        let reply: Reply = call_as_is(
            app,
            with_token(
                TestRequest::get().uri(&local(output["url"].as_str().unwrap())),
                token,
            ),
        )
        .await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(
            reply.header("content-type").unwrap(),
            "application/fhir+ndjson"
        );
        let lines: Vec<Value> = reply
            .text()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, output["count"].as_u64().unwrap());
        for line in &lines {
            assert_eq!(line["resourceType"], output["type"]);
        }
        resources.extend(lines);
    }
    resources
}

fn names(resources: &[Value]) -> BTreeSet<String> {
    resources
        .iter()
        .map(|r| {
            format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            )
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

async fn a_system_export_writes_every_resource_once_and_ledgers_each_patient(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    seed(&app).await;
    let admin = token_with("system/*.rs ledger.read", None, None);

    // Before the job runs, the status URL says it is in progress.
    let reply = call_as_is(&app, with_token(async_get("/fhir/$export"), &admin)).await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let status_url = local(&reply.header("content-location").unwrap());
    assert!(
        status_url.starts_with("/fhir/$export-status/"),
        "{status_url}"
    );
    let pending = call_as_is(
        &app,
        with_token(TestRequest::get().uri(&status_url), &admin),
    )
    .await;
    assert_eq!(pending.status, StatusCode::ACCEPTED);
    assert!(pending.header("x-progress").is_some());
    assert!(pending.header("retry-after").is_some());

    assert_eq!(run_jobs(&state).await, 1);
    let manifest = call_as_is(
        &app,
        with_token(TestRequest::get().uri(&status_url), &admin),
    )
    .await;
    assert_eq!(manifest.status, StatusCode::OK, "{}", manifest.text());
    let manifest = manifest.json();
    assert_eq!(manifest["requiresAccessToken"], true);
    assert!(
        manifest["request"]
            .as_str()
            .unwrap()
            .ends_with("/fhir/$export")
    );
    assert!(manifest["transactionTime"].is_string());
    assert_eq!(manifest["error"], json!([]));
    let resources = exported(&app, &admin, &manifest).await;
    assert_eq!(resources.len(), 7, "each resource once");
    assert_eq!(
        names(&resources),
        set(&[
            "Practitioner/doc",
            "Patient/p1",
            "Patient/p2",
            "Observation/p1-o1",
            "Observation/p1-o2",
            "Observation/p2-o1",
            "Observation/p2-o2"
        ])
    );
    // Each line is the resource as a read returns it.
    for resource in &resources {
        let path = format!(
            "/fhir/{}/{}",
            resource["resourceType"].as_str().unwrap(),
            resource["id"].as_str().unwrap()
        );
        assert_eq!(&call(&app, common::get(&path)).await.json(), resource);
    }

    // The files are sealed at rest: no resource content in the table.
    let mut conn = db.connect();
    let plain: i64 = {
        use diesel::RunQueryDsl as _;
        #[derive(diesel::QueryableByName)]
        struct Count {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let rows: Vec<Count> = diesel::sql_query("SELECT COUNT(*) AS n FROM export_files")
            .load(&mut conn)
            .unwrap();
        rows[0].n
    };
    assert!(plain > 0);
    let stored = db_bytes(&db, "SELECT ciphertext FROM export_files");
    for bytes in &stored {
        let text = String::from_utf8_lossy(bytes);
        assert!(
            !text.contains("Observation") && !text.contains("p1-o1"),
            "a file is stored in clear"
        );
    }

    // Each patient's view of the ledger shows their record leaving, and only theirs.
    state.ledger.sequence_pending().unwrap();
    let auditor = token_with("ledger.read", None, None);
    let view = call_as_is(
        &app,
        with_token(
            common::get("/fhir/AuditEvent?patient=p1&_count=100"),
            &auditor,
        ),
    )
    .await;
    assert_eq!(view.status, StatusCode::OK, "{}", view.text());
    let exports: Vec<Value> = view.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"].clone())
        .filter(|event| event["type"]["code"] == "110106")
        .collect();
    // One entry per file that held p1's resources (a file is one type's page).
    assert_eq!(exports.len(), 2, "{exports:?}");
    let named: BTreeSet<String> = exports
        .iter()
        .flat_map(|event| event["entity"].as_array().unwrap().iter())
        .map(|e| {
            e["what"]["reference"]
                .as_str()
                .unwrap()
                .split("/_history")
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        named,
        set(&["Patient/p1", "Observation/p1-o1", "Observation/p1-o2"])
    );
    assert_eq!(exports[0]["agent"][0]["altId"], "test-client");

    // Cancelling a finished export deletes it and its files.
    let file_url = local(manifest["output"][0]["url"].as_str().unwrap());
    let reply = call_as_is(
        &app,
        with_token(TestRequest::delete().uri(&status_url), &admin),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    for path in [&status_url, &file_url] {
        let reply = call_as_is(&app, with_token(TestRequest::get().uri(path), &admin)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}");
    }
    assert!(db_bytes(&db, "SELECT ciphertext FROM export_files").is_empty());
}

fn db_bytes(db: &TestDb, sql: &str) -> Vec<Vec<u8>> {
    use diesel::RunQueryDsl as _;
    #[derive(diesel::QueryableByName)]
    struct Bytes {
        #[diesel(sql_type = diesel::sql_types::Binary)]
        ciphertext: Vec<u8>,
    }
    let mut conn = db.connect();
    let rows: Vec<Bytes> = diesel::sql_query(sql).load(&mut conn).unwrap();
    rows.into_iter().map(|r| r.ciphertext).collect()
}

async fn exports_hold_only_what_the_token_and_parameters_allow(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    seed(&app).await;
    let admin = token_with("system/*.rs", None, None);

    // A patient's token exports its own compartment and nothing else.
    let own = token_with("patient/*.rs", Some("p1"), None);
    let (_, manifest) = export(&app, &state, &own, "/fhir/Patient/$export").await;
    assert_eq!(
        names(&exported(&app, &own, &manifest).await),
        set(&["Patient/p1", "Observation/p1-o1", "Observation/p1-o2"])
    );

    // A Group exports its members' records; _type narrows the types.
    let group = json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p2"}}]});
    assert_eq!(
        call(&app, put("/fhir/Group/g1", &group)).await.status,
        StatusCode::CREATED
    );
    let (_, manifest) = export(
        &app,
        &state,
        &admin,
        "/fhir/Group/g1/$export?_type=Observation",
    )
    .await;
    assert_eq!(
        names(&exported(&app, &admin, &manifest).await),
        set(&["Observation/p2-o1", "Observation/p2-o2"])
    );

    // Below the system level, only what is in a patient's compartment: an Observation that
    // names no patient is in the system-level export, not in the Patient-level one.
    let orphan = json!({"resourceType": "Observation", "id": "orphan", "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "code-9"}]}});
    assert_eq!(
        call(&app, put("/fhir/Observation/orphan", &orphan))
            .await
            .status,
        StatusCode::CREATED
    );
    let observations = set(&[
        "Observation/p1-o1",
        "Observation/p1-o2",
        "Observation/p2-o1",
        "Observation/p2-o2",
    ]);
    let mut with_orphan = observations.clone();
    with_orphan.insert("Observation/orphan".to_owned());
    for (path, expected) in [
        ("/fhir/Patient/$export?_type=Observation", observations),
        ("/fhir/$export?_type=Observation", with_orphan),
    ] {
        let (status_url, manifest) = export(&app, &state, &admin, path).await;
        assert_eq!(
            names(&exported(&app, &admin, &manifest).await),
            expected,
            "{path}"
        );
        // Done with it: the client's few kept jobs are for the exports below.
        let reply = call_as_is(
            &app,
            with_token(TestRequest::delete().uri(&status_url), &admin),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    }

    // _typeFilter: of Observations, only those the search matches.
    let (_, manifest) = export(
        &app,
        &state,
        &admin,
        "/fhir/$export?_type=Observation,Patient&_typeFilter=Observation%3Fcode%3Dhttp%3A%2F%2Floinc.org%7Ccode-2",
    )
    .await;
    assert_eq!(
        names(&exported(&app, &admin, &manifest).await),
        set(&[
            "Patient/p1",
            "Patient/p2",
            "Observation/p1-o2",
            "Observation/p2-o2"
        ])
    );

    // POST with a Parameters body: `patient` narrows a Patient-level export.
    let parameters = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Observation"},
        {"name": "patient", "valueReference": {"reference": "Patient/p1"}},
    ]});
    let reply = call_as_is(
        &app,
        with_token(
            common::fhir_json(
                TestRequest::post().uri("/fhir/Patient/$export"),
                &parameters,
            )
            .insert_header(("Prefer", "respond-async")),
            &admin,
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    let status_url = local(&reply.header("content-location").unwrap());
    assert_eq!(run_jobs(&state).await, 1);
    let manifest = call_as_is(
        &app,
        with_token(TestRequest::get().uri(&status_url), &admin),
    )
    .await
    .json();
    assert_eq!(
        names(&exported(&app, &admin, &manifest).await),
        set(&["Observation/p1-o1", "Observation/p1-o2"])
    );
    call_as_is(
        &app,
        with_token(TestRequest::delete().uri(&status_url), &admin),
    )
    .await;

    // A type named twice is exported once.
    let (_, manifest) = export(&app, &state, &admin, "/fhir/$export?_type=Patient,Patient").await;
    assert_eq!(exported(&app, &admin, &manifest).await.len(), 2);

    // _since: only what changed after the instant.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = fhirledger::fhir::document::format_instant(fhirledger::clock::now_micros());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let changed = json!({"resourceType": "Patient", "id": "p2", "gender": "male"});
    assert_eq!(
        call(&app, put("/fhir/Patient/p2", &changed)).await.status,
        StatusCode::OK
    );
    let path = format!("/fhir/$export?_since={}", since.replace('+', "%2B"));
    let (_, manifest) = export(&app, &state, &admin, &path).await;
    let resources = exported(&app, &admin, &manifest).await;
    assert_eq!(names(&resources), set(&["Patient/p2"]));
    assert_eq!(resources[0]["gender"], "male");

    // A token that may not search a type it names is refused, and the refusal ledgered.
    let only_patients = token_with("system/Patient.rs", None, None);
    let reply = call_as_is(
        &app,
        with_token(async_get("/fhir/$export?_type=Observation"), &only_patients),
    )
    .await;
    assert_eq!(reply.status, StatusCode::FORBIDDEN, "{}", reply.text());
    // Without _type, it exports the types it may search.
    let (_, manifest) = export(&app, &state, &only_patients, "/fhir/$export").await;
    assert_eq!(
        names(&exported(&app, &only_patients, &manifest).await),
        set(&["Patient/p1", "Patient/p2"])
    );
}

async fn jobs_and_files_belong_to_the_token_that_started_them(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    seed(&app).await;
    let owner = token_with("system/*.rs", None, None);
    let (status_url, manifest) = export(&app, &state, &owner, "/fhir/$export?_type=Patient").await;
    let file_url = local(manifest["output"][0]["url"].as_str().unwrap());
    let stranger = common::local_issuer()
        .mint(&TokenRequest {
            subject: "someone-else".into(),
            scope: "system/*.rs".into(),
            client_id: Some("other-client".into()),
            patient: None,
            fhir_user: None,
            purpose_of_use: None,
            ttl_seconds: 600,
        })
        .unwrap();
    for request in [
        TestRequest::get().uri(&status_url),
        TestRequest::get().uri(&file_url),
        TestRequest::delete().uri(&status_url),
    ] {
        let reply = call_as_is(&app, with_token(request, &stranger)).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    }
    // The same user and client with another grant (an auditor's scopes) is not the owner.
    let same_client_other_grant = token_with("ledger.read", None, None);
    let reply = call_as_is(
        &app,
        with_token(TestRequest::get().uri(&file_url), &same_client_other_grant),
    )
    .await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
    // Without a token at all: 401.
    let reply = call_as_is(&app, TestRequest::get().uri(&file_url)).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    // The owner still has everything.
    let reply = call_as_is(&app, with_token(TestRequest::get().uri(&file_url), &owner)).await;
    assert_eq!(reply.status, StatusCode::OK);

    // One owner keeps at most four exports; the fifth kick-off is told to delete one.
    for _ in 0..3 {
        let reply = call_as_is(
            &app,
            with_token(async_get("/fhir/$export?_type=Patient"), &owner),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
    }
    let reply = call_as_is(
        &app,
        with_token(async_get("/fhir/$export?_type=Patient"), &owner),
    )
    .await;
    assert_eq!(reply.status, StatusCode::CONFLICT, "{}", reply.text());
    let reply = call_as_is(
        &app,
        with_token(TestRequest::delete().uri(&status_url), &owner),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED);
    let reply = call_as_is(
        &app,
        with_token(async_get("/fhir/$export?_type=Patient"), &owner),
    )
    .await;
    assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
}

async fn kick_off_errors_are_operation_outcomes(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let admin = token_with("system/*.rs", None, None);
    let refused = |request: TestRequest| {
        let app = &app;
        let admin = admin.clone();
        async move { call_as_is(app, with_token(request, &admin)).await }
    };
    let reply = refused(TestRequest::get().uri("/fhir/$export")).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.outcome_issue()["diagnostics"]
            .as_str()
            .unwrap()
            .contains("respond-async")
    );
    for (path, status) in [
        (
            "/fhir/$export?_outputFormat=text/csv",
            StatusCode::BAD_REQUEST,
        ),
        ("/fhir/$export?_since=yesterday", StatusCode::BAD_REQUEST),
        ("/fhir/$export?_elements=id", StatusCode::BAD_REQUEST),
        ("/fhir/$export?patient=Patient/p1", StatusCode::BAD_REQUEST),
        ("/fhir/$export?_type=Spaceship", StatusCode::NOT_FOUND),
        (
            "/fhir/$export?_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/$export?_type=Observation&_typeFilter=Observation%3Fnope%3D1",
            StatusCode::BAD_REQUEST,
        ),
        (
            "/fhir/Patient/$export?_type=Practitioner",
            StatusCode::BAD_REQUEST,
        ),
        ("/fhir/Group/none/$export", StatusCode::NOT_FOUND),
    ] {
        let reply = refused(async_get(path)).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        reply.outcome_issue();
    }
    // Nothing was queued by any of them.
    assert_eq!(run_jobs(&state).await, 0);
    // The CapabilityStatement says where export is.
    let statement = call_as_is(&app, common::get("/fhir/metadata")).await.json();
    assert_eq!(
        statement["instantiates"][0],
        "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data"
    );
    assert_eq!(statement["rest"][0]["operation"][0]["name"], "export");
    for (resource, definition) in [("Patient", "patient-export"), ("Group", "group-export")] {
        let described = statement["rest"][0]["resource"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["type"] == resource)
            .unwrap()["operation"]
            .to_string();
        assert!(described.contains(definition), "{resource}: {described}");
    }
    // An unknown job: 404.
    let reply = refused(TestRequest::get().uri("/fhir/$export-status/nothing-here")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

/// The same keys each time: a restarted server opens what the last one sealed.
fn keys() -> fhirledger::server::Keys {
    fhirledger::server::Keys {
        master: fhirledger::crypto::MasterKey::from_bytes([7; 32]),
        ledger: fhirledger::ledger::LedgerKey::from_seed([8; 32], common::LEDGER_ORIGIN).unwrap(),
        index: fhirledger::crypto::BlindIndexKey::from_bytes([9; 32]),
        local_issuer: Some(common::local_issuer()),
    }
}

async fn a_job_outlives_the_process_that_started_it(db: TestDb) {
    let admin = token_with("system/*.rs", None, None);
    let status_url = {
        let before = db.state_with_keys(keys(), 16 * 1024 * 1024);
        let app = test::init_service(fhirledger::api::build_app(before.clone())).await;
        seed(&app).await;
        let reply = call_as_is(
            &app,
            with_token(async_get("/fhir/$export?_type=Patient"), &admin),
        )
        .await;
        assert_eq!(reply.status, StatusCode::ACCEPTED, "{}", reply.text());
        local(&reply.header("content-location").unwrap())
    };
    // A runner took the job, wrote a file and stopped: its lease ran out.
    let job = status_url.rsplit('/').next().unwrap().to_owned();
    {
        let mut conn = db.connect();
        let claimed = fhirledger::store::exports::claim(&mut conn, i64::MAX - 1, 1).unwrap();
        assert_eq!(claimed.unwrap().id, job);
        let stale = fhirledger::store::exports::FileInfo {
            file_no: 1,
            resource_type: "Patient".into(),
            resource_count: 99,
        };
        let blob = fhirledger::crypto::EncryptedBlob {
            key_id: "k".into(),
            wrapped_key: vec![1],
            nonce: vec![2],
            ciphertext: vec![3],
        };
        fhirledger::store::exports::insert_file(&mut conn, &job, &stale, &blob).unwrap();
    }
    // The next process takes it up from the start and finishes it.
    let after = db.state_with_keys(keys(), 16 * 1024 * 1024);
    let app = test::init_service(fhirledger::api::build_app(after.clone())).await;
    let reply = call_as_is(
        &app,
        with_token(TestRequest::get().uri(&status_url), &admin),
    )
    .await;
    assert_eq!(
        reply.status,
        StatusCode::ACCEPTED,
        "still running as far as anyone knows"
    );
    assert_eq!(run_jobs(&after).await, 1);
    let reply = call_as_is(
        &app,
        with_token(TestRequest::get().uri(&status_url), &admin),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let manifest = reply.json();
    assert_eq!(
        manifest["output"].as_array().unwrap().len(),
        1,
        "the stale file is gone: {manifest}"
    );
    assert_eq!(
        names(&exported(&app, &admin, &manifest).await),
        set(&["Patient/p1", "Patient/p2"])
    );
}
