//! Changes applied to a running server: models moved, added and removed,
//! VMs suspended, resumed and migrated, the polling loop tuned. Each runs
//! on the thread that owns the [`Server`] and returns once the workers
//! have applied it.

use std::time::Duration;

use devplane_control::config::ModelConfig;
use devplane_devmodels::registry::ModelParams;

use crate::lifecycle::{self, WorkerCmd};
use crate::{Server, ServerError, build_dispatchers, socket};

impl Server {
    /// Moves device model `model` to worker `to` while traffic flows: the
    /// old worker gives it up (snapshot and duplicate windows), the route
    /// is switched, the new worker restores it. A request that reaches a
    /// worker not holding the model meanwhile is dropped unanswered, and
    /// the client's retransmission (same sequence numbers) is served by
    /// the new owner: none is lost, none applied twice.
    pub fn move_model(&mut self, model: u32, to: usize) -> Result<(), ServerError> {
        let timeout = Duration::from_secs(5);
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
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(from, WorkerCmd::Release { model, reply: tx })?;
        let mut handover = rx
            .recv_timeout(timeout)
            .map_err(|_| {
                ServerError::Config(format!("worker {from} did not release model {model}"))
            })?
            .ok_or_else(|| {
                ServerError::Config(format!("worker {from} does not hold model {model}"))
            })?;
        handover.params = ModelParams {
            line: self.cfg.models[idx].line,
            backing: self.cfg.models[idx].backing.clone(),
        };
        self.cfg.models[idx].worker = to;
        self.reroute()?;
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            to,
            WorkerCmd::Adopt {
                model,
                handover: Box::new(handover),
                reply: tx,
            },
        )?;
        rx.recv_timeout(timeout)
            .map_err(|_| ServerError::Config(format!("worker {to} did not adopt model {model}")))?
            .map_err(|e| {
                ServerError::Config(format!("worker {to} cannot restore model {model}: {e}"))
            })
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
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| {
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
        let m = self.cfg.models.remove(idx);
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
        rx.recv_timeout(Duration::from_secs(5)).map_err(|_| {
            ServerError::Config(format!("worker {} did not drop model {model}", m.worker))
        })?;
        Ok(())
    }

    /// Points the data path at the models' current workers.
    fn reroute(&mut self) -> Result<(), ServerError> {
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
    fn put_vm_entry(&mut self, vm: u32) -> Result<(), ServerError> {
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
