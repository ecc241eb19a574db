//! A 16550A UART (the PC's COM ports), on rust-vmm's `vm-superio` [`Serial`].
//!
//! Registers are the usual eight byte-wide ones at offsets 0..8 from the
//! base, in either address space (port I/O on a PC: COM1 at 0x3f8). Only
//! 1-byte accesses are accepted.
//!
//! What this wrapper adds to `vm-superio`:
//! - the FIFO control register: FCR bit 0 (FIFO enable) decides whether the
//!   IIR reports the FIFO bits (0xC0), as the datasheet says and as Linux's
//!   8250 probe checks; FCR bit 1 clears the receive FIFO;
//! - interrupts as [`IrqEvent`]s: every interrupt `vm-superio` triggers is
//!   one edge on the model's line;
//! - output: transmitted bytes are kept for the owner ([`Uart::take_output`],
//!   bounded to [`OUTPUT_LIMIT`], oldest bytes dropped first) and, when the
//!   model has a console log, appended to that file (written per line);
//! - input beyond the 64-byte receive FIFO: [`Uart::feed_input`] queues up
//!   to [`INPUT_LIMIT`] bytes and refills the FIFO whenever the guest has
//!   emptied it.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use devplane_wire::{AccessSize, IrqAction};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, SerialState, Trigger};

use crate::codec::{Decoder, Encoder};
use crate::{DeviceError, DeviceModel, IrqEvent, Snapshot, SnapshotError, Space};

/// The kind name.
pub const KIND: &str = "uart";
/// The line COM1 uses on a PC, the default.
pub const DEFAULT_LINE: u32 = 4;
/// Bytes of register window.
pub const REGS_LEN: u64 = 8;
/// Receive buffer / transmit holding register (divisor latch low with DLAB).
pub const REG_DATA: u64 = 0;
/// Interrupt enable register (divisor latch high with DLAB).
pub const REG_IER: u64 = 1;
/// Interrupt identification (read) / FIFO control (write).
pub const REG_IIR_FCR: u64 = 2;
/// Line control register (bit 7: DLAB).
pub const REG_LCR: u64 = 3;
/// Modem control register (bit 4: loopback).
pub const REG_MCR: u64 = 4;
/// Line status register.
pub const REG_LSR: u64 = 5;
/// Modem status register.
pub const REG_MSR: u64 = 6;
/// Scratch register.
pub const REG_SCR: u64 = 7;
/// Most transmitted bytes kept for [`Uart::take_output`].
pub const OUTPUT_LIMIT: usize = 1 << 20;
/// Most input bytes queued behind the receive FIFO.
pub const INPUT_LIMIT: usize = 1 << 16;

/// The receive FIFO's depth (`vm-superio`'s).
const FIFO_SIZE: usize = 64;
/// FCR: FIFO enable.
const FCR_ENABLE: u8 = 0x01;
/// FCR: clear the receive FIFO.
const FCR_CLEAR_RX: u8 = 0x02;
/// IIR: the FIFO-enabled bits.
const IIR_FIFO_BITS: u8 = 0xc0;
/// IIR: no interrupt pending.
const IIR_NONE: u8 = 0x01;
/// IIR: received data available.
const IIR_RDA: u8 = 0x04;
/// LSR: data ready.
const LSR_DR: u8 = 0x01;
/// Bytes of log held back before a write to the file without a newline.
const LOG_CHUNK: usize = 4096;
/// A snapshot's layout version.
const SNAPSHOT_VERSION: u32 = 1;

/// `vm-superio`'s interrupt trigger: counts the edges not yet taken.
///
/// `Trigger::trigger` takes `&self`, hence the `Cell`; the model is owned
/// by one thread, so no atomics are needed (the `Cell` keeps it `Send`).
#[derive(Debug, Default)]
struct IrqCount(Cell<u32>);

impl Trigger for IrqCount {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(self.0.get().saturating_add(1));
        Ok(())
    }
}

/// A console log file, written a line (or [`LOG_CHUNK`] bytes) at a time.
#[derive(Debug)]
struct ConsoleLog {
    path: PathBuf,
    file: File,
    pending: Vec<u8>,
    failures: u64,
}

