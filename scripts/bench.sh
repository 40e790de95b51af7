#!/usr/bin/env bash
# The benchmark (docs/bench.md): keepwarm against a native Rust worker and a Python redis-py
# worker on the same workload, and keepwarm's Kafka source against a native rdkafka consumer, in
# one run. Builds in release, installs redis-py into a venv under
# target/, starts a private redis-server, prints a table and writes target/bench/results.json.
# Arguments go to keepwarm-bench (e.g. --messages 200000, --only keepwarm-plain,native-rust).
set -euo pipefail
cd "$(dirname "$0")/.."
target="${CARGO_TARGET_DIR:-$(pwd)/target}"

if [ ! -f "$target/plugins/row-cache.wasm" ]; then
    scripts/build-plugins.sh
fi
cargo build --release -p keepwarm -p keepwarm-bench
if [ ! -x "$target/bench-venv/bin/python" ] || ! "$target/bench-venv/bin/python" -c 'import redis' 2>/dev/null; then
    python3 -m venv "$target/bench-venv"
    "$target/bench-venv/bin/pip" install --quiet redis
fi
# A Kafka broker (Tansu) for the Kafka scenarios: keepwarm's Kafka source against a native
# rdkafka consumer. Not exec: the broker stops when this shell exits.
. scripts/lib/redis.sh
. scripts/lib/kafka.sh
start_kafka
# The NATS and RabbitMQ scenarios use the machine's brokers when they answer.
. scripts/lib/brokers.sh
check_brokers || echo "bench: the NATS and RabbitMQ scenarios are skipped" >&2
"$target/release/keepwarm-bench" --plugins "$target/plugins" --kafka-brokers "$KAFKA_BROKERS" "$@"
