//! The client's side of block requests in bulk ([`devplane_wire::bulk`]):
//! a remote disk that takes whole block requests, many in flight, and
//! completes them out of order as their answers arrive.
//!
//! [`BulkClient`] is the protocol, pure: it numbers requests, splits a
//! write's data into segments, reassembles a read's answer, and decides
//! what to send again when (a write's progress is probed and only the
//! segments the server lacks are sent again; a read names the answer
//! segments it lacks). [`BulkDisk`] moves its bytes: a UDP socket
//! connected to the server and one I/O thread that receives answers,
//! fires the retransmission timers and hands completions to a callback
//! (the virtio-blk device, which fills the used ring and interrupts).
//!
//! **Pacing.** At most [`MAX_BYTES_IN_FLIGHT`] bytes of requests are on
//! the wire at once (the rest wait in order), so a queue depth of 32
//! 128 KiB writes does not overrun the server's receive ring.
//!
//! **Timeouts.** A request is sent again only when its answer is late,
//! not while it is on its way: its timeout is the smoothed round trip
//! plus four times its variation (RFC 6298, measured on answers to
//! requests sent once: Karn's rule), plus the time to move every
//! segment on the wire when it was sent (its own and those of the
//! requests ahead of it, which the server answers first), at least
//! [`RTO_MIN`], [`RTO_INITIAL`] before anything was measured, and
//! doubling on every resend up to [`RTO_MAX`]. Each answer segment of a
//! read that arrives restarts its timer (the answer is coming).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devplane_wire::bulk::{
    self, BF_PROBE, BF_RETRANSMIT, BlockMsg, BlockOp, BlockStatus, Bulk, KIND_BLOCK_REQUEST,
    MAX_BULK_DATAGRAM, MAX_SEGS, SEG_DATA,
};
use devplane_wire::bulk_state::SegBitmap;
use devplane_wire::tag::{self, KeyRing};
use devplane_wire::{Header, Kind, TAG_LEN};

use crate::engine::{KeyWatch, LiveKeys};

/// Bytes of requests on the wire at most; more wait their turn.
pub const MAX_BYTES_IN_FLIGHT: usize = 4 << 20;
/// Requests on the wire at most.
pub const MAX_IN_FLIGHT: usize = 128;
/// Smallest retransmission timeout: above the stalls of a loaded host
/// (its polling threads descheduled, measured up to some 50 ms on the
/// shared 2-core development machine at a load of 11), so that a late
/// answer is not mistaken for a lost one: a resend costs the server a
/// second read and the wire a second answer, and answers nothing sooner.
/// A datagram really lost on a LAN is rare; it costs this much.
pub const RTO_MIN: Duration = Duration::from_millis(50);
/// Retransmission timeout before any round trip was measured.
pub const RTO_INITIAL: Duration = Duration::from_millis(100);
/// Largest retransmission timeout (a server restarting is waited for
/// with it).
pub const RTO_MAX: Duration = Duration::from_millis(250);
/// Time allowed per segment on the wire (a debug build's worker under
/// load), on top of the round trip.
const PER_SEG: Duration = Duration::from_micros(40);

/// The smoothed round trip and its variation (RFC 6298).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RttEstimator {
    srtt: Option<Duration>,
    rttvar: Duration,
}

impl RttEstimator {
    /// Takes the round trip of an answer to a request sent once.
    pub fn sample(&mut self, rtt: Duration) {
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(s) => {
                let diff = s.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((s * 7 + rtt) / 8);
            }
        }
    }

    /// The smoothed round trip, once measured.
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The timeout for a request whose segments, and those ahead of it,
    /// take `transfer` to move: `srtt + 4 rttvar + transfer`, between
    /// [`RTO_MIN`] and [`RTO_MAX`] ([`RTO_INITIAL`] before any sample).
    pub fn rto(&self, transfer: Duration) -> Duration {
        match self.srtt {
            None => (RTO_INITIAL + transfer).min(RTO_MAX),
            Some(s) => (s + self.rttvar * 4 + transfer).clamp(RTO_MIN, RTO_MAX),
        }
    }
}

/// Who this client is and whom it talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkIds {
    /// Client platform id.
    pub client: u32,
    /// Server platform id.
    pub server: u32,
    /// The disk's device-model id.
    pub model: u32,
    /// VM id.
    pub vm: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
}

/// A completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The submitter's token.
    pub token: u64,
    /// Outcome (`IoError` also when the server never answered).
    pub status: BlockStatus,
    /// A read's data.
    pub data: Vec<u8>,
}

/// Counters of a bulk disk.
#[derive(Debug, Default)]
pub struct BulkStats {
    /// Requests submitted.
    pub submitted: AtomicU64,
    /// Requests completed.
    pub completed: AtomicU64,
    /// Of those, not `Ok`.
    pub errors: AtomicU64,
    /// Datagrams sent (first sends and resends).
    pub sent: AtomicU64,
    /// Datagrams sent again after a timeout (segments, probes, requests).
    pub resent: AtomicU64,
    /// Timeouts fired.
    pub timeouts: AtomicU64,
    /// Answers received.
    pub received: AtomicU64,
    /// Answers dropped: malformed, bad tag, unknown or duplicate.
    pub dropped: AtomicU64,
    /// Datagrams of `sent` that went in UDP GSO batches (several in one
    /// system call).
    pub gso_datagrams: AtomicU64,
    /// The system calls that sent them.
    pub gso_sends: AtomicU64,
    /// Times the I/O thread slept on its socket with more than one request
    /// in flight, where it does not spin (see [`spins`]).
    pub deep_sleeps: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// One request the client has not completed.
#[derive(Debug)]
struct Pending {
    token: u64,
    msg: BlockMsg,
    /// A write's data, or a read's buffer.
    data: Vec<u8>,
    /// Segments of a write's data or of a read's answer (1 for others).
    nseg: u16,
    /// A read's answer segments received.
    have: SegBitmap,
    first: Instant,
    deadline: Instant,
    rto: Duration,
    resent: bool,
    started: bool,
}

/// The pure protocol of a bulk disk.
pub struct BulkClient {
    ids: BulkIds,
    keys: Option<KeyRing>,
    /// The keys followed through rotations, if any.
    watch: KeyWatch,
    next_id: u64,
    pending: HashMap<u64, Pending>,
    /// Ids waiting for room on the wire, in order.
    queued: VecDeque<u64>,
    bytes_on_wire: usize,
    on_wire: usize,
    rtt: RttEstimator,
    give_up: Duration,
    /// Most data bytes per datagram, either way: [`SEG_DATA`] on a
    /// 1500-byte MTU, up to [`bulk::SEG_DATA_MAX`] on a jumbo link
    /// ([`BulkClient::set_mtu`]).
    seg_max: usize,
    /// Requests cut again for a 1500-byte MTU (the server's link took
    /// less than this one's: see [`BulkClient::recut`]).
    recut: u64,
}

/// Sends datagrams (the socket, or a test's vector).
pub trait Outbox {
    /// Sends one datagram.
    fn send(&mut self, bytes: &[u8]);

