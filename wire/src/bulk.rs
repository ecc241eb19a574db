//! Bulk block datagrams: block requests and their answers, carrying data.
//!
//! A port-I/O or MMIO record moves at most 8 bytes; a disk moves 4 KiB to
//! 128 KiB per request. A bulk datagram is the usual 24-byte [`Header`]
//! (kind [`KIND_BLOCK_REQUEST`] or [`KIND_BLOCK_ANSWER`], `count` 1, the
//! usual flags and tag) followed by one 40-byte [`BlockRecord`] and up to
//! [`SEG_DATA`] bytes of data, then the tag if the header has one:
//!
//! ```text
//! header (24) | block record (40) | data (0..=1392) | tag (16, optional)
//! ```
//!
//! 24 + 40 + 1392 + 16 = 1472 bytes: a bulk datagram with a tag fills a
//! 1500-byte MTU exactly and never fragments. A request's data (a write)
//! or an answer's data (a read) longer than [`SEG_DATA`] travels in
//! `nseg` datagrams, segment `seg` carrying bytes `seg * SEG_DATA ..`;
//! the receiver reassembles them by (client, VM, request id) with a
//! bitmap of the segments it holds ([`crate::bulk_state`]).
//!
//! The block record keeps the VM id at offset 8, where a request record
//! has it, so the XDP program's ownership check (the first record's VM
//! belongs to the header's client) applies unchanged, and the model id
//! stays at offset 4 of the header, so steering is unchanged too.
//!
//! | offset | field | request | answer |
//! | --- | --- | --- | --- |
//! | 0 | op u8 | [`BlockOp`] | echoed |
//! | 1 | version u8 | [`BULK_VERSION`] | [`BULK_VERSION`] |
//! | 2 | status u8 | 0 | [`BlockStatus`] |
//! | 3 | flags u8 | [`BF_RETRANSMIT`], [`BF_PROBE`] | 0 |
//! | 4 | queue u16 | virtio queue | echoed |
//! | 6 | seg u16 | segment index | segment index |
//! | 8 | vm u32 | VM id | VM id |
//! | 12 | hypervisor u32 | hypervisor id | hypervisor id |
//! | 16 | id u64 | request id (per VM, rising) | echoed |
//! | 24 | sector u64 | first 512-byte sector | echoed |
//! | 32 | len u32 | bytes read or written | echoed |
//! | 36 | dlen u16 | data bytes in this datagram | data bytes in this datagram |
//! | 38 | nseg u16 | segments of the data | segments of the data |

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::header::{HDR_TAG, tag_len};
use crate::{HEADER_LEN, Header, MAX_DATAGRAM, TAG_LEN};

/// Header kind byte: a block request (client -> server).
pub const KIND_BLOCK_REQUEST: u8 = 5;
/// Header kind byte: a block answer (server -> client).
pub const KIND_BLOCK_ANSWER: u8 = 6;
/// The bulk record layout's version ([`BlockRecord::version`]).
pub const BULK_VERSION: u8 = 1;
/// Size of a block record.
pub const BLOCK_RECORD_LEN: usize = 40;
/// Most data bytes one bulk datagram carries: a tagged datagram of that
/// much data is exactly [`MAX_DATAGRAM`] bytes.
pub const SEG_DATA: usize = MAX_DATAGRAM - HEADER_LEN - BLOCK_RECORD_LEN - TAG_LEN;
/// Largest request (bytes read or written by one block request).
pub const MAX_BLOCK_LEN: u32 = 1 << 20;
/// Most segments of one request's data.
pub const MAX_SEGS: usize = (MAX_BLOCK_LEN as usize).div_ceil(SEG_DATA);
/// Sector size of block requests.
pub const SECTOR: u64 = 512;
/// Smallest bulk datagram: a header and a block record.
pub const MIN_BULK: usize = HEADER_LEN + BLOCK_RECORD_LEN;

const _: () = assert!(SEG_DATA == 1392);
const _: () = assert!(MAX_SEGS <= u16::MAX as usize);

