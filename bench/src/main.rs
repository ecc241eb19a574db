//! `dpbench`: devplane's benchmark and regression gate.
//!
//! This crate owns the measurements performance engineers and CI trust:
//! scenarios run on the embedded single-machine topology, floors measured
//! in the same run, results reported as ratios to those floors.
//!
//! - `dpbench [run] [--scenario ...]` runs scenarios, prints the table and
//!   writes `summary.json`, one `.hgrm` per latency row and `latency.svg`
//!   into `--out` (default `bench-results/<UTC timestamp>`);
//! - `dpbench compare BASE.json NEW.json --max-regress p99=20%` is the
//!   gate: it compares ratios to the same-run floors and exits 1 on a
//!   regression beyond the limit, 2 when it cannot judge.

mod client;
mod gate;
mod hist;
mod plot;
mod report;
mod server;
mod udp;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use clap::{Args, Parser, Subcommand, ValueEnum};
use devplane_dataplane::xdp::Program;
use devplane_wire::frame::{self, Flow};
use devplane_wire::maps::{Config, ROUTE_LOCAL, Route};
use devplane_wire::record::{Access, AccessSize, Request, RequestId};
use devplane_wire::{Datagram, Header, Kind, Record, datagram};

use crate::gate::Limit;
use crate::report::{Row, RunConfig, RunSummary, progress};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// The XDP program per frame, routed and dropped paths (needs root).
    XdpProg,
    /// Parsing a datagram in userspace.
    Parse,
    /// Server round trips and rate on the netns topology, beside the raw
    /// busy-polling UDP floor of the same run (needs root).
    Server,
    /// KVM guests on the netns topology: the exit floor with a local null
    /// model, remote port-I/O and MMIO round trips, the UDP floor of the
    /// same path, and N vCPUs' posted-write rate (needs root and KVM).
    Client,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::XdpProg => "xdp-prog",
            Scenario::Parse => "parse",
            Scenario::Server => "server",
            Scenario::Client => "client",
        }
    }
}

/// devplane's latency benchmark and regression gate.
///
/// Without a subcommand, runs scenarios (as `dpbench run`).
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
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
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Iterations per micro-measurement (xdp-prog, parse).
    #[arg(long, default_value_t = 200_000)]
    iterations: u32,
    /// Round trips per latency measurement (server, client).
    #[arg(long, default_value_t = 20_000)]
    round_trips: u32,
    /// Open loop: the server scenario's XDP round trip sends this many
    /// requests per second on a fixed schedule and times each from its
    /// intended send time (row `xdp-rtt-open`). Default: closed loop.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    rate: Option<u64>,
    /// Run the server and client scenarios this many times, each
    /// repetition measuring its own floors, and merge them: a row's
    /// percentiles and ratios are over the samples of every repetition
    /// [default: 25 for server, 3 for client].
    #[arg(long, value_name = "R", value_parser = clap::value_parser!(u32).range(1..))]
    repeat: Option<u32>,
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
    /// METRIC=PERCENT: fail when a row's METRIC/floor ratio grew by more
    /// than PERCENT (metrics: p50, p90, p99, p999, p9999, max). Repeatable.
    /// Default: p99=20%.
    #[arg(long = "max-regress", value_name = "METRIC=PERCENT", value_parser = gate::parse_limit)]
    max_regress: Vec<Limit>,
}

fn request_frame(records: usize, model: u32) -> Result<Vec<u8>> {
    let flow = Flow {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: [10, 99, 0, 1],
        dst_ip: [10, 99, 0, 2],
        src_port: 40000,
        dst_port: devplane_wire::DEFAULT_PORT,
    };
    let recs: Vec<Record> = (0..records as u64)
        .map(|seq| {
            Record::Request(Request {
                id: RequestId {
                    vm: 1,
                    hypervisor: 1,
                    vcpu: 0,
                    seq,
                },
                access: Access::PioOut {
                    port: 0x3f8,
                    size: AccessSize::B1,
                    data: 0x41,
                },
                flags: 0,
            })
        })
        .collect();
    let mut f = vec![0u8; frame::PAYLOAD_OFFSET + devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(
        &mut f[frame::PAYLOAD_OFFSET..],
        Header::new(Kind::Request, model, 1, 1),
        &recs,
    )?;
    let len = frame::write_headers(&mut f, &flow, n).context("frame")?;
    f.truncate(len);
    Ok(f)
}

fn xdp_prog(iterations: u32) -> Result<Vec<Row>> {
    let mut prog = Program::load(None)
        .context("loading the XDP program (needs root; run `make bench` as root)")?;
    prog.set_config(Config::default())?;
    let route = Route {
        flags: ROUTE_LOCAL,
        ..Default::default()
    };
    prog.routes()?.insert(1, route, 0)?;
    let mut rows = Vec::new();
    for (name, frame) in [
        ("routed, 1 record", request_frame(1, 1)?),
        ("routed, 36 records", request_frame(36, 1)?),
        ("dropped, unknown model", request_frame(1, 2)?),
    ] {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.repeat = iterations;
        let res = prog.xdp()?.test_run(opts)?;
        println!(
            "xdp-prog  {name:<24} {:>8} ns/frame (kernel mean of {iterations} runs)",
            res.duration.as_nanos()
        );
        rows.push(Row::cost("xdp-prog", name, res.duration.as_nanos() as f64));
    }
    Ok(rows)
}

fn parse(iterations: u32) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (records, name) in [(1usize, "1 record"), (36, "36 records")] {
        let f = request_frame(records, 1)?;
        let payload = &f[frame::PAYLOAD_OFFSET..];
        let start = Instant::now();
        for _ in 0..iterations {
            let d = Datagram::parse(black_box(payload))?;
            black_box(d.records().count());
        }
        let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
        println!(
            "parse     {records:>2} records{:<14} {ns:>8.1} ns/datagram",
            ""
        );
        rows.push(Row::cost("parse", name, ns));
    }
    Ok(rows)
}

