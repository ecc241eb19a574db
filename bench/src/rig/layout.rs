//! The identifiers, device models and server configuration a rig serves
//! ([`Layout`]), the VM specifications scenarios run, and the `DP_*`
//! knobs.

use super::*;
use crate::invalid::Invalid;

/// UDP port of the devplane server.
pub const PORT: u16 = devplane_wire::DEFAULT_PORT;
/// The server's platform id.
pub const SERVER_ID: u32 = 1;
/// The client platform id dpbench sends as.
pub const CLIENT_ID: u32 = 7;
/// The hypervisor id of every VM dpbench runs.
pub const HYPERVISOR: u32 = 1;
/// Null model read by port I/O (the floors' and `remote-pio`'s model).
pub const NULL_PIO: u32 = 1;
/// Null model reached by MMIO (`remote-mmio`).
pub const NULL_MMIO: u32 = 2;
/// Its guest-physical base.
pub const MMIO_BASE: u32 = 0xd_0000;
/// The port of [`NULL_PIO`] in the guests.
pub const PIO_PORT: u16 = 0x80;
/// Port of the first per-vCPU counter (vCPU `i` uses `+ 0x10 * i`).
pub const COUNTER_BASE: u16 = 0x500;
/// Port of the interrupt counter model of the `irq` scenario.
pub const IRQ_BASE: u16 = 0x600;
/// The line (GSI, master PIC input) the interrupt counters raise.
pub const IRQ_LINE: u8 = 5;
/// Port of the local null device the `irq` guest's handler acknowledges
/// each interrupt on.
pub const ACK_PORT: u16 = 0x620;
/// VM id of the exit floor's guest, whose only device is local: it never
/// reaches a server.
pub const LOCAL_VM: u32 = 9999;

/// Counter model of vCPU `vcpu` (0-based) of the `vm`-th VM (1-based) of
/// a multi-VM measurement (`throughput`, `posted-rate`).
pub const fn counter_id(vm: u32, vcpu: u32) -> u32 {
    100 + vm * 10 + vcpu
}

/// Interrupt counter model of irq slot `slot` (1-based); its interrupts
/// go to VM `slot`.
pub const fn irq_model(slot: u32) -> u32 {
    200 + slot
}

/// The identifiers and device models a bench server holds.
///
/// - models [`NULL_PIO`] (port [`PIO_PORT`]) and [`NULL_MMIO`] (at
///   [`MMIO_BASE`]): null;
/// - models [`counter_id`]`(v, i)` for `v` in `1..=tp_vms`, `i` in
///   `0..tp_vcpus`: counters at port [`COUNTER_BASE`]` + 0x10 * i`;
/// - models [`irq_model`]`(k)` for `k` in `1..=irq_slots`: counters at
///   [`IRQ_BASE`] raising line [`IRQ_LINE`] of VM `k`;
/// - VMs `1..=vms` of client [`CLIENT_ID`], hypervisor [`HYPERVISOR`]:
///   `1..=irq_slots` for the `irq` scenario, the rest a pool of fresh ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// VMs registered.
    pub vms: u32,
    /// Most VMs in one throughput cell.
    pub tp_vms: u32,
    /// Most vCPUs per VM in one throughput cell.
    pub tp_vcpus: u32,
    /// Interrupt counters, one per irq run.
    pub irq_slots: u32,
}

/// The embedded server's layout.
pub const EMBEDDED: Layout = Layout {
    vms: 256,
    tp_vms: 8,
    tp_vcpus: 8,
    irq_slots: 8,
};

/// The layout `bench/server-remote.toml` declares for `--server`.
pub const REMOTE: Layout = Layout {
    vms: 64,
    tp_vms: 4,
    tp_vcpus: 4,
    irq_slots: 8,
};

// The remote layout fits in the embedded one; the vCPU counters of one VM
// index do not run into the next index's (ids are 10 apart), nor into the
// interrupt counters.
const _: () = assert!(REMOTE.tp_vms <= EMBEDDED.tp_vms && REMOTE.tp_vcpus <= EMBEDDED.tp_vcpus);
const _: () = assert!(EMBEDDED.tp_vcpus <= 10);
const _: () = assert!(counter_id(EMBEDDED.tp_vms, EMBEDDED.tp_vcpus - 1) < irq_model(1));

