//! Runs the real XDP program with BPF_PROG_TEST_RUN on crafted frames and
//! checks the verdict and the per-CPU counters for every path.

use aya::programs::{TestRun, TestRunOptions};
use devplane_server::xdp::{Program, Stats};
use devplane_testkit::privilege::{Capability, require};
use devplane_wire::frame::{self, ETH_HLEN, Flow};
use devplane_wire::maps::{
    CONFIG_CHECK_CLIENT, CONFIG_REDIRECT, ClientEntry, Config, Counter, ROUTE_FORWARD, ROUTE_LOCAL,
    Route, VmEntry,
};
use devplane_wire::record::{Access, AccessSize, Request, RequestId};
use devplane_wire::{Header, Kind, Record, datagram};

const XDP_ABORTED: u32 = 0;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const PORT: u16 = 7700;
const MODEL: u32 = 42;
const CLIENT: u32 = 7;
const CLIENT_IP: [u8; 4] = [10, 99, 0, 1];

fn flow() -> Flow {
    Flow {
        src_mac: [2, 0, 0, 0, 0, 1],
        dst_mac: [2, 0, 0, 0, 0, 2],
        src_ip: CLIENT_IP,
        dst_ip: [10, 99, 0, 2],
        src_port: 40000,
        dst_port: PORT,
    }
}

fn request(i: u64) -> Record {
    Record::Request(Request {
        id: RequestId {
            vm: 1,
            hypervisor: 1,
            vcpu: 0,
            seq: i,
        },
        access: Access::PioOut {
            port: 0x3f8,
            size: AccessSize::B1,
            data: 0x41,
        },
        flags: 0,
    })
}

/// A request datagram of `n` records; for other kinds, the same bytes with
/// the kind byte changed (what a confused or hostile sender would send).
fn payload(kind: Kind, model: u32, client: u32, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let recs: Vec<Record> = (0..n as u64).map(request).collect();
    let len = datagram::encode(
        &mut buf,
        Header::new(Kind::Request, model, 1, client),
        &recs,
    )
    .unwrap();
    buf[devplane_wire::header::OFF_KIND] = kind as u8;
    buf.truncate(len);
    buf
}

fn udp_frame(flow: &Flow, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; frame::PAYLOAD_OFFSET + payload.len()];
    let n = frame::write_headers(&mut f, flow, payload.len()).unwrap();
    f[frame::PAYLOAD_OFFSET..n].copy_from_slice(payload);
    f
}

fn valid_frame() -> Vec<u8> {
    udp_frame(&flow(), &payload(Kind::Request, MODEL, CLIENT, 2))
}

struct Harness {
    prog: Program,
}

impl Harness {
    fn new(test: &str, flags: u32) -> Option<Harness> {
        if !require(test, &[Capability::Root, Capability::Bpf]) {
            return None;
        }
        let mut prog = Program::load(None).expect("load the XDP program");
        prog.set_config(Config {
            port: PORT,
            pad: 0,
            server: 1,
            flags,
        })
        .unwrap();
        let route = Route {
            worker: 0,
            server: 1,
            flags: ROUTE_LOCAL,
            ..Default::default()
        };
        prog.routes().unwrap().insert(MODEL, route, 0).unwrap();
        let client = ClientEntry {
            ip: CLIENT_IP,
            ..Default::default()
        };
        prog.clients().unwrap().insert(CLIENT, client, 0).unwrap();
        // VM 1 (every crafted record's) is the client's.
        let vm = VmEntry {
            client: CLIENT,
            hypervisor: 1,
            flags: 0,
        };
        prog.vms().unwrap().insert(1, vm, 0).unwrap();
        Some(Harness { prog })
    }

    /// Runs `frame` once; returns the verdict and the counters it moved.
    fn run(&mut self, frame: &[u8]) -> (u32, Stats) {
        let before = self.prog.stats().unwrap();
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        let res = self
            .prog
            .xdp()
            .unwrap()
            .test_run(opts)
            .expect("BPF_PROG_TEST_RUN");
        let delta = self.prog.stats().unwrap().since(&before);
        (res.return_value, delta)
    }

