//! What `devplane-server` answers on its control socket
//! ([`devplane_control::socket`]): each [`Request`] applied to the
//! [`Server`] on the thread that owns it.

use std::time::Duration;

use devplane_control::proto::{Placement, Request, Response, WorkerCounters};

use crate::Server;
use crate::lifecycle::Tune;

fn done(r: Result<(), crate::ServerError>) -> Response {
    match r {
        Ok(()) => Response::Ok,
        Err(e) => Response::Error {
            message: e.to_string(),
        },
    }
}

/// Answers one request from the control socket (on the server's owning
/// thread): a console's connection is handed to the console thread
/// ([`Server::attach_console`]), every other request is [`handle`]d and
/// answered.
pub fn serve(server: &mut Server, mut pending: devplane_control::socket::Pending) {
    if let Request::Console { vm, model, write } = pending.request
        && let Some(stream) = pending.reply.take_stream()
    {
        // Answered on the connection, either way.
        let _ = server.attach_console(vm, model, write, stream);
        return;
    }
    let answer = handle(server, pending.request);
    let _ = pending.reply.send(answer);
}

/// Applies a request to the server (on its owning thread).
pub fn handle(server: &mut Server, request: Request) -> Response {
    match request {
        Request::Stats => {
            // XDP mode: per device queue, what the program redirected
            // (`queue_N_redirected`) and what each worker received
            // (`rx_queue_N`), zeros included: a queue that gets nothing
            // shows.
            let queues = server.queue_stats().unwrap_or_default();
            let mut xdp: Vec<(String, u64)> = server
                .xdp_stats()
                .and_then(Result::ok)
                .map(|s| s.nonzero().map(|(k, v)| (k.to_string(), v)).collect())
                .unwrap_or_default();
            xdp.extend(
                queues
                    .redirected
                    .iter()
                    .enumerate()
                    .map(|(q, &v)| (format!("queue_{q}_redirected"), v)),
            );
            Response::Stats {
                server: server.id(),
                workers: server
                    .worker_stats()
                    .iter()
                    .enumerate()
                    .map(|(i, w)| {
                        let mut counters: Vec<(String, u64)> =
                            w.named().map(|(k, v)| (k.to_string(), v)).collect();
                        if let Some(per_queue) = queues.served.get(i) {
                            counters.extend(
                                per_queue
                                    .iter()
                                    .enumerate()
                                    .map(|(q, &v)| (format!("rx_queue_{q}"), v)),
                            );
                        }
                        WorkerCounters {
                            worker: i,
                            counters,
                        }
                    })
                    .collect(),
                xdp,
                consoles: server.console_stats(),
            }
        }
        Request::Console { .. } => Response::Error {
            message: "a console needs a connection of its own: use dpctl vms console".into(),
        },
        Request::MoveModel { model, worker } => done(server.move_model(model, worker)),
        Request::AddModel { model } => done(server.add_model(model)),
        Request::RemoveModel { model } => done(server.remove_model(model)),
        Request::ForwardModel {
            model,
            server: to,
            ip,
            mac,
        } => done(server.forward_model(
            model,
            crate::forward::Forward {
                server: to,
                ip,
                mac,
            },
        )),
        Request::UnforwardModel { model } => done(server.unforward_model(model)),
        Request::SuspendVm { vm } => done(server.suspend_vm(vm)),
        Request::ResumeVm { vm } => done(server.resume_vm(vm)),
        Request::MigrateVm { vm, client } => done(server.migrate_vm(vm, client)),
        Request::Tune {
            spin_budget,
            idle_sleep_us,
            batch,
        } => {
            let cur = server.tuning();
            let t = Tune {
                spin_budget: spin_budget.unwrap_or(cur.spin_budget),
                idle_sleep: idle_sleep_us.map_or(cur.idle_sleep, Duration::from_micros),
                batch: batch.unwrap_or(cur.batch),
            };
            let ranges = devplane_control::config::Tuning {
                spin_budget: t.spin_budget,
                idle_sleep_us: u64::try_from(t.idle_sleep.as_micros()).unwrap_or(u64::MAX),
                batch: t.batch,
            };
            if let Err(e) = ranges.check() {
                return Response::Error {
                    message: e.to_string(),
                };
            }
            done(server.tune(t))
        }
        Request::SetKeys {
            client,
            current,
            previous,
        } => done(server.set_keys(client, devplane_control::proto::key_ring(current, previous))),
        Request::LendModel { model, to } => {
            if server.model_worker(model).is_none() && !server.lent_models().contains(&model) {
                return Response::NotFound {
                    message: format!("model {model} is not served by server {}", server.id()),
                };
            }
            match server.lend_out_to(model, to) {
                Ok((cfg, h)) => Response::Lent {
                    handover: Box::new(h.to_wire(model)),
                    model: cfg,
                },
                Err(e) => Response::Error {
                    message: e.to_string(),
                },
            }
        }
        Request::StagePart { model, part } => done(server.stage_part(model, &part)),
        Request::StageModel { model } => done(server.stage_wire(model)),
        Request::CommitModel { model } => done(server.commit_in(model)),
        Request::ReleaseModel { model } => done(server.release_lent(model)),
        Request::TakeBackModel { model } => done(server.take_back(model).map(|_| ())),
        Request::DiscardModel { model } => Response::Discarded {
            serving: server.discard_staged(model) == crate::StagedFate::Serving,
        },
        Request::ModelPlacement { model } => {
            let (worker, lent, staged) = server.placement(model);
            Response::Placement(Placement {
                server: server.id(),
                worker,
                lent,
                lent_to: server.lent_to(model),
                lent_ms: server.lent_for(model).map(|d| d.as_millis() as u64),
                uptime_ms: Some(server.uptime().as_millis() as u64),
                staged,
            })
        }
        Request::RetargetModel { .. } => Response::Error {
            message: "devplane-server does not run VMs: send a retarget to devplane-client \
                      (dpctl --client-socket)"
                .into(),
        },
        Request::LaunchVm { .. }
        | Request::ShutdownVm { .. }
        | Request::ListVms
        | Request::SnapshotVm { .. }
        | Request::RestoreVm { .. }
        | Request::ReceiveVm { .. }
        | Request::SendVm { .. } => Response::Error {
            message: "devplane-server does not run VMs: send VM launch, shutdown and \
                          listing to devplane-client (dpctl --client-socket)"
                .into(),
        },
    }
}
