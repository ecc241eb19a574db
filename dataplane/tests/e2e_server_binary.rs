//! The `devplane-server` binary: started from a configuration file in a
//! server network namespace, it attaches XDP and pins its maps; Ctrl-C
//! (SIGINT) stops it cleanly: exit status 0, XDP detached, pinned maps
//! removed, counters printed. A bad configuration is a one-line error and
//! exit status 2.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devplane_dataplane::privilege::{self, Capability};
use devplane_dataplane::topology::{Side, Topology};

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Kills the child if the test fails before it exits.
struct ChildGuard(Option<std::process::Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn xdp_attached(topo: &Topology) -> bool {
    let out = topo
        .exec(Side::Server, ["ip", "link", "show", topo.server_ifname()])
        .expect("ip link show");
    out.contains("xdp")
}

#[test]
fn ctrl_c_detaches_xdp_and_removes_pins() {
    let test = "ctrl_c_detaches_xdp_and_removes_pins";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let topo = match Topology::new("bin") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pin_dir = format!("/sys/fs/bpf/devplane-bin-{}", std::process::id());
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-server-{}.toml", std::process::id())));
    std::fs::write(
        &cfg.0,
        format!(
            r#"
[server]
id = 3
interface = "{ifname}"
workers = [0]
pin_dir = "{pin_dir}"

[[clients]]
id = 7
address = "{client}"

[[models]]
id = 42
kind = "counter"
worker = 0
"#,
            ifname = topo.server_ifname(),
            client = topo.client_ip(),
        ),
    )
    .unwrap();
    // nsenter --net, not `ip netns exec`: the latter also gives the child a
    // private mount namespace with a fresh /sys, so its bpffs pins would be
    // invisible here (and to dpctl).
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topo.server_netns()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_devplane-server"))
        .arg("--config")
        .arg(&cfg.0)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devplane-server");
    let mut guard = ChildGuard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().expect("a start-up line").unwrap();
    assert!(first.contains("XDP attached (Driver mode)"), "{first}");
    assert!(xdp_attached(&topo), "XDP not attached");
    for map in ["DP_ROUTES", "DP_CLIENTS", "DP_VMS", "DP_STATS", "DP_CONFIG"] {
        assert!(
            std::path::Path::new(&pin_dir).join(map).exists(),
            "{map} not pinned"
        );
    }
    let pid = guard.0.as_ref().unwrap().id() as i32;
    // nsenter execs the server, so the pid is the server's.
    // SAFETY: sends SIGINT to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "server ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    guard.0 = None;
    assert!(status.success(), "exit status {status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter().any(|l| l.starts_with("worker 0: rx")),
        "no counters printed: {rest:?}"
    );
    assert!(!xdp_attached(&topo), "XDP still attached after Ctrl-C");
    assert!(
        !std::path::Path::new(&pin_dir).exists(),
        "pinned maps left behind"
    );
}

#[test]
fn a_bad_configuration_is_a_one_line_error() {
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-bad-{}.toml", std::process::id())));
    std::fs::write(
        &cfg.0,
        "[server]\nid = 1\nmode = \"socket\"\nworkers = [0]\n\n[[models]]\nid = 5\nkind = \"null\"\nworker = 3\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_devplane-server"))
        .arg("--config")
        .arg(&cfg.0)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("model 5") && err.contains("worker 3"), "{err}");
    let missing = Command::new(env!("CARGO_BIN_EXE_devplane-server"))
        .args(["--config", "/nonexistent/devplane.toml"])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/devplane.toml"));
}
