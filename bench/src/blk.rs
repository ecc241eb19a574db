//! The `blk` scenario: the remote disk in bulk beside NBD, on the same
//! two-namespace topology, in one run.
//!
//! - **devplane**: a server behind the real XDP program in the server
//!   namespace (one worker, tags on) with a `blockstore` on a raw file;
//!   in the client namespace the client VMM's virtio-blk device
//!   (`VirtioBlk::with_bulk`: every descriptor chain one block request,
//!   many in flight) driven by a driver in this process the way Linux's
//!   legacy virtio-blk driver drives it: descriptor chains (16 KiB data
//!   descriptors, the device's `size_max`), each in an indirect table of
//!   its own as Linux's virtio_ring puts them once the device offers
//!   `VIRTIO_RING_F_INDIRECT_DESC` (one ring entry per request, so a deep
//!   queue of 128 KiB requests fits the ring), published in the available
//!   ring, one notify for all published, completions taken from the used
//!   ring after the interrupt, the ISR read. The driver sleeps until the
//!   interrupt as a halted vCPU does. (Not a KVM guest: see
//!   `bench/README.md`.)
//! - **NBD**: Debian's `qemu-nbd` serving a raw file of the same size and
//!   contents in the server namespace (its defaults: writeback cache, as
//!   the blockstore's buffered I/O), and a small NBD client in this
//!   process (fixed newstyle handshake, simple replies, one TCP
//!   connection with `TCP_NODELAY`, a blocking socket), timed the same
//!   way: a request is timed from its submission to its completion, and
//!   at a queue depth of 32 as many requests are kept in flight.
//!
//! Rows: 4 KiB random reads and writes at queue depth 1 (latency; the
//! NBD row of the same operation is the floor), and at queue depth 32
//! 4 KiB and 128 KiB random reads and writes (requests/s; the note gives
//! the ratio to NBD's and MiB/s). Every request's data is checked (each
//! sector carries its number and the generation of its last write), the
//! whole disk is read back and checked at the end on both sides, and any
//! error or wrong byte fails the scenario; a goal missed is a note.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::blockstore::{CTRL_BASE, CTRL_CAPACITY};
use devplane_testkit::host::ServerThread;
use devplane_testkit::keys;
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::kvm::{IrqLine, KvmError, Trigger};
use devplane_vmm::virtio::VirtioError;
use devplane_vmm::virtio::blk::{
    QUEUE_SIZE, REG_GUEST_FEATURES, REG_HOST_FEATURES, REG_ISR, REG_QUEUE_NOTIFY, REG_QUEUE_PFN,
    REG_STATUS, SIZE_MAX, VirtioBlk,
};
use devplane_vmm::virtio::bulk::{BulkConfig, BulkIds};
use devplane_vmm::virtio::queue::{
    Descriptor, DmaMemory, VIRTIO_RING_F_INDIRECT_DESC, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
};
use devplane_vmm::virtio::store::StorePort;
use devplane_wire::{AccessSize, IrqAction};

use crate::hist::Latency;
use crate::report::{Floor, Row, progress, warning};

/// The scenario's name.
pub const SCENARIO: &str = "blk";
const PORT: u16 = 7930;
const NBD_PORT: u16 = 10809;
const SERVER: u32 = 1;
const CLIENT: u32 = 7;
const HV: u32 = 1;
const VM: u32 = 1;
const STORE: u32 = 13;
/// The untagged twin: client, VM and blockstore of the `-untagged` rows
/// (a second address on the client's veth, no tag key).
const PLAIN_CLIENT: u32 = 8;
const PLAIN_VM: u32 = 2;
const PLAIN_STORE: u32 = 14;
const STORE_GPA: u64 = 1 << 44;
/// The disk's size, on both sides.
const DISK: u64 = 64 << 20;
const SECTOR: u64 = 512;
const CLIENT_CORE: usize = 0;
const WORKER_CORE: usize = 1;
/// Queue depth of the throughput rows.
const DEPTH: usize = 32;
/// Requests timed at queue depth 1 (after a tenth as many unTimed).
const QD1_OPS: u32 = 2000;
/// Requests at queue depth 32, at most, per row...
const QD32_OPS: u64 = 20_000;
/// ... and bytes at most ...
const QD32_BYTES: u64 = 256 << 20;
/// ... and seconds at most.
const QD32_SECS: f64 = 1.0;
/// A request unanswered this long fails the scenario.
const WAIT_LIMIT: Duration = Duration::from_secs(10);

// The virtio driver's layout of guest memory.
const PFN: u32 = 0x10;
const TABLE: u64 = (PFN as u64) << 12;
const AVAIL: u64 = TABLE + 16 * QUEUE_SIZE as u64;
const USED: u64 = 0x12000;
const HDRS: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const DATA: u64 = 0x100000;
/// Each slot's indirect table, [`TABLE_SLOT`] bytes apart.
const INDIRECT: u64 = 0x40000;
/// An indirect table's room: header, 16 KiB data descriptors of the
/// largest request, status.
const TABLE_SLOT: u64 = 16 * (2 + (MAX_LEN / SIZE_MAX as usize) as u64);
const _: () = assert!(INDIRECT + 256 * TABLE_SLOT <= DATA);
/// Largest request, and each slot's data area.
const MAX_LEN: usize = 128 << 10;
const MEM: usize = DATA as usize + 256 * MAX_LEN;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
}

/// The contents every sector of the disks has: 16-byte units of its
/// number and the generation of its last write (0: the initial image),
/// repeated.
fn stamp(buf: &mut [u8], first_sector: u64, gens: &[u32]) {
    for (i, s) in buf.chunks_mut(SECTOR as usize).enumerate() {
        let sector = first_sector + i as u64;
        let g = gens[sector as usize];
        let mut unit = [0u8; 16];
        unit[..8].copy_from_slice(&sector.to_le_bytes());
        unit[8..12].copy_from_slice(&g.to_le_bytes());
        unit[12..].copy_from_slice(b"dpbk");
        for u in s.chunks_mut(16) {
            u.copy_from_slice(&unit[..u.len()]);
        }
    }
}

