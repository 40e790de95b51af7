#!/usr/bin/env bash
# Builds every plugin into a WebAssembly component, ready for keepwarm to load.
#
#   plugins/<name>/        -> $TARGET/plugins/<name>.wasm       (+ <name>.toml, its manifest)
#   tests/plugins/<name>/  -> $TARGET/test-plugins/<name>.wasm  (+ <name>.toml)
#
# TARGET is $CARGO_TARGET_DIR, or <repo>/target. Runs from any directory. Each plugin directory
# is built by the function for its language: a Cargo.toml means Rust; JavaScript (package.json)
# and Python (pyproject.toml) have their place below but are not supported yet.
#
# Usage: scripts/build-plugins.sh
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Resolve a relative CARGO_TARGET_DIR against the caller's directory, as cargo would, then make
# cargo use the same absolute path whatever directory it runs in.
target="$(realpath -m "${CARGO_TARGET_DIR:-$repo/target}")"
export CARGO_TARGET_DIR="$target"
wasm_target=wasm32-wasip2

main() {
    build_tree "$repo/plugins" "$target/plugins"
    build_tree "$repo/tests/plugins" "$target/test-plugins"
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
    ((${#rust[@]} == 0)) || build_rust_plugins "$out" "${rust[@]}"
    ((${#js[@]} == 0)) || build_js_plugins "$out" "${js[@]}"
    ((${#python[@]} == 0)) || build_python_plugins "$out" "${python[@]}"
}

# build_rust_plugins OUT DIR...: Rust plugins are workspace members (cdylib); one cargo run
# builds them all with the `plugin` profile.
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
    (cd "$repo" && cargo build --quiet --profile plugin --target "$wasm_target" "${packages[@]}")
    local i
    for i in "${!names[@]}"; do
        name="${names[$i]}"
        install_plugin "$target/$wasm_target/plugin/${name//-/_}.wasm" "${dirs[$i]}" "$out" "$name"
    done
}

# build_js_plugins OUT DIR...: JavaScript plugins. To come: `jco componentize --backend quickjs`
# or the componentize-js CLI (see TOOLCHAIN-NOTES.md, "Guest toolchains"), then install_plugin.
build_js_plugins() {
    shift
    fail "JavaScript plugins are not built yet: $*"
}

# build_python_plugins OUT DIR...: Python plugins. To come: `componentize-py -d wit -w plugin
# componentize MODULE -o OUT.wasm` (see TOOLCHAIN-NOTES.md), then install_plugin.
build_python_plugins() {
    shift
    fail "Python plugins are not built yet: $*"
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
