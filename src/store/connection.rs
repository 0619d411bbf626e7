//! The database as the services use it: [`DbPool`], an r2d2 pool of connections for reads
//! and, on SQLite, the one connection writes go through ([`super::sqlite_writer`]); and
//! [`read_snapshot`], one consistent view for checks that span several queries.

use std::sync::Arc;
use std::time::Duration;

use diesel::RunQueryDsl as _;
use diesel::connection::SimpleConnection as _;
use diesel::r2d2;
use diesel::result::ConnectionError;

use super::database::{in_transaction, on_backend};
use super::sqlite_writer::SqliteWriter;
use super::statistics::StatisticsRefresh;

// Also reachable here, as they were before they had modules of their own
// (`store::connection::establish` is how tools and tests open one connection).
pub use super::database::{DatabaseUrl, DbConnection, establish};
pub use super::dialect::Backend;
pub use super::error::StoreError;

pub type PooledConnection = r2d2::PooledConnection<ConnectionManager>;

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

/// Runs `work` inside one read-only transaction, so that every query it makes sees the same
/// state of the database however many statements it takes, while writers go on: PostgreSQL
/// `REPEATABLE READ` (one snapshot for the transaction); SQLite a deferred read transaction,
/// whose snapshot in WAL mode is fixed at its first read. For checks that compare tables with
/// each other (`fhirledger audit`).
pub fn read_snapshot<T>(
    conn: &mut DbConnection,
    work: impl FnOnce(&mut DbConnection) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let begin = conn.dialect().begin_read_snapshot();
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
    /// For connections of their own ([`DbPool::dedicated`]).
    url: DatabaseUrl,
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
    let dialect = url.backend();
    let writer = dialect
        .writes_through_one_connection()
        .then(|| Arc::new(SqliteWriter::new(url.clone())));
    if let Some(writer) = &writer {
        super::sqlite_writer::spawn_checkpointer(writer);
    }
    let statistics = dialect.refreshes_planner_statistics().then(Arc::default);
    Ok(DbPool {
        readers,
        url: url.clone(),
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
    /// A connection outside the pool, for background work that must not queue behind
    /// requests for a pooled one (submitting checkpoints to witnesses).
    pub fn dedicated(&self) -> Result<DbConnection, StoreError> {
        establish(&self.url).map_err(|e| StoreError::Unavailable(e.to_string()))
    }

    /// Runs `work` on the connection kept in `slot`, opening one of its own on first use and
    /// again after a failure: for background work that must not queue for pooled connections
    /// behind requests (witnessing rounds, the Subscription notifier).
    pub fn on_own_connection<T, E: From<StoreError>>(
        &self,
        slot: &parking_lot::Mutex<Option<DbConnection>>,
        work: impl FnOnce(&mut DbConnection) -> Result<T, E>,
    ) -> Result<T, E> {
        let mut slot = slot.lock();
        let conn = match slot.as_mut() {
            Some(conn) => conn,
            None => slot.insert(self.dedicated()?),
        };
        let result = work(conn);
        if result.is_err() {
            *slot = None;
        }
        result
    }

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
            let pool = self.clone();
            statistics.spawn_refresh(move || pool.get());
        }
    }

    /// Refreshes the planner's statistics now and waits for it (PostgreSQL; nothing on
    /// SQLite): a bulk load ends with it, so that the searches made right after it (an
    /// export's pages above all) are planned on what was loaded. Measured after importing
    /// 100,620 resources, whose last 35,000 the doubling schedule had not analyzed: an
    /// export's page query took 620 ms instead of 29 ms.
    pub fn refresh_statistics(&self) -> Result<(), StoreError> {
        let mut conn = self.get()?;
        super::statistics::analyze(&mut conn)
    }

    /// Whether writes queue for one writer connection (SQLite): a connection of one's own
    /// would wait for the database's write lock behind it instead.
    pub fn has_one_writer(&self) -> bool {
        self.writer.is_some()
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
        E: From<StoreError>,
    {
        match &self.writer {
            Some(writer) => writer.write(work),
            None => {
                let mut conn = self.get()?;
                in_transaction(&mut conn, work)
            }
        }
    }
}
