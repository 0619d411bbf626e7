//! Configuration of `fhirledger serve`: every setting is a `FHIRLEDGER_*` environment
//! variable and the same as a flag; a bad value stops start-up with a message naming it.
//!
//! | variable | flag | default |
//! |---|---|---|
//! | `FHIRLEDGER_LISTEN` | `--listen` | `127.0.0.1:8080` |
//! | `FHIRLEDGER_DATA_DIR` | `--data-dir` | `./data` |
//! | `FHIRLEDGER_DATABASE_URL` | `--database-url` | `sqlite://$DATA_DIR/fhirledger.db` |
//! | `FHIRLEDGER_BASE_URL` | `--base-url` | `http://$LISTEN` |
//! | `FHIRLEDGER_LOCAL_ISSUER` | `--local-issuer` | `true` (trust tokens of `fhirledger token`) |
//! | `FHIRLEDGER_TRUSTED_ISSUERS` | `--trusted-issuers` | — (`ISSUER=JWKS` pairs, comma-separated) |
//! | `FHIRLEDGER_SMART_TOKEN_ENDPOINT` | `--smart-token-endpoint` | — (the trusted provider's; needed by the other `SMART` settings) |
//! | `FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT` | `--smart-authorization-endpoint` | — |
//! | `FHIRLEDGER_SMART_ISSUER` | `--smart-issuer` | the trusted issuer, when there is one |
//! | `FHIRLEDGER_SMART_JWKS_URI` | `--smart-jwks-uri` | that issuer's JWKS, when an `https://` URL |
//! | `FHIRLEDGER_SMART_INTROSPECTION_ENDPOINT` | `--smart-introspection-endpoint` | — |
//! | `FHIRLEDGER_SMART_REVOCATION_ENDPOINT` | `--smart-revocation-endpoint` | — |
//! | `FHIRLEDGER_SMART_REGISTRATION_ENDPOINT` | `--smart-registration-endpoint` | — |
//! | `FHIRLEDGER_SMART_MANAGEMENT_ENDPOINT` | `--smart-management-endpoint` | — |
//! | `FHIRLEDGER_SMART_CAPABILITIES` | `--smart-capabilities` | — (the provider's, comma-separated) |
//! | `FHIRLEDGER_SMART_GRANT_TYPES` | `--smart-grant-types` | `authorization_code` with an authorization endpoint, else `client_credentials` |
//! | `FHIRLEDGER_CORS_ORIGINS` | `--cors-origins` | — (no CORS headers; exact origins, comma-separated) |
//! | `FHIRLEDGER_MASTER_KEY_FILE` | `--master-key-file` | (SQLite only: generated `$DATA_DIR/master.key`) |
//! | `FHIRLEDGER_MASTER_KEY` | `--master-key` | — (base64; prefer the file) |
//! | `FHIRLEDGER_LEDGER_KEY_FILE` | `--ledger-key-file` | (SQLite only: generated `$DATA_DIR/ledger.key`) |
//! | `FHIRLEDGER_LEDGER_KEY` | `--ledger-key` | — (base64 Ed25519 seed; prefer the file) |
//! | `FHIRLEDGER_INDEX_KEY_FILE` | `--index-key-file` | (SQLite only: generated `$DATA_DIR/index.key`) |
//! | `FHIRLEDGER_INDEX_KEY` | `--index-key` | — (base64; prefer the file) |
//! | `FHIRLEDGER_LEDGER_ORIGIN` | `--ledger-origin` | base URL without scheme, plus `/ledger` |
//! | `FHIRLEDGER_LEDGER_INTERVAL_MS` | `--ledger-interval-ms` | `200` |
//! | `FHIRLEDGER_LEDGER_BATCH_SIZE` | `--ledger-batch-size` | `256` |
//! | `FHIRLEDGER_PREVIOUS_MASTER_KEY_FILES` | `--previous-master-key-files` | — (a rotation's previous keys) |
//! | `FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE` | `--previous-ledger-key-file` | — (a ledger key rotation's outgoing key) |
//! | `FHIRLEDGER_SEALED` | `--sealed` | `false` (then the master key comes from its shares) |
//! | `FHIRLEDGER_WITNESSES` | `--witness` | — (comma-separated `VKEY@URL`) |
//! | `FHIRLEDGER_MAX_BODY_BYTES` | `--max-body-bytes` | `16777216` |
//! | `FHIRLEDGER_DB_POOL_SIZE` | `--db-pool-size` | `16` |
//! | `FHIRLEDGER_AUTH_FAILURES_PER_MINUTE` | `--auth-failures-per-minute` | `60` (per client address; then 429) |
//! | `FHIRLEDGER_WORKERS` | `--workers` | number of CPUs |
//! | `FHIRLEDGER_SHUTDOWN_TIMEOUT` | `--shutdown-timeout` | `30` (seconds) |
//! | `FHIRLEDGER_LOG` | `--log` | `info` (tracing filter) |
//! | `FHIRLEDGER_LOG_FORMAT` | `--log-format` | `text` (`text` or `json`) |

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};

