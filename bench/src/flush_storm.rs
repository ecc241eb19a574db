//! The `flush-storm` scenario: a counter model's round trip on a worker,
//! unloaded and while a `blockstore` model on the SAME worker takes a
//! storm of writes and flushes (issue 14 item 3: slow model work must not
//! hold the worker; goal: the counter's p99 under the storm within
//! [`GOAL_RATIO`] x unloaded).
//!
//! On the embedded topology, one XDP server with one worker (core 1) owns
//! model 1 (a counter) and model 2 (a blockstore on a file under the
//! temporary directory, a real disk here, so an fsync costs what it
//! costs). Client 7's VM 1 writes to the counter closed loop from vCPU 0
//! (the `isolation` scenario's client: `recv(2)`, resent after 200 ms,
//! the count checked exactly once at the end). In the `flushing` phase its
//! vCPU 1 meanwhile sends, closed loop, datagrams of [`STORM_WRITES`]
//! 8-byte writes to distinct pages followed by a flush request (a write
//! of `CTRL_FLUSH`), each answered when applied: the flushes are served
//! as the blockstore serves them (since issue 14, without waiting: the
//! write-back and fsync run on the model's io_uring, and requests that
//! come while one is in flight are settled together by the next). Both
//! client threads share core 0. Each phase runs on a fresh server; after
//! the storm the scenario waits until every flush requested has settled
//! and checks that none failed.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::blockstore::{
    CTRL_BASE, CTRL_FAILURES, CTRL_FLUSH, CTRL_FLUSH_PENDING, PAGE_SIZE,
};
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
};

use crate::isolation::{Phase, client_phase};
use crate::report::{Floor, Row, progress};

/// The scenario's name.
pub const SCENARIO: &str = "flush-storm";
const PORT: u16 = 7701;
const CLIENT: u32 = 7;
const CLIENT_CORE: usize = 0;
const WORKER_CORE: usize = 1;
const STORM_CORE: usize = 0;
/// Data writes before each flush request of the storm.
pub const STORM_WRITES: usize = 8;
/// Distinct pages the storm writes to (round robin).
const STORM_PAGES: u64 = 256;
/// How long the storm waits for an answer before it sends again.
const STORM_RESEND: Duration = Duration::from_millis(200);
/// The longest a storm lasts, whatever the client does.
const MAX_STORM: Duration = Duration::from_secs(30);
/// The goal: p99 under the storm at most this many times unloaded.
pub const GOAL_RATIO: f64 = 2.0;

fn config(topo: &Topology, image: &std::path::Path) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: 1,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![WORKER_CORE],
            pin_dir: Some(format!("/sys/fs/bpf/dpbench-flush-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: u32::MAX,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: None,
            id: CLIENT,
            address: topo.client_ip(),
            budget: None,
        }],
        vms: vec![VmConfig {
            id: 1,
            client: CLIENT,
            hypervisor: 1,
        }],
        models: vec![
            ModelConfig::new(1, "counter", 0),
            ModelConfig {
                backing: Some(image.to_path_buf()),
                ..ModelConfig::new(2, "blockstore", 0)
            },
        ],
    }
}

/// A request datagram of VM 1's vCPU 1 to the blockstore (model 2).
fn encode_store(buf: &mut [u8], seq: u64, accesses: &[Access]) -> usize {
    let recs: Vec<Record> = accesses
        .iter()
        .enumerate()
        .map(|(i, &access)| {
            Record::Request(Request {
                id: RequestId {
                    vm: 1,
                    hypervisor: 1,
                    vcpu: 1,
                    seq: seq + i as u64,
                },
                access,
                flags: 0,
            })
        })
        .collect();
    datagram::encode(buf, Header::new(Kind::Request, 2, 1, CLIENT), &recs).unwrap_or(0)
}

