//! Moving a device model from one server to another: the two-phase
//! hand-over, as pure decisions over the parties' answers (no I/O here;
//! whoever drives a move, `dpctl` or a test, implements [`Parties`]).
//!
//! The steps, in order:
//! 1. **lend** (source): the source stops serving the model and keeps it
//!    aside, not served; it hands over its snapshot, duplicate windows and
//!    unacknowledged interrupts. Requests reaching it now are dropped
//!    unanswered (clients retransmit them with the same numbers).
//! 2. **stage** (target): the target builds the model from the hand-over,
//!    *not served yet* (requests for it are dropped unanswered too).
//! 3. **retarget** (clients): every client of the model's VMs points the
//!    model at the target; requests in flight are resent there.
//! 4. **commit** (target): the target serves the model. This is the
//!    decision: before it nothing was served anywhere but the source, so
//!    every earlier failure is undone without losing a write; after it the
//!    move rolls forward.
//! 5. **release** (source): the source drops its lent copy.
//!
//! A step answers `Ok`, [`StepError::Refused`] (it was certainly not
//! applied) or [`StepError::TimedOut`] (it may have been, later). Before
//! the commit, any failure cancels: clients point back at the source, the
//! target discards its staged copy, the source serves its lent copy again.
//! A commit that timed out is resolved by asking the target to discard:
//! it answers that it discarded (cancel) or that it serves already (roll
//! forward); if it does not answer, the move is *in doubt*: the source
//! keeps its copy lent (never served), so the model is never served by
//! two servers at once, and the report says so. A release that fails
//! leaves the source's copy lent, never served: the model is moved.
//! The two copies are never both served: the source serves only a model
//! it never lent or took back, the target only after its commit, and a
//! take-back happens only once the target has certainly not committed.

/// The steps of a move, for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// The source lends the model.
    Lend,
    /// The target builds it, not served.
    Stage,
    /// The clients point at the target.
    Retarget,
    /// The target serves it.
    Commit,
    /// The source drops its lent copy.
    Release,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Step::Lend => "lend (source)",
            Step::Stage => "stage (target)",
            Step::Retarget => "retarget (clients)",
            Step::Commit => "commit (target)",
            Step::Release => "release (source)",
        })
    }
}

/// How a step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StepError {
    /// Certainly not applied (the party said no).
    #[error("refused: {0}")]
    Refused(String),
    /// No answer in time: it may have been applied, or may be later.
    #[error("timed out: {0}")]
    TimedOut(String),
}

/// What a target says when asked to discard a staged model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discarded {
    /// It was staged (or not there at all) and is gone: it never served.
    Gone,
    /// It serves the model already (its commit went through).
    Serving,
}

/// The parties of one move and how to reach them. Each call is one step
/// with its own deadline.
pub trait Parties {
    /// What the source hands over (snapshot, windows, interrupts).
    type Handover;
    /// Step 1 on the source.
    fn lend(&mut self) -> Result<Self::Handover, StepError>;
    /// Step 2 on the target.
    fn stage(&mut self, handover: Self::Handover) -> Result<(), StepError>;
    /// Step 3 (`to_target`) on every client, or its undo (`false`: point
    /// back at the source).
    fn retarget(&mut self, to_target: bool) -> Result<(), StepError>;
    /// Step 4 on the target.
    fn commit(&mut self) -> Result<(), StepError>;
    /// Step 5 on the source.
    fn release(&mut self) -> Result<(), StepError>;
    /// Undo of step 1: the source serves its lent copy again (nothing to
    /// do if it lent nothing).
    fn take_back(&mut self) -> Result<(), StepError>;
    /// Undo of step 2: the target drops a staged copy, or says it serves.
    fn discard(&mut self) -> Result<Discarded, StepError>;
}

/// What a move did, as it really happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// The target serves the model; the clients point at it.
    Moved {
        /// `None`: the source dropped its copy. `Some(why)`: it did not
        /// confirm; its copy stays lent (never served) until it is told
        /// again or restarts.
        release_pending: Option<String>,
    },
    /// The source serves the model as before; the target does not.
    Cancelled {
        /// The step that failed.
        at: Step,
        /// Why.
        why: String,
        /// Undo steps that did not confirm (best effort; the model still
        /// serves only on the source).
        loose_ends: Vec<String>,
    },
    /// The target's commit timed out and the target did not answer
    /// whether it serves: nobody knows yet. The source keeps its copy
    /// lent (not served), the clients point at the target; asking the
    /// target again settles it.
    InDoubt {
        /// Why.
        why: String,
    },
}

