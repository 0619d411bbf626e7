//! Master key rotation: re-wrapping, in the background and a page at a time, every data key
//! a previous master key wrapped (resource versions, export jobs and files, subscriptions)
//! with the current one, while the server serves both; ledgered when it starts
//! (`key-rotate`) and when the previous key is no longer needed (`key-retire`). Resumable by
//! construction: what is left is what the database still holds under a previous key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use crate::access::RequestContext;
use crate::crypto::ResourceBinding;
use crate::error::AppError;
use crate::ledger::Action;
use crate::store::rewrap::{self, WrappedKeyRow};

use super::ResourceService;
use super::export::{file_binding, file_name, job_binding};
use super::ledger::LedgerEvent;
use super::subscriptions::sealed_binding;

/// Data keys re-wrapped per transaction.
pub const REWRAP_PAGE: i64 = 500;

/// Where a rotation stands, shared by the runner and whoever reports it.
#[derive(Debug, Default)]
pub struct RotationProgress {
    /// Data keys still wrapped by a previous key (counted at start, then counted down).
    pub remaining: AtomicI64,
    pub rewrapped: AtomicI64,
    /// Set once every data key is under the current key and the retirement is ledgered.
    pub done: AtomicBool,
}

impl ResourceService {
    /// Starts a rotation when the envelope holds previous keys that still wrap data keys:
    /// counts those and ledgers `key-rotate` (naming the current key). `None` when there is
    /// nothing to re-wrap.
    pub fn start_rotation(&self) -> Result<Option<Arc<RotationProgress>>, AppError> {
        let previous = self.previous_key_ids();
        if previous.is_empty() {
            return Ok(None);
        }
        let remaining = {
            let mut conn = self.pool.get()?;
            rewrap::count_under_previous_keys(&mut conn, &previous)?
        };
        if remaining == 0 {
            // A finished rotation (its retirement was ledgered then), or a key given as
            // previous only so that this process opens what others seal with it.
            tracing::info!(
                previous = previous.join(","),
                "no data key is wrapped by the previous master keys: nothing to re-wrap"
            );
            return Ok(None);
        }
        let progress = Arc::new(RotationProgress::default());
        progress.remaining.store(remaining, Ordering::Relaxed);
        let ctx = RequestContext::internal("key-rotate");
        self.ledger.append(
            &ctx,
            LedgerEvent::permit(Action::KeyRotate).about_key(self.master_key_id()),
        )?;
        tracing::info!(
            key_id = %self.master_key_id(),
            previous = previous.join(","),
            remaining,
            "master key rotation: re-wrapping data keys in the background"
        );
        Ok(Some(progress))
    }

    /// Re-wraps one page of data keys; when none is left, ledgers `key-retire` for each
    /// previous key and marks the rotation done. Returns how many were re-wrapped.
    pub fn rewrap_page(&self, progress: &RotationProgress) -> Result<usize, AppError> {
        if progress.done.load(Ordering::Relaxed) {
            return Ok(0);
        }
        let previous = self.previous_key_ids();
        let found = {
            let mut conn = self.pool.get()?;
            rewrap::under_previous_keys(&mut conn, &previous, REWRAP_PAGE)?
        };
        if found.is_empty() {
            self.retire_previous_keys(&previous)?;
            progress.remaining.store(0, Ordering::Relaxed);
            progress.done.store(true, Ordering::Relaxed);
            publish(progress);
            return Ok(0);
        }
        let mut rewrapped = Vec::with_capacity(found.len());
        for wrapped in &found {
            let name;
            let binding = match &wrapped.row {
                WrappedKeyRow::Version {
                    resource_type,
                    id,
                    version_id,
                } => ResourceBinding {
                    resource_type,
                    id,
                    version_id: *version_id,
                },
                WrappedKeyRow::ExportJob { id } => job_binding(id),
                WrappedKeyRow::ExportFile { job_id, file_no } => {
                    name = file_name(job_id, *file_no);
                    file_binding(&name)
                }
                WrappedKeyRow::Subscription { id } => sealed_binding(id),
            };
            match self
                .envelope
                .rewrap(binding, &wrapped.key_id, &wrapped.wrapped_key)
            {
                Ok(Some((key_id, key))) => rewrapped.push((wrapped, key_id, key)),
                Ok(None) => {}
                // A row that does not unwrap was altered: the audit reports it; the rotation
                // cannot fix it, and must not loop on it.
                Err(error) => {
                    return Err(AppError::Internal(format!(
                        "a data key does not unwrap for re-wrapping ({error}); run fhirledger audit"
                    )));
                }
            }
        }
        let count = self.pool.write(|conn| {
            let mut count = 0;
            for (wrapped, key_id, key) in &rewrapped {
                if rewrap::set_wrapped_key(conn, &wrapped.row, &wrapped.key_id, key_id, key)? {
                    count += 1;
                }
            }
            Ok::<usize, AppError>(count)
        })?;
        progress
            .rewrapped
            .fetch_add(count as i64, Ordering::Relaxed);
        let left = progress.remaining.load(Ordering::Relaxed) - count as i64;
        progress.remaining.store(left.max(0), Ordering::Relaxed);
        if let Some(metrics) = crate::metrics::metrics() {
            metrics.rewrapped.inc_by(count as u64);
        }
        publish(progress);
        Ok(count)
    }

    fn retire_previous_keys(&self, previous: &[String]) -> Result<(), AppError> {
        let ctx = RequestContext::internal("key-retire");
        for key_id in previous {
            self.ledger.append(
                &ctx,
                LedgerEvent::permit(Action::KeyRetire).about_key(key_id),
            )?;
            tracing::info!(
                %key_id,
                "master key retired: no data key is wrapped by it any more; remove it from \
                 FHIRLEDGER_PREVIOUS_MASTER_KEY_FILES"
            );
        }
        Ok(())
    }

    fn previous_key_ids(&self) -> Vec<String> {
        self.envelope
            .previous_ids()
            .into_iter()
            .map(|id| id.as_str().to_owned())
            .collect()
    }
}

fn publish(progress: &RotationProgress) {
    if let Some(metrics) = crate::metrics::metrics() {
        metrics
            .rewrap_remaining
            .set(progress.remaining.load(Ordering::Relaxed));
    }
}
