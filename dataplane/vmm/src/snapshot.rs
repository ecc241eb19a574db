//! A whole VM's snapshot and its versioned file: guest memory, every
//! vCPU's KVM state ([`VcpuState`]), the in-kernel PIC, IOAPIC, PIT and
//! KVM clock ([`MachineState`]), the local device models' own versioned
//! snapshots, and each vCPU's last request sequence number (so that the
//! restored VM continues the sequence and the servers' duplicate windows
//! stay right). Remote models are not in it: they stay on their servers.
//!
//! File layout, every integer little-endian, every variable-length piece
//! preceded by its `u32` length:
//!
//! ```text
//! "DPVMSNAP"  u32 version (1)  u32 vm  u32 hypervisor  u32 vcpus
//! machine:  pic master, pic slave, ioapic  u8 has-pit [pit]  clock
//! per vCPU: u16 index  u64 seq  regs sregs xsave xcrs lapic events
//!           mp-state debugregs  u32 msrs (u32 index, u64 value)...
//!           u32 devices (u8 space, u64 base, u32 model, kind,
//!           u32 version, data)...
//! u64 memory length, memory
//! u32 CRC-32 of everything before it
//! ```
//!
//! Decoding checks every length against what is left and against limits
//! before it allocates, so a bad or truncated file is an error naming what
//! is wrong, never a panic.

use std::io::Write;
use std::path::Path;

use devplane_devmodels::{Snapshot, Space};

use crate::kvm::{MachineState, StateBytes, VcpuState};

/// The file's first bytes.
pub const MAGIC: &[u8; 8] = b"DPVMSNAP";

/// The layout version this build writes and reads.
pub const VERSION: u32 = 1;

/// Most vCPUs a snapshot may hold (KVM's vCPU ids here are a `u8`).
const MAX_VCPUS: u32 = 256;
/// Most MSRs per vCPU.
const MAX_MSRS: u32 = 4096;
/// Most local devices per vCPU.
const MAX_DEVICES: u32 = 4096;

/// One local device model's state, as its vCPU's bus holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSnapshot {
    /// Port or MMIO.
    pub space: Space,
    /// First address of its range.
    pub base: u64,
    /// Device-model id.
    pub model: u32,
    /// The model's own versioned snapshot.
    pub snap: Snapshot,
}

/// One vCPU.
pub struct VcpuSnapshot {
    /// vCPU index.
    pub index: u16,
    /// The sequence number of its last remote request.
    pub seq: u64,
    /// Its KVM state.
    pub state: VcpuState,
    /// The local models on its bus.
    pub devices: Vec<DeviceSnapshot>,
}

impl VcpuSnapshot {
    /// A copy (KVM's structures are plain bytes but not `Clone`).
    pub fn clone_state(&self) -> VcpuSnapshot {
        let s = &self.state;
        VcpuSnapshot {
            index: self.index,
            seq: self.seq,
            state: VcpuState {
                regs: s.regs,
                sregs: s.sregs,
                xsave: StateBytes::from_bytes(&s.xsave.to_bytes()).expect("same size"),
                xcrs: s.xcrs,
                lapic: StateBytes::from_bytes(&s.lapic.to_bytes()).expect("same size"),
                events: s.events,
                mp_state: s.mp_state,
                debugregs: s.debugregs,
                msrs: s.msrs.clone(),
            },
            devices: self.devices.clone(),
        }
    }
}

/// A whole VM.
pub struct VmSnapshot {
    /// VM id.
    pub vm: u32,
    /// Hypervisor id.
    pub hypervisor: u32,
    /// In-kernel devices and clock.
    pub machine: MachineState,
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuSnapshot>,
    /// Guest memory, from GPA 0.
    pub memory: Vec<u8>,
}

