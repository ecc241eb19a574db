//! Records: the fixed 40-byte units a datagram carries.
//!
//! Every record has the same raw layout ([`RawRecord`]); its `op` byte says
//! how the fields are read. The typed form is [`Record`].
//!
//! | offset | field | request | response | interrupt | ack |
//! | --- | --- | --- | --- | --- | --- |
//! | 0 | op | PIO in/out, MMIO read/write | response | interrupt | ack |
//! | 1 | arg | access size | access size echoed | [`IrqAction`] | 0 |
//! | 2 | flags | [`FLAG_POSTED`] | 0 | 0 | 0 |
//! | 3 | status | 0 | [`Status`] | 0 | 0 |
//! | 4 | vcpu (u16) | vCPU index | vCPU index | 0 | vCPU index |
//! | 8 | vm (u32) | VM id | VM id | VM id | VM id |
//! | 12 | hypervisor (u32) | hypervisor id | hypervisor id | hypervisor id | hypervisor id |
//! | 16 | seq (u64) | per-vCPU sequence | echoed | per-VM interrupt sequence | acknowledged sequence |
//! | 24 | addr (u64) | port or guest-physical address | echoed | interrupt line | 0 |
//! | 32 | data (u64) | data written (0 for reads) | data read | 0 | 0 |

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::{Kind, WireError};

/// Op byte: port-I/O read (IN).
pub const OP_PIO_IN: u8 = 1;
/// Op byte: port-I/O write (OUT).
pub const OP_PIO_OUT: u8 = 2;
/// Op byte: MMIO read.
pub const OP_MMIO_READ: u8 = 3;
/// Op byte: MMIO write.
pub const OP_MMIO_WRITE: u8 = 4;
/// Op byte: response to a request.
pub const OP_RESPONSE: u8 = 5;
/// Op byte: device-initiated interrupt.
pub const OP_INTERRUPT: u8 = 6;
/// Op byte: acknowledgement.
pub const OP_ACK: u8 = 7;

/// Request flag: a posted write; the sender does not wait for its answer.
pub const FLAG_POSTED: u8 = 1;
/// Request flag: this is a retransmission of an earlier request.
pub const FLAG_RETRANSMIT: u8 = 2;
const REQUEST_FLAGS: u8 = FLAG_POSTED | FLAG_RETRANSMIT;

/// The raw, little-endian layout of one record.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct RawRecord {
    /// One of the `OP_*` constants.
    pub op: u8,
    /// Access size, or the interrupt action.
    pub arg: u8,
    /// `FLAG_*` bits (requests only).
    pub flags: u8,
    /// Response status.
    pub status: u8,
    /// vCPU index.
    pub vcpu: U16,
    /// Reserved, zero.
    pub reserved: U16,
    /// VM (guest) id.
    pub vm: U32,
    /// Hypervisor id.
    pub hypervisor: U32,
    /// Sequence number.
    pub seq: U64,
    /// Port, guest-physical address or interrupt line.
    pub addr: U64,
    /// Data.
    pub data: U64,
}

/// Width of an access in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum AccessSize {
    /// 1 byte.
    B1 = 1,
    /// 2 bytes.
    B2 = 2,
    /// 4 bytes.
    B4 = 4,
    /// 8 bytes (MMIO only).
    B8 = 8,
}

impl AccessSize {
    /// Decodes a size byte (1, 2, 4 or 8).
    pub const fn from_u8(v: u8) -> Option<AccessSize> {
        match v {
            1 => Some(AccessSize::B1),
            2 => Some(AccessSize::B2),
            4 => Some(AccessSize::B4),
            8 => Some(AccessSize::B8),
            _ => None,
        }
    }

    /// Decodes a byte length (1, 2, 4 or 8).
    pub const fn from_len(len: usize) -> Option<AccessSize> {
        if len > 8 {
            return None;
        }
        AccessSize::from_u8(len as u8)
    }

    /// Size in bytes.
    pub const fn bytes(self) -> usize {
        self as usize
    }

    /// Mask of the data bits an access of this size carries.
    pub const fn mask(self) -> u64 {
        match self {
            AccessSize::B1 => 0xff,
            AccessSize::B2 => 0xffff,
            AccessSize::B4 => 0xffff_ffff,
            AccessSize::B8 => u64::MAX,
        }
    }
}

