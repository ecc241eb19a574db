//! `devplane-server`: runs a devplane server from a configuration file
//! until Ctrl-C, then detaches XDP, removes its pinned maps and prints its
//! counters.

use std::path::PathBuf;
use std::sync::mpsc;

use clap::Parser;
use devplane_control::config::ServerConfig;
use devplane_dataplane::server::Server;

/// Runs a devplane server (XDP + AF_XDP workers, or plain UDP sockets).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The server configuration (TOML); see control/examples/server.toml.
    #[arg(long, short)]
    config: PathBuf,
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
    let server = match Server::start(&cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("devplane-server: cannot start: {e}");
            std::process::exit(1);
        }
    };
    match server.attach_mode() {
        Some(mode) => eprintln!(
            "devplane-server {}: XDP attached ({mode:?} mode), {} workers; Ctrl-C stops",
            server.id(),
            cfg.server.workers.len()
        ),
        None => eprintln!(
            "devplane-server {}: socket mode on UDP port {}, {} workers; Ctrl-C stops",
            server.id(),
            cfg.server.port,
            cfg.server.workers.len()
        ),
    }
    let (tx, rx) = mpsc::channel();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = tx.send(());
    }) {
        eprintln!("devplane-server: cannot install the Ctrl-C handler: {e}");
        std::process::exit(1);
    }
    let _ = rx.recv();
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
