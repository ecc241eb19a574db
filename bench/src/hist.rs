//! Latency histograms (HdrHistogram) and their summary.

use hdrhistogram::Histogram;

/// A latency recorder in nanoseconds, 3 significant digits, up to 10 s.
pub struct Latency {
    h: Histogram<u64>,
}

/// The percentiles a scenario reports, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest sample.
    pub max: u64,
    /// Mean.
    pub mean: f64,
}

impl Latency {
    /// An empty recorder.
    pub fn new() -> Latency {
        Latency {
            // 1 ns .. 10 s at 3 significant digits cannot fail to build.
            h: Histogram::new_with_bounds(1, 10_000_000_000, 3)
                .unwrap_or_else(|_| Histogram::new(3).expect("histogram")),
        }
    }

    /// Records one sample (clamped into range).
    pub fn record(&mut self, ns: u64) {
        self.h.saturating_record(ns.max(1));
    }

    /// The summary.
    pub fn summary(&self) -> Summary {
        Summary {
            count: self.h.len(),
            p50: self.h.value_at_quantile(0.50),
            p99: self.h.value_at_quantile(0.99),
            p999: self.h.value_at_quantile(0.999),
            max: self.h.max(),
            mean: self.h.mean(),
        }
    }
}

impl Default for Latency {
    fn default() -> Self {
        Latency::new()
    }
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
        assert!((s.p99 as i64 - 990_000).abs() <= 1000, "{s:?}");
        assert!((s.p999 as i64 - 999_000).abs() <= 1000, "{s:?}");
        assert!((s.mean - 500_500.0).abs() < 1000.0, "{s:?}");
    }
}
