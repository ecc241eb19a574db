//! `latency.svg`: every latency row's percentile curve against its floor,
//! drawn as HdrHistogram's plots are: x is the percentile on a "nines"
//! axis (0 -> 0%, 1 -> 90%, 2 -> 99%, 3 -> 99.9%, ...), y the latency in
//! microseconds on a log scale. Rows are solid, floors dashed. The SVG
//! backend writes text as `<text>` elements, so no font is needed to draw.

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::report::Row;

/// Line colours (matplotlib's tab10), distinct on white.
const COLORS: [(u8, u8, u8); 10] = [
    (31, 119, 180),
    (214, 39, 40),
    (44, 160, 44),
    (255, 127, 14),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
];

/// Points per unit of the nines axis.
const STEPS_PER_NINE: u32 = 50;

/// `x` on the nines axis as a percentile label (`99.9%`).
pub fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = if x <= 1.0 {
        0
    } else {
        (x - 2.0).ceil().max(0.0) as usize
    };
    format!("{p:.digits$}%")
}

/// The quantile at `x` on the nines axis.
fn quantile(x: f64) -> f64 {
    1.0 - 10f64.powf(-x)
}

struct Curve {
    label: String,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

fn curve(label: String, dashed: bool, max_x: f64, value_ns: impl Fn(f64) -> u64) -> Curve {
    let n = (max_x * STEPS_PER_NINE as f64).ceil() as u32;
    let points = (0..=n)
        .map(|i| {
            let x = (i as f64 / STEPS_PER_NINE as f64).min(max_x);
            (x, (value_ns(quantile(x)) as f64 / 1000.0).max(0.001))
        })
        .collect();
    Curve {
        label,
        dashed,
        points,
    }
}

fn curves(rows: &[Row]) -> Vec<Curve> {
    let mut out: Vec<Curve> = Vec::new();
    for r in rows {
        let Some(h) = &r.hist else { continue };
        // A boot's one sample per row is tens of seconds: off this scale.
        // The load sweep's rows have a plot of their own (`load.svg`).
        if h.len() == 0 || r.scenario == "boot" || is_load_point(r) {
            continue;
        }
        // The deepest percentile the samples say anything about.
        let max_x = (h.len() as f64).log10().max(1.0);
        out.push(curve(r.key(), r.is_floor(), max_x, |q| h.quantile(q)));
        // A floor that is no row of its own (a sum of legs), once.
        let extra = r.floor.as_ref().filter(|f| {
            !r.is_floor()
                && !rows.iter().any(|o| o.key() == f.name)
                && !out.iter().any(|c| c.label == f.name)
        });
        if let Some(f) = extra {
            out.push(curve(f.name.clone(), true, max_x, |q| f.quantile(q)));
        }
    }
    out
}

/// Draws every latency row of `rows` into an SVG at `path`.
pub fn percentiles(path: &Path, rows: &[Row]) -> Result<()> {
    let curves = curves(rows);
    let max_x = curves
        .iter()
        .filter_map(|c| c.points.last().map(|p| p.0))
        .fold(1.0, f64::max);
    let (lo, hi) = y_range(curves.iter().flat_map(|c| c.points.iter().map(|p| p.1)));
    let axes = Axes {
        caption: "dpbench: latency by percentile (solid: row, dashed: same-run floor)",
        max_x,
        y: (lo, hi),
        x_labels: Some(max_x.ceil() as usize + 1),
        x_format: &|x| nines_label(*x),
        x_desc: "percentile",
    };
    svg(path, &axes, |chart| {
        for (i, c) in curves.iter().enumerate() {
            let (r, g, b) = COLORS[i % COLORS.len()];
            let color = RGBColor(r, g, b);
            let style = color.stroke_width(2);
            let drawn = if c.dashed {
                chart.draw_series(DashedLineSeries::new(c.points.iter().copied(), 6, 4, style))
            } else {
                chart.draw_series(LineSeries::new(c.points.iter().copied(), style))
            };
            drawn
                .map_err(err)?
                .label(c.label.as_str())
                .legend(legend_line(style));
        }
        Ok(())
    })
}

/// The y range (log scale) that holds every value of `ys` with a margin;
/// 1..10 when there is none.
fn y_range(ys: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = ys.fold((f64::MAX, 0f64), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if lo <= hi {
        (lo * 0.8, hi * 1.25)
    } else {
        (1.0, 10.0)
    }
}

/// A plotting error as an `anyhow` error.
fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{e}")
}

/// A legend entry's short line in `style`.
fn legend_line(style: ShapeStyle) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style)
}

/// The chart both plots draw on: x linear from 0, y the latency in
/// microseconds on a log scale.
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, LogCoord<f64>>>;

/// What an SVG's axes show.
struct Axes<'f> {
    caption: &'f str,
    /// x from 0 to this.
    max_x: f64,
    /// y from, to (us, log scale).
    y: (f64, f64),
    /// How many x labels, if not plotters' default.
    x_labels: Option<usize>,
    x_format: &'f dyn Fn(&f64) -> String,
    x_desc: &'f str,
}

