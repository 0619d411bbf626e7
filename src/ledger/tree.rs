//! The RFC 6962 Merkle tree over ledger entries, through `tlog_tiles` (a port of Go's
//! `golang.org/x/mod/sumdb/tlog`). Node hashes are kept in tlog's "stored hash" order: the
//! hashes added by record `n` start at `stored_hash_index(0, n)`, so appending never
//! rewrites earlier hashes and proofs read O(log n) of them.

use std::cell::RefCell;
use std::collections::HashMap;

pub use tlog_tiles::Hash;
use tlog_tiles::{HashReader, tlog};

/// Errors of the ledger's pure code.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("proof does not verify")]
    InvalidProof,
    #[error("{0}")]
    OutOfRange(String),
    #[error("hash storage: {0}")]
    Storage(String),
    #[error("malformed: {0}")]
    Malformed(String),
}

/// Where the tree's stored hashes live (a database table, or a vector in tests).
pub trait HashStore {
    /// The hashes at the given stored-hash indexes, in the same order.
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError>;
}

/// Adapts a [`HashStore`] to tlog's reader, keeping the real error for the caller.
struct Reader<'a, S: HashStore + ?Sized> {
    store: &'a S,
    error: RefCell<Option<LedgerError>>,
}

impl<'a, S: HashStore + ?Sized> Reader<'a, S> {
    fn new(store: &'a S) -> Self {
        Self {
            store,
            error: RefCell::new(None),
        }
    }

    fn map_err(&self, error: tlog::Error) -> LedgerError {
        self.error.borrow_mut().take().unwrap_or(match error {
            tlog::Error::InvalidProof => LedgerError::InvalidProof,
            other => LedgerError::Malformed(other.to_string()),
        })
    }
}

impl<S: HashStore + ?Sized> HashReader for Reader<'_, S> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog::Error> {
        match self.store.read_hashes(indexes) {
            // tlog panics on a short answer; refuse it here instead.
            Ok(hashes) if hashes.len() == indexes.len() => Ok(hashes),
            Ok(_) => {
                *self.error.borrow_mut() = Some(LedgerError::Storage(
                    "hash store returned the wrong number of hashes".into(),
                ));
                Err(tlog::Error::IndexesNotInTree)
            }
            Err(error) => {
                *self.error.borrow_mut() = Some(error);
                Err(tlog::Error::IndexesNotInTree)
            }
        }
    }
}

/// SHA-256(0x00 ‖ data), RFC 6962 §2.1.
pub fn leaf_hash(data: &[u8]) -> Hash {
    tlog::record_hash(data)
}

/// Stored-hash index of the hash at `level` and position `n` (tlog layout).
pub fn stored_hash_index(level: u8, n: u64) -> u64 {
    tlog::stored_hash_index(level, n)
}

/// The hashes that appending record `n` (with leaf data `data`) adds, starting at
/// `stored_hash_index(0, n)`. The store must hold every hash of records `0..n`.
pub fn hashes_for_append<S: HashStore + ?Sized>(
    store: &S,
    n: u64,
    data: &[u8],
) -> Result<Vec<Hash>, LedgerError> {
    let reader = Reader::new(store);
    tlog::stored_hashes(n, data, &reader).map_err(|e| reader.map_err(e))
}

/// Root hash of the tree of `size` records.
pub fn root<S: HashStore + ?Sized>(store: &S, size: u64) -> Result<Hash, LedgerError> {
    let reader = Reader::new(store);
    tlog::tree_hash(size, &reader).map_err(|e| reader.map_err(e))
}

/// RFC 6962 §2.1.1 audit path of record `index` in the tree of `tree_size` records.
pub fn inclusion_proof<S: HashStore + ?Sized>(
    store: &S,
    tree_size: u64,
    index: u64,
) -> Result<Vec<Hash>, LedgerError> {
    if index >= tree_size {
        return Err(LedgerError::OutOfRange(format!(
            "index {index} is not below tree size {tree_size}"
        )));
    }
    let reader = Reader::new(store);
    tlog::prove_record(tree_size, index, &reader).map_err(|e| reader.map_err(e))
}

