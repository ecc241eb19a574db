//! `dpctl`: inspect and change devplane's identifier database, and drive
//! the running daemons: a server (`--socket`) and a client daemon
//! (`--client-socket`).
//!
//! Tables for people, `--json` for scripts. Exit codes: 0 success, 1 the
//! operation was refused or failed, 2 bad usage, 3 an id named on the
//! command line does not exist. Every error is one line on stderr that
//! starts with `dpctl: `.

use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use devplane_control::config::Budget;
use devplane_control::db::{
    Change, Client, Db, DbError, Hypervisor, Kind, Model, Server, State, Vm, VmState,
};
use serde_json::{Value, json};

#[path = "dpctl/apply.rs"]
mod apply;
#[path = "dpctl/client.rs"]
mod client;
#[path = "dpctl/cluster.rs"]
mod cluster;
#[path = "dpctl/console.rs"]
mod console;
#[path = "dpctl/daemon.rs"]
mod daemon;
#[path = "dpctl/keys.rs"]
mod keys;
#[path = "dpctl/mover.rs"]
mod mover;
#[path = "dpctl/render.rs"]
mod render;
use render::*;

/// Exit code: the operation was refused or failed.
const EXIT_FAILED: u8 = 1;
/// Exit code: bad usage (clap's own code).
const EXIT_USAGE: u8 = 2;
/// Exit code: an id named on the command line does not exist.
const EXIT_NOT_FOUND: u8 = 3;

/// Inspect and change devplane's identifier database: client platforms,
/// hypervisors, VMs, device models and servers; drive a running server
/// (--socket) and a running client daemon (--client-socket).
///
/// Exit codes: 0 ok, 1 refused or failed, 2 bad usage, 3 unknown id.
#[derive(Debug, Parser)]
#[command(name = "dpctl", version, propagate_version = true)]
struct Cli {
    /// State directory holding the database.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "DEVPLANE_STATE",
        default_value = "/var/lib/devplane"
    )]
    state: PathBuf,
    /// The identifier store: `file:DIR` (the database in DIR, as --state)
    /// or `etcd:http://HOST:PORT` (a cluster's etcd). With --store, the
    /// agents (devplane-server and devplane-client run with the same
    /// --store) follow every change by themselves, and `status` shows
    /// them; without it, the database is --state's.
    #[arg(long, global = true, value_name = "URL", env = "DEVPLANE_STORE")]
    store: Option<devplane_control::store::StoreUrl>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Control socket of the running server (for stats, tune, models
    /// move (the source of --to-server), models forward/unforward, models
    /// add/remove with --apply-to, clients rotate-key, vms
    /// suspend/resume/migrate/restore, vms console).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "DEVPLANE_SOCKET",
        default_value = "/run/devplane/server-1.sock"
    )]
    socket: PathBuf,
    /// Control socket of the running client daemon, devplane-client (for
    /// vms launch/shutdown/running/suspend/resume/snapshot/restore, the
    /// source of vms migrate --to-client, clients rotate-key, and the
    /// client retargeted by models move --to-server).
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        env = "DEVPLANE_CLIENT_SOCKET",
        default_value = "/run/devplane/client-1.sock"
    )]
    client_socket: PathBuf,
    /// Apply database changes to the running server with this
    /// configuration file: after the change is saved, the server's pinned
    /// maps (its `pin_dir`) are synced to the database.
    #[arg(
        long,
        global = true,
        value_name = "SERVER.TOML",
        env = "DEVPLANE_APPLY_TO"
    )]
    apply_to: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create the state directory and an empty database (every other
    /// command refuses a state directory that does not exist).
    Init,
    /// Show the database's generation, the generation the maps hold, and
    /// how many of each entity there are; with --store, the store's
    /// revision and every server and client agent, up or down (its
    /// lease), with the revision it applied and its lag.
    Status,
    /// Client platforms: hosts that run VMs.
    #[command(subcommand)]
    Clients(ClientsCmd),
    /// Hypervisors on client platforms.
    #[command(subcommand)]
    Hypervisors(HypervisorsCmd),
    /// VMs (guests).
    #[command(subcommand)]
    Vms(VmsCmd),
    /// Device models, each served by one worker of one server.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Server platforms: hosts that run device models.
    #[command(subcommand)]
    Servers(ServersCmd),
    /// A running server's counters: per worker, and the XDP program's
    /// verdicts and drop reasons.
    Stats {
        /// Refresh every SECS seconds until interrupted.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
        /// With --watch: stop after this many refreshes.
        #[arg(long, value_name = "N", requires = "watch")]
        count: Option<u64>,
    },
    /// Change a running server's polling settings, live.
    Tune {
        /// Empty polls before a worker sleeps.
        #[arg(long, value_name = "N")]
        spin_budget: Option<u32>,
        /// Longest idle sleep, microseconds (at most 10000).
        #[arg(long, value_name = "US")]
        idle_sleep_us: Option<u64>,
        /// Most frames per poll (1 to 2048).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        batch: Option<u32>,
    },
}