/// Runs of the server scenario merged into one result by default.
const SERVER_REPEAT: u32 = 25;
/// Runs of the client scenario merged into one result by default.
const CLIENT_REPEAT: u32 = 3;

/// Runs a scenario `reps` times and merges the runs; the notes of the
/// first run are kept.
fn repeated(
    scenario: &str,
    reps: u32,
    notes: &mut Vec<String>,
    mut once: impl FnMut(&mut Vec<String>) -> Result<Vec<Row>>,
) -> Result<Vec<Row>> {
    let mut runs = Vec::new();
    for i in 1..=reps {
        progress(format_args!("{scenario}: run {i} of {reps}"));
        let mut n = Vec::new();
        runs.push(once(&mut n)?);
        if i == 1 {
            notes.extend(n);
        }
    }
    if reps > 1 {
        notes.push(format!(
            "{scenario}: {reps} runs merged; percentiles and ratios are over all their samples"
        ));
    }
    Ok(report::merge_repetitions(runs))
}

fn run(args: RunArgs) -> Result<()> {
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    if args.round_trips == 0 {
        bail!("--round-trips must be at least 1");
    }
    report::init_progress(args.quiet);
    let now = SystemTime::now();
    let (timestamp, dir_stamp) = report::timestamps(now);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(dir_stamp));
    let scenarios = if args.scenario.is_empty() {
        vec![
            Scenario::XdpProg,
            Scenario::Parse,
            Scenario::Server,
            Scenario::Client,
        ]
    } else {
        args.scenario.clone()
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut placement = BTreeMap::new();
    let mut repeat = BTreeMap::new();
    for s in &scenarios {
        progress(format_args!("scenario {}", s.name()));
        match s {
            Scenario::XdpProg => rows.extend(xdp_prog(args.iterations)?),
            Scenario::Parse => rows.extend(parse(args.iterations)?),
            Scenario::Server => {
                let reps = args.repeat.unwrap_or(SERVER_REPEAT);
                repeat.insert("server".to_string(), reps);
                // One second of worker rate in all, split over the runs.
                let rate_for = (Duration::from_secs(1) / reps).max(Duration::from_millis(100));
                let r = repeated("server", reps, &mut notes, |n| {
                    server::run(args.round_trips, args.rate, rate_for, n)
                })?;
                report::print_table("server", &r);
                placement.insert("server".to_string(), server::placement());
                rows.extend(r);
            }
            Scenario::Client => {
                let reps = args.repeat.unwrap_or(CLIENT_REPEAT);
                repeat.insert("client".to_string(), reps);
                let r = repeated("client", reps, &mut notes, |n| {
                    client::run(args.round_trips, n)
                })?;
                report::print_table("client", &r);
                placement.insert("client".to_string(), client::placement());
                rows.extend(r);
            }
        }
    }
    let summary = RunSummary {
        schema: report::SCHEMA,
        timestamp,
        git_revision: report::git_revision(),
        machine: report::Machine::this(),
        config: RunConfig {
            scenarios: scenarios.iter().map(|s| s.name().to_string()).collect(),
            iterations: args.iterations,
            round_trips: args.round_trips,
            rate: args.rate,
            repeat,
            argv: std::env::args().collect(),
            env: report::dp_env(),
            placement,
        },
        notes,
        rows: rows.iter().map(Row::to_summary).collect(),
    };
    // Files first: a closed stdout must not lose them.
    let files = report::write_outputs(&out, &summary, &rows)?;
    for n in &summary.notes {
        println!("{n}");
    }
    println!("results in {}/:", out.display());
    for f in files {
        println!("  {}", f.file_name().unwrap_or_default().to_string_lossy());
    }
    Ok(())
}

fn compare(args: CompareArgs) -> ExitCode {
    let limits = if args.max_regress.is_empty() {
        vec![Limit {
            metric: "p99".into(),
            frac: gate::DEFAULT_P99_LIMIT,
        }]
    } else {
        args.max_regress
    };
    let judged = gate::load(&args.base).and_then(|base| {
        let new = gate::load(&args.new)?;
        let c = gate::compare(&base, &new, &limits)?;
        Ok((base, new, c))
    });
    match judged {
        Err(e) => {
            eprintln!("dpbench compare: {e}");
            ExitCode::from(2)
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

fn main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Baseline(b)) => baseline(b).map(|()| ExitCode::SUCCESS),
        Some(Command::Compare(c)) => Ok(compare(c)),
        Some(Command::Run(r)) => run(r).map(|()| ExitCode::SUCCESS),
        None => run(cli.run).map(|()| ExitCode::SUCCESS),
    }
}
