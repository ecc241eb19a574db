//! `dpbench`: devplane's benchmark and regression gate.
//!
//! This crate owns the measurements performance engineers and CI trust:
//! scenarios run on the embedded single-machine topology, floors measured
//! in the same run, results reported as ratios to those floors.
//!
//! - `dpbench [run] [--scenario ...]` runs scenarios, prints the table and
//!   writes `summary.json`, one `.hgrm` per latency row and `latency.svg`
//!   into `--out` (default `bench-results/<UTC timestamp>`);
//! - `dpbench --server IP:PORT` runs the client-side scenarios (`client`,
//!   `irq`, `throughput`) against a devplane server that is already
//!   running with `bench/server-remote.toml` instead of the embedded
//!   topology (see `bench/README.md`);
//! - `dpbench compare BASE.json NEW.json --max-regress p99=20%` is the
//!   gate: it compares ratios to the same-run floors and exits 1 on a
//!   regression beyond the limit, 2 when it cannot judge.

mod blk;
mod boot;
mod client;
mod counters;
mod flush_storm;
mod forward;
mod gate;
mod hist;
mod invalid;
mod irq;
mod isolation;
mod load;
mod micro;
mod migrate;
mod plot;
mod queues;
mod report;
mod rig;
mod scale;
mod serial;
mod server;
mod suite;
mod throughput;
mod udp;

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::{Context, Result, bail};
use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::gate::Limit;
use crate::invalid::Invalid;
use crate::report::RunSummary;
#[cfg(test)]
use crate::suite::open_loop;
use crate::suite::{on_ctrl_c, run};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The XDP program per frame, routed and dropped paths (needs root).
    XdpProg,
    /// Parsing a datagram in userspace.
    Parse,
    /// A datagram's tag (`wire::tag`) per length, beside plain SipHash-2-4
    /// of the same bytes.
    Tag,
    /// Server round trips and rate on the netns topology, beside the raw
    /// busy-polling UDP floor of the same run (needs root).
    Server,
    /// KVM guests on the netns topology: the exit floor with a local null
    /// model, the UDP floor of the same path, both in one sample, remote
    /// port-I/O (with each way of draining the exit rings) and MMIO round
    /// trips, and N vCPUs' posted-write rate (needs root and KVM).
    Client,
    /// Part of client: its floors only (exit-floor, udp-floor,
    /// exit-udp-floor).
    Floor,
    /// Part of client: its floors and the remote port-I/O round trip
    /// (remote-pio).
    Pio,
    /// Part of client: its floors and the remote MMIO round trip.
    Mmio,
    /// A remote model's interrupt: from the guest's write asking the
    /// counter model for it to the guest's handler acknowledging it
    /// (row trigger-to-ack), beside the same floors (needs root and KVM).
    Irq,
    /// The --vms x --vcpus matrix, each cell with posted and with
    /// non-posted writes: requests/s and latency under that load (rows
    /// throughput/posted/2x2, ...; needs root and KVM).
    Throughput,
    /// The minimal guest kernel's boot to its init, with the console, RTC
    /// and disk local and then on the server: time to the kernel's banner,
    /// the root mount, the init's marker and the VM's end, remote over
    /// local, and the accesses served remotely (needs root, KVM and
    /// scripts/guest-kernel.sh's files). The default suite runs it only
    /// where it fits --boot-budget.
    Boot,
    /// A well-behaved client's round trip unloaded, while another client
    /// floods the same worker, and with a budget on the flooder
    /// (isolation/unloaded, flooded, budgeted; needs root).
    Isolation,
    /// A counter model's round trip unloaded, while a blockstore model on
    /// the same worker takes a storm of page writes, and while it takes
    /// the same storm with flushes (flush-storm/unloaded, writing,
    /// flushing; goal: flushing p99 within 2x writing's; needs root).
    FlushStorm,
    /// The XDP round trip against offered load, open loop (wrk2 style):
    /// one worker's saturation, the unloaded round trip, then full
    /// datagrams sent on a fixed schedule at 10% to 200% of saturation
    /// (--rate N: at N records/s only), each timed from its intended send
    /// time, --duration seconds per load (default 0.5); the knee and
    /// load.svg (needs root).
    Load,
    /// How cost grows: 1-16 KVM VMs of one vCPU on one client against one
    /// worker (direct and engine mode), 1-1000 models and 1-10000
    /// registered VMs on one server (round trips and worker rate), and
    /// the XDP program's cost with as many routes and VMs (needs root and
    /// KVM).
    Scale,
    /// Owner and I/O servers on three hosts of one bridge: the round trip
    /// to the I/O server straight (`direct`, the floor, before and after)
    /// and through the owner, whose XDP program forwards the request
    /// (`forward`; goal under 1.4x direct; needs root).
    Forward,
    /// The XDP round trip on veths of one queue (`one`, the floor, before
    /// and after) and of four (`four`: every worker polls a socket per
    /// queue): what serving every queue costs (needs root).
    Queues,
    /// Live VM migration of a 64 MiB guest writing to a remote model at
    /// full speed (downtime from its last exit on the source to its first
    /// on the target, total time, bytes sent; goal downtime < 10 ms), and
    /// the remote round trip while its model moves between two servers
    /// beside the same without moves (needs root and KVM).
    Migrate,
    /// The remote disk in bulk beside NBD on the same topology: 4 KiB
    /// random reads and writes at queue depth 1 (latency, NBD's row the
    /// floor) and 4 KiB and 128 KiB at depth 32 (requests/s), from the
    /// client VMM's virtio-blk device to a blockstore behind XDP, and
    /// from a small NBD client to Debian's qemu-nbd (needs root and
    /// qemu-nbd).
    Blk,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::XdpProg => "xdp-prog",
            Scenario::Parse => "parse",
            Scenario::Tag => "tag",
            Scenario::Server => "server",
            Scenario::Client => "client",
            Scenario::Floor => "floor",
            Scenario::Pio => "pio",
            Scenario::Mmio => "mmio",
            Scenario::Irq => "irq",
            Scenario::Throughput => "throughput",
            Scenario::Boot => boot::NAME,
            Scenario::Isolation => "isolation",
            Scenario::FlushStorm => flush_storm::SCENARIO,
            Scenario::Load => load::SCENARIO,
            Scenario::Scale => scale::SCENARIO,
            Scenario::Forward => forward::SCENARIO,
            Scenario::Queues => queues::SCENARIO,
            Scenario::Migrate => migrate::SCENARIO,
            Scenario::Blk => blk::SCENARIO,
        }
    }

    /// Whether it runs a client side that `--server` can point elsewhere.
    fn client_side(self) -> bool {
        matches!(
            self,
            Scenario::Client
                | Scenario::Floor
                | Scenario::Pio
                | Scenario::Mmio
                | Scenario::Irq
                | Scenario::Throughput
        )
    }

    /// The rows of the client scenario this one runs, if it is (part of)
    /// it.
    fn client_parts(self) -> Option<client::Parts> {
        let none = client::Parts::default();
        match self {
            Scenario::Client => Some(client::Parts::ALL),
            Scenario::Floor => Some(none),
            Scenario::Pio => Some(client::Parts { pio: true, ..none }),
            Scenario::Mmio => Some(client::Parts { mmio: true, ..none }),
            _ => None,
        }
    }
}

