//! `devplane-client`: the client daemon. Holds the VMs of its configuration
//! file and launches, shuts down, suspends, resumes, snapshots, restores
//! or migrates them when `dpctl vms ...` asks on its control socket; until Ctrl-C, which stops every VM, removes
//! the socket and exits 0.

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use clap::Parser;
use devplane_control::proto::{VcpuEnd, VmStatus};
use devplane_control::socket::{ControlSocket, Pending};
use devplane_vmm::daemon::Daemon;
use devplane_vmm::daemon::config::ClientFile;

/// How often guests that stopped by themselves are noticed.
const REAP_EVERY: Duration = Duration::from_millis(200);

/// Runs a devplane client daemon: KVM VMs launched and shut down on
/// request (dpctl vms launch|shutdown|running), their device exits sent to
/// local models or to devplane servers.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The client configuration (TOML); see dataplane/vmm/examples/client.toml.
    #[arg(long, short, value_name = "CLIENT.TOML")]
    config: PathBuf,
    /// The control socket dpctl talks to (default
    /// `/run/devplane/client-<id>.sock`).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
}

enum Event {
    Stop,
    Control(Pending),
}

fn ends(ended: &[VcpuEnd]) -> String {
    ended
        .iter()
        .map(|e| {
            let how = match (&e.value, &e.error) {
                (Some(v), _) => format!("{} {v}", e.exit),
                (None, Some(err)) => format!("{} ({err})", e.exit),
                (None, None) => e.exit.clone(),
            };
            let failed = match e.failed {
                0 => String::new(),
                n => format!(", {n} remote requests FAILED"),
            };
            format!("vCPU {} {how} after {} exits{failed}", e.vcpu, e.exits)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn report(what: &str, s: &VmStatus) {
    eprintln!("devplane-client: VM {} {what}: {}", s.vm, ends(&s.ended));
}

fn main() {
    let args = Args::parse();
    let file = match ClientFile::from_file(&args.config) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("devplane-client: {}: {e}", args.config.display());
            std::process::exit(2);
        }
    };
    let path = args
        .control
        .unwrap_or_else(|| devplane_control::proto::default_client_socket(file.client.id));
    let vms = file.vms.len();
    let mut daemon = Daemon::new(file);
    let (tx, rx) = mpsc::channel::<Event>();
    let stop_tx = tx.clone();
    if let Err(e) = ctrlc::set_handler(move || {
        let _ = stop_tx.send(Event::Stop);
    }) {
        eprintln!("devplane-client: cannot install the Ctrl-C handler: {e}");
        std::process::exit(1);
    }
    let (ctl_tx, ctl_rx) = mpsc::channel::<Pending>();
    let control = match ControlSocket::bind(&path, ctl_tx) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "devplane-client: cannot listen on {}: {e} (pass --control PATH)",
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
    eprintln!(
        "devplane-client {}: {vms} VMs configured, none running, control socket {}; Ctrl-C stops",
        daemon.client_id(),
        control.path().display()
    );
    loop {
        match rx.recv_timeout(REAP_EVERY) {
            Ok(Event::Stop) | Err(RecvTimeoutError::Disconnected) => break,
            Ok(Event::Control(p)) => {
                let answer = daemon.handle(p.request);
                let _ = p.reply.send(answer);
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        for s in daemon.reap() {
            report("stopped by itself", &s);
        }
    }
    drop(control);
    for s in daemon.shutdown_all() {
        report("shut down", &s);
    }
    eprintln!("devplane-client {}: stopped", daemon.client_id());
}
