//! Debian's own, unmodified Linux kernel (linux-image-amd64, 6.1) boots in
//! the client VMM to the busybox `/init` of `guest/init`, with the legacy
//! devices as local models: the 16550A UART (the console), the CMOS RTC
//! (the guest's clock) and the i8042 (whose reset line powers the VM off).
//!
//! Needs root, `/dev/kvm` and the files `scripts/guest-kernel.sh` builds
//! (`scripts/setup.sh` runs it); without them the test skips with a
//! message, or fails when `DEVPLANE_REQUIRE_PRIVILEGED=1`.
//!
//! `DEVPLANE_CONSOLE=1` echoes the guest's console to stdout (run with
//! `--nocapture`); `DEVPLANE_LINUX_BOOT_TIMEOUT` (seconds) overrides how
//! long the boot may take.
//!
//! Where `/dev/kvm` emulates guest kernel code (nested PVM, see
//! [`boot::kvm_emulates_kernel_code`]) the boot takes minutes, longer than
//! a CI profile allows one test; there the test runs only with
//! `DEVPLANE_LINUX_BOOT_SLOW=1` and otherwise says why it skipped.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devplane_devmodels::Space;
use devplane_testkit::privilege::{self, Capability};
use devplane_vmm::boot::{self, Console, GuestFiles, LinuxBoot};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::kvm::Entry;
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{
    Client, ClientSpec, DeviceSpec, LinuxVm, Place, VcpuReport, VcpuSpec, VmSpec,
};

const TEST: &str = "debian_kernel_boots_to_init_with_local_legacy_devices";
const VM: u32 = 1;
/// How long the whole boot, to power-off, may take by default under
/// hardware virtualisation (it takes a few seconds) ...
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// ... and where /dev/kvm emulates the guest's kernel code (minutes).
const EMULATED_TIMEOUT: Duration = Duration::from_secs(1800);
/// Runs the test on a host whose KVM emulates guest kernel code.
const SLOW_ENV: &str = "DEVPLANE_LINUX_BOOT_SLOW";

fn local(base: u64, len: u64, model: u32, kind: &str) -> DeviceSpec {
    DeviceSpec {
        space: Space::Pio,
        base,
        len,
        model,
        posted: false,
        place: Place::Local { kind: kind.into() },
    }
}

fn timeout() -> Duration {
    std::env::var("DEVPLANE_LINUX_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(if boot::kvm_emulates_kernel_code() {
            EMULATED_TIMEOUT
        } else {
            DEFAULT_TIMEOUT
        })
}

fn spec() -> ClientSpec {
    ClientSpec {
        client: 7,
        bind: None,
        servers: vec![],
        vms: vec![VmSpec {
            id: VM,
            hypervisor: 1,
            mem_bytes: boot::DEFAULT_MEM,
            images: vec![],
            vcpus: vec![VcpuSpec {
                // Not used: a Linux vCPU starts in long mode.
                entry: Entry {
                    cs: 0,
                    ip: 0,
                    sp: 0,
                },
                core: None,
            }],
            devices: vec![
                local(0x3f8, 8, 1, "uart"),
                local(0x70, 2, 2, "cmos"),
                local(0x60, 5, 3, "i8042"),
            ],
        }],
        engine: EngineConfig::default(),
        engine_core: None,
        vcpu_spin: 0,
        samples: 0,
        direct: false,
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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

fn tail(console: &Console) -> String {
    let t = console.text();
    let lines: Vec<&str> = t.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[test]
fn debian_kernel_boots_to_init_with_local_legacy_devices() {
    if !privilege::require(TEST, &[Capability::Root, Capability::Kvm]) {
        return;
    }
    let files = match GuestFiles::locate() {
        Ok(f) => f,
        Err(e) => {
            privilege::unavailable(TEST, &e.to_string());
            return;
        }
    };
    if boot::kvm_emulates_kernel_code() && std::env::var_os(SLOW_ENV).is_none_or(|v| v == "0") {
        // Not a missing capability: the boot works there, at the speed of
        // an instruction emulator, which no per-test CI time limit allows.
        eprintln!(
            "SKIPPED {TEST}: /dev/kvm is nested PVM (kvm_pvm), which emulates every guest kernel \
             instruction: booting Linux takes many minutes here. Set {SLOW_ENV}=1 to run it \
             (and allow the test {EMULATED_TIMEOUT:?})."
        );
        return;
    }
    let linux = LinuxBoot::new(&files, 1);
    let console = linux.console.clone();
    console.set_echo(std::env::var_os("DEVPLANE_CONSOLE").is_some_and(|v| v != "0"));
    let limit = timeout();

    let start = Instant::now();
    let mut client = Client::start_linux(
        spec(),
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