/// Request flag: sent again after a timeout.
pub const BF_RETRANSMIT: u8 = 1;
/// Request flag: a probe of a write's progress (the server answers with
/// [`BlockStatus::Partial`] and a bitmap of the segments it holds, or
/// with the final answer if the write completed); its data is empty.
/// On a read, the data is the bitmap of answer segments still missing
/// at the client, which the server sends again.
pub const BF_PROBE: u8 = 2;
const REQUEST_FLAGS: u8 = BF_RETRANSMIT | BF_PROBE;

/// What a block request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockOp {
    /// Read `len` bytes at `sector` (the answer carries them).
    Read = 1,
    /// Write the request's `len` bytes at `sector`.
    Write = 2,
    /// Make every completed write durable.
    Flush = 3,
    /// Discard `len` bytes at `sector` (they read as zeros afterwards).
    Discard = 4,
    /// Write `len` zero bytes at `sector` (no data on the wire).
    WriteZeroes = 5,
}

impl BlockOp {
    /// Decodes an op byte.
    pub const fn from_u8(v: u8) -> Option<BlockOp> {
        match v {
            1 => Some(BlockOp::Read),
            2 => Some(BlockOp::Write),
            3 => Some(BlockOp::Flush),
            4 => Some(BlockOp::Discard),
            5 => Some(BlockOp::WriteZeroes),
            _ => None,
        }
    }

    /// Whether the request carries data (a write).
    pub const fn request_has_data(self) -> bool {
        matches!(self, BlockOp::Write)
    }
}

/// Outcome of a block request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum BlockStatus {
    /// Done.
    Ok = 0,
    /// The disk failed the I/O.
    IoError = 1,
    /// The model does not do this op (or is no block device).
    Unsupported = 2,
    /// The server has no room for it now: send it again later.
    Busy = 3,
    /// Older than the server's exactly-once window: not applied.
    Stale = 4,
    /// A write in progress: the data is the bitmap of segments held.
    Partial = 5,
    /// The model is not served here.
    NoSuchModel = 6,
    /// Out of the disk's range, or a bad length.
    OutOfRange = 7,
}

impl BlockStatus {
    /// Decodes a status byte.
    pub const fn from_u8(v: u8) -> Option<BlockStatus> {
        match v {
            0 => Some(BlockStatus::Ok),
            1 => Some(BlockStatus::IoError),
            2 => Some(BlockStatus::Unsupported),
            3 => Some(BlockStatus::Busy),
            4 => Some(BlockStatus::Stale),
            5 => Some(BlockStatus::Partial),
            6 => Some(BlockStatus::NoSuchModel),
            7 => Some(BlockStatus::OutOfRange),
            _ => None,
        }
    }
}

/// The raw block record.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct BlockRecord {
    /// A [`BlockOp`] byte.
    pub op: u8,
    /// [`BULK_VERSION`].
    pub version: u8,
    /// A [`BlockStatus`] byte (answers).
    pub status: u8,
    /// `BF_*` bits (requests).
    pub flags: u8,
    /// The virtio queue.
    pub queue: U16,
    /// This datagram's segment index.
    pub seg: U16,
    /// VM id (at the offset a request record has it).
    pub vm: U32,
    /// Hypervisor id.
    pub hypervisor: U32,
    /// Request id.
    pub id: U64,
    /// First sector.
    pub sector: U64,
    /// Bytes the request reads or writes.
    pub len: U32,
    /// Data bytes in this datagram.
    pub dlen: U16,
    /// Segments of the data.
    pub nseg: U16,
}

const _: () = assert!(core::mem::size_of::<BlockRecord>() == BLOCK_RECORD_LEN);
const _: () = assert!(core::mem::offset_of!(BlockRecord, vm) == 8);

/// Why a bulk datagram was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BulkError {
    /// Shorter than a header and a block record (and its tag).
    Short,
    /// Longer than [`MAX_DATAGRAM`].
    TooLong,
    /// Not a bulk kind, bad magic or version.
    NotBulk,
    /// The header's count is not 1, or unknown header flags.
    BadHeader,
    /// The record's version is not [`BULK_VERSION`].
    BadVersion(u8),
    /// Unknown op.
    BadOp(u8),
    /// Unknown status, or a status on a request.
    BadStatus(u8),
    /// Unknown flags, or flags on an answer.
    BadFlags(u8),
    /// `len`, `dlen`, `seg` and `nseg` disagree with each other, the op or
    /// the datagram's length.
    BadLength,
}

