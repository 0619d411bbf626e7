//! The search index tables (`search_hashes`, `search_dates`, `search_numbers`) and the SQL
//! of a search. Callers hand in digests and ranges already computed: this module never
//! sees a plaintext value.
//!
//! Searches are built as SQL text with bound parameters (the number of conditions varies
//! per request); the only text spliced into SQL is produced here, never taken from a
//! request.

use diesel::backend::Backend as DieselBackend;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Binary, Double, HasSqlType, Nullable, Text};
use diesel::sqlite::{Sqlite, SqliteConnection};

use super::database::{DbConnection, on_backend};
use super::error::StoreError;
use super::schema::{resources, search_dates, search_hashes, search_numbers, search_state};
use crate::crypto::blind_index::Digest;

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

/// Live resources `(seq, type, id, current version)` after `seq`, in order, at most `limit`.
pub fn live_after(
    conn: &mut DbConnection,
    after_seq: i64,
    limit: i64,
) -> Result<Vec<(i64, String, String, i64)>, StoreError> {
    resources::table
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
        .map_err(StoreError::classify)
}

/// Whether resource `seq` is live at `version` (no write has come since it was read).
pub fn is_current(conn: &mut DbConnection, seq: i64, version: i64) -> Result<bool, StoreError> {
    diesel::select(diesel::dsl::exists(
        resources::table
            .filter(resources::seq.eq(seq))
            .filter(resources::current_version.eq(version))
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
pub fn insert_index(
    conn: &mut DbConnection,
    seq: i64,
    resource_type: &str,
    rows: &IndexRows,
) -> Result<(), StoreError> {
    if let DbConnection::Sqlite(sqlite) = conn {
        return insert_index_by_row(sqlite, seq, resource_type, rows).map_err(StoreError::classify);
    }
    let hashes = rows
        .hashes
        .iter()
        .map(|digest| vec![Bind::Bytes(digest.to_vec()), Bind::BigInt(seq)]);
    let dates = rows.dates.iter().map(|row| {
        vec![
            Bind::BigInt(seq),
            Bind::Text(resource_type.to_owned()),
            Bind::Text(row.param.clone()),
            Bind::BigInt(row.low),
            Bind::BigInt(row.high),
            Bind::OptionalBytes(row.lead.map(|d| d.to_vec())),
        ]
    });
    let numbers = rows.numbers.iter().map(|row| {
        vec![
            Bind::BigInt(seq),
            Bind::Text(resource_type.to_owned()),
            Bind::Text(row.param.clone()),
            Bind::Double(row.value),
            Bind::OptionalBytes(row.unit_system_code.map(|d| d.to_vec())),
            Bind::OptionalBytes(row.unit_code.map(|d| d.to_vec())),
            Bind::OptionalBytes(row.lead.map(|d| d.to_vec())),
        ]
    });
    insert_rows_together(
        conn,
        [
            RowsFor {
                target: "search_hashes (hash, resource_seq)",
                suffix: " ON CONFLICT DO NOTHING",
                rows: hashes.collect(),
            },
            RowsFor {
                target: "search_dates (resource_seq, resource_type, param, low, high, lead)",
                suffix: "",
                rows: dates.collect(),
            },
            RowsFor {
                target: "search_numbers (resource_seq, resource_type, param, value, \
                         unit_system_code, unit_code, lead)",
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

/// Takes a transaction-scoped lock on `key`, so that conditional writes with the same
/// criteria run one after the other (PostgreSQL advisory lock; SQLite's write transaction
/// already excludes every other writer).
pub fn lock_condition(conn: &mut DbConnection, key: i64) -> Result<(), StoreError> {
    if let DbConnection::Postgres(pg) = conn {
        diesel::sql_query("SELECT pg_advisory_xact_lock($1)")
            .bind::<BigInt, _>(key)
            .execute(pg)
            .map_err(StoreError::classify)?;
    }
    Ok(())
}

/// How a stored range relates to a searched one (search.html#prefix). For dates both are
/// ranges; for numbers the stored value is a point (`low == high`) and the searched range
/// is the implicit precision range of the search value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOp {
    Eq,
    Ne,
    Gt,
    Lt,
    Ge,
    Le,
    StartsAfter,
    EndsBefore,
    /// Approximately: overlapping the searched range (already widened by the caller).
    Approximately,
}

/// One comparison of a stored value with a searched one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RangeTest<T> {
    pub op: RangeOp,
    /// The searched range, `[low, high)`.
    pub low: T,
    pub high: T,
}

/// A condition a resource must satisfy. A search is the conjunction of its conditions.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// The resource has at least one of these digests.
    HasAny(Vec<Digest>),
    /// The resource has none of these digests.
    HasNone(Vec<Digest>),
    /// The resource has a value for the parameter of one of these presence digests.
    HasParam(Vec<Digest>),
    /// The resource has a value for the parameter of none of these presence digests.
    LacksParam(Vec<Digest>),
    /// A date of `param` passes any of the tests; with `lead`, a date whose row carries one
    /// of those digests (a composite's leading components on the same node).
    Date {
        param: String,
        lead: Option<Vec<Digest>>,
        tests: Vec<RangeTest<i64>>,
    },
    /// A number or quantity of `param` passes any of the tests (with the unit, if given);
    /// `lead` as for dates.
    Number {
        param: String,
        lead: Option<Vec<Digest>>,
        tests: Vec<NumberTest>,
    },
    LastUpdated(Vec<RangeTest<i64>>),
    /// The logical id is one of these.
    Id(Vec<String>),
    /// Any of the conditions holds.
    AnyOf(Vec<Condition>),
    /// Matches nothing (e.g. a chain whose target search found nothing).
    Nothing,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NumberTest {
    pub range: RangeTest<f64>,
    /// The exact value written in the search (for gt/lt/ge/le).
    pub value: f64,
    pub unit: Option<UnitMatch>,
}

/// The searched unit, as its digest on each searched type (units are hashed per type).
#[derive(Debug, Clone, PartialEq)]
pub enum UnitMatch {
    SystemCode(Vec<Digest>),
    Code(Vec<Digest>),
}

/// What results are ordered by.
#[derive(Debug, Clone, PartialEq)]
pub enum SortKey {
    LastUpdated,
    Id,
    /// Earliest start (ascending) or latest end (descending) of a date parameter.
    Date(String),
    /// Smallest (ascending) or largest (descending) value of a number/quantity parameter.
    Number(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct SortBy {
    pub key: SortKey,
    pub descending: bool,
}

/// A value of a sort key, as carried by a paging cursor.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum SortValue {
    Int(i64),
    Float(f64),
    Text(String),
}

/// A position in a result list: the sort values and `seq` of the last row of a page.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Position {
    pub values: Vec<SortValue>,
    pub seq: i64,
}

/// One search as the database runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct SearchSql {
    /// Resource types searched; empty means every type.
    pub resource_types: Vec<String>,
    pub conditions: Vec<Condition>,
    pub sort: Vec<SortBy>,
    /// Only rows after this position (before it, when `backward`).
    pub after: Option<Position>,
    /// Walk the order in reverse (for `previous` pages); rows come back reversed.
    pub backward: bool,
}

/// A current version that matched, with its sealed content.
#[derive(Debug, Clone)]
pub struct MatchedRow {
    pub seq: i64,
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub last_updated: i64,
    pub method: String,
    pub key_id: Option<String>,
    pub wrapped_key: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
    pub ciphertext: Option<Vec<u8>>,
    pub position: Position,
}

#[derive(QueryableByName)]
struct MatchedSqlRow {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    resource_type: String,
    #[diesel(sql_type = Text)]
    id: String,
    #[diesel(sql_type = BigInt)]
    version_id: i64,
    #[diesel(sql_type = BigInt)]
    last_updated: i64,
    #[diesel(sql_type = Text)]
    method: String,
    #[diesel(sql_type = Nullable<Text>)]
    key_id: Option<String>,
    #[diesel(sql_type = Nullable<Binary>)]
    wrapped_key: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Binary>)]
    nonce: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<Binary>)]
    ciphertext: Option<Vec<u8>>,
    #[diesel(sql_type = Nullable<BigInt>)]
    sort_int_0: Option<i64>,
    #[diesel(sql_type = Nullable<Double>)]
    sort_float_0: Option<f64>,
    #[diesel(sql_type = Nullable<Text>)]
    sort_text_0: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    sort_int_1: Option<i64>,
    #[diesel(sql_type = Nullable<Double>)]
    sort_float_1: Option<f64>,
    #[diesel(sql_type = Nullable<Text>)]
    sort_text_1: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    sort_int_2: Option<i64>,
    #[diesel(sql_type = Nullable<Double>)]
    sort_float_2: Option<f64>,
    #[diesel(sql_type = Nullable<Text>)]
    sort_text_2: Option<String>,
}

