//! The identifier database: the single source of truth of the control
//! plane.
//!
//! It holds the patent's identifiers — client platforms, hypervisors, VMs,
//! device models, servers — and how they refer to one another. It lives in
//! one JSON file, `db.json`, in a state directory, replaced atomically on
//! every change (write a temporary file in the same directory, fsync it,
//! rename it over, fsync the directory), so a crash leaves either the old
//! or the new database, never a mix.
//!
//! Every [`Change`] is validated against the whole database before it is
//! written: ids are nonzero and unique per kind, addresses are unique per
//! kind (clients, servers), every reference resolves, and an entity that
//! others still refer to cannot be removed. A refused change leaves the file
//! untouched. Every write increments the database's generation.
//!
//! The data plane reads the database only through the eBPF maps:
//! [`Db::server_config`] projects it onto one server's [`ServerConfig`] and
//! [`crate::maps::sync`] writes that into the maps. A second small file,
//! `applied.json`, records the generation last written into the maps;
//! [`commit_and_sync`] writes the database, syncs the maps, then records
//! it, so a crash between the two leaves `generation > applied` and
//! [`repair`] re-syncs at the next start ([`Db::needs_repair`]).
//!
//! Writers serialise on an advisory lock (`flock`) on `lock` in the state
//! directory and re-read the database under it, so concurrent `dpctl`
//! invocations neither lose changes nor write a stale generation. Readers
//! need no lock: the file is only ever replaced whole.
//!
//! Choices: hypervisor ids are unique across the database (not per
//! client); a VM's client is its hypervisor's client; every client and VM
//! is mirrored into every server's maps (any VM may use any server's
//! models), and a server's maps route the models it owns.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use devplane_wire::maps::{MAX_CLIENTS, MAX_MODELS, MAX_VMS, MAX_WORKERS};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{
    ClientConfig, ConfigError, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use crate::maps::{MapSyncError, MapWriter, SyncReport, sync};

/// The database file in the state directory.
pub const DB_FILE: &str = "db.json";
/// The applied-generation marker in the state directory.
pub const APPLIED_FILE: &str = "applied.json";
/// The writers' lock file in the state directory.
pub const LOCK_FILE: &str = "lock";
/// Version of the `db.json` layout.
pub const FORMAT: u32 = 1;

/// The kinds of entity in the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A client platform.
    Client,
    /// A hypervisor on a client platform.
    Hypervisor,
    /// A VM (guest).
    Vm,
    /// A device model.
    Model,
    /// A server platform.
    Server,
}

impl Kind {
    /// The name used in messages and by `dpctl` (`"client"`, `"vm"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Client => "client",
            Kind::Hypervisor => "hypervisor",
            Kind::Vm => "VM",
            Kind::Model => "model",
            Kind::Server => "server",
        }
    }

    /// The `dpctl` command group for this kind.
    pub const fn command(self) -> &'static str {
        match self {
            Kind::Client => "clients",
            Kind::Hypervisor => "hypervisors",
            Kind::Vm => "vms",
            Kind::Model => "models",
            Kind::Server => "servers",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A client platform: a host that runs VMs and sends their requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Client {
    /// Client platform id (nonzero, unique).
    pub id: u32,
    /// Its IPv4 address (unique among clients); servers drop requests
    /// that carry this client's id from elsewhere.
    pub address: Ipv4Addr,
}

/// A hypervisor on a client platform.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hypervisor {
    /// Hypervisor id (nonzero, unique in the database).
    pub id: u32,
    /// The client platform it runs on.
    pub client: u32,
}

/// Whether a VM runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Registered, not running (the state a VM is added in).
    #[default]
    Stopped,
    /// Running.
    Running,
    /// Paused; its interrupts are held until it resumes.
    Suspended,
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VmState::Stopped => "stopped",
            VmState::Running => "running",
            VmState::Suspended => "suspended",
        })
    }
}

