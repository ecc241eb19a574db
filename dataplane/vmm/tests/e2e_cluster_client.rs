//! devplane-client as an agent of the etcd store (a private etcd): it
//! registers under a lease, follows the store's revision, reports a VM
//! placed on it that its configuration cannot build, clears the report
//! when the VM is placed elsewhere, and shows down once killed.
//! (Guests launched through the store: not covered here.)

use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devplane_control::db::{Change, Client, Hypervisor, Vm, VmState};
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

fn agent(s: &mut dyn Store) -> Option<AgentInfo> {
    s.agents()
        .unwrap_or_default()
        .into_iter()
        .find(|a| a.report.kind == AgentKind::Client && a.report.id == 7)
}

fn wait_for(s: &mut dyn Store, what: &str, ok: impl Fn(Option<&AgentInfo>) -> bool) {
    let t = Instant::now();
    loop {
        let a = agent(s);
        if ok(a.as_ref()) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{what}: last report {a:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn client_agent_follows_etcd_and_reports() {
    let Some(etcd) = Etcd::start("client_agent_follows_etcd_and_reports") else {
        return;
    };
    let url = etcd.store_url();
    let mut s = store::open(&url.parse::<StoreUrl>().unwrap()).unwrap();
    let client = |id: u32| {
        Change::AddClient(Client {
            id,
            address: Ipv4Addr::new(10, 0, 0, id as u8),
            budget: None,
            tag_key: None,
        })
    };
    s.apply_batch(&[
        client(7),
        client(8),
        Change::AddHypervisor(Hypervisor { id: 70, client: 7 }),
        Change::AddHypervisor(Hypervisor { id: 80, client: 8 }),
    ])
    .unwrap();
    let pid = std::process::id();
    let cfg = TempFile(std::env::temp_dir().join(format!("dp-cluster-client-{pid}.toml")));
    std::fs::write(&cfg.0, "[client]\nid = 7\n").unwrap();
    let sock = TempFile(std::env::temp_dir().join(format!("dp-cluster-client-{pid}.sock")));
    let mut daemon = Proc(
        Command::new(env!("CARGO_BIN_EXE_devplane-client"))
            .arg("--config")
            .arg(&cfg.0)
            .arg("--control")
            .arg(&sock.0)
            .arg("--store")
            .arg(&url)
            .arg("--lease-ttl-ms")
            .arg("2000")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rev = s.load().unwrap().revision;
    wait_for(&mut *s, "registered", |a| {
        a.is_some_and(|a| a.alive && a.report.applied == rev && a.report.error.is_none())
    });
    // A VM placed here, running, that this daemon cannot build: reported.
    s.apply(&Change::AddVm(Vm {
        id: 1,
        hypervisor: 70,
        client: 7,
        state: VmState::Stopped,
    }))
    .unwrap();
    let rev = s.apply(&Change::SetVmState(1, VmState::Running)).unwrap();
    wait_for(&mut *s, "the unbuildable VM is reported", |a| {
        a.is_some_and(|a| {
            a.report.applied == rev
                && a.report
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("VM 1") && e.contains("[[vms]]"))
        })
    });
    // Placed on client 8: nothing left to do here.
    let rev = s
        .apply(&Change::PlaceVm {
            vm: 1,
            hypervisor: 80,
        })
        .unwrap();
    wait_for(&mut *s, "the report clears", |a| {
        a.is_some_and(|a| a.report.applied == rev && a.report.error.is_none())
    });
    let _ = daemon.0.kill();
    let _ = daemon.0.wait();
    wait_for(&mut *s, "down after its lease", |a| {
        a.is_none_or(|a| !a.alive)
    });
}
