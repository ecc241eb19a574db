//! The cluster with real guests, driven only through the etcd store.
//!
//! Four hosts on one bridge (`testkit::lan`): two client hosts (client
//! platforms 7 and 8, each a `devplane-client` agent), a server host (a
//! `devplane-server` agent, XDP in driver mode) and a store host running
//! etcd on its LAN address. Every placement change is a `dpctl --store`
//! command: no daemon's control socket is used for it (the client
//! sockets are only read, for the guests' results).
//!
//! VM 1's guest writes its remote counter (model 42 on server 1)
//! `WRITES` times and reads the count back. The counter keeps its count
//! across every run, so each run's final read is the total of all runs:
//! `k * WRITES` after the k-th run proves every write of every run was
//! applied exactly once, on the right server, from the right client.
//!
//! 0. `dpctl clients add` gives each client its first key (key 1): the
//!    agents, whose TOML holds none, take it from the store at start (the
//!    guests below run tagged).
//! 1. VM 1 set running: client 7 launches it (read = 1 x WRITES); while
//!    it runs, `rotate-key 7`: no datagram is refused (`bad_tag` 0
//!    at the server), none fails; after the agents' grace period a
//!    request sealed under the retired key is refused and counted, one
//!    under the store's current key is answered.
//! 2. VM 1 placed on client 8's hypervisor: 7 frees it, 8 launches it,
//!    the server takes VM 1 as client 8's (else 8's requests would be
//!    refused) (2 x).
//! 3. Client 8 killed (SIGKILL) and restarted: it re-lists and launches
//!    what the store places on it (3 x).
//! 4. etcd killed and restarted, then VM 1 placed back on client 7: the
//!    agents' watches were lost, they re-list and follow (4 x).
//! 5. `dpctl models forward 42 --owner 2`: the owner server's agent
//!    installs the forward route (the I/O server's MAC from its neighbour
//!    table); VM 1 relaunched (set stopped, then running) sends through
//!    the owner, whose XDP program forwards every request (`forwarded`
//!    counts them) while server 1 answers straight (5 x). `models
//!    unforward 42` while run 6 runs: it finishes straight (the client
//!    agent switches the running guest's path live, requests in flight
//!    are retransmitted on the new path); `models forward` while run 7
//!    runs: it finishes through the owner (6 x, 7 x; part of each run
//!    forwarded).
//! 6. Client 8 killed and left dead: its lease expires and `dpctl status`
//!    shows it down while the others stay up.
//! 7. VM 1 stopped, its model and then the VM removed: the client and
//!    the server apply each revision without error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use devplane_testkit::etcd::Etcd;
use devplane_testkit::lan::{Lan, LanHost};
use devplane_testkit::privilege::{self, Capability};
use serde_json::Value;

const PORT: u16 = 7700;
const SERVER: u32 = 1;
const MODEL: u32 = 42;
const VM: u32 = 1;
const PIO: u16 = 0x500;
/// Writes per guest run. A run must outlast a key rotation's way to the
/// running guest's agent (about 0.3 s here, more on a loaded machine): 6000
/// writes (about 0.35 s) once let the first run end before it arrived on
/// CI, so a run is 30000 (2-4 s here).
const WRITES: u64 = 30000;
/// The agents' lease (the shortest the daemons take).
const TTL_MS: u64 = 2000;
/// How long any convergence may take (a guest run included).
const WITHIN: Duration = Duration::from_secs(40);

/// The client hosts: (platform id, hypervisor id, LAN host index).
const CLIENTS: [(u32, u32, usize); 2] = [(7, 70, 0), (8, 80, 1)];
const SERVER_HOST: usize = 2;
const STORE_HOST: usize = 3;
/// An owner server (platform 2) that forwards model 42 to server 1 when
/// the store says so.
const OWNER: u32 = 2;
const OWNER_HOST: usize = 4;

