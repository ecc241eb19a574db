//! The `devplane-client` daemon driven by `dpctl vms launch|shutdown|
//! running`: started from a generated CLIENT.toml in the client network
//! namespace, against a real server behind XDP in the server namespace.
//! A VM launched and shut down while another runs leaves the other's
//! writes exactly counted; a guest that finishes by itself is reported
//! stopped; refusals are one line with exit 1 (3 for an unknown VM);
//! Ctrl-C stops every VM, removes the control socket and exits 0. A bad
//! configuration is a one-line error and exit 2.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_testkit::host::ServerThread;
use devplane_testkit::privilege::Capability;
use devplane_testkit::topology::Topology;
use serde_json::Value;

const PORT: u16 = 7702;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const HV: u32 = 2;
/// VM 1's counter, alone on worker 0 (so worker 0 counts VM 1 exactly).
const MODEL_1: u32 = 11;
/// VM 2's counter, on worker 1.
const MODEL_2: u32 = 12;
const PIO_BASE: u16 = 0x500;
/// Writes of each guest: long enough (seconds, in a debug build about
/// 0.4 ms a write) for VM 2 to come and go while VM 1 runs.
const ITERATIONS: u16 = 20000;

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl TempDir {
    /// A fresh `NAME-<pid>` directory under the system's temporary one.
    fn new(name: &str) -> TempDir {
        let d = TempDir(std::env::temp_dir().join(format!("{name}-{}", std::process::id())));
        std::fs::create_dir_all(&d.0).unwrap();
        d
    }
}

/// A bpffs pin directory `PATH-<pid>` of this test process's own.
fn pin_dir(path: &str) -> PathBuf {
    format!("{path}-{}", std::process::id()).into()
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
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

type Lines = std::io::Lines<BufReader<std::process::ChildStderr>>;

fn server_config(topo: &Topology) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0, 1],
            pin_dir: Some(pin_dir("/sys/fs/bpf/devplane-test-client-daemon")),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: Some(devplane_testkit::keys::client_key(CLIENT)),
            id: CLIENT,
            address: topo.client_ip(),
            budget: None,
        }],
        vms: [1, 2]
            .map(|id| VmConfig {
                id,
                client: CLIENT,
                hypervisor: HV,
            })
            .to_vec(),
        models: vec![
            ModelConfig {
                pio_base: Some(PIO_BASE),
                ..ModelConfig::new(MODEL_1, "counter", 0)
            },
            ModelConfig {
                pio_base: Some(PIO_BASE),
                ..ModelConfig::new(MODEL_2, "counter", 1)
            },
        ],
    }
}

