//! The `isolation` scenario: a well-behaved client's remote round trip
//! while another registered client floods the same worker with valid
//! requests, with and without a budget on the flooder, in one run.
//!
//! On the embedded topology, client 7 (the client namespace, VM 1) writes
//! to a counter model (model 1) closed loop, one write per round trip, and
//! client 8 (an [`Attacker`] namespace on the client's link, VM 2) sends
//! one-record requests to a null model (model 2) on the same worker as
//! fast as one thread can: batches of [`BATCH`] datagrams with
//! `sendmmsg(2)`, for at most [`MAX_FLOOD`]. Three phases, each on a fresh
//! XDP server:
//!
//! - `unloaded`: no flood;
//! - `flooded`: the flood, no budget;
//! - `budgeted`: the flood, client 8 with a budget of [`FLOOD_RATE`]
//!   datagrams/s and a burst of [`FLOOD_BURST`] at the XDP program.
//!
//! The client waits for each answer in `recv(2)` (not busy-polling): on
//! this 2-core machine it shares core 0 with the flooder (the worker
//! spins on core 1), and a spinning client would split that core with the
//! flooder by time slices. The flooder stands for another host: it runs
//! under `SCHED_IDLE` (`DP_FLOOD_IDLE=0`: normal), taking the cycles of
//! core 0 the client leaves without holding the core when the client's
//! answer wakes it; what the server sees is the same flood (its rate is
//! in the notes). A round trip not answered within [`RESEND_AFTER`] is sent again (same
//! sequence number) and its latency counts from the first send, so that a
//! starved client shows in its p99 instead of leaving samples out. After
//! each phase the client reads the counter model: it must equal the
//! writes it made (every write applied exactly once, resent copies
//! included), or the phase fails.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use devplane_control::config::{Budget, ClientConfig, Mode, ModelConfig, ServerConfig, VmConfig};
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::maps::Counter;
use devplane_wire::{Access, AccessSize, Datagram, Header, Kind, Record, Status, datagram};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};
use crate::server::{PORT, bench_config, request_for};

const SCENARIO: &str = "isolation";
const CLIENT: u32 = 7;
const FLOODER: u32 = 8;
const CLIENT_CORE: usize = 0;
const FLOOD_CORE: usize = 0;
/// Datagrams per `sendmmsg` call of the flooder.
pub const BATCH: usize = 64;
/// The longest a flood lasts, whatever the client does.
pub const MAX_FLOOD: Duration = Duration::from_secs(8);
/// The flooder's budget in the `budgeted` phase, datagrams/s.
pub const FLOOD_RATE: u32 = 20_000;
/// The flooder's burst in the `budgeted` phase, datagrams.
pub const FLOOD_BURST: u32 = 64;
/// How long a round trip waits before its request is sent again.
pub const RESEND_AFTER: Duration = Duration::from_millis(200);
/// Sends of one request before the phase fails: for longer than a flood
/// lasts, so that a client starved by the flood shows as latency.
const MAX_ATTEMPTS: u32 = (MAX_FLOOD.as_millis() / RESEND_AFTER.as_millis()) as u32 + 20;
/// The goal: flooded p99 at most this many times the unloaded p99.
pub const GOAL_RATIO: f64 = 2.0;

fn config(topo: &Topology, flooder_ip: std::net::Ipv4Addr, budget: Option<Budget>) -> ServerConfig {
    let mut cfg = bench_config(1, Mode::Xdp, topo.server_ifname(), topo.client_ip(), "iso-");
    cfg.clients.push(ClientConfig {
        tag_key: None,
        id: FLOODER,
        address: flooder_ip,
        budget,
    });
    cfg.vms.push(VmConfig {
        id: 2,
        client: FLOODER,
        hypervisor: 1,
    });
    cfg.models = vec![
        ModelConfig::new(1, "counter", 0),
        ModelConfig::new(2, "null", 0),
    ];
    cfg
}

