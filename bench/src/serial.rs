//! The serial floor of a remote exit (`exit-udp-floor`, with `--server`
//! `exit-rtt-floor`): the least a remote exit can cost, in one sample. A
//! guest loops on `in` from a port whose handler (this module's, not the
//! VMM's) does one busy-polling round trip on a plain socket, to the UDP
//! echo (embedded) or to the remote server's null model, and returns the
//! value. A sample is a KVM exit and a raw round trip in series, with
//! whatever the machine does meanwhile: its percentiles are what the
//! machine allows a remote exit, its p99 over its p50 the tail no remote
//! exit of the same length can beat on that machine.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use devplane_vmm::guests;
use devplane_vmm::kvm::{IoHandler, VcpuExit, Vm};
use devplane_wire::AccessSize;

use crate::hist::Latency;
use crate::rig::PIO_PORT;
use crate::udp::{ANSWER_TIMEOUT, MAX_ATTEMPTS, MAX_RESENT_PERCENT, recv_spin};

/// Builds the datagram of round trip `i` into the buffer; its length.
pub type Make = Box<dyn FnMut(u64, &mut [u8]) -> usize + Send>;
/// Checks the answer to round trip `i`.
pub type Check = Box<dyn FnMut(u64, &[u8]) -> Result<()> + Send>;

/// Answers the guest's `in` from [`PIO_PORT`] with a network round trip.
struct Bounce {
    sock: UdpSocket,
    to: SocketAddr,
    make: Make,
    check: Check,
    i: u64,
    last: Option<Instant>,
    samples: Vec<u64>,
    error: Option<anyhow::Error>,
    /// Round trips sent again.
    resent: u64,
    /// Whether the next sample holds a round trip sent again (left out).
    skip_next: bool,
}

impl Bounce {
    /// One raw round trip. A request unanswered within [`ANSWER_TIMEOUT`]
    /// is sent again (the same bytes, up to [`MAX_ATTEMPTS`] times; an
    /// answer that fails the check is then taken for a late one and
    /// skipped) and the sample holding it left out, as `udp::round_trips`
    /// does: a requester or echo starved of its core for a second on a
    /// loaded machine does not end the measurement.
    fn round_trip(&mut self) -> Result<()> {
        let mut out = [0u8; 2048];
        let mut inb = [0u8; 2048];
        self.i += 1;
        let n = (self.make)(self.i, &mut out);
        self.sock.send_to(&out[..n], self.to).context("send")?;
        let mut attempt = 1;
        loop {
            match recv_spin(&self.sock, &mut inb, ANSWER_TIMEOUT) {
                Ok(m) => match (self.check)(self.i, &inb[..m]) {
                    Ok(()) => break,
                    Err(_) if attempt > 1 || self.resent > 0 => continue,
                    Err(e) => return Err(e),
                },
                Err(e) if attempt >= MAX_ATTEMPTS => {
                    return Err(e.context(format!("{MAX_ATTEMPTS} attempts unanswered")));
                }
                Err(_) => {
                    attempt += 1;
                    self.sock.send_to(&out[..n], self.to).context("send")?;
                }
            }
        }
        if attempt > 1 {
            self.resent += 1;
            self.skip_next = true;
            if self.resent * 100 > self.i * MAX_RESENT_PERCENT + 100 {
                bail!(
                    "{} of {} round trips had to be sent again",
                    self.resent,
                    self.i
                );
            }
        }
        Ok(())
    }
}

impl IoHandler for Bounce {
    fn pio_read(&mut self, port: u16, _size: AccessSize) -> u64 {
        let now = Instant::now();
        if let Some(prev) = self.last.replace(now)
            && !std::mem::take(&mut self.skip_next)
        {
            self.samples
                .push(now.duration_since(prev).as_nanos() as u64);
        }
        if port == PIO_PORT
            && self.error.is_none()
            && let Err(e) = self.round_trip()
        {
            self.error = Some(e);
        }
        0
    }

    fn pio_write(&mut self, _port: u16, _size: AccessSize, _data: u64) {}

    fn mmio_read(&mut self, _gpa: u64, size: AccessSize) -> u64 {
        size.mask()
    }

    fn mmio_write(&mut self, _gpa: u64, _size: AccessSize, _data: u64) {}
}

/// Runs `iters` exits of the bounce guest on the calling thread, the
/// first `warmup` untimed; `sock` sends to `to`.
pub fn exit_net_floor(
    sock: UdpSocket,
    to: SocketAddr,
    iters: u16,
    warmup: usize,
    make: Make,
    check: Check,
) -> Result<Latency> {
    sock.set_nonblocking(true)?;
    let g = guests::pio_read_loop(PIO_PORT, iters)?;
    let vm = Vm::new(g.mem_end().next_multiple_of(0x1_0000) as usize)
        .context("creating the floor's VM")?;
    vm.load(g.load_gpa, &g.code)?;
    let mut vcpu = vm.create_vcpu(0, g.entry)?;
    let mut h = Bounce {
        sock,
        to,
        make,
        check,
        i: 0,
        last: None,
        samples: Vec::with_capacity(iters as usize),
        error: None,
        resent: 0,
        skip_next: false,
    };
    let exit = vcpu.run(&mut h, &AtomicBool::new(false))?;
    if let Some(e) = h.error {
        return Err(e.context("a round trip of the serial floor"));
    }
    if !matches!(exit, VcpuExit::Done(_)) {
        bail!("the serial floor's guest ended with {exit:?}");
    }
    let mut l = Latency::new();
    for &s in h.samples.iter().skip(warmup) {
        l.record(s);
    }
    Ok(l)
}
