//! The identifier database: every refusal, atomic writes, persistence,
//! generations, projection onto a server's maps, and crash repair.

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use devplane_control::config::ServerConfig;
use devplane_control::db::{
    APPLIED_FILE, Change, Client, DB_FILE, Db, DbError, Hypervisor, Kind, LOCK_FILE, Model, Server,
    ServerSettings, Vm, VmState, commit_and_sync, repair, restore, write_atomic,
};
use devplane_control::maps::{MapSyncError, MapWriter, MemMaps, sync};
use devplane_wire::maps::{ClientEntry, Config, MAX_WORKERS, Route, VmEntry};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("devplane-db-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, last)
}

fn client(id: u32, last: u8) -> Change {
    Change::AddClient(Client {
        id,
        address: ip(last),
        budget: None,
        tag_key: None,
    })
}

fn hypervisor(id: u32, client: u32) -> Change {
    Change::AddHypervisor(Hypervisor { id, client })
}

fn vm(id: u32, hypervisor: u32, client: u32) -> Change {
    Change::AddVm(Vm {
        id,
        hypervisor,
        client,
        state: VmState::Stopped,
    })
}

fn server(id: u32, last: u8) -> Change {
    Change::AddServer(Server {
        id,
        address: Ipv4Addr::new(10, 98, 0, last),
    })
}

fn model(id: u32, server: u32, worker: u32) -> Model {
    Model {
        id,
        kind: "counter".into(),
        server,
        worker,
        line: None,
        vm: None,
        pio_base: None,
        mmio_base: None,
        backing: None,
        via: None,
    }
}

/// Client 7 (hypervisor 2, VMs 3 and 4), server 1 (models 10 on worker 0
/// and 11 on worker 1, 11 interrupting VM 3), server 2 (model 20).
fn populated(dir: &Path) -> Db {
    let mut db = Db::open(dir).unwrap();
    for c in [
        client(7, 1),
        hypervisor(2, 7),
        vm(3, 2, 7),
        vm(4, 2, 7),
        server(1, 1),
        server(2, 2),
        Change::AddModel(model(10, 1, 0)),
        Change::AddModel(Model {
            line: Some(4),
            vm: Some(3),
            pio_base: Some(0x3f8),
            ..model(11, 1, 1)
        }),
        Change::AddModel(model(20, 2, 0)),
    ] {
        db.apply(c).unwrap();
    }
    db
}

/// Server 1 in socket mode with two workers.
fn settings(id: u32) -> ServerSettings {
    let cfg = ServerConfig::from_toml_str(&format!(
        "[server]\nid = {id}\nmode = \"socket\"\nworkers = [0, 0]\n"
    ))
    .unwrap();
    ServerSettings::from_config(&cfg, false)
}

/// The maps a server should hold for `db`.
fn expected_maps(db: &Db, s: &ServerSettings) -> MemMaps {
    let mut m = MemMaps::new();
    sync(&db.server_config(s).unwrap(), s.redirect, &mut m).unwrap();
    m
}

/// Names in the state dir other than the database's own files.
fn stray_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != DB_FILE && n != APPLIED_FILE && n != LOCK_FILE)
        .collect()
}

/// Applies `change`, expects it refused, and checks that the file did not
/// change and the message is one line.
fn refused(db: &mut Db, change: Change) -> DbError {
    let path = db.dir().join(DB_FILE);
    let before = fs::read(&path).unwrap();
    let generation = db.generation();
    let e = db.apply(change).unwrap_err();
    let msg = e.to_string();
    assert!(!msg.contains('\n'), "multi-line message: {msg}");
    assert_eq!(
        fs::read(&path).unwrap(),
        before,
        "refused change wrote the file"
    );
    assert_eq!(db.generation(), generation);
    assert_eq!(Db::open(db.dir()).unwrap().generation(), generation);
    e
}

#[test]
fn open_creates_an_empty_database() {
    let t = TempDir::new();
    let dir = t.path().join("state/nested");
    let db = Db::open(&dir).unwrap();
    assert_eq!(db.generation(), 0);
    assert_eq!(db.applied_generation(), 0);
    assert!(!db.needs_repair());
    assert!(db.state().clients.is_empty());
    assert!(dir.join(DB_FILE).is_file());
    let text = fs::read_to_string(dir.join(DB_FILE)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["format"], 1);
    assert_eq!(v["generation"], 0);
}