/// The default suite (`make bench`).
const DEFAULT_SUITE: [Scenario; 15] = [
    Scenario::XdpProg,
    Scenario::Parse,
    Scenario::Tag,
    Scenario::Server,
    Scenario::Forward,
    Scenario::Client,
    Scenario::Irq,
    Scenario::Throughput,
    Scenario::Load,
    Scenario::Scale,
    Scenario::Isolation,
    Scenario::FlushStorm,
    Scenario::Migrate,
    Scenario::Blk,
    Scenario::Boot,
];

/// The default suite with `--server`: the client-side scenarios.
const REMOTE_SUITE: [Scenario; 3] = [Scenario::Client, Scenario::Irq, Scenario::Throughput];

/// devplane's latency benchmark and regression gate.
///
/// Without a subcommand, runs scenarios (as `dpbench run`): by default
/// xdp-prog, parse, tag, server, forward, client, irq, throughput, load,
/// scale, isolation, flush-storm, migrate, blk and boot (where it takes
/// under --boot-budget) on the embedded single-machine topology (two
/// network namespaces joined by veth, three hosts on a bridge for forward,
/// the real XDP program, real KVM guests, qemu-nbd beside the remote disk;
/// needs root and /dev/kvm); queues only when --scenario names it.
///
/// Against a real server: start `devplane-server --config
/// bench/server-remote.toml` on the server machine (first edit its
/// interface, or set mode = "socket", and the address in its clients entry
/// to this machine's), then run `dpbench --server SERVER_IP:7700`. That
/// runs the client, irq and throughput scenarios (or those of them
/// --scenario names) from this machine (no topology, no XDP here); their
/// network floor is then rtt-floor, a raw request to the server's null
/// model. Restart the server before each such run: it remembers the
/// request numbers of the VM ids dpbench uses. bench/README.md has the
/// details.
#[derive(Debug, Parser)]
#[command(version, about, long_about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run scenarios (the default): print the table, write summary.json,
    /// one .hgrm per latency row and latency.svg into --out.
    Run(RunArgs),
    /// The regression gate: compare two summary.json files row by row on
    /// their ratios to the same-run floors. Exits 0 when every ratio is
    /// within its limit, 1 on a regression, 2 when it cannot judge
    /// (unreadable file, rows of BASE missing in NEW).
    Compare(CompareArgs),
    /// Write a gate baseline from several summary.json files of the same
    /// suite: the first, with each latency row's ratios replaced by the
    /// median over the runs.
    Baseline(BaselineArgs),
    /// CI's regression gate (`make test` runs it): the short suite
    /// (--scenario server,pio,load --round-trips 10000 --duration 0.2,
    /// about 22 s) into --out, then compare with the baseline under CI's
    /// limits (server/*:p99=20%, client/*:p50=20%, client/*:p99=50%,
    /// load/offered-50%:p50=20%; a limit on rows the baseline
    /// does not have yet is left out with a note). After a regression the
    /// suite runs again (--attempts, 3 in all by default) and a ratio
    /// fails only if it regressed in every attempt. Exits 0 when every
    /// ratio is within its limit, 1 on a regression, 2 when it cannot
    /// judge (the suite failed, a file is unreadable).
    Gate(GateArgs),
}