/// A VM (guest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// VM id (nonzero, unique).
    pub id: u32,
    /// The hypervisor that runs it.
    pub hypervisor: u32,
    /// The client platform that hosts it: its hypervisor's client.
    pub client: u32,
    /// Whether it runs.
    #[serde(default)]
    pub state: VmState,
}

/// A device model, served by one worker of one server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    /// Device-model id (nonzero, unique).
    pub id: u32,
    /// Which implementation (a devmodels kind, such as `"counter"`).
    pub kind: String,
    /// The server that owns it.
    pub server: u32,
    /// Index of the owning worker on that server.
    pub worker: u32,
    /// Interrupt line (GSI) it raises, if any; needs `vm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// The VM its interrupts go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<u32>,
    /// Base I/O port, for models reached by port I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pio_base: Option<u16>,
    /// Base guest-physical address, for models reached by MMIO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio_base: Option<u64>,
    /// A file on the server the model keeps its data in (see
    /// [`crate::config::ModelConfig::backing`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<std::path::PathBuf>,
}

/// A server platform: a host that runs device models.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Server {
    /// Server platform id (nonzero, unique).
    pub id: u32,
    /// Its IPv4 address (unique among servers).
    pub address: Ipv4Addr,
}

/// One change to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Registers a client platform.
    AddClient(Client),
    /// Removes a client platform (refused while it has hypervisors or VMs).
    RemoveClient(u32),
    /// Registers a hypervisor (its client must exist).
    AddHypervisor(Hypervisor),
    /// Removes a hypervisor (refused while it runs VMs).
    RemoveHypervisor(u32),
    /// Registers a VM (its hypervisor must exist; `client` must be the
    /// hypervisor's client).
    AddVm(Vm),
    /// Removes a VM (refused while it is not stopped or a model sends it
    /// interrupts).
    RemoveVm(u32),
    /// Registers a device model (its server, and VM if any, must exist).
    AddModel(Model),
    /// Removes a device model.
    RemoveModel(u32),
    /// Registers a server platform.
    AddServer(Server),
    /// Removes a server platform (refused while it owns models).
    RemoveServer(u32),
}

impl Change {
    /// The kind of entity changed.
    pub fn kind(&self) -> Kind {
        match self {
            Change::AddClient(_) | Change::RemoveClient(_) => Kind::Client,
            Change::AddHypervisor(_) | Change::RemoveHypervisor(_) => Kind::Hypervisor,
            Change::AddVm(_) | Change::RemoveVm(_) => Kind::Vm,
            Change::AddModel(_) | Change::RemoveModel(_) => Kind::Model,
            Change::AddServer(_) | Change::RemoveServer(_) => Kind::Server,
        }
    }

    /// The id of the entity changed.
    pub fn id(&self) -> u32 {
        match self {
            Change::AddClient(c) => c.id,
            Change::AddHypervisor(h) => h.id,
            Change::AddVm(v) => v.id,
            Change::AddModel(m) => m.id,
            Change::AddServer(s) => s.id,
            Change::RemoveClient(id)
            | Change::RemoveHypervisor(id)
            | Change::RemoveVm(id)
            | Change::RemoveModel(id)
            | Change::RemoveServer(id) => *id,
        }
    }
}

/// Entities that still refer to one being removed, e.g. "VM 3, VM 4".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dependents(pub Vec<(Kind, u32)>);

impl fmt::Display for Dependents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (kind, id)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{kind} {id}")?;
        }
        Ok(())
    }
}

