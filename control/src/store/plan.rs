//! What an agent must do to follow the store (pure code: the agents'
//! I/O only carries the plans out).
//!
//! - [`server_plan`]: from what a running server holds (its
//!   [`ServerConfig`]) to what the store says it should hold
//!   ([`crate::db::Db::server_config`]'s projection): clients and keys,
//!   VMs (new, or sent to another client), device models to drop, move
//!   to another worker, or start.
//! - [`client_plan`]: from the VMs a client daemon runs to the VMs the
//!   store places on its platform, in the state the store asks for.
//! - [`KeyRoll`]: a client key the store replaced, carried out by each
//!   agent over a grace period so that no datagram in flight is refused.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use devplane_wire::tag::{KeyRing, TagKey};

use crate::config::{ClientConfig, ClientKey, ModelConfig, ServerConfig, VmConfig};
use crate::db::{State, VmState};

/// What a server does to follow the store, in this order: clients and
/// keys, VMs, models (remove, move, add), then the VMs and clients gone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerPlan {
    /// Clients new or changed (address, budget).
    pub upsert_clients: Vec<ClientConfig>,
    /// Clients whose tag key changed (`None`: now untagged).
    pub keys: Vec<(u32, Option<ClientKey>)>,
    /// VMs new or on another client now.
    pub upsert_vms: Vec<VmConfig>,
    /// Models to stop serving (gone, or changed in more than the worker:
    /// they are then also in `add_models`).
    pub remove_models: Vec<u32>,
    /// Models to move to another worker (state kept).
    pub move_models: Vec<(u32, usize)>,
    /// Models to start serving.
    pub add_models: Vec<ModelConfig>,
    /// VMs gone.
    pub remove_vms: Vec<u32>,
    /// Clients gone.
    pub remove_clients: Vec<u32>,
}

impl ServerPlan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        *self == ServerPlan::default()
    }

    /// How many steps.
    pub fn len(&self) -> usize {
        self.upsert_clients.len()
            + self.keys.len()
            + self.upsert_vms.len()
            + self.remove_models.len()
            + self.move_models.len()
            + self.add_models.len()
            + self.remove_vms.len()
            + self.remove_clients.len()
    }
}

/// The plan from `have` to `want` (same server; its settings are not
/// compared: they come from its own file).
pub fn server_plan(have: &ServerConfig, want: &ServerConfig) -> ServerPlan {
    let mut p = ServerPlan::default();
    let hc: BTreeMap<u32, &ClientConfig> = have.clients.iter().map(|c| (c.id, c)).collect();
    let wc: BTreeMap<u32, &ClientConfig> = want.clients.iter().map(|c| (c.id, c)).collect();
    for (id, w) in &wc {
        match hc.get(id) {
            None => {
                p.upsert_clients.push((*w).clone());
                if w.tag_key.is_some() {
                    p.keys.push((*id, w.tag_key.clone()));
                }
            }
            Some(h) => {
                if h.address != w.address || h.budget != w.budget {
                    p.upsert_clients.push((*w).clone());
                }
                if h.tag_key != w.tag_key {
                    p.keys.push((*id, w.tag_key.clone()));
                }
            }
        }
    }
    p.remove_clients = hc
        .keys()
        .filter(|id| !wc.contains_key(id))
        .copied()
        .collect();

    let hv: BTreeMap<u32, &VmConfig> = have.vms.iter().map(|v| (v.id, v)).collect();
    let wv: BTreeMap<u32, &VmConfig> = want.vms.iter().map(|v| (v.id, v)).collect();
    for (id, w) in &wv {
        if hv.get(id) != Some(w) {
            p.upsert_vms.push((*w).clone());
        }
    }
    p.remove_vms = hv
        .keys()
        .filter(|id| !wv.contains_key(id))
        .copied()
        .collect();

    let hm: BTreeMap<u32, &ModelConfig> = have.models.iter().map(|m| (m.id, m)).collect();
    let wm: BTreeMap<u32, &ModelConfig> = want.models.iter().map(|m| (m.id, m)).collect();
    for (id, h) in &hm {
        match wm.get(id) {
            None => p.remove_models.push(*id),
            Some(w) if w == h => {}
            Some(w) => {
                let mut same_but_worker = (*h).clone();
                same_but_worker.worker = w.worker;
                if same_but_worker == **w {
                    p.move_models.push((*id, w.worker));
                } else {
                    p.remove_models.push(*id);
                    p.add_models.push((*w).clone());
                }
            }
        }
    }
    for (id, w) in &wm {
        if !hm.contains_key(id) {
            p.add_models.push((*w).clone());
        }
    }
    p
}

