//! Ledger entries (design.md, "The ledger"): a JSON object in RFC 8785 canonical form
//! (JCS: keys sorted, no insignificant whitespace), signed with Ed25519 over the JCS bytes
//! of the entry without `sig`. The leaf of the Merkle tree is the JCS bytes of the entry
//! with `sig`, exactly as `GET /ledger/entries` serves them. Entries hold no PHI: only
//! opaque ids, codes and hashes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Verifier as _, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::keys::LedgerKey;
use super::tree::LedgerError;

/// Entry format version.
pub const ENTRY_VERSION: u32 = 1;

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Actor {
    /// The token's subject; `anonymous` for a request without valid credentials,
    /// `internal` for the server's own tools.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// `patient`, `user`, `system` (the widest scope context), `auditor`, …
    pub role: String,
    /// The token's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The user's FHIR resource (`Practitioner/123`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    /// The purpose of use the token asserted (`ETREAT`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

impl Actor {
    /// An actor known by name and role only.
    pub fn named(subject: &str, role: &str) -> Self {
        Self {
            subject: subject.into(),
            client: None,
            role: role.into(),
            issuer: None,
            fhir_user: None,
            purpose: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Permit,
    Deny,
}

/// A resource version an entry disclosed or changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryResource {
    #[serde(rename = "type")]
    pub resource_type: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
    /// For writes: lowercase hex SHA-256 of the stored ciphertext of this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
}

/// One ledger entry (without its signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub v: u32,
    /// The receipt: an id the ledger API resolves to this entry.
    pub id: String,
    /// RFC 3339 UTC with microseconds.
    pub time: String,
    pub actor: Actor,
    /// `create`, `read`, `vread`, `update`, `delete`, `history`, …
    pub action: String,
    pub outcome: Outcome,
    /// Why the request was refused or failed (`not-found`, `gone`, `precondition-failed`,
    /// `conflict`), when `outcome` is `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The access rule that decided (`scope:system`, `scope`, `authentication`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// How many resources a search or history matched but withheld because the token may
    /// not see them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<u64>,
    pub resources: Vec<EntryResource>,
    /// The patient compartment (`Patient/<id>`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Every patient compartment (`Patient/<id>`) the entry's resources belong to, when
    /// there is more than one. Written by servers before entries were split per patient;
    /// read for those entries, never written now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<String>,
    /// On the lead entry of an interaction that touched several patients' records: the
    /// receipts of its parts, one per patient, each naming only that patient's resources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    /// On such a part: the receipt of its lead entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<String>,
    /// On an aggregated entry (refusals of unauthenticated requests): how many requests it
    /// stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// On an aggregated entry: the client address the requests came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The server-assigned request id.
    pub request: String,
}

/// An entry as stored and served: the exact leaf bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedEntry {
    pub receipt: String,
    /// JCS bytes of the entry including `sig`.
    pub leaf_data: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct WithSignature {
    #[serde(flatten)]
    entry: LedgerEntry,
    sig: String,
}

fn canonical<T: Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    serde_json_canonicalizer::to_vec(value)
        .map_err(|e| LedgerError::Malformed(format!("canonical JSON: {e}")))
}

impl LedgerEntry {
    /// The ids of the patients whose compartments the entry touched: its `patient` (and the
    /// `patients` of entries written before entries were split per patient); for an entry
    /// that names neither, every Patient among its resources.
    pub fn patient_ids(&self) -> std::collections::BTreeSet<String> {
        let named: std::collections::BTreeSet<String> = self
            .patient
            .iter()
            .chain(&self.patients)
            .filter_map(|reference| reference.strip_prefix("Patient/"))
            .map(str::to_owned)
            .collect();
        if !named.is_empty() {
            return named;
        }
        self.resources
            .iter()
            .filter(|r| r.resource_type == "Patient")
            .map(|r| r.id.clone())
            .collect()
    }

    /// Signs the entry: `sig` is Ed25519 over the JCS bytes of the entry without `sig`.
    pub fn sign(self, key: &LedgerKey) -> Result<SignedEntry, LedgerError> {
        let unsigned = canonical(&self)?;
        let sig = BASE64.encode(key.sign(&unsigned));
        let receipt = self.id.clone();
        let leaf_data = canonical(&WithSignature { entry: self, sig })?;
        Ok(SignedEntry { receipt, leaf_data })
    }
}

/// Parses leaf bytes and checks that they are canonical and carry a valid signature.
pub fn verify_entry(leaf_data: &[u8], key: &VerifyingKey) -> Result<LedgerEntry, LedgerError> {
    let signed: WithSignature = serde_json::from_slice(leaf_data)
        .map_err(|e| LedgerError::Malformed(format!("entry JSON: {e}")))?;
    if canonical(&signed)? != leaf_data {
        return Err(LedgerError::Malformed(
            "entry bytes are not in canonical (JCS) form".into(),
        ));
    }
    let sig_bytes: [u8; 64] = BASE64
        .decode(&signed.sig)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| LedgerError::Malformed("sig is not a base64 Ed25519 signature".into()))?;
    let unsigned = canonical(&signed.entry)?;
    key.verify(&unsigned, &Signature::from_bytes(&sig_bytes))
        .map_err(|_| LedgerError::InvalidProof)?;
    Ok(signed.entry)
}

/// Lowercase hex SHA-256, the form of `contentHash`.
pub fn content_hash(ciphertext: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(ciphertext)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> LedgerEntry {
        LedgerEntry {
            v: ENTRY_VERSION,
            id: "r-1".into(),
            time: "2026-11-21T22:00:00.000000Z".into(),
            actor: Actor::named("anonymous", "anonymous"),
            action: "create".into(),
            outcome: Outcome::Permit,
            reason: None,
            rule: None,
            withheld: None,
            resources: vec![EntryResource {
                resource_type: "Patient".into(),
                id: "p".into(),
                version_id: Some("1".into()),
                content_hash: Some(content_hash(b"x")),
            }],
            patient: Some("Patient/p".into()),
            patients: Vec::new(),
            parts: Vec::new(),
            part_of: None,
            count: None,
            source: None,
            request: "req".into(),
        }
    }

    #[test]
    fn signed_entries_are_canonical_and_verify() {
        let key = LedgerKey::generate("test/ledger").unwrap();
        let signed = sample().sign(&key).unwrap();
        let text = String::from_utf8(signed.leaf_data.clone()).unwrap();
        // Keys sorted, no whitespace.
        assert!(text.starts_with(r#"{"action":"create","actor":{"role":"anonymous","subject":"anonymous"},"id":"r-1","outcome":"permit","patient":"Patient/p","request":"req","resources":[{"contentHash":""#), "{text}");
        assert!(!text.contains(' '));
        assert_eq!(
            verify_entry(&signed.leaf_data, &key.verifying_key()).unwrap(),
            sample()
        );
    }

    #[test]
    fn changed_entries_or_other_keys_fail() {
        let key = LedgerKey::generate("test/ledger").unwrap();
        let signed = sample().sign(&key).unwrap();
        let tampered = String::from_utf8(signed.leaf_data.clone())
            .unwrap()
            .replace("\"create\"", "\"delete\"");
        assert!(verify_entry(tampered.as_bytes(), &key.verifying_key()).is_err());
        let other = LedgerKey::generate("test/ledger").unwrap();
        assert!(verify_entry(&signed.leaf_data, &other.verifying_key()).is_err());
        let spaced = String::from_utf8(signed.leaf_data)
            .unwrap()
            .replacen(',', ", ", 1);
        assert!(verify_entry(spaced.as_bytes(), &key.verifying_key()).is_err());
    }
}
