//! The `throughput` scenario: an N VMs x M vCPUs matrix (`--vms LIST`,
//! `--vcpus LIST`, default 1,2 x 1,2), each cell run twice, with posted
//! and with non-posted writes, on the embedded topology or against
//! `--server`.
//!
//! In a cell every vCPU of every VM runs `guests::multi_vcpu`'s loop:
//! `--writes` port writes to its own remote counter model, then one read
//! (not posted) of the count. All vCPUs are pinned to `DP_VCPU_CORE`
//! (default 0) like the other client-side scenarios, so on 2 cores this
//! measures how the VMM and the server share out one client core.
//!
//! A cell's row (`throughput/posted/2x2`, `throughput/non-posted/1x2`)
//! reports
//!
//! - requests/s: the remote accesses of all its vCPUs (each vCPU's writes
//!   and its final read) over the cell's active time, the longest vCPU's
//!   span from its first to its last exit (VM creation and thread start-up
//!   left out; every vCPU starts within the same few hundred microseconds);
//! - latency under that load: every vCPU's exit intervals after its first
//!   tenth. A non-posted write's interval is its whole round trip to the
//!   model; a posted write's is what the guest waits for it (the exit, the
//!   encoding into the ring, and back-pressure when the ring is full).
//!
//! Ratios: non-posted rows over `exit-floor` + the network floor, as the
//! `client` scenario's remote rows; posted rows over `exit-floor` alone
//! (a posted write does not wait for the network).

use std::time::Duration;

use anyhow::{Result, ensure};

use crate::invalid::Invalid;
use crate::report::{Floor, Row, progress};
use crate::rig::{Drain, Layout, Rig, histogram};

const SCENARIO: &str = "throughput";

/// The default `--vms` and `--vcpus` (`"1,2"` in main.rs's flags): small
/// enough for 2 cores.
#[cfg(test)]
pub const DEFAULT_SIZES: [u32; 2] = [1, 2];

/// One cell of the matrix, in one write mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cell {
    /// VMs.
    pub vms: u32,
    /// vCPUs per VM.
    pub vcpus: u32,
    /// Posted writes (else every write waits for its answer).
    pub posted: bool,
}

impl Cell {
    /// The row name: `posted/2x2` or `non-posted/2x2` (VMs x vCPUs).
    pub fn name(&self) -> String {
        format!(
            "{}/{}x{}",
            if self.posted { "posted" } else { "non-posted" },
            self.vms,
            self.vcpus
        )
    }

    /// Remote accesses the cell makes with `writes` writes per vCPU: each
    /// vCPU's writes and its final read.
    pub fn requests(&self, writes: u16) -> u64 {
        u64::from(self.vms) * u64::from(self.vcpus) * (u64::from(writes) + 1)
    }
}

/// The cells to run, in table order: every VMs x vCPUs pair with posted
/// writes, then again with non-posted writes. Repeated sizes count once.
pub fn cells(vms: &[u32], vcpus: &[u32]) -> Vec<Cell> {
    let dedup = |v: &[u32]| {
        let mut out: Vec<u32> = Vec::new();
        for &x in v {
            if !out.contains(&x) {
                out.push(x);
            }
        }
        out
    };
    let (vms, vcpus) = (dedup(vms), dedup(vcpus));
    let mut out = Vec::new();
    for posted in [true, false] {
        for &v in &vms {
            for &c in &vcpus {
                out.push(Cell {
                    vms: v,
                    vcpus: c,
                    posted,
                });
            }
        }
    }
    out
}

/// Checks `--vms` and `--vcpus` against what the server's `layout` holds
/// (one counter model per VM index and vCPU); `remote` names the limit's
/// source in the message.
pub fn check_matrix(
    vms: &[u32],
    vcpus: &[u32],
    layout: Layout,
    remote: bool,
) -> Result<(), Invalid> {
    let whose = if remote {
        "bench/server-remote.toml (--server)"
    } else {
        "the embedded server"
    };
    for (flag, list, max) in [
        ("--vms", vms, layout.tp_vms),
        ("--vcpus", vcpus, layout.tp_vcpus),
    ] {
        if list.is_empty() {
            return Err(Invalid::from(format!("{flag}: give at least one size")));
        }
        if let Some(bad) = list.iter().find(|&&x| x == 0 || x > max) {
            return Err(Invalid::from(format!(
                "{flag} {bad}: between 1 and {max} (the counter models {whose} has)"
            )));
        }
    }
    Ok(())
}

/// Requests per second: `requests` over `active` (0 for no time).
pub fn rate(requests: u64, active: Duration) -> f64 {
    let s = active.as_secs_f64();
    if s > 0.0 { requests as f64 / s } else { 0.0 }
}