#[derive(Debug, Args)]
struct GateArgs {
    /// The baseline to compare with.
    #[arg(long, value_name = "FILE", default_value = "bench/baseline.json")]
    baseline: PathBuf,
    /// Where the suite's files go [default: a new directory under the
    /// system's temporary directory].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Limits instead of CI's, as for compare. Repeatable.
    #[arg(long = "max-regress", value_name = "[ROWS:]METRIC=PERCENT", value_parser = gate::parse_limit)]
    max_regress: Vec<Limit>,
    /// Run the suite again after a regression, up to this many times in
    /// all; a ratio fails only if it regressed in every attempt (the
    /// host's noise spikes one run's tail, a slower path shows in each).
    #[arg(long, value_name = "N", default_value_t = gate::GATE_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    attempts: u32,
}

#[derive(Debug, Args)]
struct BaselineArgs {
    /// Where to write it (e.g. bench/baseline.json).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// summary.json files of runs of the same suite (3 or more advised).
    #[arg(required = true, value_name = "SUMMARY")]
    runs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Args)]
struct RunArgs {
    /// Scenarios to run, comma-separated [default: xdp-prog, parse, tag,
    /// server, forward, client, irq, throughput, load, scale, isolation,
    /// flush-storm, migrate, blk, boot (where it fits --boot-budget); with
    /// --server: client, irq, throughput]. floor, pio and mmio run parts
    /// of client; queues runs only when named.
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Run the client-side scenarios (client, irq, throughput) against the
    /// devplane server already running at ADDR (IPV4:PORT) instead of the
    /// embedded topology. The server must run bench/server-remote.toml
    /// (its ids, VMs and models), with this machine's address as client 7,
    /// freshly started for each dpbench run.
    #[arg(long, value_name = "ADDR", value_parser = rig::parse_server_addr)]
    server: Option<SocketAddrV4>,
    /// Interrupts per irq run.
    #[arg(long, value_name = "N", default_value_t = 5000,
          value_parser = clap::value_parser!(u16).range(10..=60_000))]
    irqs: u16,
    /// Throughput matrix: numbers of VMs, comma-separated (at most 8, 4
    /// with --server).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    vms: Vec<u32>,
    /// Throughput matrix: vCPUs per VM, comma-separated (at most 8, 4
    /// with --server).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2",
          value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: Vec<u32>,
    /// Throughput: writes per vCPU in each cell.
    #[arg(long, value_name = "N", default_value_t = 5000,
          value_parser = clap::value_parser!(u16).range(10..=60_000))]
    writes: u16,
    /// Iterations per micro-measurement (xdp-prog, parse, tag).
    #[arg(long, default_value_t = 200_000)]
    iterations: u32,
    /// Round trips per latency measurement (server, client, load's
    /// unloaded row, isolation, flush-storm, forward, queues, migrate's
    /// round-trip rows, scale). The client's serial floor, remote-pio and
    /// remote-pio-tagged, the rows its tail judgement compares, take 3x
    /// this (at most 60000).
    #[arg(long, default_value_t = 20_000)]
    round_trips: u32,
    /// Open loop: the server scenario's XDP round trip sends this many
    /// requests per second on a fixed schedule and times each from its
    /// intended send time (row `xdp-rtt-open`). Default: closed loop. The
    /// load scenario offers this many records/s instead of its sweep.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Open loop: run the schedule this many seconds (--rate x --duration
    /// requests) instead of --round-trips requests, as wrk2 does. Needs
    /// --rate, except for the load scenario (seconds per offered load).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    duration: Option<f64>,
    /// Run the server, client, irq and throughput scenarios this many
    /// times, each repetition measuring its own floors, and merge them: a
    /// row's percentiles and ratios are over the samples of every
    /// repetition, its rate the median [default: 25 for server, 3 for
    /// client and irq, 1 for throughput].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: Option<u32>,
    /// Skip the boot scenario, saying why, when it would take this long or
    /// longer here (by its last run's time on this host, else by whether
    /// KVM emulates guest kernel code) [default: 120 in the default suite,
    /// none when --scenario names boot].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    boot_budget: Option<u64>,
    /// Output directory [default: bench-results/<UTC timestamp>].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// No progress lines (they go to stderr, and only when it is a
    /// terminal).
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, Args)]
struct CompareArgs {
    /// The reference summary.json (e.g. bench/baseline.json).
    base: PathBuf,
    /// The summary.json to judge.
    new: PathBuf,
    /// [ROWS:]METRIC=PERCENT: fail when a row's METRIC/floor ratio grew by
    /// more than PERCENT (metrics: p50, p90, p99, p999, p9999, max), for
    /// every row or for ROWS only: a row key (client/remote-pio) or a key
    /// prefix ending in * (server/*). Repeatable. Default: p99=20%.
    #[arg(long = "max-regress", value_name = "METRIC=PERCENT", value_parser = gate::parse_limit)]
    max_regress: Vec<Limit>,
}

