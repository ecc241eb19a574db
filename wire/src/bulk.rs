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
//! or an answer's data (a read) travels in `nseg` datagrams of
//! [`seg_size`]`(len, nseg)` = ceil(len / nseg) bytes each (the last one
//! the rest), segment `seg` carrying bytes `seg * seg_size ..`; the
//! receiver reassembles them by (client, VM, request id) with a bitmap of
//! the segments it holds ([`crate::bulk_state`]).
//!
//! **Jumbo frames.** The sender picks `nseg`, between
//! [`segments`]`(len)` (segments of at most [`SEG_DATA`], a 1500-byte MTU)
//! and [`segments_of`]`(len, SEG_DATA_MAX)` (segments of at most
//! [`SEG_DATA_MAX`], a [`JUMBO_MTU`] link): where the link has the larger
//! MTU a 128 KiB request is 39 datagrams instead of 95. The answer to a
//! read carries data too: the client picks its segmentation, as the
//! `nseg` of the read request (which carries no data), and the server
//! answers in that many segments. Any `nseg` in that range is valid and
//! segments stay whole datagrams: never an IP fragment. Version 1 of the
//! record had segments of exactly [`SEG_DATA`] and read requests with
//! `nseg` 1; version 2 is this.
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
//! | 38 | nseg u16 | segments of the data (a read: of its answer) | segments of the data |

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::header::{HDR_TAG, tag_len};
use crate::{HEADER_LEN, Header, MAX_DATAGRAM, TAG_LEN};

/// The largest link MTU bulk datagrams use: a veth whose XDP program
/// does not take multi-buffer frames refuses an MTU above 3504 with 4 KiB
/// pages (a frame, the XDP headroom and `skb_shared_info` in one page),
/// and an AF_XDP frame of 4 KiB holds it whole.
pub const JUMBO_MTU: usize = 3500;
/// Most bytes of a bulk datagram (the UDP payload within [`JUMBO_MTU`]).
pub const MAX_BULK_DATAGRAM: usize = JUMBO_MTU - 20 - 8;
/// Most data bytes of one bulk datagram on a [`JUMBO_MTU`] link.
pub const SEG_DATA_MAX: usize = MAX_BULK_DATAGRAM - HEADER_LEN - BLOCK_RECORD_LEN - TAG_LEN;

/// Header kind byte: a block request (client -> server).
pub const KIND_BLOCK_REQUEST: u8 = 5;
/// Header kind byte: a block answer (server -> client).
pub const KIND_BLOCK_ANSWER: u8 = 6;
/// The bulk record layout's version ([`BlockRecord::version`]).
pub const BULK_VERSION: u8 = 2;
/// Size of a block record.
pub const BLOCK_RECORD_LEN: usize = 40;
/// Most data bytes one bulk datagram carries on a 1500-byte MTU: a
/// tagged datagram of that much data is exactly [`MAX_DATAGRAM`] bytes.
/// The smallest segments a sender may choose (see [`nseg_ok`]).
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
const _: () = assert!(SEG_DATA_MAX == 3392);
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
    /// Longer than [`MAX_BULK_DATAGRAM`].
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

/// Segments of at most `seg_max` bytes needed for `len` bytes of data
/// (at least 1: an empty request or answer is one datagram).
pub const fn segments_of(len: u32, seg_max: usize) -> u16 {
    let seg_max = if seg_max == 0 { 1 } else { seg_max };
    let n = (len as usize).div_ceil(seg_max);
    if n == 0 { 1 } else { n as u16 }
}

/// Segments needed for `len` bytes of data on a 1500-byte MTU: the most
/// a sender may use.
pub const fn segments(len: u32) -> u16 {
    segments_of(len, SEG_DATA)
}

