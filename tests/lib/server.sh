# Starts a fhirledger server for a shell test: sourced, not run. After `start_fhirledger DIR`,
# $binary is the server's binary, $port its port, $server_pid its process and $server_log
# its log; the server runs in DIR (its ./data) until `stop_fhirledger`.
#
# The binary is the debug build (built here; CARGO_TARGET_DIR is honoured), or FHIRLEDGER_BIN.

# The repository root.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

find_fhirledger_binary() {
    if [[ -n ${FHIRLEDGER_BIN:-} ]]; then
        binary=$FHIRLEDGER_BIN
    else
        (cd "$repo" && cargo build --locked --quiet --bin fhirledger)
        binary=${CARGO_TARGET_DIR:-$repo/target}/debug/fhirledger
        [[ $binary == /* ]] || binary=$repo/$binary
    fi
    [[ -x $binary ]] || { echo "no fhirledger binary at $binary" >&2; exit 1; }
}

# Tries to start the server on port $1 in the current directory; fails when it exits (the
# port was taken after all).
try_port() {
    local candidate=$1
    FHIRLEDGER_LISTEN=127.0.0.1:$candidate "$binary" serve >"$server_log" 2>&1 &
    server_pid=$!
    for _ in $(seq 300); do
        curl -sf "http://127.0.0.1:$candidate/healthz" >/dev/null 2>&1 && return 0
        kill -0 "$server_pid" 2>/dev/null || { wait "$server_pid" || true; server_pid=; return 1; }
        sleep 0.1
    done
    echo "the server did not become healthy; its log:" >&2
    cat "$server_log" >&2
    exit 1
}

# Starts the server in directory $1 on a free port (should another process take the port
# before the server binds, the server exits and the next one is tried).
start_fhirledger() {
    server_log=$1/server.log
    find_fhirledger_binary
    port=
    pushd "$1" >/dev/null
    for _ in $(seq 20); do
        local candidate=$((20000 + RANDOM % 20000))
        (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null && continue
        if try_port "$candidate"; then port=$candidate; break; fi
    done
    popd >/dev/null
    [[ -n $port ]] || { echo "could not start the server; its last log:" >&2; cat "$server_log" >&2; exit 1; }
}

stop_fhirledger() {
    if [[ -n ${server_pid:-} ]]; then
        kill -TERM "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
}
