#!/usr/bin/env bash
# Bulk data benchmark: `fhirledger import` of Synthea's bulk sample grown to ~100,000
# resources (grow_synthea.py), then `$export` of everything from a server on that database
# (resources/s written, with read latency measured by wrk while it runs), then the round trip:
# the exported files imported into a fresh database and exported again must give the same
# resources. Prints one line per figure.
#
# usage: benches/bulk/run.sh sqlite|postgres [COPIES]
#   FHIRLEDGER_BIN     the binary (default: target/release/fhirledger, built if missing)
#   BULK_DIR           where the grown data set is kept (default: /tmp/fhirledger-bulk-COPIES)
#   PG_ADMIN_URL       PostgreSQL server to create the benchmark's databases in
#                      (default postgres://postgres@127.0.0.1:5432/postgres)
set -euo pipefail
backend=${1:?usage: run.sh sqlite|postgres [COPIES]}
copies=${2:-130}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
fixtures="$repo/../shared/fixtures/fhir/synthea/bulk-ndjson"
bin=${FHIRLEDGER_BIN:-$repo/target/release/fhirledger}
[[ -x $bin ]] || (cd "$repo" && cargo build --release --locked)
data=${BULK_DIR:-/tmp/fhirledger-bulk-$copies}
[[ -d $data ]] || python3 "$here/grow_synthea.py" "$fixtures" "$data" "$copies"
lines=$(cat "$data"/*.ndjson | grep -c .)
admin=${PG_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
work=$(mktemp -d)
server=
cleanup() {
    [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# A fresh database (and data directory, with keys) named $1; prints the environment for it.
fresh() {
    local dir="$work/$1"
    mkdir -p "$dir"
    echo "FHIRLEDGER_DATA_DIR=$dir"
    if [[ $backend == postgres ]]; then
        local db="fhirledger_bulk_$1_$$"
        psql -q "$admin" -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null
        echo "FHIRLEDGER_DATABASE_URL=${admin%/*}/$db"
        for key in master ledger index; do
            head -c 32 /dev/urandom | base64 > "$dir/$key.key"
            echo "FHIRLEDGER_${key^^}_KEY_FILE=$dir/$key.key"
        done
    fi
}

# Imports $2… into the database of environment $1; prints resources/s.
import() {
    local env_file=$1; shift
    env $(cat "$env_file") FHIRLEDGER_LOG=warn "$bin" import "$@" | tee "$work/import.out" >&2
    awk '{for (i = 1; i <= NF; i++) if ($i == "resources/s);") print substr($(i - 1), 2)}' "$work/import.out"
}

# Serves the database of environment $1 on a free port; sets $port, $server and $token.
serve() {
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    env $(cat "$1") FHIRLEDGER_LISTEN=127.0.0.1:$port FHIRLEDGER_LOG=warn "$bin" serve >"$work/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.2; done
    token=$(env $(cat "$1") FHIRLEDGER_LISTEN=127.0.0.1:$port "$bin" token --sub bench --scope 'system/*.rs')
}

stop() {
    kill "$server" && wait "$server" 2>/dev/null || true
    server=
}

# Exports everything into directory $1; prints resources/s (kick-off to the manifest).
export_all() {
    local out=$1 started status code
    mkdir -p "$out"
    started=$(date +%s.%N)
    status=$(curl -sS -o /dev/null -D - -H "Authorization: Bearer $token" -H 'Prefer: respond-async' \
        "http://127.0.0.1:$port/fhir/\$export" | tr -d '\r' | awk 'tolower($1) == "content-location:" {print $2}')
    while :; do
        code=$(curl -sS -o "$work/manifest.json" -w '%{http_code}' -H "Authorization: Bearer $token" "$status")
        [[ $code == 202 ]] || break
        sleep 0.2
    done
    [[ $code == 200 ]] || { echo "export failed: $code $(cat "$work/manifest.json")" >&2; exit 1; }
    local finished count
    finished=$(date +%s.%N)
    count=$(jq '[.output[].count] | add' "$work/manifest.json")
    jq -r '.output[] | "\(.type) \(.url)"' "$work/manifest.json" | while read -r type url; do
        curl -sS --fail -H "Authorization: Bearer $token" "$url" >> "$out/$type.ndjson"
    done
    echo "exported $count resources in $(echo "$finished - $started" | bc) s" >&2
    echo "$count / ($finished - $started)" | bc
}

first=$work/first.env
fresh first > "$first"
rate=$(import "$first" "$data")
echo "import $backend: $lines lines, $rate resources/s"

serve "$first"
# Interactive reads while the export runs: one Patient read over and over.
patient=$(head -1 "$data/Patient.000.ndjson" | jq -r .id)
wrk -t1 -c4 -d20s --latency -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$port/fhir/Patient/$patient" > "$work/wrk-during.txt" &
wrk_pid=$!
sleep 1
export_rate=$(export_all "$work/exported")
wait "$wrk_pid"
echo "export $backend: $export_rate resources/s"
echo "reads during the export: $(awk '/Requests\/sec/ {print $2}' "$work/wrk-during.txt") req/s, p50 $(awk '$1 == "50%" {print $2}' "$work/wrk-during.txt"), p99 $(awk '$1 == "99%" {print $2}' "$work/wrk-during.txt")"
wrk -t1 -c4 -d10s --latency -H "Authorization: Bearer $token" \
    "http://127.0.0.1:$port/fhir/Patient/$patient" > "$work/wrk-idle.txt"
echo "reads without an export: $(awk '/Requests\/sec/ {print $2}' "$work/wrk-idle.txt") req/s, p50 $(awk '$1 == "50%" {print $2}' "$work/wrk-idle.txt"), p99 $(awk '$1 == "99%" {print $2}' "$work/wrk-idle.txt")"
stop

# Round trip: the export imported into a fresh database, exported again: the same resources.
second=$work/second.env
fresh second > "$second"
import "$second" "$work/exported" >/dev/null
serve "$second"
export_all "$work/again" >/dev/null
stop
python3 - "$work/exported" "$work/again" <<'EOF'
import json, os, sys
def load(d):
    out = {}
    for name in os.listdir(d):
        for line in open(os.path.join(d, name)):
            r = json.loads(line)
            meta = r.get("meta", {})
            meta.pop("versionId", None)
            meta.pop("lastUpdated", None)
            if not meta:
                r.pop("meta", None)
            out[(r["resourceType"], r["id"])] = r
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
same = a == b
print(f"round trip: {len(a)} resources exported, {len(b)} after import and export again, content equal: {same}")
sys.exit(0 if same else 1)
EOF
