//! The `load` scenario: the XDP server's round trip against offered load,
//! open loop in the manner of wrk2, on the embedded topology.
//!
//! Each request is a full datagram (`MAX_RECORDS` non-posted port writes
//! to a null model, as `server`'s `xdp-rate` sends), so that one sending
//! thread can offer more than one worker serves. In order:
//!
//! - `saturation`: one worker's rate (records/s), 8 datagrams in flight;
//! - `unloaded`: the same datagram's closed-loop round trip, one in flight;
//! - `offered-N%`: requests sent on a fixed schedule at N% of
//!   `saturation` (records/s, from 10% to 200%), whatever the answers do,
//!   each timed from its *intended* send time (coordinated omission
//!   corrected: a stall of the sender or the server is charged to every
//!   request meant to leave during it). A request not answered within
//!   [`GRACE`] after the last send is lost (past saturation the worker's
//!   ring overflows);
//! - `knee`: the highest offered rate whose p99, counting lost requests
//!   as slower than any answer, stays within [`KNEE_FACTOR`] x the
//!   unloaded p99.
//!
//! With `--rate N` one point at N records/s is run instead of the sweep.
//! The client thread busy-polls on core 0, the worker on core 1.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use devplane_control::config::Mode;
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::Topology;
use devplane_wire::{Datagram, MAX_RECORDS, Record, Status};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress, warning};
use crate::rig::PIO_PORT;
use crate::server::{client_socket, config, encode_for, full_writes, on_client, rate_of_vm};
use crate::udp::{OpenLoop, Unanswered, open_loop_with, round_trips};

pub const SCENARIO: &str = "load";

/// Offered loads of the sweep, in percent of the measured saturation.
pub const SWEEP: [u32; 14] = [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120, 150, 200];
/// The knee: the highest load whose p99 is within this factor of the
/// unloaded p99.
pub const KNEE_FACTOR: f64 = 2.0;
/// Seconds each offered load runs unless `--duration` says otherwise.
pub const POINT_SECS: f64 = 0.5;
/// How long after the last send an unanswered request counts as lost.
pub const GRACE: Duration = Duration::from_millis(200);

/// The VM of the sweep and of the unloaded round trip.
const VM_SWEEP: u32 = 1;
/// The VM of the saturation measurement (a sequence of its own).
const VM_SATURATION: u32 = 2;

/// One point of the sweep: what was offered and what came back.
pub struct Point {
    /// Answered requests, timed from their intended send times.
    pub lat: Latency,
    /// Requests scheduled (and sent).
    pub sent: u64,
    /// Requests answered.
    pub answered: u64,
    /// From the first intended send to the last answer (or the end of
    /// the grace time).
    pub elapsed: Duration,
}

impl Point {
    /// Requests never answered.
    pub fn lost(&self) -> u64 {
        self.sent - self.answered
    }

    /// The p99 over every request sent, a lost one counting as slower than
    /// any answer: `None` when more than 1% were lost.
    pub fn p99_with_losses(&self) -> Option<u64> {
        quantile_with_losses(&self.lat, self.sent, 0.99)
    }
}

/// The `q` quantile of `sent` requests of which `lat` holds the answered
/// ones, a lost request counting as slower than any answer; `None` when
/// the quantile falls among the lost.
pub fn quantile_with_losses(lat: &Latency, sent: u64, q: f64) -> Option<u64> {
    let answered = lat.len();
    if answered == 0 || sent == 0 {
        return None;
    }
    let q_answered = q * sent as f64 / answered as f64;
    (q_answered <= 1.0).then(|| lat.quantile(q_answered))
}

/// The knee of a sweep: the highest offered rate (of `points`, in the
/// order offered) whose p99 with losses is within `factor` x `unloaded_p99`.
/// `None` when even the lowest load is beyond it.
pub fn knee(points: &[(f64, &Point)], unloaded_p99: u64, factor: f64) -> Option<f64> {
    let limit = unloaded_p99 as f64 * factor;
    points
        .iter()
        .filter(|(_, p)| p.p99_with_losses().is_some_and(|v| v as f64 <= limit))
        .map(|(r, _)| *r)
        .fold(None, |a: Option<f64>, r| Some(a.map_or(r, |a| a.max(r))))
}

/// The request datagram `i` of a sequence starting at `first_seq`:
/// `MAX_RECORDS` port writes of VM `vm`, numbered on from `first_seq`.
fn full_request(vm: u32, first_seq: u64, i: u64, buf: &mut [u8]) -> usize {
    let first = first_seq + i * MAX_RECORDS as u64;
    encode_for(buf, 1, &full_writes(vm, PIO_PORT, first))
}

