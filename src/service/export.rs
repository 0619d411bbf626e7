//! Bulk export (`$export`, FHIR Bulk Data Access IG 2.0.0), the use case: a kick-off
//! authorized like the searches it will run, a job kept in the database (sealed, so that
//! it survives a restart), a runner that pages through each type's search and writes each
//! page as a sealed NDJSON file with one ledger entry per patient whose record it holds, and
//! the status, files and cancellation, answered only to the token that started the job.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::access::policy;
use crate::access::{Permission, Principal, RequestContext, TokenIdentity};
use crate::clock::now_micros;
use crate::crypto::ResourceBinding;
use crate::error::AppError;
use crate::fhir::search_query::{Handling, TotalMode, parse_search};
use crate::fhir::{ResourceId, ResourceType};
use crate::ledger::Action;
use crate::service::ledger::LedgerEvent;
use crate::store::exports::{self, FileInfo, JobRow};

use super::base::ResourceService;
use super::blocking;
use super::gate::AuthorizedSearch;

/// Resources per output file (one search page each).
pub const RESOURCES_PER_FILE: usize = 1_000;
/// Most export jobs queued or running at once; a kick-off beyond it is told to retry.
pub const MAX_ACTIVE_JOBS: i64 = 16;
/// Most export jobs one owner may have queued, running or kept (finished, files not yet
/// expired) at once.
pub const MAX_JOBS_PER_OWNER: i64 = 4;
/// How long after its token expired a job may still be run: a job queued for longer (a
/// server down for a day) fails instead of running on an old grant.
const GRACE_AFTER_TOKEN_EXPIRY: Duration = Duration::from_secs(24 * 3600);
/// Most `_typeFilter` searches one kick-off may ask for.
pub const MAX_TYPE_FILTERS: usize = 64;
/// Most patients a Group or the `patient` parameter may name.
pub const MAX_EXPORT_PATIENTS: usize = 10_000;
/// How long a runner holds a job between renewals; a job whose runner stopped is taken up
/// again this long after its last renewal.
const LEASE: Duration = Duration::from_secs(60);
/// The pause between two pages of a job, so that a long export leaves the database and the
/// blocking threads to interactive requests between its transactions.
const PAGE_PAUSE: Duration = Duration::from_millis(2);

/// Which resources an export covers (export.html#endpoint---all-patients and following).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExportLevel {
    /// `[base]/$export`: every resource the token may search.
    System,
    /// `[base]/Patient/$export`: resources in patient compartments.
    Patient,
    /// `[base]/Group/{id}/$export`: resources in the compartments of the Group's members.
    Group(String),
}

/// A kick-off request, its parameters checked for form by the caller.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportRequest {
    pub level: ExportLevel,
    /// The kick-off URL, echoed in the manifest.
    pub request_url: String,
    /// `_since`, as the client wrote it (an instant).
    pub since: Option<String>,
    /// `_type`: only these types.
    pub types: Option<Vec<String>>,
    /// `_typeFilter`: `Type?query` searches; a type with filters exports what any of them
    /// matches.
    pub type_filters: Vec<String>,
    /// `patient` (POST at the Patient or Group level): only these patients' ids.
    pub patients: Vec<String>,
}

/// A job as sealed in the database: the request, the patients it is narrowed to, and the
/// identity it runs as.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SealedJob {
    request: ExportRequest,
    /// The patients the export is narrowed to (a Group's members, `patient`); `None`: not
    /// narrowed.
    patients: Option<Vec<String>>,
    /// The token that started it; `None` for the server itself.
    identity: Option<TokenIdentity>,
}

/// Where a job is, as its status URL answers.
#[derive(Debug, Clone)]
pub enum ExportStatus {
    InProgress {
        resources_done: i64,
    },
    Complete {
        transaction_time: i64,
        request_url: String,
        files: Vec<FileInfo>,
    },
    Failed {
        error: String,
    },
}

