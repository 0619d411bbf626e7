//! Running the sequencer over the database: one batch of pending entries per write
//! transaction, given tree positions and covered by a signed checkpoint
//! ([`crate::ledger::sequencer`] does the work over [`TxSequencerStore`]), and the patient
//! index of the entries sequenced, for the patients' AuditEvent view.

use crate::clock::now_micros;
use crate::error::AppError;
use crate::ledger::Action;
use crate::ledger::entry::LedgerEntry;
use crate::ledger::sequencer::{self, PendingLeaf, SequencedLeaf, SequencerStore, SignedTree};
use crate::ledger::{Hash, HashStore};
use crate::store::DbConnection;
use crate::store::ledger::{self as rows, CheckpointRow, DbHashStore};

use super::{LedgerService, to_i64, to_u64};

/// Knobs of the sequencer.
#[derive(Debug, Clone, Copy)]
pub struct SequencerOptions {
    /// Most entries sequenced (and so covered by one checkpoint) per transaction.
    pub batch_size: i64,
}

/// Most entries indexed by patient per sequencer transaction: entries sequenced before the
/// index existed are caught up over several runs.
const PATIENT_INDEX_CHUNK: i64 = 10_000;

/// Records which patients' compartments the sequenced entries not yet indexed touched
/// (for the patients' AuditEvent view), inside the sequencer's transaction.
pub(super) fn index_patients(tx: &mut DbConnection) -> Result<(), AppError> {
    let size = rows::tree_size(tx)?;
    let from = rows::patient_index_size(tx)?;
    if from >= size {
        return Ok(());
    }
    let to = size.min(from + PATIENT_INDEX_CHUNK);
    let mut pairs = Vec::new();
    let mut accesses = Vec::new();
    for row in rows::entries_range(tx, from, to)? {
        let (Some(index), Ok(entry)) = (
            row.leaf_index,
            serde_json::from_slice::<LedgerEntry>(&row.data),
        ) else {
            // `fhirledger audit` reports an entry that does not parse.
            tracing::warn!(
                pending_seq = row.pending_seq,
                "ledger entry not indexed by patient"
            );
            continue;
        };
        let start = pairs.len();
        pairs.extend(
            entry
                .patient_ids()
                .into_iter()
                .map(|patient| (patient, index)),
        );
        // A patient's view of the ledger and the notifications sent are no news to those
        // subscribed to accesses (and telling them would tell them again without end).
        if !matches!(
            Action::parse(&entry.action),
            Some(Action::AuditView | Action::Notify)
        ) {
            accesses.extend(
                pairs[start..]
                    .iter()
                    .map(|(patient, index)| (patient.clone(), *index, row.created_at)),
            );
        }
    }
    rows::index_patients(tx, &pairs, to)?;
    // Accesses to the records of patients whose apps subscribed to them, queued in the
    // same transaction: a restart delivers what was indexed.
    crate::store::subscriptions::enqueue_accesses(tx, &accesses, crate::clock::now_micros())?;
    Ok(())
}

impl LedgerService {
    /// Sequences every pending entry, one batch (and one checkpoint) per transaction.
    /// Returns how many entries were sequenced.
    pub fn sequence_pending(&self) -> Result<u64, AppError> {
        let mut total = 0;
        loop {
            let sequenced = self.sequence_batch()?;
            total += sequenced;
            if sequenced < u64::try_from(self.options.batch_size).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }

    /// One batch of the sequencer ([`sequencer::sequence_batch`]) in one transaction under
    /// the sequencer lock, then the patient index of what it sequenced.
    fn sequence_batch(&self) -> Result<u64, AppError> {
        let batch = self.pool.write(|tx| -> Result<_, AppError> {
            if !rows::try_lock_sequencer(tx)? {
                return Ok(None); // another process is sequencing
            }
            self.check_still_current(tx)?;
            let batch = sequencer::sequence_batch(
                &mut TxSequencerStore(tx),
                &self.key,
                usize::try_from(self.options.batch_size).unwrap_or(usize::MAX),
                now_micros(),
            )?;
            index_patients(tx)?;
            Ok(Some(batch))
        })?;
        let Some(batch) = batch else {
            return Ok(0);
        };
        if batch.sequenced > 0 {
            self.checkpoint_signed();
        }
        if let (Some(metrics), Some(oldest)) = (crate::metrics::metrics(), batch.oldest_appended) {
            let lag_micros = now_micros().saturating_sub(oldest).max(0);
            metrics
                .sequencer_lag_seconds
                .observe(lag_micros as f64 / 1_000_000.0);
            metrics
                .tree_size
                .set(i64::try_from(batch.tree_size).unwrap_or(i64::MAX));
        }
        Ok(batch.sequenced)
    }
}

/// The sequencer's storage: the ledger tables inside one write transaction.
pub(super) struct TxSequencerStore<'a>(pub(super) &'a mut DbConnection);

impl SequencerStore for TxSequencerStore<'_> {
    type Error = AppError;

    fn hashes(&mut self) -> impl HashStore + '_ {
        DbHashStore::new(&mut *self.0)
    }

    fn tree_size(&mut self) -> Result<u64, AppError> {
        to_u64(rows::tree_size(self.0)?)
    }

    fn pending(&mut self, limit: usize) -> Result<Vec<PendingLeaf>, AppError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(rows::pending_batch(self.0, limit)?
            .into_iter()
            .map(|(key, data, appended_at)| PendingLeaf {
                key,
                data,
                appended_at,
            })
            .collect())
    }

    fn has_checkpoint(&mut self) -> Result<bool, AppError> {
        Ok(rows::latest_checkpoint(self.0)?.is_some())
    }

    fn store_hashes(&mut self, hashes: &[(u64, Hash)]) -> Result<(), AppError> {
        let hashes: Vec<(i64, Vec<u8>)> = hashes
            .iter()
            .map(|(index, hash)| Ok((to_i64(*index)?, hash.0.to_vec())))
            .collect::<Result<_, AppError>>()?;
        Ok(rows::insert_hashes(self.0, &hashes)?)
    }

    fn assign(&mut self, leaves: &[SequencedLeaf], sequenced_at: i64) -> Result<(), AppError> {
        let assignments: Vec<(i64, i64, Vec<u8>)> = leaves
            .iter()
            .map(|leaf| Ok((leaf.key, to_i64(leaf.index.0)?, leaf.hash.0.to_vec())))
            .collect::<Result<_, AppError>>()?;
        Ok(rows::assign_indexes(self.0, &assignments, sequenced_at)?)
    }

    fn store_checkpoint(&mut self, tree: &SignedTree, signed_at: i64) -> Result<(), AppError> {
        rows::insert_checkpoint(
            self.0,
            &CheckpointRow {
                tree_size: to_i64(tree.size)?,
                root_hash: tree.root.0.to_vec(),
                note: tree.note.clone(),
                created_at: signed_at,
            },
        )?;
        Ok(rows::set_tree_size(self.0, to_i64(tree.size)?)?)
    }
}
