//! A lane's I/O side: it drains the exit rings of its vCPUs into the
//! [`Protocol`], carries out what the protocol asks ([`LaneIo`]: sends,
//! answers into exit rings, interrupt injection, acknowledgements) and
//! feeds it what arrives. It only moves bytes; every decision is the
//! protocol's.
//!
//! An engine lane (one thread for many vCPUs, and the interrupt lane)
//! moves them through an io_uring: sends from registered buffers, many per
//! `io_uring_enter`, and multishot receives into provided buffers. A
//! direct lane (one vCPU, stepped by its own thread while it waits for its
//! answer) has no ring: it calls `sendto` and a non-blocking `recv` on its
//! sockets, as the serial floor `exit-udp-floor` does. Written by hand
//! where a crate was the choice because the ring cost latency there,
//! measured: with a ring, a direct lane's round trip took ~1.3 us longer
//! than the same round trip with plain calls (an `io_uring_enter` for the
//! send, another to run the receive's deferred work, a provided buffer
//! given back per answer), per-exit stage timestamps over 20,000 exits
//! (bench/README.md, "The tail judgement, measured").

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use devplane_wire::IrqAction;
use io_uring::{IoUring, cqueue, opcode, squeue, types};

use super::driver::{now_ns, pollfd, wait_readable};
use super::protocol::{Io, Peer, Protocol, Settings};
use super::ring_setup::{self, BUF_SIZE, BUFS_PER_SOCKET, SEND_BUFS, SEND_SLOT};
use super::stats::{EngineStats, add};
use super::{EngineConfig, EngineError, Injector, Lane};
use crate::ring::ExitRing;

/// The most datagrams a direct lane takes from one socket per step: what
/// a flood on its socket costs its vCPU per step is bounded; the rest wait
/// in the socket's buffer (whose size bounds them) for the next step.
pub(crate) const PLAIN_RECV_MAX: usize = 64;
const UD_SEND: u64 = 1 << 56;
const UD_RECV: u64 = 2 << 56;
const UD_PROVIDE: u64 = 3 << 56;
const UD_KIND: u64 = 0xff << 56;
/// `io_uring_enter` flag: run deferred work and reap (`IORING_ENTER_GETEVENTS`).
const ENTER_GETEVENTS: u32 = 1;

/// What the protocol's effects need: the ring, the sockets, the send
/// buffers, the vCPUs' exit rings and the VMs' injectors.
pub(crate) struct LaneIo {
    /// First field: dropped before the buffers registered with it. `None`
    /// for a direct lane, which uses plain socket calls (see the module's
    /// documentation).
    ring: Option<IoUring>,
    sockets: Vec<UdpSocket>,
    /// Per socket: connected to its server.
    connected: Vec<bool>,
    /// Per socket: the owner server its requests go to instead of the
    /// server it is connected to ([`Lane::via`]), as a `sockaddr` that an
    /// io_uring send points at (the vector is never resized), and whether
    /// it is in use: a switch to or from an owner
    /// ([`super::Engine::set_via`]) flips the flag (and rewrites the
    /// address) in place, so an entry already queued still points at
    /// valid memory.
    via: Vec<(libc::sockaddr_storage, libc::socklen_t, bool)>,
    /// [`Lane::servers`].
    servers: HashMap<u32, SocketAddr>,
    /// Per vCPU (the protocol's flow index): its exit ring.
    rings: Vec<Arc<ExitRing>>,
    injectors: HashMap<u32, Injector>,
    /// Registered send buffers, `SEND_SLOT` bytes each; a buffer is in use
    /// from its send until its completion (for SEND_ZC, its notification).
    send_pool: Box<[u8]>,
    free_send: Vec<usize>,
    registered: bool,
    zero_copy: bool,
    /// Set when an answer is handed to an exit ring: a direct lane's
    /// receive, while its vCPU waits, stops there.
    completed: bool,
    /// Sockets from this index on are the engine's interrupt sockets,
    /// shared with this lane ([`super::Lane::irq_sockets`]).
    irq_from: usize,
    stats: Arc<EngineStats>,
}

