//! The sequencer: gives the entries waiting in the log their leaf indexes in the order they
//! were appended, extends the RFC 6962 tree by them and signs a checkpoint of the new tree,
//! all through the small [`SequencerStore`] trait, so that the same code runs over a database
//! transaction in the server and over memory in tests. The caller runs one batch per
//! transaction and holds the sequencer lock for it: a batch and its checkpoint commit together
//! or not at all.

use super::checkpoint::sign_checkpoint;
use super::keys::LedgerKey;
use super::tree::{self, Hash, HashStore, LedgerError, OverlayHashStore};

/// A leaf's position in the log, from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeafIndex(pub u64);

/// An entry appended to the log and not yet sequenced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLeaf {
    /// The store's key of the pending entry (its append order).
    pub key: i64,
    /// The leaf bytes: the signed entry as served.
    pub data: Vec<u8>,
    /// When it was appended (µs since the epoch).
    pub appended_at: i64,
}

/// A pending entry given its place in the tree.
#[derive(Debug, Clone, PartialEq)]
pub struct SequencedLeaf {
    pub key: i64,
    pub index: LeafIndex,
    /// SHA-256(0x00 ‖ data), RFC 6962 §2.1.
    pub hash: Hash,
}

/// A signed checkpoint of the tree, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedTree {
    pub size: u64,
    pub root: Hash,
    /// The C2SP signed note.
    pub note: String,
}

/// What the sequencer needs of storage, inside one transaction.
pub trait SequencerStore {
    type Error: From<LedgerError>;

    /// The stored tree hashes as they are before this batch.
    fn hashes(&mut self) -> impl HashStore + '_;
    /// How many leaves the tree has.
    fn tree_size(&mut self) -> Result<u64, Self::Error>;
    /// The oldest pending entries, at most `limit`, oldest first.
    fn pending(&mut self, limit: usize) -> Result<Vec<PendingLeaf>, Self::Error>;
    /// Whether any checkpoint was stored yet.
    fn has_checkpoint(&mut self) -> Result<bool, Self::Error>;
    /// Stores tree hashes by stored-hash index (tlog's numbering).
    fn store_hashes(&mut self, hashes: &[(u64, Hash)]) -> Result<(), Self::Error>;
    /// Records where each pending entry went, at `sequenced_at`.
    fn assign(&mut self, leaves: &[SequencedLeaf], sequenced_at: i64) -> Result<(), Self::Error>;
    /// Stores a checkpoint and makes its size the tree's size.
    fn store_checkpoint(&mut self, tree: &SignedTree, signed_at: i64) -> Result<(), Self::Error>;
}

/// What one batch did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// How many entries it sequenced (0: none were pending).
    pub sequenced: u64,
    /// The tree's size after it.
    pub tree_size: u64,
    /// When the oldest entry it sequenced was appended (the sequencer's lag).
    pub oldest_appended: Option<i64>,
}

/// Sequences up to `limit` pending entries: their leaf hashes and the tree hashes above them
/// are stored, each entry learns its index, and a checkpoint of the new tree is signed with
/// `key`. With nothing pending it signs the current tree once, if no checkpoint exists yet
/// (the empty log's first), and changes nothing else. `now` is the time it stamps.
pub fn sequence_batch<S: SequencerStore>(
    store: &mut S,
    key: &LedgerKey,
    limit: usize,
    now: i64,
) -> Result<Batch, S::Error> {
    let size = store.tree_size()?;
    let pending = store.pending(limit)?;
    if pending.is_empty() {
        if !store.has_checkpoint()? {
            let root = tree::root(&store.hashes(), size)?;
            sign_and_store(store, key, size, root, now)?;
        }
        return Ok(Batch {
            sequenced: 0,
            tree_size: size,
            oldest_appended: None,
        });
    }

    let (added, leaves, new_size, new_root) = {
        let base = store.hashes();
        let mut overlay = OverlayHashStore::new(&base);
        let mut leaves = Vec::with_capacity(pending.len());
        for (index, leaf) in (size..).zip(&pending) {
            leaves.push(SequencedLeaf {
                key: leaf.key,
                index: LeafIndex(index),
                hash: overlay.append(index, &leaf.data)?,
            });
        }
        let new_size = size + leaves.len() as u64;
        let new_root = tree::root(&overlay, new_size)?;
        (overlay.into_added(), leaves, new_size, new_root)
    };
    store.store_hashes(&added)?;
    store.assign(&leaves, now)?;
    sign_and_store(store, key, new_size, new_root, now)?;
    Ok(Batch {
        sequenced: leaves.len() as u64,
        tree_size: new_size,
        oldest_appended: pending.first().map(|leaf| leaf.appended_at),
    })
}

