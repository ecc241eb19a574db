//! The `client` scenario: real KVM guests in the client namespace, device
//! models on the XDP server in the server namespace, in one run:
//!
//! - `exit-floor`: a guest looping on `in` from a local null model (the
//!   KVM exit handled in userspace, nothing remote);
//! - `udp-floor`: the raw busy-polling UDP echo on the same veth;
//! - `remote-pio`: the same guest loop against a remote null model;
//! - `remote-mmio`: MMIO writes and a read to a remote null model;
//! - `posted-rate`: 2 VMs x 2 vCPUs of posted port writes, records/s.
//!
//! A latency sample is the time between consecutive exits of one vCPU,
//! which for a one-instruction loop is the whole round trip guest -> VMM
//! (-> server) -> guest.
//!
//! Placement (2 cores, at most two spinners): the server worker busy-polls
//! on core 1; the engine busy-polls on core 0 (`DP_ENGINE_SPIN`, default
//! 20000 empty polls before sleeping); the vCPUs share core 0 and sleep on
//! a futex while they wait (`DP_VCPU_SPIN`, default 0). Measured on the
//! development machine, this beat a spinning vCPU with a sleeping engine
//! (56 us p50), both sleeping (60 us) and unpinned threads (30-45 us but
//! far worse tails). `DP_ENGINE_CORE` and `DP_VCPU_CORE` move them.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_dataplane::client::engine::{EngineConfig, SqPoll};
use devplane_dataplane::client::guests::{self, Guest};
use devplane_dataplane::client::kvm::VcpuExit;
use devplane_dataplane::client::vmm::{
    Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuSpec, VmSpec,
};
use devplane_dataplane::server::host::ServerThread;
use devplane_dataplane::topology::{Side, Topology};
use devplane_devmodels::Space;

use crate::hist::Latency;
use crate::report::{Floor, Row, progress};
use crate::server::floor;

const SCENARIO: &str = "client";

const PORT: u16 = 7700;
const NULL_PIO: u32 = 1;
const NULL_MMIO: u32 = 2;
const MMIO_BASE: u32 = 0xd_0000;
const PIO_PORT: u16 = 0x80;
const COUNTER_BASE: u16 = 0x500;
/// Every knob the scenario consulted, resolved: its placement.
static KNOBS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// The placement this run used (every knob consulted, resolved), for
/// `summary.json`.
pub fn placement() -> BTreeMap<String, String> {
    KNOBS.lock().map(|k| k.clone()).unwrap_or_default()
}

fn knob(name: &str, default: u32) -> u32 {
    let v = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    if let Ok(mut k) = KNOBS.lock() {
        k.insert(name.to_string(), v.to_string());
    }
    v
}

fn model(id: u32, kind: &str, worker: usize) -> ModelConfig {
    ModelConfig::new(id, kind, worker)
}

fn server_config(topo: &Topology) -> ServerConfig {
    let mut models = vec![
        model(NULL_PIO, "null", 0),
        ModelConfig {
            mmio_base: Some(MMIO_BASE as u64),
            backing: None,
            ..model(NULL_MMIO, "null", 0)
        },
    ];
    for vm in 1..=2u32 {
        for i in 0..2u32 {
            models.push(ModelConfig {
                pio_base: Some(COUNTER_BASE + 0x10 * i as u16),
                ..model(100 + vm * 10 + i, "counter", 0)
            });
        }
    }
    ServerConfig {
        server: ServerSection {
            id: 1,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![knob("DP_WORKER_CORE", 1) as usize],
            pin_dir: Some(format!("/sys/fs/bpf/dpbench-client-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: knob("DP_WORKER_SPIN", u32::MAX),
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            id: 7,
            address: topo.client_ip(),
        }],
        vms: (1..=2)
            .map(|id| VmConfig {
                id,
                client: 7,
                hypervisor: 1,
            })
            .collect(),
        models,
    }
}

fn vm(id: u32, guests: &[Guest], devices: Vec<DeviceSpec>) -> VmSpec {
    let mem = guests.iter().map(|g| g.mem_end()).max().unwrap_or(0x2_0000);
    VmSpec {
        id,
        hypervisor: 1,
        mem_bytes: mem.next_multiple_of(0x1_0000).max(0x2_0000) as usize,
        images: guests
            .iter()
            .map(|g| (g.load_gpa, g.code.clone()))
            .collect(),
        vcpus: guests
            .iter()
            .map(|g| VcpuSpec {
                entry: g.entry,
                core: Some(knob("DP_VCPU_CORE", 0) as usize),
            })
            .collect(),
        devices,
    }
}

fn dev(space: Space, base: u64, len: u64, model: u32, posted: bool, local: bool) -> DeviceSpec {
    DeviceSpec {
        space,
        base,
        len,
        model,
        posted,
        place: if local {
            Place::Local {
                kind: "null".into(),
            }
        } else {
            Place::Remote { server: 0 }
        },
    }
}

struct Outcome {
    samples: Vec<u32>,
    elapsed: Duration,
}

/// How the exit rings are drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// One engine thread for every vCPU.
    Engine,
    /// Each vCPU drives its own io_uring while it waits.
    Direct,
    /// Each vCPU's io_uring submits through a shared SQPOLL thread.
    Sqpoll,
    /// Direct, sending with SEND_ZC from the registered buffers.
    DirectZc,
}

