//! `devplane-server`: the server half of the data path. XDP steers each
//! request frame to the AF_XDP socket of the worker that owns its device
//! model; the worker, a pinned polling thread, applies the request and
//! answers from the same frame. Socket mode runs the same workers over
//! plain UDP sockets.
//!
//! It owns: the XDP program's object (built from `ebpf/` by `build.rs`) and
//! its loader ([`xdp`], [`bpffs`]), the workers and their transports
//! ([`worker`], [`afxdp`], [`socket`]), request
//! dispatch and duplicate windows ([`dispatch`], [`frames`]), the interrupt
//! router ([`irq`]), and what the server answers on its control socket
//! ([`control`]).
//!
//! It must not touch: the client VMM (clients are reached only through
//! `devplane-wire` datagrams) or the test kit (a dev-dependency of its
//! tests only).
//!
//! Thread ownership: one thread per worker, pinned to its configured core,
//! owning its [`dispatch::Dispatcher`] (and so its models) and its RX/TX
//! rings. The thread that calls [`Server::start`] owns the XDP program, the
//! UMEM and the sockets' file descriptors, and must keep the [`Server`]
//! until the workers are stopped ([`Server::stop`] or drop).

pub mod afxdp;
pub mod bpffs;
pub mod bulk;
pub mod console;
pub mod control;
pub mod dispatch;
mod error;
pub mod forward;
pub mod frames;
mod handover;
pub mod irq;
pub mod kernel_drops;
mod live;
mod live_keys;
pub mod port_owner;
mod reconcile;
pub mod socket;
pub mod worker;
pub mod xdp;
pub mod xdp_query;

pub use error::ServerError;
pub use handover::StagedFate;
pub use worker::{backoff, lifecycle, stats};

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use aya::programs::XdpMode;
use devplane_control::config::{Mode, ServerConfig};
use devplane_devmodels::registry::{self, ModelParams};

use crate::xdp::{Program, Stats, XdpError};
use afxdp::{XskSet, XskTransport};
use dispatch::{Dispatcher, ModelSlot};
use irq::IrqRouter;
use lifecycle::WorkerCmd;
use socket::SocketTransport;
use stats::{WorkerSnapshot, WorkerStats};
use worker::LoopConfig;
use worker::run::Worker;

/// How the XDP program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Native (driver) mode.
    Driver,
    /// Generic (skb) mode: the logged fallback.
    Generic,
}

/// Per-device-queue counters of an XDP-mode server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Requests the XDP program redirected to a worker, per RX queue.
    pub redirected: Vec<u64>,
    /// Frames each worker received, per queue (worker by worker).
    pub served: Vec<Vec<u64>>,
}

/// How an XDP-mode server's AF_XDP sockets are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XskLayout {
    /// Device queues served (a socket per worker on each).
    pub queues: u32,
    /// The interface's RX and TX queue counts.
    pub device: afxdp::Queues,
    /// Zero-copy or copy mode.
    pub mode: afxdp::XskMode,
    /// Why the driver refused zero-copy, in copy mode.
    pub zero_copy_refused: Option<String>,
}

impl std::fmt::Display for XskLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "AF_XDP on {} of {} RX queues (tx {}), {} mode",
            self.queues,
            self.device.rx,
            self.device.tx,
            match self.mode {
                afxdp::XskMode::ZeroCopy => "zero-copy",
                afxdp::XskMode::Copy => "copy",
            }
        )?;
        if let Some(why) = &self.zero_copy_refused {
            write!(f, " (zero-copy refused: {why})")?;
        }
        if self.device.rx > self.queues {
            write!(
                f,
                "; RX queues {}.. are not served: set the channels to {} (ethtool -L)",
                self.queues, self.queues
            )?;
        }
        Ok(())
    }
}

struct XdpState {
    // Drop order: sockets before the program (detach) before the pins.
    xsks: XskSet,
    program: Program,
    /// The routing, clients, VMs and config maps (for live updates).
    maps: devplane_control::AyaMaps,
    attach: Attach,
    pins: Option<bpffs::PinDir>,
}

