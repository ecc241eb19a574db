//! The boot scenario in a suite, without booting: over its budget it is
//! skipped with the reason and the command that runs it (in the table and
//! `summary.json`, the other scenarios' rows kept, exit 0); named
//! explicitly without its kernel it fails with the reason, and the others'
//! rows are kept. Runs only `parse` besides, which needs no privileges.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use devplane_vmm::boot::{GUEST_DIR_ENV, MinimalKernel};
use serde_json::Value;

/// A directory removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn temp(tag: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("dpbench-boot-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    TempDir(d)
}

fn dpbench(args: &[&str], out: &Path, guest_dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dpbench"));
    cmd.args(args)
        .args(["--iterations", "1000", "--quiet", "--out"])
        .arg(out);
    if let Some(d) = guest_dir {
        cmd.env(GUEST_DIR_ENV, d);
    }
    cmd.output().expect("running dpbench")
}

fn summary(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json written");
    serde_json::from_str(&text).expect("summary.json parses")
}

fn scenarios_with_rows(s: &Value) -> Vec<String> {
    s["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| r["scenario"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn over_its_budget_the_boot_scenario_is_skipped_with_the_reason() {
    let out = temp("skip");
    let run = dpbench(
        &["--scenario", "parse,boot", "--boot-budget", "1"],
        &out.0,
        None,
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(0),
        "stdout {stdout}\nstderr {stderr}"
    );
    let line = stdout
        .lines()
        .find(|l| l.starts_with("boot: SKIPPED: "))
        .unwrap_or_else(|| panic!("no skip line: {stdout}"));
    // With its kernel here, the reason is the time against the budget
    // and the command that runs it; without, the kernel's absence.
    match MinimalKernel::locate() {
        Ok(_) => assert!(
            line.contains("over the 1 s budget")
                && line.contains("target/release/dpbench --scenario boot"),
            "{line}"
        ),
        Err(_) => assert!(line.contains("scripts/guest-kernel.sh"), "{line}"),
    }
    let s = summary(&out.0);
    let skipped = s["skipped"].as_array().expect("skipped listed");
    assert_eq!(skipped.len(), 1, "{s}");
    assert_eq!(skipped[0]["scenario"], "boot");
    assert_eq!(
        format!("boot: SKIPPED: {}", skipped[0]["reason"].as_str().unwrap()),
        line
    );
    assert!(s.get("failed").is_none(), "{s}");
    let with_rows = scenarios_with_rows(&s);
    assert!(with_rows.iter().any(|r| r == "parse"), "{with_rows:?}");
    assert!(!with_rows.iter().any(|r| r == "boot"), "{with_rows:?}");
}

#[test]
fn named_without_its_kernel_the_boot_scenario_fails_and_keeps_the_others() {
    let out = temp("nokernel");
    let empty = temp("noguest");
    std::fs::create_dir_all(&empty.0).unwrap();
    let run = dpbench(&["--scenario", "boot,parse"], &out.0, Some(&empty.0));
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        run.status.code(),
        Some(1),
        "stdout {stdout}\nstderr {stderr}"
    );
    assert!(stdout.contains("boot: FAILED: "), "{stdout}");
    let s = summary(&out.0);
    let failed = s["failed"].as_array().expect("failed listed");
    assert_eq!(failed.len(), 1, "{s}");
    assert_eq!(failed[0]["scenario"], "boot");
    assert!(
        failed[0]["error"]
            .as_str()
            .unwrap()
            .contains("minimal guest kernel"),
        "{s}"
    );
    assert!(s.get("skipped").is_none(), "{s}");
    let with_rows = scenarios_with_rows(&s);
    assert!(with_rows.iter().any(|r| r == "parse"), "{with_rows:?}");
}

#[test]
fn in_the_default_budget_a_missing_kernel_is_a_skip() {
    let out = temp("suite");
    let empty = temp("suiteguest");
    std::fs::create_dir_all(&empty.0).unwrap();
    // The default suite's budget, applied with --boot-budget 120 to a
    // suite of parse and boot.
    let run = dpbench(
        &["--scenario", "parse,boot", "--boot-budget", "120"],
        &out.0,
        Some(&empty.0),
    );
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(0), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("boot: SKIPPED: ") && l.contains("scripts/guest-kernel.sh")),
        "{stdout}"
    );
}
