//! Why the database refused: [`DbError`].

use super::*;

/// Why the database could not be opened, changed, projected or synced.
///
/// Every message is one line that names the entity and says what to do.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum DbError {
    /// The state directory does not exist ([`Db::open_existing`]).
    #[error("no state directory {}: create it with `dpctl init` (or give --state DIR)", dir.display())]
    NoStateDir {
        /// The directory asked for.
        dir: PathBuf,
    },
    /// A model of a kind the model registry does not build.
    #[error("unknown device-model kind {kind:?}: give one of {}", devplane_devmodels::registry::KINDS.join(", "))]
    UnknownModelKind {
        /// The kind given.
        kind: String,
    },
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
    /// A model forwarded by the server that hosts it.
    #[error(
        "model {id}: server {server} hosts it and cannot also forward it: forward it through \
         another server (an owner), or unforward it"
    )]
    ForwardToItself {
        /// The model.
        id: u32,
        /// The server.
        server: u32,
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

pub(crate) fn io_err<'a>(
    path: &'a Path,
    op: &'static str,
) -> impl FnOnce(io::Error) -> DbError + 'a {
    move |source| DbError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}
