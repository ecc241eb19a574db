//! The `migrate` scenario: what moving things costs a running guest, on
//! the embedded topology (a server behind XDP, a second server in socket
//! mode in the same namespace, clients in the client namespace).
//!
//! - **Live VM migration** (`devplane_vmm::migrate`, pre-copy with KVM's
//!   dirty log over a loopback TCP stream, between two clients of this
//!   process): a 64 MiB guest whose vCPU writes to a remote counter at
//!   full speed (synchronous writes, `guests::checked_writes`) is
//!   migrated [`MIGRATIONS`] times in a row, each target becoming the
//!   next source. Rows `downtime` (median, from the guest's last exit on
//!   the source to its first on the target, the vCPU's own sampled exit
//!   times) and `total` (median migration time); the notes give every
//!   migration's downtime, total, bytes sent, pre-copy rounds, pages sent
//!   while suspended, and the sender's own downtime (suspend to the
//!   target's word that it holds the VM). At the end the guest checks its
//!   count: a write lost or applied twice fails the scenario.
//! - **Remote round trip during model moves between servers**: the same
//!   kind of guest (one vCPU, synchronous writes, not migrated) with its
//!   exit intervals sampled, once with nothing moving (`rtt-steady`, the
//!   floor) and once while its model moves back and forth between the two
//!   servers every [`MOVE_EVERY`] with the two-phase hand-over
//!   (`rtt-model-moves`, ratio to the floor). A request caught by a move
//!   waits for the client's retransmission to the new owner.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_control::handover::{self, Report};
use devplane_devmodels::Space;
use devplane_testkit::host::ServerThread;
use devplane_testkit::mover::ServerMove;
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::guests;
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::migrate::Migration;
use devplane_vmm::vmm::{Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuSpec, VmSpec};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};

/// The scenario's name.
pub const SCENARIO: &str = "migrate";
const PORT_A: u16 = 7746;
const PORT_B: u16 = 7747;
const SERVER_A: u32 = 1;
const SERVER_B: u32 = 2;
const CLIENT: u32 = 7;
const HV: u32 = 2;
const VM: u32 = 1;
/// The migrated guest's counter; the round-trip blocks use the next two
/// (a counter keeps its count, and each guest checks its own writes).
const MODEL: u32 = 11;
const STEADY_MODEL: u32 = 12;
const MOVING_MODEL: u32 = 13;
const PIO_BASE: u16 = 0x500;
/// Guest memory of the migrated VM (the size).
const MEM: usize = 64 << 20;
/// Migrations in a row.
pub const MIGRATIONS: usize = 3;
/// Writes of the migrated guest: enough to outlast the migrations.
const MIGRATE_WRITES: u16 = 65_000;
/// How often the model moves during `rtt-model-moves`.
pub const MOVE_EVERY: Duration = Duration::from_millis(50);

fn server_config(topo: &Topology, xdp: bool) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: if xdp { SERVER_A } else { SERVER_B },
            port: if xdp { PORT_A } else { PORT_B },
            mode: if xdp { Mode::Xdp } else { Mode::Socket },
            interface: xdp.then(|| topo.server_ifname().to_string()),
            workers: vec![0],
            pin_dir: xdp.then(|| {
                format!("/sys/fs/bpf/devplane-bench-migrate-{}", std::process::id()).into()
            }),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            budget: None,
            tag_key: None,
            id: CLIENT,
            address: topo.client_ip(),
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models: if xdp {
            [MODEL, STEADY_MODEL, MOVING_MODEL]
                .map(|id| ModelConfig {
                    pio_base: Some(PIO_BASE),
                    ..ModelConfig::new(id, "counter", 0)
                })
                .to_vec()
        } else {
            Vec::new()
        },
    }
}

/// One VM of one vCPU writing `writes` times synchronously to the
/// counter on server A, checking the count at the end.
fn spec(
    topo: &Topology,
    model: u32,
    mem: usize,
    writes: u16,
    samples: usize,
) -> Result<ClientSpec> {
    let g = guests::checked_writes(PIO_BASE, writes, 0).map_err(|e| anyhow!("guest: {e}"))?;
    Ok(ClientSpec {
        client: CLIENT,
        bind: Some(topo.client_ip().into()),
        servers: vec![
            ServerSpec {
                addr: SocketAddr::from((topo.server_ip(), PORT_A)),
                id: SERVER_A,
                via: None,
            },
            ServerSpec {
                addr: SocketAddr::from((topo.server_ip(), PORT_B)),
                id: SERVER_B,
                via: None,
            },
        ],
        vms: vec![VmSpec {
            id: VM,
            hypervisor: HV,
            mem_bytes: mem.max(g.mem_end().next_multiple_of(0x1_0000) as usize),
            images: vec![(g.load_gpa, g.code.clone())],
            vcpus: vec![VcpuSpec {
                entry: g.entry,
                core: None,
            }],
            devices: vec![DeviceSpec {
                space: Space::Pio,
                base: PIO_BASE as u64,
                len: 0x10,
                model,
                posted: false,
                place: Place::Remote { server: 0 },
            }],
        }],
        engine: EngineConfig {
            spin_budget: 500,
            retransmit: Duration::from_millis(2),
            retransmit_max: Duration::from_millis(20),
            ..EngineConfig::default()
        },
        engine_core: None,
        vcpu_spin: 200,
        samples,
        direct: true,
    })
}

