//! The identifier store: one interface ([`Store`]) over the cluster's
//! single source of truth, with two backends.
//!
//! - `file:DIR` ([`file::FileStore`]): the embedded database of
//!   [`crate::db`] (one JSON file replaced atomically, crash safe). The
//!   default: nothing to start on one machine. Its revision is the
//!   database's generation.
//! - `etcd:http://HOST:PORT` ([`etcd::EtcdStore`]): a real etcd (v3 API).
//!   Each entity is one key under `/devplane/v1/d/` (the layout is in
//!   [`layout`]); every change is **one etcd transaction** guarded by the
//!   mod-revision of the meta key, so a change is validated against the
//!   whole state it was read with ([`State::changed`]: no dangling ids,
//!   nothing removed while used) and refused if anything changed since
//!   (then re-read and re-validated). The store's revision is the etcd
//!   revision of the last data change.
//!
//! Agents (`devplane-server`, `devplane-client`) [`Store::watch_start`]
//! and [`Store::watch_next`]: they keep a copy of the state, updated from
//! the watch's events, re-listed whole after a lost or compacted watch,
//! and reconcile what they run to it. They report what they applied with
//! [`Store::report`] (on etcd, under a lease: an agent that stops
//! reporting disappears, and `dpctl status` shows its platform down).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::db::{Change, DbError, State};

pub mod agent;
pub mod etcd;
pub mod file;
pub mod layout;
pub mod plan;

/// Where the store is: `file:DIR` or `etcd:http://HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// The embedded file store in a state directory.
    File(PathBuf),
    /// An etcd endpoint (`http://HOST:PORT`).
    Etcd(String),
}

impl FromStr for StoreUrl {
    type Err = StoreError;

    fn from_str(s: &str) -> Result<Self, StoreError> {
        let bad = |why: &str| StoreError::BadUrl {
            url: s.to_string(),
            why: why.to_string(),
        };
        if let Some(dir) = s.strip_prefix("file:") {
            if dir.is_empty() {
                return Err(bad("file: needs a directory"));
            }
            return Ok(StoreUrl::File(PathBuf::from(dir)));
        }
        if let Some(ep) = s.strip_prefix("etcd:") {
            let rest = ep
                .strip_prefix("http://")
                .ok_or_else(|| bad("etcd: needs an http:// endpoint (TLS is not supported)"))?;
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("etcd: needs HOST:PORT"))?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad("etcd: needs HOST:PORT with a port number"));
            }
            return Ok(StoreUrl::Etcd(ep.to_string()));
        }
        Err(bad("give file:DIR or etcd:http://HOST:PORT"))
    }
}

impl fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreUrl::File(d) => write!(f, "file:{}", d.display()),
            StoreUrl::Etcd(e) => write!(f, "etcd:{e}"),
        }
    }
}

/// Why the store refused or failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The change (or the database) was refused.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A `--store` value that does not parse.
    #[error("store {url:?}: {why}")]
    BadUrl {
        /// What was given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// etcd could not be reached or answered with an error.
    #[error("etcd at {endpoint}: {message}: is etcd running there? (see --store)")]
    Etcd {
        /// The endpoint.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// A key in the store holds something this build cannot read.
    #[error("store key {key}: {message}: fix or delete it (etcdctl del)")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// Other writers kept changing the store.
    #[error("the store kept changing under this change ({tries} tries): try again")]
    Contended {
        /// How many times it was tried.
        tries: u32,
    },
    /// A local file (agent report) could not be read or written.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        message: String,
    },
}

impl StoreError {
    /// Whether the error is about an id that does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, StoreError::Db(e) if e.is_not_found())
    }
}

/// The state at a revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// The revision of the last change (file: the generation; etcd: the
    /// etcd revision of the last data transaction; 0: never changed).
    pub revision: u64,
    /// The contents.
    pub state: State,
}

/// Which daemon an agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// `devplane-server` (its id is the server platform's).
    Server,
    /// `devplane-client` (its id is the client platform's).
    Client,
}