/// An entity id: a nonzero integer.
#[derive(Debug, clap::Args)]
struct IdArg {
    /// The id (nonzero).
    #[arg(value_parser = clap::value_parser!(u32).range(1..))]
    id: u32,
}

#[derive(Debug, Subcommand)]
enum ClientsCmd {
    /// List client platforms.
    List,
    /// Show one client platform, its hypervisors and VMs.
    Show(IdArg),
    /// Register a client platform, with a new random tag key (key 1):
    /// its servers and its client daemon then seal and verify every
    /// datagram, and a datagram from its address without the key is
    /// refused. Daemons run with --store take the key from the store; a
    /// client daemon run from its TOML alone needs the line
    /// `clients export-key` prints.
    Add {
        #[command(flatten)]
        id: IdArg,
        /// Its IPv4 address (unique among clients).
        #[arg(long, value_name = "IP")]
        address: Ipv4Addr,
        /// No tag key: the client is whoever can send from its address
        /// (a trusted, isolated network only; `rotate-key` gives one
        /// later without stopping traffic).
        #[arg(long)]
        no_key: bool,
    },
    /// Print a client platform's current tag key as the `tag_key = "..."`
    /// line of its client TOML's [client] (or a server TOML's
    /// [[clients]] entry), for a daemon run without --store. It is a
    /// secret: keep that file 0600, root's.
    ExportKey(IdArg),
    /// Remove a client platform (refused while it hosts hypervisors or VMs).
    Remove(IdArg),
    /// Set a client platform's budget at the servers' XDP programs: at
    /// most BURST datagrams at once and RATE per second on each CPU, the
    /// rest dropped (drop_over_budget). With --apply-to, the server's maps
    /// change at once. --burst 0 removes the budget.
    Budget {
        #[command(flatten)]
        id: IdArg,
        /// Datagrams per second.
        #[arg(long, value_name = "R")]
        rate: u32,
        /// Datagrams at once (0: no budget).
        #[arg(long, value_name = "B",
              value_parser = clap::value_parser!(u32).range(0..=i64::from(devplane_wire::maps::MAX_BURST)))]
        burst: u32,
    },
    /// Give a client platform a new tag key (random, the next key id)
    /// without stopping its traffic: saved in the database, handed to the
    /// running servers (--server-socket, else --socket) and the client
    /// daemon (--client-socket), which accept the old and the new key for
    /// the grace period, then only the new. Also gives a client without
    /// a key its first (its untagged datagrams are then refused).
    /// With --store etcd:...: one store change, and the agents take the
    /// key from the store (the old key is accepted for their grace
    /// period, 2 s; --grace-ms and the socket options do not apply).
    RotateKey {
        #[command(flatten)]
        id: IdArg,
        /// How long both keys are accepted, in milliseconds: enough for
        /// datagrams sealed under the old key to arrive.
        #[arg(long, value_name = "MS", default_value_t = 1000,
              value_parser = clap::value_parser!(u64).range(0..=600_000))]
        grace_ms: u64,
        /// The control socket of a running server to hand the key to
        /// (repeat for every server; default: --socket).
        #[arg(long = "server-socket", value_name = "PATH")]
        server_sockets: Vec<PathBuf>,
        /// Do not hand the key to a client daemon.
        #[arg(long)]
        no_client: bool,
        /// Only save the key in the database (no daemon is told: for a
        /// platform whose daemons are not running).
        #[arg(long, conflicts_with_all = ["server_sockets", "no_client"])]
        db_only: bool,
    },
}