/// Sort keys a search may combine (the query parser refuses more).
pub const MAX_SORT_KEYS: usize = 3;

/// Missing sort values sort last in either direction.
const MISSING_INT_ASC: i64 = i64::MAX;
const MISSING_INT_DESC: i64 = i64::MIN;
const MISSING_FLOAT_ASC: f64 = f64::MAX;
const MISSING_FLOAT_DESC: f64 = f64::MIN;

/// The current versions matching `search`, in order, at most `limit`.
pub fn search(
    conn: &mut DbConnection,
    search: &SearchSql,
    limit: i64,
) -> Result<Vec<MatchedRow>, StoreError> {
    let mut sql = SqlBuilder::for_connection(conn).start(
        "SELECT r.seq AS seq, r.resource_type AS resource_type, r.id AS id, \
         v.version_id AS version_id, v.last_updated AS last_updated, v.method AS method, \
         v.key_id AS key_id, v.wrapped_key AS wrapped_key, v.nonce AS nonce, \
         v.ciphertext AS ciphertext",
    );
    for slot in 0..MAX_SORT_KEYS {
        let key = search.sort.get(slot);
        for (column, kind) in [
            ("int", Kind::Int),
            ("float", Kind::Float),
            ("text", Kind::Text),
        ] {
            sql.push(", ");
            match key {
                Some(sort) if sort.kind() == kind => sort_expression(&mut sql, sort),
                _ => sql.push("NULL"),
            }
            sql.push(&format!(" AS sort_{column}_{slot}"));
        }
    }
    sql.push(
        " FROM resources r JOIN resource_versions v ON v.resource_type = r.resource_type \
         AND v.id = r.id AND v.version_id = r.current_version",
    );
    where_clause(&mut sql, search);
    sql.push(" ORDER BY ");
    for sort in &search.sort {
        sort_expression(&mut sql, sort);
        sql.push(if sort.descending != search.backward {
            " DESC, "
        } else {
            " ASC, "
        });
    }
    sql.push(if search.backward {
        "r.seq DESC LIMIT "
    } else {
        "r.seq ASC LIMIT "
    });
    sql.bind(Bind::BigInt(limit));

    let rows: Vec<MatchedSqlRow> = sql.load(conn)?;
    Ok(rows
        .into_iter()
        .map(|row| {
            let values = search
                .sort
                .iter()
                .enumerate()
                .map(|(slot, sort)| row.sort_value(slot, sort.kind()))
                .collect();
            MatchedRow {
                position: Position {
                    values,
                    seq: row.seq,
                },
                seq: row.seq,
                resource_type: row.resource_type,
                id: row.id,
                version_id: row.version_id,
                last_updated: row.last_updated,
                method: row.method,
                key_id: row.key_id,
                wrapped_key: row.wrapped_key,
                nonce: row.nonce,
                ciphertext: row.ciphertext,
            }
        })
        .collect())
}

