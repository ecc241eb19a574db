//! The PC keyboard controller (i8042) with nothing plugged into its
//! keyboard and mouse ports: what a guest's driver needs to find and set up
//! the controller, and its CPU-reset line.
//!
//! Registered at port 0x60 with a length of 5: offset 0 is the data port
//! (0x60), offset 4 the status (read) / command (write) port (0x64).
//!
//! The controller answers at once, so the status register never shows its
//! input buffer full (bit 1): a guest waiting to send a command never
//! blocks. Bit 0 (output buffer full) is set while a command's answer waits
//! in the one-byte output buffer, which a data-port read takes; bit 2
//! follows the configuration byte's system flag; bit 3 says whether the
//! last write went to the command port; bit 4 says the keyboard is not
//! locked. The commands:
//!
//! | command | effect |
//! | --- | --- |
//! | `0x20`-`0x3f` | answers byte `cmd & 0x1f` of the controller's RAM; byte 0 is the configuration byte (CTR) |
//! | `0x60`-`0x7f` | the next data-port write goes to that RAM byte (byte 0: the CTR) |
//! | `0xa7` / `0xa8` | disables / enables the mouse port (CTR bit 5) |
//! | `0xa9`, `0xab` | mouse / keyboard port test: answers `0x00` (the lines are fine) |
//! | `0xaa` | controller self-test: answers `0x55` |
//! | `0xad` / `0xae` | disables / enables the keyboard port (CTR bit 4) |
//! | `0xd0` | answers the output port |
//! | `0xd1` | the next data-port write goes to the output port; bit 0 clear resets the CPU |
//! | `0xf0`-`0xff` | pulses the output-port lines whose bits are clear in `cmd & 0xf`; bit 0 is the CPU reset (`0xfe`, Linux's `reboot=k`) |
//!
//! Other commands are ignored, and so are data bytes no command waits for
//! (they would go to a keyboard, and none is attached). The model raises no
//! interrupts: no device is attached to send data, and a guest polls for
//! command answers.
//!
//! A CPU reset is recorded ([`I8042::reset_requested`]) and raises one
//! [`ModelEvent::Reset`] per pulse, which the owner takes with
//! [`DeviceModel::take_event`] and answers by stopping the VM.
//!
//! Offsets 1 to 3 (ports 0x61-0x63; 0x61 is the chipset's system control
//! port B, not part of the i8042) are refused as unmapped, so they read as
//! all-ones, which Linux's PIT calibration loop on port 0x61 treats as
//! "done" rather than spinning. Only 1-byte accesses are accepted.

use devplane_wire::AccessSize;

use crate::codec::{Decoder, Encoder};
use crate::{DeviceError, DeviceModel, ModelEvent, Snapshot, SnapshotError, Space};

/// The kind name.
pub const KIND: &str = "i8042";
/// The base port on a PC.
pub const PC_BASE: u16 = 0x60;
/// Bytes of port window the model is registered with.
pub const WINDOW_LEN: u64 = 5;
/// Data port offset.
pub const PORT_DATA: u64 = 0;
/// Status (read) / command (write) port offset.
pub const PORT_COMMAND: u64 = 4;
/// The command that pulses the CPU reset line.
pub const CMD_RESET_CPU: u8 = 0xfe;
/// The command that reads the configuration byte.
pub const CMD_READ_CTR: u8 = 0x20;
/// The command whose data byte becomes the configuration byte.
pub const CMD_WRITE_CTR: u8 = 0x60;
/// The controller self-test command.
pub const CMD_SELF_TEST: u8 = 0xaa;
/// The self-test's answer: passed.
pub const SELF_TEST_OK: u8 = 0x55;
/// The command that reads the output port.
pub const CMD_READ_OUTPUT: u8 = 0xd0;
/// The command whose data byte becomes the output port.
pub const CMD_WRITE_OUTPUT: u8 = 0xd1;

/// Status: a byte waits in the output buffer.
pub const STATUS_OBF: u8 = 0x01;
/// Status: the controller has not taken the last byte written (never set).
pub const STATUS_IBF: u8 = 0x02;
/// Status: the system flag (CTR bit 2).
pub const STATUS_SYS: u8 = 0x04;
/// Status: the last write went to the command port.
pub const STATUS_CMD: u8 = 0x08;
/// Status: the keyboard is not locked.
pub const STATUS_UNLOCKED: u8 = 0x10;

