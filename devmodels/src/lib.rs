//! devplane's device models.
//!
//! This crate owns the emulated devices a guest talks to — whether they run
//! remotely on a server worker or locally in a client vCPU thread — behind
//! one `DeviceModel` trait (port and MMIO read/write, a tick for
//! time-driven models, snapshot/restore of the whole state so a model can
//! move between workers and servers). Each model is owned by exactly one
//! thread; the trait needs no locks. The models arrive with the server and
//! Linux-guest issues.
#![deny(missing_docs)]
