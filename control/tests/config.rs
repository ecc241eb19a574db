//! The server configuration file: parsing, defaults, every validation
//! error, round trips; and syncing it into in-memory and kernel maps.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use devplane_control::config::{
    ClientConfig, ConfigError, DEFAULT_BATCH, DEFAULT_IDLE_SLEEP_US, DEFAULT_SPIN_BUDGET, Mode,
    ModelConfig, ServerConfig, Tuning, VmConfig,
};
use devplane_control::maps::{
    AyaMaps, MapSyncError, MapWriter, MemMaps, SyncReport, client_entry, config_entry, route_entry,
    sync, vm_entry,
};
use devplane_wire::maps::{
    CLIENTS_MAP, CONFIG_CHECK_CLIENT, CONFIG_MAP, CONFIG_REDIRECT, ClientEntry, Config,
    MAX_CLIENTS, MAX_MODELS, MAX_VMS, ROUTE_LOCAL, ROUTES_MAP, Route, VMS_MAP, VmEntry,
};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/server.toml")
}

/// A valid config to break one key at a time.
const BASE: &str = r#"
[server]
id = 1
mode = "socket"
workers = [0, 0]

[[clients]]
id = 7
address = "10.99.0.1"

[[clients]]
id = 8
address = "10.99.0.2"

[[vms]]
id = 1
client = 7
hypervisor = 1

[[models]]
id = 42
kind = "counter"
worker = 1
line = 4
vm = 1
"#;

fn err(text: &str) -> ConfigError {
    match ServerConfig::from_toml_str(text) {
        Ok(cfg) => panic!("expected an error, parsed {cfg:#?}"),
        Err(e) => e,
    }
}

fn msg(text: &str) -> String {
    let m = err(text).to_string();
    assert!(!m.contains('\n'), "error message is not one line: {m:?}");
    m
}

#[test]
fn example_file_parses() {
    let cfg = ServerConfig::from_file(&example_path()).unwrap();
    let s = &cfg.server;
    assert_eq!(s.id, 1);
    assert_eq!(s.port, 7700);
    assert_eq!(s.mode, Mode::Xdp);
    assert_eq!(s.interface.as_deref(), Some("eth0"));
    assert_eq!(s.workers, vec![0, 1]);
    assert_eq!(s.pin_dir, None);
    assert_eq!(
        s.effective_pin_dir(),
        PathBuf::from("/sys/fs/bpf/devplane/server-1")
    );
    assert!(s.check_clients);
    assert_eq!(cfg.tuning, Tuning::default());
    assert_eq!(
        cfg.clients,
        vec![ClientConfig {
            tag_key: None,
            id: 7,
            address: Ipv4Addr::new(10, 99, 0, 1),
            budget: None,
        }]
    );
    assert_eq!(
        cfg.vms,
        vec![VmConfig {
            id: 1,
            client: 7,
            hypervisor: 1
        }]
    );
    assert_eq!(cfg.models.len(), 3);
    assert_eq!(
        cfg.models[0],
        ModelConfig {
            id: 42,
            kind: "counter".into(),
            worker: 0,
            line: None,
            vm: None,
            pio_base: Some(0x3f8),
            mmio_base: None,
            backing: None,
        }
    );
    assert_eq!(
        cfg.models[1],
        ModelConfig {
            id: 43,
            kind: "echo".into(),
            worker: 1,
            line: Some(4),
            vm: Some(1),
            pio_base: None,
            mmio_base: Some(0xd000_0000),
            backing: None,
        }
    );
    assert_eq!(cfg.model(44).unwrap().kind, "null");
    assert_eq!(cfg.client(7).unwrap().address, Ipv4Addr::new(10, 99, 0, 1));
    assert_eq!(cfg.vm(1).unwrap().client, 7);
    assert!(cfg.model(45).is_none());
    let w1: Vec<u32> = cfg.worker_models(1).map(|m| m.id).collect();
    assert_eq!(w1, vec![43, 44]);
}

