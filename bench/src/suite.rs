//! Running a suite: each scenario in turn (repeated and merged), a
//! failed scenario reported without losing the others' results, and the
//! output files written at the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};

use crate::report::{self, Row, RunConfig, RunSummary, progress};
use crate::rig::{self, Rig};
use crate::{
    CLIENT_REPEAT, IRQ_REPEAT, RunArgs, SERVER_REPEAT, Scenario, THROUGHPUT_REPEAT, blk, boot,
    client, flush_storm, forward, irq, isolation, load, micro, migrate, plan, queues, scale,
    server, throughput,
};

/// Names scenarios (comma-separated, as `--scenario` and the tables name
/// them) that fail at once instead of running: how a test exercises the
/// failure path without breaking a machine.
pub const FAIL_ENV: &str = "DP_FAIL_SCENARIO";

fn fail_on_purpose() -> Vec<String> {
    std::env::var(FAIL_ENV)
        .map(|v| v.split(',').map(|s| s.trim().to_string()).collect())
        .unwrap_or_default()
}

/// The open loop's rate and number of requests, if `--rate` asks for one.
pub fn open_loop(args: &RunArgs) -> Option<(u64, u32)> {
    let rate = args.rate?;
    let n = match args.duration {
        Some(d) => (rate as f64 * d).round() as u32,
        None => args.round_trips,
    };
    Some((rate, n))
}

/// How many measurement runs `scenarios` make: one per repetition of a
/// repeated scenario (the parts of client count once), one for xdp-prog
/// and parse. The progress bar's length.
pub fn steps(args: &RunArgs, scenarios: &[Scenario]) -> u64 {
    let mut client = false;
    scenarios
        .iter()
        .map(|s| match s {
            Scenario::XdpProg
            | Scenario::Parse
            | Scenario::Tag
            | Scenario::Boot
            | Scenario::Isolation
            | Scenario::FlushStorm
            | Scenario::Forward
            | Scenario::Queues
            | Scenario::Migrate
            | Scenario::Blk
            | Scenario::Load
            | Scenario::Scale => 1,
            Scenario::Server => args.repeat.unwrap_or(SERVER_REPEAT),
            Scenario::Irq => args.repeat.unwrap_or(IRQ_REPEAT),
            Scenario::Throughput => args.repeat.unwrap_or(THROUGHPUT_REPEAT),
            _ if std::mem::replace(&mut client, true) => 0,
            _ => args.repeat.unwrap_or(CLIENT_REPEAT),
        } as u64)
        .sum()
}

/// Runs `f` on the remote rig if there is one, else on a new embedded rig
/// (topology tagged `tag`) torn down after it.
fn on_rig(
    remote: &mut Option<Rig>,
    tag: &str,
    f: impl FnOnce(&mut Rig) -> Result<Vec<Row>>,
) -> Result<Vec<Row>> {
    match remote {
        Some(r) => f(r),
        None => f(&mut Rig::embedded(tag)?),
    }
}

/// Runs a scenario `reps` times and merges the runs; the notes of the
/// first run are kept, and the warnings ([`report::warning`]) of every run.
fn repeated(
    scenario: &str,
    reps: u32,
    notes: &mut Vec<String>,
    mut once: impl FnMut(&mut Vec<String>) -> Result<Vec<Row>>,
) -> Result<Vec<Row>> {
    let mut runs = Vec::new();
    for i in 1..=reps {
        if interrupted() {
            break;
        }
        progress(format_args!("{scenario}: run {i} of {reps}"));
        let mut n = Vec::new();
        runs.push(once(&mut n)?);
        report::step_done();
        if i == 1 {
            notes.extend(n);
        } else {
            notes.extend(n.into_iter().filter(|x| report::is_warning(x)));
        }
    }
    if reps > 1 {
        notes.push(format!(
            "{scenario}: {reps} runs merged; percentiles and ratios are over all their samples"
        ));
    }
    Ok(report::merge_repetitions(runs))
}

