//! Bulk import over HTTP: `POST /fhir/$import` with an NDJSON body, read as it streams and
//! loaded in batches through the same service as `fhirledger import` (validation, sealing,
//! indexing, the ledger, each line authorized as a `PUT` of its resource), answered with
//! a `Parameters` summary that names every rejected line.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt as _;
use serde_json::{Value, json};

use super::AppState;
use super::negotiation::FHIR_JSON_UTF8;
use super::request::QueryParams;
use crate::access::RequestContext;
use crate::error::AppError;
use crate::fhir::ndjson::{Line, LineSplitter};
use crate::fhir::outcome::OperationOutcome;
use crate::service::import::{ImportLine, LineOutcome};

/// Media types of an NDJSON body (the Bulk Data IG's names, and the common unregistered one).
const NDJSON_TYPES: &[&str] = &[
    "application/fhir+ndjson",
    "application/ndjson",
    "application/x-ndjson",
];
/// Lines written per transaction.
const BATCH_LINES: usize = 500;
/// Most bytes of lines held for one batch: a batch is written early when its lines are big.
const BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Most bytes one request may send; a larger load is sent in several requests (with
/// `source`, each resumes where the last stopped).
pub const MAX_IMPORT_BYTES: u64 = 4 * 1024 * 1024 * 1024;
/// How long the body may stall before the import stops (what was loaded stays loaded).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Imports running at once: each keeps the writer busy between interactive requests.
const MAX_RUNNING_IMPORTS: usize = 2;
/// Rejected lines the answer names one by one; it counts the rest.
const MAX_NAMED_REJECTIONS: usize = 100;
/// Longest `source` name.
const MAX_SOURCE_NAME: usize = 256;

/// Imports running now, across the process.
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// A place among the [`MAX_RUNNING_IMPORTS`]; given back when dropped.
struct RunningImport;

impl RunningImport {
    fn take() -> Option<Self> {
        RUNNING
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |running| {
                (running < MAX_RUNNING_IMPORTS).then_some(running + 1)
            })
            .ok()
            .map(|_| Self)
    }
}

impl Drop for RunningImport {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an import did, as the answer reports it.
#[derive(Default)]
struct Tally {
    lines: u64,
    already_done: u64,
    created: u64,
    updated: u64,
    rejected: u64,
    named: Vec<(u64, OperationOutcome)>,
}

impl Tally {
    fn reject(&mut self, line: u64, error: &AppError) {
        self.rejected += 1;
        if self.named.len() < MAX_NAMED_REJECTIONS {
            self.named.push((line, error.outcome()));
        }
    }

    fn count(&mut self, outcomes: Vec<(u64, LineOutcome)>) {
        for (line, outcome) in outcomes {
            match outcome {
                LineOutcome::Written { created: true, .. } => self.created += 1,
                LineOutcome::Written { created: false, .. } => self.updated += 1,
                LineOutcome::Rejected(error) => self.reject(line, &error),
            }
        }
    }

    fn parameters(&self) -> Value {
        let count = |name: &str, value: u64| json!({"name": name, "valueInteger": value});
        let mut parameter = vec![
            count("lines", self.lines),
            count("linesAlreadyLoaded", self.already_done),
            count("created", self.created),
            count("updated", self.updated),
            count("rejected", self.rejected),
        ];
        parameter.extend(self.named.iter().map(|(line, outcome)| {
            json!({"name": "rejection", "part": [
                {"name": "line", "valueInteger": line},
                {"name": "outcome", "resource": outcome},
            ]})
        }));
        json!({"resourceType": "Parameters", "parameter": parameter})
    }
}

/// Loads an NDJSON body, one resource per line, each created or updated under its own id.
#[utoipa::path(post, path = "/fhir/$import", tag = "bulk data",
    params(
        ("source" = Option<String>, Query, description = "A name for this load: a later request with the same name (and token owner) skips the lines this one loaded, so an interrupted load is sent again whole"),
    ),
    request_body(content = String, description = "NDJSON: one FHIR resource per line, each with its id; targets of conditional references before what names them", content_type = "application/fhir+ndjson"),
    responses(
        (status = 200, description = "Loaded; a `Parameters` resource counts lines created, updated and rejected and names each rejected line with its OperationOutcome", body = super::response::Resource),
        (status = 400, description = "A query parameter other than `source`", body = OperationOutcome),
        (status = 401, description = "No valid bearer token (a line the token may not write is rejected with 403 in the answer)", body = OperationOutcome),
        (status = 408, description = "The body stalled; the lines before were loaded", body = OperationOutcome),
        (status = 413, description = "The body is larger than 4 GiB; the lines before the limit were loaded", body = OperationOutcome),
        (status = 415, description = "The body is not NDJSON", body = OperationOutcome),
        (status = 503, description = "Too many imports running, or the database cannot be written; the lines before were loaded", body = OperationOutcome),
    ))]
