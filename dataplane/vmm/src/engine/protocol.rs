//! The engine's protocol, without I/O: what a lane sends, retransmits,
//! answers, injects and acknowledges, decided from what it is given. No
//! io_uring, no socket, no clock: the time is passed in (nanoseconds on any
//! monotonic scale) and every effect goes through [`Io`], which the lane
//! carries out (it only moves bytes).
//!
//! The rules:
//! - Per (vCPU, model) one datagram at most is in flight (stop and wait).
//!   Requests queued behind it go together in the next datagram, up to
//!   [`MAX_RECORDS`] records, in the order the vCPU made them, once every
//!   record of the one in flight is answered (or given up on).
//! - A datagram not fully answered within the retransmission interval is
//!   sent again, the same bytes (so the same sequence numbers); each
//!   further resend waits twice as long as the one before, up to a cap
//!   (exponential back-off). Once the horizon has passed since its first
//!   send, its unanswered records are answered [`STATUS_TIMEOUT`].
//! - Trust: a datagram is taken only if its header names this client and
//!   the server its socket talks to (sockets are connected, so the kernel
//!   has checked the source address and port: [`Protocol::new`]'s
//!   `socket_servers`); an answer only for a (VM, vCPU) of this lane and
//!   a model of it on that server and socket; an interrupt only for a VM
//!   of this client and a number [`judge`] finds plausible. Everything
//!   else is dropped and counted (`foreign_*`, `irq_out_of_range`), never
//!   injected or acknowledged.
//! - An answer matches a record by (VM, vCPU, model, sequence); an answer
//!   that matches nothing in flight, or a record already answered, is late
//!   (counted, ignored).
//! - Interrupts are applied once each per (model, VM), in sequence order:
//!   one whose number is not above the last applied (and close below it)
//!   is a duplicate (a server resending an unacknowledged datagram). Every
//!   interrupt datagram is acknowledged up to its highest number applied
//!   or duplicate (interrupts for an unknown VM too), never up to a
//!   refused one.
//! - Loss injection drops outgoing datagrams (requests and
//!   acknowledgements) and incoming ones with the configured per-mille
//!   chances, drawn from a seeded generator.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use devplane_wire::{
    Ack, Datagram, DatagramWriter, HEADER_LEN, Header, Interrupt, IrqAction, Kind, MAX_DATAGRAM,
    MAX_RECORDS, RECORD_LEN, RawRecord, Record, RequestId, Response, Status, datagram,
};
use zerocopy::FromBytes;

use super::stats::{EngineStats, add};
use super::{EngineError, Loss, RemoteModel, STATUS_TIMEOUT};

/// How far below the last applied number an interrupt is still a
/// duplicate: a server resends only its one unacknowledged datagram (at
/// most [`MAX_RECORDS`] numbers), so a genuine duplicate is close. A
/// number further below is a new numbering (a model rebuilt) and applied:
/// so no number, forged or not, suppresses more than this many later ones.
pub(crate) const IRQ_DUP_WINDOW: u64 = 256;
/// How far above the last applied number an interrupt may be (interrupts
/// a server raised and gave up on in between).
pub(crate) const IRQ_MAX_GAP: u64 = 1 << 20;
/// Servers number a model's interrupts from the wall clock in ns when the
/// model is built: a first number (or a jump, after a server restart) is
/// plausible up to this far ahead of this client's clock.
pub(crate) const IRQ_CLOCK_SKEW_NS: u64 = 3_600_000_000_000;
/// Most (model, VM) interrupt streams tracked: new ones beyond it are
/// dropped and counted.
pub(crate) const MAX_IRQ_STREAMS: usize = 4096;

/// What to do with an interrupt numbered `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IrqVerdict {
    /// Inject it; it is the new last applied number.
    Apply,
    /// Applied already: acknowledge, do not inject.
    Duplicate,
    /// Implausible (further ahead than a gap or the clock allows): drop,
    /// count, do not acknowledge.
    OutOfRange,
}

/// The verdict on interrupt number `seq` of a (model, VM) whose last
/// applied number is `last` (`None`: none yet), at wall-clock time
/// `wall_ns` (ns since the Unix epoch).
pub(crate) fn judge(last: Option<u64>, seq: u64, wall_ns: u64) -> IrqVerdict {
    let plausible = seq <= wall_ns.saturating_add(IRQ_CLOCK_SKEW_NS);
    match last {
        None if plausible => IrqVerdict::Apply,
        None => IrqVerdict::OutOfRange,
        Some(l) if seq > l => {
            if seq - l <= IRQ_MAX_GAP || plausible {
                IrqVerdict::Apply
            } else {
                IrqVerdict::OutOfRange
            }
        }
        Some(l) if l - seq < IRQ_DUP_WINDOW => IrqVerdict::Duplicate,
        Some(_) if plausible => IrqVerdict::Apply,
        Some(_) => IrqVerdict::OutOfRange,
    }
}

