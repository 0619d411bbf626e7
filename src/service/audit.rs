//! `fhirledger audit`: checks a database against its own ledger. Every entry's signature
//! and tree position, every stored tree hash and checkpoint, and every stored resource
//! version against the content hash its write entry recorded. Reports what was modified,
//! swapped, deleted, or written without an entry.
//!
//! Everything is read in one snapshot of the database ([`read_snapshot`]), so a server
//! taking writes meanwhile causes no false findings. Someone who can write to the database
//! could still drop the newest entries and rebuild the hashes below them: no signature
//! breaks. So the tree must be covered by a signed checkpoint, and the audit takes a
//! checkpoint the auditor trusts (saved earlier, e.g. the state file of `fhirledger verify`)
//! and checks that the log still extends it.

use std::collections::HashMap;

use ed25519_dalek::VerifyingKey;

use crate::ledger::Action;
use crate::ledger::checkpoint::{VerifiedCheckpoint, verify_checkpoint};
use crate::ledger::entry::{content_hash, verify_entry};
use crate::ledger::key_chain::KeyChain;
use crate::ledger::tree::{self, MemoryHashStore};
use crate::store::connection::read_snapshot;
use crate::store::ledger as ledger_rows;
use crate::store::resources as resource_rows;
use crate::store::{DbConnection, StoreError};

/// Rows read per query.
const PAGE: i64 = 5000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// An entry's bytes are not a validly signed canonical entry (it was changed).
    EntryInvalid,
    /// Leaf indexes are not 0, 1, 2, … without gaps.
    IndexGap,
    /// A stored leaf or node hash differs from the one recomputed from the entries.
    TreeHash,
    /// A checkpoint's signature or root does not match the entries.
    Checkpoint,
    /// A version's ciphertext differs from what its write entry recorded.
    VersionModified,
    /// A version holds the ciphertext another version's entry recorded.
    VersionSwapped,
    /// A version the ledger recorded as written is missing.
    VersionDeleted,
    /// A version exists that no ledger entry recorded.
    VersionUnledgered,
    /// A resource's current-version pointer disagrees with its versions.
    HeadMismatch,
    /// The tree holds entries no signed checkpoint covers.
    Uncheckpointed,
    /// The log does not extend the trusted checkpoint: entries were dropped or rewritten.
    NotExtendingTrusted,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub kind: FindingKind,
    pub detail: String,
}

#[derive(Debug, Default)]
pub struct AuditReport {
    pub entries_checked: u64,
    pub pending_entries: u64,
    pub versions_checked: u64,
    pub checkpoints_checked: u64,
    pub tree_size: u64,
    pub findings: Vec<Finding>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.findings.is_empty()
    }

    fn add(&mut self, kind: FindingKind, detail: String) {
        self.findings.push(Finding { kind, detail });
    }
}

/// How a write entry described one version.
#[derive(Debug, Clone)]
struct RecordedWrite {
    entry: String,
    /// `None` for a deletion.
    content_hash: Option<String>,
}

type VersionKey = (String, String, i64);

/// The ledger's public key and the origin its checkpoints name.
pub struct AuditKey {
    pub verifying_key: VerifyingKey,
    /// The signed-note verifier key (`name+id+key`) the checkpoints are checked with.
    pub vkey: String,
}

/// The keys an audit checks signatures with: the database's chain of ledger keys, verified
/// from the auditor's key, and the checkpoints that announced each rotation.
pub struct AuditKeys {
    pub chain: KeyChain,
    pub announcements: Vec<VerifiedCheckpoint>,
}

