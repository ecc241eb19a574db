//! Why a blockstore could not be opened or used.

use super::*;

/// Why a block store could not be opened. The message leaves the file's
/// path to the caller, which names it (see [`BlockstoreError::path`]).
#[derive(Debug, thiserror::Error)]
pub enum BlockstoreError {
    /// The file could not be opened, created or sized.
    #[error(
        "cannot open or create it: {source} \
         (check that the directory exists and the server may write there)"
    )]
    Open {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
    /// The file holds not even one sector.
    #[error(
        "it is {len} bytes, less than one {SECTOR_SIZE}-byte sector: \
         give it a size (truncate -s 64M) or remove it to have one created"
    )]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: u64,
    },
    /// A restored snapshot's disk image changed size since.
    #[error(
        "it holds {len} bytes but the snapshot's disk held {expected}: \
         restore onto the same image the model was using"
    )]
    SizeChanged {
        /// The file.
        path: PathBuf,
        /// Its capacity now.
        len: u64,
        /// The capacity in the snapshot.
        expected: u64,
    },
    /// No io_uring instance could be set up.
    #[error(
        "cannot set up io_uring: {source} \
         (is io_uring disabled by the kernel.io_uring_disabled sysctl or a seccomp filter?)"
    )]
    Ring {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: io::Error,
    },
}

impl BlockstoreError {
    /// The disk image concerned.
    pub fn path(&self) -> &Path {
        match self {
            BlockstoreError::Open { path, .. }
            | BlockstoreError::TooSmall { path, .. }
            | BlockstoreError::SizeChanged { path, .. }
            | BlockstoreError::Ring { path, .. } => path,
        }
    }
}
