//! A run's results: the rows scenarios produce, the terminal table, and
//! the output directory (`summary.json`, one `.hgrm` per latency row,
//! `latency.svg`).

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::hist::{Latency, METRICS, Summary};

mod summary;

#[cfg(test)]
use summary::cpu_model;
pub use summary::*;

/// Version of `summary.json`'s layout.
pub const SCHEMA: u32 = 1;

/// The progress bar on stderr, when there is one (see [`init_progress`]).
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn bar() -> MutexGuard<'static, Option<ProgressBar>> {
    BAR.lock().unwrap_or_else(|p| p.into_inner())
}

/// A progress bar over `steps` measurement runs on stderr, when it is a
/// terminal and `quiet` is not set. It is redrawn only when a step starts
/// or ends (no ticking thread: a timer waking up during a measurement
/// would disturb it).
pub fn init_progress(quiet: bool, steps: u64) {
    let b = (!quiet && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "dpbench [{bar:24}] {pos}/{len} {elapsed_precise} {wide_msg}",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    });
    *bar() = b;
}

/// What is being measured now, on the progress bar.
pub fn progress(msg: impl Display) {
    if let Some(b) = bar().as_ref() {
        b.set_message(msg.to_string());
    }
}

/// One measurement run done.
pub fn step_done() {
    if let Some(b) = bar().as_ref() {
        b.inc(1);
    }
}

/// Removes the progress bar.
pub fn finish_progress() {
    if let Some(b) = bar().take() {
        b.finish_and_clear();
    }
}

/// Prints `text` to stdout, out of the progress bar's way.
pub fn out(text: impl Display) {
    let text = text.to_string();
    match bar().as_ref() {
        Some(b) => b.suspend(|| print!("{text}")),
        None => print!("{text}"),
    }
}

/// How a note that reports something going wrong starts.
const WARNING: &str = "warning: ";

/// A note about something that went wrong in one run (kept from every
/// repetition, where other notes are kept from the first only).
pub fn warning(msg: impl Display) -> String {
    format!("{WARNING}{msg}")
}

/// Whether `note` is a [`warning`].
pub fn is_warning(note: &str) -> bool {
    note.starts_with(WARNING)
}

/// What a latency row is compared with: a floor measured in the same run,
/// or the percentile by percentile sum of several (a path of two legs).
#[derive(Clone)]
pub struct Floor {
    /// Row key of the floor, or keys joined by `+`.
    pub name: String,
    /// The legs.
    pub parts: Vec<Latency>,
}

impl Floor {
    /// A floor of one leg.
    pub fn of(name: String, l: &Latency) -> Floor {
        Floor {
            name,
            parts: vec![l.clone()],
        }
    }

    /// The floor's percentiles (summed over the legs).
    pub fn summary(&self) -> Summary {
        let mut it = self.parts.iter().map(Latency::summary);
        let first = it.next().unwrap_or_else(|| Latency::new().summary());
        it.fold(first, |a, b| a.plus(&b))
    }

    /// The floor's value at quantile `q` (summed over the legs), ns.
    pub fn quantile(&self, q: f64) -> u64 {
        self.parts.iter().map(|p| p.quantile(q)).sum()
    }
}

/// One line of the result table.
pub struct Row {
    /// Scenario that measured it.
    pub scenario: &'static str,
    /// Measurement name, unique within the scenario (may contain `/`,
    /// as `posted/2x2`).
    pub name: String,
    /// Every latency sample, if a latency measurement.
    pub hist: Option<Latency>,
    /// Rate (records/s), if a throughput measurement.
    pub rate: Option<f64>,
    /// Mean cost per operation in ns, if a micro-measurement.
    pub cost_ns: Option<f64>,
    /// What this row's latency is compared with, if anything.
    pub floor: Option<Floor>,
    /// Each repetition of a latency row, when the scenario ran more than
    /// once (see [`merge_repetitions`]).
    pub reps: Vec<Rep>,
    /// The configuration this row was measured with (counts, matrix
    /// cell, posted or not, ...), for `summary.json`.
    pub knobs: BTreeMap<String, String>,
}

/// One repetition of a latency row: its percentiles, its floor's, and
/// their ratios.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rep {
    /// The row's percentiles, ns.
    pub latency_ns: Summary,
    /// The floor's, ns.
    pub floor_ns: Summary,
    /// Row over floor, per named percentile.
    pub ratio: BTreeMap<String, f64>,
    /// The share (0..1) of the row's samples over twice its p50
    /// (`counters::slow_fraction`): near 1% it reaches the p99, so a
    /// repetition far above the others names the burst that moved it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slow: Option<f64>,
}

