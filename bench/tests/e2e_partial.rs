//! A scenario that fails does not lose the others' results: it is reported
//! as failed in the tables and `summary.json`, the other scenarios' rows,
//! `.hgrm` files and plot are written, and the exit status says it failed.
//! The failure is injected (`DP_FAIL_SCENARIO`) into a scenario that runs
//! between two others. Needs root and BPF (the server scenario's
//! topology); skips without them unless DEVPLANE_REQUIRE_PRIVILEGED is set.

use std::process::Command;

use devplane_testkit::privilege::{self, Capability};
use serde_json::Value;

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_failed_scenario_keeps_the_others_results() {
    let test = "a_failed_scenario_keeps_the_others_results";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let dir = TempDir(std::env::temp_dir().join(format!("dpbench-partial-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir.0);
    let out = Command::new(env!("CARGO_BIN_EXE_dpbench"))
        .args([
            "--scenario",
            "parse,xdp-prog,server",
            "--iterations",
            "2000",
            "--round-trips",
            "2000",
            "--repeat",
            "1",
            "--quiet",
            "--out",
        ])
        .arg(&dir.0)
        .env("DP_FAIL_SCENARIO", "xdp-prog")
        .output()
        .expect("running dpbench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout {stdout}\nstderr {stderr}"
    );
    assert!(
        stderr.contains("1 scenario(s) failed (xdp-prog)"),
        "{stderr}"
    );
    // The table says which failed and why; the others' tables are there.
    assert!(
        stdout.contains("xdp-prog: FAILED: failed on purpose (DP_FAIL_SCENARIO)"),
        "{stdout}"
    );
    assert!(stdout.contains("server "), "{stdout}");
    let text = std::fs::read_to_string(dir.0.join("summary.json")).expect("summary.json written");
    let s: Value = serde_json::from_str(&text).unwrap();
    let failed = s["failed"].as_array().expect("failed listed");
    assert_eq!(failed.len(), 1, "{text}");
    assert_eq!(failed[0]["scenario"], "xdp-prog");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("failed on purpose"),
        "{text}"
    );
    let scenarios: Vec<&str> = s["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    assert!(scenarios.contains(&"parse"), "{scenarios:?}");
    assert!(scenarios.contains(&"server"), "{scenarios:?}");
    assert!(!scenarios.contains(&"xdp-prog"), "{scenarios:?}");
    let files: Vec<String> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files
            .iter()
            .any(|f| f.starts_with("server-") && f.ends_with(".hgrm")),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f == "latency.svg"), "{files:?}");
}
