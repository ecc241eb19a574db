//! A PCI host bridge: configuration mechanism #1 (an address register at
//! port `0xCF8`, data at `0xCFC..=0xCFF`) over bus 0, with the host bridge
//! itself at 00:00.0 and the VM's virtio functions behind it.
//!
//! It is a [`DeviceModel`] like any other (port-I/O offsets 0..8 from its
//! base `0xCF8`). BARs are assigned here, as firmware would, and Linux keeps
//! them; a BAR the guest moves stops decoding (the VM's device map is
//! fixed), which `pci=conf1` guests built by this VMM never do.

use devplane_devmodels::snapshot::{read_u64s, write_u64s};
use devplane_devmodels::{DeviceError, DeviceModel, Snapshot, SnapshotError, Space};
use devplane_wire::AccessSize;

/// Base port of the configuration mechanism.
pub const CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// Ports the model decodes from its base.
pub const PORTS: u64 = 8;
/// Red Hat's virtio vendor id.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Legacy (transitional) virtio-blk device id.
pub const VIRTIO_BLK_LEGACY_DEVICE: u16 = 0x1001;
/// The virtio device type of a block device (the subsystem id).
pub const VIRTIO_ID_BLOCK: u16 = 2;

const KIND: &str = "pci-host";
const VERSION: u32 = 1;
const ENABLE: u32 = 1 << 31;
const COMMAND_IO: u16 = 1;

/// One function on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciFunction {
    /// Device number (1..32; 0 is the host bridge).
    pub device: u8,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device_id: u16,
    /// Class code, subclass, programming interface (24 bits).
    pub class: u32,
    /// Subsystem vendor id.
    pub subsystem_vendor: u16,
    /// Subsystem id.
    pub subsystem: u16,
    /// BAR0: an I/O range (base, size; size a power of two >= 4).
    pub io_bar: (u16, u16),
    /// Legacy interrupt line (PIC/IOAPIC input) of INTA#.
    pub irq: u8,
}

impl PciFunction {
    /// A legacy virtio-blk function.
    pub fn virtio_blk(device: u8, io_base: u16, io_size: u16, irq: u8) -> PciFunction {
        PciFunction {
            device,
            vendor: VIRTIO_VENDOR,
            device_id: VIRTIO_BLK_LEGACY_DEVICE,
            // Mass storage, SCSI (what QEMU reports for legacy virtio-blk).
            class: 0x01_00_00,
            subsystem_vendor: VIRTIO_VENDOR,
            subsystem: VIRTIO_ID_BLOCK,
            io_bar: (io_base, io_size),
            irq,
        }
    }
}

/// The configuration space of a bus-0 host bridge and its functions.
pub struct PciHost {
    address: u32,
    functions: Vec<PciFunction>,
    /// Per function: (command register, BAR0 as last written).
    state: Vec<(u16, u32)>,
}

impl PciHost {
    /// A host bridge with `functions` behind it. Functions with device
    /// number 0 or above 31, or repeated numbers, are dropped.
    pub fn new(functions: Vec<PciFunction>) -> PciHost {
        let mut fs: Vec<PciFunction> = Vec::new();
        for f in functions {
            if (1..32).contains(&f.device) && !fs.iter().any(|g| g.device == f.device) {
                fs.push(f);
            }
        }
        let state = fs.iter().map(|f| (0, u32::from(f.io_bar.0) | 1)).collect();
        PciHost {
            address: 0,
            functions: fs,
            state,
        }
    }

    /// The dword at `reg` of (device, function), or all-ones if absent.
    fn dword(&self, device: u8, function: u8, reg: u8) -> u32 {
        if function != 0 {
            return u32::MAX;
        }
        if device == 0 {
            // Intel 440FX host bridge: what `pci_sanity_check` looks for.
            return match reg {
                0x00 => 0x1237_8086,
                0x08 => 0x0600_0000,
                _ => 0,
            };
        }
        let Some(i) = self.functions.iter().position(|f| f.device == device) else {
            return u32::MAX;
        };
        let f = &self.functions[i];
        let (command, bar0) = self.state[i];
        match reg {
            0x00 => u32::from(f.vendor) | (u32::from(f.device_id) << 16),
            0x04 => u32::from(command),
            0x08 => f.class << 8,
            0x10 => bar0,
            0x2c => u32::from(f.subsystem_vendor) | (u32::from(f.subsystem) << 16),
            0x3c => u32::from(f.irq) | (1 << 8),
            _ => 0,
        }
    }

