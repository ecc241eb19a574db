//! Duplicate windows: the recent answers of each vCPU, so that a
//! retransmitted request is answered again without being applied twice.

use std::collections::BTreeMap;

use devplane_wire::Status;

/// Answers a worker keeps per (VM, vCPU) so that a retransmitted request
/// is answered again without being applied twice. A client has at most
/// [`WINDOW`] requests of one vCPU in flight, so a retransmission is always
/// inside the window.
pub const WINDOW: usize = 256;

/// The recent answers of one vCPU at this worker.
#[derive(Debug, Default, Clone)]
pub struct SeqWindow {
    answers: BTreeMap<u64, (Status, u64)>,
}

impl SeqWindow {
    /// `Some(answer)` for a request already applied, `Some(Stale)` for one
    /// older than the window, `None` for a new one.
    pub(super) fn lookup(&self, seq: u64) -> Option<(Status, u64)> {
        if let Some(a) = self.answers.get(&seq) {
            return Some(*a);
        }
        match self.answers.first_key_value() {
            Some((&oldest, _)) if self.answers.len() >= WINDOW && seq < oldest => {
                Some((Status::Stale, 0))
            }
            _ => None,
        }
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
