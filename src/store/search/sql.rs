//! The SQL of a search, and running it: the current versions matching a [`SearchSql`], in
//! order ([`search`]), how many match ([`count`]), and who holds a digest ([`holders_of`]).
//!
//! Searches are built as SQL text with bound parameters (the number of conditions varies
//! per request); the only text spliced into SQL is produced here, never taken from a
//! request.

use crate::fhir::document::VersionId;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Binary, Double, Nullable, Text};

use super::conditions::{
    Condition, MAX_SORT_KEYS, NumberTest, Position, RangeOp, RangeTest, SearchSql, SortBy, SortKey,
    SortValue, UnitMatch,
};
use super::statement::{Bind, Sql, SqlBuilder};
use crate::crypto::blind_index::Digest;
use crate::store::database::DbConnection;
use crate::store::error::StoreError;

/// A current version that matched, with its sealed content.
#[derive(Debug, Clone)]
pub struct MatchedRow {
    pub seq: i64,
    pub resource_type: String,
    pub id: String,
    pub version_id: VersionId,
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
                version_id: VersionId::from(row.version_id),
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
            let (before, after) = sql.dialect.presence_contains();
            for digest in digests {
                sql.push(" OR ");
                sql.push(before);
                sql.bind(Bind::Bytes(digest.to_vec()));
                sql.push(after);
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
