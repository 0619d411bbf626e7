//! Search end to end on both backends: each parameter type, modifiers, prefixes, chains,
//! `_has`, includes, sorting, paging by cursor, result controls, strict and lenient
//! handling, and the ledger entry every search writes.
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
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use common::{TestDb, call, create_each, get, link, local, put, searchset_ids};
use serde_json::{Value, json};

fn included(bundle: &Value) -> BTreeSet<String> {
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == "include")
                .map(|e| {
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

async fn seed<S, B>(app: &S)
where
    S: common::TestApp<B>,
    B: actix_web::body::MessageBody,
{
    let resources = [
        json!({"resourceType": "Patient", "id": "p1", "active": true, "gender": "female",
               "birthDate": "1974-12-25",
               "identifier": [{"system": "urn:oid:1.2.36.146.595.217.0.1", "value": "12345"}],
               "name": [{"family": "Chalmers", "given": ["Peter", "James"]}],
               "address": [{"city": "PleasantVille", "state": "Vic"}]}),
        json!({"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1990-06",
               "identifier": [{"system": "http://other.example/mrn", "value": "12345"}],
               "name": [{"family": "Müller-Lüdenscheidt", "given": ["Zoë"]}]}),
        json!({"resourceType": "Patient", "id": "p3", "gender": "female", "birthDate": "2001",
               "name": [{"family": "Chalk", "given": ["Anna"]}]}),
        json!({"resourceType": "Practitioner", "id": "dr1", "name": [{"family": "Chalmers"}]}),
        json!({"resourceType": "Observation", "id": "o1", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body Weight"}]},
               "subject": {"reference": "Patient/p1"}, "performer": [{"reference": "Practitioner/dr1"}],
               "effectiveDateTime": "2020-03-01T10:00:00Z",
               "valueQuantity": {"value": 72.5, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}),
        json!({"resourceType": "Observation", "id": "o2", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8302-2"}]},
               "subject": {"reference": "Patient/p1"},
               "effectiveDateTime": "2021-07-15",
               "valueQuantity": {"value": 180, "unit": "cm", "system": "http://unitsofmeasure.org", "code": "cm"}}),
        json!({"resourceType": "Observation", "id": "o3", "status": "preliminary",
               "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
               "subject": {"reference": "Patient/p2"},
               "effectivePeriod": {"start": "2022-01-01", "end": "2022-01-31"},
               "valueQuantity": {"value": 90, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}}),
    ];
    create_each(app, resources).await;
}

async fn parameter_types(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;
    let cases: &[(&str, &[&str])] = &[
        // string: case- and accent-insensitive prefix; :exact
        ("/fhir/Patient?family=chal", &["p1", "p3"]),
        ("/fhir/Patient?family=CHALMERS", &["p1"]),
        ("/fhir/Patient?family=muller", &["p2"]),
        ("/fhir/Patient?family:exact=Chalmers", &["p1"]),
        ("/fhir/Patient?family:exact=chalmers", &[]),
        ("/fhir/Patient?name=zoe", &["p2"]),
        ("/fhir/Patient?given=peter,anna", &["p1", "p3"]),
        ("/fhir/Patient?address-city=pleasant", &["p1"]),
        // longer than the index's prefix bound: checked after decryption
        ("/fhir/Patient?family=muller-ludensch", &["p2"]),
        ("/fhir/Patient?family=muller-ludenschxx", &[]),
        // token
        ("/fhir/Patient?gender=female", &["p1", "p3"]),
        ("/fhir/Patient?identifier=12345", &["p1", "p2"]),
        (
            "/fhir/Patient?identifier=urn:oid:1.2.36.146.595.217.0.1|12345",
            &["p1"],
        ),
        (
            "/fhir/Patient?identifier=http://other.example/mrn|",
            &["p2"],
        ),
        ("/fhir/Patient?gender:not=female", &["p2"]),
        ("/fhir/Patient?identifier:missing=true", &["p3"]),
        ("/fhir/Patient?identifier:missing=false", &["p1", "p2"]),
        ("/fhir/Patient?active=true", &["p1"]),
        (
            "/fhir/Observation?code=http://loinc.org|29463-7",
            &["o1", "o3"],
        ),
        ("/fhir/Observation?code=|29463-7", &[]),
        // date with precision and prefixes
        ("/fhir/Patient?birthdate=1974-12-25", &["p1"]),
        ("/fhir/Patient?birthdate=1974", &["p1"]),
        ("/fhir/Patient?birthdate=1990-06-10", &[]),
        ("/fhir/Patient?birthdate=ge1990", &["p2", "p3"]),
        ("/fhir/Patient?birthdate=lt1990", &["p1"]),
        (
            "/fhir/Patient?birthdate=gt1974-12-25&birthdate=le2000",
            &["p2"],
        ),
        ("/fhir/Patient?birthdate=ne1974-12-25", &["p2", "p3"]),
        ("/fhir/Patient?birthdate=sa1990", &["p3"]),
        ("/fhir/Patient?birthdate=eb1990", &["p1"]),
        ("/fhir/Observation?date=2022-01-15", &[]),
        ("/fhir/Observation?date=ge2022-01-15", &["o3"]),
        ("/fhir/Observation?date=2020-03-01", &["o1"]),
        ("/fhir/Observation?date=2020-03-01T10:00:00Z", &["o1"]),
        ("/fhir/Observation?date=ap2020-03-01", &["o1"]),
        // quantity
        ("/fhir/Observation?value-quantity=72.5", &["o1"]),
        ("/fhir/Observation?value-quantity=73", &["o1"]),
        ("/fhir/Observation?value-quantity=72", &[]),
        ("/fhir/Observation?value-quantity=gt80", &["o2", "o3"]),
        (
            "/fhir/Observation?value-quantity=gt80|http://unitsofmeasure.org|kg",
            &["o3"],
        ),
        ("/fhir/Observation?value-quantity=le90||kg", &["o1", "o3"]),
        // reference
        ("/fhir/Observation?subject=Patient/p1", &["o1", "o2"]),
        ("/fhir/Observation?subject=p2", &["o3"]),
        ("/fhir/Observation?subject:Patient=p2", &["o3"]),
        (
            "/fhir/Observation?patient=http://fhir.test/fhir/Patient/p1",
            &["o1", "o2"],
        ),
        ("/fhir/Observation?subject=Patient/nobody", &[]),
        // chain and reverse chain
        ("/fhir/Observation?subject:Patient.family=muller", &["o3"]),
        ("/fhir/Observation?subject.family=muller", &["o3"]),
        ("/fhir/Observation?patient.gender=female", &["o1", "o2"]),
        (
            "/fhir/Patient?_has:Observation:subject:code=8302-2",
            &["p1"],
        ),
        (
            "/fhir/Patient?_has:Observation:patient:status=preliminary",
            &["p2"],
        ),
        // common parameters
        ("/fhir/Patient?_id=p1,p3", &["p1", "p3"]),
        (
            "/fhir/Patient?_lastUpdated=gt2000-01-01",
            &["p1", "p2", "p3"],
        ),
        ("/fhir/Patient?_lastUpdated=lt2000-01-01", &[]),
        // combined (AND)
        ("/fhir/Observation?subject=Patient/p1&code=29463-7", &["o1"]),
    ];
    for (query, expected) in cases {
        let reply = call(&app, get(query)).await;
        assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
        let bundle = reply.json();
        let mut found = searchset_ids(&bundle);
        found.sort();
        assert_eq!(found, *expected, "{query}");
        // Terms longer than the index's prefix bound are checked after decryption, and
        // such searches report no total.
        if !query.contains("ludensch") {
            assert_eq!(bundle["total"], expected.len(), "{query}");
        }
        assert!(reply.header("x-ledger-entry").is_some(), "{query}");
    }
}

async fn includes_sorting_and_controls(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;

    let bundle = call(
        &app,
        get("/fhir/Observation?code=29463-7&_include=Observation:subject"),
    )
    .await
    .json();
    assert_eq!(
        included(&bundle),
        BTreeSet::from(["Patient/p1".to_owned(), "Patient/p2".to_owned()])
    );
    let bundle = call(
        &app,
        get("/fhir/Observation?_id=o1&_include=Observation:performer:Practitioner"),
    )
    .await
    .json();
    assert_eq!(
        included(&bundle),
        BTreeSet::from(["Practitioner/dr1".to_owned()])
    );
    let bundle = call(
        &app,
        get("/fhir/Patient?_id=p1&_revinclude=Observation:subject"),
    )
    .await
    .json();
    assert_eq!(searchset_ids(&bundle), ["p1"]);
    assert_eq!(
        included(&bundle),
        BTreeSet::from(["Observation/o1".to_owned(), "Observation/o2".to_owned()])
    );

    let bundle = call(&app, get("/fhir/Patient?_sort=birthdate"))
        .await
        .json();
    assert_eq!(searchset_ids(&bundle), ["p1", "p2", "p3"]);
    let bundle = call(&app, get("/fhir/Patient?_sort=-birthdate"))
        .await
        .json();
    assert_eq!(searchset_ids(&bundle), ["p3", "p2", "p1"]);
    let bundle = call(&app, get("/fhir/Observation?_sort=-value-quantity,_id"))
        .await
        .json();
    assert_eq!(searchset_ids(&bundle), ["o2", "o3", "o1"]);
    // Sorting by parameters held only as digests happens after decryption.
    let bundle = call(&app, get("/fhir/Patient?_sort=family")).await.json();
    assert_eq!(searchset_ids(&bundle), ["p3", "p1", "p2"]);
    let bundle = call(&app, get("/fhir/Patient?_sort=-family")).await.json();
    assert_eq!(searchset_ids(&bundle), ["p2", "p1", "p3"]);
    let bundle = call(&app, get("/fhir/Patient?_sort=gender,-birthdate"))
        .await
        .json();
    assert_eq!(searchset_ids(&bundle), ["p3", "p1", "p2"]);
    let bundle = call(&app, get("/fhir/Patient?_sort=-_id")).await.json();
    assert_eq!(searchset_ids(&bundle), ["p3", "p2", "p1"]);

    let bundle = call(&app, get("/fhir/Patient?_summary=count")).await.json();
    assert_eq!(bundle["total"], 3);
    assert!(bundle.get("entry").is_none());

    let bundle = call(&app, get("/fhir/Patient?_id=p1&_elements=gender"))
        .await
        .json();
    let resource = &bundle["entry"][0]["resource"];
    assert_eq!(resource["gender"], "female");
    assert!(resource.get("name").is_none());
    assert_eq!(resource["meta"]["tag"][0]["code"], "SUBSETTED");

    // System level with _type.
    let bundle = call(&app, get("/fhir?_type=Patient,Practitioner&_id=dr1,p2"))
        .await
        .json();
    let mut ids = searchset_ids(&bundle);
    ids.sort();
    assert_eq!(ids, ["dr1", "p2"]);
    assert!(
        link(&bundle, "self")
            .unwrap()
            .contains("_type=Patient%2CPractitioner")
    );

    // POST _search with a form body.
    let reply = call(
        &app,
        TestRequest::post()
            .uri("/fhir/Patient/_search")
            .insert_header(("Content-Type", "application/x-www-form-urlencoded"))
            .set_payload("family=chalmers"),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(searchset_ids(&reply.json()), ["p1"]);
}

async fn paging_by_cursor_survives_changes(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    for i in 0..7 {
        let patient = json!({"resourceType": "Patient", "id": format!("page{i}"), "gender": "other",
                             "birthDate": format!("19{}0", 5 + i % 3),
                             "name": [{"family": format!("Fam{}", 9 - i)}]});
        assert_eq!(
            call(&app, put(&format!("/fhir/Patient/page{i}"), &patient))
                .await
                .status,
            StatusCode::CREATED
        );
    }
    for sort in [
        "",
        "&_sort=birthdate",
        "&_sort=-_lastUpdated",
        "&_sort=family",
    ] {
        let mut seen = Vec::new();
        let mut next = Some(format!("/fhir/Patient?gender=other&_count=3{sort}"));
        let mut pages = 0;
        while let Some(url) = next {
            let bundle = call(&app, get(&url)).await.json();
            let created_late = !sort.is_empty() || pages > 0;
            assert_eq!(bundle["total"], 7 + usize::from(created_late), "{url}");
            seen.extend(searchset_ids(&bundle));
            if let Some(next) = link(&bundle, "next") {
                // Cursors are sealed: a sort value from content never shows in a link, not
                // even base64-encoded. (The encoded text itself may spell "Fam" by chance.)
                let cursor = next.split("_cursor=").nth(1).unwrap();
                let sealed = BASE64URL.decode(cursor).expect("a base64url cursor");
                for family in (0..10).flat_map(|n| [format!("Fam{n}"), format!("fam{n}")]) {
                    assert!(
                        !sealed.windows(4).any(|w| w == family.as_bytes()),
                        "{family} in {next}"
                    );
                }
            }
            if pages == 0 {
                assert!(link(&bundle, "previous").is_none());
                // A resource created after the first page appears once, at the end.
                if sort.is_empty() {
                    let late = json!({"resourceType": "Patient", "id": "late", "gender": "other"});
                    call(&app, put("/fhir/Patient/late", &late)).await;
                }
            } else {
                let previous = link(&bundle, "previous").expect("previous link");
                let before = call(&app, get(&local(&previous))).await.json();
                let before_ids = searchset_ids(&before);
                assert_eq!(before_ids.len(), 3, "{previous}");
                assert_eq!(
                    before_ids.last(),
                    seen.iter().rev().nth(searchset_ids(&bundle).len()),
                    "{previous}"
                );
            }
            pages += 1;
            next = link(&bundle, "next").map(|u| local(&u));
        }
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "no duplicates: {seen:?}");
        assert_eq!(seen.len(), 8, "{sort}: {seen:?}");
        if sort == "&_sort=family" {
            let expected: Vec<String> = (0..7)
                .rev()
                .map(|i| format!("page{i}"))
                .chain(["late".to_owned()])
                .collect();
            assert_eq!(seen, expected, "sorted by family name after decryption");
        }
        if sort == "&_sort=birthdate" {
            let births: Vec<String> = seen.clone();
            assert_eq!(
                births.last().map(String::as_str),
                Some("late"),
                "missing values sort last"
            );
        }
    }
}

async fn strict_and_lenient_errors(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;
    let cases = [
        ("/fhir/Patient?nonsense=1", "nonsense"),
        ("/fhir/Patient?birthdate=yesterday", "birthdate"),
        ("/fhir/Patient?birthdate=xx2020", "birthdate"),
        ("/fhir/Patient?family:fuzzy=x", "family:fuzzy"),
        ("/fhir/Patient?family:contains=x", "family:contains"),
        ("/fhir/Patient?gender:text=x", "gender:text"),
        ("/fhir/Patient?_count=5000", "_count"),
        ("/fhir/Patient?_count=abc", "_count"),
        (
            "/fhir/Observation?subject:Patient.nonsense=x",
            "subject:Patient.nonsense",
        ),
        ("/fhir/Observation?subject.nonsense=x", "subject.nonsense"),
        ("/fhir/Observation?code.family=x", "code.family"),
        (
            "/fhir/Observation?subject:Patient.organization.name=x",
            "subject:Patient.organization.name",
        ),
        (
            "/fhir/Patient?_has:Observation:nonsense:code=x",
            "_has:Observation:nonsense:code",
        ),
        ("/fhir/Patient?_sort=nonsense", "_sort"),
        ("/fhir/Patient?_include=*", "_include"),
        ("/fhir/Patient?_include=Observation:subject", "_include"),
        ("/fhir/Observation?value-quantity=abc", "value-quantity"),
        ("/fhir/Patient?_cursor=garbage", "_cursor"),
        ("/fhir/Patient?_summary=text", "_summary"),
        ("/fhir/Patient?family=", "family"),
    ];
    for (query, parameter) in cases {
        let reply = call(&app, get(query)).await;
        assert_eq!(
            reply.status,
            StatusCode::BAD_REQUEST,
            "{query}: {}",
            reply.text()
        );
        let issue = reply.outcome_issue();
        assert_eq!(issue["expression"][0], parameter, "{query}: {issue}");
        assert!(!reply.text().contains("Chalmers"), "{query}");
    }
    assert_eq!(
        call(&app, get("/fhir/Nonsense?x=1")).await.status,
        StatusCode::NOT_FOUND
    );

    // Lenient: unknown parameters are dropped, reported and left out of the self link;
    // malformed values of known parameters are still errors.
    let reply = call(
        &app,
        get("/fhir/Patient?family=chal&nonsense=1").insert_header(("Prefer", "handling=lenient")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let bundle = reply.json();
    let mut ids = searchset_ids(&bundle);
    ids.sort();
    assert_eq!(ids, ["p1", "p3"]);
    let self_link = link(&bundle, "self").unwrap();
    assert!(
        self_link.contains("family=chal") && !self_link.contains("nonsense"),
        "{self_link}"
    );
    let outcome = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    assert!(
        outcome["resource"]["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .contains("nonsense")
    );
    let reply = call(
        &app,
        get("/fhir/Patient?birthdate=yesterday").insert_header(("Prefer", "handling=lenient")),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
}

async fn search_is_ledgered_with_every_disclosed_resource(db: TestDb) {
    let state = db.state();
    let ledger = state.ledger.clone();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    seed(&app).await;
    let reply = call(
        &app,
        get("/fhir/Observation?subject=Patient/p1&_include=Observation:subject"),
    )
    .await;
    let receipt = reply.header("x-ledger-entry").unwrap();
    let entry = ledger.entry_by_receipt(receipt).await.unwrap();
    let entry: Value = serde_json::from_slice(&entry.leaf_data).unwrap();
    assert_eq!(entry["action"], "search");
    assert_eq!(entry["outcome"], "permit");
    assert_eq!(entry["patient"], "Patient/p1");
    let mut named: Vec<String> = entry["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{}/{}/{}",
                r["type"].as_str().unwrap(),
                r["id"].as_str().unwrap(),
                r["versionId"].as_str().unwrap()
            )
        })
        .collect();
    named.sort();
    assert_eq!(
        named,
        ["Observation/o1/1", "Observation/o2/1", "Patient/p1/1"]
    );
    let text = entry.to_string();
    assert!(
        !text.contains("Chalmers") && !text.contains("29463-7"),
        "no PHI or search terms: {text}"
    );
}

async fn updates_and_deletes_keep_the_index_current(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;
    let mut p3 = json!({"resourceType": "Patient", "id": "p3", "gender": "female", "name": [{"family": "Renamed"}]});
    assert_eq!(
        call(&app, put("/fhir/Patient/p3", &p3)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        searchset_ids(&call(&app, get("/fhir/Patient?family=chalk")).await.json()),
        Vec::<String>::new()
    );
    assert_eq!(
        searchset_ids(&call(&app, get("/fhir/Patient?family=renamed")).await.json()),
        ["p3"]
    );
    assert_eq!(
        call(&app, TestRequest::delete().uri("/fhir/Patient/p3"))
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        searchset_ids(&call(&app, get("/fhir/Patient?family=renamed")).await.json()),
        Vec::<String>::new()
    );
    assert_eq!(
        call(&app, get("/fhir/Patient?_summary=count")).await.json()["total"],
        2
    );
    p3["name"][0]["family"] = json!("Back");
    assert_eq!(
        call(&app, put("/fhir/Patient/p3", &p3)).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        searchset_ids(&call(&app, get("/fhir/Patient?family=back")).await.json()),
        ["p3"]
    );
}

/// Composite parameters (search.html#composite): the components must hold on the same node
/// (the same `Observation.component`), `$` separates them, `\$` is a literal `$`, commas OR
/// whole tuples, repeated parameters AND them, and modifiers other than `:missing` are refused.
async fn composite_parameters(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    seed(&app).await;
    let loinc = |code: &str| json!({"coding": [{"system": "http://loinc.org", "code": code}]});
    let mm_hg = |value: i64| {
        json!({"value": value, "unit": "mmHg",
        "system": "http://unitsofmeasure.org", "code": "mm[Hg]"})
    };
    let resources = [
        json!({"resourceType": "Observation", "id": "bp", "status": "final",
               "code": loinc("85354-9"), "subject": {"reference": "Patient/p3"},
               "component": [
                   {"code": loinc("8480-6"), "valueQuantity": mm_hg(120)},
                   {"code": loinc("8462-4"), "valueQuantity": mm_hg(80)}]}),
        json!({"resourceType": "Observation", "id": "abo", "status": "final",
               "code": loinc("883-9"),
               "valueCodeableConcept": {"coding": [{"system": "http://snomed.info/sct", "code": "112144000"}]},
               "component": [
                   {"code": {"coding": [{"system": "urn:c", "code": "a"}]},
                    "valueCodeableConcept": {"coding": [{"system": "urn:v", "code": "x"}]}},
                   {"code": {"coding": [{"system": "urn:c", "code": "b"}]},
                    "valueCodeableConcept": {"coding": [{"system": "urn:v", "code": "y"}]}}]}),
        json!({"resourceType": "Observation", "id": "born", "status": "final",
               "code": loinc("21112-8"), "valueDateTime": "2019-05-04"}),
        json!({"resourceType": "Observation", "id": "colour", "status": "final",
               "code": loinc("5778-6"), "valueString": "Yellow"}),
        json!({"resourceType": "Observation", "id": "clarity", "status": "final",
               "code": loinc("5767-9"), "valueString": "Slightly cloudy with sediment"}),
        json!({"resourceType": "Observation", "id": "dollar", "status": "final",
               "code": {"coding": [{"system": "urn:x", "code": "a$b"}]}, "valueString": "z"}),
        json!({"resourceType": "DocumentReference", "id": "d1", "status": "current",
               "relatesTo": [{"code": "replaces", "target": {"reference": "DocumentReference/d0"}}],
               "content": [{"attachment": {"contentType": "text/plain"}}]}),
    ];
    create_each(&app, resources).await;
    let all_observations = [
        "abo", "born", "bp", "clarity", "colour", "dollar", "o1", "o2", "o3",
    ];
    let cases: &[(&str, &[&str])] = &[
        // token$quantity within one component, never across two
        (
            "/fhir/Observation?component-code-value-quantity=http://loinc.org|8480-6$gt100",
            &["bp"],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=http://loinc.org|8462-4$gt100",
            &[],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=8462-4$lt100",
            &["bp"],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=8480-6$120|http://unitsofmeasure.org|mm%5BHg%5D",
            &["bp"],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=8480-6$120||kg",
            &[],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=|8480-6$120",
            &[],
        ),
        // the panel has no value of its own
        ("/fhir/Observation?code-value-quantity=85354-9$gt0", &[]),
        (
            "/fhir/Observation?code-value-quantity=http://loinc.org|29463-7$gt80",
            &["o3"],
        ),
        (
            "/fhir/Observation?code-value-quantity=29463-7$ne90",
            &["o1"],
        ),
        (
            "/fhir/Observation?code-value-quantity=29463-7$le90|http://unitsofmeasure.org|kg",
            &["o1", "o3"],
        ),
        (
            "/fhir/Observation?code-value-quantity=http://loinc.org|$gt100",
            &["o2"],
        ),
        ("/fhir/Observation?code-value-quantity=8480-6$gt100", &[]),
        // combo-: the Observation and each of its components
        (
            "/fhir/Observation?combo-code-value-quantity=8480-6$gt100",
            &["bp"],
        ),
        (
            "/fhir/Observation?combo-code-value-quantity=29463-7$gt80",
            &["o3"],
        ),
        // OR of whole tuples; AND of repeated parameters
        (
            "/fhir/Observation?code-value-quantity=29463-7$lt80,8302-2$gt100",
            &["o1", "o2"],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=8480-6$gt100&component-code-value-quantity=8462-4$lt90",
            &["bp"],
        ),
        (
            "/fhir/Observation?component-code-value-quantity=8480-6$gt100&component-code-value-quantity=8462-4$gt90",
            &[],
        ),
        // token$token
        (
            "/fhir/Observation?code-value-concept=http://loinc.org|883-9$http://snomed.info/sct|112144000",
            &["abo"],
        ),
        (
            "/fhir/Observation?code-value-concept=883-9$112144000",
            &["abo"],
        ),
        ("/fhir/Observation?code-value-concept=883-9$|112144000", &[]),
        (
            "/fhir/Observation?code-value-concept=883-9$http://snomed.info/sct|112149005",
            &[],
        ),
        (
            "/fhir/Observation?component-code-value-concept=a$x",
            &["abo"],
        ),
        ("/fhir/Observation?component-code-value-concept=a$y", &[]),
        (
            "/fhir/Observation?component-code-value-concept=urn:c|b$urn:v|y,a$y",
            &["abo"],
        ),
        (
            "/fhir/Observation?combo-code-value-concept=883-9$112144000",
            &["abo"],
        ),
        ("/fhir/Observation?combo-code-value-concept=b$y", &["abo"]),
        // token$date
        (
            "/fhir/Observation?code-value-date=http://loinc.org|21112-8$2019-05",
            &["born"],
        ),
        (
            "/fhir/Observation?code-value-date=21112-8$lt2020",
            &["born"],
        ),
        ("/fhir/Observation?code-value-date=21112-8$ge2020", &[]),
        ("/fhir/Observation?code-value-date=29463-7$2019", &[]),
        // token$string: prefix, case-insensitive; long terms checked after decryption
        (
            "/fhir/Observation?code-value-string=5778-6$yel",
            &["colour"],
        ),
        (
            "/fhir/Observation?code-value-string=5778-6$YELLOW",
            &["colour"],
        ),
        ("/fhir/Observation?code-value-string=5778-6$green", &[]),
        ("/fhir/Observation?code-value-string=5767-9$yel", &[]),
        (
            "/fhir/Observation?code-value-string=5767-9$slightly%20cloudy%20w",
            &["clarity"],
        ),
        (
            "/fhir/Observation?code-value-string=5767-9$slightly%20cloudy%20x",
            &[],
        ),
        (
            "/fhir/Observation?code-value-string=5778-6$slightly%20cloudy%20w",
            &[],
        ),
        // `\$` is a `$` inside a component
        (
            "/fhir/Observation?code-value-string=urn:x|a%5C$b$z",
            &["dollar"],
        ),
        ("/fhir/Observation?code-value-string=a%5C$b$z", &["dollar"]),
        // :missing, _has and reference$token
        (
            "/fhir/Observation?component-code-value-quantity:missing=false",
            &["bp"],
        ),
        (
            "/fhir/Observation?code-value-string:missing=true",
            &["abo", "born", "bp", "o1", "o2", "o3"],
        ),
        (
            "/fhir/Patient?_has:Observation:subject:component-code-value-quantity=8480-6$gt100",
            &["p3"],
        ),
        (
            "/fhir/DocumentReference?relationship=DocumentReference/d0$replaces",
            &["d1"],
        ),
        ("/fhir/DocumentReference?relationship=d0$replaces", &["d1"]),
        (
            "/fhir/DocumentReference?relationship=DocumentReference/d0$appends",
            &[],
        ),
    ];
    for (query, expected) in cases {
        let reply = call(&app, get(query)).await;
        assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
        let bundle = reply.json();
        let mut found = searchset_ids(&bundle);
        found.sort();
        assert_eq!(found, *expected, "{query}");
        if !query.contains("cloudy") {
            assert_eq!(bundle["total"], expected.len(), "{query}");
        }
    }
    let everything = call(&app, get("/fhir/Observation?_count=100")).await.json();
    let mut ids = searchset_ids(&everything);
    ids.sort();
    assert_eq!(ids, all_observations);

    let errors = [
        (
            "/fhir/Observation?component-code-value-quantity:exact=8480-6$gt100",
            "component-code-value-quantity:exact",
        ),
        (
            "/fhir/Observation?code-value-concept:not=883-9$112144000",
            "code-value-concept:not",
        ),
        (
            "/fhir/Observation?code-value-quantity=8480-6$gt100$3",
            "code-value-quantity",
        ),
        (
            "/fhir/Observation?code-value-quantity=8480-6",
            "code-value-quantity",
        ),
        (
            "/fhir/Observation?code-value-quantity=8480-6$abc",
            "code-value-quantity",
        ),
        (
            "/fhir/Observation?code-value-date=21112-8$yesterday",
            "code-value-date",
        ),
        (
            "/fhir/Observation?code-value-date=21112-8$",
            "code-value-date",
        ),
        ("/fhir/Observation?_sort=code-value-quantity", "_sort"),
        // a Range cannot be matched by the number index; the parameter is not offered
        (
            "/fhir/ValueSet?context-type-quantity=age$gt10",
            "context-type-quantity",
        ),
    ];
    for (query, parameter) in errors {
        for prefer in ["handling=strict", "handling=lenient"] {
            if prefer == "handling=lenient" && parameter == "context-type-quantity" {
                continue;
            }
            let reply = call(&app, get(query).insert_header(("Prefer", prefer))).await;
            assert_eq!(
                reply.status,
                StatusCode::BAD_REQUEST,
                "{query} {prefer}: {}",
                reply.text()
            );
            let issue = reply.outcome_issue();
            assert_eq!(issue["expression"][0], parameter, "{query}: {issue}");
        }
    }
}

/// `\|` inside a token is part of the system or code, not the separator; a quantity's unit
/// matches on every type a `_type` search names (units are hashed per type).
async fn escaped_bars_and_units_across_types(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let milligrams = json!({"value": 5, "unit": "mg",
                            "system": "http://unitsofmeasure.org", "code": "mg"});
    let resources = [
        json!({"resourceType": "Observation", "id": "bar", "status": "final",
               "code": {"coding": [{"system": "urn:x|y", "code": "a|b"}]}}),
        json!({"resourceType": "Observation", "id": "plain", "status": "final",
               "code": {"coding": [{"system": "urn:x", "code": "y|a|b"}]}}),
        json!({"resourceType": "ChargeItem", "id": "charge", "status": "billable",
               "code": {"text": "dose"}, "subject": {"reference": "Patient/p1"},
               "quantity": milligrams}),
        json!({"resourceType": "Substance", "id": "stock", "code": {"text": "powder"},
               "instance": [{"quantity": milligrams}]}),
    ];
    create_each(&app, resources).await;
    let cases: &[(&str, &[&str])] = &[
        (r"/fhir/Observation?code=urn:x\|y|a\|b", &["bar"]),
        (r"/fhir/Observation?code=a\|b", &["bar"]),
        // The first unescaped bar separates: system urn:x, code y|a|b.
        ("/fhir/Observation?code=urn:x|y|a|b", &["plain"]),
        (r"/fhir/Observation?code=urn:x|y\|a\|b", &["plain"]),
        (r"/fhir/Observation?code=urn:x\|y|", &["bar"]),
        (
            "/fhir?_type=ChargeItem,Substance&quantity=5|http://unitsofmeasure.org|mg",
            &["charge", "stock"],
        ),
        (
            "/fhir?_type=Substance,ChargeItem&quantity=5||mg",
            &["charge", "stock"],
        ),
        ("/fhir?_type=ChargeItem,Substance&quantity=5||g", &[]),
    ];
    for (query, expected) in cases {
        let uri = query.replace('|', "%7C").replace('\\', "%5C");
        let reply = call(&app, get(&uri)).await;
        assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
        let mut ids = searchset_ids(&reply.json());
        ids.sort();
        assert_eq!(ids, *expected, "{query}");
    }
}

on_both_backends!(
    parameter_types,
    includes_sorting_and_controls,
    paging_by_cursor_survives_changes,
    strict_and_lenient_errors,
    search_is_ledgered_with_every_disclosed_resource,
    updates_and_deletes_keep_the_index_current,
    composite_parameters,
    escaped_bars_and_units_across_types,
);
