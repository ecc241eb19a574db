//! Busy-polling UDP: the raw echo floor, and requesters that time
//! devplane round trips on the same path, closed loop (one request in
//! flight, the next sent when the answer is in) or open loop (requests
//! sent on a fixed schedule, wrk2 style).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::hist::Latency;

/// Echoes every datagram back, busy-polling a non-blocking socket, until
/// `stop` is set.
pub fn echo_loop(sock: UdpSocket, stop: Arc<AtomicBool>) {
    let _ = sock.set_nonblocking(true);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                let _ = sock.send_to(&buf[..n], from);
            }
            Err(_) => std::hint::spin_loop(),
        }
    }
}

/// Waits (busy-polling) for one datagram, up to `timeout`.
pub fn recv_spin(sock: &UdpSocket, buf: &mut [u8], timeout: Duration) -> Result<usize> {
    let start = Instant::now();
    loop {
        match sock.recv(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    bail!("no answer within {timeout:?}");
                }
                std::hint::spin_loop();
            }
            Err(e) => return Err(e).context("recv"),
        }
    }
}

/// Times `iters` closed-loop round trips of `make(i)` to `to` after
/// `warmup` untimed ones. `check` validates each answer; once a request
/// has been sent again, an answer that fails it is taken for a late one
/// and skipped.
/// A request unanswered within [`ANSWER_TIMEOUT`] is sent again (the same
/// bytes, up to [`MAX_ATTEMPTS`] times) and its sample left out: one lost
/// datagram, or a requester starved of its core for that long on a loaded
/// machine, does not end the measurement. More than
/// [`MAX_RESENT_PERCENT`] % of round trips sent again does.
pub fn round_trips(
    sock: &UdpSocket,
    to: SocketAddr,
    warmup: u32,
    iters: u32,
    mut make: impl FnMut(u64, &mut [u8]) -> usize,
    mut check: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<Latency> {
    sock.set_nonblocking(true)?;
    sock.connect(to)?;
    let mut out = [0u8; 2048];
    let mut inb = [0u8; 2048];
    let mut lat = Latency::new();
    let total = u64::from(warmup) + u64::from(iters);
    let mut resent = 0u64;
    for i in 0..total {
        let n = make(i, &mut out);
        let t0 = Instant::now();
        let mut attempt = 1;
        sock.send(&out[..n])?;
        loop {
            match recv_spin(sock, &mut inb, ANSWER_TIMEOUT) {
                Ok(m) => match check(i, &inb[..m]) {
                    Ok(()) => break,
                    // A late answer to a request sent again.
                    Err(_) if resent > 0 || attempt > 1 => continue,
                    Err(e) => return Err(e),
                },
                Err(e) if attempt >= MAX_ATTEMPTS => {
                    return Err(e.context(format!(
                        "round trip {i} of {total}: {MAX_ATTEMPTS} attempts unanswered"
                    )));
                }
                Err(_) => {
                    attempt += 1;
                    sock.send(&out[..n])?;
                }
            }
        }
        if attempt > 1 {
            resent += 1;
            if resent * 100 > total * MAX_RESENT_PERCENT + 100 {
                bail!("{resent} of {} round trips had to be sent again", i + 1);
            }
            continue;
        }
        let dt = t0.elapsed();
        if i >= u64::from(warmup) {
            lat.record(dt.as_nanos() as u64);
        }
    }
    Ok(lat)
}

/// How long [`round_trips`] waits for an answer before it sends again.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(1);
/// Sends of one request in [`round_trips`] before it gives up.
pub const MAX_ATTEMPTS: u32 = 3;
/// Round trips [`round_trips`] may send again, in percent of all.
pub const MAX_RESENT_PERCENT: u64 = 1;

/// A fixed send schedule: request `i` is meant to leave at
/// `start + i / rate`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    start: Instant,
    rate: u64,
}

impl Schedule {
    /// Requests at `rate` per second from `start`.
    pub fn new(start: Instant, rate: u64) -> Schedule {
        Schedule {
            start,
            rate: rate.max(1),
        }
    }

    /// When request `i` is meant to be sent.
    pub fn intended(&self, i: u64) -> Instant {
        let ns = i as u128 * 1_000_000_000 / self.rate as u128;
        self.start + Duration::from_nanos(ns as u64)
    }

    /// The latency of request `i` answered at `done`, measured from its
    /// intended send time: a sender or server stall delays every request
    /// meant to leave during it, and each is charged for it (which a
    /// closed loop, waiting for the stall to end before sending, omits).
    pub fn latency_ns(&self, i: u64, done: Instant) -> u64 {
        done.saturating_duration_since(self.intended(i)).as_nanos() as u64
    }
}

