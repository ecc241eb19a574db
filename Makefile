# The two commands of the README. Both run the idempotent set-up first.
#   make bench   the main job: the latency benchmark on a single-machine topology
#   make test    every check CI runs: format, lints, a bounded fuzz run, the tests,
#                the benchmark's regression gate
.PHONY: setup bench test fmt-check clippy fuzz nextest bench-gate

FUZZ_SECONDS ?= 20
# pipefail: a fuzz crash must fail the pipeline through `tail`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

setup:
	@bash scripts/setup.sh

bench: setup
	@bash scripts/bench.sh

test: setup fmt-check clippy fuzz nextest bench-gate

# The regression gate CI runs (part of `make test`): dpbench's short suite
# (server scenario, the client's remote port-I/O and the load sweep, 10000
# round trips per measurement, ~22 s) compared with the committed
# bench/baseline.json on the ratios to the same-run floors; after a regression the
# suite runs again (3 attempts at most) and a ratio fails only if every attempt
# regressed it. Exit 1 on a regression beyond the limits, 2 when it cannot judge. Suite, limits, and how to record a new baseline:
# docs/ARCHITECTURE.md, "The gate".
bench-gate: setup
	cargo build --release --quiet -p devplane-bench
	target/release/dpbench gate

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets --quiet -- -D warnings

fuzz:
	cd wire/fuzz && cargo +nightly fuzz run parse -- -max_total_time=$(FUZZ_SECONDS) -dict=parse.dict -print_final_stats=1 2>&1 | tail -n 15

nextest:
	cargo nextest run --workspace --profile ci
