//! What a vCPU thread does with an exit: look the address up in its
//! [`Bus`] and hand the access to the device there (see [`crate::bus`]): a
//! local model runs in place; a remote model's access is encoded into the
//! vCPU's exit ring for the engine and (unless it is a posted write) waited
//! for (`VcpuIo::remote`). Unmapped reads return all-ones and unmapped
//! writes are ignored; both are counted.
//!
//! A local model's interrupts are delivered right after the access that
//! raised them, through the VM's [`Trigger`] (the in-kernel irqchip,
//! `KVM_IRQ_LINE`) when the handler has the VM's [`IrqHandle`]
//! ([`VcpuIo::with_irq`]). A local model's reset request (the i8042's reset
//! line) ends the vCPU's run with
//! [`VcpuExit::Reset`](super::kvm::VcpuExit::Reset).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devplane_devmodels::{DeviceModel, ModelEvent, Space};
use devplane_wire::record::FLAG_POSTED;
use devplane_wire::{Access, AccessSize, RawRecord, Record, Request, RequestId, Status};

use super::bus::{At, Bus};
use super::engine::{Doorbell, Driver, EngineError};
use super::kvm::{IoHandler, IrqHandle, Trigger, VcpuKicker};
use super::ring::ExitRing;
use super::uart_tap::UartTap;

/// Per-vCPU exit counters.
#[derive(Debug, Default)]
pub struct VcpuStats {
    /// Accesses served by local models.
    pub local: AtomicU64,
    /// Accesses sent to remote models.
    pub remote: AtomicU64,
    /// Of those, posted writes.
    pub posted: AtomicU64,
    /// Of `remote`, the guest's own exits to a remote model (the others
    /// are a local device's accesses to a remote backing, such as a
    /// virtio-blk disk's blockstore).
    pub remote_exits: AtomicU64,
    /// Reads of unmapped addresses (answered all-ones).
    pub unmapped_reads: AtomicU64,
    /// Writes to unmapped addresses (ignored).
    pub unmapped_writes: AtomicU64,
    /// Synchronous remote accesses answered with an error status or not
    /// at all (reads then return all-ones, writes are lost). Posted writes
    /// that fail are counted by the exit ring
    /// ([`ExitRing::posted_failures`]).
    pub remote_errors: AtomicU64,
    /// Interrupt-line changes raised by local models and delivered.
    pub local_irqs: AtomicU64,
    /// Of those, the ones KVM refused (`KVM_IRQ_LINE` failed).
    pub local_irq_errors: AtomicU64,
    /// When set (benchmarks), the time between consecutive exits in
    /// nanoseconds: for a guest looping on one access this is the whole
    /// exit round trip, guest -> VMM (and model) -> guest.
    pub samples: Mutex<Option<Vec<u32>>>,
    /// When sampling: this vCPU's first exit, nanoseconds since
    /// [`sample_epoch`] (0: none yet). A migration's downtime is the
    /// target vCPU's first exit less the source vCPU's last.
    pub first_exit_ns: AtomicU64,
    /// When sampling: this vCPU's latest exit, as `first_exit_ns`.
    pub last_exit_ns: AtomicU64,
}

/// The instant sampled exit times count from ([`VcpuStats::first_exit_ns`]):
/// one per process, so that two clients of one process (a migration's
/// source and target) compare.
pub fn sample_epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl VcpuStats {
    /// Counters that also keep up to `capacity` exit-interval samples.
    pub fn with_samples(capacity: usize) -> VcpuStats {
        VcpuStats {
            samples: Mutex::new(Some(Vec::with_capacity(capacity))),
            ..Default::default()
        }
    }

    /// Takes the samples kept so far.
    pub fn take_samples(&self) -> Vec<u32> {
        self.samples
            .lock()
            .ok()
            .and_then(|mut s| s.as_mut().map(std::mem::take))
            .unwrap_or_default()
    }
}

/// The exit path of one vCPU, as its bus devices see it: the remote path
/// (exit ring, engine or direct lane, sequence numbers), interrupt
/// delivery and reset requests of local models, and its counters.
pub struct VcpuIo {
    id: RequestId,
    ring: Arc<ExitRing>,
    doorbell: Arc<Doorbell>,
    spin: u32,
    timeout: Duration,
    stats: Arc<VcpuStats>,
    sampling: bool,
    last_exit: Option<Instant>,
    driver: Option<Driver>,
    irq: Option<IrqHandle>,
    reset: bool,
    tap: Option<UartTap>,
}

