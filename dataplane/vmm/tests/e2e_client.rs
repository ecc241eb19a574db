//! End to end: real KVM guests in a client network namespace, their device
//! models on a real server behind XDP in another. Port I/O and MMIO reach
//! remote null and counter models and read back the right values;
//! interrupts raised by a remote model are counted by the guest's handler;
//! 4 VMs x 2 vCPUs run at once; with loss injected, every write is applied
//! exactly once and every read answered; posted writes keep their order.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;
use devplane_testkit::host::{ServerSnapshot, ServerThread};
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::engine::{EngineConfig, Loss};
use devplane_vmm::guests::{self, Guest};
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{
    Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuReport, VcpuSpec, VmSpec,
};

const PORT: u16 = 7700;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const OTHER_CLIENT: u32 = 8;
const HV: u32 = 2;
const NULL_MODEL: u32 = 1;
const IRQ_MODEL: u32 = 2;
const MMIO_MODEL: u32 = 3;
const PIO_BASE: u16 = 0x500;
const IRQ_BASE: u16 = 0x600;
const MMIO_BASE: u32 = 0xd_0000;
const IRQ_LINE: u8 = 5;
const STRAY_MODEL: u32 = 4;
const STRAY_BASE: u16 = 0x700;
/// An interrupt counter like [`IRQ_MODEL`] whose interrupts go to VM 3.
const IRQ3_MODEL: u32 = 6;

/// Counter model of vCPU `i` of VM `vm` (VMs 1..=4).
fn counter_id(vm: u32, i: u16) -> u32 {
    100 + vm * 10 + i as u32
}

fn model(id: u32, kind: &str, worker: usize) -> ModelConfig {
    ModelConfig::new(id, kind, worker)
}

/// The test server's models: a null model, interrupt sources (one for a
/// VM the client never runs) and two counters per VM.
fn server_models() -> Vec<ModelConfig> {
    let mut models = vec![
        model(NULL_MODEL, "null", 0),
        ModelConfig {
            line: Some(IRQ_LINE as u32),
            vm: Some(1),
            pio_base: Some(IRQ_BASE),
            ..model(IRQ_MODEL, "counter", 1)
        },
        ModelConfig {
            mmio_base: Some(MMIO_BASE as u64),
            backing: None,
            ..model(MMIO_MODEL, "counter", 1)
        },
        ModelConfig {
            line: Some(IRQ_LINE as u32),
            vm: Some(3),
            pio_base: Some(IRQ_BASE),
            ..model(IRQ3_MODEL, "counter", 1)
        },
        // Raises its interrupts for VM 2, which the test client never runs.
        ModelConfig {
            line: Some(IRQ_LINE as u32),
            vm: Some(2),
            pio_base: Some(STRAY_BASE),
            ..model(STRAY_MODEL, "counter", 0)
        },
    ];
    for vm in 1..=4 {
        for i in 0..2u16 {
            models.push(ModelConfig {
                pio_base: Some(PIO_BASE + 0x10 * i),
                ..model(counter_id(vm, i), "counter", ((vm + i as u32) % 2) as usize)
            });
        }
    }
    models
}

fn server_config(topo: &Topology, tag: &str) -> ServerConfig {
    let models = server_models();
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0, 1],
            pin_dir: Some(
                format!(
                    "/sys/fs/bpf/devplane-test-client-{tag}-{}",
                    std::process::id()
                )
                .into(),
            ),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![
            ClientConfig {
                tag_key: Some(devplane_testkit::keys::client_key(CLIENT)),
                id: CLIENT,
                address: topo.client_ip(),
                budget: None,
            },
            // A second client platform, only a migration target.
            ClientConfig {
                tag_key: Some(devplane_testkit::keys::client_key(OTHER_CLIENT)),
                id: OTHER_CLIENT,
                address: {
                    let o = topo.client_ip().octets();
                    std::net::Ipv4Addr::new(o[0], o[1], o[2], 201)
                },
                budget: None,
            },
        ],
        vms: (1..=4)
            .map(|id| VmConfig {
                id,
                client: CLIENT,
                hypervisor: HV,
            })
            .collect(),
        models,
    }
}

fn pio(base: u16, len: u64, model: u32, posted: bool) -> DeviceSpec {
    DeviceSpec {
        space: Space::Pio,
        base: base as u64,
        len,
        model,
        posted,
        place: Place::Remote { server: 0 },
    }
}

fn vm(id: u32, guests: &[Guest], devices: Vec<DeviceSpec>) -> VmSpec {
    let mem = guests.iter().map(|g| g.mem_end()).max().unwrap_or(0x2_0000);
    VmSpec {
        id,
        hypervisor: HV,
        mem_bytes: mem.next_multiple_of(0x1_0000).max(0x2_0000) as usize,
        images: guests
            .iter()
            .map(|g| (g.load_gpa, g.code.clone()))
            .collect(),
        vcpus: guests
            .iter()
            .map(|g| VcpuSpec {
                entry: g.entry,
                core: None,
            })
            .collect(),
        devices,
    }
}

struct Rig {
    topo: Topology,
    server: ServerThread,
}

