//! Recording interactions in the ledger and running the sequencer; read access to the log
//! for the ledger API.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::access::policy::{self, Refusal};
use crate::access::throttle::{Aggregate, RefusalThrottle};
use crate::access::{AuthError, RequestContext};
use crate::error::AppError;
use crate::fhir::document::format_instant;
use crate::ledger::Action;
use crate::ledger::entry::{ENTRY_VERSION, EntryResource, LedgerEntry, Outcome, SignedEntry};
use crate::ledger::sequencer::{self, PendingLeaf, SequencedLeaf, SequencerStore, SignedTree};
use crate::ledger::tiles::{TileRef, tile_data};
use crate::ledger::tree;
use crate::ledger::{Hash, HashStore, LedgerError, LedgerKey};
use crate::store::ledger::{self as rows, CheckpointRow, DbHashStore, EntryRow};
use crate::store::{DbConnection, DbPool, StoreError};

use super::blocking;
use crate::clock::now_micros;

/// Refusals of requests without valid credentials one address may have per minute, unless
/// configured.
pub const DEFAULT_AUTH_FAILURES_PER_MINUTE: u32 = 60;

/// Most entries one page of `GET /ledger/entries` returns.
pub const MAX_ENTRIES_PAGE: i64 = 1000;

/// Signed entries not yet stored: what [`LedgerService::store_in`] writes. The first is the
/// lead entry, whose receipt the request returns.
#[derive(Debug, Clone)]
pub struct PendingEntry {
    entries: Vec<SignedEntry>,
    /// When they were signed (µs since the epoch), the pending rows' `created_at`.
    signed_at: i64,
}

/// A resource an interaction disclosed or changed, with the patients whose compartments
/// hold it (by the one compartment rule).
#[derive(Debug, Clone)]
pub struct Touched {
    pub resource: EntryResource,
    /// Patient ids; empty for shared reference data or a resource in no compartment.
    pub patients: BTreeSet<String>,
}

/// What happened, to be recorded.
///
/// An event that touches one patient's record at most becomes one entry naming that patient.
/// An event that touches several patients' records (a search or history page across
/// patients) becomes one entry per patient, each naming only that patient's resources and
/// pointing at a lead entry (`partOf`), plus the lead entry itself, which names no patient,
/// lists its parts' receipts (`parts`) and holds the shared resources and the `withheld`
/// count. Each patient's view shows the entry about them and nothing of the others.
#[derive(Debug, Clone)]
pub struct LedgerEvent {
    pub action: Action,
    pub outcome: Outcome,
    pub reason: Option<&'static str>,
    /// The access rule that decided, when one did.
    pub rule: Option<&'static str>,
    /// Resources matched but withheld from the token (searches, histories).
    pub withheld: Option<u64>,
    pub resources: Vec<Touched>,
    /// Patients (ids) the event concerns besides its resources' compartments: the
    /// compartments a refusal was decided on, the patient whose account was viewed.
    pub concerns: BTreeSet<String>,
    /// How many requests an aggregated entry stands for (unauthenticated refusals).
    pub count: Option<u64>,
    /// The client address an aggregated entry counts requests from.
    pub source: Option<String>,
    /// The receipt of the (lead) entry, when it was handed out before the entry was
    /// written (aggregated refusals).
    pub receipt: Option<String>,
}

impl LedgerEvent {
    pub fn permit(action: Action) -> Self {
        Self::new(action, Outcome::Permit, None)
    }

    pub fn deny(action: Action, reason: &'static str) -> Self {
        Self::new(action, Outcome::Deny, Some(reason))
    }

    fn new(action: Action, outcome: Outcome, reason: Option<&'static str>) -> Self {
        Self {
            action,
            outcome,
            reason,
            rule: None,
            withheld: None,
            resources: Vec::new(),
            concerns: BTreeSet::new(),
            count: None,
            source: None,
            receipt: None,
        }
    }

    /// Names a resource, in the compartments of `patients` (`None`: a type outside them).
    pub fn touching(mut self, resource: EntryResource, patients: Option<BTreeSet<String>>) -> Self {
        self.touch(resource, patients);
        self
    }

    /// [`Self::touching`], in place.
    pub fn touch(&mut self, resource: EntryResource, patients: Option<BTreeSet<String>>) {
        self.resources.push(Touched {
            resource,
            patients: patients.unwrap_or_default(),
        });
    }

