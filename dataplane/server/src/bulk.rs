//! A worker's bulk engine: block requests ([`devplane_wire::bulk`]) to
//! the disk models it owns, served asynchronously.
//!
//! A block request arrives in one or more datagrams (a write carries its
//! data in segments); the engine reassembles it within a memory budget
//! ([`Reassembly`]), checks its (client, VM) window so that it is applied
//! exactly once ([`BlockWindow`]), and submits it to the model's
//! [`BlockDevice`] without waiting. Each turn of the worker's loop
//! [`BulkEngine::poll`]s the devices and turns every completion into its
//! answer datagrams (a read's data in segments), queued for the worker to
//! send to where the request came from. A retransmitted segment of a
//! write in flight is ignored, of a write done is answered again (not
//! applied again); a probe of a write being reassembled is answered with
//! the bitmap of the segments held, so that the client sends only the
//! missing ones; a read's probe names the answer segments the client
//! still misses, and only those are sent again.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use devplane_devmodels::blockio::{BlockDone, BlockReq};
use devplane_wire::bulk::{
    self, BF_PROBE, BlockMsg, BlockOp, BlockStatus, Bulk, KIND_BLOCK_ANSWER, MAX_BULK_DATAGRAM,
    MAX_SEGS, SEG_DATA_MAX,
};
use devplane_wire::bulk_state::{BlockWindow, Put, Reassembly, Seen, SegBitmap};
use devplane_wire::tag::TagKey;
use devplane_wire::{Header, Kind};

use crate::dispatch::ModelSlot;

/// Bytes of write data a worker holds in reassembly at most.
pub const REASSEMBLY_BUDGET: usize = 64 << 20;
/// Requests a worker reassembles at once at most.
pub const MAX_PARTIALS: usize = 4096;
/// Bytes of write data one client holds in a worker's reassembly at
/// most: a quarter of [`REASSEMBLY_BUDGET`], four VMs' worth of a
/// client's writes in flight (`MAX_BYTES_IN_FLIGHT` of the client's
/// bulk disks). A client that starts writes and never finishes them
/// fills its own share, not the others' room: it takes four such
/// clients to fill the budget.
pub const REASSEMBLY_CLIENT_SHARE: usize = REASSEMBLY_BUDGET / 4;
/// Requests one client reassembles at once at most in a worker.
pub const MAX_CLIENT_PARTIALS: usize = MAX_PARTIALS / 4;
/// (client, VM) windows of block requests a worker keeps at most.
pub const MAX_BULK_WINDOWS: usize = 4096;
/// A write whose segments stop arriving for this long is dropped.
pub const REASSEMBLY_TIMEOUT_NS: u64 = 5_000_000_000;
/// Answer datagrams queued at most (beyond, completions wait on their
/// disks). A read's answer segments are counted here but made one at a
/// time as they go out ([`BulkEngine::front`]): what waits is the data
/// read, once, not a datagram buffer per segment.
pub const MAX_OUT: usize = 16_384;

/// Counters of a worker's bulk engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BulkStats {
    /// Block-request datagrams taken.
    pub datagrams: u64,
    /// Requests submitted to a disk (reads may be served again).
    pub submitted: u64,
    /// Of those, requests that change the disk (writes, flushes,
    /// discards): each is applied once.
    pub applied: u64,
    /// Requests completed (answered).
    pub completed: u64,
    /// Retransmitted segments or requests of requests in flight or done
    /// (not applied again).
    pub duplicates: u64,
    /// Segments dropped because reassembly was full (or the client's
    /// share of it, [`REASSEMBLY_CLIENT_SHARE`]).
    pub no_room: u64,
    /// Segments dropped because they do not fit their request (a length
    /// other than its first segment's, or a segment of the wrong size).
    pub bad_segments: u64,
    /// Partly reassembled writes dropped after their timeout.
    pub expired: u64,
    /// Requests older than their window (answered `Stale`).
    pub stale: u64,
    /// Requests to a model that is no disk (answered `Unsupported`).
    pub unsupported: u64,
    /// Answer datagrams made.
    pub answers: u64,
    /// Requests refused because a window limit was hit (answered `Busy`).
    pub window_limit: u64,
    /// Reads asking for answer segments larger than this server's link
    /// takes (answered `OutOfRange`: the two ends' MTUs disagree).
    pub too_big: u64,
}