/// How a VM runs on a client daemon now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Local {
    /// Its vCPUs run.
    Running,
    /// Held (suspended).
    Suspended,
    /// Its guest ended by itself (not launched again while the store
    /// still asks for it: a guest that ends is not restarted).
    Exited,
}

/// One step of a client daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientStep {
    /// Start the VM, its remote devices placed on these servers (model
    /// id -> server id, from the store).
    Launch(u32, BTreeMap<u32, u32>),
    /// Hold its vCPUs.
    Suspend(u32),
    /// Run its vCPUs again.
    Resume(u32),
    /// Stop it (stopped in the store, placed elsewhere, or removed).
    Shutdown(u32),
}

/// Where the store places the models of VM `vm` that name it: model id ->
/// server id.
pub fn vm_placement(state: &State, vm: u32) -> BTreeMap<u32, u32> {
    state
        .models
        .iter()
        .filter(|m| m.vm == Some(vm))
        .map(|m| (m.id, m.server))
        .collect()
}

/// The plan of client platform `client`: `running` is what the daemon
/// runs now, `known` the VMs its configuration file can build. Also the
/// problems the agent reports (a VM placed here that it cannot build).
pub fn client_plan(
    state: &State,
    client: u32,
    running: &BTreeMap<u32, Local>,
    known: &BTreeSet<u32>,
) -> (Vec<ClientStep>, Vec<String>) {
    let mut steps = Vec::new();
    let mut problems = Vec::new();
    let mine: BTreeMap<u32, VmState> = state
        .vms
        .iter()
        .filter(|v| v.client == client)
        .map(|v| (v.id, v.state))
        .collect();
    for (&id, &local) in running {
        match mine.get(&id) {
            None | Some(VmState::Stopped) => steps.push(ClientStep::Shutdown(id)),
            Some(_) if local == Local::Exited => {}
            Some(VmState::Running) if local == Local::Suspended => {
                steps.push(ClientStep::Resume(id))
            }
            Some(VmState::Suspended) if local == Local::Running => {
                steps.push(ClientStep::Suspend(id))
            }
            Some(_) => {}
        }
    }
    for (&id, &want) in &mine {
        if want == VmState::Stopped || running.contains_key(&id) {
            continue;
        }
        if !known.contains(&id) {
            problems.push(format!(
                "VM {id} is placed on client {client} ({want}) but this daemon's \
                 configuration has no [[vms]] entry for it"
            ));
            continue;
        }
        steps.push(ClientStep::Launch(id, vm_placement(state, id)));
        if want == VmState::Suspended {
            steps.push(ClientStep::Suspend(id));
        }
    }
    (steps, problems)
}

/// The forward routes the store asks of owner server `owner`: for each
/// model whose `via` names it (and that another server hosts), the I/O
/// server's id and address.
pub fn forwards_of(state: &State, owner: u32) -> BTreeMap<u32, (u32, std::net::Ipv4Addr)> {
    state
        .models
        .iter()
        .filter(|m| m.via == Some(owner) && m.server != owner)
        .filter_map(|m| Some((m.id, (m.server, state.server(m.server)?.address))))
        .collect()
}

/// How long agents still accept a client's previous key after the store
/// gave it a new one (`dpctl clients rotate-key` with an etcd store): long
/// enough for every agent to learn the new key and for datagrams sealed
/// under the old one to arrive.
pub const KEY_GRACE: Duration = Duration::from_secs(2);

/// How long a client agent keeps sealing with the old key after it learnt
/// the new one (accepting both meanwhile): the servers learn the new key
/// from the same store revision within about as long, and a datagram
/// sealed under a key its server does not hold yet would be refused.
pub const KEY_LEAD: Duration = Duration::from_millis(500);

/// A client key replaced in the store, as an agent carries it out: from
/// `old` to `new` (either may be `None`: untagged), `elapsed` after it
/// learnt the change. Pure: the agents call it on their own clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRoll {
    /// The key before.
    pub old: Option<TagKey>,
    /// The key the store holds now.
    pub new: Option<TagKey>,
}

impl KeyRoll {
    /// The keys a server verifies with (and answers under the request's):
    /// both during [`KEY_GRACE`], then only the new one. A first key, or
    /// none, applies at once (an untagged datagram has no key to keep).
    pub fn server_ring(&self, elapsed: Duration) -> Option<KeyRing> {
        let new = self.new.clone()?;
        Some(match &self.old {
            Some(old) if *old != new && elapsed < KEY_GRACE => KeyRing {
                current: new,
                previous: Some(old.clone()),
            },
            _ => KeyRing::new(new),
        })
    }

