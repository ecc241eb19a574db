//! Linux boots in the client VMM with the legacy devices as local models:
//! the 16550A UART (the console), the CMOS RTC (the guest's clock) and the
//! i8042 (whose reset line ends the VM). Which kernel and proof depends on
//! the host ([`GuestKernel::for_host`], said in the test's output):
//!
//! - where KVM runs guest kernel code on the CPU, Debian's own, unmodified
//!   kernel (linux-image-amd64, 6.1) boots to the busybox `/init` of
//!   `guest/init`, which reads the clock through `/dev/rtc0` and powers off;
//! - where `/dev/kvm` emulates guest kernel code (nested PVM), the minimal
//!   kernel `scripts/guest-kernel.sh` builds boots from an ext2 root disk
//!   on a local virtio-blk device, with `guest/min-init.c` as its init: its
//!   banner, the clock it set from the RTC and the time its init reads
//!   (each within 5 s of the host's), its read-write mount of the disk (the
//!   superblock's mount count, checked on the host), the line its init
//!   appended to a file on the disk and synced (read back on the host),
//!   and its restart through the i8042, which ends the VM.
//!
//! Needs root, `/dev/kvm` and the files `scripts/guest-kernel.sh` builds
//! (`scripts/setup.sh` runs it); without them the test skips with a
//! message, or fails when `DEVPLANE_REQUIRE_PRIVILEGED=1`.
//!
//! `DEVPLANE_CONSOLE=1` echoes the guest's console to stdout (run with
//! `--nocapture`); `DEVPLANE_LINUX_BOOT_TIMEOUT` (seconds) overrides how
//! long the boot may take; `DEVPLANE_GUEST_KERNEL=debian|minimal` overrides
//! the choice of kernel.

mod minimal_boot;

use minimal_boot::{now_unix, tail};

use std::time::{Duration, Instant};

use devplane_testkit::privilege::{self, Capability};
use devplane_vmm::boot::{
    self, Console, GuestFiles, GuestKernel, LinuxBoot, MinimalKernel, minimal,
};
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{Client, LinuxVm, VcpuReport};

const TEST: &str = "linux_boots_with_local_legacy_devices";
const VM: u32 = minimal::VM;
/// How long the whole boot, to power-off, may take by default under
/// hardware virtualisation (it takes a few seconds) ...
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// ... and where /dev/kvm emulates the guest's kernel code: the minimal
/// kernel's boot takes about a minute there; Debian's generic kernel
/// (chosen with DEVPLANE_GUEST_KERNEL=debian) many more.
const EMULATED_TIMEOUT: Duration = Duration::from_secs(240);
const EMULATED_DEBIAN_TIMEOUT: Duration = Duration::from_secs(1800);

fn timeout(kernel: GuestKernel) -> Duration {
    std::env::var("DEVPLANE_LINUX_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(match (boot::kvm_emulates_kernel_code(), kernel) {
            (false, _) => DEFAULT_TIMEOUT,
            (true, GuestKernel::Minimal) => EMULATED_TIMEOUT,
            (true, GuestKernel::Debian) => EMULATED_DEBIAN_TIMEOUT,
        })
}