pub async fn import_ndjson(
    state: web::Data<AppState>,
    ctx: RequestContext,
    req: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, AppError> {
    require_ndjson(&req)?;
    let source_name = source_name(&req)?;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_IMPORT_BYTES) {
        return Err(too_large());
    }
    let resources = state.resources.clone();
    let Some(_running) = RunningImport::take() else {
        return Err(AppError::Unavailable(format!(
            "{MAX_RUNNING_IMPORTS} imports are running; retry when one has finished"
        )));
    };
    let source = source_name.map(|name| resources.import_source_key(&ctx, &name));
    let done = match &source {
        Some(key) => {
            let (resources, key) = (resources.clone(), key.clone());
            web::block(move || resources.import_lines_done(&key))
                .await
                .map_err(|e| AppError::Internal(format!("import progress: {e}")))??
        }
        None => 0,
    };

    let mut tally = Tally::default();
    let mut splitter = LineSplitter::new(state.max_body_bytes);
    let mut batch = Batch {
        max_line: state.max_body_bytes,
        ..Batch::default()
    };
    let mut received: u64 = 0;
    let mut ended = false;
    while !ended {
        let chunk = match tokio::time::timeout(IDLE_TIMEOUT, payload.next()).await {
            Err(_) => {
                return Err(AppError::RequestTimeout(format!(
                    "the body sent nothing for {} s; the lines before line {} were loaded",
                    IDLE_TIMEOUT.as_secs(),
                    splitter.lines() + 1
                )));
            }
            Ok(None) => {
                ended = true;
                web::Bytes::new()
            }
            Ok(Some(chunk)) => chunk.map_err(|e| {
                AppError::bad_request(format!("the request body could not be read: {e}"))
            })?,
        };
        received += chunk.len() as u64;
        if received > MAX_IMPORT_BYTES {
            return Err(too_large());
        }
        let mut rest = &chunk[..];
        loop {
            let mut lines = Vec::new();
            let used = splitter.push(rest, &mut lines, Some(1));
            rest = &rest[used..];
            if lines.is_empty() && ended {
                lines.extend(splitter.finish());
            }
            let Some((number, line)) = lines.pop() else {
                break;
            };
            tally.lines = number;
            if number <= done {
                tally.already_done = number;
                continue;
            }
            batch.take(number, line, &mut tally);
            if batch.is_full() {
                batch.load(&resources, &ctx, &source, &mut tally).await?;
            }
        }
    }
    batch.load(&resources, &ctx, &source, &mut tally).await?;
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, FHIR_JSON_UTF8))
        .body(tally.parameters().to_string()))
}

/// Lines waiting to be written together.
#[derive(Default)]
struct Batch {
    /// Longest line: what one `PUT` may send.
    max_line: usize,
    lines: Vec<ImportLine>,
    bytes: usize,
    /// The last line taken, loaded or not (blank and unreadable lines count as done).
    through: u64,
    /// Lines taken since the last load, loaded or not.
    pending: bool,
}

impl Batch {
    fn take(&mut self, number: u64, line: Line, tally: &mut Tally) {
        self.through = number;
        self.pending = true;
        match line {
            Line::Text(text) => {
                self.bytes += text.len();
                self.lines.push(ImportLine { number, text });
            }
            Line::Blank => {}
            Line::TooLong => tally.reject(
                number,
                &AppError::PayloadTooLarge {
                    limit: self.max_line,
                },
            ),
            Line::NotUtf8 => tally.reject(number, &AppError::bad_request("the line is not UTF-8")),
        }
    }

    fn is_full(&self) -> bool {
        self.lines.len() >= BATCH_LINES || self.bytes >= BATCH_BYTES
    }

    async fn load(
        &mut self,
        resources: &crate::service::ResourceService,
        ctx: &RequestContext,
        source: &Option<String>,
        tally: &mut Tally,
    ) -> Result<(), AppError> {
        if !self.pending {
            return Ok(());
        }
        let lines = std::mem::take(&mut self.lines);
        (self.bytes, self.pending) = (0, false);
        let outcomes = resources
            .import_streamed_batch(ctx, source.clone(), lines, self.through)
            .await?;
        tally.count(outcomes);
        Ok(())
    }
}

fn require_ndjson(req: &HttpRequest) -> Result<(), AppError> {
    let media = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| m.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if NDJSON_TYPES.contains(&media.as_str()) {
        return Ok(());
    }
    Err(AppError::UnsupportedMediaType(format!(
        "$import takes an NDJSON body (Content-Type application/fhir+ndjson), one resource per \
         line; a Parameters body naming files to fetch (the Bulk Data Import draft's \
         ping-and-pull) is not supported, got '{}'",
        media.chars().take(64).collect::<String>()
    )))
}

/// The `source` query parameter, when given.
fn source_name(req: &HttpRequest) -> Result<Option<String>, AppError> {
    let params = QueryParams::parse(req, &["source"])?;
    match params.get("source") {
        None => Ok(None),
        Some(name) if (1..=MAX_SOURCE_NAME).contains(&name.len()) => Ok(Some(name.to_owned())),
        Some(_) => Err(AppError::BadRequest {
            message: format!("'source' is a name of 1 to {MAX_SOURCE_NAME} bytes"),
            expression: Some("source".into()),
        }),
    }
}

fn too_large() -> AppError {
    AppError::TooLarge(format!(
        "an import sends at most {MAX_IMPORT_BYTES} bytes; the lines before the limit were \
         loaded, send the rest in another request (with the same 'source' it resumes)"
    ))
}
