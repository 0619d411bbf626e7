//! Envelope encryption of resource versions (design.md, "Storage and encryption").
//!
//! Each version gets a fresh random 256-bit data key. The content is sealed with
//! AES-256-GCM under that data key with a random 96-bit nonce; the data key is itself
//! sealed (wrapped) under the master key. Both seals carry associated data naming the row
//! (`type/id/versionId`), so a ciphertext or wrapped key copied to another row fails
//! authentication instead of decrypting as someone else's record.

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;
use zeroize::Zeroizing;

use super::keys::{KEY_LEN, KeyId, MasterKey};

/// Length of an AES-GCM nonce in bytes (96 bits, NIST SP 800-38D §8.2).
pub const NONCE_LEN: usize = 12;

/// Associated-data format version; bump it if the binding ever changes.
const BINDING_CONTEXT: &str = "fhirledger/resource/v1";

/// The row a ciphertext belongs to.
#[derive(Debug, Clone, Copy)]
pub struct ResourceBinding<'a> {
    pub resource_type: &'a str,
    pub id: &'a str,
    pub version_id: i64,
}

impl ResourceBinding<'_> {
    fn associated_data(&self, purpose: &str) -> Vec<u8> {
        format!(
            "{BINDING_CONTEXT}\n{purpose}\n{}/{}/{}",
            self.resource_type, self.id, self.version_id
        )
        .into_bytes()
    }
}

/// What the store keeps for one sealed resource version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedBlob {
    /// Which master key wrapped the data key.
    pub key_id: String,
    /// Nonce ‖ AES-GCM(master key, data key).
    pub wrapped_key: Vec<u8>,
    /// Nonce used for the content.
    pub nonce: Vec<u8>,
    /// AES-GCM(data key, content), tag included.
    pub ciphertext: Vec<u8>,
}

