//! Witness cosignatures (C2SP tlog-cosignature, the Ed25519 `cosignature/v1` type): the key
//! a witness cosigns checkpoints with, the verifier a log or an auditor checks them with,
//! and the witness's clock that each cosignature carries.
//!
//! A cosignature is a signed-note signature line on the checkpoint, so both sides plug into
//! `signed_note`'s `Signer` and `Verifier` traits; what differs from an ordinary note
//! signature is the signed message (`cosignature/v1\ntime <t>\n` before the note's text),
//! the key id's algorithm byte (0x04) and the signature's 8-byte timestamp prefix.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rand::RngCore as _;
use zeroize::Zeroizing;

use super::tree::LedgerError;

/// Signed-note algorithm byte of an Ed25519 `cosignature/v1` key.
const ALG_COSIGNATURE_V1: u8 = 0x04;
/// A `timestamped_signature`: a big-endian u64 timestamp and the Ed25519 signature.
const TIMESTAMPED_SIGNATURE_LEN: usize = 8 + 64;

/// The message a `cosignature/v1` signs: the header line, the time line and the whole note
/// text (the checkpoint body, final newline included, no signature lines).
fn signed_message(note_text: &[u8], time: u64) -> Vec<u8> {
    let mut message = format!("cosignature/v1\ntime {time}\n").into_bytes();
    message.extend_from_slice(note_text);
    message
}

fn key_id(name: &str, public: &VerifyingKey) -> u32 {
    let mut material = vec![ALG_COSIGNATURE_V1];
    material.extend_from_slice(public.as_bytes());
    signed_note::key_id(name, &material)
}

/// A witness's cosigning key under its name (a schema-less URL, e.g. `witness.example/w1`).
/// Never printed.
#[derive(Clone)]
pub struct WitnessKey {
    name: String,
    signing: SigningKey,
}

impl fmt::Debug for WitnessKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WitnessKey")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl WitnessKey {
    /// `seed` is the 32-byte Ed25519 private key; `name` must be a valid note key name.
    pub fn from_seed(seed: [u8; 32], name: &str) -> Result<Self, LedgerError> {
        if !signed_note::is_key_name_valid(name) {
            return Err(LedgerError::Malformed(format!(
                "'{name}' is not a valid note key name (no '+' and no whitespace)"
            )));
        }
        Ok(Self {
            name: name.to_owned(),
            signing: SigningKey::from_bytes(&seed),
        })
    }

    pub fn generate(name: &str) -> Result<Self, LedgerError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut_slice());
        Self::from_seed(*seed, name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifier(&self) -> CosignatureVerifier {
        let public = self.signing.verifying_key();
        CosignatureVerifier {
            id: key_id(&self.name, &public),
            name: self.name.clone(),
            public,
        }
    }

    /// The cosignature of a note's text at `time` (POSIX seconds of the witness's clock),
    /// as the signature line `— <name> base64(key id ‖ time ‖ signature)\n`.
    pub fn cosign(&self, note_text: &[u8], time: u64) -> Result<String, LedgerError> {
        let signer = TimedSigner { key: self, time };
        let signature = signed_note::Signer::sign(&signer, note_text)
            .map_err(|e| LedgerError::Malformed(format!("cosigning: {e}")))?;
        let line = signed_note::Signature::new(
            self.name.clone(),
            signed_note::Signer::key_id(&signer),
            signature,
        )
        .map_err(|e| LedgerError::Malformed(format!("cosignature line: {e}")))?;
        String::from_utf8(line.to_bytes())
            .map_err(|_| LedgerError::Malformed("cosignature line is not UTF-8".into()))
    }
}

/// A witness key fixed to one signing time, as `signed_note` signs: the time is part of
/// both the message and the signature bytes.
struct TimedSigner<'a> {
    key: &'a WitnessKey,
    time: u64,
}

impl signed_note::Signer for TimedSigner<'_> {
    fn name(&self) -> &str {
        &self.key.name
    }

    fn key_id(&self) -> u32 {
        key_id(&self.key.name, &self.key.signing.verifying_key())
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        if self.time > i64::MAX as u64 {
            return Err(ed25519_dalek::SignatureError::new());
        }
        let signature = self.key.signing.sign(&signed_message(msg, self.time));
        let mut bytes = self.time.to_be_bytes().to_vec();
        bytes.extend_from_slice(&signature.to_bytes());
        Ok(bytes)
    }
}

/// Checks `cosignature/v1` signatures of one witness. Its verifier key is
/// `name+keyid+base64(0x04 ‖ public key)` (C2SP signed-note vkey with the cosignature type).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CosignatureVerifier {
    name: String,
    id: u32,
    public: VerifyingKey,
}

