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
//!
//! Starting a client: each VM is created and loaded or prepared for Linux
//! and given its devices (`devices`: one [`Bus`] per vCPU and the VM's
//! remote-model table), the engine's lanes are wired (`lanes`), the engine
//! starts, then one thread per vCPU runs its guest with an
//! [`ExitHandler`] over its bus.

mod devices;
mod hold;
mod lanes;
mod state;
#[cfg(test)]
mod tests;

pub use self::hold::SuspendError;
use self::hold::{Hold, Job};
pub use self::state::VmStateError;
use self::state::{restore_vcpu, restore_vm};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devplane_devmodels::Space;

use self::devices::VmDevices;
use self::lanes::VcpuWire;
use super::boot::{BootError, Console, LinuxBoot};
use super::bus::Bus;
pub use super::bus::STORE_WINDOW;
use super::devmap::DevMapError;
use super::engine::{Engine, EngineConfig, LiveKeys, RemoteModel};
use super::kvm::{CpuState, Entry, KvmError, Vcpu, VcpuExit, VcpuKicker, Vm};
use super::ring::ExitRing;
use super::snapshot::{DeviceSnapshot, VcpuSnapshot, VmSnapshot};
use super::uart_tap::UartTap;
use super::vcpu_io::{ExitHandler, VcpuIo, VcpuStats};

/// Where a mapped device runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Place {
    /// A local model of this kind, in the vCPU threads.
    Local {
        /// Model kind (`devmodels` registry name), or `KIND@LINE` for one
        /// raising interrupt line `LINE` (`counter@5`).
        kind: String,
    },
    /// On the server with this index in [`ClientSpec::servers`].
    Remote {
        /// Server index.
        server: usize,
    },
    /// A legacy virtio-pci block device whose I/O BAR is this device's
    /// port range (`len` must be
    /// [`BAR_SIZE`](crate::virtio::blk::BAR_SIZE)). Its transport runs in the
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
    /// An owner server in front of it (the patent's Fig. 6): requests go
    /// to this address and the owner's XDP program forwards them; the
    /// server's answers and interrupts come straight from `addr`, the
    /// only source they are taken from.
    pub via: Option<SocketAddr>,
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
    /// Direct mode: every vCPU has its own sockets (no io_uring) and drives
    /// them itself while it waits; while the vCPU runs its guest the
    /// engine thread only kicks it when one of its datagrams is due for
    /// retransmission (and injects the interrupts it receives). Otherwise
    /// one engine thread serves every vCPU.
    pub direct: bool,
}