/// Runs of the server scenario merged into one result by default.
pub(crate) const SERVER_REPEAT: u32 = 25;
/// Runs of the client scenario merged into one result by default.
pub(crate) const CLIENT_REPEAT: u32 = 3;
/// Runs of the irq scenario merged into one result by default.
pub(crate) const IRQ_REPEAT: u32 = 3;
/// Runs of the throughput scenario merged into one result by default.
pub(crate) const THROUGHPUT_REPEAT: u32 = 1;

/// Fresh VM ids one run of the client scenario takes on a server: the
/// network floor's, the three other drains', remote-pio's, remote-mmio's
/// and posted-rate's two.
const CLIENT_VM_IDS: u32 = 8;

/// The scenarios `args` asks for, in order, after checking the flags that
/// go together; the error is one line saying what to change.
fn plan(args: &RunArgs) -> Result<Vec<Scenario>, Invalid> {
    if args.iterations == 0 {
        return Err(Invalid::from("--iterations must be at least 1"));
    }
    if args.round_trips == 0 {
        return Err(Invalid::from("--round-trips must be at least 1"));
    }
    let load_only = args.scenario.contains(&Scenario::Load) && args.rate.is_none();
    if let (Some(d), rate, false) = (args.duration, args.rate, load_only) {
        let Some(r) = rate else {
            return Err(Invalid::from(
                "--duration sets how long the open loop runs (--rate x --duration requests): \
                 give --rate too, or use --round-trips for a closed loop",
            ));
        };
        if r as f64 * d < 1.0 || r as f64 * d > u32::MAX as f64 {
            return Err(Invalid::from(format!(
                "--rate {r} x --duration {d} is {} requests: it must be 1 to {}",
                r as f64 * d,
                u32::MAX
            )));
        }
    }
    let scenarios = match (args.scenario.is_empty(), args.server.is_some()) {
        (true, false) => DEFAULT_SUITE.to_vec(),
        (true, true) => REMOTE_SUITE.to_vec(),
        (false, _) => {
            let mut v: Vec<Scenario> = Vec::new();
            for s in &args.scenario {
                if !v.contains(s) {
                    v.push(*s);
                }
            }
            v
        }
    };
    let Some(addr) = args.server else {
        if scenarios.contains(&Scenario::Throughput) {
            throughput::check_matrix(&args.vms, &args.vcpus, rig::EMBEDDED, false)?;
        }
        return Ok(scenarios);
    };
    if let Some(s) = scenarios.iter().find(|s| !s.client_side()) {
        return Err(Invalid::from(format!(
            "--server {addr}: the {} scenario needs the embedded topology; --server runs \
             client, irq and throughput only",
            s.name()
        )));
    }
    if args.rate.is_some() {
        return Err(Invalid::from(
            "--rate applies to the server scenario, which --server does not run",
        ));
    }
    let reps = |s: Scenario, default: u32| {
        if scenarios.contains(&s) {
            args.repeat.unwrap_or(default)
        } else {
            0
        }
    };
    let layout = rig::REMOTE;
    let irq_runs = reps(Scenario::Irq, IRQ_REPEAT);
    if irq_runs > layout.irq_slots {
        return Err(Invalid::from(format!(
            "--server: {irq_runs} irq runs, but bench/server-remote.toml has {} interrupt \
             counters (one per run); use --repeat {} or fewer",
            layout.irq_slots, layout.irq_slots
        )));
    }
    let client_runs = if scenarios.iter().any(|s| s.client_parts().is_some()) {
        args.repeat.unwrap_or(CLIENT_REPEAT)
    } else {
        0
    };
    let mut ids = client_runs * CLIENT_VM_IDS + irq_runs;
    if scenarios.contains(&Scenario::Throughput) {
        throughput::check_matrix(&args.vms, &args.vcpus, layout, true)?;
        let per_run: u32 = 1 + throughput::cells(&args.vms, &args.vcpus)
            .iter()
            .map(|c| c.vms)
            .sum::<u32>();
        ids += reps(Scenario::Throughput, THROUGHPUT_REPEAT) * per_run;
    }
    if ids > layout.pool() {
        return Err(Invalid::from(format!(
            "--server: this run needs {ids} fresh VM ids, bench/server-remote.toml has {}; \
             use a smaller --repeat or matrix, or fewer scenarios per run",
            layout.pool()
        )));
    }
    Ok(scenarios)
}