impl ResourceService {
    /// Authorizes an export as the searches it will run (a refusal is ledgered and
    /// answered 403), queues its job and ledgers the kick-off; returns the job's id.
    pub async fn start_export(
        &self,
        ctx: &RequestContext,
        request: ExportRequest,
    ) -> Result<String, AppError> {
        let patients = match &request.level {
            ExportLevel::Group(id) => {
                let group_type = self.resolve_type("Group")?;
                let group = self.read(ctx, group_type, ResourceId::parse(id)?).await?;
                let mut members = group_members(&group.json)?;
                if !request.patients.is_empty() {
                    let wanted: HashSet<&String> = request.patients.iter().collect();
                    members.retain(|member| wanted.contains(member));
                }
                Some(members)
            }
            ExportLevel::Patient if !request.patients.is_empty() => Some(request.patients.clone()),
            ExportLevel::Patient | ExportLevel::System => None,
        };
        if patients
            .as_ref()
            .is_some_and(|p| p.len() > MAX_EXPORT_PATIENTS)
        {
            return Err(AppError::TooLarge(format!(
                "an export may name at most {MAX_EXPORT_PATIENTS} patients"
            )));
        }
        let identity = match &ctx.principal {
            Principal::Token(identity) => Some(identity.as_ref().clone()),
            Principal::Internal => None,
            Principal::Anonymous => {
                return Err(AppError::Internal(
                    "an anonymous export got past the gate".into(),
                ));
            }
        };
        let job = SealedJob {
            request,
            patients,
            identity,
        };
        let this = self.clone();
        let ctx = ctx.clone();
        blocking(move || {
            // The gate decides now, and the refusals it ledgers name the export.
            this.export_searches(&ctx, &job)?;
            let id = uuid::Uuid::new_v4().to_string();
            let plain = serde_json::to_vec(&job)
                .map_err(|e| AppError::Internal(format!("export job: {e}")))?;
            let sealed = this.envelope().seal(job_binding(&id), &plain);
            let owner = owner_of(&ctx.principal);
            this.transact("an export job", |tx| {
                if exports::active_jobs(tx)? >= MAX_ACTIVE_JOBS {
                    return Err(AppError::Unavailable(
                        "too many export jobs are running; retry later".into(),
                    )
                    .into());
                }
                if exports::jobs_of(tx, &owner)? >= MAX_JOBS_PER_OWNER {
                    return Err(AppError::Conflict(format!(
                        "this client has {MAX_JOBS_PER_OWNER} exports already: DELETE the status URL of a \
                         finished one, or wait for one to finish"
                    ))
                    .into());
                }
                exports::insert_job(tx, &id, &owner, &sealed, now_micros())?;
                let receipt =
                    this.ledger()
                        .append_in(tx, &ctx, LedgerEvent::permit(Action::Export))?;
                ctx.receipt.set(receipt);
                Ok(())
            })?;
            Ok(id)
        })
        .await
    }

    /// The status of a job, to the token that started it only.
    pub async fn export_status(
        &self,
        ctx: &RequestContext,
        job_id: &str,
    ) -> Result<ExportStatus, AppError> {
        let this = self.clone();
        let (ctx, job_id) = (ctx.clone(), job_id.to_owned());
        blocking(move || {
            let mut conn = this.connection()?;
            let job = this.owned_job(&mut conn, &ctx, &job_id)?;
            Ok(match job.status.as_str() {
                exports::COMPLETE => {
                    let sealed = this.open_job(&job)?;
                    ExportStatus::Complete {
                        transaction_time: job.transaction_time,
                        request_url: sealed.request.request_url,
                        files: exports::files(&mut conn, &job_id)?,
                    }
                }
                exports::FAILED => ExportStatus::Failed {
                    error: job.error.unwrap_or_else(|| "the export failed".into()),
                },
                _ => ExportStatus::InProgress {
                    resources_done: job.resources_done,
                },
            })
        })
        .await
    }

