#!/usr/bin/env bash
# Drives a fresh server with client libraries people use, installed from their registries:
# fhirpy (PyPI) through tests/clients/fhirpy_drive.py. Fails when an interaction fails.
#
# Usage: tests/real_clients.sh   (FHIRLEDGER_PYTHON: a Python with fhirpy installed; .ci/run
# makes one; the debug binary is built first, or FHIRLEDGER_BIN names one)
set -euo pipefail

# shellcheck source=tests/lib/server.sh
source "$(dirname "$0")/lib/server.sh"
python=${FHIRLEDGER_PYTHON:-python3}
"$python" -c 'import fhirpy' 2>/dev/null || {
    echo "real_clients: $python cannot import fhirpy; install it from PyPI (pip install fhirpy), as .ci/run does" >&2
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
