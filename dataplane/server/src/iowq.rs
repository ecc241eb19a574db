//! io_uring's io-wq threads yield to the workers.
//!
//! A model's blocking file work — a flush's `fdatasync`, a buffered write
//! that must wait (the disk's block requests included) — runs on
//! io_uring's io-wq kernel threads (a buffered read that misses the page
//! cache does not: on ext4 and the like it completes from the submitter's
//! context, without io-wq). They are threads of this process (named
//! `iou-wrk-<tid>`), created by the worker that submitted the work, and
//! they inherit its core and its priority: on the worker's core, at the
//! same weight, each `fdatasync` preempts the worker and delays every
//! other model it serves. Measured with `dpbench --scenario flush-storm`
//! (release, 2-core machine): a counter model's p99 under a storm of
//! ~20,000 flushes/s on its worker was 5.6-11.6x its p99 under the same
//! storm without flushes (8 runs); with the io-wq threads at nice 19,
//! 1.29-1.56x (4 runs), and the storm's flushes completed at the same
//! rate or faster (they still run whenever the worker sleeps or yields,
//! and get CFS's share of a nice-19 thread meanwhile).
//!
//! So every io-wq thread of the process is set to [`NICE`], by a watcher
//! thread every [`PERIOD`] (io-wq creates and retires its threads on
//! demand; a new one runs at the worker's priority until the next scan).
//! Moving them to another core instead (`IORING_REGISTER_IOWQ_AFF`) was
//! worse on two cores, where the other core is the clients'.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// The nice value io-wq threads run at.
pub const NICE: i32 = 19;

/// How often the watcher looks for new io-wq threads.
pub const PERIOD: Duration = Duration::from_millis(100);

/// The prefix of an io-wq thread's name (`/proc/<pid>/task/<tid>/comm`).
const IO_WORKER: &str = "iou-wrk";

/// Sets every io-wq thread of this process not in `seen` to [`NICE`] and
/// adds it there; `seen` keeps only threads that still exist. Returns how
/// many threads it changed.
pub fn demote(seen: &mut HashSet<u32>) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    let mut alive = HashSet::with_capacity(seen.len());
    let mut changed = 0;
    for entry in dir.flatten() {
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok())
        else {
            continue;
        };
        if seen.contains(&tid) {
            alive.insert(tid);
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(IO_WORKER) {
            continue;
        }
        // SAFETY: setpriority takes plain integers; a thread of this
        // process that exited meanwhile makes it fail with ESRCH, nothing
        // more.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, NICE) } == 0 {
            changed += 1;
            alive.insert(tid);
        }
    }
    *seen = alive;
    changed
}

/// Starts the watcher: [`demote`] every [`PERIOD`] until `stop`.
pub fn watch(stop: Arc<AtomicBool>) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dp-iowq".into())
        .spawn(move || {
            let mut seen = HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                demote(&mut seen);
                std::thread::sleep(PERIOD);
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The nice value of thread `tid`.
    fn nice_of(tid: u32) -> i32 {
        // SAFETY: plain integers; -1 with errno set is an error, but a
        // live thread of this process always answers.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) }
    }

    /// The io-wq threads of this process.
    fn io_workers() -> Vec<u32> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.starts_with(IO_WORKER))
            })
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// An fsync forced onto io-wq (`IOSQE_ASYNC`) makes an io-wq thread
    /// at the submitter's priority; `demote` sets it to nice 19 once, and
    /// leaves other threads alone.
    #[test]
    fn io_wq_threads_are_set_to_nice_19_and_nothing_else() {
        let path = std::env::temp_dir().join(format!("dp-iowq-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        let mut ring = io_uring::IoUring::new(8).unwrap();
        let fd = io_uring::types::Fd(std::os::fd::AsRawFd::as_raw_fd(&file));
        let e = io_uring::opcode::Fsync::new(fd)
            .build()
            .flags(io_uring::squeue::Flags::ASYNC)
            .user_data(1);
        // SAFETY: an fsync names no buffer.
        unsafe { ring.submission().push(&e) }.unwrap();
        ring.submit_and_wait(1).unwrap();
        assert_eq!(ring.completion().next().map(|c| c.result()), Some(0));
        let _ = std::fs::remove_file(&path);
        let workers = io_workers();
        assert!(!workers.is_empty(), "the fsync made no io-wq thread");
        // SAFETY: gettid takes nothing.
        let me = unsafe { libc::gettid() } as u32;
        let mine = nice_of(me);
        let mut seen = HashSet::new();
        assert!(demote(&mut seen) >= 1);
        for w in &workers {
            assert_eq!(nice_of(*w), NICE, "io-wq thread {w}");
            assert!(seen.contains(w));
        }
        assert_eq!(nice_of(me), mine, "a thread not of io-wq was changed");
        // Changed once: a second scan leaves them (other tests of this
        // process may have made io-wq threads of their own meanwhile).
        demote(&mut seen);
        for w in &workers {
            assert!(seen.contains(w), "io-wq thread {w} forgotten while alive");
        }
    }
}