    /// Cancels a job (or deletes a finished one) and its files.
    pub async fn cancel_export(&self, ctx: &RequestContext, job_id: &str) -> Result<(), AppError> {
        let this = self.clone();
        let (ctx, job_id) = (ctx.clone(), job_id.to_owned());
        blocking(move || {
            let mut conn = this.connection()?;
            this.owned_job(&mut conn, &ctx, &job_id)?;
            drop(conn);
            this.transact("an export job", |tx| Ok(exports::delete_job(tx, &job_id)?))?;
            Ok(())
        })
        .await
    }

    /// One output file, decrypted: its resource type and NDJSON.
    pub async fn export_file(
        &self,
        ctx: &RequestContext,
        job_id: &str,
        file_no: i32,
    ) -> Result<(String, Vec<u8>), AppError> {
        let this = self.clone();
        let (ctx, job_id) = (ctx.clone(), job_id.to_owned());
        blocking(move || {
            let mut conn = this.connection()?;
            let job = this.owned_job(&mut conn, &ctx, &job_id)?;
            if job.status != exports::COMPLETE {
                return Err(AppError::NotFound(format!(
                    "file {file_no} of export {job_id}"
                )));
            }
            let (resource_type, sealed) = exports::file(&mut conn, &job_id, file_no)?
                .ok_or_else(|| AppError::NotFound(format!("file {file_no} of export {job_id}")))?;
            let name = file_name(&job_id, file_no);
            let plain = this
                .envelope()
                .open(file_binding(&name), &sealed)
                .map_err(|_| AppError::Internal(format!("export file {name} failed to open")))?;
            // Each download is evidence too (the file's resources were ledgered per patient when
            // it was written, for this same owner).
            this.ledger()
                .append(&ctx, LedgerEvent::permit(Action::Export))?;
            Ok((resource_type, plain))
        })
        .await
    }

    /// Runs queued jobs (and jobs whose runner stopped) until none is left; returns how
    /// many it ran. Blocking: the server calls it from a background task.
    pub fn run_export_jobs(&self) -> Result<usize, AppError> {
        let mut ran = 0;
        loop {
            // Between jobs too, so that a long queue does not keep expired files.
            self.delete_expired_exports()?;
            let now = now_micros();
            let lease_until = now + micros(LEASE);
            let claimed = self.transact("the export queue", |tx| {
                Ok(exports::claim(tx, now, lease_until)?)
            })?;
            let Some(job) = claimed else {
                return Ok(ran);
            };
            ran += 1;
            let outcome = self.run_job(&job, lease_until);
            let expires_at = now_micros() + micros(self.export_retention());
            match outcome {
                Ok(JobEnd::Complete { held_until }) => {
                    // Only while the lease is still this runner's: one that lost it (stalled
                    // past the lease) must not complete a job another runner restarted.
                    self.transact("an export job", |tx| {
                        Ok(exports::complete(tx, &job.id, held_until, expires_at)?)
                    })?;
                }
                Ok(JobEnd::Cancelled) => {}
                Err(AppError::Unavailable(detail) | AppError::LedgerUnavailable(detail)) => {
                    // Left running: another runner takes it up once the lease ends.
                    tracing::warn!(job = %job.id, %detail, "export job interrupted; it will be retried");
                }
                Err(error) => {
                    tracing::warn!(job = %job.id, %error, "export job failed");
                    let message = public_failure(&error);
                    self.transact("an export job", |tx| {
                        Ok(exports::fail(tx, &job.id, &message, expires_at)?)
                    })?;
                }
            }
        }
    }

    /// Deletes finished jobs whose time ran out, with their files; returns how many.
    pub fn delete_expired_exports(&self) -> Result<usize, AppError> {
        let mut conn = self.connection()?;
        let expired = exports::expired_jobs(&mut conn, now_micros())?;
        drop(conn);
        for id in &expired {
            self.transact("an export job", |tx| Ok(exports::delete_job(tx, id)?))?;
        }
        Ok(expired.len())
    }

