//! Routing device-initiated interrupts to the client that hosts each VM.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use super::dispatch::PendingIrq;

/// Where each client platform, and each of its VMs, was last heard from,
/// learned from requests (which the XDP program, or the socket, already
/// checked), so that interrupts can be sent there. A client may send from
/// several sockets (one per vCPU in direct mode, one process per VM under
/// the client daemon), so a VM's interrupts go to where that VM last sent
/// from, and to the client's last address until the VM has sent anything.
/// `A` is a frame flow (AF_XDP) or a socket address (socket mode).
#[derive(Debug)]
pub struct Peers<A> {
    by_client: HashMap<u32, A>,
    by_vm: HashMap<(u32, u32), A>,
    /// Addresses not remembered because a table was full.
    refused: u64,
}

/// Most (client, VM) addresses remembered; VMs beyond it use their
/// client's address. With `check_clients` only registered VMs of their
/// own client are learned, so the identifier database bounds the table
/// before this does.
pub const MAX_VM_PEERS: usize = 65_536;

/// Most client addresses remembered: the clients map's capacity (with
/// `check_clients` only registered clients are learned).
pub const MAX_CLIENT_PEERS: usize = devplane_wire::maps::MAX_CLIENTS as usize;

impl<A> Default for Peers<A> {
    fn default() -> Self {
        Peers {
            by_client: HashMap::new(),
            by_vm: HashMap::new(),
            refused: 0,
        }
    }
}

/// Remembers `addr` for `key`; `false` if the table is full.
fn remember<K: std::hash::Hash + Eq, A: PartialEq>(
    map: &mut HashMap<K, A>,
    key: K,
    addr: A,
    cap: usize,
) -> bool {
    let full = map.len() >= cap;
    if let Some(a) = map.get_mut(&key) {
        // Written only when it changed: the common case reads.
        if *a != addr {
            *a = addr;
        }
    } else if full {
        return false;
    } else {
        map.insert(key, addr);
    }
    true
}

impl<A: Copy + PartialEq> Peers<A> {
    /// The address of `client`, if it has sent anything yet.
    pub fn get(&self, client: u32) -> Option<&A> {
        self.by_client.get(&client)
    }

    /// Where `vm` of `client` is reached: where it last sent from, or
    /// else where its client did.
    pub fn get_vm(&self, client: u32, vm: u32) -> Option<&A> {
        self.by_vm
            .get(&(client, vm))
            .or_else(|| self.by_client.get(&client))
    }

    /// Records that `vm` of `client` sent from `addr`.
    pub fn learn(&mut self, client: u32, vm: u32, addr: A) {
        let a = remember(&mut self.by_client, client, addr, MAX_CLIENT_PEERS);
        let b = remember(&mut self.by_vm, (client, vm), addr, MAX_VM_PEERS);
        self.refused += u64::from(!a) + u64::from(!b);
    }

    /// [`Peers::learn`] from a datagram that applied nothing new (every
    /// record a duplicate: a retransmission, or a replay by someone who
    /// captured it): only an address not known yet is taken, so a replay
    /// from elsewhere cannot move where a VM's interrupts go.
    pub fn learn_first(&mut self, client: u32, vm: u32, addr: A) {
        if !self.by_vm.contains_key(&(client, vm)) {
            self.learn(client, vm, addr);
        }
    }

    /// Addresses not remembered because a table was full.
    pub fn refused(&self) -> u64 {
        self.refused
    }
}

/// Most interrupts held for clients not heard from yet; older ones are
/// dropped (and counted) beyond this.
pub const MAX_HELD: usize = 4096;

/// The least share of [`MAX_HELD`] one client may hold.
pub const MIN_HELD_PER_CLIENT: usize = 64;

/// Interrupts of one model per datagram at most (the wire's record limit).
const IRQS_PER_DATAGRAM: usize = devplane_wire::MAX_RECORDS;

/// An interrupt datagram sent and not acknowledged yet.
#[derive(Debug)]
struct Flight {
    /// Its interrupts (one model's), in order.
    irqs: Vec<PendingIrq>,
    /// The client it was sent to (whose round trip its acknowledgement
    /// measures).
    client: u32,
    /// Its first send.
    first_at: Instant,
    sent_at: Instant,
    /// How long after `sent_at` it is sent again.
    wait: Duration,
    retries: u32,
}

