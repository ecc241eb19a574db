//! The protocol's rules, each checked without root, KVM or network: a fake
//! [`Io`] records what the protocol asks.

use std::sync::atomic::Ordering;

use devplane_wire::{Access, AccessSize, Request};
use zerocopy::IntoBytes;

use super::*;

const VM: u32 = 7;
const HV: u32 = 1;
const SERVER: u32 = 3;
const CLIENT: u32 = 9;
/// Model 0 of every vCPU (socket 0) and model 1 (socket 1).
const MODEL_A: u32 = 100;
const MODEL_B: u32 = 200;
const RETRANSMIT: u64 = 2_000_000;
const HORIZON: u64 = 10_000_000_000;

/// The fake wall clock (ns since the epoch): interrupt numbers up to it
/// are plausible.
const WALL: u64 = 1_700_000_000_000_000_000;

#[derive(Default)]
struct Fake {
    sent: Vec<(usize, Vec<u8>)>,
    done: Vec<(usize, u64, u8, u64)>,
    injected: Vec<(u32, u32, IrqAction)>,
    acks: Vec<(usize, u32, Vec<u8>)>,
    /// Acknowledgements ("ack") and injections ("inject"), in order.
    order: Vec<&'static str>,
    /// Times the wall clock was read.
    clock_reads: std::cell::Cell<u32>,
}

impl Io for Fake {
    fn send(&mut self, socket: usize, datagram: &[u8]) -> Result<(), EngineError> {
        self.sent.push((socket, datagram.to_vec()));
        Ok(())
    }
    fn complete(&mut self, vcpu: usize, slot: u64, status: u8, data: u64) {
        self.done.push((vcpu, slot, status, data));
    }
    fn inject(&mut self, vm: u32, line: u32, action: IrqAction) -> bool {
        self.injected.push((vm, line, action));
        self.order.push("inject");
        vm == VM
    }
    fn has_vm(&self, vm: u32) -> bool {
        vm == VM
    }
    fn wall_ns(&self) -> u64 {
        self.clock_reads.set(self.clock_reads.get() + 1);
        WALL
    }
    fn ack(&mut self, socket: usize, server: u32, datagram: &[u8]) {
        self.acks.push((socket, server, datagram.to_vec()));
        self.order.push("ack");
    }
}

fn protocol_with(vcpus: u16, loss: Loss, horizon_ns: u64) -> (Protocol, Arc<EngineStats>) {
    let models: Arc<[RemoteModel]> = Arc::new([
        RemoteModel {
            model: MODEL_A,
            server: SERVER,
            socket: 0,
        },
        RemoteModel {
            model: MODEL_B,
            server: SERVER,
            socket: 1,
        },
    ]);
    let peers = (0..vcpus)
        .map(|vcpu| Peer {
            vm: VM,
            vcpu,
            models: models.clone(),
        })
        .collect();
    let settings = Settings {
        client: CLIENT,
        retransmit_ns: RETRANSMIT,
        retransmit_max_ns: 8 * RETRANSMIT,
        horizon_ns,
        loss,
        keys: None,
    };
    let stats = Arc::new(EngineStats::default());
    let p = Protocol::new(
        settings,
        peers,
        vec![Some(SERVER), Some(SERVER)],
        vec![SERVER],
        vec![4242, 4242],
        stats.clone(),
    );
    (p, stats)
}

fn protocol(vcpus: u16) -> (Protocol, Arc<EngineStats>) {
    protocol_with(vcpus, Loss::default(), HORIZON)
}

fn request(vcpu: u16, seq: u64) -> [u8; RECORD_LEN] {
    let rec = RawRecord::encode(&Record::Request(Request {
        id: RequestId {
            vm: VM,
            hypervisor: HV,
            vcpu,
            seq,
        },
        access: Access::PioOut {
            port: 0x60,
            size: AccessSize::B1,
            data: seq as u32,
        },
        flags: 0,
    }));
    rec.as_bytes().try_into().unwrap()
}

/// Queues requests `seqs` of vCPU `vcpu` for model `model` (exit-ring slot
/// = sequence number).
fn queue(p: &mut Protocol, io: &mut Fake, vcpu: u16, model: usize, seqs: &[u64]) {
    for &s in seqs {
        p.request(vcpu as usize, s, model, &request(vcpu, s), io);
    }
}

/// The sequence numbers of request datagram `d`, in order.
fn seqs(d: &[u8]) -> Vec<u64> {
    let d = Datagram::parse(d).unwrap();
    assert_eq!(d.kind(), Kind::Request);
    d.records()
        .map(|r| match r {
            Record::Request(q) => q.id.seq,
            other => panic!("not a request: {other:?}"),
        })
        .collect()
}

fn answers(model: u32, vcpu: u16, seqs: &[u64]) -> Vec<u8> {
    answers_of(model, vcpu, seqs, &vec![Status::Ok; seqs.len()])
}

/// Answers to `seqs` of `vcpu`, record `i` with status `status[i]`; data
/// `seq * 10` where `Ok`, 0 otherwise.
fn answers_of(model: u32, vcpu: u16, seqs: &[u64], status: &[Status]) -> Vec<u8> {
    let recs: Vec<Record> = seqs
        .iter()
        .zip(status)
        .map(|(&seq, &status)| {
            Record::Response(Response {
                id: RequestId {
                    vm: VM,
                    hypervisor: HV,
                    vcpu,
                    seq,
                },
                status,
                size: AccessSize::B4,
                addr: 0x60,
                data: if status == Status::Ok { seq * 10 } else { 0 },
            })
        })
        .collect();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let h = Header::new(Kind::Response, model, SERVER, CLIENT);
    let n = datagram::encode(&mut buf, h, &recs).unwrap();
    buf.truncate(n);
    buf
}

fn interrupts(model: u32, vm: u32, seqs: &[u64]) -> Vec<u8> {
    let recs: Vec<Record> = seqs
        .iter()
        .map(|&seq| {
            Record::Interrupt(Interrupt {
                vm,
                hypervisor: HV,
                line: seq as u32,
                action: IrqAction::Edge,
                seq,
            })
        })
        .collect();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let h = Header::new(Kind::Interrupt, model, SERVER, CLIENT);
    let n = datagram::encode(&mut buf, h, &recs).unwrap();
    buf.truncate(n);
    buf
}

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