#[test]
fn changes_persist_across_reopen_and_bump_the_generation() {
    let t = TempDir::new();
    let db = populated(t.path());
    assert_eq!(db.generation(), 9);
    let again = Db::open(t.path()).unwrap();
    assert_eq!(again.generation(), 9);
    assert_eq!(again.state(), db.state());
    assert_eq!(again.state().client(7).unwrap().address, ip(1));
    assert_eq!(again.state().vm(4).unwrap().hypervisor, 2);
    assert_eq!(again.state().model(11).unwrap().pio_base, Some(0x3f8));
    // Lists are kept sorted by id whatever the insertion order.
    let mut db = again;
    db.apply(client(5, 5)).unwrap();
    let ids: Vec<u32> = db.state().clients.iter().map(|c| c.id).collect();
    assert_eq!(ids, [5, 7]);
    assert_eq!(db.generation(), 10);
    db.apply(Change::RemoveModel(10)).unwrap();
    assert_eq!(db.generation(), 11);
    assert!(Db::open(t.path()).unwrap().state().model(10).is_none());
}

#[test]
fn writes_leave_no_temporary_files() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let _ = db.apply(client(7, 9)); // refused
    db.mark_applied().unwrap();
    assert!(
        stray_files(t.path()).is_empty(),
        "{:?}",
        stray_files(t.path())
    );
}

#[test]
fn failed_atomic_write_removes_its_temporary_and_keeps_the_target() {
    let t = TempDir::new();
    // The target is a non-empty directory: the rename fails.
    fs::create_dir_all(t.path().join("target/inner")).unwrap();
    let e = write_atomic(t.path(), "target", b"new").unwrap_err();
    assert!(matches!(e, DbError::Io { .. }), "{e}");
    assert!(t.path().join("target/inner").is_dir());
    let names: Vec<_> = fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["target"]);
    // And a good write replaces the file whole.
    write_atomic(t.path(), "file", b"one").unwrap();
    write_atomic(t.path(), "file", b"two").unwrap();
    assert_eq!(fs::read(t.path().join("file")).unwrap(), b"two");
}

#[test]
fn refuses_zero_and_duplicate_ids() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    for (change, kind) in [
        (client(0, 50), Kind::Client),
        (hypervisor(0, 7), Kind::Hypervisor),
        (vm(0, 2, 7), Kind::Vm),
        (Change::AddModel(model(0, 1, 0)), Kind::Model),
        (server(0, 50), Kind::Server),
    ] {
        let e = refused(&mut db, change);
        assert!(matches!(e, DbError::ZeroId { kind: k } if k == kind), "{e}");
    }
    for (change, kind, id) in [
        (client(7, 50), Kind::Client, 7),
        (hypervisor(2, 7), Kind::Hypervisor, 2),
        (vm(3, 2, 7), Kind::Vm, 3),
        (Change::AddModel(model(10, 1, 0)), Kind::Model, 10),
        (server(1, 50), Kind::Server, 1),
    ] {
        let e = refused(&mut db, change);
        assert!(
            matches!(e, DbError::Duplicate { kind: k, id: i } if k == kind && i == id),
            "{e}"
        );
        assert!(e.to_string().contains("already exists"), "{e}");
    }
}