/// Which request (index from `first_seq`) a full answer answers; fails on
/// anything but `MAX_RECORDS` Ok answers.
fn answer_index(first_seq: u64, bytes: &[u8]) -> Result<u64> {
    let d = Datagram::parse(bytes).map_err(|e| anyhow!("bad answer: {e}"))?;
    let mut first = None;
    let mut n = 0usize;
    for r in d.records() {
        match r {
            Record::Response(r) if r.status == Status::Ok => {
                first.get_or_insert(r.id.seq);
                n += 1;
            }
            other => bail!("unexpected answer record: {other:?}"),
        }
    }
    match first {
        Some(s) if n == MAX_RECORDS && s >= first_seq => Ok((s - first_seq) / MAX_RECORDS as u64),
        _ => bail!("an answer of {n} records (want {MAX_RECORDS}) or from before this run"),
    }
}

/// Sends `n` requests `make(i)` at `rate` per second on a fixed schedule
/// and times each answer from its intended send time (`index_of` says
/// which request an answer is for). Requests due together (after a stall
/// of the sender) leave together. Unanswered [`GRACE`] after the last one
/// was due, a request is lost.
pub fn open_loop_lossy(
    sock: &std::net::UdpSocket,
    to: SocketAddr,
    n: u64,
    rate: u64,
    make: impl FnMut(u64, &mut [u8]) -> usize,
    index_of: impl FnMut(&[u8]) -> Result<u64>,
) -> Result<Point> {
    let mut lat = Latency::new();
    let plan = OpenLoop {
        n,
        rate,
        unanswered: Unanswered::Lose(GRACE),
    };
    let s = open_loop_with(sock, to, plan, make, index_of, |_, ns| lat.record(ns))?;
    Ok(Point {
        lat,
        sent: s.sent,
        answered: s.answered,
        elapsed: s.elapsed,
    })
}

/// What one run of the scenario measures.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Samples of the unloaded round trip.
    pub iters: u32,
    /// The one offered load (records/s) `--rate` names instead of the
    /// sweep.
    pub rate: Option<u64>,
    /// Seconds per offered load.
    pub secs: f64,
    /// How long the saturation is measured.
    pub rate_for: Duration,
}

/// Runs the scenario once: the worker's saturation for `plan.rate_for`,
/// the unloaded round trip (`plan.iters` samples), then the sweep (or the
/// one point `--rate` names, records/s), each point `plan.secs` long.
pub fn run(plan: Plan, notes: &mut Vec<String>) -> Result<Vec<Row>> {
    let topo = Topology::new("bload").context("building the netns topology (needs root)")?;
    let to = SocketAddr::from((topo.server_ip(), crate::server::PORT));
    let mut cfg = config(&topo, Mode::Xdp);
    let mut vm2 = cfg.vms[0].clone();
    vm2.id = VM_SATURATION;
    cfg.vms.push(vm2);
    let srv =
        ServerThread::spawn(cfg, Some(topo.server_netns())).context("starting the XDP server")?;
    let res = sweep(&topo, to, plan, notes);
    srv.stop();
    let (mut rows, lightest) = res?;
    if let Some(l) = lightest
        && let Err(e) = echo_rows(&topo, plan, &l, &mut rows, notes)
    {
        // The echo explains the light loads; it is not judged, and its
        // failure does not throw the sweep away.
        notes.push(warning(format_args!(
            "load: the raw UDP echo failed: {e:#}"
        )));
    }
    Ok(rows)
}

/// The lightest offered load of a sweep: its name, its datagram rate,
/// and the unloaded round trip's p50 (for the echo's note).
struct Lightest {
    name: String,
    dg_rate: u64,
    unloaded_p50: u64,
}

