//! The devplane wire contract.
//!
//! This crate owns everything that crosses a boundary between devplane's
//! components: the UDP datagram layout that carries port-I/O and MMIO
//! requests, their responses, device-initiated interrupts and
//! acknowledgements ([`header`], [`record`], [`datagram`]); the Ethernet /
//! IPv4 / UDP frame layouts the XDP program and the AF_XDP workers parse and
//! rewrite ([`frame`]); and the names and key/value types of the eBPF maps
//! shared by the XDP program, the data plane and the control plane
//! ([`maps`]). It is `no_std`, allocation-free and little-endian at fixed
//! offsets, so the eBPF program (built for `bpfel-unknown-none`) uses the
//! very same types. Parsing never panics: every malformed input is a
//! [`WireError`].
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
extern crate std;

pub mod bulk;
#[cfg(feature = "std")]
pub mod bulk_state;
pub mod datagram;
pub mod error;
pub mod frame;
pub mod header;
pub mod maps;
pub mod record;
#[cfg(feature = "tag")]
pub mod tag;

pub use datagram::{Datagram, DatagramWriter};
pub use error::WireError;
pub use header::{Header, Kind};
pub use record::{
    Access, AccessSize, Ack, Interrupt, IrqAction, RawRecord, Record, Request, RequestId, Response,
    Status,
};

/// First two bytes of every devplane UDP payload: `"DP"`.
pub const MAGIC: u16 = u16::from_le_bytes(*b"DP");
/// The wire format version this crate speaks. 2: datagrams of 512 bytes
/// or more are tagged with POLYVAL then AES (module `tag`); version 1 tagged
/// every datagram with SipHash-2-4, so a peer of the other version is
/// refused whole (`drop_bad_version` at the XDP program,
/// `UnsupportedVersion` in the parsers) rather than its long datagrams
/// failing their tags.
pub const VERSION: u8 = 2;
/// The UDP port servers listen on unless configured otherwise.
pub const DEFAULT_PORT: u16 = 7700;
/// Largest UDP payload devplane sends: a 1500-byte MTU minus IPv4 and UDP
/// headers, so that no datagram is ever fragmented.
pub const MAX_DATAGRAM: usize = 1472;
/// Size of the datagram header in bytes.
pub const HEADER_LEN: usize = core::mem::size_of::<Header>();
/// Size of one record in bytes.
pub const RECORD_LEN: usize = core::mem::size_of::<RawRecord>();
/// Size of the keyed tag that ends a datagram with
/// [`header::HDR_TAG`].
pub const TAG_LEN: usize = 16;
/// Most records that fit one [`MAX_DATAGRAM`]-sized datagram with its tag.
pub const MAX_RECORDS: usize = (MAX_DATAGRAM - HEADER_LEN - TAG_LEN) / RECORD_LEN;

const _: () = assert!(HEADER_LEN == 24);
const _: () = assert!(RECORD_LEN == 40);
const _: () = assert!(MAX_RECORDS == 35);

/// Where a sender's sequence numbers start: the wall clock in nanoseconds
/// (1 if the clock is before 1970). A receiver drops what carries a number
/// it has seen (a retransmission): a sender that starts again (a VMM
/// restarted with the same VM ids, a model built again on a restarted
/// server) must number above its predecessor, which sent fewer than one
/// record per nanosecond. It fits a `u64` until the year 2262. The clients'
/// per-vCPU request numbers and the servers' per-model interrupt numbers
/// both start here.
#[cfg(feature = "std")]
pub fn first_seq() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}