#[test]
fn one_datagram_in_flight_per_vcpu_and_model() {
    let (mut p, _) = protocol(2);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    assert!(p.send_ready(0, 0, &mut io).unwrap());
    queue(&mut p, &mut io, 0, 0, &[2, 3]);
    assert!(
        !p.send_ready(0, 0, &mut io).unwrap(),
        "waits for the answer"
    );
    // Another model of the same vCPU, and another vCPU, are not held up.
    queue(&mut p, &mut io, 0, 1, &[4]);
    queue(&mut p, &mut io, 1, 0, &[1]);
    assert!(p.send_ready(0, 0, &mut io).unwrap());
    assert!(p.send_ready(1, 0, &mut io).unwrap());
    let got: Vec<_> = io.sent.iter().map(|(s, d)| (*s, seqs(d))).collect();
    assert_eq!(got, vec![(0, vec![1]), (1, vec![4]), (0, vec![1])]);
    // The answer lets the queued requests go, together and in order.
    p.on_datagram(&answers(MODEL_A, 0, &[1]), 0, &mut io);
    assert!(p.send_ready(0, 0, &mut io).unwrap());
    assert_eq!(seqs(&io.sent[3].1), vec![2, 3]);
}

#[test]
fn requests_go_in_the_order_made() {
    let (mut p, _) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[10]);
    p.send_ready(0, 0, &mut io).unwrap();
    queue(&mut p, &mut io, 0, 0, &[11, 12, 13, 14]);
    p.on_datagram(&answers(MODEL_A, 0, &[10]), 0, &mut io);
    p.send_ready(0, 0, &mut io).unwrap();
    // Answered out of order: completions follow the answers, the next
    // datagram still waits for all of them.
    p.on_datagram(&answers(MODEL_A, 0, &[13, 11]), 0, &mut io);
    queue(&mut p, &mut io, 0, 0, &[15]);
    assert!(!p.send_ready(0, 0, &mut io).unwrap());
    p.on_datagram(&answers(MODEL_A, 0, &[14, 12]), 0, &mut io);
    assert!(p.send_ready(0, 0, &mut io).unwrap());
    let sent: Vec<_> = io.sent.iter().map(|(_, d)| seqs(d)).collect();
    assert_eq!(sent, vec![vec![10], vec![11, 12, 13, 14], vec![15]]);
    let done: Vec<_> = io
        .done
        .iter()
        .map(|&(_, slot, _, data)| (slot, data))
        .collect();
    assert_eq!(
        done,
        vec![(10, 100), (13, 130), (11, 110), (14, 140), (12, 120)]
    );
}

#[test]
fn batches_hold_at_most_max_records() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    let all: Vec<u64> = (1..=MAX_RECORDS as u64 + 5).collect();
    queue(&mut p, &mut io, 0, 0, &all);
    p.send_ready(0, 0, &mut io).unwrap();
    assert_eq!(seqs(&io.sent[0].1), all[..MAX_RECORDS]);
    assert!(io.sent[0].1.len() <= MAX_DATAGRAM);
    p.on_datagram(&answers(MODEL_A, 0, &all[..MAX_RECORDS]), 0, &mut io);
    p.send_ready(0, 0, &mut io).unwrap();
    assert_eq!(seqs(&io.sent[1].1), all[MAX_RECORDS..]);
    assert_eq!(get(&stats.tx_datagrams), 2);
    assert_eq!(get(&stats.tx_records), all.len() as u64);
    // Every request names the client and the interrupt port.
    let d = Datagram::parse(&io.sent[0].1).unwrap();
    assert_eq!((d.client(), d.irq_port()), (CLIENT, Some(4242)));
    assert_eq!((d.model(), d.server()), (MODEL_A, SERVER));
}

#[test]
fn retransmits_the_same_datagram_at_its_deadline() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 1, &[5, 6]);
    p.send_ready(0, 1000, &mut io).unwrap();
    assert_eq!(p.next_due(), Some(1000 + RETRANSMIT));
    assert!(!p.retransmit(1000 + RETRANSMIT - 1, &mut io).unwrap());
    assert_eq!(io.sent.len(), 1);
    assert!(p.retransmit(1000 + RETRANSMIT, &mut io).unwrap());
    assert_eq!(io.sent.len(), 2);
    assert_eq!(io.sent[1], io.sent[0], "same socket, same bytes");
    assert_eq!(seqs(&io.sent[1].1), vec![5, 6]);
    assert_eq!(get(&stats.retransmits), 1);
    // The next wait is twice as long; an answer clears it.
    assert_eq!(p.next_due(), Some(1000 + 3 * RETRANSMIT));
    p.on_datagram(&answers(MODEL_B, 0, &[5, 6]), 1, &mut io);
    assert_eq!(p.next_due(), None);
    assert!(!p.in_flight());
    assert!(!p.retransmit(u64::MAX, &mut io).unwrap());
}

#[test]
fn resends_back_off_exponentially_up_to_the_cap() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    p.send_ready(0, 0, &mut io).unwrap();
    let mut at = Vec::new();
    for _ in 0..7 {
        let due = p.next_due().unwrap();
        assert!(!p.retransmit(due - 1, &mut io).unwrap(), "not before {due}");
        assert!(p.retransmit(due, &mut io).unwrap());
        at.push(due / RETRANSMIT);
    }
    // Waits of 1, 2, 4, 8, then 8 (the cap) intervals.
    assert_eq!(at, vec![1, 3, 7, 15, 23, 31, 39]);
    assert_eq!(io.sent.len(), 8);
    assert!(io.sent.iter().all(|s| *s == io.sent[0]), "same bytes");
    assert_eq!(get(&stats.retransmits), 7);
    assert_eq!(get(&stats.backoffs), 6);
    assert_eq!(get(&stats.timeouts), 0);
}

#[test]
fn gives_up_at_the_horizon() {
    let (mut p, stats) = protocol_with(1, Loss::default(), 5 * RETRANSMIT);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1, 2, 3]);
    p.send_ready(0, 0, &mut io).unwrap();
    p.on_datagram(&answers(MODEL_A, 0, &[2]), 0, &mut io);
    // Resent after 1 and 3 intervals; the next (7) is past the horizon.
    assert!(p.retransmit(RETRANSMIT, &mut io).unwrap());
    assert!(p.retransmit(3 * RETRANSMIT, &mut io).unwrap());
    assert_eq!(p.next_due(), Some(5 * RETRANSMIT));
    assert!(!p.retransmit(5 * RETRANSMIT - 1, &mut io).unwrap());
    assert!(io.done.iter().all(|d| d.2 != STATUS_TIMEOUT));
    assert!(p.retransmit(5 * RETRANSMIT, &mut io).unwrap());
    assert_eq!(io.sent.len(), 3, "given up, not sent again");
    let timed_out: Vec<_> = io
        .done
        .iter()
        .filter(|d| d.2 == STATUS_TIMEOUT)
        .map(|d| d.1)
        .collect();
    assert_eq!(timed_out, vec![1, 3], "only the unanswered");
    assert_eq!(get(&stats.timeouts), 2);
    assert!(!p.in_flight());
    // A late answer after giving up is ignored.
    p.on_datagram(&answers(MODEL_A, 0, &[1]), 0, &mut io);
    assert_eq!(get(&stats.late), 1);
    assert_eq!(io.done.len(), 3);
}

