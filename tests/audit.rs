//! `audit` against tampering by someone who writes to the database: each change is found
//! and named, and an untouched database audits clean.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::test;
use common::{TestDb, call, get, put};
use diesel::RunQueryDsl as _;
use fhirledger::service::audit::{AuditKey, AuditReport, FindingKind, audit, audit_keys};
use serde_json::json;

/// A database with a few patients written, read and updated, all sequenced.
async fn populated(db: &TestDb) -> AuditKey {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    for id in ["a", "b", "c"] {
        let body = json!({"resourceType": "Patient", "id": id, "name": [{"family": format!("Family{id}")}]});
        call(&app, put(&format!("/fhir/Patient/{id}"), &body)).await;
        call(&app, put(&format!("/fhir/Patient/{id}"), &body)).await;
        call(&app, get(&format!("/fhir/Patient/{id}"))).await;
    }
    let ledger = state.ledger.clone();
    tokio::task::spawn_blocking(move || ledger.sequence_pending())
        .await
        .unwrap()
        .unwrap();
    let key = state.ledger.key();
    AuditKey {
        verifying_key: key.verifying_key(),
        vkey: key.vkey(),
    }
}

fn run(db: &TestDb, key: &AuditKey) -> AuditReport {
    run_trusting(db, key, None)
}

/// An audit as `fhirledger audit` runs one: the chain of keys from the auditor's key first.
fn run_trusting(
    db: &TestDb,
    key: &AuditKey,
    trusted: Option<&fhirledger::ledger::checkpoint::VerifiedCheckpoint>,
) -> AuditReport {
    let mut conn = db.connect();
    let keys = audit_keys(&mut conn, key).unwrap();
    audit(&mut conn, &keys, trusted, &mut |_| {}).unwrap()
}

fn kinds(report: &AuditReport) -> Vec<FindingKind> {
    report.findings.iter().map(|f| f.kind).collect()
}

fn exec(db: &TestDb, sql: &str) -> usize {
    diesel::sql_query(sql).execute(&mut db.connect()).unwrap()
}

async fn untouched_database_is_clean(db: TestDb) {
    let key = populated(&db).await;
    let report = run(&db, &key);
    assert!(report.is_clean(), "{:?}", report.findings);
    assert_eq!(report.entries_checked, 9);
    assert_eq!(report.versions_checked, 6);
    assert!(report.checkpoints_checked >= 1);
}

async fn changed_ciphertext_is_found(db: TestDb) {
    let key = populated(&db).await;
    // Replace the ciphertext with other bytes of the same length.
    let sql = if db.is_postgres() {
        "UPDATE resource_versions SET ciphertext = set_byte(ciphertext, 3, get_byte(ciphertext, 3) # 1) WHERE id = 'b' AND version_id = 2"
    } else {
        "UPDATE resource_versions SET ciphertext = randomblob(length(ciphertext)) WHERE id = 'b' AND version_id = 2"
    };
    assert_eq!(exec(&db, sql), 1);
    let report = run(&db, &key);
    assert_eq!(
        kinds(&report),
        [FindingKind::VersionModified],
        "{:?}",
        report.findings
    );
    assert!(report.findings[0].detail.contains("Patient/b/_history/2"));
}

async fn swapped_ciphertext_is_found(db: TestDb) {
    let key = populated(&db).await;
    exec(
        &db,
        "UPDATE resource_versions SET ciphertext = (SELECT ciphertext FROM resource_versions WHERE id = 'a' AND version_id = 1) WHERE id = 'c' AND version_id = 1",
    );
    let report = run(&db, &key);
    assert_eq!(
        kinds(&report),
        [FindingKind::VersionSwapped],
        "{:?}",
        report.findings
    );
    assert!(report.findings[0].detail.contains("Patient/a/_history/1"));
}

async fn deleted_version_is_found(db: TestDb) {
    let key = populated(&db).await;
    // Roll Patient/c back to version 1 and remove version 2.
    exec(
        &db,
        "DELETE FROM resource_versions WHERE id = 'c' AND version_id = 2",
    );
    exec(
        &db,
        "UPDATE resources SET current_version = 1 WHERE id = 'c'",
    );
    let report = run(&db, &key);
    let mut found = kinds(&report);
    found.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        found,
        [FindingKind::HeadMismatch, FindingKind::VersionDeleted],
        "{:?}",
        report.findings
    );
}

async fn unledgered_version_is_found(db: TestDb) {
    let key = populated(&db).await;
    exec(
        &db,
        "INSERT INTO resource_versions (resource_type, id, version_id, last_updated, deleted, method, key_id, wrapped_key, nonce, ciphertext) \
               SELECT resource_type, id, 3, last_updated, deleted, method, key_id, wrapped_key, nonce, ciphertext FROM resource_versions WHERE id = 'a' AND version_id = 2",
    );
    let report = run(&db, &key);
    assert_eq!(
        kinds(&report),
        [FindingKind::VersionUnledgered],
        "{:?}",
        report.findings
    );
    assert!(report.findings[0].detail.contains("Patient/a/_history/3"));
}

