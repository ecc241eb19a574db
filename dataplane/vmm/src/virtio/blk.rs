//! A virtio block device with the legacy virtio-pci register file (an I/O
//! BAR), one request queue, and its disk in a `blockstore` model reached
//! through a [`StorePort`].
//!
//! Two ways to serve requests. With a disk reached through its register
//! window (a local `blockstore`, or tests) they are served synchronously
//! in the vCPU thread that wrote `QUEUE_NOTIFY`: the guest's notify exit
//! returns once every published request is complete. With a remote disk
//! in bulk ([`VirtioBlk::with_bulk`], [`super::bulk`]) each descriptor
//! chain becomes one block request, sent at once; the notify exit returns
//! right away, many requests are in flight, and each completes (data
//! copied into the guest's buffers, status written, used-ring entry
//! published, interrupt pulsed) on the disk's I/O thread when its answer
//! arrives, out of order as virtio allows.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use devplane_wire::bulk::{BlockOp, BlockStatus, MAX_BLOCK_LEN};
use devplane_wire::{AccessSize, IrqAction};

use super::VirtioError;
use super::bulk::{BulkConfig, BulkDisk, Completion};
use super::queue::{Descriptor, DmaMemory, Queue, VIRTIO_RING_F_INDIRECT_DESC};
use super::store::{Store, StorePort};
use crate::kvm::IrqLine;

/// Legacy register: device features (read-only, 32 bits).
pub const REG_HOST_FEATURES: u64 = 0x00;
/// Legacy register: features the driver accepted.
pub const REG_GUEST_FEATURES: u64 = 0x04;
/// Legacy register: page frame number of the selected queue's ring.
pub const REG_QUEUE_PFN: u64 = 0x08;
/// Legacy register: size of the selected queue (read-only, 16 bits).
pub const REG_QUEUE_NUM: u64 = 0x0c;
/// Legacy register: queue selector (16 bits).
pub const REG_QUEUE_SEL: u64 = 0x0e;
/// Legacy register: queue notify (16 bits, write-only).
pub const REG_QUEUE_NOTIFY: u64 = 0x10;
/// Legacy register: device status (8 bits).
pub const REG_STATUS: u64 = 0x12;
/// Legacy register: interrupt status (8 bits; reading clears it).
pub const REG_ISR: u64 = 0x13;
/// Start of the device-specific configuration (no MSI-X).
pub const REG_CONFIG: u64 = 0x14;
/// Bytes of the device-specific configuration: `virtio_blk_config` up to
/// and including `write_zeroes_may_unmap` (its padding counted).
pub const CONFIG_LEN: u64 = 60;
/// Size of the I/O BAR (a power of two covering the registers and the
/// configuration).
pub const BAR_SIZE: u64 = 0x80;

/// Most virtio-blk devices a VM has: PCI device numbers 1 to 31 on the
/// host bridge.
pub const MAX_DEVICES: usize = 31;

/// What is wrong with a virtio-blk device's I/O BAR at `base` (`len`
/// ports, in `space`), if anything: it must be [`BAR_SIZE`] ports, aligned
/// to its size (a guest that sizes the BAR and writes its base back would
/// move an unaligned one), within the 64 Ki ports.
pub fn bar_problem(space: devplane_devmodels::Space, base: u64, len: u64) -> Option<String> {
    if space != devplane_devmodels::Space::Pio || len != BAR_SIZE || base > 0xffff - (BAR_SIZE - 1)
    {
        return Some(format!(
            "a virtio-blk device is a port range of {BAR_SIZE:#x} ports (its I/O BAR)"
        ));
    }
    if !base.is_multiple_of(BAR_SIZE) {
        return Some(format!(
            "its I/O BAR at {base:#x} is not aligned to its {BAR_SIZE:#x} ports"
        ));
    }
    None
}
// The whole configuration fits in the BAR, which is a power of two.
const _: () = assert!(REG_CONFIG + CONFIG_LEN <= BAR_SIZE && BAR_SIZE.is_power_of_two());

/// Feature: the device has a volatile write cache and honours FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u32 = 1 << 9;
/// Feature: `seg_max` in the configuration is valid.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 1 << 2;
/// Feature: `size_max` in the configuration is valid.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1 << 1;
/// Feature: the device serves DISCARD (a bulk disk only: the disk punches
/// a hole, or writes zeros where its file system cannot).
pub const VIRTIO_BLK_F_DISCARD: u32 = 1 << 13;
/// Feature: the device serves WRITE_ZEROES (a bulk disk only).
pub const VIRTIO_BLK_F_WRITE_ZEROES: u32 = 1 << 14;
/// Sectors one DISCARD or WRITE_ZEROES segment may cover: one block
/// request's worth.
pub const MAX_DISCARD_SECTORS: u32 = MAX_BLOCK_LEN / 512;
/// Data segments per request the device accepts.
pub const SEG_MAX: u32 = 64;
/// Largest data segment: `SEG_MAX * SIZE_MAX` is the largest block
/// request ([`MAX_BLOCK_LEN`]).
pub const SIZE_MAX: u32 = MAX_BLOCK_LEN / SEG_MAX;
/// Entries of the request queue.
pub const QUEUE_SIZE: u16 = 256;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const SECTOR: u64 = 512;
/// The serial number GET_ID returns (at most 20 bytes).
pub const DEVICE_ID: &[u8] = b"devplane-blk";

