//! Changes applied to running workers: moving a device model from one
//! worker to another, suspending, resuming and migrating a VM's interrupts,
//! and tuning the polling loop. The owning thread of a [`crate::Server`]
//! sends [`WorkerCmd`]s; each worker takes them between two batches, so it
//! never needs a lock on its models.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use super::backoff::Backoff;
use super::config::LoopConfig;
use crate::dispatch::{AdoptError, Dispatcher, Handover, LendError, ModelSlot, PendingIrq, Staged};
use crate::irq::IrqRouter;

/// The polling settings that can change while a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tune {
    /// Empty polls before sleeping.
    pub spin_budget: u32,
    /// Longest sleep when idle.
    pub idle_sleep: Duration,
    /// Frames per poll at most (at least 1).
    pub batch: u32,
}

/// The state of one model move, shared by the server's owning thread and
/// the two workers, so that exactly one of "moved" and "cancelled" happens
/// whatever the timing: each step is a compare-and-swap from the state the
/// step before left, and the owning thread cancels (on a timeout) with a
/// compare-and-swap too. A worker that takes its command after the move
/// was cancelled does nothing.
#[derive(Debug, Clone, Default)]
pub struct MoveTicket(Arc<AtomicU8>);

impl MoveTicket {
    /// Created; the old owner has not given the model up.
    pub const PENDING: u8 = 0;
    /// The old owner lent it (kept aside, not served).
    pub const LENT: u8 = 1;
    /// The new owner serves it.
    pub const ADOPTED: u8 = 2;
    /// Cancelled: the old owner keeps (or takes back) the model.
    pub const CANCELLED: u8 = 3;

    /// A new move.
    pub fn new() -> MoveTicket {
        MoveTicket::default()
    }

