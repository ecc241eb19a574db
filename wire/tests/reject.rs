//! One test per rejection path: each crafts bytes and checks the exact
//! [`WireError`] (or [`FrameError`]) with its fields.

use devplane_wire::frame::{
    self, ETH_HLEN, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV6, EthHdr, Flow, FrameError, IPV4_MIN_HLEN,
    Ipv4Hdr, PAYLOAD_OFFSET, UDP_HLEN, UdpHdr,
};
use devplane_wire::record::{
    FLAG_POSTED, FLAG_RETRANSMIT, OP_ACK, OP_INTERRUPT, OP_MMIO_READ, OP_MMIO_WRITE, OP_PIO_IN,
    OP_PIO_OUT, OP_RESPONSE,
};
use devplane_wire::{
    Datagram, DatagramWriter, HEADER_LEN, Header, Kind, MAX_DATAGRAM, MAX_RECORDS, RECORD_LEN,
    RawRecord, WireError, datagram,
};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

// ---------------------------------------------------------------------------
// Datagram helpers.

/// A raw record with the given op and everything else zero.
fn raw(op: u8) -> RawRecord {
    RawRecord::new_zeroed().with_op(op)
}

trait RawExt {
    fn with_op(self, op: u8) -> Self;
    fn with_arg(self, arg: u8) -> Self;
    fn with_flags(self, flags: u8) -> Self;
    fn with_status(self, status: u8) -> Self;
    fn with_addr(self, addr: u64) -> Self;
    fn with_data(self, data: u64) -> Self;
}

impl RawExt for RawRecord {
    fn with_op(mut self, op: u8) -> Self {
        self.op = op;
        self
    }
    fn with_arg(mut self, arg: u8) -> Self {
        self.arg = arg;
        self
    }
    fn with_flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }
    fn with_status(mut self, status: u8) -> Self {
        self.status = status;
        self
    }
    fn with_addr(mut self, addr: u64) -> Self {
        self.addr.set(addr);
        self
    }
    fn with_data(mut self, data: u64) -> Self {
        self.data.set(data);
        self
    }
}

/// A valid record for a datagram of `kind`.
fn valid(kind: Kind) -> RawRecord {
    match kind {
        Kind::Request => raw(OP_PIO_IN).with_arg(1).with_addr(0x60),
        Kind::Response => raw(OP_RESPONSE).with_arg(1).with_addr(0x60).with_data(0xfa),
        Kind::Interrupt => raw(OP_INTERRUPT).with_arg(3).with_addr(4),
        Kind::Ack => raw(OP_ACK),
    }
}

/// Header bytes of `kind` announcing `count` records.
fn header(kind: Kind, count: u16) -> Vec<u8> {
    let mut h = Header::new(kind, 0x1234, 0x55, 0x66);
    h.count.set(count);
    h.as_bytes().to_vec()
}

/// A datagram of `kind` announcing `count` records, followed by `records`.
fn dgram(kind: Kind, count: u16, records: &[RawRecord]) -> Vec<u8> {
    let mut b = header(kind, count);
    for r in records {
        b.extend_from_slice(r.as_bytes());
    }
    b
}

/// A datagram of `kind` holding exactly `records`.
fn exact(kind: Kind, records: &[RawRecord]) -> Vec<u8> {
    dgram(kind, records.len() as u16, records)
}

fn parse_err(bytes: &[u8]) -> WireError {
    Datagram::parse(bytes).expect_err("must be rejected")
}

/// The error for `rec` alone, and at index 1 behind a valid record (so
/// that the index field is checked too).
fn record_err(kind: Kind, rec: RawRecord) -> WireError {
    let first = parse_err(&exact(kind, &[rec]));
    let second = parse_err(&exact(kind, &[valid(kind), rec]));
    let expect_second = match first {
        WireError::UnknownOp { op, .. } => WireError::UnknownOp { index: 1, op },
        WireError::OpNotAllowed { op, kind, .. } => WireError::OpNotAllowed { index: 1, op, kind },
        WireError::BadSize { size, .. } => WireError::BadSize { index: 1, size },
        WireError::BadPort { port, .. } => WireError::BadPort { index: 1, port },
        WireError::DataTooWide { data, size, .. } => WireError::DataTooWide {
            index: 1,
            data,
            size,
        },
        WireError::BadFlags { flags, .. } => WireError::BadFlags { index: 1, flags },
        WireError::BadLine { line, .. } => WireError::BadLine { index: 1, line },
        WireError::UnknownStatus { status, .. } => WireError::UnknownStatus { index: 1, status },
        WireError::UnknownIrqAction { action, .. } => {
            WireError::UnknownIrqAction { index: 1, action }
        }
        WireError::NonZeroField { field, value, .. } => WireError::NonZeroField {
            index: 1,
            field,
            value,
        },
        other => panic!("not a record error: {other:?}"),
    };
    assert_eq!(second, expect_second);
    // A bad record also spoils a datagram of otherwise valid records.
    let mut many = vec![valid(kind); MAX_RECORDS];
    many[MAX_RECORDS - 1] = rec;
    assert!(Datagram::parse(&exact(kind, &many)).is_err());
    first
}