/// What an engine's lanes share about interrupts, under one lock held
/// while one is judged, acknowledged and injected.
#[derive(Debug, Default)]
pub(crate) struct IrqState {
    /// The last interrupt number applied per (model, VM).
    pub(crate) last: HashMap<(u32, u32), u64>,
    /// VMs whose interrupts are neither acknowledged nor injected: their
    /// state is being, or has been, snapshotted ([`crate::engine::Engine::freeze_irqs`]).
    /// An interrupt acknowledged but injected after the snapshot was taken
    /// would be in neither the snapshot nor the server's memory: left
    /// unacknowledged, it is sent again to wherever the VM runs next.
    pub(crate) frozen: std::collections::HashSet<u32>,
    /// (model, VM) -> the server the model was retargeted to, not yet
    /// heard from about that VM ([`Hello`]): any lane that hears from it
    /// (an answer, an interrupt) removes the entry, and every lane's
    /// announcements for the pair stop. At most one entry per (model,
    /// VM) of the engine.
    pub(crate) awaiting: HashMap<(u32, u32), u32>,
}

/// [`IrqState`], shared by an engine's lanes.
pub(crate) type IrqSeen = Arc<Mutex<IrqState>>;

/// The effects the protocol asks of its lane.
pub(crate) trait Io {
    /// Sends request datagram `datagram` from socket `socket` (connected to
    /// the model's server).
    fn send(&mut self, socket: usize, datagram: &[u8]) -> Result<(), EngineError>;
    /// Answers slot `slot` of vCPU `vcpu`'s exit ring.
    fn complete(&mut self, vcpu: usize, slot: u64, status: u8, data: u64);
    /// Injects an interrupt into VM `vm`; whether it was delivered.
    fn inject(&mut self, vm: u32, line: u32, action: IrqAction) -> bool;
    /// Whether VM `vm` is one of this client's (interrupts may go to it).
    fn has_vm(&self, vm: u32) -> bool;
    /// The wall clock: ns since the Unix epoch (read only to judge an
    /// interrupt number far from the last applied one).
    fn wall_ns(&self) -> u64;
    /// Sends acknowledgement `datagram` to server `server` from socket
    /// `socket` (the one its interrupts came to).
    fn ack(&mut self, socket: usize, server: u32, datagram: &[u8]);
}

/// What the protocol needs of the engine's configuration.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// This client platform's id.
    pub client: u32,
    /// Resend a datagram not answered within this many nanoseconds; each
    /// further resend waits twice as long as the one before.
    pub retransmit_ns: u64,
    /// The longest wait between two resends, in nanoseconds.
    pub retransmit_max_ns: u64,
    /// Give up on a datagram this many nanoseconds after its first send.
    pub horizon_ns: u64,
    /// Loss injection.
    pub loss: Loss,
    /// Tag keys ([`super::EngineConfig::tag_keys`]).
    pub keys: Option<devplane_wire::tag::KeyRing>,
}

/// One vCPU the protocol serves.
pub(crate) struct Peer {
    /// VM id.
    pub vm: u32,
    /// vCPU index.
    pub vcpu: u16,
    /// Its remote models, indexed as its exit ring's `model` field.
    pub models: Arc<[RemoteModel]>,
}

/// One record of a datagram in flight.
#[derive(Debug, Clone, Copy)]
struct Slot {
    seq: u64,
    /// Its exit-ring slot.
    index: u64,
    answered: bool,
}

struct Flight {
    /// The records, in datagram order.
    slots: Vec<Slot>,
    answered: usize,
    buf: Box<[u8]>,
    len: usize,
    /// Its first send.
    first_at: u64,
    /// Its last send.
    sent_at: u64,
    /// The wait after its last send before the next.
    interval: u64,
    /// The wait before sending again after a `Busy` answer (0: none yet);
    /// doubles per send answered `Busy`, from [`BUSY_FIRST_NS`] up to the
    /// retransmission interval.
    busy_wait: u64,
    /// The send (its `sent_at`) whose `Busy` answers set `busy_wait`: the
    /// records of one answer datagram count once.
    busy_for: u64,
}

/// The first wait before sending a request answered `Busy` again: about a
/// page read from a fast disk; each further `Busy` answer doubles it.
pub(crate) const BUSY_FIRST_NS: u64 = 50_000;

impl Flight {
    /// When it is resent.
    fn resend_at(&self) -> u64 {
        self.sent_at.saturating_add(self.interval)
    }

    /// When it is given up.
    fn give_up_at(&self, s: &Settings) -> u64 {
        self.first_at.saturating_add(s.horizon_ns)
    }

