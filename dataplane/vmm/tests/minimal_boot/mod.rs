//! The minimal kernel's boot from its ext2 root disk, with its minimal
//! init, which both boot tests run where `/dev/kvm` emulates guest kernel
//! code (see `devplane_vmm::boot`): what the host checks afterwards, beside
//! what `devplane_vmm::boot::minimal` shares with dpbench.

use std::path::Path;

use devplane_vmm::boot::Console;
use devplane_vmm::boot::minimal;
pub use devplane_vmm::boot::minimal::{BOOTS_FILE, Milestones, Watch, now_unix};
use devplane_vmm::boot::rootfs::{self, Superblock};

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
    let sb = minimal::new_disk(path, init).expect("make the ext2 root disk");
    assert_eq!(sb.mount_count, 0, "a new file system was never mounted");
    sb
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
