//! A whole VM's state: snapshots of a held VM and their restore into a
//! new one (guest memory, vCPUs, in-kernel irqchip and clock, local
//! devices, the engine's sequence numbers).

use super::*;

/// Why [`Client::snapshot`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// The client does not run this VM.
    #[error("VM {0} is not in this client")]
    UnknownVm(u32),
    /// Its vCPUs are not held.
    #[error("VM {0} is not suspended: suspend it first")]
    NotSuspended(u32),
    /// A vCPU's guest ended: there is no running VM to snapshot.
    #[error("VM {vm}: vCPU {vcpu} has ended")]
    VcpuEnded {
        /// VM id.
        vm: u32,
        /// vCPU index.
        vcpu: u16,
    },
    /// KVM refused to give a piece of state.
    #[error("VM {vm}: {source}")]
    Kvm {
        /// VM id.
        vm: u32,
        /// Why.
        source: KvmError,
    },
    /// A state does not fit the VM it should go into.
    #[error("VM {vm}: {why}")]
    Unfit {
        /// VM id.
        vm: u32,
        /// What does not fit.
        why: String,
    },
    /// A local device cannot be snapshotted.
    #[error("VM {vm}: device {model} at {base:#x}: {why}")]
    Device {
        /// VM id.
        vm: u32,
        /// Its model id.
        model: u32,
        /// Its base address.
        base: u64,
        /// Why.
        why: String,
    },
}

/// Checks that `snap` fits `vs` (VM id, memory size, vCPUs), puts its
/// memory and in-kernel devices into `vm`, and returns its vCPUs by index.
pub(super) fn restore_vm(
    vs: &VmSpec,
    vm: &Vm,
    snap: VmSnapshot,
) -> Result<Vec<Option<VcpuSnapshot>>, ClientError> {
    let unfit = |why: String| ClientError::Restore { vm: vs.id, why };
    if snap.vm != vs.id {
        return Err(unfit(format!("the snapshot is of VM {}", snap.vm)));
    }
    if snap.memory.len() != vs.mem_bytes {
        return Err(unfit(format!(
            "the snapshot has {:#x} bytes of guest memory, the VM {:#x}",
            snap.memory.len(),
            vs.mem_bytes
        )));
    }
    let mut vcpus: Vec<Option<VcpuSnapshot>> = vs.vcpus.iter().map(|_| None).collect();
    if snap.vcpus.len() != vcpus.len() {
        return Err(unfit(format!(
            "the snapshot has {} vCPUs, the VM {}",
            snap.vcpus.len(),
            vcpus.len()
        )));
    }
    for v in snap.vcpus {
        let index = v.index;
        match vcpus.get_mut(usize::from(index)) {
            Some(slot @ None) => *slot = Some(v),
            _ => return Err(unfit(format!("vCPU {index} is out of range or twice"))),
        }
    }
    let kerr = |source| ClientError::Kvm { vm: vs.id, source };
    vm.load(0, &snap.memory).map_err(kerr)?;
    vm.restore_machine(&snap.machine).map_err(kerr)?;
    Ok(vcpus)
}

/// Puts a vCPU's snapshot into its new vCPU, its bus's local models and
/// its exit path (the request sequence continues).
pub(super) fn restore_vcpu(
    vm: u32,
    snap: &VcpuSnapshot,
    vcpu: &Vcpu,
    bus: &mut Bus,
    io: &mut VcpuIo,
) -> Result<(), ClientError> {
    vcpu.restore_state(&snap.state)
        .map_err(|source| ClientError::Kvm { vm, source })?;
    for d in &snap.devices {
        let why = match bus.lookup_mut(d.space, d.base) {
            Some(m) if m.model == d.model && m.base == d.base => match m.device.restore(&d.snap) {
                Ok(()) => continue,
                Err(e) => e,
            },
            _ => "the VM has no such local device there".to_string(),
        };
        return Err(ClientError::Restore {
            vm,
            why: format!("device {} at {:#x}: {why}", d.model, d.base),
        });
    }
    io.set_seq(snap.seq);
    Ok(())
}

/// On a held vCPU's thread: its KVM state, local models and sequence.
pub(super) fn vcpu_snapshot(
    vm: u32,
    index: u16,
    vcpu: &mut Vcpu,
    handler: &mut ExitHandler,
) -> Result<VcpuSnapshot, VmStateError> {
    let state = vcpu
        .save_state()
        .map_err(|source| VmStateError::Kvm { vm, source })?;
    let mut devices = Vec::new();
    for m in handler.bus_mut().entries() {
        let device = |why| VmStateError::Device {
            vm,
            model: m.model,
            base: m.base,
            why,
        };
        if let Some(snap) = m.device.snapshot().map_err(device)? {
            devices.push(DeviceSnapshot {
                space: m.space,
                base: m.base,
                model: m.model,
                snap,
            });
        }
    }
    Ok(VcpuSnapshot {
        index,
        seq: handler.io().seq(),
        state,
        devices,
    })
}

impl Client {
    /// Like [`Client::start`], but VM `snapshot.vm` (which must be in
    /// `spec`, with the same memory size and vCPUs) starts from the
    /// snapshot instead of its images: its memory, in-kernel devices, vCPU
    /// states, local models and request sequences are the snapshot's. The
    /// client starts suspended: [`Client::resume`] runs it.
    pub fn restore(spec: ClientSpec, snapshot: VmSnapshot) -> Result<Client, ClientError> {
        let vm = snapshot.vm;
        if !spec.vms.iter().any(|v| v.id == vm) {
            return Err(ClientError::Restore {
                vm,
                why: "the client does not run this VM".into(),
            });
        }
        Client::launch(spec, Vec::new(), vec![snapshot], true)
    }

