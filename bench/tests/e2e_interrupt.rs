//! Ctrl-C in the middle of a run: dpbench finishes the measurement under
//! way, tears its topology down (namespaces, XDP program, pinned maps) and
//! writes the results of what finished, then exits non-zero. Needs root,
//! BPF and /dev/kvm; skips without them unless DEVPLANE_REQUIRE_PRIVILEGED
//! is set.

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devplane_testkit::privilege::{self, Capability};

/// Kills the child if the test fails before it exits.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn netns_of(pid: u32) -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&format!("-{pid}-")))
        .map(str::to_string)
        .collect()
}

#[test]
fn ctrl_c_stops_after_the_measurement_writes_results_and_cleans_up() {
    let test = "ctrl_c_stops_after_the_measurement_writes_results_and_cleans_up";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let out = std::env::temp_dir().join(format!("dpbench-interrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let child = Command::new(env!("CARGO_BIN_EXE_dpbench"))
        .args([
            "--scenario",
            "server,client",
            "--round-trips",
            "2000",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting dpbench");
    let mut child = Reap(child);
    let pid = child.0.id();
    // Into the server scenario's repetitions (each builds the topology).
    let t0 = Instant::now();
    while netns_of(pid).is_empty() && t0.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !netns_of(pid).is_empty(),
        "dpbench never built its topology"
    );
    let kill = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t1 = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t1.elapsed() < Duration::from_secs(60),
            "dpbench did not stop within 60 s of Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |r: Option<&mut dyn Read>| {
        let mut s = String::new();
        if let Some(r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    };
    let stderr = read(child.0.stderr.as_mut().map(|r| r as &mut dyn Read));
    let stdout = read(child.0.stdout.as_mut().map(|r| r as &mut dyn Read));
    assert_eq!(status.code(), Some(1), "stderr: {stderr}");
    assert!(
        stderr.contains("stopping after the measurement"),
        "{stderr}"
    );
    assert!(stderr.contains("interrupted"), "{stderr}");
    // It stopped early: the client scenario never ran.
    assert!(!stdout.contains("client "), "{stdout}");
    let summary = std::fs::read_to_string(out.join("summary.json")).expect("summary.json written");
    assert!(summary.contains("server/xdp-rtt"), "{summary}");
    assert!(
        netns_of(pid).is_empty(),
        "namespaces left: {:?}",
        netns_of(pid)
    );
    let pins: Vec<String> = std::fs::read_dir("/sys/fs/bpf")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("dpbench") && n.ends_with(&format!("-{pid}")))
                .collect()
        })
        .unwrap_or_default();
    assert!(pins.is_empty(), "pins left: {pins:?}");
    let _ = std::fs::remove_dir_all(&out);
}
