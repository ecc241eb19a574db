//! Ethernet II / IPv4 / UDP layouts, shared by the XDP program (which parses
//! them), the AF_XDP workers (which rewrite them in place to answer) and the
//! tests (which craft them).

use zerocopy::network_endian::U16;
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Ethernet II header length.
pub const ETH_HLEN: usize = 14;
/// Minimal IPv4 header length (no options).
pub const IPV4_MIN_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// Ethertype: IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// Ethertype: ARP.
pub const ETH_P_ARP: u16 = 0x0806;
/// Ethertype: 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// Ethertype: IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// Offset of the UDP payload in a frame whose IPv4 header has no options.
pub const PAYLOAD_OFFSET: usize = ETH_HLEN + IPV4_MIN_HLEN + UDP_HLEN;

/// Ethernet II header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// Ethertype (big-endian).
    pub ethertype: U16,
}

/// IPv4 header without options.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words.
    pub version_ihl: u8,
    /// DSCP/ECN.
    pub tos: u8,
    /// Total length.
    pub tot_len: U16,
    /// Identification.
    pub id: U16,
    /// Flags and fragment offset.
    pub frag_off: U16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Header checksum.
    pub check: U16,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
}

/// UDP header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned,
)]
#[repr(C)]
pub struct UdpHdr {
    /// Source port.
    pub src: U16,
    /// Destination port.
    pub dst: U16,
    /// Length of header and payload.
    pub len: U16,
    /// Checksum (0: none).
    pub check: U16,
}

/// IPv4 "more fragments" flag and fragment-offset mask.
pub const IP_MF_OFFSET_MASK: u16 = 0x3fff;

impl Ipv4Hdr {
    /// Whether the version nibble says IPv4.
    #[inline(always)]
    pub fn is_v4(&self) -> bool {
        self.version_ihl >> 4 == 4
    }

    /// The header length in bytes, options included (may be below
    /// [`IPV4_MIN_HLEN`] in a bad header: see [`Ipv4Hdr::header_len_ok`]).
    #[inline(always)]
    pub fn header_len(&self) -> usize {
        ((self.version_ihl & 0x0f) as usize) * 4
    }

    /// Whether the header length is at least the minimal header's.
    #[inline(always)]
    pub fn header_len_ok(&self) -> bool {
        self.header_len() >= IPV4_MIN_HLEN
    }

    /// Whether this is a fragment (the first or a later one).
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag_off.get() & IP_MF_OFFSET_MASK != 0
    }
}

/// Whether the IPv4 total length `tot_len`, the IPv4 header length `ihl`
/// and the UDP length `udp_len` agree: the UDP header fits the IPv4
/// packet, and the UDP datagram is at least its header and at most what
/// the IPv4 packet carries.
#[inline(always)]
pub fn udp_lengths_ok(tot_len: usize, ihl: usize, udp_len: usize) -> bool {
    tot_len >= ihl + UDP_HLEN && udp_len >= UDP_HLEN && udp_len <= tot_len - ihl
}

/// The Internet checksum (RFC 1071) of `data`, folded and complemented.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum_words(data, 0))
}

/// One's-complement sum of `data` as big-endian 16-bit words, added to
/// `sum` (not folded): congruent modulo 0xffff to the plain word-by-word
/// sum, and zero only when it is, which is all [`fold`] keeps. Written by
/// hand because it runs on every byte of every datagram a worker takes
/// (bulk segments of ~1.4 KB): it adds native-endian 32-bit words into a
/// u64, which the compiler vectorises, and turns the folded result into
/// big-endian order at the end (RFC 1071 2(B): the sum is byte-order
/// independent up to one swap). The 16-bit loop it replaced was 4x slower
/// (`frame::tests::sum_words_matches_the_word_by_word_sum` checks the two
/// agree). A u64 accumulator cannot overflow below 2^32 words.
fn sum_words(data: &[u8], sum: u64) -> u64 {
    let mut chunks = data.chunks_exact(4);
    let mut ne: u64 = 0;
    for c in &mut chunks {
        ne += u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) as u64;
    }
    let rest = chunks.remainder();
    let mut pairs = rest.chunks_exact(2);
    for c in &mut pairs {
        ne += u16::from_ne_bytes([c[0], c[1]]) as u64;
    }
    if let [b] = pairs.remainder() {
        ne += u16::from_ne_bytes([*b, 0]) as u64;
    }
    let folded = fold(ne);
    sum + if cfg!(target_endian = "little") {
        folded.swap_bytes()
    } else {
        folded
    } as u64
}

fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Whether the checksums of a UDP/IPv4 frame hold: the IPv4 header's
/// (`ip` is the whole header, options included), and the UDP one unless it
/// is zero (none, which IPv4 allows). `udp` is the UDP header and payload
/// (the UDP length's worth).
pub fn checksums_ok(ip: &[u8], udp: &[u8]) -> bool {
    if fold(sum_words(ip, 0)) != 0xffff {
        return false;
    }
    let Some(check) = udp.get(6..8) else {
        return false;
    };
    if check == [0, 0] {
        return true;
    }
    let (Some(src), Some(dst)) = (ip.get(12..16), ip.get(16..20)) else {
        return false;
    };
    let pseudo = sum_words(src, 0) + sum_words(dst, 0) + IPPROTO_UDP as u64 + udp.len() as u64;
    fold(sum_words(udp, pseudo)) == 0xffff
}

/// RFC 1624 incremental update of the Internet checksum `check` (as
/// stored: complemented) for one 16-bit word of the summed data going
/// from `old` to `new`: `~(~check + ~old + new)`, folded.
#[inline(always)]
pub fn csum_replace2(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// [`csum_replace2`] for a 4-byte field (an IPv4 address) going from
/// `old` to `new`.
#[inline(always)]
pub fn csum_replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let c = csum_replace2(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    csum_replace2(
        c,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// Why [`forward_rewrite`] refused a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardError {
    /// The TTL would reach zero: a forwarding loop (or a path too long).
    TtlExpired,
}

/// Rewrites a request frame, in place, for an owner server to send on to
/// the I/O server hosting its model (the patent's Fig. 6; the XDP
/// program's forward step, then `XDP_TX`): Ethernet destination the next
/// hop `to_mac`, IPv4 destination `to_ip`, TTL one less, UDP destination
/// port `to_port` (0: unchanged), and both checksums updated
/// incrementally (a zero UDP checksum, "none", stays zero). The sources
/// stay: the IPv4 source and port are the client's, so the I/O server
/// answers and interrupts the client straight; the Ethernet source is
/// the hop the frame came from (the client on one segment, its router
/// otherwise), which is where the I/O server's worker, answering in place
/// by swapping addresses, sends the answer's first hop. A TTL that would
/// reach zero is refused and nothing is changed, so a forwarding loop
/// ends.
#[inline(always)]
pub fn forward_rewrite(
    eth: &mut EthHdr,
    ip: &mut Ipv4Hdr,
    udp: &mut UdpHdr,
    to_mac: [u8; 6],
    to_ip: [u8; 4],
    to_port: u16,
) -> Result<(), ForwardError> {
    if ip.ttl <= 1 {
        return Err(ForwardError::TtlExpired);
    }
    eth.dst = to_mac;
    let old_ip = ip.dst;
    // TTL and protocol share a 16-bit word of the IPv4 header.
    let old_word = u16::from_be_bytes([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    let new_word = u16::from_be_bytes([ip.ttl, ip.proto]);
    let mut check = csum_replace2(ip.check.get(), old_word, new_word);
    check = csum_replace4(check, old_ip, to_ip);
    ip.check = U16::new(check);
    ip.dst = to_ip;
    let old_port = udp.dst.get();
    let new_port = if to_port == 0 { old_port } else { to_port };
    udp.dst = U16::new(new_port);
    let ucheck = udp.check.get();
    if ucheck != 0 {
        // The pseudo-header holds the destination address.
        let mut c = csum_replace4(ucheck, old_ip, to_ip);
        c = csum_replace2(c, old_port, new_port);
        // A computed zero is sent as all ones (zero means "none").
        udp.check = U16::new(if c == 0 { 0xffff } else { c });
    }
    Ok(())
}

/// Addresses of one UDP/IPv4 flow endpoint pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Source MAC.
    pub src_mac: [u8; 6],
    /// Destination MAC.
    pub dst_mac: [u8; 6],
    /// Source IPv4 address.
    pub src_ip: [u8; 4],
    /// Destination IPv4 address.
    pub dst_ip: [u8; 4],
    /// Source UDP port.
    pub src_port: u16,
    /// Destination UDP port.
    pub dst_port: u16,
}

impl Flow {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Flow {
        Flow {
            src_mac: self.dst_mac,
            dst_mac: self.src_mac,
            src_ip: self.dst_ip,
            dst_ip: self.src_ip,
            src_port: self.dst_port,
            dst_port: self.src_port,
        }
    }
}

/// Writes Ethernet, IPv4 (no options, DF set, checksum filled) and UDP
/// (checksum 0) headers for a payload of `payload_len` bytes at the start of
/// `buf`. Returns the frame length, or `None` if `buf` is too small.
pub fn write_headers(buf: &mut [u8], flow: &Flow, payload_len: usize) -> Option<usize> {
    let total = PAYLOAD_OFFSET.checked_add(payload_len)?;
    if buf.len() < total || payload_len > u16::MAX as usize - IPV4_MIN_HLEN - UDP_HLEN {
        return None;
    }
    let eth = EthHdr {
        dst: flow.dst_mac,
        src: flow.src_mac,
        ethertype: U16::new(ETH_P_IP),
    };
    buf[..ETH_HLEN].copy_from_slice(eth.as_bytes());
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: U16::new((IPV4_MIN_HLEN + UDP_HLEN + payload_len) as u16),
        id: U16::new(0),
        frag_off: U16::new(0x4000),
        ttl: 64,
        proto: IPPROTO_UDP,
        check: U16::new(0),
        src: flow.src_ip,
        dst: flow.dst_ip,
    };
    ip.check = U16::new(checksum(ip.as_bytes()));
    buf[ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN].copy_from_slice(ip.as_bytes());
    let udp = UdpHdr {
        src: U16::new(flow.src_port),
        dst: U16::new(flow.dst_port),
        len: U16::new((UDP_HLEN + payload_len) as u16),
        check: U16::new(0),
    };
    buf[ETH_HLEN + IPV4_MIN_HLEN..PAYLOAD_OFFSET].copy_from_slice(udp.as_bytes());
    Some(total)
}

/// Why a frame is not a well-formed UDP/IPv4 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Shorter than its headers say.
    #[error("frame truncated")]
    Truncated,
    /// Not IPv4 (or VLAN-tagged).
    #[error("not an IPv4 frame")]
    NotIpv4,
    /// IPv4 but not UDP.
    #[error("not UDP")]
    NotUdp,
    /// A fragment.
    #[error("IPv4 fragment")]
    Fragment,
    /// Inconsistent header lengths.
    #[error("bad header length")]
    BadLength,
}

/// A parsed UDP/IPv4 frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UdpFrame {
    /// Addresses, as seen in the frame.
    pub flow: Flow,
    /// Offset of the UDP payload in the frame.
    pub payload_offset: usize,
    /// Length of the UDP payload (from the UDP header).
    pub payload_len: usize,
}

