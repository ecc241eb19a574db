//! Test guests: tiny 16-bit real-mode programs assembled at run time from
//! the source in this file (iced-x86's `CodeAssembler`; no prebuilt bytes).
//!
//! Every guest is a "tiny model" program: it is loaded at the start of a
//! 64 KiB segment and entered at `cs:ip` with DS = ES = SS = CS (see
//! [`Entry`]); its variables live at [`DATA_OFFSET`] and its stack grows
//! down from [`STACK_TOP`] in the same segment. Each reports its result by
//! writing a 32-bit value to [`DONE_PORT`], then halts with interrupts off.

use iced_x86::IcedError;
use iced_x86::code_asm::{
    CodeAssembler, CodeLabel, al, ax, bl, bx, byte_ptr, ch, cl, cr0, cs, cx, di, ds, dword_ptr, dx,
    eax, ebx, ecx, edi, edx, es, esi, fs, mm0, ptr, qword_ptr, si, word_ptr,
};

use super::kvm::{DONE_PORT, Entry};

/// Segment of single-vCPU guests (loaded at GPA `0x10000`).
pub const GUEST_SEGMENT: u16 = 0x1000;

/// Offset of a guest's variables in its segment.
pub const DATA_OFFSET: u16 = 0x8000;

/// Initial stack pointer of a guest.
pub const STACK_TOP: u16 = 0xfff0;

/// Master 8259 PIC command and data ports.
const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
/// Slave 8259 PIC command and data ports.
const PIC2_CMD: u16 = 0xa0;
const PIC2_DATA: u16 = 0xa1;
/// Vector of master PIC input 0 after [`irq_counter`] programs it.
pub const PIC_VECTOR_BASE: u8 = 0x20;

/// Why a guest could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// The assembler rejected the program (a bug in this file).
    #[error("assembling the guest: {0}")]
    Assemble(#[from] IcedError),
    /// An argument is out of the range the guest supports.
    #[error("bad guest argument: {0}")]
    BadArgument(String),
}

/// An assembled guest: load `code` at `load_gpa`, start a vCPU at `entry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guest {
    /// Machine code (and nothing else: variables are set up at run time).
    pub code: Vec<u8>,
    /// Where `code` goes in guest memory.
    pub load_gpa: u64,
    /// Where the vCPU starts.
    pub entry: Entry,
}

impl Guest {
    /// The end of the 64 KiB segment the guest uses (code, data, stack):
    /// guest memory must be at least this large.
    pub fn mem_end(&self) -> u64 {
        self.load_gpa + 0x1_0000
    }
}

/// A program being assembled in segment `seg`, entered at `ip`.
struct Program {
    a: CodeAssembler,
    seg: u16,
}

impl Program {
    fn new(seg: u16) -> Result<Program, GuestError> {
        Ok(Program {
            a: CodeAssembler::new(16)?,
            seg,
        })
    }

    /// `out DONE_PORT, eax`, then halt with interrupts off for good.
    fn report_eax(&mut self) -> Result<(), GuestError> {
        let a = &mut self.a;
        a.out(u32::from(DONE_PORT), eax)?;
        let mut halt = a.create_label();
        a.set_label(&mut halt)?;
        a.cli()?;
        a.hlt()?;
        a.jmp(halt)?;
        Ok(())
    }

    /// Assembles with the entry point at `entry` (a label already set).
    fn finish(mut self, entry: Option<CodeLabel>) -> Result<Guest, GuestError> {
        let ip = match entry {
            None => {
                self.a.assemble(0)?;
                0
            }
            Some(label) => {
                let r = self.a.assemble_options(
                    0,
                    iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
                )?;
                r.label_ip(&label)?
            }
        };
        let code = self.a.assemble(0)?;
        if code.len() >= usize::from(DATA_OFFSET) {
            return Err(GuestError::BadArgument(format!(
                "program of {} bytes overlaps its data at {DATA_OFFSET:#x}",
                code.len()
            )));
        }
        let ip = u16::try_from(ip)
            .map_err(|_| GuestError::BadArgument(format!("entry {ip:#x} beyond 64 KiB")))?;
        Ok(Guest {
            code,
            load_gpa: u64::from(self.seg) << 4,
            entry: Entry {
                cs: self.seg,
                ip,
                sp: STACK_TOP,
            },
        })
    }
}

/// `iterations` times: `out port, eax` with eax = 1, 2, ...; then one
/// `in eax, port`, reported via [`DONE_PORT`]. Against a device that
/// counts writes and returns the count on read, reports `iterations`.
pub fn pio_loop(port: u16, iterations: u16) -> Result<Guest, GuestError> {
    pio_loop_in(GUEST_SEGMENT, port, iterations)
}

fn pio_loop_in(seg: u16, port: u16, iterations: u16) -> Result<Guest, GuestError> {
    let mut p = Program::new(seg)?;
    let mut done = write_loop(&mut p.a, port, iterations)?;
    let a = &mut p.a;
    a.set_label(&mut done)?;
    a.in_(eax, dx)?;
    p.report_eax()?;
    p.finish(None)
}

/// Assembles `iterations` times `out port, eax` with eax = 1, 2, ... (dx
/// holds the port after it); returns the label to set on what follows.
fn write_loop(a: &mut CodeAssembler, port: u16, iterations: u16) -> Result<CodeLabel, GuestError> {
    let mut top = a.create_label();
    let done = a.create_label();
    a.mov(dx, u32::from(port))?;
    a.mov(cx, u32::from(iterations))?;
    a.xor(eax, eax)?;
    a.jcxz(done)?;
    a.set_label(&mut top)?;
    a.inc(eax)?;
    a.out(dx, eax)?;
    a.loop_(top)?;
    Ok(done)
}

/// What [`checked_writes`] reports when its check fails (ORed with the
/// count the device answered, low 16 bits).
pub const CHECK_FAILED: u32 = 0xbad0_0000;

