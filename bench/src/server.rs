//! The `server` scenario: on the embedded topology (client and server
//! network namespaces joined by veth), in one run:
//!
//! - `udp-floor`: a raw busy-polling UDP echo, 64-byte payload;
//! - `xdp-rtt`: a one-record request (64-byte payload) through the XDP
//!   program and an AF_XDP worker, and back, closed loop; with `--rate N`
//!   it is `xdp-rtt-open` instead: N requests/s sent on a fixed schedule,
//!   each timed from its intended send time (no coordinated omission);
//! - `socket-rtt`: the same request to the socket-mode server;
//! - `xdp-rate`: requests per second of one worker with full (35-record)
//!   datagrams, 8 datagrams in flight.
//!
//! The client thread busy-polls on core 0 and the worker (or echo thread)
//! busy-polls on core 1: the two spinners this 2-core machine allows.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, MAX_RECORDS, Record, Request, RequestId, Status,
    datagram,
};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};
use crate::udp::{echo_loop, open_loop, recv_spin, round_trips};

pub(crate) const PORT: u16 = 7700;
const ECHO_PORT: u16 = 7800;
const CLIENT_CORE: usize = 0;
const WORKER_CORE: usize = 1;

const WORKER_SPIN: u32 = u32::MAX;
const SCENARIO: &str = "server";

/// Where this scenario's threads run, for `summary.json`.
pub fn placement() -> BTreeMap<String, String> {
    [
        ("client_core", CLIENT_CORE.to_string()),
        ("client_wait", "busy-poll".to_string()),
        ("worker_core", WORKER_CORE.to_string()),
        ("worker_spin", WORKER_SPIN.to_string()),
        ("echo_core", WORKER_CORE.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The server scenario's configuration: one worker, client 7, VM 1, null
/// model 1.
pub(crate) fn config(topo: &Topology, mode: Mode) -> ServerConfig {
    bench_config(1, mode, topo.server_ifname(), topo.client_ip(), "")
}

/// The benchmarks' server configuration: server `id` in `mode` on
/// `interface`, one worker on the worker core spinning between batches,
/// client 7 at `client` with its VM 1 (hypervisor 1), null model 1; its
/// maps pinned under `/sys/fs/bpf/dpbench-{pin_tag}{pid}`. Scenarios
/// change what they need with struct update syntax.
pub(crate) fn bench_config(
    id: u32,
    mode: Mode,
    interface: &str,
    client: Ipv4Addr,
    pin_tag: &str,
) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id,
            port: PORT,
            mode,
            interface: Some(interface.to_string()),
            workers: vec![WORKER_CORE],
            pin_dir: Some(format!("/sys/fs/bpf/dpbench-{pin_tag}{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: WORKER_SPIN,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: None,
            id: 7,
            address: client,
            budget: None,
        }],
        vms: vec![VmConfig {
            id: 1,
            client: 7,
            hypervisor: 1,
        }],
        models: vec![ModelConfig::new(1, "null", 0)],
    }
}

fn request(seq: u64, access: Access) -> Record {
    request_for(1, seq, access)
}

/// A request of vCPU 0 of VM `vm` (hypervisor 1).
pub(crate) fn request_for(vm: u32, seq: u64, access: Access) -> Record {
    Record::Request(Request {
        id: RequestId {
            vm,
            hypervisor: 1,
            vcpu: 0,
            seq,
        },
        access,
        flags: 0,
    })
}

fn encode(buf: &mut [u8], recs: &[Record]) -> usize {
    encode_for(buf, 1, recs)
}

/// A request datagram of client 7 to server 1 for `model`; its length.
pub(crate) fn encode_for(buf: &mut [u8], model: u32, recs: &[Record]) -> usize {
    datagram::encode(buf, Header::new(Kind::Request, model, 1, 7), recs).unwrap_or(0)
}

/// The sequence number a successful one-record response answers.
fn response_seq(bytes: &[u8]) -> Result<u64> {
    let d = Datagram::parse(bytes).map_err(|e| anyhow!("bad response: {e}"))?;
    match d.records().next() {
        Some(Record::Response(r)) if r.status == Status::Ok => Ok(r.id.seq),
        other => bail!("unexpected answer: {other:?}"),
    }
}

/// Checks that `bytes` is the successful answer to request `seq`.
pub(crate) fn check_response(seq: u64, bytes: &[u8]) -> Result<()> {
    match response_seq(bytes)? {
        s if s == seq => Ok(()),
        s => bail!("answer to {s} while waiting for {seq}"),
    }
}

/// Runs `f` on a thread in the client namespace pinned to the client core.
pub(crate) fn on_client<T: Send + 'static>(
    topo: &Topology,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    topo.run(Side::Client, move || {
        let _ = affinity::set_thread_affinity([CLIENT_CORE]);
        f()
    })?
}