    fn run_job(&self, job: &JobRow, mut lease_until: i64) -> Result<JobEnd, AppError> {
        let sealed = self.open_job(job)?;
        if let Some(identity) = &sealed.identity {
            let expired_at = i64::try_from(identity.expires_at)
                .unwrap_or(i64::MAX)
                .saturating_mul(1_000_000);
            if now_micros() > expired_at.saturating_add(micros(GRACE_AFTER_TOKEN_EXPIRY)) {
                return Err(AppError::Forbidden {
                    rule: "export:token-expired",
                    message: "the token that started the export expired long before it could run"
                        .into(),
                    patients: Vec::new(),
                });
            }
        }
        let principal = match &sealed.identity {
            Some(identity) => Principal::Token(Arc::new(identity.clone())),
            None => Principal::Internal,
        };
        let ctx = RequestContext::acting_as(principal, format!("export-{}", job.id));
        // The gate again: what the token may see is decided as the job runs.
        let searches = self.export_searches(&ctx, &sealed)?;
        // Below the system level, what is in no patient's compartment is not exported, even
        // of a compartment type (an Observation naming no patient).
        let compartments_only = !matches!(sealed.request.level, ExportLevel::System);
        let index = self.search_index();
        let mut file_no = 0;
        let mut done: i64 = 0;
        for (resource_type, type_searches) in searches {
            let mut written: HashSet<String> = HashSet::new();
            for search in type_searches {
                let mut search = search;
                loop {
                    let mut conn = self.connection()?;
                    let page = self.search_page(&mut conn, &search)?;
                    drop(conn);
                    let fresh: Vec<_> = page
                        .matches
                        .iter()
                        .filter(|resource| {
                            !compartments_only
                                || index
                                    .stored_compartments(
                                        resource.resource_type.as_str(),
                                        resource.id.as_str(),
                                        &resource.json,
                                    )
                                    .is_some_and(|patients| !patients.is_empty())
                        })
                        .filter(|resource| written.insert(resource.id.as_str().to_owned()))
                        .collect();
                    let renewed_until = now_micros() + micros(LEASE);
                    if fresh.is_empty() {
                        let held = self.transact("an export job", |tx| {
                            Ok(exports::renew(
                                tx,
                                &job.id,
                                lease_until,
                                renewed_until,
                                done,
                            )?)
                        })?;
                        if !held {
                            return Ok(JobEnd::Cancelled);
                        }
                        lease_until = renewed_until;
                    } else {
                        file_no += 1;
                        let mut ndjson = Vec::new();
                        for resource in &fresh {
                            ndjson.extend_from_slice(resource.json.as_bytes());
                            ndjson.push(b'\n');
                        }
                        let name = file_name(&job.id, file_no);
                        let blob = self.envelope().seal(file_binding(&name), &ndjson);
                        let info = FileInfo {
                            file_no,
                            resource_type: resource_type.as_str().to_owned(),
                            resource_count: fresh.len() as i64,
                        };
                        let event = self.disclosure_event(Action::Export, fresh.iter().copied());
                        done += info.resource_count;
                        let held = self.transact("an export job", |tx| {
                            if !exports::renew(tx, &job.id, lease_until, renewed_until, done)? {
                                return Ok(false);
                            }
                            exports::insert_file(tx, &job.id, &info, &blob)?;
                            self.ledger().append_in(tx, &ctx, event.clone())?;
                            Ok(true)
                        })?;
                        if !held {
                            return Ok(JobEnd::Cancelled);
                        }
                        lease_until = renewed_until;
                    }
                    match page.next {
                        Some(next) => search = search.at_cursor(Some(next)),
                        None => break,
                    }
                    std::thread::sleep(PAGE_PAUSE);
                }
            }
        }
        Ok(JobEnd::Complete {
            held_until: lease_until,
        })
    }