use crate::access::local_issuer::LocalIssuer;
use crate::access::smart::SmartAuthorization;
use crate::crypto::blind_index::DEV_INDEX_KEY_FILE;
use crate::crypto::keys::{
    DEV_MASTER_KEY_FILE, Secret, decode_key_base64, load_or_create_secret_file, read_secret_file,
};
use crate::crypto::{BlindIndexKey, MasterKey};
use crate::ledger::LedgerKey;
use crate::ledger::keys::DEV_LEDGER_KEY_FILE;
use crate::store::DatabaseUrl;
use jsonwebtoken::jwk::JwkSet;

/// Settings shared by every subcommand that opens the database.
#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Directory for the SQLite file and generated development keys.
    #[arg(
        long,
        env = "FHIRLEDGER_DATA_DIR",
        default_value = "./data",
        value_name = "DIR"
    )]
    pub data_dir: PathBuf,

    /// `sqlite://PATH` or `postgres://…` (default: sqlite://$DATA_DIR/fhirledger.db).
    #[arg(long, env = "FHIRLEDGER_DATABASE_URL", value_name = "URL", hide_env_values = true,
          value_parser = parse_database_url)]
    pub database_url: Option<DatabaseUrl>,
}

impl DatabaseArgs {
    pub fn resolved_database_url(&self) -> DatabaseUrl {
        self.database_url
            .clone()
            .unwrap_or_else(|| DatabaseUrl::sqlite_file(&self.data_dir.join("fhirledger.db")))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the server is reached: `serve` listens there, and `token` names it as the
/// audience of the tokens it mints.
#[derive(Debug, Clone, Args)]
pub struct AddressArgs {
    /// Address to listen on.
    #[arg(long, env = "FHIRLEDGER_LISTEN", default_value = "127.0.0.1:8080", value_name = "ADDR",
          value_parser = parse_listen)]
    pub listen: SocketAddr,

    /// Public base URL used in Location headers and Bundle links (default: http://$LISTEN).
    #[arg(long, env = "FHIRLEDGER_BASE_URL", value_name = "URL", value_parser = parse_base_url)]
    pub base_url: Option<String>,
}

