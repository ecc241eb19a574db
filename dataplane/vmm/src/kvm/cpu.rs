//! CPU set-up: where a vCPU starts (real mode at an [`Entry`], or a given
//! [`CpuState`]), its CPUID (APIC ids, hidden features), its MSRs and its
//! LAPIC's local interrupt pins.

use std::sync::Arc;

use kvm_bindings::{
    CpuId, KVM_MP_STATE_RUNNABLE, Msrs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_segment, kvm_sregs,
};
use kvm_ioctls::VcpuFd;

use super::kick::install_kick_handler;
use super::{KvmError, Vcpu, Vm};
use crate::boot::pvm_syscall::SyscallHook;

/// LAPIC register offsets and LVT fields (Intel SDM vol. 3, 11.5.1).
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_LVT_MASKED: u32 = 1 << 16;
const APIC_DELIVERY_MODE_MASK: u32 = 0x700;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

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

impl Vm {
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
        set_msrs(&fd, &state.msrs)?;
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

        let cpuid = vcpu_cpuid(&self.cpuid, index, hide);
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

        Ok(Vcpu::new(fd, index, Arc::clone(&self.shared)))
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

/// Sets `msrs` (index, value) on a vCPU; every one must be taken.
pub(super) fn set_msrs(fd: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), KvmError> {
    if msrs.is_empty() {
        return Ok(());
    }
    let entries: Vec<kvm_msr_entry> = msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let refused = |set: usize| KvmError::Msrs {
        wanted: entries.len(),
        set,
        refused: entries.get(set).map_or(0, |e| e.index),
    };
    let list = Msrs::from_entries(&entries).map_err(|_| refused(0))?;
    let set = fd
        .set_msrs(&list)
        .map_err(KvmError::ioctl("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(refused(set));
    }
    Ok(())
}

/// The CPUID of vCPU `index`: the host's supported set with the APIC ids
/// of leaves 1, 0xb and 0x1f set to `index` and the `hide` bits cleared.
fn vcpu_cpuid(base: &CpuId, index: u8, hide: &[CpuidBits]) -> CpuId {
    let mut cpuid = base.clone();
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
    cpuid
}

#[cfg(test)]
mod tests {
    use kvm_bindings::kvm_cpuid_entry2;

    use super::*;

    #[test]
    fn cpuid_gets_the_apic_id_and_loses_hidden_bits() {
        let entry = |function, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let base = CpuId::from_entries(&[
            entry(1, 0, 0xaa12_3456, 0xffff_ffff, 0),
            entry(0xb, 0, 0, 0, 7),
            entry(7, 0, 0xffff_ffff, 0, 0),
        ])
        .unwrap();
        let hide = [
            CpuidBits {
                function: 1,
                reg: CpuidReg::Ecx,
                bits: 1 << 31,
            },
            CpuidBits {
                function: 7,
                reg: CpuidReg::Ebx,
                bits: 0xf,
            },
        ];
        let c = vcpu_cpuid(&base, 3, &hide);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0312_3456, "APIC id in EBX[31:24]");
        assert_eq!(e[0].ecx, 0x7fff_ffff);
        assert_eq!(e[1].edx, 3, "x2APIC id");
        assert_eq!(e[2].ebx, 0xffff_fff0);
    }
}