fn client_toml(topo: &Topology) -> String {
    let vm = |id: u32, model: u32| {
        format!(
            r#"
[[vms]]
id = {id}
hypervisor = {HV}
guest = {{ kind = "pio-loop", port = {PIO_BASE:#x}, iterations = {ITERATIONS} }}

[[vms.devices]]
space = "pio"
base = {PIO_BASE:#x}
len = 0x10
model = {model}
place = "remote:{SERVER}"
"#
        )
    };
    format!(
        "{}{}{}",
        client_header(topo),
        vm(1, MODEL_1),
        vm(2, MODEL_2)
    )
}

/// The dpctl binary, built beside this test's crate.
fn dpctl_path() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join("dpctl");
    assert!(
        p.exists(),
        "{} not built (cargo build -p devplane-control --bins)",
        p.display()
    );
    p
}

/// Runs dpctl against the client daemon on `sock`.
fn dpctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(dpctl_path())
        .arg("--client-socket")
        .arg(sock)
        .args(args)
        .env_remove("DEVPLANE_SOCKET")
        .output()
        .unwrap()
}

fn ok(sock: &Path, args: &[&str]) -> String {
    let out = dpctl(sock, args);
    assert!(
        out.status.success(),
        "dpctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn ok_json(sock: &Path, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let text = ok(sock, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("dpctl {args:?}: {e}: {text}"))
}

/// Expects exit `code`, nothing on stdout and one `dpctl: ` line with
/// `needle`.
fn fails(sock: &Path, args: &[&str], code: i32, needle: &str) {
    let out = dpctl(sock, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "dpctl {args:?}: {err}");
    assert!(out.stdout.is_empty(), "dpctl {args:?}");
    assert!(
        err.starts_with("dpctl: ") && err.contains(needle),
        "dpctl {args:?}: {err:?} lacks {needle:?}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Stops the daemon with Ctrl-C (nsenter execs it: the pid is the
/// daemon's) and expects exit 0; returns the rest of its stderr.
fn interrupt(mut guard: ChildGuard, lines: Lines) -> Vec<String> {
    let pid = guard.0.as_ref().unwrap().id() as libc::pid_t;
    // SAFETY: sends SIGINT to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let status = guard.0.take().unwrap().wait().unwrap();
    assert!(status.success(), "devplane-client exited with {status}");
    lines.map_while(Result::ok).collect()
}

/// A CLIENT.toml's `[client]` (tagged with the test key) and its one
/// `[[servers]]` entry, the server on the topology's server side.
fn client_header(topo: &Topology) -> String {
    devplane_testkit::keys::client_toml_header(
        CLIENT,
        topo.client_ip(),
        SERVER,
        std::net::SocketAddrV4::new(topo.server_ip(), PORT),
    )
}

/// VM `vm`'s state in `dpctl --json vms running` once it has stopped,
/// polled every 50 ms for at most `within`.
fn until_stopped(sock: &Path, vm: u64, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let list = ok_json(sock, &["vms", "running"]);
        let state = state_of(&list, vm).clone();
        if state["state"] == "stopped" {
            return state;
        }
        assert!(Instant::now() < deadline, "VM {vm} never finished: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The state of VM `vm` in `dpctl --json vms running`.
fn state_of(list: &Value, vm: u64) -> &Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == vm)
        .unwrap_or_else(|| panic!("VM {vm} not listed: {list}"))
}

/// Starts devplane-client in the client namespace; returns it once it
/// listens, with the rest of its stderr (keep it until it exits).
fn start_daemon(topo: &Topology, cfg: &Path, sock: &Path) -> (ChildGuard, Lines) {
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{}", topo.client_netns()))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_devplane-client"))
        .arg("--config")
        .arg(cfg)
        .arg("--control")
        .arg(sock)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devplane-client");
    let mut guard = ChildGuard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("devplane-client exited before listening: {seen:?}"))
            .unwrap();
        let done = line.contains("control socket");
        seen.push(line);
        if done {
            break;
        }
    }
    (guard, lines)
}

#[test]
fn vms_launch_and_shut_down_independently_through_dpctl() {
    let test = "vms_launch_and_shut_down_independently_through_dpctl";
    let Some(topo) = Topology::for_test(
        test,
        &[Capability::Root, Capability::Bpf, Capability::Kvm],
        "cdmn",
    ) else {
        return;
    };
    let server =
        ServerThread::spawn(server_config(&topo), Some(topo.server_netns())).expect("server");
    let dir = TempDir::new("dp-client-daemon");
    let cfg = dir.0.join("client.toml");
    std::fs::write(&cfg, client_toml(&topo)).unwrap();
    let sock = dir.0.join("client.sock");
    let (guard, lines) = start_daemon(&topo, &cfg, &sock);
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "control socket must be owner-only");
    }

    nothing_runs_yet(&sock);
    let started = Instant::now();
    let vm2_remote = vm2_comes_and_goes_while_vm1_runs(&sock, started);
    vm1_finishes_by_itself(&sock, started);
    each_write_was_applied_once(&server, vm2_remote);
    ctrl_c_stops_the_vms_and_exits(&sock, guard, lines);
    server.stop();
}

/// No VM runs before one is launched.
fn nothing_runs_yet(sock: &Path) {
    let list = ok_json(sock, &["vms", "running"]);
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    for vm in [1, 2] {
        assert_eq!(state_of(&list, vm)["state"], "stopped", "{list}");
        assert!(state_of(&list, vm).get("ended").is_none(), "{list}");
    }
}

