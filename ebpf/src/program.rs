//! The XDP program proper (compiled only for the BPF target).
//!
//! One parse or lookup helper per step, in the order a frame meets them
//! ([`parse_eth`], [`parse_ipv4`], [`parse_udp`], [`check_port`],
//! [`check_lengths`], [`parse_header`], [`lookup_route`],
//! [`check_client`], [`check_vm`], [`check_budget`], then [`steer`] to a
//! worker or [`forward`] to an I/O server). Each returns the next step's input or the
//! [`Verdict`] that ends the frame's way; the rules themselves are
//! `devplane_wire`'s, shared with the workers' parsers.

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use devplane_wire::frame::{
    ETH_HLEN, ETH_P_IP, EthHdr, IPPROTO_UDP, Ipv4Hdr, UDP_HLEN, UdpHdr, forward_rewrite,
    udp_lengths_ok,
};
use devplane_wire::header::{length_fits, server_accepts};
use devplane_wire::maps::{
    BUCKETS_MAP, Bucket, CLIENTS_MAP, CONFIG_CHECK_CLIENT, CONFIG_MAP, CONFIG_REDIRECT,
    COUNTER_COUNT, ClientEntry, Config, Counter, MAX_CLIENTS, MAX_MODELS, MAX_QUEUES, MAX_VMS,
    QUEUE_STATS_MAP, ROUTE_FORWARD, ROUTES_MAP, Route, STATS_MAP, VMS_MAP, VmEntry, XSKS_ENTRIES,
    XSKS_MAP, bucket_take, xsk_index,
};
use devplane_wire::{DEFAULT_PORT, HEADER_LEN, Header, RawRecord};

#[map(name = "DP_ROUTES")]
static ROUTES: HashMap<u32, Route> = HashMap::with_max_entries(MAX_MODELS, 0);

#[map(name = "DP_CLIENTS")]
static CLIENTS: HashMap<u32, ClientEntry> = HashMap::with_max_entries(MAX_CLIENTS, 0);

#[map(name = "DP_VMS")]
static VMS: HashMap<u32, VmEntry> = HashMap::with_max_entries(MAX_VMS, 0);

#[map(name = "DP_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

#[map(name = "DP_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "DP_XSKS")]
static XSKS: XskMap = XskMap::with_max_entries(XSKS_ENTRIES, 0);

#[map(name = "DP_QSTATS")]
static QSTATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_QUEUES, 0);

#[map(name = "DP_BUCKETS")]
static BUCKETS: LruPerCpuHashMap<u32, Bucket> = LruPerCpuHashMap::with_max_entries(MAX_CLIENTS, 0);

/// Whether two strings are equal, at compile time.
const fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// The `#[map]` attribute takes a literal: these tie each literal above to
// the name `devplane_wire::maps` gives the userspace loader.
const _: () = assert!(same(ROUTES_MAP, "DP_ROUTES"));
const _: () = assert!(same(CLIENTS_MAP, "DP_CLIENTS"));
const _: () = assert!(same(VMS_MAP, "DP_VMS"));
const _: () = assert!(same(STATS_MAP, "DP_STATS"));
const _: () = assert!(same(CONFIG_MAP, "DP_CONFIG"));
const _: () = assert!(same(XSKS_MAP, "DP_XSKS"));
const _: () = assert!(same(BUCKETS_MAP, "DP_BUCKETS"));
const _: () = assert!(same(QUEUE_STATS_MAP, "DP_QSTATS"));

/// How a frame's way ends: the counter to bump and the `xdp_action`.
#[derive(Clone, Copy)]
struct Verdict {
    counter: Counter,
    action: u32,
}

/// The outcome of one step: its result, or the frame's verdict.
type Step<T> = Result<T, Verdict>;

#[inline(always)]
fn drop_as(counter: Counter) -> Verdict {
    Verdict {
        counter,
        action: XDP_DROP,
    }
}

#[inline(always)]
fn pass_as(counter: Counter) -> Verdict {
    Verdict {
        counter,
        action: XDP_PASS,
    }
}

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot of this CPU; XDP runs with preemption
        // disabled, so no one else writes it concurrently.
        unsafe { *p += 1 };
    }
}

