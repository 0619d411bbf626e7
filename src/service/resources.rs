//! Create, read, vread, update, patch, delete and history (instance, type and system) of
//! resources.

use crate::access::policy;
use crate::access::{Permission, RequestContext};
use crate::error::AppError;
use crate::fhir::document::{VersionId, VersionMeta};
use crate::fhir::patch::{PatchFormat, parse_patch};
use crate::fhir::validate::validate_resource;
use crate::fhir::{ResourceId, ResourceType};
use crate::ledger::Action;
use crate::store::resources::{self as rows, HistoryWindow, ScanWindow, VersionKey};

use super::base::{Disclosed, ResourceService, StoredResource, target};
use super::blocking;
use super::cursor::{self, CursorKind};
use super::gate::withhold;
use super::ledger::LedgerEvent;
use super::write::{DeleteOutcome, WriteKind, WriteOutcome, Written, existing_head};

/// An instance history page (http.html#history).
#[derive(Debug, Clone, Default)]
pub struct HistoryQuery {
    pub count: i64,
    pub since: Option<i64>,
    /// `_cursor` from a `next` link: only versions older than the one it names.
    pub cursor: Option<String>,
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
    /// `_cursor` from a `next` link: only versions after the one it names, in history
    /// order.
    pub cursor: Option<String>,
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
    /// `_cursor` of the next (older) page, when there is one.
    pub next: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub entries: Vec<HistoryEntry>,
    /// Versions matching the query without the cursor.
    pub total: i64,
    /// `_cursor` of the next (older) page, when there is one.
    pub next: Option<String>,
}

impl ResourceService {
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
            this.authorize_subscriber(
                &ctx,
                Permission::Create,
                &resource_type,
                None,
                Action::Create,
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
        if_match: Option<VersionId>,
    ) -> Result<WriteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize_subscriber(
                &ctx,
                Permission::Update,
                &resource_type,
                Some(&id),
                Action::Update,
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
        if_match: Option<VersionId>,
    ) -> Result<WriteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize_subscriber(
                &ctx,
                Permission::Update,
                &resource_type,
                Some(&id),
                Action::Update,
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
        if_match: Option<VersionId>,
    ) -> Result<DeleteOutcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            this.authorize_subscriber(
                &ctx,
                Permission::Delete,
                &resource_type,
                Some(&id),
                Action::Delete,
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
            let grant = this.authorize_subscriber(
                &ctx,
                Permission::Read,
                &resource_type,
                Some(&id),
                Action::Read,
            )?;
            let result = this.read_current(&resource_type, &id);
            let result = if grant.rule == policy::RULE_SUBSCRIPTION_OWNER {
                this.confine_to_writer(&ctx, result)
            } else {
                this.confine_read(&ctx, result)
            };
            let result = this.masked(&ctx, Permission::Read, &resource_type, &id, result);
            this.record_disclosure(&ctx, Action::Read, &resource_type, &id, None, result)
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

    /// A Subscription read by its writer: the writer is checked again after the read, so
    /// that a version another wrote meanwhile is not shown (the writer changes only with a
    /// write, which the reader could not have made of another's).
    fn confine_to_writer(
        &self,
        ctx: &RequestContext,
        result: Result<StoredResource, AppError>,
    ) -> Result<Disclosed, AppError> {
        let resource = result?;
        let wrote = self.wrote_subscription(&mut *self.connection()?, ctx, &resource.id)?;
        if !wrote {
            return Err(policy::subscription_refusal().into());
        }
        Ok(Disclosed {
            resource,
            members: None,
        })
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

    pub(super) fn read_current(
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
        version_id: VersionId,
    ) -> Result<StoredResource, AppError> {
        let ctx = ctx.clone();
        self.disclose(true, move |this| {
            this.authorize_instance(
                &ctx,
                Permission::Read,
                &resource_type,
                &id,
                Some(version_id),
                Action::Vread,
            )?;
            let result =
                this.confine_read(&ctx, this.read_version(&resource_type, &id, version_id));
            let result = this.masked(&ctx, Permission::Read, &resource_type, &id, result);
            this.record_disclosure(
                &ctx,
                Action::Vread,
                &resource_type,
                &id,
                Some(version_id),
                result,
            )
        })
        .await
    }

    pub(super) fn read_version(
        &self,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: VersionId,
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
            this.authorize_instance(
                &ctx,
                Permission::Read,
                &resource_type,
                &id,
                None,
                Action::History,
            )?;
            let result = this
                .confine_instance(&ctx, Permission::Read, &resource_type, &id)
                .and_then(|()| this.history_page(&resource_type, &id, query));
            let mut result = this.masked(&ctx, Permission::Read, &resource_type, &id, result);
            match &mut result {
                Ok(page) => {
                    let index = this.search_index();
                    let mut event = LedgerEvent::permit(Action::History);
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
                    this.record_refusal(&ctx, Action::History, &resource_type, &id, None, error)?
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
        // The history cursor names the last version shown; only one of this resource's
        // versions continues this resource's history.
        let before: Option<VersionKey> = query
            .cursor
            .as_deref()
            .map(|text| cursor::open(self.envelope(), CursorKind::History, text))
            .transpose()?;
        let before_version = match before {
            Some(key) if key.resource_type == resource_type.as_str() && key.id == id.as_str() => {
                Some(key.version_id)
            }
            Some(_) => return Err(cursor::not_ours()),
            None => None,
        };
        let mut conn = self.connection()?;
        existing_head(&mut conn, resource_type, id)?;
        let total =
            rows::count_history(&mut conn, resource_type.as_str(), id.as_str(), query.since)?;
        // One row more than the page tells whether a next page exists.
        let window = HistoryWindow {
            before_version,
            since: query.since,
            limit: query.count + 1,
        };
        let mut versions = rows::history(&mut conn, resource_type.as_str(), id.as_str(), window)?;
        drop(conn);
        let has_more = versions.len() as i64 > query.count;
        versions.truncate(usize::try_from(query.count).unwrap_or(0));
        let next = match versions.last() {
            Some(last) if has_more => Some(cursor::seal(
                self.envelope(),
                CursorKind::History,
                &last.key(),
            )),
            _ => None,
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
            next,
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
                        Action::History,
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
            let mut event = LedgerEvent::permit(Action::History);
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
        let after: Option<VersionKey> = query
            .cursor
            .as_deref()
            .map(|text| cursor::open(self.envelope(), CursorKind::History, text))
            .transpose()?;
        let mut conn = self.connection()?;
        // One row more than the page tells whether a next page exists.
        let window = ScanWindow {
            resource_type: query.resource_type.as_ref().map(ResourceType::as_str),
            since: query.since,
            after: after.as_ref(),
            limit: query.count + 1,
        };
        let mut versions = rows::history_scan(&mut conn, window)?;
        drop(conn);
        let has_more = versions.len() as i64 > query.count;
        versions.truncate(usize::try_from(query.count).unwrap_or(0));
        let next = if has_more {
            versions
                .last()
                .map(|row| cursor::seal(self.envelope(), CursorKind::History, &row.key()))
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

    /// Ledgers a read-type interaction: a permit naming the disclosed version, or a deny
    /// for a request that reached a resource and failed. Fails closed: if the entry cannot
    /// be written, nothing is returned.
    fn record_disclosure(
        &self,
        ctx: &RequestContext,
        action: Action,
        resource_type: &ResourceType,
        id: &ResourceId,
        version_id: Option<VersionId>,
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
}
