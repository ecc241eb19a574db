//! The typed error returned for every malformed or unencodable input.

/// Why a datagram could not be parsed or encoded.
///
/// `index` fields name the offending record, counted from 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer is shorter than the datagram header.
    #[error("datagram too short: {have} bytes, the header needs {need}")]
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// The first two bytes are not [`crate::MAGIC`].
    #[error("bad magic {0:#06x}: not a devplane datagram")]
    BadMagic(u16),
    /// The version byte names a version this build does not speak.
    #[error("unsupported wire version {0} (this build speaks {v})", v = crate::VERSION)]
    UnsupportedVersion(u8),
    /// The kind byte is not a known [`crate::Kind`].
    #[error("unknown datagram kind {0}")]
    UnknownKind(u8),
    /// The header has a flag this version does not define.
    #[error("unknown header flags {0:#06x}")]
    UnknownHeaderFlags(u16),
    /// The header's reserved word is set without a flag that uses it.
    #[error("header reserved word is {0:#x}, must be zero")]
    NonZeroReserved(u32),
    /// The interrupt-port flag on a datagram that is not a request, or
    /// with a port that is not 1..=65535.
    #[error("interrupt port {port} in a {kind:?} datagram (requests only, 1..=65535)")]
    BadIrqPort {
        /// The datagram kind.
        kind: crate::Kind,
        /// The port word.
        port: u32,
    },
    /// The header announces no records.
    #[error("datagram carries no records")]
    Empty,
    /// The header announces more records than any datagram may carry.
    #[error("record count {count} exceeds the maximum of {max}")]
    TooManyRecords {
        /// Announced count.
        count: usize,
        /// Largest allowed count.
        max: usize,
    },
    /// The announced records do not fit in the buffer.
    #[error("record count {count} needs {need} bytes but the datagram has {have}")]
    CountBeyondBuffer {
        /// Announced count.
        count: usize,
        /// Bytes the records need after the header.
        need: usize,
        /// Bytes present after the header.
        have: usize,
    },
    /// Bytes remain after the last announced record.
    #[error("{extra} bytes past the last record")]
    RecordsPastEnd {
        /// Number of unexpected bytes.
        extra: usize,
    },
    /// A record's op byte is unknown.
    #[error("record {index}: unknown op {op}")]
    UnknownOp {
        /// Record index.
        index: usize,
        /// The op byte.
        op: u8,
    },
    /// A record's op is not allowed in a datagram of this kind.
    #[error("record {index}: op {op} not allowed in a {kind:?} datagram")]
    OpNotAllowed {
        /// Record index.
        index: usize,
        /// The op byte.
        op: u8,
        /// The datagram kind.
        kind: crate::Kind,
    },
    /// An access size other than 1/2/4 (port I/O) or 1/2/4/8 (MMIO).
    #[error("record {index}: access size {size} not allowed")]
    BadSize {
        /// Record index.
        index: usize,
        /// The size byte.
        size: u8,
    },
    /// A port-I/O address above 0xffff.
    #[error("record {index}: port {port:#x} out of range")]
    BadPort {
        /// Record index.
        index: usize,
        /// The address field.
        port: u64,
    },
    /// Data bits set above the access size.
    #[error("record {index}: data {data:#x} wider than the access size {size}")]
    DataTooWide {
        /// Record index.
        index: usize,
        /// The data field.
        data: u64,
        /// The access size.
        size: u8,
    },
    /// Request flag bits this version does not define.
    #[error("record {index}: unknown flags {flags:#04x}")]
    BadFlags {
        /// Record index.
        index: usize,
        /// The flags byte.
        flags: u8,
    },
    /// An interrupt line above `u32::MAX`.
    #[error("record {index}: interrupt line {line:#x} out of range")]
    BadLine {
        /// Record index.
        index: usize,
        /// The address field.
        line: u64,
    },
    /// An unknown response status code.
    #[error("record {index}: unknown status {status}")]
    UnknownStatus {
        /// Record index.
        index: usize,
        /// The status byte.
        status: u8,
    },
    /// An unknown interrupt action code.
    #[error("record {index}: unknown interrupt action {action}")]
    UnknownIrqAction {
        /// Record index.
        index: usize,
        /// The action byte.
        action: u8,
    },
    /// A field the record's op does not use (or a reserved field) is not
    /// zero. Rejecting it keeps parsing exact: an accepted record re-encodes
    /// to the very bytes received.
    #[error("record {index}: field {field} is {value:#x}, must be zero")]
    NonZeroField {
        /// Record index.
        index: usize,
        /// The field's name in [`crate::RawRecord`].
        field: &'static str,
        /// The field's value.
        value: u64,
    },
    /// Encoding: the output buffer cannot hold even the header.
    #[error("output buffer of {have} bytes cannot hold a datagram header")]
    BufferTooSmall {
        /// Bytes available.
        have: usize,
    },
    /// Encoding: the datagram is full (buffer or [`crate::MAX_DATAGRAM`]).
    #[error("datagram full")]
    Full,
}
