//! Master key rotation: a server given a new master key and the previous one serves every
//! record while it re-wraps their data keys a page at a time, ledgers the rotation's start
//! and the previous key's retirement, leaves the ciphertexts (and so the ledger's content
//! hashes) unchanged, and afterwards the new key alone opens everything.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{TestDb, call, get, post};
use diesel::RunQueryDsl as _;
use fhirledger::crypto::MasterKey;
use fhirledger::service::rotation::REWRAP_PAGE;
use serde_json::{Value, json};

#[derive(diesel::QueryableByName)]
struct Sealed {
    #[diesel(sql_type = diesel::sql_types::Text)]
    key_id: String,
    #[diesel(sql_type = diesel::sql_types::Binary)]
    ciphertext: Vec<u8>,
}

fn sealed_rows(db: &TestDb) -> Vec<Sealed> {
    diesel::sql_query(
        "SELECT key_id, ciphertext FROM resource_versions ORDER BY resource_type, id, version_id",
    )
    .load(&mut db.connect())
    .unwrap()
}

async fn a_rotation_rewraps_every_data_key_and_retires_the_previous_key(db: TestDb) {
    let old = || MasterKey::from_bytes([1; 32]);
    let new = || MasterKey::from_bytes([2; 32]);
    let (old_id, new_id) = (old().id().to_string(), new().id().to_string());

    // More versions than one page, written under the old key.
    let total = usize::try_from(REWRAP_PAGE).unwrap() + 40;
    let state = db.state_with(old(), 16 * 1024 * 1024);
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let entries: Vec<Value> = (0..total)
        .map(|n| {
            json!({"resource": {"resourceType": "Patient", "name": [{"family": format!("Rotated{n}")}]},
                   "request": {"method": "POST", "url": "Patient"}})
        })
        .collect();
    let reply = call(
        &app,
        post(
            "/fhir",
            &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
        ),
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let ids: Vec<String> = reply.json()["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let location = e["response"]["location"].as_str().unwrap();
            location.split('/').nth(1).unwrap().to_owned()
        })
        .collect();
    let before = sealed_rows(&db);
    assert!(before.iter().all(|row| row.key_id == old_id));
    drop(app);

    // The new key, with the old one: reads work before, during and after the re-wrapping.
    let state = db.state_rotating(new(), vec![old()]);
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let read = |id: String| {
        let app = &app;
        async move { call(app, get(&format!("/fhir/Patient/{id}"))).await.status }
    };
    let progress = state.resources.start_rotation().unwrap().unwrap();
    assert_eq!(progress.remaining.load(Ordering::Relaxed), total as i64);
    assert_eq!(read(ids[0].clone()).await, StatusCode::OK);
    let resources = state.resources.clone();
    let first_page = {
        let (resources, progress) = (resources.clone(), progress.clone());
        tokio::task::spawn_blocking(move || resources.rewrap_page(&progress))
            .await
            .unwrap()
            .unwrap()
    };
    assert_eq!(first_page, usize::try_from(REWRAP_PAGE).unwrap());
    assert_eq!(progress.remaining.load(Ordering::Relaxed), 40);
    assert_eq!(read(ids[0].clone()).await, StatusCode::OK);
    assert_eq!(read(ids[total - 1].clone()).await, StatusCode::OK);
    while !progress.done.load(Ordering::Relaxed) {
        let (resources, progress) = (resources.clone(), progress.clone());
        tokio::task::spawn_blocking(move || resources.rewrap_page(&progress))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(progress.rewrapped.load(Ordering::Relaxed), total as i64);

    // Every data key is under the new key; no ciphertext changed.
    let after = sealed_rows(&db);
    assert!(after.iter().all(|row| row.key_id == new_id));
    assert!(
        before
            .iter()
            .zip(&after)
            .all(|(b, a)| b.ciphertext == a.ciphertext)
    );

    // Both ends of the rotation are in the ledger, naming the keys by id.
    state.ledger.sequence_pending().unwrap();
    let page: Value = call(&app, get("/ledger/entries?start=0&end=1000"))
        .await
        .json();
    let keys = common::key_entries(&page);
    assert_eq!(
        keys,
        [
            ("key-rotate".to_owned(), new_id.clone()),
            ("key-retire".to_owned(), old_id.clone())
        ]
    );
    drop(app);

    // The old key retired: the new one alone opens every record.
    let state = db.state_with(new(), 16 * 1024 * 1024);
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    for id in [&ids[0], &ids[total / 2], &ids[total - 1]] {
        let reply = call(&app, get(&format!("/fhir/Patient/{id}"))).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    }
    // Nothing to rotate without previous keys, nor once they wrap nothing.
    assert!(state.resources.start_rotation().unwrap().is_none());
    let state = db.state_rotating(new(), vec![old()]);
    assert!(state.resources.start_rotation().unwrap().is_none());
}

on_both_backends!(a_rotation_rewraps_every_data_key_and_retires_the_previous_key);
