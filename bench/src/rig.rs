//! Where the client-side scenarios (`client`, `irq`, `throughput`) run
//! their KVM guests, and the machinery they share.
//!
//! A [`Rig`] is either
//!
//! - embedded: the single-machine topology (client and server network
//!   namespaces joined by veth) with a devplane server behind the real XDP
//!   program in the server namespace, built for one run of a scenario and
//!   torn down after it; or
//! - remote (`--server ADDR`): a devplane server that is already running
//!   elsewhere, configured as `bench/server-remote.toml` says (the
//!   identifiers and models of [`server_config`] with [`REMOTE`]); nothing
//!   is built or loaded locally, and one rig serves the whole invocation.
//!
//! Both serve the same layout of identifiers and device models
//! ([`Layout`]). Each measurement runs its VMs under VM ids it has not
//! used before ([`Rig::fresh_vm`]): a server keeps a duplicate window of
//! answers per (VM, vCPU), and a new VMM numbers its requests from 1 again,
//! so a (VM, vCPU) pair the server has already served would be answered
//! from that window (stale) instead of reaching the model. Every run is
//! checked for such failed accesses ([`Rig::run_vms`]).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use devplane_control::config::{
    ClientConfig, Mode, ModelConfig, ServerConfig, ServerSection, Tuning, VmConfig,
};
use devplane_devmodels::Space;
use devplane_testkit::host::ServerThread;
use devplane_testkit::topology::{Side, Topology};
use devplane_vmm::engine::EngineConfig;
use devplane_vmm::guests::{self, Guest};
use devplane_vmm::kvm::VcpuExit;
use devplane_vmm::vmm::{Client, ClientSpec, DeviceSpec, Place, ServerSpec, VcpuSpec, VmSpec};
use devplane_wire::{Access, AccessSize};

use crate::hist::Latency;
use crate::server::{check_response, encode_for, request_for};
use crate::udp::round_trips;

mod layout;

pub use layout::*;
use layout::{null_read, on_pinned_socket};

enum Target {
    // Field order is drop order: the server stops before its namespaces
    // go.
    Embedded {
        srv: Option<ServerThread>,
        topo: Topology,
    },
    Remote {
        addr: SocketAddrV4,
    },
}

/// Where a client-side scenario runs; see the module documentation.
pub struct Rig {
    target: Target,
    layout: Layout,
    next_vm: Cell<u32>,
    next_irq: Cell<u32>,
    warnings: RefCell<Vec<String>>,
    /// The tag keys guests' engines seal with ([`Rig::set_tags`]).
    tag_keys: Option<devplane_wire::tag::KeyRing>,
}

impl Rig {
    /// The embedded topology (namespaces tagged `tag`), without its server
    /// yet: measure the UDP floor first ([`Rig::net_floor`]), whose echo
    /// thread shares the worker's core, then [`Rig::serve`].
    pub fn embedded(tag: &str) -> Result<Rig> {
        let topo = Topology::new(tag).context("building the netns topology (needs root)")?;
        Ok(Rig::new(Target::Embedded { srv: None, topo }, EMBEDDED))
    }

    /// A devplane server already running at `addr` with the layout of
    /// `bench/server-remote.toml`.
    pub fn remote(addr: SocketAddrV4) -> Rig {
        Rig::new(Target::Remote { addr }, REMOTE)
    }

    fn new(target: Target, layout: Layout) -> Rig {
        Rig {
            tag_keys: None,
            target,
            layout,
            next_vm: Cell::new(layout.irq_slots + 1),
            next_irq: Cell::new(1),
            warnings: RefCell::new(Vec::new()),
        }
    }

    /// The remote server's address, if remote.
    pub fn remote_addr(&self) -> Option<SocketAddrV4> {
        match &self.target {
            Target::Remote { addr } => Some(*addr),
            Target::Embedded { .. } => None,
        }
    }

    /// `embedded` or the remote server's address, for rows' knobs.
    pub fn server_name(&self) -> String {
        self.remote_addr()
            .map_or_else(|| "embedded".to_string(), |a| a.to_string())
    }