#[test]
fn helpers_make_valid_datagrams() {
    for kind in [Kind::Request, Kind::Response, Kind::Interrupt, Kind::Ack] {
        let b = exact(kind, &[valid(kind), valid(kind)]);
        let dg = Datagram::parse(&b).unwrap();
        assert_eq!(dg.len(), 2);
        assert_eq!(dg.kind(), kind);
        assert_eq!(dg.model(), 0x1234);
    }
}

// ---------------------------------------------------------------------------
// Header.

#[test]
fn short() {
    assert_eq!(
        parse_err(&[]),
        WireError::Short {
            need: HEADER_LEN,
            have: 0
        }
    );
    let h = header(Kind::Request, 1);
    assert_eq!(parse_err(&h[..23]), WireError::Short { need: 24, have: 23 });
    assert_eq!(parse_err(&h[..1]), WireError::Short { need: 24, have: 1 });
    assert!(matches!(
        Header::parse(&h[..23]),
        Err(WireError::Short { need: 24, have: 23 })
    ));
}

#[test]
fn bad_magic() {
    let mut b = exact(Kind::Request, &[valid(Kind::Request)]);
    b[0] = 0x34;
    b[1] = 0x12;
    assert_eq!(parse_err(&b), WireError::BadMagic(0x1234));
    // Big-endian "DP" is not the magic either.
    b[0] = b'P';
    b[1] = b'D';
    assert_eq!(
        parse_err(&b),
        WireError::BadMagic(u16::from_le_bytes(*b"PD"))
    );
}

#[test]
fn unsupported_version() {
    let mut b = exact(Kind::Request, &[valid(Kind::Request)]);
    // Version 1 too: its tags were SipHash-2-4 at every length.
    for v in [0u8, 1, 3, 255] {
        b[2] = v;
        assert_eq!(parse_err(&b), WireError::UnsupportedVersion(v));
    }
}

#[test]
fn unknown_kind() {
    let mut b = exact(Kind::Request, &[valid(Kind::Request)]);
    for k in [0u8, 5, 255] {
        b[3] = k;
        assert_eq!(parse_err(&b), WireError::UnknownKind(k));
    }
}

#[test]
fn empty() {
    assert_eq!(parse_err(&header(Kind::Request, 0)), WireError::Empty);
    // Records after a zero count do not help.
    assert_eq!(
        parse_err(&dgram(Kind::Ack, 0, &[valid(Kind::Ack)])),
        WireError::Empty
    );
}

#[test]
fn too_many_records() {
    let rec = valid(Kind::Ack);
    assert_eq!(
        parse_err(&dgram(Kind::Ack, 36, &[rec; 36])),
        WireError::TooManyRecords { count: 36, max: 35 }
    );
    assert_eq!(
        parse_err(&header(Kind::Ack, u16::MAX)),
        WireError::TooManyRecords {
            count: 65535,
            max: MAX_RECORDS
        }
    );
    // The maximum itself is fine.
    assert_eq!(
        Datagram::parse(&dgram(Kind::Ack, 35, &[rec; 35]))
            .unwrap()
            .len(),
        35
    );
}

#[test]
fn count_beyond_buffer() {
    assert_eq!(
        parse_err(&dgram(Kind::Ack, 2, &[valid(Kind::Ack)])),
        WireError::CountBeyondBuffer {
            count: 2,
            need: 80,
            have: 40
        }
    );
    // A partial record.
    let b = dgram(Kind::Ack, 1, &[valid(Kind::Ack)]);
    assert_eq!(
        parse_err(&b[..b.len() - 1]),
        WireError::CountBeyondBuffer {
            count: 1,
            need: RECORD_LEN,
            have: RECORD_LEN - 1
        }
    );
    // Header only.
    assert_eq!(
        parse_err(&header(Kind::Ack, 1)),
        WireError::CountBeyondBuffer {
            count: 1,
            need: 40,
            have: 0
        }
    );
}

