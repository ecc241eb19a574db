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
//! complete, and the worker never waits for them. The worker never waits for it: it reads the job's result
//! when the flight moves on. There is at most one flight per model, so
//! the queue is bounded by the models; the pages are shared read-only
//! with the flight (reads of a page in flight see them) and the thread
//! lets its share go before it says the job is done.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
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
                // Then SCHED_IDLE (lowering one's own policy needs no
                // privilege; if refused, nice 19 stays): see the module's
                // documentation.
                let p = libc::sched_param { sched_priority: 0 };
                // SAFETY: sets this thread's own policy; `p` outlives the call.
                unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &p) };
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
    /// thread named `dp-flush` at nice 19, and lets the pages go before
    /// it says it is done.
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
        let _ = std::fs::remove_file(&path);
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
        let policy = unsafe { libc::sched_getscheduler(tid as libc::pid_t) };
        assert_eq!(policy, libc::SCHED_IDLE, "dp-flush runs under SCHED_IDLE");
    }
}
