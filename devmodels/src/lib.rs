//! devplane's device models.
//!
//! This crate owns the emulated devices a guest talks to — whether they run
//! remotely on a server worker or locally in a client vCPU thread — behind
//! one [`DeviceModel`] trait: port and MMIO read/write, a tick for
//! time-driven models, interrupts raised by the model, and a versioned
//! snapshot/restore of the whole state so that a model can move between
//! workers and servers. Each model is owned by exactly one thread, so the
//! trait takes `&mut self` and needs no locks.
#![deny(missing_docs)]

pub mod blockio;
pub mod blockstore;
pub mod cmos;
pub mod counter;
pub mod i8042;
pub mod model;
pub mod null;
pub mod registry;
pub mod snapshot;
pub mod uart;

pub use model::{
    ConsolePort, DeviceError, DeviceModel, IrqEvent, ModelEvent, READY_WAIT, Space, wait_ready,
};
pub use snapshot::{Snapshot, SnapshotError};

/// Variable-length snapshot encoding shared by the models whose state is
/// more than a few `u64`s: little-endian integers and length-prefixed byte
/// strings, decoded with every length checked (a snapshot may come from
/// another server, so it is untrusted input).
pub(crate) mod codec {
    use crate::SnapshotError;

    /// Appends fields to a snapshot's bytes.
    #[derive(Debug, Default)]
    pub(crate) struct Encoder(Vec<u8>);

    impl Encoder {
        /// An empty encoding.
        pub(crate) fn new() -> Encoder {
            Encoder::default()
        }

        /// One byte.
        pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
            self.0.push(v);
            self
        }

        /// A `u32`, little-endian.
        pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }

        /// A `u64`, little-endian.
        pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
            self.0.extend_from_slice(&v.to_le_bytes());
            self
        }

        /// A byte string, prefixed by its length as a `u64`.
        pub(crate) fn bytes(&mut self, v: &[u8]) -> &mut Self {
            self.u64(v.len() as u64);
            self.0.extend_from_slice(v);
            self
        }

        /// The encoded bytes.
        pub(crate) fn finish(&mut self) -> Vec<u8> {
            std::mem::take(&mut self.0)
        }
    }

    /// Reads fields back, failing with [`SnapshotError::Corrupt`] on any
    /// truncation or trailing garbage.
    #[derive(Debug)]
    pub(crate) struct Decoder<'a> {
        kind: &'static str,
        data: &'a [u8],
    }

    impl<'a> Decoder<'a> {
        /// Decodes `data`, a snapshot of a `kind` model.
        pub(crate) fn new(kind: &'static str, data: &'a [u8]) -> Decoder<'a> {
            Decoder { kind, data }
        }

        /// A corruption error for this kind.
        pub(crate) fn corrupt(&self, why: &'static str) -> SnapshotError {
            SnapshotError::Corrupt {
                kind: self.kind,
                why,
            }
        }

        fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
            if self.data.len() < n {
                return Err(self.corrupt("truncated"));
            }
            let (head, rest) = self.data.split_at(n);
            self.data = rest;
            Ok(head)
        }

        fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
            let mut out = [0u8; N];
            out.copy_from_slice(self.take(N)?);
            Ok(out)
        }

        /// One byte.
        pub(crate) fn u8(&mut self) -> Result<u8, SnapshotError> {
            Ok(self.array::<1>()?[0])
        }

        /// A `u32`.
        pub(crate) fn u32(&mut self) -> Result<u32, SnapshotError> {
            Ok(u32::from_le_bytes(self.array()?))
        }

        /// A `u64`.
        pub(crate) fn u64(&mut self) -> Result<u64, SnapshotError> {
            Ok(u64::from_le_bytes(self.array()?))
        }

        /// A length-prefixed byte string of at most `max` bytes.
        pub(crate) fn bytes(&mut self, max: usize) -> Result<&'a [u8], SnapshotError> {
            let len = self.u64()?;
            match usize::try_from(len) {
                Ok(len) if len <= max => self.take(len),
                _ => Err(self.corrupt("byte string too long")),
            }
        }

        /// Checks that every byte was consumed.
        pub(crate) fn finish(self) -> Result<(), SnapshotError> {
            if self.data.is_empty() {
                Ok(())
            } else {
                Err(self.corrupt("trailing bytes"))
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn round_trips_and_rejects_truncation() {
            let data = Encoder::new().u8(1).u32(2).u64(3).bytes(b"abc").finish();
            let mut d = Decoder::new("t", &data);
            assert_eq!(d.u8().unwrap(), 1);
            assert_eq!(d.u32().unwrap(), 2);
            assert_eq!(d.u64().unwrap(), 3);
            assert_eq!(d.bytes(3).unwrap(), b"abc");
            d.finish().unwrap();

            let mut d = Decoder::new("t", &data[..data.len() - 1]);
            d.u8().unwrap();
            d.u32().unwrap();
            d.u64().unwrap();
            assert!(d.bytes(3).is_err());
            let mut d = Decoder::new("t", &data);
            d.u8().unwrap();
            d.u32().unwrap();
            d.u64().unwrap();
            assert!(d.bytes(2).is_err(), "a longer string than allowed");
            assert!(Decoder::new("t", &data).finish().is_err());
        }
    }
}