fn run_vms(topo: &Topology, vms: Vec<VmSpec>, samples: usize, drain: Drain) -> Result<Outcome> {
    let spec = ClientSpec {
        client: 7,
        bind: Some(topo.client_ip().into()),
        servers: vec![ServerSpec {
            addr: SocketAddr::from((topo.server_ip(), PORT)),
            id: 1,
        }],
        vms,
        engine: EngineConfig {
            // The engine thread spins only when it is the drainer; in direct
            // and SQPOLL modes it sleeps, leaving core 0 to the vCPU.
            spin_budget: match drain {
                Drain::Engine => knob("DP_ENGINE_SPIN", 20_000),
                _ => knob("DP_ENGINE_SPIN_DIRECT", 1),
            },
            zero_copy: drain == Drain::DirectZc,
            sqpoll: (drain == Drain::Sqpoll).then_some(SqPoll {
                idle_ms: knob("DP_SQPOLL_IDLE_MS", 10),
                cpu: std::env::var("DP_SQPOLL_CPU")
                    .ok()
                    .and_then(|v| v.parse().ok()),
            }),
            ..EngineConfig::default()
        },
        engine_core: Some(knob("DP_ENGINE_CORE", 0) as usize),
        vcpu_spin: knob("DP_VCPU_SPIN", 0),
        samples,
        direct: drain != Drain::Engine,
    };
    let start = Instant::now();
    let mut client = topo
        .run(Side::Client, move || Client::start(spec))?
        .context("starting the client VMM")?;
    let reports = client.wait(Duration::from_secs(120));
    let elapsed = start.elapsed();
    let mut all = Vec::new();
    for r in reports {
        match r.exit {
            Ok(VcpuExit::Done(_)) => {}
            other => bail!("VM {} vCPU {} did not finish: {other:?}", r.vm, r.vcpu),
        }
        all.extend(r.stats.take_samples());
    }
    Ok(Outcome {
        samples: all,
        elapsed,
    })
}

fn histogram(samples: &[u32], warmup: usize) -> Latency {
    let mut l = Latency::new();
    for &s in samples.iter().skip(warmup) {
        l.record(s as u64);
    }
    l
}