/// When interrupt datagrams are sent again: the rule, without a clock.
///
/// Each client's acknowledgement round trip is measured from the datagrams
/// acknowledged without a resend (Karn's rule: an acknowledgement of a
/// resent datagram could answer either copy) and smoothed as TCP does
/// (RFC 6298: `srtt` and `rttvar` with gains 1/8 and 1/4). A datagram's
/// first resend waits `srtt + 4 * rttvar`, at least [`IRQ_RTO_MIN`] and at
/// most [`IRQ_RTO_MAX`] ([`IRQ_RTO_INITIAL`] before the client's first
/// measurement); each further resend waits twice as long as the one
/// before, up to [`IRQ_RTO_MAX`]; once [`IRQ_GIVE_UP`] has passed since
/// its first send (or after `max_retries` resends) it is given up and
/// counted.
#[derive(Debug, Clone, Copy)]
pub struct ResendRule {
    /// The shortest first wait.
    pub min: Duration,
    /// The first wait before any round trip was measured.
    pub initial: Duration,
    /// The longest wait between two sends.
    pub max: Duration,
    /// Give a datagram up this long after its first send.
    pub give_up: Duration,
    /// Give a datagram up after this many resends.
    pub max_retries: u32,
}

impl Default for ResendRule {
    fn default() -> Self {
        ResendRule {
            min: IRQ_RTO_MIN,
            initial: IRQ_RTO_INITIAL,
            max: IRQ_RTO_MAX,
            give_up: IRQ_GIVE_UP,
            max_retries: u32::MAX,
        }
    }
}

/// A client's smoothed acknowledgement round trip (RFC 6298).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundTrip {
    srtt: Duration,
    rttvar: Duration,
}

impl RoundTrip {
    /// The estimate after a first measurement `rtt`.
    pub fn first(rtt: Duration) -> RoundTrip {
        RoundTrip {
            srtt: rtt,
            rttvar: rtt / 2,
        }
    }

    /// The estimate after a further measurement `rtt`.
    pub fn update(self, rtt: Duration) -> RoundTrip {
        let err = self.srtt.abs_diff(rtt);
        RoundTrip {
            rttvar: (self.rttvar * 3 + err) / 4,
            srtt: (self.srtt * 7 + rtt) / 8,
        }
    }

    /// The smoothed round trip.
    pub fn srtt(&self) -> Duration {
        self.srtt
    }
}

impl ResendRule {
    /// The wait before a datagram's first resend, for a client whose round
    /// trip is `rtt` (`None`: not measured yet).
    pub fn first_wait(&self, rtt: Option<RoundTrip>) -> Duration {
        let w = match rtt {
            None => self.initial,
            Some(r) => r.srtt.saturating_add(r.rttvar.saturating_mul(4)),
        };
        w.clamp(self.min, self.max.max(self.min))
    }

    /// The wait after a resend that waited `wait`.
    pub fn next_wait(&self, wait: Duration) -> Duration {
        wait.saturating_mul(2).min(self.max.max(self.min))
    }

    /// Whether a datagram first sent `since_first` ago and resent
    /// `retries` times is given up.
    pub fn gives_up(&self, since_first: Duration, retries: u32) -> bool {
        since_first >= self.give_up || retries >= self.max_retries
    }
}

/// Finds the client of each interrupt's VM, holds interrupts whose client
/// has not been heard from yet, and sends each model's interrupts reliably:
/// one datagram in flight per model (what is raised meanwhile waits and
/// goes in the next, up to 36 at once), sent again with the same sequence
/// numbers until the client acknowledges it (when, [`ResendRule`] says:
/// from the client's measured round trip, with back-off), so that
/// interrupts are neither lost nor reordered when UDP drops a datagram.
/// The client applies each sequence number once and acknowledges what it
/// has.
#[derive(Debug)]
pub struct IrqRouter {
    vm_client: HashMap<u32, u32>,
    held: VecDeque<PendingIrq>,
    flights: HashMap<u32, Flight>,
    /// Interrupts in `flights`, kept so that [`IrqRouter::held`], asked on
    /// every turn of a worker's loop, does not walk the map.
    in_flight: usize,
    dropped: u64,
    unknown_vm: u64,
    resent: u64,
    given_up: u64,
    suspended: HashSet<u32>,
    rule: ResendRule,
    /// Per client: its measured acknowledgement round trip.
    rtt: HashMap<u32, RoundTrip>,
    /// Scratch: models with an interrupt kept back in this flush.
    waiting: Vec<u32>,
    /// Held interrupts per client.
    held_by_client: HashMap<u32, usize>,
    /// Most interrupts one client may have held: an equal share of
    /// [`MAX_HELD`] among the clients of the VM table, at least
    /// [`MIN_HELD_PER_CLIENT`].
    per_client: usize,
    /// Interrupts dropped because their client had its share held.
    client_limited: u64,
}

