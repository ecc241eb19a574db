//! Soak: the `irq` scenario (5000 interrupts, one outstanding at a time,
//! three runs each) again and again; every invocation must finish with
//! every interrupt delivered. A lost interrupt ends a run with "vCPU(s) did
//! not finish" and the counters of where interrupts went, which this test
//! prints. Long (about 10 s an invocation) and, while issue 14 item 1 is
//! open, failing about one invocation in 30 on the development machine:
//! ignored by default; run with `cargo nextest run -p devplane-bench
//! --run-ignored only -E 'binary(soak_irq)'` (`DP_SOAK_RUNS` sets the
//! count, default 20). Needs root, BPF and /dev/kvm.

use std::process::Command;

use devplane_testkit::privilege::{self, Capability};

#[test]
#[ignore = "soak test (minutes); fails while issue 14 item 1 (a lost interrupt) is open"]
fn irq_scenario_delivers_every_interrupt_run_after_run() {
    let test = "irq_scenario_delivers_every_interrupt_run_after_run";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let runs: u32 = std::env::var("DP_SOAK_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let out = std::env::temp_dir().join(format!("dpbench-soak-irq-{}", std::process::id()));
    let mut failures = Vec::new();
    for i in 1..=runs {
        let _ = std::fs::remove_dir_all(&out);
        let o = Command::new(env!("CARGO_BIN_EXE_dpbench"))
            .args(["--scenario", "irq", "--quiet", "--out"])
            .arg(&out)
            .output()
            .expect("running dpbench");
        if !o.status.success() {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            let why: Vec<&str> = text.lines().filter(|l| l.contains("FAILED")).collect();
            eprintln!("run {i} of {runs} failed: {why:?}");
            failures.push((i, why.join(" ")));
        }
    }
    let _ = std::fs::remove_dir_all(&out);
    assert!(
        failures.is_empty(),
        "{} of {runs} irq runs failed: {failures:?}",
        failures.len()
    );
}