#[test]
fn refuses_duplicate_addresses() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let e = refused(&mut db, client(8, 1));
    assert!(
        matches!(
            e,
            DbError::DuplicateAddress {
                kind: Kind::Client,
                id: 8,
                owner: 7,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "client 8: address 10.99.0.1 is already client 7's: each client needs its own address"
    );
    let e = refused(&mut db, server(3, 2));
    assert!(
        matches!(
            e,
            DbError::DuplicateAddress {
                kind: Kind::Server,
                id: 3,
                owner: 2,
                ..
            }
        ),
        "{e}"
    );
    // A client and a server may share a host.
    db.apply(server(3, 99)).unwrap();
    db.apply(Change::AddClient(Client {
        id: 8,
        address: Ipv4Addr::new(10, 98, 0, 99),
        budget: None,
        tag_key: None,
    }))
    .unwrap();
}

#[test]
fn refuses_dangling_references() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let dangling = |e: &DbError, kind: Kind, target: Kind, target_id: u32| {
        assert!(
            matches!(e, DbError::Dangling { kind: k, target: tk, target_id: ti, .. }
                if *k == kind && *tk == target && *ti == target_id),
            "{e}"
        );
    };
    let e = refused(&mut db, hypervisor(9, 70));
    dangling(&e, Kind::Hypervisor, Kind::Client, 70);
    assert_eq!(
        e.to_string(),
        "hypervisor 9: client 70 does not exist: add it first with `dpctl clients add`"
    );
    let e = refused(&mut db, vm(9, 20, 7));
    dangling(&e, Kind::Vm, Kind::Hypervisor, 20);
    let e = refused(&mut db, Change::AddModel(model(9, 5, 0)));
    dangling(&e, Kind::Model, Kind::Server, 5);
    let e = refused(
        &mut db,
        Change::AddModel(Model {
            vm: Some(30),
            ..model(9, 1, 0)
        }),
    );
    dangling(&e, Kind::Model, Kind::Vm, 30);

    // A VM's client must be its hypervisor's.
    db.apply(client(8, 8)).unwrap();
    let e = refused(&mut db, vm(9, 2, 8));
    assert!(
        matches!(
            e,
            DbError::WrongClient {
                vm: 9,
                client: 8,
                hypervisor: 2,
                expected: 7
            }
        ),
        "{e}"
    );
}

#[test]
fn refuses_bad_models() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let e = refused(
        &mut db,
        Change::AddModel(Model {
            line: Some(5),
            ..model(9, 1, 0)
        }),
    );
    assert!(
        matches!(e, DbError::LineWithoutVm { id: 9, line: 5 }),
        "{e}"
    );
    let e = refused(
        &mut db,
        Change::AddModel(Model {
            kind: "  ".into(),
            ..model(9, 1, 0)
        }),
    );
    assert!(matches!(e, DbError::EmptyKind { id: 9 }), "{e}");
    let e = refused(&mut db, Change::AddModel(model(9, 1, MAX_WORKERS)));
    assert!(matches!(e, DbError::WorkerRange { id: 9, .. }), "{e}");
}

#[test]
fn refuses_removing_what_is_still_referred_to() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let e = refused(&mut db, Change::RemoveClient(7));
    assert!(
        matches!(
            e,
            DbError::InUse {
                kind: Kind::Client,
                id: 7,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        "client 7 still hosts hypervisor 2, VM 3, VM 4: remove or move them first"
    );
    let e = refused(&mut db, Change::RemoveHypervisor(2));
    assert_eq!(
        e.to_string(),
        "hypervisor 2 still hosts VM 3, VM 4: remove or move them first"
    );
    let e = refused(&mut db, Change::RemoveVm(3));
    assert_eq!(
        e.to_string(),
        "VM 3 still receives interrupts from model 11: remove or move it first"
    );
    let e = refused(&mut db, Change::RemoveServer(1));
    assert_eq!(
        e.to_string(),
        "server 1 still owns model 10, model 11: remove or move them first"
    );

    // In dependency order everything goes.
    for c in [
        Change::RemoveModel(10),
        Change::RemoveModel(11),
        Change::RemoveModel(20),
        Change::RemoveServer(1),
        Change::RemoveServer(2),
        Change::RemoveVm(3),
        Change::RemoveVm(4),
        Change::RemoveHypervisor(2),
        Change::RemoveClient(7),
    ] {
        db.apply(c).unwrap();
    }
    assert_eq!(*db.state(), Default::default());
}

#[test]
fn refuses_removing_unknown_ids_and_running_vms() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    for (change, kind) in [
        (Change::RemoveClient(70), Kind::Client),
        (Change::RemoveHypervisor(70), Kind::Hypervisor),
        (Change::RemoveVm(70), Kind::Vm),
        (Change::RemoveModel(70), Kind::Model),
        (Change::RemoveServer(70), Kind::Server),
    ] {
        let e = refused(&mut db, change);
        assert!(e.is_not_found(), "{e}");
        assert!(
            matches!(e, DbError::NotFound { kind: k, id: 70 } if k == kind),
            "{e}"
        );
    }
    db.apply(Change::AddVm(Vm {
        id: 9,
        hypervisor: 2,
        client: 7,
        state: VmState::Running,
    }))
    .unwrap();
    let e = refused(&mut db, Change::RemoveVm(9));
    assert_eq!(
        e.to_string(),
        "VM 9 is running: shut it down before removing it"
    );
}

