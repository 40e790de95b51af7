#!/usr/bin/env bash
# Builds one Python plugin into a WebAssembly component.
#
# Usage: scripts/build-python-plugin.sh PLUGIN_DIR OUT.wasm
#
# PLUGIN_DIR holds a pyproject.toml; its module (`[tool.keepwarm] module`, by default the
# `[project] name` with `-` turned into `_`) binds `Transform`, usually
# `export_plugin(...)` from keepwarm_guest. The pinned componentize-py (scripts/lib/toolchains.sh
# installs it on first use) generates the bindings of wit/v0.1.0/keepwarm.wit (the Python
# helper speaks contract 0.1.0, which keepwarm still runs), world `plugin`, and bundles
# CPython, the module, what it imports from a copy of PLUGIN_DIR and guest-sdk/python
# (keepwarm_guest) into the component. Pure-Python dependencies can live in PLUGIN_DIR (e.g.
# `pip install --target`).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=lib/toolchains.sh
. "$repo/scripts/lib/toolchains.sh"

fail() {
    echo "build-python-plugin: $*" >&2
    exit 1
}

(($# == 2)) || fail "usage: $0 PLUGIN_DIR OUT.wasm"
dir="$(realpath "$1")"
out="$(realpath -m "$2")"
[[ -f "$dir/pyproject.toml" ]] || fail "$dir has no pyproject.toml"
module="$(python3 - "$dir/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)
module = project.get("tool", {}).get("keepwarm", {}).get("module")
name = project.get("project", {}).get("name", "")
print(module or name.replace("-", "_"))
EOF
)"
[[ -n "$module" ]] || fail "$dir/pyproject.toml names no module ([tool.keepwarm] module)"
[[ -f "$dir/$module.py" || -f "$dir/$module/__init__.py" ]] ||
    fail "the module $module is not in $dir ($module.py or $module/__init__.py)"

ensure_python_toolchain

# componentize-py runs the module (and writes __pycache__ beside it) while it builds: work on a
# copy, so the sources stay as they are.
stage="$(mktemp -d -t keepwarm-python.XXXXXX)"
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/app" "$stage/sdk"
tar -C "$dir" --exclude=./build --exclude=./target --exclude='__pycache__' -cf - . |
    tar -C "$stage/app" -xf -
cp "$repo/guest-sdk/python/keepwarm_guest.py" "$stage/sdk/"

mkdir -p "$(dirname "$out")"
# -p: where the module and its imports are found. VIRTUAL_ENV is cleared so that componentize-py
# does not add the toolchain's own site-packages to the plugin's path.
if ! log="$(cd "$stage/app" && env -u VIRTUAL_ENV "$KEEPWARM_COMPONENTIZE_PY" --quiet \
    --wit-path "$repo/wit/v0.1.0" --world plugin componentize \
    --python-path "$stage/app" --python-path "$stage/sdk" \
    --output "$out.tmp" "$module" 2>&1)"; then
    rm -f "$out.tmp"
    printf '%s\n' "$log" >&2
    fail "componentize-py failed for $dir"
fi
mv -f "$out.tmp" "$out"
