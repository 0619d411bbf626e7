//! The master key (key-encryption key): loading it from configuration, or generating a
//! development key in the data directory for the embedded default.

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

    /// Parses base64 text (surrounding whitespace ignored). `source_name` names the setting
    /// in error messages, e.g. `FHIRLEDGER_MASTER_KEY`.
    pub fn from_base64(text: &str, source_name: &'static str) -> Result<Self, KeyError> {
        Ok(Self::from_bytes(*decode_key_base64(text, source_name)?))
    }

    pub fn from_file(path: &Path, source_name: &'static str) -> Result<Self, KeyError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|error| KeyError::Read {
            source_name,
            path: path.to_owned(),
            error,
        })?);
        Self::from_base64(&text, source_name)
    }

    /// Loads `dir/master.key`, creating it (mode 0600) with a random key when absent.
    /// Returns the key and whether it was generated now.
    pub fn load_or_generate_dev(dir: &Path) -> Result<(Self, bool), KeyError> {
        let path = dir.join(DEV_MASTER_KEY_FILE);
        if path.exists() {
            return Ok((Self::from_file(&path, "development master key")?, false));
        }
        let key = Self::generate();
        write_secret_file(&path, &key.to_base64()).map_err(|error| KeyError::Write {
            source_name: "development master key",
            path: path.clone(),
            error,
        })?;
        Ok((key, true))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.bytes
    }

    fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(BASE64.encode(self.bytes.as_slice()))
    }
}

/// Decodes a base64 32-byte secret (surrounding whitespace ignored); errors name
/// `source_name`.
pub fn decode_key_base64(
    text: &str,
    source_name: &'static str,
) -> Result<Zeroizing<[u8; KEY_LEN]>, KeyError> {
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

/// Writes a new file readable only by its owner; fails if the file already exists, so a
/// racing second process never overwrites a key the first one is already using.
pub fn write_secret_file(path: &Path, contents: &str) -> std::io::Result<()> {
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
        let key = MasterKey::generate();
        let again = MasterKey::from_base64(&key.to_base64(), "test").unwrap();
        assert_eq!(key.id(), again.id());
        let err = MasterKey::from_base64("c2hvcnQ=", "FHIRLEDGER_MASTER_KEY").unwrap_err();
        assert!(err.to_string().contains("FHIRLEDGER_MASTER_KEY"), "{err}");
        assert!(MasterKey::from_base64("not base64!", "x").is_err());
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
        let (first, generated) = MasterKey::load_or_generate_dev(dir.path()).unwrap();
        assert!(generated);
        let (second, generated_again) = MasterKey::load_or_generate_dev(dir.path()).unwrap();
        assert!(!generated_again);
        assert_eq!(first.id(), second.id());
        let mode = fs::metadata(dir.path().join(DEV_MASTER_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
