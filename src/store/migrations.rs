//! Embedded migrations, one set per backend, run at start-up and by `fhirledger migrate`.

use diesel::connection::SimpleConnection as _;
use diesel_migrations::{EmbeddedMigrations, MigrationHarness as _, embed_migrations};

use super::database::DbConnection;
use super::error::StoreError;

const POSTGRES: EmbeddedMigrations = embed_migrations!("migrations/postgres");
const SQLITE: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

/// Arbitrary constant naming the advisory lock that serializes migrations when several
/// server processes start against one PostgreSQL database.
const MIGRATION_LOCK_KEY: i64 = 0x6668_6972_6c65_6467; // "fhirledg"

/// Applies every pending migration; returns how many were applied.
pub fn run_pending(conn: &mut DbConnection) -> Result<usize, StoreError> {
    let migration_error =
        |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
    match conn {
        DbConnection::Postgres(pg) => {
            pg.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
                .map_err(StoreError::classify)?;
            let applied = pg.run_pending_migrations(POSTGRES).map(|v| v.len());
            let unlocked =
                pg.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"));
            let applied = applied.map_err(migration_error)?;
            unlocked.map_err(StoreError::classify)?;
            Ok(applied)
        }
        DbConnection::Sqlite(sqlite) => sqlite
            .run_pending_migrations(SQLITE)
            .map(|v| v.len())
            .map_err(migration_error),
    }
}

/// Reverts every applied migration (used by the test that keeps `down.sql` honest).
pub fn revert_all(conn: &mut DbConnection) -> Result<usize, StoreError> {
    let migration_error =
        |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
    match conn {
        DbConnection::Postgres(pg) => pg.revert_all_migrations(POSTGRES).map(|v| v.len()),
        DbConnection::Sqlite(sqlite) => sqlite.revert_all_migrations(SQLITE).map(|v| v.len()),
    }
    .map_err(migration_error)
}

/// Reverts the most recent migration (tests check a `down.sql` against data in place).
pub fn revert_last(conn: &mut DbConnection) -> Result<(), StoreError> {
    let migration_error =
        |e: Box<dyn std::error::Error + Send + Sync>| StoreError::Migration(e.to_string());
    match conn {
        DbConnection::Postgres(pg) => pg.revert_last_migration(POSTGRES).map(|_| ()),
        DbConnection::Sqlite(sqlite) => sqlite.revert_last_migration(SQLITE).map(|_| ()),
    }
    .map_err(migration_error)
}