/// A running server. Dropping it stops the workers and detaches XDP.
pub struct Server {
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    cmds: Vec<Sender<WorkerCmd>>,
    /// The configuration as it is now (models move between workers).
    cfg: ServerConfig,
    /// Socket mode: a handle on the reuseport group, to re-steer.
    steer: Option<std::net::UdpSocket>,
    stats: Vec<Arc<WorkerStats>>,
    xdp: Option<XdpState>,
    id: u32,
    /// VMs suspended now (their `VM_SUSPENDED` flag is set in the maps).
    suspended: std::collections::BTreeSet<u32>,
    /// Socket mode: the admission check's model set, for live changes.
    admission: Option<Arc<socket::Admission>>,
    /// Socket mode: each worker's socket (a duplicate), to read the
    /// kernel's drops.
    udp_socks: Vec<std::net::UdpSocket>,
    /// How long each step of a live change waits for a worker.
    step_timeout: std::time::Duration,
    /// Models lent to another server by a move not yet settled, and the
    /// worker that keeps each aside ([`Server::lend_out`]) and the server
    /// it was lent to, if the mover said, and when.
    lent_out: HashMap<u32, (usize, Option<u32>, std::time::Instant)>,
    /// When this server started (told with a model's placement, so that
    /// settling a move sees a target restarted since the lend).
    started: std::time::Instant,
    /// Models handed over by another server, built but not served until
    /// their move commits ([`Server::stage_in`]).
    staged: HashMap<u32, handover::StagedIn>,
    /// The models this (owner) server forwards, and where
    /// ([`Server::forward_model`]); kept in the routes map across syncs.
    forwards: std::collections::BTreeMap<u32, forward::Forward>,
    /// Client key changes from the store still in their grace period
    /// (both keys accepted), and when each was learnt
    /// ([`Server::tick_keys`]).
    key_rolls: std::collections::BTreeMap<
        u32,
        (devplane_control::store::plan::KeyRoll, std::time::Instant),
    >,
    /// The console thread: operators' terminals on the UART models.
    console: console::ConsoleHub,
    /// Pieces of hand-overs coming from another server's move, per model,
    /// until [`Server::stage_wire`] builds them.
    handover_parts: HashMap<u32, String>,
}

/// The MTU of `ifname`, for the bulk engines (with a warning below
/// 1500: bulk datagrams are 1472 bytes at least there, and fragment).
fn link_mtu(ifname: &str) -> Result<usize, ServerError> {
    let mtu = xdp_query::mtu(ifname)
        .map_err(|e| ServerError::Config(format!("cannot read the MTU of {ifname}: {e}")))?;
    if mtu < 1500 {
        eprintln!(
            "devplane: {ifname} has an MTU of {mtu}: block datagrams take 1500 \
             (smaller links fragment them, and XDP cannot steer fragments)"
        );
    }
    Ok(mtu)
}

fn build_dispatchers(cfg: &ServerConfig) -> Result<Vec<Dispatcher>, ServerError> {
    let owners = dispatch::Owners {
        by_vm: vm_clients(cfg),
        check: cfg.server.check_clients,
    };
    let mut out: Vec<Dispatcher> = (0..cfg.server.workers.len())
        .map(|_| {
            let mut d = Dispatcher::new(cfg.server.id);
            d.set_owners(owners.clone());
            for c in &cfg.clients {
                if let Some(key) = c.tag_key.clone() {
                    d.set_keys(c.id, devplane_wire::tag::KeyRing::new(key.0));
                }
            }
            d
        })
        .collect();
    let vms: HashMap<u32, u32> = cfg.vms.iter().map(|v| (v.id, v.hypervisor)).collect();
    for m in &cfg.models {
        let model = registry::build(
            &m.kind,
            ModelParams {
                line: m.line,
                backing: m.backing.clone(),
            },
        )
        .map_err(|source| ServerError::Model { id: m.id, source })?;
        let mut slot = ModelSlot::new(
            model,
            m.pio_base.map(u64::from).unwrap_or(0),
            m.mmio_base.unwrap_or(0),
        );
        slot.irq_target = m.vm.and_then(|vm| vms.get(&vm).map(|&hv| (vm, hv)));
        let d = out.get_mut(m.worker).ok_or_else(|| {
            ServerError::Config(format!(
                "model {}: worker {} does not exist",
                m.id, m.worker
            ))
        })?;
        d.insert(m.id, slot);
    }
    Ok(out)
}

