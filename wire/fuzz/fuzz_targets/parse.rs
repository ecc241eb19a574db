//! Parses arbitrary bytes as a datagram and as a frame. Neither may panic,
//! and a datagram that parses must re-encode to exactly the input bytes
//! before its tag (parsing is exact: nothing is accepted that the encoder
//! would not write; a tagged datagram's trailing tag is the sealer's, which
//! `tag::verify` checks, not the parser).
#![no_main]

use devplane_wire::{Datagram, DatagramWriter, MAX_DATAGRAM, bulk, frame, header::tag_len};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(dg) = Datagram::parse(data) {
        assert!(data.len() <= MAX_DATAGRAM);
        assert_eq!(dg.records().count(), dg.len());
        let mut buf = [0u8; MAX_DATAGRAM];
        let mut w = DatagramWriter::new(&mut buf, *dg.header()).expect("parsed header re-encodes");
        for rec in dg.records() {
            w.push(&rec).expect("parsed record re-encodes");
        }
        let n = w.finish();
        let tag = tag_len(dg.header().flags.get());
        assert_eq!(n + tag, data.len(), "the tag is all that follows the records");
        assert_eq!(&buf[..n], &data[..n], "re-encoding differs from the parsed bytes");
    }

    // As a bulk datagram: within its bound, and a data segment is where
    // its (len, nseg, seg) put it, inside the request.
    if let Ok(b) = bulk::Bulk::parse(data) {
        assert!(data.len() <= bulk::MAX_BULK_DATAGRAM);
        let (len, nseg, seg) = (b.rec.len.get(), b.rec.nseg.get(), b.seg());
        assert!(seg < nseg && len <= bulk::MAX_BLOCK_LEN);
        let carries = if b.request {
            b.op.request_has_data() && b.rec.flags & bulk::BF_PROBE == 0
        } else {
            b.op == bulk::BlockOp::Read && b.status == bulk::BlockStatus::Ok
        };
        if carries {
            assert!(bulk::nseg_ok(len, nseg));
            let (a, e) = bulk::seg_range(len, nseg, seg);
            assert_eq!(e - a, b.data.len());
            assert!(e <= len as usize && b.data.len() <= bulk::SEG_DATA_MAX);
        }
    }

    if let Ok(f) = frame::parse_udp(data) {
        assert!(f.payload_offset + f.payload_len <= data.len());
        // The payload, if a datagram, parses without panicking too.
        let _ = Datagram::parse(&data[f.payload_offset..f.payload_offset + f.payload_len]);
    }
});
