//! The server configuration file.
//!
//! A server is described by one TOML file: its own identity and data-plane
//! settings (`[server]`, `[tuning]`), the client platforms allowed to talk to
//! it (`[[clients]]`), the VMs they host (`[[vms]]`) and the device models it
//! serves (`[[models]]`). `control/examples/server.toml` is a complete,
//! commented example.
//!
//! Every table rejects unknown keys, so a misspelt setting is an error
//! rather than silently ignored. [`ServerConfig::from_toml_str`] and
//! [`ServerConfig::from_file`] parse and then [`validate`](ServerConfig::validate):
//! a config that constructs is consistent (every reference resolves, no id
//! is reused) and can be written into the eBPF maps by
//! [`crate::maps::sync`]. Every error is one line that names the offending
//! entry and says what to change.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use devplane_wire::maps::{MAX_CLIENTS, MAX_MODELS, MAX_VMS, MAX_WORKERS};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use thiserror::Error;

/// Root of the per-server pin directories in bpffs: a server whose
/// `server.pin_dir` is not set pins its maps in `<root>/server-<id>`.
pub const DEFAULT_PIN_ROOT: &str = "/sys/fs/bpf/devplane";

/// Default of `tuning.spin_budget`.
pub const DEFAULT_SPIN_BUDGET: u32 = 2000;
/// Default of `tuning.idle_sleep_us`.
pub const DEFAULT_IDLE_SLEEP_US: u64 = 50;
/// Default of `tuning.batch`.
pub const DEFAULT_BATCH: u32 = 64;
/// Largest `tuning.idle_sleep_us` (10 ms): a worker answers control
/// commands (and Ctrl-C) between sleeps, so a longer sleep would hold them.
pub const MAX_IDLE_SLEEP_US: u64 = 10_000;
/// Largest `tuning.batch`: the size of a worker's AF_XDP rings, the most
/// frames one poll can see.
pub const MAX_BATCH: u32 = 2048;

/// Longest Linux network interface name (`IFNAMSIZ` - 1).
const MAX_IFNAME: usize = 15;

/// A server's whole configuration: the file's root table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// `[server]`: identity, transport and workers.
    pub server: ServerSection,
    /// `[tuning]`: polling parameters; every key has a default.
    #[serde(default)]
    pub tuning: Tuning,
    /// `[[clients]]`: client platforms allowed to send requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    /// `[[vms]]`: VMs hosted by those clients.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vms: Vec<VmConfig>,
    /// `[[models]]`: device models this server serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelConfig>,
}

/// How a server receives requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The XDP program steers requests to one AF_XDP socket per worker
    /// (needs root and `server.interface`).
    #[default]
    Xdp,
    /// Plain UDP sockets, one per worker: unprivileged, and the baseline
    /// that XDP is compared with.
    Socket,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Xdp => "xdp",
            Mode::Socket => "socket",
        })
    }
}

/// The `[server]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// This server's platform id (nonzero).
    pub id: u32,
    /// UDP port of devplane traffic (default [`devplane_wire::DEFAULT_PORT`]).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Transport (default [`Mode::Xdp`]).
    #[serde(default)]
    pub mode: Mode,
    /// Network interface the XDP program attaches to; required in XDP mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// One entry per worker, in worker-index order: the CPU core that
    /// worker is pinned to. Several workers may share a core.
    pub workers: Vec<usize>,
    /// bpffs directory for the pinned maps; see
    /// [`ServerSection::effective_pin_dir`] for the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    /// Drop requests from unregistered clients or from an address other
    /// than the client's registered one (default `true`).
    #[serde(default = "default_true")]
    pub check_clients: bool,
}

impl ServerSection {
    /// The pin directory in effect: `pin_dir` if set, otherwise
    /// `/sys/fs/bpf/devplane/server-<id>`.
    pub fn effective_pin_dir(&self) -> PathBuf {
        match &self.pin_dir {
            Some(dir) => dir.clone(),
            None => Path::new(DEFAULT_PIN_ROOT).join(format!("server-{}", self.id)),
        }
    }
}

