//! The `client` scenario: real KVM guests in the client namespace, device
//! models on the XDP server in the server namespace, in one run:
//!
//! - `exit-floor`: a guest looping on `in` from a local null model (the
//!   KVM exit handled in userspace, nothing remote);
//! - `udp-floor`: the raw busy-polling UDP echo on the same veth (with
//!   `--server`: `rtt-floor`, a raw one-record read of the remote server's
//!   null model, see [`Rig::net_floor`]);
//! - `remote-pio`: the same guest loop against a remote null model;
//! - `remote-mmio`: MMIO writes and a read to a remote null model;
//! - `posted-rate`: 2 VMs x 2 vCPUs of posted port writes, records/s.
//!
//! With `--server ADDR` the same rows are measured against that running
//! server (see `crate::rig`). Each measurement runs under fresh VM ids.
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

use std::time::Duration;

use anyhow::Result;
use devplane_dataplane::client::guests;
use devplane_dataplane::client::vmm::VmSpec;
use devplane_devmodels::Space;

use crate::report::{Floor, Row, progress};
use crate::rig::{
    COUNTER_BASE, Drain, MMIO_BASE, NULL_MMIO, NULL_PIO, PIO_PORT, Rig, counter_id, dev, histogram,
    knob, vm_spec,
};

const SCENARIO: &str = "client";

/// Runs the scenario once on `rig` with `iters` exits per latency
/// measurement. What the scenario reports about itself goes to `notes`.
pub fn run(rig: &mut Rig, iters: u32, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let n = iters.min(60_000) as u16;
    let warm = (n / 10) as usize;
    let server = rig.server_name();
    progress(format_args!("client: network floor, {n} round trips"));
    let (net_name, net) = rig.net_floor(warm as u32, n as u32)?;
    rig.serve()?;
    let timeout = Duration::from_secs(120);
    let mut rows = Vec::new();

    progress(format_args!("client: exit-floor, {n} exits"));
    let exit = rig.exit_floor(n, warm)?;
    // A remote exit's floor: a local exit plus a raw UDP round trip,
    // percentile by percentile.
    let both = Floor {
        name: format!("{SCENARIO}/exit-floor+{SCENARIO}/{net_name}"),
        parts: vec![exit.clone(), net.clone()],
    };
    let both_p50 = both.summary().p50;
    rows.push(Row::floor(SCENARIO, "exit-floor", exit).with_knobs([("exits", n)]));
    rows.push(
        Row::floor(SCENARIO, net_name, net)
            .with_knobs([("round_trips", n.to_string()), ("server", server.clone())]),
    );
    let drain = Drain::from_env();
    let pio_row = |rig: &Rig, name: &str, drain: Drain, m: u16, w: usize| -> Result<Row> {
        let g = guests::pio_read_loop(PIO_PORT, m)?;
        let d = dev(Space::Pio, PIO_PORT as u64, 1, NULL_PIO, false, false);
        let out = rig.run_vms(
            &format!("{SCENARIO}/{name}"),
            vec![vm_spec(rig.fresh_vm()?, &[g], vec![d])],
            m as usize + 8,
            drain,
            timeout,
        )?;
        Ok(
            Row::latency(SCENARIO, name, histogram(out.samples(w)), both.clone()).with_knobs([
                ("exits", m.to_string()),
                ("drain", drain.name().to_string()),
                ("server", server.clone()),
            ]),
        )
    };
    // The other ways of draining the rings, measured in the same run.
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
        rows.push(pio_row(rig, name, other, m, w)?);
    }
    progress(format_args!("client: remote-pio, {n} exits"));
    rows.push(pio_row(rig, "remote-pio", drain, n, warm)?);
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
        let out = rig.run_vms(
            "client/remote-mmio",
            vec![vm_spec(rig.fresh_vm()?, &[g], vec![d])],
            n as usize + 8,
            drain,
            timeout,
        )?;
        histogram(out.samples(warm))
    };
    rows.push(
        Row::latency(SCENARIO, "remote-mmio", mmio, both).with_knobs([
            ("exits", n.to_string()),
            ("drain", drain.name().to_string()),
            ("server", server.clone()),
        ]),
    );
    progress(format_args!(
        "client: posted-rate, 2 VMs x 2 vCPUs x {n} writes"
    ));
    let writes = n as u64;
    let rate = {
        let vms = (1..=2u32)
            .map(|v| -> Result<VmSpec> {
                let gs = guests::multi_vcpu(COUNTER_BASE, n, 2)?;
                let devices = (0..2u32)
                    .map(|i| {
                        dev(
                            Space::Pio,
                            (COUNTER_BASE + 0x10 * i as u16) as u64,
                            0x10,
                            counter_id(v, i),
                            true,
                            false,
                        )
                    })
                    .collect();
                Ok(vm_spec(rig.fresh_vm()?, &gs, devices))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = rig.run_vms("client/posted-rate", vms, 0, drain, timeout)?;
        (4 * (writes + 1)) as f64 / out.elapsed.as_secs_f64()
    };
    rows.push(Row::rate(SCENARIO, "posted-rate", rate).with_knobs([
        ("vms", "2".to_string()),
        ("vcpus", "2".to_string()),
        ("writes", n.to_string()),
        ("drain", drain.name().to_string()),
        ("server", server.clone()),
    ]));
    notes.extend(rig.take_warnings());
    notes.push(format!(
        "client: ratios of remote rows are over exit-floor + {net_name}, percentile by \
         percentile (p50 {:.1} us); \
         rings drained {drain:?} (remote-pio, remote-mmio, posted-rate; pio-* rows: the \
         others); placement: {}, vCPU on core 0 \
         spins {} then futex (engine mode), engine thread on core 0 spins {} (engine mode) \
         or {} (others) then sleeps; SQPOLL thread unbound, idle {} ms",
        both_p50 as f64 / 1000.0,
        match rig.remote_addr() {
            Some(a) => format!("the server at {a} as it is configured"),
            None => "worker spins on core 1 (DP_WORKER_SPIN/CORE)".to_string(),
        },
        knob("DP_VCPU_SPIN", 0),
        knob("DP_ENGINE_SPIN", 20_000),
        knob("DP_ENGINE_SPIN_DIRECT", 1),
        knob("DP_SQPOLL_IDLE_MS", 10),
    ));
    Ok(rows)
}
