//! The server's errors.

use std::path::PathBuf;

use devplane_devmodels::registry;

use crate::xdp::XdpError;

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration cannot be served.
    #[error("configuration: {0}")]
    Config(String),
    /// A device model could not be built.
    #[error("device model {id}: {source}")]
    Model {
        /// Model id.
        id: u32,
        /// Why.
        source: registry::BuildError,
    },
    /// The XDP program could not be loaded, attached or updated.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// Writing the configuration into the maps failed.
    #[error("writing the eBPF maps: {0}")]
    MapSync(#[from] devplane_control::maps::MapSyncError),
    /// bpffs or pinning failed.
    #[error("pinning maps under {path}: {source}")]
    Pin {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An AF_XDP step failed.
    #[error("AF_XDP: {what}: {source}")]
    AfXdp {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A UDP socket step failed (socket mode).
    #[error("UDP socket: {what}: {source}")]
    Socket {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("starting worker {index}: {source}")]
    Thread {
        /// Worker index.
        index: usize,
        /// Why.
        source: std::io::Error,
    },
    /// The console thread could not start.
    #[error("starting the console thread: {0}")]
    Console(std::io::Error),
}