/// Segments for `len` bytes where datagrams may carry `seg_max` data
/// bytes (a link's MTU less the headers: [`seg_max_for_mtu`]), kept within
/// the range [`nseg_ok`] accepts.
pub const fn segments_for(len: u32, seg_max: usize) -> u16 {
    let m = if seg_max < SEG_DATA {
        SEG_DATA
    } else if seg_max > SEG_DATA_MAX {
        SEG_DATA_MAX
    } else {
        seg_max
    };
    segments_of(len, m)
}

/// The most data bytes per bulk datagram on a link of `mtu` bytes (IPv4,
/// tagged datagrams), within [`SEG_DATA`]..=[`SEG_DATA_MAX`].
pub const fn seg_max_for_mtu(mtu: usize) -> usize {
    let m = mtu.saturating_sub(20 + 8 + HEADER_LEN + BLOCK_RECORD_LEN + TAG_LEN);
    if m < SEG_DATA {
        SEG_DATA
    } else if m > SEG_DATA_MAX {
        SEG_DATA_MAX
    } else {
        m
    }
}

/// Whether `len` bytes may travel in `nseg` segments: at least as many as
/// segments of [`SEG_DATA_MAX`] need, at most as many as segments of
/// [`SEG_DATA`] (so that every segment carries data when there is any,
/// and a bitmap of them fits [`MAX_SEGS`]); `len` at most
/// [`MAX_BLOCK_LEN`].
pub const fn nseg_ok(len: u32, nseg: u16) -> bool {
    len <= MAX_BLOCK_LEN && nseg >= segments_of(len, SEG_DATA_MAX) && nseg <= segments(len)
}

/// Bytes of every segment but the last when `len` bytes travel in `nseg`
/// segments: ceil(len / nseg).
pub const fn seg_size(len: u32, nseg: u16) -> usize {
    let nseg = if nseg == 0 { 1 } else { nseg as usize };
    (len as usize).div_ceil(nseg)
}

/// Bytes of data segment `seg` of `len` bytes in `nseg` segments carries.
pub const fn seg_len(len: u32, nseg: u16, seg: u16) -> usize {
    let size = seg_size(len, nseg);
    let start = seg as usize * size;
    let len = len as usize;
    if start >= len {
        0
    } else if len - start < size {
        len - start
    } else {
        size
    }
}

/// Where segment `seg` of `len` bytes in `nseg` segments starts and ends.
pub const fn seg_range(len: u32, nseg: u16, seg: u16) -> (usize, usize) {
    let start = seg as usize * seg_size(len, nseg);
    let start = if start > len as usize {
        len as usize
    } else {
        start
    };
    (start, start + seg_len(len, nseg, seg))
}

