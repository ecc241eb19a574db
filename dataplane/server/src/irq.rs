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
    sent_at: Instant,
    retries: u32,
}

/// Finds the client of each interrupt's VM, holds interrupts whose client
/// has not been heard from yet, and sends each model's interrupts reliably:
/// one datagram in flight per model (what is raised meanwhile waits and
/// goes in the next, up to 36 at once), sent again with the same sequence
/// numbers until the client acknowledges it, so that interrupts are neither
/// lost nor reordered when UDP drops a datagram. The client applies each
/// sequence number once and acknowledges what it has.
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
    retransmit: Duration,
    max_retries: u32,
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

/// Resend an unacknowledged interrupt datagram after this.
pub const IRQ_RETRANSMIT: Duration = Duration::from_millis(2);
/// Give an interrupt datagram up after this many resends (about 100 ms):
/// its client is gone.
pub const IRQ_MAX_RETRIES: u32 = 50;

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
            retransmit: IRQ_RETRANSMIT,
            max_retries: IRQ_MAX_RETRIES,
            waiting: Vec::new(),
        }
    }

    /// Other retransmission settings (tests).
    pub fn with_retransmit(mut self, after: Duration, max_retries: u32) -> IrqRouter {
        self.retransmit = after;
        self.max_retries = max_retries;
        self
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
    /// given up after [`IRQ_MAX_RETRIES`] resends.
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
        if let Some(f) = self.flights.get_mut(&model) {
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
        mut send: impl FnMut(u32, A, &[PendingIrq]) -> bool,
    ) -> usize {
        let now = Instant::now();
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
        let mut blocked = false;
        let mut gave_up = Vec::new();
        for (&model, f) in self.flights.iter_mut() {
            if now.duration_since(f.sent_at) < self.retransmit {
                continue;
            }
            if f.retries >= self.max_retries {
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
                self.flights.insert(
                    model,
                    Flight {
                        irqs: std::mem::take(&mut batch),
                        sent_at: now,
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
        let mut r = IrqRouter::new(HashMap::from([(10, 7)])).with_retransmit(Duration::ZERO, 2);
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
