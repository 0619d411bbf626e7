//! The one connection every SQLite write transaction of this process runs on, and group
//! commit over it.
//!
//! SQLite has one writer at a time, so nothing is lost by writing through one connection, and
//! much is gained: a connection drops its whole page cache when it sees that another
//! connection committed, so writers taking turns on pooled connections each started cold and
//! re-read, through the WAL, the index pages the previous one had just written.
//!
//! Group commit: when other writers are already queued as a turn ends, its transaction is
//! left open and the next turn continues it (each later turn in a savepoint of its own), and one
//! COMMIT makes them all durable. A commit writes every page the transaction dirtied to the
//! WAL and syncs it; the blind-index pages that consecutive transactions share (the tail of
//! each frequent digest, the B-trees' upper levels) and the sync are then paid once per group.
//! A turn whose work succeeded returns only after its group's COMMIT did; one whose work
//! failed was rolled back (to its savepoint, or wholly if it came first) and returns at once. Turns are taken in FIFO
//! order (SQLite's own lock waits by polling with growing sleeps, so a busy writer could
//! starve another, e.g. the ledger sequencer, for seconds).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use diesel::QueryResult;
use diesel::connection::{SimpleConnection as _, TransactionManager as _};
use parking_lot::{Condvar, FairMutex, Mutex};

use super::database::{DatabaseUrl, DbConnection, establish, in_transaction};
use super::error::StoreError;

type Manager = <DbConnection as diesel::Connection>::TransactionManager;

/// Most turns one group carries.
const MAX_GROUP_TURNS: usize = 64;
/// A group is committed once it has been open this long, even with writers still queued:
/// it bounds how long the first turn waits for the others.
const MAX_GROUP_AGE: Duration = Duration::from_millis(100);

/// How often the checkpointer copies what the WAL holds back into the database file.
const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

pub(super) struct SqliteWriter {
    url: DatabaseUrl,
    /// Writers queued for a turn.
    queued: AtomicUsize,
    turn: FairMutex<Turn>,
}

/// What the writer whose turn it is owns.
#[derive(Default)]
struct Turn {
    /// Opened on first use, and again after a transaction left it unusable.
    conn: Option<DbConnection>,
    /// The transaction earlier turns left open for this one.
    group: Option<OpenGroup>,
}

impl Turn {
    fn conn(&mut self) -> Result<&mut DbConnection, StoreError> {
        self.conn
            .as_mut()
            .ok_or_else(|| StoreError::Unavailable("no SQLite writer connection".into()))
    }
}

struct OpenGroup {
    commit: Arc<GroupCommit>,
    started: Instant,
    turns: usize,
}

/// How a group's commit ended, for the turns waiting on it.
#[derive(Default)]
struct GroupCommit {
    outcome: Mutex<Option<Result<(), String>>>,
    done: Condvar,
}

impl GroupCommit {
    fn finish(&self, outcome: Result<(), String>) {
        *self.outcome.lock() = Some(outcome);
        self.done.notify_all();
    }

    fn wait(&self) -> Result<(), String> {
        let mut outcome = self.outcome.lock();
        loop {
            if let Some(outcome) = outcome.as_ref() {
                return outcome.clone();
            }
            self.done.wait(&mut outcome);
        }
    }
}

impl SqliteWriter {
    pub(super) fn new(url: DatabaseUrl) -> Self {
        Self {
            url,
            queued: AtomicUsize::new(0),
            turn: FairMutex::new(Turn::default()),
        }
    }

