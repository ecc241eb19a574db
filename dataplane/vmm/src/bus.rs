//! One device interface for a vCPU's exits: every mapped range of a VM
//! leads to a [`BusDevice`] (Firecracker's `vstate/bus.rs`, Cloud
//! Hypervisor's `vm-device` bus), whatever runs behind it:
//!
//! - [`LocalModel`]: a device model run in place, in the vCPU thread;
//! - [`RemoteModel`]: a model on a server, reached through the vCPU's
//!   remote path ([`VcpuIo`]'s exit ring, the engine);
//! - [`VirtioBlkDevice`]: a virtio block device (its transport here, where
//!   guest memory is; its disk local or remote).
//!
//! A vCPU's [`Bus`] owns its devices: in a VM with one vCPU (every Linux
//! guest) a local model belongs to the one thread that runs it and is used
//! without a lock. Where several vCPUs of a VM reach the same device, each
//! bus holds a [`Shared`] handle to it (a mutex, uncontended unless two
//! vCPUs hit the same device at once). A remote model holds only its index
//! in the VM's remote-model table and needs no sharing.
//!
//! An exit costs one virtual call ([`BusDevice::read`] or
//! [`BusDevice::write`]) after the map lookup; the device reaches the
//! vCPU's exit path (interrupt delivery, reset requests, counters, the
//! remote path) through the [`VcpuIo`] it is handed.

use std::sync::{Arc, Mutex};

use devplane_devmodels::blockstore::CTRL_BASE;
use devplane_devmodels::{DeviceModel, Snapshot, Space};
use devplane_wire::AccessSize;

use crate::devmap::DeviceMap;
use crate::vcpu_io::VcpuIo;
use crate::virtio::VirtioError;
use crate::virtio::blk::VirtioBlk;
use crate::virtio::store::{LocalStore, StorePort};

/// Where an access landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct At {
    /// Port or MMIO.
    pub space: Space,
    /// The guest's address (port or GPA).
    pub addr: u64,
    /// Its offset from the start of the device's range.
    pub offset: u64,
    /// The range's writes are posted (do not wait for the answer).
    pub posted: bool,
}

/// A device on a vCPU's bus.
pub trait BusDevice: Send {
    /// A read of `size` bytes; the value is masked to `size`.
    fn read(&mut self, io: &mut VcpuIo, at: At, size: AccessSize) -> u64;
    /// A write of `size` bytes of `data`.
    fn write(&mut self, io: &mut VcpuIo, at: At, size: AccessSize, data: u64);

    /// The device's state for a snapshot of its VM: `Ok(None)` for a
    /// device that keeps none here (a remote model: its state stays on its
    /// server), `Err` for one that cannot be snapshotted.
    fn snapshot(&self) -> Result<Option<Snapshot>, String> {
        Ok(None)
    }

    /// Puts a state [`BusDevice::snapshot`] returned back.
    fn restore(&mut self, _snap: &Snapshot) -> Result<(), String> {
        Err("this device keeps no state to restore".into())
    }
}

/// A vCPU's bus: its VM's device map, with the devices this vCPU reaches.
pub type Bus = DeviceMap<Box<dyn BusDevice>>;

/// One bus device per vCPU of a VM for `dev`: `dev` itself when the VM has
/// one vCPU (owned by the thread that runs it), else a [`Shared`] handle
/// to it in each.
pub fn per_vcpu<D: BusDevice + 'static>(dev: D, vcpus: usize) -> Vec<Box<dyn BusDevice>> {
    if vcpus == 1 {
        return vec![Box::new(dev)];
    }
    let shared = Arc::new(Mutex::new(dev));
    (0..vcpus)
        .map(|_| Box::new(Shared(Arc::clone(&shared))) as Box<dyn BusDevice>)
        .collect()
}

/// A device that several vCPUs of a VM reach, behind a mutex.
pub struct Shared<D>(pub Arc<Mutex<D>>);

impl<D: BusDevice> BusDevice for Shared<D> {
    fn read(&mut self, io: &mut VcpuIo, at: At, size: AccessSize) -> u64 {
        match self.0.lock() {
            Ok(mut d) => d.read(io, at, size),
            // A vCPU panicked inside the device: it reads as absent.
            Err(_) => size.mask(),
        }
    }

    fn write(&mut self, io: &mut VcpuIo, at: At, size: AccessSize, data: u64) {
        if let Ok(mut d) = self.0.lock() {
            d.write(io, at, size, data);
        }
    }

    fn snapshot(&self) -> Result<Option<Snapshot>, String> {
        match self.0.lock() {
            Ok(d) => d.snapshot(),
            Err(_) => Err("a vCPU panicked inside the device".into()),
        }
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), String> {
        match self.0.lock() {
            Ok(mut d) => d.restore(snap),
            Err(_) => Err("a vCPU panicked inside the device".into()),
        }
    }
}

/// A device model run in place. Its interrupts and reset requests go to
/// the vCPU's exit path right after the access that raised them.
pub struct LocalModel(pub Box<dyn DeviceModel>);