    /// Starts the embedded server (XDP, one worker on `DP_WORKER_CORE`,
    /// default 1, spinning `DP_WORKER_SPIN` empty polls); nothing for a
    /// remote rig. Returns how XDP attached, for the notes.
    pub fn serve(&mut self) -> Result<Option<String>> {
        let Target::Embedded { srv, topo } = &mut self.target else {
            return Ok(None);
        };
        if srv.is_none() {
            let section = ServerSection {
                id: SERVER_ID,
                port: PORT,
                mode: Mode::Xdp,
                interface: Some(topo.server_ifname().to_string()),
                workers: vec![knob("DP_WORKER_CORE", 1) as usize],
                pin_dir: Some(PathBuf::from(format!(
                    "/sys/fs/bpf/dpbench-{}-{}",
                    topo.netns(Side::Server),
                    std::process::id()
                ))),
                check_clients: true,
            };
            let tuning = Tuning {
                spin_budget: knob("DP_WORKER_SPIN", u32::MAX),
                idle_sleep_us: 100,
                batch: 64,
            };
            let cfg = server_config(self.layout, section, tuning, topo.client_ip());
            *srv = Some(
                ServerThread::spawn(cfg, Some(topo.server_netns()))
                    .context("starting the XDP server")?,
            );
        }
        Ok(srv.as_ref().map(|s| format!("{:?}", s.attach_mode())))
    }

    /// The warnings runs left since the last call (failed accesses under
    /// the limit of [`Rig::run_vms`]), for the scenario's notes.
    pub fn take_warnings(&self) -> Vec<String> {
        std::mem::take(&mut self.warnings.borrow_mut())
    }

    /// A VM id this rig has not used yet.
    pub fn fresh_vm(&self) -> Result<u32> {
        let id = self.next_vm.get();
        if id > self.layout.vms {
            bail!(
                "this run needs more than the {} fresh VM ids the bench server registers \
                 (each measurement uses VM ids of its own); run fewer repetitions or a smaller \
                 --vms/--vcpus matrix per invocation",
                self.layout.pool()
            );
        }
        self.next_vm.set(id + 1);
        Ok(id)
    }

    /// `vms` fresh VMs (numbered 1.. in the layout's counters) of `vcpus`
    /// vCPUs each, every vCPU writing `writes` times to its own remote
    /// counter (`guests::multi_vcpu`), posted or not.
    pub fn counter_vms(
        &self,
        vms: u32,
        vcpus: u32,
        writes: u16,
        posted: bool,
    ) -> Result<Vec<VmSpec>> {
        (1..=vms)
            .map(|v| -> Result<VmSpec> {
                let gs = guests::multi_vcpu(COUNTER_BASE, writes, vcpus as u8)?;
                let devices = (0..vcpus)
                    .map(|i| {
                        dev(
                            Space::Pio,
                            (COUNTER_BASE + 0x10 * i as u16) as u64,
                            0x10,
                            counter_id(v, i),
                            posted,
                            false,
                        )
                    })
                    .collect();
                Ok(vm_spec(self.fresh_vm()?, &gs, devices))
            })
            .collect()
    }

    /// Interrupt counters the server has (irq runs this rig can take).
    pub fn irq_slots(&self) -> u32 {
        self.layout.irq_slots
    }

    /// An interrupt counter not used yet: (its VM, its model).
    pub fn irq_slot(&self) -> Result<(u32, u32)> {
        let k = self.next_irq.get();
        if k > self.layout.irq_slots {
            bail!(
                "this run needs more than the {} interrupt counters the bench server has \
                 (one per irq run); use --repeat {} or fewer",
                self.layout.irq_slots,
                self.layout.irq_slots
            );
        }
        self.next_irq.set(k + 1);
        Ok((k, irq_model(k)))
    }

