//! Create, read, vread, update, patch, delete and history (instance, type and system) of
//! resources.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::access::policy;
use crate::access::{Permission, RequestContext};
use crate::clock::now_micros;
use crate::crypto::{EncryptedBlob, Envelope, ResourceBinding};
use crate::error::AppError;
use crate::fhir::document::{self, VersionMeta};
use crate::fhir::patch::{PatchDocument, PatchFormat, parse_patch, patch_resource};
use crate::fhir::validate::validate_resource;
use crate::fhir::{ResourceId, ResourceType, ResourceTypes};
use crate::ledger::EntryResource;
use crate::ledger::entry::content_hash;
use crate::store::resources::{
    self as rows, HistoryWindow, ResourceHead, ScanWindow, VersionKey, VersionRow,
};
use crate::store::search::{self as search_rows, IndexRows};
use crate::store::{DbConnection, DbPool, StoreError};

use super::blocking;
use super::gate::withhold;
use super::ledger::{LedgerEvent, LedgerService, PendingEntry};
use super::search::SearchIndex;

/// How often a write is retried after losing a race to a concurrent writer of the same
/// resource before answering 409.
const MAX_WRITE_ATTEMPTS: usize = 16;

/// A resource version as returned to a client.
#[derive(Debug, Clone)]
pub struct StoredResource {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub meta: VersionMeta,
    /// The stored JSON (decrypted).
    pub json: String,
}

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

#[derive(Debug, Clone, Copy, Default)]
pub struct HistoryQuery {
    pub count: i64,
    pub since: Option<i64>,
    /// Paging cursor: only versions older than this one.
    pub before_version: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct HistoryEntry {
    pub meta: VersionMeta,
    pub method: String,
    /// `None` for a deletion.
    pub json: Option<String>,
}

/// A type-level (`resource_type` set) or system-level history page (http.html#history).
#[derive(Debug, Clone, Default)]
pub struct HistoryScanQuery {
    pub resource_type: Option<ResourceType>,
    pub count: i64,
    pub since: Option<i64>,
    /// Paging cursor: only versions after this one in history order.
    pub after: Option<VersionKey>,
}

/// One version of some resource, in a type- or system-level history.
#[derive(Debug, Clone)]
pub struct ScannedEntry {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub entry: HistoryEntry,
}

#[derive(Debug, Clone)]
pub struct HistoryScanPage {
    pub entries: Vec<ScannedEntry>,
    /// Cursor for the next (older) page, when there is one.
    pub next: Option<VersionKey>,
}

#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Versions matching the query without the cursor.
    pub total: i64,
    /// Cursor for the next (older) page, when there is one.
    pub next_before_version: Option<i64>,
}

/// A resource read for a client, with the compartments it is in (for its ledger entry).
#[derive(Debug, Clone)]
pub(crate) struct Disclosed {
    pub resource: StoredResource,
    /// `None` for a type outside compartments.
    pub members: Option<BTreeSet<String>>,
}

/// Services over stored resources. Cheap to clone.
#[derive(Clone)]
pub struct ResourceService {
    pool: DbPool,
    envelope: Arc<Envelope>,
    types: Arc<ResourceTypes>,
    ledger: LedgerService,
    search: Arc<SearchIndex>,
    /// Largest resource a PATCH may produce (the request body limit: what a PUT may send).
    max_resource_bytes: usize,
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

impl From<diesel::result::Error> for TxError {
    fn from(error: diesel::result::Error) -> Self {
        Self::App(StoreError::classify(error).into())
    }
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

impl ResourceService {
    pub fn new(
        pool: DbPool,
        envelope: Arc<Envelope>,
        types: Arc<ResourceTypes>,
        ledger: LedgerService,
        search: Arc<SearchIndex>,
    ) -> Self {
        Self {
            pool,
            envelope,
            types,
            ledger,
            search,
            max_resource_bytes: 16 * 1024 * 1024,
        }
    }