fn add(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl VcpuIo {
    /// A handler for vCPU `vcpu` of VM `vm` (hypervisor `hypervisor`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vm: u32,
        hypervisor: u32,
        vcpu: u16,
        ring: Arc<ExitRing>,
        doorbell: Arc<Doorbell>,
        spin: u32,
        stats: Arc<VcpuStats>,
    ) -> VcpuIo {
        VcpuIo {
            id: RequestId {
                vm,
                hypervisor,
                vcpu,
                seq: devplane_wire::first_seq(),
            },
            ring,
            doorbell,
            spin,
            timeout: super::engine::EngineConfig::default().vcpu_wait(),
            sampling: stats.samples.lock().map(|s| s.is_some()).unwrap_or(false),
            stats,
            last_exit: None,
            driver: None,
            irq: None,
            reset: false,
            tap: None,
        }
    }

    /// Waits at most `timeout` for an answer (or a free ring slot): the
    /// engine's [`vcpu_wait`](super::engine::EngineConfig::vcpu_wait), so
    /// that the engine, which gives up at its horizon, answers first.
    pub fn with_timeout(mut self, timeout: Duration) -> VcpuIo {
        self.timeout = timeout;
        self
    }

    /// A remote UART's transmitted bytes also go to a console (see
    /// [`UartTap`]).
    pub fn with_uart_tap(mut self, tap: Option<UartTap>) -> VcpuIo {
        self.tap = tap;
        self
    }

    /// Delivers local models' interrupts into the VM behind `irq`. Without
    /// it they are taken from the models and dropped.
    pub fn with_irq(mut self, irq: IrqHandle) -> VcpuIo {
        self.irq = Some(irq);
        self
    }

    /// Counts an access served in this thread.
    pub(crate) fn count_local(&self) {
        add(&self.stats.local);
    }

    /// Counts an exit of the guest's served by a remote model.
    pub(crate) fn count_remote_exit(&self) {
        add(&self.stats.remote_exits);
    }

    /// Takes what a local model raised during an access: interrupt-line
    /// changes (delivered) and a reset request (remembered for
    /// [`IoHandler::reset_requested`]).
    pub(crate) fn after_local(&mut self, model: &mut dyn DeviceModel) {
        while let Some(ev) = model.take_irq() {
            add(&self.stats.local_irqs);
            let Some(irq) = &self.irq else { continue };
            if irq.trigger(ev.line, ev.action).is_err() {
                add(&self.stats.local_irq_errors);
            }
        }
        while let Some(ev) = model.take_event() {
            match ev {
                ModelEvent::Reset => self.reset = true,
            }
        }
    }

    /// Direct mode: this vCPU sends its own requests and reaps its own
    /// answers through `driver` while it waits.
    pub fn with_driver(mut self, driver: Option<Driver>) -> VcpuIo {
        self.driver = driver;
        self
    }

    /// Direct mode, on the vCPU's own thread before it runs its guest:
    /// takes the lane (see [`Driver::attach`]); `kicker` kicks this vCPU
    /// when its lane needs it while the guest runs.
    pub fn attach(&self, kicker: VcpuKicker) -> Result<(), EngineError> {
        match &self.driver {
            Some(d) => d.attach(Box::new(move || kicker.kick())),
            None => Ok(()),
        }
    }

    /// After the guest ended or before its vCPU is held: waits until
    /// every posted write is answered, at most until `deadline`. In direct
    /// mode the vCPU drives its lane meanwhile; otherwise the engine thread
    /// answers them into the exit ring.
    pub fn flush(&self, deadline: Instant) {
        match &self.driver {
            Some(d) => d.flush(deadline),
            None => {
                while self.ring.posted_in_flight() > 0 && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    /// The sequence number of this vCPU's last remote request.
    pub fn seq(&self) -> u64 {
        self.id.seq
    }

    /// Continues the sequence after `seq` (a restored or migrated vCPU
    /// carries on where its source stopped, so that the server's duplicate
    /// windows stay right).
    pub fn set_seq(&mut self, seq: u64) {
        self.id.seq = seq;
    }

    fn sample(&mut self) {
        let now = Instant::now();
        let at = (now.duration_since(sample_epoch()).as_nanos() as u64).max(1);
        let _ =
            self.stats
                .first_exit_ns
                .compare_exchange(0, at, Ordering::Relaxed, Ordering::Relaxed);
        self.stats.last_exit_ns.store(at, Ordering::Relaxed);
        if let Some(prev) = self.last_exit.replace(now) {
            let ns = now.duration_since(prev).as_nanos().min(u32::MAX as u128) as u32;
            if let Ok(mut s) = self.stats.samples.lock()
                && let Some(v) = s.as_mut()
                && v.len() < v.capacity()
            {
                v.push(ns);
            }
        }
    }

    /// Sends one access to remote model `index` and, unless it is posted,
    /// waits for its answer. `None` (counted in `remote_errors`) for an
    /// error status or no answer within the timeout; posted writes answer
    /// `Some(0)` at once.
    pub(crate) fn remote(
        &mut self,
        space: Space,
        addr: u64,
        size: AccessSize,
        write: Option<u64>,
        index: u32,
        posted: bool,
    ) -> Option<u64> {
        add(&self.stats.remote);
        self.id.seq += 1;
        let rec = RawRecord::encode(&Record::Request(Request {
            id: self.id,
            access: access(space, addr, size, write),
            flags: if posted { FLAG_POSTED } else { 0 },
        }));
        let outcome = match &self.driver {
            None => self.via_engine(&rec, index, posted),
            Some(d) => self.via_lane(d, &rec, index, posted),
        };
        match outcome {
            Outcome::Posted => {
                add(&self.stats.posted);
                Some(0)
            }
            Outcome::Answer(Some((st, data))) if st == Status::Ok as u8 => Some(data & size.mask()),
            Outcome::Answer(_) => {
                add(&self.stats.remote_errors);
                None
            }
        }
    }

    /// Engine mode: publishes `rec` and rings the engine's doorbell; waits
    /// for the answer unless it is posted.
    fn via_engine(&self, rec: &RawRecord, index: u32, posted: bool) -> Outcome {
        let Some(i) = self.free_slot(None) else {
            return Outcome::Answer(None);
        };
        self.ring.publish(i, index, posted, rec);
        self.doorbell.ring();
        if posted {
            return Outcome::Posted;
        }
        Outcome::Answer(self.ring.wait(i, self.spin, Instant::now() + self.timeout))
    }

    /// Direct mode: publishes `rec` and drives this vCPU's lane `d` itself
    /// until the answer comes (unless it is posted).
    fn via_lane(&self, d: &Driver, rec: &RawRecord, index: u32, posted: bool) -> Outcome {
        d.begin();
        let Some(i) = self.free_slot(Some(d)) else {
            d.end();
            return Outcome::Answer(None);
        };
        self.ring.publish(i, index, posted, rec);
        d.step();
        if posted {
            d.end();
            return Outcome::Posted;
        }
        let answer = self.await_on_lane(d, i);
        d.end();
        Outcome::Answer(answer)
    }

    /// The index of a free ring slot. A full ring (every slot in flight)
    /// is back-pressure: wait, driving this vCPU's lane meanwhile in
    /// direct mode, and never longer than the request timeout (then the
    /// access fails and is counted).
    fn free_slot(&self, driver: Option<&Driver>) -> Option<u64> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(i) = self.ring.next_free() {
                return Some(i);
            }
            match driver {
                Some(d) => {
                    d.step();
                }
                None => std::hint::spin_loop(),
            }
            if Instant::now() > deadline {
                return None;
            }
        }
    }

    /// Direct mode: spins for the answer in slot `i`, driving the lane, for
    /// the spin budget; then sleeps in the kernel between steps until it
    /// comes (or the request times out).
    fn await_on_lane(&self, d: &Driver, i: u64) -> Option<(u8, u64)> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let spin = d.spin_budget();
        let mut n = 0u32;
        let mut spinning = true;
        loop {
            if let Some(a) = self.ring.try_take(i) {
                return Some(a);
            }
            d.step();
            if spinning {
                n = n.wrapping_add(1);
                if n.is_multiple_of(64) {
                    let now = Instant::now();
                    if now > deadline {
                        return self.ring.abandon(i);
                    }
                    spinning = now - start < spin;
                }
                continue;
            }
            // The step may have answered it (a timeout).
            if let Some(a) = self.ring.try_take(i) {
                return Some(a);
            }
            let now = Instant::now();
            if now > deadline {
                return self.ring.abandon(i);
            }
            let ring = &self.ring;
            d.sleep(deadline - now, || ring.is_done(i));
        }
    }
}

