//! The eBPF maps shared by the XDP program (`ebpf/`), the server data plane
//! (`dataplane/`) and the control plane (`control/`): their names, key and
//! value types, and the statistics counters.
//!
//! All values are `repr(C)` with explicit padding so that they have no
//! uninitialised bytes; IPv4 addresses are stored in network byte order as
//! `[u8; 4]`.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// `HashMap<u32 model id, Route>`: where each device model is served.
pub const ROUTES_MAP: &str = "DP_ROUTES";
/// `HashMap<u32 client id, ClientEntry>`: registered client platforms.
pub const CLIENTS_MAP: &str = "DP_CLIENTS";
/// `HashMap<u32 vm id, VmEntry>`: VMs and the client that hosts each.
pub const VMS_MAP: &str = "DP_VMS";
/// `PerCpuArray<u64>` indexed by [`Counter`]: verdicts and drop reasons.
pub const STATS_MAP: &str = "DP_STATS";
/// `Array<Config>` of one entry: the program's settings.
pub const CONFIG_MAP: &str = "DP_CONFIG";
/// `XskMap` of [`XSKS_ENTRIES`]: each worker's AF_XDP socket on each
/// device queue, at [`xsk_index`]`(queue, worker)`.
pub const XSKS_MAP: &str = "DP_XSKS";
/// `PerCpuArray<u64>` of [`MAX_QUEUES`]: requests the program redirected
/// to a worker from each device RX queue.
pub const QUEUE_STATS_MAP: &str = "DP_QSTATS";
/// `LruPerCpuHashMap<u32 client id, Bucket>`: each client's token bucket
/// on each CPU, owned by the XDP program (created on a client's first
/// frame, full).
pub const BUCKETS_MAP: &str = "DP_BUCKETS";
/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "devplane_xdp";

/// Capacity of the routing map.
pub const MAX_MODELS: u32 = 4096;
/// Capacity of the clients map.
pub const MAX_CLIENTS: u32 = 1024;
/// Capacity of the VMs map (a server holds 10,000 registered VMs with
/// room to spare).
pub const MAX_VMS: u32 = 16384;
/// Capacity of the AF_XDP socket map (workers per server).
pub const MAX_WORKERS: u32 = 64;
/// Most device RX queues a server serves (a real NIC with more is set to
/// fewer with `ethtool -L`).
pub const MAX_QUEUES: u32 = 64;
/// Capacity of [`XSKS_MAP`]: a socket per worker per queue.
pub const XSKS_ENTRIES: u32 = MAX_WORKERS * MAX_QUEUES;

/// The slot of worker `worker`'s socket on device queue `queue` in
/// [`XSKS_MAP`] (an AF_XDP socket receives only frames of the queue it
/// is bound to, so the program picks the socket by queue and worker).
/// `None` outside [`MAX_QUEUES`] x [`MAX_WORKERS`].
#[inline(always)]
pub const fn xsk_index(queue: u32, worker: u32) -> Option<u32> {
    if queue < MAX_QUEUES && worker < MAX_WORKERS {
        Some(queue * MAX_WORKERS + worker)
    } else {
        None
    }
}

/// Route flag: the model is served by a worker of this server.
pub const ROUTE_LOCAL: u32 = 1;
/// Route flag: the model is hosted by another server (an I/O server
/// behind this owner server); requests are rewritten to it and sent on
/// with `XDP_TX` ([`crate::frame::forward_rewrite`]).
pub const ROUTE_FORWARD: u32 = 2;

/// Value of [`ROUTES_MAP`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Route {
    /// Index of the owning worker (its sockets in [`XSKS_MAP`] are at
    /// [`xsk_index`]`(queue, worker)`).
    pub worker: u32,
    /// Server platform id that owns the model.
    pub server: u32,
    /// `ROUTE_*` flags.
    pub flags: u32,
    /// With [`ROUTE_FORWARD`]: the I/O server's IPv4 address (the same
    /// devplane UDP port as here).
    pub forward_ip: [u8; 4],
    /// With [`ROUTE_FORWARD`]: the I/O server's MAC (or the next hop's).
    pub forward_mac: [u8; 6],
    /// Padding, zero.
    pub pad: [u8; 2],
}

