//! The `devplane-server` binary: started from a configuration file in a
//! server network namespace, it attaches XDP and pins its maps; Ctrl-C
//! (SIGINT) stops it cleanly: exit status 0, XDP detached, pinned maps
//! removed, counters printed. A bad configuration is a one-line error and
//! exit status 2.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};

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
    let pin_dir = format!("/sys/fs/bpf/devplane-test-bin-{}", std::process::id());
    // A failed run's killed server cannot remove its pins itself.
    let _pins = TempDir(PathBuf::from(&pin_dir));
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-server-{}.toml", std::process::id())));
    std::fs::write(
        &cfg.0,
        format!(
            r#"
[server]
id = 3
interface = "{ifname}"
workers = [0, 1]
pin_dir = "{pin_dir}"

[[clients]]
id = 7
address = "{client}"

[[vms]]
id = 1
client = 7
hypervisor = 1

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
    let sock = std::env::temp_dir().join(format!("dp-ctl-{}.sock", std::process::id()));
    let _sock = TempFile(sock.clone());
    let args = [
        std::ffi::OsStr::new("--config"),
        cfg.0.as_os_str(),
        std::ffi::OsStr::new("--control"),
        sock.as_os_str(),
    ];
    let (mut guard, _, lines) = start_server(&topo, &args, "XDP attached (Driver mode)");
    assert!(xdp_attached(&topo), "XDP not attached");
    for map in ["DP_ROUTES", "DP_CLIENTS", "DP_VMS", "DP_STATS", "DP_CONFIG"] {
        assert!(
            std::path::Path::new(&pin_dir).join(map).exists(),
            "{map} not pinned"
        );
    }
    idle_and_slow_peers_do_not_block(&sock);
    dpctl_against(&sock);
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
    assert!(!sock.exists(), "control socket left behind");
    // With the server gone, dpctl says so.
    let out = dpctl(&sock, &["stats"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("dpctl: no server listening"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// The dpctl binary, built beside this test's crate.
fn dpctl_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join("dpctl");
    assert!(
        p.exists(),
        "{} not built (cargo build -p devplane-control)",
        p.display()
    );
    p
}

fn dpctl(sock: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(dpctl_path())
        .arg("--socket")
        .arg(sock)
        .arg("--state")
        .arg(std::env::temp_dir().join(format!("dp-state-{}", std::process::id())))
        .args(args)
        .output()
        .unwrap()
}

/// dpctl's daemon commands against the running server.
/// Issue 14 item 5 on the real binary: 500 idle connections and one
/// peer sending a byte every second do not delay `dpctl stats` (before,
/// the socket served one connection at a time with a 5 s read timeout).
fn idle_and_slow_peers_do_not_block(sock: &std::path::Path) {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let idle: Vec<UnixStream> = (0..500)
        .filter_map(|_| UnixStream::connect(sock).ok())
        .collect();
    assert!(idle.len() >= 64, "only {} connections", idle.len());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let slow = {
        let (sock, stop) = (sock.to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let mut s = UnixStream::connect(&sock).unwrap();
            for b in b"{\"Stats\":null}" {
                if stop.load(std::sync::atomic::Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let t = Instant::now();
        let out = dpctl(sock, &["stats"]);
        assert!(
            out.status.success(),
            "dpctl stats beside idle and slow peers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "dpctl stats took {:?} beside idle and slow peers",
            t.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(idle);
    let _ = slow.join();
}

fn dpctl_against(sock: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "control socket must be owner-only");
    let ok = |args: &[&str]| {
        let out = dpctl(sock, args);
        assert!(
            out.status.success(),
            "dpctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let fails = |args: &[&str], needle: &str| {
        let out = dpctl(sock, args);
        assert_eq!(out.status.code(), Some(1), "dpctl {args:?}");
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(err.starts_with("dpctl: ") && err.contains(needle), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    };
    let table = ok(&["stats"]);
    assert!(table.starts_with("server 3\n"), "{table}");
    assert!(
        table.contains("worker") && table.contains("datagrams") && table.contains("service_p99_ns"),
        "{table}"
    );
    let v: serde_json::Value = serde_json::from_str(&ok(&["--json", "stats"])).unwrap();
    assert_eq!(v["server"], 3);
    assert_eq!(v["workers"].as_array().unwrap().len(), 2);
    assert!(v["workers"][0]["records"].is_u64(), "{v}");
    assert!(v["workers"][0]["service_p99_ns"].is_u64(), "{v}");
    assert!(v["xdp"].is_object(), "{v}");
    let watched = ok(&["stats", "--watch", "1", "--count", "2"]);
    assert_eq!(watched.matches("server 3").count(), 2, "{watched}");
    assert_eq!(
        ok(&["models", "move", "42", "--to-worker", "1"]),
        "moved model 42 to worker 1\n"
    );
    let v: serde_json::Value =
        serde_json::from_str(&ok(&["--json", "models", "move", "42", "--to-worker", "0"])).unwrap();
    assert_eq!(
        (v["model"].as_u64(), v["worker"].as_u64()),
        (Some(42), Some(0))
    );
    fails(&["models", "move", "43", "--to-worker", "1"], "model 43");
    fails(&["models", "move", "42", "--to-worker", "5"], "worker 5");
    ok(&["vms", "suspend", "1", "--server-only"]);
    ok(&["vms", "resume", "1", "--server-only"]);
    fails(&["vms", "suspend", "9", "--server-only"], "VM 9");
    fails(&["vms", "migrate", "1", "--client", "99"], "client 99");
    ok(&["vms", "migrate", "1", "--client", "7"]);
    assert_eq!(
        ok(&["tune", "--spin-budget", "10", "--batch", "16"]),
        "tuned\n"
    );
    let bad = dpctl(sock, &["tune", "--batch", "0"]);
    assert_eq!(bad.status.code(), Some(2), "batch 0 is a usage error");
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

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Lines = std::io::Lines<BufReader<std::process::ChildStderr>>;

/// Starts devplane-server in the server namespace; returns it once it has
/// printed the line containing `ready`, with every line it printed so far
/// and the rest of its stderr (keep it until the server exits: a closed
/// stderr makes its last report fail).
///
/// nsenter --net, not `ip netns exec`: the latter also gives the child a
/// private mount namespace with a fresh /sys, so its bpffs pins would be
/// invisible here (and to dpctl).
fn start_server(
    topo: &Topology,
    args: &[&std::ffi::OsStr],
    ready: &str,
) -> (ChildGuard, Vec<String>, Lines) {
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topo.server_netns()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_devplane-server"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devplane-server");
    let mut guard = ChildGuard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("server exited before {ready:?}: {seen:?}"))
            .unwrap();
        let done = line.contains(ready);
        seen.push(line);
        if done {
            break;
        }
    }
    (guard, seen, lines)
}

fn stop_server(mut guard: ChildGuard) {
    let pid = guard.0.as_ref().unwrap().id() as i32;
    // SAFETY: sends SIGINT to our own child.
    unsafe { libc::kill(pid, libc::SIGINT) };
    let status = guard.0.as_mut().unwrap().wait().unwrap();
    guard.0 = None;
    assert!(status.success(), "exit status {status}");
}

#[test]
fn the_database_drives_the_maps_and_a_crash_is_repaired_at_start() {
    use devplane_control::maps::AyaMaps;
    let test = "the_database_drives_the_maps_and_a_crash_is_repaired_at_start";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let topo = match Topology::new("db") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pid = std::process::id();
    let state = TempDir(std::env::temp_dir().join(format!("dp-db-state-{pid}")));
    let pin_dir = format!("/sys/fs/bpf/devplane-test-db-{pid}");
    let sock = std::env::temp_dir().join(format!("dp-db-{pid}.sock"));
    // Dropped after the server guard (declared later): a failed run's
    // killed server cannot remove them itself.
    let _pins = TempDir(PathBuf::from(&pin_dir));
    let _sock = TempFile(sock.clone());
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-db-{pid}.toml")));
    std::fs::write(
        &cfg.0,
        format!(
            "[server]\nid = 3\ninterface = \"{}\"\nworkers = [0]\npin_dir = \"{pin_dir}\"\n",
            topo.server_ifname()
        ),
    )
    .unwrap();
    let o = topo.client_ip().octets();
    let other = |last: u8| format!("{}.{}.{}.{last}", o[0], o[1], o[2]);
    let db = |extra_env: Option<(&str, &str)>, args: &[&str]| {
        let mut c = Command::new(dpctl_path());
        c.arg("--state").arg(&state.0).arg("--socket").arg(&sock);
        if let Some((k, v)) = extra_env {
            c.env(k, v);
        }
        c.args(args).output().unwrap()
    };
    let ok = |args: &[&str]| {
        let out = db(None, args);
        assert!(
            out.status.success(),
            "dpctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let server_ip = topo.server_ip().to_string();
    let client_ip = topo.client_ip().to_string();
    ok(&["init"]);
    ok(&["servers", "add", "3", "--address", &server_ip]);
    ok(&["clients", "add", "7", "--address", &client_ip]);
    ok(&["hypervisors", "add", "1", "--client", "7"]);
    ok(&["vms", "add", "1", "--hypervisor", "1"]);
    ok(&[
        "models", "add", "42", "--kind", "counter", "--server", "3", "--worker", "0",
    ]);

    let args = [
        cfg.0.as_os_str(),
        std::ffi::OsStr::new("--state"),
        state.0.as_os_str(),
        std::ffi::OsStr::new("--control"),
        sock.as_os_str(),
    ];
    let mut full = vec![std::ffi::OsStr::new("--config")];
    full.extend_from_slice(&args);
    let (server, _, _lines) = start_server(&topo, &full, "XDP attached");
    let maps = AyaMaps::from_pinned(std::path::Path::new(&pin_dir)).expect("pinned maps");
    assert!(
        maps.client(7).unwrap().is_some(),
        "client 7 from the database"
    );
    assert!(
        maps.route(42).unwrap().is_some(),
        "model 42 from the database"
    );

    // A change applied to the running server's maps.
    let apply = cfg.0.to_str().unwrap();
    ok(&[
        "--apply-to",
        apply,
        "clients",
        "add",
        "9",
        "--address",
        &other(9),
    ]);
    assert!(maps.client(9).unwrap().is_some(), "client 9 applied live");
    // A model added with --apply-to is instantiated by the running server
    // (a move to its own worker succeeds only for a model it serves),
    // routed in its maps, and dropped again on removal.
    let not_served = db(None, &["models", "move", "43", "--to-worker", "0"]);
    assert!(!not_served.status.success());
    assert!(
        String::from_utf8_lossy(&not_served.stderr).contains("not served"),
        "{}",
        String::from_utf8_lossy(&not_served.stderr)
    );
    ok(&[
        "--apply-to",
        apply,
        "models",
        "add",
        "43",
        "--kind",
        "counter",
        "--server",
        "3",
        "--worker",
        "0",
        "--pio-base",
        "0x600",
    ]);
    assert!(maps.route(43).unwrap().is_some(), "model 43 routed");
    ok(&["models", "move", "43", "--to-worker", "0"]);
    ok(&["--apply-to", apply, "models", "remove", "43"]);
    assert!(maps.route(43).unwrap().is_none(), "model 43 unrouted");
    let gone = db(None, &["models", "move", "43", "--to-worker", "0"]);
    assert!(!gone.status.success(), "model 43 still served");
    // A crash between the database write and the map update.
    let crashed = db(
        Some(("DPCTL_FAULT", "after-db-write")),
        &[
            "--apply-to",
            apply,
            "clients",
            "add",
            "10",
            "--address",
            &other(10),
        ],
    );
    assert_eq!(crashed.status.code(), Some(70));
    assert!(
        maps.client(10).unwrap().is_none(),
        "the crash left the maps behind"
    );
    let status = db(None, &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["needs_repair"], true, "{v}");
    stop_server(server);

    // The next start repairs the maps from the database.
    let (server, lines, _rest) = start_server(&topo, &full, "XDP attached");
    assert!(
        lines.iter().any(|l| l.contains("repairing")),
        "no repair announced: {lines:?}"
    );
    let maps = AyaMaps::from_pinned(std::path::Path::new(&pin_dir)).expect("pinned maps");
    assert!(maps.client(10).unwrap().is_some(), "client 10 repaired");
    assert!(maps.client(9).unwrap().is_some());
    let status = db(None, &["--json", "status"]);
    let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(v["needs_repair"], false, "{v}");
    stop_server(server);
    assert!(!std::path::Path::new(&pin_dir).exists());
}

/// Two socket-mode servers cannot share a port: the second refuses to
/// start, naming the first, instead of joining its `SO_REUSEPORT` group
/// (where it would take part of the traffic, and all of it once the first
/// stops); the first keeps serving.
#[test]
fn a_second_server_on_the_same_port_is_refused() {
    let test = "a_second_server_on_the_same_port_is_refused";
    if !privilege::require(test, &[Capability::Root]) {
        return;
    }
    let topo = match Topology::new("dup") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pid = std::process::id();
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-dup-{pid}.toml")));
    std::fs::write(
        &cfg.0,
        "[server]\nid = 4\nmode = \"socket\"\nport = 7791\nworkers = [0]\n\n\
         [[models]]\nid = 5\nkind = \"null\"\nworker = 0\n",
    )
    .unwrap();
    let sock = |n: u32| std::env::temp_dir().join(format!("dp-dup-{pid}-{n}.sock"));
    let (s1, s2) = (TempFile(sock(1)), TempFile(sock(2)));
    let args = |s: &TempFile| {
        vec![
            std::ffi::OsString::from("--config"),
            cfg.0.clone().into(),
            "--control".into(),
            s.0.clone().into(),
        ]
    };
    let a1 = args(&s1);
    let a1: Vec<&std::ffi::OsStr> = a1.iter().map(|a| a.as_os_str()).collect();
    let (first, _, _lines) = start_server(&topo, &a1, "socket mode on UDP port 7791");
    let first_pid = first.0.as_ref().unwrap().id();
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topo.server_netns()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_devplane-server"))
        .args(args(&s2))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut second = ChildGuard(Some(child));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = second.0.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the second server on the same port started and runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(
        second.0.as_mut().unwrap().stderr.as_mut().unwrap(),
        &mut err,
    )
    .unwrap();
    second.0 = None;
    assert!(!status.success(), "the second server started: {err}");
    assert!(
        err.contains("UDP 0.0.0.0:7791 is already served by")
            && err.contains(&format!("process {first_pid}")),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // The first still answers.
    let out = dpctl(&s1.0, &["stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop_server(first);
}

/// An XDP-mode server refuses an interface that already has an XDP program
/// attached (here another server's), naming it, and leaves that server's
/// program and pinned maps as they were.
#[test]
fn a_second_xdp_server_on_the_interface_is_refused() {
    let test = "a_second_xdp_server_on_the_interface_is_refused";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let topo = match Topology::new("dupx") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pid = std::process::id();
    let pin = |n: u32| format!("/sys/fs/bpf/devplane-test-dupx-{pid}-{n}");
    let (_p1, _p2) = (TempDir(pin(1).into()), TempDir(pin(2).into()));
    let cfg = |n: u32| {
        let f = TempFile(std::env::temp_dir().join(format!("dp-dupx-{pid}-{n}.toml")));
        std::fs::write(
            &f.0,
            format!(
                "[server]\nid = 3\ninterface = \"{}\"\nport = {}\nworkers = [0]\npin_dir = \"{}\"\n\n\
                 [[models]]\nid = 5\nkind = \"null\"\nworker = 0\n",
                topo.server_ifname(),
                7792 + n,
                pin(n)
            ),
        )
        .unwrap();
        f
    };
    let (c1, c2) = (cfg(1), cfg(2));
    let sock = |n: u32| TempFile(std::env::temp_dir().join(format!("dp-dupx-{pid}-{n}.sock")));
    let (s1, s2) = (sock(1), sock(2));
    let args = |c: &TempFile, s: &TempFile| {
        vec![
            std::ffi::OsString::from("--config"),
            c.0.clone().into(),
            "--control".into(),
            s.0.clone().into(),
        ]
    };
    let a1 = args(&c1, &s1);
    let a1: Vec<&std::ffi::OsStr> = a1.iter().map(|a| a.as_os_str()).collect();
    let (first, _, _lines) = start_server(&topo, &a1, "XDP attached");
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topo.server_netns()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_devplane-server"))
        .args(args(&c2, &s2))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second server started: {err}");
    assert!(
        err.contains(&format!(
            "interface {} already has XDP program devplane_xdp",
            topo.server_ifname()
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        !std::path::Path::new(&pin(2)).exists(),
        "the refused server pinned maps"
    );
    // The first is untouched: still attached, its maps pinned, answering.
    assert!(xdp_attached(&topo), "the first server's XDP was detached");
    assert!(std::path::Path::new(&pin(1)).join("DP_ROUTES").exists());
    let out = dpctl(&s1.0, &["stats"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop_server(first);
    assert!(!xdp_attached(&topo), "XDP still attached after Ctrl-C");
}

/// One of the server's /proc/PID/status sizes (`VmRSS`, `VmHWM`), bytes.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let kib: u64 = line[field.len() + 1..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

/// Issue 13 item 2 on the real binary: a registered tenant (the worst
/// sender: it passes XDP and ownership) floods the server with every
/// shape of traffic that made state before the issue (a window per
/// (VM, vCPU) it names, far-ahead numbers, foreign VMs, a new interrupt
/// port per datagram, interrupts never acknowledged), and the server's
/// peak resident memory grows by less than the bound the database gives:
/// 2 VMs × 256 vCPU windows × 256 answers × ~32 bytes = 4 MiB of windows
/// per worker (two workers), 4096 held interrupts and 65,536 peer entries
/// per worker (under 1 MiB each): 24 MiB with the allocator's slack. The
/// code before the issue made a window for each of the 2 × 65,536
/// (VM, vCPU) pairs sent here (about 12 KiB each once used: over 1 GiB).
/// The counters show each limit was hit.
#[test]
fn a_tenants_flood_cannot_grow_the_server_beyond_its_bound() {
    use devplane_wire::{
        Access, AccessSize, Datagram, Header, Kind, MAX_DATAGRAM, Record, Request, RequestId,
        datagram,
    };
    let test = "a_tenants_flood_cannot_grow_the_server_beyond_its_bound";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let topo = match Topology::new("mem") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    const PIO: u16 = 0x500;
    let pin_dir = format!("/sys/fs/bpf/devplane-test-mem-{}", std::process::id());
    let _pins = TempDir(PathBuf::from(&pin_dir));
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-mem-{}.toml", std::process::id())));
    std::fs::write(
        &cfg.0,
        format!(
            r#"
[server]
id = 3
interface = "{ifname}"
workers = [0, 1]
pin_dir = "{pin_dir}"

[[clients]]
id = 7
address = "{client}"

[[vms]]
id = 1
client = 7
hypervisor = 1

[[vms]]
id = 2
client = 7
hypervisor = 1

[[models]]
id = 42
kind = "counter"
worker = 0
pio_base = {PIO}
line = 5
vm = 1
"#,
            ifname = topo.server_ifname(),
            client = topo.client_ip(),
        ),
    )
    .unwrap();
    let sock = std::env::temp_dir().join(format!("dp-mem-{}.sock", std::process::id()));
    let _sock = TempFile(sock.clone());
    let args = [
        std::ffi::OsStr::new("--config"),
        cfg.0.as_os_str(),
        std::ffi::OsStr::new("--control"),
        sock.as_os_str(),
    ];
    let (guard, _, _lines) = start_server(&topo, &args, "XDP attached (Driver mode)");
    let pid = guard.0.as_ref().unwrap().id();
    let server = std::net::SocketAddr::from((topo.server_ip(), devplane_wire::DEFAULT_PORT));

    let rec = |vm: u32, vcpu: u16, seq: u64, access: Access| {
        Record::Request(Request {
            id: RequestId {
                vm,
                hypervisor: 1,
                vcpu,
                seq,
            },
            access,
            flags: 0,
        })
    };
    let read = Access::PioIn {
        port: PIO,
        size: AccessSize::B4,
    };
    let raise = Access::PioOut {
        port: PIO + devplane_devmodels::counter::REG_IRQ as u16,
        size: AccessSize::B1,
        data: 1,
    };
    // Sends `recs` in datagrams of 32 records, at most 16 datagrams in
    // flight (answered ones counted; a foreign VM's are not answered, so
    // a short wait stands for the answer): the receive rings must not
    // overflow, or the flood would test the kernel's drops instead.
    let flood = |recs: Vec<Record>, irq_ports: bool| -> u64 {
        topo.run(Side::Client, move || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.connect(server).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let mut buf = vec![0u8; MAX_DATAGRAM];
            let mut answered = 0u64;
            for (i, chunk) in recs.chunks(32).enumerate() {
                let mut h = Header::new(Kind::Request, 42, 3, 7);
                if irq_ports {
                    h = h.with_irq_port(1024 + (i % 60_000) as u16);
                }
                let n = datagram::encode(&mut buf, h, chunk).unwrap();
                s.send(&buf[..n]).unwrap();
                if i % 16 == 15 {
                    let mut r = [0u8; 2048];
                    for _ in 0..16 {
                        match s.recv(&mut r) {
                            Ok(n) if Datagram::parse(&r[..n]).is_ok() => answered += 1,
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
            }
            answered
        })
        .unwrap()
    };
    let stats = || -> serde_json::Value {
        let out = dpctl(&sock, &["--json", "stats"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let total = |v: &serde_json::Value, field: &str| -> u64 {
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                w[field]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no {field}: {w}"))
            })
            .sum()
    };

    // Warm up: every UMEM frame and ring slot used once, one window full,
    // so that what follows measures state, not buffers touched first.
    let warm: Vec<Record> = (1..=20_000u64).map(|s| rec(1, 0, s, read)).collect();
    assert!(flood(warm, false) > 0, "no answer from the server");
    let base = status_bytes(pid, "VmRSS:");

    // Every vCPU id of both VMs, one request each: 256 windows per VM,
    // the rest refused (`window_limit`).
    let spread: Vec<Record> = [1u32, 2]
        .iter()
        .flat_map(|&vm| (0..=u16::MAX).map(move |c| rec(vm, c, 1, read)))
        .collect();
    flood(spread, false);
    // The windows allowed filled to their 256 answers each.
    let fill: Vec<Record> = [1u32, 2]
        .iter()
        .flat_map(|&vm| (0..256u16).flat_map(move |c| (2..=300u64).map(move |s| (vm, c, s))))
        .map(|(vm, c, s)| rec(vm, c, s, read))
        .collect();
    flood(fill, false);
    // Numbers no client can have reached: refused, not adopted.
    let far: Vec<Record> = (0..256u16)
        .map(|c| rec(1, c, u64::MAX - c as u64, read))
        .collect();
    flood(far, false);
    // VMs that are not the tenant's: dropped before any state.
    let foreign: Vec<Record> = (3..40_000u32).map(|vm| rec(vm, 0, 1, read)).collect();
    flood(foreign, false);
    // A new interrupt port on every datagram, and interrupts raised that
    // nobody acknowledges.
    let raises: Vec<Record> = (1_000..40_000u64).map(|s| rec(1, 1, s, raise)).collect();
    flood(raises, true);

    let grown = status_bytes(pid, "VmHWM:").saturating_sub(base);
    let v = stats();
    const BOUND: u64 = 24 << 20;
    assert!(
        grown < BOUND,
        "the server grew by {} MiB under the flood (bound {} MiB): {v}",
        grown >> 20,
        BOUND >> 20
    );
    assert!(total(&v, "window_limit") > 0, "no window limit hit: {v}");
    assert!(
        total(&v, "far_ahead") >= 200,
        "far-ahead numbers not refused: {v}"
    );
    let foreign = total(&v, "foreign_vm") + v["xdp"]["drop_foreign_vm"].as_u64().unwrap_or(0);
    assert!(foreign > 1000, "foreign VMs not dropped: {v}");
    assert!(
        total(&v, "irqs_dropped") + total(&v, "irqs_client_limit") > 0,
        "held interrupts not bounded: {v}"
    );
    eprintln!("server grew by {} KiB under the flood", grown >> 10);
    stop_server(guard);
}