#[test]
fn brief_example_parses() {
    // The shape from the design brief, with its comments.
    let text = r#"
[server]
id = 1                 # server platform id (u32, nonzero)
port = 7700            # UDP port
mode = "xdp"
interface = "eth0"
workers = [0, 1]
pin_dir = "/sys/fs/bpf/devplane/server-1"
check_clients = true
[tuning]
spin_budget = 2000
idle_sleep_us = 50
batch = 64

[[clients]]
id = 7
address = "10.99.0.1"

[[vms]]
id = 1
client = 7
hypervisor = 1

[[models]]
id = 42
kind = "counter"
worker = 0
line = 4
vm = 1
pio_base = 0x3f8
mmio_base = 0xd0000000
"#;
    let cfg = ServerConfig::from_toml_str(text).unwrap();
    assert_eq!(
        cfg.server.pin_dir.as_deref(),
        Some(Path::new("/sys/fs/bpf/devplane/server-1"))
    );
    assert_eq!(cfg.models[0].pio_base, Some(0x3f8));
    assert_eq!(cfg.models[0].mmio_base, Some(0xd000_0000));
}

#[test]
fn defaults_apply() {
    let cfg = ServerConfig::from_toml_str("[server]\nid = 3\nworkers = [1]\ninterface = \"veth0\"")
        .unwrap();
    assert_eq!(cfg.server.port, devplane_wire::DEFAULT_PORT);
    assert_eq!(cfg.server.mode, Mode::Xdp);
    assert!(cfg.server.check_clients);
    assert_eq!(cfg.server.pin_dir, None);
    assert_eq!(
        cfg.server.effective_pin_dir(),
        PathBuf::from("/sys/fs/bpf/devplane/server-3")
    );
    assert_eq!(cfg.tuning.spin_budget, DEFAULT_SPIN_BUDGET);
    assert_eq!(cfg.tuning.idle_sleep_us, DEFAULT_IDLE_SLEEP_US);
    assert_eq!(cfg.tuning.batch, DEFAULT_BATCH);
    assert_eq!(
        (DEFAULT_SPIN_BUDGET, DEFAULT_IDLE_SLEEP_US, DEFAULT_BATCH),
        (2000, 50, 64)
    );
    assert!(cfg.clients.is_empty() && cfg.vms.is_empty() && cfg.models.is_empty());

    // A partial [tuning] keeps the other defaults.
    let cfg = ServerConfig::from_toml_str(
        "[server]\nid = 3\nworkers = [1]\nmode = \"socket\"\n[tuning]\nbatch = 8",
    )
    .unwrap();
    assert_eq!(
        cfg.tuning,
        Tuning {
            batch: 8,
            ..Tuning::default()
        }
    );
    assert_eq!(cfg.server.interface, None);

    // A model without line, vm or bases.
    let cfg = ServerConfig::from_toml_str(
        "[server]\nid = 3\nworkers = [1]\nmode = \"socket\"\n[[models]]\nid = 5\nkind = \"null\"\nworker = 0",
    )
    .unwrap();
    let m = &cfg.models[0];
    assert_eq!(
        (m.line, m.vm, m.pio_base, m.mmio_base),
        (None, None, None, None)
    );
}

#[test]
fn base_is_valid() {
    ServerConfig::from_toml_str(BASE).unwrap();
}

