//! The owner server's forward rewrite (`frame::forward_rewrite`, run by
//! the XDP program before `XDP_TX`): addresses changed as documented, both
//! checksums still right (checked against a full recomputation), the
//! payload untouched, and a TTL about to run out refused unchanged.

use devplane_wire::frame::{
    ETH_HLEN, EthHdr, Flow, ForwardError, IPV4_MIN_HLEN, Ipv4Hdr, PAYLOAD_OFFSET, UDP_HLEN, UdpHdr,
    checksum, checksums_ok, csum_replace2, forward_rewrite, parse_udp, write_headers,
};
use proptest::prelude::*;
use zerocopy::FromBytes;

const IP: std::ops::Range<usize> = ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN;
const UDP: std::ops::Range<usize> = ETH_HLEN + IPV4_MIN_HLEN..PAYLOAD_OFFSET;

/// A frame of `flow` with `payload`, its UDP checksum filled if `udp_sum`.
fn frame(flow: &Flow, payload: &[u8], udp_sum: bool, ttl: u8) -> Vec<u8> {
    let mut buf = vec![0u8; PAYLOAD_OFFSET + payload.len()];
    let n = write_headers(&mut buf, flow, payload.len()).unwrap();
    buf.truncate(n);
    buf[PAYLOAD_OFFSET..].copy_from_slice(payload);
    {
        let ip = Ipv4Hdr::mut_from_bytes(&mut buf[IP]).unwrap();
        ip.ttl = ttl;
        ip.check = 0.into();
        let c = checksum(zerocopy::IntoBytes::as_bytes(&*ip));
        ip.check = c.into();
    }
    if udp_sum {
        let udp_len = UDP_HLEN + payload.len();
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&flow.src_ip);
        pseudo.extend_from_slice(&flow.dst_ip);
        pseudo.extend_from_slice(&[0, 17]);
        pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
        pseudo.extend_from_slice(&buf[UDP.start..]);
        let c = match checksum(&pseudo) {
            0 => 0xffff,
            c => c,
        };
        buf[UDP.start + 6..UDP.start + 8].copy_from_slice(&c.to_be_bytes());
    }
    buf
}

fn rewrite(buf: &mut [u8], mac: [u8; 6], ip: [u8; 4], port: u16) -> Result<(), ForwardError> {
    let (eth, rest) = buf.split_at_mut(ETH_HLEN);
    let (iph, rest) = rest.split_at_mut(IPV4_MIN_HLEN);
    forward_rewrite(
        EthHdr::mut_from_bytes(eth).unwrap(),
        Ipv4Hdr::mut_from_bytes(iph).unwrap(),
        UdpHdr::mut_from_bytes(&mut rest[..UDP_HLEN]).unwrap(),
        mac,
        ip,
        port,
    )
}

fn flow(src_ip: [u8; 4], dst_ip: [u8; 4], src_port: u16, dst_port: u16) -> Flow {
    Flow {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip,
        dst_ip,
        src_port,
        dst_port,
    }
}

proptest! {
    #[test]
    fn forwarded_frames_keep_valid_checksums(
        src_ip: [u8; 4], dst_ip: [u8; 4], to_ip: [u8; 4],
        src_port: u16, dst_port in 1u16.., to_port: u16,
        to_mac: [u8; 6],
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        udp_sum: bool, ttl in 2u8..,
    ) {
        let f = flow(src_ip, dst_ip, src_port, dst_port);
        let mut buf = frame(&f, &payload, udp_sum, ttl);
        prop_assert!(checksums_ok(&buf[IP], &buf[UDP.start..]));
        rewrite(&mut buf, to_mac, to_ip, to_port).unwrap();
        prop_assert!(checksums_ok(&buf[IP], &buf[UDP.start..]), "checksums after the rewrite");
        let p = parse_udp(&buf).unwrap();
        prop_assert_eq!(p.flow.dst_mac, to_mac);
        prop_assert_eq!(p.flow.src_mac, f.src_mac, "the previous hop stays the source");
        prop_assert_eq!(p.flow.src_ip, src_ip, "the client stays the source");
        prop_assert_eq!(p.flow.dst_ip, to_ip);
        prop_assert_eq!(p.flow.src_port, src_port);
        prop_assert_eq!(p.flow.dst_port, if to_port == 0 { dst_port } else { to_port });
        prop_assert_eq!(buf[ETH_HLEN + 8], ttl - 1);
        prop_assert_eq!(&buf[PAYLOAD_OFFSET..], &payload[..]);
        let udp_check = u16::from_be_bytes([buf[UDP.start + 6], buf[UDP.start + 7]]);
        prop_assert_eq!(udp_check == 0, !udp_sum, "none stays none, a sum stays a sum");
    }
}

#[test]
fn an_expiring_ttl_is_refused_and_nothing_changes() {
    let f = flow([10, 0, 0, 1], [10, 0, 0, 2], 4000, 7700);
    for ttl in [0u8, 1] {
        let mut buf = frame(&f, b"devplane", true, ttl);
        let before = buf.clone();
        assert_eq!(
            rewrite(&mut buf, [2, 0, 0, 0, 0, 3], [10, 0, 0, 3], 0),
            Err(ForwardError::TtlExpired)
        );
        assert_eq!(buf, before);
    }
}

#[test]
fn incremental_update_matches_known_values() {
    // RFC 1624 section 4's example: checksum 0xdd2f, a word 0x5555
    // becoming 0x3285, gives 0x0000 (equation 3; equation 2 gave the
    // wrong 0xffff).
    assert_eq!(csum_replace2(0xdd2f, 0x5555, 0x3285), 0x0000);
}
