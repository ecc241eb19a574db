//! Sleeping on file descriptors: the one `ppoll` the data plane's
//! processes (the client VMM's lanes and engine, the server's workers)
//! sleep in once their spin has found nothing. The idle path, never the
//! per-request one.

use std::os::fd::RawFd;
use std::time::Duration;

/// `fd` polled for reading.
pub fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Sleeps until one of `fds` is ready, `timeout` passes or a signal comes
/// (nanosecond resolution; an error such as EINTR counts as a wake-up);
/// each entry's `revents` says which.
pub fn wait_readable(fds: &mut [libc::pollfd], timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` holds `fds.len()` valid pollfds and `ts` is a valid
    // timespec, both live across the call; a null mask leaves the
    // thread's signal mask as it is.
    unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        );
    }
}

/// [`wait_readable`] on one descriptor; whether it is readable.
pub fn wait_one(fd: RawFd, timeout: Duration) -> bool {
    let mut p = [pollfd(fd)];
    wait_readable(&mut p, timeout);
    p[0].revents & libc::POLLIN != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    #[test]
    fn it_sleeps_until_a_datagram_or_the_timeout() {
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let t = Instant::now();
        assert!(!wait_one(a.as_raw_fd(), Duration::from_millis(30)));
        assert!(t.elapsed() >= Duration::from_millis(30));
        b.send_to(b"x", a.local_addr().unwrap()).unwrap();
        let t = Instant::now();
        assert!(wait_one(a.as_raw_fd(), Duration::from_secs(5)));
        assert!(t.elapsed() < Duration::from_secs(5));
        let mut fds = [pollfd(b.as_raw_fd()), pollfd(a.as_raw_fd())];
        wait_readable(&mut fds, Duration::from_secs(5));
        assert_eq!(
            (fds[0].revents, fds[1].revents & libc::POLLIN),
            (0, libc::POLLIN)
        );
    }
}
