//! Busy-polling UDP: the raw echo floor, and a requester that times
//! devplane round trips on the same path.

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
/// `warmup` untimed ones. `check` validates each answer.
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
    for i in 0..(warmup + iters) as u64 {
        let n = make(i, &mut out);
        let t0 = Instant::now();
        sock.send(&out[..n])?;
        let m = recv_spin(sock, &mut inb, Duration::from_secs(1))?;
        let dt = t0.elapsed();
        check(i, &inb[..m])?;
        if i >= warmup as u64 {
            lat.record(dt.as_nanos() as u64);
        }
    }
    Ok(lat)
}
