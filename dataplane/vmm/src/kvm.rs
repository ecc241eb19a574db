//! The KVM half of the client VMM: one VM with flat guest memory and the
//! in-kernel interrupt controllers, vCPUs that start in 16-bit real mode
//! (the test guests) or in a given CPU state (64-bit long mode for Linux,
//! [`CpuState`]), and a run loop that hands port-I/O and MMIO exits to an
//! [`IoHandler`].
//!
//! Layout and conventions:
//! - guest memory is one anonymous mapping, KVM slot 0 at GPA 0; any GPA
//!   above it exits to userspace as MMIO;
//! - the in-kernel irqchip (master/slave 8259 PIC, IOAPIC, one LAPIC per
//!   vCPU) is created; GSIs 0-15 reach the PIC through the default routing.
//!   vCPU 0's LAPIC has LINT0 in ExtINT mode, so PIC interrupts reach it
//!   even in real mode; other vCPUs keep LINT0 masked;
//! - a write of any value to [`DONE_PORT`] ends [`Vcpu::run`] with
//!   [`VcpuExit::Done`]: the test guests report their self-check there.
//!   A vCPU running a real operating system turns that off
//!   ([`Vcpu::set_done_port`]): Linux uses port `0xf4` like any other;
//! - the in-kernel PIT ([`Vm::create_pit`]) is created only for guests that
//!   need a timer (Linux), so that the test guests' ports stay theirs;
//! - a vCPU blocked in `KVM_RUN` (a guest in `hlt` waits inside the kernel
//!   with the in-kernel irqchip) is interrupted by [`VcpuKicker::kick`]: a
//!   real-time signal ([`kick_signal`]) whose handler sets the vCPU's
//!   `immediate_exit`, so that a kick landing just before `KVM_RUN` is not
//!   lost either.
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

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use devplane_wire::AccessSize;
use kvm_bindings::{
    CpuId, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_IO, KVM_INTERNAL_ERROR_EMULATION,
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, KVM_PIT_SPEAKER_DUMMY, Msrs, kvm_fpu,
    kvm_mp_state, kvm_msr_entry, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit as KvmExit, VcpuFd, VmFd};
use memmap2::{MmapOptions, MmapRaw};

use crate::boot::pvm_syscall::{Resume, SyscallHook};

/// Writing any value to this port ends [`Vcpu::run`] with
/// [`VcpuExit::Done`] (the value written, zero-extended), unless the vCPU
/// turned that off with [`Vcpu::set_done_port`].
pub const DONE_PORT: u16 = 0xf4;

/// Guest-physical address of the three pages KVM needs for its real-mode
/// TSS on Intel (`KVM_SET_TSS_ADDR`); guest memory must end below it.
pub const TSS_ADDR: u64 = 0xfffb_d000;

/// Guest-physical address of the identity-map page table page KVM needs on
/// Intel without unrestricted guest (`KVM_SET_IDENTITY_MAP_ADDR`).
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Offset of the kick signal from `SIGRTMIN` (see [`kick_signal`]).
pub const KICK_SIGNAL_OFFSET: i32 = 1;

/// Page size of guest memory.
const PAGE_SIZE: usize = 4096;

/// LAPIC register offsets and LVT fields (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// The `INT3` opcode and the `#BP` vector it raises.
const INT3: u8 = 0xcc;
/// The `FWAIT` opcode.
const FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;

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

/// Where a vCPU starts: 16-bit real mode at `cs:ip` with stack `ss:sp`,
/// where every segment register (CS, DS, ES, FS, GS, SS) holds `cs` with
/// base `cs << 4`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Code segment selector; also loaded into DS, ES, FS, GS and SS.
    pub cs: u16,
    /// Instruction pointer.
    pub ip: u16,
    /// Stack pointer.
    pub sp: u16,
}

/// The architectural state a vCPU starts in when it does not start in real
/// mode: see [`Vm::create_vcpu_with_state`].
#[derive(Debug, Clone, Default)]
pub struct CpuState {
    /// General-purpose registers, RIP and RFLAGS.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers and EFER. Its
    /// `apic_base` and `interrupt_bitmap` are ignored: the vCPU keeps KVM's
    /// reset values (the LAPIC enabled at its default base, nothing
    /// pending).
    pub sregs: kvm_sregs,
    /// x87 and SSE state.
    pub fpu: kvm_fpu,
    /// Model-specific registers to set: (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// CPUID feature bits to hide from the guest, on top of the host's
    /// supported set.
    pub cpuid_hide: Vec<CpuidBits>,
    /// The trap that turns a stock kernel's user-mode system calls into
    /// system calls on nested PVM, when its `INT3` is in guest memory.
    pub syscall_hook: Option<SyscallHook>,
}

