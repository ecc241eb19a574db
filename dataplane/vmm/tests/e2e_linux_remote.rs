//! Linux boots in the client VMM with its serial console, RTC and disk on
//! a server behind XDP (two network namespaces joined by veth); the server
//! is stopped and started again between two boots, and the second boot
//! sees what the first one wrote. Which kernel and proof depends on the
//! host ([`GuestKernel::for_host`], said in the test's output):
//!
//! - where KVM runs guest kernel code on the CPU, Debian's own kernel boots
//!   to the busybox `/init`: the kernel's banner and the init marker arrive
//!   through the remote UART, the guest's clock comes from the remote CMOS,
//!   and the data it writes to the virtio disk lands in the server's
//!   `blockstore` file, where the second boot reads it back;
//! - where `/dev/kvm` emulates guest kernel code (nested PVM), the minimal
//!   kernel and its init boot (see `e2e_linux_boot.rs`) from an ext2 root
//!   on the server's blockstore: the banner and the init's lines through
//!   the remote UART (and in the server's console log), the clock the
//!   kernel set from the remote CMOS and the time the init reads, within
//!   5 s of the host's, what the boot wrote to the disk (mount count +1 and
//!   one line in the init's file after the first boot; the second boot, on
//!   a new server, reads both back and writes the next: +2, two lines), and
//!   the restart ending the VM through the i8042.
//!
//! Needs root, BPF, `/dev/kvm` and the guest files `scripts/setup.sh`
//! builds. `DEVPLANE_GUEST_KERNEL=debian|minimal` overrides the choice of
//! kernel; `DEVPLANE_CONSOLE=1` echoes the console.

mod minimal_boot;

use minimal_boot::{now_unix, tail};

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;
use devplane_testkit::host::ServerThread;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::boot::{self, Console, GuestFiles, GuestKernel, LinuxBoot, MinimalKernel};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::kvm::{Entry, VcpuExit};
use devplane_vmm::vmm::{
    Client, ClientSpec, DeviceSpec, DiskPlace, LinuxVm, Place, ServerSpec, VcpuReport, VcpuSpec,
    VmSpec,
};

const TEST: &str = "linux_boots_with_console_clock_and_disk_on_the_server";
const PORT: u16 = 7800;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const HV: u32 = 1;
const VM: u32 = 1;
const UART: u32 = 11;
const CMOS: u32 = 12;
const STORE: u32 = 13;
/// Where the blockstore's MMIO window sits: far above guest RAM.
const STORE_GPA: u64 = 1 << 44;
const VIRTIO_PORT: u64 = 0xc000;
const VIRTIO_IRQ: u8 = 5;

