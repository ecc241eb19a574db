//! The minimal kernel's boot from its ext2 root disk, with its minimal
//! init, which both boot tests run where `/dev/kvm` emulates guest kernel
//! code (see `devplane_vmm::boot`): the disk, what the host watches for on
//! the console, and what it checks afterwards.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devplane_vmm::boot::Console;
use devplane_vmm::boot::rootfs::{self, Superblock};

/// The root disk's size.
pub const DISK_BYTES: u64 = 4 << 20;
/// The kernel's banner.
pub const BANNER: &str = "Linux version 6.1";
/// What the RTC class logs when it sets the system clock from the CMOS
/// RTC: "rtc_cmos rtc_cmos: setting system clock to <date> UTC (<seconds>)".
pub const RTC_LINE: &str = "setting system clock to ";
/// What the kernel logs once the root file system is mounted.
pub const ROOT_LINE: &str = "VFS: Mounted root (ext2 filesystem) on device";
/// What the init prints first (`guest/min-init.c`) ...
pub const INIT_LINE: &str = "DEVPLANE-USER-INIT";
/// ... then the time from `clock_gettime` ...
pub const TIME_LINE: &str = "DEVPLANE-USER-TIME ";
/// ... and, once its line is on the disk and synced, this; then it
/// restarts the machine.
pub const SYNCED_LINE: &str = "DEVPLANE-USER-SYNCED";
/// The file the init appends a line to, once per boot.
pub const BOOTS_FILE: &str = "/devplane-boots";
/// A panic of any kind.
pub const PANIC: &str = "Kernel panic";

