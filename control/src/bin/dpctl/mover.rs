//! `dpctl models move ID --to-server S`: moves a device model from the
//! server it runs on (`--socket`) to server S (`--to-server-socket`)
//! with the two-phase hand-over of `devplane_control::handover`, driven
//! over the daemons' control sockets: lend on the source, stage on the
//! target (the hand-over relayed through dpctl in pieces), every client
//! daemon whose VMs use the model retargets (`--retarget-client`,
//! default `--client-socket`), commit on the target, release on the
//! source. What happened is reported as it really happened: moved, or
//! left where it was (and at which step, why).

use std::path::{Path, PathBuf};
use std::time::Duration;

use devplane_control::config::ModelConfig;
use devplane_control::handover::{self, Discarded, Parties, Report, StepError};
use devplane_control::proto::{
    self, HANDOVER_PART_BYTES, ModelHandover, Placement, ProtoError, Request, Response,
};
use serde_json::json;

use super::{Cli, EXIT_FAILED, EXIT_NOT_FOUND, Failure, to_json};

/// Each step's limit: above the servers' own step timeout (5 s) so that
/// a server answers a step it could not take rather than being cut off.
const TIMEOUT: Duration = Duration::from_secs(10);

/// What one request to a party gave: its answer, or the step error.
fn ask(path: &Path, req: &Request) -> Result<Response, StepError> {
    match proto::call(path, req, TIMEOUT) {
        Ok(Response::Error { message }) | Ok(Response::NotFound { message }) => {
            Err(StepError::Refused(message))
        }
        Ok(r) => Ok(r),
        // Nothing was sent: certainly not applied.
        Err(e @ ProtoError::NotRunning { .. }) => Err(StepError::Refused(e.to_string())),
        Err(e) => Err(StepError::TimedOut(e.to_string())),
    }
}

fn unexpected(r: &Response) -> StepError {
    StepError::TimedOut(format!("unexpected answer {r:?}"))
}

fn ok(path: &Path, req: &Request) -> Result<(), StepError> {
    match ask(path, req)? {
        Response::Ok => Ok(()),
        r => Err(unexpected(&r)),
    }
}

/// The parties of one move, reached over their control sockets.
struct Sockets<'a> {
    model: u32,
    from: u32,
    to: u32,
    to_worker: usize,
    from_sock: &'a Path,
    to_sock: &'a Path,
    clients: &'a [PathBuf],
    /// VMs the clients retargeted to the target (client socket, VMs).
    retargeted: Vec<(PathBuf, Vec<u32>)>,
    /// The hand-over's size, bytes of JSON.
    handover_bytes: usize,
}

impl Parties for Sockets<'_> {
    type Handover = (ModelConfig, Box<ModelHandover>);

    fn lend(&mut self) -> Result<Self::Handover, StepError> {
        let lend = Request::LendModel {
            model: self.model,
            to: Some(self.to),
        };
        match ask(self.from_sock, &lend)? {
            Response::Lent { model, handover } => Ok((model, handover)),
            r => Err(unexpected(&r)),
        }
    }

    fn stage(&mut self, (mut cfg, h): Self::Handover) -> Result<(), StepError> {
        let text = serde_json::to_string(&h)
            .map_err(|e| StepError::Refused(format!("encoding the hand-over: {e}")))?;
        self.handover_bytes = text.len();
        let mut rest = text.as_str();
        while !rest.is_empty() {
            let mut n = rest.len().min(HANDOVER_PART_BYTES);
            while !rest.is_char_boundary(n) {
                n -= 1;
            }
            let (part, tail) = rest.split_at(n);
            ok(
                self.to_sock,
                &Request::StagePart {
                    model: self.model,
                    part: part.to_string(),
                },
            )?;
            rest = tail;
        }
        cfg.worker = self.to_worker;
        ok(self.to_sock, &Request::StageModel { model: cfg })
    }

    fn retarget(&mut self, to_target: bool) -> Result<(), StepError> {
        let server = if to_target { self.to } else { self.from };
        let mut first_err = None;
        for c in self.clients {
            let r = match proto::call_client(
                c,
                &Request::RetargetModel {
                    model: self.model,
                    server,
                },
                TIMEOUT,
            ) {
                Ok(Response::Retargeted { vms, .. }) => Ok(vms),
                Ok(Response::Error { message }) | Ok(Response::NotFound { message }) => Err(
                    StepError::Refused(format!("client daemon {}: {message}", c.display())),
                ),
                Ok(r) => Err(unexpected(&r)),
                Err(e @ ProtoError::ClientNotRunning { .. }) => {
                    Err(StepError::Refused(e.to_string()))
                }
                Err(e) => Err(StepError::TimedOut(e.to_string())),
            };
            match r {
                Ok(vms) if to_target => self.retargeted.push((c.clone(), vms)),
                Ok(_) => {}
                // Going forward, the first client that fails cancels the
                // move (those before it are pointed back by the undo).
                Err(e) if to_target => return Err(e),
                // Pointing back: tell every client, report the first
                // failure.
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if !to_target {
            self.retargeted.clear();
        }
        first_err.map_or(Ok(()), Err)
    }

    fn commit(&mut self) -> Result<(), StepError> {
        ok(self.to_sock, &Request::CommitModel { model: self.model })
    }

    fn release(&mut self) -> Result<(), StepError> {
        ok(self.from_sock, &Request::ReleaseModel { model: self.model })
    }

    fn take_back(&mut self) -> Result<(), StepError> {
        ok(
            self.from_sock,
            &Request::TakeBackModel { model: self.model },
        )
    }

    fn discard(&mut self) -> Result<Discarded, StepError> {
        match ask(self.to_sock, &Request::DiscardModel { model: self.model })? {
            Response::Discarded { serving: false } => Ok(Discarded::Gone),
            Response::Discarded { serving: true } => Ok(Discarded::Serving),
            r => Err(unexpected(&r)),
        }
    }
}

fn failed(message: String) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message,
    }
}