#[derive(Debug, Subcommand)]
enum HypervisorsCmd {
    /// List hypervisors.
    List,
    /// Show one hypervisor and its VMs.
    Show(IdArg),
    /// Register a hypervisor on a client platform.
    Add {
        #[command(flatten)]
        id: IdArg,
        /// The client platform it runs on.
        #[arg(long, value_name = "ID")]
        client: u32,
    },
    /// Remove a hypervisor (refused while it hosts VMs).
    Remove(IdArg),
}

#[derive(Debug, Subcommand)]
enum VmsCmd {
    /// List VMs.
    List,
    /// Show one VM and the models that send it interrupts.
    Show(IdArg),
    /// Register a VM (stopped) on a hypervisor; its client is the
    /// hypervisor's.
    Add {
        #[command(flatten)]
        id: IdArg,
        /// The hypervisor that runs it.
        #[arg(long, value_name = "ID")]
        hypervisor: u32,
    },
    /// Remove a stopped VM (refused while a model sends it interrupts).
    Remove(IdArg),
    /// Place the VM on another hypervisor (and so its client platform):
    /// with --store, the client agents stop it where it ran and start it
    /// there, and the servers send its interrupts to the new client.
    Place {
        #[command(flatten)]
        id: IdArg,
        /// The hypervisor that runs it from now on.
        #[arg(long, value_name = "ID")]
        hypervisor: u32,
    },
    /// Set the state the VM should be in (running, suspended, stopped):
    /// with --store, its client agent launches, holds or stops it.
    SetState {
        #[command(flatten)]
        id: IdArg,
        /// running, suspended or stopped.
        #[arg(value_name = "STATE", value_parser = parse_vm_state)]
        want: VmState,
    },
    /// Suspend the VM on its client daemon and server.
    ///
    /// The client daemon that runs it (--client-socket)
    /// takes its vCPUs out of the guest and holds them, then the server
    /// (--socket) holds its interrupts. A vCPU waiting for a device's
    /// answer finishes that access first: nothing is lost or repeated.
    Suspend {
        #[command(flatten)]
        id: IdArg,
        /// Only hold its interrupts on the server (no client daemon runs
        /// it).
        #[arg(long)]
        server_only: bool,
    },
    /// Resume a suspended VM on its client daemon and server.
    ///
    /// Its vCPUs run again on the client daemon, then the server delivers its held interrupts, in order, and the next
    /// ones.
    Resume {
        #[command(flatten)]
        id: IdArg,
        /// Only deliver its interrupts on the server (no client daemon runs
        /// it).
        #[arg(long)]
        server_only: bool,
    },
    /// Send the VM's interrupts to another client platform (--client), or
    /// live-migrate it to another client daemon (--to-client).
    ///
    /// With --client C: the server sends the VM's interrupts to client C
    /// from now on; the VM does not move.
    ///
    /// With --to-client C: live-migrate the VM from the client
    /// daemon at --client-socket to the one of client C
    /// (--to-client-socket): guest memory is copied while the guest runs
    /// (KVM's dirty log, rounds until few pages are left), then the VM is
    /// suspended and the rest of memory and its vCPU, interrupt-controller
    /// and local-device state are copied; the server holds the VM's
    /// interrupts meanwhile and then sends them to C; the VM runs on at C
    /// and is freed at the source. If the copy fails (the target went
    /// away) the VM runs on at the source.
    #[command(group = clap::ArgGroup::new("target").required(true))]
    Migrate {
        #[command(flatten)]
        id: IdArg,
        /// The client platform it now runs on (the server only).
        #[arg(long, value_name = "ID", group = "target")]
        client: Option<u32>,
        /// Live-migrate it to this client platform's daemon.
        #[arg(long, value_name = "ID", group = "target")]
        to_client: Option<u32>,
        /// The control socket of the target client daemon (default
        /// /run/devplane/client-<C>.sock).
        #[arg(long, value_name = "PATH", requires = "to_client")]
        to_client_socket: Option<PathBuf>,
    },
    /// Start the VM on the running client daemon (--client-socket), as its
    /// configuration file describes it.
    Launch(IdArg),
    /// Stop the VM on the running client daemon and show how its vCPUs
    /// ended (also for a guest that had already stopped by itself).
    Shutdown(IdArg),
    /// List the client daemon's VMs: whether each runs, for how long, and
    /// how it last ended.
    Running,
    /// Write a snapshot of a suspended VM to FILE on the client daemon's
    /// host.
    ///
    /// Suspend it first (dpctl vms suspend). The file holds guest memory, every vCPU's state, the
    /// in-kernel interrupt controllers, PIT and clock, the local device
    /// models and the vCPUs' request sequences. Its remote models stay on
    /// their servers.
    Snapshot {
        #[command(flatten)]
        id: IdArg,
        /// The snapshot file (replaced whole).
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Attach this terminal to the VM's console: its UART model on the
    /// server (--socket).
    ///
    /// What the guest writes is shown as it comes (first the last few KiB
    /// it wrote before); what is typed goes to the guest's UART, with its
    /// receive interrupt. Ctrl-] (--escape) detaches. One viewer at a time
    /// may type (a second is refused); the others watch with --read-only
    /// (16 viewers at most, the writer included). A viewer that does not keep up loses bytes (told so),
    /// never slowing the guest or the others. The console stays attached
    /// through the VM's suspend, snapshot and migration: the model does
    /// not move.
    Console {
        #[command(flatten)]
        id: IdArg,
        /// Watch only: nothing typed reaches the guest.
        #[arg(long)]
        read_only: bool,
        /// The UART model, when the VM has several on this server.
        #[arg(long, value_name = "ID")]
        model: Option<u32>,
        /// The detach key: ^X, ctrl-X or a hex byte (a control character).
        #[arg(long, value_name = "KEY", default_value = "^]")]
        escape: String,
    },
    /// Start the VM of a snapshot FILE on client C's daemon.
    ///
    /// The client daemon at --client-socket must be client C and have the
    /// VM configured: the server (--socket) then sends the VM's interrupts to client C,
    /// its vCPUs run on from where the snapshot left them, and the server
    /// delivers the interrupts it held. Shut down the VM where it ran
    /// before.
    Restore {
        /// The snapshot file, as dpctl vms snapshot wrote it.
        #[arg(value_name = "FILE")]
        file: PathBuf,
        /// The client platform that runs it from now on.
        #[arg(long, value_name = "ID")]
        client: u32,
    },
}

#[derive(Debug, Subcommand)]
enum ModelsCmd {
    /// List device models.
    List,
    /// Show one device model.
    Show(IdArg),
    /// Register a device model on a server's worker.
    Add {
        #[command(flatten)]
        id: IdArg,
        /// Device model kind, e.g. counter.
        #[arg(long, value_name = "KIND")]
        kind: String,
        /// The server that owns it.
        #[arg(long, value_name = "ID")]
        server: u32,
        /// Index of the worker on that server that serves it.
        #[arg(long, value_name = "INDEX")]
        worker: u32,
        /// Interrupt line (GSI) it raises; needs --vm.
        #[arg(long, value_name = "GSI", requires = "vm")]
        line: Option<u32>,
        /// The VM its interrupts go to.
        #[arg(long, value_name = "ID")]
        vm: Option<u32>,
        /// Base I/O port (decimal or 0x hex).
        #[arg(long, value_name = "PORT", value_parser = parse_u16)]
        pio_base: Option<u16>,
        /// Base guest-physical MMIO address (decimal or 0x hex).
        #[arg(long, value_name = "ADDR", value_parser = parse_u64)]
        mmio_base: Option<u64>,
        /// A file on the server the model keeps its data in (the
        /// blockstore's disk image, the uart's console log).
        #[arg(long, value_name = "PATH")]
        backing: Option<std::path::PathBuf>,
    },
    /// Remove a device model.
    Remove(IdArg),
    /// Place a device model on a server and worker in the store: with
    /// --store, the server agents drop it where it was and serve it there
    /// (a new worker of the same server keeps its state; another server
    /// starts it afresh).
    Place {
        #[command(flatten)]
        id: IdArg,
        /// The server that owns it from now on.
        #[arg(long, value_name = "ID")]
        server: u32,
        /// The worker index on that server.
        #[arg(long, value_name = "INDEX")]
        worker: u32,
    },
    /// Move a device model to another worker of its running server
    /// (--to-worker), or to another server (--to-server), while traffic
    /// flows (its state goes with it).
    ///
    /// With --to-server S: the two-phase hand-over between the server
    /// that runs it (--socket) and server S (--to-server-socket): the
    /// source lends it (not served; its state, duplicate windows and
    /// unacknowledged interrupts handed over), S builds it (not served),
    /// every client daemon whose VMs use it (--retarget-client, default
    /// --client-socket) points it at S (requests in flight are resent
    /// there, applied once), S serves it, the source drops its copy. A
    /// step that fails before S serves it cancels the move: the model
    /// stays served by the source, and dpctl says at which step and why.
    /// Run again with the same S, it first settles a move left
    /// unfinished (a dpctl killed half-way, or in doubt): finished if S
    /// committed, else cancelled (the source serves it again) and redone.
    Move {
        #[command(flatten)]
        id: IdArg,
        /// The worker index to move it to (with --to-server: on the
        /// target; default 0).
        #[arg(long, value_name = "INDEX", required_unless_present = "to_server")]
        to_worker: Option<usize>,
        /// Move it to this server.
        #[arg(long, value_name = "ID")]
        to_server: Option<u32>,
        /// The control socket of the target server (default
        /// /run/devplane/server-<S>.sock).
        #[arg(long, value_name = "PATH", requires = "to_server")]
        to_server_socket: Option<PathBuf>,
        /// The control socket of a client daemon whose VMs may use the
        /// model, told to retarget it (repeat for every client daemon;
        /// default --client-socket).
        #[arg(long = "retarget-client", value_name = "PATH", requires = "to_server")]
        retarget_clients: Vec<PathBuf>,
        /// Settling a move left unfinished whose target restarted since
        /// the lend: serve the source's copy again although the target
        /// may have committed and acknowledged writes since (lost with
        /// it; the source's copy is older).
        #[arg(long, requires = "to_server")]
        accept_rollback: bool,
    },
    /// On an owner server (--socket): forward a device model's requests
    /// to the I/O server that hosts it, live (the owner's XDP program
    /// rewrites them and sends them on; the I/O server answers the
    /// client straight). Clients then reach the model through the owner
    /// (a client's [[servers]] entry with via = the owner's address).
    /// With --store etcd:... and --owner: a store change instead; the
    /// owner's agent installs the route (the I/O server is the model's,
    /// its MAC the owner's neighbour entry for its address) and client
    /// agents launch the model's VMs sending through the owner.
    Forward {
        #[command(flatten)]
        id: IdArg,
        /// With --store: the owner server that forwards it.
        #[arg(long, value_name = "ID", conflicts_with_all = ["to_server", "ip", "mac"])]
        owner: Option<u32>,
        /// The I/O server's platform id.
        #[arg(long, value_name = "ID", required_unless_present = "owner")]
        to_server: Option<u32>,
        /// Its IPv4 address.
        #[arg(long, value_name = "IP", required_unless_present = "owner")]
        ip: Option<Ipv4Addr>,
        /// Its MAC address (or the next hop's on the owner's link),
        /// aa:bb:cc:dd:ee:ff.
        #[arg(long, value_name = "MAC", value_parser = parse_mac, required_unless_present = "owner")]
        mac: Option<[u8; 6]>,
    },
    /// On an owner server (--socket): stop forwarding a device model.
    /// With --store etcd:...: a store change (clients reach the model on
    /// its server straight; the owner's agent removes its route).
    Unforward(IdArg),
}

#[derive(Debug, Subcommand)]
enum ServersCmd {
    /// List server platforms.
    List,
    /// Show one server platform and its models.
    Show(IdArg),
    /// Register a server platform.
    Add {
        #[command(flatten)]
        id: IdArg,
        /// Its IPv4 address (unique among servers).
        #[arg(long, value_name = "IP")]
        address: Ipv4Addr,
    },
    /// Remove a server platform (refused while it owns models).
    Remove(IdArg),
}

/// A number argument that does not parse or is out of range.
#[derive(Debug, thiserror::Error)]
enum BadNumber {
    /// Not decimal or 0x hex.
    #[error("{0:?} is not a number: write decimal or 0x hex")]
    NotANumber(String),
    /// Past the largest port.
    #[error("{0} is past the largest port, 0xffff")]
    PastPort(String),
}

fn parse_number(text: &str) -> Result<u64, BadNumber> {
    let t = text.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => t.parse(),
    };
    parsed.map_err(|_| BadNumber::NotANumber(text.to_string()))
}

