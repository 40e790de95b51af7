#!/usr/bin/env bash
# Builds every plugin into a WebAssembly component, ready for keepwarm to load.
#
#   plugins/<name>/        -> $TARGET/plugins/<name>.wasm       (+ <name>.toml, its manifest)
#   tests/plugins/<name>/  -> $TARGET/test-plugins/<name>.wasm  (+ <name>.toml)
#
# TARGET is $CARGO_TARGET_DIR, or <repo>/target. Runs from any directory. Each plugin directory
# is built by the function for its language: a Cargo.toml means Rust (cargo, wasm32-wasip2), a
# package.json JavaScript (scripts/build-js-plugin.sh: jco, QuickJS backend), a pyproject.toml
# Python (scripts/build-python-plugin.sh: componentize-py). The JavaScript and Python toolchains
# are pinned in tools/ and installed on first use (scripts/lib/toolchains.sh).
#
# The Rust plugins of a tree build (cargo) while its JavaScript and Python plugins build (jco,
# componentize-py), side by side.
#
# Usage: scripts/build-plugins.sh [--examples]
#   --examples   only plugins/ (what scripts/demo.sh runs), not the test plugins
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Resolve a relative CARGO_TARGET_DIR against the caller's directory, as cargo would, then make
# cargo use the same absolute path whatever directory it runs in.
target="$(realpath -m "${CARGO_TARGET_DIR:-$repo/target}")"
export CARGO_TARGET_DIR="$target"
wasm_target=wasm32-wasip2

main() {
    local examples_only=false
    case "${1:-}" in
        "") ;;
        --examples) examples_only=true ;;
        *) fail "usage: $0 [--examples]" ;;
    esac
    build_tree "$repo/plugins" "$target/plugins"
    $examples_only || build_tree "$repo/tests/plugins" "$target/test-plugins"
}

