//! Applies request datagrams to the device models a worker owns, and turns
//! each request datagram into its response datagram in place.
//!
//! A worker owns its [`Dispatcher`] (and through it its models) alone: no
//! locks. A request datagram and its response have the same length (one
//! 40-byte response record per request record), so the answer is written
//! over the request in the same buffer — a UMEM frame in AF_XDP mode, the
//! receive buffer in socket mode.

use std::collections::{BTreeMap, HashMap};

use devplane_devmodels::{DeviceModel, IrqEvent, Space};
use devplane_wire::record::OP_RESPONSE;
use devplane_wire::{Access, Datagram, Header, Kind, RECORD_LEN, RawRecord, Record, Status};
use zerocopy::FromBytes;
use zerocopy::little_endian::U64;

/// One model as a worker holds it.
pub struct ModelSlot {
    /// The model.
    pub model: Box<dyn DeviceModel>,
    /// Port base: port-I/O offsets are `port - pio_base`.
    pub pio_base: u64,
    /// MMIO base: MMIO offsets are `gpa - mmio_base`.
    pub mmio_base: u64,
    /// The VM its interrupts go to (and its hypervisor), if it raises any.
    pub irq_target: Option<(u32, u32)>,
    /// The sequence number of its last interrupt.
    pub irq_seq: u64,
}

impl ModelSlot {
    /// A slot for `model` at the given bases, without interrupt target.
    pub fn new(model: Box<dyn DeviceModel>, pio_base: u64, mmio_base: u64) -> ModelSlot {
        ModelSlot {
            model,
            pio_base,
            mmio_base,
            irq_target: None,
            irq_seq: devplane_wire::first_seq(),
        }
    }
}

/// A model on its way from one worker to another.
pub struct Handover {
    /// Its kind, to build the new instance.
    pub kind: &'static str,
    /// Its whole state.
    pub snapshot: devplane_devmodels::Snapshot,
    /// Port base.
    pub pio_base: u64,
    /// MMIO base.
    pub mmio_base: u64,
    /// Interrupt target.
    pub irq_target: Option<(u32, u32)>,
    /// Next interrupt sequence number.
    pub irq_seq: u64,
    /// What the new instance is built with before the snapshot is restored
    /// (its backing file, say); the server fills it from the configuration.
    pub params: devplane_devmodels::registry::ModelParams,
    /// Duplicate windows of the old owner.
    windows: HashMap<(u32, u16), SeqWindow>,
    /// Its interrupts the old owner had not had acknowledged (sent or
    /// still queued), oldest first: the new owner sends them (again).
    pub irqs: Vec<PendingIrq>,
}

/// An interrupt a model raised, addressed to its VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingIrq {
    /// The model that raised it.
    pub model: u32,
    /// The VM it is for.
    pub vm: u32,
    /// The VM's hypervisor.
    pub hypervisor: u32,
    /// The line change.
    pub event: IrqEvent,
    /// Per-model interrupt sequence number.
    pub seq: u64,
}

/// What became of a datagram handed to [`Dispatcher::handle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A client acknowledged model `model`'s interrupts up to `seq` (for
    /// the worker's [`super::irq::IrqRouter::ack`]); nothing to send.
    Acked {
        /// The model.
        model: u32,
        /// The highest interrupt sequence number acknowledged.
        seq: u64,
    },
    /// Answered in place: send the buffer's first `len` bytes back.
    Respond {
        /// Records applied.
        records: usize,
        /// The client platform the answer goes to (from the header).
        client: u32,
        /// The VM of its first record (a devplane client puts one vCPU's
        /// requests in a datagram), where that VM's interrupts may go.
        vm: u32,
        /// The UDP port the client takes that VM's interrupts on, at the
        /// address it sent from ([`devplane_wire::header::HDR_IRQ_PORT`]);
        /// `None`: the port it sent from.
        irq_port: Option<u16>,
    },
    /// Consumed without answer (an acknowledgement).
    Consumed,
    /// For a model this worker does not hold (it is being moved): dropped
    /// unanswered and counted, so the client retransmits it, with the same
    /// sequence numbers, to the model's new owner.
    NotHere,
    /// Malformed: dropped and counted; the buffer is unchanged.
    Malformed(devplane_wire::WireError),
}

