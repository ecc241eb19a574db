//! The `server` scenario: on the embedded topology (client and server
//! network namespaces joined by veth), in one run:
//!
//! - `udp-floor`: a raw busy-polling UDP echo, 64-byte payload;
//! - `xdp-rtt`: a one-record request (64-byte payload) through the XDP
//!   program and an AF_XDP worker, and back;
//! - `socket-rtt`: the same request to the socket-mode server;
//! - `xdp-rate`: requests per second of one worker with 36-record
//!   datagrams, 8 datagrams in flight.
//!
//! The client thread busy-polls on core 0 and the worker (or echo thread)
//! busy-polls on core 1: the two spinners this 2-core machine allows.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_dataplane::server::host::ServerThread;
use devplane_dataplane::topology::{Side, Topology};
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, MAX_RECORDS, Record, Request, RequestId, Status,
    datagram,
};

use crate::hist::Summary;
use crate::udp::{echo_loop, recv_spin, round_trips};

const PORT: u16 = 7700;
const ECHO_PORT: u16 = 7800;
const CLIENT_CORE: usize = 0;
const WORKER_CORE: usize = 1;

/// One line of the result table.
pub struct Row {
    /// Measurement name.
    pub name: &'static str,
    /// Latency summary, if a latency measurement.
    pub latency: Option<Summary>,
    /// Rate (records/s), if a throughput measurement.
    pub rate: Option<f64>,
    /// The p50 this row is compared with (same run), if any.
    pub floor_p50: Option<u64>,
}

fn config(topo: &Topology, mode: Mode) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: 1,
            port: PORT,
            mode,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![WORKER_CORE],
            pin_dir: Some(format!("/sys/fs/bpf/dpbench-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: u32::MAX,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            id: 7,
            address: topo.client_ip(),
        }],
        vms: vec![VmConfig {
            id: 1,
            client: 7,
            hypervisor: 1,
        }],
        models: vec![ModelConfig {
            id: 1,
            kind: "null".into(),
            worker: 0,
            line: None,
            vm: None,
            pio_base: None,
            mmio_base: None,
        }],
    }
}

fn request(seq: u64, access: Access) -> Record {
    Record::Request(Request {
        id: RequestId {
            vm: 1,
            hypervisor: 1,
            vcpu: 0,
            seq,
        },
        access,
        flags: 0,
    })
}

fn encode(buf: &mut [u8], recs: &[Record]) -> usize {
    datagram::encode(buf, Header::new(Kind::Request, 1, 1, 7), recs).unwrap_or(0)
}

fn check_response(seq: u64, bytes: &[u8]) -> Result<()> {
    let d = Datagram::parse(bytes).map_err(|e| anyhow!("bad response: {e}"))?;
    match d.records().next() {
        Some(Record::Response(r)) if r.id.seq == seq && r.status == Status::Ok => Ok(()),
        other => bail!("unexpected answer to {seq}: {other:?}"),
    }
}

fn client_socket(topo: &Topology) -> Result<UdpSocket> {
    let ip = topo.client_ip();
    topo.run(Side::Client, move || UdpSocket::bind((ip, 0)))?
        .context("bind the client socket")
}

/// Runs `f` on a thread in the client namespace pinned to the client core.
fn on_client<T: Send + 'static>(
    topo: &Topology,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    topo.run(Side::Client, move || {
        let _ = affinity::set_thread_affinity([CLIENT_CORE]);
        f()
    })?
}

fn rtt(topo: &Topology, to: SocketAddr, warmup: u32, iters: u32) -> Result<Summary> {
    let sock = client_socket(topo)?;
    let access = Access::PioIn {
        port: 0x80,
        size: AccessSize::B1,
    };
    let lat = on_client(topo, move || {
        round_trips(
            &sock,
            to,
            warmup,
            iters,
            |i, buf| encode(buf, &[request(i, access)]),
            check_response,
        )
    })?;
    Ok(lat.summary())
}

/// The raw busy-polling UDP echo round trip across the topology's veth.
pub fn floor(topo: &Topology, warmup: u32, iters: u32) -> Result<Summary> {
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
    let sock = client_socket(topo)?;
    let to = SocketAddr::from((ip, ECHO_PORT));
    let res = on_client(topo, move || {
        round_trips(
            &sock,
            to,
            warmup,
            iters,
            |i, buf| {
                buf[..64].fill(0);
                buf[..8].copy_from_slice(&i.to_le_bytes());
                64
            },
            |i, b| {
                if b.len() == 64 && b[..8] == i.to_le_bytes() {
                    Ok(())
                } else {
                    bail!("echo mismatch")
                }
            },
        )
    });
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
    Ok(res?.summary())
}

fn rate(topo: &Topology, to: SocketAddr, window: usize, duration: Duration) -> Result<f64> {
    let sock = client_socket(topo)?;
    on_client(topo, move || {
        sock.set_nonblocking(true)?;
        sock.connect(to)?;
        let mut out = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let mut inb = [0u8; 2048];
        let mut seq = 0u64;
        let mut send = |sock: &UdpSocket, seq: &mut u64| -> Result<()> {
            let recs: Vec<Record> = (0..MAX_RECORDS)
                .map(|_| {
                    *seq += 1;
                    request(
                        *seq,
                        Access::PioOut {
                            port: 0x80,
                            size: AccessSize::B1,
                            data: 1,
                        },
                    )
                })
                .collect();
            let n = encode(&mut out, &recs);
            sock.send(&out[..n])?;
            Ok(())
        };
        for _ in 0..window {
            send(&sock, &mut seq)?;
        }
        let start = Instant::now();
        let mut records = 0u64;
        while start.elapsed() < duration {
            let n = recv_spin(&sock, &mut inb, Duration::from_secs(1))?;
            let d = Datagram::parse(&inb[..n]).map_err(|e| anyhow!("bad response: {e}"))?;
            records += d.len() as u64;
            send(&sock, &mut seq)?;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(records as f64 / secs)
    })
}

/// Runs the scenario; `iters` round trips per latency measurement.
pub fn run(iters: u32) -> Result<Vec<Row>> {
    let topo = Topology::new("bench").context("building the netns topology (needs root)")?;
    let warmup = (iters / 10).max(100);
    let mut rows = Vec::new();
    let udp = floor(&topo, warmup, iters)?;
    rows.push(Row {
        name: "udp-floor",
        latency: Some(udp),
        rate: None,
        floor_p50: Some(udp.p50),
    });
    let to = SocketAddr::from((topo.server_ip(), PORT));
    {
        let srv = ServerThread::spawn(config(&topo, Mode::Xdp), Some(topo.server_netns()))
            .context("starting the XDP server")?;
        let attach = srv.attach_mode();
        rows.push(Row {
            name: "xdp-rtt",
            latency: Some(rtt(&topo, to, warmup, iters)?),
            rate: None,
            floor_p50: Some(udp.p50),
        });
        rows.push(Row {
            name: "xdp-rate",
            latency: None,
            rate: Some(rate(&topo, to, 8, Duration::from_secs(1))?),
            floor_p50: None,
        });
        eprintln!("dpbench: XDP attached in {attach:?} mode");
        srv.stop();
    }
    {
        let srv = ServerThread::spawn(config(&topo, Mode::Socket), Some(topo.server_netns()))
            .context("starting the socket-mode server")?;
        rows.push(Row {
            name: "socket-rtt",
            latency: Some(rtt(&topo, to, warmup, iters)?),
            rate: None,
            floor_p50: Some(udp.p50),
        });
        srv.stop();
    }
    Ok(rows)
}