/// How a remote access ended.
enum Outcome {
    /// A posted write, published: no answer to wait for.
    Posted,
    /// The answer (status, data), or none (no free slot or no answer in
    /// time).
    Answer(Option<(u8, u64)>),
}

/// The wire access for a port-I/O or MMIO read (`write` is `None`) or
/// write.
fn access(space: Space, addr: u64, size: AccessSize, write: Option<u64>) -> Access {
    match (space, write) {
        (Space::Pio, None) => Access::PioIn {
            port: addr as u16,
            size,
        },
        (Space::Pio, Some(d)) => Access::PioOut {
            port: addr as u16,
            size,
            data: d as u32,
        },
        (Space::Mmio, None) => Access::MmioRead { gpa: addr, size },
        (Space::Mmio, Some(d)) => Access::MmioWrite {
            gpa: addr,
            size,
            data: d & size.mask(),
        },
    }
}

/// The exit handler of one vCPU: its bus and its exit path.
pub struct ExitHandler {
    bus: Bus,
    io: VcpuIo,
}

impl ExitHandler {
    /// Exits of a vCPU with bus `bus` and exit path `io`.
    pub fn new(bus: Bus, io: VcpuIo) -> ExitHandler {
        ExitHandler { bus, io }
    }

    /// The exit path (to attach or flush its lane: [`VcpuIo::attach`],
    /// [`VcpuIo::flush`]).
    pub fn io(&self) -> &VcpuIo {
        &self.io
    }

