//! devplane-server as an agent of the etcd store (its own private etcd):
//! it starts from the store, follows changes without its socket being
//! touched, reports each revision it applied (and what it could not
//! apply), converges again after etcd restarts and after it is killed
//! and restarted, and shows down once its lease expires.

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devplane_control::db::{Change, Client, Hypervisor, Model, Server, Vm, VmState};
use devplane_control::store::{self, AgentInfo, AgentKind, Store, StoreUrl};
use devplane_testkit::etcd::Etcd;

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct TempFile(std::path::PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn model(id: u32, worker: u32) -> Model {
    Model {
        id,
        kind: "counter".into(),
        server: 1,
        worker,
        line: None,
        vm: Some(1),
        pio_base: Some(0x500),
        mmio_base: None,
        backing: None,
        via: None,
    }
}

fn server_agent(s: &mut dyn Store) -> Option<AgentInfo> {
    s.agents()
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.report.kind == AgentKind::Server && a.report.id == 1)
}

/// `dpctl --store URL --json status`.
fn dpctl_status(url: &str) -> serde_json::Value {
    let exe = std::env::current_exe().unwrap();
    let dpctl = exe.parent().and_then(|d| d.parent()).unwrap().join("dpctl");
    let out = Command::new(&dpctl)
        .args(["--store", url, "--json", "status"])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (cargo build -p devplane-control)", dpctl.display()));
    assert!(
        out.status.success(),
        "dpctl status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Agent `kind` `id` in `dpctl status`'s JSON.
fn status_agent<'a>(status: &'a serde_json::Value, kind: &str, id: u32) -> &'a serde_json::Value {
    status["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["kind"] == kind && a["id"] == id))
        .unwrap_or_else(|| panic!("no {kind} {id} in dpctl status: {status:#}"))
}

/// Waits until the server's report satisfies `ok`; panics with the last
/// report after `within`.
fn wait_for(
    s: &mut dyn Store,
    within: Duration,
    what: &str,
    ok: impl Fn(Option<&AgentInfo>) -> bool,
) {
    let t = Instant::now();
    loop {
        let a = server_agent(s);
        if ok(a.as_ref()) {
            return;
        }
        assert!(t.elapsed() < within, "{what}: last report {a:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn converged(s: &mut dyn Store, what: &str) -> Duration {
    let rev = s.load().unwrap().revision;
    let t = Instant::now();
    wait_for(s, Duration::from_secs(15), what, |a| {
        a.is_some_and(|a| a.alive && a.report.applied == rev && a.report.error.is_none())
    });
    t.elapsed()
}

fn spawn_server(cfg: &std::path::Path, url: &str, sock: &std::path::Path) -> Proc {
    Proc(
        Command::new(env!("CARGO_BIN_EXE_devplane-server"))
            .arg("--config")
            .arg(cfg)
            .arg("--store")
            .arg(url)
            .arg("--control")
            .arg(sock)
            .arg("--lease-ttl-ms")
            .arg("2000")
            .stdin(Stdio::null())
            .spawn()
            .expect("devplane-server starts"),
    )
}

#[test]
fn server_agent_follows_etcd_and_its_lease_shows_it() {
    let Some(mut etcd) = Etcd::start("server_agent_follows_etcd_and_its_lease_shows_it") else {
        return;
    };
    let url = etcd.store_url();
    let mut s = store::open(&url.parse::<StoreUrl>().unwrap()).unwrap();
    s.apply_batch(&[
        Change::AddClient(Client {
            id: 7,
            address: Ipv4Addr::LOCALHOST,
            budget: None,
            tag_key: None,
        }),
        Change::AddHypervisor(Hypervisor { id: 70, client: 7 }),
        Change::AddVm(Vm {
            id: 1,
            hypervisor: 70,
            client: 7,
            state: VmState::Stopped,
        }),
        Change::AddServer(Server {
            id: 1,
            address: Ipv4Addr::LOCALHOST,
        }),
        Change::AddModel(model(42, 0)),
    ])
    .unwrap();

    let pid = std::process::id();
    let port = 20000 + (pid % 20000) as u16;
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-cluster-{pid}.toml")));
    std::fs::write(
        &cfg.0,
        format!("[server]\nid = 1\nmode = \"socket\"\nport = {port}\nworkers = [0, 0]\n"),
    )
    .unwrap();
    let sock = TempFile(std::env::temp_dir().join(format!("dp-cluster-{pid}.sock")));
    let mut server = spawn_server(&cfg.0, &url, &sock.0);
    let t = converged(&mut *s, "the server registers at the store's revision");
    eprintln!("registered and converged after {t:?}");

    // Changes through the store only: a model added, moved to the other
    // worker, a second VM on it.
    s.apply(&Change::AddModel(model(43, 0))).unwrap();
    converged(&mut *s, "model 43 added");
    s.apply(&Change::PlaceModel {
        model: 42,
        server: 1,
        worker: 1,
    })
    .unwrap();
    let t = converged(&mut *s, "model 42 moved to worker 1");
    eprintln!("a model move reached the server in {t:?}");
    // A change the server cannot follow (it has two workers) is reported,
    // not hidden; put right, it converges.
    s.apply(&Change::PlaceModel {
        model: 43,
        server: 1,
        worker: 5,
    })
    .unwrap();
    let rev = s.load().unwrap().revision;
    wait_for(
        &mut *s,
        Duration::from_secs(15),
        "the bad worker is reported",
        |a| {
            a.is_some_and(|a| {
                a.report
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("worker"))
                    && a.report.applied == rev
            })
        },
    );
    s.apply(&Change::PlaceModel {
        model: 43,
        server: 1,
        worker: 0,
    })
    .unwrap();
    converged(&mut *s, "model 43 back on worker 0");

    // etcd killed and restarted: the agent re-lists and follows.
    etcd.kill();
    std::thread::sleep(Duration::from_millis(500));
    etcd.restart();
    let mut s = store::open(&url.parse::<StoreUrl>().unwrap()).unwrap();
    s.apply(&Change::RemoveModel(43)).unwrap();
    let t = converged(&mut *s, "after an etcd restart");
    eprintln!("converged after the etcd restart in {t:?}");

    // Killed (no clean stop): its lease expires and it shows down, in the
    // store and in what the operator reads (`dpctl status`).
    let shown = dpctl_status(&url);
    assert_eq!(status_agent(&shown, "server", 1)["up"], true, "{shown:#}");
    let _ = server.0.kill();
    let _ = server.0.wait();
    let t = Instant::now();
    wait_for(
        &mut *s,
        Duration::from_secs(15),
        "the killed server's lease expires",
        |a| a.is_none_or(|a| !a.alive),
    );
    eprintln!("shown down {:?} after the kill", t.elapsed());
    let shown = dpctl_status(&url);
    assert_eq!(status_agent(&shown, "server", 1)["up"], false, "{shown:#}");

    // Changed while it was down; restarted, it starts from the store.
    s.apply(&Change::AddModel(model(44, 1))).unwrap();
    let _ = std::fs::remove_file(&sock.0);
    let _server = spawn_server(&cfg.0, &url, &sock.0);
    converged(&mut *s, "the restarted server");
}