    /// Sends the datagram `fill` writes into a buffer of `len` bytes (it
    /// returns the length written, at most `len`; `None` sends nothing).
    /// The socket's outbox has it write straight into its GSO batch,
    /// which saves a copy of every byte sent: a 128 KiB write's data was
    /// copied once more on the sending core.
    fn send_with(&mut self, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>) {
        send_copied(self, len, fill);
    }
}

/// [`Outbox::send_with`] through a buffer of its own and
/// [`Outbox::send`]: what an outbox without a batch to write into does.
fn send_copied<O: Outbox + ?Sized>(
    out: &mut O,
    len: usize,
    fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>,
) {
    let len = len.min(MAX_BULK_DATAGRAM);
    let mut buf = [0u8; MAX_BULK_DATAGRAM];
    if let Some(n) = fill(&mut buf[..len]) {
        out.send(&buf[..n.min(len)]);
    }
}

impl BulkClient {
    /// A client for `ids`, sealing with `keys`, that fails a request
    /// unanswered for `give_up`.
    pub fn new(ids: BulkIds, keys: Option<KeyRing>, give_up: Duration) -> BulkClient {
        BulkClient {
            ids,
            keys,
            watch: KeyWatch::default(),
            next_id: devplane_wire::first_seq(),
            pending: HashMap::new(),
            queued: VecDeque::new(),
            bytes_on_wire: 0,
            on_wire: 0,
            rtt: RttEstimator::default(),
            give_up,
            seg_max: SEG_DATA,
            recut: 0,
        }
    }

    /// Requests cut again in 1392-byte segments because the server's
    /// link did not take larger ones: a read answered `OutOfRange` for
    /// its segments (then every later request too), a write of which the
    /// server held nothing after it was sent again.
    pub fn recut(&self) -> u64 {
        self.recut
    }

    /// The MTU of the link to the server: writes go, and reads are asked
    /// to come back, in segments as large as it takes (see
    /// [`devplane_wire::bulk`], *Jumbo frames*). Requests already
    /// submitted keep their segments.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.seg_max = bulk::seg_max_for_mtu(mtu);
    }

    /// Most data bytes per datagram.
    pub fn seg_max(&self) -> usize {
        self.seg_max
    }

    /// Seals and verifies with `keys` from now on, following every
    /// change made to them (a key rotation): requests sent after it,
    /// first sends and resends alike, carry the new key.
    pub fn follow_keys(&mut self, keys: LiveKeys) {
        self.keys = keys.get();
        self.watch = KeyWatch::new(keys);
    }

    /// Takes the keys' change, if they changed.
    fn refresh_keys(&mut self) {
        if let Some(k) = self.watch.changed() {
            self.keys = k;
        }
    }

    /// Requests not completed.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Submits a request; `data` is a write's. Sends it now if there is
    /// room on the wire.
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        token: u64,
        op: BlockOp,
        sector: u64,
        len: u32,
        data: Vec<u8>,
        now: Instant,
        out: &mut dyn Outbox,
    ) {
        self.refresh_keys();
        self.next_id += 1;
        let id = self.next_id;
        let msg = BlockMsg {
            op,
            status: BlockStatus::Ok,
            flags: 0,
            queue: 0,
            vm: self.ids.vm,
            hypervisor: self.ids.hypervisor,
            id,
            sector,
            len,
        };
        let buf = if op == BlockOp::Read {
            vec![0u8; len as usize]
        } else {
            data
        };
        let nseg = if op == BlockOp::Read || op.request_has_data() {
            bulk::segments_for(len, self.seg_max)
        } else {
            1
        };
        self.pending.insert(
            id,
            Pending {
                token,
                msg,
                data: buf,
                nseg,
                have: SegBitmap::new(if op == BlockOp::Read { nseg } else { 1 }),
                first: now,
                deadline: now,
                rto: RTO_MIN,
                resent: false,
                started: false,
            },
        );
        self.queued.push_back(id);
        self.start_queued(now, out);
    }

    fn wire_bytes(p: &Pending) -> usize {
        (p.msg.len as usize).max(512)
    }

    /// Sends queued requests while there is room on the wire.
    fn start_queued(&mut self, now: Instant, out: &mut dyn Outbox) {
        while let Some(&id) = self.queued.front() {
            let Some(p) = self.pending.get(&id) else {
                self.queued.pop_front();
                continue;
            };
            let b = Self::wire_bytes(p);
            if self.on_wire > 0
                && (self.on_wire >= MAX_IN_FLIGHT || self.bytes_on_wire + b > MAX_BYTES_IN_FLIGHT)
            {
                return;
            }
            self.queued.pop_front();
            self.on_wire += 1;
            self.bytes_on_wire += b;
            let rto = self.rto_for(p);
            if let Some(p) = self.pending.get_mut(&id) {
                p.started = true;
                p.first = now;
                p.rto = rto;
                p.deadline = now + rto;
            }
            self.send_all(id, 0, out);
        }
    }

    /// The timeout of request `p`, sent now behind `self.bytes_on_wire`
    /// (its own included).
    fn rto_for(&self, p: &Pending) -> Duration {
        let segs = self.bytes_on_wire.div_ceil(self.seg_max).max(1);
        let segs = (segs as u32).max(u32::from(p.nseg));
        self.rtt.rto(PER_SEG * segs)
    }

    /// The round-trip estimate.
    pub fn rtt(&self) -> RttEstimator {
        self.rtt
    }

    fn header(&self) -> Header {
        let mut h = Header::new(
            Kind::Request,
            self.ids.model,
            self.ids.server,
            self.ids.client,
        );
        h.kind = KIND_BLOCK_REQUEST;
        h
    }

    fn emit(&self, msg: &BlockMsg, seg: u16, nseg: u16, data: &[u8], out: &mut dyn Outbox) {
        let tag = if self.keys.is_some() { TAG_LEN } else { 0 };
        out.send_with(bulk::MIN_BULK + data.len() + tag, &mut |buf| {
            let len = bulk::write(buf, self.header(), msg, seg, nseg, data)?;
            match &self.keys {
                Some(k) => tag::seal(buf, len, &k.current),
                None => Some(len),
            }
        });
    }

    /// Sends request `id` whole (every segment of a write).
    fn send_all(&self, id: u64, flags: u8, out: &mut dyn Outbox) {
        let Some(p) = self.pending.get(&id) else {
            return;
        };
        let msg = BlockMsg { flags, ..p.msg };
        if p.msg.op.request_has_data() {
            for s in 0..p.nseg {
                self.emit_seg(p, &msg, s, out);
            }
        } else {
            // A read names its answer's segments; others have none.
            self.emit(&msg, 0, p.nseg, &[], out);
        }
    }

    fn emit_seg(&self, p: &Pending, msg: &BlockMsg, s: u16, out: &mut dyn Outbox) {
        let (a, b) = bulk::seg_range(p.msg.len, p.nseg, s);
        self.emit(msg, s, p.nseg, p.data.get(a..b).unwrap_or(&[]), out);
    }

    fn finish(&mut self, id: u64, status: BlockStatus, now: Instant) -> Option<Completion> {
        let mut p = self.pending.remove(&id)?;
        if p.started {
            self.on_wire -= 1;
            self.bytes_on_wire -= Self::wire_bytes(&p);
            if !p.resent && status != BlockStatus::IoError {
                // Karn: only answers to requests sent once are timed.
                self.rtt.sample(now.saturating_duration_since(p.first));
            }
        }
        let data = if p.msg.op == BlockOp::Read && status == BlockStatus::Ok {
            std::mem::take(&mut p.data)
        } else {
            Vec::new()
        };
        Some(Completion {
            token: p.token,
            status,
            data,
        })
    }

    /// Takes one received datagram; completions go to `done`, anything
    /// to send again to `out`. False if it was dropped.
    pub fn on_datagram(
        &mut self,
        buf: &[u8],
        now: Instant,
        out: &mut dyn Outbox,
        done: &mut Vec<Completion>,
    ) -> bool {
        self.refresh_keys();
        let Ok(d) = Bulk::parse(buf) else {
            return false;
        };
        if d.request || d.model() != self.ids.model || d.client() != self.ids.client {
            return false;
        }
        match (&self.keys, d.key_id()) {
            (Some(k), Some(_)) if tag::verify(buf, k).is_ok() => {}
            (None, None) => {}
            _ => return false,
        }
        let id = d.id();
        let Some(p) = self.pending.get_mut(&id) else {
            return false; // late or duplicate
        };
        if !p.started || d.op != p.msg.op || d.vm() != self.ids.vm {
            return false;
        }
        match d.status {
            BlockStatus::Ok if d.op == BlockOp::Read => {
                let s = d.seg();
                if d.rec.len.get() != p.msg.len || d.rec.nseg.get() != p.nseg || p.have.has(s) {
                    return false;
                }
                // The parser checked the data's length against (len,
                // nseg, seg).
                let (a, b) = bulk::seg_range(p.msg.len, p.nseg, s);
                let Some(dst) = p.data.get_mut(a..b) else {
                    return false;
                };
                dst.copy_from_slice(d.data);
                p.have.set(s);
                // The answer is coming: not lost.
                p.deadline = now + p.rto;
                if p.have.complete() {
                    done.extend(self.finish(id, BlockStatus::Ok, now));
                    self.start_queued(now, out);
                }
            }
            BlockStatus::Partial => {
                // The server holds these segments of a write: send the rest.
                let have = SegBitmap::from_bytes(p.nseg, d.data);
                p.deadline = now + p.rto;
                if have.held() == 0 && p.resent && p.nseg < bulk::segments(p.msg.len) {
                    // None of its large segments arrived, sent again:
                    // perhaps the server's link takes less than ours.
                    // Cut it again for a 1500-byte MTU (the server holds
                    // nothing of it, so a new count is safe).
                    p.nseg = bulk::segments(p.msg.len);
                    self.recut += 1;
                    self.send_all(id, BF_RETRANSMIT, out);
                    return true;
                }
                let msg = BlockMsg {
                    flags: BF_RETRANSMIT,
                    ..p.msg
                };
                let p = &self.pending[&id];
                for s in have.missing() {
                    self.emit_seg(p, &msg, s, out);
                }
            }
            BlockStatus::Busy => {
                p.deadline = now + p.rto;
            }
            BlockStatus::OutOfRange
                if d.op == BlockOp::Read && p.nseg < bulk::segments(p.msg.len) =>
            {
                // The server's link does not take answer segments this
                // large (the two ends' MTUs disagree): ask again in those
                // of a 1500-byte MTU, and use those from now on.
                p.nseg = bulk::segments(p.msg.len);
                p.have = SegBitmap::new(p.nseg);
                p.deadline = now + p.rto;
                self.seg_max = SEG_DATA;
                self.recut += 1;
                self.send_all(id, BF_RETRANSMIT, out);
            }
            status => {
                done.extend(self.finish(id, status, now));
                self.start_queued(now, out);
            }
        }
        true
    }

    /// When the next timer is due, if any request is on the wire.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending
            .values()
            .filter(|p| p.started)
            .map(|p| p.deadline)
            .min()
    }

    /// Fires the timers due at `now`: requests unanswered for their
    /// timeout are sent again (a write of several segments is probed, a
    /// read names the answer segments it lacks), with a doubled timeout;
    /// requests unanswered for the give-up time fail. Returns how many
    /// fired.
    pub fn on_timer(
        &mut self,
        now: Instant,
        out: &mut dyn Outbox,
        done: &mut Vec<Completion>,
    ) -> u64 {
        self.refresh_keys();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.started && p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        let mut fired = 0;
        for id in due {
            fired += 1;
            let Some(p) = self.pending.get_mut(&id) else {
                continue;
            };
            if now.saturating_duration_since(p.first) >= self.give_up {
                done.extend(self.finish(id, BlockStatus::IoError, now));
                continue;
            }
            p.resent = true;
            p.rto = (p.rto * 2).min(RTO_MAX);
            p.deadline = now + p.rto;
            let p = &self.pending[&id];
            if p.msg.op.request_has_data() && p.nseg > 1 {
                let probe = BlockMsg {
                    flags: BF_PROBE | BF_RETRANSMIT,
                    ..p.msg
                };
                self.emit(&probe, 0, 1, &[], out);
            } else if p.msg.op == BlockOp::Read && p.have.held() > 0 {
                let mut missing = SegBitmap::new(p.have.nseg());
                for s in p.have.missing() {
                    missing.set(s);
                }
                let mut bytes = [0u8; MAX_SEGS.div_ceil(8)];
                let n = missing.to_bytes(&mut bytes);
                let probe = BlockMsg {
                    flags: BF_PROBE | BF_RETRANSMIT,
                    ..p.msg
                };
                self.emit(&probe, 0, p.nseg, &bytes[..n], out);
            } else {
                self.send_all(id, BF_RETRANSMIT, out);
            }
        }
        self.start_queued(now, out);
        fired
    }
}

