//! The adversarial suite, XDP mode, tags on: while a well-behaved client
//! (the victim) writes to its counter and takes its interrupts, an
//! attacker in a third namespace on the same link (another registered
//! tenant, with a key of its own) sends thousands of frames derived from
//! valid requests by a seeded generator: sent as they are, with bits
//! flipped, truncated, with lying IPv4, UDP and record-count lengths,
//! with another VM, client or model id, replayed (its own requests, and
//! the victim's captured ones from the victim's spoofed address and
//! port), with forged tags, and with garbage payloads.
//!
//! What must hold: the victim sees every write applied exactly once
//! (its final read), every interrupt it raised delivered once, and only
//! answers and interrupts sealed under its key; and the counters add up:
//! the XDP program gave every frame one verdict, every frame it
//! redirected was received by the worker or counted as dropped at its
//! socket, and every frame the worker received has one outcome. Each
//! class of attack is seen in its counter (so the suite cannot pass
//! without exercising it).
//!
//! `DP_ADVERSARIAL_SEED=N` replays a run (the seed is printed);
//! `DP_ADVERSARIAL_FRAMES=N` changes the number of attack frames.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplane_control::config::{Mode, ModelConfig, ServerConfig};
use devplane_devmodels::counter::REG_IRQ;
use devplane_server::stats::WorkerSnapshot;
use devplane_testkit::host::{ServerSnapshot, ServerThread};
use devplane_testkit::keys::client_key;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::raw::{RawSender, frame_of, set_ipv4_checksum};
use devplane_testkit::tenants::{self, Tenant};
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::frame::{ETH_HLEN, Flow, PAYLOAD_OFFSET};
use devplane_wire::maps::Counter;
use devplane_wire::tag::{self, KeyRing, TagKey};
use devplane_wire::{
    Access, AccessSize, Ack, Datagram, HEADER_LEN, Header, Kind, Record, Request, RequestId,
    Status, TAG_LEN, datagram,
};

const PORT: u16 = 7703;
const SERVER: u32 = 1;
const VICTIM: u32 = 7;
const TENANT: u32 = 8;
const VM: u32 = 1;
const TENANT_VM: u32 = 2;
const HV: u32 = tenants::HYPERVISOR;
const MODEL: u32 = 100;
const PIO: u16 = 0x500;
/// The victim's operations: writes, and every `IRQ_EVERY`th an interrupt.
const OPS: u64 = 400;
const IRQ_EVERY: u64 = 40;

fn config(topo: &Topology, tenant_ip: std::net::Ipv4Addr) -> ServerConfig {
    let tenants = [
        Tenant {
            client: VICTIM,
            address: topo.client_ip(),
            vm: VM,
            key: Some(client_key(VICTIM)),
        },
        Tenant {
            client: TENANT,
            address: tenant_ip,
            vm: TENANT_VM,
            key: Some(client_key(TENANT)),
        },
    ];
    let counter = ModelConfig {
        pio_base: Some(PIO),
        line: Some(5),
        vm: Some(VM),
        ..ModelConfig::new(MODEL, "counter", 0)
    };
    tenants::server_config(
        topo,
        Mode::Xdp,
        "adv",
        SERVER,
        PORT,
        &tenants,
        vec![counter],
    )
}

