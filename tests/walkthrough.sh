#!/usr/bin/env bash
# Runs README.md's walk through as written: every ```sh block of its "## A walk through with
# curl" section, taken from the README at each run (so the check follows the README), in a
# fresh temporary directory against a server started there from the debug binary. The only
# changes: `cargo run --release --` becomes that binary, and 127.0.0.1:8080 a free port.
# Fails when a step fails (the blocks run under `set -euo pipefail`; the README's curl calls
# that expect success carry --fail-with-body).
#
# Usage: tests/walkthrough.sh   (builds the debug binary first; CARGO_TARGET_DIR is honoured,
# FHIRLEDGER_BIN names a binary to use instead)
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
for tool in curl jq awk; do
    command -v "$tool" >/dev/null || { echo "walkthrough: $tool is missing (the README lists it under Needs)" >&2; exit 1; }
done

if [[ -n ${FHIRLEDGER_BIN:-} ]]; then
    binary=$FHIRLEDGER_BIN
else
    (cd "$repo" && cargo build --locked --quiet --bin fhirledger)
    binary=${CARGO_TARGET_DIR:-$repo/target}/debug/fhirledger
    [[ $binary == /* ]] || binary=$repo/$binary
fi
[[ -x $binary ]] || { echo "walkthrough: no binary at $binary" >&2; exit 1; }

# The section's shell blocks, in order.
steps=$(awk '
    /^## / { inside = ($0 == "## A walk through with curl") ; next }
    inside && /^```sh$/ { block = 1; next }
    inside && block && /^```$/ { block = 0; next }
    inside && block { print }
' "$repo/README.md")
[[ -n $steps ]] || { echo "walkthrough: README.md has no sh block under '## A walk through with curl'" >&2; exit 1; }

tmp=$(mktemp -d)
server_pid=
cleanup() {
    if [[ -n $server_pid ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# The walk through stands in the repository's root, beside which ../shared holds the fixtures:
# the temporary directory gets the same layout.
mkdir "$tmp/repo"
[[ -d $repo/../shared ]] && ln -s "$(cd "$repo/../shared" && pwd)" "$tmp/shared"
cd "$tmp/repo"

# A port nobody listens on; should another process take it before the server binds, the
# server exits and the next port is tried.
start_server() {
    local port=$1
    FHIRLEDGER_LISTEN=127.0.0.1:$port "$binary" serve >"$tmp/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || { wait "$server_pid" || true; server_pid=; return 1; }
        sleep 0.1
    done
    echo "walkthrough: the server did not become healthy; its log:" >&2
    cat "$tmp/server.log" >&2
    exit 1
}
port=
for _ in $(seq 20); do
    candidate=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null && continue
    if start_server "$candidate"; then port=$candidate; break; fi
done
[[ -n $port ]] || { echo "walkthrough: could not start the server; its last log:" >&2; cat "$tmp/server.log" >&2; exit 1; }

# The steps as a script: comments become progress lines; a failing step names its line. No
# xtrace: it would print the token.
{
    echo 'set -euo pipefail'
    echo 'trap '\''echo "walkthrough: step failed (exit $?) at: $BASH_COMMAND" >&2'\'' ERR'
    printf '%s\n' "$steps" | awk -v bin="$binary" -v port="$port" '
        function quote(s) { gsub(/\x27/, "\x27\\\x27\x27", s); return "\x27" s "\x27" }
        {
            gsub(/cargo run --release --/, quote(bin))
            gsub(/127\.0\.0\.1:8080/, "127.0.0.1:" port)
        }
        /^# / {
            print "printf \"" (comment ? "    " : "\\n==> ") "%s\\n\" " quote(substr($0, 3))
            comment = 1
            next
        }
        { comment = 0; print }
    '
} >"$tmp/walkthrough"

export FHIRLEDGER_LISTEN=127.0.0.1:$port
if ! bash "$tmp/walkthrough"; then
    echo "walkthrough: FAILED; the server's log:" >&2
    tail -n 40 "$tmp/server.log" >&2
    exit 1
fi
kill -0 "$server_pid" 2>/dev/null || { echo "walkthrough: the server died during the walk through" >&2; cat "$tmp/server.log" >&2; exit 1; }
echo
echo "walkthrough: every step of README.md's walk through passed"