/// Why the database could not be opened, changed, projected or synced.
///
/// Every message is one line that names the entity and says what to do.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DbError {
    /// A file of the state directory could not be read or written.
    #[error("{}: cannot {op}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done (`"read"`, `"write"`, `"lock"`, ...).
        op: &'static str,
        /// The I/O error.
        source: io::Error,
    },
    /// A state file is not valid or is inconsistent.
    #[error("{}: {message}: restore it from a backup or fix it by hand", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The database was written by a newer devplane.
    #[error("{}: format {found} is newer than this build's {FORMAT}: upgrade devplane", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
    /// No entity of this kind has this id.
    #[error("{kind} {id} does not exist: see `dpctl {} list`", kind.command())]
    NotFound {
        /// The kind.
        kind: Kind,
        /// The id.
        id: u32,
    },
    /// An id is 0.
    #[error("{kind} id 0 is reserved: ids must be nonzero")]
    ZeroId {
        /// The kind.
        kind: Kind,
    },
    /// The id is taken.
    #[error("{kind} {id} already exists: pick another id or remove it first")]
    Duplicate {
        /// The kind.
        kind: Kind,
        /// The id.
        id: u32,
    },
    /// The address is another entity's of the same kind.
    #[error(
        "{kind} {id}: address {address} is already {kind} {owner}'s: each {kind} needs its own address"
    )]
    DuplicateAddress {
        /// Client or server.
        kind: Kind,
        /// The entity being added.
        id: u32,
        /// The address.
        address: Ipv4Addr,
        /// The entity that has it.
        owner: u32,
    },
    /// A reference to an entity that does not exist.
    #[error("{kind} {id}: {target} {target_id} does not exist: add it first with `dpctl {} add`", target.command())]
    Dangling {
        /// The referring entity's kind.
        kind: Kind,
        /// The referring entity.
        id: u32,
        /// The kind referred to.
        target: Kind,
        /// The missing id.
        target_id: u32,
    },
    /// A VM's client is not its hypervisor's client.
    #[error(
        "VM {vm}: client {client} is not hypervisor {hypervisor}'s client ({expected}): a VM runs on its hypervisor's client"
    )]
    WrongClient {
        /// The VM.
        vm: u32,
        /// The client given.
        client: u32,
        /// The hypervisor.
        hypervisor: u32,
        /// The hypervisor's client.
        expected: u32,
    },
    /// The entity is still referred to.
    #[error("{kind} {id} still {verb} {dependents}: remove or move {} first", if .dependents.0.len() == 1 { "it" } else { "them" })]
    InUse {
        /// The kind being removed.
        kind: Kind,
        /// The id being removed.
        id: u32,
        /// How it is referred to: `"hosts"`, `"owns"`, `"receives interrupts from"`.
        verb: &'static str,
        /// Who refers to it.
        dependents: Dependents,
    },
    /// A VM that is not stopped cannot be removed.
    #[error("VM {id} is {state}: shut it down before removing it")]
    NotStopped {
        /// The VM.
        id: u32,
        /// Its state.
        state: VmState,
    },
    /// A model's kind is empty.
    #[error("model {id}: kind is empty: name a device model kind, e.g. counter")]
    EmptyKind {
        /// The model.
        id: u32,
    },
    /// A model's worker index is past what any server supports.
    #[error("model {id}: worker {worker} is out of range: a server has at most {MAX_WORKERS} workers (0 to {})", MAX_WORKERS - 1)]
    WorkerRange {
        /// The model.
        id: u32,
        /// The worker given.
        worker: u32,
    },
    /// A model has an interrupt line but no VM to deliver it to.
    #[error(
        "model {id}: line {line} is set but vm is not: name the VM that receives its interrupts"
    )]
    LineWithoutVm {
        /// The model.
        id: u32,
        /// The line.
        line: u32,
    },
    /// More entities than the data plane's maps hold.
    #[error("{kind}s are at the data plane's limit of {max}: remove one first")]
    Full {
        /// The kind.
        kind: Kind,
        /// The limit.
        max: u32,
    },
    /// The database does not fit a server's configuration (e.g. a model
    /// names a worker the server does not have).
    #[error("the database does not fit server {server}'s config: {source}")]
    Config {
        /// The server.
        server: u32,
        /// What does not fit.
        source: Box<ConfigError>,
    },
    /// The database was written but the maps could not be synced.
    #[error(
        "generation {generation} is saved but the maps are not updated ({source}): fix that, then repair (it also runs at the next start)"
    )]
    Sync {
        /// The generation saved.
        generation: u64,
        /// Why the sync failed.
        source: Box<MapSyncError>,
    },
}

