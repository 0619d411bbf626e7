//! The `fhirledger` binary: `serve` with no configuration starts a working server on the
//! embedded default and stops cleanly on SIGTERM; bad settings stop start-up with a
//! message naming the setting.
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

const BINARY: &str = env!("CARGO_BIN_EXE_fhirledger");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A minimal HTTP/1.1 exchange without credentials; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    http_with_headers(port, None, method, path, body).map(|(status, _, body)| (status, body))
}

/// Like [`http`] with an optional bearer token, also returning the response head (status
/// line and headers, lowercased).
fn http_with_headers(
    port: u16,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    let authorization = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{authorization}\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or((response.as_str(), ""));
    Ok((status, head.to_ascii_lowercase(), body.to_owned()))
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|line| {
        line.strip_prefix(&format!("{name}: "))
            .map(|v| v.trim().to_owned())
    })
}

/// Mints a token with `fhirledger token` for the server started in `dir` on `port`.
fn mint_token(dir: &std::path::Path, port: u16, scope: &str) -> String {
    let output = Command::new(BINARY)
        .args(["token", "--sub", "cli-test", "--scope", scope])
        .current_dir(dir)
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

fn wait_until_healthy(port: u16, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http(port, "GET", "/healthz", None) {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited early with {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("server did not become healthy");
}

fn wait_for_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "server did not stop");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn serve_with_no_configuration_uses_the_embedded_default_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until_healthy(port, &mut child);

    // Without a token: 401 with a challenge. With one from `fhirledger token`: created.
    let patient = r#"{"resourceType":"Patient","active":true}"#;
    let (status, head, _) =
        http_with_headers(port, None, "POST", "/fhir/Patient", Some(patient)).unwrap();
    assert_eq!(status, 401);
    assert!(header_value(&head, "www-authenticate").is_some_and(|v| v.starts_with("bearer")));
    let token = mint_token(dir.path(), port, "system/Patient.c");
    let (status, _, body) =
        http_with_headers(port, Some(&token), "POST", "/fhir/Patient", Some(patient)).unwrap();
    assert_eq!(status, 201, "{body}");
    assert!(dir.path().join("data/local-issuer.key").exists());
    assert_eq!(http(port, "GET", "/readyz", None).unwrap().0, 200);

    // The embedded default: SQLite and a generated key in ./data, the key private.
    let data = dir.path().join("data");
    assert!(data.join("fhirledger.db").exists());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(data.join("master.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let kill = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(kill.success());
    let status = wait_for_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        stderr.contains("DEVELOPMENT MASTER KEY"),
        "the development key must be announced loudly: {stderr}"
    );
    let key = std::fs::read_to_string(data.join("master.key")).unwrap();
    assert!(!stderr.contains(key.trim()), "the key must never be logged");
}

/// Runs `serve` with one bad setting; it must fail at once and name the setting.
fn assert_refused(env: &[(&str, &str)], named: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(BINARY);
    command.arg("serve").current_dir(dir.path()).env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    assert!(!output.status.success(), "{env:?} was accepted");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(named),
        "{env:?}: message does not name {named}: {stderr}"
    );
}

#[test]
fn bad_settings_stop_start_up_with_their_name() {
    for (variable, value) in [
        ("FHIRLEDGER_LISTEN", "everywhere"),
        ("FHIRLEDGER_DATABASE_URL", "mysql://db/x"),
        ("FHIRLEDGER_BASE_URL", "fhir.example.org"),
        ("FHIRLEDGER_MAX_BODY_BYTES", "lots"),
        ("FHIRLEDGER_DB_POOL_SIZE", "0"),
        ("FHIRLEDGER_MASTER_KEY", "dG9vIHNob3J0"),
        ("FHIRLEDGER_MASTER_KEY_FILE", "/nonexistent/key"),
        ("FHIRLEDGER_LOG", "[[["),
        ("FHIRLEDGER_LEDGER_ORIGIN", "has space"),
        ("FHIRLEDGER_LEDGER_INTERVAL_MS", "0"),
        ("FHIRLEDGER_LEDGER_BATCH_SIZE", "-3"),
        ("FHIRLEDGER_LEDGER_KEY", "c2hvcnQ="),
        ("FHIRLEDGER_INDEX_KEY", "c2hvcnQ="),
        ("FHIRLEDGER_INDEX_KEY_FILE", "/nonexistent/key"),
        ("FHIRLEDGER_LOCAL_ISSUER", "maybe"),
        ("FHIRLEDGER_TRUSTED_ISSUERS", "https://idp.example.org"),
        (
            "FHIRLEDGER_TRUSTED_ISSUERS",
            "https://idp.example.org=/nonexistent/jwks.json",
        ),
        (
            "FHIRLEDGER_TRUSTED_ISSUERS",
            "https://idp.example.org=http://idp.example.org/jwks",
        ),
    ] {
        assert_refused(&[(variable, value)], variable);
    }
    // PostgreSQL needs an explicit key: processes sharing a database must share it.
    assert_refused(
        &[("FHIRLEDGER_DATABASE_URL", "postgres://127.0.0.1:1/x")],
        "FHIRLEDGER_MASTER_KEY_FILE",
    );
    let key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";
    assert_refused(
        &[
            ("FHIRLEDGER_DATABASE_URL", "postgres://127.0.0.1:1/x"),
            ("FHIRLEDGER_MASTER_KEY", key),
        ],
        "FHIRLEDGER_LEDGER_KEY_FILE",
    );
    assert_refused(
        &[
            ("FHIRLEDGER_DATABASE_URL", "postgres://127.0.0.1:1/x"),
            ("FHIRLEDGER_MASTER_KEY", key),
            ("FHIRLEDGER_LEDGER_KEY", key),
        ],
        "FHIRLEDGER_INDEX_KEY_FILE",
    );
}

#[test]
fn migrate_creates_the_schema() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BINARY)
        .arg("migrate")
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(dir.path().join("data/fhirledger.db").exists());
}