impl AddressArgs {
    pub fn resolved_base_url(&self) -> String {
        self.base_url
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen))
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub address: AddressArgs,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Trust tokens from the local issuer, whose key is generated in the data directory
    /// (`fhirledger token` mints them). Production deployments set it to false.
    #[arg(long, env = "FHIRLEDGER_LOCAL_ISSUER", default_value_t = true, value_name = "BOOL",
          action = clap::ArgAction::Set, value_parser = parse_local_issuer)]
    pub local_issuer: bool,

    /// Further trusted token issuers: comma-separated `ISSUER=JWKS` pairs, where JWKS is a
    /// file or an https:// URL of the issuer's JSON Web Key Set (fetched at start-up).
    #[arg(long, env = "FHIRLEDGER_TRUSTED_ISSUERS", value_name = "ISSUER=JWKS,…",
          value_parser = parse_trusted_issuers)]
    pub trusted_issuers: Option<TrustedIssuers>,

    /// Token endpoint of the trusted identity provider, published to SMART clients.
    #[arg(long, env = "FHIRLEDGER_SMART_TOKEN_ENDPOINT", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_TOKEN_ENDPOINT"))]
    pub smart_token_endpoint: Option<String>,

    /// Authorization endpoint of the trusted identity provider (SMART App Launch).
    #[arg(long, env = "FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT"))]
    pub smart_authorization_endpoint: Option<String>,

    /// Which trusted issuer the SMART endpoints belong to (default: the only one).
    #[arg(long, env = "FHIRLEDGER_SMART_ISSUER", value_name = "ISSUER")]
    pub smart_issuer: Option<String>,

    /// The provider's key set URL (default: its FHIRLEDGER_TRUSTED_ISSUERS JWKS, when a URL).
    #[arg(long, env = "FHIRLEDGER_SMART_JWKS_URI", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_JWKS_URI"))]
    pub smart_jwks_uri: Option<String>,

    /// The provider's token introspection endpoint (RFC 7662).
    #[arg(long, env = "FHIRLEDGER_SMART_INTROSPECTION_ENDPOINT", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_INTROSPECTION_ENDPOINT"))]
    pub smart_introspection_endpoint: Option<String>,

    /// The provider's token revocation endpoint (RFC 7009).
    #[arg(long, env = "FHIRLEDGER_SMART_REVOCATION_ENDPOINT", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_REVOCATION_ENDPOINT"))]
    pub smart_revocation_endpoint: Option<String>,

    /// The provider's dynamic client registration endpoint (RFC 7591).
    #[arg(long, env = "FHIRLEDGER_SMART_REGISTRATION_ENDPOINT", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_REGISTRATION_ENDPOINT"))]
    pub smart_registration_endpoint: Option<String>,

    /// Where users manage the apps they authorized.
    #[arg(long, env = "FHIRLEDGER_SMART_MANAGEMENT_ENDPOINT", value_name = "URL",
          value_parser = |text: &str| parse_endpoint(text, "FHIRLEDGER_SMART_MANAGEMENT_ENDPOINT"))]
    pub smart_management_endpoint: Option<String>,

    /// SMART capabilities of the identity provider (launch-standalone, client-public, …),
    /// comma-separated; the server's own permission-* capabilities are always published.
    #[arg(long, env = "FHIRLEDGER_SMART_CAPABILITIES", value_name = "CAPABILITY,…",
          value_parser = |text: &str| Ok::<_, String>(CommaList::parse(text)))]
    pub smart_capabilities: Option<CommaList>,

    /// Grant types of the provider's token endpoint: authorization_code, client_credentials.
    #[arg(long, env = "FHIRLEDGER_SMART_GRANT_TYPES", value_name = "GRANT,…",
          value_parser = |text: &str| Ok::<_, String>(CommaList::parse(text)))]
    pub smart_grant_types: Option<CommaList>,

    /// The client id the identity provider registered for the portal (`/portal`), a public
    /// client redirected back to `<FHIRLEDGER_BASE_URL>/portal`: with it, the portal offers a
    /// SMART standalone launch with PKCE. Needs FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT.
    #[arg(long, env = "FHIRLEDGER_PORTAL_CLIENT_ID", value_name = "CLIENT_ID")]
    pub portal_client_id: Option<String>,

    /// Browser origins allowed to call the server (CORS), e.g. https://app.example.org;
    /// exact origins, comma-separated. Unset: no CORS headers.
    #[arg(long, env = "FHIRLEDGER_CORS_ORIGINS", value_name = "ORIGIN,…",
          value_parser = parse_cors_origins)]
    pub cors_origins: Option<CorsOrigins>,

    /// File holding the base64 master key (32 bytes).
    #[arg(long, env = "FHIRLEDGER_MASTER_KEY_FILE", value_name = "PATH")]
    pub master_key_file: Option<PathBuf>,

    /// The base64 master key itself (prefer the file: environments leak).
    #[arg(
        long,
        env = "FHIRLEDGER_MASTER_KEY",
        value_name = "BASE64",
        hide_env_values = true
    )]
    pub master_key: Option<String>,

    /// Files of previous master keys (comma-separated), during a rotation: the server still
    /// opens what they sealed, re-wraps every data key they wrapped with the current key in
    /// the background, and logs (and ledgers) when each may be removed.
    #[arg(
        long,
        env = "FHIRLEDGER_PREVIOUS_MASTER_KEY_FILES",
        value_name = "PATH",
        value_delimiter = ','
    )]
    pub previous_master_key_files: Vec<PathBuf>,

    /// A ledger key rotation: the file of the key that signs the log now. When it is the
    /// chain's current key and FHIRLEDGER_LEDGER_KEY_FILE holds another, the server announces
    /// the new key in an entry signed (and checkpointed) by this one, then signs with the new.
    #[arg(long, env = "FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE", value_name = "PATH")]
    pub previous_ledger_key_file: Option<PathBuf>,

    /// File holding the base64 32-byte Ed25519 seed that signs ledger entries and checkpoints.
    #[arg(long, env = "FHIRLEDGER_LEDGER_KEY_FILE", value_name = "PATH")]
    pub ledger_key_file: Option<PathBuf>,

    /// The base64 ledger key itself (prefer the file).
    #[arg(
        long,
        env = "FHIRLEDGER_LEDGER_KEY",
        value_name = "BASE64",
        hide_env_values = true
    )]
    pub ledger_key: Option<String>,

    /// File holding the base64 32-byte key of the search blind index (HMAC-SHA-256), kept
    /// apart from the master key.
    #[arg(long, env = "FHIRLEDGER_INDEX_KEY_FILE", value_name = "PATH")]
    pub index_key_file: Option<PathBuf>,

    /// The base64 index key itself (prefer the file).
    #[arg(
        long,
        env = "FHIRLEDGER_INDEX_KEY",
        value_name = "BASE64",
        hide_env_values = true
    )]
    pub index_key: Option<String>,

    /// Checkpoint origin (the log's name in signed notes); default: base URL host and path + `/ledger`.
    #[arg(long, env = "FHIRLEDGER_LEDGER_ORIGIN", value_name = "ORIGIN", value_parser = parse_origin)]
    pub ledger_origin: Option<String>,

    /// Milliseconds between sequencer runs: bounds the time from an entry being durable to a
    /// checkpoint covering it.
    #[arg(long, env = "FHIRLEDGER_LEDGER_INTERVAL_MS", default_value_t = 200, value_name = "MS",
          value_parser = parse_interval)]
    pub ledger_interval_ms: u64,

    /// Start sealed: no master key is read; the server answers 503 until enough shares of
    /// it (`fhirledger keys split`) are given with `fhirledger unseal` on this machine.
    #[arg(long, env = "FHIRLEDGER_SEALED", default_value_t = false, value_name = "BOOL",
          action = clap::ArgAction::Set, value_parser = parse_sealed)]
    pub sealed: bool,

    /// Witnesses that cosign the ledger's checkpoints (C2SP tlog-witness): comma-separated
    /// `VKEY@URL`, the witness's cosignature verifier key (`fhirledger witness --print-vkey`)
    /// and its submission URL. Each new checkpoint is submitted to each in the background.
    #[arg(long = "witness", env = "FHIRLEDGER_WITNESSES", value_name = "VKEY@URL",
          value_delimiter = ',', value_parser = crate::service::ledger::WitnessEndpoint::parse)]
    pub witnesses: Vec<crate::service::ledger::WitnessEndpoint>,

    /// Seconds a finished bulk export's files are kept before they are deleted.
    #[arg(long, env = "FHIRLEDGER_EXPORT_RETENTION_SECS", default_value_t = 3600, value_name = "SECONDS",
          value_parser = parse_export_retention)]
    pub export_retention_secs: u64,

    /// Most entries sequenced under one checkpoint, in one transaction. On SQLite that
    /// transaction holds the one write lock every request's ledger entry waits on: at 4,096
    /// it held it for 30–60 ms five times a second (2% of reads took that long); 256 keeps
    /// each hold to a few milliseconds, for one more signed checkpoint per 256 entries.
    #[arg(long, env = "FHIRLEDGER_LEDGER_BATCH_SIZE", default_value_t = 256, value_name = "N",
          value_parser = parse_batch_size)]
    pub ledger_batch_size: i64,

    /// Largest accepted request body in bytes.
    #[arg(long, env = "FHIRLEDGER_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024, value_name = "BYTES",
          value_parser = parse_max_body)]
    pub max_body_bytes: usize,

    /// Database connections per process.
    #[arg(long, env = "FHIRLEDGER_DB_POOL_SIZE", default_value_t = 16, value_name = "N",
          value_parser = parse_pool_size)]
    pub db_pool_size: u32,

    /// Requests without valid credentials one client address may have refused (401) per
    /// minute; past it, 429 with Retry-After until the minute is over.
    #[arg(long, env = "FHIRLEDGER_AUTH_FAILURES_PER_MINUTE", default_value_t = 60, value_name = "N",
          value_parser = parse_auth_failures)]
    pub auth_failures_per_minute: u32,

    /// HTTP worker threads (default: one per CPU).
    #[arg(long, env = "FHIRLEDGER_WORKERS", value_name = "N", value_parser = parse_workers)]
    pub workers: Option<usize>,

    /// Seconds to let requests in flight finish after SIGTERM/SIGINT.
    #[arg(long, env = "FHIRLEDGER_SHUTDOWN_TIMEOUT", default_value_t = 30, value_name = "SECONDS",
          value_parser = parse_shutdown_timeout)]
    pub shutdown_timeout: u64,

    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `fhirledger=debug`.
    #[arg(
        long,
        env = "FHIRLEDGER_LOG",
        default_value = "info",
        value_name = "FILTER"
    )]
    pub log: String,

    /// Log line format.
    #[arg(long, env = "FHIRLEDGER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// One 32-byte secret setting: a file or the value itself, or on the embedded default a
