//! The witness over HTTP (C2SP tlog-witness `add-checkpoint`): it cosigns a log's checkpoints
//! while they extend what it cosigned before; it refuses a log that forks (another tree of a
//! size it cosigned, or a tree not consistent with it), a stale old size (409 with its
//! latest), an unknown log and an unsigned checkpoint; and a restarted witness keeps its
//! state, so it cannot be talked into the fork after a restart either.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use actix_web::{App, body::to_bytes};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fhirledger::ledger::LedgerKey;
use fhirledger::ledger::checkpoint::sign_checkpoint;
use fhirledger::ledger::cosignature::{CosignatureVerifier, WitnessKey};
use fhirledger::ledger::tree::{self, MemoryHashStore};
use fhirledger::witness::Witness;

/// A log of `size` leaves whose contents start with `label` (two labels: two histories).
fn log_of(label: &str, size: u64) -> MemoryHashStore {
    let mut store = MemoryHashStore::new();
    for n in 0..size {
        store.append(format!("{label}-{n}").as_bytes()).unwrap();
    }
    store
}

fn checkpoint(key: &LedgerKey, store: &MemoryHashStore) -> String {
    sign_checkpoint(key, store.size(), tree::root(store, store.size()).unwrap()).unwrap()
}

/// An add-checkpoint body from `old` to the log's current size.
fn body(key: &LedgerKey, store: &MemoryHashStore, old: u64) -> String {
    let mut text = format!("old {old}\n");
    if old > 0 && old < store.size() {
        for hash in tree::consistency_proof(store, old, store.size()).unwrap() {
            text.push_str(&BASE64.encode(hash.0));
            text.push('\n');
        }
    }
    text.push('\n');
    text.push_str(&checkpoint(key, store));
    text
}

struct Answer {
    status: StatusCode,
    content_type: String,
    text: String,
}

async fn submit(witness: &Arc<Witness>, body: impl Into<Vec<u8>>) -> Answer {
    let app = test::init_service(
        App::new().configure(fhirledger::witness::configure(Arc::clone(witness))),
    )
    .await;
    let request = TestRequest::post()
        .uri("/add-checkpoint")
        .set_payload(body.into())
        .to_request();
    let response = test::call_service(&app, request).await;
    let status = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = to_bytes(response.into_body()).await.unwrap();
    Answer {
        status,
        content_type,
        text: String::from_utf8(bytes.to_vec()).unwrap(),
    }
}

/// The witness's time in its cosignature of `checkpoint`, when the answer is one.
fn cosigned_time(verifier: &CosignatureVerifier, checkpoint: &str, answer: &Answer) -> u64 {
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.text);
    let cosigned = format!("{checkpoint}{}", answer.text);
    let note = signed_note::Note::from_bytes(cosigned.as_bytes()).unwrap();
    let list = signed_note::VerifierList::new(vec![Box::new(verifier.clone())]);
    let (verified, _) = note.verify(&list).expect("the cosignature verifies");
    verifier.verified_time(note.text(), &verified[0]).unwrap()
}

#[actix_web::test]
async fn a_witness_cosigns_a_growing_log_and_refuses_a_fork_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let log_key = LedgerKey::generate("hospital.example/ledger").unwrap();
    let witness_key = WitnessKey::generate("regulator.example/witness").unwrap();
    let verifier = CosignatureVerifier::from_vkey(&witness_key.verifier().vkey()).unwrap();
    let open =
        || Arc::new(Witness::open(witness_key.clone(), &[log_key.vkey()], dir.path()).unwrap());
    let witness = open();

    // First contact: old size 0, no proof.
    let five = log_of("a", 5);
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let answer = submit(&witness, body(&log_key, &five, 0)).await;
    let time = cosigned_time(&verifier, &checkpoint(&log_key, &five), &answer);
    assert!(
        time >= before && time <= before + 60,
        "the witness's clock: {time}"
    );
    assert!(answer.text.starts_with("— regulator.example/witness "));

    // The log grows: cosigned with the consistency proof from 5.
    let nine = log_of("a", 9);
    let answer = submit(&witness, body(&log_key, &nine, 5)).await;
    cosigned_time(&verifier, &checkpoint(&log_key, &nine), &answer);
    // The same tree again is cosigned again.
    let answer = submit(&witness, body(&log_key, &nine, 9)).await;
    cosigned_time(&verifier, &checkpoint(&log_key, &nine), &answer);

    // A client with a stale view learns the latest size.
    let answer = submit(&witness, body(&log_key, &nine, 5)).await;
    assert_eq!(answer.status, StatusCode::CONFLICT);
    assert_eq!(answer.content_type, "text/x.tlog.size");
    assert_eq!(answer.text, "9\n");

    // A fork: another tree of size 9 (a log showing someone else another history), and a
    // tree of size 12 that does not extend the cosigned 9.
    let other_nine = log_of("b", 9);
    let answer = submit(&witness, body(&log_key, &other_nine, 9)).await;
    assert_eq!(answer.status, StatusCode::CONFLICT, "{}", answer.text);
    assert!(answer.text.contains("forked"), "{}", answer.text);
    let other_twelve = log_of("b", 12);
    let answer = submit(&witness, body(&log_key, &other_twelve, 9)).await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.text
    );

    // Restarted, the witness still holds 9 of the first history.
    drop(witness);
    let witness = open();
    assert_eq!(witness.latest_size("hospital.example/ledger"), 9);
    let answer = submit(&witness, body(&log_key, &other_nine, 9)).await;
    assert_eq!(answer.status, StatusCode::CONFLICT, "{}", answer.text);
    let answer = submit(&witness, body(&log_key, &other_twelve, 9)).await;
    assert_eq!(answer.status, StatusCode::UNPROCESSABLE_ENTITY);
    let twelve = log_of("a", 12);
    let answer = submit(&witness, body(&log_key, &twelve, 9)).await;
    cosigned_time(&verifier, &checkpoint(&log_key, &twelve), &answer);
    assert_eq!(witness.latest_size("hospital.example/ledger"), 12);
}

