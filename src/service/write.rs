//! The write pipeline: one version of a resource from content to commit. Inside one store
//! transaction it reads the current head, lets the gate confine it, checks `If-Match`,
//! applies a patch, stamps the version (`meta.versionId`, `meta.lastUpdated`), seals it
//! with the envelope, writes the blind-index rows the indexer gives, and appends the ledger
//! entry that commits with it; a write that loses a race to a concurrent writer retries.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::access::{Permission, RequestContext};
use crate::clock::now_micros;
use crate::crypto::ResourceBinding;
use crate::error::AppError;
use crate::fhir::document::{self, VersionId, VersionMeta};
use crate::fhir::patch::{PatchDocument, patch_resource};
use crate::fhir::{ResourceId, ResourceType};
use crate::ledger::Action;
use crate::ledger::entry::content_hash;
use crate::store::resources::{self as rows, ResourceHead, VersionRow};
use crate::store::search::{self as search_rows, IndexRows};
use crate::store::{DbConnection, StoreError};

use super::base::{ResourceService, StoredResource, target};
use super::ledger::{LedgerEvent, LedgerService, PendingEntry};

/// How often a write is retried after losing a race to a concurrent writer of the same
/// resource before answering 409.
const MAX_WRITE_ATTEMPTS: usize = 16;

#[derive(Debug, Clone)]
pub struct WriteOutcome {
    pub resource: StoredResource,
    /// True when this write created the resource (or re-created it after a deletion).
    pub created: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// A deletion version was written.
    Deleted(VersionMeta),
    /// The resource was already deleted; nothing was written.
    AlreadyDeleted(VersionMeta),
}

/// What a write wants to do once it has seen the current state.
pub(super) enum WriteKind {
    /// Content from a create (POST, always new) or an update (PUT).
    Content {
        compact_json: String,
        method: &'static str,
    },
    Delete,
    /// A patch (JSON Patch or FHIRPath Patch), applied inside the write transaction to the
    /// version it reads there.
    Patch {
        patch: PatchDocument,
    },
    /// Content prepared as the first version of a new resource before the transaction
    /// began; written as plain content if the resource exists by then.
    Prepared(Box<PreparedVersion>),
}

impl WriteKind {
    /// The content to write and the method writing it; `None` for a delete or a patch.
    fn content(&self) -> Option<(&str, &'static str)> {
        match self {
            Self::Content {
                compact_json,
                method,
            } => Some((compact_json, method)),
            Self::Prepared(prepared) => Some((&prepared.compact_json, prepared.method)),
            Self::Delete | Self::Patch { .. } => None,
        }
    }
}

/// What a write transaction did.
pub(super) enum Written {
    Content(WriteOutcome),
    Deleted(DeleteOutcome),
}

impl Written {
    pub(super) fn into_content(self) -> Result<WriteOutcome, AppError> {
        match self {
            Self::Content(outcome) => Ok(outcome),
            Self::Deleted(_) => Err(AppError::Internal(
                "a content write produced a deletion".into(),
            )),
        }
    }
}

/// Failure inside a write transaction; `LostRace` rolls the transaction back and retries.
#[derive(Debug)]
pub(super) enum TxError {
    LostRace,
    App(AppError),
}

impl From<AppError> for TxError {
    fn from(error: AppError) -> Self {
        Self::App(error)
    }
}

impl From<StoreError> for TxError {
    fn from(error: StoreError) -> Self {
        Self::App(error.into())
    }
}

/// A version ready to store: see [`ResourceService::prepare_version`].
#[derive(Debug, Clone)]
pub(super) struct PreparedVersion {
    /// What it was prepared from, to prepare again if the assumptions no longer hold.
    compact_json: String,
    method: &'static str,
    row: VersionRow,
    outcome: WriteOutcome,
    index_rows: IndexRows,
    entry: PendingEntry,
    /// The compartments the version is in (`None`: a type outside them).
    members: Option<BTreeSet<String>>,
}

