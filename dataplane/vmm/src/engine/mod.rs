//! The client's wire: *lanes* (their sockets, the exit rings of the vCPUs
//! they serve and, for the engine's lanes, an io_uring) that drain exit
//! rings into sends, receive answers and interrupts (multishot receives on
//! an engine lane's ring, plain non-blocking `recv` on a direct lane: see
//! `lane`), match answers to their
//! vCPU by (VM, vCPU, sequence) and wake it, retransmit what is not
//! answered in time, and inject (and acknowledge) interrupts. In engine
//! mode one engine thread runs one lane for every vCPU; in direct mode
//! each vCPU runs its own lane while it waits ([`Driver`]), and the engine
//! thread runs the lane of the client's interrupt socket and watches the
//! vCPUs' retransmission deadlines.
//!
//! Ordering and batching: per (vCPU, device model) at most one datagram is
//! in flight. Requests queued behind it (posted writes, say) go out
//! together in the next datagram, up to 36 records, once it is answered.
//! So a device sees a vCPU's accesses in program order even across loss
//! and retransmission, a read never overtakes an earlier posted write, and
//! posted writes batch themselves under load.
//!
//! The rules of the wire are `protocol`'s, apart from any I/O; `lane`
//! carries them out (over io_uring, or plain calls on a direct lane);
//! `driver` is how vCPUs reach a lane
//! and `thread` how the engine thread runs them.

mod driver;
mod keys;
mod lane;
mod protocol;
mod ring_setup;
mod stats;
mod thread;

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use devplane_wire::IrqAction;

use super::ring::ExitRing;
use driver::{Cell, EventFd};
pub use driver::{Doorbell, Driver, Waker};
pub(crate) use keys::KeyWatch;
pub use keys::LiveKeys;
use lane::Loop;
pub use stats::EngineStats;
use thread::EngineThread;