    /// When something is due for it: a resend or giving up.
    fn due(&self, s: &Settings) -> u64 {
        self.resend_at().min(self.give_up_at(s))
    }
}

/// One vCPU's queues and datagrams in flight, per model.
struct Flow {
    models: Arc<[RemoteModel]>,
    /// Model id to model index.
    index: HashMap<u32, usize>,
    /// Per model: (exit-ring slot, record), in the vCPU's order.
    queued: Vec<VecDeque<(u64, RawRecord)>>,
    inflight: Vec<Option<Flight>>,
}

/// Deterministic drop decisions (xorshift64*).
struct Rng(u64);

impl Rng {
    fn chance(&mut self, permille: u16) -> bool {
        if permille == 0 {
            return false;
        }
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r % 1000) < permille as u64
    }
}

/// The protocol state of one lane.
pub(crate) struct Protocol {
    settings: Settings,
    /// Per socket: the port named in requests sent on it
    /// ([`super::Lane::irq_ports`]); empty: none.
    irq_ports: Vec<u16>,
    /// Per socket: the id of the server it is connected to; `None` (not
    /// connected): any of `servers`.
    socket_servers: Vec<Option<u32>>,
    /// The servers this lane's client talks to.
    servers: Vec<u32>,
    flows: Vec<Flow>,
    /// (VM, vCPU) to flow index.
    by_id: HashMap<(u32, u16), usize>,
    /// The last interrupt sequence number applied, per (model, VM):
    /// shared by every lane of an engine ([`Protocol::share_irqs`]), since
    /// an interrupt socket is read by the engine's lane and by the direct
    /// lanes of the vCPUs (whichever reaps a datagram first applies it).
    irq_seen: IrqSeen,
    /// The interrupts of the datagram being handled, to inject after its
    /// acknowledgement (kept: no allocation per datagram).
    to_inject: Vec<Interrupt>,
    rng: Rng,
    /// Buffers and slot lists of retired datagrams, for the next ones: no
    /// allocation per datagram once warm.
    spare: Vec<(Box<[u8]>, Vec<Slot>)>,
    stats: Arc<EngineStats>,
    /// Key changes (a rotation) into `settings.keys`.
    key_watch: super::keys::KeyWatch,
    /// Announcements owed to servers a model was retargeted to
    /// ([`Protocol::announce`]).
    hellos: Vec<Hello>,
}

/// An announcement to a model's new server: an acknowledgement of nothing
/// (sequence number 0) for one VM using the model, from the socket (and
/// naming the interrupt port) its requests use, so that the server learns
/// where the VM's interrupts go before the guest sends it anything. A
/// server learns that from requests only otherwise, and an interrupt
/// handed over with the model would wait there for the guest's next
/// request to it, while the guest waits for the interrupt. Sent at
/// growing gaps ([`HELLO_GAPS_NS`]), because the first may come before
/// the new server serves the model (the client retargets before the
/// commit), then every [`HELLO_STEADY_NS`] until the client hears from
/// that server about the model and VM (an answer, or an interrupt: the
/// server serves it and knows where the VM's interrupts go) or the model
/// is retargeted again. A lost announcement, or a commit later than the
/// series, then costs one steady gap, not an interrupt held until the
/// guest's next request; an idle model costs one small datagram per gap.
#[derive(Debug, Clone, Copy)]
struct Hello {
    model: u32,
    server: u32,
    socket: usize,
    vm: u32,
    vcpu: u16,
    /// When the next is due ([`now_ns`](super::now_ns)).
    next_at: u64,
    /// How many were sent.
    sent: usize,
}

/// The waits before each announcement after a retarget: at 1, 5, 20,
/// 100, 400 ms, 1.5, 3.5, 7.5 s (the hand-over's commit follows the
/// retarget within its step timeout, 5 s for the daemons; those sent
/// before it are dropped as for an unknown model).
const HELLO_GAPS_NS: [u64; 8] = [
    1_000_000,
    4_000_000,
    15_000_000,
    80_000_000,
    300_000_000,
    1_100_000_000,
    2_000_000_000,
    4_000_000_000,
];

/// The gap between announcements after [`HELLO_GAPS_NS`], until heard.
const HELLO_STEADY_NS: u64 = 4_000_000_000;

/// Sends `bytes` unless loss injection drops it.
fn transmit(
    rng: &mut Rng,
    loss: &Loss,
    stats: &EngineStats,
    io: &mut impl Io,
    socket: usize,
    bytes: &[u8],
) -> Result<(), EngineError> {
    if rng.chance(loss.tx_permille) {
        add(&stats.loss_tx, 1);
        return Ok(());
    }
    io.send(socket, bytes)
}

