//! Hosts on one Ethernet segment: a network namespace per host, each
//! joined by a veth pair to a bridge in a switch namespace. The owner /
//! I/O server topology (the patent's Fig. 6) is a [`Lan`] of three hosts:
//! a client, an owner server and an I/O server; an owner's `XDP_TX` sends
//! a frame back out of its one interface, and the bridge takes it on to
//! the I/O server.
//!
//! ```text
//!   netns <client>        netns <owner>         netns <io>
//!   10.a.b.1 veth         10.a.b.2 veth         10.a.b.3 veth
//!        \                     |                     /
//!         +------------ br0 (netns <switch>) -------+
//! ```
//!
//! Each host's veth is configured as a [`crate::topology::Topology`]'s
//! (checksum offloads off, GRO on, IPv6 off, static neighbours to every
//! other host); the switch-side ends have GRO on too and each carries an
//! XDP program that passes everything (devplane's own, its port set to one
//! no traffic uses): a veth that transmits a frame with `XDP_TX` wakes its
//! peer's receive NAPI only if the peer has an XDP program, so without one
//! a forwarded frame waits in the peer's ring until something else comes.
//! (On a NIC, `XDP_TX` puts the frame on the TX ring: nothing of this is
//! needed.) The bridge has a static forwarding entry per host MAC and
//! learning off on every port, so nothing is flooded or learnt: an owner
//! server forwards frames with the client's MAC as their source, which a
//! learning switch would take as the client having moved to the owner's
//! port. Dropping the [`Lan`] deletes every
//! namespace.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::sync::atomic::Ordering;

use crate::topology::{
    COUNTER, PREFIX_LEN, TopologyError, mac_string, run, run_in_netns, sweep_stale, tune,
};

/// One host of a [`Lan`].
#[derive(Debug, Clone)]
pub struct LanHost {
    /// Its namespace.
    pub netns: String,
    /// Its veth, inside its namespace.
    pub ifname: String,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its MAC.
    pub mac: [u8; 6],
}

impl LanHost {
    /// [`run_in_netns`] in its namespace.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in_netns(&self.netns, f)
    }
}

/// Hosts on a bridge; dropping it deletes their namespaces and the
/// switch's.
pub struct Lan {
    switch: String,
    hosts: Vec<LanHost>,
    /// The pass-through programs of the switch-side ends (detached when
    /// the switch namespace goes).
    _pass: Vec<devplane_server::xdp::Program>,
    /// Namespaces created (and so deleted on drop).
    created: Vec<String>,
}

impl std::fmt::Debug for Lan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lan")
            .field("switch", &self.switch)
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// Port of the pass-through programs: the discard port, which no
/// devplane traffic uses, so every frame passes.
const PASS_PORT: u16 = 9;

/// Loads devplane's XDP program set to pass everything and attaches it to
/// `ifname` (in the calling thread's namespace) in driver mode.
fn pass_through(ifname: &str) -> io::Result<devplane_server::xdp::Program> {
    use devplane_server::xdp::Program;
    let err = |e: devplane_server::xdp::XdpError| io::Error::other(e.to_string());
    let mut p = Program::load(None).map_err(err)?;
    p.set_config(devplane_wire::maps::Config {
        port: PASS_PORT,
        pad: 0,
        server: 0,
        flags: 0,
    })
    .map_err(err)?;
    p.xdp()
        .map_err(err)?
        .attach(ifname, aya::programs::XdpMode::Driver)
        .map_err(|e| io::Error::other(e.to_string()))?;
    Ok(p)
}

impl Lan {
    /// Builds a LAN of hosts named `names` (each one of `client`,
    /// `client2`, `server`, `owner`, `io`, `peer`, `attacker`, `store`:
    /// the names a sweep of a
    /// killed test's leftovers recognises), at `.1`, `.2`, ... of a fresh
    /// subnet. Needs root and iproute2's `ip` and `bridge`.
    pub fn new(tag: &str, names: &[&str]) -> Result<Lan, TopologyError> {
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(sweep_stale);
        let pid = std::process::id();
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(3)
            .collect::<String>()
            .to_ascii_lowercase();
        let pid24 = pid & 0xff_ffff;
        let ns = |side: &str| format!("dp-lan{tag}-{pid}-{n}-{side}");
        let ifname = |letter: char| format!("dp{tag}{pid24:06x}{:03x}{letter}", n & 0xfff);
        let [p2, p1, p0, _] = (pid24 << 8).to_be_bytes();
        let (a, b) = (64 + (pid % 64) as u8, (n % 256) as u8);
        let mut lan = Lan {
            switch: ns("switch"),
            hosts: names
                .iter()
                .enumerate()
                .map(|(i, name)| LanHost {
                    netns: ns(name),
                    ifname: ifname((b'a' + i as u8) as char),
                    ip: Ipv4Addr::new(10, a, b, 1 + i as u8),
                    mac: [0x02, p2, p1, p0, n as u8, 0x10 + i as u8],
                })
                .collect(),
            _pass: Vec::new(),
            created: Vec::new(),
        };
        lan.setup()?;
        Ok(lan)
    }