fn parse_vm_state(text: &str) -> Result<VmState, String> {
    match text {
        "running" => Ok(VmState::Running),
        "suspended" => Ok(VmState::Suspended),
        "stopped" => Ok(VmState::Stopped),
        _ => Err(format!(
            "{text:?} is not a VM state: give running, suspended or stopped"
        )),
    }
}

fn parse_u16(text: &str) -> Result<u16, BadNumber> {
    let n = parse_number(text)?;
    u16::try_from(n).map_err(|_| BadNumber::PastPort(text.to_string()))
}

fn parse_u64(text: &str) -> Result<u64, BadNumber> {
    parse_number(text)
}

/// A MAC address, six hex bytes separated by colons.
fn parse_mac(text: &str) -> Result<[u8; 6], String> {
    let bad = || format!("{text:?} is not a MAC address: write aa:bb:cc:dd:ee:ff");
    let mut mac = [0u8; 6];
    let mut parts = text.trim().split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(bad)?;
        if p.is_empty() || p.len() > 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(mac)
}

/// What a command failed with, and the exit code it means.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// A failure saying `message`: "not found" (exit 3) or any other.
    fn of(not_found: bool, message: String) -> Failure {
        Failure {
            code: if not_found {
                EXIT_NOT_FOUND
            } else {
                EXIT_FAILED
            },
            message,
        }
    }
}

