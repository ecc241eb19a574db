//! The single-machine test and benchmark topology: two network namespaces
//! joined by a veth pair, torn down when the [`Topology`] is dropped.
//!
//! ```text
//!   netns <client>                          netns <server>
//!   +--------------------------+            +--------------------------+
//!   | <client ifname>          |   veth     | <server ifname>          |
//!   | 10.a.b.1/24  02:..:01    |<---------->| 10.a.b.2/24  02:..:02    |
//!   +--------------------------+            +--------------------------+
//! ```
//!
//! Everything is configured with iproute2 (`ip`), except two things that
//! `ip` cannot do, which are done from a thread inside the namespace: the
//! offload settings (the ethtool ioctl) and turning IPv6 off (its sysctl).
//!
//! The veth pair is configured for XDP and AF_XDP rather than left at the
//! kernel defaults:
//!
//! - **TX checksum offload off.** With it on, a UDP datagram sent by a
//!   socket crosses the veth as `CHECKSUM_PARTIAL`: the checksum field holds
//!   only the pseudo-header sum, and the frame an XDP program or an AF_XDP
//!   socket sees on the peer carries a wrong UDP checksum. Off, the sender's
//!   stack writes the full checksum (this also turns TSO off).
//! - **RX checksum offload off.** With it on, veth marks every frame that
//!   carries no checksum state (which includes frames sent through AF_XDP)
//!   as already verified, so a bad checksum from an AF_XDP sender would be
//!   accepted. Off, the receiving stack verifies like it would behind a real
//!   NIC. (A zero UDP checksum, "none", stays valid for IPv4.)
//! - **GRO on.** A veth runs its NAPI receive path only if it has an XDP
//!   program attached or GRO enabled, and `XDP_TX` / `XDP_REDIRECT` into a
//!   veth fails (the frame is dropped) without it. With GRO on, an XDP
//!   program on one end can transmit into the other end without a dummy
//!   XDP program on it.
//! - **IPv6 off** on both veths, before they come up: otherwise the kernel
//!   sends router solicitations, MLD reports and DAD probes on link-up,
//!   which an XDP program under test would see (and count) as junk.
//! - **Static neighbours** both ways (`nud permanent`), so no ARP is
//!   exchanged either.
//!
//! Each veth has one real RX and one TX queue (the kernel default), or
//! as many as [`Topology::with_queues`] asks for. On a veth the peer's RX
//! queue of a frame is the sender's TX queue, which the sender's stack
//! picks by the flow's hash (no XPS is configured): datagrams from
//! different sockets spread over the queues as RSS spreads flows on a NIC.
//!
//! Code runs inside a namespace on a thread that has `setns`-ed into it
//! ([`spawn_in_netns`], [`run_in_netns`]): sockets it opens belong to that
//! namespace, and threads it spawns inherit it. (Its view of `/sys` is still
//! the root namespace's; `ip netns exec`, which [`Topology::exec`] uses,
//! remounts `/sys`.)
//!
//! Dropping the topology deletes both namespace names, and the kernel
//! destroys a namespace, with its end of the veth pair, once nothing uses it
//! any more. A thread still inside a namespace keeps it (and the veth) alive
//! until it exits, so join namespace threads before dropping the topology.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::fs::File;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, ExitStatus, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle};

/// Where iproute2 keeps named network namespaces (bind mounts).
pub const NETNS_DIR: &str = "/var/run/netns";

/// Prefix length of the subnet the two ends share.
pub const PREFIX_LEN: u8 = 24;

/// Per-process counter that makes topology names and subnets unique.
pub(crate) static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How many names are tried when a namespace of the same name exists
/// already (left behind by a killed process whose pid has been reused).
const NAME_ATTEMPTS: u32 = 64;

/// Characters of the tag kept in interface names: `"dp"`, 3 tag
/// characters, 6 hex digits of pid, 3 of counter and the side letter make
/// 15, the most `IFNAMSIZ` allows.
const IF_TAG_CHARS: usize = 3;

/// Characters of the tag kept in namespace names.
const NETNS_TAG_CHARS: usize = 24;

