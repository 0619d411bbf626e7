//! Two `serve` processes on one PostgreSQL database under concurrent writes keep one linear
//! log: every entry gets exactly one index, without gaps, and every checkpoint either
//! process signed is a prefix of the same tree.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::TestDb;
use diesel::RunQueryDsl as _;
use fhirledger::ledger::checkpoint::verify_checkpoint;
use fhirledger::ledger::tree::{self, MemoryHashStore};

const BINARY: &str = env!("CARGO_BIN_EXE_fhirledger");

fn post_patient(port: u16, token: &str) -> u16 {
    let body = r#"{"resourceType":"Patient","active":true}"#;
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /fhir/Patient HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn start(db_url: &str, master: &str, ledger: &str) -> (Child, u16, tempfile::TempDir) {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    // Both processes trust the test issuer through its published key set, as servers
    // sharing one database trust one identity provider; their own local issuers are off.
    let jwks = dir.path().join("issuer-jwks.json");
    std::fs::write(
        &jwks,
        serde_json::to_string(&common::local_issuer().jwks()).unwrap(),
    )
    .unwrap();
    let trusted = format!("{}={}", common::local_issuer().issuer(), jwks.display());
    let mut child = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_BASE_URL", common::BASE_URL)
        .env("FHIRLEDGER_LOCAL_ISSUER", "false")
        .env("FHIRLEDGER_TRUSTED_ISSUERS", trusted)
        .env("FHIRLEDGER_DATABASE_URL", db_url)
        .env("FHIRLEDGER_MASTER_KEY", master)
        .env("FHIRLEDGER_LEDGER_KEY", ledger)
        .env("FHIRLEDGER_INDEX_KEY", BASE64.encode([3u8; 32]))
        .env("FHIRLEDGER_LEDGER_ORIGIN", common::LEDGER_ORIGIN)
        .env("FHIRLEDGER_LEDGER_INTERVAL_MS", "10")
        .env("FHIRLEDGER_LEDGER_BATCH_SIZE", "7")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_until_listening(port, &mut child, "server");
    (child, port, dir)
}

#[derive(diesel::QueryableByName)]
struct Note {
    #[diesel(sql_type = diesel::sql_types::Text)]
    note: String,
}

#[test]
fn postgres_two_servers_share_one_linear_log() {
    let db = TestDb::postgres();
    let url = db.postgres_url().unwrap().to_owned();
    let master = BASE64.encode([1u8; 32]);
    let ledger_seed = [2u8; 32];
    let ledger = BASE64.encode(ledger_seed);
    let (mut first, first_port, _first_dir) = start(&url, &master, &ledger);
    let (mut second, second_port, _second_dir) = start(&url, &master, &ledger);

    let token = common::token_with("system/Patient.c", None, None);
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let port = if w % 2 == 0 { first_port } else { second_port };
            let token = token.clone();
            std::thread::spawn(move || {
                (0..25)
                    .filter(|_| post_patient(port, &token) == 201)
                    .count()
            })
        })
        .collect();
    let written: usize = writers.into_iter().map(|w| w.join().unwrap()).sum();
    assert_eq!(written, 150);

    // Wait until both sequencers have drained the pending entries.
    let mut conn = db.connect();
    let deadline = Instant::now() + Duration::from_secs(30);
    // Through the store, which gives each entry's leaf bytes as they were signed (rows hold
    // them deflated).
    let entries = loop {
        if fhirledger::store::ledger::pending_entries(&mut conn)
            .unwrap()
            .is_empty()
        {
            break fhirledger::store::ledger::entries_range(&mut conn, 0, i64::MAX).unwrap();
        }
        assert!(Instant::now() < deadline, "entries stayed pending");
        std::thread::sleep(Duration::from_millis(50));
    };
    for child in [&mut first, &mut second] {
        child.kill().unwrap();
        child.wait().unwrap();
    }

    assert_eq!(entries.len(), written, "one entry per write");
    let indexes: Vec<i64> = entries.iter().map(|e| e.leaf_index.unwrap()).collect();
    assert_eq!(
        indexes,
        (0..written as i64).collect::<Vec<_>>(),
        "indexes 0..n, no gap, no duplicate"
    );

    let mut rebuilt = MemoryHashStore::new();
    for entry in &entries {
        rebuilt.append(&entry.data).unwrap();
    }
    let vkey = fhirledger::ledger::LedgerKey::from_seed(ledger_seed, common::LEDGER_ORIGIN)
        .unwrap()
        .vkey();
    let notes: Vec<Note> =
        diesel::sql_query("SELECT note FROM ledger_checkpoints ORDER BY tree_size")
            .load(&mut conn)
            .unwrap();
    assert!(notes.len() > 2, "batches of 7 give many checkpoints");
    for note in notes {
        let checkpoint = verify_checkpoint(&note.note, &vkey).unwrap();
        assert_eq!(
            tree::root(&rebuilt, checkpoint.size).unwrap(),
            checkpoint.root,
            "checkpoint {}",
            checkpoint.size
        );
    }
}
