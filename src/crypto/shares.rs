//! Threshold custody of the master key: its Shamir shares (GF(256), through `blahaj`), each a
//! self-describing, checksummed line that names the key it belongs to, and the gathering of
//! shares that rebuilds the key once enough have arrived, naming any share it refuses.
//!
//! A share's text is `fhirledger-share-v1:<key id>:<k>-of-<n>:<number>:<base64url bytes>:<check>`,
//! where `<check>` is the first 8 hex digits of SHA-256 over everything before it: a share
//! mistyped or cut short is refused with its number rather than rebuilding a wrong key, and
//! the rebuilt key must have the id the shares name.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64URL;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::keys::{KEY_LEN, MasterKey};

const PREFIX: &str = "fhirledger-share-v1";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShareError {
    #[error("not a fhirledger key share ({0})")]
    Malformed(String),
    #[error("share {number}: its checksum does not match (mistyped or cut short)")]
    Checksum { number: String },
    #[error("share {number} belongs to master key {found}, not {expected}")]
    OtherKey {
        number: u8,
        found: String,
        expected: String,
    },
    #[error("share {number} is of a {found} split, not {expected}")]
    OtherSplit {
        number: u8,
        found: String,
        expected: String,
    },
    #[error("share {0} was given already")]
    Duplicate(u8),
    #[error("the shares rebuild a key with id {found}, not {expected}: one of them is wrong")]
    WrongKey { found: String, expected: String },
    #[error("{0}")]
    Split(String),
}

/// One parsed share.
#[derive(Clone)]
pub struct KeyShare {
    key_id: String,
    threshold: u8,
    count: u8,
    number: u8,
    /// blahaj's share bytes: the x coordinate, then one y per key byte.
    bytes: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyShare")
            .field("key_id", &self.key_id)
            .field("number", &self.number)
            .finish_non_exhaustive()
    }
}

fn checksum(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl KeyShare {
    pub fn number(&self) -> u8 {
        self.number
    }

    /// `k-of-n`.
    pub fn split_name(&self) -> String {
        format!("{}-of-{}", self.threshold, self.count)
    }

    fn to_text(&self) -> Zeroizing<String> {
        let body = Zeroizing::new(format!(
            "{PREFIX}:{}:{}:{}:{}",
            self.key_id,
            self.split_name(),
            self.number,
            BASE64URL.encode(self.bytes.as_slice())
        ));
        Zeroizing::new(format!("{}:{}", body.as_str(), checksum(&body)))
    }

    /// Parses a share's text (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Self, ShareError> {
        let text = text.trim();
        let (body, check) = text
            .rsplit_once(':')
            .ok_or_else(|| ShareError::Malformed("no checksum".into()))?;
        let fields: Vec<&str> = body.split(':').collect();
        let [prefix, key_id, split, number, bytes] = fields.as_slice() else {
            return Err(ShareError::Malformed(
                "expected six ':'-separated fields".into(),
            ));
        };
        if *prefix != PREFIX {
            return Err(ShareError::Malformed(format!(
                "it does not start with {PREFIX}"
            )));
        }
        if checksum(body) != check {
            return Err(ShareError::Checksum {
                number: (*number).chars().take(3).collect(),
            });
        }
        let number: u8 = number
            .parse()
            .map_err(|_| ShareError::Malformed("the share number".into()))?;
        let (threshold, count) = split
            .split_once("-of-")
            .and_then(|(k, n)| Some((k.parse::<u8>().ok()?, n.parse::<u8>().ok()?)))
            .ok_or_else(|| ShareError::Malformed("the k-of-n field".into()))?;
        let bytes = Zeroizing::new(
            BASE64URL
                .decode(bytes)
                .map_err(|_| ShareError::Malformed("the share bytes are not base64url".into()))?,
        );
        if bytes.len() != KEY_LEN + 1 || bytes[0] != number || number == 0 {
            return Err(ShareError::Malformed(format!(
                "share {number} does not hold a master key share"
            )));
        }
        Ok(Self {
            key_id: (*key_id).to_owned(),
            threshold,
            count,
            number,
            bytes,
        })
    }
}

