//! The client's side of the `blockstore` device model: capacity, reads,
//! writes and flushes of the disk, spoken as 8-byte register accesses to
//! the model's MMIO window (see `devplane_devmodels::blockstore`), whether
//! the model runs in this process or on a server.

use devplane_devmodels::blockstore::{
    CTRL_BASE, CTRL_CAPACITY, CTRL_FAILURES, CTRL_FLUSH, CTRL_FLUSH_PENDING, CTRL_WRITES,
};

use devplane_devmodels::{DeviceModel, Space};
use devplane_wire::AccessSize;

use super::VirtioError;

/// The longest a flush is waited for.
pub const FLUSH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// One 8-byte register access to the block store, at an offset from its
/// base. Implemented over a local model and over the wire.
pub trait StorePort {
    /// Reads the 8 bytes at `offset`.
    fn read(&mut self, offset: u64) -> Result<u64, VirtioError>;
    /// Writes 8 bytes at `offset`. Over the wire this may be posted: the
    /// next [`read`](StorePort::read) waits until it is applied.
    fn write(&mut self, offset: u64, value: u64) -> Result<(), VirtioError>;
}

/// A block store model running in this process, owned by the thread that
/// serves the virtio device.
pub struct LocalStore<'a>(pub &'a mut dyn DeviceModel);

impl StorePort for LocalStore<'_> {
    // A page the store is still reading from its file is waited for: this
    // thread owns the disk.
    fn read(&mut self, offset: u64) -> Result<u64, VirtioError> {
        let m = &mut *self.0;
        devplane_devmodels::wait_ready(|| m.read(Space::Mmio, offset, AccessSize::B8))
            .map_err(|e| VirtioError::Store(e.to_string()))
    }

    fn write(&mut self, offset: u64, value: u64) -> Result<(), VirtioError> {
        let m = &mut *self.0;
        devplane_devmodels::wait_ready(|| m.write(Space::Mmio, offset, AccessSize::B8, value))
            .map_err(|e| VirtioError::Store(e.to_string()))
    }
}

/// The disk operations virtio-blk needs, over any [`StorePort`].
pub struct Store<'a>(pub &'a mut dyn StorePort);

impl Store<'_> {
    /// Capacity in bytes.
    pub fn capacity(&mut self) -> Result<u64, VirtioError> {
        self.0.read(CTRL_BASE + CTRL_CAPACITY)
    }

    /// Reads `buf.len()` (a multiple of 8) bytes at byte `offset` (8-aligned).
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), VirtioError> {
        check(offset, buf.len())?;
        for (i, chunk) in buf.chunks_exact_mut(8).enumerate() {
            let v = self.0.read(offset + 8 * i as u64)?;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    /// Writes `data` (a multiple of 8 bytes) at byte `offset` (8-aligned),
    /// and confirms with the store's write counter that every word was
    /// applied (over the wire the words are posted writes).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), VirtioError> {
        check(offset, data.len())?;
        let before = self.0.read(CTRL_BASE + CTRL_WRITES)?;
        for (i, chunk) in data.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(chunk);
            self.0.write(offset + 8 * i as u64, u64::from_le_bytes(w))?;
        }
        let after = self.0.read(CTRL_BASE + CTRL_WRITES)?;
        let words = (data.len() / 8) as u64;
        if after.wrapping_sub(before) != words {
            return Err(VirtioError::Store(format!(
                "{words} words written but the store applied {}",
                after.wrapping_sub(before)
            )));
        }
        Ok(())
    }

    /// Writes every cached page back and makes it durable; returns once the
    /// store has done so.
    ///
    /// The store flushes without holding its worker: the write of
    /// `CTRL_FLUSH` returns at once, and this polls `CTRL_FLUSH_PENDING`
    /// (spinning briefly, then sleeping up to 1 ms between reads) until
    /// every flush requested has settled, at most [`FLUSH_WAIT`]. The
    /// flush is ours if the count rose and no failure came meanwhile.
    pub fn flush(&mut self) -> Result<(), VirtioError> {
        let before = self.0.read(CTRL_BASE + CTRL_FLUSH)?;
        let failures = self.0.read(CTRL_BASE + CTRL_FAILURES)?;
        self.0.write(CTRL_BASE + CTRL_FLUSH, 1)?;
        let start = std::time::Instant::now();
        let mut nap = std::time::Duration::from_micros(20);
        while self.0.read(CTRL_BASE + CTRL_FLUSH_PENDING)? > 0 {
            if start.elapsed() > FLUSH_WAIT {
                return Err(VirtioError::Store(format!(
                    "the store did not settle the flush within {FLUSH_WAIT:?}"
                )));
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(std::time::Duration::from_millis(1));
        }
        let after = self.0.read(CTRL_BASE + CTRL_FLUSH)?;
        if after == before || self.0.read(CTRL_BASE + CTRL_FAILURES)? != failures {
            return Err(VirtioError::Store(
                "the store did not complete the flush (an I/O error on the server)".into(),
            ));
        }
        Ok(())
    }
}

fn check(offset: u64, len: usize) -> Result<(), VirtioError> {
    if !offset.is_multiple_of(8) || !len.is_multiple_of(8) {
        return Err(VirtioError::Store(format!(
            "{len} bytes at {offset:#x}: block transfers are in whole 8-byte words"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use devplane_devmodels::registry::{self, ModelParams};

    use super::*;

    /// Removes a file when dropped.
    struct TempFile(std::path::PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn store(path: &std::path::Path) -> Box<dyn DeviceModel> {
        let params = ModelParams {
            backing: Some(path.to_path_buf()),
            ..Default::default()
        };
        registry::build("blockstore", params).unwrap()
    }

    #[test]
    fn the_real_blockstore_keeps_flushed_data_across_instances() {
        let f = TempFile(
            std::env::temp_dir().join(format!("dp-store-test-{}.img", std::process::id())),
        );
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        {
            let mut m = store(&f.0);
            let mut port = LocalStore(&mut *m);
            let mut s = Store(&mut port);
            assert_eq!(
                s.capacity().unwrap(),
                devplane_devmodels::blockstore::DEFAULT_SIZE
            );
            s.write(8192, &data).unwrap();
            s.flush().unwrap();
            assert!(s.write(3, &data[..8]).is_err(), "unaligned");
        }
        let mut m = store(&f.0);
        let mut port = LocalStore(&mut *m);
        let mut back = vec![0u8; 4096];
        Store(&mut port).read(8192, &mut back).unwrap();
        assert_eq!(back, data);
    }
}