    /// Runs `work` in a transaction that writes, made durable before this returns `Ok`.
    pub(super) fn write<T, E>(
        &self,
        work: impl FnOnce(&mut DbConnection) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let mut turn = self.turn.lock();
        self.queued.fetch_sub(1, Ordering::SeqCst);
        self.open_group(&mut turn)?;
        let first = turn.group.as_ref().is_some_and(|group| group.turns == 0);
        let result = if first {
            // Alone in the group's transaction: a failure rolls all of it back. No savepoint,
            // for SQLite copies each page a savepoint's work changes into a journal of its own.
            work(turn.conn()?)
        } else {
            // A savepoint inside the group's transaction: a failure undoes this turn only.
            in_transaction(turn.conn()?, work)
        };
        if first && result.is_err() {
            Self::roll_back(&mut turn);
            return result;
        }
        let still_in_group = in_group_transaction(turn.conn()?);
        let Some(group) = turn.group.as_mut() else {
            return Err(StoreError::Unavailable("the write group vanished".into()).into());
        };
        group.turns += 1;
        if !still_in_group {
            // The savepoint could not be released or rolled back: nothing of the group can
            // be trusted any more.
            let message = "a write transaction failed and was rolled back".to_owned();
            Self::abandon(&mut turn, message.clone());
            return result.and(Err(StoreError::Unavailable(message).into()));
        }
        let others_queued = self.queued.load(Ordering::SeqCst) > 0;
        let keep_open = others_queued
            && group.turns < MAX_GROUP_TURNS
            && group.started.elapsed() < MAX_GROUP_AGE;
        let value = match result {
            Ok(value) => value,
            Err(error) => {
                if !keep_open {
                    // This turn wrote nothing; earlier turns still need their commit.
                    let _ = Self::commit(&mut turn);
                }
                return Err(error);
            }
        };
        let outcome = if keep_open {
            let commit = Arc::clone(&group.commit);
            drop(turn);
            commit.wait()
        } else {
            Self::commit(&mut turn)
        };
        outcome
            .map(|()| value)
            .map_err(|message| StoreError::Unavailable(message).into())
    }

    /// Makes sure the writer connection is inside a group transaction: the one earlier turns
    /// left open, or a new one (which takes SQLite's write lock at once).
    fn open_group(&self, turn: &mut Turn) -> Result<(), StoreError> {
        if turn.group.is_none() {
            let usable = turn
                .conn
                .as_mut()
                .is_some_and(|conn| !Manager::is_broken_transaction_manager(conn));
            if !usable {
                turn.conn = None;
                turn.conn = Some(establish(&self.url).map_err(|e| {
                    StoreError::Unavailable(format!(
                        "cannot open the SQLite writer connection: {e}"
                    ))
                })?);
            }
            begin_writing(turn.conn()?).map_err(StoreError::classify)?;
            turn.group = Some(OpenGroup {
                commit: Arc::default(),
                started: Instant::now(),
                turns: 0,
            });
        }
        Ok(())
    }

    /// Commits the open group and tells its waiting turns how that went.
    fn commit(turn: &mut Turn) -> Result<(), String> {
        let Some(group) = turn.group.take() else {
            return Ok(());
        };
        let outcome = match turn.conn.as_mut() {
            Some(conn) => {
                Manager::commit_transaction(conn).map_err(|e| format!("commit failed: {e}"))
            }
            None => Err("the SQLite writer connection was lost".to_owned()),
        };
        if outcome.is_err() {
            // diesel has rolled back what it could; start the next group on a fresh
            // connection.
            turn.conn = None;
        }
        group.commit.finish(outcome.clone());
        outcome
    }

    /// Rolls back a group that holds only the failed work of its first turn; nobody waits on
    /// it. The connection is kept unless the rollback failed.
    fn roll_back(turn: &mut Turn) {
        turn.group = None;
        let rolled_back = turn
            .conn
            .as_mut()
            .is_some_and(|conn| Manager::rollback_transaction(conn).is_ok());
        if !rolled_back {
            turn.conn = None;
        }
    }

    /// Rolls the open group back and fails its waiting turns; the next group starts on a
    /// fresh connection.
    fn abandon(turn: &mut Turn, message: String) {
        let group = turn.group.take();
        Self::roll_back(turn);
        turn.conn = None;
        if let Some(group) = group {
            group.commit.finish(Err(message));
        }
    }
}

