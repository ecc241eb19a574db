//! A split virtqueue in the legacy (virtio 0.9.5) layout: descriptor table,
//! available ring and used ring in one guest-physical area whose page frame
//! number the driver writes to `QUEUE_PFN`.
//!
//! Every read of guest memory is bounds-checked by [`DmaMemory`]; a bad
//! descriptor (out of guest memory, a chain longer than the queue) ends the
//! request with an error instead of a panic.

use std::sync::atomic::{Ordering, fence};

use super::VirtioError;

/// Guest memory as a device sees it: byte copies at guest-physical
/// addresses.
pub trait DmaMemory {
    /// Copies guest memory at `gpa` into `buf`.
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VirtioError>;
    /// Copies `bytes` into guest memory at `gpa`.
    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VirtioError>;
}

impl DmaMemory for crate::kvm::MemHandle {
    fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        crate::kvm::MemHandle::read(self, gpa, buf).map_err(|_| VirtioError::Dma {
            gpa,
            len: buf.len(),
        })
    }

    fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VirtioError> {
        crate::kvm::MemHandle::write(self, gpa, bytes).map_err(|_| VirtioError::Dma {
            gpa,
            len: bytes.len(),
        })
    }
}

/// Legacy ring alignment (the used ring starts on this boundary).
pub const VRING_ALIGN: u64 = 4096;
/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is a table of descriptors (an indirect
/// chain), accepted only on a queue whose driver took
/// [`VIRTIO_RING_F_INDIRECT_DESC`] ([`Queue::indirect`]).
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Feature bit: the driver may put a request's descriptors in a table of
/// their own, taking one entry of the ring whatever the request's length.
pub const VIRTIO_RING_F_INDIRECT_DESC: u32 = 1 << 28;

/// One descriptor of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest-physical address of the buffer.
    pub addr: u64,
    /// Its length.
    pub len: u32,
    /// `VRING_DESC_F_*`.
    pub flags: u16,
}

impl Descriptor {
    /// The device writes this buffer.
    pub fn is_write(&self) -> bool {
        self.flags & VRING_DESC_F_WRITE != 0
    }

    /// Its 16 bytes in a descriptor table, with `next` (what a driver
    /// writes; [`read_desc`] reads it back).
    pub fn encode(&self, next: u16) -> [u8; 16] {
        let mut raw = [0u8; 16];
        raw[0..8].copy_from_slice(&self.addr.to_le_bytes());
        raw[8..12].copy_from_slice(&self.len.to_le_bytes());
        raw[12..14].copy_from_slice(&self.flags.to_le_bytes());
        raw[14..16].copy_from_slice(&next.to_le_bytes());
        raw
    }
}

/// A split virtqueue's device side.
#[derive(Debug, Clone, Default)]
pub struct Queue {
    /// Entries (a power of two); fixed by the device in the legacy layout.
    pub size: u16,
    /// Page frame number of the ring area (0: not set up).
    pub pfn: u32,
    /// The next available-ring index the device will take.
    pub last_avail: u16,
    /// The next used-ring index the device will fill.
    pub next_used: u16,
    /// The driver took [`VIRTIO_RING_F_INDIRECT_DESC`]: indirect tables
    /// are followed (else refused).
    pub indirect: bool,
}

fn u16_at(mem: &dyn DmaMemory, gpa: u64) -> Result<u16, VirtioError> {
    let mut b = [0u8; 2];
    mem.read(gpa, &mut b)?;
    Ok(u16::from_le_bytes(b))
}

/// The descriptor at `gpa` and its `next` field.
fn read_desc(mem: &dyn DmaMemory, gpa: u64) -> Result<(Descriptor, u16), VirtioError> {
    let mut raw = [0u8; 16];
    mem.read(gpa, &mut raw)?;
    let d = Descriptor {
        addr: u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default()),
        len: u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default()),
        flags: u16::from_le_bytes([raw[12], raw[13]]),
    };
    Ok((d, u16::from_le_bytes([raw[14], raw[15]])))
}

impl Queue {
    /// A queue of `size` entries, not yet set up.
    pub fn new(size: u16) -> Queue {
        Queue {
            size,
            ..Default::default()
        }
    }

    /// The driver has given the ring's location.
    pub fn ready(&self) -> bool {
        self.pfn != 0 && self.size != 0
    }

    /// Forgets the ring (device reset or `QUEUE_PFN` = 0).
    pub fn reset(&mut self) {
        self.pfn = 0;
        self.last_avail = 0;
        self.next_used = 0;
    }

