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

pub mod counter;
pub mod model;
pub mod null;
pub mod registry;
pub mod snapshot;

pub use model::{DeviceError, DeviceModel, IrqEvent, Space};
pub use snapshot::{Snapshot, SnapshotError};
