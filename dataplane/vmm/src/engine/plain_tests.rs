//! A direct lane's plain socket calls (`lane`'s receive and send without
//! a ring), checked over loopback sockets without root or KVM: a test
//! socket plays the server, and the test drives the lane through its
//! [`Driver`] as a vCPU thread would.

use std::net::UdpSocket;
use std::sync::Mutex;
use std::time::Duration;

use devplane_wire::{
    Access, AccessSize, Datagram, Header, Interrupt, Kind, MAX_DATAGRAM, RawRecord, Record,
    Request, RequestId, Response, Status, datagram,
};

use super::*;

const VM: u32 = 4;
const HV: u32 = 2;
const SERVER: u32 = 3;
const CLIENT: u32 = 9;
const MODEL: u32 = 100;
const LINE: u32 = 5;

/// A direct lane of one vCPU over loopback: its socket connected to
/// `server`, and an interrupt socket (also connected to it) after it, as
/// the client builds them with `irqs_on_lanes`.
struct Rig {
    engine: Engine,
    driver: Driver,
    ring: Arc<ExitRing>,
    server: UdpSocket,
    lane_addr: SocketAddr,
    irq_addr: SocketAddr,
    injected: Arc<Mutex<Vec<(u32, IrqAction)>>>,
}

impl Rig {
    fn new() -> Rig {
        // No retransmission within a test's few steps: each step sends
        // only what the test asked for.
        Rig::with_retransmit(Duration::from_secs(10))
    }

    fn with_retransmit(retransmit: Duration) -> Rig {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let lane_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        lane_sock.connect(server.local_addr().unwrap()).unwrap();
        // Connected to the server, as the client's interrupt sockets are.
        let irq_sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        irq_sock.connect(server.local_addr().unwrap()).unwrap();
        let (lane_addr, irq_addr) = (
            lane_sock.local_addr().unwrap(),
            irq_sock.local_addr().unwrap(),
        );
        let ring = Arc::new(ExitRing::new().unwrap());
        let injected = Arc::new(Mutex::new(Vec::new()));
        let log = injected.clone();
        let inject: Injector = Box::new(move |line, action| {
            log.lock().unwrap().push((line, action));
            true
        });
        let lane = Lane {
            sockets: vec![lane_sock, irq_sock],
            vcpus: vec![VcpuPort {
                vm: VM,
                hypervisor: HV,
                vcpu: 0,
                ring: ring.clone(),
                models: Arc::new([RemoteModel {
                    model: MODEL,
                    server: SERVER,
                    socket: 0,
                }]),
            }],
            injectors: HashMap::from([(VM, inject)]),
            direct: true,
            irq_ports: vec![irq_addr.port()],
            servers: HashMap::from([(SERVER, server.local_addr().unwrap())]),
            via: HashMap::new(),
            irq_sockets: 1,
        };
        let cfg = EngineConfig {
            client: CLIENT,
            retransmit,
            retransmit_max: retransmit,
            horizon: Duration::from_secs(30),
            ..EngineConfig::default()
        };
        let engine = Engine::spawn(cfg, vec![lane], None).expect("engine");
        let driver = engine.driver(0).expect("a direct lane has a driver");
        driver.attach(Box::new(|| {})).unwrap();
        Rig {
            engine,
            driver,
            ring,
            server,
            lane_addr,
            irq_addr,
            injected,
        }
    }

    /// Publishes a read of request number `seq` and steps the lane once
    /// (which sends it); the slot it took.
    fn request(&self, seq: u64) -> u64 {
        let rec = RawRecord::encode(&Record::Request(Request {
            id: RequestId {
                vm: VM,
                hypervisor: HV,
                vcpu: 0,
                seq,
            },
            access: Access::PioIn {
                port: 0x60,
                size: AccessSize::B1,
            },
            flags: 0,
        }));
        let slot = self.ring.next_free().expect("a free slot");
        self.ring.publish(slot, 0, false, &rec);
        self.driver.begin();
        self.driver.step();
        slot
    }