impl ResourceService {
    /// Runs `work` in a write transaction, again from the start when it lost a race to a
    /// concurrent writer; `what` names the contended resource(s) in the 409 given up with.
    /// Ledger entries appended inside it (refusals) are committed after it.
    pub(super) fn transact<T>(
        &self,
        what: &str,
        mut work: impl FnMut(&mut DbConnection) -> Result<T, TxError>,
    ) -> Result<T, AppError> {
        self.ledger.holding(|| {
            for _ in 0..MAX_WRITE_ATTEMPTS {
                match self.pool.write(&mut work) {
                    Ok(done) => return Ok(done),
                    Err(TxError::LostRace) => continue,
                    Err(TxError::App(error)) => return Err(error),
                }
            }
            Err(AppError::Conflict(format!(
                "{what} is being changed by other requests; retry"
            )))
        })?
    }

    /// Writes the next version of a resource and its ledger entry in one transaction,
    /// retrying when a concurrent writer of the same resource got there first. Deleting a
    /// deleted resource writes no version, only its ledger entry. Failures that reached the
    /// resource are ledgered too.
    pub(super) fn write(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        if_match: Option<VersionId>,
        kind: WriteKind,
    ) -> Result<Written, AppError> {
        let action = match &kind {
            WriteKind::Content { method: "POST", .. } | WriteKind::Prepared(_) => Action::Create,
            WriteKind::Content { .. } | WriteKind::Patch { .. } => Action::Update,
            WriteKind::Delete => Action::Delete,
        };
        let result = self.write_with_retries(ctx, resource_type, id, if_match, &kind);
        match result {
            Ok((outcome, receipt)) => {
                ctx.receipt.set(receipt);
                Ok(outcome)
            }
            Err(error) => {
                self.record_refusal(ctx, action, resource_type, id, if_match, &error)?;
                Err(error)
            }
        }
    }

    pub(super) fn write_with_retries(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        if_match: Option<VersionId>,
        kind: &WriteKind,
    ) -> Result<(Written, String), AppError> {
        self.transact(&format!("{resource_type}/{id}"), |tx| {
            self.write_once(tx, ctx, resource_type, id, if_match, kind)
        })
    }

