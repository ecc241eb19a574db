//! The XDP steering program: the object built from `ebpf/`, embedded in this
//! crate, and typed access to its maps.

use aya::maps::{Array, HashMap, MapData, PerCpuArray, XskMap};
use aya::{Ebpf, EbpfLoader};
use devplane_wire::maps::{
    CLIENTS_MAP, CONFIG_MAP, COUNTER_COUNT, ClientEntry, Config, Counter, QUEUE_STATS_MAP,
    ROUTES_MAP, Route, STATS_MAP, VMS_MAP, VmEntry, XDP_PROGRAM, XSKS_MAP,
};
use std::path::Path;

/// The program object, as built by `build.rs`.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/devplane-xdp"));

/// Errors loading the program or using its maps.
#[derive(Debug, thiserror::Error)]
pub enum XdpError {
    /// The kernel refused the object (verifier, permissions, ...).
    #[error("loading the XDP object failed: {0}")]
    Load(#[from] aya::EbpfError),
    /// The program failed to load or attach.
    #[error("XDP program {XDP_PROGRAM}: {0}")]
    Program(#[from] aya::programs::ProgramError),
    /// A map operation failed.
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    /// Pinning a map failed.
    #[error("pinning a map: {0}")]
    Pin(String),
    /// The object lacks a map or program it should have.
    #[error("the XDP object has no {0}: it was built from another version of ebpf/")]
    Missing(&'static str),
}

/// A loaded (not necessarily attached) instance of the steering program.
pub struct Program {
    ebpf: Ebpf,
}

impl Program {
    /// Loads the embedded object and the program into the kernel; maps are
    /// pinned under `pin_dir` (which must be on bpffs) if given.
    pub fn load(pin_dir: Option<&Path>) -> Result<Program, XdpError> {
        let mut loader = EbpfLoader::new();
        if let Some(dir) = pin_dir {
            loader.default_map_pin_directory(dir);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let prog: &mut aya::programs::Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(XdpError::Missing("program devplane_xdp"))?
            .try_into()?;
        prog.load()?;
        Ok(Program { ebpf })
    }

    /// The program, for attaching or test runs.
    pub fn xdp(&mut self) -> Result<&mut aya::programs::Xdp, XdpError> {
        Ok(self
            .ebpf
            .program_mut(XDP_PROGRAM)
            .ok_or(XdpError::Missing("program devplane_xdp"))?
            .try_into()?)
    }

    /// Writes the config entry.
    pub fn set_config(&mut self, cfg: Config) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(CONFIG_MAP)
            .ok_or(XdpError::Missing(CONFIG_MAP))?;
        let mut arr: Array<&mut MapData, Config> = Array::try_from(map)?;
        arr.set(0, cfg, 0)?;
        Ok(())
    }

    /// The routing map.
    pub fn routes(&mut self) -> Result<HashMap<&mut MapData, u32, Route>, XdpError> {
        let map = self
            .ebpf
            .map_mut(ROUTES_MAP)
            .ok_or(XdpError::Missing(ROUTES_MAP))?;
        Ok(HashMap::try_from(map)?)
    }

    /// The clients map.
    pub fn clients(&mut self) -> Result<HashMap<&mut MapData, u32, ClientEntry>, XdpError> {
        let map = self
            .ebpf
            .map_mut(CLIENTS_MAP)
            .ok_or(XdpError::Missing(CLIENTS_MAP))?;
        Ok(HashMap::try_from(map)?)
    }

    /// The VMs map.
    pub fn vms(&mut self) -> Result<HashMap<&mut MapData, u32, VmEntry>, XdpError> {
        let map = self
            .ebpf
            .map_mut(VMS_MAP)
            .ok_or(XdpError::Missing(VMS_MAP))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Puts an AF_XDP socket in the socket map at `index`
    /// ([`devplane_wire::maps::xsk_index`] of its queue and worker).
    pub fn set_xsk(&mut self, index: u32, fd: std::os::fd::RawFd) -> Result<(), XdpError> {
        let map = self
            .ebpf
            .map_mut(XSKS_MAP)
            .ok_or(XdpError::Missing(XSKS_MAP))?;
        let mut xsks: XskMap<&mut MapData> = XskMap::try_from(map)?;
        xsks.set(index, fd, 0)?;
        Ok(())
    }

    /// Pins map `name` at `path` (on bpffs).
    pub fn pin_map(&self, name: &'static str, path: &Path) -> Result<(), XdpError> {
        let map = self.ebpf.map(name).ok_or(XdpError::Missing(name))?;
        map.pin(path).map_err(|e| XdpError::Pin(e.to_string()))?;
        Ok(())
    }

    /// Moves the routing, clients, VMs and config maps out of the program
    /// into the control plane's writer (pin them first if they are to be
    /// pinned). The program keeps the stats and socket maps.
    pub fn take_control_maps(&mut self) -> Result<devplane_control::AyaMaps, XdpError> {
        let mut take = |name: &'static str| self.ebpf.take_map(name).ok_or(XdpError::Missing(name));
        let routes = HashMap::try_from(take(ROUTES_MAP)?)?;
        let clients = HashMap::try_from(take(CLIENTS_MAP)?)?;
        let vms = HashMap::try_from(take(VMS_MAP)?)?;
        let config = Array::try_from(take(CONFIG_MAP)?)?;
        Ok(devplane_control::AyaMaps::from_maps(
            routes, clients, vms, config,
        ))
    }

    /// The counters, summed over CPUs, indexed by [`Counter`].
    pub fn stats(&self) -> Result<Stats, XdpError> {
        let map = self
            .ebpf
            .map(STATS_MAP)
            .ok_or(XdpError::Missing(STATS_MAP))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        let mut s = Stats::default();
        for (i, slot) in s.0.iter_mut().enumerate() {
            *slot = arr.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(s)
    }

    /// Requests redirected from each of the first `queues` device RX
    /// queues, summed over CPUs.
    pub fn queue_stats(&self, queues: u32) -> Result<Vec<u64>, XdpError> {
        let map = self
            .ebpf
            .map(QUEUE_STATS_MAP)
            .ok_or(XdpError::Missing(QUEUE_STATS_MAP))?;
        let arr: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map)?;
        (0..queues.min(devplane_wire::maps::MAX_QUEUES))
            .map(|q| Ok(arr.get(&q, 0)?.iter().sum()))
            .collect()
    }

    /// The underlying aya object.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// A snapshot of the program's counters, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats(pub [u64; COUNTER_COUNT as usize]);

impl Stats {
    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.0[c as usize]
    }

    /// Counter-wise difference `self - earlier`.
    pub fn since(&self, earlier: &Stats) -> Stats {
        let mut d = Stats::default();
        for i in 0..self.0.len() {
            d.0[i] = self.0[i].wrapping_sub(earlier.0[i]);
        }
        d
    }

    /// The non-zero counters with their names.
    pub fn nonzero(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL
            .iter()
            .map(|&c| (c.name(), self.get(c)))
            .filter(|&(_, v)| v != 0)
    }
}
