//! End to end, owner and I/O servers with real guests: three hosts on one
//! bridge (`testkit::lan`): the client VMM, an owner server and an I/O
//! server, each server behind the real XDP program. The guests' device
//! models live on the I/O server; the client reaches them through the
//! owner (`ServerSpec::via`: requests go to the owner, whose XDP program
//! forwards them with `XDP_TX`), and takes the I/O server's answers and
//! interrupts, which come straight from its address, under the trust
//! rules (its socket is connected to the I/O server, the tags verify).
//! With a sixth of the datagrams lost each way, every write is applied
//! once and every interrupt reaches the guest's handler once.

use std::net::SocketAddr;
use std::time::Duration;

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;
use devplane_server::forward::Forward;
use devplane_testkit::host::ServerThread;
use devplane_testkit::lan::{Lan, LanHost};
use devplane_testkit::privilege::{self, Capability};
use devplane_vmm::engine::{EngineConfig, Loss};
use devplane_vmm::guests;
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuSpec, VmSpec};
use devplane_wire::maps::Counter;

const PORT: u16 = 7700;
const IO: u32 = 1;
const OWNER: u32 = 2;
const CLIENT: u32 = 7;
const HV: u32 = 2;
const WRITES_MODEL: u32 = 10;
const IRQ_MODEL: u32 = 11;
const PIO_BASE: u16 = 0x500;
const IRQ_BASE: u16 = 0x600;
const IRQ_LINE: u8 = 5;

fn server(id: u32, host: &LanHost, client: &LanHost, models: Vec<ModelConfig>) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(host.ifname.clone()),
            workers: vec![0],
            pin_dir: Some(
                format!("/sys/fs/bpf/devplane-test-fwdg{id}-{}", std::process::id()).into(),
            ),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: Some(devplane_testkit::keys::client_key(CLIENT)),
            id: CLIENT,
            address: client.ip,
            budget: None,
        }],
        vms: (1..=2)
            .map(|id| VmConfig {
                id,
                client: CLIENT,
                hypervisor: HV,
            })
            .collect(),
        models,
    }
}

fn pio(base: u16, model: u32) -> DeviceSpec {
    DeviceSpec {
        space: Space::Pio,
        base: base as u64,
        // The counter's registers: count, sum, interrupt (0x10).
        len: 0x20,
        model,
        posted: false,
        place: Place::Remote { server: 0 },
    }
}

fn vm(id: u32, g: guests::Guest, devices: Vec<DeviceSpec>) -> VmSpec {
    VmSpec {
        id,
        hypervisor: HV,
        mem_bytes: g.mem_end().next_multiple_of(0x1_0000).max(0x2_0000) as usize,
        images: vec![(g.load_gpa, g.code.clone())],
        vcpus: vec![VcpuSpec {
            entry: g.entry,
            core: None,
        }],
        devices,
    }
}

fn done(r: &devplane_vmm::vmm::VcpuReport) -> u32 {
    match &r.exit {
        Ok(VcpuExit::Done(v)) => *v,
        other => panic!("VM {} vCPU {} did not finish: {other:?}", r.vm, r.vcpu),
    }
}

#[test]
fn guests_reach_models_through_the_owner_exactly_once_under_loss() {
    let test = "e2e_forward_guest";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let lan = match Lan::new("fwg", &["client", "owner", "io"]) {
        Ok(l) => l,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the three-host LAN: {e}"));
            return;
        }
    };
    let (client, owner, io) = (lan.host(0), lan.host(1), lan.host(2));
    let models = vec![
        ModelConfig {
            pio_base: Some(PIO_BASE),
            ..ModelConfig::new(WRITES_MODEL, "counter", 0)
        },
        ModelConfig {
            line: Some(IRQ_LINE as u32),
            vm: Some(2),
            pio_base: Some(IRQ_BASE),
            ..ModelConfig::new(IRQ_MODEL, "counter", 0)
        },
    ];
    let io_srv = ServerThread::spawn(server(IO, io, client, models), Some(&io.netns))
        .expect("I/O server starts");
    let owner_srv = ServerThread::spawn(server(OWNER, owner, client, vec![]), Some(&owner.netns))
        .expect("owner server starts");
    for model in [WRITES_MODEL, IRQ_MODEL] {
        let to = Forward {
            server: IO,
            ip: io.ip,
            mac: io.mac,
        };
        owner_srv
            .call(move |s| s.forward_model(model, to))
            .expect("owner thread")
            .expect("forward");
    }

    let (writes, irqs) = (300u16, 100u16);
    let spec = ClientSpec {
        client: CLIENT,
        bind: Some(client.ip.into()),
        servers: vec![ServerSpec {
            addr: SocketAddr::from((io.ip, PORT)),
            id: IO,
            via: Some(SocketAddr::from((owner.ip, PORT))),
        }],
        vms: vec![
            vm(
                1,
                guests::pio_loop(PIO_BASE, writes).unwrap(),
                vec![pio(PIO_BASE, WRITES_MODEL)],
            ),
            vm(
                2,
                guests::irq_chain(
                    IRQ_LINE,
                    irqs,
                    IRQ_BASE + devplane_devmodels::counter::REG_COUNT as u16,
                    IRQ_BASE + devplane_devmodels::counter::REG_IRQ as u16,
                )
                .unwrap(),
                vec![pio(IRQ_BASE, IRQ_MODEL)],
            ),
        ],
        engine: EngineConfig {
            spin_budget: 500,
            retransmit: Duration::from_millis(2),
            loss: Loss {
                tx_permille: 150,
                rx_permille: 150,
                seed: 0xf0e,
            },
            tag_keys: Some(devplane_testkit::keys::client_ring(CLIENT)),
            ..EngineConfig::default()
        },
        engine_core: None,
        vcpu_spin: 200,
        samples: 0,
        direct: false,
    };
    let mut c = client
        .run(move || Client::start(spec))
        .expect("enter client netns")
        .expect("client starts");
    let reports = c.wait(Duration::from_secs(60));
    let e = c.engine().expect("engine").stats();
    let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    let by_vm = |vm: u32| reports.iter().find(|r| r.vm == vm).expect("a report");
    // The counter read back equals the writes: each applied once.
    assert_eq!(done(by_vm(1)), u32::from(writes), "writes applied once");
    assert_eq!(done(by_vm(2)), u32::from(irqs), "the guest's handler count");
    assert_eq!(
        load(&e.irqs),
        u64::from(irqs),
        "each interrupt applied once"
    );
    assert!(load(&e.loss_tx) > 0 && load(&e.loss_rx) > 0);
    assert_eq!(load(&e.timeouts), 0);
    // Nothing from another source was taken, nothing refused as foreign.
    assert_eq!(load(&e.foreign_server), 0);
    let o = owner_srv.snapshot();
    let ox = o.xdp.expect("owner XDP counters");
    let i = io_srv.snapshot();
    eprintln!(
        "e2e_forward_guest: owner forwarded {}; I/O worker {:?}; engine retransmits {}, lost tx {} rx {}",
        ox.get(Counter::Forwarded),
        i.workers[0],
        load(&e.retransmits),
        load(&e.loss_tx),
        load(&e.loss_rx),
    );
    assert!(ox.get(Counter::Forwarded) > u64::from(writes));
    assert_eq!(o.workers[0].rx, 0, "the owner's workers serve nothing");
    assert!(
        i.workers[0].duplicates > 0,
        "lost answers were answered again"
    );
    drop(c);
}
