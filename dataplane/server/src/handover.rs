//! A device model moved to another server: this server's side of the
//! two-phase hand-over (`devplane_control::handover` decides the steps).
//! As the source it lends the model (kept aside, not served) and later
//! drops it ([`Server::release_lent`]) or serves it again
//! ([`Server::take_back`]); as the target it builds the model from the
//! hand-over without serving it ([`Server::stage_in`]), then serves it
//! ([`Server::commit_in`]) or drops it ([`Server::discard_staged`]).
//! Each answer is definite: a worker that does not take its step in time
//! has its step cancelled (a compare-and-swap on a [`MoveTicket`]) and
//! does nothing when it gets to it.

use std::collections::HashMap;

use devplane_control::config::ModelConfig;
use devplane_control::proto::{MAX_HANDOVER_BYTES, MAX_HANDOVER_MODELS, ModelHandover};

use crate::dispatch::{Dispatcher, Handover, LendError, PendingIrq, Staged};
use crate::lifecycle::{MoveTicket, WorkerCmd};
use crate::{Server, ServerError};

/// A model handed over by another server, built, not served yet.
pub(crate) struct StagedIn {
    cfg: ModelConfig,
    staged: Staged,
    irqs: Vec<PendingIrq>,
}

/// What a target says of a model when asked to drop its staged copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StagedFate {
    /// Dropped (or never staged): it was never served here.
    Gone,
    /// Served here already (its move committed).
    Serving,
}

fn cfg_err(s: String) -> ServerError {
    ServerError::Config(s)
}

/// Makes a hand-over from another server safe to take here, whatever it
/// says: the model's interrupts go where this server's configuration
/// sends them (`cfg.vm` and its hypervisor in `vms`), not where the
/// hand-over says; its unacknowledged interrupts must be that VM's and at
/// most [`crate::irq::MAX_HELD`] (refused otherwise); duplicate windows of
/// a VM that is not its client's here are dropped, and so are answers
/// numbered at or above `ceiling` (see [`crate::dispatch::Windows::trim`]):
/// a hand-over cannot make another tenant's requests `Stale` or
/// pre-answered. Returns (windows dropped, answers dropped).
pub(crate) fn vet(
    vms: &[devplane_control::config::VmConfig],
    cfg: &ModelConfig,
    h: &mut Handover,
    ceiling: u64,
) -> Result<(usize, usize), String> {
    let target = cfg
        .vm
        .and_then(|vm| vms.iter().find(|v| v.id == vm).map(|v| (vm, v.hypervisor)));
    if h.irqs.len() > crate::irq::MAX_HELD {
        return Err(format!(
            "{} unacknowledged interrupts, more than the {} a server holds",
            h.irqs.len(),
            crate::irq::MAX_HELD
        ));
    }
    for i in &mut h.irqs {
        match target {
            Some((vm, hv)) if i.vm == vm => i.hypervisor = hv,
            _ => {
                return Err(format!(
                    "an interrupt for VM {}, but the model's interrupts go to {}",
                    i.vm,
                    target.map_or("no VM".to_string(), |(vm, _)| format!("VM {vm}"))
                ));
            }
        }
    }
    h.irq_target = target;
    Ok(h.trim_windows(
        |client, vm| vms.iter().any(|v| v.id == vm && v.client == client),
        ceiling,
    ))
}

/// Appends `part` to model `model`'s pieces in `parts`, within the
/// bounds: [`MAX_HANDOVER_BYTES`] of every model's pieces together and
/// [`MAX_HANDOVER_MODELS`] models with pieces at once (empty pieces are
/// refused: they would cost an entry each and no byte). A piece past a
/// bound is refused and that model's pieces dropped.
fn add_part(
    parts: &mut HashMap<u32, String>,
    model: u32,
    part: &str,
    max_bytes: usize,
) -> Result<(), String> {
    if part.is_empty() {
        return Err(format!("an empty piece of the hand-over of model {model}"));
    }
    if !parts.contains_key(&model) && parts.len() >= MAX_HANDOVER_MODELS {
        return Err(format!(
            "hand-overs of {MAX_HANDOVER_MODELS} models are being received already, the most \
             at once (models {:?}): finish or discard them first",
            parts.keys().collect::<Vec<_>>()
        ));
    }
    let total: usize = parts.values().map(String::len).sum();
    if total + part.len() > max_bytes {
        let mine = parts.remove(&model).map_or(0, |p| p.len());
        return Err(format!(
            "hand-over pieces held would pass {max_bytes} bytes (model {model}'s: \
             {mine}, every model's: {total}): model {model}'s pieces are dropped"
        ));
    }
    parts.entry(model).or_default().push_str(part);
    Ok(())
}

