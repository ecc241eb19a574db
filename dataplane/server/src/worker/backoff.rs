//! The idle back-off of a polling worker: spin while work keeps coming,
//! then sleep on the socket so an idle server does not burn a core it was
//! not given.

use std::time::Duration;

/// Spin budget and sleep of a polling loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Empty polls before sleeping; 0 sleeps at once (no busy polling).
    pub spin_budget: u32,
    /// How long one sleep lasts at most (the socket wakes it earlier).
    pub idle_sleep: Duration,
    empty: u32,
}

impl Backoff {
    /// A back-off with the given budget and sleep.
    pub fn new(spin_budget: u32, idle_sleep: Duration) -> Backoff {
        Backoff {
            spin_budget,
            idle_sleep,
            empty: 0,
        }
    }

    /// Records a poll that found work.
    pub fn busy(&mut self) {
        self.empty = 0;
    }

    /// Records an empty poll; returns `Some(timeout)` when the caller should
    /// now sleep (wait on its socket) for at most that long.
    pub fn idle(&mut self) -> Option<Duration> {
        if self.empty >= self.spin_budget {
            return Some(self.idle_sleep);
        }
        self.empty += 1;
        std::hint::spin_loop();
        None
    }
}

/// Waits until `fd` is readable or `timeout` passes (ppoll, microsecond
/// resolution). Errors (EINTR) count as a wake-up.
pub fn wait_readable(fd: libc::c_int, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `pfd` and `ts` are valid for the call; one fd is passed; a
    // null sigmask leaves the mask unchanged.
    unsafe {
        libc::ppoll(&mut pfd, 1, &ts, std::ptr::null());
    }
}

/// Sleeps until any of `fds` is readable or `timeout` passes.
pub fn wait_readable_any(fds: &mut [libc::pollfd], timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `fds` and `ts` are valid for the call, `fds.len()` entries
    // are passed; a null sigmask leaves the mask unchanged.
    unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            &ts,
            std::ptr::null(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_then_sleeps_and_resets_on_work() {
        let mut b = Backoff::new(3, Duration::from_micros(50));
        assert_eq!(b.idle(), None);
        assert_eq!(b.idle(), None);
        assert_eq!(b.idle(), None);
        assert_eq!(b.idle(), Some(Duration::from_micros(50)));
        assert_eq!(b.idle(), Some(Duration::from_micros(50)));
        b.busy();
        assert_eq!(b.idle(), None);
        let mut never = Backoff::new(0, Duration::from_millis(1));
        assert_eq!(never.idle(), Some(Duration::from_millis(1)));
    }
}