/// How many current versions match `search` (its `after` position ignored).
pub fn count(conn: &mut DbConnection, search: &SearchSql) -> Result<i64, StoreError> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut sql = SqlBuilder::for_connection(conn).start("SELECT COUNT(*) AS n FROM resources r");
    let without_position = SearchSql {
        after: None,
        ..search.clone()
    };
    where_clause(&mut sql, &without_position);
    let rows: Vec<Count> = sql.load(conn)?;
    Ok(rows.first().map_or(0, |c| c.n))
}

/// The `(type, id)` of every current resource holding any of `digests` (reverse includes)
/// and meeting `confinement` when there is one, at most `limit`, in `seq` order.
pub fn holders_of(
    conn: &mut DbConnection,
    digests: &[Digest],
    confinement: Option<Condition>,
    limit: i64,
) -> Result<Vec<(String, String)>, StoreError> {
    if digests.is_empty() {
        return Ok(Vec::new());
    }
    let mut conditions = vec![Condition::HasAny(digests.to_vec())];
    conditions.extend(confinement);
    let search = SearchSql {
        resource_types: Vec::new(),
        conditions,
        sort: Vec::new(),
        after: None,
        backward: false,
    };
    #[derive(QueryableByName)]
    struct Holder {
        #[diesel(sql_type = Text)]
        resource_type: String,
        #[diesel(sql_type = Text)]
        id: String,
    }
    let mut sql = SqlBuilder::for_connection(conn)
        .start("SELECT r.resource_type AS resource_type, r.id AS id FROM resources r");
    where_clause(&mut sql, &search);
    sql.push(" ORDER BY r.seq LIMIT ");
    sql.bind(Bind::BigInt(limit));
    let rows: Vec<Holder> = sql.load(conn)?;
    Ok(rows.into_iter().map(|h| (h.resource_type, h.id)).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Float,
    Text,
}

impl SortBy {
    fn kind(&self) -> Kind {
        match self.key {
            SortKey::LastUpdated | SortKey::Date(_) => Kind::Int,
            SortKey::Number(_) => Kind::Float,
            SortKey::Id => Kind::Text,
        }
    }
}

impl MatchedSqlRow {
    fn sort_value(&self, slot: usize, kind: Kind) -> SortValue {
        let (int, float, text) = match slot {
            0 => (self.sort_int_0, self.sort_float_0, &self.sort_text_0),
            1 => (self.sort_int_1, self.sort_float_1, &self.sort_text_1),
            _ => (self.sort_int_2, self.sort_float_2, &self.sort_text_2),
        };
        match kind {
            Kind::Int => SortValue::Int(int.unwrap_or_default()),
            Kind::Float => SortValue::Float(float.unwrap_or_default()),
            Kind::Text => SortValue::Text(text.clone().unwrap_or_default()),
        }
    }
}

/// The SQL value a sort key orders by; missing values become a sentinel that sorts last.
fn sort_expression(sql: &mut Sql, sort: &SortBy) {
    match &sort.key {
        SortKey::LastUpdated => sql.push("r.last_updated"),
        SortKey::Id => sql.push("r.id"),
        SortKey::Date(param) => {
            let (aggregate, missing) = if sort.descending {
                ("MAX(high)", Bind::BigInt(MISSING_INT_DESC))
            } else {
                ("MIN(low)", Bind::BigInt(MISSING_INT_ASC))
            };
            aggregate_of(sql, aggregate, "search_dates", param, missing);
        }
        SortKey::Number(param) => {
            let (aggregate, missing) = if sort.descending {
                ("MAX(value)", Bind::Double(MISSING_FLOAT_DESC))
            } else {
                ("MIN(value)", Bind::Double(MISSING_FLOAT_ASC))
            };
            aggregate_of(sql, aggregate, "search_numbers", param, missing);
        }
    }
}

/// `COALESCE((SELECT {aggregate} FROM {table} WHERE resource_seq = r.seq AND param = …), missing)`.
fn aggregate_of(sql: &mut Sql, aggregate: &str, table: &str, param: &str, missing: Bind) {
    sql.push(&format!(
        "COALESCE((SELECT {aggregate} FROM {table} x WHERE x.resource_seq = r.seq AND x.param = "
    ));
    sql.bind(Bind::Text(param.to_owned()));
    sql.push("), ");
    sql.bind(missing);
    sql.push(")");
}

fn where_clause(sql: &mut Sql, search: &SearchSql) {
    sql.push(" WHERE NOT r.deleted");
    if !search.resource_types.is_empty() {
        sql.push(" AND r.resource_type IN (");
        sql.bind_list(search.resource_types.iter().map(|t| Bind::Text(t.clone())));
        sql.push(")");
    }
    for condition in &search.conditions {
        sql.push(" AND ");
        condition_sql(sql, condition);
    }
    if let Some(after) = &search.after {
        sql.push(" AND ");
        after_sql(sql, &search.sort, after, search.backward);
    }
}

/// Keyset paging: rows strictly after `after` in the order (sort keys…, seq), or strictly
/// before it when walking `backward`.
fn after_sql(sql: &mut Sql, sort: &[SortBy], after: &Position, backward: bool) {
    // (k1 > c1) OR (k1 = c1 AND k2 > c2) OR … OR (k1 = c1 AND … AND seq > s)
    sql.push("(");
    let keys = sort.len().min(after.values.len());
    for last in 0..=keys {
        if last > 0 {
            sql.push(" OR ");
        }
        sql.push("(");
        for (i, key) in sort.iter().take(last).enumerate() {
            sort_expression(sql, key);
            sql.push(" = ");
            bind_sort_value(sql, &after.values[i]);
            sql.push(" AND ");
        }
        if last < keys {
            let key = &sort[last];
            sort_expression(sql, key);
            sql.push(if key.descending != backward {
                " < "
            } else {
                " > "
            });
            bind_sort_value(sql, &after.values[last]);
        } else {
            sql.push(if backward { "r.seq < " } else { "r.seq > " });
            sql.bind(Bind::BigInt(after.seq));
        }
        sql.push(")");
    }
    sql.push(")");
}

fn bind_sort_value(sql: &mut Sql, value: &SortValue) {
    match value {
        SortValue::Int(v) => sql.bind(Bind::BigInt(*v)),
        SortValue::Float(v) => sql.bind(Bind::Double(*v)),
        SortValue::Text(v) => sql.bind(Bind::Text(v.clone())),
    }
}

fn condition_sql(sql: &mut Sql, condition: &Condition) {
    match condition {
        Condition::HasAny(digests) | Condition::HasNone(digests) => {
            if digests.is_empty() {
                sql.push(if matches!(condition, Condition::HasAny(_)) {
                    "1 = 0"
                } else {
                    "1 = 1"
                });
                return;
            }
            if matches!(condition, Condition::HasNone(_)) {
                sql.push("NOT ");
            }
            sql.push("r.seq IN (SELECT h.resource_seq FROM search_hashes h WHERE h.hash IN (");
            sql.bind_list(digests.iter().map(|digest| Bind::Bytes(digest.to_vec())));
            sql.push("))");
        }
        Condition::HasParam(digests) | Condition::LacksParam(digests) => {
            if matches!(condition, Condition::LacksParam(_)) {
                sql.push("NOT ");
            }
            // A byte search in the row's digests, end to end: a false match across two of
            // them would need 16 bytes to collide.
            sql.push("(1 = 0");
            for digest in digests {
                sql.push(if sql.postgres {
                    " OR COALESCE(position("
                } else {
                    " OR COALESCE(instr(r.presence, "
                });
                sql.bind(Bind::Bytes(digest.to_vec()));
                sql.push(if sql.postgres {
                    " IN r.presence), 0) > 0"
                } else {
                    "), 0) > 0"
                });
            }
            sql.push(")");
        }
        Condition::Date { param, lead, tests } => {
            // Probed per candidate through (resource_seq, param, lead): the other conditions
            // (a patient's reference, say) usually narrow the candidates far more.
            sql.push(
                "EXISTS (SELECT 1 FROM search_dates d WHERE d.resource_seq = r.seq AND d.param = ",
            );
            sql.bind(Bind::Text(param.clone()));
            digests_in_sql(sql, "d.lead", lead.as_deref());
            sql.push(" AND (");
            for (i, test) in tests.iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                range_sql(sql, "d.low", "d.high", test);
            }
            sql.push("))");
        }
        Condition::Number { param, lead, tests } => {
            sql.push("EXISTS (SELECT 1 FROM search_numbers n WHERE n.resource_seq = r.seq AND n.param = ");
            sql.bind(Bind::Text(param.clone()));
            digests_in_sql(sql, "n.lead", lead.as_deref());
            sql.push(" AND (");
            for (i, test) in tests.iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                sql.push("(");
                number_sql(sql, test);
                match &test.unit {
                    Some(UnitMatch::SystemCode(digests)) => {
                        digests_in_sql(sql, "n.unit_system_code", Some(digests));
                    }
                    Some(UnitMatch::Code(digests)) => {
                        digests_in_sql(sql, "n.unit_code", Some(digests));
                    }
                    None => {}
                }
                sql.push(")");
            }
            sql.push("))");
        }
        Condition::LastUpdated(tests) => {
            sql.push("(");
            for (i, test) in tests.iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                // An instant is a one-microsecond range.
                range_sql(sql, "r.last_updated", "(r.last_updated + 1)", test);
            }
            sql.push(")");
        }
        Condition::Id(ids) => {
            if ids.is_empty() {
                sql.push("1 = 0");
                return;
            }
            sql.push("r.id IN (");
            sql.bind_list(ids.iter().map(|id| Bind::Text(id.clone())));
            sql.push(")");
        }
        Condition::AnyOf(conditions) => {
            if conditions.is_empty() {
                sql.push("1 = 0");
                return;
            }
            sql.push("(");
            for (i, condition) in conditions.iter().enumerate() {
                if i > 0 {
                    sql.push(" OR ");
                }
                condition_sql(sql, condition);
            }
            sql.push(")");
        }
        Condition::Nothing => sql.push("1 = 0"),
    }
}