fn sign_and_store<S: SequencerStore>(
    store: &mut S,
    key: &LedgerKey,
    size: u64,
    root: Hash,
    now: i64,
) -> Result<(), S::Error> {
    let note = sign_checkpoint(key, size, root)?;
    store.store_checkpoint(&SignedTree { size, root, note }, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::checkpoint::verify_checkpoint;
    use crate::ledger::tree::{MemoryHashStore, leaf_hash};

    /// The log in memory: what a database holds, as the sequencer sees it.
    #[derive(Default)]
    struct MemoryLog {
        hashes: Vec<Hash>,
        pending: Vec<PendingLeaf>,
        sequenced: Vec<SequencedLeaf>,
        checkpoints: Vec<SignedTree>,
    }

    impl MemoryLog {
        fn append(&mut self, data: &str) {
            let key = (self.pending.len() + self.sequenced.len()) as i64;
            self.pending.push(PendingLeaf {
                key,
                data: data.as_bytes().to_vec(),
                appended_at: 1_000 + key,
            });
        }
    }

    /// Stored hashes by stored-hash index.
    struct Stored<'a>(&'a [Hash]);

    impl HashStore for Stored<'_> {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
            indexes
                .iter()
                .map(|&i| {
                    let at = usize::try_from(i).unwrap();
                    self.0
                        .get(at)
                        .copied()
                        .ok_or_else(|| LedgerError::OutOfRange(format!("no hash {i}")))
                })
                .collect()
        }
    }

    impl SequencerStore for MemoryLog {
        type Error = LedgerError;

        fn hashes(&mut self) -> impl HashStore + '_ {
            Stored(&self.hashes)
        }
        fn tree_size(&mut self) -> Result<u64, LedgerError> {
            Ok(self.checkpoints.last().map_or(0, |c| c.size))
        }
        fn pending(&mut self, limit: usize) -> Result<Vec<PendingLeaf>, LedgerError> {
            Ok(self.pending.iter().take(limit).cloned().collect())
        }
        fn has_checkpoint(&mut self) -> Result<bool, LedgerError> {
            Ok(!self.checkpoints.is_empty())
        }
        fn store_hashes(&mut self, hashes: &[(u64, Hash)]) -> Result<(), LedgerError> {
            for &(index, hash) in hashes {
                let index = usize::try_from(index).unwrap();
                assert_eq!(index, self.hashes.len(), "hashes are stored in order, once");
                self.hashes.push(hash);
            }
            Ok(())
        }
        fn assign(&mut self, leaves: &[SequencedLeaf], _at: i64) -> Result<(), LedgerError> {
            for leaf in leaves {
                let at = self.pending.iter().position(|p| p.key == leaf.key).unwrap();
                self.pending.remove(at);
                self.sequenced.push(leaf.clone());
            }
            Ok(())
        }
        fn store_checkpoint(&mut self, tree: &SignedTree, _at: i64) -> Result<(), LedgerError> {
            self.checkpoints.push(tree.clone());
            Ok(())
        }
    }

    #[test]
    fn batches_extend_the_tree_in_append_order_and_sign_each_size() {
        let key = LedgerKey::generate("fhirledger.test/log").unwrap();
        let mut log = MemoryLog::default();
        let first = sequence_batch(&mut log, &key, 4, 5).unwrap();
        assert_eq!((first.sequenced, first.tree_size), (0, 0));
        assert_eq!(
            log.checkpoints.len(),
            1,
            "the empty log's checkpoint is signed once"
        );
        sequence_batch(&mut log, &key, 4, 6).unwrap();
        assert_eq!(log.checkpoints.len(), 1, "nothing new, nothing signed");

        for i in 0..7 {
            log.append(&format!("entry {i}"));
        }
        let batch = sequence_batch(&mut log, &key, 4, 7).unwrap();
        assert_eq!(batch.sequenced, 4);
        assert_eq!(batch.tree_size, 4);
        assert_eq!(batch.oldest_appended, Some(1_000));
        let batch = sequence_batch(&mut log, &key, 4, 8).unwrap();
        assert_eq!((batch.sequenced, batch.tree_size), (3, 7));
        assert!(log.pending.is_empty());

        // Each entry is the leaf at its append position, and the last checkpoint signs the
        // root of exactly these leaves (computed here from scratch).
        let expected: Vec<Hash> = (0..7)
            .map(|i| leaf_hash(format!("entry {i}").as_bytes()))
            .collect();
        let got: Vec<(i64, u64, Hash)> = log
            .sequenced
            .iter()
            .map(|leaf| (leaf.key, leaf.index.0, leaf.hash))
            .collect();
        let want: Vec<(i64, u64, Hash)> = (0..7)
            .map(|i| (i, i as u64, expected[i as usize]))
            .collect();
        assert_eq!(got, want);
        let mut whole = MemoryHashStore::new();
        for i in 0..7 {
            whole.append(format!("entry {i}").as_bytes()).unwrap();
        }
        let last = log.checkpoints.last().unwrap();
        assert_eq!(last.root, tree::root(&whole, 7).unwrap());
        let verified = verify_checkpoint(&last.note, &key.vkey()).unwrap();
        assert_eq!((verified.size, verified.root), (7, last.root));
    }
}
