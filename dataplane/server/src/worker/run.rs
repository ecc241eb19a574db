//! The worker loop, shared by every [`Transport`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::dispatch::Dispatcher;
use crate::irq::{IrqRouter, Peers};

use super::backoff::Backoff;
use super::config::LoopConfig;
use super::lifecycle::WorkerCtl;
use super::stats::WorkerStats;
use super::transport::{Transport, Work};

/// What one worker thread owns besides its transport.
pub struct Worker {
    /// Its models.
    pub disp: Dispatcher,
    /// Its interrupt router.
    pub router: IrqRouter,
    /// Its loop settings (changed live by [`WorkerCtl`]).
    pub cfg: LoopConfig,
    /// Its counters.
    pub stats: Arc<WorkerStats>,
    /// Its control path.
    pub ctl: WorkerCtl,
    /// The consoles attached to its models.
    pub consoles: crate::console::WorkerTaps,
}

/// Runs the worker loop over `io` until the worker is told to stop.
pub fn run<T: Transport>(mut io: T, mut w: Worker) {
    let mut backoff = Backoff::new(w.cfg.spin_budget, w.cfg.idle_sleep);
    let mut peers: Peers<T::Peer> = Peers::default();
    let mut bulk_peers: Peers<T::Peer> = Peers::default();
    let mut last_held = (0u64, 0u64);
    while w
        .ctl
        .poll(&mut w.disp, &mut w.router, &mut w.cfg, &mut backoff)
    {
        let got = io.receive(
            w.cfg.batch,
            &mut Work {
                disp: &mut w.disp,
                router: &mut w.router,
                peers: &mut peers,
                bulk_peers: &mut bulk_peers,
                stats: &w.stats,
            },
        );
        let bulk_busy = send_bulk(&mut io, &mut w, &bulk_peers);
        // Consoles: the UARTs' output out, typed input in (its receive
        // interrupts leave with this turn's).
        w.consoles.service(&mut w.disp);
        // Counted before anything is answered: a reader that has an
        // answer sees its request counted (received, and applied or taken
        // as a duplicate). Publishing the dispatch counters only after
        // `transmit` let a client get its answer, and a test that then read
        // the counters (to check that nothing more arrives while a VM is
        // suspended) see the batch's records arrive later. The socket
        // transport answers inside `receive` and publishes the dispatch
        // counters before each send itself.
        WorkerStats::add(&w.stats.rx, got);
        if got > 0 || bulk_busy {
            w.stats.publish(&w.disp.stats());
            w.stats.publish_bulk(&w.disp.bulk().stats());
        }
        flush_irqs(&mut io, &mut w, &peers);
        publish_router(&w.router, &w.stats, &mut last_held);
        io.transmit(&w.stats);
        io.reclaim();
        if got > 0 || bulk_busy {
            w.stats.peer_limit.store(peers.refused(), Ordering::Relaxed);
            backoff.busy();
            if got == 0 && w.disp.bulk().io_in_flight() {
                // Nothing received, block I/O in flight: let the core go
                // to whoever waits for it. io_uring's workers, which do the
                // blockstore's buffered writes (ext4 takes none without
                // blocking), run on this core (they inherit the worker's
                // affinity), and a worker spinning on their completions
                // took ~70% of the core from them (`dpbench --scenario
                // blk`, write-4k-qd32: +50% requests/s with the yield).
                WorkerStats::add(&w.stats.io_yields, 1);
                std::thread::yield_now();
            }
        } else if let Some(t) = backoff.idle()
            && io.may_sleep(w.router.held())
        {
            WorkerStats::add(&w.stats.sleeps, 1);
            io.wait(t);
        }
    }
    w.stats.publish(&w.disp.stats());
    w.stats.publish_bulk(&w.disp.bulk().stats());
}

/// Collects block-request completions and queues their answers on the
/// transport (as many as it takes this turn); true while block requests
/// are in flight or answers wait (the worker does not sleep then).
fn send_bulk<T: Transport>(io: &mut T, w: &mut Worker, bulk_peers: &Peers<T::Peer>) -> bool {
    w.disp.poll_bulk();
    let stats = &w.stats;
    let bulk = w.disp.bulk();
    while let Some(o) = bulk.front() {
        if let Some(to) = bulk_peers.get_vm(o.client, o.vm) {
            if !io.queue_datagram(*to, o.bytes, stats) {
                break;
            }
        }
        bulk.pop();
    }
    bulk.busy()
}

/// Hands the interrupts raised so far (and those held) to the router,
/// which queues what it can send on the transport.
fn flush_irqs<T: Transport>(io: &mut T, w: &mut Worker, peers: &Peers<T::Peer>) {
    w.router.push(w.disp.drain_irqs());
    if w.router.held() == 0 {
        return;
    }
    let server = w.cfg.server;
    let stats = &w.stats;
    let disp = &w.disp;
    let sent = w.router.flush(peers, |client, to, irqs| {
        let key = disp.irq_key(client);
        io.queue_irq(server, client, to, irqs, key, stats)
    });
    WorkerStats::add(&w.stats.irqs_sent, sent as u64);
}

/// Publishes the router's counters when they change (an acknowledgement
/// may have emptied the router since the last flush; a datagram resent
/// while nothing else changes must show too: a run that waits for an
/// interrupt reports the resends).
fn publish_router(router: &IrqRouter, stats: &WorkerStats, last: &mut (u64, u64)) {
    let now = (router.held() as u64, router.resent());
    if now != *last {
        *last = now;
        let held = now.0;
        stats.irqs_held.store(held, Ordering::Relaxed);
        stats.irqs_resent.store(router.resent(), Ordering::Relaxed);
        stats
            .irqs_dropped
            .store(router.dropped(), Ordering::Relaxed);
        stats
            .irqs_client_limit
            .store(router.client_limited(), Ordering::Relaxed);
    }
}
