//! `devplane-server`: runs a devplane server from a configuration file
//! until Ctrl-C, then detaches XDP, removes its pinned maps and its control
//! socket, and prints its counters. `dpctl` talks to it on the control
//! socket.

use std::path::PathBuf;
use std::sync::mpsc;

use clap::Parser;
use devplane_control::config::{Mode, ServerConfig};
use devplane_control::db::{Db, ServerSettings, server_config_of};
use devplane_control::socket::{ControlSocket, Pending};
use devplane_control::store::agent::{Agent, AgentConfig};
use devplane_control::store::{AgentKind, Snapshot, StoreUrl};
use devplane_server::Server;
use devplane_server::control;

/// Runs a devplane server (XDP + AF_XDP workers, or plain UDP sockets).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The server configuration (TOML); see control/examples/server.toml.
    #[arg(long, short)]
    config: PathBuf,
    /// The control socket dpctl talks to (default
    /// /run/devplane/server-<id>.sock).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Take clients, VMs and models from the identifier database in this
    /// state directory (dpctl's) instead of the configuration file, which
    /// then only gives the [server] and [tuning] settings. The maps are
    /// written from the database at start, which also repairs them after a
    /// crash between a database write and its map update.
    #[arg(long, value_name = "DIR", conflicts_with = "store")]
    state: Option<PathBuf>,
    /// Be an agent of the identifier store (`file:DIR` or
    /// `etcd:http://HOST:PORT`): take clients, VMs and models from it
    /// (the configuration file gives only [server] and [tuning]), watch
    /// it and follow every change live, and register under a lease so
    /// that `dpctl --store URL status` shows this server up.
    #[arg(long, value_name = "URL")]
    store: Option<StoreUrl>,
    /// With --store: the lease's time to live, milliseconds (the server
    /// shows down this long after it dies).
    #[arg(long, value_name = "MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(2000..=600_000))]
    lease_ttl_ms: u64,
}

enum Event {
    Stop,
    Control(Pending),
    Store(Box<Snapshot>),
}

/// Brings the server to the store's snapshot and records the outcome.
fn follow(server: &mut Server, settings: &ServerSettings, snap: &Snapshot, agent: &Agent) -> bool {
    let id = settings.server.id;
    let outcome = server_config_of(&snap.state, settings)
        .map_err(|e| e.to_string())
        .and_then(|want| server.reconcile(&want).map_err(|errs| errs.join("; ")))
        .and_then(|steps| {
            // Forward routes: only an XDP owner has any to keep.
            let want = devplane_control::store::plan::forwards_of(&snap.state, id);
            if want.is_empty() && server.forwards().is_empty() {
                return Ok(steps);
            }
            server
                .reconcile_forwards(&want)
                .map(|n| steps + n)
                .map_err(|errs| errs.join("; "))
        });
    match outcome {
        Ok(steps) => {
            if steps > 0 {
                eprintln!(
                    "devplane-server {id}: store revision {}: {steps} changes applied",
                    snap.revision
                );
            }
            agent.set_applied(snap.revision, None);
            true
        }
        Err(e) => {
            eprintln!(
                "devplane-server {id}: store revision {}: not all applied: {e}",
                snap.revision
            );
            agent.set_applied(snap.revision, Some(e));
            false
        }
    }
}