impl Rig {
    fn new(test: &str, tag: &str) -> Option<Rig> {
        if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
            return None;
        }
        let topo = match Topology::new(tag) {
            Ok(t) => t,
            Err(e) => {
                privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
                return None;
            }
        };
        let server = ServerThread::spawn(server_config(&topo, tag), Some(topo.server_netns()))
            .expect("server starts");
        Some(Rig { topo, server })
    }

    /// Runs `vms` in the client namespace until every vCPU reports.
    fn run(&self, vms: Vec<VmSpec>, loss: Loss) -> (Vec<VcpuReport>, EngineCounts) {
        self.run_mode(vms, loss, false)
    }

    fn run_mode(
        &self,
        vms: Vec<VmSpec>,
        loss: Loss,
        direct: bool,
    ) -> (Vec<VcpuReport>, EngineCounts) {
        self.run_cfg(vms, loss, direct, false)
    }

    fn run_cfg(
        &self,
        vms: Vec<VmSpec>,
        loss: Loss,
        direct: bool,
        zero_copy: bool,
    ) -> (Vec<VcpuReport>, EngineCounts) {
        let spec = self.spec(vms, loss, direct, zero_copy);
        self.run_spec(spec)
    }

    fn spec(&self, vms: Vec<VmSpec>, loss: Loss, direct: bool, zero_copy: bool) -> ClientSpec {
        ClientSpec {
            client: CLIENT,
            bind: Some(self.topo.client_ip().into()),
            servers: vec![ServerSpec {
                addr: SocketAddr::from((self.topo.server_ip(), PORT)),
                id: SERVER,
                via: None,
            }],
            vms,
            engine: EngineConfig {
                spin_budget: 500,
                retransmit: Duration::from_millis(2),
                loss,
                zero_copy,
                tag_keys: Some(devplane_testkit::keys::client_ring(CLIENT)),
                ..EngineConfig::default()
            },
            engine_core: None,
            vcpu_spin: 200,
            samples: 0,
            direct,
        }
    }

    /// Starts a client VMM for `spec` in the client namespace (its
    /// sockets are created there; KVM and the threads do not care).
    fn start(&self, spec: ClientSpec) -> Client {
        self.topo
            .run(Side::Client, move || Client::start(spec))
            .expect("enter client netns")
            .expect("client starts")
    }

    fn run_spec(&self, spec: ClientSpec) -> (Vec<VcpuReport>, EngineCounts) {
        let mut client = self.start(spec);
        let reports = client.wait(Duration::from_secs(60));
        // Let datagrams already on their way (interrupts sent just before
        // the last answer) reach the engine.
        std::thread::sleep(Duration::from_millis(30));
        let e = client.engine().expect("engine").stats();
        let counts = EngineCounts {
            retransmits: e.retransmits.load(std::sync::atomic::Ordering::Relaxed),
            timeouts: e.timeouts.load(std::sync::atomic::Ordering::Relaxed),
            irqs: e.irqs.load(std::sync::atomic::Ordering::Relaxed),
            loss_tx: e.loss_tx.load(std::sync::atomic::Ordering::Relaxed),
            loss_rx: e.loss_rx.load(std::sync::atomic::Ordering::Relaxed),
            tx_datagrams: e.tx_datagrams.load(std::sync::atomic::Ordering::Relaxed),
            tx_records: e.tx_records.load(std::sync::atomic::Ordering::Relaxed),
            irqs_unknown_vm: e.irqs_unknown_vm.load(std::sync::atomic::Ordering::Relaxed),
        };
        (reports, counts)
    }

    fn snapshot(&self) -> ServerSnapshot {
        self.server.snapshot()
    }
}

#[derive(Debug)]
struct EngineCounts {
    retransmits: u64,
    timeouts: u64,
    irqs: u64,
    loss_tx: u64,
    loss_rx: u64,
    tx_datagrams: u64,
    tx_records: u64,
    irqs_unknown_vm: u64,
}

/// A guest that takes `want` interrupts, one at a time, from the counter
/// at `IRQ_BASE` raising `IRQ_LINE`, and reports how many its handler
/// counted.
fn irq_chain(want: u16) -> Guest {
    guests::irq_chain(
        IRQ_LINE,
        want,
        IRQ_BASE + devplane_devmodels::counter::REG_COUNT as u16,
        IRQ_BASE + devplane_devmodels::counter::REG_IRQ as u16,
    )
    .unwrap()
}

fn done(r: &VcpuReport) -> u32 {
    match &r.exit {
        Ok(VcpuExit::Done(v)) => *v,
        other => panic!("VM {} vCPU {} did not finish: {other:?}", r.vm, r.vcpu),
    }
}

#[test]
fn pio_and_mmio_reach_remote_models() {
    pio_and_mmio(false, "pio_and_mmio_reach_remote_models", "cpm");
}

#[test]
fn direct_mode_pio_and_mmio_reach_remote_models() {
    pio_and_mmio(true, "direct_mode_pio_and_mmio_reach_remote_models", "dpm");
}

#[test]
fn zero_copy_sends_reach_remote_models() {
    // Engine lanes: a direct lane sends with plain `sendto`.
    pio_and_mmio_zc(false, true, "zero_copy_sends_reach_remote_models", "zpm");
}

fn pio_and_mmio(direct: bool, test: &str, tag: &str) {
    pio_and_mmio_zc(direct, false, test, tag);
}

fn pio_and_mmio_zc(direct: bool, zero_copy: bool, test: &str, tag: &str) {
    let Some(rig) = Rig::new(test, tag) else {
        return;
    };
    let n = 500u16;
    let pio_guest = guests::pio_loop(PIO_BASE, n).unwrap();
    let mmio_guest = guests::mmio_loop(MMIO_BASE, n).unwrap();
    let null_guest = guests::pio_read_loop(0x80, 200).unwrap();
    let vms = vec![
        vm(
            1,
            &[pio_guest],
            vec![pio(PIO_BASE, 0x10, counter_id(1, 0), false)],
        ),
        vm(
            2,
            &[mmio_guest],
            vec![DeviceSpec {
                space: Space::Mmio,
                base: MMIO_BASE as u64,
                len: 0x1000,
                model: MMIO_MODEL,
                posted: false,
                place: Place::Remote { server: 0 },
            }],
        ),
        vm(3, &[null_guest], vec![pio(0x80, 1, NULL_MODEL, false)]),
    ];
    let (reports, e) = rig.run_cfg(vms, Loss::default(), direct, zero_copy);
    assert_eq!(reports.len(), 3);
    // The counter model answers the final read with the writes it applied.
    assert_eq!(done(&reports[0]), n as u32, "PIO counter");
    assert_eq!(done(&reports[1]), n as u32, "MMIO counter");
    assert_eq!(done(&reports[2]), 0, "null model reads 0");
    for r in &reports {
        let remote = r.stats.remote.load(std::sync::atomic::Ordering::Relaxed);
        assert!(remote >= 200, "VM {} only {remote} remote exits", r.vm);
    }
    assert_eq!(e.timeouts, 0, "{e:?}");
    let s = rig.snapshot();
    // Every access applied once; a late answer may have caused a
    // retransmission, which is answered again, not applied again.
    let served: u64 = s.workers.iter().map(|w| w.records - w.duplicates).sum();
    assert_eq!(served, (n as u64 + 1) * 2 + 200, "{s:?}");
    eprintln!("engine: {e:?}; server: {:?}", s.workers);
}

#[test]
fn remote_interrupts_reach_the_guest_handler() {
    interrupts(false, "remote_interrupts_reach_the_guest_handler", "cirq");
}

#[test]
fn direct_mode_remote_interrupts_reach_the_guest_handler() {
    interrupts(
        true,
        "direct_mode_remote_interrupts_reach_the_guest_handler",
        "dirq",
    );
}

