//! The `fhirledger` binary: `serve` with no configuration starts a working server on the
//! embedded default and stops cleanly on SIGTERM; bad settings stop start-up with a
//! message naming the setting.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail by panicking"
)]

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

/// A minimal HTTP/1.1 exchange; returns (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/fhir+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
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

    let (status, body) = http(
        port,
        "POST",
        "/fhir/Patient",
        Some(r#"{"resourceType":"Patient","active":true}"#),
    )
    .unwrap();
    assert_eq!(status, 201, "{body}");
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
    assert_refused(&[("FHIRLEDGER_LISTEN", "everywhere")], "FHIRLEDGER_LISTEN");
    assert_refused(
        &[("FHIRLEDGER_DATABASE_URL", "mysql://db/x")],
        "FHIRLEDGER_DATABASE_URL",
    );
    assert_refused(
        &[("FHIRLEDGER_BASE_URL", "fhir.example.org")],
        "FHIRLEDGER_BASE_URL",
    );
    assert_refused(
        &[("FHIRLEDGER_MAX_BODY_BYTES", "lots")],
        "FHIRLEDGER_MAX_BODY_BYTES",
    );
    assert_refused(
        &[("FHIRLEDGER_DB_POOL_SIZE", "0")],
        "FHIRLEDGER_DB_POOL_SIZE",
    );
    assert_refused(
        &[("FHIRLEDGER_MASTER_KEY", "dG9vIHNob3J0")],
        "FHIRLEDGER_MASTER_KEY",
    );
    assert_refused(
        &[("FHIRLEDGER_MASTER_KEY_FILE", "/nonexistent/key")],
        "FHIRLEDGER_MASTER_KEY_FILE",
    );
    assert_refused(&[("FHIRLEDGER_LOG", "[[[")], "FHIRLEDGER_LOG");
    // PostgreSQL needs an explicit key: processes sharing a database must share it.
    assert_refused(
        &[("FHIRLEDGER_DATABASE_URL", "postgres://127.0.0.1:1/x")],
        "FHIRLEDGER_MASTER_KEY_FILE",
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
