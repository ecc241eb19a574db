//! A move of a device model between two in-thread servers
//! ([`ServerThread`]), as the parties of the two-phase hand-over
//! ([`devplane_control::handover`]): the e2e tests and dpbench's `migrate`
//! scenario drive the same steps as `dpctl models move --to-server`, here
//! through the servers' own threads instead of their control sockets.
//!
//! A server's answers are definite (its workers' steps are decided by a
//! compare-and-swap) except settling a lent copy, which a slow worker
//! applies later: those are reported as timed out.

use devplane_control::config::ModelConfig;
use devplane_control::handover::{Discarded, Parties, StepError};
use devplane_server::StagedFate;
use devplane_server::dispatch::Handover;

use crate::host::ServerThread;

/// One move of `model` from server `from` to server `to`; `retarget`
/// points the clients' model at a server (`(model, server)`, e.g. the
/// client VMM's `Client::retarget`) and says why it could not.
pub struct ServerMove<'a, R> {
    /// The model.
    pub model: u32,
    /// The server that serves it (the source).
    pub from: &'a ServerThread,
    /// The server it moves to (the target), whose worker 0 takes it.
    pub to: &'a ServerThread,
    /// The source's platform id.
    pub from_id: u32,
    /// The target's platform id.
    pub to_id: u32,
    /// Points every client of the model's VMs at a server.
    pub retarget: R,
}

fn gone() -> StepError {
    StepError::TimedOut("the server thread is gone".into())
}

impl<R> Parties for ServerMove<'_, R>
where
    R: FnMut(u32, u32) -> Result<(), String>,
{
    type Handover = (ModelConfig, Handover);

    fn lend(&mut self) -> Result<Self::Handover, StepError> {
        let m = self.model;
        self.from
            .call(move |s| s.lend_out(m))
            .ok_or_else(gone)?
            .map_err(|e| StepError::Refused(e.to_string()))
    }

    fn stage(&mut self, (mut cfg, h): Self::Handover) -> Result<(), StepError> {
        cfg.worker = 0;
        self.to
            .call(move |s| s.stage_in(cfg, h))
            .ok_or_else(gone)?
            .map_err(|e| StepError::Refused(e.to_string()))
    }

    fn retarget(&mut self, to_target: bool) -> Result<(), StepError> {
        let server = if to_target { self.to_id } else { self.from_id };
        (self.retarget)(self.model, server).map_err(StepError::TimedOut)
    }

    fn commit(&mut self) -> Result<(), StepError> {
        let m = self.model;
        self.to
            .call(move |s| s.commit_in(m))
            .ok_or_else(gone)?
            .map_err(|e| StepError::Refused(e.to_string()))
    }

    fn release(&mut self) -> Result<(), StepError> {
        let m = self.model;
        self.from
            .call(move |s| s.release_lent(m))
            .ok_or_else(gone)?
            .map_err(|e| StepError::TimedOut(e.to_string()))
    }

    fn take_back(&mut self) -> Result<(), StepError> {
        let m = self.model;
        self.from
            .call(move |s| s.take_back(m))
            .ok_or_else(gone)?
            .map(|_| ())
            .map_err(|e| StepError::TimedOut(e.to_string()))
    }

    fn discard(&mut self) -> Result<Discarded, StepError> {
        let m = self.model;
        match self
            .to
            .call(move |s| s.discard_staged(m))
            .ok_or_else(gone)?
        {
            StagedFate::Gone => Ok(Discarded::Gone),
            StagedFate::Serving => Ok(Discarded::Serving),
        }
    }
}