/// CTR: keyboard interrupt enabled.
pub const CTR_KBD_INT: u8 = 0x01;
/// CTR: system flag (set once the firmware's self-test passed).
pub const CTR_SYS: u8 = 0x04;
/// CTR: keyboard port disabled.
pub const CTR_KBD_DISABLED: u8 = 0x10;
/// CTR: mouse port disabled.
pub const CTR_AUX_DISABLED: u8 = 0x20;
/// CTR: scan-code translation.
pub const CTR_XLATE: u8 = 0x40;
/// The CTR as a PC's firmware leaves it: translation, the system flag and
/// the keyboard interrupt on, the mouse port off.
pub const CTR_POWER_ON: u8 = CTR_XLATE | CTR_AUX_DISABLED | CTR_SYS | CTR_KBD_INT;
/// Output port bit 0: the CPU runs (clearing it resets the CPU).
pub const OUT_RESET: u8 = 0x01;
/// Output port bit 1: the A20 gate.
pub const OUT_A20: u8 = 0x02;

/// Resets a snapshot may hold pending; more is a corrupt snapshot.
const MAX_PENDING: u32 = 1 << 16;
/// A snapshot's layout version.
const SNAPSHOT_VERSION: u32 = 2;
/// Bytes of controller RAM the read/write RAM commands address.
const RAM_LEN: usize = 32;

/// The i8042 keyboard controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I8042 {
    /// Controller RAM; byte 0 is the configuration byte (CTR).
    ram: [u8; RAM_LEN],
    /// The byte waiting for the guest on the data port.
    out: Option<u8>,
    /// The command the next data-port write is the parameter of.
    awaiting: Option<u8>,
    /// Whether the last write went to the command port.
    last_was_command: bool,
    /// The output port (reset and A20 lines).
    output_port: u8,
    /// Resets raised and not yet taken.
    pending: u32,
    requested: bool,
}

impl I8042 {
    /// A controller as firmware leaves it, with no reset requested.
    pub fn new() -> I8042 {
        let mut ram = [0; RAM_LEN];
        ram[0] = CTR_POWER_ON;
        I8042 {
            ram,
            out: None,
            awaiting: None,
            last_was_command: false,
            output_port: OUT_RESET | OUT_A20,
            pending: 0,
            requested: false,
        }
    }

    /// Whether the guest has ever pulsed the reset line (sticky; taking
    /// the [`ModelEvent::Reset`] does not clear it).
    pub fn reset_requested(&self) -> bool {
        self.requested
    }

    /// The configuration byte.
    pub fn ctr(&self) -> u8 {
        self.ram[0]
    }

    /// Checks an access and returns the port offset.
    fn port(space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        if offset != PORT_DATA && offset != PORT_COMMAND {
            return Err(DeviceError::Unmapped { space, offset });
        }
        if size != AccessSize::B1 {
            return Err(DeviceError::BadAccess {
                space,
                offset,
                size: size.bytes(),
            });
        }
        Ok(offset)
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if self.out.is_some() {
            s |= STATUS_OBF;
        }
        if self.ctr() & CTR_SYS != 0 {
            s |= STATUS_SYS;
        }
        if self.last_was_command {
            s |= STATUS_CMD;
        }
        s
    }

    fn reset_cpu(&mut self) {
        self.pending = self.pending.saturating_add(1);
        self.requested = true;
    }

    fn command(&mut self, cmd: u8) {
        self.awaiting = None;
        match cmd {
            0x20..=0x3f => self.out = Some(self.ram[usize::from(cmd & 0x1f)]),
            0x60..=0x7f | CMD_WRITE_OUTPUT => self.awaiting = Some(cmd),
            0xa7 => self.ram[0] |= CTR_AUX_DISABLED,
            0xa8 => self.ram[0] &= !CTR_AUX_DISABLED,
            0xa9 | 0xab => self.out = Some(0x00),
            CMD_SELF_TEST => self.out = Some(SELF_TEST_OK),
            0xad => self.ram[0] |= CTR_KBD_DISABLED,
            0xae => self.ram[0] &= !CTR_KBD_DISABLED,
            CMD_READ_OUTPUT => self.out = Some(self.output_port),
            // Pulses; only a clear bit 0 touches a line that does anything.
            0xf0..=0xff if cmd & OUT_RESET == 0 => self.reset_cpu(),
            _ => {}
        }
    }

    fn data(&mut self, v: u8) {
        match self.awaiting.take() {
            Some(cmd @ 0x60..=0x7f) => self.ram[usize::from(cmd & 0x1f)] = v,
            Some(CMD_WRITE_OUTPUT) => {
                self.output_port = v;
                if v & OUT_RESET == 0 {
                    self.reset_cpu();
                }
            }
            // A byte for the keyboard: nothing is attached.
            _ => {}
        }
    }
}