#[test]
fn duplicate_and_late_answers_are_ignored() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1, 2]);
    p.send_ready(0, 0, &mut io).unwrap();
    p.on_datagram(&answers(MODEL_A, 0, &[1]), 0, &mut io);
    // The same answer again (a retransmission answered twice).
    p.on_datagram(&answers(MODEL_A, 0, &[1]), 0, &mut io);
    // Answers matching nothing: another sequence (late), a vCPU not
    // here, a model on another socket, a model the vCPU does not use.
    p.on_datagram(&answers(MODEL_A, 0, &[99]), 0, &mut io);
    p.on_datagram(&answers(MODEL_A, 5, &[2]), 0, &mut io);
    p.on_datagram(&answers(MODEL_B, 0, &[2]), 0, &mut io);
    p.on_datagram(&answers(555, 0, &[2]), 0, &mut io);
    assert_eq!(io.done, vec![(0, 1, Status::Ok as u8, 10)]);
    assert_eq!(get(&stats.answers), 1);
    assert_eq!(get(&stats.late), 2);
    assert_eq!(get(&stats.foreign_vm), 1);
    assert_eq!(get(&stats.foreign_server), 1);
    assert_eq!(get(&stats.foreign_model), 1);
    p.on_datagram(&answers(MODEL_A, 0, &[2]), 0, &mut io);
    assert_eq!(io.done.len(), 2);
    // After the datagram is retired.
    p.on_datagram(&answers(MODEL_A, 0, &[2]), 0, &mut io);
    assert_eq!(io.done.len(), 2);
    assert_eq!(get(&stats.late), 3);
}

/// A datagram as `answers` or `interrupts` makes, with header fields
/// changed.
fn with_header(bytes: Vec<u8>, server: u32, client: u32) -> Vec<u8> {
    let d = Datagram::parse(&bytes).unwrap();
    let recs: Vec<Record> = d.records().collect();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let h = Header::new(d.kind(), d.model(), server, client);
    let n = datagram::encode(&mut buf, h, &recs).unwrap();
    buf.truncate(n);
    buf
}

#[test]
fn datagrams_naming_another_client_or_server_are_dropped() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    p.send_ready(0, 0, &mut io).unwrap();
    p.on_datagram(
        &with_header(answers(MODEL_A, 0, &[1]), SERVER, CLIENT + 1),
        0,
        &mut io,
    );
    p.on_datagram(
        &with_header(answers(MODEL_A, 0, &[1]), SERVER + 1, CLIENT),
        0,
        &mut io,
    );
    let irq = interrupts(MODEL_A, VM, &[5]);
    p.on_datagram(&with_header(irq.clone(), SERVER + 1, CLIENT), 0, &mut io);
    p.on_datagram(&with_header(irq, SERVER, CLIENT + 1), 0, &mut io);
    assert!(io.done.is_empty() && io.injected.is_empty() && io.acks.is_empty());
    assert_eq!(get(&stats.foreign_client), 2);
    assert_eq!(get(&stats.foreign_server), 2);
    // The real answer still completes the request.
    p.on_datagram(&answers(MODEL_A, 0, &[1]), 0, &mut io);
    assert_eq!(io.done, vec![(0, 1, Status::Ok as u8, 10)]);
}

#[test]
fn a_socket_not_connected_takes_any_known_server() {
    let settings = Settings {
        client: CLIENT,
        retransmit_ns: RETRANSMIT,
        retransmit_max_ns: RETRANSMIT,
        horizon_ns: HORIZON,
        loss: Loss::default(),
        keys: None,
    };
    let stats = Arc::new(EngineStats::default());
    let mut p = Protocol::new(
        settings,
        Vec::new(),
        vec![None],
        vec![SERVER, SERVER + 1],
        Vec::new(),
        stats.clone(),
    );
    let mut io = Fake::default();
    p.on_datagram(&interrupts(MODEL_A, VM, &[5]), 0, &mut io);
    let other = with_header(interrupts(MODEL_B, VM, &[5]), SERVER + 1, CLIENT);
    p.on_datagram(&other, 0, &mut io);
    let stranger = with_header(interrupts(MODEL_B, VM, &[6]), SERVER + 2, CLIENT);
    p.on_datagram(&stranger, 0, &mut io);
    assert_eq!(io.injected.len(), 2);
    assert_eq!(get(&stats.foreign_server), 1);
}

#[test]
fn interrupt_numbers_are_judged_against_the_last_and_the_clock() {
    use IrqVerdict::*;
    // The first: anything up to the clock and its skew.
    assert_eq!(judge(None, 5, WALL), Apply);
    assert_eq!(judge(None, WALL + IRQ_CLOCK_SKEW_NS, WALL), Apply);
    assert_eq!(judge(None, WALL + IRQ_CLOCK_SKEW_NS + 1, WALL), OutOfRange);
    assert_eq!(judge(None, u64::MAX, WALL), OutOfRange);
    // Above the last: within the gap always (whatever the clock says).
    assert_eq!(judge(Some(u64::MAX - 10), u64::MAX, 0), Apply);
    assert_eq!(judge(Some(100), 100 + IRQ_MAX_GAP, 0), Apply);
    // Further: a new numbering (a model rebuilt) only up to the clock.
    assert_eq!(judge(Some(100), WALL, WALL), Apply);
    assert_eq!(judge(Some(100), u64::MAX, WALL), OutOfRange);
    // At or just below the last: a duplicate.
    assert_eq!(judge(Some(100), 100, WALL), Duplicate);
    assert_eq!(
        judge(Some(1000), 1000 - IRQ_DUP_WINDOW + 1, WALL),
        Duplicate
    );
    // Far below: not a resend, a new numbering (which a forged number
    // ahead may have made look old).
    assert_eq!(judge(Some(1000), 1000 - IRQ_DUP_WINDOW, WALL), Apply);
}

