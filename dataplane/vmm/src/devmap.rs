//! A VM's device map: which device model decodes each port or MMIO range,
//! and where it runs — locally in the vCPU thread (the patent's
//! frequently-used models kept on the client) or remotely on a server.

use std::sync::{Arc, Mutex};

use devplane_devmodels::{DeviceModel, Space};

use super::virtio::blk::VirtioBlk;

/// Where a mapped model runs.
#[derive(Clone)]
pub enum Placement {
    /// In the vCPU thread; shared by the VM's vCPUs behind a mutex
    /// (uncontended unless two vCPUs hit the same local device at once).
    Local(Arc<Mutex<Box<dyn DeviceModel>>>),
    /// On a server: index into the VM's remote-model table (the engine's
    /// `VcpuPort::models`).
    Remote(u32),
    /// A virtio block device served in the vCPU thread (it reaches guest
    /// memory); its disk is a `blockstore` model at `store`.
    VirtioBlk {
        /// The device, shared by the VM's vCPUs.
        dev: Arc<Mutex<VirtioBlk>>,
        /// Where its disk is.
        store: StoreAt,
    },
}

/// Where a virtio block device's `blockstore` model runs.
#[derive(Clone)]
pub enum StoreAt {
    /// In this process.
    Local(Arc<Mutex<Box<dyn DeviceModel>>>),
    /// Remote, mapped in the same device map as MMIO at `base`.
    Remote {
        /// The MMIO base of the store's mapping.
        base: u64,
    },
}

/// One mapped range.
#[derive(Clone)]
pub struct Mapping {
    /// Port or MMIO.
    pub space: Space,
    /// First address.
    pub base: u64,
    /// Length in bytes (ports or bytes of MMIO).
    pub len: u64,
    /// Device-model id.
    pub model: u32,
    /// Writes are posted (do not wait for the answer).
    pub posted: bool,
    /// Where it runs.
    pub placement: Placement,
}

/// Why a device map is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DevMapError {
    /// Two ranges overlap.
    #[error("{space:?} range {base:#x}+{len:#x} of model {model} overlaps model {other}")]
    Overlap {
        /// Space.
        space: Space,
        /// Base of the second range.
        base: u64,
        /// Its length.
        len: u64,
        /// Its model.
        model: u32,
        /// The model it overlaps.
        other: u32,
    },
    /// A range is empty or wraps around.
    #[error("{space:?} range {base:#x}+{len:#x} of model {model} is empty or wraps")]
    BadRange {
        /// Space.
        space: Space,
        /// Base.
        base: u64,
        /// Length.
        len: u64,
        /// Model.
        model: u32,
    },
}

/// The device map of one VM, sorted for lookup.
#[derive(Clone, Default)]
pub struct DeviceMap {
    entries: Vec<Mapping>,
}

fn space_key(s: Space) -> u8 {
    match s {
        Space::Pio => 0,
        Space::Mmio => 1,
    }
}

impl DeviceMap {
    /// Builds and checks a map (no empty, wrapping or overlapping ranges).
    pub fn new(mut entries: Vec<Mapping>) -> Result<DeviceMap, DevMapError> {
        for e in &entries {
            if e.len == 0 || e.base.checked_add(e.len - 1).is_none() {
                return Err(DevMapError::BadRange {
                    space: e.space,
                    base: e.base,
                    len: e.len,
                    model: e.model,
                });
            }
        }
        entries.sort_by_key(|e| (space_key(e.space), e.base));
        for w in entries.windows(2) {
            if w[0].space == w[1].space && w[0].base + (w[0].len - 1) >= w[1].base {
                return Err(DevMapError::Overlap {
                    space: w[1].space,
                    base: w[1].base,
                    len: w[1].len,
                    model: w[1].model,
                    other: w[0].model,
                });
            }
        }
        Ok(DeviceMap { entries })
    }

    /// The mapping that decodes `addr` in `space`.
    pub fn lookup(&self, space: Space, addr: u64) -> Option<&Mapping> {
        let k = space_key(space);
        let idx = self
            .entries
            .partition_point(|e| (space_key(e.space), e.base) <= (k, addr));
        let e = self.entries.get(idx.checked_sub(1)?)?;
        (e.space == space && addr - e.base < e.len).then_some(e)
    }

    /// All mappings.
    pub fn entries(&self) -> &[Mapping] {
        &self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(space: Space, base: u64, len: u64, model: u32) -> Mapping {
        Mapping {
            space,
            base,
            len,
            model,
            posted: false,
            placement: Placement::Remote(0),
        }
    }

    #[test]
    fn lookup_finds_the_covering_range_only() {
        let d = DeviceMap::new(vec![
            m(Space::Pio, 0x3f8, 8, 1),
            m(Space::Mmio, 0xd0000, 0x1000, 2),
            m(Space::Pio, 0x70, 2, 3),
        ])
        .unwrap();
        assert_eq!(d.lookup(Space::Pio, 0x3f8).unwrap().model, 1);
        assert_eq!(d.lookup(Space::Pio, 0x3ff).unwrap().model, 1);
        assert!(d.lookup(Space::Pio, 0x400).is_none());
        assert!(d.lookup(Space::Pio, 0x3f7).is_none());
        assert_eq!(d.lookup(Space::Pio, 0x71).unwrap().model, 3);
        assert!(
            d.lookup(Space::Pio, 0xd0000).is_none(),
            "spaces are separate"
        );
        assert_eq!(d.lookup(Space::Mmio, 0xd0fff).unwrap().model, 2);
        assert!(d.lookup(Space::Mmio, 0).is_none());
    }

    #[test]
    fn overlaps_and_bad_ranges_are_refused() {
        let e = DeviceMap::new(vec![m(Space::Pio, 0x10, 8, 1), m(Space::Pio, 0x17, 1, 2)]);
        assert!(matches!(
            e,
            Err(DevMapError::Overlap {
                model: 2,
                other: 1,
                ..
            })
        ));
        assert!(DeviceMap::new(vec![m(Space::Pio, 0x10, 0, 1)]).is_err());
        assert!(DeviceMap::new(vec![m(Space::Mmio, u64::MAX, 2, 1)]).is_err());
        assert!(DeviceMap::new(vec![m(Space::Mmio, u64::MAX, 1, 1)]).is_ok());
    }
}