/// The `[tuning]` table: how workers poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tuning {
    /// Empty polls before a worker sleeps (default [`DEFAULT_SPIN_BUDGET`]);
    /// 0 sleeps at once. Any value is valid: a spinning worker still
    /// answers control commands between polls.
    #[serde(default = "default_spin_budget")]
    pub spin_budget: u32,
    /// Sleep, or poll timeout, in microseconds when idle (default
    /// [`DEFAULT_IDLE_SLEEP_US`], at most [`MAX_IDLE_SLEEP_US`]).
    #[serde(default = "default_idle_sleep_us")]
    pub idle_sleep_us: u64,
    /// Most frames taken per poll (default [`DEFAULT_BATCH`]; 1 to
    /// [`MAX_BATCH`]).
    #[serde(default = "default_batch")]
    pub batch: u32,
}

impl Tuning {
    /// Checks each value against its range (see the fields); `dpctl tune`
    /// and the server's `tune` request use it as the configuration does.
    pub fn check(&self) -> Result<(), ConfigError> {
        let range = |key: &'static str, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    key,
                    value,
                    min,
                    max,
                })
            }
        };
        range(
            "tuning.idle_sleep_us",
            self.idle_sleep_us,
            0,
            MAX_IDLE_SLEEP_US,
        )?;
        range("tuning.batch", self.batch.into(), 1, MAX_BATCH.into())
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            spin_budget: DEFAULT_SPIN_BUDGET,
            idle_sleep_us: DEFAULT_IDLE_SLEEP_US,
            batch: DEFAULT_BATCH,
        }
    }
}

/// A `[[clients]]` entry: a client platform allowed to send requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Client platform id (nonzero, unique).
    pub id: u32,
    /// The client's IPv4 address (unique); with `server.check_clients`,
    /// requests carrying this client's id from elsewhere are dropped.
    #[serde(
        serialize_with = "serialize_ipv4",
        deserialize_with = "deserialize_ipv4"
    )]
    pub address: Ipv4Addr,
    /// `tag_key = "ID:HEX"`: the key (an id of 1..=255 and 32 hex digits)
    /// the tags of this client's datagrams are computed with. With a key,
    /// every datagram of this client must carry a valid tag (and the
    /// server tags its answers and interrupts); without one, none does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag_key: Option<ClientKey>,
    /// `budget = { rate = R, burst = B }`: with `server.check_clients`, the
    /// XDP program admits at most `burst` datagrams at once and `rate` per
    /// second from this client on each CPU, and drops the rest
    /// (`drop_over_budget`). None (the default) or `burst = 0`: no budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// A client's tag key as the configuration holds it: `"ID:HEX"`. Its
/// `Debug` shows the id and a two-byte fingerprint only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey(pub devplane_wire::tag::TagKey);

impl ClientKey {
    /// Parses `"ID:HEX"` (id 1..=255, 32 hex digits).
    pub fn parse(text: &str) -> Option<ClientKey> {
        let (id, hex) = text.split_once(':')?;
        let id: u8 = id.parse().ok()?;
        devplane_wire::tag::TagKey::from_hex(id, hex).map(ClientKey)
    }

    /// The `"ID:HEX"` form (the whole key: for configuration files only,
    /// never for logs).
    pub fn to_config_string(&self) -> String {
        let hex: String = self.0.bytes().iter().map(|b| format!("{b:02x}")).collect();
        format!("{}:{hex}", self.0.id)
    }
}

impl Serialize for ClientKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_config_string())
    }
}

impl<'de> Deserialize<'de> for ClientKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ClientKey, D::Error> {
        let text = String::deserialize(d)?;
        ClientKey::parse(&text).ok_or_else(|| {
            serde::de::Error::custom(
                "tag_key must be \"ID:HEX\": a key id of 1..=255, a colon and 32 hex digits",
            )
        })
    }
}

/// A client's datagram budget at the XDP program (a token bucket; see
/// `devplane_wire::maps::bucket_take`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Datagrams per second the bucket refills with.
    pub rate: u32,
    /// Bucket size in datagrams (at most `devplane_wire::maps::MAX_BURST`);
    /// 0 means no budget.
    pub burst: u32,
}

/// A `[[vms]]` entry: a VM and where it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// VM id (nonzero, unique).
    pub id: u32,
    /// Id of the client platform that hosts the VM (a `[[clients]]` id).
    pub client: u32,
    /// Hypervisor id on that client (nonzero).
    pub hypervisor: u32,
}