impl DbError {
    /// Whether the error is about an id that does not exist (an unknown
    /// id named directly, not a dangling reference).
    pub fn is_not_found(&self) -> bool {
        matches!(self, DbError::NotFound { .. })
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> DbError + 'a {
    move |source| DbError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The database's contents, each list sorted by id.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// Client platforms.
    #[serde(default)]
    pub clients: Vec<Client>,
    /// Hypervisors.
    #[serde(default)]
    pub hypervisors: Vec<Hypervisor>,
    /// VMs.
    #[serde(default)]
    pub vms: Vec<Vm>,
    /// Device models.
    #[serde(default)]
    pub models: Vec<Model>,
    /// Server platforms.
    #[serde(default)]
    pub servers: Vec<Server>,
}

/// The `db.json` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DbFile {
    format: u32,
    generation: u64,
    #[serde(flatten)]
    state: State,
}

/// The `applied.json` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppliedFile {
    applied_generation: u64,
}

fn insert_sorted<T>(list: &mut Vec<T>, item: T, id: impl Fn(&T) -> u32) {
    let pos = list.partition_point(|x| id(x) < id(&item));
    list.insert(pos, item);
}

fn remove_id<T>(
    list: &mut Vec<T>,
    kind: Kind,
    id: u32,
    key: impl Fn(&T) -> u32,
) -> Result<T, DbError> {
    match list.iter().position(|x| key(x) == id) {
        Some(i) => Ok(list.remove(i)),
        None => Err(DbError::NotFound { kind, id }),
    }
}

impl State {
    /// The client with this id.
    pub fn client(&self, id: u32) -> Option<&Client> {
        self.clients.iter().find(|c| c.id == id)
    }

    /// The hypervisor with this id.
    pub fn hypervisor(&self, id: u32) -> Option<&Hypervisor> {
        self.hypervisors.iter().find(|h| h.id == id)
    }

    /// The VM with this id.
    pub fn vm(&self, id: u32) -> Option<&Vm> {
        self.vms.iter().find(|v| v.id == id)
    }

    /// The model with this id.
    pub fn model(&self, id: u32) -> Option<&Model> {
        self.models.iter().find(|m| m.id == id)
    }

    /// The server with this id.
    pub fn server(&self, id: u32) -> Option<&Server> {
        self.servers.iter().find(|s| s.id == id)
    }

    /// Whether an entity of `kind` has this id.
    pub fn contains(&self, kind: Kind, id: u32) -> bool {
        match kind {
            Kind::Client => self.client(id).is_some(),
            Kind::Hypervisor => self.hypervisor(id).is_some(),
            Kind::Vm => self.vm(id).is_some(),
            Kind::Model => self.model(id).is_some(),
            Kind::Server => self.server(id).is_some(),
        }
    }

    /// Everything that refers to entity `kind` `id`, in id order per kind.
    pub fn dependents(&self, kind: Kind, id: u32) -> Vec<(Kind, u32)> {
        let mut out = Vec::new();
        match kind {
            Kind::Client => {
                out.extend(
                    self.hypervisors
                        .iter()
                        .filter(|h| h.client == id)
                        .map(|h| (Kind::Hypervisor, h.id)),
                );
                out.extend(
                    self.vms
                        .iter()
                        .filter(|v| v.client == id)
                        .map(|v| (Kind::Vm, v.id)),
                );
            }
            Kind::Hypervisor => out.extend(
                self.vms
                    .iter()
                    .filter(|v| v.hypervisor == id)
                    .map(|v| (Kind::Vm, v.id)),
            ),
            Kind::Vm => out.extend(
                self.models
                    .iter()
                    .filter(|m| m.vm == Some(id))
                    .map(|m| (Kind::Model, m.id)),
            ),
            Kind::Server => out.extend(
                self.models
                    .iter()
                    .filter(|m| m.server == id)
                    .map(|m| (Kind::Model, m.id)),
            ),
            Kind::Model => {}
        }
        out
    }

