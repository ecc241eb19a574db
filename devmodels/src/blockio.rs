//! Block requests served asynchronously: the interface a model that is a
//! disk offers besides its registers ([`BlockDevice`]), and an
//! io_uring-backed implementation on a file ([`AsyncFile`]).
//!
//! The owner (a server worker) submits a request and goes on; it polls
//! for completions in its loop and answers each when its I/O is done.
//! Nothing here waits, except [`BlockDevice::drain`] (a model about to be
//! moved or dropped) and `Drop`: a worker is never held by a disk.
//!
//! Reads and writes go through the host's page cache (buffered I/O, as
//! QEMU's `cache=writeback`): a completed write is in the kernel's cache,
//! a volatile write cache as virtio-blk's `VIRTIO_BLK_F_FLUSH` allows,
//! and a flush is an `fsync` that makes every write completed before it
//! durable. Requests complete out of order, as virtio allows.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use devplane_wire::bulk::{BlockOp, BlockStatus};
use io_uring::{IoUring, opcode, types};

/// One block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockReq {
    /// The owner's name for it, returned with its completion.
    pub tag: u64,
    /// What to do.
    pub op: BlockOp,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes to read, write, discard or zero.
    pub len: u32,
    /// The data of a write (`len` bytes); empty otherwise.
    pub data: Vec<u8>,
}

/// A completed block request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockDone {
    /// The request's tag.
    pub tag: u64,
    /// Its op.
    pub op: BlockOp,
    /// How it went.
    pub status: BlockStatus,
    /// The data of a read that succeeded; empty otherwise.
    pub data: Vec<u8>,
}

/// A disk that serves block requests asynchronously.
pub trait BlockDevice {
    /// Capacity in bytes.
    fn capacity(&self) -> u64;
    /// Starts `req`; its completion comes from [`BlockDevice::poll`]
    /// (perhaps at once: a request out of range completes with an
    /// error). `Err(req)` gives it back when no more fit in flight: try
    /// again after a completion.
    fn submit(&mut self, req: BlockReq) -> Result<(), BlockReq>;
    /// Takes the completions that are ready, without waiting.
    fn poll(&mut self, out: &mut Vec<BlockDone>);
    /// Requests submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;
    /// Waits until every request submitted has completed (their
    /// completions stay for the next `poll`).
    fn drain(&mut self);
}

/// Most requests in flight on one [`AsyncFile`].
pub const MAX_IN_FLIGHT: usize = 256;
const RING_ENTRIES: u32 = 512;
const FALLOC_FL_KEEP_SIZE: i32 = 1;
const FALLOC_FL_PUNCH_HOLE: i32 = 2;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// One request in flight: it owns its buffer until its completion.
#[derive(Debug)]
struct Slot {
    req: BlockReq,
    /// Read buffer (reads) or the write's data.
    buf: Vec<u8>,
    /// Bytes done (a short read or write is continued).
    done: usize,
}

/// A file served with io_uring.
pub struct AsyncFile {
    ring: Option<IoUring>,
    file: File,
    capacity: u64,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Submitted, not yet completed by the kernel.
    busy: usize,
    /// Completions ready for `poll`.
    ready: Vec<BlockDone>,
    /// Entries built but not yet taken by the submission queue.
    unsent: Vec<io_uring::squeue::Entry>,
}

