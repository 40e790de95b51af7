#!/usr/bin/env bash
# Instructions per message of `keepwarm run` (row-cache, plain writes) under callgrind, which
# counts the same on a busy machine: preloads N bench-shaped entries into a private Redis,
# runs keepwarm until its group has read and acknowledged them all, stops it and prints the
# instructions. Run it with two sizes; the difference over the difference in N is the cost
# per message (startup cancels out). docs/bench.md, "CPU per message and memory, round 2".
#
#   scripts/profile-per-message.sh 2000  /tmp/kw2k     # (the first run compiles the plugin for
#   scripts/profile-per-message.sh 2000  /tmp/kw2k     #  valgrind's CPU: run the small one twice)
#   scripts/profile-per-message.sh 22000 /tmp/kw22k
#   callgrind_annotate /tmp/kw22k.cg | head -40
#
# KEEPWARM (default: $CARGO_TARGET_DIR/release/keepwarm) and PLUGINS (default:
# $CARGO_TARGET_DIR/plugins) choose the builds; CONSISTENCY=versioned writes versioned (default
# plain); MODE=plain runs without valgrind and prints the process's CPU seconds and peak RSS
# instead.
set -euo pipefail
cd "$(dirname "$0")/.."
n=$1
out=$2
target="${CARGO_TARGET_DIR:-$(pwd)/target}"
keepwarm="${KEEPWARM:-$target/release/keepwarm}"
plugins="${PLUGINS:-$target/plugins}"
mode="${MODE:-callgrind}"
consistency="${CONSISTENCY:-plain}"

. scripts/lib/redis.sh
start_redis
work=$(mktemp -d -t keepwarm-profile.XXXXXX)
trap 'stop_redis; rm -rf "$work"' EXIT
mkdir -p "$work/plugins" "$target/profile-cache"
cp "$plugins/row-cache.wasm" "$work/plugins/"
printf 'consistency = "%s"\n' "$consistency" >"$work/plugins/row-cache.toml"
cat >"$work/keepwarm.toml" <<CONFIG
[redis]
url = "$REDIS_URL"

[plugins]
dir = "$work/plugins"
cache_dir = "$target/profile-cache"

[[source]]
kind = "redis-stream"
stream = "bench:changes"
group = "bench"
consumer = "keepwarm"
CONFIG
python3 scripts/lib/bench_entries.py bench:changes "$n" | redis-cli -p "$REDIS_PORT" --pipe >/dev/null
redis-cli -p "$REDIS_PORT" XGROUP CREATE bench:changes bench 0 >/dev/null

run=()
if [ "$mode" = callgrind ]; then
    run=(valgrind --tool=callgrind "--callgrind-out-file=$out.cg")
fi
RUST_LOG=warn TOKIO_WORKER_THREADS=2 "${run[@]}" "$keepwarm" run --config "$work/keepwarm.toml" \
    >"$out.log" 2>&1 &
pid=$!
field() { redis-cli -p "$REDIS_PORT" XINFO GROUPS bench:changes | awk -v f="$1" '$0 == f { getline; print }'; }
until [ "$(field entries-read)" = "$n" ] && [ "$(field pending)" = 0 ]; do
    kill -0 "$pid" 2>/dev/null || { echo "keepwarm stopped early; see $out.log" >&2; exit 1; }
    sleep 1
done
if [ "$mode" != callgrind ]; then
    grep VmHWM "/proc/$pid/status"
    awk '{ printf "CPU seconds: %.2f\n", ($14 + $15) / 100 }' "/proc/$pid/stat"
fi
kill -TERM "$pid"
wait "$pid" || true
if [ "$mode" = callgrind ]; then
    grep -h '^summary' "$out.cg" | sed "s/summary:/instructions ($n entries):/"
fi
