//! Reading the log back for the ledger API: entries by position, receipt or leaf hash,
//! inclusion and consistency proofs, tiles and the latest signed checkpoint.

use crate::error::AppError;
use crate::ledger::tiles::{TILE_WIDTH, TileRef, tile_data};
use crate::ledger::tree;
use crate::ledger::{Hash, LedgerError};
use crate::store::ledger::{
    self as rows, CheckpointRow, CosignedCheckpoint, DbHashStore, EntryRow,
};

use super::{LedgerService, out_of_range, to_i64, to_u64};
use crate::service::blocking;

/// Most entries one page of `GET /ledger/entries` returns.
pub const MAX_ENTRIES_PAGE: i64 = 1000;

/// A sequenced entry as served.
#[derive(Debug, Clone)]
pub struct ServedEntry {
    pub index: Option<u64>,
    pub receipt: String,
    pub leaf_data: Vec<u8>,
}

impl From<EntryRow> for ServedEntry {
    fn from(row: EntryRow) -> Self {
        Self {
            index: row.leaf_index.and_then(|i| u64::try_from(i).ok()),
            receipt: row.receipt,
            leaf_data: row.data,
        }
    }
}

/// The latest checkpoint.
#[derive(Debug, Clone)]
pub struct CurrentCheckpoint {
    pub size: u64,
    pub root: Hash,
    pub note: String,
}

impl TryFrom<CheckpointRow> for CurrentCheckpoint {
    type Error = AppError;

    fn try_from(row: CheckpointRow) -> Result<Self, AppError> {
        let root: [u8; 32] = row
            .root_hash
            .try_into()
            .map_err(|_| AppError::Internal("stored checkpoint root is not 32 bytes".into()))?;
        Ok(Self {
            size: to_u64(row.tree_size)?,
            root: Hash(root),
            note: row.note,
        })
    }
}

impl LedgerService {
    /// The latest signed checkpoint (signing the empty tree's first if there is none yet).
    pub async fn checkpoint(&self) -> Result<CurrentCheckpoint, AppError> {
        let this = self.clone();
        blocking(move || {
            if let Some(current) = this.latest_checkpoint()? {
                return Ok(current);
            }
            this.sequence_pending()?;
            this.latest_checkpoint()?
                .ok_or_else(|| AppError::Internal("no checkpoint after sequencing".into()))
        })
        .await
    }

    pub(super) fn latest_checkpoint(&self) -> Result<Option<CurrentCheckpoint>, AppError> {
        let mut conn = self.connection()?;
        rows::latest_checkpoint(&mut conn)?
            .map(CurrentCheckpoint::try_from)
            .transpose()
    }

    /// Sequenced entries with `start <= index < end` (bounded to [`MAX_ENTRIES_PAGE`]).
    pub async fn entries(&self, start: u64, end: u64) -> Result<Vec<ServedEntry>, AppError> {
        let this = self.clone();
        blocking(move || {
            let end = end.min(start.saturating_add(MAX_ENTRIES_PAGE as u64));
            let mut conn = this.connection()?;
            Ok(
                rows::entries_range(&mut conn, to_i64(start)?, to_i64(end)?)?
                    .into_iter()
                    .map(ServedEntry::from)
                    .collect(),
            )
        })
        .await
    }

    pub async fn entry_by_receipt(&self, receipt: String) -> Result<ServedEntry, AppError> {
        let this = self.clone();
        blocking(move || {
            let mut conn = this.connection()?;
            rows::entry_by_receipt(&mut conn, &receipt)?
                .map(ServedEntry::from)
                .ok_or_else(|| {
                    AppError::NotFound(format!(
                        "ledger receipt {}",
                        receipt.chars().take(64).collect::<String>()
                    ))
                })
        })
        .await
    }

    pub async fn entry_by_leaf_hash(&self, leaf: Hash) -> Result<ServedEntry, AppError> {
        let this = self.clone();
        blocking(move || {
            let mut conn = this.connection()?;
            rows::entry_by_leaf_hash(&mut conn, &leaf.0)?
                .map(ServedEntry::from)
                .ok_or_else(|| AppError::NotFound("no ledger entry has that leaf hash".into()))
        })
        .await
    }

