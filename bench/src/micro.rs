//! The micro scenarios: `xdp-prog` (the XDP program per frame, through
//! `BPF_PROG_TEST_RUN`), `parse` (parsing a datagram in userspace) and
//! `tag` (a datagram's tag, beside plain SipHash-2-4).

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

/// The lengths `tag` times: a port write's request (64), an answer with
/// its tag's room (104), half a bulk segment (744), a full one (1464).
const TAG_LENGTHS: [usize; 4] = [64, 104, 744, 1464];

/// `iterations` of `f`, in ns each.
fn time_each(iterations: u32, mut f: impl FnMut() -> u8) -> f64 {
    let mut x = 0u8;
    for _ in 0..iterations.min(10_000) {
        x ^= f();
    }
    let start = Instant::now();
    for _ in 0..iterations {
        x ^= f();
    }
    black_box(x);
    start.elapsed().as_nanos() as f64 / f64::from(iterations.max(1))
}

/// The datagram tag per length (`wire::tag::TagKey::tag`: SipHash-2-4
/// under `LONG_TAG_MIN` bytes, POLYVAL then AES from there), beside plain
/// SipHash-2-4 over the same bytes (the tag of every length before) and
/// the long construction at every length (`TagKey::tag_long`: why short
/// datagrams keep SipHash).
pub fn tags(iterations: u32) -> Result<Vec<Row>> {
    use core::hash::Hasher;
    use siphasher::sip128::{Hasher128, SipHasher24};
    let key = devplane_wire::tag::TagKey::new(1, [0x5a; 16]);
    let mut rows = Vec::new();
    for len in TAG_LENGTHS {
        let msg: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let tag = time_each(iterations, || key.tag(black_box(&msg))[0]);
        let sip = time_each(iterations, || {
            let mut h = SipHasher24::new_with_key(&[0x5a; 16]);
            h.write(black_box(&msg));
            h.finish128().as_bytes()[0]
        });
        let long = time_each(iterations, || key.tag_long(black_box(&msg))[0]);
        let which = if len >= devplane_wire::tag::LONG_TAG_MIN {
            "polyval+aes"
        } else {
            "siphash"
        };
        report::out(format_args!(
            "tag       {len:>4} bytes  tag ({which}) {tag:>7.1} ns ({:.2} GB/s), siphash-2-4 {sip:>7.1} ns, polyval+aes {long:>7.1} ns\n",
            len as f64 / tag,
        ));
        rows.push(Row::cost("tag", format!("tag, {len} bytes"), tag));
        rows.push(Row::cost("tag", format!("siphash-2-4, {len} bytes"), sip));
        rows.push(Row::cost("tag", format!("polyval+aes, {len} bytes"), long));
    }
    Ok(rows)
}