    fn write_dword(&mut self, device: u8, function: u8, reg: u8, value: u32, mask: u32) {
        if function != 0 {
            return;
        }
        let Some(i) = self.functions.iter().position(|f| f.device == device) else {
            return;
        };
        let size = u32::from(self.functions[i].io_bar.1.max(4));
        let (command, bar0) = &mut self.state[i];
        match reg {
            0x04 => {
                let v = (u32::from(*command) & !mask) | (value & mask);
                *command = (v as u16) & (COMMAND_IO | 0x0400);
            }
            0x10 => {
                let v = (*bar0 & !mask) | (value & mask);
                // Size probing: the low bits of an I/O BAR read back zero.
                *bar0 = (v & !(size - 1) & 0xffff) | 1;
            }
            _ => {}
        }
    }

    /// I/O decoding of function `device` is enabled.
    pub fn io_enabled(&self, device: u8) -> bool {
        self.functions
            .iter()
            .position(|f| f.device == device)
            .is_some_and(|i| self.state[i].0 & COMMAND_IO != 0)
    }

    fn target(&self) -> Option<(u8, u8, u8)> {
        if self.address & ENABLE == 0 || (self.address >> 16) & 0xff != 0 {
            return None;
        }
        Some((
            ((self.address >> 11) & 0x1f) as u8,
            ((self.address >> 8) & 0x7) as u8,
            (self.address & 0xfc) as u8,
        ))
    }
}

impl DeviceModel for PciHost {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError> {
        if space != Space::Pio || offset >= PORTS || !offset.is_multiple_of(size.bytes() as u64) {
            return Err(DeviceError::BadAccess {
                space,
                offset,
                size: size.bytes(),
            });
        }
        if offset < 4 {
            return Ok(if size == AccessSize::B4 {
                u64::from(self.address)
            } else {
                size.mask()
            });
        }
        let Some((dev, func, reg)) = self.target() else {
            return Ok(size.mask());
        };
        let shift = 8 * (offset - 4);
        Ok((u64::from(self.dword(dev, func, reg)) >> shift) & size.mask())
    }

    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError> {
        if space != Space::Pio || offset >= PORTS || !offset.is_multiple_of(size.bytes() as u64) {
            return Err(DeviceError::BadAccess {
                space,
                offset,
                size: size.bytes(),
            });
        }
        if offset < 4 {
            // Only dword writes set the address; Linux's type-1 probe also
            // writes a byte to 0xCFB, which is not an address write.
            if size == AccessSize::B4 {
                self.address = data as u32 & 0x80ff_fffc;
            }
            return Ok(());
        }
        if let Some((dev, func, reg)) = self.target() {
            let shift = 8 * (offset - 4);
            let mask = (size.mask() << shift) as u32;
            self.write_dword(dev, func, reg, (data << shift) as u32, mask);
        }
        Ok(())
    }