/// The shortest wait before an unacknowledged interrupt datagram is sent
/// again (see [`ResendRule`]): a client that acknowledges within
/// microseconds still gets this long, so a scheduling delay on a loaded
/// host does not make the server resend.
pub const IRQ_RTO_MIN: Duration = Duration::from_millis(5);
/// The first wait before a client's round trip was measured.
pub const IRQ_RTO_INITIAL: Duration = Duration::from_millis(20);
/// The longest wait between two sends of an interrupt datagram.
pub const IRQ_RTO_MAX: Duration = Duration::from_millis(200);
/// Give an interrupt datagram up this long after its first send: its
/// client is gone. As long as the client engine's default horizon (10 s),
/// so that an outage or a stalled client host that the client's requests
/// survive does not lose an interrupt either (a given-up interrupt leaves
/// a guest waiting for good); holding it costs one datagram every
/// [`IRQ_RTO_MAX`] meanwhile.
pub const IRQ_GIVE_UP: Duration = Duration::from_secs(10);

impl Default for IrqRouter {
    fn default() -> Self {
        IrqRouter::new(HashMap::new())
    }
}

impl IrqRouter {
    /// A router for the given VM -> client table.
    pub fn new(vm_client: HashMap<u32, u32>) -> IrqRouter {
        let clients = vm_client.values().collect::<HashSet<_>>().len().max(1);
        IrqRouter {
            held_by_client: HashMap::new(),
            per_client: (MAX_HELD / clients).max(MIN_HELD_PER_CLIENT),
            client_limited: 0,
            vm_client,
            held: VecDeque::new(),
            flights: HashMap::new(),
            in_flight: 0,
            dropped: 0,
            unknown_vm: 0,
            resent: 0,
            given_up: 0,
            suspended: HashSet::new(),
            rule: ResendRule::default(),
            rtt: HashMap::new(),
            waiting: Vec::new(),
        }
    }

    /// Another resend rule (tests).
    pub fn with_rule(mut self, rule: ResendRule) -> IrqRouter {
        self.rule = rule;
        self
    }

    /// Client `client`'s measured acknowledgement round trip, if any.
    pub fn round_trip(&self, client: u32) -> Option<RoundTrip> {
        self.rtt.get(&client).copied()
    }

    /// Holds `vm`'s interrupts (in order) until [`IrqRouter::resume`].
    pub fn suspend(&mut self, vm: u32) {
        self.suspended.insert(vm);
    }

    /// Lets `vm`'s held interrupts go, in the order they were raised.
    pub fn resume(&mut self, vm: u32) {
        self.suspended.remove(&vm);
    }

    /// From now on `vm`'s interrupts go to `client` (those in flight too,
    /// when they are sent again).
    pub fn migrate(&mut self, vm: u32, client: u32) {
        self.vm_client.insert(vm, client);
        self.recount();
    }

    /// VM `vm` is gone: its interrupts (held or raised later) have no
    /// client to go to and are dropped as for an unknown VM.
    pub fn forget(&mut self, vm: u32) {
        self.vm_client.remove(&vm);
        self.suspended.remove(&vm);
        self.recount();
    }

    /// Counts the held interrupts per client again (after the queue was
    /// rebuilt or a VM changed client).
    fn recount(&mut self) {
        self.held_by_client.clear();
        for irq in &self.held {
            if let Some(&c) = self.vm_client.get(&irq.vm) {
                *self.held_by_client.entry(c).or_default() += 1;
            }
        }
    }

    /// Interrupts dropped because their client had its share held.
    pub fn client_limited(&self) -> u64 {
        self.client_limited
    }

    /// Interrupts not acknowledged yet: held, or sent and unanswered.
    pub fn held(&self) -> usize {
        self.held.len() + self.in_flight
    }

    /// Interrupts dropped: held too long, for a VM not in the table, or
    /// given up ([`ResendRule`]).
    pub fn dropped(&self) -> u64 {
        self.dropped + self.unknown_vm + self.given_up + self.client_limited
    }

    /// Interrupt datagrams sent again for want of an acknowledgement.
    pub fn resent(&self) -> u64 {
        self.resent
    }

    /// Queues new interrupts behind the held ones (order is kept). Beyond
    /// [`MAX_HELD`], or beyond its client's share of it, the oldest held
    /// interrupt (of that client) is dropped and counted, so one client
    /// cannot push another's out.
    pub fn push(&mut self, irqs: impl Iterator<Item = PendingIrq>) {
        for irq in irqs {
            let Some(&client) = self.vm_client.get(&irq.vm) else {
                self.unknown_vm += 1;
                continue;
            };
            let mine = self.held_by_client.get(&client).copied().unwrap_or(0);
            if mine >= self.per_client {
                // Off the packet path: a client's share is full.
                let vm_client = &self.vm_client;
                if let Some(i) = self
                    .held
                    .iter()
                    .position(|h| vm_client.get(&h.vm) == Some(&client))
                {
                    self.held.remove(i);
                }
                self.client_limited += 1;
            } else if self.held.len() >= MAX_HELD {
                if let Some(old) = self.held.pop_front()
                    && let Some(n) = self
                        .vm_client
                        .get(&old.vm)
                        .and_then(|c| self.held_by_client.get_mut(c))
                {
                    *n = n.saturating_sub(1);
                }
                self.dropped += 1;
                *self.held_by_client.entry(client).or_default() += 1;
            } else {
                *self.held_by_client.entry(client).or_default() += 1;
            }
            self.held.push_back(irq);
        }
    }

