//! The client daemon's configuration file (`CLIENT.toml`).
//!
//! `[client]` gives the client platform's identity and how its VMs talk to
//! servers, `[[servers]]` the servers its remote devices live on, `[[vms]]`
//! the VMs it may launch — each with its guest (one of the test guests of
//! [`super::super::guests`]) and its `[[vms.devices]]` map.
//! `dataplane/vmm/examples/client.toml` is a complete, commented example.
//!
//! Every table rejects unknown keys. [`ClientFile::from_toml_str`] and
//! [`ClientFile::from_file`] parse and then [`validate`](ClientFile::validate):
//! a file that loads can build a [`ClientSpec`] for each of its VMs
//! ([`ClientFile::client_spec`]). Every error is one line naming the
//! offending entry.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use devplane_devmodels::Space;
use devplane_devmodels::registry::{self, ModelParams};
use serde::Deserialize;

use crate::devmap::{DevMapError, DeviceMap, Mapping};
use crate::engine::EngineConfig;
use crate::guests::{self, Guest, GuestError};
use crate::vmm::{ClientSpec, DeviceSpec, DiskPlace, Place, ServerSpec, VcpuSpec, VmSpec};

/// Default of `client.spin`.
pub const DEFAULT_SPIN: u32 = 200;

/// Default of `[client] horizon_ms`: how long a request is retried before
/// it fails ([`EngineConfig::horizon`]), long enough for a server restart.
pub const DEFAULT_HORIZON_MS: u64 = 10_000;

/// The range `[client] horizon_ms` may take.
pub const HORIZON_MS_RANGE: std::ops::RangeInclusive<u64> = 10..=600_000;

/// The smallest guest memory a VM gets.
const MIN_MEM: u64 = 0x2_0000;

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientFile {
    /// `[client]`.
    pub client: ClientSection,
    /// `[[servers]]`.
    #[serde(default)]
    pub servers: Vec<ServerEntry>,
    /// `[[vms]]`.
    #[serde(default)]
    pub vms: Vec<VmEntry>,
}

/// The `[client]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    /// This client platform's id (nonzero; the servers know it by it).
    pub id: u32,
    /// Local address the VMs send from (default: any). Servers that check
    /// clients drop requests from an address other than the registered
    /// one.
    #[serde(default)]
    pub bind: Option<IpAddr>,
    /// Spins of a vCPU waiting for an answer before it sleeps (default
    /// [`DEFAULT_SPIN`]).
    #[serde(default = "default_spin")]
    pub spin: u32,
    /// Direct mode: each vCPU drives its own io_uring and sockets while it
    /// waits (default `true`); otherwise one engine thread per VM serves
    /// every vCPU of that VM.
    #[serde(default = "default_true")]
    pub direct: bool,
    /// Milliseconds a request is retried (with exponential back-off)
    /// before it fails and is reported (default [`DEFAULT_HORIZON_MS`],
    /// within [`HORIZON_MS_RANGE`]).
    #[serde(default = "default_horizon_ms")]
    pub horizon_ms: u64,
    /// `tag_key = "ID:HEX"`: this client's tag key (the one its servers
    /// hold in its `[[clients]]` entry); every datagram is then sealed
    /// and every answer and interrupt verified. None: nothing is tagged.
    #[serde(default)]
    pub tag_key: Option<devplane_control::config::ClientKey>,
}

/// A `[[servers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerEntry {
    /// Server platform id (nonzero, unique).
    pub id: u32,
    /// Its devplane UDP address, `"ip:port"`.
    pub address: SocketAddr,
    /// `via = "ip:port"`: an owner server that forwards requests to it
    /// (answers and interrupts still come from `address`).
    #[serde(default)]
    pub via: Option<SocketAddr>,
}

impl ServerEntry {
    /// The server as a [`ClientSpec`] names it.
    fn spec(&self) -> ServerSpec {
        ServerSpec {
            addr: self.address,
            id: self.id,
            via: self.via,
        }
    }
}

/// A `[[vms]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmEntry {
    /// VM id (nonzero, unique).
    pub id: u32,
    /// Hypervisor id (nonzero).
    pub hypervisor: u32,
    /// The guest it runs.
    pub guest: GuestEntry,
    /// `[[vms.devices]]`: its device map.
    #[serde(default)]
    pub devices: Vec<DeviceEntry>,
}

