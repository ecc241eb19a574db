//! Owner and I/O servers (the patent's Fig. 6): an owner server receives
//! a client's requests for a model hosted on an I/O server and its XDP
//! program sends them on there (`frame::forward_rewrite`, then `XDP_TX`,
//! counted `forwarded`); the I/O server answers and interrupts the client
//! straight. This is the owner's side: a forward route per model in
//! `DP_ROUTES`, set and removed live.

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
        Ok(())
    }
}
