//! Transactions, batches and conditional interactions (http.html#transaction,
//! http.html#cond-update): planning each request, resolving conditional targets and
//! references (`urn:uuid:` full URLs, `Type?query`) inside the write transaction, and running
//! the entries in the order the spec gives. A transaction is one database transaction: its
//! ledger entries commit with it or not at all.

use std::collections::{HashMap, HashSet};

use sha2::{Digest as _, Sha256};

use crate::access::{Permission, RequestContext};
use crate::error::AppError;
use crate::fhir::bundle_request::{BundleKind, BundleRequest, Method, RequestEntry};
use crate::fhir::document::{VersionId, VersionMeta};
use crate::fhir::patch::{PatchDocument, PatchFormat, parse_patch};
use crate::fhir::references::rewrite_references;
use crate::fhir::search_query::{Handling, SearchRequest, parse_search};
use crate::fhir::validate::validate_resource;
use crate::fhir::{ResourceId, ResourceType};
use crate::ledger::Action;
use crate::store::DbConnection;
use crate::store::resources as rows;
use crate::store::search::lock_condition;

use super::base::{ResourceService, StoredResource, target};
use super::blocking;
use super::gate::AuthorizedSearch;
use super::gate::refusal_event;
use super::ledger::LedgerEvent;
use super::search::SearchPage;
use super::write::{DeleteOutcome, TxError, WriteKind, Written, existing_head};

/// Most entries one Bundle may hold.
pub const MAX_BUNDLE_ENTRIES: usize = 10_000;

/// Which resource a write applies to.
#[derive(Debug, Clone)]
pub enum Target {
    Id(ResourceId),
    /// Conditional: the single current resource matching the search.
    Matching(Box<SearchRequest>),
}

/// One request, checked and ready to run.
#[derive(Debug, Clone)]
pub enum Operation {
    Create {
        resource_type: ResourceType,
        compact_json: String,
        if_none_exist: Option<SearchRequest>,
    },
    Update {
        resource_type: ResourceType,
        target: Target,
        compact_json: String,
        /// The id in the body, if any.
        body_id: Option<String>,
        if_match: Option<VersionId>,
    },
    Patch {
        resource_type: ResourceType,
        id: ResourceId,
        patch: PatchDocument,
        if_match: Option<VersionId>,
    },
    Delete {
        resource_type: ResourceType,
        target: Target,
        if_match: Option<VersionId>,
    },
    Read {
        resource_type: ResourceType,
        id: ResourceId,
        version: Option<VersionId>,
        if_none_match: Option<VersionId>,
    },
    Search(SearchRequest),
}

/// What one operation did.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A version was written (201 when `created`, else 200).
    Written {
        resource: StoredResource,
        created: bool,
    },
    /// Conditional create found the resource already there (200, nothing written).
    Existing(StoredResource),
    /// A deletion (204); `None` when a conditional delete matched nothing.
    Deleted(Option<(ResourceType, ResourceId, VersionMeta)>),
    Read(StoredResource),
    /// Conditional read: the client's version is current (304).
    NotModified(VersionMeta),
    Searched {
        page: Box<SearchPage>,
        request: Box<SearchRequest>,
    },
}

/// What the gate allowed an operation to evaluate: its condition or search, and each
/// conditional reference in its resource, authorized and confined for the request.
#[derive(Debug, Clone, Default)]
struct Authorized {
    search: Option<AuthorizedSearch>,
    /// By the reference's text (`Organization?identifier=…`).
    references: HashMap<String, AuthorizedSearch>,
}

impl Authorized {
    /// The operation's own condition or search; fails closed if the gate did not see it.
    fn search(&self) -> Result<&AuthorizedSearch, AppError> {
        self.search
            .as_ref()
            .ok_or_else(|| AppError::Internal("a condition was not authorized".into()))
    }
}

/// A failed entry of a Bundle: its index and the error.
#[derive(Debug)]
pub struct EntryError {
    pub index: usize,
    pub error: AppError,
}