#[test]
fn validation_errors() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "id = 1\n",
            "id = 0\n",
            "server.id is 0: set it to this server's nonzero platform id",
        ),
        (
            "id = 1\n",
            "id = 1\nport = 0\n",
            "server.port is 0: set a UDP port (default 7700)",
        ),
        (
            "workers = [0, 0]",
            "workers = []",
            "server.workers is empty: list one CPU core per worker, e.g. workers = [0]",
        ),
        (
            "mode = \"socket\"",
            "mode = \"xdp\"",
            "server.mode is \"xdp\" but server.interface is not set: name the network interface to attach to, or set mode = \"socket\"",
        ),
        (
            "mode = \"socket\"",
            "mode = \"xdp\"\ninterface = \"a-very-long-ifname\"",
            "server.interface \"a-very-long-ifname\" is not a valid interface name: it must be 1 to 15 bytes without '/', ':' or spaces",
        ),
        (
            "mode = \"socket\"",
            "mode = \"xdp\"\ninterface = \"\"",
            "server.interface \"\" is not a valid interface name: it must be 1 to 15 bytes without '/', ':' or spaces",
        ),
        (
            "mode = \"socket\"",
            "mode = \"socket\"\npin_dir = \"bpf/here\"",
            "server.pin_dir bpf/here is relative: give an absolute path on bpffs, e.g. /sys/fs/bpf/devplane/server-1",
        ),
        (
            "[[clients]]\nid = 7",
            "[tuning]\nbatch = 0\n[[clients]]\nid = 7",
            "tuning.batch = 0 is out of range: give a value from 1 to 2048",
        ),
        (
            "[[clients]]\nid = 7",
            "[tuning]\nbatch = 4294967295\n[[clients]]\nid = 7",
            "tuning.batch = 4294967295 is out of range: give a value from 1 to 2048",
        ),
        (
            "[[clients]]\nid = 7",
            "[tuning]\nidle_sleep_us = 30000000\n[[clients]]\nid = 7",
            "tuning.idle_sleep_us = 30000000 is out of range: give a value from 0 to 10000",
        ),
        (
            "id = 8\naddress",
            "id = 0\naddress",
            "client entry #2 has id 0: ids must be nonzero",
        ),
        (
            "id = 8\naddress",
            "id = 7\naddress",
            "client 7 is defined twice: give each client its own id",
        ),
        (
            "10.99.0.2",
            "10.99.0.1",
            "client 8: address 10.99.0.1 is already client 7's: each client needs its own address",
        ),
        (
            "[[vms]]\nid = 1\n",
            "[[vms]]\nid = 0\n",
            "vm entry #1 has id 0: ids must be nonzero",
        ),
        (
            "hypervisor = 1\n",
            "hypervisor = 1\n[[vms]]\nid = 1\nclient = 8\nhypervisor = 2\n",
            "vm 1 is defined twice: give each vm its own id",
        ),
        (
            "client = 7",
            "client = 9",
            "vm 1: client 9 does not exist: add a [[clients]] entry with id = 9",
        ),
        (
            "hypervisor = 1",
            "hypervisor = 0",
            "vm 1: hypervisor is 0: set the nonzero hypervisor id on its client",
        ),
        (
            "id = 42",
            "id = 0",
            "model entry #1 has id 0: ids must be nonzero",
        ),
        (
            "vm = 1\n",
            "vm = 1\n[[models]]\nid = 42\nkind = \"null\"\nworker = 0\n",
            "model 42 is defined twice: give each model its own id",
        ),
        (
            "kind = \"counter\"",
            "kind = \" \"",
            "model 42: kind is empty: name a device model kind, e.g. kind = \"counter\"",
        ),
        (
            "worker = 1",
            "worker = 3",
            "model 42: worker 3 does not exist (server.workers has 2 entries)",
        ),
        (
            "vm = 1\n",
            "vm = 2\n",
            "model 42: vm 2 does not exist: add a [[vms]] entry with id = 2",
        ),
        (
            "vm = 1\n",
            "",
            "model 42: line 4 is set but vm is not: name the VM that receives its interrupts",
        ),
    ];
    for (from, to, want) in cases {
        assert!(BASE.contains(from), "case {want:?}: {from:?} not in BASE");
        let text = BASE.replacen(from, to, 1);
        assert_eq!(&msg(&text), want, "config:\n{text}");
    }
}

#[test]
fn vm_without_line_is_fine_and_duplicate_cores_are_allowed() {
    let text = BASE.replacen("line = 4\n", "", 1);
    let cfg = ServerConfig::from_toml_str(&text).unwrap();
    assert_eq!(cfg.models[0].vm, Some(1));
    assert_eq!(cfg.server.workers, vec![0, 0]);
}