#[test]
fn records_past_end() {
    let mut b = exact(Kind::Ack, &[valid(Kind::Ack)]);
    b.extend_from_slice(&[0, 0, 0]);
    assert_eq!(parse_err(&b), WireError::RecordsPastEnd { extra: 3 });
    // A whole extra record not announced.
    let b = dgram(Kind::Ack, 1, &[valid(Kind::Ack); 2]);
    assert_eq!(
        parse_err(&b),
        WireError::RecordsPastEnd { extra: RECORD_LEN }
    );
}

// ---------------------------------------------------------------------------
// Records.

#[test]
fn unknown_op() {
    for op in [0u8, 8, 0x80, 255] {
        assert_eq!(
            record_err(Kind::Request, raw(op).with_arg(1)),
            WireError::UnknownOp { index: 0, op }
        );
    }
}

#[test]
fn op_not_allowed() {
    let cases = [
        (Kind::Request, valid(Kind::Response), OP_RESPONSE),
        (Kind::Request, valid(Kind::Interrupt), OP_INTERRUPT),
        (Kind::Request, valid(Kind::Ack), OP_ACK),
        (Kind::Response, valid(Kind::Request), OP_PIO_IN),
        (
            Kind::Response,
            raw(OP_MMIO_WRITE).with_arg(8),
            OP_MMIO_WRITE,
        ),
        (Kind::Interrupt, valid(Kind::Ack), OP_ACK),
        (Kind::Ack, valid(Kind::Interrupt), OP_INTERRUPT),
        (Kind::Ack, valid(Kind::Response), OP_RESPONSE),
    ];
    for (kind, rec, op) in cases {
        assert_eq!(
            record_err(kind, rec),
            WireError::OpNotAllowed { index: 0, op, kind }
        );
    }
}

#[test]
fn bad_size() {
    let cases = [
        (Kind::Request, raw(OP_PIO_IN).with_arg(8), 8),
        (Kind::Request, raw(OP_PIO_OUT).with_arg(8), 8),
        (Kind::Request, raw(OP_PIO_IN).with_arg(3), 3),
        (Kind::Request, raw(OP_PIO_OUT).with_arg(0), 0),
        (Kind::Request, raw(OP_MMIO_READ).with_arg(16), 16),
        (Kind::Request, raw(OP_MMIO_WRITE).with_arg(3), 3),
        (Kind::Response, raw(OP_RESPONSE).with_arg(0), 0),
        (Kind::Response, raw(OP_RESPONSE).with_arg(16), 16),
    ];
    for (kind, rec, size) in cases {
        assert_eq!(record_err(kind, rec), WireError::BadSize { index: 0, size });
    }
    // Size 8 is MMIO's and a response's to use.
    for (kind, rec) in [
        (Kind::Request, raw(OP_MMIO_READ).with_arg(8)),
        (
            Kind::Response,
            raw(OP_RESPONSE).with_arg(8).with_data(u64::MAX),
        ),
    ] {
        assert!(Datagram::parse(&exact(kind, &[rec])).is_ok());
    }
}

#[test]
fn bad_port() {
    for op in [OP_PIO_IN, OP_PIO_OUT] {
        let rec = raw(op).with_arg(1).with_addr(0x10000);
        assert_eq!(
            record_err(Kind::Request, rec),
            WireError::BadPort {
                index: 0,
                port: 0x10000
            }
        );
    }
    let rec = raw(OP_PIO_IN).with_arg(4).with_addr(u64::MAX);
    assert_eq!(
        record_err(Kind::Request, rec),
        WireError::BadPort {
            index: 0,
            port: u64::MAX
        }
    );
    // 0xffff is a port; MMIO addresses are not ports.
    for rec in [
        raw(OP_PIO_IN).with_arg(1).with_addr(0xffff),
        raw(OP_MMIO_READ).with_arg(1).with_addr(0x10000),
    ] {
        assert!(Datagram::parse(&exact(Kind::Request, &[rec])).is_ok());
    }
}

#[test]
fn data_too_wide() {
    let cases = [
        (
            Kind::Request,
            raw(OP_PIO_OUT).with_arg(1).with_data(0x100),
            0x100,
            1,
        ),
        (
            Kind::Request,
            raw(OP_PIO_OUT).with_arg(2).with_data(0x1_0000),
            0x1_0000,
            2,
        ),
        (
            Kind::Request,
            raw(OP_PIO_OUT).with_arg(4).with_data(0x1_0000_0000),
            0x1_0000_0000,
            4,
        ),
        (
            Kind::Request,
            raw(OP_MMIO_WRITE).with_arg(4).with_data(u64::MAX),
            u64::MAX,
            4,
        ),
        // Reads carry no data at all.
        (Kind::Request, raw(OP_PIO_IN).with_arg(1).with_data(1), 1, 1),
        (
            Kind::Request,
            raw(OP_MMIO_READ).with_arg(8).with_data(0x42),
            0x42,
            8,
        ),
        (
            Kind::Response,
            raw(OP_RESPONSE).with_arg(2).with_data(0x1_0000),
            0x1_0000,
            2,
        ),
    ];
    for (kind, rec, data, size) in cases {
        assert_eq!(
            record_err(kind, rec),
            WireError::DataTooWide {
                index: 0,
                data,
                size
            }
        );
    }
    // Data at the top of the size is fine.
    let rec = raw(OP_PIO_OUT).with_arg(1).with_data(0xff);
    assert!(Datagram::parse(&exact(Kind::Request, &[rec])).is_ok());
}

