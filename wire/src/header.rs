//! The fixed 24-byte datagram header.
//!
//! The first 8 bytes are what the XDP program reads at fixed offsets:
//! magic (2), version (1), kind (1), device-model id (4).

use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::WireError;

/// What a datagram carries; every record in it must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Client -> server: port-I/O and MMIO requests.
    Request = 1,
    /// Server -> client: answers to requests.
    Response = 2,
    /// Server -> client: device-initiated interrupts.
    Interrupt = 3,
    /// Either way: acknowledgements (e.g. of interrupts).
    Ack = 4,
}

impl Kind {
    /// Decodes a kind byte.
    pub const fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Request),
            2 => Some(Kind::Response),
            3 => Some(Kind::Interrupt),
            4 => Some(Kind::Ack),
            _ => None,
        }
    }
}

/// The datagram header, little-endian, at offset 0 of the UDP payload.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct Header {
    /// [`crate::MAGIC`].
    pub magic: U16,
    /// [`crate::VERSION`].
    pub version: u8,
    /// A [`Kind`] byte.
    pub kind: u8,
    /// The device model the records address (requests) or come from.
    pub model: U32,
    /// The server platform that owns (or answered for) the model.
    pub server: U32,
    /// The client platform that sent the requests or is to receive the
    /// responses / interrupts.
    pub client: U32,
    /// Number of records that follow.
    pub count: U16,
    /// Header flags ([`HDR_IRQ_PORT`], [`HDR_TAG`]) in the low byte; with
    /// [`HDR_TAG`], the id of the key the tag is computed with in the high
    /// byte ([`KEY_ID_SHIFT`]).
    pub flags: U16,
    /// With [`HDR_IRQ_PORT`] (requests and acknowledgements): the UDP port, at the
    /// sender's address, where this client wants the interrupts of the
    /// VMs in the records; zero otherwise.
    pub reserved: U32,
}

/// Header flag of a request: `reserved` holds the UDP port, at the
/// sender's address, that the records' VMs take their interrupts on. A
/// client that sends from many sockets (one per vCPU) receives interrupts
/// on one that nobody polls for answers; without the flag a server sends
/// interrupts to where the VM's requests came from.
pub const HDR_IRQ_PORT: u16 = 1;

/// Header flag of any datagram: it ends in a [`crate::TAG_LEN`]-byte tag
/// after its records, keyed with its client's key whose id is in the
/// flags' high byte (see `crate::tag`).
pub const HDR_TAG: u16 = 2;

/// Where the key id sits in the flags word (its high byte).
pub const KEY_ID_SHIFT: u16 = 8;

/// Every header flag this version defines.
pub const HDR_FLAGS: u16 = HDR_IRQ_PORT | HDR_TAG;

/// Byte offset of the magic in the UDP payload.
pub const OFF_MAGIC: usize = 0;
/// Byte offset of the version byte.
pub const OFF_VERSION: usize = 2;
/// Byte offset of the kind byte.
pub const OFF_KIND: usize = 3;
/// Byte offset of the device-model id.
pub const OFF_MODEL: usize = 4;
/// Byte offset of the server id.
pub const OFF_SERVER: usize = 8;
/// Byte offset of the client platform id.
pub const OFF_CLIENT: usize = 12;
/// Byte offset of the record count.
pub const OFF_COUNT: usize = 16;
/// Byte offset of the flags word.
pub const OFF_FLAGS: usize = 18;

const _: () = assert!(core::mem::offset_of!(Header, version) == OFF_VERSION);
const _: () = assert!(core::mem::offset_of!(Header, magic) == OFF_MAGIC);
const _: () = assert!(core::mem::offset_of!(Header, kind) == OFF_KIND);
const _: () = assert!(core::mem::offset_of!(Header, model) == OFF_MODEL);
const _: () = assert!(core::mem::offset_of!(Header, server) == OFF_SERVER);
const _: () = assert!(core::mem::offset_of!(Header, client) == OFF_CLIENT);
const _: () = assert!(core::mem::offset_of!(Header, count) == OFF_COUNT);
const _: () = assert!(core::mem::offset_of!(Header, flags) == OFF_FLAGS);

/// Whether a server accepts datagrams of kind byte `kind`: requests,
/// acknowledgements and block requests (`crate::bulk`); responses,
/// interrupts and block answers go the other way.
#[inline(always)]
pub const fn server_accepts(kind: u8) -> bool {
    kind == Kind::Request as u8
        || kind == Kind::Ack as u8
        || kind == crate::bulk::KIND_BLOCK_REQUEST
}

