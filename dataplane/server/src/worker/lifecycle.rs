//! Changes applied to running workers: moving a device model from one
//! worker to another, suspending, resuming and migrating a VM's interrupts,
//! and tuning the polling loop. The owning thread of a [`crate::Server`]
//! sends [`WorkerCmd`]s; each worker takes them between two batches, so it
//! never needs a lock on its models.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use super::backoff::Backoff;
use super::config::LoopConfig;
use crate::dispatch::{AdoptError, Dispatcher, Handover, ModelSlot};
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
    /// Take model `model` over.
    Adopt {
        /// The model.
        model: u32,
        /// Its state (boxed: it is large beside the other commands).
        handover: Box<Handover>,
        /// The outcome.
        reply: Sender<Result<(), AdoptError>>,
    },
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
    /// New polling settings.
    Tune(Tune),
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
                WorkerCmd::Adopt {
                    model,
                    mut handover,
                    reply,
                } => {
                    let irqs = std::mem::take(&mut handover.irqs);
                    let r = disp.adopt(model, *handover);
                    if r.is_ok() {
                        router.restore(irqs);
                    }
                    let _ = reply.send(r);
                }
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