/// Counters of one block device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlkStats {
    /// Requests completed.
    pub requests: u64,
    /// Of those, completed with an error status.
    pub errors: u64,
    /// Bytes read from the disk into the guest.
    pub bytes_read: u64,
    /// Bytes written from the guest to the disk.
    pub bytes_written: u64,
    /// Flushes.
    pub flushes: u64,
}

/// A request in flight to a bulk disk: where its answer goes.
#[derive(Debug, Clone)]
struct InFlight {
    head: u16,
    /// The data buffers (a read's data is copied into them).
    data: Vec<Descriptor>,
    /// The status byte's buffer.
    status: Descriptor,
    read: bool,
}

/// What completes requests on the bulk disk's I/O thread.
struct Completer {
    mem: Box<dyn DmaMemory + Send>,
    irq: IrqLine,
    /// The used side of the queue (its ring's place and next index).
    used: Queue,
    inflight: HashMap<u64, InFlight>,
    /// The chain heads of `inflight`, one bit each: a head is in flight
    /// at most once, so a device holds at most [`QUEUE_SIZE`] requests
    /// (each at most [`MAX_BLOCK_LEN`]) whatever the guest publishes.
    busy: [u64; QUEUE_SIZE as usize / 64],
    stats: BlkStats,
}

impl Completer {
    fn busy(&self, head: u16) -> bool {
        let h = usize::from(head);
        self.busy
            .get(h / 64)
            .is_some_and(|w| w & (1 << (h % 64)) != 0)
    }

    fn set_busy(&mut self, head: u16, on: bool) {
        let h = usize::from(head);
        if let Some(w) = self.busy.get_mut(h / 64) {
            if on {
                *w |= 1 << (h % 64);
            } else {
                *w &= !(1 << (h % 64));
            }
        }
    }
}

impl Completer {
    /// Writes a request's data and status, publishes its used entry and
    /// pulses the interrupt.
    fn complete(&mut self, f: &InFlight, st: u8, data: &[u8], isr: &AtomicU8) {
        let mut written = 0u32;
        if f.read && st == S_OK {
            let mut at = 0usize;
            for d in &f.data {
                let n = (d.len as usize).min(data.len().saturating_sub(at));
                if self.mem.write(d.addr, &data[at..at + n]).is_err() {
                    break;
                }
                at += n;
                written += n as u32;
            }
            self.stats.bytes_read += u64::from(written);
        }
        if self.mem.write(f.status.addr, &[st]).is_ok() {
            written += 1;
        }
        self.stats.requests += 1;
        if st != S_OK {
            self.stats.errors += 1;
        }
        if self
            .used
            .push_used(self.mem.as_ref(), f.head, written)
            .is_err()
        {
            return;
        }
        isr.fetch_or(1, Ordering::SeqCst);
        let _ = self.irq.trigger(IrqAction::Edge);
    }
}

/// A virtio-blk device's remote disk in bulk.
struct Bulk {
    disk: BulkDisk,
    side: Arc<Mutex<Completer>>,
    next_token: u64,
}

/// A virtio block device.
pub struct VirtioBlk {
    mem: Box<dyn DmaMemory + Send>,
    irq: IrqLine,
    queue: Queue,
    queue_sel: u16,
    guest_features: u32,
    status: u8,
    isr: Arc<AtomicU8>,
    bulk: Option<Bulk>,
    /// Disk capacity in bytes, asked of the store at first use.
    capacity: Option<u64>,
    stats: BlkStats,
}

impl VirtioBlk {
    /// A device that reaches guest memory through `mem` and raises its
    /// interrupt on `irq` (one edge per completion batch).
    pub fn new(mem: Box<dyn DmaMemory + Send>, irq: IrqLine) -> VirtioBlk {
        VirtioBlk {
            mem,
            irq,
            queue: Queue::new(QUEUE_SIZE),
            queue_sel: 0,
            guest_features: 0,
            status: 0,
            isr: Arc::new(AtomicU8::new(0)),
            bulk: None,
            capacity: None,
            stats: BlkStats::default(),
        }
    }