/// VM 1 runs; VM 2 comes and goes meanwhile. Returns VM 2's remote exits.
fn vm2_comes_and_goes_while_vm1_runs(sock: &Path, started: Instant) -> u64 {
    assert_eq!(
        ok(sock, &["vms", "launch", "1"]),
        "launched VM 1 (1 vCPU)\n"
    );
    fails(sock, &["vms", "launch", "1"], 1, "VM 1 is already running");
    let v = ok_json(sock, &["vms", "launch", "2"]);
    assert_eq!(
        (v["action"].as_str(), v["vm"].as_u64(), v["state"].as_str()),
        (Some("launch"), Some(2), Some("running")),
        "{v}"
    );
    let table = ok(sock, &["vms", "running"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        [
            "VM",
            "HYPERVISOR",
            "STATE",
            "VCPUS",
            "UPTIME",
            "FAILED",
            "ENDED"
        ],
        "{table}"
    );
    assert_eq!(rows[1][..4], ["1", "2", "running", "1"], "{table}");
    assert_eq!(rows[2][..4], ["2", "2", "running", "1"], "{table}");
    assert!(rows[1][4].ends_with('s') && rows[2][6] == "-", "{table}");
    assert!(rows[1][5] == "0" && rows[2][5] == "0", "{table}");
    std::thread::sleep(Duration::from_millis(100));
    let v = ok_json(sock, &["vms", "shutdown", "2"]);
    assert_eq!(v["action"], "shutdown", "{v}");
    assert_eq!(v["state"], "stopped", "{v}");
    assert_eq!(v["by_itself"], false, "{v}");
    assert_eq!(v["ended"][0]["exit"], "stopped", "VM 2 was cut short: {v}");
    let vm2_remote = v["ended"][0]["remote"].as_u64().unwrap();
    assert!(vm2_remote > 0, "VM 2 made no remote access: {v}");
    let list = ok_json(sock, &["vms", "running"]);
    assert_eq!(
        state_of(&list, 1)["state"],
        "running",
        "VM 1 finished within {:?}, before VM 2 was shut down: not the case under test",
        started.elapsed()
    );
    assert_eq!(state_of(&list, 2)["state"], "stopped", "{list}");
    fails(sock, &["vms", "shutdown", "2"], 1, "VM 2 is not running");
    vm2_remote
}

/// VM 1 finishes by itself and is reported stopped; its shutdown reports
/// how it ended, once.
fn vm1_finishes_by_itself(sock: &Path, started: Instant) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let vm1 = loop {
        let list = ok_json(sock, &["vms", "running"]);
        let vm1 = state_of(&list, 1).clone();
        if vm1["state"] == "stopped" {
            break vm1;
        }
        assert!(Instant::now() < deadline, "VM 1 never finished: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "VM 1 ran {ITERATIONS} writes in about {:?}",
        started.elapsed()
    );
    assert_eq!(vm1["by_itself"], true, "{vm1}");
    assert_eq!(vm1["ended"][0]["exit"], "done", "{vm1}");
    // The counter answers the guest's final read with the writes it
    // applied: every write, once.
    assert_eq!(vm1["ended"][0]["value"], ITERATIONS as u64, "{vm1}");
    let table = ok(sock, &["vms", "running"]);
    let row1 = table.lines().nth(1).unwrap();
    assert!(
        row1.contains("stopped") && row1.ends_with(&format!("done {ITERATIONS} (by itself)")),
        "{table}"
    );
    // Its shutdown reports how it ended, once.
    let out = ok(sock, &["vms", "shutdown", "1"]);
    let mut lines_out = out.lines();
    assert_eq!(
        lines_out.next(),
        Some("VM 1 had stopped by itself; freed"),
        "{out}"
    );
    let row: Vec<&str> = lines_out.nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..3], ["0", "done", &ITERATIONS.to_string()], "{out}");
    fails(sock, &["vms", "shutdown", "1"], 1, "VM 1 is not running");
    fails(sock, &["vms", "launch", "9"], 3, "VM 9 is not in");
    fails(sock, &["vms", "shutdown", "9"], 3, "VM 9 is not in");
}

/// The server applied each of VM 1's writes and its read exactly once
/// (worker 0 serves VM 1's model alone); VM 2's writes went to worker 1.
fn each_write_was_applied_once(server: &ServerThread, vm2_remote: u64) {
    let snap = server.snapshot();
    eprintln!("server: {:?}", snap.workers);
    let served = |w: usize| snap.workers[w].records - snap.workers[w].duplicates;
    assert_eq!(served(0), ITERATIONS as u64 + 1, "{:?}", snap.workers);
    assert!(
        served(1) >= vm2_remote.saturating_sub(1) && served(1) < ITERATIONS as u64,
        "VM 2: {vm2_remote} remote exits, {:?}",
        snap.workers
    );
}

/// Ctrl-C stops the running VMs and exits 0, removing the control socket.
fn ctrl_c_stops_the_vms_and_exits(sock: &Path, mut guard: ChildGuard, lines: Lines) {
    ok(sock, &["vms", "launch", "2"]);
    let pid = guard.0.as_ref().unwrap().id() as i32;
    // nsenter execs the daemon, so the pid is the daemon's.
    // SAFETY: sends SIGINT to our own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = guard.0.as_mut().unwrap().try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "devplane-client ignored Ctrl-C"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    guard.0 = None;
    assert!(status.success(), "exit status {status}");
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    assert!(
        rest.iter()
            .any(|l| l.contains("VM 1 stopped by itself")
                && l.contains(&format!("done {ITERATIONS}"))),
        "{rest:?}"
    );
    assert!(
        rest.iter()
            .any(|l| l.contains("VM 2 shut down") && l.contains("stopped")),
        "{rest:?}"
    );
    assert!(!sock.exists(), "control socket left behind");
    fails(sock, &["vms", "running"], 1, "is devplane-client running?");
}