/// Authentication failed: the row was altered, moved, or sealed under an unknown key.
/// Deliberately carries no detail that could help an attacker; callers log the row's ids.
#[derive(Debug, thiserror::Error)]
#[error("stored ciphertext failed authentication ({0})")]
pub struct IntegrityError(&'static str);

/// Seals resource versions under the current master key, and opens them under it or under
/// a previous key kept while a rotation re-wraps what that key sealed.
#[derive(Debug)]
pub struct Envelope {
    master: MasterKey,
    previous: Vec<MasterKey>,
}

impl Envelope {
    pub fn new(master: MasterKey) -> Self {
        Self {
            master,
            previous: Vec::new(),
        }
    }

    /// Also opens what these earlier master keys sealed (a rotation in progress).
    pub fn with_previous(mut self, previous: Vec<MasterKey>) -> Self {
        self.previous = previous
            .into_iter()
            .filter(|key| key.id() != self.master.id())
            .collect();
        self
    }

    pub fn key_id(&self) -> &KeyId {
        self.master.id()
    }

    /// The ids of the previous keys this envelope still opens.
    pub fn previous_ids(&self) -> Vec<KeyId> {
        self.previous.iter().map(|key| key.id().clone()).collect()
    }

    fn key_for(&self, key_id: &str) -> Option<&MasterKey> {
        std::iter::once(&self.master)
            .chain(&self.previous)
            .find(|key| key.id().as_str() == key_id)
    }

    /// A data key wrapped by a previous master key, wrapped again by the current one: the
    /// new `(key id, wrapped key)`. The content's ciphertext does not change (nor does the
    /// content hash the ledger recorded for it). `None` when it is wrapped by the current
    /// key already.
    pub fn rewrap(
        &self,
        binding: ResourceBinding<'_>,
        key_id: &str,
        wrapped_key: &[u8],
    ) -> Result<Option<(String, Vec<u8>)>, IntegrityError> {
        if key_id == self.master.id().as_str() {
            return Ok(None);
        }
        let old = self
            .key_for(key_id)
            .ok_or(IntegrityError("sealed under an unknown master key"))?;
        let data_key = unwrap_key(old, binding, wrapped_key)?;
        Ok(Some((
            self.master.id().as_str().to_owned(),
            wrap_key(&self.master, binding, &data_key),
        )))
    }

    pub fn seal(&self, binding: ResourceBinding<'_>, plaintext: &[u8]) -> EncryptedBlob {
        let mut data_key = Zeroizing::new([0u8; KEY_LEN]);
        rand::rngs::OsRng.fill_bytes(data_key.as_mut_slice());

        let content_nonce = random_nonce();
        let ciphertext = encrypt(
            &data_key,
            &content_nonce,
            plaintext,
            &binding.associated_data("content"),
        );

        EncryptedBlob {
            key_id: self.master.id().as_str().to_owned(),
            wrapped_key: wrap_key(&self.master, binding, &data_key),
            nonce: content_nonce.to_vec(),
            ciphertext,
        }
    }

    pub fn open(
        &self,
        binding: ResourceBinding<'_>,
        blob: &EncryptedBlob,
    ) -> Result<Vec<u8>, IntegrityError> {
        let master = self
            .key_for(&blob.key_id)
            .ok_or(IntegrityError("sealed under an unknown master key"))?;
        let data_key = unwrap_key(master, binding, &blob.wrapped_key)?;
        let data_key: &[u8; KEY_LEN] = &data_key;
        let nonce: &[u8; NONCE_LEN] = blob
            .nonce
            .as_slice()
            .try_into()
            .map_err(|_| IntegrityError("nonce has the wrong length"))?;
        decrypt(
            data_key,
            nonce,
            &blob.ciphertext,
            &binding.associated_data("content"),
        )
        .ok_or(IntegrityError("content does not decrypt for this row"))
    }
}

/// What a wrapped data key is bound to: its row and the master key that wrapped it.
fn wrap_associated_data(binding: ResourceBinding<'_>, master: &MasterKey) -> Vec<u8> {
    let mut aad = binding.associated_data("data-key");
    aad.extend_from_slice(b"\n");
    aad.extend_from_slice(master.id().as_str().as_bytes());
    aad
}

/// Nonce ‖ AES-GCM(master key, data key).
fn wrap_key(master: &MasterKey, binding: ResourceBinding<'_>, data_key: &[u8; KEY_LEN]) -> Vec<u8> {
    let nonce = random_nonce();
    let mut wrapped = nonce.to_vec();
    wrapped.extend(encrypt(
        master.bytes(),
        &nonce,
        data_key.as_slice(),
        &wrap_associated_data(binding, master),
    ));
    wrapped
}

fn unwrap_key(
    master: &MasterKey,
    binding: ResourceBinding<'_>,
    wrapped_key: &[u8],
) -> Result<Zeroizing<[u8; KEY_LEN]>, IntegrityError> {
    let (nonce, wrapped) = split_nonce(wrapped_key)?;
    let data_key = Zeroizing::new(
        decrypt(
            master.bytes(),
            nonce,
            wrapped,
            &wrap_associated_data(binding, master),
        )
        .ok_or(IntegrityError("data key does not unwrap for this row"))?,
    );
    if data_key.len() != KEY_LEN {
        return Err(IntegrityError("data key has the wrong length"));
    }
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    key.copy_from_slice(&data_key);
    Ok(key)
}

fn random_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    nonce
}

fn split_nonce(bytes: &[u8]) -> Result<(&[u8; NONCE_LEN], &[u8]), IntegrityError> {
    let (nonce, rest) = bytes
        .split_first_chunk::<NONCE_LEN>()
        .ok_or(IntegrityError("wrapped key is truncated"))?;
    Ok((nonce, rest))
}

fn encrypt(key: &[u8; KEY_LEN], nonce: &[u8; NONCE_LEN], msg: &[u8], aad: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    // Encryption with a valid key and nonce length only fails for messages beyond
    // GCM's 64 GiB limit, far above the request body limit.
    cipher
        .encrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .unwrap_or_default()
}