    /// Names resources without placing them in any compartment (what was asked for by a
    /// refused request, before anything was read).
    pub fn naming(mut self, resources: Vec<EntryResource>) -> Self {
        self.resources
            .extend(resources.into_iter().map(|resource| Touched {
                resource,
                patients: BTreeSet::new(),
            }));
        self
    }

    /// Adds patients (ids) the event concerns besides its resources' compartments.
    pub fn concerning(mut self, patients: impl IntoIterator<Item = String>) -> Self {
        self.concerns.extend(patients);
        self
    }

    /// Names the access rule that decided.
    pub fn decided_by(mut self, rule: &'static str) -> Self {
        self.rule = Some(rule);
        self
    }

    /// Records how many matches were withheld from the token (none: nothing recorded).
    pub fn withholding(mut self, withheld: u64) -> Self {
        self.withheld = (withheld > 0).then_some(withheld);
        self
    }

    /// Every patient the event touches or concerns.
    fn patients(&self) -> BTreeSet<&str> {
        self.concerns
            .iter()
            .chain(self.resources.iter().flat_map(|r| &r.patients))
            .map(String::as_str)
            .collect()
    }
}

/// Most entries indexed by patient per sequencer transaction: entries sequenced before the
/// index existed are caught up over several runs.
const PATIENT_INDEX_CHUNK: i64 = 10_000;

/// Records which patients' compartments the sequenced entries not yet indexed touched
/// (for the patients' AuditEvent view), inside the sequencer's transaction.
fn index_patients(tx: &mut DbConnection) -> Result<(), AppError> {
    let size = rows::tree_size(tx)?;
    let from = rows::patient_index_size(tx)?;
    if from >= size {
        return Ok(());
    }
    let to = size.min(from + PATIENT_INDEX_CHUNK);
    let mut pairs = Vec::new();
    for row in rows::entries_range(tx, from, to)? {
        let (Some(index), Ok(entry)) = (
            row.leaf_index,
            serde_json::from_slice::<LedgerEntry>(&row.data),
        ) else {
            // `fhirledger audit` reports an entry that does not parse.
            tracing::warn!(
                pending_seq = row.pending_seq,
                "ledger entry not indexed by patient"
            );
            continue;
        };
        pairs.extend(
            entry
                .patient_ids()
                .into_iter()
                .map(|patient| (patient, index)),
        );
    }
    rows::index_patients(tx, &pairs, to)?;
    Ok(())
}

/// Knobs of the sequencer.
#[derive(Debug, Clone, Copy)]
pub struct SequencerOptions {
    /// Most entries sequenced (and so covered by one checkpoint) per transaction.
    pub batch_size: i64,
}

/// A sequenced entry as served.
#[derive(Debug, Clone)]
pub struct ServedEntry {
    pub index: Option<u64>,
    pub receipt: String,
    pub leaf_data: Vec<u8>,
}

impl From<EntryRow> for ServedEntry {
    fn from(row: EntryRow) -> Self {
        Self {
            index: row.leaf_index.and_then(|i| u64::try_from(i).ok()),
            receipt: row.receipt,
            leaf_data: row.data,
        }
    }
}

/// The latest checkpoint.
#[derive(Debug, Clone)]
pub struct CurrentCheckpoint {
    pub size: u64,
    pub root: Hash,
    pub note: String,
}

#[derive(Clone)]
pub struct LedgerService {
    pool: DbPool,
    key: Arc<LedgerKey>,
    options: SequencerOptions,
    /// Set on a clone made by [`Self::deferring`]: its appends are signed and held here, and
    /// the request commits them with [`Self::commit_deferred`] before it answers.
    deferred: Option<DeferredEntries>,
    /// Refusals of requests without valid credentials, counted and aggregated.
    refusals: Arc<RefusalThrottle>,
}

/// Any failure to write the ledger: the request must fail closed (503).
fn unavailable(error: impl std::fmt::Display) -> AppError {
    AppError::LedgerUnavailable(error.to_string())
}

impl LedgerService {
    pub fn new(pool: DbPool, key: Arc<LedgerKey>, options: SequencerOptions) -> Self {
        Self {
            pool,
            key,
            options,
            deferred: None,
            refusals: Arc::new(RefusalThrottle::new(DEFAULT_AUTH_FAILURES_PER_MINUTE)),
        }
    }

