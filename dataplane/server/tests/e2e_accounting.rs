//! End to end, XDP mode: frames with wrong checksums are dropped and
//! counted by the worker, and under a flood every frame the XDP program
//! redirected is either received by a worker or counted as dropped at its
//! AF_XDP socket (`XDP_STATISTICS`).

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_server::stats::WorkerSnapshot;
use devplane_testkit::host::{ServerSnapshot, ServerThread};
use devplane_testkit::privilege::Capability;
use devplane_testkit::raw::{RawSender, frame_of, set_udp_checksum};
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::frame::{ETH_HLEN, Flow, IPV4_MIN_HLEN};
use devplane_wire::maps::Counter;
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
};

const PORT: u16 = 7700;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const VM: u32 = 1;
const HV: u32 = 3;
const MODEL: u32 = 100;
const PIO: u16 = 0x500;

fn config(topo: &Topology, tag: &str, workers: Vec<usize>, batch: u32) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers,
            pin_dir: Some(format!("/sys/fs/bpf/devplane-test-{tag}-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            spin_budget: 0,
            idle_sleep_us: 1000,
            batch,
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
            pio_base: Some(PIO),
            ..ModelConfig::new(MODEL, "counter", 0)
        }],
    }
}

fn setup(test: &str, tag: &str) -> Option<Topology> {
    Topology::for_test(test, &[Capability::Root, Capability::Bpf], tag)
}

fn request(seq: u64, access: Access) -> Vec<u8> {
    let rec = Record::Request(Request {
        id: RequestId {
            vm: VM,
            hypervisor: HV,
            vcpu: 0,
            seq,
        },
        access,
        flags: 0,
    });
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(
        &mut buf,
        Header::new(Kind::Request, MODEL, SERVER, CLIENT),
        &[rec],
    )
    .unwrap();
    buf.truncate(n);
    buf
}

fn write(data: u32) -> Access {
    Access::PioOut {
        port: PIO,
        size: AccessSize::B1,
        data,
    }
}

fn read() -> Access {
    Access::PioIn {
        port: PIO,
        size: AccessSize::B4,
    }
}

/// A UDP socket in the client namespace at the client's address.
fn client_socket(topo: &Topology) -> UdpSocket {
    let ip = topo.client_ip();
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))
        .expect("enter client netns")
        .expect("bind client socket");
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    sock
}

/// Sends `request` until it is answered (the first frames after a server
/// starts may meet a loaded machine); returns the answer.
fn call(sock: &UdpSocket, server: SocketAddr, request: &[u8]) -> (Status, u64) {
    for _ in 0..10 {
        sock.send_to(request, server).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok(n) = sock.recv(&mut buf) {
            let d = Datagram::parse(&buf[..n]).expect("answer parses");
            if let Some(Record::Response(r)) = d.records().next() {
                return (r.status, r.data);
            }
        }
    }
    panic!("no answer after 10 sends");
}

/// Sends `frame` (request number `seq`) from `raw` until its answer
/// reaches `sock`; returns the answer (answers to earlier resends of
/// other numbers are skipped).
fn raw_call(raw: &RawSender, sock: &UdpSocket, frame: &[u8], seq: u64) -> (Status, u64) {
    for _ in 0..10 {
        raw.send(frame).expect("send a raw frame");
        let mut buf = [0u8; 2048];
        while let Ok(n) = sock.recv(&mut buf) {
            let d = Datagram::parse(&buf[..n]).expect("answer parses");
            match d.records().next() {
                Some(Record::Response(r)) if r.id.seq == seq => return (r.status, r.data),
                _ => continue,
            }
        }
    }
    panic!("no answer to {seq} after 10 sends");
}

fn expect_silence(sock: &UdpSocket) {
    sock.set_read_timeout(Some(Duration::from_millis(150)))
        .unwrap();
    let mut buf = [0u8; 2048];
    if let Ok(n) = sock.recv(&mut buf) {
        panic!("unexpected answer: {:?}", Datagram::parse(&buf[..n]));
    }
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
}

