//! The micro scenarios: `xdp-prog` (the XDP program per frame, through
//! `BPF_PROG_TEST_RUN`) and `parse` (parsing a datagram in userspace).

use std::hint::black_box;
use std::time::Instant;

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use devplane_server::xdp::Program;
use devplane_wire::frame::{self, Flow};
use devplane_wire::maps::{Config, ROUTE_LOCAL, Route};
use devplane_wire::record::{Access, AccessSize};
use devplane_wire::{Datagram, Header, Kind, Record, datagram};

use crate::report::{self, Row};
use crate::server::request_for;

fn request_frame(records: usize, model: u32) -> Result<Vec<u8>> {
    request_frame_for(records, model, 1)
}

/// A frame from 10.99.0.1 (client 1) to server 1 carrying a datagram of
/// `records` port writes of VM `vm` to `model`.
pub(crate) fn request_frame_for(records: usize, model: u32, vm: u32) -> Result<Vec<u8>> {
    let flow = Flow {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: [10, 99, 0, 1],
        dst_ip: [10, 99, 0, 2],
        src_port: 40000,
        dst_port: devplane_wire::DEFAULT_PORT,
    };
    let access = Access::PioOut {
        port: 0x3f8,
        size: AccessSize::B1,
        data: 0x41,
    };
    let recs: Vec<Record> = (0..records as u64)
        .map(|seq| request_for(vm, seq, access))
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

pub fn xdp_prog(iterations: u32) -> Result<Vec<Row>> {
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
        (
            "routed, full datagram",
            request_frame(devplane_wire::MAX_RECORDS, 1)?,
        ),
        ("dropped, unknown model", request_frame(1, 2)?),
    ] {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&frame);
        opts.repeat = iterations;
        let res = prog.xdp()?.test_run(opts)?;
        report::out(format_args!(
            "xdp-prog  {name:<24} {:>8} ns/frame (kernel mean of {iterations} runs)\n",
            res.duration.as_nanos()
        ));
        rows.push(Row::cost("xdp-prog", name, res.duration.as_nanos() as f64));
    }
    Ok(rows)
}

pub fn parse(iterations: u32) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (records, name) in [
        (1usize, "1 record"),
        (devplane_wire::MAX_RECORDS, "full datagram"),
    ] {
        let f = request_frame(records, 1)?;
        let payload = &f[frame::PAYLOAD_OFFSET..];
        let start = Instant::now();
        for _ in 0..iterations {
            let d = Datagram::parse(black_box(payload))?;
            black_box(d.records().count());
        }
        let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
        report::out(format_args!(
            "parse     {records:>2} records{:<14} {ns:>8.1} ns/datagram\n",
            ""
        ));
        rows.push(Row::cost("parse", name, ns));
    }
    Ok(rows)
}