/// Sends `accesses` (numbered from `seq`) and waits for the answer to all
/// of them (sent again after [`STORM_RESEND`]); returns the data of each.
fn store_round_trip(
    sock: &UdpSocket,
    seq: u64,
    accesses: &[Access],
    deadline: Instant,
) -> Result<Vec<u64>> {
    let mut out = [0u8; 2048];
    let mut inb = [0u8; 2048];
    let n = encode_store(&mut out, seq, accesses);
    if n == 0 {
        bail!("{} records do not fit one datagram", accesses.len());
    }
    sock.send(&out[..n])?;
    let mut sent_at = Instant::now();
    loop {
        match sock.recv(&mut inb) {
            Ok(m) => {
                let Ok(d) = Datagram::parse(&inb[..m]) else {
                    continue;
                };
                let mut data = Vec::new();
                for r in d.records() {
                    if let Record::Response(r) = r
                        && r.id.seq >= seq
                        && r.id.seq < seq + accesses.len() as u64
                    {
                        if r.status != Status::Ok {
                            bail!("blockstore request {} answered {:?}", r.id.seq, r.status);
                        }
                        data.push(r.data);
                    }
                }
                if data.len() == accesses.len() {
                    return Ok(data);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("recv"),
        }
        if Instant::now() > deadline {
            bail!("blockstore request {seq} unanswered");
        }
        if sent_at.elapsed() > STORM_RESEND {
            sent_at = Instant::now();
            sock.send(&out[..n])?;
        }
    }
}

const fn ctrl_read(reg: u64) -> Access {
    Access::MmioRead {
        gpa: CTRL_BASE + reg,
        size: AccessSize::B8,
    }
}

/// What the storm did.
struct Storm {
    /// Flush requests answered.
    flushes: u64,
    /// Flushes the blockstore completed, once all had settled.
    completed: u64,
    took: Duration,
}

/// The storm: until `stop`, datagrams of [`STORM_WRITES`] writes and a
/// flush, closed loop; then waits until every flush has settled and
/// checks that none failed.
fn storm(sock: UdpSocket, stop: Arc<AtomicBool>) -> Result<Storm> {
    sock.set_read_timeout(Some(Duration::from_millis(20)))?;
    let start = Instant::now();
    let mut seq = devplane_wire::first_seq();
    let mut flushes = 0u64;
    let mut page = 0u64;
    let mut accesses = Vec::with_capacity(STORM_WRITES + 1);
    while !stop.load(Ordering::Relaxed) && start.elapsed() < MAX_STORM {
        accesses.clear();
        for _ in 0..STORM_WRITES {
            accesses.push(Access::MmioWrite {
                gpa: (page % STORM_PAGES) * PAGE_SIZE as u64,
                size: AccessSize::B8,
                data: seq,
            });
            page += 1;
        }
        accesses.push(Access::MmioWrite {
            gpa: CTRL_BASE + CTRL_FLUSH,
            size: AccessSize::B8,
            data: 1,
        });
        store_round_trip(&sock, seq, &accesses, Instant::now() + MAX_STORM)?;
        seq += accesses.len() as u64;
        flushes += 1;
    }
    let took = start.elapsed();
    // Every flush settles; none failed.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reads = [
            ctrl_read(CTRL_FLUSH_PENDING),
            ctrl_read(CTRL_FLUSH),
            ctrl_read(CTRL_FAILURES),
        ];
        let got = store_round_trip(&sock, seq, &reads, deadline)?;
        seq += reads.len() as u64;
        if got[2] != 0 {
            bail!("the blockstore counted {} I/O failures", got[2]);
        }
        if got[0] == 0 {
            if got[1] != flushes {
                bail!("{flushes} flushes requested, {} completed", got[1]);
            }
            return Ok(Storm {
                flushes,
                completed: got[1],
                took,
            });
        }
        if Instant::now() > deadline {
            bail!("{} flushes still pending after 30 s", got[0]);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// One phase on a fresh server: the counter's round trips, with the storm
/// if `storming`.
fn phase(
    topo: &Topology,
    image: &std::path::Path,
    name: &str,
    storming: bool,
    warmup: u32,
    iters: u32,
) -> Result<(Phase, Option<Storm>)> {
    progress(format_args!("{SCENARIO}: {name}, {iters} round trips"));
    let srv = ServerThread::spawn(config(topo, image), Some(topo.server_netns()))
        .context("starting the XDP server")?;
    let to = SocketAddr::from((topo.server_ip(), PORT));
    let stop = Arc::new(AtomicBool::new(false));
    let ip = topo.client_ip();
    let stormer = if storming {
        let sock = topo
            .run(Side::Client, move || UdpSocket::bind((ip, 0)))?
            .context("bind the storm's socket")?;
        sock.connect(to)?;
        let s = stop.clone();
        let t = std::thread::spawn(move || {
            let _ = affinity::set_thread_affinity([STORM_CORE]);
            storm(sock, s)
        });
        // Let the storm get going before the client measures.
        std::thread::sleep(Duration::from_millis(200));
        Some(t)
    } else {
        None
    };
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))?
        .context("bind the client socket")?;
    let measured = topo.run(Side::Client, move || {
        let _ = affinity::set_thread_affinity([CLIENT_CORE]);
        client_phase(&sock, to, warmup, iters)
    })?;
    stop.store(true, Ordering::Relaxed);
    let stormed = match stormer {
        Some(t) => Some(t.join().map_err(|_| anyhow!("the storm panicked"))?),
        None => None,
    };
    let snap = srv.snapshot();
    srv.stop();
    let measured =
        measured.with_context(|| format!("phase {name} (workers: {:?})", snap.workers))?;
    let stormed = stormed
        .transpose()
        .with_context(|| format!("the storm of phase {name} (workers: {:?})", snap.workers))?;
    Ok((measured, stormed))
}

/// Removes a file when dropped.
struct TempFile(std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the scenario once, `iters` round trips per phase; the goal is a
/// note, not a failure; a write not applied exactly once, or a flush that
/// failed or never settled, is a failure.
pub fn run(iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let topo = Topology::new("bfls").context("building the netns topology (needs root)")?;
    let image = TempFile(
        std::env::temp_dir().join(format!("dpbench-flush-storm-{}.img", std::process::id())),
    );
    std::fs::File::create(&image.0)
        .and_then(|f| f.set_len(STORM_PAGES * PAGE_SIZE as u64))
        .with_context(|| format!("creating the disk image {}", image.0.display()))?;
    let warmup = (iters / 10).max(100);
    let (unloaded, _) = phase(&topo, &image.0, "unloaded", false, warmup, iters)?;
    let (flushing, storm) = phase(&topo, &image.0, "flushing", true, warmup, iters)?;
    let storm = storm.ok_or_else(|| anyhow!("the storm did not run"))?;
    let p99 = |p: &Phase| p.lat.quantile(0.99) as f64 / 1000.0;
    let p50 = |p: &Phase| p.lat.quantile(0.50) as f64 / 1000.0;
    let rate = storm.flushes as f64 / storm.took.as_secs_f64().max(1e-9);
    for (name, p) in [("unloaded", &unloaded), ("flushing", &flushing)] {
        notes.push(format!(
            "{SCENARIO}: {name}: counter p50 {:.1} us, p99 {:.1} us, {} writes applied exactly \
             once ({} resent)",
            p50(p),
            p99(p),
            p.writes,
            p.resent,
        ));
    }
    let ratio = p99(&flushing) / p99(&unloaded).max(0.001);
    notes.push(format!(
        "{SCENARIO}: storm of {} flushes ({rate:.0}/s, {STORM_WRITES} page writes each) on the \
         same worker, all {} completed, none failed; counter p99 flushing / unloaded {ratio:.2}x: \
         goal <= {GOAL_RATIO}x {}",
        storm.flushes,
        storm.completed,
        if ratio <= GOAL_RATIO {
            "met"
        } else {
            "NOT met"
        }
    ));
    let floor = Floor::of(format!("{SCENARIO}/unloaded"), &unloaded.lat);
    Ok(vec![
        Row::floor(SCENARIO, "unloaded", unloaded.lat),
        Row::latency(SCENARIO, "flushing", flushing.lat, floor).with_rate(rate),
    ])
}
