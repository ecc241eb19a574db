//! The database's contents ([`State`]) and the rules every change is
//! checked against.

use super::*;

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
pub(crate) struct DbFile {
    pub(crate) format: u32,
    pub(crate) generation: u64,
    #[serde(flatten)]
    pub(crate) state: State,
}

/// The `applied.json` file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AppliedFile {
    pub(crate) applied_generation: u64,
}

pub(crate) fn insert_sorted<T>(list: &mut Vec<T>, item: T, id: impl Fn(&T) -> u32) {
    let pos = list.partition_point(|x| id(x) < id(&item));
    list.insert(pos, item);
}

pub(crate) fn remove_id<T>(
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
                    .filter(|m| m.server == id || m.via == Some(id))
                    .map(|m| (Kind::Model, m.id)),
            ),
            Kind::Model => {}
        }
        out
    }

    /// The state with `change` made, if it is valid.
    pub fn changed(&self, change: &Change) -> Result<State, DbError> {
        let mut next = self.clone();
        next.make(change)?;
        next.validate()?;
        Ok(next)
    }

    /// The state with every change of `changes` made in order, validated
    /// once at the end (a bulk import: linear in the size of the state,
    /// where [`State::changed`] per change would be quadratic). Each
    /// change's own checks (ids, references in use) still run in order.
    pub fn changed_many(&self, changes: &[Change]) -> Result<State, DbError> {
        let mut next = self.clone();
        for change in changes {
            next.make(change)?;
        }
        next.validate()?;
        Ok(next)
    }

    /// Makes `change` in place after its own checks; the caller validates
    /// the result (on an error `self` may be half-changed: callers work
    /// on a copy).
    fn make(&mut self, change: &Change) -> Result<(), DbError> {
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
        } else if !self.contains(kind, id) {
            return Err(DbError::NotFound { kind, id });
        } else if !matches!(
            change,
            Change::SetClientBudget(..)
                | Change::SetClientKey(..)
                | Change::PlaceVm { .. }
                | Change::SetVmState(..)
                | Change::PlaceModel { .. }
                | Change::ForwardModel { .. }
        ) {
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
        if let Change::AddModel(m) = change
            && !m.kind.trim().is_empty()
            && !devplane_devmodels::registry::KINDS.contains(&m.kind.as_str())
        {
            return Err(DbError::UnknownModelKind {
                kind: m.kind.clone(),
            });
        }
        match change {
            Change::AddClient(c) => insert_sorted(&mut self.clients, c.clone(), |x| x.id),
            Change::AddHypervisor(h) => insert_sorted(&mut self.hypervisors, h.clone(), |x| x.id),
            Change::AddVm(v) => insert_sorted(&mut self.vms, v.clone(), |x| x.id),
            Change::AddModel(m) => insert_sorted(&mut self.models, m.clone(), |x| x.id),
            Change::AddServer(s) => insert_sorted(&mut self.servers, s.clone(), |x| x.id),
            Change::RemoveClient(id) => {
                remove_id(&mut self.clients, kind, *id, |x| x.id)?;
            }
            Change::SetClientBudget(id, budget) => {
                if budget.burst > devplane_wire::maps::MAX_BURST {
                    return Err(DbError::Config {
                        server: 0,
                        source: Box::new(crate::config::ConfigError::OutOfRange {
                            key: "clients.budget.burst",
                            value: budget.burst.into(),
                            min: 0,
                            max: devplane_wire::maps::MAX_BURST.into(),
                        }),
                    });
                }
                if let Some(c) = self.clients.iter_mut().find(|c| c.id == *id) {
                    c.budget = (budget.burst > 0).then_some(*budget);
                }
            }
            Change::SetClientKey(id, key) => {
                if let Some(c) = self.clients.iter_mut().find(|c| c.id == *id) {
                    c.tag_key = key.clone();
                }
            }
            Change::RemoveHypervisor(id) => {
                remove_id(&mut self.hypervisors, kind, *id, |x| x.id)?;
            }
            Change::RemoveVm(id) => {
                let vm = remove_id(&mut self.vms, kind, *id, |x| x.id)?;
                if vm.state != VmState::Stopped {
                    return Err(DbError::NotStopped {
                        id: vm.id,
                        state: vm.state,
                    });
                }
            }
            Change::RemoveModel(id) => {
                remove_id(&mut self.models, kind, *id, |x| x.id)?;
            }
            Change::RemoveServer(id) => {
                remove_id(&mut self.servers, kind, *id, |x| x.id)?;
            }
            Change::PlaceVm { vm, hypervisor } => {
                let Some(h) = self.hypervisor(*hypervisor).cloned() else {
                    return Err(DbError::Dangling {
                        kind,
                        id,
                        target: Kind::Hypervisor,
                        target_id: *hypervisor,
                    });
                };
                if let Some(v) = self.vms.iter_mut().find(|v| v.id == *vm) {
                    v.hypervisor = h.id;
                    v.client = h.client;
                }
            }
            Change::SetVmState(vm, state) => {
                if let Some(v) = self.vms.iter_mut().find(|v| v.id == *vm) {
                    v.state = *state;
                }
            }
            Change::PlaceModel {
                model,
                server,
                worker,
            } => {
                if let Some(m) = self.models.iter_mut().find(|m| m.id == *model) {
                    m.server = *server;
                    m.worker = *worker;
                }
            }
            Change::ForwardModel { model, via } => {
                if let Some(m) = self.models.iter_mut().find(|m| m.id == *model) {
                    m.via = *via;
                }
            }
        }
        Ok(())
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
            if let Some(via) = m.via {
                if !servers.contains(&via) {
                    return Err(dangling(Kind::Model, m.id, Kind::Server, via));
                }
                if via == m.server {
                    return Err(DbError::ForwardToItself {
                        id: m.id,
                        server: via,
                    });
                }
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