    /// The network floor of the path to the server, `iters` round trips
    /// after `warmup`: embedded, the raw busy-polling UDP echo across the
    /// veth (`udp-floor`; call before [`Rig::serve`]); remote, a one-record
    /// read of the server's null model from a busy-polling socket, no KVM
    /// and no VMM (`rtt-floor`, which includes the server's work). Returns
    /// the row name and the samples.
    pub fn net_floor(&self, warmup: u32, iters: u32) -> Result<(&'static str, Latency)> {
        match &self.target {
            Target::Embedded { srv, topo } => {
                if srv.is_some() {
                    bail!("the UDP floor must be measured before the server starts");
                }
                Ok(("udp-floor", crate::server::floor(topo, warmup, iters)?))
            }
            Target::Remote { addr } => {
                let vm = self.fresh_vm()?;
                let to = SocketAddr::V4(*addr);
                let core = knob("DP_VCPU_CORE", 0) as usize;
                let addr = *addr;
                let l = on_pinned_socket(core, move |sock| {
                    round_trips(&sock, to, warmup, iters, null_read(vm), check_response)
                        .with_context(|| {
                            format!(
                                "no valid answer from null model {NULL_PIO} of the server at \
                                 {addr}: it must run bench/server-remote.toml with this \
                                 machine's address as client {CLIENT_ID}, restarted before \
                                 each dpbench run (a Stale answer means it has served these \
                                 VM ids before)"
                            )
                        })
                })?;
                Ok(("rtt-floor", l))
            }
        }
    }

    /// The serial floor of a remote exit (see `crate::serial`): `iters`
    /// exits whose handler does one raw round trip, to the UDP echo
    /// (embedded: `exit-udp-floor`; call before [`Rig::serve`]) or to the
    /// remote server's null model (`exit-rtt-floor`). Returns the row name
    /// and the samples.
    pub fn exit_net_floor(&self, warmup: usize, iters: u16) -> Result<(&'static str, Latency)> {
        let core = knob("DP_VCPU_CORE", 0) as usize;
        match &self.target {
            Target::Embedded { srv, topo } => {
                if srv.is_some() {
                    bail!("the serial floor must be measured before the server starts");
                }
                let l = crate::server::with_echo(topo, |to| {
                    let sock = crate::server::client_socket(topo)?;
                    topo.run(Side::Client, move || {
                        let _ = affinity::set_thread_affinity([core]);
                        crate::serial::exit_net_floor(
                            sock,
                            to,
                            iters,
                            warmup,
                            Box::new(crate::server::echo_payload),
                            Box::new(crate::server::check_echo),
                        )
                    })?
                })?;
                Ok(("exit-udp-floor", l))
            }
            Target::Remote { addr } => {
                let vm = self.fresh_vm()?;
                let to = SocketAddr::V4(*addr);
                let l = on_pinned_socket(core, move |sock| {
                    crate::serial::exit_net_floor(
                        sock,
                        to,
                        iters,
                        warmup,
                        Box::new(null_read(vm)),
                        Box::new(check_response),
                    )
                })?;
                Ok(("exit-rtt-floor", l))
            }
        }
    }

    /// The KVM exit floor: `iters` exits of a guest looping on `in` from a
    /// local null model (nothing remote), after `warmup`.
    pub fn exit_floor(&self, iters: u16, warmup: usize) -> Result<Latency> {
        let g = guests::pio_read_loop(PIO_PORT, iters)?;
        let d = dev(Space::Pio, PIO_PORT as u64, 1, NULL_PIO, false, true);
        let out = self.run_vms(
            "exit-floor",
            vec![vm_spec(LOCAL_VM, &[g], vec![d])],
            iters as usize + 8,
            Drain::Direct,
            Duration::from_secs(120),
        )?;
        Ok(histogram(out.samples(warmup)))
    }