/// A CPUID register of a leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuidReg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// Bits of one CPUID register of one leaf (every sub-leaf).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidBits {
    /// The leaf (EAX input).
    pub function: u32,
    /// Which output register.
    pub reg: CpuidReg,
    /// The bits.
    pub bits: u32,
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

/// Guest memory: one anonymous mapping. Lives as long as any [`Vm`],
/// [`Vcpu`] or [`IrqHandle`] of its VM.
struct GuestMemory {
    map: MmapRaw,
    size: usize,
}

impl GuestMemory {
    /// The offset of `[gpa, gpa + len)` in the mapping, if it fits.
    fn offset(&self, gpa: u64, len: usize) -> Result<usize, KvmError> {
        let out = KvmError::OutOfBounds {
            gpa,
            len,
            size: self.size,
        };
        let start = usize::try_from(gpa).map_err(|_| out)?;
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(start),
            _ => Err(KvmError::OutOfBounds {
                gpa,
                len,
                size: self.size,
            }),
        }
    }
}

/// What the VM, its vCPUs and its interrupt handles share. Field order is
/// drop order: the VM fd closes before guest memory is unmapped.
struct VmShared {
    fd: VmFd,
    mem: GuestMemory,
}

/// A KVM virtual machine with flat guest memory at GPA 0 and the in-kernel
/// PIC, IOAPIC and LAPICs.
pub struct Vm {
    shared: Arc<VmShared>,
    cpuid: CpuId,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM with `mem_bytes` of guest memory
    /// (a non-zero multiple of 4 KiB) and the in-kernel irqchip.
    pub fn new(mem_bytes: usize) -> Result<Vm, KvmError> {
        if mem_bytes == 0
            || !mem_bytes.is_multiple_of(PAGE_SIZE)
            || mem_bytes as u64 > IDENTITY_MAP_ADDR
        {
            return Err(KvmError::MemorySize(mem_bytes));
        }
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        // Real mode on Intel without unrestricted guest runs under vm86 and
        // needs these; on AMD they are accepted and unused. Both must come
        // before the first vCPU.
        fd.set_tss_address(TSS_ADDR as usize)
            .map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            fd.set_identity_map_address(IDENTITY_MAP_ADDR)
                .map_err(KvmError::ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        let map = MmapOptions::new()
            .len(mem_bytes)
            .map_anon()
            .map_err(KvmError::Mmap)?;
        let mem = GuestMemory {
            map: MmapRaw::from(map),
            size: mem_bytes,
        };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes as u64,
            userspace_addr: mem.map.as_mut_ptr() as u64,
        };
        // SAFETY: the region is exactly the anonymous mapping `mem`, which
        // is owned by the `VmShared` that also owns `fd`; `fd` is dropped
        // (VM destroyed once every vCPU fd is closed too, and every vCPU
        // holds the same `VmShared`) before the mapping is unmapped, so KVM
        // never uses the host range after it is gone.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        fd.create_irq_chip()
            .map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Vm {
            shared: Arc::new(VmShared { fd, mem }),
            cpuid,
        })
    }

    /// Size of guest memory in bytes.
    pub fn mem_size(&self) -> usize {
        self.shared.mem.size
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn load(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let off = self.shared.mem.offset(gpa, bytes.len())?;
        // SAFETY: `offset` checked that [off, off + len) lies inside the
        // mapping, which `self` keeps alive. Guest memory is plain bytes
        // that a running vCPU may touch concurrently (like DMA); no Rust
        // reference to it exists, and `bytes` cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.shared.mem.map.as_mut_ptr().add(off),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// Copies `len` bytes of guest memory at `gpa` out.
    pub fn read_mem(&self, gpa: u64, len: usize) -> Result<Vec<u8>, KvmError> {
        let off = self.shared.mem.offset(gpa, len)?;
        let mut out = vec![0u8; len];
        // SAFETY: as in `load`: the range is inside the live mapping and
        // `out` is a fresh allocation that cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.shared.mem.map.as_ptr().add(off),
                out.as_mut_ptr(),
                len,
            );
        }
        Ok(out)
    }

    /// Creates the in-kernel i8254 PIT (`KVM_CREATE_PIT2`) on ports
    /// `0x40-0x43`, its output on GSI 0, with the speaker port `0x61`
    /// emulated in the kernel too (Linux reads the channel-2 gate there to
    /// calibrate the TSC). Call at most once, after [`Vm::new`] (which
    /// created the irqchip the PIT needs) and before the vCPUs run.
    ///
    /// The timer stays in the kernel on purpose: a timer model on a server
    /// would put a network round trip on every tick of the guest's clock.
    pub fn create_pit(&self) -> Result<(), KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        if !kvm.check_extension(Cap::Pit2) {
            return Err(KvmError::MissingCapability("KVM_CAP_PIT2"));
        }
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.shared
            .fd
            .create_pit2(config)
            .map_err(KvmError::ioctl("KVM_CREATE_PIT2"))
    }

    /// Sets interrupt line `gsi` (0-15: PIC and IOAPIC; 16-23: IOAPIC).
    pub fn irq_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        irq_line(&self.shared.fd, gsi, level)
    }

    /// Raises then lowers `gsi`: one edge for an edge-triggered input.
    pub fn irq_edge(&self, gsi: u32) -> Result<(), KvmError> {
        irq_edge(&self.shared.fd, gsi)
    }

    /// A handle that reads and writes guest memory from any thread.
    pub fn mem_handle(&self) -> MemHandle {
        MemHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// A handle that injects interrupts into this VM from any thread.
    pub fn irq_handle(&self) -> IrqHandle {
        IrqHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Creates vCPU `index` starting in real mode at `entry`. vCPU 0 is the
    /// bootstrap processor and receives PIC interrupts; others are made
    /// runnable at once (no INIT/SIPI) with LINT0 masked.
    pub fn create_vcpu(&self, index: u8, entry: Entry) -> Result<Vcpu, KvmError> {
        let fd = self.new_vcpu_fd(index, &[])?;

        let mut sregs = fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        let seg = |s: &mut kvm_segment| {
            s.selector = entry.cs;
            s.base = u64::from(entry.cs) << 4;
            s.limit = 0xffff;
        };
        for s in [
            &mut sregs.cs,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
            &mut sregs.ss,
        ] {
            seg(s);
        }
        fd.set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;

        let mut regs = fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        regs.rip = u64::from(entry.ip);
        regs.rsp = u64::from(entry.sp);
        regs.rflags = 0x2;
        fd.set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;

        self.finish_vcpu(fd, index)
    }

    /// Creates vCPU `index` starting in `state` (64-bit long mode for a
    /// Linux kernel, say) with the host's supported CPUID (APIC ids fixed
    /// up) and the LAPIC's LINT pins set as for [`Vm::create_vcpu`].
    pub fn create_vcpu_with_state(&self, index: u8, state: &CpuState) -> Result<Vcpu, KvmError> {
        let fd = self.new_vcpu_fd(index, &state.cpuid_hide)?;

        let mut sregs = fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?;
        let apic_base = sregs.apic_base;
        let interrupt_bitmap = sregs.interrupt_bitmap;
        sregs = state.sregs;
        sregs.apic_base = apic_base;
        sregs.interrupt_bitmap = interrupt_bitmap;
        fd.set_sregs(&sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&state.regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        fd.set_fpu(&state.fpu)
            .map_err(KvmError::ioctl("KVM_SET_FPU"))?;
        if !state.msrs.is_empty() {
            let entries: Vec<kvm_msr_entry> = state
                .msrs
                .iter()
                .map(|&(index, data)| kvm_msr_entry {
                    index,
                    data,
                    ..Default::default()
                })
                .collect();
            let msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Msrs {
                wanted: entries.len(),
                set: 0,
                refused: entries[0].index,
            })?;
            let set = fd
                .set_msrs(&msrs)
                .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
            if set != entries.len() {
                return Err(KvmError::Msrs {
                    wanted: entries.len(),
                    set,
                    refused: entries.get(set).map_or(0, |e| e.index),
                });
            }
        }
        let mut vcpu = self.finish_vcpu(fd, index)?;
        vcpu.syscall_hook = state.syscall_hook;
        Ok(vcpu)
    }

    /// A new vCPU fd with CPUID (APIC ids fixed up, `hide` cleared) and
    /// LINT pins set.
    fn new_vcpu_fd(&self, index: u8, hide: &[CpuidBits]) -> Result<VcpuFd, KvmError> {
        install_kick_handler()?;
        let fd = self
            .shared
            .fd
            .create_vcpu(u64::from(index))
            .map_err(KvmError::ioctl("KVM_CREATE_VCPU"))?;

        let mut cpuid = self.cpuid.clone();
        for e in cpuid.as_mut_slice() {
            match e.function {
                // Initial APIC id in EBX[31:24].
                1 => e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(index) << 24),
                // x2APIC id of the extended topology leaves.
                0xb | 0x1f => e.edx = u32::from(index),
                _ => {}
            }
            for h in hide.iter().filter(|h| h.function == e.function) {
                let reg = match h.reg {
                    CpuidReg::Eax => &mut e.eax,
                    CpuidReg::Ebx => &mut e.ebx,
                    CpuidReg::Ecx => &mut e.ecx,
                    CpuidReg::Edx => &mut e.edx,
                };
                *reg &= !h.bits;
            }
        }
        fd.set_cpuid2(&cpuid)
            .map_err(KvmError::ioctl("KVM_SET_CPUID2"))?;

        set_lint(&fd, index == 0)?;
        Ok(fd)
    }

    /// Makes an application processor runnable at once and wraps the fd.
    fn finish_vcpu(&self, fd: VcpuFd, index: u8) -> Result<Vcpu, KvmError> {
        if index > 0 {
            fd.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
        }

        Ok(Vcpu {
            fd,
            index,
            exits: 0,
            odd_mmio: 0,
            done_port: true,
            assists: 0,
            syscalls: 0,
            syscall_hook: None,
            kick: Arc::new(KickShared {
                thread: Mutex::new(None),
            }),
            _vm: Arc::clone(&self.shared),
        })
    }
}