/// `iterations` writes with a self-check, its state in guest memory: the
/// number of writes so far and their sum live at [`DATA_OFFSET`] (not in
/// registers), each iteration `out port, eax` with eax = that number + 1.
/// Then one `in eax, port`; if the device's answer equals the count in
/// memory and the sum in memory is 1 + 2 + ... + `iterations`, it reports
/// the answer, else [`CHECK_FAILED`] ORed with it. Against a device that
/// counts writes, a VM whose memory or registers were not carried over
/// whole (a snapshot, a migration), or a write lost or applied twice,
/// shows as a report other than `iterations`. For vCPU `vcpu` of a VM
/// whose guests run at once: its own segment (`0x1000 * (vcpu + 1)`) and
/// port `port + 0x10 * vcpu`, like [`multi_vcpu`].
///
/// State that lives only in the vCPU is checked too: before the first
/// write the guest loads MMX register `mm0` (FPU state, what XSAVE
/// carries) with [`checked_fpu_pattern`] and writes
/// [`CHECKED_MSR_VALUE`] + `vcpu` to MSR [`CHECKED_MSR`]
/// (`IA32_SYSENTER_CS`), and puts its local APIC in x2APIC mode with an
/// LVT timer ([`checked_lvt_timer`]) and a divide configuration
/// ([`CHECKED_TIMER_DIVIDE`]) of its own, and masks IRQs 14 and 15 on the
/// in-kernel slave PIC ([`CHECKED_SLAVE_MASK`]); after the last it reads
/// them all back. vCPU 0 alone (the VM's devices are shared, and their
/// registers are selected and then written in two steps) also programs
/// the in-kernel IOAPIC's redirection entry [`CHECKED_IOAPIC_PIN`]
/// ([`CHECKED_IOAPIC_ENTRY`], through a flat FS: "unreal mode", see
/// [`enter_unreal_fs`]) and the in-kernel PIT's channel 2 (mode 4, count
/// [`CHECKED_PIT_COUNT`], its count latched at once), and reads back the
/// entry, the channel's status (its mode and access) and the latched
/// count. A snapshot or migration that loses any
/// (the target starting with reset values: `KVM_SET_XSAVE`,
/// `KVM_SET_MSRS`, `KVM_SET_LAPIC`, the APIC base or FS in
/// `KVM_SET_SREGS`, the PIC's or IOAPIC's `KVM_SET_IRQCHIP` or
/// `KVM_SET_PIT2` skipped) fails the check. The VM needs the in-kernel
/// PIT the client gives every VM.
pub fn checked_writes(port: u16, iterations: u16, vcpu: u8) -> Result<Guest, GuestError> {
    if vcpu >= 8 {
        return Err(GuestError::BadArgument(format!(
            "vCPU {vcpu}: between 0 and 7 are supported"
        )));
    }
    let i = u16::from(vcpu);
    let port = port.checked_add(0x10 * i).ok_or_else(|| {
        GuestError::BadArgument(format!("port {port:#x} + {:#x} overflows", 0x10 * i))
    })?;
    let mut p = Program::new(GUEST_SEGMENT * (i + 1))?;
    let a = &mut p.a;
    let count = u32::from(DATA_OFFSET);
    let sum = count + 4;
    let n = u32::from(iterations);
    let want_sum = (u64::from(n) * (u64::from(n) + 1) / 2) as u32;
    let pattern = sum + 4;
    let readback = pattern + 8;
    let fpu = checked_fpu_pattern(vcpu);
    let msr_value = CHECKED_MSR_VALUE + u32::from(vcpu);
    let mut top = a.create_label();
    let mut done = a.create_label();
    let mut bad = a.create_label();
    a.mov(dword_ptr(pattern), fpu as u32)?;
    a.mov(dword_ptr(pattern + 4), (fpu >> 32) as u32)?;
    a.movq(mm0, qword_ptr(pattern))?;
    a.mov(ecx, CHECKED_MSR)?;
    a.mov(eax, msr_value)?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    // The local APIC: into x2APIC mode (EN and EXTD in IA32_APIC_BASE),
    // where its registers are MSRs a real-mode guest reaches; then a
    // masked LVT timer with a vector of its own and a divide
    // configuration, neither of them the reset value.
    a.mov(ecx, MSR_APIC_BASE)?;
    a.rdmsr()?;
    a.or(eax, APIC_BASE_EN | APIC_BASE_EXTD)?;
    a.wrmsr()?;
    a.mov(ecx, X2APIC_LVT_TIMER)?;
    a.mov(eax, checked_lvt_timer(vcpu))?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.mov(ecx, X2APIC_TIMER_DIVIDE)?;
    a.mov(eax, CHECKED_TIMER_DIVIDE)?;
    a.wrmsr()?;
    // The in-kernel PIC: IRQs 14 and 15 masked on the slave (lines no
    // device of these VMs uses; the reset mask is 0).
    a.in_(al, 0xa1)?;
    a.or(al, CHECKED_SLAVE_MASK)?;
    a.out(0xa1, al)?;
    if vcpu == 0 {
        enter_unreal_fs(a, p.seg, u32::from(DATA_OFFSET) + 0x20)?;
        // The IOAPIC: select the entry's low half, write it.
        a.mov(ebx, IOAPIC_BASE)?;
        a.mov(dword_ptr(ebx).fs(), ioapic_redtbl_low(CHECKED_IOAPIC_PIN))?;
        a.mov(dword_ptr(ebx + 0x10).fs(), CHECKED_IOAPIC_ENTRY)?;
        // The PIT: channel 2, low then high byte, mode 4, binary; its
        // count latched right after the load: the latch (a value a little
        // under the count) is PIT state the end reads back. The host may
        // preempt the vCPU between the load and the latch: an attempt
        // whose two TSC reads are more than PIT_LATCH_TSC apart is made
        // again (its latch read out first), at most 16 times.
        let mut again = a.create_label();
        a.mov(edi, 16u32)?;
        a.set_label(&mut again)?;
        a.xor(eax, eax)?;
        a.dec(edi)?;
        a.js(bad)?;
        a.in_(al, u32::from(PIT_CHANNEL2))?;
        a.in_(al, u32::from(PIT_CHANNEL2))?;
        a.mov(al, PIT_CHECKED_CONTROL)?;
        a.out(u32::from(PIT_CONTROL), al)?;
        a.mov(al, CHECKED_PIT_COUNT & 0xff)?;
        a.out(u32::from(PIT_CHANNEL2), al)?;
        a.rdtsc()?;
        a.mov(esi, eax)?;
        a.mov(al, CHECKED_PIT_COUNT >> 8)?;
        a.out(u32::from(PIT_CHANNEL2), al)?;
        a.mov(al, PIT_LATCH_CH2)?;
        a.out(u32::from(PIT_CONTROL), al)?;
        a.rdtsc()?;
        a.sub(eax, esi)?;
        a.cmp(eax, PIT_LATCH_TSC)?;
        a.ja(again)?;
    }
    a.mov(dx, u32::from(port))?;
    a.xor(eax, eax)?;
    a.mov(dword_ptr(count), eax)?;
    a.mov(dword_ptr(sum), eax)?;
    a.set_label(&mut top)?;
    a.mov(eax, dword_ptr(count))?;
    a.cmp(eax, n)?;
    a.jae(done)?;
    a.inc(eax)?;
    a.mov(dword_ptr(count), eax)?;
    a.add(dword_ptr(sum), eax)?;
    a.out(dx, eax)?;
    a.jmp(top)?;
    a.set_label(&mut done)?;
    a.in_(eax, dx)?;
    a.cmp(eax, dword_ptr(count))?;
    a.jne(bad)?;
    a.cmp(dword_ptr(sum), want_sum)?;
    a.jne(bad)?;
    // The vCPU-only state, eax (the answer) kept for the report.
    a.movq(qword_ptr(readback), mm0)?;
    a.mov(esi, dword_ptr(readback))?;
    a.cmp(esi, dword_ptr(pattern))?;
    a.jne(bad)?;
    a.mov(esi, dword_ptr(readback + 4))?;
    a.cmp(esi, dword_ptr(pattern + 4))?;
    a.jne(bad)?;
    a.mov(edi, eax)?;
    a.mov(ecx, CHECKED_MSR)?;
    a.rdmsr()?;
    a.cmp(eax, msr_value)?;
    a.mov(eax, edi)?;
    a.jne(bad)?;
    a.mov(ecx, X2APIC_LVT_TIMER)?;
    a.rdmsr()?;
    a.cmp(eax, checked_lvt_timer(vcpu))?;
    a.mov(eax, edi)?;
    a.jne(bad)?;
    a.mov(ecx, X2APIC_TIMER_DIVIDE)?;
    a.rdmsr()?;
    a.cmp(eax, CHECKED_TIMER_DIVIDE)?;
    a.mov(eax, edi)?;
    a.jne(bad)?;
    a.in_(al, 0xa1)?;
    a.and(al, CHECKED_SLAVE_MASK)?;
    a.cmp(al, CHECKED_SLAVE_MASK)?;
    a.mov(eax, edi)?;
    a.jne(bad)?;
    if vcpu == 0 {
        a.mov(ebx, IOAPIC_BASE)?;
        a.mov(dword_ptr(ebx).fs(), ioapic_redtbl_low(CHECKED_IOAPIC_PIN))?;
        a.mov(esi, dword_ptr(ebx + 0x10).fs())?;
        a.cmp(esi, CHECKED_IOAPIC_ENTRY)?;
        a.jne(bad)?;
        // Read-back command: latch channel 2's status (not its count).
        a.mov(al, PIT_READ_BACK_STATUS_CH2)?;
        a.out(u32::from(PIT_CONTROL), al)?;
        a.in_(al, u32::from(PIT_CHANNEL2))?;
        // Output pin (bit 7) and null count (bit 6) move with time.
        a.and(al, 0x3f)?;
        a.cmp(al, PIT_CHECKED_STATUS)?;
        a.mov(eax, edi)?;
        a.jne(bad)?;
        // Then the count latched at the start, low byte then high: loaded
        // with CHECKED_PIT_COUNT, it had counted down a little (1.19 MHz),
        // not past PIT_LATCH_FLOOR.
        a.in_(al, u32::from(PIT_CHANNEL2))?;
        a.mov(cl, al)?;
        a.in_(al, u32::from(PIT_CHANNEL2))?;
        a.mov(ch, al)?;
        a.cmp(cx, CHECKED_PIT_COUNT)?;
        a.mov(eax, edi)?;
        a.ja(bad)?;
        a.cmp(cx, PIT_LATCH_FLOOR)?;
        a.jb(bad)?;
    }
    p.report_eax()?;
    let a = &mut p.a;
    a.set_label(&mut bad)?;
    a.and(eax, 0xffffu32)?;
    a.or(eax, CHECK_FAILED)?;
    p.report_eax()?;
    p.finish(None)
}

