//! Bulk export jobs and their files: the queue a runner claims jobs from (with a lease, so
//! a job whose process stopped is taken up again), each job's state, and its sealed output.

use diesel::prelude::*;

use super::database::DbConnection;
use super::error::StoreError;
use super::schema::{export_files, export_jobs};
use crate::crypto::EncryptedBlob;

/// Where a job is.
pub const QUEUED: &str = "queued";
pub const RUNNING: &str = "running";
pub const COMPLETE: &str = "complete";
pub const FAILED: &str = "failed";

/// One job as stored.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = export_jobs)]
pub struct JobRow {
    pub id: String,
    pub owner: String,
    pub key_id: String,
    pub wrapped_key: Vec<u8>,
    pub nonce: Vec<u8>,
    pub sealed_job: Vec<u8>,
    pub status: String,
    pub transaction_time: i64,
    pub created_at: i64,
    pub lease_until: i64,
    pub resources_done: i64,
    pub error: Option<String>,
    pub expires_at: Option<i64>,
}

impl JobRow {
    /// The job's sealed description.
    pub fn sealed(&self) -> EncryptedBlob {
        EncryptedBlob {
            key_id: self.key_id.clone(),
            wrapped_key: self.wrapped_key.clone(),
            nonce: self.nonce.clone(),
            ciphertext: self.sealed_job.clone(),
        }
    }
}

