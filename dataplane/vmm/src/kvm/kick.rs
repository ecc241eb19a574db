//! Kicking a vCPU out of `KVM_RUN` from another thread: a real-time
//! signal ([`kick_signal`]) whose handler sets the running vCPU's
//! `immediate_exit`, so that a kick landing just before `KVM_RUN` is not
//! lost either.

use std::cell::Cell;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::{KICK_SIGNAL_OFFSET, KvmError};

/// The signal that kicks a vCPU out of `KVM_RUN`: `SIGRTMIN +`
/// [`KICK_SIGNAL_OFFSET`].
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + KICK_SIGNAL_OFFSET
}

thread_local! {
    /// The `immediate_exit` byte of the vCPU this thread is running, or
    /// null. Read by the kick signal handler.
    static KICK_TARGET: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // `try_with` on a const-initialised thread-local without destructor
    // neither allocates nor registers anything: async-signal-safe.
    let _ = KICK_TARGET.try_with(|t| {
        let p = t.get();
        if !p.is_null() {
            // SAFETY: a non-null target is set only by `Running::enter` on
            // this thread and cleared by `Running::drop` before `Vcpu::run`
            // returns; in between it points at the `immediate_exit` byte of
            // the vCPU's `kvm_run` mapping, which `run`'s borrow of the
            // vCPU keeps mapped. A volatile byte store is what KVM expects
            // (it reads the byte with READ_ONCE on entry).
            unsafe { p.write_volatile(1) };
        }
    });
}

pub(super) fn install_kick_handler() -> Result<(), KvmError> {
    static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();
    let signal = kick_signal();
    let done = INSTALLED.get_or_init(|| {
        // SAFETY: `sigaction` is plain data; all-zero is a valid value.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_kick as *const () as usize;
        // SA_RESTART: a kick landing while an `IoHandler` is in a syscall
        // must not make that syscall fail (KVM_RUN itself still returns
        // EINTR).
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `act.sa_mask` is a valid sigset_t to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: `act` is fully initialised, the handler is an
        // `extern "C"` function with the SA_SIGINFO signature that only
        // does an async-signal-safe byte store, and we ignore the old
        // action.
        match unsafe { libc::sigaction(signal, &act, std::ptr::null_mut()) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0)),
        }
    });
    done.map_err(|errno| KvmError::Signal {
        signal,
        source: std::io::Error::from_raw_os_error(errno),
    })
}

/// Which thread is inside [`Vcpu::run`], for [`VcpuKicker`].
pub(super) struct KickShared {
    thread: Mutex<Option<libc::pthread_t>>,
}

impl KickShared {
    /// No thread inside `run` yet.
    pub(super) fn new() -> KickShared {
        KickShared {
            thread: Mutex::new(None),
        }
    }

    fn thread(&self) -> MutexGuard<'_, Option<libc::pthread_t>> {
        self.thread.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Marks a thread as running a vCPU for the duration of [`Vcpu::run`].
pub(super) struct Running<'a> {
    kick: &'a KickShared,
    prev: *mut u8,
}

impl<'a> Running<'a> {
    pub(super) fn enter(kick: &'a KickShared, immediate_exit: *mut u8) -> Running<'a> {
        // Target first, then publish the thread: a kick that sees the
        // thread always finds the target set.
        let prev = KICK_TARGET.with(|t| t.replace(immediate_exit));
        // SAFETY: pthread_self has no preconditions.
        *kick.thread() = Some(unsafe { libc::pthread_self() });
        Running { kick, prev }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        // Unpublish first (under the lock, so no kick is mid-send), then
        // clear the target; a signal still in flight finds it restored.
        *self.kick.thread() = None;
        KICK_TARGET.with(|t| t.set(self.prev));
    }
}

/// Interrupts a vCPU's [`Vcpu::run`](super::Vcpu::run) from any thread.
#[derive(Clone)]
pub struct VcpuKicker {
    pub(super) shared: Arc<KickShared>,
}

impl VcpuKicker {
    /// Makes the vCPU leave `KVM_RUN` (or not enter it) and re-check its
    /// `stop` flag. A no-op if no thread is inside `run`; set `stop` before
    /// kicking to end the run.
    pub fn kick(&self) {
        let thread = self.shared.thread();
        if let Some(tid) = *thread {
            // SAFETY: `tid` was published by a thread inside `Vcpu::run`,
            // which unpublishes it under this lock before leaving `run`; we
            // hold the lock, so the thread is alive and `tid` valid. The
            // signal's handler is installed before any vCPU exists.
            unsafe { libc::pthread_kill(tid, kick_signal()) };
        }
    }
}