/// Where a server stands with `model`.
fn placement(path: &Path, model: u32, which: &str) -> Result<Placement, Failure> {
    match proto::call(path, &Request::ModelPlacement { model }, TIMEOUT) {
        Ok(Response::Placement(p)) => Ok(p),
        Ok(Response::Error { message }) => Err(failed(format!("the {which} refused: {message}"))),
        Ok(r) => Err(failed(format!(
            "the {which} at {} answered {r:?}: is it a devplane-server of this version?",
            path.display()
        ))),
        Err(e) => Err(failed(format!("the {which} is down or unknown: {e}"))),
    }
}

/// Settles a move of `a.model` from server `from` to `a.to` left
/// unfinished (see [`handover::settle`]).
fn settle(cli: &Cli, a: &MoveArgs, from: u32, to_sock: &Path, clients: &[PathBuf]) -> Report {
    let mut p = Sockets {
        model: a.model,
        from,
        to: a.to,
        to_worker: a.to_worker,
        from_sock: &cli.socket,
        to_sock,
        clients,
        retargeted: Vec::new(),
        handover_bytes: 0,
    };
    handover::settle(&mut p)
}

/// The move request of `dpctl models move`.
pub(super) struct MoveArgs<'a> {
    pub model: u32,
    pub to: u32,
    pub to_worker: usize,
    pub to_socket: Option<&'a Path>,
    pub clients: &'a [PathBuf],
    pub accept_rollback: bool,
}

