//! What a worker loop needs of a transport (AF_XDP rings or a UDP socket).

use std::time::Duration;

use crate::dispatch::{Dispatcher, PendingIrq};
use crate::irq::{IrqRouter, Peers};

use super::stats::WorkerStats;

/// What received frames are handed to: the worker's dispatcher, its
/// interrupt router (for acknowledgements), where its clients were heard
/// from, and its counters.
pub struct Work<'a, P> {
    /// Applies requests.
    pub disp: &'a mut Dispatcher,
    /// Takes acknowledgements.
    pub router: &'a mut IrqRouter,
    /// Learns where each client (and VM) sends from.
    pub peers: &'a mut Peers<P>,
    /// Where each (client, VM) sends block requests from (their answers
    /// go there, whatever port its interrupts take).
    pub bulk_peers: &'a mut Peers<P>,
    /// The worker's counters.
    pub stats: &'a WorkerStats,
}

/// One worker's side of a transport. Every method is called from the
/// worker's thread only, once per turn of its loop, in this order:
/// [`Transport::receive`], [`Transport::queue_irq`] (any number of times),
/// [`Transport::transmit`], [`Transport::reclaim`].
pub trait Transport {
    /// Where a client is reached (a frame flow, a socket address).
    type Peer: Copy + PartialEq;

    /// Receives at most `max` frames, hands each to dispatch through
    /// `work` and queues the answers; returns how many were received.
    fn receive(&mut self, max: u32, work: &mut Work<'_, Self::Peer>) -> u64;

    /// Queues (or sends) one interrupt datagram of `irqs` (all of one
    /// model) to `client` at `to`, sealed with `key` (the client's
    /// current key, if it has one); `false` when there is no room now.
    #[allow(clippy::too_many_arguments)]
    fn queue_irq(
        &mut self,
        server: u32,
        client: u32,
        to: Self::Peer,
        irqs: &[PendingIrq],
        key: Option<&devplane_wire::tag::TagKey>,
        stats: &WorkerStats,
    ) -> bool;

    /// Queues (or sends) one datagram (a block answer, already sealed)
    /// to `to`; `false` when there is no room now (it is offered again
    /// next turn).
    fn queue_datagram(&mut self, to: Self::Peer, bytes: &[u8], stats: &WorkerStats) -> bool;

    /// Transmits what this turn queued.
    fn transmit(&mut self, stats: &WorkerStats);

    /// Takes back the frames the kernel is done with.
    fn reclaim(&mut self);

    /// Whether the worker may sleep now, with `held` interrupts not yet
    /// acknowledged.
    fn may_sleep(&self, held: usize) -> bool;

    /// Sleeps until traffic arrives or `timeout` passes.
    fn wait(&self, timeout: Duration);
}