/// Why a snapshot file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotFileError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// Not a VM snapshot.
    #[error("not a devplane VM snapshot (it does not start with {:?})", "DPVMSNAP")]
    Magic,
    /// A layout this build does not read.
    #[error("VM snapshot version {0} is not supported (this build reads version {VERSION})")]
    Version(u32),
    /// The file ends early.
    #[error("the snapshot is truncated: it ends inside {0}")]
    Truncated(&'static str),
    /// A field is out of range or the wrong size.
    #[error("the snapshot is corrupt: {0}")]
    Corrupt(String),
    /// The checksum does not match.
    #[error("the snapshot is corrupt: its checksum does not match its contents")]
    Checksum,
}

/// Builds the bytes of a snapshot file.
struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.out.extend_from_slice(b);
    }
    fn state<T: StateBytes>(&mut self, v: &T) {
        self.blob(&v.to_bytes());
    }
}

/// Reads a snapshot file's bytes, every length checked.
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SnapshotFileError> {
        if self.data.len() < n {
            return Err(SnapshotFileError::Truncated(what));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], SnapshotFileError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, SnapshotFileError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, SnapshotFileError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, SnapshotFileError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, SnapshotFileError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn blob(&mut self, what: &'static str) -> Result<&'a [u8], SnapshotFileError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    fn state<T: StateBytes>(&mut self, what: &'static str) -> Result<T, SnapshotFileError> {
        let b = self.blob(what)?;
        T::from_bytes(b).ok_or_else(|| {
            SnapshotFileError::Corrupt(format!(
                "{what} is {} bytes, not the {} KVM's structure has",
                b.len(),
                std::mem::size_of::<T>()
            ))
        })
    }
    fn count(&mut self, what: &'static str, max: u32) -> Result<usize, SnapshotFileError> {
        let n = self.u32(what)?;
        if n > max {
            return Err(SnapshotFileError::Corrupt(format!(
                "{n} {what} (at most {max})"
            )));
        }
        Ok(n as usize)
    }
}

impl std::fmt::Debug for VmSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmSnapshot")
            .field("vm", &self.vm)
            .field("hypervisor", &self.hypervisor)
            .field("vcpus", &self.vcpus.len())
            .field("memory", &self.memory.len())
            .finish()
    }
}