#[test]
fn capacity_limits() {
    let mut cfg = ServerConfig::from_toml_str(BASE).unwrap();
    cfg.server.workers = vec![0; 65];
    assert_eq!(
        cfg.validate().unwrap_err().to_string(),
        "server.workers has 65 entries: at most 64 workers are supported"
    );

    let mut cfg = ServerConfig::from_toml_str(BASE).unwrap();
    cfg.models = (1..=MAX_MODELS + 1)
        .map(|id| ModelConfig {
            id,
            kind: "null".into(),
            worker: 0,
            line: None,
            vm: None,
            pio_base: None,
            mmio_base: None,
            backing: None,
        })
        .collect();
    assert_eq!(
        cfg.validate().unwrap_err().to_string(),
        format!(
            "{} models are configured: the data plane holds at most {MAX_MODELS}",
            MAX_MODELS + 1
        )
    );
    cfg.models.pop();
    cfg.validate().unwrap();

    let mut cfg = ServerConfig::from_toml_str(BASE).unwrap();
    cfg.clients = (1..=MAX_CLIENTS + 1)
        .map(|id| ClientConfig {
            tag_key: None,
            id,
            address: Ipv4Addr::from(0x0a00_0000 + id),
            budget: None,
        })
        .collect();
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::TooMany { kind: "client", .. })
    ));

    let mut cfg = ServerConfig::from_toml_str(BASE).unwrap();
    cfg.vms = (1..=MAX_VMS + 1)
        .map(|id| VmConfig {
            id,
            client: 7,
            hypervisor: 1,
        })
        .collect();
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::TooMany { kind: "vm", .. })
    ));
}

#[test]
fn unknown_fields_are_rejected() {
    let cases = [
        ("[server]\n", "[server]\nthreads = 4\n", "threads"),
        (
            "[[clients]]\nid = 7\n",
            "[[clients]]\nid = 7\nip = \"1.2.3.4\"\n",
            "ip",
        ),
        ("[[vms]]\nid = 1\n", "[[vms]]\nid = 1\nvcpus = 2\n", "vcpus"),
        (
            "kind = \"counter\"\n",
            "kind = \"counter\"\nirq = 4\n",
            "irq",
        ),
        ("\n[server]", "\nversion = 2\n[server]", "version"),
        ("\n[server]", "\n[tunning]\nbatch = 1\n[server]", "tunning"),
        (
            "\n[server]",
            "\n[tuning]\nspin_budgte = 1\n[server]",
            "spin_budgte",
        ),
    ];
    for (from, to, key) in cases {
        assert!(BASE.contains(from), "{from:?} not in BASE");
        let text = BASE.replacen(from, to, 1);
        let e = err(&text);
        assert!(matches!(e, ConfigError::Parse { .. }), "{e:?}");
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m:?}");
        assert!(
            m.contains(&format!("unknown field `{key}`")),
            "{key}: got {m:?}"
        );
    }
}

#[test]
fn parse_errors_are_one_line_and_located() {
    let text = BASE.replacen("10.99.0.2", "10.99.0.x", 1);
    let e = err(&text);
    let ConfigError::Parse {
        line,
        column,
        ref snippet,
        ..
    } = e
    else {
        panic!("{e:?}")
    };
    assert_eq!(line, 13);
    assert_eq!(column, 11);
    assert_eq!(snippet, "address = \"10.99.0.x\"");
    assert_eq!(
        e.to_string(),
        "line 13, column 11 (address = \"10.99.0.x\"): address \"10.99.0.x\" is not an IPv4 address: write four decimal octets, e.g. address = \"10.99.0.1\""
    );

    // Wrong type, bad mode, missing key, bad syntax.
    let m = msg(&BASE.replacen("id = 1\n", "id = \"one\"\n", 1));
    assert!(m.starts_with("line 3, column 6 (id = \"one\"): "), "{m}");
    let m = msg(&BASE.replacen("\"socket\"", "\"dpdk\"", 1));
    assert!(m.contains("unknown variant `dpdk`"), "{m}");
    let m = msg(&BASE.replacen("hypervisor = 1\n", "", 1));
    assert!(m.contains("missing field `hypervisor`"), "{m}");
    let m = msg(&BASE.replacen("workers = [0, 0]", "workers = [0, 0", 1));
    assert!(m.starts_with("line "), "{m}");
    let m = msg(&BASE.replacen("worker = 1", "worker = -1", 1));
    assert!(m.contains("worker = -1"), "{m}");
    let m = msg("");
    assert!(m.contains("missing field `server`"), "{m}");
}