    fn desc_table(&self) -> u64 {
        u64::from(self.pfn) << 12
    }

    fn avail(&self) -> u64 {
        self.desc_table() + 16 * u64::from(self.size)
    }

    fn used(&self) -> u64 {
        let end = self.avail() + 4 + 2 * u64::from(self.size) + 2;
        end.div_ceil(VRING_ALIGN) * VRING_ALIGN
    }

    /// Takes the head of the next available chain, if the driver published
    /// one.
    pub fn pop(&mut self, mem: &dyn DmaMemory) -> Result<Option<u16>, VirtioError> {
        if !self.ready() {
            return Ok(None);
        }
        let idx = u16_at(mem, self.avail() + 2)?;
        if idx == self.last_avail {
            return Ok(None);
        }
        // A driver publishes at most a queue's worth ahead of the device
        // (the ring has `size` slots); more is a broken ring, not up to
        // 65,535 chains to serve from one notify.
        if idx.wrapping_sub(self.last_avail) > self.size {
            return Err(VirtioError::BadDescriptor(
                "available index more than a queue ahead of the device",
            ));
        }
        // The ring entry is read after the index that published it.
        fence(Ordering::Acquire);
        let slot = u64::from(self.last_avail % self.size);
        let head = u16_at(mem, self.avail() + 4 + 2 * slot)?;
        self.last_avail = self.last_avail.wrapping_add(1);
        if head >= self.size {
            return Err(VirtioError::BadDescriptor("head index beyond the queue"));
        }
        Ok(Some(head))
    }

    /// The descriptors of the chain starting at `head`, in order, those
    /// of an indirect table in its place (the table's descriptor itself
    /// is not returned).
    pub fn chain(&self, mem: &dyn DmaMemory, head: u16) -> Result<Vec<Descriptor>, VirtioError> {
        let mut out = Vec::new();
        let mut i = head;
        loop {
            if out.len() >= usize::from(self.size) {
                return Err(VirtioError::BadDescriptor("descriptor chain loops"));
            }
            let (d, next) = read_desc(mem, self.desc_table() + 16 * u64::from(i))?;
            if d.flags & VRING_DESC_F_INDIRECT != 0 {
                // Virtio 1.x 2.7.5.3: the table ends the chain.
                if !self.indirect {
                    return Err(VirtioError::BadDescriptor(
                        "indirect descriptor on a queue without the feature",
                    ));
                }
                if d.flags & VRING_DESC_F_NEXT != 0 {
                    return Err(VirtioError::BadDescriptor(
                        "indirect descriptor with NEXT set",
                    ));
                }
                self.table(mem, &d, &mut out)?;
                return Ok(out);
            }
            out.push(d);
            if d.flags & VRING_DESC_F_NEXT == 0 {
                return Ok(out);
            }
            if next >= self.size {
                return Err(VirtioError::BadDescriptor("next index beyond the queue"));
            }
            i = next;
        }
    }

    /// Appends the chain in the indirect table `d` points at to `out`:
    /// from entry 0, following NEXT within the table. A table that is
    /// empty, not whole entries, longer than the queue, nested, looping or
    /// pointing out of itself is refused.
    fn table(
        &self,
        mem: &dyn DmaMemory,
        d: &Descriptor,
        out: &mut Vec<Descriptor>,
    ) -> Result<(), VirtioError> {
        let entries = d.len / 16;
        // The whole chain, the descriptors before the table included, is
        // at most a queue long (virtio 2.7.5.3.1).
        let room = usize::from(self.size).saturating_sub(out.len());
        if d.len == 0 || !d.len.is_multiple_of(16) || entries as usize > room {
            return Err(VirtioError::BadDescriptor(
                "indirect table length not 1 to queue-size whole entries",
            ));
        }
        let mut i = 0u32;
        for _ in 0..entries {
            let at = d
                .addr
                .checked_add(16 * u64::from(i))
                .ok_or(VirtioError::BadDescriptor("indirect table wraps"))?;
            let (e, next) = read_desc(mem, at)?;
            if e.flags & VRING_DESC_F_INDIRECT != 0 {
                return Err(VirtioError::BadDescriptor("nested indirect table"));
            }
            out.push(e);
            if e.flags & VRING_DESC_F_NEXT == 0 {
                return Ok(());
            }
            i = u32::from(next);
            if i >= entries {
                return Err(VirtioError::BadDescriptor(
                    "next index beyond the indirect table",
                ));
            }
        }
        Err(VirtioError::BadDescriptor("indirect chain loops"))
    }

    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn push_used(
        &mut self,
        mem: &dyn DmaMemory,
        head: u16,
        len: u32,
    ) -> Result<(), VirtioError> {
        let slot = u64::from(self.next_used % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write(self.used() + 4 + 8 * slot, &elem)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element (and every buffer the device wrote) is visible before
        // the index that publishes it.
        fence(Ordering::Release);
        mem.write(self.used() + 2, &self.next_used.to_le_bytes())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Flat test memory.
    pub(crate) struct VecMem(pub RefCell<Vec<u8>>);

    impl DmaMemory for VecMem {
        fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
            let m = self.0.borrow();
            let s = gpa as usize;
            let e = s.saturating_add(buf.len());
            let src = m.get(s..e).ok_or(VirtioError::Dma {
                gpa,
                len: buf.len(),
            })?;
            buf.copy_from_slice(src);
            Ok(())
        }

        fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), VirtioError> {
            let mut m = self.0.borrow_mut();
            let s = gpa as usize;
            let e = s.saturating_add(bytes.len());
            let dst = m.get_mut(s..e).ok_or(VirtioError::Dma {
                gpa,
                len: bytes.len(),
            })?;
            dst.copy_from_slice(bytes);
            Ok(())
        }
    }

