//! The chain of ledger keys: a log signs with one key until it rotates to the next, which the
//! outgoing key announces in a `ledger-key-rotate` entry included in a checkpoint it signs.
//! Following the chain from a key an auditor pinned tells which key signed each entry and
//! each checkpoint; `fhirledger verify`, `audit` and the log itself use this one module.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use super::checkpoint::{VerifiedCheckpoint, decode_hash, encode_hash, verify_checkpoint};
use super::entry::{Action, verify_entry};
use super::keys::parse_vkey;
use super::tree::{self, Hash, LedgerError};

/// One key of the chain as a log lists it (`GET /ledger/keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ListedKey {
    /// C2SP signed-note verifier key.
    pub vkey: String,
    /// The first leaf this key signed: every entry from this index on, and every checkpoint
    /// larger than it, is signed by this key (0 for the log's first key).
    pub first_index: u64,
    /// For every key but the first: how the key before it announced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announcement: Option<Announcement>,
}

/// The outgoing key's announcement of the next key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Announcement {
    /// The `ledger-key-rotate` entry's leaf index.
    pub index: u64,
    /// Base64 of the entry's leaf bytes (signed by the outgoing key).
    pub leaf_data: String,
    /// The checkpoint the outgoing key signed over the announcement: its size is the
    /// incoming key's `first_index`.
    pub checkpoint: String,
    /// Base64 hashes of the entry's inclusion proof in that checkpoint.
    pub inclusion: Vec<String>,
    /// Base64 hashes of the consistency proof from that checkpoint to the tree size the
    /// listing was asked for; absent when that size is smaller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Vec<String>>,
}

/// A key of a verified chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainKey {
    pub vkey: String,
    pub verifying: VerifyingKey,
    pub first_index: u64,
}

/// A chain of keys whose every link was verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChain {
    keys: Vec<ChainKey>,
}

/// A link of the chain: the announcement checkpoint the outgoing key signed, verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedRotation {
    pub from: String,
    pub to: String,
    pub announced_at: u64,
    pub checkpoint: VerifiedCheckpoint,
    /// The consistency proof the listing carried to the size asked for.
    pub consistency: Option<Vec<Hash>>,
}

impl KeyChain {
    /// A chain of one key (a log that never rotated).
    pub fn single(vkey: &str) -> Result<Self, LedgerError> {
        let (_, verifying) = parse_vkey(vkey).map_err(LedgerError::Malformed)?;
        Ok(Self {
            keys: vec![ChainKey {
                vkey: vkey.to_owned(),
                verifying,
                first_index: 0,
            }],
        })
    }

    /// Verifies a listed chain: its first key starts at 0, each next key is announced by an
    /// entry the key before it signed, included in a checkpoint that key signed whose size
    /// is the next key's first index, and every key names the same log. `pinned` must be
    /// one of its keys: from the first key on, each link is vouched for by the key before
    /// it; a key pinned later vouches for the earlier ones through the checkpoints it signs,
    /// which commit to the announcements (the caller checks that they extend to its
    /// checkpoint, with [`VerifiedRotation::checkpoint`]).
    pub fn verify(
        listed: &[ListedKey],
        pinned: &str,
    ) -> Result<(Self, Vec<VerifiedRotation>), LedgerError> {
        let Some(first) = listed.first() else {
            return Err(LedgerError::Malformed("the key chain is empty".into()));
        };
        if first.first_index != 0 || first.announcement.is_some() {
            return Err(LedgerError::Malformed(
                "the key chain's first key must start at entry 0".into(),
            ));
        }
        let mut chain = Self::single(&first.vkey)?;
        let (origin, _) = parse_vkey(&first.vkey).map_err(LedgerError::Malformed)?;
        let mut rotations = Vec::new();
        for next in &listed[1..] {
            let announcement = next.announcement.as_ref().ok_or_else(|| {
                LedgerError::Malformed(format!("key {} has no announcement", next.vkey))
            })?;
            let rotation = chain.follow(next, announcement, &origin)?;
            rotations.push(rotation);
        }
        if !chain.keys.iter().any(|key| key.vkey == pinned.trim()) {
            return Err(LedgerError::Malformed(
                "the pinned key is not in the log's chain of keys".into(),
            ));
        }
        Ok((chain, rotations))
    }