#[test]
fn from_file_errors_name_the_file() {
    let missing = Path::new("/nonexistent/devplane/server.toml");
    let m = ServerConfig::from_file(missing).unwrap_err().to_string();
    assert!(
        m.starts_with("cannot read config file /nonexistent/devplane/server.toml: "),
        "{m}"
    );

    let dir = std::env::temp_dir().join(format!("devplane-control-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[server]\nid = 1\nworkerz = [0]\n").unwrap();
    let m = ServerConfig::from_file(&path).unwrap_err().to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        m.starts_with(&format!(
            "{}: line 3, column 1 (workerz = [0]): unknown field `workerz`",
            path.display()
        )),
        "{m}"
    );
}

#[test]
fn round_trip() {
    let example = ServerConfig::from_file(&example_path()).unwrap();
    let mut full = ServerConfig::from_toml_str(BASE).unwrap();
    full.server.pin_dir = Some("/sys/fs/bpf/x".into());
    full.server.check_clients = false;
    full.server.port = 9000;
    full.tuning = Tuning {
        spin_budget: 0,
        idle_sleep_us: 1000,
        batch: 1,
    };
    full.models[0].pio_base = Some(0xffff);
    full.models[0].mmio_base = Some(0xfee0_0000);
    let minimal =
        ServerConfig::from_toml_str("[server]\nid = 9\nworkers = [0]\nmode = \"socket\"").unwrap();
    for cfg in [example, full, minimal] {
        let text = cfg.to_toml_string().unwrap();
        let back =
            ServerConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{e}\nin:\n{text}"));
        assert_eq!(back, cfg, "through:\n{text}");
    }
}

fn example() -> ServerConfig {
    ServerConfig::from_file(&example_path()).unwrap()
}

#[test]
fn entries() {
    let cfg = example();
    assert_eq!(
        config_entry(&cfg, false),
        Config {
            port: 7700,
            pad: 0,
            server: 1,
            flags: CONFIG_CHECK_CLIENT
        }
    );
    assert_eq!(
        config_entry(&cfg, true).flags,
        CONFIG_CHECK_CLIENT | CONFIG_REDIRECT
    );
    let mut open = cfg.clone();
    open.server.check_clients = false;
    assert_eq!(config_entry(&open, false).flags, 0);
    assert_eq!(config_entry(&open, true).flags, CONFIG_REDIRECT);
    assert_eq!(
        route_entry(&cfg, &cfg.models[1]),
        Route {
            worker: 1,
            server: 1,
            flags: ROUTE_LOCAL,
            ..Route::default()
        }
    );
    assert_eq!(
        client_entry(&cfg.clients[0]),
        ClientEntry {
            ip: [10, 99, 0, 1],
            ..Default::default()
        }
    );
    assert_eq!(
        vm_entry(&cfg.vms[0]),
        VmEntry {
            client: 7,
            hypervisor: 1,
            flags: 0
        }
    );
}

