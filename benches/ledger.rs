//! Ledger benchmarks (a bench binary, not timed tests): `cargo bench --bench ledger`.
//!
//! - durable appends per second (signed entry inserted and committed), one entry per
//!   transaction as on the request path, and batched;
//! - sequencing rate (entries per second taken into the tree and checkpointed);
//! - checkpoint latency under load: time from an entry being durable to a checkpoint
//!   covering it, with writers running and the sequencer on its default interval;
//! - inclusion and consistency proof time at `FHIRLEDGER_BENCH_PROOF_ENTRIES` entries
//!   (default 1,000,000), read from the database.
//!
//! SQLite always; PostgreSQL too when `FHIRLEDGER_BENCH_DATABASE_URL` names a server whose
//! user may create databases (a scratch database is created and dropped).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "benchmark harness"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use diesel::{Connection as _, RunQueryDsl as _};
use fhirledger::access::RequestContext;
use fhirledger::ledger::entry::EntryResource;
use fhirledger::ledger::tree;
use fhirledger::ledger::{Action, LedgerKey};
use fhirledger::service::ledger::{LedgerEvent, LedgerService, SequencerOptions};
use fhirledger::store::ledger::DbHashStore;
use fhirledger::store::{DatabaseUrl, DbPool, connection, migrations};
use rand::Rng as _;

fn event(i: u64) -> LedgerEvent {
    let read = EntryResource {
        resource_type: "Patient".into(),
        id: format!("bench-{i}"),
        version_id: Some("1".into()),
        content_hash: None,
    };
    LedgerEvent::permit(Action::Read).touching(read, Some([format!("bench-{i}")].into()))
}

fn open(url: &DatabaseUrl) -> (DbPool, LedgerService) {
    let pool = connection::build_pool(url, 8).unwrap();
    migrations::run_pending(&mut pool.get().unwrap()).unwrap();
    let key = Arc::new(LedgerKey::generate("bench/ledger").unwrap());
    let ledger = LedgerService::new(pool.clone(), key, SequencerOptions { batch_size: 4096 });
    (pool, ledger)
}

/// Appends `total` entries from `threads` threads, `per_tx` per transaction; entries/s.
fn append_rate(
    pool: &DbPool,
    ledger: &LedgerService,
    total: u64,
    threads: u64,
    per_tx: u64,
) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for t in 0..threads {
            scope.spawn(move || {
                let ctx = RequestContext::internal(format!("bench-{t}"));
                let mine = total / threads;
                let mut done = 0;
                while done < mine {
                    let n = per_tx.min(mine - done);
                    pool.write(|tx| {
                        for i in 0..n {
                            ledger.append_in(tx, &ctx, event(done + i)).unwrap();
                        }
                        Ok::<_, fhirledger::store::StoreError>(())
                    })
                    .unwrap();
                    done += n;
                }
            });
        }
    });
    total as f64 / started.elapsed().as_secs_f64()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

#[derive(diesel::QueryableByName)]
struct Lag {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    lag: i64,
}

