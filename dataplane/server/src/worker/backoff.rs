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
