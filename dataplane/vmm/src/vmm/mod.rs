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
mod lanes;

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
use super::engine::{Engine, EngineConfig, RemoteModel};
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
        /// Model kind (`devmodels` registry name).
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

/// What makes a client's vCPU threads leave their guests: a suspend
/// (they hold until resumed) or the client stopping (they end).
#[derive(Default)]
struct Hold {
    /// The `stop` flag of every [`Vcpu::run`]: set to suspend or to stop.
    out: AtomicBool,
    state: Mutex<HoldState>,
    /// Signalled when a vCPU holds and when the state changes.
    cond: Condvar,
}

#[derive(Default)]
struct HoldState {
    stopping: bool,
    suspended: bool,
    /// vCPU threads holding now.
    held: usize,
    /// Work for held vCPU threads: (the thread's position in
    /// `Client::vcpus`, what to do with its vCPU and exit handler).
    jobs: Vec<(usize, Job)>,
}

/// Work a held vCPU thread does with its vCPU (its KVM state is reachable
/// only there).
type Job = Box<dyn FnOnce(&mut Vcpu, &mut ExitHandler) + Send>;

impl Hold {
    fn state(&self) -> std::sync::MutexGuard<'_, HoldState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// On a vCPU thread whose run returned [`VcpuExit::Stopped`] (its last
    /// exit complete, its posted writes answered): holds while the client
    /// is suspended. `true`: run the guest again; `false`: the client stops.
    fn park(&self, slot: usize, vcpu: &mut Vcpu, handler: &mut ExitHandler) -> bool {
        let mut st = self.state();
        if st.stopping {
            return false;
        }
        if !st.suspended {
            // Resumed before this vCPU got here.
            return true;
        }
        st.held += 1;
        self.cond.notify_all();
        while st.suspended && !st.stopping {
            if let Some(at) = st.jobs.iter().position(|(s, _)| *s == slot) {
                let (_, job) = st.jobs.swap_remove(at);
                drop(st);
                job(vcpu, handler);
                st = self.state();
                continue;
            }
            st = self.cond.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.held -= 1;
        !st.stopping
    }
}

/// Why [`Client::suspend`] failed.
#[derive(Debug, thiserror::Error)]
pub enum SuspendError {
    /// The client is suspended already.
    #[error("it is suspended already")]
    Suspended,
    /// The client is not suspended.
    #[error("it is not suspended")]
    NotSuspended,
    /// Not every vCPU held in time (one is stuck in a device access): the
    /// client was resumed.
    #[error("{held} of {running} running vCPUs held within {timeout:?}; resumed it")]
    Timeout {
        /// vCPUs that held.
        held: usize,
        /// vCPUs still running their guests.
        running: usize,
        /// How long it waited.
        timeout: Duration,
    },
}

/// Why [`Client::snapshot`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// The client does not run this VM.
    #[error("VM {0} is not in this client")]
    UnknownVm(u32),
    /// Its vCPUs are not held.
    #[error("VM {0} is not suspended: suspend it first")]
    NotSuspended(u32),
    /// A vCPU's guest ended: there is no running VM to snapshot.
    #[error("VM {vm}: vCPU {vcpu} has ended")]
    VcpuEnded {
        /// VM id.
        vm: u32,
        /// vCPU index.
        vcpu: u16,
    },
    /// KVM refused to give a piece of state.
    #[error("VM {vm}: {source}")]
    Kvm {
        /// VM id.
        vm: u32,
        /// Why.
        source: KvmError,
    },
    /// A state does not fit the VM it should go into.
    #[error("VM {vm}: {why}")]
    Unfit {
        /// VM id.
        vm: u32,
        /// What does not fit.
        why: String,
    },
    /// A local device cannot be snapshotted.
    #[error("VM {vm}: device {model} at {base:#x}: {why}")]
    Device {
        /// VM id.
        vm: u32,
        /// Its model id.
        model: u32,
        /// Its base address.
        base: u64,
        /// Why.
        why: String,
    },
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
    ) -> Result<BuiltVm, ClientError> {
        let kerr = |source| ClientError::Kvm { vm: vs.id, source };
        let vm = Vm::new(vs.mem_bytes).map_err(kerr)?;
        for (gpa, bytes) in &vs.images {
            vm.load(*gpa, bytes).map_err(kerr)?;
        }
        let linux = boot.map(|b| prepare_linux(vs, &vm, b)).transpose()?;
        let restore = match snapshot {
            Some(snap) => restore_vm(vs, &vm, snap)?,
            None => vs.vcpus.iter().map(|_| None).collect(),
        };
        let console = boot.map(|b| &b.console);
        let devices = VmDevices::build(spec, vs, &vm, console)?;
        Ok(BuiltVm {
            id: vs.id,
            hypervisor: vs.hypervisor,
            vm,
            vcpus: vs.vcpus.clone(),
            linux,
            buses: devices.buses,
            remotes: devices.remotes.into(),
            tap: console.and_then(|c| uart_tap(vs, c)),
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

/// Checks that `snap` fits `vs` (VM id, memory size, vCPUs), puts its
/// memory and in-kernel devices into `vm`, and returns its vCPUs by index.
fn restore_vm(
    vs: &VmSpec,
    vm: &Vm,
    snap: VmSnapshot,
) -> Result<Vec<Option<VcpuSnapshot>>, ClientError> {
    let unfit = |why: String| ClientError::Restore { vm: vs.id, why };
    if snap.vm != vs.id {
        return Err(unfit(format!("the snapshot is of VM {}", snap.vm)));
    }
    if snap.memory.len() != vs.mem_bytes {
        return Err(unfit(format!(
            "the snapshot has {:#x} bytes of guest memory, the VM {:#x}",
            snap.memory.len(),
            vs.mem_bytes
        )));
    }
    let mut vcpus: Vec<Option<VcpuSnapshot>> = vs.vcpus.iter().map(|_| None).collect();
    if snap.vcpus.len() != vcpus.len() {
        return Err(unfit(format!(
            "the snapshot has {} vCPUs, the VM {}",
            snap.vcpus.len(),
            vcpus.len()
        )));
    }
    for v in snap.vcpus {
        let index = v.index;
        match vcpus.get_mut(usize::from(index)) {
            Some(slot @ None) => *slot = Some(v),
            _ => return Err(unfit(format!("vCPU {index} is out of range or twice"))),
        }
    }
    let kerr = |source| ClientError::Kvm { vm: vs.id, source };
    vm.load(0, &snap.memory).map_err(kerr)?;
    vm.restore_machine(&snap.machine).map_err(kerr)?;
    Ok(vcpus)
}

/// Puts a vCPU's snapshot into its new vCPU, its bus's local models and
/// its exit path (the request sequence continues).
fn restore_vcpu(
    vm: u32,
    snap: &VcpuSnapshot,
    vcpu: &Vcpu,
    bus: &mut Bus,
    io: &mut VcpuIo,
) -> Result<(), ClientError> {
    vcpu.restore_state(&snap.state)
        .map_err(|source| ClientError::Kvm { vm, source })?;
    for d in &snap.devices {
        let why = match bus.lookup_mut(d.space, d.base) {
            Some(m) if m.model == d.model && m.base == d.base => match m.device.restore(&d.snap) {
                Ok(()) => continue,
                Err(e) => e,
            },
            _ => "the VM has no such local device there".to_string(),
        };
        return Err(ClientError::Restore {
            vm,
            why: format!("device {} at {:#x}: {why}", d.model, d.base),
        });
    }
    io.set_seq(snap.seq);
    Ok(())
}

/// Checks that `vs` can boot Linux, gives it the in-kernel PIT and loads
/// the boot: the state its vCPU starts in.
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
    vm.create_pit()
        .map_err(|source| ClientError::Kvm { vm: vs.id, source })?;
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

    /// Like [`Client::start`], but VM `snapshot.vm` (which must be in
    /// `spec`, with the same memory size and vCPUs) starts from the
    /// snapshot instead of its images: its memory, in-kernel devices, vCPU
    /// states, local models and request sequences are the snapshot's. The
    /// client starts suspended: [`Client::resume`] runs it.
    pub fn restore(spec: ClientSpec, snapshot: VmSnapshot) -> Result<Client, ClientError> {
        let vm = snapshot.vm;
        if !spec.vms.iter().any(|v| v.id == vm) {
            return Err(ClientError::Restore {
                vm,
                why: "the client does not run this VM".into(),
            });
        }
        Client::launch(spec, Vec::new(), vec![snapshot], true)
    }

    /// Like [`Client::start`], but suspended before any guest instruction
    /// runs: a migration's target, which writes guest memory
    /// ([`Vm::load`] through [`Client::vm`]) and then puts the VM's state
    /// in ([`Client::apply_state`]) before [`Client::resume`].
    pub fn start_held(spec: ClientSpec) -> Result<Client, ClientError> {
        Client::launch(spec, Vec::new(), Vec::new(), true)
    }

    /// Puts `snap`'s state into held VM `snap.vm` of this client (started
    /// by [`Client::start_held`]): its in-kernel devices and clock, and on
    /// each held vCPU's thread its KVM state, local models and request
    /// sequence. `snap.memory` is not used: the caller wrote guest memory.
    pub fn apply_state(&self, snap: &VmSnapshot) -> Result<(), VmStateError> {
        let vm = snap.vm;
        let kvm = self.vm(vm).ok_or(VmStateError::UnknownVm(vm))?;
        if !self.suspended() {
            return Err(VmStateError::NotSuspended(vm));
        }
        let slots: Vec<(usize, u16)> = self
            .vcpus
            .iter()
            .enumerate()
            .filter(|(_, v)| v.vm == vm)
            .map(|(slot, v)| (slot, v.vcpu))
            .collect();
        let mismatch = |why: String| VmStateError::Unfit { vm, why };
        if slots.len() != snap.vcpus.len() {
            return Err(mismatch(format!(
                "the state has {} vCPUs, the VM {}",
                snap.vcpus.len(),
                slots.len()
            )));
        }
        kvm.restore_machine(&snap.machine)
            .map_err(|source| VmStateError::Kvm { vm, source })?;
        for (slot, index) in slots {
            let Some(v) = snap.vcpus.iter().find(|v| v.index == index) else {
                return Err(mismatch(format!("the state lacks vCPU {index}")));
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let state = v.clone_state();
            let job: Job = Box::new(move |vcpu, handler| {
                let (bus, io) = handler.parts_mut();
                let r = restore_vcpu(vm, &state, vcpu, bus, io);
                let _ = tx.send(r.map_err(|e| e.to_string()));
            });
            {
                let mut st = self.hold.state();
                st.jobs.push((slot, job));
                self.hold.cond.notify_all();
            }
            rx.recv_timeout(JOB_TIMEOUT)
                .map_err(|_| VmStateError::VcpuEnded { vm, vcpu: index })?
                .map_err(mismatch)?;
        }
        Ok(())
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
        let vms = spec
            .vms
            .iter()
            .map(|vs| BuiltVm::new(&spec, vs, boots.get(&vs.id), snapshots.remove(&vs.id)))
            .collect::<Result<Vec<_>, _>>()?;
        let wiring = lanes::wire(&spec, &vms)?;
        let mut ecfg = spec.engine;
        ecfg.client = spec.client;
        let engine = Engine::spawn(ecfg, wiring.lanes, spec.engine_core)?;
        let mut client = Client {
            hold: Arc::new(Hold::default()),
            vcpus: Vec::new(),
            ended: Arc::new((Mutex::new(0), Condvar::new())),
            engine: None,
            vms: Vec::new(),
            ids: Vec::new(),
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

    /// Suspends every vCPU: each finishes the exit it is in (a remote
    /// access waits for its answer), waits for its posted writes' answers,
    /// leaves `KVM_RUN` with its state whole, and holds until
    /// [`Client::resume`]. Returns once every vCPU still running holds; if
    /// that takes longer than `timeout`, resumes them and fails. vCPUs that
    /// ended meanwhile need not hold.
    pub fn suspend(&self, timeout: Duration) -> Result<(), SuspendError> {
        {
            let mut st = self.hold.state();
            if st.suspended {
                return Err(SuspendError::Suspended);
            }
            st.suspended = true;
            self.hold.out.store(true, Ordering::SeqCst);
        }
        for v in &self.vcpus {
            v.kicker.kick();
        }
        let deadline = Instant::now() + timeout;
        let mut st = self.hold.state();
        loop {
            let running = self.vcpus.iter().filter(|v| !v.join.is_finished()).count();
            if st.held >= running {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                let held = st.held;
                drop(st);
                let _ = self.resume();
                return Err(SuspendError::Timeout {
                    held,
                    running,
                    timeout,
                });
            }
            // A vCPU whose guest ends while suspending does not signal:
            // look again every few milliseconds.
            st = self
                .hold
                .cond
                .wait_timeout(st, left.min(Duration::from_millis(5)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Lets the vCPUs held by [`Client::suspend`] run their guests again.
    pub fn resume(&self) -> Result<(), SuspendError> {
        let mut st = self.hold.state();
        if !st.suspended {
            return Err(SuspendError::NotSuspended);
        }
        st.suspended = false;
        if !st.stopping {
            self.hold.out.store(false, Ordering::SeqCst);
        }
        self.hold.cond.notify_all();
        Ok(())
    }

    /// Whether the client is suspended (between [`Client::suspend`] and
    /// [`Client::resume`]).
    pub fn suspended(&self) -> bool {
        self.hold.state().suspended
    }

    /// A snapshot of VM `vm`, which must be suspended: its memory, the
    /// in-kernel devices and clock, and per vCPU its KVM state, local
    /// models and request sequence (taken on the vCPU's own thread, where
    /// it holds).
    pub fn snapshot(&self, vm: u32) -> Result<VmSnapshot, VmStateError> {
        self.snapshot_with(vm, true)
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

    /// [`Client::snapshot`], with guest memory (`memory`) or without it
    /// (a migration sends memory by itself).
    pub fn snapshot_with(&self, vm: u32, memory: bool) -> Result<VmSnapshot, VmStateError> {
        let at = self
            .ids
            .iter()
            .position(|(id, _)| *id == vm)
            .ok_or(VmStateError::UnknownVm(vm))?;
        if !self.suspended() {
            return Err(VmStateError::NotSuspended(vm));
        }
        let mut vcpus = Vec::new();
        for (slot, v) in self.vcpus.iter().enumerate().filter(|(_, v)| v.vm == vm) {
            let ended = VmStateError::VcpuEnded { vm, vcpu: v.vcpu };
            if v.join.is_finished() {
                return Err(ended);
            }
            let index = v.vcpu;
            let (tx, rx) = std::sync::mpsc::channel();
            let job: Job = Box::new(move |vcpu, handler| {
                let _ = tx.send(vcpu_snapshot(vm, index, vcpu, handler));
            });
            {
                let mut st = self.hold.state();
                st.jobs.push((slot, job));
                self.hold.cond.notify_all();
            }
            // A held vCPU takes its job at once; one that went away drops
            // it (and the sender with it).
            vcpus.push(rx.recv_timeout(JOB_TIMEOUT).map_err(|_| ended)??);
        }
        let vmk = &self.vms[at];
        let kerr = |source| VmStateError::Kvm { vm, source };
        let machine = vmk.save_machine().map_err(kerr)?;
        let memory = if memory {
            let mut m = vec![0u8; vmk.mem_size()];
            vmk.read_memory(0, &mut m).map_err(kerr)?;
            m
        } else {
            Vec::new()
        };
        Ok(VmSnapshot {
            vm,
            hypervisor: self.ids[at].1,
            machine,
            vcpus,
            memory,
        })
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

/// On a held vCPU's thread: its KVM state, local models and sequence.
fn vcpu_snapshot(
    vm: u32,
    index: u16,
    vcpu: &mut Vcpu,
    handler: &mut ExitHandler,
) -> Result<VcpuSnapshot, VmStateError> {
    let state = vcpu
        .save_state()
        .map_err(|source| VmStateError::Kvm { vm, source })?;
    let mut devices = Vec::new();
    for m in handler.bus_mut().entries() {
        let device = |why| VmStateError::Device {
            vm,
            model: m.model,
            base: m.base,
            why,
        };
        if let Some(snap) = m.device.snapshot().map_err(device)? {
            devices.push(DeviceSnapshot {
                space: m.space,
                base: m.base,
                model: m.model,
                snap,
            });
        }
    }
    Ok(VcpuSnapshot {
        index,
        seq: handler.io().seq(),
        state,
        devices,
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    fn vm_spec(id: u32, devices: Vec<DeviceSpec>) -> VmSpec {
        VmSpec {
            id,
            hypervisor: 1,
            mem_bytes: 0x2_0000,
            images: Vec::new(),
            vcpus: Vec::new(),
            devices,
        }
    }

    fn client(vms: Vec<VmSpec>) -> ClientSpec {
        ClientSpec {
            client: 1,
            bind: None,
            servers: Vec::new(),
            vms,
            engine: EngineConfig::default(),
            engine_core: None,
            vcpu_spin: 0,
            samples: 0,
            direct: false,
        }
    }

    fn boot(vm: u32) -> LinuxVm {
        LinuxVm {
            vm,
            boot: LinuxBoot {
                kernel: "vmlinux".into(),
                initrd: None,
                cmdline: String::new(),
                console: Console::new(),
            },
        }
    }

    fn why(e: ClientError) -> (u32, String) {
        match e {
            ClientError::Config { vm, why } => (vm, why),
            other => panic!("not a configuration error: {other}"),
        }
    }

    #[test]
    fn a_linux_boot_names_one_vm_of_the_client_once() {
        let spec = client(vec![vm_spec(1, Vec::new()), vm_spec(2, Vec::new())]);
        let boots = linux_boots(&spec, vec![boot(2)]).unwrap();
        assert_eq!(boots.keys().collect::<Vec<_>>(), [&2]);
        let e = linux_boots(&spec, vec![boot(3)]).unwrap_err();
        assert_eq!(
            why(e),
            (3, "boots Linux but is not in the client's VMs".into())
        );
        let e = linux_boots(&spec, vec![boot(1), boot(1)]).unwrap_err();
        assert_eq!(why(e), (1, "has two Linux boots".into()));
    }

    #[test]
    fn only_a_remote_com1_is_tapped() {
        let com1 = |place| DeviceSpec {
            space: Space::Pio,
            base: u64::from(UART_PORT),
            len: 8,
            model: 7,
            posted: false,
            place,
        };
        let console = Console::new();
        let remote = vm_spec(1, vec![com1(Place::Remote { server: 0 })]);
        assert!(uart_tap(&remote, &console).is_some());
        let local = vm_spec(
            1,
            vec![com1(Place::Local {
                kind: "uart".into(),
            })],
        );
        assert!(uart_tap(&local, &console).is_none());
        let elsewhere = vm_spec(
            1,
            vec![DeviceSpec {
                base: 0x2f8,
                ..com1(Place::Remote { server: 0 })
            }],
        );
        assert!(uart_tap(&elsewhere, &console).is_none());
    }
}
