//! The netns + veth test topology: plain UDP works both ways, frames carry
//! valid checksums, names and subnets are distinct, and everything is gone
//! after drop, even when the body panics.

use std::io;
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use devplane_testkit::privilege::{Capability, require, unavailable};
use devplane_testkit::topology::{Side, Topology, ifindex_in, run_in_netns, spawn_in_netns};

const PORT: u16 = 7711;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Builds a topology, or reports why it is not possible (skip or fail).
fn topology(test: &str) -> Option<Topology> {
    if !require(test, &[Capability::Root]) {
        return None;
    }
    match Topology::new(test) {
        Ok(t) => Some(t),
        Err(e) => {
            unavailable(test, &format!("cannot build the topology: {e}"));
            None
        }
    }
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

fn listed(list: &str, ns: &str) -> bool {
    list.lines()
        .any(|l| l.split_whitespace().next() == Some(ns))
}

/// Whether an interface of this name exists in the root namespace.
fn root_has_link(name: &str) -> bool {
    Command::new("ip")
        .args(["link", "show", "dev", name])
        .output()
        .unwrap()
        .status
        .success()
}

struct Names {
    netns: Vec<String>,
    ifnames: Vec<String>,
}

fn names(t: &Topology) -> Names {
    Names {
        netns: vec![t.client_netns().to_owned(), t.server_netns().to_owned()],
        ifnames: vec![t.client_ifname().to_owned(), t.server_ifname().to_owned()],
    }
}

fn assert_gone(n: &Names) {
    let list = netns_list();
    for ns in &n.netns {
        assert!(!listed(&list, ns), "netns {ns} still listed:\n{list}");
        assert!(
            !std::path::Path::new("/var/run/netns").join(ns).exists(),
            "{ns} still mounted"
        );
    }
    for ifname in &n.ifnames {
        assert!(!root_has_link(ifname), "{ifname} left in the root netns");
    }
}

#[test]
fn udp_echo_between_namespaces_and_cleanup() {
    let Some(topo) = topology("topology_udp_echo") else {
        return;
    };
    let n = names(&topo);
    {
        let list = netns_list();
        for ns in &n.netns {
            assert!(listed(&list, ns), "{ns} not in:\n{list}");
        }
    }
    for side in [Side::Client, Side::Server] {
        assert!(topo.ifname(side).len() <= 15);
        assert_eq!(topo.mac(side)[0], 0x02);
        // Both names resolve in their own namespace, not in the other.
        let idx = topo.ifindex(side).unwrap();
        assert!(idx > 0);
        assert!(ifindex_in(topo.netns(side.peer()), topo.ifname(side)).is_err());
        // The MAC and address are what the accessors say.
        let link = topo
            .exec(side, ["ip", "-o", "addr", "show", "dev", topo.ifname(side)])
            .unwrap();
        assert!(link.contains(&format!("{}/24", topo.ip(side))), "{link}");
        let link = topo
            .exec(side, ["ip", "-o", "link", "show", "dev", topo.ifname(side)])
            .unwrap();
        let m = topo.mac(side);
        let mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        );
        assert!(link.contains(&mac), "{link}");
        assert!(link.contains("UP"), "{link}");
        // The neighbour entry for the peer is static.
        let neigh = topo.exec(side, ["ip", "neigh", "show"]).unwrap();
        let peer = topo.mac(side.peer());
        let peer_mac = format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            peer[0], peer[1], peer[2], peer[3], peer[4], peer[5]
        );
        assert!(
            neigh.contains(&topo.ip(side.peer()).to_string())
                && neigh.contains(&peer_mac)
                && neigh.contains("PERMANENT"),
            "{neigh}"
        );
    }
    // Errors carry the command line and its stderr.
    let err = topo
        .exec(Side::Client, ["ip", "link", "show", "dev", "nonexistent0"])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ip netns exec") && err.contains("nonexistent0"),
        "{err}"
    );

    // Server: bound in its namespace before the client sends.
    let server_addr = SocketAddrV4::new(topo.server_ip(), PORT);
    let server_sock = topo
        .run(Side::Server, || UdpSocket::bind(server_addr))
        .unwrap()
        .unwrap();
    server_sock.set_read_timeout(Some(TIMEOUT)).unwrap();
    let server = std::thread::spawn(move || -> io::Result<(Vec<u8>, std::net::SocketAddr)> {
        let mut buf = [0u8; 2048];
        let (len, from) = server_sock.recv_from(&mut buf)?;
        server_sock.send_to(&buf[..len], from)?;
        Ok((buf[..len].to_vec(), from))
    });

    let client_ip = topo.client_ip();
    let client = spawn_in_netns(
        topo.client_netns(),
        "udp-client",
        move || -> io::Result<Vec<u8>> {
            let sock = UdpSocket::bind(SocketAddrV4::new(client_ip, 0))?;
            sock.set_read_timeout(Some(TIMEOUT))?;
            sock.send_to(b"hello over veth", server_addr)?;
            let mut buf = [0u8; 2048];
            let (len, from) = sock.recv_from(&mut buf)?;
            assert_eq!(from, std::net::SocketAddr::V4(server_addr));
            Ok(buf[..len].to_vec())
        },
    )
    .unwrap();
    let echoed = client.join().unwrap().unwrap();
    let (got, from) = server.join().unwrap().unwrap();
    assert_eq!(got, b"hello over veth");
    assert_eq!(from.ip(), client_ip);
    assert_eq!(echoed, b"hello over veth");

    // The counters on the client veth show exactly the two datagrams.
    let stats = topo
        .exec(
            Side::Client,
            [
                "ip",
                "-s",
                "-j",
                "link",
                "show",
                "dev",
                topo.client_ifname(),
            ],
        )
        .unwrap();
    let packets: Vec<u64> = stats
        .split("\"packets\":")
        .skip(1)
        .map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().unwrap()
        })
        .collect();
    // rx then tx: the echo and the datagram, and nothing else (no ARP, no
    // IPv6 link-up chatter).
    assert_eq!(packets, [1, 1], "{stats}");

    drop(topo);
    assert_gone(&n);
}

