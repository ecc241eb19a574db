//! devplane's XDP steering program.
//!
//! It owns the first hop of every request on a server NIC: parse Ethernet /
//! IPv4 (options allowed) / UDP, check the devplane port, magic, version,
//! kind and record count at the fixed offsets of `devplane_wire::header`,
//! look the device-model id up in the routing map, optionally check the
//! sending client against the clients map, and then pass, redirect to the
//! owning worker's AF_XDP socket, or drop. Every verdict and drop reason is
//! counted per CPU in `DP_STATS`. Traffic that is not devplane's passes
//! untouched. Map names and types come from `devplane-wire`, the crate the
//! userspace loader uses too.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

/// On the host this crate only type-checks (for clippy); the real program is
/// built for `bpfel-unknown-none` by `dataplane/server/build.rs`.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// The kernel refuses GPL-only helpers to non-GPL programs.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
