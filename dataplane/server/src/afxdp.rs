//! AF_XDP sockets and the polling worker loop of XDP mode.
//!
//! Layout (single-queue veth, and queue 0 of any NIC): one UMEM shared by
//! every worker's socket (XDP_SHARED_UMEM). Each worker has its own RX and
//! TX rings; the fill and completion rings belong to the device queue and
//! are shared, so they sit behind one mutex that a worker takes once per
//! batch (not per frame) to recycle completed frames into the fill ring.
//! The XDP program picks the socket by device-model id through `DP_XSKS`.
//! On a multi-queue NIC the same layout would be repeated per queue (or a
//! cpumap hop used); devplane binds queue 0 only and says so at start.
//!
//! UMEM frames are 2048 bytes. Frames `[0, FILL_FRAMES)` circulate through
//! the fill ring: a received request is answered in its own frame and sent
//! from it, and its completion returns it to the fill ring. Frames above
//! that are per-worker pools for interrupt packets, returned to their
//! worker's pool on completion.

use std::num::NonZeroU32;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplane_wire::frame::Flow;
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

use crate::ServerError;
use crate::dispatch::PendingIrq;
use crate::frames::{FrameOutcome, answer_in_place, interrupt_frame};
use crate::worker::backoff::wait_readable;
use crate::worker::stats::WorkerStats;
use crate::worker::{Transport, Work};

/// Size of one UMEM frame.
pub const FRAME_SIZE: u32 = 2048;
/// Frames circulating through the fill ring.
pub const FILL_FRAMES: u32 = 2048;
/// Frames each worker keeps for interrupt packets.
pub const IRQ_FRAMES_PER_WORKER: u32 = 64;
/// Frames each worker keeps for block answers ([`crate::bulk`]) beyond
/// those: a block answer never takes one of the interrupts' frames.
pub const BULK_FRAMES_PER_WORKER: u32 = 1024;
/// Frames of each worker's own pool (interrupts and block answers).
const POOL_FRAMES_PER_WORKER: u32 = IRQ_FRAMES_PER_WORKER + BULK_FRAMES_PER_WORKER;
const RING_SIZE: u32 = 2048;
/// Most frames one TX kick sends in copy mode (the kernel's
/// `TX_BATCH_SIZE` for `sendto` on an AF_XDP socket without zero copy).
const FRAMES_PER_KICK: u32 = 32;

/// The memory behind the UMEM, shared with the kernel.
struct Area {
    map: memmap2::MmapMut,
}

/// A worker's view of the UMEM memory.
#[derive(Clone, Copy)]
struct AreaPtr {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the pointer is into an mmap that outlives every worker (the
// owning `XskSet` joins workers before dropping it). Workers touch only
// frames they own: a frame is owned by the worker whose RX ring produced
// it (or whose pool it came from) until it is put on a TX or fill ring.
unsafe impl Send for AreaPtr {}

impl AreaPtr {
    /// The frame bytes at `addr..addr+len`.
    ///
    /// # Safety
    /// The caller must own the frame (see the `Send` impl) and hold no
    /// other reference into it.
    unsafe fn frame<'a>(self, addr: u64, len: usize) -> Option<&'a mut [u8]> {
        let start = usize::try_from(addr).ok()?;
        let end = start.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: in bounds of the mapping (checked above); exclusivity is
        // the caller's contract.
        Some(unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr().add(start), len) })
    }
}

/// The fill and completion rings of the device queue, shared by workers.
struct Shared {
    fq_cq: DeviceQueue,
    /// Interrupt frames completed, per worker, waiting to be taken back.
    irq_done: Vec<Vec<u64>>,
}

/// Frames put on any worker's TX ring and not yet taken back from the
/// completion ring (by whichever worker): while there are any, a worker
/// reaps the completion ring every turn, whether or not it sent
/// anything itself.
#[derive(Default)]
struct Outstanding(AtomicU64);

impl Outstanding {
    fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    fn sub(&self, n: u64) {
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }
    fn any(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }
}

/// One worker's socket.
pub struct XskSocket {
    user: User,
    /// Moved to the worker thread by [`XskSet::take_workers`].
    rings: Option<(RingRx, RingTx)>,
}