/// ` AND {column} IN (…)` when `digests` are given (a composite's leading components, a
/// quantity's unit); nothing when they are not.
fn digests_in_sql(sql: &mut Sql, column: &str, digests: Option<&[Digest]>) {
    let Some(digests) = digests else {
        return;
    };
    if digests.is_empty() {
        sql.push(" AND 1 = 0");
        return;
    }
    sql.push(&format!(" AND {column} IN ("));
    sql.bind_list(digests.iter().map(|digest| Bind::Bytes(digest.to_vec())));
    sql.push(")");
}

/// A stored range `[low_col, high_col)` against a searched range (search.html#prefix).
fn range_sql(sql: &mut Sql, low_col: &str, high_col: &str, test: &RangeTest<i64>) {
    let cmp = |sql: &mut Sql, column: &str, op: &str, value: i64| {
        sql.push(&format!("{column} {op} "));
        sql.bind(Bind::BigInt(value));
    };
    sql.push("(");
    match test.op {
        // The stored range lies within the searched one.
        RangeOp::Eq => {
            cmp(sql, low_col, ">=", test.low);
            sql.push(" AND ");
            cmp(sql, high_col, "<=", test.high);
        }
        RangeOp::Ne => {
            cmp(sql, low_col, "<", test.low);
            sql.push(" OR ");
            cmp(sql, high_col, ">", test.high);
        }
        // Some of the stored range lies above (below) the searched one.
        RangeOp::Gt => cmp(sql, high_col, ">", test.high),
        RangeOp::Lt => cmp(sql, low_col, "<", test.low),
        RangeOp::Ge => {
            cmp(sql, high_col, ">", test.high);
            sql.push(" OR (");
            cmp(sql, low_col, ">=", test.low);
            sql.push(" AND ");
            cmp(sql, high_col, "<=", test.high);
            sql.push(")");
        }
        RangeOp::Le => {
            cmp(sql, low_col, "<", test.low);
            sql.push(" OR (");
            cmp(sql, low_col, ">=", test.low);
            sql.push(" AND ");
            cmp(sql, high_col, "<=", test.high);
            sql.push(")");
        }
        RangeOp::StartsAfter => cmp(sql, low_col, ">=", test.high),
        RangeOp::EndsBefore => cmp(sql, high_col, "<=", test.low),
        RangeOp::Approximately => {
            cmp(sql, low_col, "<", test.high);
            sql.push(" AND ");
            cmp(sql, high_col, ">", test.low);
        }
    }
    sql.push(")");
}

