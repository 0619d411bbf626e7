//! A resource's rows in the search index: the tables `search_hashes`, `search_dates` and
//! `search_numbers`, written when a version is stored and cleared before the next, and the
//! queries that rebuild them (string prefixes reindexed, presence digests moved into
//! `resources.presence`).

use diesel::prelude::*;
use diesel::sqlite::SqliteConnection;

use super::statement::{Bind, Sql, SqlBuilder};
use crate::crypto::blind_index::Digest;
use crate::fhir::document::VersionId;
use crate::store::database::{DbConnection, on_backend};
use crate::store::error::StoreError;
use crate::store::schema::{resources, search_dates, search_hashes, search_numbers, search_state};

/// Rows per multi-row INSERT (well under both backends' bound-parameter limits).
const INSERT_CHUNK: usize = 500;

/// The index rows of one resource's current version.
#[derive(Debug, Clone, Default)]
pub struct IndexRows {
    pub hashes: Vec<Digest>,
    /// Which parameters have a value, as digests: kept in the resource's own row
    /// (`resources.presence`), not in `search_hashes`. Each is shared by every resource of its
    /// type with that parameter, so as index rows they only ever answered `:missing`, which
    /// matches most of a type either way, while costing a B-tree insert per parameter and a
    /// page write per parameter and commit.
    pub presence: Vec<Digest>,
    pub dates: Vec<DateRow>,
    pub numbers: Vec<NumberRow>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DateRow {
    pub param: String,
    pub low: i64,
    pub high: i64,
    /// For a composite: the digest of its leading components' value on the same node.
    pub lead: Option<Digest>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberRow {
    pub param: String,
    pub value: f64,
    pub unit_system_code: Option<Digest>,
    pub unit_code: Option<Digest>,
    /// For a composite: the digest of its leading components' value on the same node.
    pub lead: Option<Digest>,
}

/// Removes the index rows of resource `seq` (before its new version's rows go in). Its
/// `presence` is written with the version's own row (`store::resources::advance`).
pub fn clear_index(conn: &mut DbConnection, seq: i64) -> Result<(), StoreError> {
    on_backend!(conn, conn => {
        diesel::delete(search_hashes::table.filter(search_hashes::resource_seq.eq(seq)))
            .execute(conn)
            .and_then(|_| {
                diesel::delete(search_dates::table.filter(search_dates::resource_seq.eq(seq)))
                    .execute(conn)
            })
            .and_then(|_| {
                diesel::delete(search_numbers::table.filter(search_numbers::resource_seq.eq(seq)))
                    .execute(conn)
            })
    })
    .map(|_| ())
    .map_err(StoreError::classify)
}

/// How far the index's string prefixes reach: `(prefix_chars, reindexed_through)`, the
/// longest prefix every resource is indexed with, and the `seq` up to which a rebuild to a
/// longer bound has got.
pub fn prefix_state(conn: &mut DbConnection) -> Result<(i32, i64), StoreError> {
    search_state::table
        .find(1)
        .select((search_state::prefix_chars, search_state::reindexed_through))
        .first(conn)
        .map_err(StoreError::classify)
}

/// Records how far the index's string prefixes reach (see [`prefix_state`]).
pub fn set_prefix_state(
    conn: &mut DbConnection,
    prefix_chars: i32,
    reindexed_through: i64,
) -> Result<(), StoreError> {
    diesel::update(search_state::table.find(1))
        .set((
            search_state::prefix_chars.eq(prefix_chars),
            search_state::reindexed_through.eq(reindexed_through),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Which index key built the index, and a rotation to another key under way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexKeyState {
    /// The id of the key every index row was written with; `None` until a server records it.
    pub built_with: Option<String>,
    /// While `fhirledger keys rotate-index` rebuilds the index: the new key's id.
    pub rekey_to: Option<String>,
    /// How far (by `resources.seq`) that rebuild has got.
    pub rekeyed_through: i64,
}

pub fn index_key_state(conn: &mut DbConnection) -> Result<IndexKeyState, StoreError> {
    let (built_with, rekey_to, rekeyed_through) = search_state::table
        .find(1)
        .select((
            search_state::index_key,
            search_state::rekey_to,
            search_state::rekeyed_through,
        ))
        .first(conn)
        .map_err(StoreError::classify)?;
    Ok(IndexKeyState {
        built_with,
        rekey_to,
        rekeyed_through,
    })
}

/// Records `key_id` as the key the index was built with, unless one is recorded already
/// (two servers starting at once: the first wins and the other sees its id).
pub fn adopt_index_key(conn: &mut DbConnection, key_id: &str) -> Result<(), StoreError> {
    diesel::update(
        search_state::table
            .find(1)
            .filter(search_state::index_key.is_null()),
    )
    .set(search_state::index_key.eq(key_id))
    .execute(conn)
    .map(|_| ())
    .map_err(StoreError::classify)
}

/// Starts (or, for the same key, continues) a rebuild of the index for the key `key_id`.
pub fn begin_rekey(conn: &mut DbConnection, key_id: &str) -> Result<(), StoreError> {
    diesel::update(
        search_state::table.find(1).filter(
            search_state::rekey_to
                .is_null()
                .or(search_state::rekey_to.ne(key_id)),
        ),
    )
    .set((
        search_state::rekey_to.eq(key_id),
        search_state::rekeyed_through.eq(0),
    ))
    .execute(conn)
    .map(|_| ())
    .map_err(StoreError::classify)
}

/// Records that a rebuild has reached `seq`.
pub fn set_rekeyed_through(conn: &mut DbConnection, seq: i64) -> Result<(), StoreError> {
    diesel::update(search_state::table.find(1))
        .set(search_state::rekeyed_through.eq(seq))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Ends a rebuild: the new key built the whole index, with full-length string prefixes.
pub fn finish_rekey(conn: &mut DbConnection, prefix_chars: i32) -> Result<(), StoreError> {
    diesel::update(search_state::table.find(1))
        .set((
            search_state::index_key.eq(search_state::rekey_to),
            search_state::rekey_to.eq(None::<String>),
            search_state::rekeyed_through.eq(0),
            search_state::prefix_chars.eq(prefix_chars),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Up to `limit` live resources `(type, presence digests)` with at least one presence
/// digest: what tells whether a key built the index of a database that never recorded it.
pub fn presence_sample(
    conn: &mut DbConnection,
    limit: i64,
) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let rows: Vec<(String, Option<Vec<u8>>)> = resources::table
        .filter(resources::deleted.eq(false))
        .filter(resources::presence.is_not_null())
        .select((resources::resource_type, resources::presence))
        .limit(limit)
        .load(conn)
        .map_err(StoreError::classify)?;
    Ok(rows
        .into_iter()
        .filter_map(|(resource_type, presence)| Some((resource_type, presence?)))
        .filter(|(_, presence)| !presence.is_empty())
        .collect())
}

/// Replaces a resource's presence digests (an index rebuilt for another key).
pub fn set_presence(
    conn: &mut DbConnection,
    seq: i64,
    presence: &[Digest],
) -> Result<(), StoreError> {
    diesel::update(resources::table.filter(resources::seq.eq(seq)))
        .set(resources::presence.eq(presence.concat()))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Live resources `(seq, type, id, current version)` after `seq`, in order, at most `limit`.
pub fn live_after(
    conn: &mut DbConnection,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, String, String, VersionId)>, StoreError> {
    let rows: Vec<(i64, String, String, i64)> = resources::table
        .filter(resources::seq.gt(after_seq))
        .filter(resources::deleted.eq(false))
        .order(resources::seq)
        .select((
            resources::seq,
            resources::resource_type,
            resources::id,
            resources::current_version,
        ))
        .limit(limit)
        .load(conn)
        .map_err(StoreError::classify)?;
    Ok(rows
        .into_iter()
        .map(|(seq, resource_type, id, version)| (seq, resource_type, id, version.into()))
        .collect())
}

/// Whether resource `seq` is live at `version` (no write has come since it was read).
pub fn is_current(
    conn: &mut DbConnection,
    seq: i64,
    version: VersionId,
) -> Result<bool, StoreError> {
    diesel::select(diesel::dsl::exists(
        resources::table
            .filter(resources::seq.eq(seq))
            .filter(resources::current_version.eq(version.get()))
            .filter(resources::deleted.eq(false)),
    ))
    .get_result(conn)
    .map_err(StoreError::classify)
}

/// Resources `(seq, type)` whose presence digests are still rows of `search_hashes`: stored
/// before `resources.presence` existed.
pub fn without_presence(
    conn: &mut DbConnection,
    limit: i64,
) -> Result<Vec<(i64, String)>, StoreError> {
    resources::table
        .filter(resources::presence.is_null())
        .filter(resources::deleted.eq(false))
        .select((resources::seq, resources::resource_type))
        .order(resources::seq)
        .limit(limit)
        .load(conn)
        .map_err(StoreError::classify)
}

/// Moves the presence digests of resource `seq` (those of `candidates` among its
/// `search_hashes` rows) into its row, unless another process has already done so.
pub fn move_presence(
    conn: &mut DbConnection,
    seq: i64,
    candidates: &[Digest],
) -> Result<(), StoreError> {
    let classify = StoreError::classify;
    let found: Vec<Vec<u8>> = search_hashes::table
        .filter(search_hashes::resource_seq.eq(seq))
        .filter(search_hashes::hash.eq_any(candidates.iter().map(|d| d.as_slice())))
        .select(search_hashes::hash)
        .load(conn)
        .map_err(classify)?;
    let updated = diesel::update(
        resources::table
            .filter(resources::seq.eq(seq))
            .filter(resources::presence.is_null()),
    )
    .set(resources::presence.eq(found.concat()))
    .execute(conn)
    .map_err(classify)?;
    if updated > 0 && !found.is_empty() {
        diesel::delete(
            search_hashes::table
                .filter(search_hashes::resource_seq.eq(seq))
                .filter(search_hashes::hash.eq_any(&found)),
        )
        .execute(conn)
        .map_err(classify)?;
    }
    Ok(())
}

/// Adds the index rows of resource `seq` (of `resource_type`); its presence digests go with
/// the resource's own row (`store::resources::insert_first`, `advance`).
///
/// Each backend writes them its own way, after what costs it most: SQLite parsing statements
/// under its one write lock, so statements of fixed shape that stay prepared
/// ([`insert_index_by_row`]); PostgreSQL round trips, so every table's rows in one statement
/// ([`insert_index_together`]).
pub fn insert_index(
    conn: &mut DbConnection,
    seq: i64,
    resource_type: &str,
    rows: &IndexRows,
) -> Result<(), StoreError> {
    match conn {
        DbConnection::Sqlite(sqlite) => {
            insert_index_by_row(sqlite, seq, resource_type, rows).map_err(StoreError::classify)
        }
        DbConnection::Postgres(_) => insert_index_together(conn, seq, resource_type, rows),
    }
}

/// Adds the index rows of many new resources, `(seq, resource_type, rows)` each: every
/// table's rows in multi-row INSERTs of [`INSERT_CHUNK`] rows, on both backends. A bulk
/// load's batch is large enough that a statement's parse is shared by hundreds of rows,
/// which neither backend's one-resource strategy above can do.
pub fn insert_index_many(
    conn: &mut DbConnection,
    resources: &[(i64, &str, &IndexRows)],
) -> Result<(), StoreError> {
    let hashes = resources.iter().flat_map(|(seq, _, rows)| {
        rows.hashes
            .iter()
            .map(|digest| vec![Bind::Bytes(digest.to_vec()), Bind::BigInt(*seq)])
    });
    let ignore_conflicts = conn.dialect().ignore_conflicts();
    insert_rows(
        conn,
        "search_hashes (hash, resource_seq)",
        ignore_conflicts,
        hashes,
    )?;
    let dates = resources.iter().flat_map(|(seq, resource_type, rows)| {
        rows.dates
            .iter()
            .map(|row| date_binds(*seq, resource_type, row))
    });
    insert_rows(conn, DATES_TARGET, "", dates)?;
    let numbers = resources.iter().flat_map(|(seq, resource_type, rows)| {
        rows.numbers
            .iter()
            .map(|row| number_binds(*seq, resource_type, row))
    });
    insert_rows(conn, NUMBERS_TARGET, "", numbers)
}

const DATES_TARGET: &str = "search_dates (resource_seq, resource_type, param, low, high, lead)";
const NUMBERS_TARGET: &str = "search_numbers (resource_seq, resource_type, param, value, \
                              unit_system_code, unit_code, lead)";

fn date_binds(seq: i64, resource_type: &str, row: &DateRow) -> Vec<Bind> {
    vec![
        Bind::BigInt(seq),
        Bind::Text(resource_type.to_owned()),
        Bind::Text(row.param.clone()),
        Bind::BigInt(row.low),
        Bind::BigInt(row.high),
        Bind::OptionalBytes(row.lead.map(|d| d.to_vec())),
    ]
}

fn number_binds(seq: i64, resource_type: &str, row: &NumberRow) -> Vec<Bind> {
    vec![
        Bind::BigInt(seq),
        Bind::Text(resource_type.to_owned()),
        Bind::Text(row.param.clone()),
        Bind::Double(row.value),
        Bind::OptionalBytes(row.unit_system_code.map(|d| d.to_vec())),
        Bind::OptionalBytes(row.unit_code.map(|d| d.to_vec())),
        Bind::OptionalBytes(row.lead.map(|d| d.to_vec())),
    ]
}

/// PostgreSQL: the rows of every index table through [`insert_rows_together`].
fn insert_index_together(
    conn: &mut DbConnection,
    seq: i64,
    resource_type: &str,
    rows: &IndexRows,
) -> Result<(), StoreError> {
    let hashes = rows
        .hashes
        .iter()
        .map(|digest| vec![Bind::Bytes(digest.to_vec()), Bind::BigInt(seq)]);
    let dates = rows
        .dates
        .iter()
        .map(|row| date_binds(seq, resource_type, row));
    let numbers = rows
        .numbers
        .iter()
        .map(|row| number_binds(seq, resource_type, row));
    let ignore_conflicts = conn.dialect().ignore_conflicts();
    insert_rows_together(
        conn,
        [
            RowsFor {
                target: "search_hashes (hash, resource_seq)",
                suffix: ignore_conflicts,
                rows: hashes.collect(),
            },
            RowsFor {
                target: DATES_TARGET,
                suffix: "",
                rows: dates.collect(),
            },
            RowsFor {
                target: NUMBERS_TARGET,
                suffix: "",
                rows: numbers.collect(),
            },
        ],
    )
}

/// Rows for one table: `INSERT INTO {target} VALUES (…), (…){suffix}`.
struct RowsFor {
    target: &'static str,
    suffix: &'static str,
    rows: Vec<Vec<Bind>>,
}

/// PostgreSQL: the rows of several tables in one statement, one data-modifying `WITH` part
/// per table but the last, so one round trip and one parse instead of one per table; each
/// table through [`insert_rows`] when there are too many rows for one statement.
fn insert_rows_together(conn: &mut DbConnection, tables: [RowsFor; 3]) -> Result<(), StoreError> {
    let tables: Vec<RowsFor> = tables.into_iter().filter(|t| !t.rows.is_empty()).collect();
    if tables.iter().any(|t| t.rows.len() > INSERT_CHUNK) {
        for table in tables {
            insert_rows(conn, table.target, table.suffix, table.rows.into_iter())?;
        }
        return Ok(());
    }
    let count = tables.len();
    let mut sql = SqlBuilder::for_connection(conn).start("");
    for (i, table) in tables.into_iter().enumerate() {
        let last = i + 1 == count;
        if !last {
            sql.push(&format!("{} w{i} AS (", if i == 0 { "WITH" } else { "," }));
        } else if i > 0 {
            sql.push(" ");
        }
        sql.push(&format!("INSERT INTO {} VALUES ", table.target));
        push_rows(&mut sql, table.rows);
        sql.push(table.suffix);
        if !last {
            sql.push(")");
        }
    }
    if count > 0 {
        sql.execute(conn)?;
    }
    Ok(())
}

/// SQLite: digests through multi-row INSERTs of 16, 4 and 1 rows, dates and numbers one
/// INSERT per row. Every statement here has a fixed shape, so diesel keeps it prepared (SQL
/// text given to `sql_query` would be parsed again on every execution): parsing, not
/// SQLite's own B-tree work, was the largest cost of these rows under the database's one write
/// lock, and multi-row statements of each resource's own size could never be reused.
fn insert_index_by_row(
    conn: &mut SqliteConnection,
    seq: i64,
    resource_type: &str,
    rows: &IndexRows,
) -> QueryResult<()> {
    let mut rest = rows.hashes.as_slice();
    while let Some((chunk, tail)) = rest.split_first_chunk::<16>() {
        insert_digests(conn, seq, chunk)?;
        rest = tail;
    }
    while let Some((chunk, tail)) = rest.split_first_chunk::<4>() {
        insert_digests(conn, seq, chunk)?;
        rest = tail;
    }
    for digest in rest {
        insert_digests(conn, seq, std::array::from_ref(digest))?;
    }
    for row in &rows.dates {
        diesel::insert_into(search_dates::table)
            .values((
                search_dates::resource_seq.eq(seq),
                search_dates::resource_type.eq(resource_type),
                search_dates::param.eq(&row.param),
                search_dates::low.eq(row.low),
                search_dates::high.eq(row.high),
                search_dates::lead.eq(row.lead.as_ref().map(|d| d.as_slice())),
            ))
            .execute(conn)?;
    }
    for row in &rows.numbers {
        diesel::insert_into(search_numbers::table)
            .values((
                search_numbers::resource_seq.eq(seq),
                search_numbers::resource_type.eq(resource_type),
                search_numbers::param.eq(&row.param),
                search_numbers::value.eq(row.value),
                search_numbers::unit_system_code
                    .eq(row.unit_system_code.as_ref().map(|d| d.as_slice())),
                search_numbers::unit_code.eq(row.unit_code.as_ref().map(|d| d.as_slice())),
                search_numbers::lead.eq(row.lead.as_ref().map(|d| d.as_slice())),
            ))
            .execute(conn)?;
    }
    Ok(())
}

/// SQLite: `N` digests of resource `seq` in one statement, prepared once per `N`.
fn insert_digests<const N: usize>(
    conn: &mut SqliteConnection,
    seq: i64,
    digests: &[Digest; N],
) -> QueryResult<usize> {
    // Owned values: a statement's cache key is its type, which must be 'static.
    let rows = digests.each_ref().map(|digest| {
        (
            search_hashes::hash.eq(digest.to_vec()),
            search_hashes::resource_seq.eq(seq),
        )
    });
    diesel::insert_or_ignore_into(search_hashes::table)
        .values(rows)
        .execute(conn)
}

/// Multi-row `INSERT INTO {target} VALUES (…), (…){suffix}`, [`INSERT_CHUNK`] rows per
/// statement.
fn insert_rows(
    conn: &mut DbConnection,
    target: &str,
    suffix: &str,
    rows: impl Iterator<Item = Vec<Bind>>,
) -> Result<(), StoreError> {
    let backend = SqlBuilder::for_connection(conn);
    let mut rows = rows.peekable();
    while rows.peek().is_some() {
        let mut sql = backend.start(&format!("INSERT INTO {target} VALUES "));
        push_rows(&mut sql, rows.by_ref().take(INSERT_CHUNK));
        sql.push(suffix);
        sql.execute(conn)?;
    }
    Ok(())
}

/// `(…), (…)`: each row's values bound.
fn push_rows(sql: &mut Sql, rows: impl IntoIterator<Item = Vec<Bind>>) {
    for (i, row) in rows.into_iter().enumerate() {
        sql.push(if i == 0 { "(" } else { ", (" });
        sql.bind_list(row);
        sql.push(")");
    }
}
