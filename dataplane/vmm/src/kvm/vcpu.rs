//! The vCPU and its run loop: enter the guest, decode the exit
//! (`exit`), complete port I/O through the [`IoHandler`], and return on
//! what ends the run ([`VcpuExit`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use devplane_wire::AccessSize;
use kvm_bindings::KVM_EXIT_IO;
use kvm_ioctls::VcpuFd;

use super::exit::{Step, decode, le_value};
use super::kick::{KickShared, Running, VcpuKicker};
use super::vm::VmShared;
use super::{DONE_PORT, IoHandler, KvmError, VcpuExit};
use crate::boot::pvm_syscall::SyscallHook;

/// A vCPU, to be moved to (and run on) its own thread.
pub struct Vcpu {
    // Declared first: the vCPU fd closes before the VM's shared state drops.
    pub(super) fd: VcpuFd,
    index: u8,
    exits: u64,
    odd_mmio: u64,
    done_port: bool,
    pub(super) assists: u64,
    pub(super) syscalls: u64,
    pub(super) syscall_hook: Option<SyscallHook>,
    kick: Arc<KickShared>,
    pub(super) vm: Arc<VmShared>,
}

impl Vcpu {
    /// Wraps a configured vCPU fd of `vm`.
    pub(super) fn new(fd: VcpuFd, index: u8, vm: Arc<VmShared>) -> Vcpu {
        Vcpu {
            fd,
            index,
            exits: 0,
            odd_mmio: 0,
            done_port: true,
            assists: 0,
            syscalls: 0,
            syscall_hook: None,
            kick: Arc::new(KickShared::new()),
            vm,
        }
    }

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
        // Set once `stop` was seen and KVM asked to complete the last exit
        // without running the guest: the next EINTR ends the run.
        let mut settling = false;
        loop {
            if stop.load(Ordering::Acquire) {
                if settling {
                    return Ok(VcpuExit::Stopped);
                }
                // KVM finishes an I/O exit (stores an IN's value, moves RIP
                // past the instruction) only on the next KVM_RUN: enter
                // once with `immediate_exit` set, so that the vCPU's state
                // is whole when the run ends (a suspended or snapshotted
                // vCPU repeats no access).
                self.fd.set_kvm_immediate_exit(1);
                settling = true;
            }
            let step = match self.fd.run() {
                Ok(exit) => {
                    // Completing the last exit started another (the next
                    // element of a string I/O): handle it, then settle again.
                    settling = false;
                    self.exits += 1;
                    decode(exit, io, &mut self.odd_mmio)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // Kicked (or a stray signal, or settling): clear the
                    // request, let the handler do what it was kicked for,
                    // and look at `stop` again.
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
                // Completed by the VMM, or an error.
                Step::InternalError => self.internal_error()?,
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
    pub(super) fn unexpected(&self, what: &str) -> KvmError {
        KvmError::UnexpectedExit(format!(
            "vCPU {}: {what} at {}",
            self.index,
            self.describe()
        ))
    }
}