/// Whether a payload of `payload_len` bytes with header `count` and
/// `flags` can be a bulk datagram (the XDP program's length check).
#[inline(always)]
pub const fn bulk_len_fits(count: usize, flags: u16, payload_len: usize) -> bool {
    count == 1 && payload_len >= MIN_BULK + tag_len(flags) && payload_len <= MAX_BULK_DATAGRAM
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
        if buf.len() > MAX_BULK_DATAGRAM {
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
        // A read request names its answer's segments (probe or not).
        let read_request = self.request && self.op == BlockOp::Read;
        if read_request && !nseg_ok(len, nseg) {
            return Err(BulkError::BadLength);
        }
        // Partial answers and probes carry a bitmap, one datagram (a
        // read's probe: of its answer's segments, `nseg` of them).
        let bitmap = (self.request && r.flags & BF_PROBE != 0)
            || (!self.request && self.status == BlockStatus::Partial);
        if bitmap {
            let segs_ok = if read_request { true } else { nseg == 1 };
            return if segs_ok && seg == 0 && self.data.len() <= MAX_SEGS.div_ceil(8) {
                Ok(())
            } else {
                Err(BulkError::BadLength)
            };
        }
        if read_request {
            return if seg == 0 && dlen == 0 {
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
        let ok = if carries {
            nseg_ok(len, nseg) && dlen as usize == seg_len(len, nseg, seg)
        } else {
            nseg == 1 && dlen == 0
        };
        if !ok {
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
/// `data` longer than [`SEG_DATA_MAX`].
pub fn write(
    buf: &mut [u8],
    header: Header,
    msg: &BlockMsg,
    seg: u16,
    nseg: u16,
    data: &[u8],
) -> Option<usize> {
    if data.len() > SEG_DATA_MAX {
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
        let m = msg(BlockOp::Write, 3 * SEG_DATA as u32);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 3, &data).unwrap();
        let key = crate::tag::TagKey::new(1, [7; 16]);
        let n = crate::tag::seal(&mut buf, n, &key).unwrap();
        assert_eq!(n, MAX_DATAGRAM);
        let d = Bulk::parse(&buf[..n]).unwrap();
        assert!(d.request);
        assert_eq!((d.op, d.id(), d.vm(), d.seg()), (BlockOp::Write, 42, 3, 0));
        assert_eq!(d.data, &data[..]);
        assert_eq!(d.key_id(), Some(1));
        assert!(crate::tag::verify(&buf[..n], &crate::tag::KeyRing::new(key.clone())).is_ok());
        assert!(bulk_len_fits(1, HDR_TAG | 0x100, n));
        // And a full jumbo segment fills MAX_BULK_DATAGRAM.
        let mut big = [0u8; MAX_BULK_DATAGRAM];
        let data = [0xcd; SEG_DATA_MAX];
        let m = msg(BlockOp::Write, 3 * SEG_DATA_MAX as u32);
        let n = write(&mut big, hdr(KIND_BLOCK_REQUEST), &m, 1, 3, &data).unwrap();
        let n = crate::tag::seal(&mut big, n, &key).unwrap();
        assert_eq!(n, MAX_BULK_DATAGRAM);
        assert_eq!(Bulk::parse(&big[..n]).unwrap().data, &data[..]);
        assert!(crate::tag::verify(&big[..n], &crate::tag::KeyRing::new(key)).is_ok());
        assert!(bulk_len_fits(1, HDR_TAG | 0x100, n));
    }

    #[test]
    fn the_last_segment_carries_the_rest() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let m = msg(BlockOp::Write, 4096);
        assert_eq!(segments(4096), 3);
        assert_eq!(seg_size(4096, 3), 1366);
        assert_eq!(seg_len(4096, 3, 2), 4096 - 2 * 1366);
        assert_eq!(seg_range(4096, 3, 2), (2732, 4096));
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 2, 3, &[1; 1364]).unwrap();
        assert!(Bulk::parse(&buf[..n]).is_ok());
        // A middle segment must be full.
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 1, 3, &[1; 1364]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
    }

    #[test]
    fn the_sender_picks_the_segments_within_both_mtus() {
        // 128 KiB: 95 segments on a 1500-byte MTU, 39 on a jumbo link.
        let len = 128 << 10;
        assert_eq!((segments(len), segments_of(len, SEG_DATA_MAX)), (95, 39));
        assert_eq!(segments_for(len, seg_max_for_mtu(1500)), 95);
        assert_eq!(segments_for(len, seg_max_for_mtu(JUMBO_MTU)), 39);
        assert_eq!(segments_for(len, seg_max_for_mtu(9000)), 39, "capped");
        assert_eq!(segments_for(len, seg_max_for_mtu(576)), 95, "floored");
        assert_eq!(seg_max_for_mtu(1500), SEG_DATA);
        assert_eq!(seg_max_for_mtu(JUMBO_MTU), SEG_DATA_MAX);
        assert!(!nseg_ok(len, 38) && nseg_ok(len, 39) && nseg_ok(len, 95) && !nseg_ok(len, 96));
        // Every valid count covers the data exactly, no segment empty or
        // over SEG_DATA_MAX, for every length up to 1 MiB in steps.
        for len in (0..=MAX_BLOCK_LEN)
            .step_by(4093)
            .chain([1, 1392, 1393, MAX_BLOCK_LEN])
        {
            for nseg in segments_of(len, SEG_DATA_MAX)..=segments(len) {
                let mut at = 0;
                for s in 0..nseg {
                    let (a, b) = seg_range(len, nseg, s);
                    assert_eq!(a, at, "len {len} nseg {nseg} seg {s}");
                    assert!(b - a <= SEG_DATA_MAX && (len == 0 || b > a));
                    at = b;
                }
                assert_eq!(at, len as usize);
            }
        }
        // A jumbo segment parses; a datagram past MAX_BULK_DATAGRAM does not.
        let mut buf = [0u8; MAX_BULK_DATAGRAM + 1];
        let m = msg(BlockOp::Write, len);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 39, &[7; 3361]).unwrap();
        assert_eq!(seg_size(len, 39), 3361);
        assert_eq!(Bulk::parse(&buf[..n]).unwrap().data.len(), 3361);
        assert!(bulk_len_fits(1, 0, n) && !bulk_len_fits(1, 0, MAX_BULK_DATAGRAM + 1));
        assert!(
            write(
                &mut buf,
                hdr(KIND_BLOCK_REQUEST),
                &m,
                0,
                39,
                &[7; SEG_DATA_MAX + 1]
            )
            .is_none()
        );
        assert_eq!(
            Bulk::parse(&buf[..MAX_BULK_DATAGRAM + 1]).unwrap_err(),
            BulkError::TooLong
        );
        // Too few segments (each over SEG_DATA_MAX) or too many.
        let n = write(
            &mut buf,
            hdr(KIND_BLOCK_REQUEST),
            &msg(BlockOp::Write, 8192),
            0,
            2,
            &[7; 4096],
        );
        assert!(n.is_none(), "a segment over SEG_DATA_MAX is not written");
        let m = msg(BlockOp::Write, 3000);
        assert_eq!(segments(3000), 3);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 3, &[7; 1000]).unwrap();
        assert!(Bulk::parse(&buf[..n]).is_ok());
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 4, &[7; 750]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, 1, &[7; 3000]).unwrap();
        assert!(
            Bulk::parse(&buf[..n]).is_ok(),
            "3000 bytes in one jumbo segment"
        );
    }

    #[test]
    fn a_read_request_names_its_answer_segments() {
        let mut buf = [0u8; MAX_DATAGRAM];
        let m = msg(BlockOp::Read, 128 << 10);
        for (nseg, ok) in [
            (1, false),
            (38, false),
            (39, true),
            (60, true),
            (95, true),
            (96, false),
        ] {
            let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &m, 0, nseg, &[]).unwrap();
            assert_eq!(Bulk::parse(&buf[..n]).is_ok(), ok, "nseg {nseg}");
        }
        // Its probe too, with a bitmap of that many segments.
        let p = BlockMsg {
            flags: BF_PROBE,
            ..m
        };
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &p, 0, 39, &[0xff; 5]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap().rec.nseg.get(), 39);
        let n = write(&mut buf, hdr(KIND_BLOCK_REQUEST), &p, 0, 20, &[0xff; 5]).unwrap();
        assert_eq!(Bulk::parse(&buf[..n]).unwrap_err(), BulkError::BadLength);
        // Its answer in those segments.
        let last = (128 << 10) - 38 * 3361;
        let mut big = [0u8; MAX_BULK_DATAGRAM];
        let data = [1u8; SEG_DATA_MAX];
        let n = write(&mut big, hdr(KIND_BLOCK_ANSWER), &m, 38, 39, &data[..last]).unwrap();
        assert!(Bulk::parse(&big[..n]).is_ok());
    }

    #[test]
    fn requests_and_answers_are_checked_field_by_field() {
        let mut buf = [0u8; MAX_DATAGRAM];
        // A read request carries no data; its answer does.
        let m = msg(BlockOp::Read, 512);
        assert!(nseg_ok(512, 1) && !nseg_ok(512, 2));
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
            (HEADER_LEN + 1, 1, BulkError::BadVersion(1)),
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