/// A server on the embedded default in `dir`, sequencing every 20 ms.
fn start_server(dir: &std::path::Path, port: u16) -> Child {
    start_server_with(dir, port, &[])
}

/// [`start_server`] with more settings.
fn start_server_with(dir: &std::path::Path, port: u16, settings: &[(&str, &str)]) -> Child {
    let mut child = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir)
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_LEDGER_INTERVAL_MS", "20")
        .envs(settings.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until_healthy(port, &mut child);
    child
}

fn stop_server(mut child: Child) {
    Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(wait_for_exit(&mut child, Duration::from_secs(30)).success());
}

/// Creates a patient; returns the receipt once the sequencer has put it in the log.
fn ledgered_write(port: u16, token: &str) -> String {
    let (status, head, body) = http_with_headers(
        port,
        Some(token),
        "POST",
        "/fhir/Patient",
        Some(r#"{"resourceType":"Patient","active":true}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    let receipt = header_value(&head, "x-ledger-entry").expect("receipt header");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let path = format!("/ledger/receipts/{receipt}");
        let (_, _, body) = http_with_headers(port, Some(token), "GET", &path, None).unwrap();
        let value: serde_json::Value = serde_json::from_str(&body).unwrap();
        if value["index"].is_u64() {
            return receipt;
        }
        assert!(Instant::now() < deadline, "entry never sequenced");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn run_verify(
    port: u16,
    vkey: &str,
    state: &std::path::Path,
    receipt: Option<&str>,
    token: &str,
) -> (i32, String) {
    run_verify_with(port, vkey, state, receipt, token, &[])
}

/// [`run_verify`] with more arguments (a witness policy).
fn run_verify_with(
    port: u16,
    vkey: &str,
    state: &std::path::Path,
    receipt: Option<&str>,
    token: &str,
    more: &[&str],
) -> (i32, String) {
    let mut command = Command::new(BINARY);
    command
        .args([
            "verify",
            "--server",
            &format!("http://127.0.0.1:{port}"),
            "--vkey",
            vkey,
            "--state",
        ])
        .arg(state)
        .env_clear()
        .env("FHIRLEDGER_TOKEN", token);
    if let Some(receipt) = receipt {
        command.args(["--receipt", receipt]);
    }
    command.args(more);
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Cuts the log back to `size` entries, as an operator rewriting history would.
fn truncate_ledger(dir: &std::path::Path, size: i64) {
    use diesel::RunQueryDsl as _;
    let url = fhirledger::store::DatabaseUrl::sqlite_file(&dir.join("data/fhirledger.db"));
    let mut conn = fhirledger::store::connection::establish(&url).unwrap();
    let first_hash = fhirledger::ledger::tree::stored_hash_index(0, size as u64);
    for sql in [
        format!("DELETE FROM ledger_cosignatures WHERE tree_size > {size}"),
        format!("DELETE FROM ledger_entries WHERE leaf_index >= {size} OR leaf_index IS NULL"),
        format!("DELETE FROM ledger_hashes WHERE stored_index >= {first_hash}"),
        format!("DELETE FROM ledger_checkpoints WHERE tree_size > {size}"),
        format!("UPDATE ledger_state SET tree_size = {size}"),
    ] {
        diesel::sql_query(sql).execute(&mut conn).unwrap();
    }
}

#[test]
fn verify_checks_receipts_and_detects_rollback_and_fork() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start_server(dir.path(), port);
    let state = dir.path().join("verify-state");
    let key: serde_json::Value =
        serde_json::from_str(&http(port, "GET", "/ledger/key", None).unwrap().1).unwrap();
    let vkey = key["vkey"].as_str().unwrap().to_owned();
    let token = mint_token(dir.path(), port, "system/Patient.c ledger.read");
    let token = token.as_str();

    let first = ledgered_write(port, token);
    ledgered_write(port, token);
    // Proofs need `ledger.read`: a token without it cannot check (exit 2, saying why).
    let writer = mint_token(dir.path(), port, "system/Patient.c");
    let (code, out) = run_verify(
        port,
        &vkey,
        &dir.path().join("unprivileged"),
        Some(&first),
        &writer,
    );
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("ledger.read"), "{out}");
    let (code, out) = run_verify(port, &vkey, &state, Some(&first), token);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("is included"), "{out}");

    // The log grows: consistent with the saved checkpoint.
    for _ in 0..3 {
        ledgered_write(port, token);
    }
    let (code, out) = run_verify(port, &vkey, &state, None, token);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("consistent with the checkpoint"), "{out}");

    // Rolled back to 2 entries: detected.
    truncate_ledger(dir.path(), 2);
    let (_, head, _) = http_with_headers(port, None, "GET", "/ledger/checkpoint", None).unwrap();
    assert!(head.starts_with("http/1.1 200"));
    let (code, out) = run_verify(port, &vkey, &state, None, token);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("rolled back"), "{out}");

    // Regrown past the saved size with other entries: a fork, detected.
    for _ in 0..6 {
        ledgered_write(port, token);
    }
    let (code, out) = run_verify(port, &vkey, &state, None, token);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("forked"), "{out}");

    // A key that did not sign the checkpoint: failed. No server: could not check.
    let other = fhirledger::ledger::LedgerKey::generate(key["name"].as_str().unwrap())
        .unwrap()
        .vkey();
    let (code, out) = run_verify(port, &other, &dir.path().join("other-state"), None, token);
    assert_eq!(code, 1, "{out}");
    stop_server(server);
    let (code, out) = run_verify(port, &vkey, &state, None, token);
    assert_eq!(code, 2, "{out}");
}

