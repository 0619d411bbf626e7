//! Test harness: a fresh database per test (a SQLite file in a temporary directory, or a
//! PostgreSQL database created for the test and dropped after it), the application built on
//! it, and small helpers to call it.
#![allow(
    dead_code,
    reason = "each test crate uses a different part of the harness"
)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use actix_web::HttpMessage as _;
use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::HeaderMap;
use actix_web::test::{self, TestRequest};
use actix_web::web::Bytes;
use diesel::{Connection as _, RunQueryDsl as _};
use fhirledger::access::local_issuer::{LocalIssuer, TokenRequest};
use fhirledger::api::AppState;
use fhirledger::crypto::{BlindIndexKey, MasterKey};
use fhirledger::ledger::LedgerKey;
use fhirledger::server::{Keys, StateOptions, prepare_state};
use fhirledger::store::DatabaseUrl;
use jsonwebtoken::jwk::JwkSet;
use serde_json::Value;

pub const BASE_URL: &str = "http://fhir.test";
pub const PG_ENV: &str = "FHIRLEDGER_TEST_DATABASE_URL";

/// Runs a test body once on SQLite and once on PostgreSQL, as `name::sqlite` and
/// `name::postgres`. The PostgreSQL variant fails (it is never silently skipped) when
/// `FHIRLEDGER_TEST_DATABASE_URL` is unset; deselect it with `cargo test -- --skip postgres`.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[actix_web::test]
            async fn sqlite() {
                super::$name($crate::common::TestDb::sqlite()).await;
            }
            #[actix_web::test]
            async fn postgres() {
                super::$name($crate::common::TestDb::postgres()).await;
            }
        }
    )*};
}

/// One test's private database.
pub struct TestDb {
    pub url: DatabaseUrl,
    /// The index key of every state on this database: the index is built with one key, and
    /// a server with another refuses to start.
    index_key: [u8; 32],
    dir: Option<tempfile::TempDir>,
    postgres: Option<PostgresDrop>,
}

struct PostgresDrop {
    admin_url: String,
    name: String,
}

