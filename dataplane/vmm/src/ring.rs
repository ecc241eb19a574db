//! A vCPU's exit ring: where its thread encodes remote accesses, in place,
//! for the engine to send.
//!
//! Single producer (the vCPU thread), single consumer (the engine), in
//! memmap2-backed memory, one 128-byte cache-line-aligned slot per request.
//! The vCPU writes a request record into the slot at `head`, then publishes
//! `head + 1` (release); the engine reads records up to `head` (acquire).
//! Answers come back into the same slot: the engine stores status and data,
//! then sets the slot's state to `DONE` (release) and wakes the vCPU with a
//! futex if it sleeps. Slots are reused once `FREE`; posted writes are
//! freed by the engine when acknowledged (or given up on, which the ring
//! counts: [`ExitRing::posted_failures`]). A vCPU that stops waiting for
//! an answer marks its slot `ABANDONED` ([`ExitRing::abandon`]); the
//! engine's answer then frees it, so no slot stays answered and untaken.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use devplane_wire::{RECORD_LEN, RawRecord};
use zerocopy::IntoBytes;

/// Slots per ring: the most requests one vCPU may have in flight (at most
/// the server's duplicate window).
pub const SLOTS: usize = 64;
const _: () = assert!(SLOTS <= devplane_wire::MAX_RECORDS * 8);

/// Slot states.
pub mod state {
    /// Free for the vCPU to fill.
    pub const FREE: u32 = 0;
    /// Written by the vCPU, not yet answered.
    pub const PENDING: u32 = 1;
    /// Answered: status and data are valid (non-posted requests).
    pub const DONE: u32 = 2;
    /// Its vCPU stopped waiting: the answer, when it comes, frees it.
    pub const ABANDONED: u32 = 3;
}

/// One request and its answer.
#[repr(C, align(128))]
pub struct Slot {
    /// See [`state`].
    pub state: AtomicU32,
    /// 1 while the vCPU sleeps on `state` (futex).
    pub waiter: AtomicU32,
    /// Index of the remote model in the VM's device map.
    pub model: AtomicU32,
    /// 1 for a posted write.
    pub posted: AtomicU32,
    /// Answer status (a `devplane_wire::Status` byte).
    pub status: AtomicU32,
    /// Answer data.
    pub data: AtomicU64,
    record: UnsafeCell<[u8; RECORD_LEN]>,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 128);

/// The ring: `SLOTS` slots and the producer index, in one mapping.
pub struct ExitRing {
    map: memmap2::MmapMut,
    /// Published producer index (requests written so far).
    head: AtomicU64,
    /// Posted writes answered with an error status or given up on.
    posted_failures: AtomicU64,
}

// SAFETY: slots are only accessed through the protocol above: the record
// cell is written by the single producer before `head` is published and
// read by the single consumer after it; every other field is atomic.
unsafe impl Sync for ExitRing {}
// SAFETY: the mapping is owned; see `Sync`.
unsafe impl Send for ExitRing {}

impl ExitRing {
    /// A ring of `SLOTS` free slots.
    pub fn new() -> std::io::Result<ExitRing> {
        let map = memmap2::MmapOptions::new()
            .len(SLOTS * std::mem::size_of::<Slot>())
            .map_anon()?;
        // Zeroed anonymous memory is a valid array of free slots: every
        // field is an integer (atomics of 0 = FREE) or bytes.
        Ok(ExitRing {
            map,
            head: AtomicU64::new(0),
            posted_failures: AtomicU64::new(0),
        })
    }

    fn slots(&self) -> &[Slot] {
        // SAFETY: the mapping is page-aligned (so 128-aligned), exactly
        // SLOTS slots long, zero-initialised (a valid `Slot` bit pattern)
        // and lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr() as *const Slot, SLOTS) }
    }

    /// The slot with index `i` (modulo the ring size).
    pub fn slot(&self, i: u64) -> &Slot {
        &self.slots()[(i % SLOTS as u64) as usize]
    }

    /// Producer: the index the next request will take, once its slot is
    /// free; `None` if the ring is full (every slot in flight).
    pub fn next_free(&self) -> Option<u64> {
        let h = self.head.load(Ordering::Relaxed);
        (self.slot(h).state.load(Ordering::Acquire) == state::FREE).then_some(h)
    }