    /// The state with `change` made, if it is valid.
    pub fn changed(&self, change: &Change) -> Result<State, DbError> {
        let mut next = self.clone();
        let kind = change.kind();
        let id = change.id();
        let is_add = matches!(
            change,
            Change::AddClient(_)
                | Change::AddHypervisor(_)
                | Change::AddVm(_)
                | Change::AddModel(_)
                | Change::AddServer(_)
        );
        if is_add {
            if id == 0 {
                return Err(DbError::ZeroId { kind });
            }
            if self.contains(kind, id) {
                return Err(DbError::Duplicate { kind, id });
            }
        } else {
            if !self.contains(kind, id) {
                return Err(DbError::NotFound { kind, id });
            }
            let deps = self.dependents(kind, id);
            if !deps.is_empty() {
                let verb = match kind {
                    Kind::Client | Kind::Hypervisor => "hosts",
                    Kind::Server => "owns",
                    Kind::Vm => "receives interrupts from",
                    Kind::Model => unreachable!("nothing refers to a model"),
                };
                return Err(DbError::InUse {
                    kind,
                    id,
                    verb,
                    dependents: Dependents(deps),
                });
            }
        }
        match change {
            Change::AddClient(c) => insert_sorted(&mut next.clients, c.clone(), |x| x.id),
            Change::AddHypervisor(h) => insert_sorted(&mut next.hypervisors, h.clone(), |x| x.id),
            Change::AddVm(v) => insert_sorted(&mut next.vms, v.clone(), |x| x.id),
            Change::AddModel(m) => insert_sorted(&mut next.models, m.clone(), |x| x.id),
            Change::AddServer(s) => insert_sorted(&mut next.servers, s.clone(), |x| x.id),
            Change::RemoveClient(id) => {
                remove_id(&mut next.clients, kind, *id, |x| x.id)?;
            }
            Change::RemoveHypervisor(id) => {
                remove_id(&mut next.hypervisors, kind, *id, |x| x.id)?;
            }
            Change::RemoveVm(id) => {
                let vm = remove_id(&mut next.vms, kind, *id, |x| x.id)?;
                if vm.state != VmState::Stopped {
                    return Err(DbError::NotStopped {
                        id: vm.id,
                        state: vm.state,
                    });
                }
            }
            Change::RemoveModel(id) => {
                remove_id(&mut next.models, kind, *id, |x| x.id)?;
            }
            Change::RemoveServer(id) => {
                remove_id(&mut next.servers, kind, *id, |x| x.id)?;
            }
        }
        next.validate()?;
        Ok(next)
    }