/// A server in front of the real one that answers every receipt lookup with the entry of
/// `swap_to`: a genuine, signed, included entry, but not the one asked for.
fn lying_proxy(real_port: u16, swap_to: String) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buffer = [0u8; 16 * 1024];
            let read = stream.read(&mut buffer).unwrap_or(0);
            let request = String::from_utf8_lossy(&buffer[..read]).into_owned();
            let path = request.split(' ').nth(1).unwrap_or("/").to_owned();
            let token = request.lines().find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("authorization")
                    .then(|| value.trim().trim_start_matches("Bearer ").to_owned())
            });
            let path = if path.starts_with("/ledger/receipts/") {
                format!("/ledger/receipts/{swap_to}")
            } else {
                path
            };
            let Ok((status, _, body)) =
                http_with_headers(real_port, token.as_deref(), "GET", &path, None)
            else {
                continue;
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status} Proxied\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

#[test]
fn verify_refuses_a_genuine_entry_that_is_not_the_receipts() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start_server(dir.path(), port);
    let key: serde_json::Value =
        serde_json::from_str(&http(port, "GET", "/ledger/key", None).unwrap().1).unwrap();
    let vkey = key["vkey"].as_str().unwrap().to_owned();
    let token = mint_token(dir.path(), port, "system/Patient.c ledger.read");
    let asked = ledgered_write(port, &token);
    let other = ledgered_write(port, &token);
    // The real server: the receipt checks out.
    let state = dir.path().join("state");
    let (code, out) = run_verify(port, &vkey, &state, Some(&asked), &token);
    assert_eq!(code, 0, "{out}");
    // A server that answers with another (valid, included) entry: caught.
    let liar = lying_proxy(port, other);
    let (code, out) = run_verify(
        liar,
        &vkey,
        &dir.path().join("state2"),
        Some(&asked),
        &token,
    );
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("another entry") || out.contains("VERIFICATION FAILED"),
        "{out}"
    );
    stop_server(server);
}

#[test]
fn audit_passes_then_finds_a_changed_ciphertext() {
    use diesel::RunQueryDsl as _;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start_server(dir.path(), port);
    let token = mint_token(dir.path(), port, "system/Patient.c ledger.read");
    let token = token.as_str();
    ledgered_write(port, token);
    ledgered_write(port, token);
    // The auditor keeps the checkpoint it has seen.
    let (status, note) = http(port, "GET", "/ledger/checkpoint", None).unwrap();
    assert_eq!(status, 200);
    let trusted = dir.path().join("trusted-checkpoint");
    std::fs::write(&trusted, note).unwrap();
    stop_server(server);

    let audit_with = |extra: &[&std::ffi::OsStr]| {
        Command::new(BINARY)
            .arg("audit")
            .args(extra)
            .current_dir(dir.path())
            .env_clear()
            .output()
            .unwrap()
    };
    let audit = || audit_with(&[]);
    let with_trusted = || audit_with(&["--checkpoint".as_ref(), trusted.as_os_str()]);
    let checked = with_trusted();
    assert_eq!(
        checked.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(String::from_utf8_lossy(&checked.stderr).contains("extends the trusted checkpoint"));
    let clean = audit();
    assert_eq!(
        clean.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&clean.stdout)
    );
    assert!(String::from_utf8_lossy(&clean.stdout).contains("everything matches"));

    let url = fhirledger::store::DatabaseUrl::sqlite_file(&dir.path().join("data/fhirledger.db"));
    let mut conn = fhirledger::store::connection::establish(&url).unwrap();
    diesel::sql_query(
        "UPDATE resource_versions SET ciphertext = randomblob(length(ciphertext)) WHERE rowid = 1",
    )
    .execute(&mut conn)
    .unwrap();
    let tampered = audit();
    let stdout = String::from_utf8_lossy(&tampered.stdout);
    assert_eq!(tampered.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("VersionModified"), "{stdout}");

    // The log cut back behind the auditor's checkpoint: found against it.
    truncate_ledger(dir.path(), 1);
    let cut = with_trusted();
    let stdout = String::from_utf8_lossy(&cut.stdout);
    assert_eq!(cut.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("NotExtendingTrusted"), "{stdout}");
}

