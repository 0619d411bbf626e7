//! The service layer: use cases (one function per FHIR interaction) composed of the parts
//! below them, each in its own file, each importing only the ones under it:
//!
//! - `base`: [`ResourceService`], its handles, transactions, opening sealed versions;
//! - `gate`: the access gate (authorize, confine, Consent, withhold, ledgered refusals);
//! - `write`: the write pipeline (stamp, seal, index, ledger, commit);
//! - `search`: the search engine (conditions, paging, includes); `cursor`: the one sealed
//!   paging cursor of searches, `$everything`, history and the AuditEvent view;
//! - use cases over them: `resources` (CRUD, history), `bundles` (transactions, batches,
//!   conditional interactions), `everything`, `audit_events` (the patient's AuditEvent view),
//!   `import` (NDJSON lines in batches, resumable), `export` (`$export` jobs and their files);
//! - `ledger`: recording interactions and the sequencer; `audit`: `fhirledger audit`.
//!
//! Blocking work runs on tokio's blocking pool.

pub mod audit;
pub mod audit_events;
pub mod base;
pub mod bundles;
pub mod cursor;
pub mod everything;
pub mod export;
pub mod gate;
pub mod import;
pub mod index_key;
pub mod ledger;
pub mod resources;
pub mod rotation;
pub mod search;
pub mod subscriptions;
pub mod write;

pub use base::{ResourceService, StoredResource};
pub use resources::{
    HistoryEntry, HistoryPage, HistoryQuery, HistoryScanPage, HistoryScanQuery, ScannedEntry,
};
pub use write::{DeleteOutcome, WriteOutcome};

use crate::error::AppError;

/// Runs blocking store and crypto work off the async workers.
pub(crate) async fn blocking<T, F>(work: F) -> Result<T, AppError>
where
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| AppError::Internal(format!("blocking task failed: {e}")))?
}
