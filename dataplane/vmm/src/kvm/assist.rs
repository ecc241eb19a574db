//! Emulation assists: instructions KVM's instruction emulator gave up on
//! (nested PVM emulates a non-PVM guest's kernel code and lacks some),
//! completed by the VMM. `INT3` becomes the `#BP` trap it raises; `FWAIT`
//! moves on.

use kvm_bindings::{KVM_EXIT_INTERNAL_ERROR, KVM_INTERNAL_ERROR_EMULATION, kvm_regs};

use crate::boot::pvm_syscall::{Resume, SyscallHook};

use super::{KvmError, Vcpu};

/// The `INT3` opcode and the `#BP` vector it raises.
const INT3: u8 = 0xcc;
/// The `FWAIT` opcode.
const FWAIT: u8 = 0x9b;
const BP_VECTOR: u8 = 3;

impl Vcpu {
    /// A `KVM_EXIT_INTERNAL_ERROR`: `Ok` once the VMM completed the
    /// instruction KVM's emulator could not, else the error, naming the
    /// suberror.
    pub(super) fn internal_error(&mut self) -> Result<(), KvmError> {
        let run = self.fd.get_kvm_run();
        let suberror = if run.exit_reason == KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says `internal` is the union member KVM
            // filled in.
            Some(unsafe { run.__bindgen_anon_1.internal.suberror })
        } else {
            None
        };
        if suberror == Some(KVM_INTERNAL_ERROR_EMULATION) && self.assist_emulation()? {
            return Ok(());
        }
        Err(self.unexpected(&match suberror {
            Some(s) => format!("KVM internal error, suberror {s}"),
            None => "KVM internal error".to_string(),
        }))
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
        if self.vm.mem.read(t.physical_address, &mut byte).is_err()
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
        let mut bytes = [0u8; FRAME];
        if t.valid != 0 && in_page && self.vm.mem.read(t.physical_address, &mut bytes).is_ok() {
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
}
