//! The client engine: one thread that drains every vCPU's exit ring into
//! io_uring sends, receives answers and interrupts with multishot receive,
//! matches answers to their vCPU by (VM, vCPU, sequence) and wakes it,
//! retransmits what is not answered in time, and injects interrupts.
//!
//! Ordering and batching: per (vCPU, device model) at most one datagram is
//! in flight. Requests queued behind it (posted writes, say) go out
//! together in the next datagram, up to 36 records, once it is answered.
//! So a device sees a vCPU's accesses in program order even across loss
//! and retransmission, a read never overtakes an earlier posted write, and
//! posted writes batch themselves under load.

use std::collections::{HashMap, VecDeque};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devplane_wire::{
    Datagram, DatagramWriter, Header, IrqAction, Kind, MAX_DATAGRAM, MAX_RECORDS, RawRecord, Record,
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
}

/// Shared between the engine and the vCPUs: lets a vCPU wake a sleeping
/// engine.
pub struct Doorbell {
    sleeping: AtomicBool,
    efd: libc::c_int,
}

impl Doorbell {
    fn new() -> std::io::Result<Doorbell> {
        // SAFETY: plain syscall; the fd is owned by the Doorbell.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Doorbell {
            sleeping: AtomicBool::new(false),
            efd,
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
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
        unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.efd) };
    }
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

/// One io_uring and its sockets serving a set of vCPUs.
pub struct Lane {
    /// One connected UDP socket per server, in server order.
    pub sockets: Vec<UdpSocket>,
    /// The vCPUs it serves.
    pub vcpus: Vec<VcpuPort>,
    /// Interrupt injectors of the VMs whose interrupts may arrive here.
    pub injectors: HashMap<u32, Injector>,
    /// Direct: its one vCPU drives it while waiting (see [`Driver`]); the
    /// engine thread only looks after it while that vCPU runs its guest.
    pub direct: bool,
}

struct Cell {
    lp: Mutex<Loop>,
    /// Its vCPU is driving it (direct lanes): the engine keeps off.
    driving: AtomicBool,
    direct: bool,
    ring_fd: libc::c_int,
}

/// A vCPU's handle on its direct lane: it sends its own requests and reaps
/// its own answers while it waits, on its own thread, so a synchronous
/// exit involves no other thread of the client (the 2-core choice: two
/// spinners, the vCPU and the server worker). io_uring runs receive work
/// on the thread that armed the receive, which is this vCPU's.
#[derive(Clone)]
pub struct Driver {
    cell: Arc<Cell>,
    doorbell: Arc<Doorbell>,
}

impl Driver {
    /// Marks the lane as driven by its vCPU (or not). When the vCPU stops
    /// driving with datagrams still in flight (posted writes), the engine
    /// is woken to look after them.
    pub fn set_driving(&self, on: bool) {
        self.cell.driving.store(on, Ordering::SeqCst);
        if !on {
            let busy = self.cell.lp.try_lock().map(|l| l.busy()).unwrap_or(true);
            if busy {
                self.doorbell.kick();
            }
        }
    }

    /// Runs one engine iteration on this lane; `false` if nothing happened
    /// (or the engine holds the lane right now).
    pub fn step(&self) -> bool {
        match self.cell.lp.try_lock() {
            Ok(mut l) => l.step(true).unwrap_or(false),
            Err(_) => false,
        }
    }
}

/// A running engine. Dropping it stops the thread.
pub struct Engine {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    stats: Arc<EngineStats>,
    doorbell: Arc<Doorbell>,
    drivers: Vec<Option<Driver>>,
}

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
        for lane in lanes {
            let ring = match (lane.direct, cfg.sqpoll) {
                (true, Some(sq)) => {
                    let mut b = IoUring::builder();
                    b.setup_sqpoll(sq.idle_ms);
                    if let Some(cpu) = sq.cpu {
                        b.setup_sqpoll_cpu(cpu);
                    }
                    if let Some(fd) = sq_owner {
                        b.setup_attach_wq(fd);
                    }
                    let r = b.build(256)?;
                    sq_owner.get_or_insert(r.as_raw_fd());
                    r
                }
                _ => IoUring::new(256)?,
            };
            let ring_fd = ring.as_raw_fd();
            let lp = Loop::new(
                cfg,
                ring,
                lane.sockets,
                lane.vcpus,
                lane.injectors,
                stats.clone(),
            );
            cells.push(Arc::new(Cell {
                lp: Mutex::new(lp),
                driving: AtomicBool::new(false),
                direct: lane.direct,
                ring_fd,
            }));
        }
        let drivers = cells
            .iter()
            .map(|c| {
                c.direct.then(|| Driver {
                    cell: c.clone(),
                    doorbell: doorbell.clone(),
                })
            })
            .collect();
        let (s, db) = (stop.clone(), doorbell.clone());
        let join = std::thread::Builder::new()
            .name("dp-engine".into())
            .spawn(move || {
                if let Some(c) = core {
                    let _ = affinity::set_thread_affinity([c]);
                }
                engine_thread(cfg, cells, db, s);
            })?;
        Ok(Engine {
            stop,
            join: Some(join),
            stats,
            doorbell,
            drivers,
        })
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