/// file generated in the data directory.
struct SecretSetting<'a> {
    file: Option<&'a Path>,
    value: Option<&'a str>,
    file_var: &'static str,
    value_var: &'static str,
    dev_file: &'static str,
    dev_name: &'static str,
}

/// Where a key came from (decides whether to warn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyOrigin {
    Configured,
    DevelopmentExisting,
    DevelopmentGenerated,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Key(#[from] crate::crypto::KeyError),
}

impl ServeArgs {
    pub fn resolved_base_url(&self) -> String {
        self.address.resolved_base_url()
    }

    /// The trusted issuers' key sets, read or fetched now: a server must not start
    /// trusting an issuer whose keys it cannot load.
    pub fn load_trusted_issuers(&self) -> Result<Vec<(String, JwkSet)>, ConfigError> {
        let Some(issuers) = &self.trusted_issuers else {
            return Ok(Vec::new());
        };
        issuers
            .0
            .iter()
            .map(|(issuer, location)| {
                let text = if location.starts_with("http://") {
                    Err("key sets are fetched over https:// only".to_owned())
                } else if location.starts_with("https://") {
                    ureq::get(location)
                        .call()
                        .and_then(|mut response| response.body_mut().read_to_string())
                        .map_err(|e| format!("cannot fetch {location}: {e}"))
                } else {
                    std::fs::read_to_string(location)
                        .map_err(|e| format!("cannot read {location}: {e}"))
                };
                let jwks = text.and_then(|text| {
                    serde_json::from_str::<JwkSet>(&text)
                        .map_err(|e| format!("{location} is not a JSON Web Key Set: {e}"))
                });
                jwks.map(|jwks| (issuer.clone(), jwks)).map_err(|detail| {
                    ConfigError::Invalid(format!(
                        "FHIRLEDGER_TRUSTED_ISSUERS: issuer {issuer}: {detail}"
                    ))
                })
            })
            .collect()
    }