    /// Serves requests as block requests in bulk to a remote disk
    /// ([`super::bulk`]); completions write guest memory through `mem`
    /// and pulse `irq` from the disk's I/O thread. The register port
    /// still answers the capacity.
    pub fn with_bulk(
        mut self,
        cfg: BulkConfig,
        mem: Box<dyn DmaMemory + Send>,
        irq: IrqLine,
    ) -> std::io::Result<VirtioBlk> {
        let side = Arc::new(Mutex::new(Completer {
            mem,
            irq,
            used: Queue::new(QUEUE_SIZE),
            inflight: HashMap::new(),
            busy: [0; QUEUE_SIZE as usize / 64],
            stats: BlkStats::default(),
        }));
        let s = Arc::clone(&side);
        let isr = Arc::clone(&self.isr);
        let on_complete = Box::new(move |c: Completion| {
            let Ok(mut side) = s.lock() else { return };
            let Some(f) = side.inflight.remove(&c.token) else {
                return;
            };
            side.set_busy(f.head, false);
            let st = match c.status {
                BlockStatus::Ok => S_OK,
                BlockStatus::Unsupported => S_UNSUPP,
                _ => S_IOERR,
            };
            side.complete(&f, st, &c.data, &isr);
        });
        let disk = BulkDisk::start(cfg, on_complete)?;
        self.bulk = Some(Bulk {
            disk,
            side,
            next_token: 0,
        });
        Ok(self)
    }

    /// Its counters (with a bulk disk, those of requests completed too).
    pub fn stats(&self) -> BlkStats {
        let mut s = self.stats;
        if let Some(b) = &self.bulk
            && let Ok(side) = b.side.lock()
        {
            s.requests += side.stats.requests;
            s.errors += side.stats.errors;
            s.bytes_read += side.stats.bytes_read;
        }
        s
    }

    /// The bulk disk's counters, with a bulk disk.
    pub fn bulk_stats(&self) -> Option<&super::bulk::BulkStats> {
        self.bulk.as_ref().map(|b| b.disk.stats())
    }

    /// The bulk disk's counters to keep, with a bulk disk (the device
    /// itself moves to the vCPU threads' buses).
    pub fn bulk_stats_handle(&self) -> Option<std::sync::Arc<super::bulk::BulkStats>> {
        self.bulk.as_ref().map(|b| b.disk.stats_handle())
    }

    /// What the device offers. DISCARD and WRITE_ZEROES only with a bulk
    /// disk: the register window has no request for them.
    fn host_features(&self) -> u32 {
        let base = VIRTIO_BLK_F_FLUSH
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_SIZE_MAX
            | VIRTIO_RING_F_INDIRECT_DESC;
        if self.bulk.is_some() {
            base | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES
        } else {
            base
        }
    }

    /// Keeps the bulk completer's view of the queue's place in step.
    fn sync_used(&mut self) {
        if let Some(b) = &self.bulk
            && let Ok(mut side) = b.side.lock()
        {
            side.used.pfn = self.queue.pfn;
            if self.queue.pfn == 0 {
                side.used.reset();
            }
        }
    }