/// Checks the first unit of every sector of `buf` (the timed loops), or
/// every byte (`full`, the final pass); the first wrong sector.
fn check(buf: &[u8], first_sector: u64, gens: &[u32], full: bool) -> Result<(), String> {
    let mut w = [0u8; SECTOR as usize];
    for (i, s) in buf.chunks(SECTOR as usize).enumerate() {
        let sector = first_sector + i as u64;
        let n = if full { s.len() } else { 16.min(s.len()) };
        stamp(&mut w[..s.len()], sector, gens);
        if s[..n] != w[..n] {
            let got = u64::from_le_bytes(s[..8].try_into().unwrap_or_default());
            let gen_got = u32::from_le_bytes(s[8..12].try_into().unwrap_or_default());
            return Err(format!(
                "sector {sector}: read sector {got} generation {gen_got}, expected \
                 generation {}",
                gens[sector as usize]
            ));
        }
    }
    Ok(())
}

/// A disk the benchmark drives: requests are numbered by slot (at most
/// [`Disk::slots`] in flight), submitted, published with `kick`, and
/// completed in any order.
trait Disk {
    /// Which of the two.
    fn name(&self) -> &'static str;
    /// Requests of `len` bytes in flight at most.
    fn slots(&self, len: usize) -> usize;
    /// Starts request `slot` (`data`: a write's bytes).
    fn submit(&mut self, slot: usize, op: Op, offset: u64, len: usize, data: &[u8]) -> Result<()>;
    /// Publishes what was submitted.
    fn kick(&mut self) -> Result<()>;
    /// Waits until at least one request completes; appends the slots
    /// completed.
    fn wait(&mut self, done: &mut Vec<usize>) -> Result<()>;
    /// Checks a completed read's data (`full`: every byte).
    fn check(
        &self,
        slot: usize,
        offset: u64,
        len: usize,
        gens: &[u32],
        full: bool,
    ) -> Result<(), String>;
}

/// Guest memory, shared by the driver and the device.
#[derive(Clone)]
struct Mem(Arc<Mutex<Vec<u8>>>);

impl DmaMemory for Mem {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        let m = self.0.lock().map_err(|_| VirtioError::Dma {
            gpa,
            len: buf.len(),
        })?;
        let s = m
            .get(gpa as usize..gpa as usize + buf.len())
            .ok_or(VirtioError::Dma {
                gpa,
                len: buf.len(),
            })?;
        buf.copy_from_slice(s);
        Ok(())
    }
    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VirtioError> {
        let mut m = self.0.lock().map_err(|_| VirtioError::Dma {
            gpa,
            len: bytes.len(),
        })?;
        let d = m
            .get_mut(gpa as usize..gpa as usize + bytes.len())
            .ok_or(VirtioError::Dma {
                gpa,
                len: bytes.len(),
            })?;
        d.copy_from_slice(bytes);
        Ok(())
    }
}

impl Mem {
    fn put(&self, gpa: u64, b: &[u8]) -> Result<()> {
        self.write(gpa, b).map_err(|e| anyhow::anyhow!("{e}"))
    }
    fn get(&self, gpa: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0; n];
        let _ = self.read(gpa, &mut b);
        b
    }
    fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.get(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }
}

/// The interrupt line: counts edges and wakes the driver.
#[derive(Default)]
struct Irq {
    edges: Mutex<u64>,
    cv: Condvar,
}

struct IrqTrigger(Arc<Irq>);

impl Trigger for IrqTrigger {
    fn trigger(&self, _line: u32, _action: IrqAction) -> Result<(), KvmError> {
        if let Ok(mut n) = self.0.edges.lock() {
            *n += 1;
        }
        self.0.cv.notify_one();
        Ok(())
    }
}

/// The register window, as far as a bulk disk uses it: the capacity.
struct Capacity;

impl StorePort for Capacity {
    fn read(&mut self, offset: u64) -> Result<u64, VirtioError> {
        Ok(if offset == CTRL_BASE + CTRL_CAPACITY {
            DISK
        } else {
            0
        })
    }
    fn write(&mut self, _: u64, _: u64) -> Result<(), VirtioError> {
        Ok(())
    }
}

/// The client VMM's virtio-blk device with its bulk disk, and a driver.
struct Devplane {
    dev: VirtioBlk,
    mem: Mem,
    irq: Arc<Irq>,
    /// Edges seen.
    seen: u64,
    avail: u16,
    used: u16,
}

impl Devplane {
    /// The tagged disk (client [`CLIENT`]), or with `plain` the untagged
    /// one (client [`PLAIN_CLIENT`] from [`plain_ip`]).
    fn new(topo: &Topology, plain: bool) -> Result<Devplane> {
        let mem = Mem(Arc::new(Mutex::new(vec![0u8; MEM])));
        let irq = Arc::new(Irq::default());
        let (client, vm, model, bind) = if plain {
            (PLAIN_CLIENT, PLAIN_VM, PLAIN_STORE, plain_ip(topo))
        } else {
            (CLIENT, VM, STORE, topo.client_ip())
        };
        let cfg = BulkConfig {
            server: SocketAddr::from((topo.server_ip(), PORT)),
            bind: Some(bind.into()),
            ids: BulkIds {
                client,
                server: SERVER,
                model,
                vm,
                hypervisor: HV,
            },
            keys: (!plain).then(|| keys::client_ring(CLIENT)),
            live_keys: None,
            give_up: Duration::from_secs(10),
            spin: Duration::from_micros(crate::rig::knob("DP_BLK_SPIN_US", 200) as u64),
            loss: Default::default(),
        };
        let (m, i) = (mem.clone(), irq.clone());
        // The disk's I/O thread inherits this thread's core.
        let dev = topo
            .run(Side::Client, move || {
                let _ = affinity::set_thread_affinity([CLIENT_CORE]);
                VirtioBlk::new(
                    Box::new(m.clone()),
                    IrqLine::new(Box::new(IrqTrigger(i.clone())), 5),
                )
                .with_bulk(
                    cfg,
                    Box::new(m),
                    IrqLine::new(Box::new(IrqTrigger(i)), 5),
                )
            })
            .context("entering the client namespace")?
            .context("starting the bulk disk")?;
        let mut d = Devplane {
            dev,
            mem,
            irq,
            seen: 0,
            avail: 0,
            used: 0,
        };
        d.w(REG_STATUS, AccessSize::B1, 1 | 2);
        let f = d.dev.read(REG_HOST_FEATURES, AccessSize::B4, &mut Capacity);
        ensure!(
            f as u32 & VIRTIO_RING_F_INDIRECT_DESC != 0,
            "the virtio-blk device does not offer indirect descriptors"
        );
        d.w(REG_GUEST_FEATURES, AccessSize::B4, f);
        d.w(REG_QUEUE_PFN, AccessSize::B4, u64::from(PFN));
        d.w(REG_STATUS, AccessSize::B1, 1 | 2 | 4);
        Ok(d)
    }