    /// The trusted identity provider's SMART endpoints, when configured. They must belong to
    /// a trusted issuer: publishing an authorization server whose tokens the server refuses
    /// would send every app into a dead end.
    pub fn smart_authorization(&self) -> Result<Option<SmartAuthorization>, ConfigError> {
        let optional_set = [
            (
                "FHIRLEDGER_SMART_AUTHORIZATION_ENDPOINT",
                self.smart_authorization_endpoint.is_some(),
            ),
            ("FHIRLEDGER_SMART_ISSUER", self.smart_issuer.is_some()),
            ("FHIRLEDGER_SMART_JWKS_URI", self.smart_jwks_uri.is_some()),
            (
                "FHIRLEDGER_SMART_INTROSPECTION_ENDPOINT",
                self.smart_introspection_endpoint.is_some(),
            ),
            (
                "FHIRLEDGER_SMART_REVOCATION_ENDPOINT",
                self.smart_revocation_endpoint.is_some(),
            ),
            (
                "FHIRLEDGER_SMART_REGISTRATION_ENDPOINT",
                self.smart_registration_endpoint.is_some(),
            ),
            (
                "FHIRLEDGER_SMART_MANAGEMENT_ENDPOINT",
                self.smart_management_endpoint.is_some(),
            ),
            (
                "FHIRLEDGER_SMART_CAPABILITIES",
                self.smart_capabilities.is_some(),
            ),
            (
                "FHIRLEDGER_SMART_GRANT_TYPES",
                self.smart_grant_types.is_some(),
            ),
            (
                "FHIRLEDGER_PORTAL_CLIENT_ID",
                self.portal_client_id.is_some(),
            ),
        ];
        let Some(token_endpoint) = self.smart_token_endpoint.clone() else {
            return match optional_set.iter().find(|(_, set)| *set) {
                Some((name, _)) => Err(ConfigError::Invalid(format!(
                    "{name} needs FHIRLEDGER_SMART_TOKEN_ENDPOINT (every SMART authorization server has one)"
                ))),
                None => Ok(None),
            };
        };
        let issuers = self
            .trusted_issuers
            .as_ref()
            .map_or(&[][..], |t| t.0.as_slice());
        let (issuer, jwks_location) = match &self.smart_issuer {
            Some(named) => issuers
                .iter()
                .find(|(issuer, _)| issuer == named)
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(
                        "FHIRLEDGER_SMART_ISSUER: {named} is not one of FHIRLEDGER_TRUSTED_ISSUERS"
                    ))
                })?,
            None => match issuers {
                [only] => only,
                [] => {
                    return Err(ConfigError::Invalid(
                        "FHIRLEDGER_SMART_TOKEN_ENDPOINT: set FHIRLEDGER_TRUSTED_ISSUERS to the \
                         identity provider it belongs to (the server refuses tokens of issuers it \
                         does not trust)"
                            .into(),
                    ));
                }
                _ => {
                    return Err(ConfigError::Invalid(
                        "FHIRLEDGER_SMART_ISSUER: several issuers are trusted; name the one \
                         whose endpoints FHIRLEDGER_SMART_* are"
                            .into(),
                    ));
                }
            },
        };
        let jwks_uri = self.smart_jwks_uri.clone().or_else(|| {
            jwks_location
                .starts_with("https://")
                .then(|| jwks_location.clone())
        });
        let grant_types = match &self.smart_grant_types {
            Some(list) => list.0.clone(),
            None => {
                SmartAuthorization::default_grant_types(self.smart_authorization_endpoint.is_some())
            }
        };
        let smart = SmartAuthorization {
            issuer: issuer.clone(),
            jwks_uri,
            authorization_endpoint: self.smart_authorization_endpoint.clone(),
            token_endpoint,
            introspection_endpoint: self.smart_introspection_endpoint.clone(),
            revocation_endpoint: self.smart_revocation_endpoint.clone(),
            registration_endpoint: self.smart_registration_endpoint.clone(),
            management_endpoint: self.smart_management_endpoint.clone(),
            capabilities: self
                .smart_capabilities
                .as_ref()
                .map(|list| list.0.clone())
                .unwrap_or_default(),
            grant_types,
            portal_client_id: self.portal_client_id.clone(),
        };
        smart
            .check()
            .map_err(|(name, detail)| ConfigError::Invalid(format!("{name}: {detail}")))?;
        Ok(Some(smart))
    }

    /// The browser origins allowed by CORS (none: CORS is off).
    pub fn cors_origins(&self) -> Vec<String> {
        self.cors_origins
            .as_ref()
            .map(|origins| origins.0.clone())
            .unwrap_or_default()
    }

    /// The local issuer, when it is on: its key is generated in the data directory on
    /// first use. Returns whether the key was generated now.
    pub fn load_local_issuer(&self) -> Result<Option<(LocalIssuer, bool)>, ConfigError> {
        if !self.local_issuer {
            return Ok(None);
        }
        ensure_private_dir(&self.database.data_dir)?;
        Ok(Some(LocalIssuer::load_or_create(
            &self.database.data_dir,
            &self.resolved_base_url(),
        )?))
    }

    /// The checkpoint origin: configured, or derived from the base URL
    /// (`https://fhir.example.org` → `fhir.example.org/ledger`).
    pub fn resolved_ledger_origin(&self) -> String {
        self.ledger_origin.clone().unwrap_or_else(|| {
            let base = self.resolved_base_url();
            let without_scheme = base
                .split_once("://")
                .map_or(base.as_str(), |(_, rest)| rest);
            format!("{without_scheme}/ledger")
        })
    }

    /// Loads the master key: from the file or the variable when configured; on the embedded
    /// SQLite default, generated in the data directory; PostgreSQL requires a configured key
    /// (several processes must share one, and a key left on one host's disk would not be).
    pub fn load_master_key(&self) -> Result<(MasterKey, KeyOrigin), ConfigError> {
        let (secret, origin) = self.load_secret(SecretSetting {
            file: self.master_key_file.as_deref(),
            value: self.master_key.as_deref(),
            file_var: "FHIRLEDGER_MASTER_KEY_FILE",
            value_var: "FHIRLEDGER_MASTER_KEY",
            dev_file: DEV_MASTER_KEY_FILE,
            dev_name: "development master key",
        })?;
        Ok((MasterKey::from_bytes(*secret), origin))
    }

    /// Loads the previous master keys of a rotation.
    pub fn load_previous_master_keys(&self) -> Result<Vec<MasterKey>, ConfigError> {
        self.previous_master_key_files
            .iter()
            .map(|path| {
                let secret = read_secret_file(path, "FHIRLEDGER_PREVIOUS_MASTER_KEY_FILES")?;
                Ok(MasterKey::from_bytes(*secret))
            })
            .collect()
    }

    /// Loads the ledger signing key (an Ed25519 seed) the same way as the master key.
    pub fn load_ledger_key(&self) -> Result<(LedgerKey, KeyOrigin), ConfigError> {
        let (seed, origin) = self.load_secret(SecretSetting {
            file: self.ledger_key_file.as_deref(),
            value: self.ledger_key.as_deref(),
            file_var: "FHIRLEDGER_LEDGER_KEY_FILE",
            value_var: "FHIRLEDGER_LEDGER_KEY",
            dev_file: DEV_LEDGER_KEY_FILE,
            dev_name: "development ledger key",
        })?;
        let key =
            LedgerKey::from_seed(*seed, &self.resolved_ledger_origin()).map_err(|detail| {
                ConfigError::Invalid(format!("FHIRLEDGER_LEDGER_ORIGIN: {detail}"))
            })?;
        Ok((key, origin))
    }

    /// Loads the previous ledger key of a rotation, under the same log origin.
    pub fn load_previous_ledger_key(&self) -> Result<Option<LedgerKey>, ConfigError> {
        self.previous_ledger_key_file
            .as_deref()
            .map(|path| {
                let seed = read_secret_file(path, "FHIRLEDGER_PREVIOUS_LEDGER_KEY_FILE")?;
                LedgerKey::from_seed(*seed, &self.resolved_ledger_origin()).map_err(|detail| {
                    ConfigError::Invalid(format!("FHIRLEDGER_LEDGER_ORIGIN: {detail}"))
                })
            })
            .transpose()
    }

    /// Loads the blind-index key the same way as the master key.
    pub fn load_index_key(&self) -> Result<(BlindIndexKey, KeyOrigin), ConfigError> {
        let (secret, origin) = self.load_secret(SecretSetting {
            file: self.index_key_file.as_deref(),
            value: self.index_key.as_deref(),
            file_var: "FHIRLEDGER_INDEX_KEY_FILE",
            value_var: "FHIRLEDGER_INDEX_KEY",
            dev_file: DEV_INDEX_KEY_FILE,
            dev_name: "development index key",
        })?;
        Ok((BlindIndexKey::from_bytes(*secret), origin))
    }

    fn load_secret(&self, setting: SecretSetting<'_>) -> Result<(Secret, KeyOrigin), ConfigError> {
        let SecretSetting {
            file,
            value,
            file_var,
            value_var,
            dev_file,
            dev_name,
        } = setting;
        match (file, value) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(format!(
                "set only one of {file_var} and {value_var}"
            ))),
            (Some(path), None) => Ok((read_secret_file(path, file_var)?, KeyOrigin::Configured)),
            (None, Some(text)) => Ok((decode_key_base64(text, value_var)?, KeyOrigin::Configured)),
            (None, None) => match self.database.resolved_database_url() {
                DatabaseUrl::Postgres(_) => Err(ConfigError::Invalid(format!(
                    "{file_var} (or {value_var}) is required with PostgreSQL; \
                     generate one with: head -c 32 /dev/urandom | base64"
                ))),
                DatabaseUrl::Sqlite(_) => {
                    ensure_private_dir(&self.database.data_dir)?;
                    let path = self.database.data_dir.join(dev_file);
                    let (secret, generated) = load_or_create_secret_file(&path, dev_name)?;
                    let origin = if generated {
                        KeyOrigin::DevelopmentGenerated
                    } else {
                        KeyOrigin::DevelopmentExisting
                    };
                    Ok((secret, origin))
                }
            },
        }
    }
}