/// Parses a positive number of seconds (`5`, `0.5`).
fn parse_secs(s: &str) -> Result<f64, Invalid> {
    match s.trim().trim_end_matches('s').parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
        _ => Err(Invalid::from(format!(
            "{s:?}: expected a positive number of seconds, e.g. 5 or 0.5"
        ))),
    }
}

/// The run options of `dpbench gate`'s suite, writing into `out`.
fn gate_run_args(out: &std::path::Path) -> Result<RunArgs> {
    let mut argv: Vec<std::ffi::OsString> = vec!["dpbench".into(), "run".into(), "--quiet".into()];
    argv.extend(gate::GATE_SUITE.iter().map(Into::into));
    argv.push("--out".into());
    argv.push(out.into());
    match Cli::try_parse_from(argv)?.command {
        Some(Command::Run(r)) => Ok(r),
        _ => bail!("the gate suite's options did not parse as a run"),
    }
}

fn gate_cmd(args: GateArgs) -> ExitCode {
    let out = args.out.unwrap_or_else(|| {
        let (_, stamp) = report::timestamps(SystemTime::now());
        std::env::temp_dir().join(format!("dpbench-gate-{stamp}-{}", std::process::id()))
    });
    let max_regress = if args.max_regress.is_empty() {
        match gate::load(&args.baseline) {
            Ok(base) => {
                let (kept, notes) = gate::applicable(&base, gate::gate_limits());
                for n in notes {
                    println!("{n}");
                }
                kept
            }
            // compare says why it cannot read it.
            Err(_) => gate::gate_limits(),
        }
    } else {
        args.max_regress
    };
    let mut attempts = Vec::new();
    for attempt in 1..=args.attempts {
        // The first attempt writes where asked (a baseline's runs are
        // recorded with --out); the others beside it.
        let dir = if attempt == 1 {
            out.clone()
        } else {
            let mut d = out.clone().into_os_string();
            d.push(format!("-attempt{attempt}"));
            PathBuf::from(d)
        };
        println!(
            "dpbench gate: attempt {attempt} of at most {}: {} into {}",
            args.attempts,
            gate::GATE_SUITE.join(" "),
            dir.display()
        );
        if let Err(e) = gate_run_args(&dir).and_then(run) {
            eprintln!("dpbench gate: the suite failed, nothing to judge: {e:#}");
            return ExitCode::from(2);
        }
        let c = match judge(&CompareArgs {
            base: args.baseline.clone(),
            new: dir.join("summary.json"),
            max_regress: max_regress.clone(),
        }) {
            Ok(c) => c,
            Err(code) => return code,
        };
        let failed = c.failed();
        attempts.push(c);
        if !failed {
            break;
        }
        if attempt < args.attempts {
            println!(
                "dpbench gate: a regression in attempt {attempt}: running the suite again \
                 (a ratio fails only if it regresses in every attempt)"
            );
        }
    }
    let Some(c) = gate::best_of(&attempts) else {
        eprintln!("dpbench gate: --attempts must be at least 1");
        return ExitCode::from(2);
    };
    if attempts.len() > 1 {
        println!(
            "dpbench gate: each ratio at its best of {} attempts:",
            attempts.len()
        );
        print!("{}", c.table());
    }
    verdict(&c)
}