impl ConsoleLog {
    /// Opens `path` for appending, creating it if needed.
    fn open(path: &Path) -> io::Result<ConsoleLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(ConsoleLog {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
            failures: 0,
        })
    }

    /// Writes what is pending. A failure is reported on stderr (the first
    /// few times) and the bytes are dropped: a console log must never stop
    /// the device.
    fn write_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        if let Err(e) = self.file.write_all(&self.pending) {
            self.failures += 1;
            if self.failures <= 3 {
                eprintln!(
                    "uart: cannot append to console log {}: {e} (output still kept in memory)",
                    self.path.display()
                );
            }
        }
        self.pending.clear();
    }
}

impl Drop for ConsoleLog {
    fn drop(&mut self) {
        self.write_pending();
    }
}

/// Where `vm-superio` writes transmitted bytes. Never fails.
#[derive(Debug, Default)]
struct Console {
    kept: VecDeque<u8>,
    log: Option<ConsoleLog>,
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let overflow = (self.kept.len() + buf.len()).saturating_sub(OUTPUT_LIMIT);
        self.kept.drain(..overflow.min(self.kept.len()));
        let skip = buf.len().saturating_sub(OUTPUT_LIMIT);
        self.kept.extend(&buf[skip..]);
        if let Some(log) = &mut self.log {
            log.pending.extend_from_slice(buf);
            if buf.contains(&b'\n') || log.pending.len() >= LOG_CHUNK {
                log.write_pending();
            }
        }
        Ok(buf.len())
    }

    /// `vm-superio` flushes after every byte; the log is written per line
    /// instead (and when the model is dropped).
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The `vm-superio` device this model drives.
type Inner = Serial<IrqCount, NoEvents, Console>;

/// A 16550A UART.
#[derive(Debug)]
pub struct Uart {
    serial: Inner,
    line: u32,
    fifo_enabled: bool,
    input: VecDeque<u8>,
}

impl Uart {
    /// A UART raising its interrupts on `line`, with no console log.
    pub fn new(line: u32) -> Uart {
        Uart {
            serial: Serial::new(IrqCount::default(), Console::default()),
            line,
            fifo_enabled: false,
            input: VecDeque::new(),
        }
    }

    /// A UART raising its interrupts on `line` that also appends what the
    /// guest transmits to the file at `log` (created if missing).
    pub fn with_log(line: u32, log: &Path) -> io::Result<Uart> {
        let mut uart = Uart::new(line);
        uart.serial.writer_mut().log = Some(ConsoleLog::open(log)?);
        Ok(uart)
    }

    /// The console log's path, if the model has one.
    pub fn log_path(&self) -> Option<&Path> {
        self.serial.writer().log.as_ref().map(|l| l.path.as_path())
    }

    /// Takes the bytes the guest transmitted since the last call.
    pub fn take_output(&mut self) -> Vec<u8> {
        self.serial.writer_mut().kept.drain(..).collect()
    }

    /// Queues `bytes` as received from the line, raising the receive
    /// interrupt if the guest enabled it. Returns how many were accepted:
    /// fewer than given once [`INPUT_LIMIT`] bytes are waiting.
    pub fn feed_input(&mut self, bytes: &[u8]) -> usize {
        let room = INPUT_LIMIT.saturating_sub(self.input.len());
        let n = bytes.len().min(room);
        self.input.extend(&bytes[..n]);
        self.refill();
        n
    }

    /// Moves queued input into the receive FIFO once the guest emptied it
    /// (so one interrupt announces up to a FIFO's worth of bytes).
    fn refill(&mut self) {
        if self.input.is_empty() || self.serial.fifo_capacity() < FIFO_SIZE {
            return;
        }
        let chunk: Vec<u8> = self.input.iter().take(FIFO_SIZE).copied().collect();
        // The trigger and the writer never fail; a full FIFO or loopback
        // mode accepts fewer bytes (maybe none), which stay queued.
        let taken = self.serial.enqueue_raw_bytes(&chunk).unwrap_or(0);
        self.input.drain(..taken.min(self.input.len()));
    }

