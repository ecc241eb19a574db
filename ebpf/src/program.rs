//! The XDP program proper (compiled only for the BPF target).

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, HashMap, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use devplane_wire::frame::{
    ETH_HLEN, ETH_P_IP, EthHdr, IP_MF_OFFSET_MASK, IPPROTO_UDP, IPV4_MIN_HLEN, Ipv4Hdr, UDP_HLEN,
    UdpHdr,
};
use devplane_wire::maps::{
    CONFIG_CHECK_CLIENT, CONFIG_REDIRECT, COUNTER_COUNT, ClientEntry, Config, Counter, MAX_CLIENTS,
    MAX_MODELS, MAX_VMS, MAX_WORKERS, Route, VmEntry,
};
use devplane_wire::{
    DEFAULT_PORT, HEADER_LEN, Header, Kind, MAGIC, MAX_RECORDS, RECORD_LEN, VERSION,
};

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
static XSKS: XskMap = XskMap::with_max_entries(MAX_WORKERS, 0);

#[inline(always)]
fn count(c: Counter) {
    if let Some(p) = STATS.get_ptr_mut(c as u32) {
        // SAFETY: a per-CPU slot of this CPU; XDP runs with preemption
        // disabled, so no one else writes it concurrently.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn verdict(c: Counter, action: u32) -> u32 {
    count(c);
    action
}

/// A pointer to a `T` at `offset` in the frame, if the whole `T` is inside.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The entry point: returns an `xdp_action`.
#[xdp]
pub fn devplane_xdp(ctx: XdpContext) -> u32 {
    count(Counter::Rx);
    classify(&ctx)
}

#[inline(always)]
fn classify(ctx: &XdpContext) -> u32 {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return verdict(Counter::DropTruncated, XDP_DROP);
    };
    // SAFETY (all header reads below): `ptr_at` checked the whole header
    // lies within [data, data_end); the types are unaligned byte arrays.
    if unsafe { (*eth).ethertype.get() } != ETH_P_IP {
        return verdict(Counter::PassNotIpv4, XDP_PASS);
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN) else {
        return verdict(Counter::DropTruncated, XDP_DROP);
    };
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 {
        return verdict(Counter::DropBadLength, XDP_DROP);
    }
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    if ihl < IPV4_MIN_HLEN {
        return verdict(Counter::DropBadLength, XDP_DROP);
    }
    if ip.proto != IPPROTO_UDP {
        return verdict(Counter::PassNotUdp, XDP_PASS);
    }
    if ip.frag_off.get() & IP_MF_OFFSET_MASK != 0 {
        return verdict(Counter::PassFragment, XDP_PASS);
    }
    let udp_off = ETH_HLEN + ihl;
    let Some(udp) = ptr_at::<UdpHdr>(ctx, udp_off) else {
        return verdict(Counter::DropTruncated, XDP_DROP);
    };
    let udp = unsafe { &*udp };
    let Some(cfg) = CONFIG.get(0) else {
        return verdict(Counter::DropNoConfig, XDP_DROP);
    };
    let port = if cfg.port == 0 {
        DEFAULT_PORT
    } else {
        cfg.port
    };
    if udp.dst.get() != port {
        return verdict(Counter::PassOtherPort, XDP_PASS);
    }
    // From here on the frame claims to be devplane's: anything wrong drops.
    let frame_len = ctx.data_end() - ctx.data();
    let tot_len = ip.tot_len.get() as usize;
    if ETH_HLEN + tot_len > frame_len {
        return verdict(Counter::DropTruncated, XDP_DROP);
    }
    let udp_len = udp.len.get() as usize;
    if tot_len < ihl + UDP_HLEN || udp_len < UDP_HLEN || udp_len > tot_len - ihl {
        return verdict(Counter::DropBadLength, XDP_DROP);
    }
    let payload_len = udp_len - UDP_HLEN;
    let Some(hdr) = ptr_at::<Header>(ctx, udp_off + UDP_HLEN) else {
        return verdict(Counter::DropTruncated, XDP_DROP);
    };
    if payload_len < HEADER_LEN {
        return verdict(Counter::DropTruncated, XDP_DROP);
    }
    let hdr = unsafe { &*hdr };
    if hdr.magic.get() != MAGIC {
        return verdict(Counter::DropBadMagic, XDP_DROP);
    }
    if hdr.version != VERSION {
        return verdict(Counter::DropBadVersion, XDP_DROP);
    }
    if hdr.kind != Kind::Request as u8 && hdr.kind != Kind::Ack as u8 {
        return verdict(Counter::DropBadKind, XDP_DROP);
    }
    let records = hdr.count.get() as usize;
    if records == 0 || records > MAX_RECORDS || HEADER_LEN + records * RECORD_LEN != payload_len {
        return verdict(Counter::DropBadCount, XDP_DROP);
    }
    let model = hdr.model.get();
    let Some(route) = (unsafe { ROUTES.get(&model) }) else {
        return verdict(Counter::DropUnknownModel, XDP_DROP);
    };
    if cfg.flags & CONFIG_CHECK_CLIENT != 0 {
        let client = hdr.client.get();
        let Some(entry) = (unsafe { CLIENTS.get(&client) }) else {
            return verdict(Counter::DropUnknownClient, XDP_DROP);
        };
        if entry.ip != ip.src {
            return verdict(Counter::DropSpoofed, XDP_DROP);
        }
    }
    if cfg.flags & CONFIG_REDIRECT == 0 {
        return verdict(Counter::PassRouted, XDP_PASS);
    }
    match XSKS.redirect(route.worker, 0) {
        Ok(action) => verdict(Counter::Redirected, action),
        Err(_) => verdict(Counter::DropNoSocket, XDP_DROP),
    }
}

/// Keeps the VMs map in the object for userspace (interrupt routing); the
/// program itself does not read it yet.
#[inline(never)]
#[allow(dead_code)]
fn vms() -> &'static HashMap<u32, VmEntry> {
    &VMS
}