/// Creates the data directory (mode 0700) if it is missing.
pub fn ensure_private_dir(dir: &Path) -> Result<(), ConfigError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|e| {
        ConfigError::Invalid(format!(
            "FHIRLEDGER_DATA_DIR: cannot create {}: {e}",
            dir.display()
        ))
    })
}

fn parse_database_url(text: &str) -> Result<DatabaseUrl, String> {
    DatabaseUrl::parse(text).map_err(|e| format!("FHIRLEDGER_DATABASE_URL {e}"))
}

/// Trusted issuers and where their key sets are: `ISSUER=JWKS` pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustedIssuers(pub Vec<(String, String)>);

fn parse_trusted_issuers(text: &str) -> Result<TrustedIssuers, String> {
    let pairs = text
        .split(',')
        .map(str::trim)
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (issuer, location) = pair.split_once('=').ok_or_else(|| {
                format!("FHIRLEDGER_TRUSTED_ISSUERS: '{pair}' is not ISSUER=JWKS (a file or URL)")
            })?;
            if issuer.trim().is_empty() || location.trim().is_empty() {
                return Err(format!(
                    "FHIRLEDGER_TRUSTED_ISSUERS: '{pair}' has an empty side"
                ));
            }
            Ok((issuer.trim().to_owned(), location.trim().to_owned()))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(TrustedIssuers(pairs))
}

/// A comma-separated list of words, blanks dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommaList(pub Vec<String>);

