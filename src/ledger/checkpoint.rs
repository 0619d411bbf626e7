//! Checkpoints: C2SP `tlog-checkpoint` bodies (origin, tree size, base64 root hash) signed
//! as C2SP `signed-note`s with the ledger key.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use signed_note::{Note, StandardVerifier, VerifierList};
use tlog_tiles::Checkpoint;

use super::keys::LedgerKey;
use super::tree::{Hash, LedgerError};

/// A checkpoint whose signature has been verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedCheckpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// The whole signed note, as served.
    pub note: String,
}

/// Signs the checkpoint for a tree of `size` records with root `root`.
pub fn sign_checkpoint(key: &LedgerKey, size: u64, root: Hash) -> Result<String, LedgerError> {
    let body = Checkpoint::new(key.name(), size, root, "")
        .map_err(|_| LedgerError::Malformed("checkpoint origin is invalid".into()))?
        .to_bytes();
    let mut note =
        Note::new(&body, &[]).map_err(|e| LedgerError::Malformed(format!("note: {e}")))?;
    note.add_sigs(&[key])
        .map_err(|e| LedgerError::Malformed(format!("signing the note: {e}")))?;
    String::from_utf8(note.to_bytes())
        .map_err(|_| LedgerError::Malformed("note is not UTF-8".into()))
}

/// Verifies a signed checkpoint against a verifier key (`name+id+key`); the origin must be
/// the key's name.
pub fn verify_checkpoint(note_text: &str, vkey: &str) -> Result<VerifiedCheckpoint, LedgerError> {
    let verifier = StandardVerifier::new(vkey)
        .map_err(|e| LedgerError::Malformed(format!("verifier key: {e}")))?;
    let name = signed_note::Verifier::name(&verifier).to_owned();
    let note = Note::from_bytes(note_text.as_bytes())
        .map_err(|e| LedgerError::Malformed(format!("note: {e}")))?;
    let verifiers = VerifierList::new(vec![Box::new(verifier)]);
    note.verify(&verifiers)
        .map_err(|_| LedgerError::InvalidProof)?;
    let checkpoint = Checkpoint::from_bytes(note.text())
        .map_err(|_| LedgerError::Malformed("checkpoint body".into()))?;
    if checkpoint.origin() != name {
        return Err(LedgerError::Malformed(format!(
            "checkpoint origin '{}' is not the key name '{name}'",
            checkpoint.origin()
        )));
    }
    Ok(VerifiedCheckpoint {
        origin: name,
        size: checkpoint.size(),
        root: *checkpoint.hash(),
        note: note_text.to_owned(),
    })
}

pub fn encode_hash(hash: &Hash) -> String {
    BASE64.encode(hash.0)
}

pub fn decode_hash(text: &str) -> Result<Hash, LedgerError> {
    BASE64
        .decode(text)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(Hash)
        .ok_or_else(|| LedgerError::Malformed("a hash is 32 bytes in base64".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_checkpoint_verifies_and_tampering_fails() {
        let key = LedgerKey::generate("fhir.example.org/ledger").unwrap();
        let root = Hash([7u8; 32]);
        let note = sign_checkpoint(&key, 42, root).unwrap();
        assert!(note.starts_with("fhir.example.org/ledger\n42\n"));
        let verified = verify_checkpoint(&note, &key.vkey()).unwrap();
        assert_eq!((verified.size, verified.root), (42, root));
        assert!(verify_checkpoint(&note.replace("\n42\n", "\n43\n"), &key.vkey()).is_err());
        let other = LedgerKey::generate("fhir.example.org/ledger").unwrap();
        assert!(verify_checkpoint(&note, &other.vkey()).is_err());
    }
}