/// Checks that `m` mirrors `cfg` exactly.
fn assert_mirrors(m: &MemMaps, cfg: &ServerConfig, redirect: bool) {
    assert_eq!(m.config, Some(config_entry(cfg, redirect)));
    let routes: Vec<(u32, Route)> = cfg
        .models
        .iter()
        .map(|x| (x.id, route_entry(cfg, x)))
        .collect();
    assert_eq!(m.routes.clone().into_iter().collect::<Vec<_>>(), routes);
    let clients: Vec<(u32, ClientEntry)> = cfg
        .clients
        .iter()
        .map(|c| (c.id, client_entry(c)))
        .collect();
    assert_eq!(m.clients.clone().into_iter().collect::<Vec<_>>(), clients);
    let vms: Vec<(u32, VmEntry)> = cfg.vms.iter().map(|v| (v.id, vm_entry(v))).collect();
    assert_eq!(m.vms.clone().into_iter().collect::<Vec<_>>(), vms);
}

#[test]
fn sync_into_memory_converges() {
    let mut cfg = example();
    let mut m = MemMaps::new();
    let r = sync(&cfg, true, &mut m).unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 5,
            updated: 0,
            removed: 0
        }
    );
    assert_eq!(r.to_string(), "5 added, 0 updated, 0 removed");
    assert_mirrors(&m, &cfg, true);
    assert_eq!(m.routes[&42].worker, 0);
    assert_eq!(m.routes[&43].worker, 1);
    assert_eq!(m.clients[&7].ip, [10, 99, 0, 1]);

    // Unchanged: everything rewritten, nothing added or removed.
    let r = sync(&cfg, true, &mut m).unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 0,
            updated: 5,
            removed: 0
        }
    );
    assert_mirrors(&m, &cfg, true);

    // Remove a model, move one to the other worker: its route goes.
    cfg.models.retain(|x| x.id != 44);
    cfg.models[0].worker = 1;
    let r = sync(&cfg, false, &mut m).unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 0,
            updated: 4,
            removed: 1
        }
    );
    assert!(!m.routes.contains_key(&44));
    assert_eq!(m.routes[&42].worker, 1);
    assert_mirrors(&m, &cfg, false);

    // Replace the client and VM; add a model.
    cfg.models.retain(|x| x.vm.is_none());
    cfg.clients = vec![ClientConfig {
        tag_key: None,
        id: 9,
        address: Ipv4Addr::new(10, 99, 0, 9),
        budget: None,
    }];
    cfg.vms = vec![VmConfig {
        id: 2,
        client: 9,
        hypervisor: 3,
    }];
    cfg.models.push(ModelConfig {
        id: 50,
        kind: "echo".into(),
        worker: 0,
        line: Some(5),
        vm: Some(2),
        pio_base: None,
        mmio_base: None,
        backing: None,
    });
    let r = sync(&cfg, false, &mut m).unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 3,
            updated: 1,
            removed: 3
        }
    );
    assert_mirrors(&m, &cfg, false);

    // Stale entries that were never in a config are removed too.
    m.routes.insert(
        777,
        Route {
            worker: 5,
            ..Route::default()
        },
    );
    m.clients.insert(778, ClientEntry::default());
    m.vms.insert(779, VmEntry::default());
    let r = sync(&cfg, false, &mut m).unwrap();
    assert_eq!(r.removed, 3);
    assert_mirrors(&m, &cfg, false);
}

#[test]
fn sync_refuses_an_invalid_config() {
    let mut cfg = example();
    cfg.models[0].worker = 7;
    let mut m = MemMaps::new();
    let e = sync(&cfg, false, &mut m).unwrap_err();
    assert!(matches!(
        e,
        MapSyncError::Invalid(ConfigError::NoSuchWorker { .. })
    ));
    assert_eq!(
        e.to_string(),
        "refusing to sync an invalid config: model 42: worker 7 does not exist (server.workers has 2 entries)"
    );
    assert_eq!(m, MemMaps::new(), "nothing may be written");
}

/// Skips (or, with DEVPLANE_REQUIRE_PRIVILEGED set, fails) unless root.
fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let why = "creating BPF maps needs root: run the tests as root (sudo -E make test)";
    let required =
        std::env::var_os("DEVPLANE_REQUIRE_PRIVILEGED").is_some_and(|v| !v.is_empty() && v != "0");
    if required {
        panic!(
            "{test}: {why} (DEVPLANE_REQUIRE_PRIVILEGED is set, so this fails instead of skipping)"
        );
    }
    eprintln!("SKIPPED {test}: {why}");
    false
}