fn interrupts(direct: bool, test: &str, tag: &str) {
    let Some(rig) = Rig::new(test, tag) else {
        return;
    };
    let want = 50u16;
    let g = irq_chain(want);
    let vms = vec![vm(1, &[g], vec![pio(IRQ_BASE, 0x20, IRQ_MODEL, false)])];
    let (reports, e) = rig.run_mode(vms, Loss::default(), direct);
    assert_eq!(done(&reports[0]), want as u32, "the guest's handler count");
    assert_eq!(e.irqs, want as u64, "{e:?}");
    let s = rig.snapshot();
    assert_eq!(s.workers[1].irqs_sent, want as u64, "{s:?}");
}

/// Two VMs take interrupts from their own remote models at once. The
/// server sends a client's interrupts to where that client last sent from,
/// which in direct mode is whichever vCPU's lane (socket) spoke last: an
/// interrupt must reach its VM from any lane of the client.
#[test]
fn direct_mode_interrupts_reach_their_vm_through_any_lane() {
    let test = "direct_mode_interrupts_reach_their_vm_through_any_lane";
    let Some(rig) = Rig::new(test, "dirq2") else {
        return;
    };
    let want = 200u16;
    let chain = || irq_chain(want);
    let vms = vec![
        vm(1, &[chain()], vec![pio(IRQ_BASE, 0x20, IRQ_MODEL, false)]),
        vm(3, &[chain()], vec![pio(IRQ_BASE, 0x20, IRQ3_MODEL, false)]),
    ];
    let (reports, e) = rig.run_mode(vms, Loss::default(), true);
    for r in &reports {
        assert_eq!(done(r), want as u32, "VM {}'s handler count", r.vm);
    }
    assert_eq!(e.irqs, 2 * want as u64, "{e:?}");
    assert_eq!(e.irqs_unknown_vm, 0, "{e:?}");
}

/// A snapshot freezes its VM's interrupts (neither acknowledged nor
/// injected, left to the server) until the client resumes: a VM taking a
/// chain of remote interrupts, suspended and snapshotted mid-chain and
/// resumed, gets every interrupt once (the frozen ones come again from
/// the server). Without the thaw on resume it stalls for good.
#[test]
fn interrupts_frozen_by_a_snapshot_come_again_after_resume() {
    let test = "interrupts_frozen_by_a_snapshot_come_again_after_resume";
    let Some(rig) = Rig::new(test, "irqsnap") else {
        return;
    };
    let want = 3000u16;
    let spec = rig.spec(
        vec![vm(
            1,
            &[irq_chain(want)],
            vec![pio(IRQ_BASE, 0x20, IRQ_MODEL, false)],
        )],
        Loss::default(),
        true,
        false,
    );
    let mut c = rig.start(spec);
    let e = || c.engine().expect("engine").stats();
    let deadline = Instant::now() + Duration::from_secs(30);
    while e().irqs.load(Ordering::Relaxed) < 200 {
        assert!(Instant::now() < deadline, "the chain never got going");
        std::thread::sleep(Duration::from_millis(2));
    }
    c.suspend(Duration::from_secs(5)).expect("suspend");
    let snap = c.snapshot(1).expect("snapshot");
    drop(snap);
    // Frozen: what arrives now stays with the server.
    std::thread::sleep(Duration::from_millis(20));
    c.resume().expect("resume");
    let reports = c.wait(Duration::from_secs(60));
    assert_eq!(
        done(&reports[0]),
        u32::from(want),
        "the guest's handler count"
    );
    let irqs = c
        .engine()
        .expect("engine")
        .stats()
        .irqs
        .load(Ordering::Relaxed);
    assert_eq!(irqs, u64::from(want), "each interrupt injected once");
}

/// The client daemon runs each VM in a VMM of its own: two processes'
/// sockets for one client platform. Each VM's interrupts must reach the
/// VMM that runs it, not whichever of the two sent last.
#[test]
fn interrupts_reach_the_vmm_of_their_vm_when_a_client_runs_several() {
    let test = "interrupts_reach_the_vmm_of_their_vm_when_a_client_runs_several";
    let Some(rig) = Rig::new(test, "irq2vmm") else {
        return;
    };
    let want = 200u16;
    let chain = || irq_chain(want);
    let start = |vm_spec: VmSpec, direct: bool| {
        let spec = rig.spec(vec![vm_spec], Loss::default(), direct, false);
        rig.start(spec)
    };
    let mut a = start(
        vm(1, &[chain()], vec![pio(IRQ_BASE, 0x20, IRQ_MODEL, false)]),
        false,
    );
    let mut b = start(
        vm(3, &[chain()], vec![pio(IRQ_BASE, 0x20, IRQ3_MODEL, false)]),
        true,
    );
    for (c, vm_id) in [(&mut a, 1), (&mut b, 3)] {
        let reports = c.wait(Duration::from_secs(60));
        assert_eq!(done(&reports[0]), want as u32, "VM {vm_id}'s handler count");
        let e = c.engine().expect("engine").stats();
        assert_eq!(
            e.irqs_unknown_vm.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "VM {vm_id}'s VMM got another VM's interrupts"
        );
    }
}

/// Direct mode: a vCPU's lane is its own (an io_uring owned by its thread,
/// Linux 6.1+): it sends and reaps its round trips itself, and nothing
/// wakes the engine thread for them. Each wake-up of the engine would
/// preempt the vCPU on its core, which is what the ownership is for.
#[test]
fn direct_mode_round_trips_leave_the_engine_asleep() {
    let test = "direct_mode_round_trips_leave_the_engine_asleep";
    let Some(rig) = Rig::new(test, "dsleep") else {
        return;
    };
    let n = 2000u16;
    let g = guests::pio_read_loop(0x80, n).unwrap();
    let spec = rig.spec(
        vec![vm(1, &[g], vec![pio(0x80, 1, NULL_MODEL, false)])],
        Loss::default(),
        true,
        false,
    );
    let mut client = rig.start(spec);
    let reports = client.wait(Duration::from_secs(60));
    assert_eq!(done(&reports[0]), 0, "null model reads 0");
    let remote = reports[0]
        .stats
        .remote
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(remote, n as u64);
    let engine = client.engine().expect("engine");
    let e = engine.stats();
    let wakeups = e.wakeups.load(std::sync::atomic::Ordering::Relaxed);
    let kicks = e.kicks.load(std::sync::atomic::Ordering::Relaxed);
    // Starting and stopping may wake it; a round trip must not.
    assert!(
        wakeups <= 5,
        "{wakeups} engine wake-ups for {n} round trips"
    );
    assert_eq!(kicks, 0, "a waiting vCPU was kicked");
}

