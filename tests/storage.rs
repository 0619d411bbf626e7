//! What the database holds: no plaintext of any resource (a raw scan of the SQLite file
//! with its WAL, a `pg_dump` of PostgreSQL), ciphertexts bound to their rows, and
//! migrations whose `down.sql` really reverts them.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use actix_web::http::StatusCode;
use actix_web::test;
use common::{TestDb, call, get, post, put};
use diesel::RunQueryDsl as _;
use serde_json::json;

/// Distinctive values that must never appear in the database.
const FAMILY: &str = "Zyxwarblequist";
const GIVEN: &str = "Quenthoraphine";
const IDENTIFIER: &str = "MRN-7Q3X9-PLAINTEXT";
const NARRATIVE: &str = "Narrativeonlyvisibleinclear";
const PHONE: &str = "555-0199-4242";

/// Everything the database keeps on disk, as bytes to search.
fn database_bytes(db: &TestDb) -> Vec<u8> {
    if let Some(path) = db.sqlite_path() {
        let mut bytes = Vec::new();
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let file = format!("{}{suffix}", path.display());
            if let Ok(content) = std::fs::read(&file) {
                bytes.extend(content);
            }
        }
        assert!(!bytes.is_empty(), "the SQLite file must exist");
        bytes
    } else {
        let url = db.postgres_url().expect("postgres URL");
        let output = std::process::Command::new("pg_dump")
            .arg("--dbname")
            .arg(url)
            .output()
            .expect("pg_dump must be installed to scan the PostgreSQL database");
        assert!(
            output.status.success(),
            "pg_dump failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output.stdout
    }
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

async fn no_plaintext_in_the_database(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let patient = json!({
        "resourceType": "Patient",
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{NARRATIVE}</div>")},
        "identifier": [{"system": "http://hospital.example.org/mrn", "value": IDENTIFIER}],
        "name": [{"family": FAMILY, "given": [GIVEN]}],
        "telecom": [{"system": "phone", "value": PHONE}],
    });
    let created = call(&app, post("/fhir/Patient", &patient)).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.json()["id"].as_str().unwrap().to_owned();
    let mut updated = created.json();
    updated["name"][0]["given"] = json!([GIVEN, "Second"]);
    assert_eq!(
        call(&app, put(&format!("/fhir/Patient/{id}"), &updated))
            .await
            .status,
        StatusCode::OK
    );
    // The data really is there and readable through the API.
    assert!(
        call(&app, get(&format!("/fhir/Patient/{id}")))
            .await
            .text()
            .contains(FAMILY)
    );

    let bytes = database_bytes(&db);
    // The scan reads the right data: the tables and the resource id are there.
    assert!(
        contains(&bytes, "resource_versions"),
        "scan must cover the schema"
    );
    assert!(contains(&bytes, &id), "scan must cover the rows");
    for secret in [
        FAMILY,
        GIVEN,
        IDENTIFIER,
        NARRATIVE,
        PHONE,
        "hospital.example.org",
    ] {
        assert!(
            !contains(&bytes, secret),
            "plaintext '{secret}' found in the database"
        );
    }
}

async fn moved_ciphertext_fails_closed(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let a = call(
        &app,
        put(
            "/fhir/Patient/a",
            &json!({"resourceType": "Patient", "id": "a", "name": [{"family": "Alpha"}]}),
        ),
    )
    .await;
    let b = call(
        &app,
        put(
            "/fhir/Patient/b",
            &json!({"resourceType": "Patient", "id": "b", "name": [{"family": "Bravo"}]}),
        ),
    )
    .await;
    assert_eq!(
        (a.status, b.status),
        (StatusCode::CREATED, StatusCode::CREATED)
    );

    // An insider copies A's sealed content (with its wrapped key) over B's row.
    let mut conn = db.connect();
    let copied = diesel::sql_query(
        "UPDATE resource_versions SET ciphertext = (SELECT ciphertext FROM resource_versions WHERE id = 'a'), \
         nonce = (SELECT nonce FROM resource_versions WHERE id = 'a'), \
         wrapped_key = (SELECT wrapped_key FROM resource_versions WHERE id = 'a') WHERE id = 'b'",
    )
    .execute(&mut conn)
    .unwrap();
    assert_eq!(copied, 1);

    let read = call(&app, get("/fhir/Patient/b")).await;
    assert_eq!(read.status, StatusCode::INTERNAL_SERVER_ERROR);
    let issue = read.outcome_issue();
    assert_eq!(issue["code"], "exception");
    assert_eq!(issue["diagnostics"], "internal server error");
    assert!(!read.text().contains("Alpha") && !read.text().contains("Bravo"));
    // A is untouched.
    assert_eq!(
        call(&app, get("/fhir/Patient/a")).await.json()["name"][0]["family"],
        "Alpha"
    );

    // A flipped byte is caught the same way.
    diesel::sql_query("UPDATE resource_versions SET ciphertext = wrapped_key WHERE id = 'a'")
        .execute(&mut conn)
        .unwrap();
    assert_eq!(
        call(&app, get("/fhir/Patient/a")).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

async fn another_master_key_cannot_read(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    let created = call(
        &app,
        put(
            "/fhir/Patient/k",
            &json!({"resourceType": "Patient", "id": "k", "active": true}),
        ),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let stranger = test::init_service(fhirledger::api::build_app(db.state())).await;
    let read = call(&stranger, get("/fhir/Patient/k")).await;
    assert_eq!(read.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!read.text().contains("active"));
}

async fn migrations_revert_and_reapply(db: TestDb) {
    use fhirledger::store::migrations;
    let mut conn = db.connect();
    assert!(migrations::run_pending(&mut conn).unwrap() > 0);
    assert_eq!(
        migrations::run_pending(&mut conn).unwrap(),
        0,
        "nothing left to apply"
    );
    assert!(migrations::revert_all(&mut conn).unwrap() > 0);
    // After down.sql the tables are gone…
    assert!(
        diesel::sql_query("SELECT 1 FROM resources")
            .execute(&mut conn)
            .is_err()
    );
    // …and up.sql recreates them.
    assert!(migrations::run_pending(&mut conn).unwrap() > 0);
    diesel::sql_query("SELECT 1 FROM resources")
        .execute(&mut conn)
        .unwrap();
    drop(conn);
    let app = test::init_service(fhirledger::api::build_app(db.state())).await;
    assert_eq!(
        call(
            &app,
            post(
                "/fhir/Patient",
                &json!({"resourceType": "Patient", "active": true})
            )
        )
        .await
        .status,
        StatusCode::CREATED
    );
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

/// The same keys on every start, so that a second state reads what the first wrote.
fn keys() -> fhirledger::server::Keys {
    fhirledger::server::Keys {
        master: fhirledger::crypto::MasterKey::from_bytes([7; 32]),
        ledger: common::ledger_key(),
        index: fhirledger::crypto::BlindIndexKey::from_bytes([9; 32]),
        local_issuer: Some(common::local_issuer()),
    }
}

fn count(conn: &mut fhirledger::store::DbConnection, sql: &str) -> i64 {
    diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
}

/// Resources stored before `resources.presence` existed kept their presence digests (what
/// `:missing` searches) as `search_hashes` rows. Reverting that migration puts them back
/// there; the server moves them into the column at start-up; `:missing` answers the same
/// throughout.
async fn presence_digests_move_out_of_the_index(db: TestDb) {
    use fhirledger::store::migrations;
    let app = test::init_service(fhirledger::api::build_app(
        db.state_with_keys(keys(), 1 << 20),
    ))
    .await;
    for (id, body) in [
        (
            "with",
            json!({"resourceType": "Patient", "id": "with", "identifier": [{"value": "1"}]}),
        ),
        (
            "without",
            json!({"resourceType": "Patient", "id": "without", "active": true}),
        ),
    ] {
        let reply = call(&app, put(&format!("/fhir/Patient/{id}"), &body)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    for (flag, only) in [(false, "with"), (true, "without")] {
        let url = format!("/fhir/Patient?identifier:missing={flag}");
        let reply = call(&app, get(&url)).await;
        assert_eq!(common::searchset_ids(&reply.json()), [only], "{url}");
    }
    drop(app);

    let mut conn = db.connect();
    let index_rows = count(&mut conn, "SELECT COUNT(*) AS n FROM search_hashes");
    // The presence migration and those after it, counted from the backend's folder.
    let folder = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    let since_presence = std::fs::read_dir(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("migrations")
            .join(folder),
    )
    .unwrap()
    .filter(|dir| {
        dir.as_ref().unwrap().file_name().to_string_lossy().as_ref() >= "2026-11-29-000006_presence"
    })
    .count();
    for _ in 0..since_presence {
        migrations::revert_last(&mut conn).unwrap();
    }
    // One row per parameter each resource has: identifier and active, for instance.
    let restored = count(&mut conn, "SELECT COUNT(*) AS n FROM search_hashes") - index_rows;
    assert!(restored >= 3, "{restored} presence digests restored");
    assert_eq!(migrations::run_pending(&mut conn).unwrap(), since_presence);
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) AS n FROM resources WHERE presence IS NULL"
        ),
        2
    );
    drop(conn);

    let app = test::init_service(fhirledger::api::build_app(
        db.state_with_keys(keys(), 1 << 20),
    ))
    .await;
    let mut conn = db.connect();
    assert_eq!(
        count(
            &mut conn,
            "SELECT COUNT(*) AS n FROM resources WHERE presence IS NULL"
        ),
        0
    );
    assert_eq!(
        count(&mut conn, "SELECT COUNT(*) AS n FROM search_hashes"),
        index_rows,
        "the moved digests left search_hashes"
    );
    for (flag, only) in [(false, "with"), (true, "without")] {
        let url = format!("/fhir/Patient?identifier:missing={flag}");
        let reply = call(&app, get(&url)).await;
        assert_eq!(common::searchset_ids(&reply.json()), [only], "{url}");
    }
}

/// A database whose index was written with string prefixes of at most 12 characters (before
/// the bound was raised) is rebuilt in the background at start-up; once done, searches for
/// terms longer than 12 characters find their matches through the longer prefixes, and the
/// state says so. The old index is simulated by wiping it and marking the state as old: the
/// rebuild must put every row back.
async fn string_prefixes_widen_in_the_background(db: TestDb) {
    let app = test::init_service(fhirledger::api::build_app(
        db.state_with_keys(keys(), 1 << 20),
    ))
    .await;
    for (id, family) in [
        ("long", "Abcdefghijklmnopqrstu"),
        ("short", "Abcdefghijklmzz"),
    ] {
        let body = json!({"resourceType": "Patient", "id": id, "name": [{"family": family}]});
        let reply = call(&app, put(&format!("/fhir/Patient/{id}"), &body)).await;
        assert_eq!(reply.status, StatusCode::CREATED);
    }
    drop(app);
    let mut conn = db.connect();
    let state = "SELECT CAST(prefix_chars AS BIGINT) AS n FROM search_state";
    assert_eq!(
        count(&mut conn, state),
        24,
        "a new database starts at the full bound"
    );
    let index_rows = count(&mut conn, "SELECT COUNT(*) AS n FROM search_hashes");
    diesel::sql_query("DELETE FROM search_hashes")
        .execute(&mut conn)
        .unwrap();
    diesel::sql_query("UPDATE search_state SET prefix_chars = 12, reindexed_through = 0")
        .execute(&mut conn)
        .unwrap();

    let app = test::init_service(fhirledger::api::build_app(
        db.state_with_keys(keys(), 1 << 20),
    ))
    .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while count(&mut conn, state) != 24 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rebuild did not finish"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        count(&mut conn, "SELECT COUNT(*) AS n FROM search_hashes"),
        index_rows,
        "the rebuild put every index row back"
    );
    for (family, expected) in [
        ("abcdefghijklmnop", vec!["long"]),
        ("Abcdefghijklmnopqrstu", vec!["long"]),
        ("abcdefghijklmz", vec!["short"]),
        ("abcdefghijklm", vec!["long", "short"]),
        ("abcdefghijklmnopqrstuv", vec![]),
    ] {
        let reply = call(&app, get(&format!("/fhir/Patient?family={family}"))).await;
        let mut ids = common::searchset_ids(&reply.json());
        ids.sort();
        assert_eq!(ids, expected, "family={family}");
    }
}

on_both_backends!(
    string_prefixes_widen_in_the_background,
    presence_digests_move_out_of_the_index,
    no_plaintext_in_the_database,
    moved_ciphertext_fails_closed,
    another_master_key_cannot_read,
);

/// The migrations from an empty database (the other tests start from a migrated copy).
mod migrations_revert_and_reapply_from_empty {
    #[actix_web::test]
    async fn sqlite() {
        super::migrations_revert_and_reapply(super::common::TestDb::sqlite()).await;
    }
    #[actix_web::test]
    async fn postgres() {
        super::migrations_revert_and_reapply(super::common::TestDb::postgres_empty()).await;
    }
}
