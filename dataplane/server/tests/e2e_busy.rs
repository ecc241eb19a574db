//! End to end through a real worker, in both modes: a `blockstore` whose
//! image is not in the host's page cache answers a register access to a
//! page it does not hold `Busy` at once (issue 14 item 3: the worker
//! never waits on the file), applying nothing, nor the write behind it
//! in the same datagram; the same datagram sent again is applied once,
//! in order, with the file's bytes; and a counter model on the same
//! worker is served meanwhile.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use devplane_control::config::{Mode, ModelConfig, ServerConfig};
use devplane_testkit::host::ServerThread;
use devplane_testkit::privilege::{self, Capability};
use devplane_testkit::tenants::{self, Tenant};
use devplane_testkit::topology::{Side, Topology};
use devplane_wire::{
    Access, AccessSize, Datagram, Header, Kind, Record, Request, RequestId, Status, datagram,
};

const PORT: u16 = 7712;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const VM: u32 = 1;
const DISK: u32 = 200;
const COUNTER: u32 = 100;
const PIO: u16 = 0x500;
const FILL: u8 = 0x5a;

struct File(PathBuf);
impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// An image of `FILL` bytes, written, synced and evicted from the page
/// cache (`POSIX_FADV_DONTNEED`).
fn cold_image(tag: &str) -> File {
    use std::io::Write;
    let p = std::env::temp_dir().join(format!("dp-busy-{tag}-{}.img", std::process::id()));
    let mut f = std::fs::File::create(&p).unwrap();
    f.write_all(&vec![FILL; 1 << 20]).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a plain advice call on a descriptor this function owns.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert_eq!(r, 0, "posix_fadvise");
    File(p)
}

fn config(topo: &Topology, mode: Mode, tag: &str, image: &File) -> ServerConfig {
    let client = Tenant {
        client: CLIENT,
        address: topo.client_ip(),
        vm: VM,
        key: None,
    };
    let disk = ModelConfig {
        vm: Some(VM),
        mmio_base: Some(0),
        backing: Some(image.0.clone()),
        ..ModelConfig::new(DISK, "blockstore", 0)
    };
    let counter = ModelConfig {
        pio_base: Some(PIO),
        vm: Some(VM),
        ..ModelConfig::new(COUNTER, "counter", 0)
    };
    tenants::server_config(
        topo,
        mode,
        tag,
        SERVER,
        PORT,
        &[client],
        vec![disk, counter],
    )
}

fn request(model: u32, recs: &[(u64, Access)]) -> Vec<u8> {
    let recs: Vec<Record> = recs
        .iter()
        .map(|&(seq, access)| {
            Record::Request(Request {
                id: RequestId {
                    vm: VM,
                    hypervisor: tenants::HYPERVISOR,
                    vcpu: 0,
                    seq,
                },
                access,
                flags: 0,
            })
        })
        .collect();
    let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
    let n = datagram::encode(
        &mut buf,
        Header::new(Kind::Request, model, SERVER, CLIENT),
        &recs,
    )
    .unwrap();
    buf.truncate(n);
    buf
}

/// Sends `d` and returns its answer's (seq, status, data) records, again
/// while none comes (at most 10 sends).
fn call(sock: &UdpSocket, server: SocketAddr, d: &[u8]) -> Vec<(u64, Status, u64)> {
    for _ in 0..10 {
        sock.send_to(d, server).unwrap();
        let mut buf = [0u8; 2048];
        if let Ok(n) = sock.recv(&mut buf) {
            let a = Datagram::parse(&buf[..n]).expect("parses");
            return a
                .records()
                .map(|r| match r {
                    Record::Response(r) => (r.id.seq, r.status, r.data),
                    other => panic!("unexpected {other:?}"),
                })
                .collect();
        }
    }
    panic!("no answer after 10 sends");
}

