//! AF_XDP sockets and the polling worker loop of XDP mode.
//!
//! Layout: every device RX queue of the interface is served (a real NIC
//! spreads flows over its queues with RSS, and an AF_XDP socket receives
//! only frames of the queue it is bound to). Each worker has one socket
//! per queue, all sharing one UMEM (XDP_SHARED_UMEM); the XDP program
//! redirects a request to `DP_XSKS[xsk_index(rx queue, owning worker)]`.
//! Each socket has its own RX and TX rings; the fill and completion rings
//! belong to the device queue and are shared by the workers' sockets on
//! that queue, so they sit behind one mutex per queue that a worker takes
//! once per batch (not per frame) to recycle completed frames into the
//! fill ring. The sockets bind in zero-copy mode where the driver supports
//! it and in copy mode otherwise ([`XskMode`], reported at start).
//!
//! UMEM frames are 4096 bytes (a frame of a `bulk::JUMBO_MTU` link fits). Each queue has its own range of frames
//! circulating through its fill ring ([`Layout`]): a received request is
//! answered in its own frame and sent from the socket it came in on, and
//! its completion (on that queue's completion ring) returns it to that
//! queue's fill ring. Frames above those are per-worker pools for
//! interrupt packets, sent on queue 0 and returned to their worker's pool
//! on completion.

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
use crate::worker::stats::WorkerStats;
use crate::worker::{Transport, Work};
use devplane_control::poll::{pollfd, wait_readable};

/// Size of one UMEM frame.
pub const FRAME_SIZE: u32 = 4096;
/// Frames circulating through each queue's fill ring, up to
/// [`FULL_QUEUES`] queues (see [`Layout::new`]).
pub const FILL_FRAMES: u32 = 2048;
/// Queues that each get [`FILL_FRAMES`]; beyond that the frames per
/// queue shrink so that the UMEM stays near `FULL_QUEUES` queues' worth.
pub const FULL_QUEUES: u32 = 4;
/// Fewest fill frames a queue gets.
pub const MIN_FILL_FRAMES: u32 = 256;
/// Frames each worker keeps for interrupt packets.
pub const IRQ_FRAMES_PER_WORKER: u32 = 64;
/// Frames each worker keeps for block answers ([`crate::bulk`]) beyond
/// those: a block answer never takes one of the interrupts' frames.
pub const BULK_FRAMES_PER_WORKER: u32 = 1024;
/// Frames of each worker's own pool (interrupts and block answers).
pub const POOL_FRAMES_PER_WORKER: u32 = IRQ_FRAMES_PER_WORKER + BULK_FRAMES_PER_WORKER;
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

/// The fill and completion rings of one device queue, shared by the
/// workers' sockets on that queue.
struct Shared {
    fq_cq: DeviceQueue,
    /// Interrupt frames completed, per worker, waiting to be taken back.
    irq_done: Vec<Vec<u64>>,
}

/// Where frames live in the UMEM: `per_queue` fill frames for each of
/// `queues` queues, then a pool of [`POOL_FRAMES_PER_WORKER`] per worker
/// (interrupts and block answers). Pure
/// arithmetic, shared by the set and its workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Device queues served.
    pub queues: u32,
    /// Fill frames of each queue.
    pub per_queue: u32,
    /// Workers (each with an interrupt pool).
    pub workers: u32,
}

impl Layout {
    /// The layout for `queues` queues and `workers` workers: [`FILL_FRAMES`]
    /// per queue up to [`FULL_QUEUES`] queues, then fewer per queue (at
    /// least [`MIN_FILL_FRAMES`]).
    pub fn new(queues: u32, workers: u32) -> Layout {
        let queues = queues.max(1);
        let per_queue = if queues <= FULL_QUEUES {
            FILL_FRAMES
        } else {
            (FILL_FRAMES * FULL_QUEUES / queues).max(MIN_FILL_FRAMES)
        };
        Layout {
            queues,
            per_queue,
            workers,
        }
    }

