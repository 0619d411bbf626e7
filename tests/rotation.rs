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

/// The searches the index-key tests expect answered: (query, how many match).
const SEARCHES: [(&str, usize); 4] = [
    ("/fhir/Patient?family=Rekeyed", 30),
    ("/fhir/Patient?family:exact=Rekeyed7", 1),
    ("/fhir/Patient?identifier=urn:rekey|id-12", 1),
    ("/fhir/Patient?family:missing=false", 30),
];

async fn searches_answer(state: fhirledger::api::AppState) {
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    for (query, expected) in SEARCHES {
        let reply = call(&app, get(&format!("{query}&_count=100"))).await;
        assert_eq!(reply.status, StatusCode::OK, "{query}: {}", reply.text());
        assert_eq!(
            common::searchset_ids(&reply.json()).len(),
            expected,
            "{query}"
        );
    }
}

/// A server given an index key other than the one its index was built with would find
/// nothing (and duplicate on conditional creates): it refuses to start, saying why; so does
/// one on a database that never recorded its key, once its digests show the key is wrong.
async fn a_server_refuses_an_index_key_that_did_not_build_the_index(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    common::create(
        &app,
        json!({"resourceType": "Patient", "name": [{"family": "Indexed"}]}),
    )
    .await;
    drop(app);
    let stranger = || fhirledger::crypto::BlindIndexKey::from_bytes([42; 32]);
    let error = db
        .try_state_with(common::ledger_key(), stranger(), |_| {})
        .err()
        .expect("a start with another index key is refused")
        .to_string();
    assert!(error.contains("was built with index key"), "{error}");
    assert!(error.contains(&db.index_key().id()), "{error}");

    // A database from before the key was recorded: the digests decide.
    diesel::sql_query("UPDATE search_state SET index_key = NULL")
        .execute(&mut db.connect())
        .unwrap();
    let error = db
        .try_state_with(common::ledger_key(), stranger(), |_| {})
        .err()
        .expect("a start with another index key is refused")
        .to_string();
    assert!(error.contains("did not build"), "{error}");
    db.try_state_with(common::ledger_key(), db.index_key(), |_| {})
        .unwrap();
    let recorded: Vec<Option<String>> = {
        #[derive(diesel::QueryableByName)]
        struct Row {
            #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Text>)]
            index_key: Option<String>,
        }
        diesel::sql_query("SELECT index_key FROM search_state")
            .load::<Row>(&mut db.connect())
            .unwrap()
            .into_iter()
            .map(|row| row.index_key)
            .collect()
    };
    assert_eq!(recorded, [Some(db.index_key().id())]);
}

on_both_backends!(a_server_refuses_an_index_key_that_did_not_build_the_index);

/// `keys rotate-index`: the index is rebuilt for the new key (rows and presence digests), a
/// stopped rebuild continues where it stopped, servers with the new key find what they found
/// before, the old key is refused, and both ends are ledgered.
async fn rotating_the_index_key_rebuilds_the_index_resumably(db: TestDb) {
    let state = db.state_with(MasterKey::from_bytes([7; 32]), 16 * 1024 * 1024);
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    common::create_each(
        &app,
        (0..30).map(|n| {
            json!({"resourceType": "Patient", "id": format!("rekeyed-{n}"),
                   "name": [{"family": format!("Rekeyed{n}")}],
                   "identifier": [{"system": "urn:rekey", "value": format!("id-{n}")}]})
        }),
    )
    .await;
    drop(app);
    searches_answer(state).await;

    let old = || db.index_key();
    let new = || fhirledger::crypto::BlindIndexKey::from_bytes([43; 32]);
    let new_id = new().id();
    // A rebuild stopped after the first ten resources (as if the process had been killed).
    let first_seqs: Vec<i64> = {
        #[derive(diesel::QueryableByName)]
        struct Seq {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            seq: i64,
        }
        diesel::sql_query("SELECT seq FROM resources ORDER BY seq")
            .load::<Seq>(&mut db.connect())
            .unwrap()
            .into_iter()
            .map(|row| row.seq)
            .collect()
    };
    let maintenance = db
        .try_state_with(common::ledger_key(), old(), |options| {
            options.index_maintenance = true
        })
        .unwrap();
    let started = maintenance
        .resources
        .rotate_index_key(new())
        .expect("a first rotation");
    assert_eq!((started.rebuilt, started.resumed), (30, false));
    // Replay the last part as a stopped run would leave it: rekey in progress, ten done.
    diesel::sql_query(format!(
        "UPDATE search_state SET index_key = '{}', rekey_to = '{new_id}', rekeyed_through = {}",
        old().id(),
        first_seqs[9]
    ))
    .execute(&mut db.connect())
    .unwrap();
    for key in [old(), new()] {
        let error = db
            .try_state_with(common::ledger_key(), key, |_| {})
            .err()
            .expect("no server starts while a rebuild is unfinished")
            .to_string();
        assert!(error.contains("has not finished"), "{error}");
    }
    let resumed = db
        .try_state_with(common::ledger_key(), old(), |options| {
            options.index_maintenance = true
        })
        .unwrap()
        .resources
        .rotate_index_key(new())
        .expect("the stopped rotation continues");
    assert_eq!((resumed.rebuilt, resumed.resumed), (20, true));

    // The new key finds everything; the old one is refused.
    searches_answer(
        db.try_state_with(common::ledger_key(), new(), |_| {})
            .unwrap(),
    )
    .await;
    let error = db
        .try_state_with(common::ledger_key(), old(), |_| {})
        .err()
        .expect("the retired key is refused")
        .to_string();
    assert!(
        error.contains(&format!("built with index key {new_id}")),
        "{error}"
    );

    let state = db
        .try_state_with(common::ledger_key(), new(), |_| {})
        .unwrap();
    let app = test::init_service(fhirledger::api::build_app(state)).await;
    let page: Value = call(&app, get("/ledger/entries?start=0&end=1000"))
        .await
        .json();
    let keys = common::key_entries(&page);
    assert_eq!(
        keys,
        [
            ("index-key-rotate".to_owned(), new_id.clone()),
            ("key-retire".to_owned(), old().id()),
            ("key-retire".to_owned(), old().id()),
        ]
    );
}

on_both_backends!(rotating_the_index_key_rebuilds_the_index_resumably);