impl XskSocket {
    /// The socket's fd, for `DP_XSKS`.
    pub fn fd(&self) -> libc::c_int {
        self.user.as_raw_fd()
    }
}

/// The UMEM and every worker's socket on one interface queue.
pub struct XskSet {
    // Field order is drop order: sockets and rings before the UMEM and its
    // memory.
    sockets: Vec<XskSocket>,
    shared: Arc<Mutex<Shared>>,
    outstanding: Arc<Outstanding>,
    _umem: Umem,
    area: Area,
}

fn errno(what: &'static str, e: xdpilone::Errno) -> ServerError {
    ServerError::AfXdp {
        what,
        source: std::io::Error::from_raw_os_error(e.get_raw().abs()),
    }
}

/// Anonymous memory of `len` bytes for a UMEM, and a pointer to it.
fn umem_area(len: usize) -> Result<(memmap2::MmapMut, NonNull<[u8]>), ServerError> {
    let mut map = memmap2::MmapOptions::new()
        .len(len)
        .map_anon()
        .map_err(|source| ServerError::AfXdp {
            what: "mmap UMEM",
            source,
        })?;
    let ptr = NonNull::new(std::ptr::slice_from_raw_parts_mut(map.as_mut_ptr(), len)).ok_or(
        ServerError::AfXdp {
            what: "mmap UMEM",
            source: std::io::Error::other("null mapping"),
        },
    )?;
    Ok((map, ptr))
}

