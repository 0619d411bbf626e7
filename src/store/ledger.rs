//! Queries over the ledger tables: pending entries, their sequencing, the stored tree
//! hashes and the signed checkpoints.

use std::cell::RefCell;
use std::collections::HashMap;

use diesel::prelude::*;

use super::database::{DbConnection, on_backend};
use super::entry_codec;
use super::error::StoreError;
use super::schema::{
    ledger_checkpoints, ledger_cosignatures, ledger_entries, ledger_hashes, ledger_keys,
    ledger_patient_entries, ledger_state,
};
use crate::ledger::{Hash, HashStore, LedgerError};

/// Lock key held (per transaction) by the one sequencer of a PostgreSQL database.
const SEQUENCER_LOCK_KEY: i64 = 0x6668_6c65_6467_7371; // "fhledgsq"

/// Most rows one INSERT carries (SQLite allows 32,766 bound parameters per statement).
const INSERT_CHUNK: usize = 1000;
/// Most entries one SQLite sequencing UPDATE carries (three parameters each).
const SQLITE_UPDATE_CHUNK: usize = 2000;

/// A stored entry.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = ledger_entries)]
pub struct EntryRow {
    pub pending_seq: i64,
    pub receipt: String,
    pub leaf_index: Option<i64>,
    pub leaf_hash: Option<Vec<u8>>,
    pub data: Vec<u8>,
    pub created_at: i64,
    pub sequenced_at: Option<i64>,
}

/// An entry row as loaded, with its leaf bytes decoded from their stored form.
fn decoded(mut row: EntryRow) -> Result<EntryRow, StoreError> {
    row.data = entry_codec::decode(&row.data)?;
    Ok(row)
}

/// A stored checkpoint.
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = ledger_checkpoints)]
pub struct CheckpointRow {
    pub tree_size: i64,
    pub root_hash: Vec<u8>,
    pub note: String,
    pub created_at: i64,
}

pub fn insert_entry(
    conn: &mut DbConnection,
    receipt: &str,
    data: &[u8],
    created_at: i64,
) -> Result<(), StoreError> {
    let stored = entry_codec::encode(data);
    let values = (
        ledger_entries::receipt.eq(receipt),
        ledger_entries::data.eq(&stored),
        ledger_entries::created_at.eq(created_at),
    );
    on_backend!(conn, conn => diesel::insert_into(ledger_entries::table)
        .values(values)
        .execute(conn))
    .map(|_| ())
    .map_err(StoreError::classify)
}

/// Stores entries as pending, `(receipt, leaf bytes, created_at)` each: one entry through
/// the statement every request prepares once, several (an interaction that touched many
/// patients' records, a group commit) in multi-row INSERTs.
pub fn insert_entries(
    conn: &mut DbConnection,
    entries: &[(&str, &[u8], i64)],
) -> Result<(), StoreError> {
    if let [(receipt, data, created_at)] = entries {
        return insert_entry(conn, receipt, data, *created_at);
    }
    for chunk in entries.chunks(INSERT_CHUNK) {
        let stored: Vec<Vec<u8>> = chunk
            .iter()
            .map(|(_, data, _)| entry_codec::encode(data))
            .collect();
        let rows: Vec<_> = chunk
            .iter()
            .zip(&stored)
            .map(|((receipt, _, created_at), stored)| {
                (
                    ledger_entries::receipt.eq(*receipt),
                    ledger_entries::data.eq(stored),
                    ledger_entries::created_at.eq(*created_at),
                )
            })
            .collect();
        on_backend!(conn, conn => diesel::insert_into(ledger_entries::table)
            .values(rows)
            .execute(conn))
        .map_err(StoreError::classify)?;
    }
    Ok(())
}

