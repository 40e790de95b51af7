#!/usr/bin/env bash
# Instructions of each consumer of a bench scenario under callgrind, which counts the same on a
# busy machine: runs keepwarm-bench under `valgrind --tool=callgrind --trace-children=yes`
# with `--graceful-stop` (consumers get SIGTERM, so they exit and callgrind writes their
# counts), then prints each consumer's total. Run it with two sizes; the difference over the
# difference in N is a consumer's cost per message (start-up cancels out). Time-driven work
# (librdkafka's timers, the epoch ticker) runs as often per second as ever while valgrind makes
# each message about 50 times slower, so that part is overcounted: compare consumers of one
# run, not these figures with CPU seconds. docs/bench.md, round 13.
#
#   scripts/profile-bench.sh 2000  /tmp/k2k  keepwarm-kafka,native-kafka   # (twice: the first
#   scripts/profile-bench.sh 2000  /tmp/k2k  keepwarm-kafka,native-kafka   #  compiles the plugin)
#   scripts/profile-bench.sh 22000 /tmp/k22k keepwarm-kafka,native-kafka
#   callgrind_annotate --inclusive=yes /tmp/k22k/<pid>.cg | head -60
#
# With VALGRIND_OPTS=--separate-threads=yes each thread gets its own `<pid>.cg-NN` (which thread
# does what: the poll thread, the plugin calls, the tokio workers, librdkafka's); the totals
# printed are then the sums over a consumer's threads.
#
# BENCH (default: $CARGO_TARGET_DIR/release/keepwarm-bench) and PLUGINS (default:
# $CARGO_TARGET_DIR/plugins) choose the builds; the bench runs the keepwarm beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
n=$1
out=$2
only=$3
target="${CARGO_TARGET_DIR:-$(pwd)/target}"
bench="${BENCH:-$target/release/keepwarm-bench}"
plugins="${PLUGINS:-$target/plugins}"

. scripts/lib/redis.sh
. scripts/lib/kafka.sh
start_kafka
mkdir -p "$out"
# `*.cg-NN` are the per-thread files of `VALGRIND_OPTS=--separate-threads=yes`.
rm -f "$out"/*.cg "$out"/*.cg-*
valgrind --tool=callgrind --trace-children=yes \
    --trace-children-skip='*redis-server*,*redis-cli*,*python*,*memcached*,*/kill,*/git' \
    "--callgrind-out-file=$out/%p.cg" \
    "$bench" --plugins "$plugins" --kafka-brokers "$KAFKA_BROKERS" --messages "$n" --no-python \
    --graceful-stop --only "$only" >"$out/bench.log" 2>&1
# One line per consumer; with --separate-threads=yes, the sum of its threads' files.
for pid in $(ls "$out" | sed -n 's/^\([0-9]*\)\.cg.*/\1/p' | sort -u); do
    file="$out/$pid.cg"
    command=$(cat "$file"* | sed -n 's/^cmd: *//p' | head -n 1)
    case "$command" in
    *" run --config "* | *native-*worker*) ;;
    *) continue ;;
    esac
    total=$(cat "$file"* | sed -n 's/^summary: //p' | awk '{ s += $1 } END { print s }')
    printf '%s  %s  %s\n' "$total" "$file" "${command:0:100}"
done