/// The next answer datagram to send ([`BulkEngine::front`]).
pub struct OutDatagram<'a> {
    /// The client it goes to.
    pub client: u32,
    /// Its VM (where that VM's block requests came from).
    pub vm: u32,
    /// The datagram.
    pub bytes: &'a [u8],
}

/// An answer waiting to be sent.
enum Queued {
    /// One datagram, made (a status or a bitmap: small).
    Ready {
        client: u32,
        vm: u32,
        bytes: Vec<u8>,
    },
    /// A read's data, its segments in `mask` made one by one from
    /// segment `next` on.
    Read(ReadOut),
}

struct ReadOut {
    client: u32,
    model: u32,
    msg: BlockMsg,
    data: Vec<u8>,
    mask: SegBitmap,
    next: u16,
    key: Option<TagKey>,
}

impl ReadOut {
    /// Moves `next` to the first segment still to send, if any.
    fn advance(&mut self) -> bool {
        while self.next < self.mask.nseg() && !self.mask.has(self.next) {
            self.next += 1;
        }
        self.next < self.mask.nseg()
    }
}

/// A request submitted to a disk.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    client: u32,
    model: u32,
    msg: BlockMsg,
    /// A read's answer segments (as many as its request named) and those
    /// to send (all, or those a probe named).
    mask: Option<SegBitmap>,
}

/// Requests waiting for room on their disk.
struct Waiting {
    model: u32,
    req: BlockReq,
}

/// A worker's bulk engine.
pub struct BulkEngine {
    server: u32,
    reasm: Reassembly<(u32, u32, u64)>,
    windows: HashMap<(u32, u32), BlockWindow>,
    inflight: HashMap<u64, InFlight>,
    waiting: VecDeque<Waiting>,
    next_tag: u64,
    out: VecDeque<Queued>,
    /// Answer datagrams in `out` (a read's segments counted one by one).
    out_datagrams: usize,
    /// The datagram [`BulkEngine::front`] made of a read's segment, and
    /// whether it is the front's current one.
    scratch: Box<[u8; MAX_BULK_DATAGRAM]>,
    scratch_len: Option<usize>,
    done: Vec<BlockDone>,
    epoch: Instant,
    stats: BulkStats,
    /// Most data bytes per answer datagram this server's link takes.
    seg_max: usize,
}

impl BulkEngine {
    /// An engine for server `server`, whose link takes answer datagrams
    /// of up to [`SEG_DATA_MAX`] data bytes (see [`BulkEngine::set_mtu`]).
    pub fn new(server: u32) -> BulkEngine {
        BulkEngine {
            seg_max: SEG_DATA_MAX,
            server,
            reasm: Reassembly::with_shares(
                REASSEMBLY_BUDGET,
                MAX_PARTIALS,
                (REASSEMBLY_CLIENT_SHARE, MAX_CLIENT_PARTIALS),
                |&(client, _, _)| client,
            ),
            windows: HashMap::new(),
            inflight: HashMap::new(),
            waiting: VecDeque::new(),
            next_tag: 1,
            out: VecDeque::new(),
            out_datagrams: 0,
            scratch: Box::new([0u8; MAX_BULK_DATAGRAM]),
            scratch_len: None,
            done: Vec::new(),
            epoch: Instant::now(),
            stats: BulkStats::default(),
        }
    }

    /// The MTU of the server's link: reads asking for answer segments
    /// larger than it takes are refused (`OutOfRange`, counted in
    /// `too_big`) rather than sent to be dropped on the way.
    pub fn set_mtu(&mut self, mtu: usize) {
        self.seg_max = bulk::seg_max_for_mtu(mtu);
    }

    /// Its counters.
    pub fn stats(&self) -> BulkStats {
        self.stats
    }