/// Takes the sequencer lock for the current write transaction
/// ([`crate::store::DbPool::write`]), so that of several server processes exactly one
/// sequences at a time (`false`: another process holds it). See
/// [`Dialect::try_transaction_lock`](super::dialect::Dialect::try_transaction_lock).
pub fn try_lock_sequencer(conn: &mut DbConnection) -> Result<bool, StoreError> {
    #[derive(QueryableByName)]
    struct Locked {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        locked: bool,
    }
    let Some(lock) = conn.dialect().try_transaction_lock(SEQUENCER_LOCK_KEY) else {
        return Ok(true);
    };
    let row: Locked = diesel::sql_query(lock)
        .get_result(conn)
        .map_err(StoreError::classify)?;
    Ok(row.locked)
}

pub fn tree_size(conn: &mut DbConnection) -> Result<i64, StoreError> {
    ledger_state::table
        .find(1)
        .select(ledger_state::tree_size)
        .first(conn)
        .map_err(StoreError::classify)
}

pub fn set_tree_size(conn: &mut DbConnection, size: i64) -> Result<(), StoreError> {
    diesel::update(ledger_state::table.find(1))
        .set(ledger_state::tree_size.eq(size))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// How many sequenced entries (from index 0) `ledger_patient_entries` covers.
pub fn patient_index_size(conn: &mut DbConnection) -> Result<i64, StoreError> {
    ledger_state::table
        .find(1)
        .select(ledger_state::patient_index_size)
        .first(conn)
        .map_err(StoreError::classify)
}

/// Records which patients the entries `[from, to)` touched: `(patient, leaf_index)` rows,
/// and that the index now covers `to` entries.
pub fn index_patients(
    conn: &mut DbConnection,
    rows: &[(String, i64)],
    to: i64,
) -> Result<(), StoreError> {
    // Inside the sequencer's transaction, a batch's pairs in multi-row INSERTs.
    for chunk in rows.chunks(INSERT_CHUNK) {
        let values: Vec<_> = chunk
            .iter()
            .map(|(patient, index)| {
                (
                    ledger_patient_entries::patient.eq(patient),
                    ledger_patient_entries::leaf_index.eq(index),
                )
            })
            .collect();
        on_backend!(conn, conn => diesel::insert_into(ledger_patient_entries::table)
            .values(values)
            .execute(conn))
        .map_err(StoreError::classify)?;
    }
    diesel::update(ledger_state::table.find(1))
        .set(ledger_state::patient_index_size.eq(to))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// The leaf indexes of the entries that touched `patient`, newest first, below `before`.
pub fn patient_entry_indexes(
    conn: &mut DbConnection,
    patient: &str,
    before: i64,
    limit: i64,
) -> Result<Vec<i64>, StoreError> {
    ledger_patient_entries::table
        .filter(ledger_patient_entries::patient.eq(patient))
        .filter(ledger_patient_entries::leaf_index.lt(before))
        .order(ledger_patient_entries::leaf_index.desc())
        .select(ledger_patient_entries::leaf_index)
        .limit(limit)
        .load(conn)
        .map_err(StoreError::classify)
}

/// The sequenced entries with these leaf indexes.
pub fn entries_at(conn: &mut DbConnection, indexes: &[i64]) -> Result<Vec<EntryRow>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::leaf_index.eq_any(indexes))
        .select(EntryRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)?
        .into_iter()
        .map(decoded)
        .collect()
}

/// The oldest pending entries: (pending_seq, leaf data).
pub fn pending_batch(
    conn: &mut DbConnection,
    limit: i64,
) -> Result<Vec<(i64, Vec<u8>, i64)>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::leaf_index.is_null())
        .order(ledger_entries::pending_seq.asc())
        .select((
            ledger_entries::pending_seq,
            ledger_entries::data,
            ledger_entries::created_at,
        ))
        .limit(limit)
        .load::<(i64, Vec<u8>, i64)>(conn)
        .map_err(StoreError::classify)?
        .into_iter()
        .map(|(pending_seq, stored, created_at)| {
            Ok((pending_seq, entry_codec::decode(&stored)?, created_at))
        })
        .collect()
}