/// Seals a datagram about to be resent again with the current key if it
/// was sealed otherwise (a rotation since its first send: the old key may
/// be retired before its answer comes), or strips its tag if the client's
/// keys were removed.
fn reseal(f: &mut Flight, keys: Option<&devplane_wire::tag::KeyRing>) {
    use devplane_wire::header::{HDR_TAG, KEY_ID_SHIFT, OFF_FLAGS};
    let sealed_with = Datagram::parse(&f.buf[..f.len])
        .ok()
        .and_then(|d| d.key_id());
    let body = match sealed_with {
        Some(_) => f.len.saturating_sub(devplane_wire::TAG_LEN),
        None => f.len,
    };
    match keys {
        Some(ring) if sealed_with != Some(ring.current.id) => {
            if let Some(n) = devplane_wire::tag::seal(&mut f.buf, body, &ring.current) {
                f.len = n;
            }
        }
        None if sealed_with.is_some() => {
            let flags = u16::from_le_bytes([f.buf[OFF_FLAGS], f.buf[OFF_FLAGS + 1]]);
            let flags = flags & !(HDR_TAG | (0xff << KEY_ID_SHIFT));
            f.buf[OFF_FLAGS..OFF_FLAGS + 2].copy_from_slice(&flags.to_le_bytes());
            f.len = body;
        }
        _ => {}
    }
}

/// Rewrites the header of datagram `f` to `header` (its record count
/// kept) and seals it again with the current key (or leaves it untagged):
/// the same records sent to another server.
fn rehead(f: &mut Flight, header: Header, keys: Option<&devplane_wire::tag::KeyRing>) {
    use zerocopy::IntoBytes;
    let tagged = Datagram::parse(&f.buf[..f.len])
        .ok()
        .and_then(|d| d.key_id())
        .is_some();
    let body = if tagged {
        f.len.saturating_sub(devplane_wire::TAG_LEN)
    } else {
        f.len
    };
    let Ok((old, _)) = Header::ref_from_prefix(&f.buf[..]) else {
        return; // unreachable: the buffer holds a whole datagram
    };
    let mut h = header;
    h.count = old.count;
    f.buf[..HEADER_LEN].copy_from_slice(h.as_bytes());
    f.len = body;
    if let Some(ring) = keys
        && let Some(n) = devplane_wire::tag::seal(&mut f.buf, body, &ring.current)
    {
        f.len = n;
    }
}

/// Moves queued records into `buf` (after `header`), up to
/// [`MAX_RECORDS`], noting each in `slots`; the datagram's length.
fn fill(
    buf: &mut [u8],
    header: Header,
    queue: &mut VecDeque<(u64, RawRecord)>,
    slots: &mut Vec<Slot>,
) -> Option<usize> {
    let mut w = DatagramWriter::new(buf, header).ok()?;
    while slots.len() < MAX_RECORDS {
        let Some((index, rec)) = queue.pop_front() else {
            break;
        };
        if w.push_raw(&rec).is_err() {
            queue.push_front((index, rec));
            break;
        }
        slots.push(Slot {
            seq: rec.seq.get(),
            index,
            answered: false,
        });
    }
    Some(w.finish())
}