/// Programs the LAPIC's local interrupt pins like a BIOS does: LINT0 in
/// ExtINT mode (the 8259 PIC's output; unmasked only on the BSP) and LINT1
/// in NMI mode.
fn set_lint(fd: &VcpuFd, bsp: bool) -> Result<(), KvmError> {
    let mut lapic = fd.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?;
    let get = |regs: &[std::os::raw::c_char; 1024], off: usize| {
        u32::from_le_bytes([
            regs[off] as u8,
            regs[off + 1] as u8,
            regs[off + 2] as u8,
            regs[off + 3] as u8,
        ])
    };
    let put = |regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().into_iter().enumerate() {
            regs[off + i] = b as std::os::raw::c_char;
        }
    };
    let lvt0 = get(&lapic.regs, APIC_LVT0) & !APIC_DELIVERY_MODE_MASK;
    let lvt0 = if bsp {
        (lvt0 & !APIC_LVT_MASKED) | (APIC_MODE_EXTINT << 8)
    } else {
        lvt0 | APIC_LVT_MASKED | (APIC_MODE_EXTINT << 8)
    };
    let lvt1 = (get(&lapic.regs, APIC_LVT1) & !APIC_DELIVERY_MODE_MASK) | (APIC_MODE_NMI << 8);
    put(&mut lapic.regs, APIC_LVT0, lvt0);
    put(&mut lapic.regs, APIC_LVT1, lvt1);
    fd.set_lapic(&lapic)
        .map_err(KvmError::ioctl("KVM_SET_LAPIC"))
}