    /// Asserts the verdict and that exactly `Rx` and `counter` moved by one.
    fn expect(&mut self, what: &str, frame: &[u8], action: u32, counter: Counter) {
        let (got, delta) = self.run(frame);
        assert_eq!(got, action, "{what}: verdict");
        let mut want = Stats::default();
        want.0[Counter::Rx as usize] = 1;
        want.0[counter as usize] += 1;
        assert_eq!(
            delta,
            want,
            "{what}: counters moved {:?}",
            delta.nonzero().collect::<Vec<_>>()
        );
        eprintln!(
            "BPF_PROG_TEST_RUN {what}: verdict {got}, {}",
            counter.name()
        );
    }
}

#[test]
fn valid_request_is_routed() {
    let Some(mut h) = Harness::new("valid_request_is_routed", 0) else {
        return;
    };
    h.expect(
        "valid request",
        &valid_frame(),
        XDP_PASS,
        Counter::PassRouted,
    );
    let one = udp_frame(&flow(), &payload(Kind::Request, MODEL, CLIENT, 1));
    h.expect("one record", &one, XDP_PASS, Counter::PassRouted);
    let max = devplane_wire::MAX_RECORDS;
    let full = udp_frame(&flow(), &payload(Kind::Request, MODEL, CLIENT, max));
    h.expect("full datagram", &full, XDP_PASS, Counter::PassRouted);
    // Acks (of interrupts) travel client -> server too.
    let ack = udp_frame(&flow(), &payload(Kind::Ack, MODEL, CLIENT, 1));
    h.expect("ack kind", &ack, XDP_PASS, Counter::PassRouted);
}

#[test]
fn truncated_at_every_layer_is_dropped() {
    let Some(mut h) = Harness::new("truncated_at_every_layer_is_dropped", 0) else {
        return;
    };
    let f = valid_frame();
    // The kernel itself refuses test input shorter than an Ethernet header.
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&f[..ETH_HLEN - 1]);
    assert!(
        h.prog.xdp().unwrap().test_run(opts).is_err(),
        "kernel accepted a 13-byte frame"
    );
    h.expect(
        "ethernet only",
        &f[..ETH_HLEN],
        XDP_DROP,
        Counter::DropTruncated,
    );
    h.expect(
        "ipv4 header cut",
        &f[..ETH_HLEN + 10],
        XDP_DROP,
        Counter::DropTruncated,
    );
    h.expect(
        "udp header cut",
        &f[..ETH_HLEN + 20 + 4],
        XDP_DROP,
        Counter::DropTruncated,
    );
    // Headers intact but the frame shorter than the IPv4 total length.
    h.expect(
        "payload cut",
        &f[..f.len() - 10],
        XDP_DROP,
        Counter::DropTruncated,
    );
    // A devplane payload shorter than the devplane header.
    let p = payload(Kind::Request, MODEL, CLIENT, 1);
    h.expect(
        "devplane header cut",
        &udp_frame(&flow(), &p[..10]),
        XDP_DROP,
        Counter::DropTruncated,
    );
    // Count says 2, one record present.
    let mut p = payload(Kind::Request, MODEL, CLIENT, 2);
    p.truncate(p.len() - devplane_wire::RECORD_LEN);
    h.expect(
        "records cut",
        &udp_frame(&flow(), &p),
        XDP_DROP,
        Counter::DropBadCount,
    );
    // Count zero, and count beyond the maximum.
    let mut p = payload(Kind::Request, MODEL, CLIENT, 1);
    p[devplane_wire::header::OFF_COUNT] = 0;
    h.expect(
        "count zero",
        &udp_frame(&flow(), &p),
        XDP_DROP,
        Counter::DropBadCount,
    );
    p[devplane_wire::header::OFF_COUNT] = 37;
    h.expect(
        "count too big",
        &udp_frame(&flow(), &p),
        XDP_DROP,
        Counter::DropBadCount,
    );
    // UDP length larger than the IPv4 payload.
    let mut f2 = valid_frame();
    let ulen_off = ETH_HLEN + 20 + 4;
    f2[ulen_off..ulen_off + 2].copy_from_slice(&5000u16.to_be_bytes());
    h.expect("udp length lies", &f2, XDP_DROP, Counter::DropBadLength);
    // IHL below 5.
    let mut f3 = valid_frame();
    f3[ETH_HLEN] = 0x44;
    h.expect("ihl 4", &f3, XDP_DROP, Counter::DropBadLength);
}