impl From<DbError> for Failure {
    fn from(e: DbError) -> Self {
        Failure::of(e.is_not_found(), e.to_string())
    }
}

fn main() -> ExitCode {
    // A group without its subcommand is a usage error (one line, exit 2),
    // not a page of help.
    let mut command = Cli::command();
    for group in ["clients", "hypervisors", "vms", "models", "servers"] {
        command = command.mut_subcommand(group, |c| c.arg_required_else_help(false));
    }
    let parsed = command
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit();
            }
            // clap's message is its first paragraph (the lines before the
            // usage); join it into one line.
            let rendered = e.render().to_string();
            let message = rendered
                .lines()
                .take_while(|l| !l.trim().is_empty())
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ");
            let message = message.strip_prefix("error: ").unwrap_or(&message);
            eprintln!("dpctl: {message} (see --help)");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match run(&cli) {
        Ok(text) => {
            let mut out = io::stdout().lock();
            // A closed pipe (dpctl ... | head) is not an error.
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            ExitCode::SUCCESS
        }
        Err(f) => {
            eprintln!("dpctl: {}", f.message.replace('\n', " "));
            ExitCode::from(f.code)
        }
    }
}

fn run(cli: &Cli) -> Result<String, Failure> {
    if let Command::Vms(VmsCmd::Console {
        id,
        read_only,
        model,
        escape,
    }) = &cli.command
    {
        return console::run(
            cli,
            &console::Args {
                vm: id.id,
                model: *model,
                read_only: *read_only,
                escape,
            },
        );
    }
    if let Some(out) = daemon::run(cli)? {
        return Ok(out);
    }
    if let Some(out) = client::run(cli)? {
        return Ok(out);
    }
    if let Some(out) = cluster::run(cli)? {
        return Ok(out);
    }
    let mut db = match cli.command {
        Command::Init => Db::open(cluster::state_dir(cli))?,
        _ => Db::open_existing(cluster::state_dir(cli))?,
    };
    let json = cli.json;
    // The same commands as with --store (`cluster::view`, `change_of`),
    // on the database.
    if let Some((kind, id)) = cluster::view(&cli.command) {
        return match id {
            None => Ok(list(db.state(), kind, json)),
            Some(id) => show(db.state(), kind, id, json),
        };
    }
    match &cli.command {
        Command::Init | Command::Status => Ok(status(&db, json)),
        Command::Clients(ClientsCmd::ExportKey(id)) => keys::export(db.state(), id.id, json),
        Command::Clients(ClientsCmd::RotateKey {
            id,
            grace_ms,
            server_sockets,
            no_client,
            db_only,
        }) => {
            let default = [cli.socket.clone()];
            keys::rotate(
                cli,
                &mut db,
                &keys::Rotate {
                    client: id.id,
                    grace: std::time::Duration::from_millis(*grace_ms),
                    servers: if server_sockets.is_empty() {
                        &default
                    } else {
                        server_sockets
                    },
                    tell_client: !no_client,
                    db_only: *db_only,
                },
            )
        }
        // Forwarding without --store is the owner server's (daemon::run).
        Command::Models(ModelsCmd::Forward { .. } | ModelsCmd::Unforward(_)) => {
            Err(daemon::handled_there())
        }
        cmd => {
            let Some(c) = cluster::change_of(cmd, db.state()) else {
                return Err(daemon::handled_there());
            };
            change(cli, &mut db, c?, json)
        }
    }
}

