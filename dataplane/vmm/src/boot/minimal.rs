//! The minimal kernel's boot from its ext2 root disk with its minimal
//! init (`guest/min-init.c`), as the boot tests and dpbench's `boot`
//! scenario run it: the VM's devices with the console, clock and disk local
//! or on a server ([`local_spec`], [`remote_spec`], [`server_config`]),
//! the root disk ([`new_disk`]) and the console lines the host watches for
//! ([`Watch`], [`Milestones`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;

use super::Console;
use super::rootfs::{self, RootfsError, Superblock};
use crate::engine::EngineConfig;
use crate::kvm::Entry;
use crate::vmm::{ClientSpec, DeviceSpec, DiskPlace, Place, ServerSpec, VcpuSpec, VmSpec};

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

/// The VM's id in the specs below.
pub const VM: u32 = 1;
/// The client's id.
pub const CLIENT: u32 = 7;
/// The server's id.
pub const SERVER: u32 = 1;
/// The hypervisor id of the VM.
pub const HV: u32 = 1;
/// The server's UART model ...
pub const UART_MODEL: u32 = 11;
/// ... its CMOS RTC ...
pub const CMOS_MODEL: u32 = 12;
/// ... and the disk's blockstore.
pub const STORE_MODEL: u32 = 13;
/// Where the blockstore's MMIO window sits: far above guest RAM.
pub const STORE_GPA: u64 = 1 << 44;
/// The virtio-blk device's I/O BAR ...
pub const VIRTIO_PORT: u64 = 0xc000;
/// ... and its ISA line.
pub const VIRTIO_IRQ: u8 = 5;

/// Seconds since the epoch, by the host's clock.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh ext2 root disk at `path` with `init` as `/sbin/init`; returns
/// its superblock (never mounted).
pub fn new_disk(path: &Path, init: &Path) -> Result<Superblock, RootfsError> {
    let dir = path.with_extension("root");
    let io = |source| RootfsError::Io {
        path: dir.display().to_string(),
        source,
    };
    let _ = std::fs::remove_dir_all(&dir);
    let made = std::fs::create_dir_all(dir.join("sbin"))
        .and_then(|()| std::fs::copy(init, dir.join("sbin/init")))
        .map_err(io)
        .and_then(|_| rootfs::make_ext2(path, DISK_BYTES, Some(&dir)));
    let _ = std::fs::remove_dir_all(&dir);
    made?;
    rootfs::read_superblock(path)
}

/// A port-I/O device of `len` ports at `base`.
fn pio(base: u64, len: u64, model: u32, place: Place) -> DeviceSpec {
    DeviceSpec {
        space: Space::Pio,
        base,
        len,
        model,
        posted: false,
        place,
    }
}

fn local(base: u64, len: u64, model: u32, kind: &str) -> DeviceSpec {
    pio(base, len, model, Place::Local { kind: kind.into() })
}

fn remote(base: u64, len: u64, model: u32) -> DeviceSpec {
    pio(base, len, model, Place::Remote { server: 0 })
}

fn virtio_blk(disk: DiskPlace) -> DeviceSpec {
    let place = Place::VirtioBlk {
        irq: VIRTIO_IRQ,
        disk,
    };
    pio(VIRTIO_PORT, crate::virtio::blk::BAR_SIZE, 4, place)
}

fn vm(devices: Vec<DeviceSpec>) -> VmSpec {
    VmSpec {
        id: VM,
        hypervisor: HV,
        mem_bytes: super::DEFAULT_MEM,
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
        devices,
    }
}

/// A client with one Linux VM whose UART (`0x3f8`), CMOS RTC (`0x70`) and
/// i8042 (`0x60`) are local models, and, given `disk`, a virtio-blk device
/// on that local file.
pub fn local_spec(disk: Option<&Path>) -> ClientSpec {
    let mut devices = vec![
        local(0x3f8, 8, 1, "uart"),
        local(0x70, 2, 2, "cmos"),
        local(0x60, 5, 3, "i8042"),
    ];
    if let Some(disk) = disk {
        devices.push(virtio_blk(DiskPlace::Local {
            backing: disk.to_path_buf(),
        }));
    }
    ClientSpec {
        client: CLIENT,
        bind: None,
        servers: vec![],
        vms: vec![vm(devices)],
        engine: EngineConfig::default(),
        engine_core: None,
        vcpu_spin: 0,
        samples: 0,
        direct: false,
    }
}

/// A client at `client_ip` with one Linux VM whose UART and CMOS RTC are on
/// the server at `server` ([`server_config`]), its virtio-blk disk on the
/// server's blockstore, and its i8042 local (its reset line ends the VM).
pub fn remote_spec(client_ip: Ipv4Addr, server: SocketAddr) -> ClientSpec {
    ClientSpec {
        client: CLIENT,
        bind: Some(client_ip.into()),
        servers: vec![ServerSpec {
            addr: server,
            id: SERVER,
            via: None,
        }],
        vms: vec![vm(vec![
            remote(0x3f8, 8, UART_MODEL),
            remote(0x70, 2, CMOS_MODEL),
            local(0x60, 5, 3, "i8042"),
            virtio_blk(DiskPlace::Remote {
                server: 0,
                model: STORE_MODEL,
                gpa: STORE_GPA,
            }),
        ])],
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

/// Where a server for [`remote_spec`] runs and keeps its files.
pub struct ServerPlace<'a> {
    /// Its XDP interface.
    pub interface: &'a str,
    /// Its UDP port.
    pub port: u16,
    /// Where it pins its BPF objects.
    pub pin_dir: PathBuf,
    /// The client's address.
    pub client_ip: Ipv4Addr,
    /// The disk image its blockstore serves.
    pub disk: &'a Path,
    /// Where its UART model writes the console.
    pub log: &'a Path,
}

/// The server of [`remote_spec`]: XDP on `at.interface`, the UART (line 4)
/// writing the console to `at.log`, the CMOS RTC, and the blockstore on
/// `at.disk`.
pub fn server_config(at: &ServerPlace) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: at.port,
            mode: Mode::Xdp,
            interface: Some(at.interface.to_string()),
            workers: vec![0, 1],
            pin_dir: Some(at.pin_dir.clone()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 50,
            batch: 64,
        },
        clients: vec![ClientConfig {
            budget: None,
            tag_key: None,
            id: CLIENT,
            address: at.client_ip,
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
                backing: Some(at.log.to_path_buf()),
                ..ModelConfig::new(UART_MODEL, "uart", 0)
            },
            ModelConfig {
                pio_base: Some(0x70),
                ..ModelConfig::new(CMOS_MODEL, "cmos", 0)
            },
            ModelConfig {
                mmio_base: Some(STORE_GPA),
                backing: Some(at.disk.to_path_buf()),
                ..ModelConfig::new(STORE_MODEL, "blockstore", 1)
            },
        ],
    }
}
/// When each line first appeared on the console, from the boot's start.
#[derive(Debug, Default, Clone)]
pub struct Milestones {
    /// The kernel's banner.
    pub banner: Option<Duration>,
    /// When, the guest's seconds in the line, and the host's clock then.
    pub rtc: Option<(Duration, u64, u64)>,
    /// The root file system mounted.
    pub root: Option<Duration>,
    /// The init's first line.
    pub init: Option<Duration>,
    /// When, the init's seconds, and the host's clock then.
    pub user_time: Option<(Duration, u64, u64)>,
    /// The init's line synced to the disk.
    pub synced: Option<Duration>,
    /// A kernel panic.
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