    /// Producer: writes `rec` for remote model `model` into slot `i`
    /// (from [`ExitRing::next_free`]) and publishes it.
    pub fn publish(&self, i: u64, model: u32, posted: bool, rec: &RawRecord) {
        let slot = self.slot(i);
        slot.model.store(model, Ordering::Relaxed);
        slot.posted.store(posted as u32, Ordering::Relaxed);
        // SAFETY: the slot is FREE, so the consumer does not read it, and
        // we are the only producer.
        unsafe { (*slot.record.get()).copy_from_slice(rec.as_bytes()) };
        slot.state.store(state::PENDING, Ordering::Relaxed);
        self.head.store(i + 1, Ordering::Release);
    }

    /// Consumer: the published producer index.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    /// Consumer: the record of published slot `i`.
    pub fn record(&self, i: u64) -> [u8; RECORD_LEN] {
        // SAFETY: `i < head` (the caller's contract): the producer wrote it
        // before publishing and does not touch it until it is FREE again.
        unsafe { *self.slot(i).record.get() }
    }

    /// Consumer: answers slot `i`. Posted writes are freed (a failure
    /// counted); others become `DONE` and their waiter is woken, or are
    /// freed if their vCPU abandoned them.
    pub fn complete(&self, i: u64, status: u8, data: u64) {
        let slot = self.slot(i);
        slot.status.store(status as u32, Ordering::Relaxed);
        slot.data.store(data, Ordering::Relaxed);
        if slot.posted.load(Ordering::Relaxed) != 0 {
            if status != devplane_wire::Status::Ok as u8 {
                self.posted_failures.fetch_add(1, Ordering::Relaxed);
            }
            slot.state.store(state::FREE, Ordering::Release);
            return;
        }
        if slot.state.swap(state::DONE, Ordering::AcqRel) == state::ABANDONED {
            slot.state.store(state::FREE, Ordering::Release);
            return;
        }
        if slot.waiter.load(Ordering::SeqCst) != 0 {
            futex_wake(&slot.state);
        }
    }

    /// Producer: stops waiting for slot `i`. Its answer, if it came
    /// meanwhile, is returned (and the slot freed); otherwise the slot
    /// frees itself when the answer comes.
    pub fn abandon(&self, i: u64) -> Option<(u8, u64)> {
        let slot = self.slot(i);
        match slot.state.compare_exchange(
            state::PENDING,
            state::ABANDONED,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => None,
            Err(_) => self.try_take(i),
        }
    }

    /// Posted writes answered with an error status or given up on so far.
    pub fn posted_failures(&self) -> u64 {
        self.posted_failures.load(Ordering::Relaxed)
    }

    /// Posted writes published and not answered yet (none confirmed
    /// applied, none given up on).
    pub fn posted_in_flight(&self) -> u64 {
        self.slots()
            .iter()
            .filter(|s| {
                s.posted.load(Ordering::Relaxed) != 0
                    && s.state.load(Ordering::Acquire) == state::PENDING
            })
            .count() as u64
    }

    /// Whether no request is in flight: every slot is free (posted writes
    /// acknowledged, answers taken).
    pub fn idle(&self) -> bool {
        self.slots()
            .iter()
            .all(|s| s.state.load(Ordering::Acquire) == state::FREE)
    }

    /// Producer: whether slot `i` has its answer (without taking it).
    pub fn is_done(&self, i: u64) -> bool {
        self.slot(i).state.load(Ordering::Acquire) == state::DONE
    }

    /// Producer: takes the answer of slot `i` if it is there (and frees
    /// the slot).
    pub fn try_take(&self, i: u64) -> Option<(u8, u64)> {
        let slot = self.slot(i);
        if slot.state.load(Ordering::Acquire) != state::DONE {
            return None;
        }
        let out = (
            slot.status.load(Ordering::Relaxed) as u8,
            slot.data.load(Ordering::Relaxed),
        );
        slot.state.store(state::FREE, Ordering::Release);
        Some(out)
    }

