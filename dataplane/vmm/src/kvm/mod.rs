//! The KVM half of the client VMM: one VM with flat guest memory and the
//! in-kernel interrupt controllers, vCPUs that start in 16-bit real mode
//! (the test guests) or in a given CPU state (64-bit long mode for Linux,
//! [`CpuState`]), and a run loop that hands port-I/O and MMIO exits to an
//! [`IoHandler`].
//!
//! Layout and conventions:
//! - guest memory is one anonymous mapping ([`memory`]), KVM slot 0 at GPA 0; any GPA
//!   above it exits to userspace as MMIO;
//! - the in-kernel irqchip (master/slave 8259 PIC, IOAPIC, one LAPIC per
//!   vCPU) is created; GSIs 0-15 reach the PIC through the default routing.
//!   vCPU 0's LAPIC has LINT0 in ExtINT mode, so PIC interrupts reach it
//!   even in real mode; other vCPUs keep LINT0 masked;
//! - a write of any value to [`DONE_PORT`] ends [`Vcpu::run`] with
//!   [`VcpuExit::Done`]: the test guests report their self-check there.
//!   A vCPU running a real operating system turns that off
//!   ([`Vcpu::set_done_port`]): Linux uses port `0xf4` like any other;
//! - the client gives every VM the in-kernel PIT ([`Vm::create_pit`]), as
//!   on a PC; devices mapped on its ports or the PICs' are refused
//!   ([`IN_KERNEL_PORTS`]);
//! - a vCPU blocked in `KVM_RUN` (a guest in `hlt` waits inside the kernel
//!   with the in-kernel irqchip) is interrupted by [`VcpuKicker::kick`]: a
//!   real-time signal ([`kick_signal`]) whose handler sets the vCPU's
//!   `immediate_exit`, so that a kick landing just before `KVM_RUN` is not
//!   lost either.
//!
//! Files by concern (Firecracker's `vstate/{vm,vcpu,memory}` is the
//! model): [`vm`] (the VM, its irqchip and PIT, interrupt lines), [`memory`]
//! (guest memory and [`MemHandle`]), [`cpu`] (vCPU creation and CPU
//! set-up: real mode, [`CpuState`], CPUID, LAPIC pins), [`vcpu`] (the run
//! loop), `exit` (decoding one exit), [`kick`] (interrupting `KVM_RUN`
//! from another thread) and `assist` (instructions KVM's emulator could
//! not complete).
//!
//! ```no_run
//! use std::sync::atomic::AtomicBool;
//! use devplane_vmm::guests;
//! use devplane_vmm::kvm::{IoHandler, Vm, VcpuExit};
//! use devplane_wire::AccessSize;
//!
//! struct Null;
//! impl IoHandler for Null {
//!     fn pio_read(&mut self, _: u16, _: AccessSize) -> u64 { 0 }
//!     fn pio_write(&mut self, _: u16, _: AccessSize, _: u64) {}
//!     fn mmio_read(&mut self, _: u64, _: AccessSize) -> u64 { 0 }
//!     fn mmio_write(&mut self, _: u64, _: AccessSize, _: u64) {}
//! }
//!
//! let guest = guests::pio_loop(0x500, 10)?;
//! let vm = Vm::new(0x80000)?;
//! vm.load(guest.load_gpa, &guest.code)?;
//! let mut vcpu = vm.create_vcpu(0, guest.entry)?;
//! let exit = vcpu.run(&mut Null, &AtomicBool::new(false))?;
//! assert_eq!(exit, VcpuExit::Done(0));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod assist;
pub mod cpu;
mod exit;
pub mod kick;
pub mod memory;
pub mod state;
pub mod vcpu;
pub mod vm;

use devplane_wire::AccessSize;

pub use cpu::{CpuState, CpuidBits, CpuidReg, Entry};
pub use kick::{VcpuKicker, kick_signal};
pub use memory::MemHandle;
pub use state::{MachineState, StateBytes, VcpuState};
pub use vcpu::Vcpu;
pub use vm::{IrqHandle, IrqLine, Trigger, Vm};

