//! Bulk import (`fhirledger import`): Synthea's bulk NDJSON loads with its conditional
//! references resolved across files, every resource readable, searchable and ledgered; bad
//! lines are reported without stopping the rest; an interrupted import resumes without
//! writing a line twice; gzip files load like plain ones.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use actix_web::http::StatusCode;
use actix_web::test;
use actix_web::test::TestRequest;
use common::{TestDb, call, fixtures_dir, get, token_with};
use fhirledger::access::RequestContext;
use fhirledger::api::AppState;
use fhirledger::fhir::identifier_index::IdentifierIndex;
use fhirledger::import::{ImportOptions, ImportSummary, run_import};
use fhirledger::service::import::ImportLine;
use serde_json::Value;

on_both_backends!(
    synthea_bulk_data_loads_with_references_resolved_across_files,
    rejected_lines_are_reported_and_the_rest_load,
    an_interrupted_import_resumes_without_duplicates,
    ndjson_posted_to_import_loads_names_rejected_lines_and_resumes_by_source,
    import_over_http_writes_only_what_the_token_may_and_takes_only_ndjson,
);

fn bulk_dir() -> PathBuf {
    fixtures_dir().join("fhir/synthea/bulk-ndjson")
}

fn options(paths: Vec<PathBuf>) -> ImportOptions {
    ImportOptions {
        paths,
        batch_lines: 100,
        max_line_bytes: 1024 * 1024,
        report: None,
        progress: false,
    }
}

async fn import(state: &AppState, options: ImportOptions) -> ImportSummary {
    let state = state.clone();
    tokio::task::spawn_blocking(move || run_import(&state, &options))
        .await
        .unwrap()
        .expect("the import runs")
}