    fn follow(
        &mut self,
        next: &ListedKey,
        announcement: &Announcement,
        origin: &str,
    ) -> Result<VerifiedRotation, LedgerError> {
        let outgoing = self.current().clone();
        let (name, verifying) = parse_vkey(&next.vkey).map_err(LedgerError::Malformed)?;
        if name != origin {
            return Err(LedgerError::Malformed(format!(
                "key {} names another log than {origin}",
                next.vkey
            )));
        }
        let checkpoint = verify_checkpoint(&announcement.checkpoint, &outgoing.vkey)?;
        if checkpoint.size != next.first_index
            || next.first_index <= outgoing.first_index
            || announcement.index >= checkpoint.size
            || announcement.index < outgoing.first_index
        {
            return Err(LedgerError::Malformed(format!(
                "the announcement of key {} is not where the chain says",
                next.vkey
            )));
        }
        let leaf_data = BASE64
            .decode(&announcement.leaf_data)
            .map_err(|_| LedgerError::Malformed("announcement leaf_data is not base64".into()))?;
        let entry = verify_entry(&leaf_data, &outgoing.verifying)?;
        if Action::parse(&entry.action) != Some(Action::LedgerKeyRotate)
            || entry.key.as_deref() != Some(next.vkey.as_str())
        {
            return Err(LedgerError::Malformed(format!(
                "entry #{} does not announce key {}",
                announcement.index, next.vkey
            )));
        }
        let proof = decode_all(&announcement.inclusion)?;
        tree::verify_inclusion(
            &proof,
            checkpoint.size,
            checkpoint.root,
            announcement.index,
            tree::leaf_hash(&leaf_data),
        )?;
        let consistency = announcement
            .consistency
            .as_deref()
            .map(decode_all)
            .transpose()?;
        self.keys.push(ChainKey {
            vkey: next.vkey.clone(),
            verifying,
            first_index: next.first_index,
        });
        Ok(VerifiedRotation {
            from: outgoing.vkey,
            to: next.vkey.clone(),
            announced_at: announcement.index,
            checkpoint,
            consistency,
        })
    }

    /// The key signing now (the last of the chain).
    pub fn current(&self) -> &ChainKey {
        self.keys
            .last()
            .unwrap_or_else(|| unreachable!("a chain has at least one key"))
    }

    pub fn keys(&self) -> &[ChainKey] {
        &self.keys
    }

    /// The key that signed the entry at leaf `index`.
    pub fn for_entry(&self, index: u64) -> &ChainKey {
        self.keys
            .iter()
            .rev()
            .find(|key| key.first_index <= index)
            .unwrap_or_else(|| self.first())
    }

    /// The key that signed the checkpoint of a tree of `size` entries: the announcement
    /// checkpoint (whose size is the next key's first index) is the outgoing key's.
    pub fn for_checkpoint(&self, size: u64) -> &ChainKey {
        self.keys
            .iter()
            .rev()
            .find(|key| key.first_index < size)
            .unwrap_or_else(|| self.first())
    }

    /// Whether the checkpoint of a tree of `size` entries is signed by `pinned` or by a key
    /// after it: a key before the pinned one vouches for nothing the pinned key has not.
    pub fn signed_from(&self, pinned: &str, size: u64) -> bool {
        let position = |vkey: &str| self.keys.iter().position(|key| key.vkey == vkey.trim());
        match (position(&self.for_checkpoint(size).vkey), position(pinned)) {
            (Some(signer), Some(pinned)) => signer >= pinned,
            _ => false,
        }
    }

    fn first(&self) -> &ChainKey {
        self.keys
            .first()
            .unwrap_or_else(|| unreachable!("a chain has at least one key"))
    }
}

fn decode_all(hashes: &[String]) -> Result<Vec<Hash>, LedgerError> {
    hashes.iter().map(|h| decode_hash(h)).collect()
}