fn status(db: &Db, json: bool) -> String {
    let s = db.state();
    if json {
        return to_json(&json!({
            "state_dir": db.dir(),
            "generation": db.generation(),
            "applied_generation": db.applied_generation(),
            "needs_repair": db.needs_repair(),
            "clients": s.clients.len(),
            "hypervisors": s.hypervisors.len(),
            "vms": s.vms.len(),
            "models": s.models.len(),
            "servers": s.servers.len(),
        }));
    }
    let maps = if db.needs_repair() {
        "behind the database: a server's next start or repair updates them"
    } else {
        "up to date"
    };
    key_values(&[
        ("state dir", db.dir().display().to_string()),
        ("generation", db.generation().to_string()),
        ("applied generation", db.applied_generation().to_string()),
        ("maps", maps.to_string()),
        ("clients", s.clients.len().to_string()),
        ("hypervisors", s.hypervisors.len().to_string()),
        ("vms", s.vms.len().to_string()),
        ("models", s.models.len().to_string()),
        ("servers", s.servers.len().to_string()),
    ])
}

fn change(cli: &Cli, db: &mut Db, change: Change, json: bool) -> Result<String, Failure> {
    let (kind, id) = (change.kind(), change.id());
    let action = action_of(&change);
    let live = apply::live_request(db, &change);
    db.apply(change)?;
    if let Some(cfg) = &cli.apply_to {
        if let Some(live) = live {
            apply::to_running(cli, cfg, live)?;
        }
        apply::to_server(db, cfg)?;
    }
    if json {
        return Ok(to_json(&json!({
            "action": action,
            "kind": kind,
            "id": id,
            "generation": db.generation(),
        })));
    }
    let done = done_of(action);
    Ok(format!(
        "{done} {kind} {id} (generation {})\n",
        db.generation()
    ))
}

