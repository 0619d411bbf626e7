//! Which database and how to open it: the [`DatabaseUrl`] that names it, [`DbConnection`]
//! over PostgreSQL and SQLite (chosen at run time from the URL scheme), and [`establish`],
//! which opens one connection with the settings its backend needs.

use std::fmt;
use std::path::{Path, PathBuf};

use diesel::Connection;
use diesel::connection::SimpleConnection as _;
use diesel::pg::PgConnection;
use diesel::result::{ConnectionError, Error as DieselError};
use diesel::sqlite::SqliteConnection;

use super::dialect::{Backend, Dialect, SQLITE_CONNECTION_SETUP};
use super::error::StoreError;

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

impl DbConnection {
    /// The SQL dialect of this connection's backend.
    pub fn dialect(&self) -> Dialect {
        match self {
            Self::Postgres(_) => Dialect::Postgres,
            Self::Sqlite(_) => Dialect::Sqlite,
        }
    }
}

/// Opens one connection with the per-connection settings each backend needs (SQLite's:
/// [`SQLITE_CONNECTION_SETUP`]).
pub fn establish(url: &DatabaseUrl) -> Result<DbConnection, ConnectionError> {
    match url {
        DatabaseUrl::Postgres(url) => Ok(DbConnection::Postgres(PgConnection::establish(url)?)),
        DatabaseUrl::Sqlite(path) => {
            let path_text = path.to_str().ok_or_else(|| {
                ConnectionError::BadConnection("SQLite path is not valid UTF-8".into())
            })?;
            let mut conn = SqliteConnection::establish(path_text)?;
            conn.batch_execute(SQLITE_CONNECTION_SETUP)
                .map_err(ConnectionError::CouldntSetupConfiguration)?;
            Ok(DbConnection::Sqlite(conn))
        }
    }
}

/// Runs `work` in a transaction of `conn` (a savepoint inside an open one), keeping diesel's
/// error inside the store: the caller's error comes back as it was, and a failure of the
/// transaction itself (BEGIN, COMMIT, a savepoint, a rollback) as a [`StoreError`].
pub(super) fn in_transaction<T, E>(
    conn: &mut DbConnection,
    work: impl FnOnce(&mut DbConnection) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    enum Failure<E> {
        Work(E),
        Transaction(DieselError),
    }
    impl<E> From<DieselError> for Failure<E> {
        fn from(error: DieselError) -> Self {
            Self::Transaction(error)
        }
    }
    conn.transaction(|conn| work(conn).map_err(Failure::Work))
        .map_err(|failure| match failure {
            Failure::Work(error) => error,
            Failure::Transaction(error) => StoreError::classify(error).into(),
        })
}
