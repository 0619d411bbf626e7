//! The ledger signing key (Ed25519): loading, generating the development key, and its
//! published forms (C2SP signed-note verifier key).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use rand::RngCore as _;
use zeroize::Zeroizing;

/// File name of the generated development ledger key inside the data directory.
pub const DEV_LEDGER_KEY_FILE: &str = "ledger.key";

/// Signed-note algorithm byte for Ed25519 (C2SP signed-note, "Signature types").
const ALG_ED25519: u8 = 0x01;

/// The key that signs ledger entries and checkpoints, with the note name (the log origin)
/// it signs under. Never printed.
#[derive(Clone)]
pub struct LedgerKey {
    signing: SigningKey,
    name: String,
}

impl fmt::Debug for LedgerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LedgerKey")
            .field("name", &self.name)
            .field("key_id", &self.key_id())
            .finish_non_exhaustive()
    }
}

impl LedgerKey {
    /// `seed` is the 32-byte Ed25519 private key; `name` is the checkpoint origin, which
    /// must be a valid note key name (no `+`, no whitespace).
    pub fn from_seed(seed: [u8; 32], name: &str) -> Result<Self, String> {
        if !signed_note::is_key_name_valid(name) {
            return Err(format!(
                "'{name}' is not a valid note key name (no '+' and no whitespace)"
            ));
        }
        Ok(Self {
            signing: SigningKey::from_bytes(&seed),
            name: name.to_owned(),
        })
    }

    pub fn generate(name: &str) -> Result<Self, String> {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(seed.as_mut_slice());
        Self::from_seed(*seed, name)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    /// The signed-note key id: a hash of the name and public key.
    pub fn key_id(&self) -> u32 {
        signed_note::key_id(&self.name, &self.public_key_with_alg())
    }

    /// `name+keyid+base64(0x01 ‖ public key)` (C2SP signed-note verifier key).
    pub fn vkey(&self) -> String {
        signed_note::new_ed25519_verifier_key(&self.name, &self.verifying_key())
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    fn public_key_with_alg(&self) -> Vec<u8> {
        let mut bytes = vec![ALG_ED25519];
        bytes.extend_from_slice(self.verifying_key().as_bytes());
        bytes
    }
}

impl signed_note::Signer for LedgerKey {
    fn name(&self) -> &str {
        &self.name
    }

    fn key_id(&self) -> u32 {
        LedgerKey::key_id(self)
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, ed25519_dalek::SignatureError> {
        Ok(LedgerKey::sign(self, msg).to_vec())
    }
}

/// Parses a verifier key (`name+keyid+base64(0x01 ‖ key)`) into its name and Ed25519 key.
pub fn parse_vkey(vkey: &str) -> Result<(String, VerifyingKey), String> {
    let mut parts = vkey.trim().splitn(3, '+');
    let (Some(name), Some(id), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("a verifier key has the form name+keyid+base64key".into());
    };
    let bytes = BASE64
        .decode(key)
        .map_err(|_| "the verifier key's key part is not base64".to_owned())?;
    let Some((&ALG_ED25519, public)) = bytes.split_first() else {
        return Err("the verifier key is not an Ed25519 key".into());
    };
    let public: [u8; 32] = public
        .try_into()
        .map_err(|_| "the Ed25519 key must be 32 bytes".to_owned())?;
    let verifying =
        VerifyingKey::from_bytes(&public).map_err(|_| "the Ed25519 key is invalid".to_owned())?;
    let expected_id = format!("{:08x}", signed_note::key_id(name, &bytes));
    if id != expected_id {
        return Err("the verifier key's id does not match its name and key".into());
    }
    Ok((name.to_owned(), verifying))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vkey_round_trips_and_verifies_with_signed_note() {
        let key = LedgerKey::generate("fhir.example.org/ledger").unwrap();
        let vkey = key.vkey();
        let (name, public) = parse_vkey(&vkey).unwrap();
        assert_eq!(name, "fhir.example.org/ledger");
        assert_eq!(public, key.verifying_key());
        assert!(signed_note::StandardVerifier::new(&vkey).is_ok());
        let key_part = vkey.rsplit('+').next().unwrap();
        let wrong_id = format!(
            "fhir.example.org/ledger+{:08x}+{key_part}",
            key.key_id() ^ 1
        );
        assert!(parse_vkey(&wrong_id).is_err());
        assert!(LedgerKey::generate("has space").is_err());
        assert!(!format!("{key:?}").contains(&BASE64.encode(key.signing.to_bytes())));
    }
}
