//! The client VMM: runs many VMs with several vCPUs each in one process,
//! one pinned thread per vCPU, one engine thread for the wire (which, in
//! direct mode, each vCPU drives itself while it waits; see
//! [`super::engine`]).
//!
//! A VM either loads real-mode images (the test guests) or boots Linux
//! ([`Client::start_linux`] with a [`LinuxBoot`]): then its one vCPU enters
//! the kernel in long mode, the VM gets the in-kernel PIT, a local `uart`
//! model's output goes to the boot's [`Console`], and the vCPU's run ends
//! with [`VcpuExit::Reset`] when the guest reboots through the i8042 (or
//! [`VcpuExit::Shutdown`] on a triple fault): both mean the guest stopped.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devplane_devmodels::registry::{self, ModelParams};
use devplane_devmodels::{DeviceModel, Space};
use devplane_wire::IrqAction;

use devplane_devmodels::uart::{self, Uart};

use super::boot::{BootError, Console, ConsoleUart, LinuxBoot};
use super::devmap::{DevMapError, DeviceMap, Mapping, Placement, StoreAt};
use super::engine::{Engine, EngineConfig, Injector, Lane, RemoteModel, VcpuPort};
use super::kvm::{Entry, IrqHandle, KvmError, Vcpu, VcpuExit, VcpuKicker, Vm};
use super::pci::{self, PciFunction, PciHost};
use super::ring::ExitRing;
use super::uart_tap::UartTap;
use super::vcpu_io::{VcpuIo, VcpuStats};
use super::virtio::blk::{BAR_SIZE, VirtioBlk};
use devplane_devmodels::blockstore::CTRL_BASE;

/// Where a mapped device runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A local model of this kind, in the vCPU threads.
    Local {
        /// Model kind (`devmodels` registry name).
        kind: String,
    },
    /// On the server with this index in [`ClientSpec::servers`].
    Remote {
        /// Server index.
        server: usize,
    },
    /// A legacy virtio-pci block device whose I/O BAR is this device's
    /// port range (`len` must be [`BAR_SIZE`]). Its transport runs in the
    /// vCPU thread (it reaches guest memory); its disk is a `blockstore`
    /// model at `disk`. A VM with one gets a PCI host bridge at `0xCF8`
    /// that lists it (device numbers from 1, in order).
    VirtioBlk {
        /// Its interrupt line (INTA#, pulsed per completion batch).
        irq: u8,
        /// Where its disk runs.
        disk: DiskPlace,
    },
}

/// Where a virtio block device's disk (a `blockstore` model) runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskPlace {
    /// In this process, on this image file.
    Local {
        /// The disk image.
        backing: std::path::PathBuf,
    },
    /// On a server, reached by MMIO at `gpa` (a range no guest RAM uses;
    /// the model's window is [`STORE_WINDOW`] bytes). Its writes are
    /// posted; each request's last read waits for them.
    Remote {
        /// Server index in [`ClientSpec::servers`].
        server: usize,
        /// The blockstore's device-model id.
        model: u32,
        /// The MMIO base the server registered it at.
        gpa: u64,
    },
}

/// Bytes of a `blockstore` model's MMIO window: the data window and the
/// control registers above it.
pub const STORE_WINDOW: u64 = CTRL_BASE + 0x1000;

/// One mapped device of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Port or MMIO.
    pub space: Space,
    /// First address.
    pub base: u64,
    /// Length.
    pub len: u64,
    /// Device-model id.
    pub model: u32,
    /// Writes are posted.
    pub posted: bool,
    /// Where it runs.
    pub place: Place,
}

/// One vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuSpec {
    /// Where it starts.
    pub entry: Entry,
    /// The core its thread is pinned to.
    pub core: Option<usize>,
}

/// One VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// VM id.
    pub id: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
    /// Guest memory size ([`super::boot::DEFAULT_MEM`] suits Linux).
    pub mem_bytes: usize,
    /// Code and data to load: (guest-physical address, bytes). Empty for
    /// a VM that boots Linux.
    pub images: Vec<(u64, Vec<u8>)>,
    /// Its vCPUs. A VM that boots Linux has exactly one, whose `entry` is
    /// not used.
    pub vcpus: Vec<VcpuSpec>,
    /// Its device map.
    pub devices: Vec<DeviceSpec>,
}

