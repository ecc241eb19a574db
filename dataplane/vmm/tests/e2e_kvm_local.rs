//! Real KVM guests against a local test device: port-I/O and MMIO loops,
//! PIC interrupts injected from another thread, two vCPUs at once,
//! stopping a halted vCPU with a kick, and awkward MMIO from the guest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devplane_testkit::privilege::{self, Capability};
use devplane_vmm::guests::{self, Guest};
use devplane_vmm::kvm::{IoHandler, Vcpu, VcpuExit, Vm};
use devplane_wire::AccessSize;

const MEM: usize = 0x8_0000;
const PORT: u16 = 0x500;
const ACK_PORT: u16 = 0x510;
const MMIO: u64 = 0xd_0000;
const LINE: u8 = 5;

fn privileged(test: &str) -> bool {
    privilege::require(test, &[Capability::Root, Capability::Kvm])
}

/// Values written to the ack port, with a condition variable to wait on.
#[derive(Default)]
struct Acks {
    seen: Mutex<Vec<u64>>,
    cv: Condvar,
}

impl Acks {
    fn push(&self, v: u64) {
        self.seen.lock().unwrap().push(v);
        self.cv.notify_all();
    }

    /// Waits until `n` acks were seen; panics after 5 s.
    fn wait_len(&self, n: usize) {
        let seen = self.seen.lock().unwrap();
        let (seen, to) = self
            .cv
            .wait_timeout_while(seen, Duration::from_secs(5), |s| s.len() < n)
            .unwrap();
        assert!(!to.timed_out(), "waited 5 s for ack {n}; saw {seen:?}");
    }

    fn snapshot(&self) -> Vec<u64> {
        self.seen.lock().unwrap().clone()
    }
}

/// The test device: a counter at every port (counts writes, returns the
/// count on read), 256 bytes of scratch memory at [`MMIO`], and a recorder
/// at [`ACK_PORT`]. Everything else reads all-ones and is counted.
struct TestIo {
    writes: HashMap<u16, u64>,
    last: HashMap<u16, u64>,
    scratch: [u8; 256],
    mmio_accesses: Vec<(u64, AccessSize, Option<u64>)>,
    mmio_writes: u64,
    unmapped: u64,
    acks: Arc<Acks>,
}

impl TestIo {
    fn new() -> TestIo {
        let mut scratch = [0u8; 256];
        for (i, b) in scratch.iter_mut().enumerate() {
            *b = i as u8;
        }
        TestIo {
            writes: HashMap::new(),
            last: HashMap::new(),
            scratch,
            mmio_accesses: Vec::new(),
            mmio_writes: 0,
            unmapped: 0,
            acks: Arc::new(Acks::default()),
        }
    }

    fn scratch_range(&self, gpa: u64, size: AccessSize) -> Option<std::ops::Range<usize>> {
        let off = usize::try_from(gpa.checked_sub(MMIO)?).ok()?;
        let end = off.checked_add(size.bytes())?;
        (end <= self.scratch.len()).then_some(off..end)
    }
}

impl IoHandler for TestIo {
    fn pio_read(&mut self, port: u16, _size: AccessSize) -> u64 {
        self.writes.get(&port).copied().unwrap_or(0)
    }

    fn pio_write(&mut self, port: u16, _size: AccessSize, data: u64) {
        if port == ACK_PORT {
            self.acks.push(data);
            return;
        }
        *self.writes.entry(port).or_default() += 1;
        self.last.insert(port, data);
    }

    fn mmio_read(&mut self, gpa: u64, size: AccessSize) -> u64 {
        self.mmio_accesses.push((gpa, size, None));
        match self.scratch_range(gpa, size) {
            Some(r) => {
                let mut b = [0u8; 8];
                b[..size.bytes()].copy_from_slice(&self.scratch[r]);
                u64::from_le_bytes(b)
            }
            None => {
                self.unmapped += 1;
                u64::MAX
            }
        }
    }

    fn mmio_write(&mut self, gpa: u64, size: AccessSize, data: u64) {
        self.mmio_accesses.push((gpa, size, Some(data)));
        match self.scratch_range(gpa, size) {
            Some(r) => {
                self.mmio_writes += 1;
                self.scratch[r].copy_from_slice(&data.to_le_bytes()[..size.bytes()]);
            }
            None => self.unmapped += 1,
        }
    }
}

fn boot(guest: &Guest) -> (Vm, Vcpu) {
    let vm = Vm::new(MEM).expect("create VM");
    vm.load(guest.load_gpa, &guest.code).expect("load guest");
    let vcpu = vm.create_vcpu(0, guest.entry).expect("create vCPU");
    (vm, vcpu)
}