#[test]
fn bad_header_fields_are_dropped() {
    let Some(mut h) = Harness::new("bad_header_fields_are_dropped", 0) else {
        return;
    };
    let mut p = payload(Kind::Request, MODEL, CLIENT, 1);
    p[0] = b'X';
    h.expect(
        "bad magic",
        &udp_frame(&flow(), &p),
        XDP_DROP,
        Counter::DropBadMagic,
    );
    let mut p = payload(Kind::Request, MODEL, CLIENT, 1);
    p[devplane_wire::header::OFF_VERSION] = 9;
    h.expect(
        "bad version",
        &udp_frame(&flow(), &p),
        XDP_DROP,
        Counter::DropBadVersion,
    );
    for kind in [Kind::Response, Kind::Interrupt] {
        let f = udp_frame(&flow(), &payload(kind, MODEL, CLIENT, 1));
        h.expect(
            "kind a server never receives",
            &f,
            XDP_DROP,
            Counter::DropBadKind,
        );
    }
    let mut p = payload(Kind::Request, MODEL, CLIENT, 1);
    p[devplane_wire::header::OFF_KIND] = 200;
    h.expect(
        "unknown kind",
        &udp_frame(&flow(), &p),
        XDP_DROP,
        Counter::DropBadKind,
    );
    let f = udp_frame(&flow(), &payload(Kind::Request, MODEL + 1, CLIENT, 1));
    h.expect("unknown model", &f, XDP_DROP, Counter::DropUnknownModel);
}

#[test]
fn foreign_traffic_passes_untouched() {
    let Some(mut h) = Harness::new("foreign_traffic_passes_untouched", 0) else {
        return;
    };
    let mut other = flow();
    other.dst_port = 53;
    let f = udp_frame(&other, &payload(Kind::Request, MODEL, CLIENT, 1));
    h.expect("other udp port", &f, XDP_PASS, Counter::PassOtherPort);
    // TCP.
    let mut f = valid_frame();
    f[ETH_HLEN + 9] = 6;
    h.expect("tcp", &f, XDP_PASS, Counter::PassNotUdp);
    // A first fragment (more-fragments bit set).
    let mut f = valid_frame();
    f[ETH_HLEN + 6] = 0x20;
    h.expect("fragment", &f, XDP_PASS, Counter::PassFragment);
    // ARP request.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
    arp.extend_from_slice(&[
        0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 99, 0, 1, 0, 0, 0, 0, 0, 0, 10, 99, 0, 2,
    ]);
    h.expect("arp", &arp, XDP_PASS, Counter::PassNotIpv4);
    // IPv6/UDP to the devplane port.
    let mut v6 = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x86, 0xdd];
    v6.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
    v6.extend_from_slice(&[0u8; 32]);
    v6.extend_from_slice(&[0x9c, 0x40, 0x1e, 0x14, 0, 8, 0, 0]);
    h.expect("ipv6", &v6, XDP_PASS, Counter::PassNotIpv4);
    // A VLAN-tagged devplane frame: not parsed, handed to the stack.
    let f = valid_frame();
    let mut vlan = f[..12].to_vec();
    vlan.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    vlan.extend_from_slice(&f[12..]);
    h.expect("vlan tagged", &vlan, XDP_PASS, Counter::PassNotIpv4);
}