/// Per-worker dispatch counters (owned by the worker; published by it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchStats {
    /// Request datagrams answered.
    pub datagrams: u64,
    /// Request records applied (or answered with an error status).
    pub records: u64,
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Records for a model this worker does not own.
    pub no_such_model: u64,
    /// Accesses the model refused.
    pub model_errors: u64,
    /// Malformed datagrams dropped.
    pub malformed: u64,
    /// Acknowledgements consumed.
    pub acks: u64,
    /// Retransmitted requests answered again without being re-applied.
    pub duplicates: u64,
    /// Requests older than the duplicate window (answered `Stale`).
    pub stale: u64,
    /// Interrupts raised by models.
    pub irqs_raised: u64,
}

/// Answers a worker keeps per (VM, vCPU) so that a retransmitted request
/// is answered again without being applied twice. A client has at most
/// [`WINDOW`] requests of one vCPU in flight, so a retransmission is always
/// inside the window.
pub const WINDOW: usize = 256;

/// The recent answers of one vCPU at this worker.
#[derive(Debug, Default, Clone)]
pub struct SeqWindow {
    answers: BTreeMap<u64, (Status, u64)>,
}

impl SeqWindow {
    /// `Some(answer)` for a request already applied, `Some(Stale)` for one
    /// older than the window, `None` for a new one.
    fn lookup(&self, seq: u64) -> Option<(Status, u64)> {
        if let Some(a) = self.answers.get(&seq) {
            return Some(*a);
        }
        match self.answers.first_key_value() {
            Some((&oldest, _)) if self.answers.len() >= WINDOW && seq < oldest => {
                Some((Status::Stale, 0))
            }
            _ => None,
        }
    }

    fn remember(&mut self, seq: u64, answer: (Status, u64)) {
        self.answers.insert(seq, answer);
        while self.answers.len() > WINDOW {
            self.answers.pop_first();
        }
    }
}

/// Owns a worker's models and applies requests to them.
pub struct Dispatcher {
    server: u32,
    models: HashMap<u32, ModelSlot>,
    windows: HashMap<(u32, u16), SeqWindow>,
    irqs: Vec<PendingIrq>,
    stats: DispatchStats,
}

impl Dispatcher {
    /// A dispatcher for server `server` with no models.
    pub fn new(server: u32) -> Dispatcher {
        Dispatcher {
            server,
            models: HashMap::new(),
            windows: HashMap::new(),
            irqs: Vec::new(),
            stats: DispatchStats::default(),
        }
    }

    /// Adds (or replaces) model `id`.
    pub fn insert(&mut self, id: u32, slot: ModelSlot) -> Option<ModelSlot> {
        self.models.insert(id, slot)
    }

    /// Removes model `id`, returning it (for a move).
    pub fn remove(&mut self, id: u32) -> Option<ModelSlot> {
        self.models.remove(&id)
    }

    /// Gives model `id` up for a move: its state as a snapshot, its
    /// settings, and a copy of the duplicate windows (so a request it
    /// applied here and that is retransmitted to the new owner is not
    /// applied twice).
    pub fn release(&mut self, id: u32) -> Option<Handover> {
        let slot = self.models.remove(&id)?;
        Some(Handover {
            kind: slot.model.kind(),
            snapshot: slot.model.snapshot(),
            pio_base: slot.pio_base,
            mmio_base: slot.mmio_base,
            irq_target: slot.irq_target,
            irq_seq: slot.irq_seq,
            params: Default::default(),
            windows: self.windows.clone(),
            irqs: Vec::new(),
        })
    }