/// Who asked: routes a response back without any state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RequestId {
    /// VM (guest) id.
    pub vm: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
    /// vCPU index within the VM.
    pub vcpu: u16,
    /// Per-vCPU sequence number.
    pub seq: u64,
}

/// The access a request performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Port-I/O read.
    PioIn {
        /// Port.
        port: u16,
        /// 1, 2 or 4 bytes.
        size: AccessSize,
    },
    /// Port-I/O write.
    PioOut {
        /// Port.
        port: u16,
        /// 1, 2 or 4 bytes.
        size: AccessSize,
        /// Data, within `size`.
        data: u32,
    },
    /// MMIO read.
    MmioRead {
        /// Guest-physical address.
        gpa: u64,
        /// 1, 2, 4 or 8 bytes.
        size: AccessSize,
    },
    /// MMIO write.
    MmioWrite {
        /// Guest-physical address.
        gpa: u64,
        /// 1, 2, 4 or 8 bytes.
        size: AccessSize,
        /// Data, within `size`.
        data: u64,
    },
}

impl Access {
    /// Whether the access writes.
    pub const fn is_write(&self) -> bool {
        matches!(self, Access::PioOut { .. } | Access::MmioWrite { .. })
    }

    /// The access size.
    pub const fn size(&self) -> AccessSize {
        match *self {
            Access::PioIn { size, .. }
            | Access::PioOut { size, .. }
            | Access::MmioRead { size, .. }
            | Access::MmioWrite { size, .. } => size,
        }
    }
}

/// A port-I/O or MMIO request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Who asked.
    pub id: RequestId,
    /// What to do.
    pub access: Access,
    /// `FLAG_*` bits.
    pub flags: u8,
}

/// Outcome of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    /// Applied; `data` holds what a read returned.
    Ok = 0,
    /// The model does not decode that address.
    Unmapped = 1,
    /// The model rejected the access (size or alignment).
    Rejected = 2,
    /// The model is not served here (moved or unknown).
    NoSuchModel = 3,
    /// The request fell outside the server's duplicate window.
    Stale = 4,
    /// Not applied yet: the model waits on its backing store (a page it
    /// is reading from its file). Nothing was applied and the server
    /// remembers nothing of it: the client sends the request again, soon.
    /// Every request after it in the same datagram is answered `Busy`
    /// too (not applied), so the model sees them in order.
    Busy = 5,
}

impl Status {
    /// Decodes a status byte.
    pub const fn from_u8(v: u8) -> Option<Status> {
        match v {
            0 => Some(Status::Ok),
            1 => Some(Status::Unmapped),
            2 => Some(Status::Rejected),
            3 => Some(Status::NoSuchModel),
            4 => Some(Status::Stale),
            5 => Some(Status::Busy),
            _ => None,
        }
    }
}

/// An answer to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Response {
    /// The request answered.
    pub id: RequestId,
    /// Outcome.
    pub status: Status,
    /// Access size echoed from the request.
    pub size: AccessSize,
    /// Address echoed from the request.
    pub addr: u64,
    /// Data read (0 for writes).
    pub data: u64,
}

/// What an interrupt does to its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IrqAction {
    /// Raise a level-triggered line.
    Assert = 1,
    /// Lower a level-triggered line.
    Deassert = 2,
    /// Raise then lower (edge).
    Edge = 3,
}

impl IrqAction {
    /// Decodes an action byte.
    pub const fn from_u8(v: u8) -> Option<IrqAction> {
        match v {
            1 => Some(IrqAction::Assert),
            2 => Some(IrqAction::Deassert),
            3 => Some(IrqAction::Edge),
            _ => None,
        }
    }
}

/// A device-initiated interrupt for one VM. The client platform id is in
/// the datagram header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Interrupt {
    /// VM (guest) id.
    pub vm: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
    /// Interrupt line (GSI).
    pub line: u32,
    /// What to do to the line.
    pub action: IrqAction,
    /// Per-VM interrupt sequence number, for ordering and acknowledgement.
    pub seq: u64,
}

/// Acknowledges the record with this id (for interrupts, `vcpu` is 0 and
/// `seq` is the interrupt sequence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ack {
    /// What is acknowledged.
    pub id: RequestId,
}

