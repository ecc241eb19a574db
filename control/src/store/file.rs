//! The file backend: [`crate::db::Db`] (one JSON file in a state
//! directory, replaced atomically; writers serialise on a lock). Its
//! revision is the database's generation. Watching polls the file (a
//! stat and, when it changed, a re-read): one machine, no daemon to
//! start. Agent reports are small files under `DIR/agents/`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{AgentInfo, AgentReport, Snapshot, Store, StoreError, StoreUrl, WatchStats, now_ms};
use crate::db::{Change, DB_FILE, Db, write_atomic};

/// How often a watch looks at the file.
const POLL: Duration = Duration::from_millis(20);

/// The file store of one state directory.
#[derive(Debug)]
pub struct FileStore {
    db: Db,
    watched: Snapshot,
    stats: WatchStats,
}

impl FileStore {
    /// Opens the database in `dir`, which must exist (`dpctl init`).
    pub fn open(dir: &Path) -> Result<FileStore, StoreError> {
        Ok(FileStore {
            db: Db::open_existing(dir)?,
            watched: Snapshot::default(),
            stats: WatchStats::default(),
        })
    }

    /// The database itself (for the file-only commands: maps repair).
    pub fn db(&mut self) -> &mut Db {
        &mut self.db
    }

    fn agents_dir(&self) -> PathBuf {
        self.db.dir().join("agents")
    }

    fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
        StoreError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}

impl Store for FileStore {
    fn url(&self) -> StoreUrl {
        StoreUrl::File(self.db.dir().to_path_buf())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        self.db.refresh()?;
        Ok(Snapshot {
            revision: self.db.generation(),
            state: self.db.state().clone(),
        })
    }

    fn apply(&mut self, change: &Change) -> Result<u64, StoreError> {
        self.db.apply(change.clone())?;
        Ok(self.db.generation())
    }

    fn apply_batch(&mut self, changes: &[Change]) -> Result<u64, StoreError> {
        self.db.apply_many(changes)?;
        Ok(self.db.generation())
    }

    fn watch_start(&mut self) -> Result<&Snapshot, StoreError> {
        self.watched = self.load()?;
        self.stats.relists += 1;
        Ok(&self.watched)
    }

    fn watch_next(&mut self, timeout: Duration) -> Result<Option<&Snapshot>, StoreError> {
        let end = Instant::now() + timeout;
        let path = self.db.dir().join(DB_FILE);
        loop {
            // The file is replaced whole on every write: a new inode or
            // size or mtime means a new generation may be there.
            if fs::metadata(&path).is_ok() {
                self.db.refresh()?;
                if self.db.generation() != self.watched.revision {
                    self.watched = Snapshot {
                        revision: self.db.generation(),
                        state: self.db.state().clone(),
                    };
                    self.stats.responses += 1;
                    self.stats.events += 1;
                    self.stats.bytes += fs::metadata(&path).map_or(0, |m| m.len());
                    return Ok(Some(&self.watched));
                }
            }
            let now = Instant::now();
            if now >= end {
                return Ok(None);
            }
            std::thread::sleep(POLL.min(end - now));
        }
    }

    fn watch_stats(&self) -> WatchStats {
        self.stats
    }

    fn report(&mut self, report: &AgentReport) -> Result<(), StoreError> {
        let dir = self.agents_dir();
        fs::create_dir_all(&dir).map_err(|e| Self::io(&dir, e))?;
        let text = serde_json::to_vec(report).expect("reports serialise");
        write_atomic(
            &dir,
            &format!("{}-{}.json", report.kind.name(), report.id),
            &text,
        )?;
        Ok(())
    }

    fn agents(&mut self) -> Result<Vec<AgentInfo>, StoreError> {
        let dir = self.agents_dir();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let now = now_ms();
        let mut out = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let text = fs::read(&path).map_err(|e| Self::io(&path, e))?;
            let report: AgentReport =
                serde_json::from_slice(&text).map_err(|e| Self::io(&path, e))?;
            let alive = now.saturating_sub(report.at_ms) <= report.ttl_ms;
            out.push(AgentInfo { report, alive });
        }
        out.sort_by_key(|a| (a.report.kind, a.report.id));
        Ok(out)
    }

    fn size_bytes(&mut self) -> Result<u64, StoreError> {
        let path = self.db.dir().join(DB_FILE);
        fs::metadata(&path)
            .map(|m| m.len())
            .map_err(|e| Self::io(&path, e))
    }
}