/// Draws an SVG of 1000 x 640 at `path`: white, `axes`' caption and mesh,
/// what `draw` puts on the chart, and the legend of its labelled series
/// in the upper left.
fn svg(path: &Path, axes: &Axes, draw: impl FnOnce(&mut Chart) -> Result<()>) -> Result<()> {
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (lo, hi) = axes.y;
    let mut chart = ChartBuilder::on(&root)
        .caption(axes.caption, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..axes.max_x, (lo..hi).log_scale())
        .map_err(err)?;
    let y_format = |y: &f64| format!("{y}");
    let mut mesh = chart.configure_mesh();
    if let Some(n) = axes.x_labels {
        mesh.x_labels(n);
    }
    mesh.x_label_formatter(axes.x_format)
        .y_label_formatter(&y_format)
        .x_desc(axes.x_desc)
        .y_desc("latency (us)")
        .draw()
        .map_err(err)?;
    draw(&mut chart)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Whether `r` is a point of the load sweep (`load.svg` draws it).
fn is_load_point(r: &Row) -> bool {
    r.scenario == crate::load::SCENARIO && r.knobs.contains_key("offered_records_per_s")
}

/// One point of `load.svg`: offered records/s and the p50, p99 and p99.9
/// of its round trip in microseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadPoint {
    /// Offered load, records/s.
    pub offered: f64,
    /// Percentiles, us.
    pub p50: f64,
    /// 99th percentile, us.
    pub p99: f64,
    /// 99.9th percentile, us.
    pub p999: f64,
}

/// The load sweep's points in `rows`, by offered load.
pub fn load_points(rows: &[Row]) -> Vec<LoadPoint> {
    let mut v: Vec<LoadPoint> = rows
        .iter()
        .filter(|r| is_load_point(r))
        .filter_map(|r| {
            let s = r.hist.as_ref()?.summary();
            let offered = r.knobs.get("offered_records_per_s")?.parse().ok()?;
            (s.count > 0).then(|| LoadPoint {
                offered,
                p50: s.p50 as f64 / 1000.0,
                p99: s.p99 as f64 / 1000.0,
                p999: s.p999 as f64 / 1000.0,
            })
        })
        .collect();
    v.sort_by(|a, b| a.offered.total_cmp(&b.offered));
    v
}

/// Reads one percentile of a [`LoadPoint`].
type Get = fn(&LoadPoint) -> f64;

/// Draws `load.svg`: p50, p99 and p99.9 of the round trip against the
/// offered load (records/s, linear; latency log scale), the knee's limit
/// (`limit_us`, dashed) and the knee (a vertical line), if any.
pub fn load_curve(
    path: &Path,
    points: &[LoadPoint],
    limit_us: Option<f64>,
    knee: Option<f64>,
) -> Result<()> {
    let max_x = points.iter().map(|p| p.offered).fold(1.0, f64::max) * 1.05;
    let (lo, hi) = y_range(
        points
            .iter()
            .flat_map(|p| [p.p50, p.p99, p.p999])
            .chain(limit_us)
            .filter(|y| *y > 0.0),
    );
    let axes = Axes {
        caption: "dpbench load: XDP round trip against offered load (open loop, from intended send)",
        max_x,
        y: (lo, hi),
        x_labels: None,
        x_format: &|x| format!("{:.1}M", x / 1e6),
        x_desc: "offered load (records/s)",
    };
    let series: [(&str, Get); 3] = [
        ("p50", |p| p.p50),
        ("p99", |p| p.p99),
        ("p99.9", |p| p.p999),
    ];
    svg(path, &axes, |chart| {
        for (i, (label, get)) in series.iter().enumerate() {
            let (r, g, b) = COLORS[i % COLORS.len()];
            let style = RGBColor(r, g, b).stroke_width(2);
            chart
                .draw_series(LineSeries::new(
                    points.iter().map(|p| (p.offered, get(p).max(lo))),
                    style,
                ))
                .map_err(err)?
                .label(*label)
                .legend(legend_line(style));
        }
        if let Some(l) = limit_us {
            let style = BLACK.stroke_width(1);
            chart
                .draw_series(DashedLineSeries::new([(0.0, l), (max_x, l)], 6, 4, style))
                .map_err(err)?
                .label("2x unloaded p99")
                .legend(legend_line(style));
        }
        if let Some(k) = knee {
            let (r, g, b) = COLORS[3];
            let style = RGBColor(r, g, b).stroke_width(1);
            chart
                .draw_series(LineSeries::new([(k, lo), (k, hi)], style))
                .map_err(err)?
                .label("knee")
                .legend(legend_line(style));
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nines_axis_labels() {
        assert_eq!(nines_label(0.0), "0%");
        assert_eq!(nines_label(1.0), "90%");
        assert_eq!(nines_label(2.0), "99%");
        assert_eq!(nines_label(3.0), "99.9%");
        assert_eq!(nines_label(4.0), "99.99%");
        assert!((quantile(2.0) - 0.99).abs() < 1e-12);
    }

    /// The sweep's points are drawn into their own SVG, by offered load,
    /// and left out of the percentile plot.
    #[test]
    fn the_load_sweep_has_a_plot_of_its_own() {
        use crate::hist::Latency;
        use crate::report::Floor;
        let lat = |v: u64| {
            let mut l = Latency::new();
            for _ in 0..100 {
                l.record(v);
            }
            l
        };
        let f = Floor::of("load/unloaded".into(), &lat(10_000));
        let rows = vec![
            Row::floor("load", "unloaded", lat(10_000)),
            Row::latency("load", "offered-50%", lat(30_000), f.clone())
                .with_knobs([("offered_records_per_s", "2000000")]),
            Row::latency("load", "offered-10%", lat(12_000), f)
                .with_knobs([("offered_records_per_s", "400000")]),
        ];
        let pts = load_points(&rows);
        assert_eq!(pts.len(), 2);
        assert_eq!(pts[0].offered, 400_000.0);
        assert!((pts[1].p99 - 30.0).abs() < 0.1, "{pts:?}");
        let labels: Vec<String> = curves(&rows).into_iter().map(|c| c.label).collect();
        assert_eq!(labels, ["load/unloaded"]);
        let path = std::env::temp_dir().join(format!("dpbench-load-{}.svg", std::process::id()));
        load_curve(&path, &pts, Some(20.0), Some(400_000.0)).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.starts_with("<svg") && svg.contains("p99.9") && svg.contains("knee"));
    }
}