    /// A clone whose [`Self::append`]s sign their entries and hold them, without waiting for
    /// them to be durable, and the handle to commit them with [`Self::commit_deferred`]. For
    /// requests whose work runs on a thread that must not wait for a commit (an HTTP worker):
    /// the request awaits the commit instead, and answers only once it is durable.
    pub(crate) fn deferring(&self) -> (Self, DeferredEntries) {
        let deferred = DeferredEntries::default();
        let mut clone = self.clone();
        clone.deferred = Some(deferred.clone());
        (clone, deferred)
    }

    /// Makes the entries held in `deferred` durable (on a blocking thread, sharing a commit
    /// with concurrent writes), without blocking the calling thread. A request whose entries cannot be
    /// committed must fail (503), whatever its work returned.
    pub(crate) async fn commit_deferred(&self, deferred: DeferredEntries) -> Result<(), AppError> {
        let held = std::mem::take(&mut *deferred.0.lock());
        if held.is_empty() {
            return Ok(());
        }
        let pool = self.pool.clone();
        blocking(move || append_durably(&pool, &held)).await
    }

    /// Sets how many requests without valid credentials one client address may have
    /// refused per minute before it is answered 429.
    pub fn with_auth_failure_limit(mut self, per_minute: u32) -> Self {
        self.refusals = Arc::new(RefusalThrottle::new(per_minute));
        self
    }

    pub fn key(&self) -> &LedgerKey {
        &self.key
    }

    /// Signs the entries of `event` and stores them as pending, inside the caller's
    /// transaction (so a write and its entries commit together). Returns the lead receipt.
    pub fn append_in(
        &self,
        conn: &mut DbConnection,
        ctx: &RequestContext,
        event: LedgerEvent,
    ) -> Result<String, AppError> {
        let signed = self.sign_event(ctx, event)?;
        Self::store_in(conn, &signed)
    }

    /// Builds and signs the entries of `event` without storing them: a write signs its
    /// entries before taking the database's write lock, and stores them with
    /// [`Self::store_in`].
    pub(crate) fn sign_event(
        &self,
        ctx: &RequestContext,
        event: LedgerEvent,
    ) -> Result<PendingEntry, AppError> {
        let (entries, signed_at) = self.sign(ctx, event)?;
        Ok(PendingEntry { entries, signed_at })
    }

    /// Stores signed entries as pending inside the caller's transaction. Returns the lead
    /// receipt.
    pub(crate) fn store_in(
        conn: &mut DbConnection,
        pending: &PendingEntry,
    ) -> Result<String, AppError> {
        let PendingEntry { entries, signed_at } = pending;
        let rows: Vec<(&str, &[u8], i64)> = entries
            .iter()
            .map(|e| (e.receipt.as_str(), e.leaf_data.as_slice(), *signed_at))
            .collect();
        rows::insert_entries(conn, &rows).map_err(unavailable)?;
        lead_receipt(entries)
    }

    /// Builds and signs the entries of `event` (see [`LedgerEvent`]): the lead first.
    fn sign(
        &self,
        ctx: &RequestContext,
        event: LedgerEvent,
    ) -> Result<(Vec<SignedEntry>, i64), AppError> {
        let now = now_micros();
        let entries = entries_of(ctx, event, &format_instant(now));
        let signed = entries
            .into_iter()
            .map(|entry| entry.sign(&self.key).map_err(unavailable))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((signed, now))
    }

    /// Records `event` in its own transaction; its entries are durable when this returns.
    /// Sets the request's receipt to the lead entry's.
    ///
    /// Concurrent callers share commits: the store groups them (see [`append_durably`]).
    pub fn append(&self, ctx: &RequestContext, event: LedgerEvent) -> Result<String, AppError> {
        let (signed, now) = self.sign(ctx, event)?;
        let receipt = lead_receipt(&signed)?;
        match &self.deferred {
            Some(deferred) => deferred.0.lock().push((signed, now)),
            None => append_durably(&self.pool, &[(signed, now)])?,
        }
        ctx.receipt.set(receipt.clone());
        Ok(receipt)
    }

