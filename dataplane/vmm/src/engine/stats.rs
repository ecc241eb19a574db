//! The engine's counters.

use std::sync::atomic::{AtomicU64, Ordering};

/// Engine counters.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Request datagrams sent (first transmissions).
    pub tx_datagrams: AtomicU64,
    /// Request records sent (first transmissions).
    pub tx_records: AtomicU64,
    /// Datagrams sent again after a timeout.
    pub retransmits: AtomicU64,
    /// Of the retransmissions, those sent after a longer wait than
    /// `EngineConfig::retransmit` (exponential back-off).
    pub backoffs: AtomicU64,
    /// Requests given up on (`EngineConfig::horizon` passed).
    pub timeouts: AtomicU64,
    /// Answer records matched to a waiting request.
    pub answers: AtomicU64,
    /// Answers for nothing in flight (late duplicates).
    pub late: AtomicU64,
    /// Answers `Busy`: the model waited on its backing store and applied
    /// nothing; the request was sent again sooner than a retransmission.
    pub busy: AtomicU64,
    /// Datagrams that did not parse.
    pub malformed: AtomicU64,
    /// Interrupts injected.
    pub irqs: AtomicU64,
    /// Of those, the ones a vCPU thread injected from its own (direct)
    /// lane, having reaped them while it drove it; the rest the engine
    /// thread injected.
    pub irqs_on_vcpu: AtomicU64,
    /// Interrupts for a VM not on this client (dropped).
    pub irqs_unknown_vm: AtomicU64,
    /// Interrupts whose number is implausibly far from the last applied
    /// (or, for the first, ahead of the clock): dropped, not acknowledged.
    pub irq_out_of_range: AtomicU64,
    /// Interrupts of a new (model, VM) when the most streams are tracked:
    /// dropped.
    pub irq_streams_full: AtomicU64,
    /// Interrupts of a VM whose state was being or had been snapshotted
    /// (between [`crate::vmm::Client::snapshot_with`] and the client's
    /// resume): neither acknowledged nor injected, so that the server
    /// sends them again to wherever the VM runs next.
    pub irqs_frozen: AtomicU64,
    /// Interrupts the VM's irqchip refused.
    pub irq_inject_errors: AtomicU64,
    /// Datagrams whose header names another client: dropped.
    pub foreign_client: AtomicU64,
    /// Datagrams whose header names a server other than the one their
    /// socket talks to (or, answers, than their model's): dropped.
    pub foreign_server: AtomicU64,
    /// Datagrams whose tag was missing, of an unknown key or wrong:
    /// dropped before anything was applied.
    pub bad_tag: AtomicU64,
    /// Answers for a (VM, vCPU) not served here: dropped.
    pub foreign_vm: AtomicU64,
    /// Answers from a model the vCPU does not use: dropped.
    pub foreign_model: AtomicU64,
    /// Interrupts received again (a server resent a datagram whose
    /// acknowledgement it missed): acknowledged, not applied again.
    pub irq_duplicates: AtomicU64,
    /// Acknowledgements of interrupt datagrams sent.
    pub acks_sent: AtomicU64,
    /// Announcements sent to a model's new server after a retarget (an
    /// acknowledgement of nothing that tells it where interrupts go).
    pub hellos: AtomicU64,
    /// Outgoing datagrams dropped by loss injection.
    pub loss_tx: AtomicU64,
    /// Incoming datagrams dropped by loss injection.
    pub loss_rx: AtomicU64,
    /// io_uring submits (each carries a batch of sends).
    pub submits: AtomicU64,
    /// Sends that failed.
    pub send_errors: AtomicU64,
    /// Sends skipped because every send buffer was in flight.
    pub send_pool_empty: AtomicU64,
    /// Times the engine thread woke from its sleep.
    pub wakeups: AtomicU64,
    /// Kicks the engine gave vCPUs to service their lanes.
    pub kicks: AtomicU64,
}

/// Adds `n` to counter `c`.
pub(crate) fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}