/// A typed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Record {
    /// In a [`Kind::Request`] datagram.
    Request(Request),
    /// In a [`Kind::Response`] datagram.
    Response(Response),
    /// In a [`Kind::Interrupt`] datagram.
    Interrupt(Interrupt),
    /// In a [`Kind::Ack`] datagram.
    Ack(Ack),
}

impl Record {
    /// The datagram kind this record belongs in.
    pub const fn kind(&self) -> Kind {
        match self {
            Record::Request(_) => Kind::Request,
            Record::Response(_) => Kind::Response,
            Record::Interrupt(_) => Kind::Interrupt,
            Record::Ack(_) => Kind::Ack,
        }
    }
}

fn raw_with_id(op: u8, id: &RequestId) -> RawRecord {
    RawRecord {
        op,
        arg: 0,
        flags: 0,
        status: 0,
        vcpu: U16::new(id.vcpu),
        reserved: U16::new(0),
        vm: U32::new(id.vm),
        hypervisor: U32::new(id.hypervisor),
        seq: U64::new(id.seq),
        addr: U64::new(0),
        data: U64::new(0),
    }
}

/// Rejects a nonzero value in a field that must be zero.
fn zero(index: usize, field: &'static str, value: u64) -> Result<(), WireError> {
    if value != 0 {
        return Err(WireError::NonZeroField {
            index,
            field,
            value,
        });
    }
    Ok(())
}

impl RawRecord {
    /// Encodes a typed record. Values are taken as given; a record that
    /// [`RawRecord::decode`] would reject (say, data wider than its size)
    /// is encoded all the same and rejected by the receiver.
    pub fn encode(rec: &Record) -> RawRecord {
        match rec {
            Record::Request(req) => {
                let (op, addr, data) = match req.access {
                    Access::PioIn { port, .. } => (OP_PIO_IN, port as u64, 0),
                    Access::PioOut { port, data, .. } => (OP_PIO_OUT, port as u64, data as u64),
                    Access::MmioRead { gpa, .. } => (OP_MMIO_READ, gpa, 0),
                    Access::MmioWrite { gpa, data, .. } => (OP_MMIO_WRITE, gpa, data),
                };
                let mut raw = raw_with_id(op, &req.id);
                raw.arg = req.access.size() as u8;
                raw.flags = req.flags;
                raw.addr = U64::new(addr);
                raw.data = U64::new(data);
                raw
            }
            Record::Response(rsp) => {
                let mut raw = raw_with_id(OP_RESPONSE, &rsp.id);
                raw.arg = rsp.size as u8;
                raw.status = rsp.status as u8;
                raw.addr = U64::new(rsp.addr);
                raw.data = U64::new(rsp.data);
                raw
            }
            Record::Interrupt(irq) => {
                let id = RequestId {
                    vm: irq.vm,
                    hypervisor: irq.hypervisor,
                    vcpu: 0,
                    seq: irq.seq,
                };
                let mut raw = raw_with_id(OP_INTERRUPT, &id);
                raw.arg = irq.action as u8;
                raw.addr = U64::new(irq.line as u64);
                raw
            }
            Record::Ack(ack) => raw_with_id(OP_ACK, &ack.id),
        }
    }

    fn id(&self) -> RequestId {
        RequestId {
            vm: self.vm.get(),
            hypervisor: self.hypervisor.get(),
            vcpu: self.vcpu.get(),
            seq: self.seq.get(),
        }
    }

    /// Decodes and checks the record at position `index` of a datagram of
    /// kind `kind`. Fields the op does not use must be zero, so decoding is
    /// exact: `RawRecord::encode(&raw.decode(..)?) == raw`.
    pub fn decode(&self, index: usize, kind: Kind) -> Result<Record, WireError> {
        let op = self.op;
        let expected = match op {
            OP_PIO_IN | OP_PIO_OUT | OP_MMIO_READ | OP_MMIO_WRITE => Kind::Request,
            OP_RESPONSE => Kind::Response,
            OP_INTERRUPT => Kind::Interrupt,
            OP_ACK => Kind::Ack,
            _ => return Err(WireError::UnknownOp { index, op }),
        };
        if expected != kind {
            return Err(WireError::OpNotAllowed { index, op, kind });
        }
        zero(index, "reserved", self.reserved.get() as u64)?;
        match op {
            OP_PIO_IN | OP_PIO_OUT | OP_MMIO_READ | OP_MMIO_WRITE => self.decode_request(index),
            OP_RESPONSE => self.decode_response(index),
            OP_INTERRUPT => self.decode_interrupt(index),
            _ => self.decode_ack(index),
        }
    }

