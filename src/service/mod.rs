//! Use cases: one function per FHIR interaction, each validating, sealing or opening, and
//! running one store transaction. Blocking work runs on tokio's blocking pool.

pub mod audit;
pub mod audit_events;
pub mod bundles;
pub mod everything;
pub mod gate;
pub mod ledger;
pub mod resources;
pub mod search;

pub use resources::{
    DeleteOutcome, HistoryEntry, HistoryPage, HistoryQuery, HistoryScanPage, HistoryScanQuery,
    ResourceService, ScannedEntry, StoredResource, WriteOutcome,
};

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