    fn w(&mut self, off: u64, size: AccessSize, v: u64) {
        self.dev.write(off, size, v, &mut Capacity)
    }

    /// Datagrams the bulk disk sent again (after a timeout).
    fn resent(&self) -> u64 {
        self.dev
            .bulk_stats()
            .map_or(0, |s| s.resent.load(Ordering::Relaxed))
    }

    /// The bulk disk's counters, for a note.
    fn counters(&self) -> String {
        let Some(s) = self.dev.bulk_stats() else {
            return String::new();
        };
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        format!(
            "bulk disk: {} sent ({} of them in {} GSO sends), {} received, {} dropped, {} timeouts",
            g(&s.sent),
            g(&s.gso_datagrams),
            g(&s.gso_sends),
            g(&s.received),
            g(&s.dropped),
            g(&s.timeouts)
        )
    }

    fn errors(&self) -> u64 {
        self.dev
            .bulk_stats()
            .map_or(0, |s| s.errors.load(Ordering::Relaxed))
    }
}

impl Disk for Devplane {
    fn name(&self) -> &'static str {
        "devplane"
    }

    fn slots(&self, _len: usize) -> usize {
        // One ring entry per request (its indirect table).
        QUEUE_SIZE as usize
    }

    fn submit(&mut self, slot: usize, op: Op, offset: u64, len: usize, data: &[u8]) -> Result<()> {
        let kind = match op {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
        };
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[8..].copy_from_slice(&(offset / SECTOR).to_le_bytes());
        let hdr = HDRS + 16 * slot as u64;
        self.mem.put(hdr, &h)?;
        self.mem.put(STATUS + slot as u64, &[0xee])?;
        let at = DATA + (slot * MAX_LEN) as u64;
        if op == Op::Write {
            self.mem.put(at, data)?;
        }
        let mut bufs = vec![(hdr, 16u32, false)];
        if op != Op::Flush {
            let seg = SIZE_MAX as usize;
            for c in 0..len.div_ceil(seg) {
                let n = (len - c * seg).min(seg);
                bufs.push((at + (c * seg) as u64, n as u32, op == Op::Read));
            }
        }
        bufs.push((STATUS + slot as u64, 1, true));
        ensure!(
            slot < QUEUE_SIZE as usize && 16 * bufs.len() as u64 <= TABLE_SLOT,
            "slot {slot} of {len} bytes does not fit its table"
        );
        let head = slot as u16;
        let at = INDIRECT + TABLE_SLOT * slot as u64;
        let mut table = Vec::with_capacity(16 * bufs.len());
        for (k, &(addr, len, device_writes)) in bufs.iter().enumerate() {
            let more = k + 1 < bufs.len();
            let d = Descriptor {
                addr,
                len,
                flags: if more { VRING_DESC_F_NEXT } else { 0 }
                    | if device_writes { VRING_DESC_F_WRITE } else { 0 },
            };
            // `next` counts within the table.
            table.extend_from_slice(&d.encode(k as u16 + 1));
        }
        self.mem.put(at, &table)?;
        let ring_desc = Descriptor {
            addr: at,
            len: table.len() as u32,
            flags: VRING_DESC_F_INDIRECT,
        };
        self.mem
            .put(TABLE + 16 * u64::from(head), &ring_desc.encode(0))?;
        let ring = u64::from(self.avail % QUEUE_SIZE);
        self.mem.put(AVAIL + 4 + 2 * ring, &head.to_le_bytes())?;
        self.avail = self.avail.wrapping_add(1);
        Ok(())
    }

    fn kick(&mut self) -> Result<()> {
        self.mem.put(AVAIL + 2, &self.avail.to_le_bytes())?;
        self.w(REG_QUEUE_NOTIFY, AccessSize::B2, 0);
        Ok(())
    }

    fn wait(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let t0 = Instant::now();
        loop {
            // Edges counted before the used ring is looked at: one that
            // comes in between is not slept through.
            let edges = *self.irq.edges.lock().map_err(|_| anyhow::anyhow!("irq"))?;
            let idx = self.mem.u16_at(USED + 2);
            if idx != self.used {
                if edges != self.seen {
                    self.seen = edges;
                    // The driver's interrupt handler reads (and clears)
                    // the ISR.
                    let _ = self.dev.read(REG_ISR, AccessSize::B1, &mut Capacity);
                }
                while self.used != idx {
                    let slot = u64::from(self.used % QUEUE_SIZE);
                    let e = self.mem.get(USED + 4 + 8 * slot, 8);
                    let head = u32::from_le_bytes([e[0], e[1], e[2], e[3]]) as usize;
                    self.used = self.used.wrapping_add(1);
                    let s = head;
                    let st = self.mem.get(STATUS + s as u64, 1)[0];
                    if st != 0 {
                        bail!("devplane: request in slot {s} completed with status {st}");
                    }
                    done.push(s);
                }
                return Ok(());
            }
            let g = self.irq.edges.lock().map_err(|_| anyhow::anyhow!("irq"))?;
            if *g == edges {
                let (g, _) = self
                    .irq
                    .cv
                    .wait_timeout(g, Duration::from_millis(100))
                    .map_err(|_| anyhow::anyhow!("irq"))?;
                drop(g);
            }
            if t0.elapsed() > WAIT_LIMIT {
                bail!(
                    "devplane: no request completed in {WAIT_LIMIT:?} ({} errors so far)",
                    self.errors()
                );
            }
        }
    }

    fn check(
        &self,
        slot: usize,
        offset: u64,
        len: usize,
        gens: &[u32],
        full: bool,
    ) -> Result<(), String> {
        if full {
            let data = self.mem.get(DATA + (slot * MAX_LEN) as u64, len);
            return check(&data, offset / SECTOR, gens, true);
        }
        // The first unit of each sector only, read in place.
        let m = self.mem.0.lock().map_err(|_| "memory".to_string())?;
        let at = DATA as usize + slot * MAX_LEN;
        let mut unit = [0u8; 16];
        for i in 0..len / SECTOR as usize {
            let o = at + i * SECTOR as usize;
            unit.copy_from_slice(&m[o..o + 16]);
            let sector = offset / SECTOR + i as u64;
            let mut want = [0u8; 16];
            stamp(&mut want, sector, gens);
            if unit != want {
                return Err(format!(
                    "sector {sector}: read sector {} generation {}, expected generation {}",
                    u64::from_le_bytes(unit[..8].try_into().unwrap_or_default()),
                    u32::from_le_bytes(unit[8..12].try_into().unwrap_or_default()),
                    gens[sector as usize]
                ));
            }
        }
        Ok(())
    }
}