    /// The client acknowledged model `model`'s interrupts up to `seq`:
    /// they are done; the model's next ones may go.
    pub fn ack(&mut self, model: u32, seq: u64) {
        self.ack_at(model, seq, Instant::now());
    }

    /// [`IrqRouter::ack`] at time `now`: an acknowledgement of a datagram
    /// sent once measures its client's round trip.
    pub fn ack_at(&mut self, model: u32, seq: u64, now: Instant) {
        if let Some(f) = self.flights.get_mut(&model) {
            if f.retries == 0 && f.irqs.iter().any(|i| i.seq <= seq) {
                let rtt = now.saturating_duration_since(f.sent_at);
                let r = match self.rtt.get(&f.client) {
                    Some(r) => r.update(rtt),
                    None => RoundTrip::first(rtt),
                };
                self.rtt.insert(f.client, r);
            }
            let before = f.irqs.len();
            f.irqs.retain(|i| i.seq > seq);
            self.in_flight -= before - f.irqs.len();
            if f.irqs.is_empty() {
                self.flights.remove(&model);
            }
        }
    }

    /// Takes model `model`'s unacknowledged interrupts, oldest first, for
    /// its new owner ([`IrqRouter::restore`]).
    pub fn take_model(&mut self, model: u32) -> Vec<PendingIrq> {
        let mut out = self
            .flights
            .remove(&model)
            .map(|f| f.irqs)
            .unwrap_or_default();
        self.in_flight -= out.len();
        let (mine, rest): (VecDeque<_>, VecDeque<_>) =
            self.held.drain(..).partition(|i| i.model == model);
        self.held = rest;
        self.recount();
        out.extend(mine);
        out
    }

    /// Queues a moved model's unacknowledged interrupts (from
    /// [`IrqRouter::take_model`]); they go before any it raises here.
    pub fn restore(&mut self, irqs: Vec<PendingIrq>) {
        self.held.extend(irqs);
        self.recount();
    }

    /// Sends what is due, in order: datagrams whose acknowledgement is
    /// overdue again, then each model's held interrupts whose previous
    /// datagram was acknowledged. `send(client, addr, irqs)` sends one
    /// datagram of one model's interrupts and returns `false` when it
    /// cannot now (no TX space), which stops the round. An interrupt for a
    /// client not heard from yet, or of a suspended VM, is kept, and so is
    /// everything behind it of the same model. Returns the interrupts sent
    /// for the first time.
    pub fn flush<A: Copy + PartialEq>(
        &mut self,
        peers: &Peers<A>,
        send: impl FnMut(u32, A, &[PendingIrq]) -> bool,
    ) -> usize {
        self.flush_at(peers, Instant::now(), send)
    }

    /// [`IrqRouter::flush`] at time `now`.
    pub fn flush_at<A: Copy + PartialEq>(
        &mut self,
        peers: &Peers<A>,
        now: Instant,
        mut send: impl FnMut(u32, A, &[PendingIrq]) -> bool,
    ) -> usize {
        let blocked = self.resend_overdue(peers, now, &mut send);
        if blocked || self.held.is_empty() {
            return 0;
        }
        self.send_held(peers, now, &mut send)
    }

    /// The client and address `vm`'s interrupts go to, if known.
    fn target<A: Copy + PartialEq>(
        vm_client: &HashMap<u32, u32>,
        peers: &Peers<A>,
        vm: u32,
    ) -> Option<(u32, A)> {
        let c = *vm_client.get(&vm)?;
        peers.get_vm(c, vm).map(|a| (c, *a))
    }