    pub(super) fn write_once(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        if_match: Option<VersionId>,
        kind: &WriteKind,
    ) -> Result<(Written, String), TxError> {
        let head = rows::head(tx, resource_type.as_str(), id.as_str())?;
        let permission = match kind {
            WriteKind::Delete => Permission::Delete,
            WriteKind::Prepared(_) | WriteKind::Content { method: "POST", .. } => {
                Permission::Create
            }
            WriteKind::Content { .. } | WriteKind::Patch { .. } => Permission::Update,
        };
        // The gate first: a token learns nothing of a resource that is not its to change,
        // not its version (If-Match), not whether a patch's tests hold on it.
        let existing = self.confine_existing(tx, ctx, permission, resource_type, id, head)?;
        if head.is_none() && permission != Permission::Create {
            // A confined token creates with POST: updating, patching or deleting an id that
            // is not there would tell it the id is free.
            self.confine_absent(ctx, permission, resource_type)?;
        }
        // A patch needs a resource to patch: 404 or 410 before If-Match is looked at.
        let patch_base = match kind {
            WriteKind::Patch { .. } => {
                Some(patch_target(resource_type, id, head).map_err(|error| {
                    self.mask_absence(tx, ctx, permission, resource_type, id, error)
                })?)
            }
            _ => None,
        };
        check_precondition(resource_type, id, head, if_match)?;
        let meta = next_version(head);

        // A patch becomes content computed from the version this transaction read; if that
        // version is replaced before commit, `advance` below fails and we start again.
        let patched;
        let kind = match (kind, patch_base) {
            (WriteKind::Patch { patch }, Some(base)) => {
                patched = WriteKind::Content {
                    compact_json: self.apply_patch(tx, resource_type, id, base, patch)?,
                    method: "PATCH",
                };
                &patched
            }
            (other, _) => other,
        };

        let prepared_here;
        let prepared = match kind {
            // Prepared for a first version: usable only if the resource is still new.
            WriteKind::Prepared(prepared) if head.is_none() => prepared.as_ref(),
            WriteKind::Delete => {
                return self.delete_once(tx, ctx, resource_type, id, head, existing);
            }
            other => {
                let Some((compact_json, method)) = other.content() else {
                    return Err(
                        AppError::Internal("a patch reached the write unapplied".into()).into(),
                    );
                };
                let created = head.is_none_or(|h| h.deleted);
                prepared_here = self.prepare_version(
                    ctx,
                    resource_type,
                    id,
                    meta,
                    compact_json,
                    method,
                    created,
                )?;
                &prepared_here
            }
        };
        self.confine_content(
            tx,
            ctx,
            permission,
            resource_type,
            prepared.members.as_ref(),
            existing.as_ref(),
        )?;

        let seq = match head {
            None => match rows::insert_first(tx, &prepared.row, &prepared.index_rows.presence) {
                Ok(seq) => seq,
                Err(StoreError::UniqueViolation) => return Err(TxError::LostRace),
                Err(other) => return Err(other.into()),
            },
            Some(h)
                if rows::advance(
                    tx,
                    h.current_version,
                    &prepared.row,
                    &prepared.index_rows.presence,
                )? =>
            {
                h.seq
            }
            Some(_) => return Err(TxError::LostRace),
        };
        // The index always describes the current version.
        if head.is_some() {
            search_rows::clear_index(tx, seq)?;
        }
        search_rows::insert_index(tx, seq, resource_type.as_str(), &prepared.index_rows)?;
        let written = &prepared.outcome.resource;
        let version = written.meta.version_id.to_string();
        self.note_write(
            tx,
            ctx,
            resource_type.as_str(),
            id.as_str(),
            Some((&written.json, &version)),
        )?;
        self.pool.note_resources_written(1);
        let receipt = LedgerService::store_in(tx, &prepared.entry)?;
        Ok((Written::Content(prepared.outcome.clone()), receipt))
    }

    /// [`Self::write_once`] for a batch of first versions prepared outside the transaction
    /// (a bulk load), `(type, id, prepared)` each, naming distinct resources: the same gate
    /// on each, then every resource row, version, index row and ledger entry in multi-row
    /// INSERTs instead of a dozen statements per resource. Writes the candidates whose
    /// resource does not exist yet and returns which those are; the caller writes the others
    /// through [`Self::write_once`], which reads and replaces their current version.
    pub(super) fn write_firsts_together(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        candidates: &[(&ResourceType, &ResourceId, &PreparedVersion)],
    ) -> Result<Vec<bool>, TxError> {
        let mut ids_by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (resource_type, id, _) in candidates {
            ids_by_type
                .entry(resource_type.as_str())
                .or_default()
                .push(id.as_str());
        }
        let mut stored = HashSet::new();
        for (resource_type, ids) in &ids_by_type {
            for id in rows::heads_of(tx, resource_type, ids)?.into_keys() {
                stored.insert((*resource_type, id));
            }
        }
        let fresh: Vec<bool> = candidates
            .iter()
            .map(|(resource_type, id, _)| {
                !stored.contains(&(resource_type.as_str(), id.as_str().to_owned()))
            })
            .collect();
        let written = || {
            candidates
                .iter()
                .zip(&fresh)
                .filter(|(_, fresh)| **fresh)
                .map(|(candidate, _)| candidate)
        };
        for (resource_type, id, prepared) in written() {
            let existing =
                self.confine_existing(tx, ctx, Permission::Create, resource_type, id, None)?;
            self.confine_content(
                tx,
                ctx,
                Permission::Create,
                resource_type,
                prepared.members.as_ref(),
                existing.as_ref(),
            )?;
        }
        let mut index = Vec::new();
        for resource_type in ids_by_type.keys() {
            let of_type: Vec<&PreparedVersion> = written()
                .filter(|(t, _, _)| t.as_str() == *resource_type)
                .map(|(_, _, prepared)| *prepared)
                .collect();
            if of_type.is_empty() {
                continue;
            }
            let firsts: Vec<(&VersionRow, Vec<u8>)> = of_type
                .iter()
                .map(|prepared| (&prepared.row, prepared.index_rows.presence.concat()))
                .collect();
            let seqs = match rows::insert_firsts(tx, resource_type, &firsts) {
                Ok(seqs) => seqs,
                Err(StoreError::UniqueViolation) => return Err(TxError::LostRace),
                Err(other) => return Err(other.into()),
            };
            index.extend(
                seqs.into_iter()
                    .zip(&of_type)
                    .map(|(seq, prepared)| (seq, *resource_type, &prepared.index_rows)),
            );
        }
        search_rows::insert_index_many(tx, &index)?;
        LedgerService::store_many_in(tx, written().map(|(_, _, prepared)| &prepared.entry))?;
        self.pool.note_resources_written(index.len() as u64);
        Ok(fresh)
    }