fn sweep(
    topo: &Topology,
    to: SocketAddr,
    plan: Plan,
    notes: &mut Vec<String>,
) -> Result<(Vec<Row>, Option<Lightest>)> {
    let Plan {
        iters,
        rate,
        secs,
        rate_for,
    } = plan;
    let k = MAX_RECORDS as u64;
    progress(format_args!("load: saturation, {rate_for:?}"));
    let saturation = rate_of_vm(topo, to, 8, rate_for, VM_SATURATION)?;
    let iters = iters.clamp(100, 20_000);
    let warmup = iters / 10;
    progress(format_args!("load: unloaded, {iters} round trips"));
    let unloaded = {
        let sock = client_socket(topo)?;
        on_client(topo, move || {
            round_trips(
                &sock,
                to,
                warmup,
                iters,
                |i, b| full_request(VM_SWEEP, 1, i, b),
                |i, b| match answer_index(1, b)? {
                    j if j == i => Ok(()),
                    j => bail!("answer to {j} while waiting for {i}"),
                },
            )
        })?
    };
    let mut next_seq = 1 + u64::from(warmup + iters) * k;
    let unloaded_p99 = unloaded.summary().p99;
    let unloaded_p50 = unloaded.summary().p50;
    let floor = Floor::of(format!("{SCENARIO}/unloaded"), &unloaded);
    let mut rows = vec![
        Row::rate(SCENARIO, "saturation", saturation).with_knobs([
            ("records_per_datagram", k.to_string()),
            ("in_flight", "8".to_string()),
        ]),
        Row::floor(SCENARIO, "unloaded", unloaded)
            .with_knobs([("records_per_datagram", k), ("round_trips", iters.into())]),
    ];
    let points: Vec<(String, u64, Option<u32>)> = match rate {
        Some(r) => vec![(format!("offered-{r}"), r, None)],
        None => SWEEP
            .iter()
            .map(|&pct| {
                (
                    format!("offered-{pct}%"),
                    (saturation * pct as f64 / 100.0) as u64,
                    Some(pct),
                )
            })
            .collect(),
    };
    // The lightest point's schedule, for the echo measured after the
    // server stops (see `echo_rows`).
    let lightest = points.first().map(|(name, records_per_s, _)| Lightest {
        name: name.clone(),
        dg_rate: (records_per_s / k).max(1),
        unloaded_p50,
    });
    let mut measured = Vec::new();
    for (name, records_per_s, pct) in points {
        let dg_rate = (records_per_s / k).max(1);
        let n = ((dg_rate as f64 * secs).round() as u64).clamp(10, 2_000_000);
        progress(format_args!(
            "load: {name}, {n} datagrams at {dg_rate}/s ({records_per_s} records/s)"
        ));
        let first = next_seq;
        let sock = client_socket(topo)?;
        let p = on_client(topo, move || {
            open_loop_lossy(
                &sock,
                to,
                n,
                dg_rate,
                |i, b| full_request(VM_SWEEP, first, i, b),
                |b| answer_index(first, b),
            )
        })?;
        next_seq += n * k;
        let offered = (dg_rate * k) as f64;
        let achieved = p.answered as f64 * k as f64 / p.elapsed.as_secs_f64().max(1e-9);
        measured.push((offered, name.clone(), pct, p, achieved));
    }
    let pts: Vec<(f64, &Point)> = measured.iter().map(|m| (m.0, &m.3)).collect();
    let knee_rate = knee(&pts, unloaded_p99, KNEE_FACTOR);
    for (offered, name, pct, p, achieved) in measured {
        let lost = p.lost();
        let mut row = Row::latency(SCENARIO, name, p.lat, floor.clone())
            .with_rate(achieved)
            .with_knobs([
                ("offered_records_per_s", format!("{offered:.0}")),
                ("datagrams_sent", p.sent.to_string()),
                ("lost", lost.to_string()),
                ("records_per_datagram", k.to_string()),
            ]);
        if let Some(pct) = pct {
            row = row.with_knobs([("offered_percent_of_saturation", pct)]);
        }
        if lost > 0 {
            notes.push(format!(
                "load: {}: {lost} of {} requests lost (not answered within {GRACE:?} of the last \
                 send)",
                row.name, p.sent
            ));
        }
        rows.push(row);
    }
    let knee_row = Row::rate(SCENARIO, "knee", knee_rate.unwrap_or(0.0)).with_knobs([
        ("factor", KNEE_FACTOR.to_string()),
        ("unloaded_p99_ns", unloaded_p99.to_string()),
        (
            "percent_of_saturation",
            knee_rate.map_or("-".to_string(), |r| {
                format!("{:.0}", 100.0 * r / saturation)
            }),
        ),
    ]);
    notes.push(match knee_rate {
        Some(r) => format!(
            "load: knee at {r:.0} records/s ({:.0}% of one worker's saturation, {saturation:.0} \
             records/s): the highest offered load whose p99 (lost requests counted as slowest) \
             stays within {KNEE_FACTOR}x the unloaded p99 ({:.1} us)",
            100.0 * r / saturation,
            unloaded_p99 as f64 / 1000.0
        ),
        None => format!(
            "load: no knee: even the lowest offered load had p99 above {KNEE_FACTOR}x the \
             unloaded p99 ({:.1} us)",
            unloaded_p99 as f64 / 1000.0
        ),
    });
    rows.push(knee_row);
    Ok((rows, lightest))
}