impl std::fmt::Debug for AsyncFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncFile")
            .field("capacity", &self.capacity)
            .field("busy", &self.busy)
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl AsyncFile {
    /// Serves `file` (its first `capacity` bytes).
    pub fn new(file: File, capacity: u64) -> io::Result<AsyncFile> {
        Ok(AsyncFile {
            ring: Some(IoUring::new(RING_ENTRIES)?),
            file,
            capacity,
            slots: (0..MAX_IN_FLIGHT).map(|_| None).collect(),
            free: (0..MAX_IN_FLIGHT).rev().collect(),
            busy: 0,
            ready: Vec::new(),
            unsent: Vec::new(),
        })
    }

    fn complete(&mut self, req: BlockReq, status: BlockStatus, data: Vec<u8>) {
        self.ready.push(BlockDone {
            tag: req.tag,
            op: req.op,
            status,
            data,
        });
    }

    /// The next entry of slot `i` (from where it stands).
    fn entry(&self, i: usize) -> Option<io_uring::squeue::Entry> {
        let s = self.slots.get(i)?.as_ref()?;
        let fd = types::Fd(self.file.as_raw_fd());
        let off = s.req.offset + s.done as u64;
        let left = (s.req.len as usize).saturating_sub(s.done) as u32;
        let e = match s.req.op {
            BlockOp::Read => {
                // SAFETY (of the pointer's later use): the buffer is owned
                // by the slot, which is neither dropped nor resized until
                // its completion has been reaped.
                let p = s.buf.as_ptr().wrapping_add(s.done) as *mut u8;
                opcode::Read::new(fd, p, left).offset(off).build()
            }
            BlockOp::Write => {
                let p = s.buf.as_ptr().wrapping_add(s.done);
                opcode::Write::new(fd, p, left).offset(off).build()
            }
            // fdatasync, as a blockstore flush (see its module doc).
            BlockOp::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            // A discard deallocates; a write-zeroes keeps the range
            // allocated (virtio: without `unmap` nothing may be
            // deallocated), so later writes there cannot fail for space.
            BlockOp::Discard | BlockOp::WriteZeroes if s.buf.is_empty() => {
                let mode = if s.req.op == BlockOp::Discard {
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                } else {
                    FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(fd, u64::from(s.req.len))
                    .offset(s.req.offset)
                    .mode(mode)
                    .build()
            }
            // The file system has no hole punching: zeros are written.
            BlockOp::Discard | BlockOp::WriteZeroes => {
                let p = s.buf.as_ptr().wrapping_add(s.done);
                opcode::Write::new(fd, p, left).offset(off).build()
            }
        };
        Some(e.user_data(i as u64))
    }

    /// Pushes what the submission queue takes and submits, without
    /// waiting.
    fn push(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        {
            let mut sq = ring.submission();
            let mut n = 0;
            for e in &self.unsent {
                // SAFETY: every entry names a buffer owned by its slot
                // until its completion is reaped (see `entry`).
                if unsafe { sq.push(e) }.is_err() {
                    break;
                }
                n += 1;
            }
            self.unsent.drain(..n);
        }
        let _ = ring.submit();
    }

    /// Reaps what the kernel completed; continues short transfers.
    fn reap(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let cqes: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (ud, res) in cqes {
            let i = ud as usize;
            let Some(mut s) = self.slots.get_mut(i).and_then(Option::take) else {
                continue;
            };
            self.busy -= 1;
            let transfer = matches!(s.req.op, BlockOp::Read | BlockOp::Write) || !s.buf.is_empty();
            if res == -libc::EOPNOTSUPP
                && matches!(s.req.op, BlockOp::Discard | BlockOp::WriteZeroes)
                && s.buf.is_empty()
            {
                s.buf = vec![0u8; s.req.len as usize];
                self.restart(i, s);
                continue;
            }
            if res < 0 {
                self.free.push(i);
                self.complete(s.req, BlockStatus::IoError, Vec::new());
                continue;
            }
            if transfer {
                s.done += res as usize;
                if res > 0 && s.done < s.req.len as usize {
                    self.restart(i, s);
                    continue;
                }
                // A read past the file's end (res 0) reads zeros: the
                // buffer was zeroed.
            }
            self.free.push(i);
            let data = if s.req.op == BlockOp::Read {
                std::mem::take(&mut s.buf)
            } else {
                Vec::new()
            };
            self.complete(s.req, BlockStatus::Ok, data);
        }
    }

    fn restart(&mut self, i: usize, s: Slot) {
        self.slots[i] = Some(s);
        self.busy += 1;
        if let Some(e) = self.entry(i) {
            self.unsent.push(e);
        }
        self.push();
    }
}

impl BlockDevice for AsyncFile {
    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn submit(&mut self, req: BlockReq) -> Result<(), BlockReq> {
        let ranged = req.op != BlockOp::Flush;
        if ranged
            && (req.offset.checked_add(u64::from(req.len))).is_none_or(|end| end > self.capacity)
        {
            self.complete(req, BlockStatus::OutOfRange, Vec::new());
            return Ok(());
        }
        if req.op == BlockOp::Write && req.data.len() != req.len as usize {
            self.complete(req, BlockStatus::OutOfRange, Vec::new());
            return Ok(());
        }
        if self.ring.is_none() {
            self.complete(req, BlockStatus::IoError, Vec::new());
            return Ok(());
        }
        let Some(i) = self.free.pop() else {
            return Err(req);
        };
        let mut req = req;
        let buf = match req.op {
            BlockOp::Read => vec![0u8; req.len as usize],
            BlockOp::Write => std::mem::take(&mut req.data),
            _ => Vec::new(),
        };
        self.slots[i] = Some(Slot { req, buf, done: 0 });
        self.busy += 1;
        if let Some(e) = self.entry(i) {
            self.unsent.push(e);
        }
        self.push();
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<BlockDone>) {
        if self.busy > 0 {
            if !self.unsent.is_empty() {
                self.push();
            }
            self.reap();
        }
        out.append(&mut self.ready);
    }

    fn in_flight(&self) -> usize {
        self.busy + self.ready.len()
    }

    fn drain(&mut self) {
        while self.busy > 0 {
            self.push();
            let Some(ring) = self.ring.as_mut() else {
                return;
            };
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    // The ring is broken with operations in flight: their
                    // buffers can never be freed safely.
                    for s in self.slots.iter_mut() {
                        if let Some(s) = s.take() {
                            std::mem::forget(s.buf);
                        }
                    }
                    self.ring = None;
                    self.busy = 0;
                    return;
                }
            }
            self.reap();
        }
    }
}

