//! The identifier store's two backends behave alike: changes validated and
//! made whole, a revision per change, watches that follow (and re-list
//! after a compacted watch or an etcd restart), agents under leases.
//! etcd tests start their own private etcd ([`Etcd`]).

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use devplane_control::db::{Change, Client, Hypervisor, Model, Server, Vm, VmState};
use devplane_control::store::{self, AgentKind, AgentReport, Store, StoreError, StoreUrl, now_ms};
use devplane_testkit::etcd::Etcd;

fn file_store(test: &str) -> (tempdir::Dir, Box<dyn Store>) {
    let dir = tempdir::Dir::new(test);
    devplane_control::db::Db::open(dir.path()).unwrap();
    let s = store::open(&StoreUrl::File(dir.path().to_path_buf())).unwrap();
    (dir, s)
}

mod tempdir {
    use std::path::{Path, PathBuf};
    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new(test: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "devplane-store-{test}-{}-{}",
                std::process::id(),
                super::now_ms()
            ));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn etcd_store(e: &Etcd) -> Box<dyn Store> {
    store::open(&e.store_url().parse().unwrap()).unwrap()
}

fn client(id: u32) -> Change {
    Change::AddClient(Client {
        id,
        address: Ipv4Addr::new(10, 1, (id >> 8) as u8, id as u8),
        budget: None,
        tag_key: None,
    })
}

fn base() -> Vec<Change> {
    vec![
        client(7),
        Change::AddHypervisor(Hypervisor { id: 70, client: 7 }),
        Change::AddVm(Vm {
            id: 1,
            hypervisor: 70,
            client: 7,
            state: VmState::Stopped,
        }),
        Change::AddServer(Server {
            id: 2,
            address: Ipv4Addr::new(10, 0, 0, 2),
        }),
        Change::AddModel(Model {
            id: 42,
            kind: "counter".into(),
            server: 2,
            worker: 0,
            line: None,
            vm: Some(1),
            pio_base: Some(0x500),
            mmio_base: None,
            backing: None,
            via: None,
        }),
    ]
}

/// Changes are validated and made one at a time; the revision grows with
/// each; a refused change leaves the store as it was.
fn changes_are_validated_and_counted(s: &mut dyn Store) {
    let mut rev = s.load().unwrap().revision;
    for c in base() {
        let r = s.apply(&c).unwrap();
        assert!(r > rev, "revision {r} after {rev}");
        rev = r;
    }
    let snap = s.load().unwrap();
    assert_eq!(snap.revision, rev);
    assert_eq!(snap.state.models.len(), 1);
    // Dangling: a VM on a hypervisor that does not exist.
    let e = s
        .apply(&Change::AddVm(Vm {
            id: 2,
            hypervisor: 99,
            client: 7,
            state: VmState::Stopped,
        }))
        .unwrap_err();
    assert!(matches!(e, StoreError::Db(_)), "{e}");
    // In use: the server owns model 42, the VM receives its interrupts.
    let e = s.apply(&Change::RemoveServer(2)).unwrap_err();
    assert!(e.to_string().contains("owns model 42"), "{e}");
    let e = s.apply(&Change::RemoveVm(1)).unwrap_err();
    assert!(e.to_string().contains("model 42"), "{e}");
    // Not found.
    assert!(s.apply(&Change::RemoveModel(5)).unwrap_err().is_not_found());
    assert_eq!(s.load().unwrap(), snap, "refused changes wrote nothing");
    // Placement changes.
    s.apply(&Change::PlaceModel {
        model: 42,
        server: 2,
        worker: 1,
    })
    .unwrap();
    s.apply(&Change::SetVmState(1, VmState::Running)).unwrap();
    let e = s
        .apply(&Change::PlaceVm {
            vm: 1,
            hypervisor: 71,
        })
        .unwrap_err();
    assert!(e.to_string().contains("hypervisor 71"), "{e}");
    let snap = s.load().unwrap();
    assert_eq!(snap.state.models[0].worker, 1);
    assert_eq!(snap.state.vms[0].state, VmState::Running);
}

