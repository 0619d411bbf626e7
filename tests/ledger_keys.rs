//! Ledger key rotation: a server started with a new ledger key and the previous one
//! announces the new key in an entry the previous key signs and checkpoints, then signs
//! with the new key alone; the chain it lists leads a verifier from either key to the
//! current one; a server with a retired or unannounced key is refused, and one left running
//! with the retired key stops ledgering instead of signing what no verifier could check.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{LEDGER_ORIGIN, TestDb, call, get};
use fhirledger::ledger::LedgerKey;
use fhirledger::ledger::entry::verify_entry;
use fhirledger::ledger::key_chain::{KeyChain, ListedKey};
use fhirledger::service::audit::{AuditKey, audit, audit_keys};
use serde_json::{Value, json};

fn incoming() -> LedgerKey {
    LedgerKey::from_seed([21; 32], LEDGER_ORIGIN).unwrap()
}

async fn a_rotation_announces_the_new_key_and_the_chain_leads_to_it(db: TestDb) {
    let outgoing = common::ledger_key();
    let old_state = db
        .try_state_with(outgoing.clone(), db.index_key(), |_| {})
        .unwrap();
    let old_app = test::init_service(fhirledger::api::build_app(old_state.clone())).await;
    let id = common::create(
        &old_app,
        json!({"resourceType": "Patient", "name": [{"family": "Before"}]}),
    )
    .await;
    old_state.ledger.sequence_pending().unwrap();

    // A key that is neither the log's nor announced by it: refused, saying how to rotate.
    let stranger = LedgerKey::from_seed([22; 32], LEDGER_ORIGIN).unwrap();
    let error = db
        .try_state_with(stranger, db.index_key(), |_| {})
        .err()
        .expect("an unannounced key is refused")
        .to_string();
    assert!(
        error.contains("FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE"),
        "{error}"
    );

    // The rotation.
    let state = db
        .try_state_with(incoming(), db.index_key(), |options| {
            options.previous_ledger_key = Some(outgoing.clone());
        })
        .unwrap();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let read = call(&app, get(&format!("/fhir/Patient/{id}"))).await;
    assert_eq!(read.status, StatusCode::OK);
    state.ledger.sequence_pending().unwrap();

    let listed: Value = call(&app, get("/ledger/keys")).await.json();
    let keys: Vec<ListedKey> = serde_json::from_value(listed["keys"].clone()).unwrap();
    assert_eq!(
        keys.iter().map(|k| k.vkey.clone()).collect::<Vec<_>>(),
        [outgoing.vkey(), incoming().vkey()]
    );
    let first_index = keys[1].first_index;
    for pinned in [outgoing.vkey(), incoming().vkey()] {
        let (chain, rotations) = KeyChain::verify(&keys, &pinned).unwrap();
        assert_eq!(chain.current().vkey, incoming().vkey());
        assert_eq!(rotations[0].checkpoint.size, first_index);
        assert!(rotations[0].consistency.is_some());
    }
    // Entries before the rotation are the outgoing key's, after it the incoming key's; the
    // announcement names the incoming key.
    let page: Value = call(&app, get("/ledger/entries?start=0&end=1000"))
        .await
        .json();
    let entries = page["entries"].as_array().unwrap();
    assert!(entries.len() as u64 > first_index, "the read after it");
    for served in entries {
        let index = served["index"].as_u64().unwrap();
        let leaf = BASE64
            .decode(served["leaf_data"].as_str().unwrap())
            .unwrap();
        let signer = if index < first_index {
            &outgoing
        } else {
            &incoming()
        };
        verify_entry(&leaf, &signer.verifying_key())
            .unwrap_or_else(|e| panic!("entry #{index}: {e}"));
    }
    let announcement = &entries[usize::try_from(first_index).unwrap() - 1]["entry"];
    assert_eq!(announcement["action"], "ledger-key-rotate");
    assert_eq!(announcement["key"], incoming().vkey().as_str());
    let checkpoint = call(&app, get("/ledger/checkpoint")).await.text();
    fhirledger::ledger::checkpoint::verify_checkpoint(&checkpoint, &incoming().vkey()).unwrap();
    let key: Value = call(&app, get("/ledger/key")).await.json();
    assert_eq!(key["vkey"], incoming().vkey().as_str());

    // The server left running with the retired key stops: it neither sequences nor ledgers.
    let sequenced = old_state.ledger.sequence_pending();
    assert!(
        sequenced.is_err(),
        "the retired key sequenced: {sequenced:?}"
    );
    let refused = call(&old_app, get(&format!("/fhir/Patient/{id}"))).await;
    assert_eq!(
        refused.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        refused.text()
    );
    drop((app, old_app));

    // A restart with the retired key is refused; the current key starts as usual.
    let error = db
        .try_state_with(outgoing.clone(), db.index_key(), |_| {})
        .err()
        .expect("the retired key is refused")
        .to_string();
    assert!(error.contains("was retired"), "{error}");
    db.try_state_with(incoming(), db.index_key(), |options| {
        options.previous_ledger_key = Some(outgoing.clone());
    })
    .unwrap();

    // The auditor holding either key checks the whole database.
    for pinned in [&outgoing, &incoming()] {
        let key = AuditKey {
            verifying_key: pinned.verifying_key(),
            vkey: pinned.vkey(),
        };
        let mut conn = db.connect();
        let keys = audit_keys(&mut conn, &key).unwrap();
        let report = audit(&mut conn, &keys, None, &mut |_| {}).unwrap();
        assert!(report.is_clean(), "{:?}", report.findings);
    }
    // A chain rewritten in the database (the announcement's checkpoint swapped for another
    // of the outgoing key's) no longer leads from the auditor's key.
    diesel::RunQueryDsl::execute(
        diesel::sql_query(
            "UPDATE ledger_keys SET announcement = (SELECT note FROM ledger_checkpoints \
             WHERE tree_size < (SELECT MAX(first_index) FROM ledger_keys) \
             ORDER BY tree_size DESC LIMIT 1) WHERE first_index > 0",
        ),
        &mut db.connect(),
    )
    .unwrap();
    let key = AuditKey {
        verifying_key: outgoing.verifying_key(),
        vkey: outgoing.vkey(),
    };
    assert!(audit_keys(&mut db.connect(), &key).is_err());
}

on_both_backends!(a_rotation_announces_the_new_key_and_the_chain_leads_to_it);
