//! The real `devplane-server` binary killed with `kill -9` while guests
//! write to its counters, then started again: the client engine resends
//! with back-off until the new server answers (its horizon, 10 s by
//! default, covers a restart), nothing fails, and every write not
//! acknowledged by the killed server is applied exactly once by the new one
//! (its counter, read by the guest at the end, is the writes left over).
//! One guest writes synchronously, one posted; the server is killed twice.
//!
//! The test runs the binary built beside this test (`target/<profile>/
//! devplane-server`, built by `cargo nextest run --workspace`); when it is
//! missing it builds it with the cargo that built the test.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::guests;
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuSpec, VmSpec};

const PORT: u16 = 7700;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const HV: u32 = 2;
const PIO_BASE: u16 = 0x500;
/// Writes of the synchronous guest and of the posted one: enough that
/// both are still writing at each kill (the test kills as soon as both
/// have made some progress since the last restart), few enough that the
/// synchronous one finishes within seconds on a loaded machine.
const WRITES: [u16; 2] = [4_000, 65_000];
/// Killed this many times.
const KILLS: usize = 2;

fn counter(vm: u32) -> u32 {
    100 + vm
}

/// The `devplane-server` binary beside this test, built if missing.
fn server_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    // target/<profile>/deps/<test> -> target/<profile>/devplane-server
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let bin = dir.join("devplane-server");
    if !bin.exists() {
        let release = dir.file_name().is_some_and(|n| n == "release");
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "devplane-server", "--bin", "devplane-server"]);
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building devplane-server failed: {st}");
    }
    assert!(bin.exists(), "{} missing", bin.display());
    bin
}

struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server process; killed (SIGKILL) and reaped on drop.
struct ServerProc {
    child: Child,
    /// Its stderr after the ready line, drained by a thread (a full pipe
    /// would block the server).
    log: std::thread::JoinHandle<Vec<String>>,
}

impl ServerProc {
    /// Starts the binary in the server namespace; returns once XDP is
    /// attached and its workers run.
    fn start(topo: &Topology, bin: &Path, config: &Path, control: &Path) -> ServerProc {
        // nsenter --net, not `ip netns exec` (which remounts /sys and would
        // hide the pins).
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", topo.server_netns()))
            .arg("--")
            .arg(bin)
            .arg("--config")
            .arg(config)
            .arg("--control")
            .arg(control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start devplane-server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut lines = Vec::new();
            let mut ready = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if line.contains("XDP attached")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
                lines.push(line);
            }
            lines
        });
        let mut proc = ServerProc { child, log };
        if rx.recv_timeout(Duration::from_secs(60)).is_err() {
            let _ = proc.child.kill();
            let _ = proc.child.wait();
            let lines = std::mem::replace(&mut proc.log, std::thread::spawn(Vec::new))
                .join()
                .unwrap_or_default();
            panic!("devplane-server did not attach XDP: {lines:?}");
        }
        proc
    }

    /// `kill -9`, then reaps it.
    fn kill9(mut self) -> Vec<String> {
        // Child::kill is SIGKILL; nsenter execs the server, so the child
        // is the server.
        self.child.kill().expect("kill -9 the server");
        let st = self.child.wait().expect("reap the server");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&st),
            Some(libc::SIGKILL)
        );
        let log = std::mem::replace(&mut self.log, std::thread::spawn(Vec::new));
        log.join().unwrap_or_default()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn server_config(topo: &Topology, pin_dir: &str) -> ServerConfig {
    let mut counters = Vec::new();
    for vm in 1..=2 {
        counters.push(ModelConfig {
            pio_base: Some(PIO_BASE),
            ..ModelConfig::new(counter(vm), "counter", (vm - 1) as usize)
        });
    }
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0, 1],
            pin_dir: Some(pin_dir.into()),
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
        vms: (1..=2)
            .map(|id| VmConfig {
                id,
                client: CLIENT,
                hypervisor: HV,
            })
            .collect(),
        models: counters,
    }
}

