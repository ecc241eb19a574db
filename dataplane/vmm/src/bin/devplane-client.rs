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
use devplane_control::store::agent::{Agent, AgentConfig};
use devplane_control::store::{AgentKind, Snapshot, StoreUrl};
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
    /// Be an agent of the identifier store (`file:DIR` or
    /// `etcd:http://HOST:PORT`): run the VMs it places on this client
    /// platform in the state it asks for (their guests and device layout
    /// come from the configuration file; their remote devices go to the
    /// servers the store places their models on), and follow every change.
    #[arg(long, value_name = "URL")]
    store: Option<StoreUrl>,
    /// With --store: the lease's time to live, milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(2000..=600_000))]
    lease_ttl_ms: u64,
}

enum Event {
    Stop,
    Control(Pending),
    Store(Box<Snapshot>),
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
    let agent = args.store.as_ref().map(|url| {
        let store_tx = tx.clone();
        let cfg = AgentConfig {
            url: url.clone(),
            kind: AgentKind::Client,
            id: daemon.client_id(),
            ttl: Duration::from_millis(args.lease_ttl_ms),
            verbose: true,
        };
        match Agent::spawn(cfg, move |snap| {
            let _ = store_tx.send(Event::Store(Box::new(snap.clone())));
        }) {
            Ok(a) => a,
            Err(e) => {
                eprintln!("devplane-client: cannot start the store agent: {e}");
                std::process::exit(1);
            }
        }
    });
    let mut pending: Option<Box<Snapshot>> = None;
    let mut last_retry = std::time::Instant::now();
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
            Ok(Event::Store(snap)) => pending = Some(snap),
            Err(RecvTimeoutError::Timeout) => {}
        }
        // The latest snapshot, applied now (or again each second until it
        // applies whole).
        if let (Some(a), Some(snap)) = (&agent, pending.as_ref())
            && (last_retry.elapsed() >= Duration::from_secs(1)
                || a.applied_revision() != snap.revision)
        {
            last_retry = std::time::Instant::now();
            match daemon.reconcile(&snap.state) {
                Ok(steps) => {
                    if steps > 0 {
                        eprintln!(
                            "devplane-client {}: store revision {}: {steps} changes applied",
                            daemon.client_id(),
                            snap.revision
                        );
                    }
                    a.set_applied(snap.revision, None);
                    pending = None;
                }
                Err(errs) => {
                    let e = errs.join("; ");
                    eprintln!(
                        "devplane-client {}: store revision {}: not all applied: {e}",
                        daemon.client_id(),
                        snap.revision
                    );
                    a.set_applied(snap.revision, Some(e));
                }
            }
        }
        if let Err(e) = daemon.tick_keys() {
            eprintln!("devplane-client {}: {e}", daemon.client_id());
        }
        for s in daemon.reap() {
            report("stopped by itself", &s);
        }
    }
    drop(agent);
    drop(control);
    for s in daemon.shutdown_all() {
        report("shut down", &s);
    }
    eprintln!("devplane-client {}: stopped", daemon.client_id());
}