/// RFC 6962 §2.1.2 consistency proof between the trees of `first` and `second` records.
pub fn consistency_proof<S: HashStore + ?Sized>(
    store: &S,
    first: u64,
    second: u64,
) -> Result<Vec<Hash>, LedgerError> {
    if first > second {
        return Err(LedgerError::OutOfRange(format!(
            "first ({first}) is larger than second ({second})"
        )));
    }
    if first == 0 || first == second {
        return Ok(Vec::new());
    }
    let reader = Reader::new(store);
    tlog::prove_tree(second, first, &reader).map_err(|e| reader.map_err(e))
}

/// Checks an audit path: record `index` with leaf hash `leaf` is in the tree of
/// `tree_size` records whose root is `root`.
pub fn verify_inclusion(
    proof: &[Hash],
    tree_size: u64,
    root: Hash,
    index: u64,
    leaf: Hash,
) -> Result<(), LedgerError> {
    if index >= tree_size {
        return Err(LedgerError::InvalidProof);
    }
    tlog::check_record(&proof.to_vec(), tree_size, root, index, leaf)
        .map_err(|_| LedgerError::InvalidProof)
}

/// Checks that the tree (`second`, `second_root`) extends (`first`, `first_root`).
pub fn verify_consistency(
    proof: &[Hash],
    first: u64,
    first_root: Hash,
    second: u64,
    second_root: Hash,
) -> Result<(), LedgerError> {
    if first > second {
        return Err(LedgerError::InvalidProof);
    }
    if first == second {
        return if proof.is_empty() && first_root == second_root {
            Ok(())
        } else {
            Err(LedgerError::InvalidProof)
        };
    }
    if first == 0 {
        // Every tree extends the empty tree (RFC 9162 §2.1.4: the proof is empty).
        return if proof.is_empty() {
            Ok(())
        } else {
            Err(LedgerError::InvalidProof)
        };
    }
    tlog::check_tree(&proof.to_vec(), second, second_root, first, first_root)
        .map_err(|_| LedgerError::InvalidProof)
}

/// Stored hashes in memory, in stored-hash order (tests, the auditor, benchmarks).
#[derive(Debug, Default, Clone)]
pub struct MemoryHashStore {
    hashes: Vec<Hash>,
    size: u64,
}

impl MemoryHashStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends one record; returns its leaf hash.
    pub fn append(&mut self, data: &[u8]) -> Result<Hash, LedgerError> {
        let added = hashes_for_append(self, self.size, data)?;
        let leaf = added
            .first()
            .copied()
            .ok_or_else(|| LedgerError::Storage("append added no hash".into()))?;
        self.hashes.extend(added);
        self.size += 1;
        Ok(leaf)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }
}

impl HashStore for MemoryHashStore {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        indexes
            .iter()
            .map(|&i| {
                usize::try_from(i)
                    .ok()
                    .and_then(|i| self.hashes.get(i).copied())
                    .ok_or_else(|| LedgerError::Storage(format!("no stored hash {i}")))
            })
            .collect()
    }
}

/// Hashes added in memory on top of another store (a batch being sequenced). Hashes read
/// from the base store are cached: appending a batch keeps asking for the same few
/// right-edge hashes of the tree as it was before the batch.
pub struct OverlayHashStore<'a, S: HashStore + ?Sized> {
    base: &'a S,
    added: HashMap<u64, Hash>,
    cache: RefCell<HashMap<u64, Hash>>,
}

impl<'a, S: HashStore + ?Sized> OverlayHashStore<'a, S> {
    pub fn new(base: &'a S) -> Self {
        Self {
            base,
            added: HashMap::new(),
            cache: RefCell::new(HashMap::new()),
        }
    }

    /// Appends record `n`, which must be the next one; returns its leaf hash.
    pub fn append(&mut self, n: u64, data: &[u8]) -> Result<Hash, LedgerError> {
        let added = hashes_for_append(self, n, data)?;
        let start = stored_hash_index(0, n);
        let leaf = added
            .first()
            .copied()
            .ok_or_else(|| LedgerError::Storage("append added no hash".into()))?;
        for (offset, hash) in (0u64..).zip(added) {
            self.added.insert(start + offset, hash);
        }
        Ok(leaf)
    }

    /// The hashes added on top of the base store, in stored-hash order.
    pub fn into_added(self) -> Vec<(u64, Hash)> {
        let mut added: Vec<(u64, Hash)> = self.added.into_iter().collect();
        added.sort_unstable_by_key(|(index, _)| *index);
        added
    }
}