pub fn run(args: RunArgs) -> Result<()> {
    let scenarios = plan(&args).map_err(anyhow::Error::msg)?;
    let mut remote = args.server.map(Rig::remote);
    report::init_progress(args.quiet, steps(&args, &scenarios));
    let now = SystemTime::now();
    let (timestamp, dir_stamp) = report::timestamps(now);
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("bench-results").join(dir_stamp));
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut placement = BTreeMap::new();
    let mut repeat = BTreeMap::new();
    // The parts of the client scenario asked for, run once together.
    let client_parts = scenarios
        .iter()
        .filter_map(|s| s.client_parts())
        .reduce(client::Parts::union);
    let mut client_done = false;
    let mut failed = Vec::new();
    let mut skipped = Vec::new();
    let fail_on_purpose = fail_on_purpose();
    for s in &scenarios {
        if interrupted() {
            break;
        }
        if s.client_parts().is_some() && std::mem::replace(&mut client_done, true) {
            continue;
        }
        progress(format_args!("scenario {}", s.name()));
        let name = match s.client_parts() {
            Some(_) => "client",
            None => s.name(),
        };
        // One scenario's failure is reported, and the others still run
        // and are written.
        let mut once = || -> Result<()> {
            if fail_on_purpose.iter().any(|f| f == name) {
                bail!("failed on purpose ({FAIL_ENV})");
            }
            match s {
                Scenario::XdpProg => {
                    rows.extend(micro::xdp_prog(args.iterations)?);
                    report::step_done();
                }
                Scenario::Parse => {
                    rows.extend(micro::parse(args.iterations)?);
                    report::step_done();
                }
                Scenario::Tag => {
                    rows.extend(micro::tags(args.iterations)?);
                    report::step_done();
                }
                Scenario::Boot => {
                    let budget = match (args.boot_budget, args.scenario.is_empty()) {
                        (Some(s), _) => Some(Duration::from_secs(s)),
                        (None, true) => Some(boot::SUITE_BUDGET),
                        (None, false) => None,
                    };
                    if let Some(reason) = budget.and_then(boot::skip_reason) {
                        let s = report::Skipped {
                            scenario: name.to_string(),
                            reason,
                        };
                        report::out(s.table());
                        skipped.push(s);
                    } else {
                        let (r, table) = boot::run(&mut notes)?;
                        report::out(table);
                        rows.extend(r);
                    }
                    report::step_done();
                }
                Scenario::Isolation => {
                    let r = isolation::run(args.round_trips, &mut notes)?;
                    report::step_done();
                    report::print_table("isolation", &r);
                    rows.extend(r);
                }
                Scenario::Migrate => {
                    let r = migrate::run(args.round_trips, &mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    rows.extend(r);
                }
                Scenario::FlushStorm => {
                    let r = flush_storm::run(args.round_trips, &mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    rows.extend(r);
                }
                Scenario::Queues => {
                    let r = queues::run(args.round_trips, &mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    rows.extend(r);
                }
                Scenario::Blk => {
                    let r = blk::run(&mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    notes.extend(blk::goal(&r));
                    rows.extend(r);
                }
                Scenario::Forward => {
                    let r = forward::run(args.round_trips, &mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    notes.extend(forward::goal(&r));
                    rows.extend(r);
                }
                Scenario::Load => {
                    let plan = load::Plan {
                        iters: args.round_trips,
                        rate: args.rate,
                        secs: args.duration.unwrap_or(load::POINT_SECS),
                        rate_for: Duration::from_millis(300),
                    };
                    let r = load::run(plan, &mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    rows.extend(r);
                }
                Scenario::Scale => {
                    let sat = Duration::from_millis(200);
                    let r = scale::run(args.round_trips, sat, args.iterations, &mut notes)?;
                    report::step_done();
                    report::print_table(name, &r);
                    rows.extend(r);
                }
                Scenario::Server => {
                    let reps = args.repeat.unwrap_or(SERVER_REPEAT);
                    repeat.insert("server".to_string(), reps);
                    // One second of worker rate in all, split over the runs.
                    let rate_for = (Duration::from_secs(1) / reps).max(Duration::from_millis(100));
                    let r = repeated("server", reps, &mut notes, |n| {
                        server::run(args.round_trips, open_loop(&args), rate_for, n)
                    })?;
                    report::print_table("server", &r);
                    placement.insert("server".to_string(), server::placement());
                    rows.extend(r);
                }
                _ => {
                    let reps = args.repeat.unwrap_or(match s {
                        Scenario::Irq => IRQ_REPEAT,
                        Scenario::Throughput => THROUGHPUT_REPEAT,
                        _ => CLIENT_REPEAT,
                    });
                    repeat.insert(name.to_string(), reps);
                    rig::reset_knobs();
                    let parts = client_parts.unwrap_or(client::Parts::ALL);
                    let r = repeated(name, reps, &mut notes, |n| match s {
                        Scenario::Client | Scenario::Floor | Scenario::Pio | Scenario::Mmio => {
                            on_rig(&mut remote, "bcli", |rig| {
                                client::run(rig, args.round_trips, parts, n)
                            })
                        }
                        Scenario::Irq => {
                            on_rig(&mut remote, "birq", |rig| irq::run(rig, args.irqs, n))
                        }
                        _ => on_rig(&mut remote, "btp", |rig| {
                            throughput::run(rig, &args.vms, &args.vcpus, args.writes, n)
                        }),
                    })?;
                    report::print_table(name, &r);
                    notes.extend(client::targets(&r));
                    notes.extend(client::tag_cost(&r));
                    placement.insert(name.to_string(), rig::placement());
                    rows.extend(r);
                }
            }
            Ok(())
        };
        if let Err(e) = once() {
            let f = report::Failed {
                scenario: name.to_string(),
                error: format!("{e:#}"),
            };
            report::out(f.table());
            failed.push(f);
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
            duration: args.duration,
            repeat,
            argv: std::env::args().collect(),
            env: report::dp_env(),
            placement,
            server: args.server.map(|a| a.to_string()),
        },
        notes,
        rows: rows.iter().map(Row::to_summary).collect(),
        failed,
        skipped,
    };
    report::finish_progress();
    // Files first: a closed stdout must not lose them.
    let files = report::write_outputs(&out, &summary, &rows)?;
    for n in &summary.notes {
        println!("{n}");
    }
    println!("results in {}/:", out.display());
    for f in files {
        println!("  {}", f.file_name().unwrap_or_default().to_string_lossy());
    }
    if !summary.failed.is_empty() {
        let names: Vec<&str> = summary.failed.iter().map(|f| f.scenario.as_str()).collect();
        bail!(
            "{} scenario(s) failed ({}): the files hold the others' results",
            names.len(),
            names.join(", ")
        );
    }
    if interrupted() {
        bail!("interrupted: the files hold the measurements that finished");
    }
    Ok(())
}

/// Set by Ctrl-C: the run stops after the measurement under way, tears its
/// topology down and writes what it has. A second Ctrl-C quits at once
/// (the next run sweeps the namespaces and pins this one leaves).
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

pub fn on_ctrl_c() {
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "dpbench: stopping after the measurement under way and writing what finished \
             (Ctrl-C again to quit now)"
        );
    });
}
