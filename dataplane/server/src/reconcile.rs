//! The server as an agent of the identifier store: carry out a
//! [`ServerPlan`] (computed by [`devplane_control::store::plan`] from what
//! the server holds and what the store says) on the running server,
//! without stopping traffic: clients and keys first, then VMs, then the
//! models (removed, moved with their state, added), then what is gone,
//! and last the eBPF maps synced to the result.

use std::time::{Duration, Instant};

use devplane_control::config::ServerConfig;
use devplane_control::store::plan::{KEY_GRACE, KeyRoll, ServerPlan, server_plan};

use crate::lifecycle::WorkerCmd;
use crate::{Server, ServerError};

impl Server {
    /// What the server holds now (its clients, VMs and models as changed
    /// live).
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Brings the running server to `want` (the store's projection for
    /// this server): every step is tried; the errors of those that failed
    /// are returned (the next reconcile tries them again). Returns how
    /// many steps were taken.
    pub fn reconcile(&mut self, want: &ServerConfig) -> Result<usize, Vec<String>> {
        let plan = server_plan(&self.cfg, want);
        if plan.is_empty() {
            return Ok(0);
        }
        let steps = plan.len();
        // The keys before this change (a client's entry may be replaced
        // below).
        let old_keys: std::collections::BTreeMap<u32, Option<devplane_wire::tag::TagKey>> = self
            .cfg
            .clients
            .iter()
            .map(|c| (c.id, c.tag_key.clone().map(|k| k.0)))
            .collect();
        let mut errors = Vec::new();
        let mut note = |what: String, r: Result<(), ServerError>| {
            if let Err(e) = r {
                errors.push(format!("{what}: {e}"));
            }
        };
        let ServerPlan {
            upsert_clients,
            keys,
            upsert_vms,
            remove_models,
            move_models,
            add_models,
            remove_vms,
            remove_clients,
        } = plan;
        for c in upsert_clients {
            if let Some(a) = &self.admission
                && let Ok(mut set) = a.clients.write()
            {
                set.insert(c.id, c.address);
            }
            match self.cfg.clients.iter_mut().find(|x| x.id == c.id) {
                Some(x) => *x = c,
                None => self.cfg.clients.push(c),
            }
        }
        for (client, key) in keys {
            // Both keys accepted over the grace period (tick_keys retires
            // the old one), so that nothing in flight is refused.
            let roll = KeyRoll {
                old: old_keys.get(&client).cloned().flatten(),
                new: key.clone().map(|k| k.0),
            };
            let ring = roll.server_ring(Duration::ZERO);
            let r = self.set_keys(client, ring.clone());
            if r.is_ok() {
                if let Some(x) = self.cfg.clients.iter_mut().find(|x| x.id == client) {
                    x.tag_key = key;
                }
                if ring != roll.server_ring(KEY_GRACE) {
                    self.key_rolls.insert(client, (roll, Instant::now()));
                } else {
                    self.key_rolls.remove(&client);
                }
            }
            note(format!("keys of client {client}"), r);
        }
        for v in upsert_vms {
            let (vm, client) = (v.id, v.client);
            match self.cfg.vms.iter_mut().find(|x| x.id == vm) {
                Some(x) => *x = v,
                None => self.cfg.vms.push(v),
            }
            let r = self.broadcast(|| WorkerCmd::MigrateVm { vm, client });
            note(format!("VM {vm} on client {client}"), r);
        }
        for m in remove_models {
            let r = self.remove_model(m);
            note(format!("remove model {m}"), r);
        }
        for (m, w) in move_models {
            let r = self.move_model(m, w);
            note(format!("move model {m} to worker {w}"), r);
        }
        for m in add_models {
            let id = m.id;
            let r = self.add_model(m);
            note(format!("add model {id}"), r);
        }
        for vm in remove_vms {
            self.cfg.vms.retain(|x| x.id != vm);
            self.suspended.remove(&vm);
            let r = self.broadcast(|| WorkerCmd::ForgetVm(vm));
            note(format!("forget VM {vm}"), r);
        }
        for client in remove_clients {
            if let Some(a) = &self.admission
                && let Ok(mut set) = a.clients.write()
            {
                set.remove(&client);
            }
            let r = self.set_keys(client, None);
            self.key_rolls.remove(&client);
            self.cfg.clients.retain(|x| x.id != client);
            note(format!("forget client {client}"), r);
        }
        if let Err(e) = self.sync_maps() {
            errors.push(format!("maps: {e}"));
        }
        if errors.is_empty() {
            Ok(steps)
        } else {
            Err(errors)
        }
    }

    /// Retires the previous key of every client whose key change from
    /// the store has passed its grace period ([`KEY_GRACE`]). Call it
    /// often (devplane-server's loop does, at least every second).
    pub fn tick_keys(&mut self) -> Result<(), Vec<String>> {
        let due: Vec<(u32, KeyRoll, Duration)> = self
            .key_rolls
            .iter()
            .map(|(&c, (roll, since))| (c, roll.clone(), since.elapsed()))
            .filter(|(_, roll, elapsed)| roll.settled(*elapsed))
            .collect();
        let mut errors = Vec::new();
        for (client, roll, elapsed) in due {
            self.key_rolls.remove(&client);
            if let Err(e) = self.set_keys(client, roll.server_ring(elapsed)) {
                errors.push(format!("retiring the old key of client {client}: {e}"));
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// XDP mode: the eBPF maps written from what the server holds (the
    /// suspended VMs keep their flag).
    fn sync_maps(&mut self) -> Result<(), ServerError> {
        let Some(x) = self.xdp.as_mut() else {
            return Ok(());
        };
        let keep: std::collections::BTreeSet<u32> = self.forwards.keys().copied().collect();
        devplane_control::maps::sync_keeping(&self.cfg, true, &mut x.maps, &keep)?;
        let held: Vec<u32> = self.suspended.iter().copied().collect();
        for vm in held {
            self.put_vm_entry(vm)?;
        }
        Ok(())
    }
}