    /// Audit path of `index` in the tree of `tree_size` (which must not exceed the latest
    /// checkpoint), with the leaf hash.
    pub async fn inclusion_proof(
        &self,
        index: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AppError> {
        let this = self.clone();
        blocking(move || {
            this.check_tree_size(tree_size)?;
            if index >= tree_size {
                return Err(out_of_range(format!(
                    "index {index} is not below tree_size {tree_size}"
                )));
            }
            let mut conn = this.connection()?;
            let store = DbHashStore::new(&mut conn);
            let leaf = tree::HashStore::read_hashes(&store, &[tree::stored_hash_index(0, index)])
                .map_err(AppError::from)?;
            let proof = tree::inclusion_proof(&store, tree_size, index).map_err(AppError::from)?;
            Ok((
                leaf.first()
                    .copied()
                    .ok_or_else(|| AppError::Internal("leaf hash missing".into()))?,
                proof,
            ))
        })
        .await
    }

    pub async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AppError> {
        let this = self.clone();
        blocking(move || {
            this.check_tree_size(second)?;
            if first > second {
                return Err(out_of_range(format!(
                    "first ({first}) must not exceed second ({second})"
                )));
            }
            let mut conn = this.connection()?;
            tree::consistency_proof(&DbHashStore::new(&mut conn), first, second)
                .map_err(AppError::from)
        })
        .await
    }

    pub async fn tile(&self, tile: TileRef) -> Result<Vec<u8>, AppError> {
        let this = self.clone();
        blocking(move || {
            let size = this.latest_checkpoint()?.map_or(0, |c| c.size);
            let mut conn = this.connection()?;
            tile_data(&DbHashStore::new(&mut conn), tile, size).map_err(|e| match e {
                LedgerError::OutOfRange(message) => AppError::NotFound(message),
                other => AppError::from(other),
            })
        })
        .await
    }

    /// A C2SP tlog-tiles entry bundle: the entries with indexes `256·N … 256·N+W-1`, each
    /// as a big-endian 16-bit length and the leaf bytes. Entries are made small enough for
    /// it (see `event::MAX_ENTRY_RESOURCES`); one written before that bound which is larger
    /// cannot be put in a bundle, and the bundle is refused naming it.
    pub async fn entry_bundle(&self, tile: TileRef) -> Result<Vec<u8>, AppError> {
        let this = self.clone();
        blocking(move || {
            let size = this.latest_checkpoint()?.map_or(0, |c| c.size);
            let start = tile.index.saturating_mul(TILE_WIDTH);
            let end = start.saturating_add(tile.width);
            if end > size {
                return Err(AppError::NotFound(format!(
                    "entry bundle of entries {start}..{end}: the latest checkpoint holds {size}"
                )));
            }
            let mut conn = this.connection()?;
            let rows = rows::entries_range(&mut conn, to_i64(start)?, to_i64(end)?)?;
            if rows.len() as u64 != tile.width {
                return Err(AppError::Internal(format!(
                    "entries {start}..{end} are sequenced but {} were found",
                    rows.len()
                )));
            }
            let mut bundle = Vec::with_capacity(rows.iter().map(|r| r.data.len() + 2).sum());
            for (index, row) in (start..).zip(&rows) {
                let length = u16::try_from(row.data.len()).map_err(|_| {
                    AppError::Conflict(format!(
                        "entry {index} is {} bytes, more than an entry bundle allows; read it \
                         at /ledger/entries/{index}",
                        row.data.len()
                    ))
                })?;
                bundle.extend_from_slice(&length.to_be_bytes());
                bundle.extend_from_slice(&row.data);
            }
            Ok(bundle)
        })
        .await
    }

    /// A checkpoint with at least `min_cosignatures` witness cosignatures, chosen by
    /// `which`: its tree size, and the signed note whose signature lines are the log's then
    /// the witnesses'.
    pub async fn cosigned_checkpoint(
        &self,
        which: CosignedCheckpoint,
        min_cosignatures: u64,
    ) -> Result<Option<(u64, String)>, AppError> {
        let this = self.clone();
        blocking(move || {
            let mut conn = this.connection()?;
            let min = to_i64(min_cosignatures.max(1))?;
            rows::cosigned_note(&mut conn, which, min)?
                .map(|(size, note)| Ok((to_u64(size)?, note)))
                .transpose()
        })
        .await
    }

    fn check_tree_size(&self, tree_size: u64) -> Result<(), AppError> {
        let current = self.latest_checkpoint()?.map_or(0, |c| c.size);
        if tree_size > current {
            return Err(out_of_range(format!(
                "tree_size {tree_size} exceeds the latest checkpoint's size {current}"
            )));
        }
        Ok(())
    }

    pub(super) fn connection(&self) -> Result<crate::store::PooledConnection, AppError> {
        self.pool.get().map_err(AppError::from)
    }
}
