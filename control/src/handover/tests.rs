//! Every step of a move refused, timed out before it applied, or timed
//! out after it applied (and the undo steps too): the model is never
//! served by both servers, and the report says where it is.

use std::collections::HashMap;

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    Serving,
    Lent,
    Dropped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tgt {
    Nothing,
    Staged,
    Serving,
}

/// How a party answers one kind of call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Ok,
    Refuse,
    /// Applied, but the answer came too late.
    LateApplied,
    /// Not applied (the party never got to it).
    Lost,
}

const FAILURES: [Answer; 3] = [Answer::Refuse, Answer::LateApplied, Answer::Lost];

/// A source, a target and the clients, with scripted answers.
struct World {
    src: Src,
    tgt: Tgt,
    clients_at_target: bool,
    answers: HashMap<&'static str, Answer>,
    calls: Vec<&'static str>,
}

impl World {
    fn new(script: &[(&'static str, Answer)]) -> World {
        World {
            src: Src::Serving,
            tgt: Tgt::Nothing,
            clients_at_target: false,
            answers: script.iter().copied().collect(),
            calls: Vec::new(),
        }
    }

    /// Calls step `name`: applies `apply` unless the script says it is
    /// refused or lost, and answers as scripted.
    fn step<T>(
        &mut self,
        name: &'static str,
        apply: impl FnOnce(&mut World) -> Result<T, StepError>,
    ) -> Result<T, StepError> {
        self.calls.push(name);
        let a = self.answers.get(name).copied().unwrap_or(Answer::Ok);
        let r = match a {
            Answer::Refuse => Err(StepError::Refused(format!("{name} said no"))),
            Answer::Lost => Err(StepError::TimedOut(format!("{name} lost"))),
            Answer::Ok => apply(self),
            Answer::LateApplied => {
                apply(self).and_then(|_| Err(StepError::TimedOut(format!("{name} answered late"))))
            }
        };
        assert!(
            !(self.src == Src::Serving && self.tgt == Tgt::Serving),
            "served by both after {name}: {:?}",
            self.calls
        );
        r
    }
}

impl Parties for World {
    type Handover = u64;

    fn lend(&mut self) -> Result<u64, StepError> {
        self.step("lend", |w| {
            if w.src != Src::Serving {
                return Err(StepError::Refused("not served".into()));
            }
            w.src = Src::Lent;
            Ok(42)
        })
    }

    fn stage(&mut self, h: u64) -> Result<(), StepError> {
        assert_eq!(h, 42);
        self.step("stage", |w| {
            w.tgt = Tgt::Staged;
            Ok(())
        })
    }

    fn retarget(&mut self, to_target: bool) -> Result<(), StepError> {
        let name = if to_target { "retarget" } else { "point_back" };
        self.step(name, |w| {
            w.clients_at_target = to_target;
            Ok(())
        })
    }

    fn commit(&mut self) -> Result<(), StepError> {
        self.step("commit", |w| {
            if w.tgt != Tgt::Staged {
                return Err(StepError::Refused("nothing staged".into()));
            }
            w.tgt = Tgt::Serving;
            Ok(())
        })
    }

    fn release(&mut self) -> Result<(), StepError> {
        self.step("release", |w| {
            if w.src == Src::Lent {
                w.src = Src::Dropped;
            }
            Ok(())
        })
    }

    fn take_back(&mut self) -> Result<(), StepError> {
        self.step("take_back", |w| {
            if w.src == Src::Lent {
                w.src = Src::Serving;
            }
            Ok(())
        })
    }

    fn discard(&mut self) -> Result<Discarded, StepError> {
        self.step("discard", |w| match w.tgt {
            Tgt::Serving => Ok(Discarded::Serving),
            _ => {
                w.tgt = Tgt::Nothing;
                Ok(Discarded::Gone)
            }
        })
    }
}

/// Checks that the world is where the report says the model is.
fn check(w: &World, r: &Report) {
    match r {
        Report::Moved { release_pending } => {
            assert_eq!(w.tgt, Tgt::Serving, "{r}");
            assert!(w.clients_at_target, "{r}");
            assert_ne!(w.src, Src::Serving, "{r}");
            // Not confirmed: dropped late, or still lent.
            if release_pending.is_none() {
                assert_eq!(w.src, Src::Dropped, "{r}");
            }
        }
        Report::Cancelled { loose_ends, .. } => {
            assert_ne!(w.tgt, Tgt::Serving, "{r}");
            let took_back = !loose_ends.iter().any(|l| l.starts_with("take back"));
            let pointed_back = !loose_ends.iter().any(|l| l.starts_with("point back"));
            // A take-back not confirmed may have happened late.
            if took_back {
                assert_eq!(w.src, Src::Serving, "{r}");
            } else {
                assert_ne!(w.src, Src::Dropped, "{r}");
            }
            if pointed_back {
                assert!(!w.clients_at_target, "{r}");
            }
        }
        Report::InDoubt { .. } => {
            assert_eq!(w.src, Src::Lent, "{r}");
        }
    }
}

fn run_script(script: &[(&'static str, Answer)]) -> (World, Report) {
    let mut w = World::new(script);
    let r = run(&mut w);
    check(&w, &r);
    (w, r)
}

#[test]
fn a_move_with_every_step_answered_moves() {
    let (w, r) = run_script(&[]);
    assert_eq!(
        r,
        Report::Moved {
            release_pending: None
        }
    );
    assert_eq!(w.calls, ["lend", "stage", "retarget", "commit", "release"]);
}

#[test]
fn a_failed_lend_leaves_the_model_on_the_source() {
    for a in FAILURES {
        let (w, r) = run_script(&[("lend", a)]);
        assert!(
            matches!(r, Report::Cancelled { at: Step::Lend, .. }),
            "{a:?}: {r}"
        );
        assert_eq!(w.src, Src::Serving, "{a:?}");
        assert_eq!(w.tgt, Tgt::Nothing, "{a:?}");
        // Only a timeout may have lent it late: then it is taken back.
        let took_back = w.calls.contains(&"take_back");
        assert_eq!(took_back, a != Answer::Refuse, "{a:?}: {:?}", w.calls);
    }
}

#[test]
fn a_failed_stage_leaves_the_model_on_the_source() {
    for a in FAILURES {
        let (w, r) = run_script(&[("stage", a)]);
        assert!(
            matches!(
                r,
                Report::Cancelled {
                    at: Step::Stage,
                    ..
                }
            ),
            "{a:?}: {r}"
        );
        assert_eq!((w.src, w.tgt), (Src::Serving, Tgt::Nothing), "{a:?}");
        assert!(!w.clients_at_target);
        assert!(!w.calls.contains(&"commit"));
    }
}

#[test]
fn a_failed_retarget_points_the_clients_back_and_leaves_the_model_on_the_source() {
    for a in FAILURES {
        let (w, r) = run_script(&[("retarget", a)]);
        assert!(
            matches!(
                r,
                Report::Cancelled {
                    at: Step::Retarget,
                    ..
                }
            ),
            "{a:?}: {r}"
        );
        assert_eq!((w.src, w.tgt), (Src::Serving, Tgt::Nothing), "{a:?}");
        assert!(!w.clients_at_target, "{a:?}");
        assert!(w.calls.contains(&"point_back"), "{a:?}");
    }
}

#[test]
fn a_refused_or_lost_commit_cancels_and_a_late_one_moves() {
    for a in FAILURES {
        let (w, r) = run_script(&[("commit", a)]);
        if a == Answer::LateApplied {
            // The target serves: asked to discard, it says so; rolled
            // forward, the source drops its copy.
            assert!(r.moved(), "{a:?}: {r}");
            assert_eq!(w.src, Src::Dropped);
        } else {
            assert!(
                matches!(
                    r,
                    Report::Cancelled {
                        at: Step::Commit,
                        ..
                    }
                ),
                "{a:?}: {r}"
            );
            assert_eq!((w.src, w.tgt), (Src::Serving, Tgt::Nothing), "{a:?}");
            assert!(!w.clients_at_target);
        }
    }
}

#[test]
fn a_commit_whose_outcome_nobody_knows_is_in_doubt_and_the_source_never_serves() {
    for a in [Answer::LateApplied, Answer::Lost] {
        for d in [Answer::Lost, Answer::Refuse] {
            let (w, r) = run_script(&[("commit", a), ("discard", d)]);
            assert!(matches!(r, Report::InDoubt { .. }), "{a:?} {d:?}: {r}");
            assert_eq!(w.src, Src::Lent);
            assert!(!w.calls.contains(&"take_back"));
            assert!(!w.calls.contains(&"release"));
        }
    }
}

#[test]
fn a_failed_release_is_still_a_move_and_says_so() {
    for a in FAILURES {
        let (w, r) = run_script(&[("release", a)]);
        match &r {
            Report::Moved {
                release_pending: Some(_),
            } if a != Answer::LateApplied => assert_eq!(w.src, Src::Lent),
            Report::Moved {
                release_pending: Some(_),
            } => assert_eq!(w.src, Src::Dropped),
            other => panic!("{a:?}: {other}"),
        }
        assert!(r.to_string().contains("never serves"), "{r}");
    }
}

#[test]
fn undo_steps_that_fail_are_reported_and_never_serve_twice() {
    // Every failure of a forward step combined with every failure of
    // every undo step: `run_script` checks the world against the report,
    // and every step checks that nothing is served twice.
    for step in ["lend", "stage", "retarget", "commit"] {
        for a in FAILURES {
            for undo in ["take_back", "discard", "point_back"] {
                for u in FAILURES {
                    let (w, r) = run_script(&[(step, a), (undo, u)]);
                    if let Report::Cancelled { loose_ends, .. } = &r
                        && w.calls.contains(&undo)
                        && u != Answer::LateApplied
                        && undo != "discard"
                    {
                        assert!(!loose_ends.is_empty(), "{step} {a:?} {undo} {u:?}: {r}");
                    }
                }
            }
        }
    }
}

/// A driver that died after any step: settling finishes or cancels the
/// move as the target says, whatever fails while settling, and never
/// serves the model twice.
#[test]
fn a_move_left_unfinished_is_settled_either_way() {
    for tgt in [Tgt::Nothing, Tgt::Staged, Tgt::Serving] {
        for clients in [false, true] {
            let scripts: Vec<Vec<(&'static str, Answer)>> = std::iter::once(Vec::new())
                .chain(
                    ["discard", "retarget", "point_back", "release", "take_back"]
                        .iter()
                        .flat_map(|&s| FAILURES.iter().map(move |&a| vec![(s, a)])),
                )
                .collect();
            for script in scripts {
                let mut w = World::new(&script);
                w.src = Src::Lent;
                w.tgt = tgt;
                w.clients_at_target = clients;
                let r = settle(&mut w);
                check(&w, &r);
                if script.is_empty() {
                    if tgt == Tgt::Serving {
                        assert_eq!(
                            r,
                            Report::Moved {
                                release_pending: None
                            }
                        );
                    } else {
                        assert!(
                            matches!(&r, Report::Cancelled { loose_ends, .. } if loose_ends.is_empty()),
                            "{r}"
                        );
                        assert_eq!((w.src, w.tgt), (Src::Serving, Tgt::Nothing));
                        assert!(!w.clients_at_target);
                    }
                }
            }
        }
    }
}
