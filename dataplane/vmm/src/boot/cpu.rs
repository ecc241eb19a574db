//! The state vCPU 0 enters a Linux kernel in: 64-bit long mode as the
//! boot protocol's 64-bit entry wants it (`Documentation/x86/boot.rst`,
//! "64-bit Boot Protocol").
//!
//! - paging on, with identity page tables over the first 4 GiB in 2 MiB
//!   pages (PML4 at [`PML4`], one PDPT, four page directories): covers the
//!   kernel, its decompression area, the zero page, the command line and
//!   the initramfs, whatever the memory size;
//! - a GDT at [`GDT_ADDR`] with flat 64-bit code at selector `0x10`
//!   (`__BOOT_CS`), flat data at `0x18` (`__BOOT_DS`, also in DS, ES, FS,
//!   GS, SS) and a TSS at `0x20`; the IDT is empty and interrupts are off
//!   (the kernel installs its own before enabling them);
//! - CR0 = PE | ET | NE | PG, CR4 = PAE, EFER = LME | LMA;
//! - RIP = the 64-bit entry point, RSI = the zero page, RFLAGS = 2 (IF
//!   clear), a small stack below the page tables;
//! - x87 control word 0x37f and MXCSR 0x1f80 (their reset values);
//! - MSRs a VMM sets at reset: SYSENTER and SYSCALL MSRs and
//!   KERNEL_GS_BASE cleared, TSC 0, MISC_ENABLE with fast strings, MTRRs
//!   enabled with write-back as the default type.
//!
//! CPUID is the host's supported set (APIC ids fixed up by
//! [`crate::kvm::Vm::create_vcpu_with_state`], which also sets the
//! LAPIC's LINT pins) less [`hidden_cpuid`]: features a kernel can boot
//! without, hidden because an instruction-emulating hypervisor under
//! `/dev/kvm` (nested PVM, where every guest kernel instruction is
//! emulated) lacks some of them (`cmpxchg16b` stops the vCPU with an
//! emulation error) and because without them the kernel picks cheaper paths
//! there (no byte-wise `rep stosb` page clearing). That hypervisor reports
//! some of these bits regardless (XSAVE, SMAP, ERMS); the kernel command
//! line turns those off ([`super::EMULATED_KVM_PARAMS`]).

use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};

use super::loader::GuestRam;
use crate::kvm::{CpuState, CpuidBits, CpuidReg, KvmError};

/// Where the GDT goes.
pub const GDT_ADDR: u64 = 0x500;
/// Top of the initial stack.
pub const BOOT_STACK: u64 = 0x8ff0;
/// The PML4.
pub const PML4: u64 = 0x9000;
/// The PDPT.
pub const PDPT: u64 = 0xa000;
/// The first of four page directories (each maps 1 GiB).
pub const PD: u64 = 0xb000;
/// How many GiB the identity map covers.
pub const MAPPED_GIB: u64 = 4;

/// Selectors the boot protocol names.
pub const BOOT_CS: u16 = 0x10;
/// The boot data segment.
pub const BOOT_DS: u16 = 0x18;
/// The task register's selector.
pub const BOOT_TSS: u16 = 0x20;

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_RW: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;

/// MSR indices.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// A flat segment as the GDT and KVM both describe it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    selector: u16,
    /// Access byte (bits 0-7) and flags nibble (bits 12-15), as in a
    /// descriptor's bits 40-55.
    flags: u16,
    base: u32,
    /// 20-bit limit (in 4 KiB units when G is set).
    limit: u32,
}

/// Flat 64-bit code: G, L, P, S, execute/read, accessed.
const CODE64: Segment = Segment {
    selector: BOOT_CS,
    flags: 0xa09b,
    base: 0,
    limit: 0xfffff,
};
/// Flat data: G, D/B, P, S, read/write, accessed.
const DATA: Segment = Segment {
    selector: BOOT_DS,
    flags: 0xc093,
    base: 0,
    limit: 0xfffff,
};
/// A busy 64-bit TSS (the task register must hold one to enter the guest).
const TSS: Segment = Segment {
    selector: BOOT_TSS,
    flags: 0x808b,
    base: 0,
    limit: 0xfffff,
};

