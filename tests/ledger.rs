//! The ledger end to end: every interaction leaves a signed entry; downloading the entries
//! rebuilds the checkpointed root; receipts, inclusion and consistency proofs and tiles
//! verify; bad parameters get OperationOutcomes; and the server fails closed when the
//! ledger cannot be written.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test::{self, TestRequest};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Reply, TestDb, call, get, post, put};
use diesel::RunQueryDsl as _;
use fhirledger::ledger::checkpoint::{decode_hash, verify_checkpoint};
use fhirledger::ledger::entry::{content_hash, verify_entry};
use fhirledger::ledger::keys::parse_vkey;
use fhirledger::ledger::tree::{self, MemoryHashStore};
use serde_json::{Value, json};

async fn sequence(state: &fhirledger::api::AppState) -> u64 {
    let ledger = state.ledger.clone();
    tokio::task::spawn_blocking(move || ledger.sequence_pending())
        .await
        .unwrap()
        .unwrap()
}

fn receipt_of(reply: &Reply) -> String {
    reply
        .header("x-ledger-entry")
        .unwrap_or_else(|| panic!("no X-Ledger-Entry on {}: {}", reply.status, reply.text()))
}

fn hashes(values: &Value) -> Vec<tree::Hash> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|h| decode_hash(h.as_str().unwrap()).unwrap())
        .collect()
}

