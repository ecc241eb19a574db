//! Changes applied to a running server: models moved, added and removed,
//! VMs suspended, resumed and migrated, the polling loop tuned. Each runs
//! on the thread that owns the [`Server`] and returns once the workers
//! have applied it.

use std::time::Duration;

use devplane_control::config::ModelConfig;
use devplane_devmodels::registry::ModelParams;

use crate::dispatch::{Handover, LendError};
use crate::lifecycle::{self, MoveTicket, WorkerCmd};
use crate::{Server, ServerError, build_dispatchers, socket};

/// How long each step of a live change waits for a worker, by default.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(5);

impl Server {
    /// Moves device model `model` to worker `to` while traffic flows, in
    /// two phases under one [`MoveTicket`]: the old worker lends the model
    /// (snapshot and duplicate windows; it keeps the model aside, not
    /// served), the route is switched, the new worker builds and serves
    /// it, and only then does the old worker drop its copy. If a worker
    /// does not take its step in time, the move is cancelled: the route
    /// goes back and the old worker serves the model again as it was (a
    /// worker that takes its step after the cancellation does nothing).
    /// `Ok` means the new worker serves the model; an error says where it
    /// is served. A request that reaches a worker not serving the model
    /// meanwhile is dropped unanswered, and the client's retransmission
    /// (same sequence numbers) is served by the owner: none is lost, none
    /// applied twice.
    pub fn move_model(&mut self, model: u32, to: usize) -> Result<(), ServerError> {
        let timeout = self.step_timeout;
        let idx = self
            .cfg
            .models
            .iter()
            .position(|m| m.id == model)
            .ok_or_else(|| ServerError::Config(format!("model {model} is not served here")))?;
        let from = self.cfg.models[idx].worker;
        if to >= self.cmds.len() {
            return Err(ServerError::Config(format!(
                "worker {to} does not exist (this server has {})",
                self.cmds.len()
            )));
        }
        if from == to {
            return Ok(());
        }
        let ticket = MoveTicket::new();
        // Phase 1: the old worker lends the model.
        let Some(lent) = self.send_lend(model, from, &ticket, timeout)? else {
            return Err(ServerError::Config(format!(
                "move cancelled: worker {from} did not give model {model} up within \
                 {timeout:?}; it stays on worker {from}"
            )));
        };
        let mut handover = lent.map_err(|e| {
            ServerError::Config(match e {
                LendError::NotHere => format!("worker {from} does not hold model {model}"),
                LendError::WriteBack => format!(
                    "move cancelled: worker {from} {e} (model {model}); it stays on worker {from}"
                ),
            })
        })?;
        handover.params = ModelParams {
            line: self.cfg.models[idx].line,
            backing: self.cfg.models[idx].backing.clone(),
        };
        // Phase 2: the route switches, the new worker takes the model.
        self.cfg.models[idx].worker = to;
        let why = match self.reroute() {
            Err(e) => format!("switching the route failed ({e})"),
            Ok(()) => {
                let (tx, rx) = std::sync::mpsc::channel();
                let sent = self.send(
                    to,
                    WorkerCmd::Take {
                        model,
                        handover: Box::new(handover),
                        ticket: ticket.clone(),
                        reply: tx,
                    },
                );
                match sent.map(|()| rx.recv_timeout(timeout)) {
                    Ok(Ok(Ok(()))) => return self.settle(model, from, false),
                    Ok(Ok(Err(e))) => format!("worker {to} cannot restore model {model}: {e}"),
                    Err(e) => e.to_string(),
                    Ok(Err(_)) => {
                        format!("worker {to} did not take model {model} within {timeout:?}")
                    }
                }
            }
        };
        // The new worker took it just as the wait ended: moved.
        if !ticket.step(MoveTicket::LENT, MoveTicket::CANCELLED) {
            return self.settle(model, from, false);
        }
        self.cfg.models[idx].worker = from;
        self.reroute()?;
        self.settle(model, from, true)?;
        Err(ServerError::Config(format!(
            "move cancelled: {why}; model {model} is served by worker {from} again"
        )))
    }

    /// Ends a move on the old owner `from`: `keep` serves the lent model
    /// there again, otherwise its copy is dropped. Waits for the worker
    /// (it answered the first phase, so it is alive); if it is slow, the
    /// command stays queued and is applied at its next turn.
    fn settle(&mut self, model: u32, from: usize, keep: bool) -> Result<(), ServerError> {
        match self.send_settle(model, from, keep)? {
            Some(true) => Ok(()),
            Some(false) => Err(ServerError::Config(format!(
                "worker {from} had no lent model {model} to settle"
            ))),
            None if keep => Err(ServerError::Config(format!(
                "move cancelled; worker {from} has not taken model {model} back within \
                 {:?} and serves it again once it takes its commands",
                self.step_timeout
            ))),
            // Moved: the old copy is dropped when the old worker gets to it.
            None => Ok(()),
        }
    }

