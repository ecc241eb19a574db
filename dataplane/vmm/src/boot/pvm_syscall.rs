//! System calls of a stock kernel's user space where `/dev/kvm` is nested
//! PVM ([`super::kvm_emulates_kernel_code`]).
//!
//! There, a user-mode `SYSCALL` has every register effect of the
//! instruction (RIP = `MSR_LSTAR`, RCX = the return address, R11 = the
//! user's RFLAGS, RFLAGS masked) but no change of privilege: the vCPU
//! fetches the kernel's `entry_SYSCALL_64` still at CPL 3, which page
//! faults in user mode, and the kernel kills the process. The VMM sees none
//! of it, so it sets a trap where it does: an `INT3` over the one-byte
//! `NOP` that starts the kernel's page-fault entry (`asm_exc_page_fault`).
//! The emulator that runs the kernel's code cannot execute `INT3` and
//! hands it to the VMM ([`super::super::kvm::Vcpu::run`]), which asks
//! [`SyscallHook::resume`] what to do:
//!
//! - the fault is a user-mode instruction fetch at the system-call entry:
//!   it was a system call. The vCPU, now at CPL 0, goes to the entry with
//!   the user's stack pointer and RFLAGS cleared, the state `SYSCALL`
//!   leaves (RCX and R11 still hold what the instruction put there, as the
//!   fault's delivery does not touch them); the kernel's entry code does
//!   the rest, and its `SYSRET` back to user mode works;
//! - any other fault goes on past the `NOP` the trap replaced.
//!
//! The hook needs the kernel's symbol table (an ELF `vmlinux` with
//! `.symtab`, as the minimal kernel `scripts/guest-kernel.sh` builds is)
//! and a page-fault entry that starts with a one-byte `NOP` (the padding
//! of the `CLAC` alternative, which stays a `NOP` where SMAP is off, as
//! [`super::EMULATED_KVM_CPU_PARAMS`] makes it); otherwise there is none.

/// The one-byte `NOP` the trap replaces.
pub const NOP: u8 = 0x90;
/// The trap.
pub const INT3: u8 = 0xcc;
/// Page-fault error code: the page was present, the access came from user
/// mode, and it was an instruction fetch.
const PF_PRESENT_USER_FETCH: u64 = 0x1 | 0x4 | 0x10;
/// The symbol names the hook needs.
const PF_ENTRY_SYMBOL: &[u8] = b"asm_exc_page_fault";
const SYSCALL_ENTRY_SYMBOL: &[u8] = b"entry_SYSCALL_64";

/// The kernel's page-fault and system-call entry points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallHook {
    /// `asm_exc_page_fault`, where the trap goes.
    pub pf_entry: u64,
    /// `entry_SYSCALL_64`, the kernel's `MSR_LSTAR`.
    pub syscall_entry: u64,
    /// The guest-physical address the loader puts `pf_entry`'s byte at.
    pub trap_gpa: u64,
}

/// What the vCPU does after the trap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Enter the system call: set RIP, RSP and RFLAGS.
    Syscall {
        /// The system-call entry.
        rip: u64,
        /// The user's stack pointer.
        rsp: u64,
        /// RFLAGS as `SYSCALL` leaves them (the reserved bit only).
        rflags: u64,
    },
    /// An ordinary page fault: go on past the `NOP`.
    Fault {
        /// The instruction after the `NOP`.
        rip: u64,
    },
}

impl SyscallHook {
    /// The entry points of the ELF `vmlinux` in `elf`, if it has both
    /// symbols and the page-fault entry starts with a one-byte `NOP` in a
    /// loaded segment; `None` for anything else (no panic on any input).
    pub fn from_vmlinux(elf: &[u8]) -> Option<SyscallHook> {
        let pf_entry = elf_symbol(elf, PF_ENTRY_SYMBOL)?;
        let syscall_entry = elf_symbol(elf, SYSCALL_ENTRY_SYMBOL)?;
        let (byte, trap_gpa) = elf_byte_at(elf, pf_entry)?;
        (byte == NOP).then_some(SyscallHook {
            pf_entry,
            syscall_entry,
            trap_gpa,
        })
    }