/// A stored number (a point) against a searched number.
fn number_sql(sql: &mut Sql, test: &NumberTest) {
    let cmp = |sql: &mut Sql, op: &str, value: f64| {
        sql.push(&format!("n.value {op} "));
        sql.bind(Bind::Double(value));
    };
    let range = test.range;
    match range.op {
        RangeOp::Eq => {
            cmp(sql, ">=", range.low);
            sql.push(" AND ");
            cmp(sql, "<", range.high);
        }
        RangeOp::Ne => {
            sql.push("(");
            cmp(sql, "<", range.low);
            sql.push(" OR ");
            cmp(sql, ">=", range.high);
            sql.push(")");
        }
        RangeOp::Gt | RangeOp::StartsAfter => cmp(sql, ">", test.value),
        RangeOp::Lt | RangeOp::EndsBefore => cmp(sql, "<", test.value),
        RangeOp::Ge => cmp(sql, ">=", test.value),
        RangeOp::Le => cmp(sql, "<=", test.value),
        RangeOp::Approximately => {
            cmp(sql, ">=", range.low);
            sql.push(" AND ");
            cmp(sql, "<=", range.high);
        }
    }
}

/// A bound parameter.
#[derive(Debug, Clone)]
enum Bind {
    Text(String),
    BigInt(i64),
    Double(f64),
    Bytes(Vec<u8>),
    OptionalBytes(Option<Vec<u8>>),
}