/// Whether the header's `count` and `flags` fit a payload of
/// `payload_len` bytes for a datagram of kind byte `kind`: records
/// ([`count_fits`]) or a bulk datagram ([`crate::bulk::bulk_len_fits`]).
#[inline(always)]
pub const fn length_fits(kind: u8, count: usize, flags: u16, payload_len: usize) -> bool {
    if kind == crate::bulk::KIND_BLOCK_REQUEST {
        crate::bulk::bulk_len_fits(count, flags, payload_len)
    } else {
        count_fits(count, flags, payload_len)
    }
}

/// Whether `count` records (and, if `flags` has [`HDR_TAG`], the tag
/// after them) fill a UDP payload of `payload_len` bytes exactly, and are
/// at least one and at most [`crate::MAX_RECORDS`].
#[inline(always)]
pub const fn count_fits(count: usize, flags: u16, payload_len: usize) -> bool {
    count != 0
        && count <= crate::MAX_RECORDS
        && crate::HEADER_LEN + count * crate::RECORD_LEN + tag_len(flags) == payload_len
}

/// Bytes of tag after the records of a datagram with header flags `flags`.
#[inline(always)]
pub const fn tag_len(flags: u16) -> usize {
    if flags & HDR_TAG != 0 {
        crate::TAG_LEN
    } else {
        0
    }
}

impl Header {
    /// Whether the magic is devplane's.
    #[inline(always)]
    pub fn magic_ok(&self) -> bool {
        self.magic.get() == crate::MAGIC
    }

    /// Whether the version is the one this crate speaks.
    #[inline(always)]
    pub fn version_ok(&self) -> bool {
        self.version == crate::VERSION
    }

    /// A header of the current version with the given fields and no records.
    pub fn new(kind: Kind, model: u32, server: u32, client: u32) -> Header {
        Header {
            magic: U16::new(crate::MAGIC),
            version: crate::VERSION,
            kind: kind as u8,
            model: U32::new(model),
            server: U32::new(server),
            client: U32::new(client),
            count: U16::new(0),
            flags: U16::new(0),
            reserved: U32::new(0),
        }
    }

    /// This request header with the interrupt port `port` (see
    /// [`HDR_IRQ_PORT`]).
    pub fn with_irq_port(mut self, port: u16) -> Header {
        self.flags = U16::new(self.flags.get() | HDR_IRQ_PORT);
        self.reserved = U32::new(u32::from(port));
        self
    }

    /// The interrupt port a request names ([`HDR_IRQ_PORT`]), if any.
    pub fn irq_port(&self) -> Option<u16> {
        (self.flags.get() & HDR_IRQ_PORT != 0).then_some(self.reserved.get() as u16)
    }

    /// The id of the key of the tag ([`HDR_TAG`]), if the datagram has one.
    pub fn key_id(&self) -> Option<u8> {
        let flags = self.flags.get();
        (flags & HDR_TAG != 0).then_some((flags >> KEY_ID_SHIFT) as u8)
    }

    /// Checks the header's flags and the field they give meaning to:
    /// known flags only, a key id only with [`HDR_TAG`], [`HDR_IRQ_PORT`]
    /// only on a request or an acknowledgement (a client's announcement
    /// to a model's new server says where its interrupts go) and with a
    /// port in 1..=65535, and `reserved` zero without it.
    pub fn check_flags(&self, kind: Kind) -> Result<(), WireError> {
        let flags = self.flags.get();
        let known = if flags & HDR_TAG != 0 {
            HDR_FLAGS | (0xff << KEY_ID_SHIFT)
        } else {
            HDR_FLAGS
        };
        if flags & !known != 0 {
            return Err(WireError::UnknownHeaderFlags(flags));
        }
        let reserved = self.reserved.get();
        if flags & HDR_IRQ_PORT == 0 {
            if reserved != 0 {
                return Err(WireError::NonZeroReserved(reserved));
            }
            return Ok(());
        }
        if !matches!(kind, Kind::Request | Kind::Ack)
            || reserved == 0
            || reserved > u32::from(u16::MAX)
        {
            return Err(WireError::BadIrqPort {
                kind,
                port: reserved,
            });
        }
        Ok(())
    }

    /// Reads and checks the header at the start of `buf` (magic, version,
    /// kind); the records are checked by [`crate::Datagram::parse`].
    pub fn parse(buf: &[u8]) -> Result<(&Header, Kind), WireError> {
        let (hdr, _) = Header::ref_from_prefix(buf).map_err(|_| WireError::Short {
            need: crate::HEADER_LEN,
            have: buf.len(),
        })?;
        if !hdr.magic_ok() {
            return Err(WireError::BadMagic(hdr.magic.get()));
        }
        if !hdr.version_ok() {
            return Err(WireError::UnsupportedVersion(hdr.version));
        }
        let kind = Kind::from_u8(hdr.kind).ok_or(WireError::UnknownKind(hdr.kind))?;
        Ok((hdr, kind))
    }
}
