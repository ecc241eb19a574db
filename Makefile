# The two commands of the README. Both run the idempotent set-up first.
#   make bench   the main job: the latency benchmark on a single-machine topology
#   make test    every check CI runs: format, lints, a bounded fuzz run, the tests
.PHONY: setup bench test fmt-check clippy fuzz nextest bench-gate

FUZZ_SECONDS ?= 20
# pipefail: a fuzz crash must fail the pipeline through `tail`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

setup:
	@bash scripts/setup.sh

bench: setup
	@bash scripts/bench.sh

test: setup fmt-check clippy fuzz nextest

# The p99 gate: a short server suite (25 runs of 3000 round trips per
# measurement, ~10 s) compared with the committed baseline on the ratios to
# the same-run floors. Exit 1 on a regression beyond the limit, 2 when it
# cannot judge. Limit and baseline: docs/ARCHITECTURE.md, "The benchmark".
BENCH_GATE_LIMIT ?= 20%
bench-gate: setup
	cargo build --release --quiet -p devplane-bench
	out=$$(mktemp -d /tmp/dpbench-gate.XXXXXX) && \
	target/release/dpbench --quiet --scenario server --round-trips 3000 --out $$out && \
	target/release/dpbench compare bench/baseline.json $$out/summary.json \
		--max-regress p99=$(BENCH_GATE_LIMIT)

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets --quiet -- -D warnings

fuzz:
	cd wire/fuzz && cargo +nightly fuzz run parse -- -max_total_time=$(FUZZ_SECONDS) -dict=parse.dict -print_final_stats=1 2>&1 | tail -n 15

nextest:
	cargo nextest run --workspace --profile ci
