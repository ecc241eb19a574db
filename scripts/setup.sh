#!/usr/bin/env bash
# One idempotent set-up step for building, testing and benchmarking devplane
# on Debian 12 as root. Both README commands (`make bench`, `make test`) run
# it first. When everything is present it only checks, in a few seconds.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LLVM_VER=22
LLVM_PREFIX="/usr/lib/llvm-${LLVM_VER}"
# Debian packages: bpf-linker's LLVM, iproute2 for network namespaces.
# etcd-server/etcd-client: the etcd store's tests start a private etcd each
# (dataplane/testkit/src/etcd.rs); protobuf-compiler and libprotobuf-dev
# (the well-known .proto files): the etcd-client crate's build script.
# qemu-utils: qemu-nbd, the NBD server dpbench's blk scenario compares with.
APT_PKGS=(llvm-${LLVM_VER}-dev libpolly-${LLVM_VER}-dev zlib1g-dev libzstd-dev iproute2 ethtool build-essential pkg-config
          etcd-server etcd-client protobuf-compiler libprotobuf-dev qemu-utils)
STABLE="$(sed -n 's/^channel *= *"\(.*\)"/\1/p' "$ROOT/rust-toolchain.toml")"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

export PATH="$HOME/.cargo/bin:$PATH"

if [[ "$(id -u)" != 0 ]]; then
    die "must run as root (it installs Debian packages, and devplane's tests load XDP programs and create network namespaces). Run: sudo -E bash scripts/setup.sh"
fi
command -v rustup >/dev/null || die "rustup not found: install Rust with rustup (https://rustup.rs), then run this again"
command -v apt-get >/dev/null || die "apt-get not found: this set-up supports Debian 12 (bookworm) only"

# 1. Debian packages.
missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list"
    apt-get install -y -qq "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
        # Debian starts a system etcd on 2379; devplane's tests start their
        # own (private ports and data), and a cluster's etcd is the
        # operator's to configure: leave the packaged service off.
        systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi

# 2. Toolchains: the pinned stable (with clippy and rustfmt) and a nightly
#    with rust-src for the eBPF target.
if ! rustup toolchain list | grep -q "^${STABLE}"; then
    say "installing Rust ${STABLE}"
    rustup toolchain install "$STABLE" --profile minimal -c clippy -c rustfmt || die "rustup could not install ${STABLE}"
fi
for c in clippy rustfmt; do
    rustup component list --toolchain "$STABLE" --installed 2>/dev/null | grep -q "^$c" \
        || rustup component add "$c" --toolchain "$STABLE" || die "rustup could not add $c to ${STABLE}"
done
if ! rustup toolchain list | grep -q "^nightly"; then
    say "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal || die "rustup could not install nightly"
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q "^rust-src"; then
    say "adding rust-src to nightly (the eBPF crate is built with -Z build-std=core)"
    rustup component add rust-src --toolchain nightly || die "rustup could not add rust-src to nightly"
fi

# 3. Cargo tools.
if ! command -v bpf-linker >/dev/null; then
    say "building bpf-linker against LLVM ${LLVM_VER} (about 75 s)"
    # The variable's name holds the LLVM version, so it is passed with env(1):
    # a shell assignment prefix cannot have an expansion in its name.
    env PATH="${LLVM_PREFIX}/bin:$PATH" "LLVM_SYS_${LLVM_VER}1_PREFIX=${LLVM_PREFIX}" \
        cargo +"$STABLE" install bpf-linker --locked --no-default-features --features "llvm-${LLVM_VER}" \
        || die "cargo install bpf-linker failed (needs llvm-${LLVM_VER}-dev and LLVM_SYS_${LLVM_VER}1_PREFIX=${LLVM_PREFIX})"
fi
if ! command -v cargo-nextest >/dev/null; then
    say "installing cargo-nextest"
    cargo +"$STABLE" install cargo-nextest --locked || die "cargo install cargo-nextest failed"
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    say "installing cargo-fuzz"
    cargo +"$STABLE" install cargo-fuzz --locked || die "cargo install cargo-fuzz failed"
fi

# 4. bpffs, where maps are pinned.
if ! mountpoint -q /sys/fs/bpf; then
    mount -t bpf bpf /sys/fs/bpf || say "warning: could not mount bpffs on /sys/fs/bpf"
fi

# 5. The guest kernel and initramfs for the Linux boot test (Debian's
#    linux-image-amd64 and busybox-static, into target/guest).
bash "$ROOT/scripts/guest-kernel.sh" || die "scripts/guest-kernel.sh failed"

say "ready"