/// Runs a move between servers and reports it.
pub(super) fn move_to_server(cli: &Cli, a: &MoveArgs) -> Result<String, Failure> {
    let model = a.model;
    let to_sock = a
        .to_socket
        .map(Path::to_path_buf)
        .unwrap_or_else(|| proto::default_socket(a.to));
    let default_clients = [cli.client_socket.clone()];
    let clients = if a.clients.is_empty() {
        &default_clients[..]
    } else {
        a.clients
    };
    // The source: which server it is, and that it serves the model.
    let src = placement(&cli.socket, model, "source server (--socket)")?;
    let mut settled = None;
    // (A lent model is still in the source's configuration: `worker` says
    // which worker keeps it aside, not that it is served.)
    if src.lent {
        // A move left unfinished (its dpctl died, or it was in doubt):
        // settled with its own target, then this move goes on from where
        // the model is.
        if src.lent_to != Some(a.to) {
            return Err(failed(format!(
                "model {model} is lent by server {} to a move not settled yet{}: run this \
                 move with that move's target (--to-server) to settle it first",
                src.server,
                src.lent_to
                    .map_or(" (its target unknown)".to_string(), |t| format!(
                        " to server {t}"
                    )),
            )));
        }
        // A target restarted since the lend may have committed, served
        // and acknowledged writes, all lost with it: "gone" from it does
        // not mean it never committed, and taking the model back would
        // roll those writes back. The operator decides.
        let tgt = placement(&to_sock, model, &format!("target server {}", a.to))?;
        if tgt.server != a.to {
            return Err(failed(format!(
                "the server at {} is server {}, not server {}: give the target's socket with \
                 --to-server-socket (settling with another server could serve the model twice)",
                to_sock.display(),
                tgt.server,
                a.to
            )));
        }
        if let (Some(lent), Some(up)) = (src.lent_ms, tgt.uptime_ms)
            && up < lent
            && tgt.worker.is_none()
            && !a.accept_rollback
        {
            return Err(failed(format!(
                "model {model} was lent by server {} to server {} {} s ago, and server {} \
                 restarted since ({} s ago): if it had committed the move, the writes it \
                 acknowledged are lost with it and serving the source's older copy rolls \
                 them back; add --accept-rollback to serve the source's copy anyway",
                src.server,
                a.to,
                lent / 1000,
                a.to,
                up / 1000
            )));
        }
        let report = settle(cli, a, src.server, &to_sock, clients);
        match report {
            Report::Moved { .. } => {
                return Ok(if cli.json {
                    to_json(&json!({
                        "action": "move",
                        "model": model,
                        "from": src.server,
                        "to": a.to,
                        "result": "moved",
                        "settled": report.to_string(),
                    }))
                } else {
                    format!("settled the move of model {model} left unfinished: {report}\n")
                });
            }
            Report::InDoubt { .. } => {
                return Err(failed(format!(
                    "model {model} between server {} and server {}: {report}",
                    src.server, a.to
                )));
            }
            Report::Cancelled { .. } => settled = Some(report.to_string()),
        }
    }
    let (from, worker, lent, _) = match settled {
        None => (src.server, src.worker, src.lent, src.staged),
        Some(_) => {
            let p = placement(&cli.socket, model, "source server (--socket)")?;
            (p.server, p.worker, p.lent, p.staged)
        }
    };
    if lent {
        return Err(failed(format!(
            "model {model} is still lent by server {from} after settling the move left \
             unfinished ({}): try again",
            settled.clone().unwrap_or_default()
        )));
    }
    if worker.is_none() {
        return Err(Failure {
            code: EXIT_NOT_FOUND,
            message: format!(
                "model {model} is not served by server {from} (the server at {}): give the \
                 socket of the server that runs it with --socket",
                cli.socket.display()
            ),
        });
    }
    if from == a.to {
        return Err(failed(format!(
            "model {model} is on server {} already (to move it between that server's \
             workers, give --to-worker without --to-server)",
            a.to
        )));
    }
    // The target: up, the server named, not serving the model.
    let target = format!("target server {} ({})", a.to, to_sock.display());
    let t = placement(&to_sock, model, &target)?;
    let (to_id, to_worker, to_staged) = (t.server, t.worker, t.staged);
    if to_id != a.to {
        return Err(failed(format!(
            "the server at {} is server {to_id}, not server {}: give the target's socket with \
             --to-server-socket",
            to_sock.display(),
            a.to
        )));
    }
    if to_worker.is_some() || to_staged {
        return Err(failed(format!(
            "server {} already {} model {model}: it cannot take it again",
            a.to,
            if to_staged { "stages" } else { "serves" }
        )));
    }
    let mut p = Sockets {
        model,
        from,
        to: a.to,
        to_worker: a.to_worker,
        from_sock: &cli.socket,
        to_sock: &to_sock,
        clients,
        retargeted: Vec::new(),
        handover_bytes: 0,
    };
    let started = std::time::Instant::now();
    let report = handover::run(&mut p);
    let took_us = started.elapsed().as_micros() as u64;
    let vms: Vec<u32> = p.retargeted.iter().flat_map(|(_, v)| v.clone()).collect();
    match &report {
        Report::Moved { release_pending } => Ok(if cli.json {
            to_json(&json!({
                "action": "move",
                "model": model,
                "from": from,
                "to": a.to,
                "worker": a.to_worker,
                "result": "moved",
                "retargeted_vms": vms,
                "client_daemons": clients.len(),
                "handover_bytes": p.handover_bytes,
                "took_us": took_us,
                "release_pending": release_pending,
                "settled": settled,
            }))
        } else {
            let vms_text = if vms.is_empty() {
                "no running VM uses it".to_string()
            } else {
                format!(
                    "VM{} {} now reach{} it there",
                    if vms.len() == 1 { "" } else { "s" },
                    vms.iter().map(u32::to_string).collect::<Vec<_>>().join(","),
                    if vms.len() == 1 { "es" } else { "" }
                )
            };
            let mut out = settled.as_ref().map_or(String::new(), |s| {
                format!("first settled a move left unfinished: {s}\n")
            });
            out.push_str(&format!(
                "moved model {model} from server {from} to server {} (worker {}); {vms_text}\n",
                a.to, a.to_worker
            ));
            if let Some(w) = release_pending {
                out.push_str(&format!(
                    "warning: server {from} did not confirm dropping its lent copy ({w}); it \
                     never serves it\n"
                ));
            }
            out
        }),
        Report::Cancelled { .. } => Err(failed(format!(
            "model {model} stays on server {from}: {report}"
        ))),
        Report::InDoubt { .. } => Err(failed(format!(
            "model {model} between server {from} and server {}: {report}",
            a.to
        ))),
    }
}
