#!/usr/bin/env bash
# Reproduces BENCHMARKS.md: the criterion micro-benchmarks, then the load test
# (cistern pinned to core 0, the load generator on core 1, loopback only,
# bounded in time). Usage: bash scripts/bench.sh [loadgen args, e.g. --algorithm EdDSA]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v taskset >/dev/null || { echo "bench: taskset (util-linux) is required" >&2; exit 2; }
cargo build --release --bin cistern --example loadgen
echo "== load test (server on core 0, generator on core 1)"
target/release/examples/loadgen --cistern target/release/cistern --server-core 0 --generator-core 1 "$@"
if [ "${SKIP_CRITERION:-}" != 1 ]; then
  echo "== criterion micro-benchmarks"
  cargo bench --features bench-fixtures --bench exchange --bench revocation --bench audit -- --noplot
fi