impl LaneIo {
    fn push(&mut self, e: squeue::Entry) -> Result<(), EngineError> {
        let Some(ring) = self.ring.as_mut() else {
            // A direct lane queues nothing: its calls are made at once.
            return Ok(());
        };
        loop {
            // SAFETY: the buffers an entry points at (receive pools, send
            // buffers) live in the `Loop` until the entry completes: send
            // buffers are only recycled on their completion, the rest for
            // the whole loop, which drops the ring first.
            if unsafe { ring.submission().push(&e) }.is_ok() {
                return Ok(());
            }
            ring.submit().map_err(EngineError::Submit)?;
        }
    }

    /// A send completed: its buffer is free again (for SEND_ZC, once the
    /// notification that follows says so).
    fn on_sent(&mut self, ud: u64, res: i32, flags: u32) {
        let id = (ud & !UD_KIND) as usize;
        if res < 0 {
            add(&self.stats.send_errors, 1);
        }
        let held = cqueue::more(flags) && !cqueue::notif(flags);
        if !held && id < SEND_BUFS {
            self.free_send.push(id);
        }
    }

    /// Where a send on `socket` goes: its owner server's address while its
    /// requests go through one ([`super::Lane::via`]), else nowhere named
    /// (null: the server the socket is connected to).
    fn dest(&self, socket: usize) -> (*const libc::sockaddr, libc::socklen_t) {
        match self.via.get(socket) {
            Some((a, l, true)) => ((a as *const libc::sockaddr_storage).cast(), *l),
            _ => (std::ptr::null(), 0),
        }
    }

    /// A direct lane's send: one `sendto`, which never blocks (a full
    /// socket buffer is a counted send error; the retransmission timer
    /// sends the datagram again).
    fn send_plain(&mut self, socket: usize, datagram: &[u8]) {
        let fd = self.sockets[socket].as_raw_fd();
        let (dest, dest_len) = self.dest(socket);
        // SAFETY: `datagram` is valid for its length; `dest` is null or
        // points at a `sockaddr_storage` of `dest_len` valid bytes in
        // `self.via`, which outlives the call.
        let r = unsafe {
            libc::sendto(
                fd,
                datagram.as_ptr().cast(),
                datagram.len(),
                libc::MSG_DONTWAIT,
                dest,
                dest_len,
            )
        };
        if r < 0 {
            add(&self.stats.send_errors, 1);
        }
    }
}

impl Io for LaneIo {
    fn send(&mut self, socket: usize, datagram: &[u8]) -> Result<(), EngineError> {
        if self.ring.is_none() {
            self.send_plain(socket, datagram);
            return Ok(());
        }
        // The protocol may retire its datagram before the send completes:
        // send from a registered buffer held until its completion.
        let Some(id) = self.free_send.pop() else {
            // Every buffer is in flight: the retransmission timer retries.
            add(&self.stats.send_pool_empty, 1);
            return Ok(());
        };
        let off = id * SEND_SLOT;
        let len = datagram.len().min(SEND_SLOT);
        self.send_pool[off..off + len].copy_from_slice(&datagram[..len]);
        let ptr = self.send_pool[off..].as_ptr();
        let fd = types::Fd(self.sockets[socket].as_raw_fd());
        // Through an owner server: sent to it, on the socket connected to
        // the server that answers.
        let (dest, dest_len) = self.dest(socket);
        let e = if self.zero_copy {
            let mut op = opcode::SendZc::new(fd, ptr, len as u32)
                .dest_addr(dest)
                .dest_addr_len(dest_len);
            if self.registered {
                op = op.buf_index(Some(id as u16));
            }
            op.build()
        } else {
            opcode::Send::new(fd, ptr, len as u32)
                .dest_addr(dest)
                .dest_addr_len(dest_len)
                .build()
        };
        self.push(e.user_data(UD_SEND | id as u64))
    }

    fn complete(&mut self, vcpu: usize, slot: u64, status: u8, data: u64) {
        self.rings[vcpu].complete(slot, status, data);
        self.completed = true;
    }

    fn inject(&mut self, vm: u32, line: u32, action: IrqAction) -> bool {
        let ok = self
            .injectors
            .get(&vm)
            .is_some_and(|inject| inject(line, action));
        // A direct lane (no ring): its vCPU's thread injected it.
        if ok && self.ring.is_none() {
            add(&self.stats.irqs_on_vcpu, 1);
        }
        ok
    }