    /// Runs `vms` to their end (at most `timeout`), keeping up to
    /// `samples` exit intervals per vCPU, the rings drained as `drain`
    /// says; `label` names the measurement in messages. Fails unless every
    /// vCPU reported its result and at least 99% of the remote accesses
    /// were answered Ok (a server answering from its duplicate windows
    /// fails them all); fewer failures (requests the engine gave up on
    /// after its retransmissions) leave a warning ([`Rig::take_warnings`]).
    pub fn run_vms(
        &self,
        label: &str,
        vms: Vec<VmSpec>,
        samples: usize,
        drain: Drain,
        timeout: Duration,
    ) -> Result<Outcome> {
        let (server, bind) = match &self.target {
            Target::Embedded { topo, .. } => (
                SocketAddr::from((topo.server_ip(), PORT)),
                Some(topo.client_ip().into()),
            ),
            Target::Remote { addr } => (SocketAddr::V4(*addr), None),
        };
        let spec = ClientSpec {
            client: CLIENT_ID,
            bind,
            servers: vec![ServerSpec {
                addr: server,
                id: SERVER_ID,
                via: None,
            }],
            vms,
            engine: EngineConfig {
                // The engine thread spins only when it is the drainer; in
                // direct mode it sleeps, leaving core 0 to the vCPU.
                spin_budget: match drain {
                    Drain::Engine | Drain::EngineZc => knob("DP_ENGINE_SPIN", 20_000),
                    _ => knob("DP_ENGINE_SPIN_DIRECT", 1),
                },
                zero_copy: drain == Drain::EngineZc,
                direct_spin: Duration::from_micros(knob("DP_DIRECT_SPIN_US", 200) as u64),
                tag_keys: self.tag_keys.clone(),
                irqs_on_lanes: knob("DP_IRQ_ON_LANE", 1) != 0,
                // The engine shares core 0 with the vCPUs and nothing else
                // runs there: it yields to them (SCHED_IDLE; bench/README.md,
                // *irq*). Not in engine mode (ignored there).
                yield_to_vcpus: knob("DP_ENGINE_IDLE", 1) != 0,
                ..EngineConfig::default()
            },
            engine_core: Some(knob("DP_ENGINE_CORE", 0) as usize),
            vcpu_spin: knob("DP_VCPU_SPIN", 0),
            samples,
            direct: drain == Drain::Direct,
        };
        let start = Instant::now();
        let mut client = match &self.target {
            Target::Embedded { topo, .. } => topo.run(Side::Client, move || Client::start(spec))?,
            Target::Remote { .. } => Client::start(spec),
        }
        .context("starting the client VMM")?;
        let reports = client.wait(timeout);
        let elapsed = start.elapsed();
        let injected = client.engine().map(|e| {
            let s = e.stats();
            let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
            format!(
                "{} (duplicates {}, for no VM here {}, acknowledgements sent {}, engine \
                 wake-ups {}); client requests: records sent {}, answers matched {}, \
                 datagrams sent again {}, given up {}, late answers {}",
                l(&s.irqs),
                l(&s.irq_duplicates),
                l(&s.irqs_unknown_vm),
                l(&s.acks_sent),
                l(&s.wakeups),
                l(&s.tx_records),
                l(&s.answers),
                l(&s.retransmits),
                l(&s.timeouts),
                l(&s.late)
            )
        });
        let irqs = client.engine().map(|e| {
            let s = e.stats();
            (
                s.irqs.load(Ordering::Relaxed),
                s.irqs_on_vcpu.load(Ordering::Relaxed),
            )
        });
        drop(client);
        let mut vcpus = Vec::new();
        let mut failed = 0u64;
        let mut remote = 0u64;
        let mut unfinished = Vec::new();
        for r in reports {
            failed += r.stats.remote_errors.load(Ordering::Relaxed);
            remote += r.stats.remote.load(Ordering::Relaxed);
            let done = match r.exit {
                Ok(VcpuExit::Done(v)) => v,
                other => {
                    unfinished.push(format!(
                        "VM {} vCPU {}: {other:?} after {} local and {} remote accesses",
                        r.vm,
                        r.vcpu,
                        r.stats.local.load(Ordering::Relaxed),
                        r.stats.remote.load(Ordering::Relaxed)
                    ));
                    continue;
                }
            };
            vcpus.push(VcpuResult {
                vm: r.vm,
                vcpu: r.vcpu,
                done,
                samples: r.stats.take_samples(),
                local: r.stats.local.load(Ordering::Relaxed),
                remote: r.stats.remote.load(Ordering::Relaxed),
            });
        }
        if failed > 0 && !within_error_limit(failed, remote) {
            bail!(
                "{label}: {failed} of {remote} remote accesses were answered with an error or \
                 not at all{}",
                self.stale_hint()
            );
        }
        if failed > 0 {
            self.warnings
                .borrow_mut()
                .push(crate::report::warning(format_args!(
                    "{label}: {failed} of {remote} remote accesses failed (answered with an error, \
                 or given up after the engine's retransmissions); the run is kept"
                )));
        }
        if !unfinished.is_empty() {
            bail!(
                "{label}: {} vCPU(s) did not finish within {timeout:?} ({}); {}{}",
                unfinished.len(),
                unfinished.join("; "),
                self.irq_counts(injected),
                self.stale_hint()
            );
        }
        Ok(Outcome {
            vcpus,
            elapsed,
            irqs,
        })
    }