async fn log_rebuilds_to_the_signed_checkpoint(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;

    // Interactions, each answered with a receipt.
    let created = call(
        &app,
        post(
            "/fhir/Patient",
            &json!({"resourceType": "Patient", "active": true}),
        ),
    )
    .await;
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let mut receipts = vec![receipt_of(&created)];
    let observation = json!({"resourceType": "Observation", "id": "bp", "status": "final", "code": {"text": "bp"},
        "subject": {"reference": format!("Patient/{id}")}});
    let steps = [
        get(&format!("/fhir/Patient/{id}")),
        put(
            &format!("/fhir/Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id, "active": false}),
        ),
        get(&format!("/fhir/Patient/{id}/_history/1")),
        get(&format!("/fhir/Patient/{id}/_history")),
        put("/fhir/Observation/bp", &observation),
        TestRequest::delete().uri(&format!("/fhir/Patient/{id}")),
        get(&format!("/fhir/Patient/{id}")),
        get("/fhir/Patient/never-was"),
        put(
            &format!("/fhir/Patient/{id}"),
            &json!({"resourceType": "Patient", "id": id}),
        )
        .insert_header(("If-Match", "W/\"1\"")),
    ];
    for request in steps {
        receipts.push(receipt_of(&call(&app, request).await));
    }
    // Requests that never reached a resource are not ledgered.
    assert!(
        call(&app, get("/fhir/metadata"))
            .await
            .header("x-ledger-entry")
            .is_none()
    );
    assert!(
        call(&app, get("/fhir/Nope/1"))
            .await
            .header("x-ledger-entry")
            .is_none()
    );

    assert_eq!(sequence(&state).await, receipts.len() as u64);

    // The checkpoint verifies with the published key.
    let key_info = call(&app, get("/ledger/key")).await.json();
    let vkey = key_info["vkey"].as_str().unwrap();
    let (_, public_key) = parse_vkey(vkey).unwrap();
    assert_eq!(key_info["public_key"], BASE64.encode(public_key.as_bytes()));
    let note = call(&app, get("/ledger/checkpoint")).await;
    assert!(
        note.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    let checkpoint = verify_checkpoint(&note.text(), vkey).unwrap();
    assert_eq!(checkpoint.origin, common::LEDGER_ORIGIN);
    assert_eq!(checkpoint.size, receipts.len() as u64);

    // Rebuild the tree from the served bytes; check every signature.
    let page = call(
        &app,
        get(&format!("/ledger/entries?start=0&end={}", checkpoint.size)),
    )
    .await
    .json();
    let entries = page["entries"].as_array().unwrap();
    assert_eq!(entries.len() as u64, checkpoint.size);
    let mut rebuilt = MemoryHashStore::new();
    let mut actions = Vec::new();
    for (i, served) in entries.iter().enumerate() {
        assert_eq!(served["index"], i);
        let leaf_data = BASE64
            .decode(served["leaf_data"].as_str().unwrap())
            .unwrap();
        let entry = verify_entry(&leaf_data, &public_key).unwrap();
        assert_eq!(
            serde_json::to_value(&entry).unwrap()["id"],
            served["entry"]["id"]
        );
        assert_eq!(
            entry.id, receipts[i],
            "entries are sequenced in the order they were made"
        );
        actions.push(format!(
            "{}:{}",
            entry.action,
            serde_json::to_value(entry.outcome)
                .unwrap()
                .as_str()
                .unwrap()
        ));
        rebuilt.append(&leaf_data).unwrap();
    }
    assert_eq!(
        tree::root(&rebuilt, checkpoint.size).unwrap(),
        checkpoint.root
    );
    assert_eq!(
        actions,
        [
            "create:permit",
            "read:permit",
            "update:permit",
            "vread:permit",
            "history:permit",
            "create:permit",
            "delete:permit",
            "read:deny",
            "read:deny",
            "update:deny"
        ]
    );
    assert_eq!(entries[7]["entry"]["reason"], "gone");
    assert_eq!(entries[8]["entry"]["reason"], "not-found");
    assert_eq!(entries[9]["entry"]["reason"], "precondition-failed");
    assert_eq!(entries[5]["entry"]["patient"], format!("Patient/{id}"));
    assert_eq!(
        entries[4]["entry"]["resources"].as_array().unwrap().len(),
        2,
        "history names both versions it disclosed"
    );

    // A write entry carries the hash of the stored ciphertext.
    #[derive(diesel::QueryableByName)]
    struct Cipher {
        #[diesel(sql_type = diesel::sql_types::Binary)]
        ciphertext: Vec<u8>,
    }
    let stored: Cipher = diesel::sql_query(format!(
        "SELECT ciphertext FROM resource_versions WHERE id = '{id}' AND version_id = 1"
    ))
    .get_result(&mut db.connect())
    .unwrap();
    assert_eq!(
        entries[0]["entry"]["resources"][0]["contentHash"],
        content_hash(&stored.ciphertext)
    );

    // Every receipt resolves to its entry with an inclusion proof that verifies.
    for (i, receipt) in receipts.iter().enumerate() {
        let resolved = call(&app, get(&format!("/ledger/receipts/{receipt}")))
            .await
            .json();
        assert_eq!(resolved["index"], i);
        let inclusion = &resolved["inclusion"];
        let leaf = tree::leaf_hash(
            &BASE64
                .decode(resolved["leaf_data"].as_str().unwrap())
                .unwrap(),
        );
        assert_eq!(
            decode_hash(inclusion["leaf_hash"].as_str().unwrap()).unwrap(),
            leaf
        );
        tree::verify_inclusion(
            &hashes(&inclusion["proof"]),
            checkpoint.size,
            checkpoint.root,
            i as u64,
            leaf,
        )
        .unwrap();
        // And by leaf hash.
        let by_hash = call(
            &app,
            get(&format!(
                "/ledger/proof/inclusion?leaf_hash={}&tree_size={}",
                urlencode(inclusion["leaf_hash"].as_str().unwrap()),
                checkpoint.size
            )),
        )
        .await
        .json();
        assert_eq!(by_hash["leaf_index"], i);
    }

    // Later interactions: a new checkpoint consistent with the old one.
    for _ in 0..7 {
        call(&app, get(&format!("/fhir/Patient/{id}/_history/2"))).await;
    }
    sequence(&state).await;
    let newer =
        verify_checkpoint(&call(&app, get("/ledger/checkpoint")).await.text(), vkey).unwrap();
    assert_eq!(newer.size, checkpoint.size + 7);
    let consistency = call(
        &app,
        get(&format!(
            "/ledger/proof/consistency?first={}&second={}",
            checkpoint.size, newer.size
        )),
    )
    .await
    .json();
    tree::verify_consistency(
        &hashes(&consistency["proof"]),
        checkpoint.size,
        checkpoint.root,
        newer.size,
        newer.root,
    )
    .unwrap();
    for index in 0..newer.size {
        let proof = call(
            &app,
            get(&format!(
                "/ledger/proof/inclusion?index={index}&tree_size={}",
                newer.size
            )),
        )
        .await
        .json();
        let leaf = decode_hash(proof["leaf_hash"].as_str().unwrap()).unwrap();
        tree::verify_inclusion(
            &hashes(&proof["proof"]),
            newer.size,
            newer.root,
            index,
            leaf,
        )
        .unwrap();
    }

    // The level-0 partial tile holds the leaf hashes.
    let tile = call(&app, get(&format!("/ledger/tile/0/000.p/{}", newer.size))).await;
    assert_eq!(tile.status, StatusCode::OK);
    assert_eq!(tile.body.len() as u64, newer.size * 32);
    assert_eq!(
        &tile.body[..32],
        &tree::leaf_hash(
            &BASE64
                .decode(entries[0]["leaf_data"].as_str().unwrap())
                .unwrap()
        )
        .0
    );

    // The entry bundle of the same entries: each entry's exact bytes after a 16-bit
    // length, hashing to the tile's leaves, as a mirror using standard tools reads them.
    let bundle = call(
        &app,
        get(&format!("/ledger/tile/entries/000.p/{}", newer.size)),
    )
    .await;
    assert_eq!(bundle.status, StatusCode::OK);
    let mut rest = &bundle.body[..];
    let mut leaves = Vec::new();
    while let [high, low, tail @ ..] = rest {
        let length = usize::from(u16::from_be_bytes([*high, *low]));
        leaves.extend_from_slice(&tree::leaf_hash(&tail[..length]).0);
        rest = &tail[length..];
    }
    assert_eq!(leaves.len() as u64, newer.size * 32);
    assert_eq!(leaves, tile.body);
    let first = BASE64
        .decode(entries[0]["leaf_data"].as_str().unwrap())
        .unwrap();
    assert_eq!(&bundle.body[2..2 + first.len()], &first[..]);

    // Bad parameters: 400 (or 404) with an OperationOutcome naming the problem.
    for (path, status) in [
        (
            format!(
                "/ledger/proof/inclusion?index=0&tree_size={}",
                newer.size + 1
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!(
                "/ledger/proof/inclusion?index={}&tree_size={}",
                newer.size, newer.size
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/proof/inclusion?tree_size=1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/proof/inclusion?index=0&leaf_hash=AAAA&tree_size=1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/proof/inclusion?leaf_hash=notbase64!&tree_size=1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/proof/inclusion?index=-1&tree_size=1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/proof/consistency?first=3&second=2".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/proof/consistency?first=1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            format!(
                "/ledger/proof/consistency?first=1&second={}",
                newer.size + 5
            ),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/entries?start=5&end=2".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/entries?start=0&end=5000".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/ledger/entries?start=x".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
        ("/ledger/entries?page=2".to_owned(), StatusCode::BAD_REQUEST),
        ("/ledger/entries/abc".to_owned(), StatusCode::BAD_REQUEST),
        ("/ledger/entries/99999".to_owned(), StatusCode::NOT_FOUND),
        ("/ledger/receipts/unknown".to_owned(), StatusCode::NOT_FOUND),
        ("/ledger/tile/0/abc".to_owned(), StatusCode::BAD_REQUEST),
        ("/ledger/tile/0/001".to_owned(), StatusCode::NOT_FOUND),
        ("/ledger/tile/entries/000".to_owned(), StatusCode::NOT_FOUND),
        (
            format!("/ledger/tile/entries/000.p/{}", newer.size + 1),
            StatusCode::NOT_FOUND,
        ),
        (
            "/ledger/tile/entries/0x1".to_owned(),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let reply = call(&app, get(&path)).await;
        assert_eq!(reply.status, status, "{path}: {}", reply.text());
        reply.outcome_issue();
    }
}

fn urlencode(text: &str) -> String {
    serde_urlencoded::to_string([("v", text)])
        .unwrap()
        .trim_start_matches("v=")
        .to_owned()
}

/// A trigger that makes every insert into the ledger fail, as a full disk or a revoked
/// grant would.
fn refuse_ledger_writes(db: &TestDb) {
    let mut conn = db.connect();
    let statements: &[&str] = if db.is_postgres() {
        &[
            "CREATE FUNCTION refuse_ledger() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'ledger refused'; END $$ LANGUAGE plpgsql",
            "CREATE TRIGGER refuse_ledger BEFORE INSERT ON ledger_entries FOR EACH ROW EXECUTE FUNCTION refuse_ledger()",
        ]
    } else {
        &[
            "CREATE TRIGGER refuse_ledger BEFORE INSERT ON ledger_entries BEGIN SELECT RAISE(ABORT, 'ledger refused'); END",
        ]
    };
    for statement in statements {
        diesel::sql_query(*statement).execute(&mut conn).unwrap();
    }
}

async fn fails_closed_when_the_ledger_refuses_writes(db: TestDb) {
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let body =
        json!({"resourceType": "Patient", "id": "closed", "name": [{"family": "Secretname"}]});
    assert_eq!(
        call(&app, put("/fhir/Patient/closed", &body)).await.status,
        StatusCode::CREATED
    );
    refuse_ledger_writes(&db);

    for request in [
        get("/fhir/Patient/closed"),
        get("/fhir/Patient/closed/_history/1"),
        get("/fhir/Patient/closed/_history"),
        get("/fhir/Patient/missing"),
        put(
            "/fhir/Patient/closed",
            &json!({"resourceType": "Patient", "id": "closed", "active": true}),
        ),
        post("/fhir/Patient", &body),
        TestRequest::delete().uri("/fhir/Patient/closed"),
    ] {
        let reply = call(&app, request).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{}",
            reply.text()
        );
        assert!(!reply.text().contains("Secretname"));
        assert!(reply.header("retry-after").is_some());
        assert_eq!(reply.outcome_issue()["code"], "transient");
    }

    // Nothing was written while the ledger refused: still version 1, no second patient.
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let versions: Count = diesel::sql_query("SELECT COUNT(*) AS n FROM resource_versions")
        .get_result(&mut db.connect())
        .unwrap();
    assert_eq!(versions.n, 1);
}

/// Witnesses' cosignatures as the log stores and serves them: the checkpoint with enough of
/// them, the first covering an entry, the last before it; a cosignature collected twice
/// (two processes) is kept once.
async fn cosigned_checkpoints_are_chosen_by_count_and_position(db: TestDb) {
    use fhirledger::store::ledger::{CosignatureRow, insert_cosignature};
    let state = db.state();
    let app = test::init_service(fhirledger::api::build_app(state.clone())).await;
    let mut sizes = Vec::new();
    let mut patients = Vec::new();
    for _ in 0..3 {
        let created = call(
            &app,
            post("/fhir/Patient", &json!({"resourceType": "Patient"})),
        )
        .await;
        patients.push(created.json()["id"].as_str().unwrap().to_owned());
        sequence(&state).await;
        let note = call(&app, get("/ledger/checkpoint")).await.text();
        sizes.push(note.lines().nth(1).unwrap().parse::<i64>().unwrap());
    }
    let mut conn = db.connect();
    for (size, witness) in [
        (sizes[0], "w1"),
        (sizes[1], "w1"),
        (sizes[1], "w2"),
        (sizes[1], "w2"),
        (sizes[2], "w1"),
    ] {
        insert_cosignature(
            &mut conn,
            &CosignatureRow {
                tree_size: size,
                witness: witness.into(),
                signature: format!("— {witness} c2lnbmF0dXJl{size}"),
                witness_time: 1_700_000_000 + size,
                received_at: 0,
            },
        )
        .unwrap();
    }
    let size_of = |note: &str| note.lines().nth(1).unwrap().parse::<i64>().unwrap();
    let cosigned = |query: &'static str| {
        let app = &app;
        async move { call(app, get(&format!("/ledger/checkpoint/cosigned{query}"))).await }
    };
    let latest = cosigned("").await.text();
    assert_eq!(size_of(&latest), sizes[2]);
    assert!(
        latest.ends_with(&format!("— w1 c2lnbmF0dXJl{}\n", sizes[2])),
        "{latest}"
    );
    let two = cosigned("?cosignatures=2").await.text();
    assert_eq!(size_of(&two), sizes[1]);
    assert_eq!(two.matches("\n— w").count(), 2, "{two}");
    // The first cosigned checkpoint holding entry 0, and the last without the newest entry.
    assert_eq!(size_of(&cosigned("?covering=0").await.text()), sizes[0]);
    let before = format!("?cosignatures=2&before={}", sizes[2] - 1);
    let reply = call(&app, get(&format!("/ledger/checkpoint/cosigned{before}"))).await;
    assert_eq!(size_of(&reply.text()), sizes[1]);
    for (query, status) in [
        ("?cosignatures=3", StatusCode::NOT_FOUND),
        ("?before=0", StatusCode::NOT_FOUND),
        ("?cosignatures=0", StatusCode::BAD_REQUEST),
        ("?covering=1&before=1", StatusCode::BAD_REQUEST),
        ("?since=1", StatusCode::BAD_REQUEST),
    ] {
        let reply = cosigned(query).await;
        assert_eq!(reply.status, status, "{query}: {}", reply.text());
        reply.outcome_issue();
    }
    // A receipt carries the first cosigned checkpoint that includes its entry.
    let first: Value = call(&app, get("/ledger/entries/0")).await.json();
    let receipt = first["entry"]["id"].as_str().unwrap();
    let resolved = call(&app, get(&format!("/ledger/receipts/{receipt}")))
        .await
        .json();
    assert_eq!(
        resolved["cosigned"]["inclusion"]["tree_size"].as_i64(),
        Some(sizes[0])
    );
    assert!(
        resolved["cosigned"]["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with(&format!("— w1 c2lnbmF0dXJl{}\n", sizes[0]))
    );
    // The patient's view carries it too, with the entry's inclusion in it.
    let auditor = common::token_with("ledger.read", None, None);
    let view = common::call_as_is(
        &app,
        get(&format!("/fhir/AuditEvent?patient=Patient/{}", patients[0]))
            .insert_header(("Authorization", format!("Bearer {auditor}"))),
    )
    .await
    .json();
    let parts = view["entry"][0]["resource"]["extension"][0]["extension"]
        .as_array()
        .unwrap()
        .clone();
    let part = |name: &str| {
        parts
            .iter()
            .find(|p| p["url"] == name)
            .map(|p| p["valueString"].clone())
    };
    assert_eq!(part("cosignedTreeSize"), Some(json!(sizes[0].to_string())));
    assert!(
        part("cosignedCheckpoint")
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap()
            .ends_with(&format!("— w1 c2lnbmF0dXJl{}\n", sizes[0]))
    );
    // No witnesses configured: an empty list.
    assert_eq!(call(&app, get("/ledger/witnesses")).await.json(), json!([]));
}

on_both_backends!(
    log_rebuilds_to_the_signed_checkpoint,
    fails_closed_when_the_ledger_refuses_writes,
    cosigned_checkpoints_are_chosen_by_count_and_position
);

/// The tree math against RFC 6962 test vectors (transparency-dev/merkle).
#[test]
fn rfc6962_vectors() {
    let vectors = common::read_json(&common::fixtures_dir().join("merkle/rfc6962-vectors.json"));
    let hex = |v: &Value| -> Vec<u8> {
        let s = v.as_str().unwrap();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let as_hash = |v: &Value| tree::Hash(hex(v).try_into().unwrap());
    let mut store = MemoryHashStore::new();
    for (input, expected) in vectors["leaf_inputs_hex"]
        .as_array()
        .unwrap()
        .iter()
        .zip(vectors["leaf_hashes_hex"].as_array().unwrap())
    {
        assert_eq!(store.append(&hex(input)).unwrap(), as_hash(expected));
    }
    for (size, expected) in vectors["roots_by_size_hex"].as_object().unwrap() {
        assert_eq!(
            tree::root(&store, size.parse().unwrap()).unwrap(),
            as_hash(expected),
            "root of {size}"
        );
    }
    let inclusion = vectors["inclusion"].as_array().unwrap();
    assert!(!inclusion.is_empty());
    for case in inclusion {
        let (index, size) = (
            case["leafIdx"].as_u64().unwrap(),
            case["treeSize"].as_u64().unwrap(),
        );
        let expected: Vec<tree::Hash> = case["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(as_hash)
            .collect();
        assert_eq!(
            tree::inclusion_proof(&store, size, index).unwrap(),
            expected,
            "{}",
            case["file"]
        );
        tree::verify_inclusion(
            &expected,
            size,
            as_hash(&case["root"]),
            index,
            as_hash(&case["leafHash"]),
        )
        .unwrap();
    }
    let consistency = vectors["consistency"].as_array().unwrap();
    assert!(!consistency.is_empty());
    for case in consistency {
        let (first, second) = (
            case["size1"].as_u64().unwrap(),
            case["size2"].as_u64().unwrap(),
        );
        let expected: Vec<tree::Hash> = case["proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(as_hash)
            .collect();
        assert_eq!(
            tree::consistency_proof(&store, first, second).unwrap(),
            expected,
            "{}",
            case["file"]
        );
        tree::verify_consistency(
            &expected,
            first,
            as_hash(&case["root1"]),
            second,
            as_hash(&case["root2"]),
        )
        .unwrap();
    }
}
