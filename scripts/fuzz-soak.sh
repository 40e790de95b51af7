#!/usr/bin/env bash
# Soak mode of the decoder's property tests: a million cases per property, release build.
set -euo pipefail
cd "$(dirname "$0")/.."
KEEPWARM_FUZZ_CASES="${KEEPWARM_FUZZ_CASES:-1000000}" cargo test --release -p keepwarm --lib message::fuzz
