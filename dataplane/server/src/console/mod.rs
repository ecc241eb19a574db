//! VM consoles on the server: `dpctl vms console ID` attaches an
//! operator's terminal to the VM's UART model where it runs, here.
//!
//! Three parts, so that no one waits for another:
//! - a [`Tap`] per console model, shared by the worker that owns the model
//!   and the console thread: a bounded output queue (worker to console
//!   thread) and a bounded input queue (back). The worker only ever
//!   `try_lock`s them: if the console thread holds one, the worker goes
//!   on and tries again next turn (output stays in the model meanwhile),
//!   so a console never blocks a worker.
//! - the worker's side ([`WorkerTaps`]): once per turn of its loop, one
//!   atomic load when no console is attached; otherwise, for each tap of a
//!   model it owns, it moves the model's output into the tap and the
//!   tap's input into the model's receive FIFO, whose interrupt goes to the
//!   guest by the usual path (the interrupt router). The taps live in a
//!   server-wide [`Registry`] keyed by model, so a model moved to another
//!   worker is served by its new owner with the same tap.
//! - the console thread ([`Hub`]): one thread per server, asleep in
//!   `poll` on the viewers' sockets and an eventfd the workers ring when
//!   output arrives; it fans output out to the viewers ([`fanout`]: one
//!   writer, any number of read-only viewers up to a bound, each with its
//!   own bounded queue) and hands the writer's bytes to the tap.
//!
//! Viewers arrive on the control socket ([`devplane_control::proto::Request::Console`]);
//! the server's owning thread checks the VM and model and hands the
//! connection here. The console belongs to the model, not to the VM's
//! client: suspending, snapshotting or live-migrating the VM moves
//! nothing here, and a console stays attached through all of them.

pub mod fanout;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devplane_control::proto::{ConsoleCounters, Response};
use devplane_devmodels::ConsolePort;

use fanout::Fanout;

/// Most output bytes waiting between a worker and the console thread for
/// one console.
pub const TAP_OUTPUT_LIMIT: usize = 64 * 1024;
/// Most typed bytes waiting between the console thread and a worker: the
/// writer's socket is not read while this many wait (its keystrokes wait
/// in the kernel, never dropped).
pub const TAP_INPUT_LIMIT: usize = 4 * 1024;
/// How often the console thread looks again while typed input waits for
/// the worker (it is not woken when the worker takes it).
const INPUT_RETRY: Duration = Duration::from_millis(2);

fn eventfd() -> std::io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the OwnedFd below.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new, valid fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ring(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a valid u64 to an eventfd we hold.
    unsafe { libc::write(fd.as_raw_fd(), &one as *const u64 as *const libc::c_void, 8) };
}

