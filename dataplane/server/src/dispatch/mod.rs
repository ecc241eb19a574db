//! Applies request datagrams to the device models a worker owns, and turns
//! each request datagram into its response datagram in place.
//!
//! A worker owns its [`Dispatcher`] (and through it its models) alone: no
//! locks. A request datagram and its response have the same length (one
//! 40-byte response record per request record), so the answer is written
//! over the request in the same buffer — a UMEM frame in AF_XDP mode, the
//! receive buffer in socket mode.

use std::collections::HashMap;

use devplane_devmodels::{DeviceModel, IrqEvent, Space};
use devplane_wire::record::OP_RESPONSE;
use devplane_wire::tag::{self, KeyRing};
use devplane_wire::{Access, Datagram, Header, Kind, RECORD_LEN, RawRecord, Record, Status};
use zerocopy::FromBytes;
use zerocopy::little_endian::U64;

mod window;
pub use window::{MAX_VCPU_WINDOWS, MAX_WINDOWS, Seen, SeqWindow, WINDOW, Windows};

/// Which client platform each VM belongs to (the identifier database's
/// `vms`), and whether requests are checked against it.
#[derive(Debug, Clone, Default)]
pub struct Owners {
    /// VM id -> client id.
    pub by_vm: HashMap<u32, u32>,
    /// Check ownership (`server.check_clients`); without it every request
    /// is taken as its header says.
    pub check: bool,
}

impl Owners {
    /// Whether `client` may name `vm`.
    pub fn allows(&self, client: u32, vm: u32) -> bool {
        !self.check || self.by_vm.get(&vm) == Some(&client)
    }
}

/// Why a model handed over from another worker could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// A new instance of its kind could not be built.
    #[error("building a new {kind}: {source}")]
    Build {
        /// The model's kind.
        kind: &'static str,
        /// Why.
        source: devplane_devmodels::registry::BuildError,
    },
    /// Its snapshot did not restore.
    #[error("restoring its snapshot: {0}")]
    Restore(#[from] devplane_devmodels::SnapshotError),
    /// The move was cancelled (it timed out) before this worker took the
    /// model: it stays with its old owner.
    #[error("the move was cancelled (timed out) before this worker took it")]
    Cancelled,
}

/// Why a worker did not lend a model for a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LendError {
    /// It does not hold the model.
    #[error("does not hold the model")]
    NotHere,
    /// The model could not write its backing-store state back.
    #[error("could not write the model's state back to its backing store")]
    WriteBack,
}

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

/// The wall clock in nanoseconds since the Unix epoch: where clients'
/// request numbers and models' interrupt numbers start
/// ([`devplane_wire::first_seq`]).
fn wall_clock_ns() -> u64 {
    devplane_wire::first_seq()
}

/// How far ahead of this server's clock a client's clock may be.
const CLOCK_SKEW_NS: u64 = 600_000_000_000;

/// The highest sequence number a client can have reached (see
/// [`Seen::FarAhead`]).
pub(crate) fn reachable() -> u64 {
    wall_clock_ns().saturating_add(CLOCK_SKEW_NS)
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
    windows: Windows,
    /// Its interrupts the old owner had not had acknowledged (sent or
    /// still queued), oldest first: the new owner sends them (again).
    pub irqs: Vec<PendingIrq>,
}

/// Why a [`devplane_control::proto::ModelHandover`] from another server
/// cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandoverError {
    /// A kind this build does not know.
    #[error("unknown device-model kind {0:?}")]
    Kind(String),
    /// A status byte that is not one.
    #[error("window answer with status byte {0}, which is none")]
    Status(u8),
    /// An interrupt action byte that is not one.
    #[error("interrupt with action byte {0}, which is none")]
    Action(u8),
}

impl Handover {
    /// The duplicate windows it carries.
    pub fn windows(&self) -> &Windows {
        &self.windows
    }

    /// See [`Windows::trim`].
    pub fn trim_windows(
        &mut self,
        owned: impl Fn(u32, u32) -> bool,
        ceiling: u64,
    ) -> (usize, usize) {
        self.windows.trim(owned, ceiling)
    }

