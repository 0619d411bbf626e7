//! Queries over the `resources` (one row per logical resource) and `resource_versions`
//! (every version, sealed) tables. Callers pass the connection of their transaction.

use std::collections::HashMap;

use diesel::prelude::*;

use super::database::{DbConnection, on_backend};
use super::error::StoreError;
use super::schema::{resource_versions, resources};
use crate::crypto::EncryptedBlob;
use crate::crypto::blind_index::Digest;
use crate::fhir::document::VersionId;

/// The current state of a logical resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = resources)]
pub struct ResourceHead {
    #[diesel(deserialize_as = i64)]
    pub current_version: VersionId,
    pub deleted: bool,
    pub last_updated: i64,
    /// Stable number of the logical resource (search order, index rows).
    pub seq: i64,
}

/// One stored version as the database holds it.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = resource_versions)]
pub struct VersionRow {
    pub resource_type: String,
    pub id: String,
    #[diesel(deserialize_as = i64)]
    pub version_id: VersionId,
    pub last_updated: i64,
    pub deleted: bool,
    /// The HTTP method that wrote this version (`POST`, `PUT` or `DELETE`).
    pub method: String,
    pub key_id: Option<String>,
    pub wrapped_key: Option<Vec<u8>>,
    pub nonce: Option<Vec<u8>>,
    pub ciphertext: Option<Vec<u8>>,
}

impl VersionRow {
    pub fn with_content(
        resource_type: &str,
        id: &str,
        version_id: VersionId,
        last_updated: i64,
        method: &str,
        blob: EncryptedBlob,
    ) -> Self {
        Self {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version_id,
            last_updated,
            deleted: false,
            method: method.to_owned(),
            key_id: Some(blob.key_id),
            wrapped_key: Some(blob.wrapped_key),
            nonce: Some(blob.nonce),
            ciphertext: Some(blob.ciphertext),
        }
    }

    pub fn tombstone(
        resource_type: &str,
        id: &str,
        version_id: VersionId,
        last_updated: i64,
    ) -> Self {
        Self {
            resource_type: resource_type.to_owned(),
            id: id.to_owned(),
            version_id,
            last_updated,
            deleted: true,
            method: "DELETE".to_owned(),
            key_id: None,
            wrapped_key: None,
            nonce: None,
            ciphertext: None,
        }
    }

    /// The sealed content, or `None` for a deletion. A content row with missing parts
    /// (which the CHECK constraint forbids) reads as `None` too; the caller treats it as
    /// an integrity failure.
    pub fn blob(&self) -> Option<EncryptedBlob> {
        Some(EncryptedBlob {
            key_id: self.key_id.clone()?,
            wrapped_key: self.wrapped_key.clone()?,
            nonce: self.nonce.clone()?,
            ciphertext: self.ciphertext.clone()?,
        })
    }
}

pub fn head(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<ResourceHead>, StoreError> {
    on_backend!(conn, conn => resources::table
        .find((resource_type, id))
        .select(ResourceHead::as_select())
        .first(conn)
        .optional())
    .map_err(StoreError::classify)
}

/// The head of a resource and its current version's row, in one query (a read by id).
pub fn current(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
) -> Result<Option<(ResourceHead, Option<VersionRow>)>, StoreError> {
    on_backend!(conn, conn => resources::table
        .left_join(
            resource_versions::table.on(resource_versions::resource_type
                .eq(resources::resource_type)
                .and(resource_versions::id.eq(resources::id))
                .and(resource_versions::version_id.eq(resources::current_version))),
        )
        .filter(resources::resource_type.eq(resource_type))
        .filter(resources::id.eq(id))
        .select((ResourceHead::as_select(), Option::<VersionRow>::as_select()))
        .first(conn)
        .optional())
    .map_err(StoreError::classify)
}

pub fn version(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
    version_id: VersionId,
) -> Result<Option<VersionRow>, StoreError> {
    // On the backend's own connection: through the two-backend enum, diesel would render the
    // statement again to find it in its cache and copy the bound values, on every read.
    on_backend!(conn, conn => resource_versions::table
        .find((resource_type, id, version_id.get()))
        .select(VersionRow::as_select())
        .first(conn)
        .optional())
    .map_err(StoreError::classify)
}

/// Which versions of one resource a history page asks for.
#[derive(Debug, Clone, Copy)]
pub struct HistoryWindow {
    /// Only versions with a smaller version id (the paging cursor).
    pub before_version: Option<VersionId>,
    /// Only versions last updated at or after this instant (µs since the epoch).
    pub since: Option<i64>,
    pub limit: i64,
}

/// Versions newest first.
pub fn history(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
    window: HistoryWindow,
) -> Result<Vec<VersionRow>, StoreError> {
    let mut query = resource_versions::table
        .filter(resource_versions::resource_type.eq(resource_type))
        .filter(resource_versions::id.eq(id))
        .select(VersionRow::as_select())
        .order(resource_versions::version_id.desc())
        .limit(window.limit)
        .into_boxed();
    if let Some(before) = window.before_version {
        query = query.filter(resource_versions::version_id.lt(before.get()));
    }
    if let Some(since) = window.since {
        query = query.filter(resource_versions::last_updated.ge(since));
    }
    query.load(conn).map_err(StoreError::classify)
}

/// A version's place in type- and system-level history order: newest `last_updated` first,
/// ties broken by `resource_type`, `id` and `version_id` (all descending), so the order is
/// total and a page can start strictly after the last version of the previous one. Carried
/// (sealed) in history's `_cursor`, hence the short names.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VersionKey {
    #[serde(rename = "t")]
    pub last_updated: i64,
    #[serde(rename = "r")]
    pub resource_type: String,
    #[serde(rename = "i")]
    pub id: String,
    #[serde(rename = "v")]
    pub version_id: VersionId,
}

