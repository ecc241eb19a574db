//! Builds the XDP program (ebpf/) for bpfel-unknown-none with the installed
//! nightly and rust-src, and leaves the object in OUT_DIR for
//! `include_bytes_aligned!`. Needs bpf-linker: run `scripts/setup.sh`.

fn main() {
    let ebpf = aya_build::Package {
        name: "devplane-ebpf",
        root_dir: "../../ebpf",
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([ebpf], aya_build::Toolchain::default()) {
        panic!(
            "building the XDP program failed: {e:#}\n\
             It needs the nightly toolchain with rust-src and bpf-linker; \
             run `bash scripts/setup.sh` as root to install them."
        );
    }
}
