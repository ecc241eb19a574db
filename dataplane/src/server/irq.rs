//! Routing device-initiated interrupts to the client that hosts each VM.

use std::collections::{HashMap, HashSet, VecDeque};

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
}

/// Most (client, VM) addresses remembered; VMs beyond it use their
/// client's address (a client could send requests for any VM id).
pub const MAX_VM_PEERS: usize = 65_536;

impl<A> Default for Peers<A> {
    fn default() -> Self {
        Peers {
            by_client: HashMap::new(),
            by_vm: HashMap::new(),
        }
    }
}

fn remember<K: std::hash::Hash + Eq, A: PartialEq>(
    map: &mut HashMap<K, A>,
    key: K,
    addr: A,
    cap: usize,
) {
    let full = map.len() >= cap;
    if let Some(a) = map.get_mut(&key) {
        // Written only when it changed: the common case reads.
        if *a != addr {
            *a = addr;
        }
    } else if !full {
        map.insert(key, addr);
    }
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
        remember(&mut self.by_client, client, addr, usize::MAX);
        remember(&mut self.by_vm, (client, vm), addr, MAX_VM_PEERS);
    }
}

/// Most interrupts held for clients not heard from yet; older ones are
/// dropped (and counted) beyond this.
pub const MAX_HELD: usize = 4096;

/// Finds the client of each interrupt's VM; holds interrupts whose client
/// has not been heard from yet.
#[derive(Debug, Default)]
pub struct IrqRouter {
    vm_client: HashMap<u32, u32>,
    held: VecDeque<PendingIrq>,
    dropped: u64,
    unknown_vm: u64,
    suspended: HashSet<u32>,
}

impl IrqRouter {
    /// A router for the given VM -> client table.
    pub fn new(vm_client: HashMap<u32, u32>) -> IrqRouter {
        IrqRouter {
            vm_client,
            ..Default::default()
        }
    }

    /// Holds `vm`'s interrupts (in order) until [`IrqRouter::resume`].
    pub fn suspend(&mut self, vm: u32) {
        self.suspended.insert(vm);
    }

    /// Lets `vm`'s held interrupts go, in the order they were raised.
    pub fn resume(&mut self, vm: u32) {
        self.suspended.remove(&vm);
    }

    /// From now on `vm`'s interrupts go to `client`.
    pub fn migrate(&mut self, vm: u32, client: u32) {
        self.vm_client.insert(vm, client);
    }

    /// Interrupts held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Interrupts dropped: held too long, or for a VM not in the table.
    pub fn dropped(&self) -> u64 {
        self.dropped + self.unknown_vm
    }

    /// Queues new interrupts behind the held ones (order is kept).
    pub fn push(&mut self, irqs: impl Iterator<Item = PendingIrq>) {
        for irq in irqs {
            if !self.vm_client.contains_key(&irq.vm) {
                self.unknown_vm += 1;
                continue;
            }
            if self.held.len() >= MAX_HELD {
                self.held.pop_front();
                self.dropped += 1;
            }
            self.held.push_back(irq);
        }
    }

    /// Sends what can be sent, in order: `send(client, addr, irq)` returns
    /// `false` when it cannot send now (no TX space), which stops the
    /// round. An interrupt for a client not heard from yet is kept, and so
    /// is everything behind it for the same client.
    pub fn flush<A: Copy + PartialEq>(
        &mut self,
        peers: &Peers<A>,
        mut send: impl FnMut(u32, A, &PendingIrq) -> bool,
    ) -> usize {
        let mut sent = 0;
        let mut keep = VecDeque::new();
        let mut blocked = false;
        while let Some(irq) = self.held.pop_front() {
            if self.suspended.contains(&irq.vm) {
                keep.push_back(irq);
                continue;
            }
            let client = self.vm_client.get(&irq.vm).copied();
            let addr = client.and_then(|c| peers.get_vm(c, irq.vm).copied().map(|a| (c, a)));
            match addr {
                Some((c, a)) if !blocked => {
                    if send(c, a, &irq) {
                        sent += 1;
                    } else {
                        blocked = true;
                        keep.push_back(irq);
                    }
                }
                _ => keep.push_back(irq),
            }
        }
        self.held = keep;
        sent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_devmodels::IrqEvent;
    use devplane_wire::IrqAction;

    fn irq(vm: u32, seq: u64) -> PendingIrq {
        PendingIrq {
            model: 1,
            vm,
            hypervisor: 1,
            event: IrqEvent {
                line: 4,
                action: IrqAction::Edge,
            },
            seq,
        }
    }

    #[test]
    fn holds_until_client_known_then_sends_in_order() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        r.push([irq(10, 1), irq(10, 2), irq(99, 3)].into_iter());
        assert_eq!(r.dropped(), 1, "unknown VM not counted");
        let mut out = vec![];
        assert_eq!(
            r.flush(&peers, |_, _, i| {
                out.push(i.seq);
                true
            }),
            0
        );
        assert_eq!(r.held(), 2);
        peers.learn(7, 3, 5000);
        assert_eq!(
            r.flush(&peers, |c, a, i| {
                out.push(i.seq);
                c == 7 && a == 5000
            }),
            2
        );
        assert_eq!(out, vec![1, 2]);
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn a_full_tx_ring_keeps_the_rest() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        let mut peers: Peers<u16> = Peers::default();
        peers.learn(7, 3, 1);
        r.push((1..=3).map(|s| irq(10, s)));
        let mut budget = 1;
        let mut out = vec![];
        r.flush(&peers, |_, _, i| {
            if budget == 0 {
                return false;
            }
            budget -= 1;
            out.push(i.seq);
            true
        });
        assert_eq!(out, vec![1]);
        r.flush(&peers, |_, _, i| {
            out.push(i.seq);
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
        r.push([irq(10, 1), irq(11, 2), irq(10, 3)].into_iter());
        let mut out = vec![];
        r.flush(&peers, |_, _, i| {
            out.push((i.vm, i.seq));
            true
        });
        assert_eq!(out, vec![(11, 2)], "only the running VM's interrupt goes");
        r.resume(10);
        r.flush(&peers, |_, _, i| {
            out.push((i.vm, i.seq));
            true
        });
        assert_eq!(out, vec![(11, 2), (10, 1), (10, 3)]);
        r.migrate(10, 8);
        peers.learn(8, 3, 2);
        r.push([irq(10, 4)].into_iter());
        let mut to = vec![];
        r.flush(&peers, |c, a, _| {
            to.push((c, a));
            true
        });
        assert_eq!(to, vec![(8, 2)]);
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
        r.push([irq(10, 1), irq(11, 2), irq(12, 3)].into_iter());
        let mut to = vec![];
        r.flush(&peers, |c, a, i| {
            to.push((i.vm, c, a));
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
        // A VM past the bound is reached at its client's last address.
        let last = MAX_VM_PEERS as u32 + 9;
        assert_eq!(peers.get_vm(7, last), Some(&last));
        assert_eq!(peers.get_vm(7, 0), Some(&0));
    }

    #[test]
    fn bounded_hold() {
        let mut r = IrqRouter::new(HashMap::from([(10, 7)]));
        r.push((0..MAX_HELD as u64 + 5).map(|s| irq(10, s)));
        assert_eq!(r.held(), MAX_HELD);
        assert_eq!(r.dropped(), 5);
    }
}
