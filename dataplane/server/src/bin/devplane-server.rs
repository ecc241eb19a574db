//! `devplane-server`: runs a devplane server from a configuration file
//! until Ctrl-C, then detaches XDP, removes its pinned maps and its control
//! socket, and prints its counters. `dpctl` talks to it on the control
//! socket.

use std::path::PathBuf;
use std::sync::mpsc;

use clap::Parser;
use devplane_control::config::{Mode, ServerConfig};
use devplane_control::db::{Db, ServerSettings};
use devplane_control::socket::{ControlSocket, Pending};
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
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
}

enum Event {
    Stop,
    Control(Pending),
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
    let cfg = match &args.state {
        None => cfg,
        Some(dir) => {
            let settings = ServerSettings::from_config(&cfg, cfg.server.mode == Mode::Xdp);
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
    for ev in rx {
        match ev {
            Event::Stop => break,
            Event::Control(p) => {
                let answer = control::handle(&mut server, p.request);
                let _ = p.reply.send(answer);
            }
        }
    }
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
