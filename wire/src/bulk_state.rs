//! Pure state of the bulk protocol ([`crate::bulk`]), shared by the
//! server's bulk engine and the client's bulk disk: segment bitmaps,
//! reassembly with bounded memory, and the exactly-once window of block
//! requests. No I/O and no clock: callers pass the time in.

use std::collections::{BTreeMap, HashMap};
use std::vec::Vec;

use crate::bulk::{MAX_SEGS, nseg_ok, seg_len, seg_range};

const WORDS: usize = MAX_SEGS.div_ceil(64);

/// Which segments of a request's data are held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegBitmap {
    words: [u64; WORDS],
    nseg: u16,
    held: u16,
}

impl SegBitmap {
    /// None of `nseg` segments held (`nseg` is capped at [`MAX_SEGS`]).
    pub fn new(nseg: u16) -> SegBitmap {
        SegBitmap {
            words: [0; WORDS],
            nseg: nseg.min(MAX_SEGS as u16),
            held: 0,
        }
    }

    /// Every one of `nseg` segments held.
    pub fn full(nseg: u16) -> SegBitmap {
        let mut b = SegBitmap::new(nseg);
        for s in 0..b.nseg {
            b.set(s);
        }
        b
    }

    /// Marks segment `seg` held; false if it already was (or is out of
    /// range).
    pub fn set(&mut self, seg: u16) -> bool {
        if seg >= self.nseg {
            return false;
        }
        let (w, bit) = (seg as usize / 64, 1u64 << (seg % 64));
        if self.words[w] & bit != 0 {
            return false;
        }
        self.words[w] |= bit;
        self.held += 1;
        true
    }

    /// Whether segment `seg` is held.
    pub fn has(&self, seg: u16) -> bool {
        seg < self.nseg && self.words[seg as usize / 64] & (1u64 << (seg % 64)) != 0
    }

    /// Whether every segment is held.
    pub fn complete(&self) -> bool {
        self.held == self.nseg
    }

    /// Segments held.
    pub fn held(&self) -> u16 {
        self.held
    }

    /// Segments in all.
    pub fn nseg(&self) -> u16 {
        self.nseg
    }

    /// The segments not held, in order.
    pub fn missing(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.nseg).filter(|s| !self.has(*s))
    }

    /// The bitmap as bytes (bit `s % 8` of byte `s / 8` is segment `s`),
    /// `nseg.div_ceil(8)` of them, into `out`; returns how many.
    pub fn to_bytes(&self, out: &mut [u8]) -> usize {
        let n = (self.nseg as usize).div_ceil(8).min(out.len());
        for (i, b) in out.iter_mut().enumerate().take(n) {
            *b = (self.words[i / 8] >> ((i % 8) * 8)) as u8;
        }
        n
    }

    /// A bitmap of `nseg` segments from bytes [`SegBitmap::to_bytes`]
    /// wrote (missing bytes are zeros; bits past `nseg` are ignored).
    pub fn from_bytes(nseg: u16, bytes: &[u8]) -> SegBitmap {
        let mut b = SegBitmap::new(nseg);
        for s in 0..b.nseg {
            if bytes
                .get(s as usize / 8)
                .is_some_and(|v| v & (1 << (s % 8)) != 0)
            {
                b.set(s);
            }
        }
        b
    }
}

/// A request's data being put together from its segments.
#[derive(Debug)]
pub struct Partial {
    /// The data, `len` bytes.
    pub data: Vec<u8>,
    /// The segments held.
    pub have: SegBitmap,
    /// When its last segment arrived (the caller's clock, ns).
    pub touched: u64,
}

impl Partial {
    /// An empty buffer for `len` bytes arriving in `nseg` segments.
    pub fn new(len: u32, nseg: u16, now: u64) -> Partial {
        Partial {
            data: std::vec![0u8; len as usize],
            have: SegBitmap::new(nseg),
            touched: now,
        }
    }

    /// Copies segment `seg` in; false if it was a duplicate or does not
    /// fit (wrong length).
    pub fn put(&mut self, seg: u16, bytes: &[u8], now: u64) -> bool {
        let len = self.data.len() as u32;
        let nseg = self.have.nseg();
        if seg >= nseg || bytes.len() != seg_len(len, nseg, seg) || self.have.has(seg) {
            return false;
        }
        let (start, end) = seg_range(len, nseg, seg);
        let Some(dst) = self.data.get_mut(start..end) else {
            return false;
        };
        dst.copy_from_slice(bytes);
        self.have.set(seg);
        self.touched = now;
        true
    }
}