/// A VM's guest: one of the test guests, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum GuestEntry {
    /// [`guests::pio_loop`]: `iterations` writes to `port`, then a read,
    /// reported.
    PioLoop {
        /// The port.
        port: u16,
        /// Writes.
        iterations: u16,
    },
    /// [`guests::checked_writes`]: `iterations` writes to `port` with their
    /// count and sum kept in guest memory, then a read checked against
    /// them; reports the read if the check holds.
    CheckedWrites {
        /// The port.
        port: u16,
        /// Writes.
        iterations: u16,
    },
    /// [`guests::pio_read_loop`]: `iterations` reads of `port`.
    PioReadLoop {
        /// The port.
        port: u16,
        /// Reads.
        iterations: u16,
    },
    /// [`guests::mmio_loop`]: [`GuestEntry::PioLoop`] over MMIO at `gpa`
    /// (below 1 MiB, outside guest memory, e.g. `0xd0000`).
    MmioLoop {
        /// The guest-physical address.
        gpa: u32,
        /// Writes.
        iterations: u16,
    },
    /// [`guests::irq_counter`]: counts `want` interrupts on master-PIC
    /// input `line`, acknowledging each on `ack_port`.
    IrqCounter {
        /// PIC input, 0-7.
        line: u8,
        /// Interrupts to wait for.
        want: u16,
        /// Port each count is written to.
        ack_port: u16,
    },
    /// [`guests::irq_chain`]: like [`GuestEntry::IrqCounter`], but asks a
    /// device for each interrupt by writing 1 to `trigger_port` (one
    /// outstanding at a time).
    IrqChain {
        /// PIC input, 0-7.
        line: u8,
        /// Interrupts to ask for.
        want: u16,
        /// Port each count is written to.
        ack_port: u16,
        /// Port written to ask for the next interrupt.
        trigger_port: u16,
    },
    /// [`guests::uart_echo`]: a console guest on the 16550 UART at `base`
    /// (its interrupt on master-PIC input `line`): prints a banner, echoes
    /// every byte it receives, and reports how many it received once it
    /// got `stop`.
    UartEcho {
        /// The UART's first port (COM1: 0x3f8).
        base: u16,
        /// PIC input, 0-7 (COM1: 4).
        line: u8,
        /// The byte that ends it (default `~`).
        #[serde(default = "default_stop")]
        stop: u8,
    },
    /// [`guests::virtio_blk_check`]: drives the virtio-blk device whose
    /// I/O BAR is at `io_base` (a `virtio-blk:` device): with `write`,
    /// writes a pattern drawn from `seed` to `sector`, flushes, reads it
    /// back and compares; without, reads and compares only. Reports
    /// `guests::VIRTIO_CHECK_OK` when the data matched.
    VirtioBlkCheck {
        /// The device's first port.
        io_base: u16,
        /// The 512-byte sector used.
        sector: u16,
        /// Write (and flush) before reading back.
        #[serde(default)]
        write: bool,
        /// The pattern's seed.
        seed: u8,
    },
}

fn default_stop() -> u8 {
    b'~'
}

impl VmEntry {
    /// Its vCPUs: every guest kind runs on one.
    pub fn vcpus(&self) -> usize {
        1
    }
}

impl GuestEntry {
    /// Assembles the guest.
    pub fn build(&self) -> Result<Guest, GuestError> {
        match *self {
            GuestEntry::PioLoop { port, iterations } => guests::pio_loop(port, iterations),
            GuestEntry::PioReadLoop { port, iterations } => guests::pio_read_loop(port, iterations),
            GuestEntry::CheckedWrites { port, iterations } => {
                guests::checked_writes(port, iterations, 0)
            }
            GuestEntry::MmioLoop { gpa, iterations } => guests::mmio_loop(gpa, iterations),
            GuestEntry::IrqCounter {
                line,
                want,
                ack_port,
            } => guests::irq_counter(line, want, ack_port),
            GuestEntry::IrqChain {
                line,
                want,
                ack_port,
                trigger_port,
            } => guests::irq_chain(line, want, ack_port, trigger_port),
            GuestEntry::UartEcho { base, line, stop } => guests::uart_echo(base, line, stop),
            GuestEntry::VirtioBlkCheck {
                io_base,
                sector,
                write,
                seed,
            } => guests::virtio_blk_check(io_base, sector, write, seed),
        }
    }
}

/// Address space of a mapped device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceSpace {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

impl From<DeviceSpace> for Space {
    fn from(s: DeviceSpace) -> Space {
        match s {
            DeviceSpace::Pio => Space::Pio,
            DeviceSpace::Mmio => Space::Mmio,
        }
    }
}

/// Where a device runs: `"local:<kind>"`, `"remote:<server id>"`, or
/// `"virtio-blk:<server id>"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum PlaceEntry {
    /// A local model of this devmodels kind, in the vCPU threads.
    Local(String),
    /// On the `[[servers]]` entry with this id.
    Remote(u32),
    /// A virtio-blk device (its I/O BAR is the entry's port range) whose
    /// disk is a `blockstore` on the `[[servers]]` entry with this id,
    /// spoken to in bulk; the entry's `disk` says which.
    VirtioBlk(u32),
}