/// Value of [`CLIENTS_MAP`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct ClientEntry {
    /// The client's registered IPv4 address; requests from elsewhere are
    /// dropped as spoofed.
    pub ip: [u8; 4],
    /// Reserved, zero.
    pub flags: u32,
    /// Budget: datagrams per second the client's bucket refills with, on
    /// each CPU (see [`bucket_take`]).
    pub rate: u32,
    /// Budget: the bucket's size in datagrams; 0 means no budget.
    pub burst: u32,
}

/// Most datagrams a budget's burst may be (so that `burst *
/// NS_PER_SEC` fits a `u64`).
pub const MAX_BURST: u32 = 1 << 30;

/// Nanoseconds per second: a [`Bucket`] counts tokens in units of
/// 1/`NS_PER_SEC` datagram, so that a refill over any interval is exact.
pub const NS_PER_SEC: u64 = 1_000_000_000;

/// Value of [`BUCKETS_MAP`]: one client's token bucket on one CPU.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Bucket {
    /// Tokens left, in units of 1/[`NS_PER_SEC`] datagram.
    pub tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

impl Bucket {
    /// A full bucket for `burst` datagrams, as of `now_ns`.
    #[inline(always)]
    pub const fn full(burst: u32, now_ns: u64) -> Bucket {
        let burst = if burst > MAX_BURST { MAX_BURST } else { burst };
        Bucket {
            tokens: burst as u64 * NS_PER_SEC,
            last_ns: now_ns,
        }
    }
}

/// Token-bucket admission of one datagram at `now_ns`: refills `b` with
/// `rate` datagrams per second since its last refill (up to `burst`
/// datagrams; a larger `burst` counts as [`MAX_BURST`]), then takes one
/// datagram's worth if there is one. Returns whether the datagram is
/// admitted. `burst == 0` means no budget: always admitted, `b`
/// untouched. A clock that went back refills nothing. Never overflows:
/// the interval is capped at the time a refill from empty to full takes,
/// so `interval * rate <= burst * NS_PER_SEC < 2^64`. Shared by the XDP
/// program and its tests.
#[inline(always)]
pub fn bucket_take(b: &mut Bucket, rate: u32, burst: u32, now_ns: u64) -> bool {
    if burst == 0 {
        return true;
    }
    let burst = if burst > MAX_BURST { MAX_BURST } else { burst };
    let cap = burst as u64 * NS_PER_SEC;
    let rate = rate as u64;
    let mut elapsed = now_ns.saturating_sub(b.last_ns);
    match cap.checked_div(rate) {
        Some(q) => {
            let fill = q + 1;
            if elapsed > fill {
                elapsed = fill;
            }
            let tokens = b.tokens.saturating_add(elapsed * rate);
            b.tokens = if tokens > cap { cap } else { tokens };
        }
        // Rate 0: no refill.
        None if b.tokens > cap => b.tokens = cap,
        None => {}
    }
    if now_ns > b.last_ns {
        b.last_ns = now_ns;
    }
    if b.tokens >= NS_PER_SEC {
        b.tokens -= NS_PER_SEC;
        true
    } else {
        false
    }
}

/// Value of [`VMS_MAP`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct VmEntry {
    /// Client platform that hosts the VM.
    pub client: u32,
    /// Hypervisor id on that client.
    pub hypervisor: u32,
    /// `VM_*` flags.
    pub flags: u32,
}

/// VM flag: suspended; interrupts are held.
pub const VM_SUSPENDED: u32 = 1;

/// Config flag: drop requests whose client id is unknown or whose source
/// address is not the client's registered one.
pub const CONFIG_CHECK_CLIENT: u32 = 1;
/// Config flag: redirect routed frames to AF_XDP sockets (otherwise pass).
pub const CONFIG_REDIRECT: u32 = 2;

/// Value of [`CONFIG_MAP`] (index 0).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Config {
    /// UDP port of devplane traffic, host order; 0 means
    /// [`crate::DEFAULT_PORT`].
    pub port: u16,
    /// Padding, zero.
    pub pad: u16,
    /// This server's platform id.
    pub server: u32,
    /// `CONFIG_*` flags.
    pub flags: u32,
}