async fn changed_entry_is_found(db: TestDb) {
    let key = populated(&db).await;
    // Rewrite an entry's action, as someone with the database would (entries are stored
    // deflated; a row holding plain JSON is read as it is): its signature and leaf hash no
    // longer match.
    {
        use diesel::prelude::*;
        use fhirledger::store::schema::ledger_entries;
        let mut conn = db.connect();
        let row = fhirledger::store::ledger::entries_at(&mut conn, &[2])
            .unwrap()
            .pop()
            .expect("entry 2");
        let text = String::from_utf8(row.data).unwrap();
        assert!(text.contains("\"read\""), "{text}");
        let changed = text.replace("\"read\"", "\"vread\"");
        let updated =
            diesel::update(ledger_entries::table.filter(ledger_entries::leaf_index.eq(2)))
                .set(ledger_entries::data.eq(changed.as_bytes()))
                .execute(&mut conn)
                .unwrap();
        assert_eq!(updated, 1);
    }
    let report = run(&db, &key);
    let found = kinds(&report);
    assert!(
        found.contains(&FindingKind::EntryInvalid),
        "{:?}",
        report.findings
    );
    assert!(
        found.contains(&FindingKind::TreeHash),
        "{:?}",
        report.findings
    );
    assert!(
        found.contains(&FindingKind::Checkpoint),
        "{:?}",
        report.findings
    );
}

async fn removed_entry_is_found(db: TestDb) {
    let key = populated(&db).await;
    exec(&db, "DELETE FROM ledger_entries WHERE leaf_index = 4");
    let report = run(&db, &key);
    let found = kinds(&report);
    assert!(
        found.contains(&FindingKind::IndexGap),
        "{:?}",
        report.findings
    );
    assert!(
        found.contains(&FindingKind::VersionUnledgered),
        "{:?}",
        report.findings
    );
}

/// A server taking writes while the audit reads: no finding, since the audit reads one
/// snapshot (without one it saw versions whose entries it had read before they existed).
async fn audit_under_writes_finds_nothing(db: TestDb) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let state = db.state();
    let key = AuditKey {
        verifying_key: state.ledger.key().verifying_key(),
        vkey: state.ledger.key().vkey(),
    };
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let stop = Arc::new(AtomicBool::new(false));
    let audits = {
        let stop = stop.clone();
        let url = db.url.clone();
        std::thread::spawn(move || {
            let mut reports = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let mut conn = fhirledger::store::connection::establish(&url).unwrap();
                let keys = audit_keys(&mut conn, &key).unwrap();
                reports.push(audit(&mut conn, &keys, None, &mut |_| {}).unwrap());
            }
            reports
        })
    };
    let sequencer = {
        let stop = stop.clone();
        let ledger = state.ledger.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                ledger.sequence_pending().unwrap();
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
        })
    };
    for round in 0..200 {
        let id = format!("w{}", round % 20);
        let body = json!({"resourceType": "Patient", "id": id, "active": round % 2 == 0});
        let reply = call(&app, put(&format!("/fhir/Patient/{id}"), &body)).await;
        assert!(reply.status.is_success(), "{}", reply.text());
    }
    stop.store(true, Ordering::Relaxed);
    sequencer.join().unwrap();
    let reports = audits.join().unwrap();
    assert!(!reports.is_empty());
    for report in &reports {
        assert!(report.is_clean(), "{:?}", report.findings);
    }
}

/// Dropping the newest entries and making the database consistent again is found: the
/// tree is no longer covered by the latest signed checkpoint, and a checkpoint the auditor
/// saved is no longer extended by the log.
async fn dropped_newest_entries_are_found(db: TestDb) {
    let key = populated(&db).await;
    let trusted_note: String = {
        #[derive(diesel::QueryableByName)]
        struct Note {
            #[diesel(sql_type = diesel::sql_types::Text)]
            note: String,
        }
        diesel::sql_query("SELECT note FROM ledger_checkpoints ORDER BY tree_size DESC LIMIT 1")
            .get_result::<Note>(&mut db.connect())
            .unwrap()
            .note
    };
    let trusted =
        fhirledger::ledger::checkpoint::verify_checkpoint(&trusted_note, &key.vkey).unwrap();
    assert_eq!(trusted.size, 9);
    let clean = run_trusting(&db, &key, Some(&trusted));
    assert!(clean.is_clean(), "{:?}", clean.findings);

    // The insider drops the newest entry (the read of Patient c) and makes everything
    // agree again: the tree hashes of eight leaves, no checkpoint above them, tree size 8.
    // Every remaining row is consistent with every other; no signature is broken.
    exec(&db, "DELETE FROM ledger_entries WHERE leaf_index >= 8");
    exec(&db, "DELETE FROM ledger_hashes WHERE stored_index >= 15");
    exec(&db, "DELETE FROM ledger_checkpoints WHERE tree_size > 8");
    exec(&db, "UPDATE ledger_state SET tree_size = 8");
    let report = run(&db, &key);
    let found = kinds(&report);
    assert_eq!(
        found,
        vec![FindingKind::Uncheckpointed],
        "{:?}",
        report.findings
    );
    let report = run_trusting(&db, &key, Some(&trusted));
    assert!(
        kinds(&report).contains(&FindingKind::NotExtendingTrusted),
        "{:?}",
        report.findings
    );
}

on_both_backends!(
    audit_under_writes_finds_nothing,
    dropped_newest_entries_are_found,
    untouched_database_is_clean,
    changed_ciphertext_is_found,
    swapped_ciphertext_is_found,
    deleted_version_is_found,
    unledgered_version_is_found,
    changed_entry_is_found,
    removed_entry_is_found,
);