/// Segments needed for `len` bytes of data (at least 1: an empty
/// request or answer is one datagram).
pub const fn segments(len: u32) -> u16 {
    let n = (len as usize).div_ceil(SEG_DATA);
    if n == 0 { 1 } else { n as u16 }
}

/// Bytes of data segment `seg` of `len` bytes carries.
pub const fn seg_len(len: u32, seg: u16) -> usize {
    let start = seg as usize * SEG_DATA;
    let len = len as usize;
    if start >= len {
        0
    } else if len - start < SEG_DATA {
        len - start
    } else {
        SEG_DATA
    }
}

/// Whether a payload of `payload_len` bytes with header `count` and
/// `flags` can be a bulk datagram (the XDP program's length check).
#[inline(always)]
pub const fn bulk_len_fits(count: usize, flags: u16, payload_len: usize) -> bool {
    count == 1 && payload_len >= MIN_BULK + tag_len(flags) && payload_len <= MAX_DATAGRAM
}

/// A parsed, validated bulk datagram.
#[derive(Debug, Clone, Copy)]
pub struct Bulk<'a> {
    /// Its header.
    pub header: &'a Header,
    /// Its record.
    pub rec: &'a BlockRecord,
    /// The op.
    pub op: BlockOp,
    /// The status (answers; `Ok` on requests).
    pub status: BlockStatus,
    /// Its data.
    pub data: &'a [u8],
    /// Whether it is a request (else an answer).
    pub request: bool,
}

impl<'a> Bulk<'a> {
    /// Parses a whole UDP payload as a bulk datagram. The tag, if any, is
    /// not verified here (`crate::tag::verify`).
    pub fn parse(buf: &'a [u8]) -> Result<Bulk<'a>, BulkError> {
        if buf.len() > MAX_DATAGRAM {
            return Err(BulkError::TooLong);
        }
        let (header, rest) = Header::ref_from_prefix(buf).map_err(|_| BulkError::Short)?;
        if !header.magic_ok() || !header.version_ok() {
            return Err(BulkError::NotBulk);
        }
        let request = match header.kind {
            KIND_BLOCK_REQUEST => true,
            KIND_BLOCK_ANSWER => false,
            _ => return Err(BulkError::NotBulk),
        };
        let flags = header.flags.get();
        if header.count.get() != 1
            || flags & !(HDR_TAG | 0xff00) != 0
            || (flags & HDR_TAG == 0 && flags != 0)
            || header.reserved.get() != 0
        {
            return Err(BulkError::BadHeader);
        }
        let tag = tag_len(flags);
        let body_len = rest.len().checked_sub(tag).ok_or(BulkError::Short)?;
        let (rec, data) =
            BlockRecord::ref_from_prefix(&rest[..body_len]).map_err(|_| BulkError::Short)?;
        if rec.version != BULK_VERSION {
            return Err(BulkError::BadVersion(rec.version));
        }
        let op = BlockOp::from_u8(rec.op).ok_or(BulkError::BadOp(rec.op))?;
        let status = if request {
            if rec.status != 0 {
                return Err(BulkError::BadStatus(rec.status));
            }
            if rec.flags & !REQUEST_FLAGS != 0 {
                return Err(BulkError::BadFlags(rec.flags));
            }
            BlockStatus::Ok
        } else {
            if rec.flags != 0 {
                return Err(BulkError::BadFlags(rec.flags));
            }
            BlockStatus::from_u8(rec.status).ok_or(BulkError::BadStatus(rec.status))?
        };
        let d = Bulk {
            header,
            rec,
            op,
            status,
            data,
            request,
        };
        d.check_lengths()?;
        Ok(d)
    }

    fn check_lengths(&self) -> Result<(), BulkError> {
        let r = self.rec;
        let (len, dlen, seg, nseg) = (r.len.get(), r.dlen.get(), r.seg.get(), r.nseg.get());
        if len > MAX_BLOCK_LEN || dlen as usize != self.data.len() || seg >= nseg {
            return Err(BulkError::BadLength);
        }
        // Partial answers and probes carry a bitmap, one datagram.
        let bitmap = (self.request && r.flags & BF_PROBE != 0)
            || (!self.request && self.status == BlockStatus::Partial);
        if bitmap {
            return if nseg == 1 && seg == 0 && self.data.len() <= MAX_SEGS.div_ceil(8) {
                Ok(())
            } else {
                Err(BulkError::BadLength)
            };
        }
        let carries = if self.request {
            self.op.request_has_data()
        } else {
            self.op == BlockOp::Read && self.status == BlockStatus::Ok
        };
        let (want_nseg, want_dlen) = if carries {
            (segments(len), seg_len(len, seg))
        } else {
            (1, 0)
        };
        if nseg != want_nseg || dlen as usize != want_dlen {
            return Err(BulkError::BadLength);
        }
        Ok(())
    }

    /// The request id.
    pub fn id(&self) -> u64 {
        self.rec.id.get()
    }

    /// The VM.
    pub fn vm(&self) -> u32 {
        self.rec.vm.get()
    }

    /// The segment index.
    pub fn seg(&self) -> u16 {
        self.rec.seg.get()
    }

    /// The model id in the header.
    pub fn model(&self) -> u32 {
        self.header.model.get()
    }

    /// The client id in the header.
    pub fn client(&self) -> u32 {
        self.header.client.get()
    }

    /// The key id of its tag, if tagged.
    pub fn key_id(&self) -> Option<u8> {
        self.header.key_id()
    }
}

/// Whether `buf` (a UDP payload) claims to be a bulk datagram (its kind
/// byte), before any other check.
pub fn is_bulk(buf: &[u8]) -> bool {
    buf.len() > crate::header::OFF_KIND
        && matches!(
            buf[crate::header::OFF_KIND],
            KIND_BLOCK_REQUEST | KIND_BLOCK_ANSWER
        )
}

/// The fields of one bulk datagram to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMsg {
    /// Op.
    pub op: BlockOp,
    /// Status (answers).
    pub status: BlockStatus,
    /// `BF_*` flags (requests).
    pub flags: u8,
    /// Queue.
    pub queue: u16,
    /// VM id.
    pub vm: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
    /// Request id.
    pub id: u64,
    /// First sector.
    pub sector: u64,
    /// Bytes the request reads or writes.
    pub len: u32,
}