    /// A driver-side helper: lays out a legacy ring at `pfn` and publishes
    /// chains like Linux's virtio_ring does.
    pub(crate) struct Driver {
        pub pfn: u32,
        pub size: u16,
        pub next_desc: u16,
        pub avail_idx: u16,
    }

    impl Driver {
        pub(crate) fn base(&self) -> u64 {
            u64::from(self.pfn) << 12
        }

        /// A driver of a ring of `size` entries at `pfn`, nothing
        /// published yet.
        pub(crate) fn new(pfn: u32, size: u16) -> Driver {
            Driver {
                pfn,
                size,
                next_desc: 0,
                avail_idx: 0,
            }
        }

        /// Publishes a chain of (addr, len, write) buffers; returns its head.
        pub(crate) fn publish(&mut self, mem: &VecMem, bufs: &[(u64, u32, bool)]) -> u16 {
            let head = self.next_desc;
            for (k, (addr, len, w)) in bufs.iter().enumerate() {
                let i = self.next_desc;
                self.next_desc = (self.next_desc + 1) % self.size;
                let gpa = self.base() + 16 * u64::from(i);
                let flags = chain_flags(k, bufs.len(), *w);
                write_desc(mem, gpa, *addr, *len, flags, self.next_desc);
            }
            self.make_available(mem, head);
            head
        }

        /// Puts `head` in the available ring and publishes the new index.
        fn make_available(&mut self, mem: &VecMem, head: u16) {
            let avail = self.base() + 16 * u64::from(self.size);
            let slot = u64::from(self.avail_idx % self.size);
            mem.write(avail + 4 + 2 * slot, &head.to_le_bytes())
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write(avail + 2, &self.avail_idx.to_le_bytes()).unwrap();
        }

        /// Publishes a chain of (addr, len, write) buffers as an indirect
        /// table written at `table` (one ring descriptor); returns its head.
        pub(crate) fn publish_indirect(
            &mut self,
            mem: &VecMem,
            table: u64,
            bufs: &[(u64, u32, bool)],
        ) -> u16 {
            for (k, (addr, len, w)) in bufs.iter().enumerate() {
                let flags = chain_flags(k, bufs.len(), *w);
                write_desc(mem, table + 16 * k as u64, *addr, *len, flags, k as u16 + 1);
            }
            let head = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let len = 16 * bufs.len() as u32;
            write_desc(
                mem,
                self.base() + 16 * u64::from(head),
                table,
                len,
                VRING_DESC_F_INDIRECT,
                0,
            );
            self.make_available(mem, head);
            head
        }

        /// The used ring's index and its element `n`.
        pub(crate) fn used(&self, mem: &VecMem, n: u16) -> (u16, u32, u32) {
            let q = Queue {
                size: self.size,
                pfn: self.pfn,
                ..Default::default()
            };
            let used = q.used();
            let idx = u16_at(mem, used + 2).unwrap();
            let mut e = [0u8; 8];
            mem.read(used + 4 + 8 * u64::from(n % self.size), &mut e)
                .unwrap();
            (
                idx,
                u32::from_le_bytes(e[..4].try_into().unwrap()),
                u32::from_le_bytes(e[4..].try_into().unwrap()),
            )
        }
    }

