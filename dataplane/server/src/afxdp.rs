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
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devplane_wire::frame::Flow;
use xdpilone::xdp::XdpDesc;
use xdpilone::{DeviceQueue, IfInfo, RingRx, RingTx, Socket, SocketConfig, Umem, UmemConfig, User};

use super::ServerError;
use super::backoff::{Backoff, wait_readable};
use super::dispatch::Dispatcher;
use super::frames::{FrameOutcome, answer_in_place, interrupt_frame};
use super::irq::{IrqRouter, Peers};
use super::lifecycle::WorkerCtl;
use super::stats::WorkerStats;

/// Size of one UMEM frame.
pub const FRAME_SIZE: u32 = 2048;
/// Frames circulating through the fill ring.
pub const FILL_FRAMES: u32 = 2048;
/// Frames each worker keeps for interrupt packets.
pub const IRQ_FRAMES_PER_WORKER: u32 = 64;
const RING_SIZE: u32 = 2048;

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
    _umem: Umem,
    area: Area,
}

fn errno(what: &'static str, e: xdpilone::Errno) -> ServerError {
    ServerError::AfXdp {
        what,
        source: std::io::Error::from_raw_os_error(e.get_raw().abs()),
    }
}

impl XskSet {
    /// Creates `workers` sockets on `ifname` queue 0 sharing one UMEM, and
    /// fills the fill ring.
    pub fn new(ifname: &str, workers: usize) -> Result<XskSet, ServerError> {
        let frames = FILL_FRAMES + IRQ_FRAMES_PER_WORKER * workers as u32;
        let len = (frames * FRAME_SIZE) as usize;
        let mut map = memmap2::MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(|source| ServerError::AfXdp {
                what: "mmap UMEM",
                source,
            })?;
        let area_ptr = NonNull::new(std::ptr::slice_from_raw_parts_mut(map.as_mut_ptr(), len))
            .ok_or(ServerError::AfXdp {
                what: "mmap UMEM",
                source: std::io::Error::other("null mapping"),
            })?;
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
            let irq_base = FILL_FRAMES + IRQ_FRAMES_PER_WORKER * i as u32;
            out.push(XskWorkerRings {
                index: i,
                rx,
                tx,
                fd: s.fd(),
                shared: self.shared.clone(),
                area,
                irq_free: (irq_base..irq_base + IRQ_FRAMES_PER_WORKER)
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
    area: AreaPtr,
    irq_free: Vec<u64>,
}

/// Settings of a worker loop.
#[derive(Debug, Clone, Copy)]
pub struct LoopConfig {
    /// This server's id.
    pub server: u32,
    /// Frames per poll at most.
    pub batch: u32,
    /// Empty polls before sleeping.
    pub spin_budget: u32,
    /// Longest sleep when idle.
    pub idle_sleep: Duration,
}

fn is_irq_frame(addr: u64) -> bool {
    addr >= FILL_FRAMES as u64 * FRAME_SIZE as u64
}

fn irq_owner(addr: u64) -> usize {
    ((addr / FRAME_SIZE as u64 - FILL_FRAMES as u64) / IRQ_FRAMES_PER_WORKER as u64) as usize
}

/// The AF_XDP worker loop: runs until `stop` is set.
pub fn run_worker(
    mut rings: XskWorkerRings,
    mut disp: Dispatcher,
    mut router: IrqRouter,
    mut cfg: LoopConfig,
    stats: Arc<WorkerStats>,
    ctl: WorkerCtl,
) {
    let mut backoff = Backoff::new(cfg.spin_budget, cfg.idle_sleep);
    let mut peers: Peers<Flow> = Peers::default();
    let mut replies: Vec<XdpDesc> = Vec::with_capacity(cfg.batch as usize);
    let mut recycle: Vec<u64> = Vec::with_capacity(cfg.batch as usize);
    let mut in_flight: u32 = 0;
    // Per-batch scratch, reused: no allocation on the packet path.
    let mut irq_descs: Vec<XdpDesc> = Vec::new();
    // Frames to transmit that the TX ring had no room for yet.
    let mut pending: Vec<XdpDesc> = Vec::with_capacity(RING_SIZE as usize);
    let mut done: Vec<u64> = Vec::with_capacity(RING_SIZE as usize);
    let mut last_held = 0u64;
    while ctl.poll(&mut disp, &mut router, &mut cfg, &mut backoff) {
        let mut got = 0u64;
        let mut batch_start = None;
        {
            let mut rx = rings.rx.receive(cfg.batch);
            while let Some(desc) = rx.read() {
                if got == 0 {
                    batch_start = Some(std::time::Instant::now());
                }
                got += 1;
                // SAFETY: the kernel handed this frame to our RX ring; we own
                // it until we put it on the TX or fill ring.
                let frame = unsafe { rings.area.frame(desc.addr, desc.len as usize) };
                match frame.map(|f| answer_in_place(f, &mut disp, &mut peers)) {
                    Some(FrameOutcome::Reply) => replies.push(desc),
                    Some(FrameOutcome::BadFrame) | None => {
                        WorkerStats::add(&stats.bad_frames, 1);
                        recycle.push(desc.addr);
                    }
                    Some(FrameOutcome::Recycle) => recycle.push(desc.addr),
                    Some(FrameOutcome::Ack { model, seq }) => {
                        router.ack(model, seq);
                        recycle.push(desc.addr);
                    }
                }
            }
            rx.release();
        }
        // Interrupts raised by this batch (or earlier, held).
        router.push(disp.drain_irqs());
        irq_descs.clear();
        if router.held() > 0 {
            let server = cfg.server;
            let area = rings.area;
            let free = &mut rings.irq_free;
            let sent = router.flush(&peers, |client, flow, irqs| {
                let Some(addr) = free.pop() else { return false };
                // SAFETY: the frame comes from this worker's private pool.
                let Some(buf) = (unsafe { area.frame(addr, FRAME_SIZE as usize) }) else {
                    return false;
                };
                match interrupt_frame(buf, &flow, server, client, irqs[0].model, irqs) {
                    Some(len) => {
                        irq_descs.push(XdpDesc {
                            addr,
                            len: len as u32,
                            options: 0,
                        });
                        true
                    }
                    None => {
                        free.push(addr);
                        false
                    }
                }
            });
            WorkerStats::add(&stats.irqs_sent, sent as u64);
        }
        // Published when they change (an acknowledgement may have emptied
        // the router since the last flush).
        let held = router.held() as u64;
        if held != last_held {
            last_held = held;
            stats.irqs_held.store(held, Ordering::Relaxed);
            stats.irqs_resent.store(router.resent(), Ordering::Relaxed);
            stats
                .irqs_dropped
                .store(router.dropped(), Ordering::Relaxed);
        }
        // Transmit replies and interrupts in one batch, one wake-up. A
        // reservation stops at the ring's wrap point, so a batch that
        // straddles it takes a second reservation; what the ring truly has
        // no room for waits for the next round (never dropped: an
        // interrupt is sent once).
        let answered = replies.len() as u64;
        pending.append(&mut replies);
        pending.append(&mut irq_descs);
        if !pending.is_empty() {
            let mut sent = 0usize;
            for _ in 0..2 {
                let left = &pending[sent..];
                if left.is_empty() {
                    break;
                }
                let mut w = rings.tx.transmit(left.len() as u32);
                let n = w.insert(left.iter().copied()) as usize;
                w.commit();
                drop(w);
                sent += n;
                if n == 0 {
                    break;
                }
            }
            in_flight += sent as u32;
            WorkerStats::add(&stats.tx, sent as u64);
            if sent < pending.len() {
                WorkerStats::add(&stats.tx_full, (pending.len() - sent) as u64);
            }
            pending.drain(..sent);
            // Copy mode (veth) always needs a kick to transmit.
            rings.tx.wake();
        }
        // Every answer of this batch waited as long as the batch took.
        if let Some(t0) = batch_start.take() {
            stats
                .service
                .record(t0.elapsed().as_nanos() as u64, answered);
        }
        // Completions back to the fill ring (shared: one lock per batch).
        if in_flight > 0 || !recycle.is_empty() {
            if let Ok(mut sh) = rings.shared.lock() {
                done.clear();
                {
                    let mut c = sh.fq_cq.complete(RING_SIZE);
                    for addr in c.by_ref() {
                        done.push(addr);
                    }
                    c.release();
                }
                for &addr in &done {
                    if is_irq_frame(addr) {
                        let owner = irq_owner(addr);
                        if owner == rings.index {
                            rings.irq_free.push(addr);
                        } else if let Some(v) = sh.irq_done.get_mut(owner) {
                            v.push(addr);
                        }
                    } else {
                        recycle.push(addr & !(FRAME_SIZE as u64 - 1));
                    }
                }
                rings.irq_free.append(&mut sh.irq_done[rings.index]);
                if !recycle.is_empty() {
                    let mut f = sh.fq_cq.fill(recycle.len() as u32);
                    let n = f.insert(recycle.iter().map(|a| a & !(FRAME_SIZE as u64 - 1))) as usize;
                    f.commit();
                    recycle.drain(..n);
                }
            }
            // Frames of other workers' TX may complete here; count ours out
            // approximately by the ring's own pending count.
            in_flight = rings.tx.pending();
        }
        WorkerStats::add(&stats.rx, got);
        if got > 0 {
            stats.publish(&disp.stats());
            backoff.busy();
        } else if let Some(t) = backoff.idle() {
            if router.held() == 0 && in_flight == 0 {
                WorkerStats::add(&stats.sleeps, 1);
                wait_readable(rings.fd, t);
            }
        }
    }
    stats.publish(&disp.stats());
}