/// What can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// A lane's io_uring could not be set up.
    #[error("cannot set up an io_uring: {0}")]
    Ring(#[source] std::io::Error),
    /// The kernel refuses an io_uring owned by one thread
    /// (`IORING_SETUP_DEFER_TASKRUN`, Linux 6.1+).
    #[error(
        "this kernel refuses an io_uring owned by one thread (IORING_SETUP_DEFER_TASKRUN \
         needs Linux 6.1 or later): {0}"
    )]
    NoOwnedRings(#[source] std::io::Error),
    /// An eventfd could not be registered with a lane's io_uring.
    #[error("cannot register an eventfd with an io_uring: {0}")]
    RegisterEventFd(#[source] std::io::Error),
    /// The thread that drives a lane could not take its io_uring.
    #[error("cannot take the lane's io_uring for this thread: {0}")]
    EnableRing(#[source] std::io::Error),
    /// Submitting to a lane's io_uring failed.
    #[error("io_uring submission failed: {0}")]
    Submit(#[source] std::io::Error),
    /// The engine thread could not be started.
    #[error("cannot start the engine thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Status the engine gives a request that was never answered.
pub const STATUS_TIMEOUT: u8 = 0xff;

/// Deterministic loss injection (the kernel here has no netem).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loss {
    /// Outgoing request datagrams dropped, per mille.
    pub tx_permille: u16,
    /// Incoming answer datagrams dropped, per mille.
    pub rx_permille: u16,
    /// Seed of the drop decisions.
    pub seed: u64,
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This client platform's id.
    pub client: u32,
    /// Empty polls before the engine sleeps.
    pub spin_budget: u32,
    /// Longest sleep when idle.
    pub idle_sleep: Duration,
    /// Resend a datagram not answered within this; each further resend
    /// waits twice as long as the one before (exponential back-off), up to
    /// [`EngineConfig::retransmit_max`].
    pub retransmit: Duration,
    /// The longest wait between two resends.
    pub retransmit_max: Duration,
    /// Give up on a datagram (answer its unanswered requests
    /// `STATUS_TIMEOUT`) this long after its first send: long enough for a
    /// server to restart. A vCPU waits for an answer a little longer
    /// ([`EngineConfig::vcpu_wait`]), so the engine always answers first.
    pub horizon: Duration,
    /// Loss injection.
    pub loss: Loss,
    /// Engine lanes send with IORING_OP_SEND_ZC (zero copy from the
    /// registered send buffers) instead of IORING_OP_SEND. Direct lanes
    /// have no ring (they call `sendto`): it does not apply to them.
    pub zero_copy: bool,
    /// How long a vCPU that drives its lane spins for an answer before it
    /// sleeps in `ppoll` on its sockets until one arrives (or a retransmission
    /// is due): a round trip takes ~17 us on the development machine, a
    /// slow device (a disk's flush) milliseconds.
    pub direct_spin: Duration,
    /// This client's tag keys: every request and acknowledgement is
    /// sealed with the current key, and every answer and interrupt must
    /// carry a valid tag under one of them (`bad_tag` otherwise). `None`:
    /// nothing is tagged, and a tagged datagram is refused.
    pub tag_keys: Option<devplane_wire::tag::KeyRing>,
    /// Direct mode: each vCPU's lane also receives on the engine's
    /// interrupt sockets, so that an interrupt arriving while its vCPU
    /// drives the lane (the one a synchronous access just raised) is
    /// injected and acknowledged by the vCPU's own thread before it
    /// enters its guest again, with no other thread woken on its way;
    /// the engine thread takes those that arrive while the vCPU runs its
    /// guest. Off: only the engine thread receives interrupts.
    pub irqs_on_lanes: bool,
    /// Direct mode: the engine thread runs under `SCHED_IDLE`, so that it
    /// never preempts a vCPU thread of its core. Where the engine shares a
    /// core with vCPUs (`dpbench`'s embedded topology), the engine under
    /// the normal policy, woken by an interrupt datagram, injected it only
    /// once the vCPU that had just received the answer of the access
    /// raising it halted again, ~15 us later (trigger-to-ack p50 41 -> 27
    /// us, bench/README.md, *irq*); yielding, the vCPU injects it itself
    /// before it enters its guest again, and the engine runs when the
    /// vCPUs halt. The cost: on a core that other threads keep
    /// busy, the engine (interrupts for halted vCPUs, retransmission
    /// kicks) runs only in what they leave idle, so it is off by default
    /// and meant for a core the engine shares only with its VM's vCPUs.
    /// Ignored in engine mode (vCPUs there wait for the engine). Whether it
    /// took: [`Engine::yields`].
    pub yield_to_vcpus: bool,
}

/// How much longer than the horizon a vCPU waits for an answer: time for
/// the engine to notice the horizon passed and answer.
pub const VCPU_WAIT_MARGIN: Duration = Duration::from_secs(1);

impl EngineConfig {
    /// How long a vCPU waits for an answer (or for a free slot of its exit
    /// ring) before it gives up by itself: the horizon and
    /// [`VCPU_WAIT_MARGIN`].
    pub fn vcpu_wait(&self) -> Duration {
        self.horizon.saturating_add(VCPU_WAIT_MARGIN)
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            client: 0,
            spin_budget: 2000,
            idle_sleep: Duration::from_micros(200),
            retransmit: Duration::from_millis(2),
            retransmit_max: Duration::from_millis(250),
            horizon: Duration::from_secs(10),
            loss: Loss::default(),
            zero_copy: false,
            direct_spin: Duration::from_micros(200),
            tag_keys: None,
            irqs_on_lanes: true,
            yield_to_vcpus: false,
        }
    }
}

/// A device model reached over the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteModel {
    /// Device-model id.
    pub model: u32,
    /// Server platform id.
    pub server: u32,
    /// Index of the server's socket in the engine's socket list.
    pub socket: usize,
}

/// What the engine needs of one vCPU.
#[derive(Clone)]
pub struct VcpuPort {
    /// VM id.
    pub vm: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
    /// vCPU index.
    pub vcpu: u16,
    /// Its exit ring.
    pub ring: Arc<ExitRing>,
    /// The remote models its VM maps, indexed as the ring's `model` field.
    pub models: Arc<[RemoteModel]>,
}

/// Injects an interrupt into a VM: `(line, action) -> delivered`.
pub type Injector = Box<dyn Fn(u32, IrqAction) -> bool + Send>;

/// One io_uring and its sockets serving a set of vCPUs.
pub struct Lane {
    /// One connected UDP socket per server, in server order; a direct
    /// lane may have the engine's interrupt sockets after them
    /// ([`EngineConfig::irqs_on_lanes`]), on which it only receives.
    pub sockets: Vec<UdpSocket>,
    /// How many of `sockets`, at its end, are the engine's interrupt
    /// sockets (0 but for a direct lane with
    /// [`EngineConfig::irqs_on_lanes`]): a waiting vCPU reads them before
    /// its servers' sockets, every step.
    pub irq_sockets: usize,
    /// The vCPUs it serves.
    pub vcpus: Vec<VcpuPort>,
    /// Interrupt injectors of the VMs whose interrupts may arrive here.
    pub injectors: HashMap<u32, Injector>,
    /// Direct: its one vCPU drives it (see [`Driver`]).
    pub direct: bool,
    /// Per socket (server order): the port of the engine's interrupt
    /// socket for that server, named in every request this lane sends
    /// there ([`devplane_wire::header::HDR_IRQ_PORT`]) so that the server
    /// sends interrupts there and not to this lane's socket; empty:
    /// interrupts come to this lane's own sockets.
    pub irq_ports: Vec<u16>,
    /// The servers (by id) and their addresses: a socket connected to one
    /// takes datagrams only from it, and only with its id in their header;
    /// a socket that is not connected takes them from any of these, and
    /// sends acknowledgements to the address of the id in their header.
    pub servers: HashMap<u32, SocketAddr>,
    /// Servers (by id) reached through an owner server: requests to one
    /// are sent to this address (the owner's XDP program forwards them),
    /// while its socket stays connected to the server itself, whose
    /// answers and interrupts come straight from its own address.
    pub via: HashMap<u32, SocketAddr>,
}

/// A running engine. Dropping it stops the thread.
pub struct Engine {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    stats: Arc<EngineStats>,
    doorbell: Arc<Doorbell>,
    drivers: Vec<Option<Driver>>,
    keys: LiveKeys,
    /// Every lane's cell (to retarget a moved model).
    cells: Vec<Arc<Cell>>,
    /// What the lanes share about interrupts (to freeze a VM's).
    irqs: protocol::IrqSeen,
    /// Set by the engine thread once it started: its thread id, and
    /// whether it runs under `SCHED_IDLE` ([`EngineConfig::yield_to_vcpus`]).
    yielding: Arc<std::sync::OnceLock<(libc::pid_t, bool)>>,
}

/// Why [`Engine::retarget`] did not point every lane at the new server.
#[derive(Debug, thiserror::Error)]
pub enum RetargetError {
    /// The client has no socket for that server (it is not in its
    /// configured servers).
    #[error("server {0} is not one of this client's servers")]
    UnknownServer(u32),
    /// Not every lane took the change within the deadline (a lane whose
    /// vCPU is stuck): `done` lanes point at the new server; the others
    /// will when they next step.
    #[error(
        "{done} of {lanes} lanes took the change within {timeout:?}; the others will at their next step"
    )]
    Busy {
        /// Lanes in all.
        lanes: usize,
        /// Lanes that took it.
        done: usize,
        /// How long it waited.
        timeout: Duration,
    },
}