/// CPU time (user + system, in clock ticks) of this process's thread
/// named `name`, if it exists.
fn thread_ticks(name: &str) -> Option<u64> {
    for t in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
        // Fields after the command name (which ends at the last ')'):
        // state is field 3, utime 14 and stime 15.
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        return Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?);
    }
    None
}

/// A vCPU waiting for an answer that does not come spins only for its
/// spin budget, then sleeps in the kernel between retransmissions: with
/// every answer dropped, 300 ms of waiting cost its thread a few ticks of
/// CPU, not 300 ms.
#[test]
fn a_waiting_vcpu_sleeps_after_its_spin_budget() {
    let test = "a_waiting_vcpu_sleeps_after_its_spin_budget";
    let Some(rig) = Rig::new(test, "dsleepv") else {
        return;
    };
    let g = guests::pio_read_loop(0x80, 1).unwrap();
    let loss = Loss {
        tx_permille: 0,
        rx_permille: 1000,
        seed: 1,
    };
    let mut spec = rig.spec(
        vec![vm(1, &[g], vec![pio(0x80, 1, NULL_MODEL, false)])],
        loss,
        true,
        false,
    );
    spec.engine.retransmit = Duration::from_millis(10);
    spec.engine.horizon = Duration::from_millis(400);
    let mut client = rig.start(spec);
    std::thread::sleep(Duration::from_millis(60));
    let before = thread_ticks("dp-vcpu-1-0").expect("the vCPU thread");
    std::thread::sleep(Duration::from_millis(300));
    let after = thread_ticks("dp-vcpu-1-0").expect("the vCPU thread still waits");
    let reports = client.wait(Duration::from_secs(5));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let busy_ms = (after - before) * 1000 / hz;
    assert!(
        busy_ms <= 60,
        "the waiting vCPU used {busy_ms} ms of CPU in 300 ms"
    );
    let r = &reports[0];
    assert!(matches!(r.exit, Ok(VcpuExit::Done(_))), "{:?}", r.exit);
    assert_eq!(
        r.stats
            .remote_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the unanswered read fails once"
    );
}

/// Reads counter `model` (at `PIO_BASE`) from a raw socket of the
/// client namespace, as VM 4's vCPU 9 (a duplicate window of its own).
fn read_counter(rig: &Rig, model: u32, seq: u64) -> Option<u64> {
    use devplane_wire::{
        Access, AccessSize, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
    };
    let ip = rig.topo.client_ip();
    let sock = rig
        .topo
        .run(Side::Client, move || std::net::UdpSocket::bind((ip, 0)))
        .ok()?
        .ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .ok()?;
    let rec = Record::Request(Request {
        id: RequestId {
            vm: 4,
            hypervisor: HV,
            vcpu: 9,
            seq,
        },
        access: Access::PioIn {
            port: PIO_BASE + devplane_devmodels::counter::REG_COUNT as u16,
            size: AccessSize::B4,
        },
        flags: 0,
    });
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(
        &mut buf,
        Header::new(Kind::Request, model, SERVER, CLIENT),
        &[rec],
    )
    .ok()?;
    // Sealed with the client's key, as its engine seals.
    let key = devplane_testkit::keys::client_key(CLIENT).0;
    let n = devplane_wire::tag::seal(&mut buf, n, &key)?;
    sock.send_to(&buf[..n], (rig.topo.server_ip(), PORT)).ok()?;
    let (m, _) = sock.recv_from(&mut buf).ok()?;
    match Datagram::parse(&buf[..m]).ok()?.records().next() {
        Some(Record::Response(r)) if r.status == Status::Ok => Some(r.data),
        _ => None,
    }
}