    /// What to do at the trap, given the exception frame on the kernel's
    /// stack: error code, RIP, CS, RFLAGS, RSP (SS follows).
    pub fn resume(&self, frame: &[u64; 5]) -> Resume {
        let [error, rip, cs, _rflags, rsp] = *frame;
        if rip == self.syscall_entry
            && cs & 3 == 3
            && error & PF_PRESENT_USER_FETCH == PF_PRESENT_USER_FETCH
        {
            Resume::Syscall {
                rip: self.syscall_entry,
                rsp,
                rflags: 0x2,
            }
        } else {
            Resume::Fault {
                rip: self.pf_entry + 1,
            }
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn usize_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64_at(b, off)?).ok()
}

/// An ELF64 little-endian file's section headers: (offset, size, count).
fn section_table(elf: &[u8]) -> Option<(usize, usize, usize)> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let shoff = usize_at(elf, 0x28)?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    (shentsize >= 0x40).then_some((shoff, shentsize, shnum))
}

/// The value of symbol `name` in the ELF's `.symtab`.
fn elf_symbol(elf: &[u8], name: &[u8]) -> Option<u64> {
    const SHT_SYMTAB: u32 = 2;
    const SYM_SIZE: usize = 24;
    let (shoff, shentsize, shnum) = section_table(elf)?;
    let header = |i: usize| shoff.checked_add(i.checked_mul(shentsize)?);
    for i in 0..shnum {
        let sh = header(i)?;
        if u32_at(elf, sh + 4)? != SHT_SYMTAB {
            continue;
        }
        let (off, size) = (usize_at(elf, sh + 0x18)?, usize_at(elf, sh + 0x20)?);
        let syms = elf.get(off..off.checked_add(size)?)?;
        let strtab = header(usize::try_from(u32_at(elf, sh + 0x28)?).ok()?)?;
        let (soff, ssize) = (usize_at(elf, strtab + 0x18)?, usize_at(elf, strtab + 0x20)?);
        let strs = elf.get(soff..soff.checked_add(ssize)?)?;
        for sym in syms.chunks_exact(SYM_SIZE) {
            let n = usize::try_from(u32_at(sym, 0)?).ok()?;
            let rest = strs.get(n..)?;
            let end = rest.iter().position(|&c| c == 0)?;
            if &rest[..end] == name {
                return u64_at(sym, 8);
            }
        }
    }
    None
}