/// Builds lane `lane`'s cell: its io_uring (owned by the one thread that
/// steps it), the fd a sleeping engine polls for it, its loop.
fn build_cell(
    cfg: &EngineConfig,
    lane: Lane,
    stats: &Arc<EngineStats>,
    keys: &LiveKeys,
    irqs: &protocol::IrqSeen,
) -> Result<Arc<Cell>, EngineError> {
    let direct = lane.direct;
    // A direct lane has no ring: its vCPU makes plain socket calls (see
    // `lane`'s documentation for why).
    let ring = if direct {
        None
    } else {
        Some(ring_setup::build_ring()?)
    };
    // The engine sleeps on the eventfd of the ring it owns and on that
    // lane's sockets (every arrival there is work for it), and on nothing
    // of a direct lane's (its vCPU reaps it).
    let evfd = match &ring {
        None => None,
        Some(ring) => {
            let e = EventFd::new()?;
            ring.submitter()
                .register_eventfd(e.0)
                .map_err(EngineError::RegisterEventFd)?;
            Some(e)
        }
    };
    let wake_fd = evfd.as_ref().map(|e| e.0);
    // The sockets as well as the eventfd: on Linux 6.18 the eventfd of a
    // DEFER_TASKRUN ring was signalled about 16 ms (tick-aligned) after a
    // datagram arrived, so an interrupt waited that long to be injected
    // (issue 14 item 1); a socket's readiness wakes `ppoll` at once.
    let sock_fds = if direct {
        Vec::new()
    } else {
        lane.sockets
            .iter()
            .map(std::os::fd::AsRawFd::as_raw_fd)
            .collect()
    };
    let retargets = Arc::new(lane::Retargets::default());
    let lp = Loop::new(
        cfg,
        ring,
        lane,
        stats.clone(),
        keys.clone(),
        irqs.clone(),
        retargets.clone(),
    );
    Ok(Arc::new(Cell {
        lp: Mutex::new(lp),
        driving: AtomicBool::new(false),
        direct,
        wake_fd,
        sock_fds,
        evfd,
        due: AtomicU64::new(0),
        waker: OnceLock::new(),
        retargets,
    }))
}