    /// Receives the request datagram the lane sent; its first record's
    /// sequence number.
    fn take_request(&self) -> u64 {
        let mut buf = [0u8; 2048];
        let (n, from) = self.server.recv_from(&mut buf).expect("the request");
        assert_eq!(from, self.lane_addr);
        let d = Datagram::parse(&buf[..n]).unwrap();
        assert_eq!(d.kind(), Kind::Request);
        match d.records().next() {
            Some(Record::Request(r)) => r.id.seq,
            other => panic!("not a request: {other:?}"),
        }
    }

    fn send_to_lane(&self, bytes: &[u8]) {
        self.server.send_to(bytes, self.lane_addr).unwrap();
    }

    fn stats(&self) -> &EngineStats {
        self.engine.stats()
    }
}

fn encode(kind: Kind, recs: &[Record]) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let n = datagram::encode(&mut buf, Header::new(kind, MODEL, SERVER, CLIENT), recs).unwrap();
    buf.truncate(n);
    buf
}

fn answer(seq: u64, data: u64) -> Vec<u8> {
    encode(
        Kind::Response,
        &[Record::Response(Response {
            id: RequestId {
                vm: VM,
                hypervisor: HV,
                vcpu: 0,
                seq,
            },
            status: Status::Ok,
            size: AccessSize::B1,
            addr: 0x60,
            data,
        })],
    )
}

