//! The client's wire: *lanes* (an io_uring, its sockets, the exit rings of
//! the vCPUs it serves) that drain exit rings into io_uring sends, receive
//! answers and interrupts with multishot receive, match answers to their
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

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devplane_wire::{
    Ack, Datagram, DatagramWriter, HEADER_LEN, Header, IrqAction, Kind, MAX_DATAGRAM, MAX_RECORDS,
    RECORD_LEN, RawRecord, Record, RequestId, datagram,
};
use io_uring::{IoUring, opcode, squeue, types};
use zerocopy::FromBytes;

use super::ring::ExitRing;

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
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// This client platform's id.
    pub client: u32,
    /// Empty polls before the engine sleeps.
    pub spin_budget: u32,
    /// Longest sleep when idle.
    pub idle_sleep: Duration,
    /// Resend a datagram not answered within this.
    pub retransmit: Duration,
    /// Give up (answer `STATUS_TIMEOUT`) after this many resends.
    pub max_retries: u32,
    /// Loss injection.
    pub loss: Loss,
    /// Send with IORING_OP_SEND_ZC (zero copy from the registered send
    /// buffers) instead of IORING_OP_SEND.
    pub zero_copy: bool,
    /// Direct lanes get io_uring's SQPOLL thread (one, shared by every
    /// lane through IORING_SETUP_ATTACH_WQ) instead of submitting
    /// themselves.
    pub sqpoll: Option<SqPoll>,
    /// How long a vCPU that drives its lane spins for an answer before it
    /// sleeps in `io_uring_enter` until one arrives (or a retransmission
    /// is due): a round trip takes ~17 us on the development machine, a
    /// slow device (a disk's flush) milliseconds.
    pub direct_spin: Duration,
    /// Give each lane's io_uring to the one thread that steps it (Linux
    /// 6.1+, see [`Driver`]); `false` makes every ring shared, as on an
    /// older kernel (for comparison: every answer then interrupts the
    /// waiting vCPU).
    pub owned_rings: bool,
}

/// io_uring's kernel submission thread, shared by the direct lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqPoll {
    /// Milliseconds it spins idle before sleeping.
    pub idle_ms: u32,
    /// The core it is bound to, if any.
    pub cpu: Option<u32>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            client: 0,
            spin_budget: 2000,
            idle_sleep: Duration::from_micros(200),
            retransmit: Duration::from_millis(2),
            max_retries: 50,
            loss: Loss::default(),
            zero_copy: false,
            sqpoll: None,
            direct_spin: Duration::from_micros(200),
            owned_rings: true,
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

/// Engine counters.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Request datagrams sent (first transmissions).
    pub tx_datagrams: AtomicU64,
    /// Request records sent (first transmissions).
    pub tx_records: AtomicU64,
    /// Datagrams sent again after a timeout.
    pub retransmits: AtomicU64,
    /// Requests given up on.
    pub timeouts: AtomicU64,
    /// Answer records matched to a waiting request.
    pub answers: AtomicU64,
    /// Answers for nothing in flight (late duplicates).
    pub late: AtomicU64,
    /// Datagrams that did not parse.
    pub malformed: AtomicU64,
    /// Interrupts injected.
    pub irqs: AtomicU64,
    /// Interrupts for a VM not on this client (dropped).
    pub irqs_unknown_vm: AtomicU64,
    /// Interrupts received again (a server resent a datagram whose
    /// acknowledgement it missed): acknowledged, not applied again.
    pub irq_duplicates: AtomicU64,
    /// Acknowledgements of interrupt datagrams sent.
    pub acks_sent: AtomicU64,
    /// Outgoing datagrams dropped by loss injection.
    pub loss_tx: AtomicU64,
    /// Incoming datagrams dropped by loss injection.
    pub loss_rx: AtomicU64,
    /// io_uring submits (each carries a batch of sends).
    pub submits: AtomicU64,
    /// Sends that failed.
    pub send_errors: AtomicU64,
    /// Sends skipped because every send buffer was in flight.
    pub send_pool_empty: AtomicU64,
    /// Times the engine thread woke from its sleep.
    pub wakeups: AtomicU64,
    /// Kicks the engine gave vCPUs to service their lanes.
    pub kicks: AtomicU64,
}

/// An eventfd owned by its holder (closed on drop).
struct EventFd(libc::c_int);

impl EventFd {
    fn new() -> std::io::Result<EventFd> {
        // SAFETY: plain syscall; the fd is owned by the returned value.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(EventFd(fd))
    }