/// Puts a flat 4 GiB data segment in FS while staying in real mode
/// ("unreal mode"): builds a two-entry GDT at `gdt` (16 bytes, then its
/// 6-byte pointer) in segment `seg`, sets CR0.PE, loads FS from the flat
/// descriptor and clears CR0.PE again. FS keeps the descriptor's base and
/// limit until it is loaded again, so `fs:[ebx]` reaches any physical
/// address (the IOAPIC's at 0xfec00000) while the rest of the program
/// stays real-mode code. Clobbers eax and bx; interrupts off.
fn enter_unreal_fs(a: &mut CodeAssembler, seg: u16, gdt: u32) -> Result<(), GuestError> {
    let gdtr = gdt + 16;
    a.cli()?;
    a.mov(dword_ptr(gdt), 0u32)?;
    a.mov(dword_ptr(gdt + 4), 0u32)?;
    // Base 0, limit 0xfffff in 4 KiB units, present writable data, 32-bit.
    a.mov(dword_ptr(gdt + 8), 0x0000_ffffu32)?;
    a.mov(dword_ptr(gdt + 12), 0x00cf_9200u32)?;
    a.mov(word_ptr(gdtr), 15u32)?;
    a.mov(dword_ptr(gdtr + 2), (u32::from(seg) << 4) + gdt)?;
    a.lgdt(ptr(gdtr))?;
    a.mov(eax, cr0)?;
    a.or(eax, 1)?;
    a.mov(cr0, eax)?;
    a.mov(bx, 8u32)?;
    a.mov(fs, bx)?;
    a.and(eax, 0xffff_fffeu32 as i32)?;
    a.mov(cr0, eax)?;
    Ok(())
}

/// The in-kernel IOAPIC's register window (IOREGSEL; IOWIN at +0x10).
const IOAPIC_BASE: u32 = 0xfec0_0000;

/// IOAPIC register index of redirection entry `pin`'s low half.
fn ioapic_redtbl_low(pin: u32) -> u32 {
    0x10 + 2 * pin
}

/// The IOAPIC input [`checked_writes`] programs (the last of KVM's 24;
/// nothing in these VMs raises it).
pub const CHECKED_IOAPIC_PIN: u32 = 23;

/// What [`checked_writes`] puts in [`CHECKED_IOAPIC_PIN`]'s entry: masked,
/// fixed delivery, vector 0x51 (the reset entry is masked, vector 0).
pub const CHECKED_IOAPIC_ENTRY: u32 = 0x1_0051;

/// The PIT's mode/command port and channel 2's data port.
const PIT_CONTROL: u16 = 0x43;
const PIT_CHANNEL2: u16 = 0x42;
/// Channel 2 (bits 7-6: 10), low byte then high byte (5-4: 11), mode 4
/// (3-1: 100), binary (0).
const PIT_CHECKED_CONTROL: u32 = 0b1011_1000;
/// What a status read-back of that channel gives, bits 0-5: the access
/// (5-4), mode (3-1) and BCD (0) bits of [`PIT_CHECKED_CONTROL`].
const PIT_CHECKED_STATUS: u32 = PIT_CHECKED_CONTROL & 0x3f;
/// Read-back command (bits 7-6: 11): do not latch the count (5: 1),
/// latch the status (4: 0) of channel 2 (3: 1).
const PIT_READ_BACK_STATUS_CH2: u32 = 0b1110_1000;
/// Counter-latch command (bits 5-4: 00) of channel 2 (bits 7-6: 10).
const PIT_LATCH_CH2: u32 = 0b1000_0000;
/// The count [`checked_writes`] loads into PIT channel 2 (and latches
/// at once).
pub const CHECKED_PIT_COUNT: u32 = 0xf000;
/// The most TSC cycles between the count's load and its latch that the
/// guest accepts: 0.5 ms at 2 GHz, and within the 1.7 ms of
/// [`PIT_LATCH_FLOOR`] for any TSC from 0.6 GHz up.
const PIT_LATCH_TSC: u32 = 1_000_000;
/// The least latched count the check accepts: 0x800 ticks of 1.193182
/// MHz (1.7 ms) under the count loaded. A latch lost by a restore reads
/// a running count instead, which lands in that window in 1 run of 32.
const PIT_LATCH_FLOOR: u32 = CHECKED_PIT_COUNT - 0x800;