/// One-record read round trips: closed loop, or open loop at `rate`
/// requests/s.
fn rtt(
    topo: &Topology,
    to: SocketAddr,
    warmup: u32,
    iters: u32,
    rate: Option<u64>,
) -> Result<Latency> {
    let sock = client_socket(topo)?;
    let access = Access::PioIn {
        port: 0x80,
        size: AccessSize::B1,
    };
    let make = move |i, buf: &mut [u8]| encode(buf, &[request(i, access)]);
    on_client(topo, move || match rate {
        None => round_trips(&sock, to, warmup, iters, make, check_response),
        Some(r) => open_loop(&sock, to, warmup, iters, r, make, response_seq),
    })
}

/// Runs `f` with the address of a busy-polling UDP echo (64-byte
/// datagrams come back as they are) on the worker core of the server
/// namespace, and stops the echo after it.
pub fn with_echo<T>(topo: &Topology, f: impl FnOnce(SocketAddr) -> Result<T>) -> Result<T> {
    let ip = topo.server_ip();
    let echo = topo
        .run(Side::Server, move || UdpSocket::bind((ip, ECHO_PORT)))?
        .context("bind the echo socket")?;
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let t = topo.spawn(Side::Server, "dp-echo", move || {
        let _ = affinity::set_thread_affinity([WORKER_CORE]);
        echo_loop(echo, s2)
    })?;
    let res = f(SocketAddr::from((ip, ECHO_PORT)));
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    res
}

/// The echo datagram of round trip `i`: 64 bytes, `i` first.
pub fn echo_payload(i: u64, buf: &mut [u8]) -> usize {
    buf[..64].fill(0);
    buf[..8].copy_from_slice(&i.to_le_bytes());
    64
}

/// Checks that `b` is the echo of round trip `i`.
pub fn check_echo(i: u64, b: &[u8]) -> Result<()> {
    if b.len() == 64 && b[..8] == i.to_le_bytes() {
        Ok(())
    } else {
        bail!("echo mismatch")
    }
}

/// The raw busy-polling UDP echo round trip across the topology's veth.
pub fn floor(topo: &Topology, warmup: u32, iters: u32) -> Result<Latency> {
    with_echo(topo, |to| {
        let sock = client_socket(topo)?;
        on_client(topo, move || {
            round_trips(&sock, to, warmup, iters, echo_payload, check_echo)
        })
    })
}

/// A socket bound to the client's address in the client namespace.
pub fn client_socket(topo: &Topology) -> Result<UdpSocket> {
    let ip = topo.client_ip();
    topo.run(Side::Client, move || UdpSocket::bind((ip, 0)))?
        .context("bind the client socket")
}

fn rate_of(topo: &Topology, to: SocketAddr, window: usize, duration: Duration) -> Result<f64> {
    rate_of_vm(topo, to, window, duration, 1)
}

/// A full datagram's records: `MAX_RECORDS` non-posted one-byte writes of
/// VM `vm` to `port`, numbered from `first_seq`.
pub(crate) fn full_writes(vm: u32, port: u16, first_seq: u64) -> Vec<Record> {
    (first_seq..first_seq + MAX_RECORDS as u64)
        .map(|seq| {
            request_for(
                vm,
                seq,
                Access::PioOut {
                    port,
                    size: AccessSize::B1,
                    data: 1,
                },
            )
        })
        .collect()
}

/// One worker's rate (answered records/s) for `duration`: `window`
/// datagrams in flight, each answer's records counted and the next
/// datagram `next(buf)` (its length) sent for it.
pub(crate) fn worker_rate(
    topo: &Topology,
    to: SocketAddr,
    window: usize,
    duration: Duration,
    mut next: impl FnMut(&mut [u8]) -> usize + Send + 'static,
) -> Result<f64> {
    let sock = client_socket(topo)?;
    on_client(topo, move || {
        sock.set_nonblocking(true)?;
        sock.connect(to)?;
        let mut out = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let mut inb = [0u8; 2048];
        let mut send = |sock: &UdpSocket| -> Result<()> {
            let n = next(&mut out);
            sock.send(&out[..n])?;
            Ok(())
        };
        for _ in 0..window {
            send(&sock)?;
        }
        let start = Instant::now();
        let mut records = 0u64;
        while start.elapsed() < duration {
            let n = recv_spin(&sock, &mut inb, Duration::from_secs(1))?;
            let d = Datagram::parse(&inb[..n]).map_err(|e| anyhow!("bad response: {e}"))?;
            records += d.len() as u64;
            send(&sock)?;
        }
        Ok(records as f64 / start.elapsed().as_secs_f64())
    })
}