    /// The deletion half of [`Self::write_once`]: a tombstone version, no index rows.
    pub(super) fn delete_once(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        head: Option<ResourceHead>,
        members: Option<BTreeSet<String>>,
    ) -> Result<(Written, String), TxError> {
        let meta = next_version(head);
        let head = match head {
            None => {
                let absent = AppError::NotFound(format!("{resource_type}/{id}"));
                return Err(self
                    .mask_absence(tx, ctx, Permission::Delete, resource_type, id, absent)
                    .into());
            }
            // Already deleted: nothing changes, but the attempt is an interaction with the
            // record.
            Some(h) if h.deleted => {
                let event = LedgerEvent::permit(Action::Delete)
                    .touching(target(resource_type, id, Some(h.current_version)), members);
                let current = VersionMeta {
                    version_id: h.current_version,
                    last_updated: h.last_updated,
                };
                let receipt = self.ledger.append_in(tx, ctx, event)?;
                return Ok((
                    Written::Deleted(DeleteOutcome::AlreadyDeleted(current)),
                    receipt,
                ));
            }
            Some(h) => h,
        };
        let row = VersionRow::tombstone(
            resource_type.as_str(),
            id.as_str(),
            meta.version_id,
            meta.last_updated,
        );
        if !rows::advance(tx, head.current_version, &row, &[])? {
            return Err(TxError::LostRace);
        }
        search_rows::clear_index(tx, head.seq)?;
        self.note_write(tx, ctx, resource_type.as_str(), id.as_str(), None)?;
        // Attributed from the version deleted: a tombstone names no patient.
        let event = LedgerEvent::permit(Action::Delete)
            .touching(target(resource_type, id, Some(meta.version_id)), members);
        let receipt = self.ledger.append_in(tx, ctx, event)?;
        Ok((Written::Deleted(DeleteOutcome::Deleted(meta)), receipt))
    }

