//! Bulk import, the use case: lines of NDJSON loaded in batches through the same
//! validation, sealing, indexing and ledger as the API's writes. A line keeps its id (it
//! creates or updates `Type/id`, as `PUT` does); each batch is one transaction that also
//! records how far its source has got, so an interrupted import resumes without writing a
//! line twice. Conditional references resolve first against the identifiers of everything
//! being imported ([`IdentifierIndex`]), then against what is stored, as a transaction's do.

use std::borrow::Cow;
use std::collections::HashSet;

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::access::RequestContext;
use crate::clock::now_micros;
use crate::error::AppError;
use crate::fhir::document::{VersionId, VersionMeta};
use crate::fhir::identifier_index::{IdentifierIndex, IdentifierMatch};
use crate::fhir::references::rewrite_references;
use crate::fhir::validate::validate_resource;
use crate::fhir::{ResourceId, ResourceType};
use crate::store::{DbConnection, imports};

use super::base::ResourceService;
use super::blocking;
use super::export::owner_of;
use super::gate::AuthorizedSearch;
use super::write::{TxError, WriteKind, Written};

/// One line of a source: its number (from 1) and its text.
#[derive(Debug, Clone)]
pub struct ImportLine {
    pub number: u64,
    pub text: String,
}

/// What became of one line.
#[derive(Debug)]
pub enum LineOutcome {
    /// A version was written; `created` when the resource was new (or deleted before).
    Written {
        resource_type: ResourceType,
        id: ResourceId,
        created: bool,
    },
    /// The line was not loaded; the rest of its batch was.
    Rejected(AppError),
}

/// A line made ready outside the transaction.
enum Ready {
    /// Sealed, indexed and signed already (references resolved within the import).
    Prepared {
        resource_type: ResourceType,
        id: ResourceId,
        kind: WriteKind,
    },
    /// Has conditional references only the database can answer; prepared in the
    /// transaction once they are resolved.
    NeedsDatabase {
        resource_type: ResourceType,
        id: ResourceId,
        compact_json: String,
    },
    Rejected(AppError),
}

/// The only parts of a line read before it is validated.
#[derive(Deserialize)]
struct LineHead<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