fn sum(s: &ServerSnapshot, f: fn(&WorkerSnapshot) -> u64) -> u64 {
    s.workers.iter().map(f).sum()
}

/// A wrong IPv4 header checksum or a wrong non-zero UDP checksum: the
/// frame is dropped and counted, its write never applied; a right
/// non-zero UDP checksum and no UDP checksum are both served.
#[test]
fn xdp_mode_drops_bad_checksums() {
    let Some(topo) = setup("e2e_accounting_checksums", "ck") else {
        return;
    };
    let srv = ServerThread::spawn(config(&topo, "ck", vec![0], 64), Some(topo.server_netns()))
        .expect("server starts");
    let sock = client_socket(&topo);
    let server = SocketAddr::from((topo.server_ip(), PORT));
    assert_eq!(call(&sock, server, &request(1, write(1))), (Status::Ok, 0));
    let flow = Flow {
        src_mac: topo.client_mac(),
        dst_mac: topo.server_mac(),
        src_ip: topo.client_ip().octets(),
        dst_ip: topo.server_ip().octets(),
        src_port: sock.local_addr().unwrap().port(),
        dst_port: PORT,
    };
    let raw = RawSender::new(topo.client_netns(), topo.client_ifname(), topo.server_mac())
        .expect("an AF_PACKET socket in the client's namespace");

    let mut bad_ip = frame_of(&flow, &request(2, write(1)));
    bad_ip[ETH_HLEN + 10] ^= 0x01;
    raw.send(&bad_ip).unwrap();
    expect_silence(&sock);
    let mut bad_udp = frame_of(&flow, &request(3, write(1)));
    set_udp_checksum(&mut bad_udp);
    bad_udp[ETH_HLEN + IPV4_MIN_HLEN + 7] ^= 0x01;
    raw.send(&bad_udp).unwrap();
    expect_silence(&sock);

    let mut good = frame_of(&flow, &request(4, write(1)));
    set_udp_checksum(&mut good);
    assert_eq!(
        raw_call(&raw, &sock, &good, 4),
        (Status::Ok, 0),
        "a right UDP checksum"
    );
    assert_eq!(
        raw_call(&raw, &sock, &frame_of(&flow, &request(5, read())), 5),
        (Status::Ok, 2),
        "exactly the writes with right checksums applied"
    );
    let s = srv.snapshot();
    assert_eq!(sum(&s, |w| w.bad_checksum), 2, "{s:?}");
    srv.stop();
}