#[test]
fn a_forged_far_number_suppresses_no_real_interrupt() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    let real = WALL - 1_000_000;
    p.on_datagram(&interrupts(MODEL_A, VM, &[real, real + 1]), 0, &mut io);
    // 2^64-1: refused, counted, not acknowledged.
    p.on_datagram(&interrupts(MODEL_A, VM, &[u64::MAX]), 0, &mut io);
    assert_eq!(get(&stats.irq_out_of_range), 1);
    assert_eq!(io.acks.len(), 1);
    p.on_datagram(&interrupts(MODEL_A, VM, &[real + 2]), 0, &mut io);
    assert_eq!(get(&stats.irqs), 3);
    // A forged number ahead that the clock allows is applied (nothing
    // tells it from a restarted model's), but the real ones after it are
    // far below it: a new numbering, applied.
    p.on_datagram(&interrupts(MODEL_A, VM, &[WALL + 5]), 0, &mut io);
    p.on_datagram(&interrupts(MODEL_A, VM, &[real + 3, real + 4]), 0, &mut io);
    assert_eq!(get(&stats.irqs), 6);
    assert_eq!(get(&stats.irq_duplicates), 0);
    // A datagram mixing real and refused numbers is acknowledged up to
    // its highest real one only.
    p.on_datagram(
        &interrupts(MODEL_A, VM, &[real + 5, u64::MAX - 1]),
        0,
        &mut io,
    );
    let Some(Record::Ack(a)) = Datagram::parse(&io.acks.last().unwrap().2)
        .unwrap()
        .records()
        .next()
    else {
        panic!("no ack");
    };
    assert_eq!(a.id.seq, real + 5);
    assert_eq!(get(&stats.irq_out_of_range), 2);
}

#[test]
fn the_clock_is_read_only_for_far_numbers() {
    let (mut p, _) = protocol(1);
    let mut io = Fake::default();
    p.on_datagram(&interrupts(MODEL_A, VM, &[100]), 0, &mut io);
    assert_eq!(io.clock_reads.get(), 1, "the first number");
    p.on_datagram(&interrupts(MODEL_A, VM, &[101, 102, 101]), 0, &mut io);
    assert_eq!(io.clock_reads.get(), 1, "near numbers");
}

#[test]
fn interrupt_streams_are_bounded() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    for model in 0..MAX_IRQ_STREAMS as u32 {
        p.on_datagram(&interrupts(1000 + model, VM, &[1]), 0, &mut io);
    }
    assert_eq!(get(&stats.irqs), MAX_IRQ_STREAMS as u64);
    p.on_datagram(&interrupts(5, VM, &[1]), 0, &mut io);
    assert_eq!(get(&stats.irq_streams_full), 1);
    assert_eq!(get(&stats.irqs), MAX_IRQ_STREAMS as u64);
    // Known streams go on.
    p.on_datagram(&interrupts(1000, VM, &[2]), 0, &mut io);
    assert_eq!(get(&stats.irqs), MAX_IRQ_STREAMS as u64 + 1);
}

#[test]
fn answers_match_by_vm_vcpu_and_sequence() {
    let (mut p, _) = protocol(2);
    let mut io = Fake::default();
    // Both vCPUs use sequence 7 on the same model.
    queue(&mut p, &mut io, 0, 0, &[7]);
    queue(&mut p, &mut io, 1, 0, &[7]);
    p.send_ready(0, 0, &mut io).unwrap();
    p.send_ready(1, 0, &mut io).unwrap();
    p.on_datagram(&answers(MODEL_A, 1, &[7]), 0, &mut io);
    assert_eq!(io.done, vec![(1, 7, Status::Ok as u8, 70)]);
}

#[test]
fn requests_for_no_model_are_rejected_at_once() {
    let (mut p, _) = protocol(1);
    let mut io = Fake::default();
    // Model index 2: the vCPU has two models.
    p.request(0, 3, 2, &request(0, 3), &mut io);
    assert_eq!(io.done, vec![(0, 3, Status::Rejected as u8, 0)]);
    assert!(!p.send_ready(0, 0, &mut io).unwrap());
}

#[test]
fn interrupts_are_applied_once_per_model_and_vm() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    p.on_datagram(&interrupts(MODEL_A, VM, &[5, 6]), 0, &mut io);
    // Resent (its acknowledgement was lost), with one more.
    p.on_datagram(&interrupts(MODEL_A, VM, &[5, 6, 7]), 0, &mut io);
    // An older one arriving late.
    p.on_datagram(&interrupts(MODEL_A, VM, &[4]), 0, &mut io);
    // Another model numbers on its own.
    p.on_datagram(&interrupts(MODEL_B, VM, &[5]), 0, &mut io);
    let lines: Vec<u32> = io.injected.iter().map(|i| i.1).collect();
    assert_eq!(lines, vec![5, 6, 7, 5]);
    assert_eq!(get(&stats.irqs), 4);
    assert_eq!(get(&stats.irq_duplicates), 3);
    // A VM not here: counted, not applied.
    p.on_datagram(&interrupts(MODEL_A, VM + 1, &[1]), 0, &mut io);
    assert_eq!(get(&stats.irqs_unknown_vm), 1);
}

/// Direct mode: the engine's lane and a vCPU's lane both receive on the
/// interrupt socket; whichever reaps a datagram applies it, and a copy
/// reaped by the other (a server's resend) is a duplicate there, not a
/// second injection.
#[test]
fn lanes_sharing_interrupt_numbers_apply_each_once() {
    let (mut engine, es) = protocol(1);
    let (mut vcpu, vs) = protocol(1);
    let seen = IrqSeen::default();
    engine.share_irqs(seen.clone());
    vcpu.share_irqs(seen);
    let mut io = Fake::default();
    vcpu.on_datagram(&interrupts(MODEL_A, VM, &[5]), 0, &mut io);
    engine.on_datagram(&interrupts(MODEL_A, VM, &[5]), 0, &mut io);
    engine.on_datagram(&interrupts(MODEL_A, VM, &[6]), 0, &mut io);
    vcpu.on_datagram(&interrupts(MODEL_A, VM, &[6]), 0, &mut io);
    vcpu.on_datagram(&interrupts(MODEL_A, VM, &[7]), 0, &mut io);
    // (The fake interrupts name line = number.)
    let lines: Vec<u32> = io.injected.iter().map(|i| i.1).collect();
    assert_eq!(lines, vec![5, 6, 7], "one injection per number");
    assert_eq!((get(&vs.irqs), get(&vs.irq_duplicates)), (2, 1));
    assert_eq!((get(&es.irqs), get(&es.irq_duplicates)), (1, 1));
    // Every copy is acknowledged by the lane that reaped it.
    assert_eq!(io.acks.len(), 5);
    // Without sharing, each lane would have applied its copies again.
    let (mut a, _) = protocol(1);
    let (mut b, _) = protocol(1);
    let mut io = Fake::default();
    a.on_datagram(&interrupts(MODEL_A, VM, &[5]), 0, &mut io);
    b.on_datagram(&interrupts(MODEL_A, VM, &[5]), 0, &mut io);
    assert_eq!(io.injected.len(), 2);
}

