//! Virtio devices of a Linux guest, behind a PCI host bridge.
//!
//! The transport is **legacy virtio-pci over an I/O BAR** (virtio 0.9.5):
//! Debian's kernel builds virtio-mmio without `VIRTIO_MMIO_CMDLINE_DEVICES`,
//! so a virtio-mmio device would have to be announced in ACPI tables, while
//! PCI is found by the kernel itself through configuration mechanism #1
//! (ports `0xCF8`/`0xCFC`, [`crate::pci`]) with no firmware tables
//! at all. A legacy I/O BAR also keeps every register access a port-I/O
//! exit, the cheapest exit KVM has.
//!
//! **Where the block device runs.** A virtqueue lives in guest memory, and
//! guest memory lives on the client. Walking descriptors from the server
//! would cost a network round trip per ring access (about seven per
//! request), so the virtio transport and queue ([`blk`], [`queue`]) run in
//! the client's vCPU thread, where the memory is, and the *disk* — its
//! contents, capacity, write cache and flush — is the `blockstore` device
//! model, which runs on the server (or locally) and is reached with the
//! same request records as every other model ([`store`]).

pub mod blk;
pub mod bulk;
pub mod queue;
pub mod store;

/// Why a virtio request failed. The guest sees `VIRTIO_BLK_S_IOERR` (or a
/// used-ring entry of length 0); the device keeps running.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VirtioError {
    /// A descriptor or ring address lies outside guest memory.
    #[error("{len} bytes at guest address {gpa:#x} lie outside guest memory")]
    Dma {
        /// Guest-physical address.
        gpa: u64,
        /// Length.
        len: usize,
    },
    /// A descriptor chain is malformed.
    #[error("bad descriptor chain: {0}")]
    BadDescriptor(&'static str),
    /// The block store refused or did not answer.
    #[error("block store: {0}")]
    Store(String),
}