    /// Ledgers a refusal by the access policy (durably, before the answer) and returns the
    /// 403 to send.
    pub fn refuse(
        &self,
        ctx: &RequestContext,
        action: Action,
        resources: Vec<EntryResource>,
        refusal: Refusal,
    ) -> AppError {
        let event = LedgerEvent::deny(action, "forbidden")
            .naming(resources)
            .decided_by(refusal.rule);
        match self.append(ctx, event) {
            Ok(_) => refusal.into(),
            Err(error) => error,
        }
    }

    /// Ledger reads beyond the public endpoints need `ledger.read`; a refusal is ledgered.
    pub async fn authorize_read(
        &self,
        ctx: &RequestContext,
        action: Action,
    ) -> Result<(), AppError> {
        match policy::authorize_ledger_read(&ctx.principal) {
            Ok(grant) => {
                ctx.rule.set(grant.rule);
                Ok(())
            }
            Err(refusal) => {
                let (this, ctx) = (self.clone(), ctx.clone());
                Err(blocking(move || Ok(this.refuse(&ctx, action, Vec::new(), refusal))).await?)
            }
        }
    }

    /// Counts a request refused for want of valid credentials (the actor is anonymous: an
    /// unverified token names nobody) into its address's aggregate, and returns the 401 to
    /// send, or 429 once the address is over its limit. The response names the receipt the
    /// aggregate's entry will have; [`Self::flush_refusals`] writes it.
    pub fn refuse_unauthenticated(
        &self,
        ctx: &RequestContext,
        error: AuthError,
        source: Option<std::net::IpAddr>,
    ) -> AppError {
        let counted = self.refusals.count(source, error.reason(), &ctx.request_id);
        if !counted.receipt.is_empty() {
            ctx.receipt.set(counted.receipt);
        }
        match counted.retry_after {
            Some(retry_after) => AppError::TooManyRequests { retry_after },
            None => AppError::Unauthenticated(error),
        }
    }

    /// Ledgers the aggregates of refused unauthenticated requests whose interval is over
    /// (`all`: every one, at shutdown or in tests): one durable entry per address and
    /// reason, with the count. What cannot be written is kept for the next try. Returns how
    /// many entries were written.
    pub fn flush_refusals(&self, all: bool) -> Result<usize, AppError> {
        let due = self.refusals.take_due(all);
        let mut written = 0;
        let mut unwritten = Vec::new();
        let mut failure = None;
        for aggregate in due {
            if failure.is_some() {
                unwritten.push(aggregate);
                continue;
            }
            match self.write_refusal(&aggregate) {
                Ok(()) => written += 1,
                Err(error) => {
                    failure = Some(error);
                    unwritten.push(aggregate);
                }
            }
        }
        self.refusals.restore(unwritten);
        match failure {
            Some(error) => Err(error),
            None => Ok(written),
        }
    }