fn main() {
    let args = Args::parse();
    let cfg = match ServerConfig::from_file(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("devplane-server: {}: {e}", args.config.display());
            std::process::exit(2);
        }
    };
    let mut db = None;
    let settings = ServerSettings::from_config(&cfg, cfg.server.mode == Mode::Xdp);
    let cfg = match (&args.state, &args.store) {
        (None, Some(url)) => {
            let loaded = devplane_control::store::open(url).and_then(|mut s| s.load());
            let snap = match loaded {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("devplane-server: {e}");
                    std::process::exit(2);
                }
            };
            match server_config_of(&snap.state, &settings) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!(
                        "devplane-server: store {url} (revision {}): {e}",
                        snap.revision
                    );
                    std::process::exit(2);
                }
            }
        }
        (None, None) => cfg,
        (Some(dir), _) => {
            let opened =
                Db::open_existing(dir).and_then(|d| d.server_config(&settings).map(|c| (d, c)));
            match opened {
                Ok((d, c)) => {
                    if d.needs_repair() {
                        eprintln!(
                            "devplane-server: database generation {} is newer than the maps ({}): repairing",
                            d.generation(),
                            d.applied_generation()
                        );
                    }
                    db = Some(d);
                    c
                }
                Err(e) => {
                    eprintln!("devplane-server: {}: {e}", dir.display());
                    std::process::exit(2);
                }
            }
        }
    };
    let mut server = match Server::start(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devplane-server: cannot start: {e}");
            std::process::exit(1);
        }
    };
    // The maps now hold the database's generation.
    if let Some(d) = db.as_mut()
        && let Err(e) = d.mark_applied()
    {
        eprintln!("devplane-server: cannot record the applied generation: {e}");
    }
    let (tx, rx) = mpsc::channel::<Event>();
    let stop_tx = tx.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = stop_tx.send(Event::Stop);
    }) {
        eprintln!("devplane-server: cannot install the Ctrl-C handler: {e}");
        std::process::exit(1);
    }
    let path = args
        .control
        .unwrap_or_else(|| devplane_control::proto::default_socket(cfg.server.id));
    let (ctl_tx, ctl_rx) = mpsc::channel::<Pending>();
    let control = match ControlSocket::bind(&path, ctl_tx) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "devplane-server: cannot listen on {}: {e} (pass --control PATH)",
                path.display()
            );
            std::process::exit(1);
        }
    };
    // The store agent: every new snapshot goes to this thread, which owns
    // the server.
    let agent = args.store.as_ref().map(|url| {
        let store_tx = tx.clone();
        let cfg = AgentConfig {
            url: url.clone(),
            kind: AgentKind::Server,
            id: cfg.server.id,
            ttl: std::time::Duration::from_millis(args.lease_ttl_ms),
            verbose: true,
        };
        match Agent::spawn(cfg, move |snap| {
            let _ = store_tx.send(Event::Store(Box::new(snap.clone())));
        }) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("devplane-server: cannot start the store agent: {e}");
                std::process::exit(1);
            }
        }
    });
    let fwd = tx.clone();
    std::thread::spawn(move || {
        for p in ctl_rx {
            if fwd.send(Event::Control(p)).is_err() {
                break;
            }
        }
    });
    match server.attach_mode() {
        Some(mode) => eprintln!(
            "devplane-server {}: XDP attached ({mode:?} mode), {} workers, {}, control socket {}; Ctrl-C stops",
            server.id(),
            cfg.server.workers.len(),
            server
                .xsk_layout()
                .map(|l| l.to_string())
                .unwrap_or_default(),
            control.path().display()
        ),
        None => eprintln!(
            "devplane-server {}: socket mode on UDP port {}, {} workers, control socket {}; Ctrl-C stops",
            server.id(),
            cfg.server.port,
            cfg.server.workers.len(),
            control.path().display()
        ),
    }
    // A snapshot not applied whole is tried again (every quarter second,
    // the tick that also ends key rotations' grace periods).
    let mut pending: Option<Box<Snapshot>> = None;
    loop {
        if let Err(e) = server.tick_keys() {
            eprintln!("devplane-server {}: {}", server.id(), e.join("; "));
        }
        let ev = match rx.recv_timeout(std::time::Duration::from_millis(250)) {
            Ok(ev) => ev,
            Err(mpsc::RecvTimeoutError::Timeout) => match pending.take() {
                Some(snap) => Event::Store(snap),
                None => continue,
            },
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        match ev {
            Event::Stop => break,
            Event::Control(p) => control::serve(&mut server, p),
            Event::Store(snap) => {
                if let Some(a) = &agent
                    && !follow(&mut server, &settings, &snap, a)
                {
                    pending = Some(snap);
                } else {
                    pending = None;
                }
            }
        }
    }
    drop(agent);
    drop(control);
    let workers = server.worker_stats();
    let xdp = server.xdp_stats();
    server.stop();
    for (i, w) in workers.iter().enumerate() {
        eprintln!(
            "worker {i}: rx {} tx {} datagrams {} records {} malformed {} irqs sent {}",
            w.rx, w.tx, w.datagrams, w.records, w.malformed, w.irqs_sent
        );
    }
    if let Some(Ok(stats)) = xdp {
        for (name, v) in stats.nonzero() {
            eprintln!("xdp {name}: {v}");
        }
    }
}
