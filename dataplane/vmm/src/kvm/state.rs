//! A VM's and its vCPUs' whole KVM state, taken from a stopped VM and put
//! into a fresh one (snapshot and restore, migration): per vCPU its
//! registers, special registers, FPU/SSE/AVX state (XSAVE) and XCRs,
//! MSRs, LAPIC, pending events, multiprocessing state and debug registers;
//! per VM the in-kernel PIC (both 8259s), IOAPIC, PIT and the KVM clock.
//!
//! Each piece is KVM's own structure, kept as its bytes (`zerocopy`, the
//! derives of kvm-bindings' `serde` feature): what a snapshot file holds
//! and what [`StateBytes::from_bytes`] checks back (length) before KVM sees
//! it.

use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    Msrs, kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};
use kvm_ioctls::Kvm;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use super::vcpu::Vcpu;
use super::vm::Vm;
use super::{KvmError, cpu};

/// A KVM structure as bytes, and back.
pub trait StateBytes: Sized {
    /// Its bytes.
    fn to_bytes(&self) -> Vec<u8>;
    /// It again, from exactly its bytes; `None` for a wrong length.
    fn from_bytes(bytes: &[u8]) -> Option<Self>;
}

impl<T: IntoBytes + FromBytes + Immutable> StateBytes for T {
    fn to_bytes(&self) -> Vec<u8> {
        self.as_bytes().to_vec()
    }

    fn from_bytes(bytes: &[u8]) -> Option<Self> {
        T::read_from_bytes(bytes).ok()
    }
}

/// Most MSRs per `KVM_GET_MSRS`/`KVM_SET_MSRS` call.
const MSR_CHUNK: usize = 128;

/// One vCPU's state.
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segments, control registers, EFER, APIC base, pending interrupt.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI.
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Every MSR KVM saves for this vCPU, as (index, value).
    pub msrs: Vec<(u32, u64)>,
}

/// A VM's in-kernel devices and clock.
pub struct MachineState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The in-kernel PIT, for a VM that has one.
    pub pit: Option<kvm_pit_state2>,
    /// The KVM clock.
    pub clock: kvm_clock_data,
}

