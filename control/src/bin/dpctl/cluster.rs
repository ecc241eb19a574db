//! `--store`: the database commands against the identifier store
//! ([`devplane_control::store`]), and `status` with the agents.
//!
//! With `--store etcd:...` every listing reads etcd and every change is
//! one validated etcd transaction; the agents follow it (no daemon socket
//! is needed for placement). With `--store file:DIR` the commands are
//! the `--state DIR` ones, and `status` also shows the agents.

use devplane_control::store::{self, AgentInfo, AgentKind, Snapshot, Store, StoreError, StoreUrl};

use super::*;

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::of(e.is_not_found(), e.to_string())
    }
}

/// The state directory of the classic (file) commands: `--store file:DIR`
/// or `--state`.
pub(super) fn state_dir(cli: &Cli) -> &std::path::Path {
    match &cli.store {
        Some(StoreUrl::File(dir)) => dir,
        _ => &cli.state,
    }
}

/// What a database command lists or shows: (kind, one id or all).
pub(super) fn view(cmd: &Command) -> Option<(Kind, Option<u32>)> {
    Some(match cmd {
        Command::Clients(ClientsCmd::List) => (Kind::Client, None),
        Command::Clients(ClientsCmd::Show(a)) => (Kind::Client, Some(a.id)),
        Command::Hypervisors(HypervisorsCmd::List) => (Kind::Hypervisor, None),
        Command::Hypervisors(HypervisorsCmd::Show(a)) => (Kind::Hypervisor, Some(a.id)),
        Command::Vms(VmsCmd::List) => (Kind::Vm, None),
        Command::Vms(VmsCmd::Show(a)) => (Kind::Vm, Some(a.id)),
        Command::Models(ModelsCmd::List) => (Kind::Model, None),
        Command::Models(ModelsCmd::Show(a)) => (Kind::Model, Some(a.id)),
        Command::Servers(ServersCmd::List) => (Kind::Server, None),
        Command::Servers(ServersCmd::Show(a)) => (Kind::Server, Some(a.id)),
        _ => return None,
    })
}

/// The change a database command asks for (reading `s` where it needs
/// to: a VM's client is its hypervisor's).
pub(super) fn change_of(cmd: &Command, s: &State) -> Option<Result<Change, Failure>> {
    Some(Ok(match cmd {
        Command::Clients(ClientsCmd::Add {
            id,
            address,
            no_key,
        }) => Change::AddClient(Client {
            id: id.id,
            address: *address,
            budget: None,
            tag_key: if *no_key {
                None
            } else {
                match super::keys::random_key(1) {
                    Ok(k) => Some(devplane_control::config::ClientKey(k)),
                    Err(e) => return Some(Err(e)),
                }
            },
        }),
        Command::Clients(ClientsCmd::Remove(a)) => Change::RemoveClient(a.id),
        Command::Clients(ClientsCmd::Budget { id, rate, burst }) => Change::SetClientBudget(
            id.id,
            Budget {
                rate: *rate,
                burst: *burst,
            },
        ),
        Command::Hypervisors(HypervisorsCmd::Add { id, client }) => {
            Change::AddHypervisor(Hypervisor {
                id: id.id,
                client: *client,
            })
        }
        Command::Hypervisors(HypervisorsCmd::Remove(a)) => Change::RemoveHypervisor(a.id),
        Command::Vms(VmsCmd::Add { id, hypervisor }) => {
            let Some(h) = s.hypervisor(*hypervisor) else {
                return Some(Err(DbError::Dangling {
                    kind: Kind::Vm,
                    id: id.id,
                    target: Kind::Hypervisor,
                    target_id: *hypervisor,
                }
                .into()));
            };
            Change::AddVm(Vm {
                id: id.id,
                hypervisor: h.id,
                client: h.client,
                state: VmState::Stopped,
            })
        }
        Command::Vms(VmsCmd::Remove(a)) => Change::RemoveVm(a.id),
        Command::Vms(VmsCmd::Place { id, hypervisor }) => Change::PlaceVm {
            vm: id.id,
            hypervisor: *hypervisor,
        },
        Command::Vms(VmsCmd::SetState { id, want }) => Change::SetVmState(id.id, *want),
        Command::Models(ModelsCmd::Add {
            id,
            kind,
            server,
            worker,
            line,
            vm,
            pio_base,
            mmio_base,
            backing,
        }) => Change::AddModel(Model {
            id: id.id,
            kind: kind.clone(),
            server: *server,
            worker: *worker,
            line: *line,
            vm: *vm,
            pio_base: *pio_base,
            mmio_base: *mmio_base,
            backing: backing.clone(),
            via: None,
        }),
        Command::Models(ModelsCmd::Remove(a)) => Change::RemoveModel(a.id),
        Command::Models(ModelsCmd::Place { id, server, worker }) => Change::PlaceModel {
            model: id.id,
            server: *server,
            worker: *worker,
        },
        Command::Models(ModelsCmd::Forward {
            id,
            owner: Some(owner),
            ..
        }) => Change::ForwardModel {
            model: id.id,
            via: Some(*owner),
        },
        Command::Models(ModelsCmd::Unforward(a)) => Change::ForwardModel {
            model: a.id,
            via: None,
        },
        Command::Servers(ServersCmd::Add { id, address }) => Change::AddServer(Server {
            id: id.id,
            address: *address,
        }),
        Command::Servers(ServersCmd::Remove(a)) => Change::RemoveServer(a.id),
        _ => return None,
    }))
}