    /// Checks every invariant; returns the first violation found.
    pub fn validate(&self) -> Result<(), DbError> {
        fn ids<T>(
            list: &[T],
            kind: Kind,
            max: u32,
            id: impl Fn(&T) -> u32,
        ) -> Result<BTreeSet<u32>, DbError> {
            let mut seen = BTreeSet::new();
            for x in list {
                let id = id(x);
                if id == 0 {
                    return Err(DbError::ZeroId { kind });
                }
                if !seen.insert(id) {
                    return Err(DbError::Duplicate { kind, id });
                }
            }
            if list.len() > max as usize {
                return Err(DbError::Full { kind, max });
            }
            Ok(seen)
        }
        fn addresses<'a>(
            kind: Kind,
            list: impl Iterator<Item = (u32, &'a Ipv4Addr)>,
        ) -> Result<(), DbError> {
            let mut seen = BTreeMap::new();
            for (id, addr) in list {
                if let Some(&owner) = seen.get(addr) {
                    return Err(DbError::DuplicateAddress {
                        kind,
                        id,
                        address: *addr,
                        owner,
                    });
                }
                seen.insert(*addr, id);
            }
            Ok(())
        }
        let dangling = |kind, id, target, target_id| DbError::Dangling {
            kind,
            id,
            target,
            target_id,
        };

        let clients = ids(&self.clients, Kind::Client, MAX_CLIENTS, |c| c.id)?;
        ids(&self.hypervisors, Kind::Hypervisor, u32::MAX, |h| h.id)?;
        let vms = ids(&self.vms, Kind::Vm, MAX_VMS, |v| v.id)?;
        ids(&self.models, Kind::Model, u32::MAX, |m| m.id)?;
        let servers = ids(&self.servers, Kind::Server, u32::MAX, |s| s.id)?;
        addresses(
            Kind::Client,
            self.clients.iter().map(|c| (c.id, &c.address)),
        )?;
        addresses(
            Kind::Server,
            self.servers.iter().map(|s| (s.id, &s.address)),
        )?;

        for h in &self.hypervisors {
            if !clients.contains(&h.client) {
                return Err(dangling(Kind::Hypervisor, h.id, Kind::Client, h.client));
            }
        }
        for v in &self.vms {
            let Some(h) = self.hypervisor(v.hypervisor) else {
                return Err(dangling(Kind::Vm, v.id, Kind::Hypervisor, v.hypervisor));
            };
            if v.client != h.client {
                return Err(DbError::WrongClient {
                    vm: v.id,
                    client: v.client,
                    hypervisor: h.id,
                    expected: h.client,
                });
            }
        }
        let mut per_server: BTreeMap<u32, u32> = BTreeMap::new();
        for m in &self.models {
            if m.kind.trim().is_empty() {
                return Err(DbError::EmptyKind { id: m.id });
            }
            if !servers.contains(&m.server) {
                return Err(dangling(Kind::Model, m.id, Kind::Server, m.server));
            }
            if m.worker >= MAX_WORKERS {
                return Err(DbError::WorkerRange {
                    id: m.id,
                    worker: m.worker,
                });
            }
            match (m.vm, m.line) {
                (Some(vm), _) if !vms.contains(&vm) => {
                    return Err(dangling(Kind::Model, m.id, Kind::Vm, vm));
                }
                (None, Some(line)) => return Err(DbError::LineWithoutVm { id: m.id, line }),
                _ => {}
            }
            let n = per_server.entry(m.server).or_default();
            *n += 1;
            if *n > MAX_MODELS {
                return Err(DbError::Full {
                    kind: Kind::Model,
                    max: MAX_MODELS,
                });
            }
        }
        Ok(())
    }
}

/// What the maps of one server need besides the database: the server's
/// own settings (its id is `server.id`) and whether frames go to AF_XDP
/// sockets ([`crate::maps::sync`]'s `redirect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSettings {
    /// The `[server]` table.
    pub server: ServerSection,
    /// The `[tuning]` table.
    pub tuning: Tuning,
    /// Redirect routed frames to AF_XDP sockets.
    pub redirect: bool,
}

impl ServerSettings {
    /// The settings of a server config (its client, VM and model lists
    /// are ignored: the database supplies them).
    pub fn from_config(cfg: &ServerConfig, redirect: bool) -> Self {
        ServerSettings {
            server: cfg.server.clone(),
            tuning: cfg.tuning,
            redirect,
        }
    }
}

/// The identifier database of one state directory.
#[derive(Debug)]
pub struct Db {
    dir: PathBuf,
    generation: u64,
    applied: u64,
    state: State,
}

/// An exclusive `flock` on the state directory's lock file, held while
/// alive.
struct Lock {
    _file: File,
}

impl Lock {
    fn take(dir: &Path) -> Result<Lock, DbError> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open"))?;
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io_err(&path, "lock")(io::Error::last_os_error()));
        }
        Ok(Lock { _file: file })
    }
}

