//! End to end, a device model moved from one server to another while a
//! guest writes to it: the two-phase hand-over of
//! `devplane_control::handover` (lend on the source, stage on the target,
//! the client retargets, commit on the target, release on the source)
//! between a server behind XDP and a second server in the same network
//! namespace (socket mode, another port), under continuous I/O from a
//! synchronous and a posting vCPU. A move whose source worker does not
//! lend in time, and one whose target worker does not take the commit in
//! time, are cancelled and leave the model serving on the source; then
//! both models move, and back again. Every guest checks its count at the
//! end (`guests::checked_writes`): a write lost or applied twice shows.
//! Then an interrupt source moves six times under a chain of interrupts
//! with loss: between the XDP and the socket server (vCPU-driven lanes,
//! then engine-driven), and between two XDP servers on a three-host LAN.

use std::net::SocketAddr;
use std::time::Duration;

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_control::handover::{self, Report, Step};
use devplane_devmodels::Space;
use devplane_testkit::host::ServerThread;
use devplane_testkit::lan::{Lan, LanHost};
use devplane_testkit::mover::ServerMove;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::guests;
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{
    Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuReport, VcpuSpec, VmSpec,
};

const PORT_A: u16 = 7716;
const PORT_B: u16 = 7717;
const SERVER_A: u32 = 1;
const SERVER_B: u32 = 2;
const CLIENT: u32 = 7;
const HV: u32 = 2;
const VM: u32 = 1;
/// vCPU 0's counter (synchronous writes).
const SYNC_MODEL: u32 = 11;
/// vCPU 1's counter (posted writes).
const POSTED_MODEL: u32 = 12;
/// A model the second server starts with (it is never moved).
const B_OWN: u32 = 99;
const PIO_BASE: u16 = 0x500;

fn counter(id: u32, worker: usize, base: u16) -> ModelConfig {
    ModelConfig {
        pio_base: Some(base),
        ..ModelConfig::new(id, "counter", worker)
    }
}

fn server_config(topo: &Topology, id: u32, xdp: bool, models: Vec<ModelConfig>) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id,
            port: if xdp { PORT_A } else { PORT_B },
            mode: if xdp { Mode::Xdp } else { Mode::Socket },
            interface: xdp.then(|| topo.server_ifname().to_string()),
            workers: if xdp { vec![0, 1] } else { vec![0] },
            pin_dir: xdp
                .then(|| format!("/sys/fs/bpf/devplane-test-mmove-{}", std::process::id()).into()),
            check_clients: true,
        },
        ..server_config_for(topo.client_ip(), id, models)
    }
}

/// A server's configuration for the client at `client` (its server
/// section for a socket server on [`PORT_B`]; the callers replace it).
fn server_config_for(
    client: std::net::Ipv4Addr,
    id: u32,
    models: Vec<ModelConfig>,
) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id,
            port: PORT_B,
            mode: Mode::Socket,
            interface: None,
            workers: vec![0],
            pin_dir: None,
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 500,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            budget: None,
            tag_key: None,
            id: CLIENT,
            address: client,
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models,
    }
}

fn pio(base: u16, model: u32, posted: bool) -> DeviceSpec {
    DeviceSpec {
        space: Space::Pio,
        base: base as u64,
        len: 0x10,
        model,
        posted,
        place: Place::Remote { server: 0 },
    }
}

/// VM 1: vCPU 0 `sync` synchronous writes, vCPU 1 `posted` posted writes,
/// each checked against its counter at the end.
fn checked_vm(sync: u16, posted: u16) -> VmSpec {
    let g0 = guests::checked_writes(PIO_BASE, sync, 0).unwrap();
    let g1 = guests::checked_writes(PIO_BASE, posted, 1).unwrap();
    VmSpec {
        id: VM,
        hypervisor: HV,
        mem_bytes: g1.mem_end().next_multiple_of(0x1_0000) as usize,
        images: vec![
            (g0.load_gpa, g0.code.clone()),
            (g1.load_gpa, g1.code.clone()),
        ],
        vcpus: [&g0, &g1]
            .iter()
            .map(|g| VcpuSpec {
                entry: g.entry,
                core: None,
            })
            .collect(),
        devices: vec![
            pio(PIO_BASE, SYNC_MODEL, false),
            pio(PIO_BASE + 0x10, POSTED_MODEL, true),
        ],
    }
}

