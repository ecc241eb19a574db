//! The cluster simulation (test only): N server agents and M client
//! agents (no guests, no data path) watching one private etcd holding V
//! VMs and P models. Each server agent projects the store onto its maps
//! (`server_config_of` + `maps::sync` into in-memory maps, as the real
//! server writes its eBPF maps); each client agent computes its plan.
//! Measured: the time from a change (a VM placed on another client, a
//! model moved to another server) to every agent having applied it, the
//! store's size, and the watch traffic.
//!
//! Sizes from the environment (defaults are CI-sized):
//! `DEVPLANE_SIM=servers,clients,vms,models,changes`, e.g.
//! `DEVPLANE_SIM=20,200,16000,80000,20 cargo nextest run -p devplane-testkit
//! --test cluster_sim --no-capture` (docs/CLUSTER_SCALE.md).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplane_control::config::{ServerConfig, ServerSection, Tuning};
use devplane_control::db::{
    Change, Client, Hypervisor, Model, Server, ServerSettings, Vm, VmState, server_config_of,
};
use devplane_control::maps::{MemMaps, sync};
use devplane_control::store::agent::{Agent, AgentConfig, Applied};
use devplane_control::store::plan::client_plan;
use devplane_control::store::{self, AgentKind, StoreUrl};
use devplane_testkit::etcd::Etcd;

fn sizes() -> (u32, u32, u32, u32, u32) {
    let v: Vec<u32> = std::env::var("DEVPLANE_SIM")
        .unwrap_or_else(|_| "4,20,2000,8000,10".into())
        .split(',')
        .map(|x| {
            x.trim()
                .parse()
                .expect("DEVPLANE_SIM=servers,clients,vms,models,changes")
        })
        .collect();
    (v[0], v[1], v[2], v[3], v[4])
}

fn settings(id: u32) -> ServerSettings {
    let base = ServerConfig::from_toml_str(&format!(
        "[server]\nid = {id}\nmode = \"socket\"\nworkers = [{}]\n",
        vec!["0"; 64].join(", ")
    ))
    .unwrap();
    let server: ServerSection = base.server;
    ServerSettings {
        server,
        tuning: Tuning::default(),
        redirect: false,
    }
}

