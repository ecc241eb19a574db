//! End to end, owner and I/O servers (the patent's Fig. 6): three hosts on
//! one bridge (`testkit::lan`): a client, an owner server and an I/O
//! server, each server with the real XDP program in driver mode and an
//! AF_XDP worker. The counter model lives on the I/O server; the owner
//! forwards its requests there (rewrite + `XDP_TX`, counted `forwarded`),
//! and the I/O server answers and interrupts the client straight (the
//! answers come from its address and name it). The client loses a fifth
//! of what it sends and of what it receives (its own loss injection: the
//! kernel here has no netem) and retransmits; midway its placement moves
//! from owner-forwarded to direct (the owner stops forwarding) and back,
//! with requests in flight. Every write is applied exactly once (the
//! model's count and sum), every interrupt is delivered once.

use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_control::proto::{Request as CtlRequest, Response};
use devplane_devmodels::counter::{REG_COUNT, REG_IRQ, REG_SUM};
use devplane_server::Attach;
use devplane_server::forward::Forward;
use devplane_testkit::host::ServerThread;
use devplane_testkit::lan::{Lan, LanHost};
use devplane_testkit::privilege::{self, Capability};
use devplane_wire::maps::Counter;
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
};

const PORT: u16 = 7700;
const OWNER: u32 = 1;
const IO: u32 = 2;
const CLIENT: u32 = 7;
const VM: u32 = 1;
const HV: u32 = 3;
const MODEL: u32 = 100;
const PIO: u16 = 0x500;
/// Writes in the stream; the placement moves at a third and two thirds.
const WRITES: u32 = 150;
const IRQS: usize = 12;
/// Per mille of datagrams the client loses each way.
const LOSS: u64 = 200;

fn server(id: u32, host: &LanHost, client: &LanHost, models: Vec<ModelConfig>) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(host.ifname.clone()),
            workers: vec![0],
            pin_dir: Some(
                format!("/sys/fs/bpf/devplane-test-fwd{id}-{}", std::process::id()).into(),
            ),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 200,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![ClientConfig {
            tag_key: None,
            id: CLIENT,
            address: client.ip,
            budget: None,
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models,
    }
}

/// A test client that loses datagrams both ways, from a seeded generator.
struct LossyClient {
    sock: UdpSocket,
    owner: SocketAddr,
    io: SocketAddr,
    /// Where requests go now: the owner (forwarded) or the I/O server.
    via_owner: bool,
    seq: u64,
    rng: u64,
    irq_seen: u64,
    irqs: Vec<u64>,
    /// Datagrams that left for the owner (not lost at the client).
    sent_to_owner: u64,
    lost: u64,
}

impl LossyClient {
    fn new(lan: &Lan) -> LossyClient {
        let ip = lan.host(0).ip;
        let sock = lan
            .host(0)
            .run(move || UdpSocket::bind((ip, 0)))
            .expect("enter client netns")
            .expect("bind");
        sock.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        LossyClient {
            sock,
            owner: SocketAddrV4::new(lan.host(1).ip, PORT).into(),
            io: SocketAddrV4::new(lan.host(2).ip, PORT).into(),
            via_owner: true,
            seq: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            irq_seen: 0,
            irqs: Vec::new(),
            sent_to_owner: 0,
            lost: 0,
        }
    }

    fn lose(&mut self) -> bool {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let lost = self.rng % 1000 < LOSS;
        self.lost += u64::from(lost);
        lost
    }

    fn send(&mut self, bytes: &[u8], to: SocketAddr) {
        if self.lose() {
            return;
        }
        if to == self.owner {
            self.sent_to_owner += 1;
        }
        self.sock.send_to(bytes, to).unwrap();
    }

    /// Takes an interrupt datagram: new numbers recorded, acknowledged
    /// straight to the I/O server that sent it.
    fn on_interrupt(&mut self, d: &Datagram) {
        assert_eq!((d.server(), d.client(), d.model()), (IO, CLIENT, MODEL));
        let mut top = None;
        for r in d.records() {
            let Record::Interrupt(i) = r else {
                panic!("{r:?}")
            };
            if i.seq > self.irq_seen {
                self.irq_seen = i.seq;
                self.irqs.push(i.seq);
            }
            top = Some(i);
        }
        let Some(top) = top else { return };
        let ack = Record::Ack(devplane_wire::Ack {
            id: RequestId {
                vm: top.vm,
                hypervisor: top.hypervisor,
                vcpu: 0,
                seq: top.seq,
            },
        });
        let mut a = vec![0u8; 128];
        let n =
            datagram::encode(&mut a, Header::new(Kind::Ack, MODEL, IO, CLIENT), &[ack]).unwrap();
        let io = self.io;
        self.send(&a[..n], io);
    }