/// Writing any value to this port ends [`Vcpu::run`] with
/// [`VcpuExit::Done`] (the value written, zero-extended), unless the vCPU
/// turned that off with [`Vcpu::set_done_port`].
pub const DONE_PORT: u16 = 0xf4;

/// Port ranges (first port, count, what) that KVM's in-kernel devices
/// take before the VMM sees an exit: the two 8259s, their edge/level
/// registers and the PIT. Every VM has them, so a device mapped there
/// would never be reached. The PIT's speaker port 0x61 is the kernel's too
/// but not refused: a PC's i8042 is registered at 0x60 with 5 ports (data
/// at 0x60, command at 0x64) and never uses 0x61.
pub const IN_KERNEL_PORTS: [(u16, u16, &str); 4] = [
    (0x20, 2, "the master PIC"),
    (0x40, 4, "the PIT"),
    (0xa0, 2, "the slave PIC"),
    (0x4d0, 2, "the PICs' edge/level registers"),
];

/// Why ports `base`..`base + len` cannot hold a device: the in-kernel
/// device of [`IN_KERNEL_PORTS`] they overlap, if any.
pub fn in_kernel_ports_overlap(base: u64, len: u64) -> Option<String> {
    let end = base.saturating_add(len);
    IN_KERNEL_PORTS.iter().find_map(|&(first, n, what)| {
        let (first, n) = (u64::from(first), u64::from(n));
        (base < first + n && first < end).then(|| {
            format!(
                "ports {base:#x}+{len:#x} overlap {what} (ports {first:#x}-{:#x}), which KVM \
                 emulates in the kernel: the device would never see an access",
                first + n - 1
            )
        })
    })
}

/// Guest-physical address of the three pages KVM needs for its real-mode
/// TSS on Intel (`KVM_SET_TSS_ADDR`); guest memory must end below it.
pub const TSS_ADDR: u64 = 0xfffb_d000;

/// Guest-physical address of the identity-map page table page KVM needs on
/// Intel without unrestricted guest (`KVM_SET_IDENTITY_MAP_ADDR`).
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Offset of the kick signal from `SIGRTMIN` (see [`kick_signal`]).
pub const KICK_SIGNAL_OFFSET: i32 = 1;