    /// Whether requests are in flight or answers wait to be sent (the
    /// worker keeps polling).
    pub fn busy(&self) -> bool {
        !self.inflight.is_empty() || !self.out.is_empty() || !self.reasm.is_empty()
    }

    /// Whether block requests are submitted to their models' disks and
    /// not completed (the worker's wait for them is I/O, not network).
    pub fn io_in_flight(&self) -> bool {
        !self.inflight.is_empty()
    }

    /// The next answer datagram to send (a read's next segment is made
    /// now, sealed, into a buffer of the engine's).
    pub fn front(&mut self) -> Option<OutDatagram<'_>> {
        // Settle the front first: drop reads whose segments all went,
        // make the current segment of a read.
        loop {
            let server = self.server;
            let Queued::Read(r) = self.out.front_mut()? else {
                break;
            };
            if !r.advance() {
                self.out.pop_front();
                self.scratch_len = None;
                continue;
            }
            if self.scratch_len.is_some() {
                break;
            }
            let nseg = r.mask.nseg();
            let (a, b) = bulk::seg_range(r.msg.len, nseg, r.next);
            let data = r.data.get(a..b.min(r.data.len())).unwrap_or(&[]);
            let made = make_answer(
                &mut self.scratch[..],
                server,
                r.model,
                r.client,
                &r.msg,
                (r.next, nseg),
                data,
                r.key.as_ref(),
            );
            match made {
                Some(n) => {
                    self.stats.answers += 1;
                    self.scratch_len = Some(n);
                    break;
                }
                None => {
                    // Cannot happen (segments fit by construction): skip
                    // the segment rather than stall.
                    r.next += 1;
                    self.out_datagrams = self.out_datagrams.saturating_sub(1);
                }
            }
        }
        match self.out.front()? {
            Queued::Ready { client, vm, bytes } => Some(OutDatagram {
                client: *client,
                vm: *vm,
                bytes,
            }),
            Queued::Read(r) => Some(OutDatagram {
                client: r.client,
                vm: r.msg.vm,
                bytes: &self.scratch[..self.scratch_len.unwrap_or(0)],
            }),
        }
    }

    /// The front answer was sent (or given up).
    pub fn pop(&mut self) {
        self.scratch_len = None;
        self.out_datagrams = self.out_datagrams.saturating_sub(1);
        match self.out.front_mut() {
            Some(Queued::Read(r)) => {
                r.next += 1;
                if !r.advance() {
                    self.out.pop_front();
                }
            }
            Some(Queued::Ready { .. }) => {
                self.out.pop_front();
            }
            None => {}
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Queues one answer datagram for `msg`'s request, sealed with `key`.
    fn answer(
        &mut self,
        client: u32,
        model: u32,
        msg: &BlockMsg,
        seg: (u16, u16),
        data: &[u8],
        key: Option<&TagKey>,
    ) {
        let mut bytes = vec![0u8; bulk::MIN_BULK + data.len() + devplane_wire::TAG_LEN];
        let Some(n) = make_answer(&mut bytes, self.server, model, client, msg, seg, data, key)
        else {
            return;
        };
        bytes.truncate(n);
        self.stats.answers += 1;
        self.out_datagrams += 1;
        self.out.push_back(Queued::Ready {
            client,
            vm: msg.vm,
            bytes,
        });
    }

    fn status_answer(
        &mut self,
        client: u32,
        model: u32,
        msg: &BlockMsg,
        status: BlockStatus,
        key: Option<&TagKey>,
    ) {
        let m = BlockMsg { status, ..*msg };
        self.answer(client, model, &m, (0, 1), &[], key);
    }

    /// Takes one block-request datagram `d` (parsed, its tag verified and
    /// its VM checked against its client by the caller).
    pub fn handle(
        &mut self,
        d: &Bulk<'_>,
        models: &mut HashMap<u32, ModelSlot>,
        key: Option<&TagKey>,
    ) {
        self.stats.datagrams += 1;
        let (client, model, id, vm) = (d.client(), d.model(), d.id(), d.vm());
        let r = d.rec;
        let msg = BlockMsg {
            op: d.op,
            status: BlockStatus::Ok,
            flags: r.flags,
            queue: r.queue.get(),
            vm,
            hypervisor: r.hypervisor.get(),
            id,
            sector: r.sector.get(),
            len: r.len.get(),
        };
        let probe = r.flags & BF_PROBE != 0;
        let Some(slot) = models.get_mut(&model) else {
            return;
        };
        if slot.model.block().is_none() {
            self.stats.unsupported += 1;
            self.status_answer(client, model, &msg, BlockStatus::Unsupported, key);
            return;
        }
        if !self.windows.contains_key(&(client, vm)) && self.windows.len() >= MAX_BULK_WINDOWS {
            self.stats.window_limit += 1;
            self.status_answer(client, model, &msg, BlockStatus::Busy, key);
            return;
        }
        let seen = self.windows.entry((client, vm)).or_default().lookup(id);
        if d.op == BlockOp::Read {
            // Reads change nothing: served again whenever asked, unless
            // one is in flight.
            if seen == Seen::InFlight {
                self.stats.duplicates += 1;
                return;
            }
            // The client named the answer's segments (checked in range by
            // the parser); this link must take them.
            let nseg = r.nseg.get();
            if bulk::seg_size(msg.len, nseg) > self.seg_max {
                self.stats.too_big += 1;
                self.status_answer(client, model, &msg, BlockStatus::OutOfRange, key);
                return;
            }
            // A probe names the answer segments the client misses.
            let mask = if probe {
                SegBitmap::from_bytes(nseg, d.data)
            } else {
                SegBitmap::full(nseg)
            };
            self.start(client, model, msg, Some(mask), Vec::new(), models);
            return;
        }
        match seen {
            Seen::Done(s) => {
                self.stats.duplicates += 1;
                let status = BlockStatus::from_u8(s).unwrap_or(BlockStatus::IoError);
                self.status_answer(client, model, &msg, status, key);
            }
            Seen::InFlight => {
                self.stats.duplicates += 1;
                if probe {
                    // Everything arrived; the I/O is under way. (The
                    // probe names no segment count of the write: the
                    // most it can have, every one held.)
                    let all = SegBitmap::full(bulk::segments(msg.len));
                    self.bitmap_answer(client, model, &msg, all, key);
                }
            }
            Seen::Stale => {
                self.stats.stale += 1;
                self.status_answer(client, model, &msg, BlockStatus::Stale, key);
            }
            Seen::New if probe => {
                let nseg = bulk::segments(msg.len);
                let have = self
                    .reasm
                    .have(&(client, vm, id))
                    .unwrap_or(SegBitmap::new(nseg));
                self.bitmap_answer(client, model, &msg, have, key);
            }
            Seen::New if d.op.request_has_data() => {
                let now = self.now();
                match self.reasm.put(
                    (client, vm, id),
                    msg.len,
                    r.nseg.get(),
                    d.seg(),
                    d.data,
                    now,
                ) {
                    Put::Complete(data) => self.start(client, model, msg, None, data, models),
                    Put::Held => {}
                    Put::Duplicate => self.stats.duplicates += 1,
                    Put::NoRoom => self.stats.no_room += 1,
                    Put::Bad => self.stats.bad_segments += 1,
                }
            }
            Seen::New => self.start(client, model, msg, None, Vec::new(), models),
        }
    }

    fn bitmap_answer(
        &mut self,
        client: u32,
        model: u32,
        msg: &BlockMsg,
        have: SegBitmap,
        key: Option<&TagKey>,
    ) {
        let mut bytes = [0u8; MAX_SEGS.div_ceil(8)];
        let n = have.to_bytes(&mut bytes);
        let m = BlockMsg {
            status: BlockStatus::Partial,
            ..*msg
        };
        self.answer(client, model, &m, (0, 1), &bytes[..n], key);
    }

    /// Submits a whole request to its disk.
    fn start(
        &mut self,
        client: u32,
        model: u32,
        msg: BlockMsg,
        mask: Option<SegBitmap>,
        data: Vec<u8>,
        models: &mut HashMap<u32, ModelSlot>,
    ) {
        let window = self.windows.entry((client, msg.vm)).or_default();
        if !window.start(msg.id) {
            self.stats.window_limit += 1;
            return; // the client retransmits
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        self.inflight.insert(
            tag,
            InFlight {
                client,
                model,
                msg,
                mask,
            },
        );
        let req = BlockReq {
            tag,
            op: msg.op,
            offset: msg.sector.saturating_mul(bulk::SECTOR),
            len: if msg.op == BlockOp::Flush { 0 } else { msg.len },
            data,
        };
        self.stats.submitted += 1;
        if msg.op != BlockOp::Read {
            self.stats.applied += 1;
        }
        self.submit(model, req, models);
    }

    fn submit(&mut self, model: u32, req: BlockReq, models: &mut HashMap<u32, ModelSlot>) {
        let dev = models.get_mut(&model).and_then(|s| s.model.block());
        match dev {
            Some(dev) => {
                if let Err(req) = dev.submit(req) {
                    self.waiting.push_back(Waiting { model, req });
                }
            }
            None => {
                // The model went away (moved): the client retransmits to
                // its new owner.
                if let Some(f) = self.inflight.remove(&req.tag) {
                    if let Some(w) = self.windows.get_mut(&(f.client, f.msg.vm)) {
                        w.forget(f.msg.id);
                    }
                }
            }
        }
    }

    /// Collects completions from every disk with requests in flight and
    /// queues their answers; retries requests that waited for room;
    /// drops writes whose segments stopped coming. `key_of` gives the
    /// key a client's answers are sealed with.
    pub fn poll<'k>(
        &mut self,
        models: &mut HashMap<u32, ModelSlot>,
        key_of: &dyn Fn(u32) -> Option<&'k TagKey>,
    ) {
        if !self.reasm.is_empty() {
            let now = self.now();
            let cut = now.saturating_sub(REASSEMBLY_TIMEOUT_NS);
            self.stats.expired += self.reasm.expire(cut) as u64;
        }
        if self.inflight.is_empty() || self.out_datagrams >= MAX_OUT {
            return;
        }
        let mut done = std::mem::take(&mut self.done);
        let mut ids: Vec<u32> = self.inflight.values().map(|f| f.model).collect();
        ids.sort_unstable();
        ids.dedup();
        for id in ids {
            if let Some(dev) = models.get_mut(&id).and_then(|s| s.model.block()) {
                dev.poll(&mut done);
            }
        }
        for c in done.drain(..) {
            self.complete(c, key_of);
        }
        self.done = done;
        for _ in 0..self.waiting.len() {
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            self.submit(w.model, w.req, models);
        }
    }

    fn complete<'k>(&mut self, c: BlockDone, key_of: &dyn Fn(u32) -> Option<&'k TagKey>) {
        let Some(f) = self.inflight.remove(&c.tag) else {
            return;
        };
        self.stats.completed += 1;
        if let Some(w) = self.windows.get_mut(&(f.client, f.msg.vm)) {
            w.finish(f.msg.id, c.status as u8);
        }
        let key = key_of(f.client);
        let msg = BlockMsg {
            status: c.status,
            ..f.msg
        };
        if c.op != BlockOp::Read || c.status != BlockStatus::Ok {
            self.answer(f.client, f.model, &msg, (0, 1), &[], key);
            return;
        }
        // A read always has its mask: the answer's segments.
        let mask = f.mask.unwrap_or(SegBitmap::full(bulk::segments(msg.len)));
        // Its segments are made as they go out (`front`).
        self.out_datagrams += mask.held() as usize;
        self.out.push_back(Queued::Read(ReadOut {
            client: f.client,
            model: f.model,
            msg,
            data: c.data,
            mask,
            next: 0,
            key: key.cloned(),
        }));
    }
}