#[test]
fn ipv4_options_are_skipped() {
    let Some(mut h) = Harness::new("ipv4_options_are_skipped", 0) else {
        return;
    };
    let f = valid_frame();
    // 8 bytes of options (NOPs and an end-of-list): IHL 7.
    let mut o = f[..ETH_HLEN + 20].to_vec();
    o.extend_from_slice(&[1, 1, 1, 1, 1, 1, 1, 0]);
    o.extend_from_slice(&f[ETH_HLEN + 20..]);
    o[ETH_HLEN] = 0x47;
    let tot = u16::from_be_bytes([o[ETH_HLEN + 2], o[ETH_HLEN + 3]]) + 8;
    o[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&tot.to_be_bytes());
    h.expect("ipv4 with options", &o, XDP_PASS, Counter::PassRouted);
    assert_eq!(
        frame::parse_udp(&o).unwrap().payload_offset,
        frame::PAYLOAD_OFFSET + 8
    );
    // The same options with the devplane magic broken: dropped, which shows
    // the program read the header at the shifted offset.
    let magic_off = frame::PAYLOAD_OFFSET + 8;
    o[magic_off] = b'Z';
    h.expect("options, bad magic", &o, XDP_DROP, Counter::DropBadMagic);
}

#[test]
fn client_checks_drop_unknown_and_spoofed() {
    let Some(mut h) = Harness::new(
        "client_checks_drop_unknown_and_spoofed",
        CONFIG_CHECK_CLIENT,
    ) else {
        return;
    };
    h.expect(
        "registered client",
        &valid_frame(),
        XDP_PASS,
        Counter::PassRouted,
    );
    let f = udp_frame(&flow(), &payload(Kind::Request, MODEL, CLIENT + 1, 1));
    h.expect("unknown client", &f, XDP_DROP, Counter::DropUnknownClient);
    let mut spoof = flow();
    spoof.src_ip = [10, 99, 0, 66];
    let f = udp_frame(&spoof, &payload(Kind::Request, MODEL, CLIENT, 1));
    h.expect("spoofed source", &f, XDP_DROP, Counter::DropSpoofed);
}

/// A registered client naming a VM that is not its own (another client's,
/// or one not registered at all) is dropped before any worker sees it.
#[test]
fn a_foreign_vm_is_dropped() {
    let Some(mut h) = Harness::new("a_foreign_vm_is_dropped", CONFIG_CHECK_CLIENT) else {
        return;
    };
    let other = ClientEntry {
        ip: [10, 99, 0, 3],
        ..Default::default()
    };
    h.prog
        .clients()
        .unwrap()
        .insert(CLIENT + 1, other, 0)
        .unwrap();
    let theirs = VmEntry {
        client: CLIENT + 1,
        hypervisor: 1,
        flags: 0,
    };
    h.prog.vms().unwrap().insert(2, theirs, 0).unwrap();
    let with_vm = |vm: u32| {
        let mut p = payload(Kind::Request, MODEL, CLIENT, 1);
        let off = devplane_wire::HEADER_LEN + std::mem::offset_of!(devplane_wire::RawRecord, vm);
        p[off..off + 4].copy_from_slice(&vm.to_le_bytes());
        udp_frame(&flow(), &p)
    };
    h.expect("own VM", &with_vm(1), XDP_PASS, Counter::PassRouted);
    h.expect(
        "another client's VM",
        &with_vm(2),
        XDP_DROP,
        Counter::DropForeignVm,
    );
    h.expect(
        "an unregistered VM",
        &with_vm(99),
        XDP_DROP,
        Counter::DropForeignVm,
    );
    // Without client checking, the VM is not looked at.
    h.prog
        .set_config(Config {
            port: PORT,
            pad: 0,
            server: 1,
            flags: 0,
        })
        .unwrap();
    h.expect("unchecked", &with_vm(2), XDP_PASS, Counter::PassRouted);
}

#[test]
fn redirect_without_socket_is_counted() {
    let Some(mut h) = Harness::new("redirect_without_socket_is_counted", CONFIG_REDIRECT) else {
        return;
    };
    let (action, delta) = h.run(&valid_frame());
    assert!(
        action == XDP_DROP || action == XDP_ABORTED,
        "verdict {action}"
    );
    assert_eq!(
        delta.get(Counter::DropNoSocket),
        1,
        "{:?}",
        delta.nonzero().collect::<Vec<_>>()
    );
}

