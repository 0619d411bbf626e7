//! The search index and the SQL of a search. Callers hand in digests and ranges already
//! computed: nothing here ever sees a plaintext value.
//!
//! - [`index_rows`]: the index tables (`search_hashes`, `search_dates`, `search_numbers`) and
//!   the presence digests of `resources`: writing, clearing and rebuilding a resource's rows;
//! - [`conditions`]: a search as data: its condition tree, sort keys and paging position;
//! - [`sql`]: the SQL of a search, and running it;
//! - [`statement`]: statements built at run time, with their bound values, kept prepared.

mod conditions;
mod index_rows;
mod sql;
mod statement;

use diesel::prelude::*;
use diesel::sql_types::BigInt;

use super::database::{DbConnection, on_backend};
use super::error::StoreError;

pub use conditions::{
    Condition, MAX_SORT_KEYS, NumberTest, Position, RangeOp, RangeTest, SearchSql, SortBy, SortKey,
    SortValue, UnitMatch,
};
pub use index_rows::{
    DateRow, IndexKeyState, IndexRows, NumberRow, adopt_index_key, begin_rekey, clear_index,
    finish_rekey, index_key_state, insert_index, insert_index_many, is_current, live_after,
    move_presence, prefix_state, presence_sample, set_prefix_state, set_presence,
    set_rekeyed_through, without_presence,
};
pub use sql::{MatchedRow, count, holders_of, search};

/// Takes a transaction-scoped lock on `key`, so that conditional writes with the same
/// criteria run one after the other (see [`Dialect::transaction_lock`]).
///
/// [`Dialect::transaction_lock`]: super::dialect::Dialect::transaction_lock
pub fn lock_condition(conn: &mut DbConnection, key: i64) -> Result<(), StoreError> {
    if let Some(lock) = conn.dialect().transaction_lock() {
        on_backend!(conn, conn => diesel::sql_query(lock).bind::<BigInt, _>(key).execute(conn))
            .map_err(StoreError::classify)?;
    }
    Ok(())
}
