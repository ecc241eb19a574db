//! A flush's writes and `fdatasync` on a thread of their own, at low
//! priority.
//!
//! Written on the model's io_uring, a flight's page writes and its sync
//! run on io_uring's io-wq kernel threads (ext4 punts such buffered writes
//! there), which inherit the submitting worker's core and priority: each
//! one preempts the busy-polling worker and delays every other model it
//! serves (`flush-storm`: a counter's p99 5.6-11.6x under a storm of
//! flushes). io-wq belongs to the submitting thread, not to a ring, so it
//! cannot be lowered for the flushes alone (niced as a whole it starved the
//! remote disk's block writes; bench/README.md, "flush-storm"). So a
//! flight goes to one thread of the process, `dp-flush`, under
//! `SCHED_IDLE` (and nice [`NICE`], what stays if the policy is refused)
//! and free to run on any core: `pwrite` of each page, then, for a flush,
//! `fdatasync`. `SCHED_IDLE` rather than nice 19 alone: a nice-19 thread
//! in the middle of its file work was not always preempted when a
//! client's answer woke that client on the same core, and the flush
//! storm's counter p99 over the same storm without flushes was 1.16-2.88x
//! (4 of 7 runs over the 2x goal) at nice 19 against 1.05-1.49x (7 of 7
//! met) under `SCHED_IDLE`, alternated runs of `dpbench --scenario
//! flush-storm` (2026-12-07), the storm's own flushes no slower (23-29k
//! against 24-32k per second). The cost: on a host whose every core is
//! busy with normal work the flushes get the smallest share of CPU
//! there is (weight 3 of 1024) and slow down accordingly; they still
//! complete. The worker does wait for a flight in a few places (a block
//! request or a move meeting a flight, a write past twice the dirty
//! limit: `Blockstore::settle`); there it [`hurry`]s the thread to the
//! normal policy (nice 19) until its job is done. Its I/O stays in the
//! best-effort class at the lowest level (`ioprio_set`), as at nice 19.
//! Otherwise the worker does not wait for it: it reads the job's result
//! when the flight moves on. There is at most one flight per model, so
//! the queue is bounded by the models; the pages are shared read-only
//! with the flight (reads of a page in flight see them) and the thread
//! lets its share go before it says the job is done.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex, OnceLock};

use super::{PAGE_SIZE, Page};

/// The nice value of the flush thread.
pub const NICE: i32 = 19;

/// What a job did: per write (in the flight's order) the bytes written
/// or a negative errno; the sync's result (0 or a negative errno), if one
/// was asked and every write succeeded.
#[derive(Debug)]
pub struct JobDone {
    pub writes: Vec<i32>,
    pub sync: Option<i32>,
}

struct Job {
    file: Arc<File>,
    pages: Arc<BTreeMap<u64, Box<Page>>>,
    order: Vec<(u64, usize)>,
    sync: bool,
    done: Arc<OnceLock<JobDone>>,
}

fn errno() -> i32 {
    -std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

fn run(job: Job) {
    let fd = job.file.as_raw_fd();
    let mut writes = Vec::with_capacity(job.order.len());
    for &(index, len) in &job.order {
        let r = match job.pages.get(&index) {
            Some(page) => {
                // SAFETY: `page` is a live PAGE_SIZE buffer shared
                // read-only, and `len <= PAGE_SIZE`.
                let n = unsafe {
                    libc::pwrite(
                        fd,
                        page.as_ptr().cast(),
                        len.min(PAGE_SIZE),
                        (index * PAGE_SIZE as u64) as libc::off_t,
                    )
                };
                if n < 0 { errno() } else { n as i32 }
            }
            None => -libc::EINVAL,
        };
        writes.push(r);
    }
    let all = job
        .order
        .iter()
        .zip(&writes)
        .all(|(&(_, len), &r)| r >= 0 && r as usize == len);
    let sync = (job.sync && all).then(|| {
        // SAFETY: `fd` is open (the job owns its descriptor).
        if unsafe { libc::fdatasync(fd) } == 0 {
            0
        } else {
            errno()
        }
    });
    drop(job.pages);
    let _ = job.done.set(JobDone { writes, sync });
}

/// The flush thread's id (0 until it runs).
static TID: AtomicI32 = AtomicI32::new(0);
/// Whether the flush thread was raised to the normal policy ([`hurry`]).
static HURRIED: AtomicBool = AtomicBool::new(false);
/// `ioprio_set`'s "which": a thread (0: the caller).
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
/// Best-effort class (2, in bits 13-15), level 7 (the lowest).
const IOPRIO_BEST_EFFORT_LOWEST: libc::c_int = (2 << 13) | 7;

/// Sets thread `tid`'s (0: the caller's) policy, priority 0; whether it
/// took.
fn set_policy(tid: libc::pid_t, policy: libc::c_int) -> bool {
    let p = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain integers and `p`, which outlives the call.
    unsafe { libc::sched_setscheduler(tid, policy, &p) == 0 }
}

/// A thread is about to wait for a flight on the flush thread (a model's
/// `settle`: a block request, a move, a snapshot, a write past the dirty
/// limit): the flush thread runs under the normal policy (still at nice
/// 19) until it has finished its current job, so that the wait is not at
/// the mercy of every other thread of the host. Cheap when already done
/// (one atomic); called on every turn of the wait, so a job queued
/// behind another is hurried too.
pub fn hurry() {
    if HURRIED.swap(true, Ordering::Relaxed) {
        return;
    }
    let tid = TID.load(Ordering::Relaxed);
    if tid > 0 {
        set_policy(tid, libc::SCHED_OTHER);
    }
}

fn queue() -> Option<&'static Mutex<Sender<Job>>> {
    static Q: OnceLock<Option<Mutex<Sender<Job>>>> = OnceLock::new();
    Q.get_or_init(|| {
        let (tx, rx) = channel::<Job>();
        std::thread::Builder::new()
            .name("dp-flush".into())
            .spawn(move || {
                // SAFETY: plain integers; 0 is the calling thread (Linux
                // nice values are per thread).
                unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, NICE) };
                // SAFETY: no arguments; the calling thread's id.
                TID.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                // Its I/O in the best-effort class, lowest level: what
                // nice 19 gave; SCHED_IDLE alone would make it the idle
                // class, whose writeback may wait behind all other I/O.
                // SAFETY: plain integers; 0 is the calling thread.
                unsafe {
                    libc::syscall(
                        libc::SYS_ioprio_set,
                        IOPRIO_WHO_PROCESS,
                        0,
                        IOPRIO_BEST_EFFORT_LOWEST,
                    )
                };
                // Then SCHED_IDLE (lowering one's own policy needs no
                // privilege; if refused, nice 19 stays): see the module's
                // documentation.
                set_policy(0, libc::SCHED_IDLE);
                // Any core: it was spawned by whichever thread flushed
                // first, perhaps a worker pinned to one.
                // SAFETY: a zeroed cpu_set_t is a valid empty set, filled
                // here; the call reads `size_of` bytes of it.
                unsafe {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    for cpu in 0..libc::CPU_SETSIZE as usize {
                        libc::CPU_SET(cpu, &mut set);
                    }
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                for job in rx {
                    run(job);
                    // Hurried for a waiter ([`hurry`]): idle again.
                    if HURRIED.swap(false, Ordering::Relaxed) {
                        set_policy(0, libc::SCHED_IDLE);
                    }
                }
            })
            .ok()
            .map(|_| Mutex::new(tx))
    })
    .as_ref()
}

