//! devplane's control plane (the slow path).
//!
//! This crate owns the identifier database — client platforms,
//! hypervisors, VMs, vCPUs, device models, servers — as the single source
//! of truth, persisted with atomic writes, and its mirror in the pinned
//! eBPF maps that the data plane reads; the lifecycle operations (register,
//! move, suspend, migrate) and the `dpctl` CLI that drives them. Nothing
//! here is on the per-request path.
#![deny(missing_docs)]

pub mod config;
pub mod console;
pub mod db;
pub mod handover;
pub mod maps;
pub mod poll;
pub mod proto;
pub mod socket;
pub mod store;

pub use config::{ConfigError, Mode, ServerConfig};
pub use db::{Change, Db, DbError, ServerSettings, commit_and_sync, repair, restore};
pub use maps::{AyaMaps, MapSyncError, MapWriter, MemMaps, SyncReport, sync};
