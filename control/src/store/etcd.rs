//! The etcd backend (the v3 API through the `etcd-client` crate).
//!
//! The crate is async (tonic); this handle owns a current-thread tokio
//! runtime and blocks on it, so the daemons keep their plain threads.
//! Keys are laid out as [`super::layout`] says.
//!
//! - **Load**: the data prefix read in pages of [`PAGE`] keys, every page
//!   at the revision of the first (one consistent state however large).
//! - **Apply**: load, validate ([`State::changed`]), then one transaction:
//!   `if mod_revision(meta) == the revision read then puts/deletes + put
//!   meta`; refused if any other change came in between, and then tried
//!   again from a fresh load (up to [`TRIES`] times).
//! - **Watch**: a prefix watch from the revision after the load; each
//!   event updates the copy in place ([`layout::apply_kv`]); a cancelled
//!   or compacted watch, or a broken stream, makes the next call re-list.
//! - **Agents**: a report is put under a lease of its TTL, granted on the
//!   first report and kept alive by each next one; if the lease is gone
//!   (expired while the agent or etcd was away) a new one is granted.

use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, Txn, TxnOp,
    WatchOptions, WatchStream,
};

use super::layout::{self, AGENTS_PREFIX, DATA_PREFIX, META_KEY, Op};
use super::{AgentInfo, AgentReport, Snapshot, Store, StoreError, StoreUrl, WatchStats};
use crate::db::{Change, State};

/// Keys per page of a load.
pub const PAGE: i64 = 2000;
/// Writes per transaction of a bulk import (etcd's default
/// `--max-txn-ops` is 128; one is the meta key).
pub const BATCH_OPS: usize = 120;
/// How often a change is tried against a store that keeps changing.
pub const TRIES: u32 = 20;
/// Largest message accepted from etcd (a page of a load, a watch
/// response of a large transaction).
const MAX_MESSAGE: usize = 64 << 20;

/// A handle on an etcd store.
pub struct EtcdStore {
    endpoint: String,
    rt: tokio::runtime::Runtime,
    client: Client,
    watched: Snapshot,
    /// The etcd revision the watched state was read at (the watch
    /// continues after it).
    watched_at: i64,
    watch: Option<WatchStream>,
    stats: WatchStats,
    lease: Option<i64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoint", &self.endpoint)
            .field("revision", &self.watched.revision)
            .finish_non_exhaustive()
    }
}

struct Loaded {
    snapshot: Snapshot,
    /// The etcd revision it was read at.
    at: i64,
    /// The meta key's mod-revision (0: no change yet).
    meta: i64,
}

