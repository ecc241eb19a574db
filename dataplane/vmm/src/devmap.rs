//! A VM's device map: which device decodes each port or MMIO range, sorted
//! for lookup and checked (no empty, wrapping or overlapping range). The
//! map is generic over what a range leads to: a vCPU's [`Bus`](crate::bus::Bus)
//! holds the devices themselves; configuration checks map `()`.

use devplane_devmodels::Space;

/// One mapped range.
#[derive(Clone)]
pub struct Mapping<D> {
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
    /// The device that decodes it.
    pub device: D,
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
#[derive(Clone)]
pub struct DeviceMap<D> {
    entries: Vec<Mapping<D>>,
}

impl<D> Default for DeviceMap<D> {
    fn default() -> Self {
        DeviceMap {
            entries: Vec::new(),
        }
    }
}

fn space_key(s: Space) -> u8 {
    match s {
        Space::Pio => 0,
        Space::Mmio => 1,
    }
}

impl<D> DeviceMap<D> {
    /// Builds and checks a map (no empty, wrapping or overlapping ranges).
    pub fn new(mut entries: Vec<Mapping<D>>) -> Result<DeviceMap<D>, DevMapError> {
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

    /// The index of the mapping that decodes `addr` in `space`.
    fn find(&self, space: Space, addr: u64) -> Option<usize> {
        let k = space_key(space);
        let idx = self
            .entries
            .partition_point(|e| (space_key(e.space), e.base) <= (k, addr))
            .checked_sub(1)?;
        let e = &self.entries[idx];
        (e.space == space && addr - e.base < e.len).then_some(idx)
    }

    /// The mapping that decodes `addr` in `space`.
    pub fn lookup(&self, space: Space, addr: u64) -> Option<&Mapping<D>> {
        let i = self.find(space, addr)?;
        Some(&self.entries[i])
    }

    /// The mapping that decodes `addr` in `space`, to use its device.
    pub fn lookup_mut(&mut self, space: Space, addr: u64) -> Option<&mut Mapping<D>> {
        let i = self.find(space, addr)?;
        Some(&mut self.entries[i])
    }

    /// All mappings.
    pub fn entries(&self) -> &[Mapping<D>] {
        &self.entries
    }

    /// All mappings, sorted by space and base.
    pub fn into_entries(self) -> Vec<Mapping<D>> {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(space: Space, base: u64, len: u64, model: u32) -> Mapping<()> {
        Mapping {
            space,
            base,
            len,
            model,
            posted: false,
            device: (),
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