#[test]
fn token_refuses_a_data_directory_without_the_servers_key_and_names_it() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BINARY)
        .args(["token", "--sub", "cli-test", "--scope", "system/*.rs"])
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(output.stdout.is_empty(), "no token is printed");
    let looked_in = std::path::absolute(dir.path().join("data")).unwrap();
    assert!(
        stderr.contains(&looked_in.display().to_string()),
        "names the directory it looked in: {stderr}"
    );
    assert!(stderr.contains("FHIRLEDGER_DATA_DIR"), "{stderr}");
    assert!(stderr.contains("--data-dir"), "{stderr}");
    // It created nothing: only `serve` makes the key.
    assert!(!dir.path().join("data").exists());

    // Pointed at the server's data directory, it mints.
    let port = free_port();
    let server = start_server(dir.path(), port);
    let elsewhere = tempfile::tempdir().unwrap();
    let output = Command::new(BINARY)
        .args(["token", "--sub", "cli-test", "--scope", "system/Patient.c"])
        .current_dir(elsewhere.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_DATA_DIR", dir.path().join("data"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    let (status, _, body) = http_with_headers(
        port,
        Some(token.trim()),
        "POST",
        "/fhir/Patient",
        Some(r#"{"resourceType":"Patient","active":true}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
    stop_server(server);
}

#[test]
fn a_token_of_another_data_directorys_key_is_refused_saying_where_keys_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start_server(dir.path(), port);
    // Another data directory with a local issuer key of its own (as an older `token` made).
    let other = tempfile::tempdir().unwrap();
    std::fs::create_dir(other.path().join("data")).unwrap();
    let seed = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(rand_seed())
    };
    std::fs::write(other.path().join("data/local-issuer.key"), seed).unwrap();
    let token = mint_token(other.path(), port, "system/Patient.r");
    let (status, head, body) =
        http_with_headers(port, Some(&token), "GET", "/fhir/Patient/x", None).unwrap();
    assert_eq!(status, 401, "{body}");
    let challenge = header_value(&head, "www-authenticate").unwrap();
    assert!(challenge.contains("data directory"), "{challenge}");
    assert!(body.contains("FHIRLEDGER_DATA_DIR"), "{body}");
    // Nothing of the token is repeated.
    let signature = token.rsplit('.').next().unwrap();
    let claims = token.split('.').nth(1).unwrap();
    for part in [signature, claims] {
        assert!(!body.contains(part) && !head.contains(&part.to_ascii_lowercase()));
    }
    stop_server(server);
}