/// A guest posts writes under heavy loss and then halts for good: its
/// vCPU never exits again, so the writes still unanswered are resent only
/// because the engine kicks the vCPU when their retransmission is due.
/// Every write reaches the device, once.
#[test]
fn posted_writes_of_a_halted_guest_are_resent_until_applied() {
    let test = "posted_writes_of_a_halted_guest_are_resent_until_applied";
    let Some(rig) = Rig::new(test, "dhalt") else {
        return;
    };
    let n = 300u16;
    let model = counter_id(1, 0);
    let g = guests::pio_writes_then_halt(PIO_BASE, n).unwrap();
    let vms = vec![vm(1, &[g], vec![pio(PIO_BASE, 0x10, model, true)])];
    let loss = Loss {
        tx_permille: 300,
        rx_permille: 300,
        seed: 7,
    };
    let spec = rig.spec(vms, loss, true, false);
    let mut client = rig.start(spec);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut seq = 1u64 << 40;
    let mut count = None;
    while std::time::Instant::now() < deadline {
        seq += 1;
        count = read_counter(&rig, model, seq);
        if count == Some(n as u64) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = client.engine().expect("engine").stats();
    let kicks = e.kicks.load(std::sync::atomic::Ordering::Relaxed);
    let retransmits = e.retransmits.load(std::sync::atomic::Ordering::Relaxed);
    let reports = client.wait(Duration::ZERO);
    assert_eq!(count, Some(n as u64), "the device's count (kicks {kicks})");
    assert!(retransmits > 0, "the loss injection dropped nothing");
    assert!(kicks > 0, "nothing was resent while the guest halted");
    assert!(
        matches!(reports[0].exit, Ok(VcpuExit::Stopped)),
        "{:?}",
        reports[0].exit
    );
}

/// Interrupts are delivered reliably: with a fifth of the datagrams lost
/// each way (interrupts and their acknowledgements, requests and their
/// answers), the server sends each interrupt datagram again until the
/// client acknowledges it, the client applies each interrupt once, and
/// the guest's handler counts every one.
#[test]
fn interrupts_survive_loss_both_ways() {
    interrupts_under_loss(false, "interrupts_survive_loss_both_ways", "irqloss");
}

#[test]
fn direct_mode_interrupts_survive_loss_both_ways() {
    interrupts_under_loss(
        true,
        "direct_mode_interrupts_survive_loss_both_ways",
        "dirqloss",
    );
}

fn interrupts_under_loss(direct: bool, test: &str, tag: &str) {
    let Some(rig) = Rig::new(test, tag) else {
        return;
    };
    let want = 200u16;
    let vms = vec![vm(
        1,
        &[irq_chain(want)],
        vec![pio(IRQ_BASE, 0x20, IRQ_MODEL, false)],
    )];
    let loss = Loss {
        tx_permille: 200,
        rx_permille: 200,
        seed: 11,
    };
    let spec = rig.spec(vms, loss, direct, false);
    let mut client = rig.start(spec);
    let reports = client.wait(Duration::from_secs(60));
    let e = client.engine().expect("engine").stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(done(&reports[0]), want as u32, "the guest's handler count");
    // The thread that injects counts right after the injection, which may
    // let the guest run to its end first: give the count a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while load(&e.irqs) < want as u64 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(load(&e.irqs), want as u64, "each interrupt applied once");
    assert!(load(&e.loss_rx) > 0 && load(&e.loss_tx) > 0);
    let s = rig.snapshot();
    assert!(s.workers[1].irqs_resent > 0, "nothing was resent: {s:?}");
    assert_eq!(s.workers[1].irqs_dropped, 0, "{s:?}");
}

#[test]
fn four_vms_of_two_vcpus_get_their_own_answers() {
    let Some(rig) = Rig::new("four_vms_of_two_vcpus_get_their_own_answers", "c4x2") else {
        return;
    };
    let n = 300u16;
    let vms: Vec<VmSpec> = (1..=4)
        .map(|id| {
            let gs = guests::multi_vcpu(PIO_BASE, n, 2).unwrap();
            let devices = (0..2u16)
                .map(|i| pio(PIO_BASE + 0x10 * i, 0x10, counter_id(id, i), false))
                .collect();
            vm(id, &gs, devices)
        })
        .collect();
    let (reports, e) = rig.run(vms, Loss::default());
    assert_eq!(reports.len(), 8);
    for r in &reports {
        // Each vCPU has its own counter: a mixed-up answer shows as a count
        // other than its own writes.
        assert_eq!(done(r), n as u32, "VM {} vCPU {}", r.vm, r.vcpu);
    }
    assert_eq!(e.timeouts, 0, "{e:?}");
}

#[test]
fn with_loss_every_write_is_applied_exactly_once() {
    with_loss(
        false,
        "with_loss_every_write_is_applied_exactly_once",
        "closs",
    );
}

#[test]
fn direct_mode_with_loss_every_write_is_applied_exactly_once() {
    with_loss(
        true,
        "direct_mode_with_loss_every_write_is_applied_exactly_once",
        "dloss",
    );
}

fn with_loss(direct: bool, test: &str, tag: &str) {
    let Some(rig) = Rig::new(test, tag) else {
        return;
    };
    let n = 400u16;
    let loss = Loss {
        tx_permille: 100,
        rx_permille: 100,
        seed: 0x5eed,
    };
    let vms = vec![
        vm(
            1,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(1, 0), false)],
        ),
        vm(
            2,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(2, 0), true)],
        ),
    ];
    let (reports, e) = rig.run_mode(vms, loss, direct);
    // Counter == writes issued: none lost, none applied twice.
    assert_eq!(done(&reports[0]), n as u32, "non-posted");
    assert_eq!(done(&reports[1]), n as u32, "posted");
    assert!(e.loss_tx > 0 && e.loss_rx > 0, "no loss injected: {e:?}");
    assert!(e.retransmits > 0, "{e:?}");
    assert_eq!(e.timeouts, 0, "{e:?}");
    let s = rig.snapshot();
    let dups: u64 = s.workers.iter().map(|w| w.duplicates).sum();
    assert!(
        dups > 0,
        "lost answers must cause answered-again repeats: {s:?}"
    );
    eprintln!("engine: {e:?}; duplicates answered again: {dups}");
}

#[test]
fn posted_writes_batch_and_keep_order() {
    posted(false, "posted_writes_batch_and_keep_order", "cpost");
}

#[test]
fn direct_mode_posted_writes_batch_and_keep_order() {
    posted(
        true,
        "direct_mode_posted_writes_batch_and_keep_order",
        "dpost",
    );
}

fn posted(direct: bool, test: &str, tag: &str) {
    let Some(rig) = Rig::new(test, tag) else {
        return;
    };
    let n = 2000u16;
    let vms = vec![vm(
        1,
        &[guests::pio_loop(PIO_BASE, n).unwrap()],
        vec![pio(PIO_BASE, 0x10, counter_id(1, 0), true)],
    )];
    let (reports, e) = rig.run_mode(vms, Loss::default(), direct);
    // The final read went behind every posted write and saw them all.
    assert_eq!(done(&reports[0]), n as u32);
    let posted = reports[0]
        .stats
        .posted
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(posted, n as u64);
    assert!(
        e.tx_records > e.tx_datagrams,
        "posted writes were never batched: {e:?}"
    );
    eprintln!(
        "posted: {} records in {} datagrams",
        e.tx_records, e.tx_datagrams
    );
}

#[test]
fn local_models_run_in_the_vcpu_thread() {
    let Some(rig) = Rig::new("local_models_run_in_the_vcpu_thread", "cloc") else {
        return;
    };
    let n = 1000u16;
    let d = DeviceSpec {
        space: Space::Pio,
        base: PIO_BASE as u64,
        len: 0x10,
        model: 900,
        posted: false,
        place: Place::Local {
            kind: "counter".into(),
        },
    };
    // Port 0x80 is not mapped: its reads are all-ones and counted.
    let vms = vec![
        vm(1, &[guests::pio_loop(PIO_BASE, n).unwrap()], vec![d]),
        vm(2, &[guests::pio_read_loop(0x80, 10).unwrap()], vec![]),
    ];
    let before = rig.snapshot();
    let (reports, e) = rig.run_mode(vms, Loss::default(), true);
    assert_eq!(done(&reports[0]), n as u32);
    let local = reports[0]
        .stats
        .local
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(local, n as u64 + 1);
    assert_eq!(done(&reports[1]), u32::MAX, "unmapped read is all-ones");
    let unmapped = reports[1]
        .stats
        .unmapped_reads
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(unmapped, 10);
    assert_eq!(e.tx_datagrams, 0, "nothing went on the wire: {e:?}");
    let after = rig.snapshot();
    let served = |s: &ServerSnapshot| s.workers.iter().map(|w| w.records).sum::<u64>();
    assert_eq!(served(&after), served(&before));
}