# build_tree SRC OUT: builds every plugin directory under SRC into OUT, grouped by language.
build_tree() {
    local src="$1" out="$2" dir
    local rust=() js=() python=()
    [[ -d "$src" ]] || return 0
    for dir in "$src"/*/; do
        dir="${dir%/}"
        if [[ -f "$dir/Cargo.toml" ]]; then
            rust+=("$dir")
        elif [[ -f "$dir/package.json" ]]; then
            js+=("$dir")
        elif [[ -f "$dir/pyproject.toml" ]]; then
            python+=("$dir")
        fi
    done
    # cargo in the background: the JavaScript and Python builds are mostly one thread each.
    local rust_pid=""
    if ((${#rust[@]} > 0)); then
        build_rust_plugins "$out" "${rust[@]}" &
        rust_pid=$!
    fi
    ((${#js[@]} == 0)) || build_js_plugins "$out" "${js[@]}"
    ((${#python[@]} == 0)) || build_python_plugins "$out" "${python[@]}"
    if [[ -n "$rust_pid" ]]; then
        wait "$rust_pid" || fail "building the Rust plugins of $src failed"
    fi
}

# build_rust_plugins OUT DIR...: Rust plugins are workspace members (cdylib); one cargo run
# builds them all with the `plugin` profile, in a target directory of their own: they share
# nothing with the host's build, and cargo's lock on one directory would make a guest build wait
# for a host build running beside it (scripts/demo.sh runs both at once).
build_rust_plugins() {
    local out="$1" dir name
    shift
    local dirs=("$@") names=() packages=()
    ensure_rust_target
    for dir in "${dirs[@]}"; do
        name="$(package_name "$dir/Cargo.toml")"
        names+=("$name")
        packages+=(-p "$name")
    done
    local guests="$target/guests"
    (cd "$repo" && CARGO_TARGET_DIR="$guests" cargo build --quiet --profile plugin \
        --target "$wasm_target" "${packages[@]}")
    local i
    for i in "${!names[@]}"; do
        name="${names[$i]}"
        install_plugin "$guests/$wasm_target/plugin/${name//-/_}.wasm" "${dirs[$i]}" "$out" "$name"
    done
}

# build_js_plugins OUT DIR...: JavaScript plugins (package.json), each built by
# scripts/build-js-plugin.sh (jco with the QuickJS backend) unless its inputs are unchanged.
build_js_plugins() {
    local out="$1" dir
    shift
    for dir in "$@"; do
        build_guest "$out" "$dir" "$(json_name "$dir/package.json")" js \
            "$repo/guest-sdk/js" "$repo/tools/js"
    done
}

# build_python_plugins OUT DIR...: Python plugins (pyproject.toml), each built by
# scripts/build-python-plugin.sh (componentize-py) unless its inputs are unchanged.
build_python_plugins() {
    local out="$1" dir
    shift
    for dir in "$@"; do
        build_guest "$out" "$dir" "$(pyproject_name "$dir/pyproject.toml")" python \
            "$repo/guest-sdk/python" "$repo/tools/python"
    done
}

# build_guest OUT DIR NAME LANG INPUT...: builds a JavaScript or Python plugin into
# $target/guest-build/NAME.wasm and installs it. Those builds take seconds and are not
# byte-identical from run to run, so a build is skipped when the hash of its inputs (the plugin
# directory, the language's SDK and toolchain pins, the WIT and the build script) matches the
# last build's: the installed component then keeps its content hash, hence its plugin version.
build_guest() {
    local out="$1" dir="$2" name="$3" lang="$4"
    shift 4
    local cache="$target/guest-build" hash
    hash="$(inputs_hash "$dir" "$@" "$repo/wit" "$repo/scripts/build-$lang-plugin.sh" \
        "$repo/scripts/lib/toolchains.sh")"
    mkdir -p "$cache"
    if [[ ! -f "$cache/$name.wasm" || "$(cat "$cache/$name.inputs" 2>/dev/null)" != "$hash" ]]; then
        rm -f "$cache/$name.inputs"
        "$repo/scripts/build-$lang-plugin.sh" "$dir" "$cache/$name.wasm"
        printf '%s\n' "$hash" >"$cache/$name.inputs"
    fi
    install_plugin "$cache/$name.wasm" "$dir" "$out" "$name"
}

# inputs_hash PATH...: a hash of the names and contents of the files under the paths, leaving
# out what builds and package managers write there.
inputs_hash() {
    find "$@" -type f -not -path '*/node_modules/*' -not -path '*/__pycache__/*' \
        -not -path '*/build/*' -not -path '*/target/*' -print0 |
        sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
}

# json_name PACKAGE_JSON: its "name".
json_name() {
    local name
    name="$(node -e 'process.stdout.write(require(process.argv[1]).name || "")' "$1")"
    [[ -n "$name" ]] || fail "$1 has no \"name\""
    printf '%s\n' "$name"
}

# pyproject_name PYPROJECT_TOML: its [project] name.
pyproject_name() {
    local name
    name="$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("project", {}).get("name", ""))' "$1")"
    [[ -n "$name" ]] || fail "$1 has no [project] name"
    printf '%s\n' "$name"
}

# install_plugin WASM DIR OUT NAME: checks WASM is a component and installs it as OUT/NAME.wasm,
# with DIR/manifest.toml as OUT/NAME.toml. Each file is written beside its place and renamed
# into it, manifest first, so a watcher never sees a partial file or a new component with an
# old manifest.
install_plugin() {
    local wasm="$1" dir="$2" out="$3" name="$4"
    # A component starts with "\0asm" and version 0x0d 0x00 0x01 0x00 (a core module: 1 0 0 0).
    local header
    header="$(head -c 8 "$wasm" | od -An -tx1 | tr -d ' \n')"
    [[ "$header" == 0061736d0d000100 ]] || fail "$wasm is not a WebAssembly component (header $header)"
    mkdir -p "$out"
    if [[ -f "$dir/manifest.toml" ]]; then
        cp "$dir/manifest.toml" "$out/.$name.toml.tmp"
        mv -f "$out/.$name.toml.tmp" "$out/$name.toml"
    else
        rm -f "$out/$name.toml"
    fi
    cp "$wasm" "$out/.$name.wasm.tmp"
    mv -f "$out/.$name.wasm.tmp" "$out/$name.wasm"
    local bytes
    bytes="$(stat -c %s "$out/$name.wasm")"
    printf '%-24s %8.1f KiB  %s\n' "$name" "$(awk "BEGIN { print $bytes / 1024 }")" "$out/$name.wasm"
}

# ensure_rust_target: adds the wasm32-wasip2 target once; silent when it is there.
ensure_rust_target() {
    if ! command -v rustup >/dev/null; then
        return 0 # A toolchain without rustup must provide the target itself.
    fi
    if ! rustup target list --installed | grep -qx "$wasm_target"; then
        rustup target add "$wasm_target"
    fi
}

# package_name CARGO_TOML: the `name` of its [package] table.
package_name() {
    local name
    name="$(sed -n '/^\[package\]/,/^\[/ s/^name *= *"\([^"]*\)".*/\1/p' "$1" | head -n 1)"
    [[ -n "$name" ]] || fail "$1 has no [package] name"
    printf '%s\n' "$name"
}

fail() {
    echo "build-plugins: $*" >&2
    exit 1
}

main "$@"