impl Server {
    /// First step of a move to another server: the model's worker keeps it
    /// aside, not served (requests for it are dropped unanswered, and
    /// clients retransmit them), and hands over its snapshot, this worker's
    /// duplicate windows and its unacknowledged interrupts, with its
    /// configuration (for the target). If the worker does not take the
    /// step within the step timeout, the step is cancelled and the model
    /// stays served here (an error says so).
    pub fn lend_out(&mut self, model: u32) -> Result<(ModelConfig, Handover), ServerError> {
        self.lend_out_to(model, None)
    }

    /// [`Server::lend_out`], remembering that the model goes to server
    /// `to` (told with [`Server::placement`], so that a move left
    /// unfinished is settled with its own target).
    pub fn lend_out_to(
        &mut self,
        model: u32,
        to: Option<u32>,
    ) -> Result<(ModelConfig, Handover), ServerError> {
        let timeout = self.step_timeout;
        let m = self
            .cfg
            .models
            .iter()
            .find(|m| m.id == model)
            .cloned()
            .ok_or_else(|| cfg_err(format!("model {model} is not served here")))?;
        if self.lent_out.contains_key(&model) {
            return Err(cfg_err(format!("model {model} is lent already")));
        }
        let ticket = MoveTicket::new();
        let Some(lent) = self.send_lend(model, m.worker, &ticket, timeout)? else {
            return Err(cfg_err(format!(
                "worker {} did not give model {model} up within {timeout:?}; it stays \
                 served here",
                m.worker
            )));
        };
        let mut h = lent.map_err(|e| {
            cfg_err(match e {
                LendError::NotHere => format!("worker {} does not hold model {model}", m.worker),
                LendError::WriteBack => format!("worker {} {e}; it stays served here", m.worker),
            })
        })?;
        h.params = devplane_devmodels::registry::ModelParams {
            line: m.line,
            backing: m.backing.clone(),
        };
        self.lent_out
            .insert(model, (m.worker, to, std::time::Instant::now()));
        Ok((m, h))
    }

    /// Undo of [`Server::lend_out`]: the worker serves the model again as
    /// it was. `Ok(false)`: nothing was lent (it serves anyway).
    pub fn take_back(&mut self, model: u32) -> Result<bool, ServerError> {
        let Some(&(worker, _, _)) = self.lent_out.get(&model) else {
            return Ok(false);
        };
        self.settle_lent(model, worker, true)?;
        self.lent_out.remove(&model);
        Ok(true)
    }

    /// Last step of a move on the source (the target serves the model):
    /// drops the lent copy and the model's route and configuration here.
    pub fn release_lent(&mut self, model: u32) -> Result<(), ServerError> {
        use devplane_control::maps::MapWriter;
        let Some(&(worker, _, _)) = self.lent_out.get(&model) else {
            return Err(cfg_err(format!("model {model} is not lent from here")));
        };
        self.settle_lent(model, worker, false)?;
        let to = self.lent_to(model);
        self.lent_out.remove(&model);
        self.cfg.models.retain(|m| m.id != model);
        self.console.model_gone(
            model,
            to.map_or("moved to another server".into(), |t| {
                format!("moved to server {t}: attach there")
            }),
        );
        if let Some(x) = self.xdp.as_mut() {
            x.maps.remove_route(model)?;
        }
        if let Some(a) = &self.admission
            && let Ok(mut set) = a.models.write()
        {
            set.remove(&model);
        }
        self.reroute()
    }

    fn settle_lent(&mut self, model: u32, worker: usize, keep: bool) -> Result<(), ServerError> {
        match self.send_settle(model, worker, keep)? {
            Some(true) => Ok(()),
            Some(false) => Err(cfg_err(format!(
                "worker {worker} had no lent model {model}"
            ))),
            // Queued: the worker applies it at its next turn (a lent copy
            // is never served meanwhile).
            None => Err(cfg_err(format!(
                "worker {worker} has not settled model {model} within {:?}; it does at its \
                 next turn",
                self.step_timeout
            ))),
        }
    }