/// Sends `warmup + iters` requests `make(i)` to `to` at `rate` per second
/// on a fixed schedule, whatever the answers do, and times each answer
/// from its request's intended send time; `seq_of` gives the request
/// index an answer is for. The first `warmup` are not recorded. Fails
/// when answers stop coming for a second, or one comes twice.
pub fn open_loop(
    sock: &UdpSocket,
    to: SocketAddr,
    warmup: u32,
    iters: u32,
    rate: u64,
    mut make: impl FnMut(u64, &mut [u8]) -> usize,
    mut seq_of: impl FnMut(&[u8]) -> Result<u64>,
) -> Result<Latency> {
    sock.set_nonblocking(true)?;
    sock.connect(to)?;
    let total = (warmup + iters) as u64;
    let mut answered = vec![false; total as usize];
    let mut out = [0u8; 2048];
    let mut inb = [0u8; 2048];
    let mut lat = Latency::new();
    let sched = Schedule::new(Instant::now() + Duration::from_millis(1), rate);
    let (mut sent, mut received) = (0u64, 0u64);
    let mut last_answer = Instant::now();
    let timeout = Duration::from_secs(1);
    while received < total {
        let now = Instant::now();
        if sent < total && now >= sched.intended(sent) {
            let n = make(sent, &mut out);
            match sock.send(&out[..n]) {
                Ok(_) => {
                    if sent == received {
                        // Nothing was in flight: the wait starts now.
                        last_answer = now;
                    }
                    sent += 1;
                }
                // A full socket buffer: the send is late, which the
                // intended-time latency charges.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e).context("send"),
            }
        }
        match sock.recv(&mut inb) {
            Ok(m) => {
                let done = Instant::now();
                let i = seq_of(&inb[..m])?;
                if i >= sent || std::mem::replace(&mut answered[i as usize], true) {
                    bail!("unexpected or repeated answer to request {i}");
                }
                received += 1;
                last_answer = done;
                if i >= warmup as u64 {
                    lat.record(sched.latency_ns(i, done));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if sent > received && now.saturating_duration_since(last_answer) > timeout {
                    bail!(
                        "{} of {sent} requests unanswered after {timeout:?} \
                         (open loop at {rate}/s)",
                        sent - received
                    );
                }
                std::hint::spin_loop();
            }
            Err(e) => return Err(e).context("recv"),
        }
    }
    Ok(lat)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_fixed_rate() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 30_000);
        assert_eq!(s.intended(0), t0);
        assert_eq!(s.intended(3) - t0, Duration::from_nanos(100_000));
        assert_eq!(s.intended(30_000) - t0, Duration::from_secs(1));
        // Answered before it was meant to leave (clock skew): zero.
        assert_eq!(s.latency_ns(10, t0), 0);
    }

    /// 1000 requests every 100 us to a server that answers in 10 us, one
    /// at a time, and stalls 100 ms on request 500. Each request is timed
    /// from its intended send time: those meant to leave during the stall
    /// are charged for it.
    #[test]
    fn intended_time_accounts_for_a_stall() {
        let t0 = Instant::now();
        let s = Schedule::new(t0, 10_000);
        let service = Duration::from_micros(10);
        let mut open = Latency::new();
        let mut free_at = t0;
        for i in 0..1000u64 {
            let arrive = s.intended(i).max(free_at);
            let mut done = arrive + service;
            if i == 500 {
                done += Duration::from_millis(100);
            }
            free_at = done;
            open.record(s.latency_ns(i, done));
        }
        let o = open.summary();
        assert_eq!(o.count, 1000);
        // The 499 requests due during the stall waited 55-100 ms.
        assert!(o.p90 >= 50_000_000, "{o:?}");
        assert!(o.p99 >= 50_000_000, "{o:?}");
        assert!((o.max as i64 - 100_010_000).abs() <= 100_000, "{o:?}");

        // A closed loop on the same server sees the stall once.
        let mut closed = Latency::new();
        for i in 0..1000u64 {
            let mut rtt = service;
            if i == 500 {
                rtt += Duration::from_millis(100);
            }
            closed.record(rtt.as_nanos() as u64);
        }
        let c = closed.summary();
        assert!((c.p99 as i64 - 10_000).abs() <= 10, "{c:?}");
        assert!(c.max >= 100_000_000, "{c:?}");
    }

    /// The open loop on loopback: every request answered, latencies
    /// recorded from the schedule, warm-up left out.
    #[test]
    fn open_loop_against_a_loopback_echo() {
        let echo = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = echo.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let t = std::thread::spawn(move || echo_loop(echo, s2));
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let res = open_loop(
            &sock,
            to,
            10,
            200,
            20_000,
            |i, b| {
                b[..8].copy_from_slice(&i.to_le_bytes());
                8
            },
            |b| Ok(u64::from_le_bytes(b[..8].try_into()?)),
        );
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
        let l = res.unwrap();
        assert_eq!(l.len(), 200);
        assert!(l.summary().p50 > 0);
    }
}
