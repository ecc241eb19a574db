//! Whole Ethernet frames sent from a namespace (an `AF_PACKET` socket):
//! for tests that send what a UDP socket cannot (wrong checksums, lying
//! lengths, a spoofed source address).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use devplane_wire::frame::{self, ETH_HLEN, Flow, IPV4_MIN_HLEN, PAYLOAD_OFFSET};

use crate::topology::run_in_netns;

/// Sends whole Ethernet frames out of one interface of one namespace.
#[derive(Debug)]
pub struct RawSender {
    fd: OwnedFd,
    ifindex: i32,
    dst_mac: [u8; 6],
}

impl RawSender {
    /// A sender out of `ifname` in namespace `netns`, to `dst_mac`.
    pub fn new(netns: &str, ifname: &str, dst_mac: [u8; 6]) -> io::Result<RawSender> {
        let name = CString::new(ifname).map_err(io::Error::other)?;
        let (fd, ifindex) = run_in_netns(netns, move || -> io::Result<(OwnedFd, i32)> {
            // SAFETY: a plain system call; a valid fd is owned by the
            // `OwnedFd` made of it.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: `name` is a valid NUL-terminated string.
            let index = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            if index <= 0 {
                return Err(io::Error::last_os_error());
            }
            Ok((fd, index))
        })??;
        Ok(RawSender {
            fd,
            ifindex,
            dst_mac,
        })
    }

    /// Sends `frame` as it is.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_ll is valid; fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = self.ifindex;
        sll.sll_halen = 6;
        sll.sll_addr[..6].copy_from_slice(&self.dst_mac);
        // SAFETY: `frame` and `sll` are valid for the lengths passed.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n == frame.len() as isize {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

/// A frame carrying `payload` along `flow` (IPv4 checksum set, no UDP
/// checksum).
pub fn frame_of(flow: &Flow, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; PAYLOAD_OFFSET + payload.len()];
    let _ = frame::write_headers(&mut f, flow, payload.len());
    f[PAYLOAD_OFFSET..].copy_from_slice(payload);
    f
}

/// Sets the UDP checksum of a frame made by [`frame_of`] (no IPv4
/// options), over whatever its bytes are now.
pub fn set_udp_checksum(f: &mut [u8]) {
    let udp_at = ETH_HLEN + IPV4_MIN_HLEN;
    if f.len() < udp_at + 8 {
        return;
    }
    f[udp_at + 6..udp_at + 8].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&f[ETH_HLEN + 12..ETH_HLEN + 20]);
    pseudo.extend_from_slice(&[0, frame::IPPROTO_UDP]);
    pseudo.extend_from_slice(&((f.len() - udp_at) as u16).to_be_bytes());
    pseudo.extend_from_slice(&f[udp_at..]);
    let c = match frame::checksum(&pseudo) {
        0 => 0xffff,
        c => c,
    };
    f[udp_at + 6..udp_at + 8].copy_from_slice(&c.to_be_bytes());
}

/// Sets the IPv4 header checksum of a frame made by [`frame_of`] (after
/// a header field was changed).
pub fn set_ipv4_checksum(f: &mut [u8]) {
    let ip = ETH_HLEN..ETH_HLEN + IPV4_MIN_HLEN;
    if f.len() < ip.end {
        return;
    }
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
    let c = frame::checksum(&f[ip]);
    f[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&c.to_be_bytes());
}