    /// The hand-over as it travels to another server (model `model`'s).
    pub fn to_wire(&self, model: u32) -> devplane_control::proto::ModelHandover {
        use devplane_control::proto::{HandedIrq, HandedWindow};
        devplane_control::proto::ModelHandover {
            kind: self.kind.to_string(),
            snapshot_version: self.snapshot.version,
            snapshot: self.snapshot.data.clone(),
            pio_base: self.pio_base,
            mmio_base: self.mmio_base,
            irq_target: self.irq_target,
            irq_seq: self.irq_seq,
            windows: self
                .windows
                .export()
                .into_iter()
                .map(|((client, vm, vcpu), answers)| HandedWindow {
                    client,
                    vm,
                    vcpu,
                    answers: answers
                        .into_iter()
                        .map(|(seq, st, d)| (seq, st as u8, d))
                        .collect(),
                })
                .collect(),
            irqs: self
                .irqs
                .iter()
                .filter(|i| i.model == model)
                .map(|i| HandedIrq {
                    vm: i.vm,
                    hypervisor: i.hypervisor,
                    line: i.event.line,
                    action: i.event.action as u8,
                    seq: i.seq,
                })
                .collect(),
        }
    }

    /// A hand-over from another server, for model `model` (its `params`
    /// left for the server to fill from the configuration).
    pub fn from_wire(
        model: u32,
        w: devplane_control::proto::ModelHandover,
    ) -> Result<Handover, HandoverError> {
        let kind = devplane_devmodels::registry::KINDS
            .iter()
            .copied()
            .find(|k| *k == w.kind)
            .ok_or_else(|| HandoverError::Kind(w.kind.clone()))?;
        let mut windows = Vec::with_capacity(w.windows.len());
        for hw in w.windows {
            let mut answers = Vec::with_capacity(hw.answers.len().min(WINDOW));
            for (seq, st, d) in hw.answers {
                // A window never holds `Busy` (nothing was applied): one
                // that says so is not a window this code wrote.
                let st = Status::from_u8(st)
                    .filter(|s| *s != Status::Busy)
                    .ok_or(HandoverError::Status(st))?;
                answers.push((seq, st, d));
            }
            windows.push(((hw.client, hw.vm, hw.vcpu), answers));
        }
        let mut irqs = Vec::with_capacity(w.irqs.len());
        for i in w.irqs {
            let action = devplane_wire::IrqAction::from_u8(i.action)
                .ok_or(HandoverError::Action(i.action))?;
            irqs.push(PendingIrq {
                model,
                vm: i.vm,
                hypervisor: i.hypervisor,
                event: IrqEvent {
                    line: i.line,
                    action,
                },
                seq: i.seq,
            });
        }
        Ok(Handover {
            kind,
            snapshot: devplane_devmodels::Snapshot {
                kind: kind.to_string(),
                version: w.snapshot_version,
                data: w.snapshot,
            },
            pio_base: w.pio_base,
            mmio_base: w.mmio_base,
            irq_target: w.irq_target,
            irq_seq: w.irq_seq,
            params: Default::default(),
            windows: Windows::import(windows),
            irqs,
        })
    }
}

/// A handed-over model built and restored, not served yet.
pub struct Staged {
    slot: ModelSlot,
    windows: Windows,
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
        /// The client that acknowledged.
        client: u32,
        /// The VM the model's interrupts go to, when the acknowledgement
        /// is its client's announcement to a model's new server (every
        /// record sequence 0 for that VM; ownership checked, or not
        /// checked at all): where it came from (and the port it names)
        /// is where that VM's interrupts may go, if nothing is known yet.
        vm: Option<u32>,
        /// The interrupt port it names ([`devplane_wire::header::HDR_IRQ_PORT`]).
        irq_port: Option<u16>,
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
        /// Some record was new (applied now), not only duplicates: the
        /// sender's address may be learned for the VM's interrupts (a
        /// replayed datagram is all duplicates).
        fresh: bool,
    },
    /// Consumed without answer (an acknowledgement).
    Consumed,
    /// A block request taken by the bulk engine ([`crate::bulk`]); its
    /// answers come later ([`Dispatcher::poll_bulk`]) and go to where
    /// `vm` of `client` sent it from.
    Bulk {
        /// The client.
        client: u32,
        /// Its VM.
        vm: u32,
    },
    /// For a model this worker does not hold (it is being moved): dropped
    /// unanswered and counted, so the client retransmits it, with the same
    /// sequence numbers, to the model's new owner.
    NotHere,
    /// Malformed: dropped and counted; the buffer is unchanged.
    Malformed(devplane_wire::WireError),
    /// Its tag is missing (from a client that has a key), names a key
    /// this server does not accept, or does not match: dropped unanswered
    /// and counted, nothing applied.
    BadTag,
    /// A record names a VM that is not the header's client's (or an
    /// acknowledgement comes from another client than that of the VM the
    /// model interrupts): dropped unanswered and counted.
    Foreign,
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
    /// Datagrams naming a VM of another client (or acknowledging another
    /// client's interrupts), dropped.
    pub foreign_vm: u64,
    /// Requests more than the window beyond it (answered `Stale`, not
    /// applied, not adopted).
    pub far_ahead: u64,
    /// Requests refused because a window limit was hit (answered `Stale`).
    pub window_limit: u64,
    /// Requests answered `Busy` (not applied: their model waits on its
    /// backing store, or an earlier record of their datagram did).
    pub busy: u64,
    /// Interrupts raised by models.
    pub irqs_raised: u64,
    /// Datagrams whose tag was missing, of an unknown key or wrong
    /// ([`Outcome::BadTag`]).
    pub bad_tag: u64,
}