/// Splits the master key into `count` shares, any `threshold` of which rebuild it; returns
/// their texts, numbered from 1.
pub fn split(
    key: &MasterKey,
    count: u8,
    threshold: u8,
) -> Result<Vec<Zeroizing<String>>, ShareError> {
    if threshold < 2 || threshold > count {
        return Err(ShareError::Split(format!(
            "the threshold must be at least 2 and at most the number of shares ({count})"
        )));
    }
    let shares: Vec<blahaj::Share> = blahaj::Sharks(threshold)
        .dealer(key.bytes())
        .take(usize::from(count))
        .collect();
    Ok(shares
        .iter()
        .map(|share| {
            let bytes = Zeroizing::new(Vec::<u8>::from(share));
            KeyShare {
                key_id: key.id().as_str().to_owned(),
                threshold,
                count,
                number: bytes[0],
                bytes,
            }
            .to_text()
        })
        .collect())
}

/// Shares gathered so far, until enough rebuild the key.
#[derive(Debug, Default)]
pub struct Unsealing {
    shares: BTreeMap<u8, KeyShare>,
    /// How many shares the split needs, once a share said so (kept when gathering starts
    /// over after shares that rebuild a wrong key).
    need: Option<usize>,
}

/// Where gathering stands after a share is accepted.
#[derive(Debug)]
pub enum Unsealed {
    /// `have` of the `need` shares are here.
    NeedMore {
        have: usize,
        need: usize,
    },
    Key(MasterKey),
}

impl Unsealing {
    /// The key id the shares gathered so far name.
    pub fn key_id(&self) -> Option<&str> {
        self.shares.values().next().map(|s| s.key_id.as_str())
    }

    /// How many shares rebuild the key, once a share has said so.
    pub fn need(&self) -> Option<usize> {
        self.need
    }

    pub fn have(&self) -> usize {
        self.shares.len()
    }

