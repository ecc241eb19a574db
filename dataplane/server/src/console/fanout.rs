//! One console's viewers: who is attached, who is the writer, and what
//! each has yet to be sent. Pure code (no I/O): the console thread moves
//! the bytes ([`super::Hub`]).
//!
//! Bounds: every viewer has at most [`VIEWER_LIMIT`] bytes queued. Output
//! that does not fit is dropped *for that viewer* and counted; once its
//! queue has room again it is told how much it missed (a marker line)
//! before the output goes on. So a viewer that does not read (a stuck
//! terminal, a `dpctl` stopped with Ctrl-Z) costs its own bytes, never the
//! model's time, the worker's or another viewer's. A new viewer first gets
//! the last [`HISTORY`] bytes of output, so that it sees the prompt the
//! guest printed before it came.

use std::collections::VecDeque;

/// Most bytes queued for one viewer.
pub const VIEWER_LIMIT: usize = 64 * 1024;
/// Bytes of recent output a new viewer is sent first.
pub const HISTORY: usize = 4 * 1024;
/// Most viewers of one console.
pub const MAX_VIEWERS: usize = 16;

/// Why a viewer was not attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// Another viewer writes to this console.
    #[error(
        "the console already has a writer (one at a time): attach with --read-only to watch, or detach the other one first"
    )]
    WriterTaken,
    /// [`MAX_VIEWERS`] are attached.
    #[error("the console has {MAX_VIEWERS} viewers already, the most it takes")]
    TooMany,
}

/// One attached viewer.
#[derive(Debug)]
struct Viewer {
    id: u64,
    writer: bool,
    queue: VecDeque<u8>,
    /// Bytes dropped since the last marker (not yet told).
    gap: u64,
}

/// One console's viewers and counters.
#[derive(Debug, Default)]
pub struct Fanout {
    history: VecDeque<u8>,
    viewers: Vec<Viewer>,
    next_id: u64,
    /// Output bytes pushed.
    pub output_bytes: u64,
    /// Input bytes the writer sent on.
    pub input_bytes: u64,
    /// Output bytes dropped for viewers that did not keep up (summed over
    /// viewers).
    pub viewer_dropped: u64,
    /// Writers refused because there was one.
    pub writers_refused: u64,
}

/// The line a viewer is sent where it missed `n` bytes.
pub fn gap_marker(n: u64) -> String {
    format!("\r\n[console: {n} bytes dropped: this viewer did not keep up]\r\n")
}

impl Fanout {
    /// A console with no viewers.
    pub fn new() -> Fanout {
        Fanout::default()
    }

    /// Attaches a viewer (the writer if `write`); its queue starts with
    /// `greeting` then the recent output. Refused if `write` and there is
    /// a writer, or if [`MAX_VIEWERS`] are attached.
    pub fn attach(&mut self, write: bool, greeting: &[u8]) -> Result<u64, AttachError> {
        if write && self.writer().is_some() {
            self.writers_refused += 1;
            return Err(AttachError::WriterTaken);
        }
        if self.viewers.len() >= MAX_VIEWERS {
            return Err(AttachError::TooMany);
        }
        self.next_id += 1;
        let mut queue = VecDeque::with_capacity(greeting.len() + self.history.len());
        queue.extend(greeting);
        queue.extend(&self.history);
        self.viewers.push(Viewer {
            id: self.next_id,
            writer: write,
            queue,
            gap: 0,
        });
        Ok(self.next_id)
    }

    /// Detaches viewer `id` (a writer's place is free again).
    pub fn detach(&mut self, id: u64) {
        self.viewers.retain(|v| v.id != id);
    }

    /// The writer's id, if one is attached.
    pub fn writer(&self) -> Option<u64> {
        self.viewers.iter().find(|v| v.writer).map(|v| v.id)
    }

    /// Viewers attached.
    pub fn len(&self) -> usize {
        self.viewers.len()
    }

    /// No viewer attached.
    pub fn is_empty(&self) -> bool {
        self.viewers.is_empty()
    }

    /// Ids of the attached viewers.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.viewers.iter().map(|v| v.id)
    }

    /// Output from the guest: kept as history and queued for every viewer
    /// as far as its bound allows (the rest dropped for it and counted).
    pub fn push(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        self.output_bytes += bytes.len() as u64;
        let keep = &bytes[bytes.len().saturating_sub(HISTORY)..];
        let over = (self.history.len() + keep.len()).saturating_sub(HISTORY);
        self.history.drain(..over);
        self.history.extend(keep);
        for v in &mut self.viewers {
            self.viewer_dropped += offer(v, bytes);
        }
    }

    /// What viewer `id` has yet to be sent, as up to two slices (empty if
    /// none or no such viewer).
    pub fn pending(&self, id: u64) -> (&[u8], &[u8]) {
        match self.viewers.iter().find(|v| v.id == id) {
            Some(v) => v.queue.as_slices(),
            None => (&[], &[]),
        }
    }

    /// Viewer `id` was sent `n` more bytes of its queue.
    pub fn sent(&mut self, id: u64, n: usize) {
        if let Some(v) = self.viewers.iter_mut().find(|v| v.id == id) {
            let n = n.min(v.queue.len());
            v.queue.drain(..n);
        }
    }

    /// Bytes queued for viewer `id`.
    pub fn queued(&self, id: u64) -> usize {
        self.viewers
            .iter()
            .find(|v| v.id == id)
            .map_or(0, |v| v.queue.len())
    }

    /// Whether viewer `id` is the writer.
    pub fn is_writer(&self, id: u64) -> bool {
        self.viewers.iter().any(|v| v.id == id && v.writer)
    }
}