/// Reads the chain of ledger keys from the database and verifies it from `key` (which must
/// be one of its keys); a database that never recorded its chain has `key` alone. `Err`
/// says why the chain does not hold: evidence of tampering, or the wrong key.
pub fn audit_keys(conn: &mut DbConnection, key: &AuditKey) -> Result<AuditKeys, String> {
    let size = ledger_rows::tree_size(conn)
        .map_err(|e| e.to_string())
        .and_then(|size| u64::try_from(size).map_err(|e| e.to_string()))?;
    let listed = crate::service::ledger::list_keys(conn, size).map_err(|e| e.to_string())?;
    if listed.is_empty() {
        let chain = KeyChain::single(&key.vkey).map_err(|e| e.to_string())?;
        return Ok(AuditKeys {
            chain,
            announcements: Vec::new(),
        });
    }
    let (chain, rotations) = KeyChain::verify(&listed, &key.vkey)
        .map_err(|e| format!("the chain of ledger keys: {e}"))?;
    Ok(AuditKeys {
        chain,
        announcements: rotations.into_iter().map(|r| r.checkpoint).collect(),
    })
}

/// Audits the database behind `conn`, in one snapshot. `trusted`: a checkpoint the auditor
/// saved earlier (verified with `key` by the caller), which the log must still extend.
/// `progress` receives a line now and then.
pub fn audit(
    conn: &mut DbConnection,
    key: &AuditKeys,
    trusted: Option<&VerifiedCheckpoint>,
    progress: &mut dyn FnMut(&str),
) -> Result<AuditReport, StoreError> {
    read_snapshot(conn, |conn| audit_snapshot(conn, key, trusted, progress))
}

