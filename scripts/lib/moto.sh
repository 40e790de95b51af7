# Starts a private moto server (an SQS emulator) on a free port for this shell; sourced by the
# scripts after scripts/lib/redis.sh (for free_port). After `start_moto`, SQS_ENDPOINT is set,
# dummy AWS credentials are exported unless some are set already, and the server stops when the
# shell exits (added to whatever EXIT trap is already set).

start_moto() {
    MOTO_DIR=$(mktemp -d -t keepwarm-moto.XXXXXX)
    MOTO_PORT=$(free_port)
    # moto_server.py: moto's own server with a race of its deletes fixed (see that file).
    python3 "$(dirname "${BASH_SOURCE[0]}")/moto_server.py" -H 127.0.0.1 -p "$MOTO_PORT" \
        >"$MOTO_DIR/moto.log" 2>&1 &
    MOTO_PID=$!
    on_exit stop_moto
    if wait_service "$MOTO_PID" 200 python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MOTO_PORT/moto-api/', timeout=1)"; then
        SQS_ENDPOINT="http://127.0.0.1:$MOTO_PORT"
        export SQS_ENDPOINT MOTO_PORT
        # moto accepts any credentials; the daemon under test finds these through the
        # standard AWS chain. No instance-metadata probing on a machine that has none.
        export AWS_ACCESS_KEY_ID="${AWS_ACCESS_KEY_ID:-test}"
        export AWS_SECRET_ACCESS_KEY="${AWS_SECRET_ACCESS_KEY:-test}"
        export AWS_EC2_METADATA_DISABLED=true
        return 0
    fi
    echo "moto_server did not start; its log:" >&2
    cat "$MOTO_DIR/moto.log" >&2
    return 1
}

stop_moto() {
    if [ -n "${MOTO_PID:-}" ]; then
        kill "$MOTO_PID" 2>/dev/null || true
        wait "$MOTO_PID" 2>/dev/null || true
    fi
    rm -rf "${MOTO_DIR:-/nonexistent}"
}
