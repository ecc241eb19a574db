//! The `queues` scenario: what serving every queue of a multi-queue device
//! costs a round trip. In one run, on the embedded topology: the XDP
//! round trip (one-record request, closed loop) with veths of one queue
//! (`one`, the floor, before and after) and of four queues (`four`: each
//! worker has a socket on every queue and polls their four RX rings in
//! turn; the client's one socket is one flow, so one queue carries it).
//!
//! The alternative layout, flow steering of the devplane port to the
//! workers' queues (`ethtool -N`), cannot be set up on a veth (no ntuple
//! filters), so it is not measured here: it would poll one ring per
//! worker, as `one` does.

use std::net::{SocketAddr, UdpSocket};

use anyhow::{Context, Result, bail};
use devplane_control::config::Mode;
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::{Side, Topology};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};
use crate::server::{PORT, config};

/// The scenario's name.
pub const SCENARIO: &str = "queues";
const CLIENT_CORE: usize = 0;

/// Round trips to a fresh XDP server on a topology of `queues` queues,
/// sequence numbers from `first_seq`.
fn block(queues: u32, what: &str, iters: u32, first_seq: u64) -> Result<(Latency, u32)> {
    let topo = Topology::with_queues("bq", queues).context("building the netns topology")?;
    let srv = ServerThread::spawn(config(&topo, Mode::Xdp), Some(topo.server_netns()))
        .context("starting the XDP server")?;
    let served = srv
        .call(|s| s.xsk_layout().map(|l| l.queues))
        .flatten()
        .unwrap_or(0);
    if served != queues {
        bail!("the server serves {served} queues of {queues}");
    }
    progress(format_args!("queues: {what}, {iters} round trips"));
    let ip = topo.client_ip();
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))?
        .context("bind the client socket")?;
    let to = SocketAddr::from((topo.server_ip(), PORT));
    let warmup = (iters / 10).max(100);
    let lat = topo.run(Side::Client, move || {
        let _ = affinity::set_thread_affinity([CLIENT_CORE]);
        crate::forward::round_trips(&sock, to, to, first_seq, warmup, iters)
    })??;
    srv.stop();
    Ok((lat, served))
}

/// Runs the scenario: rows `one` (floor, two blocks) and `four`.
pub fn run(iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    // A fresh server each block: sequence numbers may start anywhere.
    let (a, _) = block(1, "one queue A", iters, 1)?;
    let (four, n) = block(4, "four queues", iters, 1)?;
    let (b, _) = block(1, "one queue B", iters, 1)?;
    notes.push(format!(
        "queues: each worker polls {n} RX rings on the four-queue veth"
    ));
    let mut floor = a;
    floor.add(&b);
    let f = Floor::of(format!("{SCENARIO}/one"), &floor);
    Ok(vec![
        Row::floor(SCENARIO, "one", floor),
        Row::latency(SCENARIO, "four", four, f),
    ])
}