    /// Ledgers one aggregate in a write of its own (on SQLite a failed turn of a shared
    /// commit is undone alone, leaving the others'). Its receipt was handed out already: when an earlier attempt did
    /// commit after all, the entry is there and this one is done.
    fn write_refusal(&self, aggregate: &Aggregate) -> Result<(), AppError> {
        let ctx = RequestContext {
            principal: crate::access::Principal::Anonymous,
            ..RequestContext::internal(aggregate.first_request.clone())
        };
        let mut event = LedgerEvent::deny(Action::Authenticate, aggregate.reason)
            .decided_by(policy::RULE_AUTHENTICATION);
        event.count = Some(aggregate.count);
        event.source = Some(aggregate.source.clone());
        event.receipt = Some(aggregate.receipt.clone());
        let (entries, signed_at) = self.sign(&ctx, event)?;
        let rows: Vec<(&str, &[u8], i64)> = entries
            .iter()
            .map(|e| (e.receipt.as_str(), e.leaf_data.as_slice(), signed_at))
            .collect();
        match self.pool.write(|tx| rows::insert_entries(tx, &rows)) {
            Ok(()) | Err(StoreError::UniqueViolation) => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }

    /// Sequences every pending entry, one batch (and one checkpoint) per transaction.
    /// Returns how many entries were sequenced.
    pub fn sequence_pending(&self) -> Result<u64, AppError> {
        let mut total = 0;
        loop {
            let sequenced = self.sequence_batch()?;
            total += sequenced;
            if sequenced < u64::try_from(self.options.batch_size).unwrap_or(u64::MAX) {
                return Ok(total);
            }
        }
    }

    /// One batch of the sequencer ([`sequencer::sequence_batch`]) in one transaction under
    /// the sequencer lock, then the patient index of what it sequenced.
    fn sequence_batch(&self) -> Result<u64, AppError> {
        let batch = self.pool.write(|tx| -> Result<_, AppError> {
            if !rows::try_lock_sequencer(tx)? {
                return Ok(None); // another process is sequencing
            }
            let batch = sequencer::sequence_batch(
                &mut TxSequencerStore(tx),
                &self.key,
                usize::try_from(self.options.batch_size).unwrap_or(usize::MAX),
                now_micros(),
            )?;
            index_patients(tx)?;
            Ok(Some(batch))
        })?;
        let Some(batch) = batch else {
            return Ok(0);
        };
        if let (Some(metrics), Some(oldest)) = (crate::metrics::metrics(), batch.oldest_appended) {
            let lag_micros = now_micros().saturating_sub(oldest).max(0);
            metrics
                .sequencer_lag_seconds
                .observe(lag_micros as f64 / 1_000_000.0);
            metrics
                .tree_size
                .set(i64::try_from(batch.tree_size).unwrap_or(i64::MAX));
        }
        Ok(batch.sequenced)
    }

    /// The latest signed checkpoint (signing the empty tree's first if there is none yet).
    pub async fn checkpoint(&self) -> Result<CurrentCheckpoint, AppError> {
        let this = self.clone();
        blocking(move || {
            if let Some(current) = this.latest_checkpoint()? {
                return Ok(current);
            }
            this.sequence_pending()?;
            this.latest_checkpoint()?
                .ok_or_else(|| AppError::Internal("no checkpoint after sequencing".into()))
        })
        .await
    }

    fn latest_checkpoint(&self) -> Result<Option<CurrentCheckpoint>, AppError> {
        let mut conn = self.connection()?;
        let Some(row) = rows::latest_checkpoint(&mut conn)? else {
            return Ok(None);
        };
        let root: [u8; 32] = row
            .root_hash
            .try_into()
            .map_err(|_| AppError::Internal("stored checkpoint root is not 32 bytes".into()))?;
        Ok(Some(CurrentCheckpoint {
            size: to_u64(row.tree_size)?,
            root: Hash(root),
            note: row.note,
        }))
    }

    /// Sequenced entries with `start <= index < end` (bounded to [`MAX_ENTRIES_PAGE`]).
    pub async fn entries(&self, start: u64, end: u64) -> Result<Vec<ServedEntry>, AppError> {
        let this = self.clone();
        blocking(move || {
            let end = end.min(start.saturating_add(MAX_ENTRIES_PAGE as u64));
            let mut conn = this.connection()?;
            Ok(
                rows::entries_range(&mut conn, to_i64(start)?, to_i64(end)?)?
                    .into_iter()
                    .map(ServedEntry::from)
                    .collect(),
            )
        })
        .await
    }

    pub async fn entry_by_receipt(&self, receipt: String) -> Result<ServedEntry, AppError> {
        let this = self.clone();
        blocking(move || {
            let mut conn = this.connection()?;
            rows::entry_by_receipt(&mut conn, &receipt)?
                .map(ServedEntry::from)
                .ok_or_else(|| {
                    AppError::NotFound(format!(
                        "ledger receipt {}",
                        receipt.chars().take(64).collect::<String>()
                    ))
                })
        })
        .await
    }

    pub async fn entry_by_leaf_hash(&self, leaf: Hash) -> Result<ServedEntry, AppError> {
        let this = self.clone();
        blocking(move || {
            let mut conn = this.connection()?;
            rows::entry_by_leaf_hash(&mut conn, &leaf.0)?
                .map(ServedEntry::from)
                .ok_or_else(|| AppError::NotFound("no ledger entry has that leaf hash".into()))
        })
        .await
    }

    /// Audit path of `index` in the tree of `tree_size` (which must not exceed the latest
    /// checkpoint), with the leaf hash.
    pub async fn inclusion_proof(
        &self,
        index: u64,
        tree_size: u64,
    ) -> Result<(Hash, Vec<Hash>), AppError> {
        let this = self.clone();
        blocking(move || {
            this.check_tree_size(tree_size)?;
            if index >= tree_size {
                return Err(out_of_range(format!(
                    "index {index} is not below tree_size {tree_size}"
                )));
            }
            let mut conn = this.connection()?;
            let store = DbHashStore::new(&mut conn);
            let leaf = tree::HashStore::read_hashes(&store, &[tree::stored_hash_index(0, index)])
                .map_err(AppError::from)?;
            let proof = tree::inclusion_proof(&store, tree_size, index).map_err(AppError::from)?;
            Ok((
                leaf.first()
                    .copied()
                    .ok_or_else(|| AppError::Internal("leaf hash missing".into()))?,
                proof,
            ))
        })
        .await
    }

    pub async fn consistency_proof(&self, first: u64, second: u64) -> Result<Vec<Hash>, AppError> {
        let this = self.clone();
        blocking(move || {
            this.check_tree_size(second)?;
            if first > second {
                return Err(out_of_range(format!(
                    "first ({first}) must not exceed second ({second})"
                )));
            }
            let mut conn = this.connection()?;
            tree::consistency_proof(&DbHashStore::new(&mut conn), first, second)
                .map_err(AppError::from)
        })
        .await
    }

    pub async fn tile(&self, tile: TileRef) -> Result<Vec<u8>, AppError> {
        let this = self.clone();
        blocking(move || {
            let size = this.latest_checkpoint()?.map_or(0, |c| c.size);
            let mut conn = this.connection()?;
            tile_data(&DbHashStore::new(&mut conn), tile, size).map_err(|e| match e {
                LedgerError::OutOfRange(message) => AppError::NotFound(message),
                other => AppError::from(other),
            })
        })
        .await
    }

    fn check_tree_size(&self, tree_size: u64) -> Result<(), AppError> {
        let current = self.latest_checkpoint()?.map_or(0, |c| c.size);
        if tree_size > current {
            return Err(out_of_range(format!(
                "tree_size {tree_size} exceeds the latest checkpoint's size {current}"
            )));
        }
        Ok(())
    }

    fn connection(&self) -> Result<crate::store::PooledConnection, AppError> {
        self.pool.get().map_err(AppError::from)
    }
}

/// The sequencer's storage: the ledger tables inside one write transaction.
struct TxSequencerStore<'a>(&'a mut DbConnection);