#[test]
fn interrupts_for_a_vm_not_on_this_client_are_dropped_and_counted() {
    let Some(rig) = Rig::new(
        "interrupts_for_a_vm_not_on_this_client_are_dropped_and_counted",
        "cstr",
    ) else {
        return;
    };
    // Writes 1, 2, 3 to the stray model's interrupt register: it raises
    // 6 edges for VM 2, then the read returns 6.
    let g = guests::pio_loop(STRAY_BASE + devplane_devmodels::counter::REG_IRQ as u16, 3).unwrap();
    let vms = vec![vm(1, &[g], vec![pio(STRAY_BASE, 0x20, STRAY_MODEL, false)])];
    let (reports, e) = rig.run_mode(vms, Loss::default(), false);
    assert_eq!(done(&reports[0]), 6);
    // The server sent them to this client, which dropped and counted them
    // without acknowledging them (only the VM's own client may), so the
    // server may have resent a datagram before the run ended: every copy
    // is dropped and counted again, none injected.
    assert_eq!(rig.snapshot().workers[0].irqs_sent, 6);
    assert!(e.irqs_unknown_vm >= 6, "{e:?}");
    assert_eq!(e.irqs, 0, "{e:?}");
}

#[test]
fn a_model_moved_between_workers_under_guest_io_loses_no_write() {
    let Some(rig) = Rig::new(
        "a_model_moved_between_workers_under_guest_io_loses_no_write",
        "cmov",
    ) else {
        return;
    };
    let n = 20_000u16;
    // VM 1 writes synchronously, VM 2 posts its writes; both counters move
    // back and forth between the two workers while the guests run.
    let vms = vec![
        vm(
            1,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(1, 0), false)],
        ),
        vm(
            2,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(2, 0), true)],
        ),
    ];
    let spec = rig.spec(vms, Loss::default(), true, false);
    let mut client = rig.start(spec);
    let mut moves = 0;
    for round in 0..8usize {
        std::thread::sleep(Duration::from_millis(15));
        for (i, m) in [counter_id(1, 0), counter_id(2, 0)].into_iter().enumerate() {
            let to = (round + i) % 2;
            rig.server
                .call(move |s| s.move_model(m, to))
                .expect("server thread")
                .unwrap_or_else(|e| panic!("move of {m}: {e}"));
            moves += 1;
        }
    }
    let answers_at_last_move = client
        .engine()
        .unwrap()
        .stats()
        .answers
        .load(std::sync::atomic::Ordering::Relaxed);
    let reports = client.wait(Duration::from_secs(60));
    assert!(
        answers_at_last_move < 2 * n as u64,
        "the guests finished before the moves were over"
    );
    assert_eq!(done(&reports[0]), n as u32, "synchronous writes");
    assert_eq!(done(&reports[1]), n as u32, "posted writes");
    eprintln!(
        "{moves} moves under I/O; server: {:?}",
        rig.snapshot().workers
    );
}

/// One change applied on the server's owning thread.
type ServerOp = Box<
    dyn FnOnce(&mut devplane_server::Server) -> Result<(), devplane_server::ServerError> + Send,
>;

#[test]
fn every_server_lifecycle_operation_under_guest_io_loses_no_write() {
    let Some(rig) = Rig::new(
        "every_server_lifecycle_operation_under_guest_io_loses_no_write",
        "clife",
    ) else {
        return;
    };
    let n = 20_000u16;
    // VM 1 writes synchronously, VM 2 posts its writes. Meanwhile the
    // server suspends and resumes VM 1, migrates VM 2 to another client
    // platform and back, adds and removes an unrelated model, and moves
    // both counters between workers.
    let vms = vec![
        vm(
            1,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(1, 0), false)],
        ),
        vm(
            2,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(2, 0), true)],
        ),
    ];
    let spec = rig.spec(vms, Loss::default(), true, false);
    let mut client = rig.start(spec);
    let pin_dir = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/devplane-test-client-clife-{}",
        std::process::id()
    ));
    let mut ops = 0;
    for round in 0..8usize {
        std::thread::sleep(Duration::from_millis(10));
        lifecycle_round(&rig, round, &pin_dir);
        ops += 2;
    }
    let answers_at_end = client
        .engine()
        .unwrap()
        .stats()
        .answers
        .load(std::sync::atomic::Ordering::Relaxed);
    let reports = client.wait(Duration::from_secs(60));
    assert!(
        answers_at_end < 2 * n as u64,
        "the guests finished before the operations were over"
    );
    assert_eq!(done(&reports[0]), n as u32, "synchronous writes");
    assert_eq!(done(&reports[1]), n as u32, "posted writes");
    eprintln!(
        "{ops} lifecycle operations under I/O; server: {:?}",
        rig.snapshot().workers
    );
}

/// Round `round` of
/// [`every_server_lifecycle_operation_under_guest_io_loses_no_write`]: two
/// operations on the server, chosen by `round % 4`.
fn lifecycle_round(rig: &Rig, round: usize, pin_dir: &std::path::Path) {
    const EXTRA: u32 = 900;
    let call = |what: &str, f: ServerOp| {
        rig.server
            .call(f)
            .expect("server thread")
            .unwrap_or_else(|e| panic!("{what} in round {round}: {e}"));
    };
    match round % 4 {
        0 => {
            call("suspend", Box::new(|s| s.suspend_vm(1)));
            call("resume", Box::new(|s| s.resume_vm(1)));
        }
        1 => {
            call("migrate", Box::new(|s| s.migrate_vm(2, OTHER_CLIENT)));
            call("migrate back", Box::new(|s| s.migrate_vm(2, CLIENT)));
            register_and_remove_a_vm(pin_dir);
        }
        2 => {
            let m = ModelConfig {
                pio_base: Some(0x900),
                ..model(EXTRA, "counter", round % 2)
            };
            call("add", Box::new(move |s| s.add_model(m)));
            call("remove", Box::new(|s| s.remove_model(EXTRA)));
        }
        _ => {
            let to = (round / 4) % 2;
            call(
                "move 1",
                Box::new(move |s| s.move_model(counter_id(1, 0), to)),
            );
            call(
                "move 2",
                Box::new(move |s| s.move_model(counter_id(2, 0), 1 - to)),
            );
        }
    }
}