    /// A port-I/O or MMIO request: size, port range, data within the size,
    /// request flags only, no status.
    fn decode_request(&self, index: usize) -> Result<Record, WireError> {
        let (op, addr, data) = (self.op, self.addr.get(), self.data.get());
        let pio = op == OP_PIO_IN || op == OP_PIO_OUT;
        let size = match AccessSize::from_u8(self.arg) {
            Some(AccessSize::B8) if pio => None,
            s => s,
        }
        .ok_or(WireError::BadSize {
            index,
            size: self.arg,
        })?;
        if pio && addr > 0xffff {
            return Err(WireError::BadPort { index, port: addr });
        }
        let is_write = op == OP_PIO_OUT || op == OP_MMIO_WRITE;
        // Reads carry no data; writes carry data within their size.
        if (!is_write && data != 0) || data & !size.mask() != 0 {
            return Err(WireError::DataTooWide {
                index,
                data,
                size: self.arg,
            });
        }
        if self.flags & !REQUEST_FLAGS != 0 {
            return Err(WireError::BadFlags {
                index,
                flags: self.flags,
            });
        }
        zero(index, "status", self.status as u64)?;
        let access = match op {
            OP_PIO_IN => Access::PioIn {
                port: addr as u16,
                size,
            },
            OP_PIO_OUT => Access::PioOut {
                port: addr as u16,
                size,
                data: data as u32,
            },
            OP_MMIO_READ => Access::MmioRead { gpa: addr, size },
            _ => Access::MmioWrite {
                gpa: addr,
                size,
                data,
            },
        };
        Ok(Record::Request(Request {
            id: self.id(),
            access,
            flags: self.flags,
        }))
    }

    /// An answer: a known status, a size, data within it, no flags.
    fn decode_response(&self, index: usize) -> Result<Record, WireError> {
        let (addr, data) = (self.addr.get(), self.data.get());
        let status = Status::from_u8(self.status).ok_or(WireError::UnknownStatus {
            index,
            status: self.status,
        })?;
        let size = AccessSize::from_u8(self.arg).ok_or(WireError::BadSize {
            index,
            size: self.arg,
        })?;
        if data & !size.mask() != 0 {
            return Err(WireError::DataTooWide {
                index,
                data,
                size: self.arg,
            });
        }
        zero(index, "flags", self.flags as u64)?;
        Ok(Record::Response(Response {
            id: self.id(),
            status,
            size,
            addr,
            data,
        }))
    }

    /// An interrupt: a known action on a 32-bit line, nothing else set.
    fn decode_interrupt(&self, index: usize) -> Result<Record, WireError> {
        let addr = self.addr.get();
        let action = IrqAction::from_u8(self.arg).ok_or(WireError::UnknownIrqAction {
            index,
            action: self.arg,
        })?;
        if addr > u32::MAX as u64 {
            return Err(WireError::BadLine { index, line: addr });
        }
        zero(index, "flags", self.flags as u64)?;
        zero(index, "status", self.status as u64)?;
        zero(index, "vcpu", self.vcpu.get() as u64)?;
        zero(index, "data", self.data.get())?;
        Ok(Record::Interrupt(Interrupt {
            vm: self.vm.get(),
            hypervisor: self.hypervisor.get(),
            line: addr as u32,
            action,
            seq: self.seq.get(),
        }))
    }

    /// An acknowledgement: the id, nothing else set.
    fn decode_ack(&self, index: usize) -> Result<Record, WireError> {
        zero(index, "arg", self.arg as u64)?;
        zero(index, "flags", self.flags as u64)?;
        zero(index, "status", self.status as u64)?;
        zero(index, "addr", self.addr.get())?;
        zero(index, "data", self.data.get())?;
        Ok(Record::Ack(Ack { id: self.id() }))
    }
}
