//! The client daemon as an agent of the identifier store: run the VMs the
//! store places on this client platform, in the state it asks for, with
//! their remote devices on the servers the store places their models on
//! (the plan is [`devplane_control::store::plan::client_plan`]'s; this
//! only carries it out).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use devplane_control::db::State;
use devplane_control::store::plan::{ClientStep, KeyRoll, Local, client_plan};

use super::Daemon;
use super::config::PlaceEntry;

impl Daemon {
    /// How each VM runs here now (VMs not running are left out; a guest
    /// that ended by itself is [`Local::Exited`] until shut down).
    pub fn local_states(&mut self) -> BTreeMap<u32, Local> {
        self.notice();
        self.slots
            .iter()
            .filter_map(|(&id, slot)| match &slot.running {
                Some(r) if r.client.suspended() => Some((id, Local::Suspended)),
                Some(_) => Some((id, Local::Running)),
                None if slot.unclaimed => Some((id, Local::Exited)),
                None => None,
            })
            .collect()
    }

    /// The VMs this daemon's configuration can build.
    pub fn known_vms(&self) -> BTreeSet<u32> {
        self.slots.keys().copied().collect()
    }

    /// Points VM `vm`'s devices whose model the store places (model id ->
    /// server id) at that server, and has the VM reach each such server
    /// through the owner server the store forwards its model by (the
    /// owner's address from this daemon's `[[servers]]`), or straight.
    /// (A `via` is per server for a launched VM: models of one server
    /// share it.)
    fn place_devices(
        &mut self,
        vm: u32,
        placement: &BTreeMap<u32, u32>,
        state: &State,
    ) -> Result<(), String> {
        let Some(entry) = self.file.vms.iter_mut().find(|v| v.id == vm) else {
            return Ok(());
        };
        let mut via: BTreeMap<u32, Option<u32>> = BTreeMap::new();
        for d in &mut entry.devices {
            if let Some(&server) = placement.get(&d.model) {
                d.place = PlaceEntry::Remote(server);
                via.insert(server, state.model(d.model).and_then(|m| m.via));
            }
        }
        for (server, owner) in via {
            let addr = match owner {
                None => None,
                Some(o) => Some(
                    self.file
                        .servers
                        .iter()
                        .find(|s| s.id == o)
                        .map(|s| s.address)
                        .ok_or_else(|| {
                            format!(
                                "VM {vm}: the store forwards server {server}'s model through \
                                 server {o}, which this daemon's [[servers]] does not list"
                            )
                        })?,
                ),
            };
            if let Some(s) = self.file.servers.iter_mut().find(|s| s.id == server) {
                s.via = addr;
            }
        }
        Ok(())
    }

    /// Has every VM placed on this client reach each server through the
    /// owner server the store forwards its models by, or straight: the
    /// running VMs switch live ([`crate::engine::Engine::set_via`]: in
    /// flight requests are retransmitted on the new path with their
    /// sequence numbers), the next launches start so. Returns how many
    /// servers changed path.
    fn sync_vias(&mut self, state: &State, errors: &mut Vec<String>) -> usize {
        let me = self.client_id();
        let mut want: BTreeMap<u32, Option<u32>> = BTreeMap::new();
        for v in state.vms.iter().filter(|v| v.client == me) {
            for m in state.models.iter().filter(|m| m.vm == Some(v.id)) {
                want.insert(m.server, m.via);
            }
        }
        let mut steps = 0;
        for (server, owner) in want {
            let addr = match owner {
                None => None,
                Some(o) => match self.file.servers.iter().find(|s| s.id == o) {
                    Some(s) => Some(s.address),
                    None => {
                        errors.push(format!(
                            "the store forwards server {server}'s models through server {o}, \
                             which this daemon's [[servers]] does not list"
                        ));
                        continue;
                    }
                },
            };
            let Some(entry) = self.file.servers.iter_mut().find(|s| s.id == server) else {
                continue;
            };
            if entry.via == addr {
                continue;
            }
            entry.via = addr;
            steps += 1;
            for slot in self.slots.values() {
                if let Some(r) = &slot.running
                    && let Some(e) = r.client.engine()
                {
                    e.set_via(server, addr);
                }
            }
        }
        steps
    }

    /// Carries a key change from the store on: seals with the new key
    /// once the servers have had time to learn it, retires the old key
    /// after the grace period ([`KeyRoll::client_ring`]). Call it often
    /// (the daemon's loop does, every turn).
    pub fn tick_keys(&mut self) -> Result<(), String> {
        let Some((roll, since)) = self.key_roll.clone() else {
            return Ok(());
        };
        let elapsed = since.elapsed();
        let ring = roll.client_ring(elapsed);
        if roll.settled(elapsed) {
            self.key_roll = None;
        }
        if ring != self.keys {
            let me = self.client_id();
            self.set_keys(me, ring).map_err(|e| format!("keys: {e}"))?;
        }
        Ok(())
    }

    /// Follows the store's `state`: launches, suspends, resumes and shuts
    /// down VMs as [`client_plan`] says, and takes this client's tag key
    /// from it (a change of key over [`KeyRoll`]'s grace period:
    /// [`Daemon::tick_keys`]). Every step is tried; returns how many were taken, or the
    /// errors of those that failed (and the problems of the plan).
    pub fn reconcile(&mut self, state: &State) -> Result<usize, Vec<String>> {
        let me = self.client_id();
        let mut errors = Vec::new();
        let mut steps = 0;
        if let Some(c) = state.client(me) {
            let want = c.tag_key.clone().map(|k| k.0);
            if self.store_key != want {
                let roll = KeyRoll {
                    old: self.store_key.clone(),
                    new: want.clone(),
                };
                match self.set_keys(me, roll.client_ring(Duration::ZERO)) {
                    Ok(()) => {
                        steps += 1;
                        self.store_key = want;
                        self.key_roll = (roll.client_ring(Duration::ZERO)
                            != roll.client_ring(devplane_control::store::plan::KEY_GRACE))
                        .then(|| (roll, Instant::now()));
                    }
                    Err(e) => errors.push(format!("keys: {e}")),
                }
            }
        }
        steps += self.sync_vias(state, &mut errors);
        let running = self.local_states();
        let (plan, problems) = client_plan(state, me, &running, &self.known_vms());
        errors.extend(problems);
        for step in plan {
            let r = match &step {
                ClientStep::Launch(vm, placement) => {
                    if let Err(e) = self.place_devices(*vm, placement, state) {
                        errors.push(e);
                        continue;
                    }
                    self.launch(*vm).map(drop)
                }
                ClientStep::Suspend(vm) => self.suspend(*vm).map(drop),
                ClientStep::Resume(vm) => self.resume(*vm).map(drop),
                ClientStep::Shutdown(vm) => self.shutdown(*vm).map(drop),
            };
            match r {
                Ok(()) => steps += 1,
                Err(e) => errors.push(format!("{step:?}: {e}")),
            }
        }
        if errors.is_empty() {
            Ok(steps)
        } else {
            Err(errors)
        }
    }
}