fn done(r: &VcpuReport) -> u32 {
    match &r.exit {
        Ok(VcpuExit::Done(v)) => *v,
        other => panic!("VM {} vCPU {} did not finish: {other:?}", r.vm, r.vcpu),
    }
}

/// Moves `model` from server `from` to `to` (the hand-over's steps), the
/// client retargeting it in between.
fn move_model(
    client: &Client,
    model: u32,
    from: &ServerThread,
    to: &ServerThread,
    from_id: u32,
    to_id: u32,
) -> Report {
    let mut p = ServerMove {
        model,
        from,
        to,
        from_id,
        to_id,
        retarget: |m, s| {
            client
                .retarget(m, s, Duration::from_secs(2))
                .map(|_| ())
                .map_err(|e| e.to_string())
        },
    };
    handover::run(&mut p)
}

/// Whether A serves `model`, whether B does, and whether either has it
/// lent.
fn placement(a: &ServerThread, b: &ServerThread, model: u32) -> (bool, bool, bool) {
    let look = |s: &ServerThread| {
        s.call(move |s| {
            (
                s.model_worker(model).is_some(),
                s.lent_models().contains(&model),
            )
        })
        .expect("server thread")
    };
    let ((on_a, lent_a), (on_b, lent_b)) = (look(a), look(b));
    (on_a, on_b, lent_a || lent_b)
}

/// Server A (XDP, `a_models`) and server B (socket mode, its own counter
/// [`B_OWN`]) in the server namespace of `topo`.
fn servers_a_b(topo: &Topology, a_models: Vec<ModelConfig>) -> (ServerThread, ServerThread) {
    let a = ServerThread::spawn(
        server_config(topo, SERVER_A, true, a_models),
        Some(topo.server_netns()),
    )
    .expect("server A starts");
    let b = ServerThread::spawn(
        server_config(topo, SERVER_B, false, vec![counter(B_OWN, 0, 0x700)]),
        Some(topo.server_netns()),
    )
    .expect("server B starts");
    (a, b)
}