    /// Sends again the datagrams whose acknowledgement is overdue, and
    /// gives up those resent too often. Returns whether `send` refused
    /// (no room: the round stops).
    fn resend_overdue<A: Copy + PartialEq>(
        &mut self,
        peers: &Peers<A>,
        now: Instant,
        send: &mut impl FnMut(u32, A, &[PendingIrq]) -> bool,
    ) -> bool {
        let rule = self.rule;
        let mut blocked = false;
        let mut gave_up = Vec::new();
        for (&model, f) in self.flights.iter_mut() {
            if now.saturating_duration_since(f.sent_at) < f.wait {
                continue;
            }
            if rule.gives_up(now.saturating_duration_since(f.first_at), f.retries) {
                gave_up.push(model);
                continue;
            }
            let Some((c, a)) = f
                .irqs
                .first()
                .and_then(|i| Self::target(&self.vm_client, peers, i.vm))
            else {
                continue;
            };
            if !send(c, a, &f.irqs) {
                blocked = true;
                break;
            }
            f.retries += 1;
            f.sent_at = now;
            f.client = c;
            f.wait = rule.next_wait(f.wait);
            self.resent += 1;
        }
        for model in gave_up {
            if let Some(f) = self.flights.remove(&model) {
                self.given_up += f.irqs.len() as u64;
                self.in_flight -= f.irqs.len();
            }
        }
        blocked
    }

    /// Sends each model's held interrupts whose previous datagram was
    /// acknowledged, up to [`IRQS_PER_DATAGRAM`] in one datagram; returns
    /// how many went.
    fn send_held<A: Copy + PartialEq>(
        &mut self,
        peers: &Peers<A>,
        now: Instant,
        send: &mut impl FnMut(u32, A, &[PendingIrq]) -> bool,
    ) -> usize {
        let mut blocked = false;
        let mut sent = 0;
        let mut keep = VecDeque::new();
        let mut batch: Vec<PendingIrq> = Vec::new();
        self.waiting.clear();
        while let Some(irq) = self.held.pop_front() {
            let model = irq.model;
            let target = Self::target(&self.vm_client, peers, irq.vm);
            if blocked
                || self.suspended.contains(&irq.vm)
                || self.flights.contains_key(&model)
                || self.waiting.contains(&model)
                || target.is_none()
            {
                if !self.waiting.contains(&model) {
                    self.waiting.push(model);
                }
                keep.push_back(irq);
                continue;
            }
            self.take_batch(irq, &mut batch);
            let Some((c, a)) = target else { continue };
            if send(c, a, &batch) {
                sent += batch.len();
                self.in_flight += batch.len();
                let wait = self.rule.first_wait(self.rtt.get(&c).copied());
                self.flights.insert(
                    model,
                    Flight {
                        irqs: std::mem::take(&mut batch),
                        client: c,
                        first_at: now,
                        sent_at: now,
                        wait,
                        retries: 0,
                    },
                );
            } else {
                blocked = true;
                self.waiting.push(model);
                keep.extend(batch.drain(..));
            }
        }
        self.held = keep;
        self.recount();
        sent
    }

    /// Fills `batch` with `first` and the held interrupts of its model
    /// behind it, in order, up to one datagram's worth.
    fn take_batch(&mut self, first: PendingIrq, batch: &mut Vec<PendingIrq>) {
        batch.clear();
        batch.push(first);
        let mut i = 0;
        while i < self.held.len() && batch.len() < IRQS_PER_DATAGRAM {
            if self.held[i].model == first.model {
                if let Some(next) = self.held.remove(i) {
                    batch.push(next);
                }
            } else {
                i += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_devmodels::IrqEvent;
    use devplane_wire::IrqAction;

    fn irq(vm: u32, seq: u64) -> PendingIrq {
        irq_of(1, vm, seq)
    }

    fn irq_of(model: u32, vm: u32, seq: u64) -> PendingIrq {
        PendingIrq {
            model,
            vm,
            hypervisor: 1,
            event: IrqEvent {
                line: 4,
                action: IrqAction::Edge,
            },
            seq,
        }
    }

    /// A datagram that applied nothing new (a replay) teaches an
    /// address only where none is known: it cannot move a VM's
    /// interrupts elsewhere.
    #[test]
    fn replays_do_not_move_a_known_address() {
        let mut p: Peers<u16> = Peers::default();
        p.learn_first(7, 1, 100);
        assert_eq!(p.get_vm(7, 1), Some(&100));
        p.learn_first(7, 1, 666);
        assert_eq!(p.get_vm(7, 1), Some(&100), "a replay moved the address");
        p.learn(7, 1, 200);
        assert_eq!(p.get_vm(7, 1), Some(&200));
    }

    /// Flushes, returning each datagram sent as (client, addr, seqs).
    fn sends<A: Copy + PartialEq>(r: &mut IrqRouter, peers: &Peers<A>) -> Vec<(u32, A, Vec<u64>)> {
        let mut out = vec![];
        r.flush(peers, |c, a, irqs| {
            out.push((c, a, irqs.iter().map(|i| i.seq).collect()));
            true
        });
        out
    }

    #[test]
    fn holds_until_client_known_then_sends_in_order() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        r.push([irq(10, 1), irq(10, 2), irq(99, 3)].into_iter());
        assert_eq!(r.dropped(), 1, "unknown VM not counted");
        assert!(sends(&mut r, &peers).is_empty());
        assert_eq!(r.held(), 2);
        peers.learn(7, 3, 5000);
        // One model's interrupts go in one datagram, in order.
        assert_eq!(sends(&mut r, &peers), vec![(7, 5000, vec![1, 2])]);
        assert_eq!(r.held(), 2, "sent, not acknowledged yet");
        r.ack(1, 2);
        assert_eq!(r.held(), 0);
    }

    /// One datagram in flight per model: what is raised meanwhile waits
    /// for the acknowledgement, then goes together; other models are not
    /// held up.
    #[test]
    fn one_datagram_in_flight_per_model() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 10, 1);
        r.push([irq_of(1, 10, 1)].into_iter());
        assert_eq!(sends(&mut r, &peers), vec![(7, 1, vec![1])]);
        r.push([irq_of(1, 10, 2), irq_of(2, 10, 50), irq_of(1, 10, 3)].into_iter());
        assert_eq!(sends(&mut r, &peers), vec![(7, 1, vec![50])]);
        assert!(
            sends(&mut r, &peers).is_empty(),
            "model 1 waits for its ack"
        );
        r.ack(1, 1);
        assert_eq!(sends(&mut r, &peers), vec![(7, 1, vec![2, 3])]);
        // A partial acknowledgement keeps the rest in flight.
        r.ack(1, 2);
        assert_eq!(r.held(), 2, "seq 3 of model 1 and seq 50 of model 2");
        r.ack(1, 3);
        r.ack(2, 50);
        assert_eq!(r.held(), 0);
        // An acknowledgement of nothing in flight changes nothing.
        r.ack(9, 1);
        assert_eq!(r.held(), 0);
    }