/// Seconds since the epoch, by the host's clock.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Removes a file when dropped.
pub struct TempFile(pub std::path::PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The last 40 lines of the console.
pub fn tail(console: &Console) -> String {
    let t = console.text();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A fresh ext2 root disk at `path` with `init` as `/sbin/init`; returns
/// its superblock (never mounted).
pub fn new_disk(path: &Path, init: &Path) -> Superblock {
    let dir = path.with_extension("root");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sbin")).expect("make the root directory");
    std::fs::copy(init, dir.join("sbin/init")).expect("copy the init");
    let made = rootfs::make_ext2(path, DISK_BYTES, Some(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    made.expect("make the ext2 root disk");
    let sb = rootfs::read_superblock(path).expect("read the new disk's superblock");
    assert_eq!(sb.mount_count, 0, "a new file system was never mounted");
    sb
}

/// When each line first appeared on the console, from the boot's start.
#[derive(Debug, Default, Clone)]
pub struct Milestones {
    pub banner: Option<Duration>,
    /// When, the guest's seconds in the line, and the host's clock then.
    pub rtc: Option<(Duration, u64, u64)>,
    pub root: Option<Duration>,
    pub init: Option<Duration>,
    /// When, the init's seconds, and the host's clock then.
    pub user_time: Option<(Duration, u64, u64)>,
    pub synced: Option<Duration>,
    pub panic: Option<Duration>,
}

impl Milestones {
    fn scan(&mut self, text: &str, at: Duration) {
        if self.banner.is_none() && text.contains(BANNER) {
            self.banner = Some(at);
        }
        if self.rtc.is_none()
            && let Some(secs) = rtc_seconds(text)
        {
            self.rtc = Some((at, secs, now_unix()));
        }
        if self.root.is_none() && text.contains(ROOT_LINE) {
            self.root = Some(at);
        }
        if self.init.is_none() && text.contains(INIT_LINE) {
            self.init = Some(at);
        }
        if self.user_time.is_none()
            && let Some(secs) = line_seconds(text, TIME_LINE)
        {
            self.user_time = Some((at, secs, now_unix()));
        }
        if self.synced.is_none() && text.contains(SYNCED_LINE) {
            self.synced = Some(at);
        }
        if self.panic.is_none() && text.contains(PANIC) {
            self.panic = Some(at);
        }
    }

    /// "banner 0.4 s, RTC 5.1 s, ..." for the test's output.
    pub fn summary(&self) -> String {
        let f = |d: Option<Duration>| {
            d.map(|d| format!("{:.1} s", d.as_secs_f64()))
                .unwrap_or_else(|| "never".into())
        };
        format!(
            "banner {}, clock set {}, root mounted {}, init {}, its line synced {}",
            f(self.banner),
            f(self.rtc.map(|r| r.0)),
            f(self.root),
            f(self.init),
            f(self.synced)
        )
    }
}

/// The seconds after `key` on a whole console line starting with it.
fn line_seconds(text: &str, key: &str) -> Option<u64> {
    text.split('\n')
        .rev()
        .skip(1)
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))?
        .trim()
        .parse()
        .ok()
}

/// The seconds in the RTC line, once the whole line is on the console.
fn rtc_seconds(text: &str) -> Option<u64> {
    let line = text
        .split('\n')
        .rev()
        .skip(1)
        .find(|l| l.contains(RTC_LINE))?;
    let (_, rest) = line.rsplit_once('(')?;
    rest.trim_end_matches(['\r', ')']).trim().parse().ok()
}

/// Watches a console from another thread until [`Watch::finish`].
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Milestones>,
}

impl Watch {
    /// Starts watching `console`; times count from `start`.
    pub fn start(console: &Console, start: Instant) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let console = console.clone();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut m = Milestones::default();
            loop {
                let done = flag.load(Ordering::Acquire);
                m.scan(&console.text(), start.elapsed());
                if done {
                    return m;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Watch { stop, thread }
    }

    /// Stops watching (after a last look) and returns what was seen.
    pub fn finish(self) -> Milestones {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the console watcher panicked")
    }
}

/// The console's evidence: the banner; the guest's clock from the RTC, and
/// the init's clock, each within 5 s of the host's when its line appeared;
/// the root mounted; the init started and synced its line to the disk; no
/// panic.
pub fn check_console(label: &str, m: &Milestones, console: &Console) {
    let fail = |what: &str| -> ! { panic!("{label}: {what}; console tail:\n{}", tail(console)) };
    if m.banner.is_none() {
        fail("no kernel banner");
    }
    if let Some(at) = m.panic {
        fail(&format!("the kernel panicked at {:.1} s", at.as_secs_f64()));
    }
    for (what, seen) in [
        ("the RTC", m.rtc),
        ("the init's clock_gettime", m.user_time),
    ] {
        let Some((_, guest, host)) = seen else {
            fail(&format!("no time from {what}"));
        };
        assert!(
            guest.abs_diff(host) <= 5,
            "{label}: the guest's time from {what}, {guest}, is {} s from the host's {host}",
            guest.abs_diff(host)
        );
    }
    if m.root.is_none() {
        fail("the root file system was not mounted");
    }
    if m.init.is_none() {
        fail("the init did not run");
    }
    if m.synced.is_none() {
        fail("the init did not write and sync its line");
    }
}

/// The disk's evidence: the kernel mounted it read-write once more than
/// `before` (the mount count it wrote), at a time by the guest's clock
/// within 5 s of the boot's span on the host's, and never unmounted it;
/// the init's file holds one line per boot, `boots` in all.
pub fn check_disk(
    label: &str,
    disk: &Path,
    before: u16,
    span: (u64, u64),
    boots: usize,
) -> Superblock {
    let sb = rootfs::read_superblock(disk).expect("read the disk's superblock");
    assert_eq!(
        sb.mount_count,
        before + 1,
        "{label}: the kernel's read-write mount did not reach the disk (mount count {} after {before})",
        sb.mount_count
    );
    let t = u64::from(sb.write_time);
    assert!(
        t + 5 >= span.0 && t <= span.1 + 5,
        "{label}: the superblock's write time {t} is outside the boot ({}..{})",
        span.0,
        span.1
    );
    assert!(
        !sb.clean,
        "{label}: the file system is marked cleanly unmounted"
    );
    let file = rootfs::read_file(disk, BOOTS_FILE)
        .expect("read the init's file")
        .unwrap_or_else(|| panic!("{label}: the init's {BOOTS_FILE} is not on the disk"));
    assert_eq!(
        String::from_utf8_lossy(&file),
        "booted\n".repeat(boots),
        "{label}: {BOOTS_FILE} should hold one line per boot"
    );
    sb
}
