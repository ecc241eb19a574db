//! Property tests: every valid typed record survives an encode/parse round
//! trip, the writer respects its limits, and parsing arbitrary or mutated
//! bytes never panics and is exact.

use devplane_wire::datagram;
use devplane_wire::record::{
    FLAG_POSTED, FLAG_RETRANSMIT, OP_ACK, OP_INTERRUPT, OP_PIO_OUT, OP_RESPONSE,
};
use devplane_wire::{
    Access, AccessSize, Ack, Datagram, DatagramWriter, HEADER_LEN, Header, Interrupt, IrqAction,
    Kind, MAX_DATAGRAM, MAX_RECORDS, RECORD_LEN, RawRecord, Record, Request, RequestId, Response,
    Status, WireError,
};
use proptest::prelude::*;
use proptest::sample::select;

const KINDS: [Kind; 4] = [Kind::Request, Kind::Response, Kind::Interrupt, Kind::Ack];

fn any_kind() -> impl Strategy<Value = Kind> {
    select(KINDS.to_vec())
}

fn request_id() -> impl Strategy<Value = RequestId> {
    (any::<u32>(), any::<u32>(), any::<u16>(), any::<u64>()).prop_map(
        |(vm, hypervisor, vcpu, seq)| RequestId {
            vm,
            hypervisor,
            vcpu,
            seq,
        },
    )
}

fn pio_size() -> impl Strategy<Value = AccessSize> {
    select(vec![AccessSize::B1, AccessSize::B2, AccessSize::B4])
}

fn any_size() -> impl Strategy<Value = AccessSize> {
    select(vec![
        AccessSize::B1,
        AccessSize::B2,
        AccessSize::B4,
        AccessSize::B8,
    ])
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![
        (any::<u16>(), pio_size()).prop_map(|(port, size)| Access::PioIn { port, size }),
        (any::<u16>(), pio_size(), any::<u32>()).prop_map(|(port, size, data)| Access::PioOut {
            port,
            size,
            data: data & size.mask() as u32,
        }),
        (any::<u64>(), any_size()).prop_map(|(gpa, size)| Access::MmioRead { gpa, size }),
        (any::<u64>(), any_size(), any::<u64>()).prop_map(|(gpa, size, data)| Access::MmioWrite {
            gpa,
            size,
            data: data & size.mask(),
        }),
    ]
}

fn request() -> impl Strategy<Value = Record> {
    (
        request_id(),
        access(),
        select(vec![
            0,
            FLAG_POSTED,
            FLAG_RETRANSMIT,
            FLAG_POSTED | FLAG_RETRANSMIT,
        ]),
    )
        .prop_map(|(id, access, flags)| Record::Request(Request { id, access, flags }))
}

fn response() -> impl Strategy<Value = Record> {
    (
        request_id(),
        select(vec![
            Status::Ok,
            Status::Unmapped,
            Status::Rejected,
            Status::NoSuchModel,
            Status::Stale,
        ]),
        any_size(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(id, status, size, addr, data)| {
            Record::Response(Response {
                id,
                status,
                size,
                addr,
                data: data & size.mask(),
            })
        })
}

fn interrupt() -> impl Strategy<Value = Record> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        select(vec![
            IrqAction::Assert,
            IrqAction::Deassert,
            IrqAction::Edge,
        ]),
        any::<u64>(),
    )
        .prop_map(|(vm, hypervisor, line, action, seq)| {
            Record::Interrupt(Interrupt {
                vm,
                hypervisor,
                line,
                action,
                seq,
            })
        })
}

fn ack() -> impl Strategy<Value = Record> {
    request_id().prop_map(|id| Record::Ack(Ack { id }))
}

/// A valid record of `kind`.
fn record_of(kind: Kind) -> BoxedStrategy<Record> {
    match kind {
        Kind::Request => request().boxed(),
        Kind::Response => response().boxed(),
        Kind::Interrupt => interrupt().boxed(),
        Kind::Ack => ack().boxed(),
    }
}

/// Any valid record.
fn any_record() -> impl Strategy<Value = Record> {
    any_kind().prop_flat_map(record_of)
}

/// A valid datagram: a header and 1..=MAX_RECORDS records of its kind.
#[derive(Debug, Clone)]
struct Dgram {
    header: Header,
    records: Vec<Record>,
}

