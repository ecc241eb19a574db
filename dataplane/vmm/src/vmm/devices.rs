//! A VM's devices, built from its [`DeviceSpec`]s: one [`Bus`] per vCPU
//! (see [`crate::bus`]), the VM's remote-model table, and the PCI host
//! bridge that lists its virtio devices.

use devplane_devmodels::registry::{self, ModelParams};
use devplane_devmodels::uart::{self, Uart};
use devplane_devmodels::{DeviceModel, Space};

use super::{ClientError, ClientSpec, DeviceSpec, DiskPlace, Place, VmSpec};
use crate::boot::{Console, ConsoleUart};
use crate::bus::{
    self, Bus, BusDevice, DiskAt, LocalModel, STORE_WINDOW, VirtioBlkDevice, per_vcpu,
};
use crate::devmap::{DeviceMap, Mapping};
use crate::engine::{LiveKeys, RemoteModel};
use crate::kvm::{IrqLine, Vm};
use crate::pci::{self, PciFunction, PciHost};
use crate::virtio::blk::{BAR_SIZE, VirtioBlk};
use crate::virtio::bulk::{BulkConfig, BulkIds};

/// A mapped range with one bus device per vCPU.
type Slot = Mapping<Vec<Box<dyn BusDevice>>>;

/// What [`VmDevices::build`] makes of a VM's device specs.
pub(super) struct VmDevices {
    /// One bus per vCPU, in vCPU order.
    pub(super) buses: Vec<Bus>,
    /// The VM's remote-model table (a [`bus::RemoteModel`]'s index points
    /// into it).
    pub(super) remotes: Vec<RemoteModel>,
    /// Its remote disks' counters.
    pub(super) disks: Vec<RemoteDisk>,
}

/// A virtio-blk device's remote disk, for the VM's status.
pub(super) struct RemoteDisk {
    /// The virtio-blk device's model id.
    pub(super) model: u32,
    /// The server's `blockstore` model.
    pub(super) store: u32,
    /// The bulk disk's counters.
    pub(super) stats: std::sync::Arc<crate::virtio::bulk::BulkStats>,
}

/// Builds the devices of one VM.
struct Builder<'a> {
    spec: &'a ClientSpec,
    vs: &'a VmSpec,
    vm: &'a Vm,
    console: Option<&'a Console>,
    keys: &'a LiveKeys,
    slots: Vec<Slot>,
    remotes: Vec<RemoteModel>,
    pci: Vec<PciFunction>,
    disks: Vec<RemoteDisk>,
}

impl VmDevices {
    /// The devices of `vs`, running in `vm`; `console` is the Linux boot's
    /// console, which a local `uart` feeds; `keys` the engine's tag keys,
    /// which its bulk disks follow through rotations.
    pub(super) fn build(
        spec: &ClientSpec,
        vs: &VmSpec,
        vm: &Vm,
        console: Option<&Console>,
        keys: &LiveKeys,
    ) -> Result<VmDevices, ClientError> {
        let mut b = Builder {
            spec,
            vs,
            vm,
            console,
            keys,
            slots: Vec::new(),
            remotes: Vec::new(),
            pci: Vec::new(),
            disks: Vec::new(),
        };
        for d in &vs.devices {
            if d.space == Space::Pio
                && let Some(why) = crate::kvm::in_kernel_ports_overlap(d.base, d.len)
            {
                return Err(ClientError::Config { vm: vs.id, why });
            }
            let devices = b.device(d)?;
            b.slot(d.space, d.base, d.len, d.model, d.posted, devices);
        }
        b.pci_host();
        let buses = buses(b.slots, vs.vcpus.len())
            .map_err(|source| ClientError::DevMap { vm: vs.id, source })?;
        Ok(VmDevices {
            buses,
            remotes: b.remotes,
            disks: b.disks,
        })
    }
}

/// One bus per vCPU from `slots`, each range checked once (no empty,
/// wrapping or overlapping range).
fn buses(slots: Vec<Slot>, vcpus: usize) -> Result<Vec<Bus>, crate::devmap::DevMapError> {
    let slots = DeviceMap::new(slots)?.into_entries();
    let mut columns: Vec<Vec<Mapping<Box<dyn BusDevice>>>> = (0..vcpus)
        .map(|_| Vec::with_capacity(slots.len()))
        .collect();
    for s in slots {
        for (column, device) in columns.iter_mut().zip(s.device) {
            column.push(Mapping {
                space: s.space,
                base: s.base,
                len: s.len,
                model: s.model,
                posted: s.posted,
                device,
            });
        }
    }
    columns.into_iter().map(DeviceMap::new).collect()
}