    /// The CPU-heavy half of writing content, which needs no database: stamping `meta` into
    /// the resource, sealing it, extracting its index rows and signing its ledger entry.
    /// Creates with server-assigned ids do this before taking the write lock
    /// ([`WriteKind::Prepared`]); other writes do it inside their transaction.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn prepare_version(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        meta: VersionMeta,
        compact_json: &str,
        method: &'static str,
        created: bool,
    ) -> Result<PreparedVersion, AppError> {
        let admitted =
            self.admit_subscription(ctx, resource_type.as_str(), compact_json, created)?;
        let compact_json = admitted.as_deref().unwrap_or(compact_json);
        let json = document::stamp(compact_json, resource_type, id, meta)
            .map_err(|e| AppError::Internal(format!("stamping failed: {e}")))?;
        let binding = ResourceBinding {
            resource_type: resource_type.as_str(),
            id: id.as_str(),
            version_id: meta.version_id.get(),
        };
        let blob = self.envelope.seal(binding, json.as_bytes());
        let row = VersionRow::with_content(
            resource_type.as_str(),
            id.as_str(),
            meta.version_id,
            meta.last_updated,
            method,
            blob,
        );
        let parsed: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| AppError::Internal(format!("stamped JSON does not parse: {e}")))?;
        let index_rows = self.search.rows(resource_type.as_str(), &parsed);
        let mut written = target(resource_type, id, Some(meta.version_id));
        written.content_hash = row.ciphertext.as_deref().map(content_hash);
        let members = self
            .search
            .compartments(resource_type.as_str(), id.as_str(), &parsed);
        let action = if created {
            Action::Create
        } else {
            Action::Update
        };
        let entry = self.ledger.sign_event(
            ctx,
            LedgerEvent::permit(action).touching(written, members.clone()),
        )?;
        Ok(PreparedVersion {
            members,
            compact_json: compact_json.to_owned(),
            method,
            row,
            outcome: WriteOutcome {
                resource: StoredResource {
                    resource_type: resource_type.clone(),
                    id: id.clone(),
                    meta,
                    json,
                },
                created,
            },
            index_rows,
            entry,
        })
    }

    /// Prepares the first version of a resource about to be created under a fresh id,
    /// outside any transaction (see [`Self::prepare_version`]).
    pub(super) fn prepare_create(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        compact_json: &str,
    ) -> Result<PreparedVersion, AppError> {
        let meta = VersionMeta {
            version_id: VersionId::FIRST,
            last_updated: now_micros(),
        };
        self.prepare_version(ctx, resource_type, id, meta, compact_json, "POST", true)
    }

    /// Applies a patch to the current version `base` of a resource, read (and decrypted)
    /// in the write transaction `tx`, and returns the validated result.
    pub(super) fn apply_patch(
        &self,
        tx: &mut DbConnection,
        resource_type: &ResourceType,
        id: &ResourceId,
        base: ResourceHead,
        patch: &PatchDocument,
    ) -> Result<String, AppError> {
        let row = rows::version(
            tx,
            resource_type.as_str(),
            id.as_str(),
            base.current_version,
        )?
        .ok_or_else(|| {
            AppError::Internal(format!("{resource_type}/{id} has no current version row"))
        })?;
        let current = self.open_version(resource_type, id, &row)?;
        let patched = patch_resource(
            &self.types,
            resource_type,
            id,
            &current.json,
            patch,
            self.max_resource_bytes,
        )?;
        Ok(patched.compact_json)
    }
}

/// The version a write after `head` writes. lastUpdated never goes backwards within one
/// resource, even if the clock does.
fn next_version(head: Option<ResourceHead>) -> VersionMeta {
    VersionMeta {
        version_id: head.map_or(VersionId::FIRST, |h| h.current_version.next()),
        last_updated: head.map_or(now_micros(), |h| now_micros().max(h.last_updated + 1)),
    }
}

/// The resource a patch applies to: it must exist (404) and not be deleted (410).
fn patch_target(
    resource_type: &ResourceType,
    id: &ResourceId,
    head: Option<ResourceHead>,
) -> Result<ResourceHead, AppError> {
    match head {
        None => Err(AppError::NotFound(format!("{resource_type}/{id}"))),
        Some(h) if h.deleted => Err(AppError::Gone {
            resource: resource_type.to_string(),
            id: id.to_string(),
            version_id: h.current_version,
        }),
        Some(h) => Ok(h),
    }
}

/// The current state of a resource that must exist (404 otherwise).
pub(super) fn existing_head(
    conn: &mut DbConnection,
    resource_type: &ResourceType,
    id: &ResourceId,
) -> Result<ResourceHead, AppError> {
    rows::head(conn, resource_type.as_str(), id.as_str())?
        .ok_or_else(|| AppError::NotFound(format!("{resource_type}/{id}")))
}