fn dgram() -> impl Strategy<Value = Dgram> {
    (any_kind(), any::<u32>(), any::<u32>(), any::<u32>()).prop_flat_map(
        |(kind, model, server, client)| {
            proptest::collection::vec(record_of(kind), 1..=MAX_RECORDS).prop_map(move |records| {
                Dgram {
                    header: Header::new(kind, model, server, client),
                    records,
                }
            })
        },
    )
}

fn encode(d: &Dgram) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let n = datagram::encode(&mut buf, d.header, &d.records).expect("valid datagram encodes");
    buf[..n].to_vec()
}

/// Re-encodes a parsed datagram with its own header; exact parsing means
/// this reproduces the parsed bytes.
fn reencode(dg: &Datagram<'_>) -> Vec<u8> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut w = DatagramWriter::new(&mut buf, *dg.header()).expect("parsed header re-encodes");
    for r in dg.records() {
        w.push(&r).expect("parsed record re-encodes");
    }
    let n = w.finish();
    buf[..n].to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn record_roundtrip(rec in any_record(), index in 0usize..MAX_RECORDS) {
        let raw = RawRecord::encode(&rec);
        prop_assert_eq!(raw.decode(index, rec.kind()), Ok(rec));
    }

    #[test]
    fn datagram_roundtrip(d in dgram()) {
        let bytes = encode(&d);
        prop_assert_eq!(bytes.len(), HEADER_LEN + d.records.len() * RECORD_LEN);

        // The writer, pushed by hand, produces the same bytes.
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut w = DatagramWriter::new(&mut buf, d.header).unwrap();
        prop_assert!(w.is_empty());
        for (i, r) in d.records.iter().enumerate() {
            prop_assert_eq!(w.count(), i);
            w.push(r).unwrap();
        }
        prop_assert_eq!(w.is_full(), d.records.len() == MAX_RECORDS);
        prop_assert_eq!(w.len(), bytes.len());
        let n = w.finish();
        prop_assert_eq!(&buf[..n], &bytes[..]);

        let dg = Datagram::parse(&bytes).unwrap();
        let kind = d.records[0].kind();
        prop_assert_eq!(dg.kind(), kind);
        prop_assert_eq!(dg.header().kind, kind as u8);
        prop_assert_eq!(dg.model(), d.header.model.get());
        prop_assert_eq!(dg.server(), d.header.server.get());
        prop_assert_eq!(dg.client(), d.header.client.get());
        prop_assert_eq!(dg.header().count.get() as usize, d.records.len());
        prop_assert_eq!(dg.header().magic.get(), devplane_wire::MAGIC);
        prop_assert_eq!(dg.header().version, devplane_wire::VERSION);
        prop_assert_eq!(dg.len(), d.records.len());
        prop_assert!(!dg.is_empty());
        let recs: Vec<Record> = dg.records().collect();
        prop_assert_eq!(&recs, &d.records);
        let raws: Vec<RawRecord> = d.records.iter().map(RawRecord::encode).collect();
        prop_assert_eq!(dg.raw_records(), &raws[..]);
        prop_assert_eq!(reencode(&dg), bytes);
    }

    /// The writer holds at most as many records as its buffer (capped at
    /// MAX_DATAGRAM) fits, then answers Full without writing.
    #[test]
    fn writer_respects_buffer(len in HEADER_LEN..MAX_DATAGRAM + 200, rec in any_record()) {
        // Room for the tag is left after the records.
        let max = ((len.min(MAX_DATAGRAM) - HEADER_LEN).saturating_sub(devplane_wire::TAG_LEN)
            / RECORD_LEN)
            .min(MAX_RECORDS);
        let mut buf = vec![0u8; len];
        let header = Header::new(rec.kind(), 1, 2, 3);
        let mut w = DatagramWriter::new(&mut buf, header).unwrap();
        for _ in 0..max {
            prop_assert!(!w.is_full());
            w.push(&rec).unwrap();
        }
        prop_assert!(w.is_full());
        prop_assert_eq!(w.push(&rec), Err(WireError::Full));
        prop_assert_eq!(w.push_raw(&RawRecord::encode(&rec)), Err(WireError::Full));
        prop_assert_eq!(w.count(), max);
        let n = w.finish();
        prop_assert_eq!(n, HEADER_LEN + max * RECORD_LEN);
        prop_assert!(max == 0 || n + devplane_wire::TAG_LEN <= len);
        if max == 0 {
            prop_assert_eq!(Datagram::parse(&buf[..n]).unwrap_err(), WireError::Empty);
        } else {
            let dg = Datagram::parse(&buf[..n]).unwrap();
            prop_assert_eq!(dg.len(), max);
            prop_assert!(dg.records().all(|r| r == rec));
        }
    }

    /// A record of another kind is refused with OpNotAllowed, naming the
    /// position it would have taken, and nothing is written.
    #[test]
    fn writer_refuses_wrong_kind(
        kind in any_kind(),
        other in any_record(),
        before in proptest::collection::vec(any_record(), 0..5),
    ) {
        prop_assume!(other.kind() != kind);
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut w = DatagramWriter::new(&mut buf, Header::new(kind, 0, 0, 0)).unwrap();
        let mut n = 0;
        for r in before.iter().filter(|r| r.kind() == kind) {
            w.push(r).unwrap();
            n += 1;
        }
        let op = RawRecord::encode(&other).op;
        prop_assert_eq!(w.push(&other), Err(WireError::OpNotAllowed { index: n, op, kind }));
        prop_assert_eq!(w.count(), n);
    }

    /// Parsing arbitrary bytes never panics; whatever it accepts re-encodes
    /// to exactly those bytes.
    #[test]
    fn parse_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
        if let Ok(dg) = Datagram::parse(&bytes) {
            prop_assert_eq!(reencode(&dg), bytes);
        }
    }

    /// Arbitrary records behind a valid header: gets past the header checks
    /// far more often than fully random bytes.
    #[test]
    fn parse_arbitrary_records(
        kind in any_kind(),
        count in 0u16..40,
        body in proptest::collection::vec(any::<u8>(), 0..(40 * RECORD_LEN)),
    ) {
        let mut header = Header::new(kind, 7, 8, 9);
        header.count.set(count);
        let mut bytes = zerocopy::IntoBytes::as_bytes(&header).to_vec();
        bytes.extend_from_slice(&body);
        if let Ok(dg) = Datagram::parse(&bytes) {
            prop_assert_eq!(dg.len(), count as usize);
            prop_assert_eq!(reencode(&dg), bytes);
        }
    }

    /// Changing any one byte of a valid datagram either is rejected or
    /// parses to records that re-encode to exactly the mutated bytes.
    #[test]
    fn mutate_one_byte(d in dgram(), pos in any::<prop::sample::Index>(), value in any::<u8>()) {
        let mut bytes = encode(&d);
        let i = pos.index(bytes.len());
        bytes[i] = value;
        if let Ok(dg) = Datagram::parse(&bytes) {
            prop_assert_eq!(reencode(&dg), bytes);
        }
    }

    /// Flipping any one bit of a valid datagram: as above; single-bit
    /// changes reach near-valid values (flags, sizes, masks) more often.
    #[test]
    fn flip_one_bit(d in dgram(), pos in any::<prop::sample::Index>(), bit in 0u8..8) {
        let mut bytes = encode(&d);
        let i = pos.index(bytes.len());
        bytes[i] ^= 1 << bit;
        if let Ok(dg) = Datagram::parse(&bytes) {
            prop_assert_eq!(reencode(&dg), bytes);
        }
    }
}