impl TestDb {
    pub fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("temporary directory");
        let url = DatabaseUrl::sqlite_file(&dir.path().join("fhirledger.db"));
        Self {
            url,
            index_key: random_key(),
            dir: Some(dir),
            postgres: None,
        }
    }

    /// A PostgreSQL database with every migration applied: a copy of the template database
    /// ([`migrated_template`]), which is much faster than migrating each test's own.
    pub fn postgres() -> Self {
        Self::postgres_from(Some(migrated_template()))
    }

    /// An empty PostgreSQL database, for the tests of the migrations themselves.
    pub fn postgres_empty() -> Self {
        Self::postgres_from(None)
    }

    fn postgres_from(template: Option<&str>) -> Self {
        let admin_url = admin_url();
        let name = format!("fhirledger_test_{}", uuid::Uuid::new_v4().simple());
        let template = template.map_or(String::new(), |t| format!(" TEMPLATE {t}"));
        let mut admin = admin_connection(&admin_url);
        // PostgreSQL refuses to copy a template another session is connected to; the
        // template allows no connections, but a session could still be on its way out.
        let mut attempts = 0;
        while let Err(error) =
            diesel::sql_query(format!("CREATE DATABASE {name}{template}")).execute(&mut admin)
        {
            attempts += 1;
            assert!(
                attempts < 50 && error.to_string().contains("being accessed by other users"),
                "create test database: {error}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let url = DatabaseUrl::parse(&with_database(&admin_url, &name)).expect("postgres URL");
        Self {
            url,
            index_key: random_key(),
            dir: None,
            postgres: Some(PostgresDrop { admin_url, name }),
        }
    }

    pub fn is_postgres(&self) -> bool {
        self.postgres.is_some()
    }

    pub fn postgres_url(&self) -> Option<&str> {
        match &self.url {
            DatabaseUrl::Postgres(url) => Some(url),
            DatabaseUrl::Sqlite(_) => None,
        }
    }

    pub fn sqlite_path(&self) -> Option<PathBuf> {
        match &self.url {
            DatabaseUrl::Sqlite(path) => Some(path.clone()),
            DatabaseUrl::Postgres(_) => None,
        }
    }

    /// The index key states on this database are given.
    pub fn index_key(&self) -> BlindIndexKey {
        BlindIndexKey::from_bytes(self.index_key)
    }

    /// Application state on this database with fresh random keys (but this database's
    /// index key and the tests' ledger key).
    pub fn state(&self) -> AppState {
        self.state_with(MasterKey::generate(), 16 * 1024 * 1024)
    }

    pub fn state_with(&self, key: MasterKey, max_body_bytes: usize) -> AppState {
        self.state_with_keys(
            Keys {
                master: key,
                ledger: ledger_key(),
                index: self.index_key(),
                local_issuer: Some(local_issuer()),
            },
            max_body_bytes,
        )
    }

    pub fn state_with_keys(&self, keys: Keys, max_body_bytes: usize) -> AppState {
        self.state_with_options(keys, max_body_bytes, Vec::new())
    }

    /// Application state that also trusts `issuers` (besides the local test issuer).
    pub fn state_trusting(&self, issuers: Vec<(String, JwkSet)>) -> AppState {
        let keys = Keys {
            master: MasterKey::generate(),
            ledger: ledger_key(),
            index: self.index_key(),
            local_issuer: Some(local_issuer()),
        };
        self.state_with_options(keys, 16 * 1024 * 1024, issuers)
    }

    fn state_with_options(
        &self,
        keys: Keys,
        max_body_bytes: usize,
        trusted_issuers: Vec<(String, JwkSet)>,
    ) -> AppState {
        let mut options = test_options(max_body_bytes);
        options.trusted_issuers = trusted_issuers;
        prepare_state(&self.url, keys, &options).expect("application state")
    }

    /// Application state whose master key is `master`, also opening what `previous` sealed
    /// (a master key rotation in progress).
    pub fn state_rotating(&self, master: MasterKey, previous: Vec<MasterKey>) -> AppState {
        let keys = Keys {
            master,
            ledger: ledger_key(),
            index: self.index_key(),
            local_issuer: Some(local_issuer()),
        };
        let mut options = test_options(16 * 1024 * 1024);
        options.previous_master_keys = std::sync::Arc::new(previous);
        prepare_state(&self.url, keys, &options).expect("application state")
    }

    /// Application state with these ledger and index keys (and a fixed master key) and the
    /// test options as `configure` changes them, for the tests of key custody: an error where
    /// the server would refuse to start.
    pub fn try_state_with(
        &self,
        ledger: LedgerKey,
        index: BlindIndexKey,
        configure: impl FnOnce(&mut StateOptions),
    ) -> anyhow::Result<AppState> {
        let keys = Keys {
            master: MasterKey::from_bytes([7; 32]),
            ledger,
            index,
            local_issuer: Some(local_issuer()),
        };
        let mut options = test_options(16 * 1024 * 1024);
        configure(&mut options);
        prepare_state(&self.url, keys, &options)
    }

    /// Application state with fresh keys and the test options as `configure` changes them
    /// (CORS origins, SMART endpoints, …).
    pub fn state_configured(&self, configure: impl FnOnce(&mut StateOptions)) -> AppState {
        let keys = Keys {
            master: MasterKey::generate(),
            ledger: ledger_key(),
            index: self.index_key(),
            local_issuer: Some(local_issuer()),
        };
        let mut options = test_options(16 * 1024 * 1024);
        configure(&mut options);
        prepare_state(&self.url, keys, &options).expect("application state")
    }

    /// A direct connection, for tests that inspect or tamper with stored rows.
    pub fn connect(&self) -> fhirledger::store::DbConnection {
        fhirledger::store::connection::establish(&self.url).expect("database connection")
    }
}

fn admin_url() -> String {
    std::env::var(PG_ENV).unwrap_or_else(|_| {
        panic!(
            "{PG_ENV} is not set: set it to a PostgreSQL URL whose user may create databases \
             (e.g. postgres://postgres@127.0.0.1:5432/postgres), or run `cargo test -- --skip postgres`"
        )
    })
}

fn admin_connection(admin_url: &str) -> diesel::PgConnection {
    diesel::PgConnection::establish(admin_url)
        .unwrap_or_else(|e| panic!("{PG_ENV}: cannot connect to PostgreSQL: {e}"))
}

/// The name of a database holding every PostgreSQL migration of this checkout and nothing
/// else, made on first use. It is named after a digest of the migrations, so a test run
/// reuses what an earlier one made until a migration changes; it is built under a name of
/// its own and renamed when complete, so test processes running at once never copy half a
/// template (the loser of the rename drops its copy).
fn migrated_template() -> &'static str {
    static TEMPLATE: OnceLock<String> = OnceLock::new();
    TEMPLATE.get_or_init(|| {
        use sha2::Digest as _;
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<PathBuf> = std::fs::read_dir(manifest.join("migrations/postgres"))
            .expect("migrations/postgres")
            .flat_map(|dir| std::fs::read_dir(dir.expect("migration").path()).expect("migration"))
            .map(|file| file.expect("migration file").path())
            .collect();
        files.sort();
        let mut digest = sha2::Sha256::new();
        for file in &files {
            // Relative: every checkout of the same migrations shares one template.
            let relative = file.strip_prefix(manifest).unwrap_or(file);
            digest.update(relative.to_string_lossy().as_bytes());
            digest.update(std::fs::read(file).expect("migration file"));
        }
        let digest: String = digest.finalize()[..8]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let name = format!("fhirledger_template_{digest}");
        let admin_url = admin_url();
        let mut admin = admin_connection(&admin_url);
        #[derive(diesel::QueryableByName)]
        struct Found {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let exists = |admin: &mut diesel::PgConnection| {
            diesel::sql_query("SELECT COUNT(*) AS n FROM pg_database WHERE datname = $1")
                .bind::<diesel::sql_types::Text, _>(&name)
                .get_result::<Found>(admin)
                .expect("look for the template database")
                .n
                > 0
        };
        if exists(&mut admin) {
            return name;
        }
        let building = format!("fhirledger_building_{}", uuid::Uuid::new_v4().simple());
        diesel::sql_query(format!("CREATE DATABASE {building}"))
            .execute(&mut admin)
            .expect("create the template database");
        {
            let url = DatabaseUrl::parse(&with_database(&admin_url, &building)).expect("URL");
            let mut conn = fhirledger::store::connection::establish(&url).expect("connect");
            fhirledger::store::migrations::run_pending(&mut conn).expect("migrate the template");
        }
        // No connections: autovacuum, too, leaves it alone, so copying it never finds it busy.
        diesel::sql_query(format!(
            "ALTER DATABASE {building} WITH IS_TEMPLATE true ALLOW_CONNECTIONS false"
        ))
        .execute(&mut admin)
        .expect("mark the template database");
        let renamed = diesel::sql_query(format!("ALTER DATABASE {building} RENAME TO {name}"))
            .execute(&mut admin);
        if renamed.is_err() {
            let _ = diesel::sql_query(format!("ALTER DATABASE {building} IS_TEMPLATE false"))
                .execute(&mut admin);
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
                .execute(&mut admin);
            assert!(exists(&mut admin), "template database {name}: {renamed:?}");
        }
        name
    })
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(pg) = &self.postgres
            && let Ok(mut admin) = diesel::PgConnection::establish(&pg.admin_url)
        {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", pg.name))
                .execute(&mut admin);
        }
        drop(self.dir.take());
    }
}

