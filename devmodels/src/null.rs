//! The null and echo models, for benchmarks: the cheapest possible model
//! work, so that a round trip measures the data path and nothing else.

use devplane_wire::AccessSize;

use crate::snapshot::{read_u64s, write_u64s};
use crate::{DeviceError, DeviceModel, Snapshot, SnapshotError, Space};

/// Reads return 0; writes are discarded.
#[derive(Debug, Default)]
pub struct Null;

impl DeviceModel for Null {
    fn kind(&self) -> &'static str {
        "null"
    }

    fn read(&mut self, _: Space, _: u64, _: AccessSize) -> Result<u64, DeviceError> {
        Ok(0)
    }

    fn write(&mut self, _: Space, _: u64, _: AccessSize, _: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            kind: "null".into(),
            version: 1,
            data: Vec::new(),
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let data = snap.expect("null", 1)?;
        if !data.is_empty() {
            return Err(SnapshotError::Corrupt {
                kind: "null",
                why: "null has no state",
            });
        }
        Ok(())
    }
}

/// One scratch register: a read returns the last value written (masked to
/// the read's size). Lets a benchmark check that data survives the trip.
#[derive(Debug, Default)]
pub struct Echo {
    value: u64,
}

impl DeviceModel for Echo {
    fn kind(&self) -> &'static str {
        "echo"
    }

    fn read(&mut self, _: Space, _: u64, size: AccessSize) -> Result<u64, DeviceError> {
        Ok(self.value & size.mask())
    }

    fn write(&mut self, _: Space, _: u64, size: AccessSize, data: u64) -> Result<(), DeviceError> {
        self.value = data & size.mask();
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            kind: "echo".into(),
            version: 1,
            data: write_u64s(&[self.value]),
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let [value] = read_u64s::<1>("echo", snap.expect("echo", 1)?)?;
        self.value = value;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn null_reads_zero_and_ignores_writes() {
        let mut n = Null;
        n.write(Space::Pio, 0, AccessSize::B4, 0xdead).unwrap();
        assert_eq!(n.read(Space::Pio, 0, AccessSize::B4).unwrap(), 0);
        assert_eq!(n.read(Space::Mmio, 0x100, AccessSize::B8).unwrap(), 0);
        let s = n.snapshot();
        n.restore(&s).unwrap();
        let bad = Snapshot { data: vec![1], ..s };
        assert!(n.restore(&bad).is_err());
    }

    #[test]
    fn echo_returns_last_write_masked() {
        let mut e = Echo::default();
        e.write(Space::Mmio, 0, AccessSize::B8, 0x1122_3344_5566_7788)
            .unwrap();
        assert_eq!(e.read(Space::Mmio, 0, AccessSize::B2).unwrap(), 0x7788);
        assert_eq!(
            e.read(Space::Mmio, 0, AccessSize::B8).unwrap(),
            0x1122_3344_5566_7788
        );
        e.write(Space::Pio, 0, AccessSize::B1, 0x1ff).unwrap();
        assert_eq!(e.read(Space::Pio, 0, AccessSize::B4).unwrap(), 0xff);
        let snap = e.snapshot();
        let mut e2 = Echo::default();
        e2.restore(&snap).unwrap();
        assert_eq!(e2.read(Space::Pio, 0, AccessSize::B4).unwrap(), 0xff);
        let wrong = Snapshot {
            kind: "null".into(),
            ..snap
        };
        assert!(matches!(
            e2.restore(&wrong),
            Err(SnapshotError::WrongKind { .. })
        ));
    }
}
