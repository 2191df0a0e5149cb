#!/usr/bin/env bash
# Reproduces BENCHMARKS.md's proxy section: cistern's proxy against nginx
# (Debian package) doing a plain proxy_pass, same upstream (nginx
# `return 200`), same load generator (wrk), one run. Loopback only.
# Usage: bash scripts/proxybench.sh [--secs N] [--upstream-core 0|1]
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
if [ ${#need[@]} -gt 0 ]; then
  sudo_cmd=""; [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get install -y --no-install-recommends "${need[@]}"
fi
command -v taskset >/dev/null || { echo "proxybench: taskset (util-linux) is required" >&2; exit 2; }
cargo build --release --bin cistern --example proxybench
target/release/examples/proxybench --cistern target/release/cistern "$@"