/// A daemon process: SIGINT on drop (a clean stop: XDP detached, maps
/// unpinned), SIGKILL if it does not stop within 10 s.
struct Daemon {
    child: Option<Child>,
}

impl Daemon {
    fn spawn(host: &LanHost, bin: &Path, args: &[&str]) -> Daemon {
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", host.netns))
            .arg("--")
            .arg(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        Daemon { child: Some(child) }
    }

    /// SIGKILL, as a crash.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        // nsenter execs the daemon: the pid is the daemon's.
        // SAFETY: signals our own child.
        unsafe { libc::kill(c.id() as i32, libc::SIGINT) };
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Removes a directory tree (and a pin directory) when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A binary of the workspace, built beside this test's.
fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(
        p.exists(),
        "{} not built (cargo build -p devplane-server -p devplane-control --bins)",
        p.display()
    );
    p
}

struct Cluster {
    lan: Lan,
    url: String,
    dir: PathBuf,
}

impl Cluster {
    /// `dpctl --store URL ARGS`, run on the store host.
    fn dpctl(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .arg(format!(
                "--net=/var/run/netns/{}",
                self.lan.host(STORE_HOST).netns
            ))
            .arg("--")
            .arg(bin("dpctl"))
            .arg("--store")
            .arg(&self.url)
            .args(args)
            .env_remove("DEVPLANE_SOCKET")
            .env_remove("DEVPLANE_CLIENT_SOCKET")
            .env_remove("DEVPLANE_STATE")
            .output()
            .unwrap()
    }