impl Report {
    /// Whether the model moved.
    pub fn moved(&self) -> bool {
        matches!(self, Report::Moved { .. })
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Report::Moved {
                release_pending: None,
            } => write!(f, "moved: the target serves the model"),
            Report::Moved {
                release_pending: Some(w),
            } => write!(
                f,
                "moved: the target serves the model; the source did not confirm dropping its \
                 lent copy ({w}), which it never serves"
            ),
            Report::Cancelled {
                at,
                why,
                loose_ends,
            } => {
                write!(
                    f,
                    "move cancelled at {at}: {why}; the model is served by the source as before"
                )?;
                if !loose_ends.is_empty() {
                    write!(f, " (not confirmed: {})", loose_ends.join("; "))?;
                }
                Ok(())
            }
            Report::InDoubt { why } => write!(
                f,
                "move in doubt: {why}; the source keeps its copy lent (not served) and the \
                 clients point at the target until the target answers"
            ),
        }
    }
}

/// Runs a move over `p` and reports what happened (see the module docs).
pub fn run<P: Parties>(p: &mut P) -> Report {
    let h = match p.lend() {
        Ok(h) => h,
        Err(e) => {
            // A lend that timed out may still happen: take it back.
            let mut loose = Vec::new();
            if matches!(e, StepError::TimedOut(_))
                && let Err(t) = p.take_back()
            {
                loose.push(format!("take back on the source {t}"));
            }
            return Report::Cancelled {
                at: Step::Lend,
                why: e.to_string(),
                loose_ends: loose,
            };
        }
    };
    if let Err(e) = p.stage(h) {
        return cancel(p, Step::Stage, e);
    }
    if let Err(e) = p.retarget(true) {
        return cancel(p, Step::Retarget, e);
    }
    match p.commit() {
        Ok(()) => {}
        Err(e @ StepError::Refused(_)) => return cancel(p, Step::Commit, e),
        Err(e @ StepError::TimedOut(_)) => match p.discard() {
            Ok(Discarded::Gone) => return cancel_discarded(p, Step::Commit, e),
            Ok(Discarded::Serving) => {}
            Err(d) => {
                return Report::InDoubt {
                    why: format!("commit {e}, and asking the target to discard: {d}"),
                };
            }
        },
    }
    Report::Moved {
        release_pending: p.release().err().map(|e| e.to_string()),
    }
}

/// Settles a move left unfinished (its driver died, or it was in doubt):
/// the source still has the model lent, not served, and nobody serves it
/// unless the target committed. Asks the target to discard: if it says it
/// serves, the move rolls forward (clients pointed at it, the source
/// releases); if its staged copy is gone, the move is cancelled (clients
/// pointed back, the source takes the model back); if it does not answer,
/// the move stays in doubt (the source keeps its copy lent). `p`'s target
/// must be the one the source lent the model to.
pub fn settle<P: Parties>(p: &mut P) -> Report {
    match p.discard() {
        Ok(Discarded::Serving) => match p.retarget(true) {
            Ok(()) => Report::Moved {
                release_pending: p.release().err().map(|e| e.to_string()),
            },
            Err(e) => Report::InDoubt {
                why: format!(
                    "the target serves the model, but pointing the clients at it failed: {e}"
                ),
            },
        },
        Ok(Discarded::Gone) => cancel_discarded(
            p,
            Step::Commit,
            StepError::Refused(
                "a move left unfinished was settled: the target had not committed".into(),
            ),
        ),
        Err(e) => Report::InDoubt {
            why: format!("settling a move left unfinished, asking the target to discard: {e}"),
        },
    }
}

/// Undoes a move that failed at `at` before the commit: the target
/// discards, the clients point back (if they may have moved), the source
/// takes the model back.
fn cancel<P: Parties>(p: &mut P, at: Step, e: StepError) -> Report {
    match p.discard() {
        // Not asked to commit, a target never serves a staged copy: even
        // if it does not answer, the source may take the model back.
        Ok(Discarded::Gone) | Err(_) => cancel_discarded(p, at, e),
        // A target that says it serves without a commit: never take the
        // model back then.
        Ok(Discarded::Serving) => Report::InDoubt {
            why: format!("{at} {e}, and the target says it serves the model without a commit"),
        },
    }
}

/// The rest of a cancel once the target certainly does not serve: clients
/// back, source takes back.
fn cancel_discarded<P: Parties>(p: &mut P, at: Step, e: StepError) -> Report {
    let mut loose = Vec::new();
    if at != Step::Stage
        && let Err(r) = p.retarget(false)
    {
        loose.push(format!("point back the clients {r}"));
    }
    if let Err(t) = p.take_back() {
        loose.push(format!("take back on the source {t}"));
    }
    Report::Cancelled {
        at,
        why: e.to_string(),
        loose_ends: loose,
    }
}

#[cfg(test)]
mod tests;