fn vm_clients(cfg: &ServerConfig) -> HashMap<u32, u32> {
    cfg.vms.iter().map(|v| (v.id, v.client)).collect()
}

fn loop_config(cfg: &ServerConfig) -> LoopConfig {
    LoopConfig {
        server: cfg.server.id,
        batch: cfg.tuning.batch.max(1),
        spin_budget: cfg.tuning.spin_budget,
        idle_sleep: Duration::from_micros(cfg.tuning.idle_sleep_us),
    }
}

fn spawn_worker(
    index: usize,
    core: usize,
    body: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>, ServerError> {
    std::thread::Builder::new()
        .name(format!("dp-worker-{index}"))
        .spawn(move || {
            if let Err(e) = affinity::set_thread_affinity([core]) {
                eprintln!("devplane: worker {index}: could not pin to core {core}: {e}");
            }
            body()
        })
        .map_err(|source| ServerError::Thread { index, source })
}

impl Server {
    /// Starts a server for `cfg` in the calling thread's network namespace.
    pub fn start(cfg: &ServerConfig) -> Result<Server, ServerError> {
        match cfg.server.mode {
            Mode::Xdp => Self::start_xdp(cfg),
            Mode::Socket => Self::start_socket(cfg),
        }
    }

    fn start_socket(cfg: &ServerConfig) -> Result<Server, ServerError> {
        let routes: Vec<(u32, u32)> = cfg.models.iter().map(|m| (m.id, m.worker as u32)).collect();
        let addr = SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, cfg.server.port);
        let sockets = socket::SocketSet::new(addr, cfg.server.workers.len(), &routes)?.take();
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = Server {
            stop: stop.clone(),
            workers: Vec::new(),
            cmds: Vec::new(),
            cfg: cfg.clone(),
            steer: sockets.first().and_then(|s| s.try_clone().ok()),
            stats: Vec::new(),
            xdp: None,
            id: cfg.server.id,
            suspended: Default::default(),
            admission: None,
            udp_socks: sockets.iter().filter_map(|s| s.try_clone().ok()).collect(),
            step_timeout: live::STEP_TIMEOUT,
            lent_out: HashMap::new(),
            started: std::time::Instant::now(),
            staged: HashMap::new(),
            key_rolls: Default::default(),
            forwards: Default::default(),
            console: console::ConsoleHub::start().map_err(ServerError::Console)?,
            handover_parts: HashMap::new(),
        };
        let admission = Arc::new(socket::Admission {
            models: std::sync::RwLock::new(cfg.models.iter().map(|m| m.id).collect()),
            clients: std::sync::RwLock::new(
                cfg.clients.iter().map(|c| (c.id, c.address)).collect(),
            ),
            check_clients: cfg.server.check_clients,
        });
        server.admission = Some(admission.clone());
        // Bound to every address, the socket has no one link: answers
        // keep to a 1500-byte MTU unless `server.interface` names it.
        let mtu = match &cfg.server.interface {
            Some(ifname) => link_mtu(ifname)?,
            None => 1500,
        };
        let mut dispatchers = build_dispatchers(cfg)?;
        for d in &mut dispatchers {
            d.bulk().set_mtu(mtu);
        }
        server.spawn_workers(cfg, sockets, dispatchers, move |sock, w| {
            worker::run(SocketTransport::new(sock, admission.clone()), w)
        })?;
        Ok(server)
    }

    fn start_xdp(cfg: &ServerConfig) -> Result<Server, ServerError> {
        let ifname = cfg
            .server
            .interface
            .clone()
            .ok_or_else(|| ServerError::Config("xdp mode needs server.interface".into()))?;
        // Another program (another server's) steering this interface is
        // refused, not replaced.
        match xdp_query::attached(&ifname) {
            Ok(None) => {}
            Ok(Some(p)) => {
                return Err(ServerError::Config(format!(
                    "interface {ifname} already has XDP {p} attached (another devplane-server?); \
                     stop it or detach it (ip link set dev {ifname} xdp off) first"
                )));
            }
            Err(e) => {
                return Err(ServerError::Config(format!(
                    "cannot tell whether {ifname} has an XDP program attached: {e}"
                )));
            }
        }
        let mut dispatchers = build_dispatchers(cfg)?;
        // Block answers are sent as large as the client asks only where
        // this link takes them.
        let mtu = link_mtu(&ifname)?;
        for d in &mut dispatchers {
            d.bulk().set_mtu(mtu);
        }
        let mut program = Program::load(None)?;
        let pins = Some(bpffs::PinDir::create(
            &cfg.server.effective_pin_dir(),
            &mut program,
        )?);
        let mut maps = program.take_control_maps()?;
        devplane_control::maps::sync(cfg, true, &mut maps)?;
        let mut xsks = XskSet::new(&ifname, cfg.server.workers.len())?;
        for (slot, fd) in xsks.slots() {
            program.set_xsk(slot, fd)?;
        }
        let attach = match program.xdp()?.attach(&ifname, XdpMode::Driver) {
            Ok(_) => Attach::Driver,
            Err(e) => {
                eprintln!(
                    "devplane: XDP driver mode refused on {ifname} ({e}); falling back to generic mode"
                );
                program
                    .xdp()?
                    .attach(&ifname, XdpMode::Skb)
                    .map_err(XdpError::from)?;
                Attach::Generic
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let rings = xsks.take_workers();
        let mut server = Server {
            stop: stop.clone(),
            workers: Vec::new(),
            cmds: Vec::new(),
            cfg: cfg.clone(),
            steer: None,
            stats: Vec::new(),
            xdp: Some(XdpState {
                xsks,
                program,
                maps,
                attach,
                pins,
            }),
            id: cfg.server.id,
            suspended: Default::default(),
            admission: None,
            udp_socks: Vec::new(),
            step_timeout: live::STEP_TIMEOUT,
            lent_out: HashMap::new(),
            started: std::time::Instant::now(),
            staged: HashMap::new(),
            key_rolls: Default::default(),
            forwards: Default::default(),
            console: console::ConsoleHub::start().map_err(ServerError::Console)?,
            handover_parts: HashMap::new(),
        };
        let batch = loop_config(cfg).batch;
        server.spawn_workers(cfg, rings, dispatchers, move |rings, w| {
            worker::run(XskTransport::new(rings, batch), w)
        })?;
        Ok(server)
    }

    /// Starts one pinned worker thread per `(io, dispatcher)` pair running
    /// `run`, each with its own counters and interrupt router.
    fn spawn_workers<T: Send + 'static>(
        &mut self,
        cfg: &ServerConfig,
        io: Vec<T>,
        dispatchers: Vec<Dispatcher>,
        run: impl Fn(T, Worker) + Clone + Send + 'static,
    ) -> Result<(), ServerError> {
        for (i, ((io, disp), &core)) in io
            .into_iter()
            .zip(dispatchers)
            .zip(&cfg.server.workers)
            .enumerate()
        {
            let stats = Arc::new(WorkerStats::default());
            self.stats.push(stats.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            self.cmds.push(tx);
            let parts = Worker {
                disp,
                router: IrqRouter::new(vm_clients(cfg)),
                cfg: loop_config(cfg),
                stats,
                ctl: lifecycle::WorkerCtl {
                    stop: self.stop.clone(),
                    cmds: rx,
                },
                consoles: console::WorkerTaps::new(self.console.registry()),
            };
            let run = run.clone();
            self.workers
                .push(spawn_worker(i, core, move || run(io, parts))?);
        }
        Ok(())
    }

    fn send(&self, worker: usize, cmd: WorkerCmd) -> Result<(), ServerError> {
        self.cmds
            .get(worker)
            .ok_or_else(|| ServerError::Config(format!("worker {worker} does not exist")))?
            .send(cmd)
            .map_err(|_| ServerError::Config(format!("worker {worker} has stopped")))
    }

    /// Sends `cmd` to every worker and returns once each has applied it: a
    /// request sent after this returns meets the new state (a VM's
    /// interrupts, once `migrate_vm` returns, go to its new client).
    fn broadcast(&self, cmd: impl Fn() -> WorkerCmd) -> Result<(), ServerError> {
        for w in 0..self.cmds.len() {
            self.send(w, cmd())?;
        }
        let (tx, rx) = std::sync::mpsc::channel();
        for w in 0..self.cmds.len() {
            self.send(w, WorkerCmd::Barrier(tx.clone()))?;
        }
        for _ in 0..self.cmds.len() {
            rx.recv_timeout(Duration::from_secs(5)).map_err(|_| {
                ServerError::Config("a worker did not apply the change within 5 s".into())
            })?;
        }
        Ok(())
    }

    /// Attaches an operator to the console of VM `vm`: its UART model
    /// here (`model`, when it has several). The connection is handed to
    /// the console thread, which answers on it; a request naming no such
    /// VM or model is answered here, on the connection, and closed.
    pub fn attach_console(
        &self,
        vm: u32,
        model: Option<u32>,
        write: bool,
        stream: std::os::unix::net::UnixStream,
    ) -> Result<u32, String> {
        match self.console_model(vm, model) {
            Ok(m) => {
                self.console.attach(self.id, m, write, stream);
                Ok(m)
            }
            Err(e) => {
                console::refuse(stream, e.clone());
                Err(e)
            }
        }
    }

    /// Which model is VM `vm`'s console here.
    fn console_model(&self, vm: u32, model: Option<u32>) -> Result<u32, String> {
        console::pick(&self.cfg, vm, model)
    }

    /// Each console's counters (consoles ever attached).
    pub fn console_stats(&self) -> Vec<devplane_control::proto::ConsoleCounters> {
        self.console.counters()
    }

    /// This server's platform id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Each worker's counters, in worker order, with what the kernel
    /// dropped at its socket.
    pub fn worker_stats(&self) -> Vec<WorkerSnapshot> {
        self.stats
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mut snap = s.snapshot();
                // Summed over the worker's sockets, one per queue.
                let fds = self
                    .xdp
                    .as_ref()
                    .map(|x| x.xsks.worker_fds(i))
                    .unwrap_or_default();
                for d in fds.iter().filter_map(|&fd| kernel_drops::xsk(fd).ok()) {
                    snap.xsk_rx_dropped += d.rx_dropped;
                    snap.xsk_rx_ring_full += d.rx_ring_full;
                    snap.xsk_fill_ring_empty += d.rx_fill_ring_empty;
                    snap.xsk_tx_invalid += d.tx_invalid;
                }
                if let Some(n) = self
                    .udp_socks
                    .get(i)
                    .and_then(|u| kernel_drops::udp(u.as_raw_fd()).ok())
                {
                    snap.socket_drops = n;
                }
                snap
            })
            .collect()
    }

    /// The XDP program's counters (XDP mode only).
    pub fn xdp_stats(&self) -> Option<Result<Stats, XdpError>> {
        self.xdp.as_ref().map(|x| x.program.stats())
    }

    /// Per device queue (XDP mode only): what the XDP program redirected
    /// from each queue and what each worker received on it.
    pub fn queue_stats(&self) -> Option<QueueStats> {
        let x = self.xdp.as_ref()?;
        let queues = x.xsks.queues();
        Some(QueueStats {
            redirected: x
                .program
                .queue_stats(queues)
                .unwrap_or_else(|_| vec![0; queues as usize]),
            served: x.xsks.served(),
        })
    }

    /// How the AF_XDP sockets are laid out (XDP mode only): queues served,
    /// the interface's queue counts, zero-copy or copy mode and why
    /// zero-copy was refused.
    pub fn xsk_layout(&self) -> Option<XskLayout> {
        let x = self.xdp.as_ref()?;
        Some(XskLayout {
            queues: x.xsks.queues(),
            device: x.xsks.device(),
            mode: x.xsks.mode(),
            zero_copy_refused: x.xsks.zero_copy_refused().map(str::to_owned),
        })
    }

    /// How XDP was attached (XDP mode only).
    pub fn attach_mode(&self) -> Option<Attach> {
        self.xdp.as_ref().map(|x| x.attach)
    }

    /// Stops the workers, detaches XDP and removes pinned maps.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(x) = self.xdp.take() {
            drop(x.xsks);
            drop(x.program);
            drop(x.maps);
            drop(x.pins);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}