/// Writers append one entry per transaction for `duration` while the sequencer runs every
/// `interval`; returns (entries, p50 ms, p99 ms, max ms) of durable → checkpointed.
fn checkpoint_latency(
    pool: &DbPool,
    ledger: &LedgerService,
    duration: Duration,
    interval: Duration,
) -> (usize, f64, f64, f64) {
    let mut conn = pool.get().unwrap();
    diesel::sql_query("DELETE FROM ledger_entries WHERE leaf_index IS NULL")
        .execute(&mut *conn)
        .unwrap();
    let since: i64 = chrono_now();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let stop = &stop;
        scope.spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let tick = Instant::now();
                ledger.sequence_pending().unwrap();
                std::thread::sleep(interval.saturating_sub(tick.elapsed()));
            }
            ledger.sequence_pending().unwrap();
        });
        let writers: Vec<_> = (0..2)
            .map(|t| {
                scope.spawn(move || {
                    let ctx = RequestContext::internal(format!("load-{t}"));
                    let started = Instant::now();
                    let mut i = 0;
                    while started.elapsed() < duration {
                        pool.write(|tx| {
                            ledger.append_in(tx, &ctx, event(i)).unwrap();
                            Ok::<_, fhirledger::store::StoreError>(())
                        })
                        .unwrap();
                        i += 1;
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let lags: Vec<Lag> = diesel::sql_query(format!(
        "SELECT sequenced_at - created_at AS lag FROM ledger_entries WHERE created_at >= {since} AND sequenced_at IS NOT NULL"
    ))
    .load(&mut *conn)
    .unwrap();
    let mut ms: Vec<f64> = lags.iter().map(|l| l.lag as f64 / 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    (
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN),
    )
}

fn chrono_now() -> i64 {
    fhirledger::clock::now_micros()
}

fn proofs(pool: &DbPool, ledger: &LedgerService, entries: u64) {
    let started = Instant::now();
    let have: i64 = {
        let mut conn = pool.get().unwrap();
        fhirledger::store::ledger::tree_size(&mut conn).unwrap()
    };
    let missing = entries.saturating_sub(have as u64);
    let rate = append_rate(pool, ledger, missing, 2, 1000);
    let sequence_started = Instant::now();
    ledger.sequence_pending().unwrap();
    println!(
        "  filled to {entries} entries in {:.1} s (append {rate:.0}/s, sequencing {:.1} s)",
        started.elapsed().as_secs_f64(),
        sequence_started.elapsed().as_secs_f64()
    );
    let mut conn = pool.get().unwrap();
    let size = fhirledger::store::ledger::tree_size(&mut conn).unwrap() as u64;
    let store = DbHashStore::new(&mut conn);
    let mut rng = rand::thread_rng();
    let root = tree::root(&store, size).unwrap();
    let mut inclusion = Vec::new();
    let mut consistency = Vec::new();
    for _ in 0..5000 {
        let index = rng.gen_range(0..size);
        let t = Instant::now();
        let proof = tree::inclusion_proof(&store, size, index).unwrap();
        inclusion.push(t.elapsed().as_secs_f64() * 1000.0);
        let leaf =
            tree::HashStore::read_hashes(&store, &[tree::stored_hash_index(0, index)]).unwrap()[0];
        tree::verify_inclusion(&proof, size, root, index, leaf).unwrap();

        let first = rng.gen_range(1..size);
        let t = Instant::now();
        tree::consistency_proof(&store, first, size).unwrap();
        consistency.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    inclusion.sort_by(f64::total_cmp);
    consistency.sort_by(f64::total_cmp);
    println!(
        "  inclusion proof at {size}: p50 {:.3} ms, p99 {:.3} ms; consistency proof: p50 {:.3} ms, p99 {:.3} ms (5000 each, from the database)",
        percentile(&inclusion, 50.0),
        percentile(&inclusion, 99.0),
        percentile(&consistency, 50.0),
        percentile(&consistency, 99.0)
    );
}

fn run(name: &str, url: &DatabaseUrl, proof_entries: u64) {
    println!("{name}:");
    let (pool, ledger) = open(url);
    for (threads, per_tx) in [(1, 1), (2, 1), (2, 64), (2, 1000)] {
        let total = if per_tx == 1 { 4000 } else { 40_000 };
        let rate = append_rate(&pool, &ledger, total, threads, per_tx);
        println!(
            "  durable appends, {threads} thread(s), {per_tx} per transaction: {rate:.0} entries/s"
        );
    }
    let pending: i64 = {
        let mut conn = pool.get().unwrap();
        fhirledger::store::ledger::pending_entries(&mut conn)
            .unwrap()
            .len() as i64
    };
    let started = Instant::now();
    ledger.sequence_pending().unwrap();
    println!(
        "  sequencing: {:.0} entries/s ({pending} entries)",
        pending as f64 / started.elapsed().as_secs_f64()
    );
    let (n, p50, p99, max) = checkpoint_latency(
        &pool,
        &ledger,
        Duration::from_secs(10),
        Duration::from_millis(200),
    );
    println!(
        "  checkpoint latency under load (2 writers, 200 ms interval, {n} entries): p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    );
    if proof_entries > 0 {
        proofs(&pool, &ledger, proof_entries);
    }
}

fn main() {
    let proof_entries: u64 = std::env::var("FHIRLEDGER_BENCH_PROOF_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let dir = tempfile::tempdir().unwrap();
    run(
        "SQLite",
        &DatabaseUrl::sqlite_file(&dir.path().join("bench.db")),
        proof_entries,
    );

    if let Ok(admin) = std::env::var("FHIRLEDGER_BENCH_DATABASE_URL") {
        let name = format!("fhirledger_bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = diesel::PgConnection::establish(&admin).unwrap();
        diesel::sql_query(format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .unwrap();
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => panic!("FHIRLEDGER_BENCH_DATABASE_URL must end with /<database>"),
        };
        run(
            "PostgreSQL",
            &DatabaseUrl::parse(&url).unwrap(),
            proof_entries,
        );
        diesel::sql_query(format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&mut conn)
            .unwrap();
    } else {
        println!("PostgreSQL: skipped (set FHIRLEDGER_BENCH_DATABASE_URL)");
    }
}