/// Whether the engine thread yields to vCPUs ([`EngineConfig::yield_to_vcpus`]):
/// asked, and no lane (`(direct, has vCPUs)`) is an engine-mode lane
/// whose vCPUs wait for the engine itself.
fn yields(asked: bool, mut lanes: impl Iterator<Item = (bool, bool)>) -> bool {
    asked && !lanes.any(|(direct, vcpus)| !direct && vcpus)
}

/// Puts the calling thread under `SCHED_IDLE`; whether it took (no
/// privilege is needed to lower one's own policy).
pub fn sched_idle() -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: `p` is valid for the call; pid 0 is the calling thread.
    unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) == 0 }
}

impl Engine {
    /// Starts the engine thread (pinned to `core` if given) over `lanes`.
    pub fn spawn(
        cfg: EngineConfig,
        lanes: Vec<Lane>,
        core: Option<usize>,
    ) -> Result<Engine, EngineError> {
        let keys = LiveKeys::new(cfg.tag_keys.clone());
        Engine::spawn_with_keys(cfg, lanes, core, keys)
    }

    /// [`Engine::spawn`] sealing with `keys` (shared with others that
    /// follow the same rotations, such as a VM's bulk disks) instead of
    /// `cfg.tag_keys`.
    pub fn spawn_with_keys(
        cfg: EngineConfig,
        lanes: Vec<Lane>,
        core: Option<usize>,
        keys: LiveKeys,
    ) -> Result<Engine, EngineError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EngineStats::default());
        let doorbell = Arc::new(Doorbell::new()?);
        let idle = yields(
            cfg.yield_to_vcpus,
            lanes.iter().map(|l| (l.direct, !l.vcpus.is_empty())),
        );
        let yielding = Arc::new(std::sync::OnceLock::new());
        let irqs = protocol::IrqSeen::default();
        let cells = lanes
            .into_iter()
            .map(|lane| build_cell(&cfg, lane, &stats, &keys, &irqs))
            .collect::<Result<Vec<_>, _>>()?;
        let drivers = cells
            .iter()
            .map(|c| {
                c.direct.then(|| Driver {
                    cell: c.clone(),
                    doorbell: doorbell.clone(),
                    spin: cfg.direct_spin,
                })
            })
            .collect();
        let t = EngineThread {
            cfg,
            cells: cells.clone(),
            doorbell: doorbell.clone(),
            stop: stop.clone(),
            stats: stats.clone(),
        };
        let took = yielding.clone();
        let join = std::thread::Builder::new()
            .name("dp-engine".into())
            .spawn(move || {
                if let Some(c) = core {
                    let _ = affinity::set_thread_affinity([c]);
                }
                // SAFETY: gettid has no preconditions.
                let tid = unsafe { libc::gettid() };
                let _ = took.set((tid, idle && sched_idle()));
                t.run();
            })
            .map_err(EngineError::Spawn)?;
        Ok(Engine {
            stop,
            join: Some(join),
            irqs,
            yielding,
            stats,
            doorbell,
            drivers,
            keys,
            cells,
        })
    }

    /// From now until [`Engine::thaw_irqs`], VM `vm`'s interrupts are
    /// neither acknowledged nor injected (counted `irqs_frozen`; the
    /// server sends them again, to wherever the VM runs next). Returns
    /// once no lane is between acknowledging and injecting one: what was
    /// acknowledged is in the VM's irqchip. Called before a snapshot.
    pub fn freeze_irqs(&self, vm: u32) {
        let mut st = self.irqs.lock().unwrap_or_else(|p| p.into_inner());
        st.frozen.insert(vm);
    }

    /// Every VM's interrupts are acknowledged and injected again (the
    /// client resumed).
    pub fn thaw_irqs(&self) {
        let mut st = self.irqs.lock().unwrap_or_else(|p| p.into_inner());
        st.frozen.clear();
    }

    /// Whether the engine thread runs under `SCHED_IDLE`
    /// ([`EngineConfig::yield_to_vcpus`]); `None` until it has started.
    pub fn yields(&self) -> Option<bool> {
        self.yielding.get().map(|&(_, idle)| idle)
    }

    /// From each lane's next step on, requests for server `server` go
    /// through the owner server at `owner` (which forwards them), or
    /// straight to `server` (`None`); answers still come from `server`.
    /// Datagrams in flight are retransmitted on the new path with their
    /// sequence numbers. Returns at once (a direct lane's vCPU is kicked).
    pub fn set_via(&self, server: u32, owner: Option<SocketAddr>) {
        for c in &self.cells {
            let mut l = c.retargets.vias.lock().unwrap_or_else(|p| p.into_inner());
            l.push((server, owner));
            c.retargets.vias_asked.store(l.len(), Ordering::Release);
        }
        self.doorbell.kick();
        for c in &self.cells {
            if c.direct
                && let Some(w) = c.waker.get()
            {
                w();
            }
        }
    }

    /// Points model `model` at server `server`, reached through socket
    /// `socket` of every lane (a model moved to another server): queued
    /// requests go there, datagrams in flight are rewritten for it and
    /// resent at once (same sequence numbers), and answers for it are
    /// taken only from it. Each lane applies it at its next step (a
    /// direct lane's vCPU is kicked to take one), or here if the lane is
    /// free; waits at most `timeout` for every lane to have applied it.
    /// Returns how many lanes there are.
    pub fn retarget(
        &self,
        model: u32,
        server: u32,
        socket: usize,
        timeout: Duration,
    ) -> Result<usize, RetargetError> {
        let deadline = std::time::Instant::now() + timeout;
        let wanted: Vec<usize> = self
            .cells
            .iter()
            .map(|c| {
                let mut l = c.retargets.list.lock().unwrap_or_else(|p| p.into_inner());
                l.push((model, server, socket));
                c.retargets.asked.store(l.len(), Ordering::Release);
                l.len()
            })
            .collect();
        self.doorbell.kick();
        for c in &self.cells {
            if c.direct
                && let Some(w) = c.waker.get()
            {
                w();
            }
        }
        loop {
            let mut done = 0;
            for (c, &want) in self.cells.iter().zip(&wanted) {
                if c.retargets.done.load(Ordering::Acquire) >= want {
                    done += 1;
                    continue;
                }
                // A free lane (its vCPU in its guest, held, or ended):
                // apply it here.
                if let Ok(mut l) = c.lp.try_lock() {
                    l.apply_retargets();
                    if c.direct {
                        // The engine kicks its vCPU to resend when due.
                        c.due.store(l.next_due(), Ordering::SeqCst);
                    }
                    done += 1;
                }
            }
            if done == self.cells.len() {
                self.doorbell.kick();
                return Ok(done);
            }
            if std::time::Instant::now() >= deadline {
                return Err(RetargetError::Busy {
                    lanes: self.cells.len(),
                    done,
                    timeout,
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// The tag keys every lane seals and verifies with; setting them
    /// (a key rotation) takes effect at each lane's next datagram.
    pub fn tag_keys(&self) -> &LiveKeys {
        &self.keys
    }

    /// The driver of lane `i`, if it is a direct lane.
    pub fn driver(&self, i: usize) -> Option<Driver> {
        self.drivers.get(i).cloned().flatten()
    }

    /// The engine's counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// The doorbell vCPUs ring after publishing a request.
    pub fn doorbell(&self) -> Arc<Doorbell> {
        self.doorbell.clone()
    }

    /// Stops the engine and waits for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.doorbell.kick();
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod plain_tests;

#[cfg(test)]
mod yield_tests {
    use super::*;

    #[test]
    fn the_engine_yields_only_when_asked_and_no_vcpu_waits_for_it() {
        // (direct, has vCPUs): direct lanes and the interrupt lane.
        let direct = [(true, true), (true, true), (false, false)];
        assert!(yields(true, direct.into_iter()));
        assert!(!yields(false, direct.into_iter()));
        // An engine-mode lane: its vCPUs wait for the engine thread.
        assert!(!yields(true, [(false, true), (false, false)].into_iter()));
        assert!(yields(true, std::iter::empty()));
    }

    /// An engine of only its interrupt lane (no vCPU waits for it) takes
    /// `SCHED_IDLE` when asked and says so; otherwise it stays normal.
    #[test]
    fn an_engine_asked_to_yield_runs_sched_idle() {
        for asked in [true, false] {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let lane = Lane {
                sockets: vec![sock],
                vcpus: Vec::new(),
                injectors: HashMap::new(),
                direct: false,
                irq_ports: Vec::new(),
                servers: HashMap::new(),
                via: HashMap::new(),
                irq_sockets: 0,
            };
            let cfg = EngineConfig {
                yield_to_vcpus: asked,
                ..EngineConfig::default()
            };
            // (A kernel before 6.1, without owned rings, runs no engine
            // at all: the project needs it, so that fails here too.)
            let e = Engine::spawn(cfg, vec![lane], None).expect("engine");
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while e.yields().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            assert_eq!(e.yields(), Some(asked));
            // The kernel's word, not the engine's: the thread's policy.
            let (tid, _) = *e.yielding.get().unwrap();
            // SAFETY: a query of a thread of this process, still running.
            let policy = unsafe { libc::sched_getscheduler(tid) };
            let want = if asked {
                libc::SCHED_IDLE
            } else {
                libc::SCHED_OTHER
            };
            assert_eq!(policy, want, "asked {asked}");
            drop(e);
        }
    }
}
