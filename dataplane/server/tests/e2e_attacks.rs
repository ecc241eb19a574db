//! End to end, from a third host on the client's link (a namespace of its
//! own, `devplane_testkit::attacker`): another registered tenant tries to
//! lose, forge or pre-answer the victim's writes, steal its interrupts and
//! acknowledge them away. The assertions are what the victim sees (every
//! write applied exactly once, every interrupt delivered to it and to no
//! one else) and that every attack datagram is counted as a foreign-VM
//! drop.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use devplane_control::config::{Mode, ModelConfig, ServerConfig};
use devplane_devmodels::counter::REG_IRQ;
use devplane_testkit::host::{ServerSnapshot, ServerThread};
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::tenants::{self, Tenant};
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::maps::Counter;
use devplane_wire::{
    Access, AccessSize, Ack, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
};

const PORT: u16 = 7700;
const SERVER: u32 = 1;
const VICTIM: u32 = 7;
const TENANT: u32 = 8;
const VM: u32 = 1;
const TENANT_VM: u32 = 2;
const HV: u32 = tenants::HYPERVISOR;
const MODEL: u32 = 100;
const PIO: u16 = 0x500;

fn config(topo: &Topology, mode: Mode, tag: &str, tenant_ip: std::net::Ipv4Addr) -> ServerConfig {
    let tenants = [
        Tenant {
            client: VICTIM,
            address: topo.client_ip(),
            vm: VM,
            key: None,
        },
        Tenant {
            client: TENANT,
            address: tenant_ip,
            vm: TENANT_VM,
            key: None,
        },
    ];
    let counter = ModelConfig {
        pio_base: Some(PIO),
        line: Some(5),
        vm: Some(VM),
        ..ModelConfig::new(MODEL, "counter", 0)
    };
    tenants::server_config(topo, mode, tag, SERVER, PORT, &tenants, vec![counter])
}

fn datagram_of(kind: Kind, client: u32, irq_port: Option<u16>, recs: &[Record]) -> Vec<u8> {
    let mut h = Header::new(kind, MODEL, SERVER, client);
    if let Some(p) = irq_port {
        h = h.with_irq_port(p);
    }
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(&mut buf, h, recs).unwrap();
    buf.truncate(n);
    buf
}

fn req(vm: u32, seq: u64, access: Access) -> Record {
    Record::Request(Request {
        id: RequestId {
            vm,
            hypervisor: HV,
            vcpu: 0,
            seq,
        },
        access,
        flags: 0,
    })
}

fn write(data: u32) -> Access {
    Access::PioOut {
        port: PIO,
        size: AccessSize::B1,
        data,
    }
}

fn raise(n: u32) -> Access {
    Access::PioOut {
        port: PIO + REG_IRQ as u16,
        size: AccessSize::B1,
        data: n,
    }
}

fn read() -> Access {
    Access::PioIn {
        port: PIO,
        size: AccessSize::B4,
    }
}

/// The victim: one socket for answers and interrupts.
struct Victim {
    sock: UdpSocket,
    server: SocketAddr,
    irqs: Vec<u64>,
}

