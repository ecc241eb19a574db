#!/usr/bin/env bash
# The main job: devplane's latency benchmark on a single-machine topology
# (client and server network namespaces joined by veth, the real XDP
# program, real KVM guests). Prints the tables and writes summary.json,
# .hgrm files and latency.svg under bench-results/. Arguments go to
# dpbench (`scripts/bench.sh --help`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p devplane-bench
exec target/release/dpbench "$@"