impl ResourceService {
    /// Turns one request into an [`Operation`]: validates the resource and parses searches.
    pub fn plan(
        &self,
        method: Method,
        url: &crate::fhir::bundle_request::EntryUrl,
        resource: Option<&[u8]>,
        headers: ConditionalHeaders<'_>,
        handling: Handling,
    ) -> Result<Operation, AppError> {
        let resource_type = self.resolve_type(&url.resource_type)?;
        let search = |query: &[(String, String)]| -> Result<SearchRequest, AppError> {
            let index = self.search_index();
            Ok(parse_search(
                index.registry(),
                index,
                vec![resource_type.to_string()],
                query,
                handling,
            )?)
        };
        let condition = |query: &[(String, String)]| -> Result<SearchRequest, AppError> {
            if query.is_empty() {
                return Err(AppError::bad_request(
                    "a conditional request needs search parameters",
                ));
            }
            // Conditions are never lenient: ignoring a criterion would widen the match.
            let index = self.search_index();
            Ok(parse_search(
                index.registry(),
                index,
                vec![resource_type.to_string()],
                query,
                Handling::Strict,
            )?)
        };
        let id = url.id.as_deref().map(ResourceId::parse).transpose()?;
        let if_match = headers.if_match.map(parse_etag).transpose()?;
        let body = |what: &str| {
            resource.ok_or_else(|| AppError::bad_request(format!("{what} needs a resource")))
        };
        Ok(match (method, id) {
            (Method::Post, None) if url.query.is_empty() => {
                let validated = validate_resource(self.types(), &resource_type, body("a create")?)?;
                let if_none_exist = headers
                    .if_none_exist
                    .map(|query| {
                        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(
                            query.trim_start_matches('?'),
                        )
                        .map_err(|_| AppError::BadRequest {
                            message: "If-None-Exist must be a search query".into(),
                            expression: Some("If-None-Exist".into()),
                        })?;
                        condition(&pairs)
                    })
                    .transpose()?;
                Operation::Create {
                    resource_type,
                    compact_json: validated.compact_json,
                    if_none_exist,
                }
            }
            (Method::Put, id) => {
                let validated =
                    validate_resource(self.types(), &resource_type, body("an update")?)?;
                let target = match id {
                    Some(id) => {
                        if validated.id.as_deref() != Some(id.as_str()) {
                            return Err(AppError::BadRequest {
                                message: format!(
                                    "an update must carry the id '{id}' of its URL in the body"
                                ),
                                expression: Some(format!("{resource_type}.id")),
                            });
                        }
                        Target::Id(id)
                    }
                    None => Target::Matching(Box::new(condition(&url.query)?)),
                };
                Operation::Update {
                    resource_type,
                    target,
                    body_id: validated.id,
                    compact_json: validated.compact_json,
                    if_match,
                }
            }
            (Method::Patch, Some(id)) => Operation::Patch {
                resource_type,
                id,
                patch: parse_patch(headers.patch_format, body("a patch")?)?,
                if_match,
            },
            (Method::Delete, id) => Operation::Delete {
                target: match id {
                    Some(id) => Target::Id(id),
                    None => Target::Matching(Box::new(condition(&url.query)?)),
                },
                resource_type,
                if_match,
            },
            (Method::Get, Some(id)) => Operation::Read {
                resource_type,
                id,
                version: url
                    .version
                    .as_deref()
                    .map(|v| {
                        VersionId::parse(v)
                            .ok_or_else(|| AppError::bad_request("not a version id of this server"))
                    })
                    .transpose()?,
                if_none_match: headers.if_none_match.map(parse_etag).transpose()?,
            },
            (Method::Get, None) => Operation::Search(search(&url.query)?),
            _ => {
                return Err(AppError::bad_request(
                    "this combination of method and URL is not supported",
                ));
            }
        })
    }