    /// Takes model `id` over from a [`Handover`]: a new model of the same
    /// kind restored from the snapshot, and the windows merged.
    pub fn adopt(&mut self, id: u32, h: Handover) -> Result<(), String> {
        let mut model = devplane_devmodels::registry::build(h.kind, h.params.clone())
            .map_err(|e| e.to_string())?;
        model.restore(&h.snapshot).map_err(|e| e.to_string())?;
        for (key, w) in h.windows {
            let mine = self.windows.entry(key).or_default();
            for (seq, answer) in w.answers {
                mine.answers.entry(seq).or_insert(answer);
            }
            while mine.answers.len() > WINDOW {
                mine.answers.pop_first();
            }
        }
        self.models.insert(
            id,
            ModelSlot {
                model,
                pio_base: h.pio_base,
                mmio_base: h.mmio_base,
                irq_target: h.irq_target,
                irq_seq: h.irq_seq,
            },
        );
        Ok(())
    }

    /// The model `id`, if owned here.
    pub fn model(&self, id: u32) -> Option<&ModelSlot> {
        self.models.get(&id)
    }

    /// Ids of the models owned here.
    pub fn model_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.models.keys().copied()
    }

    /// Counters so far.
    pub fn stats(&self) -> DispatchStats {
        self.stats
    }

    /// Interrupts raised since the last call, in order.
    pub fn drain_irqs(&mut self) -> std::vec::Drain<'_, PendingIrq> {
        self.irqs.drain(..)
    }

    /// Whether interrupts are waiting to be sent.
    pub fn has_irqs(&self) -> bool {
        !self.irqs.is_empty()
    }

    /// Ticks every model to `now_ns`; returns the earliest next deadline.
    pub fn tick(&mut self, now_ns: u64) -> Option<u64> {
        let mut next: Option<u64> = None;
        let ids: Vec<u32> = self.models.keys().copied().collect();
        for id in ids {
            if let Some(slot) = self.models.get_mut(&id) {
                if let Some(t) = slot.model.tick(now_ns) {
                    next = Some(next.map_or(t, |n| n.min(t)));
                }
                Self::collect_irqs(id, slot, &mut self.irqs, &mut self.stats);
            }
        }
        next
    }

    fn collect_irqs(
        id: u32,
        slot: &mut ModelSlot,
        out: &mut Vec<PendingIrq>,
        stats: &mut DispatchStats,
    ) {
        while let Some(event) = slot.model.take_irq() {
            stats.irqs_raised += 1;
            if let Some((vm, hypervisor)) = slot.irq_target {
                slot.irq_seq += 1;
                out.push(PendingIrq {
                    model: id,
                    vm,
                    hypervisor,
                    event,
                    seq: slot.irq_seq,
                });
            }
        }
    }

    /// Handles one datagram (the whole UDP payload). A request datagram is
    /// applied record by record, in order, and rewritten in place into its
    /// response datagram of the same length.
    pub fn handle(&mut self, payload: &mut [u8]) -> Outcome {
        let (kind, model_id, client, count, irq_port) = match Datagram::parse(payload) {
            Ok(d) => (d.kind(), d.model(), d.client(), d.len(), d.irq_port()),
            Err(e) => {
                self.stats.malformed += 1;
                return Outcome::Malformed(e);
            }
        };
        match kind {
            Kind::Request => {}
            Kind::Ack => {
                self.stats.acks += 1;
                let Ok(d) = Datagram::parse(payload) else {
                    return Outcome::Consumed; // unreachable: parsed above
                };
                let seq = d
                    .records()
                    .filter_map(|r| match r {
                        Record::Ack(a) => Some(a.id.seq),
                        _ => None,
                    })
                    .max();
                return match seq {
                    Some(seq) => Outcome::Acked {
                        model: model_id,
                        seq,
                    },
                    None => Outcome::Consumed,
                };
            }
            Kind::Response | Kind::Interrupt => {
                self.stats.malformed += 1;
                return Outcome::Malformed(devplane_wire::WireError::UnknownKind(kind as u8));
            }
        }
        if !self.models.contains_key(&model_id) {
            self.stats.no_such_model += count as u64;
            return Outcome::NotHere;
        }
        let mut slot = self.models.get_mut(&model_id);
        let mut first_vm = 0;
        for i in 0..count {
            let off = devplane_wire::HEADER_LEN + i * RECORD_LEN;
            let rec = &mut payload[off..off + RECORD_LEN];
            let Ok(raw) = RawRecord::mut_from_bytes(rec) else {
                continue; // unreachable: parse checked the length
            };
            let Ok(Record::Request(req)) = raw.decode(i, Kind::Request) else {
                continue; // unreachable: parse validated every record
            };
            if i == 0 {
                first_vm = req.id.vm;
            }
            let window = self.windows.entry((req.id.vm, req.id.vcpu)).or_default();
            let (status, data) = match (window.lookup(req.id.seq), slot.as_deref_mut()) {
                (Some(answer), _) => {
                    if answer.0 == Status::Stale {
                        self.stats.stale += 1;
                    } else {
                        self.stats.duplicates += 1;
                    }
                    answer
                }
                (None, None) => {
                    self.stats.no_such_model += 1;
                    (Status::NoSuchModel, 0)
                }
                (None, Some(slot)) => {
                    let r = apply(slot, &req.access, &mut self.stats);
                    Self::collect_irqs(model_id, slot, &mut self.irqs, &mut self.stats);
                    window.remember(req.id.seq, r);
                    r
                }
            };
            raw.op = OP_RESPONSE;
            raw.flags = 0;
            raw.status = status as u8;
            raw.data = U64::new(if status == Status::Ok { data } else { 0 });
            self.stats.records += 1;
        }
        let Ok((hdr, _)) = Header::mut_from_prefix(payload) else {
            return Outcome::Consumed; // unreachable: parse checked the length
        };
        hdr.kind = Kind::Response as u8;
        hdr.server = self.server.into();
        // A response has no header flags (the interrupt port is a request's).
        hdr.flags = 0.into();
        hdr.reserved = 0.into();
        self.stats.datagrams += 1;
        Outcome::Respond {
            records: count,
            client,
            vm: first_vm,
            irq_port,
        }
    }
}