#[test]
fn writer_full_after_max_records() {
    let mut buf = [0u8; MAX_DATAGRAM];
    let rec = Record::Ack(Ack {
        id: RequestId::default(),
    });
    let mut w = DatagramWriter::new(&mut buf, Header::new(Kind::Ack, 1, 2, 3)).unwrap();
    for _ in 0..MAX_RECORDS {
        w.push(&rec).unwrap();
    }
    assert!(w.is_full());
    assert_eq!(w.push(&rec), Err(WireError::Full));
    assert_eq!(w.finish(), HEADER_LEN + MAX_RECORDS * RECORD_LEN);
    const { assert!(HEADER_LEN + MAX_RECORDS * RECORD_LEN <= MAX_DATAGRAM) };

    // encode() with one record too many also says Full.
    let too_many = vec![rec; MAX_RECORDS + 1];
    assert_eq!(
        datagram::encode(&mut buf, Header::new(Kind::Ack, 1, 2, 3), &too_many),
        Err(WireError::Full)
    );
}

#[test]
fn writer_in_oversized_buffer_stops_at_max_records() {
    let mut buf = vec![0u8; 64 * 1024];
    let rec = Record::Ack(Ack {
        id: RequestId::default(),
    });
    let mut w = DatagramWriter::new(&mut buf, Header::new(Kind::Ack, 0, 0, 0)).unwrap();
    let mut n = 0;
    while w.push(&rec).is_ok() {
        n += 1;
    }
    assert_eq!(n, MAX_RECORDS);
}