    /// Accepts one share's text; the key once `k` distinct shares of one key are here.
    pub fn add(&mut self, text: &str) -> Result<Unsealed, ShareError> {
        let share = KeyShare::parse(text)?;
        if let Some(first) = self.shares.values().next() {
            if share.key_id != first.key_id {
                return Err(ShareError::OtherKey {
                    number: share.number,
                    found: share.key_id,
                    expected: first.key_id.clone(),
                });
            }
            if share.split_name() != first.split_name() {
                return Err(ShareError::OtherSplit {
                    number: share.number,
                    found: share.split_name(),
                    expected: first.split_name(),
                });
            }
        }
        if self.shares.contains_key(&share.number) {
            return Err(ShareError::Duplicate(share.number));
        }
        let need = usize::from(share.threshold);
        let expected = share.key_id.clone();
        self.need = Some(need);
        self.shares.insert(share.number, share);
        if self.shares.len() < need {
            return Ok(Unsealed::NeedMore {
                have: self.shares.len(),
                need,
            });
        }
        let parsed: Vec<blahaj::Share> = self
            .shares
            .values()
            .filter_map(|s| blahaj::Share::try_from(s.bytes.as_slice()).ok())
            .collect();
        let threshold = u8::try_from(need).unwrap_or(u8::MAX);
        let secret = Zeroizing::new(
            blahaj::Sharks(threshold)
                .recover(&parsed)
                .map_err(|e| ShareError::Split(e.to_owned()))?,
        );
        let bytes: [u8; KEY_LEN] = secret
            .as_slice()
            .try_into()
            .map_err(|_| ShareError::Split("the shares rebuild no 32-byte key".into()))?;
        let key = MasterKey::from_bytes(bytes);
        if key.id().as_str() != expected {
            // Start over: which share is wrong cannot be told from the key alone.
            self.shares.clear();
            return Err(ShareError::WrongKey {
                found: key.id().as_str().to_owned(),
                expected,
            });
        }
        Ok(Unsealed::Key(key))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail by panicking")]

    use super::*;

    fn unseal(texts: &[&str]) -> Result<MasterKey, ShareError> {
        let mut unsealing = Unsealing::default();
        for text in texts {
            if let Unsealed::Key(key) = unsealing.add(text)? {
                return Ok(key);
            }
        }
        Err(ShareError::Split("not enough".into()))
    }

    #[test]
    fn any_k_shares_rebuild_the_key_and_fewer_do_not() {
        let key = MasterKey::generate();
        let shares = split(&key, 5, 3).unwrap();
        assert_eq!(shares.len(), 5);
        for picked in [[0, 1, 2], [4, 2, 0], [1, 3, 4]] {
            let texts: Vec<&str> = picked.iter().map(|&i| shares[i].as_str()).collect();
            assert_eq!(unseal(&texts).unwrap().id(), key.id());
        }
        let mut unsealing = Unsealing::default();
        for text in &shares[..2] {
            assert!(matches!(
                unsealing.add(text).unwrap(),
                Unsealed::NeedMore { need: 3, .. }
            ));
        }
        // The text names the key, the split and the share, and never holds the key.
        assert!(shares[0].starts_with(&format!("fhirledger-share-v1:{}:3-of-5:", key.id())));
        assert!(!shares[0].contains(&BASE64URL.encode(key.bytes())));
    }

    #[test]
    fn a_wrong_share_is_named_and_refused() {
        let key = MasterKey::generate();
        let shares = split(&key, 3, 2).unwrap();
        // One character changed: the checksum names the share.
        let mut typo = shares[1].to_string();
        let at = typo.len() - 12;
        let changed = if &typo[at..=at] == "A" { "B" } else { "A" };
        typo.replace_range(at..=at, changed);
        let mut unsealing = Unsealing::default();
        unsealing.add(&shares[0]).unwrap();
        let error = unsealing.add(&typo).unwrap_err();
        assert!(matches!(error, ShareError::Checksum { .. }), "{error}");
        assert!(error.to_string().contains("share 2"), "{error}");
        // The same share twice, a share of another key, of another split, or not a share.
        assert_eq!(
            unsealing.add(&shares[0]).unwrap_err(),
            ShareError::Duplicate(1)
        );
        let other = split(&MasterKey::generate(), 3, 2).unwrap();
        assert!(matches!(
            unsealing.add(&other[1]).unwrap_err(),
            ShareError::OtherKey { number: 2, .. }
        ));
        let resplit = split(&key, 4, 3).unwrap();
        assert!(matches!(
            unsealing.add(&resplit[1]).unwrap_err(),
            ShareError::OtherSplit { number: 2, .. }
        ));
        assert!(matches!(
            unsealing.add("hello").unwrap_err(),
            ShareError::Malformed(_)
        ));
        // After all that, the right second share still unseals.
        assert!(
            matches!(unsealing.add(&shares[2]).unwrap(), Unsealed::Key(k) if k.id() == key.id())
        );
    }

    #[test]
    fn a_share_forged_with_a_valid_checksum_rebuilds_no_key() {
        let key = MasterKey::generate();
        let shares = split(&key, 3, 2).unwrap();
        let mut forged = KeyShare::parse(&shares[1]).unwrap();
        forged.bytes[5] ^= 0x40;
        let forged = forged.to_text();
        let mut unsealing = Unsealing::default();
        unsealing.add(&shares[0]).unwrap();
        assert!(matches!(
            unsealing.add(&forged).unwrap_err(),
            ShareError::WrongKey { .. }
        ));
        assert_eq!(unsealing.have(), 0, "gathering starts over");
    }

    #[test]
    fn bad_splits_are_refused() {
        let key = MasterKey::generate();
        assert!(split(&key, 3, 1).is_err());
        assert!(split(&key, 2, 3).is_err());
    }
}