/// The engine thread: steps every lane it may (shared lanes always; direct
/// lanes while their vCPU is in its guest), spins `spin_budget` empty
/// rounds, then sleeps in `poll` on the doorbell and the io_uring fds of
/// the lanes it looks after, at most `idle_sleep` (and never longer than
/// the retransmission timeout).
fn engine_thread(
    cfg: EngineConfig,
    cells: Vec<Arc<Cell>>,
    doorbell: Arc<Doorbell>,
    stop: Arc<AtomicBool>,
) {
    let mut idle = 0u32;
    let mut fds: Vec<libc::pollfd> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut work = false;
        for c in &cells {
            if c.direct && c.driving.load(Ordering::Acquire) {
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
        // A vCPU that published before seeing the flag did not ring.
        let fresh = cells.iter().any(|c| {
            !(c.direct && c.driving.load(Ordering::SeqCst))
                && c.lp.try_lock().map(|l| l.fresh()).unwrap_or(false)
        });
        if !fresh {
            fds.clear();
            fds.push(libc::pollfd {
                fd: doorbell.efd,
                events: libc::POLLIN,
                revents: 0,
            });
            for c in &cells {
                if !(c.direct && c.driving.load(Ordering::SeqCst)) {
                    fds.push(libc::pollfd {
                        fd: c.ring_fd,
                        events: libc::POLLIN,
                        revents: 0,
                    });
                }
            }
            let t = cfg.idle_sleep.min(cfg.retransmit);
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
            let mut buf = 0u64;
            // SAFETY: non-blocking read of 8 bytes into a valid u64.
            unsafe { libc::read(doorbell.efd, &mut buf as *mut u64 as *mut libc::c_void, 8) };
        }
        doorbell.sleeping.store(false, Ordering::SeqCst);
    }
}

/// The engine's work over a set of vCPUs and sockets, one io_uring.
pub(crate) struct Loop {
    cfg: EngineConfig,
    ring: IoUring,
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
    fn new(
        cfg: EngineConfig,
        ring: IoUring,
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
        // SAFETY (every push): the buffers an entry points at (receive
        // pools, send buffers in `send_bufs`, the eventfd word, the
        // timespec) live in `self` until the entry completes: send buffers
        // are only recycled on their completion, the rest for the whole
        // loop.
        loop {
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

    /// Provides the receive buffers and arms the multishot receives. The
    /// thread that calls this is the one io_uring runs receive work on
    /// (task work goes to the submitter): the engine thread in shared mode,
    /// the vCPU thread in direct mode.
    fn start(&mut self) -> std::io::Result<()> {
        if self.started {
            return Ok(());
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
        self.ring.submit()?;
        self.started = true;
        Ok(())
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
        let mut work = self.drain_rings()?;
        work |= self.retransmit()?;
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
            add(&self.stats.submits, 1);
        }
        work |= self.reap(owner)?;
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
    fn drain_rings(&mut self) -> std::io::Result<bool> {
        let mut work = false;
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
                }
            }
        }
        Ok(work)
    }

    fn send_batch(&mut self, v: usize, m: usize) -> std::io::Result<()> {
        let remote = self.vcpus[v].port.models[m];
        // Buffers of retired datagrams are reused: no allocation per send.
        let (mut buf, mut slots) = self
            .spare
            .pop()
            .unwrap_or_else(|| (vec![0u8; MAX_DATAGRAM].into_boxed_slice(), Vec::new()));
        slots.clear();
        let header = Header::new(Kind::Request, remote.model, remote.server, self.cfg.client);
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
                            self.on_datagram(&pool[off..off + n]);
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
        if !self.ring.submission().is_empty() {
            self.ring.submit()?;
        }
        Ok(work)
    }

    fn on_datagram(&mut self, bytes: &[u8]) {
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
                for r in d.records() {
                    let Record::Interrupt(irq) = r else { continue };
                    match self.injectors.get(&irq.vm) {
                        Some(inject) if inject(irq.line, irq.action) => add(&self.stats.irqs, 1),
                        _ => add(&self.stats.irqs_unknown_vm, 1),
                    }
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
