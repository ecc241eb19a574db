#!/usr/bin/env bash
# The main job: devplane's latency benchmark on a single-machine topology.
# The end-to-end scenarios (floor, pio, mmio, irq, throughput, boot) arrive
# with the server, client and dpbench issues; today dpbench measures the XDP
# steering program per frame and datagram parsing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --quiet -p devplane-bench
exec target/release/dpbench "$@"
