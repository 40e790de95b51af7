#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the plugins, checks formatting and
# lints, starts a private Redis, an SQS emulator (moto), a Kafka broker (Tansu) and memcached, checks that
# NATS and RabbitMQ answer, and runs every test against them.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/setup.sh
scripts/build-plugins.sh

echo "== cargo fmt"
cargo fmt --all -- --check
# The host and the guest crates are checked and tested in separate invocations: together,
# cargo would unify serde_json's features and build the host with the guest SDK's
# `arbitrary_precision`, which changes how the host parses numbers.
echo "== cargo clippy"
cargo clippy -p keepwarm --all-targets -- -D warnings
# The build without the optional sources (what scripts/demo.sh builds) must keep compiling.
cargo clippy -p keepwarm --no-default-features --all-targets -- -D warnings
guests=(-p keepwarm-guest -p row-cache -p tagger -p hostile -p wrong-world -p model-cache)
cargo clippy "${guests[@]}" --all-targets -- -D warnings
cargo clippy -p keepwarm-bench --all-targets -- -D warnings

. scripts/lib/redis.sh
. scripts/lib/moto.sh
. scripts/lib/cluster.sh
. scripts/lib/kafka.sh
. scripts/lib/brokers.sh
. scripts/lib/memcached.sh
# NATS (JetStream) and RabbitMQ run on the machine already; say what to start when they do not.
check_brokers
start_redis
start_moto
start_kafka
start_memcached
# A three-master Redis Cluster for the cluster tests (REDIS_CLUSTER_URLS).
start_cluster
# A failing test prints where and why it panicked; a backtrace after that would push the why
# out of the short excerpt a CI log keeps.
export RUST_BACKTRACE=0
export KEEPWARM_PLUGINS="${CARGO_TARGET_DIR:-$root/target}/plugins"
export KEEPWARM_TEST_PLUGINS="${CARGO_TARGET_DIR:-$root/target}/test-plugins"
echo "== cargo test (redis at $REDIS_URL, cluster at $REDIS_CLUSTER_URLS, sqs emulator at $SQS_ENDPOINT, memcached at $MEMCACHED_SERVERS, kafka at $KAFKA_BROKERS, nats at $NATS_URL, rabbitmq at ${AMQP_URL/guest:guest@/})"
log=$(mktemp -t keepwarm-test.XXXXXX)
cargo test "${guests[@]}" 2>&1 | tee "$log"
cargo test -p keepwarm --lib --bins --tests 2>&1 | tee -a "$log"
# The benchmark as a smoke test (--quick, its own redis-server; uses the keepwarm binary just built).
cargo test -p keepwarm-bench 2>&1 | tee -a "$log"
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