impl ResourceService {
    /// The name a client's import source is recorded under: a digest of the token's owner
    /// (see [`owner_of`]) and the name the client gave it, so one client's source never
    /// resumes another's.
    pub fn import_source_key(&self, ctx: &RequestContext, name: &str) -> String {
        let key = serde_json::json!(["import", owner_of(&ctx.principal), name]).to_string();
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// [`Self::import_batch`] for lines streamed in a request: conditional references
    /// resolve against the batch itself and what is stored (earlier batches included).
    pub async fn import_streamed_batch(
        &self,
        ctx: &RequestContext,
        source: Option<String>,
        lines: Vec<ImportLine>,
        through: u64,
    ) -> Result<Vec<(u64, LineOutcome)>, AppError> {
        let (this, ctx) = (self.clone(), ctx.clone());
        blocking(move || {
            let mut identifiers = IdentifierIndex::default();
            for line in &lines {
                if line.text.contains("\"identifier\"")
                    && let Ok(resource) = serde_json::from_str(&line.text)
                {
                    identifiers.add(&resource);
                }
            }
            this.import_batch(&ctx, &identifiers, source.as_deref(), &lines, through)
        })
        .await
    }

    /// How many lines of `source` (the SHA-256 of its content, in hex) are loaded already.
    pub fn import_lines_done(&self, source: &str) -> Result<u64, AppError> {
        let mut conn = self.connection()?;
        Ok(imports::lines_done(&mut conn, source)?)
    }

    /// Ends a bulk load: refreshes the planner's statistics (PostgreSQL), so that what
    /// follows is planned on the data loaded.
    pub fn finish_import(&self) -> Result<(), AppError> {
        Ok(self.pool.refresh_statistics()?)
    }

    /// Loads `lines` and, when they come from a named `source`, records it as loaded through
    /// line `through` (which covers lines skipped before the batch, such as blank ones), so
    /// that a later run of the same source resumes after it. Each line is authorized for
    /// the request's token as a `PUT` of its resource would be. One transaction
    /// writes the batch; when it fails as a whole, each line is written on its own, so one
    /// bad line costs only itself. Returns each line's outcome, by line number.
    pub fn import_batch(
        &self,
        ctx: &RequestContext,
        identifiers: &IdentifierIndex,
        source: Option<&str>,
        lines: &[ImportLine],
        through: u64,
    ) -> Result<Vec<(u64, LineOutcome)>, AppError> {
        let ready = self.prepare_lines(ctx, identifiers, lines);
        let together = self.transact("an import batch", |tx| {
            let written = self.import_new_together(tx, ctx, &ready)?;
            let mut outcomes = Vec::with_capacity(ready.len());
            for (ready, written) in ready.iter().zip(written) {
                outcomes.push(match written {
                    Some(outcome) => Some(outcome),
                    None => self.import_in(tx, ctx, ready)?,
                });
            }
            if let Some(source) = source {
                imports::record_progress(tx, source, through, now_micros())?;
            }
            Ok(outcomes)
        });
        let outcomes = match together {
            Ok(outcomes) => outcomes,
            Err(error @ (AppError::Unavailable(_) | AppError::LedgerUnavailable(_))) => {
                return Err(error);
            }
            Err(_) => self.import_one_by_one(ctx, source, lines, &ready, through)?,
        };
        Ok(lines
            .iter()
            .zip(ready)
            .zip(outcomes)
            .map(|((line, ready), outcome)| {
                let outcome = match (outcome, ready) {
                    (Some(outcome), _) => outcome,
                    (None, Ready::Rejected(error)) => LineOutcome::Rejected(error),
                    (None, _) => LineOutcome::Rejected(AppError::Internal(
                        "an imported line was neither written nor rejected".into(),
                    )),
                };
                (line.number, outcome)
            })
            .collect())
    }

    /// Writes together the lines that create a resource not stored yet, as most of an
    /// initial load does (see [`ResourceService::write_firsts_together`]); the outcome of
    /// each line written, `None` for the rest. A resource named by several lines of the
    /// batch is left to [`Self::import_in`] after its first line, which keeps their order.
    fn import_new_together(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        ready: &[Ready],
    ) -> Result<Vec<Option<LineOutcome>>, TxError> {
        let mut seen = HashSet::with_capacity(ready.len());
        let mut candidates = Vec::with_capacity(ready.len());
        let mut lines = Vec::with_capacity(ready.len());
        for (line, ready) in ready.iter().enumerate() {
            let (resource_type, id) = match ready {
                Ready::Prepared {
                    resource_type, id, ..
                }
                | Ready::NeedsDatabase {
                    resource_type, id, ..
                } => (resource_type, id),
                Ready::Rejected(_) => continue,
            };
            let first = seen.insert((resource_type, id));
            if let (
                true,
                Ready::Prepared {
                    kind: WriteKind::Prepared(prepared),
                    ..
                },
            ) = (first, ready)
            {
                candidates.push((resource_type, id, prepared.as_ref()));
                lines.push(line);
            }
        }
        let mut outcomes: Vec<Option<LineOutcome>> = ready.iter().map(|_| None).collect();
        let fresh = self.write_firsts_together(tx, ctx, &candidates)?;
        for ((resource_type, id, _), (line, fresh)) in
            candidates.iter().zip(lines.into_iter().zip(fresh))
        {
            if fresh {
                outcomes[line] = Some(LineOutcome::Written {
                    resource_type: (*resource_type).clone(),
                    id: (*id).clone(),
                    created: true,
                });
            }
        }
        Ok(outcomes)
    }

    /// Writes each line of a batch whose transaction failed in a transaction of its own,
    /// recording the progress with each; a line that fails on its own is rejected and
    /// counts as done. `None` for a line rejected before any transaction.
    fn import_one_by_one(
        &self,
        ctx: &RequestContext,
        source: Option<&str>,
        lines: &[ImportLine],
        ready: &[Ready],
        through: u64,
    ) -> Result<Vec<Option<LineOutcome>>, AppError> {
        let mut outcomes = Vec::with_capacity(lines.len());
        for (index, (line, ready)) in lines.iter().zip(ready).enumerate() {
            let done = if index + 1 == lines.len() {
                through
            } else {
                line.number
            };
            let outcome = self.transact("an imported resource", |tx| {
                let outcome = self.import_in(tx, ctx, ready)?;
                if let Some(source) = source {
                    imports::record_progress(tx, source, done, now_micros())?;
                }
                Ok(outcome)
            });
            let outcome = match outcome {
                Ok(outcome) => outcome,
                // Only what is wrong with the line itself is its rejection; the server's own
                // failures stop the import, whose next run tries the line again.
                Err(error) if !is_the_lines_fault(&error) => return Err(error),
                Err(error) => {
                    if let Some(source) = source {
                        let mut conn = self.connection()?;
                        imports::record_progress(&mut conn, source, done, now_micros())?;
                    }
                    Some(LineOutcome::Rejected(error))
                }
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    /// Validates, resolves what the import itself can, seals, indexes and signs each line,
    /// spread over the machine's cores; none of it needs the database.
    fn prepare_lines(
        &self,
        ctx: &RequestContext,
        identifiers: &IdentifierIndex,
        lines: &[ImportLine],
    ) -> Vec<Ready> {
        let threads = std::thread::available_parallelism().map_or(1, usize::from);
        let chunk = lines.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            let workers: Vec<_> = lines
                .chunks(chunk)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|line| self.prepare_line(ctx, identifiers, &line.text))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .zip(lines.chunks(chunk))
                .flat_map(|(worker, part)| {
                    // One outcome per line whatever happens, so outcomes stay in step with
                    // the lines they belong to.
                    worker.join().unwrap_or_else(|_| {
                        part.iter()
                            .map(|_| {
                                Ready::Rejected(AppError::Internal(
                                    "preparing this line failed".into(),
                                ))
                            })
                            .collect()
                    })
                })
                .collect()
        })
    }

    fn prepare_line(
        &self,
        ctx: &RequestContext,
        identifiers: &IdentifierIndex,
        text: &str,
    ) -> Ready {
        match self.try_prepare_line(ctx, identifiers, text) {
            Ok(ready) => ready,
            Err(error) => Ready::Rejected(error),
        }
    }

    fn try_prepare_line(
        &self,
        ctx: &RequestContext,
        identifiers: &IdentifierIndex,
        text: &str,
    ) -> Result<Ready, AppError> {
        let head: LineHead<'_> = serde_json::from_str(text).map_err(|e| AppError::BadRequest {
            message: format!("the line is not a resource in JSON: {e}"),
            expression: None,
        })?;
        let declared = head
            .resource_type
            .ok_or_else(|| AppError::bad_request("the line has no resourceType"))?;
        let resource_type = self.resolve_type(&declared)?;
        let id = match head.id.as_deref() {
            Some(id) => ResourceId::parse(id)?,
            None => ResourceId::generate(),
        };
        self.authorize_imported(ctx, &resource_type, &id)?;
        let mut needs_database = false;
        let mut failure = None;
        let rewritten = rewrite_references(text, |reference| {
            if reference.starts_with("urn:uuid:") || reference.starts_with("urn:oid:") {
                failure.get_or_insert_with(|| {
                    AppError::bad_request(
                        "a urn:uuid: or urn:oid: reference names a Bundle entry, and a line is \
                         not in a Bundle",
                    )
                });
                return None;
            }
            if !reference.contains('?') {
                return None;
            }
            match identifiers.resolve(reference) {
                IdentifierMatch::Resource(literal) => Some(literal),
                IdentifierMatch::Ambiguous => {
                    failure.get_or_insert_with(|| {
                        AppError::PreconditionFailed(format!(
                            "conditional reference '{}?…' matches more than one imported resource",
                            shown(reference)
                        ))
                    });
                    None
                }
                IdentifierMatch::NotInSet => {
                    needs_database = true;
                    None
                }
            }
        })
        .map_err(|e| AppError::bad_request(format!("the line is not valid JSON: {e}")))?;
        if let Some(error) = failure {
            return Err(error);
        }
        let validated = validate_resource(self.types(), &resource_type, rewritten.as_bytes())?;
        if needs_database {
            return Ok(Ready::NeedsDatabase {
                resource_type,
                id,
                compact_json: validated.compact_json,
            });
        }
        let first = VersionMeta {
            version_id: VersionId::FIRST,
            last_updated: now_micros(),
        };
        let prepared = self.prepare_version(
            ctx,
            &resource_type,
            &id,
            first,
            &validated.compact_json,
            "PUT",
            true,
        )?;
        Ok(Ready::Prepared {
            resource_type,
            id,
            kind: WriteKind::Prepared(Box::new(prepared)),
        })
    }

    /// Writes one ready line inside `tx`; `None` for a line rejected before. A line the
    /// database refuses on its own terms (a conditional reference matching nothing) is
    /// rejected without failing the transaction; a failed write fails it.
    fn import_in(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        ready: &Ready,
    ) -> Result<Option<LineOutcome>, TxError> {
        let (resource_type, id, resolved_kind);
        let kind = match ready {
            Ready::Rejected(_) => return Ok(None),
            Ready::Prepared {
                resource_type: prepared_type,
                id: prepared_id,
                kind,
            } => {
                (resource_type, id) = (prepared_type, prepared_id);
                kind
            }
            Ready::NeedsDatabase {
                resource_type: line_type,
                id: line_id,
                compact_json,
            } => {
                (resource_type, id) = (line_type, line_id);
                match self.resolve_stored_references(tx, ctx, compact_json) {
                    Ok(compact_json) => {
                        resolved_kind = WriteKind::Content {
                            compact_json,
                            method: "PUT",
                        };
                        &resolved_kind
                    }
                    Err(error) => return Ok(Some(LineOutcome::Rejected(error))),
                }
            }
        };
        let (written, _receipt) = self.write_once(tx, ctx, resource_type, id, None, kind)?;
        let Written::Content(outcome) = written else {
            return Err(AppError::Internal("an import wrote a deletion".into()).into());
        };
        Ok(Some(LineOutcome::Written {
            resource_type: resource_type.clone(),
            id: id.clone(),
            created: outcome.created,
        }))
    }

    /// Rewrites the conditional references of `compact_json` that the import could not
    /// resolve by searching what is stored: exactly one match each, or the line fails.
    fn resolve_stored_references(
        &self,
        tx: &mut DbConnection,
        ctx: &RequestContext,
        compact_json: &str,
    ) -> Result<String, AppError> {
        let mut failure = None;
        let rewritten = rewrite_references(compact_json, |reference| {
            if failure.is_some() || !reference.contains('?') {
                return None;
            }
            let named = format!("{}?…", shown(reference));
            let resolved = self
                .parse_conditional_reference(reference)
                .map_err(|_| {
                    AppError::bad_request(format!(
                        "conditional reference '{named}' is not a search this server can make"
                    ))
                })
                .and_then(|request| {
                    let search = AuthorizedSearch::server_internal(request);
                    self.resolve_conditional_reference_named(tx, ctx, &named, &search)
                });
            match resolved {
                Ok(literal) => Some(literal),
                Err(error) => {
                    failure = Some(error);
                    None
                }
            }
        })
        .map_err(|e| AppError::Internal(format!("reference rewriting: {e}")))?;
        match failure {
            Some(error) => Err(error),
            None => Ok(rewritten),
        }
    }
}

/// Whether an error is about the line (its content, its references), not the server.
fn is_the_lines_fault(error: &AppError) -> bool {
    matches!(
        error,
        AppError::Validation(_)
            | AppError::BadRequest { .. }
            | AppError::InvalidId(_)
            | AppError::UnknownType(_)
            | AppError::Unprocessable(_)
            | AppError::PreconditionFailed(_)
            | AppError::PayloadTooLarge { .. }
            | AppError::TooLarge(_)
    )
}

/// A reference as an import's messages name it: its type only (the search after `?` may
/// hold an identifier, and the messages reach terminals and report files).
fn shown(reference: &str) -> String {
    reference
        .split('?')
        .next()
        .unwrap_or("")
        .chars()
        .take(64)
        .collect()
}