#[test]
fn bad_flags() {
    for flags in [4u8, 0x80, 0xff, FLAG_POSTED | 8] {
        let rec = raw(OP_MMIO_WRITE).with_arg(4).with_flags(flags);
        assert_eq!(
            record_err(Kind::Request, rec),
            WireError::BadFlags { index: 0, flags }
        );
    }
    let rec = raw(OP_MMIO_WRITE)
        .with_arg(4)
        .with_flags(FLAG_POSTED | FLAG_RETRANSMIT);
    assert!(Datagram::parse(&exact(Kind::Request, &[rec])).is_ok());
}

#[test]
fn bad_line() {
    for line in [0x1_0000_0000u64, u64::MAX] {
        let rec = raw(OP_INTERRUPT).with_arg(1).with_addr(line);
        assert_eq!(
            record_err(Kind::Interrupt, rec),
            WireError::BadLine { index: 0, line }
        );
    }
    let rec = raw(OP_INTERRUPT).with_arg(1).with_addr(u32::MAX as u64);
    assert!(Datagram::parse(&exact(Kind::Interrupt, &[rec])).is_ok());
}

#[test]
fn unknown_status() {
    for status in [6u8, 255] {
        let rec = valid(Kind::Response).with_status(status);
        assert_eq!(
            record_err(Kind::Response, rec),
            WireError::UnknownStatus { index: 0, status }
        );
    }
}

#[test]
fn unknown_irq_action() {
    for action in [0u8, 4, 255] {
        let rec = raw(OP_INTERRUPT).with_arg(action);
        assert_eq!(
            record_err(Kind::Interrupt, rec),
            WireError::UnknownIrqAction { index: 0, action }
        );
    }
}

#[test]
fn non_zero_field() {
    let mut reserved = valid(Kind::Request);
    reserved.reserved.set(1);
    let mut irq_vcpu = valid(Kind::Interrupt);
    irq_vcpu.vcpu.set(3);
    let cases = [
        (Kind::Request, reserved, "reserved", 1),
        (
            Kind::Request,
            valid(Kind::Request).with_status(1),
            "status",
            1,
        ),
        (
            Kind::Response,
            valid(Kind::Response).with_flags(FLAG_POSTED),
            "flags",
            1,
        ),
        (
            Kind::Interrupt,
            valid(Kind::Interrupt).with_flags(2),
            "flags",
            2,
        ),
        (
            Kind::Interrupt,
            valid(Kind::Interrupt).with_status(4),
            "status",
            4,
        ),
        (Kind::Interrupt, irq_vcpu, "vcpu", 3),
        (
            Kind::Interrupt,
            valid(Kind::Interrupt).with_data(9),
            "data",
            9,
        ),
        (Kind::Ack, valid(Kind::Ack).with_arg(1), "arg", 1),
        (Kind::Ack, valid(Kind::Ack).with_flags(1), "flags", 1),
        (Kind::Ack, valid(Kind::Ack).with_status(2), "status", 2),
        (Kind::Ack, valid(Kind::Ack).with_addr(0x60), "addr", 0x60),
        (
            Kind::Ack,
            valid(Kind::Ack).with_data(u64::MAX),
            "data",
            u64::MAX,
        ),
    ];
    for (kind, rec, field, value) in cases {
        assert_eq!(
            record_err(kind, rec),
            WireError::NonZeroField {
                index: 0,
                field,
                value
            }
        );
    }
}