    /// Runs one operation in its own transaction (conditional interactions, batch entries).
    pub async fn execute(
        &self,
        ctx: &RequestContext,
        operation: Operation,
    ) -> Result<Outcome, AppError> {
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            let authorized = this.authorize_operation(&ctx, &operation)?;
            let result = this.transact(describe(&operation), |tx| {
                let resolved = this.resolve(tx, &operation, &authorized, None)?;
                let rewritten =
                    this.rewrite(tx, &ctx, &operation, &authorized, &Resolution::default())?;
                let (outcome, receipt) =
                    this.run_in(tx, &ctx, &rewritten, &authorized, resolved, None)?;
                Ok((outcome, receipt))
            });
            match result {
                Ok((outcome, receipt)) => {
                    ctx.receipt.set(receipt);
                    Ok(outcome)
                }
                Err(error) => {
                    this.record_failed(&ctx, &operation, &error)?;
                    Err(error)
                }
            }
        })
        .await
    }

    /// Processes a transaction (all or nothing) or a batch (each entry on its own).
    /// A transaction's error names the entry that failed.
    pub async fn process_bundle(
        &self,
        ctx: &RequestContext,
        bundle: BundleRequest,
        handling: Handling,
    ) -> Result<Vec<Result<Outcome, AppError>>, EntryError> {
        if bundle.entries.len() > MAX_BUNDLE_ENTRIES {
            return Err(EntryError {
                index: MAX_BUNDLE_ENTRIES,
                error: AppError::bad_request(format!(
                    "a Bundle may hold at most {MAX_BUNDLE_ENTRIES} entries"
                )),
            });
        }
        let this = self.clone();
        let ctx = ctx.clone();
        let outcome = blocking(move || {
            Ok(match bundle.kind {
                BundleKind::Batch => Ok(this.batch(&ctx, &bundle.entries, handling)),
                BundleKind::Transaction => this.transaction(&ctx, &bundle.entries, handling),
            })
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(error) => Err(EntryError { index: 0, error }),
        }
    }

    /// Asks the gate for what `operation` needs, before anything is evaluated: its own
    /// permission; search on the type when a condition selects its target (the condition
    /// is then confined as a search would be); search on each type a conditional reference
    /// in its resource looks up (confined likewise, so a reference resolves with the
    /// requester's rights). Refusals are ledgered. Reads and writes are checked against the
    /// compartment where they run.
    fn authorize_operation(
        &self,
        ctx: &RequestContext,
        operation: &Operation,
    ) -> Result<Authorized, AppError> {
        let (permission, resource_type, action, condition, resource) = match operation {
            Operation::Create {
                resource_type,
                if_none_exist,
                compact_json,
            } => (
                Permission::Create,
                resource_type,
                Action::Create,
                if_none_exist.as_ref(),
                Some(compact_json),
            ),
            Operation::Update {
                resource_type,
                target,
                compact_json,
                ..
            } => (
                Permission::Update,
                resource_type,
                Action::Update,
                matching(target),
                Some(compact_json),
            ),
            Operation::Patch { resource_type, .. } => (
                Permission::Update,
                resource_type,
                Action::Update,
                None,
                None,
            ),
            Operation::Delete {
                resource_type,
                target,
                ..
            } => (
                Permission::Delete,
                resource_type,
                Action::Delete,
                matching(target),
                None,
            ),
            Operation::Read {
                resource_type,
                version,
                ..
            } => {
                let action = if version.is_some() {
                    Action::Vread
                } else {
                    Action::Read
                };
                (Permission::Read, resource_type, action, None, None)
            }
            Operation::Search(request) => {
                return Ok(Authorized {
                    search: Some(self.authorize_search(ctx, request.clone(), Action::Search)?),
                    references: HashMap::new(),
                });
            }
        };
        let mut authorized = Authorized::default();
        if let Some(condition) = condition {
            authorized.search = Some(self.authorize_search(ctx, condition.clone(), action)?);
        }
        if let Some(json) = resource {
            for reference in conditional_references(json)? {
                let request = self.parse_conditional_reference(&reference)?;
                let search = self.authorize_search(ctx, request, action)?;
                authorized.references.insert(reference, search);
            }
        }
        self.authorize(ctx, permission, resource_type.as_str(), action, Vec::new())?;
        Ok(authorized)
    }

    fn plan_entry(&self, entry: &RequestEntry, handling: Handling) -> Result<Operation, AppError> {
        let patch_body;
        let mut patch_format = PatchFormat::JsonPatch;
        let resource = match (entry.method, entry.resource.as_deref()) {
            // In a Bundle a JSON Patch travels as a Binary, a FHIRPath Patch as the
            // Parameters resource itself (http.html#patch).
            (Method::Patch, Some(resource)) => {
                (patch_format, patch_body) = patch_entry(resource)?;
                Some(patch_body.as_slice())
            }
            (_, resource) => resource.map(str::as_bytes),
        };
        self.plan(
            entry.method,
            &entry.url,
            resource,
            ConditionalHeaders {
                if_match: entry.if_match.as_deref(),
                if_none_exist: entry.if_none_exist.as_deref(),
                if_none_match: entry.if_none_match.as_deref(),
                patch_format,
            },
            handling,
        )
    }

    fn batch(
        &self,
        ctx: &RequestContext,
        entries: &[RequestEntry],
        handling: Handling,
    ) -> Vec<Result<Outcome, AppError>> {
        entries
            .iter()
            .map(|entry| {
                let operation = self.plan_entry(entry, handling)?;
                let authorized = self.authorize_operation(ctx, &operation)?;
                let result = self.transact(describe(&operation), |tx| {
                    let resolved = self.resolve(tx, &operation, &authorized, None)?;
                    let rewritten =
                        self.rewrite(tx, ctx, &operation, &authorized, &Resolution::default())?;
                    self.run_in(tx, ctx, &rewritten, &authorized, resolved, None)
                });
                match result {
                    Ok((outcome, receipt)) => {
                        ctx.receipt.set(receipt);
                        Ok(outcome)
                    }
                    Err(error) => {
                        self.record_failed(ctx, &operation, &error)?;
                        Err(error)
                    }
                }
            })
            .collect()
    }

    fn transaction(
        &self,
        ctx: &RequestContext,
        entries: &[RequestEntry],
        handling: Handling,
    ) -> Result<Vec<Result<Outcome, AppError>>, EntryError> {
        let operations = entries
            .iter()
            .enumerate()
            .map(|(index, entry)| {
                self.plan_entry(entry, handling)
                    .map_err(|error| EntryError { index, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Every entry is authorized before anything runs: one refusal refuses it all.
        let authorized = operations
            .iter()
            .enumerate()
            .map(|(index, operation)| {
                self.authorize_operation(ctx, operation)
                    .map_err(|error| EntryError { index, error })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut order: Vec<usize> = (0..entries.len()).collect();
        order.sort_by_key(|&i| entries[i].method.transaction_rank());
        let fresh_ids: Vec<Option<ResourceId>> = operations
            .iter()
            .map(|operation| {
                matches!(
                    operation,
                    Operation::Create {
                        if_none_exist: None,
                        ..
                    }
                )
                .then(ResourceId::generate)
            })
            .collect();
        let prepared = self.prepare_creates(ctx, entries, &operations, &fresh_ids);

        let mut failed_at = 0;
        let result = self.transact("the resources of this transaction", |tx| {
            // Resolve every target first, so references to entries' full URLs can be
            // rewritten before anything is written.
            let mut resolution = Resolution::default();
            let mut resolved = vec![Resolved::Nothing; entries.len()];
            for &index in &order {
                failed_at = index;
                resolved[index] = self.resolve(
                    tx,
                    &operations[index],
                    &authorized[index],
                    fresh_ids[index].as_ref(),
                )?;
                if let (Some(full_url), Some(reference)) =
                    (&entries[index].full_url, resolved[index].reference())
                {
                    resolution.full_urls.insert(full_url.clone(), reference);
                }
            }
            let mut outcomes: Vec<Option<Outcome>> = vec![None; entries.len()];
            let mut last_receipt = None;
            for &index in &order {
                failed_at = index;
                let (outcome, receipt) = match &prepared[index] {
                    // Its references were rewritten when it was prepared.
                    Some(kind) => self.run_in(
                        tx,
                        ctx,
                        &operations[index],
                        &authorized[index],
                        resolved[index].clone(),
                        Some(kind),
                    )?,
                    None => {
                        let operation = self.rewrite(
                            tx,
                            ctx,
                            &operations[index],
                            &authorized[index],
                            &resolution,
                        )?;
                        self.run_in(
                            tx,
                            ctx,
                            &operation,
                            &authorized[index],
                            resolved[index].clone(),
                            None,
                        )?
                    }
                };
                last_receipt = Some(receipt);
                outcomes[index] = Some(outcome);
            }
            Ok((outcomes, last_receipt))
        });
        match result {
            Ok((outcomes, receipt)) => {
                if let Some(receipt) = receipt {
                    ctx.receipt.set(receipt);
                }
                Ok(outcomes
                    .into_iter()
                    .map(|o| o.ok_or_else(|| AppError::Internal("an entry was not run".into())))
                    .collect())
            }
            Err(error) => {
                // Nothing was written; the refused attempt is still evidence.
                if let Err(ledger_error) = self.record_failed(ctx, &operations[failed_at], &error) {
                    return Err(EntryError {
                        index: failed_at,
                        error: ledger_error,
                    });
                }
                Err(EntryError {
                    index: failed_at,
                    error,
                })
            }
        }
    }

    /// Prepares, before the transaction takes the write lock, the creates of a transaction
    /// whose ids are fresh (`fresh_ids`) and whose references all resolve without the
    /// database: to other entries whose targets are known up front (fresh ids, `Type/id`
    /// URLs) or to nothing in the Bundle. The rest are prepared inside the transaction.
    fn prepare_creates(
        &self,
        ctx: &RequestContext,
        entries: &[RequestEntry],
        operations: &[Operation],
        fresh_ids: &[Option<ResourceId>],
    ) -> Vec<Option<WriteKind>> {
        let mut known: HashMap<&str, String> = HashMap::new();
        let mut unknown: HashSet<&str> = HashSet::new();
        for ((entry, operation), fresh_id) in entries.iter().zip(operations).zip(fresh_ids) {
            let Some(full_url) = entry.full_url.as_deref() else {
                continue;
            };
            match known_target(operation, fresh_id.as_ref()) {
                Some(Some(reference)) => {
                    known.insert(full_url, reference);
                }
                Some(None) => {}
                None => {
                    unknown.insert(full_url);
                }
            }
        }
        operations
            .iter()
            .zip(fresh_ids)
            .map(|(operation, fresh_id)| {
                let (
                    Operation::Create {
                        resource_type,
                        compact_json,
                        ..
                    },
                    Some(id),
                ) = (operation, fresh_id)
                else {
                    return None;
                };
                let mut needs_database = false;
                let rewritten = rewrite_references(compact_json, |reference| {
                    if let Some(local) = known.get(reference) {
                        return Some(local.clone());
                    }
                    needs_database |= unknown.contains(reference)
                        || reference.starts_with("urn:")
                        || reference.contains('?');
                    None
                })
                .ok()?;
                if needs_database {
                    return None;
                }
                // A failure here is met again, and reported, inside the transaction.
                let prepared = self
                    .prepare_create(ctx, resource_type, id, &rewritten)
                    .ok()?;
                Some(WriteKind::Prepared(Box::new(prepared)))
            })
            .collect()
    }

    /// Decides which resource an operation applies to (conditional matches, new ids).
    /// A create without a condition takes `fresh_id` when given one.
    fn resolve(
        &self,
        tx: &mut DbConnection,
        operation: &Operation,
        authorized: &Authorized,
        fresh_id: Option<&ResourceId>,
    ) -> Result<Resolved, TxError> {
        Ok(match operation {
            Operation::Create {
                resource_type,
                if_none_exist,
                ..
            } => match if_none_exist {
                None => Resolved::New(
                    resource_type.clone(),
                    fresh_id.cloned().unwrap_or_else(ResourceId::generate),
                ),
                Some(_) => match self.single_match(tx, authorized.search()?, "If-None-Exist")? {
                    Some(existing) => Resolved::Existing(existing),
                    None => Resolved::New(resource_type.clone(), ResourceId::generate()),
                },
            },
            Operation::Update {
                resource_type,
                target,
                body_id,
                ..
            } => match target {
                Target::Id(id) => Resolved::Id(resource_type.clone(), id.clone()),
                Target::Matching(_) => {
                    match self.single_match(tx, authorized.search()?, "conditional update")? {
                        Some(existing) => {
                            if body_id
                                .as_deref()
                                .is_some_and(|b| b != existing.id.as_str())
                            {
                                return Err(AppError::BadRequest {
                                    message: format!(
                                        "the id in the body does not match the resource the condition found ({}/{})",
                                        existing.resource_type, existing.id
                                    ),
                                    expression: Some(format!("{resource_type}.id")),
                                }
                                .into());
                            }
                            Resolved::Id(resource_type.clone(), existing.id)
                        }
                        None => match body_id {
                            Some(id) => Resolved::Id(
                                resource_type.clone(),
                                ResourceId::parse(id).map_err(AppError::from)?,
                            ),
                            None => Resolved::New(resource_type.clone(), ResourceId::generate()),
                        },
                    }
                }
            },
            Operation::Delete {
                resource_type,
                target,
                ..
            } => match target {
                Target::Id(id) => Resolved::Id(resource_type.clone(), id.clone()),
                Target::Matching(_) => {
                    match self.single_match(tx, authorized.search()?, "conditional delete")? {
                        Some(existing) => Resolved::Id(resource_type.clone(), existing.id),
                        None => Resolved::Nothing,
                    }
                }
            },
            Operation::Patch {
                resource_type, id, ..
            }
            | Operation::Read {
                resource_type, id, ..
            } => Resolved::Id(resource_type.clone(), id.clone()),
            Operation::Search(_) => Resolved::Nothing,
        })
    }

    /// The one current resource matching a condition, none, or 412 for several
    /// (http.html#cond-update). Concurrent conditional writes with the same condition are
    /// serialized so two of them cannot both find nothing and both create.
    fn single_match(
        &self,
        tx: &mut DbConnection,
        condition: &AuthorizedSearch,
        what: &str,
    ) -> Result<Option<StoredResource>, TxError> {
        lock_condition(tx, condition_lock_key(condition.request()))?;
        let mut matches = self.matching_in(tx, condition, 2)?;
        if matches.len() > 1 {
            return Err(AppError::PreconditionFailed(format!(
                "the {what} criteria match more than one resource"
            ))
            .into());
        }
        Ok(matches.pop())
    }

    /// The operation with references rewritten: full URLs of the Bundle's entries to the
    /// resources they became, conditional references (`Type?query`) to the one resource
    /// they match.
    fn rewrite(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        operation: &Operation,
        authorized: &Authorized,
        resolution: &Resolution,
    ) -> Result<Operation, TxError> {
        let compact_json = match operation {
            Operation::Create { compact_json, .. } | Operation::Update { compact_json, .. } => {
                compact_json
            }
            _ => return Ok(operation.clone()),
        };
        let mut failure: Option<AppError> = None;
        let mut conditional: HashMap<String, Option<String>> = HashMap::new();
        let rewritten = rewrite_references(compact_json, |reference| {
            if failure.is_some() {
                return None;
            }
            if let Some(local) = resolution.full_urls.get(reference) {
                return Some(local.clone());
            }
            if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
                failure = Some(AppError::BadRequest {
                    message: format!(
                        "reference '{}' names no entry of this Bundle",
                        reference.chars().take(80).collect::<String>()
                    ),
                    expression: None,
                });
                return None;
            }
            if !reference.contains('?') {
                return None;
            }
            if let Some(cached) = conditional.get(reference) {
                return cached.clone();
            }
            let resolved = match authorized.references.get(reference) {
                Some(search) => self.resolve_conditional_reference(tx, ctx, reference, search),
                None => Err(AppError::Internal(
                    "a conditional reference was not authorized".into(),
                )),
            };
            match resolved {
                Ok(local) => {
                    conditional.insert(reference.to_owned(), Some(local.clone()));
                    Some(local)
                }
                Err(error) => {
                    failure = Some(error);
                    None
                }
            }
        })
        .map_err(|e| AppError::Internal(format!("reference rewriting: {e}")))?;
        if let Some(error) = failure {
            return Err(error.into());
        }
        Ok(match operation.clone() {
            Operation::Create {
                resource_type,
                if_none_exist,
                ..
            } => Operation::Create {
                resource_type,
                compact_json: rewritten,
                if_none_exist,
            },
            Operation::Update {
                resource_type,
                target,
                body_id,
                if_match,
                ..
            } => Operation::Update {
                resource_type,
                target,
                compact_json: rewritten,
                body_id,
                if_match,
            },
            other => other,
        })
    }

    /// Parses the search a conditional reference (`Type?query`) makes.
    pub(super) fn parse_conditional_reference(
        &self,
        reference: &str,
    ) -> Result<SearchRequest, AppError> {
        let shown: String = reference.chars().take(120).collect();
        let (type_name, query) = reference.split_once('?').ok_or_else(|| {
            AppError::bad_request(format!("'{shown}' is not a conditional reference"))
        })?;
        let resource_type = self.resolve_type(type_name)?;
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|_| {
            AppError::bad_request(format!("conditional reference '{shown}' is malformed"))
        })?;
        if pairs.is_empty() {
            return Err(AppError::bad_request(format!(
                "conditional reference '{shown}' has no search parameters"
            )));
        }
        let index = self.search_index();
        Ok(parse_search(
            index.registry(),
            index,
            vec![resource_type.to_string()],
            &pairs,
            Handling::Strict,
        )?)
    }

    /// `Type?query` in a reference: exactly one match, or the request fails
    /// (transaction.html#cond-references). The match is a disclosure (its id is written
    /// into the resource), ledgered in the transaction like a search's.
    pub(super) fn resolve_conditional_reference(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        reference: &str,
        search: &AuthorizedSearch,
    ) -> Result<String, AppError> {
        let shown: String = reference.chars().take(120).collect();
        self.resolve_conditional_reference_named(tx, ctx, &shown, search)
    }

    /// [`Self::resolve_conditional_reference`], naming the reference `shown` in its errors.
    pub(super) fn resolve_conditional_reference_named(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        shown: &str,
        search: &AuthorizedSearch,
    ) -> Result<String, AppError> {
        let matches = self.matching_in(tx, search, 2)?;
        match matches.as_slice() {
            [only] => {
                let members = self.search_index().stored_compartments(
                    only.resource_type.as_str(),
                    only.id.as_str(),
                    &only.json,
                );
                let disclosed = target(&only.resource_type, &only.id, Some(only.meta.version_id));
                let event = LedgerEvent::permit(Action::Search).touching(disclosed, members);
                self.ledger().append_in(tx, ctx, event)?;
                Ok(format!("{}/{}", only.resource_type, only.id))
            }
            [] => Err(AppError::PreconditionFailed(format!(
                "conditional reference '{shown}' matches no resource"
            ))),
            _ => Err(AppError::PreconditionFailed(format!(
                "conditional reference '{shown}' matches more than one resource"
            ))),
        }
    }

    /// Runs a resolved operation inside the transaction; returns its outcome and the
    /// receipt of its ledger entry.
    fn run_in(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        operation: &Operation,
        authorized: &Authorized,
        resolved: Resolved,
        prepared: Option<&WriteKind>,
    ) -> Result<(Outcome, String), TxError> {
        match (operation, resolved) {
            (_, Resolved::Existing(existing)) => {
                let members = self.search_index().stored_compartments(
                    existing.resource_type.as_str(),
                    existing.id.as_str(),
                    &existing.json,
                );
                let disclosed = target(
                    &existing.resource_type,
                    &existing.id,
                    Some(existing.meta.version_id),
                );
                let event = LedgerEvent::permit(Action::Search).touching(disclosed, members);
                let receipt = self.ledger().append_in(tx, ctx, event)?;
                Ok((Outcome::Existing(existing), receipt))
            }
            (Operation::Create { compact_json, .. }, Resolved::New(resource_type, id)) => {
                let content;
                let kind = match prepared {
                    Some(prepared) => prepared,
                    None => {
                        content = WriteKind::Content {
                            compact_json: compact_json.clone(),
                            method: "POST",
                        };
                        &content
                    }
                };
                let (written, receipt) =
                    self.write_once(tx, ctx, &resource_type, &id, None, kind)?;
                let outcome = written.into_content()?;
                Ok((
                    Outcome::Written {
                        resource: outcome.resource,
                        created: outcome.created,
                    },
                    receipt,
                ))
            }
            (
                Operation::Update {
                    compact_json,
                    if_match,
                    ..
                },
                Resolved::Id(resource_type, id) | Resolved::New(resource_type, id),
            ) => {
                // Without an id in the body (conditional update), stamping puts it in.
                let kind = WriteKind::Content {
                    compact_json: compact_json.clone(),
                    method: "PUT",
                };
                let (written, receipt) =
                    self.write_once(tx, ctx, &resource_type, &id, *if_match, &kind)?;
                let outcome = written.into_content()?;
                Ok((
                    Outcome::Written {
                        resource: outcome.resource,
                        created: outcome.created,
                    },
                    receipt,
                ))
            }
            (
                Operation::Patch {
                    patch, if_match, ..
                },
                Resolved::Id(resource_type, id),
            ) => {
                let kind = WriteKind::Patch {
                    patch: patch.clone(),
                };
                let (written, receipt) =
                    self.write_once(tx, ctx, &resource_type, &id, *if_match, &kind)?;
                let outcome = written.into_content()?;
                Ok((
                    Outcome::Written {
                        resource: outcome.resource,
                        created: false,
                    },
                    receipt,
                ))
            }
            (Operation::Delete { if_match, .. }, Resolved::Id(resource_type, id)) => {
                let (written, receipt) =
                    self.write_once(tx, ctx, &resource_type, &id, *if_match, &WriteKind::Delete)?;
                let meta = match written {
                    Written::Deleted(DeleteOutcome::Deleted(meta))
                    | Written::Deleted(DeleteOutcome::AlreadyDeleted(meta)) => meta,
                    Written::Content(_) => {
                        return Err(AppError::Internal("a deletion wrote content".into()).into());
                    }
                };
                Ok((Outcome::Deleted(Some((resource_type, id, meta))), receipt))
            }
            (Operation::Delete { .. }, Resolved::Nothing) => {
                // A conditional delete that matched nothing: the attempt is still ledgered,
                // naming no resource since none was touched.
                let event = LedgerEvent::permit(Action::Delete);
                let receipt = self.ledger().append_in(tx, ctx, event)?;
                Ok((Outcome::Deleted(None), receipt))
            }
            (
                Operation::Read {
                    version,
                    if_none_match,
                    ..
                },
                Resolved::Id(resource_type, id),
            ) => {
                // The gate before anything about the resource is told, even that it exists
                // or that the client's version is current.
                let found = existing_head(tx, &resource_type, &id).and_then(|head| {
                    let version_id = version.unwrap_or(head.current_version);
                    let row = rows::version(tx, resource_type.as_str(), id.as_str(), version_id)?
                        .ok_or_else(|| {
                        AppError::NotFound(format!("{resource_type}/{id}/_history/{version_id}"))
                    })?;
                    Ok((
                        head,
                        version_id,
                        self.open_version(&resource_type, &id, &row)?,
                    ))
                });
                let (head, version_id, resource) = found.map_err(|error| {
                    self.mask_absence(tx, ctx, Permission::Read, &resource_type, &id, error)
                })?;
                let members = self.search_index().stored_compartments(
                    resource_type.as_str(),
                    id.as_str(),
                    &resource.json,
                );
                self.visible(
                    Some(&mut *tx),
                    ctx,
                    resource_type.as_str(),
                    members.as_ref(),
                )?;
                let disclosed = target(&resource_type, &id, Some(version_id));
                if version.is_none() && *if_none_match == Some(head.current_version) {
                    let meta = VersionMeta {
                        version_id: head.current_version,
                        last_updated: head.last_updated,
                    };
                    let event = LedgerEvent::permit(Action::Read).touching(disclosed, members);
                    let receipt = self.ledger().append_in(tx, ctx, event)?;
                    return Ok((Outcome::NotModified(meta), receipt));
                }
                let action = if version.is_some() {
                    Action::Vread
                } else {
                    Action::Read
                };
                let event = LedgerEvent::permit(action).touching(disclosed, members);
                let receipt = self.ledger().append_in(tx, ctx, event)?;
                Ok((Outcome::Read(resource), receipt))
            }
            (Operation::Search(request), _) => {
                let (page, receipt) = self.search_in(tx, ctx, authorized.search()?)?;
                Ok((
                    Outcome::Searched {
                        page: Box::new(page),
                        request: Box::new(request.clone()),
                    },
                    receipt,
                ))
            }
            _ => Err(AppError::Internal("an operation was resolved inconsistently".into()).into()),
        }
    }

    /// Ledgers a refused operation that reached resources (not found, gone, precondition).
    fn record_failed(
        &self,
        ctx: &RequestContext,
        operation: &Operation,
        error: &AppError,
    ) -> Result<(), AppError> {
        let (action, resource_type, id) = match operation {
            Operation::Create { resource_type, .. } => (Action::Create, resource_type, None),
            Operation::Update {
                resource_type,
                target,
                ..
            } => (Action::Update, resource_type, target_id(target)),
            Operation::Patch {
                resource_type, id, ..
            } => (Action::Update, resource_type, Some(id)),
            Operation::Delete {
                resource_type,
                target,
                ..
            } => (Action::Delete, resource_type, target_id(target)),
            Operation::Read {
                resource_type, id, ..
            } => (Action::Read, resource_type, Some(id)),
            Operation::Search(_) => return Ok(()),
        };
        match id {
            Some(id) => self.record_refusal(ctx, action, resource_type, id, None, error),
            None => {
                // No single resource was reached (a condition matched several, or none).
                let Some(event) = refusal_event(action, error, Vec::new()) else {
                    return Ok(());
                };
                self.ledger().append(ctx, event).map(|_| ())
            }
        }
    }
}

/// The condition of a conditional target.
fn matching(target: &Target) -> Option<&SearchRequest> {
    match target {
        Target::Matching(condition) => Some(condition),
        Target::Id(_) => None,
    }
}

/// The local reference an operation's entry will resolve to, when that is known before the
/// transaction: `Some(None)` when it resolves to nothing, `None` when only the database can
/// tell (conditional targets). Must agree with [`ResourceService::resolve`].
fn known_target(operation: &Operation, fresh_id: Option<&ResourceId>) -> Option<Option<String>> {
    match operation {
        Operation::Create { resource_type, .. } => {
            fresh_id.map(|id| Some(format!("{resource_type}/{id}")))
        }
        Operation::Update {
            resource_type,
            target: Target::Id(id),
            ..
        }
        | Operation::Delete {
            resource_type,
            target: Target::Id(id),
            ..
        }
        | Operation::Patch {
            resource_type, id, ..
        }
        | Operation::Read {
            resource_type, id, ..
        } => Some(Some(format!("{resource_type}/{id}"))),
        Operation::Search(_) => Some(None),
        Operation::Update { .. } | Operation::Delete { .. } => None,
    }
}

fn target_id(target: &Target) -> Option<&ResourceId> {
    match target {
        Target::Id(id) => Some(id),
        Target::Matching(_) => None,
    }
}

/// The conditional headers of a request (or a Bundle entry's request).
#[derive(Debug, Clone, Copy, Default)]
pub struct ConditionalHeaders<'a> {
    pub if_match: Option<&'a str>,
    pub if_none_exist: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    /// The format of a PATCH body.
    pub patch_format: PatchFormat,
}

/// Which resource an operation turned out to apply to.
#[derive(Debug, Clone)]
enum Resolved {
    /// A new resource under this id.
    New(ResourceType, ResourceId),
    /// An existing (or client-named) resource.
    Id(ResourceType, ResourceId),
    /// Conditional create matched: nothing to write.
    Existing(StoredResource),
    Nothing,
}

impl Resolved {
    /// `Type/id` for references to the entry.
    fn reference(&self) -> Option<String> {
        match self {
            Self::New(t, id) | Self::Id(t, id) => Some(format!("{t}/{id}")),
            Self::Existing(r) => Some(format!("{}/{}", r.resource_type, r.id)),
            Self::Nothing => None,
        }
    }
}

/// Full URLs of a Bundle's entries and the local references they resolve to.
#[derive(Debug, Default)]
struct Resolution {
    full_urls: HashMap<String, String>,
}

fn describe(operation: &Operation) -> &'static str {
    match operation {
        Operation::Create { .. } => "the created resource",
        Operation::Update { .. } | Operation::Patch { .. } => "the updated resource",
        Operation::Delete { .. } => "the deleted resource",
        Operation::Read { .. } | Operation::Search(_) => "the resource",
    }
}

/// A lock key for a condition: conditional writes with the same criteria on the same type
/// run one at a time.
fn condition_lock_key(condition: &SearchRequest) -> i64 {
    let mut hasher = Sha256::new();
    hasher.update(condition.resource_types.join(",").as_bytes());
    let mut params = condition.link_params.clone();
    params.sort();
    for (name, value) in params {
        hasher.update([0]);
        hasher.update(name.as_bytes());
        hasher.update([0]);
        hasher.update(value.as_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(bytes)
}

/// `W/"3"` or `"3"` → 3.
fn parse_etag(text: &str) -> Result<VersionId, AppError> {
    let trimmed = text.trim();
    let trimmed = trimmed.strip_prefix("W/").unwrap_or(trimmed);
    VersionId::parse(trimmed.trim_matches('"'))
        .ok_or_else(|| AppError::bad_request("an ETag must look like W/\"3\""))
}

/// The patch a PATCH entry carries (http.html#patch): a JSON Patch as a Binary, or a
/// FHIRPath Patch as the Parameters resource itself.
fn patch_entry(resource: &str) -> Result<(PatchFormat, Vec<u8>), AppError> {
    use base64::Engine as _;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Binary {
        resource_type: String,
        content_type: Option<String>,
        data: Option<String>,
    }
    let binary: Binary = serde_json::from_str(resource).map_err(|_| {
        AppError::bad_request("a PATCH entry's resource must be a Binary or a Parameters")
    })?;
    if binary.resource_type == "Parameters" {
        return Ok((PatchFormat::FhirPath, resource.as_bytes().to_vec()));
    }
    if binary.resource_type != "Binary"
        || binary.content_type.as_deref() != Some("application/json-patch+json")
    {
        return Err(AppError::UnsupportedMediaType(
            "a PATCH entry carries a Binary with contentType application/json-patch+json, or a \
             FHIRPath Patch Parameters resource"
                .into(),
        ));
    }
    let patch = base64::engine::general_purpose::STANDARD
        .decode(binary.data.unwrap_or_default())
        .map_err(|_| AppError::bad_request("the Binary's data is not base64"))?;
    Ok((PatchFormat::JsonPatch, patch))
}

/// Most distinct conditional references one resource may carry (each is a search).
const MAX_CONDITIONAL_REFERENCES: usize = 100;

/// The conditional references (`Type?query`) in a resource's JSON, each once.
fn conditional_references(json: &str) -> Result<Vec<String>, AppError> {
    let mut found = indexmap::IndexSet::new();
    let _ = rewrite_references(json, |reference| {
        if reference.contains('?') && !reference.starts_with("urn:") {
            found.insert(reference.to_owned());
        }
        None
    });
    if found.len() > MAX_CONDITIONAL_REFERENCES {
        return Err(AppError::bad_request(format!(
            "a resource may carry at most {MAX_CONDITIONAL_REFERENCES} distinct conditional references"
        )));
    }
    Ok(found.into_iter().collect())
}