/// A reference to the `T` at `offset` in the frame, if the whole `T` is
/// inside it.
#[inline(always)]
fn header_at<T>(ctx: &XdpContext, offset: usize) -> Step<&T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(drop_as(Counter::DropTruncated));
    }
    let p = (start + offset) as *const T;
    // SAFETY: the whole `T` lies within [data, data_end) (checked above),
    // memory the kernel keeps for the program's run; every `T` read here
    // is a `devplane_wire` header of unaligned byte fields, valid for any
    // bit pattern.
    Ok(unsafe { &*p })
}

/// A mutable reference to the `T` at `offset` in the frame, if the whole
/// `T` is inside it.
#[inline(always)]
fn header_mut<T>(ctx: &XdpContext, offset: usize) -> Step<&mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(drop_as(Counter::DropTruncated));
    }
    let p = (start + offset) as *mut T;
    // SAFETY: as in `header_at`; the program owns the frame's bytes for
    // its run and the callers take disjoint headers.
    Ok(unsafe { &mut *p })
}

/// Ethernet: IPv4 goes on, anything else passes.
#[inline(always)]
fn parse_eth(ctx: &XdpContext) -> Step<()> {
    let eth: &EthHdr = header_at(ctx, 0)?;
    if eth.ethertype.get() != ETH_P_IP {
        return Err(pass_as(Counter::PassNotIpv4));
    }
    Ok(())
}

/// IPv4: an unfragmented UDP packet goes on; returns its header.
#[inline(always)]
fn parse_ipv4(ctx: &XdpContext) -> Step<&Ipv4Hdr> {
    let ip: &Ipv4Hdr = header_at(ctx, ETH_HLEN)?;
    if !ip.is_v4() || !ip.header_len_ok() {
        return Err(drop_as(Counter::DropBadLength));
    }
    if ip.proto != IPPROTO_UDP {
        return Err(pass_as(Counter::PassNotUdp));
    }
    if ip.is_fragment() {
        return Err(pass_as(Counter::PassFragment));
    }
    Ok(ip)
}

/// UDP: returns the header behind the IPv4 header `ip`.
#[inline(always)]
fn parse_udp<'a>(ctx: &'a XdpContext, ip: &Ipv4Hdr) -> Step<&'a UdpHdr> {
    header_at(ctx, ETH_HLEN + ip.header_len())
}

/// The program's settings.
#[inline(always)]
fn config() -> Step<&'static Config> {
    CONFIG.get(0).ok_or(drop_as(Counter::DropNoConfig))
}

/// Only the devplane port goes on; other UDP passes.
#[inline(always)]
fn check_port(udp: &UdpHdr, cfg: &Config) -> Step<()> {
    let port = if cfg.port == 0 {
        DEFAULT_PORT
    } else {
        cfg.port
    };
    if udp.dst.get() != port {
        return Err(pass_as(Counter::PassOtherPort));
    }
    Ok(())
}

/// The IPv4 and UDP lengths agree with each other and with the frame;
/// returns the UDP payload's length.
#[inline(always)]
fn check_lengths(ctx: &XdpContext, ip: &Ipv4Hdr, udp: &UdpHdr) -> Step<usize> {
    let frame_len = ctx.data_end() - ctx.data();
    let tot_len = ip.tot_len.get() as usize;
    if ETH_HLEN + tot_len > frame_len {
        return Err(drop_as(Counter::DropTruncated));
    }
    let udp_len = udp.len.get() as usize;
    if !udp_lengths_ok(tot_len, ip.header_len(), udp_len) {
        return Err(drop_as(Counter::DropBadLength));
    }
    Ok(udp_len - UDP_HLEN)
}