#[test]
fn a_model_moved_between_servers_under_traffic_keeps_every_write_once() {
    let test = "a_model_moved_between_servers_under_traffic_keeps_every_write_once";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let topo = match Topology::new("mmove") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let (a, b) = servers_a_b(
        &topo,
        vec![
            counter(SYNC_MODEL, 0, PIO_BASE),
            counter(POSTED_MODEL, 1, PIO_BASE + 0x10),
        ],
    );
    for s in [&a, &b] {
        s.call(|s| s.set_step_timeout(Duration::from_millis(300)))
            .expect("server thread");
    }
    let (sync, posted) = (12000u16, 16000u16);
    let spec = ClientSpec {
        client: CLIENT,
        bind: Some(topo.client_ip().into()),
        servers: vec![
            ServerSpec {
                addr: SocketAddr::from((topo.server_ip(), PORT_A)),
                id: SERVER_A,
                via: None,
            },
            ServerSpec {
                addr: SocketAddr::from((topo.server_ip(), PORT_B)),
                id: SERVER_B,
                via: None,
            },
        ],
        vms: vec![checked_vm(sync, posted)],
        engine: EngineConfig {
            spin_budget: 500,
            retransmit: Duration::from_millis(2),
            retransmit_max: Duration::from_millis(20),
            ..EngineConfig::default()
        },
        engine_core: None,
        vcpu_spin: 200,
        samples: 0,
        direct: true,
    };
    let mut client = topo
        .run(Side::Client, move || Client::start(spec))
        .expect("enter client netns")
        .expect("client starts");
    std::thread::sleep(Duration::from_millis(30));

    let mv = |model, from, to, from_id, to_id| move_model(&client, model, from, to, from_id, to_id);

    let writes = |c: &Client| -> Vec<u64> {
        c.vcpu_stats()
            .iter()
            .map(|(_, _, s)| s.remote.load(std::sync::atomic::Ordering::Relaxed))
            .collect()
    };

    // 1. Both models move to B while both guests write.
    for model in [POSTED_MODEL, SYNC_MODEL] {
        let r = mv(model, &a, &b, SERVER_A, SERVER_B);
        assert_eq!(
            r,
            Report::Moved {
                release_pending: None
            },
            "{r}"
        );
        assert_eq!(
            placement(&a, &b, model),
            (false, true, false),
            "model {model}"
        );
    }
    // Both guests still write after the moves: they happened under
    // traffic.
    let w = writes(&client);
    assert!(
        w[0] < u64::from(sync) && w[1] < u64::from(posted),
        "a guest finished before the moves did: {w:?}"
    );
    eprintln!("writes when the moves were done: {w:?}");

    // 2. The source's (B's) worker is stuck past the step timeout: the
    // lend is cancelled, the model serves on B as before.
    b.call(|s| s.stall_worker(0, Duration::from_millis(600)))
        .expect("server thread")
        .expect("stall");
    let r = mv(SYNC_MODEL, &b, &a, SERVER_B, SERVER_A);
    assert!(
        matches!(r, Report::Cancelled { at: Step::Lend, .. }),
        "stuck source worker: {r}"
    );
    assert_eq!(placement(&a, &b, SYNC_MODEL), (false, true, false), "{r}");
    eprintln!("{r}");
    // Until the stuck worker is back (it then finds its lend cancelled
    // and does nothing).
    std::thread::sleep(Duration::from_millis(400));

    // 3. The target's (A's) worker is stuck past the step timeout when
    // the commit comes: cancelled after the client retargeted; it points
    // back and B serves the model again.
    a.call(|s| s.stall_worker(0, Duration::from_millis(900)))
        .expect("server thread")
        .expect("stall");
    let r = mv(SYNC_MODEL, &b, &a, SERVER_B, SERVER_A);
    assert!(
        matches!(r, Report::Cancelled { at: Step::Commit, ref loose_ends, .. } if loose_ends.is_empty()),
        "stuck target worker: {r}"
    );
    assert_eq!(placement(&a, &b, SYNC_MODEL), (false, true, false), "{r}");
    eprintln!("{r}");
    std::thread::sleep(Duration::from_millis(700));

    // 4. The synchronous model goes back to A.
    let r = mv(SYNC_MODEL, &b, &a, SERVER_B, SERVER_A);
    assert_eq!(
        r,
        Report::Moved {
            release_pending: None
        },
        "{r}"
    );
    assert_eq!(placement(&a, &b, SYNC_MODEL), (true, false, false));
    eprintln!("writes after the last move: {:?}", writes(&client));
    let reports = client.wait(Duration::from_secs(120));
    assert_eq!(done(&reports[0]), u32::from(sync), "synchronous writes");
    assert_eq!(done(&reports[1]), u32::from(posted), "posted writes");
    // B served the posted model (B started with no traffic at all).
    let applied: u64 = b
        .snapshot()
        .workers
        .iter()
        .map(|w| w.records - w.duplicates)
        .sum();
    assert!(applied > 0, "server B applied nothing");
    assert_eq!(placement(&a, &b, POSTED_MODEL), (false, true, false));
    assert_eq!(placement(&a, &b, SYNC_MODEL), (true, false, false));
}

/// An interrupt source that moves: a counter raising IRQ [`IRQ_LINE`] for
/// VM 1, which [`irq_chain_vm`]'s guest asks for one interrupt at a time.
const IRQ_MODEL: u32 = 21;
const IRQ_BASE: u16 = 0x600;
const IRQ_LINE: u8 = 5;

/// VM 1 with one vCPU taking `want` interrupts from [`IRQ_MODEL`], one
/// at a time (`guests::irq_chain`: each handler acknowledges to the
/// model's count register and asks for the next).
fn irq_chain_vm(want: u16) -> VmSpec {
    let g = guests::irq_chain(
        IRQ_LINE,
        want,
        IRQ_BASE + devplane_devmodels::counter::REG_COUNT as u16,
        IRQ_BASE + devplane_devmodels::counter::REG_IRQ as u16,
    )
    .unwrap();
    VmSpec {
        id: VM,
        hypervisor: HV,
        mem_bytes: g.mem_end().next_multiple_of(0x1_0000) as usize,
        images: vec![(g.load_gpa, g.code.clone())],
        vcpus: vec![VcpuSpec {
            entry: g.entry,
            core: None,
        }],
        devices: vec![DeviceSpec {
            len: 0x20,
            ..pio(IRQ_BASE, IRQ_MODEL, false)
        }],
    }
}