/// Header flags: the interrupt-port flag (only on requests, with a port
/// of 1..=65535; the word it uses is zero without it) and the tag flag
/// (a key id in the high byte only with it).
#[test]
fn header_flags() {
    let with = |kind: Kind, flags: u16, reserved: u32| {
        let mut b = exact(kind, &[valid(kind)]);
        b[18..20].copy_from_slice(&flags.to_le_bytes());
        b[20..24].copy_from_slice(&reserved.to_le_bytes());
        b
    };
    for flags in [4u16, 0x8000, 0x0101, 5] {
        assert_eq!(
            parse_err(&with(Kind::Request, flags, 7)),
            WireError::UnknownHeaderFlags(flags)
        );
    }
    assert_eq!(
        parse_err(&with(Kind::Request, 0, 7)),
        WireError::NonZeroReserved(7)
    );
    for (kind, port) in [
        (Kind::Request, 0),
        (Kind::Request, 65536),
        (Kind::Request, u32::MAX),
        (Kind::Response, 7000),
        (Kind::Interrupt, 7000),
        (Kind::Ack, 0),
        (Kind::Ack, 65536),
    ] {
        assert_eq!(
            parse_err(&with(kind, 1, port)),
            WireError::BadIrqPort { kind, port }
        );
    }
    for port in [1u16, 7000, u16::MAX] {
        let b = with(Kind::Request, 1, port as u32);
        assert_eq!(Datagram::parse(&b).unwrap().irq_port(), Some(port));
        // An acknowledgement may name it too (an announcement).
        let b = with(Kind::Ack, 1, port as u32);
        assert_eq!(Datagram::parse(&b).unwrap().irq_port(), Some(port));
        let h = Header::new(Kind::Request, 1, 2, 3).with_irq_port(port);
        assert_eq!(h.irq_port(), Some(port));
        assert_eq!(h.as_bytes()[18..24], b[18..24]);
    }
    assert_eq!(
        Datagram::parse(&exact(Kind::Request, &[valid(Kind::Request)]))
            .unwrap()
            .irq_port(),
        None
    );
}

/// The first failing check wins, in datagram order: the first bad record,
/// and the header before any record.
#[test]
fn first_error_wins() {
    let bad_op = raw(0);
    let bad_size = raw(OP_PIO_IN).with_arg(3);
    assert_eq!(
        parse_err(&exact(Kind::Request, &[bad_size, bad_op])),
        WireError::BadSize { index: 0, size: 3 }
    );
    let mut b = exact(Kind::Request, &[bad_op]);
    b[2] = 9;
    assert_eq!(parse_err(&b), WireError::UnsupportedVersion(9));
}

// ---------------------------------------------------------------------------
// Encoding.

#[test]
fn buffer_too_small() {
    let h = Header::new(Kind::Ack, 0, 0, 0);
    for len in [0, 1, HEADER_LEN - 1] {
        let mut buf = vec![0u8; len];
        assert_eq!(
            DatagramWriter::new(&mut buf, h).unwrap_err(),
            WireError::BufferTooSmall { have: len }
        );
    }
}

#[test]
fn full() {
    let rec = valid(Kind::Ack);
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut w = DatagramWriter::new(&mut buf, Header::new(Kind::Ack, 0, 0, 0)).unwrap();
    for _ in 0..MAX_RECORDS {
        w.push_raw(&rec).unwrap();
    }
    assert_eq!(w.push_raw(&rec), Err(WireError::Full));
    let recs = vec![rec.decode(0, Kind::Ack).unwrap(); MAX_RECORDS + 1];
    assert_eq!(
        datagram::encode(&mut buf, Header::new(Kind::Ack, 0, 0, 0), &recs),
        Err(WireError::Full)
    );
}

#[test]
fn errors_display() {
    // Every message formats (thiserror, no_std) and names its fields.
    let e = WireError::NonZeroField {
        index: 2,
        field: "vcpu",
        value: 7,
    };
    assert_eq!(e.to_string(), "record 2: field vcpu is 0x7, must be zero");
    assert_eq!(
        WireError::BadMagic(0x1234).to_string(),
        "bad magic 0x1234: not a devplane datagram"
    );
    assert_eq!(
        WireError::UnsupportedVersion(1).to_string(),
        "unsupported wire version 1 (this build speaks 2)"
    );
}

// ---------------------------------------------------------------------------
// Frames.

const FLOW: Flow = Flow {
    src_mac: [0x02, 0, 0, 0, 0, 1],
    dst_mac: [0x02, 0, 0, 0, 0, 2],
    src_ip: [10, 0, 0, 1],
    dst_ip: [10, 0, 0, 2],
    src_port: 40000,
    dst_port: devplane_wire::DEFAULT_PORT,
};

/// A frame carrying `payload` built by `write_headers`.
fn frame_with(payload: &[u8]) -> Vec<u8> {
    let mut buf = vec![0u8; PAYLOAD_OFFSET + payload.len()];
    let n = frame::write_headers(&mut buf, &FLOW, payload.len()).unwrap();
    assert_eq!(n, buf.len());
    buf[PAYLOAD_OFFSET..].copy_from_slice(payload);
    buf
}

fn frame() -> Vec<u8> {
    frame_with(&exact(Kind::Request, &[valid(Kind::Request)]))
}