#[test]
fn open_refuses_corrupt_or_newer_files() {
    let t = TempDir::new();
    populated(t.path());
    let path = t.path().join(DB_FILE);
    let good = fs::read_to_string(&path).unwrap();

    fs::write(&path, "{ not json").unwrap();
    let e = Db::open(t.path()).unwrap_err();
    assert!(matches!(e, DbError::Corrupt { .. }), "{e}");
    assert!(!e.to_string().contains('\n'));

    // Parses, but a VM names a hypervisor that is not there.
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["hypervisors"] = serde_json::json!([]);
    fs::write(&path, v.to_string()).unwrap();
    let e = Db::open(t.path()).unwrap_err();
    assert!(matches!(e, DbError::Corrupt { .. }), "{e}");
    assert!(e.to_string().contains("hypervisor 2 does not exist"), "{e}");

    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["format"] = 99.into();
    fs::write(&path, v.to_string()).unwrap();
    let e = Db::open(t.path()).unwrap_err();
    assert!(matches!(e, DbError::Format { found: 99, .. }), "{e}");
}

#[test]
fn concurrent_writers_lose_no_change() {
    let t = TempDir::new();
    Db::open(t.path()).unwrap();
    let threads: Vec<_> = (0..2u32)
        .map(|k| {
            let dir = t.path().to_path_buf();
            std::thread::spawn(move || {
                // Each thread has its own handle, as separate processes do.
                let mut db = Db::open(&dir).unwrap();
                for i in 0..20u32 {
                    let id = 1 + k * 100 + i;
                    db.apply(client(id, (k * 100 + i + 1) as u8)).unwrap();
                }
            })
        })
        .collect();
    for th in threads {
        th.join().unwrap();
    }
    let db = Db::open(t.path()).unwrap();
    assert_eq!(db.generation(), 40);
    assert_eq!(db.state().clients.len(), 40);
}

#[test]
fn projects_one_server() {
    let t = TempDir::new();
    let db = populated(t.path());
    let cfg = db.server_config(&settings(1)).unwrap();
    assert_eq!(cfg.server.id, 1);
    assert_eq!(cfg.clients.len(), 1);
    assert_eq!(cfg.clients[0].address, ip(1));
    let vms: Vec<(u32, u32, u32)> = cfg
        .vms
        .iter()
        .map(|v| (v.id, v.client, v.hypervisor))
        .collect();
    assert_eq!(vms, [(3, 7, 2), (4, 7, 2)]);
    let models: BTreeSet<u32> = cfg.models.iter().map(|m| m.id).collect();
    assert_eq!(models, BTreeSet::from([10, 11]));
    let m = cfg.model(11).unwrap();
    assert_eq!(
        (m.worker, m.line, m.vm, m.pio_base),
        (1, Some(4), Some(3), Some(0x3f8))
    );

    let cfg2 = db.server_config(&settings(2)).unwrap();
    assert_eq!(cfg2.models.len(), 1);
    assert_eq!(cfg2.models[0].id, 20);

    let e = db.server_config(&settings(3)).unwrap_err();
    assert!(
        matches!(
            e,
            DbError::NotFound {
                kind: Kind::Server,
                id: 3
            }
        ),
        "{e}"
    );
}

#[test]
fn commit_and_sync_updates_the_maps_and_the_marker() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let s = settings(1);
    let mut maps = MemMaps::new();
    // The database was written without the maps: they are behind.
    assert!(db.needs_repair());
    let r = repair(&mut db, &s, &mut maps).unwrap().unwrap();
    assert_eq!(r.added, 1 + 2 + 2);
    assert_eq!(maps, expected_maps(&db, &s));
    assert!(!db.needs_repair());
    assert_eq!(repair(&mut db, &s, &mut maps).unwrap(), None);

    let report = commit_and_sync(&mut db, Change::RemoveModel(10), &s, &mut maps).unwrap();
    assert_eq!(report.removed, 1);
    assert!(!maps.routes.contains_key(&10));
    assert_eq!(db.generation(), 10);
    assert_eq!(db.applied_generation(), 10);
    assert!(!Db::open(t.path()).unwrap().needs_repair());
    assert_eq!(maps, expected_maps(&db, &s));

    let report = commit_and_sync(&mut db, client(8, 8), &s, &mut maps).unwrap();
    assert_eq!(report.added, 1);
    assert_eq!(maps.clients[&8].ip, [10, 99, 0, 8]);
}