/// 32 bytes that differ from run to run (a key no server has).
fn rand_seed() -> [u8; 32] {
    let mut seed = [0u8; 32];
    let id = uuid::Uuid::new_v4();
    seed[..16].copy_from_slice(id.as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed
}

/// Three fresh base64 32-byte key files, as the README's PostgreSQL section makes them.
fn postgres_key_files(dir: &std::path::Path) -> Vec<(&'static str, std::path::PathBuf)> {
    use base64::Engine as _;
    ["MASTER", "LEDGER", "INDEX"]
        .into_iter()
        .map(|name| {
            let path = dir.join(format!("{}.key", name.to_ascii_lowercase()));
            std::fs::write(
                &path,
                base64::engine::general_purpose::STANDARD.encode(rand_seed()),
            )
            .unwrap();
            (name, path)
        })
        .collect()
}

#[test]
fn audit_on_postgres_checks_with_the_configured_ledger_key() {
    let db = common::TestDb::postgres();
    let url = db.postgres_url().unwrap().to_owned();
    let dir = tempfile::tempdir().unwrap();
    let keys = postgres_key_files(dir.path());
    let port = free_port();
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_LEDGER_INTERVAL_MS", "20")
        .env("FHIRLEDGER_DATABASE_URL", &url)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (name, path) in &keys {
        command.env(format!("FHIRLEDGER_{name}_KEY_FILE"), path);
    }
    let mut child = command.spawn().unwrap();
    wait_until_healthy(port, &mut child);
    let token = mint_token(dir.path(), port, "system/Patient.c ledger.read");
    ledgered_write(port, &token);
    stop_server(child);

    let ledger_key = &keys.iter().find(|(name, _)| *name == "LEDGER").unwrap().1;
    let audit = |key_env: Option<(&str, std::ffi::OsString)>| {
        let mut command = Command::new(BINARY);
        command
            .arg("audit")
            .current_dir(dir.path())
            .env_clear()
            .env("FHIRLEDGER_DATABASE_URL", &url);
        if let Some((name, value)) = key_env {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let with_file = audit(Some((
        "FHIRLEDGER_LEDGER_KEY_FILE",
        ledger_key.clone().into_os_string(),
    )));
    let stdout = String::from_utf8_lossy(&with_file.stdout);
    assert_eq!(
        with_file.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&with_file.stderr)
    );
    assert!(stdout.contains("everything matches"), "{stdout}");
    let value = std::fs::read_to_string(ledger_key).unwrap();
    let with_value = audit(Some(("FHIRLEDGER_LEDGER_KEY", value.trim().into())));
    assert_eq!(with_value.status.code(), Some(0));
    // Another key: the signatures do not verify, which is a finding, not a pass.
    let (_, wrong) = &keys[0];
    let with_wrong = audit(Some((
        "FHIRLEDGER_LEDGER_KEY_FILE",
        wrong.clone().into_os_string(),
    )));
    assert_ne!(with_wrong.status.code(), Some(0));
    // Without a key there is nothing to check with: exit 2, naming the setting.
    let without = audit(None);
    assert_eq!(without.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&without.stderr).contains("FHIRLEDGER_LEDGER_KEY_FILE"));
}

#[test]
fn serve_with_a_wrong_postgres_user_stops_at_once_with_one_line() {
    let admin = std::env::var(common::PG_ENV).expect("FHIRLEDGER_TEST_DATABASE_URL");
    let (scheme, rest) = admin.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    let url = format!("{scheme}://fhirledger_no_such_role@{host}");
    let dir = tempfile::tempdir().unwrap();
    let keys = postgres_key_files(dir.path());
    let mut command = Command::new(BINARY);
    command
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .env("FHIRLEDGER_DATABASE_URL", &url);
    for (name, path) in &keys {
        command.env(format!("FHIRLEDGER_{name}_KEY_FILE"), path);
    }
    let started = Instant::now();
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    let mentions: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains("fhirledger_no_such_role"))
        .collect();
    assert_eq!(mentions.len(), 1, "{stderr}");
    assert!(mentions[0].starts_with("fhirledger: "), "{stderr}");
}

#[test]
fn import_loads_bulk_files_the_auditor_accepts_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let bulk = common::fixtures_dir().join("fhir/synthea/bulk-ndjson");
    let run = |args: &[&std::ffi::OsStr]| {
        let output = Command::new(BINARY)
            .arg("import")
            .args(args)
            .current_dir(dir.path())
            .env_clear()
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&[bulk.as_os_str()]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout.contains("imported 774 resources (774 created, 0 updated) from 12 files"),
        "{stdout}"
    );
    // Every imported version matches its ledger entry.
    let audit = Command::new(BINARY)
        .arg("audit")
        .current_dir(dir.path())
        .env_clear()
        .output()
        .unwrap();
    let audited = String::from_utf8_lossy(&audit.stdout);
    assert_eq!(audit.status.code(), Some(0), "{audited}");
    assert!(audited.contains("774 resource versions"), "{audited}");
    assert!(audited.contains("everything matches"), "{audited}");

    // The same files again: nothing written twice.
    let (code, stdout, _) = run(&[bulk.as_os_str()]);
    assert_eq!(code, Some(0), "{stdout}");
    assert!(stdout.contains("imported 0 resources"), "{stdout}");
    assert!(
        stdout.contains("774 lines loaded by an earlier run"),
        "{stdout}"
    );

    // A rejected line: exit 1, the rest loaded, the line named.
    let file = dir.path().join("two.ndjson");
    std::fs::write(
        &file,
        "{\"resourceType\":\"Patient\",\"id\":\"fine\"}\n{\"resourceType\":\"Patient\",\"id\":\"bad\",\"gender\":7}\n",
    )
    .unwrap();
    let (code, stdout, stderr) = run(&[file.as_os_str()]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("imported 1 resources"), "{stdout}");
    assert!(stderr.contains("two.ndjson:2: rejected"), "{stderr}");

    // Nothing to read: exit 2, saying what.
    let missing = dir.path().join("missing.ndjson");
    let (code, _, stderr) = run(&[missing.as_os_str()]);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("missing.ndjson"), "{stderr}");
}