impl EtcdStore {
    /// Connects to `endpoint` (`http://HOST:PORT`).
    pub fn connect(endpoint: &str) -> Result<EtcdStore, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Etcd {
                endpoint: endpoint.to_string(),
                message: format!("cannot start a runtime: {e}"),
            })?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(10));
        let client = rt
            .block_on(Client::connect([endpoint], Some(opts)))
            .map_err(|e| StoreError::Etcd {
                endpoint: endpoint.to_string(),
                message: format!("cannot connect: {e}"),
            })?;
        Ok(EtcdStore {
            endpoint: endpoint.to_string(),
            rt,
            client,
            watched: Snapshot::default(),
            watched_at: 0,
            watch: None,
            stats: WatchStats::default(),
            lease: None,
        })
    }

    fn err(&self, what: &str, e: impl std::fmt::Display) -> StoreError {
        StoreError::Etcd {
            endpoint: self.endpoint.clone(),
            message: format!("{what}: {e}"),
        }
    }

    fn load_at(&mut self) -> Result<Loaded, StoreError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(MAX_MESSAGE);
        let end = prefix_end(DATA_PREFIX);
        let mut from = DATA_PREFIX.as_bytes().to_vec();
        let mut at = 0i64;
        let mut state = State::default();
        let mut meta = 0i64;
        loop {
            let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
            if at != 0 {
                opts = opts.with_revision(at);
            }
            let resp = self
                .rt
                .block_on(kv.get(from.clone(), Some(opts)))
                .map_err(|e| self.err("cannot read the store", e))?;
            if at == 0 {
                at = resp.header().map_or(0, |h| h.revision());
            }
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if key == META_KEY {
                    meta = kv.mod_revision();
                } else {
                    layout::apply_kv(&mut state, &key, Some(kv.value()))?;
                }
            }
            match (resp.more(), resp.kvs().last()) {
                (true, Some(last)) => {
                    from = last.key().to_vec();
                    from.push(0);
                }
                _ => break,
            }
        }
        state.validate()?;
        Ok(Loaded {
            snapshot: Snapshot {
                revision: u64::try_from(meta).unwrap_or(0),
                state,
            },
            at,
            meta,
        })
    }

    /// Writes `ops` (and the meta key) if the meta key is still at `meta`;
    /// the new revision, or `None` if another change came first.
    fn commit(&mut self, meta: i64, ops: &[Op]) -> Result<Option<i64>, StoreError> {
        let mut txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(k.as_bytes(), v.clone(), None),
                Op::Delete(k) => TxnOp::delete(k.as_bytes(), None),
            })
            .collect();
        txn_ops.push(TxnOp::put(META_KEY, br#"{"format":1}"#.to_vec(), None));
        let txn = Txn::new()
            .when([Compare::mod_revision(META_KEY, CompareOp::Equal, meta)])
            .and_then(txn_ops);
        let resp = self
            .rt
            .block_on(self.client.txn(txn))
            .map_err(|e| self.err("cannot write the store", e))?;
        Ok(resp
            .succeeded()
            .then(|| resp.header().map_or(0, |h| h.revision())))
    }

    fn relist(&mut self) -> Result<(), StoreError> {
        self.watch = None;
        let loaded = self.load_at()?;
        self.stats.relists += 1;
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(loaded.at + 1);
        let watch = self
            .rt
            .block_on(self.client.watch(DATA_PREFIX, Some(opts)))
            .map_err(|e| self.err("cannot watch the store", e))?;
        self.watched = loaded.snapshot;
        self.watched_at = loaded.at;
        self.watch = Some(watch);
        Ok(())
    }

    fn lease_alive(&mut self, id: i64) -> bool {
        let r = self.rt.block_on(async {
            let (mut keeper, mut stream) = self.client.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            stream.message().await
        });
        matches!(r, Ok(Some(resp)) if resp.ttl() > 0)
    }
}

/// The key just past every key starting with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

impl Store for EtcdStore {
    fn url(&self) -> StoreUrl {
        StoreUrl::Etcd(self.endpoint.clone())
    }

    fn load(&mut self) -> Result<Snapshot, StoreError> {
        Ok(self.load_at()?.snapshot)
    }

    fn apply(&mut self, change: &Change) -> Result<u64, StoreError> {
        for _ in 0..TRIES {
            let loaded = self.load_at()?;
            let next = loaded.snapshot.state.changed(change)?;
            let ops = layout::diff(&loaded.snapshot.state, &next);
            if let Some(rev) = self.commit(loaded.meta, &ops)? {
                return Ok(u64::try_from(rev).unwrap_or(0));
            }
        }
        Err(StoreError::Contended { tries: TRIES })
    }

    fn apply_batch(&mut self, changes: &[Change]) -> Result<u64, StoreError> {
        let loaded = self.load_at()?;
        let next = loaded.snapshot.state.changed_many(changes)?;
        let ops = layout::diff(&loaded.snapshot.state, &next);
        let mut meta = loaded.meta;
        for chunk in ops.chunks(BATCH_OPS) {
            match self.commit(meta, chunk)? {
                Some(rev) => meta = rev,
                None => return Err(StoreError::Contended { tries: 1 }),
            }
        }
        Ok(u64::try_from(meta).unwrap_or(0))
    }

    fn watch_start(&mut self) -> Result<&Snapshot, StoreError> {
        self.relist()?;
        Ok(&self.watched)
    }