/// Parses the UDP checksum out of an Ethernet/IPv4/UDP frame and checks it.
fn udp_checksum_ok(frame: &[u8]) -> Option<bool> {
    if frame.len() < 14 + 20 + 8 || frame[12..14] != [0x08, 0x00] || frame[14 + 9] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let ip = &frame[14..];
    let udp = &ip[ihl..];
    let udp_len = usize::from(u16::from_be_bytes([udp[4], udp[5]]));
    if u16::from_be_bytes([udp[6], udp[7]]) == 0 {
        return Some(true); // no checksum
    }
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let w = if c.len() == 2 {
                u16::from_be_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], 0])
            };
            sum += u32::from(w);
        }
    };
    add(&ip[12..20]);
    add(&[0, 17]);
    add(&(udp_len as u16).to_be_bytes());
    add(&udp[..udp_len]);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    Some(sum == 0xffff)
}

/// What XDP and AF_XDP see on the server veth is what a packet socket sees
/// there: the frame bytes as they crossed the pair. Datagrams from a normal
/// socket must arrive with a complete UDP checksum (TX checksum offload is
/// off), not the pseudo-header partial sum veth passes along by default.
#[test]
fn frames_on_the_wire_carry_full_udp_checksums() {
    let Some(topo) = topology("topology_csum") else {
        return;
    };
    let ifindex = topo.ifindex(Side::Server).unwrap();
    let server_ip = topo.server_ip();
    let frame = topo
        .run(Side::Server, || -> io::Result<Vec<u8>> {
            let proto = (libc::ETH_P_IP as u16).to_be();
            let sock = socket2::Socket::new(
                socket2::Domain::PACKET,
                socket2::Type::RAW,
                Some(socket2::Protocol::from(i32::from(proto))),
            )?;
            // Bind to the veth only.
            // SAFETY: sockaddr_ll is plain old data; all zeroes is valid.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            // SAFETY: the pointer and length describe `sll`, which
            // outlives the call.
            let rc = unsafe {
                libc::bind(
                    sock.as_raw_fd(),
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            sock.set_read_timeout(Some(TIMEOUT))?;
            let _sink = UdpSocket::bind(SocketAddrV4::new(server_ip, PORT))?;
            let sender = topo.spawn(Side::Client, "csum-sender", move || {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.send_to(&[0xa5; 300], SocketAddrV4::new(server_ip, PORT))
            })?;
            sender.join().unwrap()?;
            loop {
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
                let len = sock.recv(&mut buf)?;
                let frame: Vec<u8> = buf[..len]
                    .iter()
                    // SAFETY: recv initialised the first `len` bytes.
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                if frame.len() > 14 + 20 + 4 && frame[14 + 9] == 17 {
                    return Ok(frame);
                }
            }
        })
        .unwrap()
        .unwrap();
    assert_eq!(frame[..6], topo.server_mac());
    assert_eq!(frame[6..12], topo.client_mac());
    assert_eq!(udp_checksum_ok(&frame), Some(true), "frame {frame:02x?}");
}

#[test]
fn two_topologies_are_distinct() {
    let Some(a) = topology("topology_two") else {
        return;
    };
    let b = Topology::new("topology_two").unwrap();
    let mut netns = vec![
        a.client_netns(),
        a.server_netns(),
        b.client_netns(),
        b.server_netns(),
    ];
    let mut ifs = vec![
        a.client_ifname(),
        a.server_ifname(),
        b.client_ifname(),
        b.server_ifname(),
    ];
    netns.sort();
    netns.dedup();
    ifs.sort();
    ifs.dedup();
    assert_eq!(netns.len(), 4);
    assert_eq!(ifs.len(), 4);
    let subnet = |ip: std::net::Ipv4Addr| ip.octets()[..3].to_vec();
    assert_eq!(subnet(a.client_ip()), subnet(a.server_ip()));
    assert_eq!(subnet(b.client_ip()), subnet(b.server_ip()));
    assert_ne!(subnet(a.client_ip()), subnet(b.client_ip()));
    assert_ne!(a.client_mac(), b.client_mac());
    assert_ne!(a.server_mac(), b.server_mac());
    // Both work at the same time.
    for t in [&a, &b] {
        let out = t
            .exec(
                Side::Client,
                ["ping", "-c", "1", "-W", "2", &t.server_ip().to_string()],
            )
            .or_else(|_| {
                // No ping binary: a UDP round trip instead.
                let dst = SocketAddrV4::new(t.server_ip(), PORT);
                let rx = t
                    .run(Side::Server, || UdpSocket::bind(dst))
                    .unwrap()
                    .unwrap();
                rx.set_read_timeout(Some(TIMEOUT)).unwrap();
                t.run(Side::Client, || {
                    UdpSocket::bind("0.0.0.0:0")
                        .unwrap()
                        .send_to(b"x", dst)
                        .unwrap()
                })
                .unwrap();
                rx.recv(&mut [0; 8]).map(|_| String::new())
            });
        out.unwrap();
    }
    let (na, nb) = (names(&a), names(&b));
    drop(a);
    assert_gone(&na);
    // Dropping one leaves the other intact.
    assert!(b.ifindex(Side::Server).is_ok());
    drop(b);
    assert_gone(&nb);
}

#[test]
fn cleanup_happens_when_the_body_panics() {
    if !require("topology_panic", &[Capability::Root]) {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let topo = match Topology::new("topology_panic") {
            Ok(t) => t,
            Err(e) => {
                tx.send(None).unwrap();
                panic!("cannot build the topology: {e}");
            }
        };
        tx.send(Some(names(&topo))).unwrap();
        run_in_netns(topo.client_netns(), || ()).unwrap();
        panic!("test body fails while the topology is alive");
    });
    assert!(result.is_err());
    let Some(n) = rx.recv().unwrap() else {
        unavailable("topology_panic", "cannot build the topology");
        return;
    };
    assert_gone(&n);
}

#[test]
fn missing_namespace_is_an_error_not_a_hang() {
    if !require("topology_missing_ns", &[Capability::Root]) {
        return;
    }
    let err = spawn_in_netns("dp-no-such-netns", "x", || ()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
    assert!(run_in_netns("dp-no-such-netns", || ()).is_err());
    assert!(ifindex_in("dp-no-such-netns", "lo").is_err());
}