fn kernel_maps() -> AyaMaps {
    use aya::maps::{Array, HashMap, MapData};
    AyaMaps::from_maps(
        HashMap::<MapData, u32, Route>::create(MAX_MODELS, 0).expect("create routes map"),
        HashMap::<MapData, u32, ClientEntry>::create(MAX_CLIENTS, 0).expect("create clients map"),
        HashMap::<MapData, u32, VmEntry>::create(MAX_VMS, 0).expect("create vms map"),
        Array::<MapData, Config>::create(1, 0).expect("create config map"),
    )
}

fn assert_kernel_mirrors(k: &AyaMaps, cfg: &ServerConfig, redirect: bool) {
    assert_eq!(k.config().unwrap(), config_entry(cfg, redirect));
    let mut ids = k.route_ids().unwrap();
    ids.sort_unstable();
    assert_eq!(ids, cfg.models.iter().map(|x| x.id).collect::<Vec<_>>());
    for x in &cfg.models {
        assert_eq!(k.route(x.id).unwrap(), Some(route_entry(cfg, x)));
    }
    let mut ids = k.client_ids().unwrap();
    ids.sort_unstable();
    assert_eq!(ids, cfg.clients.iter().map(|c| c.id).collect::<Vec<_>>());
    for c in &cfg.clients {
        assert_eq!(k.client(c.id).unwrap(), Some(client_entry(c)));
    }
    let mut ids = k.vm_ids().unwrap();
    ids.sort_unstable();
    assert_eq!(ids, cfg.vms.iter().map(|v| v.id).collect::<Vec<_>>());
    for v in &cfg.vms {
        assert_eq!(k.vm(v.id).unwrap(), Some(vm_entry(v)));
    }
}

#[test]
fn sync_into_kernel_maps() {
    if !privileged("sync_into_kernel_maps") {
        return;
    }
    let mut k = kernel_maps();
    assert_eq!(k.config().unwrap(), Config::default());
    assert_eq!(k.route(42).unwrap(), None);

    let mut cfg = example();
    let r = sync(&cfg, true, &mut k).unwrap();
    assert_eq!(r.added, 5);
    assert_kernel_mirrors(&k, &cfg, true);

    cfg.models.retain(|x| x.id != 43);
    cfg.vms.clear();
    let r = sync(&cfg, true, &mut k).unwrap();
    assert_eq!(
        r,
        SyncReport {
            added: 0,
            updated: 3,
            removed: 2
        }
    );
    assert_eq!(k.route(43).unwrap(), None);
    assert_eq!(k.vm(1).unwrap(), None);
    assert_kernel_mirrors(&k, &cfg, true);

    // Removing what is already gone is not an error.
    k.remove_route(43).unwrap();
    k.remove_client(12345).unwrap();
    k.remove_vm(1).unwrap();
}