impl AgentKind {
    /// `"server"` or `"client"`.
    pub const fn name(self) -> &'static str {
        match self {
            AgentKind::Server => "server",
            AgentKind::Client => "client",
        }
    }
}

/// What an agent says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentReport {
    /// Which daemon.
    pub kind: AgentKind,
    /// Its platform id.
    pub id: u32,
    /// The store revision it has reconciled to.
    pub applied: u64,
    /// What it could not apply at that revision, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Milliseconds since the Unix epoch when it reported.
    pub at_ms: u64,
    /// How long the report holds without a new one (the lease's TTL).
    pub ttl_ms: u64,
}

/// An agent as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Its last report.
    pub report: AgentReport,
    /// Whether it is alive: its lease holds (etcd) or it reported within
    /// its TTL (file).
    pub alive: bool,
}

/// Counters of one store handle's watch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WatchStats {
    /// Watch responses received.
    pub responses: u64,
    /// Events (key changes) received.
    pub events: u64,
    /// Bytes of keys and values received in events.
    pub bytes: u64,
    /// Full re-lists (start, lost or compacted watch).
    pub relists: u64,
}

/// The identifier store.
pub trait Store: Send {
    /// Where it is (for messages).
    fn url(&self) -> StoreUrl;

    /// The whole state at the latest revision.
    fn load(&mut self) -> Result<Snapshot, StoreError>;

    /// Validates `change` against the latest state and makes it, as one
    /// atomic write; returns the new revision.
    fn apply(&mut self, change: &Change) -> Result<u64, StoreError>;

    /// A bulk import: every change validated in order, the whole result
    /// validated once. File: one write. etcd: written in transactions of
    /// a bounded size, each guarded like [`Store::apply`] (a failure in
    /// the middle leaves the changes before it written).
    fn apply_batch(&mut self, changes: &[Change]) -> Result<u64, StoreError>;

    /// Lists the state and starts watching from it.
    fn watch_start(&mut self) -> Result<&Snapshot, StoreError>;

    /// Waits up to `timeout` for a change after the watched snapshot.
    /// `Some` with the new snapshot when the state changed (from the
    /// watch's events or, after a lost or compacted watch, a full
    /// re-list), `None` on timeout.
    fn watch_next(&mut self, timeout: Duration) -> Result<Option<&Snapshot>, StoreError>;

    /// The watch's counters.
    fn watch_stats(&self) -> WatchStats;

    /// Records an agent's report (etcd: under a lease of `ttl_ms`, kept
    /// alive by each report).
    fn report(&mut self, report: &AgentReport) -> Result<(), StoreError>;

    /// Every agent that reported (dead ones too, for the file store; on
    /// etcd a dead agent's key is gone with its lease).
    fn agents(&mut self) -> Result<Vec<AgentInfo>, StoreError>;

    /// The store's size on disk, bytes.
    fn size_bytes(&mut self) -> Result<u64, StoreError>;
}

/// Opens the store at `url` (a file store's directory must exist: see
/// `dpctl init`).
pub fn open(url: &StoreUrl) -> Result<Box<dyn Store>, StoreError> {
    Ok(match url {
        StoreUrl::File(dir) => Box::new(file::FileStore::open(dir)?),
        StoreUrl::Etcd(ep) => Box::new(etcd::EtcdStore::connect(ep)?),
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_or_say_why() {
        assert_eq!(
            "file:/tmp/x".parse::<StoreUrl>().unwrap(),
            StoreUrl::File("/tmp/x".into())
        );
        assert_eq!(
            "etcd:http://127.0.0.1:2379".parse::<StoreUrl>().unwrap(),
            StoreUrl::Etcd("http://127.0.0.1:2379".into())
        );
        for bad in [
            "",
            "file:",
            "etcd:127.0.0.1:2379",
            "etcd:http://host",
            "etcd:http://:1",
            "etcd:http://h:99999",
            "zk:x",
        ] {
            let e = bad.parse::<StoreUrl>().unwrap_err();
            assert!(matches!(e, StoreError::BadUrl { .. }), "{bad}: {e}");
        }
    }
}