impl XskSet {
    /// Creates `workers` sockets on `ifname` queue 0 sharing one UMEM, and
    /// fills the fill ring.
    pub fn new(ifname: &str, workers: usize) -> Result<XskSet, ServerError> {
        let frames = FILL_FRAMES + POOL_FRAMES_PER_WORKER * workers as u32;
        let (map, area_ptr) = umem_area((frames * FRAME_SIZE) as usize)?;
        let config = UmemConfig {
            fill_size: RING_SIZE,
            complete_size: RING_SIZE,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page-aligned (mmap), `len` bytes long and lives
        // in `XskSet::area`, which is dropped after the UMEM.
        let umem = unsafe { Umem::new(config, area_ptr) }.map_err(|e| errno("register UMEM", e))?;
        let mut info = IfInfo::invalid();
        let cname = std::ffi::CString::new(ifname)
            .map_err(|_| ServerError::Config(format!("bad interface name {ifname:?}")))?;
        info.from_name(&cname)
            .map_err(|e| errno("interface lookup", e))?;
        info.set_queue(0);
        let rxtx = SocketConfig {
            rx_size: NonZeroU32::new(RING_SIZE),
            tx_size: NonZeroU32::new(RING_SIZE),
            bind_flags: 0,
        };
        let mut users = Vec::with_capacity(workers);
        let mut fq_cq = None;
        for i in 0..workers {
            let sock = if i == 0 {
                Socket::with_shared(&info, &umem).map_err(|e| errno("AF_XDP socket", e))?
            } else {
                Socket::new(&info).map_err(|e| errno("AF_XDP socket", e))?
            };
            if i == 0 {
                fq_cq = Some(
                    umem.fq_cq(&sock)
                        .map_err(|e| errno("fill/completion rings", e))?,
                );
            }
            users.push(
                umem.rx_tx(&sock, &rxtx)
                    .map_err(|e| errno("RX/TX rings", e))?,
            );
        }
        let mut fq_cq = fq_cq.ok_or_else(|| ServerError::Config("no workers".into()))?;
        for u in &users {
            umem.bind(u).map_err(|e| {
                errno(
                    "bind AF_XDP socket (is the XDP program attached? is the interface up?)",
                    e,
                )
            })?;
        }
        let mut sockets = Vec::with_capacity(workers);
        for user in users {
            let rx = user.map_rx().map_err(|e| errno("map RX ring", e))?;
            let tx = user.map_tx().map_err(|e| errno("map TX ring", e))?;
            sockets.push(XskSocket {
                user,
                rings: Some((rx, tx)),
            });
        }
        {
            let mut w = fq_cq.fill(FILL_FRAMES);
            w.insert((0..FILL_FRAMES as u64).map(|i| i * FRAME_SIZE as u64));
            w.commit();
        }
        Ok(XskSet {
            sockets,
            shared: Arc::new(Mutex::new(Shared {
                fq_cq,
                irq_done: vec![Vec::new(); workers],
            })),
            outstanding: Arc::default(),
            _umem: umem,
            area: Area { map },
        })
    }

    /// The sockets' fds, worker by worker, for `DP_XSKS`.
    pub fn fds(&self) -> Vec<libc::c_int> {
        self.sockets.iter().map(XskSocket::fd).collect()
    }

    /// Takes the rings of every worker, to move into the worker threads.
    /// The set itself must outlive the workers.
    pub fn take_workers(&mut self) -> Vec<XskWorkerRings> {
        let area = AreaPtr {
            base: NonNull::new(self.area.map.as_mut_ptr()).unwrap_or(NonNull::dangling()),
            len: self.area.map.len(),
        };
        let mut out = Vec::new();
        for (i, s) in self.sockets.iter_mut().enumerate() {
            // The rings move to the worker; the socket (fd) stays here.
            let Some((rx, tx)) = s.rings.take() else {
                continue;
            };
            let irq_base = FILL_FRAMES + POOL_FRAMES_PER_WORKER * i as u32;
            out.push(XskWorkerRings {
                index: i,
                rx,
                tx,
                fd: s.fd(),
                shared: self.shared.clone(),
                outstanding: self.outstanding.clone(),
                area,
                irq_free: (irq_base..irq_base + POOL_FRAMES_PER_WORKER)
                    .map(|f| f as u64 * FRAME_SIZE as u64)
                    .collect(),
            });
        }
        out
    }
}

/// What a worker thread takes with it.
pub struct XskWorkerRings {
    index: usize,
    rx: RingRx,
    tx: RingTx,
    fd: libc::c_int,
    shared: Arc<Mutex<Shared>>,
    outstanding: Arc<Outstanding>,
    area: AreaPtr,
    irq_free: Vec<u64>,
}

fn is_irq_frame(addr: u64) -> bool {
    addr >= FILL_FRAMES as u64 * FRAME_SIZE as u64
}

fn irq_owner(addr: u64) -> usize {
    ((addr / FRAME_SIZE as u64 - FILL_FRAMES as u64) / POOL_FRAMES_PER_WORKER as u64) as usize
}

/// A worker's AF_XDP transport: its rings and the scratch it reuses turn
/// after turn (no allocation on the packet path).
pub struct XskTransport {
    rings: XskWorkerRings,
    /// Answers of this turn, to transmit.
    replies: Vec<XdpDesc>,
    /// Frames to give back to the fill ring.
    recycle: Vec<u64>,
    /// Interrupt frames of this turn, to transmit.
    irq_descs: Vec<XdpDesc>,
    /// Frames to transmit that the TX ring had no room for yet.
    pending: Vec<XdpDesc>,
    /// Scratch: addresses taken from the completion ring.
    done: Vec<u64>,
    /// Frames on our TX ring not completed yet (approximately).
    in_flight: u32,
    /// When the first frame of this turn's batch was read.
    batch_start: Option<Instant>,
}

impl XskTransport {
    /// The transport of one worker over its rings.
    pub fn new(rings: XskWorkerRings, batch: u32) -> XskTransport {
        XskTransport {
            rings,
            replies: Vec::with_capacity(batch as usize),
            recycle: Vec::with_capacity(batch as usize),
            irq_descs: Vec::new(),
            pending: Vec::with_capacity(RING_SIZE as usize),
            done: Vec::with_capacity(RING_SIZE as usize),
            in_flight: 0,
            batch_start: None,
        }
    }

    /// Puts `pending` on the TX ring. A reservation stops at the ring's
    /// wrap point, so a batch that straddles it takes a second
    /// reservation; what the ring truly has no room for waits for the next
    /// turn (never dropped: an interrupt is sent once). Returns how many
    /// went.
    fn push_tx(&mut self) -> usize {
        let mut sent = 0usize;
        for _ in 0..2 {
            let left = &self.pending[sent..];
            if left.is_empty() {
                break;
            }
            let mut w = self.rings.tx.transmit(left.len() as u32);
            let n = w.insert(left.iter().copied()) as usize;
            w.commit();
            drop(w);
            sent += n;
            if n == 0 {
                break;
            }
        }
        sent
    }
}

/// The frames a worker gets back from the kernel, and where they go.
struct Returns<'a> {
    /// This worker's index.
    me: usize,
    /// Scratch: addresses taken from the completion ring.
    done: &'a mut Vec<u64>,
    /// Request frames for the fill ring.
    recycle: &'a mut Vec<u64>,
    /// This worker's interrupt frame pool.
    irq_free: &'a mut Vec<u64>,
}

