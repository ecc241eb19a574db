//! Mirroring a [`ServerConfig`] into the data plane's eBPF maps.
//!
//! [`sync`] writes the configuration's clients, VMs and routes and the
//! program's settings through a [`MapWriter`], and removes entries the maps
//! hold but the configuration no longer names, so running it again after a
//! change converges the maps on the new configuration while traffic flows.
//!
//! Writers: [`AyaMaps`] for the kernel maps (pinned under the server's
//! `pin_dir`, or taken from a loaded `aya::Ebpf`), and [`MemMaps`], an
//! in-memory stand-in for tests.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use devplane_wire::maps::{
    CLIENTS_MAP, CONFIG_CHECK_CLIENT, CONFIG_MAP, CONFIG_REDIRECT, ClientEntry, Config,
    ROUTE_LOCAL, ROUTES_MAP, Route, VMS_MAP, VmEntry,
};
use thiserror::Error;

use crate::config::{ClientConfig, ConfigError, ModelConfig, ServerConfig, VmConfig};

/// Why the maps could not be opened, read or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum MapSyncError {
    /// The configuration is inconsistent; nothing was written.
    #[error("refusing to sync an invalid config: {0}")]
    Invalid(#[from] ConfigError),
    /// A pinned map could not be opened.
    #[error(
        "cannot open pinned map {}: {source}: check that the server is running with this pin_dir and that you are root",
        path.display()
    )]
    Open {
        /// The pin path.
        path: PathBuf,
        /// aya's error.
        source: MapError,
    },
    /// Reading or writing a map failed.
    #[error("{map}: cannot {op}{}: {source}", key_suffix(*.key))]
    Map {
        /// The map's name ([`ROUTES_MAP`], ...).
        map: &'static str,
        /// What was being done: `"insert"`, `"remove"`, `"read"`, `"list"`.
        op: &'static str,
        /// The key involved, if any.
        key: Option<u32>,
        /// aya's error.
        source: MapError,
    },
}

fn key_suffix(key: Option<u32>) -> String {
    key.map(|k| format!(" key {k}")).unwrap_or_default()
}

fn map_err(
    map: &'static str,
    op: &'static str,
    key: Option<u32>,
) -> impl Fn(MapError) -> MapSyncError {
    move |source| MapSyncError::Map {
        map,
        op,
        key,
        source,
    }
}

/// Somewhere [`sync`] can write the data plane's tables: the kernel maps
/// ([`AyaMaps`]) or memory ([`MemMaps`]).
///
/// `put_*` inserts or overwrites; `remove_*` of an absent key succeeds.
pub trait MapWriter {
    /// Writes the program's settings ([`CONFIG_MAP`] index 0).
    fn set_config(&mut self, cfg: Config) -> Result<(), MapSyncError>;
    /// Inserts or replaces the route of device model `model`.
    fn put_route(&mut self, model: u32, route: Route) -> Result<(), MapSyncError>;
    /// Removes the route of device model `model`.
    fn remove_route(&mut self, model: u32) -> Result<(), MapSyncError>;
    /// Inserts or replaces client `id`.
    fn put_client(&mut self, id: u32, entry: ClientEntry) -> Result<(), MapSyncError>;
    /// Removes client `id`.
    fn remove_client(&mut self, id: u32) -> Result<(), MapSyncError>;
    /// Inserts or replaces VM `id`.
    fn put_vm(&mut self, id: u32, entry: VmEntry) -> Result<(), MapSyncError>;
    /// Removes VM `id`.
    fn remove_vm(&mut self, id: u32) -> Result<(), MapSyncError>;
    /// The device-model ids that have a route.
    fn route_ids(&self) -> Result<Vec<u32>, MapSyncError>;
    /// The client ids present.
    fn client_ids(&self) -> Result<Vec<u32>, MapSyncError>;
    /// The VM ids present.
    fn vm_ids(&self) -> Result<Vec<u32>, MapSyncError>;
}

/// What [`sync`] changed, over the routes, clients and VMs maps (the
/// settings entry is always rewritten and not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncReport {
    /// Entries inserted whose key was absent.
    pub added: usize,
    /// Entries rewritten whose key was present (whether or not the value
    /// changed).
    pub updated: usize,
    /// Entries removed because the configuration no longer names them.
    pub removed: usize,
}