    /// `virtio_blk_config` (legacy layout): capacity, size_max, seg_max;
    /// geometry, blk_size, topology and writeback left zero (not offered);
    /// with a bulk disk the discard and write-zeroes limits: one segment
    /// of at most one block request, any sector alignment, and a
    /// write-zeroes that may unmap (the disk punches a hole when it can).
    fn config(&mut self, port: &mut dyn StorePort) -> [u8; CONFIG_LEN as usize] {
        if self.capacity.is_none() {
            self.capacity = Store(port).capacity().ok();
        }
        let mut c = [0u8; CONFIG_LEN as usize];
        let sectors = self.capacity.unwrap_or(0) / SECTOR;
        c[0..8].copy_from_slice(&sectors.to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        if self.bulk.is_some() {
            c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[40..44].copy_from_slice(&1u32.to_le_bytes());
            c[44..48].copy_from_slice(&1u32.to_le_bytes());
            c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
            c[52..56].copy_from_slice(&1u32.to_le_bytes());
            c[56] = 1;
        }
        c
    }

    /// A register read of `size` bytes at `offset` in the I/O BAR.
    pub fn read(&mut self, offset: u64, size: AccessSize, port: &mut dyn StorePort) -> u64 {
        let v = match offset {
            REG_HOST_FEATURES => u64::from(self.host_features()),
            REG_GUEST_FEATURES => u64::from(self.guest_features),
            REG_QUEUE_PFN if self.queue_sel == 0 => u64::from(self.queue.pfn),
            REG_QUEUE_NUM if self.queue_sel == 0 => u64::from(QUEUE_SIZE),
            REG_QUEUE_PFN | REG_QUEUE_NUM => 0,
            REG_QUEUE_SEL => u64::from(self.queue_sel),
            REG_STATUS => u64::from(self.status),
            REG_ISR => u64::from(self.isr.swap(0, Ordering::SeqCst)),
            o if (REG_CONFIG..REG_CONFIG + CONFIG_LEN).contains(&o) => {
                let c = self.config(port);
                let start = (o - REG_CONFIG) as usize;
                let mut b = [0u8; 8];
                for (i, slot) in b.iter_mut().enumerate().take(size.bytes()) {
                    *slot = c.get(start + i).copied().unwrap_or(0);
                }
                u64::from_le_bytes(b)
            }
            _ => 0,
        };
        v & size.mask()
    }

    /// A register write of `size` bytes of `data` at `offset`.
    pub fn write(&mut self, offset: u64, _size: AccessSize, data: u64, port: &mut dyn StorePort) {
        match offset {
            REG_GUEST_FEATURES => {
                self.guest_features = data as u32 & self.host_features();
                self.queue.indirect = self.guest_features & VIRTIO_RING_F_INDIRECT_DESC != 0;
            }
            REG_QUEUE_PFN if self.queue_sel == 0 => {
                if data == 0 {
                    self.queue.reset();
                } else {
                    self.queue.pfn = data as u32;
                }
                self.sync_used();
            }
            REG_QUEUE_SEL => self.queue_sel = data as u16,
            REG_QUEUE_NOTIFY if data == 0 => self.notify(port),
            REG_STATUS => {
                self.status = data as u8;
                if self.status == 0 {
                    self.reset();
                }
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.queue.reset();
        self.queue.indirect = false;
        self.queue_sel = 0;
        self.guest_features = 0;
        self.isr.store(0, Ordering::SeqCst);
        self.sync_used();
    }

    /// The next chain the driver published, if any; a broken queue is
    /// reported and left until the driver resets it.
    fn next_head(&mut self) -> Option<u16> {
        match self.queue.pop(self.mem.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                eprintln!("virtio-blk: {e}; queue left until the driver resets it");
                None
            }
        }
    }

    /// Serves every request the driver published, then interrupts once
    /// (with a bulk disk: sends each as a block request).
    fn notify(&mut self, port: &mut dyn StorePort) {
        if self.bulk.is_some() {
            self.notify_bulk(port);
            return;
        }
        let mut served = 0;
        while let Some(head) = self.next_head() {
            let written = match self.queue.chain(self.mem.as_ref(), head) {
                Ok(chain) => self.serve(&chain, port),
                Err(e) => {
                    eprintln!("virtio-blk: {e}");
                    self.stats.errors += 1;
                    0
                }
            };
            self.stats.requests += 1;
            if let Err(e) = self.queue.push_used(self.mem.as_ref(), head, written) {
                eprintln!("virtio-blk: {e}");
                break;
            }
            served += 1;
        }
        if served > 0 {
            self.isr.fetch_or(1, Ordering::SeqCst);
            // A refused edge (KVM_IRQ_LINE failed) leaves the ISR bit set:
            // the guest finds the completion at its next poll.
            let _ = self.irq.trigger(IrqAction::Edge);
        }
    }

    /// Turns every published chain into a block request to the bulk
    /// disk (or completes it at once: GET_ID, a bad chain, out of range).
    fn notify_bulk(&mut self, port: &mut dyn StorePort) {
        while let Some(head) = self.next_head() {
            // A head published again before its request completed: the
            // driver broke the ring's rules (virtio 2.7.13); dropped, so
            // that a device never holds more than one request per head.
            if self.head_in_flight(head) {
                eprintln!("virtio-blk: chain {head} published again while in flight: ignored");
                self.stats.errors += 1;
                continue;
            }
            let chain = match self.queue.chain(self.mem.as_ref(), head) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("virtio-blk: {e}");
                    self.complete_now(head, None, S_IOERR);
                    continue;
                }
            };
            self.submit_bulk(head, &chain, port);
        }
    }

    /// Whether chain `head` is a request the bulk disk still holds.
    fn head_in_flight(&self, head: u16) -> bool {
        self.bulk
            .as_ref()
            .and_then(|b| b.side.lock().ok().map(|s| s.busy(head)))
            .unwrap_or(false)
    }

    /// Completes chain `head` now (from the vCPU thread), through the
    /// bulk completer so the used ring has one writer at a time.
    fn complete_now(&mut self, head: u16, status: Option<Descriptor>, st: u8) {
        let Some(b) = &self.bulk else { return };
        let Ok(mut side) = b.side.lock() else { return };
        let f = InFlight {
            head,
            data: Vec::new(),
            status: status.unwrap_or(Descriptor {
                addr: u64::MAX,
                len: 0,
                flags: 0,
            }),
            read: false,
        };
        side.complete(&f, st, &[], &self.isr);
    }