impl Vcpu {
    /// The vCPU's state. Call it on a vCPU that is not running, after its
    /// last exit was completed (a [`Vcpu::run`] that ended with
    /// [`super::VcpuExit::Stopped`]).
    pub fn save_state(&self) -> Result<VcpuState, KvmError> {
        let fd = &self.fd;
        Ok(VcpuState {
            regs: fd.get_regs().map_err(KvmError::ioctl("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(KvmError::ioctl("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(KvmError::ioctl("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(KvmError::ioctl("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(KvmError::ioctl("KVM_GET_LAPIC"))?,
            events: fd
                .get_vcpu_events()
                .map_err(KvmError::ioctl("KVM_GET_VCPU_EVENTS"))?,
            mp_state: fd
                .get_mp_state()
                .map_err(KvmError::ioctl("KVM_GET_MP_STATE"))?,
            debugregs: fd
                .get_debug_regs()
                .map_err(KvmError::ioctl("KVM_GET_DEBUGREGS"))?,
            msrs: self.save_msrs()?,
        })
    }

    /// Every MSR in KVM's list of MSRs to save that this vCPU reads back.
    fn save_msrs(&self) -> Result<Vec<(u32, u64)>, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let list = kvm
            .get_msr_index_list()
            .map_err(KvmError::ioctl("KVM_GET_MSR_INDEX_LIST"))?;
        let mut out = Vec::new();
        let mut pending: Vec<u32> = list.as_slice().to_vec();
        while !pending.is_empty() {
            let take = pending.len().min(MSR_CHUNK);
            let entries: Vec<kvm_msr_entry> = pending[..take]
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| KvmError::Msrs {
                wanted: take,
                set: 0,
                refused: entries[0].index,
            })?;
            let n = self
                .fd
                .get_msrs(&mut msrs)
                .map_err(KvmError::ioctl("KVM_GET_MSRS"))?;
            out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
            // KVM stops at the first MSR it cannot read: skip that one.
            let used = if n < take { n + 1 } else { n };
            pending.drain(..used);
        }
        Ok(out)
    }

    /// Puts `state` into this (new, not yet run) vCPU.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), KvmError> {
        let fd = &self.fd;
        // Special registers first (modes, APIC base), then what depends on
        // them; the LAPIC after the MSRs (the APIC base MSR), events last.
        fd.set_sregs(&state.sregs)
            .map_err(KvmError::ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&state.regs)
            .map_err(KvmError::ioctl("KVM_SET_REGS"))?;
        fd.set_xcrs(&state.xcrs)
            .map_err(KvmError::ioctl("KVM_SET_XCRS"))?;
        // SAFETY: `state.xsave` is a whole `kvm_xsave` (the legacy 4 KiB
        // layout KVM_GET_XSAVE returned), so KVM reads only inside it.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(KvmError::ioctl("KVM_SET_XSAVE"))?;
        for chunk in state.msrs.chunks(MSR_CHUNK) {
            cpu::set_msrs(fd, chunk)?;
        }
        fd.set_lapic(&state.lapic)
            .map_err(KvmError::ioctl("KVM_SET_LAPIC"))?;
        fd.set_mp_state(state.mp_state)
            .map_err(KvmError::ioctl("KVM_SET_MP_STATE"))?;
        fd.set_debug_regs(&state.debugregs)
            .map_err(KvmError::ioctl("KVM_SET_DEBUGREGS"))?;
        fd.set_vcpu_events(&state.events)
            .map_err(KvmError::ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl Vm {
    /// The KVM clock now (`KVM_GET_CLOCK`), in nanoseconds: what the
    /// guest's kvmclock reads. A new VM's starts near 0.
    pub fn clock_ns(&self) -> Result<u64, KvmError> {
        Ok(self
            .shared
            .fd
            .get_clock()
            .map_err(KvmError::ioctl("KVM_GET_CLOCK"))?
            .clock)
    }

    /// The in-kernel interrupt controllers, PIT and clock. Call it while
    /// no vCPU runs.
    pub fn save_machine(&self) -> Result<MachineState, KvmError> {
        let fd = &self.shared.fd;
        let chip = |id| -> Result<kvm_irqchip, KvmError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            fd.get_irqchip(&mut c)
                .map_err(KvmError::ioctl("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(MachineState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: match fd.get_pit2() {
                Ok(p) => Some(p),
                // No PIT was created.
                Err(e) if e.errno() == libc::ENXIO => None,
                Err(source) => {
                    return Err(KvmError::Ioctl {
                        op: "KVM_GET_PIT2",
                        source,
                    });
                }
            },
            clock: fd.get_clock().map_err(KvmError::ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Puts `state` into this VM (before its vCPUs run; the PIT is
    /// created if the state has one and the VM not yet).
    pub fn restore_machine(&self, state: &MachineState) -> Result<(), KvmError> {
        let fd = &self.shared.fd;
        for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
            fd.set_irqchip(chip)
                .map_err(KvmError::ioctl("KVM_SET_IRQCHIP"))?;
        }
        if let Some(pit) = &state.pit {
            if fd.get_pit2().is_err() {
                self.create_pit()?;
            }
            fd.set_pit2(pit).map_err(KvmError::ioctl("KVM_SET_PIT2"))?;
        }
        // Only the clock value: the flags KVM_GET_CLOCK reported (stable
        // TSC, realtime) are not settable.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock)
            .map_err(KvmError::ioctl("KVM_SET_CLOCK"))?;
        Ok(())
    }

    /// Turns KVM's dirty-page log of guest memory on or off
    /// (`KVM_MEM_LOG_DIRTY_PAGES` on slot 0). Pages the VMM itself writes
    /// (a virtio device's used ring) are not logged.
    pub fn log_dirty(&self, on: bool) -> Result<(), KvmError> {
        let mem = &self.shared.mem;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: 0,
            memory_size: mem.size() as u64,
            userspace_addr: mem.host_addr() as u64,
        };
        // SAFETY: the same slot, range and mapping as `Vm::new` registered
        // (owned by the `VmShared` that owns the VM fd, see there); only
        // the flags change.
        unsafe { self.shared.fd.set_user_memory_region(region) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))
    }

    /// The pages of guest memory written since the last call (or since
    /// [`Vm::log_dirty`] turned the log on): one bit per 4 KiB page, page
    /// `i` in bit `i % 64` of word `i / 64`. Reading clears the log.
    pub fn dirty_log(&self) -> Result<Vec<u64>, KvmError> {
        self.shared
            .fd
            .get_dirty_log(0, self.shared.mem.size())
            .map_err(KvmError::ioctl("KVM_GET_DIRTY_LOG"))
    }

    /// Copies guest memory from `gpa` into `buf`.
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        self.shared.mem.read(gpa, buf)
    }
}
