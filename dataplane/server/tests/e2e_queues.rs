//! End to end on a multi-queue device: a server in XDP mode on a veth with
//! 4 RX and 4 TX queues (as a NIC's RSS spreads flows over its queues),
//! two workers, each with a socket on every queue. Requests from many
//! client sockets (flows) land on every queue, and each must be served
//! exactly once: every write applied once (the model's sum is exactly the
//! sum written, retransmissions included), every request answered, and the
//! per-queue counters (`dpctl stats`: `queue_N_redirected` of the XDP
//! program, `rx_queue_N` of each worker) show every queue carried traffic.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_control::proto::{Request as CtlRequest, Response};
use devplane_devmodels::counter::{REG_COUNT, REG_SUM};
use devplane_server::Attach;
use devplane_server::afxdp::XskMode;
use devplane_testkit::host::ServerThread;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::maps::Counter;
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
};

const PORT: u16 = 7700;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const VM: u32 = 1;
const HV: u32 = 3;
const QUEUES: u32 = 4;
/// Counter models: one per worker.
const MODELS: [(u32, u16, usize); 2] = [(100, 0x500, 0), (200, 0x600, 1)];
/// Client sockets opened at first; more (up to `MAX_FLOWS`) while a
/// queue has seen nothing.
const FLOWS: usize = 16;
const MAX_FLOWS: usize = 64;
/// Writes per flow and model.
const WRITES: u64 = 8;

fn config(topo: &Topology) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![0, 1],
            pin_dir: Some(
                format!("/sys/fs/bpf/devplane-test-queues-{}", std::process::id()).into(),
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
            address: topo.client_ip(),
            budget: None,
        }],
        vms: vec![VmConfig {
            id: VM,
            client: CLIENT,
            hypervisor: HV,
        }],
        models: MODELS
            .iter()
            .map(|&(id, port, worker)| ModelConfig {
                id,
                kind: "counter".into(),
                worker,
                line: None,
                vm: None,
                pio_base: Some(port),
                mmio_base: None,
                backing: None,
            })
            .collect(),
    }
}

/// One client flow: its own socket (so its own source port and TX queue)
/// and its own vCPU (so its own duplicate window).
struct Flow {
    sock: UdpSocket,
    server: SocketAddr,
    vcpu: u16,
    seq: u64,
}

impl Flow {
    fn new(topo: &Topology, vcpu: u16) -> Flow {
        let ip = topo.client_ip();
        let sock = topo
            .run(Side::Client, move || UdpSocket::bind((ip, 0)))
            .expect("enter client netns")
            .expect("bind client socket");
        sock.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Flow {
            sock,
            server: SocketAddr::from((topo.server_ip(), PORT)),
            vcpu,
            seq: 0,
        }
    }

    /// One access to `model`, sent again (same bytes, as a client
    /// retransmits) every 200 ms unanswered and, with `twice`, once more
    /// right away (a duplicate the server must answer without applying).
    /// Returns the answer's (status, data).
    fn call(&mut self, model: u32, access: Access, twice: bool) -> (Status, u64) {
        self.seq += 1;
        let id = RequestId {
            vm: VM,
            hypervisor: HV,
            vcpu: self.vcpu,
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
            Header::new(Kind::Request, model, SERVER, CLIENT),
            &[rec],
        )
        .unwrap();
        bytes.truncate(n);
        self.sock.send_to(&bytes, self.server).unwrap();
        if twice {
            self.sock.send_to(&bytes, self.server).unwrap();
        }
        let until = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 2048];
        let answer = loop {
            assert!(
                Instant::now() < until,
                "flow {}: no answer in 10 s",
                self.vcpu
            );
            let Ok((n, _)) = self.sock.recv_from(&mut buf) else {
                self.sock.send_to(&bytes, self.server).unwrap();
                continue;
            };
            let d = Datagram::parse(&buf[..n]).expect("answer parses");
            assert_eq!(d.kind(), Kind::Response);
            match d.records().next() {
                // The answer to an earlier request's duplicate.
                Some(Record::Response(r)) if r.id.seq < id.seq => continue,
                Some(Record::Response(r)) => {
                    assert_eq!(r.id, id, "misrouted answer");
                    break (r.status, r.data);
                }
                other => panic!("unexpected {other:?}"),
            }
        };
        if twice {
            // Take the duplicate's answer too, so that the next call does
            // not mistake it (it names this sequence number).
            let end = Instant::now() + Duration::from_secs(5);
            while Instant::now() < end {
                if let Ok((n, _)) = self.sock.recv_from(&mut buf) {
                    let d = Datagram::parse(&buf[..n]).expect("answer parses");
                    if let Some(Record::Response(r)) = d.records().next()
                        && r.id == id
                    {
                        break;
                    }
                }
            }
        }
        answer
    }
}

/// A write to the counter's count register: counts one and adds `data`
/// to the sum.
fn write(port: u16, data: u32) -> Access {
    Access::PioOut {
        port: port + REG_COUNT as u16,
        size: AccessSize::B4,
        data,
    }
}

fn read(port: u16, reg: u64) -> Access {
    Access::PioIn {
        port: port + reg as u16,
        size: AccessSize::B4,
    }
}

fn counters(path: &std::path::Path) -> (BTreeMap<String, u64>, Vec<BTreeMap<String, u64>>) {
    let r = devplane_control::proto::call(path, &CtlRequest::Stats, Duration::from_secs(5))
        .expect("stats answered");
    let Response::Stats { xdp, workers, .. } = r else {
        panic!("unexpected {r:?}");
    };
    (
        xdp.into_iter().collect(),
        workers
            .into_iter()
            .map(|w| w.counters.into_iter().collect())
            .collect(),
    )
}