/// A datagram of `kind` from `client` holding `recs`, sealed with `key`.
fn sealed(kind: Kind, client: u32, recs: &[Record], key: &TagKey) -> Vec<u8> {
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(&mut buf, Header::new(kind, MODEL, SERVER, client), recs).unwrap();
    let n = tag::seal(&mut buf, n, key).unwrap();
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

fn write() -> Access {
    Access::PioOut {
        port: PIO,
        size: AccessSize::B1,
        data: 1,
    }
}

fn raise() -> Access {
    Access::PioOut {
        port: PIO + REG_IRQ as u16,
        size: AccessSize::B1,
        data: 1,
    }
}

fn read() -> Access {
    Access::PioIn {
        port: PIO,
        size: AccessSize::B4,
    }
}

/// The well-behaved client: one socket, requests resent with the same
/// number until answered, interrupts acknowledged; everything it sends
/// is recorded (what an on-path attacker would capture).
struct Victim {
    sock: UdpSocket,
    server: SocketAddr,
    ring: KeyRing,
    key: TagKey,
    irqs: Vec<u64>,
    /// Interrupt datagrams received (resends included).
    irq_datagrams: usize,
    /// Acknowledge interrupts (off: as if every interrupt datagram were
    /// lost on its way, so the server resends).
    ack: bool,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Victim {
    fn send(&self, d: &[u8]) {
        self.sock.send_to(d, self.server).unwrap();
        let mut c = self.captured.lock().unwrap();
        if c.len() < 4096 {
            c.push(d.to_vec());
        }
    }

    fn call(&mut self, seq: u64, access: Access) -> (Status, u64) {
        let d = sealed(Kind::Request, VICTIM, &[req(VM, seq, access)], &self.key);
        for _ in 0..20 {
            self.send(&d);
            loop {
                let mut buf = [0u8; 2048];
                let Ok(n) = self.sock.recv(&mut buf) else {
                    break; // resend
                };
                let got = &buf[..n];
                assert_eq!(
                    tag::verify(got, &self.ring),
                    Ok(()),
                    "the victim received a datagram not sealed under its key"
                );
                let d = Datagram::parse(got).expect("parses");
                if d.kind() == Kind::Interrupt {
                    self.take_interrupts(&d);
                    continue;
                }
                match d.records().next() {
                    Some(Record::Response(r)) if r.id.seq == seq => return (r.status, r.data),
                    // A late answer to an earlier send, or to a replay.
                    Some(Record::Response(r)) if r.id.seq < seq => continue,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        panic!("no answer to {seq} after 20 sends");
    }

    fn take_interrupts(&mut self, d: &Datagram<'_>) {
        self.irq_datagrams += 1;
        if !self.ack {
            return;
        }
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
            let a = sealed(Kind::Ack, VICTIM, &[ack], &self.key);
            self.send(&a);
        }
    }

    /// Takes what arrives within the socket's timeout (interrupts).
    fn poll(&mut self) {
        let mut buf = [0u8; 2048];
        let Ok(got) = self.sock.recv(&mut buf) else {
            return;
        };
        let got = &buf[..got];
        assert_eq!(tag::verify(got, &self.ring), Ok(()));
        let d = Datagram::parse(got).expect("parses");
        if d.kind() == Kind::Interrupt {
            self.take_interrupts(&d);
        }
    }

    fn wait_interrupts(&mut self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.irqs.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} interrupts arrived",
                self.irqs.len()
            );
            let mut buf = [0u8; 2048];
            let Ok(got) = self.sock.recv(&mut buf) else {
                continue;
            };
            let got = &buf[..got];
            assert_eq!(tag::verify(got, &self.ring), Ok(()));
            let d = Datagram::parse(got).expect("parses");
            if d.kind() == Kind::Interrupt {
                self.take_interrupts(&d);
            }
        }
    }
}

/// xorshift64*: the attack's every choice, reproducible from its seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The attacker's frames, each derived from a valid request.
struct Forge {
    rng: Rng,
    tenant_key: TagKey,
    /// Its own flow, and the victim's (spoofed source address and port).
    own: Flow,
    spoofed: Flow,
    captured: Arc<Mutex<Vec<Vec<u8>>>>,
    seq: u64,
}

impl Forge {
    /// The next attack frame, and what kind it is (for the log).
    fn frame(&mut self) -> (Vec<u8>, &'static str) {
        self.seq += 1;
        let seq = self.seq;
        let own = || req(TENANT_VM, seq, read());
        let template = match self.rng.below(4) {
            // Its own valid request.
            0 => sealed(Kind::Request, TENANT, &[own()], &self.tenant_key),
            // The victim's VM under its own id and key (foreign).
            1 => sealed(
                Kind::Request,
                TENANT,
                &[req(VM, seq, write())],
                &self.tenant_key,
            ),
            // The victim's id and VM, sealed with the wrong key.
            2 => sealed(
                Kind::Request,
                VICTIM,
                &[req(VM, seq, write())],
                &self.tenant_key,
            ),
            // Acknowledging the victim's interrupts away.
            _ => sealed(
                Kind::Ack,
                TENANT,
                &[Record::Ack(Ack {
                    id: RequestId {
                        vm: VM,
                        hypervisor: HV,
                        vcpu: 0,
                        seq: u64::MAX,
                    },
                })],
                &self.tenant_key,
            ),
        };
        let mut payload = template;
        let mut flow = self.own;
        let what = match self.rng.below(9) {
            0 => "as is",
            1 => {
                // Replay a captured victim datagram from its address.
                let c = self.captured.lock().unwrap();
                if !c.is_empty() {
                    payload = c[self.rng.below(c.len() as u64) as usize].clone();
                    flow = self.spoofed;
                }
                "replayed victim datagram"
            }
            2 => {
                // Replay its own request with an old number.
                payload = sealed(
                    Kind::Request,
                    TENANT,
                    &[req(TENANT_VM, self.rng.below(seq) + 1, read())],
                    &self.tenant_key,
                );
                "replayed own request"
            }
            3 => {
                // Another VM, client or model id, sealed again under its
                // key (the tag is right, the ids are not).
                let at = match self.rng.below(3) {
                    0 => HEADER_LEN + 8, // the record's VM
                    1 => 12,             // the header's client
                    _ => 4,              // the header's model
                };
                let id = match self.rng.below(3) {
                    0 => VM,
                    1 => VICTIM,
                    _ => self.rng.next() as u32,
                };
                payload[at..at + 4].copy_from_slice(&id.to_le_bytes());
                let body = payload.len() - TAG_LEN;
                tag::seal(&mut payload, body, &self.tenant_key);
                "wrong id"
            }
            4 => {
                // A forged tag.
                let n = payload.len();
                for b in &mut payload[n - TAG_LEN..] {
                    *b = self.rng.next() as u8;
                }
                "forged tag"
            }
            5 => {
                // A garbage payload behind a devplane header's magic.
                let n = self.rng.below(200) as usize + 2;
                payload = (0..n).map(|_| self.rng.next() as u8).collect();
                payload[..2].copy_from_slice(b"DP");
                "garbage"
            }
            _ => "mutated frame",
        };
        let mut f = frame_of(&flow, &payload);
        if what == "mutated frame" {
            self.mutate(&mut f);
        }
        (f, what)
    }

    /// Bit flips, a truncation, a lying length field or a bad record
    /// field.
    fn mutate(&mut self, f: &mut Vec<u8>) {
        match self.rng.below(5) {
            0 => {
                for _ in 0..=self.rng.below(3) {
                    let at = self.rng.below(f.len() as u64) as usize;
                    f[at] ^= 1 << self.rng.below(8);
                }
                // Half the time past the IPv4 checksum check.
                if self.rng.below(2) == 0 {
                    set_ipv4_checksum(f);
                }
            }
            1 => {
                let n = ETH_HLEN + self.rng.below((f.len() - ETH_HLEN) as u64) as usize;
                f.truncate(n);
            }
            2 => {
                // IPv4 total length or UDP length.
                let (at, fix) = if self.rng.below(2) == 0 {
                    (ETH_HLEN + 2, true)
                } else {
                    (ETH_HLEN + 20 + 4, false)
                };
                let v = self.rng.next() as u16;
                f[at..at + 2].copy_from_slice(&v.to_be_bytes());
                if fix {
                    set_ipv4_checksum(f);
                }
            }
            3 => {
                // The first record's op, size, flags or status byte.
                let at = PAYLOAD_OFFSET + HEADER_LEN + self.rng.below(4) as usize;
                f[at] = self.rng.next() as u8;
            }
            _ => {
                // The record count.
                let at = PAYLOAD_OFFSET + 16;
                let v = self.rng.below(40) as u16;
                f[at..at + 2].copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// The victim's captured request datagram of number `seq`.
fn captured_request(captured: &Mutex<Vec<Vec<u8>>>, seq: u64) -> Vec<u8> {
    captured
        .lock()
        .unwrap()
        .iter()
        .rev()
        .find(|d| {
            Datagram::parse(d).is_ok_and(
                |d| matches!(d.records().next(), Some(Record::Request(r)) if r.id.seq == seq),
            )
        })
        .cloned()
        .expect("the victim's request was captured")
}

fn sum(s: &ServerSnapshot, f: fn(&WorkerSnapshot) -> u64) -> u64 {
    s.workers.iter().map(f).sum()
}

/// Every frame the worker received has one outcome.
fn worker_outcomes(w: &WorkerSnapshot) -> u64 {
    w.datagrams
        + w.malformed
        + w.bad_frames
        + w.bad_checksum
        + w.acks
        + w.foreign_vm
        + w.bad_tag
        + w.no_such_model
}

#[test]
fn xdp_mode_survives_thousands_of_mutated_frames() {
    let test = "xdp_mode_survives_thousands_of_mutated_frames";
    if !privilege::require(test, &[Capability::Root, Capability::Bpf]) {
        return;
    }
    let seed: u64 = std::env::var("DP_ADVERSARIAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0001);
    let frames: u64 = std::env::var("DP_ADVERSARIAL_FRAMES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5000);
    eprintln!("{test}: seed {seed} (DP_ADVERSARIAL_SEED), {frames} frames");
    let topo = match Topology::new("adv") {
        Ok(t) => t,
        Err(e) => {
            privilege::unavailable(test, &format!("cannot build the netns topology: {e}"));
            return;
        }
    };
    let attacker = topo.attacker().expect("a third namespace on the link");
    let srv = ServerThread::spawn(config(&topo, attacker.ip()), Some(topo.server_netns()))
        .expect("server starts");
    let server = SocketAddr::from((topo.server_ip(), PORT));
    let ip = topo.client_ip();
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let victim_port = sock.local_addr().unwrap().port();
    let captured = Arc::new(Mutex::new(Vec::new()));
    let key = client_key(VICTIM).0;
    let mut victim = Victim {
        sock,
        server,
        ring: KeyRing::new(key.clone()),
        key,
        irqs: Vec::new(),
        irq_datagrams: 0,
        ack: true,
        captured: captured.clone(),
    };
    let raw = RawSender::new(attacker.netns(), attacker.ifname(), topo.server_mac())
        .expect("an AF_PACKET socket in the attacker's namespace");
    let own = Flow {
        src_mac: attacker.mac(),
        dst_mac: topo.server_mac(),
        src_ip: attacker.ip().octets(),
        dst_ip: topo.server_ip().octets(),
        src_port: 40_001,
        dst_port: PORT,
    };
    let mut forge = Forge {
        rng: Rng(seed | 1),
        tenant_key: client_key(TENANT).0,
        own,
        spoofed: Flow {
            src_ip: topo.client_ip().octets(),
            src_port: victim_port,
            ..own
        },
        captured,
        seq: devplane_wire::first_seq(),
    };

    // The victim's first write is through before the attack starts.
    let seq0 = devplane_wire::first_seq();
    assert_eq!(victim.call(seq0, write()), (Status::Ok, 0));
    let before = srv.snapshot();
    let progress = Arc::new(AtomicUsize::new(0));
    let done = progress.clone();
    let victim_run = std::thread::spawn(move || {
        let mut raised = 0usize;
        let mut writes = 1u64;
        for i in 1..=OPS {
            let access = if i % IRQ_EVERY == 0 {
                raised += 1;
                raise()
            } else {
                writes += 1;
                write()
            };
            assert_eq!(victim.call(seq0 + i, access).0, Status::Ok, "op {i}");
            done.store(i as usize, Ordering::Relaxed);
        }
        victim.wait_interrupts(raised);
        let (status, count) = victim.call(seq0 + OPS + 1, read());
        (victim, status, count, writes, raised)
    });

    let mut kinds = std::collections::BTreeMap::<&str, u64>::new();
    let mut started_at = None;
    for i in 0..frames {
        let (f, what) = forge.frame();
        *kinds.entry(what).or_default() += 1;
        raw.send(&f).expect("send an attack frame");
        if started_at.is_none() {
            started_at = Some(progress.load(Ordering::Relaxed));
        }
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let at_end = progress.load(Ordering::Relaxed);
    let (victim, status, count, writes, raised) = victim_run.join().expect("the victim");
    eprintln!(
        "attack frames by kind: {kinds:?}; the victim was at op {} of {OPS} when the attack \
         started, {at_end} when it ended",
        started_at.unwrap_or(0)
    );
    assert!(
        started_at.is_some_and(|s| (s as u64) < OPS),
        "the victim finished before the attack started: nothing was tested concurrently"
    );

    // What the tenant sees.
    assert_eq!(status, Status::Ok);
    assert_eq!(count, writes, "a write lost or doubled");
    assert_eq!(victim.irqs.len(), raised, "an interrupt lost");

    // A replay cannot redirect interrupts: the victim raises one and
    // loses its datagram (no acknowledgement); a captured request of the
    // victim replayed from the attacker's MAC must not move where the
    // server resends it.
    let mut victim = victim;
    victim.ack = false;
    let seq = seq0 + OPS + 2;
    let before_irq = victim.irq_datagrams;
    assert_eq!(victim.call(seq, raise()).0, Status::Ok);
    let replay = captured_request(&forge.captured, seq);
    let spoof = frame_of(&forge.spoofed, &replay);
    let deadline = Instant::now() + Duration::from_secs(2);
    while victim.irq_datagrams == before_irq {
        assert!(Instant::now() < deadline, "the interrupt never came");
        victim.poll();
    }
    raw.send(&spoof).expect("send the replay");
    // Resends that left before the replay was taken may still come.
    let settle = Instant::now() + Duration::from_millis(100);
    while Instant::now() < settle {
        victim.poll();
    }
    let first = victim.irq_datagrams;
    victim.ack = true;
    let deadline = Instant::now() + Duration::from_secs(2);
    while victim.irq_datagrams == first {
        assert!(
            Instant::now() < deadline,
            "the server's resend of the interrupt went elsewhere after a replay"
        );
        victim.poll();
    }
    assert_eq!(victim.irqs.len(), raised + 1, "an interrupt lost");

    // The counters add up, once the worker has drained its ring.
    let balanced = |s: &ServerSnapshot| {
        let (Some(x1), Some(x0)) = (&s.xdp, &before.xdp) else {
            return false;
        };
        let d = |f: fn(&WorkerSnapshot) -> u64| sum(s, f) - sum(&before, f);
        x1.since(x0).get(Counter::Redirected)
            == d(|w| w.rx) + d(|w| w.xsk_rx_dropped) + d(|w| w.xsk_rx_ring_full)
            && d(|w| w.rx) == d(worker_outcomes)
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
    eprintln!("XDP: {:?}", x.nonzero().collect::<Vec<_>>());
    eprintln!(
        "worker: rx {} answered {} malformed {} bad_checksum {} bad_frames {} acks {} \
         foreign_vm {} bad_tag {} duplicates {} stale {} far_ahead {}; ring drops {}",
        d(|w| w.rx),
        d(|w| w.datagrams),
        d(|w| w.malformed),
        d(|w| w.bad_checksum),
        d(|w| w.bad_frames),
        d(|w| w.acks),
        d(|w| w.foreign_vm),
        d(|w| w.bad_tag),
        d(|w| w.duplicates),
        d(|w| w.stale),
        d(|w| w.far_ahead),
        d(|w| w.xsk_rx_dropped) + d(|w| w.xsk_rx_ring_full),
    );
    let verdicts: u64 = Counter::ALL
        .iter()
        .filter(|&&c| c != Counter::Rx)
        .map(|&c| x.get(c))
        .sum();
    assert_eq!(x.get(Counter::Rx), verdicts, "a frame without a verdict");
    assert!(
        x.get(Counter::Rx) >= frames,
        "the XDP program saw {} frames of the {frames} sent",
        x.get(Counter::Rx)
    );
    assert_eq!(
        x.get(Counter::Redirected),
        d(|w| w.rx) + d(|w| w.xsk_rx_dropped) + d(|w| w.xsk_rx_ring_full),
        "redirected frames unaccounted for"
    );
    assert_eq!(
        d(|w| w.rx),
        d(worker_outcomes),
        "a frame the worker received without an outcome"
    );
    // Every class of attack reached its check.
    for (what, n) in [
        ("bad tag", d(|w| w.bad_tag)),
        (
            "foreign VM",
            d(|w| w.foreign_vm) + x.get(Counter::DropForeignVm),
        ),
        ("replay answered from the window", d(|w| w.duplicates)),
        ("malformed", d(|w| w.malformed)),
        (
            "lying length",
            x.get(Counter::DropTruncated) + x.get(Counter::DropBadLength),
        ),
        ("bad record count", x.get(Counter::DropBadCount)),
        ("spoofed client", x.get(Counter::DropSpoofed)),
        ("unknown model", x.get(Counter::DropUnknownModel)),
    ] {
        assert!(n > 0, "no {what} drop: that attack was not exercised");
    }
    srv.stop();
    drop(attacker);
}
