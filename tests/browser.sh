#!/usr/bin/env bash
# A real browser (Debian's headless chromium) against a fresh server:
#  1. /docs renders the API's operations with no host other than the server reachable
#     (every other host name resolves to nothing), so the viewer is served by the binary.
#  2. CORS: a page from an allowed origin (another port) fetches /fhir/metadata and reads
#     the CapabilityStatement; the same page from an origin not allowed cannot.
# Fails (never skips) when chromium is missing.
#
# Usage: tests/browser.sh   (the debug binary is built first, or FHIRLEDGER_BIN names one)
set -euo pipefail

# shellcheck source=tests/lib/server.sh
source "$(dirname "$0")/lib/server.sh"
command -v chromium >/dev/null || {
    echo "browser: no chromium; install Debian's package (apt-get install chromium), as .ci/run does" >&2
    exit 1
}

tmp=$(mktemp -d)
page_pids=()
cleanup() {
    stop_fhirledger
    for pid in "${page_pids[@]}"; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

# Serves $tmp/pages on a free port with python's http.server; sets $page_port.
start_page_server() {
    page_port=
    for _ in $(seq 20); do
        local candidate=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null && continue
        python3 -m http.server --bind 127.0.0.1 --directory "$tmp/pages" "$candidate" \
            >>"$tmp/pages.log" 2>&1 &
        local pid=$!
        for _ in $(seq 50); do
            if curl -sf "http://127.0.0.1:$candidate/page.html" >/dev/null 2>&1; then
                page_pids+=("$pid")
                page_port=$candidate
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    echo "browser: could not start a page server; its log:" >&2
    cat "$tmp/pages.log" >&2
    exit 1
}

# Prints the DOM of URL $1 after the page's scripts ran. Only 127.0.0.1 resolves.
dump_dom() {
    timeout 45 chromium --headless --no-sandbox --disable-gpu --no-first-run \
        --user-data-dir="$tmp/profile" \
        --host-resolver-rules='MAP * ~NOTFOUND, EXCLUDE 127.0.0.1' \
        --virtual-time-budget=10000 --dump-dom "$1" 2>>"$tmp/chromium.log"
}

fail() {
    echo "browser: $1; the page's DOM is in the output above, chromium's log:" >&2
    tail -n 20 "$tmp/chromium.log" >&2
    exit 1
}

# The page for the CORS part; its port is filled in once the server has one.
mkdir -p "$tmp/pages"
echo placeholder >"$tmp/pages/page.html"
start_page_server
allowed_port=$page_port
start_page_server
other_port=$page_port

FHIRLEDGER_CORS_ORIGINS=http://127.0.0.1:$allowed_port
export FHIRLEDGER_CORS_ORIGINS
start_fhirledger "$tmp"
unset FHIRLEDGER_CORS_ORIGINS

cat >"$tmp/pages/page.html" <<EOF
<!doctype html>
<html><body><p id="result">pending</p>
<script>
const result = document.getElementById('result');
fetch('http://127.0.0.1:$port/fhir/metadata')
  .then(response => response.json().then(body => {
    result.textContent = 'status ' + response.status + ' ' + body.resourceType;
  }))
  .catch(error => { result.textContent = 'fetch failed: ' + error; });
</script>
</body></html>
EOF

echo "== /docs in chromium"
dom=$(dump_dom "http://127.0.0.1:$port/docs")
grep -q 'opblock' <<<"$dom" || { echo "$dom" >&2; fail "/docs rendered no operation (no 'opblock')"; }
grep -q '/fhir/metadata' <<<"$dom" || { echo "$dom" >&2; fail "/docs does not show /fhir/metadata"; }
echo "ok: $(grep -o 'opblock-summary-path"' <<<"$dom" | wc -l) operations rendered"

echo "== a page from the allowed origin http://127.0.0.1:$allowed_port"
dom=$(dump_dom "http://127.0.0.1:$allowed_port/page.html")
result=$(grep -o '<p id="result">[^<]*</p>' <<<"$dom" || true)
echo "$result"
grep -q 'status 200 CapabilityStatement' <<<"$result" || { echo "$dom" >&2; fail "the allowed origin could not read /fhir/metadata"; }

echo "== the same page from http://127.0.0.1:$other_port, not allowed"
dom=$(dump_dom "http://127.0.0.1:$other_port/page.html")
result=$(grep -o '<p id="result">[^<]*</p>' <<<"$dom" || true)
echo "$result"
grep -q 'fetch failed' <<<"$result" || { echo "$dom" >&2; fail "an origin not allowed read /fhir/metadata (or the page did not run)"; }

echo "browser: 3 passed, 0 failed"