/// A one-record request datagram of `client`'s VM `vm` to `model`.
fn encode(buf: &mut [u8], client: u32, vm: u32, model: u32, seq: u64, access: Access) -> usize {
    let rec = request_for(vm, seq, access);
    datagram::encode(buf, Header::new(Kind::Request, model, 1, client), &[rec]).unwrap_or(0)
}

const WRITE: Access = Access::PioOut {
    port: 0,
    size: AccessSize::B4,
    data: 1,
};
const READ_COUNT: Access = Access::PioIn {
    port: 0,
    size: AccessSize::B4,
};

/// The answer's sequence number and data, if it is a successful response.
fn answer(bytes: &[u8]) -> Option<(u64, u64)> {
    let d = Datagram::parse(bytes).ok()?;
    match d.records().next() {
        Some(Record::Response(r)) if r.status == Status::Ok => Some((r.id.seq, r.data)),
        _ => None,
    }
}

/// What one phase of the well-behaved client measured.
pub(crate) struct Phase {
    pub(crate) lat: Latency,
    pub(crate) writes: u64,
    pub(crate) resent: u64,
}

/// [`client_phase`] from a fresh socket in the client namespace, on the
/// client's core: the outer error is the namespace's or the socket's, the
/// inner one the phase's (the caller stops its load first). Also the
/// `flush-storm` scenario's.
pub(crate) fn measure(
    topo: &Topology,
    to: SocketAddr,
    warmup: u32,
    iters: u32,
) -> Result<Result<Phase>> {
    let ip = topo.client_ip();
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))?
        .context("bind the client socket")?;
    Ok(topo.run(Side::Client, move || {
        let _ = affinity::set_thread_affinity([CLIENT_CORE]);
        client_phase(&sock, to, warmup, iters)
    })?)
}

/// `warmup + iters` writes to the counter closed loop (client 7, VM 1,
/// vCPU 0, model 1), then a read of the counter that must equal them. Seq
/// numbers start at `first_seq`. Also the `flush-storm` scenario's.
pub(crate) fn client_phase(
    sock: &UdpSocket,
    to: SocketAddr,
    warmup: u32,
    iters: u32,
) -> Result<Phase> {
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(RESEND_AFTER / 4))?;
    sock.connect(to)?;
    let mut out = [0u8; 2048];
    let mut inb = [0u8; 2048];
    let mut lat = Latency::new();
    let mut seq = devplane_wire::first_seq();
    let mut resent = 0;
    let mut round_trip = |seq: u64, access: Access, resent: &mut u64| -> Result<(Duration, u64)> {
        let n = encode(&mut out, CLIENT, 1, 1, seq, access);
        let t0 = Instant::now();
        let mut sent_at = t0;
        let mut attempts = 1;
        let mut other = String::from("none");
        sock.send(&out[..n])?;
        loop {
            match sock.recv(&mut inb) {
                Ok(m) => {
                    if let Some((s, data)) = answer(&inb[..m])
                        && s == seq
                    {
                        return Ok((t0.elapsed(), data));
                    }
                    // A late answer to an earlier request: skip it.
                    other = match Datagram::parse(&inb[..m]) {
                        Ok(d) => format!("{:?}", d.records().next()),
                        Err(e) => e.to_string(),
                    };
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("recv"),
            }
            if sent_at.elapsed() > RESEND_AFTER {
                if attempts >= MAX_ATTEMPTS {
                    bail!(
                        "request {seq}: {MAX_ATTEMPTS} sends unanswered (last other answer: {other})"
                    );
                }
                attempts += 1;
                *resent += 1;
                sent_at = Instant::now();
                sock.send(&out[..n])?;
            }
        }
    };
    let total = u64::from(warmup) + u64::from(iters);
    for i in 0..total {
        seq += 1;
        let (dt, _) = round_trip(seq, WRITE, &mut resent)?;
        if i >= u64::from(warmup) {
            lat.record(dt.as_nanos() as u64);
        }
    }
    seq += 1;
    let (_, count) = round_trip(seq, READ_COUNT, &mut resent)?;
    if count != total {
        bail!("the counter model applied {count} writes of {total} (exactly-once broken)");
    }
    Ok(Phase {
        lat,
        writes: total,
        resent,
    })
}