const MSR_APIC_BASE: u32 = 0x1b;
const APIC_BASE_EN: u32 = 1 << 11;
const APIC_BASE_EXTD: u32 = 1 << 10;
/// The slave PIC's mask bits [`checked_writes`] sets (IRQs 14 and 15).
pub const CHECKED_SLAVE_MASK: u32 = 0xc0;
/// x2APIC MSR of the LVT timer register.
pub const X2APIC_LVT_TIMER: u32 = 0x832;
/// x2APIC MSR of the timer's divide configuration register.
pub const X2APIC_TIMER_DIVIDE: u32 = 0x83e;
/// What [`checked_writes`] puts in the divide configuration: divide by 1
/// (the reset value is 0, divide by 2).
pub const CHECKED_TIMER_DIVIDE: u32 = 0xb;

/// What [`checked_writes`] puts in vCPU `vcpu`'s LVT timer: masked (the
/// reset value is masked with vector 0), vector 0x40 + `vcpu`.
pub fn checked_lvt_timer(vcpu: u8) -> u32 {
    0x1_0040 + u32::from(vcpu)
}

/// The MSR [`checked_writes`] sets and checks: `IA32_SYSENTER_CS`, which
/// KVM keeps per vCPU and a real-mode guest never uses otherwise.
pub const CHECKED_MSR: u32 = 0x174;

/// What [`checked_writes`] writes to [`CHECKED_MSR`] (plus its vCPU).
pub const CHECKED_MSR_VALUE: u32 = 0x5a50;

/// What [`checked_writes`] loads into `mm0` on vCPU `vcpu`.
pub fn checked_fpu_pattern(vcpu: u8) -> u64 {
    0x0123_4567_89ab_cd00 | u64::from(vcpu)
}

/// `iterations` times `out port, eax` with eax = 1, 2, ..., then halts for
/// good with interrupts off, never reporting: its vCPU stays inside
/// `KVM_RUN` (what a guest waiting for an interrupt that never comes
/// looks like).
pub fn pio_writes_then_halt(port: u16, iterations: u16) -> Result<Guest, GuestError> {
    let mut p = Program::new(GUEST_SEGMENT)?;
    let mut done = write_loop(&mut p.a, port, iterations)?;
    let a = &mut p.a;
    // `done` is the halt loop itself (one label per instruction).
    a.set_label(&mut done)?;
    a.cli()?;
    a.hlt()?;
    a.jmp(done)?;
    p.finish(None)
}

/// `iterations` times `in eax, port` (a read-latency benchmark); reports
/// the last value read (0 if `iterations` is 0).
pub fn pio_read_loop(port: u16, iterations: u16) -> Result<Guest, GuestError> {
    let mut p = Program::new(GUEST_SEGMENT)?;
    let a = &mut p.a;
    let mut top = a.create_label();
    let mut done = a.create_label();
    a.mov(dx, u32::from(port))?;
    a.mov(cx, u32::from(iterations))?;
    a.xor(eax, eax)?;
    a.jcxz(done)?;
    a.set_label(&mut top)?;
    a.in_(eax, dx)?;
    a.loop_(top)?;
    a.set_label(&mut done)?;
    p.report_eax()?;
    p.finish(None)
}

/// Loads FS:BX with a real-mode address of `gpa` (which must be below
/// 1 MiB): FS = gpa >> 4, BX = gpa & 0xf.
fn point_fs_bx(a: &mut CodeAssembler, gpa: u32) -> Result<(), GuestError> {
    if gpa >= 0x10_0000 - 16 {
        return Err(GuestError::BadArgument(format!(
            "MMIO address {gpa:#x} is not reachable in real mode (must be below 1 MiB)"
        )));
    }
    a.mov(ax, gpa >> 4)?;
    a.mov(fs, ax)?;
    a.mov(bx, gpa & 0xf)?;
    Ok(())
}

/// [`pio_loop`] over MMIO: `iterations` times `mov dword [gpa], eax` with
/// eax = 1, 2, ...; then one `mov eax, dword [gpa]`, reported. `gpa` must
/// be below 1 MiB (and outside guest memory to reach the handler), e.g.
/// `0xD0000`.
pub fn mmio_loop(gpa: u32, iterations: u16) -> Result<Guest, GuestError> {
    let mut p = Program::new(GUEST_SEGMENT)?;
    let a = &mut p.a;
    let mut top = a.create_label();
    let mut done = a.create_label();
    point_fs_bx(a, gpa)?;
    a.mov(cx, u32::from(iterations))?;
    a.xor(eax, eax)?;
    a.jcxz(done)?;
    a.set_label(&mut top)?;
    a.inc(eax)?;
    a.mov(dword_ptr(bx).fs(), eax)?;
    a.loop_(top)?;
    a.set_label(&mut done)?;
    a.mov(eax, dword_ptr(bx).fs())?;
    p.report_eax()?;
    p.finish(None)
}

/// Awkward MMIO, for robustness tests. `gpa` must be 4 KiB-aligned and
/// below 1 MiB - 8 KiB. In order:
/// 1. `mov eax, dword [gpa + 0xfff]`: crosses a page, so KVM splits it
///    into a 1-byte and a 3-byte access;
/// 2. `mov dword [gpa + 0xfff], eax`: the same, written;
/// 3. `movq mm0, qword [gpa + 0x10]` and `movq qword [gpa + 0x18], mm0`:
///    8-byte accesses;
///
/// then reports the value of step 1.
pub fn mmio_odd(gpa: u32) -> Result<Guest, GuestError> {
    if !gpa.is_multiple_of(0x1000) || gpa >= 0x10_0000 - 0x2000 {
        return Err(GuestError::BadArgument(format!(
            "MMIO page {gpa:#x} must be 4 KiB-aligned and below {:#x}",
            0x10_0000 - 0x2000
        )));
    }
    let mut p = Program::new(GUEST_SEGMENT)?;
    let a = &mut p.a;
    point_fs_bx(a, gpa)?;
    a.mov(eax, dword_ptr(bx + 0xfff).fs())?;
    a.mov(dword_ptr(bx + 0xfff).fs(), eax)?;
    a.movq(mm0, qword_ptr(bx + 0x10).fs())?;
    a.movq(qword_ptr(bx + 0x18).fs(), mm0)?;
    p.report_eax()?;
    p.finish(None)
}