impl<S: HashStore + ?Sized> HashStore for OverlayHashStore<'_, S> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        let missing: Vec<u64> = {
            let cache = self.cache.borrow();
            indexes
                .iter()
                .copied()
                .filter(|i| !self.added.contains_key(i) && !cache.contains_key(i))
                .collect()
        };
        if !missing.is_empty() {
            let fetched = self.base.read_hashes(&missing)?;
            self.cache
                .borrow_mut()
                .extend(missing.into_iter().zip(fetched));
        }
        let cache = self.cache.borrow();
        indexes
            .iter()
            .map(|i| {
                self.added
                    .get(i)
                    .or_else(|| cache.get(i))
                    .copied()
                    .ok_or_else(|| LedgerError::Storage(format!("no stored hash {i}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng as _, SeedableRng as _};

    fn store_of(n: u64) -> MemoryHashStore {
        let mut store = MemoryHashStore::new();
        for i in 0..n {
            store.append(format!("entry {i}").as_bytes()).unwrap();
        }
        store
    }

    fn flip(hash: Hash, bit: usize) -> Hash {
        let mut bytes = hash.0;
        bytes[bit / 8 % 32] ^= 1 << (bit % 8);
        Hash(bytes)
    }

    #[test]
    fn every_proof_verifies_and_any_flipped_bit_fails() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6962);
        let store = store_of(300);
        for _ in 0..200 {
            let size = rng.gen_range(1..=300u64);
            let index = rng.gen_range(0..size);
            let root_hash = root(&store, size).unwrap();
            let leaf = store.read_hashes(&[stored_hash_index(0, index)]).unwrap()[0];
            let proof = inclusion_proof(&store, size, index).unwrap();
            verify_inclusion(&proof, size, root_hash, index, leaf).unwrap();
            let bit = rng.gen_range(0..256);
            assert!(verify_inclusion(&proof, size, root_hash, index, flip(leaf, bit)).is_err());
            assert!(verify_inclusion(&proof, size, flip(root_hash, bit), index, leaf).is_err());
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let at = rng.gen_range(0..bad.len());
                bad[at] = flip(bad[at], bit);
                assert!(verify_inclusion(&bad, size, root_hash, index, leaf).is_err());
            }

            let first = rng.gen_range(1..=size);
            let first_root = root(&store, first).unwrap();
            let proof = consistency_proof(&store, first, size).unwrap();
            verify_consistency(&proof, first, first_root, size, root_hash).unwrap();
            assert!(
                verify_consistency(&proof, first, flip(first_root, bit), size, root_hash).is_err()
            );
            assert!(
                verify_consistency(&proof, first, first_root, size, flip(root_hash, bit)).is_err()
            );
            if !proof.is_empty() {
                let mut bad = proof.clone();
                let at = rng.gen_range(0..bad.len());
                bad[at] = flip(bad[at], bit);
                assert!(verify_consistency(&bad, first, first_root, size, root_hash).is_err());
            }
        }
    }

    #[test]
    fn overlay_appends_match_a_single_store() {
        let whole = store_of(40);
        let first = store_of(25);
        let mut overlay = OverlayHashStore::new(&first);
        for i in 25..40u64 {
            overlay.append(i, format!("entry {i}").as_bytes()).unwrap();
        }
        assert_eq!(root(&overlay, 40).unwrap(), root(&whole, 40).unwrap());
        let added = overlay.into_added();
        let start = usize::try_from(stored_hash_index(0, 25)).unwrap();
        assert_eq!(added.first().unwrap().0, stored_hash_index(0, 25));
        assert!(
            added
                .iter()
                .zip(&whole.hashes()[start..])
                .all(|((_, a), b)| a == b)
        );
        assert_eq!(added.len(), whole.hashes().len() - start);
    }

    #[test]
    fn out_of_range_requests_are_errors_not_panics() {
        let store = store_of(5);
        assert!(inclusion_proof(&store, 5, 5).is_err());
        assert!(consistency_proof(&store, 6, 5).is_err());
        assert!(root(&store, 9).is_err());
        assert!(inclusion_proof(&store, 9, 1).is_err());
    }
}