impl VersionRow {
    pub fn key(&self) -> VersionKey {
        VersionKey {
            last_updated: self.last_updated,
            resource_type: self.resource_type.clone(),
            id: self.id.clone(),
            version_id: self.version_id,
        }
    }
}

/// Which versions a type-level (`resource_type` set) or system-level history page asks for.
#[derive(Debug, Clone, Copy)]
pub struct ScanWindow<'a> {
    pub resource_type: Option<&'a str>,
    /// Only versions last updated at or after this instant (µs since the epoch).
    pub since: Option<i64>,
    /// Only versions after this one in [`VersionKey`] order (keyset paging: versions written
    /// while a client pages sort before the cursor, so they neither shift nor repeat rows).
    pub after: Option<&'a VersionKey>,
    pub limit: i64,
}

/// Versions of every resource (of one type), newest first in [`VersionKey`] order.
pub fn history_scan(
    conn: &mut DbConnection,
    window: ScanWindow<'_>,
) -> Result<Vec<VersionRow>, StoreError> {
    use resource_versions::dsl as v;
    let mut query = resource_versions::table
        .select(VersionRow::as_select())
        .order((
            v::last_updated.desc(),
            v::resource_type.desc(),
            v::id.desc(),
            v::version_id.desc(),
        ))
        .limit(window.limit)
        .into_boxed();
    if let Some(resource_type) = window.resource_type {
        query = query.filter(v::resource_type.eq(resource_type.to_owned()));
    }
    if let Some(since) = window.since {
        query = query.filter(v::last_updated.ge(since));
    }
    if let Some(after) = window.after {
        let (t, i) = (after.resource_type.clone(), after.id.clone());
        query = query.filter(
            v::last_updated
                .lt(after.last_updated)
                .or(v::last_updated.eq(after.last_updated).and(
                    v::resource_type
                        .lt(t.clone())
                        .or(v::resource_type.eq(t).and(
                            v::id
                                .lt(i.clone())
                                .or(v::id.eq(i).and(v::version_id.lt(after.version_id.get()))),
                        )),
                )),
        );
    }
    query.load(conn).map_err(StoreError::classify)
}

/// How many versions a history without a cursor would cover.
pub fn count_history(
    conn: &mut DbConnection,
    resource_type: &str,
    id: &str,
    since: Option<i64>,
) -> Result<i64, StoreError> {
    let mut query = resource_versions::table
        .filter(resource_versions::resource_type.eq(resource_type))
        .filter(resource_versions::id.eq(id))
        .count()
        .into_boxed();
    if let Some(since) = since {
        query = query.filter(resource_versions::last_updated.ge(since));
    }
    query.get_result(conn).map_err(StoreError::classify)
}

/// Keys per statement of the batched queries below (well under both backends' limits on
/// bound parameters: ten columns of a version row each).
const BATCH_CHUNK: usize = 500;

