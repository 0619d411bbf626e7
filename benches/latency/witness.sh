#!/usr/bin/env bash
# Checkpoint-to-cosigned latency: a log (SQLite, the given binary) and two local witnesses under
# ../shared/bench's create_patient workload (wrk -t2 -c32 -d30s). For each checkpoint, the time
# from its signing to the first cosignature of it or of a later checkpoint, per witness.
# Usage: benches/latency/witness.sh BINARY OUTDIR   (WDIR=dir puts the witnesses' state there)
set -euo pipefail
bin=$(realpath "$1"); out=$2
bench="$(cd "$(dirname "$0")/../../.." && pwd)/shared/bench"
rm -rf "$out"; mkdir -p "$out/srv"; cd "$out"
port=18480; w1=18491; w2=18492
wdir=${WDIR:-$PWD}
"$bin" witness --name w1.example/w --dir "$wdir/w1" --print-vkey > w1.vkey
"$bin" witness --name w2.example/w --dir "$wdir/w2" --print-vkey > w2.vkey
cd srv
export FHIRLEDGER_LISTEN=127.0.0.1:$port
# A first start makes the log's key.
"$bin" serve > ../serve0.log 2>&1 & pid=$!
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.2; done
log_vkey=$(curl -s "http://127.0.0.1:$port/ledger/key" | jq -r .vkey)
kill $pid; wait $pid || true
cd ..
"$bin" witness --name w1.example/w --dir "$wdir/w1" --log "$log_vkey" --listen 127.0.0.1:$w1 > w1.log 2>&1 & p1=$!
"$bin" witness --name w2.example/w --dir "$wdir/w2" --log "$log_vkey" --listen 127.0.0.1:$w2 > w2.log 2>&1 & p2=$!
sleep 1
cd srv
FHIRLEDGER_WITNESSES="$(cat ../w1.vkey)@http://127.0.0.1:$w1,$(cat ../w2.vkey)@http://127.0.0.1:$w2" \
    "$bin" serve > ../serve.log 2>&1 & pid=$!
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.2; done
token=$("$bin" token --sub bench --scope 'system/*.cruds' --ttl 86400)
cd ..
BENCH_TOKEN=$token wrk -t2 -c32 -d30s --latency -s "$bench/create_patient.lua" "http://127.0.0.1:$port/fhir" > wrk.txt
sleep 3
kill $pid; wait $pid || true
kill $p1 $p2; wait || true
python3 - srv/data/fhirledger.db <<'PY'
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
checkpoints = db.execute("SELECT tree_size, created_at FROM ledger_checkpoints ORDER BY tree_size").fetchall()
for (witness,) in db.execute("SELECT DISTINCT witness FROM ledger_cosignatures"):
    cosigned = db.execute(
        "SELECT tree_size, received_at FROM ledger_cosignatures WHERE witness = ? ORDER BY tree_size", (witness,)
    ).fetchall()
    latencies, j = [], 0
    for size, signed in checkpoints:
        while j < len(cosigned) and cosigned[j][0] < size:
            j += 1
        if j < len(cosigned):
            latencies.append((cosigned[j][1] - signed) / 1000.0)
    latencies.sort()
    q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]
    print(f"{witness}: {len(latencies)} checkpoints, p50 {q(0.5):.0f} ms, p90 {q(0.9):.0f} ms, "
          f"p99 {q(0.99):.0f} ms, max {latencies[-1]:.0f} ms")
PY
grep BENCH_RESULT wrk.txt