impl Returns<'_> {
    /// Sorts completed frames: interrupt frames back to their worker's
    /// pool, request frames to the fill ring (with the recycled ones).
    /// Returns how many it took from the completion ring.
    fn complete(self, sh: &mut Shared) -> u64 {
        self.done.clear();
        {
            let mut c = sh.fq_cq.complete(RING_SIZE);
            for addr in c.by_ref() {
                self.done.push(addr);
            }
            c.release();
        }
        for &addr in self.done.iter() {
            if !is_irq_frame(addr) {
                self.recycle.push(addr & !(FRAME_SIZE as u64 - 1));
            } else if irq_owner(addr) == self.me {
                self.irq_free.push(addr);
            } else if let Some(v) = sh.irq_done.get_mut(irq_owner(addr)) {
                v.push(addr);
            }
        }
        if let Some(mine) = sh.irq_done.get_mut(self.me) {
            self.irq_free.append(mine);
        }
        if !self.recycle.is_empty() {
            let mut f = sh.fq_cq.fill(self.recycle.len() as u32);
            let n = f.insert(self.recycle.iter().map(|a| a & !(FRAME_SIZE as u64 - 1))) as usize;
            f.commit();
            self.recycle.drain(..n);
        }
        self.done.len() as u64
    }
}

/// Kicks the TX ring until the kernel has taken everything on it: copy
/// mode sends at most [`FRAMES_PER_KICK`] frames per kick, and a frame
/// left on the ring would wait for the next turn that queues an answer,
/// which never comes once the fill ring is empty. Stops early when a
/// kick takes nothing (the device is busy; the next turn tries again).
fn kick(tx: &RingTx) {
    let mut left = tx.pending();
    for _ in 0..=left / FRAMES_PER_KICK + 1 {
        if left == 0 {
            return;
        }
        tx.wake();
        let now = tx.pending();
        if now >= left {
            return;
        }
        left = now;
    }
}

/// Answers one received frame: its answer goes to `replies`, anything
/// else back to `recycle`.
fn answer_frame(
    area: AreaPtr,
    desc: XdpDesc,
    work: &mut Work<'_, Flow>,
    replies: &mut Vec<XdpDesc>,
    recycle: &mut Vec<u64>,
) {
    // SAFETY: the kernel handed this frame to our RX ring; we own it until
    // we put it on the TX or fill ring.
    let frame = unsafe { area.frame(desc.addr, desc.len as usize) };
    match frame.map(|f| answer_in_place(f, work.disp, work.peers)) {
        Some(FrameOutcome::Reply) => replies.push(desc),
        Some(FrameOutcome::BadFrame) | None => {
            WorkerStats::add(&work.stats.bad_frames, 1);
            recycle.push(desc.addr);
        }
        Some(FrameOutcome::BadChecksum) => {
            WorkerStats::add(&work.stats.bad_checksum, 1);
            recycle.push(desc.addr);
        }
        Some(FrameOutcome::Recycle) => recycle.push(desc.addr),
        Some(FrameOutcome::Ack { model, seq }) => {
            work.router.ack(model, seq);
            recycle.push(desc.addr);
        }
        Some(FrameOutcome::Bulk { client, vm, back }) => {
            work.bulk_peers.learn(client, vm, back);
            recycle.push(desc.addr);
        }
    }
}

impl Transport for XskTransport {
    type Peer = Flow;

    fn receive(&mut self, max: u32, work: &mut Work<'_, Flow>) -> u64 {
        let mut got = 0u64;
        let area = self.rings.area;
        let mut rx = self.rings.rx.receive(max);
        while let Some(desc) = rx.read() {
            if got == 0 {
                self.batch_start = Some(Instant::now());
            }
            got += 1;
            answer_frame(area, desc, work, &mut self.replies, &mut self.recycle);
        }
        rx.release();
        got
    }

