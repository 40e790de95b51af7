# Starts a private redis-server on a free port for this shell; sourced by the scripts, and
# first: free_port, on_exit and wait_service serve the other services' scripts too.
# After `start_redis`, REDIS_PORT and REDIS_URL are set and the server stops when the shell exits.

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Runs `$1` when the shell exits, after nothing else: whatever EXIT trap is set already runs too.
on_exit() {
    local existing
    existing=$(trap -p EXIT | sed -E "s/^trap -- '(.*)' EXIT$/\1/")
    # shellcheck disable=SC2064 # expand now: the trap keeps the earlier handler
    trap "$1${existing:+; $existing}" EXIT
}

# Waits up to $2 tenths of a second for the command after them to succeed while process $1
# lives; fails when it never does or the process has died.
wait_service() {
    local pid=$1 tries=$2
    shift 2
    for _ in $(seq 1 "$tries"); do
        if "$@" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        sleep 0.1
    done
    return 1
}

start_redis() {
    REDIS_DIR=$(mktemp -d -t keepwarm-redis.XXXXXX)
    REDIS_PORT=$(free_port)
    redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
        --dir "$REDIS_DIR" --daemonize yes --pidfile "$REDIS_DIR/redis.pid" \
        --logfile "$REDIS_DIR/redis.log" >/dev/null
    for _ in $(seq 1 100); do
        if redis-cli -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
            REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
            export REDIS_PORT REDIS_URL
            trap stop_redis EXIT
            return 0
        fi
        sleep 0.1
    done
    echo "redis-server did not start; its log:" >&2
    cat "$REDIS_DIR/redis.log" >&2
    return 1
}

stop_redis() {
    if [ -n "${REDIS_DIR:-}" ] && [ -f "$REDIS_DIR/redis.pid" ]; then
        kill "$(cat "$REDIS_DIR/redis.pid")" 2>/dev/null || true
    fi
    rm -rf "${REDIS_DIR:-/nonexistent}"
}
