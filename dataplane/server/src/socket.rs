//! Socket mode: the same workers and dispatch over plain UDP sockets, for
//! runs without root and as the baseline of the benchmark.
//!
//! Every worker has its own socket bound to the server port with
//! SO_REUSEPORT. The kernel steers each datagram to the socket of the
//! worker that owns its device model with a classic-BPF reuseport program
//! (SO_ATTACH_REUSEPORT_CBPF, unprivileged) generated from the routing
//! table: it reads the device-model id at offset 4 of the UDP payload and
//! returns the owning worker's index. Unknown models fall back to the
//! kernel's hash and are answered `NoSuchModel` by whichever worker gets
//! them.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use crate::ServerError;
use crate::dispatch::{Outcome, PendingIrq};
use crate::frames::interrupt_datagram;
use crate::worker::stats::WorkerStats;
use crate::worker::{Transport, Work};
use devplane_control::poll::wait_one;

const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JEQ_K: u16 = 0x15;
const BPF_RET_K: u16 = 0x06;

/// The classic-BPF reuseport program steering `(model, worker)` pairs.
pub fn steering_program(routes: &[(u32, u32)]) -> Vec<libc::sock_filter> {
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let mut prog = Vec::with_capacity(2 + routes.len() * 2);
    // A = the 4 payload bytes at offset 4, read big-endian: the model id
    // is little-endian on the wire, so compare against its byte swap.
    prog.push(op(
        BPF_LD_W_ABS,
        0,
        0,
        devplane_wire::header::OFF_MODEL as u32,
    ));
    for &(model, worker) in routes {
        prog.push(op(BPF_JEQ_K, 0, 1, model.swap_bytes()));
        prog.push(op(BPF_RET_K, 0, 0, worker));
    }
    // Out of range: the kernel falls back to its hash.
    prog.push(op(BPF_RET_K, 0, 0, u32::MAX));
    prog
}

/// Most routes one steering program holds (cBPF's 4096-instruction limit).
pub const MAX_STEERED_MODELS: usize = 2000;

/// The worker sockets of one server.
pub struct SocketSet {
    sockets: Vec<UdpSocket>,
}

impl SocketSet {
    /// Binds `workers` sockets to `addr` in one reuseport group and attaches
    /// the steering program for `routes`.
    pub fn new(
        addr: SocketAddrV4,
        workers: usize,
        routes: &[(u32, u32)],
    ) -> Result<SocketSet, ServerError> {
        if routes.len() > MAX_STEERED_MODELS {
            return Err(ServerError::Config(format!(
                "socket mode steers at most {MAX_STEERED_MODELS} models, {} configured",
                routes.len()
            )));
        }
        let io = |what: &'static str| move |source| ServerError::Socket { what, source };
        crate::port_owner::check_free(addr).map_err(|e| ServerError::Config(e.to_string()))?;
        let mut sockets = Vec::with_capacity(workers);
        for _ in 0..workers {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
                .map_err(io("socket"))?;
            s.set_reuse_port(true).map_err(io("SO_REUSEPORT"))?;
            s.set_nonblocking(true).map_err(io("O_NONBLOCK"))?;
            s.bind(&SocketAddr::V4(addr).into())
                .map_err(io("bind (is another server on this port?)"))?;
            sockets.push(UdpSocket::from(s));
        }
        let set = SocketSet { sockets };
        set.steer(routes)?;
        Ok(set)
    }

    /// Replaces the steering program (routes changed).
    pub fn steer(&self, routes: &[(u32, u32)]) -> Result<(), ServerError> {
        match self.sockets.first() {
            Some(first) => steer(first, routes),
            None => Ok(()),
        }
    }

    /// The sockets, worker by worker (to move into the worker threads).
    pub fn take(self) -> Vec<UdpSocket> {
        self.sockets
    }
}