/// Counts interrupts from master-PIC input `line` (0-7) until `want`.
///
/// Installs an IVT handler for vector `PIC_VECTOR_BASE + line` that
/// increments a counter, writes it to `ack_port` (32-bit `out`: the
/// acknowledgement a device sees), sends a non-specific EOI and returns.
/// Programs both 8259s (ICW1-ICW4; master vectors from
/// [`PIC_VECTOR_BASE`], everything masked except `line`), then writes 0 to
/// `ack_port` to say it is armed: edges injected before that may be lost
/// (ICW1 clears the PIC's latched requests). The main loop waits in
/// `sti; hlt` until the counter reaches `want`, then reports the count.
/// So `ack_port` sees 0, 1, 2, ..., `want`.
pub fn irq_counter(line: u8, want: u16, ack_port: u16) -> Result<Guest, GuestError> {
    irq_guest(line, want, ack_port, None)
}

/// [`irq_counter`], and with `trigger` [`irq_chain`].
fn irq_guest(
    line: u8,
    want: u16,
    ack_port: u16,
    trigger: Option<u16>,
) -> Result<Guest, GuestError> {
    if line > 7 {
        return Err(GuestError::BadArgument(format!(
            "IRQ {line}: only master PIC inputs 0-7 are supported"
        )));
    }
    let vector = u32::from(PIC_VECTOR_BASE + line);
    let counter = u32::from(DATA_OFFSET);
    let mut p = Program::new(GUEST_SEGMENT)?;
    let a = &mut p.a;

    // The handler comes first, so its offset is 0.
    irq_handler(a, counter, want, ack_port, trigger)?;

    let mut main = a.create_label();
    let mut wait = a.create_label();
    let mut check = a.create_label();
    a.set_label(&mut main)?;
    a.cli()?;
    a.mov(word_ptr(counter), 0u32)?;
    // IVT entry: offset 0 (the handler), segment CS.
    a.xor(ax, ax)?;
    a.mov(es, ax)?;
    a.mov(word_ptr(vector * 4).es(), 0u32)?;
    a.mov(word_ptr(vector * 4 + 2).es(), cs)?;
    init_pics(a, line)?;
    // Armed: tell the device (and a test injecting interrupts) that edges
    // from now on are counted; the PIC initialisation above drops edges
    // latched before it.
    a.xor(eax, eax)?;
    a.mov(dx, u32::from(ack_port))?;
    a.out(dx, eax)?;
    if let Some(trigger) = trigger {
        a.mov(eax, 1u32)?;
        a.mov(dx, u32::from(trigger))?;
        a.out(dx, eax)?;
    }
    a.jmp(check)?;
    // `sti` delays interrupts by one instruction, so none is taken
    // between it and `hlt`: a pending one wakes the `hlt` instead.
    a.set_label(&mut wait)?;
    a.sti()?;
    a.hlt()?;
    a.cli()?;
    a.set_label(&mut check)?;
    a.cmp(word_ptr(counter), u32::from(want))?;
    a.jb(wait)?;
    a.movzx(eax, word_ptr(counter))?;
    p.report_eax()?;
    p.finish(Some(main))
}

/// The interrupt handler of [`irq_guest`]: counts in the word at
/// `counter`, writes the count to `ack_port`, asks `trigger` for the next
/// interrupt until `want` have come, sends a non-specific EOI.
fn irq_handler(
    a: &mut CodeAssembler,
    counter: u32,
    want: u16,
    ack_port: u16,
    trigger: Option<u16>,
) -> Result<(), GuestError> {
    a.push(eax)?;
    a.push(edx)?;
    a.push(ds)?;
    a.mov(ax, cs)?;
    a.mov(ds, ax)?;
    a.inc(word_ptr(counter))?;
    a.movzx(eax, word_ptr(counter))?;
    a.mov(dx, u32::from(ack_port))?;
    a.out(dx, eax)?;
    if let Some(trigger) = trigger {
        // Ask for the next interrupt until `want` have come.
        let mut enough = a.create_label();
        a.cmp(word_ptr(counter), u32::from(want))?;
        a.jae(enough)?;
        a.mov(eax, 1u32)?;
        a.mov(dx, u32::from(trigger))?;
        a.out(dx, eax)?;
        a.set_label(&mut enough)?;
    }
    a.mov(al, 0x20u32)?;
    a.out(u32::from(PIC1_CMD), al)?;
    a.pop(ds)?;
    a.pop(edx)?;
    a.pop(eax)?;
    a.iret()?;
    Ok(())
}

/// Programs both 8259s: master vectors from [`PIC_VECTOR_BASE`], every
/// input masked except master `line`.
fn init_pics(a: &mut CodeAssembler, line: u8) -> Result<(), GuestError> {
    // ICW1: edge-triggered, cascade, ICW4 follows. ICW2: vector base.
    // ICW3: slave on input 2 / slave id 2. ICW4: 8086 mode. Then OCW1.
    let pic_init: [(u16, u8); 10] = [
        (PIC1_CMD, 0x11),
        (PIC1_DATA, PIC_VECTOR_BASE),
        (PIC1_DATA, 0x04),
        (PIC1_DATA, 0x01),
        (PIC2_CMD, 0x11),
        (PIC2_DATA, PIC_VECTOR_BASE + 8),
        (PIC2_DATA, 0x02),
        (PIC2_DATA, 0x01),
        (PIC2_DATA, 0xff),
        (PIC1_DATA, !(1u8 << line)),
    ];
    for (port, value) in pic_init {
        a.mov(al, u32::from(value))?;
        a.out(u32::from(port), al)?;
    }
    Ok(())
}

/// TSC ticks between two of [`uart_echo`]'s heartbeats (a few
/// milliseconds at the usual 1-4 GHz; timed by the TSC, not by counting
/// instructions, because nested PVM emulates real-mode code far slower
/// than a CPU runs it).
const UART_ECHO_BEAT_TSC: u32 = 1 << 23;

/// What [`uart_echo`] prints once its UART is set up.
pub const UART_ECHO_BANNER: &[u8] = b"devplane console ready\r\n";