/// Per-CPU counters in [`STATS_MAP`], one verdict or drop reason each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum Counter {
    /// Every frame the program saw.
    Rx = 0,
    /// Passed: not IPv4 (ARP, IPv6, VLAN-tagged, ...).
    PassNotIpv4 = 1,
    /// Passed: IPv4 but not UDP.
    PassNotUdp = 2,
    /// Passed: UDP to another port.
    PassOtherPort = 3,
    /// Passed: an IPv4 fragment (cannot be devplane: it never fragments).
    PassFragment = 4,
    /// Dropped: truncated Ethernet, IPv4 or UDP header, or a UDP payload
    /// shorter than the devplane header.
    DropTruncated = 5,
    /// Dropped: inconsistent IPv4/UDP lengths or header length.
    DropBadLength = 6,
    /// Dropped: bad magic.
    DropBadMagic = 7,
    /// Dropped: unknown version.
    DropBadVersion = 8,
    /// Dropped: kind a server does not accept.
    DropBadKind = 9,
    /// Dropped: record count zero, too large, or not matching the length.
    DropBadCount = 10,
    /// Dropped: device model not in the routing map.
    DropUnknownModel = 11,
    /// Dropped: client id not registered.
    DropUnknownClient = 12,
    /// Dropped: source address is not the client's registered one.
    DropSpoofed = 13,
    /// Passed to the stack: a routed devplane request (socket mode).
    PassRouted = 14,
    /// Redirected to a worker's AF_XDP socket.
    Redirected = 15,
    /// Dropped: redirect failed (no socket for that worker).
    DropNoSocket = 16,
    /// Forwarded to the I/O server hosting the model (rewritten, XDP_TX).
    Forwarded = 17,
    /// Dropped: the program's config entry is missing.
    DropNoConfig = 18,
    /// Dropped: the first record's VM is not in [`VMS_MAP`] or belongs to
    /// another client than the header's (if checking clients).
    DropForeignVm = 19,
    /// Dropped: the client's budget on this CPU is spent (see
    /// [`bucket_take`]).
    DropOverBudget = 20,
    /// Dropped instead of forwarded: the IPv4 TTL ran out (a forwarding
    /// loop between servers, see [`crate::frame::forward_rewrite`]).
    DropTtl = 21,
}