/// Runs the scenario with `iters` exits per latency measurement. What the
/// scenario reports about itself goes to `notes`.
pub fn run(iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let n = iters.min(60_000) as u16;
    let warm = (n / 10) as usize;
    let topo = Topology::new("bcli").context("building the netns topology (needs root)")?;
    progress(format_args!("client: udp-floor, {n} round trips"));
    let udp = floor(&topo, warm as u32, n as u32)?;
    let srv = ServerThread::spawn(server_config(&topo), Some(topo.server_netns()))
        .context("starting the XDP server")?;
    let mut rows = Vec::new();

    progress(format_args!("client: exit-floor, {n} exits"));
    let exit = {
        let g = guests::pio_read_loop(PIO_PORT, n)?;
        let d = dev(Space::Pio, PIO_PORT as u64, 1, NULL_PIO, false, true);
        histogram(
            &run_vms(
                &topo,
                vec![vm(1, &[g], vec![d])],
                n as usize + 8,
                Drain::Direct,
            )?
            .samples,
            warm,
        )
    };
    // A remote exit's floor: a local exit plus a raw UDP round trip,
    // percentile by percentile.
    let both = Floor {
        name: format!("{SCENARIO}/exit-floor+{SCENARIO}/udp-floor"),
        parts: vec![exit.clone(), udp.clone()],
    };
    let both_p50 = both.summary().p50;
    rows.push(Row::floor(SCENARIO, "exit-floor", exit));
    rows.push(Row::floor(SCENARIO, "udp-floor", udp));
    let drain = match std::env::var("DP_DRAIN").as_deref() {
        Ok("engine") => Drain::Engine,
        Ok("sqpoll") => Drain::Sqpoll,
        Ok("direct-zc") => Drain::DirectZc,
        _ => Drain::Direct,
    };
    // The other two ways of draining the rings, measured in the same run.
    for (name, other) in [
        ("pio-engine", Drain::Engine),
        ("pio-sqpoll", Drain::Sqpoll),
        ("pio-direct", Drain::Direct),
        ("pio-direct-zc", Drain::DirectZc),
    ] {
        if other == drain {
            continue;
        }
        // SQPOLL round trips take milliseconds on 2 cores (a third spinner):
        // a tenth of the exits keep the suite short and still show it.
        let (m, w) = if other == Drain::Sqpoll {
            ((n / 10).max(200), warm / 10)
        } else {
            (n, warm)
        };
        progress(format_args!("client: {name}, {m} exits"));
        let g = guests::pio_read_loop(PIO_PORT, m)?;
        let d = dev(Space::Pio, PIO_PORT as u64, 1, NULL_PIO, false, false);
        let l = histogram(
            &run_vms(&topo, vec![vm(1, &[g], vec![d])], m as usize + 8, other)?.samples,
            w,
        );
        rows.push(Row::latency(SCENARIO, name, l, both.clone()));
    }
    progress(format_args!("client: remote-pio, {n} exits"));
    let pio = {
        let g = guests::pio_read_loop(PIO_PORT, n)?;
        let d = dev(Space::Pio, PIO_PORT as u64, 1, NULL_PIO, false, false);
        histogram(
            &run_vms(&topo, vec![vm(1, &[g], vec![d])], n as usize + 8, drain)?.samples,
            warm,
        )
    };
    rows.push(Row::latency(SCENARIO, "remote-pio", pio, both.clone()));
    progress(format_args!("client: remote-mmio, {n} exits"));
    let mmio = {
        let g = guests::mmio_loop(MMIO_BASE, n)?;
        let d = dev(
            Space::Mmio,
            MMIO_BASE as u64,
            0x1000,
            NULL_MMIO,
            false,
            false,
        );
        histogram(
            &run_vms(&topo, vec![vm(1, &[g], vec![d])], n as usize + 8, drain)?.samples,
            warm,
        )
    };
    rows.push(Row::latency(SCENARIO, "remote-mmio", mmio, both));
    progress(format_args!(
        "client: posted-rate, 2 VMs x 2 vCPUs x {n} writes"
    ));
    let writes = n as u64;
    let rate = {
        let vms = (1..=2u32)
            .map(|id| -> Result<VmSpec> {
                let gs = guests::multi_vcpu(COUNTER_BASE, n, 2)?;
                let devices = (0..2u32)
                    .map(|i| {
                        dev(
                            Space::Pio,
                            (COUNTER_BASE + 0x10 * i as u16) as u64,
                            0x10,
                            100 + id * 10 + i,
                            true,
                            false,
                        )
                    })
                    .collect();
                Ok(vm(id, &gs, devices))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = run_vms(&topo, vms, 0, drain)?;
        (4 * (writes + 1)) as f64 / out.elapsed.as_secs_f64()
    };
    rows.push(Row::rate(SCENARIO, "posted-rate", rate));
    srv.stop();
    notes.push(format!(
        "client: ratios of remote rows are over exit-floor + udp-floor, percentile by \
         percentile (p50 {:.1} us); \
         rings drained {drain:?} (remote-pio, remote-mmio, posted-rate; pio-* rows: the \
         others); placement: worker spins on core 1 (DP_WORKER_SPIN/CORE), vCPU on core 0 \
         spins {} then futex (engine mode), engine thread on core 0 spins {} (engine mode) \
         or {} (others) then sleeps; SQPOLL thread unbound, idle {} ms",
        both_p50 as f64 / 1000.0,
        knob("DP_VCPU_SPIN", 0),
        knob("DP_ENGINE_SPIN", 20_000),
        knob("DP_ENGINE_SPIN_DIRECT", 1),
        knob("DP_SQPOLL_IDLE_MS", 10)
    ));
    Ok(rows)
}