    /// Frames in the UMEM.
    pub fn frames(&self) -> u64 {
        self.fill_frames() + u64::from(POOL_FRAMES_PER_WORKER) * u64::from(self.workers)
    }

    fn fill_frames(&self) -> u64 {
        u64::from(self.queues) * u64::from(self.per_queue)
    }

    /// The addresses of queue `q`'s fill frames.
    pub fn queue_frames(&self, q: u32) -> impl Iterator<Item = u64> + use<> {
        let first = u64::from(q) * u64::from(self.per_queue);
        (first..first + u64::from(self.per_queue)).map(|f| f * u64::from(FRAME_SIZE))
    }

    /// The addresses of worker `w`'s interrupt frames.
    pub fn irq_frames(&self, w: usize) -> impl Iterator<Item = u64> + use<> {
        let first = self.fill_frames() + u64::from(POOL_FRAMES_PER_WORKER) * w as u64;
        (first..first + u64::from(POOL_FRAMES_PER_WORKER)).map(|f| f * u64::from(FRAME_SIZE))
    }

    /// Whether `addr` is in an interrupt frame.
    pub fn is_irq_frame(&self, addr: u64) -> bool {
        addr / u64::from(FRAME_SIZE) >= self.fill_frames()
    }

    /// The worker whose pool interrupt frame `addr` belongs to.
    pub fn irq_owner(&self, addr: u64) -> usize {
        ((addr / u64::from(FRAME_SIZE)).saturating_sub(self.fill_frames())
            / u64::from(POOL_FRAMES_PER_WORKER)) as usize
    }
}

/// How the sockets move frames between the device and the UMEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XskMode {
    /// The driver DMAs straight into the UMEM (`XDP_ZEROCOPY`).
    ZeroCopy,
    /// The kernel copies each frame (`XDP_COPY`): drivers without AF_XDP
    /// zero-copy support, veth among them.
    Copy,
}

/// `ETHTOOL_GCHANNELS` from `linux/ethtool.h`.
const ETHTOOL_GCHANNELS: u32 = 0x3c;

/// `struct ethtool_channels` from `linux/ethtool.h`.
#[repr(C)]
#[derive(Default)]
struct EthtoolChannels {
    cmd: u32,
    max_rx: u32,
    max_tx: u32,
    max_other: u32,
    max_combined: u32,
    rx_count: u32,
    tx_count: u32,
    other_count: u32,
    combined_count: u32,
}

/// The device queues of an interface that AF_XDP can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queues {
    /// RX queues the device delivers to.
    pub rx: u32,
    /// TX queues.
    pub tx: u32,
}

impl Queues {
    /// Queues served: those with both an RX and a TX queue (a socket
    /// answers on the queue it receives on), at most
    /// [`devplane_wire::maps::MAX_QUEUES`], at least 1.
    pub fn served(&self) -> u32 {
        self.rx
            .min(self.tx)
            .clamp(1, devplane_wire::maps::MAX_QUEUES)
    }
}

/// The RX and TX queue counts of `ifname` in the calling thread's network
/// namespace (`ETHTOOL_GCHANNELS`: combined channels count as both). A
/// driver that does not report channels has one queue of each.
pub fn device_queues(ifname: &str) -> Result<Queues, ServerError> {
    let io = |source| ServerError::AfXdp {
        what: "reading the interface's queues (ETHTOOL_GCHANNELS)",
        source,
    };
    // SAFETY: a plain socket(2) call; the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mut ch = EthtoolChannels {
        cmd: ETHTOOL_GCHANNELS,
        ..EthtoolChannels::default()
    };
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if ifname.len() >= ifr.ifr_name.len() || ifname.as_bytes().contains(&0) {
        return Err(ServerError::Config(format!(
            "bad interface name {ifname:?}"
        )));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut ch).cast();
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name (shorter than the
    // zeroed array) and follows ifru_data to an `ethtool_channels`, which
    // ETHTOOL_GCHANNELS fills; `ch` and `ifr` live across the call.
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCETHTOOL as _,
            &mut ifr,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) => Ok(Queues { rx: 1, tx: 1 }),
            _ => Err(io(e)),
        };
    }
    Ok(Queues {
        rx: (ch.combined_count + ch.rx_count).max(1),
        tx: (ch.combined_count + ch.tx_count).max(1),
    })
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

