//! The master key (key-encryption key), and the 32-byte secrets behind every key of the
//! server: decoding them from configuration, reading them from files, and generating the
//! development key files of the embedded default.

use std::fmt;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Length of an AES-256 key in bytes.
pub const KEY_LEN: usize = 32;

/// File name of the generated development master key inside the data directory.
pub const DEV_MASTER_KEY_FILE: &str = "master.key";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{source_name}: cannot read key file {path}: {error}")]
    Read {
        source_name: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{source_name}: cannot write key file {path}: {error}")]
    Write {
        source_name: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{source_name}: the key must be {KEY_LEN} bytes encoded as base64 ({detail})")]
    Malformed {
        source_name: &'static str,
        detail: String,
    },
}

/// Identifies a master key without revealing it: the first 8 bytes of
/// SHA-256("fhirledger master key id" ‖ key), hex. Stored beside each wrapped data key so
/// that a rotated keyring knows which key unwraps which row.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId(String);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The key-encryption key. Its bytes are zeroed on drop and never printed.
pub struct MasterKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
    id: KeyId,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"fhirledger master key id")
            .chain_update(bytes)
            .finalize();
        let id = KeyId(digest.iter().take(8).map(|b| format!("{b:02x}")).collect());
        Self {
            bytes: Zeroizing::new(bytes),
            id,
        }
    }

    /// A fresh random key (used for the development key and in tests).
    pub fn generate() -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// A second holder of the same key (both zero their bytes when dropped).
    pub fn duplicate(&self) -> Self {
        Self::from_bytes(*self.bytes)
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }
}

/// A 32-byte secret (a key or a seed), zeroed on drop.
pub type Secret = Zeroizing<[u8; KEY_LEN]>;

/// Decodes a base64 32-byte secret (surrounding whitespace ignored); errors name
/// `source_name`.
pub fn decode_key_base64(text: &str, source_name: &'static str) -> Result<Secret, KeyError> {
    let decoded = Zeroizing::new(
        BASE64
            .decode(text.trim())
            .map_err(|e| KeyError::Malformed {
                source_name,
                detail: e.to_string(),
            })?,
    );
    let bytes: [u8; KEY_LEN] = decoded
        .as_slice()
        .try_into()
        .map_err(|_| KeyError::Malformed {
            source_name,
            detail: format!("decoded to {} bytes", decoded.len()),
        })?;
    Ok(Zeroizing::new(bytes))
}

/// Reads a base64 secret from a file; errors name `source_name`.
pub fn read_secret_file(path: &Path, source_name: &'static str) -> Result<Secret, KeyError> {
    let text = Zeroizing::new(fs::read_to_string(path).map_err(|error| KeyError::Read {
        source_name,
        path: path.to_owned(),
        error,
    })?);
    decode_key_base64(&text, source_name)
}

/// Reads the secret in `path`, or creates the file (mode 0600) with a random one when it is
/// absent, as the embedded default does with its development keys. Returns the secret and
/// whether it was generated now.
pub fn load_or_create_secret_file(
    path: &Path,
    source_name: &'static str,
) -> Result<(Secret, bool), KeyError> {
    if path.exists() {
        return Ok((read_secret_file(path, source_name)?, false));
    }
    let mut secret = Zeroizing::new([0u8; KEY_LEN]);
    rand::rngs::OsRng.fill_bytes(secret.as_mut_slice());
    let encoded = Zeroizing::new(BASE64.encode(secret.as_slice()));
    write_secret_file(path, &encoded).map_err(|error| KeyError::Write {
        source_name,
        path: path.to_owned(),
        error,
    })?;
    Ok((secret, true))
}

/// Writes a new file readable only by its owner; fails if the file already exists, so a
/// racing second process never overwrites a key the first one is already using.
fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(contents.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trip_and_length_check() {
        let bytes = [9u8; KEY_LEN];
        let decoded = decode_key_base64(&format!(" {}\n", BASE64.encode(bytes)), "test").unwrap();
        assert_eq!(
            MasterKey::from_bytes(*decoded).id(),
            MasterKey::from_bytes(bytes).id()
        );
        let err = decode_key_base64("c2hvcnQ=", "FHIRLEDGER_MASTER_KEY").unwrap_err();
        assert!(err.to_string().contains("FHIRLEDGER_MASTER_KEY"), "{err}");
        assert!(decode_key_base64("not base64!", "x").is_err());
    }

    #[test]
    fn debug_does_not_print_key_bytes() {
        let key = MasterKey::from_bytes([7u8; KEY_LEN]);
        let shown = format!("{key:?}");
        assert!(!shown.contains(&BASE64.encode([7u8; KEY_LEN])));
        assert!(!shown.contains("7, 7"));
    }

    #[cfg(unix)]
    #[test]
    fn dev_key_is_generated_once_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEV_MASTER_KEY_FILE);
        let (first, generated) = load_or_create_secret_file(&path, "test").unwrap();
        assert!(generated);
        let (second, generated_again) = load_or_create_secret_file(&path, "test").unwrap();
        assert!(!generated_again);
        assert_eq!(*first, *second);
        let mode = fs::metadata(dir.path().join(DEV_MASTER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