/// The host's own cost of gaps between datagrams: a raw UDP echo of
/// datagrams of the same size, closed loop and then on the schedule of
/// the lightest offered load. Measured with the server stopped: the echo
/// spins on the worker's core, as the worker did.
fn echo_rows(
    topo: &Topology,
    plan: Plan,
    l: &Lightest,
    rows: &mut Vec<Row>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let iters = plan.iters.clamp(100, 20_000);
    let warmup = iters / 10;
    let (name, dg_rate, unloaded_p50) = (l.name.as_str(), l.dg_rate, l.unloaded_p50);
    let n = ((dg_rate as f64 * plan.secs).round() as u64).clamp(10, 2_000_000);
    progress(format_args!(
        "load: raw UDP echo, {iters} round trips, then {n} datagrams at {dg_rate}/s"
    ));
    let (closed, spaced) = echo_spacing(topo, warmup, iters, n, dg_rate)?;
    let (c50, s50) = (closed.summary().p50, spaced.lat.summary().p50);
    notes.push(format!(
        "load: the host's cost of gaps: a raw UDP echo of the same datagrams has p50 {:.1} us \
         back to back and {:.1} us ({:.2}x) on the {name} schedule ({:.0} us apart), where the \
         devplane round trip's unloaded p50 is {:.1} us; a light load's ratio to `unloaded` \
         carries this (docs/ARCHITECTURE.md, \"The gate\")",
        c50 as f64 / 1000.0,
        s50 as f64 / 1000.0,
        s50 as f64 / c50.max(1) as f64,
        1e6 / dg_rate as f64,
        unloaded_p50 as f64 / 1000.0,
    ));
    let echo_floor = Floor::of(format!("{SCENARIO}/echo"), &closed);
    let knobs = [
        ("datagram_rate", dg_rate.to_string()),
        ("datagrams_sent", spaced.sent.to_string()),
        ("lost", spaced.lost().to_string()),
    ];
    let spaced_row = Row::latency(
        SCENARIO,
        format!("echo-{}", name_suffix(name)),
        spaced.lat,
        echo_floor,
    )
    .with_knobs(knobs);
    // After `unloaded`, before the offered loads.
    let at = rows
        .iter()
        .position(|r| r.name == "unloaded")
        .map_or(rows.len(), |i| i + 1);
    rows.insert(at, spaced_row);
    rows.insert(
        at,
        Row::floor(SCENARIO, "echo", closed).with_knobs([("round_trips", iters)]),
    );
    Ok(())
}

/// `offered-10%` -> `10%`: the echo row's name follows the point's.
fn name_suffix(name: &str) -> &str {
    name.strip_prefix("offered-").unwrap_or(name)
}