    pub(crate) fn mem(bytes: usize) -> VecMem {
        VecMem(RefCell::new(vec![0; bytes]))
    }

    /// The flags of buffer `k` of a chain of `n` (`write`: device-writable).
    fn chain_flags(k: usize, n: usize, write: bool) -> u16 {
        let mut flags = if write { VRING_DESC_F_WRITE } else { 0 };
        if k + 1 < n {
            flags |= VRING_DESC_F_NEXT;
        }
        flags
    }

    /// Writes one descriptor at `gpa`.
    pub(crate) fn write_desc(mem: &VecMem, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor { addr, len, flags };
        mem.write(gpa, &d.encode(next)).unwrap();
    }

    /// A request in an indirect table takes one ring entry and reads as
    /// the same chain a direct one would; without the feature it is
    /// refused.
    #[test]
    fn an_indirect_table_reads_as_its_chain() {
        let m = mem(1 << 20);
        let mut d = Driver::new(0x10, 8);
        let mut q = Queue::new(8);
        q.pfn = 0x10;
        let bufs: Vec<(u64, u32, bool)> = (0..8)
            .map(|k| (0x4_0000 + 0x1000 * k, 0x1000, k % 2 == 1))
            .collect();
        let h = d.publish_indirect(&m, 0x3_0000, &bufs);
        assert_eq!(d.next_desc, 1, "one ring descriptor for eight buffers");
        assert_eq!(q.pop(&m).unwrap(), Some(h));
        assert!(
            matches!(q.chain(&m, h), Err(VirtioError::BadDescriptor(_))),
            "refused without the feature"
        );
        q.indirect = true;
        let c = q.chain(&m, h).unwrap();
        let got: Vec<(u64, u32, bool)> = c.iter().map(|d| (d.addr, d.len, d.is_write())).collect();
        assert_eq!(got, bufs);
        // Direct descriptors before a table are kept before its own...
        write_desc(&m, 0x5_0000, 0x7_1000, 16, VRING_DESC_F_NEXT, 1);
        write_desc(&m, 0x5_0010, 0x7_2000, 1, VRING_DESC_F_WRITE, 0);
        write_desc(&m, 0x10_000 + 16 * 5, 0x7_0000, 16, VRING_DESC_F_NEXT, 6);
        write_desc(
            &m,
            0x10_000 + 16 * 6,
            0x5_0000,
            32,
            VRING_DESC_F_INDIRECT,
            0,
        );
        let c = q.chain(&m, 5).unwrap();
        let got: Vec<u64> = c.iter().map(|d| d.addr).collect();
        assert_eq!(got, [0x7_0000, 0x7_1000, 0x7_2000]);
        // ...but the whole chain, table included, is at most a queue long
        // (virtio 2.7.5.3.1): one direct and the eight-entry table is 9.
        write_desc(
            &m,
            0x10_000 + 16 * 6,
            0x3_0000,
            128,
            VRING_DESC_F_INDIRECT,
            0,
        );
        assert!(matches!(q.chain(&m, 5), Err(VirtioError::BadDescriptor(_))));
    }

    /// Broken indirect tables are errors, never a hang or an allocation
    /// beyond the queue's size.
    #[test]
    fn broken_indirect_tables_are_refused() {
        let m = mem(1 << 20);
        let q = Queue {
            size: 8,
            pfn: 0x10,
            indirect: true,
            ..Default::default()
        };
        let ring = 0x10_000u64;
        let table = 0x3_0000u64;
        let bad = |len: u32, flags: u16, what: &str| {
            write_desc(&m, ring, table, len, flags, 0);
            assert!(
                matches!(q.chain(&m, 0), Err(VirtioError::BadDescriptor(_))),
                "{what}"
            );
        };
        // A plain two-entry table for the cases about the ring descriptor.
        write_desc(&m, table, 0x4_0000, 16, VRING_DESC_F_NEXT, 1);
        write_desc(&m, table + 16, 0x4_1000, 1, VRING_DESC_F_WRITE, 0);
        write_desc(&m, ring, table, 32, VRING_DESC_F_INDIRECT, 0);
        assert_eq!(q.chain(&m, 0).unwrap().len(), 2, "the table itself is fine");
        bad(0, VRING_DESC_F_INDIRECT, "empty table");
        bad(24, VRING_DESC_F_INDIRECT, "not whole entries");
        bad(16 * 9, VRING_DESC_F_INDIRECT, "longer than the queue");
        bad(
            32,
            VRING_DESC_F_INDIRECT | VRING_DESC_F_NEXT,
            "indirect and next together",
        );
        // Entry 1 points back at entry 0: a loop.
        write_desc(&m, table + 16, 0x4_1000, 1, VRING_DESC_F_NEXT, 0);
        bad(32, VRING_DESC_F_INDIRECT, "looping table");
        // Entry 1 points past the table's end.
        write_desc(&m, table + 16, 0x4_1000, 1, VRING_DESC_F_NEXT, 2);
        bad(32, VRING_DESC_F_INDIRECT, "next beyond the table");
        // Entry 1 is itself a table.
        write_desc(&m, table + 16, table, 32, VRING_DESC_F_INDIRECT, 0);
        bad(32, VRING_DESC_F_INDIRECT, "nested table");
        // The table lies outside guest memory, or wraps the address space.
        write_desc(&m, ring, 1 << 30, 32, VRING_DESC_F_INDIRECT, 0);
        assert!(matches!(q.chain(&m, 0), Err(VirtioError::Dma { .. })));
        write_desc(&m, ring, u64::MAX - 8, 32, VRING_DESC_F_INDIRECT, 0);
        assert!(q.chain(&m, 0).is_err(), "wrapping table");
    }

