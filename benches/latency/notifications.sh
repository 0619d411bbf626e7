#!/usr/bin/env bash
# Subscriptions under ../shared/bench's read_patient workload (wrk -t2 -c32 -d20s, SQLite, the
# given binary): read throughput without subscriptions, with 1,000 subscriptions to accesses of
# patients the workload does not read (the cost of matching), with those switched off and on
# again (alternated, as one run drifts from the next), and with 20 more to patients it reads,
# whose notifications a local receiver times: from the access's ledger time to arrival.
# Usage: benches/latency/notifications.sh BINARY OUTDIR
set -euo pipefail
bin=$(realpath "$1"); out=$2
here="$(cd "$(dirname "$0")" && pwd)"
bench="$here/../../../shared/bench"
rm -rf "$out"; mkdir -p "$out/srv"; cd "$out/srv"
port=18580; receiver_port=18590
export FHIRLEDGER_LISTEN=127.0.0.1:$port
"$bin" serve > ../serve.log 2>&1 & pid=$!
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null; do sleep 0.2; done
token=$("$bin" token --sub bench --scope 'system/*.cruds ledger.read' --ttl 86400)
# The subscriber is another party than the reader: its own reads would not be news to it.
portal=$("$bin" token --sub portal --scope 'system/Subscription.crud ledger.read' --ttl 86400)
cd ..
BENCH_TOKEN=$token python3 "$bench/setup.py" "http://127.0.0.1:$port/fhir" --out data > setup.log
python3 "$here/receiver.py" $receiver_port received.txt & receiver=$!
reads() {
    BENCH_DATA=data BENCH_TOKEN=$token wrk -t2 -c32 -d20s --latency -s "$bench/read_patient.lua" \
        "http://127.0.0.1:$port/fhir" patient_ids.txt | grep BENCH_RESULT
}
subscription() { # patient status [id]
    printf '{"resourceType":"Subscription",%s"status":"%s","reason":"bench","criteria":"AuditEvent?patient=Patient/%s","channel":{"type":"rest-hook","endpoint":"http://127.0.0.1:%s/hook","payload":"application/fhir+json"}}' \
        "${3:+\"id\":\"$3\",}" "$2" "$1" "$receiver_port"
}
subscribe() { # patient; prints the subscription's id
    curl -sf -X POST "http://127.0.0.1:$port/fhir/Subscription" -H "Authorization: Bearer $portal" \
        -H 'Content-Type: application/fhir+json' -d "$(subscription "$1" requested)" | jq -r .id
}
switch() { # status: every subscription of unread.tsv
    while read -r patient id; do
        curl -sf -X PUT "http://127.0.0.1:$port/fhir/Subscription/$id" -H "Authorization: Bearer $portal" \
            -H 'Content-Type: application/fhir+json' -d "$(subscription "$patient" "$1" "$id")" > /dev/null
    done < unread.tsv
}
echo "no subscriptions: $(reads)"
: > unread.tsv
for _ in $(seq 1 1000); do
    id=$(curl -sf -X POST "http://127.0.0.1:$port/fhir/Patient" -H "Authorization: Bearer $token" \
        -H 'Content-Type: application/fhir+json' -d '{"resourceType":"Patient","active":false}' | jq -r .id)
    printf '%s\t%s\n' "$id" "$(subscribe "$id")" >> unread.tsv
done
# Alternated, so that the order of the runs does not pass for the subscriptions' cost.
echo "1000 subscriptions to patients not read: $(reads)"
switch off
echo "the 1000 switched off: $(reads)"
switch requested
echo "the 1000 on again: $(reads)"
for id in $(head -20 data/patient_ids.txt); do subscribe "$id" > /dev/null; done
: > received.txt
echo "and 20 to patients read: $(reads)"
sleep 5
kill $receiver || true
python3 - "http://127.0.0.1:$port" "$token" received.txt <<'PY'
import datetime, json, sys, urllib.request
base, token, path = sys.argv[1:4]
received = {}
for line in open(path, encoding="utf-8"):
    at, focus = line.split()
    if "ledger-" in focus:
        received[int(focus.rsplit("ledger-", 1)[1])] = float(at)
times = {}
low, high = min(received), max(received) + 1
for start in range(low, high, 1000):
    request = urllib.request.Request(f"{base}/ledger/entries?start={start}&end={min(high, start + 1000)}",
                                     headers={"Authorization": f"Bearer {token}"})
    for served in json.load(urllib.request.urlopen(request))["entries"]:
        stated = served["entry"]["time"].replace("Z", "+00:00")
        times[served["index"]] = datetime.datetime.fromisoformat(stated).timestamp()
latencies = sorted((at - times[i]) * 1000 for i, at in received.items() if i in times)
q = lambda p: latencies[min(len(latencies) - 1, int(p * len(latencies)))]
print(f"notifications: {len(latencies)}, p50 {q(0.5):.0f} ms, p90 {q(0.9):.0f} ms, "
      f"p99 {q(0.99):.0f} ms, max {latencies[-1]:.0f} ms")
PY
kill $pid; wait $pid || true