impl Segment {
    /// The 8-byte GDT descriptor.
    fn descriptor(self) -> u64 {
        let (base, limit, flags) = (
            u64::from(self.base),
            u64::from(self.limit),
            u64::from(self.flags),
        );
        ((base & 0xff00_0000) << 32)
            | ((flags & 0xf0ff) << 40)
            | ((limit & 0xf_0000) << 32)
            | ((base & 0x00ff_ffff) << 16)
            | (limit & 0xffff)
    }

    /// The same segment as KVM's segment-register cache.
    fn kvm(self) -> kvm_segment {
        let bit = |n: u16| ((self.flags >> n) & 1) as u8;
        let g = bit(15);
        kvm_segment {
            base: u64::from(self.base),
            limit: if g == 1 {
                (self.limit << 12) | 0xfff
            } else {
                self.limit
            },
            selector: self.selector,
            type_: (self.flags & 0xf) as u8,
            present: bit(7),
            dpl: ((self.flags >> 5) & 3) as u8,
            db: bit(14),
            s: bit(4),
            l: bit(13),
            g,
            avl: bit(12),
            unusable: u8::from(bit(7) == 0),
            padding: 0,
        }
    }
}

/// The GDT: two null descriptors (selectors 0 and 8), then code, data,
/// TSS at their selectors.
fn gdt() -> [u64; 5] {
    [
        0,
        0,
        CODE64.descriptor(),
        DATA.descriptor(),
        TSS.descriptor(),
    ]
}

/// The identity page tables: (guest address, page contents) of the PML4,
/// the PDPT and the page directories.
fn page_tables() -> Vec<(u64, Vec<u8>)> {
    let page = |entries: &[u64]| -> Vec<u8> {
        let mut p = vec![0u8; 4096];
        for (i, e) in entries.iter().enumerate() {
            p[i * 8..i * 8 + 8].copy_from_slice(&e.to_le_bytes());
        }
        p
    };
    let mut out = vec![
        (PML4, page(&[PDPT | PTE_PRESENT | PTE_RW])),
        (
            PDPT,
            page(
                &(0..MAPPED_GIB)
                    .map(|i| (PD + i * 0x1000) | PTE_PRESENT | PTE_RW)
                    .collect::<Vec<_>>(),
            ),
        ),
    ];
    for i in 0..MAPPED_GIB {
        let entries: Vec<u64> = (0..512u64)
            .map(|j| ((i * 512 + j) << 21) | PTE_PRESENT | PTE_RW | PTE_PS)
            .collect();
        out.push((PD + i * 0x1000, page(&entries)));
    }
    out
}

/// Writes the GDT and the page tables into guest memory.
pub fn write_tables<M: GuestRam + ?Sized>(ram: &M) -> Result<(), KvmError> {
    let gdt: Vec<u8> = gdt().iter().flat_map(|d| d.to_le_bytes()).collect();
    ram.write_ram(GDT_ADDR, &gdt)?;
    for (gpa, bytes) in page_tables() {
        ram.write_ram(gpa, &bytes)?;
    }
    Ok(())
}

/// CPUID feature bits a Linux guest does not get (see the module docs).
/// The kernel boots on the x86-64 baseline; these only select faster (or,
/// under an emulator, slower) code paths.
pub fn hidden_cpuid() -> Vec<CpuidBits> {
    let bits = |function, reg, bits: &[u32]| CpuidBits {
        function,
        reg,
        bits: bits.iter().fold(0, |a, b| a | (1 << b)),
    };
    vec![
        // Leaf 1 ECX: PCLMULQDQ, FMA, CX16, MOVBE, AES, XSAVE, OSXSAVE,
        // AVX, F16C, RDRAND.
        bits(1, CpuidReg::Ecx, &[1, 12, 13, 22, 25, 26, 27, 28, 29, 30]),
        // Leaf 7 EBX: AVX2, ERMS, RDSEED, ADX, SMAP, SHA and AVX-512.
        bits(
            7,
            CpuidReg::Ebx,
            &[5, 9, 16, 17, 18, 19, 20, 21, 26, 27, 28, 29, 30, 31],
        ),
        // Leaf 7 ECX: AVX-512 VBMI, PKU, OSPKE, VAES, VPCLMULQDQ, GFNI and
        // the other AVX-512 extensions.
        bits(7, CpuidReg::Ecx, &[1, 3, 4, 6, 8, 9, 10, 11, 12, 14]),
        // Leaf 7 EDX: FSRM (fast short rep movsb).
        bits(7, CpuidReg::Edx, &[4]),
    ]
}

