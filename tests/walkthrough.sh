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

# shellcheck source=tests/lib/server.sh
source "$(dirname "$0")/lib/server.sh"
for tool in curl jq awk; do
    command -v "$tool" >/dev/null || { echo "walkthrough: $tool is missing (the README lists it under Needs)" >&2; exit 1; }
done

# The section's shell blocks, in order.
steps=$(awk '
    /^## / { inside = ($0 == "## A walk through with curl") ; next }
    inside && /^```sh$/ { block = 1; next }
    inside && block && /^```$/ { block = 0; next }
    inside && block { print }
' "$repo/README.md")
[[ -n $steps ]] || { echo "walkthrough: README.md has no sh block under '## A walk through with curl'" >&2; exit 1; }

tmp=$(mktemp -d)
cleanup() {
    stop_fhirledger
    rm -rf "$tmp"
}
trap cleanup EXIT

# The walk through stands in the repository's root, beside which ../shared holds the fixtures:
# the temporary directory gets the same layout.
mkdir "$tmp/repo"
[[ -d $repo/../shared ]] && ln -s "$(cd "$repo/../shared" && pwd)" "$tmp/shared"
cd "$tmp/repo"
start_fhirledger "$tmp/repo"

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
    tail -n 40 "$server_log" >&2
    exit 1
fi
kill -0 "$server_pid" 2>/dev/null || { echo "walkthrough: the server died during the walk through" >&2; cat "$server_log" >&2; exit 1; }
echo
echo "walkthrough: every step of README.md's walk through passed"
