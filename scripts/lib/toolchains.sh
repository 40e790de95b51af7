# The JavaScript and Python plugin toolchains, pinned in tools/ and installed on first use.
# Sourced by scripts/setup.sh, scripts/build-js-plugin.sh and scripts/build-python-plugin.sh.
#
#   ensure_js_toolchain      sets KEEPWARM_JCO to the pinned `jco` (npm ci of tools/js)
#   ensure_python_toolchain  sets KEEPWARM_COMPONENTIZE_PY to the pinned `componentize-py`
#                            (a virtual environment with tools/python/requirements.txt)
#
# Each toolchain is installed once per machine into $KEEPWARM_TOOLS_DIR (default
# ${XDG_CACHE_HOME:-~/.cache}/keepwarm/tools), in a directory named after the hash of its pin
# files: every checkout and CI run shares it, a changed pin installs beside the old one, and an
# interrupted install is redone (a directory counts only once its `.complete` stamp exists).
# Concurrent installs of the same toolchain wait for each other (flock). Only the npm registry
# and PyPI are used, through npm and pip.

kw_toolchains_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

kw_tools_dir() {
    printf '%s\n' "${KEEPWARM_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/keepwarm/tools}"
}

# kw_hash FILE...: a short hash of the files' contents (and the tool versions mixed in by the
# caller through extra arguments that are not files).
kw_hash() {
    local item
    for item in "$@"; do
        if [[ -f "$item" ]]; then cat "$item"; else printf '%s\n' "$item"; fi
    done | sha256sum | cut -c1-16
}

# kw_install_once NAME DIR INSTALL_FUNCTION: runs INSTALL_FUNCTION DIR unless DIR is complete,
# holding a lock so that two builds do not install into the same directory at once.
kw_install_once() {
    local name="$1" dir="$2" install="$3" root lock_fd
    [[ -f "$dir/.complete" ]] && return 0
    root="$(dirname "$dir")"
    mkdir -p "$root"
    exec {lock_fd}>"$root/.$name.lock"
    flock "$lock_fd"
    if [[ ! -f "$dir/.complete" ]]; then
        echo "toolchains: installing the $name plugin toolchain into $dir" >&2
        local start=$SECONDS
        rm -rf "$dir"
        mkdir -p "$dir"
        if ! "$install" "$dir"; then
            exec {lock_fd}>&-
            echo "toolchains: installing the $name toolchain failed" >&2
            return 1
        fi
        touch "$dir/.complete"
        echo "toolchains: $name toolchain installed in $((SECONDS - start)) s" >&2
    fi
    exec {lock_fd}>&-
}

kw_install_js() {
    local dir="$1"
    cp "$kw_toolchains_repo/tools/js/package.json" "$kw_toolchains_repo/tools/js/package-lock.json" "$dir/"
    # No package of the toolchain needs an install script; refusing them keeps the install inert.
    (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null)
}

ensure_js_toolchain() {
    command -v node >/dev/null && command -v npm >/dev/null || {
        echo "toolchains: Node.js and npm are needed to build JavaScript plugins" >&2
        return 1
    }
    local dir
    dir="$(kw_tools_dir)/js-$(kw_hash "$kw_toolchains_repo/tools/js/package.json" \
        "$kw_toolchains_repo/tools/js/package-lock.json" "node $(node --version)")"
    kw_install_once js "$dir" kw_install_js || return 1
    KEEPWARM_JCO="$dir/node_modules/.bin/jco"
    export KEEPWARM_JCO
}

kw_install_python() {
    local dir="$1"
    python3 -m venv "$dir" &&
        "$dir/bin/pip" install --quiet --no-input --disable-pip-version-check \
            -r "$kw_toolchains_repo/tools/python/requirements.txt"
}

ensure_python_toolchain() {
    command -v python3 >/dev/null || {
        echo "toolchains: python3 is needed to build Python plugins" >&2
        return 1
    }
    local dir
    dir="$(kw_tools_dir)/python-$(kw_hash "$kw_toolchains_repo/tools/python/requirements.txt" \
        "$(python3 --version 2>&1)")"
    kw_install_once python "$dir" kw_install_python || return 1
    KEEPWARM_COMPONENTIZE_PY="$dir/bin/componentize-py"
    export KEEPWARM_COMPONENTIZE_PY
}