impl Default for I8042 {
    fn default() -> Self {
        I8042::new()
    }
}

fn corrupt(why: &'static str) -> SnapshotError {
    SnapshotError::Corrupt { kind: KIND, why }
}

fn flag(v: u8, why: &'static str) -> Result<bool, SnapshotError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(corrupt(why)),
    }
}

impl DeviceModel for I8042 {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        let v = match I8042::port(space, offset, size)? {
            PORT_DATA => self.out.take().unwrap_or(0),
            _ => self.status(),
        };
        Ok(u64::from(v))
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        let v = (data & 0xff) as u8;
        if I8042::port(space, offset, size)? == PORT_DATA {
            self.last_was_command = false;
            self.data(v);
        } else {
            self.last_was_command = true;
            self.command(v);
        }
        Ok(())
    }

    fn take_event(&mut self) -> Option<ModelEvent> {
        if self.pending == 0 {
            return None;
        }
        self.pending -= 1;
        Some(ModelEvent::Reset)
    }

    /// Version 2: resets not yet taken, whether one was ever requested,
    /// the controller RAM, the output buffer (present flag and byte), the
    /// command awaiting its data byte (0 for none), the last-write-was-a-
    /// command flag and the output port.
    fn snapshot(&self) -> Snapshot {
        let data = Encoder::new()
            .u32(self.pending)
            .u8(u8::from(self.requested))
            .bytes(&self.ram)
            .u8(u8::from(self.out.is_some()))
            .u8(self.out.unwrap_or(0))
            .u8(self.awaiting.unwrap_or(0))
            .u8(u8::from(self.last_was_command))
            .u8(self.output_port)
            .finish();
        Snapshot {
            kind: KIND.into(),
            version: SNAPSHOT_VERSION,
            data,
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let mut d = Decoder::new(KIND, snap.expect(KIND, SNAPSHOT_VERSION)?);
        let pending = d.u32()?;
        let requested = d.u8()?;
        let ram = d.bytes(RAM_LEN)?;
        let has_out = d.u8()?;
        let out = d.u8()?;
        let awaiting = d.u8()?;
        let last_was_command = d.u8()?;
        let output_port = d.u8()?;
        d.finish()?;
        let requested = flag(requested, "reset flag is not a boolean")?;
        let has_out = flag(has_out, "output-buffer flag is not a boolean")?;
        let last_was_command = flag(last_was_command, "command flag is not a boolean")?;
        let ram: [u8; RAM_LEN] = ram
            .try_into()
            .map_err(|_| corrupt("controller RAM is not 32 bytes"))?;
        if pending > MAX_PENDING || (pending > 0 && !requested) {
            return Err(corrupt("pending resets inconsistent"));
        }
        if !has_out && out != 0 {
            return Err(corrupt("output byte without the output-buffer flag"));
        }
        let awaiting = match awaiting {
            0 => None,
            c @ (0x60..=0x7f | CMD_WRITE_OUTPUT) => Some(c),
            _ => return Err(corrupt("no such command awaits data")),
        };
        *self = I8042 {
            ram,
            out: has_out.then_some(out),
            awaiting,
            last_was_command,
            output_port,
            pending,
            requested,
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(k: &mut I8042) -> Vec<ModelEvent> {
        std::iter::from_fn(|| k.take_event()).collect()
    }

    fn cmd(k: &mut I8042, c: u8) {
        k.write(Space::Pio, PORT_COMMAND, AccessSize::B1, u64::from(c))
            .unwrap();
    }

    fn data_in(k: &mut I8042, v: u8) {
        k.write(Space::Pio, PORT_DATA, AccessSize::B1, u64::from(v))
            .unwrap();
    }

    fn status(k: &mut I8042) -> u8 {
        k.read(Space::Pio, PORT_COMMAND, AccessSize::B1).unwrap() as u8
    }

    fn data_out(k: &mut I8042) -> u8 {
        k.read(Space::Pio, PORT_DATA, AccessSize::B1).unwrap() as u8
    }

    /// What Linux's i8042 driver does before it polls for an answer: wait
    /// for the input buffer to be empty, write the command, then wait for
    /// the output buffer to be full and read it.
    fn ask(k: &mut I8042, c: u8) -> u8 {
        assert_eq!(status(k) & STATUS_IBF, 0, "input buffer empty");
        cmd(k, c);
        let s = status(k);
        assert_ne!(s & STATUS_OBF, 0, "command {c:#x} answered");
        assert_ne!(s & STATUS_CMD, 0, "last write was a command");
        let v = data_out(k);
        assert_eq!(status(k) & STATUS_OBF, 0, "the read took the answer");
        v
    }

    #[test]
    fn status_reads_idle_so_the_guest_may_send_commands() {
        let mut k = I8042::new();
        let s = status(&mut k);
        assert_eq!(s & STATUS_OBF, 0, "no output byte waiting");
        assert_eq!(s & STATUS_IBF, 0, "input buffer empty");
        assert_ne!(s & STATUS_UNLOCKED, 0, "keyboard not locked");
        assert_ne!(s & STATUS_SYS, 0, "system flag from the power-on CTR");
        assert_eq!(data_out(&mut k), 0, "nothing to read");
        for offset in 1..=3 {
            assert_eq!(
                k.read(Space::Pio, offset, AccessSize::B1),
                Err(DeviceError::Unmapped {
                    space: Space::Pio,
                    offset
                })
            );
        }
        assert!(k.read(Space::Pio, WINDOW_LEN, AccessSize::B1).is_err());
        assert!(matches!(
            k.write(Space::Pio, PORT_COMMAND, AccessSize::B2, 0xfe),
            Err(DeviceError::BadAccess { size: 2, .. })
        ));
        assert!(!k.reset_requested(), "a refused access is no reset");
        assert_eq!(k.take_event(), None);
    }

    /// The sequence of Linux 6.1's `i8042_controller_init` and
    /// `i8042_enable_kbd_port`: two CTR reads that must agree, the keyboard
    /// port disabled and its interrupt off while it sets up, the CTR
    /// written back, then the port enabled with its interrupt.
    #[test]
    fn linux_driver_reads_and_writes_the_configuration_byte() {
        let mut k = I8042::new();
        let first = ask(&mut k, CMD_READ_CTR);
        assert_eq!(first, CTR_POWER_ON);
        assert_eq!(ask(&mut k, CMD_READ_CTR), first, "a stable CTR read");

        let ctr = (first | CTR_KBD_DISABLED) & !CTR_KBD_INT;
        cmd(&mut k, CMD_WRITE_CTR);
        assert_eq!(status(&mut k) & (STATUS_IBF | STATUS_OBF), 0);
        data_in(&mut k, ctr);
        assert_eq!(status(&mut k) & STATUS_CMD, 0, "last write was data");
        assert_eq!(k.ctr(), ctr);
        assert_eq!(ask(&mut k, CMD_READ_CTR), ctr);

        let ctr = (ctr & !CTR_KBD_DISABLED) | CTR_KBD_INT;
        cmd(&mut k, CMD_WRITE_CTR);
        data_in(&mut k, ctr);
        assert_eq!(ask(&mut k, CMD_READ_CTR), ctr);
        // A data byte no command waits for goes to the (absent) keyboard.
        data_in(&mut k, 0xf2);
        assert_eq!(k.ctr(), ctr);
        assert_eq!(status(&mut k) & STATUS_OBF, 0, "no keyboard answers");
        // The system flag in the status follows the CTR.
        cmd(&mut k, CMD_WRITE_CTR);
        data_in(&mut k, 0);
        assert_eq!(status(&mut k) & STATUS_SYS, 0);
        assert!(!k.reset_requested());
        assert_eq!(k.take_event(), None);
    }

    #[test]
    fn tests_ram_port_enables_and_output_port() {
        let mut k = I8042::new();
        assert_eq!(ask(&mut k, CMD_SELF_TEST), SELF_TEST_OK);
        assert_eq!(ask(&mut k, 0xab), 0, "keyboard interface test passes");
        assert_eq!(ask(&mut k, 0xa9), 0, "mouse interface test passes");
        // RAM byte 5: written with 0x65, read with 0x25.
        cmd(&mut k, 0x65);
        data_in(&mut k, 0x5a);
        assert_eq!(ask(&mut k, 0x25), 0x5a);
        assert_eq!(k.ctr(), CTR_POWER_ON, "byte 0 untouched");
        cmd(&mut k, 0xad);
        assert_ne!(k.ctr() & CTR_KBD_DISABLED, 0);
        cmd(&mut k, 0xae);
        assert_eq!(k.ctr() & CTR_KBD_DISABLED, 0);
        cmd(&mut k, 0xa8);
        assert_eq!(k.ctr() & CTR_AUX_DISABLED, 0);
        cmd(&mut k, 0xa7);
        assert_ne!(k.ctr() & CTR_AUX_DISABLED, 0);
        assert_eq!(ask(&mut k, CMD_READ_OUTPUT), OUT_RESET | OUT_A20);
        // A new command drops the one waiting for data.
        cmd(&mut k, CMD_WRITE_CTR);
        cmd(&mut k, 0xae);
        data_in(&mut k, 0);
        assert_eq!(k.ctr(), CTR_POWER_ON, "the data byte went to the keyboard");
        // A20 off, reset line held: no reset.
        cmd(&mut k, CMD_WRITE_OUTPUT);
        data_in(&mut k, OUT_RESET);
        assert_eq!(ask(&mut k, CMD_READ_OUTPUT), OUT_RESET);
        assert_eq!(k.take_event(), None);
        // Reset line cleared through the output port: a reset.
        cmd(&mut k, CMD_WRITE_OUTPUT);
        data_in(&mut k, OUT_A20);
        assert_eq!(events(&mut k), vec![ModelEvent::Reset]);
    }

    #[test]
    fn reset_command_raises_one_reset_per_write() {
        let mut k = I8042::new();
        // Other commands and data bytes, 0xFE on the data port and pulses
        // that leave the reset line alone are not a reset.
        for (port, v) in [
            (PORT_COMMAND, 0x20),
            (PORT_COMMAND, 0xff),
            (PORT_COMMAND, 0xfd),
            (PORT_DATA, 0xfe),
        ] {
            k.write(Space::Pio, port, AccessSize::B1, v).unwrap();
        }
        assert_eq!(k.take_event(), None);
        assert!(!k.reset_requested());
        // 0x1fe is 0xfe in a byte-wide register.
        k.write(Space::Pio, PORT_COMMAND, AccessSize::B1, 0x1fe)
            .unwrap();
        assert_eq!(events(&mut k), vec![ModelEvent::Reset]);
        assert!(k.reset_requested());
        // What Linux's reboot=k does: wait for the input buffer, pulse.
        assert_eq!(status(&mut k) & STATUS_IBF, 0);
        cmd(&mut k, CMD_RESET_CPU);
        cmd(&mut k, 0xf0);
        assert_eq!(events(&mut k), vec![ModelEvent::Reset; 2]);
        assert_eq!(k.take_event(), None);
        assert!(k.reset_requested(), "sticky");
    }

    #[test]
    fn other_models_raise_no_events() {
        let mut c = crate::counter::Counter::new(0);
        assert_eq!(c.take_event(), None);
    }

    #[test]
    fn snapshot_round_trips_and_bad_ones_change_nothing() {
        let mut k = I8042::new();
        cmd(&mut k, CMD_WRITE_CTR);
        data_in(&mut k, 0x07);
        cmd(&mut k, CMD_RESET_CPU);
        cmd(&mut k, CMD_READ_CTR);
        cmd(&mut k, CMD_WRITE_OUTPUT);
        let snap = k.snapshot();
        let mut m = I8042::new();
        m.restore(&snap).unwrap();
        assert_eq!(m, k);
        assert_eq!(m.snapshot(), snap);
        assert!(m.reset_requested());
        assert_eq!(events(&mut m), vec![ModelEvent::Reset]);
        assert_eq!(data_out(&mut m), 0x07, "the answer waiting survives");
        data_in(&mut m, OUT_RESET);
        assert_eq!(
            ask(&mut m, CMD_READ_OUTPUT),
            OUT_RESET,
            "so does the command"
        );

        let fresh = I8042::new().snapshot();
        let mut n = I8042::new();
        let before = n.snapshot();
        let with = |at: usize, v: u8| {
            let mut s = fresh.clone();
            s.data[at] = v;
            s
        };
        // Layout: pending u32 @0, requested @4, RAM length u64 @5, RAM @13,
        // out flag @45, out byte @46, awaiting @47, command flag @48,
        // output port @49.
        assert_eq!(fresh.data.len(), 50);
        let mut truncated = fresh.clone();
        truncated.data.pop();
        let mut long = fresh.clone();
        long.data.push(0);
        for bad in [
            with(0, 1),
            with(4, 2),
            with(5, 31),
            with(45, 2),
            with(46, 1),
            with(47, 0xaa),
            with(48, 2),
            truncated,
            long,
            Snapshot {
                version: 1,
                ..fresh.clone()
            },
            Snapshot {
                kind: "cmos".into(),
                ..fresh.clone()
            },
        ] {
            assert!(n.restore(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(n.snapshot(), before, "a failed restore changed the state");
        n.restore(&with(47, 0x61)).unwrap();
        data_in(&mut n, 9);
        assert_eq!(ask(&mut n, 0x21), 9);
    }
}
