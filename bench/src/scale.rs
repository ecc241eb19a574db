//! The `scale` scenario: how cost grows with work.
//!
//! - `vms-N` (N = 1, 2, 4, 8, 16): N real KVM VMs of one vCPU each on one
//!   client (every vCPU pinned to core 0, direct mode) against one worker,
//!   each looping on a remote port read of the null model: the round trip
//!   over every vCPU's samples, and the round trips/s all of them got
//!   (the worker's rate for this load); `vms-N-engine` the same with the
//!   engine thread draining every vCPU's ring. Floor: `vms-1`.
//! - `models-M` (M = 1, 10, 100, 1000) and `registered-V` (V = 1, 100,
//!   1000, 10000): one server (one worker) with M null models and V
//!   registered VMs; one-record round trips cycling over every model and
//!   VM (after a pass that touched each once), and the worker's rate with
//!   full datagrams, each to the next model with the next VM's records.
//!   Floor: `models-1` (1 model, 1 VM). The knob `worker_ns_per_record`
//!   is 1 s over the rate.
//! - `xdp-prog/models-M`, `xdp-prog/registered-V`: the XDP program's cost
//!   per one-record frame (BPF_PROG_TEST_RUN, client checks on, so the
//!   route, client and VM lookups all run) with M routes and V VMs in its
//!   maps, the frame addressed to the middle one.
//!
//! Flat ratios down the `models-*` and `registered-*` rows and flat
//! `xdp-prog` costs mean no lookup scans: every one is a hash map.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use devplane_control::config::{ModelConfig, VmConfig};
use devplane_devmodels::Space;
use devplane_server::xdp::Program;
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::Topology;
use devplane_vmm::guests;
use devplane_wire::maps::{CONFIG_CHECK_CLIENT, ClientEntry, Config, ROUTE_LOCAL, Route, VmEntry};
use devplane_wire::{Access, AccessSize, MAX_RECORDS};

use crate::hist::Latency;
use crate::report::{self, Floor, Row, progress};
use crate::rig::{Drain, NULL_PIO, PIO_PORT, Rig, dev, histogram, vm_spec};
use crate::server::{
    check_response, client_socket, config, encode_for, full_writes, on_client, request_for,
    worker_rate,
};
use crate::udp::round_trips;

pub const SCENARIO: &str = "scale";

/// VMs of one vCPU each on one client.
pub const CLIENT_VMS: [u32; 5] = [1, 2, 4, 8, 16];
/// Device models on one server.
pub const MODELS: [u32; 4] = [1, 10, 100, 1000];
/// VMs registered on one server.
pub const REGISTERED: [u32; 4] = [1, 100, 1000, 10_000];

/// Runs the scenario once: `iters` sets the round trips per server row
/// and (a tenth of it) the exits per vCPU of the client rows; the worker
/// rate is measured for `rate_for` per row; `iterations` frames per XDP
/// program cost.
pub fn run(
    iters: u32,
    rate_for: Duration,
    iterations: u32,
    notes: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let mut rows = client_rows(iters, notes)?;
    rows.extend(server_rows(iters, rate_for)?);
    rows.extend(xdp_rows(iterations)?);
    Ok(rows)
}