/// A console guest: drives a 16550 UART at port `base` whose interrupt is
/// master-PIC input `line` (COM1: 0x3f8, line 4). It sets the line up
/// (8N1, FIFO on, OUT2, receive interrupt enabled), prints
/// [`UART_ECHO_BANNER`], then waits with interrupts enabled (a delay
/// loop, and every few milliseconds a heartbeat read of the scratch
/// register, so that its server finds it after a live migration) until
/// the UART interrupts; its handler reads every byte the receive FIFO holds (LSR
/// data ready), echoes each one back (waiting for THR empty), counts them,
/// and sends the PIC an EOI. When it has received byte `stop` it prints
/// `"\r\nbye\r\n"` and reports how many bytes it received, `stop`
/// included. So what is typed into its console comes back, through the
/// guest, exactly once each.
pub fn uart_echo(base: u16, line: u8, stop: u8) -> Result<Guest, GuestError> {
    if line > 7 {
        return Err(GuestError::BadArgument(format!(
            "IRQ {line}: only master PIC inputs 0-7 are supported"
        )));
    }
    if base > 0xfff8 {
        return Err(GuestError::BadArgument(format!(
            "UART base {base:#x}: its 8 registers must fit below 0x10000"
        )));
    }
    let vector = u32::from(PIC_VECTOR_BASE + line);
    let count = u32::from(DATA_OFFSET);
    let stopped = count + 2;
    let (data, ier, fcr, lcr, mcr, lsr, scr) = (
        u32::from(base),
        u32::from(base + 1),
        u32::from(base + 2),
        u32::from(base + 3),
        u32::from(base + 4),
        u32::from(base + 5),
        u32::from(base + 7),
    );
    let mut p = Program::new(GUEST_SEGMENT)?;
    let a = &mut p.a;

    // The receive interrupt's handler, first, so that its offset is 0.
    let mut putc = a.create_label();
    let mut handler = a.create_label();
    let mut next = a.create_label();
    let mut echo = a.create_label();
    let mut empty = a.create_label();
    a.set_label(&mut handler)?;
    a.push(eax)?;
    a.push(ebx)?;
    a.push(edx)?;
    a.push(ds)?;
    a.mov(ax, cs)?;
    a.mov(ds, ax)?;
    a.set_label(&mut next)?;
    a.mov(dx, lsr)?;
    a.in_(al, dx)?;
    a.test(al, 0x01u32)?;
    a.jz(empty)?;
    a.mov(dx, data)?;
    a.in_(al, dx)?;
    a.mov(bl, al)?;
    a.inc(word_ptr(count))?;
    a.cmp(bl, u32::from(stop))?;
    a.jne(echo)?;
    a.mov(byte_ptr(stopped), 1u32)?;
    a.set_label(&mut echo)?;
    a.call(putc)?;
    a.jmp(next)?;
    a.set_label(&mut empty)?;
    a.mov(al, 0x20u32)?;
    a.out(u32::from(PIC1_CMD), al)?;
    a.pop(ds)?;
    a.pop(edx)?;
    a.pop(ebx)?;
    a.pop(eax)?;
    a.iret()?;

    // putc: transmits `bl` once THR is empty; keeps every
    // other register.
    let mut thre = a.create_label();
    a.set_label(&mut putc)?;
    a.push(eax)?;
    a.push(edx)?;
    a.mov(dx, lsr)?;
    a.set_label(&mut thre)?;
    a.in_(al, dx)?;
    a.test(al, 0x20u32)?;
    a.jz(thre)?;
    a.mov(al, bl)?;
    a.mov(dx, data)?;
    a.out(dx, al)?;
    a.pop(edx)?;
    a.pop(eax)?;
    a.ret()?;

    let mut main = a.create_label();
    let mut wait = a.create_label();
    let mut check = a.create_label();
    a.set_label(&mut main)?;
    a.cli()?;
    a.mov(word_ptr(count), 0u32)?;
    a.mov(byte_ptr(stopped), 0u32)?;
    a.xor(ax, ax)?;
    a.mov(es, ax)?;
    a.mov(word_ptr(vector * 4).es(), 0u32)?;
    a.mov(word_ptr(vector * 4 + 2).es(), cs)?;
    init_pics(a, line)?;
    // 8N1, FIFO on (and cleared), DTR|RTS|OUT2, receive interrupt on.
    for (port, value) in [(lcr, 0x03u32), (fcr, 0x03), (mcr, 0x0b), (ier, 0x01)] {
        a.mov(al, value)?;
        a.mov(dx, port)?;
        a.out(dx, al)?;
    }
    for &c in UART_ECHO_BANNER {
        a.mov(bl, u32::from(c))?;
        a.call(putc)?;
    }
    a.jmp(check)?;
    // Between interrupts: a delay with interrupts on, then a heartbeat
    // read of the scratch register. Without any access of its own, a guest
    // live-migrated to another client daemon would not be found by its
    // server's interrupts (the server learns where a VM is from its
    // requests), so it would never see what is typed after the move.
    let mut spin = a.create_label();
    a.set_label(&mut wait)?;
    a.sti()?;
    a.rdtsc()?;
    a.mov(esi, eax)?;
    a.set_label(&mut spin)?;
    a.rdtsc()?;
    a.sub(eax, esi)?;
    a.cmp(eax, UART_ECHO_BEAT_TSC)?;
    a.jb(spin)?;
    a.cli()?;
    a.mov(dx, scr)?;
    a.in_(al, dx)?;
    a.set_label(&mut check)?;
    a.cmp(byte_ptr(stopped), 0u32)?;
    a.je(wait)?;
    for &c in b"\r\nbye\r\n" {
        a.mov(bl, u32::from(c))?;
        a.call(putc)?;
    }
    a.movzx(eax, word_ptr(count))?;
    p.report_eax()?;
    p.finish(Some(main))
}

/// Like [`irq_counter`], but the guest asks a device for each interrupt:
/// once armed it writes 1 to `trigger_port`, and its handler, after
/// counting and acknowledging (count to `ack_port`), writes 1 again until
/// `want` interrupts have arrived. One interrupt is outstanding at a time,
/// so the PIC never merges two edges. Reports the count.
pub fn irq_chain(
    line: u8,
    want: u16,
    ack_port: u16,
    trigger_port: u16,
) -> Result<Guest, GuestError> {
    irq_guest(line, want, ack_port, Some(trigger_port))
}

/// `vcpus` guests for as many vCPUs: guest `i` runs [`pio_loop`] on port
/// `port + 0x10 * i` in its own segment (`0x1000 * (i + 1)`, so guest
/// memory must reach [`Guest::mem_end`] of the last) with its own stack.
/// Each reports `iterations` against a counting device.
pub fn multi_vcpu(port: u16, iterations: u16, vcpus: u8) -> Result<Vec<Guest>, GuestError> {
    if vcpus == 0 || vcpus > 8 {
        return Err(GuestError::BadArgument(format!(
            "{vcpus} vCPUs: between 1 and 8 are supported"
        )));
    }
    (0..u16::from(vcpus))
        .map(|i| {
            let port = port.checked_add(0x10 * i).ok_or_else(|| {
                GuestError::BadArgument(format!("port {port:#x} + {:#x} overflows", 0x10 * i))
            })?;
            pio_loop_in(GUEST_SEGMENT * (i + 1), port, iterations)
        })
        .collect()
}

