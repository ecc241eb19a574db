//! The `forward` scenario: owner and I/O servers (the patent's Fig. 6) on
//! three hosts of one bridge (`testkit::lan`), in one run:
//!
//! - `direct`: a one-record request (64-byte payload) from the client
//!   straight to the I/O server (XDP program, AF_XDP worker) and back,
//!   closed loop: the floor;
//! - `forward`: the same request sent to the owner server, whose XDP
//!   program rewrites it and sends it on to the I/O server (`XDP_TX`);
//!   the I/O server answers the client straight.
//!
//! The floor is measured before and after (`direct` A, `forward`,
//! `direct` B) and `forward`'s ratio is over both blocks. The goal: the
//! forwarding hop costs at most one more one-way veth traversal (and a
//! bridge hop), under 1.4x the direct round trip.
//!
//! The client busy-polls on core 0, the I/O server's worker on core 1;
//! the owner's worker serves nothing (its XDP program does the work, in
//! the softirq of the CPU the frame arrives on) and sleeps.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devplane_control::config::{Mode, ServerConfig, Tuning};
use devplane_server::forward::Forward;
use devplane_testkit::host::ServerThread;
use devplane_testkit::lan::{Lan, LanHost};
use devplane_wire::maps::Counter;
use devplane_wire::{Access, AccessSize};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};
use crate::server::{PORT, bench_config, check_response, encode_for, request_for};

/// The scenario's name.
pub const SCENARIO: &str = "forward";
const CLIENT_CORE: usize = 0;
/// The I/O server's id (the one requests name) and the owner's.
const IO: u32 = 1;
const OWNER: u32 = 2;
/// A round trip unanswered this long is sent again and left out.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(200);

fn config(id: u32, host: &LanHost, client: &LanHost, serves: bool) -> ServerConfig {
    let cfg = bench_config(id, Mode::Xdp, &host.ifname, client.ip, &format!("fwd{id}-"));
    if serves {
        return cfg;
    }
    ServerConfig {
        // The owner's worker never receives anything: it must not take
        // the I/O worker's core by spinning.
        tuning: Tuning {
            spin_budget: 0,
            idle_sleep_us: 10_000,
            ..cfg.tuning
        },
        models: Vec::new(),
        ..cfg
    }
}

/// Closed-loop round trips sent to `to`, answered from `from` (an
/// unconnected socket: through the owner, the answer comes from another
/// address than the one the request went to).
pub(crate) fn round_trips(
    sock: &UdpSocket,
    to: SocketAddr,
    from: SocketAddr,
    first_seq: u64,
    warmup: u32,
    iters: u32,
) -> Result<Latency> {
    sock.set_nonblocking(true)?;
    let access = Access::PioIn {
        port: 0x80,
        size: AccessSize::B1,
    };
    let mut out = [0u8; 2048];
    let mut inb = [0u8; 2048];
    let mut lat = Latency::new();
    let total = u64::from(warmup) + u64::from(iters);
    let mut resent = 0u64;
    for i in 0..total {
        let seq = first_seq + i;
        let n = encode_for(&mut out, 1, &[request_for(1, seq, access)]);
        let t0 = Instant::now();
        let mut sent_at = t0;
        let mut attempts = 1;
        sock.send_to(&out[..n], to)?;
        loop {
            match sock.recv_from(&mut inb) {
                Ok((m, src)) if src == from && check_response(seq, &inb[..m]).is_ok() => break,
                // A late answer to a request sent again.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if sent_at.elapsed() > ANSWER_TIMEOUT {
                        if attempts >= 10 {
                            bail!("round trip {i}: 10 attempts unanswered");
                        }
                        attempts += 1;
                        sent_at = Instant::now();
                        sock.send_to(&out[..n], to)?;
                    }
                    std::hint::spin_loop();
                }
                Err(e) => return Err(e).context("recv"),
            }
        }
        if attempts > 1 {
            resent += 1;
            if resent * 100 > total + 100 {
                bail!("{resent} of {} round trips had to be sent again", i + 1);
            }
            continue;
        }
        if i >= u64::from(warmup) {
            lat.record(t0.elapsed().as_nanos() as u64);
        }
    }
    Ok(lat)
}

/// Runs the scenario: rows `direct` (the floor, both blocks) and
/// `forward` (over them).
pub fn run(iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let lan = Lan::new("bfw", &["client", "owner", "io"])
        .context("building the three-host LAN (needs root)")?;
    let (client, owner, io) = (lan.host(0), lan.host(1), lan.host(2));
    let io_srv = ServerThread::spawn(config(IO, io, client, true), Some(&io.netns))
        .context("starting the I/O server")?;
    let owner_srv = ServerThread::spawn(config(OWNER, owner, client, false), Some(&owner.netns))
        .context("starting the owner server")?;
    let to = Forward {
        server: IO,
        ip: io.ip,
        mac: io.mac,
    };
    owner_srv
        .call(move |s| s.forward_model(1, to))
        .context("owner server thread")?
        .context("forwarding model 1")?;
    let warmup = (iters / 10).max(100);
    let io_addr = SocketAddr::from((io.ip, PORT));
    let owner_addr = SocketAddr::from((owner.ip, PORT));
    let cip = client.ip;
    let sock = client
        .run(move || UdpSocket::bind((cip, 0)))?
        .context("bind the client socket")?;
    // Sequence numbers go on from block to block: the I/O server keeps
    // one duplicate window for the client's vCPU.
    let per_block = u64::from(warmup) + u64::from(iters);
    let block = |what: &str, k: u64, to: SocketAddr| -> Result<Latency> {
        progress(format_args!("forward: {what}, {iters} round trips"));
        let s = sock.try_clone()?;
        client.run(move || {
            let _ = affinity::set_thread_affinity([CLIENT_CORE]);
            round_trips(&s, to, io_addr, 1 + k * per_block, warmup, iters)
        })?
    };
    let a = block("direct A", 0, io_addr)?;
    let fwd = block("forward", 1, owner_addr)?;
    let b = block("direct B", 2, io_addr)?;
    let owner_xdp = owner_srv.snapshot().xdp.unwrap_or_default();
    let forwarded = owner_xdp.get(Counter::Forwarded);
    if forwarded < u64::from(iters) {
        bail!("the owner forwarded {forwarded} requests, fewer than the {iters} answered");
    }
    notes.push(format!(
        "forward: the owner's XDP program forwarded {forwarded} requests (XDP_TX), \
         the I/O server answered the client straight"
    ));
    owner_srv.stop();
    io_srv.stop();
    let mut floor = a;
    floor.add(&b);
    let f = Floor::of(format!("{SCENARIO}/direct"), &floor);
    Ok(vec![
        Row::floor(SCENARIO, "direct", floor),
        Row::latency(SCENARIO, "forward", fwd, f),
    ])
}

/// The goal of the `forward` row: its p50 at most this many times the
/// direct round trip's, in the same run.
pub const GOAL: f64 = 1.4;

/// A note judging the `forward` row against [`GOAL`].
pub fn goal(rows: &[Row]) -> Option<String> {
    let fwd = rows
        .iter()
        .find(|r| r.key() == format!("{SCENARIO}/forward"))?;
    let r = fwd.ratios()?;
    let (p50, p99) = (r.get("p50").copied()?, r.get("p99").copied()?);
    Some(format!(
        "forward: through the owner p50 {p50:.2}x, p99 {p99:.2}x the direct round trip \
         (goal p50 < {GOAL}x: {})",
        if p50 < GOAL { "met" } else { "NOT met" }
    ))
}