/// Why a client could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The engine could not start.
    #[error("start the engine: {0}")]
    Engine(#[from] crate::engine::EngineError),
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
    /// A snapshot does not fit the VM it should restore.
    #[error("VM {vm}: restore: {why}")]
    Restore {
        /// VM id.
        vm: u32,
        /// What does not fit.
        why: String,
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
    hold: Arc<Hold>,
    vcpus: Vec<VcpuThread>,
    /// vCPU threads that have ended, and the condition they signal.
    ended: Arc<(Mutex<usize>, Condvar)>,
    engine: Option<Engine>,
    vms: Vec<Vm>,
    /// (VM id, hypervisor id) of each of `vms`.
    ids: Vec<(u32, u32)>,
    /// The servers' ids, in [`ClientSpec::servers`] order (the engine's
    /// socket order).
    servers: Vec<u32>,
    /// The VMs' remote disks: (VM id, disk).
    disks: Vec<(u32, devices::RemoteDisk)>,
}

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

/// How long a snapshot waits for a held vCPU to take its state.
const JOB_TIMEOUT: Duration = Duration::from_secs(10);

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

/// A VM created and loaded, its devices built, before its vCPUs run.
pub(super) struct BuiltVm {
    id: u32,
    hypervisor: u32,
    vm: Vm,
    vcpus: Vec<VcpuSpec>,
    /// Where a Linux VM's vCPU starts.
    linux: Option<CpuState>,
    /// One bus per vCPU.
    buses: Vec<Bus>,
    remotes: Arc<[RemoteModel]>,
    tap: Option<UartTap>,
    /// Its remote disks' counters.
    disks: Vec<devices::RemoteDisk>,
    /// The vCPUs' states to restore, by index.
    restore: Vec<Option<VcpuSnapshot>>,
}

impl BuiltVm {
    /// Creates VM `vs`, loads its images or prepares its Linux `boot`, and
    /// builds its devices.
    fn new(
        spec: &ClientSpec,
        vs: &VmSpec,
        boot: Option<&LinuxBoot>,
        snapshot: Option<VmSnapshot>,
        keys: &LiveKeys,
    ) -> Result<BuiltVm, ClientError> {
        let kerr = |source| ClientError::Kvm { vm: vs.id, source };
        let vm = Vm::new(vs.mem_bytes).map_err(kerr)?;
        // Every VM has the in-kernel PIT (as on a PC, and as Firecracker
        // does): Linux needs it, and the test guests check that it moves
        // with the VM.
        vm.create_pit().map_err(kerr)?;
        for (gpa, bytes) in &vs.images {
            vm.load(*gpa, bytes).map_err(kerr)?;
        }
        let linux = boot.map(|b| prepare_linux(vs, &vm, b)).transpose()?;
        let restore = match snapshot {
            Some(snap) => restore_vm(vs, &vm, snap)?,
            None => vs.vcpus.iter().map(|_| None).collect(),
        };
        let console = boot.map(|b| &b.console);
        let devices = VmDevices::build(spec, vs, &vm, console, keys)?;
        Ok(BuiltVm {
            id: vs.id,
            hypervisor: vs.hypervisor,
            vm,
            vcpus: vs.vcpus.clone(),
            linux,
            buses: devices.buses,
            remotes: devices.remotes.into(),
            tap: console.and_then(|c| uart_tap(vs, c)),
            disks: devices.disks,
            restore,
        })
    }

    /// vCPU `index`, in real mode at its entry or in the Linux boot's
    /// state.
    fn create_vcpu(&self, index: u16) -> Result<Vcpu, ClientError> {
        let entry = self.vcpus[usize::from(index)].entry;
        match &self.linux {
            Some(state) => self
                .vm
                .create_vcpu_with_state(index as u8, state)
                .map(|mut v| {
                    // Linux uses port 0xf4 like any other port.
                    v.set_done_port(false);
                    v
                }),
            None => self.vm.create_vcpu(index as u8, entry),
        }
        .map_err(|source| ClientError::Kvm {
            vm: self.id,
            source,
        })
    }
}

/// Checks that `vs` can boot Linux and loads the boot: the state its vCPU
/// starts in.
fn prepare_linux(vs: &VmSpec, vm: &Vm, boot: &LinuxBoot) -> Result<CpuState, ClientError> {
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
    boot.prepare(vm)
        .map_err(|source| ClientError::Boot { vm: vs.id, source })
}

/// A Linux VM whose COM1 is remote: its console is what the guest
/// transmits there.
fn uart_tap(vs: &VmSpec, console: &Console) -> Option<UartTap> {
    vs.devices
        .iter()
        .find(|d| {
            d.space == Space::Pio
                && d.base == u64::from(UART_PORT)
                && matches!(d.place, Place::Remote { .. })
        })
        .map(|_| UartTap::new(UART_PORT, console.clone()))
}

/// The Linux boots of `linux`, by VM id: each of a VM in `spec`, at most
/// one per VM.
fn linux_boots(
    spec: &ClientSpec,
    linux: Vec<LinuxVm>,
) -> Result<HashMap<u32, LinuxBoot>, ClientError> {
    let mut boots = HashMap::new();
    for l in linux {
        let config = |why: &str| ClientError::Config {
            vm: l.vm,
            why: why.into(),
        };
        if !spec.vms.iter().any(|v| v.id == l.vm) {
            return Err(config("boots Linux but is not in the client's VMs"));
        }
        if boots.insert(l.vm, l.boot).is_some() {
            return Err(config("has two Linux boots"));
        }
    }
    Ok(boots)
}

fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> ClientError {
    move |source| ClientError::Io { what, source }
}

/// What a vCPU thread runs.
struct VcpuRun {
    vcpu: Vcpu,
    handler: ExitHandler,
    core: Option<usize>,
    hold: Arc<Hold>,
    /// Its position in `Client::vcpus` (for jobs while held).
    slot: usize,
    ended: Ended,
    /// How long the vCPU, once its guest ended, waits for its posted
    /// writes' answers: as long as the engine tries.
    flush: Duration,
}

impl VcpuRun {
    /// The thread's body: pin, take the lane (direct mode), run the guest,
    /// flush posted writes. Returns the exit and the KVM exits taken.
    fn run(mut self) -> (Result<VcpuExit, KvmError>, u64) {
        // Counts this thread out however it ends.
        let _ended = self.ended;
        if let Some(c) = self.core {
            let _ = affinity::set_thread_affinity([c]);
        }
        if let Err(e) = self.handler.io().attach(self.vcpu.kicker()) {
            let e = KvmError::UnexpectedExit(format!("cannot take its lane: {e}"));
            return (Err(e), 0);
        }
        let exit = loop {
            let exit = self.vcpu.run(&mut self.handler, &self.hold.out);
            // Posted writes the guest made before it ended (or before it
            // holds) still reach their devices.
            self.handler.io().flush(Instant::now() + self.flush);
            if !matches!(exit, Ok(VcpuExit::Stopped))
                || !self.hold.park(self.slot, &mut self.vcpu, &mut self.handler)
            {
                break exit;
            }
            // Resumed: look after what reached the lane while it held.
            super::kvm::IoHandler::kicked(&mut self.handler);
        };
        (exit, self.vcpu.exits())
    }
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
        Client::launch(spec, linux, Vec::new(), false)
    }

    fn launch(
        spec: ClientSpec,
        linux: Vec<LinuxVm>,
        snapshots: Vec<VmSnapshot>,
        held: bool,
    ) -> Result<Client, ClientError> {
        let boots = linux_boots(&spec, linux)?;
        let mut snapshots: HashMap<u32, VmSnapshot> =
            snapshots.into_iter().map(|s| (s.vm, s)).collect();
        // One set of tag keys for the engine and the VMs' bulk disks: a
        // rotation reaches both.
        let keys = LiveKeys::new(spec.engine.tag_keys.clone());
        let vms = spec
            .vms
            .iter()
            .map(|vs| {
                BuiltVm::new(
                    &spec,
                    vs,
                    boots.get(&vs.id),
                    snapshots.remove(&vs.id),
                    &keys,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        let wiring = lanes::wire(&spec, &vms)?;
        let mut ecfg = spec.engine.clone();
        ecfg.client = spec.client;
        let engine = Engine::spawn_with_keys(ecfg, wiring.lanes, spec.engine_core, keys)?;
        let mut client = Client {
            hold: Arc::new(Hold::default()),
            vcpus: Vec::new(),
            ended: Arc::new((Mutex::new(0), Condvar::new())),
            engine: None,
            vms: Vec::new(),
            ids: Vec::new(),
            servers: spec.servers.iter().map(|s| s.id).collect(),
            disks: Vec::new(),
        };
        if held {
            // A restored VM holds until resumed (its servers are told of
            // it first).
            client.hold.state().suspended = true;
            client.hold.out.store(true, Ordering::SeqCst);
        }
        let mut wires = wiring.vcpus.into_iter();
        for mut vm in vms {
            let buses = std::mem::take(&mut vm.buses);
            for (index, bus) in buses.into_iter().enumerate() {
                let wire = wires.next().expect("one wire per vCPU");
                client.spawn_vcpu(&spec, &engine, &mut vm, index as u16, bus, wire)?;
            }
            client.ids.push((vm.id, vm.hypervisor));
            let id = vm.id;
            client
                .disks
                .extend(std::mem::take(&mut vm.disks).into_iter().map(|d| (id, d)));
            client.vms.push(vm.vm);
        }
        client.engine = Some(engine);
        Ok(client)
    }

    /// Creates vCPU `index` of `vm` and starts its thread.
    fn spawn_vcpu(
        &mut self,
        spec: &ClientSpec,
        engine: &Engine,
        vm: &mut BuiltVm,
        index: u16,
        mut bus: Bus,
        wire: VcpuWire,
    ) -> Result<(), ClientError> {
        let vcpu = vm.create_vcpu(index)?;
        let stats = Arc::new(if spec.samples > 0 {
            VcpuStats::with_samples(spec.samples)
        } else {
            VcpuStats::default()
        });
        let ring = wire.ring.clone();
        let mut io = VcpuIo::new(
            vm.id,
            vm.hypervisor,
            index,
            wire.ring,
            engine.doorbell(),
            spec.vcpu_spin,
            stats.clone(),
        )
        .with_driver(engine.driver(wire.lane))
        .with_timeout(spec.engine.vcpu_wait())
        .with_irq(vm.vm.irq_handle())
        .with_uart_tap(vm.tap.clone());
        if let Some(snap) = vm
            .restore
            .get_mut(usize::from(index))
            .and_then(Option::take)
        {
            restore_vcpu(vm.id, &snap, &vcpu, &mut bus, &mut io)?;
        }
        let kicker = vcpu.kicker();
        let run = VcpuRun {
            vcpu,
            handler: ExitHandler::new(bus, io),
            core: vm.vcpus[usize::from(index)].core,
            hold: self.hold.clone(),
            slot: self.vcpus.len(),
            ended: Ended(self.ended.clone()),
            flush: spec.engine.vcpu_wait(),
        };
        let join = std::thread::Builder::new()
            .name(format!("dp-vcpu-{}-{index}", vm.id))
            .spawn(move || run.run())
            .map_err(io_err("start a vCPU thread"))?;
        self.vcpus.push(VcpuThread {
            vm: vm.id,
            vcpu: index,
            join,
            kicker,
            stats,
            ring,
        });
        Ok(())
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

    /// The counters of VM `vm`'s remote disks (its virtio-blk devices
    /// whose disk is a `blockstore` on a server), in device order.
    pub fn disks(&self, vm: u32) -> Vec<devplane_control::proto::DiskStatus> {
        let n = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        self.disks
            .iter()
            .filter(|(id, _)| *id == vm)
            .map(|(_, d)| {
                // Completions first: a request submitted and completed
                // between the reads then never shows more completed than
                // submitted.
                let (completed, errors) = (n(&d.stats.completed), n(&d.stats.errors));
                devplane_control::proto::DiskStatus {
                    model: d.model,
                    store: d.store,
                    submitted: n(&d.stats.submitted),
                    completed,
                    errors,
                    resent: n(&d.stats.resent),
                    dropped: n(&d.stats.dropped),
                }
            })
            .collect()
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

    /// The ids of the VMs this client runs.
    pub fn vm_ids(&self) -> Vec<u32> {
        self.ids.iter().map(|(id, _)| *id).collect()
    }

    /// VM `vm`'s KVM VM (guest memory, dirty log), if this client runs it.
    pub fn vm(&self, vm: u32) -> Option<&Vm> {
        let at = self.ids.iter().position(|(id, _)| *id == vm)?;
        self.vms.get(at)
    }

    /// Points remote model `model` at server `server` (one of
    /// [`ClientSpec::servers`]) for every vCPU of this client: the model
    /// moved to that server. Requests in flight are resent there with
    /// their sequence numbers (see [`Engine::retarget`]); the guest does
    /// not notice. Returns how many datagrams in flight were resent.
    pub fn retarget(
        &self,
        model: u32,
        server: u32,
        timeout: Duration,
    ) -> Result<usize, crate::engine::RetargetError> {
        let socket = self
            .servers
            .iter()
            .position(|&s| s == server)
            .ok_or(crate::engine::RetargetError::UnknownServer(server))?;
        match &self.engine {
            Some(e) => e.retarget(model, server, socket, timeout),
            None => Ok(0),
        }
    }

    /// Each vCPU's counters: (VM id, vCPU index, counters), in start order.
    pub fn vcpu_stats(&self) -> Vec<(u32, u16, Arc<VcpuStats>)> {
        self.vcpus
            .iter()
            .map(|v| (v.vm, v.vcpu, v.stats.clone()))
            .collect()
    }

    fn reports(&mut self) -> Vec<VcpuReport> {
        {
            let mut st = self.hold.state();
            st.stopping = true;
            self.hold.out.store(true, Ordering::SeqCst);
            self.hold.cond.notify_all();
        }
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