/// Which placeholder syntax to emit.
#[derive(Debug, Clone, Copy)]
struct SqlBuilder {
    postgres: bool,
}

impl SqlBuilder {
    fn for_connection(conn: &DbConnection) -> Self {
        Self {
            postgres: matches!(conn, DbConnection::Postgres(_)),
        }
    }

    fn start(self, text: &str) -> Sql {
        Sql {
            segments: vec![text.to_owned()],
            binds: Vec::new(),
            postgres: self.postgres,
        }
    }
}

/// SQL text with its bound values: the text between placeholders, and the values. The
/// backend's placeholder (`?`, `$n`) goes between two segments when the statement is rendered.
#[derive(Debug)]
struct Sql {
    /// One more than `binds`: the text before the first value, between values, after the last.
    segments: Vec<String>,
    binds: Vec<Bind>,
    postgres: bool,
}

impl Sql {
    fn push(&mut self, text: &str) {
        if let Some(segment) = self.segments.last_mut() {
            segment.push_str(text);
        }
    }

    fn bind(&mut self, value: Bind) {
        // Casts keep PostgreSQL from guessing parameter types in expressions such as
        // `COALESCE(…, $n)`.
        let cast = match (&value, self.postgres) {
            (_, false) => "",
            (Bind::Text(_), true) => "::text",
            (Bind::BigInt(_), true) => "::bigint",
            (Bind::Double(_), true) => "::float8",
            (_, true) => "::bytea",
        };
        self.binds.push(value);
        self.segments.push(cast.to_owned());
    }