fn irq_line(fd: &VmFd, gsi: u32, level: bool) -> Result<(), KvmError> {
    fd.set_irq_line(gsi, level)
        .map_err(KvmError::ioctl("KVM_IRQ_LINE"))
}

fn irq_edge(fd: &VmFd, gsi: u32) -> Result<(), KvmError> {
    irq_line(fd, gsi, true)?;
    irq_line(fd, gsi, false)
}

/// Reads and writes a VM's guest memory from any thread (device DMA, such
/// as a virtqueue's buffers). Keeps the VM alive.
#[derive(Clone)]
pub struct MemHandle {
    shared: Arc<VmShared>,
}

impl MemHandle {
    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        let off = self.shared.mem.offset(gpa, buf.len())?;
        // SAFETY: `offset` checked that [off, off + len) lies inside the
        // mapping, which `self.shared` keeps alive; `buf` is a Rust buffer
        // and cannot overlap guest memory, of which no reference exists.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.shared.mem.map.as_ptr().add(off),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let off = self.shared.mem.offset(gpa, bytes.len())?;
        // SAFETY: as in `read`, with the copy in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.shared.mem.map.as_mut_ptr().add(off),
                bytes.len(),
            );
        }
        Ok(())
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> usize {
        self.shared.mem.size
    }
}

/// Injects interrupts into a VM from any thread. Keeps the VM alive.
#[derive(Clone)]
pub struct IrqHandle {
    shared: Arc<VmShared>,
}

impl IrqHandle {
    /// Sets interrupt line `gsi` (see [`Vm::irq_line`]).
    pub fn irq_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        irq_line(&self.shared.fd, gsi, level)
    }

    /// Raises then lowers `gsi` (see [`Vm::irq_edge`]).
    pub fn irq_edge(&self, gsi: u32) -> Result<(), KvmError> {
        irq_edge(&self.shared.fd, gsi)
    }
}