/// A datagram's interrupts are acknowledged before any is injected (an
/// injection wakes the vCPU, which may take the core before the
/// acknowledgement leaves, and the server holds the model's next
/// interrupt until it comes), each new one injected once, in order.
#[test]
fn interrupts_are_acknowledged_before_they_are_injected() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    p.on_datagram(&interrupts(MODEL_A, VM, &[1, 2, 3]), 0, &mut io);
    assert_eq!(io.order, ["ack", "inject", "inject", "inject"]);
    let lines: Vec<u32> = io.injected.iter().map(|i| i.1).collect();
    assert_eq!(lines, [1, 2, 3]);
    assert_eq!(get(&stats.irqs), 3);
    // A resent copy with one new number: acknowledged, only the new one
    // injected.
    p.on_datagram(&interrupts(MODEL_A, VM, &[3, 4]), 0, &mut io);
    assert_eq!(io.order[4..], ["ack", "inject"]);
    assert_eq!(io.injected.last().map(|i| i.1), Some(4));
    // Nothing to acknowledge (a number out of range): nothing injected.
    let before = io.order.len();
    p.on_datagram(&interrupts(MODEL_A, VM, &[u64::MAX]), 0, &mut io);
    assert_eq!(io.order.len(), before);
    assert_eq!(get(&stats.irq_out_of_range), 1);
}

/// A VM whose state is being snapshotted: its interrupts are neither
/// acknowledged nor injected (the server keeps them and sends them again
/// to wherever the VM runs next); thawed, the server's resent copy is
/// applied once.
#[test]
fn a_frozen_vms_interrupts_are_left_to_the_server() {
    let (mut p, stats) = protocol(1);
    let seen = IrqSeen::default();
    p.share_irqs(seen.clone());
    let mut io = Fake::default();
    p.on_datagram(&interrupts(MODEL_A, VM, &[1]), 0, &mut io);
    seen.lock().unwrap().frozen.insert(VM);
    p.on_datagram(&interrupts(MODEL_A, VM, &[2, 3]), 0, &mut io);
    assert_eq!(io.order, ["ack", "inject"], "nothing taken while frozen");
    assert_eq!(get(&stats.irqs_frozen), 2);
    // Another VM's interrupts are not held up (here: not this client's,
    // acknowledged as before).
    p.on_datagram(&interrupts(MODEL_A, VM + 1, &[1]), 0, &mut io);
    assert_eq!(io.order.len(), 3);
    seen.lock().unwrap().frozen.clear();
    p.on_datagram(&interrupts(MODEL_A, VM, &[2, 3]), 0, &mut io);
    assert_eq!(io.order[3..], ["ack", "inject", "inject"]);
    assert_eq!(get(&stats.irqs), 3);
}

#[test]
fn interrupts_are_acknowledged_up_to_the_highest() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    p.on_datagram(&interrupts(MODEL_B, VM, &[9, 8]), 1, &mut io);
    // A duplicate is acknowledged again: its first acknowledgement may
    // have been lost. So is an interrupt for a VM not here.
    p.on_datagram(&interrupts(MODEL_B, VM, &[9]), 1, &mut io);
    p.on_datagram(&interrupts(MODEL_A, VM + 1, &[3]), 0, &mut io);
    assert_eq!(io.acks.len(), 3);
    let acked: Vec<_> = io
        .acks
        .iter()
        .map(|(sock, server, bytes)| {
            let d = Datagram::parse(bytes).unwrap();
            assert_eq!(d.kind(), Kind::Ack);
            assert_eq!((d.server(), d.client()), (*server, CLIENT));
            let Some(Record::Ack(a)) = d.records().next() else {
                panic!("no ack record");
            };
            (*sock, d.model(), a.id.vm, a.id.seq)
        })
        .collect();
    assert_eq!(
        acked,
        vec![
            (1, MODEL_B, VM, 9),
            (1, MODEL_B, VM, 9),
            (0, MODEL_A, VM + 1, 3)
        ]
    );
    assert_eq!(io.acks[0].1, SERVER);
    assert_eq!(get(&stats.loss_tx), 0);
}

#[test]
fn malformed_datagrams_are_counted() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    p.on_datagram(&[1, 2, 3], 0, &mut io);
    let mut req = vec![0u8; MAX_DATAGRAM];
    let h = Header::new(Kind::Request, MODEL_A, SERVER, CLIENT);
    let n = DatagramWriter::new(&mut req, h).unwrap().finish();
    p.on_datagram(&req[..n], 0, &mut io);
    assert_eq!(get(&stats.malformed), 2);
    assert!(io.done.is_empty() && io.injected.is_empty() && io.acks.is_empty());
}

#[test]
fn total_loss_drops_everything_it_says() {
    let loss = Loss {
        tx_permille: 1000,
        rx_permille: 1000,
        seed: 1,
    };
    let (mut p, stats) = protocol_with(1, loss, HORIZON);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    p.send_ready(0, 0, &mut io).unwrap();
    p.retransmit(RETRANSMIT, &mut io).unwrap();
    assert!(io.sent.is_empty());
    assert!(p.in_flight(), "dropped, still in flight");
    p.on_datagram(&answers(MODEL_A, 0, &[1]), 0, &mut io);
    p.on_datagram(&interrupts(MODEL_A, VM, &[1]), 0, &mut io);
    assert!(io.done.is_empty() && io.injected.is_empty() && io.acks.is_empty());
    assert_eq!(get(&stats.loss_tx), 2);
    assert_eq!(get(&stats.loss_rx), 2);
}