    fn queue_irq(
        &mut self,
        server: u32,
        client: u32,
        flow: Flow,
        irqs: &[PendingIrq],
        key: Option<&devplane_wire::tag::TagKey>,
        _stats: &WorkerStats,
    ) -> bool {
        let Some(addr) = self.rings.irq_free.pop() else {
            return false;
        };
        // SAFETY: the frame comes from this worker's private pool.
        let Some(buf) = (unsafe { self.rings.area.frame(addr, FRAME_SIZE as usize) }) else {
            return false;
        };
        match interrupt_frame(buf, &flow, (server, client, irqs[0].model), irqs, key) {
            Some(len) => {
                self.irq_descs.push(XdpDesc {
                    addr,
                    len: len as u32,
                    options: 0,
                });
                true
            }
            None => {
                self.rings.irq_free.push(addr);
                false
            }
        }
    }

    fn queue_datagram(&mut self, to: Flow, bytes: &[u8], _stats: &WorkerStats) -> bool {
        // Block answers leave the interrupts' share of the pool alone.
        if self.rings.irq_free.len() <= IRQ_FRAMES_PER_WORKER as usize {
            return false;
        }
        let Some(addr) = self.rings.irq_free.pop() else {
            return false;
        };
        // SAFETY: the frame comes from this worker's private pool.
        let Some(buf) = (unsafe { self.rings.area.frame(addr, FRAME_SIZE as usize) }) else {
            return false;
        };
        let len = buf
            .get_mut(devplane_wire::frame::PAYLOAD_OFFSET..)
            .and_then(|body| {
                body.get_mut(..bytes.len())?.copy_from_slice(bytes);
                Some(bytes.len())
            })
            .and_then(|n| devplane_wire::frame::write_headers(buf, &to, n));
        match len {
            Some(len) => {
                self.irq_descs.push(XdpDesc {
                    addr,
                    len: len as u32,
                    options: 0,
                });
                true
            }
            None => {
                self.rings.irq_free.push(addr);
                false
            }
        }
    }

    /// Transmits replies and interrupts in one batch: onto the TX ring,
    /// then kicked until the kernel has taken the ring's frames (also
    /// those an earlier turn left there).
    fn transmit(&mut self, stats: &WorkerStats) {
        let answered = self.replies.len() as u64;
        self.pending.append(&mut self.replies);
        self.pending.append(&mut self.irq_descs);
        if !self.pending.is_empty() {
            let sent = self.push_tx();
            self.in_flight += sent as u32;
            self.rings.outstanding.add(sent as u64);
            WorkerStats::add(&stats.tx, sent as u64);
            if sent < self.pending.len() {
                WorkerStats::add(&stats.tx_full, (self.pending.len() - sent) as u64);
            }
            self.pending.drain(..sent);
        }
        // Copy mode (veth) always needs a kick to transmit.
        kick(&self.rings.tx);
        // Every answer of this batch waited as long as the batch took.
        if let Some(t0) = self.batch_start.take() {
            stats
                .service
                .record(t0.elapsed().as_nanos() as u64, answered);
        }
    }

    /// Completions back to the fill ring (shared: one lock per batch).
    /// Runs while any worker's frames are out (sent, not yet taken back
    /// from the completion ring), not only while this worker's TX ring
    /// holds unsent ones: in copy mode a frame completes when its skb is
    /// freed, after the kick that sent it.
    fn reclaim(&mut self) {
        if self.recycle.is_empty() && !self.rings.outstanding.any() {
            return;
        }
        if let Ok(mut sh) = self.rings.shared.lock() {
            let taken = Returns {
                me: self.rings.index,
                done: &mut self.done,
                recycle: &mut self.recycle,
                irq_free: &mut self.rings.irq_free,
            }
            .complete(&mut sh);
            self.rings.outstanding.sub(taken);
        }
        // Frames of other workers' TX may complete here; count ours out
        // approximately by the ring's own pending count.
        self.in_flight = self.rings.tx.pending();
    }

    fn may_sleep(&self, held: usize) -> bool {
        held == 0 && self.in_flight == 0
    }

    fn wait(&self, timeout: Duration) {
        wait_readable(self.rings.fd, timeout);
    }
}
