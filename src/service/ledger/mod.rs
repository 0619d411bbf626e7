//! Recording interactions in the ledger: signing the entries of an event and appending
//! them, inside a write's own transaction or durably on their own (reads, searches,
//! refusals), and the aggregated refusals of unauthenticated requests. What an event becomes
//! as entries is `event`; running the sequencer is `sequencing`; reading the log back for the
//! ledger API is `log`.

mod event;
mod key_chain;
mod log;
mod sequencing;
mod witnessing;

use std::sync::{Arc, mpsc};

use crate::access::policy::{self, Refusal};
use crate::access::throttle::{Aggregate, RefusalThrottle};
use crate::access::{AuthError, RequestContext};
use crate::clock::now_micros;
use crate::error::AppError;
use crate::fhir::document::format_instant;
use crate::ledger::entry::{EntryResource, SignedEntry};
use crate::ledger::{Action, LedgerKey};
use crate::store::ledger as rows;
use crate::store::{DbConnection, DbPool, StoreError};

use super::blocking;
use event::entries_of;
pub use witnessing::{WitnessEndpoint, WitnessStatus, Witnesses};

pub use event::{LedgerEvent, Touched};
pub use key_chain::{KeyEstablished, list_keys};
pub use log::{CurrentCheckpoint, MAX_ENTRIES_PAGE, ServedEntry};
pub use sequencing::SequencerOptions;

/// Refusals of requests without valid credentials one address may have per minute, unless
/// configured.
pub const DEFAULT_AUTH_FAILURES_PER_MINUTE: u32 = 60;

/// Signed entries not yet stored: what [`LedgerService::store_in`] writes. The first is the
/// lead entry, whose receipt the request returns.
#[derive(Debug, Clone)]
pub struct PendingEntry {
    entries: Vec<SignedEntry>,
    /// When they were signed (µs since the epoch), the pending rows' `created_at`.
    signed_at: i64,
}

#[derive(Clone)]
pub struct LedgerService {
    pool: DbPool,
    key: Arc<LedgerKey>,
    options: SequencerOptions,
    committer: GroupCommitter,
    /// Set on a clone made by [`Self::deferring`]: its appends are signed and held here, and
    /// the request commits them with [`Self::commit_deferred`] before it answers.
    deferred: Option<DeferredEntries>,
    /// Refusals of requests without valid credentials, counted and aggregated.
    refusals: Arc<RefusalThrottle>,
    /// The witnesses checkpoints are submitted to, and what is known of each.
    witnesses: Arc<Witnesses>,
    /// Set once the sequencer found the key retired by a rotation another server made:
    /// nothing is signed with it any more.
    retired: Arc<std::sync::atomic::AtomicBool>,
}

/// Any failure to write the ledger: the request must fail closed (503).
fn unavailable(error: impl std::fmt::Display) -> AppError {
    AppError::LedgerUnavailable(error.to_string())
}

impl LedgerService {
    pub fn new(pool: DbPool, key: Arc<LedgerKey>, options: SequencerOptions) -> Self {
        let committer = GroupCommitter::start(pool.clone());
        Self {
            pool,
            key,
            options,
            committer,
            deferred: None,
            refusals: Arc::new(RefusalThrottle::new(DEFAULT_AUTH_FAILURES_PER_MINUTE)),
            witnesses: Arc::new(Witnesses::new(Vec::new())),
            retired: Arc::default(),
        }
    }

