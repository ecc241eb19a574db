//! Per-worker counters, written by the worker that owns them and read by
//! anyone (tests, `dpctl stats`, the benchmark).

use std::sync::atomic::{AtomicU64, Ordering};

use crate::dispatch::DispatchStats;

/// Sub-buckets per power of two in [`ServiceHist`].
const SUB: usize = 4;
/// Buckets of [`ServiceHist`]: up to 2^40 ns.
const BUCKETS: usize = 40 * SUB;

/// Time requests spent inside a worker (from the batch that received them
/// until their answers were handed to the TX ring or socket), in a
/// log-linear histogram of atomic counters: four buckets per power of two
/// of nanoseconds, so a percentile is known to within 19%. Written by the
/// owning worker only (relaxed adds), read by anyone.
#[derive(Debug)]
pub struct ServiceHist {
    buckets: Vec<AtomicU64>,
}

impl Default for ServiceHist {
    fn default() -> ServiceHist {
        ServiceHist {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl ServiceHist {
    fn index(ns: u64) -> usize {
        let ns = ns.max(1);
        let msb = 63 - ns.leading_zeros() as usize;
        let sub = if msb >= 2 {
            ((ns >> (msb - 2)) & 3) as usize
        } else {
            0
        };
        (msb * SUB + sub).min(BUCKETS - 1)
    }

    /// The largest value that falls in bucket `i`.
    fn upper(i: usize) -> u64 {
        let (msb, sub) = (i / SUB, (i % SUB) as u64);
        if msb < 2 {
            return (2u64 << msb) - 1;
        }
        let step = 1u64 << (msb - 2);
        (1u64 << msb) + (sub + 1) * step - 1
    }

    /// Counts `n` requests that each spent `ns` nanoseconds.
    pub fn record(&self, ns: u64, n: u64) {
        if n != 0 {
            self.buckets[Self::index(ns)].fetch_add(n, Ordering::Relaxed);
        }
    }

    /// The `q` quantile (0..=1) in nanoseconds (a bucket's upper bound),
    /// or 0 when nothing was recorded.
    pub fn quantile(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::upper(i);
            }
        }
        Self::upper(BUCKETS - 1)
    }
}

/// A worker's counters. The worker publishes them for every batch with
/// relaxed stores, before the batch's answers leave (so whoever holds an
/// answer finds its request counted); readers see a recent, per-field
/// consistent value.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Time requests spent in the worker.
    pub service: ServiceHist,
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
    /// Frames with a wrong IPv4 header checksum or a wrong non-zero UDP
    /// checksum (XDP mode; in socket mode the kernel drops them).
    pub bad_checksum: AtomicU64,
    /// Acknowledgements consumed.
    pub acks: AtomicU64,
    /// Requests older than the duplicate window.
    pub stale: AtomicU64,
    /// Datagrams naming a VM of another client than the header's (or
    /// acknowledging another client's interrupts), dropped.
    pub foreign_vm: AtomicU64,
    /// Datagrams whose keyed tag was missing, of an unknown key or wrong,
    /// dropped before anything was applied.
    pub bad_tag: AtomicU64,
    /// Requests more than the duplicate window beyond it, refused.
    pub far_ahead: AtomicU64,
    /// Requests refused because a duplicate-window limit was hit.
    pub window_limit: AtomicU64,
    /// Requests answered `Busy` (not applied: their model waited on its
    /// backing store); the client sends them again.
    pub busy: AtomicU64,
    /// Retransmitted requests answered again without being re-applied.
    pub duplicates: AtomicU64,
    /// Block-request datagrams taken by the bulk engine.
    pub bulk_datagrams: AtomicU64,
    /// Block requests that change a disk (writes, flushes, discards)
    /// applied, each once.
    pub bulk_applied: AtomicU64,
    /// Retransmitted block segments or requests not applied again.
    pub bulk_duplicates: AtomicU64,
    /// Block-answer datagrams made.
    pub bulk_answers: AtomicU64,
    /// Block segments dropped: reassembly full, or the client's share of it.
    pub bulk_no_room: AtomicU64,
    /// Block segments that do not fit their request (dropped).
    pub bulk_bad_segments: AtomicU64,
    /// Partly reassembled block writes dropped after their timeout.
    pub bulk_expired: AtomicU64,
    /// Block requests older than their window (answered `Stale`).
    pub bulk_stale: AtomicU64,
    /// Block requests refused because a window limit was hit.
    pub bulk_window_limit: AtomicU64,
    /// Block requests to a model that is no disk.
    pub bulk_unsupported: AtomicU64,
    /// Block reads asking for answer segments larger than this link takes.
    pub bulk_too_big: AtomicU64,
    /// Interrupts raised by this worker's models.
    pub irqs_raised: AtomicU64,
    /// Interrupt datagrams sent.
    pub irqs_sent: AtomicU64,
    /// Interrupts not acknowledged yet: waiting for their client's address,
    /// behind their model's datagram in flight, or sent and unanswered.
    pub irqs_held: AtomicU64,
    /// Interrupt datagrams sent again for want of an acknowledgement.
    pub irqs_resent: AtomicU64,
    /// Interrupts dropped: for a VM with no client, held too long, or
    /// given up unacknowledged after [`crate::irq::IRQ_GIVE_UP`] of resends.
    pub irqs_dropped: AtomicU64,
    /// Of those, interrupts dropped because their client had its share of
    /// the hold full (the oldest of that client's went).
    pub irqs_client_limit: AtomicU64,
    /// Frames (answers, interrupts) that found the TX ring full and waited
    /// for the next round.
    pub tx_full: AtomicU64,
    /// Client or VM addresses not remembered because a peer table was
    /// full (their interrupts go to the client's address, or wait).
    pub peer_limit: AtomicU64,
    /// Times the worker went to sleep after its spin budget.
    pub sleeps: AtomicU64,
    /// Turns that received nothing while block I/O was in flight, after
    /// which the worker yielded its core (to io_uring's workers, which
    /// run there: see `worker::run`).
    pub io_yields: AtomicU64,
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
    /// See [`WorkerStats::bad_checksum`].
    pub bad_checksum: u64,
    /// See [`WorkerStats::acks`].
    pub acks: u64,
    /// See [`WorkerStats::stale`].
    pub stale: u64,
    /// See [`WorkerStats::foreign_vm`].
    pub foreign_vm: u64,
    /// See [`WorkerStats::bad_tag`].
    pub bad_tag: u64,
    /// See [`WorkerStats::far_ahead`].
    pub far_ahead: u64,
    /// See [`WorkerStats::window_limit`].
    pub window_limit: u64,
    /// See [`WorkerStats::busy`].
    pub busy: u64,
    /// See [`WorkerStats::duplicates`].
    pub duplicates: u64,
    /// See [`WorkerStats::bulk_datagrams`].
    pub bulk_datagrams: u64,
    /// See [`WorkerStats::bulk_applied`].
    pub bulk_applied: u64,
    /// See [`WorkerStats::bulk_duplicates`].
    pub bulk_duplicates: u64,
    /// See [`WorkerStats::bulk_answers`].
    pub bulk_answers: u64,
    /// See [`WorkerStats::bulk_no_room`].
    pub bulk_no_room: u64,
    /// See [`WorkerStats::bulk_bad_segments`].
    pub bulk_bad_segments: u64,
    /// See [`WorkerStats::bulk_expired`].
    pub bulk_expired: u64,
    /// See [`WorkerStats::bulk_stale`].
    pub bulk_stale: u64,
    /// See [`WorkerStats::bulk_window_limit`].
    pub bulk_window_limit: u64,
    /// See [`WorkerStats::bulk_unsupported`].
    pub bulk_unsupported: u64,
    /// See [`WorkerStats::bulk_too_big`].
    pub bulk_too_big: u64,
    /// See [`WorkerStats::irqs_raised`].
    pub irqs_raised: u64,
    /// See [`WorkerStats::irqs_sent`].
    pub irqs_sent: u64,
    /// See [`WorkerStats::irqs_held`].
    pub irqs_held: u64,
    /// See [`WorkerStats::irqs_resent`].
    pub irqs_resent: u64,
    /// See [`WorkerStats::irqs_dropped`].
    pub irqs_dropped: u64,
    /// See [`WorkerStats::irqs_client_limit`].
    pub irqs_client_limit: u64,
    /// See [`WorkerStats::tx_full`].
    pub tx_full: u64,
    /// See [`WorkerStats::peer_limit`].
    pub peer_limit: u64,
    /// See [`WorkerStats::sleeps`].
    pub sleeps: u64,
    /// See [`WorkerStats::io_yields`].
    pub io_yields: u64,
    /// See [`WorkerStats::drop_unknown_model`].
    pub drop_unknown_model: u64,
    /// See [`WorkerStats::drop_unknown_client`].
    pub drop_unknown_client: u64,
    /// See [`WorkerStats::drop_spoofed`].
    pub drop_spoofed: u64,
    /// XDP mode: frames the kernel dropped for want of a fill-ring buffer
    /// (or too large) on the way to this worker's socket.
    pub xsk_rx_dropped: u64,
    /// XDP mode: frames dropped because this worker's RX ring was full.
    pub xsk_rx_ring_full: u64,
    /// XDP mode: times the fill ring was found empty.
    pub xsk_fill_ring_empty: u64,
    /// XDP mode: invalid descriptors on this worker's TX ring.
    pub xsk_tx_invalid: u64,
    /// Socket mode: datagrams the kernel dropped at this worker's socket
    /// (receive buffer full).
    pub socket_drops: u64,
    /// Median time a request spent in the worker, ns (see [`ServiceHist`]).
    pub service_p50_ns: u64,
    /// 99th percentile of the same, ns.
    pub service_p99_ns: u64,
    /// 99.9th percentile of the same, ns.
    pub service_p999_ns: u64,
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
            ("bad_checksum", self.bad_checksum),
            ("acks", self.acks),
            ("duplicates", self.duplicates),
            ("bulk_datagrams", self.bulk_datagrams),
            ("bulk_applied", self.bulk_applied),
            ("bulk_duplicates", self.bulk_duplicates),
            ("bulk_answers", self.bulk_answers),
            ("bulk_no_room", self.bulk_no_room),
            ("bulk_bad_segments", self.bulk_bad_segments),
            ("bulk_expired", self.bulk_expired),
            ("bulk_stale", self.bulk_stale),
            ("bulk_window_limit", self.bulk_window_limit),
            ("bulk_unsupported", self.bulk_unsupported),
            ("bulk_too_big", self.bulk_too_big),
            ("stale", self.stale),
            ("foreign_vm", self.foreign_vm),
            ("bad_tag", self.bad_tag),
            ("far_ahead", self.far_ahead),
            ("window_limit", self.window_limit),
            ("busy", self.busy),
            ("irqs_raised", self.irqs_raised),
            ("irqs_sent", self.irqs_sent),
            ("irqs_held", self.irqs_held),
            ("irqs_resent", self.irqs_resent),
            ("irqs_dropped", self.irqs_dropped),
            ("irqs_client_limit", self.irqs_client_limit),
            ("tx_full", self.tx_full),
            ("peer_limit", self.peer_limit),
            ("sleeps", self.sleeps),
            ("io_yields", self.io_yields),
            ("drop_unknown_model", self.drop_unknown_model),
            ("drop_unknown_client", self.drop_unknown_client),
            ("drop_spoofed", self.drop_spoofed),
            ("xsk_rx_dropped", self.xsk_rx_dropped),
            ("xsk_rx_ring_full", self.xsk_rx_ring_full),
            ("xsk_fill_ring_empty", self.xsk_fill_ring_empty),
            ("xsk_tx_invalid", self.xsk_tx_invalid),
            ("socket_drops", self.socket_drops),
            ("service_p50_ns", self.service_p50_ns),
            ("service_p99_ns", self.service_p99_ns),
            ("service_p999_ns", self.service_p999_ns),
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
        self.foreign_vm.store(d.foreign_vm, r);
        self.bad_tag.store(d.bad_tag, r);
        self.far_ahead.store(d.far_ahead, r);
        self.window_limit.store(d.window_limit, r);
        self.busy.store(d.busy, r);
        self.duplicates.store(d.duplicates, r);
        self.irqs_raised.store(d.irqs_raised, r);
    }

    /// Publishes the bulk engine's counters.
    pub fn publish_bulk(&self, b: &crate::bulk::BulkStats) {
        let r = Ordering::Relaxed;
        self.bulk_datagrams.store(b.datagrams, r);
        self.bulk_applied.store(b.applied, r);
        self.bulk_duplicates.store(b.duplicates, r);
        self.bulk_answers.store(b.answers, r);
        self.bulk_no_room.store(b.no_room, r);
        self.bulk_bad_segments.store(b.bad_segments, r);
        self.bulk_expired.store(b.expired, r);
        self.bulk_stale.store(b.stale, r);
        self.bulk_window_limit.store(b.window_limit, r);
        self.bulk_unsupported.store(b.unsupported, r);
        self.bulk_too_big.store(b.too_big, r);
    }

    /// Adds `n` to a counter.
    pub fn add(c: &AtomicU64, n: u64) {
        if n != 0 {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A copy of every counter (the kernel's drop counts, which live in
    /// the sockets, are filled in by the server).
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
            bad_checksum: self.bad_checksum.load(r),
            acks: self.acks.load(r),
            stale: self.stale.load(r),
            foreign_vm: self.foreign_vm.load(r),
            bad_tag: self.bad_tag.load(r),
            far_ahead: self.far_ahead.load(r),
            window_limit: self.window_limit.load(r),
            busy: self.busy.load(r),
            duplicates: self.duplicates.load(r),
            bulk_datagrams: self.bulk_datagrams.load(r),
            bulk_applied: self.bulk_applied.load(r),
            bulk_duplicates: self.bulk_duplicates.load(r),
            bulk_answers: self.bulk_answers.load(r),
            bulk_no_room: self.bulk_no_room.load(r),
            bulk_bad_segments: self.bulk_bad_segments.load(r),
            bulk_expired: self.bulk_expired.load(r),
            bulk_stale: self.bulk_stale.load(r),
            bulk_window_limit: self.bulk_window_limit.load(r),
            bulk_unsupported: self.bulk_unsupported.load(r),
            bulk_too_big: self.bulk_too_big.load(r),
            irqs_raised: self.irqs_raised.load(r),
            irqs_sent: self.irqs_sent.load(r),
            irqs_held: self.irqs_held.load(r),
            irqs_resent: self.irqs_resent.load(r),
            irqs_dropped: self.irqs_dropped.load(r),
            irqs_client_limit: self.irqs_client_limit.load(r),
            tx_full: self.tx_full.load(r),
            peer_limit: self.peer_limit.load(r),
            sleeps: self.sleeps.load(r),
            io_yields: self.io_yields.load(r),
            drop_unknown_model: self.drop_unknown_model.load(r),
            drop_unknown_client: self.drop_unknown_client.load(r),
            drop_spoofed: self.drop_spoofed.load(r),
            xsk_rx_dropped: 0,
            xsk_rx_ring_full: 0,
            xsk_fill_ring_empty: 0,
            xsk_tx_invalid: 0,
            socket_drops: 0,
            service_p50_ns: self.service.quantile(0.5),
            service_p99_ns: self.service.quantile(0.99),
            service_p999_ns: self.service.quantile(0.999),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_quantiles_are_within_a_bucket() {
        let h = ServiceHist::default();
        assert_eq!(h.quantile(0.5), 0, "empty");
        h.record(1_000, 90);
        h.record(50_000, 9);
        h.record(2_000_000, 1);
        let p50 = h.quantile(0.5);
        assert!((1_000..1_250).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99);
        assert!((50_000..62_500).contains(&p99), "{p99}");
        let max = h.quantile(1.0);
        assert!((2_000_000..2_500_000).contains(&max), "{max}");
        // Every value falls in a bucket whose bounds contain it.
        for v in [1u64, 2, 3, 4, 5, 7, 8, 1023, 1024, 1025, u64::MAX / 2] {
            let i = ServiceHist::index(v);
            assert!(
                ServiceHist::upper(i) >= v.min(ServiceHist::upper(BUCKETS - 1)),
                "{v}"
            );
            if i > 0 && i < BUCKETS - 1 {
                assert!(ServiceHist::upper(i - 1) < v, "{v}");
            }
        }
    }
}