/// Floods one worker that takes one frame per poll: every frame the XDP
/// program redirected is received by the worker or counted as dropped at
/// its socket, and every frame the program saw has one verdict.
#[test]
fn xdp_mode_accounts_for_every_frame_under_flood() {
    let Some(topo) = setup("e2e_accounting_flood", "fl") else {
        return;
    };
    let srv = ServerThread::spawn(config(&topo, "fl", vec![0], 1), Some(topo.server_netns()))
        .expect("server starts");
    let sock = client_socket(&topo);
    let server = SocketAddr::from((topo.server_ip(), PORT));
    assert_eq!(call(&sock, server, &request(1, read())), (Status::Ok, 0));
    let before = srv.snapshot();
    let flood = request(2, read());
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let s = client_socket(&topo);
            let flood = flood.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                for _ in 0..100_000 {
                    if s.send_to(&flood, server).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    // Wait for the worker to drain its ring: the counts only grow, and
    // they add up once every frame is through (never, if a drop went
    // uncounted). A loaded machine may hold the worker off for a while.
    let balanced = |s: &ServerSnapshot| {
        let (Some(x1), Some(x0)) = (&s.xdp, &before.xdp) else {
            return false;
        };
        let d = |f: fn(&WorkerSnapshot) -> u64| sum(s, f) - sum(&before, f);
        x1.since(x0).get(Counter::Redirected)
            == d(|w| w.rx) + d(|w| w.xsk_rx_dropped) + d(|w| w.xsk_rx_ring_full)
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = srv.snapshot();
    while !balanced(&last) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        last = srv.snapshot();
    }
    let (Some(x1), Some(x0)) = (&last.xdp, &before.xdp) else {
        panic!("no XDP counters");
    };
    let x = x1.since(x0);
    let d = |f: fn(&WorkerSnapshot) -> u64| sum(&last, f) - sum(&before, f);
    let received = d(|w| w.rx);
    let ring_drops = d(|w| w.xsk_rx_dropped) + d(|w| w.xsk_rx_ring_full);
    eprintln!(
        "flood: sent {sent}, XDP saw {}, redirected {}, worker received {received}, \
         dropped at the socket {} (fill ring empty {}, RX ring full {})",
        x.get(Counter::Rx),
        x.get(Counter::Redirected),
        ring_drops,
        d(|w| w.xsk_rx_dropped),
        d(|w| w.xsk_rx_ring_full),
    );
    let verdicts: u64 = Counter::ALL
        .iter()
        .filter(|&&c| c != Counter::Rx)
        .map(|&c| x.get(c))
        .sum();
    assert_eq!(x.get(Counter::Rx), verdicts, "a frame without a verdict");
    assert!(x.get(Counter::Redirected) > 0);
    assert_eq!(
        x.get(Counter::Redirected),
        received + ring_drops,
        "redirected frames unaccounted for"
    );
    assert!(
        ring_drops > 0,
        "the flood never filled the worker's rings: the test checked nothing"
    );
    srv.stop();
}

/// A worker answering full batches (64 frames a turn) under a flood of
/// valid requests fills its TX ring faster than one kick sends it (copy
/// mode sends at most 32 frames per `sendto`); when the flood stops, the
/// frames still on the TX ring and those completed but not yet reaped
/// must go back to the fill ring by themselves: a request sent after the
/// flood is answered, and every frame is back in circulation. (Before,
/// the TX ring was kicked only when a turn queued new answers, and the
/// completion ring was reaped only while the TX ring had unsent frames:
/// with the fill ring empty, nothing arrived, nothing was kicked, and the
/// worker stalled.)
#[test]
fn xdp_mode_worker_recovers_its_frames_after_a_flood() {
    let Some(topo) = setup("e2e_accounting_recover", "rc") else {
        return;
    };
    let srv = ServerThread::spawn(config(&topo, "rc", vec![0], 64), Some(topo.server_netns()))
        .expect("server starts");
    let sock = client_socket(&topo);
    let server = SocketAddr::from((topo.server_ip(), PORT));
    assert_eq!(call(&sock, server, &request(1, read())), (Status::Ok, 0));
    let flood = request(1, read());
    let senders: Vec<_> = (0..2)
        .map(|_| {
            let s = client_socket(&topo);
            let flood = flood.clone();
            std::thread::spawn(move || {
                for _ in 0..100_000 {
                    let _ = s.send_to(&flood, server);
                }
            })
        })
        .collect();
    for t in senders {
        t.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    let after_flood = srv.snapshot();
    eprintln!(
        "after the flood: tx {} tx_full {} fill ring empty {} rx dropped {}",
        sum(&after_flood, |w| w.tx),
        sum(&after_flood, |w| w.tx_full),
        sum(&after_flood, |w| w.xsk_fill_ring_empty),
        sum(&after_flood, |w| w.xsk_rx_dropped),
    );
    // The worker is not wedged: fresh requests are answered, many of them
    // (more than one fill ring's worth would not fit if frames leaked).
    for seq in 2..3000u64 {
        assert_eq!(
            call(&sock, server, &request(seq, read())).0,
            Status::Ok,
            "request {seq} after the flood"
        );
    }
    srv.stop();
}