/// Waits for a whole console line starting with `key`; returns the rest.
fn wait_line(console: &Console, key: &str, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = console.text();
        if let Some(rest) = text
            .split('\n')
            .rev()
            .skip(1)
            .find_map(|l| l.strip_prefix(key))
        {
            return Some(rest.trim().to_string());
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn echo() -> bool {
    std::env::var_os("DEVPLANE_CONSOLE").is_some_and(|v| v != "0")
}

#[test]
fn linux_boots_with_local_legacy_devices() {
    if !privilege::require(TEST, &[Capability::Root, Capability::Kvm]) {
        return;
    }
    let (kernel, why) = boot::GuestKernel::for_host().expect("choose the guest kernel");
    match kernel {
        GuestKernel::Debian => {
            eprintln!("{TEST}: Debian's generic kernel, to its busybox init ({why})");
            debian_kernel_boots_to_init();
        }
        GuestKernel::Minimal => {
            eprintln!("{TEST}: the minimal kernel and init, from an ext2 root disk ({why})");
            minimal_kernel_and_init_use_the_disk_and_restart();
        }
    }
}

/// The minimal kernel's proof with local devices (see the file's
/// documentation).
fn minimal_kernel_and_init_use_the_disk_and_restart() {
    let kernel = match MinimalKernel::locate() {
        Ok(k) => k,
        Err(e) => {
            privilege::unavailable(TEST, &e.to_string());
            return;
        }
    };
    eprintln!(
        "{TEST}: kernel {} ({})",
        kernel.vmlinux.display(),
        kernel.version
    );
    let disk = std::env::temp_dir().join(format!("dp-linux-root-{}.img", std::process::id()));
    let _cleanup = minimal_boot::TempFile(disk.clone());
    let before = minimal_boot::new_disk(&disk, &kernel.init);
    let linux = LinuxBoot::from_root_disk(&kernel);
    let console = linux.console.clone();
    console.set_echo(echo());
    let limit = timeout(GuestKernel::Minimal);

    let start = Instant::now();
    let start_unix = now_unix();
    let watch = minimal_boot::Watch::start(&console, start);
    let mut client = Client::start_linux(
        minimal::local_spec(Some(&disk)),
        vec![LinuxVm {
            vm: VM,
            boot: linux,
        }],
    )
    .expect("start the Linux VM");
    let reports: Vec<VcpuReport> = client.wait(limit);
    let total = start.elapsed();
    let seen = watch.finish();
    // The local disk model writes back what it holds when it goes.
    drop(client);
    let end_unix = now_unix();
    eprintln!(
        "{TEST}: {}; VM ended after {:.1} s",
        seen.summary(),
        total.as_secs_f64()
    );

    minimal_boot::check_console(TEST, &seen, &console);
    assert_eq!(reports.len(), 1);
    let exit = reports[0].exit.as_ref().map_err(|e| e.to_string());
    assert!(
        matches!(exit, Ok(VcpuExit::Reset)),
        "the VM did not end through the i8042 within {limit:?} (vCPU exit {exit:?}); console tail:\n{}",
        tail(&console)
    );
    let after =
        minimal_boot::check_disk(TEST, &disk, before.mount_count, (start_unix, end_unix), 1);
    eprintln!(
        "{TEST}: {} KVM exits, {} local accesses; disk mount count {} -> {}",
        reports[0].exits,
        reports[0]
            .stats
            .local
            .load(std::sync::atomic::Ordering::Relaxed),
        before.mount_count,
        after.mount_count
    );
}

/// The user-space proof (see the file's documentation).
fn debian_kernel_boots_to_init() {
    let files = match GuestFiles::locate() {
        Ok(f) => f,
        Err(e) => {
            privilege::unavailable(TEST, &e.to_string());
            return;
        }
    };
    let linux = LinuxBoot::new(&files, 1);
    let console = linux.console.clone();
    console.set_echo(echo());
    let limit = timeout(GuestKernel::Debian);

    let start = Instant::now();
    let mut client = Client::start_linux(
        minimal::local_spec(None),
        vec![LinuxVm {
            vm: VM,
            boot: linux,
        }],
    )
    .expect("start the Linux VM");

    let booted = console.wait_for("DEVPLANE-INIT-OK", limit);
    let to_init = start.elapsed();
    assert!(
        booted,
        "no DEVPLANE-INIT-OK within {limit:?}; console tail:\n{}",
        tail(&console)
    );
    // The clock line follows at once; compare it with the host's clock
    // when it appeared.
    let time = wait_line(&console, "DEVPLANE-TIME ", Duration::from_secs(60));
    let host_now = now_unix();
    let time =
        time.unwrap_or_else(|| panic!("no DEVPLANE-TIME; console tail:\n{}", tail(&console)));
    let left = limit.saturating_sub(start.elapsed());
    let reports: Vec<VcpuReport> = client.wait(left.max(Duration::from_secs(60)));
    let total = start.elapsed();
    let text = console.text();
    eprintln!(
        "{TEST}: init marker after {:.2} s, VM stopped after {:.2} s",
        to_init.as_secs_f64(),
        total.as_secs_f64()
    );

    assert!(
        text.contains("Linux version 6.1"),
        "the kernel's banner is missing; console tail:\n{}",
        tail(&console)
    );
    let mut parts = time.split_whitespace();
    let guest: u64 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("DEVPLANE-TIME {time:?} is not a number of seconds"));
    let source = parts.next().unwrap_or("?");
    assert!(
        guest.abs_diff(host_now) <= 5,
        "guest clock {guest} (from {source}) is {} s from the host's {host_now}",
        guest.abs_diff(host_now)
    );
    assert_eq!(
        source, "rtc",
        "the guest read its time from /dev/rtc0 (the CMOS model)"
    );
    assert!(
        text.contains("DEVPLANE-NODISK"),
        "no disk yet:\n{}",
        tail(&console)
    );
    assert!(
        text.contains("DEVPLANE-POWEROFF"),
        "init did not reach power-off:\n{}",
        tail(&console)
    );

    assert_eq!(reports.len(), 1);
    let exit = reports[0].exit.as_ref().map_err(|e| e.to_string());
    assert!(
        matches!(exit, Ok(VcpuExit::Reset) | Ok(VcpuExit::Shutdown)),
        "the VM did not stop by itself within {limit:?} (vCPU exit {exit:?}); console tail:\n{}",
        tail(&console)
    );
    eprintln!(
        "{TEST}: {} KVM exits, {} local accesses, {} local interrupts, guest clock {} s off",
        reports[0].exits,
        reports[0]
            .stats
            .local
            .load(std::sync::atomic::Ordering::Relaxed),
        reports[0]
            .stats
            .local_irqs
            .load(std::sync::atomic::Ordering::Relaxed),
        guest.abs_diff(host_now)
    );
}
