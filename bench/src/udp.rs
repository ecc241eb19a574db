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
    echo_loop_if(sock, stop, |_| true);
}

/// [`echo_loop`], echoing only the datagrams `keep` accepts (the others
/// are dropped).
pub fn echo_loop_if(sock: UdpSocket, stop: Arc<AtomicBool>, keep: impl Fn(&[u8]) -> bool) {
    let _ = sock.set_nonblocking(true);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match sock.recv_from(&mut buf) {
            Ok((n, from)) => {
                if keep(&buf[..n]) {
                    let _ = sock.send_to(&buf[..n], from);
                }
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

/// How an open loop ([`open_loop_with`]) treats requests that are not
/// answered.
#[derive(Debug, Clone, Copy)]
pub enum Unanswered {
    /// Fail when requests are in flight and no answer came for this long.
    Fail(Duration),
    /// End this long after the last request was due (or the last answer
    /// came, whichever is later); what is unanswered then is lost. Fails
    /// only when the sender cannot keep up at all (twice the schedule,
    /// and 5 s).
    Lose(Duration),
}

/// An open loop's schedule: `n` requests at `rate` per second, and what
/// a request that is not answered does.
#[derive(Debug, Clone, Copy)]
pub struct OpenLoop {
    /// Requests to send.
    pub n: u64,
    /// Requests per second.
    pub rate: u64,
    /// What an unanswered request does.
    pub unanswered: Unanswered,
}

/// What an open loop sent and got back.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// Requests sent.
    pub sent: u64,
    /// Requests answered.
    pub answered: u64,
    /// From the first intended send to the last answer (or the last
    /// request's intended send, if later).
    pub elapsed: Duration,
}

/// Sends `plan.n` requests `make(i)` to `to` at `plan.rate` per second on
/// a fixed schedule, whatever the answers do, and times each answer from its
/// request's intended send time (coordinated omission corrected: a stall
/// of the sender or the server is charged to every request meant to
/// leave during it): `record(i, ns)` for each answer, `index_of` saying
/// which request an answer is for. Requests due together (after a stall
/// of the sender) leave together. An answer that comes twice, or to a
/// request not sent, fails it; `plan.unanswered` says what a missing one
/// does.
pub fn open_loop_with(
    sock: &UdpSocket,
    to: SocketAddr,
    plan: OpenLoop,
    mut make: impl FnMut(u64, &mut [u8]) -> usize,
    mut index_of: impl FnMut(&[u8]) -> Result<u64>,
    mut record: impl FnMut(u64, u64),
) -> Result<Sent> {
    let OpenLoop {
        n,
        rate,
        unanswered,
    } = plan;
    sock.set_nonblocking(true)?;
    sock.connect(to)?;
    let mut answered = vec![false; n as usize];
    let mut out = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let mut inb = [0u8; 2048];
    let sched = Schedule::new(Instant::now() + Duration::from_millis(1), rate);
    let last_due = sched.intended(n.saturating_sub(1));
    // Twice the schedule, and a few seconds: a sender that cannot keep up
    // still ends.
    let deadline = last_due + (last_due - sched.intended(0)) + Duration::from_secs(5);
    let (mut sent, mut received) = (0u64, 0u64);
    let mut last_answer = sched.intended(0);
    // Since when requests in flight have waited with no answer.
    let mut waiting_since = Instant::now();
    while received < n {
        let now = Instant::now();
        while sent < n && now >= sched.intended(sent) {
            let len = make(sent, &mut out);
            match sock.send(&out[..len]) {
                Ok(_) => {
                    if sent == received {
                        // Nothing was in flight: the wait starts now.
                        waiting_since = now;
                    }
                    sent += 1;
                }
                // A full socket buffer: the send is late, which the
                // intended-time latency charges.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e).context("send"),
            }
        }
        match sock.recv(&mut inb) {
            Ok(m) => {
                let done = Instant::now();
                let i = index_of(&inb[..m])?;
                if i >= sent || std::mem::replace(&mut answered[i as usize], true) {
                    bail!("unexpected or repeated answer to request {i}");
                }
                received += 1;
                last_answer = done;
                waiting_since = done;
                record(i, sched.latency_ns(i, done));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                match unanswered {
                    Unanswered::Fail(timeout) => {
                        if sent > received && now.saturating_duration_since(waiting_since) > timeout
                        {
                            bail!(
                                "{} of {sent} requests unanswered after {timeout:?} \
                                 (open loop at {rate}/s)",
                                sent - received
                            );
                        }
                    }
                    Unanswered::Lose(grace) => {
                        if sent == n
                            && now.saturating_duration_since(last_due.max(last_answer)) > grace
                        {
                            break;
                        }
                        if now > deadline {
                            bail!("the open loop at {rate}/s did not end ({sent} of {n} sent)");
                        }
                    }
                }
                std::hint::spin_loop();
            }
            Err(e) => return Err(e).context("recv"),
        }
    }
    Ok(Sent {
        sent,
        answered: received,
        elapsed: last_answer.max(last_due) - sched.intended(0),
    })
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
    make: impl FnMut(u64, &mut [u8]) -> usize,
    seq_of: impl FnMut(&[u8]) -> Result<u64>,
) -> Result<Latency> {
    let mut lat = Latency::new();
    let total = u64::from(warmup) + u64::from(iters);
    let plan = OpenLoop {
        n: total,
        rate,
        unanswered: Unanswered::Fail(Duration::from_secs(1)),
    };
    open_loop_with(sock, to, plan, make, seq_of, |i, ns| {
        if i >= u64::from(warmup) {
            lat.record(ns);
        }
    })?;
    Ok(lat)
}

/// Test fixtures: a loopback echo and numbered payloads.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A busy-polling echo on loopback (see [`echo_loop_if`]), stopped
    /// when dropped.
    pub struct Echo {
        /// Where it listens.
        pub addr: SocketAddr,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Echo {
        /// An echo of the datagrams `keep` accepts.
        pub fn spawn(keep: fn(&[u8]) -> bool) -> Echo {
            let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
            let addr = sock.local_addr().unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            let thread = Some(std::thread::spawn(move || echo_loop_if(sock, s2, keep)));
            Echo { addr, stop, thread }
        }
    }

    impl Drop for Echo {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    /// Request `i`'s payload: `i`, 8 bytes.
    pub fn numbered(i: u64, b: &mut [u8]) -> usize {
        b[..8].copy_from_slice(&i.to_le_bytes());
        8
    }

    /// The request a [`numbered`] payload names.
    pub fn number_of(b: &[u8]) -> Result<u64> {
        Ok(u64::from_le_bytes(b[..8].try_into()?))
    }

    /// A client socket on loopback.
    pub fn client() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").unwrap()
    }
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
        use testing::*;
        let echo = Echo::spawn(|_| true);
        let res = open_loop(&client(), echo.addr, 10, 200, 20_000, numbered, number_of);
        drop(echo);
        let l = res.unwrap();
        assert_eq!(l.len(), 200);
        assert!(l.summary().p50 > 0);
    }
}