/// What became of a segment given to [`Reassembly::put`].
#[derive(Debug, PartialEq, Eq)]
pub enum Put {
    /// Held; more are missing.
    Held,
    /// A segment already held (a retransmission).
    Duplicate,
    /// That was the last one: here is the whole data.
    Complete(Vec<u8>),
    /// No room within the memory budget: dropped (the sender resends).
    NoRoom,
    /// The segment does not fit the request (length).
    Bad,
}

/// Requests being reassembled, keyed by `K`, within a memory budget, and
/// within a share of it per owner (a tenant: see
/// [`Reassembly::with_shares`]), so that one owner's partial requests
/// cannot take all the room and starve the others.
#[derive(Debug)]
pub struct Reassembly<K> {
    parts: HashMap<K, Partial>,
    bytes: usize,
    budget: usize,
    max_parts: usize,
    /// Most bytes and requests of one owner.
    share: (usize, usize),
    /// Who owns a request.
    owner: fn(&K) -> u32,
    /// Each owner's (bytes, requests) held.
    owners: HashMap<u32, (usize, usize)>,
}

impl<K: core::hash::Hash + Eq + Copy> Reassembly<K> {
    /// At most `budget` bytes of data and `max_parts` requests at once.
    pub fn new(budget: usize, max_parts: usize) -> Reassembly<K> {
        Reassembly::with_shares(budget, max_parts, (budget, max_parts), |_| 0)
    }

    /// As [`Reassembly::new`], and at most `share` (bytes, requests) of
    /// them owned by any one `owner(key)`.
    pub fn with_shares(
        budget: usize,
        max_parts: usize,
        share: (usize, usize),
        owner: fn(&K) -> u32,
    ) -> Reassembly<K> {
        Reassembly {
            parts: HashMap::new(),
            bytes: 0,
            budget,
            max_parts,
            share,
            owner,
            owners: HashMap::new(),
        }
    }

    /// Bytes and requests held for `owner`.
    pub fn owned(&self, owner: u32) -> (usize, usize) {
        self.owners.get(&owner).copied().unwrap_or((0, 0))
    }