/// `If-Match` (http.html#concurrency): the write applies only to the named current version.
fn check_precondition(
    resource_type: &ResourceType,
    id: &ResourceId,
    head: Option<ResourceHead>,
    if_match: Option<VersionId>,
) -> Result<(), AppError> {
    let Some(expected) = if_match else {
        return Ok(());
    };
    match head {
        Some(h) if h.current_version == expected => Ok(()),
        Some(h) => Err(AppError::PreconditionFailed(format!(
            "If-Match names version {expected} but the current version of {resource_type}/{id} is {}",
            h.current_version
        ))),
        None => Err(AppError::PreconditionFailed(format!(
            "If-Match names version {expected} but {resource_type}/{id} does not exist"
        ))),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests")]

    use super::*;
    use crate::fhir::ResourceTypes;

    fn patient(id: &str) -> (ResourceType, ResourceId) {
        (
            ResourceTypes::load().unwrap().resolve("Patient").unwrap(),
            ResourceId::parse(id).unwrap(),
        )
    }

    fn v(n: i64) -> VersionId {
        VersionId::from(n)
    }

    fn head(current_version: i64, deleted: bool, last_updated: i64) -> ResourceHead {
        ResourceHead {
            current_version: v(current_version),
            deleted,
            last_updated,
            seq: 7,
        }
    }

    #[test]
    fn a_new_version_follows_the_head_and_never_goes_back_in_time() {
        let before = now_micros();
        let first = next_version(None);
        assert_eq!(first.version_id, VersionId::FIRST);
        assert!(first.last_updated >= before);
        let after_past = next_version(Some(head(3, false, before - 1_000_000)));
        assert_eq!(after_past.version_id, v(4));
        assert!(after_past.last_updated >= before);
        // A head stamped ahead of this clock (another node's, or the clock stepped back):
        // the next version is still later than it.
        let ahead = now_micros() + 60_000_000;
        let after_future = next_version(Some(head(9, true, ahead)));
        assert_eq!(after_future.version_id, v(10));
        assert_eq!(after_future.last_updated, ahead + 1);
    }

    #[test]
    fn a_patch_needs_a_live_resource() {
        let (resource_type, id) = patient("p1");
        assert!(matches!(
            patch_target(&resource_type, &id, None),
            Err(AppError::NotFound(what)) if what == "Patient/p1"
        ));
        assert!(matches!(
            patch_target(&resource_type, &id, Some(head(4, true, 0))),
            Err(AppError::Gone { version_id, .. }) if version_id == v(4)
        ));
        let live = patch_target(&resource_type, &id, Some(head(2, false, 0))).unwrap();
        assert_eq!(live.current_version, v(2));
    }

    #[test]
    fn if_match_holds_only_for_the_current_version() {
        let (resource_type, id) = patient("p1");
        let current = Some(head(3, false, 0));
        assert!(check_precondition(&resource_type, &id, current, None).is_ok());
        assert!(check_precondition(&resource_type, &id, None, None).is_ok());
        assert!(check_precondition(&resource_type, &id, current, Some(v(3))).is_ok());
        for (head, expected) in [
            (current, Some(v(2))),
            (current, Some(v(4))),
            (None, Some(v(1))),
        ] {
            let refused = check_precondition(&resource_type, &id, head, expected).unwrap_err();
            assert!(
                matches!(&refused, AppError::PreconditionFailed(message) if message.contains("Patient/p1")),
                "{refused:?}"
            );
        }
    }

    #[test]
    fn only_content_writes_carry_content() {
        let put = WriteKind::Content {
            compact_json: r#"{"resourceType":"Patient"}"#.into(),
            method: "PUT",
        };
        assert_eq!(
            put.content(),
            Some((r#"{"resourceType":"Patient"}"#, "PUT"))
        );
        assert_eq!(WriteKind::Delete.content(), None);
        let deleted = Written::Deleted(DeleteOutcome::AlreadyDeleted(VersionMeta {
            version_id: v(2),
            last_updated: 0,
        }));
        assert!(matches!(deleted.into_content(), Err(AppError::Internal(_))));
    }
}