    /// Moves from `from` to `to`; `false` if the state was not `from`.
    pub fn step(&self, from: u8, to: u8) -> bool {
        self.0
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The state now.
    pub fn state(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

/// A command to one worker.
pub enum WorkerCmd {
    /// Give model `model` up; the reply carries its state (or `None` if the
    /// worker does not hold it).
    Release {
        /// The model.
        model: u32,
        /// Where the hand-over goes.
        reply: Sender<Option<Handover>>,
    },
    /// First phase of a move: unless `ticket` was cancelled, set it to
    /// [`MoveTicket::LENT`], keep model `model` aside (not served) and
    /// reply with its state, or why it was not lent (the move is then
    /// cancelled and the model stays served here).
    Lend {
        /// The model.
        model: u32,
        /// The move.
        ticket: MoveTicket,
        /// Where the hand-over goes.
        reply: Sender<Result<Handover, LendError>>,
    },
    /// Second phase: build model `model` from `handover`, then, unless
    /// `ticket` was cancelled meanwhile, set it to
    /// [`MoveTicket::ADOPTED`] and serve the model.
    Take {
        /// The model.
        model: u32,
        /// Its state (boxed: it is large beside the other commands).
        handover: Box<Handover>,
        /// The move.
        ticket: MoveTicket,
        /// The outcome.
        reply: Sender<Result<(), AdoptError>>,
    },
    /// Ends a move on the old owner: `keep` serves lent model `model` here
    /// again (the move was cancelled), otherwise it is dropped. The reply
    /// says whether a lent model `model` was there.
    Settle {
        /// The model.
        model: u32,
        /// Serve it here again.
        keep: bool,
        /// Sent once applied.
        reply: Sender<bool>,
    },
    /// The commit of a move from another server: unless `ticket` was
    /// cancelled (the commit timed out), set it to
    /// [`MoveTicket::ADOPTED`], serve `staged` as model `model` and queue
    /// its unacknowledged interrupts `irqs`. The reply says whether it did.
    Install {
        /// The model.
        model: u32,
        /// It, built and restored.
        staged: Box<Staged>,
        /// Its interrupts the old server had not had acknowledged.
        irqs: Vec<PendingIrq>,
        /// The commit.
        ticket: MoveTicket,
        /// Whether it serves the model now.
        reply: Sender<bool>,
    },
    /// Test hook: the worker sleeps this long in its next command poll (a
    /// slow or stuck worker, to time a move out).
    #[doc(hidden)]
    Stall(Duration),
    /// Serve a new model (added live).
    Insert {
        /// The model.
        model: u32,
        /// It, with its bases and interrupt target.
        slot: Box<ModelSlot>,
        /// Sent once it is in place.
        reply: Sender<()>,
    },
    /// Hold the VM's interrupts.
    SuspendVm(u32),
    /// Deliver the VM's held interrupts, in order, and the next ones.
    ResumeVm(u32),
    /// Send the VM's interrupts to another client platform.
    MigrateVm {
        /// The VM.
        vm: u32,
        /// Its new client platform.
        client: u32,
    },
    /// The VM is gone (removed from the store): refuse its requests, drop
    /// its interrupts.
    ForgetVm(u32),
    /// New polling settings.
    Tune(Tune),
    /// Verify `client`'s datagram tags with these keys from now on
    /// (`None`: it sends untagged datagrams).
    SetKeys {
        /// The client platform.
        client: u32,
        /// Its keys (during a rotation, the new and the previous).
        keys: Option<devplane_wire::tag::KeyRing>,
    },
    /// Answered once every command sent before it is applied.
    Barrier(Sender<()>),
}

/// A worker's side of the control path.
pub struct WorkerCtl {
    /// Set to stop the worker.
    pub stop: Arc<AtomicBool>,
    /// Commands from the server's owning thread.
    pub cmds: Receiver<WorkerCmd>,
}

impl WorkerCtl {
    /// Applies pending commands; returns `false` once the worker must stop.
    /// Cheap when there is nothing to do (one atomic load and an empty
    /// channel poll).
    pub fn poll(
        &self,
        disp: &mut Dispatcher,
        router: &mut IrqRouter,
        cfg: &mut LoopConfig,
        backoff: &mut Backoff,
    ) -> bool {
        while let Ok(cmd) = self.cmds.try_recv() {
            match cmd {
                WorkerCmd::Release { model, reply } => {
                    // The model's unacknowledged interrupts go with it.
                    let h = disp.release(model).map(|mut h| {
                        h.irqs = router.take_model(model);
                        h
                    });
                    let _ = reply.send(h);
                }
                WorkerCmd::Lend {
                    model,
                    ticket,
                    reply,
                } => {
                    if disp.model(model).is_none() {
                        let _ = reply.send(Err(LendError::NotHere));
                    } else if ticket.step(MoveTicket::PENDING, MoveTicket::LENT) {
                        // The model's unacknowledged interrupts go with it
                        // (and come back if the move is cancelled).
                        let irqs = router.take_model(model);
                        let r = disp.lend(model, &irqs);
                        if r.is_err() {
                            router.restore(irqs);
                            ticket.step(MoveTicket::LENT, MoveTicket::CANCELLED);
                        }
                        let _ = reply.send(r);
                    }
                }
                WorkerCmd::Take {
                    model,
                    mut handover,
                    ticket,
                    reply,
                } => {
                    let irqs = std::mem::take(&mut handover.irqs);
                    let r = Dispatcher::stage(*handover).and_then(|staged| {
                        if ticket.step(MoveTicket::LENT, MoveTicket::ADOPTED) {
                            disp.install(model, staged);
                            router.restore(irqs);
                            Ok(())
                        } else {
                            Err(AdoptError::Cancelled)
                        }
                    });
                    let _ = reply.send(r);
                }
                WorkerCmd::Settle { model, keep, reply } => {
                    let found = match disp.settle(model, keep) {
                        Some(irqs) => {
                            if keep {
                                router.restore(irqs);
                            }
                            true
                        }
                        None => false,
                    };
                    let _ = reply.send(found);
                }
                WorkerCmd::Install {
                    model,
                    staged,
                    irqs,
                    ticket,
                    reply,
                } => {
                    let ok = ticket.step(MoveTicket::LENT, MoveTicket::ADOPTED);
                    if ok {
                        disp.install(model, *staged);
                        router.restore(irqs);
                    }
                    let _ = reply.send(ok);
                }
                WorkerCmd::Stall(d) => std::thread::sleep(d),
                WorkerCmd::Insert { model, slot, reply } => {
                    disp.insert(model, *slot);
                    let _ = reply.send(());
                }
                WorkerCmd::SuspendVm(vm) => router.suspend(vm),
                WorkerCmd::ResumeVm(vm) => router.resume(vm),
                WorkerCmd::MigrateVm { vm, client } => {
                    disp.migrate(vm, client);
                    router.migrate(vm, client);
                }
                WorkerCmd::ForgetVm(vm) => {
                    disp.forget(vm);
                    router.forget(vm);
                }
                WorkerCmd::SetKeys { client, keys } => match keys {
                    Some(k) => disp.set_keys(client, k),
                    None => disp.clear_keys(client),
                },
                WorkerCmd::Barrier(reply) => {
                    let _ = reply.send(());
                }
                WorkerCmd::Tune(t) => {
                    cfg.spin_budget = t.spin_budget;
                    cfg.idle_sleep = t.idle_sleep;
                    cfg.batch = t.batch.max(1);
                    *backoff = Backoff::new(t.spin_budget, t.idle_sleep);
                }
            }
        }
        !self.stop.load(Ordering::Relaxed)
    }
}