/// What a [`BulkDisk`] is built with.
#[derive(Debug, Clone)]
pub struct BulkConfig {
    /// The server's address.
    pub server: SocketAddr,
    /// Local address to send from.
    pub bind: Option<IpAddr>,
    /// Ids.
    pub ids: BulkIds,
    /// Tag keys (`None`: untagged).
    pub keys: Option<KeyRing>,
    /// Keys to follow through rotations instead of `keys` (the client
    /// engine's, which the daemon changes on `dpctl clients rotate-key`).
    pub live_keys: Option<LiveKeys>,
    /// A request unanswered this long fails (long enough to ride out a
    /// server restart).
    pub give_up: Duration,
    /// Spin on the socket this long after the last activity before
    /// sleeping in `recv` (latency against a core), with one request in
    /// flight or none: deeper, the I/O thread sleeps at once ([`spins`]).
    pub spin: Duration,
    /// Loss injection (tests): datagrams dropped either way.
    pub loss: crate::engine::Loss,
}

/// Completions are handed to this, on the disk's I/O thread.
pub type OnComplete = Box<dyn FnMut(Completion) + Send>;

struct Shared {
    sock: UdpSocket,
    client: Mutex<BulkClient>,
    stop: AtomicBool,
    /// Shared with whoever reports them ([`BulkDisk::stats_handle`]).
    stats: Arc<BulkStats>,
    loss: crate::engine::Loss,
    rng: AtomicU64,
    /// Whether sends may use UDP GSO ([`SockOut`]).
    gso: AtomicBool,
    /// When the last request was submitted (ns since `epoch`): the I/O
    /// thread spins for an answer after it.
    last_submit: AtomicU64,
    epoch: Instant,
}

impl Shared {
    /// Whether to drop a datagram, `permille` of the time.
    fn lose(&self, permille: u16) -> bool {
        if permille == 0 {
            return false;
        }
        let mut x = self.rng.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::Relaxed);
        x % 1000 < u64::from(permille)
    }
}

/// Most datagrams one UDP GSO send carries (the kernel takes up to 64).
const GSO_MAX_SEGS: usize = 40;
/// Most bytes one UDP GSO send carries: the unsegmented datagram must fit
/// in one IPv4 packet.
const GSO_MAX_BYTES: usize = 60_000;

/// The socket as an [`Outbox`]. The datagrams one turn of the protocol
/// sends (a write's segments, a burst of resends) go out in as few
/// system calls as UDP GSO allows: runs of datagrams of one size (the
/// last of a run may be shorter) in one `sendmsg` with `UDP_SEGMENT`,
/// which the kernel cuts into the same datagrams, each with its own
/// header, block record and tag, on the wire exactly as if sent one by
/// one. Where the kernel or the route refuses GSO, it is turned off for
/// the socket and datagrams go one `send` each. Written by hand: std's
/// `UdpSocket` has no control messages, and a crate for one cmsg would
/// be a dependency for ten lines.
struct SockOut<'a> {
    sock: &'a UdpSocket,
    stats: &'a BulkStats,
    shared: &'a Shared,
    /// Datagrams waiting, end to end: the first `used` bytes (the
    /// buffer is kept at its size, [`BATCH_ROOM`], so that a datagram is
    /// written into it without zeroing its room first).
    batch: Vec<u8>,
    used: usize,
    /// Their size (all but the last).
    seg: usize,
    /// How many.
    n: usize,
    /// The last one is shorter than `seg`: the run is closed.
    closed: bool,
}

