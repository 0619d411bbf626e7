//! Every difference between the SQL this store runs on SQLite and on PostgreSQL, in one
//! place: the query modules ask the connection's [`Dialect`] for the text that differs, and
//! what differs in more than text is listed here with where it lives.
//!
//! Differences in the work done, not only in its text, each behind a function of its own
//! that says why each backend does it its way:
//! - opening a connection: SQLite's settings ([`SQLITE_CONNECTION_SETUP`], `database::establish`);
//! - writing: one SQLite connection for every write transaction, with group commit
//!   (`sqlite_writer`), pooled concurrent connections on PostgreSQL (`connection::build_pool`,
//!   [`Dialect::writes_through_one_connection`]);
//! - planner statistics refreshed while loading, PostgreSQL only (`statistics`);
//! - a resource's search index rows: `search::index_rows::insert_index`;
//! - a new resource's `seq`: `resources::insert_resource_row`;
//! - sequencing ledger entries: `ledger::assign_indexes`;
//! - migrations: one set per backend, PostgreSQL's under an advisory lock (`migrations`);
//! - a busy SQLite database is told apart by its error message (`error::StoreError::classify`);
//! - the first connection to a PostgreSQL server gives up after a timeout (`connection::probe`).
//!
//! Placeholders (`?`, `$n`) are diesel's to write: statements built at run time (`search::statement`)
//! bind through diesel and never spell one; the two statements that do are each one backend's
//! own (`ledger::assign_indexes`, [`Dialect::transaction_lock`]).

/// The SQL dialect of a connection's backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// The name [`crate::store::DatabaseUrl::backend`] has always given it.
pub type Backend = Dialect;

/// The SQL type of a value bound into a statement built at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamType {
    Text,
    BigInt,
    Double,
    Bytes,
}

/// Per-connection settings of SQLite (PostgreSQL's defaults serve as they are).
///
/// busy_timeout first: connections opened together then queue for the lock that switching to
/// WAL takes. WAL lets readers proceed during a write; synchronous=FULL makes every commit
/// durable before we answer. The index B-trees are keyed by digests, so writes touch pages
/// all over them: a 32 MiB page cache per connection (SQLite's default is 2 MiB: a Bundle's
/// inserts spilled dirty pages to the WAL mid-transaction, writing the same page many times).
/// No mmap: every ledgered read commits an entry, and a connection that sees another's commit
/// unmaps the whole file at its next read and faults its pages in again (TLB shootdowns on
/// every core; measured: reads 6,988/s with a 256 MiB mmap, 8,351/s without). The
/// checkpointer thread copies the WAL back in the background
/// (`sqlite_writer::spawn_checkpointer`); the commit that takes the WAL past 64 MiB finishes
/// the checkpoint and restarts it.
pub const SQLITE_CONNECTION_SETUP: &str = "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
     PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
     PRAGMA cache_size = -32768; \
     PRAGMA temp_store = MEMORY; PRAGMA wal_autocheckpoint = 16384;";

impl Dialect {
    /// Whether every write transaction of the process runs on one connection. SQLite has one
    /// writer at a time, so nothing is lost by it, and a connection that did not write last
    /// starts cold (see `sqlite_writer`); PostgreSQL writes concurrently on pooled connections.
    pub fn writes_through_one_connection(self) -> bool {
        matches!(self, Self::Sqlite)
    }

    /// Whether the process refreshes the planner's statistics while data is loaded (see
    /// `statistics`): PostgreSQL plans searches badly without them; SQLite plans these
    /// searches well without any.
    pub fn refreshes_planner_statistics(self) -> bool {
        matches!(self, Self::Postgres)
    }

    /// Starts a read-only transaction whose every query sees one state of the database:
    /// PostgreSQL `REPEATABLE READ` (one snapshot for the transaction); SQLite a deferred read
    /// transaction, whose snapshot in WAL mode is fixed at its first read.
    pub fn begin_read_snapshot(self) -> &'static str {
        match self {
            Self::Postgres => "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
            Self::Sqlite => "BEGIN DEFERRED",
        }
    }

    /// What follows a bound value of type `param`. PostgreSQL: a cast, which keeps it from
    /// guessing parameter types in expressions such as `COALESCE(…, $n)`; SQLite: nothing.
    pub fn param_cast(self, param: ParamType) -> &'static str {
        match (self, param) {
            (Self::Sqlite, _) => "",
            (Self::Postgres, ParamType::Text) => "::text",
            (Self::Postgres, ParamType::BigInt) => "::bigint",
            (Self::Postgres, ParamType::Double) => "::float8",
            (Self::Postgres, ParamType::Bytes) => "::bytea",
        }
    }

    /// Whether `r.presence` holds a bound byte string: the text before and after the bound
    /// value. PostgreSQL `position(… IN …)`, SQLite `instr(…, …)`; both 0 when absent, NULL
    /// when `r.presence` is.
    pub fn presence_contains(self) -> (&'static str, &'static str) {
        match self {
            Self::Postgres => ("COALESCE(position(", " IN r.presence), 0) > 0"),
            Self::Sqlite => ("COALESCE(instr(r.presence, ", "), 0) > 0"),
        }
    }

    /// Ends a multi-row INSERT that skips the rows already there. SQLite understands the same
    /// clause; its index writes use diesel's `insert_or_ignore_into` (`INSERT OR IGNORE`)
    /// instead, statements of fixed shape that stay prepared.
    pub fn ignore_conflicts(self) -> &'static str {
        " ON CONFLICT DO NOTHING"
    }

    /// A transaction-scoped lock on a key bound as its one parameter (BIGINT), which
    /// serializes writers of one key: PostgreSQL an advisory lock; SQLite none, as its write
    /// transaction already excludes every other writer.
    pub fn transaction_lock(self) -> Option<&'static str> {
        match self {
            Self::Postgres => Some("SELECT pg_advisory_xact_lock($1)"),
            Self::Sqlite => None,
        }
    }

    /// Tries a transaction-scoped lock on `key`, answering one row with the boolean column
    /// `locked` (PostgreSQL an advisory lock); `None` on SQLite, where the write transaction
    /// already holds the database's write lock, which excludes every other writer.
    pub fn try_transaction_lock(self, key: i64) -> Option<String> {
        match self {
            Self::Postgres => Some(format!("SELECT pg_try_advisory_xact_lock({key}) AS locked")),
            Self::Sqlite => None,
        }
    }
}