/// Gives pending entries their leaf index and leaf hash: `(pending_seq, leaf_index,
/// leaf_hash)`. Fails if any of them was already sequenced (a second sequencer got in).
pub fn assign_indexes(
    conn: &mut DbConnection,
    assignments: &[(i64, i64, Vec<u8>)],
    now: i64,
) -> Result<(), StoreError> {
    // One statement per chunk of entries, written as each backend runs it fastest.
    let updated = match conn {
        DbConnection::Postgres(pg) => assign_indexes_unnested(pg, assignments, now)?,
        DbConnection::Sqlite(sqlite) => assign_indexes_from_values(sqlite, assignments, now)?,
    };
    if updated == assignments.len() {
        Ok(())
    } else {
        Err(StoreError::Unavailable(
            "pending entries were sequenced concurrently".into(),
        ))
    }
}

/// PostgreSQL: one statement for the whole batch, its columns bound as three arrays and
/// unnested (a round trip per entry would cap sequencing at a few thousand entries per
/// second). Returns how many entries were updated.
fn assign_indexes_unnested(
    pg: &mut diesel::pg::PgConnection,
    assignments: &[(i64, i64, Vec<u8>)],
    now: i64,
) -> Result<usize, StoreError> {
    use diesel::sql_types::{Array, BigInt, Binary};
    let mut updated = 0;
    for chunk in assignments.chunks(INSERT_CHUNK) {
        let seqs: Vec<i64> = chunk.iter().map(|(seq, _, _)| *seq).collect();
        let indexes: Vec<i64> = chunk.iter().map(|(_, index, _)| *index).collect();
        let leaves: Vec<Vec<u8>> = chunk.iter().map(|(_, _, leaf)| leaf.clone()).collect();
        updated += diesel::sql_query(
                    "UPDATE ledger_entries AS e SET leaf_index = v.leaf_index, leaf_hash = v.leaf_hash, sequenced_at = $4 \
                     FROM (SELECT unnest($1::bigint[]) AS pending_seq, unnest($2::bigint[]) AS leaf_index, \
                                  unnest($3::bytea[]) AS leaf_hash) AS v \
                     WHERE e.pending_seq = v.pending_seq AND e.leaf_index IS NULL",
                )
                .bind::<Array<BigInt>, _>(seqs)
                .bind::<Array<BigInt>, _>(indexes)
                .bind::<Array<Binary>, _>(leaves)
                .bind::<BigInt, _>(now)
                .execute(pg)
                .map_err(StoreError::classify)?;
    }
    Ok(updated)
}

/// SQLite: one UPDATE … FROM (VALUES …) per chunk (diesel parses an UPDATE again on every
/// execution, which per entry cost more than the update itself). Returns how many entries
/// were updated.
fn assign_indexes_from_values(
    sqlite: &mut diesel::sqlite::SqliteConnection,
    assignments: &[(i64, i64, Vec<u8>)],
    now: i64,
) -> Result<usize, StoreError> {
    use diesel::sql_types::{BigInt, Binary};
    let mut updated = 0;
    for chunk in assignments.chunks(SQLITE_UPDATE_CHUNK) {
        let values = vec!["(?, ?, ?)"; chunk.len()].join(", ");
        let mut query = diesel::sql_query(format!(
                    "UPDATE ledger_entries SET leaf_index = v.column2, leaf_hash = v.column3, \
                     sequenced_at = ? FROM (VALUES {values}) AS v \
                     WHERE ledger_entries.pending_seq = v.column1 AND ledger_entries.leaf_index IS NULL"
                ))
                .into_boxed::<diesel::sqlite::Sqlite>()
                .bind::<BigInt, _>(now);
        for (pending_seq, leaf_index, leaf_hash) in chunk {
            query = query
                .bind::<BigInt, _>(*pending_seq)
                .bind::<BigInt, _>(*leaf_index)
                .bind::<Binary, _>(leaf_hash.clone());
        }
        updated += query.execute(sqlite).map_err(StoreError::classify)?;
    }
    Ok(updated)
}