/// The batch buffer's size: a full GSO send and one datagram more.
const BATCH_ROOM: usize = GSO_MAX_BYTES + MAX_BULK_DATAGRAM;

thread_local! {
    /// The batch buffer of this thread's [`SockOut`]s, kept between them:
    /// no allocation per request or answer once warm.
    static BATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<'a> SockOut<'a> {
    fn new(shared: &'a Shared) -> SockOut<'a> {
        SockOut {
            sock: &shared.sock,
            stats: &shared.stats,
            shared,
            batch: BATCH.with(|b| {
                let mut b = std::mem::take(&mut *b.borrow_mut());
                b.resize(BATCH_ROOM, 0);
                b
            }),
            used: 0,
            seg: 0,
            n: 0,
            closed: false,
        }
    }

    /// Sends what is batched.
    fn flush(&mut self) {
        match self.n {
            0 => {}
            1 => {
                // A full socket buffer loses the datagram like the
                // network would: the timer sends it again.
                let _ = self.sock.send(&self.batch[..self.used]);
            }
            _ => {
                let sent = send_gso(self.sock, &self.batch[..self.used], self.seg);
                if sent.is_ok() {
                    add(&self.stats.gso_sends, 1);
                    add(&self.stats.gso_datagrams, self.n as u64);
                }
                if let Err(e) = sent
                    && gso_refused(&e)
                {
                    self.shared.gso.store(false, Ordering::Relaxed);
                    for d in self.batch[..self.used].chunks(self.seg) {
                        let _ = self.sock.send(d);
                    }
                }
            }
        }
        self.used = 0;
        self.n = 0;
        self.closed = false;
    }
}

impl SockOut<'_> {
    /// Closes the batch's run (sends it) unless a datagram of `len` bytes
    /// can join it.
    fn make_room(&mut self, len: usize) {
        if self.n > 0
            && (self.closed
                || len > self.seg
                || self.n == GSO_MAX_SEGS
                || self.used + len > GSO_MAX_BYTES)
        {
            self.flush();
        }
    }

    /// Takes the `len` bytes written at the batch's end as its next
    /// datagram.
    fn append(&mut self, len: usize) {
        if self.n == 0 {
            self.seg = len;
        }
        self.closed = len < self.seg;
        self.used += len;
        self.n += 1;
    }
}

impl Outbox for SockOut<'_> {
    fn send(&mut self, bytes: &[u8]) {
        add(&self.stats.sent, 1);
        if self.shared.lose(self.shared.loss.tx_permille) {
            return;
        }
        if !self.shared.gso.load(Ordering::Relaxed) || bytes.len() > MAX_BULK_DATAGRAM {
            // After what is batched: datagrams leave in the order sent.
            self.flush();
            let _ = self.sock.send(bytes);
            return;
        }
        self.make_room(bytes.len());
        self.batch[self.used..self.used + bytes.len()].copy_from_slice(bytes);
        self.append(bytes.len());
    }

    fn send_with(&mut self, len: usize, fill: &mut dyn FnMut(&mut [u8]) -> Option<usize>) {
        if !self.shared.gso.load(Ordering::Relaxed) || len > MAX_BULK_DATAGRAM {
            send_copied(self, len, fill);
            return;
        }
        // Room for `len` (a datagram written shorter only ends the run
        // sooner: a run's datagrams are at most its first's size).
        self.make_room(len);
        let at = self.used;
        let Some(n) = fill(&mut self.batch[at..at + len]) else {
            return;
        };
        let n = n.min(len);
        add(&self.stats.sent, 1);
        if self.shared.lose(self.shared.loss.tx_permille) {
            return;
        }
        self.append(n);
    }
}

impl Drop for SockOut<'_> {
    fn drop(&mut self) {
        self.flush();
        let batch = std::mem::take(&mut self.batch);
        BATCH.with(|b| *b.borrow_mut() = batch);
    }
}

/// The MTU of the route of the connected `sock` (`IP_MTU`), if known.
fn route_mtu(sock: &UdpSocket) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `mtu`, which
    // lives for the call.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            &mut mtu as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    (rc == 0 && mtu > 0).then_some(mtu as usize)
}