/// Handles the database commands with `--store etcd:...`, and `status`
/// with any `--store`; `None` for the rest (the classic path, on
/// [`state_dir`]).
pub(super) fn run(cli: &Cli) -> Result<Option<String>, Failure> {
    let Some(url) = &cli.store else {
        return Ok(None);
    };
    let etcd = matches!(url, StoreUrl::Etcd(_));
    let is_status =
        matches!(cli.command, Command::Status) || (etcd && matches!(cli.command, Command::Init));
    if !etcd && !is_status {
        return Ok(None);
    }
    if etcd && cli.apply_to.is_some() {
        return Err(Failure {
            code: EXIT_USAGE,
            message: "--apply-to is for the file database (--state): with --store etcd:... \
                      the server agents follow the store by themselves"
                .into(),
        });
    }
    let mut s = store::open(url)?;
    if let Command::Clients(ClientsCmd::RotateKey {
        id, server_sockets, ..
    }) = &cli.command
    {
        if !server_sockets.is_empty() {
            return Err(Failure {
                code: EXIT_USAGE,
                message: "--server-socket is for --state: with --store etcd:... the agents \
                          take the new key from the store by themselves"
                    .into(),
            });
        }
        return rotate_key(&mut *s, id.id, cli.json).map(Some);
    }
    if let Command::Clients(ClientsCmd::ExportKey(id)) = &cli.command {
        let snap = s.load()?;
        return super::keys::export(&snap.state, id.id, cli.json).map(Some);
    }
    let json = cli.json;
    if is_status {
        return Ok(Some(status(&mut *s, json)?));
    }
    if let Some((kind, id)) = view(&cli.command) {
        let snap = s.load()?;
        return Ok(Some(match id {
            None => list(&snap.state, kind, json),
            Some(id) => show(&snap.state, kind, id, json)?,
        }));
    }
    let snap = s.load()?;
    let Some(change) = change_of(&cli.command, &snap.state) else {
        return Ok(None);
    };
    let change = change?;
    let (kind, id) = (change.kind(), change.id());
    let action = action_of(&change);
    let revision = s.apply(&change)?;
    if json {
        return Ok(Some(to_json(&json!({
            "action": action,
            "kind": kind,
            "id": id,
            "revision": revision,
        }))));
    }
    Ok(Some(format!(
        "{} {kind} {id} (revision {revision})\n",
        done_of(action)
    )))
}