/// Base64 of each hash, as listings carry proofs.
pub fn encode_all(hashes: &[Hash]) -> Vec<String> {
    hashes.iter().map(encode_hash).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::checkpoint::sign_checkpoint;
    use crate::ledger::entry::{Actor, ENTRY_VERSION, LedgerEntry, Outcome};
    use crate::ledger::keys::LedgerKey;
    use crate::ledger::tree::MemoryHashStore;

    fn entry(id: &str, action: Action, key: Option<String>) -> LedgerEntry {
        LedgerEntry {
            v: ENTRY_VERSION,
            id: id.into(),
            key,
            time: "2026-12-02T10:00:00.000000Z".into(),
            actor: Actor::named("internal", "system"),
            action: action.as_str().into(),
            outcome: Outcome::Permit,
            reason: None,
            rule: None,
            withheld: None,
            resources: Vec::new(),
            patient: None,
            patients: Vec::new(),
            parts: Vec::new(),
            part_of: None,
            count: None,
            source: None,
            request: "req".into(),
        }
    }

    /// A log of three entries by `old`, the third announcing `new`, checkpointed by `old`.
    fn rotated(old: &LedgerKey, new: &LedgerKey, announce: &LedgerKey) -> Vec<ListedKey> {
        let mut tree = MemoryHashStore::new();
        let mut leaves = Vec::new();
        for n in 0..2 {
            let signed = entry(&format!("e{n}"), Action::Read, None)
                .sign(old)
                .unwrap();
            tree.append(&signed.leaf_data).unwrap();
            leaves.push(signed.leaf_data);
        }
        let announcement = entry("rot", Action::LedgerKeyRotate, Some(new.vkey()))
            .sign(announce)
            .unwrap();
        tree.append(&announcement.leaf_data).unwrap();
        let root = tree::root(&tree, 3).unwrap();
        let inclusion = tree::inclusion_proof(&tree, 3, 2).unwrap();
        vec![
            ListedKey {
                vkey: old.vkey(),
                first_index: 0,
                announcement: None,
            },
            ListedKey {
                vkey: new.vkey(),
                first_index: 3,
                announcement: Some(Announcement {
                    index: 2,
                    leaf_data: BASE64.encode(&announcement.leaf_data),
                    checkpoint: sign_checkpoint(old, 3, root).unwrap(),
                    inclusion: encode_all(&inclusion),
                    consistency: None,
                }),
            },
        ]
    }

    #[test]
    fn a_chain_is_followed_from_any_of_its_keys_and_tells_which_key_signed_what() {
        let old = LedgerKey::generate("log.example/ledger").unwrap();
        let new = LedgerKey::generate("log.example/ledger").unwrap();
        let listed = rotated(&old, &new, &old);
        for pinned in [old.vkey(), new.vkey()] {
            let (chain, rotations) = KeyChain::verify(&listed, &pinned).unwrap();
            assert_eq!(chain.current().vkey, new.vkey());
            assert_eq!(rotations.len(), 1);
            assert_eq!(rotations[0].checkpoint.size, 3);
            assert_eq!(chain.for_entry(2).vkey, old.vkey());
            assert_eq!(chain.for_entry(3).vkey, new.vkey());
            assert_eq!(chain.for_checkpoint(3).vkey, old.vkey());
            assert_eq!(chain.for_checkpoint(4).vkey, new.vkey());
            assert_eq!(chain.for_checkpoint(0).vkey, old.vkey());
            assert!(chain.signed_from(&pinned, 4));
        }
        let (chain, _) = KeyChain::verify(&listed, &new.vkey()).unwrap();
        assert!(chain.signed_from(&old.vkey(), 3));
        assert!(
            !chain.signed_from(&new.vkey(), 3),
            "the outgoing key's checkpoint"
        );
        let stranger = LedgerKey::generate("log.example/ledger").unwrap();
        assert!(KeyChain::verify(&listed, &stranger.vkey()).is_err());
    }

    #[test]
    fn a_link_not_vouched_for_by_the_outgoing_key_is_refused() {
        let old = LedgerKey::generate("log.example/ledger").unwrap();
        let new = LedgerKey::generate("log.example/ledger").unwrap();
        // The incoming key announcing itself.
        let listed = rotated(&old, &new, &new);
        assert!(KeyChain::verify(&listed, &old.vkey()).is_err());
        // A checkpoint of another size than the first index claimed.
        let mut listed = rotated(&old, &new, &old);
        listed[1].first_index = 2;
        assert!(KeyChain::verify(&listed, &old.vkey()).is_err());
        // Another key than the one announced.
        let mut listed = rotated(&old, &new, &old);
        let other = LedgerKey::generate("log.example/ledger").unwrap();
        listed[1].vkey = other.vkey();
        assert!(KeyChain::verify(&listed, &old.vkey()).is_err());
        // A key of another log.
        let foreign = LedgerKey::generate("elsewhere.example/ledger").unwrap();
        let listed = rotated(&old, &foreign, &old);
        assert!(KeyChain::verify(&listed, &old.vkey()).is_err());
    }
}