fn apply(slot: &mut ModelSlot, access: &Access, stats: &mut DispatchStats) -> (Status, u64) {
    let result = match *access {
        Access::PioIn { port, size } => {
            stats.reads += 1;
            slot.model
                .read(Space::Pio, (port as u64).wrapping_sub(slot.pio_base), size)
        }
        Access::PioOut { port, size, data } => {
            stats.writes += 1;
            slot.model
                .write(
                    Space::Pio,
                    (port as u64).wrapping_sub(slot.pio_base),
                    size,
                    data as u64,
                )
                .map(|()| 0)
        }
        Access::MmioRead { gpa, size } => {
            stats.reads += 1;
            slot.model
                .read(Space::Mmio, gpa.wrapping_sub(slot.mmio_base), size)
        }
        Access::MmioWrite { gpa, size, data } => {
            stats.writes += 1;
            slot.model
                .write(Space::Mmio, gpa.wrapping_sub(slot.mmio_base), size, data)
                .map(|()| 0)
        }
    };
    match result {
        // A model must not return bits beyond the access size; mask so the
        // response always parses.
        Ok(v) => (Status::Ok, v & access.size().mask()),
        Err(e) => {
            stats.model_errors += 1;
            (e.status(), 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_devmodels::counter::Counter;
    use devplane_wire::{AccessSize, Request, RequestId, datagram};

    fn req(seq: u64, access: Access) -> Record {
        Record::Request(Request {
            id: RequestId {
                vm: 3,
                hypervisor: 2,
                vcpu: 1,
                seq,
            },
            access,
            flags: 0,
        })
    }

    fn encode(model: u32, recs: &[Record]) -> Vec<u8> {
        let mut buf = vec![0u8; devplane_wire::MAX_DATAGRAM];
        let n = datagram::encode(&mut buf, Header::new(Kind::Request, model, 9, 7), recs).unwrap();
        buf.truncate(n);
        buf
    }

    fn dispatcher() -> Dispatcher {
        let mut d = Dispatcher::new(1);
        let mut slot = ModelSlot::new(Box::new(Counter::new(5)), 0x100, 0xd000_0000);
        slot.irq_target = Some((3, 2));
        d.insert(42, slot);
        d
    }

    #[test]
    fn applies_in_order_and_answers_in_place() {
        let mut d = dispatcher();
        let w = Access::PioOut {
            port: 0x100,
            size: AccessSize::B1,
            data: 5,
        };
        let r = Access::PioIn {
            port: 0x100,
            size: AccessSize::B4,
        };
        let mr = Access::MmioRead {
            gpa: 0xd000_0008,
            size: AccessSize::B8,
        };
        let mut buf = encode(42, &[req(1, w), req(2, w), req(3, r), req(4, mr)]);
        let len = buf.len();
        assert_eq!(
            d.handle(&mut buf),
            Outcome::Respond {
                records: 4,
                client: 7,
                vm: 3,
                irq_port: None
            }
        );
        assert_eq!(buf.len(), len);
        let rsp = Datagram::parse(&buf).unwrap();
        assert_eq!(rsp.kind(), Kind::Response);
        assert_eq!((rsp.model(), rsp.server(), rsp.client()), (42, 1, 7));
        let got: Vec<(u64, Status, u64)> = rsp
            .records()
            .map(|r| match r {
                Record::Response(r) => (r.id.seq, r.status, r.data),
                other => panic!("{other:?}"),
            })
            .collect();
        // The read after two writes sees both; the MMIO read sees the sum.
        assert_eq!(
            got,
            vec![
                (1, Status::Ok, 0),
                (2, Status::Ok, 0),
                (3, Status::Ok, 2),
                (4, Status::Ok, 10)
            ]
        );
        let s = d.stats();
        assert_eq!((s.datagrams, s.records, s.reads, s.writes), (1, 4, 2, 2));
    }

    #[test]
    fn unknown_model_and_model_errors_get_statuses() {
        let mut d = dispatcher();
        let r = Access::PioIn {
            port: 0x103,
            size: AccessSize::B1,
        };
        let mut buf = encode(42, &[req(1, r)]);
        d.handle(&mut buf);
        match Datagram::parse(&buf).unwrap().records().next() {
            Some(Record::Response(r)) => assert_eq!(r.status, Status::Unmapped),
            other => panic!("{other:?}"),
        }
        let mut buf = encode(43, &[req(2, r)]);
        assert_eq!(d.handle(&mut buf), Outcome::NotHere, "not answered");
        assert_eq!(d.stats().no_such_model, 1);
        assert_eq!(d.stats().model_errors, 1);
    }

    #[test]
    fn malformed_is_counted_and_left_alone() {
        let mut d = dispatcher();
        let w = Access::PioOut {
            port: 0x100,
            size: AccessSize::B1,
            data: 5,
        };
        let mut buf = encode(42, &[req(1, w)]);
        buf[devplane_wire::HEADER_LEN + 1] = 3; // size 3
        let before = buf.clone();
        assert!(matches!(d.handle(&mut buf), Outcome::Malformed(_)));
        assert_eq!(buf, before);
        assert_eq!(d.stats().malformed, 1);
        assert_eq!(
            d.stats().writes,
            0,
            "a malformed datagram reached the model"
        );
        // A response datagram sent to a server is malformed for it.
        let mut ok = encode(42, &[req(1, w)]);
        d.handle(&mut ok);
        assert!(matches!(d.handle(&mut ok), Outcome::Malformed(_)));
    }

    #[test]
    fn a_retransmitted_write_is_applied_once_and_answered_again() {
        let mut d = dispatcher();
        let w = Access::PioOut {
            port: 0x100,
            size: AccessSize::B1,
            data: 5,
        };
        let r = Access::PioIn {
            port: 0x100,
            size: AccessSize::B4,
        };
        let first = encode(42, &[req(1, w), req(2, r)]);
        let mut a = first.clone();
        d.handle(&mut a);
        let mut b = first.clone();
        d.handle(&mut b);
        assert_eq!(a, b, "the repeat got a different answer");
        let mut c = encode(42, &[req(3, r)]);
        d.handle(&mut c);
        match Datagram::parse(&c).unwrap().records().next() {
            Some(Record::Response(r)) => assert_eq!(r.data, 1, "write applied twice"),
            other => panic!("{other:?}"),
        }
        assert_eq!(d.stats().duplicates, 2);
        // Push seq 1 out of the window: a repeat of it is now stale.
        for seq in 4..(WINDOW as u64 + 10) {
            let mut x = encode(42, &[req(seq, r)]);
            d.handle(&mut x);
        }
        let mut old = encode(42, &[req(1, w)]);
        d.handle(&mut old);
        match Datagram::parse(&old).unwrap().records().next() {
            Some(Record::Response(r)) => assert_eq!(r.status, Status::Stale),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            d.model(42).unwrap().model.snapshot().data[..8],
            1u64.to_le_bytes()
        );
    }

    #[test]
    fn a_moved_model_keeps_its_state_and_windows() {
        let mut a = dispatcher();
        let mut b = Dispatcher::new(1);
        let w = Access::PioOut {
            port: 0x100,
            size: AccessSize::B1,
            data: 5,
        };
        let r = Access::PioIn {
            port: 0x100,
            size: AccessSize::B4,
        };
        let mut first = encode(42, &[req(1, w), req(2, w)]);
        a.handle(&mut first);
        let h = a.release(42).expect("owned");
        assert!(a.model(42).is_none());
        let mut lost = encode(42, &[req(3, w)]);
        assert_eq!(a.handle(&mut lost), Outcome::NotHere);
        b.adopt(42, h).unwrap();
        // The repeat of seq 2 (answer lost during the move) is not applied
        // again; seq 3 is new.
        let mut again = encode(42, &[req(2, w), req(3, w), req(4, r)]);
        b.handle(&mut again);
        let data: Vec<u64> = Datagram::parse(&again)
            .unwrap()
            .records()
            .map(|r| match r {
                Record::Response(r) => r.data,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(data, vec![0, 0, 3], "writes: 1, 2 before the move, 3 after");
        assert_eq!(b.stats().duplicates, 1);
        assert_eq!(b.model(42).unwrap().irq_target, Some((3, 2)));
    }

    #[test]
    fn interrupts_are_addressed_to_the_models_vm() {
        let mut d = dispatcher();
        let raise = Access::PioOut {
            port: 0x110,
            size: AccessSize::B1,
            data: 2,
        };
        let mut buf = encode(42, &[req(1, raise)]);
        d.handle(&mut buf);
        let irqs: Vec<PendingIrq> = d.drain_irqs().collect();
        assert_eq!(irqs.len(), 2);
        assert_eq!(
            (irqs[0].vm, irqs[0].hypervisor, irqs[0].event.line),
            (3, 2, 5)
        );
        // Numbered on from where the model started (the wall clock when it
        // was built, above any predecessor's), one by one.
        let start = d.model(42).unwrap().irq_seq - 2;
        assert!(
            start >= devplane_wire::first_seq() - 60_000_000_000,
            "a recent start"
        );
        assert_eq!((irqs[0].seq, irqs[1].seq), (start + 1, start + 2));
        assert!(!d.has_irqs());
    }

    /// An acknowledgement names the model and the highest interrupt it
    /// covers; nothing is sent back.
    #[test]
    fn acknowledgements_are_handed_to_the_router() {
        let mut d = dispatcher();
        let ack = |seq| {
            Record::Ack(devplane_wire::Ack {
                id: RequestId {
                    vm: 3,
                    hypervisor: 2,
                    vcpu: 0,
                    seq,
                },
            })
        };
        let mut buf = vec![0u8; 256];
        let n = devplane_wire::datagram::encode(
            &mut buf,
            Header::new(Kind::Ack, 42, 1, 7),
            &[ack(5), ack(9), ack(7)],
        )
        .unwrap();
        assert_eq!(
            d.handle(&mut buf[..n]),
            Outcome::Acked { model: 42, seq: 9 }
        );
        assert_eq!(d.stats().acks, 1);
    }
}