fn ip_mut(f: &mut [u8]) -> &mut Ipv4Hdr {
    Ipv4Hdr::mut_from_prefix(&mut f[ETH_HLEN..]).unwrap().0
}

fn udp_mut(f: &mut [u8]) -> &mut UdpHdr {
    UdpHdr::mut_from_prefix(&mut f[ETH_HLEN + IPV4_MIN_HLEN..])
        .unwrap()
        .0
}

#[test]
fn frame_roundtrip() {
    let payload = exact(Kind::Request, &[valid(Kind::Request)]);
    let f = frame_with(&payload);
    let u = frame::parse_udp(&f).unwrap();
    assert_eq!(u.flow, FLOW);
    assert_eq!(u.payload_offset, PAYLOAD_OFFSET);
    assert_eq!(u.payload_len, payload.len());
    let dg = Datagram::parse(&f[u.payload_offset..u.payload_offset + u.payload_len]).unwrap();
    assert_eq!(dg.len(), 1);

    let (eth, _) = EthHdr::ref_from_prefix(&f).unwrap();
    assert_eq!(eth.ethertype.get(), frame::ETH_P_IP);
    let (ip, _) = Ipv4Hdr::ref_from_prefix(&f[ETH_HLEN..]).unwrap();
    assert_eq!(ip.version_ihl, 0x45);
    assert_eq!(ip.frag_off.get(), 0x4000, "DF set");
    assert_eq!(ip.proto, frame::IPPROTO_UDP);
    assert_eq!(
        ip.tot_len.get() as usize,
        IPV4_MIN_HLEN + UDP_HLEN + payload.len()
    );
    // The header checksum verifies: summing a header with its checksum gives 0.
    assert_eq!(frame::checksum(&f[ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN]), 0);
    let (udp, _) = UdpHdr::ref_from_prefix(&f[ETH_HLEN + IPV4_MIN_HLEN..]).unwrap();
    assert_eq!(udp.len.get() as usize, UDP_HLEN + payload.len());
    assert_eq!(udp.check.get(), 0);

    // The reply flow parses back as the reversed flow.
    let mut r = vec![0u8; PAYLOAD_OFFSET];
    frame::write_headers(&mut r, &FLOW.reversed(), 0).unwrap();
    let u = frame::parse_udp(&r).unwrap();
    assert_eq!(u.flow, FLOW.reversed());
    assert_eq!(u.flow.reversed(), FLOW);
    assert_eq!(u.payload_len, 0);
}

#[test]
fn frame_write_headers_limits() {
    let mut small = vec![0u8; PAYLOAD_OFFSET + 9];
    assert_eq!(frame::write_headers(&mut small, &FLOW, 10), None);
    assert_eq!(frame::write_headers(&mut small, &FLOW, usize::MAX), None);
    let max = u16::MAX as usize - IPV4_MIN_HLEN - UDP_HLEN;
    let mut big = vec![0u8; PAYLOAD_OFFSET + max + 1];
    assert_eq!(frame::write_headers(&mut big, &FLOW, max + 1), None);
    assert_eq!(
        frame::write_headers(&mut big, &FLOW, max),
        Some(PAYLOAD_OFFSET + max)
    );
    let u = frame::parse_udp(&big[..PAYLOAD_OFFSET + max]).unwrap();
    assert_eq!(u.payload_len, max);
}

#[test]
fn frame_ethernet_padding_and_options() {
    // Trailing Ethernet padding past the IP total length is ignored.
    let mut f = frame_with(&[1, 2]);
    f.resize(60, 0);
    let u = frame::parse_udp(&f).unwrap();
    assert_eq!(u.payload_len, 2);

    // An IPv4 header with 4 bytes of options moves the payload.
    let plain = frame_with(&[9; 5]);
    let mut f = plain[..ETH_HLEN + IPV4_MIN_HLEN].to_vec();
    f.extend_from_slice(&[1, 1, 1, 0]); // NOP NOP NOP EOL
    f.extend_from_slice(&plain[ETH_HLEN + IPV4_MIN_HLEN..]);
    let ip = ip_mut(&mut f);
    ip.version_ihl = 0x46;
    ip.tot_len.set(ip.tot_len.get() + 4);
    let u = frame::parse_udp(&f).unwrap();
    assert_eq!(u.payload_offset, PAYLOAD_OFFSET + 4);
    assert_eq!(u.payload_len, 5);
    assert_eq!(&f[u.payload_offset..], &[9; 5]);
}

