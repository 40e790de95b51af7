# Starts a private three-master Redis Cluster on free ports for this shell; sourced by the scripts.
# After `start_cluster`, REDIS_CLUSTER_URLS is set (space-separated redis:// URLs of the masters)
# and the nodes stop when the shell exits (added to whatever EXIT trap is already set).

# A free port whose cluster bus port (port + 10000) is free too, so at most 55535.
cluster_free_port() {
    python3 - <<'PY'
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    if port > 55535:
        continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", port + 10000))
    except OSError:
        continue
    print(port)
    break
PY
}

start_cluster() {
    CLUSTER_DIR=$(mktemp -d -t keepwarm-cluster.XXXXXX)
    local ports=() port addrs=() urls=()
    for _ in 1 2 3; do
        port=$(cluster_free_port)
        # A port the OS just handed out twice would clash; pick again.
        while printf '%s\n' "${ports[@]:-}" | grep -qx "$port"; do port=$(cluster_free_port); done
        ports+=("$port")
        mkdir -p "$CLUSTER_DIR/$port"
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$CLUSTER_DIR/$port/nodes.conf" --cluster-node-timeout 5000 \
            --save "" --appendonly no --dir "$CLUSTER_DIR/$port" --daemonize yes \
            --pidfile "$CLUSTER_DIR/$port/redis.pid" --logfile "$CLUSTER_DIR/$port/redis.log" >/dev/null
    done
    on_exit stop_cluster
    for port in "${ports[@]}"; do
        local up=""
        for _ in $(seq 1 100); do
            if redis-cli -p "$port" ping 2>/dev/null | grep -q PONG; then up=1; break; fi
            sleep 0.1
        done
        if [ -z "$up" ]; then
            echo "cluster node on port $port did not start; its log:" >&2
            cat "$CLUSTER_DIR/$port/redis.log" >&2
            return 1
        fi
        addrs+=("127.0.0.1:$port")
        urls+=("redis://127.0.0.1:$port")
    done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >"$CLUSTER_DIR/create.log" 2>&1 || {
        cat "$CLUSTER_DIR/create.log" >&2
        return 1
    }
    # Wait until every node agrees that all slots are served.
    for port in "${ports[@]}"; do
        local ok=""
        for _ in $(seq 1 100); do
            if redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok'; then ok=1; break; fi
            sleep 0.1
        done
        if [ -z "$ok" ]; then
            echo "redis cluster did not become ready" >&2
            return 1
        fi
    done
    REDIS_CLUSTER_URLS="${urls[*]}"
    export REDIS_CLUSTER_URLS
}

stop_cluster() {
    if [ -n "${CLUSTER_DIR:-}" ]; then
        for pidfile in "$CLUSTER_DIR"/*/redis.pid; do
            [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
        done
        rm -rf "$CLUSTER_DIR"
    fi
}