/// The `vms-N` and `vms-N-engine` rows.
fn client_rows(iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let rig = {
        let mut r = Rig::embedded("bscale")?;
        r.serve()?;
        r
    };
    let per = (iters / 10).clamp(500, 6000) as u16;
    let warm = (per / 10) as usize;
    let mut rows = Vec::new();
    let mut floor: Option<Floor> = None;
    for (drain, suffix) in [(Drain::Direct, ""), (Drain::Engine, "-engine")] {
        for n in CLIENT_VMS {
            let name = format!("vms-{n}{suffix}");
            progress(format_args!("scale: {name}, {per} exits per vCPU"));
            let vms = (0..n)
                .map(|_| -> Result<_> {
                    let g = guests::pio_read_loop(PIO_PORT, per)?;
                    let d = dev(Space::Pio, PIO_PORT as u64, 1, NULL_PIO, false, false);
                    Ok(vm_spec(rig.fresh_vm()?, &[g], vec![d]))
                })
                .collect::<Result<Vec<_>>>()?;
            let out = rig.run_vms(
                &format!("{SCENARIO}/{name}"),
                vms,
                per as usize + 8,
                drain,
                Duration::from_secs(300),
            )?;
            let lat = histogram(out.samples(warm));
            // The vCPUs run side by side: their round trips over the
            // longest vCPU's span of timed exits (its warm-up, and the
            // first interval from its start, left out).
            let span_ns = out
                .vcpus
                .iter()
                .map(|v| v.samples.iter().skip(warm).map(|&s| s as u64).sum::<u64>())
                .max()
                .unwrap_or(0);
            let rate = lat.len() as f64 * 1e9 / span_ns.max(1) as f64;
            let knobs = [
                ("vms", n.to_string()),
                ("vcpus_per_vm", "1".to_string()),
                ("exits_per_vcpu", per.to_string()),
                ("drain", drain.name().to_string()),
            ];
            let row = Row::floor_first(&mut floor, SCENARIO, name, lat);
            rows.push(row.with_rate(rate).with_knobs(knobs));
        }
    }
    notes.extend(rig.take_warnings());
    notes.push(format!(
        "scale: vms-N rows: N KVM VMs of one vCPU each, every vCPU on core 0, one worker on \
         core 1; rate: the round trips/s of all of them together; ratios over vms-1 (direct); \
         {per} exits per vCPU"
    ));
    Ok(rows)
}

/// A server config of the server scenario's with `models` null models
/// (ids 1..) and `vms` registered VMs (ids 1..).
fn grown_config(topo: &Topology, models: u32, vms: u32) -> devplane_control::config::ServerConfig {
    let mut cfg = config(topo, devplane_control::config::Mode::Xdp);
    let vm = cfg.vms[0].clone();
    cfg.vms = (1..=vms).map(|id| VmConfig { id, ..vm.clone() }).collect();
    cfg.models = (1..=models)
        .map(|id| ModelConfig::new(id, "null", 0))
        .collect();
    cfg
}

/// The `models-M` and `registered-V` rows.
fn server_rows(iters: u32, rate_for: Duration) -> Result<Vec<Row>> {
    let topo = Topology::new("bgrow").context("building the netns topology (needs root)")?;
    let to = SocketAddr::from((topo.server_ip(), crate::server::PORT));
    let n = (iters / 2).clamp(1000, 20_000);
    let configs = MODELS.iter().map(|&m| (format!("models-{m}"), m, 1)).chain(
        REGISTERED
            .iter()
            .skip(1)
            .map(|&v| (format!("registered-{v}"), 1, v)),
    );
    let mut rows = Vec::new();
    let mut floor: Option<Floor> = None;
    for (name, models, vms) in configs {
        progress(format_args!("scale: {name}, {n} round trips"));
        let srv = ServerThread::spawn(grown_config(&topo, models, vms), Some(topo.server_netns()))
            .with_context(|| format!("starting the XDP server with {models} models, {vms} VMs"))?;
        let res = (|| -> Result<(Latency, f64)> {
            let sock = client_socket(&topo)?;
            // Request i goes to model i % M + 1 as VM i % V + 1, each VM's
            // requests numbered 1, 2, ...; the first pass over the VMs
            // (their duplicate windows created) is not timed.
            let warm = vms.max(models).max(n / 10);
            let lat = on_client(&topo, move || {
                round_trips(
                    &sock,
                    to,
                    warm,
                    n,
                    move |i, b| {
                        let (m, v) = ((i % models as u64) as u32 + 1, (i % vms as u64) as u32 + 1);
                        let access = Access::PioIn {
                            port: PIO_PORT,
                            size: AccessSize::B1,
                        };
                        encode_for(b, m, &[request_for(v, i / vms as u64 + 1, access)])
                    },
                    move |i, b| check_response(i / vms as u64 + 1, b),
                )
            })?;
            let first_seq = (u64::from(warm + n) / vms as u64) + 2;
            let rate = spread_rate(&topo, to, rate_for, models, vms, first_seq)?;
            Ok((lat, rate))
        })();
        srv.stop();
        let (lat, rate) = res?;
        let knobs = [
            ("models", models.to_string()),
            ("registered_vms", vms.to_string()),
            ("round_trips", n.to_string()),
            (
                "worker_ns_per_record",
                format!("{:.1}", 1e9 / rate.max(1.0)),
            ),
        ];
        let row = Row::floor_first(&mut floor, SCENARIO, name, lat);
        rows.push(row.with_rate(rate).with_knobs(knobs));
    }
    Ok(rows)
}