impl Protocol {
    /// The protocol for `peers` (flow `i` is peer `i`). `socket_servers`:
    /// per socket, the id of the server it is connected to (the kernel
    /// takes datagrams on it only from that server's address and port), or
    /// `None` for one that is not (any of `servers` then). `irq_ports`:
    /// per socket, the interrupt port its requests name (empty: none).
    pub(crate) fn new(
        settings: Settings,
        peers: Vec<Peer>,
        socket_servers: Vec<Option<u32>>,
        servers: Vec<u32>,
        irq_ports: Vec<u16>,
        stats: Arc<EngineStats>,
    ) -> Protocol {
        let by_id = peers
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.vm, p.vcpu), i))
            .collect();
        let flows = peers
            .into_iter()
            .map(|p| {
                let n = p.models.len();
                Flow {
                    index: p
                        .models
                        .iter()
                        .enumerate()
                        .map(|(j, m)| (m.model, j))
                        .collect(),
                    models: p.models,
                    queued: (0..n).map(|_| VecDeque::new()).collect(),
                    inflight: (0..n).map(|_| None).collect(),
                }
            })
            .collect();
        Protocol {
            rng: Rng(settings.loss.seed | 1),
            settings,
            irq_ports,
            socket_servers,
            servers,
            flows,
            by_id,
            hellos: Vec::new(),
            irq_seen: IrqSeen::default(),
            to_inject: Vec::new(),
            spare: Vec::new(),
            stats,
            key_watch: Default::default(),
        }
    }

    /// Keeps the interrupt numbers applied in `seen`, shared with the
    /// engine's other lanes: an interrupt is applied once whichever lane
    /// reaps it.
    pub(crate) fn share_irqs(&mut self, seen: IrqSeen) {
        self.irq_seen = seen;
    }

    /// Takes the keys of `keys` whenever they change (checked before each
    /// datagram is sealed or verified).
    pub(crate) fn watch_keys(&mut self, keys: super::LiveKeys) {
        self.key_watch = super::keys::KeyWatch::new(keys);
    }

    /// Takes a key change, if there was one.
    fn refresh_keys(&mut self) {
        if let Some(ring) = self.key_watch.changed() {
            self.settings.keys = ring;
        }
    }

    /// Takes request `record` from slot `slot` of vCPU `v`'s exit ring,
    /// for its model `model`; one that does not parse or names no model is
    /// answered `Rejected` at once.
    pub(crate) fn request(
        &mut self,
        v: usize,
        slot: u64,
        model: usize,
        record: &[u8; RECORD_LEN],
        io: &mut impl Io,
    ) {
        let queue = self.flows.get_mut(v).and_then(|f| f.queued.get_mut(model));
        match (RawRecord::read_from_bytes(record), queue) {
            (Ok(rec), Some(q)) => q.push_back((slot, rec)),
            _ => io.complete(v, slot, Status::Rejected as u8, 0),
        }
    }

    /// Sends, for every model of vCPU `v` with nothing in flight, what is
    /// queued for it (one datagram each). Whether it sent anything.
    pub(crate) fn send_ready(
        &mut self,
        v: usize,
        now: u64,
        io: &mut impl Io,
    ) -> Result<bool, EngineError> {
        let mut sent = false;
        for m in 0..self.flows[v].queued.len() {
            let flow = &self.flows[v];
            if flow.inflight[m].is_none() && !flow.queued[m].is_empty() {
                self.send_batch(v, m, now, io)?;
                sent = true;
            }
        }
        Ok(sent)
    }

    fn header(&self, remote: RemoteModel) -> Header {
        let h = Header::new(
            Kind::Request,
            remote.model,
            remote.server,
            self.settings.client,
        );
        match self.irq_ports.get(remote.socket) {
            Some(&port) => h.with_irq_port(port),
            None => h,
        }
    }

    fn send_batch(
        &mut self,
        v: usize,
        m: usize,
        now: u64,
        io: &mut impl Io,
    ) -> Result<(), EngineError> {
        self.refresh_keys();
        let remote = self.flows[v].models[m];
        let header = self.header(remote);
        let (mut buf, mut slots) = self
            .spare
            .pop()
            .unwrap_or_else(|| (vec![0u8; MAX_DATAGRAM].into_boxed_slice(), Vec::new()));
        slots.clear();
        let sealed =
            fill(&mut buf, header, &mut self.flows[v].queued[m], &mut slots).and_then(|len| {
                match &self.settings.keys {
                    Some(ring) => devplane_wire::tag::seal(&mut buf, len, &ring.current),
                    None => Some(len),
                }
            });
        let Some(len) = sealed else {
            self.spare.push((buf, slots));
            return Ok(());
        };
        add(&self.stats.tx_datagrams, 1);
        add(&self.stats.tx_records, slots.len() as u64);
        let f = self.flows[v].inflight[m].insert(Flight {
            slots,
            answered: 0,
            buf,
            len,
            first_at: now,
            sent_at: now,
            interval: self.settings.retransmit_ns,
            busy_wait: 0,
            busy_for: 0,
        });
        let bytes = &f.buf[..f.len];
        transmit(
            &mut self.rng,
            &self.settings.loss,
            &self.stats,
            io,
            remote.socket,
            bytes,
        )
    }

    /// Points model `model` of every vCPU of this lane at server `server`,
    /// reached through socket `socket` (a model moved to another server):
    /// what is queued for it goes there, and a datagram in flight to the
    /// old server is rewritten for the new one (its header, its tag) with
    /// the same records and sequence numbers, due for resending at once.
    /// The new owner has the old one's duplicate windows, so a request the
    /// old server applied is answered from them and none applies twice.
    /// Answers from the old server for it are refused from now on
    /// (`foreign_server`). Returns how many datagrams in flight were
    /// rewritten (due at `now`).
    pub(crate) fn retarget(&mut self, model: u32, server: u32, socket: usize, now: u64) -> usize {
        self.refresh_keys();
        let mut rewritten = 0;
        for v in 0..self.flows.len() {
            let Some(&m) = self.flows[v].index.get(&model) else {
                continue;
            };
            let mut models = self.flows[v].models.to_vec();
            models[m].server = server;
            models[m].socket = socket;
            let header = self.header(models[m]);
            self.flows[v].models = models.into();
            if let Some(f) = self.flows[v].inflight[m].as_mut() {
                rehead(f, header, self.settings.keys.as_ref());
                // Due at `now` (interval 0: the resend then waits the
                // first interval again); the back-off starts over, the
                // horizon does not.
                f.sent_at = now;
                f.interval = 0;
                rewritten += 1;
            }
            if let Some((&(vm, vcpu), _)) = self.by_id.iter().find(|(_, i)| **i == v) {
                self.irq_seen
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .awaiting
                    .insert((model, vm), server);
                self.hellos.retain(|h| (h.model, h.vm) != (model, vm));
                self.hellos.push(Hello {
                    model,
                    server,
                    socket,
                    vm,
                    vcpu,
                    next_at: now.saturating_add(HELLO_GAPS_NS[0]),
                    sent: 0,
                });
            }
        }
        rewritten
    }

    /// Sends the announcements due at `now` ([`Hello`]); whether any was.
    pub(crate) fn announce(&mut self, now: u64, io: &mut impl Io) -> bool {
        if self.hellos.iter().all(|h| h.next_at > now) {
            return false;
        }
        self.refresh_keys();
        // Announcements another lane heard the answer to stop here too.
        {
            let seen = self.irq_seen.lock().unwrap_or_else(|p| p.into_inner());
            self.hellos
                .retain(|h| seen.awaiting.get(&(h.model, h.vm)) == Some(&h.server));
        }
        let mut due = Vec::new();
        for h in &mut self.hellos {
            if h.next_at <= now {
                due.push(*h);
                h.sent += 1;
                let gap = HELLO_GAPS_NS.get(h.sent).copied();
                h.next_at = now.saturating_add(gap.unwrap_or(HELLO_STEADY_NS));
            }
        }
        for h in due {
            if self.rng.chance(self.settings.loss.tx_permille) {
                add(&self.stats.loss_tx, 1);
                continue;
            }
            let mut header = Header::new(Kind::Ack, h.model, h.server, self.settings.client);
            if let Some(&port) = self.irq_ports.get(h.socket) {
                header = header.with_irq_port(port);
            }
            let id = RequestId {
                vm: h.vm,
                hypervisor: 0,
                vcpu: h.vcpu,
                seq: 0,
            };
            if self.send_ack(h.socket, header, id, io) {
                add(&self.stats.hellos, 1);
            }
        }
        true
    }

    /// Resends every datagram due at `now` (doubling its next wait, up to
    /// the cap), or gives it up (its unanswered records answered
    /// [`STATUS_TIMEOUT`]) once the horizon has passed since its first
    /// send. Whether any was due.
    pub(crate) fn retransmit(&mut self, now: u64, io: &mut impl Io) -> Result<bool, EngineError> {
        self.refresh_keys();
        let mut work = false;
        for v in 0..self.flows.len() {
            for m in 0..self.flows[v].inflight.len() {
                let flow = &mut self.flows[v];
                let socket = flow.models[m].socket;
                let Some(f) = flow.inflight[m].as_mut() else {
                    continue;
                };
                if now < f.due(&self.settings) {
                    continue;
                }
                work = true;
                if now >= f.give_up_at(&self.settings) {
                    let done = flow.inflight[m].take();
                    self.give_up(v, done, io);
                    continue;
                }
                if f.interval > self.settings.retransmit_ns {
                    add(&self.stats.backoffs, 1);
                }
                f.sent_at = now;
                f.interval = f
                    .interval
                    .saturating_mul(2)
                    .max(self.settings.retransmit_ns)
                    .min(self.settings.retransmit_max_ns);
                add(&self.stats.retransmits, 1);
                reseal(f, self.settings.keys.as_ref());
                let bytes = &f.buf[..f.len];
                transmit(
                    &mut self.rng,
                    &self.settings.loss,
                    &self.stats,
                    io,
                    socket,
                    bytes,
                )?;
            }
        }
        Ok(work)
    }

    fn give_up(&mut self, v: usize, f: Option<Flight>, io: &mut impl Io) {
        let Some(f) = f else { return };
        add(&self.stats.timeouts, (f.slots.len() - f.answered) as u64);
        for s in f.slots.iter().filter(|s| !s.answered) {
            io.complete(v, s.index, STATUS_TIMEOUT, 0);
        }
        self.spare.push((f.buf, f.slots));
    }

    /// When the earliest datagram in flight is due for retransmission (or
    /// to be given up); `None` if nothing is in flight.
    pub(crate) fn next_due(&self) -> Option<u64> {
        self.flows
            .iter()
            .flat_map(|f| f.inflight.iter().flatten())
            .map(|f| f.due(&self.settings))
            .chain(self.hellos.iter().map(|h| h.next_at))
            .min()
    }

    /// Whether a datagram is in flight.
    pub(crate) fn in_flight(&self) -> bool {
        self.flows
            .iter()
            .any(|f| f.inflight.iter().any(Option::is_some))
    }

    /// Handles a datagram received on socket `socket`: answers, or
    /// interrupts (applied, then acknowledged).
    pub(crate) fn on_datagram(&mut self, bytes: &[u8], socket: usize, io: &mut impl Io) {
        if self.rng.chance(self.settings.loss.rx_permille) {
            add(&self.stats.loss_rx, 1);
            return;
        }
        self.refresh_keys();
        let Ok(d) = Datagram::parse(bytes) else {
            add(&self.stats.malformed, 1);
            return;
        };
        let tag_ok = match &self.settings.keys {
            Some(ring) => devplane_wire::tag::verify(bytes, ring).is_ok(),
            None => d.key_id().is_none(),
        };
        if !tag_ok {
            add(&self.stats.bad_tag, 1);
            return;
        }
        if d.client() != self.settings.client {
            add(&self.stats.foreign_client, 1);
            return;
        }
        let server_ok = match self.socket_servers.get(socket).copied().flatten() {
            Some(id) => d.server() == id,
            None => self.servers.contains(&d.server()),
        };
        if !server_ok {
            add(&self.stats.foreign_server, 1);
            return;
        }
        match d.kind() {
            Kind::Response => {
                for r in d.records() {
                    if let Record::Response(rsp) = r {
                        self.on_response(d.model(), d.server(), socket, &rsp, io);
                    }
                }
            }
            Kind::Interrupt => self.on_interrupts(&d, socket, io),
            _ => add(&self.stats.malformed, 1),
        }
    }

    fn on_response(
        &mut self,
        model: u32,
        server: u32,
        socket: usize,
        rsp: &Response,
        io: &mut impl Io,
    ) {
        let Some(&v) = self.by_id.get(&(rsp.id.vm, rsp.id.vcpu)) else {
            add(&self.stats.foreign_vm, 1);
            return;
        };
        let flow = &mut self.flows[v];
        let Some(&m) = flow.index.get(&model) else {
            add(&self.stats.foreign_model, 1);
            return;
        };
        let remote = flow.models[m];
        if remote.server != server || remote.socket != socket {
            add(&self.stats.foreign_server, 1);
            return;
        }
        if !self.hellos.is_empty() {
            self.hellos
                .retain(|h| (h.model, h.server, h.vm) != (model, server, rsp.id.vm));
            let mut seen = self.irq_seen.lock().unwrap_or_else(|p| p.into_inner());
            if seen.awaiting.get(&(model, rsp.id.vm)) == Some(&server) {
                seen.awaiting.remove(&(model, rsp.id.vm));
            }
        }
        let Some(f) = flow.inflight[m].as_mut() else {
            add(&self.stats.late, 1);
            return;
        };
        let Some(slot) = f
            .slots
            .iter_mut()
            .find(|s| s.seq == rsp.id.seq && !s.answered)
        else {
            add(&self.stats.late, 1);
            return;
        };
        if rsp.status == Status::Busy {
            // Nothing applied: the model waits on its backing store. The
            // datagram goes again sooner than a retransmission would (what
            // it applied is answered from the server's window).
            add(&self.stats.busy, 1);
            if f.busy_for != f.sent_at || f.busy_wait == 0 {
                f.busy_for = f.sent_at;
                f.busy_wait = f.busy_wait.saturating_mul(2).clamp(
                    BUSY_FIRST_NS,
                    self.settings.retransmit_ns.max(BUSY_FIRST_NS),
                );
                f.interval = f.interval.min(f.busy_wait);
            }
            return;
        }
        slot.answered = true;
        io.complete(v, slot.index, rsp.status as u8, rsp.data);
        add(&self.stats.answers, 1);
        f.answered += 1;
        if f.answered == f.slots.len()
            && let Some(done) = flow.inflight[m].take()
        {
            self.spare.push((done.buf, done.slots));
        }
    }

    /// Judges the datagram's interrupts, acknowledges what may be, then
    /// injects what is new, in that order. The server holds a model's
    /// next interrupt until this one is acknowledged, and an injection
    /// wakes the halted vCPU, which may take this thread's core at once
    /// (always, when the engine yields to vCPUs,
    /// [`super::EngineConfig::yield_to_vcpus`]): acknowledged after the
    /// injection, the acknowledgement waited until the vCPU halted again,
    /// after it had asked for the next interrupt, and that one was held
    /// meanwhile. Acknowledged before injected loses nothing: the VM is
    /// checked first ([`Io::has_vm`]) and lives in this process, and a
    /// snapshot of it takes this lock and freezes the VM's interrupts
    /// ([`IrqState::frozen`]) before it takes the VM's state, so an
    /// interrupt is either acknowledged and in the snapshot, or neither.
    fn on_interrupts(&mut self, d: &Datagram<'_>, socket: usize, io: &mut impl Io) {
        let model = d.model();
        // Held while the interrupts are injected: two lanes applying the
        // same stream (a resent copy reaped by another lane) inject in the
        // order they judge.
        let seen = Arc::clone(&self.irq_seen);
        let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut inject = std::mem::take(&mut self.to_inject);
        inject.clear();
        let mut top: Option<RequestId> = None;
        for r in d.records() {
            let Record::Interrupt(irq) = r else { continue };
            if !self.judge_irq(model, &irq, &mut seen, io, &mut inject) {
                continue;
            }
            if !seen.awaiting.is_empty() {
                let server = d.server();
                if seen.awaiting.get(&(model, irq.vm)) == Some(&server) {
                    seen.awaiting.remove(&(model, irq.vm));
                }
                self.hellos
                    .retain(|h| (h.model, h.server, h.vm) != (model, server, irq.vm));
            }
            if top.is_none_or(|t| irq.seq > t.seq) {
                top = Some(RequestId {
                    vm: irq.vm,
                    hypervisor: irq.hypervisor,
                    vcpu: 0,
                    seq: irq.seq,
                });
            }
        }
        if let Some(id) = top {
            self.acknowledge(socket, model, d.server(), id, io);
        }
        for irq in &inject {
            if io.inject(irq.vm, irq.line, irq.action) {
                add(&self.stats.irqs, 1);
            } else {
                add(&self.stats.irq_inject_errors, 1);
            }
        }
        drop(seen);
        self.to_inject = inject;
    }

    /// Judges `irq` ([`judge`]) against the last number applied of its
    /// stream in `seen`; a new one is noted there and pushed on `inject`.
    /// Whether it may be acknowledged (new, a duplicate, or for a VM not
    /// here but plausibly numbered).
    fn judge_irq(
        &mut self,
        model: u32,
        irq: &Interrupt,
        seen: &mut IrqState,
        io: &mut impl Io,
        inject: &mut Vec<Interrupt>,
    ) -> bool {
        if seen.frozen.contains(&irq.vm) {
            add(&self.stats.irqs_frozen, 1);
            return false;
        }
        if !io.has_vm(irq.vm) {
            add(&self.stats.irqs_unknown_vm, 1);
            return judge(None, irq.seq, io.wall_ns()) == IrqVerdict::Apply;
        }
        let key = (model, irq.vm);
        let last = seen.last.get(&key).copied();
        // The clock is read only for a number far from the last applied.
        let wall = match last {
            Some(l) if irq.seq > l && irq.seq - l <= IRQ_MAX_GAP => 0,
            Some(l) if irq.seq <= l && l - irq.seq < IRQ_DUP_WINDOW => 0,
            _ => io.wall_ns(),
        };
        match judge(last, irq.seq, wall) {
            IrqVerdict::Duplicate => {
                add(&self.stats.irq_duplicates, 1);
                true
            }
            IrqVerdict::OutOfRange => {
                add(&self.stats.irq_out_of_range, 1);
                false
            }
            IrqVerdict::Apply => {
                if last.is_none() && seen.last.len() >= MAX_IRQ_STREAMS {
                    add(&self.stats.irq_streams_full, 1);
                    return false;
                }
                seen.last.insert(key, irq.seq);
                inject.push(*irq);
                true
            }
        }
    }

    /// Acknowledges a model's interrupts up to `id.seq` to its server.
    fn acknowledge(
        &mut self,
        socket: usize,
        model: u32,
        server: u32,
        id: RequestId,
        io: &mut impl Io,
    ) {
        if self.rng.chance(self.settings.loss.tx_permille) {
            add(&self.stats.loss_tx, 1);
            return;
        }
        let header = Header::new(Kind::Ack, model, server, self.settings.client);
        self.send_ack(socket, header, id, io);
    }

    /// Sends one acknowledgement record `id` under `header` (sealed with
    /// the current key, if any) on `socket`; whether it was built.
    fn send_ack(&self, socket: usize, header: Header, id: RequestId, io: &mut impl Io) -> bool {
        let mut buf = [0u8; HEADER_LEN + RECORD_LEN + devplane_wire::TAG_LEN];
        let n = datagram::encode(&mut buf, header, &[Record::Ack(Ack { id })])
            .ok()
            .and_then(|n| match &self.settings.keys {
                Some(ring) => devplane_wire::tag::seal(&mut buf, n, &ring.current),
                None => Some(n),
            });
        match n {
            Some(n) => {
                io.ack(socket, header.server.get(), &buf[..n]);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
#[path = "protocol_tests.rs"]
mod tests;