impl VmSnapshot {
    /// The snapshot's file bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer {
            out: Vec::with_capacity(self.memory.len() + 64 * 1024),
        };
        w.out.extend_from_slice(MAGIC);
        w.u32(VERSION);
        w.u32(self.vm);
        w.u32(self.hypervisor);
        w.u32(self.vcpus.len() as u32);
        let m = &self.machine;
        w.state(&m.pic_master);
        w.state(&m.pic_slave);
        w.state(&m.ioapic);
        match &m.pit {
            Some(p) => {
                w.u8(1);
                w.state(p);
            }
            None => w.u8(0),
        }
        w.state(&m.clock);
        for v in &self.vcpus {
            w.u16(v.index);
            w.u64(v.seq);
            let s = &v.state;
            w.state(&s.regs);
            w.state(&s.sregs);
            w.state(&s.xsave);
            w.state(&s.xcrs);
            w.state(&s.lapic);
            w.state(&s.events);
            w.state(&s.mp_state);
            w.state(&s.debugregs);
            w.u32(s.msrs.len() as u32);
            for &(index, value) in &s.msrs {
                w.u32(index);
                w.u64(value);
            }
            w.u32(v.devices.len() as u32);
            for d in &v.devices {
                w.u8(match d.space {
                    Space::Pio => 0,
                    Space::Mmio => 1,
                });
                w.u64(d.base);
                w.u32(d.model);
                w.blob(d.snap.kind.as_bytes());
                w.u32(d.snap.version);
                w.blob(&d.snap.data);
            }
        }
        w.u64(self.memory.len() as u64);
        w.out.extend_from_slice(&self.memory);
        let crc = crc32fast::hash(&w.out);
        w.u32(crc);
        w.out
    }

    /// Decodes a snapshot file's bytes.
    pub fn decode(data: &[u8]) -> Result<VmSnapshot, SnapshotFileError> {
        let mut r = Reader { data };
        if r.take(MAGIC.len(), "the header").ok() != Some(&MAGIC[..]) {
            return Err(SnapshotFileError::Magic);
        }
        let version = r.u32("the header")?;
        if version != VERSION {
            return Err(SnapshotFileError::Version(version));
        }
        let vm = r.u32("the header")?;
        let hypervisor = r.u32("the header")?;
        let nvcpus = r.count("vCPUs", MAX_VCPUS)?;
        let machine = MachineState {
            pic_master: r.state("the master PIC")?,
            pic_slave: r.state("the slave PIC")?,
            ioapic: r.state("the IOAPIC")?,
            pit: match r.u8("the PIT")? {
                0 => None,
                1 => Some(r.state("the PIT")?),
                n => return Err(SnapshotFileError::Corrupt(format!("PIT flag {n}"))),
            },
            clock: r.state("the KVM clock")?,
        };
        let mut vcpus = Vec::with_capacity(nvcpus);
        for _ in 0..nvcpus {
            vcpus.push(read_vcpu(&mut r)?);
        }
        let len = r.u64("the guest memory")?;
        let len = usize::try_from(len)
            .map_err(|_| SnapshotFileError::Corrupt(format!("{len} bytes of memory")))?;
        let memory = r.take(len, "the guest memory")?.to_vec();
        let body = data.len() - r.data.len();
        let crc = r.u32("the checksum")?;
        if !r.data.is_empty() {
            return Err(SnapshotFileError::Corrupt(format!(
                "{} bytes after the checksum",
                r.data.len()
            )));
        }
        if crc32fast::hash(&data[..body]) != crc {
            return Err(SnapshotFileError::Checksum);
        }
        Ok(VmSnapshot {
            vm,
            hypervisor,
            machine,
            vcpus,
            memory,
        })
    }

    /// Writes the snapshot to `path`: to a temporary file beside it, synced,
    /// then renamed over it, so that `path` is never half-written.
    pub fn write_file(&self, path: &Path) -> Result<(), SnapshotFileError> {
        let io = |source| SnapshotFileError::Io {
            path: path.display().to_string(),
            source,
        };
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&self.encode())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(io)
    }

    /// Reads and decodes the snapshot file at `path`.
    pub fn read_file(path: &Path) -> Result<VmSnapshot, SnapshotFileError> {
        let data = std::fs::read(path).map_err(|source| SnapshotFileError::Io {
            path: path.display().to_string(),
            source,
        })?;
        VmSnapshot::decode(&data)
    }
}

