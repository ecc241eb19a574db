//! The client VMM: runs guests under KVM and turns their port-I/O and MMIO
//! exits into device-model accesses, local or remote.
//!
//! [`kvm`] owns the VM (guest memory, in-kernel PIC/IOAPIC/LAPIC, interrupt
//! injection) and the vCPU run loop; [`guests`] assembles the small
//! real-mode test guests the tests and benchmarks run; [`boot`] loads and
//! enters an unmodified Linux kernel instead; [`devmap`],
//! [`vcpu_io`], [`ring`] and [`engine`] route exits to device models.

pub mod boot;
pub mod daemon;
pub mod devmap;
pub mod engine;
pub mod guests;
pub mod kvm;
pub mod pci;
pub mod ring;
pub mod uart_tap;
pub mod vcpu_io;
pub mod virtio;
pub mod vmm;