/// The vCPU state for entering the kernel at `entry` with the zero page at
/// `zero_page` (the tables must be in memory: [`write_tables`]).
pub fn long_mode_state(entry: u64, zero_page: u64) -> CpuState {
    let data = DATA.kvm();
    let sregs = kvm_sregs {
        cs: CODE64.kvm(),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: TSS.kvm(),
        // No LDT: an unusable system segment of type LDT.
        ldt: kvm_segment {
            type_: 2,
            unusable: 1,
            ..Default::default()
        },
        gdt: kvm_dtable {
            base: GDT_ADDR,
            limit: (std::mem::size_of_val(&gdt()) - 1) as u16,
            ..Default::default()
        },
        // Empty IDT: interrupts stay off until the kernel loads its own.
        idt: kvm_dtable::default(),
        cr0: CR0_PE | CR0_ET | CR0_NE | CR0_PG,
        cr3: PML4,
        cr4: CR4_PAE,
        efer: EFER_LME | EFER_LMA,
        ..Default::default()
    };

    let regs = kvm_regs {
        rip: entry,
        rsi: zero_page,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rflags: 0x2,
        ..Default::default()
    };

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };

    let msrs = vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];

    CpuState {
        regs,
        sregs,
        fpu,
        msrs,
        cpuid_hide: hidden_cpuid(),
        syscall_hook: None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::loader::tests::VecRam;
    use super::*;

    #[test]
    fn descriptors_match_the_usual_encodings() {
        assert_eq!(CODE64.descriptor(), 0x00af_9b00_0000_ffff);
        assert_eq!(DATA.descriptor(), 0x00cf_9300_0000_ffff);
        assert_eq!(TSS.descriptor(), 0x008f_8b00_0000_ffff);
        let cs = CODE64.kvm();
        assert_eq!((cs.l, cs.db, cs.g, cs.s, cs.present), (1, 0, 1, 1, 1));
        assert_eq!((cs.type_, cs.limit, cs.selector), (0xb, 0xffff_ffff, 0x10));
        let ds = DATA.kvm();
        assert_eq!((ds.l, ds.db, ds.type_, ds.selector), (0, 1, 3, 0x18));
        let tr = TSS.kvm();
        assert_eq!((tr.s, tr.type_, tr.present, tr.unusable), (0, 0xb, 1, 0));
    }

    #[test]
    fn tables_identity_map_four_gib() {
        let ram = VecRam::new(1 << 20);
        write_tables(&ram).unwrap();
        assert_eq!(ram.u64_at(GDT_ADDR + 16), CODE64.descriptor());
        assert_eq!(ram.u64_at(PML4), PDPT | 3);
        for i in 0..4 {
            assert_eq!(ram.u64_at(PDPT + i * 8), (PD + i * 0x1000) | 3);
        }
        assert_eq!(ram.u64_at(PDPT + 32), 0, "nothing past 4 GiB");
        assert_eq!(ram.u64_at(PD), 0x83);
        assert_eq!(ram.u64_at(PD + 8), 0x20_0083);
        // The last 2 MiB page below 4 GiB.
        assert_eq!(ram.u64_at(PD + 3 * 0x1000 + 511 * 8), 0xffe0_0083);
    }

    #[test]
    fn state_is_long_mode_at_the_entry() {
        let s = long_mode_state(0x10_0200, 0x7000);
        assert_eq!(
            (s.regs.rip, s.regs.rsi, s.regs.rflags),
            (0x10_0200, 0x7000, 2)
        );
        assert_eq!(s.sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(s.sregs.efer, EFER_LME | EFER_LMA);
        assert_eq!(s.sregs.cr3, PML4);
        assert_eq!(s.sregs.gdt.limit, 39);
        assert_eq!((s.fpu.fcw, s.fpu.mxcsr), (0x37f, 0x1f80));
        assert!(s.msrs.contains(&(MSR_IA32_MISC_ENABLE, 1)));
    }
}