/// Whether a send error says GSO cannot be used here (rather than a full
/// buffer or an unreachable peer, which lose the batch like the network).
fn gso_refused(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// One `sendmsg` of `buf` on the connected `sock`, cut by the kernel into
/// datagrams of `seg` bytes (the last may be shorter).
fn send_gso(sock: &UdpSocket, buf: &[u8], seg: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    const UDP_SEGMENT: libc::c_int = 103;
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // Room for one cmsg of a u16, aligned as cmsghdr wants.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is valid (no name, no iovecs yet).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    // SAFETY: CMSG_SPACE only computes a size.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: the control buffer is 32 bytes, more than CMSG_SPACE(2)
    // (24), and aligned for cmsghdr (u64s); CMSG_FIRSTHDR returns its
    // start, CMSG_DATA the data within it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg as u16);
    }
    // SAFETY: msg points at iov, buf and control, all alive for the call.
    let rc = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A remote disk spoken to in bulk: submit from any thread; completions
/// come on the disk's own I/O thread.
pub struct BulkDisk {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl BulkDisk {
    /// Connects to the server and starts the I/O thread, which hands
    /// every completion to `on_complete`.
    pub fn start(cfg: BulkConfig, on_complete: OnComplete) -> std::io::Result<BulkDisk> {
        let local: SocketAddr = match cfg.bind {
            Some(ip) => SocketAddr::new(ip, 0),
            None => SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let sock = UdpSocket::bind(local)?;
        // Room for a queue depth of 128 KiB reads arriving at once.
        set_buffer(&sock, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 8 << 20);
        set_buffer(&sock, libc::SO_SNDBUFFORCE, libc::SO_SNDBUF, 8 << 20);
        sock.connect(cfg.server)?;
        sock.set_nonblocking(true)?;
        let mut client = BulkClient::new(cfg.ids, cfg.keys, cfg.give_up);
        // Segments as large as the route to the server takes (its
        // device's MTU: jumbo frames where the link has them).
        if let Some(mtu) = route_mtu(&sock) {
            client.set_mtu(mtu);
        }
        if let Some(k) = cfg.live_keys {
            client.follow_keys(k);
        }
        let shared = Arc::new(Shared {
            sock,
            client: Mutex::new(client),
            stop: AtomicBool::new(false),
            stats: Arc::default(),
            loss: cfg.loss,
            rng: AtomicU64::new(cfg.loss.seed | 1),
            gso: AtomicBool::new(true),
            last_submit: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let s = Arc::clone(&shared);
        let spin = cfg.spin;
        let thread = std::thread::Builder::new()
            .name("dp-bulk-disk".into())
            .spawn(move || io_loop(&s, spin, on_complete))?;
        Ok(BulkDisk {
            shared,
            thread: Some(thread),
        })
    }

    /// Submits a request (`data`: a write's bytes); it completes through
    /// the callback with `token`.
    pub fn submit(&self, token: u64, op: BlockOp, sector: u64, len: u32, data: Vec<u8>) {
        add(&self.shared.stats.submitted, 1);
        let since = self.shared.epoch.elapsed().as_nanos() as u64;
        self.shared.last_submit.store(since, Ordering::Relaxed);
        let mut out = SockOut::new(&self.shared);
        if let Ok(mut c) = self.shared.client.lock() {
            c.submit(token, op, sector, len, data, Instant::now(), &mut out);
        }
    }

    /// Its counters.
    pub fn stats(&self) -> &BulkStats {
        &self.shared.stats
    }

    /// Its counters, to read from another thread for as long as wanted
    /// (the client daemon's VM status).
    pub fn stats_handle(&self) -> Arc<BulkStats> {
        Arc::clone(&self.shared.stats)
    }
}

impl Drop for BulkDisk {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sets a socket buffer's size: beyond the system's limit if allowed
/// (`force`, with CAP_NET_ADMIN), else up to it.
fn set_buffer(sock: &UdpSocket, force: libc::c_int, plain: libc::c_int, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    for opt in [force, plain] {
        // SAFETY: a valid socket and an int option of the right size.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &bytes as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
}

/// Waits until the socket is readable or `timeout` passes (whole
/// milliseconds, 1 to 50).
fn wait_readable(sock: &UdpSocket, timeout: Duration) {
    use std::os::fd::AsRawFd;
    let ms = timeout.as_millis().clamp(1, 50) as u64;
    devplane_control::poll::wait_one(sock.as_raw_fd(), Duration::from_millis(ms));
}

/// Most requests in flight for which the I/O thread spins for its answer.
const SPIN_MAX_PENDING: usize = 1;

/// Whether the I/O thread spins for the next answer (rather than sleep on
/// its socket until one arrives), `idle` after the last answer or
/// submission, with `pending` requests in flight.
///
/// It spins for `spin` at a queue depth of one, where the wake-up (some
/// 15-30 us on this machine's 2 cores) would be most of a 4 KiB request's
/// round trip. Deeper, it sleeps at once: the answers behind the one
/// awaited are already in flight, so a wake-up costs no throughput. Its
/// spin yields the core on every turn ([`io_loop`]): where the thread
/// shares the submitting vCPU's core, a spin that only paused kept from the vCPU
/// the time it needed to take its completions and submit again (and the
/// kernel's sending of its datagrams, done on that core).
///
/// `dpbench --scenario blk`, 4 alternated runs each, requests/s and QD1
/// p50 (bench/README, "blk"): pausing at any depth (before) / this:
/// read-4k-qd32 90-97k / 156-202k, write-4k-qd32 60-63k / 78-90k,
/// write-128k-qd32 5000-5165 / 8119-9400, read-4k-qd1 12.9-13.9 us /
/// 10.2-11.2 us, write-4k-qd1 22.0-24.5 us / 18.4-20.3 us. Never
/// spinning (2 runs) gave the QD32 rows most of that but doubled the QD1
/// p50s (23-30 us, 50-58 us).
fn spins(idle: Duration, spin: Duration, pending: usize) -> bool {
    pending <= SPIN_MAX_PENDING && idle < spin
}

fn io_loop(s: &Shared, spin: Duration, mut on_complete: OnComplete) {
    let mut buf = [0u8; MAX_BULK_DATAGRAM.next_power_of_two()];
    let mut done = Vec::new();
    let mut last_activity = Instant::now();
    let stats = &s.stats;
    while !s.stop.load(Ordering::Relaxed) {
        let mut got = false;
        // Drain what arrived, then fire timers, under one lock per turn.
        while let Ok(n) = s.sock.recv(&mut buf) {
            got = true;
            if s.lose(s.loss.rx_permille) {
                continue;
            }
            add(&stats.received, 1);
            let now = Instant::now();
            let mut out = SockOut::new(s);
            let ok = match s.client.lock() {
                Ok(mut c) => c.on_datagram(&buf[..n], now, &mut out, &mut done),
                Err(_) => return,
            };
            if !ok {
                add(&stats.dropped, 1);
            }
            for c in done.drain(..) {
                add(&stats.completed, 1);
                if c.status != BlockStatus::Ok {
                    add(&stats.errors, 1);
                }
                on_complete(c);
            }
        }
        let now = Instant::now();
        let (next, pending) = match s.client.lock() {
            Ok(mut c) => {
                let mut out = SockOut::new(s);
                if c.next_deadline().is_some_and(|d| d <= now) {
                    let fired = c.on_timer(now, &mut out, &mut done);
                    add(&stats.timeouts, fired);
                    add(&stats.resent, fired);
                }
                (c.next_deadline(), c.pending())
            }
            Err(_) => return,
        };
        for c in done.drain(..) {
            add(&stats.completed, 1);
            if c.status != BlockStatus::Ok {
                add(&stats.errors, 1);
            }
            on_complete(c);
        }
        if got {
            last_activity = now;
        }
        let submitted = s.epoch + Duration::from_nanos(s.last_submit.load(Ordering::Relaxed));
        if spins(
            now.duration_since(last_activity.max(submitted)),
            spin,
            pending,
        ) {
            // Yield, not a pause: the vCPU that shares the core gets it
            // back at once when it has work (the answer just completed,
            // the next request), and the thread spins on when it has none.
            std::thread::yield_now();
            continue;
        }
        if pending > SPIN_MAX_PENDING {
            add(&stats.deep_sleeps, 1);
        }
        let wait = next.map_or(Duration::from_millis(20), |d| {
            d.saturating_duration_since(now)
        });
        wait_readable(&s.sock, wait);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spins_only_at_depth_one_and_within_the_budget() {
        let spin = Duration::from_micros(200);
        let us = Duration::from_micros;
        // A lone request (or one just submitted): spin until the budget.
        assert!(spins(us(0), spin, 0));
        assert!(spins(us(199), spin, 1));
        assert!(!spins(us(200), spin, 1));
        // Deeper: sleep at once, however recent the last answer.
        assert!(!spins(us(0), spin, 2));
        assert!(!spins(us(0), spin, 32));
        // No budget: never.
        assert!(!spins(us(0), Duration::ZERO, 1));
    }

    /// A disk on loopback against a server that answers 8 writes one at a
    /// time, 5 ms apart (well within a 50 ms spin budget, and longer than
    /// a scheduler's slice on a loaded machine): the I/O thread sleeps
    /// between answers while more than one is in flight. Spinning at any
    /// depth, it would spin through every gap (each answer is activity)
    /// and never sleep.
    #[test]
    fn the_io_thread_sleeps_with_requests_in_flight() {
        const WRITES: usize = 8;
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let disk = BulkDisk::start(
            BulkConfig {
                server: addr,
                bind: Some(addr.ip()),
                ids: IDS,
                keys: None,
                live_keys: None,
                give_up: Duration::from_secs(10),
                spin: Duration::from_millis(50),
                loss: Default::default(),
            },
            Box::new(move |c| {
                let _ = tx.send(c.status);
            }),
        )
        .unwrap();
        let answering = std::thread::spawn(move || {
            let mut image = vec![0u8; 1 << 20];
            let mut partial = HashMap::new();
            let mut answers = Vec::new();
            let mut buf = [0u8; MAX_BULK_DATAGRAM];
            let mut from = None;
            while answers.len() < WRITES {
                let (n, peer) = server.recv_from(&mut buf).expect("the writes arrive");
                from = Some(peer);
                answers.extend(serve(&mut image, &mut partial, &buf[..n]));
            }
            for a in answers {
                server.send_to(&a, from.unwrap()).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        for i in 0..WRITES as u64 {
            disk.submit(i, BlockOp::Write, i * 8, 4096, vec![i as u8; 4096]);
        }
        for _ in 0..WRITES {
            let st = rx
                .recv_timeout(Duration::from_secs(5))
                .expect("a completion");
            assert_eq!(st, BlockStatus::Ok);
        }
        answering.join().unwrap();
        let deep = disk.stats().deep_sleeps.load(Ordering::Relaxed);
        assert!(
            deep > 0,
            "the I/O thread never slept with requests in flight"
        );
    }

    #[derive(Default)]
    struct Wire(Vec<Vec<u8>>);

    impl Outbox for Wire {
        fn send(&mut self, bytes: &[u8]) {
            self.0.push(bytes.to_vec());
        }
    }

    const IDS: BulkIds = BulkIds {
        client: 7,
        server: 1,
        model: 13,
        vm: 3,
        hypervisor: 1,
    };

    /// Answers a request datagram as a server would (`disk` is the disk).
    fn serve(disk: &mut [u8], partial: &mut HashMap<u64, Vec<u8>>, req: &[u8]) -> Vec<Vec<u8>> {
        let d = Bulk::parse(req).unwrap();
        let m = BlockMsg {
            op: d.op,
            status: BlockStatus::Ok,
            flags: 0,
            queue: 0,
            vm: d.vm(),
            hypervisor: 1,
            id: d.id(),
            sector: d.rec.sector.get(),
            len: d.rec.len.get(),
        };
        let mut h = Header::new(Kind::Response, 13, 1, 7);
        h.kind = bulk::KIND_BLOCK_ANSWER;
        let at = (m.sector * 512) as usize;
        let mut out = Vec::new();
        let mut put = |msg: &BlockMsg, seg, nseg, data: &[u8]| {
            let mut b = vec![0u8; MAX_BULK_DATAGRAM];
            let n = bulk::write(&mut b, h, msg, seg, nseg, data).unwrap();
            b.truncate(n);
            out.push(b);
        };
        match d.op {
            BlockOp::Read => {
                // In as many segments as the request names.
                let nseg = d.rec.nseg.get();
                for s in 0..nseg {
                    let (a, b) = bulk::seg_range(m.len, nseg, s);
                    put(&m, s, nseg, &disk[at + a..at + b]);
                }
            }
            BlockOp::Write => {
                let buf = partial
                    .entry(d.id())
                    .or_insert_with(|| vec![0; m.len as usize]);
                if d.rec.flags & BF_PROBE == 0 {
                    let (a, b) = bulk::seg_range(m.len, d.rec.nseg.get(), d.seg());
                    buf[a..b].copy_from_slice(d.data);
                }
                if d.seg() + 1 == d.rec.nseg.get() {
                    disk[at..at + m.len as usize].copy_from_slice(buf);
                    put(&m, 0, 1, &[]);
                }
            }
            _ => put(&m, 0, 1, &[]),
        }
        out
    }

    /// On a 1500-byte MTU (95 datagrams a way for 128 KiB) and on a
    /// jumbo link (39): every datagram within the link's MTU.
    #[test]
    fn writes_and_reads_round_trip_out_of_order() {
        for (mtu, segs) in [(1500, 95), (bulk::JUMBO_MTU, 39)] {
            round_trip_at(mtu, segs);
        }
    }

    fn round_trip_at(mtu: usize, segs: usize) {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        c.set_mtu(mtu);
        let mut disk = vec![0u8; 1 << 20];
        let mut partial = HashMap::new();
        let now = Instant::now();
        let mut w = Wire::default();
        let data: Vec<u8> = (0..131072u32).map(|i| (i % 253) as u8).collect();
        c.submit(1, BlockOp::Write, 8, 131072, data.clone(), now, &mut w);
        assert_eq!(w.0.len(), segs);
        assert!(w.0.iter().all(|d| d.len() + 28 <= mtu));
        let mut done = Vec::new();
        for req in std::mem::take(&mut w.0) {
            for a in serve(&mut disk, &mut partial, &req) {
                assert!(c.on_datagram(&a, now, &mut w, &mut done));
            }
        }
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, BlockStatus::Ok);
        c.submit(2, BlockOp::Read, 8, 131072, vec![], now, &mut w);
        let mut answers: Vec<Vec<u8>> = std::mem::take(&mut w.0)
            .iter()
            .flat_map(|r| serve(&mut disk, &mut partial, r))
            .collect();
        answers.reverse();
        assert_eq!(answers.len(), segs);
        assert!(answers.iter().all(|d| d.len() + 28 <= mtu));
        for a in &answers {
            c.on_datagram(a, now, &mut w, &mut done);
        }
        assert_eq!(done[1].token, 2);
        assert_eq!(done[1].data, data);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn lost_segments_are_found_by_probes_and_sent_again() {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        let now = Instant::now();
        let mut w = Wire::default();
        c.submit(1, BlockOp::Write, 0, 8192, vec![5; 8192], now, &mut w);
        let sent = std::mem::take(&mut w.0);
        assert_eq!(sent.len(), 6);
        // Nothing answered: the timer probes.
        let mut done = Vec::new();
        let t1 = now + RTO_MAX;
        assert_eq!(c.on_timer(t1, &mut w, &mut done), 1);
        let probe = std::mem::take(&mut w.0).remove(0);
        let probe = Bulk::parse(&probe).unwrap();
        assert_ne!(probe.rec.flags & BF_PROBE, 0);
        let probe_id = probe.id();
        // The server holds segments 0, 2 and 5: the client sends 1, 3, 4.
        let mut h = Header::new(Kind::Response, 13, 1, 7);
        h.kind = bulk::KIND_BLOCK_ANSWER;
        let m = BlockMsg {
            op: BlockOp::Write,
            status: BlockStatus::Partial,
            flags: 0,
            queue: 0,
            vm: 3,
            hypervisor: 1,
            id: probe_id,
            sector: 0,
            len: 8192,
        };
        let mut b = vec![0u8; MAX_BULK_DATAGRAM];
        let n = bulk::write(&mut b, h, &m, 0, 1, &[0b10_0101]).unwrap();
        assert!(c.on_datagram(&b[..n], t1, &mut w, &mut done));
        let segs: Vec<u16> = w.0.iter().map(|d| Bulk::parse(d).unwrap().seg()).collect();
        assert_eq!(segs, vec![1, 3, 4]);
        // Never answered: fails after the give-up time.
        let t2 = now + Duration::from_secs(11);
        c.on_timer(t2, &mut w, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, BlockStatus::IoError);
    }

    /// A status or bitmap answer to request `id` (no data).
    fn status(op: BlockOp, id: u64, len: u32, status: BlockStatus, bitmap: &[u8]) -> Vec<u8> {
        let mut h = Header::new(Kind::Response, 13, 1, 7);
        h.kind = bulk::KIND_BLOCK_ANSWER;
        let m = BlockMsg {
            op,
            status,
            flags: 0,
            queue: 0,
            vm: 3,
            hypervisor: 1,
            id,
            sector: 0,
            len,
        };
        let mut b = vec![0u8; MAX_BULK_DATAGRAM];
        let n = bulk::write(&mut b, h, &m, 0, 1, bitmap).unwrap();
        b.truncate(n);
        b
    }

    /// On a jumbo link a read's probe names its answer's 39 segments and
    /// the bitmap of those missing.
    #[test]
    fn a_read_probe_names_the_missing_jumbo_segments() {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        c.set_mtu(bulk::JUMBO_MTU);
        let mut disk = vec![3u8; 1 << 20];
        let mut w = Wire::default();
        let mut done = Vec::new();
        let now = Instant::now();
        c.submit(1, BlockOp::Read, 0, 128 << 10, vec![], now, &mut w);
        let all = answers(&mut disk, &mut w);
        assert_eq!(all.len(), 39);
        for a in &all {
            let seg = Bulk::parse(a).unwrap().seg();
            if seg != 3 && seg != 20 {
                assert!(c.on_datagram(a, now, &mut w, &mut done));
            }
        }
        let t = now + RTO_MAX;
        assert_eq!(c.on_timer(t, &mut w, &mut done), 1);
        let probe = std::mem::take(&mut w.0).remove(0);
        let p = Bulk::parse(&probe).unwrap();
        assert_ne!(p.rec.flags & BF_PROBE, 0);
        assert_eq!(p.rec.nseg.get(), 39);
        let missing = SegBitmap::from_bytes(39, p.data);
        assert_eq!(missing.missing().count(), 37);
        assert!(missing.has(3) && missing.has(20));
        for a in all
            .iter()
            .filter(|a| matches!(Bulk::parse(a).unwrap().seg(), 3 | 20))
        {
            assert!(c.on_datagram(a, t, &mut w, &mut done));
        }
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].data, vec![3u8; 128 << 10]);
    }

    /// A client on a jumbo link whose server's link takes 1500 bytes: a
    /// read answered `OutOfRange` for its segments is asked again in 95
    /// and later requests are cut for 1500 too; a write of which the
    /// server held nothing after a resend is cut again.
    #[test]
    fn a_server_whose_link_takes_less_gets_1500_byte_segments() {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        c.set_mtu(bulk::JUMBO_MTU);
        let mut w = Wire::default();
        let mut done = Vec::new();
        let now = Instant::now();
        // A write: its 39 jumbo segments never arrive; the probe does.
        c.submit(
            1,
            BlockOp::Write,
            0,
            128 << 10,
            vec![9; 128 << 10],
            now,
            &mut w,
        );
        assert_eq!(std::mem::take(&mut w.0).len(), 39);
        let t = now + RTO_MAX;
        c.on_timer(t, &mut w, &mut done);
        let probe = Bulk::parse(&std::mem::take(&mut w.0)[0]).unwrap().id();
        let none = status(
            BlockOp::Write,
            probe,
            128 << 10,
            BlockStatus::Partial,
            &[0; 5],
        );
        assert!(c.on_datagram(&none, t, &mut w, &mut done));
        let again: Vec<Bulk<'_>> = w.0.iter().map(|d| Bulk::parse(d).unwrap()).collect();
        assert_eq!(again.len(), 95, "cut again for a 1500-byte MTU");
        assert!(again.iter().all(|d| d.rec.nseg.get() == 95));
        assert_eq!(c.recut(), 1);
        w.0.clear();
        // A read answered OutOfRange for its 39 segments.
        c.submit(2, BlockOp::Read, 0, 128 << 10, vec![], t, &mut w);
        let sent = std::mem::take(&mut w.0);
        let r = Bulk::parse(&sent[0]).unwrap();
        assert_eq!(r.rec.nseg.get(), 39);
        let id = r.id();
        let oor = status(BlockOp::Read, id, 128 << 10, BlockStatus::OutOfRange, &[]);
        assert!(c.on_datagram(&oor, t, &mut w, &mut done));
        assert!(done.is_empty(), "not failed: asked again");
        let sent = std::mem::take(&mut w.0);
        let r = Bulk::parse(&sent[0]).unwrap();
        assert_eq!((r.id(), r.rec.nseg.get()), (id, 95));
        assert_eq!((c.recut(), c.seg_max()), (2, SEG_DATA));
        // Later requests use 1500-byte segments.
        c.submit(3, BlockOp::Read, 0, 4096, vec![], t, &mut w);
        let reqs = std::mem::take(&mut w.0);
        assert_eq!(Bulk::parse(&reqs[0]).unwrap().rec.nseg.get(), 3);
        // A real out-of-range read (already in 1500-byte segments) fails.
        let id3 = Bulk::parse(&reqs[0]).unwrap().id();
        let oor = status(BlockOp::Read, id3, 4096, BlockStatus::OutOfRange, &[]);
        assert!(c.on_datagram(&oor, t, &mut w, &mut done));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, BlockStatus::OutOfRange);
    }

    #[test]
    fn the_wire_holds_a_bounded_number_of_bytes() {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        let now = Instant::now();
        let mut w = Wire::default();
        for t in 0..64 {
            c.submit(t, BlockOp::Read, 0, 131072, vec![], now, &mut w);
        }
        assert_eq!(w.0.len(), MAX_BYTES_IN_FLIGHT / 131072);
        // A forged or foreign answer is dropped.
        let mut done = Vec::new();
        assert!(!c.on_datagram(&[0u8; 64], now, &mut w, &mut done));
    }

    /// Serves every request datagram in `w` from `disk`; the answers.
    fn answers(disk: &mut [u8], w: &mut Wire) -> Vec<Vec<u8>> {
        let mut partial = HashMap::new();
        std::mem::take(&mut w.0)
            .iter()
            .flat_map(|r| serve(disk, &mut partial, r))
            .collect()
    }

    /// Issue 19: at queue depth 1 without loss nothing is sent again,
    /// even when one answer is much later than the others (a host's
    /// scheduling hiccup): the timeout is the measured round trip and its
    /// variation, never below `RTO_MIN`.
    #[test]
    fn a_late_answer_at_queue_depth_one_is_not_sent_again() {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        let mut disk = vec![7u8; 1 << 20];
        let mut w = Wire::default();
        let mut done = Vec::new();
        let mut now = Instant::now();
        let mut fired = 0;
        for i in 0..200u64 {
            c.submit(i, BlockOp::Read, (i % 64) * 8, 4096, vec![], now, &mut w);
            let reqs = w.0.len();
            assert_eq!(reqs, 1, "one datagram per 4 KiB read");
            // Most answers in 200 us; every 50th 30 ms late (a polling
            // thread descheduled on a loaded host).
            let rtt = if i % 50 == 49 {
                Duration::from_millis(30)
            } else {
                Duration::from_micros(200)
            };
            let mut t = now;
            while t < now + rtt {
                fired += c.on_timer(t, &mut w, &mut done);
                t += Duration::from_micros(100);
            }
            now += rtt;
            for a in answers(&mut disk, &mut w) {
                assert!(c.on_datagram(&a, now, &mut w, &mut done));
            }
            assert!(w.0.is_empty(), "request {i}: something was sent again");
            now += Duration::from_micros(20);
        }
        assert_eq!(fired, 0, "timers fired without loss at queue depth 1");
        assert_eq!(done.len(), 200);
        assert!(done.iter().all(|d| d.status == BlockStatus::Ok));
        let srtt = c.rtt().srtt().unwrap();
        assert!(srtt < Duration::from_millis(5), "{srtt:?}");
    }

    /// A deep queue of large reads: the last one is answered after those
    /// ahead of it, and its timeout allows for them.
    #[test]
    fn a_deep_queue_is_given_time_for_the_requests_ahead() {
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        let mut disk = vec![7u8; 8 << 20];
        let mut w = Wire::default();
        let mut done = Vec::new();
        let mut now = Instant::now();
        // A measured round trip of 200 us first.
        for i in 0..20u64 {
            c.submit(i, BlockOp::Read, 0, 4096, vec![], now, &mut w);
            now += Duration::from_micros(200);
            for a in answers(&mut disk, &mut w) {
                c.on_datagram(&a, now, &mut w, &mut done);
            }
        }
        // 25 reads of 128 KiB at once: 3.2 MiB, answered at 200 MB/s,
        // the last after some 16 ms.
        for i in 0..25u64 {
            c.submit(
                100 + i,
                BlockOp::Read,
                i * 256,
                128 << 10,
                vec![],
                now,
                &mut w,
            );
        }
        assert_eq!(w.0.len(), 25);
        let all = answers(&mut disk, &mut w);
        let per = Duration::from_nanos(1_000_000_000 / 200 * 1392 / 1_000_000);
        let mut fired = 0;
        for a in &all {
            now += per;
            fired += c.on_timer(now, &mut w, &mut done);
            assert!(c.on_datagram(a, now, &mut w, &mut done));
        }
        assert!(per * all.len() as u32 > Duration::from_millis(15));
        assert_eq!(
            fired, 0,
            "a request was sent again while its answer was queued"
        );
        assert!(w.0.is_empty());
        assert_eq!(done.len(), 45);
    }

    #[test]
    fn the_estimate_follows_rfc_6298() {
        let mut r = RttEstimator::default();
        assert_eq!(r.rto(Duration::ZERO), RTO_INITIAL);
        r.sample(Duration::from_millis(20));
        // srtt 20 ms, rttvar 10 ms: 60 ms.
        assert_eq!(r.rto(Duration::ZERO), Duration::from_millis(60));
        for _ in 0..100 {
            r.sample(Duration::from_micros(100));
        }
        assert_eq!(r.rto(Duration::ZERO), RTO_MIN);
        assert_eq!(r.rto(Duration::from_millis(5)), RTO_MIN);
        assert!(r.rto(Duration::from_millis(60)) >= Duration::from_millis(60));
        assert_eq!(r.rto(Duration::from_secs(1)), RTO_MAX);
    }

    /// A socket's [`Shared`] state, connected to a receiver on loopback.
    fn shared_to(rx: &UdpSocket) -> Shared {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(rx.local_addr().unwrap()).unwrap();
        Shared {
            sock,
            client: Mutex::new(BulkClient::new(IDS, None, Duration::from_secs(1))),
            stop: AtomicBool::new(false),
            stats: Arc::default(),
            loss: crate::engine::Loss::default(),
            rng: AtomicU64::new(1),
            gso: AtomicBool::new(true),
            last_submit: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    /// How a test hands the outbox its datagrams.
    #[derive(Clone, Copy, Debug)]
    enum Via {
        /// `send`, a copy.
        Send,
        /// `send_with`, written in place, told the exact length.
        Exact,
        /// `send_with`, told 40 bytes more than it writes.
        Shorter,
    }

    /// Datagrams batched for GSO arrive exactly as sent one by one: the
    /// same sizes, bytes and order, across runs of one size cut by a
    /// shorter datagram, a larger one, and the batch limits; with GSO
    /// off too; handed over as a copy or written in place (where a
    /// datagram the writer refuses is not sent, and a datagram written
    /// shorter than announced is sent at its length).
    #[test]
    fn gso_batches_arrive_as_the_datagrams_sent() {
        for via in [Via::Send, Via::Exact, Via::Shorter] {
            gso_batches_via(via);
        }
    }

    fn gso_batches_via(via: Via) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        // Room for every datagram at once (as root; else the system's
        // limit, ~200 KiB, which they fit too).
        set_buffer(&rx, libc::SO_RCVBUFFORCE, libc::SO_RCVBUF, 4 << 20);
        let mut sizes = vec![1472; 5];
        sizes.extend([800, 1472, 1472, 100, 1472, 60, 60, 1472]);
        sizes.extend(vec![1472; GSO_MAX_SEGS + 3]);
        let sent: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (0..n).map(|b| (i * 7 + b) as u8).collect())
            .collect();
        for gso in [true, false] {
            let shared = shared_to(&rx);
            shared.gso.store(gso, Ordering::Relaxed);
            {
                let mut out = SockOut::new(&shared);
                for d in &sent {
                    let fill = &mut |b: &mut [u8]| {
                        b[..d.len()].copy_from_slice(d);
                        Some(d.len())
                    };
                    match via {
                        Via::Send => out.send(d),
                        Via::Exact => out.send_with(d.len(), fill),
                        Via::Shorter => {
                            // A refused one in between changes nothing.
                            out.send_with(d.len(), &mut |_| None);
                            out.send_with(d.len() + 40, fill)
                        }
                    }
                }
            }
            let mut buf = [0u8; 2048];
            for (i, d) in sent.iter().enumerate() {
                let n = rx.recv(&mut buf).expect("every datagram arrives");
                assert_eq!(&buf[..n], &d[..], "datagram {i} (gso {gso}, {via:?})");
            }
            rx.set_nonblocking(true).unwrap();
            assert!(rx.recv(&mut buf).is_err(), "nothing more ({via:?})");
            rx.set_nonblocking(false).unwrap();
            let st = &shared.stats;
            assert_eq!(st.sent.load(Ordering::Relaxed), sent.len() as u64);
            let (dgrams, calls) = (
                st.gso_datagrams.load(Ordering::Relaxed),
                st.gso_sends.load(Ordering::Relaxed),
            );
            if gso && matches!(via, Via::Shorter) {
                // Room asked for beyond the run's size ends the run: most
                // go alone (not judged further; `emit` asks exactly).
                assert!(dgrams < 10, "{dgrams} datagrams in {calls} GSO sends");
            } else if gso {
                assert!(
                    dgrams > 50 && calls < 12,
                    "{dgrams} datagrams in {calls} GSO sends"
                );
            } else {
                assert_eq!((dgrams, calls), (0, 0));
            }
        }
    }

    /// Issue 19: a bulk disk following the engine's keys seals with the
    /// new key after a rotation (first sends and resends), accepts
    /// answers under the new and the previous key, and refuses others.
    #[test]
    fn bulk_requests_follow_a_key_rotation() {
        use devplane_wire::tag::TagKey;
        let k1 = TagKey::new(1, [1; 16]);
        let k2 = TagKey::new(2, [2; 16]);
        let mut ring = KeyRing::new(k1.clone());
        let live = LiveKeys::new(Some(ring.clone()));
        let mut c = BulkClient::new(IDS, None, Duration::from_secs(10));
        c.follow_keys(live.clone());
        let mut disk = vec![9u8; 1 << 20];
        let mut w = Wire::default();
        let mut done = Vec::new();
        let now = Instant::now();
        let key_of = |d: &[u8]| Bulk::parse(d).unwrap().key_id();
        // Answers sealed with `key` by a server.
        let sealed = |disk: &mut [u8], w: &mut Wire, key: &TagKey| -> Vec<Vec<u8>> {
            answers(disk, w)
                .into_iter()
                .map(|mut a| {
                    let n = a.len();
                    a.resize(n + 64, 0);
                    let m = tag::seal(&mut a, n, key).unwrap();
                    a.truncate(m);
                    a
                })
                .collect()
        };
        c.submit(1, BlockOp::Read, 0, 4096, vec![], now, &mut w);
        assert_eq!(key_of(&w.0[0]), Some(1));
        assert!(tag::verify(&w.0[0], &ring).is_ok());
        for a in sealed(&mut disk, &mut w, &k1) {
            assert!(c.on_datagram(&a, now, &mut w, &mut done));
        }
        assert_eq!(done.len(), 1);
        // The daemon rotates the client's key.
        ring.rotate(k2.clone());
        live.set(Some(ring));
        c.submit(2, BlockOp::Write, 8, 4096, vec![3; 4096], now, &mut w);
        assert_eq!(key_of(&w.0[0]), Some(2));
        assert!(tag::verify(&w.0[0], &KeyRing::new(k2)).is_ok());
        // Lost: the resend carries the new key too.
        let t = now + RTO_MAX;
        w.0.clear();
        assert_eq!(c.on_timer(t, &mut w, &mut done), 1);
        assert_eq!(key_of(&w.0[0]), Some(2));
        // An answer under the previous key (sent before the server
        // rotated) is still accepted.
        for a in sealed(&mut disk, &mut w, &k1) {
            assert!(c.on_datagram(&a, t, &mut w, &mut done));
        }
        assert_eq!(done.len(), 2);
        // One under a key the client never had is refused.
        let k3 = TagKey::new(3, [3; 16]);
        c.submit(3, BlockOp::Read, 0, 4096, vec![], t, &mut w);
        for a in sealed(&mut disk, &mut w, &k3) {
            assert!(!c.on_datagram(&a, t, &mut w, &mut done));
        }
        assert_eq!(done.len(), 2);
    }
}