#[test]
fn commit_and_sync_refuses_what_the_server_cannot_serve() {
    let t = TempDir::new();
    let mut db = populated(t.path());
    let s = settings(1);
    let mut maps = MemMaps::new();
    restore(&mut db, &s, &mut maps).unwrap();
    let before = fs::read(t.path().join(DB_FILE)).unwrap();
    // Server 1 has two workers: index 5 does not exist.
    let e = commit_and_sync(&mut db, Change::AddModel(model(12, 1, 5)), &s, &mut maps).unwrap_err();
    assert!(matches!(e, DbError::Config { server: 1, .. }), "{e}");
    assert_eq!(fs::read(t.path().join(DB_FILE)).unwrap(), before);
    assert!(!db.needs_repair());
    assert_eq!(maps, expected_maps(&db, &s));
}

/// Maps that fail after `budget` successful writes: the control step dies
/// half-way through updating them.
struct Crashing {
    inner: MemMaps,
    budget: usize,
}

impl Crashing {
    fn spend(&mut self) -> Result<(), MapSyncError> {
        if self.budget == 0 {
            return Err(MapSyncError::Map {
                map: "DP_ROUTES",
                op: "insert",
                key: None,
                source: aya::maps::MapError::KeyNotFound,
            });
        }
        self.budget -= 1;
        Ok(())
    }
}

impl MapWriter for Crashing {
    fn set_config(&mut self, cfg: Config) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.set_config(cfg)
    }
    fn put_route(&mut self, model: u32, route: Route) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.put_route(model, route)
    }
    fn remove_route(&mut self, model: u32) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.remove_route(model)
    }
    fn put_client(&mut self, id: u32, entry: ClientEntry) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.put_client(id, entry)
    }
    fn remove_client(&mut self, id: u32) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.remove_client(id)
    }
    fn put_vm(&mut self, id: u32, entry: VmEntry) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.put_vm(id, entry)
    }
    fn remove_vm(&mut self, id: u32) -> Result<(), MapSyncError> {
        self.spend()?;
        self.inner.remove_vm(id)
    }
    fn route_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        self.inner.route_ids()
    }
    fn client_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        self.inner.client_ids()
    }
    fn vm_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        self.inner.vm_ids()
    }
}

#[test]
fn a_crash_between_the_database_and_the_maps_is_repaired_at_the_next_start() {
    let t = TempDir::new();
    let s = settings(1);
    let mut maps = MemMaps::new();
    {
        let mut db = populated(t.path());
        restore(&mut db, &s, &mut maps).unwrap();
        assert!(!db.needs_repair());
    }

    // The control step writes the database, then dies after one map write.
    {
        let mut db = Db::open(t.path()).unwrap();
        let mut crashing = Crashing {
            inner: maps,
            budget: 1,
        };
        let change = Change::AddModel(Model {
            vm: Some(4),
            line: Some(6),
            ..model(12, 1, 0)
        });
        let e = commit_and_sync(&mut db, change, &s, &mut crashing).unwrap_err();
        assert!(matches!(e, DbError::Sync { generation: 10, .. }), "{e}");
        assert!(!e.to_string().contains('\n'));
        maps = crashing.inner;
    }
    assert!(!maps.routes.contains_key(&12), "the crash stopped the sync");

    // The next start: a fresh handle sees the database ahead of the maps.
    let mut db = Db::open(t.path()).unwrap();
    assert_eq!(db.generation(), 10);
    assert_eq!(db.applied_generation(), 9);
    assert!(db.needs_repair());
    assert!(db.state().model(12).is_some());
    assert_ne!(maps, expected_maps(&db, &s));
    let report = repair(&mut db, &s, &mut maps)
        .unwrap()
        .expect("a repair ran");
    assert!(report.added >= 1, "{report}");
    assert_eq!(maps, expected_maps(&db, &s));
    assert_eq!(maps.routes[&12].worker, 0);
    assert!(!db.needs_repair());
    assert!(!Db::open(t.path()).unwrap().needs_repair());
    assert!(stray_files(t.path()).is_empty());
}