/// One worker's socket on one queue.
pub struct XskSocket {
    user: User,
    queue: u32,
    worker: usize,
    /// Moved to the worker thread by [`XskSet::take_workers`].
    rings: Option<(RingRx, RingTx)>,
}

impl XskSocket {
    /// The socket's fd, for `DP_XSKS`.
    pub fn fd(&self) -> libc::c_int {
        self.user.as_raw_fd()
    }
}

/// One queue's shared state.
struct QueueState {
    shared: Arc<Mutex<Shared>>,
    outstanding: Arc<Outstanding>,
}

/// The UMEM and every worker's socket on every queue of one interface.
pub struct XskSet {
    // Field order is drop order: sockets and rings before the UMEM and its
    // memory.
    sockets: Vec<XskSocket>,
    queues: Vec<QueueState>,
    /// Requests each worker received on each queue.
    served: Vec<Arc<[AtomicU64]>>,
    layout: Layout,
    mode: XskMode,
    /// Why zero-copy was not used, when it was refused.
    zero_copy_refused: Option<String>,
    device: Queues,
    _umem: Umem,
    area: Area,
}

/// How long a bind refused with `EBUSY` is retried. The kernel releases a
/// closed AF_XDP socket's buffer pool from a work queue, after the close
/// returns: a server started on the queue of one that just stopped (the
/// `scale` scenario's steps, a restart) can find the queue still taken for
/// a few milliseconds. Start-up only; a queue held longer (another live
/// program) still fails, after this wait.
const BIND_BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Calls `bind` until it succeeds, fails with anything but `EBUSY`, or
/// `wait` has passed (then its last error), sleeping 10 ms between calls.
fn busy_retry(
    wait: std::time::Duration,
    mut bind: impl FnMut() -> Result<(), xdpilone::Errno>,
) -> Result<(), xdpilone::Errno> {
    let until = std::time::Instant::now() + wait;
    loop {
        match bind() {
            Err(e) if e.get_raw().abs() == libc::EBUSY && std::time::Instant::now() < until => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
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
    /// Creates `workers` sockets on every queue of `ifname` sharing one
    /// UMEM, zero-copy where the driver takes it and copy mode otherwise,
    /// and fills each queue's fill ring.
    pub fn new(ifname: &str, workers: usize) -> Result<XskSet, ServerError> {
        let device = device_queues(ifname)?;
        match Self::build(ifname, workers, device, XskMode::ZeroCopy) {
            Ok(set) => Ok(set),
            Err(zc) => {
                let mut set = Self::build(ifname, workers, device, XskMode::Copy)?;
                set.zero_copy_refused = Some(zc.to_string());
                Ok(set)
            }
        }
    }

    fn build(
        ifname: &str,
        workers: usize,
        device: Queues,
        mode: XskMode,
    ) -> Result<XskSet, ServerError> {
        let layout = Layout::new(device.served(), workers as u32);
        let (map, area_ptr) = umem_area((layout.frames() * u64::from(FRAME_SIZE)) as usize)?;
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
        // The UMEM's own socket (queue 0, worker 0) picks the mode; every
        // other socket shares its UMEM and inherits it (the kernel refuses
        // mode flags on a shared bind).
        let first = SocketConfig {
            rx_size: NonZeroU32::new(RING_SIZE),
            tx_size: NonZeroU32::new(RING_SIZE),
            bind_flags: match mode {
                XskMode::ZeroCopy => SocketConfig::XDP_BIND_ZEROCOPY,
                XskMode::Copy => SocketConfig::XDP_BIND_COPY,
            },
        };
        let shared = SocketConfig {
            bind_flags: 0,
            ..first.clone()
        };
        let mut sockets = Vec::with_capacity(workers * layout.queues as usize);
        let mut queues = Vec::with_capacity(layout.queues as usize);
        for q in 0..layout.queues {
            info.set_queue(q);
            let mut fq_cq: Option<DeviceQueue> = None;
            for w in 0..workers {
                let sock = if q == 0 && w == 0 {
                    Socket::with_shared(&info, &umem).map_err(|e| errno("AF_XDP socket", e))?
                } else {
                    Socket::new(&info).map_err(|e| errno("AF_XDP socket", e))?
                };
                // The queue's first socket owns its fill and completion
                // rings and binds to the UMEM; the others bind to it.
                if w == 0 {
                    fq_cq = Some(
                        umem.fq_cq(&sock)
                            .map_err(|e| errno("fill/completion rings", e))?,
                    );
                }
                let cfg = if q == 0 && w == 0 { &first } else { &shared };
                let user = umem
                    .rx_tx(&sock, cfg)
                    .map_err(|e| errno("RX/TX rings", e))?;
                let bound = match (&fq_cq, w) {
                    (_, 0) => busy_retry(BIND_BUSY_WAIT, || umem.bind(&user)),
                    (Some(dq), _) => busy_retry(BIND_BUSY_WAIT, || dq.bind(&user)),
                    (None, _) => return Err(ServerError::Config("no queue leader".into())),
                };
                bound.map_err(|e| {
                    errno(
                        match mode {
                            XskMode::ZeroCopy => "bind AF_XDP socket in zero-copy mode",
                            XskMode::Copy => {
                                "bind AF_XDP socket (is the interface up? is another program using its queues?)"
                            }
                        },
                        e,
                    )
                })?;
                let rx = user.map_rx().map_err(|e| errno("map RX ring", e))?;
                let tx = user.map_tx().map_err(|e| errno("map TX ring", e))?;
                sockets.push(XskSocket {
                    user,
                    queue: q,
                    worker: w,
                    rings: Some((rx, tx)),
                });
            }
            let mut fq_cq = fq_cq.ok_or_else(|| ServerError::Config("no workers".into()))?;
            {
                let mut w = fq_cq.fill(layout.per_queue);
                w.insert(layout.queue_frames(q));
                w.commit();
            }
            queues.push(QueueState {
                shared: Arc::new(Mutex::new(Shared {
                    fq_cq,
                    irq_done: vec![Vec::new(); workers],
                })),
                outstanding: Arc::default(),
            });
        }
        Ok(XskSet {
            sockets,
            queues,
            served: (0..workers)
                .map(|_| {
                    (0..layout.queues)
                        .map(|_| AtomicU64::new(0))
                        .collect::<Arc<[AtomicU64]>>()
                })
                .collect(),
            layout,
            mode,
            zero_copy_refused: None,
            device,
            _umem: umem,
            area: Area { map },
        })
    }

    /// Every socket's `DP_XSKS` slot and fd.
    pub fn slots(&self) -> Vec<(u32, libc::c_int)> {
        self.sockets
            .iter()
            .filter_map(|s| {
                devplane_wire::maps::xsk_index(s.queue, s.worker as u32).map(|i| (i, s.fd()))
            })
            .collect()
    }

    /// Worker `worker`'s sockets' fds, queue by queue.
    pub fn worker_fds(&self, worker: usize) -> Vec<libc::c_int> {
        self.sockets
            .iter()
            .filter(|s| s.worker == worker)
            .map(XskSocket::fd)
            .collect()
    }

    /// Requests each worker received on each queue, worker by worker.
    pub fn served(&self) -> Vec<Vec<u64>> {
        self.served
            .iter()
            .map(|w| w.iter().map(|c| c.load(Ordering::Relaxed)).collect())
            .collect()
    }

    /// Device queues served.
    pub fn queues(&self) -> u32 {
        self.layout.queues
    }

    /// The interface's queue counts.
    pub fn device(&self) -> Queues {
        self.device
    }

    /// Zero-copy or copy mode.
    pub fn mode(&self) -> XskMode {
        self.mode
    }

    /// Why zero-copy was refused (the copy mode's reason), if it was.
    pub fn zero_copy_refused(&self) -> Option<&str> {
        self.zero_copy_refused.as_deref()
    }

    /// Takes the rings of every worker, to move into the worker threads.
    /// The set itself must outlive the workers.
    pub fn take_workers(&mut self) -> Vec<XskWorkerRings> {
        let area = AreaPtr {
            base: NonNull::new(self.area.map.as_mut_ptr()).unwrap_or(NonNull::dangling()),
            len: self.area.map.len(),
        };
        let workers = self.served.len();
        let mut out: Vec<XskWorkerRings> = (0..workers)
            .map(|w| XskWorkerRings {
                index: w,
                queues: Vec::new(),
                area,
                layout: self.layout,
                irq_free: self.layout.irq_frames(w).collect(),
                served: self.served[w].clone(),
            })
            .collect();
        for s in self.sockets.iter_mut() {
            // The rings move to the worker; the socket (fd) stays here.
            let Some((rx, tx)) = s.rings.take() else {
                continue;
            };
            let (Some(q), Some(w)) = (self.queues.get(s.queue as usize), out.get_mut(s.worker))
            else {
                continue;
            };
            w.queues.push(QueueRings {
                queue: s.queue,
                rx,
                tx,
                fd: s.user.as_raw_fd(),
                shared: q.shared.clone(),
                outstanding: q.outstanding.clone(),
            });
        }
        out
    }
}

/// A worker's rings on one queue.
struct QueueRings {
    queue: u32,
    rx: RingRx,
    tx: RingTx,
    fd: libc::c_int,
    shared: Arc<Mutex<Shared>>,
    outstanding: Arc<Outstanding>,
}

/// What a worker thread takes with it.
pub struct XskWorkerRings {
    index: usize,
    /// Its rings on each queue, queue 0 first.
    queues: Vec<QueueRings>,
    area: AreaPtr,
    layout: Layout,
    irq_free: Vec<u64>,
    /// Requests received per queue.
    served: Arc<[AtomicU64]>,
}

/// A worker's scratch for one queue, reused turn after turn.
#[derive(Default)]
struct QueueScratch {
    /// Answers of this turn, to transmit.
    replies: Vec<XdpDesc>,
    /// Frames to give back to the fill ring.
    recycle: Vec<u64>,
    /// Frames to transmit that the TX ring had no room for yet.
    pending: Vec<XdpDesc>,
    /// Frames on our TX ring not completed yet (approximately).
    in_flight: u32,
}

/// A worker's AF_XDP transport: its rings and the scratch it reuses turn
/// after turn (no allocation on the packet path).
pub struct XskTransport {
    rings: XskWorkerRings,
    /// Per queue, in the order of `rings.queues`.
    scratch: Vec<QueueScratch>,
    /// Interrupt frames of this turn, to transmit (on the first queue).
    irq_descs: Vec<XdpDesc>,
    /// Scratch: addresses taken from a completion ring.
    done: Vec<u64>,
    /// The queue the next receive starts at (round robin, so that a busy
    /// queue cannot starve the others of a batch's room).
    next: usize,
    /// When the first frame of this turn's batch was read.
    batch_start: Option<Instant>,
}

impl XskTransport {
    /// The transport of one worker over its rings.
    pub fn new(rings: XskWorkerRings, batch: u32) -> XskTransport {
        let scratch = rings
            .queues
            .iter()
            .map(|_| QueueScratch {
                replies: Vec::with_capacity(batch as usize),
                recycle: Vec::with_capacity(batch as usize),
                pending: Vec::with_capacity(RING_SIZE as usize),
                in_flight: 0,
            })
            .collect();
        XskTransport {
            rings,
            scratch,
            irq_descs: Vec::new(),
            done: Vec::with_capacity(RING_SIZE as usize),
            next: 0,
            batch_start: None,
        }
    }

    /// Takes a frame of this worker's own pool (interrupts and block
    /// answers), has `fill` write a whole frame into it (its length, or
    /// `None` when it does not fit) and queues it for the next transmit;
    /// the frame goes back to the pool if `fill` fails. Whether a frame
    /// was queued.
    fn queue_own_frame(&mut self, fill: impl FnOnce(&mut [u8]) -> Option<usize>) -> bool {
        let Some(addr) = self.rings.irq_free.pop() else {
            return false;
        };
        // SAFETY: the frame comes from this worker's private pool.
        let Some(buf) = (unsafe { self.rings.area.frame(addr, FRAME_SIZE as usize) }) else {
            return false;
        };
        match fill(buf) {
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
}

/// Puts `pending` on the TX ring `tx`. A reservation stops at the ring's
/// wrap point, so a batch that straddles it takes a second reservation;
/// what the ring truly has no room for waits for the next turn (never
/// dropped: an interrupt is sent once). Returns how many went.
fn push_tx(tx: &mut RingTx, pending: &[XdpDesc]) -> usize {
    let mut sent = 0usize;
    for _ in 0..2 {
        let left = &pending[sent..];
        if left.is_empty() {
            break;
        }
        let mut w = tx.transmit(left.len() as u32);
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

/// The frames a worker gets back from the kernel, and where they go.
struct Returns<'a> {
    /// This worker's index.
    me: usize,
    layout: Layout,
    /// Scratch: addresses taken from the completion ring.
    done: &'a mut Vec<u64>,
    /// Request frames for the fill ring.
    recycle: &'a mut Vec<u64>,
    /// This worker's interrupt frame pool.
    irq_free: &'a mut Vec<u64>,
}

impl Returns<'_> {
    /// Sorts completed frames of one queue: interrupt frames back to
    /// their worker's pool, request frames to the queue's fill ring (with
    /// the recycled ones). Returns how many it took from the completion
    /// ring.
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
            if !self.layout.is_irq_frame(addr) {
                self.recycle.push(addr & !(FRAME_SIZE as u64 - 1));
            } else if self.layout.irq_owner(addr) == self.me {
                self.irq_free.push(addr);
            } else if let Some(v) = sh.irq_done.get_mut(self.layout.irq_owner(addr)) {
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
        Some(FrameOutcome::Ack { model, seq, learn }) => {
            work.router.ack(model, seq);
            if let Some((client, vm, to)) = learn {
                work.peers.learn_first(client, vm, to);
            }
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

    /// Reads up to `max` frames over the worker's queues, starting at a
    /// different queue each turn.
    fn receive(&mut self, max: u32, work: &mut Work<'_, Flow>) -> u64 {
        let mut got = 0u64;
        let area = self.rings.area;
        let n = self.rings.queues.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            let left = u64::from(max).saturating_sub(got) as u32;
            if left == 0 {
                break;
            }
            let (Some(q), Some(scratch)) = (self.rings.queues.get_mut(i), self.scratch.get_mut(i))
            else {
                continue;
            };
            let mut here = 0u64;
            let mut rx = q.rx.receive(left);
            while let Some(desc) = rx.read() {
                if got == 0 && here == 0 {
                    self.batch_start = Some(Instant::now());
                }
                here += 1;
                answer_frame(area, desc, work, &mut scratch.replies, &mut scratch.recycle);
            }
            rx.release();
            if here != 0 {
                if let Some(c) = self.rings.served.get(q.queue as usize) {
                    c.fetch_add(here, Ordering::Relaxed);
                }
            }
            got += here;
        }
        self.next = (self.next + 1) % n.max(1);
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
        self.queue_own_frame(|buf| {
            interrupt_frame(buf, &flow, (server, client, irqs[0].model), irqs, key)
        })
    }

    fn queue_datagram(&mut self, to: Flow, bytes: &[u8], _stats: &WorkerStats) -> bool {
        // Block answers leave the interrupts' share of the pool alone.
        if self.rings.irq_free.len() <= IRQ_FRAMES_PER_WORKER as usize {
            return false;
        }
        self.queue_own_frame(|buf| {
            buf.get_mut(devplane_wire::frame::PAYLOAD_OFFSET..)
                .and_then(|body| {
                    body.get_mut(..bytes.len())?.copy_from_slice(bytes);
                    Some(bytes.len())
                })
                .and_then(|n| devplane_wire::frame::write_headers(buf, &to, n))
        })
    }

    /// Transmits replies and interrupts in one batch per queue: onto the
    /// queue's TX ring, then kicked until the kernel has taken the ring's
    /// frames (also those an earlier turn left there). Interrupts go out
    /// on the first queue, ahead of that turn's replies.
    fn transmit(&mut self, stats: &WorkerStats) {
        let mut answered = 0u64;
        for (i, (q, scratch)) in self
            .rings
            .queues
            .iter_mut()
            .zip(self.scratch.iter_mut())
            .enumerate()
        {
            answered += scratch.replies.len() as u64;
            // Interrupts (and the worker's own frames) before the turn's
            // answers: an interrupt raised by a synchronous access then
            // reaches the client before the answer the vCPU waits for, so
            // that the vCPU's thread, which reads the interrupt sockets
            // right after its answer, injects it itself before it enters
            // its guest again (`dpbench --scenario irq`).
            if i == 0 {
                scratch.pending.append(&mut self.irq_descs);
            }
            scratch.pending.append(&mut scratch.replies);
            if !scratch.pending.is_empty() {
                let sent = push_tx(&mut q.tx, &scratch.pending);
                scratch.in_flight += sent as u32;
                q.outstanding.add(sent as u64);
                WorkerStats::add(&stats.tx, sent as u64);
                if sent < scratch.pending.len() {
                    WorkerStats::add(&stats.tx_full, (scratch.pending.len() - sent) as u64);
                }
                scratch.pending.drain(..sent);
            }
            // Copy mode (veth) always needs a kick to transmit.
            kick(&q.tx);
        }
        // Every answer of this batch waited as long as the batch took.
        if let Some(t0) = self.batch_start.take() {
            stats
                .service
                .record(t0.elapsed().as_nanos() as u64, answered);
        }
    }

    /// Completions back to each queue's fill ring (shared: one lock per
    /// queue per batch). Runs on a queue while any worker's frames are out
    /// there (sent, not yet taken back from its completion ring), not only
    /// while this worker's TX ring holds unsent ones: in copy mode a frame
    /// completes when its skb is freed, after the kick that sent it.
    fn reclaim(&mut self) {
        let me = self.rings.index;
        let layout = self.rings.layout;
        for (q, scratch) in self.rings.queues.iter().zip(self.scratch.iter_mut()) {
            if scratch.recycle.is_empty() && !q.outstanding.any() {
                continue;
            }
            if let Ok(mut sh) = q.shared.lock() {
                let taken = Returns {
                    me,
                    layout,
                    done: &mut self.done,
                    recycle: &mut scratch.recycle,
                    irq_free: &mut self.rings.irq_free,
                }
                .complete(&mut sh);
                q.outstanding.sub(taken);
            }
            // Frames of other workers' TX may complete here; count ours
            // out approximately by the ring's own pending count.
            scratch.in_flight = q.tx.pending();
        }
    }

    fn may_sleep(&self, held: usize) -> bool {
        held == 0 && self.scratch.iter().all(|s| s.in_flight == 0)
    }

    fn wait(&self, timeout: Duration) {
        let mut fds = [pollfd(-1); devplane_wire::maps::MAX_QUEUES as usize];
        for (p, q) in fds.iter_mut().zip(&self.rings.queues) {
            p.fd = q.fd;
        }
        let n = self.rings.queues.len().min(fds.len());
        wait_readable(&mut fds[..n], timeout);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An `Errno` of `code` (xdpilone builds them from `errno` only).
    fn err(code: i32) -> xdpilone::Errno {
        // SAFETY: __errno_location is this thread's errno, always valid.
        unsafe { *libc::__errno_location() = code };
        xdpilone::Errno::last_os_error()
    }

    /// A queue still taken by a socket being released is waited for; any
    /// other error, and a queue taken longer than the wait, fail.
    #[test]
    fn a_busy_queue_is_retried_for_a_bounded_time_only() {
        let wait = std::time::Duration::from_millis(200);
        let mut calls = 0;
        let r = busy_retry(wait, || {
            calls += 1;
            if calls < 4 {
                Err(err(libc::EBUSY))
            } else {
                Ok(())
            }
        });
        assert!(r.is_ok());
        assert_eq!(calls, 4);
        let mut calls = 0;
        let r = busy_retry(wait, || {
            calls += 1;
            Err(err(libc::ENODEV))
        });
        assert_eq!(r.unwrap_err().get_raw(), libc::ENODEV);
        assert_eq!(calls, 1, "only EBUSY is retried");
        let start = std::time::Instant::now();
        let r = busy_retry(wait, || Err(err(libc::EBUSY)));
        assert_eq!(r.unwrap_err().get_raw(), libc::EBUSY);
        let took = start.elapsed();
        assert!(took >= wait && took < wait * 5, "{took:?}");
    }

    #[test]
    fn layout_gives_each_queue_its_own_frames_then_the_irq_pools() {
        for (queues, workers) in [(1, 1), (1, 2), (4, 2), (8, 3), (64, 64)] {
            let l = Layout::new(queues, workers);
            let mut seen = std::collections::HashSet::new();
            for q in 0..queues {
                for a in l.queue_frames(q) {
                    assert!(!l.is_irq_frame(a), "{a}");
                    assert!(seen.insert(a));
                }
            }
            for w in 0..workers as usize {
                for a in l.irq_frames(w) {
                    assert!(l.is_irq_frame(a));
                    assert_eq!(l.irq_owner(a), w);
                    assert!(seen.insert(a));
                }
            }
            assert_eq!(seen.len() as u64, l.frames());
            assert!(seen.iter().all(|&a| a % u64::from(FRAME_SIZE) == 0));
            assert!(seen.iter().all(|&a| a < l.frames() * u64::from(FRAME_SIZE)));
            assert!(l.per_queue <= RING_SIZE && l.per_queue >= MIN_FILL_FRAMES);
        }
        assert_eq!(Layout::new(4, 1).per_queue, FILL_FRAMES);
        assert_eq!(Layout::new(8, 1).per_queue, FILL_FRAMES / 2);
        assert_eq!(Layout::new(0, 1).queues, 1);
    }

    #[test]
    fn served_queues_need_both_directions_and_fit_the_map() {
        assert_eq!(Queues { rx: 4, tx: 4 }.served(), 4);
        assert_eq!(Queues { rx: 8, tx: 2 }.served(), 2);
        assert_eq!(Queues { rx: 0, tx: 0 }.served(), 1);
        assert_eq!(
            Queues { rx: 1000, tx: 1000 }.served(),
            devplane_wire::maps::MAX_QUEUES
        );
    }
}