    /// Like [`Client::start`], but suspended before any guest instruction
    /// runs: a migration's target, which writes guest memory
    /// ([`Vm::load`] through [`Client::vm`]) and then puts the VM's state
    /// in ([`Client::apply_state`]) before [`Client::resume`].
    pub fn start_held(spec: ClientSpec) -> Result<Client, ClientError> {
        Client::launch(spec, Vec::new(), Vec::new(), true)
    }

    /// Puts `snap`'s state into held VM `snap.vm` of this client (started
    /// by [`Client::start_held`]): its in-kernel devices and clock, and on
    /// each held vCPU's thread its KVM state, local models and request
    /// sequence. `snap.memory` is not used: the caller wrote guest memory.
    pub fn apply_state(&self, snap: &VmSnapshot) -> Result<(), VmStateError> {
        let vm = snap.vm;
        let kvm = self.vm(vm).ok_or(VmStateError::UnknownVm(vm))?;
        if !self.suspended() {
            return Err(VmStateError::NotSuspended(vm));
        }
        let slots: Vec<(usize, u16)> = self
            .vcpus
            .iter()
            .enumerate()
            .filter(|(_, v)| v.vm == vm)
            .map(|(slot, v)| (slot, v.vcpu))
            .collect();
        let mismatch = |why: String| VmStateError::Unfit { vm, why };
        if slots.len() != snap.vcpus.len() {
            return Err(mismatch(format!(
                "the state has {} vCPUs, the VM {}",
                snap.vcpus.len(),
                slots.len()
            )));
        }
        kvm.restore_machine(&snap.machine)
            .map_err(|source| VmStateError::Kvm { vm, source })?;
        for (slot, index) in slots {
            let Some(v) = snap.vcpus.iter().find(|v| v.index == index) else {
                return Err(mismatch(format!("the state lacks vCPU {index}")));
            };
            let (tx, rx) = std::sync::mpsc::channel();
            let state = v.clone_state();
            let job: Job = Box::new(move |vcpu, handler| {
                let (bus, io) = handler.parts_mut();
                let r = restore_vcpu(vm, &state, vcpu, bus, io);
                let _ = tx.send(r.map_err(|e| e.to_string()));
            });
            {
                let mut st = self.hold.state();
                st.jobs.push((slot, job));
                self.hold.cond.notify_all();
            }
            rx.recv_timeout(JOB_TIMEOUT)
                .map_err(|_| VmStateError::VcpuEnded { vm, vcpu: index })?
                .map_err(mismatch)?;
        }
        Ok(())
    }

    /// A snapshot of VM `vm`, which must be suspended: its memory, the
    /// in-kernel devices and clock, and per vCPU its KVM state, local
    /// models and request sequence (taken on the vCPU's own thread, where
    /// it holds).
    pub fn snapshot(&self, vm: u32) -> Result<VmSnapshot, VmStateError> {
        self.snapshot_with(vm, true)
    }

    /// [`Client::snapshot`], with guest memory (`memory`) or without it
    /// (a migration sends memory by itself).
    pub fn snapshot_with(&self, vm: u32, memory: bool) -> Result<VmSnapshot, VmStateError> {
        let at = self
            .ids
            .iter()
            .position(|(id, _)| *id == vm)
            .ok_or(VmStateError::UnknownVm(vm))?;
        if !self.suspended() {
            return Err(VmStateError::NotSuspended(vm));
        }
        // From here on the VM's interrupts stay with the server (which
        // sends them again to wherever the VM runs next) rather than being
        // acknowledged here after the state below is taken; the engine
        // thaws them when the client resumes.
        if let Some(e) = &self.engine {
            e.freeze_irqs(vm);
        }
        let mut vcpus = Vec::new();
        for (slot, v) in self.vcpus.iter().enumerate().filter(|(_, v)| v.vm == vm) {
            let ended = VmStateError::VcpuEnded { vm, vcpu: v.vcpu };
            if v.join.is_finished() {
                return Err(ended);
            }
            let index = v.vcpu;
            let (tx, rx) = std::sync::mpsc::channel();
            let job: Job = Box::new(move |vcpu, handler| {
                let _ = tx.send(vcpu_snapshot(vm, index, vcpu, handler));
            });
            {
                let mut st = self.hold.state();
                st.jobs.push((slot, job));
                self.hold.cond.notify_all();
            }
            // A held vCPU takes its job at once; one that went away drops
            // it (and the sender with it).
            vcpus.push(rx.recv_timeout(JOB_TIMEOUT).map_err(|_| ended)??);
        }
        let vmk = &self.vms[at];
        let kerr = |source| VmStateError::Kvm { vm, source };
        let machine = vmk.save_machine().map_err(kerr)?;
        let memory = if memory {
            let mut m = vec![0u8; vmk.mem_size()];
            vmk.read_memory(0, &mut m).map_err(kerr)?;
            m
        } else {
            Vec::new()
        };
        Ok(VmSnapshot {
            vm,
            hypervisor: self.ids[at].1,
            machine,
            vcpus,
            memory,
        })
    }
}