/// Two writers adding at once lose nothing.
fn concurrent_writers_lose_nothing(url: &StoreUrl) {
    let before = store::open(url)
        .unwrap()
        .load()
        .unwrap()
        .state
        .clients
        .len();
    let threads: Vec<_> = (0..2u32)
        .map(|t| {
            let url = url.clone();
            std::thread::spawn(move || {
                let mut s = store::open(&url).unwrap();
                for i in 0..15 {
                    s.apply(&client(100 + t * 100 + i)).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let snap = store::open(url).unwrap().load().unwrap();
    assert_eq!(snap.state.clients.len(), before + 30);
}

/// A watcher sees another handle's change promptly.
fn a_watch_follows(url: &StoreUrl) {
    let mut w = store::open(url).unwrap();
    let mut s = store::open(url).unwrap();
    let start = w.watch_start().unwrap().revision;
    let rev = s.apply(&client(9)).unwrap();
    let t = Instant::now();
    let mut seen = None;
    while t.elapsed() < Duration::from_secs(5) {
        if let Some(snap) = w.watch_next(Duration::from_millis(500)).unwrap() {
            seen = Some(snap.clone());
            if snap.revision >= rev {
                break;
            }
        }
    }
    let seen = seen.expect("the watch saw the change");
    assert!(seen.revision > start);
    assert_eq!(seen.revision, rev);
    assert!(seen.state.client(9).is_some());
    assert_eq!(seen, s.load().unwrap(), "the watched copy is the store");
    assert!(w.watch_next(Duration::from_millis(100)).unwrap().is_none());
}

fn agents_report(s: &mut dyn Store) {
    let r = AgentReport {
        kind: AgentKind::Server,
        id: 2,
        applied: 5,
        error: None,
        at_ms: now_ms(),
        ttl_ms: 3000,
    };
    s.report(&r).unwrap();
    let agents = s.agents().unwrap();
    assert_eq!(agents.len(), 1);
    assert!(agents[0].alive);
    assert_eq!(agents[0].report, r);
}

#[test]
fn file_store_validates_watches_and_reports() {
    let (dir, mut s) = file_store("file");
    changes_are_validated_and_counted(&mut *s);
    let url = StoreUrl::File(dir.path().to_path_buf());
    concurrent_writers_lose_nothing(&url);
    a_watch_follows(&url);
    agents_report(&mut *s);
    assert!(s.size_bytes().unwrap() > 0);
}

#[test]
fn etcd_store_validates_watches_and_reports() {
    let Some(e) = Etcd::start("etcd_store_validates_watches_and_reports") else {
        return;
    };
    let mut s = etcd_store(&e);
    changes_are_validated_and_counted(&mut *s);
    let url: StoreUrl = e.store_url().parse().unwrap();
    concurrent_writers_lose_nothing(&url);
    a_watch_follows(&url);
    agents_report(&mut *s);
    assert!(s.size_bytes().unwrap() > 0);
}

/// Each change is one transaction: a change's puts and the meta key move
/// together (one etcd revision), and a bulk import larger than one
/// transaction is still validated whole.
#[test]
fn etcd_bulk_import_is_validated_whole() {
    let Some(e) = Etcd::start("etcd_bulk_import_is_validated_whole") else {
        return;
    };
    let mut s = etcd_store(&e);
    let mut changes: Vec<Change> = (1..=300).map(client).collect();
    // The last change dangles: nothing is written.
    changes.push(Change::AddHypervisor(Hypervisor { id: 1, client: 999 }));
    assert!(s.apply_batch(&changes).is_err());
    assert_eq!(s.load().unwrap().state.clients.len(), 0);
    changes.pop();
    let rev = s.apply_batch(&changes).unwrap();
    let snap = s.load().unwrap();
    assert_eq!(snap.state.clients.len(), 300);
    assert_eq!(snap.revision, rev);
}

/// A watch whose history was compacted away, or whose etcd restarted,
/// re-lists and ends on the store's state.
#[test]
fn etcd_watch_relists_after_compaction_and_restart() {
    let Some(mut e) = Etcd::start("etcd_watch_relists_after_compaction_and_restart") else {
        return;
    };
    let url: StoreUrl = e.store_url().parse().unwrap();
    let mut w = store::open(&url).unwrap();
    let mut s = store::open(&url).unwrap();
    w.watch_start().unwrap();
    let relists = w.watch_stats().relists;
    // Changes the watcher does not read yet, then compaction past them:
    // its stream is cancelled with a compact revision, or (if it read them
    // already) it simply follows.
    let mut rev = 0;
    for id in 1..=20 {
        rev = s.apply(&client(id)).unwrap();
    }
    e.compact(rev);
    let converge = |w: &mut Box<dyn Store>, want: &devplane_control::store::Snapshot| {
        let t = Instant::now();
        loop {
            match w.watch_next(Duration::from_millis(300)) {
                Ok(Some(snap)) if snap == want => return,
                Ok(_) | Err(_) => {}
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the watch did not converge to revision {}",
                want.revision
            );
        }
    };
    let want = s.load().unwrap();
    converge(&mut w, &want);

    // etcd killed and restarted: the stream breaks, the watcher re-lists.
    e.kill();
    // The broken stream shows as an error or a re-list: either is fine.
    let _ = w.watch_next(Duration::from_millis(300));
    e.restart();
    let mut s = store::open(&url).unwrap();
    s.apply(&client(21)).unwrap();
    let want = s.load().unwrap();
    converge(&mut w, &want);
    assert!(
        w.watch_stats().relists > relists,
        "an etcd restart makes the watch re-list ({:?})",
        w.watch_stats()
    );
}

/// An agent that stops reporting (killed: its lease is not revoked)
/// disappears when its lease expires.
#[test]
fn etcd_agent_lease_expires() {
    let Some(e) = Etcd::start("etcd_agent_lease_expires") else {
        return;
    };
    let url: StoreUrl = e.store_url().parse().unwrap();
    let mut agent = store::open(&url).unwrap();
    agent
        .report(&AgentReport {
            kind: AgentKind::Server,
            id: 3,
            applied: 0,
            error: None,
            at_ms: now_ms(),
            ttl_ms: 2000,
        })
        .unwrap();
    let mut s = store::open(&url).unwrap();
    assert_eq!(s.agents().unwrap().len(), 1);
    // As a killed process would: no revoke.
    std::mem::forget(agent);
    let t = Instant::now();
    while !s.agents().unwrap().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the lease did not expire"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        t.elapsed() >= Duration::from_millis(1000),
        "gone before its TTL"
    );
}
