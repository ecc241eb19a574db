#!/usr/bin/env bash
# The guest kernels and initramfs for devplane's Linux boots (the
# e2e_linux_boot and e2e_linux_remote tests and anyone booting Linux in the
# client VMM).
#
# Into ${DEVPLANE_GUEST_DIR:-<repo>/target/guest} it puts:
#   vmlinuz             Debian's own, unmodified bzImage: the
#                       linux-image-6.1.*-amd64 that linux-image-amd64
#                       depends on (Debian 12)
#   vmlinux             the same kernel, decompressed (ELF)
#   initramfs.cpio.gz   busybox-static with its applet links, guest/init as
#                       /init, and the virtio modules of the same kernel
#                       package under /lib/modules (load order in
#                       /lib/modules/load-order)
#   initramfs.cpio      the same, uncompressed (nothing for the guest to
#                       inflate: that counts where guest code is slow)
#   kernel-version      the kernel package's name and version
#   minimal/vmlinux     a minimal kernel (ELF) built from Debian's
#                       linux-source-6.1 with `make tinyconfig` and
#                       guest/linux.config, for a /dev/kvm that emulates
#                       guest kernel code (nested PVM), where Debian's
#                       generic kernel takes many minutes to boot. Built
#                       where /sys/module/kvm_pvm exists or with
#                       DEVPLANE_GUEST_MINIMAL=1 (=0: never)
#   minimal/config      its full .config
#   minimal/init        guest/min-init.c, built static: the /sbin/init the
#                       boot tests put on the minimal kernel's ext2 root
#   minimal/kernel-version  its source package's version and fragment hash
# Nothing here is committed: everything comes from Debian's archive (`apt-get
# download`, unpacked with `dpkg-deb -x`, and the linux-source-6.1 package).
# The minimal kernel's build tree (minimal-build/, ~1.5 GB) is removed once
# the kernel is copied out; DEVPLANE_GUEST_KEEP_BUILD=1 keeps it, so that a
# changed fragment rebuilds only what it changes.
#
# Idempotent and quick when done: the Debian files are rebuilt only when
# the kernel package Debian names, busybox's version, guest/init or this
# script changed; the minimal kernel only when linux-source-6.1's version,
# guest/linux.config or its build recipe (MIN_RECIPE) changed (stamp files
# record them). The minimal kernel's build (about 6 minutes on 2 cores)
# runs under `nice`. Needs root for apt-get (scripts/setup.sh runs it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${DEVPLANE_GUEST_DIR:-$ROOT/target/guest}"
# The modules the guest's block device needs (virtio-pci legacy + virtio-blk);
# their dependencies are added from `modinfo -F depends`.
ROOT_MODULES=(virtio_pci virtio_blk)

say() { printf 'guest-kernel: %s\n' "$*"; }
die() { printf 'guest-kernel: error: %s\n' "$*" >&2; exit 1; }

command -v apt-get >/dev/null || die "apt-get not found: the guest kernel comes from Debian 12 (bookworm) packages"

