//! The counter model: exposes lost or duplicated writes in tests, and
//! raises interrupts on request.
//!
//! Registers (offsets from the base, either space):
//!
//! | offset | read | write |
//! | --- | --- | --- |
//! | 0 | writes applied to offset 0 so far (`size`-masked) | counts one write; data is added to the sum |
//! | 8 | sum of the data written to offset 0 (low `size` bytes) | resets count and sum |
//! | 16 | interrupts raised so far | raises `data` edge interrupts on the model's line (at most 64 per write) |

use std::collections::VecDeque;

use devplane_wire::{AccessSize, IrqAction};

use crate::snapshot::{read_u64s, write_u64s};
use crate::{DeviceError, DeviceModel, IrqEvent, Snapshot, SnapshotError, Space};

/// Register offsets.
pub const REG_COUNT: u64 = 0;
/// Sum register / reset.
pub const REG_SUM: u64 = 8;
/// Interrupt register.
pub const REG_IRQ: u64 = 16;
/// Most interrupts one write may raise.
pub const MAX_IRQS_PER_WRITE: u64 = 64;

/// Counts the writes it applies.
#[derive(Debug)]
pub struct Counter {
    count: u64,
    sum: u64,
    irqs: u64,
    line: u32,
    pending: VecDeque<IrqEvent>,
}

impl Counter {
    /// A counter that raises its interrupts on `line`.
    pub fn new(line: u32) -> Counter {
        Counter {
            count: 0,
            sum: 0,
            irqs: 0,
            line,
            pending: VecDeque::new(),
        }
    }

    /// Writes applied to offset 0.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl Default for Counter {
    fn default() -> Self {
        Counter::new(0)
    }
}

impl DeviceModel for Counter {
    fn kind(&self) -> &'static str {
        "counter"
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        let v = match offset {
            REG_COUNT => self.count,
            REG_SUM => self.sum,
            REG_IRQ => self.irqs,
            _ => return Err(DeviceError::Unmapped { space, offset }),
        };
        Ok(v & size.mask())
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        match offset {
            REG_COUNT => {
                self.count = self.count.wrapping_add(1);
                self.sum = self.sum.wrapping_add(data & size.mask());
            }
            REG_SUM => {
                self.count = 0;
                self.sum = 0;
            }
            REG_IRQ => {
                let n = (data & size.mask()).min(MAX_IRQS_PER_WRITE);
                for _ in 0..n {
                    self.irqs = self.irqs.wrapping_add(1);
                    self.pending.push_back(IrqEvent {
                        line: self.line,
                        action: IrqAction::Edge,
                    });
                }
            }
            _ => return Err(DeviceError::Unmapped { space, offset }),
        }
        Ok(())
    }

    fn take_irq(&mut self) -> Option<IrqEvent> {
        self.pending.pop_front()
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            kind: "counter".into(),
            version: 1,
            data: write_u64s(&[
                self.count,
                self.sum,
                self.irqs,
                self.line as u64,
                self.pending.len() as u64,
            ]),
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let [count, sum, irqs, line, pending] =
            read_u64s::<5>("counter", snap.expect("counter", 1)?)?;
        let line = u32::try_from(line).map_err(|_| SnapshotError::Corrupt {
            kind: "counter",
            why: "line out of range",
        })?;
        if pending > MAX_IRQS_PER_WRITE * 1024 {
            return Err(SnapshotError::Corrupt {
                kind: "counter",
                why: "too many pending interrupts",
            });
        }
        self.count = count;
        self.sum = sum;
        self.irqs = irqs;
        self.line = line;
        self.pending = (0..pending)
            .map(|_| IrqEvent {
                line,
                action: IrqAction::Edge,
            })
            .collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_writes_and_sums_data() {
        let mut c = Counter::new(5);
        for i in 0..10u64 {
            c.write(Space::Pio, REG_COUNT, AccessSize::B4, i).unwrap();
        }
        assert_eq!(c.read(Space::Pio, REG_COUNT, AccessSize::B4).unwrap(), 10);
        assert_eq!(c.read(Space::Pio, REG_SUM, AccessSize::B4).unwrap(), 45);
        // Size masks the value read.
        for _ in 0..300 {
            c.write(Space::Mmio, REG_COUNT, AccessSize::B1, 0).unwrap();
        }
        assert_eq!(
            c.read(Space::Mmio, REG_COUNT, AccessSize::B1).unwrap(),
            310 & 0xff
        );
        c.write(Space::Mmio, REG_SUM, AccessSize::B1, 0).unwrap();
        assert_eq!(c.count(), 0);
        assert_eq!(
            c.read(Space::Pio, 3, AccessSize::B1),
            Err(DeviceError::Unmapped {
                space: Space::Pio,
                offset: 3
            })
        );
    }

    #[test]
    fn raises_edges_on_its_line() {
        let mut c = Counter::new(9);
        c.write(Space::Pio, REG_IRQ, AccessSize::B1, 3).unwrap();
        let mut got = vec![];
        while let Some(e) = c.take_irq() {
            got.push(e);
        }
        assert_eq!(
            got,
            vec![
                IrqEvent {
                    line: 9,
                    action: IrqAction::Edge
                };
                3
            ]
        );
        assert_eq!(c.read(Space::Pio, REG_IRQ, AccessSize::B4).unwrap(), 3);
        c.write(Space::Pio, REG_IRQ, AccessSize::B4, 1000).unwrap();
        assert_eq!(
            c.read(Space::Pio, REG_IRQ, AccessSize::B4).unwrap(),
            3 + MAX_IRQS_PER_WRITE
        );
    }

    #[test]
    fn snapshot_restores_everything_or_nothing() {
        let mut c = Counter::new(4);
        c.write(Space::Pio, REG_COUNT, AccessSize::B4, 7).unwrap();
        c.write(Space::Pio, REG_IRQ, AccessSize::B4, 2).unwrap();
        let snap = c.snapshot();
        let mut d = Counter::new(0);
        d.restore(&snap).unwrap();
        assert_eq!(d.snapshot(), snap);
        assert_eq!(
            d.take_irq(),
            Some(IrqEvent {
                line: 4,
                action: IrqAction::Edge
            })
        );
        let before = d.snapshot();
        let corrupt = Snapshot {
            data: vec![0; 7],
            ..snap.clone()
        };
        assert!(d.restore(&corrupt).is_err());
        let newer = Snapshot { version: 2, ..snap };
        assert!(matches!(
            d.restore(&newer),
            Err(SnapshotError::UnsupportedVersion { .. })
        ));
        assert_eq!(d.snapshot(), before, "a failed restore changed the state");
    }
}
