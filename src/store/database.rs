//! Which database and how to open it: the [`DatabaseUrl`] that names it, [`DbConnection`]
//! over PostgreSQL and SQLite (chosen at run time from the URL scheme), and [`establish`],
//! which opens one connection with the settings its backend needs.

use std::fmt;
use std::path::{Path, PathBuf};

use diesel::Connection;
use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::result::ConnectionError;
use diesel::sqlite::SqliteConnection;

/// A connection to either backend; diesel's query DSL works on it directly.
#[derive(diesel::MultiConnection)]
pub enum DbConnection {
    Postgres(PgConnection),
    Sqlite(SqliteConnection),
}

/// Evaluates `$body` with `$conn` bound to the backend's own connection (`&mut PgConnection`
/// or `&mut SqliteConnection`): the same statement, compiled once per backend. For the
/// statements every write runs: through [`DbConnection`], diesel renders a statement's SQL
/// again on each execution to find it in the statement cache and copies each bound value
/// (a version's whole ciphertext), about as much time as SQLite spends inserting the row.
macro_rules! on_backend {
    ($connection:expr, $conn:ident => $body:expr) => {
        match $connection {
            $crate::store::DbConnection::Postgres($conn) => $body,
            $crate::store::DbConnection::Sqlite($conn) => $body,
        }
    };
}
pub(crate) use on_backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// A validated database URL: `postgres://…`/`postgresql://…` or `sqlite://PATH`.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    Postgres(String),
    Sqlite(PathBuf),
}

// The URL may carry a password: never print it.
impl fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Postgres(_) => f.write_str("DatabaseUrl::Postgres(<redacted>)"),
            Self::Sqlite(path) => write!(f, "DatabaseUrl::Sqlite({})", path.display()),
        }
    }
}

impl DatabaseUrl {
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Ok(Self::Postgres(text.to_owned()))
        } else if let Some(path) = text.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(
                    "sqlite:// needs a file path, e.g. sqlite://./data/fhirledger.db".into(),
                );
            }
            Ok(Self::Sqlite(PathBuf::from(path)))
        } else {
            Err("must start with postgres://, postgresql:// or sqlite://".into())
        }
    }

    pub fn sqlite_file(path: &Path) -> Self {
        Self::Sqlite(path.to_owned())
    }

    pub fn backend(&self) -> Backend {
        match self {
            Self::Postgres(_) => Backend::Postgres,
            Self::Sqlite(_) => Backend::Sqlite,
        }
    }
}

/// Opens one connection with the per-connection settings each backend needs.
pub fn establish(url: &DatabaseUrl) -> Result<DbConnection, ConnectionError> {
    match url {
        DatabaseUrl::Postgres(url) => Ok(DbConnection::Postgres(PgConnection::establish(url)?)),
        DatabaseUrl::Sqlite(path) => {
            let path_text = path.to_str().ok_or_else(|| {
                ConnectionError::BadConnection("SQLite path is not valid UTF-8".into())
            })?;
            let mut conn = SqliteConnection::establish(path_text)?;
            // busy_timeout first: connections opened together then queue for the lock that
            // switching to WAL takes. WAL lets readers proceed during a write; synchronous=FULL
            // makes every commit durable before we answer. The index B-trees are keyed by
            // digests, so writes touch pages all over them: a 32 MiB page cache per connection
            // (SQLite's default is 2 MiB: a Bundle's inserts spilled dirty pages to the WAL
            // mid-transaction, writing the same page many times). No mmap: every ledgered read
            // commits an entry, and a connection that sees another's commit unmaps the whole
            // file at its next read and faults its pages in again (TLB shootdowns on every
            // core; measured: reads 6,988/s with a 256 MiB mmap, 8,351/s without). The
            // checkpointer thread copies the WAL back in the background (`spawn_checkpointer`);
            // the commit that takes the WAL past 64 MiB finishes the checkpoint and restarts it.
            conn.batch_execute(
                "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
                 PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
                 PRAGMA cache_size = -32768; \
                 PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 16384;",
            )
            .map_err(ConnectionError::CouldntSetupConfiguration)?;
            Ok(DbConnection::Sqlite(conn))
        }
    }
}