#[test]
fn partial_loss_is_seeded_and_near_its_rate() {
    let run = |seed: u64| {
        let loss = Loss {
            tx_permille: 300,
            rx_permille: 0,
            seed,
        };
        let (mut p, stats) = protocol_with(1, loss, u64::MAX);
        let mut io = Fake::default();
        queue(&mut p, &mut io, 0, 0, &[1]);
        p.send_ready(0, 0, &mut io).unwrap();
        for _ in 1..2000 {
            let due = p.next_due().unwrap();
            p.retransmit(due, &mut io).unwrap();
        }
        assert_eq!(io.sent.len() as u64 + get(&stats.loss_tx), 2000);
        io.sent.len()
    };
    let sent = run(42);
    assert!((1200..1600).contains(&sent), "{sent} of 2000 sent");
    assert_eq!(run(42), sent, "same seed, same drops");
    // No loss configured: nothing dropped.
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    p.send_ready(0, 0, &mut io).unwrap();
    assert_eq!((io.sent.len(), get(&stats.loss_tx)), (1, 0));
}

/// With keys, requests and acknowledgements go out sealed with the
/// current key; answers and interrupts are taken only with a valid tag
/// under the current or the previous key (`bad_tag` otherwise, nothing
/// completed or injected), and the previous key is refused once retired.
#[test]
fn tags_seal_what_is_sent_and_guard_what_is_received() {
    use devplane_wire::tag::{self, KeyRing, TagKey};
    let k1 = TagKey::new(1, [1; 16]);
    let k2 = TagKey::new(2, [2; 16]);
    let seal = |d: Vec<u8>, key: &TagKey| sealed(d, key);
    let (mut p, stats) = protocol(1);
    let mut ring = KeyRing::new(k1.clone());
    ring.rotate(k2.clone());
    p.settings.keys = Some(ring.clone());
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    assert!(p.send_ready(0, 0, &mut io).unwrap());
    let sent = &io.sent[0].1;
    assert_eq!(
        tag::verify(sent, &KeyRing::new(k2.clone())),
        Ok(()),
        "sealed with the current key"
    );
    assert_eq!(seqs(sent), vec![1]);

    // Untagged, wrong key bytes, flipped: dropped and counted.
    let wrong = TagKey::new(2, [9; 16]);
    let mut flipped = seal(answers(MODEL_A, 0, &[1]), &k2);
    let last = flipped.len() - 1;
    flipped[last] ^= 4;
    for bad in [
        answers(MODEL_A, 0, &[1]),
        seal(answers(MODEL_A, 0, &[1]), &wrong),
        flipped,
    ] {
        p.on_datagram(&bad, 0, &mut io);
    }
    p.on_datagram(
        &seal(interrupts(MODEL_A, VM, &[WALL - 10]), &wrong),
        0,
        &mut io,
    );
    assert_eq!(get(&stats.bad_tag), 4);
    assert!(io.done.is_empty() && io.injected.is_empty() && io.acks.is_empty());

    // The previous key is still accepted during the rotation.
    p.on_datagram(&seal(answers(MODEL_A, 0, &[1]), &k1), 0, &mut io);
    assert_eq!(io.done.len(), 1);
    p.on_datagram(
        &seal(interrupts(MODEL_A, VM, &[WALL - 10]), &k2),
        0,
        &mut io,
    );
    assert_eq!(io.injected.len(), 1);
    let ack = &io.acks[0].2;
    assert_eq!(
        tag::verify(ack, &KeyRing::new(k2)),
        Ok(()),
        "acks are sealed"
    );

    // After the grace period, the old key is refused.
    ring.retire();
    p.settings.keys = Some(ring);
    p.on_datagram(&seal(interrupts(MODEL_A, VM, &[WALL - 9]), &k1), 0, &mut io);
    assert_eq!(get(&stats.bad_tag), 5);
    assert_eq!(io.injected.len(), 1);
}

/// A rotation through [`LiveKeys`] reaches a running protocol at its next
/// datagram: new requests are sealed with the new key, and a datagram in
/// flight since before is sealed again with it when it is resent (the old
/// key may be retired before its answer comes). Tags switched on for an
/// untagged client seal the resends too; switched off, they are stripped.
#[test]
fn rotated_keys_reach_sends_and_resends() {
    use devplane_wire::tag::{self, KeyRing, TagKey};
    let k1 = TagKey::new(1, [1; 16]);
    let k2 = TagKey::new(2, [2; 16]);
    let (mut p, _stats) = protocol(1);
    let live = crate::engine::LiveKeys::new(None);
    p.watch_keys(live.clone());
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1]);
    assert!(p.send_ready(0, 0, &mut io).unwrap());
    assert!(!tag::is_tagged(&io.sent[0].1), "untagged before any key");

    live.set(Some(KeyRing::new(k1.clone())));
    p.retransmit(RETRANSMIT, &mut io).unwrap();
    assert_eq!(io.sent.len(), 2);
    assert_eq!(
        tag::verify(&io.sent[1].1, &KeyRing::new(k1.clone())),
        Ok(())
    );
    assert_eq!(seqs(&io.sent[1].1), vec![1], "the same request");

    let mut ring = KeyRing::new(k1.clone());
    ring.rotate(k2.clone());
    live.set(Some(ring));
    p.retransmit(10 * RETRANSMIT, &mut io).unwrap();
    assert_eq!(io.sent.len(), 3);
    assert_eq!(
        tag::verify(&io.sent[2].1, &KeyRing::new(k2.clone())),
        Ok(()),
        "resent under the new key"
    );
    // The answer under the old key is still taken during the grace.
    let old = sealed(answers(MODEL_A, 0, &[1]), &k1);
    p.on_datagram(&old, 0, &mut io);
    assert_eq!(io.done.len(), 1);

    queue(&mut p, &mut io, 0, 0, &[2]);
    assert!(p.send_ready(0, 10 * RETRANSMIT, &mut io).unwrap());
    assert_eq!(tag::verify(&io.sent[3].1, &KeyRing::new(k2)), Ok(()));
    live.set(None);
    p.retransmit(20 * RETRANSMIT, &mut io).unwrap();
    let last = &io.sent.last().unwrap().1;
    assert!(
        !tag::is_tagged(last),
        "keys removed: the resend is untagged"
    );
    assert!(Datagram::parse(last).is_ok());
    assert_eq!(seqs(last), vec![2]);
}