#[test]
fn cluster_sim() {
    let Some(etcd) = Etcd::start("cluster_sim") else {
        return;
    };
    let (n_servers, n_clients, n_vms, n_models, n_changes) = sizes();
    let url: StoreUrl = etcd.store_url().parse().unwrap();
    let mut s = store::open(&url).unwrap();
    let mut changes = Vec::new();
    for c in 1..=n_clients {
        changes.push(Change::AddClient(Client {
            id: c,
            address: Ipv4Addr::from(0x0a00_0000 + c),
            budget: None,
            tag_key: None,
        }));
        changes.push(Change::AddHypervisor(Hypervisor { id: c, client: c }));
    }
    for sv in 1..=n_servers {
        changes.push(Change::AddServer(Server {
            id: sv,
            address: Ipv4Addr::from(0x0b00_0000 + sv),
        }));
    }
    for v in 1..=n_vms {
        let c = 1 + v % n_clients;
        changes.push(Change::AddVm(Vm {
            id: v,
            hypervisor: c,
            client: c,
            state: VmState::Running,
        }));
    }
    for m in 1..=n_models {
        changes.push(Change::AddModel(Model {
            id: m,
            kind: "counter".into(),
            server: 1 + m % n_servers,
            worker: m % 64,
            line: None,
            vm: Some(1 + m % n_vms),
            pio_base: Some(0x500),
            mmio_base: None,
            backing: None,
            via: None,
        }));
    }
    let t = Instant::now();
    let rev = s.apply_batch(&changes).unwrap();
    let import = t.elapsed();
    let size = s.size_bytes().unwrap();
    eprintln!(
        "sim: {n_servers} servers, {n_clients} clients, {n_vms} VMs, {n_models} models: \
         imported {} changes in {import:?}, etcd db {:.1} MiB at revision {rev}",
        changes.len(),
        size as f64 / (1 << 20) as f64
    );

    // The agents.
    let mut agents: Vec<(AgentKind, u32, Agent)> = Vec::new();
    let t = Instant::now();
    for sv in 1..=n_servers {
        let settings = settings(sv);
        let mut maps = MemMaps::new();
        let slot: Arc<Mutex<Option<Arc<Mutex<Applied>>>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let a = Agent::spawn(
            AgentConfig {
                url: url.clone(),
                kind: AgentKind::Server,
                id: sv,
                ttl: Duration::from_secs(30),
                verbose: false,
            },
            move |snap| {
                let cfg = server_config_of(&snap.state, &settings).expect("the sim's state fits");
                sync(&cfg, false, &mut maps).expect("in-memory maps");
                if let Some(a) = slot2.lock().unwrap().as_ref() {
                    *a.lock().unwrap() = Applied {
                        revision: snap.revision,
                        error: None,
                    };
                }
            },
        )
        .unwrap();
        *slot.lock().unwrap() = Some(a.applied());
        agents.push((AgentKind::Server, sv, a));
    }
    for c in 1..=n_clients {
        let slot: Arc<Mutex<Option<Arc<Mutex<Applied>>>>> = Arc::new(Mutex::new(None));
        let slot2 = slot.clone();
        let a = Agent::spawn(
            AgentConfig {
                url: url.clone(),
                kind: AgentKind::Client,
                id: c,
                ttl: Duration::from_secs(30),
                verbose: false,
            },
            move |snap| {
                let known = snap.state.vms.iter().map(|v| v.id).collect();
                let _plan = client_plan(&snap.state, c, &BTreeMap::new(), &known);
                if let Some(a) = slot2.lock().unwrap().as_ref() {
                    *a.lock().unwrap() = Applied {
                        revision: snap.revision,
                        error: None,
                    };
                }
            },
        )
        .unwrap();
        *slot.lock().unwrap() = Some(a.applied());
        agents.push((AgentKind::Client, c, a));
    }
    let all_at = |rev: u64, within: Duration| -> Duration {
        let t = Instant::now();
        loop {
            if agents.iter().all(|(_, _, a)| a.applied_revision() >= rev) {
                return t.elapsed();
            }
            let behind = agents
                .iter()
                .filter(|(_, _, a)| a.applied_revision() < rev)
                .count();
            assert!(
                t.elapsed() < within,
                "{behind} agents behind revision {rev}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let start = all_at(rev, Duration::from_secs(600));
    let listed = agents
        .iter()
        .map(|(_, _, a)| a.watch_stats())
        .fold(0, |n, w| n + w.relists);
    eprintln!(
        "sim: every agent listed and applied in {:?} (from spawn: {:?}), {listed} lists",
        start,
        t.elapsed()
    );

    let before: u64 = agents.iter().map(|(_, _, a)| a.watch_stats().bytes).sum();
    let mut times = Vec::new();
    for i in 0..n_changes {
        let change = if i % 2 == 0 {
            let vm = 1 + i;
            let c = 1 + (vm + 1 + i) % n_clients;
            Change::PlaceVm { vm, hypervisor: c }
        } else {
            let m = 1 + i;
            Change::PlaceModel {
                model: m,
                server: 1 + (m + 1) % n_servers,
                worker: 0,
            }
        };
        let t = Instant::now();
        let rev = s.apply(&change).unwrap();
        let write = t.elapsed();
        let reach = all_at(rev, Duration::from_secs(120));
        times.push((write, write + reach));
    }
    let after: u64 = agents.iter().map(|(_, _, a)| a.watch_stats().bytes).sum();
    let mut total: Vec<Duration> = times.iter().map(|t| t.1).collect();
    total.sort();
    let mut writes: Vec<Duration> = times.iter().map(|t| t.0).collect();
    writes.sort();
    let pct = |v: &[Duration], p: usize| v[(v.len() * p / 100).min(v.len() - 1)];
    eprintln!(
        "sim: {n_changes} changes: dpctl-style write (load + validate + txn) p50 {:?} max {:?}; \
         change -> every agent applied p50 {:?} max {:?}; watch traffic {} bytes per change \
         over {} agents",
        pct(&writes, 50),
        writes.last().unwrap(),
        pct(&total, 50),
        total.last().unwrap(),
        (after - before) / u64::from(n_changes.max(1)),
        agents.len()
    );
    assert_eq!(
        agents.iter().map(|(_, _, a)| a.watch_stats().relists).max(),
        Some(1),
        "no agent had to re-list"
    );
}