/// Runs the scenario once on `rig`: every cell of `vms` x `vcpus`, posted
/// then non-posted, `writes` writes per vCPU (and as many floor samples).
/// What the scenario reports about itself goes to `notes`.
pub fn run(
    rig: &mut Rig,
    vms: &[u32],
    vcpus: &[u32],
    writes: u16,
    notes: &mut Vec<String>,
) -> Result<Vec<Row>> {
    let warm = usize::from(writes / 10);
    progress(format_args!(
        "throughput: network floor, {writes} round trips"
    ));
    let (net_name, net) = rig.net_floor(warm as u32, u32::from(writes))?;
    rig.serve()?;
    progress(format_args!("throughput: exit-floor, {writes} exits"));
    let exit = rig.exit_floor(writes, warm)?;
    let exit_floor = Floor::of(format!("{SCENARIO}/exit-floor"), &exit);
    let net_floor = Floor {
        name: format!("{SCENARIO}/exit-floor+{SCENARIO}/{net_name}"),
        parts: vec![exit.clone(), net.clone()],
    };
    let server = rig.server_name();
    let drain = Drain::from_env();
    let mut rows = vec![
        Row::floor(SCENARIO, "exit-floor", exit).with_knobs([("exits", writes)]),
        Row::floor(SCENARIO, net_name, net).with_knobs([
            ("round_trips", writes.to_string()),
            ("server", server.clone()),
        ]),
    ];
    for cell in cells(vms, vcpus) {
        progress(format_args!(
            "throughput: {}, {writes} writes per vCPU",
            cell.name()
        ));
        let specs = rig.counter_vms(cell.vms, cell.vcpus, writes, cell.posted)?;
        let timeout = Duration::from_secs(60)
            + Duration::from_micros(200) * (cell.requests(writes).min(u32::MAX as u64) as u32);
        let out = rig.run_vms(
            &format!("{SCENARIO}/{}", cell.name()),
            specs,
            usize::from(writes) + 8,
            drain,
            timeout,
        )?;
        ensure!(
            out.vcpus.len() as u32 == cell.vms * cell.vcpus,
            "{}: {} vCPUs reported",
            cell.name(),
            out.vcpus.len()
        );
        for v in &out.vcpus {
            ensure!(
                v.remote == u64::from(writes) + 1,
                "{}: VM {} vCPU {} made {} remote accesses, expected {}",
                cell.name(),
                v.vm,
                v.vcpu,
                v.remote,
                u64::from(writes) + 1
            );
        }
        let requests: u64 = out.vcpus.iter().map(|v| v.remote).sum();
        let active = out.vcpus.iter().map(|v| v.span()).max().unwrap_or_default();
        let floor = if cell.posted {
            exit_floor.clone()
        } else {
            net_floor.clone()
        };
        rows.push(
            Row::latency(SCENARIO, cell.name(), histogram(out.samples(warm)), floor)
                .with_rate(rate(requests, active))
                .with_knobs([
                    ("vms", cell.vms.to_string()),
                    ("vcpus", cell.vcpus.to_string()),
                    ("posted", cell.posted.to_string()),
                    ("writes_per_vcpu", writes.to_string()),
                    ("requests", requests.to_string()),
                    ("active_ms", format!("{:.3}", active.as_secs_f64() * 1e3)),
                    ("wall_ms", format!("{:.3}", out.elapsed.as_secs_f64() * 1e3)),
                    ("drain", drain.name().to_string()),
                    ("server", server.clone()),
                ]),
        );
    }
    notes.extend(rig.take_warnings());
    notes.push(format!(
        "throughput: rate = remote accesses of all vCPUs / the longest vCPU's first-to-last \
         exit span; latency = exit intervals under that load (posted: the guest's cost per \
         write; non-posted: a round trip); ratios of posted rows over exit-floor, of \
         non-posted rows over exit-floor + {net_name}; all vCPUs on one core; rings drained \
         {drain:?}"
    ));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rig::{EMBEDDED, REMOTE};

    #[test]
    fn the_matrix_expands_posted_first() {
        let c = cells(&DEFAULT_SIZES, &DEFAULT_SIZES);
        let names: Vec<String> = c.iter().map(Cell::name).collect();
        assert_eq!(
            names,
            [
                "posted/1x1",
                "posted/1x2",
                "posted/2x1",
                "posted/2x2",
                "non-posted/1x1",
                "non-posted/1x2",
                "non-posted/2x1",
                "non-posted/2x2"
            ]
        );
        assert!(c[..4].iter().all(|c| c.posted) && c[4..].iter().all(|c| !c.posted));
        // Order as given, repeats once.
        let c = cells(&[4, 1, 4], &[2]);
        assert_eq!(
            c.iter().map(Cell::name).collect::<Vec<_>>(),
            [
                "posted/4x2",
                "posted/1x2",
                "non-posted/4x2",
                "non-posted/1x2"
            ]
        );
        assert!(cells(&[], &[1]).is_empty());
    }

    #[test]
    fn requests_and_rate() {
        let c = Cell {
            vms: 2,
            vcpus: 3,
            posted: true,
        };
        assert_eq!(c.requests(99), 600);
        assert_eq!(rate(600, Duration::from_millis(20)), 30_000.0);
        assert_eq!(rate(600, Duration::ZERO), 0.0);
        assert!((rate(1, Duration::from_nanos(500)) - 2e6).abs() < 1e-6);
    }

    #[test]
    fn the_matrix_is_checked_against_the_layout() {
        assert!(check_matrix(&[1, 2], &[1, 2], REMOTE, true).is_ok());
        assert!(check_matrix(&[8], &[8], EMBEDDED, false).is_ok());
        let e = check_matrix(&[1, 5], &[1], REMOTE, true).unwrap_err().0;
        assert!(
            e.contains("--vms 5") && e.contains("between 1 and 4") && e.contains("--server"),
            "{e}"
        );
        let e = check_matrix(&[1], &[9], EMBEDDED, false).unwrap_err().0;
        assert!(e.contains("--vcpus 9") && e.contains("embedded"), "{e}");
        assert!(check_matrix(&[0], &[1], EMBEDDED, false).is_err());
        assert!(check_matrix(&[], &[1], EMBEDDED, false).is_err());
    }
}