    #[test]
    fn pops_chains_in_order_and_publishes_used() {
        let m = mem(1 << 20);
        let mut d = Driver::new(0x10, 8);
        let mut q = Queue::new(8);
        assert_eq!(q.pop(&m).unwrap(), None, "not set up yet");
        q.pfn = 0x10;
        assert_eq!(q.pop(&m).unwrap(), None, "nothing published");
        let h1 = d.publish(&m, &[(0x8_0000, 16, false), (0x8_1000, 1, true)]);
        let h2 = d.publish(&m, &[(0x9_0000, 512, true)]);
        assert_eq!(q.pop(&m).unwrap(), Some(h1));
        let c = q.chain(&m, h1).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].addr, c[0].len, c[0].is_write()),
            (0x8_0000, 16, false)
        );
        assert_eq!((c[1].addr, c[1].len, c[1].is_write()), (0x8_1000, 1, true));
        assert_eq!(q.pop(&m).unwrap(), Some(h2));
        assert_eq!(q.pop(&m).unwrap(), None);
        q.push_used(&m, h2, 513).unwrap();
        assert_eq!(d.used(&m, 0), (1, u32::from(h2), 513));
    }

    #[test]
    fn a_looping_chain_is_an_error_not_a_hang() {
        let m = mem(1 << 20);
        let q = Queue {
            size: 4,
            pfn: 0x10,
            ..Default::default()
        };
        // Descriptor 0 -> 1 -> 0 -> ...
        for (i, next) in [(0u64, 1u16), (1, 0)] {
            write_desc(&m, 0x10_000 + 16 * i, 0, 0, VRING_DESC_F_NEXT, next);
        }
        assert!(matches!(q.chain(&m, 0), Err(VirtioError::BadDescriptor(_))));
    }

    /// A driver publishes at most a queue's worth ahead of the device:
    /// an index further ahead is a broken ring, refused before any chain
    /// is taken (it would make up to 65,535 from one notify).
    #[test]
    fn an_available_index_more_than_a_queue_ahead_is_refused() {
        let m = mem(1 << 20);
        let mut q = Queue::new(8);
        q.pfn = 0x10;
        q.last_avail = 65_530;
        let avail = 0x10_000 + 16 * 8;
        m.write(avail + 2, &65_535u16.wrapping_add(4).to_le_bytes())
            .unwrap();
        assert!(
            matches!(q.pop(&m), Err(VirtioError::BadDescriptor(_))),
            "9 ahead of a queue of 8"
        );
        assert_eq!(q.last_avail, 65_530, "nothing taken");
        m.write(avail + 2, &65_535u16.wrapping_add(3).to_le_bytes())
            .unwrap();
        for _ in 0..8 {
            assert_eq!(
                q.pop(&m).unwrap(),
                Some(0),
                "8 ahead (across the wrap) is fine"
            );
        }
        assert_eq!(q.pop(&m).unwrap(), None);
    }

    #[test]
    fn a_ring_outside_guest_memory_is_an_error() {
        let m = mem(0x1000);
        let mut q = Queue {
            size: 8,
            pfn: 0x100,
            ..Default::default()
        };
        assert!(matches!(q.pop(&m), Err(VirtioError::Dma { .. })));
    }
}