/// The options every test server starts from.
fn test_options(max_body_bytes: usize) -> StateOptions {
    StateOptions {
        base_url: BASE_URL.into(),
        max_body_bytes,
        pool_size: 8,
        ledger_batch_size: 4096,
        auth_failures_per_minute: 60,
        trusted_issuers: Vec::new(),
        smart: None,
        cors_origins: Vec::new(),
        export_retention: std::time::Duration::from_secs(3600),
        witnesses: Vec::new(),
        previous_master_keys: std::sync::Arc::new(Vec::new()),
        previous_ledger_key: None,
        index_maintenance: false,
    }
}

/// The checkpoint origin the tests use.
pub const LEDGER_ORIGIN: &str = "fhir.test/ledger";

/// The tests' ledger key: one for every test, as a log has one key until it rotates it.
pub fn ledger_key() -> LedgerKey {
    LedgerKey::from_seed([8; 32], LEDGER_ORIGIN).expect("ledger key")
}

fn random_key() -> [u8; 32] {
    use rand::RngCore as _;
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    key
}

/// Replaces the database name in a PostgreSQL URL, keeping credentials, host and options.
fn with_database(url: &str, database: &str) -> String {
    let (before_query, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = before_query.find("://").map_or(0, |i| i + 3);
    let authority_end = before_query[scheme_end..]
        .find('/')
        .map_or(before_query.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &before_query[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    out
}

/// A response as the tests look at it.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("header text").to_owned())
    }

    /// Asserts the body is an OperationOutcome and returns its first issue.
    pub fn outcome_issue(&self) -> Value {
        let body = self.json();
        assert_eq!(body["resourceType"], "OperationOutcome", "body: {body}");
        body["issue"][0].clone()
    }
}

/// The local issuer every test server trusts (one key per test process).
pub fn local_issuer() -> LocalIssuer {
    static SEED: OnceLock<[u8; 32]> = OnceLock::new();
    let seed = SEED.get_or_init(rand::random);
    LocalIssuer::from_seed(seed, BASE_URL).expect("local issuer")
}

/// A token from the test issuer with `scope`, valid for an hour.
pub fn token_with(scope: &str, patient: Option<&str>, fhir_user: Option<&str>) -> String {
    token_for_purpose(scope, patient, fhir_user, None)
}

/// [`token_with`], also asserting a purpose of use (`ETREAT`, `HRESCH`).
pub fn token_for_purpose(
    scope: &str,
    patient: Option<&str>,
    fhir_user: Option<&str>,
    purpose_of_use: Option<&str>,
) -> String {
    local_issuer()
        .mint(&TokenRequest {
            subject: "test-user".into(),
            scope: scope.into(),
            client_id: Some("test-client".into()),
            patient: patient.map(str::to_owned),
            fhir_user: fhir_user.map(str::to_owned),
            purpose_of_use: purpose_of_use.map(str::to_owned),
            ttl_seconds: 3600,
        })
        .expect("mint a token")
}

/// The scopes of the token [`call`] sends: everything a backend administrator may do.
pub const ADMIN_SCOPES: &str = "system/*.cruds ledger.read";

fn admin_token() -> &'static str {
    static TOKEN: OnceLock<String> = OnceLock::new();
    TOKEN.get_or_init(|| token_with(ADMIN_SCOPES, None, None))
}

