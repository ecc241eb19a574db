//! The watching half of an agent: a thread that holds the agent's store
//! handle, hands every new snapshot to the agent, and reports what the
//! agent applied under its lease.
//!
//! It survives the store going away: a failed watch or report drops the
//! handle, reconnects every [`RETRY`] and re-lists (so a restarted agent,
//! a restarted etcd and a compacted watch all end in a full re-list and
//! a reconcile to it). A clean stop ([`Agent`]'s drop) revokes the
//! lease; a killed agent's lease expires after its TTL.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{AgentKind, AgentReport, Snapshot, Store, StoreUrl, WatchStats, now_ms, open};

/// How long a failed store is left before the next try.
pub const RETRY: Duration = Duration::from_millis(500);
/// How long one wait for a change lasts (and so how soon a stop or a new
/// status is seen).
const TICK: Duration = Duration::from_millis(200);

/// What the agent has applied: the revision and, if it could not apply
/// everything, why.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The store revision reconciled to.
    pub revision: u64,
    /// What failed, if anything.
    pub error: Option<String>,
}

/// A running agent thread.
#[derive(Debug)]
pub struct Agent {
    applied: Arc<Mutex<Applied>>,
    stats: Arc<Mutex<WatchStats>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Its settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The store.
    pub url: StoreUrl,
    /// Which daemon.
    pub kind: AgentKind,
    /// Its platform id.
    pub id: u32,
    /// Its lease's TTL: reported at least every third of it.
    pub ttl: Duration,
    /// Say when the store fails and comes back (daemons; not the
    /// simulation's hundreds of agents).
    pub verbose: bool,
}

impl Agent {
    /// Starts the thread: `on_change` gets the first snapshot, then every
    /// newer one (after a re-list too), on the agent thread.
    pub fn spawn(
        cfg: AgentConfig,
        mut on_change: impl FnMut(&Snapshot) + Send + 'static,
    ) -> std::io::Result<Agent> {
        let applied = Arc::new(Mutex::new(Applied::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(Mutex::new(WatchStats::default()));
        let (a, s, w) = (applied.clone(), stop.clone(), stats.clone());
        let thread = std::thread::Builder::new()
            .name(format!("store-{}-{}", cfg.kind.name(), cfg.id))
            .spawn(move || run(&cfg, &a, &s, &w, &mut on_change))?;
        Ok(Agent {
            applied,
            stats,
            stop,
            thread: Some(thread),
        })
    }

    /// Records what the agent applied (reported at the next tick).
    pub fn set_applied(&self, revision: u64, error: Option<String>) {
        if let Ok(mut a) = self.applied.lock() {
            *a = Applied { revision, error };
        }
    }

    /// The watch's counters (summed over reconnects).
    pub fn watch_stats(&self) -> WatchStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    /// The revision last recorded with [`Agent::set_applied`].
    pub fn applied_revision(&self) -> u64 {
        self.applied.lock().map_or(0, |a| a.revision)
    }

    /// A handle to record what the agent applied from another thread.
    pub fn applied(&self) -> Arc<Mutex<Applied>> {
        self.applied.clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    cfg: &AgentConfig,
    applied: &Mutex<Applied>,
    stop: &AtomicBool,
    stats: &Mutex<WatchStats>,
    on_change: &mut dyn FnMut(&Snapshot),
) {
    let who = format!("{} {}", cfg.kind.name(), cfg.id);
    let mut failing = false;
    let fail = |failing: &mut bool, what: &str, e: &dyn std::fmt::Display| {
        if cfg.verbose && !*failing {
            eprintln!("devplane-{who}: store {}: {what}: {e}; retrying", cfg.url);
        }
        *failing = true;
    };
    while !stop.load(Ordering::Relaxed) {
        let mut store: Box<dyn Store> = match open(&cfg.url) {
            Ok(s) => s,
            Err(e) => {
                fail(&mut failing, "cannot open", &e);
                std::thread::sleep(RETRY);
                continue;
            }
        };
        match store.watch_start() {
            Ok(snap) => on_change(snap),
            Err(e) => {
                fail(&mut failing, "cannot list", &e);
                std::thread::sleep(RETRY);
                continue;
            }
        }
        if failing && cfg.verbose {
            eprintln!("devplane-{who}: store {} is back: re-listed", cfg.url);
        }
        failing = false;
        let mut reported: Option<(Applied, Instant)> = None;
        let mut base = store.watch_stats();
        let add = |store: &dyn Store, base: &mut WatchStats| {
            let now = store.watch_stats();
            if let Ok(mut s) = stats.lock() {
                s.responses += now.responses - base.responses;
                s.events += now.events - base.events;
                s.bytes += now.bytes - base.bytes;
                s.relists += now.relists - base.relists;
            }
            *base = now;
        };
        if let Ok(mut s) = stats.lock() {
            s.relists += 1;
        }
        base.relists = store.watch_stats().relists;
        while !stop.load(Ordering::Relaxed) {
            let r = store.watch_next(TICK);
            match r {
                Ok(Some(snap)) => on_change(snap),
                Ok(None) => {}
                Err(e) => {
                    fail(&mut failing, "watch lost", &e);
                    break;
                }
            }
            add(&*store, &mut base);
            let now = applied.lock().map(|a| a.clone()).unwrap_or_default();
            let due = match &reported {
                None => true,
                Some((last, at)) => *last != now || at.elapsed() >= cfg.ttl / 3,
            };
            if due {
                let r = AgentReport {
                    kind: cfg.kind,
                    id: cfg.id,
                    applied: now.revision,
                    error: now.error.clone(),
                    at_ms: now_ms(),
                    ttl_ms: u64::try_from(cfg.ttl.as_millis()).unwrap_or(u64::MAX),
                };
                if let Err(e) = store.report(&r) {
                    fail(&mut failing, "cannot report", &e);
                    break;
                }
                reported = Some((now, Instant::now()));
            }
        }
        if !stop.load(Ordering::Relaxed) {
            std::thread::sleep(RETRY);
        }
    }
}