    /// The keys a client seals with (`current`) and accepts: the old one
    /// sealing for [`KEY_LEAD`], then the new one, both accepted until
    /// [`KEY_GRACE`], then only the new one.
    pub fn client_ring(&self, elapsed: Duration) -> Option<KeyRing> {
        let new = self.new.clone()?;
        Some(match &self.old {
            Some(old) if *old != new && elapsed < KEY_LEAD => KeyRing {
                current: old.clone(),
                previous: Some(new),
            },
            Some(old) if *old != new && elapsed < KEY_GRACE => KeyRing {
                current: new,
                previous: Some(old.clone()),
            },
            _ => KeyRing::new(new),
        })
    }

    /// Whether nothing changes any more after `elapsed`.
    pub fn settled(&self, elapsed: Duration) -> bool {
        elapsed >= KEY_GRACE
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::db::{Change, Client, Hypervisor, Model, Server, Vm};

    fn model(id: u32, worker: usize) -> ModelConfig {
        ModelConfig {
            id,
            kind: "counter".into(),
            worker,
            line: None,
            vm: None,
            pio_base: Some(0x500),
            mmio_base: None,
            backing: None,
        }
    }

    fn cfg(
        models: Vec<ModelConfig>,
        vms: Vec<VmConfig>,
        clients: Vec<ClientConfig>,
    ) -> ServerConfig {
        let mut c =
            ServerConfig::from_toml_str("[server]\nid = 1\nmode = \"socket\"\nworkers = [0, 1]\n")
                .unwrap();
        c.models = models;
        c.vms = vms;
        c.clients = clients;
        c
    }

    fn client(id: u32) -> ClientConfig {
        ClientConfig {
            tag_key: None,
            id,
            address: Ipv4Addr::new(10, 0, 0, id as u8),
            budget: None,
        }
    }

    fn vm(id: u32, client: u32) -> VmConfig {
        VmConfig {
            id,
            client,
            hypervisor: client * 10,
        }
    }

    #[test]
    fn an_unchanged_server_has_nothing_to_do() {
        let c = cfg(vec![model(42, 0)], vec![vm(1, 7)], vec![client(7)]);
        assert!(server_plan(&c, &c).is_empty());
    }

    #[test]
    fn a_worker_change_is_a_move_anything_else_a_restart_of_the_model() {
        let have = cfg(
            vec![model(42, 0), model(43, 0), model(44, 0)],
            vec![],
            vec![],
        );
        let mut changed = model(43, 0);
        changed.kind = "echo".into();
        let want = cfg(
            vec![model(42, 1), changed.clone(), model(45, 1)],
            vec![],
            vec![],
        );
        let p = server_plan(&have, &want);
        assert_eq!(p.move_models, vec![(42, 1)]);
        assert_eq!(p.remove_models, vec![43, 44]);
        assert_eq!(p.add_models, vec![changed, model(45, 1)]);
    }

    #[test]
    fn vms_follow_their_client_and_clients_their_keys() {
        let have = cfg(vec![], vec![vm(1, 7), vm(2, 7)], vec![client(7), client(9)]);
        let mut keyed = client(8);
        keyed.tag_key = ClientKey::parse("1:00112233445566778899aabbccddeeff");
        let want = cfg(
            vec![],
            vec![vm(1, 8), vm(3, 7)],
            vec![client(7), keyed.clone()],
        );
        let p = server_plan(&have, &want);
        assert_eq!(p.upsert_clients, vec![keyed.clone()]);
        assert_eq!(p.keys, vec![(8, keyed.tag_key)]);
        assert_eq!(p.upsert_vms, vec![vm(1, 8), vm(3, 7)]);
        assert_eq!(p.remove_vms, vec![2]);
        assert_eq!(p.remove_clients, vec![9]);
        assert_eq!(p.len(), 6);
    }

    fn state() -> State {
        State::default()
            .changed_many(&[
                Change::AddClient(Client {
                    id: 7,
                    address: Ipv4Addr::new(10, 0, 0, 7),
                    budget: None,
                    tag_key: None,
                }),
                Change::AddClient(Client {
                    id: 8,
                    address: Ipv4Addr::new(10, 0, 0, 8),
                    budget: None,
                    tag_key: None,
                }),
                Change::AddHypervisor(Hypervisor { id: 70, client: 7 }),
                Change::AddHypervisor(Hypervisor { id: 80, client: 8 }),
                Change::AddServer(Server {
                    id: 2,
                    address: Ipv4Addr::new(10, 0, 0, 2),
                }),
                Change::AddVm(Vm {
                    id: 1,
                    hypervisor: 70,
                    client: 7,
                    state: VmState::Running,
                }),
                Change::AddVm(Vm {
                    id: 2,
                    hypervisor: 70,
                    client: 7,
                    state: VmState::Stopped,
                }),
                Change::AddModel(Model {
                    id: 42,
                    kind: "counter".into(),
                    server: 2,
                    worker: 0,
                    line: None,
                    vm: Some(1),
                    pio_base: Some(0x500),
                    mmio_base: None,
                    backing: None,
                    via: None,
                }),
            ])
            .unwrap()
    }

    #[test]
    fn a_client_launches_what_is_placed_on_it_and_stops_the_rest() {
        let s = state();
        let known: BTreeSet<u32> = [1, 2].into();
        let (steps, problems) = client_plan(&s, 7, &BTreeMap::new(), &known);
        assert_eq!(steps, vec![ClientStep::Launch(1, [(42, 2)].into())]);
        assert!(problems.is_empty());
        // Running there already: nothing.
        let running: BTreeMap<u32, Local> = [(1, Local::Running)].into();
        assert_eq!(client_plan(&s, 7, &running, &known).0, vec![]);
        // Moved to client 8: 7 stops it, 8 starts it (if it knows it).
        let moved = s
            .changed(&Change::PlaceVm {
                vm: 1,
                hypervisor: 80,
            })
            .unwrap();
        assert_eq!(
            client_plan(&moved, 7, &running, &known).0,
            vec![ClientStep::Shutdown(1)]
        );
        assert_eq!(
            client_plan(&moved, 8, &BTreeMap::new(), &known).0,
            vec![ClientStep::Launch(1, [(42, 2)].into())]
        );
        let (steps, problems) = client_plan(&moved, 8, &BTreeMap::new(), &BTreeSet::new());
        assert!(steps.is_empty());
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn a_client_follows_suspend_resume_and_stop() {
        let s = state();
        let known: BTreeSet<u32> = [1].into();
        let running: BTreeMap<u32, Local> = [(1, Local::Running)].into();
        let held = s
            .changed(&Change::SetVmState(1, VmState::Suspended))
            .unwrap();
        assert_eq!(
            client_plan(&held, 7, &running, &known).0,
            vec![ClientStep::Suspend(1)]
        );
        let suspended: BTreeMap<u32, Local> = [(1, Local::Suspended)].into();
        assert_eq!(
            client_plan(&s, 7, &suspended, &known).0,
            vec![ClientStep::Resume(1)]
        );
        let stopped = s.changed(&Change::SetVmState(1, VmState::Stopped)).unwrap();
        assert_eq!(
            client_plan(&stopped, 7, &running, &known).0,
            vec![ClientStep::Shutdown(1)]
        );
        // A guest that ended by itself is not launched again; stopping it
        // in the store clears it.
        let exited: BTreeMap<u32, Local> = [(1, Local::Exited)].into();
        assert_eq!(client_plan(&s, 7, &exited, &known).0, vec![]);
        assert_eq!(
            client_plan(&stopped, 7, &exited, &known).0,
            vec![ClientStep::Shutdown(1)]
        );
    }

    #[test]
    fn a_key_roll_overlaps_the_old_and_new_key_then_retires_the_old() {
        let k = |id| TagKey::new(id, [id; 16]);
        let roll = KeyRoll {
            old: Some(k(1)),
            new: Some(k(2)),
        };
        let ms = Duration::from_millis;
        // The server accepts both at once, answers under the request's.
        let s = roll.server_ring(ms(0)).unwrap();
        assert_eq!((s.current, s.previous), (k(2), Some(k(1))));
        // The client seals with the old key first, then the new.
        let c = roll.client_ring(ms(0)).unwrap();
        assert_eq!((c.current, c.previous), (k(1), Some(k(2))));
        let c = roll.client_ring(KEY_LEAD).unwrap();
        assert_eq!((c.current, c.previous), (k(2), Some(k(1))));
        assert!(!roll.settled(KEY_GRACE - ms(1)));
        // After the grace only the new key.
        for r in [roll.server_ring(KEY_GRACE), roll.client_ring(KEY_GRACE)] {
            assert_eq!(r, Some(KeyRing::new(k(2))));
        }
        assert!(roll.settled(KEY_GRACE));
        // A first key, a removed key, the same key: at once.
        let first = KeyRoll {
            old: None,
            new: Some(k(1)),
        };
        assert_eq!(first.client_ring(ms(0)), Some(KeyRing::new(k(1))));
        assert_eq!(first.server_ring(ms(0)), Some(KeyRing::new(k(1))));
        let gone = KeyRoll {
            old: Some(k(1)),
            new: None,
        };
        assert_eq!(gone.client_ring(ms(0)), None);
        let same = KeyRoll {
            old: Some(k(1)),
            new: Some(k(1)),
        };
        assert_eq!(same.client_ring(ms(0)), Some(KeyRing::new(k(1))));
    }
}