/// The exit status and last line of a comparison.
fn verdict(c: &gate::Comparison) -> ExitCode {
    let bad = c.lines.iter().filter(|l| l.regressed()).count();
    if c.failed() {
        println!(
            "FAIL: {bad} ratio(s) regressed beyond the limit (ratios are row / same-run floor)"
        );
        ExitCode::from(1)
    } else {
        println!("ok: {} ratio(s) within their limits", c.lines.len());
        ExitCode::SUCCESS
    }
}

fn compare(args: CompareArgs) -> ExitCode {
    match judge(&args) {
        Ok(c) => verdict(&c),
        Err(code) => code,
    }
}

/// Compares `args.new` with `args.base` and prints the table; the error is
/// the exit status (2: cannot judge), its reason printed.
fn judge(args: &CompareArgs) -> Result<gate::Comparison, ExitCode> {
    let limits = if args.max_regress.is_empty() {
        vec![Limit {
            metric: "p99".into(),
            frac: gate::DEFAULT_P99_LIMIT,
            rows: None,
        }]
    } else {
        args.max_regress.clone()
    };
    let judged = gate::load(&args.base).and_then(|base| {
        let new = gate::load(&args.new)?;
        let c = gate::compare(&base, &new, &limits)?;
        Ok((base, new, c))
    });
    match judged {
        Err(e) => {
            eprintln!("dpbench compare: {e}");
            Err(ExitCode::from(2))
        }
        Ok((base, new, c)) => {
            let about = |f: &gate::GateFile| {
                format!(
                    "{}, rev {}",
                    f.timestamp.as_deref().unwrap_or("?"),
                    f.git_revision
                        .as_deref()
                        .map_or("?", |r| &r[..r.len().min(12)])
                )
            };
            println!("base: {} ({})", args.base.display(), about(&base));
            println!("new:  {} ({})", args.new.display(), about(&new));
            for n in gate::config_notes(&base, &new) {
                println!("{n}");
            }
            print!("{}", c.table());
            Ok(c)
        }
    }
}