/// The byte of a loaded segment (`PT_LOAD`) at virtual address `va`, and
/// its physical address (where the loader puts it).
fn elf_byte_at(elf: &[u8], va: u64) -> Option<(u8, u64)> {
    const PT_LOAD: u32 = 1;
    let phoff = usize_at(elf, 0x20)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != PT_LOAD {
            continue;
        }
        let (offset, vaddr) = (u64_at(elf, ph + 8)?, u64_at(elf, ph + 0x10)?);
        let (paddr, filesz) = (u64_at(elf, ph + 0x18)?, u64_at(elf, ph + 0x20)?);
        if va >= vaddr && va - vaddr < filesz {
            let at = usize::try_from(offset.checked_add(va - vaddr)?).ok()?;
            return Some((*elf.get(at)?, paddr.checked_add(va - vaddr)?));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const PF: u64 = 0xffff_ffff_8120_0af0;
    const SYSCALL: u64 = 0xffff_ffff_8120_0040;

    /// An ELF64 with one loaded segment (at `PF`, holding `first`) and a
    /// symbol table naming both entries.
    fn vmlinux(first: u8, with_syscall: bool) -> Vec<u8> {
        let mut f = vec![0u8; 0x400];
        f[..6].copy_from_slice(b"\x7fELF\x02\x01");
        let put = |f: &mut Vec<u8>, at: usize, v: &[u8]| f[at..at + v.len()].copy_from_slice(v);
        // One program header at 0x40: PT_LOAD of 16 bytes at file 0x100.
        put(&mut f, 0x20, &0x40u64.to_le_bytes());
        put(&mut f, 0x36, &0x38u16.to_le_bytes());
        put(&mut f, 0x38, &1u16.to_le_bytes());
        put(&mut f, 0x40, &1u32.to_le_bytes());
        put(&mut f, 0x48, &0x100u64.to_le_bytes());
        put(&mut f, 0x50, &PF.to_le_bytes());
        put(&mut f, 0x58, &0x0120_0af0u64.to_le_bytes());
        put(&mut f, 0x60, &16u64.to_le_bytes());
        f[0x100] = first;
        // Strings at 0x200, symbols at 0x280.
        let strs = b"\0asm_exc_page_fault\0entry_SYSCALL_64\0";
        put(&mut f, 0x200, strs);
        let sym = |f: &mut Vec<u8>, i: usize, name: u32, value: u64| {
            put(f, 0x280 + i * 24, &name.to_le_bytes());
            put(f, 0x280 + i * 24 + 8, &value.to_le_bytes());
        };
        sym(&mut f, 1, 1, PF);
        if with_syscall {
            sym(&mut f, 2, 20, SYSCALL);
        }
        // Sections at 0x300: null, .symtab (link 2), .strtab.
        put(&mut f, 0x28, &0x300u64.to_le_bytes());
        put(&mut f, 0x3a, &0x40u16.to_le_bytes());
        put(&mut f, 0x3c, &3u16.to_le_bytes());
        let sh = 0x340;
        put(&mut f, sh + 4, &2u32.to_le_bytes());
        put(&mut f, sh + 0x18, &0x280u64.to_le_bytes());
        put(&mut f, sh + 0x20, &72u64.to_le_bytes());
        put(&mut f, sh + 0x28, &2u32.to_le_bytes());
        let sh = 0x380;
        put(&mut f, sh + 4, &3u32.to_le_bytes());
        put(&mut f, sh + 0x18, &0x200u64.to_le_bytes());
        put(&mut f, sh + 0x20, &(strs.len() as u64).to_le_bytes());
        f
    }

    #[test]
    fn finds_the_entries_of_a_kernel_whose_fault_entry_starts_with_a_nop() {
        let hook = SyscallHook::from_vmlinux(&vmlinux(NOP, true)).unwrap();
        assert_eq!(
            hook,
            SyscallHook {
                pf_entry: PF,
                syscall_entry: SYSCALL,
                trap_gpa: 0x0120_0af0,
            }
        );
        assert_eq!(
            SyscallHook::from_vmlinux(&vmlinux(0x0f, true)),
            None,
            "not a NOP"
        );
        assert_eq!(
            SyscallHook::from_vmlinux(&vmlinux(NOP, false)),
            None,
            "no LSTAR"
        );
        // Truncations and garbage never panic.
        let good = vmlinux(NOP, true);
        for len in 0..good.len() {
            let _ = SyscallHook::from_vmlinux(&good[..len]);
        }
        let mut bad = good.clone();
        bad[0x3c] = 0xff;
        let _ = SyscallHook::from_vmlinux(&bad);
        assert_eq!(SyscallHook::from_vmlinux(b"not an elf"), None);
    }

    #[test]
    fn a_user_fetch_fault_at_the_entry_is_a_system_call() {
        let hook = SyscallHook {
            pf_entry: PF,
            syscall_entry: SYSCALL,
            trap_gpa: 0x0120_0af0,
        };
        // What this host leaves: error 0x15, RIP = LSTAR, user CS 0x33.
        assert_eq!(
            hook.resume(&[0x15, SYSCALL, 0x33, 0x10002, 0x7ffd_0000_1000]),
            Resume::Syscall {
                rip: SYSCALL,
                rsp: 0x7ffd_0000_1000,
                rflags: 2
            }
        );
        let fault = Resume::Fault { rip: PF + 1 };
        // A kernel-mode fault there, a user data fault, a fetch elsewhere.
        assert_eq!(hook.resume(&[0x11, SYSCALL, 0x10, 0x2, 0x1000]), fault);
        assert_eq!(hook.resume(&[0x7, SYSCALL, 0x33, 0x2, 0x1000]), fault);
        assert_eq!(hook.resume(&[0x15, 0x40_1000, 0x33, 0x2, 0x1000]), fault);
    }
}
