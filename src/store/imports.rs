//! The progress of bulk imports: how many lines of each source (named by the SHA-256 of its
//! content) have been loaded, recorded in the transaction of the batch that loaded them.

use diesel::prelude::*;

use super::database::DbConnection;
use super::error::StoreError;
use super::schema::import_progress;

/// How many lines of `source` earlier imports loaded (0 for a source never seen).
pub fn lines_done(conn: &mut DbConnection, source: &str) -> Result<u64, StoreError> {
    let done: Option<i64> = import_progress::table
        .find(source)
        .select(import_progress::lines_done)
        .first(conn)
        .optional()
        .map_err(StoreError::classify)?;
    Ok(done.map_or(0, |lines| u64::try_from(lines).unwrap_or(0)))
}

/// Records that the first `lines_done` lines of `source` are loaded; called in the
/// transaction that loads the last of them.
pub fn record_progress(
    conn: &mut DbConnection,
    source: &str,
    lines_done: u64,
    at_micros: i64,
) -> Result<(), StoreError> {
    let lines = i64::try_from(lines_done)
        .map_err(|_| StoreError::Corrupt(format!("{lines_done} lines do not fit the table")))?;
    let updated = diesel::update(import_progress::table.find(source))
        .set((
            import_progress::lines_done.eq(lines),
            import_progress::updated_at.eq(at_micros),
        ))
        .execute(conn)
        .map_err(StoreError::classify)?;
    if updated == 0 {
        diesel::insert_into(import_progress::table)
            .values((
                import_progress::source.eq(source),
                import_progress::lines_done.eq(lines),
                import_progress::updated_at.eq(at_micros),
            ))
            .execute(conn)
            .map_err(StoreError::classify)?;
    }
    Ok(())
}