    /// Binds the values, comma-separated.
    fn bind_list(&mut self, values: impl IntoIterator<Item = Bind>) {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
    }

    fn execute(self, conn: &mut DbConnection) -> Result<usize, StoreError> {
        let query = PreparedSql::from(self);
        on_backend!(conn, conn => query.execute(conn)).map_err(StoreError::classify)
    }

    fn load<Row>(self, conn: &mut DbConnection) -> Result<Vec<Row>, StoreError>
    where
        Row: QueryableByName<Pg> + QueryableByName<Sqlite> + 'static,
    {
        let query = PreparedSql::from(self);
        on_backend!(conn, conn => query.load::<Row>(conn)).map_err(StoreError::classify)
    }
}

/// Distinct statement texts kept prepared. A search's SQL text depends on its shape (which
/// parameters, how many values each), not on the values, so the shapes clients use are few
/// and each is parsed and planned once per connection instead of on every request (a
/// `perf` profile of identifier searches on SQLite put 37% of the server's CPU in preparing
/// statements). Past the bound, further shapes are prepared per use: a client sending ever new
/// shapes cannot grow every connection's statement cache without limit.
const MAX_PREPARED_SHAPES: usize = 2048;

/// Whether statements of this text may stay in diesel's per-connection statement cache.
fn keep_prepared(text_hash: u64) -> bool {
    static SHAPES: std::sync::OnceLock<parking_lot::Mutex<std::collections::HashSet<u64>>> =
        std::sync::OnceLock::new();
    let mut shapes = SHAPES.get_or_init(Default::default).lock();
    shapes.contains(&text_hash) || (shapes.len() < MAX_PREPARED_SHAPES && shapes.insert(text_hash))
}

