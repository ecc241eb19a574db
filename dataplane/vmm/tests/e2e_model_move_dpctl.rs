//! End to end through the real binaries: `dpctl models move ID
//! --to-server S` moves a device model between two running
//! `devplane-server`s (one behind XDP, one in socket mode on another port
//! of the server namespace) while a `devplane-client` daemon's guests
//! write to it, one synchronously and one posting its writes. dpctl
//! drives the two-phase hand-over over the three control sockets (lend,
//! stage in pieces, retarget on the client daemon, commit, release).
//! Both models move to the second server and one comes back; every guest
//! checks its count at the end (`checked-writes`): a write lost or
//! applied twice shows. A move whose client daemon is not there is
//! cancelled and leaves the model serving where it was; an unknown
//! model, a move to the server the model is on, a target that is down
//! and a socket of another server than the one named are refused with
//! clear errors before anything moves.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::Topology;

const PORT_A: u16 = 7726;
const PORT_B: u16 = 7727;
const SERVER_A: u32 = 1;
const SERVER_B: u32 = 2;
const CLIENT: u32 = 7;
const HV: u32 = 2;
/// Synchronous writes (VM 1, model 11).
const VM_SYNC: u32 = 1;
/// Posted writes (VM 2, model 12).
const VM_POSTED: u32 = 2;
const SYNC_MODEL: u32 = 11;
const POSTED_MODEL: u32 = 12;
const PIO_BASE: u16 = 0x500;

/// A binary built beside this test (`target/<profile>/NAME`), built with
/// the cargo that built the test if missing.
fn bin(name: &str, package: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let p = dir.join(name);
    if !p.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build");
        assert!(st.success(), "building {name} failed: {st}");
    }
    assert!(p.exists(), "{} missing", p.display());
    p
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A daemon process: stopped with SIGTERM (its clean stop: XDP detached,
/// pins and socket removed), killed if it does not stop, on drop.
struct Daemon(std::process::Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: a signal to our own child's pid.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `program args` in network namespace `netns`; returns once it
/// printed a line containing "control socket" (its stderr is drained
/// after that).
fn start(netns: &str, program: &Path, args: &[&std::ffi::OsStr]) -> Daemon {
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .arg("--")
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
    let mut d = Daemon(child);
    let stderr = d.0.stderr.take().expect("stderr");
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{} exited before listening: {seen:?}", program.display()))
            .expect("stderr line");
        let ready = line.contains("control socket");
        seen.push(line);
        if ready {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    d
}

fn counter(id: u32, worker: usize, base: u16) -> ModelConfig {
    ModelConfig {
        pio_base: Some(base),
        ..ModelConfig::new(id, "counter", worker)
    }
}

fn server_config(topo: &Topology, xdp: bool, pin_dir: &str) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: if xdp { SERVER_A } else { SERVER_B },
            port: if xdp { PORT_A } else { PORT_B },
            mode: if xdp { Mode::Xdp } else { Mode::Socket },
            interface: xdp.then(|| topo.server_ifname().to_string()),
            workers: if xdp { vec![0, 1] } else { vec![0] },
            pin_dir: xdp.then(|| pin_dir.into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            budget: None,
            tag_key: None,
            id: CLIENT,
            address: topo.client_ip(),
        }],
        vms: [VM_SYNC, VM_POSTED]
            .map(|id| VmConfig {
                id,
                client: CLIENT,
                hypervisor: HV,
            })
            .to_vec(),
        models: if xdp {
            vec![
                counter(SYNC_MODEL, 0, PIO_BASE),
                counter(POSTED_MODEL, 1, PIO_BASE + 0x10),
            ]
        } else {
            vec![counter(99, 0, 0x700)]
        },
    }
}

