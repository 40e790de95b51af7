# Starts a private memcached on a free port for this shell; sourced by the scripts after
# scripts/lib/redis.sh (for free_port). After `start_memcached`, MEMCACHED_SERVERS is set
# (`127.0.0.1:PORT`, what `[memcached] servers` takes) and the server stops when the shell exits
# (added to whatever EXIT trap is already set). Tests that restart memcached start their own.

start_memcached() {
    MEMCACHED_PORT=$(free_port)
    # -U 0: no UDP. The Debian package does not start a server here; this one is ours.
    memcached -u nobody -l 127.0.0.1 -p "$MEMCACHED_PORT" -U 0 -m 64 &
    MEMCACHED_PID=$!
    on_exit stop_memcached
    if wait_service "$MEMCACHED_PID" 100 memcached_answers "$MEMCACHED_PORT"; then
        MEMCACHED_SERVERS="127.0.0.1:$MEMCACHED_PORT"
        export MEMCACHED_SERVERS MEMCACHED_PORT
        return 0
    fi
    echo "memcached did not start on port $MEMCACHED_PORT" >&2
    return 1
}

# Whether the memcached on port $1 answers a meta no-op.
memcached_answers() {
    python3 - "$1" <<'PY'
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"mn\r\n")
sys.exit(0 if s.recv(16).startswith(b"MN") else 1)
PY
}

stop_memcached() {
    if [ -n "${MEMCACHED_PID:-}" ]; then
        kill "$MEMCACHED_PID" 2>/dev/null || true
        wait "$MEMCACHED_PID" 2>/dev/null || true
    fi
}