/// The name of a change's action (`--json`'s `action`).
fn action_of(change: &Change) -> &'static str {
    match change {
        Change::SetClientBudget(..) => "budget",
        Change::SetClientKey(..) => "key",
        Change::AddClient(_)
        | Change::AddHypervisor(_)
        | Change::AddVm(_)
        | Change::AddModel(_)
        | Change::AddServer(_) => "add",
        Change::PlaceVm { .. } | Change::PlaceModel { .. } => "place",
        Change::ForwardModel { via: Some(_), .. } => "forward",
        Change::ForwardModel { via: None, .. } => "unforward",
        Change::SetVmState(..) => "set-state",
        Change::RemoveClient(_)
        | Change::RemoveHypervisor(_)
        | Change::RemoveVm(_)
        | Change::RemoveModel(_)
        | Change::RemoveServer(_) => "remove",
    }
}

/// The past tense of an action, for people.
fn done_of(action: &str) -> &'static str {
    match action {
        "add" => "added",
        "budget" => "set the budget of",
        "key" => "set the key of",
        "place" => "placed",
        "set-state" => "set the state of",
        "forward" => "forwarded",
        "unforward" => "stopped forwarding",
        _ => "removed",
    }
}

#[cfg(test)]
mod tests {
    use super::parse_mac;

    #[test]
    fn macs_parse_and_bad_ones_say_how_to_write_them() {
        assert_eq!(
            parse_mac("02:00:0a:ff:10:01"),
            Ok([0x02, 0x00, 0x0a, 0xff, 0x10, 0x01])
        );
        assert_eq!(parse_mac("2:0:a:ff:10:1"), Ok([2, 0, 0xa, 0xff, 0x10, 1]));
        for bad in [
            "",
            "02:00:0a:ff:10",
            "02:00:0a:ff:10:01:02",
            "02:00:0a:ff:10:zz",
            "020:0:0:0:0:0",
            "02::0a:ff:10:01",
        ] {
            let e = parse_mac(bad).expect_err(bad);
            assert!(e.contains("aa:bb:cc:dd:ee:ff"), "{e}");
        }
    }
}