fn drain_eventfd(fd: &OwnedFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a valid u64 from a non-blocking
    // eventfd we hold.
    unsafe { libc::read(fd.as_raw_fd(), &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// Which model is VM `vm`'s console on the server configured by `cfg`
/// (`model` if given): a clear refusal when the VM is unknown, the model
/// unknown, another VM's or no uart, or when the VM has none or several.
pub(crate) fn pick(
    cfg: &devplane_control::config::ServerConfig,
    vm: u32,
    model: Option<u32>,
) -> Result<u32, String> {
    let id = cfg.server.id;
    if !cfg.vms.iter().any(|v| v.id == vm) {
        return Err(format!("VM {vm} is not known to server {id}"));
    }
    let is_console = |kind: &str| kind == devplane_devmodels::uart::KIND;
    let mine: Vec<&devplane_control::config::ModelConfig> = cfg
        .models
        .iter()
        .filter(|m| m.vm == Some(vm) && is_console(&m.kind))
        .collect();
    match model {
        Some(m) => match cfg.models.iter().find(|c| c.id == m) {
            None => Err(format!("model {m} is not served by server {id}")),
            Some(c) if c.vm != Some(vm) => Err(format!(
                "model {m} is not VM {vm}'s (its interrupts go to {})",
                c.vm.map_or("no VM".to_string(), |v| format!("VM {v}"))
            )),
            Some(c) if !is_console(&c.kind) => {
                Err(format!("model {m} is a {}, not a console (a uart)", c.kind))
            }
            Some(_) => Ok(m),
        },
        None => match mine.as_slice() {
            [] => Err(format!(
                "VM {vm} has no console (uart model with vm = {vm}) on server {id}"
            )),
            [one] => Ok(one.id),
            several => Err(format!(
                "VM {vm} has {} consoles on server {id} (models {}): choose one with --model",
                several.len(),
                several
                    .iter()
                    .map(|m| m.id.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        },
    }
}

/// What a worker and the console thread share for one console model.
#[derive(Debug)]
pub struct Tap {
    /// The model.
    pub model: u32,
    output: Mutex<VecDeque<u8>>,
    input: Mutex<VecDeque<u8>>,
    input_waiting: AtomicBool,
    /// Output bytes dropped because the console thread fell behind.
    dropped: AtomicU64,
    wake: Arc<OwnedFd>,
}

impl Tap {
    fn new(model: u32, wake: Arc<OwnedFd>) -> Tap {
        Tap {
            model,
            output: Mutex::new(VecDeque::new()),
            input: Mutex::new(VecDeque::new()),
            input_waiting: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            wake,
        }
    }

    /// The worker's side: moves `port`'s output into the tap (waking the
    /// console thread) and the tap's input into `port`. Never blocks: a
    /// queue the console thread holds is left for the next turn. Returns
    /// whether input was fed (the model may have raised its interrupt).
    pub fn service(&self, port: &mut dyn ConsolePort, scratch: &mut Vec<u8>) -> bool {
        if port.has_output()
            && let Ok(mut out) = self.output.try_lock()
        {
            scratch.clear();
            port.drain_output(scratch, devplane_devmodels::uart::OUTPUT_LIMIT);
            let was_empty = out.is_empty();
            let room = TAP_OUTPUT_LIMIT.saturating_sub(out.len());
            let n = scratch.len().min(room);
            out.extend(&scratch[..n]);
            let lost = (scratch.len() - n) as u64;
            drop(out);
            if lost > 0 {
                self.dropped.fetch_add(lost, Ordering::Relaxed);
            }
            if was_empty && n > 0 {
                ring(&self.wake);
            }
        }
        if !self.input_waiting.load(Ordering::Acquire) {
            return false;
        }
        let Ok(mut input) = self.input.try_lock() else {
            return false;
        };
        let (a, b) = input.as_slices();
        let mut n = port.feed_input(a);
        if n == a.len() {
            n += port.feed_input(b);
        }
        input.drain(..n);
        if input.is_empty() {
            self.input_waiting.store(false, Ordering::Release);
        }
        n > 0
    }

    /// The console thread's side: takes the output waiting.
    fn take_output(&self, into: &mut Vec<u8>) {
        if let Ok(mut out) = self.output.lock() {
            into.extend(out.drain(..));
        }
    }

    /// The console thread's side: queues typed bytes for the worker; returns
    /// how many fit.
    fn give_input(&self, bytes: &[u8]) -> usize {
        let Ok(mut input) = self.input.lock() else {
            return 0;
        };
        let n = bytes.len().min(TAP_INPUT_LIMIT.saturating_sub(input.len()));
        input.extend(&bytes[..n]);
        if !input.is_empty() {
            self.input_waiting.store(true, Ordering::Release);
        }
        n
    }

    /// Room left for typed bytes.
    fn input_room(&self) -> usize {
        self.input
            .lock()
            .map_or(0, |i| TAP_INPUT_LIMIT.saturating_sub(i.len()))
    }

    fn input_waiting(&self) -> bool {
        self.input_waiting.load(Ordering::Acquire)
    }
}

/// Every tap of a server, for its workers.
#[derive(Debug, Default)]
pub struct Registry {
    generation: AtomicU64,
    taps: Mutex<Vec<Arc<Tap>>>,
}

impl Registry {
    fn add(&self, tap: Arc<Tap>) {
        if let Ok(mut taps) = self.taps.lock() {
            taps.push(tap);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    fn remove(&self, model: u32) {
        if let Ok(mut taps) = self.taps.lock() {
            taps.retain(|t| t.model != model);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A worker's view of the [`Registry`]: a copy of its list, refreshed
/// when it changes.
#[derive(Debug)]
pub struct WorkerTaps {
    registry: Arc<Registry>,
    generation: u64,
    taps: Vec<Arc<Tap>>,
    scratch: Vec<u8>,
}

impl WorkerTaps {
    /// A worker's view of `registry`.
    pub fn new(registry: Arc<Registry>) -> WorkerTaps {
        WorkerTaps {
            registry,
            generation: 0,
            taps: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Once per turn of the worker's loop: serves the taps of the models
    /// `disp` owns. One atomic load when no console was ever attached.
    pub fn service(&mut self, disp: &mut crate::dispatch::Dispatcher) {
        let g = self.registry.generation.load(Ordering::Acquire);
        if g != self.generation
            && let Ok(taps) = self.registry.taps.try_lock()
        {
            self.taps = taps.clone();
            self.generation = g;
        }
        for tap in &self.taps {
            disp.service_console(tap, &mut self.scratch);
        }
    }
}

/// A viewer's connection handed to the console thread.
struct Attach {
    model: u32,
    server: u32,
    write: bool,
    stream: UnixStream,
}

/// What the console thread is told.
enum Msg {
    /// A viewer's connection.
    Attach(Attach),
    /// A model left this server (moved to another, or removed): its
    /// viewers are told why and detached, its tap dropped.
    Gone { model: u32, why: String },
}

/// The console thread's handle; stopping it (drop) detaches every viewer.
pub struct ConsoleHub {
    registry: Arc<Registry>,
    to: Sender<Msg>,
    wake: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    counters: Arc<Mutex<Vec<ConsoleCounters>>>,
    join: Option<JoinHandle<()>>,
}

impl ConsoleHub {
    /// Starts the console thread (asleep until a viewer comes).
    pub fn start() -> std::io::Result<ConsoleHub> {
        let registry = Arc::new(Registry::default());
        let wake = Arc::new(eventfd()?);
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Mutex::new(Vec::new()));
        let (to, from) = mpsc::channel();
        let hub = Hub {
            registry: registry.clone(),
            from,
            wake: wake.clone(),
            consoles: HashMap::new(),
            counters: counters.clone(),
        };
        let s = stop.clone();
        let join = std::thread::Builder::new()
            .name("dp-console".into())
            .spawn(move || hub.run(&s))?;
        Ok(ConsoleHub {
            registry,
            to,
            wake,
            stop,
            counters,
            join: Some(join),
        })
    }

    /// The taps, for the workers.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// Hands a viewer's connection (its request checked) to the console
    /// thread, which answers on it: [`Response::Console`] then the
    /// stream, or why it was refused.
    pub fn attach(&self, server: u32, model: u32, write: bool, stream: UnixStream) {
        let _ = self.to.send(Msg::Attach(Attach {
            model,
            server,
            write,
            stream,
        }));
        ring(&self.wake);
    }

    /// Model `model` left this server (`why` says where to): its viewers
    /// get a last line with `why` and are detached, rather than watching
    /// a console nobody feeds any more.
    pub fn model_gone(&self, model: u32, why: String) {
        let _ = self.to.send(Msg::Gone { model, why });
        ring(&self.wake);
    }

    /// Each console's counters (consoles ever attached), by model.
    pub fn counters(&self) -> Vec<ConsoleCounters> {
        self.counters.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl Drop for ConsoleHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        ring(&self.wake);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// One console as the console thread holds it.
struct Console {
    tap: Arc<Tap>,
    fanout: Fanout,
    /// Viewer id -> its connection.
    conns: HashMap<u64, UnixStream>,
}

/// The console thread.
struct Hub {
    registry: Arc<Registry>,
    from: Receiver<Msg>,
    wake: Arc<OwnedFd>,
    consoles: HashMap<u32, Console>,
    counters: Arc<Mutex<Vec<ConsoleCounters>>>,
}

/// Writes `message` as an error answer on a refused viewer's connection
/// and closes it.
pub(crate) fn refuse(stream: UnixStream, message: String) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    let mut line = serde_json::to_vec(&Response::Error { message }).unwrap_or_default();
    line.push(b'\n');
    let _ = (&stream).write_all(&line);
}

impl Hub {
    fn run(mut self, stop: &AtomicBool) {
        let mut fds: Vec<libc::pollfd> = Vec::new();
        let mut who: Vec<(u32, u64)> = Vec::new();
        let mut buf = vec![0u8; 4096];
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            fds.clear();
            who.clear();
            fds.push(libc::pollfd {
                fd: self.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            let mut input_waits = false;
            for (&model, c) in &self.consoles {
                input_waits |= c.tap.input_waiting();
                let room = c.tap.input_room() > 0;
                for (&id, s) in &c.conns {
                    let mut events = 0;
                    // A read-only viewer is read too: to see it leave.
                    if room || !c.fanout.is_writer(id) {
                        events |= libc::POLLIN;
                    }
                    if c.fanout.queued(id) > 0 {
                        events |= libc::POLLOUT;
                    }
                    fds.push(libc::pollfd {
                        fd: s.as_raw_fd(),
                        events,
                        revents: 0,
                    });
                    who.push((model, id));
                }
            }
            let timeout = if input_waits {
                INPUT_RETRY.as_millis() as i32
            } else {
                -1
            };
            // SAFETY: `fds` is valid for the call.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            drain_eventfd(&self.wake);
            while let Ok(m) = self.from.try_recv() {
                match m {
                    Msg::Attach(a) => self.attach(a),
                    Msg::Gone { model, why } => self.gone(model, &why),
                }
            }
            // Output first, so that every viewer's queue is current.
            for c in self.consoles.values_mut() {
                out.clear();
                c.tap.take_output(&mut out);
                c.fanout.push(&out);
            }
            for (i, &(model, id)) in who.iter().enumerate() {
                let revents = fds[i + 1].revents;
                let Some(c) = self.consoles.get_mut(&model) else {
                    continue;
                };
                let mut gone = revents & (libc::POLLERR | libc::POLLNVAL) != 0;
                if !gone && revents & (libc::POLLIN | libc::POLLHUP) != 0 {
                    gone = Hub::read(c, id, &mut buf, revents & libc::POLLHUP != 0);
                }
                if !gone {
                    gone = Hub::write(c, id);
                }
                if gone {
                    c.fanout.detach(id);
                    c.conns.remove(&id);
                }
            }
            // A new viewer's greeting and history, and output that came
            // after the poll, go out now.
            for c in self.consoles.values_mut() {
                let ids: Vec<u64> = c.fanout.ids().collect();
                for id in ids {
                    if c.fanout.queued(id) > 0 && Hub::write(c, id) {
                        c.fanout.detach(id);
                        c.conns.remove(&id);
                    }
                }
            }
            self.publish();
        }
    }

    /// Detaches model `model`'s viewers, each sent what it has queued
    /// and a last line saying `why` as far as its socket takes them
    /// without waiting, and drops its tap.
    fn gone(&mut self, model: u32, why: &str) {
        let Some(mut c) = self.consoles.remove(&model) else {
            return;
        };
        self.registry.remove(model);
        let mut out = Vec::new();
        c.tap.take_output(&mut out);
        c.fanout.push(&out);
        c.fanout
            .push(format!("\r\n[console: model {model} {why}: detached]\r\n").as_bytes());
        let ids: Vec<u64> = c.fanout.ids().collect();
        for id in ids {
            let _ = Hub::write(&mut c, id);
        }
    }

    fn attach(&mut self, a: Attach) {
        let console = match self.consoles.entry(a.model) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => {
                let tap = Arc::new(Tap::new(a.model, self.wake.clone()));
                self.registry.add(tap.clone());
                e.insert(Console {
                    tap,
                    fanout: Fanout::new(),
                    conns: HashMap::new(),
                })
            }
        };
        let mut greeting = serde_json::to_vec(&Response::Console {
            server: a.server,
            model: a.model,
            writer: a.write,
        })
        .unwrap_or_default();
        greeting.push(b'\n');
        match console.fanout.attach(a.write, &greeting) {
            Ok(id) => {
                if a.stream.set_nonblocking(true).is_ok() {
                    console.conns.insert(id, a.stream);
                    // The answer goes out now: a peer that hung up
                    // mid-handshake frees its place (the writer's) before
                    // the next viewer is attached, not a pass later.
                    if Hub::write(console, id) {
                        console.fanout.detach(id);
                        console.conns.remove(&id);
                    }
                } else {
                    console.fanout.detach(id);
                }
            }
            Err(e) => refuse(a.stream, format!("model {}: {e}", a.model)),
        }
    }

    /// Reads what viewer `id` sent: the writer's bytes go to the tap (as
    /// many as fit; the rest stay in the socket), a read-only viewer's
    /// are discarded. True when it left.
    fn read(c: &mut Console, id: u64, buf: &mut [u8], hung_up: bool) -> bool {
        let Some(s) = c.conns.get_mut(&id) else {
            return true;
        };
        let writer = c.fanout.is_writer(id);
        let max = if writer {
            c.tap.input_room().min(buf.len())
        } else {
            buf.len()
        };
        if max == 0 {
            // The writer's input waits for the worker: its bytes stay in
            // the socket, unless it hung up (what it typed last is lost
            // with it).
            return hung_up;
        }
        match s.read(&mut buf[..max]) {
            Ok(0) => true,
            Ok(n) => {
                if writer {
                    let took = c.tap.give_input(&buf[..n]);
                    c.fanout.input_bytes += took as u64;
                }
                false
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => false,
            Err(_) => true,
        }
    }

    /// Writes what viewer `id` has queued, as far as its socket takes it.
    /// True when it left.
    fn write(c: &mut Console, id: u64) -> bool {
        let Some(s) = c.conns.get_mut(&id) else {
            return true;
        };
        loop {
            let (a, b) = c.fanout.pending(id);
            let chunk = if a.is_empty() { b } else { a };
            if chunk.is_empty() {
                return false;
            }
            match s.write(chunk) {
                Ok(0) => return true,
                Ok(n) => c.fanout.sent(id, n),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                Err(_) => return true,
            }
        }
    }

    fn publish(&self) {
        let mut all: Vec<ConsoleCounters> = self
            .consoles
            .iter()
            .map(|(&model, c)| ConsoleCounters {
                model,
                viewers: c.fanout.len() as u64,
                writer: c.fanout.writer().is_some(),
                output_bytes: c.fanout.output_bytes,
                input_bytes: c.fanout.input_bytes,
                viewer_dropped_bytes: c.fanout.viewer_dropped,
                tap_dropped_bytes: c.tap.dropped.load(Ordering::Relaxed),
                writers_refused: c.fanout.writers_refused,
            })
            .collect();
        all.sort_by_key(|c| c.model);
        if let Ok(mut c) = self.counters.lock() {
            *c = all;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A console port that records what it was fed and transmits what the
    /// test gives it.
    #[derive(Default)]
    struct Port {
        out: Vec<u8>,
        fed: Vec<u8>,
        accept: usize,
    }

    impl ConsolePort for Port {
        fn drain_output(&mut self, out: &mut Vec<u8>, max: usize) {
            let n = self.out.len().min(max);
            out.extend(self.out.drain(..n));
        }
        fn has_output(&self) -> bool {
            !self.out.is_empty()
        }
        fn feed_input(&mut self, bytes: &[u8]) -> usize {
            let n = bytes.len().min(self.accept);
            self.accept -= n;
            self.fed.extend(&bytes[..n]);
            n
        }
    }

    #[test]
    fn a_tap_is_bounded_both_ways_and_never_blocks_the_worker() {
        let wake = Arc::new(eventfd().unwrap());
        let tap = Tap::new(5, wake);
        let mut port = Port {
            out: vec![7; TAP_OUTPUT_LIMIT + 100],
            ..Port::default()
        };
        let mut scratch = Vec::new();
        assert!(!tap.service(&mut port, &mut scratch));
        assert_eq!(tap.dropped.load(Ordering::Relaxed), 100);
        let mut got = Vec::new();
        tap.take_output(&mut got);
        assert_eq!(got.len(), TAP_OUTPUT_LIMIT);
        // The console thread holding the queue: the worker goes on, the
        // output waits in the model.
        port.out = b"later".to_vec();
        {
            let _held = tap.output.lock().unwrap();
            tap.service(&mut port, &mut scratch);
            assert_eq!(port.out, b"later");
        }
        tap.service(&mut port, &mut scratch);
        got.clear();
        tap.take_output(&mut got);
        assert_eq!(got, b"later");
        // Input: bounded, taken as the model accepts it.
        assert_eq!(
            tap.give_input(&vec![1; TAP_INPUT_LIMIT + 9]),
            TAP_INPUT_LIMIT
        );
        assert_eq!(tap.input_room(), 0);
        port.accept = 10;
        assert!(tap.service(&mut port, &mut scratch));
        assert_eq!(port.fed.len(), 10);
        assert!(tap.input_waiting());
        port.accept = usize::MAX;
        assert!(tap.service(&mut port, &mut scratch));
        assert_eq!(port.fed.len(), TAP_INPUT_LIMIT);
        assert!(!tap.input_waiting());
        assert!(
            !tap.service(&mut port, &mut scratch),
            "nothing more to feed"
        );
    }

    fn viewer(hub: &ConsoleHub, model: u32, write: bool) -> (UnixStream, Response) {
        let (ours, theirs) = UnixStream::pair().unwrap();
        hub.attach(1, model, write, theirs);
        ours.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while b[0] != b'\n' {
            assert_eq!((&ours).read(&mut b).unwrap(), 1, "answer line");
            line.push(b[0]);
        }
        (ours, serde_json::from_slice(&line).unwrap())
    }

    /// The console thread with a tap fed as a worker would: a stuck
    /// viewer (never reads) does not hold up the other one or the
    /// "worker"; the writer's bytes reach the tap; a second writer is
    /// refused; a detached writer frees the place.
    #[test]
    fn the_console_thread_fans_out_and_a_stuck_viewer_costs_only_itself() {
        let hub = ConsoleHub::start().unwrap();
        let (mut writer, r) = viewer(&hub, 9, true);
        assert_eq!(
            r,
            Response::Console {
                server: 1,
                model: 9,
                writer: true
            }
        );
        let (stuck, _) = viewer(&hub, 9, false);
        let (second, r) = viewer(&hub, 9, true);
        assert!(
            matches!(&r, Response::Error { message } if message.contains("already has a writer")),
            "{r:?}"
        );
        drop(second);
        // The worker's side, on this thread.
        let registry = hub.registry();
        let tap = registry.taps.lock().unwrap()[0].clone();
        let mut port = Port::default();
        let mut scratch = Vec::new();
        let total = 4 << 20;
        let received = Arc::new(AtomicU64::new(0));
        let reader = {
            let mut w = writer.try_clone().unwrap();
            let received = received.clone();
            std::thread::spawn(move || {
                let mut got = 0usize;
                let mut b = vec![0u8; 65536];
                while got < total {
                    match w.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    received.store(got as u64, Ordering::Relaxed);
                }
                got
            })
        };
        let started = std::time::Instant::now();
        let mut sent = 0;
        // Paced as a guest is (far slower than this, in fact): output is
        // added while the tap has room and the live viewer keeps up (it
        // has its own bound too), so it loses nothing whatever the load on
        // the machine; the stuck viewer, 4 MiB behind, must lose its own.
        while sent < total {
            let backlog = tap.output.lock().unwrap().len();
            let behind = sent.saturating_sub(received.load(Ordering::Relaxed) as usize);
            if port.out.len() < 4096
                && backlog < TAP_OUTPUT_LIMIT / 2
                && behind < fanout::VIEWER_LIMIT / 2
            {
                port.out.extend(std::iter::repeat_n(b'x', 4096));
                sent += 4096;
            }
            tap.service(&mut port, &mut scratch);
            std::thread::yield_now();
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the output did not get through"
            );
        }
        while port.has_output() {
            tap.service(&mut port, &mut scratch);
            std::thread::yield_now();
        }
        assert_eq!(
            reader.join().unwrap(),
            total,
            "the live viewer got everything"
        );
        // Published after each pass of the console thread.
        let t = std::time::Instant::now();
        let mut c = hub.counters();
        while c.first().is_none_or(|c| c.output_bytes < total as u64)
            && t.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(5));
            c = hub.counters();
        }
        assert_eq!(c.len(), 1);
        assert!(
            c[0].viewer_dropped_bytes > 0,
            "the stuck viewer dropped: {c:?}"
        );
        assert_eq!(c[0].writers_refused, 1);
        assert_eq!(c[0].tap_dropped_bytes, 0);
        assert_eq!(c[0].output_bytes, total as u64);
        assert_eq!((c[0].viewers, c[0].writer), (2, true));
        drop(stuck);
        // Typed bytes reach the tap, then the model.
        writer.write_all(b"hello").unwrap();
        port.accept = usize::MAX;
        let t = std::time::Instant::now();
        while port.fed.len() < 5 && t.elapsed() < Duration::from_secs(5) {
            tap.service(&mut port, &mut scratch);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(port.fed, b"hello");
        // The writer leaves; another may write.
        drop(writer);
        let t = std::time::Instant::now();
        loop {
            let (s, r) = viewer(&hub, 9, true);
            if matches!(r, Response::Console { writer: true, .. }) {
                drop(s);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "the place stayed taken"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(hub);
    }

    /// Past [`fanout::MAX_VIEWERS`] a viewer is refused with why; a peer
    /// gone before its answer (it hung up mid-handshake) is detached at
    /// the first write and frees its place; the console thread goes on.
    #[test]
    fn viewers_past_the_bound_and_peers_gone_mid_handshake_cost_nothing() {
        let hub = ConsoleHub::start().unwrap();
        let mut kept = Vec::new();
        for _ in 0..fanout::MAX_VIEWERS - 1 {
            kept.push(viewer(&hub, 3, false).0);
        }
        for _ in 0..50 {
            let (ours, theirs) = UnixStream::pair().unwrap();
            drop(ours);
            hub.attach(1, 3, true, theirs);
        }
        kept.push(viewer(&hub, 3, false).0);
        let (_late, r) = viewer(&hub, 3, false);
        assert!(
            matches!(&r, Response::Error { message } if message.contains("16 viewers")),
            "{r:?}"
        );
        let t = std::time::Instant::now();
        while hub.counters().first().is_none_or(|c| c.viewers != 16) {
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", hub.counters());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(
            !hub.counters()[0].writer,
            "a writer gone mid-handshake left"
        );
    }

    /// Every console request that cannot be served is refused with what
    /// was wrong.
    #[test]
    fn a_console_is_picked_or_refused_clearly() {
        use devplane_control::config::{ModelConfig, ServerConfig, VmConfig};
        let mut cfg: ServerConfig =
            toml::from_str("[server]\nid = 3\nport = 7000\nmode = \"socket\"\nworkers = [0]\n")
                .unwrap();
        cfg.vms = [1, 2]
            .map(|id| VmConfig {
                id,
                client: 1,
                hypervisor: 1,
            })
            .to_vec();
        let m = |id, kind: &str, vm| ModelConfig {
            vm,
            ..ModelConfig::new(id, kind, 0)
        };
        cfg.models = vec![
            m(10, "uart", Some(1)),
            m(11, "counter", Some(1)),
            m(20, "uart", Some(2)),
            m(21, "uart", Some(2)),
        ];
        let err = |vm, model| pick(&cfg, vm, model).unwrap_err();
        assert_eq!(pick(&cfg, 1, None), Ok(10));
        assert_eq!(pick(&cfg, 2, Some(21)), Ok(21));
        assert!(err(9, None).contains("VM 9 is not known to server 3"));
        assert!(err(1, Some(99)).contains("model 99 is not served by server 3"));
        assert!(err(1, Some(20)).contains("not VM 1's (its interrupts go to VM 2)"));
        assert!(err(1, Some(11)).contains("is a counter, not a console"));
        assert!(err(2, None).contains("2 consoles") && err(2, None).contains("--model"));
        cfg.models.retain(|c| c.id != 10);
        assert!(
            pick(&cfg, 1, None)
                .unwrap_err()
                .contains("VM 1 has no console")
        );
    }

    /// A model that leaves the server (moved away, removed) detaches its
    /// viewers with a line saying why; before, they stayed attached to a
    /// console nobody fed, silent.
    #[test]
    fn viewers_of_a_model_that_leaves_are_told_and_detached() {
        let hub = ConsoleHub::start().unwrap();
        let (mut a, _) = viewer(&hub, 9, true);
        let (mut b, _) = viewer(&hub, 9, false);
        let (other, _) = viewer(&hub, 4, false);
        hub.model_gone(9, "moved to server 2".into());
        for v in [&mut a, &mut b] {
            let mut got = String::new();
            v.read_to_string(&mut got).expect("closed after the notice");
            assert!(
                got.contains("model 9 moved to server 2: detached"),
                "{got:?}"
            );
        }
        let t = std::time::Instant::now();
        while hub.registry().taps.lock().unwrap().len() != 1 {
            assert!(t.elapsed() < Duration::from_secs(5), "tap kept");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(hub.registry().taps.lock().unwrap()[0].model, 4);
        // Attaching again makes a new console (the server refuses first
        // if the model is not its).
        let (_again, r) = viewer(&hub, 9, true);
        assert!(matches!(r, Response::Console { writer: true, .. }), "{r:?}");
        drop(other);
    }
}