    /// Bounds what a PATCH may produce (the server's request body limit).
    pub fn with_max_resource_bytes(mut self, max_resource_bytes: usize) -> Self {
        self.max_resource_bytes = max_resource_bytes;
        self
    }

    pub fn search_index(&self) -> &SearchIndex {
        &self.search
    }

    pub(crate) fn ledger(&self) -> &LedgerService {
        &self.ledger
    }

    /// The database pool's connections: `(open, idle)`.
    pub fn pool_usage(&self) -> (u32, u32) {
        self.pool.usage()
    }

    /// Runs the work of an interaction that reads (and ledgers what it disclosed or refused)
    /// and answers once its entries are durable, without holding a thread while they commit:
    /// `work` gets a clone of this service whose ledger appends are held, and they join the
    /// next group commit while the request awaits it. `short` work (a read by id) runs on the
    /// calling thread when the database is local and a connection is free, sparing the hand-off
    /// to a blocking thread and back; anything else runs on one.
    pub(super) async fn disclose<T: Send + 'static>(
        &self,
        short: bool,
        work: impl FnOnce(Self) -> Result<T, AppError> + Send + 'static,
    ) -> Result<T, AppError> {
        let (ledger, deferred) = self.ledger.deferring();
        let this = Self {
            ledger,
            ..self.clone()
        };
        let result = if short && self.pool.local_reader_idle() {
            work(this)
        } else {
            blocking(move || work(this)).await
        };
        self.ledger.commit_deferred(deferred).await?;
        result
    }

    /// Resolves a type name from a URL.
    pub fn resolve_type(&self, name: &str) -> Result<ResourceType, AppError> {
        Ok(self.types.resolve(name)?)
    }