fn start(topo: &Topology, spec: ClientSpec) -> Result<Client> {
    topo.run(Side::Client, move || Client::start(spec))
        .context("entering the client namespace")?
        .map_err(|e| anyhow!("starting the client: {e}"))
}

fn done(c: &mut Client, writes: u16) -> Result<()> {
    let r = c.wait(Duration::from_secs(120));
    match r.first().map(|r| &r.exit) {
        Some(Ok(VcpuExit::Done(v))) if *v == u32::from(writes) => Ok(()),
        other => bail!("the guest's check failed (a write lost or applied twice?): {other:?}"),
    }
}

fn remote(c: &Client) -> u64 {
    c.vcpu_stats()
        .first()
        .map_or(0, |(_, _, s)| s.remote.load(Ordering::Relaxed))
}

/// Migrates the VM of `source` to a new client in the client namespace
/// over loopback TCP; returns what the sender measured and the target.
fn migrate_once(
    topo: &Topology,
    source: &Client,
    target: ClientSpec,
) -> Result<(Migration, Client)> {
    let listener = TcpListener::bind("127.0.0.1:0").context("migration listener")?;
    let addr = listener.local_addr()?;
    let (tx, rx) = std::sync::mpsc::channel();
    let token = devplane_vmm::migrate::MigrationToken::random()?;
    let secret = token.clone();
    let receiver = topo.spawn(Side::Client, "dp-bench-migrate-in", move || {
        let (stream, _) = listener.accept().ok()?;
        devplane_vmm::migrate::admit(stream, &secret)
            .and_then(|a| {
                devplane_vmm::migrate::receive(
                    a,
                    move |_| Ok(target),
                    move |c| tx.send(c).map_err(|_| "bench gone".to_string()),
                )
            })
            .ok()
    })?;
    let stream = TcpStream::connect(addr).context("connecting to the target")?;
    let sent = devplane_vmm::migrate::send(source, VM, stream, &token);
    let _ = receiver.join();
    let m = sent.map_err(|e| anyhow!("migration failed: {e}"))?;
    let c = rx
        .try_recv()
        .map_err(|_| anyhow!("the target did not get the VM"))?;
    Ok((m, c))
}

/// Exit time (ns since the sampling epoch) of the first vCPU: first or
/// last.
fn exit_ns(c: &Client, first: bool) -> u64 {
    c.vcpu_stats().first().map_or(0, |(_, _, s)| {
        if first {
            s.first_exit_ns.load(Ordering::Relaxed)
        } else {
            s.last_exit_ns.load(Ordering::Relaxed)
        }
    })
}

