//! End to end, a VM's console on the server (`dpctl vms console`), through
//! the real binaries: `devplane-server` (XDP mode, in the server network
//! namespace) serves a 16550 UART model for VM 1; `devplane-client` (in the
//! client namespace) runs VM 1, a real-mode guest that prints a banner on
//! that remote UART and echoes every byte it receives, taking them on the
//! UART's receive interrupt ([`devplane_vmm::guests::uart_echo`]); `dpctl
//! vms console` runs as operators would, with pipes for the terminal.
//!
//! Shown: the guest's output reaches two viewers (a writer and a read-only
//! one, each also given what the guest printed before it came); typed
//! bytes reach the guest (it echoes them, and counts them: its final
//! report is exactly the number of bytes the writer typed, the read-only
//! viewer's keystrokes excluded); a second writer is refused with a clear
//! error; the console stays attached while the VM is suspended and
//! resumed (keys typed while it is suspended are echoed once it resumes)
//! and while it is live-migrated to another client daemon (the model,
//! and so the console, does not move); Ctrl-] detaches.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::Topology;
use devplane_vmm::guests::UART_ECHO_BANNER;

const PORT: u16 = 7709;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const HV: u32 = 2;
const VM: u32 = 1;
const UART: u32 = 5;
const COM1: u16 = 0x3f8;
const LINE: u32 = 4;

/// Removes a directory tree when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Stops a child when the test ends, passing or not: SIGINT first (a
/// daemon then cleans up: XDP detached, pins and socket removed), then
/// SIGKILL if it has not exited within 10 s.
struct ChildGuard(Option<Child>);

impl ChildGuard {
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.0.take()?;
        // SAFETY: sends SIGINT to our own child (nsenter execs the
        // daemon, so the pid is the daemon's).
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(s)) = c.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        c.wait().ok()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

fn server_toml(topo: &Topology, pin_dir: &str) -> String {
    let cfg = ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0],
            pin_dir: Some(pin_dir.into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 200,
            idle_sleep_us: 200,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: Some(devplane_testkit::keys::client_key(CLIENT)),
            id: CLIENT,
            address: topo.client_ip(),
            budget: None,
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models: vec![ModelConfig {
            pio_base: Some(COM1),
            line: Some(LINE),
            vm: Some(VM),
            ..ModelConfig::new(UART, "uart", 0)
        }],
    };
    toml::to_string(&cfg).expect("server configuration as TOML")
}

