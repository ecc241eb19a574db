//! `dpbench`: devplane's benchmark.
//!
//! This crate owns the measurements performance engineers and CI trust:
//! scenarios run on the embedded single-machine topology, floors measured
//! in the same run, results reported as ratios to those floors. Until the
//! data path exists (server and client issues) it measures what exists: the
//! cost of the XDP steering program per frame (BPF_PROG_TEST_RUN, timed by
//! the kernel) and of parsing a datagram in userspace.

mod client;
mod hist;
mod server;
mod udp;

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use clap::{Parser, ValueEnum};
use devplane_dataplane::xdp::Program;
use devplane_wire::frame::{self, Flow};
use devplane_wire::maps::{Config, ROUTE_LOCAL, Route};
use devplane_wire::record::{Access, AccessSize, Request, RequestId};
use devplane_wire::{Datagram, Header, Kind, Record, datagram};

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

/// devplane's latency benchmark.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Scenarios to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    scenario: Vec<Scenario>,
    /// Iterations per micro-measurement (xdp-prog, parse).
    #[arg(long, default_value_t = 200_000)]
    iterations: u32,
    /// Round trips per latency measurement (server).
    #[arg(long, default_value_t = 20_000)]
    round_trips: u32,
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

fn xdp_prog(iterations: u32) -> Result<()> {
    let mut prog = Program::load(None)
        .context("loading the XDP program (needs root; run `make bench` as root)")?;
    prog.set_config(Config::default())?;
    let route = Route {
        flags: ROUTE_LOCAL,
        ..Default::default()
    };
    prog.routes()?.insert(1, route, 0)?;
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
    }
    Ok(())
}

fn parse(iterations: u32) -> Result<()> {
    for records in [1usize, 36] {
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
    }
    Ok(())
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn print_table(title: &str, rows: Vec<server::Row>) {
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>12} {:>14}",
        title, "p50 us", "p99 us", "p99.9 us", "max us", "p50/floor", "rate rec/s"
    );
    for r in rows {
        match (r.latency, r.rate) {
            (Some(l), _) => {
                let ratio = r.floor_p50.map_or(f64::NAN, |f| l.p50 as f64 / f as f64);
                println!(
                    "{:<14} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>12.2} {:>14}",
                    r.name,
                    us(l.p50),
                    us(l.p99),
                    us(l.p999),
                    us(l.max),
                    ratio,
                    "-"
                );
            }
            (None, Some(rate)) => println!(
                "{:<14} {:>9} {:>9} {:>9} {:>9} {:>12} {:>14.0}",
                r.name, "-", "-", "-", "-", "-", rate
            ),
            (None, None) => {}
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.iterations == 0 {
        bail!("--iterations must be at least 1");
    }
    let scenarios = if args.scenario.is_empty() {
        vec![
            Scenario::XdpProg,
            Scenario::Parse,
            Scenario::Server,
            Scenario::Client,
        ]
    } else {
        args.scenario
    };
    for s in scenarios {
        match s {
            Scenario::XdpProg => xdp_prog(args.iterations)?,
            Scenario::Parse => parse(args.iterations)?,
            Scenario::Server => print_table("server", server::run(args.round_trips)?),
            Scenario::Client => print_table("client", client::run(args.round_trips)?),
        }
    }
    Ok(())
}