/// Writes one bulk datagram into `buf`: `header` (its kind must be a
/// bulk kind; count and flags are set here, untagged), `msg`, segment
/// `seg` of `nseg`, and `data`. Returns its length (seal it with
/// `crate::tag::seal` to tag it), or `None` if `buf` is too small or
/// `data` longer than [`SEG_DATA`].
pub fn write(
    buf: &mut [u8],
    header: Header,
    msg: &BlockMsg,
    seg: u16,
    nseg: u16,
    data: &[u8],
) -> Option<usize> {
    if data.len() > SEG_DATA {
        return None;
    }
    let len = MIN_BULK + data.len();
    if buf.len() < len {
        return None;
    }
    let mut h = header;
    h.count = U16::new(1);
    h.flags = U16::new(0);
    h.reserved = U32::new(0);
    buf[..HEADER_LEN].copy_from_slice(h.as_bytes());
    let rec = BlockRecord {
        op: msg.op as u8,
        version: BULK_VERSION,
        status: msg.status as u8,
        flags: msg.flags,
        queue: U16::new(msg.queue),
        seg: U16::new(seg),
        vm: U32::new(msg.vm),
        hypervisor: U32::new(msg.hypervisor),
        id: U64::new(msg.id),
        sector: U64::new(msg.sector),
        len: U32::new(msg.len),
        dlen: U16::new(data.len() as u16),
        nseg: U16::new(nseg),
    };
    buf[HEADER_LEN..MIN_BULK].copy_from_slice(rec.as_bytes());
    buf[MIN_BULK..len].copy_from_slice(data);
    Some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Kind;

    fn hdr(kind: u8) -> Header {
        let mut h = Header::new(Kind::Request, 9, 1, 7);
        h.kind = kind;
        h
    }

    fn msg(op: BlockOp, len: u32) -> BlockMsg {
        BlockMsg {
            op,
            status: BlockStatus::Ok,
            flags: 0,
            queue: 0,
            vm: 3,
            hypervisor: 1,
            id: 42,
            sector: 8,
            len,
        }
    }

    #[cfg(feature = "tag")]
    #[test]
    fn a_full_tagged_segment_fills_the_mtu() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let data = [0xab; SEG_DATA];
        let m = msg(BlockOp::Write, 4096);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 3, &data).unwrap();
        let key = crate::tag::TagKey::new(1, [7; 16]);
        let n = crate::tag::seal(&mut buf, n, &key).unwrap();
        assert_eq!(n, MAX_DATAGRAM);
        let d = Bulk::parse(&buf[..n]).unwrap();
        assert!(d.request);
        assert_eq!((d.op, d.id(), d.vm(), d.seg()), (BlockOp::Write, 42, 3, 0));
        assert_eq!(d.data, &data[..]);
        assert_eq!(d.key_id(), Some(1));
        assert!(crate::tag::verify(&buf[..n], &crate::tag::KeyRing::new(key)).is_ok());
        assert!(bulk_len_fits(1, HDR_TAG | 0x100, n));
    }

    #[test]
    fn the_last_segment_carries_the_rest() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let m = msg(BlockOp::Write, 4096);
        assert_eq!(segments(4096), 3);
        assert_eq!(seg_len(4096, 2), 4096 - 2 * SEG_DATA);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 2, 3, &[1; 1312]).unwrap();
        assert!(Bulk::parse(&buf[..n]).is_ok());
        // A middle segment must be full.
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 1, 3, &[1; 1312]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
    }

    #[test]
    fn requests_and_answers_are_checked_field_by_field() {
        let mut buf = [0u8; MAX_DATAGRAM];
        // A read request carries no data; its answer does.
        let m = msg(BlockOp::Read, 512);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 1, &[]).unwrap();
        assert!(Bulk::parse(&buf[..n]).is_ok());
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 1, &[0; 512]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
        let n = write(&mut buf, hdr(KIND_BLOCK_ANSWER), &m, 0, 1, &[0; 512]).unwrap();
        assert!(!Bulk::parse(&buf[..n]).unwrap().request);
        // An error answer of a read carries nothing.
        let e = BlockMsg {
            status: BlockStatus::IoError,
            ..m
        };
        let n = write(&mut buf, hdr(KIND_BLOCK_ANSWER), &e, 0, 1, &[]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap().status, BlockStatus::IoError);
        // Unknown op, version, status, flags; a count other than 1.
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 1, &[]).unwrap();
        for (off, v, err) in [
            (HEADER_LEN, 9, BulkError::BadOp(9)),
            (HEADER_LEN + 1, 2, BulkError::BadVersion(2)),
            (HEADER_LEN + 2, 1, BulkError::BadStatus(1)),
            (HEADER_LEN + 3, 0x80, BulkError::BadFlags(0x80)),
            (crate::header::OFF_COUNT, 2, BulkError::BadHeader),
            (crate::header::OFF_KIND, 1, BulkError::NotBulk),
        ] {
            let mut b = buf;
            b[off] = v;
            assert_eq!(Bulk::parse(&b[..n]).unwrap_err(), err, "offset {off}");
        }
        assert_eq!(
            Bulk::parse(&buf[..MIN_BULK - 1]).unwrap_err(),
            BulkError::Short
        );
        // Too long a request.
        let big = msg(BlockOp::Read, MAX_BLOCK_LEN + 1);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &big, 0, 1, &[]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
    }

    #[test]
    fn probes_and_partial_answers_carry_a_bitmap() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let m = BlockMsg {
            flags: BF_PROBE,
            ..msg(BlockOp::Write, 128 << 10)
        };
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 1, &[0xff; 12]).unwrap();
        assert!(Bulk::parse(&buf[..n]).is_ok());
        let p = BlockMsg {
            flags: 0,
            status: BlockStatus::Partial,
            ..m
        };
        let n = write(&mut buf, hdr(KIND_BLOCK_ANSWER), &p, 0, 1, &[0xff; 12]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap().status, BlockStatus::Partial);
        let n = write(&mut buf, hdr(KIND_BLOCK_ANSWER), &p, 0, 1, &[0xff; 200]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
    }
}