/// [`MIGRATIONS`] live migrations of a 64 MiB guest writing at full
/// speed: each one's (exit-to-exit downtime, what the sender measured).
fn migrations(topo: &Topology) -> Result<Vec<(Duration, Migration)>> {
    let mut source = start(topo, spec(topo, MODEL, MEM, MIGRATE_WRITES, 1)?)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while remote(&source) < 500 {
        if Instant::now() > deadline {
            bail!("the guest does not write");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut out = Vec::new();
    for i in 0..MIGRATIONS {
        progress(format_args!(
            "migrate: live migration {}/{MIGRATIONS}",
            i + 1
        ));
        if remote(&source) >= u64::from(MIGRATE_WRITES) {
            bail!("the guest finished before migration {}", i + 1);
        }
        let (m, target) = migrate_once(topo, &source, spec(topo, MODEL, MEM, MIGRATE_WRITES, 1)?)?;
        let last = exit_ns(&source, false);
        target
            .resume()
            .map_err(|e| anyhow!("resuming on the target: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        let first = loop {
            let f = exit_ns(&target, true);
            if f != 0 {
                break f;
            }
            if Instant::now() > deadline {
                bail!("the guest took no exit on the target within 5 s");
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        out.push((Duration::from_nanos(first.saturating_sub(last)), m));
        drop(std::mem::replace(&mut source, target));
        // Let it write a while before the next one.
        std::thread::sleep(Duration::from_millis(50));
    }
    done(&mut source, MIGRATE_WRITES)?;
    Ok(out)
}

/// The exit intervals of a guest making `writes` synchronous writes,
/// with the model moving between `a` and `b` every [`MOVE_EVERY`] if
/// `moving`; returns them and the number of moves.
fn round_trips(
    topo: &Topology,
    a: &ServerThread,
    b: &ServerThread,
    writes: u16,
    moving: bool,
) -> Result<(Latency, usize)> {
    let model = if moving { MOVING_MODEL } else { STEADY_MODEL };
    let mut c = start(
        topo,
        spec(topo, model, 0, writes, usize::from(writes) + 16)?,
    )?;
    let mut moves = 0;
    // Where the model is now: A (true) or B. The moving block runs last:
    // the model may end on B.
    let mut on_a = true;
    if moving {
        while !c.finished() {
            std::thread::sleep(MOVE_EVERY);
            if c.finished() {
                break;
            }
            let (from, to, from_id, to_id) = if on_a {
                (a, b, SERVER_A, SERVER_B)
            } else {
                (b, a, SERVER_B, SERVER_A)
            };
            let r = handover::run(&mut ServerMove {
                model,
                from,
                to,
                from_id,
                to_id,
                retarget: |m, s| {
                    c.retarget(m, s, Duration::from_secs(2))
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                },
            });
            match r {
                Report::Moved { .. } => {
                    on_a = !on_a;
                    moves += 1;
                }
                other => bail!("a model move failed: {other}"),
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !c.finished() {
        if Instant::now() > deadline {
            bail!("the guest did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let samples = c
        .vcpu_stats()
        .first()
        .map(|(_, _, s)| s.take_samples())
        .unwrap_or_default();
    done(&mut c, writes)?;
    let mut lat = Latency::new();
    // The first exits warm up (first packets, page faults).
    for &ns in samples.iter().skip(samples.len() / 20) {
        lat.record(u64::from(ns));
    }
    Ok((lat, moves))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the scenario: rows `downtime`, `total`, `rtt-steady` (floor) and
/// `rtt-model-moves`.
pub fn run(round_trips_n: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let topo = Topology::new("bmig").context("building the netns topology")?;
    let a = ServerThread::spawn(server_config(&topo, true), Some(topo.server_netns()))
        .context("starting the XDP server")?;
    let b = ServerThread::spawn(server_config(&topo, false), Some(topo.server_netns()))
        .context("starting the second server")?;

    let migs = migrations(&topo)?;
    let mut down: Vec<Duration> = migs.iter().map(|(d, _)| *d).collect();
    let mut total: Vec<Duration> = migs.iter().map(|(_, m)| m.total).collect();
    for (i, (d, m)) in migs.iter().enumerate() {
        notes.push(format!(
            "migrate: migration {}: downtime {:.2} ms (last exit on the source to first on the \
             target; the sender's suspend-to-held {:.2} ms), total {:.1} ms, {:.1} MiB sent, {} \
             pre-copy rounds, {} pages sent suspended",
            i + 1,
            ms(*d),
            ms(m.downtime),
            ms(m.total),
            m.bytes as f64 / (1 << 20) as f64,
            m.rounds,
            m.final_pages
        ));
    }
    down.sort();
    total.sort();
    let med_down = down[down.len() / 2];
    let med_total = total[total.len() / 2];
    notes.push(format!(
        "migrate: goal downtime < 10 ms for a 64 MiB guest: median {:.2} ms, {} ({} migrations)",
        ms(med_down),
        if med_down < Duration::from_millis(10) {
            "met"
        } else {
            "NOT met"
        },
        down.len()
    ));

    let writes = round_trips_n.clamp(1000, 60_000) as u16;
    progress(format_args!("migrate: {writes} round trips, steady"));
    let (steady, _) = round_trips(&topo, &a, &b, writes, false)?;
    progress(format_args!("migrate: {writes} round trips, model moving"));
    let (moving, moves) = round_trips(&topo, &a, &b, writes, true)?;
    notes.push(format!(
        "migrate: rtt-model-moves: the model moved {moves} times between the servers (every {} \
         ms) during {writes} synchronous writes; exit intervals, retransmission after 2 ms",
        MOVE_EVERY.as_millis()
    ));
    b.stop();
    a.stop();
    let floor = Floor::of(format!("{SCENARIO}/rtt-steady"), &steady);
    Ok(vec![
        Row::cost(SCENARIO, "downtime", med_down.as_nanos() as f64).with_knobs([
            ("mem_mib", (MEM >> 20).to_string()),
            ("migrations", down.len().to_string()),
        ]),
        Row::cost(SCENARIO, "total", med_total.as_nanos() as f64).with_knobs([(
            "bytes",
            migs.first().map_or(0, |(_, m)| m.bytes).to_string(),
        )]),
        Row::floor(SCENARIO, "rtt-steady", steady),
        Row::latency(SCENARIO, "rtt-model-moves", moving, floor)
            .with_knobs([("moves", moves.to_string())]),
    ])
}
