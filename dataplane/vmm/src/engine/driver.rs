//! How vCPUs and the engine thread reach a lane: the doorbell that wakes
//! a sleeping engine, a lane's cell (its loop and who may step it), and a
//! direct lane's [`Driver`], through which its vCPU steps it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::EngineError;
use super::lane::Loop;

pub(crate) use devplane_control::poll::{pollfd, wait_readable};

/// An eventfd owned by its holder (closed on drop).
pub(crate) struct EventFd(pub(crate) libc::c_int);

impl EventFd {
    pub(crate) fn new() -> Result<EventFd, EngineError> {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(EngineError::EventFd(std::io::Error::last_os_error()));
        }
        Ok(EventFd(fd))
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.0, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Resets the counter (non-blocking); whether it was signalled.
    pub(crate) fn take(&self) -> bool {
        let mut buf = 0u64;
        // SAFETY: non-blocking read of 8 bytes into a valid u64.
        unsafe { libc::read(self.0, &mut buf as *mut u64 as *mut libc::c_void, 8) == 8 }
    }
}

impl Drop for EventFd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// Shared between the engine and the vCPUs: lets a vCPU wake a sleeping
/// engine.
pub struct Doorbell {
    pub(crate) sleeping: AtomicBool,
    /// When the sleeping engine wakes by itself ([`now_ns`]), `u64::MAX`
    /// while it sleeps without a deadline, 0 while it is awake.
    pub(crate) wake_at: AtomicU64,
    pub(crate) efd: EventFd,
}

impl Doorbell {
    pub(crate) fn new() -> Result<Doorbell, EngineError> {
        Ok(Doorbell {
            sleeping: AtomicBool::new(false),
            wake_at: AtomicU64::new(0),
            efd: EventFd::new()?,
        })
    }

    /// Called by a vCPU after publishing to its ring.
    pub fn ring(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            self.kick();
        }
    }

    /// Wakes the engine whether it sleeps or not.
    pub(crate) fn kick(&self) {
        self.efd.signal();
    }

    /// Wakes the engine if it would sleep past `due` ([`now_ns`]).
    fn wake_by(&self, due: u64) {
        if due < self.wake_at.load(Ordering::SeqCst) {
            self.kick();
        }
    }
}

/// Nanoseconds since the first call in this process: the engine's clock
/// for deadlines kept in atomics.
pub(crate) fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Never 0, which means "none" where it is stored.
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// Makes a direct lane's vCPU thread service its lane: kicks it out of
/// `KVM_RUN` (see [`Driver::attach`]).
pub type Waker = Box<dyn Fn() + Send + Sync>;

pub(crate) struct Cell {
    pub(crate) lp: Mutex<Loop>,
    /// Its vCPU is driving it (direct lanes): the engine keeps off.
    pub(crate) driving: AtomicBool,
    pub(crate) direct: bool,
    /// What a sleeping engine polls for this lane: the ring's registered
    /// eventfd (the engine's own lane: deferred work arrived), or nothing
    /// (a direct lane: its vCPU reaps it).
    pub(crate) wake_fd: Option<libc::c_int>,
    /// The engine-owned lane's sockets (owned by `lp`), which a sleeping
    /// engine polls too: see [`super::thread`].
    pub(crate) sock_fds: Vec<libc::c_int>,
    /// The engine-owned lane's registered eventfd (declared after `lp`: it
    /// is closed after the ring).
    pub(crate) evfd: Option<EventFd>,
    /// Direct lanes: when its earliest datagram in flight is due for
    /// retransmission ([`now_ns`]), 0 if none; published by its vCPU when
    /// it stops driving.
    pub(crate) due: AtomicU64,
    /// Direct lanes: makes the vCPU service the lane.
    pub(crate) waker: OnceLock<Waker>,
    /// Models to point at another server (shared with the loop).
    pub(crate) retargets: Arc<super::lane::Retargets>,
}