/// The heads of those resources of `resource_type` among `ids` that exist, by id: one
/// query per [`BATCH_CHUNK`] ids (a bulk load's batch asks once, not once per line).
pub fn heads_of(
    conn: &mut DbConnection,
    resource_type: &str,
    ids: &[&str],
) -> Result<HashMap<String, ResourceHead>, StoreError> {
    let mut heads = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(BATCH_CHUNK) {
        let found: Vec<(String, ResourceHead)> = on_backend!(conn, conn => resources::table
            .filter(resources::resource_type.eq(resource_type))
            .filter(resources::id.eq_any(chunk))
            .select((resources::id, ResourceHead::as_select()))
            .load(conn))
        .map_err(StoreError::classify)?;
        heads.extend(found);
    }
    Ok(heads)
}

/// Records the first versions of several resources of `resource_type`, each with the
/// presence digests of its parameters, in multi-row INSERTs; returns each one's `seq`, in
/// the order given. Fails with [`StoreError::UniqueViolation`] (writing nothing, as the
/// transaction rolls back) when another writer created one of them first.
pub fn insert_firsts(
    conn: &mut DbConnection,
    resource_type: &str,
    firsts: &[(&VersionRow, Vec<u8>)],
) -> Result<Vec<i64>, StoreError> {
    for chunk in firsts.chunks(BATCH_CHUNK) {
        let heads: Vec<_> = chunk
            .iter()
            .map(|(row, presence)| {
                (
                    resources::resource_type.eq(resource_type),
                    resources::id.eq(&row.id),
                    resources::current_version.eq(row.version_id.get()),
                    resources::deleted.eq(row.deleted),
                    resources::last_updated.eq(row.last_updated),
                    resources::presence.eq(presence),
                )
            })
            .collect();
        on_backend!(conn, conn => diesel::insert_into(resources::table)
            .values(heads)
            .execute(conn))
        .map_err(StoreError::classify)?;
        let versions: Vec<_> = chunk.iter().map(|(row, _)| version_values(row)).collect();
        on_backend!(conn, conn => diesel::insert_into(resource_versions::table)
            .values(versions)
            .execute(conn))
        .map_err(StoreError::classify)?;
    }
    // Read back rather than `RETURNING`, whose row order neither backend promises.
    let ids: Vec<&str> = firsts.iter().map(|(row, _)| row.id.as_str()).collect();
    let heads = heads_of(conn, resource_type, &ids)?;
    ids.iter()
        .map(|id| {
            heads.get(*id).map(|head| head.seq).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "{resource_type}/{id} was inserted but is not there"
                ))
            })
        })
        .collect()
}

/// Records the first version of a resource, with the presence digests of its parameters
/// (`store::search::IndexRows::presence`), and returns its `seq`. Fails with
/// [`StoreError::UniqueViolation`] when another writer created the same resource first.
pub fn insert_first(
    conn: &mut DbConnection,
    row: &VersionRow,
    presence: &[Digest],
) -> Result<i64, StoreError> {
    let seq = insert_resource_row(conn, row, &presence.concat()).map_err(StoreError::classify)?;
    insert_version(conn, row)?;
    Ok(seq)
}

/// Inserts the `resources` row of a first version; returns the `seq` the database gave it.
/// PostgreSQL returns it with the INSERT: one round trip fewer per create. SQLite reads it
/// back by the row's key: diesel offers `RETURNING` on SQLite only behind a feature this
/// build leaves off (SQLite before 3.35 has none).
fn insert_resource_row(
    conn: &mut DbConnection,
    row: &VersionRow,
    presence: &[u8],
) -> QueryResult<i64> {
    let values = (
        resources::resource_type.eq(&row.resource_type),
        resources::id.eq(&row.id),
        resources::current_version.eq(row.version_id.get()),
        resources::deleted.eq(row.deleted),
        resources::last_updated.eq(row.last_updated),
        resources::presence.eq(presence),
    );
    match conn {
        DbConnection::Postgres(pg) => diesel::insert_into(resources::table)
            .values(values)
            .returning(resources::seq)
            .get_result(pg),
        DbConnection::Sqlite(sqlite) => diesel::insert_into(resources::table)
            .values(values)
            .execute(sqlite)
            .and_then(|_| {
                resources::table
                    .find((&row.resource_type, &row.id))
                    .select(resources::seq)
                    .first(sqlite)
            }),
    }
}

