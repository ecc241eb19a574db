//! What the machine counted during a measurement: per-CPU interrupts
//! (`/proc/interrupts`) and softirqs (`/proc/softirqs`), and this process's
//! context switches and page faults (`getrusage`). The client scenario
//! takes a [`Snapshot`] around its serial floor and around `remote-pio`
//! and notes the differences per 1000 exits, beside each row's share of
//! slow samples: where a round trip's tail comes from is then counted,
//! not guessed.

use std::collections::BTreeMap;

use crate::hist::Latency;

/// Counters at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// (source, CPU) -> interrupts: `LOC`, `RES`, `CAL`, `TLB`, ... by
    /// name; numbered lines summed as `dev`.
    pub irqs: BTreeMap<(String, usize), u64>,
    /// (softirq, CPU) -> count: `TIMER`, `NET_RX`, `SCHED`, `RCU`, ...
    pub softirqs: BTreeMap<(String, usize), u64>,
    /// This process's voluntary context switches (all threads, ended ones
    /// included).
    pub voluntary: u64,
    /// Its involuntary context switches (preemptions).
    pub involuntary: u64,
    /// Its minor page faults.
    pub minor_faults: u64,
    /// Its major page faults.
    pub major_faults: u64,
}

impl Snapshot {
    /// The counters now (those the machine does not offer stay empty).
    pub fn now() -> Snapshot {
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let mut s = Snapshot {
            irqs: parse_table(&read("/proc/interrupts"), true),
            softirqs: parse_table(&read("/proc/softirqs"), false),
            ..Snapshot::default()
        };
        // SAFETY: getrusage writes the struct it is given, nothing else.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `ru` is a valid, writable rusage.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0 {
            s.voluntary = ru.ru_nvcsw as u64;
            s.involuntary = ru.ru_nivcsw as u64;
            s.minor_faults = ru.ru_minflt as u64;
            s.major_faults = ru.ru_majflt as u64;
        }
        s
    }

    /// What was counted from `earlier` to this snapshot.
    pub fn since(&self, earlier: &Snapshot) -> Snapshot {
        let diff = |a: &BTreeMap<(String, usize), u64>, b: &BTreeMap<(String, usize), u64>| {
            a.iter()
                .map(|(k, v)| (k.clone(), v.saturating_sub(*b.get(k).unwrap_or(&0))))
                .filter(|(_, v)| *v > 0)
                .collect()
        };
        Snapshot {
            irqs: diff(&self.irqs, &earlier.irqs),
            softirqs: diff(&self.softirqs, &earlier.softirqs),
            voluntary: self.voluntary.saturating_sub(earlier.voluntary),
            involuntary: self.involuntary.saturating_sub(earlier.involuntary),
            minor_faults: self.minor_faults.saturating_sub(earlier.minor_faults),
            major_faults: self.major_faults.saturating_sub(earlier.major_faults),
        }
    }

    /// Adds the counts of `other` (two differences of one measurement
    /// made in parts).
    pub fn add(&mut self, other: &Snapshot) {
        for (k, v) in &other.irqs {
            *self.irqs.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.softirqs {
            *self.softirqs.entry(k.clone()).or_default() += v;
        }
        self.voluntary += other.voluntary;
        self.involuntary += other.involuntary;
        self.minor_faults += other.minor_faults;
        self.major_faults += other.major_faults;
    }

    /// This difference per 1000 of `per` (exits): the CPUs in `cpus`,
    /// each source above 0.5, largest first, e.g. `cpu0 LOC 4.1 RES 0.9,
    /// softirq TIMER 4.0; cpu1 ...; process: preempted 1.2, switched 8.0,
    /// faults 0.0`.
    pub fn per_thousand(&self, per: u64, cpus: &[usize]) -> String {
        let k = 1000.0 / per.max(1) as f64;
        let top = |m: &BTreeMap<(String, usize), u64>, cpu: usize| {
            let mut v: Vec<(&str, f64)> = m
                .iter()
                .filter(|((_, c), _)| *c == cpu)
                .map(|((n, _), x)| (n.as_str(), *x as f64 * k))
                .filter(|(_, x)| *x >= 0.5)
                .collect();
            v.sort_by(|a, b| b.1.total_cmp(&a.1));
            v.iter()
                .map(|(n, x)| format!("{n} {x:.1}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut parts: Vec<String> = cpus
            .iter()
            .map(|&c| {
                format!(
                    "cpu{c} irq [{}] softirq [{}]",
                    top(&self.irqs, c),
                    top(&self.softirqs, c)
                )
            })
            .collect();
        parts.push(format!(
            "process: preempted {:.1}, switched {:.1}, page faults {:.1}",
            self.involuntary as f64 * k,
            self.voluntary as f64 * k,
            (self.minor_faults + self.major_faults) as f64 * k
        ));
        parts.join("; ")
    }
}

/// Parses `/proc/interrupts` (`irqs`: numbered lines summed as `dev`) or
/// `/proc/softirqs`: a header of CPU columns, then a name and one count
/// per CPU per line.
fn parse_table(text: &str, irqs: bool) -> BTreeMap<(String, usize), u64> {
    let mut lines = text.lines();
    let cpus = lines.next().map_or(0, |h| {
        h.split_whitespace()
            .filter(|w| w.starts_with("CPU"))
            .count()
    });
    let mut out = BTreeMap::new();
    for line in lines {
        let mut words = line.split_whitespace();
        let Some(name) = words.next().map(|w| w.trim_end_matches(':')) else {
            continue;
        };
        let name = if irqs && name.chars().all(|c| c.is_ascii_digit()) {
            "dev"
        } else {
            name
        };
        for (cpu, w) in words.take(cpus).enumerate() {
            let Ok(v) = w.parse::<u64>() else { break };
            *out.entry((name.to_string(), cpu)).or_insert(0) += v;
        }
    }
    out
}

/// The share (0..1) of `h`'s samples slower than twice its p50; `None`
/// without samples.
pub fn slow_fraction(h: &Latency) -> Option<f64> {
    let s = h.summary();
    if s.count == 0 || s.p50 == 0 {
        return None;
    }
    // The quantile at which samples pass 2x the p50, by bisection on the
    // histogram's quantiles.
    let (mut lo, mut hi) = (0.5f64, 1.0f64);
    for _ in 0..30 {
        let mid = (lo + hi) / 2.0;
        if h.quantile(mid) > 2 * s.p50 {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(1.0 - hi)
}

/// The share of `h`'s samples slower than twice its p50, and their mean
/// excess over the p50 in microseconds: `1.2% of samples > 2x p50, +14.0
/// us each`.
pub fn slow_share(h: &Latency) -> String {
    let Some(share) = slow_fraction(h) else {
        return "no samples".to_string();
    };
    let s = h.summary();
    // The mean of the slow tail from the overall mean: the fast part's mean
    // is close to the p50.
    let slow_n = share * s.count as f64;
    let excess = if slow_n >= 1.0 {
        ((s.mean - s.p50 as f64) * s.count as f64 / slow_n) / 1000.0
    } else {
        0.0
    };
    format!(
        "{:.2}% of samples > 2x p50, +{excess:.1} us each",
        share * 100.0
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERRUPTS: &str = "           CPU0       CPU1       
 24:          1          0  IO-APIC   5-edge      ACPI:Ged
 40:        100        200  PCI-MSI 1-edge      virtio0
LOC:       1000       2000   Local timer interrupts
RES:         10         20   Rescheduling interrupts
ERR:          0
";

    #[test]
    fn tables_parse_and_differences_are_per_thousand() {
        let t = parse_table(INTERRUPTS, true);
        assert_eq!(t[&("dev".to_string(), 0)], 101);
        assert_eq!(t[&("dev".to_string(), 1)], 200);
        assert_eq!(t[&("LOC".to_string(), 1)], 2000);
        assert!(!t.contains_key(&("ERR".to_string(), 1)));
        let soft = parse_table(
            "                    CPU0       CPU1\n       TIMER:     5     6\n      NET_RX:   7  8\n",
            false,
        );
        assert_eq!(soft[&("NET_RX".to_string(), 1)], 8);
        let a = Snapshot {
            irqs: t.clone(),
            softirqs: soft.clone(),
            involuntary: 5,
            ..Snapshot::default()
        };
        let mut b = a.clone();
        *b.irqs.get_mut(&("LOC".to_string(), 0)).unwrap() += 40;
        *b.irqs.get_mut(&("RES".to_string(), 0)).unwrap() += 3;
        *b.softirqs.get_mut(&("TIMER".to_string(), 0)).unwrap() += 40;
        b.involuntary += 10;
        let d = b.since(&a);
        assert_eq!(d.irqs.len(), 2);
        let text = d.per_thousand(10_000, &[0, 1]);
        assert_eq!(
            text,
            "cpu0 irq [LOC 4.0] softirq [TIMER 4.0]; cpu1 irq [] softirq []; \
             process: preempted 1.0, switched 0.0, page faults 0.0"
        );
        // This machine's own counters read.
        let now = Snapshot::now();
        assert!(now.irqs.keys().any(|(n, _)| n == "LOC") || now.irqs.is_empty());
    }

    #[test]
    fn the_slow_share_counts_samples_past_twice_the_median() {
        let mut h = Latency::new();
        for i in 0..1000u64 {
            h.record(if i < 980 { 10_000 } else { 40_000 });
        }
        let s = slow_share(&h);
        assert!(s.starts_with("2.00% of samples > 2x p50"), "{s}");
        // 30 us each, within the histogram's 3 significant digits.
        assert!(
            s.contains("+29.9 us each") || s.contains("+30.0 us each"),
            "{s}"
        );
        assert_eq!(slow_share(&Latency::new()), "no samples");
        assert!((slow_fraction(&h).unwrap() - 0.02).abs() < 1e-3);
        assert_eq!(slow_fraction(&Latency::new()), None);
    }
}