    /// The exit path, to change (its sequence: [`VcpuIo::set_seq`]).
    pub fn io_mut(&mut self) -> &mut VcpuIo {
        &mut self.io
    }

    /// The devices of this vCPU's bus (local models' snapshots).
    pub fn bus_mut(&mut self) -> &mut Bus {
        &mut self.bus
    }

    /// The bus and the exit path at once (a restore changes both).
    pub fn parts_mut(&mut self) -> (&mut Bus, &mut VcpuIo) {
        (&mut self.bus, &mut self.io)
    }

    /// One access: one call into the device that decodes `addr`.
    fn access(&mut self, space: Space, addr: u64, size: AccessSize, write: Option<u64>) -> u64 {
        if self.io.sampling {
            self.io.sample();
        }
        let Some(m) = self.bus.lookup_mut(space, addr) else {
            match write {
                Some(_) => add(&self.io.stats.unmapped_writes),
                None => add(&self.io.stats.unmapped_reads),
            }
            return size.mask();
        };
        let at = At {
            space,
            addr,
            offset: addr - m.base,
            posted: m.posted,
        };
        match write {
            Some(data) => {
                m.device.write(&mut self.io, at, size, data);
                0
            }
            None => m.device.read(&mut self.io, at, size),
        }
    }
}

impl IoHandler for ExitHandler {
    fn pio_read(&mut self, port: u16, size: AccessSize) -> u64 {
        self.access(Space::Pio, port as u64, size, None)
    }

    fn pio_write(&mut self, port: u16, size: AccessSize, data: u64) {
        if let Some(t) = self.io.tap.as_mut() {
            t.observe(port, data);
        }
        self.access(Space::Pio, port as u64, size, Some(data));
    }

    fn mmio_read(&mut self, gpa: u64, size: AccessSize) -> u64 {
        self.access(Space::Mmio, gpa, size, None)
    }

    fn mmio_write(&mut self, gpa: u64, size: AccessSize, data: u64) {
        self.access(Space::Mmio, gpa, size, Some(data));
    }

    fn reset_requested(&mut self) -> bool {
        self.io.reset
    }

    fn kicked(&mut self) {
        if let Some(d) = &self.io.driver {
            d.service();
        }
    }
}
