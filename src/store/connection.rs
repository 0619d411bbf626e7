//! Database connections: one [`DbConnection`] type over PostgreSQL and SQLite, chosen at run
//! time from the URL scheme, and an r2d2 pool of them. Dialect differences are fenced here.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::r2d2;
use diesel::result::{ConnectionError, DatabaseErrorKind, Error as DieselError};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, RunQueryDsl as _};

use super::sqlite_writer::SqliteWriter;
use super::statistics::StatisticsRefresh;

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

pub type PooledConnection = r2d2::PooledConnection<ConnectionManager>;

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

/// Store failures, classified so the API can tell "try again later" (503) from a bug (500)
/// and a lost race (retry or 409).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("unique constraint violated")]
    UniqueViolation,
    #[error("database error: {0}")]
    Database(#[from] DieselError),
    #[error("migration failed: {0}")]
    Migration(String),
    /// Stored data that cannot be read back as it was written (a damaged row).
    #[error("stored data is damaged: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Maps a diesel error, keeping the kinds callers act upon.
    pub fn classify(error: DieselError) -> Self {
        match error {
            DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => {
                Self::UniqueViolation
            }
            DieselError::DatabaseError(DatabaseErrorKind::ClosedConnection, info) => {
                Self::Unavailable(info.message().to_owned())
            }
            DieselError::DatabaseError(DatabaseErrorKind::Unknown, ref info)
                if is_sqlite_busy(info.message()) =>
            {
                Self::Unavailable(info.message().to_owned())
            }
            other => Self::Database(other),
        }
    }
}

fn is_sqlite_busy(message: &str) -> bool {
    message.contains("database is locked") || message.contains("database is busy")
}

impl From<r2d2::PoolError> for StoreError {
    fn from(error: r2d2::PoolError) -> Self {
        Self::Unavailable(error.to_string())
    }
}

/// r2d2 manager that opens the configured backend (diesel's generic manager would try every
/// backend in turn, and SQLite happily creates a file named after a PostgreSQL URL).
#[derive(Debug, Clone)]
pub struct ConnectionManager {
    url: DatabaseUrl,
}

impl ConnectionManager {
    pub fn new(url: DatabaseUrl) -> Self {
        Self { url }
    }
}

impl r2d2::ManageConnection for ConnectionManager {
    type Connection = DbConnection;
    type Error = ConnectionError;

    fn connect(&self) -> Result<DbConnection, ConnectionError> {
        establish(&self.url)
    }

    fn is_valid(&self, conn: &mut DbConnection) -> Result<(), ConnectionError> {
        diesel::sql_query("SELECT 1")
            .execute(conn)
            .map(|_| ())
            .map_err(ConnectionError::CouldntSetupConfiguration)
    }

    fn has_broken(&self, _conn: &mut DbConnection) -> bool {
        false
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

/// Runs `work` inside one read-only transaction, so that every query it makes sees the same
/// state of the database however many statements it takes, while writers go on: PostgreSQL
/// `REPEATABLE READ` (one snapshot for the transaction); SQLite a deferred read transaction,
/// whose snapshot in WAL mode is fixed at its first read. For checks that compare tables with
/// each other (`fhirledger audit`).
pub fn read_snapshot<T>(
    conn: &mut DbConnection,
    work: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let begin = match conn {
        DbConnection::Postgres(_) => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
        DbConnection::Sqlite(_) => "BEGIN DEFERRED",
    };
    on_backend!(conn, c => c.batch_execute(begin)).map_err(StoreError::classify)?;
    let result = work(conn);
    // Nothing was written: ending the transaction either way releases the snapshot.
    let ended = on_backend!(conn, c => c.batch_execute("ROLLBACK")).map_err(StoreError::classify);
    let value = result?;
    ended?;
    Ok(value)
}

/// The database as the services use it: pooled connections for reads and, for writes on
/// SQLite, the one connection every write transaction of this process runs on. Cloning is
/// cheap (handles).
#[derive(Clone)]
pub struct DbPool {
    readers: r2d2::Pool<ConnectionManager>,
    /// SQLite only; PostgreSQL writes through pooled connections, concurrently.
    writer: Option<Arc<SqliteWriter>>,
    /// PostgreSQL only: when to refresh the planner's statistics.
    statistics: Option<Arc<StatisticsRefresh>>,
}

pub fn build_pool(url: &DatabaseUrl, max_size: u32) -> Result<DbPool, StoreError> {
    if let DatabaseUrl::Sqlite(path) = url
        && let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|e| {
            StoreError::Unavailable(format!("cannot create {}: {e}", parent.display()))
        })?;
    }
    probe(url)?;
    let readers = r2d2::Pool::builder()
        .max_size(max_size)
        .connection_timeout(Duration::from_secs(10))
        .build(ConnectionManager::new(url.clone()))
        .map_err(StoreError::from)?;
    let writer =
        matches!(url, DatabaseUrl::Sqlite(_)).then(|| Arc::new(SqliteWriter::new(url.clone())));
    if let Some(writer) = &writer {
        super::sqlite_writer::spawn_checkpointer(writer);
    }
    let statistics = matches!(url, DatabaseUrl::Postgres(_)).then(Arc::default);
    Ok(DbPool {
        readers,
        writer,
        statistics,
    })
}

