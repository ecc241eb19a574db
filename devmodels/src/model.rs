//! The [`DeviceModel`] trait every model implements.

use devplane_wire::{AccessSize, IrqAction};

use crate::{Snapshot, SnapshotError};

/// The address space of an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// Port I/O.
    Pio,
    /// Memory-mapped I/O.
    Mmio,
}

/// Why a model refused an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The model decodes nothing at that offset or in that space.
    #[error("no register at {space:?} offset {offset:#x}")]
    Unmapped {
        /// Address space.
        space: Space,
        /// Offset from the model's base.
        offset: u64,
    },
    /// The access size or alignment is not supported there.
    #[error("{size}-byte access not supported at {space:?} offset {offset:#x}")]
    BadAccess {
        /// Address space.
        space: Space,
        /// Offset from the model's base.
        offset: u64,
        /// Access size in bytes.
        size: usize,
    },
    /// The model's backing store failed the access (an I/O error on the
    /// host running the model; the model reported the cause on stderr).
    #[error("backing store I/O failed at {space:?} offset {offset:#x}")]
    Io {
        /// Address space.
        space: Space,
        /// Offset from the model's base.
        offset: u64,
    },
    /// Not applied: the access waits on the backing store (the model
    /// started reading what it needs and never waits for it); the same
    /// access, made again once the read completed, is applied.
    #[error("backing store busy at {space:?} offset {offset:#x}: try again")]
    Busy {
        /// Address space.
        space: Space,
        /// Offset from the model's base.
        offset: u64,
    },
}

/// The longest [`wait_ready`] waits for a model's backing store.
pub const READY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Makes `access` again while the model answers [`DeviceError::Busy`],
/// for at most [`READY_WAIT`] (then its `Busy` is returned): what a caller
/// that owns the model and may wait does (a local model on a vCPU's bus, a
/// local disk's virtio thread). A server's worker never does: it answers
/// `Busy` and the client sends the access again.
pub fn wait_ready<T>(mut access: impl FnMut() -> Result<T, DeviceError>) -> Result<T, DeviceError> {
    let deadline = std::time::Instant::now() + READY_WAIT;
    loop {
        match access() {
            Err(DeviceError::Busy { .. }) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            r => return r,
        }
    }
}

impl DeviceError {
    /// The wire status that reports this error to the client.
    pub fn status(&self) -> devplane_wire::Status {
        match self {
            DeviceError::Unmapped { .. } => devplane_wire::Status::Unmapped,
            // The wire has no I/O-error status; the access is refused.
            DeviceError::BadAccess { .. } | DeviceError::Io { .. } => {
                devplane_wire::Status::Rejected
            }
            DeviceError::Busy { .. } => devplane_wire::Status::Busy,
        }
    }
}

/// A change to an interrupt line, raised by a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqEvent {
    /// The model's line (GSI); the owner maps it to a VM.
    pub line: u32,
    /// Assert, deassert or edge.
    pub action: IrqAction,
}

/// Something a model asks its owner to do, beyond interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelEvent {
    /// The guest asked for a machine reset (the i8042's CPU-reset pulse).
    /// The owner — the client VMM that runs the VM — stops the VM.
    Reset,
}

/// A model's serial line, as its owner sees it: the bytes the guest
/// transmitted, and bytes received from the line (an operator's
/// keystrokes), which the model raises its receive interrupt for.
pub trait ConsolePort {
    /// Moves the bytes transmitted since the last call to the end of
    /// `out`, at most `max` of them (the rest stay for the next call).
    fn drain_output(&mut self, out: &mut Vec<u8>, max: usize);

    /// Whether transmitted bytes wait to be drained.
    fn has_output(&self) -> bool;

    /// Queues `bytes` as received from the line; returns how many were
    /// accepted (fewer when the model's input queue is full).
    fn feed_input(&mut self, bytes: &[u8]) -> usize;
}

/// An emulated device. Owned by one thread; never shared.
///
/// Addresses are offsets from the model's base in the given space (the
/// dispatcher subtracts the base it registered the model at).
pub trait DeviceModel: Send {
    /// The kind name, as used in configuration files (`"counter"`, ...).
    fn kind(&self) -> &'static str;

    /// Reads `size` bytes at `offset`; the value is within `size`.
    fn read(&mut self, space: Space, offset: u64, size: AccessSize) -> Result<u64, DeviceError>;

    /// Writes `size` bytes of `data` at `offset`.
    fn write(
        &mut self,
        space: Space,
        offset: u64,
        size: AccessSize,
        data: u64,
    ) -> Result<(), DeviceError>;

    /// Advances time-driven state to `now_ns` (a monotonic clock). Returns
    /// the next time the model wants a tick, if any.
    fn tick(&mut self, now_ns: u64) -> Option<u64> {
        let _ = now_ns;
        None
    }

    /// Takes the next interrupt-line change the model raised, if any. The
    /// owner calls this after every access and tick until it is `None`.
    fn take_irq(&mut self) -> Option<IrqEvent> {
        None
    }

    /// Takes the next [`ModelEvent`] the model raised, if any. The owner
    /// calls this after every access until it is `None`.
    fn take_event(&mut self) -> Option<ModelEvent> {
        None
    }

    /// Writes what the model holds in memory for a backing store (dirty
    /// pages) back to it, durably, before the model is handed to another
    /// owner: afterwards its snapshot holds nothing that a copy dropped
    /// later could write back over newer data. True if all of it was
    /// written (nothing to write: true).
    fn write_back(&mut self) -> bool {
        true
    }

    /// The model as a disk that serves block requests asynchronously
    /// (`crate::blockio`), if it is one. A model with registers as well
    /// keeps both views of its data coherent.
    fn block(&mut self) -> Option<&mut dyn crate::blockio::BlockDevice> {
        None
    }

    /// The model as a serial console (a UART), if it is one: where its
    /// owner takes what the guest transmitted and feeds what an operator
    /// types (see [`ConsolePort`]).
    fn console(&mut self) -> Option<&mut dyn ConsolePort> {
        None
    }

    /// The whole state, versioned.
    fn snapshot(&self) -> Snapshot;

    /// Replaces the whole state with `snap`; on error the state is unchanged.
    fn restore(&mut self, snap: &Snapshot) -> Result<(), SnapshotError>;
}