fn client_toml(topo: &Topology, sync: u16, posted: u16) -> String {
    let vm = |id: u32, model: u32, port: u16, n: u16, posted: bool| {
        format!(
            r#"
[[vms]]
id = {id}
hypervisor = {HV}
guest = {{ kind = "checked-writes", port = {port:#x}, iterations = {n} }}

[[vms.devices]]
space = "pio"
base = {port:#x}
len = 0x10
model = {model}
posted = {posted}
place = "remote:{SERVER_A}"
"#
        )
    };
    format!(
        r#"
[client]
id = {CLIENT}
bind = "{client}"

[[servers]]
id = {SERVER_A}
address = "{server}:{PORT_A}"

[[servers]]
id = {SERVER_B}
address = "{server}:{PORT_B}"
{vm1}{vm2}"#,
        client = topo.client_ip(),
        server = topo.server_ip(),
        vm1 = vm(VM_SYNC, SYNC_MODEL, PIO_BASE, sync, false),
        vm2 = vm(VM_POSTED, POSTED_MODEL, PIO_BASE + 0x10, posted, true),
    )
}

/// dpctl with `--socket` and `--client-socket` given.
/// `models move MODEL --to-server TO --to-server-socket SOCK EXTRA...`.
fn mv<'a>(model: &'a str, to: &'a str, sock: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "models",
        "move",
        model,
        "--to-server",
        to,
        "--to-server-socket",
        sock,
    ];
    args.extend_from_slice(extra);
    args
}

struct Dpctl {
    bin: PathBuf,
    client: PathBuf,
}

impl Dpctl {
    fn run(&self, server: &Path, args: &[&str]) -> Output {
        Command::new(&self.bin)
            .arg("--socket")
            .arg(server)
            .arg("--client-socket")
            .arg(&self.client)
            .args(args)
            .output()
            .expect("run dpctl")
    }

    fn ok(&self, server: &Path, args: &[&str]) -> String {
        let out = self.run(server, args);
        assert!(
            out.status.success(),
            "dpctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// Fails with exit code `code` and one line on stderr containing
    /// every needle; returns that line.
    fn fails(&self, server: &Path, args: &[&str], code: i32, needles: &[&str]) -> String {
        let out = self.run(server, args);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(out.status.code(), Some(code), "dpctl {args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        for n in needles {
            assert!(
                err.starts_with("dpctl: ") && err.contains(n),
                "dpctl {args:?}: {err:?} lacks {n:?}"
            );
        }
        err
    }

    fn vm(&self, server: &Path, vm: u32) -> serde_json::Value {
        let text = self.ok(server, &["--json", "vms", "running"]);
        let list: serde_json::Value = serde_json::from_str(&text).expect("json");
        list.as_array()
            .expect("array")
            .iter()
            .find(|v| v["vm"] == vm)
            .cloned()
            .unwrap_or_else(|| panic!("VM {vm} not listed: {list}"))
    }

    /// A server's `records` less `duplicates`, all workers.
    fn applied(&self, server: &Path) -> u64 {
        let text = self.ok(server, &["--json", "stats"]);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let mut n = 0i64;
        for w in v["workers"].as_array().expect("workers") {
            n += w["records"].as_i64().expect("records");
            n -= w["duplicates"].as_i64().expect("duplicates");
        }
        n.max(0) as u64
    }
}

#[test]
fn dpctl_moves_a_model_between_two_server_daemons_under_guest_traffic() {
    let test = "dpctl_moves_a_model_between_two_server_daemons_under_guest_traffic";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let topo = match Topology::new("mvdp") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pid = std::process::id();
    let dir = TempDir(std::env::temp_dir().join(format!("dp-mvdp-{pid}")));
    std::fs::create_dir_all(&dir.0).expect("temp dir");
    let pin_dir = format!("/sys/fs/bpf/devplane-test-mvdp-{pid}");
    let _pins = TempDir(PathBuf::from(&pin_dir));
    let (sock_a, sock_b, sock_c) = (
        dir.0.join("server-a.sock"),
        dir.0.join("server-b.sock"),
        dir.0.join("client.sock"),
    );
    let server_bin = bin("devplane-server", "devplane-server");
    let mut daemons = Vec::new();
    for (xdp, sock) in [(true, &sock_a), (false, &sock_b)] {
        let cfg = dir.0.join(if xdp { "a.toml" } else { "b.toml" });
        std::fs::write(
            &cfg,
            server_config(&topo, xdp, &pin_dir)
                .to_toml_string()
                .expect("server config"),
        )
        .expect("write server config");
        daemons.push(start(
            topo.server_netns(),
            &server_bin,
            &[
                "--config".as_ref(),
                cfg.as_os_str(),
                "--control".as_ref(),
                sock.as_os_str(),
            ],
        ));
    }
    // Enough writes that both guests still run after the moves below on
    // a loaded machine; each checks its count at the end.
    let (sync, posted) = (20000u16, 40000u16);
    let client_cfg = dir.0.join("client.toml");
    std::fs::write(&client_cfg, client_toml(&topo, sync, posted)).expect("write client config");
    let client = start(
        topo.client_netns(),
        Path::new(env!("CARGO_BIN_EXE_devplane-client")),
        &[
            "--config".as_ref(),
            client_cfg.as_os_str(),
            "--control".as_ref(),
            sock_c.as_os_str(),
        ],
    );
    let dp = Dpctl {
        bin: bin("dpctl", "devplane-control"),
        client: sock_c.clone(),
    };
    let b = sock_b.to_str().expect("path");
    let a = sock_a.to_str().expect("path");
    dp.ok(&sock_a, &["vms", "launch", "1"]);
    dp.ok(&sock_a, &["vms", "launch", "2"]);

    // Refused before anything moves, with what was wrong.
    dp.fails(
        &sock_a,
        &mv("77", "2", b, &[]),
        3,
        &["model 77 is not served by server 1"],
    );
    dp.fails(
        &sock_a,
        &mv("11", "1", a, &[]),
        1,
        &["model 11 is on server 1 already"],
    );
    let down = dir.0.join("server-3.sock");
    dp.fails(
        &sock_a,
        &mv("11", "3", down.to_str().expect("path"), &[]),
        1,
        &[
            "target server 3",
            "is down or unknown",
            "no server listening",
        ],
    );
    dp.fails(
        &sock_a,
        &mv("11", "3", b, &[]),
        1,
        &["is server 2, not server 3"],
    );
    // A client daemon that is not there: lent, staged, then cancelled at
    // the retarget; the model serves on A as before.
    let gone = dir.0.join("no-client.sock");
    dp.fails(
        &sock_a,
        &mv(
            "11",
            "2",
            b,
            &["--retarget-client", gone.to_str().expect("path")],
        ),
        1,
        &[
            "model 11 stays on server 1",
            "cancelled at retarget (clients)",
            "no client daemon listening",
        ],
    );

    // A dpctl that died right after lending model 12 (the lend alone,
    // sent here): A keeps it lent, served nowhere. A move to another
    // target is refused, naming the move's own; the move to that target
    // settles it first (B had nothing: cancelled, A serves it again), then
    // moves it. Before, nothing but a restart of A could serve it again.
    let lend = devplane_control::proto::Request::LendModel {
        model: POSTED_MODEL,
        to: Some(SERVER_B),
    };
    match devplane_control::proto::call(&sock_a, &lend, Duration::from_secs(10)) {
        Ok(devplane_control::proto::Response::Lent { .. }) => {}
        r => panic!("lend: {r:?}"),
    }
    dp.fails(
        &sock_a,
        &mv("12", "3", b, &[]),
        1,
        &["model 12 is lent by server 1 to a move not settled yet to server 2"],
    );
    // B restarts while the model is lent to it: had B committed, writes
    // it acknowledged would be lost with it, so settling does not take
    // the model back on B's "gone" without the operator's word.
    drop(daemons.remove(1));
    let b_cfg = dir.0.join("b.toml");
    daemons.push(start(
        topo.server_netns(),
        &server_bin,
        &[
            "--config".as_ref(),
            b_cfg.as_os_str(),
            "--control".as_ref(),
            sock_b.as_os_str(),
        ],
    ));
    dp.fails(
        &sock_a,
        &mv("12", "2", b, &[]),
        1,
        &["and server 2 restarted since", "--accept-rollback"],
    );
    // Both models move to B while both guests write.
    let before_b = dp.applied(&sock_b);
    assert_eq!(
        dp.ok(&sock_a, &mv("12", "2", b, &["--accept-rollback"])),
        "first settled a move left unfinished: move cancelled at commit (target): refused: a \
         move left unfinished was settled: the target had not committed; the model is served \
         by the source as before\n\
         moved model 12 from server 1 to server 2 (worker 0); VM 2 now reaches it there\n"
    );
    let text = dp.ok(&sock_a, &[vec!["--json"], mv("11", "2", b, &[])].concat());
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    assert_eq!(v["result"], "moved", "{v}");
    assert_eq!(v["from"], 1, "{v}");
    assert_eq!(v["to"], 2, "{v}");
    assert_eq!(v["retargeted_vms"], serde_json::json!([1]), "{v}");
    eprintln!("move of model 11: {v}");
    for vm in [VM_SYNC, VM_POSTED] {
        assert_eq!(
            dp.vm(&sock_a, vm)["state"],
            "running",
            "VM {vm} finished before the moves did: the moves were not under traffic"
        );
    }
    // The moved models are B's now: A refuses them, moving one again
    // from A is an unknown model there.
    dp.fails(
        &sock_a,
        &mv("12", "2", b, &[]),
        3,
        &["model 12 is not served by server 1"],
    );
    // The synchronous model comes back to A, driven from B.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        dp.ok(&sock_b, &mv("11", "1", a, &["--to-worker", "1"])),
        "moved model 11 from server 2 to server 1 (worker 1); VM 1 now reaches it there\n"
    );
    for (vm, n) in [(VM_SYNC, sync), (VM_POSTED, posted)] {
        let deadline = Instant::now() + Duration::from_secs(120);
        let v = loop {
            let v = dp.vm(&sock_a, vm);
            if v["state"] == "stopped" {
                break v;
            }
            assert!(Instant::now() < deadline, "VM {vm} never finished: {v}");
            std::thread::sleep(Duration::from_millis(50));
        };
        // The guest's check held (it reports its count only then): every
        // write applied once across the moves.
        assert_eq!(v["ended"][0]["exit"], "done", "VM {vm}: {v}");
        assert_eq!(v["ended"][0]["value"], u64::from(n), "VM {vm}: {v}");
        assert_eq!(v["failed"], 0, "VM {vm}: {v}");
    }
    let on_b = dp.applied(&sock_b) - before_b;
    assert!(on_b > 0, "server B applied nothing");
    eprintln!("server B applied {on_b} writes");
    drop(client);
    drop(daemons);
}