    fn release(&mut self, key: &K, len: usize) {
        self.bytes -= len;
        let o = (self.owner)(key);
        if let Some(e) = self.owners.get_mut(&o) {
            e.0 -= len;
            e.1 -= 1;
            if e.1 == 0 {
                self.owners.remove(&o);
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Requests being reassembled.
    pub fn len(&self) -> usize {
        self.parts.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The segments of `key` held, if it is being reassembled.
    pub fn have(&self, key: &K) -> Option<SegBitmap> {
        self.parts.get(key).map(|p| p.have)
    }

    /// Adds segment `seg` of a request of `len` bytes sent in `nseg`
    /// segments (a segment naming another `nseg` than the first one did is
    /// [`Put::Bad`]).
    pub fn put(&mut self, key: K, len: u32, nseg: u16, seg: u16, bytes: &[u8], now: u64) -> Put {
        if !nseg_ok(len, nseg) || seg >= nseg {
            return Put::Bad;
        }
        if !self.parts.contains_key(&key) {
            if nseg == 1 {
                // One segment: no buffer kept.
                return if bytes.len() == len as usize && seg == 0 {
                    Put::Complete(bytes.to_vec())
                } else {
                    Put::Bad
                };
            }
            let (ob, op) = self.owned((self.owner)(&key));
            if self.parts.len() >= self.max_parts
                || self.bytes + len as usize > self.budget
                || op >= self.share.1
                || ob + len as usize > self.share.0
            {
                return Put::NoRoom;
            }
            self.parts.insert(key, Partial::new(len, nseg, now));
            self.bytes += len as usize;
            let e = self.owners.entry((self.owner)(&key)).or_default();
            e.0 += len as usize;
            e.1 += 1;
        }
        let Some(p) = self.parts.get_mut(&key) else {
            return Put::Bad;
        };
        if p.data.len() != len as usize || p.have.nseg() != nseg {
            return Put::Bad;
        }
        if p.have.has(seg) {
            return Put::Duplicate;
        }
        if !p.put(seg, bytes, now) {
            return Put::Bad;
        }
        if !p.have.complete() {
            return Put::Held;
        }
        match self.parts.remove(&key) {
            Some(p) => {
                self.release(&key, p.data.len());
                Put::Complete(p.data)
            }
            None => Put::Bad,
        }
    }

    /// Drops requests whose last segment is older than `older_than`
    /// (their sender gave up or will send them again); returns how many.
    pub fn expire(&mut self, older_than: u64) -> usize {
        let old: Vec<(K, usize)> = self
            .parts
            .iter()
            .filter(|(_, p)| p.touched < older_than)
            .map(|(k, p)| (*k, p.data.len()))
            .collect();
        for (k, len) in &old {
            self.parts.remove(k);
            self.release(k, *len);
        }
        old.len()
    }

    /// Forgets `key`.
    pub fn remove(&mut self, key: &K) {
        if let Some(p) = self.parts.remove(key) {
            self.release(key, p.data.len());
        }
    }
}

/// Where a block request stands in its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Never seen: apply it.
    New,
    /// Being applied (its I/O is in flight).
    InFlight,
    /// Done, with this status byte: answer again, do not apply.
    Done(u8),
    /// Older than the window: not applied.
    Stale,
}

/// The exactly-once window of one (client, VM)'s block requests: ids are
/// per VM and rise, but complete out of order, so the window keeps the
/// last [`BlockWindow::CAP`] ids it saw with their state and a floor
/// below which anything unknown is stale.
#[derive(Debug, Clone, Default)]
pub struct BlockWindow {
    ids: BTreeMap<u64, Option<u8>>,
    floor: u64,
}

impl BlockWindow {
    /// Ids remembered per window.
    pub const CAP: usize = 1024;

    /// Where `id` stands.
    pub fn lookup(&self, id: u64) -> Seen {
        match self.ids.get(&id) {
            Some(None) => Seen::InFlight,
            Some(Some(s)) => Seen::Done(*s),
            None if id <= self.floor => Seen::Stale,
            None => Seen::New,
        }
    }

    /// `id` is being applied. When the window is full the oldest done
    /// id is forgotten (the floor rises to it); false if every
    /// remembered id is still in flight (then `id` must not be applied
    /// now).
    pub fn start(&mut self, id: u64) -> bool {
        if self.ids.len() >= Self::CAP {
            let oldest_done = self.ids.iter().find(|(_, s)| s.is_some()).map(|(k, _)| *k);
            let Some(k) = oldest_done else {
                return false;
            };
            // Everything below a forgotten id is forgotten too.
            let keep = self.ids.split_off(&(k + 1));
            let below: Vec<u64> = self
                .ids
                .iter()
                .filter(|(_, s)| s.is_none())
                .map(|(k, _)| *k)
                .collect();
            self.ids = keep;
            for b in below {
                self.ids.insert(b, None);
            }
            self.floor = self.floor.max(k);
        }
        self.ids.insert(id, None);
        true
    }

    /// `id` is done with status `status`.
    pub fn finish(&mut self, id: u64, status: u8) {
        if let Some(s) = self.ids.get_mut(&id) {
            *s = Some(status);
        }
    }

    /// Forgets an id that was started but could not be applied (so a
    /// retransmission applies it).
    pub fn forget(&mut self, id: u64) {
        if self.ids.get(&id) == Some(&None) {
            self.ids.remove(&id);
        }
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_round_trip_through_bytes() {
        let mut b = SegBitmap::new(95);
        for s in [0, 7, 8, 63, 64, 94] {
            assert!(b.set(s));
        }
        assert!(!b.set(7), "twice");
        assert!(!b.set(95), "out of range");
        let mut bytes = [0u8; 12];
        assert_eq!(b.to_bytes(&mut bytes), 12);
        let back = SegBitmap::from_bytes(95, &bytes);
        assert_eq!(back, b);
        assert_eq!(back.held(), 6);
        assert_eq!(back.missing().count(), 89);
        assert!(SegBitmap::full(95).complete());
    }

    /// Zeros as long as segment `seg` of `len` bytes in `nseg`.
    fn z(len: u32, nseg: u16, seg: u16) -> Vec<u8> {
        std::vec![0u8; seg_len(len, nseg, seg)]
    }

    #[test]
    fn reassembly_completes_in_any_order_and_ignores_duplicates() {
        let mut r: Reassembly<u64> = Reassembly::new(1 << 20, 8);
        let data: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let seg = |n: u16, s: u16| {
            let (a, b) = seg_range(4096, n, s);
            &data[a..b]
        };
        assert_eq!(crate::bulk::segments(4096), 3);
        assert_eq!(r.put(1, 4096, 3, 2, seg(3, 2), 0), Put::Held);
        assert_eq!(r.put(1, 4096, 3, 2, seg(3, 2), 0), Put::Duplicate);
        assert_eq!(r.put(1, 4096, 3, 0, seg(3, 0), 0), Put::Held);
        assert_eq!(r.have(&1).unwrap().held(), 2);
        assert_eq!(r.put(1, 4096, 3, 1, &seg(3, 1)[..10], 0), Put::Bad);
        // A segment of the same request cut another way does not fit.
        assert_eq!(r.put(1, 4096, 2, 1, seg(2, 1), 0), Put::Bad);
        assert_eq!(
            r.put(1, 4096, 3, 1, seg(3, 1), 0),
            Put::Complete(data.clone())
        );
        assert_eq!((r.len(), r.bytes()), (0, 0));
        // Jumbo segments: 4096 bytes in 2.
        assert_eq!(r.put(5, 4096, 2, 1, seg(2, 1), 0), Put::Held);
        assert_eq!(
            r.put(5, 4096, 2, 0, seg(2, 0), 0),
            Put::Complete(data.clone())
        );
        // Fewer segments than SEG_DATA_MAX allows, or more than SEG_DATA
        // needs, are refused before any buffer is taken.
        assert_eq!(r.put(6, 4096, 1, 0, &data, 0), Put::Bad);
        assert_eq!(r.put(6, 4096, 4, 0, &data[..1024], 0), Put::Bad);
        assert_eq!(r.put(6, 4096, 3, 3, &[], 0), Put::Bad);
        assert!(r.is_empty());
        // One segment needs no buffer.
        assert_eq!(
            r.put(2, 512, 1, 0, &data[..512], 0),
            Put::Complete(data[..512].to_vec())
        );
    }

    #[test]
    fn reassembly_memory_is_bounded_and_expires() {
        let mut r: Reassembly<u64> = Reassembly::new(10_000, 2);
        assert_eq!(r.put(1, 8192, 6, 0, &z(8192, 6, 0), 0), Put::Held);
        assert_eq!(
            r.put(2, 4096, 3, 0, &z(4096, 3, 0), 5),
            Put::NoRoom,
            "budget"
        );
        assert_eq!(r.put(3, 1500, 2, 0, &z(1500, 2, 0), 5), Put::Held);
        assert_eq!(
            r.put(4, 1500, 2, 0, &z(1500, 2, 0), 5),
            Put::NoRoom,
            "count"
        );
        assert_eq!(r.bytes(), 8192 + 1500);
        assert_eq!(r.expire(1), 1);
        assert_eq!(r.bytes(), 1500);
        assert_eq!(r.put(2, 4096, 3, 0, &z(4096, 3, 0), 6), Put::Held);
    }

    #[test]
    fn one_owner_cannot_take_all_the_room() {
        // Keys (owner, id); each owner may hold 2 requests of 10,000 bytes.
        let mut r: Reassembly<(u32, u64)> =
            Reassembly::with_shares(40_000, 8, (10_000, 2), |k| k.0);
        let first = |len| z(len, crate::bulk::segments(len), 0);
        assert_eq!(r.put((1, 1), 8192, 6, 0, &first(8192), 0), Put::Held);
        assert_eq!(
            r.put((1, 2), 4096, 3, 0, &first(4096), 0),
            Put::NoRoom,
            "bytes share"
        );
        assert_eq!(r.put((1, 3), 1500, 2, 0, &first(1500), 0), Put::Held);
        assert_eq!(
            r.put((1, 4), 1500, 2, 0, &first(1500), 0),
            Put::NoRoom,
            "count share"
        );
        // Another owner still has its room.
        assert_eq!(r.put((2, 1), 8192, 6, 0, &first(8192), 0), Put::Held);
        assert_eq!(r.owned(1), (8192 + 1500, 2));
        // Freed on completion, expiry and removal.
        assert!(matches!(
            r.put((1, 3), 1500, 2, 1, &z(1500, 2, 1), 0),
            Put::Complete(_)
        ));
        assert_eq!(r.owned(1), (8192, 1));
        r.remove(&(1, 1));
        assert_eq!(r.owned(1), (0, 0));
        assert_eq!(r.expire(1), 1);
        assert_eq!((r.owned(2), r.bytes(), r.len()), ((0, 0), 0, 0));
    }

    #[test]
    fn the_window_applies_each_id_once_out_of_order() {
        let mut w = BlockWindow::default();
        assert_eq!(w.lookup(10), Seen::New);
        assert!(w.start(10));
        assert!(w.start(11));
        assert_eq!(w.lookup(10), Seen::InFlight);
        w.finish(11, 0);
        assert_eq!(w.lookup(11), Seen::Done(0));
        w.finish(10, 1);
        assert_eq!(w.lookup(10), Seen::Done(1));
        w.forget(10);
        assert_eq!(w.lookup(10), Seen::Done(1), "done ids are not forgotten");
    }

    #[test]
    fn a_full_window_forgets_its_oldest_done_ids_and_refuses_when_all_in_flight() {
        let mut w = BlockWindow::default();
        for id in 1..=BlockWindow::CAP as u64 {
            assert!(w.start(id));
        }
        assert!(!w.start(5000), "all in flight");
        w.finish(3, 0);
        assert!(w.start(5000));
        assert_eq!(w.len(), BlockWindow::CAP);
        assert_eq!(w.lookup(3), Seen::Stale);
        assert_eq!(w.lookup(2), Seen::InFlight, "in-flight ids stay");
        assert_eq!(w.lookup(5001), Seen::New);
    }
}