/// Number of counters; the size of [`STATS_MAP`].
pub const COUNTER_COUNT: u32 = 22;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Rx,
        Counter::PassNotIpv4,
        Counter::PassNotUdp,
        Counter::PassOtherPort,
        Counter::PassFragment,
        Counter::DropTruncated,
        Counter::DropBadLength,
        Counter::DropBadMagic,
        Counter::DropBadVersion,
        Counter::DropBadKind,
        Counter::DropBadCount,
        Counter::DropUnknownModel,
        Counter::DropUnknownClient,
        Counter::DropSpoofed,
        Counter::PassRouted,
        Counter::Redirected,
        Counter::DropNoSocket,
        Counter::Forwarded,
        Counter::DropNoConfig,
        Counter::DropForeignVm,
        Counter::DropOverBudget,
        Counter::DropTtl,
    ];

    /// A stable snake_case name, for tables and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Rx => "rx",
            Counter::PassNotIpv4 => "pass_not_ipv4",
            Counter::PassNotUdp => "pass_not_udp",
            Counter::PassOtherPort => "pass_other_port",
            Counter::PassFragment => "pass_fragment",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropBadLength => "drop_bad_length",
            Counter::DropBadMagic => "drop_bad_magic",
            Counter::DropBadVersion => "drop_bad_version",
            Counter::DropBadKind => "drop_bad_kind",
            Counter::DropBadCount => "drop_bad_count",
            Counter::DropUnknownModel => "drop_unknown_model",
            Counter::DropUnknownClient => "drop_unknown_client",
            Counter::DropSpoofed => "drop_spoofed",
            Counter::PassRouted => "pass_routed",
            Counter::Redirected => "redirected",
            Counter::DropNoSocket => "drop_no_socket",
            Counter::Forwarded => "forwarded",
            Counter::DropNoConfig => "drop_no_config",
            Counter::DropForeignVm => "drop_foreign_vm",
            Counter::DropOverBudget => "drop_over_budget",
            Counter::DropTtl => "drop_ttl",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), has no padding (zerocopy's IntoBytes
    // derive proves it) and every bit pattern is valid (FromBytes).
    unsafe impl aya::Pod for super::Route {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ClientEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::VmEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Bucket {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xsk_slots_are_distinct_and_bounded() {
        let mut seen = [false; XSKS_ENTRIES as usize];
        for q in 0..MAX_QUEUES {
            for w in 0..MAX_WORKERS {
                let i = xsk_index(q, w).expect("in range");
                assert!(i < XSKS_ENTRIES);
                assert!(!seen[i as usize]);
                seen[i as usize] = true;
            }
        }
        assert_eq!(xsk_index(MAX_QUEUES, 0), None);
        assert_eq!(xsk_index(0, MAX_WORKERS), None);
        assert_eq!(xsk_index(u32::MAX, u32::MAX), None);
    }

    #[test]
    fn no_budget_admits_everything_and_keeps_the_bucket() {
        let mut b = Bucket::default();
        for t in 0..1000 {
            assert!(bucket_take(&mut b, 0, 0, t));
        }
        assert_eq!(b, Bucket::default());
    }

    #[test]
    fn a_full_bucket_admits_burst_then_drops_without_refill() {
        let mut b = Bucket::full(8, 100);
        let admitted = (0..13).filter(|_| bucket_take(&mut b, 0, 8, 100)).count();
        assert_eq!(admitted, 8);
        // Rate 0 never refills, however much time passes.
        assert!(!bucket_take(&mut b, 0, 8, u64::MAX));
    }

    #[test]
    fn refill_is_exact_in_fractions_of_a_datagram() {
        // 3 datagrams per second: one every 333_333_333.3 ns.
        let mut b = Bucket::full(1, 0);
        assert!(bucket_take(&mut b, 3, 1, 0));
        assert!(!bucket_take(&mut b, 3, 1, 333_333_333));
        assert!(bucket_take(&mut b, 3, 1, 333_333_334));
        // The refill before was capped at the burst, so the bucket is
        // empty: refills of a third each make one whole datagram after
        // 333_333_334 ns, not before.
        assert!(!bucket_take(&mut b, 3, 1, 333_333_334 + 111_111_111));
        assert!(!bucket_take(&mut b, 3, 1, 333_333_334 + 222_222_222));
        assert!(!bucket_take(&mut b, 3, 1, 333_333_334 + 333_333_333));
        assert!(bucket_take(&mut b, 3, 1, 333_333_334 + 333_333_334));
    }

    #[test]
    fn refill_never_exceeds_burst() {
        let mut b = Bucket::full(4, 0);
        for _ in 0..4 {
            assert!(bucket_take(&mut b, 1_000_000, 4, 0));
        }
        // A long pause refills only to the burst.
        let t = 3600 * NS_PER_SEC;
        let admitted = (0..10)
            .filter(|_| bucket_take(&mut b, 1_000_000, 4, t))
            .count();
        assert_eq!(admitted, 4);
    }

    #[test]
    fn a_clock_going_back_refills_nothing() {
        let mut b = Bucket::full(1, 1_000);
        assert!(bucket_take(&mut b, 1_000, 1, 1_000));
        assert!(!bucket_take(&mut b, 1_000, 1, 10));
        assert_eq!(b.last_ns, 1_000);
    }

    #[test]
    fn a_smaller_burst_set_live_caps_the_tokens() {
        let mut b = Bucket::full(100, 0);
        let admitted = (0..100).filter(|_| bucket_take(&mut b, 0, 2, 0)).count();
        assert_eq!(admitted, 2);
    }

    proptest::proptest! {
        #[test]
        fn admitted_never_exceeds_burst_plus_rate_times_time(
            rate in 0u32..=u32::MAX,
            burst in 1u32..=u32::MAX,
            steps in proptest::collection::vec(0u64..2_000_000_000, 1..200),
        ) {
            let mut b = Bucket::full(burst, 0);
            let mut now = 0u64;
            let mut admitted = 0u128;
            for d in steps {
                now += d;
                if bucket_take(&mut b, rate, burst, now) {
                    admitted += 1;
                }
                let cap = burst.min(MAX_BURST) as u128;
                let bound = cap + (now as u128 * rate as u128) / NS_PER_SEC as u128;
                proptest::prop_assert!(admitted <= bound);
                proptest::prop_assert!(b.tokens <= cap as u64 * NS_PER_SEC);
            }
        }
    }
}