/// A `[[models]]` entry: a device model this server serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Device-model id (nonzero, unique).
    pub id: u32,
    /// Which device model implementation (a devmodels kind, such as
    /// `"counter"`); the server checks that it knows the kind.
    pub kind: String,
    /// Index into `server.workers` of the worker that owns the model.
    pub worker: usize,
    /// Interrupt line (GSI) the model raises, if any; needs `vm`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u32>,
    /// VM the model's interrupts go to (a `[[vms]]` id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<u32>,
    /// Base I/O port, for models reached by port I/O.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pio_base: Option<u16>,
    /// Base guest-physical address, for models reached by MMIO.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmio_base: Option<u64>,
    /// A file on the server the model keeps its data in: the
    /// `blockstore` disk image (required there), the `uart` console log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<PathBuf>,
}

impl ModelConfig {
    /// A model of `kind` on worker `worker`, with no interrupt line and
    /// no bases (set them with struct update syntax).
    pub fn new(id: u32, kind: &str, worker: usize) -> ModelConfig {
        ModelConfig {
            id,
            kind: kind.into(),
            worker,
            line: None,
            vm: None,
            pio_base: None,
            mmio_base: None,
            backing: None,
        }
    }
}

/// Why a configuration could not be loaded, or is inconsistent.
///
/// Every message is a single line naming the offending entry and saying
/// what to change.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not valid TOML, has a value of the wrong type, a
    /// missing required key or an unknown key.
    #[error("{}line {line}, column {column}{}: {message}", origin_prefix(.origin), snippet_suffix(.snippet))]
    Parse {
        /// The file, if the text came from one.
        origin: Option<PathBuf>,
        /// 1-based line of the error (0 if unknown).
        line: usize,
        /// 1-based column of the error (0 if unknown).
        column: usize,
        /// The offending line, trimmed (empty if unknown).
        snippet: String,
        /// What is wrong, from the parser.
        message: String,
    },
    /// The configuration could not be written as TOML.
    #[error("cannot write the config as TOML: {0}")]
    Serialize(String),
    /// `server.id` is 0.
    #[error("server.id is 0: set it to this server's nonzero platform id")]
    ZeroServerId,
    /// `server.port` is 0.
    #[error(
        "server.port is 0: set a UDP port (default {})",
        devplane_wire::DEFAULT_PORT
    )]
    ZeroPort,
    /// `server.workers` is empty.
    #[error("server.workers is empty: list one CPU core per worker, e.g. workers = [0]")]
    NoWorkers,
    /// More workers than the AF_XDP socket map holds.
    #[error("server.workers has {count} entries: at most {max} workers are supported")]
    TooManyWorkers {
        /// Entries in `server.workers`.
        count: usize,
        /// [`MAX_WORKERS`].
        max: u32,
    },
    /// XDP mode without an interface.
    #[error(
        "server.mode is \"xdp\" but server.interface is not set: name the network interface to attach to, or set mode = \"socket\""
    )]
    MissingInterface,
    /// `server.interface` is empty or too long for Linux.
    #[error(
        "server.interface {name:?} is not a valid interface name: it must be 1 to {MAX_IFNAME} bytes without '/', ':' or spaces"
    )]
    BadInterface {
        /// The name given.
        name: String,
    },
    /// `server.pin_dir` is relative.
    #[error(
        "server.pin_dir {} is relative: give an absolute path on bpffs, e.g. {DEFAULT_PIN_ROOT}/server-1",
        path.display()
    )]
    RelativePinDir {
        /// The path given.
        path: PathBuf,
    },
    /// A `[tuning]` value is outside its range.
    #[error("{key} = {value} is out of range: give a value from {min} to {max}")]
    OutOfRange {
        /// The key, e.g. `tuning.batch`.
        key: &'static str,
        /// The value given.
        value: u64,
        /// Smallest allowed.
        min: u64,
        /// Largest allowed.
        max: u64,
    },
    /// An entry's id is 0.
    #[error("{kind} entry #{position} has id 0: ids must be nonzero")]
    ZeroId {
        /// `"client"`, `"vm"` or `"model"`.
        kind: &'static str,
        /// 1-based position of the entry in its list.
        position: usize,
    },
    /// Two entries of one list share an id.
    #[error("{kind} {id} is defined twice: give each {kind} its own id")]
    DuplicateId {
        /// `"client"`, `"vm"` or `"model"`.
        kind: &'static str,
        /// The id.
        id: u32,
    },
    /// A list has more entries than its eBPF map holds.
    #[error("{count} {kind}s are configured: the data plane holds at most {max}")]
    TooMany {
        /// `"client"`, `"vm"` or `"model"`.
        kind: &'static str,
        /// Entries configured.
        count: usize,
        /// Capacity of the map.
        max: u32,
    },
    /// Two clients share an address.
    #[error(
        "client {second}: address {address} is already client {first}'s: each client needs its own address"
    )]
    DuplicateAddress {
        /// The address.
        address: Ipv4Addr,
        /// The client that has it first.
        first: u32,
        /// The client that has it again.
        second: u32,
    },
    /// A VM names a client that is not configured.
    #[error("vm {vm}: client {client} does not exist: add a [[clients]] entry with id = {client}")]
    UnknownClient {
        /// The VM.
        vm: u32,
        /// The missing client.
        client: u32,
    },
    /// A VM's hypervisor id is 0.
    #[error("vm {vm}: hypervisor is 0: set the nonzero hypervisor id on its client")]
    ZeroHypervisor {
        /// The VM.
        vm: u32,
    },
    /// A model's kind is empty.
    #[error("model {model}: kind is empty: name a device model kind, e.g. kind = \"counter\"")]
    EmptyKind {
        /// The model.
        model: u32,
    },
    /// A model names a worker index past the end of `server.workers`.
    #[error("model {model}: worker {worker} does not exist (server.workers has {count} entries)")]
    NoSuchWorker {
        /// The model.
        model: u32,
        /// The worker index given.
        worker: usize,
        /// Entries in `server.workers`.
        count: usize,
    },
    /// A model names a VM that is not configured.
    #[error("model {model}: vm {vm} does not exist: add a [[vms]] entry with id = {vm}")]
    UnknownVm {
        /// The model.
        model: u32,
        /// The missing VM.
        vm: u32,
    },
    /// A model has an interrupt line but no VM to deliver it to.
    #[error(
        "model {model}: line {line} is set but vm is not: name the VM that receives its interrupts"
    )]
    LineWithoutVm {
        /// The model.
        model: u32,
        /// The line.
        line: u32,
    },
}

