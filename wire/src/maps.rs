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
/// `XskMap`: AF_XDP socket per worker index.
pub const XSKS_MAP: &str = "DP_XSKS";
/// Name of the XDP program in the object file.
pub const XDP_PROGRAM: &str = "devplane_xdp";

/// Capacity of the routing map.
pub const MAX_MODELS: u32 = 4096;
/// Capacity of the clients map.
pub const MAX_CLIENTS: u32 = 1024;
/// Capacity of the VMs map.
pub const MAX_VMS: u32 = 4096;
/// Capacity of the AF_XDP socket map (workers per server).
pub const MAX_WORKERS: u32 = 64;

/// Route flag: the model is served by a worker of this server.
pub const ROUTE_LOCAL: u32 = 1;
/// Route flag: the model is owned by another server; forward there.
pub const ROUTE_FORWARD: u32 = 2;

/// Value of [`ROUTES_MAP`].
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct Route {
    /// Index of the owning worker in [`XSKS_MAP`].
    pub worker: u32,
    /// Server platform id that owns the model.
    pub server: u32,
    /// `ROUTE_*` flags.
    pub flags: u32,
    /// Owning server's IPv4 address, for forwarding.
    pub forward_ip: [u8; 4],
    /// Owning server's MAC (or next hop), for forwarding.
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
    /// Forwarded to the owning server (XDP_TX).
    Forwarded = 17,
    /// Dropped: the program's config entry is missing.
    DropNoConfig = 18,
    /// Dropped: the first record's VM is not in [`VMS_MAP`] or belongs to
    /// another client than the header's (if checking clients).
    DropForeignVm = 19,
}

/// Number of counters; the size of [`STATS_MAP`].
pub const COUNTER_COUNT: u32 = 20;

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
}