fn run(mode: Mode, tag: &str) {
    let test = format!("{mode}_mode_a_page_miss_answers_busy_and_is_applied_when_sent_again");
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
    let image = cold_image(tag);
    let srv = ServerThread::spawn(config(&topo, mode, tag, &image), Some(topo.server_netns()))
        .expect("server starts");
    let server = SocketAddr::from((topo.server_ip(), PORT));
    let ip = topo.client_ip();
    let sock = topo
        .run(Side::Client, move || UdpSocket::bind((ip, 0)))
        .unwrap()
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();

    // A read of a cold page, then a write behind it in the same datagram.
    // The worker starts the page's read and looks once more before it
    // answers: a read that has finished by then (a fast disk, the host's
    // own cache under it) is taken and the pair applied at once, which is
    // right too. So the test moves on to the next cold page until one
    // answers Busy (it flaked on a fast machine with one page).
    let fill = u64::from_ne_bytes([FILL; 8]);
    let mut busy = None;
    for k in 0..32u64 {
        let page = (5 + 2 * k) * 4096;
        let (sr, sw) = (10 + 2 * k, 11 + 2 * k);
        let d = request(
            DISK,
            &[
                (
                    sr,
                    Access::MmioRead {
                        gpa: page,
                        size: AccessSize::B8,
                    },
                ),
                (
                    sw,
                    Access::MmioWrite {
                        gpa: page + 8,
                        size: AccessSize::B8,
                        data: 0x77,
                    },
                ),
            ],
        );
        let first = call(&sock, server, &d);
        if first == vec![(sr, Status::Busy, 0), (sw, Status::Busy, 0)] {
            busy = Some((page, sr, sw, d));
            break;
        }
        assert_eq!(
            first,
            vec![(sr, Status::Ok, fill), (sw, Status::Ok, 0)],
            "a cold page is read without waiting, the write behind it waits too \
             (or both are applied when the read finished at once)"
        );
    }
    let (page, sr, sw, d) = busy.expect("no cold page of 32 answered Busy");
    // The counter on the same worker is served meanwhile.
    let c = request(
        COUNTER,
        &[(
            sw + 1,
            Access::PioIn {
                port: PIO,
                size: AccessSize::B4,
            },
        )],
    );
    assert_eq!(call(&sock, server, &c), vec![(sw + 1, Status::Ok, 0)]);
    // Sent again until applied: the file's bytes, the write applied once.
    let deadline = Instant::now() + Duration::from_secs(5);
    let done = loop {
        let a = call(&sock, server, &d);
        if a.iter().all(|r| r.1 == Status::Ok) {
            break a;
        }
        assert!(
            a.iter().all(|r| r.1 == Status::Busy),
            "applied out of order: {a:?}"
        );
        assert!(Instant::now() < deadline, "the page never came: {a:?}");
        std::thread::sleep(Duration::from_micros(200));
    };
    assert_eq!(done, vec![(sr, Status::Ok, fill), (sw, Status::Ok, 0)]);
    // Once more: answered from the window, not applied again.
    assert_eq!(call(&sock, server, &d), done);
    let w = &srv.snapshot().workers[0];
    assert!(w.busy >= 2, "busy {}", w.busy);
    assert!(w.duplicates >= 2, "duplicates {}", w.duplicates);
    // The write landed once: read it back through the window.
    let r = request(
        DISK,
        &[(
            sw + 2,
            Access::MmioRead {
                gpa: page + 8,
                size: AccessSize::B8,
            },
        )],
    );
    assert_eq!(call(&sock, server, &r), vec![(sw + 2, Status::Ok, 0x77)]);
    srv.stop();
}

#[test]
fn xdp_mode_a_page_miss_answers_busy_and_is_applied_when_sent_again() {
    run(Mode::Xdp, "bsyx");
}

#[test]
fn socket_mode_a_page_miss_answers_busy_and_is_applied_when_sent_again() {
    run(Mode::Socket, "bsys");
}