    /// Receives one datagram (unless lost), checking that it comes from
    /// the I/O server; interrupts are taken on the way. Returns an answer.
    fn receive(&mut self) -> Option<(RequestId, Status, u64)> {
        let mut buf = [0u8; 2048];
        let (n, from) = self.sock.recv_from(&mut buf).ok()?;
        if self.lose() {
            return None;
        }
        assert_eq!(
            from, self.io,
            "answers and interrupts come from the I/O server"
        );
        let d = Datagram::parse(&buf[..n]).expect("parses");
        match d.kind() {
            Kind::Interrupt => {
                self.on_interrupt(&d);
                None
            }
            Kind::Response => {
                assert_eq!((d.server(), d.client(), d.model()), (IO, CLIENT, MODEL));
                match d.records().next() {
                    Some(Record::Response(r)) => Some((r.id, r.status, r.data)),
                    other => panic!("{other:?}"),
                }
            }
            k => panic!("unexpected {k:?}"),
        }
    }

    /// One access, retransmitted every 20 ms unanswered (to wherever the
    /// placement says now), up to 10 s.
    fn call(&mut self, access: Access) -> (Status, u64) {
        let (id, bytes) = self.prepare(access);
        self.complete(id, &bytes)
    }

    /// The next request datagram of `access`.
    fn prepare(&mut self, access: Access) -> (RequestId, Vec<u8>) {
        self.seq += 1;
        let id = RequestId {
            vm: VM,
            hypervisor: HV,
            vcpu: 0,
            seq: self.seq,
        };
        let rec = Record::Request(Request {
            id,
            access,
            flags: 0,
        });
        let mut bytes = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let n = datagram::encode(
            &mut bytes,
            Header::new(Kind::Request, MODEL, IO, CLIENT),
            &[rec],
        )
        .unwrap();
        bytes.truncate(n);
        (id, bytes)
    }

    /// Sends `bytes` (request `id`) until it is answered.
    fn complete(&mut self, id: RequestId, bytes: &[u8]) -> (Status, u64) {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            let to = if self.via_owner { self.owner } else { self.io };
            self.send(bytes, to);
            let wait = Instant::now() + Duration::from_millis(20);
            while Instant::now() < wait {
                match self.receive() {
                    Some((rid, status, data)) if rid == id => return (status, data),
                    _ => {}
                }
            }
        }
        panic!("seq {}: no answer in 10 s", id.seq);
    }
}