    /// Producer: waits for slot `i` to be answered (spinning `spin` times,
    /// then sleeping on a futex), frees it and returns (status, data).
    /// `None` if `deadline` passes first (the slot is then abandoned:
    /// [`ExitRing::abandon`]).
    pub fn wait(&self, i: u64, spin: u32, deadline: Instant) -> Option<(u8, u64)> {
        let slot = self.slot(i);
        let mut n = 0u32;
        loop {
            if let Some(answer) = self.try_take(i) {
                return Some(answer);
            }
            if n < spin {
                n += 1;
                std::hint::spin_loop();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return self.abandon(i);
            }
            slot.waiter.store(1, Ordering::SeqCst);
            if slot.state.load(Ordering::SeqCst) != state::DONE {
                futex_wait(
                    &slot.state,
                    state::PENDING,
                    (deadline - now).min(Duration::from_millis(10)),
                );
            }
            slot.waiter.store(0, Ordering::Relaxed);
        }
    }
}

fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call;
    // FUTEX_WAIT only reads it. A spurious or timed-out return is fine:
    // the caller re-checks the state.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
        );
    }
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE does not access it.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use zerocopy::FromBytes;

    fn rec(seq: u64) -> RawRecord {
        let mut r = RawRecord::read_from_bytes(&[0u8; RECORD_LEN]).unwrap();
        r.seq = seq.into();
        r
    }

    #[test]
    fn publish_complete_wait_across_threads() {
        let ring = Arc::new(ExitRing::new().unwrap());
        let r2 = ring.clone();
        let consumer = std::thread::spawn(move || {
            let mut tail = 0u64;
            while tail < 1000 {
                if tail < r2.head() {
                    let bytes = r2.record(tail);
                    let r = RawRecord::read_from_bytes(&bytes).unwrap();
                    r2.complete(tail, 0, r.seq.get() * 2);
                    tail += 1;
                }
            }
        });
        for seq in 0..1000u64 {
            let i = loop {
                if let Some(i) = ring.next_free() {
                    break i;
                }
            };
            ring.publish(i, 0, false, &rec(seq));
            let (st, data) = ring
                .wait(i, 100, Instant::now() + Duration::from_secs(5))
                .expect("answered");
            assert_eq!((st, data), (0, seq * 2));
        }
        consumer.join().unwrap();
    }

    #[test]
    fn posted_slots_free_themselves_and_a_full_ring_says_so() {
        let ring = ExitRing::new().unwrap();
        for s in 0..SLOTS as u64 {
            let i = ring.next_free().expect("free slot");
            ring.publish(i, 1, true, &rec(s));
        }
        assert_eq!(ring.next_free(), None, "ring should be full");
        ring.complete(0, 0, 0);
        assert_eq!(ring.next_free(), Some(SLOTS as u64));
        let i = ring.next_free().unwrap();
        ring.publish(i, 1, false, &rec(99));
        assert_eq!(
            ring.wait(i, 10, Instant::now() + Duration::from_millis(20)),
            None
        );
    }

    #[test]
    fn an_abandoned_slot_is_freed_by_its_late_answer() {
        let ring = ExitRing::new().unwrap();
        let i = ring.next_free().unwrap();
        ring.publish(i, 0, false, &rec(1));
        assert_eq!(
            ring.wait(i, 1, Instant::now() + Duration::from_millis(5)),
            None
        );
        // Not reusable while the engine still owes its answer.
        ring.publish(i + 1, 0, false, &rec(2));
        assert_eq!(ring.slot(i).state.load(Ordering::Relaxed), state::ABANDONED);
        ring.complete(i, 0xff, 0);
        assert_eq!(ring.slot(i).state.load(Ordering::Relaxed), state::FREE);
        // An answer that came before the vCPU gave up is taken, not lost.
        ring.complete(i + 1, 0, 42);
        assert_eq!(ring.abandon(i + 1), Some((0, 42)));
        assert_eq!(ring.slot(i + 1).state.load(Ordering::Relaxed), state::FREE);
    }

    #[test]
    fn failed_posted_writes_are_counted_and_pending_ones_seen() {
        let ring = ExitRing::new().unwrap();
        for s in 0..3 {
            let i = ring.next_free().unwrap();
            ring.publish(i, 0, true, &rec(s));
        }
        assert_eq!(ring.posted_in_flight(), 3);
        ring.complete(0, 0, 0);
        ring.complete(1, 0xff, 0);
        assert_eq!(ring.posted_failures(), 1);
        assert_eq!(ring.posted_in_flight(), 1);
    }
}
