//! Per-worker counters, written by the worker that owns them and read by
//! anyone (tests, `dpctl stats`, the benchmark).

use std::sync::atomic::{AtomicU64, Ordering};

use super::dispatch::DispatchStats;

/// A worker's counters. The worker publishes them after every batch with
/// relaxed stores; readers see a recent, per-field consistent value.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Frames or datagrams received.
    pub rx: AtomicU64,
    /// Frames or datagrams sent (responses and interrupts).
    pub tx: AtomicU64,
    /// Request datagrams answered.
    pub datagrams: AtomicU64,
    /// Request records applied or answered with an error status.
    pub records: AtomicU64,
    /// Records for a model this worker does not own.
    pub no_such_model: AtomicU64,
    /// Datagrams the worker dropped as malformed (never reached a model).
    pub malformed: AtomicU64,
    /// Frames that were not UDP/IPv4 (should not happen behind XDP).
    pub bad_frames: AtomicU64,
    /// Acknowledgements consumed.
    pub acks: AtomicU64,
    /// Requests older than the duplicate window.
    pub stale: AtomicU64,
    /// Retransmitted requests answered again without being re-applied.
    pub duplicates: AtomicU64,
    /// Interrupts raised by this worker's models.
    pub irqs_raised: AtomicU64,
    /// Interrupt datagrams sent.
    pub irqs_sent: AtomicU64,
    /// Interrupts waiting for their client's address to be known.
    pub irqs_held: AtomicU64,
    /// Frames (answers, interrupts) that found the TX ring full and waited
    /// for the next round.
    pub tx_full: AtomicU64,
    /// Times the worker went to sleep after its spin budget.
    pub sleeps: AtomicU64,
    /// Socket mode: dropped, device model not served here.
    pub drop_unknown_model: AtomicU64,
    /// Socket mode: dropped, client id not registered.
    pub drop_unknown_client: AtomicU64,
    /// Socket mode: dropped, source address not the client's registered one.
    pub drop_spoofed: AtomicU64,
}

/// A plain copy of [`WorkerStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerSnapshot {
    /// See [`WorkerStats::rx`].
    pub rx: u64,
    /// See [`WorkerStats::tx`].
    pub tx: u64,
    /// See [`WorkerStats::datagrams`].
    pub datagrams: u64,
    /// See [`WorkerStats::records`].
    pub records: u64,
    /// See [`WorkerStats::no_such_model`].
    pub no_such_model: u64,
    /// See [`WorkerStats::malformed`].
    pub malformed: u64,
    /// See [`WorkerStats::bad_frames`].
    pub bad_frames: u64,
    /// See [`WorkerStats::acks`].
    pub acks: u64,
    /// See [`WorkerStats::stale`].
    pub stale: u64,
    /// See [`WorkerStats::duplicates`].
    pub duplicates: u64,
    /// See [`WorkerStats::irqs_raised`].
    pub irqs_raised: u64,
    /// See [`WorkerStats::irqs_sent`].
    pub irqs_sent: u64,
    /// See [`WorkerStats::irqs_held`].
    pub irqs_held: u64,
    /// See [`WorkerStats::tx_full`].
    pub tx_full: u64,
    /// See [`WorkerStats::sleeps`].
    pub sleeps: u64,
    /// See [`WorkerStats::drop_unknown_model`].
    pub drop_unknown_model: u64,
    /// See [`WorkerStats::drop_unknown_client`].
    pub drop_unknown_client: u64,
    /// See [`WorkerStats::drop_spoofed`].
    pub drop_spoofed: u64,
}

impl WorkerSnapshot {
    /// Every counter with a stable snake_case name.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> {
        [
            ("rx", self.rx),
            ("tx", self.tx),
            ("datagrams", self.datagrams),
            ("records", self.records),
            ("no_such_model", self.no_such_model),
            ("malformed", self.malformed),
            ("bad_frames", self.bad_frames),
            ("acks", self.acks),
            ("duplicates", self.duplicates),
            ("stale", self.stale),
            ("irqs_raised", self.irqs_raised),
            ("irqs_sent", self.irqs_sent),
            ("irqs_held", self.irqs_held),
            ("tx_full", self.tx_full),
            ("sleeps", self.sleeps),
            ("drop_unknown_model", self.drop_unknown_model),
            ("drop_unknown_client", self.drop_unknown_client),
            ("drop_spoofed", self.drop_spoofed),
        ]
        .into_iter()
    }
}

impl WorkerStats {
    /// Publishes the dispatcher's counters.
    pub fn publish(&self, d: &DispatchStats) {
        let r = Ordering::Relaxed;
        self.datagrams.store(d.datagrams, r);
        self.records.store(d.records, r);
        self.no_such_model.store(d.no_such_model, r);
        self.malformed.store(d.malformed, r);
        self.acks.store(d.acks, r);
        self.stale.store(d.stale, r);
        self.duplicates.store(d.duplicates, r);
        self.irqs_raised.store(d.irqs_raised, r);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A copy of every counter.
    pub fn snapshot(&self) -> WorkerSnapshot {
        let r = Ordering::Relaxed;
        WorkerSnapshot {
            rx: self.rx.load(r),
            tx: self.tx.load(r),
            datagrams: self.datagrams.load(r),
            records: self.records.load(r),
            no_such_model: self.no_such_model.load(r),
            malformed: self.malformed.load(r),
            bad_frames: self.bad_frames.load(r),
            acks: self.acks.load(r),
            stale: self.stale.load(r),
            duplicates: self.duplicates.load(r),
            irqs_raised: self.irqs_raised.load(r),
            irqs_sent: self.irqs_sent.load(r),
            irqs_held: self.irqs_held.load(r),
            tx_full: self.tx_full.load(r),
            sleeps: self.sleeps.load(r),
            drop_unknown_model: self.drop_unknown_model.load(r),
            drop_unknown_client: self.drop_unknown_client.load(r),
            drop_spoofed: self.drop_spoofed.load(r),
        }
    }
}