/// Removes a pin directory and its pins, even if the test panics.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        for name in [ROUTES_MAP, CLIENTS_MAP, VMS_MAP, CONFIG_MAP] {
            let _ = std::fs::remove_file(self.0.join(name));
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn sync_into_pinned_maps() {
    if !privileged("sync_into_pinned_maps") {
        return;
    }
    let bpffs = Path::new("/sys/fs/bpf");
    if !bpffs.is_dir() {
        let why = "bpffs is not mounted at /sys/fs/bpf: mount -t bpf bpf /sys/fs/bpf";
        if std::env::var_os("DEVPLANE_REQUIRE_PRIVILEGED")
            .is_some_and(|v| !v.is_empty() && v != "0")
        {
            panic!("sync_into_pinned_maps: {why}");
        }
        eprintln!("SKIPPED sync_into_pinned_maps: {why}");
        return;
    }
    let dir = PinDir(
        bpffs.join(
            format!(
                "devplane-control-test-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            )
            .replace(['(', ')'], ""),
        ),
    );
    std::fs::create_dir(&dir.0).unwrap();

    // Missing pins: a clear error naming the path.
    let e = AyaMaps::from_pinned(&dir.0).unwrap_err();
    assert!(matches!(e, MapSyncError::Open { .. }), "{e:?}");
    let m = e.to_string();
    assert!(
        m.starts_with(&format!(
            "cannot open pinned map {}/DP_ROUTES: ",
            dir.0.display()
        )),
        "{m}"
    );
    assert!(!m.contains('\n'), "{m}");

    let (routes, clients, vms, config) = kernel_maps().into_maps();
    routes.pin(dir.0.join(ROUTES_MAP)).unwrap();
    clients.pin(dir.0.join(CLIENTS_MAP)).unwrap();
    vms.pin(dir.0.join(VMS_MAP)).unwrap();
    config.pin(dir.0.join(CONFIG_MAP)).unwrap();

    let cfg = example();
    let mut k = AyaMaps::from_pinned(&dir.0).unwrap();
    assert_eq!(sync(&cfg, false, &mut k).unwrap().added, 5);
    drop(k);
    // A second opener (say, dpctl) sees what the first wrote.
    let k = AyaMaps::from_pinned(&dir.0).unwrap();
    assert_kernel_mirrors(&k, &cfg, false);
}

#[test]
fn pinned_map_with_wrong_layout_is_rejected() {
    if !privileged("pinned_map_with_wrong_layout_is_rejected") {
        return;
    }
    use aya::maps::{HashMap, MapData};
    let dir = PinDir(Path::new("/sys/fs/bpf").join(format!(
        "devplane-control-test-layout-{}",
        std::process::id()
    )));
    std::fs::create_dir(&dir.0).unwrap();
    // DP_ROUTES with u64 values instead of Route.
    HashMap::<MapData, u32, u64>::create(16, 0)
        .unwrap()
        .pin(dir.0.join(ROUTES_MAP))
        .unwrap();
    let m = AyaMaps::from_pinned(&dir.0).unwrap_err().to_string();
    assert!(
        m.contains("DP_ROUTES") && m.contains("invalid value size"),
        "{m}"
    );
}

#[test]
fn address_of_wrong_type_says_what_to_write() {
    let m = msg(&BASE.replacen("\"10.99.0.2\"", "10", 1));
    assert_eq!(
        m,
        "line 13, column 11 (address = 10): invalid type: integer `10`, expected an IPv4 address in quotes, e.g. address = \"10.99.0.1\""
    );
}

#[test]
fn a_client_budget_parses_validates_and_reaches_the_entry() {
    let text = "[server]\nid = 1\nmode = \"socket\"\nworkers = [0]\n\
                [[clients]]\nid = 7\naddress = \"10.99.0.1\"\nbudget = { rate = 500, burst = 16 }\n\
                [[clients]]\nid = 8\naddress = \"10.99.0.3\"\n";
    let cfg = ServerConfig::from_toml_str(text).unwrap();
    let budgeted = devplane_control::maps::client_entry(&cfg.clients[0]);
    assert_eq!((budgeted.rate, budgeted.burst), (500, 16));
    let unlimited = devplane_control::maps::client_entry(&cfg.clients[1]);
    assert_eq!((unlimited.rate, unlimited.burst), (0, 0));

    let too_big = text.replace(
        "burst = 16",
        &format!("burst = {}", devplane_wire::maps::MAX_BURST + 1),
    );
    let e = ServerConfig::from_toml_str(&too_big)
        .and_then(|c| c.validate().map(|()| c))
        .unwrap_err();
    assert!(e.to_string().contains("clients.budget.burst"), "{e}");
    let unknown = text.replace("burst = 16", "burst = 16, ceiling = 3");
    assert!(ServerConfig::from_toml_str(&unknown).is_err());
}
