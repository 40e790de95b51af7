#!/usr/bin/env bash
# The demo: Sequin's example change messages go into a Redis Stream exactly as Sequin's Redis
# Stream sink writes them, keepwarm consumes them through the example plugins, and the resulting
# cache keys are printed. Uses a private Redis on a free port; leaves nothing running.
#
#   scripts/demo.sh               the cache is Redis (all three example plugins)
#   scripts/demo.sh --memcached   the cache is a private Memcached, without [redis] (row-cache
#                                 only: the other examples write sets and hashes, which Memcached
#                                 lacks); the stream source names its Redis, dead letters would
#                                 go to a file
set -euo pipefail
memcached=false
if [[ "${1:-}" == "--memcached" ]]; then
    memcached=true
fi
cd "$(dirname "$0")/.."
root=$(pwd)

# Only what the demo needs: no SQS emulator, Kafka broker or Postgres.
if $memcached; then scripts/setup.sh --demo --memcached; else scripts/setup.sh --demo; fi
# The example plugins only (not the test plugins), built while cargo builds the host (the Rust
# example in its own target directory). The host without the sources the demo does not use
# (SQS, Kafka, NATS, RabbitMQ, Postgres: their clients are a quarter of a cold build; the
# test suite builds them all), in the `demo` profile (Cargo.toml): unoptimised but for the
# plugin compiler, no debug info; less than half the CPU time of a debug build.
scripts/build-plugins.sh --examples &
plugins_pid=$!
cargo build --quiet -p keepwarm --no-default-features --profile demo
wait "$plugins_pid"
target="${CARGO_TARGET_DIR:-$root/target}"

. scripts/lib/redis.sh
. scripts/lib/memcached.sh
start_redis
cli() { redis-cli -p "$REDIS_PORT" "$@"; }

work=$(mktemp -d -t keepwarm-demo.XXXXXX)
plugins="$target/plugins"
cache_table="[redis]
url = \"$REDIS_URL\""
source_url=""
if $memcached; then
    start_memcached
    plugins="$work/plugins"
    mkdir -p "$plugins"
    cp "$target/plugins/row-cache.wasm" "$target/plugins/row-cache.toml" "$plugins/"
    # No [redis]: the stream source names its Redis, dead letters go to a file.
    cache_table="[memcached]
servers = [\"$MEMCACHED_SERVERS\"]

[dead_letter]
file = \"$work/dead-letters.jsonl\""
    source_url="url = \"$REDIS_URL\""
fi
cat >"$work/keepwarm.toml" <<TOML
$cache_table

[plugins]
dir = "$plugins"

[[source]]
kind = "redis-stream"
stream = "sequin.changes"
group = "keepwarm"
$source_url
TOML

fixtures="$root/tests/fixtures/sequin-examples.jsonl"
count=$(grep -c . "$fixtures")
echo "== writing $count Sequin change messages to the stream sequin.changes"
python3 scripts/lib/sequin_to_resp.py sequin.changes <"$fixtures" | cli --pipe >/dev/null

echo "== running keepwarm (plugins: $(cd "$plugins" && ls *.wasm | tr '\n' ' '))"
"$target/demo/keepwarm" run --config "$work/keepwarm.toml" 2>"$work/keepwarm.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; stop_redis; stop_memcached; rm -rf "$work"' EXIT

# Wait until the group has read every entry and acknowledged all of them.
# Up to 5 minutes: a Python plugin takes tens of seconds to compile on its first load in a
# debug build (later runs take it from the artifact cache).
for _ in $(seq 1 3000); do
    group=$(cli XINFO GROUPS sequin.changes 2>/dev/null | paste -sd' ')
    if [[ "$group" == *"pending 0 "* && "$group" == *"entries-read $count lag 0"* ]]; then
        break
    fi
    if ! kill -0 $pid 2>/dev/null; then
        echo "keepwarm exited early; its log:" >&2
        cat "$work/keepwarm.log" >&2
        exit 1
    fi
    sleep 0.1
done
kill -TERM $pid
wait $pid || true

echo "== keepwarm's log"
sed 's/^/   /' "$work/keepwarm.log"
echo
if $memcached; then
    echo "== memcached keys (versioned values: tag v/r/t, LSN and index, then the value)"
    python3 - "$MEMCACHED_PORT" <<'PY'
import socket, sys, urllib.parse
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
f = s.makefile("rb")
def send(line):
    s.sendall(line.encode() + b"\r\n")
send("lru_crawler metadump all")
keys = []
while (line := f.readline().strip()) != b"END":
    keys.append(urllib.parse.unquote(line.split(b" ")[0].split(b"=", 1)[1].decode()))
for key in sorted(keys):
    send(f"mg {key} v")
    head = f.readline().split()
    if head[0] != b"VA":
        continue
    value = f.read(int(head[1]) + 2)[:-2]
    if value[:1] in (b"v", b"r", b"t") and len(value) >= 17:
        lsn, idx = int.from_bytes(value[1:9], "big"), int.from_bytes(value[9:17], "big")
        shown = "(tombstone)" if value[:1] == b"t" else value[17:].decode(errors="replace")
        print(f"{key} [{value[:1].decode()} {lsn}/{idx}]\n    {shown}")
    else:
        print(f"{key}\n    {value.decode(errors='replace')}")
PY
    echo
    letters=$(grep -c . "$work/dead-letters.jsonl" 2>/dev/null || true)
    echo "== dead letters (in $work/dead-letters.jsonl): ${letters:-0}; consumer group:"
    cli XINFO GROUPS sequin.changes | paste -sd' '
    exit 0
fi
echo "== cache keys (version bookkeeping under kw:v:* not shown)"
cli --scan | grep -v '^kw:v:' | grep -v '^sequin.changes$' | sort | while read -r key; do
    type=$(cli TYPE "$key")
    case "$type" in
        string) value=$(cli GET "$key") ;;
        hash) value=$(cli HGETALL "$key" | paste -sd' ') ;;
        set) value=$(cli SMEMBERS "$key" | sort | paste -sd' ') ;;
        zset) value=$(cli ZRANGE "$key" 0 -1 WITHSCORES | paste -sd' ') ;;
        stream) value="($(cli XLEN "$key") entries)" ;;
        *) value="($type)" ;;
    esac
    printf '%s [%s]\n    %s\n' "$key" "$type" "$value"
done
echo
echo "== $(cli --scan --pattern 'kw:v:*' | wc -l) version keys; consumer group:"
cli XINFO GROUPS sequin.changes | paste -sd' '