/// What a snapshot or migration puts into the target VM
/// (`save_machine`/`restore_machine`) carries the KVM clock: the
/// target's guest reads on from the source's time instead of from its own
/// VM's creation (a guest's clock jumping back by the source's age), and
/// the PIT is created on a target that has none.
#[test]
fn the_kvm_clock_and_the_pit_move_with_a_machine_state() {
    if !privileged("the_kvm_clock_and_the_pit_move_with_a_machine_state") {
        return;
    }
    let source = Vm::new(MEM).expect("create VM");
    source.create_pit().expect("create PIT");
    std::thread::sleep(Duration::from_millis(400));
    let state = source.save_machine().expect("save");
    assert!(state.pit.is_some(), "the source's PIT is in its state");
    let saved = state.clock.clock;
    assert!(
        saved >= 400_000_000,
        "the source's clock {saved} ns is its age (at least 400 ms)"
    );
    let target = Vm::new(MEM).expect("create VM");
    let fresh = target.clock_ns().expect("clock");
    assert!(
        fresh < saved,
        "a new VM's clock ({fresh} ns) starts below the source's ({saved} ns): the check below can fail"
    );
    target.restore_machine(&state).expect("restore");
    let moved = target.clock_ns().expect("clock");
    assert!(
        (saved..saved + 5_000_000_000).contains(&moved),
        "the restored clock {moved} ns goes on from the source's {saved} ns"
    );
    assert!(
        target.save_machine().expect("save").pit.is_some(),
        "the target has the PIT the state had"
    );
}

#[test]
fn pio_loop_reaches_the_device_and_reports_its_count() {
    if !privileged("pio_loop_reaches_the_device_and_reports_its_count") {
        return;
    }
    let guest = guests::pio_loop(PORT, 1000).unwrap();
    let (_vm, mut vcpu) = boot(&guest);
    let mut io = TestIo::new();
    let exit = vcpu.run(&mut io, &AtomicBool::new(false)).unwrap();
    assert_eq!(exit, VcpuExit::Done(1000));
    assert_eq!(io.writes[&PORT], 1000);
    assert_eq!(io.last[&PORT], 1000, "the guest writes 1, 2, ..., 1000");
    // 1000 OUTs, one IN, the DONE write.
    assert_eq!(vcpu.exits(), 1002);

    // Exit rate, for the report (a benchmark proper lives in dpbench).
    let n = 50_000;
    let guest = guests::pio_read_loop(PORT, n).unwrap();
    let (_vm, mut vcpu) = boot(&guest);
    let mut io = TestIo::new();
    let t = Instant::now();
    let exit = vcpu.run(&mut io, &AtomicBool::new(false)).unwrap();
    let dt = t.elapsed();
    assert_eq!(exit, VcpuExit::Done(0));
    eprintln!(
        "pio_read_loop: {} exits in {dt:?}: {:.0} exits/s, {:.2} us/exit",
        vcpu.exits(),
        vcpu.exits() as f64 / dt.as_secs_f64(),
        dt.as_secs_f64() * 1e6 / vcpu.exits() as f64
    );
}

#[test]
fn mmio_loop_reaches_the_device_and_reads_back() {
    if !privileged("mmio_loop_reaches_the_device_and_reads_back") {
        return;
    }
    let guest = guests::mmio_loop(MMIO as u32, 1000).unwrap();
    let (_vm, mut vcpu) = boot(&guest);
    let mut io = TestIo::new();
    let t = Instant::now();
    let exit = vcpu.run(&mut io, &AtomicBool::new(false)).unwrap();
    let dt = t.elapsed();
    assert_eq!(exit, VcpuExit::Done(1000), "the last value written");
    assert_eq!(io.mmio_writes, 1000);
    assert_eq!(io.unmapped, 0);
    assert!(
        io.mmio_accesses
            .iter()
            .all(|&(gpa, size, _)| gpa == MMIO && size == AccessSize::B4)
    );
    // 1000 writes, one read, the DONE write.
    assert_eq!(vcpu.exits(), 1002);
    eprintln!(
        "mmio_loop: {} exits in {dt:?} ({:.2} us/exit)",
        vcpu.exits(),
        dt.as_secs_f64() * 1e6 / vcpu.exits() as f64
    );
}