impl SequencerStore for TxSequencerStore<'_> {
    type Error = AppError;

    fn hashes(&mut self) -> impl HashStore + '_ {
        DbHashStore::new(&mut *self.0)
    }

    fn tree_size(&mut self) -> Result<u64, AppError> {
        to_u64(rows::tree_size(self.0)?)
    }

    fn pending(&mut self, limit: usize) -> Result<Vec<PendingLeaf>, AppError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        Ok(rows::pending_batch(self.0, limit)?
            .into_iter()
            .map(|(key, data, appended_at)| PendingLeaf {
                key,
                data,
                appended_at,
            })
            .collect())
    }

    fn has_checkpoint(&mut self) -> Result<bool, AppError> {
        Ok(rows::latest_checkpoint(self.0)?.is_some())
    }

    fn store_hashes(&mut self, hashes: &[(u64, Hash)]) -> Result<(), AppError> {
        let hashes: Vec<(i64, Vec<u8>)> = hashes
            .iter()
            .map(|(index, hash)| Ok((to_i64(*index)?, hash.0.to_vec())))
            .collect::<Result<_, AppError>>()?;
        Ok(rows::insert_hashes(self.0, &hashes)?)
    }

    fn assign(&mut self, leaves: &[SequencedLeaf], sequenced_at: i64) -> Result<(), AppError> {
        let assignments: Vec<(i64, i64, Vec<u8>)> = leaves
            .iter()
            .map(|leaf| Ok((leaf.key, to_i64(leaf.index.0)?, leaf.hash.0.to_vec())))
            .collect::<Result<_, AppError>>()?;
        Ok(rows::assign_indexes(self.0, &assignments, sequenced_at)?)
    }

    fn store_checkpoint(&mut self, tree: &SignedTree, signed_at: i64) -> Result<(), AppError> {
        rows::insert_checkpoint(
            self.0,
            &CheckpointRow {
                tree_size: to_i64(tree.size)?,
                root_hash: tree.root.0.to_vec(),
                note: tree.note.clone(),
                created_at: signed_at,
            },
        )?;
        Ok(rows::set_tree_size(self.0, to_i64(tree.size)?)?)
    }
}

/// The entries of one event, signed, with when they were signed (µs since the epoch).
type SignedBatch = (Vec<SignedEntry>, i64);