/// This thread's namespace's UDP error counters (`/proc/net/snmp`):
/// datagrams the kernel dropped before a socket saw them.
fn udp_counters() -> String {
    let Ok(t) = std::fs::read_to_string("/proc/thread-self/net/snmp") else {
        return "unknown".into();
    };
    let mut lines = t.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return "unknown".into();
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .skip(1)
        .filter(|(k, _)| k.contains("Errors"))
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `qemu-nbd` in the server namespace, killed on drop.
struct NbdServer(Child);

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl NbdServer {
    fn start(topo: &Topology, file: &std::path::Path) -> Result<NbdServer> {
        let child = Command::new("ip")
            .args(["netns", "exec", topo.server_netns(), "qemu-nbd"])
            .args(["--format=raw", "--persistent", "--export-name=blk"])
            .arg(format!("--bind={}", topo.server_ip()))
            .arg(format!("--port={NBD_PORT}"))
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context(
                "starting qemu-nbd (Debian package qemu-utils; scripts/setup.sh installs it)",
            )?;
        Ok(NbdServer(child))
    }
}

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_REPLY_MAGIC: u32 = 0x6744_6698;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const NBD_OPT_EXPORT_NAME: u32 = 1;
const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1;
const NBD_FLAG_NO_ZEROES: u16 = 2;
const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
const NBD_CMD_READ: u16 = 0;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_DISC: u16 = 2;
const NBD_CMD_FLUSH: u16 = 3;

/// A small NBD client (the fixed newstyle handshake, simple replies):
/// requests go out as they are submitted, replies are read with a
/// blocking socket.
struct Nbd {
    sock: TcpStream,
    /// Each slot's read buffer, and the request length.
    bufs: Vec<Vec<u8>>,
    lens: Vec<(Op, usize)>,
    out: Vec<u8>,
    /// Whether the export takes flushes.
    flush: bool,
}

impl Nbd {
    /// Connects to `server` (retrying while it starts).
    fn connect(topo: &Topology, server: &mut NbdServer) -> Result<Nbd> {
        let to = SocketAddr::from((topo.server_ip(), NBD_PORT));
        let t0 = Instant::now();
        let sock = loop {
            match topo.run(Side::Client, move || {
                TcpStream::connect_timeout(&to, Duration::from_millis(200))
            })? {
                Ok(s) => break s,
                Err(e) => {
                    if let Some(st) = server.0.try_wait()? {
                        let mut err = String::new();
                        if let Some(mut e) = server.0.stderr.take() {
                            let _ = e.read_to_string(&mut err);
                        }
                        bail!("qemu-nbd exited ({st}): {}", err.trim());
                    }
                    if t0.elapsed() > Duration::from_secs(5) {
                        bail!("qemu-nbd did not listen on {to} within 5 s: {e}");
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(WAIT_LIMIT))?;
        let mut n = Nbd {
            sock,
            bufs: (0..DEPTH).map(|_| vec![0u8; MAX_LEN]).collect(),
            lens: vec![(Op::Read, 0); DEPTH],
            out: Vec::with_capacity(MAX_LEN + 28),
            flush: false,
        };
        n.handshake()?;
        Ok(n)
    }

    fn handshake(&mut self) -> Result<()> {
        let mut hello = [0u8; 18];
        self.sock
            .read_exact(&mut hello)
            .context("NBD: reading the server's greeting")?;
        ensure!(
            &hello[..8] == b"NBDMAGIC" && u64::from_be_bytes(hello[8..16].try_into()?) == IHAVEOPT,
            "NBD: not a newstyle server"
        );
        let flags = u16::from_be_bytes([hello[16], hello[17]]);
        ensure!(
            flags & NBD_FLAG_FIXED_NEWSTYLE != 0,
            "NBD: not fixed newstyle"
        );
        let no_zeroes = flags & NBD_FLAG_NO_ZEROES != 0;
        let cflags = u32::from(NBD_FLAG_FIXED_NEWSTYLE | if no_zeroes { 2 } else { 0 });
        let name = b"blk";
        let mut m = Vec::new();
        m.extend_from_slice(&cflags.to_be_bytes());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&NBD_OPT_EXPORT_NAME.to_be_bytes());
        m.extend_from_slice(&(name.len() as u32).to_be_bytes());
        m.extend_from_slice(name);
        self.sock.write_all(&m)?;
        let mut info = vec![0u8; if no_zeroes { 10 } else { 134 }];
        self.sock
            .read_exact(&mut info)
            .context("NBD: the export was refused")?;
        let size = u64::from_be_bytes(info[..8].try_into()?);
        ensure!(size == DISK, "NBD: export of {size} bytes, expected {DISK}");
        let tflags = u16::from_be_bytes([info[8], info[9]]);
        self.flush = tflags & NBD_FLAG_SEND_FLUSH != 0;
        Ok(())
    }

    fn disconnect(&mut self) {
        let mut m = [0u8; 28];
        m[..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        m[6..8].copy_from_slice(&NBD_CMD_DISC.to_be_bytes());
        let _ = self.sock.write_all(&m);
    }
}

impl Disk for Nbd {
    fn name(&self) -> &'static str {
        "nbd"
    }

    fn slots(&self, _len: usize) -> usize {
        DEPTH
    }

    fn submit(&mut self, slot: usize, op: Op, offset: u64, len: usize, data: &[u8]) -> Result<()> {
        ensure!(
            op != Op::Flush || self.flush,
            "NBD: the export does not take flushes"
        );
        let cmd = match op {
            Op::Read => NBD_CMD_READ,
            Op::Write => NBD_CMD_WRITE,
            Op::Flush => NBD_CMD_FLUSH,
        };
        self.lens[slot] = (op, len);
        self.out.clear();
        self.out.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        self.out.extend_from_slice(&0u16.to_be_bytes());
        self.out.extend_from_slice(&cmd.to_be_bytes());
        self.out.extend_from_slice(&(slot as u64).to_be_bytes());
        self.out.extend_from_slice(&offset.to_be_bytes());
        let n = if op == Op::Flush { 0 } else { len as u32 };
        self.out.extend_from_slice(&n.to_be_bytes());
        if op == Op::Write {
            self.out.extend_from_slice(data);
        }
        self.sock.write_all(&self.out).context("NBD: sending")?;
        Ok(())
    }

    fn kick(&mut self) -> Result<()> {
        Ok(())
    }

    fn wait(&mut self, done: &mut Vec<usize>) -> Result<()> {
        let mut r = [0u8; 16];
        self.sock
            .read_exact(&mut r)
            .context("NBD: reading a reply")?;
        let magic = u32::from_be_bytes(r[..4].try_into()?);
        let err = u32::from_be_bytes(r[4..8].try_into()?);
        let slot = u64::from_be_bytes(r[8..].try_into()?) as usize;
        ensure!(magic == NBD_REPLY_MAGIC, "NBD: bad reply magic {magic:#x}");
        ensure!(slot < DEPTH, "NBD: reply to unknown handle {slot}");
        ensure!(
            err == 0,
            "NBD: request in slot {slot} failed with error {err}"
        );
        let (op, len) = self.lens[slot];
        if op == Op::Read {
            self.sock
                .read_exact(&mut self.bufs[slot][..len])
                .context("NBD: reading data")?;
        }
        done.push(slot);
        Ok(())
    }

    fn check(
        &self,
        slot: usize,
        offset: u64,
        len: usize,
        gens: &[u32],
        full: bool,
    ) -> Result<(), String> {
        check(&self.bufs[slot][..len], offset / SECTOR, gens, full)
    }
}

/// A disk and what its sectors should hold.
struct Bench<D: Disk> {
    disk: D,
    gens: Vec<u32>,
    next_gen: u32,
    rng: u64,
    buf: Vec<u8>,
}

impl<D: Disk> Bench<D> {
    fn new(disk: D, seed: u64) -> Bench<D> {
        Bench {
            disk,
            gens: vec![0; (DISK / SECTOR) as usize],
            next_gen: 1,
            rng: seed | 1,
            buf: vec![0; MAX_LEN],
        }
    }

    fn random_block(&mut self, len: usize) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % (DISK / len as u64)) * len as u64
    }

    /// Submits `op` of `len` bytes in `slot` at `offset` (a write's data
    /// stamped with a new generation).
    fn submit(&mut self, slot: usize, op: Op, offset: u64, len: usize) -> Result<()> {
        self.prepare(op, offset, len);
        self.send(slot, op, offset, len)
    }

    /// A write's data, stamped with a new generation.
    fn prepare(&mut self, op: Op, offset: u64, len: usize) {
        if op == Op::Write {
            let g = self.next_gen;
            self.next_gen += 1;
            let first = (offset / SECTOR) as usize;
            for s in &mut self.gens[first..first + len / SECTOR as usize] {
                *s = g;
            }
            stamp(&mut self.buf[..len], offset / SECTOR, &self.gens);
        }
    }

    /// Sends what [`Bench::prepare`] made.
    fn send(&mut self, slot: usize, op: Op, offset: u64, len: usize) -> Result<()> {
        let data = if op == Op::Write {
            &self.buf[..len]
        } else {
            &[][..]
        };
        self.disk.submit(slot, op, offset, len, data)
    }

    fn checked(&self, slot: usize, op: Op, offset: u64, len: usize, full: bool) -> Result<()> {
        if op != Op::Read {
            return Ok(());
        }
        self.disk
            .check(slot, offset, len, &self.gens, full)
            .map_err(|e| {
                anyhow::anyhow!(
                    "{}: wrong data read at offset {offset} ({len} bytes): {e}",
                    self.disk.name()
                )
            })
    }

    /// Random `op`s of `len` bytes one at a time, timed each.
    fn qd1(&mut self, op: Op, len: usize, ops: u32) -> Result<Latency> {
        let mut lat = Latency::new();
        let mut done = Vec::new();
        for i in 0..ops / 10 + ops {
            let at = self.random_block(len);
            self.prepare(op, at, len);
            let t0 = Instant::now();
            self.send(0, op, at, len)?;
            self.disk.kick()?;
            done.clear();
            while done.is_empty() {
                self.disk.wait(&mut done)?;
            }
            let ns = t0.elapsed().as_nanos() as u64;
            self.checked(0, op, at, len, false)?;
            if i >= ops / 10 {
                lat.record(ns);
            }
        }
        Ok(lat)
    }

    /// Random `op`s of `len` bytes, `depth` in flight (no two writes in
    /// flight on the same block); requests per second and the depth
    /// reached.
    fn qd(&mut self, op: Op, len: usize, depth: usize, full: bool) -> Result<(f64, usize)> {
        let depth = depth.min(self.disk.slots(len));
        let total = QD32_OPS.min(QD32_BYTES / len as u64);
        let deadline = Duration::from_secs_f64(QD32_SECS);
        let mut inflight: HashMap<usize, u64> = HashMap::new();
        let mut issued = 0u64;
        let mut completed = 0u64;
        let mut done = Vec::new();
        let t0 = Instant::now();
        let next = |s: &mut Self, inflight: &HashMap<usize, u64>| loop {
            let at = s.random_block(len);
            if op != Op::Write || !inflight.values().any(|&o| o == at) {
                return at;
            }
        };
        for slot in 0..depth.min(total as usize) {
            let at = next(self, &inflight);
            inflight.insert(slot, at);
            self.submit(slot, op, at, len)?;
            issued += 1;
        }
        self.disk.kick()?;
        let mut elapsed = t0.elapsed();
        while !inflight.is_empty() {
            done.clear();
            self.disk.wait(&mut done)?;
            elapsed = t0.elapsed();
            let more = elapsed < deadline;
            let mut sent = false;
            for &slot in &done {
                let Some(at) = inflight.remove(&slot) else {
                    bail!("{}: slot {slot} completed twice", self.disk.name());
                };
                completed += 1;
                self.checked(slot, op, at, len, full)?;
                if more && issued < total {
                    let at = next(self, &inflight);
                    inflight.insert(slot, at);
                    self.submit(slot, op, at, len)?;
                    issued += 1;
                    sent = true;
                }
            }
            if sent {
                self.disk.kick()?;
            }
        }
        Ok((completed as f64 / elapsed.as_secs_f64(), depth))
    }

    /// Flushes, then reads the whole disk back and checks every byte.
    fn verify(&mut self) -> Result<()> {
        self.submit(0, Op::Flush, 0, 0)?;
        self.disk.kick()?;
        let mut done = Vec::new();
        self.disk.wait(&mut done)?;
        let len = MAX_LEN;
        let depth = DEPTH.min(self.disk.slots(len));
        let blocks = DISK / len as u64;
        let mut next = 0u64;
        let mut inflight: HashMap<usize, u64> = HashMap::new();
        for slot in 0..depth {
            inflight.insert(slot, next * len as u64);
            self.submit(slot, Op::Read, next * len as u64, len)?;
            next += 1;
        }
        self.disk.kick()?;
        while !inflight.is_empty() {
            done.clear();
            self.disk.wait(&mut done)?;
            for &slot in &done {
                let at = inflight.remove(&slot).context("slot completed twice")?;
                self.checked(slot, Op::Read, at, len, true)?;
                if next < blocks {
                    inflight.insert(slot, next * len as u64);
                    self.submit(slot, Op::Read, next * len as u64, len)?;
                    next += 1;
                }
            }
            if !inflight.is_empty() {
                self.disk.kick()?;
            }
        }
        Ok(())
    }
}

/// An image file, removed on drop.
struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Image {
    /// A raw image of [`DISK`] bytes stamped with generation 0.
    fn new(what: &str) -> Result<Image> {
        let p = std::env::temp_dir().join(format!("dpbench-blk-{what}-{}.img", std::process::id()));
        let img = Image(p);
        let gens = vec![0u32; (DISK / SECTOR) as usize];
        let mut f = std::fs::File::create(&img.0)
            .with_context(|| format!("creating {}", img.0.display()))?;
        let mut chunk = vec![0u8; 1 << 20];
        for i in 0..DISK / chunk.len() as u64 {
            stamp(&mut chunk, i * (1 << 20) / SECTOR, &gens);
            f.write_all(&chunk)?;
        }
        f.sync_all()?;
        Ok(img)
    }
}

/// The untagged client's address: the client's /24, host 3 (the client
/// is 1, the server 2).
fn plain_ip(topo: &Topology) -> std::net::Ipv4Addr {
    let [a, b, c, _] = topo.client_ip().octets();
    std::net::Ipv4Addr::new(a, b, c, 3)
}

fn server_config(topo: &Topology, disk: &std::path::Path, plain: &std::path::Path) -> ServerConfig {
    ServerConfig {
        server: ServerSection {
            id: SERVER,
            port: PORT,
            mode: Mode::Xdp,
            interface: Some(topo.server_ifname().to_string()),
            workers: vec![WORKER_CORE],
            pin_dir: Some(format!("/sys/fs/bpf/dpbench-blk-{}", std::process::id()).into()),
            check_clients: true,
        },
        tuning: Tuning {
            // Spins while block requests are in flight and a little after
            // (a few milliseconds), then sleeps: qemu-nbd's turns get the
            // core.
            spin_budget: 20_000,
            idle_sleep_us: 100,
            batch: 64,
        },
        clients: vec![
            ClientConfig {
                tag_key: Some(keys::client_key(CLIENT)),
                id: CLIENT,
                address: topo.client_ip(),
                budget: None,
            },
            ClientConfig {
                tag_key: None,
                id: PLAIN_CLIENT,
                address: plain_ip(topo),
                budget: None,
            },
        ],
        vms: vec![
            VmConfig {
                id: VM,
                client: CLIENT,
                hypervisor: HV,
            },
            VmConfig {
                id: PLAIN_VM,
                client: PLAIN_CLIENT,
                hypervisor: HV,
            },
        ],
        models: vec![
            ModelConfig {
                mmio_base: Some(STORE_GPA),
                backing: Some(disk.to_path_buf()),
                ..ModelConfig::new(STORE, "blockstore", 0)
            },
            ModelConfig {
                mmio_base: Some(STORE_GPA),
                backing: Some(plain.to_path_buf()),
                ..ModelConfig::new(PLAIN_STORE, "blockstore", 0)
            },
        ],
    }
}

/// The rows' names and what they measure, in order.
const QD32_ROWS: [(&str, Op, usize); 4] = [
    ("read-4k-qd32", Op::Read, 4096),
    ("write-4k-qd32", Op::Write, 4096),
    ("read-128k-qd32", Op::Read, 128 << 10),
    ("write-128k-qd32", Op::Write, 128 << 10),
];

/// Runs the scenario: every measurement on NBD, then on devplane, one
/// after the other.
pub fn run(notes: &mut Vec<String>) -> Result<Vec<Row>> {
    // Jumbo frames, as a storage network has them: the veth's MTU (both
    // ends), NBD's TCP and devplane's bulk datagrams alike.
    let mtu = crate::rig::knob("DP_BLK_MTU", devplane_wire::bulk::JUMBO_MTU as u32);
    let topo = Topology::with_mtu("bb", mtu).context("building the netns topology")?;
    let dp_img = Image::new("dp")?;
    let plain_img = Image::new("plain")?;
    let nbd_img = Image::new("nbd")?;
    topo.exec(
        Side::Client,
        [
            "ip",
            "addr",
            "add",
            &format!("{}/24", plain_ip(&topo)),
            "dev",
            topo.client_ifname(),
        ],
    )
    .context("adding the untagged client's address")?;
    let server = ServerThread::spawn(
        server_config(&topo, &dp_img.0, &plain_img.0),
        Some(topo.server_netns()),
    )
    .context("starting the devplane server")?;
    let mut nbd_server = NbdServer::start(&topo, &nbd_img.0)?;
    let nbd = Nbd::connect(&topo, &mut nbd_server)?;
    let dp = Devplane::new(&topo, false)?;
    let plain = Devplane::new(&topo, true)?;
    // The driver and the NBD client run on the client's core, as a vCPU
    // would.
    let (rows, n) = topo.run(Side::Client, move || -> Result<_> {
        let _ = affinity::set_thread_affinity([CLIENT_CORE]);
        let mut nbd = Bench::new(nbd, 0x5eed_0001);
        let mut dp = Bench::new(dp, 0x5eed_0001);
        let mut plain = Bench::new(plain, 0x5eed_0001);
        let mut rows = Vec::new();
        let mut n = Vec::new();
        for (name, op) in [("read-4k-qd1", Op::Read), ("write-4k-qd1", Op::Write)] {
            progress(format_args!("blk: {name}, {QD1_OPS} requests each"));
            let resent = dp.disk.resent();
            let floor = nbd.qd1(op, 4096, QD1_OPS)?;
            let lat = dp.qd1(op, 4096, QD1_OPS)?;
            let resent = dp.disk.resent() - resent;
            if resent > 0 {
                n.push(warning(format!(
                    "blk: {name}: the bulk disk sent {resent} datagrams again (no loss \
                     injected)"
                )));
            }
            let f = Floor::of(format!("{SCENARIO}/nbd-{name}"), &floor);
            let m = mtu.to_string();
            rows.push(
                Row::floor(SCENARIO, format!("nbd-{name}"), floor).with_knobs([
                    ("disk", "qemu-nbd"),
                    ("depth", "1"),
                    ("mtu", m.as_str()),
                ]),
            );
            rows.push(Row::latency(SCENARIO, name, lat, f).with_knobs([
                ("disk", "devplane"),
                ("depth", "1"),
                ("mtu", m.as_str()),
            ]));
        }
        for (name, op, len) in QD32_ROWS {
            progress(format_args!("blk: {name}"));
            let (nrate, nd) = nbd.qd(op, len, DEPTH, false)?;
            let (rate, d) = dp.qd(op, len, DEPTH, false)?;
            let mib = |r: f64| r * len as f64 / f64::from(1 << 20);
            rows.push(
                Row::rate(SCENARIO, format!("nbd-{name}"), nrate).with_knobs([
                    ("disk", "qemu-nbd".to_string()),
                    ("mtu", mtu.to_string()),
                    ("depth", nd.to_string()),
                    ("mib_per_s", format!("{:.1}", mib(nrate))),
                ]),
            );
            rows.push(Row::rate(SCENARIO, name, rate).with_knobs([
                ("disk", "devplane".to_string()),
                ("mtu", mtu.to_string()),
                ("depth", d.to_string()),
                ("mib_per_s", format!("{:.1}", mib(rate))),
                ("vs_nbd", format!("{:.2}", rate / nrate)),
            ]));
            let (prate, pd) = plain.qd(op, len, DEPTH, false)?;
            rows.push(
                Row::rate(SCENARIO, format!("{name}-untagged"), prate).with_knobs([
                    ("disk", "devplane, no tags".to_string()),
                    ("mtu", mtu.to_string()),
                    ("depth", pd.to_string()),
                    ("mib_per_s", format!("{:.1}", mib(prate))),
                    ("vs_nbd", format!("{:.2}", prate / nrate)),
                ]),
            );
            if d.min(pd) < DEPTH {
                n.push(format!(
                    "blk: {name}: {d} requests in flight on devplane (tagged), {pd} untagged, \
                     not {DEPTH}"
                ));
            }
        }
        progress("blk: reading the disks back");
        nbd.verify()?;
        dp.verify()?;
        plain.verify()?;
        nbd.disk.disconnect();
        let errors = dp.disk.errors() + plain.disk.errors();
        ensure!(errors == 0, "devplane: {errors} requests failed");
        n.push(format!(
            "blk: the three disks read back whole and checked; the bulk disks sent {} \
             datagrams again in the run (no loss injected); tagged {}; untagged {}; \
             client UDP: {}",
            dp.disk.resent() + plain.disk.resent(),
            dp.disk.counters(),
            plain.disk.counters(),
            udp_counters()
        ));
        Ok((rows, n))
    })??;
    let snap = server.snapshot();
    let applied: u64 = snap.workers.iter().map(|w| w.bulk_applied).sum();
    let sum = |f: fn(&devplane_server::stats::WorkerSnapshot) -> u64| -> u64 {
        snap.workers.iter().map(f).sum()
    };
    notes.push(format!(
        "blk: server: {} block datagrams, {} answers, {} duplicates, tx {}, tx_full {}, \
         xsk_tx_invalid {}, xsk_rx_dropped {}, xsk_rx_ring_full {}, fill_ring_empty {}",
        sum(|w| w.bulk_datagrams),
        sum(|w| w.bulk_answers),
        sum(|w| w.bulk_duplicates),
        sum(|w| w.tx),
        sum(|w| w.tx_full),
        sum(|w| w.xsk_tx_invalid),
        sum(|w| w.xsk_rx_dropped),
        sum(|w| w.xsk_rx_ring_full),
        sum(|w| w.xsk_fill_ring_empty),
    ));
    server.stop();
    drop(nbd_server);
    notes.extend(n);
    notes.push(format!(
        "blk: devplane: virtio-blk -> bulk disk -> XDP -> blockstore (io_uring, buffered), \
         tags on (the `-untagged` rows: a second client without a tag key, its own \
         address, VM and blockstore on the same worker), {applied} writes and flushes \
         applied; NBD: qemu-nbd (raw, writeback) over \
         TCP, the benchmark's NBD client; both drivers on core {CLIENT_CORE}, the devplane \
         worker on core {WORKER_CORE}; veth MTU {mtu} (DP_BLK_MTU): bulk datagrams of up \
         to {} data bytes, {} per 128 KiB request",
        devplane_wire::bulk::seg_max_for_mtu(mtu as usize),
        devplane_wire::bulk::segments_for(
            128 << 10,
            devplane_wire::bulk::seg_max_for_mtu(mtu as usize)
        ),
    ));
    Ok(rows)
}

/// Notes judging the rows against the goals: 4 KiB QD1 p50 at most
/// NBD's, QD32 requests/s at least NBD's.
pub fn goal(rows: &[Row]) -> Vec<String> {
    let get = |name: &str| rows.iter().find(|r| r.name == name);
    let mut out = Vec::new();
    for name in ["read-4k-qd1", "write-4k-qd1"] {
        let (Some(r), Some(n)) = (get(name), get(&format!("nbd-{name}"))) else {
            continue;
        };
        let (Some(h), Some(nh)) = (&r.hist, &n.hist) else {
            continue;
        };
        let (p50, np50) = (h.quantile(0.5), nh.quantile(0.5));
        let (p99, np99) = (h.quantile(0.99), nh.quantile(0.99));
        let ratio = p50 as f64 / np50.max(1) as f64;
        out.push(format!(
            "blk: {name}: p50 {:.1} us vs NBD's {:.1} us ({ratio:.2}x; goal <= 1x: {}), \
             p99 {:.1} us vs {:.1} us",
            p50 as f64 / 1e3,
            np50 as f64 / 1e3,
            if ratio <= 1.0 { "met" } else { "NOT met" },
            p99 as f64 / 1e3,
            np99 as f64 / 1e3,
        ));
    }
    for (name, _, len) in QD32_ROWS {
        let Some(n) = get(&format!("nbd-{name}")) else {
            continue;
        };
        for (row, what) in [
            (name.to_string(), ""),
            (
                format!("{name}-untagged"),
                ", without tags as NBD (which authenticates nothing)",
            ),
        ] {
            let Some(r) = get(&row) else {
                continue;
            };
            let (Some(a), Some(b)) = (r.rate, n.rate) else {
                continue;
            };
            let ratio = a / b.max(1e-9);
            let mib = |r: f64| r * len as f64 / f64::from(1 << 20);
            out.push(format!(
                "blk: {row}: {a:.0} requests/s ({:.0} MiB/s) vs NBD's {b:.0} ({:.0} MiB/s): \
                 {ratio:.2}x (goal >= 1x{what}: {})",
                mib(a),
                mib(b),
                if ratio >= 1.0 { "met" } else { "NOT met" },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_sectors_check_and_a_wrong_one_is_named() {
        let mut gens = vec![0u32; 64];
        gens[9] = 4;
        let mut b = vec![0u8; 4096];
        stamp(&mut b, 8, &gens);
        assert!(check(&b, 8, &gens, true).is_ok());
        assert!(check(&b, 8, &gens, false).is_ok());
        // A stale generation in sector 9.
        gens[9] = 5;
        let e = check(&b, 8, &gens, false).unwrap_err();
        assert!(
            e.contains("sector 9") && e.contains("expected generation 5"),
            "{e}"
        );
        gens[9] = 4;
        // A byte wrong past the first unit: only the full check sees it.
        b[600] ^= 1;
        assert!(check(&b, 8, &gens, false).is_ok());
        assert!(check(&b, 8, &gens, true).is_err());
    }

    /// Every request, the largest included, fits its slot's indirect
    /// table (header, 16 KiB data descriptors, status), and a full queue
    /// depth fits the ring (one entry per request).
    #[test]
    fn requests_fit_their_tables_and_the_ring() {
        assert_eq!(TABLE_SLOT, 16 * 10);
        assert_eq!(
            16 * (2 + MAX_LEN.div_ceil(SIZE_MAX as usize)) as u64,
            TABLE_SLOT
        );
        assert!(QUEUE_SIZE as usize >= DEPTH);
    }
}