/// The signal that kicks a vCPU out of `KVM_RUN`: `SIGRTMIN +`
/// [`KICK_SIGNAL_OFFSET`].
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// The `immediate_exit` byte of the vCPU this thread is running, or
    /// null. Read by the kick signal handler.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` on a const-initialised thread-local without destructor
    // neither allocates nor registers anything: async-signal-safe.
    let _ = KICK_TARGET.try_with(|t| {
        let p = t.get();
        if !p.is_null() {
            // SAFETY: a non-null target is set only by `Running::enter` on
            // this thread and cleared by `Running::drop` before `Vcpu::run`
            // returns; in between it points at the `immediate_exit` byte of
            // the vCPU's `kvm_run` mapping, which `run`'s borrow of the
            // vCPU keeps mapped. A volatile byte store is what KVM expects
            // (it reads the byte with READ_ONCE on entry).
            unsafe { p.write_volatile(1) };
        }
    });
}

fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let signal = kick_signal();
    let done = INSTALLED.get_or_init(|| {
        // SAFETY: `sigaction` is plain data; all-zero is a valid value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_kick as *const () as usize;
        // SA_RESTART: a kick landing while an `IoHandler` is in a syscall
        // must not make that syscall fail (KVM_RUN itself still returns
        // EINTR).
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: `act` is fully initialised, the handler is an
        // `extern "C"` function with the SA_SIGINFO signature that only
        // does an async-signal-safe byte store, and we ignore the old
        // action.
        match unsafe { libc::sigaction(signal, &act, std::ptr::null_mut()) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
        }
    });
    done.map_err(|errno| KvmError::Signal {
        signal,
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Which thread is inside [`Vcpu::run`], for [`VcpuKicker`].
struct KickShared {
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KickShared {
    fn thread(&self) -> MutexGuard<'_, Option<libc::pthread_t>> {
        self.thread.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks a thread as running a vCPU for the duration of [`Vcpu::run`].
struct Running<'a> {
    kick: &'a KickShared,
    prev: *mut u8,
}

impl<'a> Running<'a> {
    fn enter(kick: &'a KickShared, immediate_exit: *mut u8) -> Running<'a> {
        // Target first, then publish the thread: a kick that sees the
        // thread always finds the target set.
        let prev = KICK_TARGET.with(|t| t.replace(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        *kick.thread() = Some(unsafe { libc::pthread_self() });
        Running { kick, prev }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Unpublish first (under the lock, so no kick is mid-send), then
        // clear the target; a signal still in flight finds it restored.
        *self.kick.thread() = None;
        KICK_TARGET.with(|t| t.set(self.prev));
    }
}

/// Interrupts a vCPU's [`Vcpu::run`] from any thread.
#[derive(Clone)]
pub struct VcpuKicker {
    shared: Arc<KickShared>,
}

impl VcpuKicker {
    /// Makes the vCPU leave `KVM_RUN` (or not enter it) and re-check its
    /// `stop` flag. A no-op if no thread is inside `run`; set `stop` before
    /// kicking to end the run.
    pub fn kick(&self) {
        let thread = self.shared.thread();
        if let Some(tid) = *thread {
            // SAFETY: `tid` was published by a thread inside `Vcpu::run`,
            // which unpublishes it under this lock before leaving `run`; we
            // hold the lock, so the thread is alive and `tid` valid. The
            // signal's handler is installed before any vCPU exists.
            unsafe { libc::pthread_kill(tid, kick_signal()) };
        }
    }
}

/// What the first half of the run loop decided about an exit.
enum Step {
    /// Handled; enter the guest again.
    Resume,
    /// Port I/O; the data area is completed once `kvm_run.io` is read.
    Io {
        port: u16,
        data: *mut u8,
        len: usize,
        out: bool,
    },
    /// Return to the caller.
    Exit(VcpuExit),
    /// Internal error; the suberror is read from `kvm_run`.
    InternalError,
    /// Anything else.
    Unexpected(String),
}

/// A vCPU, to be moved to (and run on) its own thread.
pub struct Vcpu {
    // Declared first: the vCPU fd closes before the VM's shared state drops.
    fd: VcpuFd,
    index: u8,
    exits: u64,
    odd_mmio: u64,
    done_port: bool,
    assists: u64,
    syscalls: u64,
    syscall_hook: Option<SyscallHook>,
    kick: Arc<KickShared>,
    _vm: Arc<VmShared>,
}

impl Vcpu {
    /// The vCPU's index (KVM vCPU id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Exits from `KVM_RUN` handled so far (signals and kicks excluded).
    pub fn exits(&self) -> u64 {
        self.exits
    }

    /// MMIO accesses whose length was not 1, 2, 4 or 8 (a page-crossing
    /// access splits into such pieces): reads returned all-ones, writes
    /// were dropped.
    pub fn odd_mmio(&self) -> u64 {
        self.odd_mmio
    }

    /// Whether a write to [`DONE_PORT`] ends [`Vcpu::run`] (the default).
    /// With `false` those writes go to the [`IoHandler`] like any other:
    /// what a vCPU running Linux needs.
    pub fn set_done_port(&mut self, enabled: bool) {
        self.done_port = enabled;
    }

    /// A handle that interrupts [`Vcpu::run`] from another thread.
    pub fn kicker(&self) -> VcpuKicker {
        VcpuKicker {
            shared: Arc::clone(&self.kick),
        }
    }

    /// Runs the guest until it writes [`DONE_PORT`], shuts down, halts to
    /// userspace, a device asks for a reset ([`IoHandler::reset_requested`]),
    /// or `stop` is set and the vCPU kicked. Port-I/O and MMIO exits go to
    /// `io`; string I/O (`rep ins/outs`) becomes one access per element.
    /// An `INT3` or `FWAIT` that KVM's instruction emulator could not
    /// execute (nested PVM emulates a non-PVM guest's kernel code and lacks
    /// them) is completed by the VMM: `INT3` becomes its `#BP` trap, `FWAIT`
    /// a no-op ([`Vcpu::emulation_assists`] counts them).
    pub fn run(&mut self, io: &mut dyn IoHandler, stop: &AtomicBool) -> Result<VcpuExit, KvmError> {
        let immediate_exit: *mut u8 = &raw mut self.fd.get_kvm_run().immediate_exit;
        let kick = Arc::clone(&self.kick);
        let _running = Running::enter(&kick, immediate_exit);
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(VcpuExit::Stopped);
            }
            let step = match self.fd.run() {
                Ok(exit) => {
                    self.exits += 1;
                    classify(exit, io, &mut self.odd_mmio)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or a stray signal): clear the request, let
                    // the handler do what it was kicked for, and look at
                    // `stop` again.
                    self.fd.set_kvm_immediate_exit(0);
                    io.kicked();
                    continue;
                }
                Err(source) => {
                    return Err(KvmError::Ioctl {
                        op: "KVM_RUN",
                        source,
                    });
                }
            };
            match step {
                Step::Resume => {
                    if io.reset_requested() {
                        return Ok(VcpuExit::Reset);
                    }
                }
                Step::Io {
                    port,
                    data,
                    len,
                    out,
                } => {
                    if let Some(value) = self.complete_io(io, port, data, len, out)? {
                        return Ok(VcpuExit::Done(value));
                    }
                    if io.reset_requested() {
                        return Ok(VcpuExit::Reset);
                    }
                }
                Step::Exit(exit) => return Ok(exit),
                Step::InternalError => {
                    let run = self.fd.get_kvm_run();
                    let suberror = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
                        // SAFETY: exit_reason says `internal` is the union
                        // member KVM filled in.
                        Some(unsafe { run.__bindgen_anon_1.internal.suberror })
                    } else {
                        None
                    };
                    if suberror == Some(KVM_INTERNAL_ERROR_EMULATION) && self.assist_emulation()? {
                        continue;
                    }
                    let what = match suberror {
                        Some(s) => format!("KVM internal error, suberror {s}"),
                        None => "KVM internal error".to_string(),
                    };
                    return Err(self.unexpected(&what));
                }
                Step::Unexpected(what) => return Err(self.unexpected(&what)),
            }
        }
    }

    /// Completes a port-I/O exit: splits it into accesses of the size KVM
    /// reports and dispatches them. Returns the value of a [`DONE_PORT`]
    /// write.
    fn complete_io(
        &mut self,
        io: &mut dyn IoHandler,
        port: u16,
        data: *mut u8,
        len: usize,
        out: bool,
    ) -> Result<Option<u32>, KvmError> {
        let run = self.fd.get_kvm_run();
        if run.exit_reason != KVM_EXIT_IO {
            return Err(self.unexpected("port I/O exit without KVM_EXIT_IO"));
        }
        // SAFETY: exit_reason is KVM_EXIT_IO, so `io` is the union member
        // KVM filled in.
        let info = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(info.size);
        let access = match AccessSize::from_len(size) {
            Some(a) if a != AccessSize::B8 => a,
            _ => return Err(self.unexpected(&format!("port I/O of size {size}"))),
        };
        if size.checked_mul(info.count as usize) != Some(len) {
            return Err(self.unexpected(&format!(
                "port I/O of {} x {size} bytes in a {len}-byte data area",
                info.count
            )));
        }
        // `data`/`len` are the data slice kvm-ioctls built for this
        // exit inside the vCPU's kvm_run mapping (at `io.data_offset`, past
        // the `kvm_run` struct that `get_kvm_run` borrowed above, which is
        // no longer used). The mapping lives as long as `self.fd`, and no
        // other reference to those bytes exists until the next KVM_RUN.
        if out {
            // SAFETY: see above; an OUT's data is only read.
            let data = unsafe { std::slice::from_raw_parts(data.cast_const(), len) };
            for chunk in data.chunks_exact(size) {
                let value = le_value(chunk);
                if self.done_port && port == DONE_PORT {
                    return Ok(Some(value as u32));
                }
                io.pio_write(port, access, value);
            }
        } else {
            // SAFETY: see above; an IN's data slice was handed out mutable.
            let data = unsafe { std::slice::from_raw_parts_mut(data, len) };
            for chunk in data.chunks_exact_mut(size) {
                let value = io.pio_read(port, access) & access.mask();
                chunk.copy_from_slice(&value.to_le_bytes()[..size]);
            }
        }
        Ok(None)
    }

    /// Completes an instruction KVM's emulator gave up on (nested PVM
    /// emulates a non-PVM guest's kernel code and lacks some): `INT3`
    /// (Linux runs one at boot to test its breakpoint handling) becomes the
    /// `#BP` trap it raises, with RIP past it; `FWAIT` moves on. Returns
    /// `false`, changing nothing, for any other instruction.
    fn assist_emulation(&mut self) -> Result<bool, KvmError> {
        let mut regs = self
            .fd
            .get_regs()
            .map_err(KvmError::ioctl("KVM_GET_REGS"))?;
        let t = self
            .fd
            .translate_gva(regs.rip)
            .map_err(KvmError::ioctl("KVM_TRANSLATE"))?;
        if t.valid == 0 {
            return Ok(false);
        }
        let mut byte = [0u8; 1];
        if self
            ._vm
            .mem
            .offset(t.physical_address, 1)
            .map(|off| {
                // SAFETY: `offset` checked that the byte lies inside the
                // mapping, which `self._vm` keeps alive; `byte` is a local
                // buffer that cannot overlap guest memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self._vm.mem.map.as_ptr().add(off),
                        byte.as_mut_ptr(),
                        1,
                    )
                }
            })
            .is_err()
            || (byte[0] != INT3 && byte[0] != FWAIT)
        {
            return Ok(false);
        }
        if byte[0] == FWAIT {
            // No x87 exception is ever unmasked and pending here (the
            // guest's FPU state lives in KVM, and nothing raised one), so
            // FWAIT does nothing but move on.
            regs.rip += 1;
            self.fd
                .set_regs(&regs)
                .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
            self.assists += 1;
            return Ok(true);
        }
        if let Some(hook) = self.syscall_hook.filter(|h| h.pf_entry == regs.rip) {
            return self.syscall_trap(hook, regs);
        }
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?;
        if events.exception.injected != 0 || events.exception.pending != 0 {
            return Ok(false);
        }
        regs.rip += 1;
        self.fd
            .set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        events.exception.injected = 1;
        events.exception.nr = BP_VECTOR;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
        self.assists += 1;
        Ok(true)
    }

    /// The `INT3` of the [`SyscallHook`] at the kernel's page-fault entry:
    /// reads the exception frame on the kernel's stack and resumes as
    /// [`SyscallHook::resume`] says (a frame it cannot read, which the
    /// kernel's stack never is, is taken for an ordinary fault).
    fn syscall_trap(&mut self, hook: SyscallHook, mut regs: kvm_regs) -> Result<bool, KvmError> {
        const FRAME: usize = 40;
        let t = self
            .fd
            .translate_gva(regs.rsp)
            .map_err(KvmError::ioctl("KVM_TRANSLATE"))?;
        let mut frame = [0u64; 5];
        // The frame sits below the top of the kernel stack: in one page.
        let in_page = (regs.rsp & 0xfff) as usize + FRAME <= 0x1000;
        if let (true, true, Ok(off)) = (
            t.valid != 0,
            in_page,
            self._vm.mem.offset(t.physical_address, FRAME),
        ) {
            let mut bytes = [0u8; FRAME];
            // SAFETY: `offset` checked that the 40 bytes lie inside the
            // mapping, which `self._vm` keeps alive; `bytes` is a local
            // buffer that cannot overlap guest memory.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    self._vm.mem.map.as_ptr().add(off),
                    bytes.as_mut_ptr(),
                    FRAME,
                )
            };
            for (v, b) in frame.iter_mut().zip(bytes.chunks_exact(8)) {
                *v = u64::from_le_bytes(b.try_into().unwrap_or_default());
            }
        }
        match hook.resume(&frame) {
            Resume::Syscall { rip, rsp, rflags } => {
                regs.rip = rip;
                regs.rsp = rsp;
                regs.rflags = rflags;
                self.syscalls += 1;
            }
            Resume::Fault { rip } => regs.rip = rip,
        }
        self.fd
            .set_regs(&regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        Ok(true)
    }

    /// User-mode system calls the [`SyscallHook`] entered.
    pub fn hooked_syscalls(&self) -> u64 {
        self.syscalls
    }

    /// Instructions (`INT3`, `FWAIT`) the VMM completed because KVM's
    /// emulator could not (see [`Vcpu::run`]).
    pub fn emulation_assists(&self) -> u64 {
        self.assists
    }

    /// Where the guest is: CS, RIP, RSP, CR0/CR3/CR4, EFER and RFLAGS, for
    /// error messages and for diagnosing a guest that stopped making
    /// progress (call it after [`Vcpu::run`] returned).
    pub fn describe(&self) -> String {
        match (self.fd.get_sregs(), self.fd.get_regs()) {
            (Ok(s), Ok(r)) => format!(
                "cs={:#06x} (base {:#x}) rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} rflags={:#x}",
                s.cs.selector, s.cs.base, r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer, r.rflags
            ),
            _ => "registers unavailable".to_string(),
        }
    }

    /// An [`KvmError::UnexpectedExit`] naming the guest's CS:IP.
    fn unexpected(&self, what: &str) -> KvmError {
        KvmError::UnexpectedExit(format!(
            "vCPU {}: {what} at {}",
            self.index,
            self.describe()
        ))
    }
}

