//! Queries of a master key rotation: the data keys still wrapped by a previous master key
//! (resource versions, export jobs, export files, subscriptions), a page at a time, and the update that
//! re-wraps one, only if no one re-wrapped it meanwhile.

use diesel::prelude::*;

use super::database::DbConnection;
use super::error::StoreError;
use super::schema::{export_files, export_jobs, resource_versions, subscriptions};

/// Where a wrapped data key is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WrappedKeyRow {
    Version {
        resource_type: String,
        id: String,
        version_id: i64,
    },
    ExportJob {
        id: String,
    },
    ExportFile {
        job_id: String,
        file_no: i32,
    },
    Subscription {
        id: String,
    },
}

/// A data key wrapped under `key_id`, where it is kept.
#[derive(Debug, Clone)]
pub struct WrappedKey {
    pub row: WrappedKeyRow,
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
}

/// Up to `limit` data keys wrapped by one of the `previous` master keys: resource versions
/// first, then export jobs and files.
pub fn under_previous_keys(
    conn: &mut DbConnection,
    previous: &[String],
    limit: i64,
) -> Result<Vec<WrappedKey>, StoreError> {
    let mut found: Vec<WrappedKey> = resource_versions::table
        .filter(resource_versions::key_id.eq_any(previous))
        .select((
            resource_versions::resource_type,
            resource_versions::id,
            resource_versions::version_id,
            resource_versions::key_id.assume_not_null(),
            resource_versions::wrapped_key.assume_not_null(),
        ))
        .limit(limit)
        .load::<(String, String, i64, String, Vec<u8>)>(conn)
        .map_err(StoreError::classify)?
        .into_iter()
        .map(
            |(resource_type, id, version_id, key_id, wrapped_key)| WrappedKey {
                row: WrappedKeyRow::Version {
                    resource_type,
                    id,
                    version_id,
                },
                key_id,
                wrapped_key,
            },
        )
        .collect();
    let left = limit - found.len() as i64;
    if left > 0 {
        found.extend(
            export_jobs::table
                .filter(export_jobs::key_id.eq_any(previous))
                .select((
                    export_jobs::id,
                    export_jobs::key_id,
                    export_jobs::wrapped_key,
                ))
                .limit(left)
                .load::<(String, String, Vec<u8>)>(conn)
                .map_err(StoreError::classify)?
                .into_iter()
                .map(|(id, key_id, wrapped_key)| WrappedKey {
                    row: WrappedKeyRow::ExportJob { id },
                    key_id,
                    wrapped_key,
                }),
        );
    }
    let left = limit - found.len() as i64;
    if left > 0 {
        found.extend(
            export_files::table
                .filter(export_files::key_id.eq_any(previous))
                .select((
                    export_files::job_id,
                    export_files::file_no,
                    export_files::key_id,
                    export_files::wrapped_key,
                ))
                .limit(left)
                .load::<(String, i32, String, Vec<u8>)>(conn)
                .map_err(StoreError::classify)?
                .into_iter()
                .map(|(job_id, file_no, key_id, wrapped_key)| WrappedKey {
                    row: WrappedKeyRow::ExportFile { job_id, file_no },
                    key_id,
                    wrapped_key,
                }),
        );
    }
    let left = limit - found.len() as i64;
    if left > 0 {
        found.extend(
            subscriptions::table
                .filter(subscriptions::key_id.eq_any(previous))
                .select((
                    subscriptions::id,
                    subscriptions::key_id,
                    subscriptions::wrapped_key,
                ))
                .limit(left)
                .load::<(String, String, Vec<u8>)>(conn)
                .map_err(StoreError::classify)?
                .into_iter()
                .map(|(id, key_id, wrapped_key)| WrappedKey {
                    row: WrappedKeyRow::Subscription { id },
                    key_id,
                    wrapped_key,
                }),
        );
    }
    Ok(found)
}

/// How many data keys are wrapped by one of the `previous` master keys.
pub fn count_under_previous_keys(
    conn: &mut DbConnection,
    previous: &[String],
) -> Result<i64, StoreError> {
    let versions: i64 = resource_versions::table
        .filter(resource_versions::key_id.eq_any(previous))
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)?;
    let jobs: i64 = export_jobs::table
        .filter(export_jobs::key_id.eq_any(previous))
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)?;
    let files: i64 = export_files::table
        .filter(export_files::key_id.eq_any(previous))
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)?;
    let subscribed: i64 = subscriptions::table
        .filter(subscriptions::key_id.eq_any(previous))
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)?;
    Ok(versions + jobs + files + subscribed)
}

/// Replaces the wrapped data key of `row` (under `old_key_id`) with `wrapped_key` under
/// `new_key_id`; false when the row is gone or was re-wrapped by someone else meanwhile.
pub fn set_wrapped_key(
    conn: &mut DbConnection,
    row: &WrappedKeyRow,
    old_key_id: &str,
    new_key_id: &str,
    wrapped_key: &[u8],
) -> Result<bool, StoreError> {
    let updated = match row {
        WrappedKeyRow::Version {
            resource_type,
            id,
            version_id,
        } => diesel::update(
            resource_versions::table
                .filter(resource_versions::resource_type.eq(resource_type))
                .filter(resource_versions::id.eq(id))
                .filter(resource_versions::version_id.eq(version_id))
                .filter(resource_versions::key_id.eq(old_key_id)),
        )
        .set((
            resource_versions::key_id.eq(new_key_id),
            resource_versions::wrapped_key.eq(wrapped_key),
        ))
        .execute(conn),
        WrappedKeyRow::ExportJob { id } => diesel::update(
            export_jobs::table
                .filter(export_jobs::id.eq(id))
                .filter(export_jobs::key_id.eq(old_key_id)),
        )
        .set((
            export_jobs::key_id.eq(new_key_id),
            export_jobs::wrapped_key.eq(wrapped_key),
        ))
        .execute(conn),
        WrappedKeyRow::ExportFile { job_id, file_no } => diesel::update(
            export_files::table
                .filter(export_files::job_id.eq(job_id))
                .filter(export_files::file_no.eq(file_no))
                .filter(export_files::key_id.eq(old_key_id)),
        )
        .set((
            export_files::key_id.eq(new_key_id),
            export_files::wrapped_key.eq(wrapped_key),
        ))
        .execute(conn),
        WrappedKeyRow::Subscription { id } => diesel::update(
            subscriptions::table
                .filter(subscriptions::id.eq(id))
                .filter(subscriptions::key_id.eq(old_key_id)),
        )
        .set((
            subscriptions::key_id.eq(new_key_id),
            subscriptions::wrapped_key.eq(wrapped_key),
        ))
        .execute(conn),
    }
    .map_err(StoreError::classify)?;
    Ok(updated == 1)
}