impl BusDevice for LocalModel {
    fn read(&mut self, io: &mut VcpuIo, at: At, size: AccessSize) -> u64 {
        io.count_local();
        // A page its backing store is still reading: it is waited for,
        // here in the vCPU that made the access.
        let model = &mut self.0;
        let v = devplane_devmodels::wait_ready(|| model.read(at.space, at.offset, size))
            .unwrap_or(size.mask())
            & size.mask();
        io.after_local(&mut *self.0);
        v
    }

    fn write(&mut self, io: &mut VcpuIo, at: At, size: AccessSize, data: u64) {
        io.count_local();
        // A model's refusal is the guest's problem: the write is dropped.
        let model = &mut self.0;
        let _ = devplane_devmodels::wait_ready(|| model.write(at.space, at.offset, size, data));
        io.after_local(&mut *self.0);
    }

    fn snapshot(&self) -> Result<Option<Snapshot>, String> {
        Ok(Some(self.0.snapshot()))
    }

    fn restore(&mut self, snap: &Snapshot) -> Result<(), String> {
        self.0.restore(snap).map_err(|e| e.to_string())
    }
}

/// A device model on a server: entry `index` of the VM's remote-model
/// table. A failed access (counted by the remote path) reads all-ones; a
/// failed write is lost.
pub struct RemoteModel {
    /// Index in the VM's remote-model table.
    pub index: u32,
}

impl BusDevice for RemoteModel {
    fn read(&mut self, io: &mut VcpuIo, at: At, size: AccessSize) -> u64 {
        io.count_remote_exit();
        io.remote(at.space, at.addr, size, None, self.index, false)
            .unwrap_or(size.mask())
    }

    fn write(&mut self, io: &mut VcpuIo, at: At, size: AccessSize, data: u64) {
        io.count_remote_exit();
        io.remote(at.space, at.addr, size, Some(data), self.index, at.posted);
    }
}

/// Bytes of a `blockstore` model's MMIO window: the data window and the
/// control registers above it.
pub const STORE_WINDOW: u64 = CTRL_BASE + 0x1000;

/// Where a virtio block device's disk (a `blockstore` model) runs.
pub enum DiskAt {
    /// In this process, owned with the device.
    Local(Box<dyn DeviceModel>),
    /// On a server: entry `index` of the VM's remote-model table, mapped
    /// as MMIO at `base` with posted writes.
    Remote {
        /// The MMIO base of the store's window.
        base: u64,
        /// Index in the VM's remote-model table.
        index: u32,
    },
}

/// A virtio block device: its transport runs in the vCPU thread (it
/// reaches guest memory), its disk at `disk`.
pub struct VirtioBlkDevice {
    /// The device.
    pub dev: VirtioBlk,
    /// Its disk.
    pub disk: DiskAt,
}

impl VirtioBlkDevice {
    /// Runs `f` on the device with a port to its disk.
    fn with_disk<R>(
        &mut self,
        io: &mut VcpuIo,
        f: impl FnOnce(&mut VirtioBlk, &mut dyn StorePort) -> R,
    ) -> R {
        io.count_local();
        match &mut self.disk {
            DiskAt::Local(model) => f(&mut self.dev, &mut LocalStore(&mut **model)),
            DiskAt::Remote { base, index } => f(
                &mut self.dev,
                &mut RemoteStore {
                    io,
                    base: *base,
                    index: *index,
                },
            ),
        }
    }
}

impl BusDevice for VirtioBlkDevice {
    fn read(&mut self, io: &mut VcpuIo, at: At, size: AccessSize) -> u64 {
        self.with_disk(io, |dev, port| dev.read(at.offset, size, port))
    }

    fn write(&mut self, io: &mut VcpuIo, at: At, size: AccessSize, data: u64) {
        self.with_disk(io, |dev, port| dev.write(at.offset, size, data, port));
    }

    fn snapshot(&self) -> Result<Option<Snapshot>, String> {
        Err("a virtio-blk device's queues and disk are not snapshotted".into())
    }
}

/// A remote `blockstore` model, reached through the vCPU's own remote path
/// (its ring, retransmission and posted-write ordering). Its writes are
/// posted; a read waits for them.
struct RemoteStore<'a> {
    io: &'a mut VcpuIo,
    base: u64,
    index: u32,
}

impl RemoteStore<'_> {
    /// The GPA of `offset`, if it lies in the store's window.
    fn gpa(&self, offset: u64) -> Result<u64, VirtioError> {
        match offset.checked_add(8) {
            Some(end) if end <= STORE_WINDOW => Ok(self.base + offset),
            _ => Err(VirtioError::Store(format!(
                "offset {offset:#x} is outside the store's window"
            ))),
        }
    }
}

impl StorePort for RemoteStore<'_> {
    fn read(&mut self, offset: u64) -> Result<u64, VirtioError> {
        let gpa = self.gpa(offset)?;
        self.io
            .remote(Space::Mmio, gpa, AccessSize::B8, None, self.index, false)
            .ok_or_else(|| VirtioError::Store(format!("read at {gpa:#x} failed or timed out")))
    }

    fn write(&mut self, offset: u64, value: u64) -> Result<(), VirtioError> {
        let gpa = self.gpa(offset)?;
        self.io
            .remote(
                Space::Mmio,
                gpa,
                AccessSize::B8,
                Some(value),
                self.index,
                true,
            )
            .map(|_| ())
            .ok_or_else(|| VirtioError::Store(format!("write at {gpa:#x} failed or timed out")))
    }
}