/// One client's tag keys as a worker holds them.
#[derive(Debug, Clone)]
struct ClientKeys {
    ring: KeyRing,
    /// The id of the key its last verified datagram was sealed with.
    heard: u8,
}

/// Owns a worker's models and applies requests to them.
pub struct Dispatcher {
    server: u32,
    models: HashMap<u32, ModelSlot>,
    /// Models lent to another worker by a move not yet settled
    /// ([`Dispatcher::lend`]), with their unacknowledged interrupts: not
    /// served, kept to be taken back if the move is cancelled.
    lent: HashMap<u32, (ModelSlot, Vec<PendingIrq>)>,
    windows: Windows,
    owners: Owners,
    /// Client id -> the keys its datagrams' tags are accepted with. A
    /// client with keys must tag every datagram; one without sends
    /// untagged datagrams only.
    keys: HashMap<u32, ClientKeys>,
    irqs: Vec<PendingIrq>,
    stats: DispatchStats,
    bulk: crate::bulk::BulkEngine,
}

impl Dispatcher {
    /// A dispatcher for server `server` with no models.
    pub fn new(server: u32) -> Dispatcher {
        Dispatcher {
            server,
            models: HashMap::new(),
            lent: HashMap::new(),
            windows: Windows::default(),
            owners: Owners::default(),
            keys: HashMap::new(),
            irqs: Vec::new(),
            stats: DispatchStats::default(),
            bulk: crate::bulk::BulkEngine::new(server),
        }
    }

    /// The bulk engine (its queued answers and counters).
    pub fn bulk(&mut self) -> &mut crate::bulk::BulkEngine {
        &mut self.bulk
    }

    /// Collects block-request completions and queues their answers
    /// (once per turn of the worker's loop).
    pub fn poll_bulk(&mut self) {
        let keys = &self.keys;
        let key_of = |client: u32| {
            let k = keys.get(&client)?;
            Some(k.ring.get(k.heard).unwrap_or(&k.ring.current))
        };
        self.bulk.poll(&mut self.models, &key_of);
    }

    /// A block-request datagram: parsed, tag verified, its VM checked
    /// against its client, then handed to the bulk engine.
    fn handle_bulk(&mut self, payload: &[u8]) -> Outcome {
        let d = match devplane_wire::bulk::Bulk::parse(payload) {
            Ok(d) if d.request => d,
            _ => {
                self.stats.malformed += 1;
                return Outcome::Malformed(devplane_wire::WireError::UnknownKind(
                    payload[devplane_wire::header::OFF_KIND],
                ));
            }
        };
        let (client, vm) = (d.client(), d.vm());
        if !self.tag_ok(client, d.key_id(), payload) {
            self.stats.bad_tag += 1;
            return Outcome::BadTag;
        }
        if !self.owners.allows(client, vm) {
            self.stats.foreign_vm += 1;
            return Outcome::Foreign;
        }
        if !self.models.contains_key(&d.model()) {
            self.stats.no_such_model += 1;
            return Outcome::NotHere;
        }
        let key = self
            .keys
            .get(&client)
            .map(|k| k.ring.get(k.heard).unwrap_or(&k.ring.current));
        self.bulk.handle(&d, &mut self.models, key);
        Outcome::Bulk { client, vm }
    }

    /// Checks requests against `owners` from now on.
    pub fn set_owners(&mut self, owners: Owners) {
        self.owners = owners;
    }