fn client_toml(topo: &Topology) -> String {
    format!(
        r#"{header}
[[vms]]
id = {VM}
hypervisor = {HV}
guest = {{ kind = "uart-echo", base = {COM1:#x}, line = {LINE}, stop = {stop} }}

[[vms.devices]]
space = "pio"
base = {COM1:#x}
len = 8
model = {UART}
place = "remote:{SERVER}"
"#,
        header = devplane_testkit::keys::client_toml_header(
            CLIENT,
            topo.client_ip(),
            SERVER,
            std::net::SocketAddrV4::new(topo.server_ip(), PORT),
        ),
        stop = b'~',
    )
}

/// A binary built beside this test's crate (dpctl, devplane-server).
fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built (cargo build -p devplane-control -p devplane-server --bins)",
        p.display()
    );
    p
}

/// Starts a daemon in namespace `netns`; returns it once a line of its
/// stderr contains "control socket" (the rest of its stderr is drained).
fn start_daemon(netns: &str, bin: &Path, args: &[&std::ffi::OsStr]) -> ChildGuard {
    let child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{netns}"))
        .arg("--")
        .arg(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start daemon");
    let mut guard = ChildGuard(Some(child));
    let stderr = guard.0.as_mut().unwrap().stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut seen = Vec::new();
    loop {
        let line = lines
            .next()
            .unwrap_or_else(|| panic!("{} exited before listening: {seen:?}", bin.display()))
            .unwrap();
        let done = line.contains("control socket");
        seen.push(line);
        if done {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    guard
}

struct Sockets {
    server: PathBuf,
    client: PathBuf,
}

fn dpctl(s: &Sockets) -> Command {
    let mut c = Command::new(sibling("dpctl"));
    c.arg("--socket")
        .arg(&s.server)
        .arg("--client-socket")
        .arg(&s.client);
    c
}

fn ok(s: &Sockets, args: &[&str]) -> String {
    let out = dpctl(s).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "dpctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A `dpctl vms console` running with pipes: what it printed so far
/// (stdout: the guest's bytes; stderr: its messages).
struct Console {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
}

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            b.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    buf
}

impl Console {
    fn attach(s: &Sockets, extra: &[&str]) -> Console {
        let mut child = dpctl(s)
            .args(["vms", "console", &VM.to_string()])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dpctl vms console");
        let stdin = child.stdin.take();
        let out = collect(child.stdout.take().unwrap());
        let err = collect(child.stderr.take().unwrap());
        Console {
            child: Some(child),
            stdin,
            out,
            err,
        }
    }

    fn output(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    fn type_in(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(bytes).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits until its output ends with `tail` (after everything it had).
    fn wait_for(&self, what: &str, want: &[u8], within: Duration) {
        let t = Instant::now();
        while t.elapsed() < within {
            if self.output().windows(want.len()).any(|w| w == want) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "{what}: {:?} never came; output {:?}; stderr {:?}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&self.output()),
            self.stderr()
        );
    }

    /// Types the detach key and waits for dpctl to exit.
    fn detach(mut self) -> (std::process::ExitStatus, String) {
        self.type_in(&[0x1d]);
        let mut child = self.child.take().unwrap();
        let t = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "dpctl did not detach: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // Its stderr pipe closes with it.
        std::thread::sleep(Duration::from_millis(50));
        (status, self.stderr())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `dpctl --json vms running`, VM 1's entry.
fn vm_state(s: &Sockets) -> serde_json::Value {
    let list: serde_json::Value =
        serde_json::from_str(&ok(s, &["--json", "vms", "running"])).expect("vms running as JSON");
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| v["vm"] == VM)
        .cloned()
        .unwrap_or_else(|| panic!("VM {VM} not listed: {list}"))
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

#[test]
fn an_operator_console_on_the_servers_uart_through_dpctl() {
    let test = "an_operator_console_on_the_servers_uart_through_dpctl";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let topo = match Topology::new("cons") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let pid = std::process::id();
    let dir = TempDir(std::env::temp_dir().join(format!("dp-console-{pid}")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let pin_dir = format!("/sys/fs/bpf/devplane-test-console-{pid}");
    // Dropped after the server guard: a killed server leaves its pins.
    let _pins = TempDir(PathBuf::from(&pin_dir));
    let server_cfg = dir.0.join("server.toml");
    std::fs::write(&server_cfg, server_toml(&topo, &pin_dir)).unwrap();
    let client_cfg = dir.0.join("client.toml");
    std::fs::write(&client_cfg, client_toml(&topo)).unwrap();
    let s = Sockets {
        server: dir.0.join("server.sock"),
        client: dir.0.join("client.sock"),
    };
    // The live migration's target: a second client daemon (the same
    // client platform, as in e2e_vm_lifecycle).
    let b = Sockets {
        server: s.server.clone(),
        client: dir.0.join("client-b.sock"),
    };
    let mut server = start_daemon(
        topo.server_netns(),
        &sibling("devplane-server"),
        &[
            "--config".as_ref(),
            server_cfg.as_os_str(),
            "--control".as_ref(),
            s.server.as_os_str(),
        ],
    );
    let mut client = start_daemon(
        topo.client_netns(),
        Path::new(env!("CARGO_BIN_EXE_devplane-client")),
        &[
            "--config".as_ref(),
            client_cfg.as_os_str(),
            "--control".as_ref(),
            s.client.as_os_str(),
        ],
    );

    // The writer attaches before the VM runs: it sees the banner as the
    // guest prints it.
    let mut writer = Console::attach(&s, &[]);
    let t = Instant::now();
    while !writer.stderr().contains("console (model") {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "dpctl did not attach: {}",
            writer.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        writer.stderr().contains(&format!(
            "VM {VM}'s console (model {UART} on server {SERVER}); ^] detaches"
        )),
        "{}",
        writer.stderr()
    );
    ok(&s, &["vms", "launch", &VM.to_string()]);
    writer.wait_for("the banner", UART_ECHO_BANNER, Duration::from_secs(20));

    // A read-only viewer that comes later gets the banner from the
    // console's history, then what follows.
    let mut viewer = Console::attach(&s, &["--read-only"]);
    viewer.wait_for(
        "the banner (history)",
        UART_ECHO_BANNER,
        Duration::from_secs(10),
    );
    assert!(viewer.stderr().contains("read-only"), "{}", viewer.stderr());

    // A second writer is refused, clearly.
    let out: Output = dpctl(&s)
        .args(["vms", "console", &VM.to_string()])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with("dpctl: ")
            && err.contains("already has a writer")
            && err.contains("--read-only"),
        "{err}"
    );
    // A VM without a console here, also clearly.
    let out = dpctl(&s)
        .args(["vms", "console", "9", "--read-only"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("VM 9 is not known to server 1"), "{err}");

    // Typed bytes reach the guest, which echoes them to both viewers;
    // the read-only viewer's keystrokes go nowhere.
    viewer.type_in(b"zzz");
    writer.type_in(b"hello");
    writer.wait_for("the echo", b"hello", Duration::from_secs(10));
    viewer.wait_for("the echo (viewer)", b"hello", Duration::from_secs(10));

    // Suspended: the VM's vCPUs and interrupts are held; the console
    // stays attached, and what is typed meanwhile is echoed once the VM
    // resumes.
    ok(&s, &["vms", "suspend", &VM.to_string()]);
    writer.type_in(b"abc");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&writer.output(), b"abc"),
        0,
        "echoed while suspended: {:?}",
        String::from_utf8_lossy(&writer.output())
    );
    ok(&s, &["vms", "resume", &VM.to_string()]);
    writer.wait_for("the echo after resume", b"abc", Duration::from_secs(10));
    viewer.wait_for(
        "the echo after resume (viewer)",
        b"abc",
        Duration::from_secs(10),
    );

    // Live-migrated to another client daemon: the console, on the server
    // with the model, never notices; both viewers go on seeing the guest,
    // and what is typed reaches it where it runs now.
    let mut client_b = start_daemon(
        topo.client_netns(),
        Path::new(env!("CARGO_BIN_EXE_devplane-client")),
        &[
            "--config".as_ref(),
            client_cfg.as_os_str(),
            "--control".as_ref(),
            b.client.as_os_str(),
        ],
    );
    ok(
        &s,
        &[
            "vms",
            "migrate",
            &VM.to_string(),
            "--to-client",
            &CLIENT.to_string(),
            "--to-client-socket",
            b.client.to_str().unwrap(),
        ],
    );
    assert_eq!(vm_state(&s)["state"], "stopped", "freed at the source");
    assert_eq!(vm_state(&b)["state"], "running", "runs on the target");
    writer.type_in(b"xyz");
    writer.wait_for("the echo after migration", b"xyz", Duration::from_secs(10));
    viewer.wait_for(
        "the echo after migration (viewer)",
        b"xyz",
        Duration::from_secs(10),
    );

    // The viewer detaches with Ctrl-].
    let (status, err) = viewer.detach();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("detached from VM 1's console"), "{err}");

    // The stop byte ends the guest, which reports how many bytes it got:
    // the writer's, each once.
    writer.type_in(b"~");
    writer.wait_for(
        "the guest's goodbye",
        b"\r\nbye\r\n",
        Duration::from_secs(10),
    );
    let t = Instant::now();
    let v = loop {
        let v = vm_state(&b);
        if v["state"] == "stopped" {
            break v;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "VM still runs: {v}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let typed = "hello".len() + "abc".len() + "xyz".len() + 1;
    assert_eq!(
        v["ended"][0]["value"].as_u64(),
        Some(typed as u64),
        "the guest did not receive each typed byte once: {v}"
    );
    let all = writer.output();
    assert_eq!(
        count(&all, UART_ECHO_BANNER),
        1,
        "{:?}",
        String::from_utf8_lossy(&all)
    );
    assert_eq!(count(&all, b"hello"), 1);
    assert_eq!(
        count(&all, b"zzz"),
        0,
        "a read-only viewer typed into the guest"
    );

    // The server's counters.
    let stats: serde_json::Value =
        serde_json::from_str(&ok(&s, &["--json", "stats"])).expect("stats as JSON");
    let c = &stats["consoles"][0];
    assert_eq!(c["model"], UART, "{stats}");
    assert_eq!(c["input_bytes"].as_u64(), Some(typed as u64), "{stats}");
    assert_eq!(c["writers_refused"], 1, "{stats}");
    assert_eq!(c["viewers"], 1, "the viewer left: {stats}");
    assert_eq!(c["viewer_dropped_bytes"], 0, "{stats}");

    let (status, err) = writer.detach();
    assert!(status.success(), "{status}: {err}");
    client_b.stop();
    client.stop();
    let status = server.stop().expect("the server ran");
    assert!(status.success(), "devplane-server exit status {status}");
}