impl fmt::Display for SyncReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} added, {} updated, {} removed",
            self.added, self.updated, self.removed
        )
    }
}

/// The [`CONFIG_MAP`] entry for `cfg`: its port and server id, with
/// [`CONFIG_CHECK_CLIENT`] if `server.check_clients` and
/// [`CONFIG_REDIRECT`] if `redirect` (frames go to AF_XDP sockets rather than
/// to the stack).
pub fn config_entry(cfg: &ServerConfig, redirect: bool) -> Config {
    let mut flags = 0;
    if cfg.server.check_clients {
        flags |= CONFIG_CHECK_CLIENT;
    }
    if redirect {
        flags |= CONFIG_REDIRECT;
    }
    Config {
        port: cfg.server.port,
        pad: 0,
        server: cfg.server.id,
        flags,
    }
}

/// The [`ROUTES_MAP`] entry for a model of `cfg`: served locally by its
/// worker.
pub fn route_entry(cfg: &ServerConfig, model: &ModelConfig) -> Route {
    Route {
        // validate() bounds worker by MAX_WORKERS.
        worker: model.worker as u32,
        server: cfg.server.id,
        flags: ROUTE_LOCAL,
        ..Route::default()
    }
}

/// The [`CLIENTS_MAP`] entry for a client.
pub fn client_entry(client: &ClientConfig) -> ClientEntry {
    let budget = client.budget.unwrap_or_default();
    ClientEntry {
        ip: client.address.octets(),
        flags: 0,
        rate: budget.rate,
        burst: budget.burst,
    }
}

/// The [`VMS_MAP`] entry for a VM.
pub fn vm_entry(vm: &VmConfig) -> VmEntry {
    VmEntry {
        client: vm.client,
        hypervisor: vm.hypervisor,
        flags: 0,
    }
}

/// Makes the maps behind `w` mirror `cfg`.
///
/// Validates `cfg` first (nothing is written if it is inconsistent). Then
/// removes the routes, VMs and clients that `cfg` no longer names (first,
/// so that a full map has room for new entries), writes clients, VMs and
/// routes, and writes the settings entry last (so a freshly loaded
/// program, which drops everything until its settings exist, starts with
/// complete tables). `redirect` sets [`CONFIG_REDIRECT`].
///
/// The maps are owned by the configuration: an entry's flags are rewritten
/// from it on every sync.
pub fn sync(
    cfg: &ServerConfig,
    redirect: bool,
    w: &mut impl MapWriter,
) -> Result<SyncReport, MapSyncError> {
    sync_keeping(cfg, redirect, w, &BTreeSet::new())
}

/// [`sync`], leaving the routes of the models in `keep` alone (an owner
/// server's forward routes, which its configuration does not name).
pub fn sync_keeping(
    cfg: &ServerConfig,
    redirect: bool,
    w: &mut impl MapWriter,
    keep: &BTreeSet<u32>,
) -> Result<SyncReport, MapSyncError> {
    cfg.validate()?;
    let mut report = SyncReport::default();

    let old_clients: BTreeSet<u32> = w.client_ids()?.into_iter().collect();
    let old_vms: BTreeSet<u32> = w.vm_ids()?.into_iter().collect();
    let old_routes: BTreeSet<u32> = w.route_ids()?.into_iter().collect();
    let routes: BTreeSet<u32> = cfg.models.iter().map(|m| m.id).collect();
    for &id in old_routes.difference(&routes) {
        if keep.contains(&id) {
            continue;
        }
        w.remove_route(id)?;
        report.removed += 1;
    }
    let vms: BTreeSet<u32> = cfg.vms.iter().map(|v| v.id).collect();
    for &id in old_vms.difference(&vms) {
        w.remove_vm(id)?;
        report.removed += 1;
    }
    let clients: BTreeSet<u32> = cfg.clients.iter().map(|c| c.id).collect();
    for &id in old_clients.difference(&clients) {
        w.remove_client(id)?;
        report.removed += 1;
    }
    let mut tally = |existed: bool| {
        if existed {
            report.updated += 1;
        } else {
            report.added += 1;
        }
    };
    for c in &cfg.clients {
        w.put_client(c.id, client_entry(c))?;
        tally(old_clients.contains(&c.id));
    }
    for v in &cfg.vms {
        w.put_vm(v.id, vm_entry(v))?;
        tally(old_vms.contains(&v.id));
    }
    for m in &cfg.models {
        w.put_route(m.id, route_entry(cfg, m))?;
        tally(old_routes.contains(&m.id));
    }
    w.set_config(config_entry(cfg, redirect))?;

    Ok(report)
}

