#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds the plugins, checks formatting and
# lints, starts a private Redis and an SQS emulator (moto), and runs every test against them.
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
cargo clippy -p keepwarm-guest -p row-cache --all-targets -- -D warnings

. scripts/lib/redis.sh
. scripts/lib/moto.sh
start_redis
start_moto
export KEEPWARM_PLUGINS="${CARGO_TARGET_DIR:-$root/target}/plugins"
export KEEPWARM_TEST_PLUGINS="${CARGO_TARGET_DIR:-$root/target}/test-plugins"
echo "== cargo test (redis at $REDIS_URL, sqs emulator at $SQS_ENDPOINT)"
cargo test -p keepwarm-guest -p row-cache
cargo test -p keepwarm
