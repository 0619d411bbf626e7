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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// The user's FHIR resource (`Practitioner/123`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fhir_user: Option<String>,
    /// The token's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// The purpose of use the token asserted (`ETREAT`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// `patient`, `user`, `system` (the widest scope context), `auditor`, …
    pub role: String,
    /// The token's subject; `anonymous` for a request without valid credentials,
    /// `internal` for the server's own tools.
    pub subject: String,
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

/// What an interaction did, as an entry's `action` names it. Entries carry the name as
/// text, so that a verifier reads logs written by any version; the server writes only these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Create,
    Update,
    Delete,
    Read,
    Vread,
    /// A page of an instance's, a type's or the system's history.
    History,
    /// A search page (also a Bundle's search entry, a conditional match's disclosure).
    Search,
    /// A page of `Patient/{id}/$everything`: a read, told apart from a search because it
    /// discloses a whole record at once.
    Everything,
    /// A bulk export (`$export`): the job's kick-off, and each page of resources it wrote
    /// to its files, one entry per patient whose record left in it.
    Export,
    /// A patient's view of the ledger (`GET /fhir/AuditEvent`).
    AuditView,
    /// The ledger API read by a token (entries, proofs, tiles).
    LedgerRead,
    /// Requests refused for want of valid credentials (aggregated per address).
    Authenticate,
    /// The master key split into shares (`fhirledger keys split`; `key` names its id).
    KeySplit,
    /// The master key rebuilt from its shares at a sealed start (`key` names its id).
    KeyUnseal,
    /// A master key rotation started: data keys wrapped by previous keys are re-wrapped by
    /// this one (`key` names the new key's id).
    KeyRotate,
    /// A previous key is used no more and may be destroyed (`key` names it): a master key
    /// that wraps no data key any more, an index key no index row was built with any more.
    KeyRetire,
    /// The search index is being rebuilt for a new index key (`key` names the new key's id).
    IndexKeyRotate,
    /// The ledger signing key changes: this entry, signed by the outgoing key and included in
    /// a checkpoint it signs, names the incoming key's verifier key in `key`; every later
    /// entry and checkpoint is signed by the incoming key.
    LedgerKeyRotate,
    /// A subscriber told of an event (a rest-hook notification delivered): `resources` name
    /// the Subscription and the event's focus; the actor is the subscriber.
    Notify,
}

impl Action {
    /// Every action (kept in step with the variants: `parse` reads names through it).
    pub const ALL: [Self; 19] = [
        Self::Create,
        Self::Update,
        Self::Delete,
        Self::Read,
        Self::Vread,
        Self::History,
        Self::Search,
        Self::Everything,
        Self::Export,
        Self::AuditView,
        Self::LedgerRead,
        Self::Authenticate,
        Self::KeySplit,
        Self::KeyUnseal,
        Self::KeyRotate,
        Self::KeyRetire,
        Self::IndexKeyRotate,
        Self::LedgerKeyRotate,
        Self::Notify,
    ];

    /// The name entries carry.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Update => "update",
            Self::Delete => "delete",
            Self::Read => "read",
            Self::Vread => "vread",
            Self::History => "history",
            Self::Search => "search",
            Self::Everything => "everything",
            Self::Export => "export",
            Self::AuditView => "audit-view",
            Self::LedgerRead => "ledger-read",
            Self::Authenticate => "authenticate",
            Self::KeySplit => "key-split",
            Self::KeyUnseal => "key-unseal",
            Self::KeyRotate => "key-rotate",
            Self::KeyRetire => "key-retire",
            Self::IndexKeyRotate => "index-key-rotate",
            Self::LedgerKeyRotate => "ledger-key-rotate",
            Self::Notify => "notify",
        }
    }

    /// The action an entry names; `None` for a name this server does not write.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|action| action.as_str() == name)
    }

    /// Whether the action changed a record (its entry names the content hash written).
    pub const fn is_write(self) -> bool {
        matches!(self, Self::Create | Self::Update | Self::Delete)
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
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
    /// For writes: lowercase hex SHA-256 of the stored ciphertext of this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    pub id: String,
    #[serde(rename = "type")]
    pub resource_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version_id: Option<String>,
}

/// One ledger entry (without its signature).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    /// `create`, `read`, `vread`, `update`, `delete`, `history`, …
    pub action: String,
    pub actor: Actor,
    /// On an aggregated entry (refusals of unauthenticated requests): how many requests it
    /// stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The receipt: an id the ledger API resolves to this entry.
    pub id: String,
    /// On an entry about key custody (`key-split`, `key-unseal`, `key-rotate`, `key-retire`,
    /// `index-key-rotate`): the id of the key concerned (never the key); on `ledger-key-rotate`,
    /// the incoming ledger key's verifier key (public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    pub outcome: Outcome,
    /// On a part of an interaction that touched several patients' records: the receipt
    /// of its lead entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part_of: Option<String>,
    /// On the lead entry of such an interaction: the receipts of its parts, one per
    /// patient, each naming only that patient's resources.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<String>,
    /// The patient compartment (`Patient/<id>`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patient: Option<String>,
    /// Every patient compartment (`Patient/<id>`) the entry's resources belong to, when
    /// there is more than one. Written by servers before entries were split per patient;
    /// read for those entries, never written now.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patients: Vec<String>,
    /// Why the request was refused or failed (`not-found`, `gone`, `precondition-failed`,
    /// `conflict`), when `outcome` is `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The server-assigned request id.
    pub request: String,
    pub resources: Vec<EntryResource>,
    /// The access rule that decided (`scope:system`, `scope`, `authentication`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// On an aggregated entry: the client address the requests came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// RFC 3339 UTC with microseconds.
    pub time: String,
    pub v: u32,
    /// How many resources a search or history matched but withheld because the token may
    /// not see them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub withheld: Option<u64>,
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
        let unsigned = fast_canonical(&self)?;
        let sig = BASE64.encode(key.sign(&unsigned));
        let receipt = self.id.clone();
        let leaf_data = match splice_signature(&unsigned, &sig) {
            Some(leaf_data) => leaf_data,
            None => canonical(&WithSignature { entry: self, sig })?,
        };
        Ok(SignedEntry { receipt, leaf_data })
    }
}