fn audit_snapshot(
    conn: &mut DbConnection,
    keys: &AuditKeys,
    trusted: Option<&VerifiedCheckpoint>,
    progress: &mut dyn FnMut(&str),
) -> Result<AuditReport, StoreError> {
    let mut report = AuditReport::default();
    let mut writes: HashMap<VersionKey, RecordedWrite> = HashMap::new();
    let mut rebuilt = MemoryHashStore::new();

    // 1. Sequenced entries: signature, position, leaf hash.
    let tree_size = ledger_rows::tree_size(conn)?;
    report.tree_size = u64::try_from(tree_size).unwrap_or(0);
    let mut next_index: i64 = 0;
    loop {
        let page = ledger_rows::entries_from(conn, next_index, PAGE)?;
        if page.is_empty() {
            break;
        }
        for row in page {
            let index = row.leaf_index.unwrap_or(-1);
            if index != next_index {
                report.add(
                    FindingKind::IndexGap,
                    format!("expected ledger index {next_index}, found {index}"),
                );
                next_index = index;
            }
            let label = format!("ledger entry #{index} ({})", row.receipt);
            let signer = &keys
                .chain
                .for_entry(u64::try_from(index).unwrap_or(0))
                .verifying;
            record_entry(
                &mut report,
                &mut writes,
                signer,
                &row.data,
                &row.receipt,
                &label,
            );
            let leaf = rebuilt
                .append(&row.data)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            if row.leaf_hash.as_deref() != Some(leaf.0.as_slice()) {
                report.add(
                    FindingKind::TreeHash,
                    format!("{label}: stored leaf hash differs from its bytes"),
                );
            }
            next_index += 1;
            report.entries_checked += 1;
            if report.entries_checked % 50_000 == 0 {
                progress(&format!(
                    "entries: {} of {tree_size} checked",
                    report.entries_checked
                ));
            }
        }
    }
    if next_index != tree_size {
        report.add(
            FindingKind::IndexGap,
            format!("the ledger state says {tree_size} entries; {next_index} were found"),
        );
    }

    // 2. Pending entries (not yet in the tree) still cover their writes.
    for row in ledger_rows::pending_entries(conn)? {
        let label = format!("pending ledger entry {}", row.receipt);
        record_entry(
            &mut report,
            &mut writes,
            &keys.chain.current().verifying,
            &row.data,
            &row.receipt,
            &label,
        );
        report.pending_entries += 1;
    }
    progress(&format!(
        "entries: {} sequenced and {} pending checked",
        report.entries_checked, report.pending_entries
    ));

    // 3. Stored tree hashes, which proofs are served from.
    let expected = rebuilt.hashes();
    let mut start = 0i64;
    let mut stored_count = 0usize;
    loop {
        let page = ledger_rows::hashes_page(conn, start, PAGE)?;
        let Some(last) = page.last().map(|(i, _)| *i) else {
            break;
        };
        for (index, hash) in page {
            stored_count += 1;
            let matches = usize::try_from(index)
                .ok()
                .and_then(|i| expected.get(i))
                .is_some_and(|h| h.0.as_slice() == hash);
            if !matches {
                report.add(
                    FindingKind::TreeHash,
                    format!("stored tree hash {index} differs from the entries"),
                );
            }
        }
        start = last + 1;
    }
    if stored_count != expected.len() {
        report.add(
            FindingKind::TreeHash,
            format!(
                "{stored_count} tree hashes are stored; the entries give {}",
                expected.len()
            ),
        );
    }

    // 4. Every checkpoint: signature, and root equal to the entries' tree at its size; the
    // whole tree covered by one.
    let mut covered = 0u64;
    for row in ledger_rows::all_checkpoints(conn)? {
        report.checkpoints_checked += 1;
        let size = u64::try_from(row.tree_size).unwrap_or(u64::MAX);
        match verify_checkpoint(&row.note, &keys.chain.for_checkpoint(size).vkey) {
            Err(e) => report.add(
                FindingKind::Checkpoint,
                format!("checkpoint of size {size}: {e}"),
            ),
            Ok(verified) => {
                let rebuilt_root = (size <= rebuilt.size())
                    .then(|| tree::root(&rebuilt, size).ok())
                    .flatten();
                if verified.size != size || rebuilt_root != Some(verified.root) {
                    report.add(
                        FindingKind::Checkpoint,
                        format!("checkpoint of size {size} does not match the entries"),
                    );
                } else {
                    covered = covered.max(size);
                }
            }
        }
    }
    if report.tree_size > covered {
        report.add(
            FindingKind::Uncheckpointed,
            format!(
                "the tree has {} entries but the largest valid signed checkpoint covers {covered}",
                report.tree_size
            ),
        );
    }
    for announced in &keys.announcements {
        if tree::root(&rebuilt, announced.size).ok() != Some(announced.root) {
            report.add(
                FindingKind::Checkpoint,
                format!(
                    "the checkpoint announcing the ledger key of entry #{} does not match the entries",
                    announced.size
                ),
            );
        }
    }
    if let Some(trusted) = trusted {
        if trusted.size > rebuilt.size() {
            report.add(
                FindingKind::NotExtendingTrusted,
                format!(
                    "the trusted checkpoint covers {} entries but the log holds {}: entries were dropped",
                    trusted.size,
                    rebuilt.size()
                ),
            );
        } else if tree::root(&rebuilt, trusted.size).ok() != Some(trusted.root) {
            report.add(
                FindingKind::NotExtendingTrusted,
                format!(
                    "the first {} entries are not those of the trusted checkpoint: the log was rewritten",
                    trusted.size
                ),
            );
        } else {
            progress(&format!(
                "the log extends the trusted checkpoint of size {}",
                trusted.size
            ));
        }
    }

    // 5. Every stored version against the entry that wrote it.
    let by_hash: HashMap<String, VersionKey> = writes
        .iter()
        .filter_map(|(key, write)| write.content_hash.clone().map(|h| (h, key.clone())))
        .collect();
    let total_versions = resource_rows::count_versions(conn)?;
    let mut seen: HashMap<VersionKey, ()> = HashMap::new();
    let mut after: Option<VersionKey> = None;
    loop {
        let page = resource_rows::versions_page(
            conn,
            after.as_ref().map(|(t, i, v)| (t.as_str(), i.as_str(), *v)),
            PAGE,
        )?;
        let Some(last) = page.last() else { break };
        after = Some((last.resource_type.clone(), last.id.clone(), last.version_id));
        for version in page {
            report.versions_checked += 1;
            let key = (
                version.resource_type.clone(),
                version.id.clone(),
                version.version_id,
            );
            let label = format!(
                "{}/{}/_history/{}",
                version.resource_type, version.id, version.version_id
            );
            let actual = version.ciphertext.as_deref().map(content_hash);
            match writes.get(&key) {
                None => report.add(
                    FindingKind::VersionUnledgered,
                    format!("{label} has no ledger entry"),
                ),
                Some(recorded)
                    if recorded.content_hash == actual && version.deleted == actual.is_none() => {}
                Some(recorded) => {
                    let swapped_with = actual
                        .as_ref()
                        .and_then(|h| by_hash.get(h))
                        .filter(|other| **other != key);
                    match swapped_with {
                        Some((t, i, v)) => report.add(
                            FindingKind::VersionSwapped,
                            format!(
                                "{label} holds the content of {t}/{i}/_history/{v} (entry {})",
                                recorded.entry
                            ),
                        ),
                        None => report.add(
                            FindingKind::VersionModified,
                            format!(
                                "{label} differs from what ledger entry {} recorded",
                                recorded.entry
                            ),
                        ),
                    }
                }
            }
            seen.insert(key, ());
            if report.versions_checked % 50_000 == 0 {
                progress(&format!(
                    "versions: {} of {total_versions} checked",
                    report.versions_checked
                ));
            }
        }
    }
    let mut missing: Vec<(&VersionKey, &RecordedWrite)> = writes
        .iter()
        .filter(|(k, _)| !seen.contains_key(*k))
        .collect();
    missing.sort_by(|a, b| a.0.cmp(b.0));
    for ((t, i, v), recorded) in missing {
        report.add(
            FindingKind::VersionDeleted,
            format!(
                "{t}/{i}/_history/{v}, written by ledger entry {}, is missing",
                recorded.entry
            ),
        );
    }

    // 6. Current-version pointers: a rolled-back resource points below its newest entry.
    let mut newest: HashMap<(String, String), i64> = HashMap::new();
    for (t, i, v) in writes.keys() {
        let slot = newest.entry((t.clone(), i.clone())).or_insert(*v);
        *slot = (*slot).max(*v);
    }
    for (t, i, current) in resource_rows::all_heads(conn)? {
        if let Some(v) = newest.get(&(t.clone(), i.clone()))
            && *v != current
        {
            report.add(
                FindingKind::HeadMismatch,
                format!("{t}/{i} points at version {current}; the ledger recorded version {v} as its newest"),
            );
        }
    }
    progress(&format!("versions: {} checked", report.versions_checked));
    Ok(report)
}