/// One worker's rate (answered records/s) for `duration` with full
/// datagrams, 8 in flight, datagram d to model d % M + 1 with the records
/// of VM d % V + 1 (each VM's numbered on from `first_seq`).
fn spread_rate(
    topo: &Topology,
    to: SocketAddr,
    duration: Duration,
    models: u32,
    vms: u32,
    first_seq: u64,
) -> Result<f64> {
    // The next sequence number of each VM.
    let mut seqs = vec![first_seq + 1; vms as usize];
    let mut d = 0u64;
    worker_rate(topo, to, 8, duration, move |buf| {
        let (m, v) = ((d % models as u64) as u32 + 1, (d % vms as u64) as u32);
        d += 1;
        let seq = &mut seqs[v as usize];
        let recs = full_writes(v + 1, PIO_PORT, *seq);
        *seq += MAX_RECORDS as u64;
        encode_for(buf, m, &recs)
    })
}

/// The `xdp-prog/*` rows.
fn xdp_rows(iterations: u32) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let mut verdict = None;
    let cases = MODELS
        .iter()
        .map(|&m| (format!("xdp-prog/models-{m}"), m, 1))
        .chain(
            REGISTERED
                .iter()
                .skip(1)
                .map(|&v| (format!("xdp-prog/registered-{v}"), 1, v)),
        );
    for (name, models, vms) in cases {
        progress(format_args!("scale: {name}"));
        let mut prog = Program::load(None)
            .context("loading the XDP program (needs root; run `make bench` as root)")?;
        prog.set_config(Config {
            server: 1,
            flags: CONFIG_CHECK_CLIENT,
            ..Config::default()
        })?;
        prog.clients()?.insert(
            1,
            ClientEntry {
                ip: [10, 99, 0, 1],
                ..ClientEntry::default()
            },
            0,
        )?;
        {
            let mut routes = prog.routes()?;
            for id in 1..=models {
                let r = Route {
                    flags: ROUTE_LOCAL,
                    server: 1,
                    ..Default::default()
                };
                routes.insert(id, r, 0)?;
            }
        }
        {
            let mut map = prog.vms()?;
            for id in 1..=vms {
                let e = VmEntry {
                    client: 1,
                    hypervisor: 1,
                    flags: 0,
                };
                map.insert(id, e, 0)?;
            }
        }
        let frame = crate::micro::request_frame_for(1, models.div_ceil(2), vms.div_ceil(2))?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.repeat = iterations;
        let res = prog.xdp()?.test_run(opts)?;
        // The VM lookup runs: a VM not registered is dropped (a verdict
        // other than the routed frame's).
        let stranger = crate::micro::request_frame_for(1, 1, vms + 1)?;
        let mut o = TestRunOptions::new();
        o.data_in = Some(&stranger);
        let dropped = prog.xdp()?.test_run(o)?.return_value;
        if dropped == res.return_value {
            bail!("{name}: a frame of an unregistered VM got the routed verdict {dropped}");
        }
        // Every case must take the same path (routed, not dropped).
        match verdict {
            None => verdict = Some(res.return_value),
            Some(v) if v == res.return_value => {}
            Some(v) => bail!(
                "{name}: the frame's verdict was {} where the first case's was {v}",
                res.return_value
            ),
        }
        report::out(format_args!(
            "scale {name:<26} {:>8} ns/frame (kernel mean of {iterations} runs)\n",
            res.duration.as_nanos()
        ));
        rows.push(
            Row::cost(SCENARIO, name, res.duration.as_nanos() as f64).with_knobs([
                ("models", models.to_string()),
                ("registered_vms", vms.to_string()),
                ("verdict", res.return_value.to_string()),
            ]),
        );
    }
    Ok(rows)
}