    /// The searches an export runs, by type, authorized by the gate for `ctx` (refusals
    /// ledgered as the export's) and narrowed to the job's patients.
    fn export_searches(
        &self,
        ctx: &RequestContext,
        job: &SealedJob,
    ) -> Result<Vec<(ResourceType, Vec<AuthorizedSearch>)>, AppError> {
        let request = &job.request;
        let index = self.search_index();
        let mut filters: Vec<(String, Vec<(String, String)>)> = Vec::new();
        for filter in &request.type_filters {
            let (type_name, query) =
                filter.split_once('?').ok_or_else(|| AppError::BadRequest {
                    message: "_typeFilter must be Type?search-parameters".into(),
                    expression: Some("_typeFilter".into()),
                })?;
            let pairs: Vec<(String, String)> =
                serde_urlencoded::from_str(query).map_err(|_| AppError::BadRequest {
                    message: "_typeFilter holds a malformed query".into(),
                    expression: Some("_typeFilter".into()),
                })?;
            filters.push((type_name.to_owned(), pairs));
        }
        let compartment_level = !matches!(request.level, ExportLevel::System);
        let types: Vec<ResourceType> = match &request.types {
            Some(types) => {
                let mut resolved: Vec<ResourceType> = Vec::new();
                for name in types.iter().take(self.types().len() + 1) {
                    let resource_type = self.resolve_type(name)?;
                    if !resolved.contains(&resource_type) {
                        resolved.push(resource_type);
                    }
                }
                resolved
            }
            // Every type the token may search (those it may not are left out, not refused:
            // it did not ask for them by name), within patient compartments below the
            // system level. AuditEvent is the ledger's view, not stored resources.
            None => self
                .types()
                .iter()
                .filter(|name| *name != "AuditEvent")
                .filter(|name| {
                    !compartment_level || *name == "Patient" || index.has_compartments(name)
                })
                .filter(|name| policy::authorize(&ctx.principal, Permission::Search, name).is_ok())
                .map(|name| self.resolve_type(name))
                .collect::<Result<_, _>>()?,
        };
        for (type_name, _) in &filters {
            if !types.iter().any(|t| t.as_str() == type_name) {
                return Err(AppError::BadRequest {
                    message: format!(
                        "_typeFilter names '{}', which this export does not include",
                        type_name.chars().take(64).collect::<String>()
                    ),
                    expression: Some("_typeFilter".into()),
                });
            }
        }
        if compartment_level
            && let Some(outside) = types
                .iter()
                .find(|t| t.as_str() != "Patient" && !index.has_compartments(t.as_str()))
        {
            return Err(AppError::BadRequest {
                message: format!(
                    "{outside} is in no patient compartment, so a patient-level export cannot include it"
                ),
                expression: Some("_type".into()),
            });
        }
        let mut searches = Vec::with_capacity(types.len());
        for resource_type in types {
            let mut queries: Vec<Vec<(String, String)>> = filters
                .iter()
                .filter(|(name, _)| name == resource_type.as_str())
                .map(|(_, pairs)| pairs.clone())
                .collect();
            if queries.is_empty() {
                queries.push(Vec::new());
            }
            let mut type_searches = Vec::with_capacity(queries.len());
            for mut pairs in queries {
                if let Some(since) = &request.since {
                    pairs.push(("_lastUpdated".into(), format!("gt{since}")));
                }
                let mut parsed = parse_search(
                    index.registry(),
                    index,
                    vec![resource_type.to_string()],
                    &pairs,
                    Handling::Strict,
                )?;
                parsed.count = RESOURCES_PER_FILE;
                parsed.total = TotalMode::None;
                let mut search = self.authorize_search(ctx, parsed, Action::Export)?;
                if let Some(patients) = &job.patients {
                    // The narrowed condition is bounded as a confined search's is.
                    let types = std::slice::from_ref(&search.request().resource_types[0]);
                    self.check_confinable(ctx, types, Action::Export, patients.len())?;
                    search = search.narrowed_to(patients);
                }
                type_searches.push(search);
            }
            searches.push((resource_type, type_searches));
        }
        Ok(searches)
    }

