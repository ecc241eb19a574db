//! Suspend and resume: what makes a client's vCPU threads leave their
//! guests and hold until resumed, and the work held threads do.

use super::*;

/// What makes a client's vCPU threads leave their guests: a suspend
/// (they hold until resumed) or the client stopping (they end).
#[derive(Default)]
pub(super) struct Hold {
    /// The `stop` flag of every [`Vcpu::run`]: set to suspend or to stop.
    pub(super) out: AtomicBool,
    pub(super) state: Mutex<HoldState>,
    /// Signalled when a vCPU holds and when the state changes.
    pub(super) cond: Condvar,
}

#[derive(Default)]
pub(super) struct HoldState {
    pub(super) stopping: bool,
    pub(super) suspended: bool,
    /// vCPU threads holding now.
    pub(super) held: usize,
    /// Work for held vCPU threads: (the thread's position in
    /// `Client::vcpus`, what to do with its vCPU and exit handler).
    pub(super) jobs: Vec<(usize, Job)>,
}

/// Work a held vCPU thread does with its vCPU (its KVM state is reachable
/// only there).
pub(super) type Job = Box<dyn FnOnce(&mut Vcpu, &mut ExitHandler) + Send>;

impl Hold {
    pub(super) fn state(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On a vCPU thread whose run returned [`VcpuExit::Stopped`] (its last
    /// exit complete, its posted writes answered): holds while the client
    /// is suspended. `true`: run the guest again; `false`: the client stops.
    pub(super) fn park(&self, slot: usize, vcpu: &mut Vcpu, handler: &mut ExitHandler) -> bool {
        let mut st = self.state();
        if st.stopping {
            return false;
        }
        if !st.suspended {
            // Resumed before this vCPU got here.
            return true;
        }
        st.held += 1;
        self.cond.notify_all();
        while st.suspended && !st.stopping {
            if let Some(at) = st.jobs.iter().position(|(s, _)| *s == slot) {
                let (_, job) = st.jobs.swap_remove(at);
                drop(st);
                job(vcpu, handler);
                st = self.state();
                continue;
            }
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.held -= 1;
        !st.stopping
    }
}

/// Why [`Client::suspend`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// The client is suspended already.
    #[error("it is suspended already")]
    Suspended,
    /// The client is not suspended.
    #[error("it is not suspended")]
    NotSuspended,
    /// Not every vCPU held in time (one is stuck in a device access): the
    /// client was resumed.
    #[error("{held} of {running} running vCPUs held within {timeout:?}; resumed it")]
    Timeout {
        /// vCPUs that held.
        held: usize,
        /// vCPUs still running their guests.
        running: usize,
        /// How long it waited.
        timeout: Duration,
    },
}

impl Client {
    /// Suspends every vCPU: each finishes the exit it is in (a remote
    /// access waits for its answer), waits for its posted writes' answers,
    /// leaves `KVM_RUN` with its state whole, and holds until
    /// [`Client::resume`]. Returns once every vCPU still running holds; if
    /// that takes longer than `timeout`, resumes them and fails. vCPUs that
    /// ended meanwhile need not hold.
    pub fn suspend(&self, timeout: Duration) -> Result<(), SuspendError> {
        {
            let mut st = self.hold.state();
            if st.suspended {
                return Err(SuspendError::Suspended);
            }
            st.suspended = true;
            self.hold.out.store(true, Ordering::SeqCst);
        }
        for v in &self.vcpus {
            v.kicker.kick();
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.hold.state();
        loop {
            let running = self.vcpus.iter().filter(|v| !v.join.is_finished()).count();
            if st.held >= running {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let held = st.held;
                drop(st);
                let _ = self.resume();
                return Err(SuspendError::Timeout {
                    held,
                    running,
                    timeout,
                });
            }
            // A vCPU whose guest ends while suspending does not signal:
            // look again every few milliseconds.
            st = self
                .hold
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(5)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Lets the vCPUs held by [`Client::suspend`] run their guests again.
    pub fn resume(&self) -> Result<(), SuspendError> {
        let mut st = self.hold.state();
        if !st.suspended {
            return Err(SuspendError::NotSuspended);
        }
        st.suspended = false;
        // A snapshot taken while suspended froze its VM's interrupts: the
        // VM runs here again, so they are taken here again.
        if let Some(e) = &self.engine {
            e.thaw_irqs();
        }
        if !st.stopping {
            self.hold.out.store(false, Ordering::SeqCst);
        }
        self.hold.cond.notify_all();
        Ok(())
    }

    /// Whether the client is suspended (between [`Client::suspend`] and
    /// [`Client::resume`]).
    pub fn suspended(&self) -> bool {
        self.hold.state().suspended
    }
}