/// A new job, queued.
pub fn insert_job(
    conn: &mut DbConnection,
    id: &str,
    owner: &str,
    sealed: &EncryptedBlob,
    transaction_time: i64,
) -> Result<(), StoreError> {
    diesel::insert_into(export_jobs::table)
        .values((
            export_jobs::id.eq(id),
            export_jobs::owner.eq(owner),
            export_jobs::key_id.eq(&sealed.key_id),
            export_jobs::wrapped_key.eq(&sealed.wrapped_key),
            export_jobs::nonce.eq(&sealed.nonce),
            export_jobs::sealed_job.eq(&sealed.ciphertext),
            export_jobs::status.eq(QUEUED),
            export_jobs::transaction_time.eq(transaction_time),
            export_jobs::created_at.eq(transaction_time),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

pub fn job(conn: &mut DbConnection, id: &str) -> Result<Option<JobRow>, StoreError> {
    export_jobs::table
        .find(id)
        .select(JobRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)
}

/// How many jobs are queued or running (kick-off refuses beyond a bound).
pub fn active_jobs(conn: &mut DbConnection) -> Result<i64, StoreError> {
    export_jobs::table
        .filter(export_jobs::status.eq_any([QUEUED, RUNNING]))
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)
}

/// How many jobs an owner has that are queued, running, or finished with files kept.
pub fn jobs_of(conn: &mut DbConnection, owner: &str) -> Result<i64, StoreError> {
    export_jobs::table
        .filter(export_jobs::owner.eq(owner))
        .count()
        .get_result(conn)
        .map_err(StoreError::classify)
}

/// Claims the oldest job that is queued, or running under a lease that ran out (its runner
/// stopped), for `lease_until`; a job taken over loses the files its last runner wrote.
/// `None` when there is nothing to do or another runner got there first.
pub fn claim(
    conn: &mut DbConnection,
    now: i64,
    lease_until: i64,
) -> Result<Option<JobRow>, StoreError> {
    let candidate: Option<JobRow> = export_jobs::table
        .filter(export_jobs::status.eq_any([QUEUED, RUNNING]))
        .filter(export_jobs::lease_until.lt(now))
        .order(export_jobs::created_at.asc())
        .select(JobRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)?;
    let Some(mut job) = candidate else {
        return Ok(None);
    };
    let claimed = diesel::update(
        export_jobs::table
            .find(&job.id)
            .filter(export_jobs::lease_until.eq(job.lease_until)),
    )
    .set((
        export_jobs::status.eq(RUNNING),
        export_jobs::lease_until.eq(lease_until),
        export_jobs::resources_done.eq(0),
    ))
    .execute(conn)
    .map_err(StoreError::classify)?;
    if claimed == 0 {
        return Ok(None);
    }
    delete_files(conn, &job.id)?;
    job.status = RUNNING.to_owned();
    job.lease_until = lease_until;
    job.resources_done = 0;
    Ok(Some(job))
}

/// Renews a running job's lease and records its progress; false when the job is gone
/// (cancelled) or another runner holds it, and the caller must stop.
pub fn renew(
    conn: &mut DbConnection,
    id: &str,
    held_until: i64,
    lease_until: i64,
    resources_done: i64,
) -> Result<bool, StoreError> {
    diesel::update(
        export_jobs::table
            .find(id)
            .filter(export_jobs::status.eq(RUNNING))
            .filter(export_jobs::lease_until.eq(held_until)),
    )
    .set((
        export_jobs::lease_until.eq(lease_until),
        export_jobs::resources_done.eq(resources_done),
    ))
    .execute(conn)
    .map(|updated| updated == 1)
    .map_err(StoreError::classify)
}

/// Marks a job failed with `error` (a text without request values), to be deleted at
/// `expires_at`.
pub fn fail(
    conn: &mut DbConnection,
    id: &str,
    error: &str,
    expires_at: i64,
) -> Result<(), StoreError> {
    diesel::update(export_jobs::table.find(id))
        .set((
            export_jobs::status.eq(FAILED),
            export_jobs::error.eq(error),
            export_jobs::expires_at.eq(expires_at),
            export_jobs::lease_until.eq(0),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// Completes a running job, to be deleted at `expires_at`, if its lease is still the one
/// held until `held_until`; false when another runner took it over.
pub fn complete(
    conn: &mut DbConnection,
    id: &str,
    held_until: i64,
    expires_at: i64,
) -> Result<bool, StoreError> {
    diesel::update(
        export_jobs::table
            .find(id)
            .filter(export_jobs::status.eq(RUNNING))
            .filter(export_jobs::lease_until.eq(held_until)),
    )
    .set((
        export_jobs::status.eq(COMPLETE),
        export_jobs::expires_at.eq(expires_at),
        export_jobs::lease_until.eq(0),
    ))
    .execute(conn)
    .map(|updated| updated == 1)
    .map_err(StoreError::classify)
}

/// Deletes a job and its files; false when there was no such job. The job's row goes
/// first: a runner writing a file renews that row in the same transaction, so on
/// PostgreSQL the deletion waits for it and then deletes the file it wrote too.
pub fn delete_job(conn: &mut DbConnection, id: &str) -> Result<bool, StoreError> {
    let deleted = diesel::delete(export_jobs::table.find(id))
        .execute(conn)
        .map(|deleted| deleted == 1)
        .map_err(StoreError::classify)?;
    delete_files(conn, id)?;
    Ok(deleted)
}

/// The finished jobs whose time ran out at `now`.
pub fn expired_jobs(conn: &mut DbConnection, now: i64) -> Result<Vec<String>, StoreError> {
    export_jobs::table
        .filter(export_jobs::expires_at.lt(now))
        .select(export_jobs::id)
        .load(conn)
        .map_err(StoreError::classify)
}

fn delete_files(conn: &mut DbConnection, id: &str) -> Result<(), StoreError> {
    diesel::delete(export_files::table.filter(export_files::job_id.eq(id)))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// One output file of a job, without its content.
#[derive(Debug, Clone, PartialEq, Eq, Queryable)]
pub struct FileInfo {
    pub file_no: i32,
    pub resource_type: String,
    pub resource_count: i64,
}

pub fn insert_file(
    conn: &mut DbConnection,
    job_id: &str,
    info: &FileInfo,
    sealed: &EncryptedBlob,
) -> Result<(), StoreError> {
    diesel::insert_into(export_files::table)
        .values((
            export_files::job_id.eq(job_id),
            export_files::file_no.eq(info.file_no),
            export_files::resource_type.eq(&info.resource_type),
            export_files::resource_count.eq(info.resource_count),
            export_files::key_id.eq(&sealed.key_id),
            export_files::wrapped_key.eq(&sealed.wrapped_key),
            export_files::nonce.eq(&sealed.nonce),
            export_files::ciphertext.eq(&sealed.ciphertext),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// A job's files, in order.
pub fn files(conn: &mut DbConnection, job_id: &str) -> Result<Vec<FileInfo>, StoreError> {
    export_files::table
        .filter(export_files::job_id.eq(job_id))
        .order(export_files::file_no.asc())
        .select((
            export_files::file_no,
            export_files::resource_type,
            export_files::resource_count,
        ))
        .load(conn)
        .map_err(StoreError::classify)
}

/// One file's type and sealed content.
pub fn file(
    conn: &mut DbConnection,
    job_id: &str,
    file_no: i32,
) -> Result<Option<(String, EncryptedBlob)>, StoreError> {
    type SealedFileRow = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);
    let row: Option<SealedFileRow> = export_files::table
        .find((job_id, file_no))
        .select((
            export_files::resource_type,
            export_files::key_id,
            export_files::wrapped_key,
            export_files::nonce,
            export_files::ciphertext,
        ))
        .first(conn)
        .optional()
        .map_err(StoreError::classify)?;
    Ok(
        row.map(|(resource_type, key_id, wrapped_key, nonce, ciphertext)| {
            (
                resource_type,
                EncryptedBlob {
                    key_id,
                    wrapped_key,
                    nonce,
                    ciphertext,
                },
            )
        }),
    )
}