/// What [`virtio_blk_check`] reports when every step passed.
pub const VIRTIO_CHECK_OK: u32 = 0x600d;

/// Physical layout of [`virtio_blk_check`]'s buffers (offsets in its
/// segment; the segment starts at GPA `0x10000`).
const VQ_RING: u16 = 0x9000; // descriptors; avail at +0x1000, used at +0x2000
const VQ_AVAIL: u16 = VQ_RING + 0x1000;
const VQ_USED: u16 = VQ_RING + 0x2000;
const VQ_HEADER: u16 = 0xc000;
const VQ_STATUS: u16 = 0xc100;
const VQ_OUT: u16 = 0xd000;
const VQ_IN: u16 = 0xe000;

/// A minimal legacy virtio-blk driver, as Linux's would do it: finds the
/// device at PCI 00:01.0 through configuration mechanism #1 (checks its
/// vendor/device ids and that BAR0 is `io_base`), enables I/O, resets and
/// brings the device up with one 256-entry queue, checks the capacity
/// covers `sector`, then — if `write` — writes a 512-byte pattern derived
/// from `seed` to `sector` and flushes; in both cases reads `sector` back
/// and compares it with the pattern, and checks the interrupt status.
/// Reports [`VIRTIO_CHECK_OK`], or the number of the step that failed.
pub fn virtio_blk_check(
    io_base: u16,
    sector: u16,
    write: bool,
    seed: u8,
) -> Result<Guest, GuestError> {
    let mut p = Program::new(GUEST_SEGMENT)?;
    let a = &mut p.a;
    let mut fail = a.create_label();
    let mut done = a.create_label();
    vq_probe(a, io_base, fail)?;
    vq_bring_up(a, io_base, sector, fail)?;
    vq_pattern(a, seed)?;
    vq_descriptors(a)?;
    let request = |a: &mut CodeAssembler, kind, head, step| {
        vq_request(a, io_base, sector, [kind, head, step], fail)
    };
    if write {
        request(a, 1, 0, 5)?; // OUT
        request(a, 4, 3, 6)?; // FLUSH
    }
    request(a, 0, 5, 7)?; // IN
    // Step 8: what was read is the pattern.
    a.mov(si, u32::from(VQ_OUT))?;
    a.mov(di, u32::from(VQ_IN))?;
    a.mov(cx, 512u32)?;
    a.mov(bx, 8u32)?;
    a.repe().cmpsb()?;
    a.jne(fail)?;
    a.mov(eax, VIRTIO_CHECK_OK)?;
    a.jmp(done)?;
    a.set_label(&mut fail)?;
    a.movzx(eax, bx)?;
    a.set_label(&mut done)?;
    p.report_eax()?;
    p.finish(None)
}

/// The guest-physical address of offset `off` of [`virtio_blk_check`]'s
/// segment.
fn vq_phys(off: u16) -> u32 {
    (u32::from(GUEST_SEGMENT) << 4) + u32::from(off)
}

/// [`virtio_blk_check`]'s step 1 (and 2): PCI 00:01.0 is a legacy
/// virtio-blk with BAR0 = `io_base`; then enables its I/O space. The
/// failing step's number is left in BX.
fn vq_probe(a: &mut CodeAssembler, io_base: u16, fail: CodeLabel) -> Result<(), GuestError> {
    let pci_addr = |reg: u32| 0x8000_0800u32 | reg;
    a.mov(eax, pci_addr(0x00))?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.mov(bx, 1u32)?;
    a.cmp(eax, 0x1001_1af4u32)?;
    a.jne(fail)?;
    a.mov(eax, pci_addr(0x10))?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.in_(eax, dx)?;
    a.and(eax, 0xfffcu32)?;
    a.mov(bx, 2u32)?;
    a.cmp(eax, u32::from(io_base))?;
    a.jne(fail)?;
    a.mov(eax, pci_addr(0x04))?;
    a.mov(dx, 0xcf8u32)?;
    a.out(dx, eax)?;
    a.mov(dx, 0xcfcu32)?;
    a.mov(eax, 1u32)?;
    a.out(dx, eax)?;
    Ok(())
}

/// [`virtio_blk_check`]'s steps 3 and 4: reset, ACKNOWLEDGE | DRIVER,
/// features, queue 0 of 256 entries, DRIVER_OK; the capacity (sectors, low
/// dword) lies beyond `sector`.
fn vq_bring_up(
    a: &mut CodeAssembler,
    io_base: u16,
    sector: u16,
    fail: CodeLabel,
) -> Result<(), GuestError> {
    let port = |off: u16| u32::from(io_base + off);
    a.mov(dx, port(0x12))?;
    a.xor(al, al)?;
    a.out(dx, al)?;
    a.mov(al, 3u32)?;
    a.out(dx, al)?;
    a.mov(dx, port(0x00))?;
    a.in_(eax, dx)?;
    a.and(eax, 1u32 << 9)?;
    a.mov(dx, port(0x04))?;
    a.out(dx, eax)?;
    a.mov(dx, port(0x0e))?;
    a.xor(ax, ax)?;
    a.out(dx, ax)?;
    a.mov(dx, port(0x0c))?;
    a.in_(ax, dx)?;
    a.mov(bx, 3u32)?;
    a.cmp(ax, 256u32)?;
    a.jne(fail)?;
    a.mov(dx, port(0x08))?;
    a.mov(eax, vq_phys(VQ_RING) >> 12)?;
    a.out(dx, eax)?;
    a.mov(dx, port(0x12))?;
    a.mov(al, 7u32)?;
    a.out(dx, al)?;
    a.mov(dx, port(0x14))?;
    a.in_(eax, dx)?;
    a.mov(bx, 4u32)?;
    a.cmp(eax, u32::from(sector))?;
    a.jbe(fail)?;
    Ok(())
}

/// The 512-byte pattern at `VQ_OUT`: `seed`, then steps of 7.
fn vq_pattern(a: &mut CodeAssembler, seed: u8) -> Result<(), GuestError> {
    a.cld()?;
    a.mov(di, u32::from(VQ_OUT))?;
    a.mov(cx, 512u32)?;
    a.mov(al, u32::from(seed))?;
    let mut fill = a.create_label();
    a.set_label(&mut fill)?;
    a.stosb()?;
    a.add(al, 7u32)?;
    a.loop_(fill)?;
    Ok(())
}

