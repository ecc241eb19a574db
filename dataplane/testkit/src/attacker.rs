//! A third host on the client's link of a [`Topology`], for tests that
//! play an attacker (another tenant, an off-path host).

use std::io::{self, Write};
use std::net::Ipv4Addr;

use crate::topology::{
    ETHTOOL_STXCSUM, PREFIX_LEN, Side, Topology, TopologyError, ethtool_set, mac_string, run,
    run_in_netns,
};

/// A third host on the client's link: a network namespace holding a
/// macvlan (bridge mode) on the client's veth, with its own address in the
/// same subnet and its own MAC, configured like the veths (offloads, static
/// neighbours both ways with the server). What it sends reaches the
/// server's veth (and XDP program) exactly as the client's does. Dropping
/// it deletes its namespace. Drop it before the [`Topology`].
#[derive(Debug)]
pub struct Attacker {
    netns: String,
    ip: Ipv4Addr,
    mac: [u8; 6],
    ifname: String,
}

impl Attacker {
    /// Its namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its IPv4 address (host `.66` of the topology's subnet).
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// Its MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Its interface (the macvlan) in its namespace.
    pub fn ifname(&self) -> &str {
        &self.ifname
    }

    /// Runs `f` on a thread inside its namespace and returns what it
    /// returned.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        run_in_netns(&self.netns, f)
    }
}

impl Drop for Attacker {
    fn drop(&mut self) {
        if let Err(e) = run("ip", ["netns", "delete", &self.netns]) {
            let _ = writeln!(
                io::stderr(),
                "devplane topology: leaked netns {}: {e}",
                self.netns
            );
        }
    }
}

impl Topology {
    /// Adds a third host on the client's link (see [`Attacker`]).
    pub fn attacker(&self) -> Result<Attacker, TopologyError> {
        let client_ns = self.netns(Side::Client);
        let netns = match client_ns.strip_suffix("-client") {
            Some(stem) => format!("{stem}-attacker"),
            None => format!("{client_ns}-attacker"),
        };
        let [a, b, c, _] = self.client_ip().octets();
        let mut mac = self.client_mac();
        mac[5] = 0x66;
        let mut dev = self.client_ifname().to_string();
        dev.pop();
        dev.push('a');
        let att = Attacker {
            netns,
            ip: Ipv4Addr::new(a, b, c, 0x66),
            mac,
            ifname: dev.clone(),
        };
        run("ip", ["netns", "add", &att.netns])?;
        let ns = att.netns.clone();
        run(
            "ip",
            [
                "-n",
                client_ns,
                "link",
                "add",
                "link",
                self.client_ifname(),
                "name",
                &dev,
                "address",
                &mac_string(mac),
                "type",
                "macvlan",
                "mode",
                "bridge",
            ],
        )?;
        run("ip", ["-n", client_ns, "link", "set", &dev, "netns", &ns])?;
        let d = dev.clone();
        run_in_netns(&ns, move || tune_macvlan(&d))
            .and_then(|r| r)
            .map_err(|source| TopologyError::Netns {
                netns: ns.clone(),
                what: format!("configuring {dev}"),
                source,
            })?;
        let addr = format!("{}/{PREFIX_LEN}", att.ip);
        run("ip", ["-n", &ns, "addr", "add", &addr, "dev", &dev])?;
        run("ip", ["-n", &ns, "link", "set", "dev", "lo", "up"])?;
        run("ip", ["-n", &ns, "link", "set", "dev", &dev, "up"])?;
        let neigh = |netns: &str, ip: Ipv4Addr, mac: [u8; 6], dev: &str| {
            run(
                "ip",
                [
                    "-n",
                    netns,
                    "neigh",
                    "replace",
                    &ip.to_string(),
                    "lladdr",
                    &mac_string(mac),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            )
        };
        neigh(&ns, self.server_ip(), self.server_mac(), &dev)?;
        neigh(
            self.netns(Side::Server),
            att.ip,
            mac,
            self.ifname(Side::Server),
        )?;
        Ok(att)
    }
}

/// The attacker's macvlan: IPv6 off, and TX checksum offload off where the
/// driver lets it be set (a macvlan takes its offloads from the veth under
/// it, which has it off already), so that what it sends carries full
/// checksums like the client's.
fn tune_macvlan(dev: &str) -> io::Result<()> {
    let sysctl = format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6");
    match std::fs::write(&sysctl, "1") {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        r => r.map_err(|e| io::Error::new(e.kind(), format!("{sysctl}: {e}")))?,
    }
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
    match ethtool_set(&sock, dev, ETHTOOL_STXCSUM, false) {
        Err(e) if e.kind() == io::ErrorKind::Unsupported => Ok(()),
        r => r.map_err(|e| io::Error::new(e.kind(), format!("tx checksum offload off: {e}"))),
    }
}