fn origin_prefix(origin: &Option<PathBuf>) -> String {
    match origin {
        Some(path) => format!("{}: ", path.display()),
        None => String::new(),
    }
}

fn snippet_suffix(snippet: &str) -> String {
    if snippet.is_empty() {
        String::new()
    } else {
        format!(" ({snippet})")
    }
}

impl ServerConfig {
    /// Parses and validates a configuration.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse(text, None)
    }

    /// Reads, parses and validates a configuration file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, Some(path))
    }

    fn parse(text: &str, origin: Option<&Path>) -> Result<Self, ConfigError> {
        let cfg: ServerConfig = toml::from_str(text).map_err(|e| parse_error(text, origin, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Writes the configuration as TOML; [`ServerConfig::from_toml_str`]
    /// reads it back equal.
    pub fn to_toml_string(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Serialize(e.to_string()))
    }

    /// Checks that the configuration is consistent; returns the first
    /// problem found. The constructors call this; call it again after
    /// changing a configuration in memory.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        if s.id == 0 {
            return Err(ConfigError::ZeroServerId);
        }
        if s.port == 0 {
            return Err(ConfigError::ZeroPort);
        }
        if s.workers.is_empty() {
            return Err(ConfigError::NoWorkers);
        }
        if s.workers.len() > MAX_WORKERS as usize {
            return Err(ConfigError::TooManyWorkers {
                count: s.workers.len(),
                max: MAX_WORKERS,
            });
        }
        match (&s.interface, s.mode) {
            (None, Mode::Xdp) => return Err(ConfigError::MissingInterface),
            (Some(name), _) if !valid_ifname(name) => {
                return Err(ConfigError::BadInterface { name: name.clone() });
            }
            _ => {}
        }
        if let Some(dir) = &s.pin_dir {
            if dir.is_relative() {
                return Err(ConfigError::RelativePinDir { path: dir.clone() });
            }
        }
        self.tuning.check()?;

        check_ids("client", self.clients.iter().map(|c| c.id), MAX_CLIENTS)?;
        check_ids("vm", self.vms.iter().map(|v| v.id), MAX_VMS)?;
        check_ids("model", self.models.iter().map(|m| m.id), MAX_MODELS)?;

        let mut addresses = BTreeMap::new();
        for c in &self.clients {
            if let Some(b) = c.budget
                && b.burst > devplane_wire::maps::MAX_BURST
            {
                return Err(ConfigError::OutOfRange {
                    key: "clients.budget.burst",
                    value: b.burst.into(),
                    min: 0,
                    max: devplane_wire::maps::MAX_BURST.into(),
                });
            }
            if let Some(&first) = addresses.get(&c.address) {
                return Err(ConfigError::DuplicateAddress {
                    address: c.address,
                    first,
                    second: c.id,
                });
            }
            addresses.insert(c.address, c.id);
        }

        let clients: BTreeSet<u32> = self.clients.iter().map(|c| c.id).collect();
        for v in &self.vms {
            if !clients.contains(&v.client) {
                return Err(ConfigError::UnknownClient {
                    vm: v.id,
                    client: v.client,
                });
            }
            if v.hypervisor == 0 {
                return Err(ConfigError::ZeroHypervisor { vm: v.id });
            }
        }

        let vms: BTreeSet<u32> = self.vms.iter().map(|v| v.id).collect();
        for m in &self.models {
            if m.kind.trim().is_empty() {
                return Err(ConfigError::EmptyKind { model: m.id });
            }
            if m.worker >= s.workers.len() {
                return Err(ConfigError::NoSuchWorker {
                    model: m.id,
                    worker: m.worker,
                    count: s.workers.len(),
                });
            }
            match (m.vm, m.line) {
                (Some(vm), _) if !vms.contains(&vm) => {
                    return Err(ConfigError::UnknownVm { model: m.id, vm });
                }
                (None, Some(line)) => {
                    return Err(ConfigError::LineWithoutVm { model: m.id, line });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The client with this id.
    pub fn client(&self, id: u32) -> Option<&ClientConfig> {
        self.clients.iter().find(|c| c.id == id)
    }

    /// The VM with this id.
    pub fn vm(&self, id: u32) -> Option<&VmConfig> {
        self.vms.iter().find(|v| v.id == id)
    }

    /// The model with this id.
    pub fn model(&self, id: u32) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.id == id)
    }

    /// The models owned by worker `index` (an index into `server.workers`).
    pub fn worker_models(&self, index: usize) -> impl Iterator<Item = &ModelConfig> + '_ {
        self.models.iter().filter(move |m| m.worker == index)
    }
}