/// A client VMM running one VM: a guest writing `WRITES[posted]` times to its
/// counter (posted or not) and reading it back.
fn start_client(topo: &Topology, vm: u32, posted: bool) -> Client {
    let g = guests::pio_loop(PIO_BASE, WRITES[usize::from(posted)]).unwrap();
    let spec = ClientSpec {
        client: CLIENT,
        bind: Some(topo.client_ip().into()),
        servers: vec![ServerSpec {
            addr: SocketAddr::from((topo.server_ip(), PORT)),
            id: SERVER,
            via: None,
        }],
        vms: vec![VmSpec {
            id: vm,
            hypervisor: HV,
            mem_bytes: g.mem_end().next_multiple_of(0x1_0000).max(0x2_0000) as usize,
            images: vec![(g.load_gpa, g.code.clone())],
            vcpus: vec![VcpuSpec {
                entry: g.entry,
                core: None,
            }],
            devices: vec![DeviceSpec {
                space: Space::Pio,
                base: PIO_BASE as u64,
                len: 0x10,
                model: counter(vm),
                posted,
                place: Place::Remote { server: 0 },
            }],
        }],
        // The default engine: its retransmission back-off and horizon are
        // what is under test.
        engine: EngineConfig {
            tag_keys: Some(devplane_testkit::keys::client_ring(CLIENT)),
            ..EngineConfig::default()
        },
        engine_core: None,
        vcpu_spin: 200,
        samples: 0,
        direct: false,
    };
    topo.run(Side::Client, move || Client::start(spec))
        .expect("enter client netns")
        .expect("client starts")
}

fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn answers(c: &Client) -> u64 {
    load(&c.engine().expect("engine").stats().answers)
}

/// Waits until every client has had at least `more` answers since `from`.
fn wait_for_progress(clients: &[&Client], from: &[u64], more: u64) {
    let start = Instant::now();
    while clients
        .iter()
        .zip(from)
        .any(|(c, &f)| answers(c) < f + more)
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the guests made no progress: {:?} answers (from {from:?})",
            clients.iter().map(|c| answers(c)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn writes_survive_kill_9_of_the_server_exactly_once() {
    let test = "writes_survive_kill_9_of_the_server_exactly_once";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let bin = server_bin();
    let topo = match Topology::new("kill") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pid = std::process::id();
    let pin_dir = format!("/sys/fs/bpf/devplane-test-kill-{pid}");
    // A killed server cannot remove its pins.
    let _pins = TempFile(PathBuf::from(&pin_dir));
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-kill-{pid}.toml")));
    std::fs::write(
        &cfg.0,
        server_config(&topo, &pin_dir)
            .to_toml_string()
            .expect("config"),
    )
    .unwrap();

    // A killed server leaves its socket file: the next one takes the path.
    let ctl = TempFile(std::env::temp_dir().join(format!("dp-kill-{pid}.sock")));
    let mut server = ServerProc::start(&topo, &bin, &cfg.0, &ctl.0);
    let mut sync = start_client(&topo, 1, false);
    let mut posted = start_client(&topo, 2, true);
    let mut before = [0u64; 2];
    for k in 1..=KILLS {
        wait_for_progress(&[&sync, &posted], &before, 300);
        let killed_at = Instant::now();
        let log = server.kill9();
        // Answers the killed server sent have arrived by now; nothing
        // answers until the new server runs.
        std::thread::sleep(Duration::from_millis(200));
        before = [answers(&sync), answers(&posted)];
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            [answers(&sync), answers(&posted)],
            before,
            "an answer with no server"
        );
        for ((what, b), n) in ["synchronous", "posted"].iter().zip(before).zip(WRITES) {
            assert!(
                b < n as u64,
                "kill {k}: the {what} guest had finished ({b} answers): {log:?}"
            );
        }
        server = ServerProc::start(&topo, &bin, &cfg.0, &ctl.0);
        eprintln!(
            "kill {k}: answers before it {before:?}; no server for {:?}",
            killed_at.elapsed()
        );
    }
    let rs = sync.wait(Duration::from_secs(120));
    let rp = posted.wait(Duration::from_secs(120));
    for (what, r, c, b, n) in [
        ("synchronous", &rs[0], &sync, before[0], WRITES[0]),
        ("posted", &rp[0], &posted, before[1], WRITES[1]),
    ] {
        // The last server's counter: every write the killed ones had not
        // acknowledged, applied once (a resent write applied twice, or
        // one lost, would show here).
        match &r.exit {
            Ok(VcpuExit::Done(v)) => {
                assert_eq!(
                    *v as u64,
                    n as u64 - b,
                    "{what}: counter of the last server"
                )
            }
            other => panic!("{what} guest did not finish: {other:?}"),
        }
        let e = c.engine().unwrap().stats();
        assert_eq!(load(&e.timeouts), 0, "{what}: requests given up");
        assert!(load(&e.backoffs) > 0, "{what}: no back-off counted");
        assert_eq!(r.failed(), 0, "{what}: failed requests");
        eprintln!(
            "{what}: retransmits {} backoffs {}",
            load(&e.retransmits),
            load(&e.backoffs)
        );
    }
    let _ = server.kill9();
}
