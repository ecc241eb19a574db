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

mod entities;
mod error;
mod state;

pub use entities::*;
pub use error::DbError;
pub(crate) use error::io_err;
pub use state::State;
pub(crate) use state::{AppliedFile, DbFile};

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
    /// Opens the database in an existing directory `dir` (an empty
    /// database is written there if it holds none): a mistyped path is
    /// [`DbError::NoStateDir`] instead of a new, empty state. See
    /// [`Db::open`] to create the directory.
    pub fn open_existing(dir: impl AsRef<Path>) -> Result<Db, DbError> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(DbError::NoStateDir {
                dir: dir.to_path_buf(),
            });
        }
        Db::open(dir)
    }

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

    /// Validates every change in order and writes the result once
    /// (generation + 1): a bulk import ([`State::changed_many`]).
    pub fn apply_many(&mut self, changes: &[Change]) -> Result<(), DbError> {
        let _lock = Lock::take(&self.dir)?;
        self.reload()?;
        let next = self.state.changed_many(changes)?;
        self.write_db(self.generation + 1, &next)
    }

    /// Re-reads the database if another process changed it.
    pub fn refresh(&mut self) -> Result<(), DbError> {
        self.reload().map(drop)
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

/// [`Db::server_config`] of any state (the store's, for an agent):
/// projected onto server `settings.server.id` and validated.
pub fn server_config_of(state: &State, settings: &ServerSettings) -> Result<ServerConfig, DbError> {
    let cfg = project(state, settings)?;
    cfg.validate().map_err(|source| DbError::Config {
        server: settings.server.id,
        source: Box::new(source),
    })?;
    Ok(cfg)
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
                tag_key: c.tag_key.clone(),
                id: c.id,
                address: c.address,
                budget: c.budget,
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
        // Owner-only: the database holds the clients' tag keys.
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(&mut OpenOptions::new(), 0o600)
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