    /// Second step of a move, on the target: builds model `cfg.id` from
    /// `handover` (restored from its snapshot, with the source's duplicate
    /// windows and unacknowledged interrupts) for worker `cfg.worker`, and
    /// keeps it until [`Server::commit_in`] serves it. Nothing is served
    /// or routed yet.
    pub fn stage_in(
        &mut self,
        cfg: ModelConfig,
        mut handover: Handover,
    ) -> Result<(), ServerError> {
        if self.cfg.models.iter().any(|m| m.id == cfg.id) || self.staged.contains_key(&cfg.id) {
            return Err(cfg_err(format!(
                "model {} is served or staged here already",
                cfg.id
            )));
        }
        if cfg.worker >= self.cmds.len() {
            return Err(cfg_err(format!(
                "worker {} does not exist (this server has {})",
                cfg.worker,
                self.cmds.len()
            )));
        }
        if let Some(vm) = cfg.vm
            && !self.cfg.vms.iter().any(|v| v.id == vm)
        {
            return Err(cfg_err(format!(
                "VM {vm} of model {} is not known here",
                cfg.id
            )));
        }
        let (windows, answers) = vet(
            &self.cfg.vms,
            &cfg,
            &mut handover,
            crate::dispatch::reachable(),
        )
        .map_err(|e| cfg_err(format!("hand-over of model {}: {e}", cfg.id)))?;
        if windows + answers > 0 {
            eprintln!(
                "devplane: server {}: hand-over of model {}: dropped {windows} duplicate \
                 window(s) of VMs not their client's here and {answers} answer(s) numbered \
                 beyond any client's reach",
                self.id, cfg.id
            );
        }
        handover.params = devplane_devmodels::registry::ModelParams {
            line: cfg.line,
            backing: cfg.backing.clone(),
        };
        let irqs = std::mem::take(&mut handover.irqs);
        let staged =
            Dispatcher::stage(handover).map_err(|e| cfg_err(format!("model {}: {e}", cfg.id)))?;
        self.staged.insert(cfg.id, StagedIn { cfg, staged, irqs });
        Ok(())
    }

    /// The commit of a move, on the target: the worker serves the staged
    /// model (its windows merged, its interrupts queued), then it is
    /// routed here. If the worker does not take it within the step timeout
    /// the commit is cancelled (it never serves it) and an error says so.
    pub fn commit_in(&mut self, model: u32) -> Result<(), ServerError> {
        let s = self
            .staged
            .remove(&model)
            .ok_or_else(|| cfg_err(format!("model {model} is not staged here")))?;
        let worker = s.cfg.worker;
        // Staged is "lent" from this side's point of view: the worker
        // installs only if the ticket still says so.
        let ticket = MoveTicket::new();
        ticket.step(MoveTicket::PENDING, MoveTicket::LENT);
        let (tx, rx) = std::sync::mpsc::channel();
        self.send(
            worker,
            WorkerCmd::Install {
                model,
                staged: Box::new(s.staged),
                irqs: s.irqs,
                ticket: ticket.clone(),
                reply: tx,
            },
        )?;
        let served = match rx.recv_timeout(self.step_timeout) {
            Ok(ok) => ok,
            Err(_) => !ticket.step(MoveTicket::LENT, MoveTicket::CANCELLED),
        };
        if !served {
            return Err(cfg_err(format!(
                "worker {worker} did not take model {model} within {:?}; it is not served here",
                self.step_timeout
            )));
        }
        self.cfg.models.push(s.cfg);
        if let Some(a) = &self.admission
            && let Ok(mut set) = a.models.write()
        {
            set.insert(model);
        }
        self.reroute()
    }

    /// Undo of [`Server::stage_in`]: drops a staged model; says whether it
    /// serves the model instead (its commit went through).
    pub fn discard_staged(&mut self, model: u32) -> StagedFate {
        self.handover_parts.remove(&model);
        if self.staged.remove(&model).is_some() {
            return StagedFate::Gone;
        }
        if self.cfg.models.iter().any(|m| m.id == model) {
            StagedFate::Serving
        } else {
            StagedFate::Gone
        }
    }

    /// One piece of a hand-over's JSON text for model `model` (from
    /// `dpctl`, which relays a move between two servers' control
    /// sockets), appended to the pieces before it; refused past
    /// [`MAX_HANDOVER_BYTES`] (the pieces are then dropped).
    pub fn stage_part(&mut self, model: u32, part: &str) -> Result<(), ServerError> {
        if self.cfg.models.iter().any(|m| m.id == model) || self.staged.contains_key(&model) {
            return Err(cfg_err(format!(
                "model {model} is served or staged here already"
            )));
        }
        add_part(&mut self.handover_parts, model, part, MAX_HANDOVER_BYTES).map_err(cfg_err)
    }