impl Drop for AsyncFile {
    fn drop(&mut self) {
        self.drain();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(len: u64) -> (AsyncFile, std::path::PathBuf) {
        let p = std::env::temp_dir().join(format!("dp-blockio-{}-{}", std::process::id(), len));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(len).unwrap();
        (AsyncFile::new(f, len).unwrap(), p)
    }

    fn wait(d: &mut AsyncFile, n: usize) -> Vec<BlockDone> {
        let mut out = Vec::new();
        let t0 = std::time::Instant::now();
        while out.len() < n {
            d.poll(&mut out);
            assert!(t0.elapsed().as_secs() < 10, "completions did not come");
        }
        out
    }

    fn req(tag: u64, op: BlockOp, offset: u64, len: u32, data: Vec<u8>) -> BlockReq {
        BlockReq {
            tag,
            op,
            offset,
            len,
            data,
        }
    }

    #[test]
    fn many_requests_in_flight_complete_and_read_back() {
        let (mut d, p) = file(1 << 20);
        for i in 0..32u64 {
            let data = vec![i as u8 + 1; 4096];
            d.submit(req(i, BlockOp::Write, i * 4096, 4096, data))
                .unwrap();
        }
        assert!(d.in_flight() > 0);
        let done = wait(&mut d, 32);
        assert!(done.iter().all(|c| c.status == BlockStatus::Ok));
        d.submit(req(100, BlockOp::Flush, 0, 0, vec![])).unwrap();
        assert_eq!(wait(&mut d, 1)[0].status, BlockStatus::Ok);
        for i in 0..32u64 {
            d.submit(req(i, BlockOp::Read, i * 4096, 4096, vec![]))
                .unwrap();
        }
        for c in wait(&mut d, 32) {
            assert_eq!(c.data, vec![c.tag as u8 + 1; 4096]);
        }
        d.submit(req(7, BlockOp::Discard, 0, 8192, vec![])).unwrap();
        assert_eq!(wait(&mut d, 1)[0].status, BlockStatus::Ok);
        d.submit(req(8, BlockOp::Read, 0, 8192, vec![])).unwrap();
        assert_eq!(wait(&mut d, 1)[0].data, vec![0; 8192]);
        // Write-zeroes zeroes its range only (the block after it keeps
        // its data).
        d.submit(req(11, BlockOp::WriteZeroes, 8192, 4096, vec![]))
            .unwrap();
        assert_eq!(wait(&mut d, 1)[0].status, BlockStatus::Ok);
        d.submit(req(12, BlockOp::Read, 8192, 8192, vec![]))
            .unwrap();
        let got = wait(&mut d, 1).remove(0).data;
        assert_eq!(&got[..4096], &[0; 4096][..]);
        assert_eq!(&got[4096..], &[4u8; 4096][..]);
        // Out of range, and a write whose data is short.
        d.submit(req(9, BlockOp::Read, (1 << 20) - 512, 1024, vec![]))
            .unwrap();
        d.submit(req(10, BlockOp::Write, 0, 1024, vec![0; 512]))
            .unwrap();
        let done = wait(&mut d, 2);
        assert!(done.iter().all(|c| c.status == BlockStatus::OutOfRange));
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn a_full_device_gives_the_request_back() {
        let (mut d, p) = file(1 << 20);
        let mut refused = 0;
        for i in 0..(MAX_IN_FLIGHT as u64 + 10) {
            if d.submit(req(i, BlockOp::Read, 0, 4096, vec![])).is_err() {
                refused += 1;
            }
        }
        // Some may have completed meanwhile, but never more than the
        // slots are in flight.
        assert!(refused <= 10);
        d.drain();
        let mut out = Vec::new();
        d.poll(&mut out);
        assert_eq!(out.len() + refused, MAX_IN_FLIGHT + 10);
        let _ = std::fs::remove_file(p);
    }
}
