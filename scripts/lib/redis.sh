# Starts a private redis-server on a free port for this shell; sourced by the scripts.
# After `start_redis`, REDIS_PORT and REDIS_URL are set and the server stops when the shell exits.

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
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