/// The process id a name made by a killed process carries, if that
/// process is gone: `dp-[<tag>-]<pid>-<n>-<side>` (namespaces), or
/// `devplane-test-...-<pid>` and `dpbench-...-<pid>` (the tests' and the
/// benchmark's bpffs pin directories; a server's own pins are never named
/// so).
fn dead_owner(name: &str) -> Option<u32> {
    let parts: Vec<&str> = name.split('-').collect();
    let pid: u32 = if name.starts_with("dp-") {
        let [.., pid, n, side] = parts.as_slice() else {
            return None;
        };
        n.parse::<u32>().ok()?;
        if ![
            "client", "client2", "server", "attacker", "peer", "switch", "owner", "io", "store",
        ]
        .contains(side)
        {
            return None;
        }
        pid.parse().ok()?
    } else if name.starts_with("devplane-test-") || name.starts_with("dpbench-") {
        parts.last()?.parse().ok()?
    } else {
        return None;
    };
    (!std::path::Path::new(&format!("/proc/{pid}")).exists()).then_some(pid)
}

/// Removes what a killed process (a test that timed out, say) left behind
/// and could not clean up with its guards: its network namespaces (with
/// the veth inside) and its pin directories in bpffs. Only names whose
/// owner process no longer exists are touched. Best effort, once per
/// process.
pub(crate) fn sweep_stale() {
    if let Ok(dir) = std::fs::read_dir(NETNS_DIR) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead_owner(&name).is_some() {
                let _ = run("ip", ["netns", "del", name.as_str()]);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir("/sys/fs/bpf") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if dead_owner(&name).is_some() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Why a topology could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A command could not be started (say, `ip` is not installed).
    #[error("`{command}` could not be started: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The error from `exec`.
        #[source]
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A step done from inside a namespace (offloads, sysctl, setns) failed.
    #[error("netns {netns}: {what}: {source}")]
    Netns {
        /// The namespace.
        netns: String,
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Every candidate name was taken.
    #[error("no free topology name after {0} attempts (stale namespaces in {NETNS_DIR}?)")]
    NamesExhausted(u32),
}

impl TopologyError {
    /// Whether this is iproute2 saying the object exists already.
    fn is_exists(&self) -> bool {
        matches!(self, TopologyError::Command { stderr, .. } if stderr.contains("File exists"))
    }
}

/// One end of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The client end (`.1` in the subnet, MAC ending in `01`).
    Client,
    /// The server end (`.2` in the subnet, MAC ending in `02`).
    Server,
}

impl Side {
    /// The other end.
    pub fn peer(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }

    fn index(self) -> usize {
        match self {
            Side::Client => 0,
            Side::Server => 1,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Server => "server",
        })
    }
}

/// Two network namespaces joined by a veth pair; dropping it deletes both.
///
/// See the [module documentation](self) for how the pair is configured.
#[derive(Debug)]
pub struct Topology {
    netns: [String; 2],
    ifname: [String; 2],
    ip: [Ipv4Addr; 2],
    mac: [[u8; 6]; 2],
    /// Which namespaces this value created (and so deletes on drop).
    owned: [bool; 2],
    /// RX and TX queues of each veth (1: the kernel default).
    queues: u32,
    /// The veths' MTUs, client's then server's (`None`: the kernel's 1500).
    mtu: Option<[u32; 2]>,
}

impl Topology {
    /// Creates a fresh topology. `tag` names it (only ASCII letters, digits,
    /// `-` and `_` are kept; interface names keep its first 3 characters).
    ///
    /// Names and the subnet come from the process id and a per-process
    /// counter: names are unique on the machine, and the subnet
    /// `10.<64 + pid % 64>.<counter % 256>.0/24` is unique within the
    /// process (namespaces isolate topologies anyway, so a subnet shared with
    /// another process's topology does no harm).
    ///
    /// Needs root (`CAP_SYS_ADMIN` and `CAP_NET_ADMIN`) and iproute2.
    pub fn new(tag: &str) -> Result<Topology, TopologyError> {
        Topology::with_queues(tag, 1)
    }

    /// [`Topology::new`] for privileged test `test`, once it has `caps`:
    /// `None` when the test is to skip (or, where CI requires the
    /// capabilities, after [`crate::privilege`] has failed it) for want
    /// of them or of the namespaces.
    pub fn for_test(
        test: &str,
        caps: &[crate::privilege::Capability],
        tag: &str,
    ) -> Option<Topology> {
        if !crate::privilege::require(test, caps) {
            return None;
        }
        match Topology::new(tag) {
            Ok(t) => Some(t),
            Err(e) => {
                crate::privilege::unavailable(
                    test,
                    &format!("cannot build the netns topology: {e}"),
                );
                None
            }
        }
    }