impl Layout {
    /// Fresh VM ids a run may use (the VMs that are not irq slots).
    pub fn pool(&self) -> u32 {
        self.vms - self.irq_slots
    }
}

/// The bench server's configuration: `section` and `tuning` as given, the
/// client at `client_addr`, and the VMs and models of `layout`.
pub fn server_config(
    layout: Layout,
    section: ServerSection,
    tuning: Tuning,
    client_addr: Ipv4Addr,
) -> ServerConfig {
    let mut models = vec![
        ModelConfig {
            pio_base: Some(PIO_PORT),
            ..ModelConfig::new(NULL_PIO, "null", 0)
        },
        ModelConfig {
            mmio_base: Some(MMIO_BASE as u64),
            ..ModelConfig::new(NULL_MMIO, "null", 0)
        },
    ];
    for v in 1..=layout.tp_vms {
        for i in 0..layout.tp_vcpus {
            models.push(ModelConfig {
                pio_base: Some(COUNTER_BASE + 0x10 * i as u16),
                ..ModelConfig::new(counter_id(v, i), "counter", 0)
            });
        }
    }
    for k in 1..=layout.irq_slots {
        models.push(ModelConfig {
            line: Some(IRQ_LINE as u32),
            vm: Some(k),
            pio_base: Some(IRQ_BASE),
            ..ModelConfig::new(irq_model(k), "counter", 0)
        });
    }
    ServerConfig {
        server: section,
        tuning,
        clients: vec![ClientConfig {
            tag_key: None,
            id: CLIENT_ID,
            address: client_addr,
            budget: None,
        }],
        vms: (1..=layout.vms)
            .map(|id| VmConfig {
                id,
                client: CLIENT_ID,
                hypervisor: HYPERVISOR,
            })
            .collect(),
        models,
    }
}

/// Parses `--server`'s ADDR: an IPv4 address and a UDP port
/// (`192.0.2.10:7700`).
pub fn parse_server_addr(s: &str) -> Result<SocketAddrV4, Invalid> {
    let bad = || {
        format!(
            "expected IPV4:PORT of a running devplane server, e.g. 192.0.2.10:{PORT} \
             (see bench/server-remote.toml)"
        )
    };
    let addr: SocketAddrV4 = s.trim().parse().map_err(|_| bad())?;
    if addr.port() == 0 {
        return Err(Invalid::from(format!("port 0: {}", bad())));
    }
    if addr.ip().is_unspecified() || addr.ip().is_broadcast() || addr.ip().is_multicast() {
        return Err(Invalid::from(format!(
            "{} is not a server's address: {}",
            addr.ip(),
            bad()
        )));
    }
    Ok(addr)
}

/// Whether `failed` of `total` remote accesses is few enough to keep a run:
/// at most 1%.
pub fn within_error_limit(failed: u64, total: u64) -> bool {
    failed.saturating_mul(100) <= total
}

/// Every knob the client-side scenarios consulted, resolved: their
/// placement.
static KNOBS: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// The placement the last scenario used (every knob consulted since
/// [`reset_knobs`], resolved), for `summary.json`.
pub fn placement() -> BTreeMap<String, String> {
    KNOBS.lock().map(|k| k.clone()).unwrap_or_default()
}

/// Forgets the knobs consulted so far (at the start of a scenario).
pub fn reset_knobs() {
    if let Ok(mut k) = KNOBS.lock() {
        k.clear();
    }
}

/// The `DP_*` environment knob `name` (or `default`), remembered for
/// [`placement`].
pub fn knob(name: &str, default: u32) -> u32 {
    let v = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    if let Ok(mut k) = KNOBS.lock() {
        k.insert(name.to_string(), v.to_string());
    }
    v
}

/// A one-record read of the server's null model ([`NULL_PIO`]) as VM `vm`:
/// the request of round trip `i`, encoded into the buffer; its length.
pub(crate) fn null_read(vm: u32) -> impl FnMut(u64, &mut [u8]) -> usize + Send + 'static {
    let access = Access::PioIn {
        port: PIO_PORT,
        size: AccessSize::B1,
    };
    move |i, buf| encode_for(buf, NULL_PIO, &[request_for(vm, i, access)])
}