pub fn insert_hashes(conn: &mut DbConnection, hashes: &[(i64, Vec<u8>)]) -> Result<(), StoreError> {
    for chunk in hashes.chunks(INSERT_CHUNK) {
        let rows: Vec<_> = chunk
            .iter()
            .map(|(index, hash)| {
                (
                    ledger_hashes::stored_index.eq(*index),
                    ledger_hashes::hash.eq(hash),
                )
            })
            .collect();
        // Multi-row INSERT is backend-specific in diesel: the same statement on each
        // backend's own connection.
        on_backend!(conn, conn => diesel::insert_into(ledger_hashes::table)
            .values(rows)
            .execute(conn))
        .map_err(StoreError::classify)?;
    }
    Ok(())
}

pub fn insert_checkpoint(conn: &mut DbConnection, row: &CheckpointRow) -> Result<(), StoreError> {
    diesel::insert_into(ledger_checkpoints::table)
        .values((
            ledger_checkpoints::tree_size.eq(row.tree_size),
            ledger_checkpoints::root_hash.eq(&row.root_hash),
            ledger_checkpoints::note.eq(&row.note),
            ledger_checkpoints::created_at.eq(row.created_at),
        ))
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

/// A key of the chain of ledger signing keys (`ledger_keys`).
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = ledger_keys)]
pub struct LedgerKeyRow {
    /// The first leaf the key signed.
    pub first_index: i64,
    pub vkey: String,
    /// For a rotation: the leaf index of the outgoing key's announcement.
    pub announced_at: Option<i64>,
    /// For a rotation: the checkpoint the outgoing key signed over it (size `first_index`).
    pub announcement: Option<String>,
    pub added_at: i64,
}

/// The chain of ledger keys, first key first.
pub fn ledger_keys(conn: &mut DbConnection) -> Result<Vec<LedgerKeyRow>, StoreError> {
    ledger_keys::table
        .order(ledger_keys::first_index)
        .select(LedgerKeyRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)
}

/// The verifier key signing now (the chain's last), if the chain was recorded.
pub fn current_ledger_key(conn: &mut DbConnection) -> Result<Option<String>, StoreError> {
    ledger_keys::table
        .order(ledger_keys::first_index.desc())
        .select(ledger_keys::vkey)
        .first(conn)
        .optional()
        .map_err(StoreError::classify)
}

pub fn insert_ledger_key(conn: &mut DbConnection, row: &LedgerKeyRow) -> Result<(), StoreError> {
    diesel::insert_into(ledger_keys::table)
        .values(row.clone())
        .execute(conn)
        .map(|_| ())
        .map_err(StoreError::classify)
}

pub fn latest_checkpoint(conn: &mut DbConnection) -> Result<Option<CheckpointRow>, StoreError> {
    ledger_checkpoints::table
        .order(ledger_checkpoints::tree_size.desc())
        .select(CheckpointRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)
}

/// Sequenced entries with `start <= leaf_index < end`, in index order.
pub fn entries_range(
    conn: &mut DbConnection,
    start: i64,
    end: i64,
) -> Result<Vec<EntryRow>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::leaf_index.ge(start))
        .filter(ledger_entries::leaf_index.lt(end))
        .order(ledger_entries::leaf_index.asc())
        .select(EntryRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)?
        .into_iter()
        .map(decoded)
        .collect()
}

pub fn entry_by_leaf_hash(
    conn: &mut DbConnection,
    leaf_hash: &[u8],
) -> Result<Option<EntryRow>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::leaf_hash.eq(leaf_hash))
        .order(ledger_entries::leaf_index.asc())
        .select(EntryRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)?
        .map(decoded)
        .transpose()
}