    /// Like [`Topology::new`], with `queues` RX and TX queues on each veth
    /// (`numrxqueues` / `numtxqueues`, 1 to 64).
    pub fn with_queues(tag: &str, queues: u32) -> Result<Topology, TopologyError> {
        Topology::build(tag, queues, None)
    }

    /// Like [`Topology::new`], with the MTU of both veth ends set to `mtu`
    /// (jumbo frames: `devplane_wire::bulk::JUMBO_MTU` is the most a veth
    /// with a single-buffer XDP program takes).
    pub fn with_mtu(tag: &str, mtu: u32) -> Result<Topology, TopologyError> {
        Topology::build(tag, 1, Some([mtu, mtu]))
    }

    /// Like [`Topology::new`], with the client's veth end at MTU `client`
    /// and the server's at `server` (a link whose two ends disagree, as a
    /// misconfigured one does).
    pub fn with_mtus(tag: &str, client: u32, server: u32) -> Result<Topology, TopologyError> {
        Topology::build(tag, 1, Some([client, server]))
    }

    fn build(tag: &str, queues: u32, mtu: Option<[u32; 2]>) -> Result<Topology, TopologyError> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        let pid = std::process::id();
        for _ in 0..NAME_ATTEMPTS {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let mut topo = Topology::named(tag, pid, n);
            topo.queues = queues.clamp(1, 64);
            topo.mtu = mtu;
            match topo.setup() {
                Ok(()) => return Ok(topo),
                // A namespace left behind under this name: try the next.
                Err(e) if e.is_exists() && !topo.owned[1] => drop(topo),
                Err(e) => return Err(e),
            }
        }
        Err(TopologyError::NamesExhausted(NAME_ATTEMPTS))
    }

    /// The names, addresses and MACs of topology number `n` of process `pid`.
    fn named(tag: &str, pid: u32, n: u32) -> Topology {
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        let if_tag: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(IF_TAG_CHARS)
            .collect::<String>()
            .to_ascii_lowercase();
        let ns_tag: String = tag.chars().take(NETNS_TAG_CHARS).collect();
        let pid24 = pid & 0xff_ffff;
        let n12 = n & 0xfff;
        let ns = |side: Side| {
            if ns_tag.is_empty() {
                format!("dp-{pid}-{n}-{side}")
            } else {
                format!("dp-{ns_tag}-{pid}-{n}-{side}")
            }
        };
        let ifname = |letter: char| format!("dp{if_tag}{pid24:06x}{n12:03x}{letter}");
        let a = 64 + (pid % 64) as u8;
        let b = (n % 256) as u8;
        let [p2, p1, p0, _] = (pid24 << 8).to_be_bytes();
        let mac = |host: u8| [0x02, p2, p1, p0, n as u8, host];
        Topology {
            netns: [ns(Side::Client), ns(Side::Server)],
            ifname: [ifname('c'), ifname('s')],
            ip: [Ipv4Addr::new(10, a, b, 1), Ipv4Addr::new(10, a, b, 2)],
            mac: [mac(1), mac(2)],
            owned: [false, false],
            queues: 1,
            mtu: None,
        }
    }

    /// Builds the topology; on error, what exists is deleted by `Drop`.
    fn setup(&mut self) -> Result<(), TopologyError> {
        for side in [Side::Client, Side::Server] {
            run("ip", ["netns", "add", self.netns(side)])?;
            self.owned[side.index()] = true;
        }
        // Created straight inside the namespaces: the pair never exists in
        // the root namespace, so it cannot clash with anything there.
        let (c, s) = (Side::Client, Side::Server);
        let q = self.queues.to_string();
        let queues = ["numtxqueues", q.as_str(), "numrxqueues", q.as_str()];
        let (cmac, smac) = (mac_string(self.mac(c)), mac_string(self.mac(s)));
        let mut args: Vec<&str> = vec!["link", "add", "name", self.ifname(c)];
        args.extend(["address", &cmac, "netns", self.netns(c)]);
        args.extend(queues);
        args.extend(["type", "veth", "peer", "name", self.ifname(s)]);
        args.extend(["address", &smac, "netns", self.netns(s)]);
        args.extend(queues);
        run("ip", args)?;
        for side in [Side::Client, Side::Server] {
            let (ns, dev) = (self.netns(side), self.ifname(side));
            let peer = side.peer();
            run_in_netns(ns, || tune(dev))
                .and_then(|r| r)
                .map_err(|source| TopologyError::Netns {
                    netns: ns.to_owned(),
                    what: format!("configuring {dev}"),
                    source,
                })?;
            let addr = format!("{}/{PREFIX_LEN}", self.ip(side));
            if let Some(mtu) = self.mtu {
                let mtu = mtu[side.index()].to_string();
                run("ip", ["-n", ns, "link", "set", "dev", dev, "mtu", &mtu])?;
            }
            run("ip", ["-n", ns, "addr", "add", &addr, "dev", dev])?;
            run("ip", ["-n", ns, "link", "set", "dev", "lo", "up"])?;
            run("ip", ["-n", ns, "link", "set", "dev", dev, "up"])?;
            run(
                "ip",
                [
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &self.ip(peer).to_string(),
                    "lladdr",
                    &mac_string(self.mac(peer)),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        Ok(())
    }

    /// RX and TX queues of each veth.
    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// The namespace of `side`.
    pub fn netns(&self, side: Side) -> &str {
        &self.netns[side.index()]
    }

    /// The veth interface name of `side` (inside its namespace).
    pub fn ifname(&self, side: Side) -> &str {
        &self.ifname[side.index()]
    }

    /// The IPv4 address of `side`.
    pub fn ip(&self, side: Side) -> Ipv4Addr {
        self.ip[side.index()]
    }

    /// The MAC address of `side`'s veth (locally administered, unicast).
    pub fn mac(&self, side: Side) -> [u8; 6] {
        self.mac[side.index()]
    }

    /// The client namespace.
    pub fn client_netns(&self) -> &str {
        self.netns(Side::Client)
    }

    /// The server namespace.
    pub fn server_netns(&self) -> &str {
        self.netns(Side::Server)
    }

    /// The client's veth interface name.
    pub fn client_ifname(&self) -> &str {
        self.ifname(Side::Client)
    }

    /// The server's veth interface name.
    pub fn server_ifname(&self) -> &str {
        self.ifname(Side::Server)
    }

    /// The client's IPv4 address.
    pub fn client_ip(&self) -> Ipv4Addr {
        self.ip(Side::Client)
    }

    /// The server's IPv4 address.
    pub fn server_ip(&self) -> Ipv4Addr {
        self.ip(Side::Server)
    }

    /// The client's MAC address.
    pub fn client_mac(&self) -> [u8; 6] {
        self.mac(Side::Client)
    }

    /// The server's MAC address.
    pub fn server_mac(&self) -> [u8; 6] {
        self.mac(Side::Server)
    }

    /// The interface index of `side`'s veth in its namespace.
    pub fn ifindex(&self, side: Side) -> io::Result<u32> {
        ifindex_in(self.netns(side), self.ifname(side))
    }

    /// Runs `args` (program first) in `side`'s namespace with
    /// `ip netns exec`, and returns its standard output. A non-zero exit is
    /// an error carrying the command line and standard error.
    pub fn exec<I, S>(&self, side: Side, args: I) -> Result<String, TopologyError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut full: Vec<std::ffi::OsString> =
            vec!["netns".into(), "exec".into(), self.netns(side).into()];
        full.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        let out = run("ip", &full)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`spawn_in_netns`] in `side`'s namespace.
    pub fn spawn<T, F>(&self, side: Side, name: &str, f: F) -> io::Result<JoinHandle<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        spawn_in_netns(self.netns(side), name, f)
    }

    /// [`run_in_netns`] in `side`'s namespace.
    pub fn run<T, F>(&self, side: Side, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in_netns(self.netns(side), f)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for side in [Side::Server, Side::Client] {
            if !self.owned[side.index()] {
                continue;
            }
            let ns = self.netns(side);
            if let Err(e) = run("ip", ["netns", "delete", ns]) {
                // Best effort, and never a panic (not even from a closed
                // stderr): a leak is reported, not fatal.
                let _ = writeln!(io::stderr(), "devplane topology: leaked netns {ns}: {e}");
            }
        }
    }
}