fn lines_of(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

async fn synthea_bulk_data_loads_with_references_resolved_across_files(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let summary = import(&state, options(vec![bulk_dir()])).await;
    let expected: usize = std::fs::read_dir(bulk_dir())
        .unwrap()
        .map(|file| lines_of(&file.unwrap().path()).len())
        .sum();
    assert_eq!(summary.rejected, 0, "{summary:?}");
    assert_eq!(summary.created, expected as u64, "{summary:?}");
    assert_eq!(summary.files, 12);

    // Encounters name their practitioner, location and organization by identifier; the
    // Encounter file sorts before the files of all three.
    let encounter = &lines_of(&bulk_dir().join("Encounter.first100.ndjson"))[0];
    let id = encounter["id"].as_str().unwrap();
    let stored = call(&app, get(&format!("/fhir/Encounter/{id}"))).await;
    assert_eq!(stored.status, StatusCode::OK);
    let stored = stored.json();
    assert_eq!(stored["meta"]["versionId"], "1");
    let practitioner = stored["participant"][0]["individual"]["reference"]
        .as_str()
        .unwrap();
    assert!(
        practitioner.starts_with("Practitioner/") && !practitioner.contains('?'),
        "{practitioner}"
    );
    let reply = call(&app, get(&format!("/fhir/{practitioner}"))).await;
    assert_eq!(reply.status, StatusCode::OK);
    let npi = encounter["participant"][0]["individual"]["reference"]
        .as_str()
        .unwrap()
        .rsplit('|')
        .next()
        .unwrap();
    assert!(
        reply.json()["identifier"].to_string().contains(npi),
        "the reference resolved to the practitioner carrying NPI {npi}"
    );
    // Everything else is as in the file.
    let mut original = encounter.clone();
    let mut loaded = stored.clone();
    for resource in [&mut original, &mut loaded] {
        let object = resource.as_object_mut().unwrap();
        object.remove("meta");
        object.remove("participant");
        object.remove("location");
        object.remove("serviceProvider");
    }
    assert_eq!(loaded, original);

    // Searchable by the index the import wrote.
    let patient = encounter["subject"]["reference"].as_str().unwrap();
    let in_file = lines_of(&bulk_dir().join("Encounter.first100.ndjson"))
        .iter()
        .filter(|e| e["subject"]["reference"] == patient)
        .count();
    let found = call(
        &app,
        get(&format!(
            "/fhir/Encounter?subject={patient}&_count=200&_total=accurate"
        )),
    )
    .await
    .json();
    assert_eq!(found["total"], in_file);

    // Every write is in a signed checkpoint by the time the import returns.
    let checkpoint = call(&app, get("/ledger/checkpoint")).await.text();
    let size: u64 = checkpoint.lines().nth(1).unwrap().parse().unwrap();
    assert!(
        size >= expected as u64,
        "tree size {size} after {expected} writes"
    );

    // Importing the same files again loads nothing twice.
    let again = import(&state, options(vec![bulk_dir()])).await;
    assert_eq!(again.written(), 0, "{again:?}");
    assert_eq!(again.lines_already_done, expected as u64);
}

async fn rejected_lines_are_reported_and_the_rest_load(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        r#"{"resourceType":"Patient","id":"ok-1","name":[{"family":"Ok"}]}"#.to_owned(),
        r#"{"resourceType":"Patient","id":"#.to_owned(),
        r#"{"resourceType":"Spaceship","id":"s1"}"#.to_owned(),
        r#"{"resourceType":"Patient","id":"bad-date","birthDate":"yesterday"}"#.to_owned(),
        String::new(),
        format!(
            r#"{{"resourceType":"Patient","id":"long","text":{{"status":"generated","div":"<div xmlns=\"http://www.w3.org/1999/xhtml\">{}</div>"}}}}"#,
            "x".repeat(3000)
        ),
        r#"{"resourceType":"Observation","id":"o1","status":"final","code":{"text":"x"},"subject":{"reference":"Patient?identifier=urn:nowhere|0"}}"#.to_owned(),
        r#"{"resourceType":"Observation","id":"o2","status":"final","code":{"text":"x"},"subject":{"reference":"urn:uuid:0b3a6c4e-0000-4000-8000-000000000000"}}"#.to_owned(),
        r#"{"resourceType":"Patient","id":"ok-2","name":[{"family":"Ok"}]}"#.to_owned(),
    ];
    // The same lines gzipped: a gzip file loads as a plain one does.
    let path = dir.path().join("mixed.ndjson.gz");
    let mut gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&path).unwrap(),
        flate2::Compression::default(),
    );
    gz.write_all(lines.join("\n").as_bytes()).unwrap();
    gz.finish().unwrap();
    let report = dir.path().join("rejected.ndjson");
    let mut options = options(vec![path.clone()]);
    options.report = Some(report.clone());
    options.max_line_bytes = 2000;
    options.batch_lines = 4;
    let summary = import(&state, options).await;
    assert_eq!(summary.created, 2, "{summary:?}");
    assert_eq!(summary.rejected, 6, "{summary:?}");

    let reported = lines_of(&report);
    let numbers: Vec<u64> = reported
        .iter()
        .map(|r| r["line"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [2, 3, 4, 6, 7, 8]);
    for rejected in &reported {
        assert_eq!(rejected["file"], path.display().to_string());
        assert_eq!(rejected["outcome"]["resourceType"], "OperationOutcome");
        assert_eq!(rejected["outcome"]["issue"][0]["severity"], "error");
    }
    let diagnostics =
        |line: usize| reported[line]["outcome"]["issue"][0]["diagnostics"].to_string();
    assert!(diagnostics(1).contains("Spaceship"), "{}", diagnostics(1));
    assert!(
        diagnostics(4).contains("matches no resource"),
        "{}",
        diagnostics(4)
    );
    assert!(diagnostics(5).contains("urn:uuid"), "{}", diagnostics(5));

    for (id, status) in [
        ("ok-1", StatusCode::OK),
        ("ok-2", StatusCode::OK),
        ("bad-date", StatusCode::NOT_FOUND),
        ("long", StatusCode::NOT_FOUND),
    ] {
        let reply = call(&app, get(&format!("/fhir/Patient/{id}"))).await;
        assert_eq!(reply.status, status, "Patient/{id}");
    }
    let reply = call(&app, get("/fhir/Observation/o1")).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
}