    /// One chain as a block request.
    fn submit_bulk(&mut self, head: u16, chain: &[Descriptor], port: &mut dyn StorePort) {
        let Some((status, rest)) = chain.split_last() else {
            self.complete_now(head, None, S_IOERR);
            return;
        };
        if !status.is_write() || status.len < 1 || rest.is_empty() {
            self.complete_now(head, None, S_IOERR);
            return;
        }
        let (header, data) = (&rest[0], &rest[1..]);
        let mut h = [0u8; 16];
        if header.is_write() || header.len < 16 || self.mem.read(header.addr, &mut h).is_err() {
            self.complete_now(head, Some(*status), S_IOERR);
            return;
        }
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        if self.capacity.is_none() {
            self.capacity = Store(port).capacity().ok();
        }
        let capacity = self.capacity.unwrap_or(0);
        let total: u64 = data.iter().map(|d| u64::from(d.len)).sum();
        let (op, len, payload) = match kind {
            T_IN | T_OUT => {
                let read = kind == T_IN;
                let in_range = sector
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(total))
                    .is_some_and(|end| end <= capacity);
                if !in_range
                    || total > u64::from(MAX_BLOCK_LEN)
                    || data.iter().any(|d| d.is_write() != read)
                {
                    self.complete_now(head, Some(*status), S_IOERR);
                    return;
                }
                let mut bytes = Vec::new();
                if !read {
                    bytes = vec![0u8; total as usize];
                    let mut at = 0usize;
                    for d in data {
                        let n = d.len as usize;
                        if self.mem.read(d.addr, &mut bytes[at..at + n]).is_err() {
                            self.complete_now(head, Some(*status), S_IOERR);
                            return;
                        }
                        at += n;
                    }
                    self.stats.bytes_written += total;
                }
                let op = if read { BlockOp::Read } else { BlockOp::Write };
                (op, total as u32, bytes)
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                (BlockOp::Flush, 0, Vec::new())
            }
            T_DISCARD | T_WRITE_ZEROES => {
                // Exactly one segment (max_discard_seg and
                // max_write_zeroes_seg are 1): sector, sector count,
                // flags. More segments would be ignored: refused instead.
                let mut seg = [0u8; 16];
                let one = match data {
                    [d] if !d.is_write() && d.len == 16 => Some(d),
                    _ => None,
                };
                let Some(d) = one else {
                    self.complete_now(head, Some(*status), S_IOERR);
                    return;
                };
                if self.mem.read(d.addr, &mut seg).is_err() {
                    self.complete_now(head, Some(*status), S_IOERR);
                    return;
                }
                let s = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
                let n = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                // Bit 0 is `unmap`: meaningless for a discard, allowed for
                // write-zeroes (write_zeroes_may_unmap); no other flag is
                // defined.
                let allowed = if kind == T_DISCARD { 0 } else { 1 };
                if flags & !allowed != 0 {
                    self.complete_now(head, Some(*status), S_UNSUPP);
                    return;
                }
                let bytes = u64::from(n) * SECTOR;
                let in_range = s
                    .checked_mul(SECTOR)
                    .and_then(|o| o.checked_add(bytes))
                    .is_some_and(|end| end <= capacity);
                if bytes > u64::from(MAX_BLOCK_LEN) || !in_range {
                    self.complete_now(head, Some(*status), S_IOERR);
                    return;
                }
                if n == 0 {
                    self.complete_now(head, Some(*status), S_OK);
                    return;
                }
                let op = if kind == T_DISCARD {
                    BlockOp::Discard
                } else {
                    BlockOp::WriteZeroes
                };
                return self.send_bulk(
                    head,
                    *status,
                    Vec::new(),
                    false,
                    op,
                    s,
                    bytes as u32,
                    vec![],
                );
            }
            T_GET_ID => {
                let st = match data.first().filter(|d| d.is_write()) {
                    Some(d) => {
                        let n = DEVICE_ID.len().min(d.len as usize);
                        match self.mem.write(d.addr, &DEVICE_ID[..n]) {
                            Ok(()) => S_OK,
                            Err(_) => S_IOERR,
                        }
                    }
                    None => S_IOERR,
                };
                self.complete_now(head, Some(*status), st);
                return;
            }
            _ => {
                self.complete_now(head, Some(*status), S_UNSUPP);
                return;
            }
        };
        let read = op == BlockOp::Read;
        self.send_bulk(head, *status, data.to_vec(), read, op, sector, len, payload);
    }

    #[allow(clippy::too_many_arguments)]
    fn send_bulk(
        &mut self,
        head: u16,
        status: Descriptor,
        data: Vec<Descriptor>,
        read: bool,
        op: BlockOp,
        sector: u64,
        len: u32,
        payload: Vec<u8>,
    ) {
        let Some(b) = self.bulk.as_mut() else { return };
        b.next_token += 1;
        let token = b.next_token;
        if let Ok(mut side) = b.side.lock() {
            side.set_busy(head, true);
            side.inflight.insert(
                token,
                InFlight {
                    head,
                    data,
                    status,
                    read,
                },
            );
        }
        b.disk.submit(token, op, sector, len, payload);
    }

    /// Serves one request; returns the bytes written into guest buffers.
    fn serve(&mut self, chain: &[Descriptor], port: &mut dyn StorePort) -> u32 {
        let Some((status, rest)) = chain.split_last() else {
            return 0;
        };
        if !status.is_write() || status.len < 1 || rest.is_empty() {
            self.stats.errors += 1;
            return 0;
        }
        let (st, written) = match self.request(&rest[0], &rest[1..], port) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("virtio-blk: {e}");
                (S_IOERR, 0)
            }
        };
        if st != S_OK {
            self.stats.errors += 1;
        }
        match self.mem.write(status.addr, &[st]) {
            Ok(()) => written + 1,
            Err(_) => written,
        }
    }

    fn request(
        &mut self,
        header: &Descriptor,
        data: &[Descriptor],
        port: &mut dyn StorePort,
    ) -> Result<(u8, u32), VirtioError> {
        if header.is_write() || header.len < 16 {
            return Err(VirtioError::BadDescriptor("request header"));
        }
        let mut h = [0u8; 16];
        self.mem.read(header.addr, &mut h)?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes(h[8..16].try_into().unwrap_or_default());
        let capacity = match self.capacity {
            Some(c) => c,
            None => {
                let c = Store(port).capacity()?;
                self.capacity = Some(c);
                c
            }
        };
        match kind {
            T_IN | T_OUT => {
                let want_write = kind == T_IN;
                let mut off = sector
                    .checked_mul(SECTOR)
                    .ok_or(VirtioError::BadDescriptor("sector overflows"))?;
                let mut written = 0u32;
                for d in data {
                    if d.is_write() != want_write {
                        return Err(VirtioError::BadDescriptor("data buffer direction"));
                    }
                    let end = off.checked_add(u64::from(d.len));
                    if end.is_none_or(|e| e > capacity) {
                        return Ok((S_IOERR, written));
                    }
                    let mut buf = vec![0u8; d.len as usize];
                    if kind == T_IN {
                        Store(port).read(off, &mut buf)?;
                        self.mem.write(d.addr, &buf)?;
                        written += d.len;
                        self.stats.bytes_read += u64::from(d.len);
                    } else {
                        self.mem.read(d.addr, &mut buf)?;
                        Store(port).write(off, &buf)?;
                        self.stats.bytes_written += u64::from(d.len);
                    }
                    off += u64::from(d.len);
                }
                Ok((S_OK, written))
            }
            T_FLUSH => {
                Store(port).flush()?;
                self.stats.flushes += 1;
                Ok((S_OK, 0))
            }
            T_GET_ID => {
                let Some(d) = data.first().filter(|d| d.is_write()) else {
                    return Err(VirtioError::BadDescriptor("GET_ID buffer"));
                };
                let n = DEVICE_ID.len().min(d.len as usize);
                self.mem.write(d.addr, &DEVICE_ID[..n])?;
                Ok((S_OK, n as u32))
            }
            _ => Ok((S_UNSUPP, 0)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use devplane_devmodels::blockstore::{
        CTRL_BASE, CTRL_CAPACITY, CTRL_FAILURES, CTRL_FLUSH, CTRL_FLUSH_PENDING, CTRL_WRITES,
    };

    use super::*;
    use crate::kvm::{KvmError, Trigger};
    use crate::virtio::queue::tests::{Driver, VecMem, mem};

    /// An in-memory store speaking the blockstore register layout.
    #[derive(Default)]
    struct MemStore {
        disk: Vec<u8>,
        flushes: u64,
        writes: u64,
        drop_writes: bool,
    }

    impl StorePort for MemStore {
        fn read(&mut self, offset: u64) -> Result<u64, VirtioError> {
            Ok(match offset {
                o if o == CTRL_BASE + CTRL_CAPACITY => self.disk.len() as u64,
                o if o == CTRL_BASE + CTRL_FLUSH => self.flushes,
                o if o == CTRL_BASE + CTRL_WRITES => self.writes,
                o if o == CTRL_BASE + CTRL_FLUSH_PENDING || o == CTRL_BASE + CTRL_FAILURES => 0,
                o => u64::from_le_bytes(self.disk[o as usize..o as usize + 8].try_into().unwrap()),
            })
        }

        fn write(&mut self, offset: u64, value: u64) -> Result<(), VirtioError> {
            if offset == CTRL_BASE + CTRL_FLUSH {
                self.flushes += 1;
            } else if !self.drop_writes {
                self.writes += 1;
                self.disk[offset as usize..offset as usize + 8]
                    .copy_from_slice(&value.to_le_bytes());
            }
            Ok(())
        }
    }

    /// Shares one test memory between the device and the test driver.
    struct Shared(Arc<Mutex<VecMem>>);

    impl DmaMemory for Shared {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
            self.0.lock().unwrap().read(gpa, buf)
        }
        fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VirtioError> {
            self.0.lock().unwrap().write(gpa, bytes)
        }
    }

    /// Counts the edges raised on line 5.
    struct Edges(Arc<AtomicU32>);

    impl Trigger for Edges {
        fn trigger(&self, line: u32, action: IrqAction) -> Result<(), KvmError> {
            assert_eq!((line, action), (5, IrqAction::Edge));
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Rig {
        dev: VirtioBlk,
        mem: Arc<Mutex<VecMem>>,
        irqs: Arc<AtomicU32>,
        drv: Driver,
        store: MemStore,
    }

    fn rig() -> Rig {
        let m = Arc::new(Mutex::new(mem(4 << 20)));
        let irqs = Arc::new(AtomicU32::new(0));
        let dev = VirtioBlk::new(
            Box::new(Shared(m.clone())),
            IrqLine::new(Box::new(Edges(irqs.clone())), 5),
        );
        let mut r = Rig {
            dev,
            mem: m,
            irqs,
            drv: Driver::new(0x100, QUEUE_SIZE),
            store: MemStore {
                disk: vec![0; 1 << 20],
                ..Default::default()
            },
        };
        // The Linux legacy driver's bring-up.
        r.w(REG_STATUS, AccessSize::B1, 1 | 2);
        let f = r.r(REG_HOST_FEATURES, AccessSize::B4);
        r.w(REG_GUEST_FEATURES, AccessSize::B4, f);
        r.w(REG_QUEUE_SEL, AccessSize::B2, 0);
        assert_eq!(r.r(REG_QUEUE_NUM, AccessSize::B2), u64::from(QUEUE_SIZE));
        r.w(REG_QUEUE_PFN, AccessSize::B4, 0x100);
        r.w(REG_STATUS, AccessSize::B1, 1 | 2 | 4);
        r
    }

    impl Rig {
        fn r(&mut self, off: u64, size: AccessSize) -> u64 {
            self.dev.read(off, size, &mut self.store)
        }
        fn w(&mut self, off: u64, size: AccessSize, v: u64) {
            self.dev.write(off, size, v, &mut self.store)
        }
        fn put(&self, gpa: u64, b: &[u8]) {
            self.mem.lock().unwrap().write(gpa, b).unwrap()
        }
        fn get(&self, gpa: u64, n: usize) -> Vec<u8> {
            let mut b = vec![0; n];
            self.mem.lock().unwrap().read(gpa, &mut b).unwrap();
            b
        }
        /// Publishes a request and notifies; returns (status, used len).
        fn req(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&kind.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.put(0x20_0000, &h);
            self.put(0x20_1000, &[0xee]);
            let mut bufs = vec![(0x20_0000, 16, false)];
            bufs.extend_from_slice(data);
            bufs.push((0x20_1000, 1, true));
            let n = self.drv.avail_idx;
            let head = {
                let m = self.mem.lock().unwrap();
                self.drv.publish(&m, &bufs)
            };
            self.w(REG_QUEUE_NOTIFY, AccessSize::B2, 0);
            let (idx, id, len) = {
                let m = self.mem.lock().unwrap();
                self.drv.used(&m, n)
            };
            assert_eq!(idx, n + 1);
            assert_eq!(id, u32::from(head));
            (self.get(0x20_1000, 1)[0], len)
        }
    }

    #[test]
    fn config_reports_capacity_in_sectors_and_features() {
        let mut r = rig();
        let lo = r.r(REG_CONFIG, AccessSize::B4);
        let hi = r.r(REG_CONFIG + 4, AccessSize::B4);
        assert_eq!(lo | (hi << 32), (1 << 20) / 512);
        assert_eq!(r.r(REG_CONFIG + 12, AccessSize::B4), u64::from(SEG_MAX));
        let f = r.r(REG_HOST_FEATURES, AccessSize::B4) as u32;
        assert_ne!(f & VIRTIO_BLK_F_FLUSH, 0);
        assert_eq!(r.r(REG_GUEST_FEATURES, AccessSize::B4) as u32, f);
        // Through the register window there is no discard or
        // write-zeroes: neither offered, their limits zero, and a guest
        // that sends one anyway is told it is unsupported.
        assert_eq!(f & (VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(r.r(REG_CONFIG + 36, AccessSize::B4), 0);
        assert_eq!(r.r(REG_CONFIG + 48, AccessSize::B4), 0);
        r.put(0x30_0000, &[0; 16]);
        assert_eq!(r.req(T_DISCARD, 0, &[(0x30_0000, 16, false)]).0, S_UNSUPP);
    }

    #[test]
    fn write_then_read_back_through_the_store() {
        let mut r = rig();
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        r.put(0x30_0000, &data);
        let (st, len) = r.req(T_OUT, 8, &[(0x30_0000, 4096, false)]);
        assert_eq!((st, len), (S_OK, 1));
        assert_eq!(&r.store.disk[4096..8192], &data[..]);
        assert_eq!(r.irqs.load(Ordering::SeqCst), 1);
        assert_eq!(r.r(REG_ISR, AccessSize::B1), 1);
        assert_eq!(r.r(REG_ISR, AccessSize::B1), 0, "ISR clears on read");

        let (st, len) = r.req(
            T_IN,
            8,
            &[(0x40_0000 - 0x1000, 2048, true), (0x31_0000, 2048, true)],
        );
        assert_eq!((st, len), (S_OK, 4097));
        assert_eq!(r.get(0x40_0000 - 0x1000, 2048), &data[..2048]);
        assert_eq!(r.get(0x31_0000, 2048), &data[2048..]);
        let s = r.dev.stats();
        assert_eq!(
            (s.requests, s.errors, s.bytes_read, s.bytes_written),
            (2, 0, 4096, 4096)
        );
    }

    /// A request whose descriptors are in an indirect table (what Linux
    /// sends once the device offers `VIRTIO_RING_F_INDIRECT_DESC`: one
    /// ring entry per request) is served like a direct one; a driver that
    /// did not take the feature gets an I/O error for one, not a panic.
    #[test]
    fn indirect_requests_are_served_when_negotiated() {
        let mut r = rig();
        let f = r.r(REG_HOST_FEATURES, AccessSize::B4) as u32;
        assert_ne!(f & VIRTIO_RING_F_INDIRECT_DESC, 0, "offered");
        let data: Vec<u8> = (0..8192u32).map(|i| (i * 11 + 5) as u8).collect();
        r.put(0x30_0000, &data);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&T_OUT.to_le_bytes());
        h[8..].copy_from_slice(&16u64.to_le_bytes());
        r.put(0x20_0000, &h);
        let bufs = [
            (0x20_0000, 16, false),
            (0x30_0000, 4096, false),
            (0x30_1000, 4096, false),
            (0x20_1000, 1, true),
        ];
        let publish = |r: &mut Rig| {
            let n = r.drv.avail_idx;
            let head = {
                let m = r.mem.lock().unwrap();
                r.drv.publish_indirect(&m, 0x22_0000, &bufs)
            };
            r.put(0x20_1000, &[0xee]);
            r.w(REG_QUEUE_NOTIFY, AccessSize::B2, 0);
            let m = r.mem.lock().unwrap();
            let (idx, id, len) = r.drv.used(&m, n);
            assert_eq!((idx, id), (n + 1, u32::from(head)));
            len
        };
        let used = publish(&mut r);
        assert_eq!((r.get(0x20_1000, 1)[0], used), (S_OK, 1));
        assert_eq!(&r.store.disk[8192..16384], &data[..]);
        // The same from a driver that took every feature but this one.
        r.w(
            REG_GUEST_FEATURES,
            AccessSize::B4,
            u64::from(f & !VIRTIO_RING_F_INDIRECT_DESC),
        );
        r.store.disk[8192..16384].fill(0);
        publish(&mut r);
        assert_eq!(r.dev.stats().errors, 1);
        assert!(
            r.store.disk[8192..16384].iter().all(|&b| b == 0),
            "nothing written"
        );
    }

    #[test]
    fn flush_reaches_the_store_and_get_id_answers() {
        let mut r = rig();
        assert_eq!(r.req(T_FLUSH, 0, &[]).0, S_OK);
        assert_eq!(r.store.flushes, 1);
        let (st, len) = r.req(T_GET_ID, 0, &[(0x30_0000, 20, true)]);
        assert_eq!((st, len as usize), (S_OK, DEVICE_ID.len() + 1));
        assert_eq!(r.get(0x30_0000, DEVICE_ID.len()), DEVICE_ID);
    }

    #[test]
    fn bad_requests_get_error_statuses_not_panics() {
        let mut r = rig();
        // Beyond the end of the disk.
        let (st, _) = r.req(T_IN, (1 << 20) / 512, &[(0x30_0000, 512, true)]);
        assert_eq!(st, S_IOERR);
        // Unknown request type.
        assert_eq!(r.req(99, 0, &[]).0, S_UNSUPP);
        // A read into a device-readable buffer.
        assert_eq!(r.req(T_IN, 0, &[(0x30_0000, 512, false)]).0, S_IOERR);
        // A buffer outside guest memory.
        assert_eq!(r.req(T_OUT, 0, &[(1 << 40, 512, false)]).0, S_IOERR);
        // Writes the store did not apply are an I/O error, not silent loss.
        r.store.drop_writes = true;
        r.put(0x30_0000, &[1; 512]);
        assert_eq!(r.req(T_OUT, 0, &[(0x30_0000, 512, false)]).0, S_IOERR);
        assert_eq!(r.dev.stats().errors, 5);
    }

    #[test]
    fn status_zero_resets_the_queue() {
        let mut r = rig();
        r.w(REG_STATUS, AccessSize::B1, 0);
        assert_eq!(r.r(REG_QUEUE_PFN, AccessSize::B4), 0);
        assert_eq!(r.r(REG_GUEST_FEATURES, AccessSize::B4), 0);
        assert_eq!(r.r(REG_STATUS, AccessSize::B1), 0);
    }
}