/// An answer datagram of `model` from server `server` (see [`answers`]).
fn answers_from(server: u32, model: u32, vcpu: u16, seqs: &[u64]) -> Vec<u8> {
    let mut d = answers(model, vcpu, seqs);
    let (h, _) = Header::mut_from_prefix(&mut d[..]).unwrap();
    h.server = server.into();
    d
}

/// An interrupt datagram of `model` for [`VM`] from server `server` (see
/// [`interrupts`]).
fn interrupts_from(server: u32, model: u32, seqs: &[u64]) -> Vec<u8> {
    let mut d = interrupts(model, VM, seqs);
    let (h, _) = Header::mut_from_prefix(&mut d[..]).unwrap();
    h.server = server.into();
    d
}

/// Datagram `d` sealed with `key`.
fn sealed(mut d: Vec<u8>, key: &devplane_wire::tag::TagKey) -> Vec<u8> {
    let n = d.len();
    d.resize(n + devplane_wire::TAG_LEN, 0);
    let n = devplane_wire::tag::seal(&mut d, n, key).unwrap();
    d.truncate(n);
    d
}

/// A server a model is retargeted to (socket 1, interrupt port 4343).
const NEW: u32 = 4;

/// One vCPU of VM [`VM`] with [`MODEL_A`] on [`SERVER`] (socket 0,
/// interrupt port 4242), keyed; [`NEW`] is the other server it knows.
fn retarget_rig() -> (Protocol, Arc<EngineStats>, devplane_wire::tag::KeyRing) {
    let models: Arc<[RemoteModel]> = Arc::new([RemoteModel {
        model: MODEL_A,
        server: SERVER,
        socket: 0,
    }]);
    let ring = devplane_wire::tag::KeyRing::new(devplane_wire::tag::TagKey::new(1, [7; 16]));
    let settings = Settings {
        client: CLIENT,
        retransmit_ns: RETRANSMIT,
        retransmit_max_ns: 8 * RETRANSMIT,
        horizon_ns: HORIZON,
        loss: Loss::default(),
        keys: Some(ring.clone()),
    };
    let stats = Arc::new(EngineStats::default());
    let p = Protocol::new(
        settings,
        vec![Peer {
            vm: VM,
            vcpu: 0,
            models,
        }],
        vec![Some(SERVER), Some(NEW)],
        vec![SERVER, NEW],
        vec![4242, 4343],
        stats.clone(),
    );
    (p, stats, ring)
}

#[test]
fn a_retargeted_model_resends_its_datagram_in_flight_to_the_new_server_and_hears_only_it() {
    let (mut p, stats, ring) = retarget_rig();
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[5, 6]);
    p.send_ready(0, 1000, &mut io).unwrap();
    assert_eq!(io.sent.len(), 1);
    // The model moves: the datagram in flight is due at once.
    assert_eq!(p.retarget(MODEL_A, NEW, 1, 1500), 1);
    assert_eq!(p.next_due(), Some(1500));
    assert!(p.retransmit(1500, &mut io).unwrap());
    let (socket, bytes) = &io.sent[1];
    assert_eq!(*socket, 1, "sent on the new server's socket");
    let d = Datagram::parse(bytes).unwrap();
    assert_eq!(
        (d.server(), d.model(), d.irq_port()),
        (NEW, MODEL_A, Some(4343))
    );
    assert_eq!(seqs(bytes), vec![5, 6], "the same records and numbers");
    assert!(
        devplane_wire::tag::verify(bytes, &ring).is_ok(),
        "sealed again over the new header"
    );
    // A late answer from the old server is refused; the new one's taken.
    let seal = |d: Vec<u8>| sealed(d, &ring.current);
    p.on_datagram(&seal(answers_from(SERVER, MODEL_A, 0, &[5, 6])), 0, &mut io);
    assert!(io.done.is_empty());
    assert_eq!(get(&stats.foreign_server), 2, "one per record");
    p.on_datagram(&seal(answers_from(NEW, MODEL_A, 0, &[5, 6])), 1, &mut io);
    assert_eq!(io.done.len(), 2);
    assert!(!p.in_flight());
    // What is queued next goes to the new server.
    queue(&mut p, &mut io, 0, 0, &[7]);
    p.send_ready(0, 2000, &mut io).unwrap();
    assert_eq!(io.sent.last().unwrap().0, 1);
    assert_eq!(
        Datagram::parse(&io.sent.last().unwrap().1)
            .unwrap()
            .server(),
        NEW
    );
}