    /// Step 2 of a move driven over the control socket: builds model
    /// `cfg.id` from the pieces received by [`Server::stage_part`] (see
    /// [`Server::stage_in`]). The pieces are used up either way.
    pub fn stage_wire(&mut self, cfg: ModelConfig) -> Result<(), ServerError> {
        let text = self.handover_parts.remove(&cfg.id).ok_or_else(|| {
            cfg_err(format!(
                "no hand-over of model {} was sent here (send its pieces first)",
                cfg.id
            ))
        })?;
        let wire = ModelHandover::from_json(&text)
            .map_err(|e| cfg_err(format!("hand-over of model {}: {e}", cfg.id)))?;
        let h = Handover::from_wire(cfg.id, wire)
            .map_err(|e| cfg_err(format!("hand-over of model {}: {e}", cfg.id)))?;
        if h.kind != cfg.kind {
            return Err(cfg_err(format!(
                "hand-over of model {} is of a {} model, its configuration says {}",
                cfg.id, h.kind, cfg.kind
            )));
        }
        self.stage_in(cfg, h)
    }

    /// Whether this server serves model `model` (by which worker), has it
    /// lent or staged.
    pub fn placement(&self, model: u32) -> (Option<usize>, bool, bool) {
        (
            self.model_worker(model),
            self.lent_out.contains_key(&model),
            self.staged.contains_key(&model),
        )
    }

    /// The server model `model` is lent to, if it is lent and the mover
    /// said where.
    pub fn lent_to(&self, model: u32) -> Option<u32> {
        self.lent_out.get(&model).and_then(|&(_, to, _)| to)
    }

    /// How long ago model `model` was lent, if it is.
    pub fn lent_for(&self, model: u32) -> Option<std::time::Duration> {
        self.lent_out.get(&model).map(|&(_, _, at)| at.elapsed())
    }

    /// How long this server has run.
    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The worker serving model `model`, if this server serves it.
    pub fn model_worker(&self, model: u32) -> Option<usize> {
        self.cfg
            .models
            .iter()
            .find(|m| m.id == model)
            .map(|m| m.worker)
    }