/// In-memory maps, for tests and dry runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemMaps {
    /// [`ROUTES_MAP`].
    pub routes: BTreeMap<u32, Route>,
    /// [`CLIENTS_MAP`].
    pub clients: BTreeMap<u32, ClientEntry>,
    /// [`VMS_MAP`].
    pub vms: BTreeMap<u32, VmEntry>,
    /// [`CONFIG_MAP`] index 0, once written.
    pub config: Option<Config>,
}

impl MemMaps {
    /// Empty maps.
    pub fn new() -> Self {
        Self::default()
    }
}

impl MapWriter for MemMaps {
    fn set_config(&mut self, cfg: Config) -> Result<(), MapSyncError> {
        self.config = Some(cfg);
        Ok(())
    }
    fn put_route(&mut self, model: u32, route: Route) -> Result<(), MapSyncError> {
        self.routes.insert(model, route);
        Ok(())
    }
    fn remove_route(&mut self, model: u32) -> Result<(), MapSyncError> {
        self.routes.remove(&model);
        Ok(())
    }
    fn put_client(&mut self, id: u32, entry: ClientEntry) -> Result<(), MapSyncError> {
        self.clients.insert(id, entry);
        Ok(())
    }
    fn remove_client(&mut self, id: u32) -> Result<(), MapSyncError> {
        self.clients.remove(&id);
        Ok(())
    }
    fn put_vm(&mut self, id: u32, entry: VmEntry) -> Result<(), MapSyncError> {
        self.vms.insert(id, entry);
        Ok(())
    }
    fn remove_vm(&mut self, id: u32) -> Result<(), MapSyncError> {
        self.vms.remove(&id);
        Ok(())
    }
    fn route_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        Ok(self.routes.keys().copied().collect())
    }
    fn client_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        Ok(self.clients.keys().copied().collect())
    }
    fn vm_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        Ok(self.vms.keys().copied().collect())
    }
}

/// The kernel maps the XDP program reads: [`ROUTES_MAP`], [`CLIENTS_MAP`],
/// [`VMS_MAP`] and [`CONFIG_MAP`].
pub struct AyaMaps {
    routes: HashMap<MapData, u32, Route>,
    clients: HashMap<MapData, u32, ClientEntry>,
    vms: HashMap<MapData, u32, VmEntry>,
    config: Array<MapData, Config>,
}

impl fmt::Debug for AyaMaps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AyaMaps")
            .field("routes", &self.routes)
            .field("clients", &self.clients)
            .field("vms", &self.vms)
            .finish_non_exhaustive()
    }
}

impl AyaMaps {
    /// Opens the maps pinned in `dir` (the server's
    /// [`effective_pin_dir`](crate::config::ServerSection::effective_pin_dir)),
    /// each under its map name. Fails if a map is missing or its key or
    /// value size does not match the wire types.
    pub fn from_pinned(dir: &Path) -> Result<Self, MapSyncError> {
        Ok(AyaMaps {
            routes: open_pinned(dir, ROUTES_MAP)?,
            clients: open_pinned(dir, CLIENTS_MAP)?,
            vms: open_pinned(dir, VMS_MAP)?,
            config: open_pinned(dir, CONFIG_MAP)?,
        })
    }

    /// Wraps maps already open, e.g. taken from a loaded `aya::Ebpf` with
    /// `take_map` and converted with `try_from`, or created standalone.
    pub fn from_maps(
        routes: HashMap<MapData, u32, Route>,
        clients: HashMap<MapData, u32, ClientEntry>,
        vms: HashMap<MapData, u32, VmEntry>,
        config: Array<MapData, Config>,
    ) -> Self {
        AyaMaps {
            routes,
            clients,
            vms,
            config,
        }
    }

