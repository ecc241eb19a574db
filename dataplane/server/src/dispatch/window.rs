//! Duplicate windows: the recent answers of each vCPU, so that a
//! retransmitted request is answered again without being applied twice.
//!
//! A window is keyed by (client, VM, vCPU): the dispatcher creates one
//! only for a request whose VM belongs to the client in its header (when
//! ownership is checked), so one tenant cannot reach another's windows.
//! Windows are bounded: at most [`MAX_VCPU_WINDOWS`] per VM and
//! [`MAX_WINDOWS`] per worker, each of at most [`WINDOW`] answers.

use std::collections::{BTreeMap, HashMap};

use devplane_wire::Status;

/// Answers a worker keeps per (client, VM, vCPU) so that a retransmitted
/// request is answered again without being applied twice. A client has at
/// most [`WINDOW`] requests of one vCPU in flight, so a retransmission is
/// always inside the window.
pub const WINDOW: usize = 256;

/// Most vCPU windows a worker keeps for one VM (vCPU ids are 16-bit; a
/// VM with more vCPUs than this is refused beyond it).
pub const MAX_VCPU_WINDOWS: u32 = 256;

/// Most windows a worker keeps in all. With [`WINDOW`] answers of about
/// 32 bytes each (a B-tree entry of a `u64` key and a 16-byte answer, with
/// the tree's slack) a full window is about 8 KiB, so a worker's windows
/// take at most about 128 MiB, whatever the traffic.
pub const MAX_WINDOWS: usize = 16_384;

/// Key of a window: (client, VM, vCPU).
pub type WindowKey = (u32, u32, u16);

/// A window's answers as they travel to another server: (sequence
/// number, status, data), oldest first.
pub type Answers = Vec<(u64, Status, u64)>;

/// What a window says about a request's sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Applied already: answer it again with this.
    Answered(Status, u64),
    /// Older than the window: answer `Stale`, do not apply.
    Stale,
    /// More than [`WINDOW`] beyond the newest number the window holds,
    /// and beyond what any client can have reached (see
    /// [`SeqWindow::lookup`]): refused, neither applied nor adopted.
    FarAhead,
    /// New: apply it.
    New,
}

/// The recent answers of one vCPU at this worker.
#[derive(Debug, Default, Clone)]
pub struct SeqWindow {
    answers: BTreeMap<u64, (Status, u64)>,
}

impl SeqWindow {
    /// What the window knows of `seq`. A vCPU numbers its requests to all
    /// models in one sequence, so a window at one worker sees gaps (the
    /// requests that went to other workers' models) and a restarted client
    /// starts anew: a number more than [`WINDOW`] beyond the newest is
    /// refused only if it is also at or above `reachable()`, the highest
    /// number a client can have reached (clients number from the wall
    /// clock in nanoseconds and send far fewer than one request per
    /// nanosecond). `reachable` is asked only then, so the common case
    /// reads no clock.
    pub(super) fn lookup(&self, seq: u64, reachable: impl FnOnce() -> u64) -> Seen {
        if let Some(&(s, d)) = self.answers.get(&seq) {
            return Seen::Answered(s, d);
        }
        let (Some((&oldest, _)), Some((&newest, _))) = (
            self.answers.first_key_value(),
            self.answers.last_key_value(),
        ) else {
            return Seen::New;
        };
        if self.answers.len() >= WINDOW && seq < oldest {
            return Seen::Stale;
        }
        if seq > newest.saturating_add(WINDOW as u64) && seq >= reachable() {
            return Seen::FarAhead;
        }
        Seen::New
    }

    pub(super) fn remember(&mut self, seq: u64, answer: (Status, u64)) {
        self.answers.insert(seq, answer);
        while self.answers.len() > WINDOW {
            self.answers.pop_first();
        }
    }

    /// Takes in the answers of `other` (the same vCPU's window at another
    /// worker), keeping the newest [`WINDOW`].
    pub(super) fn merge(&mut self, other: SeqWindow) {
        for (seq, answer) in other.answers {
            self.answers.entry(seq).or_insert(answer);
        }
        while self.answers.len() > WINDOW {
            self.answers.pop_first();
        }
    }
}

/// A worker's windows, with their limits.
#[derive(Debug, Default, Clone)]
pub struct Windows {
    map: HashMap<WindowKey, SeqWindow>,
    /// Windows per VM.
    per_vm: HashMap<u32, u32>,
}

impl Windows {
    /// The window of `key`, created if the limits allow; `None` when a
    /// limit is hit.
    pub(super) fn get(&mut self, key: WindowKey) -> Option<&mut SeqWindow> {
        if !self.map.contains_key(&key) {
            let n = self.per_vm.get(&key.1).copied().unwrap_or(0);
            if n >= MAX_VCPU_WINDOWS || self.map.len() >= MAX_WINDOWS {
                return None;
            }
            self.per_vm.insert(key.1, n + 1);
        }
        Some(self.map.entry(key).or_default())
    }

    /// How many windows exist.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Every window's answers, oldest first (for a hand-over to another
    /// server).
    pub fn export(&self) -> Vec<(WindowKey, Answers)> {
        self.map
            .iter()
            .map(|(&k, w)| {
                (
                    k,
                    w.answers
                        .iter()
                        .map(|(&seq, &(st, d))| (seq, st, d))
                        .collect(),
                )
            })
            .collect()
    }

    /// Windows holding `windows`' answers, within the limits (windows
    /// past them are left out, each keeps its newest [`WINDOW`] answers).
    pub fn import(
        windows: impl IntoIterator<Item = (WindowKey, Vec<(u64, Status, u64)>)>,
    ) -> Windows {
        let mut out = Windows::default();
        for (key, answers) in windows {
            if let Some(w) = out.get(key) {
                for (seq, st, d) in answers {
                    w.remember(seq, (st, d));
                }
            }
        }
        out
    }

    /// Keeps only what another server may hand over: windows whose VM
    /// `owned(client, vm)` says belongs to their client here, and answers
    /// numbered below `ceiling` (no client can have reached a number at or
    /// above it: such an answer would make every later request of that
    /// vCPU `Stale`). Returns (windows dropped, answers dropped).
    pub fn trim(&mut self, owned: impl Fn(u32, u32) -> bool, ceiling: u64) -> (usize, usize) {
        let (mut windows, mut answers) = (0, 0);
        self.map.retain(|&(client, vm, _), w| {
            if !owned(client, vm) {
                windows += 1;
                answers += w.answers.len();
                return false;
            }
            let before = w.answers.len();
            w.answers.retain(|&seq, _| seq < ceiling);
            answers += before - w.answers.len();
            !w.answers.is_empty()
        });
        self.per_vm.clear();
        for &(_, vm, _) in self.map.keys() {
            *self.per_vm.entry(vm).or_default() += 1;
        }
        (windows, answers)
    }

    /// Takes in `other`'s windows (a moved model's), within the limits.
    pub(super) fn merge(&mut self, other: Windows) {
        for (key, w) in other.map {
            if let Some(mine) = self.get(key) {
                mine.merge(w);
            }
        }
    }
}