/// Verifies one entry and remembers the versions it wrote.
fn record_entry(
    report: &mut AuditReport,
    writes: &mut HashMap<VersionKey, RecordedWrite>,
    key: &VerifyingKey,
    data: &[u8],
    receipt: &str,
    label: &str,
) {
    let entry = match verify_entry(data, key) {
        Ok(entry) => entry,
        Err(e) => {
            report.add(FindingKind::EntryInvalid, format!("{label}: {e}"));
            return;
        }
    };
    if entry.id != receipt {
        report.add(
            FindingKind::EntryInvalid,
            format!("{label}: stored under another receipt"),
        );
    }
    let is_write = Action::parse(&entry.action).is_some_and(Action::is_write)
        && entry.outcome == crate::ledger::Outcome::Permit;
    if !is_write {
        return;
    }
    for resource in entry.resources {
        let Some(version) = resource
            .version_id
            .as_deref()
            .and_then(|v| v.parse::<i64>().ok())
        else {
            continue;
        };
        // A repeated delete of a deleted resource names the existing tombstone.
        let key = (resource.resource_type, resource.id, version);
        if resource.content_hash.is_none() && writes.contains_key(&key) {
            continue;
        }
        writes.insert(
            key,
            RecordedWrite {
                entry: entry.id.clone(),
                content_hash: resource.content_hash,
            },
        );
    }
}