/// The app under test, as the helpers take it (`test::init_service` of `build_app`).
pub trait TestApp<B>:
    Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>
{
}

impl<S, B> TestApp<B> for S where
    S: Service<actix_http::Request, Response = ServiceResponse<B>, Error = actix_web::Error>
{
}

/// Calls the app as an administrator: a request without an `Authorization` header gets the
/// [`ADMIN_SCOPES`] token.
pub async fn call<S, B>(app: &S, request: TestRequest) -> Reply
where
    S: TestApp<B>,
    B: MessageBody,
{
    let mut request = request.to_request();
    if !request.headers().contains_key("authorization") {
        let value = format!("Bearer {}", admin_token());
        request.headers_mut().insert(
            actix_web::http::header::AUTHORIZATION,
            actix_web::http::header::HeaderValue::from_str(&value).expect("header"),
        );
    }
    send(app, request).await
}

/// Creates each resource at its `Type/id` (201 expected).
pub async fn create_each<S, B>(app: &S, resources: impl IntoIterator<Item = Value>)
where
    S: TestApp<B>,
    B: MessageBody,
{
    for resource in resources {
        let path = format!(
            "/fhir/{}/{}",
            resource["resourceType"].as_str().expect("resourceType"),
            resource["id"].as_str().expect("id")
        );
        let reply = call(app, put(&path, &resource)).await;
        assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    }
}

/// Calls the app with exactly the request's headers (no token added).
pub async fn call_as_is<S, B>(app: &S, request: TestRequest) -> Reply
where
    S: TestApp<B>,
    B: MessageBody,
{
    send(app, request.to_request()).await
}

async fn send<S, B>(app: &S, request: actix_http::Request) -> Reply
where
    S: TestApp<B>,
    B: MessageBody,
{
    let response = test::call_service(app, request).await;
    let status = response.status();
    let headers = response.headers().clone();
    let body = test::read_body(response).await;
    Reply {
        status,
        headers,
        body,
    }
}

pub fn fhir_json(request: TestRequest, body: &Value) -> TestRequest {
    request
        .insert_header(("Content-Type", "application/fhir+json"))
        .set_payload(serde_json::to_vec(body).expect("serialize"))
}