/// One worker's rate (answered records/s) for `duration`: full datagrams
/// of VM `vm`'s port writes (its sequence numbered from 1), `window` in
/// flight.
pub(crate) fn rate_of_vm(
    topo: &Topology,
    to: SocketAddr,
    window: usize,
    duration: Duration,
    vm: u32,
) -> Result<f64> {
    let mut seq = 1u64;
    worker_rate(topo, to, window, duration, move |buf| {
        let recs = full_writes(vm, 0x80, seq);
        seq += MAX_RECORDS as u64;
        encode(buf, &recs)
    })
}

/// Runs the scenario once: `iters` round trips per latency measurement,
/// the XDP round trip open loop at `rate` requests/s if given, the worker
/// rate for `rate_for`. What the scenario reports about itself goes to
/// `notes`.
///
/// The floor is measured right before and right after each round trip
/// (A, xdp-rtt, B, socket-rtt, C): a row's ratio is over the floor blocks
/// around it (A+B, B+C), so that a change of the machine's speed during
/// the run moves both sides of the ratio. The `udp-floor` row holds all
/// three blocks.
pub fn run(
    iters: u32,
    open: Option<(u64, u32)>,
    rate_for: Duration,
    notes: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let topo = Topology::new("bench").context("building the netns topology (needs root)")?;
    let warmup = (iters / 10).max(100);
    let to = SocketAddr::from((topo.server_ip(), PORT));
    let floor_block = |which: &str| -> Result<Latency> {
        progress(format_args!(
            "server: udp-floor {which}, {iters} round trips"
        ));
        floor(&topo, warmup, iters)
    };
    let floor_name = format!("{SCENARIO}/udp-floor");
    let around = |a: &Latency, b: &Latency| {
        let mut f = a.clone();
        f.add(b);
        Floor::of(floor_name.clone(), &f)
    };

    let fa = floor_block("A")?;
    let (rate, xdp_iters) = match open {
        None => (None, iters),
        Some((r, n)) => (Some(r), n),
    };
    let xdp_name = match rate {
        None => "xdp-rtt",
        Some(_) => "xdp-rtt-open",
    };
    let xdp = {
        let srv = ServerThread::spawn(config(&topo, Mode::Xdp), Some(topo.server_netns()))
            .context("starting the XDP server")?;
        notes.push(format!(
            "server: XDP attached in {:?} mode",
            srv.attach_mode()
        ));
        match rate {
            None => progress(format_args!("server: {xdp_name}, {iters} round trips")),
            Some(r) => progress(format_args!(
                "server: {xdp_name}, {xdp_iters} requests at {r}/s"
            )),
        }
        let h = rtt(&topo, to, warmup, xdp_iters, rate);
        srv.stop();
        h?
    };
    let fb = floor_block("B")?;
    let socket = {
        let srv = ServerThread::spawn(config(&topo, Mode::Socket), Some(topo.server_netns()))
            .context("starting the socket-mode server")?;
        progress(format_args!("server: socket-rtt, {iters} round trips"));
        let h = rtt(&topo, to, warmup, iters, None);
        srv.stop();
        h?
    };
    let fc = floor_block("C")?;
    let xdp_rate = {
        let srv = ServerThread::spawn(config(&topo, Mode::Xdp), Some(topo.server_netns()))
            .context("starting the XDP server")?;
        progress(format_args!("server: xdp-rate, {rate_for:?}"));
        let r = rate_of(&topo, to, 8, rate_for);
        srv.stop();
        r?
    };
    let (xdp_floor, socket_floor) = (around(&fa, &fb), around(&fb, &fc));
    let mut all = fa;
    all.add(&fb);
    all.add(&fc);
    Ok(vec![
        Row::floor(SCENARIO, "udp-floor", all),
        Row::latency(SCENARIO, xdp_name, xdp, xdp_floor),
        Row::rate(SCENARIO, "xdp-rate", xdp_rate),
        Row::latency(SCENARIO, "socket-rtt", socket, socket_floor),
    ])
}