/// Parses an Ethernet II / IPv4 / UDP frame, IPv4 options allowed.
pub fn parse_udp(frame: &[u8]) -> Result<UdpFrame, FrameError> {
    let (eth, rest) = EthHdr::ref_from_prefix(frame).map_err(|_| FrameError::Truncated)?;
    if eth.ethertype.get() != ETH_P_IP {
        return Err(FrameError::NotIpv4);
    }
    let (ip, _) = Ipv4Hdr::ref_from_prefix(rest).map_err(|_| FrameError::Truncated)?;
    if !ip.is_v4() {
        return Err(FrameError::NotIpv4);
    }
    if !ip.header_len_ok() {
        return Err(FrameError::BadLength);
    }
    let ihl = ip.header_len();
    if ip.proto != IPPROTO_UDP {
        return Err(FrameError::NotUdp);
    }
    if ip.is_fragment() {
        return Err(FrameError::Fragment);
    }
    let tot = ip.tot_len.get() as usize;
    if tot > rest.len() {
        return Err(FrameError::Truncated);
    }
    if tot < ihl + UDP_HLEN {
        return Err(FrameError::BadLength);
    }
    let (udp, _) = UdpHdr::ref_from_prefix(&rest[ihl..]).map_err(|_| FrameError::Truncated)?;
    let ulen = udp.len.get() as usize;
    if !udp_lengths_ok(tot, ihl, ulen) {
        return Err(FrameError::BadLength);
    }
    let mut src_ip = [0; 4];
    src_ip.copy_from_slice(&ip.src);
    Ok(UdpFrame {
        flow: Flow {
            src_mac: eth.src,
            dst_mac: eth.dst,
            src_ip,
            dst_ip: ip.dst,
            src_port: udp.src.get(),
            dst_port: udp.dst.get(),
        },
        payload_offset: ETH_HLEN + ihl + UDP_HLEN,
        payload_len: ulen - UDP_HLEN,
    })
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// The plain definition: big-endian 16-bit words one by one.
    fn word_by_word(data: &[u8], mut sum: u64) -> u64 {
        let mut chunks = data.chunks_exact(2);
        for c in &mut chunks {
            sum += u16::from_be_bytes([c[0], c[1]]) as u64;
        }
        if let [b] = chunks.remainder() {
            sum += (*b as u64) << 8;
        }
        sum
    }

    #[test]
    fn sum_words_matches_the_word_by_word_sum() {
        // Every length up to past a jumbo frame, random bytes, all-ones
        // (sums that are multiples of 0xffff), all-zero, and start sums
        // that are zero, small and large.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for len in 0..4200usize {
            let random: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
            for data in [random, vec![0xff; len], vec![0; len]] {
                for start in [0u64, 17 + len as u64, 0xffff, 0x1_fffe, rnd() >> 20] {
                    assert_eq!(
                        fold(sum_words(&data, start)),
                        fold(word_by_word(&data, start)),
                        "len {len} start {start:#x}"
                    );
                }
            }
        }
    }
}
