//! The kernel-only Linux boot both boot tests run where `/dev/kvm` emulates
//! guest kernel code (see `devplane_vmm::boot`): what the host watches for
//! on the console and checks afterwards.

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
/// The panic that ends a boot whose root has no init.
pub const PANIC_LINE: &str = "Kernel panic - not syncing: No working init found";

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

/// A fresh ext2 root disk at `path`; returns its superblock (never
/// mounted).
pub fn new_disk(path: &Path) -> Superblock {
    rootfs::make_ext2(path, DISK_BYTES).expect("make the ext2 root disk");
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
        if self.panic.is_none() && text.contains(PANIC_LINE) {
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
            "banner {}, clock set {}, root mounted {}, panic {}",
            f(self.banner),
            f(self.rtc.map(|r| r.0)),
            f(self.root),
            f(self.panic)
        )
    }
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
                if done || m.panic.is_some() {
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

/// The console's evidence of a kernel-only boot: the banner, the guest's
/// clock from the RTC within 5 s of the host's when the line appeared, the
/// root mounted, and the panic for want of an init.
pub fn check_console(label: &str, m: &Milestones, console: &Console) {
    assert!(
        m.banner.is_some(),
        "{label}: no kernel banner; console tail:\n{}",
        tail(console)
    );
    let (_, guest, host) = m.rtc.unwrap_or_else(|| {
        panic!(
            "{label}: the kernel did not set its clock from the RTC; console tail:\n{}",
            tail(console)
        )
    });
    assert!(
        guest.abs_diff(host) <= 5,
        "{label}: the guest's clock from the RTC, {guest}, is {} s from the host's {host}",
        guest.abs_diff(host)
    );
    assert!(
        m.root.is_some(),
        "{label}: the root file system was not mounted; console tail:\n{}",
        tail(console)
    );
    assert!(
        m.panic.is_some(),
        "{label}: no 'No working init found' panic; console tail:\n{}",
        tail(console)
    );
}

/// The disk's evidence: the kernel mounted it read-write once more than
/// `before` (the mount count it wrote), at a time by the guest's clock
/// within 5 s of the boot's span on the host's, and never unmounted it.
pub fn check_disk(label: &str, disk: &Path, before: u16, span: (u64, u64)) -> Superblock {
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
    sb
}
