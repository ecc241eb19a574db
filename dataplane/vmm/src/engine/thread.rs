//! The engine thread. It steps the lane it runs (the one every vCPU of
//! engine mode shares), spins `spin_budget` empty rounds, then sleeps in
//! `ppoll` on the doorbell, the lanes' wake fds and the sockets of the
//! lanes it steps until something arrives or a retransmission is due. The
//! sockets are polled because the ring's registered eventfd alone was
//! signalled late on Linux 6.18 (about 16 ms, tick-aligned, after the
//! datagram arrived: every interrupt of the `irq` benchmark waited that
//! long); a datagram on a socket makes it readable at once, and stays so
//! until the step that follows runs the ring's deferred receive. Direct
//! lanes it never steps: it kicks their vCPU when their retransmission is
//! due while the vCPU is in its guest.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::EngineConfig;
use super::driver::{Cell, Doorbell, now_ns, pollfd, wait_readable};
use super::stats::{EngineStats, add};

/// The engine's longest sleep with nothing to watch: a safety net only;
/// the doorbell, the lanes' eventfds and their deadlines wake it for real
/// work.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);

pub(crate) struct EngineThread {
    pub(crate) cfg: EngineConfig,
    pub(crate) cells: Vec<Arc<Cell>>,
    pub(crate) doorbell: Arc<Doorbell>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) stats: Arc<EngineStats>,
}

/// What one sleep polls, reused from sleep to sleep.
struct PollSet {
    fds: Vec<libc::pollfd>,
    /// The cell each fd after the doorbell's belongs to.
    cells: Vec<usize>,
}

/// Whether the engine thread keeps off this lane: a direct lane (its
/// vCPU steps it).
fn hands_off(c: &Cell) -> bool {
    c.direct
}

impl EngineThread {
    pub(crate) fn run(self) {
        let mut idle = 0u32;
        let mut polls = PollSet {
            fds: Vec::new(),
            cells: Vec::new(),
        };
        // Per cell: the `due` it was last kicked for (not kicked again for it).
        let mut kicked_for = vec![0u64; self.cells.len()];
        while !self.stop.load(Ordering::Relaxed) {
            if self.step_lanes() {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < self.cfg.spin_budget {
                std::hint::spin_loop();
                continue;
            }
            idle = 0;
            self.doorbell.sleeping.store(true, Ordering::SeqCst);
            if !self.pending() {
                self.sleep(&mut polls, &kicked_for);
                self.kick_due(&mut kicked_for);
            }
            self.doorbell.sleeping.store(false, Ordering::SeqCst);
        }
    }

    /// Steps every lane this thread may; whether any had work.
    fn step_lanes(&self) -> bool {
        let mut work = false;
        for c in &self.cells {
            if hands_off(c) {
                continue;
            }
            if let Ok(mut l) = c.lp.try_lock() {
                match l.step(!c.direct, false) {
                    Ok(w) => work |= w,
                    Err(e) => eprintln!("devplane client engine: {e}"),
                }
            }
        }
        work
    }

    /// Whether a lane this thread steps has work after all: a vCPU that
    /// published before seeing the sleeping flag did not ring; the lane
    /// may have deferred work waiting.
    fn pending(&self) -> bool {
        self.cells.iter().any(|c| {
            !hands_off(c)
                && c.lp
                    .try_lock()
                    .map(|mut l| l.fresh() || l.pending() || l.queued())
                    .unwrap_or(false)
        })
    }

    /// When the thread must wake by itself ([`now_ns`]), `u64::MAX` for
    /// never: the earliest retransmission of a direct lane not kicked for
    /// yet, soon for a lane with something in flight that this thread
    /// retransmits, or the next announcement one of its lanes owes.
    fn wake_at(&self, now: u64, kicked_for: &[u64]) -> u64 {
        let mut wake = u64::MAX;
        for (i, c) in self.cells.iter().enumerate() {
            if c.direct {
                // A driving vCPU retransmits by itself; it publishes its
                // next due time when it stops.
                let due = c.due.load(Ordering::SeqCst);
                if due != 0 && due != kicked_for[i] && !c.driving.load(Ordering::SeqCst) {
                    wake = wake.min(due);
                }
            } else {
                let soon = now + self.cfg.idle_sleep.min(self.cfg.retransmit).as_nanos() as u64;
                match c.lp.try_lock() {
                    Ok(l) if !l.busy() => {
                        // Nothing in flight, but perhaps an announcement
                        // owed to a model's new server.
                        let due = l.next_due();
                        if due != 0 {
                            wake = wake.min(due);
                        }
                    }
                    _ => wake = wake.min(soon),
                }
            }
        }
        wake
    }

    /// Sleeps in `ppoll` on the doorbell, the lanes' wake fds and the
    /// sockets of the lanes it steps, until one is signalled or readable
    /// or the thread must wake by itself.
    fn sleep(&self, polls: &mut PollSet, kicked_for: &[u64]) {
        polls.fds.clear();
        polls.fds.push(pollfd(self.doorbell.efd.0));
        polls.cells.clear();
        for (i, c) in self.cells.iter().enumerate() {
            if let Some(fd) = c.wake_fd {
                polls.fds.push(pollfd(fd));
                polls.cells.push(i);
            }
            for &fd in &c.sock_fds {
                polls.fds.push(pollfd(fd));
                polls.cells.push(i);
            }
        }
        let now = now_ns();
        let wake = self.wake_at(now, kicked_for);
        // No periodic wake-up without a reason: it would preempt the
        // vCPU that shares this core (a 200 us tick put ~25 us on one
        // exit in every ~24 of the exit floor).
        let t = if wake == u64::MAX {
            IDLE_TIMEOUT
        } else {
            Duration::from_nanos(wake.saturating_sub(now))
        };
        self.doorbell.wake_at.store(wake, Ordering::SeqCst);
        wait_readable(&mut polls.fds, t);
        self.doorbell.wake_at.store(0, Ordering::SeqCst);
        add(&self.stats.wakeups, 1);
        self.doorbell.efd.take();
        for (k, &i) in polls.cells.iter().enumerate() {
            if polls.fds[k + 1].revents != 0
                && let Some(e) = &self.cells[i].evfd
            {
                // Reset; the next round steps the lane.
                e.take();
            }
        }
    }

    /// Direct lanes whose retransmission is due: their vCPU services
    /// them (kicked once per due time).
    fn kick_due(&self, kicked_for: &mut [u64]) {
        let now = now_ns();
        for (i, c) in self.cells.iter().enumerate() {
            if !c.direct {
                continue;
            }
            let due = c.due.load(Ordering::SeqCst);
            if due != 0 && due <= now && due != kicked_for[i] && !c.driving.load(Ordering::SeqCst) {
                kicked_for[i] = due;
                if let Some(w) = c.waker.get() {
                    add(&self.stats.kicks, 1);
                    w();
                }
            }
        }
    }
}