#[test]
fn xdp_mode_serves_every_queue_exactly_once() {
    let test = "e2e_queues";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let topo = match Topology::with_queues("queues", QUEUES) {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let mut srv =
        ServerThread::spawn(config(&topo), Some(topo.server_netns())).expect("server starts");
    assert_eq!(srv.attach_mode(), Some(Attach::Driver));
    let layout = srv
        .call(|s| s.xsk_layout())
        .flatten()
        .expect("XDP mode has a layout");
    eprintln!("e2e_queues: {layout}");
    assert_eq!(layout.queues, QUEUES, "every queue served: {layout}");
    assert_eq!((layout.device.rx, layout.device.tx), (QUEUES, QUEUES));
    // veth has no AF_XDP zero-copy: the server tried it, fell back to
    // copy mode and says why.
    assert_eq!(layout.mode, XskMode::Copy);
    assert!(layout.zero_copy_refused.is_some(), "{layout}");
    let sock_path = std::env::temp_dir().join(format!("dp-queues-{}.sock", std::process::id()));
    srv.listen(&sock_path).expect("control socket");

    // Flows until every queue has carried requests (each flow's hash
    // picks a queue; 16 flows miss one of 4 queues with probability
    // about 4 * (3/4)^16 = 4%, 64 with about 4e-8).
    let mut flows: Vec<Flow> = Vec::new();
    let mut sums = [0u64; MODELS.len()];
    let mut writes = [0u64; MODELS.len()];
    let mut next_value = 1u32;
    loop {
        let start = flows.len();
        let want = if start == 0 { FLOWS } else { start + 8 };
        while flows.len() < want.min(MAX_FLOWS) {
            let vcpu = flows.len() as u16;
            flows.push(Flow::new(&topo, vcpu));
        }
        for f in &mut flows[start..] {
            for (m, &(model, port, _)) in MODELS.iter().enumerate() {
                for i in 0..WRITES {
                    // Every other flow sends each write twice: the
                    // duplicate crosses the same queue and must not be
                    // applied again.
                    let twice = f.vcpu % 2 == 1 && i % 4 == 0;
                    let v = next_value;
                    next_value += 1;
                    assert_eq!(f.call(model, write(port, v), twice), (Status::Ok, 0));
                    sums[m] += u64::from(v);
                    writes[m] += 1;
                }
            }
        }
        let q = srv.snapshot().queues.expect("queue counters");
        if q.redirected.iter().all(|&n| n > 0) || flows.len() >= MAX_FLOWS {
            break;
        }
    }

    // Exactly once: each model counted every write once and summed
    // exactly what was written.
    let mut reader = Flow::new(&topo, MAX_FLOWS as u16);
    for (m, &(model, port, _)) in MODELS.iter().enumerate() {
        assert_eq!(
            reader.call(model, read(port, REG_COUNT), false),
            (Status::Ok, writes[m]),
            "model {model}: writes applied"
        );
        assert_eq!(
            reader.call(model, read(port, REG_SUM), false),
            (Status::Ok, sums[m] & 0xffff_ffff),
            "model {model}: sum of what was written"
        );
    }

    // Every queue carried requests, and each worker received on every
    // queue; the XDP program redirected as many frames as the workers
    // received, queue by queue.
    let snap = srv.snapshot();
    let q = snap.queues.clone().expect("queue counters");
    eprintln!(
        "e2e_queues: {} flows; redirected per queue {:?}, per worker per queue {:?}",
        flows.len(),
        q.redirected,
        q.served
    );
    assert_eq!(q.redirected.len(), QUEUES as usize);
    assert!(
        q.redirected.iter().all(|&n| n > 0),
        "a queue carried nothing: {:?}",
        q.redirected
    );
    for (w, per_queue) in q.served.iter().enumerate() {
        assert!(
            per_queue.iter().all(|&n| n > 0),
            "worker {w} got nothing on a queue: {per_queue:?}"
        );
    }
    for queue in 0..QUEUES as usize {
        let served: u64 = q.served.iter().map(|w| w[queue]).sum();
        assert_eq!(served, q.redirected[queue], "queue {queue}");
    }
    let xdp = snap.xdp.expect("xdp counters");
    assert_eq!(
        xdp.get(Counter::Redirected),
        q.redirected.iter().sum::<u64>()
    );
    assert_eq!(xdp.get(Counter::DropNoSocket), 0);
    let dups: u64 = snap.workers.iter().map(|w| w.duplicates).sum();
    assert!(dups > 0, "the duplicates were answered from the window");
    for w in &snap.workers {
        assert_eq!(w.xsk_rx_dropped, 0, "{w:?}");
    }

    // The same counters through the control socket (`dpctl stats`).
    let (xdp, workers) = counters(&sock_path);
    for queue in 0..QUEUES as usize {
        let redirected = xdp
            .get(&format!("queue_{queue}_redirected"))
            .copied()
            .unwrap_or_default();
        assert!(redirected > 0, "queue {queue}: {xdp:?}");
        for (w, c) in workers.iter().enumerate() {
            assert!(
                c.get(&format!("rx_queue_{queue}"))
                    .copied()
                    .unwrap_or_default()
                    > 0,
                "worker {w}, queue {queue}: {c:?}"
            );
        }
    }
    srv.stop();
    let _ = std::fs::remove_file(&sock_path);
}