/// `clients rotate-key` on the etcd store: the new key is one store
/// change; every agent takes it from there (servers accept the old and
/// the new key, client agents keep sealing with the old one for a moment
/// and then with the new, and after the agents' grace period only the new
/// key is accepted: `devplane_control::store::plan::KeyRoll`).
fn rotate_key(s: &mut dyn Store, client: u32, json: bool) -> Result<String, Failure> {
    let snap = s.load()?;
    let old = snap
        .state
        .client(client)
        .ok_or(DbError::NotFound {
            kind: Kind::Client,
            id: client,
        })?
        .tag_key
        .clone();
    let new = devplane_control::config::ClientKey(keys::random_key(keys::next_id(old.as_ref()))?);
    let revision = s.apply(&Change::SetClientKey(client, Some(new.clone())))?;
    let fingerprint = new.0.fingerprint().to_string();
    if json {
        return Ok(to_json(&json!({
            "action": "rotate-key",
            "client": client,
            "key_id": new.0.id,
            "fingerprint": fingerprint,
            "previous_key_id": old.map(|k| k.0.id),
            "revision": revision,
        })));
    }
    Ok(format!(
        "client {client} now has key {} ({fingerprint}){} (revision {revision}); the agents \
         take it from the store\n",
        new.0.id,
        match old {
            Some(k) => format!(", key {} retired after the agents' grace period", k.0.id),
            None => String::new(),
        }
    ))
}

/// One row of the agents table: a platform of the state, or an agent
/// that reported.
struct Row {
    kind: AgentKind,
    id: u32,
    agent: Option<AgentInfo>,
}

fn rows(snap: &Snapshot, agents: Vec<AgentInfo>) -> Vec<Row> {
    let mut rows: Vec<Row> = snap
        .state
        .servers
        .iter()
        .map(|x| (AgentKind::Server, x.id))
        .chain(snap.state.clients.iter().map(|x| (AgentKind::Client, x.id)))
        .map(|(kind, id)| Row {
            kind,
            id,
            agent: None,
        })
        .collect();
    for a in agents {
        match rows
            .iter_mut()
            .find(|r| r.kind == a.report.kind && r.id == a.report.id)
        {
            Some(r) => r.agent = Some(a),
            None => rows.push(Row {
                kind: a.report.kind,
                id: a.report.id,
                agent: Some(a),
            }),
        }
    }
    rows.sort_by_key(|r| (r.kind, r.id));
    rows
}

fn status(s: &mut dyn Store, json: bool) -> Result<String, Failure> {
    let snap = s.load()?;
    let agents = s.agents()?;
    let size = s.size_bytes()?;
    let rows = rows(&snap, agents);
    let up = |r: &Row| r.agent.as_ref().is_some_and(|a| a.alive);
    let lag = |r: &Row| {
        r.agent
            .as_ref()
            .map(|a| snap.revision.saturating_sub(a.report.applied))
    };
    let st = &snap.state;
    if json {
        let agents: Vec<Value> = rows
            .iter()
            .map(|r| {
                json!({
                    "kind": r.kind.name(),
                    "id": r.id,
                    "up": up(r),
                    "applied": r.agent.as_ref().map(|a| a.report.applied),
                    "lag": lag(r),
                    "error": r.agent.as_ref().and_then(|a| a.report.error.clone()),
                    "age_ms": r.agent.as_ref().map(|a| store::now_ms().saturating_sub(a.report.at_ms)),
                })
            })
            .collect();
        return Ok(to_json(&json!({
            "store": s.url().to_string(),
            "revision": snap.revision,
            "size_bytes": size,
            "clients": st.clients.len(),
            "hypervisors": st.hypervisors.len(),
            "vms": st.vms.len(),
            "models": st.models.len(),
            "servers": st.servers.len(),
            "agents": agents,
        })));
    }
    let mut out = key_values(&[
        ("store", s.url().to_string()),
        ("revision", snap.revision.to_string()),
        ("size", format!("{size} bytes")),
        ("clients", st.clients.len().to_string()),
        ("hypervisors", st.hypervisors.len().to_string()),
        ("vms", st.vms.len().to_string()),
        ("models", st.models.len().to_string()),
        ("servers", st.servers.len().to_string()),
    ]);
    out.push('\n');
    out.push_str(&table(
        &["AGENT", "ID", "STATE", "APPLIED", "LAG", "ERROR"],
        rows.iter()
            .map(|r| {
                vec![
                    r.kind.name().to_string(),
                    r.id.to_string(),
                    if up(r) { "up" } else { "down" }.to_string(),
                    opt(r.agent.as_ref().map(|a| a.report.applied)),
                    opt(lag(r)),
                    r.agent
                        .as_ref()
                        .and_then(|a| a.report.error.clone())
                        .unwrap_or_else(|| "-".into()),
                ]
            })
            .collect(),
    ));
    Ok(out)
}
