//! The PC keyboard controller (i8042), as far as a guest without a keyboard
//! needs it: on rust-vmm's `vm-superio` [`I8042Device`].
//!
//! Registered at port 0x60 with a length of 5: offset 0 is the data port
//! (0x60), offset 4 the status (read) / command (write) port (0x64). Reads
//! return 0 — no output byte waiting, input buffer empty — so a guest
//! waiting to send a command never blocks. Writing command 0xFE to the
//! command port pulses the CPU reset line: the model records it
//! ([`I8042::reset_requested`]) and raises one [`ModelEvent::Reset`] per
//! such write, which the owner takes with [`DeviceModel::take_event`] and
//! answers by stopping the VM (this is how Linux's `reboot=k` and most
//! firmware reboot).
//!
//! Offsets 1 to 3 (ports 0x61-0x63; 0x61 is the chipset's system control
//! port B, not part of the i8042) are refused as unmapped, so they read as
//! all-ones, which Linux's PIT calibration loop on port 0x61 treats as
//! "done" rather than spinning. Only 1-byte accesses are accepted.

use std::cell::Cell;

use devplane_wire::AccessSize;
use vm_superio::{I8042Device, Trigger};

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

/// Resets a snapshot may hold pending; more is a corrupt snapshot.
const MAX_PENDING: u32 = 1 << 16;
/// A snapshot's layout version.
const SNAPSHOT_VERSION: u32 = 1;

/// `vm-superio`'s reset trigger: counts the resets not yet taken.
///
/// `Trigger::trigger` takes `&self`, hence the `Cell`; the model is owned
/// by one thread.
#[derive(Debug, Default)]
struct ResetCount(Cell<u32>);

impl Trigger for ResetCount {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.set(self.0.get().saturating_add(1));
        Ok(())
    }
}

/// The i8042 keyboard controller.
#[derive(Debug)]
pub struct I8042 {
    dev: I8042Device<ResetCount>,
    requested: bool,
}

impl I8042 {
    /// A controller with no reset requested.
    pub fn new() -> I8042 {
        I8042 {
            dev: I8042Device::new(ResetCount::default()),
            requested: false,
        }
    }

    /// Whether the guest has ever pulsed the reset line (sticky; taking
    /// the [`ModelEvent::Reset`] does not clear it).
    pub fn reset_requested(&self) -> bool {
        self.requested
    }

    fn pending(&self) -> &Cell<u32> {
        &self.dev.reset_evt().0
    }

    /// Checks an access and returns the port offset.
    fn port(space: Space, offset: u64, size: AccessSize) -> Result<u8, DeviceError> {
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
        // 0 or 4.
        Ok(offset as u8)
    }
}

impl Default for I8042 {
    fn default() -> Self {
        I8042::new()
    }
}

impl DeviceModel for I8042 {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        let port = I8042::port(space, offset, size)?;
        Ok(u64::from(self.dev.read(port)))
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        let port = I8042::port(space, offset, size)?;
        // The trigger never fails.
        let _ = self.dev.write(port, (data & 0xff) as u8);
        if self.pending().get() > 0 {
            self.requested = true;
        }
        Ok(())
    }

    fn take_event(&mut self) -> Option<ModelEvent> {
        let n = self.pending().get();
        if n == 0 {
            return None;
        }
        self.pending().set(n - 1);
        Some(ModelEvent::Reset)
    }

    /// Version 1: resets not yet taken, and whether one was ever requested.
    fn snapshot(&self) -> Snapshot {
        let data = Encoder::new()
            .u32(self.pending().get())
            .u8(u8::from(self.requested))
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
        d.finish()?;
        let requested = match requested {
            0 => false,
            1 => true,
            _ => {
                return Err(SnapshotError::Corrupt {
                    kind: KIND,
                    why: "reset flag is not a boolean",
                });
            }
        };
        if pending > MAX_PENDING || (pending > 0 && !requested) {
            return Err(SnapshotError::Corrupt {
                kind: KIND,
                why: "pending resets inconsistent",
            });
        }
        self.pending().set(pending);
        self.requested = requested;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(k: &mut I8042) -> Vec<ModelEvent> {
        std::iter::from_fn(|| k.take_event()).collect()
    }

    #[test]
    fn status_reads_idle_so_the_guest_may_send_commands() {
        let mut k = I8042::new();
        let status = k.read(Space::Pio, PORT_COMMAND, AccessSize::B1).unwrap();
        assert_eq!(status & 0x01, 0, "no output byte waiting");
        assert_eq!(status & 0x02, 0, "input buffer empty");
        assert_eq!(k.read(Space::Pio, PORT_DATA, AccessSize::B1).unwrap(), 0);
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

    #[test]
    fn reset_command_raises_one_reset_per_write() {
        let mut k = I8042::new();
        // Other commands and data bytes, and 0xFE on the data port, are not
        // a reset.
        for (port, v) in [
            (PORT_COMMAND, 0x20),
            (PORT_COMMAND, 0xff),
            (PORT_DATA, 0xfe),
            (PORT_COMMAND, 0x1fe),
        ] {
            k.write(Space::Pio, port, AccessSize::B1, v).unwrap();
        }
        // 0x1fe is 0xfe in a byte-wide register.
        assert_eq!(events(&mut k), vec![ModelEvent::Reset]);
        assert!(k.reset_requested());
        k.write(Space::Pio, PORT_COMMAND, AccessSize::B1, 0xfe)
            .unwrap();
        k.write(Space::Pio, PORT_COMMAND, AccessSize::B1, 0xfe)
            .unwrap();
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
        k.write(Space::Pio, PORT_COMMAND, AccessSize::B1, 0xfe)
            .unwrap();
        let snap = k.snapshot();
        let mut m = I8042::new();
        m.restore(&snap).unwrap();
        assert_eq!(m.snapshot(), snap);
        assert!(m.reset_requested());
        assert_eq!(events(&mut m), vec![ModelEvent::Reset]);

        let fresh = I8042::new().snapshot();
        let mut n = I8042::new();
        let before = n.snapshot();
        for bad in [
            Snapshot {
                data: vec![1, 0, 0, 0, 2],
                ..fresh.clone()
            },
            Snapshot {
                data: vec![1, 0, 0, 0, 0],
                ..fresh.clone()
            },
            Snapshot {
                data: vec![0, 0, 0, 0],
                ..fresh.clone()
            },
            Snapshot {
                version: 2,
                ..fresh.clone()
            },
            Snapshot {
                kind: "cmos".into(),
                ..fresh
            },
        ] {
            assert!(n.restore(&bad).is_err(), "{bad:?}");
        }
        assert_eq!(n.snapshot(), before, "a failed restore changed the state");
    }
}