/// Formats a MAC the way `ip` takes it.
pub(crate) fn mac_string(mac: [u8; 6]) -> String {
    let [a, b, c, d, e, f] = mac;
    format!("{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{f:02x}")
}

/// Runs `program args` and returns its output, or an error naming the
/// command and carrying its standard error.
pub(crate) fn run<I, S>(program: &str, args: I) -> Result<Output, TopologyError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(program);
    cmd.args(args);
    let command = std::iter::once(program.to_owned())
        .chain(cmd.get_args().map(|a| a.to_string_lossy().into_owned()))
        .collect::<Vec<_>>()
        .join(" ");
    let out = match cmd.output() {
        Ok(out) => out,
        Err(source) => return Err(TopologyError::Spawn { command, source }),
    };
    if out.status.success() {
        Ok(out)
    } else {
        Err(TopologyError::Command {
            command,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Opens the namespace file of `netns`.
fn open_netns(netns: &str) -> io::Result<File> {
    let path = std::path::Path::new(NETNS_DIR).join(netns);
    File::open(&path).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Moves the calling thread into the network namespace open as `ns`.
fn enter(ns: &File) -> io::Result<()> {
    // SAFETY: setns only reads its two integer arguments; `ns` is an open
    // file, so the descriptor is valid for the call. On success it changes
    // the network namespace of this thread alone, which is the intent.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Spawns a thread named `name` that enters the network namespace `netns`
/// and then runs `f`. The thread, and every thread it spawns, stays in that
/// namespace; use it for long-running servers and clients.
///
/// Returns once the thread is inside the namespace, or with the error that
/// kept it out (the namespace does not exist, or `setns` was refused), in
/// which case `f` is not run.
pub fn spawn_in_netns<T, F>(netns: &str, name: &str, f: F) -> io::Result<JoinHandle<T>>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns = open_netns(netns)?;
    let (tx, rx) = mpsc::sync_channel::<io::Result<()>>(1);
    let handle = thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let entered = enter(&ns);
            drop(ns);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                // No `T` to return: unwind without running the panic hook (so
                // nothing is printed); the caller has the error and discards
                // this thread's result.
                std::panic::resume_unwind(Box::new("setns failed"));
            }
            f()
        })?;
    match rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            let _ = handle.join();
            Err(io::Error::other(
                "netns thread exited before entering the namespace",
            ))
        }
    }
}