    fn has_vm(&self, vm: u32) -> bool {
        self.injectors.contains_key(&vm)
    }

    fn wall_ns(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }

    fn ack(&mut self, socket: usize, server: u32, datagram: &[u8]) {
        let s = &self.sockets[socket];
        let sent = if self.connected.get(socket).copied().unwrap_or(false) {
            s.send(datagram)
        } else {
            match self.servers.get(&server) {
                Some(addr) => s.send_to(datagram, addr),
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
}

/// `addr` as a `sockaddr` for a send's destination.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: `sockaddr_storage` is plain old data; all zeroes is valid.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: a `sockaddr_storage` is larger than, and aligned
            // for, any `sockaddr_*`.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The engine's work over a set of vCPUs and sockets, one io_uring.
pub(crate) struct Loop {
    /// Declared before `recv_bufs`: its ring is dropped first.
    io: LaneIo,
    proto: Protocol,
    /// One receive pool per socket, provided to the kernel (a ring lane).
    recv_bufs: Vec<Box<[u8]>>,
    /// What a direct lane receives into, one datagram at a time.
    scratch: Box<[u8]>,
    /// Per vCPU: the exit-ring index up to which requests were taken.
    tails: Vec<u64>,
    retransmit: Duration,
    started: bool,
    /// Sockets whose multishot receive ended, re-armed by the owner.
    rearm: Vec<usize>,
    /// Completion scratch, reused every step.
    cqes: Vec<(u64, i32, u32)>,
    /// Models moved to another server, to point at it ([`Retargets`]).
    retargets: Arc<Retargets>,
    /// How many of `retargets` this loop has applied.
    retargeted: usize,
    /// How many of `retargets.vias` this loop has applied.
    vias_applied: usize,
    /// Per socket: the server it is connected to.
    socket_servers: Vec<Option<u32>>,
}

/// Models to point at another server, asked by [`super::Engine::retarget`]
/// and applied by whichever thread holds the lane next (its vCPU, which
/// may hold it for long stretches while it waits, or the engine): the
/// asker never has to win the lane's lock against a spinning vCPU.
#[derive(Default)]
pub(crate) struct Retargets {
    /// Every request so far, in order: (model, server, socket).
    pub(crate) list: std::sync::Mutex<Vec<(u32, u32, usize)>>,
    /// `list.len()`, read without the lock on every step.
    pub(crate) asked: std::sync::atomic::AtomicUsize,
    /// How many of them the lane has applied.
    pub(crate) done: std::sync::atomic::AtomicUsize,
    /// Every change of an owner server so far, in order: (server, the
    /// owner its requests go through now, or `None`: straight).
    pub(crate) vias: std::sync::Mutex<Vec<(u32, Option<SocketAddr>)>>,
    /// `vias.len()`, read without the lock on every step.
    pub(crate) vias_asked: std::sync::atomic::AtomicUsize,
}

impl Loop {
    /// The loop of `lane` over `ring`, or over plain socket calls (`None`,
    /// a direct lane). The ring is owned by the one thread
    /// that steps it (`IORING_SETUP_DEFER_TASKRUN | SINGLE_ISSUER |
    /// TASKRUN_FLAG`, enabled by that thread in [`Loop::start`]): what the
    /// kernel received is completed only when that thread enters the ring,
    /// and `IORING_SQ_TASKRUN` says when to.
    pub(crate) fn new(
        cfg: &EngineConfig,
        ring: Option<IoUring>,
        lane: Lane,
        stats: Arc<EngineStats>,
        keys: super::LiveKeys,
        irqs: super::protocol::IrqSeen,
        retargets: Arc<Retargets>,
    ) -> Loop {
        let settings = Settings {
            client: cfg.client,
            retransmit_ns: nanos(cfg.retransmit),
            retransmit_max_ns: nanos(cfg.retransmit_max.max(cfg.retransmit)),
            horizon_ns: nanos(cfg.horizon),
            loss: cfg.loss,
            keys: cfg.tag_keys.clone(),
        };
        let peers = lane
            .vcpus
            .iter()
            .map(|p| Peer {
                vm: p.vm,
                vcpu: p.vcpu,
                models: p.models.clone(),
            })
            .collect();
        let (send_pool, registered) = match &ring {
            Some(r) => ring_setup::send_pool(r),
            None => (Box::default(), false),
        };
        let plain = ring.is_none();
        let irq_from = lane.sockets.len().saturating_sub(lane.irq_sockets);
        // The server each socket is connected to: the kernel takes
        // datagrams on it only from that address and port.
        let socket_servers: Vec<Option<u32>> = lane
            .sockets
            .iter()
            .map(|s| {
                let peer = s.peer_addr().ok()?;
                lane.servers
                    .iter()
                    .find(|(_, a)| **a == peer)
                    .map(|(id, _)| *id)
            })
            .collect();
        let via = socket_servers
            .iter()
            .map(|id| match id.and_then(|id| lane.via.get(&id)) {
                Some(a) => {
                    let (a, l) = sockaddr(a);
                    (a, l, true)
                }
                // SAFETY: `sockaddr_storage` is plain old data; all zeroes
                // is valid.
                None => (unsafe { std::mem::zeroed() }, 0, false),
            })
            .collect();
        let servers = lane.servers.keys().copied().collect();
        let mut proto = Protocol::new(
            settings,
            peers,
            socket_servers.clone(),
            servers,
            lane.irq_ports.clone(),
            stats.clone(),
        );
        proto.watch_keys(keys);
        proto.share_irqs(irqs);
        Loop {
            proto,
            recv_bufs: if plain {
                Vec::new()
            } else {
                lane.sockets
                    .iter()
                    .map(|_| ring_setup::recv_pool())
                    .collect()
            },
            scratch: if plain {
                vec![0u8; BUF_SIZE].into_boxed_slice()
            } else {
                Box::default()
            },
            tails: vec![0; lane.vcpus.len()],
            io: LaneIo {
                ring,
                connected: lane.sockets.iter().map(|s| s.peer_addr().is_ok()).collect(),
                via,
                sockets: lane.sockets,
                servers: lane.servers,
                rings: lane.vcpus.into_iter().map(|p| p.ring).collect(),
                injectors: lane.injectors,
                send_pool,
                free_send: if plain {
                    Vec::new()
                } else {
                    (0..SEND_BUFS).rev().collect()
                },
                registered,
                zero_copy: cfg.zero_copy,
                completed: false,
                irq_from,
                stats,
            },
            retransmit: cfg.retransmit,
            started: false,
            rearm: Vec::new(),
            cqes: Vec::with_capacity(64),
            retargets,
            retargeted: 0,
            vias_applied: 0,
            socket_servers,
        }
    }

    fn provide(&mut self, sock: usize, bid: u16) -> Result<(), EngineError> {
        if bid >= BUFS_PER_SOCKET {
            return Ok(());
        }
        let base = self.recv_bufs[sock].as_mut_ptr();
        // SAFETY: bid < BUFS_PER_SOCKET, so the buffer is inside the pool.
        let addr = unsafe { base.add(bid as usize * BUF_SIZE) };
        let e = opcode::ProvideBuffers::new(addr, BUF_SIZE as i32, 1, sock as u16, bid)
            .build()
            .user_data(UD_PROVIDE);
        self.io.push(e)
    }

    fn arm_recv(&mut self, sock: usize) -> Result<(), EngineError> {
        let fd = types::Fd(self.io.sockets[sock].as_raw_fd());
        let e = opcode::RecvMulti::new(fd, sock as u16)
            .build()
            .user_data(UD_RECV | sock as u64);
        self.io.push(e)
    }

    /// Takes the ring for the calling thread (the engine thread: io_uring
    /// runs receive work on it), provides the receive buffers and arms the
    /// multishot receives. A direct lane has nothing to start.
    pub(crate) fn start(&mut self) -> Result<(), EngineError> {
        if self.started {
            return Ok(());
        }
        let Some(ring) = self.io.ring.as_ref() else {
            // A direct lane: nothing to arm; its sockets are read when it
            // steps.
            self.started = true;
            return Ok(());
        };
        // The kernel records this thread as the ring's single issuer.
        ring.submitter()
            .register_enable_rings()
            .map_err(EngineError::EnableRing)?;
        for s in 0..self.recv_bufs.len() {
            let base = self.recv_bufs[s].as_mut_ptr();
            let e =
                opcode::ProvideBuffers::new(base, BUF_SIZE as i32, BUFS_PER_SOCKET, s as u16, 0)
                    .build()
                    .user_data(UD_PROVIDE);
            self.io.push(e)?;
            self.arm_recv(s)?;
        }
        self.started = true;
        self.enter()
    }

    /// One `io_uring_enter` when there is something to do: submits what is
    /// queued and runs the deferred work (datagrams the
    /// kernel received) so that their completions can be reaped. Nothing
    /// when nothing is queued and nothing waits.
    fn enter(&mut self) -> Result<(), EngineError> {
        let Some(ring) = self.io.ring.as_mut() else {
            return Ok(());
        };
        let to_submit = ring.submission().len() as u32;
        if to_submit == 0 && !ring.submission().taskrun() {
            return Ok(());
        }
        // SAFETY: no argument structure is passed; the entries being
        // submitted point at memory this `Loop` keeps (see `LaneIo::push`).
        let r = unsafe {
            ring.submitter()
                .enter::<libc::sigset_t>(to_submit, 0, ENTER_GETEVENTS, None)
        };
        match r {
            Ok(_) => {
                if to_submit > 0 {
                    add(&self.io.stats.submits, 1);
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
            Err(e) => Err(EngineError::Submit(e)),
        }
    }

    /// Waits in the kernel for a completion, at most until the next
    /// retransmission is due or `max` (submitting what is queued first).
    /// Interrupted or timed out, it just returns: the next step sees.
    pub(crate) fn block(&mut self, max: Duration) {
        if self
            .io
            .ring
            .as_mut()
            .is_some_and(|r| !r.completion().is_empty())
        {
            return;
        }
        // Nothing in flight: nothing to wait for but a stray answer; wake
        // at the retransmission interval all the same, a safety net.
        let wait = match self.proto.next_due() {
            None => max.min(self.retransmit),
            Some(due) => max.min(Duration::from_nanos(due.saturating_sub(now_ns()))),
        };
        match self.io.ring.as_mut() {
            Some(ring) => {
                let ts = types::Timespec::from(wait);
                let args = types::SubmitArgs::new().timespec(&ts);
                let _ = ring.submitter().submit_with_args(1, &args);
            }
            None => self.poll_sockets(wait),
        }
    }

    /// A direct lane's sleep: until one of its sockets has a datagram, or
    /// `wait` passes (or a signal: the engine's kick). One small
    /// allocation (a pollfd per socket): this follows a spin of
    /// `direct_spin`, where it does not show.
    fn poll_sockets(&mut self, wait: Duration) {
        let mut fds: Vec<libc::pollfd> = self
            .io
            .sockets
            .iter()
            .map(|s| pollfd(s.as_raw_fd()))
            .collect();
        wait_readable(&mut fds, wait);
    }

    /// Whether the kernel holds deferred work (received datagrams) for
    /// this ring.
    pub(crate) fn pending(&mut self) -> bool {
        self.io
            .ring
            .as_mut()
            .is_some_and(|r| r.submission().taskrun())
    }

    /// Whether entries wait in the submission queue.
    pub(crate) fn queued(&mut self) -> bool {
        self.io
            .ring
            .as_mut()
            .is_some_and(|r| !r.submission().is_empty())
    }

    /// Applies the retargets asked since the last call (see
    /// [`Protocol::retarget`]); cheap when there are none.
    pub(crate) fn apply_retargets(&mut self) {
        use std::sync::atomic::Ordering;
        if self.retargets.vias_asked.load(Ordering::Acquire) != self.vias_applied {
            let list = self
                .retargets
                .vias
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for &(server, owner) in &list[self.vias_applied..] {
                for (i, s) in self.socket_servers.iter().enumerate() {
                    if *s != Some(server) {
                        continue;
                    }
                    let v = &mut self.io.via[i];
                    match owner {
                        Some(a) => {
                            let (addr, len) = sockaddr(&a);
                            *v = (addr, len, true);
                        }
                        None => v.2 = false,
                    }
                }
            }
            self.vias_applied = list.len();
        }
        if self.retargets.asked.load(Ordering::Acquire) == self.retargeted {
            return;
        }
        let list = self
            .retargets
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = now_ns();
        for &(model, server, socket) in &list[self.retargeted..] {
            self.proto.retarget(model, server, socket, now);
        }
        self.retargeted = list.len();
        self.retargets.done.store(list.len(), Ordering::Release);
    }

    /// When the earliest datagram in flight is due for retransmission
    /// ([`now_ns`]); 0 if none is in flight.
    pub(crate) fn next_due(&self) -> u64 {
        self.proto.next_due().unwrap_or(0)
    }

    /// One iteration: new requests out, due retransmissions out, one
    /// submit, completions in. Never blocks.
    /// `waiting`: a vCPU waits for an answer on this (direct) lane now,
    /// so its receive stops at the first answer; otherwise (a kick, a
    /// flush) it reads everything that waits, before it resends anything.
    pub(crate) fn step(&mut self, owner: bool, waiting: bool) -> Result<bool, EngineError> {
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
        self.apply_retargets();
        let now = now_ns();
        let plain = self.io.ring.is_none();
        // A direct lane nobody waits on (kicked for a retransmission, or
        // flushing) reads what came while its guest ran before it resends:
        // an answer already there is not resent for.
        let mut work = plain && !waiting && self.recv_plain(false);
        let (took, sent) = self.drain_rings(now)?;
        work |= took;
        work |= self.proto.retransmit(now, &mut self.io)?;
        work |= self.proto.announce(now, &mut self.io);
        self.enter()?;
        // A waiting direct lane that has just sent a request does not look
        // for its answer in the same step (it cannot be back yet, and the
        // look is a system call); the next step does.
        let look = !plain || (waiting && !sent);
        if look && self.reap(owner)? {
            work = true;
            // An answered datagram lets the requests queued behind it go
            // now: the thread stepping may not step again soon (a vCPU
            // about to halt in its guest). Only then: the buffers the reap
            // gave back go with the next entry, not a system call of their
            // own.
            if self.drain_rings(now)?.1 {
                self.enter()?;
            }
        }
        Ok(work)
    }

    /// Whether a vCPU published something not yet taken.
    pub(crate) fn fresh(&self) -> bool {
        self.tails
            .iter()
            .zip(&self.io.rings)
            .any(|(&tail, ring)| tail < ring.head())
    }

    /// Whether a vCPU published something not yet taken, or a datagram is
    /// in flight.
    pub(crate) fn busy(&self) -> bool {
        self.fresh() || self.proto.in_flight()
    }

    /// Moves newly published requests into the protocol's queues and sends
    /// whatever may go. Returns whether it took new requests, and whether
    /// it queued a send.
    fn drain_rings(&mut self, now: u64) -> Result<(bool, bool), EngineError> {
        let mut work = false;
        let mut sent = false;
        for v in 0..self.tails.len() {
            work |= self.take_published(v);
            sent |= self.proto.send_ready(v, now, &mut self.io)?;
        }
        Ok((work, sent))
    }

    /// Hands vCPU `v`'s newly published requests to the protocol; whether
    /// there were any.
    fn take_published(&mut self, v: usize) -> bool {
        let head = self.io.rings[v].head();
        let fresh = self.tails[v] < head;
        while self.tails[v] < head {
            let i = self.tails[v];
            let ring = &self.io.rings[v];
            let model = ring.slot(i).model.load(Ordering::Relaxed) as usize;
            let record = ring.record(i);
            self.tails[v] += 1;
            self.proto.request(v, i, model, &record, &mut self.io);
        }
        fresh
    }

    /// Handles every completion posted; whether there was any.
    fn reap(&mut self, owner: bool) -> Result<bool, EngineError> {
        let Some(ring) = self.io.ring.as_mut() else {
            return Ok(self.recv_plain(true));
        };
        // Reused scratch: no allocation per step.
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        let r = cqes
            .iter()
            .try_for_each(|&(ud, res, flags)| match ud & UD_KIND {
                UD_SEND => {
                    self.io.on_sent(ud, res, flags);
                    Ok(())
                }
                UD_RECV => self.on_received((ud & !UD_KIND) as usize, res, flags, owner),
                _ => Ok(()),
            });
        let work = !cqes.is_empty();
        self.cqes = cqes;
        r?;
        // Buffers given back and receives re-armed go with the ring's next
        // entry (the next request, or a service after an arrival), saving a
        // system call per answer.
        Ok(work)
    }

    /// A direct lane's receive: what waits on its sockets, each datagram
    /// parsed in place, at most [`PLAIN_RECV_MAX`] per socket, the
    /// interrupt sockets first ([`super::EngineConfig::irqs_on_lanes`]),
    /// then its servers'. With `stop_at_answer` (its vCPU waits for an
    /// answer) it stops at the first datagram that answers a request: the
    /// server sends a turn's interrupts ahead of its answers, so an
    /// interrupt the access raised has been read (and is injected before
    /// the vCPU enters its guest) by the time its answer is, and no system
    /// call follows the answer. No socket starves: what stops a step early
    /// is an answer, and each (vCPU, model) has at most one datagram in
    /// flight. Whether there was any. Never blocks.
    fn recv_plain(&mut self, stop_at_answer: bool) -> bool {
        let n_socks = self.io.sockets.len();
        let irq_from = self.io.irq_from.min(n_socks);
        let mut any = false;
        for sock in (irq_from..n_socks).chain(0..irq_from) {
            let (read, answered) = self.recv_socket(sock, stop_at_answer);
            any |= read;
            if answered {
                break;
            }
        }
        any
    }

    /// Reads socket `sock` until it is empty, [`PLAIN_RECV_MAX`]
    /// datagrams, or (`stop_at_answer`) one that hands an answer to an
    /// exit ring: (whether it read any, whether it stopped at an answer).
    fn recv_socket(&mut self, sock: usize, stop_at_answer: bool) -> (bool, bool) {
        let mut any = false;
        let fd = self.io.sockets[sock].as_raw_fd();
        for _ in 0..PLAIN_RECV_MAX {
            // SAFETY: `scratch` is valid for writes of its length.
            let n = unsafe {
                libc::recv(
                    fd,
                    self.scratch.as_mut_ptr().cast(),
                    self.scratch.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    // A port unreachable from an earlier send (connected
                    // UDP) or a signal: read on.
                    Some(libc::ECONNREFUSED | libc::EINTR) => continue,
                    // Nothing more (EAGAIN), or an error (it is cleared
                    // by the call that returned it): the next step reads
                    // on.
                    _ => break,
                }
            }
            any = true;
            // Longer datagrams were cut to the buffer (as a ring lane's
            // provided buffers cut them): they fail to parse, counted.
            let n = (n as usize).min(self.scratch.len());
            if n == 0 {
                continue;
            }
            self.io.completed = false;
            self.proto
                .on_datagram(&self.scratch[..n], sock, &mut self.io);
            if stop_at_answer && self.io.completed {
                return (true, true);
            }
        }
        (any, false)
    }

    /// A receive on socket `sock` completed: its datagram goes to the
    /// protocol (parsed in place) and its buffer back to the kernel; an
    /// ended multishot receive is armed again (by the ring's owner).
    fn on_received(
        &mut self,
        sock: usize,
        res: i32,
        flags: u32,
        owner: bool,
    ) -> Result<(), EngineError> {
        if res > 0
            && let Some(bid) = cqueue::buffer_select(flags)
        {
            let off = bid as usize * BUF_SIZE;
            let n = (res as usize).min(BUF_SIZE);
            if let Some(bytes) = self.recv_bufs[sock].get(off..off + n) {
                self.proto.on_datagram(bytes, sock, &mut self.io);
            }
            self.provide(sock, bid)?;
        }
        if !cqueue::more(flags) {
            if owner {
                self.arm_recv(sock)?;
            } else {
                self.rearm.push(sock);
            }
        }
        Ok(())
    }
}