impl CommaList {
    fn parse(text: &str) -> Self {
        Self(
            text.split(',')
                .map(str::trim)
                .filter(|word| !word.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }
}

/// An endpoint of the identity provider. OAuth 2.0 requires TLS at the authorization and
/// token endpoints (RFC 6749 §3.1, §3.2); plain http is allowed on loopback only, for a
/// provider run beside the server in development.
fn parse_endpoint(text: &str, name: &str) -> Result<String, String> {
    let text = text.trim();
    let rest = text
        .strip_prefix("https://")
        .or_else(|| {
            text.strip_prefix("http://").filter(|rest| {
                ["localhost", "127.0.0.1", "[::1]"].iter().any(|host| {
                    rest.strip_prefix(host)
                        .is_some_and(|after| after.is_empty() || after.starts_with([':', '/']))
                })
            })
        })
        .ok_or_else(|| format!("{name} must be an https:// URL (http:// on loopback only)"))?;
    if rest.is_empty()
        || rest.starts_with('/')
        || rest.contains(char::is_whitespace)
        || rest.contains('#')
    {
        return Err(format!("{name} must be a URL with a host and no fragment"));
    }
    Ok(text.to_owned())
}

/// Exact browser origins (`scheme://host[:port]`, RFC 6454 §6.1), as browsers send them in
/// `Origin`: lowercase, without path or trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsOrigins(pub Vec<String>);

fn parse_cors_origins(text: &str) -> Result<CorsOrigins, String> {
    let origins = CommaList::parse(text)
        .0
        .into_iter()
        .map(|origin| {
            let origin = origin.trim_end_matches('/').to_ascii_lowercase();
            // A wildcard or `null` would let any page (or any sandboxed one) read what a
            // token it holds can read: origins are listed one by one.
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"))
                .ok_or_else(|| {
                    format!(
                        "FHIRLEDGER_CORS_ORIGINS: '{origin}' is not an http:// or https:// origin"
                    )
                })?;
            let valid_host = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
            if !valid_host || actix_web::http::Uri::try_from(origin.as_str()).is_err() {
                return Err(format!(
                    "FHIRLEDGER_CORS_ORIGINS: '{origin}' is not an exact origin \
                     (scheme://host[:port], no path, no wildcard)"
                ));
            }
            Ok(origin)
        })
        .collect::<Result<Vec<_>, String>>()?;
    if origins.is_empty() {
        return Err("FHIRLEDGER_CORS_ORIGINS is set but names no origin".into());
    }
    Ok(CorsOrigins(origins))
}

fn parse_local_issuer(text: &str) -> Result<bool, String> {
    parse_bool(text, "FHIRLEDGER_LOCAL_ISSUER")
}

fn parse_sealed(text: &str) -> Result<bool, String> {
    parse_bool(text, "FHIRLEDGER_SEALED")
}

fn parse_bool(text: &str, name: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(format!("{name} must be true or false, not '{text}'")),
    }
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.parse().map_err(|_| {
        "FHIRLEDGER_LISTEN must be an address with a port, such as 127.0.0.1:8080".to_owned()
    })
}

fn parse_base_url(text: &str) -> Result<String, String> {
    let trimmed = text.trim_end_matches('/');
    let rest = trimmed
        .strip_prefix("http://")
        .or_else(|| trimmed.strip_prefix("https://"))
        .ok_or("FHIRLEDGER_BASE_URL must start with http:// or https://")?;
    if rest.is_empty() || rest.contains(['?', '#', ' ']) {
        return Err(
            "FHIRLEDGER_BASE_URL must be a URL with a host and no query or fragment".into(),
        );
    }
    Ok(trimmed.to_owned())
}

fn parse_bounded<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    text: &str,
    name: &str,
    min: T,
    max: T,
) -> Result<T, String> {
    match text.parse::<T>() {
        Ok(value) if value >= min && value <= max => Ok(value),
        _ => Err(format!("{name} must be a whole number from {min} to {max}")),
    }
}

fn parse_origin(text: &str) -> Result<String, String> {
    if signed_note::is_key_name_valid(text) {
        Ok(text.to_owned())
    } else {
        Err("FHIRLEDGER_LEDGER_ORIGIN must be non-empty, without '+' or whitespace".into())
    }
}

fn parse_interval(text: &str) -> Result<u64, String> {
    parse_bounded(text, "FHIRLEDGER_LEDGER_INTERVAL_MS", 10, 60_000)
}

fn parse_export_retention(text: &str) -> Result<u64, String> {
    parse_bounded(text, "FHIRLEDGER_EXPORT_RETENTION_SECS", 60, 30 * 24 * 3600)
}

fn parse_batch_size(text: &str) -> Result<i64, String> {
    parse_bounded(text, "FHIRLEDGER_LEDGER_BATCH_SIZE", 1, 100_000)
}

fn parse_max_body(text: &str) -> Result<usize, String> {
    parse_bounded(text, "FHIRLEDGER_MAX_BODY_BYTES", 1024, 1024 * 1024 * 1024)
}

fn parse_pool_size(text: &str) -> Result<u32, String> {
    parse_bounded(text, "FHIRLEDGER_DB_POOL_SIZE", 1, 1000)
}