fn baseline(args: BaselineArgs) -> Result<()> {
    let runs = args
        .runs
        .iter()
        .map(|p| -> Result<RunSummary> {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not a dpbench summary.json", p.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let b = report::baseline(&runs).map_err(anyhow::Error::msg)?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&b)? + "\n")
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "{}: ratios are the median over {} runs",
        args.out.display(),
        runs.len()
    );
    Ok(())
}

/// A command-line value error (`--server nonsense`, `--repeat 0`) as one
/// line: clap's first line, without its `error: ` prefix.
fn value_error_line(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ValueValidation | ErrorKind::InvalidValue
            ) =>
        {
            eprintln!("dpbench: {}", value_error_line(&e));
            return ExitCode::from(2);
        }
        Err(e) => e.exit(),
    };
    on_ctrl_c();
    let res = match cli.command {
        Some(Command::Baseline(b)) => baseline(b).map(|()| ExitCode::SUCCESS),
        Some(Command::Compare(c)) => Ok(compare(c)),
        Some(Command::Gate(g)) => Ok(gate_cmd(g)),
        Some(Command::Run(r)) => run(r).map(|()| ExitCode::SUCCESS),
        None => run(cli.run).map(|()| ExitCode::SUCCESS),
    };
    res.unwrap_or_else(|e| {
        eprintln!("dpbench: {e:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn args(argv: &[&str]) -> Result<RunArgs, clap::Error> {
        let cli = Cli::try_parse_from(std::iter::once("dpbench").chain(argv.iter().copied()))?;
        Ok(cli.run)
    }

    #[test]
    fn a_bad_server_address_is_a_one_line_value_error() {
        for bad in [
            "nonsense",
            "10.0.0.1",
            "10.0.0.1:0",
            "[::1]:7700",
            "0.0.0.0:7700",
        ] {
            let e = args(&["--server", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad}");
            let line = value_error_line(&e);
            assert!(
                line.contains("--server <ADDR>") && line.contains("IPV4:PORT"),
                "{bad}: {line}"
            );
            assert!(!line.contains('\n') && !line.starts_with("error"), "{line}");
        }
        let a = args(&["--server", "192.0.2.10:7700"]).unwrap();
        assert_eq!(a.server, Some("192.0.2.10:7700".parse().unwrap()));
    }

    #[test]
    fn the_suite_depends_on_server() {
        let a = args(&[]).unwrap();
        assert_eq!(plan(&a).unwrap(), DEFAULT_SUITE);
        assert_eq!(
            (a.vms.as_slice(), a.vcpus.as_slice()),
            (&[1, 2][..], &[1, 2][..])
        );
        let a = args(&["--server", "192.0.2.10:7700"]).unwrap();
        assert_eq!(plan(&a).unwrap(), REMOTE_SUITE);
        let a = args(&["--server", "192.0.2.10:7700", "--scenario", "irq,client"]).unwrap();
        assert_eq!(plan(&a).unwrap(), [Scenario::Irq, Scenario::Client]);
        assert!(DEFAULT_SUITE.contains(&Scenario::Irq));
        assert!(DEFAULT_SUITE.contains(&Scenario::Isolation));
        assert!(REMOTE_SUITE.iter().all(|s| s.client_side()));
    }

    /// The docs name the default suite as it is: `--help`'s two lists and
    /// bench/README.md's scenario table (last column `yes` or `only
    /// where`, `no` for the scenarios run only when named).
    #[test]
    fn the_docs_name_the_default_suite() {
        let help = Cli::command().render_long_help().to_string();
        let help = help.split_whitespace().collect::<Vec<_>>().join(" ");
        let readme = include_str!("../README.md");
        for s in Scenario::value_variants() {
            let name = s.name();
            let default = DEFAULT_SUITE.contains(s);
            let in_help = |from: &str| {
                let list = &help[help.find(from).expect(from)..];
                let list = &list[..list.find(';').unwrap_or(list.len())];
                list.contains(&format!("{name},")) || list.contains(&format!("{name} "))
            };
            assert_eq!(
                in_help("by default"),
                default,
                "--help's default list: {name}"
            );
            assert_eq!(
                in_help("[default:"),
                default,
                "--scenario's default: {name}"
            );
            if s.client_parts().is_some() && *s != Scenario::Client {
                continue;
            }
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("bench/README.md has no row for {name}"));
            let last = row.trim_end_matches('|').rsplit('|').next().unwrap().trim();
            let says_default = last.starts_with("yes") || last.starts_with("only where");
            assert_eq!(says_default, default, "bench/README.md: {row}");
        }
    }

    /// The open loop runs --round-trips requests, or --rate x --duration;
    /// --duration without --rate, or a product out of range, is refused.
    #[test]
    fn the_open_loop_runs_for_a_count_or_a_duration() {
        let a = args(&["--scenario", "server", "--rate", "20000"]).unwrap();
        assert_eq!(open_loop(&a), Some((20_000, 20_000)));
        let a = args(&[
            "--scenario",
            "server",
            "--rate",
            "20000",
            "--duration",
            "0.5",
        ])
        .unwrap();
        assert!(plan(&a).is_ok());
        assert_eq!(open_loop(&a), Some((20_000, 10_000)));
        let a = args(&["--scenario", "server", "--rate", "3", "--duration", "2s"]).unwrap();
        assert_eq!(open_loop(&a), Some((3, 6)));
        let a = args(&["--scenario", "server"]).unwrap();
        assert_eq!(open_loop(&a), None);
        let a = args(&["--scenario", "server", "--duration", "5"]).unwrap();
        assert!(
            plan(&a)
                .unwrap_err()
                .to_string()
                .contains("give --rate too")
        );
        let a = args(&["--scenario", "server", "--rate", "1", "--duration", "0.1"]).unwrap();
        assert!(plan(&a).unwrap_err().to_string().contains("must be 1 to"));
        assert!(args(&["--duration", "0"]).is_err());
        assert!(args(&["--duration", "soon"]).is_err());
    }

    /// The gate's suite parses as a run of the server scenario, the
    /// client's port-I/O part and the load sweep into the directory given.
    #[test]
    fn the_gate_suite_is_a_valid_run() {
        let r = gate_run_args(std::path::Path::new("/tmp/x")).unwrap();
        assert_eq!(
            plan(&r).unwrap(),
            [Scenario::Server, Scenario::Pio, Scenario::Load]
        );
        assert_eq!(r.duration, Some(0.2));
        assert_eq!(r.round_trips, 10_000);
        assert_eq!(r.out.as_deref(), Some(std::path::Path::new("/tmp/x")));
        assert!(r.quiet);
        assert_eq!(gate::gate_limits().len(), gate::GATE_LIMITS.len());
    }

    /// floor, pio and mmio are parts of client: asked for together they
    /// run it once with the rows they name; repeats are dropped.
    #[test]
    fn client_parts_combine() {
        let a = args(&["--scenario", "pio,floor,pio,mmio"]).unwrap();
        let p = plan(&a).unwrap();
        assert_eq!(p, [Scenario::Pio, Scenario::Floor, Scenario::Mmio]);
        let parts = p
            .iter()
            .filter_map(|s| s.client_parts())
            .reduce(client::Parts::union);
        assert_eq!(
            parts,
            Some(client::Parts {
                pio: true,
                mmio: true,
                others: false
            })
        );
        assert_eq!(
            Scenario::Floor.client_parts(),
            Some(client::Parts::default())
        );
        assert_eq!(Scenario::Client.client_parts(), Some(client::Parts::ALL));
        assert_eq!(Scenario::Irq.client_parts(), None);
        // Remote: every part counts against the VM ids like client.
        let a = args(&[
            "--server",
            "192.0.2.10:7700",
            "--scenario",
            "pio",
            "--repeat",
            "8",
        ])
        .unwrap();
        assert!(plan(&a).unwrap_err().to_string().contains("fresh VM ids"));
    }

    #[test]
    fn server_refuses_what_needs_the_embedded_topology() {
        let a = args(&["--server", "192.0.2.10:7700", "--scenario", "client,server"]).unwrap();
        let e = plan(&a).unwrap_err().0;
        assert!(
            e.contains("server scenario needs the embedded topology"),
            "{e}"
        );
        let a = args(&["--server", "192.0.2.10:7700", "--rate", "1000"]).unwrap();
        assert!(plan(&a).unwrap_err().to_string().contains("--rate"));
    }

    #[test]
    fn the_matrix_and_repetitions_are_checked_against_the_server() {
        let a = args(&["--vms", "1,8", "--vcpus", "8"]).unwrap();
        assert!(plan(&a).is_ok());
        let a = args(&["--vms", "9"]).unwrap();
        assert!(plan(&a).unwrap_err().to_string().contains("--vms 9"));
        // The matrix only matters when throughput runs.
        let a = args(&["--vms", "9", "--scenario", "client"]).unwrap();
        assert!(plan(&a).is_ok());
        let remote = ["--server", "192.0.2.10:7700"];
        let a = args(&[&remote[..], &["--vms", "8"]].concat()).unwrap();
        assert!(
            plan(&a)
                .unwrap_err()
                .to_string()
                .contains("between 1 and 4")
        );
        let a = args(&[&remote[..], &["--repeat", "9", "--scenario", "irq"]].concat()).unwrap();
        assert!(
            plan(&a)
                .unwrap_err()
                .to_string()
                .contains("--repeat 8 or fewer")
        );
        // 3 client runs (24 ids), 3 irq runs (3), one matrix
        // (1 + 2 * (1 + 1 + 2 + 2) = 13): 40 of 56.
        let a = args(&[&remote[..], &["--scenario", "client,irq,throughput"]].concat()).unwrap();
        assert!(plan(&a).is_ok());
        let a = args(&[&remote[..], &["--repeat", "8"]].concat()).unwrap();
        let e = plan(&a).unwrap_err().0;
        assert!(e.contains("fresh VM ids") && e.contains("56"), "{e}");
        let a = args(&["--vms", "0"]);
        assert_eq!(a.unwrap_err().kind(), ErrorKind::ValueValidation);
        let a = args(&["--irqs", "5"]);
        assert_eq!(a.unwrap_err().kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn help_says_how_to_use_a_remote_server() {
        let help = Cli::command().render_long_help().to_string();
        for s in [
            "--server <ADDR>",
            "bench/server-remote.toml",
            "--vms <LIST>",
            "--vcpus <LIST>",
            "irq",
            "throughput",
        ] {
            assert!(help.contains(s), "{s} missing from --help");
        }
    }
}