    fn watch_next(&mut self, timeout: Duration) -> Result<Option<&Snapshot>, StoreError> {
        if self.watch.is_none() {
            self.relist()?;
            return Ok(Some(&self.watched));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changed = false;
        loop {
            let stream = self.watch.as_mut().expect("a watch is open");
            // After the first response, take what is already there without
            // waiting (the rest of one burst of changes).
            let wait = if changed {
                Duration::ZERO
            } else {
                deadline.saturating_duration_since(tokio::time::Instant::now())
            };
            let msg = self
                .rt
                .block_on(async { tokio::time::timeout(wait, stream.message()).await });
            let resp = match msg {
                Err(_elapsed) => break,
                Ok(Ok(Some(resp))) => resp,
                Ok(Ok(None)) | Ok(Err(_)) => {
                    // The stream ended or broke (etcd restarted, the
                    // connection dropped): re-list.
                    self.relist()?;
                    return Ok(Some(&self.watched));
                }
            };
            self.stats.responses += 1;
            if resp.canceled() || resp.compact_revision() != 0 {
                // Compacted past our revision or cancelled: what we missed
                // is gone from the history; re-list.
                self.relist()?;
                return Ok(Some(&self.watched));
            }
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                self.stats.events += 1;
                self.stats.bytes += (kv.key().len() + kv.value().len()) as u64;
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if key == META_KEY {
                    self.watched.revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
                }
                match ev.event_type() {
                    EventType::Put => {
                        layout::apply_kv(&mut self.watched.state, &key, Some(kv.value()))?
                    }
                    EventType::Delete => layout::apply_kv(&mut self.watched.state, &key, None)?,
                }
                self.watched_at = self.watched_at.max(kv.mod_revision());
                changed = true;
            }
        }
        Ok(changed.then_some(&self.watched))
    }

    fn watch_stats(&self) -> WatchStats {
        self.stats
    }

    fn report(&mut self, report: &AgentReport) -> Result<(), StoreError> {
        let ttl = i64::try_from(report.ttl_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX);
        let held = self.lease;
        let alive = held.filter(|&id| self.lease_alive(id));
        let lease = match alive {
            Some(id) => id,
            None => {
                let granted = self
                    .rt
                    .block_on(self.client.lease_grant(ttl, None))
                    .map_err(|e| self.err("cannot grant a lease", e))?;
                granted.id()
            }
        };
        self.lease = Some(lease);
        let value = serde_json::to_vec(report).expect("reports serialise");
        let key = layout::agent_key(report.kind, report.id);
        self.rt
            .block_on(
                self.client
                    .put(key, value, Some(PutOptions::new().with_lease(lease))),
            )
            .map_err(|e| self.err("cannot report", e))?;
        Ok(())
    }

    fn agents(&mut self) -> Result<Vec<AgentInfo>, StoreError> {
        let resp = self
            .rt
            .block_on(
                self.client
                    .get(AGENTS_PREFIX, Some(GetOptions::new().with_prefix())),
            )
            .map_err(|e| self.err("cannot read the agents", e))?;
        let mut out = Vec::new();
        for kv in resp.kvs() {
            let report: AgentReport =
                serde_json::from_slice(kv.value()).map_err(|e| StoreError::Corrupt {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    message: e.to_string(),
                })?;
            // The key exists only while its lease holds.
            out.push(AgentInfo {
                report,
                alive: kv.lease() != 0,
            });
        }
        out.sort_by_key(|a| (a.report.kind, a.report.id));
        Ok(out)
    }

    fn size_bytes(&mut self) -> Result<u64, StoreError> {
        let st = self
            .rt
            .block_on(self.client.status())
            .map_err(|e| self.err("cannot read the status", e))?;
        Ok(u64::try_from(st.db_size()).unwrap_or(0))
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // A clean stop revokes the lease: the agent is gone at once, not
        // after its TTL.
        if let Some(id) = self.lease.take() {
            let _ = self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(1), self.client.lease_revoke(id)).await
            });
        }
    }
}