fn read_vcpu(r: &mut Reader<'_>) -> Result<VcpuSnapshot, SnapshotFileError> {
    let index = r.u16("a vCPU")?;
    let seq = r.u64("a vCPU")?;
    let mut state = VcpuState {
        regs: r.state("a vCPU's registers")?,
        sregs: r.state("a vCPU's special registers")?,
        xsave: r.state("a vCPU's XSAVE area")?,
        xcrs: r.state("a vCPU's XCRs")?,
        lapic: r.state("a vCPU's LAPIC")?,
        events: r.state("a vCPU's events")?,
        mp_state: r.state("a vCPU's MP state")?,
        debugregs: r.state("a vCPU's debug registers")?,
        msrs: Vec::new(),
    };
    let nmsrs = r.count("MSRs", MAX_MSRS)?;
    for _ in 0..nmsrs {
        state.msrs.push((r.u32("an MSR")?, r.u64("an MSR")?));
    }
    let ndev = r.count("local devices", MAX_DEVICES)?;
    let mut devices = Vec::with_capacity(ndev);
    for _ in 0..ndev {
        let space = match r.u8("a local device")? {
            0 => Space::Pio,
            1 => Space::Mmio,
            n => return Err(SnapshotFileError::Corrupt(format!("address space {n}"))),
        };
        let base = r.u64("a local device")?;
        let model = r.u32("a local device")?;
        let kind = std::str::from_utf8(r.blob("a local device's kind")?)
            .map_err(|_| SnapshotFileError::Corrupt("a model kind is not UTF-8".into()))?
            .to_string();
        let version = r.u32("a local device")?;
        let data = r.blob("a local device's state")?.to_vec();
        devices.push(DeviceSnapshot {
            space,
            base,
            model,
            snap: Snapshot {
                kind,
                version,
                data,
            },
        });
    }
    Ok(VcpuSnapshot {
        index,
        seq,
        state,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_IRQCHIP_PIC_SLAVE, kvm_irqchip};

    fn sample() -> VmSnapshot {
        let mut state = VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            lapic: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            debugregs: Default::default(),
            msrs: vec![(0x10, 12345), (0xc000_0080, 0x500)],
        };
        state.regs.rip = 0x1234;
        state.regs.rax = 77;
        VmSnapshot {
            vm: 3,
            hypervisor: 2,
            machine: MachineState {
                pic_master: Default::default(),
                pic_slave: kvm_irqchip {
                    chip_id: KVM_IRQCHIP_PIC_SLAVE,
                    ..Default::default()
                },
                ioapic: Default::default(),
                pit: None,
                clock: Default::default(),
            },
            vcpus: vec![VcpuSnapshot {
                index: 0,
                seq: 99,
                state,
                devices: vec![DeviceSnapshot {
                    space: Space::Pio,
                    base: 0x500,
                    model: 9,
                    snap: Snapshot {
                        kind: "counter".into(),
                        version: 1,
                        data: vec![1, 2, 3],
                    },
                }],
            }],
            memory: (0..8192u32).map(|i| i as u8).collect(),
        }
    }

    #[test]
    fn a_snapshot_round_trips_through_its_bytes() {
        let bytes = sample().encode();
        let back = VmSnapshot::decode(&bytes).unwrap();
        assert_eq!((back.vm, back.hypervisor), (3, 2));
        assert_eq!(back.machine.pic_slave.chip_id, KVM_IRQCHIP_PIC_SLAVE);
        assert!(back.machine.pit.is_none());
        let v = &back.vcpus[0];
        assert_eq!((v.index, v.seq), (0, 99));
        assert_eq!((v.state.regs.rip, v.state.regs.rax), (0x1234, 77));
        assert_eq!(v.state.msrs, [(0x10, 12345), (0xc000_0080, 0x500)]);
        assert_eq!(v.devices, sample().vcpus[0].devices);
        assert_eq!(back.memory, sample().memory);
        assert_eq!(back.encode(), bytes);
    }

    #[test]
    fn bad_or_truncated_files_are_errors() {
        let bytes = sample().encode();
        // Every truncation is an error, never a panic.
        for len in 0..bytes.len() {
            assert!(VmSnapshot::decode(&bytes[..len]).is_err(), "{len} bytes");
        }
        let e = VmSnapshot::decode(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(matches!(e, SnapshotFileError::Truncated(_)), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = VmSnapshot::decode(b"not a snapshot at all").unwrap_err();
        assert!(matches!(e, SnapshotFileError::Magic), "{e}");
        let mut v2 = bytes.clone();
        v2[8] = 2;
        let e = VmSnapshot::decode(&v2).unwrap_err();
        assert_eq!(
            e.to_string(),
            "VM snapshot version 2 is not supported (this build reads version 1)"
        );
        // A flipped byte in guest memory: the checksum says so.
        let mut flipped = bytes.clone();
        let at = bytes.len() - 100;
        flipped[at] ^= 0xff;
        assert!(matches!(
            VmSnapshot::decode(&flipped).unwrap_err(),
            SnapshotFileError::Checksum
        ));
        // A huge vCPU count is refused before anything is allocated.
        let mut many = bytes.clone();
        many[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        let e = VmSnapshot::decode(&many).unwrap_err();
        assert!(e.to_string().contains("vCPUs (at most 256)"), "{e}");
        // A blob whose length is not its structure's.
        let mut short = bytes.clone();
        let len = u32::from_le_bytes(short[24..28].try_into().unwrap());
        short[24..28].copy_from_slice(&(len - 1).to_le_bytes());
        let e = VmSnapshot::decode(&short).unwrap_err();
        assert!(e.to_string().contains("the master PIC is"), "{e}");
        let mut trailing = bytes;
        trailing.push(0);
        assert!(VmSnapshot::decode(&trailing).is_err());
    }
}