#[test]
fn counters_accumulate_over_repeats() {
    let Some(mut h) = Harness::new("counters_accumulate_over_repeats", 0) else {
        return;
    };
    let f = valid_frame();
    let before = h.prog.stats().unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&f);
    opts.repeat = 1000;
    let res = h.prog.xdp().unwrap().test_run(opts).unwrap();
    assert_eq!(res.return_value, XDP_PASS);
    let d = h.prog.stats().unwrap().since(&before);
    assert_eq!(d.get(Counter::PassRouted), 1000);
    assert_eq!(d.get(Counter::Rx), 1000);
    eprintln!("BPF_PROG_TEST_RUN: {:?} per run", res.duration);
}

/// Sets the test client's budget, keeping its address.
fn set_budget(h: &mut Harness, rate: u32, burst: u32) {
    let entry = ClientEntry {
        ip: CLIENT_IP,
        rate,
        burst,
        ..Default::default()
    };
    h.prog.clients().unwrap().insert(CLIENT, entry, 0).unwrap();
}

/// Runs `f` `n` times in one BPF_PROG_TEST_RUN call (so on one CPU, one
/// per-CPU bucket); returns the last verdict and the counters moved.
fn run_repeated(h: &mut Harness, f: &[u8], n: u32) -> (u32, Stats) {
    let before = h.prog.stats().unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(f);
    opts.repeat = n;
    let res = h.prog.xdp().unwrap().test_run(opts).unwrap();
    (res.return_value, h.prog.stats().unwrap().since(&before))
}

#[test]
fn a_spent_budget_drops_exactly_the_excess() {
    let Some(mut h) = Harness::new(
        "a_spent_budget_drops_exactly_the_excess",
        CONFIG_CHECK_CLIENT,
    ) else {
        return;
    };
    const BURST: u32 = 50;
    const EXCESS: u32 = 17;
    // Rate 0: the bucket never refills, so however long the runs take,
    // exactly BURST datagrams pass.
    set_budget(&mut h, 0, BURST);
    let f = valid_frame();
    let (last, d) = run_repeated(&mut h, &f, BURST + EXCESS);
    assert_eq!(last, XDP_DROP, "the last datagram is over budget");
    assert_eq!(d.get(Counter::Rx), u64::from(BURST + EXCESS));
    assert_eq!(d.get(Counter::PassRouted), u64::from(BURST));
    assert_eq!(d.get(Counter::DropOverBudget), u64::from(EXCESS));
    // Still spent: one more is dropped (the bucket lives on this CPU; if
    // this call runs on another, that CPU's bucket starts full, so run a
    // burst's worth again and count only the drops beyond it).
    let (_, d) = run_repeated(&mut h, &f, BURST + 1);
    assert!(d.get(Counter::DropOverBudget) >= 1, "{d:?}");
    assert_eq!(
        d.get(Counter::PassRouted) + d.get(Counter::DropOverBudget),
        u64::from(BURST + 1)
    );

    // Removed live (burst 0): everything passes again.
    set_budget(&mut h, 0, 0);
    let (last, d) = run_repeated(&mut h, &f, 100);
    assert_eq!(last, XDP_PASS);
    assert_eq!(d.get(Counter::PassRouted), 100);
    assert_eq!(d.get(Counter::DropOverBudget), 0);
}