fn interrupt(seq: u64) -> Vec<u8> {
    encode(
        Kind::Interrupt,
        &[Record::Interrupt(Interrupt {
            vm: VM,
            hypervisor: HV,
            line: LINE,
            action: IrqAction::Edge,
            seq,
        })],
    )
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// Loopback delivers at once, but give the datagrams sent a moment to
/// land in their sockets' buffers.
fn settle() {
    std::thread::sleep(Duration::from_millis(20));
}

/// The receive reads the interrupt sockets first and stops at the
/// datagram that answers the vCPU: the interrupt the access raised (sent
/// ahead of the answer) is injected and acknowledged before the vCPU goes
/// back to its guest, and what comes behind the answer on the lane's
/// socket waits for the next step. And a step that has just sent does not
/// look for answers.
#[test]
fn a_direct_lane_takes_its_answer_then_the_interrupts_behind_it() {
    let rig = Rig::new();
    let slot = rig.request(1);
    assert_eq!(rig.take_request(), 1);
    // The server's turn: the interrupt first (to the interrupt socket),
    // then the answer and a stray datagram behind it (to the lane's).
    rig.server
        .send_to(&interrupt(1), rig.irq_addr)
        .expect("send the interrupt");
    rig.send_to_lane(&answer(1, 0x5a));
    rig.send_to_lane(b"stray bytes behind the answer");
    settle();
    assert!(rig.driver.step(), "the step found the answer");
    assert_eq!(rig.ring.try_take(slot), Some((Status::Ok as u8, 0x5a)));
    assert_eq!(*rig.injected.lock().unwrap(), [(LINE, IrqAction::Edge)]);
    assert_eq!(get(&rig.stats().irqs_on_vcpu), 1);
    assert_eq!(get(&rig.stats().acks_sent), 1);
    // The acknowledgement reached the server.
    let mut buf = [0u8; 2048];
    let (n, _) = rig.server.recv_from(&mut buf).expect("the ack");
    assert_eq!(Datagram::parse(&buf[..n]).unwrap().kind(), Kind::Ack);
    // The stray datagram is still in the lane's socket.
    assert_eq!(get(&rig.stats().malformed), 0);
    rig.driver.step();
    assert_eq!(get(&rig.stats().malformed), 1);

    // A step that sends a new request does not read: the stray datagram
    // queued before it is left for the next step.
    rig.send_to_lane(b"another stray datagram");
    settle();
    let slot = rig.request(2);
    assert_eq!(get(&rig.stats().malformed), 1, "the sending step read");
    assert_eq!(rig.take_request(), 2);
    rig.send_to_lane(&answer(2, 7));
    settle();
    rig.driver.step();
    assert_eq!(get(&rig.stats().malformed), 2);
    assert_eq!(rig.ring.try_take(slot), Some((Status::Ok as u8, 7)));
    rig.driver.end();
}

/// A flood on a direct lane's socket costs its vCPU a bounded step: at
/// most `PLAIN_RECV_MAX` datagrams per socket per step (each counted), the
/// rest left in the socket's buffer for later steps; the answer behind
/// the flood is still taken.
#[test]
fn a_flood_on_a_direct_lane_is_read_a_bounded_batch_per_step() {
    let rig = Rig::new();
    let slot = rig.request(1);
    assert_eq!(rig.take_request(), 1);
    let flood = 150u64;
    for i in 0..flood {
        rig.send_to_lane(format!("junk {i}").as_bytes());
    }
    rig.send_to_lane(&answer(1, 3));
    settle();
    let batch = lane::PLAIN_RECV_MAX as u64;
    rig.driver.step();
    assert_eq!(get(&rig.stats().malformed), batch);
    assert_eq!(rig.ring.try_take(slot), None);
    rig.driver.step();
    assert_eq!(get(&rig.stats().malformed), 2 * batch);
    rig.driver.step();
    assert_eq!(get(&rig.stats().malformed), flood);
    assert_eq!(rig.ring.try_take(slot), Some((Status::Ok as u8, 3)));
    rig.driver.end();
}

/// A vCPU whose answer is slow sleeps in `ppoll` on its sockets after its
/// spin, and wakes for the answer when it comes: the thread burns a
/// fraction of the wait, not all of it.
#[test]
fn a_direct_lane_sleeps_until_its_answer_comes() {
    let rig = Rig::new();
    let slot = rig.request(1);
    assert_eq!(rig.take_request(), 1);
    let wait = Duration::from_millis(200);
    let server = rig.server.try_clone().unwrap();
    let to = rig.lane_addr;
    let answerer = std::thread::spawn(move || {
        std::thread::sleep(wait);
        server.send_to(&answer(1, 9), to).unwrap();
    });
    let cpu = || {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec, written by the call.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    };
    let (t0, c0) = (std::time::Instant::now(), cpu());
    let got = loop {
        if let Some(a) = rig.ring.try_take(slot) {
            break a;
        }
        assert!(t0.elapsed() < Duration::from_secs(5), "no answer");
        rig.driver
            .sleep(Duration::from_secs(1), || rig.ring.is_done(slot));
    };
    let (took, burnt) = (t0.elapsed(), cpu() - c0);
    answerer.join().unwrap();
    assert_eq!(got, (Status::Ok as u8, 9));
    assert!(took >= wait, "answered before it was sent: {took:?}");
    // Woken by the answer, not by the end of its sleep (1 s asked, the
    // next retransmission 10 s away).
    assert!(
        took < wait + Duration::from_millis(500),
        "slept past the answer: {took:?}"
    );
    assert!(
        burnt < wait / 4,
        "the thread spun through its wait: {burnt:?} of CPU in {took:?}"
    );
    rig.driver.end();
}

/// A vCPU kicked to service its lane (a datagram due for retransmission
/// while its guest ran) reads what arrived first: an answer already there
/// is taken, not resent for, and everything waiting is read, not only up
/// to the first answer.
#[test]
fn a_kicked_direct_lane_reads_before_it_resends() {
    let rig = Rig::with_retransmit(Duration::from_millis(20));
    let slot = rig.request(1);
    assert_eq!(rig.take_request(), 1);
    rig.driver.end();
    rig.send_to_lane(&answer(1, 4));
    rig.send_to_lane(b"a stray datagram behind the answer");
    // Past the retransmission deadline, as when the engine kicks.
    std::thread::sleep(Duration::from_millis(60));
    rig.driver.service();
    assert_eq!(rig.ring.try_take(slot), Some((Status::Ok as u8, 4)));
    assert_eq!(
        get(&rig.stats().retransmits),
        0,
        "resent an answered request"
    );
    assert_eq!(get(&rig.stats().malformed), 1, "stopped at the answer");
    rig.server
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 2048];
    assert!(
        rig.server.recv_from(&mut buf).is_err(),
        "the server got another datagram"
    );
}