pub fn entry_by_receipt(
    conn: &mut DbConnection,
    receipt: &str,
) -> Result<Option<EntryRow>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::receipt.eq(receipt))
        .select(EntryRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)?
        .map(decoded)
        .transpose()
}

/// Entries not yet sequenced, oldest first (for the auditor).
pub fn pending_entries(conn: &mut DbConnection) -> Result<Vec<EntryRow>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::leaf_index.is_null())
        .order(ledger_entries::pending_seq.asc())
        .select(EntryRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)?
        .into_iter()
        .map(decoded)
        .collect()
}

pub fn read_hashes(conn: &mut DbConnection, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
    let wanted: Vec<i64> = indexes
        .iter()
        .map(|&i| {
            i64::try_from(i).map_err(|_| LedgerError::OutOfRange(format!("stored hash index {i}")))
        })
        .collect::<Result<_, _>>()?;
    let mut found: HashMap<i64, Hash> = HashMap::with_capacity(wanted.len());
    for chunk in wanted.chunks(INSERT_CHUNK) {
        let rows: Vec<(i64, Vec<u8>)> = ledger_hashes::table
            .filter(ledger_hashes::stored_index.eq_any(chunk))
            .select((ledger_hashes::stored_index, ledger_hashes::hash))
            .load(conn)
            .map_err(|e| LedgerError::Storage(StoreError::classify(e).to_string()))?;
        for (index, bytes) in rows {
            let hash: [u8; 32] = bytes.try_into().map_err(|_| {
                LedgerError::Storage(format!("stored hash {index} is not 32 bytes"))
            })?;
            found.insert(index, Hash(hash));
        }
    }
    wanted
        .iter()
        .map(|i| {
            found
                .get(i)
                .copied()
                .ok_or_else(|| LedgerError::Storage(format!("stored hash {i} is missing")))
        })
        .collect()
}

/// The stored hashes of one database connection as a [`HashStore`].
pub struct DbHashStore<'a> {
    conn: RefCell<&'a mut DbConnection>,
}

impl<'a> DbHashStore<'a> {
    pub fn new(conn: &'a mut DbConnection) -> Self {
        Self {
            conn: RefCell::new(conn),
        }
    }
}

impl HashStore for DbHashStore<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        let mut conn = self
            .conn
            .try_borrow_mut()
            .map_err(|_| LedgerError::Storage("connection busy".into()))?;
        read_hashes(&mut conn, indexes)
    }
}

/// Stored hashes with `start <= stored_index < start + limit`, in order.
pub fn hashes_page(
    conn: &mut DbConnection,
    start: i64,
    limit: i64,
) -> Result<Vec<(i64, Vec<u8>)>, StoreError> {
    ledger_hashes::table
        .filter(ledger_hashes::stored_index.ge(start))
        .order(ledger_hashes::stored_index.asc())
        .limit(limit)
        .select((ledger_hashes::stored_index, ledger_hashes::hash))
        .load(conn)
        .map_err(StoreError::classify)
}

/// A witness's cosignature of the checkpoint of `tree_size` (its signature line).
#[derive(Debug, Clone, Queryable, Selectable)]
#[diesel(table_name = ledger_cosignatures)]
pub struct CosignatureRow {
    pub tree_size: i64,
    pub witness: String,
    pub signature: String,
    pub witness_time: i64,
    pub received_at: i64,
}

