//! `devplane-server`: the server half of the data path. XDP steers each
//! request frame to the AF_XDP socket of the worker that owns its device
//! model; the worker, a pinned polling thread, applies the request and
//! answers from the same frame. Socket mode runs the same workers over
//! plain UDP sockets.
//!
//! It owns: the XDP program's object (built from `ebpf/` by `build.rs`) and
//! its loader ([`xdp`], [`bpffs`]), the workers and their transports
//! ([`afxdp`], [`socket`], [`lifecycle`], [`stats`], [`backoff`]), request
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
pub mod backoff;
pub mod bpffs;
pub mod control;
pub mod dispatch;
pub mod frames;
pub mod irq;
pub mod lifecycle;
pub mod port_owner;
pub mod socket;
pub mod stats;
pub mod xdp;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;
use std::time::Duration;

use aya::programs::XdpMode;
use devplane_control::config::{Mode, ModelConfig, ServerConfig};
use devplane_devmodels::registry::{self, ModelParams};

use crate::xdp::{Program, Stats, XdpError};
use afxdp::{LoopConfig, XskSet};
use dispatch::{Dispatcher, ModelSlot};
use irq::IrqRouter;
use lifecycle::WorkerCmd;
use stats::{WorkerSnapshot, WorkerStats};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration cannot be served.
    #[error("configuration: {0}")]
    Config(String),
    /// A device model could not be built.
    #[error("device model {id}: {source}")]
    Model {
        /// Model id.
        id: u32,
        /// Why.
        source: registry::BuildError,
    },
    /// The XDP program could not be loaded, attached or updated.
    #[error(transparent)]
    Xdp(#[from] XdpError),
    /// Writing the configuration into the maps failed.
    #[error("writing the eBPF maps: {0}")]
    MapSync(#[from] devplane_control::maps::MapSyncError),
    /// bpffs or pinning failed.
    #[error("pinning maps under {path}: {source}")]
    Pin {
        /// The path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// An AF_XDP step failed.
    #[error("AF_XDP: {what}: {source}")]
    AfXdp {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A UDP socket step failed (socket mode).
    #[error("UDP socket: {what}: {source}")]
    Socket {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("starting worker {index}: {source}")]
    Thread {
        /// Worker index.
        index: usize,
        /// Why.
        source: std::io::Error,
    },
}

/// How the XDP program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Native (driver) mode.
    Driver,
    /// Generic (skb) mode: the logged fallback.
    Generic,
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

/// What a worker thread owns.
struct WorkerParts<T> {
    io: T,
    disp: Dispatcher,
    router: IrqRouter,
    stats: Arc<WorkerStats>,
    ctl: lifecycle::WorkerCtl,
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
}

fn build_dispatchers(cfg: &ServerConfig) -> Result<Vec<Dispatcher>, ServerError> {
    let mut out: Vec<Dispatcher> = (0..cfg.server.workers.len())
        .map(|_| Dispatcher::new(cfg.server.id))
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
        };
        let lc = loop_config(cfg);
        let admission = Arc::new(socket::Admission {
            models: std::sync::RwLock::new(cfg.models.iter().map(|m| m.id).collect()),
            clients: cfg.clients.iter().map(|c| (c.id, c.address)).collect(),
            check_clients: cfg.server.check_clients,
        });
        server.admission = Some(admission.clone());
        server.spawn_workers(cfg, sockets, build_dispatchers(cfg)?, move |w| {
            socket::run_worker(
                w.io,
                admission.clone(),
                w.disp,
                w.router,
                lc,
                w.stats,
                w.ctl,
            )
        })?;
        Ok(server)
    }

    fn start_xdp(cfg: &ServerConfig) -> Result<Server, ServerError> {
        let ifname = cfg
            .server
            .interface
            .clone()
            .ok_or_else(|| ServerError::Config("xdp mode needs server.interface".into()))?;
        let dispatchers = build_dispatchers(cfg)?;
        let mut program = Program::load(None)?;
        let pins = Some(bpffs::PinDir::create(
            &cfg.server.effective_pin_dir(),
            &mut program,
        )?);
        let mut maps = program.take_control_maps()?;
        devplane_control::maps::sync(cfg, true, &mut maps)?;
        let mut xsks = XskSet::new(&ifname, cfg.server.workers.len())?;
        for (i, fd) in xsks.fds().into_iter().enumerate() {
            program.set_xsk(i as u32, fd)?;
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
        };
        let lc = loop_config(cfg);
        server.spawn_workers(cfg, rings, dispatchers, move |w| {
            afxdp::run_worker(w.io, w.disp, w.router, lc, w.stats, w.ctl)
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
        run: impl Fn(WorkerParts<T>) + Clone + Send + 'static,
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
            let parts = WorkerParts {
                io,
                disp,
                router: IrqRouter::new(vm_clients(cfg)),
                stats,
                ctl: lifecycle::WorkerCtl {
                    stop: self.stop.clone(),
                    cmds: rx,
                },
            };
            let run = run.clone();
            self.workers
                .push(spawn_worker(i, core, move || run(parts))?);
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

    /// Moves device model `model` to worker `to` while traffic flows: the
    /// old worker gives it up (snapshot and duplicate windows), the route
    /// is switched, the new worker restores it. A request that reaches a
    /// worker not holding the model meanwhile is dropped unanswered, and
    /// the client's retransmission (same sequence numbers) is served by
    /// the new owner: none is lost, none applied twice.
    pub fn move_model(&mut self, model: u32, to: usize) -> Result<(), ServerError> {
        let timeout = Duration::from_secs(5);
        let idx = self
            .cfg
            .models
            .iter()
            .position(|m| m.id == model)
            .ok_or_else(|| ServerError::Config(format!("model {model} is not served here")))?;
        let from = self.cfg.models[idx].worker;
        if to >= self.cmds.len() {
            return Err(ServerError::Config(format!(
                "worker {to} does not exist (this server has {})",
                self.cmds.len()
            )));
        }
        if from == to {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(from, WorkerCmd::Release { model, reply: tx })?;
        let mut handover = rx
            .recv_timeout(timeout)
            .map_err(|_| {
                ServerError::Config(format!("worker {from} did not release model {model}"))
            })?
            .ok_or_else(|| {
                ServerError::Config(format!("worker {from} does not hold model {model}"))
            })?;
        handover.params = ModelParams {
            line: self.cfg.models[idx].line,
            backing: self.cfg.models[idx].backing.clone(),
        };
        self.cfg.models[idx].worker = to;
        self.reroute()?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            to,
            WorkerCmd::Adopt {
                model,
                handover: Box::new(handover),
                reply: tx,
            },
        )?;
        rx.recv_timeout(timeout)
            .map_err(|_| ServerError::Config(format!("worker {to} did not adopt model {model}")))?
            .map_err(|e| {
                ServerError::Config(format!("worker {to} cannot restore model {model}: {e}"))
            })
    }

    /// Starts serving a new device model on its worker, then routes its
    /// requests there (XDP route map or socket steering and admission).
    pub fn add_model(&mut self, m: ModelConfig) -> Result<(), ServerError> {
        if m.id == 0 || self.cfg.models.iter().any(|x| x.id == m.id) {
            return Err(ServerError::Config(format!(
                "model {} is already served here (or id 0): remove it first or pick another id",
                m.id
            )));
        }
        if m.worker >= self.cmds.len() {
            return Err(ServerError::Config(format!(
                "model {}: worker {} does not exist (this server has {})",
                m.id,
                m.worker,
                self.cmds.len()
            )));
        }
        let mut cfg = self.cfg.clone();
        cfg.models = vec![m.clone()];
        let mut slots = build_dispatchers(&cfg)?;
        let slot = slots[m.worker]
            .remove(m.id)
            .ok_or_else(|| ServerError::Config(format!("model {} was not built", m.id)))?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            m.worker,
            WorkerCmd::Insert {
                model: m.id,
                slot: Box::new(slot),
                reply: tx,
            },
        )?;
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| {
            ServerError::Config(format!("worker {} did not take model {}", m.worker, m.id))
        })?;
        self.cfg.models.push(m.clone());
        if let Some(a) = &self.admission
            && let Ok(mut set) = a.models.write()
        {
            set.insert(m.id);
        }
        self.reroute()
    }

    /// Stops serving a device model: unroutes it, then drops it from its
    /// worker.
    pub fn remove_model(&mut self, model: u32) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        let idx = self
            .cfg
            .models
            .iter()
            .position(|m| m.id == model)
            .ok_or_else(|| ServerError::Config(format!("model {model} is not served here")))?;
        let m = self.cfg.models.remove(idx);
        if let Some(x) = self.xdp.as_mut() {
            x.maps.remove_route(model)?;
        }
        if let Some(a) = &self.admission
            && let Ok(mut set) = a.models.write()
        {
            set.remove(&model);
        }
        self.reroute()?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(m.worker, WorkerCmd::Release { model, reply: tx })?;
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| {
            ServerError::Config(format!("worker {} did not drop model {model}", m.worker))
        })?;
        Ok(())
    }

    /// Points the data path at the models' current workers.
    fn reroute(&mut self) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        if let Some(x) = self.xdp.as_mut() {
            for m in &self.cfg.models {
                let route = devplane_control::maps::route_entry(&self.cfg, m);
                x.maps.put_route(m.id, route)?;
            }
        }
        if let Some(sock) = &self.steer {
            let routes: Vec<(u32, u32)> = self
                .cfg
                .models
                .iter()
                .map(|m| (m.id, m.worker as u32))
                .collect();
            socket::steer(sock, &routes)?;
        }
        Ok(())
    }

    fn known_vm(&self, vm: u32) -> Result<(), ServerError> {
        if self.cfg.vms.iter().any(|v| v.id == vm) {
            Ok(())
        } else {
            Err(ServerError::Config(format!("VM {vm} is not known here")))
        }
    }

    /// Writes `vm`'s entry (client, hypervisor, `VM_SUSPENDED`) into the
    /// VMs map, in XDP mode.
    fn put_vm_entry(&mut self, vm: u32) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        let Some(v) = self.cfg.vms.iter().find(|v| v.id == vm) else {
            return Err(ServerError::Config(format!("VM {vm} is not known here")));
        };
        let mut entry = devplane_control::maps::vm_entry(v);
        if self.suspended.contains(&vm) {
            entry.flags |= devplane_wire::maps::VM_SUSPENDED;
        }
        if let Some(x) = self.xdp.as_mut() {
            x.maps.put_vm(vm, entry)?;
        }
        Ok(())
    }

    /// Holds the interrupts of `vm` until [`Server::resume_vm`], and marks
    /// it suspended in the VMs map.
    pub fn suspend_vm(&mut self, vm: u32) -> Result<(), ServerError> {
        self.known_vm(vm)?;
        self.broadcast(|| WorkerCmd::SuspendVm(vm))?;
        self.suspended.insert(vm);
        self.put_vm_entry(vm)
    }

    /// Delivers `vm`'s held interrupts, in order, and lets the next ones go.
    pub fn resume_vm(&mut self, vm: u32) -> Result<(), ServerError> {
        self.known_vm(vm)?;
        self.suspended.remove(&vm);
        self.put_vm_entry(vm)?;
        self.broadcast(|| WorkerCmd::ResumeVm(vm))
    }

    /// VMs suspended now.
    pub fn suspended_vms(&self) -> Vec<u32> {
        self.suspended.iter().copied().collect()
    }

    /// Sends `vm`'s interrupts to client platform `client` from now on
    /// (answers follow the requests by themselves).
    pub fn migrate_vm(&mut self, vm: u32, client: u32) -> Result<(), ServerError> {
        if !self.cfg.clients.iter().any(|c| c.id == client) {
            return Err(ServerError::Config(format!(
                "client {client} is not registered on this server"
            )));
        }
        let v = self
            .cfg
            .vms
            .iter_mut()
            .find(|v| v.id == vm)
            .ok_or_else(|| ServerError::Config(format!("VM {vm} is not known here")))?;
        v.client = client;
        self.put_vm_entry(vm)?;
        self.broadcast(|| WorkerCmd::MigrateVm { vm, client })
    }

    /// New polling settings for every worker, applied live.
    pub fn tune(&mut self, t: lifecycle::Tune) -> Result<(), ServerError> {
        self.broadcast(|| WorkerCmd::Tune(t))?;
        self.cfg.tuning.spin_budget = t.spin_budget;
        self.cfg.tuning.idle_sleep_us = t.idle_sleep.as_micros() as u64;
        self.cfg.tuning.batch = t.batch;
        Ok(())
    }

    /// The polling settings in force.
    pub fn tuning(&self) -> lifecycle::Tune {
        lifecycle::Tune {
            spin_budget: self.cfg.tuning.spin_budget,
            idle_sleep: Duration::from_micros(self.cfg.tuning.idle_sleep_us),
            batch: self.cfg.tuning.batch,
        }
    }

    /// This server's platform id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Each worker's counters, in worker order.
    pub fn worker_stats(&self) -> Vec<WorkerSnapshot> {
        self.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// The XDP program's counters (XDP mode only).
    pub fn xdp_stats(&self) -> Option<Result<Stats, XdpError>> {
        self.xdp.as_ref().map(|x| x.program.stats())
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
