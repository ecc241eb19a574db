//! End to end, from a third host on the client's link (a namespace of its
//! own, `devplane_testkit::attacker`): another registered tenant attacks
//! the bulk block wire. It starts 1 MiB writes to its own disk and never
//! finishes them (to fill the worker's reassembly), sends segments that
//! contradict their request, writes to the victim's VM, and sends
//! truncated, garbage, 4 GiB and past-the-end block datagrams. Every attack datagram is
//! counted (`bulk_no_room`, `bulk_bad_segments`, foreign-VM drops,
//! `malformed`, or the kernel's drops at the socket), the server's
//! reassembly stays within the tenant's share, and the victim's
//! multi-segment write is applied once and reads back.

use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devplane_control::config::{Mode, ModelConfig, ServerConfig};
use devplane_testkit::host::{ServerSnapshot, ServerThread};
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::tenants::{self, Tenant};
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::bulk::{self, BlockMsg, BlockOp, BlockStatus, Bulk, MAX_BULK_DATAGRAM};
use devplane_wire::maps::Counter;
use devplane_wire::{Header, Kind};

const PORT: u16 = 7702;
const SERVER: u32 = 1;
const VICTIM: u32 = 7;
const TENANT: u32 = 8;
const VM: u32 = 1;
const TENANT_VM: u32 = 2;
const HV: u32 = tenants::HYPERVISOR;
const DISK: u32 = 200;
const TENANT_DISK: u32 = 201;