/// Runs `f` with a new unbound-address UDP socket on a thread pinned to
/// `core`, and waits for it.
pub(crate) fn on_pinned_socket<T: Send>(
    core: usize,
    f: impl FnOnce(UdpSocket) -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(move || -> Result<T> {
            let _ = affinity::set_thread_affinity([core]);
            let sock =
                UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).context("bind the client socket")?;
            f(sock)
        })
        .join()
        .unwrap_or_else(|_| bail!("a measurement thread panicked"))
    })
}

/// How the exit rings are drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// One engine thread for every vCPU.
    Engine,
    /// Each vCPU drives its own lane (plain socket calls) while it waits.
    Direct,
    /// Engine, sending with SEND_ZC from the registered buffers.
    EngineZc,
}

impl Drain {
    /// The drain `DP_DRAIN` names (`engine`, `engine-zc`; anything else:
    /// direct).
    pub fn from_env() -> Drain {
        match std::env::var("DP_DRAIN").as_deref() {
            Ok("engine") => Drain::Engine,
            Ok("engine-zc") => Drain::EngineZc,
            _ => Drain::Direct,
        }
    }

    /// Its name in rows' knobs.
    pub fn name(self) -> &'static str {
        match self {
            Drain::Engine => "engine",
            Drain::Direct => "direct",
            Drain::EngineZc => "engine-zc",
        }
    }
}

/// A VM running `guests` (one per vCPU) with `devices`, every vCPU pinned
/// to `DP_VCPU_CORE` (default 0).
pub fn vm_spec(id: u32, guests: &[Guest], devices: Vec<DeviceSpec>) -> VmSpec {
    let mem = guests.iter().map(|g| g.mem_end()).max().unwrap_or(0x2_0000);
    VmSpec {
        id,
        hypervisor: HYPERVISOR,
        mem_bytes: mem.next_multiple_of(0x1_0000).max(0x2_0000) as usize,
        images: guests
            .iter()
            .map(|g| (g.load_gpa, g.code.clone()))
            .collect(),
        vcpus: guests
            .iter()
            .map(|g| VcpuSpec {
                entry: g.entry,
                core: Some(knob("DP_VCPU_CORE", 0) as usize),
            })
            .collect(),
        devices,
    }
}

/// A device: model `model` at `base..base + len` of `space`, posted writes
/// or not, remote (on the rig's server) or a local null model.
pub fn dev(space: Space, base: u64, len: u64, model: u32, posted: bool, local: bool) -> DeviceSpec {
    DeviceSpec {
        space,
        base,
        len,
        model,
        posted,
        place: if local {
            Place::Local {
                kind: "null".into(),
            }
        } else {
            Place::Remote { server: 0 }
        },
    }
}

/// How one vCPU of a run ended.
#[derive(Debug)]
pub struct VcpuResult {
    /// VM id.
    pub vm: u32,
    /// vCPU index.
    pub vcpu: u16,
    /// The value the guest reported on its done port.
    pub done: u32,
    /// Its exit intervals, ns, in order (see `VcpuStats::samples`).
    pub samples: Vec<u32>,
    /// Accesses served by local models.
    pub local: u64,
    /// Accesses sent to the server.
    pub remote: u64,
}

impl VcpuResult {
    /// The time from its first to its last sampled exit (the sum of its
    /// exit intervals).
    pub fn span(&self) -> Duration {
        Duration::from_nanos(self.samples.iter().map(|&s| s as u64).sum())
    }
}

/// A run of VMs: every vCPU's result and the wall time from starting the
/// client to the last vCPU's end.
pub struct Outcome {
    /// Per vCPU, in VM then vCPU order.
    pub vcpus: Vec<VcpuResult>,
    /// Wall time of the run (VM creation included).
    pub elapsed: Duration,
    /// Interrupts the client injected, and of those the ones its vCPU
    /// threads injected from their own lanes (the rest: the engine
    /// thread); `None` without an engine.
    pub irqs: Option<(u64, u64)>,
}

impl Outcome {
    /// Every vCPU's samples after its first `warmup`, concatenated.
    pub fn samples(&self, warmup: usize) -> impl Iterator<Item = u32> + '_ {
        self.vcpus
            .iter()
            .flat_map(move |v| v.samples.iter().skip(warmup).copied())
    }
}

/// A histogram of `samples` (ns).
pub fn histogram(samples: impl IntoIterator<Item = u32>) -> Latency {
    let mut l = Latency::new();
    for s in samples {
        l.record(s as u64);
    }
    l
}