/// After a retarget the client announces itself to the model's new
/// server: an acknowledgement of nothing (sequence 0) for the VM, from
/// the new server's socket, naming the interrupt port, sealed; at
/// growing gaps (the first may come before the server serves the model),
/// then every steady gap until it hears from that server (below); a
/// second retarget starts over instead of adding a second series. The
/// lane wakes for them (`next_due`).
#[test]
fn a_retarget_is_announced_to_the_new_server_until_heard() {
    let (mut p, stats, ring) = retarget_rig();
    let mut io = Fake::default();
    assert_eq!(p.next_due(), None);
    assert_eq!(p.retarget(MODEL_A, NEW, 1, 1000), 0, "nothing in flight");
    let first = 1000 + HELLO_GAPS_NS[0];
    assert_eq!(p.next_due(), Some(first));
    assert!(!p.announce(first - 1, &mut io));
    assert!(io.acks.is_empty());
    assert!(p.announce(first, &mut io));
    let (socket, server, bytes) = &io.acks[0];
    assert_eq!((*socket, *server), (1, NEW));
    assert!(devplane_wire::tag::verify(bytes, &ring).is_ok(), "sealed");
    let d = Datagram::parse(bytes).unwrap();
    assert_eq!(
        (d.kind(), d.model(), d.server(), d.client(), d.irq_port()),
        (Kind::Ack, MODEL_A, NEW, CLIENT, Some(4343))
    );
    let recs: Vec<Record> = d.records().collect();
    assert!(
        matches!(recs[..], [Record::Ack(a)] if a.id.vm == VM && a.id.seq == 0),
        "{recs:?}"
    );
    // The rest of the series, each at its gap; then nothing.
    let mut now = first;
    for gap in &HELLO_GAPS_NS[1..] {
        assert_eq!(p.next_due(), Some(now + gap));
        assert!(!p.announce(now + gap - 1, &mut io));
        now += gap;
        assert!(p.announce(now, &mut io));
    }
    assert_eq!(io.acks.len(), HELLO_GAPS_NS.len());
    assert_eq!(get(&stats.hellos), HELLO_GAPS_NS.len() as u64);
    // Not heard yet: one every steady gap, as long as it takes.
    for _ in 0..3 {
        assert_eq!(p.next_due(), Some(now + HELLO_STEADY_NS));
        assert!(!p.announce(now + HELLO_STEADY_NS - 1, &mut io));
        now += HELLO_STEADY_NS;
        assert!(p.announce(now, &mut io));
    }
    let sent = HELLO_GAPS_NS.len() + 3;
    assert_eq!(io.acks.len(), sent);
    assert!(io.acks.iter().all(|a| (a.0, a.1) == (1, NEW)));
    let seal = |d: Vec<u8>| sealed(d, &ring.current);
    // An interrupt of another model, or of this model from the old
    // server (taken: sent before the commit), is not the new server
    // hearing: the series goes on.
    let irq_from = |server: u32, model: u32, seq: u64| seal(interrupts_from(server, model, &[seq]));
    let other = irq_from(NEW, MODEL_A + 1, 1);
    let old = irq_from(SERVER, MODEL_A, 1);
    p.on_datagram(&other, 1, &mut io);
    p.on_datagram(&old, 0, &mut io);
    assert_eq!(p.next_due(), Some(now + HELLO_STEADY_NS));
    // An interrupt of the model from the new server: heard, no more.
    let heard = irq_from(NEW, MODEL_A, 2);
    p.on_datagram(&heard, 1, &mut io);
    assert_eq!(io.injected.len(), 3, "all three are taken");
    assert_eq!(p.next_due(), None);
    assert!(!p.announce(u64::MAX - 1, &mut io));
    assert_eq!(io.acks.len(), sent + 3, "all acknowledged, no hello");
    // Two retargets in a row: one series, to the last server.
    p.retarget(MODEL_A, SERVER, 0, now);
    p.retarget(MODEL_A, NEW, 1, now);
    assert!(p.announce(now + HELLO_GAPS_NS[0], &mut io));
    assert_eq!(io.acks.len(), sent + 4);
    assert_eq!(io.acks.last().unwrap().1, NEW);
    // An answer from the new server ends that series too; one from the
    // old server (refused) does not.
    queue(&mut p, &mut io, 0, 0, &[5]);
    p.send_ready(0, now + 1, &mut io).unwrap();
    p.on_datagram(&seal(answers_from(SERVER, MODEL_A, 0, &[5])), 0, &mut io);
    assert!(p.next_due().is_some());
    p.on_datagram(&seal(answers_from(NEW, MODEL_A, 0, &[5])), 1, &mut io);
    assert_eq!(io.done.len(), 1);
    assert_eq!(p.next_due(), None, "answered and heard: nothing due");
}

/// Lanes share what was heard: the interrupt lane (direct mode) reaps
/// the new server's interrupt for a VM, and a vCPU lane announcing that
/// VM to that server stops too; another VM's announcement goes on.
#[test]
fn a_new_server_heard_on_one_lane_ends_the_announcements_of_every_lane() {
    let (mut vcpu, vstats, ring) = retarget_rig();
    let (mut irq_lane, _, _) = retarget_rig();
    let seen = IrqSeen::default();
    vcpu.share_irqs(seen.clone());
    irq_lane.share_irqs(seen);
    let mut io = Fake::default();
    vcpu.retarget(MODEL_A, NEW, 1, 1000);
    let mut now = 1000 + HELLO_GAPS_NS[0];
    assert!(vcpu.announce(now, &mut io));
    assert_eq!(get(&vstats.hellos), 1);
    let d = sealed(interrupts_from(NEW, MODEL_A, &[1]), &ring.current);
    irq_lane.on_datagram(&d, 1, &mut io);
    assert_eq!(io.injected.len(), 1);
    now += HELLO_GAPS_NS[1];
    vcpu.announce(now, &mut io);
    assert_eq!(get(&vstats.hellos), 1, "no announcement after it was heard");
    assert_eq!(vcpu.next_due(), None);
}

/// A `Busy` answer (the model waits on its backing store) completes
/// nothing: the datagram is sent again after a short wait, not a
/// retransmission interval, that doubles per `Busy` send (once per answer
/// datagram, whatever its records) up to that interval; the answers that
/// follow complete each request once.
#[test]
fn a_busy_answer_sends_the_request_again_soon_and_completes_nothing() {
    let (mut p, stats) = protocol(1);
    let mut io = Fake::default();
    queue(&mut p, &mut io, 0, 0, &[1, 2, 3]);
    p.send_ready(0, 1000, &mut io).unwrap();
    assert_eq!(p.next_due(), Some(1000 + RETRANSMIT));
    // 1 applied, 2 busy, 3 busy (after a busy record, the rest wait).
    p.on_datagram(
        &answers_of(
            MODEL_A,
            0,
            &[1, 2, 3],
            &[Status::Ok, Status::Busy, Status::Busy],
        ),
        0,
        &mut io,
    );
    assert_eq!(
        io.done,
        vec![(0, 1, Status::Ok as u8, 10)],
        "busy completed nothing"
    );
    assert_eq!(get(&stats.busy), 2);
    assert_eq!(
        p.next_due(),
        Some(1000 + BUSY_FIRST_NS),
        "one wait per answer datagram"
    );
    assert!(p.retransmit(1000 + BUSY_FIRST_NS, &mut io).unwrap());
    assert_eq!(
        seqs(&io.sent[1].1),
        vec![1, 2, 3],
        "the same datagram again"
    );
    // Busy again: the wait doubles.
    let at = 1000 + BUSY_FIRST_NS;
    p.on_datagram(
        &answers_of(
            MODEL_A,
            0,
            &[1, 2, 3],
            &[Status::Ok, Status::Busy, Status::Busy],
        ),
        0,
        &mut io,
    );
    assert_eq!(p.next_due(), Some(at + 2 * BUSY_FIRST_NS));
    assert!(p.retransmit(at + 2 * BUSY_FIRST_NS, &mut io).unwrap());
    // Applied now: each completes once (1's repeat is a late duplicate).
    p.on_datagram(&answers(MODEL_A, 0, &[1, 2, 3]), 0, &mut io);
    assert_eq!(
        io.done,
        vec![
            (0, 1, Status::Ok as u8, 10),
            (0, 2, Status::Ok as u8, 20),
            (0, 3, Status::Ok as u8, 30)
        ]
    );
    assert!(!p.in_flight());
    assert_eq!(get(&stats.timeouts), 0);
}