    /// Models lent to another server by moves not yet settled.
    pub fn lent_models(&self) -> Vec<u32> {
        self.lent_out.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_control::config::VmConfig;
    use devplane_control::proto::{HandedIrq, HandedWindow};

    const NOW: u64 = 1_000_000_000;

    fn vms() -> Vec<VmConfig> {
        vec![
            VmConfig {
                id: 10,
                client: 1,
                hypervisor: 7,
            },
            VmConfig {
                id: 20,
                client: 2,
                hypervisor: 8,
            },
        ]
    }

    fn model() -> ModelConfig {
        ModelConfig {
            vm: Some(10),
            ..ModelConfig::new(5, "counter", 0)
        }
    }

    /// A hand-over as a hostile (or confused) relay could send it for
    /// model 5 of VM 10 (client 1).
    fn hostile(irq_vm: u32) -> Handover {
        let m = devplane_devmodels::registry::build("counter", Default::default()).unwrap();
        let snap = m.snapshot();
        let window = |client, vm, seqs: std::ops::Range<u64>| HandedWindow {
            client,
            vm,
            vcpu: 0,
            answers: seqs.map(|s| (s, 0, 0)).collect(),
        };
        let wire = devplane_control::proto::ModelHandover {
            kind: "counter".into(),
            snapshot_version: snap.version,
            snapshot: snap.data,
            pio_base: 0,
            mmio_base: 0,
            // Interrupts to the other tenant's VM.
            irq_target: Some((20, 8)),
            irq_seq: 1,
            windows: vec![
                // The model's own VM, honest answers.
                window(1, 10, 100..110),
                // VM 20 is client 2's: named as client 1's, or as client
                // 2's with numbers beyond any clock (would make its
                // every later request Stale).
                window(1, 20, 100..110),
                window(2, 20, u64::MAX - 300..u64::MAX),
                // Client 1's own VM with a few numbers from the future.
                window(1, 10, u64::MAX - 3..u64::MAX),
                // A VM unknown here.
                window(3, 99, 1..5),
            ],
            irqs: vec![HandedIrq {
                vm: irq_vm,
                hypervisor: 99,
                line: 4,
                action: 1,
                seq: 2,
            }],
        };
        Handover::from_wire(5, wire).unwrap()
    }

    /// Hand-over requests out of order, on a real (socket-mode) server:
    /// each refused with why or a no-op, nothing staged or served.
    #[test]
    fn hand_over_requests_out_of_order_are_refused() {
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let cfg: devplane_control::config::ServerConfig = toml::from_str(&format!(
            "[server]\nid = 4\nport = {port}\nmode = \"socket\"\nworkers = [0]\n\n\
             [[vms]]\nid = 10\nclient = 1\nhypervisor = 7\n\n\
             [[clients]]\nid = 1\naddress = \"127.0.0.1\"\n"
        ))
        .unwrap();
        let mut s = Server::start(&cfg).expect("a socket-mode server");
        let e = |r: Result<(), ServerError>| r.unwrap_err().to_string();
        assert!(e(s.commit_in(5)).contains("not staged"));
        assert!(e(s.release_lent(5)).contains("not lent"));
        assert!(!s.take_back(5).unwrap(), "nothing lent: nothing taken back");
        assert!(s.lend_out(5).is_err());
        assert!(e(s.stage_wire(model())).contains("send its pieces first"));
        s.stage_part(5, "{\"kind\":\"counter\",").unwrap();
        assert!(e(s.stage_wire(model())).contains("hand-over of model 5"));
        assert!(
            e(s.stage_wire(model())).contains("send its pieces first"),
            "pieces used up"
        );
        s.stage_part(5, "garbage").unwrap();
        assert_eq!(s.discard_staged(5), StagedFate::Gone);
        assert!(
            e(s.stage_wire(model())).contains("send its pieces first"),
            "discarded"
        );
        assert_eq!(s.placement(5), (None, false, false));
        // A model staged here cannot be added meanwhile (its commit would
        // replace it), nor a lent one removed (a cancel would serve it
        // again, unrouted).
        s.stage_in(model(), hostile(10)).unwrap();
        assert!(e(s.add_model(ModelConfig::new(5, "counter", 0))).contains("staged here"));
        s.add_model(ModelConfig::new(6, "counter", 0)).unwrap();
        s.lend_out(6).unwrap();
        assert!(e(s.remove_model(6)).contains("lent to a move"));
        assert!(s.take_back(6).unwrap());
        s.remove_model(6).unwrap();
        s.stop();
    }

    /// A flood of pieces: bounded in bytes (every model's together) and
    /// in models; the one past a bound is refused with its model's
    /// pieces, the others' are kept.
    #[test]
    fn a_flood_of_hand_over_pieces_is_bounded() {
        const MAX: usize = 1000;
        let mut parts = HashMap::new();
        assert!(add_part(&mut parts, 1, "", MAX).is_err(), "empty piece");
        assert!(parts.is_empty());
        for m in 0..MAX_HANDOVER_MODELS as u32 {
            add_part(&mut parts, m, "{", MAX).unwrap();
        }
        let e = add_part(&mut parts, 999, "{", MAX).unwrap_err();
        assert!(e.contains("the most at once"), "{e}");
        assert_eq!(parts.len(), MAX_HANDOVER_MODELS);
        // Bytes: model 0 grows to the bound; one more byte of model 1
        // is refused and only model 1's pieces dropped.
        let room = MAX - MAX_HANDOVER_MODELS;
        add_part(&mut parts, 0, &"x".repeat(room), MAX).unwrap();
        let e = add_part(&mut parts, 1, "y", MAX).unwrap_err();
        assert!(e.contains("model 1's pieces are dropped"), "{e}");
        assert!(!parts.contains_key(&1));
        let total: usize = parts.values().map(String::len).sum();
        assert_eq!(total, MAX - 1);
    }

    #[test]
    fn a_hostile_hand_over_cannot_reach_another_tenant() {
        let mut h = hostile(10);
        assert_eq!(
            vet(&vms(), &model(), &mut h, NOW),
            Ok((2, 10 + 4 + 3 + 256))
        );
        // Interrupts go where this server's configuration says.
        assert_eq!(h.irq_target, Some((10, 7)));
        assert_eq!((h.irqs[0].vm, h.irqs[0].hypervisor), (10, 7));
        // Only client 1's window of VM 10 is left, without the future.
        let kept = h.windows().export();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(kept[0].0, (1, 10, 0));
        assert_eq!(kept[0].1.len(), 10);
        assert!(kept[0].1.iter().all(|&(s, _, _)| (100..110).contains(&s)));
        // An interrupt for another VM: refused, not retargeted.
        let mut h = hostile(20);
        let e = vet(&vms(), &model(), &mut h, NOW).unwrap_err();
        assert!(e.contains("VM 20"), "{e}");
        // Too many interrupts: refused.
        let mut h = hostile(10);
        h.irqs = vec![h.irqs[0]; crate::irq::MAX_HELD + 1];
        assert!(vet(&vms(), &model(), &mut h, NOW).is_err());
        // A model without VM takes no interrupts.
        let mut h = hostile(10);
        let e = vet(&vms(), &ModelConfig::new(5, "counter", 0), &mut h, NOW).unwrap_err();
        assert!(e.contains("no VM"), "{e}");
    }
}