/// A server the client talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerSpec {
    /// Its address.
    pub addr: SocketAddr,
    /// Its platform id.
    pub id: u32,
}

/// A whole client.
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Client platform id.
    pub client: u32,
    /// Local address to send from (default: any).
    pub bind: Option<IpAddr>,
    /// Servers.
    pub servers: Vec<ServerSpec>,
    /// VMs.
    pub vms: Vec<VmSpec>,
    /// Engine settings (its `client` field is overwritten).
    pub engine: EngineConfig,
    /// Core of the engine thread.
    pub engine_core: Option<usize>,
    /// Spins of a waiting vCPU before it sleeps on a futex.
    pub vcpu_spin: u32,
    /// Keep this many exit-interval samples per vCPU (benchmarks; 0: none).
    pub samples: usize,
    /// Direct mode: every vCPU has its own io_uring and sockets and drives
    /// them itself while it waits; the engine thread only looks after a
    /// vCPU's lane while the vCPU runs its guest. Otherwise one engine
    /// thread serves every vCPU. With `engine.sqpoll` set, direct lanes
    /// submit through io_uring's shared SQPOLL thread.
    pub direct: bool,
}

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The engine could not start.
    #[error("start the engine: {0}")]
    Engine(#[from] super::engine::EngineError),
    /// KVM refused something.
    #[error("VM {vm}: {source}")]
    Kvm {
        /// VM id.
        vm: u32,
        /// Why.
        source: KvmError,
    },
    /// A device map is invalid.
    #[error("VM {vm}: device map: {source}")]
    DevMap {
        /// VM id.
        vm: u32,
        /// Why.
        source: DevMapError,
    },
    /// A local model could not be built, or a server index is unknown.
    #[error("VM {vm}: {why}")]
    Config {
        /// VM id.
        vm: u32,
        /// What is wrong.
        why: String,
    },
    /// A Linux boot could not be prepared (missing kernel, bad image,
    /// memory too small, ...).
    #[error("VM {vm}: Linux boot: {source}")]
    Boot {
        /// VM id.
        vm: u32,
        /// Why.
        source: BootError,
    },
    /// A socket, ring or thread could not be created.
    #[error("{what}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// How one vCPU ended.
#[derive(Debug)]
pub struct VcpuReport {
    /// VM id.
    pub vm: u32,
    /// vCPU index.
    pub vcpu: u16,
    /// Its exit (or error).
    pub exit: Result<VcpuExit, KvmError>,
    /// KVM exits it took.
    pub exits: u64,
    /// Its counters.
    pub stats: Arc<VcpuStats>,
    /// Its posted writes answered with an error status or given up on
    /// (the engine's horizon passed).
    pub posted_failures: u64,
    /// Its posted writes still unanswered when it ended (its flush, as
    /// long as the engine's horizon, ran out): not known to be applied.
    pub posted_unconfirmed: u64,
}

impl VcpuReport {
    /// Its remote requests that failed: synchronous ones answered with an
    /// error or not at all, posted writes that failed or were never
    /// confirmed.
    pub fn failed(&self) -> u64 {
        self.stats.remote_errors.load(Ordering::Relaxed)
            + self.posted_failures
            + self.posted_unconfirmed
    }
}

struct VcpuThread {
    vm: u32,
    vcpu: u16,
    join: JoinHandle<(Result<VcpuExit, KvmError>, u64)>,
    kicker: VcpuKicker,
    stats: Arc<VcpuStats>,
    ring: Arc<ExitRing>,
}

/// A running client. Dropping it stops every vCPU and the engine.
pub struct Client {
    stop: Arc<AtomicBool>,
    vcpus: Vec<VcpuThread>,
    /// vCPU threads that have ended, and the condition they signal.
    ended: Arc<(Mutex<usize>, Condvar)>,
    engine: Option<Engine>,
    vms: Vec<Vm>,
}

/// A vCPU to create once the engine runs: (VM index, vCPU index, spec,
/// device map, exit ring, lane).
type PendingVcpu = (
    usize,
    u16,
    VcpuSpec,
    DeviceMap,
    Arc<ExitRing>,
    usize,
    Option<UartTap>,
);

/// Counts a vCPU thread out when dropped (at its end, or its unwinding)
/// and wakes [`Client::wait`].
struct Ended(Arc<(Mutex<usize>, Condvar)>);

impl Drop for Ended {
    fn drop(&mut self) {
        let (count, cond) = &*self.0;
        *count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        cond.notify_all();
    }
}

/// COM1's port: a remote UART there is tapped for a Linux VM's console.
const UART_PORT: u16 = 0x3f8;

/// A VM of a [`ClientSpec`] that boots Linux: its id and how.
#[derive(Debug, Clone)]
pub struct LinuxVm {
    /// The id of a VM in [`ClientSpec::vms`].
    pub vm: u32,
    /// The kernel, initramfs, command line and console.
    pub boot: LinuxBoot,
}

/// Builds a local model of `kind`. For a VM booting Linux, a `uart` feeds
/// that boot's console.
fn local_model(
    kind: &str,
    console: Option<&Console>,
) -> Result<Box<dyn DeviceModel>, registry::BuildError> {
    match (kind, console) {
        (uart::KIND, Some(c)) => Ok(Box::new(ConsoleUart::new(
            Uart::new(uart::DEFAULT_LINE),
            c.clone(),
        ))),
        _ => registry::build(kind, ModelParams::default()),
    }
}

fn injector(h: IrqHandle) -> Injector {
    Box::new(move |line, action| match action {
        IrqAction::Assert => h.irq_line(line, true).is_ok(),
        IrqAction::Deassert => h.irq_line(line, false).is_ok(),
        IrqAction::Edge => h.irq_edge(line).is_ok(),
    })
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

impl Client {
    /// Creates every VM, starts the engine and the vCPU threads.
    pub fn start(spec: ClientSpec) -> Result<Client, ClientError> {
        Client::start_linux(spec, Vec::new())
    }

    /// Like [`Client::start`], but the VMs named in `linux` boot Linux
    /// instead of loading images: each has no images and one vCPU; it gets
    /// the in-kernel PIT; its local `uart` writes to the boot's console.
    pub fn start_linux(spec: ClientSpec, linux: Vec<LinuxVm>) -> Result<Client, ClientError> {
        let mut boots: HashMap<u32, LinuxBoot> = HashMap::new();
        for l in linux {
            if !spec.vms.iter().any(|v| v.id == l.vm) {
                return Err(ClientError::Config {
                    vm: l.vm,
                    why: "boots Linux but is not in the client's VMs".into(),
                });
            }
            if boots.insert(l.vm, l.boot).is_some() {
                return Err(ClientError::Config {
                    vm: l.vm,
                    why: "has two Linux boots".into(),
                });
            }
        }
        let sockets = || -> Result<Vec<UdpSocket>, ClientError> {
            let mut out = Vec::new();
            for s in &spec.servers {
                let bind = spec.bind.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
                let sock = UdpSocket::bind((bind, 0)).map_err(io_err("bind client socket"))?;
                sock.connect(s.addr)
                    .map_err(io_err("connect client socket"))?;
                out.push(sock);
            }
            Ok(out)
        };
        let server_addrs: HashMap<u32, SocketAddr> =
            spec.servers.iter().map(|s| (s.id, s.addr)).collect();
        let mut lanes: Vec<Lane> = Vec::new();
        let mut handles: HashMap<u32, IrqHandle> = HashMap::new();
        let mut vms = Vec::new();
        let mut ports = Vec::new();
        // Per vCPU: (vm index, spec, io).
        let mut pending: Vec<PendingVcpu> = Vec::new();
        // Per Linux VM: the state its vCPU starts in.
        let mut linux_states = HashMap::new();
        for vs in &spec.vms {
            let kerr = |source| ClientError::Kvm { vm: vs.id, source };
            let vm = Vm::new(vs.mem_bytes).map_err(kerr)?;
            for (gpa, bytes) in &vs.images {
                vm.load(*gpa, bytes).map_err(kerr)?;
            }
            let boot = boots.get(&vs.id);
            if let Some(boot) = boot {
                let config = |why: &str| ClientError::Config {
                    vm: vs.id,
                    why: why.into(),
                };
                if !vs.images.is_empty() {
                    return Err(config("boots Linux, so it takes no images"));
                }
                if vs.vcpus.len() != 1 {
                    return Err(config(
                        "boots Linux with exactly one vCPU (there is no MP table or ACPI to start more)",
                    ));
                }
                vm.create_pit().map_err(kerr)?;
                let state = boot
                    .prepare(&vm)
                    .map_err(|source| ClientError::Boot { vm: vs.id, source })?;
                linux_states.insert(vs.id, state);
            }
            let console = boot.map(|b| &b.console);
            let mut remotes = Vec::new();
            let mut maps = Vec::new();
            let mut pci_functions = Vec::new();
            // The remote-model table index of (model, server #), added once.
            let remote_index = |remotes: &mut Vec<RemoteModel>,
                                model: u32,
                                server: usize|
             -> Result<u32, ClientError> {
                let s = spec
                    .servers
                    .get(server)
                    .ok_or_else(|| ClientError::Config {
                        vm: vs.id,
                        why: format!("model {model}: no server #{server}"),
                    })?;
                Ok(match remotes.iter().position(|r| r.model == model) {
                    Some(i) => i as u32,
                    None => {
                        remotes.push(RemoteModel {
                            model,
                            server: s.id,
                            socket: server,
                        });
                        (remotes.len() - 1) as u32
                    }
                })
            };
            // A Linux VM whose COM1 is remote: its console is what the
            // guest transmits there.
            let tap = console.and_then(|c| {
                vs.devices
                    .iter()
                    .find(|d| {
                        d.space == Space::Pio
                            && d.base == u64::from(UART_PORT)
                            && matches!(d.place, Place::Remote { .. })
                    })
                    .map(|_| UartTap::new(UART_PORT, c.clone()))
            });
            for d in &vs.devices {
                let placement = match &d.place {
                    Place::Local { kind } => {
                        let model =
                            local_model(kind, console).map_err(|e| ClientError::Config {
                                vm: vs.id,
                                why: format!("model {}: {e}", d.model),
                            })?;
                        Placement::Local(Arc::new(Mutex::new(model)))
                    }
                    Place::Remote { server } => {
                        Placement::Remote(remote_index(&mut remotes, d.model, *server)?)
                    }
                    Place::VirtioBlk { irq, disk } => {
                        if d.space != Space::Pio || d.len != BAR_SIZE || d.base > 0xffff {
                            return Err(ClientError::Config {
                                vm: vs.id,
                                why: format!(
                                    "virtio-blk {}: needs a port range of {BAR_SIZE:#x} ports",
                                    d.model
                                ),
                            });
                        }
                        let store = match disk {
                            DiskPlace::Local { backing } => {
                                let params = ModelParams {
                                    backing: Some(backing.clone()),
                                    ..Default::default()
                                };
                                let m = registry::build("blockstore", params).map_err(|e| {
                                    ClientError::Config {
                                        vm: vs.id,
                                        why: format!("virtio-blk {}: {e}", d.model),
                                    }
                                })?;
                                StoreAt::Local(Arc::new(Mutex::new(m)))
                            }
                            DiskPlace::Remote { server, model, gpa } => {
                                let idx = remote_index(&mut remotes, *model, *server)?;
                                maps.push(Mapping {
                                    space: Space::Mmio,
                                    base: *gpa,
                                    len: STORE_WINDOW,
                                    model: *model,
                                    posted: true,
                                    placement: Placement::Remote(idx),
                                });
                                StoreAt::Remote { base: *gpa }
                            }
                        };
                        let h = vm.irq_handle();
                        let line = u32::from(*irq);
                        let dev = VirtioBlk::new(
                            Box::new(vm.mem_handle()),
                            Box::new(move || {
                                let _ = h.irq_edge(line);
                            }),
                        );
                        pci_functions.push(PciFunction::virtio_blk(
                            pci_functions.len() as u8 + 1,
                            d.base as u16,
                            BAR_SIZE as u16,
                            *irq,
                        ));
                        Placement::VirtioBlk {
                            dev: Arc::new(Mutex::new(dev)),
                            store,
                        }
                    }
                };
                maps.push(Mapping {
                    space: d.space,
                    base: d.base,
                    len: d.len,
                    model: d.model,
                    posted: d.posted,
                    placement,
                });
            }
            if !pci_functions.is_empty() {
                maps.push(Mapping {
                    space: Space::Pio,
                    base: u64::from(pci::CONFIG_ADDRESS_PORT),
                    len: pci::PORTS,
                    model: 0,
                    posted: false,
                    placement: Placement::Local(Arc::new(Mutex::new(Box::new(PciHost::new(
                        pci_functions,
                    ))))),
                });
            }
            let map =
                DeviceMap::new(maps).map_err(|source| ClientError::DevMap { vm: vs.id, source })?;
            let remotes: Arc<[RemoteModel]> = remotes.into();
            handles.insert(vs.id, vm.irq_handle());
            for (i, v) in vs.vcpus.iter().enumerate() {
                let ring = Arc::new(ExitRing::new().map_err(io_err("exit ring"))?);
                let port = VcpuPort {
                    vm: vs.id,
                    hypervisor: vs.hypervisor,
                    vcpu: i as u16,
                    ring: ring.clone(),
                    models: remotes.clone(),
                };
                let lane = if spec.direct {
                    lanes.push(Lane {
                        sockets: sockets()?,
                        vcpus: vec![port],
                        // Interrupts come to the engine's socket (below).
                        injectors: HashMap::new(),
                        direct: true,
                        irq_ports: Vec::new(),
                        servers: server_addrs.clone(),
                    });
                    lanes.len() - 1
                } else {
                    ports.push(port);
                    0
                };
                pending.push((
                    vms.len(),
                    i as u16,
                    *v,
                    map.clone(),
                    ring,
                    lane,
                    tap.clone(),
                ));
            }
            vms.push(vm);
        }
        let all_injectors = || -> HashMap<u32, Injector> {
            handles
                .iter()
                .map(|(vm, h)| (*vm, injector(h.clone())))
                .collect()
        };
        if spec.direct {
            // Direct lanes are their vCPUs' own, reaped only while they wait
            // for an answer: their requests name the engine's interrupt
            // socket for their server (one per server, connected to it, so
            // the kernel takes nothing on it from anyone else), and the
            // engine injects them into any VM of this client.
            let irq = sockets()?;
            let mut irq_ports = Vec::new();
            for s in &irq {
                let addr = s
                    .local_addr()
                    .map_err(io_err("bind the interrupt socket"))?;
                irq_ports.push(addr.port());
            }
            for lane in &mut lanes {
                lane.irq_ports = irq_ports.clone();
                // Also here: an interrupt from a server that does not know
                // the interrupt-port flag comes to the lane that spoke last.
                lane.injectors = all_injectors();
            }
            lanes.push(Lane {
                sockets: irq,
                vcpus: Vec::new(),
                injectors: all_injectors(),
                direct: false,
                irq_ports: Vec::new(),
                servers: server_addrs.clone(),
            });
        }
        let mut ecfg = spec.engine;
        ecfg.client = spec.client;
        if !spec.direct {
            lanes.push(Lane {
                sockets: sockets()?,
                vcpus: ports,
                injectors: all_injectors(),
                direct: false,
                irq_ports: Vec::new(),
                servers: server_addrs.clone(),
            });
        }
        let engine = Engine::spawn(ecfg, lanes, spec.engine_core)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut client = Client {
            stop: stop.clone(),
            vcpus: Vec::new(),
            ended: Arc::new((Mutex::new(0), Condvar::new())),
            engine: None,
            vms: Vec::new(),
        };
        for (vm_idx, index, vspec, map, ring, lane, tap) in pending {
            let vs = &spec.vms[vm_idx];
            let vm = &vms[vm_idx];
            let mut vcpu: Vcpu = match linux_states.get(&vs.id) {
                Some(state) => vm.create_vcpu_with_state(index as u8, state).map(|mut v| {
                    // Linux uses port 0xf4 like any other port.
                    v.set_done_port(false);
                    v
                }),
                None => vm.create_vcpu(index as u8, vspec.entry),
            }
            .map_err(|source| ClientError::Kvm { vm: vs.id, source })?;
            let stats = Arc::new(if spec.samples > 0 {
                VcpuStats::with_samples(spec.samples)
            } else {
                VcpuStats::default()
            });
            let vcpu_ring = ring.clone();
            let mut io = VcpuIo::new(
                vs.id,
                vs.hypervisor,
                index,
                map,
                ring,
                engine.doorbell(),
                spec.vcpu_spin,
                stats.clone(),
            )
            .with_driver(engine.driver(lane))
            .with_timeout(spec.engine.vcpu_wait())
            .with_irq(vm.irq_handle())
            .with_uart_tap(tap);
            let kicker = vcpu.kicker();
            let stop = stop.clone();
            // How long a vCPU whose guest ended waits for its posted
            // writes' answers: as long as the engine tries.
            let flush = spec.engine.vcpu_wait();
            let core = vspec.core;
            let ended = Ended(client.ended.clone());
            let join = std::thread::Builder::new()
                .name(format!("dp-vcpu-{}-{index}", vs.id))
                .spawn(move || {
                    // Counts this thread out however it ends.
                    let _ended = ended;
                    if let Some(c) = core {
                        let _ = affinity::set_thread_affinity([c]);
                    }
                    if let Err(e) = io.attach(vcpu.kicker()) {
                        let e = KvmError::UnexpectedExit(format!("cannot take its lane: {e}"));
                        return (Err(e), 0);
                    }
                    let exit = vcpu.run(&mut io, &stop);
                    // Posted writes the guest made before it ended still
                    // reach their devices.
                    io.flush(Instant::now() + flush);
                    (exit, vcpu.exits())
                })
                .map_err(io_err("start a vCPU thread"))?;
            client.vcpus.push(VcpuThread {
                vm: vs.id,
                vcpu: index,
                join,
                kicker,
                stats,
                ring: vcpu_ring,
            });
        }
        client.engine = Some(engine);
        client.vms = vms;
        Ok(client)
    }

    /// Whether every vCPU has ended by itself (its guest finished, powered
    /// off or failed), without stopping any.
    pub fn finished(&self) -> bool {
        self.vcpus.iter().all(|v| v.join.is_finished())
    }

    /// Remote requests of its vCPUs that failed so far: synchronous ones
    /// answered with an error or not at all, and posted writes answered
    /// with an error or given up on (see [`VcpuReport::failed`]).
    pub fn failed_requests(&self) -> u64 {
        self.vcpus
            .iter()
            .map(|v| v.stats.remote_errors.load(Ordering::Relaxed) + v.ring.posted_failures())
            .sum()
    }

    /// The engine's counters.
    pub fn engine(&self) -> Option<&Engine> {
        self.engine.as_ref()
    }

    /// Waits for every vCPU to end (or `timeout`, after which the rest are
    /// stopped) and reports how each ended.
    pub fn wait(&mut self, timeout: Duration) -> Vec<VcpuReport> {
        // Blocks on the threads' own signal: a polling waiter would wake
        // on the vCPUs' cores every few milliseconds (2 ms polls put ~17
        // us on 1-2% of remote round trips on the development machine).
        let deadline = Instant::now() + timeout;
        let (count, cond) = &*self.ended;
        let mut n = count.lock().unwrap_or_else(|p| p.into_inner());
        while *n < self.vcpus.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            n = cond
                .wait_timeout(n, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        drop(n);
        self.reports()
    }

    fn reports(&mut self) -> Vec<VcpuReport> {
        self.stop.store(true, Ordering::SeqCst);
        for v in &self.vcpus {
            if !v.join.is_finished() {
                v.kicker.kick();
            }
        }
        let mut out = Vec::new();
        for v in self.vcpus.drain(..) {
            let (exit, exits) = v.join.join().unwrap_or_else(|_| {
                (
                    Err(KvmError::UnexpectedExit("vCPU thread panicked".into())),
                    0,
                )
            });
            out.push(VcpuReport {
                vm: v.vm,
                vcpu: v.vcpu,
                exit,
                exits,
                stats: v.stats,
                posted_failures: v.ring.posted_failures(),
                posted_unconfirmed: v.ring.posted_in_flight(),
            });
        }
        out
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        let _ = self.reports();
        if let Some(e) = self.engine.take() {
            e.stop();
        }
        self.vms.clear();
    }
}