/// Signed entries held by a deferring [`LedgerService`] until the request commits them.
#[derive(Clone, Default)]
pub(crate) struct DeferredEntries(Arc<parking_lot::Mutex<Vec<SignedBatch>>>);

/// Stores signed entries as pending in a write transaction of their own, durable when this
/// returns `Ok`. The store groups concurrent writes into shared commits (SQLite's one writer
/// connection; PostgreSQL's WAL flush), so a durable read costs a fraction of a sync.
fn append_durably(pool: &DbPool, batches: &[SignedBatch]) -> Result<(), AppError> {
    let started = std::time::Instant::now();
    let rows: Vec<(&str, &[u8], i64)> = batches
        .iter()
        .flat_map(|(entries, signed_at)| {
            entries
                .iter()
                .map(|e| (e.receipt.as_str(), e.leaf_data.as_slice(), *signed_at))
        })
        .collect();
    pool.write(|tx| rows::insert_entries(tx, &rows))
        .map_err(unavailable)?;
    if let Some(metrics) = crate::metrics::metrics() {
        metrics
            .ledger_append_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.ledger_append_entries.observe(rows.len() as f64);
    }
    Ok(())
}

/// The entries of an event, lead first (see [`LedgerEvent`]), timed `time`.
fn entries_of(ctx: &RequestContext, event: LedgerEvent, time: &str) -> Vec<LedgerEntry> {
    let patients: Vec<String> = event.patients().into_iter().map(str::to_owned).collect();
    let mut receipt = event.receipt.clone();
    let mut entry = |resources: Vec<EntryResource>, patient: Option<&String>| LedgerEntry {
        v: ENTRY_VERSION,
        // The first entry made is the lead.
        id: receipt
            .take()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
        time: time.to_owned(),
        actor: ctx.principal.ledger_actor(),
        action: event.action.as_str().to_owned(),
        outcome: event.outcome,
        reason: event.reason.map(str::to_owned),
        rule: event.rule.or_else(|| ctx.rule.get()).map(str::to_owned),
        withheld: None,
        resources,
        patient: patient.map(|p| format!("Patient/{p}")),
        patients: Vec::new(),
        parts: Vec::new(),
        part_of: None,
        count: event.count,
        source: event.source.clone(),
        request: ctx.request_id.clone(),
    };
    if patients.len() <= 1 {
        let resources = event.resources.iter().map(|r| r.resource.clone()).collect();
        let mut only = entry(resources, patients.first());
        only.withheld = event.withheld;
        return vec![only];
    }
    let shared = event
        .resources
        .iter()
        .filter(|r| r.patients.is_empty())
        .map(|r| r.resource.clone())
        .collect();
    let mut lead = entry(shared, None);
    lead.withheld = event.withheld;
    let mut parts: Vec<LedgerEntry> = patients
        .iter()
        .map(|patient| {
            // A patient's part names the resources in their compartment and, when the event
            // concerns them (a refusal naming whose record it protected, a `$everything` of
            // theirs), those in no compartment it named too (what a refusal was asked for):
            // each patient sees what was attempted on their record.
            let concerned = event.concerns.contains(patient);
            let theirs = event
                .resources
                .iter()
                .filter(|r| r.patients.contains(patient) || (concerned && r.patients.is_empty()))
                .map(|r| r.resource.clone())
                .collect();
            let mut part = entry(theirs, Some(patient));
            part.part_of = Some(lead.id.clone());
            part
        })
        .collect();
    lead.parts = parts.iter().map(|part| part.id.clone()).collect();
    let mut all = vec![lead];
    all.append(&mut parts);
    all
}

/// The receipt a request returns for the entries of one event: the lead's.
fn lead_receipt(entries: &[SignedEntry]) -> Result<String, AppError> {
    entries
        .first()
        .map(|entry| entry.receipt.clone())
        .ok_or_else(|| AppError::Internal("an event produced no ledger entry".into()))
}

fn out_of_range(message: String) -> AppError {
    AppError::BadRequest {
        message,
        expression: None,
    }
}

fn to_i64(value: u64) -> Result<i64, AppError> {
    i64::try_from(value).map_err(|_| out_of_range(format!("{value} is too large")))
}

fn to_u64(value: i64) -> Result<u64, AppError> {
    u64::try_from(value).map_err(|_| AppError::Internal(format!("negative ledger value {value}")))
}
