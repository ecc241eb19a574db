//! The virtio block path end to end, without Linux: a small guest driver
//! (`guests::virtio_blk_check`) finds the device behind the PCI host
//! bridge, brings it up, writes a sector, flushes and reads it back —
//! with the disk in a local `blockstore` model, and with the disk on a
//! server behind XDP (two network namespaces), where it survives the
//! server's restart.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;
use devplane_testkit::host::ServerThread;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::guests::{self, VIRTIO_CHECK_OK};
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::virtio::blk::BAR_SIZE;
use devplane_vmm::vmm::{
    Client, ClientSpec, DeviceSpec, DiskPlace, Place, ServerSpec, VcpuReport, VcpuSpec, VmSpec,
};

const PORT: u16 = 7900;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const HV: u32 = 1;
const VM: u32 = 1;
const STORE: u32 = 13;
const STORE_GPA: u64 = 1 << 44;
const IO_BASE: u16 = 0xc000;
const SECTOR: u16 = 9;
const SEED: u8 = 0x5a;

/// Removes files when dropped.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..512u32)
        .map(|i| seed.wrapping_add((i * 7) as u8))
        .collect()
}

fn sector_of(path: &Path) -> Vec<u8> {
    let all = std::fs::read(path).expect("read the disk image");
    let at = usize::from(SECTOR) * 512;
    all[at..at + 512].to_vec()
}

fn vm(write: bool, seed: u8, disk: DiskPlace) -> VmSpec {
    let g = guests::virtio_blk_check(IO_BASE, SECTOR, write, seed).expect("assemble");
    VmSpec {
        id: VM,
        hypervisor: HV,
        mem_bytes: g.mem_end() as usize,
        images: vec![(g.load_gpa, g.code.clone())],
        vcpus: vec![VcpuSpec {
            entry: g.entry,
            core: None,
        }],
        devices: vec![DeviceSpec {
            space: Space::Pio,
            base: u64::from(IO_BASE),
            len: BAR_SIZE,
            model: 4,
            posted: false,
            place: Place::VirtioBlk { irq: 5, disk },
        }],
    }
}

fn spec(vms: Vec<VmSpec>, topo: Option<&Topology>) -> ClientSpec {
    ClientSpec {
        client: CLIENT,
        bind: topo.map(|t| t.client_ip().into()),
        servers: topo
            .map(|t| ServerSpec {
                addr: SocketAddr::from((t.server_ip(), PORT)),
                id: SERVER,
                via: None,
            })
            .into_iter()
            .collect(),
        vms,
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

fn done(reports: &[VcpuReport]) -> u32 {
    assert_eq!(reports.len(), 1);
    match &reports[0].exit {
        Ok(VcpuExit::Done(v)) => *v,
        other => panic!("the guest did not finish: {other:?}"),
    }
}

#[test]
fn a_guest_driver_writes_flushes_and_reads_a_local_disk() {
    let test = "a_guest_driver_writes_flushes_and_reads_a_local_disk";
    if !privilege::require(test, &[Capability::Kvm]) {
        return;
    }
    let disk = std::env::temp_dir().join(format!("dp-virtio-local-{}.img", std::process::id()));
    let _files = TempFiles(vec![disk.clone()]);
    let local = || DiskPlace::Local {
        backing: disk.clone(),
    };
    let mut c = Client::start(spec(vec![vm(true, SEED, local())], None)).expect("start");
    assert_eq!(done(&c.wait(Duration::from_secs(30))), VIRTIO_CHECK_OK);
    drop(c);
    assert_eq!(
        sector_of(&disk),
        pattern(SEED),
        "the sector is in the image"
    );
    // A read-only run with another pattern must notice the difference
    // (step 8: the data read back).
    let mut c = Client::start(spec(vec![vm(false, SEED ^ 1, local())], None)).expect("start");
    assert_eq!(done(&c.wait(Duration::from_secs(30))), 8);
}

fn server_config(topo: &Topology, disk: &Path) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0, 1],
            pin_dir: Some(
                format!("/sys/fs/bpf/devplane-test-virtio-{}", std::process::id()).into(),
            ),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 50,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: None,
            id: CLIENT,
            address: topo.client_ip(),
            budget: None,
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models: vec![ModelConfig {
            mmio_base: Some(STORE_GPA),
            backing: Some(disk.to_path_buf()),
            ..ModelConfig::new(STORE, "blockstore", 1)
        }],
    }
}

fn run_remote(topo: &Topology, write: bool, seed: u8) -> (u32, u64) {
    let disk = DiskPlace::Remote {
        server: 0,
        model: STORE,
        gpa: STORE_GPA,
    };
    let s = spec(vec![vm(write, seed, disk)], Some(topo));
    let mut c = topo
        .run(Side::Client, move || Client::start(s))
        .expect("enter the client namespace")
        .expect("client starts");
    let reports = c.wait(Duration::from_secs(60));
    let remote = reports[0].stats.remote.load(Ordering::Relaxed);
    (done(&reports), remote)
}

#[test]
fn a_guest_driver_uses_a_disk_on_the_server_and_it_survives_a_restart() {
    let test = "a_guest_driver_uses_a_disk_on_the_server_and_it_survives_a_restart";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let topo = match Topology::new("vb") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let disk = std::env::temp_dir().join(format!("dp-virtio-remote-{}.img", std::process::id()));
    let _files = TempFiles(vec![disk.clone()]);

    let server = ServerThread::spawn(server_config(&topo, &disk), Some(topo.server_netns()))
        .expect("server starts");
    let (result, remote) = run_remote(&topo, true, SEED);
    assert_eq!(result, VIRTIO_CHECK_OK);
    // The data goes in bulk (the write, the flush and the read as block
    // requests); only the capacity is read through the register window.
    assert!(remote >= 1, "{remote} remote accesses");
    let w = &server.snapshot().workers[1];
    assert!(w.records >= remote, "worker 1 served {} records", w.records);
    assert!(
        w.bulk_applied >= 2,
        "the write and the flush were block requests"
    );
    server.stop();
    // Written and flushed: in the server's file.
    assert_eq!(sector_of(&disk), pattern(SEED));

    // The server starts again on the same image: a read-only run finds
    // the data, and a run expecting other data does not.
    let server = ServerThread::spawn(server_config(&topo, &disk), Some(topo.server_netns()))
        .expect("server starts again");
    assert_eq!(run_remote(&topo, false, SEED).0, VIRTIO_CHECK_OK);
    assert_eq!(run_remote(&topo, false, SEED ^ 1).0, 8);
    server.stop();
}