impl Builder<'_> {
    fn config(&self, why: String) -> ClientError {
        ClientError::Config {
            vm: self.vs.id,
            why,
        }
    }

    fn vcpus(&self) -> usize {
        self.vs.vcpus.len()
    }

    fn slot(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        model: u32,
        posted: bool,
        device: Vec<Box<dyn BusDevice>>,
    ) {
        self.slots.push(Mapping {
            space,
            base,
            len,
            model,
            posted,
            device,
        });
    }

    /// The bus devices (one per vCPU) of one device spec.
    fn device(&mut self, d: &DeviceSpec) -> Result<Vec<Box<dyn BusDevice>>, ClientError> {
        match &d.place {
            Place::Local { kind } => {
                let model = local_model(kind, self.console)
                    .map_err(|e| self.config(format!("model {}: {e}", d.model)))?;
                Ok(per_vcpu(LocalModel(model), self.vcpus()))
            }
            Place::Remote { server } => {
                let index = self.remote_index(d.model, *server)?;
                Ok(per_vcpu_remote(index, self.vcpus()))
            }
            Place::VirtioBlk { irq, disk } => {
                let dev = self.virtio_blk(d, *irq, disk)?;
                Ok(per_vcpu(dev, self.vcpus()))
            }
        }
    }

    /// The remote-model table index of (`model`, server #`server`), added
    /// once.
    fn remote_index(&mut self, model: u32, server: usize) -> Result<u32, ClientError> {
        let s = self
            .spec
            .servers
            .get(server)
            .ok_or_else(|| self.config(format!("model {model}: no server #{server}")))?;
        if let Some(i) = self.remotes.iter().position(|r| r.model == model) {
            return Ok(i as u32);
        }
        self.remotes.push(RemoteModel {
            model,
            server: s.id,
            socket: server,
        });
        Ok((self.remotes.len() - 1) as u32)
    }

    /// A virtio block device at `d`'s port range, listed on the PCI host
    /// bridge, its disk at `disk`.
    fn virtio_blk(
        &mut self,
        d: &DeviceSpec,
        irq: u8,
        disk: &DiskPlace,
    ) -> Result<VirtioBlkDevice, ClientError> {
        if let Some(why) = crate::virtio::blk::bar_problem(d.space, d.base, d.len) {
            return Err(self.config(format!("virtio-blk {}: {why}", d.model)));
        }
        if self.pci.len() >= crate::virtio::blk::MAX_DEVICES {
            return Err(self.config(format!(
                "virtio-blk {}: more than {} virtio-blk devices",
                d.model,
                crate::virtio::blk::MAX_DEVICES
            )));
        }
        let disk_at = self.disk(d.model, disk)?;
        let mut dev = VirtioBlk::new(
            Box::new(self.vm.mem_handle()),
            IrqLine::new(Box::new(self.vm.irq_handle()), u32::from(irq)),
        );
        if let DiskPlace::Remote { server, model, .. } = disk {
            // The data path: block requests in bulk, many in flight. The
            // register window stays mapped for the capacity.
            let s = self.spec.servers.get(*server).ok_or_else(|| {
                self.config(format!("virtio-blk {}: no server #{server}", d.model))
            })?;
            let cfg = BulkConfig {
                server: s.addr,
                bind: self.spec.bind,
                ids: BulkIds {
                    client: self.spec.client,
                    server: s.id,
                    model: *model,
                    vm: self.vs.id,
                    hypervisor: self.vs.hypervisor,
                },
                keys: self.spec.engine.tag_keys.clone(),
                live_keys: Some(self.keys.clone()),
                give_up: self
                    .spec
                    .engine
                    .horizon
                    .max(std::time::Duration::from_secs(10)),
                spin: std::time::Duration::from_micros(200),
                loss: self.spec.engine.loss,
            };
            dev = dev
                .with_bulk(
                    cfg,
                    Box::new(self.vm.mem_handle()),
                    IrqLine::new(Box::new(self.vm.irq_handle()), u32::from(irq)),
                )
                .map_err(|e| {
                    self.config(format!("virtio-blk {}: bulk disk socket: {e}", d.model))
                })?;
            if let Some(stats) = dev.bulk_stats_handle() {
                self.disks.push(RemoteDisk {
                    model: d.model,
                    store: *model,
                    stats,
                });
            }
        }
        self.pci.push(PciFunction::virtio_blk(
            self.pci.len() as u8 + 1,
            d.base as u16,
            BAR_SIZE as u16,
            irq,
        ));
        Ok(VirtioBlkDevice { dev, disk: disk_at })
    }

    /// A virtio block device's disk: a local `blockstore` on its image, or
    /// a remote one, mapped (posted writes) in the VM's bus too.
    fn disk(&mut self, dev_model: u32, disk: &DiskPlace) -> Result<DiskAt, ClientError> {
        match disk {
            DiskPlace::Local { backing } => {
                let params = ModelParams {
                    backing: Some(backing.clone()),
                    ..Default::default()
                };
                registry::build("blockstore", params)
                    .map(DiskAt::Local)
                    .map_err(|e| self.config(format!("virtio-blk {dev_model}: {e}")))
            }
            DiskPlace::Remote { server, model, gpa } => {
                let index = self.remote_index(*model, *server)?;
                let devices = per_vcpu_remote(index, self.vcpus());
                self.slot(Space::Mmio, *gpa, STORE_WINDOW, *model, true, devices);
                Ok(DiskAt::Remote { base: *gpa, index })
            }
        }
    }

    /// The PCI host bridge at `0xCF8`, if the VM has virtio devices.
    fn pci_host(&mut self) {
        if self.pci.is_empty() {
            return;
        }
        let host = PciHost::new(std::mem::take(&mut self.pci));
        let devices = per_vcpu(LocalModel(Box::new(host)), self.vcpus());
        let base = u64::from(pci::CONFIG_ADDRESS_PORT);
        self.slot(Space::Pio, base, pci::PORTS, 0, false, devices);
    }
}