    fn snapshot(&self) -> Snapshot {
        let mut vals = vec![u64::from(self.address)];
        for (c, b) in &self.state {
            vals.push(u64::from(*c) | (u64::from(*b) << 16));
        }
        Snapshot {
            kind: KIND.into(),
            version: VERSION,
            data: write_u64s(&vals),
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError> {
        let data = snap.expect(KIND, VERSION)?;
        if data.len() != 8 * (1 + self.state.len()) {
            return Err(SnapshotError::Corrupt {
                kind: KIND,
                why: "function count differs",
            });
        }
        let [address] = read_u64s::<1>(KIND, &data[..8])?;
        let mut state = Vec::new();
        for c in data[8..].chunks_exact(8) {
            let [v] = read_u64s::<1>(KIND, c)?;
            state.push((v as u16, (v >> 16) as u32));
        }
        self.address = address as u32;
        self.state = state;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> PciHost {
        PciHost::new(vec![PciFunction::virtio_blk(1, 0xc000, 0x40, 5)])
    }

    fn cfg_read(h: &mut PciHost, dev: u8, reg: u8, size: AccessSize) -> u64 {
        let addr = ENABLE | (u32::from(dev) << 11) | u32::from(reg & 0xfc);
        h.write(Space::Pio, 0, AccessSize::B4, u64::from(addr))
            .unwrap();
        h.read(Space::Pio, 4 + u64::from(reg & 3), size).unwrap()
    }

    fn cfg_write(h: &mut PciHost, dev: u8, reg: u8, size: AccessSize, v: u64) {
        let addr = ENABLE | (u32::from(dev) << 11) | u32::from(reg & 0xfc);
        h.write(Space::Pio, 0, AccessSize::B4, u64::from(addr))
            .unwrap();
        h.write(Space::Pio, 4 + u64::from(reg & 3), size, v)
            .unwrap();
    }

    #[test]
    fn linux_type1_probe_sees_the_mechanism_and_a_host_bridge() {
        let mut h = host();
        // pci_check_type1: byte to 0xCFB, then the address register reads
        // back what was written.
        h.write(Space::Pio, 3, AccessSize::B1, 1).unwrap();
        h.write(Space::Pio, 0, AccessSize::B4, 0x8000_0000).unwrap();
        assert_eq!(h.read(Space::Pio, 0, AccessSize::B4).unwrap(), 0x8000_0000);
        // pci_sanity_check: a host bridge class at 00:00.0.
        assert_eq!(cfg_read(&mut h, 0, 0x0a, AccessSize::B2), 0x0600);
        assert_eq!(cfg_read(&mut h, 0, 0x00, AccessSize::B2), 0x8086);
    }

    #[test]
    fn virtio_function_header() {
        let mut h = host();
        assert_eq!(cfg_read(&mut h, 1, 0x00, AccessSize::B4), 0x1001_1af4);
        assert_eq!(cfg_read(&mut h, 1, 0x02, AccessSize::B2), 0x1001);
        assert_eq!(
            cfg_read(&mut h, 1, 0x2e, AccessSize::B2),
            2,
            "subsystem = block"
        );
        assert_eq!(cfg_read(&mut h, 1, 0x0b, AccessSize::B1), 0x01, "class");
        assert_eq!(
            cfg_read(&mut h, 1, 0x3c, AccessSize::B1),
            5,
            "interrupt line"
        );
        assert_eq!(cfg_read(&mut h, 1, 0x3d, AccessSize::B1), 1, "INTA#");
        assert_eq!(cfg_read(&mut h, 1, 0x10, AccessSize::B4), 0xc001);
        // Absent devices and functions read all-ones.
        assert_eq!(cfg_read(&mut h, 7, 0x00, AccessSize::B4), 0xffff_ffff);
        // Disabled address: all-ones.
        h.write(Space::Pio, 0, AccessSize::B4, 0).unwrap();
        assert_eq!(h.read(Space::Pio, 4, AccessSize::B2).unwrap(), 0xffff);
    }

    #[test]
    fn bar_sizing_and_command_register() {
        let mut h = host();
        cfg_write(&mut h, 1, 0x10, AccessSize::B4, 0xffff_ffff);
        assert_eq!(
            cfg_read(&mut h, 1, 0x10, AccessSize::B4),
            0xffc1,
            "size 0x40"
        );
        cfg_write(&mut h, 1, 0x10, AccessSize::B4, 0xc000);
        assert_eq!(cfg_read(&mut h, 1, 0x10, AccessSize::B4), 0xc001);
        assert!(!h.io_enabled(1));
        cfg_write(&mut h, 1, 0x04, AccessSize::B2, 0x0007);
        assert!(h.io_enabled(1));
        assert_eq!(cfg_read(&mut h, 1, 0x04, AccessSize::B2), 1);
    }

    #[test]
    fn snapshot_round_trip_and_bad_input() {
        let mut h = host();
        cfg_write(&mut h, 1, 0x04, AccessSize::B2, 1);
        let s = h.snapshot();
        let mut g = host();
        g.restore(&s).unwrap();
        assert!(g.io_enabled(1));
        let bad = Snapshot {
            kind: KIND.into(),
            version: VERSION,
            data: vec![0; 3],
        };
        assert!(g.restore(&bad).is_err());
        assert!(g.io_enabled(1), "state unchanged on error");
        assert!(g.read(Space::Mmio, 0, AccessSize::B4).is_err());
        assert!(g.read(Space::Pio, 9, AccessSize::B1).is_err());
        assert!(
            g.write(Space::Pio, 5, AccessSize::B4, 0).is_err(),
            "misaligned"
        );
    }
}