/// Linux's `dev_valid_name`: 1 to 15 bytes, not `.` or `..`, no `/`,
/// `:` or whitespace.
fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c == '\0' || c.is_whitespace())
}

/// Ids of one list: nonzero, unique, and no more than the map holds.
fn check_ids(
    kind: &'static str,
    ids: impl ExactSizeIterator<Item = u32>,
    max: u32,
) -> Result<(), ConfigError> {
    let count = ids.len();
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
    if count > max as usize {
        return Err(ConfigError::TooMany { kind, count, max });
    }
    Ok(())
}

/// Turns a multi-line toml error into [`ConfigError::Parse`].
fn parse_error(text: &str, origin: Option<&Path>, e: &toml::de::Error) -> ConfigError {
    let (line, column, snippet) = match e.span() {
        Some(span) => {
            let start = span.start.min(text.len());
            let before = &text[..start];
            let line = before.matches('\n').count() + 1;
            let line_start = before.rfind('\n').map_or(0, |i| i + 1);
            let column = text[line_start..start].chars().count() + 1;
            let snippet = text[line_start..]
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            (line, column, snippet)
        }
        None => (0, 0, String::new()),
    };
    ConfigError::Parse {
        origin: origin.map(Path::to_path_buf),
        line,
        column,
        snippet,
        message: e.message().trim().replace('\n', "; "),
    }
}

fn default_port() -> u16 {
    devplane_wire::DEFAULT_PORT
}

fn default_true() -> bool {
    true
}

fn default_spin_budget() -> u32 {
    DEFAULT_SPIN_BUDGET
}

fn default_idle_sleep_us() -> u64 {
    DEFAULT_IDLE_SLEEP_US
}

fn default_batch() -> u32 {
    DEFAULT_BATCH
}

fn serialize_ipv4<S: Serializer>(addr: &Ipv4Addr, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(addr)
}

fn deserialize_ipv4<'de, D: Deserializer<'de>>(d: D) -> Result<Ipv4Addr, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = Ipv4Addr;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an IPv4 address in quotes, e.g. address = \"10.99.0.1\"")
        }
        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Ipv4Addr, E> {
            text.parse().map_err(|_| {
                E::custom(format!(
                    "address {text:?} is not an IPv4 address: write four decimal octets, e.g. address = \"10.99.0.1\""
                ))
            })
        }
    }
    d.deserialize_str(V)
}