/// A remote model's bus device for each of `vcpus` vCPUs (it holds only
/// its table index: nothing to share).
fn per_vcpu_remote(index: u32, vcpus: usize) -> Vec<Box<dyn BusDevice>> {
    (0..vcpus)
        .map(|_| Box::new(bus::RemoteModel { index }) as Box<dyn BusDevice>)
        .collect()
}

/// Builds a local model of `kind` (`KIND@LINE`: raising interrupt line
/// `LINE`). For a VM booting Linux, a `uart` feeds that boot's console.
fn local_model(
    kind: &str,
    console: Option<&Console>,
) -> Result<Box<dyn DeviceModel>, registry::BuildError> {
    let (kind, line) = match kind.split_once('@') {
        Some((k, l)) => match l.parse::<u32>() {
            Ok(l) => (k, Some(l)),
            Err(_) => return Err(registry::BuildError::UnknownKind(kind.to_string())),
        },
        None => (kind, None),
    };
    match (kind, console) {
        (uart::KIND, Some(c)) => Ok(Box::new(ConsoleUart::new(
            Uart::new(line.unwrap_or(uart::DEFAULT_LINE)),
            c.clone(),
        ))),
        _ => registry::build(
            kind,
            ModelParams {
                line,
                ..ModelParams::default()
            },
        ),
    }
}

#[cfg(test)]
mod tests {
    use devplane_wire::AccessSize;

    use super::*;
    use crate::bus::At;
    use crate::devmap::DevMapError;
    use crate::vcpu_io::VcpuIo;

    /// A device that names itself by its vCPU; never accessed here.
    struct Tag(usize);

    impl BusDevice for Tag {
        fn read(&mut self, _: &mut VcpuIo, _: At, _: AccessSize) -> u64 {
            unreachable!()
        }
        fn write(&mut self, _: &mut VcpuIo, _: At, _: AccessSize, _: u64) {
            unreachable!()
        }
    }

    fn slot(space: Space, base: u64, len: u64, model: u32, vcpus: usize) -> Slot {
        Mapping {
            space,
            base,
            len,
            model,
            posted: model % 2 == 1,
            device: (0..vcpus)
                .map(|i| Box::new(Tag(i)) as Box<dyn BusDevice>)
                .collect(),
        }
    }

    #[test]
    fn every_vcpu_gets_every_range_with_its_own_device() {
        let slots = vec![
            slot(Space::Mmio, 0xd000, 0x1000, 2, 3),
            slot(Space::Pio, 0x3f8, 8, 1, 3),
        ];
        let buses = buses(slots, 3).unwrap();
        assert_eq!(buses.len(), 3);
        for bus in &buses {
            let ranges: Vec<_> = bus
                .entries()
                .iter()
                .map(|m| (m.space, m.base, m.len, m.model, m.posted))
                .collect();
            assert_eq!(
                ranges,
                vec![
                    (Space::Pio, 0x3f8, 8, 1, true),
                    (Space::Mmio, 0xd000, 0x1000, 2, false)
                ]
            );
        }
        // vCPU i's bus holds the i-th device of each slot.
        for (i, bus) in buses.iter().enumerate() {
            for m in bus.entries() {
                let tag = &*m.device as *const dyn BusDevice as *const Tag;
                // SAFETY: every device in these buses is a `Tag`.
                assert_eq!(unsafe { (*tag).0 }, i);
            }
        }
    }

    #[test]
    fn overlaps_are_refused_even_without_vcpus() {
        for vcpus in [0, 2] {
            let slots = vec![
                slot(Space::Pio, 0x10, 8, 1, vcpus),
                slot(Space::Pio, 0x17, 1, 2, vcpus),
            ];
            assert!(matches!(
                buses(slots, vcpus),
                Err(DevMapError::Overlap {
                    model: 2,
                    other: 1,
                    ..
                })
            ));
        }
    }

    #[test]
    fn a_local_kind_may_name_its_interrupt_line() {
        use devplane_devmodels::counter::REG_IRQ;
        let mut m = local_model("counter@5", None).unwrap();
        m.write(Space::Pio, REG_IRQ, AccessSize::B1, 1).unwrap();
        assert_eq!(m.take_irq().map(|e| e.line), Some(5));
        let mut m = local_model("counter", None).unwrap();
        m.write(Space::Pio, REG_IRQ, AccessSize::B1, 1).unwrap();
        assert_eq!(m.take_irq().map(|e| e.line), Some(0));
        assert!(local_model("counter@x", None).is_err());
        assert!(local_model("nosuch@5", None).is_err());
    }
}