fn server_config(topo: &Topology, disk: &Path, log: &Path) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0, 1],
            pin_dir: Some(format!("/sys/fs/bpf/devplane-test-linux-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 50,
            batch: 64,
        },
        clients: vec![ClientConfig {
            id: CLIENT,
            address: topo.client_ip(),
            budget: None,
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models: vec![
            ModelConfig {
                line: Some(4),
                vm: Some(VM),
                pio_base: Some(0x3f8),
                backing: Some(log.to_path_buf()),
                ..ModelConfig::new(UART, "uart", 0)
            },
            ModelConfig {
                pio_base: Some(0x70),
                ..ModelConfig::new(CMOS, "cmos", 0)
            },
            ModelConfig {
                mmio_base: Some(STORE_GPA),
                backing: Some(disk.to_path_buf()),
                ..ModelConfig::new(STORE, "blockstore", 1)
            },
        ],
    }
}

fn remote(base: u64, len: u64, model: u32) -> DeviceSpec {
    DeviceSpec {
        space: Space::Pio,
        base,
        len,
        model,
        posted: false,
        place: Place::Remote { server: 0 },
    }
}

fn client_spec(topo: &Topology) -> ClientSpec {
    ClientSpec {
        client: CLIENT,
        bind: Some(topo.client_ip().into()),
        servers: vec![ServerSpec {
            addr: SocketAddr::from((topo.server_ip(), PORT)),
            id: SERVER,
        }],
        vms: vec![VmSpec {
            id: VM,
            hypervisor: HV,
            mem_bytes: boot::DEFAULT_MEM,
            images: vec![],
            vcpus: vec![VcpuSpec {
                entry: Entry {
                    cs: 0,
                    ip: 0,
                    sp: 0,
                },
                core: None,
            }],
            devices: vec![
                remote(0x3f8, 8, UART),
                remote(0x70, 2, CMOS),
                DeviceSpec {
                    space: Space::Pio,
                    base: 0x60,
                    len: 5,
                    model: 3,
                    posted: false,
                    place: Place::Local {
                        kind: "i8042".into(),
                    },
                },
                DeviceSpec {
                    space: Space::Pio,
                    base: VIRTIO_PORT,
                    len: devplane_vmm::virtio::blk::BAR_SIZE,
                    model: 4,
                    posted: false,
                    place: Place::VirtioBlk {
                        irq: VIRTIO_IRQ,
                        disk: DiskPlace::Remote {
                            server: 0,
                            model: STORE,
                            gpa: STORE_GPA,
                        },
                    },
                },
            ],
        }],
        engine: EngineConfig {
            spin_budget: 500,
            retransmit: Duration::from_millis(5),
            ..EngineConfig::default()
        },
        engine_core: None,
        vcpu_spin: 200,
        samples: 0,
        direct: true,
    }
}

/// The rest of the last whole console line that starts with `key`.
fn line(text: &str, key: &str) -> Option<String> {
    text.lines()
        .rev()
        .find_map(|l| l.trim_end_matches('\r').strip_prefix(key))
        .map(|s| s.trim().to_string())
}

/// Starts `linux` in the client namespace against the running server.
fn start(topo: &Topology, linux: LinuxBoot) -> Client {
    linux
        .console
        .set_echo(std::env::var_os("DEVPLANE_CONSOLE").is_some_and(|v| v != "0"));
    let spec = client_spec(topo);
    topo.run(Side::Client, move || {
        Client::start_linux(
            spec,
            vec![LinuxVm {
                vm: VM,
                boot: linux,
            }],
        )
    })
    .expect("enter the client namespace")
    .expect("start the Linux VM")
}

/// The vCPU's exit was the i8042's reset (or a shutdown), and the devices
/// were remote; returns the count of remote accesses.
fn check_ended(label: &str, reports: &[VcpuReport], console: &Console) -> u64 {
    assert_eq!(reports.len(), 1);
    let exit = reports[0].exit.as_ref().map_err(|e| e.to_string());
    assert!(
        matches!(exit, Ok(VcpuExit::Reset) | Ok(VcpuExit::Shutdown)),
        "{label}: the VM did not end by itself (vCPU exit {exit:?}); console tail:\n{}",
        tail(console)
    );
    let remote = reports[0].stats.remote.load(Ordering::Relaxed);
    assert!(remote > 1000, "{label}: only {remote} remote accesses");
    remote
}

/// One boot of the minimal kernel and init against the running server;
/// returns the boot's span on the host's clock.
fn minimal_once(
    topo: &Topology,
    kernel: &MinimalKernel,
    boot_id: u32,
    limit: Duration,
) -> (u64, u64) {
    let label = format!("boot {boot_id}");
    let linux = LinuxBoot::from_root_disk(kernel);
    let console = linux.console.clone();
    let t0 = Instant::now();
    let start_unix = now_unix();
    let watch = minimal_boot::Watch::start(&console, t0);
    let mut client = start(topo, linux);
    let reports: Vec<VcpuReport> = client.wait(limit);
    let total = t0.elapsed();
    let seen = watch.finish();
    drop(client);
    let end_unix = now_unix();
    let remote = check_ended(&label, &reports, &console);
    eprintln!(
        "{TEST}: {label}: {}; VM ended after {:.1} s; {} KVM exits, {remote} remote accesses",
        seen.summary(),
        total.as_secs_f64(),
        reports[0].exits
    );
    minimal_boot::check_console(&label, &seen, &console);
    assert!(
        matches!(reports[0].exit, Ok(VcpuExit::Reset)),
        "{label}: the init's restart (reboot=k: the i8042's reset) ended the VM"
    );
    (start_unix, end_unix)
}

/// The minimal kernel's proof (see the file's documentation).
fn minimal_kernel_boots_twice_across_a_server_restart(topo: &Topology, limit: Duration) {
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
    let pid = std::process::id();
    let disk = std::env::temp_dir().join(format!("dp-linux-root-{pid}.img"));
    let log = std::env::temp_dir().join(format!("dp-linux-console-{pid}.log"));
    let _disk = minimal_boot::TempFile(disk.clone());
    let _log = minimal_boot::TempFile(log.clone());
    let fresh = minimal_boot::new_disk(&disk, &kernel.init);

    let server = ServerThread::spawn(server_config(topo, &disk, &log), Some(topo.server_netns()))
        .expect("server starts");
    let span = minimal_once(topo, &kernel, 1, limit);
    // Stopping the server writes back what its blockstore holds.
    server.stop();
    let first = minimal_boot::check_disk("boot 1", &disk, fresh.mount_count, span, 1);
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains(minimal_boot::BANNER) && logged.contains(minimal_boot::SYNCED_LINE),
        "the server's console log lacks the boot: {} bytes",
        logged.len()
    );

    // A new server on the same image: the second boot's mount reads the
    // first one's count and writes the next, and its init appends to the
    // first one's file.
    let server = ServerThread::spawn(server_config(topo, &disk, &log), Some(topo.server_netns()))
        .expect("server starts again");
    let span = minimal_once(topo, &kernel, 2, limit);
    server.stop();
    let second = minimal_boot::check_disk("boot 2", &disk, first.mount_count, span, 2);
    eprintln!(
        "{TEST}: disk mount count {} -> {} -> {} across the server restart",
        fresh.mount_count, first.mount_count, second.mount_count
    );
}