/// Stores a cosignature; one already stored for that size and witness (another process
/// collected it first) is kept.
pub fn insert_cosignature(conn: &mut DbConnection, row: &CosignatureRow) -> Result<(), StoreError> {
    let inserted = diesel::insert_into(ledger_cosignatures::table)
        .values((
            ledger_cosignatures::tree_size.eq(row.tree_size),
            ledger_cosignatures::witness.eq(&row.witness),
            ledger_cosignatures::signature.eq(&row.signature),
            ledger_cosignatures::witness_time.eq(row.witness_time),
            ledger_cosignatures::received_at.eq(row.received_at),
        ))
        .execute(conn)
        .map_err(StoreError::classify);
    match inserted {
        Ok(_) | Err(StoreError::UniqueViolation) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Which cosigned checkpoint to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CosignedCheckpoint {
    /// The largest.
    Latest,
    /// The smallest that includes the entry of this index (size above it).
    Covering(i64),
    /// The largest that does not include the entry of this index (size at most it).
    Before(i64),
}

/// The size of a checkpoint with at least `min_cosignatures` cosignatures, chosen by `which`.
fn cosigned_size(
    conn: &mut DbConnection,
    which: CosignedCheckpoint,
    min_cosignatures: i64,
) -> Result<Option<i64>, StoreError> {
    use diesel::dsl::count_star;
    let sizes = ledger_cosignatures::table
        .group_by(ledger_cosignatures::tree_size)
        .having(count_star().ge(min_cosignatures))
        .select(ledger_cosignatures::tree_size);
    match which {
        CosignedCheckpoint::Latest => sizes
            .order(ledger_cosignatures::tree_size.desc())
            .first(conn),
        CosignedCheckpoint::Covering(index) => sizes
            .filter(ledger_cosignatures::tree_size.gt(index))
            .order(ledger_cosignatures::tree_size.asc())
            .first(conn),
        CosignedCheckpoint::Before(index) => sizes
            .filter(ledger_cosignatures::tree_size.le(index))
            .order(ledger_cosignatures::tree_size.desc())
            .first(conn),
    }
    .optional()
    .map_err(StoreError::classify)
}

/// The checkpoint of `tree_size` and its cosignatures, by witness name.
fn checkpoint_with_cosignatures(
    conn: &mut DbConnection,
    tree_size: i64,
) -> Result<Option<(CheckpointRow, Vec<CosignatureRow>)>, StoreError> {
    let Some(checkpoint) = ledger_checkpoints::table
        .find(tree_size)
        .select(CheckpointRow::as_select())
        .first(conn)
        .optional()
        .map_err(StoreError::classify)?
    else {
        return Ok(None);
    };
    let cosignatures = ledger_cosignatures::table
        .filter(ledger_cosignatures::tree_size.eq(tree_size))
        .order(ledger_cosignatures::witness.asc())
        .select(CosignatureRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)?;
    Ok(Some((checkpoint, cosignatures)))
}

/// The checkpoint chosen as [`cosigned_size`] chooses it, as a signed note whose signature
/// lines are the log's then the witnesses': its size and the note.
pub fn cosigned_note(
    conn: &mut DbConnection,
    which: CosignedCheckpoint,
    min_cosignatures: i64,
) -> Result<Option<(i64, String)>, StoreError> {
    let Some(size) = cosigned_size(conn, which, min_cosignatures)? else {
        return Ok(None);
    };
    let Some((checkpoint, cosignatures)) = checkpoint_with_cosignatures(conn, size)? else {
        return Ok(None);
    };
    let mut note = checkpoint.note;
    for cosignature in cosignatures {
        note.push_str(&cosignature.signature);
        note.push('\n');
    }
    Ok(Some((size, note)))
}

pub fn all_checkpoints(conn: &mut DbConnection) -> Result<Vec<CheckpointRow>, StoreError> {
    ledger_checkpoints::table
        .order(ledger_checkpoints::tree_size.asc())
        .select(CheckpointRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)
}

/// Sequenced entries with `leaf_index >= start`, at most `limit`, in index order.
pub fn entries_from(
    conn: &mut DbConnection,
    start: i64,
    limit: i64,
) -> Result<Vec<EntryRow>, StoreError> {
    ledger_entries::table
        .filter(ledger_entries::leaf_index.ge(start))
        .order(ledger_entries::leaf_index.asc())
        .limit(limit)
        .select(EntryRow::as_select())
        .load(conn)
        .map_err(StoreError::classify)?
        .into_iter()
        .map(decoded)
        .collect()
}