    /// Frames the embedded server's workers dropped on a full AF_XDP TX
    /// ring so far (`None` for a remote server, whose counters dpbench
    /// cannot read).
    /// Tags the datagrams of the guests run from now on (and the
    /// embedded server's answers) with `keys`, or stops tagging
    /// (`None`). Embedded server only: a remote server's keys are its
    /// own; `false` there.
    pub fn set_tags(&mut self, keys: Option<devplane_wire::tag::KeyRing>) -> Result<bool> {
        let Target::Embedded { srv: Some(s), .. } = &self.target else {
            return Ok(false);
        };
        let sent = keys.clone();
        s.call(move |srv| srv.set_keys(CLIENT_ID, sent))
            .context("the server thread is gone")?
            .context("setting the client's tag keys")?;
        self.tag_keys = keys;
        Ok(true)
    }

    /// Interrupt datagrams the embedded server's workers resent so far
    /// (`None` for a remote server).
    pub fn server_irqs_resent(&self) -> Option<u64> {
        match &self.target {
            Target::Embedded { srv: Some(s), .. } => {
                Some(s.snapshot().workers.iter().map(|w| w.irqs_resent).sum())
            }
            _ => None,
        }
    }

    pub fn server_tx_full(&self) -> Option<u64> {
        match &self.target {
            Target::Embedded { srv: Some(s), .. } => {
                Some(s.snapshot().workers.iter().map(|w| w.tx_full).sum())
            }
            _ => None,
        }
    }

    /// Interrupts the client injected and, embedded, what the server's
    /// workers say they sent and dropped: where a lost interrupt went.
    fn irq_counts(&self, injected: Option<String>) -> String {
        let client = injected.unwrap_or_else(|| "?".to_string());
        match &self.target {
            Target::Embedded { srv: Some(s), .. } => {
                let snap = s.snapshot();
                let w = snap.workers;
                let sum = |f: fn(&devplane_server::stats::WorkerSnapshot) -> u64| {
                    w.iter().map(f).sum::<u64>()
                };
                format!(
                    "interrupts: server sent {} (resent {}, given up {}, unacknowledged {}), \
                     client injected {client}; server acknowledgements received {:?} (per \
                     worker), frames dropped on a full AF_XDP TX ring: {}, requests answered \
                     again: {}; XDP program: {:?}",
                    sum(|w| w.irqs_sent),
                    sum(|w| w.irqs_resent),
                    sum(|w| w.irqs_dropped),
                    sum(|w| w.irqs_held),
                    w.iter().map(|w| w.acks).collect::<Vec<_>>(),
                    sum(|w| w.tx_full),
                    sum(|w| w.duplicates),
                    snap.xdp
                )
            }
            _ => format!("interrupts injected by the client: {client}"),
        }
    }