/// Registers and removes a client platform and a VM in the pinned maps, as
/// `dpctl --apply-to` does.
fn register_and_remove_a_vm(pin_dir: &std::path::Path) {
    use devplane_control::maps::{MapWriter, client_entry, vm_entry};
    let mut maps = devplane_control::AyaMaps::from_pinned(pin_dir).expect("open the pinned maps");
    let c = ClientConfig {
        tag_key: None,
        id: 50,
        address: std::net::Ipv4Addr::new(10, 250, 0, 50),
        budget: None,
    };
    let v = VmConfig {
        id: 50,
        client: 50,
        hypervisor: HV,
    };
    maps.put_client(50, client_entry(&c)).unwrap();
    maps.put_vm(50, vm_entry(&v)).unwrap();
    maps.remove_vm(50).unwrap();
    maps.remove_client(50).unwrap();
}

/// The server stops and starts again (its models rebuilt, their state
/// lost, as after a crash) while one VM writes synchronously and another
/// posts its writes: the engine resends with back-off until the new
/// server answers, nothing fails, and every write not acknowledged by the
/// old server is applied exactly once by the new one (its counter counts
/// the guest's writes less those the old server acknowledged).
#[test]
fn writes_survive_a_server_restart_exactly_once() {
    let test = "writes_survive_a_server_restart_exactly_once";
    let tag = "crst";
    let Some(rig) = Rig::new(test, tag) else {
        return;
    };
    let n = 20_000u16;
    let start = |id: u32, posted: bool| {
        let vms = vec![vm(
            id,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(id, 0), posted)],
        )];
        // One client each: each engine's answers are one VM's.
        rig.start(rig.spec(vms, Loss::default(), true, false))
    };
    let mut sync = start(1, false);
    let mut posted = start(2, true);
    std::thread::sleep(Duration::from_millis(300));
    let Rig { topo, server } = rig;
    server.stop();
    // What the old server answered has arrived once it is gone.
    std::thread::sleep(Duration::from_millis(200));
    let answers = |c: &Client| {
        let e = c.engine().expect("engine").stats();
        e.answers.load(std::sync::atomic::Ordering::Relaxed)
    };
    let (sync_before, posted_before) = (answers(&sync), answers(&posted));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(answers(&sync), sync_before, "an answer with no server");
    let server = ServerThread::spawn(server_config(&topo, tag), Some(topo.server_netns()))
        .expect("server starts again");
    let rs = sync.wait(Duration::from_secs(120));
    let rp = posted.wait(Duration::from_secs(120));
    for (what, before) in [("synchronous", sync_before), ("posted", posted_before)] {
        assert!(
            before > 0 && before < n as u64,
            "the {what} guest was not under way at the restart ({before} answers)"
        );
    }
    assert_eq!(done(&rs[0]) as u64, n as u64 - sync_before, "synchronous");
    assert_eq!(done(&rp[0]) as u64, n as u64 - posted_before, "posted");
    for (c, r) in [(&sync, &rs[0]), (&posted, &rp[0])] {
        let e = c.engine().unwrap().stats();
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(load(&e.timeouts), 0, "VM {}", r.vm);
        assert!(load(&e.backoffs) > 0, "VM {}: no back-off", r.vm);
        assert_eq!(r.failed(), 0, "VM {}", r.vm);
    }
    eprintln!(
        "answered before the restart: {sync_before} synchronous, {posted_before} posted; \
         server after: {:?}",
        server.snapshot().workers
    );
    drop(sync);
    drop(posted);
    drop(server);
    drop(topo);
}

/// With no server answering, requests fail at the engine's horizon, and
/// say so: synchronous writes and the final read count as failed (the
/// read returns all-ones), posted writes as failed posted writes; the
/// client's failure count is their sum. Nothing succeeds silently.
#[test]
fn requests_unanswered_within_the_horizon_are_reported() {
    let Some(rig) = Rig::new(
        "requests_unanswered_within_the_horizon_are_reported",
        "chor",
    ) else {
        return;
    };
    let n = 3u16;
    let vms = vec![
        vm(
            1,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(1, 0), false)],
        ),
        vm(
            2,
            &[guests::pio_loop(PIO_BASE, n).unwrap()],
            vec![pio(PIO_BASE, 0x10, counter_id(2, 0), true)],
        ),
    ];
    let mut spec = rig.spec(vms, Loss::default(), true, false);
    spec.engine.horizon = Duration::from_millis(300);
    // A port of the server's address where nothing listens.
    spec.servers[0].addr.set_port(PORT + 1);
    let mut client = rig.start(spec);
    let reports = client.wait(Duration::from_secs(30));
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    // The final read of the count fails: all-ones.
    assert_eq!(done(&reports[0]), u32::MAX, "synchronous");
    assert_eq!(done(&reports[1]), u32::MAX, "posted");
    assert_eq!(load(&reports[0].stats.remote_errors), n as u64 + 1);
    assert_eq!(reports[0].failed(), n as u64 + 1);
    assert_eq!(load(&reports[1].stats.remote_errors), 1, "the read");
    assert_eq!(reports[1].posted_failures, n as u64, "the posted writes");
    assert_eq!(reports[1].posted_unconfirmed, 0);
    assert_eq!(reports[1].failed(), n as u64 + 1);
    let e = client.engine().unwrap().stats();
    assert_eq!(
        load(&e.timeouts),
        2 * (n as u64 + 1),
        "given up at the horizon"
    );
    assert_eq!(load(&e.answers), 0);
}

/// The local ports of this namespace's UDP sockets connected to
/// `server:port` (the client's lanes and interrupt sockets), from the
/// calling thread's `/proc/thread-self/net/udp`.
fn sockets_connected_to(server: std::net::Ipv4Addr, port: u16) -> Vec<u16> {
    let table = std::fs::read_to_string("/proc/thread-self/net/udp").unwrap();
    let remote = format!("{:08X}:{port:04X}", u32::from_le_bytes(server.octets()));
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local = f.get(1)?;
            (f.get(2)? == &remote)
                .then(|| u16::from_str_radix(local.rsplit(':').next()?, 16).ok())
                .flatten()
        })
        .collect()
}