/// A device's `place` that is none of `local:<kind>`,
/// `remote:<server id>` and `virtio-blk:<server id>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "place {0:?} is none of \"local:<kind>\" (e.g. \"local:counter\"), \"remote:<server id>\" (e.g. \"remote:1\") and \"virtio-blk:<server id>\" (e.g. \"virtio-blk:1\")"
)]
pub struct BadPlace(pub String);

impl TryFrom<String> for PlaceEntry {
    type Error = BadPlace;

    fn try_from(text: String) -> Result<PlaceEntry, BadPlace> {
        let bad = || BadPlace(text.clone());
        match text.split_once(':') {
            Some(("local", kind)) if !kind.trim().is_empty() => {
                Ok(PlaceEntry::Local(kind.trim().to_string()))
            }
            Some(("remote", id)) => id.trim().parse().map(PlaceEntry::Remote).map_err(|_| bad()),
            Some(("virtio-blk", id)) => id
                .trim()
                .parse()
                .map(PlaceEntry::VirtioBlk)
                .map_err(|_| bad()),
            _ => Err(bad()),
        }
    }
}

/// A `[[vms.devices]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// `"pio"` or `"mmio"`.
    pub space: DeviceSpace,
    /// First port or guest-physical address.
    pub base: u64,
    /// Ports or bytes (nonzero).
    pub len: u64,
    /// Device-model id (nonzero; a remote one is the server's model id).
    pub model: u32,
    /// Writes are posted: the vCPU does not wait for their answer
    /// (default `false`).
    #[serde(default)]
    pub posted: bool,
    /// Where it runs.
    pub place: PlaceEntry,
    /// A `virtio-blk:` device's disk (required there, refused elsewhere).
    #[serde(default)]
    pub disk: Option<DiskEntry>,
}

/// `disk = { store = 31, gpa = 0x100000000000, irq = 11 }`: the disk of a
/// `virtio-blk:` device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskEntry {
    /// The `blockstore` model's id on the server.
    pub store: u32,
    /// The MMIO base the server registered it at (its register window,
    /// for the capacity; no guest RAM there).
    pub gpa: u64,
    /// The device's interrupt line (a PIC input: 1-15 but 2).
    pub irq: u8,
}

/// Why a client configuration could not be loaded, or is inconsistent.
/// Every message is one line naming the offending entry.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, a wrong type, a missing or unknown key.
    #[error("line {line}{snippet}: {message}")]
    Parse {
        /// 1-based line (0 if unknown).
        line: usize,
        /// ` (the offending line)`, or empty.
        snippet: String,
        /// What is wrong.
        message: String,
    },
    /// `client.id` is 0.
    #[error("client.id is 0: set this client platform's nonzero id")]
    ZeroClientId,
    /// An entry's id is 0.
    #[error("{kind} entry #{position} has id 0: ids must be nonzero")]
    ZeroId {
        /// `"server"` or `"vm"`.
        kind: &'static str,
        /// 1-based position in its list.
        position: usize,
    },
    /// Two entries of a list share an id.
    #[error("{kind} {id} is defined twice: give each {kind} its own id")]
    DuplicateId {
        /// `"server"` or `"vm"`.
        kind: &'static str,
        /// The id.
        id: u32,
    },
    /// A VM's hypervisor id is 0.
    #[error("vm {vm}: hypervisor is 0: set its nonzero hypervisor id")]
    ZeroHypervisor {
        /// The VM.
        vm: u32,
    },
    /// A VM's guest cannot be built with these arguments.
    #[error("vm {vm}: guest: {source}")]
    Guest {
        /// The VM.
        vm: u32,
        /// Why.
        source: GuestError,
    },
    /// A device entry is wrong.
    #[error("vm {vm}: device #{position} (model {model}): {why}")]
    Device {
        /// The VM.
        vm: u32,
        /// 1-based position in the VM's devices.
        position: usize,
        /// Its model id.
        model: u32,
        /// What is wrong.
        why: String,
    },
    /// A VM's device map is inconsistent (overlapping ranges).
    #[error("vm {vm}: devices: {source}")]
    DeviceMap {
        /// The VM.
        vm: u32,
        /// What is wrong.
        source: DevMapError,
    },
    /// No `[[vms]]` entry has this id.
    #[error("VM {0} is not in the client configuration")]
    UnknownVm(u32),
    /// `[client] horizon_ms` is out of its range.
    #[error(
        "[client] horizon_ms = {0}: must be {min}..={max} (ms a request is retried before it fails)",
        min = HORIZON_MS_RANGE.start(),
        max = HORIZON_MS_RANGE.end()
    )]
    Horizon(u64),
}

fn default_spin() -> u32 {
    DEFAULT_SPIN
}

fn default_horizon_ms() -> u64 {
    DEFAULT_HORIZON_MS
}