/// VM 3 of the interrupt test: asks its counter (model 13, line 5) for
/// each interrupt and acknowledges it on a local null device.
const IRQ_VM: u32 = 3;
const IRQ_MODEL: u32 = 13;
const IRQ_LINE: u8 = 5;
const IRQ_BASE: u16 = 0x600;
const IRQ_ACK_PORT: u16 = 0x620;
const IRQ_WANT: u16 = 400;
/// Interrupt datagrams the server may resend to the daemon in the test
/// below: 1% of them (see the test for why not zero).
const IRQ_RESEND_BOUND: u64 = IRQ_WANT as u64 / 100;

/// The daemon acknowledges each interrupt in the loop turn that injects
/// it: with nothing lost on the way (veth), every interrupt reaches the
/// guest once and the server resends at most [`IRQ_RESEND_BOUND`] of the
/// 400 interrupt datagrams (it resends one whose acknowledgement is later
/// than its smoothed ack round trip allows, at least 5 ms). The guest
/// asks for each interrupt with a synchronous write, so the interrupt
/// arrives while its vCPU waits for that write's answer on its own lane
/// and is injected and acknowledged by the vCPU's thread itself (issue 14
/// item 7: 9-32 ms before, 5-18 resends of each; then 53-56 of 400).
///
/// Why not zero: traced (monotonic clock in both processes, 400
/// interrupts, load average 10 on the 2-core machine), the client took
/// p50 30 us, p90 90 us from the server's send to its acknowledgement
/// sent (the veth trip included: 376 of 400 taken on the vCPU's
/// thread, 24 on the engine thread), and the server took p50 2 us from
/// that send to processing the acknowledgement, but 13 of 400 acks waited
/// over 1 ms and 6 over 5 ms (up to 18 ms) on the server side of the
/// wire: the worker (service p99 7 ms in the same run) or the veth
/// softirq not scheduled. Such stalls made 2 resends of 400. A host that
/// stalls a thread longer than the 5 ms floor is not something the daemon
/// can acknowledge around; more than 1% resent means acknowledgements are
/// late by design again.
#[test]
fn interrupts_are_acknowledged_at_once() {
    let test = "interrupts_are_acknowledged_at_once";
    let Some(topo) = Topology::for_test(
        test,
        &[Capability::Root, Capability::Bpf, Capability::Kvm],
        "cdirq",
    ) else {
        return;
    };
    let mut cfg = server_config(&topo);
    cfg.server.pin_dir = Some(pin_dir("/sys/fs/bpf/devplane-test-client-daemon-irq"));
    cfg.vms.push(VmConfig {
        id: IRQ_VM,
        client: CLIENT,
        hypervisor: HV,
    });
    cfg.models.push(ModelConfig {
        pio_base: Some(IRQ_BASE),
        line: Some(u32::from(IRQ_LINE)),
        vm: Some(IRQ_VM),
        ..ModelConfig::new(IRQ_MODEL, "counter", 0)
    });
    let server = ServerThread::spawn(cfg, Some(topo.server_netns())).expect("server");
    let dir = TempDir::new("dp-client-daemon-irq");
    let file = dir.0.join("client.toml");
    let trigger = IRQ_BASE + devplane_devmodels::counter::REG_IRQ as u16;
    std::fs::write(
        &file,
        format!(
            r#"{header}
[[vms]]
id = {IRQ_VM}
hypervisor = {HV}
guest = {{ kind = "irq-chain", line = {IRQ_LINE}, want = {IRQ_WANT}, ack_port = {IRQ_ACK_PORT:#x}, trigger_port = {trigger:#x} }}

[[vms.devices]]
space = "pio"
base = {IRQ_BASE:#x}
len = 0x20
model = {IRQ_MODEL}
place = "remote:{SERVER}"

[[vms.devices]]
space = "pio"
base = {IRQ_ACK_PORT:#x}
len = 4
model = 99
place = "local:null"
"#,
            header = client_header(&topo),
        ),
    )
    .unwrap();
    let sock = dir.0.join("client.sock");
    let (_guard, _lines) = start_daemon(&topo, &file, &sock);
    ok(&sock, &["vms", "launch", &IRQ_VM.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let vm = loop {
        let list = ok_json(&sock, &["vms", "running"]);
        let vm = state_of(&list, IRQ_VM.into()).clone();
        if vm["state"] == "stopped" {
            break vm;
        }
        assert!(
            Instant::now() < deadline,
            "VM {IRQ_VM} never finished: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(vm["ended"][0]["exit"], "done", "{vm}");
    assert_eq!(vm["ended"][0]["value"], u64::from(IRQ_WANT), "{vm}");
    let snap = server.snapshot();
    let sum = |f: fn(&devplane_server::stats::WorkerSnapshot) -> u64| {
        snap.workers.iter().map(f).sum::<u64>()
    };
    eprintln!("server: {:?}", snap.workers);
    assert_eq!(
        sum(|w| w.irqs_sent),
        u64::from(IRQ_WANT),
        "{:?}",
        snap.workers
    );
    assert_eq!(sum(|w| w.irqs_dropped), 0, "{:?}", snap.workers);
    let resent = sum(|w| w.irqs_resent);
    eprintln!("interrupt datagrams resent: {resent} of {IRQ_WANT}");
    assert!(
        resent <= IRQ_RESEND_BOUND,
        "the server resent {resent} interrupt datagrams whose acknowledgement was late \
         (bound {IRQ_RESEND_BOUND}): {:?}",
        snap.workers
    );
    server.stop();
}

#[test]
fn a_bad_client_configuration_is_a_one_line_error() {
    let dir = TempDir::new("dp-client-bad");
    let cfg = dir.0.join("client.toml");
    std::fs::write(
        &cfg,
        "[client]\nid = 7\n\n[[vms]]\nid = 4\nhypervisor = 1\n\
         guest = { kind = \"pio-loop\", port = 0x500, iterations = 5 }\n\n\
         [[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 11\nplace = \"remote:3\"\n",
    )
    .unwrap();
    let run = |cfg: &Path| {
        Command::new(env!("CARGO_BIN_EXE_devplane-client"))
            .arg("--config")
            .arg(cfg)
            .arg("--control")
            .arg(dir.0.join("never.sock"))
            .output()
            .unwrap()
    };
    let out = run(&cfg);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("devplane-client: ") && err.contains("vm 4") && err.contains("server 3"),
        "{err}"
    );
    assert!(!dir.0.join("never.sock").exists());
    let missing = run(Path::new("/nonexistent/client.toml"));
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/client.toml"));
    let help = Command::new(env!("CARGO_BIN_EXE_devplane-client"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--config <CLIENT.TOML>") && text.contains("--control <PATH>"),
        "{text}"
    );
}

/// Issue 14 item 5 for the client daemon: 500 idle connections to its
/// control socket and one peer sending its request a byte a second do not
/// delay `dpctl vms running` (each answered within 3 s; a socket serving
/// one connection at a time with a 5 s read timeout failed this). Needs no
/// privilege: the daemon only listens, no VM runs.
#[test]
fn idle_and_slow_peers_do_not_block_the_client_daemon() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = TempDir::new("dp-client-peers");
    let cfg = dir.0.join("client.toml");
    std::fs::write(
        &cfg,
        "[client]\nid = 7\nbind = \"127.0.0.1\"\n\n[[servers]]\nid = 1\naddress = \"127.0.0.1:7702\"\n\n\
         [[vms]]\nid = 4\nhypervisor = 1\n\
         guest = { kind = \"pio-loop\", port = 0x500, iterations = 5 }\n\n\
         [[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 11\nplace = \"remote:1\"\n",
    )
    .unwrap();
    let sock = dir.0.join("client.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_devplane-client"))
        .arg("--config")
        .arg(&cfg)
        .arg("--control")
        .arg(&sock)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start devplane-client");
    let mut guard = ChildGuard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .expect("devplane-client exited before listening")
            .unwrap();
        if line.contains("control socket") {
            break;
        }
    }
    let idle: Vec<UnixStream> = (0..500)
        .filter_map(|_| UnixStream::connect(&sock).ok())
        .collect();
    assert!(idle.len() >= 64, "only {} connections", idle.len());
    let stop = Arc::new(AtomicBool::new(false));
    let slow = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || {
            let Ok(mut s) = UnixStream::connect(&sock) else {
                return;
            };
            for b in b"\"ListVms\"\n" {
                if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..3 {
        let t = Instant::now();
        let list = ok_json(&sock, &["vms", "running"]);
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "dpctl vms running took {:?} beside idle and slow peers",
            t.elapsed()
        );
        assert_eq!(state_of(&list, 4)["state"], "stopped", "{list}");
    }
    stop.store(true, Ordering::Relaxed);
    drop(idle);
    let _ = slow.join();
    // Still answers once they are gone, and stops cleanly.
    ok_json(&sock, &["vms", "running"]);
    interrupt(guard, lines);
}

/// A VM whose server never answers: each of its requests fails at the
/// configured horizon, and the failures show in `dpctl vms running` while
/// it runs and after it stopped, and in the daemon's report.
#[test]
fn failed_requests_are_reported_by_dpctl_and_the_daemon() {
    let test = "failed_requests_are_reported_by_dpctl_and_the_daemon";
    let Some(topo) = Topology::for_test(test, &[Capability::Root, Capability::Kvm], "cdfl") else {
        return;
    };
    let dir = TempDir::new("dp-client-fail");
    let cfg = dir.0.join("client.toml");
    // No server runs: nothing answers at the server's address.
    let writes = 3;
    std::fs::write(
        &cfg,
        format!(
            r#"
[client]
id = {CLIENT}
bind = "{client}"
horizon_ms = 200

[[servers]]
id = {SERVER}
address = "{server}:{PORT}"

[[vms]]
id = 1
hypervisor = {HV}
guest = {{ kind = "pio-loop", port = {PIO_BASE:#x}, iterations = {writes} }}

[[vms.devices]]
space = "pio"
base = {PIO_BASE:#x}
len = 0x10
model = {MODEL_1}
place = "remote:{SERVER}"
"#,
            client = topo.client_ip(),
            server = topo.server_ip(),
        ),
    )
    .unwrap();
    let sock = dir.0.join("client.sock");
    let (guard, lines) = start_daemon(&topo, &cfg, &sock);
    ok(&sock, &["vms", "launch", "1"]);
    std::thread::sleep(Duration::from_millis(500));
    let list = ok_json(&sock, &["vms", "running"]);
    let running = state_of(&list, 1);
    assert_eq!(running["state"], "running", "{list}");
    let so_far = running["failed"].as_u64().unwrap();
    assert!((1..=writes).contains(&so_far), "{list}");
    let vm = until_stopped(&sock, 1, Duration::from_secs(20));
    // Three writes and the final read failed; the read returned all-ones.
    assert_eq!(vm["failed"], writes + 1, "{vm}");
    assert_eq!(vm["ended"][0]["failed"], writes + 1, "{vm}");
    assert_eq!(vm["ended"][0]["value"], u32::MAX, "{vm}");
    let table = ok(&sock, &["vms", "running"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[5], (writes + 1).to_string(), "{table}");
    let rest = interrupt(guard, lines);
    assert!(
        rest.iter().any(|l| l.contains("VM 1 stopped by itself")
            && l.contains(&format!("{} remote requests FAILED", writes + 1))),
        "{rest:?}"
    );
}

/// A request for `model` from vCPU 5 of VM 1 (a window of its own, fresh
/// sequence number), sealed with `key`, its tag's last byte flipped if
/// `forge`; the answer, if one comes within 300 ms, from the client
/// namespace at the client's address.
fn tagged_request(
    topo: &Topology,
    key: &devplane_wire::tag::TagKey,
    forge: bool,
) -> Option<Vec<u8>> {
    use devplane_wire::{Access, AccessSize, Header, Kind, Record, Request, RequestId, datagram};
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let rec = Record::Request(Request {
        id: RequestId {
            vm: 1,
            hypervisor: HV,
            vcpu: 5,
            seq: devplane_wire::first_seq(),
        },
        access: Access::PioIn {
            port: PIO_BASE,
            size: AccessSize::B4,
        },
        flags: 0,
    });
    let n = datagram::encode(
        &mut buf,
        Header::new(Kind::Request, MODEL_1, SERVER, CLIENT),
        &[rec],
    )
    .unwrap();
    let n = devplane_wire::tag::seal(&mut buf, n, key).unwrap();
    if forge {
        buf[n - 1] ^= 0x10;
    }
    buf.truncate(n);
    let (client, server) = (topo.client_ip(), topo.server_ip());
    topo.run(devplane_testkit::topology::Side::Client, move || {
        let s = std::net::UdpSocket::bind((client, 0)).unwrap();
        s.connect((server, PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        s.send(&buf).unwrap();
        let mut answer = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let got = s.recv(&mut answer).ok()?;
        answer.truncate(got);
        Some(answer)
    })
    .unwrap()
}

/// `dpctl clients rotate-key` three times while VM 1 writes: the server
/// (its control socket) and the client daemon take each new key without
/// a write lost, doubled or refused; afterwards a request sealed with the
/// first key (retired) and one with a forged tag are dropped and counted
/// as `bad_tag`, and one sealed with the database's current key is
/// answered under that key.
#[test]
fn keys_rotate_under_traffic_through_dpctl() {
    use devplane_control::db::{Change, Client as DbClient, Db};
    use devplane_wire::tag::{KeyRing, verify};
    let test = "keys_rotate_under_traffic_through_dpctl";
    let Some(topo) = Topology::for_test(
        test,
        &[Capability::Root, Capability::Bpf, Capability::Kvm],
        "cdkey",
    ) else {
        return;
    };
    let mut cfg = server_config(&topo);
    cfg.server.pin_dir = Some(pin_dir("/sys/fs/bpf/devplane-test-client-daemon-keys"));
    let mut server = ServerThread::spawn(cfg, Some(topo.server_netns())).expect("server");
    let dir = TempDir::new("dp-client-keys");
    let server_sock = dir.0.join("server.sock");
    server.listen(&server_sock).expect("server control socket");
    let first = devplane_testkit::keys::client_key(CLIENT);
    let state = dir.0.join("state");
    Db::open(&state)
        .unwrap()
        .apply(Change::AddClient(DbClient {
            id: CLIENT,
            address: topo.client_ip(),
            budget: None,
            tag_key: Some(first.clone()),
        }))
        .unwrap();
    // VM 1 reads its counter READS times, each a synchronous round trip
    // (at least ~15 us each here, so a second or more): the rotations
    // below (a few tens of ms each) all happen while it runs, whatever the
    // machine's speed, instead of racing a short burst of posted writes.
    const READS: u16 = u16::MAX;
    let pio_loop = format!(r#"kind = "pio-loop", port = {PIO_BASE:#x}, iterations = {ITERATIONS}"#);
    let read_loop =
        format!(r#"kind = "pio-read-loop", port = {PIO_BASE:#x}, iterations = {READS}"#);
    let toml = client_toml(&topo).replacen(&pio_loop, &read_loop, 1);
    assert!(toml.contains("pio-read-loop"), "{toml}");
    let cfg_file = dir.0.join("client.toml");
    std::fs::write(&cfg_file, toml).unwrap();
    let sock = dir.0.join("client.sock");
    let (_guard, _lines) = start_daemon(&topo, &cfg_file, &sock);

    ok(&sock, &["vms", "launch", "1"]);
    std::thread::sleep(Duration::from_millis(50));
    for round in 0..3u64 {
        let out = Command::new(dpctl_path())
            .arg("--state")
            .arg(&state)
            .arg("--socket")
            .arg(&server_sock)
            .arg("--client-socket")
            .arg(&sock)
            .args(["--json", "clients", "rotate-key"])
            .arg(CLIENT.to_string())
            .args(["--grace-ms", "100"])
            .env_remove("DEVPLANE_SOCKET")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rotate-key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["key_id"], round + 2, "{v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let list = ok_json(&sock, &["vms", "running"]);
    assert_eq!(
        state_of(&list, 1)["state"],
        "running",
        "VM 1 finished before the last rotation: not the case under test"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let vm1 = loop {
        let list = ok_json(&sock, &["vms", "running"]);
        let vm1 = state_of(&list, 1).clone();
        if vm1["state"] == "stopped" {
            break vm1;
        }
        assert!(Instant::now() < deadline, "VM 1 never finished: {list}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(vm1["ended"][0]["exit"], "done", "{vm1}");
    // Nothing writes the counter: every read returns its count, 0.
    assert_eq!(vm1["ended"][0]["value"], 0, "{vm1}");
    assert_eq!(vm1["failed"], 0, "{vm1}");
    let snap = server.snapshot();
    let w0 = &snap.workers[0];
    assert_eq!(
        w0.records - w0.duplicates,
        u64::from(READS),
        "{:?}",
        snap.workers
    );
    let bad: u64 = snap.workers.iter().map(|w| w.bad_tag).sum();
    assert_eq!(bad, 0, "a datagram was refused during the rotations");

    let current = Db::open_existing(&state)
        .unwrap()
        .state()
        .client(CLIENT)
        .and_then(|c| c.tag_key.clone())
        .expect("the database holds a key");
    assert_eq!(current.0.id, 4);
    assert!(
        tagged_request(&topo, &first.0, false).is_none(),
        "a request under the retired first key was answered"
    );
    assert!(
        tagged_request(&topo, &current.0, true).is_none(),
        "a request with a forged tag was answered"
    );
    let answer =
        tagged_request(&topo, &current.0, false).expect("the current key's request is answered");
    assert_eq!(verify(&answer, &KeyRing::new(current.0)), Ok(()));
    let bad: u64 = server.snapshot().workers.iter().map(|w| w.bad_tag).sum();
    assert_eq!(bad, 2, "the retired key's and the forged request");
    server.stop();
}

/// A VM launched through `dpctl` with a virtio-blk device whose disk is a
/// `blockstore` on the server (behind XDP, tags on): its guest writes a
/// sector, flushes and reads it back; `dpctl vms running` shows the disk's
/// counters after the VM stopped by itself, and the sector is in the
/// server's image. While a VM with that disk runs (VM 2, a long local
/// loop beside its idle disk), moving the blockstore is refused; once it
/// stopped, the move is taken for its next launch.
#[test]
fn a_vms_remote_disk_is_reported_by_dpctl() {
    const STORE: u32 = 31;
    const STORE_GPA: u64 = 1 << 44;
    const IO_BASE: u16 = 0xc000;
    const SECTOR: u16 = 9;
    const SEED: u8 = 0x3c;
    let test = "a_vms_remote_disk_is_reported_by_dpctl";
    let caps = [Capability::Root, Capability::Bpf, Capability::Kvm];
    let Some(topo) = Topology::for_test(test, &caps, "cdbk") else {
        return;
    };
    let dir = TempDir::new("dp-client-disk");
    let image = dir.0.join("disk.img");
    let mut scfg = server_config(&topo);
    scfg.server.pin_dir = Some(pin_dir("/sys/fs/bpf/devplane-test-client-disk"));
    scfg.models.push(ModelConfig {
        mmio_base: Some(STORE_GPA),
        backing: Some(image.clone()),
        ..ModelConfig::new(STORE, "blockstore", 1)
    });
    let server = ServerThread::spawn(scfg, Some(topo.server_netns())).expect("server starts");
    let cfg = dir.0.join("client.toml");
    // Both VMs' disk: the blockstore on the server.
    let disk_device = format!(
        r#"
[[vms.devices]]
space = "pio"
base = {IO_BASE:#x}
len = 0x80
model = 4
place = "virtio-blk:{SERVER}"
disk = {{ store = {STORE}, gpa = {STORE_GPA:#x}, irq = 5 }}
"#
    );
    std::fs::write(
        &cfg,
        format!(
            r#"{header}
[[vms]]
id = 1
hypervisor = {HV}
guest = {{ kind = "virtio-blk-check", io_base = {IO_BASE:#x}, sector = {SECTOR}, write = true, seed = {SEED} }}
{disk}
[[vms]]
id = 2
hypervisor = {HV}
guest = {{ kind = "pio-read-loop", port = {PIO_BASE:#x}, iterations = 65535 }}

[[vms.devices]]
space = "pio"
base = {PIO_BASE:#x}
len = 0x10
model = 5
place = "local:counter"
{disk}"#,
            disk = disk_device,
            header = client_header(&topo),
        ),
    )
    .unwrap();
    let sock = dir.0.join("client.sock");
    let (guard, lines) = start_daemon(&topo, &cfg, &sock);
    ok(&sock, &["vms", "launch", "1"]);
    let vm = until_stopped(&sock, 1, Duration::from_secs(30));
    assert_eq!(
        vm["ended"][0]["value"],
        devplane_vmm::guests::VIRTIO_CHECK_OK,
        "the guest read back what it wrote: {vm}"
    );
    // Its write, flush and read went as block requests, each completed.
    let disk = &vm["disks"][0];
    assert_eq!(disk["model"], 4, "{vm}");
    assert_eq!(disk["store"], STORE, "{vm}");
    let submitted = disk["submitted"].as_u64().unwrap();
    assert!(submitted >= 3, "{vm}");
    assert_eq!(disk["completed"], submitted, "{vm}");
    assert_eq!(disk["errors"], 0, "{vm}");
    let table = ok(&sock, &["vms", "running"]);
    let (_, disks) = table.split_once("\n\n").expect("a disks table");
    let row: Vec<&str> = disks.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(
        row[..5],
        [
            "1",
            "4",
            &STORE.to_string(),
            &submitted.to_string(),
            &submitted.to_string()
        ],
        "{table}"
    );
    let applied: u64 = server
        .snapshot()
        .workers
        .iter()
        .map(|w| w.bulk_applied)
        .sum();
    assert!(
        applied >= 2,
        "the write and the flush applied on the server"
    );
    // VM 2 runs with the same blockstore as its disk: a move is refused.
    use devplane_control::proto::{Request, Response, call_client};
    let retarget = || {
        call_client(
            &sock,
            &Request::RetargetModel {
                model: STORE,
                server: SERVER,
            },
            Duration::from_secs(5),
        )
        .unwrap()
    };
    ok(&sock, &["vms", "launch", "2"]);
    match retarget() {
        Response::Error { message } => {
            assert!(message.contains("cannot follow a move"), "{message}");
        }
        other => panic!("a running VM's disk moved: {other:?}"),
    }
    until_stopped(&sock, 2, Duration::from_secs(60));
    assert!(
        matches!(retarget(), Response::Retargeted { .. }),
        "a stopped VM's disk is moved for its next launch"
    );
    interrupt(guard, lines);
    server.stop();
    // Written and flushed: in the server's image.
    let all = std::fs::read(&image).unwrap();
    let at = usize::from(SECTOR) * 512;
    let want: Vec<u8> = (0..512u32)
        .map(|i| SEED.wrapping_add((i * 7) as u8))
        .collect();
    assert_eq!(all[at..at + 512], want[..]);
}