/// Sends `payload` in a UDP datagram from `src` to `dst` through a raw
/// socket (any source address: the attacker spoofs the server's).
fn send_spoofed(
    raw: &std::os::fd::OwnedFd,
    src: std::net::SocketAddrV4,
    dst: std::net::SocketAddrV4,
    payload: &[u8],
) {
    use std::os::fd::AsRawFd;
    let mut p = Vec::with_capacity(28 + payload.len());
    let total = (28 + payload.len()) as u16;
    // IPv4 (the kernel fills in the id and checksum), then UDP (checksum
    // 0: none).
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    p.extend_from_slice(&(8 + payload.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: dst.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(dst.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `p` and `sa` are valid for the call.
    let n = unsafe {
        libc::sendto(
            raw.as_raw_fd(),
            p.as_ptr().cast(),
            p.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        n,
        p.len() as isize,
        "raw send: {}",
        std::io::Error::last_os_error()
    );
}

/// An interrupt datagram as a server would send it.
fn forged_interrupt(model: u32, server: u32, client: u32, vm: u32, seq: u64) -> Vec<u8> {
    use devplane_wire::{Header, Interrupt, IrqAction, Kind, Record, datagram};
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let rec = Record::Interrupt(Interrupt {
        vm,
        hypervisor: HV,
        line: IRQ_LINE as u32,
        action: IrqAction::Edge,
        seq,
    });
    let n = datagram::encode(
        &mut buf,
        Header::new(Kind::Interrupt, model, server, client),
        &[rec],
    )
    .unwrap();
    buf.truncate(n);
    buf
}

/// An answer datagram as a server would send it.
fn forged_answer(model: u32, server: u32, vm: u32, vcpu: u16, seq: u64) -> Vec<u8> {
    use devplane_wire::{AccessSize, Header, Kind, Record, RequestId, Response, Status, datagram};
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let rec = Record::Response(Response {
        id: RequestId {
            vm,
            hypervisor: HV,
            vcpu,
            seq,
        },
        status: Status::Ok,
        size: AccessSize::B4,
        addr: IRQ_BASE as u64,
        data: 0,
    });
    let n = datagram::encode(
        &mut buf,
        Header::new(Kind::Response, model, server, CLIENT),
        &[rec],
    )
    .unwrap();
    buf.truncate(n);
    buf
}

/// A third host on the client's link forges interrupts and answers while a
/// guest takes real interrupts one at a time: a blind scan of the
/// ephemeral port range from its own address reaches no socket of the
/// client (each is connected to its server); datagrams spoofed from the
/// server's address and port to the client's sockets, naming another
/// server, another client, a VM not on this client, interrupt number
/// 2^64-1, or answering for a VM not here, are dropped and counted. The
/// guest counts exactly its real interrupts, all of them. The client runs
/// without a tag key here: these are the checks behind the tag (with a
/// key, every one of these datagrams is refused as `bad_tag` first, which
/// `e2e_adversarial` and the protocol's unit tests check).
#[test]
fn forged_interrupts_and_answers_from_a_third_host_are_dropped() {
    let test = "forged_interrupts_and_answers_from_a_third_host_are_dropped";
    let Some(rig) = Rig::new(test, "cfrg") else {
        return;
    };
    rig.server
        .call(|s| s.set_keys(CLIENT, None))
        .expect("server thread")
        .expect("tags off for this client");
    let attacker = rig.topo.client_peer().expect("attacker namespace");
    let want = 400u16;
    let vms = vec![vm(
        1,
        &[irq_chain(want)],
        vec![pio(IRQ_BASE, 0x20, IRQ_MODEL, false)],
    )];
    let mut spec = rig.spec(vms, Loss::default(), true, false);
    spec.engine.tag_keys = None;
    let mut client = rig.start(spec);
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let irqs = || load(&client.engine().unwrap().stats().irqs);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while irqs() < 10 {
        assert!(std::time::Instant::now() < deadline, "no interrupt arrives");
        std::thread::sleep(Duration::from_millis(1));
    }
    let (server_ip, client_ip) = (rig.topo.server_ip(), rig.topo.client_ip());
    let ports = rig
        .topo
        .run(Side::Client, || sockets_connected_to(server_ip, PORT))
        .unwrap();
    assert!(
        ports.len() >= 2,
        "a lane and an interrupt socket: {ports:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let forged: Vec<Vec<u8>> = vec![
        forged_interrupt(IRQ_MODEL, SERVER + 1, CLIENT, 1, now),
        forged_interrupt(IRQ_MODEL, SERVER, CLIENT + 1, 1, now),
        forged_interrupt(IRQ_MODEL, SERVER, CLIENT, 2, now),
        forged_interrupt(IRQ_MODEL, SERVER, CLIENT, 1, u64::MAX),
        forged_answer(IRQ_MODEL, SERVER + 1, 1, 0, now),
        forged_answer(IRQ_MODEL, SERVER, 9, 0, now),
    ];
    let scan_irq = forged_interrupt(IRQ_MODEL, SERVER, CLIENT, 1, now);
    let range = rig
        .topo
        .run(Side::Client, || {
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap()
        })
        .unwrap();
    let bounds: Vec<u16> = range
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let scanned = attacker
        .run(|| {
            // SAFETY: plain socket creation; the fd is owned below.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            // SAFETY: `fd` is a fresh descriptor nobody else owns.
            let raw = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
            let src = std::net::SocketAddrV4::new(server_ip, PORT);
            for &port in &ports {
                let dst = std::net::SocketAddrV4::new(client_ip, port);
                for f in &forged {
                    send_spoofed(&raw, src, dst, f);
                }
            }
            // A blind scan from the attacker's own address.
            let sock = std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, 0)).unwrap();
            let mut sent = 0u32;
            for port in bounds[0]..=bounds[1] {
                if sock.send_to(&scan_irq, (client_ip, port)).is_ok() {
                    sent += 1;
                }
            }
            sent
        })
        .unwrap();
    let reports = client.wait(Duration::from_secs(60));
    std::thread::sleep(Duration::from_millis(50));
    let e = client.engine().unwrap().stats();
    let n = ports.len() as u64;
    assert_eq!(done(&reports[0]), want as u32, "the guest's handler count");
    assert_eq!(load(&e.irqs), want as u64, "only real interrupts injected");
    assert_eq!(load(&e.foreign_server), 2 * n, "another server named");
    assert_eq!(load(&e.foreign_client), n, "another client named");
    assert_eq!(load(&e.irqs_unknown_vm), n, "a VM not here");
    assert_eq!(load(&e.irq_out_of_range), n, "2^64-1");
    assert_eq!(load(&e.foreign_vm), n, "an answer for a VM not here");
    eprintln!(
        "{} spoofed datagrams to {n} sockets, a scan of {scanned} ports: {e:?}",
        forged.len() as u64 * n
    );
    drop(attacker);
}
