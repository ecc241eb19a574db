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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.efd, &one as *const u64 as *const libc::c_void, 8) };
        }
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.efd) };
    }
}

struct InFlight {
    /// (sequence, ring index, answered) per record, in datagram order.
    slots: Vec<(u64, u64, bool)>,
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
const UD_WAKE: u64 = 4 << 56;
const UD_TIMEOUT: u64 = 5 << 56;
const UD_KIND: u64 = 0xff << 56;
const BUF_SIZE: usize = 2048;
const BUFS_PER_SOCKET: u16 = 64;

/// A running engine. Dropping it stops the thread.
pub struct Engine {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
    stats: Arc<EngineStats>,
    doorbell: Arc<Doorbell>,
}

impl Engine {
    /// Starts the engine thread (pinned to `core` if given).
    pub fn spawn(
        cfg: EngineConfig,
        sockets: Vec<UdpSocket>,
        vcpus: Vec<VcpuPort>,
        injectors: HashMap<u32, Injector>,
        core: Option<usize>,
    ) -> std::io::Result<Engine> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(EngineStats::default());
        let doorbell = Arc::new(Doorbell::new()?);
        let ring = IoUring::new(1024)?;
        let (s, st, db) = (stop.clone(), stats.clone(), doorbell.clone());
        let join = std::thread::Builder::new()
            .name("dp-engine".into())
            .spawn(move || {
                if let Some(c) = core {
                    let _ = affinity::set_thread_affinity([c]);
                }
                let mut e = Loop::new(cfg, ring, sockets, vcpus, injectors, st, db);
                if let Err(err) = e.run(&s) {
                    eprintln!("devplane client engine stopped: {err}");
                }
            })?;
        Ok(Engine {
            stop,
            join: Some(join),
            stats,
            doorbell,
        })
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
        let one: u64 = 1;
        // SAFETY: wakes a sleeping engine; 8 bytes from a valid u64.
        unsafe {
            libc::write(
                self.doorbell.efd,
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
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

struct Loop {
    cfg: EngineConfig,
    ring: IoUring,
    sockets: Vec<UdpSocket>,
    recv_bufs: Vec<Box<[u8]>>,
    vcpus: Vec<VcpuState>,
    by_id: HashMap<(u32, u16), usize>,
    model_index: Vec<HashMap<u32, usize>>,
    injectors: HashMap<u32, Injector>,
    stats: Arc<EngineStats>,
    doorbell: Arc<Doorbell>,
    send_bufs: Vec<Option<Box<[u8]>>>,
    free_send: Vec<usize>,
    rng: u64,
    wake_armed: bool,
    efd_buf: Box<u64>,
    timeout_ts: Box<types::Timespec>,
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
        doorbell: Arc<Doorbell>,
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
            doorbell,
            send_bufs: Vec::new(),
            free_send: Vec::new(),
            wake_armed: false,
            efd_buf: Box::new(0),
            timeout_ts: Box::new(types::Timespec::new()),
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

    fn run(&mut self, stop: &AtomicBool) -> std::io::Result<()> {
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
        let mut idle = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let mut work = self.drain_rings()?;
            work |= self.retransmit()?;
            if !self.ring.submission().is_empty() {
                self.ring.submit()?;
                add(&self.stats.submits, 1);
            }
            work |= self.reap()?;
            if work {
                idle = 0;
                continue;
            }
            idle += 1;
            if idle < self.cfg.spin_budget {
                std::hint::spin_loop();
                continue;
            }
            self.sleep()?;
            idle = 0;
        }
        Ok(())
    }

    fn sleep(&mut self) -> std::io::Result<()> {
        self.doorbell.sleeping.store(true, Ordering::SeqCst);
        // Re-check after announcing: a vCPU that published before seeing
        // the flag did not ring.
        let pending = self.vcpus.iter().any(|v| v.tail < v.port.ring.head());
        if !pending {
            if !self.wake_armed {
                let buf = &mut *self.efd_buf as *mut u64 as *mut u8;
                let e = opcode::Read::new(types::Fd(self.doorbell.efd), buf, 8)
                    .build()
                    .user_data(UD_WAKE);
                self.push(e)?;
                self.wake_armed = true;
            }
            *self.timeout_ts = types::Timespec::from(self.cfg.idle_sleep.min(self.cfg.retransmit));
            let ts = &*self.timeout_ts as *const types::Timespec;
            let e = opcode::Timeout::new(ts).build().user_data(UD_TIMEOUT);
            self.push(e)?;
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
        self.doorbell.sleeping.store(false, Ordering::SeqCst);
        Ok(())
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
        let mut buf = vec![0u8; MAX_DATAGRAM].into_boxed_slice();
        let header = Header::new(Kind::Request, remote.model, remote.server, self.cfg.client);
        let mut slots = Vec::new();
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
        // The in-flight copy may be retired before the send completes;
        // send from a buffer owned until its completion.
        let id = match self.free_send.pop() {
            Some(id) => id,
            None => {
                self.send_bufs.push(None);
                self.send_bufs.len() - 1
            }
        };
        let copy: Box<[u8]> = f.buf[..f.len].into();
        let ptr = copy.as_ptr();
        self.send_bufs[id] = Some(copy);
        let fd = types::Fd(self.sockets[sock].as_raw_fd());
        let e = opcode::Send::new(fd, ptr, f.len as u32)
            .build()
            .user_data(UD_SEND | id as u64);
        self.push(e)
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

    fn reap(&mut self) -> std::io::Result<bool> {
        let mut work = false;
        let cqes: Vec<(u64, i32, u32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result(), c.flags()))
            .collect();
        for (ud, res, flags) in cqes {
            work = true;
            match ud & UD_KIND {
                UD_SEND => {
                    let id = (ud & !UD_KIND) as usize;
                    if let Some(b) = self.send_bufs.get_mut(id) {
                        *b = None;
                        self.free_send.push(id);
                    }
                }
                UD_RECV => {
                    let sock = (ud & !UD_KIND) as usize;
                    if res > 0 {
                        if let Some(bid) = io_uring::cqueue::buffer_select(flags) {
                            let off = bid as usize * BUF_SIZE;
                            let n = (res as usize).min(BUF_SIZE);
                            let data = self.recv_bufs[sock][off..off + n].to_vec();
                            self.on_datagram(&data);
                            self.provide(sock, bid)?;
                        }
                    }
                    if !io_uring::cqueue::more(flags) {
                        self.arm_recv(sock)?;
                    }
                }
                UD_WAKE => self.wake_armed = false,
                _ => {}
            }
        }
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
        if f.answered == f.slots.len() {
            st.inflight[m] = None;
        }
    }
}
