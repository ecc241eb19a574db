//! The VM: KVM's VM fd with guest memory in slot 0, the in-kernel
//! irqchip (PIC, IOAPIC, LAPICs) and PIT, and its interrupt lines
//! ([`IrqHandle`], [`Trigger`]).

use std::sync::Arc;

use devplane_wire::IrqAction;
use kvm_bindings::{
    CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::memory::{GuestMemory, MemHandle};
use super::{IDENTITY_MAP_ADDR, KvmError, TSS_ADDR};

/// What the VM, its vCPUs and its interrupt handles share. Field order is
/// drop order: the VM fd closes before guest memory is unmapped.
pub(super) struct VmShared {
    pub(super) fd: VmFd,
    pub(super) mem: GuestMemory,
}

/// A KVM virtual machine with flat guest memory at GPA 0 and the in-kernel
/// PIC, IOAPIC and LAPICs.
pub struct Vm {
    pub(super) shared: Arc<VmShared>,
    pub(super) cpuid: CpuId,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM with `mem_bytes` of guest memory
    /// (a non-zero multiple of 4 KiB) and the in-kernel irqchip.
    pub fn new(mem_bytes: usize) -> Result<Vm, KvmError> {
        let mem = GuestMemory::new(mem_bytes)?;
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(KvmError::MissingCapability(name));
            }
        }
        let fd = kvm.create_vm().map_err(KvmError::ioctl("KVM_CREATE_VM"))?;
        // Real mode on Intel without unrestricted guest runs under vm86 and
        // needs these; on AMD they are accepted and unused. Both must come
        // before the first vCPU.
        fd.set_tss_address(TSS_ADDR as usize)
            .map_err(KvmError::ioctl("KVM_SET_TSS_ADDR"))?;
        if kvm.check_extension(Cap::SetIdentityMapAddr) {
            fd.set_identity_map_address(IDENTITY_MAP_ADDR)
                .map_err(KvmError::ioctl("KVM_SET_IDENTITY_MAP_ADDR"))?;
        }
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: mem_bytes as u64,
            userspace_addr: mem.host_addr() as u64,
        };
        // SAFETY: the region is exactly the anonymous mapping `mem`, which
        // is owned by the `VmShared` that also owns `fd`; `fd` is dropped
        // (VM destroyed once every vCPU fd is closed too, and every vCPU
        // holds the same `VmShared`) before the mapping is unmapped, so KVM
        // never uses the host range after it is gone.
        unsafe { fd.set_user_memory_region(region) }
            .map_err(KvmError::ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        fd.create_irq_chip()
            .map_err(KvmError::ioctl("KVM_CREATE_IRQCHIP"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        Ok(Vm {
            shared: Arc::new(VmShared { fd, mem }),
            cpuid,
        })
    }

    /// Size of guest memory in bytes.
    pub fn mem_size(&self) -> usize {
        self.shared.mem.size()
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn load(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        self.shared.mem.write(gpa, bytes)
    }

    /// Copies `len` bytes of guest memory at `gpa` out.
    pub fn read_mem(&self, gpa: u64, len: usize) -> Result<Vec<u8>, KvmError> {
        let mut out = vec![0u8; len];
        self.shared.mem.read(gpa, &mut out)?;
        Ok(out)
    }

    /// Creates the in-kernel i8254 PIT (`KVM_CREATE_PIT2`) on ports
    /// `0x40-0x43`, its output on GSI 0, with the speaker port `0x61`
    /// emulated in the kernel too (Linux reads the channel-2 gate there to
    /// calibrate the TSC). Call at most once, after [`Vm::new`] (which
    /// created the irqchip the PIT needs) and before the vCPUs run.
    ///
    /// The timer stays in the kernel on purpose: a timer model on a server
    /// would put a network round trip on every tick of the guest's clock.
    pub fn create_pit(&self) -> Result<(), KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        if !kvm.check_extension(Cap::Pit2) {
            return Err(KvmError::MissingCapability("KVM_CAP_PIT2"));
        }
        let config = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.shared
            .fd
            .create_pit2(config)
            .map_err(KvmError::ioctl("KVM_CREATE_PIT2"))
    }

    /// Sets interrupt line `gsi` (0-15: PIC and IOAPIC; 16-23: IOAPIC).
    pub fn irq_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        irq_line(&self.shared.fd, gsi, level)
    }

    /// Raises then lowers `gsi`: one edge for an edge-triggered input.
    pub fn irq_edge(&self, gsi: u32) -> Result<(), KvmError> {
        irq_edge(&self.shared.fd, gsi)
    }

    /// A handle that reads and writes guest memory from any thread.
    pub fn mem_handle(&self) -> MemHandle {
        MemHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// A handle that injects interrupts into this VM from any thread.
    pub fn irq_handle(&self) -> IrqHandle {
        IrqHandle {
            shared: Arc::clone(&self.shared),
        }
    }
}

fn irq_line(fd: &VmFd, gsi: u32, level: bool) -> Result<(), KvmError> {
    fd.set_irq_line(gsi, level)
        .map_err(KvmError::ioctl("KVM_IRQ_LINE"))
}

fn irq_edge(fd: &VmFd, gsi: u32) -> Result<(), KvmError> {
    irq_line(fd, gsi, true)?;
    irq_line(fd, gsi, false)
}

/// Injects interrupts into a VM from any thread. Keeps the VM alive.
#[derive(Clone)]
pub struct IrqHandle {
    shared: Arc<VmShared>,
}

impl IrqHandle {
    /// Sets interrupt line `gsi` (see [`Vm::irq_line`]).
    pub fn irq_line(&self, gsi: u32, level: bool) -> Result<(), KvmError> {
        irq_line(&self.shared.fd, gsi, level)
    }

    /// Raises then lowers `gsi` (see [`Vm::irq_edge`]).
    pub fn irq_edge(&self, gsi: u32) -> Result<(), KvmError> {
        irq_edge(&self.shared.fd, gsi)
    }
}

/// Where a device's interrupt-line changes go: the one path that local
/// models, remote models (through the engine) and virtio devices raise
/// their interrupts by (vm-superio's `Trigger`, Cloud Hypervisor's
/// `InterruptSourceGroup::trigger`).
pub trait Trigger: Send + Sync {
    /// Asserts, deasserts or pulses (`Edge`: raised then lowered) line
    /// `line`.
    fn trigger(&self, line: u32, action: IrqAction) -> Result<(), KvmError>;
}

/// One interrupt line of a [`Trigger`]: what a device that raises a single
/// line (a virtio device's INTA#) holds.
pub struct IrqLine {
    to: Box<dyn Trigger>,
    line: u32,
}

impl IrqLine {
    /// Line `line` of `to`.
    pub fn new(to: Box<dyn Trigger>, line: u32) -> IrqLine {
        IrqLine { to, line }
    }

    /// Applies `action` to the line.
    pub fn trigger(&self, action: IrqAction) -> Result<(), KvmError> {
        self.to.trigger(self.line, action)
    }
}

impl Trigger for IrqHandle {
    fn trigger(&self, line: u32, action: IrqAction) -> Result<(), KvmError> {
        match action {
            IrqAction::Assert => self.irq_line(line, true),
            IrqAction::Deassert => self.irq_line(line, false),
            IrqAction::Edge => self.irq_edge(line),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send<T: Send>() {}
        fn send_sync_clone<T: Send + Sync + Clone>() {}
        send::<super::super::Vcpu>();
        send::<Vm>();
        send_sync_clone::<IrqHandle>();
        send_sync_clone::<super::super::VcpuKicker>();
        send_sync_clone::<MemHandle>();
    }

    #[test]
    fn memory_size_is_validated() {
        assert!(matches!(Vm::new(0), Err(KvmError::MemorySize(0))));
        assert!(matches!(Vm::new(100), Err(KvmError::MemorySize(100))));
    }
}