/// Seconds the first connection of a pool may take: a server that does not answer by then
/// stops start-up rather than leaving it hanging on the operating system's TCP timeout.
const PROBE_CONNECT_TIMEOUT_SECONDS: u32 = 10;

/// Opens and drops one connection before the pool is built. A wrong user, password, database
/// or host is then one clear error; without it r2d2 logs every failed attempt of every pooled
/// connection (dozens of lines) for its whole connection timeout before giving up.
fn probe(url: &DatabaseUrl) -> Result<(), StoreError> {
    let probe_url = match url {
        // libpq's connect_timeout, unless the URL sets its own.
        DatabaseUrl::Postgres(text) if !text.contains("connect_timeout=") => {
            let separator = if text.contains('?') { '&' } else { '?' };
            DatabaseUrl::Postgres(format!(
                "{text}{separator}connect_timeout={PROBE_CONNECT_TIMEOUT_SECONDS}"
            ))
        }
        other => other.clone(),
    };
    establish(&probe_url)
        .map(drop)
        .map_err(|e| StoreError::Unavailable(format!("cannot connect: {}", e.to_string().trim())))
}

impl DbPool {
    /// A pooled connection, for reading.
    pub fn get(&self) -> Result<PooledConnection, StoreError> {
        self.readers.get().map_err(|error| {
            if let Some(metrics) = crate::metrics::metrics() {
                metrics.pool_timeouts.inc();
            }
            StoreError::from(error)
        })
    }

    /// Whether the database answers a trivial query on a pooled connection (`/readyz`).
    pub fn ping(&self) -> Result<(), StoreError> {
        use diesel::RunQueryDsl as _;
        diesel::sql_query("SELECT 1")
            .execute(&mut *self.get()?)
            .map(drop)
            .map_err(StoreError::classify)
    }

    /// The pool's connections: `(open, idle)`.
    pub fn usage(&self) -> (u32, u32) {
        let state = self.readers.state();
        (state.connections, state.idle_connections)
    }

    /// Counts resources written (created, updated, deleted), so that the planner's
    /// statistics are refreshed while a database is loaded (see [`super::statistics`]).
    pub fn note_resources_written(&self, count: u64) {
        if let Some(statistics) = &self.statistics
            && statistics.note_written(count)
        {
            statistics.spawn_refresh(self.clone());
        }
    }

    /// Whether the database is local (SQLite) and a pooled connection is free now: a short
    /// read may then run on the calling thread without waiting for anything.
    pub fn local_reader_idle(&self) -> bool {
        self.writer.is_some() && self.readers.state().idle_connections > 0
    }

    /// Runs `work` in a transaction that writes, committed before this returns `Ok`. On
    /// SQLite it runs on the process's one writer connection, possibly sharing its commit with
    /// the writes queued behind it (see [`super::sqlite_writer`]).
    pub fn write<T, E>(&self, work: impl FnOnce(&mut DbConnection) -> Result<T, E>) -> Result<T, E>
    where
        E: From<DieselError> + From<StoreError>,
    {
        match &self.writer {
            Some(writer) => writer.write(work),
            None => {
                let mut conn = self.get()?;
                (*conn).transaction(work)
            }
        }
    }
}