async fn an_interrupted_import_resumes_without_duplicates(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let file = bulk_dir().join("Patient.000.ndjson");
    let patients = lines_of(&file);
    let text = std::fs::read_to_string(&file).unwrap();
    let digest: String = {
        use sha2::Digest as _;
        sha2::Sha256::digest(std::fs::read(&file).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    // A run that stopped after its first batch of five lines.
    let first: Vec<ImportLine> = text
        .lines()
        .take(5)
        .enumerate()
        .map(|(index, line)| ImportLine {
            number: index as u64 + 1,
            text: line.to_owned(),
        })
        .collect();
    {
        let state = state.clone();
        tokio::task::spawn_blocking(move || {
            state.resources.import_batch(
                &RequestContext::internal("test"),
                &IdentifierIndex::default(),
                Some(&digest),
                &first,
                5,
            )
        })
        .await
        .unwrap()
        .unwrap();
    }
    let summary = import(&state, options(vec![file])).await;
    assert_eq!(summary.lines_already_done, 5);
    assert_eq!(summary.created, patients.len() as u64 - 5, "{summary:?}");
    for patient in &patients {
        let id = patient["id"].as_str().unwrap();
        let history = call(&app, get(&format!("/fhir/Patient/{id}/_history"))).await;
        assert_eq!(history.status, StatusCode::OK);
        assert_eq!(history.json()["total"], 1, "Patient/{id} was written once");
    }
}

fn ndjson_import(query: &str, body: impl Into<Vec<u8>>) -> TestRequest {
    TestRequest::post()
        .uri(&format!("/fhir/$import{query}"))
        .insert_header(("Content-Type", "application/fhir+ndjson"))
        .set_payload(body.into())
}

/// The count named `name` in an import's `Parameters` answer.
fn count(answer: &Value, name: &str) -> u64 {
    answer["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["valueInteger"].as_u64())
        .unwrap_or_else(|| panic!("no {name} in {answer}"))
}

/// Each rejected line's number and the code of its outcome's issue.
fn rejections(answer: &Value) -> Vec<(u64, String)> {
    answer["parameter"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["name"] == "rejection")
        .map(|p| {
            let line = p["part"][0]["valueInteger"].as_u64().unwrap();
            let code = p["part"][1]["resource"]["issue"][0]["code"]
                .as_str()
                .unwrap();
            (line, code.to_owned())
        })
        .collect()
}

async fn ndjson_posted_to_import_loads_names_rejected_lines_and_resumes_by_source(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    // Targets of conditional references first, as the answer's documentation asks.
    let mut body = String::new();
    let mut good = 0;
    for file in [
        "Organization.000.ndjson",
        "Location.000.ndjson",
        "Practitioner.000.ndjson",
        "Patient.000.ndjson",
        "Encounter.first100.ndjson",
    ] {
        let text = std::fs::read_to_string(bulk_dir().join(file)).unwrap();
        good += text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
        body.push_str(&text);
        if !body.ends_with('\n') {
            body.push('\n');
        }
    }
    let good_lines = body.lines().count() as u64;
    // An unreadable line, a blank one, and a type no client may write.
    body.push_str("{\"resourceType\":\"Patient\",\"id\":\n\r\n");
    body.push_str(r#"{"resourceType":"AuditEvent","id":"forged","type":{"code":"x"},"recorded":"2026-01-01T00:00:00Z","agent":[{"requestor":true}],"source":{"observer":{"display":"x"}}}"#);
    let lines = good_lines + 3;

    let reply = call(&app, ndjson_import("?source=nightly", body.clone())).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(answer["resourceType"], "Parameters");
    assert_eq!(count(&answer, "lines"), lines);
    assert_eq!(count(&answer, "created"), good);
    assert_eq!(count(&answer, "updated"), 0);
    assert_eq!(count(&answer, "rejected"), 2);
    assert_eq!(
        rejections(&answer),
        [
            (good_lines + 1, "invalid".to_owned()),
            (lines, "forbidden".to_owned())
        ]
    );

    // A conditional reference resolved to the Practitioner sent earlier in the body.
    let encounter = &lines_of(&bulk_dir().join("Encounter.first100.ndjson"))[0];
    let id = encounter["id"].as_str().unwrap();
    let stored = call(&app, get(&format!("/fhir/Encounter/{id}")))
        .await
        .json();
    let practitioner = stored["participant"][0]["individual"]["reference"]
        .as_str()
        .unwrap();
    assert!(practitioner.starts_with("Practitioner/"), "{practitioner}");
    assert_eq!(
        call(&app, get(&format!("/fhir/{practitioner}")))
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, get("/fhir/AuditEvent/forged")).await.status,
        StatusCode::NOT_FOUND
    );

    // The same source again: every line was loaded, nothing is written twice.
    let again = call(&app, ndjson_import("?source=nightly", body.clone()))
        .await
        .json();
    assert_eq!(count(&again, "linesAlreadyLoaded"), lines, "{again}");
    assert_eq!(count(&again, "created") + count(&again, "updated"), 0);
    assert_eq!(count(&again, "rejected"), 0);

    // Without a source, the lines are loaded again: as new versions.
    let unnamed = call(&app, ndjson_import("", body)).await.json();
    assert_eq!(count(&unnamed, "linesAlreadyLoaded"), 0);
    assert_eq!(count(&unnamed, "updated"), good, "{unnamed}");
    let patient = &lines_of(&bulk_dir().join("Patient.000.ndjson"))[0];
    let stored = call(
        &app,
        get(&format!(
            "/fhir/Patient/{}",
            patient["id"].as_str().unwrap()
        )),
    )
    .await
    .json();
    assert_eq!(stored["meta"]["versionId"], "2");
}

async fn import_over_http_writes_only_what_the_token_may_and_takes_only_ndjson(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let line = |id: &str| {
        format!(r#"{{"resourceType":"Patient","id":"{id}","name":[{{"family":"Mine"}}]}}"#)
    };

    // A patient's own token confines its writes: import, which writes at ids it is given,
    // is not for it, even for its own record; each line is refused and ledgered.
    let own = token_with("patient/*.cruds", Some("p-own"), None);
    let reply = call(
        &app,
        ndjson_import("", format!("{}\n{}\n", line("p-own"), line("p-other")))
            .insert_header(("Authorization", format!("Bearer {own}"))),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let answer = reply.json();
    assert_eq!(count(&answer, "created"), 0);
    assert_eq!(
        rejections(&answer),
        [(1, "forbidden".to_owned()), (2, "forbidden".to_owned())]
    );
    for id in ["p-own", "p-other"] {
        let reply = call(&app, get(&format!("/fhir/Patient/{id}"))).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
    }
    let receipt = reply
        .header("x-ledger-entry")
        .expect("the last refusal's receipt");
    let entry = common::ledger_entry_by_receipt(&app, &receipt).await;
    assert_eq!(entry["outcome"], "deny", "{entry}");
    assert_eq!(entry["rule"], "bulk-import", "{entry}");

    // A token that may read but not write gets its lines refused too.
    let reader = token_with("system/*.rs", None, None);
    let answer = call(
        &app,
        ndjson_import("", line("p-read"))
            .insert_header(("Authorization", format!("Bearer {reader}"))),
    )
    .await
    .json();
    assert_eq!(rejections(&answer), [(1, "forbidden".to_owned())]);

    // A resource named twice in one batch: created by its first line, updated by its second
    // (the batch's new resources are written together, the rest in order after them).
    let answer = call(
        &app,
        ndjson_import(
            "",
            format!("{}\n{}\n{}\n", line("twice"), line("once"), line("twice")),
        ),
    )
    .await
    .json();
    assert_eq!(count(&answer, "created"), 2, "{answer}");
    assert_eq!(count(&answer, "updated"), 1, "{answer}");
    let twice = call(&app, get("/fhir/Patient/twice")).await.json();
    assert_eq!(twice["meta"]["versionId"], "2");
    let history = call(&app, get("/fhir/Patient/twice/_history")).await.json();
    assert_eq!(history["total"], 2, "{history}");
    let found = call(&app, get("/fhir/Patient?family=Mine&_total=accurate"))
        .await
        .json();
    assert_eq!(found["total"], 2, "each resource indexed once: {found}");

    // Only NDJSON, and only the one parameter.
    let reply = call(
        &app,
        TestRequest::post()
            .uri("/fhir/$import")
            .insert_header(("Content-Type", "application/fhir+json"))
            .set_payload(line("p-json")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(reply.text().contains("NDJSON"), "{}", reply.text());
    let reply = call(&app, ndjson_import("?since=2020", line("p-q"))).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    let reply = call(
        &app,
        ndjson_import(&format!("?source={}", "s".repeat(300)), line("p-q")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    // Without credentials, nothing is read.
    let reply = common::call_as_is(&app, ndjson_import("", line("p-anon"))).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        call(&app, get("/fhir/Patient/p-anon")).await.status,
        StatusCode::NOT_FOUND
    );
}