fn default_true() -> bool {
    true
}

fn parse_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let (line, snippet) = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let snippet = text[line_start..].lines().next().unwrap_or("").trim();
            (
                before.matches('\n').count() + 1,
                if snippet.is_empty() {
                    String::new()
                } else {
                    format!(" ({snippet})")
                },
            )
        }
        None => (0, String::new()),
    };
    ConfigError::Parse {
        line,
        snippet,
        message: e.message().trim().replace('\n', "; "),
    }
}

fn check_ids(
    kind: &'static str,
    ids: impl Iterator<Item = u32>,
) -> Result<BTreeSet<u32>, ConfigError> {
    let mut seen = BTreeSet::new();
    for (i, id) in ids.enumerate() {
        if id == 0 {
            return Err(ConfigError::ZeroId {
                kind,
                position: i + 1,
            });
        }
        if !seen.insert(id) {
            return Err(ConfigError::DuplicateId { kind, id });
        }
    }
    Ok(seen)
}

impl ClientFile {
    /// Parses and validates a configuration.
    pub fn from_toml_str(text: &str) -> Result<ClientFile, ConfigError> {
        let file: ClientFile = toml::from_str(text).map_err(|e| parse_error(text, &e))?;
        file.validate()?;
        Ok(file)
    }

    /// Reads, parses and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<ClientFile, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ClientFile::from_toml_str(&text)
    }

    /// Checks that every VM can be built: ids, guests, device entries and
    /// maps. Returns the first problem found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.client.id == 0 {
            return Err(ConfigError::ZeroClientId);
        }
        if !HORIZON_MS_RANGE.contains(&self.client.horizon_ms) {
            return Err(ConfigError::Horizon(self.client.horizon_ms));
        }
        let servers = check_ids("server", self.servers.iter().map(|s| s.id))?;
        check_ids("vm", self.vms.iter().map(|v| v.id))?;
        for vm in &self.vms {
            if vm.hypervisor == 0 {
                return Err(ConfigError::ZeroHypervisor { vm: vm.id });
            }
            vm.guest
                .build()
                .map_err(|source| ConfigError::Guest { vm: vm.id, source })?;
            let mut maps = Vec::new();
            let mut disks = 0;
            for (i, d) in vm.devices.iter().enumerate() {
                let bad = |why: String| ConfigError::Device {
                    vm: vm.id,
                    position: i + 1,
                    model: d.model,
                    why,
                };
                if d.model == 0 {
                    return Err(bad("model is 0: device-model ids are nonzero".into()));
                }
                if d.len == 0 {
                    return Err(bad("len is 0: map at least one port or byte".into()));
                }
                if d.space == DeviceSpace::Pio && d.base.saturating_add(d.len) > 0x1_0000 {
                    return Err(bad(format!(
                        "ports {:#x}+{:#x} run past 0xffff",
                        d.base, d.len
                    )));
                }
                if d.space == DeviceSpace::Pio
                    && let Some(why) = crate::kvm::in_kernel_ports_overlap(d.base, d.len)
                {
                    return Err(bad(why));
                }
                match &d.place {
                    PlaceEntry::Remote(s) | PlaceEntry::VirtioBlk(s) if !servers.contains(s) => {
                        return Err(bad(format!(
                            "server {s} does not exist: add a [[servers]] entry with id = {s}"
                        )));
                    }
                    PlaceEntry::Remote(_) | PlaceEntry::VirtioBlk(_) => {}
                    PlaceEntry::Local(kind) => {
                        registry::build(kind, ModelParams::default())
                            .map_err(|e| bad(e.to_string()))?;
                    }
                }
                match (&d.place, d.disk) {
                    (PlaceEntry::VirtioBlk(_), None) => {
                        return Err(bad(
                            "a virtio-blk device needs its disk: disk = { store = <blockstore model id>, gpa = <its MMIO base>, irq = <line> }".into(),
                        ));
                    }
                    (PlaceEntry::VirtioBlk(_), Some(disk)) => {
                        if let Some(why) =
                            crate::virtio::blk::bar_problem(d.space.into(), d.base, d.len)
                        {
                            return Err(bad(why));
                        }
                        disks += 1;
                        if disks > crate::virtio::blk::MAX_DEVICES {
                            return Err(bad(format!(
                                "more than {} virtio-blk devices (PCI device numbers 1-31)",
                                crate::virtio::blk::MAX_DEVICES
                            )));
                        }
                        if disk.store == 0 {
                            return Err(bad("disk.store is 0: model ids are nonzero".into()));
                        }
                        // One id is one model on one server: a store named
                        // twice, or also a remote device's model, would
                        // send its register window and its block requests
                        // to different places.
                        let twice = vm.devices.iter().enumerate().any(|(j, e)| {
                            j != i
                                && (e.disk.is_some_and(|k| k.store == disk.store)
                                    || (matches!(e.place, PlaceEntry::Remote(_))
                                        && e.model == disk.store))
                        });
                        if twice {
                            return Err(bad(format!(
                                "disk.store {} is named by another device of this VM: give each disk its own blockstore",
                                disk.store
                            )));
                        }
                        if disk.irq == 0 || disk.irq == 2 || disk.irq > 15 {
                            return Err(bad(format!(
                                "disk.irq = {}: a PIC input, 1-15 but 2 (0 is the PIT's, 2 the cascade)",
                                disk.irq
                            )));
                        }
                        // Its register window is mapped too.
                        maps.push(Mapping {
                            space: Space::Mmio,
                            base: disk.gpa,
                            len: crate::bus::STORE_WINDOW,
                            model: disk.store,
                            posted: true,
                            device: (),
                        });
                    }
                    (_, Some(_)) => {
                        return Err(bad(
                            "disk is only for a virtio-blk device (place = \"virtio-blk:<server id>\")"
                                .into(),
                        ));
                    }
                    (_, None) => {}
                }
                // The map only checks ranges: no device behind them.
                maps.push(Mapping {
                    space: d.space.into(),
                    base: d.base,
                    len: d.len,
                    model: d.model,
                    posted: d.posted,
                    device: (),
                });
            }
            if disks > 0 {
                // The PCI host bridge that lists the virtio-blk devices.
                maps.push(Mapping {
                    space: Space::Pio,
                    base: u64::from(crate::pci::CONFIG_ADDRESS_PORT),
                    len: crate::pci::PORTS,
                    model: 0,
                    posted: false,
                    device: (),
                });
            }
            DeviceMap::new(maps).map_err(|source| ConfigError::DeviceMap { vm: vm.id, source })?;
        }
        Ok(())
    }

    /// The VM with this id.
    pub fn vm(&self, id: u32) -> Option<&VmEntry> {
        self.vms.iter().find(|v| v.id == id)
    }

    /// A [`ClientSpec`] that runs VM `id` alone, with the servers its
    /// devices use.
    pub fn client_spec(&self, id: u32) -> Result<ClientSpec, ConfigError> {
        self.client_spec_moved(id, &std::collections::BTreeMap::new())
    }

    /// [`ClientFile::client_spec`] with the remote models of `moved`
    /// (model -> server id, each one of `[[servers]]`) on those servers
    /// instead of where the file places them: models moved between
    /// servers since the daemon started. A VM with remote devices also
    /// gets every other `[[servers]]` entry, so that a model it uses can
    /// be pointed at any of them while it runs ([`crate::vmm::Client::retarget`]).
    pub fn client_spec_moved(
        &self,
        id: u32,
        moved: &std::collections::BTreeMap<u32, u32>,
    ) -> Result<ClientSpec, ConfigError> {
        let vm = self.vm(id).ok_or(ConfigError::UnknownVm(id))?;
        let guest = vm
            .guest
            .build()
            .map_err(|source| ConfigError::Guest { vm: id, source })?;
        let mut servers: Vec<ServerSpec> = Vec::new();
        let mut devices = Vec::new();
        for (i, d) in vm.devices.iter().enumerate() {
            let bad = |why: String| ConfigError::Device {
                vm: id,
                position: i + 1,
                model: d.model,
                why,
            };
            // The index in `servers` of the server with id `sid` (of a
            // model moved there, if it moved), added on first use.
            let mut server_index = |model: u32, sid: &u32| -> Result<usize, ConfigError> {
                let sid = moved.get(&model).unwrap_or(sid);
                let entry = self
                    .servers
                    .iter()
                    .find(|s| s.id == *sid)
                    .ok_or_else(|| bad(format!("server {sid} does not exist")))?;
                Ok(match servers.iter().position(|s| s.id == *sid) {
                    Some(i) => i,
                    None => {
                        servers.push(entry.spec());
                        servers.len() - 1
                    }
                })
            };
            let place = match &d.place {
                PlaceEntry::Local(kind) => Place::Local { kind: kind.clone() },
                PlaceEntry::Remote(sid) => Place::Remote {
                    server: server_index(d.model, sid)?,
                },
                PlaceEntry::VirtioBlk(sid) => {
                    let disk = d
                        .disk
                        .ok_or_else(|| bad("a virtio-blk device needs its disk".into()))?;
                    Place::VirtioBlk {
                        irq: disk.irq,
                        disk: DiskPlace::Remote {
                            server: server_index(disk.store, sid)?,
                            model: disk.store,
                            gpa: disk.gpa,
                        },
                    }
                }
            };
            devices.push(DeviceSpec {
                space: d.space.into(),
                base: d.base,
                len: d.len,
                model: d.model,
                posted: d.posted,
                place,
            });
        }
        if !servers.is_empty() {
            for entry in &self.servers {
                if !servers.iter().any(|s| s.id == entry.id) {
                    servers.push(entry.spec());
                }
            }
        }
        let mem = guest.mem_end().next_multiple_of(0x1_0000).max(MIN_MEM);
        Ok(ClientSpec {
            client: self.client.id,
            bind: self.client.bind,
            servers,
            vms: vec![VmSpec {
                id,
                hypervisor: vm.hypervisor,
                mem_bytes: mem as usize,
                images: vec![(guest.load_gpa, guest.code)],
                vcpus: vec![VcpuSpec {
                    entry: guest.entry,
                    core: None,
                }],
                devices,
            }],
            engine: EngineConfig {
                horizon: std::time::Duration::from_millis(self.client.horizon_ms),
                tag_keys: self
                    .client
                    .tag_key
                    .clone()
                    .map(|k| devplane_wire::tag::KeyRing::new(k.0)),
                ..EngineConfig::default()
            },
            engine_core: None,
            vcpu_spin: self.client.spin,
            samples: 0,
            direct: self.client.direct,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/client.toml");

    fn err(text: &str) -> String {
        let e = ClientFile::from_toml_str(text).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    }

    const BASE: &str = "[client]\nid = 7\n\n[[servers]]\nid = 1\naddress = \"10.0.0.2:7700\"\n";

    #[test]
    fn the_example_loads_and_builds_every_vm() {
        let f = ClientFile::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(f.client.id, 7);
        assert!(f.client.direct);
        assert!(f.vms.len() >= 2);
        for vm in &f.vms {
            let spec = f.client_spec(vm.id).unwrap();
            assert_eq!(spec.vms.len(), 1);
            assert_eq!(spec.vms[0].id, vm.id);
            assert_eq!(spec.vms[0].vcpus.len(), 1);
            for d in &spec.vms[0].devices {
                if let Place::Remote { server } = d.place {
                    assert!(server < spec.servers.len());
                }
            }
        }
    }

    #[test]
    fn a_server_behind_an_owner_keeps_its_address_and_gets_the_owners() {
        let vm = "\n[[vms]]\nid = 1\nhypervisor = 2\nguest = { kind = \"pio-loop\", port = 0x500, iterations = 10 }\n\
                  [[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 11\nplace = \"remote:1\"\n";
        let f = ClientFile::from_toml_str(&format!("{BASE}via = \"10.0.0.3:7700\"\n{vm}")).unwrap();
        let spec = f.client_spec(1).unwrap();
        assert_eq!(spec.servers[0].addr, "10.0.0.2:7700".parse().unwrap());
        assert_eq!(spec.servers[0].via, Some("10.0.0.3:7700".parse().unwrap()));
        let direct = ClientFile::from_toml_str(&format!("{BASE}{vm}")).unwrap();
        assert_eq!(direct.client_spec(1).unwrap().servers[0].via, None);
        assert!(err(&format!("{BASE}via = \"nowhere\"\n{vm}")).contains("via"));
    }

    /// A VM with a virtio-blk device whose disk is a blockstore on a
    /// server: its spec, and each way the entry can be wrong.
    #[test]
    fn a_virtio_blk_device_with_its_disk_on_a_server() {
        let vm = |device: &str| {
            format!(
                "{BASE}\n[[vms]]\nid = 1\nhypervisor = 2\n\
                 guest = {{ kind = \"virtio-blk-check\", io_base = 0xc000, sector = 9, write = true, seed = 0x5a }}\n\
                 [[vms.devices]]\n{device}\n"
            )
        };
        let good = "space = \"pio\"\nbase = 0xc000\nlen = 0x80\nmodel = 4\nplace = \"virtio-blk:1\"\n\
                    disk = { store = 13, gpa = 0x100000000000, irq = 5 }";
        let f = ClientFile::from_toml_str(&vm(good)).unwrap();
        let spec = f.client_spec(1).unwrap();
        assert_eq!(spec.servers.len(), 1);
        assert_eq!(spec.servers[0].id, 1);
        assert_eq!(
            spec.vms[0].devices[0].place,
            Place::VirtioBlk {
                irq: 5,
                disk: DiskPlace::Remote {
                    server: 0,
                    model: 13,
                    gpa: 1 << 44,
                },
            }
        );
        // Its blockstore moved to another server: the disk follows.
        let two = vm(good).replace(
            "[[vms]]",
            "[[servers]]\nid = 3\naddress = \"10.0.0.3:7700\"\n\n[[vms]]",
        );
        let f = ClientFile::from_toml_str(&two).unwrap();
        let spec = f
            .client_spec_moved(1, &[(13, 3)].into_iter().collect())
            .unwrap();
        let Place::VirtioBlk {
            disk: DiskPlace::Remote { server, .. },
            ..
        } = spec.vms[0].devices[0].place
        else {
            panic!("{:?}", spec.vms[0].devices[0].place);
        };
        assert_eq!(spec.servers[server].id, 3);
        for (device, want) in [
            (
                good.replace("\ndisk = { store = 13, gpa = 0x100000000000, irq = 5 }", ""),
                "needs its disk",
            ),
            (
                good.replace("virtio-blk:1", "virtio-blk:9"),
                "server 9 does not exist",
            ),
            (
                good.replace("virtio-blk:1", "virtio-blk:x"),
                "virtio-blk:<server id>",
            ),
            (good.replace("len = 0x80", "len = 0x10"), "0x80 ports"),
            (good.replace("irq = 5", "irq = 2"), "disk.irq = 2"),
            (good.replace("irq = 5", "irq = 0"), "disk.irq = 0"),
            (
                good.replace("base = 0xc000", "base = 0xc010"),
                "not aligned to its 0x80 ports",
            ),
            (
                good.replace("base = 0xc000", "base = 0xffc0"),
                "run past 0xffff",
            ),
            (
                format!(
                    "{good}\n\n[[vms.devices]]\n{}",
                    good.replace("0xc000", "0xc080")
                        .replace("model = 4", "model = 5")
                ),
                "disk.store 13 is named by another device",
            ),
            (
                format!(
                    "{good}\n\n[[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 13\nplace = \"remote:1\""
                ),
                "disk.store 13 is named by another device",
            ),
            (
                format!(
                    "{good}\n\n[[vms.devices]]\nspace = \"pio\"\nbase = 0xcf8\nlen = 0x4\nmodel = 20\nplace = \"local:counter\""
                ),
                "devices:",
            ),
            (good.replace("irq = 5", "irq = 16"), "disk.irq = 16"),
            (good.replace("store = 13", "store = 0"), "disk.store is 0"),
            (
                good.replace("irq = 5 }", "irq = 5, size = 1 }"),
                "unknown field",
            ),
            (
                good.replace("place = \"virtio-blk:1\"", "place = \"remote:1\""),
                "disk is only for a virtio-blk device",
            ),
        ] {
            let e = err(&vm(&device));
            assert!(e.contains(want), "{want:?} not in {e:?}");
        }
        // Its register window is in the VM's map: another device there
        // overlaps it.
        let overlap = format!(
            "{good}\n\n[[vms.devices]]\nspace = \"mmio\"\nbase = 0x100000000000\nlen = 0x10\nmodel = 20\nplace = \"local:counter\""
        );
        assert!(
            err(&vm(&overlap)).contains("devices:"),
            "{}",
            err(&vm(&overlap))
        );
    }

    #[test]
    fn defaults_and_placement() {
        let f = ClientFile::from_toml_str(&format!(
            "{BASE}\n[[vms]]\nid = 1\nhypervisor = 2\nguest = {{ kind = \"pio-loop\", port = 0x500, iterations = 10 }}\n\
             [[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 11\nplace = \"remote:1\"\n\
             [[vms.devices]]\nspace = \"mmio\"\nbase = 0xd0000\nlen = 0x1000\nmodel = 12\nposted = true\nplace = \"local:counter\"\n"
        ))
        .unwrap();
        assert_eq!(f.client.spin, DEFAULT_SPIN);
        assert!(f.client.direct);
        assert_eq!(f.client.bind, None);
        assert_eq!(f.client.horizon_ms, DEFAULT_HORIZON_MS);
        let spec = f.client_spec(1).unwrap();
        assert_eq!(spec.engine.horizon, std::time::Duration::from_secs(10));
        assert!(
            !spec.engine.yield_to_vcpus,
            "the engine yields only when asked"
        );
        assert_eq!(spec.client, 7);
        assert_eq!(spec.servers.len(), 1);
        assert_eq!(spec.servers[0].addr, "10.0.0.2:7700".parse().unwrap());
        let d = &spec.vms[0].devices;
        assert_eq!(d[0].place, Place::Remote { server: 0 });
        assert!(!d[0].posted);
        assert_eq!(
            d[1].place,
            Place::Local {
                kind: "counter".into()
            }
        );
        assert!(d[1].posted);
        assert!(matches!(f.client_spec(2), Err(ConfigError::UnknownVm(2))));
    }

    #[test]
    fn the_tag_key_is_parsed_and_never_shown() {
        let with = |k: &str| BASE.replace("id = 7\n", &format!("id = 7\ntag_key = \"{k}\"\n"));
        let f = ClientFile::from_toml_str(&with("3:00112233445566778899aabbccddeeff")).unwrap();
        let key = f.client.tag_key.clone().unwrap().0;
        assert_eq!((key.id, key.bytes()[15]), (3, 0xff));
        let shown = format!("{f:?}");
        assert!(!shown.contains("445566"), "{shown}");
        for bad in [
            "0:00112233445566778899aabbccddeeff",
            "3:0011",
            "zz",
            "3:xx112233445566778899aabbccddeeff",
        ] {
            let e = ClientFile::from_toml_str(&with(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("tag_key"), "{e}");
        }
        assert!(
            ClientFile::from_toml_str(BASE)
                .unwrap()
                .client
                .tag_key
                .is_none()
        );
    }

    #[test]
    fn the_horizon_is_bounded() {
        let with = |ms: u64| BASE.replace("id = 7\n", &format!("id = 7\nhorizon_ms = {ms}\n"));
        for bad in [0, 9, 600_001] {
            let e = ClientFile::from_toml_str(&with(bad))
                .unwrap_err()
                .to_string();
            assert!(e.contains("horizon_ms") && e.contains("10..=600000"), "{e}");
        }
        // Beyond TOML's integers: refused by the parser, naming the line.
        let e = ClientFile::from_toml_str(&with(u64::MAX))
            .unwrap_err()
            .to_string();
        assert!(e.contains("horizon_ms"), "{e}");
        assert_eq!(
            ClientFile::from_toml_str(&with(250))
                .unwrap()
                .client
                .horizon_ms,
            250
        );
    }

    #[test]
    fn errors_are_one_line_and_name_the_entry() {
        let vm = |guest: &str, devices: &str| {
            format!("{BASE}\n[[vms]]\nid = 3\nhypervisor = 1\nguest = {guest}\n{devices}")
        };
        let pio = "{ kind = \"pio-loop\", port = 0x500, iterations = 10 }";
        let dev = |extra: &str| {
            format!(
                "[[vms.devices]]\nspace = \"pio\"\nbase = 0x500\nlen = 0x10\nmodel = 11\n{extra}\n"
            )
        };
        let e = err(&vm(pio, &dev("place = \"remote:9\"")));
        assert!(e.contains("vm 3") && e.contains("server 9"), "{e}");
        let e = err(&vm(pio, &dev("place = \"somewhere\"")));
        assert!(e.contains("local:<kind>") && e.contains("line"), "{e}");
        let e = err(&vm(pio, &dev("place = \"local:warp-drive\"")));
        assert!(e.contains("vm 3") && e.contains("warp-drive"), "{e}");
        let e = err(&vm(pio, &dev("place = \"remote:1\"\ncolour = \"red\"")));
        assert!(e.contains("colour"), "{e}");
        let e = err(&vm(
            "{ kind = \"pio-loop\", port = 0x500, iterations = 10, speed = 3 }",
            "",
        ));
        assert!(e.contains("speed"), "{e}");
        let e = err(&vm("{ kind = \"fork-bomb\" }", ""));
        assert!(e.contains("fork-bomb"), "{e}");
        let e = err(&vm(
            "{ kind = \"irq-counter\", line = 9, want = 1, ack_port = 0x600 }",
            "",
        ));
        assert!(e.contains("vm 3") && e.contains("guest"), "{e}");
        let e = err(&vm(
            "{ kind = \"irq-chain\", line = 9, want = 1, ack_port = 0x600, trigger_port = 0x610 }",
            "",
        ));
        assert!(e.contains("vm 3") && e.contains("guest"), "{e}");
        let e = err(&vm(
            pio,
            &format!(
                "{}{}",
                dev("place = \"remote:1\""),
                dev("place = \"local:null\"")
            ),
        ));
        assert!(e.contains("vm 3") && e.contains("overlaps"), "{e}");
        let e = err(&vm(
            pio,
            "[[vms.devices]]\nspace = \"pio\"\nbase = 0xfff0\nlen = 0x20\nmodel = 11\nplace = \"remote:1\"\n",
        ));
        assert!(e.contains("device #1") && e.contains("0xffff"), "{e}");
        let e = err(&vm(
            pio,
            "[[vms.devices]]\nspace = \"pio\"\nbase = 0x3e\nlen = 4\nmodel = 11\nplace = \"remote:1\"\n",
        ));
        assert!(
            e.contains("device #1") && e.contains("the PIT") && e.contains("0x40-0x43"),
            "{e}"
        );
        let e = err(&format!("{}{}", vm(pio, ""), vm(pio, "").replace(BASE, "")));
        assert!(e.contains("vm 3 is defined twice"), "{e}");
        let e = err("[client]\nid = 0\n");
        assert!(e.contains("client.id"), "{e}");
        let e = err("[client]\nid = 1\n[[servers]]\nid = 1\naddress = \"10.0.0.2\"\n");
        assert!(e.contains("line"), "{e}");
        let e = err("[client]\nid = 1\nbind = \"nowhere\"\n");
        assert!(e.contains("line 3"), "{e}");
    }
}