/// Runs `f` on a fresh thread inside the network namespace `netns`, waits
/// for it and returns its result. `f` may borrow from the caller. A panic
/// in `f` is resumed on the calling thread.
pub fn run_in_netns<T, F>(netns: &str, f: F) -> io::Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let ns = open_netns(netns)?;
    thread::scope(|s| {
        let worker = thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn_scoped(s, move || {
                enter(&ns)?;
                drop(ns);
                Ok(f())
            })?;
        match worker.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// The interface index of `ifname` in the network namespace `netns`.
pub fn ifindex_in(netns: &str, ifname: &str) -> io::Result<u32> {
    let name = CString::new(ifname).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    run_in_netns(netns, || {
        // SAFETY: `name` is a NUL-terminated string that outlives the call,
        // which only reads it.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if index == 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(index)
        }
    })?
}

/// `ETHTOOL_SRXCSUM` from `linux/ethtool.h`: set RX checksum offload.
const ETHTOOL_SRXCSUM: u32 = 0x15;
/// `ETHTOOL_STXCSUM`: set TX checksum offload.
pub(crate) const ETHTOOL_STXCSUM: u32 = 0x17;
/// `ETHTOOL_SGRO`: set generic receive offload.
const ETHTOOL_SGRO: u32 = 0x2c;

/// `struct ethtool_value` from `linux/ethtool.h`.
#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// Sets one legacy ethtool flag of `dev` through the socket `sock`, which
/// must belong to `dev`'s namespace.
pub(crate) fn ethtool_set(sock: &socket2::Socket, dev: &str, cmd: u32, on: bool) -> io::Result<()> {
    let mut value = EthtoolValue {
        cmd,
        data: u32::from(on),
    };
    // SAFETY: ifreq is plain old data (a name array and a union of integers,
    // addresses and a pointer), for which all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    if dev.len() >= ifr.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {dev} is too long"),
        ));
    }
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(dev.as_bytes()) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_data = (&raw mut value).cast();
    // SAFETY: SIOCETHTOOL reads the NUL-terminated name (the name is shorter
    // than the array, which was zeroed) and follows ifru_data to an
    // `ethtool_value`, which the ETHTOOL_S* commands used here read and
    // write as exactly that struct; `value` and `ifr` live across the call.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCETHTOOL as _, &mut ifr) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Configures `dev` from inside its namespace, before it comes up: IPv6 off,