/// Runs `vcpu` on its own thread; returns the exit and the vCPU.
fn spawn_run(
    mut vcpu: Vcpu,
    mut io: TestIo,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(VcpuExit, Vcpu, TestIo)> {
    std::thread::spawn(move || {
        let exit = vcpu.run(&mut io, &stop).unwrap();
        (exit, vcpu, io)
    })
}

#[test]
fn pic_interrupts_from_another_thread_are_counted_and_acknowledged() {
    if !privileged("pic_interrupts_from_another_thread_are_counted_and_acknowledged") {
        return;
    }
    const N: u16 = 50;
    let guest = guests::irq_counter(LINE, N, ACK_PORT).unwrap();
    let (vm, vcpu) = boot(&guest);
    let io = TestIo::new();
    let acks = Arc::clone(&io.acks);
    let irq = vm.irq_handle();
    let runner = spawn_run(vcpu, io, Arc::new(AtomicBool::new(false)));

    acks.wait_len(1); // armed
    let t = Instant::now();
    for k in 1..=N {
        irq.irq_edge(u32::from(LINE)).unwrap();
        acks.wait_len(usize::from(k) + 1);
    }
    let dt = t.elapsed();
    let (exit, _vcpu, _io) = runner.join().unwrap();
    assert_eq!(exit, VcpuExit::Done(u32::from(N)));
    let want: Vec<u64> = (0..=u64::from(N)).collect();
    assert_eq!(acks.snapshot(), want);
    eprintln!(
        "irq_counter: {N} injected edges acknowledged in {dt:?} ({:.1} us per round trip)",
        dt.as_secs_f64() * 1e6 / f64::from(N)
    );
}

#[test]
fn two_vcpus_run_their_own_loops_concurrently() {
    if !privileged("two_vcpus_run_their_own_loops_concurrently") {
        return;
    }
    const ITER: u16 = 2000;
    const BASE: u16 = 0x600; // vCPU 1 at 0x610, clear of ACK_PORT
    let gs = guests::multi_vcpu(BASE, ITER, 2).unwrap();
    let vm = Vm::new(MEM).unwrap();
    assert!(gs.iter().all(|g| g.mem_end() <= MEM as u64));
    let mut runners = Vec::new();
    for (i, g) in gs.iter().enumerate() {
        vm.load(g.load_gpa, &g.code).unwrap();
        let vcpu = vm.create_vcpu(i as u8, g.entry).unwrap();
        runners.push(spawn_run(
            vcpu,
            TestIo::new(),
            Arc::new(AtomicBool::new(false)),
        ));
    }
    for (i, r) in runners.into_iter().enumerate() {
        let (exit, vcpu, io) = r.join().unwrap();
        let port = BASE + 0x10 * i as u16;
        assert_eq!(exit, VcpuExit::Done(u32::from(ITER)), "vCPU {i}");
        assert_eq!(vcpu.index(), i as u8);
        assert_eq!(io.writes.get(&port), Some(&u64::from(ITER)), "vCPU {i}");
        assert_eq!(io.writes.len(), 1, "vCPU {i} touched only its own port");
    }
}

#[test]
fn a_halted_vcpu_is_stopped_by_a_kick_and_resumes() {
    if !privileged("a_halted_vcpu_is_stopped_by_a_kick_and_resumes") {
        return;
    }
    let guest = guests::irq_counter(LINE, 4, ACK_PORT).unwrap();
    let (vm, vcpu) = boot(&guest);
    let kicker = vcpu.kicker();
    let io = TestIo::new();
    let acks = Arc::clone(&io.acks);
    let irq = vm.irq_handle();
    let stop = Arc::new(AtomicBool::new(false));

    let runner = spawn_run(vcpu, io, Arc::clone(&stop));
    acks.wait_len(1);
    for k in 1..=2 {
        irq.irq_edge(u32::from(LINE)).unwrap();
        acks.wait_len(k + 1);
    }
    // The guest is now in `sti; hlt`, inside KVM_RUN.
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    stop.store(true, Ordering::Release);
    kicker.kick();
    let (exit, mut vcpu, mut io) = runner.join().unwrap();
    let dt = t.elapsed();
    assert_eq!(exit, VcpuExit::Stopped);
    assert!(dt < Duration::from_secs(1), "stop took {dt:?}");
    eprintln!("kick to Stopped: {dt:?}");

    // Stop already set: run returns at once, and a kick with nobody
    // running is harmless.
    kicker.kick();
    assert_eq!(vcpu.run(&mut io, &stop).unwrap(), VcpuExit::Stopped);

    // Resume where it stopped: two more edges finish the guest.
    stop.store(false, Ordering::Release);
    let runner = spawn_run(vcpu, io, Arc::clone(&stop));
    for k in 3..=4 {
        irq.irq_edge(u32::from(LINE)).unwrap();
        acks.wait_len(k + 1);
    }
    let (exit, _vcpu, _io) = runner.join().unwrap();
    assert_eq!(exit, VcpuExit::Done(4));
    assert_eq!(acks.snapshot(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn odd_and_unmapped_mmio_from_the_guest_does_not_panic() {
    if !privileged("odd_and_unmapped_mmio_from_the_guest_does_not_panic") {
        return;
    }
    let guest = guests::mmio_odd(MMIO as u32).unwrap();
    let (_vm, mut vcpu) = boot(&guest);
    let mut io = TestIo::new();
    let exit = vcpu.run(&mut io, &AtomicBool::new(false)).unwrap();
    eprintln!("mmio_odd: {exit:?}, accesses {:x?}", io.mmio_accesses);
    // The page-crossing dword at MMIO + 0xfff: a 1-byte piece (outside the
    // device's scratch: all-ones) and a 3-byte piece (no such access size:
    // all-ones, counted), read then written.
    assert_eq!(exit, VcpuExit::Done(0xffff_ffff));
    assert_eq!(vcpu.odd_mmio(), 2);
    assert_eq!(io.unmapped, 2);
    // The 8-byte accesses reach the device whole: bytes 0x10..0x18 of the
    // scratch, read, then written at 0x18.
    let q = u64::from_le_bytes([0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
    assert!(
        io.mmio_accesses
            .contains(&(MMIO + 0x10, AccessSize::B8, None))
    );
    assert!(
        io.mmio_accesses
            .contains(&(MMIO + 0x18, AccessSize::B8, Some(q)))
    );
}

#[test]
fn loads_outside_guest_memory_are_refused() {
    if !privileged("loads_outside_guest_memory_are_refused") {
        return;
    }
    let vm = Vm::new(MEM).unwrap();
    assert!(vm.load(MEM as u64 - 1, &[1, 2]).is_err());
    assert!(vm.load(u64::MAX, &[1]).is_err());
    assert!(vm.read_mem(MEM as u64, 1).is_err());
    vm.load(MEM as u64 - 2, &[1, 2]).unwrap();
    assert_eq!(vm.read_mem(MEM as u64 - 2, 2).unwrap(), vec![1, 2]);
}

#[test]
fn kicks_without_stop_do_not_disturb_port_io() {
    if !privileged("kicks_without_stop_do_not_disturb_port_io") {
        return;
    }
    // Kicks landing anywhere (mid-exit, with an IN awaiting completion,
    // just before KVM_RUN) only cost a spurious return from KVM_RUN.
    const N: u16 = 20_000;
    let guest = guests::pio_loop(PORT, N).unwrap();
    let (_vm, vcpu) = boot(&guest);
    let kicker = vcpu.kicker();
    let stop = Arc::new(AtomicBool::new(false));
    let runner = spawn_run(vcpu, TestIo::new(), Arc::clone(&stop));
    let mut kicks = 0u32;
    while !runner.is_finished() {
        kicker.kick();
        kicks += 1;
        std::thread::sleep(Duration::from_micros(20));
    }
    let (exit, vcpu, io) = runner.join().unwrap();
    assert_eq!(exit, VcpuExit::Done(u32::from(N)));
    assert_eq!(io.writes[&PORT], u64::from(N));
    assert_eq!(io.last[&PORT], u64::from(N));
    assert_eq!(vcpu.exits(), u64::from(N) + 2);
    eprintln!("{kicks} kicks during {N} OUTs");
}

#[test]
fn stop_lands_wherever_the_vcpu_is() {
    if !privileged("stop_lands_wherever_the_vcpu_is") {
        return;
    }
    let guest = guests::pio_read_loop(PORT, u16::MAX).unwrap();
    let mut stopped = 0;
    for i in 0..40u64 {
        let (_vm, vcpu) = boot(&guest);
        let kicker = vcpu.kicker();
        let stop = Arc::new(AtomicBool::new(false));
        let runner = spawn_run(vcpu, TestIo::new(), Arc::clone(&stop));
        // From "before run starts" to well into the loop.
        std::thread::sleep(Duration::from_micros(i * i * 5));
        let t = Instant::now();
        stop.store(true, Ordering::Release);
        kicker.kick();
        while !runner.is_finished() {
            assert!(t.elapsed() < Duration::from_secs(1), "run {i} did not stop");
            std::thread::sleep(Duration::from_micros(100));
        }
        let (exit, _vcpu, _io) = runner.join().unwrap();
        assert!(
            matches!(exit, VcpuExit::Stopped | VcpuExit::Done(_)),
            "{exit:?}"
        );
        stopped += usize::from(exit == VcpuExit::Stopped);
    }
    assert!(stopped > 30, "only {stopped} of 40 runs were stopped");
}