/// Starts writing `order`'s pages (`(index, bytes)`) of `pages` to
/// `file` (shared: the job holds it open until done, whatever happens to
/// the model's own descriptor), then, if `sync`, `fdatasync`. `None`
/// if there is no flush thread (it could not be started): the caller
/// writes some other way.
pub fn start(
    file: Arc<File>,
    pages: Arc<BTreeMap<u64, Box<Page>>>,
    order: Vec<(u64, usize)>,
    sync: bool,
) -> Option<Arc<OnceLock<JobDone>>> {
    let done = Arc::new(OnceLock::new());
    let job = Job {
        file,
        pages,
        order,
        sync,
        done: done.clone(),
    };
    queue()?.lock().ok()?.send(job).ok()?;
    Some(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job writes its pages and syncs, off the caller's thread, on a
    /// thread named `dp-flush` under SCHED_IDLE at nice 19 (best-effort
    /// I/O), and lets the pages go before it says it is done; a waiter's
    /// [`hurry`] raises it until it has done a job.
    #[test]
    fn a_job_writes_and_syncs_on_a_low_priority_thread() {
        let path = std::env::temp_dir().join(format!("dp-flusher-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 3 * PAGE_SIZE]).unwrap();
        let f = Arc::new(File::options().write(true).open(&path).unwrap());
        let mut map = BTreeMap::new();
        map.insert(0u64, Box::new([1u8; PAGE_SIZE]));
        map.insert(2u64, Box::new([2u8; PAGE_SIZE]));
        let pages = Arc::new(map);
        let done = start(f, pages.clone(), vec![(0, PAGE_SIZE), (2, 100)], true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.get().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the job never completed"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let d = done.get().unwrap();
        assert_eq!(d.writes, vec![PAGE_SIZE as i32, 100]);
        assert_eq!(d.sync, Some(0));
        assert_eq!(Arc::strong_count(&pages), 1, "the job kept its share");
        let bytes = std::fs::read(&path).unwrap();
        assert!(bytes[..PAGE_SIZE].iter().all(|&b| b == 1));
        assert!(bytes[PAGE_SIZE..2 * PAGE_SIZE].iter().all(|&b| b == 0));
        assert!(
            bytes[2 * PAGE_SIZE..2 * PAGE_SIZE + 100]
                .iter()
                .all(|&b| b == 2)
        );
        assert!(bytes[2 * PAGE_SIZE + 100..].iter().all(|&b| b == 0));
        let tid = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .find(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "dp-flush")
            })
            .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .expect("a dp-flush thread");
        // SAFETY: plain integers.
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, NICE);
        // SAFETY: plain integer.
        let policy = || unsafe { libc::sched_getscheduler(tid as libc::pid_t) };
        assert_eq!(policy(), libc::SCHED_IDLE, "dp-flush runs under SCHED_IDLE");
        // SAFETY: plain integers (IOPRIO_WHO_PROCESS, the thread).
        let ioprio = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, tid) };
        assert_eq!(
            ioprio,
            i64::from(IOPRIO_BEST_EFFORT_LOWEST),
            "its I/O best-effort"
        );
        // A waiter hurries it: the normal policy (nice kept) until it has
        // done a job, then idle again.
        hurry();
        assert_eq!(policy(), libc::SCHED_OTHER, "hurried");
        // SAFETY: plain integers.
        assert_eq!(unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }, NICE);
        let f = Arc::new(File::options().write(true).open(&path).unwrap());
        let done = start(f, pages.clone(), vec![(0, PAGE_SIZE)], false).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while done.get().is_none() || policy() != libc::SCHED_IDLE {
            assert!(
                std::time::Instant::now() < deadline,
                "not idle again after its job"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let _ = std::fs::remove_file(&path);
    }
}
