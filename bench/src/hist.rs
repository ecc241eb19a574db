//! Latency histograms (HdrHistogram), their summary, coordinated-omission
//! correction and the HdrHistogram percentile-distribution text format.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Largest recordable sample: 10 s in nanoseconds.
const HIGHEST_NS: u64 = 10_000_000_000;
/// Significant digits kept by every histogram.
const SIGFIG: u8 = 3;

/// A latency recorder in nanoseconds, 3 significant digits, up to 10 s.
#[derive(Clone)]
pub struct Latency {
    h: Histogram<u64>,
}

/// The percentiles a scenario reports, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// Largest sample.
    pub max: u64,
}

/// The percentiles that have a name, in the order tables show them.
pub const METRICS: [&str; 6] = ["p50", "p90", "p99", "p999", "p9999", "max"];

impl Summary {
    /// The value of a named percentile (`p50`, `p90`, `p99`, `p999`,
    /// `p9999`, `max`).
    pub fn get(&self, metric: &str) -> Option<u64> {
        Some(match metric {
            "p50" => self.p50,
            "p90" => self.p90,
            "p99" => self.p99,
            "p999" => self.p999,
            "p9999" => self.p9999,
            "max" => self.max,
            _ => return None,
        })
    }

    /// Percentile by percentile sum of two summaries: the floor of a path
    /// made of two legs (an upper bound of the sum's own percentiles).
    pub fn plus(&self, o: &Summary) -> Summary {
        Summary {
            count: self.count.min(o.count),
            mean: self.mean + o.mean,
            p50: self.p50 + o.p50,
            p90: self.p90 + o.p90,
            p99: self.p99 + o.p99,
            p999: self.p999 + o.p999,
            p9999: self.p9999 + o.p9999,
            max: self.max + o.max,
        }
    }
}

impl Latency {
    /// An empty recorder.
    pub fn new() -> Latency {
        Latency {
            // 1 ns .. 10 s at 3 significant digits cannot fail to build.
            h: Histogram::new_with_bounds(1, HIGHEST_NS, SIGFIG)
                .unwrap_or_else(|_| Histogram::new(SIGFIG).expect("histogram")),
        }
    }

    /// An empty recorder of samples up to `highest_ns` (at least 10 s):
    /// for spans longer than a round trip, such as a guest's boot.
    pub fn up_to(highest_ns: u64) -> Latency {
        let highest = highest_ns.max(HIGHEST_NS);
        Latency {
            h: Histogram::new_with_bounds(1, highest, SIGFIG)
                .unwrap_or_else(|_| Histogram::new(SIGFIG).expect("histogram")),
        }
    }

    /// Records one sample (clamped into range).
    pub fn record(&mut self, ns: u64) {
        self.h.saturating_record(ns.max(1));
    }

    /// Records one sample of a loop that meant to take one every
    /// `expected_interval_ns`, correcting for coordinated omission as
    /// HdrHistogram's `recordValueWithExpectedInterval` does: a sample
    /// larger than the interval stands for the samples the stall kept the
    /// loop from taking, so `ns - k * interval` is also recorded for
    /// k = 1, 2, .. while it is at least the interval. (The open-loop
    /// round trip needs no correction: it times each request from its
    /// intended send time, see `udp::Schedule`.)
    #[allow(dead_code)]
    pub fn record_corrected(&mut self, ns: u64, expected_interval_ns: u64) {
        let ns = ns.clamp(1, self.h.high());
        if self.h.record_correct(ns, expected_interval_ns).is_err() {
            // Unreachable with the value clamped into range; never lose
            // the sample itself.
            self.record(ns);
        }
    }

    /// Adds every sample of `other`.
    pub fn add(&mut self, other: &Latency) {
        // Same bounds on both sides: cannot fail.
        let _ = self.h.add(&other.h);
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.h.len()
    }

    /// The value at quantile `q` (0..=1), in nanoseconds.
    pub fn quantile(&self, q: f64) -> u64 {
        self.h.value_at_quantile(q)
    }

    /// The summary.
    pub fn summary(&self) -> Summary {
        Summary {
            count: self.h.len(),
            mean: self.h.mean(),
            p50: self.h.value_at_quantile(0.50),
            p90: self.h.value_at_quantile(0.90),
            p99: self.h.value_at_quantile(0.99),
            p999: self.h.value_at_quantile(0.999),
            p9999: self.h.value_at_quantile(0.9999),
            max: self.h.max(),
        }
    }