fn parse_auth_failures(text: &str) -> Result<u32, String> {
    parse_bounded(text, "FHIRLEDGER_AUTH_FAILURES_PER_MINUTE", 1, 1_000_000)
}

fn parse_workers(text: &str) -> Result<usize, String> {
    parse_bounded(text, "FHIRLEDGER_WORKERS", 1, 1024)
}

fn parse_shutdown_timeout(text: &str) -> Result<u64, String> {
    parse_bounded(text, "FHIRLEDGER_SHUTDOWN_TIMEOUT", 0, 3600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_values_name_their_variable() {
        assert!(
            parse_listen("nope")
                .unwrap_err()
                .contains("FHIRLEDGER_LISTEN")
        );
        assert!(
            parse_base_url("ftp://x")
                .unwrap_err()
                .contains("FHIRLEDGER_BASE_URL")
        );
        assert_eq!(
            parse_base_url("https://fhir.example.org/").unwrap(),
            "https://fhir.example.org"
        );
        assert!(
            parse_database_url("mysql://x")
                .unwrap_err()
                .contains("FHIRLEDGER_DATABASE_URL")
        );
        assert!(
            parse_max_body("12")
                .unwrap_err()
                .contains("FHIRLEDGER_MAX_BODY_BYTES")
        );
        assert!(
            parse_pool_size("0")
                .unwrap_err()
                .contains("FHIRLEDGER_DB_POOL_SIZE")
        );
        assert_eq!(parse_pool_size("8").unwrap(), 8);
    }

    #[test]
    fn cors_origins_are_exact() {
        assert_eq!(
            parse_cors_origins(" https://App.example.org/, http://localhost:3000 ").unwrap(),
            CorsOrigins(vec![
                "https://app.example.org".into(),
                "http://localhost:3000".into()
            ])
        );
        for bad in [
            "*",
            "null",
            "https://*.example.org",
            "https://a.org/app",
            "ftp://a.org",
            ",",
        ] {
            assert!(
                parse_cors_origins(bad)
                    .unwrap_err()
                    .contains("FHIRLEDGER_CORS_ORIGINS"),
                "{bad}"
            );
        }
    }

    /// `serve` settings from flags (and any `FHIRLEDGER_*` variable of the test process).
    fn serve_args(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        use clap::Parser as _;
        Cli::try_parse_from(std::iter::once("serve").chain(flags.iter().copied()))
            .map(|cli| cli.serve)
    }

    #[test]
    fn smart_endpoints_belong_to_a_trusted_issuer() {
        let token = "--smart-token-endpoint=https://idp.example.org/token";
        let issuer = "--trusted-issuers=https://idp.example.org=https://idp.example.org/certs";
        assert_eq!(
            serve_args(&[]).unwrap().smart_authorization().unwrap(),
            None
        );
        // Endpoints of an issuer the server does not trust would be a dead end.
        let error = serve_args(&[token])
            .unwrap()
            .smart_authorization()
            .unwrap_err();
        assert!(
            error.to_string().contains("FHIRLEDGER_TRUSTED_ISSUERS"),
            "{error}"
        );
        let error = serve_args(&["--smart-authorization-endpoint=https://idp.example.org/auth"])
            .unwrap()
            .smart_authorization()
            .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("FHIRLEDGER_SMART_TOKEN_ENDPOINT"),
            "{error}"
        );

        let smart = serve_args(&[token, issuer])
            .unwrap()
            .smart_authorization()
            .unwrap()
            .unwrap();
        assert_eq!(smart.issuer, "https://idp.example.org");
        assert_eq!(
            smart.jwks_uri.as_deref(),
            Some("https://idp.example.org/certs")
        );
        assert_eq!(smart.grant_types, vec!["client_credentials"]);

        let two = "--trusted-issuers=https://a.example=a.json,https://b.example=b.json";
        let error = serve_args(&[token, two])
            .unwrap()
            .smart_authorization()
            .unwrap_err();
        assert!(
            error.to_string().contains("FHIRLEDGER_SMART_ISSUER"),
            "{error}"
        );
        let smart = serve_args(&[token, two, "--smart-issuer=https://b.example"])
            .unwrap()
            .smart_authorization()
            .unwrap()
            .unwrap();
        // A key set read from a file has no URL to publish.
        assert_eq!(
            (smart.issuer.as_str(), smart.jwks_uri),
            ("https://b.example", None)
        );

        let error = serve_args(&[token, issuer, "--smart-capabilities=launch-standalone"])
            .unwrap()
            .smart_authorization()
            .unwrap_err();
        assert!(
            error.to_string().contains("FHIRLEDGER_SMART_CAPABILITIES"),
            "{error}"
        );
        assert!(serve_args(&["--smart-token-endpoint=http://idp.example.org/token"]).is_err());
    }

    #[test]
    fn endpoints_need_tls_off_loopback() {
        let name = "FHIRLEDGER_SMART_TOKEN_ENDPOINT";
        assert!(parse_endpoint("https://idp.example.org/token", name).is_ok());
        assert!(parse_endpoint("http://localhost:8081/token", name).is_ok());
        assert!(
            parse_endpoint("http://idp.example.org/token", name)
                .unwrap_err()
                .contains(name)
        );
        assert!(parse_endpoint("http://localhost.evil.org/token", name).is_err());
        assert!(parse_endpoint("https:///token", name).is_err());
    }
}