/// The devplane header: magic, version, a kind a server accepts, and a
/// record count that fills the payload exactly (a block request: one
/// block record and at most a datagram's worth of data).
#[inline(always)]
fn parse_header<'a>(ctx: &'a XdpContext, ip: &Ipv4Hdr, payload_len: usize) -> Step<&'a Header> {
    let hdr: &Header = header_at(ctx, ETH_HLEN + ip.header_len() + UDP_HLEN)?;
    if payload_len < HEADER_LEN {
        return Err(drop_as(Counter::DropTruncated));
    }
    if !hdr.magic_ok() {
        return Err(drop_as(Counter::DropBadMagic));
    }
    if !hdr.version_ok() {
        return Err(drop_as(Counter::DropBadVersion));
    }
    if !server_accepts(hdr.kind) {
        return Err(drop_as(Counter::DropBadKind));
    }
    if !length_fits(
        hdr.kind,
        hdr.count.get() as usize,
        hdr.flags.get(),
        payload_len,
    ) {
        return Err(drop_as(Counter::DropBadCount));
    }
    Ok(hdr)
}

/// Where the header's device model is served.
#[inline(always)]
fn lookup_route(hdr: &Header) -> Step<&Route> {
    let model = hdr.model.get();
    // SAFETY: the value is only read, in this run; a concurrent update from
    // userspace replaces the element atomically (the kernel frees the old
    // one after an RCU grace period, which this run is inside of).
    unsafe { ROUTES.get(&model) }.ok_or(drop_as(Counter::DropUnknownModel))
}

/// With `CONFIG_CHECK_CLIENT`: the header's client is registered and the
/// frame comes from its address; returns the client's entry (`None`
/// without the check).
#[inline(always)]
fn check_client(cfg: &Config, hdr: &Header, ip: &Ipv4Hdr) -> Step<Option<&'static ClientEntry>> {
    if cfg.flags & CONFIG_CHECK_CLIENT == 0 {
        return Ok(None);
    }
    let client = hdr.client.get();
    // SAFETY: as in `lookup_route`: read only, within this run.
    let Some(entry) = (unsafe { CLIENTS.get(&client) }) else {
        return Err(drop_as(Counter::DropUnknownClient));
    };
    if entry.ip != ip.src {
        return Err(drop_as(Counter::DropSpoofed));
    }
    Ok(Some(entry))
}

/// With `CONFIG_CHECK_CLIENT`: the first record's VM belongs to the
/// header's client (the worker checks every record; a devplane client
/// puts one vCPU's requests in a datagram, so the first is the cheap test
/// that stops a foreign datagram before it costs a worker anything).
#[inline(always)]
fn check_vm(ctx: &XdpContext, cfg: &Config, ip: &Ipv4Hdr, hdr: &Header) -> Step<()> {
    if cfg.flags & CONFIG_CHECK_CLIENT == 0 {
        return Ok(());
    }
    let rec: &RawRecord = header_at(ctx, ETH_HLEN + ip.header_len() + UDP_HLEN + HEADER_LEN)?;
    let vm = rec.vm.get();
    // SAFETY: as in `lookup_route`: read only, within this run.
    match unsafe { VMS.get(&vm) } {
        Some(entry) if entry.client == hdr.client.get() => Ok(()),
        _ => Err(drop_as(Counter::DropForeignVm)),
    }
}

/// A checked client with a budget (`burst > 0`) takes one datagram from
/// its bucket on this CPU, or the frame is dropped. A client's first frame
/// on a CPU (or one whose bucket the LRU map evicted) starts a full
/// bucket; a bucket the map could not store admits, as no budget does.
#[inline(always)]
fn check_budget(hdr: &Header, entry: Option<&ClientEntry>) -> Step<()> {
    let Some(entry) = entry else {
        return Ok(());
    };
    let (rate, burst) = (entry.rate, entry.burst);
    if burst == 0 {
        return Ok(());
    }
    let client = hdr.client.get();
    // SAFETY: a helper without arguments or side effects.
    let now = unsafe { bpf_ktime_get_ns() };
    let admitted = match BUCKETS.get_ptr_mut(&client) {
        Some(p) => {
            // SAFETY: this CPU's value of a per-CPU map; XDP runs with
            // preemption disabled, so only this run writes it now. A
            // userspace update replaces it whole.
            let b = unsafe { &mut *p };
            if b.last_ns == 0 {
                // Another CPU created the entry; this CPU's value is zero.
                *b = Bucket::full(burst, now);
            }
            bucket_take(b, rate, burst, now)
        }
        None => {
            let mut b = Bucket::full(burst, now);
            let admitted = bucket_take(&mut b, rate, burst, now);
            let _ = BUCKETS.insert(&client, &b, 0);
            admitted
        }
    };
    if admitted {
        Ok(())
    } else {
        Err(drop_as(Counter::DropOverBudget))
    }
}