#[test]
fn writer_small_buffers() {
    let rec = Record::Ack(Ack {
        id: RequestId::default(),
    });
    let header = Header::new(Kind::Ack, 0, 0, 0);
    // Header only: no record fits.
    let mut buf = [0u8; HEADER_LEN + RECORD_LEN - 1];
    let mut w = DatagramWriter::new(&mut buf, header).unwrap();
    assert!(w.is_full());
    assert_eq!(w.push(&rec), Err(WireError::Full));
    // Exactly two records and their tag.
    let mut buf = [0u8; HEADER_LEN + 2 * RECORD_LEN + devplane_wire::TAG_LEN];
    let mut w = DatagramWriter::new(&mut buf, header).unwrap();
    w.push(&rec).unwrap();
    w.push(&rec).unwrap();
    assert_eq!(w.push(&rec), Err(WireError::Full));
    assert_eq!(w.finish(), buf.len() - devplane_wire::TAG_LEN);
}

#[test]
fn writer_buffer_too_small() {
    let header = Header::new(Kind::Request, 0, 0, 0);
    for len in 0..HEADER_LEN {
        let mut buf = vec![0u8; len];
        assert_eq!(
            DatagramWriter::new(&mut buf, header).unwrap_err(),
            WireError::BufferTooSmall { have: len }
        );
        assert_eq!(
            datagram::encode(&mut buf, header, &[]).unwrap_err(),
            WireError::BufferTooSmall { have: len }
        );
    }
    let mut buf = [0u8; HEADER_LEN];
    let w = DatagramWriter::new(&mut buf, header).unwrap();
    assert_eq!(w.finish(), HEADER_LEN);
}

#[test]
fn writer_unknown_kind() {
    let mut header = Header::new(Kind::Request, 0, 0, 0);
    header.kind = 9;
    let mut buf = [0u8; MAX_DATAGRAM];
    assert_eq!(
        DatagramWriter::new(&mut buf, header).unwrap_err(),
        WireError::UnknownKind(9)
    );
}

#[test]
fn writer_overwrites_header_count() {
    let mut header = Header::new(Kind::Ack, 0, 0, 0);
    header.count.set(17);
    let mut buf = [0xaau8; MAX_DATAGRAM];
    let w = DatagramWriter::new(&mut buf, header).unwrap();
    assert_eq!(w.finish(), HEADER_LEN);
    assert_eq!(Header::parse(&buf).unwrap().0.count.get(), 0);
}

#[test]
fn writer_wrong_kind_ops() {
    let mut buf = [0u8; MAX_DATAGRAM];
    let mut w = DatagramWriter::new(&mut buf, Header::new(Kind::Request, 0, 0, 0)).unwrap();
    let id = RequestId::default();
    let cases = [
        (
            Record::Response(Response {
                id,
                status: Status::Ok,
                size: AccessSize::B1,
                addr: 0,
                data: 0,
            }),
            OP_RESPONSE,
        ),
        (
            Record::Interrupt(Interrupt {
                vm: 0,
                hypervisor: 0,
                line: 0,
                action: IrqAction::Edge,
                seq: 0,
            }),
            OP_INTERRUPT,
        ),
        (Record::Ack(Ack { id }), OP_ACK),
    ];
    for (rec, op) in cases {
        assert_eq!(
            w.push(&rec),
            Err(WireError::OpNotAllowed {
                index: 0,
                op,
                kind: Kind::Request
            })
        );
    }
    let out = Record::Request(Request {
        id,
        access: Access::PioOut {
            port: 0x3f8,
            size: AccessSize::B1,
            data: 0x41,
        },
        flags: FLAG_POSTED,
    });
    w.push(&out).unwrap();
    let mut buf2 = [0u8; MAX_DATAGRAM];
    let mut w2 = DatagramWriter::new(&mut buf2, Header::new(Kind::Ack, 0, 0, 0)).unwrap();
    assert_eq!(
        w2.push(&out),
        Err(WireError::OpNotAllowed {
            index: 0,
            op: OP_PIO_OUT,
            kind: Kind::Ack
        })
    );
}