/// Queues `bytes` for `v` within its bound; returns how many were dropped.
/// After a drop, the marker and the output go on only once both fit.
fn offer(v: &mut Viewer, bytes: &[u8]) -> u64 {
    let room = VIEWER_LIMIT.saturating_sub(v.queue.len());
    if v.gap > 0 {
        let marker = gap_marker(v.gap);
        if room < marker.len() + bytes.len() {
            v.gap += bytes.len() as u64;
            return bytes.len() as u64;
        }
        v.queue.extend(marker.as_bytes());
        v.gap = 0;
        v.queue.extend(bytes);
        return 0;
    }
    if bytes.len() <= room {
        v.queue.extend(bytes);
        return 0;
    }
    v.queue.extend(&bytes[..room]);
    let dropped = (bytes.len() - room) as u64;
    v.gap = dropped;
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(f: &mut Fanout, id: u64) -> Vec<u8> {
        let (a, b) = f.pending(id);
        let out = [a, b].concat();
        f.sent(id, out.len());
        out
    }

    #[test]
    fn one_writer_many_readers() {
        let mut f = Fanout::new();
        let w = f.attach(true, b"").unwrap();
        assert_eq!(f.attach(true, b""), Err(AttachError::WriterTaken));
        assert_eq!(f.writers_refused, 1);
        let r1 = f.attach(false, b"").unwrap();
        let r2 = f.attach(false, b"").unwrap();
        assert!(f.is_writer(w) && !f.is_writer(r1) && !f.is_writer(r2));
        assert_eq!(f.writer(), Some(w));
        f.detach(w);
        assert_eq!(f.writer(), None);
        let w2 = f
            .attach(true, b"")
            .expect("the writer's place is free again");
        assert_eq!(f.writer(), Some(w2));
        for _ in f.len()..MAX_VIEWERS {
            f.attach(false, b"").unwrap();
        }
        assert_eq!(f.attach(false, b""), Err(AttachError::TooMany));
        assert!(
            AttachError::WriterTaken.to_string().contains("--read-only"),
            "the refusal says what to do"
        );
    }

    #[test]
    fn every_viewer_gets_the_output_after_its_greeting_and_the_history() {
        let mut f = Fanout::new();
        f.push(b"boot\r\n");
        let a = f.attach(false, b"{hello}\n").unwrap();
        f.push(b"$ ");
        let b = f.attach(true, b"{hi}\n").unwrap();
        f.push(b"ls");
        assert_eq!(drain(&mut f, a), b"{hello}\nboot\r\n$ ls");
        assert_eq!(drain(&mut f, b), b"{hi}\nboot\r\n$ ls");
        assert!(drain(&mut f, a).is_empty());
        assert_eq!(f.output_bytes, 10);
        // History keeps the last HISTORY bytes only.
        f.push(&vec![b'x'; HISTORY * 3]);
        let c = f.attach(false, b"").unwrap();
        assert_eq!(drain(&mut f, c), vec![b'x'; HISTORY]);
        f.detach(a);
        assert!(f.pending(a).0.is_empty(), "a detached viewer has nothing");
    }

    #[test]
    fn a_viewer_that_does_not_read_loses_its_own_bytes_only_and_is_told() {
        let mut f = Fanout::new();
        let stuck = f.attach(false, b"").unwrap();
        let live = f.attach(true, b"").unwrap();
        let chunk: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let mut got = Vec::new();
        let mut total = 0usize;
        for _ in 0..200 {
            f.push(&chunk);
            total += chunk.len();
            got.extend(drain(&mut f, live));
            // The stuck one never reads: its queue stays bounded.
            assert!(f.queued(stuck) <= VIEWER_LIMIT);
        }
        assert_eq!(got.len(), total, "the live viewer lost nothing");
        assert_eq!(got, chunk.repeat(200));
        let dropped = (total - VIEWER_LIMIT) as u64;
        assert_eq!(f.viewer_dropped, dropped);
        // It reads again: what it had, then the marker, then new output.
        let before = drain(&mut f, stuck);
        assert_eq!(before.len(), VIEWER_LIMIT);
        assert_eq!(before[..], chunk.repeat(200)[..VIEWER_LIMIT]);
        f.push(b"after");
        let after = drain(&mut f, stuck);
        let marker = gap_marker(dropped);
        assert_eq!(after, [marker.as_bytes(), b"after"].concat());
        assert_eq!(f.viewer_dropped, dropped, "nothing more dropped");
        // Still short of room for the marker and the bytes: still dropped.
        let mut g = Fanout::new();
        let s = g.attach(false, b"").unwrap();
        g.push(&vec![0; VIEWER_LIMIT + 5]);
        g.sent(s, 10);
        g.push(b"0123456789");
        assert_eq!(g.viewer_dropped, 15);
        assert_eq!(g.queued(s), VIEWER_LIMIT - 10);
    }
}