#[test]
fn frame_truncated() {
    let f = frame();
    assert_eq!(frame::parse_udp(&[]), Err(FrameError::Truncated));
    assert_eq!(
        frame::parse_udp(&f[..ETH_HLEN - 1]),
        Err(FrameError::Truncated)
    );
    assert_eq!(
        frame::parse_udp(&f[..ETH_HLEN + IPV4_MIN_HLEN - 1]),
        Err(FrameError::Truncated)
    );
    // Headers whole but the IP total length runs past the frame.
    assert_eq!(
        frame::parse_udp(&f[..f.len() - 1]),
        Err(FrameError::Truncated)
    );
    assert_eq!(
        frame::parse_udp(&f[..PAYLOAD_OFFSET]),
        Err(FrameError::Truncated)
    );
}

#[test]
fn frame_not_ipv4() {
    for ethertype in [ETH_P_ARP, ETH_P_8021Q, ETH_P_IPV6, 0] {
        let mut f = frame();
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
        assert_eq!(frame::parse_udp(&f), Err(FrameError::NotIpv4));
    }
    // An ARP frame is shorter than an IPv4 header: still NotIpv4.
    let mut arp = frame()[..ETH_HLEN + 28].to_vec();
    arp[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    assert_eq!(frame::parse_udp(&arp), Err(FrameError::NotIpv4));
    // IPv4 ethertype, IPv6 version nibble.
    let mut f = frame();
    ip_mut(&mut f).version_ihl = 0x65;
    assert_eq!(frame::parse_udp(&f), Err(FrameError::NotIpv4));
}

#[test]
fn frame_not_udp() {
    for proto in [6u8, 1, 0] {
        let mut f = frame();
        ip_mut(&mut f).proto = proto;
        assert_eq!(frame::parse_udp(&f), Err(FrameError::NotUdp));
    }
}

#[test]
fn frame_fragment() {
    for frag_off in [0x2000u16, 0x0001, 0x1fff, 0x6000, 0x4001] {
        let mut f = frame();
        ip_mut(&mut f).frag_off.set(frag_off);
        assert_eq!(
            frame::parse_udp(&f),
            Err(FrameError::Fragment),
            "frag_off {frag_off:#x}"
        );
    }
    // DF alone, or the reserved bit, is not a fragment.
    for frag_off in [0x4000u16, 0x0000, 0x8000] {
        let mut f = frame();
        ip_mut(&mut f).frag_off.set(frag_off);
        assert!(frame::parse_udp(&f).is_ok());
    }
}

#[test]
fn frame_bad_lengths() {
    // IHL below 5 words.
    for vihl in [0x40u8, 0x44] {
        let mut f = frame();
        ip_mut(&mut f).version_ihl = vihl;
        assert_eq!(frame::parse_udp(&f), Err(FrameError::BadLength));
    }
    // Total length too small for the IP and UDP headers.
    for tot in [0u16, 20, 27] {
        let mut f = frame();
        ip_mut(&mut f).tot_len.set(tot);
        assert_eq!(
            frame::parse_udp(&f),
            Err(FrameError::BadLength),
            "tot_len {tot}"
        );
    }
    // IHL larger than the total length leaves no room for UDP.
    let mut f = frame_with(&[]);
    ip_mut(&mut f).version_ihl = 0x4f;
    assert_eq!(frame::parse_udp(&f), Err(FrameError::BadLength));
    // UDP length below its header, or past the IP payload.
    for ulen in [0u16, 7] {
        let mut f = frame();
        udp_mut(&mut f).len.set(ulen);
        assert_eq!(
            frame::parse_udp(&f),
            Err(FrameError::BadLength),
            "udp len {ulen}"
        );
    }
    let mut f = frame();
    let ulen = udp_mut(&mut f).len.get();
    udp_mut(&mut f).len.set(ulen + 1);
    assert_eq!(frame::parse_udp(&f), Err(FrameError::BadLength));
    // A UDP length shorter than the IP payload is accepted (and is what
    // payload_len reports).
    let mut f = frame();
    udp_mut(&mut f).len.set(ulen - 1);
    assert_eq!(
        frame::parse_udp(&f).unwrap().payload_len,
        ulen as usize - 1 - UDP_HLEN
    );
}

#[test]
fn checksum_known_header() {
    // The classic example: 4500 0073 0000 4000 4011 0000 c0a8 0001 c0a8 00c7.
    let mut hdr = [
        0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00,
        0x01, 0xc0, 0xa8, 0x00, 0xc7,
    ];
    assert_eq!(frame::checksum(&hdr), 0xb861);
    hdr[10..12].copy_from_slice(&0xb861u16.to_be_bytes());
    assert_eq!(frame::checksum(&hdr), 0);
    // write_headers produces the same checksum for the same fields.
    let flow = Flow {
        src_ip: [192, 168, 0, 1],
        dst_ip: [192, 168, 0, 199],
        ..FLOW
    };
    let payload = 0x73 - IPV4_MIN_HLEN - UDP_HLEN;
    let mut f = vec![0u8; PAYLOAD_OFFSET + payload];
    frame::write_headers(&mut f, &flow, payload).unwrap();
    assert_eq!(&f[ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN], &hdr);
}

#[test]
fn checksum_edges() {
    assert_eq!(frame::checksum(&[]), 0xffff);
    // An odd trailing byte is padded with a zero byte.
    assert_eq!(frame::checksum(&[0x12]), !0x1200);
    assert_eq!(
        frame::checksum(&[0x12, 0x34, 0x56]),
        frame::checksum(&[0x12, 0x34, 0x56, 0x00])
    );
    // RFC 1071's example words 0001 f203 f4f5 f6f7 sum (folded) to 0xddf2.
    assert_eq!(
        frame::checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
        !0xddf2
    );
    // Large inputs do not overflow the accumulator (a u32 one did past
    // 128 KiB of 0xff bytes): 0xffff words fold to 0xffff, complement 0.
    let big = vec![0xffu8; 1 << 20];
    assert_eq!(frame::checksum(&big), 0);
    let big = vec![0x01u8; 300_000];
    // 150_000 words of 0x0101: 0x0101 * 150_000 = 151_500_000, folded.
    let mut s: u64 = 0x0101 * 150_000;
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    assert_eq!(frame::checksum(&big), !(s as u16));
}

/// Fills in the UDP checksum of a frame built by `write_headers`.
fn with_udp_checksum(mut f: Vec<u8>) -> Vec<u8> {
    let udp_at = ETH_HLEN + IPV4_MIN_HLEN;
    let udp_len = f.len() - udp_at;
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[ETH_HLEN + 12..ETH_HLEN + 20]);
    pseudo.extend_from_slice(&[0, frame::IPPROTO_UDP]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    pseudo.extend_from_slice(&f[udp_at..]);
    let c = frame::checksum(&pseudo);
    // A computed 0 is sent as 0xffff (0 means "none").
    udp_mut(&mut f).check = zerocopy::network_endian::U16::new(if c == 0 { 0xffff } else { c });
    f
}

fn checksums_ok(f: &[u8]) -> bool {
    let udp_at = ETH_HLEN + IPV4_MIN_HLEN;
    frame::checksums_ok(&f[ETH_HLEN..udp_at], &f[udp_at..])
}

#[test]
fn checksums_are_verified() {
    let plain = frame();
    assert!(checksums_ok(&plain), "no UDP checksum (zero) is valid");
    let summed = with_udp_checksum(frame());
    assert_ne!(udp_mut(&mut summed.clone()).check.get(), 0);
    assert!(checksums_ok(&summed), "a right UDP checksum");
    // A wrong IPv4 header checksum.
    let mut bad_ip = plain.clone();
    let c = ip_mut(&mut bad_ip).check.get();
    ip_mut(&mut bad_ip).check = zerocopy::network_endian::U16::new(c ^ 0x0100);
    assert!(!checksums_ok(&bad_ip), "a wrong IPv4 checksum");
    // A payload byte changed under a non-zero UDP checksum.
    let mut bad_udp = summed.clone();
    let last = bad_udp.len() - 1;
    bad_udp[last] ^= 0x40;
    assert!(!checksums_ok(&bad_udp), "a wrong UDP checksum");
    // The same change without a UDP checksum is not detectable, and valid.
    let mut unsummed = plain.clone();
    unsummed[last] ^= 0x40;
    assert!(checksums_ok(&unsummed));
    // Odd lengths sum the last byte as a high byte.
    let odd = with_udp_checksum(frame_with(&[1, 2, 3]));
    assert!(checksums_ok(&odd));
}

/// A datagram whose header announces a tag must have room for it: the
/// records end 16 bytes before the payload does.
#[test]
fn tag_flag_needs_room_for_the_tag() {
    let mut b = exact(Kind::Request, &[valid(Kind::Request)]);
    let flags = devplane_wire::header::HDR_TAG | 0x0300;
    b[18..20].copy_from_slice(&flags.to_le_bytes());
    assert!(matches!(parse_err(&b), WireError::CountBeyondBuffer { .. }));
    assert!(!devplane_wire::header::count_fits(1, flags, b.len()));
    b.extend_from_slice(&[0u8; devplane_wire::TAG_LEN]);
    assert!(devplane_wire::header::count_fits(1, flags, b.len()));
    let d = Datagram::parse(&b).unwrap();
    assert_eq!((d.len(), d.key_id()), (1, Some(3)));
}