/// A vCPU's handle on its direct lane: it sends its own requests and reaps
/// its own answers while it waits, on its own thread, so a synchronous
/// exit involves no other thread of the client (the 2-core choice: two
/// spinners, the vCPU and the server worker).
///
/// A direct lane has no io_uring: its vCPU thread calls `sendto` and a
/// non-blocking `recv` on the lane's sockets itself (a ring cost its round
/// trip ~1.3 us: see `lane`), so nothing is received behind its back and
/// no other thread is woken for its answers. Nothing the guest waits for
/// arrives on the lane while the vCPU runs its guest: its requests name
/// the engine's interrupt socket ([`super::Lane::irq_ports`]), so
/// interrupts go there and the engine injects them (unless the vCPU read
/// them first: it reads those sockets too while it waits for the answer
/// of the access that raised them, [`super::EngineConfig::irqs_on_lanes`]);
/// what does arrive (the
/// acknowledgement of a posted write) waits in the socket's buffer for the
/// vCPU's next exit. The engine kicks the vCPU out of
/// `KVM_RUN` ([`Driver::attach`]'s waker) only when a datagram in flight is
/// due for retransmission, and the vCPU services its lane
/// ([`Driver::service`]) before it enters the guest again.
#[derive(Clone)]
pub struct Driver {
    pub(crate) cell: Arc<Cell>,
    pub(crate) doorbell: Arc<Doorbell>,
    pub(crate) spin: Duration,
}

impl Driver {
    /// Called once on the vCPU's own thread before it runs its guest: the
    /// lane starts (a direct lane has no ring to take or arm).
    /// `waker` makes this vCPU call [`Driver::service`] soon (a kick out of
    /// `KVM_RUN`).
    pub fn attach(&self, waker: Waker) -> Result<(), EngineError> {
        let _ = self.cell.waker.set(waker);
        let mut l = self.cell.lp.lock().unwrap_or_else(|p| p.into_inner());
        l.start()
    }

    /// Starts driving (before publishing a request): the engine keeps off.
    pub fn begin(&self) {
        self.cell.driving.store(true, Ordering::SeqCst);
    }

    /// Runs one engine iteration on this lane for a vCPU that waits for
    /// an answer (its receive stops at the first answer); `false` if
    /// nothing happened (or the engine holds the lane right now).
    pub fn step(&self) -> bool {
        self.step_as(true)
    }

    fn step_as(&self, waiting: bool) -> bool {
        match self.cell.lp.try_lock() {
            Ok(mut l) => l.step(true, waiting).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Stops driving (before entering the guest): the engine learns when
    /// the lane's next retransmission is due. (What arrives from now on
    /// waits in the sockets' buffers for the next step.)
    pub fn end(&self) {
        let c = &self.cell;
        let Ok(l) = c.lp.lock() else {
            c.driving.store(false, Ordering::SeqCst);
            return;
        };
        c.driving.store(false, Ordering::SeqCst);
        let due = l.next_due();
        drop(l);
        c.due.store(due, Ordering::SeqCst);
        if due != 0 {
            self.doorbell.wake_by(due);
        }
    }

    /// Sleeps until something completes on the lane, a retransmission is
    /// due, or `max` passes, whichever is first (the vCPU spun its
    /// [`super::EngineConfig::direct_spin`] for an answer); a step reaps it. It
    /// steps the lane first, under the same hold: the answer may be there
    /// already, which `answered()` then says.
    pub fn sleep(&self, max: Duration, answered: impl Fn() -> bool) {
        if let Ok(mut l) = self.cell.lp.lock() {
            let _ = l.step(true, true);
            if !answered() {
                l.block(max);
            }
        }
    }

    /// How long the vCPU spins for an answer before it sleeps
    /// ([`super::EngineConfig::direct_spin`]).
    pub fn spin_budget(&self) -> Duration {
        self.spin
    }

    /// Services the lane once (the vCPU was kicked): reads what arrived
    /// (answers, acknowledgements, interrupts to inject), then sends what
    /// is still due.
    pub fn service(&self) {
        self.begin();
        self.step_as(false);
        self.end();
    }

    /// Drives the lane until nothing is in flight (posted writes answered)
    /// or `deadline`: what a vCPU does when its guest has ended.
    pub fn flush(&self, deadline: Instant) {
        self.begin();
        while self.cell.lp.lock().map(|l| l.busy()).unwrap_or(false) && Instant::now() < deadline {
            self.step_as(false);
            std::hint::spin_loop();
        }
        self.end();
    }
}
