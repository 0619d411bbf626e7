//! Blind indexes: keyed HMAC-SHA-256 digests of normalized search values, so the database
//! can match equal values without holding them. The index key is separate from the
//! master key: a leaked index key lets an attacker confirm guesses, never decrypt.
//!
//! Every digest is bound to the resource type, the search parameter and the kind of value,
//! so equal text under different parameters (a family name and a city) hashes differently
//! and frequencies do not correlate across parameters.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use unicode_normalization::UnicodeNormalization as _;
use unicode_normalization::char::is_combining_mark;
use zeroize::Zeroizing;

use super::keys::KEY_LEN;

/// File name of the generated development index key inside the data directory.
pub const DEV_INDEX_KEY_FILE: &str = "index.key";

/// Length of the stored digests. 16 bytes (128 bits) keeps the index small while making
/// accidental collisions between distinct values negligible.
pub const DIGEST_LEN: usize = 16;

/// Strings are indexed by every normalized prefix up to this many characters, so that
/// FHIR's default "starts with" string search needs no plaintext. Longer search terms
/// match on this prefix in the database and are checked in full after decryption. At 12,
/// names that share their first 12 characters with thousands of others (a family of
/// patients, generated test data) made such a search decrypt every one of them; 24 covers
/// nearly every name and address line whole, for a few more rows per long string.
pub const MAX_PREFIX_CHARS: usize = 24;

/// The bound before [`MAX_PREFIX_CHARS`] was raised: a database written then is searched
/// within it until its index has been rebuilt.
pub const LEGACY_PREFIX_CHARS: usize = 12;

/// The kind field of a composite tuple's digest (search.html#composite). No [`ValueKind`] tag
/// is spelled this way, so a tuple never shares an encoding with a single value.
const TUPLE_TAG: &[u8] = b"composite-tuple";

/// What a digest stands for; part of the HMAC input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// The parameter has at least one value (for `:missing`).
    Present,
    /// A normalized string prefix of exactly n characters (n ≤ [`MAX_PREFIX_CHARS`]).
    Prefix,
    /// A whole normalized string (default string match of a term no longer than the prefix
    /// bound is covered by `Prefix`; this is for whole-value equality).
    Normalized,
    /// A string exactly as written (`:exact`).
    Exact,
    /// Token `system|code`.
    SystemCode,
    /// Token `code` in any system.
    Code,
    /// Token code with no system (`|code`).
    CodeWithoutSystem,
    /// Token `system|` (any code).
    System,
    /// Reference as `Type/id` or absolute URL.
    Reference,
    /// Reference by id alone (`subject=123`).
    ReferenceId,
    /// A uri, exactly.
    Uri,
    /// Unit of a quantity: `system|code`.
    UnitSystemCode,
    /// Unit of a quantity by code or unit text alone.
    UnitCode,
}

impl ValueKind {
    fn tag(self) -> &'static [u8] {
        match self {
            Self::Present => b"present",
            Self::Prefix => b"prefix",
            Self::Normalized => b"normalized",
            Self::Exact => b"exact",
            Self::SystemCode => b"system-code",
            Self::Code => b"code",
            Self::CodeWithoutSystem => b"code-no-system",
            Self::System => b"system",
            Self::Reference => b"reference",
            Self::ReferenceId => b"reference-id",
            Self::Uri => b"uri",
            Self::UnitSystemCode => b"unit-system-code",
            Self::UnitCode => b"unit-code",
        }
    }
}

/// The HMAC key of the blind index. Never printed; zeroed on drop.
pub struct BlindIndexKey {
    bytes: Zeroizing<[u8; KEY_LEN]>,
}

impl fmt::Debug for BlindIndexKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlindIndexKey").finish_non_exhaustive()
    }
}

pub type Digest = [u8; DIGEST_LEN];