    fn setup(&mut self) -> Result<(), TopologyError> {
        let sw = self.switch.clone();
        run("ip", ["netns", "add", &sw])?;
        self.created.push(sw.clone());
        for h in &self.hosts {
            run("ip", ["netns", "add", &h.netns])?;
            self.created.push(h.netns.clone());
        }
        let netns_err = |netns: &str, what: String| {
            let netns = netns.to_owned();
            move |source| TopologyError::Netns {
                netns,
                what,
                source,
            }
        };
        run_in_netns(&sw, || {
            for f in ["all", "default"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{f}/disable_ipv6"), "1");
            }
        })
        .map_err(netns_err(&sw, "turning IPv6 off".into()))?;
        run(
            "ip",
            [
                "-n",
                &sw,
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
            ],
        )?;
        run("ip", ["-n", &sw, "link", "set", "br0", "up"])?;
        for (i, h) in self.hosts.iter().enumerate() {
            // The switch-side end: the host's name with its letter in
            // upper case (15 characters, as IFNAMSIZ allows).
            let port = format!(
                "{}{}",
                &h.ifname[..h.ifname.len() - 1],
                (b'A' + i as u8) as char
            );
            let mac = mac_string(h.mac);
            run(
                "ip",
                [
                    "link", "add", "name", &h.ifname, "address", &mac, "netns", &h.netns, "type",
                    "veth", "peer", "name", &port, "netns", &sw,
                ],
            )?;
            run_in_netns(&h.netns, || tune(&h.ifname))
                .and_then(|r| r)
                .map_err(netns_err(&h.netns, format!("configuring {}", h.ifname)))?;
            run_in_netns(&sw, || tune(&port))
                .and_then(|r| r)
                .map_err(netns_err(&sw, format!("configuring {port}")))?;
            run("ip", ["-n", &sw, "link", "set", &port, "master", "br0"])?;
            run("ip", ["-n", &sw, "link", "set", &port, "up"])?;
            let pass = run_in_netns(&sw, || pass_through(&port))
                .and_then(|r| r)
                .map_err(netns_err(&sw, format!("XDP pass-through on {port}")))?;
            self._pass.push(pass);
            run(
                "bridge",
                [
                    "-n", &sw, "fdb", "replace", &mac, "dev", &port, "master", "static",
                ],
            )?;
            // An owner server forwards with the client's MAC as source
            // (`frame::forward_rewrite`): the switch must not learn it on
            // the owner's port.
            run(
                "bridge",
                ["-n", &sw, "link", "set", "dev", &port, "learning", "off"],
            )?;
            let addr = format!("{}/{PREFIX_LEN}", h.ip);
            run(
                "ip",
                ["-n", &h.netns, "addr", "add", &addr, "dev", &h.ifname],
            )?;
            run("ip", ["-n", &h.netns, "link", "set", "dev", "lo", "up"])?;
            run(
                "ip",
                ["-n", &h.netns, "link", "set", "dev", &h.ifname, "up"],
            )?;
        }
        for h in &self.hosts {
            for other in self.hosts.iter().filter(|o| o.netns != h.netns) {
                run(
                    "ip",
                    [
                        "-n",
                        &h.netns,
                        "neigh",
                        "replace",
                        &other.ip.to_string(),
                        "lladdr",
                        &mac_string(other.mac),
                        "dev",
                        &h.ifname,
                        "nud",
                        "permanent",
                    ],
                )?;
            }
        }
        Ok(())
    }

    /// Host `i` (in the order of the names given to [`Lan::new`]).
    pub fn host(&self, i: usize) -> &LanHost {
        &self.hosts[i]
    }

    /// The switch's namespace.
    pub fn switch_netns(&self) -> &str {
        &self.switch
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        // Detached from inside the switch's namespace, where their
        // interfaces are.
        let pass = std::mem::take(&mut self._pass);
        if !pass.is_empty() {
            let _ = run_in_netns(&self.switch, move || drop(pass));
        }
        for ns in self.created.iter().rev() {
            if let Err(e) = run("ip", ["netns", "delete", ns.as_str()]) {
                let _ = writeln!(io::stderr(), "devplane lan: leaked netns {ns}: {e}");
            }
        }
    }
}
