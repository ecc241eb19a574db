//! Builds typed records from fuzzer bytes, encodes them and parses them
//! back: a record that decodes must round-trip exactly, and a datagram of
//! valid records must parse to the same header and records.
#![no_main]

use devplane_wire::{
    Access, AccessSize, Ack, Datagram, Header, Interrupt, IrqAction, Kind, MAX_DATAGRAM,
    MAX_RECORDS, RawRecord, Record, Request, RequestId, Response, Status, datagram,
};
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;

fn id(u: &mut Unstructured<'_>) -> Result<RequestId> {
    Ok(RequestId {
        vm: u.arbitrary()?,
        hypervisor: u.arbitrary()?,
        vcpu: u.arbitrary()?,
        seq: u.arbitrary()?,
    })
}

/// Any size byte decoded loosely, so that invalid sizes are produced too.
fn size(u: &mut Unstructured<'_>) -> Result<AccessSize> {
    Ok(*u.choose(&[
        AccessSize::B1,
        AccessSize::B2,
        AccessSize::B4,
        AccessSize::B8,
    ])?)
}

/// A typed record of `kind`; fields are arbitrary, so some are invalid on
/// the wire (PIO size 8, data wider than the size, unknown flags).
fn record(u: &mut Unstructured<'_>, kind: Kind) -> Result<Record> {
    Ok(match kind {
        Kind::Request => {
            let size = size(u)?;
            let access = match u.int_in_range(0..=3u8)? {
                0 => Access::PioIn {
                    port: u.arbitrary()?,
                    size,
                },
                1 => Access::PioOut {
                    port: u.arbitrary()?,
                    size,
                    data: u.arbitrary()?,
                },
                2 => Access::MmioRead {
                    gpa: u.arbitrary()?,
                    size,
                },
                _ => Access::MmioWrite {
                    gpa: u.arbitrary()?,
                    size,
                    data: u.arbitrary()?,
                },
            };
            Record::Request(Request {
                id: id(u)?,
                access,
                flags: u.arbitrary()?,
            })
        }
        Kind::Response => Record::Response(Response {
            id: id(u)?,
            status: *u.choose(&[
                Status::Ok,
                Status::Unmapped,
                Status::Rejected,
                Status::NoSuchModel,
                Status::Stale,
                Status::Busy,
            ])?,
            size: size(u)?,
            addr: u.arbitrary()?,
            data: u.arbitrary()?,
        }),
        Kind::Interrupt => Record::Interrupt(Interrupt {
            vm: u.arbitrary()?,
            hypervisor: u.arbitrary()?,
            line: u.arbitrary()?,
            action: *u.choose(&[IrqAction::Assert, IrqAction::Deassert, IrqAction::Edge])?,
            seq: u.arbitrary()?,
        }),
        Kind::Ack => Record::Ack(Ack { id: id(u)? }),
    })
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let kind = *u.choose(&[Kind::Request, Kind::Response, Kind::Interrupt, Kind::Ack])?;
    let header = Header::new(kind, u.arbitrary()?, u.arbitrary()?, u.arbitrary()?);
    let n = u.int_in_range(1..=MAX_RECORDS)?;
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        let rec = record(u, kind)?;
        // Each record either decodes to itself or is rejected.
        if let Ok(back) = RawRecord::encode(&rec).decode(i, kind) {
            assert_eq!(back, rec);
            records.push(rec);
        }
    }
    let mut buf = [0u8; MAX_DATAGRAM];
    let len =
        datagram::encode(&mut buf, header, &records).expect("at most MAX_RECORDS records fit");
    match Datagram::parse(&buf[..len]) {
        Ok(dg) => {
            assert_eq!(dg.kind(), kind);
            assert_eq!(dg.model(), header.model.get());
            assert_eq!(dg.server(), header.server.get());
            assert_eq!(dg.client(), header.client.get());
            assert!(dg.records().eq(records.iter().copied()));
        }
        Err(e) => {
            // Only an empty datagram (every record was invalid) is refused.
            assert!(records.is_empty(), "valid records refused: {e:?}");
        }
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});