/// Moves a resource from `expected_version` to `row.version_id`, with the presence digests
/// of the new version's parameters (none for a deletion). Returns `false` (writing nothing)
/// when the current version is no longer `expected_version`: another writer won the race,
/// and the caller decides whether to retry.
pub fn advance(
    conn: &mut DbConnection,
    expected_version: VersionId,
    row: &VersionRow,
    presence: &[Digest],
) -> Result<bool, StoreError> {
    let presence = presence.concat();
    let updated = on_backend!(conn, conn => diesel::update(
        resources::table
            .find((&row.resource_type, &row.id))
            .filter(resources::current_version.eq(expected_version.get())),
    )
    .set((
        resources::current_version.eq(row.version_id.get()),
        resources::deleted.eq(row.deleted),
        resources::last_updated.eq(row.last_updated),
        resources::presence.eq(&presence),
    ))
    .execute(conn))
    .map_err(StoreError::classify)?;
    if updated == 0 {
        return Ok(false);
    }
    insert_version(conn, row)?;
    Ok(true)
}

/// Every column given, an absent one as NULL: one statement shape, which stays prepared (an
/// `Insertable` with optional fields leaves absent columns out, a shape per combination).
fn insert_version(conn: &mut DbConnection, row: &VersionRow) -> Result<(), StoreError> {
    on_backend!(conn, conn => diesel::insert_into(resource_versions::table)
        .values(version_values(row))
        .execute(conn))
    .map(|_| ())
    .map_err(StoreError::classify)
}

/// A version row's columns, every one given (see [`insert_version`]).
#[allow(
    clippy::type_complexity,
    reason = "diesel's own type for these ten columns"
)]
fn version_values(
    row: &VersionRow,
) -> (
    diesel::dsl::Eq<resource_versions::resource_type, &String>,
    diesel::dsl::Eq<resource_versions::id, &String>,
    diesel::dsl::Eq<resource_versions::version_id, i64>,
    diesel::dsl::Eq<resource_versions::last_updated, i64>,
    diesel::dsl::Eq<resource_versions::deleted, bool>,
    diesel::dsl::Eq<resource_versions::method, &String>,
    diesel::dsl::Eq<resource_versions::key_id, &Option<String>>,
    diesel::dsl::Eq<resource_versions::wrapped_key, &Option<Vec<u8>>>,
    diesel::dsl::Eq<resource_versions::nonce, &Option<Vec<u8>>>,
    diesel::dsl::Eq<resource_versions::ciphertext, &Option<Vec<u8>>>,
) {
    use resource_versions::dsl as v;
    (
        v::resource_type.eq(&row.resource_type),
        v::id.eq(&row.id),
        v::version_id.eq(row.version_id.get()),
        v::last_updated.eq(row.last_updated),
        v::deleted.eq(row.deleted),
        v::method.eq(&row.method),
        v::key_id.eq(&row.key_id),
        v::wrapped_key.eq(&row.wrapped_key),
        v::nonce.eq(&row.nonce),
        v::ciphertext.eq(&row.ciphertext),
    )
}

/// What the auditor needs of one stored version.
#[derive(Debug, Clone, Queryable)]
pub struct AuditedVersion {
    pub resource_type: String,
    pub id: String,
    pub version_id: i64,
    pub deleted: bool,
    pub ciphertext: Option<Vec<u8>>,
}

/// One page of every stored version in key order, after `after` (keyset paging, so
/// pages stay cheap on large tables).
pub fn versions_page(
    conn: &mut DbConnection,
    after: Option<(&str, &str, i64)>,
    limit: i64,
) -> Result<Vec<AuditedVersion>, StoreError> {
    use resource_versions::dsl as v;
    let mut query = resource_versions::table
        .select((
            v::resource_type,
            v::id,
            v::version_id,
            v::deleted,
            v::ciphertext,
        ))
        .order((v::resource_type.asc(), v::id.asc(), v::version_id.asc()))
        .limit(limit)
        .into_boxed();
    if let Some((resource_type, id, version_id)) = after {
        query = query.filter(
            v::resource_type
                .gt(resource_type.to_owned())
                .or(v::resource_type.eq(resource_type.to_owned()).and(
                    v::id
                        .gt(id.to_owned())
                        .or(v::id.eq(id.to_owned()).and(v::version_id.gt(version_id))),
                )),
        );
    }
    query.load(conn).map_err(StoreError::classify)
}

pub fn count_versions(conn: &mut DbConnection) -> Result<i64, StoreError> {
    resource_versions::table
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)
}

/// Every logical resource with its current version (type, id, current_version).
pub fn all_heads(conn: &mut DbConnection) -> Result<Vec<(String, String, i64)>, StoreError> {
    resources::table
        .select((
            resources::resource_type,
            resources::id,
            resources::current_version,
        ))
        .load(conn)
        .map_err(StoreError::classify)
}