    /// Submits checkpoints to these witnesses (see [`Self::collect_cosignatures`]).
    pub fn with_witnesses(mut self, endpoints: Vec<WitnessEndpoint>) -> Self {
        self.witnesses = Arc::new(Witnesses::new(endpoints));
        self
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

    /// Makes the entries held in `deferred` durable, in the group commit the other requests'
    /// entries share, without blocking the calling thread. A request whose entries cannot be
    /// committed must fail (503), whatever its work returned.
    pub(crate) async fn commit_deferred(&self, deferred: DeferredEntries) -> Result<(), AppError> {
        let held = std::mem::take(&mut *deferred.0.lock());
        if held.is_empty() {
            return Ok(());
        }
        let (done, wait) = tokio::sync::oneshot::channel();
        let (entries, created_at) = merge_held(held);
        self.committer
            .queue(entries, created_at, Done::Async(done))?;
        match wait.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(unavailable("the ledger commit thread stopped")),
        }
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

    /// [`Self::sign_event`] with another key (a rotation's announcement, signed by the
    /// outgoing key).
    fn sign_event_with(
        &self,
        key: &LedgerKey,
        ctx: &RequestContext,
        event: LedgerEvent,
    ) -> Result<PendingEntry, AppError> {
        let signed_at = now_micros();
        let entries = entries_of(ctx, event, &format_instant(signed_at))
            .into_iter()
            .map(|entry| entry.sign(key).map_err(unavailable))
            .collect::<Result<Vec<_>, _>>()?;
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

    /// [`Self::store_in`] of many events' entries at once (a bulk load's batch), in
    /// multi-row INSERTs.
    pub(crate) fn store_many_in<'a>(
        conn: &mut DbConnection,
        pending: impl IntoIterator<Item = &'a PendingEntry>,
    ) -> Result<(), AppError> {
        let rows: Vec<(&str, &[u8], i64)> = pending
            .into_iter()
            .flat_map(|PendingEntry { entries, signed_at }| {
                entries
                    .iter()
                    .map(|e| (e.receipt.as_str(), e.leaf_data.as_slice(), *signed_at))
            })
            .collect();
        rows::insert_entries(conn, &rows).map_err(unavailable)
    }

    /// Builds and signs the entries of `event` (see [`LedgerEvent`]): the lead first.
    fn sign(
        &self,
        ctx: &RequestContext,
        event: LedgerEvent,
    ) -> Result<(Vec<SignedEntry>, i64), AppError> {
        if self.retired.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(key_chain::retired_error());
        }
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
    /// Concurrent callers share transactions (group commit): one thread commits whatever
    /// entries queued while the previous commit was running, so durable reads cost a
    /// fraction of an fsync each. It is the one path standalone entries take to the store;
    /// writing each through [`DbPool::write`] on its own halved reads (see [`GroupCommitter`]).
    pub fn append(&self, ctx: &RequestContext, event: LedgerEvent) -> Result<String, AppError> {
        let (signed, now) = self.sign(ctx, event)?;
        let receipt = lead_receipt(&signed)?;
        let mut batch = Some((signed, now));
        HELD_IN_TRANSACTION.with(|held| {
            if let Some(held) = held.borrow_mut().as_mut() {
                held.extend(batch.take());
            }
        });
        match (batch, &self.deferred) {
            (None, _) => {}
            (Some(batch), Some(deferred)) => deferred.0.lock().push(batch),
            (Some((signed, now)), None) => self.committer.commit(signed, now)?,
        }
        ctx.receipt.set(receipt.clone());
        Ok(receipt)
    }

    /// Runs `transaction` (work in a write transaction) holding the entries that
    /// [`Self::append`] makes on this thread meanwhile, and commits them once it is over:
    /// the group commit queues for the one writer, which on SQLite the transaction holds,
    /// so committing them from inside it would wait for ever. (A refusal found inside a
    /// write did: a Subscription updated with criteria its writer may not search.) Nested,
    /// the inner run's entries wait for the outer one's end.
    pub(crate) fn holding<T>(&self, transaction: impl FnOnce() -> T) -> Result<T, AppError> {
        struct Restore(Option<Vec<SignedBatch>>);
        impl Drop for Restore {
            // Also when `transaction` panics: this thread must not go on holding entries.
            fn drop(&mut self) {
                let outer = self.0.take();
                HELD_IN_TRANSACTION.with(|held| {
                    let inner = std::mem::replace(&mut *held.borrow_mut(), outer);
                    if let (Some(inner), Some(outer)) = (inner, held.borrow_mut().as_mut()) {
                        outer.extend(inner);
                    }
                });
            }
        }
        let outer = HELD_IN_TRANSACTION.with(|held| held.borrow_mut().replace(Vec::new()));
        let nested = outer.is_some();
        let restore = Restore(outer);
        let result = transaction();
        let held = if nested {
            Vec::new()
        } else {
            HELD_IN_TRANSACTION.with(|held| held.borrow_mut().take().unwrap_or_default())
        };
        drop(restore);
        if !held.is_empty() {
            let (entries, created_at) = merge_held(held);
            self.committer.commit(entries, created_at)?;
        }
        Ok(result)
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

    /// Ledgers one aggregate in a transaction of its own (never in a group commit shared
    /// with requests). Its receipt was handed out already: when an earlier attempt did
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
}

/// Most entries one group commit carries.
const MAX_GROUP: usize = 1024;

/// The entries of one event, signed, with when they were signed (µs since the epoch).
type SignedBatch = (Vec<SignedEntry>, i64);

thread_local! {
    /// The entries appended on this thread inside [`LedgerService::holding`], if it is in
    /// one.
    static HELD_IN_TRANSACTION: std::cell::RefCell<Option<Vec<SignedBatch>>> =
        const { std::cell::RefCell::new(None) };
}

/// Signed entries held by a deferring [`LedgerService`] until the request commits them.
#[derive(Clone, Default)]
pub(crate) struct DeferredEntries(Arc<parking_lot::Mutex<Vec<SignedBatch>>>);

/// One commit job's entries from what a request held; they share the earliest signing time.
fn merge_held(held: Vec<SignedBatch>) -> SignedBatch {
    let created_at = held
        .iter()
        .map(|(_, at)| *at)
        .min()
        .unwrap_or_else(now_micros);
    let entries = held.into_iter().flat_map(|(entries, _)| entries).collect();
    (entries, created_at)
}

/// Whom to tell how a job's group commit went: a thread blocked on it, or a task awaiting it.
enum Done {
    Blocking(mpsc::SyncSender<Result<(), String>>),
    Async(tokio::sync::oneshot::Sender<Result<(), String>>),
}

impl Done {
    fn send(self, outcome: Result<(), String>) {
        // The caller may have gone away; nothing to tell it then.
        let _ = match self {
            Self::Blocking(sender) => sender.send(outcome).map_err(drop),
            Self::Async(sender) => sender.send(outcome).map_err(drop),
        };
    }
}

struct CommitJob {
    entries: Vec<SignedEntry>,
    created_at: i64,
    done: Done,
}

/// The thread that commits standalone entries in groups: one multi-row INSERT per group,
/// through [`DbPool::write`] (on SQLite, one turn of the writer connection, which may share
/// its commit with writes queued behind it).
///
/// Measured against sending each request's entries through `DbPool::write` directly (the
/// store's writer grouping their commits on SQLite, PostgreSQL's WAL flush on PostgreSQL),
/// release builds, bench `run_all.sh` at 10 s: reads by id 6,660 → 4,216/s on SQLite and
/// 3,763 → 2,003/s on PostgreSQL. A turn of the writer costs a hand-off between threads per
/// request; this thread pays one per group. It ends when the last
/// [`LedgerService`] clone holding its queue is dropped.
#[derive(Clone)]
struct GroupCommitter {
    queue: mpsc::Sender<CommitJob>,
}

impl GroupCommitter {
    fn start(pool: DbPool) -> Self {
        let (queue, jobs) = mpsc::channel::<CommitJob>();
        std::thread::Builder::new()
            .name("ledger-commit".into())
            .spawn(move || {
                while let Ok(first) = jobs.recv() {
                    let mut group = vec![first];
                    while group.len() < MAX_GROUP {
                        match jobs.try_recv() {
                            Ok(job) => group.push(job),
                            Err(_) => break,
                        }
                    }
                    let started = std::time::Instant::now();
                    let outcome = Self::commit_group(&pool, &group).map_err(|e| e.to_string());
                    if let Some(metrics) = crate::metrics::metrics() {
                        metrics
                            .group_commit_seconds
                            .observe(started.elapsed().as_secs_f64());
                        let entries: usize = group.iter().map(|job| job.entries.len()).sum();
                        metrics.group_commit_entries.observe(entries as f64);
                    }
                    for job in group {
                        job.done.send(outcome.clone());
                    }
                }
            })
            .map(|_| ())
            .unwrap_or_else(
                |e| tracing::error!(error = %e, "cannot start the ledger commit thread"),
            );
        Self { queue }
    }

    fn commit_group(pool: &DbPool, group: &[CommitJob]) -> Result<(), StoreError> {
        let rows: Vec<(&str, &[u8], i64)> = group
            .iter()
            .flat_map(|job| {
                job.entries
                    .iter()
                    .map(|e| (e.receipt.as_str(), e.leaf_data.as_slice(), job.created_at))
            })
            .collect();
        pool.write(|tx| rows::insert_entries(tx, &rows))
    }

    /// Queues the entries for the next group commit; `done` is told how it went.
    fn queue(
        &self,
        entries: Vec<SignedEntry>,
        created_at: i64,
        done: Done,
    ) -> Result<(), AppError> {
        self.queue
            .send(CommitJob {
                entries,
                created_at,
                done,
            })
            .map_err(|_| unavailable("the ledger commit thread is not running"))
    }

    /// Queues the entries and waits until their group is committed.
    fn commit(&self, entries: Vec<SignedEntry>, created_at: i64) -> Result<(), AppError> {
        let (done, wait) = mpsc::sync_channel(1);
        self.queue(entries, created_at, Done::Blocking(done))?;
        match wait.recv() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(unavailable(error)),
            Err(_) => Err(unavailable("the ledger commit thread stopped")),
        }
    }
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