#[test]
fn a_budget_spent_by_one_client_leaves_another_alone() {
    let Some(mut h) = Harness::new(
        "a_budget_spent_by_one_client_leaves_another_alone",
        CONFIG_CHECK_CLIENT,
    ) else {
        return;
    };
    set_budget(&mut h, 0, 5);
    const OTHER: u32 = 8;
    const OTHER_IP: [u8; 4] = [10, 99, 0, 3];
    let entry = ClientEntry {
        ip: OTHER_IP,
        rate: 0,
        burst: 5,
        ..Default::default()
    };
    h.prog.clients().unwrap().insert(OTHER, entry, 0).unwrap();
    let vm = VmEntry {
        client: OTHER,
        hypervisor: 1,
        flags: 0,
    };
    h.prog.vms().unwrap().insert(2, vm, 0).unwrap();
    let mut other_payload = payload(Kind::Request, MODEL, OTHER, 1);
    // The record's VM is the other client's.
    let off = devplane_wire::HEADER_LEN + std::mem::offset_of!(devplane_wire::RawRecord, vm);
    other_payload[off..off + 4].copy_from_slice(&2u32.to_le_bytes());
    let mut other_flow = flow();
    other_flow.src_ip = OTHER_IP;
    let other = udp_frame(&other_flow, &other_payload);

    let (_, d) = run_repeated(&mut h, &valid_frame(), 20);
    assert_eq!(d.get(Counter::DropOverBudget), 15);
    let (last, d) = run_repeated(&mut h, &other, 5);
    assert_eq!(last, XDP_PASS, "{d:?}");
    assert_eq!(d.get(Counter::PassRouted), 5);
}

#[test]
fn without_client_checks_there_is_no_budget() {
    let Some(mut h) = Harness::new("without_client_checks_there_is_no_budget", 0) else {
        return;
    };
    set_budget(&mut h, 0, 1);
    let (last, d) = run_repeated(&mut h, &valid_frame(), 10);
    assert_eq!(last, XDP_PASS);
    assert_eq!(d.get(Counter::PassRouted), 10);
}