#[test]
fn owner_forwards_to_the_io_server_exactly_once_under_loss() {
    let test = "e2e_forward";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let lan = match Lan::new("fwd", &["client", "owner", "io"]) {
        Ok(l) => l,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the three-host LAN: {e}"));
            return;
        }
    };
    let (client, owner, io) = (lan.host(0), lan.host(1), lan.host(2));
    let counter = ModelConfig {
        id: MODEL,
        kind: "counter".into(),
        worker: 0,
        line: Some(5),
        vm: Some(VM),
        pio_base: Some(PIO),
        mmio_base: None,
        backing: None,
    };
    let io_srv = ServerThread::spawn(server(IO, io, client, vec![counter]), Some(&io.netns))
        .expect("I/O server starts");
    let mut owner_srv =
        ServerThread::spawn(server(OWNER, owner, client, vec![]), Some(&owner.netns))
            .expect("owner server starts");
    // The placement moves below go through the owner's control socket,
    // as `dpctl --socket ... models forward|unforward` sends them.
    let ctl = std::env::temp_dir().join(format!("dp-fwd-{}.sock", std::process::id()));
    owner_srv.listen(&ctl).expect("owner control socket");
    let ask =
        |req: CtlRequest| match devplane_control::proto::call(&ctl, &req, Duration::from_secs(5)) {
            Ok(Response::Ok) => {}
            other => panic!("{req:?}: {other:?}"),
        };
    assert_eq!(io_srv.attach_mode(), Some(Attach::Driver));
    assert_eq!(owner_srv.attach_mode(), Some(Attach::Driver));
    let to = Forward {
        server: IO,
        ip: io.ip,
        mac: io.mac,
    };
    owner_srv
        .call(move |s| s.forward_model(MODEL, to))
        .expect("owner thread")
        .expect("forward the model");

    let mut c = LossyClient::new(&lan);
    let mut sum = 0u64;
    for i in 1..=WRITES {
        let w = Access::PioOut {
            port: PIO + REG_COUNT as u16,
            size: AccessSize::B4,
            data: i,
        };
        let (id, bytes) = c.prepare(w);
        let answer = if i == WRITES / 3 {
            // To direct placement with this write in flight through the
            // owner: the owner stops forwarding (the write may have gone
            // on already, or be dropped there), and the client's
            // retransmissions go to the I/O server.
            let owner_addr = c.owner;
            c.sock.send_to(&bytes, owner_addr).unwrap();
            c.sent_to_owner += 1;
            ask(CtlRequest::UnforwardModel { model: MODEL });
            c.via_owner = false;
            c.complete(id, &bytes)
        } else if i == 2 * WRITES / 3 {
            // And back, with this write in flight straight to the I/O
            // server.
            let io_addr = c.io;
            c.sock.send_to(&bytes, io_addr).unwrap();
            ask(CtlRequest::ForwardModel {
                model: MODEL,
                server: IO,
                ip: to.ip,
                mac: to.mac,
            });
            c.via_owner = true;
            c.complete(id, &bytes)
        } else {
            c.complete(id, &bytes)
        };
        assert_eq!(answer, (Status::Ok, 0), "write {i}");
        sum += u64::from(i);
    }
    // Interrupts, raised through the owner, delivered straight, once each.
    for _ in 0..IRQS / 3 {
        let r = Access::PioOut {
            port: PIO + REG_IRQ as u16,
            size: AccessSize::B1,
            data: 3,
        };
        assert_eq!(c.call(r), (Status::Ok, 0));
    }
    let until = Instant::now() + Duration::from_secs(10);
    while c.irqs.len() < IRQS && Instant::now() < until {
        let _ = c.receive();
    }
    // A quiet moment: resends of interrupts already taken are no new ones.
    let quiet = Instant::now() + Duration::from_millis(300);
    while Instant::now() < quiet {
        let _ = c.receive();
    }
    assert_eq!(c.irqs.len(), IRQS, "each interrupt once: {:?}", c.irqs);
    assert!(c.irqs.windows(2).all(|w| w[1] == w[0] + 1), "{:?}", c.irqs);

    // Exactly once: every write counted once, the sum exact.
    let read = |reg: u64| Access::PioIn {
        port: PIO + reg as u16,
        size: AccessSize::B4,
    };
    assert_eq!(c.call(read(REG_COUNT)), (Status::Ok, u64::from(WRITES)));
    assert_eq!(c.call(read(REG_SUM)), (Status::Ok, sum));

    let o = owner_srv.snapshot();
    let oxdp = o.xdp.expect("owner XDP counters");
    let i = io_srv.snapshot();
    let ixdp = i.xdp.expect("I/O XDP counters");
    eprintln!(
        "e2e_forward: client lost {} datagrams, sent {} via the owner; owner forwarded {}, \
         dropped {} as unknown (after the unforward); I/O worker duplicates {}, irqs resent {}",
        c.lost,
        c.sent_to_owner,
        oxdp.get(Counter::Forwarded),
        oxdp.get(Counter::DropUnknownModel),
        i.workers[0].duplicates,
        i.workers[0].irqs_resent,
    );
    // Every datagram that reached the owner for the model was forwarded,
    // or dropped while the model was placed direct; none reached its
    // workers, which serve nothing.
    assert_eq!(
        oxdp.get(Counter::Forwarded) + oxdp.get(Counter::DropUnknownModel),
        c.sent_to_owner
    );
    assert!(oxdp.get(Counter::Forwarded) > 0);
    assert_eq!(o.workers[0].rx, 0);
    assert_eq!(oxdp.get(Counter::DropTtl), 0);
    // The I/O server saw the forwarded requests as its own (client
    // checks passed: the client's address stayed the source).
    assert_eq!(ixdp.get(Counter::DropSpoofed), 0);
    assert_eq!(ixdp.get(Counter::DropUnknownClient), 0);
    assert!(ixdp.get(Counter::Redirected) >= oxdp.get(Counter::Forwarded));
    assert!(
        i.workers[0].duplicates > 0,
        "lost answers were answered again"
    );
}
