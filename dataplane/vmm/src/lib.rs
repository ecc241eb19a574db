//! `devplane-vmm`: the client VMM. Runs guests under KVM and turns their
//! port-I/O and MMIO exits into device-model accesses, local or remote;
//! `devplane-client` is its daemon.
//!
//! It owns: the VM and its vCPUs ([`kvm`]), the exit path ([`vcpu_io`],
//! the device interface [`bus`] over the [`devmap`], [`ring`],
//! [`uart_tap`]), the remote-access engine
//! ([`engine`]: the io_uring lanes that move the bytes), the devices the
//! VMM itself emulates ([`pci`], [`virtio`]), Linux boot ([`boot`]), the
//! builder that assembles all of it ([`vmm`]) and the client daemon
//! ([`daemon`]). [`guests`] assembles the small real-mode guests the tests,
//! the benchmark and the daemon's examples run.
//!
//! It must not touch: the server's code (it speaks to servers only through
//! `devplane-wire` datagrams), the eBPF toolchain, or the test kit (a
//! dev-dependency of its tests only).
#![deny(missing_docs)]

pub mod boot;
pub mod bus;
pub mod daemon;
pub mod devmap;
pub mod engine;
pub mod guests;
pub mod kvm;
pub mod migrate;
pub mod pci;
pub mod ring;
pub mod snapshot;
pub mod uart_tap;
pub mod vcpu_io;
pub mod virtio;
pub mod vmm;