/// Issue 16.4: a model that raises interrupts moves between servers
/// (XDP server A, socket server B) and back, six times, while its guest
/// takes a chain of interrupts from it, with 10% of the datagrams into
/// the client and 5% out of it lost: the chain never stalls (an
/// interrupt lost at a move would leave the guest waiting for good), every
/// interrupt is applied once (the engine's count is the guest's), and
/// both servers raised some (the interrupts followed the model).
///
/// It found a bug: a target worker that had never heard from the VM's
/// client (it learned where interrupts go from requests only) held the
/// handed-over interrupt until the guest sent it a request, and the guest
/// waiting for that interrupt stalled for good (4 of 9 runs). The client
/// now announces itself to a model's new server after a retarget
/// (`Protocol::announce`); the test checks the announcements were sent.
#[test]
fn a_models_interrupts_follow_it_between_servers() {
    interrupts_follow("a_models_interrupts_follow_it_between_servers", true);
}

/// The same with the engine thread stepping the lanes (not the vCPU's
/// own thread): it must wake for the announcements too.
#[test]
fn a_models_interrupts_follow_it_between_servers_engine_mode() {
    interrupts_follow(
        "a_models_interrupts_follow_it_between_servers_engine_mode",
        false,
    );
}

fn interrupts_follow(test: &str, direct: bool) {
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let topo = match Topology::new(if direct { "mirq" } else { "mirqe" }) {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let irq_model = ModelConfig {
        line: Some(u32::from(IRQ_LINE)),
        vm: Some(VM),
        ..counter(IRQ_MODEL, 1, IRQ_BASE)
    };
    let (a, b) = servers_a_b(&topo, vec![irq_model]);
    let spec = irq_spec(
        topo.client_ip(),
        [
            SocketAddr::from((topo.server_ip(), PORT_A)),
            SocketAddr::from((topo.server_ip(), PORT_B)),
        ],
        direct,
    );
    let client = topo
        .run(Side::Client, move || Client::start(spec))
        .expect("enter client netns")
        .expect("client starts");
    chain_under_moves(&a, &b, client);
}

/// How many interrupts the chain takes.
const CHAIN: u16 = 3000;

/// The client of the interrupt-chain tests: VM 1 on `bind`, servers A and
/// B at `servers`, with loss.
fn irq_spec(bind: std::net::Ipv4Addr, servers: [SocketAddr; 2], direct: bool) -> ClientSpec {
    ClientSpec {
        client: CLIENT,
        bind: Some(bind.into()),
        servers: vec![
            ServerSpec {
                addr: servers[0],
                id: SERVER_A,
                via: None,
            },
            ServerSpec {
                addr: servers[1],
                id: SERVER_B,
                via: None,
            },
        ],
        vms: vec![irq_chain_vm(CHAIN)],
        engine: EngineConfig {
            spin_budget: 500,
            retransmit: Duration::from_millis(2),
            retransmit_max: Duration::from_millis(20),
            // Interrupts and answers lost on their way in (and requests
            // on their way out): some interrupt is unacknowledged, held
            // for a resend, when a move comes.
            loss: devplane_vmm::engine::Loss {
                tx_permille: 50,
                rx_permille: 100,
                seed: 0x1e55,
            },
            ..EngineConfig::default()
        },
        engine_core: None,
        vcpu_spin: 200,
        samples: 0,
        direct,
    }
}

/// Takes the chain of [`CHAIN`] interrupts from the model while it moves
/// from A to B and back, six times, and checks what the tests promise.
fn chain_under_moves(a: &ServerThread, b: &ServerThread, client: Client) {
    let want = CHAIN;
    let mut client = client;
    let engine_irqs = |c: &Client| {
        c.engine()
            .expect("engine")
            .stats()
            .irqs
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Wait until the chain runs.
    let t0 = std::time::Instant::now();
    while engine_irqs(&client) < 50 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the chain did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut at_moves = Vec::new();
    for round in 0..6 {
        let (from, to, from_id, to_id) = if round % 2 == 0 {
            (a, b, SERVER_A, SERVER_B)
        } else {
            (b, a, SERVER_B, SERVER_A)
        };
        let r = move_model(&client, IRQ_MODEL, from, to, from_id, to_id);
        assert_eq!(
            r,
            Report::Moved {
                release_pending: None
            },
            "move {round}: {r}"
        );
        at_moves.push(engine_irqs(&client));
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("interrupts applied when each move was done: {at_moves:?}");
    assert!(
        at_moves.last().copied().unwrap_or(0) < u64::from(want),
        "the chain ended before the moves did: {at_moves:?}"
    );
    assert!(
        at_moves.windows(2).any(|w| w[1] > w[0]),
        "no interrupt between moves: {at_moves:?}"
    );
    let reports = client.wait(Duration::from_secs(120));
    assert_eq!(
        done(&reports[0]),
        u32::from(want),
        "the guest's handler count"
    );
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        engine_irqs(&client),
        u64::from(want),
        "every interrupt applied exactly once"
    );
    let sent = |s: &ServerThread| -> (u64, u64) {
        let w = s.snapshot().workers;
        (
            w.iter().map(|w| w.irqs_sent).sum(),
            w.iter().map(|w| w.irqs_resent).sum(),
        )
    };
    let ((on_a, again_a), (on_b, again_b)) = (sent(a), sent(b));
    eprintln!("interrupts sent: A {on_a} ({again_a} again), B {on_b} ({again_b} again)");
    assert!(on_a > 0 && on_b > 0, "A sent {on_a}, B sent {on_b}");
    assert!(again_a + again_b > 0, "the loss made nothing be sent again");
    let hellos = client
        .engine()
        .expect("engine")
        .stats()
        .hellos
        .load(std::sync::atomic::Ordering::Relaxed);
    // Announcements stop once the client hears from the new server
    // (an answer or an interrupt proves it knows where the VM's
    // interrupts go), so a move may need none: their count is reported,
    // what they are for (every interrupt reaching the guest) is asserted
    // above.
    eprintln!("{hellos} announcements for six moves");
    assert_eq!(placement(a, b, IRQ_MODEL), (true, false, false));
}

/// Issue 16.4 between two XDP servers: the interrupt source moves six
/// times between servers on two hosts of a three-host LAN
/// (`testkit::lan`), each behind the real XDP program, under the same
/// chain of interrupts and loss as above.
#[test]
fn a_models_interrupts_follow_it_between_two_xdp_servers() {
    let test = "a_models_interrupts_follow_it_between_two_xdp_servers";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf, Capability::Kvm]) {
        return;
    }
    let lan = match Lan::new("mxdp", &["client", "a", "b"]) {
        Ok(l) => l,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the three-host LAN: {e}"));
            return;
        }
    };
    let (client_host, host_a, host_b) = (lan.host(0), lan.host(1), lan.host(2));
    let xdp_server = |id: u32, host: &LanHost, models: Vec<ModelConfig>| ServerConfig {
        server: ServerSection {
            id,
            port: PORT_A,
            mode: Mode::Xdp,
            interface: Some(host.ifname.clone()),
            workers: vec![0, 1],
            pin_dir: Some(
                format!("/sys/fs/bpf/devplane-test-mxdp{id}-{}", std::process::id()).into(),
            ),
            check_clients: true,
        },
        ..server_config_for(client_host.ip, id, models)
    };
    let irq_model = ModelConfig {
        line: Some(u32::from(IRQ_LINE)),
        vm: Some(VM),
        ..counter(IRQ_MODEL, 1, IRQ_BASE)
    };
    let a = ServerThread::spawn(
        xdp_server(SERVER_A, host_a, vec![irq_model]),
        Some(&host_a.netns),
    )
    .expect("server A starts");
    let b = ServerThread::spawn(
        xdp_server(SERVER_B, host_b, vec![counter(B_OWN, 0, 0x700)]),
        Some(&host_b.netns),
    )
    .expect("server B starts");
    let spec = irq_spec(
        client_host.ip,
        [
            SocketAddr::from((host_a.ip, PORT_A)),
            SocketAddr::from((host_b.ip, PORT_A)),
        ],
        true,
    );
    let client = client_host
        .run(move || Client::start(spec))
        .expect("enter client netns")
        .expect("client starts");
    chain_under_moves(&a, &b, client);
}