    /// Verifies the tags of `client`'s datagrams with `keys` from now on
    /// (a rotation: the ring holds the new key and the previous one).
    pub fn set_keys(&mut self, client: u32, keys: KeyRing) {
        let heard = self.keys.get(&client).map_or(keys.current.id, |k| k.heard);
        self.keys.insert(client, ClientKeys { ring: keys, heard });
    }

    /// `client` sends untagged datagrams from now on (its keys removed).
    pub fn clear_keys(&mut self, client: u32) {
        self.keys.remove(&client);
    }

    /// The keys `client`'s datagrams are verified with.
    pub fn keys(&self, client: u32) -> Option<&KeyRing> {
        self.keys.get(&client).map(|k| &k.ring)
    }

    /// The key `client`'s interrupts are sealed with: the one its last
    /// verified datagram was sealed with while the ring still holds it
    /// (during a rotation the client may not have the new key yet), else
    /// the current one.
    pub fn irq_key(&self, client: u32) -> Option<&tag::TagKey> {
        let k = self.keys.get(&client)?;
        Some(k.ring.get(k.heard).unwrap_or(&k.ring.current))
    }

    /// Whether the datagram `payload` (parsed, from `client`) carries
    /// the tag `client`'s keys require; remembers the key it was sealed
    /// with.
    fn tag_ok(&mut self, client: u32, key_id: Option<u8>, payload: &[u8]) -> bool {
        match (self.keys.get_mut(&client), key_id) {
            (Some(k), Some(id)) => {
                let ok = tag::verify(payload, &k.ring).is_ok();
                if ok {
                    k.heard = id;
                }
                ok
            }
            (Some(_), None) => false,
            (None, id) => id.is_none(),
        }
    }

    /// `vm` belongs to `client` from now on.
    pub fn migrate(&mut self, vm: u32, client: u32) {
        self.owners.by_vm.insert(vm, client);
    }

    /// VM `vm` is gone: with ownership checked, no client may name it.
    pub fn forget(&mut self, vm: u32) {
        self.owners.by_vm.remove(&vm);
    }

    /// How many duplicate windows this worker keeps.
    pub fn window_count(&self) -> usize {
        self.windows.len()
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

    /// First phase of a move: like [`Dispatcher::release`], but the model
    /// is kept aside, not served, until the move is settled
    /// ([`Dispatcher::settle`]). `irqs` are its unacknowledged interrupts
    /// (taken from the router), kept to be restored if it comes back.
    /// The model first writes its backing-store state back
    /// ([`DeviceModel::write_back`]), so neither copy holds dirty state
    /// that dropping it could write over newer data; if that fails it is
    /// not lent (and stays served).
    pub fn lend(&mut self, id: u32, irqs: &[PendingIrq]) -> Result<Handover, LendError> {
        let slot = self.models.get_mut(&id).ok_or(LendError::NotHere)?;
        if !slot.model.write_back() {
            return Err(LendError::WriteBack);
        }
        let Some(slot) = self.models.remove(&id) else {
            return Err(LendError::NotHere);
        };
        let h = Handover {
            kind: slot.model.kind(),
            snapshot: slot.model.snapshot(),
            pio_base: slot.pio_base,
            mmio_base: slot.mmio_base,
            irq_target: slot.irq_target,
            irq_seq: slot.irq_seq,
            params: Default::default(),
            windows: self.windows.clone(),
            irqs: irqs.to_vec(),
        };
        self.lent.insert(id, (slot, irqs.to_vec()));
        Ok(h)
    }

    /// Ends a move of lent model `id`: `keep` (the move was cancelled)
    /// serves it here again, as it was, and returns its unacknowledged
    /// interrupts for the router; otherwise it is dropped (its new owner
    /// serves it). `None` if no model `id` is lent.
    pub fn settle(&mut self, id: u32, keep: bool) -> Option<Vec<PendingIrq>> {
        let (slot, irqs) = self.lent.remove(&id)?;
        if keep {
            self.models.insert(id, slot);
        }
        Some(irqs)
    }

    /// Ids of the models lent by moves not yet settled.
    pub fn lent_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.lent.keys().copied()
    }

    /// Takes model `id` over from a [`Handover`]: a new model of the same
    /// kind restored from the snapshot, and the windows merged.
    pub fn adopt(&mut self, id: u32, h: Handover) -> Result<(), AdoptError> {
        let staged = Dispatcher::stage(h)?;
        self.install(id, staged);
        Ok(())
    }