impl Row {
    fn empty(scenario: &'static str, name: impl Into<String>) -> Row {
        Row {
            scenario,
            name: name.into(),
            hist: None,
            rate: None,
            cost_ns: None,
            floor: None,
            reps: Vec::new(),
            knobs: BTreeMap::new(),
        }
    }

    /// A latency row.
    pub fn latency(
        scenario: &'static str,
        name: impl Into<String>,
        h: Latency,
        floor: Floor,
    ) -> Row {
        Row {
            hist: Some(h),
            floor: Some(floor),
            ..Row::empty(scenario, name)
        }
    }

    /// A latency row that is its own floor.
    pub fn floor(scenario: &'static str, name: impl Into<String>, h: Latency) -> Row {
        let name = name.into();
        let f = Floor::of(format!("{scenario}/{name}"), &h);
        Row::latency(scenario, name, h, f)
    }

    /// The next latency row of a series whose first row is the floor of
    /// the others: a floor row when `floor` is still empty (which then
    /// holds it), else a latency row over it.
    pub fn floor_first(
        floor: &mut Option<Floor>,
        scenario: &'static str,
        name: impl Into<String>,
        h: Latency,
    ) -> Row {
        match floor {
            Some(f) => Row::latency(scenario, name, h, f.clone()),
            None => {
                let r = Row::floor(scenario, name, h);
                *floor = r.floor.clone();
                r
            }
        }
    }

    /// A throughput row.
    pub fn rate(scenario: &'static str, name: impl Into<String>, rate: f64) -> Row {
        Row {
            rate: Some(rate),
            ..Row::empty(scenario, name)
        }
    }

    /// A micro-measurement row (mean ns per operation).
    pub fn cost(scenario: &'static str, name: impl Into<String>, ns: f64) -> Row {
        Row {
            cost_ns: Some(ns),
            ..Row::empty(scenario, name)
        }
    }

    /// This row with a rate as well (a latency row measured under a load
    /// whose rate it also reports).
    pub fn with_rate(self, rate: f64) -> Row {
        Row {
            rate: Some(rate),
            ..self
        }
    }

    /// This row with the configuration it was measured with.
    pub fn with_knobs<K: Into<String>, V: ToString>(
        mut self,
        knobs: impl IntoIterator<Item = (K, V)>,
    ) -> Row {
        self.knobs
            .extend(knobs.into_iter().map(|(k, v)| (k.into(), v.to_string())));
        self
    }

    /// `scenario/name`: the row's identity across runs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.scenario, self.name)
    }

    /// Whether this row is its own floor.
    pub fn is_floor(&self) -> bool {
        self.floor.as_ref().is_some_and(|f| f.name == self.key())
    }

    /// `row / floor` for every named percentile, over all samples (of
    /// every repetition: the floor blocks measured around the row in each
    /// repetition are merged like the row's samples).
    pub fn ratios(&self) -> Option<BTreeMap<String, f64>> {
        let (h, f) = (self.hist.as_ref()?, self.floor.as_ref()?);
        let (s, fs) = (h.summary(), f.summary());
        Some(
            METRICS
                .iter()
                .filter_map(|m| {
                    let (v, base) = (s.get(m)?, fs.get(m)?);
                    (base > 0).then(|| (m.to_string(), v as f64 / base as f64))
                })
                .collect(),
        )
    }

    /// This run of the row as a repetition.
    fn as_rep(&self) -> Option<Rep> {
        Some(Rep {
            latency_ns: self.hist.as_ref()?.summary(),
            floor_ns: self.floor.as_ref()?.summary(),
            ratio: self.ratios()?,
            slow: self.hist.as_ref().and_then(crate::counters::slow_fraction),
        })
    }

    /// The file name of this row's `.hgrm`: `scenario-name.hgrm`, with
    /// anything but letters, digits, `-`, `_` and `.` in the name (the `/`
    /// of `posted/2x2`, spaces) made `-`.
    pub fn hgrm_name(&self) -> String {
        let safe: String = format!("{}-{}", self.scenario, self.name)
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        format!("{safe}.hgrm")
    }

    /// This row as `summary.json` holds it.
    pub fn to_summary(&self) -> RowSummary {
        RowSummary {
            key: self.key(),
            scenario: self.scenario.to_string(),
            name: self.name.to_string(),
            latency_ns: self.hist.as_ref().map(Latency::summary),
            throughput_per_s: self.rate,
            cost_ns: self.cost_ns,
            floor: self.floor.as_ref().map(|f| FloorSummary {
                name: f.name.clone(),
                latency_ns: f.summary(),
            }),
            ratio: self.ratios(),
            repetitions: self.reps.len().max(1),
            reps: (self.reps.len() > 1).then(|| self.reps.clone()),
            hgrm: self.hist.as_ref().map(|_| self.hgrm_name()),
            knobs: self.knobs.clone(),
        }
    }
}