/// Why a KVM operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// `/dev/kvm` could not be opened.
    #[error(
        "opening /dev/kvm: {0} (load kvm_intel/kvm_amd, enable nested virtualisation in a VM, run as root)"
    )]
    Open(#[source] kvm_ioctls::Error),
    /// An ioctl on `/dev/kvm`, the VM or a vCPU failed.
    #[error("{op} failed: {source}")]
    Ioctl {
        /// The operation, named after its ioctl.
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The host KVM lacks a capability this VMM needs.
    #[error("KVM lacks {0}: the host kernel is too old or KVM is restricted")]
    MissingCapability(&'static str),
    /// The requested guest memory size is unusable.
    #[error(
        "guest memory of {0:#x} bytes: it must be a non-zero multiple of 4 KiB ending at or below {IDENTITY_MAP_ADDR:#x}"
    )]
    MemorySize(usize),
    /// Mapping guest memory failed.
    #[error("mapping guest memory: {0}")]
    Mmap(#[source] std::io::Error),
    /// A guest-physical range is not inside guest memory.
    #[error("guest range {gpa:#x}+{len:#x} is outside guest memory ({size:#x} bytes)")]
    OutOfBounds {
        /// Start of the range.
        gpa: u64,
        /// Length of the range.
        len: usize,
        /// Size of guest memory.
        size: usize,
    },
    /// Installing the kick signal handler failed.
    #[error("installing the vCPU kick handler for signal {signal}: {source}")]
    Signal {
        /// The signal number.
        signal: i32,
        /// Why `sigaction` refused.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU stopped for a reason the run loop does not handle.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// KVM did not take every MSR of a [`CpuState`].
    #[error("KVM_SET_MSRS took {set} of {wanted} MSRs; the first refused is {refused:#x}")]
    Msrs {
        /// MSRs asked for.
        wanted: usize,
        /// MSRs KVM set.
        set: usize,
        /// Index of the first MSR KVM refused.
        refused: u32,
    },
}

impl KvmError {
    fn ioctl(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
        move |source| KvmError::Ioctl { op, source }
    }
}

/// Device emulation behind a vCPU: receives its port-I/O and MMIO accesses.
///
/// Read values are masked to the access size by the caller. Accesses to
/// [`DONE_PORT`] writes never reach the handler (unless the vCPU turned the
/// done port off).
pub trait IoHandler {
    /// An `IN` of `size` bytes from `port`.
    fn pio_read(&mut self, port: u16, size: AccessSize) -> u64;
    /// An `OUT` of `size` bytes of `data` to `port`.
    fn pio_write(&mut self, port: u16, size: AccessSize, data: u64);
    /// A read of `size` bytes at guest-physical `gpa` outside guest memory.
    fn mmio_read(&mut self, gpa: u64, size: AccessSize) -> u64;
    /// A write of `size` bytes of `data` at guest-physical `gpa` outside
    /// guest memory.
    fn mmio_write(&mut self, gpa: u64, size: AccessSize, data: u64);

    /// Whether a device asked for a system reset during the accesses so far
    /// (a PC's keyboard-controller reset line, say). Asked after every
    /// port-I/O and MMIO exit; `true` ends [`Vcpu::run`] with
    /// [`VcpuExit::Reset`]. The default never asks.
    fn reset_requested(&mut self) -> bool {
        false
    }

    /// The vCPU was kicked out of `KVM_RUN` (or kept from entering it) by
    /// a [`VcpuKicker`]: the handler may do work it was kicked for (service
    /// its lane of the wire) before the guest runs again. The default does
    /// nothing.
    fn kicked(&mut self) {}
}

/// Why [`Vcpu::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuExit {
    /// The guest wrote this value to [`DONE_PORT`].
    Done(u32),
    /// The guest shut down (triple fault, say).
    Shutdown,
    /// A device asked for a system reset ([`IoHandler::reset_requested`]):
    /// the guest rebooted, which this VMM takes as the guest stopping.
    Reset,
    /// The guest halted and KVM returned to userspace (rare: with the
    /// in-kernel irqchip a halted vCPU waits inside `KVM_RUN`).
    Halt,
    /// The `stop` flag was set (and the vCPU kicked, if it was running).
    Stopped,
}

#[cfg(test)]
mod in_kernel_ports_tests {
    use super::in_kernel_ports_overlap;

    #[test]
    fn ports_of_in_kernel_devices_are_refused_and_their_neighbours_kept() {
        for (base, len, what) in [
            (0x20, 1, "master PIC"),
            (0x21, 0x10, "master PIC"),
            (0x3f, 2, "the PIT"),
            (0x43, 1, "the PIT"),
            (0xa1, 1, "slave PIC"),
            (0x4cf, 2, "edge/level"),
            (0, 0x1_0000, "master PIC"),
        ] {
            let why = in_kernel_ports_overlap(base, len)
                .unwrap_or_else(|| panic!("{base:#x}+{len:#x} accepted"));
            assert!(why.contains(what), "{base:#x}+{len:#x}: {why}");
        }
        for (base, len) in [
            (0x22, 0x1e),
            (0x44, 0x1d),
            (0x62, 0x3e),
            (0xa2, 2),
            (0x3f8, 8),
        ] {
            assert_eq!(
                in_kernel_ports_overlap(base, len),
                None,
                "{base:#x}+{len:#x}"
            );
        }
        assert_eq!(in_kernel_ports_overlap(u64::MAX, u64::MAX), None);
    }
}