/// Decides what to do with an exit; handles MMIO in place.
fn classify(exit: KvmExit<'_>, io: &mut dyn IoHandler, odd_mmio: &mut u64) -> Step {
    match exit {
        KvmExit::IoOut(port, data) => Step::Io {
            port,
            len: data.len(),
            data: data.as_ptr().cast_mut(),
            out: true,
        },
        KvmExit::IoIn(port, data) => Step::Io {
            port,
            len: data.len(),
            data: data.as_mut_ptr(),
            out: false,
        },
        KvmExit::MmioRead(gpa, data) => {
            match AccessSize::from_len(data.len()) {
                Some(size) => {
                    let value = io.mmio_read(gpa, size) & size.mask();
                    data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
                }
                None => {
                    *odd_mmio += 1;
                    data.fill(0xff);
                }
            }
            Step::Resume
        }
        KvmExit::MmioWrite(gpa, data) => {
            match AccessSize::from_len(data.len()) {
                Some(size) => io.mmio_write(gpa, size, le_value(data)),
                None => *odd_mmio += 1,
            }
            Step::Resume
        }
        KvmExit::Intr | KvmExit::IrqWindowOpen => Step::Resume,
        KvmExit::Hlt => Step::Exit(VcpuExit::Halt),
        KvmExit::Shutdown => Step::Exit(VcpuExit::Shutdown),
        KvmExit::InternalError => Step::InternalError,
        KvmExit::FailEntry(reason, cpu) => Step::Unexpected(format!(
            "entry failed (hardware reason {reason:#x}, cpu {cpu})"
        )),
        other => Step::Unexpected(format!("{other:?}")),
    }
}

/// The little-endian value of up to 8 bytes.
fn le_value(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_le_bytes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_value_zero_extends() {
        assert_eq!(le_value(&[0x34, 0x12]), 0x1234);
        assert_eq!(le_value(&[0xff; 9]), u64::MAX);
        assert_eq!(le_value(&[]), 0);
    }

    #[test]
    fn handles_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync_clone<T: Send + Sync + Clone>() {}
        send::<Vcpu>();
        send::<Vm>();
        send_sync_clone::<IrqHandle>();
        send_sync_clone::<VcpuKicker>();
    }

    #[test]
    fn memory_size_is_validated() {
        assert!(matches!(Vm::new(0), Err(KvmError::MemorySize(0))));
        assert!(matches!(Vm::new(100), Err(KvmError::MemorySize(100))));
    }
}