    /// The percentile distribution in HdrHistogram's text format (what
    /// `outputPercentileDistribution` prints and the HdrHistogram plotters
    /// read), 5 ticks per half distance, values divided by `unit_ns`
    /// (1000: microseconds).
    pub fn hgrm(&self, unit_ns: f64) -> String {
        let mut s = String::new();
        let d = SIGFIG as usize;
        let _ = write!(
            s,
            "{:>12} {:>14} {:>10} {:>14}\n\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        let mut total = 0u64;
        if !self.h.is_empty() {
            for v in self.h.iter_quantiles(5) {
                total += v.count_since_last_iteration();
                let q = v.quantile_iterated_to();
                let value = v.value_iterated_to() as f64 / unit_ns;
                if q < 1.0 {
                    let _ = writeln!(
                        s,
                        "{value:>12.d$} {q:>2.12} {total:>10} {:>14.2}",
                        1.0 / (1.0 - q)
                    );
                } else {
                    let _ = writeln!(s, "{value:>12.d$} {q:>2.12} {total:>10}");
                }
            }
        }
        let _ = writeln!(
            s,
            "#[Mean    = {:>12.d$}, StdDeviation   = {:>12.d$}]",
            self.h.mean() / unit_ns,
            self.h.stdev() / unit_ns
        );
        let _ = writeln!(
            s,
            "#[Max     = {:>12.d$}, Total count    = {:>12}]",
            self.h.max() as f64 / unit_ns,
            self.h.len()
        );
        let _ = writeln!(
            s,
            "#[Buckets = {:>12}, SubBuckets     = {:>12}]",
            self.h.buckets(),
            // HdrHistogram's sub-bucket count: 2 * 10^digits rounded up
            // to a power of two (2048 for 3 digits).
            (2 * 10u64.pow(SIGFIG as u32)).next_power_of_two()
        );
        s
    }
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
}

/// One data line of an `.hgrm` file.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HgrmLine {
    pub value: f64,
    pub percentile: f64,
    pub total_count: u64,
    pub inverse: Option<f64>,
}

