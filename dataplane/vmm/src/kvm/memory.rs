//! Guest memory: one anonymous mapping, KVM slot 0 at GPA 0, every access
//! from the VMM bounds-checked; [`MemHandle`] reads and writes it from any
//! thread.

use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use super::vm::VmShared;
use super::{IDENTITY_MAP_ADDR, KvmError};

/// Page size of guest memory.
const PAGE_SIZE: usize = 4096;

/// Guest memory: one anonymous mapping. Lives as long as any
/// [`Vm`](super::Vm), [`Vcpu`](super::Vcpu) or [`IrqHandle`](super::IrqHandle)
/// of its VM.
pub(super) struct GuestMemory {
    map: MmapRaw,
    size: usize,
}

impl GuestMemory {
    /// Maps `size` bytes (a non-zero multiple of 4 KiB ending at or below
    /// [`IDENTITY_MAP_ADDR`]).
    pub(super) fn new(size: usize) -> Result<GuestMemory, KvmError> {
        if size == 0 || !size.is_multiple_of(PAGE_SIZE) || size as u64 > IDENTITY_MAP_ADDR {
            return Err(KvmError::MemorySize(size));
        }
        let map = MmapOptions::new()
            .len(size)
            .map_anon()
            .map_err(KvmError::Mmap)?;
        Ok(GuestMemory {
            map: MmapRaw::from(map),
            size,
        })
    }

    /// Size in bytes.
    pub(super) fn size(&self) -> usize {
        self.size
    }

    /// The host address of GPA 0.
    pub(super) fn host_addr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// The offset of `[gpa, gpa + len)` in the mapping, if it fits.
    fn offset(&self, gpa: u64, len: usize) -> Result<usize, KvmError> {
        let out = || KvmError::OutOfBounds {
            gpa,
            len,
            size: self.size,
        };
        let start = usize::try_from(gpa).map_err(|_| out())?;
        match start.checked_add(len) {
            Some(end) if end <= self.size => Ok(start),
            _ => Err(out()),
        }
    }

    /// Copies `buf.len()` bytes at `gpa` into `buf`.
    pub(super) fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        let off = self.offset(gpa, buf.len())?;
        // SAFETY: `offset` checked that [off, off + len) lies inside the
        // mapping, which `self` keeps alive. Guest memory is plain bytes
        // that a running vCPU may touch concurrently (like DMA); no Rust
        // reference to it exists, and `buf` cannot overlap it.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub(super) fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        let off = self.offset(gpa, bytes.len())?;
        // SAFETY: as in `read`, with the copy in the other direction.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(off),
                bytes.len(),
            );
        }
        Ok(())
    }
}

/// Reads and writes a VM's guest memory from any thread (device DMA, such
/// as a virtqueue's buffers). Keeps the VM alive.
#[derive(Clone)]
pub struct MemHandle {
    pub(super) shared: Arc<VmShared>,
}

impl MemHandle {
    /// Copies `buf.len()` bytes of guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), KvmError> {
        self.shared.mem.read(gpa, buf)
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        self.shared.mem.write(gpa, bytes)
    }

    /// Size of guest memory in bytes.
    pub fn size(&self) -> usize {
        self.shared.mem.size()
    }
}