    /// FCR bit 1: empties the receive FIFO, as if the guest had read it.
    fn clear_rx_fifo(&mut self) {
        let mut state = self.serial.state();
        if state.in_buffer.is_empty() {
            return;
        }
        state.in_buffer.clear();
        state.line_status &= !LSR_DR;
        state.interrupt_identification &= !IIR_RDA;
        if state.interrupt_identification == 0 {
            state.interrupt_identification = IIR_NONE;
        }
        // An empty FIFO always fits, so this cannot fail.
        let Ok(fresh) =
            Serial::from_state(&state, IrqCount::default(), NoEvents, Console::default())
        else {
            return;
        };
        // Keep the console and the interrupts not yet taken; building
        // raises none of its own.
        let pending = self.serial.interrupt_evt().0.get();
        let old = std::mem::replace(&mut self.serial, fresh);
        *self.serial.writer_mut() = old.into_writer();
        self.serial.interrupt_evt().0.set(pending);
    }

    /// Checks an access and returns the register offset.
    fn reg(space: Space, offset: u64, size: AccessSize) -> Result<u8, DeviceError> {
        if offset >= REGS_LEN {
            return Err(DeviceError::Unmapped { space, offset });
        }
        if size != AccessSize::B1 {
            return Err(DeviceError::BadAccess {
                space,
                offset,
                size: size.bytes(),
            });
        }
        // Below REGS_LEN, so it fits.
        Ok(offset as u8)
    }
}

impl crate::ConsolePort for Uart {
    fn drain_output(&mut self, out: &mut Vec<u8>, max: usize) {
        let kept = &mut self.serial.writer_mut().kept;
        let n = kept.len().min(max);
        out.extend(kept.drain(..n));
    }

    fn has_output(&self) -> bool {
        !self.serial.writer().kept.is_empty()
    }

    fn feed_input(&mut self, bytes: &[u8]) -> usize {
        Uart::feed_input(self, bytes)
    }
}

impl Default for Uart {
    fn default() -> Self {
        Uart::new(DEFAULT_LINE)
    }
}