/// The device RX queue the frame arrived on.
#[inline(always)]
fn rx_queue(ctx: &XdpContext) -> u32 {
    // SAFETY: `ctx.ctx` is the kernel's `xdp_md` for this run.
    unsafe { (*ctx.ctx).rx_queue_index }
}

/// Redirects to the owning worker's socket on the frame's RX queue (an
/// AF_XDP socket only takes frames of the queue it is bound to), counted
/// per queue; or passes, in socket mode.
#[inline(always)]
fn steer(cfg: &Config, route: &Route, queue: u32) -> Verdict {
    if cfg.flags & CONFIG_REDIRECT == 0 {
        return pass_as(Counter::PassRouted);
    }
    let Some(slot) = xsk_index(queue, route.worker) else {
        return drop_as(Counter::DropNoSocket);
    };
    match XSKS.redirect(slot, 0) {
        Ok(action) => {
            if let Some(p) = QSTATS.get_ptr_mut(queue) {
                // SAFETY: as in `count`: this CPU's slot, preemption off.
                unsafe { *p += 1 };
            }
            Verdict {
                counter: Counter::Redirected,
                action,
            }
        }
        Err(_) => drop_as(Counter::DropNoSocket),
    }
}

/// A model hosted behind this owner server: the frame is rewritten for
/// its I/O server (`forward_rewrite`: destination MAC, IPv4 destination
/// and TTL, both checksums; the client stays the source, so the I/O
/// server answers it straight) and sent back out of this interface with
/// `XDP_TX`.
#[inline(always)]
fn forward(ctx: &XdpContext, cfg: &Config, route: &Route) -> Verdict {
    let step = || -> Step<Verdict> {
        let eth: &mut EthHdr = header_mut(ctx, 0)?;
        let ip: &mut Ipv4Hdr = header_mut(ctx, ETH_HLEN)?;
        let ihl = ip.header_len();
        let udp: &mut UdpHdr = header_mut(ctx, ETH_HLEN + ihl)?;
        let port = if cfg.port == 0 {
            DEFAULT_PORT
        } else {
            cfg.port
        };
        match forward_rewrite(eth, ip, udp, route.forward_mac, route.forward_ip, port) {
            Ok(()) => Ok(Verdict {
                counter: Counter::Forwarded,
                action: XDP_TX,
            }),
            Err(_) => Err(drop_as(Counter::DropTtl)),
        }
    };
    match step() {
        Ok(v) | Err(v) => v,
    }
}

/// Every step in order.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Step<Verdict> {
    parse_eth(ctx)?;
    let ip = parse_ipv4(ctx)?;
    let udp = parse_udp(ctx, ip)?;
    let cfg = config()?;
    check_port(udp, cfg)?;
    // From here on the frame claims to be devplane's: anything wrong drops.
    let payload_len = check_lengths(ctx, ip, udp)?;
    let hdr = parse_header(ctx, ip, payload_len)?;
    let route = lookup_route(hdr)?;
    let client = check_client(cfg, hdr, ip)?;
    check_vm(ctx, cfg, ip, hdr)?;
    check_budget(hdr, client)?;
    if route.flags & ROUTE_FORWARD != 0 {
        return Ok(forward(ctx, cfg, route));
    }
    Ok(steer(cfg, route, rx_queue(ctx)))
}

/// The entry point: returns an `xdp_action`.
#[xdp]
pub fn devplane_xdp(ctx: XdpContext) -> u32 {
    count(Counter::Rx);
    let v = match classify(&ctx) {
        Ok(v) | Err(v) => v,
    };
    count(v.counter);
    v.action
}
