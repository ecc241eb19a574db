//! Versioned snapshots of a model's whole state.

/// A model's state: its kind, the layout version and the encoded bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The model kind that wrote it.
    pub kind: String,
    /// Layout version of `data` for that kind.
    pub version: u32,
    /// The encoded state.
    pub data: Vec<u8>,
}

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Written by another kind of model.
    #[error("snapshot of a {found} model cannot restore a {expected} model")]
    WrongKind {
        /// The kind restoring.
        expected: &'static str,
        /// The kind in the snapshot.
        found: String,
    },
    /// A layout version this build cannot read.
    #[error("{kind} snapshot version {found} not supported (this build reads {supported})")]
    UnsupportedVersion {
        /// The kind.
        kind: &'static str,
        /// Version found.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// The bytes do not decode.
    #[error("{kind} snapshot is corrupt: {why}")]
    Corrupt {
        /// The kind.
        kind: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

impl Snapshot {
    /// Checks kind and version before decoding.
    pub fn expect(&self, kind: &'static str, version: u32) -> Result<&[u8], SnapshotError> {
        if self.kind != kind {
            return Err(SnapshotError::WrongKind {
                expected: kind,
                found: self.kind.clone(),
            });
        }
        if self.version != version {
            return Err(SnapshotError::UnsupportedVersion {
                kind,
                found: self.version,
                supported: version,
            });
        }
        Ok(&self.data)
    }
}

/// Reads little-endian `u64`s from `data`, which must hold exactly `N`.
pub fn read_u64s<const N: usize>(
    kind: &'static str,
    data: &[u8],
) -> Result<[u64; N], SnapshotError> {
    if data.len() != N * 8 {
        return Err(SnapshotError::Corrupt {
            kind,
            why: "wrong length",
        });
    }
    let mut out = [0u64; N];
    for (o, c) in out.iter_mut().zip(data.chunks_exact(8)) {
        let mut b = [0u8; 8];
        b.copy_from_slice(c);
        *o = u64::from_le_bytes(b);
    }
    Ok(out)
}

/// Encodes `u64`s little-endian.
pub fn write_u64s(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}