    fn stale_hint(&self) -> String {
        match &self.target {
            Target::Remote { addr } => format!(
                ": if the server at {addr} served an earlier dpbench run, restart it (its \
                 duplicate windows remember each VM's sequence numbers, and a new VMM starts \
                 again at 1), and check that it runs bench/server-remote.toml"
            ),
            Target::Embedded { .. } => String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(mode: Mode, interface: Option<&str>) -> ServerSection {
        ServerSection {
            id: SERVER_ID,
            port: PORT,
            mode,
            interface: interface.map(str::to_string),
            workers: vec![0],
            pin_dir: None,
            check_clients: true,
        }
    }

    #[test]
    fn server_addresses_are_ipv4_and_port() {
        assert_eq!(
            parse_server_addr("192.0.2.10:7700"),
            Ok("192.0.2.10:7700".parse().unwrap())
        );
        assert_eq!(
            parse_server_addr(" 127.0.0.1:9 "),
            Ok("127.0.0.1:9".parse().unwrap())
        );
        for bad in [
            "",
            "192.0.2.10",
            "192.0.2.10:",
            "192.0.2.10:70000",
            "host.example:7700",
            "[::1]:7700",
            "192.0.2.10:0",
            "0.0.0.0:7700",
            "255.255.255.255:7700",
            "1.2.3.4:7700:1",
        ] {
            let e = parse_server_addr(bad).unwrap_err().0;
            assert!(e.contains("IPV4:PORT"), "{bad:?}: {e}");
            assert!(!e.contains('\n'), "{bad:?}: {e}");
        }
    }

    #[test]
    fn the_layout_is_a_valid_server_config() {
        for layout in [EMBEDDED, REMOTE] {
            let cfg = server_config(
                layout,
                section(Mode::Socket, None),
                Tuning::default(),
                Ipv4Addr::new(10, 0, 0, 1),
            );
            let text = cfg.to_toml_string().unwrap();
            let back =
                ServerConfig::from_toml_str(&text).unwrap_or_else(|e| panic!("{layout:?}: {e}"));
            assert_eq!(back, cfg);
            assert_eq!(cfg.vms.len() as u32, layout.vms);
            assert_eq!(
                cfg.models.len() as u32,
                2 + layout.tp_vms * layout.tp_vcpus + layout.irq_slots
            );
            // Model ids are unique and the irq counters go to their slot's VM.
            let mut ids: Vec<u32> = cfg.models.iter().map(|m| m.id).collect();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), cfg.models.len());
            let m = cfg.models.iter().find(|m| m.id == irq_model(3)).unwrap();
            assert_eq!((m.vm, m.line), (Some(3), Some(IRQ_LINE as u32)));
        }
    }

    /// `bench/server-remote.toml` declares exactly the VMs and models of
    /// [`REMOTE`], and the ids dpbench sends.
    #[test]
    fn server_remote_toml_matches_the_remote_layout() {
        let text = include_str!("../server-remote.toml");
        let file = ServerConfig::from_toml_str(text).expect("bench/server-remote.toml");
        let want = server_config(
            REMOTE,
            file.server.clone(),
            file.tuning,
            file.clients[0].address,
        );
        assert_eq!(file.server.id, SERVER_ID);
        assert_eq!(file.server.port, PORT);
        assert_eq!(file.clients, want.clients);
        assert_eq!(file.vms, want.vms, "regenerate the [[vms]] of the file");
        assert_eq!(
            file.models, want.models,
            "regenerate the models of the file"
        );
    }

    #[test]
    fn a_few_failed_accesses_are_kept_many_fail_the_run() {
        assert!(within_error_limit(0, 0));
        assert!(within_error_limit(1, 100));
        assert!(!within_error_limit(2, 100));
        assert!(!within_error_limit(1, 0));
        assert!(!within_error_limit(5001, 5001));
    }

    #[test]
    fn ids_are_fresh_and_bounded() {
        let rig = Rig::remote("127.0.0.1:7700".parse().unwrap());
        let first = rig.fresh_vm().unwrap();
        assert_eq!(first, REMOTE.irq_slots + 1);
        assert_eq!(rig.fresh_vm().unwrap(), first + 1);
        for _ in 2..REMOTE.pool() {
            rig.fresh_vm().unwrap();
        }
        let e = rig.fresh_vm().unwrap_err().to_string();
        assert!(e.contains("fresh VM ids"), "{e}");
        assert_eq!(rig.irq_slot().unwrap(), (1, irq_model(1)));
        assert_eq!(rig.irq_slot().unwrap(), (2, irq_model(2)));
        for _ in 2..REMOTE.irq_slots {
            rig.irq_slot().unwrap();
        }
        assert!(rig.irq_slot().is_err());
        assert_eq!(rig.server_name(), "127.0.0.1:7700");
    }
}