impl Victim {
    /// Sends one request, again with the same number while no answer
    /// comes (as a client does: a loaded receiver may drop a datagram);
    /// returns its answer. Interrupts that arrive meanwhile are
    /// acknowledged and kept.
    fn call(&mut self, seq: u64, access: Access) -> (Status, u64) {
        let d = datagram_of(Kind::Request, VICTIM, None, &[req(VM, seq, access)]);
        for _ in 0..10 {
            self.sock.send_to(&d, self.server).unwrap();
            loop {
                let mut buf = [0u8; 2048];
                let Ok(n) = self.sock.recv(&mut buf) else {
                    break; // resend
                };
                let d = Datagram::parse(&buf[..n]).expect("parses");
                if d.kind() == Kind::Interrupt {
                    self.take_interrupts(&d);
                    continue;
                }
                match d.records().next() {
                    Some(Record::Response(r)) if r.id.seq == seq => return (r.status, r.data),
                    // A late answer to an earlier resend.
                    Some(Record::Response(r)) if r.id.seq < seq => continue,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        panic!("no answer to {seq} after 10 sends");
    }

    fn take_interrupts(&mut self, d: &Datagram<'_>) {
        let mut top = None;
        for r in d.records() {
            if let Record::Interrupt(i) = r {
                assert_eq!(i.vm, VM);
                if !self.irqs.contains(&i.seq) {
                    self.irqs.push(i.seq);
                }
                top = Some(i);
            }
        }
        if let Some(i) = top {
            let ack = Record::Ack(Ack {
                id: RequestId {
                    vm: i.vm,
                    hypervisor: i.hypervisor,
                    vcpu: 0,
                    seq: i.seq,
                },
            });
            let a = datagram_of(Kind::Ack, VICTIM, None, &[ack]);
            self.sock.send_to(&a, self.server).unwrap();
        }
    }

    /// Waits for `n` interrupts in all.
    fn wait_interrupts(&mut self, n: usize) {
        while self.irqs.len() < n {
            let mut buf = [0u8; 2048];
            let got = self.sock.recv(&mut buf).expect("interrupts within 1 s");
            let d = Datagram::parse(&buf[..got]).expect("parses");
            assert_eq!(d.kind(), Kind::Interrupt);
            self.take_interrupts(&d);
        }
    }
}

/// Foreign-VM drops by the XDP program (a foreign first record) and by
/// the workers (any other, and all of socket mode's).
fn foreign_drops(s: &ServerSnapshot) -> u64 {
    let xdp = s.xdp.as_ref().map_or(0, |x| x.get(Counter::DropForeignVm));
    xdp + s.workers.iter().map(|w| w.foreign_vm).sum::<u64>()
}

/// What the kernel dropped at the workers' sockets (a burst faster than
/// the worker).
fn kernel_drops(s: &ServerSnapshot) -> u64 {
    s.workers
        .iter()
        .map(|w| w.socket_drops + w.xsk_rx_dropped + w.xsk_rx_ring_full)
        .sum()
}

fn attacks(mode: Mode, tag: &str) {
    let test = format!("e2e_attacks_{tag}");
    if !privilege::require(&test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let topo = match Topology::new(tag) {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(&test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let attacker = topo.attacker().expect("a third namespace on the link");
    let srv = ServerThread::spawn(
        config(&topo, mode, tag, attacker.ip()),
        Some(topo.server_netns()),
    )
    .expect("server starts");
    let server = SocketAddr::from((topo.server_ip(), PORT));
    let ip = topo.client_ip();
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut victim = Victim {
        sock,
        server,
        irqs: Vec::new(),
    };
    let aip = attacker.ip();
    let (asock, airq) = attacker
        .run(move || {
            (
                UdpSocket::bind((aip, 0)).unwrap(),
                UdpSocket::bind((aip, 0)).unwrap(),
            )
        })
        .expect("enter the attacker's netns");
    let irq_port = airq.local_addr().unwrap().port();

    // Before the victim has sent anything (the server knows no address
    // for its VM yet), the tenant announces itself for the victim's VM as
    // a client does to a model's new server: an acknowledgement of
    // nothing naming the tenant's own interrupt port. Dropped as foreign
    // (checked below: no interrupt of the victim's ever reaches it).
    let early = srv.snapshot();
    let announce = Record::Ack(Ack {
        id: RequestId {
            vm: VM,
            hypervisor: 0,
            vcpu: 0,
            seq: 0,
        },
    });
    asock
        .send_to(
            &datagram_of(Kind::Ack, TENANT, Some(irq_port), &[announce]),
            server,
        )
        .unwrap();
    let t0 = std::time::Instant::now();
    while foreign_drops(&srv.snapshot()) + kernel_drops(&srv.snapshot())
        == foreign_drops(&early) + kernel_drops(&early)
    {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "a forged announcement unaccounted for"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // The victim starts; the tenant uses its own VM (it is a registered,
    // working client).
    let seq0 = 1_000u64;
    assert_eq!(victim.call(seq0, write(1)), (Status::Ok, 0));
    asock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let own = datagram_of(Kind::Request, TENANT, None, &[req(TENANT_VM, 1, read())]);
    let served = (0..10).any(|_| {
        asock.send_to(&own, server).unwrap();
        asock
            .recv(&mut buf)
            .is_ok_and(|n| Datagram::parse(&buf[..n]).is_ok_and(|d| d.kind() == Kind::Response))
    });
    assert!(served, "the tenant is served");
    // Late answers to the tenant's resends, if any, are read before the
    // attack.
    while asock.recv(&mut buf).is_ok() {}

    let before = srv.snapshot();
    let mut sent = 0u64;
    let mut attack = |d: Vec<u8>| {
        asock.send_to(&d, server).unwrap();
        sent += 1;
    };
    // Push the victim's window with numbers near 2^64.
    for seq in (u64::MAX - 300)..u64::MAX {
        attack(datagram_of(
            Kind::Request,
            TENANT,
            None,
            &[req(VM, seq, write(1))],
        ));
    }
    // Pre-answer the victim's next numbers.
    for seq in seq0 + 1..=seq0 + 100 {
        attack(datagram_of(
            Kind::Request,
            TENANT,
            None,
            &[req(VM, seq, read())],
        ));
    }
    // A foreign record behind one of its own VM.
    attack(datagram_of(
        Kind::Request,
        TENANT,
        None,
        &[req(TENANT_VM, 2, read()), req(VM, seq0 + 101, write(1))],
    ));
    // Take the VM's interrupts to its own port.
    attack(datagram_of(
        Kind::Request,
        TENANT,
        Some(irq_port),
        &[req(VM, seq0 + 102, raise(1))],
    ));
    // Acknowledge the VM's interrupts away.
    let ack = Record::Ack(Ack {
        id: RequestId {
            vm: VM,
            hypervisor: HV,
            vcpu: 0,
            seq: u64::MAX,
        },
    });
    attack(datagram_of(Kind::Ack, TENANT, None, &[ack]));

    // Every attack datagram is dropped: as foreign, or by the kernel at the
    // worker's socket when the burst outran the worker.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let accounted = |s: &ServerSnapshot| {
        (
            foreign_drops(s) - foreign_drops(&before),
            kernel_drops(s) - kernel_drops(&before),
        )
    };
    let (foreign, dropped) = loop {
        let (f, k) = accounted(&srv.snapshot());
        if f + k == sent || std::time::Instant::now() > deadline {
            break (f, k);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("{sent} attack datagrams: {foreign} foreign-VM drops, {dropped} kernel drops");
    assert_eq!(
        foreign + dropped,
        sent,
        "an attack datagram unaccounted for"
    );
    assert!(foreign > 0);

    // The victim goes on: every write applied once, its interrupts its own.
    for seq in seq0 + 1..=seq0 + 100 {
        assert_eq!(victim.call(seq, write(1)), (Status::Ok, 0), "write {seq}");
    }
    assert_eq!(victim.call(seq0 + 101, raise(2)), (Status::Ok, 0));
    victim.wait_interrupts(2);
    assert_eq!(
        victim.call(seq0 + 102, read()),
        (Status::Ok, 101),
        "a write lost or doubled"
    );
    airq.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(airq.recv(&mut buf).is_err(), "an interrupt was stolen");
    asock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    assert!(asock.recv(&mut buf).is_err(), "an attack was answered");
    assert_eq!(
        foreign_drops(&srv.snapshot()) - foreign_drops(&before),
        foreign,
        "a victim's datagram counted as foreign"
    );
    srv.stop();
    drop(attacker);
}

#[test]
fn xdp_mode_another_tenant_cannot_touch_a_vm() {
    attacks(Mode::Xdp, "ax");
}

#[test]
fn socket_mode_another_tenant_cannot_touch_a_vm() {
    attacks(Mode::Socket, "as");
}