/// A raw busy-polling UDP echo (`server::with_echo`, on the worker's core)
/// of datagrams the size of a full request: `iters` round trips back to
/// back, then `n` datagrams at `dg_rate` per second on a fixed schedule,
/// timed as the offered loads are.
fn echo_spacing(
    topo: &Topology,
    warmup: u32,
    iters: u32,
    n: u64,
    dg_rate: u64,
) -> Result<(Latency, Point)> {
    let len = full_request(VM_SWEEP, 1, 0, &mut [0u8; 2048]);
    let make = move |i: u64, b: &mut [u8]| {
        b[..len].fill(0);
        b[..8].copy_from_slice(&i.to_le_bytes());
        len
    };
    let index_of = move |b: &[u8]| match b.get(..8) {
        Some(i) if b.len() == len => Ok(u64::from_le_bytes(i.try_into().unwrap_or_default())),
        _ => bail!("an echo of {} bytes (sent {len})", b.len()),
    };
    crate::server::with_echo(topo, |to| {
        let sock = client_socket(topo)?;
        let closed = on_client(topo, move || {
            round_trips(&sock, to, warmup, iters, make, |i, b| match index_of(b)? {
                j if j == i => Ok(()),
                j => bail!("echo of {j} while waiting for {i}"),
            })
        })?;
        let sock = client_socket(topo)?;
        // Numbered on from the closed loop's, so that a late echo of those
        // is not taken for one of these.
        let first = u64::from(warmup + iters);
        let spaced = on_client(topo, move || {
            open_loop_lossy(
                &sock,
                to,
                n,
                dg_rate,
                move |i, b| make(first + i, b),
                move |b| {
                    index_of(b)?
                        .checked_sub(first)
                        .context("an echo from the closed loop")
                },
            )
        })?;
        Ok((closed, spaced))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The echo row is named after the point whose schedule it keeps.
    #[test]
    fn the_echo_row_follows_the_lightest_point() {
        assert_eq!(name_suffix("offered-10%"), "10%");
        assert_eq!(name_suffix("offered-250000"), "250000");
        assert_eq!(name_suffix("other"), "other");
    }

    fn point(answered_ns: &[u64], sent: u64) -> Point {
        let mut lat = Latency::new();
        for &v in answered_ns {
            lat.record(v);
        }
        Point {
            answered: lat.len(),
            lat,
            sent,
            elapsed: Duration::from_secs(1),
        }
    }

    /// Lost requests count as slower than any answer: 2% lost puts the
    /// p99 among them; 0.5% lost moves it up the answered ones.
    #[test]
    fn losses_count_as_the_slowest() {
        let fast: Vec<u64> = (0..980)
            .map(|_| 10_000)
            .chain((0..20).map(|_| 50_000))
            .collect();
        let p = point(&fast, 1000);
        assert_eq!(p.lost(), 0);
        assert_eq!(p.p99_with_losses().map(|v| v / 1000), Some(50));
        let p = point(&fast[..980], 1000);
        assert_eq!(p.lost(), 20);
        assert_eq!(p.p99_with_losses(), None);
        let p = point(&fast[..995], 1000);
        // 99% of 1000 is the 990th: among the 15 slow answers.
        assert_eq!(p.p99_with_losses().map(|v| v / 1000), Some(50));
        assert_eq!(quantile_with_losses(&Latency::new(), 10, 0.5), None);
    }

    /// The knee is the highest load within the factor, even when a lower
    /// load was above it (noise); none when every load is above it.
    #[test]
    fn the_knee_is_the_highest_load_within_the_factor() {
        let ok = point(&[10_000; 100], 100);
        let slow = point(&[30_000; 100], 100);
        let lossy = point(&[10_000; 90], 100);
        let pts = [
            (100.0, &ok),
            (200.0, &slow),
            (300.0, &ok),
            (400.0, &lossy),
            (500.0, &slow),
        ];
        assert_eq!(knee(&pts, 10_000, 2.0), Some(300.0));
        assert_eq!(knee(&pts[1..2], 10_000, 2.0), None);
        assert_eq!(knee(&pts, 20_000, 2.0), Some(500.0));
    }

    /// Full requests and their answers' index round trip, and an answer
    /// of the wrong size is refused.
    #[test]
    fn answers_name_their_request() {
        let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let n = full_request(1, 1000, 3, &mut buf);
        let d = Datagram::parse(&buf[..n]).unwrap();
        let recs: Vec<Record> = d
            .records()
            .map(|r| match r {
                Record::Request(q) => Record::Response(devplane_wire::Response {
                    id: q.id,
                    status: Status::Ok,
                    size: devplane_wire::AccessSize::B1,
                    addr: 0x80,
                    data: 0,
                }),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(recs.len(), MAX_RECORDS);
        let mut out = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let hdr = devplane_wire::Header::new(devplane_wire::Kind::Response, 1, 1, 7);
        let m = devplane_wire::datagram::encode(&mut out, hdr, &recs).unwrap();
        assert_eq!(answer_index(1000, &out[..m]).unwrap(), 3);
        assert!(answer_index(1000 + 10_000, &out[..m]).is_err());
        let m = devplane_wire::datagram::encode(&mut out, hdr, &recs[..1]).unwrap();
        assert!(answer_index(1000, &out[..m]).is_err());
    }

    /// The lossy open loop against a loopback echo that drops every
    /// tenth request: the rest are answered and timed, the dropped ones
    /// counted lost after the grace time.
    #[test]
    fn the_open_loop_counts_what_never_comes_back() {
        use crate::udp::testing::{Echo, client, number_of, numbered};
        let echo = Echo::spawn(|b| number_of(b).is_ok_and(|i| i % 10 != 9));
        let p = open_loop_lossy(&client(), echo.addr, 200, 20_000, numbered, number_of);
        drop(echo);
        let p = p.unwrap();
        assert_eq!((p.sent, p.answered, p.lost()), (200, 180, 20));
        assert_eq!(p.lat.len(), 180);
        assert_eq!(p.p99_with_losses(), None);
    }
}
