//! Whole datagrams: a [`Header`] followed by `count` records, all for one
//! device model and of one [`Kind`].

use zerocopy::little_endian::U16;
use zerocopy::{FromBytes, IntoBytes};

use crate::{
    HEADER_LEN, Header, Kind, MAX_DATAGRAM, MAX_RECORDS, RECORD_LEN, RawRecord, Record, WireError,
};

/// A parsed, fully validated datagram borrowing its buffer.
///
/// [`Datagram::parse`] checks the header and every record, so a datagram is
/// either accepted whole or rejected whole: no record of a malformed
/// datagram ever reaches a device model.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    header: &'a Header,
    kind: Kind,
    records: &'a [RawRecord],
}

impl<'a> Datagram<'a> {
    /// Parses `buf`, which must hold exactly one datagram (the UDP payload).
    pub fn parse(buf: &'a [u8]) -> Result<Datagram<'a>, WireError> {
        let (header, kind) = Header::parse(buf)?;
        header.check_flags(kind)?;
        let count = header.count.get() as usize;
        if count == 0 {
            return Err(WireError::Empty);
        }
        if count > MAX_RECORDS {
            return Err(WireError::TooManyRecords {
                count,
                max: MAX_RECORDS,
            });
        }
        let tag = crate::header::tag_len(header.flags.get());
        let body = &buf[HEADER_LEN..buf.len().saturating_sub(tag).max(HEADER_LEN)];
        let need = count * RECORD_LEN;
        if body.len() < need {
            return Err(WireError::CountBeyondBuffer {
                count,
                need,
                have: body.len(),
            });
        }
        if body.len() > need {
            return Err(WireError::RecordsPastEnd {
                extra: body.len() - need,
            });
        }
        let records =
            <[RawRecord]>::ref_from_bytes(body).map_err(|_| WireError::CountBeyondBuffer {
                count,
                need,
                have: body.len(),
            })?;
        for (index, raw) in records.iter().enumerate() {
            raw.decode(index, kind)?;
        }
        Ok(Datagram {
            header,
            kind,
            records,
        })
    }

    /// The header.
    pub fn header(&self) -> &'a Header {
        self.header
    }

    /// The kind.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The device-model id in the header.
    pub fn model(&self) -> u32 {
        self.header.model.get()
    }

    /// The server id in the header.
    pub fn server(&self) -> u32 {
        self.header.server.get()
    }

    /// The client platform id in the header.
    pub fn client(&self) -> u32 {
        self.header.client.get()
    }

    /// The port a request names for its VMs' interrupts
    /// ([`crate::header::HDR_IRQ_PORT`]).
    pub fn irq_port(&self) -> Option<u16> {
        self.header.irq_port()
    }

    /// The id of the key of its tag, if it has one
    /// ([`crate::header::HDR_TAG`]; verified by `crate::tag::verify`, not
    /// by [`Datagram::parse`]).
    pub fn key_id(&self) -> Option<u8> {
        self.header.key_id()
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether there are no records (never true of a parsed datagram).
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The raw records.
    pub fn raw_records(&self) -> &'a [RawRecord] {
        self.records
    }

    /// The typed records, in order.
    pub fn records(&self) -> impl Iterator<Item = Record> + 'a {
        let kind = self.kind;
        // Every record was decoded successfully in `parse`, so `ok()` never
        // drops one; this avoids a panic path on the data path.
        self.records
            .iter()
            .enumerate()
            .filter_map(move |(i, r)| r.decode(i, kind).ok())
    }
}

/// Encodes a datagram in place into a caller-owned buffer (a ring slot or
/// a UMEM frame): no allocation, no copy beyond the encoding itself.
#[derive(Debug)]
pub struct DatagramWriter<'a> {
    buf: &'a mut [u8],
    kind: Kind,
    count: usize,
    max_records: usize,
}

impl<'a> DatagramWriter<'a> {
    /// Starts a datagram with `header` (its count is overwritten) in `buf`.
    /// At most [`MAX_DATAGRAM`] bytes of `buf` are used, and room for a
    /// tag ([`crate::TAG_LEN`]) is left after the last record.
    pub fn new(buf: &'a mut [u8], header: Header) -> Result<DatagramWriter<'a>, WireError> {
        let kind = Kind::from_u8(header.kind).ok_or(WireError::UnknownKind(header.kind))?;
        let cap = buf.len().min(MAX_DATAGRAM);
        if cap < HEADER_LEN {
            return Err(WireError::BufferTooSmall { have: buf.len() });
        }
        let mut header = header;
        header.count = U16::new(0);
        buf[..HEADER_LEN].copy_from_slice(header.as_bytes());
        Ok(DatagramWriter {
            buf,
            kind,
            count: 0,
            max_records: ((cap - HEADER_LEN).saturating_sub(crate::TAG_LEN) / RECORD_LEN)
                .min(MAX_RECORDS),
        })
    }

    /// Appends a record; it must be of the datagram's kind.
    pub fn push(&mut self, rec: &Record) -> Result<(), WireError> {
        if rec.kind() != self.kind {
            let raw = RawRecord::encode(rec);
            return Err(WireError::OpNotAllowed {
                index: self.count,
                op: raw.op,
                kind: self.kind,
            });
        }
        self.push_raw(&RawRecord::encode(rec))
    }

    /// Appends a raw record as is (no checks beyond space).
    pub fn push_raw(&mut self, raw: &RawRecord) -> Result<(), WireError> {
        if self.count >= self.max_records {
            return Err(WireError::Full);
        }
        let off = HEADER_LEN + self.count * RECORD_LEN;
        self.buf[off..off + RECORD_LEN].copy_from_slice(raw.as_bytes());
        self.count += 1;
        self.buf[crate::header::OFF_COUNT..crate::header::OFF_COUNT + 2]
            .copy_from_slice(&(self.count as u16).to_le_bytes());
        Ok(())
    }

    /// Records written so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// Whether another record would not fit.
    pub fn is_full(&self) -> bool {
        self.count >= self.max_records
    }

    /// Bytes of the datagram so far (header and records).
    pub fn len(&self) -> usize {
        HEADER_LEN + self.count * RECORD_LEN
    }

    /// Whether no record has been written yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Ends the datagram and returns its length in bytes.
    pub fn finish(self) -> usize {
        self.len()
    }
}

/// Encodes `records` after `header` into `buf`; returns the length.
pub fn encode(buf: &mut [u8], header: Header, records: &[Record]) -> Result<usize, WireError> {
    let mut w = DatagramWriter::new(buf, header)?;
    for r in records {
        w.push(r)?;
    }
    Ok(w.finish())
}
