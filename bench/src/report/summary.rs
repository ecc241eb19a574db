//! `summary.json`: what a run writes about itself, and the gate's
//! baseline made of several.

use super::*;
use crate::invalid::Invalid;

/// A row of `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowSummary {
    /// `scenario/name`.
    pub key: String,
    /// Scenario.
    pub scenario: String,
    /// Measurement.
    pub name: String,
    /// Latency percentiles, ns.
    pub latency_ns: Option<Summary>,
    /// Records per second.
    pub throughput_per_s: Option<f64>,
    /// Mean ns per operation (micro-measurements).
    pub cost_ns: Option<f64>,
    /// The same-run floor.
    pub floor: Option<FloorSummary>,
    /// Each named percentile over the floor's same percentile, over the
    /// samples of every repetition. The gate reads these.
    pub ratio: Option<BTreeMap<String, f64>>,
    /// How many times the scenario ran.
    pub repetitions: usize,
    /// Each repetition, when it ran more than once.
    pub reps: Option<Vec<Rep>>,
    /// The row's percentile distribution file, beside `summary.json`.
    pub hgrm: Option<String>,
    /// The configuration the row was measured with (see [`Row::knobs`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub knobs: BTreeMap<String, String>,
}

/// The floor a row was compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FloorSummary {
    /// Row key of the floor (`a+b` for a sum of legs).
    pub name: String,
    /// Its percentiles, ns.
    pub latency_ns: Summary,
}

/// Facts about the machine that ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    /// Online CPUs.
    pub nproc: usize,
    /// `uname -r`.
    pub kernel: String,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
}

impl Machine {
    /// This machine.
    pub fn this() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            cpu_model: cpu_model(&cpuinfo).unwrap_or_else(|| "unknown".into()),
        }
    }
}

pub(crate) fn cpu_model(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == "model name").then(|| v.trim().to_string())
    })
}

/// How the run was configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// Scenarios, in the order they ran.
    pub scenarios: Vec<String>,
    /// `--iterations` (xdp-prog, parse).
    pub iterations: u32,
    /// `--round-trips` (server, client).
    pub round_trips: u32,
    /// `--rate` (server's open-loop XDP round trip), requests/s.
    pub rate: Option<u64>,
    /// `--duration` of that open loop, seconds (else `round_trips`
    /// requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration: Option<f64>,
    /// Runs of each scenario, merged (`--repeat` or its per-scenario
    /// default).
    pub repeat: BTreeMap<String, u32>,
    /// The command line.
    pub argv: Vec<String>,
    /// Every `DP_*` environment variable set.
    pub env: BTreeMap<String, String>,
    /// Where each scenario's threads ran and how they waited.
    pub placement: BTreeMap<String, BTreeMap<String, String>>,
    /// `--server`: the remote devplane server the client-side scenarios
    /// ran against; absent for the embedded topology.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
}

/// `summary.json`: one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// [`SCHEMA`].
    pub schema: u32,
    /// UTC, RFC 3339.
    pub timestamp: String,
    /// `git rev-parse HEAD`, or "unknown".
    pub git_revision: String,
    /// The machine.
    pub machine: Machine,
    /// The configuration.
    pub config: RunConfig,
    /// What the scenarios said about themselves (attach mode, placement).
    pub notes: Vec<String>,
    /// Every row, in table order.
    pub rows: Vec<RowSummary>,
    /// The scenarios that failed (their rows are missing; the others'
    /// are kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<Failed>,
    /// The scenarios of the suite that did not run here, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<Skipped>,
}

/// A scenario of the suite that did not run, in `summary.json` and the
/// tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    /// The scenario, as the tables name it.
    pub scenario: String,
    /// Why, and how to run it.
    pub reason: String,
}

impl Skipped {
    /// Its line in the terminal tables.
    pub fn table(&self) -> String {
        format!("{}: SKIPPED: {}\n", self.scenario, self.reason)
    }
}

/// A scenario that failed, in `summary.json` and the tables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failed {
    /// The scenario, as the tables name it.
    pub scenario: String,
    /// Why, one line.
    pub error: String,
}

impl Failed {
    /// Its line in the terminal tables.
    pub fn table(&self) -> String {
        format!(
            "{}: FAILED: {}\n",
            self.scenario,
            self.error.replace('\n', " ")
        )
    }
}

/// A reference for the gate from several runs of the same suite: the
/// first run, each of whose latency rows' ratios is replaced by the median
/// over the runs of that row's ratio (recomputed from each run's
/// percentiles, so that one run in a fast or slow state of the machine
/// does not become the reference). Every run must have every such row.
pub fn baseline(runs: &[RunSummary]) -> Result<RunSummary, Invalid> {
    let first = runs.first().ok_or("no run given")?;
    let ratio = |r: &RowSummary, m: &str| -> Option<f64> {
        let (v, f) = (r.latency_ns?.get(m)?, r.floor.as_ref()?.latency_ns.get(m)?);
        (f > 0).then(|| v as f64 / f as f64)
    };
    let mut out = first.clone();
    for row in out.rows.iter_mut().filter(|r| r.ratio.is_some()) {
        let mut medians = BTreeMap::new();
        for m in METRICS {
            let mut v = Vec::new();
            for (i, run) in runs.iter().enumerate() {
                let r = run.rows.iter().find(|r| r.key == row.key);
                v.push(r.and_then(|r| ratio(r, m)).ok_or_else(|| {
                    format!(
                        "run {} ({}) has no {m} ratio for {}",
                        i + 1,
                        run.timestamp,
                        row.key
                    )
                })?);
            }
            medians.insert(m.to_string(), median(v).unwrap_or(f64::NAN));
        }
        row.ratio = Some(medians);
    }
    let stamps: Vec<&str> = runs.iter().map(|r| r.timestamp.as_str()).collect();
    out.notes.push(format!(
        "baseline: ratios are the median over {} runs ({}); percentiles are the first run's",
        runs.len(),
        stamps.join(", ")
    ));
    Ok(out)
}

/// Every `DP_*` variable of the environment.
pub fn dp_env() -> BTreeMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with("DP_"))
        .collect()
}

/// `git rev-parse HEAD` in the current directory, or "unknown".
pub fn git_revision() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Seconds since the epoch as UTC (year, month, day, hour, minute, second).
pub(crate) fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days_from_civil, inverted.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

/// A point in time as RFC 3339 (`2026-11-25T09:30:00Z`) and as a
/// directory name (`20261125T093000Z`).
pub fn timestamps(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, mo, d, h, mi, s) = civil(secs);
    (
        format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z"),
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z"),
    )
}