/// checksum offloads off, GRO on (see the module documentation for why).
pub(crate) fn tune(dev: &str) -> io::Result<()> {
    let sysctl = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
    match std::fs::write(&sysctl, "1") {
        // No IPv6 in this kernel: nothing to silence.
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r.map_err(|e| io::Error::new(e.kind(), format!("{sysctl}: {e}")))?,
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    for (cmd, on, what) in [
        (ETHTOOL_STXCSUM, false, "tx checksum offload off"),
        (ETHTOOL_SRXCSUM, false, "rx checksum offload off"),
        (ETHTOOL_SGRO, true, "gro on"),
    ] {
        ethtool_set(&sock, dev, cmd, on)
            .map_err(|e| io::Error::new(e.kind(), format!("{what}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_names_are_recognised_only_for_dead_owners() {
        // Pid 0x7fff_fff0 cannot exist (above pid_max's limit).
        let dead = 0x7fff_fff0u32;
        assert_eq!(dead_owner(&format!("dp-dloss-{dead}-0-client")), Some(dead));
        assert_eq!(dead_owner(&format!("dp-{dead}-3-server")), Some(dead));
        assert_eq!(
            dead_owner(&format!("devplane-test-client-dloss-{dead}")),
            Some(dead)
        );
        assert_eq!(dead_owner(&format!("dpbench-{dead}")), Some(dead));
        assert_eq!(
            dead_owner(&format!("devplane-server-{dead}")),
            None,
            "not a test's"
        );
        let me = std::process::id();
        assert_eq!(dead_owner(&format!("dp-x-{me}-0-client")), None, "alive");
        assert_eq!(dead_owner(&format!("dp-x-{dead}-0-other")), None);
        assert_eq!(dead_owner("devplane"), None);
        assert_eq!(dead_owner("maps.debug"), None);
    }

    #[test]
    fn names_fit_ifnamsiz_and_are_distinct() {
        let a = Topology::named("topology-test", 4_194_303, 4095);
        let b = Topology::named("topology-test", 4_194_303, 4096 + 7);
        for t in [&a, &b] {
            for side in [Side::Client, Side::Server] {
                assert!(t.ifname(side).len() <= 15, "{}", t.ifname(side));
                assert!(t.mac(side)[0] & 0x03 == 0x02, "local unicast");
            }
            assert_ne!(t.ifname(Side::Client), t.ifname(Side::Server));
            assert_ne!(t.netns(Side::Client), t.netns(Side::Server));
            assert_ne!(t.mac(Side::Client), t.mac(Side::Server));
        }
        assert_ne!(a.ifname(Side::Client), b.ifname(Side::Client));
        assert_ne!(a.netns(Side::Client), b.netns(Side::Client));
        assert_ne!(a.ip(Side::Client), b.ip(Side::Client));
        assert_eq!(a.ifname(Side::Client), "dptop3ffffffffc");
        assert_eq!(mac_string(a.mac(Side::Server)), "02:3f:ff:ff:ff:02");
        // Nothing was created, so dropping these deletes nothing.
    }

    #[test]
    fn odd_tags_are_sanitised() {
        let t = Topology::named("a b/c", 1, 2);
        assert_eq!(t.netns(Side::Client), "dp-abc-1-2-client");
        assert_eq!(t.ifname(Side::Server), "dpabc000001002s");
        let t = Topology::named("", 1, 2);
        assert_eq!(t.netns(Side::Server), "dp-1-2-server");
        assert_eq!(t.ifname(Side::Client), "dp000001002c");
    }
}