    /// Builds the model a [`Handover`] carries, without serving it yet
    /// (see [`Dispatcher::install`]).
    pub fn stage(h: Handover) -> Result<Staged, AdoptError> {
        let mut model =
            devplane_devmodels::registry::build(h.kind, h.params.clone()).map_err(|source| {
                AdoptError::Build {
                    kind: h.kind,
                    source,
                }
            })?;
        model.restore(&h.snapshot)?;
        Ok(Staged {
            slot: ModelSlot {
                model,
                pio_base: h.pio_base,
                mmio_base: h.mmio_base,
                irq_target: h.irq_target,
                irq_seq: h.irq_seq,
            },
            windows: h.windows,
        })
    }

    /// Serves a model built by [`Dispatcher::stage`] as `id`, its windows
    /// merged into this worker's.
    pub fn install(&mut self, id: u32, staged: Staged) {
        self.windows.merge(staged.windows);
        self.models.insert(id, staged.slot);
    }

    /// Serves a console tap ([`crate::console::Tap::service`]) if this
    /// worker owns its model: the model's output into the tap, typed input
    /// into the model, and the interrupts that raised queued as any other.
    pub fn service_console(&mut self, tap: &crate::console::Tap, scratch: &mut Vec<u8>) {
        let Some(slot) = self.models.get_mut(&tap.model) else {
            return;
        };
        let Some(port) = slot.model.console() else {
            return;
        };
        if tap.service(port, scratch) {
            Dispatcher::collect_irqs(tap.model, slot, &mut self.irqs, &mut self.stats);
        }
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
        if devplane_wire::bulk::is_bulk(payload) {
            return self.handle_bulk(payload);
        }
        let d = match Datagram::parse(payload) {
            Ok(d) => d,
            Err(e) => {
                self.stats.malformed += 1;
                return Outcome::Malformed(e);
            }
        };
        let (model_id, client, count, irq_port) = (d.model(), d.client(), d.len(), d.irq_port());
        let key_id = d.key_id();
        let tagged = key_id.is_some();
        if !self.tag_ok(client, key_id, payload) {
            self.stats.bad_tag += 1;
            return Outcome::BadTag;
        }
        match d.kind() {
            Kind::Request => {}
            Kind::Ack => return self.acknowledged(&d),
            kind @ (Kind::Response | Kind::Interrupt) => {
                self.stats.malformed += 1;
                return Outcome::Malformed(devplane_wire::WireError::UnknownKind(kind as u8));
            }
        }
        if !d
            .raw_records()
            .iter()
            .all(|r| self.owners.allows(client, r.vm.get()))
        {
            self.stats.foreign_vm += 1;
            return Outcome::Foreign;
        }
        let Some(slot) = self.models.get_mut(&model_id) else {
            self.stats.no_such_model += count as u64;
            return Outcome::NotHere;
        };
        let mut first_vm = 0;
        let mut work = Apply {
            model_id,
            client,
            slot,
            windows: &mut self.windows,
            irqs: &mut self.irqs,
            stats: &mut self.stats,
            fresh: false,
            busy: false,
        };
        for i in 0..count {
            let off = devplane_wire::HEADER_LEN + i * RECORD_LEN;
            let Ok(raw) = RawRecord::mut_from_bytes(&mut payload[off..off + RECORD_LEN]) else {
                continue; // unreachable: parse checked the length
            };
            if let Some(vm) = work.record(i, raw)
                && i == 0
            {
                first_vm = vm;
            }
        }
        let fresh = work.fresh;
        self.answer_header(payload);
        if tagged && let Some(k) = self.keys.get(&client) {
            // The answer is sealed with the key its request was.
            let _ = tag::reseal(payload, &k.ring);
        }
        Outcome::Respond {
            records: count,
            client,
            vm: first_vm,
            irq_port,
            fresh,
        }
    }