/// The median (mean of the middle two for an even count); `None` when
/// empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Merges the rows of several repetitions of one scenario, row by row (by
/// key, in the first repetition's order): latency samples and floors are
/// merged (the row's ratios are over all of them), each repetition's own
/// percentiles and ratios are kept for inspection, rates and costs are
/// the median.
pub fn merge_repetitions(reps: Vec<Vec<Row>>) -> Vec<Row> {
    let mut it = reps.into_iter();
    let Some(first) = it.next() else {
        return Vec::new();
    };
    let mut merged: Vec<(Row, Vec<f64>, Vec<f64>)> = first
        .into_iter()
        .map(|r| {
            let (rate, cost) = (
                r.rate.into_iter().collect(),
                r.cost_ns.into_iter().collect(),
            );
            let reps = r.as_rep().into_iter().collect();
            (Row { reps, ..r }, rate, cost)
        })
        .collect();
    for rows in it {
        for r in rows {
            let Some((m, rates, costs)) = merged.iter_mut().find(|(m, ..)| m.key() == r.key())
            else {
                continue;
            };
            m.reps.extend(r.as_rep());
            if let (Some(a), Some(b)) = (m.hist.as_mut(), r.hist.as_ref()) {
                a.add(b);
            }
            if let (Some(a), Some(b)) = (m.floor.as_mut(), r.floor.as_ref()) {
                for (pa, pb) in a.parts.iter_mut().zip(&b.parts) {
                    pa.add(pb);
                }
            }
            rates.extend(r.rate);
            costs.extend(r.cost_ns);
        }
    }
    merged
        .into_iter()
        .map(|(mut r, rates, costs)| {
            r.rate = median(rates);
            r.cost_ns = median(costs);
            r
        })
        .collect()
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// The terminal table of one scenario's rows. A row with both latency
/// and a rate (a throughput cell) shows both.
pub fn print_table(title: &str, rows: &[Row]) {
    out(table(title, rows));
}

/// [`print_table`]'s text.
pub fn table(title: &str, rows: &[Row]) -> String {
    let w = rows
        .iter()
        .map(|r| r.name.len())
        .chain([title.len(), 14])
        .max()
        .unwrap_or(14);
    let mut out = format!(
        "{:<w$} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>14}\n",
        title, "p50 us", "p99 us", "p99.9 us", "max us", "p50/floor", "p99/floor", "rate rec/s"
    );
    for r in rows {
        let rate = r.rate.map_or("-".to_string(), |v| format!("{v:.0}"));
        if let Some(h) = &r.hist {
            let l = h.summary();
            let ratio = r.ratios().unwrap_or_default();
            let get = |m: &str| ratio.get(m).copied().unwrap_or(f64::NAN);
            out += &format!(
                "{:<w$} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.2} {:>10.2} {:>14}\n",
                r.name,
                us(l.p50),
                us(l.p99),
                us(l.p999),
                us(l.max),
                get("p50"),
                get("p99"),
                rate
            );
        } else if r.rate.is_some() {
            out += &format!(
                "{:<w$} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>14}\n",
                r.name, "-", "-", "-", "-", "-", "-", rate
            );
        }
    }
    out
}

/// Writes `summary.json`, the `.hgrm` files and `latency.svg` into `dir`
/// (created if missing); returns the files written.
pub fn write_outputs(dir: &Path, summary: &RunSummary, rows: &[Row]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the output directory {}", dir.display()))?;
    let mut files = Vec::new();
    let path = dir.join("summary.json");
    let json = serde_json::to_string_pretty(summary)?;
    std::fs::write(&path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    files.push(path);
    for r in rows {
        if let Some(h) = &r.hist {
            let path = dir.join(r.hgrm_name());
            std::fs::write(&path, h.hgrm(1000.0))
                .with_context(|| format!("writing {}", path.display()))?;
            files.push(path);
        }
    }
    if rows.iter().any(|r| r.hist.is_some()) {
        let path = dir.join("latency.svg");
        crate::plot::percentiles(&path, rows)
            .with_context(|| format!("plotting {}", path.display()))?;
        files.push(path);
    }
    let points = crate::plot::load_points(rows);
    if !points.is_empty() {
        let path = dir.join("load.svg");
        let knee = rows
            .iter()
            .find(|r| r.key() == format!("{}/knee", crate::load::SCENARIO))
            .and_then(|r| r.rate)
            .filter(|r| *r > 0.0);
        let limit = rows
            .iter()
            .find(|r| r.key() == format!("{}/unloaded", crate::load::SCENARIO))
            .and_then(|r| r.hist.as_ref())
            .map(|h| h.summary().p99 as f64 / 1000.0 * crate::load::KNEE_FACTOR);
        crate::plot::load_curve(&path, &points, limit, knee)
            .with_context(|| format!("plotting {}", path.display()))?;
        files.push(path);
    }
    Ok(files)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn lat(base: u64, n: u64) -> Latency {
        let mut l = Latency::new();
        for i in 0..n {
            l.record(base + i % 100 * base / 100);
        }
        l
    }

    pub(crate) fn sample_rows() -> Vec<Row> {
        let floor = lat(10_000, 1000);
        let f = Floor::of("server/udp-floor".into(), &floor);
        vec![
            Row::floor("server", "udp-floor", floor),
            Row::latency("server", "xdp-rtt", lat(20_000, 1000), f),
            Row::rate("server", "xdp-rate", 1.5e6),
            Row::cost("parse", "1 record", 42.5),
        ]
    }

    pub(crate) fn sample_summary(rows: &[Row]) -> RunSummary {
        RunSummary {
            schema: SCHEMA,
            timestamp: timestamps(UNIX_EPOCH).0,
            git_revision: "unknown".into(),
            machine: Machine::this(),
            config: RunConfig {
                scenarios: vec!["server".into()],
                iterations: 1,
                round_trips: 1000,
                rate: None,
                duration: None,
                repeat: [("server".to_string(), 1)].into(),
                argv: vec!["dpbench".into()],
                env: [("DP_X".to_string(), "1".to_string())].into(),
                placement: [(
                    "server".to_string(),
                    [("client_core".into(), "0".into())].into(),
                )]
                .into(),
                server: None,
            },
            notes: vec!["a note".into()],
            rows: rows.iter().map(Row::to_summary).collect(),
            failed: Vec::new(),
            skipped: Vec::new(),
        }
    }

    #[test]
    fn ratios_are_over_the_same_percentile_of_the_floor() {
        let rows = sample_rows();
        assert!(rows[0].is_floor() && !rows[1].is_floor());
        let f = rows[0].ratios().unwrap();
        assert!(f.values().all(|&r| r == 1.0), "{f:?}");
        let r = rows[1].ratios().unwrap();
        for m in METRICS {
            assert!((r[m] - 2.0).abs() < 0.01, "{m}: {r:?}");
        }
        assert!(rows[2].ratios().is_none() && rows[3].ratios().is_none());
    }

    #[test]
    fn repetitions_merge_samples_and_take_the_median_ratio() {
        let rep = |row_base: u64, floor_base: u64, rate: f64| {
            let floor = lat(floor_base, 100);
            let f = Floor::of("s/floor".into(), &floor);
            vec![
                Row::floor("s", "floor", floor),
                Row::latency("s", "row", lat(row_base, 100), f),
                Row::rate("s", "rate", rate),
            ]
        };
        // Ratios 2, 3 and 10 (a stall hit the row in one run).
        let rows = merge_repetitions(vec![
            rep(20_000, 10_000, 1.0),
            rep(30_000, 10_000, 3.0),
            rep(100_000, 10_000, 2.0),
        ]);
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[1].reps.len(), 3);
        // Over all samples: the median sample is of the 30 us run.
        let r = rows[1].ratios().unwrap();
        assert!((r["p50"] - 3.0).abs() < 0.1, "{r:?}");
        assert!((r["max"] - 20.0 / 1.99).abs() < 0.1, "{r:?}");
        assert_eq!(rows[1].hist.as_ref().unwrap().len(), 300);
        assert_eq!(rows[1].floor.as_ref().unwrap().parts[0].len(), 300);
        assert_eq!(rows[0].ratios().unwrap()["p99"], 1.0);
        assert_eq!(rows[2].rate, Some(2.0));
        let s = rows[1].to_summary();
        assert_eq!(s.repetitions, 3);
        let reps = s.reps.unwrap();
        assert_eq!(reps.len(), 3);
        assert!((reps[2].ratio["p99"] - 10.0).abs() < 0.1);
        assert_eq!(reps[2].floor_ns.count, 100);
        // One repetition: the plain ratio.
        let one = merge_repetitions(vec![rep(20_000, 10_000, 1.0)]);
        assert!(one[1].reps.len() == 1 && one[1].to_summary().reps.is_none());
        assert!((one[1].ratios().unwrap()["p99"] - 2.0).abs() < 0.01);
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![3.0, 1.0, 100.0]), Some(3.0));
    }

    #[test]
    fn a_baseline_takes_the_median_ratio_of_several_runs() {
        let run = |row_base: u64| {
            let floor = lat(10_000, 1000);
            let f = Floor::of("server/udp-floor".into(), &floor);
            let rows = vec![
                Row::floor("server", "udp-floor", floor),
                Row::latency("server", "xdp-rtt", lat(row_base, 1000), f),
                Row::rate("server", "xdp-rate", 1.0),
            ];
            sample_summary(&rows)
        };
        let b = baseline(&[run(20_000), run(9_000), run(10_000)]).unwrap();
        assert!((b.rows[1].ratio.as_ref().unwrap()["p99"] - 1.0).abs() < 0.01);
        assert_eq!(b.rows[0].ratio.as_ref().unwrap()["p99"], 1.0);
        assert!(b.rows[2].ratio.is_none());
        assert!(b.notes.last().unwrap().contains("median over 3 runs"));
        // The first run's percentiles are kept.
        assert_eq!(b.rows[1].latency_ns, run(20_000).rows[1].latency_ns);
        let mut short = run(10_000);
        short.rows.truncate(1);
        let e = baseline(&[run(10_000), short]).unwrap_err().0;
        assert!(e.contains("run 2") && e.contains("server/xdp-rtt"), "{e}");
        assert!(baseline(&[]).is_err());
    }

    #[test]
    fn a_floor_of_two_legs_sums_them() {
        let f = Floor {
            name: "a+b".into(),
            parts: vec![lat(10_000, 100), lat(5_000, 100)],
        };
        let s = f.summary();
        assert_eq!(
            s.p50,
            lat(10_000, 100).summary().p50 + lat(5_000, 100).summary().p50
        );
        assert_eq!(f.quantile(0.5), s.p50);
    }

    #[test]
    fn summary_json_round_trips() {
        let rows = sample_rows();
        let s = sample_summary(&rows);
        let text = serde_json::to_string_pretty(&s).unwrap();
        let back: RunSummary = serde_json::from_str(&text).unwrap();
        assert_eq!(back, s);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let row = &v["rows"][1];
        assert_eq!(row["key"], "server/xdp-rtt");
        assert_eq!(row["hgrm"], "server-xdp-rtt.hgrm");
        assert_eq!(row["floor"]["name"], "server/udp-floor");
        for f in ["count", "mean", "p50", "p90", "p99", "p999", "p9999", "max"] {
            assert!(row["latency_ns"][f].is_number(), "{f}");
        }
        assert!(row["ratio"]["p99"].as_f64().unwrap() > 1.9);
        assert_eq!(v["rows"][2]["throughput_per_s"], 1.5e6);
        assert!(v["rows"][2]["ratio"].is_null());
        assert_eq!(v["config"]["env"]["DP_X"], "1");
    }

    #[test]
    fn outputs_are_written() {
        let dir = std::env::temp_dir().join(format!("dpbench-test-{}", std::process::id()));
        let rows = sample_rows();
        let files = write_outputs(&dir, &sample_summary(&rows), &rows).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "summary.json",
                "server-udp-floor.hgrm",
                "server-xdp-rtt.hgrm",
                "latency.svg"
            ]
        );
        let hgrm = std::fs::read_to_string(dir.join("server-xdp-rtt.hgrm")).unwrap();
        let lines = crate::hist::parse_hgrm(&hgrm).unwrap();
        assert_eq!(lines.last().unwrap().total_count, 1000);
        let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("server/xdp-rtt"),
            "{svg:.200}"
        );
        let back: RunSummary =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                .unwrap();
        assert_eq!(back.rows.len(), 4);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn rows_with_slashes_get_safe_file_names_and_keep_their_knobs() {
        let floor = lat(10_000, 100);
        let f = Floor::of("throughput/exit-floor".into(), &floor);
        let r = Row::latency("throughput", "posted/2x2", lat(20_000, 100), f)
            .with_rate(12_345.0)
            .with_knobs([("vms", 2), ("vcpus", 2)]);
        assert_eq!(r.key(), "throughput/posted/2x2");
        assert_eq!(r.hgrm_name(), "throughput-posted-2x2.hgrm");
        assert_eq!(
            Row::cost("parse", "1 record", 1.0).hgrm_name(),
            "parse-1-record.hgrm"
        );
        let s = r.to_summary();
        assert_eq!(s.throughput_per_s, Some(12_345.0));
        assert!(s.latency_ns.is_some() && s.ratio.is_some());
        assert_eq!(s.knobs["vms"], "2");
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["knobs"]["vcpus"], "2");
        // Rows without knobs leave the field out; files without it load.
        let plain = serde_json::to_value(sample_rows()[0].to_summary()).unwrap();
        assert!(plain.get("knobs").is_none());
        let mut v: serde_json::Value =
            serde_json::from_str(include_str!("../testdata/baseline-2026-12-04.json")).unwrap();
        let back: RunSummary = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(back.config.server, None);
        for r in v["rows"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("knobs");
        }
        let back: RunSummary = serde_json::from_value(v).unwrap();
        assert!(back.rows.iter().all(|r| r.knobs.is_empty()));
        // Merging repetitions keeps both the rate (median) and the samples.
        let m = merge_repetitions(vec![vec![r], {
            let f = Floor::of("throughput/exit-floor".into(), &lat(10_000, 100));
            vec![Row::latency("throughput", "posted/2x2", lat(20_000, 100), f).with_rate(1.0)]
        }]);
        assert_eq!(m[0].hist.as_ref().unwrap().len(), 200);
        assert_eq!(m[0].rate, Some((12_345.0 + 1.0) / 2.0));
    }

    #[test]
    fn the_table_shows_latency_and_rate_together() {
        let floor = lat(10_000, 100);
        let f = Floor::of("throughput/exit-floor".into(), &floor);
        let rows = vec![
            Row::floor("throughput", "exit-floor", floor),
            Row::latency("throughput", "non-posted/2x2", lat(20_000, 100), f).with_rate(31_000.0),
            Row::rate("throughput", "a-rate", 5.0),
            Row::cost("parse", "not shown", 1.0),
        ];
        let t = table("throughput", &rows);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert!(lines[0].starts_with("throughput ") && lines[0].ends_with("rate rec/s"));
        let cell: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(cell[0], "non-posted/2x2");
        assert_eq!(cell.last(), Some(&"31000"));
        assert_eq!(cell[5], "2.00", "{t}");
        assert!(lines[1].trim_end().ends_with('-'), "{t}");
        assert!(
            lines[3].starts_with("a-rate") && lines[3].ends_with(" 5"),
            "{t}"
        );
        // Columns line up however long the names are.
        let width = |l: &str| l.len();
        assert_eq!(width(lines[0]), width(lines[2]), "{t}");
    }

    #[test]
    fn warnings_are_marked() {
        let w = warning(format_args!("irq: lost {}", 1));
        assert_eq!(w, "warning: irq: lost 1");
        assert!(is_warning(&w) && !is_warning("irq: trigger-to-ack is ..."));
    }

    #[test]
    fn timestamps_are_utc_civil_time() {
        let t = UNIX_EPOCH + std::time::Duration::from_secs(1_795_599_000);
        assert_eq!(
            timestamps(t),
            ("2026-11-25T09:30:00Z".into(), "20261125T093000Z".into())
        );
        assert_eq!(timestamps(UNIX_EPOCH).0, "1970-01-01T00:00:00Z");
        // A leap day.
        let t = UNIX_EPOCH + std::time::Duration::from_secs(951_782_400);
        assert_eq!(timestamps(t).0, "2000-02-29T00:00:00Z");
    }

    #[test]
    fn cpu_model_from_cpuinfo() {
        let info = "processor\t: 0\nvendor_id\t: X\nmodel name\t: Some CPU @ 2.00GHz\n";
        assert_eq!(cpu_model(info).as_deref(), Some("Some CPU @ 2.00GHz"));
        assert_eq!(cpu_model(""), None);
        let m = Machine::this();
        assert!(m.nproc >= 1 && !m.kernel.is_empty());
    }
}
