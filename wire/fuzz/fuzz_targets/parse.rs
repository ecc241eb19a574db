//! Parses arbitrary bytes as a datagram and as a frame. Neither may panic,
//! and a datagram that parses must re-encode to exactly the input bytes
//! (parsing is exact: nothing is accepted that the encoder would not write).
#![no_main]

use devplane_wire::{Datagram, DatagramWriter, MAX_DATAGRAM, frame};
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
        assert_eq!(&buf[..n], data, "re-encoding differs from the parsed bytes");
    }

    if let Ok(f) = frame::parse_udp(data) {
        assert!(f.payload_offset + f.payload_len <= data.len());
        // The payload, if a datagram, parses without panicking too.
        let _ = Datagram::parse(&data[f.payload_offset..f.payload_offset + f.payload_len]);
    }
});