    /// Tells `worker` to lend `model` under `ticket` (keep it aside, not
    /// served, and hand over its state) and waits up to `timeout`: the
    /// worker's answer, or `None` if the wait ended first and cancelled the
    /// ticket (the worker then leaves the model served). Moves between
    /// workers ([`Server::move_model`]) and between servers (`handover`)
    /// both start so.
    pub(crate) fn send_lend(
        &mut self,
        model: u32,
        worker: usize,
        ticket: &MoveTicket,
        timeout: Duration,
    ) -> Result<Option<Result<Handover, LendError>>, ServerError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            worker,
            WorkerCmd::Lend {
                model,
                ticket: ticket.clone(),
                reply: tx,
            },
        )?;
        match rx.recv_timeout(timeout) {
            Ok(lent) => Ok(Some(lent)),
            Err(_) if ticket.step(MoveTicket::PENDING, MoveTicket::CANCELLED) => Ok(None),
            // Lent just as the wait ended: the hand-over is on its way.
            Err(_) => rx.recv().map(Some).map_err(|_| {
                ServerError::Config(format!(
                    "worker {worker} stopped while giving model {model} up"
                ))
            }),
        }
    }

    /// Tells `worker` to settle its lent copy of `model` (`keep`: serve it
    /// again, else drop it) and waits up to the step timeout for its
    /// answer: whether it had the model, or `None` if it has not answered
    /// yet (the command stays queued and is applied at its next turn).
    /// Moves between workers ([`Server::move_model`]) and between servers
    /// (`handover`) both end so.
    pub(crate) fn send_settle(
        &mut self,
        model: u32,
        worker: usize,
        keep: bool,
    ) -> Result<Option<bool>, ServerError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            worker,
            WorkerCmd::Settle {
                model,
                keep,
                reply: tx,
            },
        )?;
        Ok(rx.recv_timeout(self.step_timeout).ok())
    }

    /// How long each step of a live change (model moved, added, removed)
    /// waits for a worker from now on.
    pub fn set_step_timeout(&mut self, t: Duration) {
        self.step_timeout = t;
    }

    /// Test hook: worker `worker` sleeps for `d` at its next command poll,
    /// as a slow or stuck worker would (to time a live change out).
    #[doc(hidden)]
    pub fn stall_worker(&self, worker: usize, d: Duration) -> Result<(), ServerError> {
        self.send(worker, WorkerCmd::Stall(d))
    }

    /// Starts serving a new device model on its worker, then routes its
    /// requests there (XDP route map or socket steering and admission).
    pub fn add_model(&mut self, m: ModelConfig) -> Result<(), ServerError> {
        if m.id == 0 || self.cfg.models.iter().any(|x| x.id == m.id) {
            return Err(ServerError::Config(format!(
                "model {} is already served here (or id 0): remove it first or pick another id",
                m.id
            )));
        }
        if self.staged.contains_key(&m.id) {
            return Err(ServerError::Config(format!(
                "model {} is staged here by a move not committed yet: settle that move \
                 (dpctl models move) or pick another id",
                m.id
            )));
        }
        if m.worker >= self.cmds.len() {
            return Err(ServerError::Config(format!(
                "model {}: worker {} does not exist (this server has {})",
                m.id,
                m.worker,
                self.cmds.len()
            )));
        }
        let mut cfg = self.cfg.clone();
        cfg.models = vec![m.clone()];
        let mut slots = build_dispatchers(&cfg)?;
        let slot = slots[m.worker]
            .remove(m.id)
            .ok_or_else(|| ServerError::Config(format!("model {} was not built", m.id)))?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            m.worker,
            WorkerCmd::Insert {
                model: m.id,
                slot: Box::new(slot),
                reply: tx,
            },
        )?;
        rx.recv_timeout(self.step_timeout).map_err(|_| {
            ServerError::Config(format!("worker {} did not take model {}", m.worker, m.id))
        })?;
        self.cfg.models.push(m.clone());
        if let Some(a) = &self.admission
            && let Ok(mut set) = a.models.write()
        {
            set.insert(m.id);
        }
        self.reroute()
    }

    /// Stops serving a device model: unroutes it, then drops it from its
    /// worker.
    pub fn remove_model(&mut self, model: u32) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        let idx = self
            .cfg
            .models
            .iter()
            .position(|m| m.id == model)
            .ok_or_else(|| ServerError::Config(format!("model {model} is not served here")))?;
        if self.lent_out.contains_key(&model) {
            // Its worker keeps it aside for a move: removed now, a cancel
            // would serve it again unrouted.
            return Err(ServerError::Config(format!(
                "model {model} is lent to a move not settled yet: settle that move (dpctl \
                 models move) before removing it"
            )));
        }
        let m = self.cfg.models.remove(idx);
        self.console
            .model_gone(model, format!("was removed from server {}", self.id));
        if let Some(x) = self.xdp.as_mut() {
            x.maps.remove_route(model)?;
        }
        if let Some(a) = &self.admission
            && let Ok(mut set) = a.models.write()
        {
            set.remove(&model);
        }
        self.reroute()?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(m.worker, WorkerCmd::Release { model, reply: tx })?;
        rx.recv_timeout(self.step_timeout).map_err(|_| {
            ServerError::Config(format!("worker {} did not drop model {model}", m.worker))
        })?;
        Ok(())
    }

    /// Points the data path at the models' current workers.
    pub(crate) fn reroute(&mut self) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        if let Some(x) = self.xdp.as_mut() {
            for m in &self.cfg.models {
                let route = devplane_control::maps::route_entry(&self.cfg, m);
                x.maps.put_route(m.id, route)?;
            }
        }
        if let Some(sock) = &self.steer {
            let routes: Vec<(u32, u32)> = self
                .cfg
                .models
                .iter()
                .map(|m| (m.id, m.worker as u32))
                .collect();
            socket::steer(sock, &routes)?;
        }
        Ok(())
    }

    fn known_vm(&self, vm: u32) -> Result<(), ServerError> {
        if self.cfg.vms.iter().any(|v| v.id == vm) {
            Ok(())
        } else {
            Err(ServerError::Config(format!("VM {vm} is not known here")))
        }
    }

    /// Writes `vm`'s entry (client, hypervisor, `VM_SUSPENDED`) into the
    /// VMs map, in XDP mode.
    pub(crate) fn put_vm_entry(&mut self, vm: u32) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        let Some(v) = self.cfg.vms.iter().find(|v| v.id == vm) else {
            return Err(ServerError::Config(format!("VM {vm} is not known here")));
        };
        let mut entry = devplane_control::maps::vm_entry(v);
        if self.suspended.contains(&vm) {
            entry.flags |= devplane_wire::maps::VM_SUSPENDED;
        }
        if let Some(x) = self.xdp.as_mut() {
            x.maps.put_vm(vm, entry)?;
        }
        Ok(())
    }

    /// Holds the interrupts of `vm` until [`Server::resume_vm`], and marks
    /// it suspended in the VMs map.
    pub fn suspend_vm(&mut self, vm: u32) -> Result<(), ServerError> {
        self.known_vm(vm)?;
        self.broadcast(|| WorkerCmd::SuspendVm(vm))?;
        self.suspended.insert(vm);
        self.put_vm_entry(vm)
    }

    /// Delivers `vm`'s held interrupts, in order, and lets the next ones go.
    pub fn resume_vm(&mut self, vm: u32) -> Result<(), ServerError> {
        self.known_vm(vm)?;
        self.suspended.remove(&vm);
        self.put_vm_entry(vm)?;
        self.broadcast(|| WorkerCmd::ResumeVm(vm))
    }

    /// VMs suspended now.
    pub fn suspended_vms(&self) -> Vec<u32> {
        self.suspended.iter().copied().collect()
    }

    /// Sends `vm`'s interrupts to client platform `client` from now on
    /// (answers follow the requests by themselves).
    pub fn migrate_vm(&mut self, vm: u32, client: u32) -> Result<(), ServerError> {
        if !self.cfg.clients.iter().any(|c| c.id == client) {
            return Err(ServerError::Config(format!(
                "client {client} is not registered on this server"
            )));
        }
        let v = self
            .cfg
            .vms
            .iter_mut()
            .find(|v| v.id == vm)
            .ok_or_else(|| ServerError::Config(format!("VM {vm} is not known here")))?;
        v.client = client;
        self.put_vm_entry(vm)?;
        self.broadcast(|| WorkerCmd::MigrateVm { vm, client })
    }

    /// New polling settings for every worker, applied live.
    pub fn tune(&mut self, t: lifecycle::Tune) -> Result<(), ServerError> {
        self.broadcast(|| WorkerCmd::Tune(t))?;
        self.cfg.tuning.spin_budget = t.spin_budget;
        self.cfg.tuning.idle_sleep_us = t.idle_sleep.as_micros() as u64;
        self.cfg.tuning.batch = t.batch;
        Ok(())
    }

    /// The polling settings in force.
    pub fn tuning(&self) -> lifecycle::Tune {
        lifecycle::Tune {
            spin_budget: self.cfg.tuning.spin_budget,
            idle_sleep: Duration::from_micros(self.cfg.tuning.idle_sleep_us),
            batch: self.cfg.tuning.batch,
        }
    }
}