/// Runs passive checkpoints on a connection and thread of their own, every
/// [`CHECKPOINT_INTERVAL`], until `writer` is dropped.
///
/// Left to SQLite, a checkpoint runs inside the commit that finds the WAL past its threshold:
/// that commit, and every request whose ledger entry waits on it, stalls while the WAL's
/// pages are copied into the database file and it is synced. A passive checkpoint takes no
/// lock a writer or reader waits on, so this one copies most frames in the background; the
/// commit that passes the threshold (see `establish`) then has only the last few to copy
/// before the WAL starts over from its beginning (which only a checkpoint that sees no new
/// frames arrive can allow: under steady writes, never a background one).
pub(super) fn spawn_checkpointer(writer: &Arc<SqliteWriter>) {
    let alive = Arc::downgrade(writer);
    let url = writer.url.clone();
    let spawned = std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            let mut conn: Option<DbConnection> = None;
            loop {
                std::thread::sleep(CHECKPOINT_INTERVAL);
                if alive.strong_count() == 0 {
                    return;
                }
                if conn.is_none() {
                    conn = establish(&url).ok();
                }
                if let Some(open) = conn.as_mut()
                    && let Err(error) = open.batch_execute("PRAGMA wal_checkpoint(PASSIVE)")
                {
                    tracing::warn!(%error, "SQLite checkpoint failed; retrying");
                    conn = None;
                }
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot start the SQLite checkpointer; SQLite checkpoints on commit");
    }
}

/// BEGIN, then a write statement that changes nothing: it takes SQLite's write lock now. A
/// deferred transaction that reads first and writes later would fail with SQLITE_BUSY,
/// instead of waiting, when another process wrote in between.
fn begin_writing(conn: &mut DbConnection) -> QueryResult<()> {
    Manager::begin_transaction(conn)?;
    if let Err(error) = conn.batch_execute("DELETE FROM resources WHERE 0") {
        let _ = Manager::rollback_transaction(conn);
        return Err(error);
    }
    Ok(())
}

/// Whether `conn` is back in the group's own transaction, with no savepoint left open and no
/// error recorded.
fn in_group_transaction(conn: &mut DbConnection) -> bool {
    Manager::transaction_manager_status_mut(conn)
        .transaction_depth()
        .is_ok_and(|depth| depth.is_some_and(|d| d.get() == 1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

    use diesel::RunQueryDsl as _;
    use diesel::sql_types::BigInt;

    use super::*;

    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }

    fn count(conn: &mut DbConnection, sql: &str) -> i64 {
        diesel::sql_query(sql).get_result::<Count>(conn).unwrap().n
    }

    /// Many writers at once, so that turns share commits: every write that succeeded is
    /// committed (seen by another connection), every one that failed left nothing, and a
    /// failure does not undo the other turns of its group.
    #[test]
    fn concurrent_writes_commit_exactly_the_successful_ones() {
        let dir = tempfile::tempdir().unwrap();
        let url = DatabaseUrl::sqlite_file(&dir.path().join("writer.db"));
        let mut setup = establish(&url).unwrap();
        setup
            .batch_execute(
                "CREATE TABLE resources (n BIGINT NOT NULL); CREATE TABLE t (n BIGINT NOT NULL)",
            )
            .unwrap();
        let writer = SqliteWriter::new(url.clone());
        const THREADS: i64 = 12;
        const WRITES: i64 = 40;
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let writer = &writer;
                scope.spawn(move || {
                    for i in 0..WRITES {
                        let n = thread * WRITES + i;
                        let result = writer.write(|conn| {
                            diesel::sql_query("INSERT INTO t (n) VALUES (?)")
                                .bind::<BigInt, _>(n)
                                .execute(conn)?;
                            if n % 7 == 0 {
                                return Err(StoreError::Unavailable("refused".into()));
                            }
                            Ok(n)
                        });
                        match result {
                            Ok(written) => assert_eq!(written, n),
                            Err(StoreError::Unavailable(message)) => {
                                assert_eq!(message, "refused");
                                assert_eq!(n % 7, 0, "only refused writes fail");
                            }
                            Err(other) => panic!("write {n} failed: {other}"),
                        }
                    }
                });
            }
        });
        let total = THREADS * WRITES;
        let refused = (0..total).filter(|n| n % 7 == 0).count() as i64;
        let mut reader = establish(&url).unwrap();
        assert_eq!(
            count(&mut reader, "SELECT COUNT(*) AS n FROM t"),
            total - refused
        );
        assert_eq!(
            count(&mut reader, "SELECT COUNT(*) AS n FROM t WHERE n % 7 = 0"),
            0
        );
    }
}