impl Db {
    /// Opens the database in `dir`, creating the directory and an empty
    /// database (generation 0) if there is none. A database that does not
    /// parse or breaks an invariant is refused ([`DbError::Corrupt`]).
    pub fn open(dir: impl AsRef<Path>) -> Result<Db, DbError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(io_err(&dir, "create directory"))?;
        let mut db = Db {
            dir,
            generation: 0,
            applied: 0,
            state: State::default(),
        };
        if !db.reload()? {
            let _lock = Lock::take(&db.dir)?;
            if !db.reload()? {
                db.write_db(0, &State::default())?;
            }
        }
        Ok(db)
    }

    /// Re-reads both files; `false` if there is no `db.json`.
    fn reload(&mut self) -> Result<bool, DbError> {
        let path = self.dir.join(DB_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io_err(&path, "read")(e)),
        };
        let corrupt = |message: String| DbError::Corrupt {
            path: path.clone(),
            message,
        };
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        let found = value.get("format").and_then(|f| f.as_u64()).unwrap_or(0);
        if found > u64::from(FORMAT) {
            return Err(DbError::Format {
                path,
                found: u32::try_from(found).unwrap_or(u32::MAX),
            });
        }
        let file: DbFile = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        file.state.validate().map_err(|e| corrupt(e.to_string()))?;
        self.generation = file.generation;
        self.state = file.state;

        let apath = self.dir.join(APPLIED_FILE);
        self.applied = match fs::read_to_string(&apath) {
            Ok(text) => {
                let a: AppliedFile = serde_json::from_str(&text).map_err(|e| DbError::Corrupt {
                    path: apath.clone(),
                    message: e.to_string(),
                })?;
                a.applied_generation
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_err(&apath, "read")(e)),
        };
        Ok(true)
    }

    fn write_db(&mut self, generation: u64, state: &State) -> Result<(), DbError> {
        let file = DbFile {
            format: FORMAT,
            generation,
            state: state.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("the database serialises");
        text.push('\n');
        write_atomic(&self.dir, DB_FILE, text.as_bytes())?;
        self.generation = generation;
        self.state = file.state;
        Ok(())
    }

    fn write_applied(&mut self, generation: u64) -> Result<(), DbError> {
        let mut text = serde_json::to_string(&AppliedFile {
            applied_generation: generation,
        })
        .expect("the marker serialises");
        text.push('\n');
        write_atomic(&self.dir, APPLIED_FILE, text.as_bytes())?;
        self.applied = generation;
        Ok(())
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The contents.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// Incremented by every write; 0 for a new database.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The generation last written into the maps (0 if never).
    pub fn applied_generation(&self) -> u64 {
        self.applied
    }

    /// Whether the database is newer than the maps: a change was saved but
    /// the maps were not (or not known to be) updated. [`repair`] fixes it.
    pub fn needs_repair(&self) -> bool {
        self.generation > self.applied
    }

    /// Validates `change` against the current database without writing.
    pub fn check(&self, change: &Change) -> Result<(), DbError> {
        self.state.changed(change).map(drop)
    }

    /// Validates `change` and, if valid, writes it (generation + 1). A
    /// refused change leaves the file as it was. Re-reads the file under
    /// the writers' lock first, so changes by other processes are kept.
    /// The maps are not touched: see [`commit_and_sync`].
    pub fn apply(&mut self, change: Change) -> Result<(), DbError> {
        let _lock = Lock::take(&self.dir)?;
        self.apply_locked(&change, None)
    }

    fn apply_locked(
        &mut self,
        change: &Change,
        fits: Option<&ServerSettings>,
    ) -> Result<(), DbError> {
        self.reload()?;
        let next = self.state.changed(change)?;
        if let Some(settings) = fits {
            project(&next, settings)?
                .validate()
                .map_err(|source| DbError::Config {
                    server: settings.server.id,
                    source: Box::new(source),
                })?;
        }
        self.write_db(self.generation + 1, &next)
    }

    /// The configuration of server `settings.server.id` that
    /// [`crate::maps::sync`] writes into its maps: every client and VM,
    /// and the models that server owns. The server must be in the database
    /// and the result must validate (e.g. every model's worker exists).
    pub fn server_config(&self, settings: &ServerSettings) -> Result<ServerConfig, DbError> {
        let cfg = project(&self.state, settings)?;
        cfg.validate().map_err(|source| DbError::Config {
            server: settings.server.id,
            source: Box::new(source),
        })?;
        Ok(cfg)
    }

    /// Records that the maps hold the current generation.
    pub fn mark_applied(&mut self) -> Result<(), DbError> {
        let _lock = Lock::take(&self.dir)?;
        self.write_applied(self.generation)
    }
}

fn project(state: &State, settings: &ServerSettings) -> Result<ServerConfig, DbError> {
    let id = settings.server.id;
    if state.server(id).is_none() {
        return Err(DbError::NotFound {
            kind: Kind::Server,
            id,
        });
    }
    Ok(ServerConfig {
        server: settings.server.clone(),
        tuning: settings.tuning,
        clients: state
            .clients
            .iter()
            .map(|c| ClientConfig {
                id: c.id,
                address: c.address,
            })
            .collect(),
        vms: state
            .vms
            .iter()
            .map(|v| VmConfig {
                id: v.id,
                client: v.client,
                hypervisor: v.hypervisor,
            })
            .collect(),
        models: state
            .models
            .iter()
            .filter(|m| m.server == id)
            .map(|m| ModelConfig {
                id: m.id,
                kind: m.kind.clone(),
                worker: m.worker as usize,
                line: m.line,
                vm: m.vm,
                pio_base: m.pio_base,
                mmio_base: m.mmio_base,
                backing: m.backing.clone(),
            })
            .collect(),
    })
}

/// Validates `change` (against the database and against the server's
/// settings), writes it, syncs the server's maps, then records the applied
/// generation. If the sync fails the database keeps the change and
/// [`Db::needs_repair`] is true until [`repair`] succeeds.
pub fn commit_and_sync(
    db: &mut Db,
    change: Change,
    settings: &ServerSettings,
    w: &mut impl MapWriter,
) -> Result<SyncReport, DbError> {
    let _lock = Lock::take(&db.dir)?;
    db.apply_locked(&change, Some(settings))?;
    sync_locked(db, settings, w)
}

fn sync_locked(
    db: &mut Db,
    settings: &ServerSettings,
    w: &mut impl MapWriter,
) -> Result<SyncReport, DbError> {
    let cfg = db.server_config(settings)?;
    let report = sync(&cfg, settings.redirect, w).map_err(|source| DbError::Sync {
        generation: db.generation,
        source: Box::new(source),
    })?;
    db.write_applied(db.generation)?;
    Ok(report)
}

/// At start-up: if the database is newer than the maps
/// ([`Db::needs_repair`]), syncs the maps to it and records the applied
/// generation. Returns what the sync changed, or `None` if nothing was
/// needed.
pub fn repair(
    db: &mut Db,
    settings: &ServerSettings,
    w: &mut impl MapWriter,
) -> Result<Option<SyncReport>, DbError> {
    let _lock = Lock::take(&db.dir)?;
    db.reload()?;
    if !db.needs_repair() {
        return Ok(None);
    }
    sync_locked(db, settings, w).map(Some)
}

/// Restores a server's maps from the database unconditionally (e.g. on a
/// fresh bpffs after a reboot, where the maps are empty whatever the
/// marker says), and records the applied generation.
pub fn restore(
    db: &mut Db,
    settings: &ServerSettings,
    w: &mut impl MapWriter,
) -> Result<SyncReport, DbError> {
    let _lock = Lock::take(&db.dir)?;
    db.reload()?;
    sync_locked(db, settings, w)
}

/// Replaces `dir/name` with `bytes` atomically: a temporary file in `dir`,
/// fsync, rename over, fsync `dir`. On failure the temporary file is
/// removed and `dir/name` is as it was.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), DbError> {
    let target = dir.join(name);
    // Unique per process and call, so that concurrent writers never share
    // a temporary file.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp.{}.{seq}", std::process::id()));
    let write = || -> Result<(), DbError> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io_err(&tmp, "create"))?;
        f.write_all(bytes).map_err(io_err(&tmp, "write"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync"))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(io_err(&target, "replace"))?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}