/// The descriptor table: 0-2 an OUT request (header, data, status), 3-4 a
/// FLUSH, 5-7 an IN.
fn vq_descriptors(a: &mut CodeAssembler) -> Result<(), GuestError> {
    // 16 bytes each: addr lo/hi, len, flags | next << 16.
    let desc = |a: &mut CodeAssembler, i: u16, addr: u32, len: u32, flags: u32, next: u32| {
        let at = u32::from(VQ_RING + 16 * i);
        a.mov(dword_ptr(at), addr)?;
        a.mov(dword_ptr(at + 4), 0u32)?;
        a.mov(dword_ptr(at + 8), len)?;
        a.mov(dword_ptr(at + 12), flags | (next << 16))
    };
    const NEXT: u32 = 1;
    const WRITE: u32 = 2;
    desc(a, 0, vq_phys(VQ_HEADER), 16, NEXT, 1)?;
    desc(a, 1, vq_phys(VQ_OUT), 512, NEXT, 2)?;
    desc(a, 2, vq_phys(VQ_STATUS), 1, WRITE, 0)?;
    desc(a, 3, vq_phys(VQ_HEADER), 16, NEXT, 4)?;
    desc(a, 4, vq_phys(VQ_STATUS), 1, WRITE, 0)?;
    desc(a, 5, vq_phys(VQ_HEADER), 16, NEXT, 6)?;
    desc(a, 6, vq_phys(VQ_IN), 512, WRITE | NEXT, 7)?;
    desc(a, 7, vq_phys(VQ_STATUS), 1, WRITE, 0)?;
    Ok(())
}

/// One request of type `kind` on sector `sector` at descriptor `head`:
/// publish it, notify; the device completes it within the notify exit.
/// Step `step` checks the used index, the status byte and the interrupt
/// status (set, then cleared by the read).
fn vq_request(
    a: &mut CodeAssembler,
    io_base: u16,
    sector: u16,
    [kind, head, step]: [u32; 3],
    fail: CodeLabel,
) -> Result<(), GuestError> {
    let port = |off: u16| u32::from(io_base + off);
    a.mov(dword_ptr(u32::from(VQ_HEADER)), kind)?;
    a.mov(dword_ptr(u32::from(VQ_HEADER) + 4), 0u32)?;
    a.mov(dword_ptr(u32::from(VQ_HEADER) + 8), u32::from(sector))?;
    a.mov(dword_ptr(u32::from(VQ_HEADER) + 12), 0u32)?;
    a.mov(byte_ptr(u32::from(VQ_STATUS)), 0xffu32)?;
    a.mov(si, word_ptr(u32::from(VQ_AVAIL) + 2))?;
    a.and(si, 255u32)?;
    a.shl(si, 1u32)?;
    a.mov(word_ptr(si + u32::from(VQ_AVAIL) + 4), head)?;
    a.mov(si, word_ptr(u32::from(VQ_AVAIL) + 2))?;
    a.inc(si)?;
    a.mov(word_ptr(u32::from(VQ_AVAIL) + 2), si)?;
    a.mov(dx, port(0x10))?;
    a.xor(ax, ax)?;
    a.out(dx, ax)?;
    a.mov(bx, step)?;
    // A remote disk in bulk completes after the notify returns: wait for
    // the used entry (bounded), then for the interrupt status.
    let mut used_wait = a.create_label();
    let mut used_ready = a.create_label();
    a.mov(ecx, 0x1000_0000u32)?;
    a.set_label(&mut used_wait)?;
    a.cmp(word_ptr(u32::from(VQ_USED) + 2), si)?;
    a.je(used_ready)?;
    a.pause()?;
    a.dec(ecx)?;
    a.jnz(used_wait)?;
    a.jmp(fail)?;
    a.set_label(&mut used_ready)?;
    a.cmp(byte_ptr(u32::from(VQ_STATUS)), 0u32)?;
    a.jne(fail)?;
    a.mov(dx, port(0x13))?;
    let mut isr_wait = a.create_label();
    let mut isr_ready = a.create_label();
    a.mov(ecx, 0x0100_0000u32)?;
    a.set_label(&mut isr_wait)?;
    a.in_(al, dx)?;
    a.cmp(al, 1u32)?;
    a.je(isr_ready)?;
    a.dec(ecx)?;
    a.jnz(isr_wait)?;
    a.jmp(fail)?;
    a.set_label(&mut isr_ready)?;
    a.in_(al, dx)?;
    a.cmp(al, 0u32)?;
    a.jne(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    fn disasm(g: &Guest) -> String {
        let mut d = Decoder::with_ip(16, &g.code, 0, DecoderOptions::NONE);
        let mut f = NasmFormatter::new();
        let mut out = String::new();
        for insn in &mut d {
            f.format(&insn, &mut out);
            out.push('\n');
        }
        out
    }

    #[test]
    fn guests_assemble() {
        for g in [
            pio_loop(0x500, 1000).unwrap(),
            pio_read_loop(0x500, 10).unwrap(),
            mmio_loop(0xd0000, 1000).unwrap(),
            mmio_odd(0xd0000).unwrap(),
            irq_counter(5, 10, 0x510).unwrap(),
        ] {
            assert!(!g.code.is_empty());
            assert_eq!(g.load_gpa, 0x10000);
            assert_eq!(g.entry.cs, GUEST_SEGMENT);
            assert!(disasm(&g).contains("out 0F4h,eax"), "{}", disasm(&g));
        }
    }

    #[test]
    fn irq_counter_enters_after_its_handler() {
        let g = irq_counter(3, 1, 0x510).unwrap();
        assert!(g.entry.ip > 0);
        assert!(disasm(&g).contains("iret"));
        assert!(matches!(
            irq_counter(8, 1, 0x510),
            Err(GuestError::BadArgument(_))
        ));
    }

    #[test]
    fn uart_echo_enters_after_its_handler_and_checks_its_arguments() {
        let g = uart_echo(0x3f8, 4, b'~').unwrap();
        assert!(g.entry.ip > 0);
        let text = disasm(&g);
        assert!(text.contains("iret") && text.contains("sti"), "{text}");
        assert!(text.contains("mov dx,3FDh"), "polls LSR: {text}");
        assert!(uart_echo(0x3f8, 8, b'~').is_err());
        assert!(uart_echo(0xfffa, 4, b'~').is_err());
    }

    #[test]
    fn multi_vcpu_separates_segments_and_ports() {
        let gs = multi_vcpu(0x600, 5, 3).unwrap();
        assert_eq!(gs.len(), 3);
        for (i, g) in gs.iter().enumerate() {
            assert_eq!(g.load_gpa, 0x10000 * (i as u64 + 1));
            let port = format!("mov dx,{:X}h", 0x600 + 0x10 * i);
            assert!(disasm(g).contains(&port), "{}", disasm(g));
        }
        assert!(multi_vcpu(0xfff0, 1, 2).is_err());
        assert!(multi_vcpu(0x600, 1, 0).is_err());
    }

    #[test]
    fn mmio_addresses_are_checked() {
        assert!(mmio_loop(0x10_0000, 1).is_err());
        assert!(mmio_odd(0xd0010).is_err());
    }
}