impl DeviceModel for Uart {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        let reg = Uart::reg(space, offset, size)?;
        let mut v = self.serial.read(reg);
        if u64::from(reg) == REG_IIR_FCR && !self.fifo_enabled {
            v &= !IIR_FIFO_BITS;
        }
        // A data read may have emptied the FIFO; leaving loopback lets
        // queued input in.
        self.refill();
        Ok(u64::from(v))
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        let reg = Uart::reg(space, offset, size)?;
        let value = (data & 0xff) as u8;
        if u64::from(reg) == REG_IIR_FCR {
            self.fifo_enabled = value & FCR_ENABLE != 0;
            if value & FCR_CLEAR_RX != 0 {
                self.clear_rx_fifo();
            }
        } else {
            // The trigger and the console never fail.
            let _ = self.serial.write(reg, value);
        }
        self.refill();
        Ok(())
    }

    fn take_irq(&mut self) -> Option<IrqEvent> {
        let count = &self.serial.interrupt_evt().0;
        let n = count.get();
        if n == 0 {
            return None;
        }
        count.set(n - 1);
        Some(IrqEvent {
            line: self.line,
            action: IrqAction::Edge,
        })
    }

    fn console(&mut self) -> Option<&mut dyn crate::ConsolePort> {
        Some(self)
    }

    /// Version 1: line, the `vm-superio` register state and receive FIFO,
    /// FIFO enable, queued input, interrupts not yet taken, output not yet
    /// taken, and the console log's path (empty if none).
    fn snapshot(&self) -> Snapshot {
        let s = self.serial.state();
        let console = self.serial.writer();
        let kept: Vec<u8> = console.kept.iter().copied().collect();
        let input: Vec<u8> = self.input.iter().copied().collect();
        let log = self
            .log_path()
            .map(|p| p.as_os_str().as_bytes())
            .unwrap_or_default();
        let mut e = Encoder::new();
        e.u32(self.line);
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            e.u8(b);
        }
        e.bytes(&s.in_buffer)
            .u8(u8::from(self.fifo_enabled))
            .bytes(&input)
            .u32(self.serial.interrupt_evt().0.get())
            .bytes(&kept)
            .bytes(log);
        Snapshot {
            kind: KIND.into(),
            version: SNAPSHOT_VERSION,
            data: e.finish(),
        }
    }

    /// A console log named in the snapshot is reopened for appending; if
    /// that fails the restore still succeeds, without a log, and says so
    /// on stderr (the guest-visible state is complete either way).
    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let mut d = Decoder::new(KIND, snap.expect(KIND, SNAPSHOT_VERSION)?);
        let line = d.u32()?;
        let mut regs = [0u8; 9];
        for r in &mut regs {
            *r = d.u8()?;
        }
        let [dll, dlm, ier, iir, lcr, lsr, mcr, msr, scr] = regs;
        let in_buffer = d.bytes(FIFO_SIZE)?.to_vec();
        let fifo_enabled = match d.u8()? {
            0 => false,
            1 => true,
            _ => return Err(d.corrupt("FIFO enable is not a boolean")),
        };
        let input = d.bytes(INPUT_LIMIT)?;
        let irqs = d.u32()?;
        let kept = d.bytes(OUTPUT_LIMIT)?;
        let log = d.bytes(4096)?;
        d.finish()?;
        let state = SerialState {
            baud_divisor_low: dll,
            baud_divisor_high: dlm,
            interrupt_enable: ier,
            interrupt_identification: iir,
            line_control: lcr,
            line_status: lsr,
            modem_control: mcr,
            modem_status: msr,
            scratch: scr,
            in_buffer,
        };
        let fresh = Serial::from_state(&state, IrqCount::default(), NoEvents, Console::default())
            .map_err(|_| SnapshotError::Corrupt {
            kind: KIND,
            why: "receive FIFO overfull",
        })?;
        // Nothing below fails.
        let mut console = Console {
            kept: kept.iter().copied().collect(),
            log: None,
        };
        if !log.is_empty() {
            let path = Path::new(std::ffi::OsStr::from_bytes(log));
            match ConsoleLog::open(path) {
                Ok(l) => console.log = Some(l),
                Err(e) => eprintln!(
                    "uart: cannot reopen console log {} after a restore: {e}; continuing without it",
                    path.display()
                ),
            }
        }
        self.serial = fresh;
        *self.serial.writer_mut() = console;
        self.serial.interrupt_evt().0.set(irqs);
        self.line = line;
        self.fifo_enabled = fifo_enabled;
        self.input = input.iter().copied().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IER_RDI: u64 = 0x01;
    const IER_THRI: u64 = 0x02;
    const LSR_THRE: u64 = 0x20;
    const LSR_TEMT: u64 = 0x40;
    const MCR_LOOP: u64 = 0x10;

    fn rd(u: &mut Uart, reg: u64) -> u64 {
        u.read(Space::Pio, reg, AccessSize::B1).unwrap()
    }

    fn wr(u: &mut Uart, reg: u64, v: u64) {
        u.write(Space::Pio, reg, AccessSize::B1, v).unwrap()
    }

    fn irqs(u: &mut Uart) -> usize {
        std::iter::from_fn(|| u.take_irq()).count()
    }

    /// A unique, self-removing path under the temporary directory.
    struct TempPath(PathBuf);

    impl TempPath {
        fn new(tag: &str) -> TempPath {
            let p = std::env::temp_dir().join(format!(
                "devplane-uart-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_file(&p);
            TempPath(p)
        }
    }

    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn linux_8250_probe_sees_a_16550a() {
        let mut u = Uart::default();
        // Scratch register.
        for v in [0x00, 0x55, 0xaa, 0xff] {
            wr(&mut u, REG_SCR, v);
            assert_eq!(rd(&mut u, REG_SCR), v);
        }
        // IER holds its four valid bits only.
        wr(&mut u, REG_IER, 0);
        assert_eq!(rd(&mut u, REG_IER) & 0x0f, 0);
        wr(&mut u, REG_IER, 0xff);
        assert_eq!(rd(&mut u, REG_IER), 0x0f);
        wr(&mut u, REG_IER, 0);
        irqs(&mut u);
        // Divisor latch behind LCR.DLAB, and the data/IER registers back
        // once DLAB is cleared.
        wr(&mut u, REG_LCR, 0x80);
        wr(&mut u, REG_DATA, 0x01);
        wr(&mut u, REG_IER, 0x00);
        assert_eq!(rd(&mut u, REG_DATA), 0x01);
        assert_eq!(rd(&mut u, REG_IER), 0x00);
        wr(&mut u, REG_LCR, 0x03);
        assert_eq!(rd(&mut u, REG_LCR), 0x03);
        assert_eq!(rd(&mut u, REG_IER), 0x00);
        assert!(u.take_output().is_empty(), "divisor writes transmitted");
        // IIR: no FIFO bits until FCR enables the FIFO, then both (16550A).
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0xc0, 0);
        wr(&mut u, REG_IIR_FCR, 0x01);
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0xc0, 0xc0);
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0x0f, 0x01, "no interrupt pending");
        wr(&mut u, REG_IIR_FCR, 0x00);
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0xc0, 0);
        // Loopback: MCR RTS|OUT2 shows as CTS|DCD in MSR.
        wr(&mut u, REG_MCR, MCR_LOOP | 0x0a);
        assert_eq!(rd(&mut u, REG_MSR) & 0xf0, 0x90);
        // A byte written in loopback is received, not transmitted.
        wr(&mut u, REG_DATA, 0x5a);
        assert_eq!(rd(&mut u, REG_LSR) & 0x01, 0x01);
        assert_eq!(rd(&mut u, REG_DATA), 0x5a);
        assert_eq!(rd(&mut u, REG_LSR) & 0x01, 0);
        assert!(u.take_output().is_empty());
        wr(&mut u, REG_MCR, 0x0b);
        // A transmitted byte leaves THR and the shifter empty at once.
        wr(&mut u, REG_DATA, b'x'.into());
        let lsr = rd(&mut u, REG_LSR);
        assert_eq!(lsr & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
        assert_eq!(u.take_output(), b"x");
    }

    #[test]
    fn thr_writes_with_thri_raise_interrupts_on_the_line() {
        let mut u = Uart::new(3);
        wr(&mut u, REG_DATA, b'a'.into());
        assert_eq!(irqs(&mut u), 0, "no interrupt with IER clear");
        // Enabling THRI with THR empty interrupts at once (8250 driver's
        // THRE test relies on this).
        wr(&mut u, REG_IER, IER_THRI);
        assert_eq!(
            u.take_irq(),
            Some(IrqEvent {
                line: 3,
                action: IrqAction::Edge
            })
        );
        assert_eq!(u.take_irq(), None);
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0x0f, 0x02, "THRE interrupt");
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0x0f, 0x01, "IIR read clears it");
        wr(&mut u, REG_DATA, b'b'.into());
        assert_eq!(irqs(&mut u), 1);
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0x0f, 0x02);
        assert_eq!(u.take_output(), b"ab");
        assert!(u.take_output().is_empty(), "output is drained once");
    }

    #[test]
    fn input_raises_rx_interrupts_and_queues_beyond_the_fifo() {
        let mut u = Uart::default();
        wr(&mut u, REG_IER, IER_RDI);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(u.feed_input(&input), 200);
        assert_eq!(irqs(&mut u), 1);
        assert_eq!(rd(&mut u, REG_IIR_FCR) & 0x0f, 0x04, "RDA interrupt");
        let mut got = Vec::new();
        while rd(&mut u, REG_LSR) & 0x01 != 0 {
            got.push(rd(&mut u, REG_DATA) as u8);
        }
        assert_eq!(got, input);
        // One interrupt per refilled FIFO, not per byte.
        assert_eq!(irqs(&mut u), 3);
        // FCR bit 1 throws the FIFO away.
        u.feed_input(b"xyz");
        wr(&mut u, REG_IIR_FCR, 0x03);
        assert_eq!(rd(&mut u, REG_LSR) & 0x01, 0);
        // The input queue is bounded.
        let big = vec![0u8; INPUT_LIMIT + 10];
        assert_eq!(u.feed_input(&big), INPUT_LIMIT);
    }

    #[test]
    fn console_port_drains_output_in_bounded_pieces_and_feeds_input() {
        let mut u = Uart::default();
        wr(&mut u, REG_IER, IER_RDI);
        for b in b"hello" {
            wr(&mut u, REG_DATA, u64::from(*b));
        }
        let port = u.console().expect("a UART is a console");
        assert!(port.has_output());
        let mut out = Vec::new();
        port.drain_output(&mut out, 3);
        assert_eq!(out, b"hel");
        port.drain_output(&mut out, 100);
        assert_eq!(out, b"hello");
        assert!(!port.has_output());
        assert_eq!(port.feed_input(b"ab"), 2);
        assert_eq!(irqs(&mut u), 1, "the receive interrupt");
        assert_eq!(rd(&mut u, REG_DATA), u64::from(b'a'));
        assert!(crate::null::Null.console().is_none());
    }

    #[test]
    fn bad_accesses_are_refused() {
        let mut u = Uart::default();
        assert_eq!(
            u.read(Space::Pio, 8, AccessSize::B1),
            Err(DeviceError::Unmapped {
                space: Space::Pio,
                offset: 8
            })
        );
        assert!(matches!(
            u.write(Space::Pio, 0, AccessSize::B2, 0x4141),
            Err(DeviceError::BadAccess { size: 2, .. })
        ));
        assert!(u.read(Space::Mmio, u64::MAX, AccessSize::B1).is_err());
        assert!(u.take_output().is_empty());
    }

    #[test]
    fn console_log_gets_the_output() {
        let tmp = TempPath::new("log");
        {
            let mut u = Uart::with_log(4, &tmp.0).unwrap();
            for b in b"hello\nworld" {
                wr(&mut u, REG_DATA, u64::from(*b));
            }
            assert_eq!(
                std::fs::read(&tmp.0).unwrap(),
                b"hello\n",
                "written per line"
            );
            assert_eq!(u.take_output(), b"hello\nworld");
        }
        assert_eq!(
            std::fs::read(&tmp.0).unwrap(),
            b"hello\nworld",
            "rest on drop"
        );
        // Appends, never truncates.
        let mut u = Uart::with_log(4, &tmp.0).unwrap();
        wr(&mut u, REG_DATA, b'\n'.into());
        assert_eq!(std::fs::read(&tmp.0).unwrap(), b"hello\nworld\n");
    }

    #[test]
    fn snapshot_round_trips_every_register_and_queue() {
        let tmp = TempPath::new("snap");
        let mut u = Uart::with_log(6, &tmp.0).unwrap();
        wr(&mut u, REG_LCR, 0x80);
        wr(&mut u, REG_DATA, 0x0c);
        wr(&mut u, REG_LCR, 0x1b);
        wr(&mut u, REG_SCR, 0x42);
        wr(&mut u, REG_IIR_FCR, 0x01);
        wr(&mut u, REG_IER, IER_RDI);
        wr(&mut u, REG_DATA, b'o'.into());
        let input: Vec<u8> = (0..100u8).collect();
        u.feed_input(&input);
        let snap = u.snapshot();

        let mut v = Uart::new(0);
        v.restore(&snap).unwrap();
        assert_eq!(v.snapshot(), snap);
        assert_eq!(v.log_path(), Some(tmp.0.as_path()));
        assert_eq!(irqs(&mut v), 1, "the untaken interrupt moved, no extra one");
        assert_eq!(rd(&mut v, REG_SCR), 0x42);
        assert_eq!(rd(&mut v, REG_LCR), 0x1b);
        assert_eq!(rd(&mut v, REG_IIR_FCR), 0xc4);
        assert_eq!(v.take_output(), b"o");
        let mut got = Vec::new();
        while rd(&mut v, REG_LSR) & 0x01 != 0 {
            got.push(rd(&mut v, REG_DATA) as u8);
        }
        assert_eq!(got, input, "FIFO and queued input both moved");
        let mut w = Uart::new(0);
        w.restore(&snap).unwrap();
        assert_eq!(w.take_irq().map(|e| e.line), Some(6));
    }

    #[test]
    fn bad_snapshots_change_nothing() {
        let mut u = Uart::default();
        wr(&mut u, REG_SCR, 0x99);
        let good = u.snapshot();
        let mut v = Uart::new(7);
        wr(&mut v, REG_SCR, 0x11);
        let before = v.snapshot();
        let mut truncated = good.clone();
        truncated.data.pop();
        assert!(v.restore(&truncated).is_err());
        let mut trailing = good.clone();
        trailing.data.push(0);
        assert!(v.restore(&trailing).is_err());
        // An overfull receive FIFO: length 65 at the in_buffer's prefix.
        let mut overfull = Encoder::new();
        overfull.u32(4);
        for _ in 0..9 {
            overfull.u8(0);
        }
        overfull.bytes(&[0; 65]);
        let overfull = Snapshot {
            data: overfull.finish(),
            ..good.clone()
        };
        assert!(v.restore(&overfull).is_err());
        assert!(matches!(
            v.restore(&Snapshot {
                version: 2,
                ..good.clone()
            }),
            Err(SnapshotError::UnsupportedVersion { .. })
        ));
        assert!(matches!(
            v.restore(&Snapshot {
                kind: "cmos".into(),
                ..good
            }),
            Err(SnapshotError::WrongKind { .. })
        ));
        assert_eq!(v.snapshot(), before, "a failed restore changed the state");
    }
}