#[test]
fn a_crash_before_any_map_write_is_repaired_too() {
    let t = TempDir::new();
    let s = settings(1);
    let mut maps = MemMaps::new();
    let mut db = populated(t.path());
    restore(&mut db, &s, &mut maps).unwrap();
    // Only the database step ran (the process died before the sync).
    db.apply(Change::RemoveModel(11)).unwrap();
    db.apply(Change::RemoveVm(3)).unwrap();
    drop(db);
    assert!(maps.routes.contains_key(&11));

    let mut db = Db::open(t.path()).unwrap();
    assert!(db.needs_repair());
    let report = repair(&mut db, &s, &mut maps).unwrap().unwrap();
    assert_eq!(report.removed, 2);
    assert_eq!(maps, expected_maps(&db, &s));
    assert!(!maps.vms.contains_key(&3));
    assert_eq!(db.applied_generation(), db.generation());
}

#[test]
fn a_client_budget_reaches_the_clients_map_and_can_be_removed() {
    use devplane_control::config::Budget;
    let t = TempDir::new();
    let mut db = populated(t.path());
    let s = settings(1);
    assert_eq!(
        expected_maps(&db, &s).clients[&7].burst,
        0,
        "none by default"
    );

    db.apply(Change::SetClientBudget(
        7,
        Budget {
            rate: 1000,
            burst: 32,
        },
    ))
    .unwrap();
    let entry = expected_maps(&db, &s).clients[&7];
    assert_eq!((entry.rate, entry.burst), (1000, 32));
    assert_eq!(entry.ip, ip(1).octets());
    // It persists.
    let reopened = Db::open(t.path()).unwrap();
    assert_eq!(expected_maps(&reopened, &s).clients[&7].burst, 32);

    // Burst 0 removes it.
    db.apply(Change::SetClientBudget(7, Budget { rate: 5, burst: 0 }))
        .unwrap();
    assert_eq!(db.state().client(7).unwrap().budget, None);
    assert_eq!(expected_maps(&db, &s).clients[&7].burst, 0);

    // An unknown client or a burst out of range is refused.
    let e = refused(&mut db, Change::SetClientBudget(99, Budget::default()));
    assert!(matches!(e, DbError::NotFound { .. }), "{e}");
    let too_big = Budget {
        rate: 1,
        burst: devplane_wire::maps::MAX_BURST + 1,
    };
    let e = refused(&mut db, Change::SetClientBudget(7, too_big));
    assert!(e.to_string().contains("clients.budget.burst"), "{e}");
}

#[test]
fn a_forward_names_another_existing_server_which_then_cannot_go() {
    let dir = TempDir::new();
    let mut db = populated(&dir.0);
    let to_itself = refused(
        &mut db,
        Change::ForwardModel {
            model: 20,
            via: Some(2),
        },
    );
    assert!(
        matches!(to_itself, DbError::ForwardToItself { id: 20, server: 2 }),
        "{to_itself}"
    );
    let nowhere = refused(
        &mut db,
        Change::ForwardModel {
            model: 20,
            via: Some(9),
        },
    );
    assert!(nowhere.to_string().contains("server 9"), "{nowhere}");
    assert!(
        refused(
            &mut db,
            Change::ForwardModel {
                model: 99,
                via: Some(1)
            }
        )
        .is_not_found()
    );
    // Model 20 (on server 2) forwarded by server 1: server 1 owns no
    // model of its own then but still cannot be removed.
    db.apply(Change::ForwardModel {
        model: 20,
        via: Some(1),
    })
    .unwrap();
    assert_eq!(db.state().model(20).unwrap().via, Some(1));
    db.apply(Change::RemoveModel(10)).unwrap();
    db.apply(Change::RemoveModel(11)).unwrap();
    let in_use = refused(&mut db, Change::RemoveServer(1));
    assert!(in_use.to_string().contains("model 20"), "{in_use}");
    db.apply(Change::ForwardModel {
        model: 20,
        via: None,
    })
    .unwrap();
    db.apply(Change::RemoveServer(1)).unwrap();
}
