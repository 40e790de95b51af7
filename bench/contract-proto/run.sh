#!/usr/bin/env bash
# Measures one plugin call per contract in process (README.md): 0.1.0's (one string per text),
# packed, flat (0.2.0's) and flat answers three ways.
# Usage: bench/contract-proto/run.sh [changes] [batch] [rounds]   (defaults 50000 148 5)
# Builds in $CARGO_TARGET_DIR (default: target/ at the repository's root), about 5 minutes cold.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="$(realpath -m "${CARGO_TARGET_DIR:-$repo/target}")/contract-proto"
out="$target/wasm"
mkdir -p "$out"
python3 "$here/make_wit.py" "$repo/wit/v0.1.0/keepwarm.wit"
for contract in old packed flat answers answersref; do
    (cd "$here/guest" && CARGO_TARGET_DIR="$target" cargo build --quiet --release \
        --target wasm32-wasip2 --no-default-features --features "$contract")
    cp "$target/wasm32-wasip2/release/guest.wasm" "$out/$contract.wasm"
done
(cd "$here" && CARGO_TARGET_DIR="$target" cargo build --quiet --release -p contract-proto)
exec "$target/release/contract-proto" "$out" "$@"