/// `fhirledger witness --print-vkey`: the cosignature verifier key of the witness named
/// `name` keeping its key in `dir` (created on first use).
fn witness_vkey(dir: &std::path::Path, name: &str) -> String {
    let output = Command::new(BINARY)
        .args(["witness", "--name", name, "--print-vkey", "--dir"])
        .arg(dir)
        .env_clear()
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Starts `fhirledger witness` on `port` for the log `log_vkey`, its state in `dir`.
fn start_witness(dir: &std::path::Path, name: &str, port: u16, log_vkey: &str) -> Child {
    let mut child = Command::new(BINARY)
        .args(["witness", "--name", name, "--log", log_vkey, "--dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env_clear()
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_until_listening(port, &mut child, "witness");
    child
}

/// The log's view of its witnesses (`GET /ledger/witnesses`).
fn witness_status(port: u16) -> Vec<serde_json::Value> {
    let (status, body) = http(port, "GET", "/ledger/witnesses", None).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until every witness has cosigned the latest checkpoint.
fn wait_until_cosigned(port: u16) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let witnesses = witness_status(port);
        if witnesses
            .iter()
            .all(|w| w["lag_entries"] == 0 && w["cosigned_size"].as_u64() > Some(0))
        {
            return witnesses;
        }
        assert!(Instant::now() < deadline, "never cosigned: {witnesses:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two witnesses and a log on one machine: the log's checkpoints are cosigned in the
/// background; `verify` with the witness policy checks them and bounds an entry's time; a
/// witness restarted mid-stream goes on from its saved state; a log that forks gets no
/// cosignature and fails `verify` with the policy.
#[test]
fn witnesses_cosign_the_log_and_verify_holds_it_to_them() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let seed = [5u8; 32];
    let origin = "hospital.test/ledger";
    let log_vkey = fhirledger::ledger::LedgerKey::from_seed(seed, origin)
        .unwrap()
        .vkey();
    let (w1_dir, w2_dir) = (dir.path().join("w1"), dir.path().join("w2"));
    let w1_vkey = witness_vkey(&w1_dir, "regulator.test/w1");
    let w2_vkey = witness_vkey(&w2_dir, "advocates.test/w2");
    let (w1_port, w2_port, port) = (free_port(), free_port(), free_port());
    let w1 = start_witness(&w1_dir, "regulator.test/w1", w1_port, &log_vkey);
    let w2 = start_witness(&w2_dir, "advocates.test/w2", w2_port, &log_vkey);
    let seed_text = base64::engine::general_purpose::STANDARD.encode(seed);
    let witnesses =
        format!("{w1_vkey}@http://127.0.0.1:{w1_port},{w2_vkey}@http://127.0.0.1:{w2_port}");
    let server = start_server_with(
        dir.path(),
        port,
        &[
            ("FHIRLEDGER_LEDGER_KEY", &seed_text),
            ("FHIRLEDGER_LEDGER_ORIGIN", origin),
            ("FHIRLEDGER_WITNESSES", &witnesses),
        ],
    );
    let token = mint_token(dir.path(), port, "system/Patient.c ledger.read");
    let token = token.as_str();
    let policy = ["--witness", &w1_vkey, "--witness", &w2_vkey];
    let state = dir.path().join("verify-state");

    let first = ledgered_write(port, token);
    ledgered_write(port, token);
    wait_until_cosigned(port);
    let (code, out) = run_verify_with(port, &log_vkey, &state, Some(&first), token, &policy);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cosigned by witness regulator.test/w1"),
        "{out}"
    );
    assert!(
        out.contains("cosigned by witness advocates.test/w2"),
        "{out}"
    );
    assert!(out.contains("is no later than"), "{out}");
    // The receipt carries the cosigned checkpoint and the entry's inclusion in it.
    let (_, _, body) = http_with_headers(
        port,
        Some(token),
        "GET",
        &format!("/ledger/receipts/{first}"),
        None,
    )
    .unwrap();
    let receipt: serde_json::Value = serde_json::from_str(&body).unwrap();
    let cosigned = receipt["cosigned"]["checkpoint"]
        .as_str()
        .unwrap_or_default();
    assert!(cosigned.contains("— regulator.test/w1 "), "{body}");
    assert!(cosigned.contains("— advocates.test/w2 "), "{body}");
    assert_eq!(receipt["cosigned"]["inclusion"]["leaf_index"], 0, "{body}");
    // A witness that never cosigned this log: the policy is not met.
    let stranger = witness_vkey(&dir.path().join("w3"), "stranger.test/w3");
    let (code, out) = run_verify_with(
        port,
        &log_vkey,
        &dir.path().join("other-state"),
        None,
        token,
        &["--witness", &stranger],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("0 valid cosignatures"), "{out}");

    // A witness restarted mid-stream: down, the log goes on and says so; back, it cosigns
    // again from the state it saved.
    stop_server(w2);
    ledgered_write(port, token);
    let deadline = Instant::now() + Duration::from_secs(30);
    while witness_status(port)[1]["last_error"].is_null() {
        assert!(Instant::now() < deadline, "{:?}", witness_status(port));
        std::thread::sleep(Duration::from_millis(50));
    }
    let w2 = start_witness(&w2_dir, "advocates.test/w2", w2_port, &log_vkey);
    ledgered_write(port, token);
    let cosigned = wait_until_cosigned(port);
    assert!(
        cosigned.iter().all(|w| w["last_error"].is_null()),
        "{cosigned:?}"
    );
    let (code, out) = run_verify_with(port, &log_vkey, &state, None, token, &policy);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("consistent with the checkpoint"), "{out}");

    // The operator rewrites history: cut back to 2 entries, then grown with others. The
    // witnesses refuse the forked checkpoints; verify with the policy fails.
    truncate_ledger(dir.path(), 2);
    for _ in 0..6 {
        ledgered_write(port, token);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while witness_status(port)
        .iter()
        .any(|w| w["last_error"].is_null())
    {
        assert!(Instant::now() < deadline, "{:?}", witness_status(port));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (_, note) = http(port, "GET", "/ledger/checkpoint/cosigned", None).unwrap();
    let cosigned_size: u64 = note.lines().nth(1).unwrap_or("0").parse().unwrap_or(0);
    assert!(
        cosigned_size <= 2,
        "a forked checkpoint was cosigned: {note}"
    );
    let (code, out) = run_verify_with(port, &log_vkey, &state, None, token, &policy);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("rolled back") || out.contains("no checkpoint with the 2 cosignatures"),
        "{out}"
    );

    stop_server(server);
    stop_server(w1);
    stop_server(w2);
}

/// `fhirledger unseal` with the share on standard input; returns (exit code, stdout, stderr).
fn unseal(port: u16, share: &str) -> (Option<i32>, String, String) {
    let mut child = Command::new(BINARY)
        .arg("unseal")
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{share}").unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Key custody end to end: the master key split into 3 shares (the split ledgered), the key
/// file removed, the server started sealed answers 503 saying why until 2 shares arrive (a
/// repeated or mistyped share is named and refused), then serves the records the key
/// sealed, ledgers the unseal, and never writes the key back to disk.
#[test]
fn a_sealed_server_serves_once_enough_key_shares_are_given() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start_server(dir.path(), port);
    let token = mint_token(dir.path(), port, "system/Patient.crs ledger.read");
    let (status, _, created) = http_with_headers(
        port,
        Some(&token),
        "POST",
        "/fhir/Patient",
        Some(r#"{"resourceType":"Patient","name":[{"family":"Sealed"}]}"#),
    )
    .unwrap();
    assert_eq!(status, 201);
    let created: serde_json::Value = serde_json::from_str(&created).unwrap();
    let path = format!("/fhir/Patient/{}", created["id"].as_str().unwrap());
    stop_server(server);

    let split = Command::new(BINARY)
        .args(["keys", "split", "--shares", "3", "--threshold", "2"])
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(split.status.success(), "{split:?}");
    let shares: Vec<String> = String::from_utf8(split.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(shares.len(), 3);
    let key_file = dir.path().join("data/master.key");
    std::fs::remove_file(&key_file).unwrap();

    let mut sealed = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_SEALED", "true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (status, head, body) = loop {
        if let Ok(answer) = http_with_headers(port, Some(&token), "GET", &path, None) {
            break answer;
        }
        assert!(sealed.try_wait().unwrap().is_none(), "sealed server exited");
        assert!(Instant::now() < deadline, "sealed server did not listen");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status, 503, "{body}");
    assert!(header_value(&head, "retry-after").is_some(), "{head}");
    assert!(body.contains("sealed"), "{body}");

    let (code, out, err) = unseal(port, &shares[0]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("1 of 2"), "{out}");
    let (_, body) = http(port, "GET", "/fhir/metadata", None).unwrap();
    assert!(body.contains("1 more master key shares"), "{body}");
    assert_eq!(
        http(port, "GET", "/healthz", None).unwrap(),
        (200, r#"{"status":"sealed"}"#.to_owned())
    );
    assert_eq!(http(port, "GET", "/readyz", None).unwrap().0, 503);
    let (code, _, err) = unseal(port, &shares[0]);
    assert_eq!(code, Some(1));
    assert!(err.contains("share 1 was given already"), "{err}");
    let mistyped = shares[1].replacen(":2-of-3:2:", ":2-of-3:2:x", 1);
    let (code, _, err) = unseal(port, &mistyped);
    assert_eq!(code, Some(1));
    assert!(err.contains("share 2") && err.contains("checksum"), "{err}");

    let (code, out, err) = unseal(port, &shares[2]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("unsealed"), "{out}");
    wait_until_healthy(port, &mut sealed);
    let (status, _, body) = http_with_headers(port, Some(&token), "GET", &path, None).unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("Sealed"), "{body}");
    assert!(!key_file.exists(), "the rebuilt key was written to disk");

    // Both key operations are in the ledger, naming the key by its id.
    let key_id = shares[0].split(':').nth(1).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, _, body) =
            http_with_headers(port, Some(&token), "GET", "/ledger/entries?start=0", None).unwrap();
        let actions = common::key_entries(&serde_json::from_str(&body).unwrap());
        if actions.len() == 2 {
            assert_eq!(
                actions,
                [
                    ("key-split".to_owned(), key_id.to_owned()),
                    ("key-unseal".to_owned(), key_id.to_owned())
                ]
            );
            break;
        }
        assert!(Instant::now() < deadline, "{actions:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop_server(sealed);
}

/// The README's key rotations as an operator runs them: the ledger key (restart with the new
/// key and the previous one), after which `verify` pinned to either key checks receipts from
/// before and after and `audit` finds everything in order; then the index key (`keys
/// rotate-index` with the server stopped), after which searches find what they found.
#[test]
fn rotating_the_ledger_and_index_keys_keeps_proofs_and_searches() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = start_server(dir.path(), port);
    let token = mint_token(dir.path(), port, "system/Patient.crs ledger.read");
    let key: serde_json::Value =
        serde_json::from_str(&http(port, "GET", "/ledger/key", None).unwrap().1).unwrap();
    let old_vkey = key["vkey"].as_str().unwrap().to_owned();
    let before = ledgered_write(port, &token);
    let state = dir.path().join("verify-state");
    let (code, out) = run_verify(port, &old_vkey, &state, Some(&before), &token);
    assert_eq!(code, 0, "{out}");
    stop_server(server);

    let new_ledger_key = dir.path().join("ledger-2.key");
    let encoded = base64::engine::general_purpose::STANDARD.encode(rand_seed());
    std::fs::write(&new_ledger_key, encoded).unwrap();
    let rotated_settings = [
        (
            "FHIRLEDGER_LEDGER_KEY_FILE",
            new_ledger_key.to_str().unwrap(),
        ),
        ("FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE", "data/ledger.key"),
    ];
    let server = start_server_with(dir.path(), port, &rotated_settings);
    let key: serde_json::Value =
        serde_json::from_str(&http(port, "GET", "/ledger/key", None).unwrap().1).unwrap();
    let new_vkey = key["vkey"].as_str().unwrap().to_owned();
    assert_ne!(new_vkey, old_vkey);
    let after = ledgered_write(port, &token);
    for receipt in [&before, &after] {
        let (code, out) = run_verify(port, &old_vkey, &state, Some(receipt), &token);
        assert_eq!(code, 0, "{out}");
        assert!(out.contains("ledger key rotated"), "{out}");
        assert!(out.contains("consistent with the checkpoint"), "{out}");
    }
    let (code, out) = run_verify(
        port,
        &new_vkey,
        &dir.path().join("new-state"),
        Some(&before),
        &token,
    );
    assert_eq!(code, 0, "{out}");
    stop_server(server);

    // The retired key no longer starts a server.
    let refused = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("was retired"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let audit = |vkey: &str| {
        Command::new(BINARY)
            .args(["audit", "--vkey", vkey])
            .current_dir(dir.path())
            .env_clear()
            .output()
            .unwrap()
    };
    for vkey in [&old_vkey, &new_vkey] {
        let out = audit(vkey);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}");
        assert!(stdout.contains("everything matches"), "{stdout}");
    }

    // The index key: rebuilt offline, then the new key serves and the old one is refused.
    let new_index_key = dir.path().join("index-2.key");
    let encoded = base64::engine::general_purpose::STANDARD.encode(rand_seed());
    std::fs::write(&new_index_key, encoded).unwrap();
    let rebuilt = Command::new(BINARY)
        .args(["keys", "rotate-index", "--new-key-file"])
        .arg(&new_index_key)
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_LEDGER_KEY_FILE", &new_ledger_key)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&rebuilt.stdout);
    assert!(
        rebuilt.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert!(stdout.contains("search index rebuilt"), "{stdout}");
    let old_index = Command::new(BINARY)
        .arg("serve")
        .current_dir(dir.path())
        .env_clear()
        .env("FHIRLEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("FHIRLEDGER_LEDGER_KEY_FILE", &new_ledger_key)
        .output()
        .unwrap();
    assert!(!old_index.status.success());
    assert!(String::from_utf8_lossy(&old_index.stderr).contains("was built with index key"));
    let server = start_server_with(
        dir.path(),
        port,
        &[
            (
                "FHIRLEDGER_LEDGER_KEY_FILE",
                new_ledger_key.to_str().unwrap(),
            ),
            ("FHIRLEDGER_INDEX_KEY_FILE", new_index_key.to_str().unwrap()),
        ],
    );
    let (status, _, body) =
        http_with_headers(port, Some(&token), "GET", "/fhir/Patient?active=true", None).unwrap();
    assert_eq!(status, 200, "{body}");
    let found: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(found["total"], 2, "{body}");
    stop_server(server);
}