pub fn post(path: &str, body: &Value) -> TestRequest {
    fhir_json(TestRequest::post().uri(path), body)
}

pub fn put(path: &str, body: &Value) -> TestRequest {
    fhir_json(TestRequest::put().uri(path), body)
}

pub fn get(path: &str) -> TestRequest {
    TestRequest::get().uri(path)
}

/// `shared/fixtures/` beside the project root.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

pub fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A resource without the server-owned `meta.versionId`/`meta.lastUpdated` (and without
/// `meta` when nothing else is left in it), for comparing what was sent with what is read.
pub fn without_server_meta(resource: &Value) -> Value {
    let mut resource = resource.clone();
    if let Some(object) = resource.as_object_mut() {
        let mut drop_meta = false;
        if let Some(Value::Object(meta)) = object.get_mut("meta") {
            meta.remove("versionId");
            meta.remove("lastUpdated");
            drop_meta = meta.is_empty();
        }
        if drop_meta {
            object.remove("meta");
        }
    }
    resource
}

/// Ids of the `match` entries of a searchset Bundle, in order.
pub fn searchset_ids(bundle: &Value) -> Vec<String> {
    assert_eq!(bundle["type"], "searchset", "{bundle}");
    bundle["entry"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .filter(|e| e["search"]["mode"] == "match")
                .map(|e| e["resource"]["id"].as_str().expect("id").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The URL of a Bundle link.
pub fn link(bundle: &Value, relation: &str) -> Option<String> {
    bundle["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == relation)
        .map(|l| l["url"].as_str().expect("url").to_owned())
}

/// Path and query of a link, for calling the test app.
pub fn local(url: &str) -> String {
    url.strip_prefix(BASE_URL)
        .expect("a link of this server")
        .to_owned()
}

/// The ledger entries of a response's receipt, read with the administrator's token: the
/// entry itself and, when the interaction touched several patients' records, its parts
/// (one per patient).
pub async fn ledger_entries<S, B>(app: &S, reply: &Reply) -> Vec<Value>
where
    S: TestApp<B>,
    B: MessageBody,
{
    let receipt = reply
        .header("x-ledger-entry")
        .unwrap_or_else(|| panic!("no receipt on {}: {}", reply.status, reply.text()));
    let mut entries = vec![ledger_entry_by_receipt(app, &receipt).await];
    let parts: Vec<String> = entries[0]["parts"]
        .as_array()
        .map(|parts| {
            parts
                .iter()
                .map(|p| p.as_str().expect("receipt").to_owned())
                .collect()
        })
        .unwrap_or_default();
    for part in parts {
        entries.push(ledger_entry_by_receipt(app, &part).await);
    }
    entries
}

/// The ledger entry a receipt names.
pub async fn ledger_entry_by_receipt<S, B>(app: &S, receipt: &str) -> Value
where
    S: TestApp<B>,
    B: MessageBody,
{
    let resolved = call(app, get(&format!("/ledger/receipts/{receipt}"))).await;
    assert_eq!(resolved.status, StatusCode::OK, "{}", resolved.text());
    resolved.json()["entry"].clone()
}

/// Creates a resource with POST (201 expected); returns its server-assigned id.
pub async fn create<S, B>(app: &S, resource: Value) -> String
where
    S: TestApp<B>,
    B: MessageBody,
{
    let path = format!("/fhir/{}", resource["resourceType"].as_str().expect("type"));
    let reply = call(app, post(&path, &resource)).await;
    assert_eq!(reply.status, StatusCode::CREATED, "{}", reply.text());
    reply.json()["id"].as_str().expect("id").to_owned()
}

/// The key-custody entries (action and key id) of a `GET /ledger/entries` page, in order.
pub fn key_entries(page: &Value) -> Vec<(String, String)> {
    page["entries"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| {
            Some((
                e["entry"]["action"].as_str()?.to_owned(),
                e["entry"]["key"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// Waits until something listens on `port` (up to 30 s), failing when `child`, which should
/// be the listener (`what`), exits first.
pub fn wait_until_listening(port: u16, child: &mut std::process::Child, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(child.try_wait().unwrap().is_none(), "{what} exited");
        assert!(std::time::Instant::now() < deadline, "{what} did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