/// [`Sql`] as a diesel query that may be cached as a prepared statement, keyed by its text
/// (see [`keep_prepared`]); diesel's `sql_query` never is.
struct PreparedSql {
    segments: Vec<String>,
    binds: Vec<Bind>,
    cacheable: bool,
}

impl From<Sql> for PreparedSql {
    fn from(sql: Sql) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        sql.segments.hash(&mut hasher);
        sql.postgres.hash(&mut hasher);
        Self {
            cacheable: keep_prepared(hasher.finish()),
            segments: sql.segments,
            binds: sql.binds,
        }
    }
}

impl diesel::query_builder::QueryId for PreparedSql {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl diesel::query_builder::Query for PreparedSql {
    type SqlType = diesel::sql_types::Untyped;
}

impl<Conn> RunQueryDsl<Conn> for PreparedSql {}

impl<DB> diesel::query_builder::QueryFragment<DB> for PreparedSql
where
    DB: DieselBackend
        + HasSqlType<Text>
        + HasSqlType<BigInt>
        + HasSqlType<Double>
        + HasSqlType<Binary>
        + diesel::internal::derives::multiconnection::DieselReserveSpecialization,
    String: ToSql<Text, DB>,
    i64: ToSql<BigInt, DB>,
    f64: ToSql<Double, DB>,
    Vec<u8>: ToSql<Binary, DB>,
    Option<Vec<u8>>: ToSql<Nullable<Binary>, DB>,
{
    fn walk_ast<'b>(
        &'b self,
        mut out: diesel::query_builder::AstPass<'_, 'b, DB>,
    ) -> QueryResult<()> {
        if !self.cacheable {
            out.unsafe_to_cache_prepared();
        }
        let mut segments = self.segments.iter();
        if let Some(first) = segments.next() {
            out.push_sql(first);
        }
        for (value, segment) in self.binds.iter().zip(segments) {
            match value {
                Bind::Text(v) => out.push_bind_param::<Text, _>(v)?,
                Bind::BigInt(v) => out.push_bind_param::<BigInt, _>(v)?,
                Bind::Double(v) => out.push_bind_param::<Double, _>(v)?,
                Bind::Bytes(v) => out.push_bind_param::<Binary, _>(v)?,
                Bind::OptionalBytes(v) => out.push_bind_param::<Nullable<Binary>, _>(v)?,
            }
            out.push_sql(segment);
        }
        Ok(())
    }
}