# Host tools: cpio (newc archives), xz (unpacks the kernel) and kmod
# (modinfo reads .ko dependencies).
need=()
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v modinfo >/dev/null || [[ -x /sbin/modinfo ]] || need+=(kmod)
updated=0
apt_update() {
    if ((updated == 0)); then
        apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list"
        updated=1
    fi
}
if ((${#need[@]})); then
    [[ "$(id -u)" == 0 ]] || die "${need[*]} missing and not root: run sudo -E bash scripts/setup.sh"
    say "installing ${need[*]}"
    apt_update
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null \
        || die "apt-get install ${need[*]} failed"
fi
MODINFO="$(command -v modinfo || echo /sbin/modinfo)"

# The minimal kernel: Linux from Debian's linux-source-6.1, `make
# tinyconfig` plus guest/linux.config, built in $MIN_BUILD (removed after
# the build unless DEVPLANE_GUEST_KEEP_BUILD=1) and copied to
# $OUT/minimal/vmlinux.
MIN_FRAGMENT="$ROOT/guest/linux.config"
MIN_OUT="$OUT/minimal"
MIN_BUILD="$OUT/minimal-build"
# Bump when the build steps below change what they produce.
MIN_RECIPE=1
want_minimal() {
    case "${DEVPLANE_GUEST_MINIMAL:-}" in
        1) return 0 ;;
        0) return 1 ;;
    esac
    [[ -e /sys/module/kvm_pvm ]]
}
# The minimal kernel's /sbin/init: guest/min-init.c, a static program with
# no C library (a fraction of a second to build, so built every time).
minimal_init() {
    mkdir -p "$MIN_OUT"
    gcc -static -nostdlib -ffreestanding -fno-stack-protector -fno-pie -no-pie -O2 \
        -o "$MIN_OUT/init.tmp" "$ROOT/guest/min-init.c" \
        || die "building guest/min-init.c failed"
    mv -f "$MIN_OUT/init.tmp" "$MIN_OUT/init"
}
minimal_kernel() {
    if ! want_minimal; then
        say "minimal kernel: not built (/dev/kvm runs guest kernels natively; DEVPLANE_GUEST_MINIMAL=1 builds it)"
        return 0
    fi
    [[ -f "$MIN_FRAGMENT" ]] || die "$MIN_FRAGMENT is missing"
    # Build tools, and e2fsprogs for the ext2 root the boot tests make.
    local tools=() t
    for t in make:make gcc:gcc bc:bc flex:flex bison:bison perl:perl xz:xz-utils mke2fs:e2fsprogs; do
        command -v "${t%%:*}" >/dev/null || [[ -x "/sbin/${t%%:*}" ]] || tools+=("${t#*:}")
    done
    [[ -f /usr/include/libelf.h ]] || tools+=(libelf-dev)
    [[ -f /usr/include/openssl/opensslv.h ]] || tools+=(libssl-dev)
    local src_ver cand
    src_ver="$(dpkg-query -W -f='${Version}' linux-source-6.1 2>/dev/null || true)"
    cand="$(apt-cache policy linux-source-6.1 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')"
    if [[ -z "$cand" || "$cand" == "(none)" ]]; then
        apt_update
        cand="$(apt-cache policy linux-source-6.1 2>/dev/null | awk '$1 == "Candidate:" { print $2 }')"
    fi
    [[ -n "$cand" && "$cand" != "(none)" ]] || die "apt-cache has no linux-source-6.1: is this Debian 12 (bookworm)?"
    [[ "$src_ver" == "$cand" ]] || tools+=(linux-source-6.1)
    if ((${#tools[@]})); then
        [[ "$(id -u)" == 0 ]] || die "${tools[*]} missing and not root: run sudo -E bash scripts/setup.sh"
        say "installing ${tools[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tools[@]}" >/dev/null \
            || die "apt-get install ${tools[*]} failed"
        src_ver="$(dpkg-query -W -f='${Version}' linux-source-6.1)"
    fi
    local tarball=/usr/src/linux-source-6.1.tar.xz
    [[ -f "$tarball" ]] || die "linux-source-6.1 $src_ver installed but $tarball is missing"

    local want_min stamp="$MIN_OUT/.stamp"
    want_min="$({ printf 'linux-source-6.1 %s recipe %s\n' "$src_ver" "$MIN_RECIPE"; cat "$MIN_FRAGMENT"; } \
        | sha256sum | cut -d' ' -f1)"
    minimal_init
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_min" && -f "$MIN_OUT/vmlinux" ]]; then
        say "up to date: $MIN_OUT/vmlinux (linux-source-6.1 $src_ver, guest/linux.config)"
        return 0
    fi

    # The source tree, unpacked once per package version.
    local tree="$MIN_BUILD/linux-source-6.1"
    if [[ ! -f "$MIN_BUILD/.source-version" || "$(cat "$MIN_BUILD/.source-version")" != "$src_ver" || ! -f "$tree/Makefile" ]]; then
        say "unpacking linux-source-6.1 $src_ver into $MIN_BUILD"
        rm -rf "$MIN_BUILD"
        mkdir -p "$MIN_BUILD"
        tar -xJf "$tarball" -C "$MIN_BUILD" || die "unpacking $tarball failed"
        [[ -f "$tree/Makefile" ]] || die "$tarball has no linux-source-6.1/Makefile"
        printf '%s\n' "$src_ver" >"$MIN_BUILD/.source-version"
    fi
    local mk=(make -C "$tree" ARCH=x86_64 -s)
    # Kbuild merges a fragment named on the command line from kernel/configs/.
    cp "$MIN_FRAGMENT" "$tree/kernel/configs/devplane.config"
    # (Kconfig's notes on the fragment overriding choices go to the log.)
    "${mk[@]}" tinyconfig >"$MIN_BUILD/config.log" 2>&1 \
        || die "make tinyconfig failed: see $MIN_BUILD/config.log"
    "${mk[@]}" devplane.config >>"$MIN_BUILD/config.log" 2>&1 \
        || die "merging guest/linux.config failed: see $MIN_BUILD/config.log"
    # Every option of the fragment must have survived Kconfig's dependency
    # resolution (a misspelt or unmet one is silently dropped).
    local line missing=()
    while IFS= read -r line; do
        [[ "$line" =~ ^CONFIG_ ]] || continue
        grep -qxF "$line" "$tree/.config" || missing+=("$line")
    done <"$MIN_FRAGMENT"
    ((${#missing[@]} == 0)) || die "guest/linux.config: not in the resulting .config (unmet dependencies?): ${missing[*]}"
    say "building the minimal kernel (linux-source-6.1 $src_ver, tinyconfig + guest/linux.config; a few minutes)"
    nice -n 10 "${mk[@]}" -j"$(nproc)" vmlinux >"$MIN_BUILD/build.log" 2>&1 \
        || die "the minimal kernel's build failed: see $MIN_BUILD/build.log"
    mkdir -p "$MIN_OUT"
    cp "$tree/vmlinux" "$MIN_OUT/vmlinux.tmp"
    mv -f "$MIN_OUT/vmlinux.tmp" "$MIN_OUT/vmlinux"
    cp "$tree/.config" "$MIN_OUT/config"
    printf 'linux-source-6.1 %s, tinyconfig + guest/linux.config (%s)\n' "$src_ver" \
        "$(sha256sum "$MIN_FRAGMENT" | cut -c1-12)" >"$MIN_OUT/kernel-version"
    printf '%s\n' "$want_min" >"$stamp"
    say "minimal kernel: $MIN_OUT/vmlinux ($(cat "$MIN_OUT/kernel-version"))"
    if [[ "${DEVPLANE_GUEST_KEEP_BUILD:-0}" != 1 ]]; then
        rm -rf "$MIN_BUILD"
        say "removed the build tree $MIN_BUILD (DEVPLANE_GUEST_KEEP_BUILD=1 keeps it)"
    fi
}

# The kernel package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64.
resolve_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-6\.1\.[0-9.-]*-amd64$/ { print $2; exit }'
}
# "<kernel candidate> <busybox-static candidate>" from one apt-cache call
# (each call costs about a second).
candidates() {
    apt-cache policy "$KPKG" busybox-static 2>/dev/null \
        | awk -v k="$KPKG:" '$1 == k { p = "k" } $1 == "busybox-static:" { p = "b" }
            $1 == "Candidate:" { c[p] = $2 } END { print c["k"], c["b"] }'
}

KPKG="$(resolve_kernel)"
if [[ -z "$KPKG" ]]; then
    apt_update
    KPKG="$(resolve_kernel)"
fi
[[ -n "$KPKG" ]] || die "apt-cache names no linux-image-6.1.*-amd64 for linux-image-amd64: is this Debian 12 (bookworm)?"
read -r KVER_PKG BB_VER <<<"$(candidates)" || true
if [[ -z "$KVER_PKG" || "$KVER_PKG" == "(none)" || -z "$BB_VER" || "$BB_VER" == "(none)" ]]; then
    apt_update
    read -r KVER_PKG BB_VER <<<"$(candidates)" || true
fi
[[ -n "$KVER_PKG" && "$KVER_PKG" != "(none)" ]] || die "no candidate version of $KPKG: run apt-get update"
[[ -n "$BB_VER" && "$BB_VER" != "(none)" ]] || die "no candidate version of busybox-static: run apt-get update"

inputs_hash() {
    {
        printf '%s %s\n%s\n' "$KPKG" "$KVER_PKG" "$BB_VER"
        cat "${BASH_SOURCE[0]}"
        cat "$ROOT/guest/init"
    } | sha256sum | cut -d' ' -f1
}
STAMP="$OUT/.stamp"
want="$(inputs_hash)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -f "$OUT/vmlinuz" && -f "$OUT/vmlinux" && -f "$OUT/initramfs.cpio" && -f "$OUT/initramfs.cpio.gz" ]]; then
    say "up to date: $OUT/vmlinuz, $OUT/initramfs.cpio.gz ($KPKG $KVER_PKG)"
    minimal_kernel
    exit 0
fi

mkdir -p "$OUT"
work="$(mktemp -d "$OUT/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say "downloading $KPKG $KVER_PKG and busybox-static $BB_VER"
# apt-get download writes into the current directory; as root it warns that
# the _apt user cannot write there, which is harmless.
(cd "$work" && apt-get download -qq "$KPKG=$KVER_PKG" "busybox-static=$BB_VER" 2>&1 \
    | grep -v 'Download is performed unsandboxed' || true)
debs=("$work"/*.deb)
[[ -e "${debs[0]}" && ${#debs[@]} == 2 ]] || die "apt-get download of $KPKG and busybox-static failed"
mkdir -p "$work/x"
for d in "${debs[@]}"; do
    dpkg-deb -x "$d" "$work/x" || die "dpkg-deb -x $d failed"
done

vmlinuz=("$work"/x/boot/vmlinuz-*)
[[ -f "${vmlinuz[0]}" ]] || die "$KPKG has no /boot/vmlinuz-*"
KREL="$(basename "${vmlinuz[0]}")"
KREL="${KREL#vmlinuz-}"
MODDIR="$work/x/lib/modules/$KREL"
[[ -d "$MODDIR" ]] || die "$KPKG has no /lib/modules/$KREL"

# The initramfs tree.
rd="$work/rd"
mkdir -p "$rd"/{bin,sbin,dev,proc,sys,tmp,lib/modules}
BB="$work/x/bin/busybox"
[[ -x "$BB" ]] || die "busybox-static has no /bin/busybox"
cp "$BB" "$rd/bin/busybox"
for applet in $("$BB" --list); do
    [[ "$applet" == busybox ]] || ln -sf busybox "$rd/bin/$applet"
done
install -m 0755 "$ROOT/guest/init" "$rd/init"

# Modules in dependency order (post-order of `modinfo -F depends`).
declare -A seen=()
order=()
find_ko() {
    local f
    f="$(find "$MODDIR/kernel" \( -name "$1.ko" -o -name "$1.ko.xz" -o -name "$1.ko.zst" -o -name "$1.ko.gz" \) -print -quit)"
    [[ -n "$f" ]] || die "module $1 not in $KPKG (built in? then drop it from ROOT_MODULES)"
    case "$f" in *.ko) ;; *) die "module $f is compressed; this script copies only uncompressed .ko files";; esac
    printf '%s' "$f"
}
visit() {
    local name="$1" ko deps dep
    [[ -n "${seen[$name]:-}" ]] && return 0
    seen[$name]=1
    ko="$(find_ko "$name")"
    deps="$("$MODINFO" -F depends "$ko")"
    for dep in ${deps//,/ }; do
        visit "$dep"
    done
    cp "$ko" "$rd/lib/modules/$name.ko"
    order+=("$name")
}
for m in "${ROOT_MODULES[@]}"; do
    visit "$m"
done
printf '%s\n' "${order[@]}" >"$rd/lib/modules/load-order"

(cd "$rd" && find . -mindepth 1 -print0 | LC_ALL=C sort -z \
    | cpio --null --create --format=newc --owner=0:0 --quiet) >"$work/initramfs.cpio"
gzip -9 -n -k "$work/initramfs.cpio"

cp "${vmlinuz[0]}" "$work/vmlinuz"

# The same kernel decompressed, as an ELF vmlinux (the kernel's own
# scripts/extract-vmlinux does the same): its compressed payload is the
# first xz (Debian's CONFIG_KERNEL_XZ), gzip or zstd stream that unpacks to
# an ELF file. Booting it skips the decompressor, which matters where guest
# code runs slowly (an instruction-emulating /dev/kvm).
extract_vmlinux() {
    local magic tool off
    for pair in 'fd377a585a00:xz -dc' '1f8b0800:gzip -dc' '28b52ffd:zstd -dcq'; do
        magic="${pair%%:*}"
        tool="${pair#*:}"
        command -v "${tool%% *}" >/dev/null || continue
        for off in $(od -An -v -tx1 -w1 "$work/vmlinuz" | tr -d ' \n' \
                | grep -ob "$magic" | cut -d: -f1); do
            ((off % 2 == 0)) || continue
            tail -c "+$((off / 2 + 1))" "$work/vmlinuz" | $tool >"$work/vmlinux" 2>/dev/null || true
            if [[ "$(head -c 4 "$work/vmlinux" | od -An -tx1 | tr -d ' ')" == 7f454c46 ]]; then
                return 0
            fi
        done
    done
    return 1
}
extract_vmlinux || die "could not extract vmlinux from $KPKG's vmlinuz (needs xz-utils, gzip or zstd)"
printf '%s %s (%s)\n' "$KPKG" "$KVER_PKG" "$KREL" >"$work/kernel-version"
rm -rf "$OUT/modules"
mkdir -p "$OUT/modules"
cp "$rd"/lib/modules/* "$OUT/modules/"
for f in vmlinuz vmlinux initramfs.cpio initramfs.cpio.gz kernel-version; do
    mv -f "$work/$f" "$OUT/$f"
done
printf '%s\n' "$want" >"$STAMP"
say "kernel:    $OUT/vmlinuz ($KPKG $KVER_PKG), decompressed: $OUT/vmlinux"
say "initramfs: $OUT/initramfs.cpio.gz and uncompressed $OUT/initramfs.cpio (busybox-static $BB_VER; modules: ${order[*]})"
minimal_kernel