impl CosignatureVerifier {
    pub fn from_vkey(vkey: &str) -> Result<Self, LedgerError> {
        let malformed = |why: &str| LedgerError::Malformed(format!("witness key: {why}"));
        let mut parts = vkey.trim().splitn(3, '+');
        let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed(
                "a verifier key has the form name+keyid+base64key",
            ));
        };
        let bytes = BASE64
            .decode(key)
            .map_err(|_| malformed("the key part is not base64"))?;
        let Some((&ALG_COSIGNATURE_V1, public)) = bytes.split_first() else {
            return Err(malformed("not a cosignature/v1 (type 0x04) key"));
        };
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| malformed("the Ed25519 key must be 32 bytes"))?;
        let public = VerifyingKey::from_bytes(&public)
            .map_err(|_| malformed("the Ed25519 key is invalid"))?;
        if !signed_note::is_key_name_valid(name) {
            return Err(malformed("the name is not a valid note key name"));
        }
        let expected = key_id(name, &public);
        if id != format!("{expected:08x}") {
            return Err(malformed("the key id does not match the name and key"));
        }
        Ok(Self {
            name: name.to_owned(),
            id: expected,
            public,
        })
    }

    /// `name+keyid+base64(0x04 ‖ public key)`.
    pub fn vkey(&self) -> String {
        let mut material = vec![ALG_COSIGNATURE_V1];
        material.extend_from_slice(self.public.as_bytes());
        format!("{}+{:08x}+{}", self.name, self.id, BASE64.encode(material))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The witness's time in a cosignature of this key, when the signature line is one
    /// (its name and key id) and verifies over `note_text`.
    pub fn verified_time(
        &self,
        note_text: &[u8],
        signature: &signed_note::Signature,
    ) -> Option<u64> {
        let ours = signature.name() == self.name && signature.id() == self.id;
        (ours && signed_note::Verifier::verify(self, note_text, signature.signature()))
            .then(|| signature_time(signature.signature()))
            .flatten()
    }
}

fn signature_time(signature: &[u8]) -> Option<u64> {
    let time: [u8; 8] = signature.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(time))
}

impl signed_note::Verifier for CosignatureVerifier {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        self.id
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        if sig.len() != TIMESTAMPED_SIGNATURE_LEN {
            return false;
        }
        let Some(time) = signature_time(sig).filter(|t| *t <= i64::MAX as u64) else {
            return false;
        };
        let Ok(signature) = ed25519_dalek::Signature::from_slice(&sig[8..]) else {
            return false;
        };
        self.public
            .verify_strict(&signed_message(msg, time), &signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;
    use crate::ledger::LedgerKey;
    use crate::ledger::checkpoint::sign_checkpoint;
    use crate::ledger::tree::Hash;

    fn cosigned(witness: &WitnessKey, time: u64) -> (signed_note::Note, String) {
        let log = LedgerKey::generate("log.example/ledger").unwrap();
        let checkpoint = sign_checkpoint(&log, 7, Hash([3; 32])).unwrap();
        let note = signed_note::Note::from_bytes(checkpoint.as_bytes()).unwrap();
        let line = witness.cosign(note.text(), time).unwrap();
        (note, format!("{checkpoint}{line}"))
    }

    #[test]
    fn a_cosignature_verifies_with_its_time_and_a_changed_one_does_not() {
        let witness = WitnessKey::generate("witness.example/w1").unwrap();
        let verifier = CosignatureVerifier::from_vkey(&witness.verifier().vkey()).unwrap();
        let (note, text) = cosigned(&witness, 1_679_315_147);
        let parsed = signed_note::Note::from_bytes(text.as_bytes()).unwrap();
        let list = signed_note::VerifierList::new(vec![Box::new(verifier.clone())]);
        let (verified, _) = parsed.verify(&list).unwrap();
        assert_eq!(verified.len(), 1);
        assert_eq!(
            verifier.verified_time(note.text(), &verified[0]),
            Some(1_679_315_147)
        );

        // Another time in the signature bytes: the signed message differs.
        let mut forged = verified[0].signature().to_vec();
        forged[7] ^= 1;
        let forged =
            signed_note::Signature::new(verified[0].name().into(), verified[0].id(), forged)
                .unwrap();
        assert_eq!(verifier.verified_time(note.text(), &forged), None);
        // Another checkpoint: the cosignature does not carry over.
        let other = b"log.example/ledger\n8\nAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwM=\n";
        assert_eq!(verifier.verified_time(other, &verified[0]), None);
    }

    #[test]
    fn the_signed_message_and_key_id_follow_the_spec() {
        let witness = WitnessKey::from_seed([9; 32], "witness.example/w1").unwrap();
        let body = b"example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n";
        assert_eq!(
            signed_message(body, 1_679_315_147),
            [&b"cosignature/v1\ntime 1679315147\n"[..], &body[..]].concat()
        );
        let public = witness.signing.verifying_key();
        let mut material = b"witness.example/w1\n\x04".to_vec();
        material.extend_from_slice(public.as_bytes());
        let digest = <sha2::Sha256 as sha2::Digest>::digest(&material);
        assert_eq!(
            witness.verifier().id,
            u32::from_be_bytes(digest[..4].try_into().unwrap())
        );
        // The line carries the key id, then the big-endian time, then 64 signature bytes.
        let line = witness.cosign(body, 1_679_315_147).unwrap();
        let encoded = line.trim_end().rsplit(' ').next().unwrap();
        let bytes = BASE64.decode(encoded).unwrap();
        assert_eq!(bytes.len(), 4 + TIMESTAMPED_SIGNATURE_LEN);
        assert_eq!(bytes[..4], witness.verifier().id.to_be_bytes());
        assert_eq!(bytes[4..12], 1_679_315_147u64.to_be_bytes());
    }

    #[test]
    fn a_log_key_is_not_a_witness_key() {
        let log = LedgerKey::generate("log.example/ledger").unwrap();
        assert!(CosignatureVerifier::from_vkey(&log.vkey()).is_err());
        let witness = WitnessKey::generate("witness.example/w1").unwrap();
        let vkey = witness.verifier().vkey();
        let tampered = vkey.replacen("w1", "w2", 1);
        assert!(CosignatureVerifier::from_vkey(&tampered).is_err());
    }
}