/// A block request (`wire::bulk`) of `data` bytes of a write, from VM `vm`.
fn block_request(vm: u32, data: usize) -> Vec<u8> {
    use devplane_wire::bulk::{self, BlockMsg, BlockOp, BlockStatus};
    let mut h = Header::new(Kind::Request, MODEL, 1, CLIENT);
    h.kind = bulk::KIND_BLOCK_REQUEST;
    let m = BlockMsg {
        op: BlockOp::Write,
        status: BlockStatus::Ok,
        flags: 0,
        queue: 0,
        vm,
        hypervisor: 1,
        id: 1,
        sector: 0,
        len: 4096,
    };
    let mut buf = vec![0u8; bulk::MAX_BULK_DATAGRAM];
    let n = bulk::write(&mut buf, h, &m, 0, 3, &vec![0xab; data]).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn block_requests_are_steered_and_checked_like_requests() {
    let Some(mut h) = Harness::new(
        "block_requests_are_steered_and_checked_like_requests",
        CONFIG_CHECK_CLIENT,
    ) else {
        return;
    };
    let full = block_request(1, devplane_wire::bulk::SEG_DATA);
    h.expect(
        "a full block segment",
        &udp_frame(&flow(), &full),
        XDP_PASS,
        Counter::PassRouted,
    );
    // A jumbo segment (a 3500-byte MTU link) is steered the same way;
    // a byte more than any bulk datagram may be is not.
    let jumbo = block_request(1, devplane_wire::bulk::SEG_DATA_MAX);
    assert_eq!(
        jumbo.len(),
        devplane_wire::bulk::MAX_BULK_DATAGRAM - devplane_wire::TAG_LEN
    );
    h.expect(
        "a full jumbo block segment",
        &udp_frame(&flow(), &jumbo),
        XDP_PASS,
        Counter::PassRouted,
    );
    let mut over = block_request(1, devplane_wire::bulk::SEG_DATA_MAX);
    over.resize(devplane_wire::bulk::MAX_BULK_DATAGRAM + 1, 0);
    h.expect(
        "a block datagram longer than MAX_BULK_DATAGRAM",
        &udp_frame(&flow(), &over),
        XDP_DROP,
        Counter::DropBadCount,
    );
    let empty = block_request(1, 0);
    h.expect(
        "a block request without data",
        &udp_frame(&flow(), &empty),
        XDP_PASS,
        Counter::PassRouted,
    );
    // The VM check reads the block record's VM at a request record's offset.
    h.expect(
        "a block request for an unregistered VM",
        &udp_frame(&flow(), &block_request(99, 16)),
        XDP_DROP,
        Counter::DropForeignVm,
    );
    let mut two = block_request(1, 16);
    two[devplane_wire::header::OFF_COUNT] = 2;
    h.expect(
        "a block request claiming two records",
        &udp_frame(&flow(), &two),
        XDP_DROP,
        Counter::DropBadCount,
    );
    let mut cut = block_request(1, 0);
    cut.truncate(devplane_wire::HEADER_LEN + 8);
    h.expect(
        "a block request shorter than its record",
        &udp_frame(&flow(), &cut),
        XDP_DROP,
        Counter::DropBadCount,
    );
    // Block answers go the other way.
    let mut answer = block_request(1, 16);
    answer[devplane_wire::header::OFF_KIND] = devplane_wire::bulk::KIND_BLOCK_ANSWER;
    h.expect(
        "a block answer sent to a server",
        &udp_frame(&flow(), &answer),
        XDP_DROP,
        Counter::DropBadKind,
    );
}

#[test]
fn a_forwarded_model_is_rewritten_and_sent_back_out() {
    const XDP_TX: u32 = 3;
    const FORWARDED: u32 = 43;
    const IO_IP: [u8; 4] = [10, 99, 0, 3];
    const IO_MAC: [u8; 6] = [2, 0, 0, 0, 0, 3];
    let Some(mut h) = Harness::new(
        "a_forwarded_model_is_rewritten_and_sent_back_out",
        CONFIG_CHECK_CLIENT | CONFIG_REDIRECT,
    ) else {
        return;
    };
    let route = Route {
        worker: 0,
        server: 2,
        flags: ROUTE_FORWARD,
        forward_ip: IO_IP,
        forward_mac: IO_MAC,
        pad: [0; 2],
    };
    h.prog
        .routes()
        .unwrap()
        .insert(FORWARDED, route, 0)
        .unwrap();
    let input = udp_frame(&flow(), &payload(Kind::Request, FORWARDED, CLIENT, 2));
    let mut out = vec![0u8; input.len() + 64];
    let before = h.prog.stats().unwrap();
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&input);
    opts.data_out = Some(&mut out);
    let res = h.prog.xdp().unwrap().test_run(opts).expect("test run");
    let delta = h.prog.stats().unwrap().since(&before);
    assert_eq!(res.return_value, XDP_TX, "forwarded with XDP_TX");
    assert_eq!(delta.get(Counter::Forwarded), 1, "{delta:?}");
    assert_eq!(delta.get(Counter::Redirected), 0);
    let out = &out[..res.data_size_out as usize];
    assert_eq!(out.len(), input.len());
    let p = frame::parse_udp(out).expect("still a UDP frame");
    assert_eq!(p.flow.dst_mac, IO_MAC);
    assert_eq!(p.flow.src_mac, flow().src_mac, "the previous hop stays");
    assert_eq!(p.flow.dst_ip, IO_IP);
    assert_eq!(p.flow.src_ip, CLIENT_IP, "the client stays the source");
    assert_eq!((p.flow.src_port, p.flow.dst_port), (40000, PORT));
    let ip_end = ETH_HLEN + 20;
    assert!(frame::checksums_ok(&out[ETH_HLEN..ip_end], &out[ip_end..]));
    assert_eq!(out[ETH_HLEN + 8], 63, "TTL one less");
    assert_eq!(
        &out[frame::PAYLOAD_OFFSET..],
        &input[frame::PAYLOAD_OFFSET..]
    );
    eprintln!("BPF_PROG_TEST_RUN forward: verdict XDP_TX, forwarded");

    // A frame whose TTL runs out (a loop between servers) is dropped.
    let mut looping = input.clone();
    looping[ETH_HLEN + 8] = 1;
    let sum = {
        looping[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&[0, 0]);
        frame::checksum(&looping[ETH_HLEN..ip_end])
    };
    looping[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum.to_be_bytes());
    h.expect("ttl 1", &looping, XDP_DROP, Counter::DropTtl);
    // The owner's checks come first: an unknown client is not forwarded.
    let stranger = udp_frame(&flow(), &payload(Kind::Request, FORWARDED, 99, 2));
    h.expect(
        "unknown client",
        &stranger,
        XDP_DROP,
        Counter::DropUnknownClient,
    );
}