/// Parses the data lines of an `.hgrm` file (header and `#` lines are
/// skipped).
#[cfg(test)]
pub fn parse_hgrm(text: &str) -> Result<Vec<HgrmLine>, crate::invalid::Invalid> {
    let mut out = Vec::new();
    for line in text.lines() {
        let t = line.trim();
        if t.is_empty() || t.starts_with('#') || t.starts_with("Value") {
            continue;
        }
        let f: Vec<&str> = t.split_whitespace().collect();
        if f.len() != 3 && f.len() != 4 {
            return Err(crate::invalid::Invalid::from(format!("bad line {line:?}")));
        }
        let num = |s: &str| s.parse::<f64>().map_err(|e| format!("{line:?}: {e}"));
        out.push(HgrmLine {
            value: num(f[0])?,
            percentile: num(f[1])?,
            total_count: f[2].parse().map_err(|e| format!("{line:?}: {e}"))?,
            inverse: f.get(3).map(|s| num(s)).transpose()?,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latency::new();
        for v in 1..=1000u64 {
            l.record(v * 1000);
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        // 3 significant digits: within 0.1%.
        assert!((s.p50 as i64 - 500_000).abs() <= 500, "{s:?}");
        assert!((s.p90 as i64 - 900_000).abs() <= 1000, "{s:?}");
        assert!((s.p99 as i64 - 990_000).abs() <= 1000, "{s:?}");
        assert!((s.p999 as i64 - 999_000).abs() <= 1000, "{s:?}");
        assert!((s.p9999 as i64 - 1_000_000).abs() <= 1000, "{s:?}");
        assert!((s.max as i64 - 1_000_000).abs() <= 1000, "{s:?}");
        assert!((s.mean - 500_500.0).abs() < 1000.0, "{s:?}");
        assert_eq!(s.get("p99"), Some(s.p99));
        assert_eq!(s.get("p99.9"), None);
    }

    #[test]
    fn out_of_range_samples_are_clamped_not_lost() {
        let mut l = Latency::new();
        l.record(0);
        l.record(u64::MAX);
        l.record_corrected(u64::MAX, 0);
        assert_eq!(l.len(), 3);
        assert!(l.summary().max >= HIGHEST_NS);
        assert_eq!(l.quantile(0.0), 1);
    }

    #[test]
    fn sums_and_merges() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for _ in 0..100 {
            a.record(10_000);
            b.record(20_000);
        }
        let s = a.summary().plus(&b.summary());
        assert!((s.p50 as i64 - 30_000).abs() <= 30, "{s:?}");
        assert_eq!(s.count, 100);
        a.add(&b);
        assert_eq!(a.len(), 200);
        assert!((a.summary().p99 as i64 - 20_000).abs() <= 20);
    }

    /// 1000 samples of 10 us taken every 100 us, then one 100 ms stall.
    fn stall(corrected: bool) -> Summary {
        let mut l = Latency::new();
        for _ in 0..1000 {
            if corrected {
                l.record_corrected(10_000, 100_000);
            } else {
                l.record(10_000);
            }
        }
        if corrected {
            l.record_corrected(100_000_000, 100_000);
        } else {
            l.record(100_000_000);
        }
        l.summary()
    }

    #[test]
    fn coordinated_omission_correction_shows_the_stall() {
        let raw = stall(false);
        assert_eq!(raw.count, 1001);
        assert!((raw.p99 as i64 - 10_000).abs() <= 10, "{raw:?}");
        let fixed = stall(true);
        // The stall stands for the 999 requests (100 ms / 100 us - 1) the
        // loop could not send: 100 ms - k * 100 us for k = 1..=999.
        assert_eq!(fixed.count, 1001 + 999);
        assert!(fixed.p99 >= 10_000_000, "{fixed:?}");
        assert!(fixed.p90 >= 10_000_000, "{fixed:?}");
        assert!(
            (fixed.max as i64 - 100_000_000).abs() <= 100_000,
            "{fixed:?}"
        );
        // Half the samples are the stall's shadow: the median moved up.
        assert!(fixed.p50 > 10_000, "{fixed:?}");
    }

    #[test]
    fn correction_leaves_fast_samples_alone() {
        let mut l = Latency::new();
        for v in [5_000, 99_999, 100_000] {
            l.record_corrected(v, 100_000);
        }
        assert_eq!(l.len(), 3);
        // Exactly two intervals: one extra sample at one interval.
        l.record_corrected(200_000, 100_000);
        assert_eq!(l.len(), 5);
        // No interval: no correction.
        l.record_corrected(1_000_000, 0);
        assert_eq!(l.len(), 6);
    }

    #[test]
    fn hgrm_is_hdrhistogram_text_and_parses_back() {
        let mut l = Latency::new();
        for v in 1..=10_000u64 {
            l.record(v * 100);
        }
        let text = l.hgrm(1000.0);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        assert_eq!(
            header.split_whitespace().collect::<Vec<_>>(),
            ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
        );
        assert_eq!(lines.next(), Some(""));
        let rows = parse_hgrm(&text).unwrap();
        assert!(rows.len() > 50, "{}", rows.len());
        let first = rows[0];
        assert!((first.value - 0.1).abs() < 0.001, "{first:?}");
        assert_eq!(first.percentile, 0.0);
        assert_eq!(first.inverse, Some(1.0));
        // Monotone, and the total count ends at the sample count.
        for w in rows.windows(2) {
            assert!(w[1].value >= w[0].value && w[1].percentile >= w[0].percentile);
            assert!(w[1].total_count >= w[0].total_count);
        }
        let last = rows.last().unwrap();
        assert_eq!(last.percentile, 1.0);
        assert_eq!(last.total_count, 10_000);
        assert_eq!(last.inverse, None);
        assert!((last.value - 1000.0).abs() <= 1.0, "{last:?}");
        // The median line: value ~500 us at percentile 0.5, 1/(1-p) = 2.
        let mid = rows.iter().find(|r| r.percentile == 0.5).unwrap();
        assert!((mid.value - 500.0).abs() <= 0.5, "{mid:?}");
        assert_eq!(mid.inverse, Some(2.0));
        assert!(text.contains("#[Max     =     1000.447, Total count    =        10000]"));
        assert!(text.contains("#[Mean    ="));
        assert!(text.contains("#[Buckets ="));
    }

    #[test]
    fn hgrm_of_an_empty_histogram_is_just_the_frame() {
        let text = Latency::new().hgrm(1000.0);
        assert!(parse_hgrm(&text).unwrap().is_empty());
        assert!(text.contains("Total count    =            0"));
    }
}