fn decrypt(
    key: &[u8; KEY_LEN],
    nonce: &[u8; NONCE_LEN],
    msg: &[u8],
    aad: &[u8],
) -> Option<Vec<u8>> {
    let cipher = Aes256Gcm::new(key.into());
    cipher
        .decrypt(Nonce::from_slice(nonce), Payload { msg, aad })
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(id: &str, version_id: i64) -> ResourceBinding<'_> {
        ResourceBinding {
            resource_type: "Patient",
            id,
            version_id,
        }
    }

    #[test]
    fn a_rotation_rewraps_data_keys_and_leaves_the_ciphertext_alone() {
        let old = MasterKey::from_bytes([1; KEY_LEN]);
        let blob = Envelope::new(MasterKey::from_bytes([1; KEY_LEN])).seal(binding("a", 1), b"x");
        let rotating = Envelope::new(MasterKey::from_bytes([2; KEY_LEN])).with_previous(vec![old]);
        assert_eq!(rotating.open(binding("a", 1), &blob).unwrap(), b"x");
        let (key_id, wrapped_key) = rotating
            .rewrap(binding("a", 1), &blob.key_id, &blob.wrapped_key)
            .unwrap()
            .unwrap();
        let rewrapped = EncryptedBlob {
            key_id,
            wrapped_key,
            ..blob.clone()
        };
        assert_eq!(rewrapped.ciphertext, blob.ciphertext);
        // Rewrapped, the new key alone opens it; the old key is no longer needed.
        let retired = Envelope::new(MasterKey::from_bytes([2; KEY_LEN]));
        assert_eq!(retired.open(binding("a", 1), &rewrapped).unwrap(), b"x");
        assert!(retired.open(binding("a", 1), &blob).is_err());
        assert!(
            retired
                .rewrap(binding("a", 1), &rewrapped.key_id, &rewrapped.wrapped_key)
                .unwrap()
                .is_none()
        );
        // Without the old key, or for another row, nothing is rewrapped.
        assert!(
            retired
                .rewrap(binding("a", 1), &blob.key_id, &blob.wrapped_key)
                .is_err()
        );
        assert!(
            rotating
                .rewrap(binding("b", 1), &blob.key_id, &blob.wrapped_key)
                .is_err()
        );
    }

    #[test]
    fn seal_then_open_returns_the_plaintext() {
        let envelope = Envelope::new(MasterKey::generate());
        let blob = envelope.seal(binding("a", 1), b"{\"resourceType\":\"Patient\"}");
        assert_ne!(blob.ciphertext, b"{\"resourceType\":\"Patient\"}".to_vec());
        let opened = envelope.open(binding("a", 1), &blob).unwrap();
        assert_eq!(opened, b"{\"resourceType\":\"Patient\"}");
    }

    #[test]
    fn a_blob_moved_to_another_row_does_not_open() {
        let envelope = Envelope::new(MasterKey::generate());
        let blob = envelope.seal(binding("a", 1), b"secret");
        assert!(envelope.open(binding("b", 1), &blob).is_err());
        assert!(envelope.open(binding("a", 2), &blob).is_err());
        let other_type = ResourceBinding {
            resource_type: "Observation",
            id: "a",
            version_id: 1,
        };
        assert!(envelope.open(other_type, &blob).is_err());
    }

    #[test]
    fn any_flipped_bit_or_other_key_fails() {
        let envelope = Envelope::new(MasterKey::generate());
        let blob = envelope.seal(binding("a", 1), b"secret content");
        for field in 0..3 {
            let mut tampered = blob.clone();
            let bytes = match field {
                0 => &mut tampered.ciphertext,
                1 => &mut tampered.wrapped_key,
                _ => &mut tampered.nonce,
            };
            bytes[0] ^= 1;
            assert!(
                envelope.open(binding("a", 1), &tampered).is_err(),
                "field {field}"
            );
        }
        let stranger = Envelope::new(MasterKey::generate());
        assert!(stranger.open(binding("a", 1), &blob).is_err());
    }
}