    /// An acknowledgement: the highest interrupt number it covers.
    /// Honoured only from the client of the VM the model's interrupts go
    /// to (when ownership is checked).
    fn acknowledged(&mut self, d: &Datagram<'_>) -> Outcome {
        let target = self
            .models
            .get(&d.model())
            .and_then(|m| m.irq_target)
            .map(|(vm, _)| vm);
        let owner_ok = target.is_some_and(|vm| self.owners.allows(d.client(), vm));
        if self.owners.check && !owner_ok {
            self.stats.foreign_vm += 1;
            return Outcome::Foreign;
        }
        self.stats.acks += 1;
        // An announcement: every record an acknowledgement of nothing
        // (sequence 0, which no interrupt has) for the VM the model
        // interrupts. Only those say where the VM's interrupts go: an
        // ordinary acknowledgement may come from another process of the
        // same client (one that got an interrupt meant for a VM it does
        // not run), and a replayed one from anywhere the client's address
        // can be spoofed from.
        let announces = target.is_some_and(|vm| {
            d.records()
                .all(|r| matches!(r, Record::Ack(a) if a.id.seq == 0 && a.id.vm == vm))
        });
        let seq = d
            .records()
            .filter_map(|r| match r {
                Record::Ack(a) => Some(a.id.seq),
                _ => None,
            })
            .max();
        match seq {
            Some(seq) => Outcome::Acked {
                model: d.model(),
                seq,
                client: d.client(),
                vm: if announces { target } else { None },
                irq_port: d.irq_port(),
            },
            None => Outcome::Consumed,
        }
    }

    /// Turns a request header into its response's.
    fn answer_header(&mut self, payload: &mut [u8]) {
        let Ok((hdr, _)) = Header::mut_from_prefix(payload) else {
            return; // unreachable: parse checked the length
        };
        hdr.kind = Kind::Response as u8;
        hdr.server = self.server.into();
        // A response keeps only the tag flag and key id (the interrupt
        // port is a request's).
        let keep = devplane_wire::header::HDR_TAG | (0xff << devplane_wire::header::KEY_ID_SHIFT);
        let flags = hdr.flags.get();
        hdr.flags = if flags & devplane_wire::header::HDR_TAG != 0 {
            flags & keep
        } else {
            0
        }
        .into();
        hdr.reserved = 0.into();
        self.stats.datagrams += 1;
    }
}

/// What applying one datagram's records needs of a [`Dispatcher`].
struct Apply<'a> {
    model_id: u32,
    client: u32,
    slot: &'a mut ModelSlot,
    windows: &'a mut Windows,
    irqs: &'a mut Vec<PendingIrq>,
    stats: &'a mut DispatchStats,
    /// A record was new.
    fresh: bool,
    /// A record was answered `Busy`: the later ones are not applied.
    busy: bool,
}

impl Apply<'_> {
    /// Applies request record `i` (unless its window already answered it)
    /// and rewrites it into its response; returns its VM.
    fn record(&mut self, i: usize, raw: &mut RawRecord) -> Option<u32> {
        let Ok(Record::Request(req)) = raw.decode(i, Kind::Request) else {
            return None; // unreachable: parse validated every record
        };
        let (status, data) = match self.windows.get((self.client, req.id.vm, req.id.vcpu)) {
            None => {
                self.stats.window_limit += 1;
                (Status::Stale, 0)
            }
            Some(window) => match window.lookup(req.id.seq, reachable) {
                Seen::Answered(s, d) => {
                    self.stats.duplicates += 1;
                    (s, d)
                }
                Seen::Stale => {
                    self.stats.stale += 1;
                    (Status::Stale, 0)
                }
                Seen::FarAhead => {
                    self.stats.far_ahead += 1;
                    (Status::Stale, 0)
                }
                // After a `Busy` record, the datagram's later ones wait
                // too: the model must see one vCPU's accesses in order.
                Seen::New if self.busy => {
                    self.stats.busy += 1;
                    (Status::Busy, 0)
                }
                Seen::New => {
                    let r = apply(self.slot, &req.access, self.stats);
                    Dispatcher::collect_irqs(self.model_id, self.slot, self.irqs, self.stats);
                    if r.0 == Status::Busy {
                        // Nothing applied, nothing remembered: the
                        // client sends it again.
                        self.busy = true;
                        self.stats.busy += 1;
                    } else {
                        self.fresh = true;
                        window.remember(req.id.seq, r);
                    }
                    r
                }
            },
        };
        raw.op = OP_RESPONSE;
        raw.flags = 0;
        raw.status = status as u8;
        raw.data = U64::new(if status == Status::Ok { data } else { 0 });
        self.stats.records += 1;
        Some(req.id.vm)
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
        // Not refused: not applied yet (counted as `busy` by the caller).
        Err(e @ devplane_devmodels::DeviceError::Busy { .. }) => (e.status(), 0),
        Err(e) => {
            stats.model_errors += 1;
            (e.status(), 0)
        }
    }
}

#[cfg(test)]
mod tests;