    /// A job the context's token started; any other is "not found", telling nothing of
    /// other clients' jobs.
    fn owned_job(
        &self,
        conn: &mut crate::store::DbConnection,
        ctx: &RequestContext,
        job_id: &str,
    ) -> Result<JobRow, AppError> {
        let not_found = || AppError::NotFound(format!("export {}", shown(job_id)));
        let job = exports::job(conn, job_id)?.ok_or_else(not_found)?;
        if job.owner != owner_of(&ctx.principal) {
            return Err(not_found());
        }
        Ok(job)
    }

    fn open_job(&self, job: &JobRow) -> Result<SealedJob, AppError> {
        let plain = self
            .envelope()
            .open(job_binding(&job.id), &job.sealed())
            .map_err(|_| AppError::Internal(format!("export job {} failed to open", job.id)))?;
        serde_json::from_slice(&plain)
            .map_err(|e| AppError::Internal(format!("export job {}: {e}", job.id)))
    }
}

/// How a job's run ended.
enum JobEnd {
    /// Every page written, by a runner holding the lease until `held_until`.
    Complete { held_until: i64 },
    /// Deleted (or taken over) while it ran: its runner stops and writes nothing more.
    Cancelled,
}

/// Who may see a job: a digest of the token's issuer, subject, client and grant, so that a
/// job is its starter's whatever token with the same grant (fresh or refreshed) they poll
/// with, and nobody else's.
pub(super) fn owner_of(principal: &Principal) -> String {
    // Everything that decides what the token may see, serialized without ambiguity: a token
    // of the same client for the same user but with other scopes, another launch patient or
    // another purpose is not the owner (a refreshed token with the same grant is).
    let key = match principal {
        Principal::Token(identity) => serde_json::json!([
            "token",
            identity.issuer,
            identity.subject,
            identity.client_id,
            identity.scopes,
            identity.patient,
            identity.fhir_user,
            identity.purpose_of_use,
        ])
        .to_string(),
        Principal::Internal => "internal".to_owned(),
        Principal::Anonymous => "anonymous".to_owned(),
    };
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The members of a Group that are patients (`Patient/{id}` references), without
/// duplicates, in order.
fn group_members(json: &str) -> Result<Vec<String>, AppError> {
    let group: serde_json::Value =
        serde_json::from_str(json).map_err(|e| AppError::Internal(format!("stored Group: {e}")))?;
    let mut members: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    for member in group["member"].as_array().into_iter().flatten() {
        if members.len() > MAX_EXPORT_PATIENTS {
            break;
        }
        if member["inactive"] == true {
            continue;
        }
        let Some(id) = member["entity"]["reference"]
            .as_str()
            .and_then(|reference| reference.strip_prefix("Patient/"))
        else {
            continue;
        };
        if seen.insert(id.to_owned()) {
            members.push(id.to_owned());
        }
    }
    Ok(members)
}

/// What the status URL says of a failure: its message, unless it is the server's own
/// (those are logged, not shown).
fn public_failure(error: &AppError) -> String {
    // Fixed texts: an error's own message may quote a search value of the request, which
    // is sealed, and this column is not.
    match error {
        AppError::Forbidden { rule, .. } => format!(
            "the token that started the export may no longer export what it asked for (rule: {rule})"
        ),
        AppError::BadRequest { .. } | AppError::Validation(_) | AppError::UnknownType(_) => {
            "a search of the export can no longer be run as it was asked".into()
        }
        AppError::TooLarge(_) => "the export names more patients than a search may span".into(),
        _ => "the export failed on the server; see its log".into(),
    }
}

pub(super) fn file_name(job_id: &str, file_no: i32) -> String {
    format!("{job_id}/{file_no}")
}

/// What a job's sealed description is bound to: its row.
pub(super) fn job_binding(job_id: &str) -> ResourceBinding<'_> {
    ResourceBinding {
        resource_type: "$export",
        id: job_id,
        version_id: 1,
    }
}

/// What a file's sealed content is bound to: its job and number.
pub(super) fn file_binding(name: &str) -> ResourceBinding<'_> {
    ResourceBinding {
        resource_type: "$export-file",
        id: name,
        version_id: 1,
    }
}

fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

fn shown(text: &str) -> String {
    text.chars().take(64).collect()
}