    /// An unacknowledged datagram is sent again, same numbers, to where its
    /// VM is now; after the retry limit it is given up and counted.
    #[test]
    fn unacknowledged_interrupts_are_resent_then_given_up() {
        let every_turn = ResendRule {
            min: Duration::ZERO,
            initial: Duration::ZERO,
            max: Duration::ZERO,
            give_up: Duration::from_secs(3600),
            max_retries: 2,
        };
        let mut r = IrqRouter::new(HashMap::from([(10, 7)])).with_rule(every_turn);
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 10, 1);
        r.push([irq(10, 1), irq(10, 2)].into_iter());
        assert_eq!(sends(&mut r, &peers), vec![(7, 1, vec![1, 2])]);
        peers.learn(7, 10, 2);
        assert_eq!(sends(&mut r, &peers), vec![(7, 2, vec![1, 2])]);
        assert_eq!(sends(&mut r, &peers), vec![(7, 2, vec![1, 2])]);
        assert_eq!(r.resent(), 2);
        assert!(sends(&mut r, &peers).is_empty(), "given up");
        assert_eq!((r.held(), r.dropped()), (0, 2));
        // Not yet due: not resent.
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        r.push([irq(10, 1)].into_iter());
        assert_eq!(sends(&mut r, &peers).len(), 1);
        assert!(sends(&mut r, &peers).is_empty());
        assert_eq!(r.resent(), 0);
    }

    /// Flushes at `now`, returning the first seq of each datagram sent.
    fn sends_at(r: &mut IrqRouter, peers: &Peers<u16>, now: Instant) -> Vec<u64> {
        let mut out = vec![];
        r.flush_at(peers, now, |_, _, irqs| {
            out.push(irqs[0].seq);
            true
        });
        out
    }

    const MS: Duration = Duration::from_millis(1);

    /// The round trip is smoothed as TCP does; the first resend waits
    /// srtt + 4 rttvar, between the floor and the cap.
    #[test]
    fn the_first_wait_follows_the_measured_round_trip() {
        let rule = ResendRule::default();
        assert_eq!(rule.first_wait(None), IRQ_RTO_INITIAL);
        // 100 us acknowledgements: the floor.
        let fast = RoundTrip::first(Duration::from_micros(100));
        assert_eq!(rule.first_wait(Some(fast)), IRQ_RTO_MIN);
        // 4 ms: 4 + 4 * 2 = 12 ms.
        let slow = RoundTrip::first(4 * MS);
        assert_eq!(rule.first_wait(Some(slow)), 12 * MS);
        // Steady 4 ms samples: the variance decays towards 4 ms.
        let mut r = slow;
        for _ in 0..50 {
            r = r.update(4 * MS);
        }
        assert_eq!(r.srtt(), 4 * MS);
        assert_eq!(rule.first_wait(Some(r)), IRQ_RTO_MIN);
        // One late sample raises both.
        let r2 = r.update(20 * MS);
        assert!(r2.srtt() > 4 * MS && rule.first_wait(Some(r2)) > 12 * MS);
        // Never above the cap.
        let huge = RoundTrip::first(Duration::from_secs(5));
        assert_eq!(rule.first_wait(Some(huge)), IRQ_RTO_MAX);
        // Each resend waits twice as long, up to the cap.
        assert_eq!(rule.next_wait(10 * MS), 20 * MS);
        assert_eq!(rule.next_wait(150 * MS), IRQ_RTO_MAX);
        assert!(!rule.gives_up(IRQ_GIVE_UP - MS, 1000));
        assert!(rule.gives_up(IRQ_GIVE_UP, 0));
    }

    /// A client that acknowledges at once is not resent to; one that does
    /// not is resent to after its wait, then twice as long each time, and
    /// given up (and counted) once the give-up time has passed.
    #[test]
    fn resends_back_off_and_give_up_after_a_bounded_time() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 10, 1);
        let t0 = Instant::now();
        r.push([irq(10, 1)].into_iter());
        assert_eq!(sends_at(&mut r, &peers, t0), [1]);
        // Not measured yet: the initial wait.
        assert!(sends_at(&mut r, &peers, t0 + IRQ_RTO_INITIAL - MS).is_empty());
        // Acknowledged after 100 us: measured.
        r.ack_at(1, 1, t0 + Duration::from_micros(100));
        assert_eq!(
            r.round_trip(7).map(|x| x.srtt()),
            Some(Duration::from_micros(100))
        );
        // The next datagram waits the floor, not the initial wait.
        let t1 = t0 + 10 * MS;
        r.push([irq(10, 2)].into_iter());
        assert_eq!(sends_at(&mut r, &peers, t1), [2]);
        assert!(sends_at(&mut r, &peers, t1 + IRQ_RTO_MIN - MS).is_empty());
        assert_eq!(r.resent(), 0);
        // Unacknowledged: resent after 5, then 10, 20, 40 ms...
        let mut at = t1;
        let mut wait = IRQ_RTO_MIN;
        let mut resends = 0;
        while at.duration_since(t1) < IRQ_GIVE_UP {
            at += wait;
            let s = sends_at(&mut r, &peers, at);
            if at.duration_since(t1) >= IRQ_GIVE_UP {
                assert!(s.is_empty(), "given up");
                break;
            }
            assert_eq!(s, [2], "resent after {:?}", at.duration_since(t1));
            resends += 1;
            let next = (wait * 2).min(IRQ_RTO_MAX);
            assert!(sends_at(&mut r, &peers, at + next - MS).is_empty());
            wait = next;
        }
        assert_eq!(r.resent(), resends);
        let most = (IRQ_GIVE_UP.as_millis() / IRQ_RTO_MAX.as_millis()) as u64 + 8;
        assert!(resends < most, "{resends} resends in {IRQ_GIVE_UP:?}");
        assert_eq!((r.held(), r.dropped()), (0, 1), "given up and counted");
        // A late acknowledgement of a resent datagram measures nothing
        // (Karn's rule): the estimate stays.
        r.push([irq(10, 3)].into_iter());
        let t2 = at + MS;
        assert_eq!(sends_at(&mut r, &peers, t2), [3]);
        assert_eq!(sends_at(&mut r, &peers, t2 + IRQ_RTO_MIN), [3]);
        r.ack_at(1, 3, t2 + 50 * MS);
        assert_eq!(
            r.round_trip(7).map(|x| x.srtt()),
            Some(Duration::from_micros(100))
        );
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn a_full_tx_ring_keeps_the_rest() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 10, 1);
        r.push([irq_of(1, 10, 1), irq_of(2, 10, 2), irq_of(3, 10, 3)].into_iter());
        let mut budget = 1;
        let mut out = vec![];
        r.flush(&peers, |_, _, irqs| {
            if budget == 0 {
                return false;
            }
            budget -= 1;
            out.extend(irqs.iter().map(|i| i.seq));
            true
        });
        assert_eq!(out, vec![1]);
        r.flush(&peers, |_, _, irqs| {
            out.extend(irqs.iter().map(|i| i.seq));
            true
        });
        assert_eq!(out, vec![1, 2, 3]);
    }

    #[test]
    fn a_suspended_vm_gets_its_interrupts_on_resume_in_order() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7), (11, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 3, 1);
        r.suspend(10);
        r.push([irq_of(1, 10, 1), irq_of(2, 11, 2), irq_of(1, 10, 3)].into_iter());
        assert_eq!(
            sends(&mut r, &peers),
            vec![(7, 1, vec![2])],
            "only the running VM's"
        );
        r.resume(10);
        assert_eq!(sends(&mut r, &peers), vec![(7, 1, vec![1, 3])]);
        r.ack(1, 3);
        r.migrate(10, 8);
        peers.learn(8, 3, 2);
        r.push([irq_of(1, 10, 4)].into_iter());
        assert_eq!(sends(&mut r, &peers), vec![(8, 2, vec![4])]);
    }

    /// A moved model's unacknowledged interrupts leave with it, oldest
    /// first, and its new owner sends them before any it raises there.
    #[test]
    fn a_moved_model_takes_its_unacknowledged_interrupts() {
        let mut old = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 10, 1);
        old.push([irq_of(1, 10, 1), irq_of(2, 10, 9)].into_iter());
        sends(&mut old, &peers);
        old.push([irq_of(1, 10, 2), irq_of(1, 10, 3)].into_iter());
        let moving = old.take_model(1);
        assert_eq!(moving.iter().map(|i| i.seq).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(old.held(), 1, "model 2's stays");
        let mut new = IrqRouter::new(HashMap::from([(10, 7)]));
        new.restore(moving);
        new.push([irq_of(1, 10, 4)].into_iter());
        assert_eq!(sends(&mut new, &peers), vec![(7, 1, vec![1, 2, 3, 4])]);
    }

    /// A client that sends from several addresses (a socket per vCPU or
    /// per VM process) gets each VM's interrupts where that VM last sent
    /// from; a VM that has not sent yet, at the client's last address.
    #[test]
    fn interrupts_go_where_their_vm_last_sent_from() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7), (11, 7), (12, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 10, 100);
        peers.learn(7, 11, 110);
        r.push([irq_of(1, 10, 1), irq_of(2, 11, 2), irq_of(3, 12, 3)].into_iter());
        let mut to = vec![];
        r.flush(&peers, |c, a, irqs| {
            to.push((irqs[0].vm, c, a));
            true
        });
        assert_eq!(to, vec![(10, 7, 100), (11, 7, 110), (12, 7, 110)]);
        // VM 10 moves to another socket.
        peers.learn(7, 10, 101);
        assert_eq!(peers.get_vm(7, 10), Some(&101));
        assert_eq!(peers.get(7), Some(&101));
        assert_eq!(peers.get_vm(8, 10), None);
    }

    #[test]
    fn vm_addresses_are_bounded() {
        let mut peers: Peers<u32> = Peers::default();
        for vm in 0..MAX_VM_PEERS as u32 + 10 {
            peers.learn(7, vm, vm);
        }
        assert_eq!(peers.by_vm.len(), MAX_VM_PEERS);
        assert_eq!(peers.refused(), 10);
        // A VM past the bound is reached at its client's last address.
        let last = MAX_VM_PEERS as u32 + 9;
        assert_eq!(peers.get_vm(7, last), Some(&last));
        assert_eq!(peers.get_vm(7, 0), Some(&0));
    }

    #[test]
    fn client_addresses_are_bounded() {
        let mut peers: Peers<u32> = Peers::default();
        for client in 0..MAX_CLIENT_PEERS as u32 + 3 {
            peers.learn(client, 1, client);
        }
        assert_eq!(peers.by_client.len(), MAX_CLIENT_PEERS);
        assert_eq!(peers.get(MAX_CLIENT_PEERS as u32 + 1), None);
        assert_eq!(peers.refused(), 3);
    }

    /// One client's interrupts cannot push another's out of the hold: each
    /// has its share.
    #[test]
    fn held_interrupts_are_bounded_per_client() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7), (20, 8)]));
        r.push((0..10).map(|s| irq(20, s)));
        r.push((0..MAX_HELD as u64 + 5).map(|s| irq(10, s)));
        assert_eq!(r.held(), MAX_HELD / 2 + 10);
        assert_eq!(r.client_limited(), MAX_HELD as u64 / 2 + 5);
        let theirs: Vec<u64> = r
            .held
            .iter()
            .filter(|i| i.vm == 20)
            .map(|i| i.seq)
            .collect();
        assert_eq!(
            theirs,
            (0..10).collect::<Vec<_>>(),
            "client 8's were pushed out"
        );
        // Client 7 keeps its newest.
        let first = r.held.iter().find(|i| i.vm == 10).map(|i| i.seq);
        assert_eq!(first, Some(MAX_HELD as u64 / 2 + 5));
    }

    #[test]
    fn bounded_hold() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        r.push((0..MAX_HELD as u64 + 5).map(|s| irq(10, s)));
        assert_eq!(r.held(), MAX_HELD);
        assert_eq!(r.dropped(), 5);
    }
}