impl BlindIndexKey {
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        Self {
            bytes: Zeroizing::new(bytes),
        }
    }

    /// Identifies the key without revealing it (hex of the first 8 bytes of an HMAC of a
    /// fixed label): the database records the id of the key its index was built with, so a
    /// server started with another key refuses rather than finding nothing.
    pub fn id(&self) -> String {
        let mut mac = self.mac();
        mac.update(b"fhirledger index key id");
        mac.finalize()
            .into_bytes()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A fresh random key (tests).
    pub fn generate() -> Self {
        use rand::RngCore as _;
        let mut bytes = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// The digest of one value of `param` on `resource_type`. Fields are length-prefixed so
    /// no two different inputs share an encoding.
    pub fn digest(&self, resource_type: &str, param: &str, kind: ValueKind, value: &str) -> Digest {
        let mut mac = self.mac();
        for field in [
            resource_type.as_bytes(),
            param.as_bytes(),
            kind.tag(),
            value.as_bytes(),
        ] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        truncate(mac)
    }

    /// The digest of one tuple of a composite parameter: one `(kind, value)` per component,
    /// in order, as the single values of those components would be hashed. Every field is
    /// length-prefixed and the count of components is hashed too, so no component value
    /// (a `$` in a code, say) can move a boundary between components, and no tuple collides
    /// with a single value (its kind field is [`TUPLE_TAG`]).
    pub fn digest_tuple(
        &self,
        resource_type: &str,
        param: &str,
        components: &[(ValueKind, &str)],
    ) -> Digest {
        let mut mac = self.mac();
        let count = (components.len() as u64).to_be_bytes();
        let head = [
            resource_type.as_bytes(),
            param.as_bytes(),
            TUPLE_TAG,
            &count,
        ];
        let tail = components
            .iter()
            .flat_map(|(kind, value)| [kind.tag(), value.as_bytes()]);
        for field in head.into_iter().chain(tail) {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        truncate(mac)
    }

    fn mac(&self) -> Hmac<Sha256> {
        <Hmac<Sha256> as Mac>::new_from_slice(self.bytes.as_slice())
            .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"))
    }
}

fn truncate(mac: Hmac<Sha256>) -> Digest {
    let full = mac.finalize().into_bytes();
    let mut digest = [0u8; DIGEST_LEN];
    digest.copy_from_slice(&full[..DIGEST_LEN]);
    digest
}

/// The text a `system|code` pair (a token's, a unit's) is digested as. A `|` or `\` inside
/// either part is escaped as in a search URL, so `urn:x|y` + `a` and `urn:x` + `y|a` stay
/// apart; values without either character read as plainly joined.
pub fn system_and_code(system: &str, code: &str) -> String {
    fn escaped(part: &str, out: &mut String) {
        for c in part.chars() {
            if matches!(c, '|' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
    }
    let mut out = String::with_capacity(system.len() + code.len() + 1);
    escaped(system, &mut out);
    out.push('|');
    escaped(code, &mut out);
    out
}

/// FHIR string matching is case- and accent-insensitive (search.html#string): lower case,
/// canonical decomposition with combining marks removed, runs of whitespace and
/// punctuation folded to one space, trimmed.
pub fn normalize_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.nfd().filter(|c| !is_combining_mark(*c)) {
        if c.is_alphanumeric() {
            if pending_space && !out.is_empty() {
                out.push(' ');
            }
            pending_space = false;
            out.extend(c.to_lowercase());
        } else {
            pending_space = true;
        }
    }
    out
}

/// The prefixes of a normalized string that the index stores: 1 to
/// [`MAX_PREFIX_CHARS`] characters.
pub fn prefixes(normalized: &str) -> impl Iterator<Item = &str> {
    normalized
        .char_indices()
        .skip(1)
        .map(|(i, _)| i)
        .chain(std::iter::once(normalized.len()))
        .take(MAX_PREFIX_CHARS)
        .filter(|_| !normalized.is_empty())
        .map(move |end| &normalized[..end])
}

/// The longest prefix of a normalized search term within `bound` characters: what the index
/// answers for it.
pub fn bounded_prefix(normalized: &str, bound: usize) -> &str {
    match normalized.char_indices().nth(bound) {
        Some((end, _)) => &normalized[..end],
        None => normalized,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_and_code_keep_their_boundary() {
        assert_eq!(
            system_and_code("http://loinc.org", "8480-6"),
            "http://loinc.org|8480-6"
        );
        assert_ne!(
            system_and_code("urn:x|y", "a"),
            system_and_code("urn:x", "y|a")
        );
        assert_ne!(
            system_and_code("urn:x\\", "a"),
            system_and_code("urn:x", "\\|a")
        );
        assert_eq!(system_and_code("u|v", "c\\d"), r"u\|v|c\\d");
    }

    #[test]
    fn normalization_folds_case_accents_and_punctuation() {
        assert_eq!(
            normalize_string("  Müller-Lüdenscheidt "),
            "muller ludenscheidt"
        );
        assert_eq!(normalize_string("ÉMILE"), "emile");
        assert_eq!(normalize_string("O'Brien"), "o brien");
        assert_eq!(normalize_string("..."), "");
    }

    #[test]
    fn prefixes_are_bounded_and_char_safe() {
        let all: Vec<&str> = prefixes("zoë").collect();
        assert_eq!(all, vec!["z", "zo", "zoë"]);
        assert_eq!(
            prefixes("abcdefghijklmnopqrstuvwxyz").count(),
            MAX_PREFIX_CHARS
        );
        assert_eq!(prefixes("").count(), 0);
        assert_eq!(bounded_prefix("abcdefghijklmnopq", 12), "abcdefghijkl");
        assert_eq!(bounded_prefix("ab", 12), "ab");
        assert_eq!(bounded_prefix("zoë-zoë", 3), "zoë");
    }

    #[test]
    fn digests_bind_type_parameter_kind_and_key() {
        let key = BlindIndexKey::from_bytes([1; KEY_LEN]);
        let base = key.digest("Patient", "family", ValueKind::Prefix, "chal");
        assert_eq!(
            base,
            key.digest("Patient", "family", ValueKind::Prefix, "chal")
        );
        assert_ne!(
            base,
            key.digest("Patient", "given", ValueKind::Prefix, "chal")
        );
        assert_ne!(
            base,
            key.digest("Practitioner", "family", ValueKind::Prefix, "chal")
        );
        assert_ne!(
            base,
            key.digest("Patient", "family", ValueKind::Exact, "chal")
        );
        // Length prefixes keep field boundaries apart.
        assert_ne!(
            key.digest("Patient", "ab", ValueKind::Code, "c"),
            key.digest("Patient", "a", ValueKind::Code, "bc")
        );
        let other = BlindIndexKey::from_bytes([2; KEY_LEN]);
        assert_ne!(
            base,
            other.digest("Patient", "family", ValueKind::Prefix, "chal")
        );
    }

    #[test]
    fn tuple_digests_keep_components_apart() {
        let key = BlindIndexKey::from_bytes([1; KEY_LEN]);
        let tuple = |parts: &[(ValueKind, &str)]| key.digest_tuple("Observation", "p", parts);
        let base = tuple(&[(ValueKind::Code, "a"), (ValueKind::Code, "b")]);
        assert_eq!(
            base,
            tuple(&[(ValueKind::Code, "a"), (ValueKind::Code, "b")])
        );
        // A boundary cannot move, whatever the values hold.
        assert_ne!(
            base,
            tuple(&[(ValueKind::Code, "a$"), (ValueKind::Code, "b")])
        );
        assert_ne!(
            base,
            tuple(&[(ValueKind::Code, "ab"), (ValueKind::Code, "")])
        );
        assert_ne!(
            base,
            tuple(&[(ValueKind::Code, "b"), (ValueKind::Code, "a")])
        );
        assert_ne!(
            base,
            tuple(&[(ValueKind::Code, "a"), (ValueKind::SystemCode, "b")])
        );
        assert_ne!(base, tuple(&[(ValueKind::Code, "a")]));
        assert_ne!(
            base,
            tuple(&[
                (ValueKind::Code, "a"),
                (ValueKind::Code, "b"),
                (ValueKind::Code, "")
            ])
        );
        // A one-component tuple is not the single value.
        assert_ne!(
            tuple(&[(ValueKind::Code, "a")]),
            key.digest("Observation", "p", ValueKind::Code, "a")
        );
        for kind in [
            ValueKind::Present,
            ValueKind::Prefix,
            ValueKind::Normalized,
            ValueKind::Exact,
            ValueKind::SystemCode,
            ValueKind::Code,
            ValueKind::CodeWithoutSystem,
            ValueKind::System,
            ValueKind::Reference,
            ValueKind::ReferenceId,
            ValueKind::Uri,
            ValueKind::UnitSystemCode,
            ValueKind::UnitCode,
        ] {
            assert_ne!(kind.tag(), TUPLE_TAG);
        }
        let other = BlindIndexKey::from_bytes([2; KEY_LEN]);
        assert_ne!(
            base,
            other.digest_tuple(
                "Observation",
                "p",
                &[(ValueKind::Code, "a"), (ValueKind::Code, "b")]
            )
        );
    }
}
