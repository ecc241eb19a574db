//! Owner and I/O servers (the patent's Fig. 6): an owner server receives
//! a client's requests for a model hosted on an I/O server and its XDP
//! program sends them on there (`frame::forward_rewrite`, then `XDP_TX`,
//! counted `forwarded`); the I/O server answers and interrupts the client
//! straight. This is the owner's side: a forward route per model in
//! `DP_ROUTES`, set and removed live.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use devplane_control::maps::MapWriter;
use devplane_wire::maps::{ROUTE_FORWARD, Route};

use crate::{Server, ServerError};

/// Where an owner server sends a model's requests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    /// The I/O server's platform id (the one the model's requests name).
    pub server: u32,
    /// Its IPv4 address (same devplane port as the owner's).
    pub ip: Ipv4Addr,
    /// Its MAC, or the next hop's on the owner's link.
    pub mac: [u8; 6],
}

/// The route of a forwarded model.
pub fn forward_route(to: &Forward) -> Route {
    Route {
        worker: 0,
        server: to.server,
        flags: ROUTE_FORWARD,
        forward_ip: to.ip.octets(),
        forward_mac: to.mac,
        pad: [0; 2],
    }
}

impl Server {
    /// From now on, requests for `model` are forwarded to the I/O server
    /// `to` (replacing any earlier forward of it). Refused for a model this
    /// server serves itself (remove it first: its state would be lost) and
    /// in socket mode (forwarding is the XDP program's).
    pub fn forward_model(&mut self, model: u32, to: Forward) -> Result<(), ServerError> {
        if model == 0 || self.cfg.models.iter().any(|m| m.id == model) {
            return Err(ServerError::Config(format!(
                "model {model} is served here (or id 0): move it to the I/O server and \
                 remove it here before forwarding it"
            )));
        }
        if to.ip.is_unspecified() || to.ip.is_broadcast() || to.mac[0] & 1 != 0 {
            return Err(ServerError::Config(format!(
                "model {model}: forward to {} / {:02x?} is not a unicast host",
                to.ip, to.mac
            )));
        }
        let x = self.xdp.as_mut().ok_or_else(|| {
            ServerError::Config("forwarding needs XDP mode (server.mode = \"xdp\")".into())
        })?;
        x.maps.put_route(model, forward_route(&to))?;
        self.forwards.insert(model, to);
        Ok(())
    }

    /// Stops forwarding `model`: its requests are dropped here as
    /// `drop_unknown_model` from now on (clients send to its I/O server
    /// straight, or it is served here again with `add_model`, which
    /// replaces the forward).
    pub fn unforward_model(&mut self, model: u32) -> Result<(), ServerError> {
        if self.cfg.models.iter().any(|m| m.id == model) {
            return Err(ServerError::Config(format!(
                "model {model} is served here, not forwarded"
            )));
        }
        let x = self.xdp.as_mut().ok_or_else(|| {
            ServerError::Config("forwarding needs XDP mode (server.mode = \"xdp\")".into())
        })?;
        if !x.maps.route_ids()?.contains(&model) {
            return Err(ServerError::Config(format!(
                "model {model} is not forwarded by this server"
            )));
        }
        x.maps.remove_route(model)?;
        self.forwards.remove(&model);
        Ok(())
    }

    /// The models this server forwards now, and where.
    pub fn forwards(&self) -> &BTreeMap<u32, Forward> {
        &self.forwards
    }

    /// As an agent of the store: forwards exactly the models of `want`
    /// (model -> I/O server id and address, from
    /// `store::plan::forwards_of`), each to the MAC this host's neighbour
    /// table holds for the I/O server's address. Every model is tried;
    /// returns how many routes changed, or the errors (a missing
    /// neighbour entry is asked for and the next reconcile tries again).
    pub fn reconcile_forwards(
        &mut self,
        want: &BTreeMap<u32, (u32, Ipv4Addr)>,
    ) -> Result<usize, Vec<String>> {
        let mut errors = Vec::new();
        let mut steps = 0;
        let gone: Vec<u32> = self
            .forwards
            .keys()
            .filter(|m| !want.contains_key(m))
            .copied()
            .collect();
        for m in gone {
            match self.unforward_model(m) {
                Ok(()) => steps += 1,
                Err(e) => errors.push(format!("unforward model {m}: {e}")),
            }
        }
        for (&m, &(server, ip)) in want {
            let Some(mac) = neighbour_mac(ip) else {
                solicit(ip);
                errors.push(format!(
                    "forward model {m}: no neighbour entry for server {server}'s address {ip} \
                     on this host yet (asked for; retried)"
                ));
                continue;
            };
            let to = Forward { server, ip, mac };
            if self.forwards.get(&m) == Some(&to) {
                continue;
            }
            match self.forward_model(m, to) {
                Ok(()) => steps += 1,
                Err(e) => errors.push(format!("forward model {m}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(steps)
        } else {
            Err(errors)
        }
    }
}

/// The MAC of `ip` in this host's (this network namespace's) neighbour
/// table, `/proc/net/arp`.
fn neighbour_mac(ip: Ipv4Addr) -> Option<[u8; 6]> {
    let table = std::fs::read_to_string("/proc/net/arp").ok()?;
    arp_lookup(&table, ip)
}

/// Has the kernel resolve `ip` (a datagram to its discard port): the
/// next reconcile finds its neighbour entry.
fn solicit(ip: Ipv4Addr) {
    if let Ok(s) = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = s.send_to(&[], (ip, 9));
    }
}

/// Finds `ip`'s complete entry in the text of `/proc/net/arp` (`IP
/// address, HW type, Flags, HW address, Mask, Device` per line; flag
/// 0x2 is complete).
pub fn arp_lookup(table: &str, ip: Ipv4Addr) -> Option<[u8; 6]> {
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [addr, _hw, flags, mac, ..] = f.as_slice() else {
            continue;
        };
        if addr.parse::<Ipv4Addr>().ok() != Some(ip) {
            continue;
        }
        let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).ok()?;
        if flags & 0x2 == 0 {
            return None;
        }
        let mut out = [0u8; 6];
        let mut parts = mac.split(':');
        for b in &mut out {
            *b = u8::from_str_radix(parts.next()?, 16).ok()?;
        }
        if parts.next().is_some() || out == [0; 6] {
            return None;
        }
        return Some(out);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arp_entries_are_found_only_complete_and_well_formed() {
        let t = "IP address       HW type     Flags       HW address            Mask     Device\n\
                 10.0.0.3         0x1         0x6         02:00:0a:00:00:03     *        eth0\n\
                 10.0.0.4         0x1         0x0         00:00:00:00:00:00     *        eth0\n\
                 10.0.0.5         0x1         0x2         02:00:zz:00:00:05     *        eth0\n";
        assert_eq!(
            arp_lookup(t, Ipv4Addr::new(10, 0, 0, 3)),
            Some([2, 0, 0x0a, 0, 0, 3])
        );
        assert_eq!(arp_lookup(t, Ipv4Addr::new(10, 0, 0, 4)), None);
        assert_eq!(arp_lookup(t, Ipv4Addr::new(10, 0, 0, 5)), None);
        assert_eq!(arp_lookup(t, Ipv4Addr::new(10, 0, 0, 6)), None);
        assert_eq!(arp_lookup("", Ipv4Addr::new(10, 0, 0, 3)), None);
    }
}
