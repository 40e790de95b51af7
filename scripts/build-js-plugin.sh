#!/usr/bin/env bash
# Builds one JavaScript plugin into a WebAssembly component.
#
# Usage: scripts/build-js-plugin.sh PLUGIN_DIR OUT.wasm
#
# PLUGIN_DIR holds a package.json whose "main" is the entry module (an ES module exporting
# `transform`, usually `exportPlugin(...)` from "keepwarm-guest"). The build:
#
# 1. copies the plugin into a staging directory (without node_modules/.bin, build/ and target/)
#    and puts guest-sdk/js there as node_modules/keepwarm-guest, so `import ... from
#    "keepwarm-guest"` resolves, as do relative imports and pure-JS packages in the plugin's own
#    node_modules;
# 2. runs the pinned `jco componentize --backend quickjs` (scripts/lib/toolchains.sh installs it
#    on first use) against wit/v0.1.0/keepwarm.wit (the JavaScript helper speaks contract 0.1.0,
#    which keepwarm still runs), world `plugin`.
#
# The QuickJS backend embeds the QuickJS-ng engine and snapshots the initialised module (Wizer),
# so the component starts with the module already evaluated. The plugin world is synchronous, so
# the build embeds QuickJS's synchronous runtime (--backend-qjs-disable-async): the component then
# needs no component-model-async support from its host, and measured the same per change as the
# default async runtime (about 31 µs in a debug keepwarm) while 2% smaller. `jco componentize
# --bundle` is not used: jco 1.35's bundler reads the WIT through a filesystem shim that has no
# readable directories.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/toolchains.sh
. "$repo/scripts/lib/toolchains.sh"

fail() {
    echo "build-js-plugin: $*" >&2
    exit 1
}

(($# == 2)) || fail "usage: $0 PLUGIN_DIR OUT.wasm"
dir="$(realpath "$1")"
out="$(realpath -m "$2")"
[[ -f "$dir/package.json" ]] || fail "$dir has no package.json"
main="$(node -e 'const p = require(process.argv[1]); process.stdout.write(p.main || "")' "$dir/package.json")"
[[ -n "$main" ]] || fail "$dir/package.json has no \"main\" (the entry module)"
[[ -f "$dir/$main" ]] || fail "the entry module $dir/$main does not exist"

ensure_js_toolchain

stage="$(mktemp -d -t keepwarm-js.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
tar -C "$dir" --exclude=./build --exclude=./target --exclude=./node_modules/.bin \
    --exclude=./node_modules/keepwarm-guest -cf - . | tar -C "$stage" -xf -
mkdir -p "$stage/node_modules/keepwarm-guest"
cp "$repo/guest-sdk/js/package.json" "$repo/guest-sdk/js/keepwarm.js" "$stage/node_modules/keepwarm-guest/"

mkdir -p "$(dirname "$out")"
if ! log="$("$KEEPWARM_JCO" componentize --backend quickjs --backend-qjs-disable-async --cwd "$stage" \
    --wit "$repo/wit/v0.1.0" --world-name plugin --out "$out.tmp" "$stage/$main" 2>&1)"; then
    rm -f "$out.tmp"
    printf '%s\n' "$log" >&2
    fail "jco componentize failed for $dir"
fi
mv -f "$out.tmp" "$out"
