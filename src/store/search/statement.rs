//! Statements built at run time: SQL text with its bound values ([`Sql`]), each value
//! bound through diesel (which writes the backend's placeholder), and kept prepared per
//! connection while the number of distinct texts stays bounded ([`PreparedSql`]).

use diesel::backend::Backend as DieselBackend;
use diesel::pg::Pg;
use diesel::prelude::*;
use diesel::serialize::ToSql;
use diesel::sql_types::{BigInt, Binary, Double, HasSqlType, Nullable, Text};
use diesel::sqlite::Sqlite;

use crate::store::database::{DbConnection, on_backend};
use crate::store::dialect::{Dialect, ParamType};
use crate::store::error::StoreError;

/// A bound parameter.
#[derive(Debug, Clone)]
pub(super) enum Bind {
    Text(String),
    BigInt(i64),
    Double(f64),
    Bytes(Vec<u8>),
    OptionalBytes(Option<Vec<u8>>),
}

/// Starts statements in the dialect of one connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct SqlBuilder {
    dialect: Dialect,
}

impl SqlBuilder {
    pub(super) fn for_connection(conn: &DbConnection) -> Self {
        Self {
            dialect: conn.dialect(),
        }
    }

    pub(super) fn start(self, text: &str) -> Sql {
        Sql {
            segments: vec![text.to_owned()],
            binds: Vec::new(),
            dialect: self.dialect,
        }
    }
}

/// SQL text with its bound values: the text between placeholders, and the values. The
/// backend's placeholder (`?`, `$n`) goes between two segments when the statement is rendered.
#[derive(Debug)]
pub(super) struct Sql {
    /// One more than `binds`: the text before the first value, between values, after the last.
    segments: Vec<String>,
    binds: Vec<Bind>,
    pub(super) dialect: Dialect,
}

impl Sql {
    pub(super) fn push(&mut self, text: &str) {
        if let Some(segment) = self.segments.last_mut() {
            segment.push_str(text);
        }
    }

    pub(super) fn bind(&mut self, value: Bind) {
        let cast = self.dialect.param_cast(match value {
            Bind::Text(_) => ParamType::Text,
            Bind::BigInt(_) => ParamType::BigInt,
            Bind::Double(_) => ParamType::Double,
            Bind::Bytes(_) | Bind::OptionalBytes(_) => ParamType::Bytes,
        });
        self.binds.push(value);
        self.segments.push(cast.to_owned());
    }

    /// Binds the values, comma-separated.
    pub(super) fn bind_list(&mut self, values: impl IntoIterator<Item = Bind>) {
        for (i, value) in values.into_iter().enumerate() {
            if i > 0 {
                self.push(", ");
            }
            self.bind(value);
        }
    }

    pub(super) fn execute(self, conn: &mut DbConnection) -> Result<usize, StoreError> {
        let query = PreparedSql::from(self);
        on_backend!(conn, conn => query.execute(conn)).map_err(StoreError::classify)
    }

    pub(super) fn load<Row>(self, conn: &mut DbConnection) -> Result<Vec<Row>, StoreError>
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
        sql.dialect.hash(&mut hasher);
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