#[actix_web::test]
async fn a_witness_refuses_what_it_cannot_vouch_for() {
    let dir = tempfile::tempdir().unwrap();
    let log_key = LedgerKey::generate("hospital.example/ledger").unwrap();
    let witness = Arc::new(
        Witness::open(
            WitnessKey::generate("regulator.example/witness").unwrap(),
            &[log_key.vkey()],
            dir.path(),
        )
        .unwrap(),
    );
    let three = log_of("a", 3);

    // A log it does not follow: 404.
    let stranger = LedgerKey::generate("elsewhere.example/ledger").unwrap();
    let answer = submit(&witness, body(&stranger, &three, 0)).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND, "{}", answer.text);
    // The right origin signed by another key (an impostor log): 403.
    let impostor = LedgerKey::generate("hospital.example/ledger").unwrap();
    let answer = submit(&witness, body(&impostor, &three, 0)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text);
    // Malformed: an old size above the checkpoint's, no old line, not a note.
    let answer = submit(&witness, body(&log_key, &three, 4)).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    let answer = submit(&witness, format!("\n{}", checkpoint(&log_key, &three))).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    let answer = submit(&witness, "old 0\n\nnot a checkpoint\n").await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    // A proof from size 0 must be empty.
    let proof_line = BASE64.encode([7u8; 32]);
    let answer = submit(
        &witness,
        format!("old 0\n{proof_line}\n\n{}", checkpoint(&log_key, &three)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST, "{}", answer.text);
    // A body beyond the bound is not read.
    let answer = submit(
        &witness,
        vec![b'x'; fhirledger::witness::MAX_REQUEST_BYTES + 1],
    )
    .await;
    assert_eq!(answer.status, StatusCode::PAYLOAD_TOO_LARGE);
    // None of these changed its state.
    assert_eq!(witness.latest_size("hospital.example/ledger"), 0);
}

/// A log that rotates its ledger key: the witness given both keys cosigns the checkpoints of
/// either, still only while they extend what it cosigned; one given the old key alone
/// refuses the new key's.
#[actix_web::test]
async fn a_witness_given_both_keys_follows_a_log_across_a_key_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let old_key = LedgerKey::generate("hospital.example/ledger").unwrap();
    let new_key = LedgerKey::generate("hospital.example/ledger").unwrap();
    let witness_key = WitnessKey::generate("regulator.example/witness").unwrap();
    let verifier = CosignatureVerifier::from_vkey(&witness_key.verifier().vkey()).unwrap();
    let both = Arc::new(
        Witness::open(
            witness_key.clone(),
            &[old_key.vkey(), new_key.vkey()],
            dir.path(),
        )
        .unwrap(),
    );
    let five = log_of("a", 5);
    let answer = submit(&both, body(&old_key, &five, 0)).await;
    cosigned_time(&verifier, &checkpoint(&old_key, &five), &answer);
    let eight = log_of("a", 8);
    let answer = submit(&both, body(&new_key, &eight, 5)).await;
    cosigned_time(&verifier, &checkpoint(&new_key, &eight), &answer);
    // The new key cannot fork what the old one had the witness cosign.
    let other = log_of("b", 10);
    let answer = submit(&both, body(&new_key, &other, 8)).await;
    assert_eq!(
        answer.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        answer.text
    );

    let old_only_dir = tempfile::tempdir().unwrap();
    let old_only =
        Arc::new(Witness::open(witness_key, &[old_key.vkey()], old_only_dir.path()).unwrap());
    let answer = submit(&old_only, body(&new_key, &eight, 0)).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN, "{}", answer.text);
}