    /// A store change; returns its revision.
    fn change(&self, args: &[&str]) -> u64 {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.dpctl(&all);
        assert!(
            out.status.success(),
            "dpctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v["revision"].as_u64().unwrap_or_else(|| panic!("{v}"))
    }

    fn status(&self) -> Value {
        let out = self.dpctl(&["--json", "status"]);
        assert!(
            out.status.success(),
            "dpctl status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Waits until `ok` holds for `dpctl status`; panics with the last
    /// one after [`WITHIN`].
    fn wait_status(&self, what: &str, ok: impl Fn(&Value) -> bool) -> Duration {
        let t = Instant::now();
        loop {
            let s = self.status();
            if ok(&s) {
                return t.elapsed();
            }
            assert!(t.elapsed() < WITHIN, "{what}: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every agent of `which` (kind, id) is up and applied
    /// `rev` without error.
    fn converged(&self, what: &str, rev: u64, which: &[(&str, u32)]) -> Duration {
        self.wait_status(what, |s| {
            which.iter().all(|(kind, id)| {
                agent(s, kind, *id).is_some_and(|a| {
                    a["up"] == true && a["applied"].as_u64() >= Some(rev) && a["error"].is_null()
                })
            })
        })
    }

    fn client_socket(&self, client: u32) -> PathBuf {
        self.dir.join(format!("client-{client}.sock"))
    }

    fn start_client(&self, client: u32) -> Daemon {
        let (_, _, host) = CLIENTS.iter().find(|c| c.0 == client).unwrap();
        let sock = self.client_socket(client);
        let _ = std::fs::remove_file(&sock);
        let cfg = self.dir.join(format!("client-{client}.toml"));
        let ttl = TTL_MS.to_string();
        Daemon::spawn(
            self.lan.host(*host),
            &bin("devplane-client"),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--control",
                sock.to_str().unwrap(),
                "--store",
                &self.url,
                "--lease-ttl-ms",
                &ttl,
            ],
        )
    }

    /// VM 1 as client `client`'s `dpctl vms running` shows it.
    fn vm_on(&self, client: u32) -> Option<Value> {
        let out = Command::new(bin("dpctl"))
            .arg("--client-socket")
            .arg(self.client_socket(client))
            .args(["--json", "vms", "running"])
            .env_remove("DEVPLANE_STORE")
            .output()
            .unwrap();
        if !out.status.success() {
            return None;
        }
        let list: Value = serde_json::from_slice(&out.stdout).ok()?;
        list.as_array()?.iter().find(|v| v["vm"] == VM).cloned()
    }

    /// Waits for VM 1's guest on `client` to finish by itself with the
    /// counter reading `want`, no request failed.
    fn guest_done(&self, client: u32, want: u64) -> Duration {
        let t = Instant::now();
        loop {
            let vm = self.vm_on(client);
            if let Some(v) = &vm
                && v["state"] == "stopped"
                && v["ended"][0]["exit"] == "done"
                && v["ended"][0]["value"] == want
            {
                assert_eq!(v["failed"], 0, "{v}");
                return t.elapsed();
            }
            assert!(
                t.elapsed() < WITHIN,
                "VM {VM} on client {client} did not finish with {want}: {vm:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Cluster {
    /// Client 7's key as the store holds it (read with etcdctl).
    fn store_key(&self) -> devplane_wire::tag::TagKey {
        let out = Command::new("nsenter")
            .arg(format!(
                "--net=/var/run/netns/{}",
                self.lan.host(STORE_HOST).netns
            ))
            .arg("--")
            .arg("etcdctl")
            .arg("--endpoints")
            .arg(self.url.trim_start_matches("etcd:"))
            .args([
                "get",
                "--print-value-only",
                "/devplane/v1/d/client/0000000007",
            ])
            .env("ETCDCTL_API", "3")
            .output()
            .expect("etcdctl runs (Debian's etcd-client package)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        devplane_control::config::ClientKey::parse(v["tag_key"].as_str().unwrap())
            .unwrap()
            .0
    }

    /// A server's `dpctl stats` (its control socket: stats only).
    fn stats(&self, sock: &str) -> Value {
        let out = Command::new(bin("dpctl"))
            .arg("--socket")
            .arg(self.dir.join(sock))
            .args(["--json", "stats"])
            .env_remove("DEVPLANE_STORE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The owner's XDP `forwarded` count.
    fn forwarded(&self) -> u64 {
        self.stats("owner.sock")["xdp"]["forwarded"]
            .as_u64()
            .unwrap_or(0)
    }

    /// Stops VM 1 and sets it running again (a relaunch on its client).
    fn relaunch(&self, which: &[(&str, u32)]) {
        let rev = self.change(&["vms", "set-state", &VM.to_string(), "stopped"]);
        self.converged("VM 1 stopped", rev, which);
        let rev = self.change(&["vms", "set-state", &VM.to_string(), "running"]);
        self.converged("VM 1 running again", rev, which);
    }

    /// Stops VM 1 and sets it running again; returns once it runs.
    fn relaunch_running(&self, which: &[(&str, u32)]) {
        let rev = self.change(&["vms", "set-state", &VM.to_string(), "stopped"]);
        self.converged("VM 1 stopped", rev, which);
        let started = Instant::now();
        self.change(&["vms", "set-state", &VM.to_string(), "running"]);
        while self.vm_on(7).is_none_or(|v| v["state"] != "running") {
            assert!(started.elapsed() < WITHIN, "VM 1 never ran again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The server's `bad_tag` count.
    fn bad_tags(&self) -> u64 {
        let v = self.stats("server.sock");
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w["bad_tag"].as_u64().unwrap())
            .sum()
    }

    /// A read of the counter by VM 1's vCPU 5 (a window of its own) from
    /// client 7's host, sealed with `key`: the answer, if one comes within
    /// 300 ms.
    fn sealed_request(&self, key: &devplane_wire::tag::TagKey) -> Option<Vec<u8>> {
        use devplane_wire::{
            Access, AccessSize, Header, Kind, Record, Request, RequestId, datagram,
        };
        let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let rec = Record::Request(Request {
            id: RequestId {
                vm: VM,
                hypervisor: 70,
                vcpu: 5,
                seq: devplane_wire::first_seq(),
            },
            access: Access::PioIn {
                port: PIO,
                size: AccessSize::B4,
            },
            flags: 0,
        });
        let n = datagram::encode(
            &mut buf,
            Header::new(Kind::Request, MODEL, SERVER, 7),
            &[rec],
        )
        .unwrap();
        let n = devplane_wire::tag::seal(&mut buf, n, key).unwrap();
        buf.truncate(n);
        let me = self.lan.host(CLIENTS[0].2);
        let (ip, server) = (me.ip, self.lan.host(SERVER_HOST).ip);
        me.run(move || {
            let s = std::net::UdpSocket::bind((ip, 0)).unwrap();
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
}

fn agent<'a>(status: &'a Value, kind: &str, id: u32) -> Option<&'a Value> {
    status["agents"]
        .as_array()?
        .iter()
        .find(|a| a["kind"] == kind && a["id"] == id)
}

fn client_toml(client: u32, hv: u32, me: &LanHost, server: &LanHost, owner: &LanHost) -> String {
    format!(
        r#"
[client]
id = {client}
bind = "{ip}"

[[servers]]
id = {SERVER}
address = "{server}:{PORT}"

[[servers]]
id = {OWNER}
address = "{owner}:{PORT}"

[[vms]]
id = {VM}
hypervisor = {hv}
guest = {{ kind = "pio-loop", port = {PIO:#x}, iterations = {WRITES} }}

[[vms.devices]]
space = "pio"
base = {PIO:#x}
len = 0x10
model = {MODEL}
place = "remote:{SERVER}"
"#,
        ip = me.ip,
        server = server.ip,
        owner = owner.ip,
    )
}

#[test]
fn guests_follow_the_etcd_store_across_clients_agent_and_etcd_restarts() {
    let test = "guests_follow_the_etcd_store_across_clients_agent_and_etcd_restarts";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let lan = match Lan::new("cgs", &["client", "client2", "server", "store", "owner"]) {
        Ok(l) => l,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the LAN: {e}"));
            return;
        }
    };
    let store_host = lan.host(STORE_HOST).clone();
    let Some(mut etcd) = Etcd::start_in(test, &store_host.netns, store_host.ip) else {
        return;
    };
    let pid = std::process::id();
    let dir = TempDir(std::env::temp_dir().join(format!("dp-cluster-guest-{pid}")));
    std::fs::create_dir_all(&dir.0).unwrap();
    let pin = TempDir(PathBuf::from(format!(
        "/sys/fs/bpf/devplane-test-cluster-guest-{pid}"
    )));
    let owner_pin = TempDir(PathBuf::from(format!(
        "/sys/fs/bpf/devplane-test-cluster-guest-owner-{pid}"
    )));
    let c = Cluster {
        url: etcd.store_url(),
        dir: dir.0.clone(),
        lan,
    };
    let server_host = c.lan.host(SERVER_HOST).clone();

    // The cluster, written with dpctl only.
    for &(client, hv, host) in &CLIENTS {
        let ip = c.lan.host(host).ip.to_string();
        c.change(&["clients", "add", &client.to_string(), "--address", &ip]);
        c.change(&[
            "hypervisors",
            "add",
            &hv.to_string(),
            "--client",
            &client.to_string(),
        ]);
        std::fs::write(
            c.dir.join(format!("client-{client}.toml")),
            client_toml(
                client,
                hv,
                c.lan.host(host),
                &server_host,
                c.lan.host(OWNER_HOST),
            ),
        )
        .unwrap();
    }
    c.change(&[
        "servers",
        "add",
        &SERVER.to_string(),
        "--address",
        &server_host.ip.to_string(),
    ]);
    let owner_host = c.lan.host(OWNER_HOST).clone();
    c.change(&[
        "servers",
        "add",
        &OWNER.to_string(),
        "--address",
        &owner_host.ip.to_string(),
    ]);
    c.change(&["vms", "add", &VM.to_string(), "--hypervisor", "70"]);
    let rev = c.change(&[
        "models",
        "add",
        &MODEL.to_string(),
        "--kind",
        "counter",
        "--server",
        &SERVER.to_string(),
        "--worker",
        "0",
        "--vm",
        &VM.to_string(),
        "--pio-base",
        &format!("{PIO:#x}"),
    ]);

    let ttl = TTL_MS.to_string();
    let spawn_server = |id: u32, host: &LanHost, name: &str, pin: &Path| {
        let cfg = c.dir.join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "[server]\nid = {id}\nport = {PORT}\nmode = \"xdp\"\ninterface = \"{}\"\n\
                 workers = [0]\npin_dir = \"{}\"\n\n[tuning]\nspin_budget = 200\n\
                 idle_sleep_us = 100\nbatch = 64\n",
                host.ifname,
                pin.display()
            ),
        )
        .unwrap();
        let sock = c.dir.join(format!("{name}.sock"));
        Daemon::spawn(
            host,
            &bin("devplane-server"),
            &[
                "--config",
                cfg.to_str().unwrap(),
                "--control",
                sock.to_str().unwrap(),
                "--store",
                &c.url,
                "--lease-ttl-ms",
                &ttl,
            ],
        )
    };
    let server = spawn_server(SERVER, &server_host, "server", &pin.0);
    let owner = spawn_server(OWNER, &owner_host, "owner", &owner_pin.0);
    let c7 = c.start_client(7);
    let mut c8 = c.start_client(8);
    let all = [
        ("server", SERVER),
        ("server", OWNER),
        ("client", 7),
        ("client", 8),
    ];
    let t = c.converged("every agent registers", rev, &all);
    eprintln!("4 agents registered and converged in {t:?}");

    // 0. Client 7's first key, given by `clients add`, from the store.
    let first = c.store_key();
    assert_eq!(first.id, 1);

    // 1. Running, on client 7; its key rotated while it runs.
    let started = Instant::now();
    c.change(&["vms", "set-state", &VM.to_string(), "running"]);
    while c.vm_on(7).is_none_or(|v| v["state"] != "running") {
        assert!(started.elapsed() < WITHIN, "VM 1 never ran on client 7");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rev = c.change(&["clients", "rotate-key", "7"]);
    // The running guest's own agent first (the case under test), then all.
    c.converged("client 7's second key", rev, &[("client", 7)]);
    let on7 = c.vm_on(7).expect("client 7 answers");
    assert_eq!(
        on7["state"], "running",
        "VM 1 finished before the key rotation reached its agent: not the case under test"
    );
    c.converged("client 7's second key everywhere", rev, &all);
    c.guest_done(7, WRITES);
    eprintln!(
        "run 1 on client 7 (a key rotation midway): {WRITES} writes applied once, {:?}",
        started.elapsed()
    );
    assert_eq!(
        c.bad_tags(),
        0,
        "a datagram was refused during the rotation"
    );
    let second = c.store_key();
    assert_eq!(second.id, 2);
    // After the grace period the first key is refused, the second works.
    std::thread::sleep(devplane_control::store::plan::KEY_GRACE + Duration::from_secs(1));
    assert!(
        c.sealed_request(&first).is_none(),
        "a request under the retired key was answered"
    );
    assert_eq!(c.bad_tags(), 1, "the retired key's request is counted");
    let answer = c
        .sealed_request(&second)
        .expect("a request under the store's key is answered");
    assert_eq!(
        devplane_wire::tag::verify(&answer, &devplane_wire::tag::KeyRing::new(second)),
        Ok(())
    );

    // 2. Moved to client 8.
    let rev = c.change(&["vms", "place", &VM.to_string(), "--hypervisor", "80"]);
    c.converged("VM 1 placed on client 8", rev, &all);
    let t = c.guest_done(8, 2 * WRITES);
    eprintln!("run 2 on client 8 after the move: {t:?}");
    let on7 = c.vm_on(7).expect("client 7 answers");
    assert_eq!(on7["state"], "stopped", "{on7}");

    // 3. Client 8's agent killed and restarted: it re-lists and runs what
    // the store places on it.
    c8.kill9();
    let mut c8 = c.start_client(8);
    let t = c.guest_done(8, 3 * WRITES);
    eprintln!("restarted client 8 ran VM 1 again: {t:?}");

    // 4. etcd killed and restarted; then a change: every agent follows.
    etcd.kill();
    std::thread::sleep(Duration::from_millis(500));
    etcd.restart();
    let rev = c.change(&["vms", "place", &VM.to_string(), "--hypervisor", "70"]);
    let t = c.converged("after the etcd restart", rev, &all);
    eprintln!("every agent followed a change after the etcd restart in {t:?}");
    c.guest_done(7, 4 * WRITES);

    // 5. Through the owner, then straight again.
    let rev = c.change(&[
        "models",
        "forward",
        &MODEL.to_string(),
        "--owner",
        &OWNER.to_string(),
    ]);
    c.converged("model 42 forwarded by the owner", rev, &all);
    let before = c.forwarded();
    c.relaunch(&all);
    let t = c.guest_done(7, 5 * WRITES);
    let through = c.forwarded() - before;
    eprintln!("run 5 through the owner: {through} requests forwarded, {t:?}");
    assert!(
        through > WRITES,
        "the owner forwarded {through} requests of a run of {WRITES} writes"
    );
    // Under traffic: forwarded -> direct midway through run 6, direct ->
    // forwarded midway through run 7.
    for (run, args, to) in [
        (6, vec!["models", "unforward", "42"], "direct"),
        (
            7,
            vec!["models", "forward", "42", "--owner", "2"],
            "through the owner",
        ),
    ] {
        let before = c.forwarded();
        c.relaunch_running(&all);
        let rev = c.change(&args);
        c.converged("the placement changed", rev, &[("client", 7)]);
        let on7 = c.vm_on(7).expect("client 7 answers");
        assert_eq!(
            on7["state"], "running",
            "run {run} ended before its placement changed: not the case under test"
        );
        c.converged("the placement changed", rev, &all);
        let t = c.guest_done(7, run * WRITES);
        let through = c.forwarded() - before;
        eprintln!("run {run}, moved {to} midway: {through} requests forwarded, {t:?}");
        assert!(
            through > 0 && through < WRITES,
            "run {run} (moved {to} midway): the owner forwarded {through} of {WRITES}+1"
        );
    }
    // Forwarded still: straight again for the rest.
    let rev = c.change(&["models", "unforward", &MODEL.to_string()]);
    c.converged("model 42 no longer forwarded", rev, &all);

    // 6. Client 8 dies: its lease expires, it shows down, others up.
    c8.kill9();
    let t = c.wait_status("client 8's lease expires", |s| {
        agent(s, "client", 8).is_some_and(|a| a["up"] == false)
    });
    eprintln!("client 8 shown down {t:?} after the kill (lease {TTL_MS} ms)");
    let s = c.status();
    for (kind, id) in [("server", SERVER), ("server", OWNER), ("client", 7)] {
        assert_eq!(agent(&s, kind, id).unwrap()["up"], true, "{s:#}");
    }

    // 7. Stopped, then its model and the VM removed.
    let alive = [("server", SERVER), ("server", OWNER), ("client", 7)];
    let rev = c.change(&["vms", "set-state", &VM.to_string(), "stopped"]);
    c.converged("VM 1 stopped", rev, &alive);
    c.change(&["models", "remove", &MODEL.to_string()]);
    let rev = c.change(&["vms", "remove", &VM.to_string()]);
    c.converged("model and VM removed", rev, &alive);
    let s = c.status();
    assert_eq!(
        (s["vms"].as_u64(), s["models"].as_u64()),
        (Some(0), Some(0))
    );
    let on7 = c.vm_on(7).expect("client 7 answers");
    assert_eq!(on7["state"], "stopped", "{on7}");
    // The daemons stop (cleanly) before etcd, etcd before its namespace.
    drop((c7, server, owner));
    drop(etcd);
}