struct Files(Vec<PathBuf>);
impl Drop for Files {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn config(
    topo: &Topology,
    mode: Mode,
    tag: &str,
    tenant_ip: std::net::Ipv4Addr,
    files: &Files,
) -> ServerConfig {
    let disk = |id, vm, f: &PathBuf| ModelConfig {
        vm: Some(vm),
        backing: Some(f.clone()),
        ..ModelConfig::new(id, "blockstore", 0)
    };
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
    let disks = vec![
        disk(DISK, VM, &files.0[0]),
        disk(TENANT_DISK, TENANT_VM, &files.0[1]),
    ];
    tenants::server_config(topo, mode, tag, SERVER, PORT, &tenants, disks)
}

/// Segment `seg` of a block request (`nseg` segments, `data` its bytes).
#[allow(clippy::too_many_arguments)]
fn block(
    client: u32,
    model: u32,
    vm: u32,
    op: BlockOp,
    id: u64,
    len: u32,
    seg: u16,
    data: &[u8],
) -> Vec<u8> {
    let mut h = Header::new(Kind::Request, model, SERVER, client);
    h.kind = bulk::KIND_BLOCK_REQUEST;
    let m = BlockMsg {
        op,
        status: BlockStatus::Ok,
        flags: 0,
        queue: 0,
        vm,
        hypervisor: HV,
        id,
        sector: 8,
        len,
    };
    // Writes' data and reads' answers in segments of a 1500-byte MTU.
    let nseg = if op == BlockOp::Write || op == BlockOp::Read {
        bulk::segments(len)
    } else {
        1
    };
    let mut b = vec![0u8; MAX_BULK_DATAGRAM];
    let n = bulk::write(&mut b, h, &m, seg, nseg, data).unwrap();
    b.truncate(n);
    b
}

/// Sends a whole request (every segment) until its answers come: the
/// status and the data of the answer segments.
fn call(
    sock: &UdpSocket,
    server: SocketAddr,
    op: BlockOp,
    id: u64,
    data: &[u8],
    len: u32,
) -> (BlockStatus, Vec<u8>) {
    let segs: Vec<Vec<u8>> = if op == BlockOp::Write {
        (0..bulk::segments(len))
            .map(|s| {
                let (a, b) = bulk::seg_range(len, bulk::segments(len), s);
                block(VICTIM, DISK, VM, op, id, len, s, &data[a..b])
            })
            .collect()
    } else {
        vec![block(VICTIM, DISK, VM, op, id, len, 0, &[])]
    };
    // 3 s of resends: shorter than the server's reassembly timeout (5 s),
    // as an attacker that sends one more segment of each of its writes
    // every few seconds keeps them from expiring for as long as it likes.
    for _ in 0..10 {
        for s in &segs {
            sock.send_to(s, server).unwrap();
        }
        let mut got = vec![0u8; len as usize];
        let mut have = std::collections::HashSet::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = sock.recv(&mut buf) {
            let Ok(d) = Bulk::parse(&buf[..n]) else {
                continue;
            };
            if d.request || d.id() != id {
                continue;
            }
            if op != BlockOp::Read || d.status != BlockStatus::Ok {
                return (d.status, Vec::new());
            }
            let (at, end) = bulk::seg_range(len, d.rec.nseg.get(), d.seg());
            got[at..end].copy_from_slice(d.data);
            have.insert(d.seg());
            if have.len() == bulk::segments(len) as usize {
                return (BlockStatus::Ok, got);
            }
        }
    }
    panic!("no answer to block request {id}");
}

/// Foreign-VM drops by the XDP program and by the workers.
fn foreign_drops(s: &ServerSnapshot) -> u64 {
    let xdp = s.xdp.as_ref().map_or(0, |x| x.get(Counter::DropForeignVm));
    xdp + s.workers.iter().map(|w| w.foreign_vm).sum::<u64>()
}

/// Every way an attack datagram is accounted for.
fn accounted(s: &ServerSnapshot) -> [u64; 5] {
    let sum = |f: fn(&devplane_server::stats::WorkerSnapshot) -> u64| -> u64 {
        s.workers.iter().map(f).sum()
    };
    let xdp_malformed = s.xdp.as_ref().map_or(0, |x| {
        [
            Counter::DropTruncated,
            Counter::DropBadLength,
            Counter::DropBadCount,
            Counter::DropBadVersion,
            Counter::DropBadKind,
        ]
        .into_iter()
        .map(|c| x.get(c))
        .sum::<u64>()
    });
    [
        sum(|w| w.bulk_no_room),
        sum(|w| w.bulk_bad_segments),
        foreign_drops(s),
        sum(|w| w.malformed) + xdp_malformed,
        sum(|w| w.socket_drops + w.xsk_rx_dropped + w.xsk_rx_ring_full),
    ]
}

fn attacks(mode: Mode, tag: &str) {
    let test = format!("e2e_bulk_attacks_{tag}");
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
    let pid = std::process::id();
    let files = Files(
        ["v", "t"]
            .iter()
            .map(|n| std::env::temp_dir().join(format!("dp-bulkatk-{tag}-{n}-{pid}.img")))
            .collect(),
    );
    let srv = ServerThread::spawn(
        config(&topo, mode, tag, attacker.ip(), &files),
        Some(topo.server_netns()),
    )
    .expect("server starts");
    let server = SocketAddr::from((topo.server_ip(), PORT));
    let ip = topo.client_ip();
    let vsock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))
        .unwrap()
        .unwrap();
    vsock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let aip = attacker.ip();
    let asock = attacker
        .run(move || UdpSocket::bind((aip, 0)).unwrap())
        .expect("enter the attacker's netns");
    // The victim is served.
    let before_data: Vec<u8> = (0..512u32).map(|i| i as u8).collect();
    assert_eq!(
        call(&vsock, server, BlockOp::Write, 1, &before_data, 512).0,
        BlockStatus::Ok
    );

    let before = accounted(&srv.snapshot());
    let mut sent = 0u64;
    let mut attack = |d: &[u8]| {
        asock.send_to(d, server).unwrap();
        sent += 1;
        // Paced a little: the point is the server's state, not the
        // kernel's socket buffer.
        if sent.is_multiple_of(32) {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    let max = bulk::MAX_BLOCK_LEN;
    let seg = vec![0x5au8; bulk::seg_len(max, bulk::segments(max), 0)];
    // 1. Writes of 1 MiB to its own disk, first segment only, never
    //    finished: 80 MiB asked for, more than the whole budget.
    for id in 1..=80u64 {
        attack(&block(
            TENANT,
            TENANT_DISK,
            TENANT_VM,
            BlockOp::Write,
            id,
            max,
            0,
            &seg,
        ));
    }
    // 2. Segments contradicting their request: another length than the
    //    first segment's (held: write 1 of 1 MiB is being reassembled).
    for s in 1..=20u16 {
        let len = max - 512 * u32::from(s);
        let data = vec![0x5au8; bulk::seg_len(len, bulk::segments(len), s)];
        attack(&block(
            TENANT,
            TENANT_DISK,
            TENANT_VM,
            BlockOp::Write,
            1,
            len,
            s,
            &data,
        ));
    }
    // 3. Writes and reads to the victim's VM and disk.
    for id in 2..=40u64 {
        attack(&block(
            TENANT,
            DISK,
            VM,
            BlockOp::Write,
            id,
            512,
            0,
            &[0xee; 512],
        ));
        attack(&block(TENANT, DISK, VM, BlockOp::Read, id, 4096, 0, &[]));
    }
    // 4. Truncated and garbage block datagrams.
    let good = block(
        TENANT,
        TENANT_DISK,
        TENANT_VM,
        BlockOp::Write,
        99,
        512,
        0,
        &[1; 512],
    );
    for cut in [
        devplane_wire::HEADER_LEN + 1,
        devplane_wire::HEADER_LEN + 20,
    ] {
        attack(&good[..cut]);
    }
    let mut bad_version = good.clone();
    bad_version[devplane_wire::HEADER_LEN + 1] = 0xff;
    attack(&bad_version);
    let mut bad_op = good.clone();
    bad_op[devplane_wire::HEADER_LEN] = 0xee;
    attack(&bad_op);
    // A request of 4 GiB, and a segment past the request's last.
    let mut huge = good.clone();
    huge[devplane_wire::HEADER_LEN + 32..devplane_wire::HEADER_LEN + 36]
        .copy_from_slice(&u32::MAX.to_le_bytes());
    attack(&huge);
    let mut past = block(
        TENANT,
        TENANT_DISK,
        TENANT_VM,
        BlockOp::Write,
        98,
        4096,
        0,
        &seg,
    );
    past[devplane_wire::HEADER_LEN + 6..devplane_wire::HEADER_LEN + 8]
        .copy_from_slice(&40u16.to_le_bytes());
    attack(&past);

    // Every attack datagram accounted for (the segments that started a
    // reassembly within the tenant's share are held, not dropped).
    let share = devplane_server::bulk::REASSEMBLY_CLIENT_SHARE / max as usize;
    let deadline = Instant::now() + Duration::from_secs(5);
    let (total, now) = loop {
        let now = accounted(&srv.snapshot());
        let total: u64 = now.iter().zip(before).map(|(a, b)| a - b).sum::<u64>() + share as u64;
        if total >= sent || Instant::now() > deadline {
            break (total, now);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let d: Vec<u64> = now.iter().zip(before).map(|(a, b)| a - b).collect();
    eprintln!(
        "{sent} attack datagrams: {share} held; no_room {}, bad_segments {}, foreign {}, \
         malformed {}, kernel {}",
        d[0], d[1], d[2], d[3], d[4]
    );
    assert_eq!(total, sent, "an attack datagram unaccounted for");
    assert!(
        d[4] > 0 || (d[0] > 0 && d[1] > 0 && d[2] > 0 && d[3] > 0),
        "{d:?}"
    );

    // The victim goes on: a multi-segment write is applied and reads
    // back (before the per-client share, the tenant's unfinished writes
    // held the whole budget and this write was dropped, `NoRoom`, at
    // every resend).
    let data: Vec<u8> = (0..16384u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(
        call(&vsock, server, BlockOp::Write, 2, &data, 16384).0,
        BlockStatus::Ok,
        "the victim's write"
    );
    let (st, back) = call(&vsock, server, BlockOp::Read, 3, &[], 16384);
    assert_eq!(st, BlockStatus::Ok);
    assert!(back == data, "the victim's data read back differs");
    let mut buf = [0u8; 2048];
    asock
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while let Ok(n) = asock.recv(&mut buf) {
        // Only answers about its own disk (no-room is silent; the
        // tenant's own requests may be answered).
        let b = Bulk::parse(&buf[..n]).expect("an answer parses");
        assert_eq!(
            b.model(),
            TENANT_DISK,
            "the tenant got an answer about the victim's disk"
        );
    }
    srv.stop();
    drop(attacker);
}

#[test]
fn socket_mode_bulk_attacks_from_another_tenant_are_counted_and_harmless() {
    attacks(Mode::Socket, "bs");
}

#[test]
fn xdp_mode_bulk_attacks_from_another_tenant_are_counted_and_harmless() {
    attacks(Mode::Xdp, "bx");
}