    fn signal(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.0, &one as *const u64 as *const libc::c_void, 8) };
    }

    /// Resets the counter (non-blocking); whether it was signalled.
    fn take(&self) -> bool {
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
    sleeping: AtomicBool,
    /// When the sleeping engine wakes by itself ([`now_ns`]), `u64::MAX`
    /// while it sleeps without a deadline, 0 while it is awake.
    wake_at: AtomicU64,
    efd: EventFd,
}

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
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
    fn kick(&self) {
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
fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // Never 0, which means "none" where it is stored.
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// (sequence, ring index, answered) per record of a datagram, in order.
type FlightSlots = Vec<(u64, u64, bool)>;

struct InFlight {
    /// (sequence, ring index, answered) per record, in datagram order.
    slots: FlightSlots,
    answered: usize,
    buf: Box<[u8]>,
    len: usize,
    sent_at: Instant,
    retries: u32,
}

struct VcpuState {
    port: VcpuPort,
    tail: u64,
    queued: Vec<VecDeque<(u64, RawRecord)>>, // per model: (ring index, record)
    inflight: Vec<Option<InFlight>>,
}

const UD_SEND: u64 = 1 << 56;
const UD_RECV: u64 = 2 << 56;
const UD_PROVIDE: u64 = 3 << 56;
const UD_KIND: u64 = 0xff << 56;
const BUF_SIZE: usize = 2048;
/// Registered send buffers per lane.
const SEND_BUFS: usize = 256;
/// Bytes per send buffer (a whole datagram).
const SEND_SLOT: usize = 1536;
const _: () = assert!(SEND_SLOT >= MAX_DATAGRAM);
const BUFS_PER_SOCKET: u16 = 64;
/// The engine's longest sleep with nothing to watch: a safety net only;
/// the doorbell, the lanes' eventfds and their deadlines wake it for real
/// work.
const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
/// `io_uring_enter` flag: run deferred work and reap (`IORING_ENTER_GETEVENTS`).
const ENTER_GETEVENTS: u32 = 1;

/// One io_uring and its sockets serving a set of vCPUs.
pub struct Lane {
    /// One connected UDP socket per server, in server order.
    pub sockets: Vec<UdpSocket>,
    /// The vCPUs it serves.
    pub vcpus: Vec<VcpuPort>,
    /// Interrupt injectors of the VMs whose interrupts may arrive here.
    pub injectors: HashMap<u32, Injector>,
    /// Direct: its one vCPU drives it (see [`Driver`]).
    pub direct: bool,
    /// The port of the engine's interrupt socket, named in every request
    /// this lane sends ([`devplane_wire::header::HDR_IRQ_PORT`]) so that
    /// servers send interrupts there and not to this lane's socket; `None`:
    /// interrupts come to this lane's own sockets.
    pub irq_port: Option<u16>,
    /// Where each server (by id) takes acknowledgements of its interrupts:
    /// needed for a socket that is not connected to it.
    pub servers: HashMap<u32, SocketAddr>,
}

/// Makes a direct lane's vCPU thread service its lane: kicks it out of
/// `KVM_RUN` (see [`Driver::attach`]).
pub type Waker = Box<dyn Fn() + Send + Sync>;

struct Cell {
    lp: Mutex<Loop>,
    /// Its vCPU is driving it (direct lanes): the engine keeps off.
    driving: AtomicBool,
    direct: bool,
    /// Its ring belongs to one thread (see [`Loop::owned`]): the engine
    /// thread for the shared lane, the vCPU thread for a direct lane.
    owned: bool,
    /// What a sleeping engine polls for this lane: the ring's registered
    /// eventfd (the engine's own lane: deferred work arrived), the ring fd
    /// (a shared lane: completions posted), or nothing (an owned direct
    /// lane: its vCPU reaps it).
    wake_fd: Option<libc::c_int>,
    /// The engine-owned lane's registered eventfd (declared after `lp`: it
    /// is closed after the ring).
    evfd: Option<EventFd>,
    /// Owned direct lanes: when its earliest datagram in flight is due for
    /// retransmission ([`now_ns`]), 0 if none; published by its vCPU when
    /// it stops driving.
    due: AtomicU64,
    /// Owned direct lanes: makes the vCPU service the lane.
    waker: OnceLock<Waker>,
}

/// A vCPU's handle on its direct lane: it sends its own requests and reaps
/// its own answers while it waits, on its own thread, so a synchronous
/// exit involves no other thread of the client (the 2-core choice: two
/// spinners, the vCPU and the server worker).
///
/// The lane's io_uring is *owned* by the vCPU thread where the kernel
/// allows it (Linux 6.1+: `IORING_SETUP_DEFER_TASKRUN` with
/// `SINGLE_ISSUER`): received datagrams are completed only when that
/// thread enters the ring, never by task work that interrupts whichever
/// thread runs (without it, every answer cost the waiting vCPU an
/// inter-processor interrupt: 20 us instead of 8 us for a round trip on the
/// development machine). Nothing the guest waits for arrives on the lane
/// while the vCPU runs its guest: its requests name the engine's interrupt
/// socket ([`Lane::irq_port`]), so interrupts go there and the engine
/// injects them; what does arrive (the acknowledgement of a posted write)
/// is reaped at the vCPU's next exit. The engine kicks the vCPU out of
/// `KVM_RUN` ([`Driver::attach`]'s waker) only when a datagram in flight is
/// due for retransmission, and the vCPU services its lane
/// ([`Driver::service`]) before it enters the guest again. (An eventfd
/// registered with the ring would have said when something arrived, but
/// on Linux 6.18 it is signalled for every completion whatever
/// `IORING_CQ_EVENTFD_DISABLED` says, which woke the engine for every
/// answer.) Where the kernel refuses owned rings, the engine thread steps
/// the lane itself while the vCPU is in its guest, as SQPOLL lanes always
/// do.
#[derive(Clone)]
pub struct Driver {
    cell: Arc<Cell>,
    doorbell: Arc<Doorbell>,
    spin: Duration,
}

impl Driver {
    /// Called once on the vCPU's own thread before it runs its guest: the
    /// thread takes the lane's ring (if owned) and arms its receives.
    /// `waker` makes this vCPU call [`Driver::service`] soon (a kick out of
    /// `KVM_RUN`).
    pub fn attach(&self, waker: Waker) -> std::io::Result<()> {
        let _ = self.cell.waker.set(waker);
        let mut l = self.cell.lp.lock().unwrap_or_else(|p| p.into_inner());
        l.start()
    }

    /// Starts driving (before publishing a request): the engine keeps off.
    pub fn begin(&self) {
        self.cell.driving.store(true, Ordering::SeqCst);
    }

    /// Runs one engine iteration on this lane; `false` if nothing happened
    /// (or the engine holds the lane right now).
    pub fn step(&self) -> bool {
        match self.cell.lp.try_lock() {
            Ok(mut l) => l.step(true).unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Stops driving (before entering the guest). On an owned ring, what
    /// arrived meanwhile is reaped now and the engine learns when the
    /// lane's next retransmission is due. A shared lane with datagrams in
    /// flight wakes the engine to look after them.
    pub fn end(&self) {
        let c = &self.cell;
        if !c.owned {
            c.driving.store(false, Ordering::SeqCst);
            let busy = c.lp.try_lock().map(|l| l.busy()).unwrap_or(true);
            if busy {
                self.doorbell.kick();
            }
            return;
        }
        let Ok(mut l) = c.lp.lock() else {
            c.driving.store(false, Ordering::SeqCst);
            return;
        };
        c.driving.store(false, Ordering::SeqCst);
        if l.pending() {
            let _ = l.step(true);
        }
        let due = l.next_due();
        drop(l);
        c.due.store(due, Ordering::SeqCst);
        if due != 0 {
            self.doorbell.wake_by(due);
        }
    }

    /// Sleeps until something completes on the lane, a retransmission is
    /// due, or `max` passes, whichever is first (the vCPU spun its
    /// [`EngineConfig::direct_spin`] for an answer); a step reaps it. It
    /// steps the lane first, under the same hold: the request may not have
    /// gone out yet (every step the vCPU tried while it spun may have
    /// found the engine thread on a shared lane), and the engine may have
    /// reaped the answer already, which `answered()` then says. Holding
    /// the lane for the whole sleep keeps the engine off it.
    pub fn sleep(&self, max: Duration, answered: impl Fn() -> bool) {
        if let Ok(mut l) = self.cell.lp.lock() {
            let _ = l.step(true);
            if !answered() {
                l.block(max);
            }
        }
    }

    /// How long the vCPU spins for an answer before it sleeps
    /// ([`EngineConfig::direct_spin`]).
    pub fn spin_budget(&self) -> Duration {
        self.spin
    }

    /// Services the lane once (the vCPU was kicked): sends what is due,
    /// reaps what arrived, injects interrupts.
    pub fn service(&self) {
        self.begin();
        self.step();
        self.end();
    }

    /// Drives the lane until nothing is in flight (posted writes answered)
    /// or `deadline`: what a vCPU does when its guest has ended.
    pub fn flush(&self, deadline: Instant) {
        self.begin();
        while self.cell.lp.lock().map(|l| l.busy()).unwrap_or(false) && Instant::now() < deadline {
            self.step();
            std::hint::spin_loop();
        }
        self.end();
    }
}

/// A running engine. Dropping it stops the thread.
pub struct Engine {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    stats: Arc<EngineStats>,
    doorbell: Arc<Doorbell>,
    drivers: Vec<Option<Driver>>,
    owned: bool,
}

/// Builds a lane's io_uring: owned by one thread where the kernel allows
/// it, else shared; SQPOLL direct lanes share one kernel thread. Returns
/// the ring and whether it is owned.
fn build_ring(
    cfg: &EngineConfig,
    direct: bool,
    sq_owner: &mut Option<libc::c_int>,
) -> std::io::Result<(IoUring, bool)> {
    if let (true, Some(sq)) = (direct, cfg.sqpoll) {
        let mut b = IoUring::builder();
        b.setup_sqpoll(sq.idle_ms);
        if let Some(cpu) = sq.cpu {
            b.setup_sqpoll_cpu(cpu);
        }
        if let Some(fd) = *sq_owner {
            b.setup_attach_wq(fd);
        }
        let r = b.build(RING_ENTRIES)?;
        sq_owner.get_or_insert(r.as_raw_fd());
        return Ok((r, false));
    }
    if !cfg.owned_rings {
        return Ok((IoUring::new(RING_ENTRIES)?, false));
    }
    let mut b = IoUring::builder();
    // Disabled until its owner thread enables it: the kernel records the
    // single issuer then.
    b.setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .setup_r_disabled();
    match b.build(RING_ENTRIES) {
        Ok(r) => Ok((r, true)),
        // Before Linux 6.1: a shared ring, whose task work interrupts.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            Ok((IoUring::new(RING_ENTRIES)?, false))
        }
        Err(e) => Err(e),
    }
}

/// Submission queue entries per lane.
const RING_ENTRIES: u32 = 256;

impl Engine {
    /// Starts the engine thread (pinned to `core` if given) over `lanes`.
    pub fn spawn(
        cfg: EngineConfig,
        lanes: Vec<Lane>,
        core: Option<usize>,
    ) -> std::io::Result<Engine> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EngineStats::default());
        let doorbell = Arc::new(Doorbell::new()?);
        let mut cells = Vec::new();
        let mut sq_owner: Option<libc::c_int> = None;
        let mut all_owned = cfg.owned_rings;
        for lane in lanes {
            let (ring, owned) = build_ring(&cfg, lane.direct, &mut sq_owner)?;
            all_owned &= owned || (lane.direct && cfg.sqpoll.is_some());
            // The engine sleeps on the eventfd of the ring it owns (every
            // arrival there is work for it), on a shared ring's fd, and on
            // nothing of an owned direct lane's.
            let evfd = if owned && !lane.direct {
                let e = EventFd::new()?;
                ring.submitter().register_eventfd(e.0)?;
                Some(e)
            } else {
                None
            };
            let wake_fd = match (&evfd, owned) {
                (Some(e), _) => Some(e.0),
                (None, false) => Some(ring.as_raw_fd()),
                (None, true) => None,
            };
            let lp = Loop::new(
                cfg,
                ring,
                owned,
                lane.irq_port,
                lane.servers,
                lane.sockets,
                lane.vcpus,
                lane.injectors,
                stats.clone(),
            );
            cells.push(Arc::new(Cell {
                lp: Mutex::new(lp),
                driving: AtomicBool::new(false),
                direct: lane.direct,
                owned,
                wake_fd,
                evfd,
                due: AtomicU64::new(0),
                waker: OnceLock::new(),
            }));
        }
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
        let (s, db, st) = (stop.clone(), doorbell.clone(), stats.clone());
        let join = std::thread::Builder::new()
            .name("dp-engine".into())
            .spawn(move || {
                if let Some(c) = core {
                    let _ = affinity::set_thread_affinity([c]);
                }
                engine_thread(cfg, cells, db, s, st);
            })?;
        Ok(Engine {
            stop,
            join: Some(join),
            stats,
            doorbell,
            drivers,
            owned: all_owned,
        })
    }

    /// The driver of lane `i`, if it is a direct lane.
    pub fn driver(&self, i: usize) -> Option<Driver> {
        self.drivers.get(i).cloned().flatten()
    }

    /// Whether every lane that can be owned by one thread is (the kernel
    /// has `IORING_SETUP_DEFER_TASKRUN`; SQPOLL lanes never are, nor lanes
    /// of an engine configured without [`EngineConfig::owned_rings`]).
    pub fn owned_rings(&self) -> bool {
        self.owned
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

/// The engine thread. It steps the lanes it runs (the shared lane, and
/// shared direct lanes while their vCPU is in its guest), spins
/// `spin_budget` empty rounds, then sleeps in `ppoll` on the doorbell and
/// the lanes' wake fds until something arrives or a retransmission is due.
/// Owned direct lanes it never steps: it kicks their vCPU when their
/// retransmission is due while the vCPU is in its guest.
fn engine_thread(
    cfg: EngineConfig,
    cells: Vec<Arc<Cell>>,
    doorbell: Arc<Doorbell>,
    stop: Arc<AtomicBool>,
    stats: Arc<EngineStats>,
) {
    let mut idle = 0u32;
    let mut fds: Vec<libc::pollfd> = Vec::new();
    // Per cell: the `due` it was last kicked for (not kicked again for it).
    let mut kicked_for = vec![0u64; cells.len()];
    let mut polled: Vec<usize> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut work = false;
        for c in &cells {
            if c.direct && (c.owned || c.driving.load(Ordering::Acquire)) {
                continue;
            }
            if let Ok(mut l) = c.lp.try_lock() {
                match l.step(!c.direct) {
                    Ok(w) => work |= w,
                    Err(e) => eprintln!("devplane client engine: {e}"),
                }
            }
        }
        if work {
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < cfg.spin_budget {
            std::hint::spin_loop();
            continue;
        }
        idle = 0;
        doorbell.sleeping.store(true, Ordering::SeqCst);
        // A vCPU that published before seeing the flag did not ring; a
        // shared lane may have completions or deferred work waiting.
        let pending = cells.iter().any(|c| {
            !(c.direct && (c.owned || c.driving.load(Ordering::SeqCst)))
                && c.lp
                    .try_lock()
                    .map(|mut l| l.fresh() || l.pending() || l.queued())
                    .unwrap_or(false)
        });
        if !pending {
            fds.clear();
            fds.push(libc::pollfd {
                fd: doorbell.efd.0,
                events: libc::POLLIN,
                revents: 0,
            });
            // The cell each fd after the doorbell's belongs to.
            polled.clear();
            let now = now_ns();
            let mut wake = u64::MAX;
            for (i, c) in cells.iter().enumerate() {
                if c.direct && c.owned {
                    // A driving vCPU retransmits by itself; it publishes its
                    // next due time when it stops.
                    let due = c.due.load(Ordering::SeqCst);
                    if due != 0 && due != kicked_for[i] && !c.driving.load(Ordering::SeqCst) {
                        wake = wake.min(due);
                    }
                } else if !(c.direct && c.driving.load(Ordering::SeqCst))
                    && c.lp.try_lock().map(|l| l.busy()).unwrap_or(true)
                {
                    // Something in flight that this thread retransmits.
                    let t = cfg.idle_sleep.min(cfg.retransmit);
                    wake = wake.min(now + t.as_nanos() as u64);
                }
                if let Some(fd) = c.wake_fd {
                    fds.push(libc::pollfd {
                        fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                    polled.push(i);
                }
            }
            // No periodic wake-up without a reason: it would preempt the
            // vCPU that shares this core (a 200 us tick put ~25 us on one
            // exit in every ~24 of the exit floor).
            let t = if wake == u64::MAX {
                IDLE_TIMEOUT
            } else {
                Duration::from_nanos(wake.saturating_sub(now))
            };
            doorbell.wake_at.store(wake, Ordering::SeqCst);
            let ts = libc::timespec {
                tv_sec: t.as_secs() as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            };
            // SAFETY: `fds` and `ts` are valid for the call.
            unsafe {
                libc::ppoll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    &ts,
                    std::ptr::null(),
                );
            }
            doorbell.wake_at.store(0, Ordering::SeqCst);
            add(&stats.wakeups, 1);
            doorbell.efd.take();
            for (k, &i) in polled.iter().enumerate() {
                if fds[k + 1].revents != 0
                    && let Some(e) = &cells[i].evfd
                {
                    // Reset; the next round steps the lane.
                    e.take();
                }
            }
            // Owned direct lanes whose retransmission is due: their vCPU
            // services them.
            let now = now_ns();
            for (i, c) in cells.iter().enumerate() {
                if !(c.direct && c.owned) {
                    continue;
                }
                let due = c.due.load(Ordering::SeqCst);
                if due != 0
                    && due <= now
                    && due != kicked_for[i]
                    && !c.driving.load(Ordering::SeqCst)
                {
                    kicked_for[i] = due;
                    if let Some(w) = c.waker.get() {
                        add(&stats.kicks, 1);
                        w();
                    }
                }
            }
        }
        doorbell.sleeping.store(false, Ordering::SeqCst);
    }
}

/// The engine's work over a set of vCPUs and sockets, one io_uring.
pub(crate) struct Loop {
    cfg: EngineConfig,
    ring: IoUring,
    /// The ring is owned by the one thread that steps it
    /// (`IORING_SETUP_DEFER_TASKRUN | SINGLE_ISSUER | TASKRUN_FLAG`,
    /// enabled by that thread in [`Loop::start`]): what the kernel
    /// received is completed only when that thread enters the ring, and
    /// `IORING_SQ_TASKRUN` says when to.
    owned: bool,
    /// Named in every request sent ([`Lane::irq_port`]).
    irq_port: Option<u16>,
    /// Per socket: connected to its server.
    connected: Vec<bool>,
    /// [`Lane::servers`].
    servers: HashMap<u32, SocketAddr>,
    /// The last interrupt sequence number applied, per (model, VM).
    irq_seen: HashMap<(u32, u32), u64>,
    sockets: Vec<UdpSocket>,
    recv_bufs: Vec<Box<[u8]>>,
    vcpus: Vec<VcpuState>,
    by_id: HashMap<(u32, u16), usize>,
    model_index: Vec<HashMap<u32, usize>>,
    injectors: HashMap<u32, Injector>,
    stats: Arc<EngineStats>,
    /// Registered send buffers (IORING_REGISTER_BUFFERS), `SEND_SLOT`
    /// bytes each; a buffer is in use from its send until its completion
    /// (for SEND_ZC, its notification).
    send_pool: Box<[u8]>,
    free_send: Vec<usize>,
    registered: bool,
    rng: u64,
    started: bool,
    rearm: Vec<usize>,
    /// Completion scratch, reused every step.
    cqes: Vec<(u64, i32, u32)>,
    /// Buffers and slot lists of retired datagrams, for the next ones.
    spare: Vec<(Box<[u8]>, FlightSlots)>,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Loop {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: EngineConfig,
        ring: IoUring,
        owned: bool,
        irq_port: Option<u16>,
        servers: HashMap<u32, SocketAddr>,
        sockets: Vec<UdpSocket>,
        vcpus: Vec<VcpuPort>,
        injectors: HashMap<u32, Injector>,
        stats: Arc<EngineStats>,
    ) -> Loop {
        let mut by_id = HashMap::new();
        let mut model_index = Vec::new();
        let states = vcpus
            .into_iter()
            .enumerate()
            .map(|(i, port)| {
                by_id.insert((port.vm, port.vcpu), i);
                model_index.push(
                    port.models
                        .iter()
                        .enumerate()
                        .map(|(j, m)| (m.model, j))
                        .collect(),
                );
                let n = port.models.len();
                VcpuState {
                    port,
                    tail: 0,
                    queued: (0..n).map(|_| VecDeque::new()).collect(),
                    inflight: (0..n).map(|_| None).collect(),
                }
            })
            .collect();
        let mut send_pool = vec![0u8; SEND_BUFS * SEND_SLOT].into_boxed_slice();
        let iovecs: Vec<libc::iovec> = (0..SEND_BUFS)
            .map(|i| libc::iovec {
                // SAFETY: in bounds: i < SEND_BUFS.
                iov_base: unsafe { send_pool.as_mut_ptr().add(i * SEND_SLOT) } as *mut libc::c_void,
                iov_len: SEND_SLOT,
            })
            .collect();
        // SAFETY: the pool lives in the `Loop`, which owns the ring and
        // drops it first (field order), so the registration never outlives
        // the memory. If registration is refused (memlock limits), sends
        // still work from the same memory, unregistered.
        let registered = unsafe { ring.submitter().register_buffers(&iovecs) }.is_ok();
        let recv_bufs = sockets
            .iter()
            .map(|_| vec![0u8; BUF_SIZE * BUFS_PER_SOCKET as usize].into_boxed_slice())
            .collect();
        Loop {
            rng: cfg.loss.seed | 1,
            cfg,
            ring,
            owned,
            irq_port,
            connected: sockets.iter().map(|s| s.peer_addr().is_ok()).collect(),
            servers,
            irq_seen: HashMap::new(),
            sockets,
            recv_bufs,
            vcpus: states,
            by_id,
            model_index,
            injectors,
            stats,
            send_pool,
            free_send: (0..SEND_BUFS).rev().collect(),
            registered,
            started: false,
            rearm: Vec::new(),
            cqes: Vec::with_capacity(64),
            spare: Vec::new(),
        }
    }

    fn chance(&mut self, permille: u16) -> bool {
        if permille == 0 {
            return false;
        }
        // xorshift64*
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let r = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r % 1000) < permille as u64
    }

    fn push(&mut self, e: squeue::Entry) -> std::io::Result<()> {
        loop {
            // SAFETY: the buffers an entry points at (receive pools, send
            // buffers in `send_bufs`, the eventfd word, the timespec) live
            // in `self` until the entry completes: send buffers are only
            // recycled on their completion, the rest for the whole loop.
            if unsafe { self.ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    fn provide(&mut self, sock: usize, bid: u16) -> std::io::Result<()> {
        let base = self.recv_bufs[sock].as_mut_ptr();
        // SAFETY: bid < BUFS_PER_SOCKET, so the buffer is inside the pool.
        let addr = unsafe { base.add(bid as usize * BUF_SIZE) };
        let e = opcode::ProvideBuffers::new(addr, BUF_SIZE as i32, 1, sock as u16, bid)
            .build()
            .user_data(UD_PROVIDE);
        self.push(e)
    }

    fn arm_recv(&mut self, sock: usize) -> std::io::Result<()> {
        let fd = types::Fd(self.sockets[sock].as_raw_fd());
        let e = opcode::RecvMulti::new(fd, sock as u16)
            .build()
            .user_data(UD_RECV | sock as u64);
        self.push(e)
    }

    /// Takes an owned ring for the calling thread, provides the receive
    /// buffers and arms the multishot receives. The thread that calls this
    /// is the one io_uring runs receive work on (task work goes to the
    /// submitter): the engine thread for the shared lane, the vCPU thread
    /// for a direct lane.
    fn start(&mut self) -> std::io::Result<()> {
        if self.started {
            return Ok(());
        }
        if self.owned {
            // The kernel records this thread as the ring's single issuer.
            self.ring.submitter().register_enable_rings()?;
        }
        for s in 0..self.sockets.len() {
            let base = self.recv_bufs[s].as_mut_ptr();
            let e =
                opcode::ProvideBuffers::new(base, BUF_SIZE as i32, BUFS_PER_SOCKET, s as u16, 0)
                    .build()
                    .user_data(UD_PROVIDE);
            self.push(e)?;
            self.arm_recv(s)?;
        }
        self.started = true;
        self.enter()?;
        Ok(())
    }

    /// One `io_uring_enter` when there is something to do: submits what is
    /// queued and, on an owned ring, runs the deferred work (datagrams the
    /// kernel received) so that their completions can be reaped. Nothing
    /// when nothing is queued and nothing waits.
    fn enter(&mut self) -> std::io::Result<()> {
        let to_submit = self.ring.submission().len() as u32;
        if !self.owned {
            if to_submit > 0 {
                self.ring.submit()?;
                add(&self.stats.submits, 1);
            }
            return Ok(());
        }
        if to_submit == 0 && !self.ring.submission().taskrun() {
            return Ok(());
        }
        // SAFETY: no argument structure is passed; the entries being
        // submitted point at memory this `Loop` keeps (see `push`).
        let r = unsafe {
            self.ring
                .submitter()
                .enter::<libc::sigset_t>(to_submit, 0, ENTER_GETEVENTS, None)
        };
        match r {
            Ok(_) => {
                if to_submit > 0 {
                    add(&self.stats.submits, 1);
                }
                Ok(())
            }
            // Interrupted, or the completion queue is full: what is left
            // goes with the next call.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Waits in the kernel for a completion, at most until the next
    /// retransmission is due or `max` (submitting what is queued first).
    /// Interrupted or timed out, it just returns: the next step sees.
    fn block(&mut self, max: Duration) {
        if !self.ring.completion().is_empty() {
            return;
        }
        // Nothing in flight: nothing to wait for but a stray answer; wake
        // at the retransmission interval all the same, a safety net.
        let due = self.next_due();
        let wait = if due == 0 {
            max.min(self.cfg.retransmit)
        } else {
            max.min(Duration::from_nanos(due.saturating_sub(now_ns())))
        };
        let ts = types::Timespec::from(wait);
        let args = types::SubmitArgs::new().timespec(&ts);
        let _ = self.ring.submitter().submit_with_args(1, &args);
    }

    /// Whether the kernel holds work for this ring: deferred completions
    /// (owned) or completions not reaped yet (shared).
    fn pending(&mut self) -> bool {
        if self.owned {
            self.ring.submission().taskrun()
        } else {
            !self.ring.completion().is_empty()
        }
    }

    /// Whether entries wait in the submission queue.
    fn queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// When the earliest datagram in flight is due for retransmission
    /// ([`now_ns`]); 0 if none is in flight.
    fn next_due(&self) -> u64 {
        // The earliest send; the clocks are read only when there is one
        // (every synchronous exit ends here with nothing in flight).
        let Some(first) = self
            .vcpus
            .iter()
            .flat_map(|v| v.inflight.iter().flatten())
            .map(|f| f.sent_at)
            .min()
        else {
            return 0;
        };
        let left = (first + self.cfg.retransmit).saturating_duration_since(Instant::now());
        now_ns() + left.as_nanos() as u64
    }

    /// One iteration: new requests out, due retransmissions out, one
    /// submit, completions in. Never blocks.
    pub(crate) fn step(&mut self, owner: bool) -> std::io::Result<bool> {
        if !self.started {
            if !owner {
                return Ok(false);
            }
            self.start()?;
        }
        if owner {
            for s in std::mem::take(&mut self.rearm) {
                self.arm_recv(s)?;
            }
        }
        let mut work = self.drain_rings()?.0;
        work |= self.retransmit()?;
        self.enter()?;
        if self.reap(owner)? {
            work = true;
            // An answered datagram lets the requests queued behind it go
            // now: the thread stepping may not step again soon (a vCPU
            // about to halt in its guest). Only then: the buffers the reap
            // gave back go with the next entry, not a system call of their
            // own.
            if self.drain_rings()?.1 {
                self.enter()?;
            }
        }
        Ok(work)
    }

    /// Whether a vCPU published something not yet taken.
    fn fresh(&self) -> bool {
        self.vcpus.iter().any(|v| v.tail < v.port.ring.head())
    }

    /// Whether a vCPU published something not yet taken, or a datagram is
    /// in flight.
    fn busy(&self) -> bool {
        self.vcpus
            .iter()
            .any(|v| v.tail < v.port.ring.head() || v.inflight.iter().any(Option::is_some))
    }

    /// Moves newly published requests into per-model queues and sends
    /// whatever may go.
    /// Returns whether it took new requests, and whether it queued a send.
    fn drain_rings(&mut self) -> std::io::Result<(bool, bool)> {
        let mut work = false;
        let mut sent = false;
        for v in 0..self.vcpus.len() {
            let head = self.vcpus[v].port.ring.head();
            while self.vcpus[v].tail < head {
                let st = &mut self.vcpus[v];
                let i = st.tail;
                let model = st.port.ring.slot(i).model.load(Ordering::Relaxed) as usize;
                let bytes = st.port.ring.record(i);
                st.tail += 1;
                work = true;
                match (RawRecord::read_from_bytes(&bytes), st.queued.get_mut(model)) {
                    (Ok(rec), Some(q)) => q.push_back((i, rec)),
                    _ => st
                        .port
                        .ring
                        .complete(i, devplane_wire::Status::Rejected as u8, 0),
                }
            }
            for m in 0..self.vcpus[v].queued.len() {
                if self.vcpus[v].inflight[m].is_none() && !self.vcpus[v].queued[m].is_empty() {
                    self.send_batch(v, m)?;
                    sent = true;
                }
            }
        }
        Ok((work, sent))
    }

    fn send_batch(&mut self, v: usize, m: usize) -> std::io::Result<()> {
        let remote = self.vcpus[v].port.models[m];
        // Buffers of retired datagrams are reused: no allocation per send.
        let (mut buf, mut slots) = self
            .spare
            .pop()
            .unwrap_or_else(|| (vec![0u8; MAX_DATAGRAM].into_boxed_slice(), Vec::new()));
        slots.clear();
        let mut header = Header::new(Kind::Request, remote.model, remote.server, self.cfg.client);
        if let Some(port) = self.irq_port {
            header = header.with_irq_port(port);
        }
        let len = {
            let Ok(mut w) = DatagramWriter::new(&mut buf, header) else {
                return Ok(());
            };
            let q = &mut self.vcpus[v].queued[m];
            while slots.len() < MAX_RECORDS {
                let Some((i, rec)) = q.pop_front() else { break };
                if w.push_raw(&rec).is_err() {
                    q.push_front((i, rec));
                    break;
                }
                slots.push((rec.seq.get(), i, false));
            }
            w.finish()
        };
        add(&self.stats.tx_datagrams, 1);
        add(&self.stats.tx_records, slots.len() as u64);
        let flight = InFlight {
            slots,
            answered: 0,
            buf,
            len,
            sent_at: Instant::now(),
            retries: 0,
        };
        self.transmit(remote.socket, &flight)?;
        self.vcpus[v].inflight[m] = Some(flight);
        Ok(())
    }

    fn transmit(&mut self, sock: usize, f: &InFlight) -> std::io::Result<()> {
        if self.chance(self.cfg.loss.tx_permille) {
            add(&self.stats.loss_tx, 1);
            return Ok(());
        }
        // The in-flight datagram may be retired before the send completes;
        // send from a registered buffer held until its completion.
        let Some(id) = self.free_send.pop() else {
            // Every buffer is in flight: the retransmission timer retries.
            add(&self.stats.send_pool_empty, 1);
            return Ok(());
        };
        let off = id * SEND_SLOT;
        let len = f.len.min(SEND_SLOT);
        self.send_pool[off..off + len].copy_from_slice(&f.buf[..len]);
        let ptr = self.send_pool[off..].as_ptr();
        let fd = types::Fd(self.sockets[sock].as_raw_fd());
        let e = if self.cfg.zero_copy {
            let mut op = opcode::SendZc::new(fd, ptr, len as u32);
            if self.registered {
                op = op.buf_index(Some(id as u16));
            }
            op.build()
        } else {
            opcode::Send::new(fd, ptr, len as u32).build()
        };
        self.push(e.user_data(UD_SEND | id as u64))
    }

    fn retransmit(&mut self) -> std::io::Result<bool> {
        let now = Instant::now();
        let mut work = false;
        for v in 0..self.vcpus.len() {
            for m in 0..self.vcpus[v].inflight.len() {
                let due = matches!(&self.vcpus[v].inflight[m],
                    Some(f) if now.duration_since(f.sent_at) >= self.cfg.retransmit);
                if !due {
                    continue;
                }
                work = true;
                let Some(mut f) = self.vcpus[v].inflight[m].take() else {
                    continue;
                };
                if f.retries >= self.cfg.max_retries {
                    add(&self.stats.timeouts, (f.slots.len() - f.answered) as u64);
                    let ring = self.vcpus[v].port.ring.clone();
                    for &(_, i, answered) in &f.slots {
                        if !answered {
                            ring.complete(i, STATUS_TIMEOUT, 0);
                        }
                    }
                    self.spare.push((f.buf, f.slots));
                    continue;
                }
                f.retries += 1;
                f.sent_at = now;
                add(&self.stats.retransmits, 1);
                let sock = self.vcpus[v].port.models[m].socket;
                self.transmit(sock, &f)?;
                self.vcpus[v].inflight[m] = Some(f);
            }
        }
        Ok(work)
    }

    fn reap(&mut self, owner: bool) -> std::io::Result<bool> {
        let mut work = false;
        // Reused scratch: no allocation per step.
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(ud, res, flags) in &cqes {
            work = true;
            match ud & UD_KIND {
                UD_SEND => {
                    let id = (ud & !UD_KIND) as usize;
                    if res < 0 {
                        add(&self.stats.send_errors, 1);
                    }
                    // SEND_ZC: the first completion says "more" (the
                    // notification that the buffer is free follows).
                    let held = io_uring::cqueue::more(flags) && !io_uring::cqueue::notif(flags);
                    if !held && id < SEND_BUFS {
                        self.free_send.push(id);
                    }
                }
                UD_RECV => {
                    let sock = (ud & !UD_KIND) as usize;
                    if res > 0 {
                        if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
                            let off = bid as usize * BUF_SIZE;
                            let n = (res as usize).min(BUF_SIZE);
                            // Parse in place: the pool is moved out (its heap
                            // memory, which the kernel writes, stays put) so
                            // that `on_datagram` may borrow `self`.
                            let pool = std::mem::take(&mut self.recv_bufs[sock]);
                            self.on_datagram(&pool[off..off + n], sock);
                            self.recv_bufs[sock] = pool;
                            self.provide(sock, bid)?;
                        }
                    }
                    if !io_uring::cqueue::more(flags) {
                        if owner {
                            self.arm_recv(sock)?;
                        } else {
                            self.rearm.push(sock);
                        }
                    }
                }
                _ => {}
            }
        }
        self.cqes = cqes;
        // Buffers given back and receives re-armed: a shared ring submits
        // them now; an owned ring's go with its next entry (the next
        // request, or a service after an arrival), saving a system call
        // per answer.
        if !self.owned && self.queued() {
            self.ring.submit()?;
        }
        Ok(work)
    }

    /// Acknowledges a model's interrupts up to `id.seq` to its server,
    /// from the socket they came to.
    fn acknowledge(&mut self, sock: usize, model: u32, server: u32, id: RequestId) {
        if self.chance(self.cfg.loss.tx_permille) {
            add(&self.stats.loss_tx, 1);
            return;
        }
        let mut buf = [0u8; HEADER_LEN + RECORD_LEN];
        let header = Header::new(Kind::Ack, model, server, self.cfg.client);
        let Ok(n) = datagram::encode(&mut buf, header, &[Record::Ack(Ack { id })]) else {
            return;
        };
        let s = &self.sockets[sock];
        let sent = if self.connected.get(sock).copied().unwrap_or(false) {
            s.send(&buf[..n])
        } else {
            match self.servers.get(&server) {
                Some(addr) => s.send_to(&buf[..n], addr),
                None => {
                    add(&self.stats.send_errors, 1);
                    return;
                }
            }
        };
        match sent {
            Ok(_) => add(&self.stats.acks_sent, 1),
            Err(_) => add(&self.stats.send_errors, 1),
        }
    }

    fn on_datagram(&mut self, bytes: &[u8], sock: usize) {
        if self.chance(self.cfg.loss.rx_permille) {
            add(&self.stats.loss_rx, 1);
            return;
        }
        let Ok(d) = Datagram::parse(bytes) else {
            add(&self.stats.malformed, 1);
            return;
        };
        match d.kind() {
            Kind::Response => {
                let model = d.model();
                for r in d.records() {
                    let Record::Response(rsp) = r else { continue };
                    self.on_response(model, &rsp);
                }
            }
            Kind::Interrupt => {
                // Applied once each, in sequence order (a server resends a
                // datagram until it is acknowledged), then acknowledged:
                // those for a VM not here too (dropped and counted), since
                // resending them would not help.
                let model = d.model();
                let mut top: Option<RequestId> = None;
                for r in d.records() {
                    let Record::Interrupt(irq) = r else { continue };
                    if top.is_none_or(|t| irq.seq > t.seq) {
                        top = Some(RequestId {
                            vm: irq.vm,
                            hypervisor: irq.hypervisor,
                            vcpu: 0,
                            seq: irq.seq,
                        });
                    }
                    let last = self.irq_seen.entry((model, irq.vm)).or_insert(0);
                    if irq.seq <= *last {
                        add(&self.stats.irq_duplicates, 1);
                        continue;
                    }
                    *last = irq.seq;
                    match self.injectors.get(&irq.vm) {
                        Some(inject) if inject(irq.line, irq.action) => add(&self.stats.irqs, 1),
                        _ => add(&self.stats.irqs_unknown_vm, 1),
                    }
                }
                if let Some(id) = top {
                    self.acknowledge(sock, model, d.server(), id);
                }
            }
            _ => add(&self.stats.malformed, 1),
        }
    }

    fn on_response(&mut self, model: u32, rsp: &devplane_wire::Response) {
        let Some(&v) = self.by_id.get(&(rsp.id.vm, rsp.id.vcpu)) else {
            add(&self.stats.late, 1);
            return;
        };
        let Some(&m) = self.model_index[v].get(&model) else {
            add(&self.stats.late, 1);
            return;
        };
        let st = &mut self.vcpus[v];
        let Some(f) = st.inflight[m].as_mut() else {
            add(&self.stats.late, 1);
            return;
        };
        let Some(pos) = f.slots.iter().position(|&(seq, _, _)| seq == rsp.id.seq) else {
            add(&self.stats.late, 1);
            return;
        };
        let (_, i, answered) = f.slots[pos];
        if answered {
            add(&self.stats.late, 1);
            return;
        }
        f.slots[pos].2 = true;
        st.port.ring.complete(i, rsp.status as u8, rsp.data);
        add(&self.stats.answers, 1);
        f.answered += 1;
        if f.answered == f.slots.len()
            && let Some(done) = st.inflight[m].take()
        {
            self.spare.push((done.buf, done.slots));
        }
    }
}
