//! The entities of the database and the changes made to them.

use super::*;

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
    /// Its datagram budget at the servers' XDP programs (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<crate::config::Budget>,
    /// Its tag key (`"ID:HEX"`): its datagrams and its servers' answers
    /// and interrupts carry a tag under it. None: untagged. Set by
    /// `dpctl clients rotate-key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_key: Option<crate::config::ClientKey>,
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
    /// An owner server that receives this model's requests from clients
    /// and forwards them to `server` (the I/O server hosting it), which
    /// answers the clients straight (the patent's Fig. 6). None: clients
    /// send to `server` directly. Set by `dpctl models forward|unforward`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<u32>,
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
    /// Sets a client platform's budget (`burst` 0: none).
    SetClientBudget(u32, crate::config::Budget),
    /// Sets (or with `None` removes) a client platform's tag key.
    SetClientKey(u32, Option<crate::config::ClientKey>),
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
    /// Places a VM on another hypervisor (and so that hypervisor's client
    /// platform): the client agents stop it where it ran and start it
    /// there; servers send its interrupts to the new client.
    PlaceVm {
        /// The VM.
        vm: u32,
        /// Its new hypervisor (must exist).
        hypervisor: u32,
    },
    /// Sets the state a VM should be in; its client agent follows.
    SetVmState(u32, VmState),
    /// Places a device model on another server and worker (its server
    /// must exist); the server agents drop it and start it there.
    PlaceModel {
        /// The model.
        model: u32,
        /// Its new server.
        server: u32,
        /// The worker on that server.
        worker: u32,
    },
    /// Has clients reach a device model through an owner server that
    /// forwards its requests (`Some`), or straight (`None`); the owner's
    /// agent installs or removes its forward route.
    ForwardModel {
        /// The model.
        model: u32,
        /// The owner server (must exist and not be the model's server).
        via: Option<u32>,
    },
}

impl Change {
    /// The kind of entity changed.
    pub fn kind(&self) -> Kind {
        match self {
            Change::AddClient(_)
            | Change::RemoveClient(_)
            | Change::SetClientBudget(..)
            | Change::SetClientKey(..) => Kind::Client,
            Change::AddHypervisor(_) | Change::RemoveHypervisor(_) => Kind::Hypervisor,
            Change::AddVm(_)
            | Change::RemoveVm(_)
            | Change::PlaceVm { .. }
            | Change::SetVmState(..) => Kind::Vm,
            Change::AddModel(_)
            | Change::RemoveModel(_)
            | Change::PlaceModel { .. }
            | Change::ForwardModel { .. } => Kind::Model,
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
            | Change::SetClientBudget(id, _)
            | Change::SetClientKey(id, _)
            | Change::RemoveHypervisor(id)
            | Change::RemoveVm(id)
            | Change::RemoveModel(id)
            | Change::RemoveServer(id)
            | Change::SetVmState(id, _) => *id,
            Change::PlaceVm { vm, .. } => *vm,
            Change::PlaceModel { model, .. } | Change::ForwardModel { model, .. } => *model,
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