    /// `POST /{type}`: stores a new resource under a server-assigned id. An `id` in the body
    /// is ignored, as R4 requires (http.html#create).
    pub async fn create(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        body: Vec<u8>,
    ) -> Result<WriteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize(
                &ctx,
                Permission::Create,
                resource_type.as_str(),
                "create",
                Vec::new(),
            )?;
            let validated = validate_resource(&this.types, &resource_type, &body)?;
            let id = ResourceId::generate();
            let prepared =
                this.prepare_create(&ctx, &resource_type, &id, &validated.compact_json)?;
            let kind = WriteKind::Prepared(Box::new(prepared));
            this.write(&ctx, &resource_type, &id, None, kind)?
                .into_content()
        })
        .await
    }

    /// `PUT /{type}/{id}`: updates, or creates with the client's id (http.html#update).
    pub async fn update(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: ResourceId,
        body: Vec<u8>,
        if_match: Option<i64>,
    ) -> Result<WriteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize_instance(
                &ctx,
                Permission::Update,
                &resource_type,
                &id,
                None,
                "update",
            )?;
            let validated = validate_resource(&this.types, &resource_type, &body)?;
            match validated.id.as_deref() {
                Some(body_id) if body_id == id.as_str() => {}
                Some(_) => {
                    return Err(AppError::BadRequest {
                        message: format!(
                            "the id in the body does not match the id '{id}' in the URL"
                        ),
                        expression: Some(format!("{resource_type}.id")),
                    });
                }
                None => {
                    return Err(AppError::BadRequest {
                        message: "an update must carry the resource id in the body".into(),
                        expression: Some(format!("{resource_type}.id")),
                    });
                }
            }
            let kind = WriteKind::Content {
                compact_json: validated.compact_json,
                method: "PUT",
            };
            this.write(&ctx, &resource_type, &id, if_match, kind)?
                .into_content()
        })
        .await
    }

    /// `PATCH /{type}/{id}` with a JSON Patch or a FHIRPath Patch (http.html#patch). The
    /// patch is applied to the current version inside the write transaction, after the
    /// gate has checked that version is the token's to change, so a patch's tests never
    /// evaluate another patient's record, and a patch is never written on top of a version
    /// it was not computed from: if another writer gets in first, the transaction rolls back
    /// and the patch is applied again to the new version. The result is bounded (see
    /// [`crate::fhir::patch`]), validated like the body of an update and stored as the next
    /// version with method `PATCH`; it is ledgered as an `update` (a new content version,
    /// which is what `audit` and other verifiers match write entries against).
    pub async fn patch(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: ResourceId,
        format: PatchFormat,
        body: Vec<u8>,
        if_match: Option<i64>,
    ) -> Result<WriteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize_instance(
                &ctx,
                Permission::Update,
                &resource_type,
                &id,
                None,
                "update",
            )?;
            let patch = parse_patch(format, &body)?;
            this.write(
                &ctx,
                &resource_type,
                &id,
                if_match,
                WriteKind::Patch { patch },
            )?
            .into_content()
        })
        .await
    }

    /// `DELETE /{type}/{id}`: writes a deletion version; deleting a deleted resource is a
    /// no-op (http.html#delete).
    pub async fn delete(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: ResourceId,
        if_match: Option<i64>,
    ) -> Result<DeleteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize_instance(
                &ctx,
                Permission::Delete,
                &resource_type,
                &id,
                None,
                "delete",
            )?;
            match this.write(&ctx, &resource_type, &id, if_match, WriteKind::Delete)? {
                Written::Deleted(outcome) => Ok(outcome),
                Written::Content(_) => Err(AppError::Internal("a deletion wrote content".into())),
            }
        })
        .await
    }

    /// `GET /{type}/{id}`.
    pub async fn read(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: ResourceId,
    ) -> Result<StoredResource, AppError> {
        let ctx = ctx.clone();
        self.disclose(true, move |this| {
            this.authorize_instance(&ctx, Permission::Read, &resource_type, &id, None, "read")?;
            let result = this.confine_read(&ctx, this.read_current(&resource_type, &id));
            let result = this.masked(&ctx, Permission::Read, &resource_type, &id, result);
            this.record_disclosure(&ctx, "read", &resource_type, &id, None, result)
        })
        .await
    }

    /// A resource read by id, with the compartments it is in: a confined token gets it only
    /// when they are ones it opens (else 403, naming them for those patients' views).
    fn confine_read(
        &self,
        ctx: &RequestContext,
        result: Result<StoredResource, AppError>,
    ) -> Result<Disclosed, AppError> {
        let resource = result?;
        let members = self.search.stored_compartments(
            resource.resource_type.as_str(),
            resource.id.as_str(),
            &resource.json,
        );
        self.visible(None, ctx, resource.resource_type.as_str(), members.as_ref())?;
        Ok(Disclosed { resource, members })
    }

    /// A result whose absence (404, 410) a confined token may not learn of is refused as
    /// outside instead (see [`Self::mask_absence`]).
    fn masked<T>(
        &self,
        ctx: &RequestContext,
        permission: Permission,
        resource_type: &ResourceType,
        id: &ResourceId,
        result: Result<T, AppError>,
    ) -> Result<T, AppError> {
        result.map_err(|error| match self.connection() {
            Ok(mut conn) => self.mask_absence(&mut conn, ctx, permission, resource_type, id, error),
            Err(failure) => failure,
        })
    }

    fn read_current(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
    ) -> Result<StoredResource, AppError> {
        let mut conn = self.connection()?;
        let (_, row) = rows::current(&mut conn, resource_type.as_str(), id.as_str())?
            .ok_or_else(|| AppError::NotFound(format!("{resource_type}/{id}")))?;
        let row = row.ok_or_else(|| {
            AppError::Internal(format!("{resource_type}/{id} has no current version row"))
        })?;
        drop(conn);
        self.open_version(resource_type, id, &row)
    }

    /// `GET /{type}/{id}/_history/{vid}`.
    pub async fn vread(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: ResourceId,
        version_id: i64,
    ) -> Result<StoredResource, AppError> {
        let ctx = ctx.clone();
        self.disclose(true, move |this| {
            this.authorize_instance(
                &ctx,
                Permission::Read,
                &resource_type,
                &id,
                Some(version_id),
                "vread",
            )?;
            let result =
                this.confine_read(&ctx, this.read_version(&resource_type, &id, version_id));
            let result = this.masked(&ctx, Permission::Read, &resource_type, &id, result);
            this.record_disclosure(&ctx, "vread", &resource_type, &id, Some(version_id), result)
        })
        .await
    }

    pub(super) fn read_version(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: i64,
    ) -> Result<StoredResource, AppError> {
        let mut conn = self.connection()?;
        let row = rows::version(&mut conn, resource_type.as_str(), id.as_str(), version_id)?
            .ok_or_else(|| {
                AppError::NotFound(format!("{resource_type}/{id}/_history/{version_id}"))
            })?;
        self.open_version(resource_type, id, &row)
    }

    /// `GET /{type}/{id}/_history`: versions newest first.
    pub async fn history(
        &self,
        ctx: &RequestContext,
        resource_type: ResourceType,
        id: ResourceId,
        query: HistoryQuery,
    ) -> Result<HistoryPage, AppError> {
        let ctx = ctx.clone();
        self.disclose(false, move |this| {
            this.authorize_instance(&ctx, Permission::Read, &resource_type, &id, None, "history")?;
            let result = this
                .confine_instance(&ctx, Permission::Read, &resource_type, &id)
                .and_then(|()| this.history_page(&resource_type, &id, query));
            let mut result = this.masked(&ctx, Permission::Read, &resource_type, &id, result);
            match &mut result {
                Ok(page) => {
                    let index = this.search_index();
                    let mut event = LedgerEvent::permit("history");
                    let mut withheld = 0;
                    page.entries.retain(|e| {
                        let members = e.json.as_deref().map_or_else(
                            || {
                                index
                                    .has_compartments(resource_type.as_str())
                                    .then(Default::default)
                            },
                            |json| {
                                index.stored_compartments(resource_type.as_str(), id.as_str(), json)
                            },
                        );
                        if this
                            .visible(None, &ctx, resource_type.as_str(), members.as_ref())
                            .is_err()
                        {
                            withheld += 1;
                            return false;
                        }
                        if e.json.is_some() {
                            let disclosed = target(&resource_type, &id, Some(e.meta.version_id));
                            event.touch(disclosed, members);
                        }
                        true
                    });
                    this.ledger.append(&ctx, event.withholding(withheld))?;
                }
                Err(error) => {
                    this.record_refusal(&ctx, "history", &resource_type, &id, None, error)?
                }
            }
            result
        })
        .await
    }

    fn history_page(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        query: HistoryQuery,
    ) -> Result<HistoryPage, AppError> {
        let mut conn = self.connection()?;
        existing_head(&mut conn, resource_type, id)?;
        let total =
            rows::count_history(&mut conn, resource_type.as_str(), id.as_str(), query.since)?;
        // One row more than the page tells whether a next page exists.
        let window = HistoryWindow {
            before_version: query.before_version,
            since: query.since,
            limit: query.count + 1,
        };
        let mut versions = rows::history(&mut conn, resource_type.as_str(), id.as_str(), window)?;
        drop(conn);
        let has_more = versions.len() as i64 > query.count;
        versions.truncate(usize::try_from(query.count).unwrap_or(0));
        let next_before_version = if has_more {
            versions.last().map(|v| v.version_id)
        } else {
            None
        };
        let entries = versions
            .iter()
            .map(|row| {
                let meta = VersionMeta {
                    version_id: row.version_id,
                    last_updated: row.last_updated,
                };
                let json = if row.deleted {
                    None
                } else {
                    Some(self.open_version(resource_type, id, row)?.json)
                };
                Ok(HistoryEntry {
                    meta,
                    method: row.method.clone(),
                    json,
                })
            })
            .collect::<Result<Vec<_>, AppError>>()?;
        Ok(HistoryPage {
            entries,
            total,
            next_before_version,
        })
    }

    /// `GET /{type}/_history` and `GET /_history`: versions of many resources, newest first,
    /// one page per call. The page is ledgered as one `history` entry naming every version
    /// it disclosed (deletions disclose nothing).
    pub async fn history_scan(
        &self,
        ctx: &RequestContext,
        query: HistoryScanQuery,
    ) -> Result<HistoryScanPage, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            // A type's history is searched like the type; the system's history withholds
            // the versions of types the token may not see.
            match &query.resource_type {
                Some(resource_type) => {
                    let grant = this.authorize(
                        &ctx,
                        Permission::Search,
                        resource_type.as_str(),
                        "history",
                        Vec::new(),
                    )?;
                    let confinement = grant.confinement.as_ref();
                    this.confine_history(&ctx, confinement, resource_type.as_str())?;
                }
                None => {
                    ctx.rule.set(policy::RULE_PER_TYPE);
                    // Confined on any type of a compartment, the token is confined here.
                    let index = this.search_index();
                    let confinement = this
                        .types
                        .iter()
                        .filter(|resource_type| index.has_compartments(resource_type))
                        .find_map(|resource_type| {
                            policy::authorize(&ctx.principal, Permission::Search, resource_type)
                                .ok()
                                .and_then(|grant| grant.confinement)
                        });
                    this.confine_history(&ctx, confinement.as_ref(), "*")?;
                }
            }
            let mut page = this.history_scan_page(&query)?;
            let index = this.search_index();
            let mut event = LedgerEvent::permit("history");
            let withheld = withhold(&mut page.entries, |e| {
                let (resource_type, id) = (e.resource_type.as_str(), e.id.as_str());
                let members = e.entry.json.as_deref().map_or_else(
                    || index.has_compartments(resource_type).then(Default::default),
                    |json| index.stored_compartments(resource_type, id, json),
                );
                if this
                    .visible(None, &ctx, resource_type, members.as_ref())
                    .is_err()
                {
                    return false;
                }
                if e.entry.json.is_some() {
                    let disclosed = target(&e.resource_type, &e.id, Some(e.entry.meta.version_id));
                    event.touch(disclosed, members);
                }
                true
            });
            let event = event.withholding(withheld);
            this.ledger.append(&ctx, event)?;
            Ok(page)
        })
        .await
    }

    fn history_scan_page(&self, query: &HistoryScanQuery) -> Result<HistoryScanPage, AppError> {
        let mut conn = self.connection()?;
        // One row more than the page tells whether a next page exists.
        let window = ScanWindow {
            resource_type: query.resource_type.as_ref().map(ResourceType::as_str),
            since: query.since,
            after: query.after.as_ref(),
            limit: query.count + 1,
        };
        let mut versions = rows::history_scan(&mut conn, window)?;
        drop(conn);
        let has_more = versions.len() as i64 > query.count;
        versions.truncate(usize::try_from(query.count).unwrap_or(0));
        let next = if has_more {
            versions.last().map(VersionRow::key)
        } else {
            None
        };
        let entries = versions
            .iter()
            .map(|row| {
                let stored =
                    || AppError::Internal("a stored version has an invalid type or id".into());
                let resource_type = self
                    .types
                    .resolve(&row.resource_type)
                    .map_err(|_| stored())?;
                let id = ResourceId::parse(&row.id).map_err(|_| stored())?;
                let json = if row.deleted {
                    None
                } else {
                    Some(self.open_version(&resource_type, &id, row)?.json)
                };
                let entry = HistoryEntry {
                    meta: VersionMeta {
                        version_id: row.version_id,
                        last_updated: row.last_updated,
                    },
                    method: row.method.clone(),
                    json,
                };
                Ok(ScannedEntry {
                    resource_type,
                    id,
                    entry,
                })
            })
            .collect::<Result<Vec<_>, AppError>>()?;
        Ok(HistoryScanPage { entries, next })
    }

    /// Whether the database answers (for `/readyz`).
    pub async fn ping(&self) -> Result<(), AppError> {
        let this = self.clone();
        blocking(move || Ok(this.pool.ping()?)).await
    }

    pub(crate) fn connection(&self) -> Result<crate::store::PooledConnection, AppError> {
        self.pool.get().map_err(AppError::from)
    }

    /// Ledgers a read-type interaction: a permit naming the disclosed version, or a deny
    /// for a request that reached a resource and failed. Fails closed: if the entry cannot
    /// be written, nothing is returned.
    fn record_disclosure(
        &self,
        ctx: &RequestContext,
        action: &'static str,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: Option<i64>,
        result: Result<Disclosed, AppError>,
    ) -> Result<StoredResource, AppError> {
        match result {
            Ok(Disclosed { resource, members }) => {
                let disclosed = target(resource_type, id, Some(resource.meta.version_id));
                self.ledger.append(
                    ctx,
                    LedgerEvent::permit(action).touching(disclosed, members),
                )?;
                Ok(resource)
            }
            Err(error) => {
                self.record_refusal(ctx, action, resource_type, id, version_id, &error)?;
                Err(error)
            }
        }
    }

    /// Ledgers a failed request that reached a resource (not found, gone, conflicts).
    pub(super) fn record_refusal(
        &self,
        ctx: &RequestContext,
        action: &'static str,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: Option<i64>,
        error: &AppError,
    ) -> Result<(), AppError> {
        let resources = vec![target(resource_type, id, version_id)];
        let Some(event) = refusal_event(action, error, resources) else {
            return Ok(());
        };
        self.ledger.append(ctx, event).map(|_| ())
    }

    /// Decrypts one version; a deletion answers 410 Gone.
    pub(super) fn open_version(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        row: &VersionRow,
    ) -> Result<StoredResource, AppError> {
        if row.deleted {
            return Err(AppError::Gone {
                resource: resource_type.to_string(),
                id: id.to_string(),
                version_id: row.version_id,
            });
        }
        let blob = row.blob().ok_or_else(|| AppError::Integrity {
            resource: resource_type.to_string(),
            id: id.to_string(),
            version_id: row.version_id,
        })?;
        self.open_sealed(resource_type, id, row.version_id, row.last_updated, blob)
    }

    /// Decrypts sealed content; any failure is an integrity error naming the row.
    pub(crate) fn open_sealed(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: i64,
        last_updated: i64,
        blob: EncryptedBlob,
    ) -> Result<StoredResource, AppError> {
        let integrity = || AppError::Integrity {
            resource: resource_type.to_string(),
            id: id.to_string(),
            version_id,
        };
        let binding = ResourceBinding {
            resource_type: resource_type.as_str(),
            id: id.as_str(),
            version_id,
        };
        let plaintext = self
            .envelope
            .open(binding, &blob)
            .map_err(|_| integrity())?;
        let json = String::from_utf8(plaintext).map_err(|_| integrity())?;
        Ok(StoredResource {
            resource_type: resource_type.clone(),
            id: id.clone(),
            meta: VersionMeta {
                version_id,
                last_updated,
            },
            json,
        })
    }

    /// Writes the next version of a resource and its ledger entry in one transaction,
    /// retrying when a concurrent writer of the same resource got there first. Deleting a
    /// deleted resource writes no version, only its ledger entry. Failures that reached the
    /// resource are ledgered too.
    fn write(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        if_match: Option<i64>,
        kind: WriteKind,
    ) -> Result<Written, AppError> {
        let action = match &kind {
            WriteKind::Content { method: "POST", .. } | WriteKind::Prepared(_) => "create",
            WriteKind::Content { .. } | WriteKind::Patch { .. } => "update",
            WriteKind::Delete => "delete",
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

    fn write_with_retries(
        &self,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        if_match: Option<i64>,
        kind: &WriteKind,
    ) -> Result<(Written, String), AppError> {
        self.transact(&format!("{resource_type}/{id}"), |tx| {
            self.write_once(tx, ctx, resource_type, id, if_match, kind)
        })
    }

    /// Runs `work` in a write transaction, again from the start when it lost a race to a
    /// concurrent writer; `what` names the contended resource(s) in the 409 given up with.
    pub(super) fn transact<T>(
        &self,
        what: &str,
        mut work: impl FnMut(&mut DbConnection) -> Result<T, TxError>,
    ) -> Result<T, AppError> {
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
    }

    pub(super) fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    pub(super) fn types(&self) -> &ResourceTypes {
        &self.types
    }

    pub(super) fn write_once(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        resource_type: &ResourceType,
        id: &ResourceId,
        if_match: Option<i64>,
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
        self.pool.note_resources_written(1);
        let receipt = LedgerService::store_in(tx, &prepared.entry)?;
        Ok((Written::Content(prepared.outcome.clone()), receipt))
    }

    /// The deletion half of [`Self::write_once`]: a tombstone version, no index rows.
    fn delete_once(
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
                let event = LedgerEvent::permit("delete")
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
        // Attributed from the version deleted: a tombstone names no patient.
        let event = LedgerEvent::permit("delete")
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
        let json = document::stamp(compact_json, resource_type, id, meta)
            .map_err(|e| AppError::Internal(format!("stamping failed: {e}")))?;
        let binding = ResourceBinding {
            resource_type: resource_type.as_str(),
            id: id.as_str(),
            version_id: meta.version_id,
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
        let action = if created { "create" } else { "update" };
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
            version_id: 1,
            last_updated: now_micros(),
        };
        self.prepare_version(ctx, resource_type, id, meta, compact_json, "POST", true)
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
    /// Applies a patch to the current version `base` of a resource, read (and decrypted)
    /// in the write transaction `tx`, and returns the validated result.
    fn apply_patch(
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
        version_id: head.map_or(1, |h| h.current_version + 1),
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

/// The deny entry of a failed request, when the failure is evidence of an interaction with
/// a record; a refusal by the access policy names its rule.
pub(super) fn refusal_event(
    action: &'static str,
    error: &AppError,
    resources: Vec<EntryResource>,
) -> Option<LedgerEvent> {
    let mut event = LedgerEvent::deny(action, refusal_reason(error)?).naming(resources);
    if let AppError::Forbidden { rule, patients, .. } = error {
        event.rule = Some(rule);
        event = event.concerning(
            patients
                .iter()
                .filter_map(|p| p.strip_prefix("Patient/"))
                .map(str::to_owned),
        );
    }
    Some(event)
}

/// The ledger reason of a refusal that reached a record, or `None` for errors that did
/// not (malformed requests, server failures), which are not ledgered.
fn refusal_reason(error: &AppError) -> Option<&'static str> {
    Some(match error {
        AppError::Forbidden { .. } => "forbidden",
        AppError::NotFound(_) => "not-found",
        AppError::Gone { .. } => "gone",
        AppError::PreconditionFailed(_) => "precondition-failed",
        AppError::Conflict(_) => "conflict",
        // A patch that failed on the stored content (e.g. a `test` op): it was evaluated
        // against the record, so the attempt is evidence too.
        AppError::Unprocessable(_) => "unprocessable",
        _ => return None,
    })
}

/// Names one resource (version) in a ledger entry.
pub(crate) fn target(
    resource_type: &ResourceType,
    id: &ResourceId,
    version_id: Option<i64>,
) -> EntryResource {
    EntryResource {
        resource_type: resource_type.to_string(),
        id: id.to_string(),
        version_id: version_id.map(|v| v.to_string()),
        content_hash: None,
    }
}

/// `If-Match` (http.html#concurrency): the write applies only to the named current version.
fn check_precondition(
    resource_type: &ResourceType,
    id: &ResourceId,
    head: Option<ResourceHead>,
    if_match: Option<i64>,
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