/// Sends valid one-record requests of the flooder's VM as fast as it can,
/// [`BATCH`] per `sendmmsg`, until `stop` or [`MAX_FLOOD`]; counts the
/// datagrams sent into `sent`.
fn flood(
    sock: UdpSocket,
    to: SocketAddr,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> Result<()> {
    sock.connect(to)?;
    let mut bufs = vec![[0u8; 128]; BATCH];
    let mut lens = [0usize; BATCH];
    let mut seq = devplane_wire::first_seq();
    let access = Access::PioOut {
        port: 0,
        size: AccessSize::B1,
        data: 1,
    };
    let start = Instant::now();
    let fd = sock.as_raw_fd();
    let mut total = 0u64;
    while !stop.load(Ordering::Relaxed) && start.elapsed() < MAX_FLOOD {
        for (b, l) in bufs.iter_mut().zip(lens.iter_mut()) {
            seq += 1;
            *l = encode(b, FLOODER, 2, 2, seq, access);
        }
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .zip(lens.iter())
            .map(|(b, &l)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: l,
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iov
            .iter_mut()
            .map(|v| {
                // SAFETY: an all-zero msghdr is valid (no name, no
                // control data); the iovec is set below.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = v;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        // SAFETY: `msgs` holds BATCH headers, each pointing at one live
        // iovec over a live buffer of `bufs`; the socket is connected, so
        // no address is needed; all outlive the call.
        let n = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), BATCH as libc::c_uint, 0) };
        if n > 0 {
            total += n as u64;
        } else {
            // ENOBUFS or EAGAIN under the flood: try again.
            std::hint::spin_loop();
        }
    }
    sent.store(total, Ordering::Relaxed);
    Ok(())
}

/// One phase: a fresh server with `budget` on the flooder, the flood if
/// `flooding`, the client's round trips. Returns the client's numbers,
/// the flood's datagrams/s and the XDP program's `drop_over_budget`.
#[allow(clippy::too_many_arguments)]
fn phase(
    topo: &Topology,
    attacker: &devplane_testkit::attacker::Attacker,
    name: &str,
    flooding: bool,
    budget: Option<Budget>,
    warmup: u32,
    iters: u32,
) -> Result<(Phase, f64, u64)> {
    progress(format_args!("{SCENARIO}: {name}, {iters} round trips"));
    let srv = ServerThread::spawn(
        config(topo, attacker.ip(), budget),
        Some(topo.server_netns()),
    )
    .context("starting the XDP server")?;
    let to = SocketAddr::from((topo.server_ip(), PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooder = if flooding {
        let ip = attacker.ip();
        let sock = attacker
            .run(move || UdpSocket::bind((ip, 0)))?
            .context("bind the flooder's socket")?;
        let (s, n) = (stop.clone(), sent.clone());
        let idle = crate::rig::knob("DP_FLOOD_IDLE", 1) != 0;
        Some(std::thread::spawn(move || {
            // The socket was made in the attacker's namespace; sending
            // from it does not need this thread to be there. Core 0, so
            // that the worker keeps core 1 to itself; under SCHED_IDLE
            // (unless DP_FLOOD_IDLE=0), so that it stands for another
            // host: it takes every cycle of core 0 the measured client
            // leaves (the client waits in recv(2) most of a round trip)
            // but does not hold the core when the client wakes. The flood
            // rate each phase reached is in the notes.
            let _ = affinity::set_thread_affinity([FLOOD_CORE]);
            if idle {
                let _ = devplane_vmm::engine::sched_idle();
            }
            let t0 = Instant::now();
            let r = flood(sock, to, s, n);
            (r, t0.elapsed())
        }))
    } else {
        None
    };
    if flooding {
        // Let the flood reach its rate before the client measures.
        std::thread::sleep(Duration::from_millis(200));
    }
    let measured = measure(topo, to, warmup, iters)?;
    stop.store(true, Ordering::Relaxed);
    let rate = match flooder {
        Some(t) => {
            let (r, took) = t.join().map_err(|_| anyhow!("the flooder panicked"))?;
            r?;
            sent.load(Ordering::Relaxed) as f64 / took.as_secs_f64()
        }
        None => 0.0,
    };
    let snap = srv.snapshot();
    let over = snap
        .xdp
        .as_ref()
        .map_or(0, |s| s.get(Counter::DropOverBudget));
    srv.stop();
    let measured = measured.with_context(|| {
        let xdp: Vec<String> = snap.xdp.as_ref().map_or(Vec::new(), |s| {
            Counter::ALL
                .iter()
                .filter(|&&c| s.get(c) > 0)
                .map(|&c| format!("{} {}", c.name(), s.get(c)))
                .collect()
        });
        format!(
            "phase {name} (XDP counters: {}; workers: {:?})",
            xdp.join(", "),
            snap.workers
        )
    })?;
    Ok((measured, rate, over))
}

/// Runs the scenario once, `iters` round trips per phase. What it reports
/// about itself goes to `notes`; the goal (budgeted p99 within
/// [`GOAL_RATIO`] x unloaded p99) is a note, not a failure; a write not
/// applied exactly once is a failure.
pub fn run(iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let topo = Topology::new("biso").context("building the netns topology (needs root)")?;
    let attacker = topo.attacker().context("adding the flooder's namespace")?;
    let warmup = (iters / 10).max(100);
    let budget = Budget {
        rate: FLOOD_RATE,
        burst: FLOOD_BURST,
    };
    let (unloaded, _, _) = phase(&topo, &attacker, "unloaded", false, None, warmup, iters)?;
    let (flooded, rate_a, over_a) = phase(&topo, &attacker, "flooded", true, None, warmup, iters)?;
    let (budgeted, rate_b, over_b) = phase(
        &topo,
        &attacker,
        "budgeted",
        true,
        Some(budget),
        warmup,
        iters,
    )?;
    let p99 = |p: &Phase| p.lat.quantile(0.99) as f64 / 1000.0;
    let p50 = |p: &Phase| p.lat.quantile(0.50) as f64 / 1000.0;
    for (name, p, rate, over) in [
        ("unloaded", &unloaded, 0.0, 0),
        ("flooded", &flooded, rate_a, over_a),
        ("budgeted", &budgeted, rate_b, over_b),
    ] {
        notes.push(format!(
            "{SCENARIO}: {name}: p50 {:.1} us, p99 {:.1} us, {} writes applied exactly once \
             ({} resent), flood {:.0} datagrams/s, drop_over_budget {over}",
            p50(p),
            p99(p),
            p.writes,
            p.resent,
            rate,
        ));
    }
    let ratio = |p: &Phase| p99(p) / p99(&unloaded).max(0.001);
    notes.push(format!(
        "{SCENARIO}: p99 flooded / unloaded {:.2}x without a budget, {:.2}x with one \
         (rate {FLOOD_RATE}/s, burst {FLOOD_BURST}): goal <= {GOAL_RATIO}x {}",
        ratio(&flooded),
        ratio(&budgeted),
        if ratio(&budgeted) <= GOAL_RATIO {
            "met"
        } else {
            "NOT met"
        }
    ));
    drop(attacker);
    // The flooded rows' ratios are over the unloaded round trip.
    let floor = Floor::of(format!("{SCENARIO}/unloaded"), &unloaded.lat);
    Ok(vec![
        Row::floor(SCENARIO, "unloaded", unloaded.lat),
        Row::latency(SCENARIO, "flooded", flooded.lat, floor.clone()).with_rate(rate_a),
        Row::latency(SCENARIO, "budgeted", budgeted.lat, floor).with_rate(rate_b),
    ])
}