/// Writes answer datagram `seg` (of `nseg`) of `msg`'s request, from
/// `server` and `model` to `client`, with `data`, sealed with `key`, into
/// `buf`; its length.
#[allow(clippy::too_many_arguments)]
fn make_answer(
    buf: &mut [u8],
    server: u32,
    model: u32,
    client: u32,
    msg: &BlockMsg,
    (seg, nseg): (u16, u16),
    data: &[u8],
    key: Option<&TagKey>,
) -> Option<usize> {
    let mut h = Header::new(Kind::Response, model, server, client);
    h.kind = KIND_BLOCK_ANSWER;
    let m = BlockMsg { flags: 0, ..*msg };
    let len = bulk::write(buf, h, &m, seg, nseg, data)?;
    match key {
        Some(k) => devplane_wire::tag::seal(buf, len, k),
        None => Some(len),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_devmodels::registry::{self, ModelParams};

    struct Img(std::path::PathBuf);
    impl Drop for Img {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn rig(tag: &str) -> (BulkEngine, HashMap<u32, ModelSlot>, Img) {
        let p = std::env::temp_dir().join(format!("dp-bulk-{tag}-{}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let m = registry::build(
            "blockstore",
            ModelParams {
                backing: Some(p.clone()),
                ..Default::default()
            },
        )
        .unwrap();
        let mut models = HashMap::new();
        models.insert(13, ModelSlot::new(m, 0, 0));
        (BulkEngine::new(1), models, Img(p))
    }

    fn req(op: BlockOp, id: u64, len: u32, flags: u8, seg: u16, data: &[u8]) -> Vec<u8> {
        req_from(7, op, id, len, flags, seg, data)
    }

    fn req_from(
        client: u32,
        op: BlockOp,
        id: u64,
        len: u32,
        flags: u8,
        seg: u16,
        data: &[u8],
    ) -> Vec<u8> {
        // Writes' data and reads' answers in segments of a 1500-byte MTU.
        let nseg = if (op == BlockOp::Write && flags & BF_PROBE == 0) || op == BlockOp::Read {
            bulk::segments(len)
        } else {
            1
        };
        req_n(client, op, id, len, flags, (seg, nseg), data)
    }

    fn req_n(
        client: u32,
        op: BlockOp,
        id: u64,
        len: u32,
        flags: u8,
        (seg, nseg): (u16, u16),
        data: &[u8],
    ) -> Vec<u8> {
        let mut b = vec![0u8; MAX_BULK_DATAGRAM];
        let mut h = Header::new(Kind::Request, 13, 1, client);
        h.kind = bulk::KIND_BLOCK_REQUEST;
        let m = BlockMsg {
            op,
            status: BlockStatus::Ok,
            flags,
            queue: 0,
            vm: 3,
            hypervisor: 1,
            id,
            sector: 16,
            len,
        };
        let n = bulk::write(&mut b, h, &m, seg, nseg, data).unwrap();
        b.truncate(n);
        b
    }

    fn run(e: &mut BulkEngine, models: &mut HashMap<u32, ModelSlot>) -> Vec<Vec<u8>> {
        let t0 = Instant::now();
        while !e.inflight.is_empty() {
            e.poll(models, &|_| None);
            assert!(t0.elapsed().as_secs() < 10);
        }
        let mut out = Vec::new();
        while let Some(o) = e.front() {
            out.push(o.bytes.to_vec());
            e.pop();
        }
        out
    }

    /// The data of a read's answer datagrams `out`, put back together.
    fn read_back(out: &[Vec<u8>], len: u32) -> Vec<u8> {
        let mut back = vec![0u8; len as usize];
        for o in out {
            let a = Bulk::parse(o).unwrap();
            let (at, end) = bulk::seg_range(len, a.rec.nseg.get(), a.seg());
            back[at..end].copy_from_slice(a.data);
        }
        back
    }

    fn feed(e: &mut BulkEngine, models: &mut HashMap<u32, ModelSlot>, b: &[u8]) {
        let d = Bulk::parse(b).unwrap();
        e.handle(&d, models, None);
    }

    /// A write still being reassembled keeps the engine busy with no I/O
    /// in flight (the worker does not yield for the network); once whole
    /// it is I/O in flight until its completion is taken.
    #[test]
    fn io_in_flight_is_the_submitted_requests_only() {
        let (mut e, mut models, _img) = rig("iof");
        let data = vec![7u8; 8192];
        let nseg = bulk::segments(8192);
        let seg = |s: u16| {
            let (a, b) = bulk::seg_range(8192, nseg, s);
            req(BlockOp::Write, 5, 8192, 0, s, &data[a..b])
        };
        assert!(!e.busy() && !e.io_in_flight());
        feed(&mut e, &mut models, &seg(0));
        assert!(e.busy() && !e.io_in_flight());
        for s in 1..nseg {
            feed(&mut e, &mut models, &seg(s));
        }
        assert!(e.io_in_flight());
        let out = run(&mut e, &mut models);
        assert_eq!(out.len(), 1);
        assert!(!e.io_in_flight() && !e.busy());
    }

    /// One client starting 1 MiB writes and never finishing them (one
    /// segment each) fills its own share of reassembly, not the room of
    /// the others: another client's write still goes through. Segments
    /// that do not fit their request are counted.
    #[test]
    fn a_client_that_never_finishes_its_writes_does_not_starve_another() {
        let (mut e, mut models, _img) = rig("share");
        let len = bulk::MAX_BLOCK_LEN;
        let seg = vec![0xa5u8; bulk::seg_len(len, bulk::segments(len), 0)];
        for id in 1..=(REASSEMBLY_BUDGET / len as usize) as u64 {
            feed(
                &mut e,
                &mut models,
                &req_from(66, BlockOp::Write, id, len, 0, 0, &seg),
            );
        }
        assert_eq!(
            e.reasm.owned(66).0,
            REASSEMBLY_CLIENT_SHARE,
            "its share, no more"
        );
        assert!(e.stats.no_room > 0);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        for s in 0..bulk::segments(4096) {
            let (a, b) = bulk::seg_range(4096, bulk::segments(4096), s);
            feed(
                &mut e,
                &mut models,
                &req(BlockOp::Write, 500, 4096, 0, s, &data[a..b]),
            );
        }
        run(&mut e, &mut models);
        assert_eq!(e.stats.applied, 1, "the other client's write went through");
        // A segment claiming another length than its request's first,
        // and one cutting the same length another way.
        let other = len - 512;
        let s1 = vec![0u8; bulk::seg_len(other, bulk::segments(other), 1)];
        feed(
            &mut e,
            &mut models,
            &req_from(66, BlockOp::Write, 1, other, 0, 1, &s1),
        );
        assert_eq!(e.stats.bad_segments, 1);
        let n = bulk::segments_of(len, SEG_DATA_MAX);
        let s1 = vec![0u8; bulk::seg_len(len, n, 1)];
        feed(
            &mut e,
            &mut models,
            &req_n(66, BlockOp::Write, 1, len, 0, (1, n), &s1),
        );
        assert_eq!(e.stats.bad_segments, 2);
    }

    #[test]
    fn a_write_in_segments_is_applied_once_and_read_back() {
        let (mut e, mut models, _img) = rig("w");
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 13) as u8).collect();
        let nseg = bulk::segments(8192);
        let segs: Vec<Vec<u8>> = (0..nseg)
            .map(|s| {
                let (a, b) = bulk::seg_range(8192, nseg, s);
                req(BlockOp::Write, 100, 8192, 0, s, &data[a..b])
            })
            .collect();
        // Out of order, with a duplicate.
        for s in (0..nseg as usize).rev() {
            feed(&mut e, &mut models, &segs[s]);
            if s == 3 {
                feed(&mut e, &mut models, &segs[s]);
            }
        }
        let out = run(&mut e, &mut models);
        assert_eq!(out.len(), 1);
        let a = Bulk::parse(&out[0]).unwrap();
        assert_eq!(
            (a.op, a.status, a.id()),
            (BlockOp::Write, BlockStatus::Ok, 100)
        );
        assert_eq!(e.stats().submitted, 1);
        // A retransmitted segment is answered again, not applied again.
        feed(&mut e, &mut models, &segs[0]);
        let out = run(&mut e, &mut models);
        assert_eq!(Bulk::parse(&out[0]).unwrap().status, BlockStatus::Ok);
        assert_eq!(e.stats().submitted, 1);
        // Read it back: six answer segments.
        feed(
            &mut e,
            &mut models,
            &req(BlockOp::Read, 101, 8192, 0, 0, &[]),
        );
        let out = run(&mut e, &mut models);
        assert_eq!(out.len(), nseg as usize);
        assert_eq!(read_back(&out, 8192), data);
        // A probe naming segments 1 and 4 as missing gets only those.
        let probe = req(BlockOp::Read, 101, 8192, BF_PROBE, 0, &[0b1_0010]);
        feed(&mut e, &mut models, &probe);
        let segs: Vec<u16> = run(&mut e, &mut models)
            .iter()
            .map(|o| Bulk::parse(o).unwrap().seg())
            .collect();
        assert_eq!(segs, vec![1, 4]);
    }

    /// Jumbo segments: a 128 KiB write in 39 datagrams and its read in
    /// 39 answers; a read asking for segments larger than this server's
    /// link takes is refused and counted, not sent.
    #[test]
    fn jumbo_segments_write_and_read_back_within_the_link() {
        let (mut e, mut models, _img) = rig("jumbo");
        let len = 128 << 10;
        let n = bulk::segments_of(len, SEG_DATA_MAX);
        assert_eq!(n, 39);
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        for s in (0..n).rev() {
            let (a, b) = bulk::seg_range(len, n, s);
            feed(
                &mut e,
                &mut models,
                &req_n(7, BlockOp::Write, 200, len, 0, (s, n), &data[a..b]),
            );
        }
        let out = run(&mut e, &mut models);
        assert_eq!(Bulk::parse(&out[0]).unwrap().status, BlockStatus::Ok);
        assert_eq!(e.stats().applied, 1);
        feed(
            &mut e,
            &mut models,
            &req_n(7, BlockOp::Read, 201, len, 0, (0, n), &[]),
        );
        let out = run(&mut e, &mut models);
        assert_eq!(out.len(), n as usize);
        for o in &out {
            assert!(o.len() > devplane_wire::MAX_DATAGRAM && o.len() <= MAX_BULK_DATAGRAM);
            assert_eq!(Bulk::parse(o).unwrap().rec.nseg.get(), n);
        }
        assert_eq!(read_back(&out, len), data);
        // The same read on a server whose link has a 1500-byte MTU.
        e.set_mtu(1500);
        feed(
            &mut e,
            &mut models,
            &req_n(7, BlockOp::Read, 202, len, 0, (0, n), &[]),
        );
        let out = run(&mut e, &mut models);
        assert_eq!(out.len(), 1);
        assert_eq!(
            Bulk::parse(&out[0]).unwrap().status,
            BlockStatus::OutOfRange
        );
        assert_eq!(e.stats().too_big, 1);
        // In 1500-byte segments it is served.
        feed(
            &mut e,
            &mut models,
            &req(BlockOp::Read, 203, len, 0, 0, &[]),
        );
        assert_eq!(run(&mut e, &mut models).len(), 95);
    }

    #[test]
    fn a_probe_of_a_partial_write_names_the_segments_held() {
        let (mut e, mut models, _img) = rig("p");
        let data = vec![7u8; 4096];
        let (a, b) = bulk::seg_range(4096, 3, 1);
        feed(
            &mut e,
            &mut models,
            &req(BlockOp::Write, 5, 4096, 0, 1, &data[a..b]),
        );
        feed(
            &mut e,
            &mut models,
            &req(BlockOp::Write, 5, 4096, BF_PROBE, 0, &[]),
        );
        let out = run(&mut e, &mut models);
        let a = Bulk::parse(&out[0]).unwrap();
        assert_eq!(a.status, BlockStatus::Partial);
        assert_eq!(a.data, &[0b010]);
        // Flush and an unknown model's request.
        feed(&mut e, &mut models, &req(BlockOp::Flush, 6, 0, 0, 0, &[]));
        let out = run(&mut e, &mut models);
        assert_eq!(Bulk::parse(&out[0]).unwrap().status, BlockStatus::Ok);
    }
}
