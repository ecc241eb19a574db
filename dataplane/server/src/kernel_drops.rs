//! What the kernel dropped before a worker saw it, read from the workers'
//! sockets when counters are asked for (never on the packet path): an
//! AF_XDP socket's ring statistics (`XDP_STATISTICS`), a UDP socket's
//! receive-queue drops (`SO_MEMINFO`'s `SK_MEMINFO_DROPS`, the counter
//! `SO_RXQ_OVFL` reports per datagram, read here without changing the
//! receive path).

use std::io;
use std::os::fd::RawFd;

/// `SO_MEMINFO` (`asm-generic/socket.h`; the same on x86 and arm).
const SO_MEMINFO: libc::c_int = 55;
/// Entries of the `SO_MEMINFO` array.
const SK_MEMINFO_VARS: usize = 9;

/// An AF_XDP socket's drop counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XskDrops {
    /// Frames dropped for want of a buffer (the fill ring empty) or for
    /// being too large.
    pub rx_dropped: u64,
    /// Frames dropped because the RX ring was full.
    pub rx_ring_full: u64,
    /// Times the fill ring was found empty.
    pub rx_fill_ring_empty: u64,
    /// Invalid descriptors put on the TX ring.
    pub tx_invalid: u64,
}

/// Reads `fd`'s `XDP_STATISTICS`.
pub fn xsk(fd: RawFd) -> io::Result<XskDrops> {
    let mut s = libc::xdp_statistics {
        rx_dropped: 0,
        rx_invalid_descs: 0,
        tx_invalid_descs: 0,
        rx_ring_full: 0,
        rx_fill_ring_empty_descs: 0,
        tx_ring_empty_descs: 0,
    };
    let mut len = std::mem::size_of_val(&s) as libc::socklen_t;
    // SAFETY: `s` and `len` are valid for writes of the size passed; the
    // kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_XDP,
            libc::XDP_STATISTICS,
            (&mut s as *mut libc::xdp_statistics).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(XskDrops {
        rx_dropped: s.rx_dropped,
        rx_ring_full: s.rx_ring_full,
        rx_fill_ring_empty: s.rx_fill_ring_empty_descs,
        tx_invalid: s.tx_invalid_descs,
    })
}

/// Datagrams the kernel dropped at `fd`'s receive queue (full buffer).
pub fn udp(fd: RawFd) -> io::Result<u64> {
    let mut info = [0u32; SK_MEMINFO_VARS];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(info[libc::SK_MEMINFO_DROPS as usize]))
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    /// A receiver that never reads, with the smallest buffer: what the
    /// kernel could not queue is counted, and queued + dropped = sent.
    #[test]
    fn udp_drops_add_up() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&rx).set_recv_buffer_size(1).unwrap();
        rx.set_nonblocking(true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(super::udp(rx.as_raw_fd()).unwrap(), 0);
        let sent = 500u64;
        for _ in 0..sent {
            tx.send_to(&[0u8; 64], rx.local_addr().unwrap()).unwrap();
        }
        let mut queued = 0u64;
        let mut buf = [0u8; 128];
        while rx.recv(&mut buf).is_ok() {
            queued += 1;
        }
        let dropped = super::udp(rx.as_raw_fd()).unwrap();
        assert!(dropped > 0, "nothing dropped: {queued} queued");
        assert_eq!(queued + dropped, sent);
    }

    #[test]
    fn not_an_xsk_is_an_error() {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(super::xsk(s.as_raw_fd()).is_err());
    }
}