/// One boot of Debian's kernel, `boot_id`, against the running server;
/// returns its console.
fn boot_once(topo: &Topology, files: &GuestFiles, boot_id: u32, limit: Duration) -> String {
    let linux = LinuxBoot::new(files, boot_id);
    let console = linux.console.clone();
    let start_at = Instant::now();
    let mut client = start(topo, linux);
    assert!(
        console.wait_for("DEVPLANE-INIT-OK", limit),
        "boot {boot_id}: no init marker within {limit:?}; console tail:\n{}",
        tail(&console)
    );
    let to_init = start_at.elapsed();
    let host_now = now_unix();
    let reports: Vec<VcpuReport> = client.wait(limit.saturating_sub(start_at.elapsed()));
    let text = console.text();
    let remote = check_ended(&format!("boot {boot_id}"), &reports, &console);
    eprintln!(
        "{TEST}: boot {boot_id}: init marker after {:.2} s, stopped after {:.2} s, \
         {} KVM exits, {remote} remote accesses",
        to_init.as_secs_f64(),
        start_at.elapsed().as_secs_f64(),
        reports[0].exits
    );

    assert!(text.contains("Linux version 6.1"), "no kernel banner");
    let time = line(&text, "DEVPLANE-TIME ").expect("a DEVPLANE-TIME line");
    let mut parts = time.split_whitespace();
    let guest: u64 = parts.next().and_then(|s| s.parse().ok()).expect("seconds");
    assert!(
        guest.abs_diff(host_now) <= 5,
        "boot {boot_id}: the guest's clock {guest} is {} s from the host's",
        guest.abs_diff(host_now)
    );
    assert_eq!(parts.next(), Some("rtc"), "read through /dev/rtc0");
    let sum = line(&text, "DEVPLANE-SUM ").expect("a DEVPLANE-SUM line");
    let want = line(&text, "DEVPLANE-SUM-EXPECT ").expect("a DEVPLANE-SUM-EXPECT line");
    assert_eq!(sum, want, "boot {boot_id}: data read back differs");
    assert!(text.contains("DEVPLANE-POWEROFF"));
    text
}

#[test]
fn linux_boots_with_console_clock_and_disk_on_the_server() {
    if !privilege::require(TEST, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let (kernel, why) = GuestKernel::for_host().expect("choose the guest kernel");
    // Per boot: the minimal kernel's takes about a minute where guest
    // kernel code is emulated; Debian's many more.
    let limit = Duration::from_secs(match (boot::kvm_emulates_kernel_code(), kernel) {
        (false, _) => 120,
        (true, GuestKernel::Minimal) => 240,
        (true, GuestKernel::Debian) => 3600,
    });
    let topo = match Topology::new("lr") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(TEST, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    match kernel {
        GuestKernel::Debian => {
            eprintln!("{TEST}: Debian's generic kernel, to its busybox init ({why})");
            debian_kernel_boots_twice_across_a_server_restart(&topo, limit);
        }
        GuestKernel::Minimal => {
            eprintln!("{TEST}: the minimal kernel and init, from an ext2 root disk ({why})");
            minimal_kernel_boots_twice_across_a_server_restart(&topo, limit);
        }
    }
}

/// The user-space proof (see the file's documentation).
fn debian_kernel_boots_twice_across_a_server_restart(topo: &Topology, limit: Duration) {
    let files = match GuestFiles::locate() {
        Ok(f) => f,
        Err(e) => {
            privilege::unavailable(TEST, &e.to_string());
            return;
        }
    };
    let pid = std::process::id();
    let disk = std::env::temp_dir().join(format!("dp-linux-disk-{pid}.img"));
    let log = std::env::temp_dir().join(format!("dp-linux-console-{pid}.log"));
    let _disk = minimal_boot::TempFile(disk.clone());
    let _log = minimal_boot::TempFile(log.clone());

    let server = ServerThread::spawn(server_config(topo, &disk, &log), Some(topo.server_netns()))
        .expect("server starts");
    let first = boot_once(topo, &files, 1, limit);
    assert!(
        line(&first, "DEVPLANE-PREV").is_some(),
        "the first boot read the disk"
    );
    server.stop();
    // The server's UART model wrote the console log: the banner passed
    // through it.
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        logged.contains("Linux version 6.1") && logged.contains("DEVPLANE-INIT-OK"),
        "the server's console log lacks the boot: {} bytes",
        logged.len()
    );

    // A new server process on the same disk image: the second boot reads
    // back what the first wrote and flushed.
    let server = ServerThread::spawn(server_config(topo, &disk, &log), Some(topo.server_netns()))
        .expect("server starts again");
    let second = boot_once(topo, &files, 2, limit);
    assert_eq!(
        line(&second, "DEVPLANE-PREV ").as_deref(),
        Some("devplane boot 1"),
        "the second boot did not read the first boot's data"
    );
    server.stop();
}
