#!/usr/bin/env bash
# Drives a fresh server with client libraries people use, installed from their registries:
# fhirpy (PyPI) through tests/clients/fhirpy_drive.py and fhir-kit-client (npm) through
# tests/clients/fhir_kit_client_drive.mjs. Fails when an interaction fails.
#
# Usage: tests/real_clients.sh   (FHIRLEDGER_PYTHON: a Python with fhirpy installed;
# FHIRLEDGER_NODE_CLIENTS: a directory whose node_modules holds fhir-kit-client; .ci/run makes
# both; the debug binary is built first, or FHIRLEDGER_BIN names one)
set -euo pipefail

# shellcheck source=tests/lib/server.sh
source "$(dirname "$0")/lib/server.sh"
python=${FHIRLEDGER_PYTHON:-python3}
"$python" -c 'import fhirpy' 2>/dev/null || {
    echo "real_clients: $python cannot import fhirpy; install it from PyPI (pip install fhirpy), as .ci/run does" >&2
    exit 1
}

node_clients=${FHIRLEDGER_NODE_CLIENTS:-}
[[ -n $node_clients && -d $node_clients/node_modules/fhir-kit-client ]] || {
    echo "real_clients: FHIRLEDGER_NODE_CLIENTS must name a directory where 'npm install fhir-kit-client' ran, as .ci/run does" >&2
    exit 1
}

tmp=$(mktemp -d)
cleanup() {
    stop_fhirledger
    rm -rf "$tmp"
}
trap cleanup EXIT
start_fhirledger "$tmp"

export FHIR_BASE=http://127.0.0.1:$port/fhir
FHIR_TOKEN=$(cd "$tmp" && FHIRLEDGER_LISTEN=127.0.0.1:$port "$binary" token --sub fhirpy-app --scope 'system/*.cruds')
export FHIR_TOKEN
if ! "$python" "$repo/tests/clients/fhirpy_drive.py"; then
    echo "real_clients: fhirpy FAILED; the server's log:" >&2
    tail -n 40 "$server_log" >&2
    exit 1
fi
# An ES module resolves its imports from where it lies: beside that node_modules.
cp "$repo/tests/clients/fhir_kit_client_drive.mjs" "$node_clients/"
if ! node "$node_clients/fhir_kit_client_drive.mjs"; then
    echo "real_clients: fhir-kit-client FAILED; the server's log:" >&2
    tail -n 40 "$server_log" >&2
    exit 1
fi