/// The JCS bytes of an entry written in one pass: the structs above declare their fields
/// in the order JCS sorts their (ASCII) names, integers are the only numbers, and
/// serde_json escapes strings as JCS does (RFC 8785 §3.2.2.2), so its output already is the
/// canonical form; `verify_entry` checks every entry against the canonicalizer all the same.
/// Signing a search that touched 50 patients canonicalizes 51 entries twice each, which
/// through the generic canonicalizer cost as much as the signatures.
fn fast_canonical(entry: &LedgerEntry) -> Result<Vec<u8>, LedgerError> {
    // JCS writes numbers as IEEE 754 doubles: integers past 2^53 are rounded there.
    const EXACT: u64 = 1 << 53;
    if entry.count.is_some_and(|n| n > EXACT) || entry.withheld.is_some_and(|n| n > EXACT) {
        return canonical(entry);
    }
    serde_json::to_vec(entry).map_err(|e| LedgerError::Malformed(format!("entry JSON: {e}")))
}

/// The JCS bytes of the signed entry, from those of the unsigned one: `sig` sorts after
/// every member but `source`, `time`, `v` and `withheld`, and `time` is always there. (A
/// member name cannot occur inside a string, whose quotes are escaped, and no nested
/// object has either name.) `None` if the bytes are not of that shape.
fn splice_signature(unsigned: &[u8], sig: &str) -> Option<Vec<u8>> {
    let find = |needle: &[u8]| unsigned.windows(needle.len()).position(|w| w == needle);
    let at = find(b",\"source\":").or_else(|| find(b",\"time\":"))?;
    let mut signed = Vec::with_capacity(unsigned.len() + sig.len() + 9);
    signed.extend_from_slice(unsigned.get(..at)?);
    signed.extend_from_slice(b",\"sig\":\"");
    signed.extend_from_slice(sig.as_bytes());
    signed.push(b'"');
    signed.extend_from_slice(unsigned.get(at..)?);
    Some(signed)
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

    #[test]
    fn every_action_is_read_back_from_its_name_and_names_are_distinct() {
        let mut names = std::collections::BTreeSet::new();
        for action in Action::ALL {
            assert_eq!(Action::parse(action.as_str()), Some(action));
            assert!(names.insert(action.as_str()), "{action} named twice");
        }
        assert_eq!(
            Action::parse("patch"),
            None,
            "patches are written as updates"
        );
        let writes: Vec<Action> = Action::ALL.into_iter().filter(|a| a.is_write()).collect();
        assert_eq!(writes, [Action::Create, Action::Update, Action::Delete]);
    }

    fn sample() -> LedgerEntry {
        LedgerEntry {
            v: ENTRY_VERSION,
            id: "r-1".into(),
            key: None,
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
    fn the_one_pass_form_is_the_canonical_form() {
        let key = LedgerKey::generate("test/ledger").unwrap();
        let mut entries = vec![sample()];
        let mut full = sample();
        full.actor = Actor {
            client: Some("app \"quoted\" \\ /slash\u{1f}\u{7f}é😀".into()),
            fhir_user: Some("Practitioner/7".into()),
            issuer: Some("https://idp\n".into()),
            purpose: Some("ETREAT".into()),
            role: "user".into(),
            subject: "s\u{0}\t\r".into(),
        };
        full.count = Some(3);
        full.key = Some("0123456789abcdef".into());
        full.part_of = Some("lead".into());
        full.parts = vec!["a".into(), "b".into()];
        full.patients = vec!["Patient/x".into()];
        full.reason = Some("forbidden".into());
        full.rule = Some("scope".into());
        full.source = Some("192.0.2.1".into());
        full.withheld = Some(1 << 53);
        // Past 2^53 JCS rounds the number: the one-pass form steps aside.
        let mut huge = full.clone();
        huge.withheld = Some(u64::MAX);
        assert_eq!(fast_canonical(&huge).unwrap(), canonical(&huge).unwrap());
        entries.push(full);
        let mut bare = sample();
        bare.resources.clear();
        bare.patient = None;
        entries.push(bare);
        for entry in entries {
            assert_eq!(fast_canonical(&entry).unwrap(), canonical(&entry).unwrap());
            let signed = entry.clone().sign(&key).unwrap();
            let sig =
                serde_json::from_slice::<serde_json::Value>(&signed.leaf_data).unwrap()["sig"]
                    .as_str()
                    .unwrap()
                    .to_owned();
            let expected = canonical(&WithSignature { entry, sig }).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&signed.leaf_data),
                String::from_utf8_lossy(&expected)
            );
            verify_entry(&signed.leaf_data, &key.verifying_key()).unwrap();
        }
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
