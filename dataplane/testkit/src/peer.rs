//! A third host joined to the client namespace of a [`Topology`] by a veth
//! pair of its own: for tests that play an attacker who reaches the
//! client itself.

use std::io::{self, Write};
use std::net::Ipv4Addr;

use crate::topology::{Side, Topology, TopologyError, mac_string, run, run_in_netns, tune};

/// A third namespace on the client's side: a host joined to the client
/// namespace by a veth pair of its own (`.3` of the subnet, reached by a
/// host route both ways, reverse-path filtering off in the client
/// namespace so that it may also send with the server's address as its
/// source). Tests use it as an attacker that reaches the client itself (a
/// macvlan [`crate::attacker::Attacker`] cannot: a macvlan never talks to
/// its parent). Dropping it deletes its namespace.
#[derive(Debug)]
pub struct ClientPeer {
    netns: String,
    ip: Ipv4Addr,
}

impl ClientPeer {
    /// Its namespace.
    pub fn netns(&self) -> &str {
        &self.netns
    }

    /// Its address.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    /// [`run_in_netns`] in its namespace.
    pub fn run<T, F>(&self, f: F) -> io::Result<T>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        run_in_netns(&self.netns, f)
    }
}

impl Drop for ClientPeer {
    fn drop(&mut self) {
        if let Err(e) = run("ip", ["netns", "delete", self.netns.as_str()]) {
            let _ = writeln!(
                io::stderr(),
                "devplane topology: leaked netns {}: {e}",
                self.netns
            );
        }
    }
}

impl Topology {
    /// Adds a [`ClientPeer`] namespace wired to the client namespace.
    pub fn client_peer(&self) -> Result<ClientPeer, TopologyError> {
        let client = self.netns(Side::Client);
        let netns = match client.strip_suffix("client") {
            Some(stem) => format!("{stem}peer"),
            None => format!("{client}-peer"),
        };
        run("ip", ["netns", "add", netns.as_str()])?;
        let [a, b, c, _] = self.client_ip().octets();
        let att = ClientPeer {
            netns,
            ip: Ipv4Addr::new(a, b, c, 3),
        };
        let cif = self.client_ifname();
        // The client's end ('x') and the peer's ('p'): same length.
        let stem = &cif[..cif.len() - 1];
        let (xif, aif) = (format!("{stem}x"), format!("{stem}p"));
        let mut mac = self.client_mac();
        mac[5] = 3;
        let mut xmac = self.client_mac();
        xmac[5] = 4;
        run(
            "ip",
            [
                "link",
                "add",
                "name",
                &xif,
                "address",
                &mac_string(xmac),
                "netns",
                client,
                "type",
                "veth",
                "peer",
                "name",
                &aif,
                "address",
                &mac_string(mac),
                "netns",
                &att.netns,
            ],
        )?;
        let sides = [
            (client, xif.as_str(), att.ip, mac),
            (att.netns.as_str(), aif.as_str(), self.client_ip(), xmac),
        ];
        for (ns, dev, peer_ip, peer_mac) in sides {
            run_in_netns(ns, || tune(dev))
                .and_then(|r| r)
                .map_err(|source| TopologyError::Netns {
                    netns: ns.to_owned(),
                    what: format!("configuring {dev}"),
                    source,
                })?;
            run("ip", ["-n", ns, "link", "set", "dev", "lo", "up"])?;
            run("ip", ["-n", ns, "link", "set", "dev", dev, "up"])?;
            let host = format!("{peer_ip}/32");
            run("ip", ["-n", ns, "route", "replace", &host, "dev", dev])?;
            run(
                "ip",
                [
                    "-n",
                    ns,
                    "neigh",
                    "replace",
                    &peer_ip.to_string(),
                    "lladdr",
                    &mac_string(peer_mac),
                    "dev",
                    dev,
                    "nud",
                    "permanent",
                ],
            )?;
        }
        let addr = format!("{}/32", att.ip);
        run("ip", ["-n", &att.netns, "addr", "add", &addr, "dev", &aif])?;
        for key in ["all", "default", xif.as_str()] {
            let path = format!("/proc/sys/net/ipv4/conf/{key}/rp_filter");
            run_in_netns(client, || std::fs::write(&path, "0"))
                .and_then(|r| r)
                .map_err(|source| TopologyError::Netns {
                    netns: client.to_owned(),
                    what: format!("turning off {path}"),
                    source,
                })?;
        }
        Ok(att)
    }
}