    /// Gives the maps back: `(routes, clients, vms, config)`.
    #[allow(clippy::type_complexity)]
    pub fn into_maps(
        self,
    ) -> (
        HashMap<MapData, u32, Route>,
        HashMap<MapData, u32, ClientEntry>,
        HashMap<MapData, u32, VmEntry>,
        Array<MapData, Config>,
    ) {
        (self.routes, self.clients, self.vms, self.config)
    }

    /// The route of device model `model`, if any.
    pub fn route(&self, model: u32) -> Result<Option<Route>, MapSyncError> {
        found(self.routes.get(&model, 0), ROUTES_MAP, model)
    }

    /// Client `id`, if present.
    pub fn client(&self, id: u32) -> Result<Option<ClientEntry>, MapSyncError> {
        found(self.clients.get(&id, 0), CLIENTS_MAP, id)
    }

    /// VM `id`, if present.
    pub fn vm(&self, id: u32) -> Result<Option<VmEntry>, MapSyncError> {
        found(self.vms.get(&id, 0), VMS_MAP, id)
    }

    /// The program's settings (all zero until written).
    pub fn config(&self) -> Result<Config, MapSyncError> {
        self.config
            .get(&0, 0)
            .map_err(map_err(CONFIG_MAP, "read", Some(0)))
    }
}

fn open_pinned<T>(dir: &Path, name: &'static str) -> Result<T, MapSyncError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = dir.join(name);
    let open = || -> Result<T, MapError> {
        let data = MapData::from_pin(&path)?;
        T::try_from(Map::from_map_data(data)?)
    };
    open().map_err(|source| MapSyncError::Open {
        path: path.clone(),
        source,
    })
}

fn found<V>(
    r: Result<V, MapError>,
    map: &'static str,
    key: u32,
) -> Result<Option<V>, MapSyncError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(e) => Err(map_err(map, "read", Some(key))(e)),
    }
}

/// A removal of an absent key is not an error (the key is gone either way).
fn removed(r: Result<(), MapError>, map: &'static str, key: u32) -> Result<(), MapSyncError> {
    match r {
        Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(MapError::KeyNotFound) => Ok(()),
        r => r.map_err(map_err(map, "remove", Some(key))),
    }
}

fn keys<V: aya::Pod>(
    map: &HashMap<MapData, u32, V>,
    name: &'static str,
) -> Result<Vec<u32>, MapSyncError> {
    map.keys()
        .collect::<Result<Vec<u32>, MapError>>()
        .map_err(map_err(name, "list", None))
}

impl MapWriter for AyaMaps {
    fn set_config(&mut self, cfg: Config) -> Result<(), MapSyncError> {
        self.config
            .set(0, cfg, 0)
            .map_err(map_err(CONFIG_MAP, "insert", Some(0)))
    }
    fn put_route(&mut self, model: u32, route: Route) -> Result<(), MapSyncError> {
        self.routes
            .insert(model, route, 0)
            .map_err(map_err(ROUTES_MAP, "insert", Some(model)))
    }
    fn remove_route(&mut self, model: u32) -> Result<(), MapSyncError> {
        removed(self.routes.remove(&model), ROUTES_MAP, model)
    }
    fn put_client(&mut self, id: u32, entry: ClientEntry) -> Result<(), MapSyncError> {
        self.clients
            .insert(id, entry, 0)
            .map_err(map_err(CLIENTS_MAP, "insert", Some(id)))
    }
    fn remove_client(&mut self, id: u32) -> Result<(), MapSyncError> {
        removed(self.clients.remove(&id), CLIENTS_MAP, id)
    }
    fn put_vm(&mut self, id: u32, entry: VmEntry) -> Result<(), MapSyncError> {
        self.vms
            .insert(id, entry, 0)
            .map_err(map_err(VMS_MAP, "insert", Some(id)))
    }
    fn remove_vm(&mut self, id: u32) -> Result<(), MapSyncError> {
        removed(self.vms.remove(&id), VMS_MAP, id)
    }
    fn route_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        keys(&self.routes, ROUTES_MAP)
    }
    fn client_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        keys(&self.clients, CLIENTS_MAP)
    }
    fn vm_ids(&self) -> Result<Vec<u32>, MapSyncError> {
        keys(&self.vms, VMS_MAP)
    }
}
