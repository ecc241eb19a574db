# The two commands of the README. Both run the idempotent set-up first.
#   make bench   the main job: the latency benchmark on a single-machine topology
#   make test    every check CI runs: format, lints, a bounded fuzz run, the tests
.PHONY: setup bench test fmt-check clippy fuzz nextest

FUZZ_SECONDS ?= 20
# pipefail: a fuzz crash must fail the pipeline through `tail`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c

setup:
	@bash scripts/setup.sh

bench: setup
	@bash scripts/bench.sh

test: setup fmt-check clippy fuzz nextest

fmt-check:
	cargo fmt --all -- --check

clippy:
	cargo clippy --workspace --all-targets --quiet -- -D warnings

fuzz:
	cd wire/fuzz && cargo +nightly fuzz run parse -- -max_total_time=$(FUZZ_SECONDS) -dict=parse.dict -print_final_stats=1 2>&1 | tail -n 15

nextest:
	cargo nextest run --workspace --profile ci