/// Attaches the steering program for `routes` to the reuseport group of
/// `sock` (replacing the previous one).
pub fn steer(sock: &UdpSocket, routes: &[(u32, u32)]) -> Result<(), ServerError> {
    {
        let first = sock;
        let prog = steering_program(routes);
        let fprog = libc::sock_fprog {
            len: prog.len() as u16,
            filter: prog.as_ptr() as *mut libc::sock_filter,
        };
        // SAFETY: `fprog` points at `prog`, alive for the call; the kernel
        // copies the program.
        let rc = unsafe {
            libc::setsockopt(
                first.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_REUSEPORT_CBPF,
                &fprog as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(ServerError::Socket {
                what: "SO_ATTACH_REUSEPORT_CBPF",
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// What the XDP program checks, done in userspace for socket mode: the
/// device model is served here, the client is registered and the datagram
/// comes from the client's registered address.
#[derive(Debug, Default)]
pub struct Admission {
    /// Models served by this server (changed when a model is added or
    /// removed live; an uncontended read lock per datagram).
    pub models: std::sync::RwLock<HashSet<u32>>,
    /// Registered clients and their addresses (changed when the store
    /// adds, moves or removes a client; an uncontended read lock per
    /// datagram).
    pub clients: std::sync::RwLock<HashMap<u32, Ipv4Addr>>,
    /// Whether to check clients (`server.check_clients`).
    pub check_clients: bool,
}

impl Admission {
    /// `None` if admitted, else the counter to bump.
    fn check<'s>(
        &self,
        payload: &[u8],
        from: &SocketAddr,
        stats: &'s WorkerStats,
    ) -> Option<&'s AtomicU64> {
        let word = |off: usize| {
            payload
                .get(off..off + 4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        // Too short to name a model: the dispatcher rejects it as malformed.
        let model = word(devplane_wire::header::OFF_MODEL)?;
        if !self.models.read().is_ok_and(|m| m.contains(&model)) {
            return Some(&stats.drop_unknown_model);
        }
        if self.check_clients {
            let client = word(devplane_wire::header::OFF_CLIENT)?;
            let addr = self
                .clients
                .read()
                .ok()
                .and_then(|c| c.get(&client).copied());
            match addr.as_ref() {
                None => return Some(&stats.drop_unknown_client),
                Some(ip) if SocketAddr::from((*ip, from.port())) != *from => {
                    return Some(&stats.drop_spoofed);
                }
                Some(_) => {}
            }
        }
        None
    }
}

/// A worker's socket-mode transport: its socket and buffers. Answers and
/// interrupts are sent as soon as they are made, so `transmit` and
/// `reclaim` have nothing to do.
pub struct SocketTransport {
    sock: UdpSocket,
    admission: Arc<Admission>,
    buf: Vec<u8>,
    irq_buf: Vec<u8>,
}

impl SocketTransport {
    /// The transport of one worker over its socket.
    pub fn new(sock: UdpSocket, admission: Arc<Admission>) -> SocketTransport {
        SocketTransport {
            sock,
            admission,
            buf: vec![0u8; devplane_wire::bulk::MAX_BULK_DATAGRAM.next_power_of_two()],
            irq_buf: vec![0u8; devplane_wire::MAX_DATAGRAM],
        }
    }

    /// Admits, applies and answers one datagram of `n` bytes from `from`.
    fn answer(&mut self, n: usize, from: SocketAddr, work: &mut Work<'_, SocketAddr>) {
        let t0 = Instant::now();
        let payload = &mut self.buf[..n];
        if let Some(counter) = self.admission.check(payload, &from, work.stats) {
            WorkerStats::add(counter, 1);
            return;
        }
        match work.disp.handle(payload) {
            Outcome::Respond {
                client,
                vm,
                irq_port,
                fresh,
                ..
            } => {
                let irq_to = irq_addr(from, irq_port);
                if fresh {
                    work.peers.learn(client, vm, irq_to);
                } else {
                    work.peers.learn_first(client, vm, irq_to);
                }
                // The dispatch counters are published before the answer
                // leaves (see `worker::run`): a client holding its answer
                // finds its request counted (`rx` follows at the end of
                // the batch).
                work.stats.publish(&work.disp.stats());
                match self.sock.send_to(payload, from) {
                    Ok(_) => WorkerStats::add(&work.stats.tx, 1),
                    Err(_) => WorkerStats::add(&work.stats.tx_full, 1),
                }
                work.stats.service.record(t0.elapsed().as_nanos() as u64, 1);
            }
            Outcome::Acked {
                model,
                seq,
                client,
                vm,
                irq_port,
            } => {
                work.router.ack(model, seq);
                // Where the VM's interrupts go, if nothing better is
                // known (a client's announcement to a model's new server).
                if let Some(vm) = vm {
                    work.peers.learn_first(client, vm, irq_addr(from, irq_port));
                }
            }
            Outcome::Bulk { client, vm } => work.bulk_peers.learn(client, vm, from),
            _ => {}
        }
    }
}

impl Transport for SocketTransport {
    type Peer = SocketAddr;

    fn receive(&mut self, max: u32, work: &mut Work<'_, SocketAddr>) -> u64 {
        let mut got = 0u64;
        while got < max as u64 {
            let Ok((n, from)) = self.sock.recv_from(&mut self.buf) else {
                break; // WouldBlock (or a transient error): idle
            };
            got += 1;
            self.answer(n, from, work);
        }
        got
    }

    fn queue_irq(
        &mut self,
        server: u32,
        client: u32,
        to: SocketAddr,
        irqs: &[PendingIrq],
        key: Option<&devplane_wire::tag::TagKey>,
        stats: &WorkerStats,
    ) -> bool {
        let ids = (server, client, irqs[0].model);
        let Some(len) = interrupt_datagram(&mut self.irq_buf, ids, irqs, key) else {
            return false;
        };
        let sent = self.sock.send_to(&self.irq_buf[..len], to).is_ok();
        if sent {
            WorkerStats::add(&stats.tx, 1);
        }
        sent
    }

    fn queue_datagram(&mut self, to: SocketAddr, bytes: &[u8], stats: &WorkerStats) -> bool {
        match self.sock.send_to(bytes, to) {
            Ok(_) => {
                WorkerStats::add(&stats.tx, 1);
                true
            }
            // A full socket buffer: the answer waits for the next turn.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(_) => {
                WorkerStats::add(&stats.tx_full, 1);
                true
            }
        }
    }

    fn transmit(&mut self, _stats: &WorkerStats) {}

    fn reclaim(&mut self) {}

    fn may_sleep(&self, _held: usize) -> bool {
        true
    }

    fn wait(&self, timeout: Duration) {
        wait_one(self.sock.as_raw_fd(), timeout);
    }
}

/// Where a client's interrupts go: the port it named, at the address it
/// sent from (or that address's own port).
fn irq_addr(mut from: SocketAddr, port: Option<u16>) -> SocketAddr {
    if let Some(port) = port {
        from.set_port(port);
    }
    from
}
