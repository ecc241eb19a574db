//! The commands that talk to a running server over its control socket
//! (`devplane_control::proto`) instead of changing the database.

use std::time::Duration;

use devplane_control::proto::{self, Request, Response};
use serde_json::json;

use super::{Cli, Command, EXIT_FAILED, EXIT_USAGE, Failure, ModelsCmd, VmsCmd, table, to_json};

const TIMEOUT: Duration = Duration::from_secs(10);

/// For the database path's exhaustive match: these commands never get
/// there.
pub(super) fn handled_there() -> Failure {
    Failure {
        code: EXIT_FAILED,
        message: "internal error: daemon command reached the database path".into(),
    }
}

fn call(cli: &Cli, req: &Request) -> Result<Response, Failure> {
    let rsp = proto::call(&cli.socket, req, TIMEOUT).map_err(|e| Failure {
        code: EXIT_FAILED,
        message: e.to_string(),
    })?;
    match rsp {
        Response::Error { message } => Err(Failure {
            code: EXIT_FAILED,
            message: format!("the server refused: {message}"),
        }),
        other => Ok(other),
    }
}

fn action(
    cli: &Cli,
    req: Request,
    what: String,
    fields: serde_json::Value,
) -> Result<String, Failure> {
    call(cli, &req)?;
    Ok(if cli.json {
        to_json(&fields)
    } else {
        format!("{what}\n")
    })
}

/// Runs `cli`'s command if it is one for the running server.
pub(super) fn run(cli: &Cli) -> Result<Option<String>, Failure> {
    let out = match &cli.command {
        Command::Stats { watch, count } => match watch {
            None => stats(cli)?,
            Some(secs) => {
                let mut n = 0u64;
                loop {
                    let text = stats(cli)?;
                    print!("{}{text}", if cli.json { "" } else { "\n" });
                    n += 1;
                    if count.is_some_and(|c| n >= c) {
                        break String::new();
                    }
                    std::thread::sleep(Duration::from_secs((*secs).max(1)));
                }
            }
        },
        Command::Tune {
            spin_budget,
            idle_sleep_us,
            batch,
        } => {
            // Values not given are checked by the server against its own.
            let d = devplane_control::config::Tuning::default();
            devplane_control::config::Tuning {
                spin_budget: spin_budget.unwrap_or(d.spin_budget),
                idle_sleep_us: idle_sleep_us.unwrap_or(d.idle_sleep_us),
                batch: batch.unwrap_or(d.batch),
            }
            .check()
            .map_err(|e| Failure {
                code: EXIT_USAGE,
                message: e.to_string(),
            })?;
            action(
                cli,
                Request::Tune {
                    spin_budget: *spin_budget,
                    idle_sleep_us: *idle_sleep_us,
                    batch: *batch,
                },
                "tuned".into(),
                json!({"action": "tune", "spin_budget": spin_budget, "idle_sleep_us": idle_sleep_us, "batch": batch}),
            )?
        }
        Command::Models(ModelsCmd::Forward { owner: Some(_), .. })
            if matches!(cli.store, Some(devplane_control::store::StoreUrl::Etcd(_))) =>
        {
            return Ok(None);
        }
        Command::Models(ModelsCmd::Forward { owner: Some(_), .. }) => {
            return Err(Failure {
                code: EXIT_USAGE,
                message: "models forward --owner is a store change: give --store \
                          etcd:http://HOST:PORT (or --to-server, --ip and --mac for the \
                          owner's --socket)"
                    .into(),
            });
        }
        Command::Models(ModelsCmd::Unforward(_))
            if matches!(cli.store, Some(devplane_control::store::StoreUrl::Etcd(_))) =>
        {
            return Ok(None);
        }
        Command::Models(ModelsCmd::Forward {
            id,
            to_server: Some(to_server),
            ip: Some(ip),
            mac: Some(mac),
            ..
        }) => action(
            cli,
            Request::ForwardModel {
                model: id.id,
                server: *to_server,
                ip: *ip,
                mac: *mac,
            },
            format!("model {} is forwarded to server {to_server} at {ip}", id.id),
            json!({"action": "forward", "model": id.id, "server": to_server, "ip": ip.to_string()}),
        )?,
        Command::Models(ModelsCmd::Unforward(id)) => action(
            cli,
            Request::UnforwardModel { model: id.id },
            format!("model {} is no longer forwarded", id.id),
            json!({"action": "unforward", "model": id.id}),
        )?,
        Command::Models(ModelsCmd::Move {
            id,
            to_worker,
            to_server: Some(to),
            to_server_socket,
            retarget_clients,
            accept_rollback,
        }) => super::mover::move_to_server(
            cli,
            &super::mover::MoveArgs {
                model: id.id,
                to: *to,
                to_worker: to_worker.unwrap_or(0),
                to_socket: to_server_socket.as_deref(),
                clients: retarget_clients,
                accept_rollback: *accept_rollback,
            },
        )?,
        Command::Models(ModelsCmd::Move {
            id,
            to_worker: Some(to_worker),
            to_server: None,
            ..
        }) => action(
            cli,
            Request::MoveModel {
                model: id.id,
                worker: *to_worker,
            },
            format!("moved model {} to worker {to_worker}", id.id),
            json!({"action": "move", "model": id.id, "worker": to_worker}),
        )?,
        Command::Vms(VmsCmd::Suspend {
            id,
            server_only: true,
        }) => action(
            cli,
            Request::SuspendVm { vm: id.id },
            format!("VM {}'s interrupts are held", id.id),
            json!({"action": "suspend", "vm": id.id}),
        )?,
        Command::Vms(VmsCmd::Resume {
            id,
            server_only: true,
        }) => action(
            cli,
            Request::ResumeVm { vm: id.id },
            format!("VM {}'s interrupts are delivered again", id.id),
            json!({"action": "resume", "vm": id.id}),
        )?,
        Command::Vms(VmsCmd::Restore { file, client }) => restore(cli, file, *client)?,
        Command::Vms(VmsCmd::Suspend { id, .. }) => suspend(cli, id.id)?,
        Command::Vms(VmsCmd::Resume { id, .. }) => resume(cli, id.id)?,
        Command::Vms(VmsCmd::Migrate {
            id,
            to_client: Some(to),
            to_client_socket,
            ..
        }) => migrate_live(cli, id.id, *to, to_client_socket.as_deref())?,
        Command::Vms(VmsCmd::Migrate {
            id,
            client: Some(client),
            ..
        }) => action(
            cli,
            Request::MigrateVm {
                vm: id.id,
                client: *client,
            },
            format!("VM {}'s interrupts now go to client {client}", id.id),
            json!({"action": "migrate", "vm": id.id, "client": client}),
        )?,
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// Suspends VM `vm`: the client daemon holds its vCPUs (each finishes the
/// exit it is in), then the server holds its interrupts (one arriving
/// between the two waits in the VM's interrupt controller). If the server
/// refuses, the vCPUs run again.
fn suspend(cli: &Cli, vm: u32) -> Result<String, Failure> {
    let status = super::client::one_vm(cli, &Request::SuspendVm { vm })?;
    if let Err(f) = call(cli, &Request::SuspendVm { vm }) {
        let undo = match super::client::one_vm(cli, &Request::ResumeVm { vm }) {
            Ok(_) => "; its vCPUs run again".to_string(),
            Err(u) => format!("; its vCPUs stay held: {}", u.message),
        };
        return Err(Failure {
            code: f.code,
            message: format!("{}{undo}", f.message),
        });
    }
    Ok(if cli.json {
        to_json(&json!({"action": "suspend", "vm": vm, "state": status.state}))
    } else {
        format!("suspended VM {vm} (its vCPUs and interrupts are held)\n")
    })
}

/// Resumes VM `vm`: the client daemon runs its vCPUs again, then the server
/// delivers its held interrupts. Both are asked even if the first refuses
/// (a VM shut down while suspended still gets its interrupts released).
fn resume(cli: &Cli, vm: u32) -> Result<String, Failure> {
    let client = super::client::one_vm(cli, &Request::ResumeVm { vm });
    let server = call(cli, &Request::ResumeVm { vm });
    let status = match (client, server) {
        (Ok(s), Ok(_)) => s,
        (Err(c), Ok(_)) => {
            return Err(Failure {
                code: c.code,
                message: format!("{} (the server delivers its interrupts again)", c.message),
            });
        }
        (Ok(_), Err(s)) => {
            return Err(Failure {
                code: s.code,
                message: format!("{} (its vCPUs run again)", s.message),
            });
        }
        (Err(c), Err(s)) => {
            return Err(Failure {
                code: c.code,
                message: format!("{}; {}", c.message, s.message),
            });
        }
    };
    Ok(if cli.json {
        to_json(&json!({"action": "resume", "vm": vm, "state": status.state}))
    } else {
        format!("resumed VM {vm}\n")
    })
}

/// Restores the VM of snapshot `file` on the client daemon (held), points
/// the server's interrupts for it at client `client`, runs its vCPUs, then
/// lets the server deliver what it held.
fn restore(cli: &Cli, file: &std::path::Path, client: u32) -> Result<String, Failure> {
    let path = super::client::absolute(file)?;
    let status = super::client::one_vm(cli, &Request::RestoreVm { path, client })?;
    let vm = status.vm;
    let held = |f: Failure, step: &str| Failure {
        code: f.code,
        message: format!(
            "{} (VM {vm} was restored on client {client} and is held: {step})",
            f.message
        ),
    };
    call(cli, &Request::MigrateVm { vm, client }).map_err(|f| {
        held(
            f,
            "resume it once the server sends its interrupts there, or shut it down",
        )
    })?;
    super::client::one_vm(cli, &Request::ResumeVm { vm })
        .map_err(|f| held(f, "its vCPUs did not start"))?;
    call(cli, &Request::ResumeVm { vm }).map_err(|f| Failure {
        code: f.code,
        message: format!(
            "{} (VM {vm} runs on client {client}; the server still holds its interrupts)",
            f.message
        ),
    })?;
    Ok(if cli.json {
        to_json(&json!({"action": "restore", "vm": vm, "client": client}))
    } else {
        format!("restored VM {vm} on client {client}\n")
    })
}

/// Live-migrates VM `vm` from the client daemon at `--client-socket` to
/// client `to`'s daemon: the target listens; the server holds the VM's
/// interrupts; the source copies the VM over (and on failure runs it
/// again, and the server lets the interrupts go); the server sends the
/// interrupts to `to` (if it refuses before changing anything,
/// [`roll_back`]); the target runs the
/// VM; the server delivers what it held; the source frees its suspended
/// copy.
fn migrate_live(
    cli: &Cli,
    vm: u32,
    to: u32,
    to_socket: Option<&std::path::Path>,
) -> Result<String, Failure> {
    let target: std::path::PathBuf =
        to_socket.map_or_else(|| proto::default_client_socket(to), Into::into);
    let (addr, token) = match super::client::call_on(&target, &Request::ReceiveVm { vm })? {
        Response::Listening { addr, token } => (addr, token),
        _ => {
            return Err(Failure {
                code: EXIT_FAILED,
                message: "the target client daemon answered with something else".into(),
            });
        }
    };
    call(cli, &Request::SuspendVm { vm })?;
    let sent = match super::client::call(
        cli,
        &Request::SendVm {
            vm,
            to: addr,
            token,
        },
    ) {
        Ok(r) => r,
        Err(f) => {
            let undo = match call(cli, &Request::ResumeVm { vm }) {
                Ok(_) => String::new(),
                Err(u) => format!("; the server still holds its interrupts: {}", u.message),
            };
            return Err(Failure {
                code: f.code,
                message: format!("{}{undo}", f.message),
            });
        }
    };
    let step = |f: Failure, what: &str| Failure {
        code: f.code,
        message: format!(
            "{} (VM {vm} was copied to client {to} and is suspended on both: {what})",
            f.message
        ),
    };
    match call(cli, &Request::MigrateVm { vm, client: to }) {
        Ok(_) => {}
        Err(f) if refused_before_any_change(&f.message) => {
            return Err(roll_back(cli, vm, to, &target, f));
        }
        // A timeout or a worker that did not confirm: the server may have
        // switched the VM's route already, so resuming the source could
        // leave it unanswered. Nothing is undone; the operator decides.
        Err(f) => {
            return Err(step(
                f,
                "the server may already send its interrupts to the target: see \
                 `dpctl vms running` on both daemons, then resume one copy",
            ));
        }
    }
    super::client::one_vm_on(&target, &Request::ResumeVm { vm })
        .map_err(|f| step(f, "the server now sends its interrupts to the target"))?;
    call(cli, &Request::ResumeVm { vm }).map_err(|f| Failure {
        code: f.code,
        message: format!(
            "{} (VM {vm} runs on client {to}; the server still holds its interrupts)",
            f.message
        ),
    })?;
    super::client::one_vm(cli, &Request::ShutdownVm { vm }).map_err(|f| Failure {
        code: f.code,
        message: format!(
            "{} (VM {vm} runs on client {to}; its suspended copy at the source was not freed)",
            f.message
        ),
    })?;
    let Response::Migrated {
        rounds,
        bytes,
        final_pages,
        downtime_us,
        total_us,
        ..
    } = sent
    else {
        return Err(Failure {
            code: EXIT_FAILED,
            message: "the source client daemon answered the migration with something else".into(),
        });
    };
    Ok(if cli.json {
        to_json(&json!({
            "action": "migrate", "vm": vm, "client": to, "rounds": rounds, "bytes": bytes,
            "final_pages": final_pages, "downtime_us": downtime_us, "total_us": total_us,
        }))
    } else {
        format!(
            "migrated VM {vm} to client {to}: {bytes} bytes, {rounds} pre-copy rounds, \
             {final_pages} pages while suspended, downtime {:.1} ms, total {:.1} ms\n",
            downtime_us as f64 / 1000.0,
            total_us as f64 / 1000.0
        )
    })
}

/// Whether a server's answer to `MigrateVm` is one of its refusals made
/// before it changes anything (`Server::migrate_vm` checks the client and
/// the VM first): only then is a rollback safe.
fn refused_before_any_change(message: &str) -> bool {
    message.contains("is not registered on this server") || message.contains("is not known here")
}

/// A live migration the server refused to complete (it did not point
/// VM `vm`'s interrupts at client `to`: that client is not registered
/// there) after the copy: the target's copy is shut down, the
/// source's vCPUs run again and the server delivers the interrupts it
/// held, so the VM runs on at the source, as after a copy that failed.
/// What could not be undone is said.
fn roll_back(cli: &Cli, vm: u32, to: u32, target: &std::path::Path, refused: Failure) -> Failure {
    let mut left = Vec::new();
    if let Err(f) = super::client::one_vm_on(target, &Request::ShutdownVm { vm }) {
        left.push(format!(
            "its copy on client {to} was not shut down ({})",
            f.message
        ));
    }
    let runs = super::client::one_vm(cli, &Request::ResumeVm { vm });
    if let Err(f) = &runs {
        left.push(format!(
            "its vCPUs at the source did not start ({})",
            f.message
        ));
    }
    if let Err(f) = call(cli, &Request::ResumeVm { vm }) {
        left.push(format!(
            "the server still holds its interrupts ({})",
            f.message
        ));
    }
    let outcome = if left.is_empty() {
        format!("the migration was rolled back: VM {vm} runs on at the source")
    } else if runs.is_ok() {
        format!("VM {vm} runs on at the source, but {}", left.join("; "))
    } else {
        format!(
            "VM {vm} was copied to client {to} and is suspended: {}",
            left.join("; ")
        )
    };
    Failure {
        code: refused.code,
        message: format!("{} ({outcome})", refused.message),
    }
}

/// The per-worker table: [`COLUMNS`], then, on an interface of several
/// queues, each queue's received frames (`rx_queue_N`, in queue order).
fn worker_table(workers: &[devplane_control::proto::WorkerCounters]) -> String {
    let mut queues: Vec<(u32, &str)> = workers
        .iter()
        .flat_map(|w| &w.counters)
        .filter_map(|(k, _)| Some((k.strip_prefix("rx_queue_")?.parse().ok()?, k.as_str())))
        .collect();
    queues.sort_unstable();
    queues.dedup();
    if queues.len() < 2 {
        queues.clear();
    }
    let mut headers = vec!["worker"];
    headers.extend_from_slice(COLUMNS);
    headers.extend(queues.iter().map(|(_, k)| *k));
    let rows = workers
        .iter()
        .map(|w| {
            let mut r = vec![w.worker.to_string()];
            for c in &headers[1..] {
                let v = w
                    .counters
                    .iter()
                    .find(|(k, _)| k == c)
                    .map_or(0, |(_, v)| *v);
                r.push(v.to_string());
            }
            r
        })
        .collect();
    table(&headers, rows)
}

/// The columns of the per-worker table, in order.
const COLUMNS: &[&str] = &[
    "rx",
    "tx",
    "datagrams",
    "records",
    "duplicates",
    "malformed",
    "no_such_model",
    "irqs_sent",
    "irqs_held",
    "sleeps",
    "service_p50_ns",
    "service_p99_ns",
    "service_p999_ns",
];

fn stats(cli: &Cli) -> Result<String, Failure> {
    let Response::Stats {
        server,
        workers,
        xdp,
        consoles,
    } = call(cli, &Request::Stats)?
    else {
        return Err(Failure {
            code: EXIT_FAILED,
            message: "the server answered stats with something else".into(),
        });
    };
    if cli.json {
        let workers: Vec<serde_json::Value> = workers
            .iter()
            .map(|w| {
                let mut m = serde_json::Map::new();
                m.insert("worker".into(), json!(w.worker));
                for (k, v) in &w.counters {
                    m.insert(k.clone(), json!(v));
                }
                serde_json::Value::Object(m)
            })
            .collect();
        let xdp: serde_json::Map<String, serde_json::Value> =
            xdp.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        return Ok(to_json(
            &json!({"server": server, "workers": workers, "xdp": xdp, "consoles": consoles}),
        ));
    }
    let mut out = format!("server {server}\n");
    out.push_str(&worker_table(&workers));
    if !xdp.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["xdp counter", "value"],
            xdp.iter()
                .map(|(k, v)| vec![k.clone(), v.to_string()])
                .collect(),
        ));
    }
    if !consoles.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "console model",
                "viewers",
                "writer",
                "output_bytes",
                "input_bytes",
                "viewer_dropped_bytes",
                "tap_dropped_bytes",
                "writers_refused",
            ],
            consoles
                .iter()
                .map(|c| {
                    vec![
                        c.model.to_string(),
                        c.viewers.to_string(),
                        if c.writer { "yes" } else { "no" }.to_string(),
                        c.output_bytes.to_string(),
                        c.input_bytes.to_string(),
                        c.viewer_dropped_bytes.to_string(),
                        c.tap_dropped_bytes.to_string(),
                        c.writers_refused.to_string(),
                    ]
                })
                .collect(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use devplane_control::proto::WorkerCounters;

    fn worker(worker: usize, counters: &[(&str, u64)]) -> WorkerCounters {
        WorkerCounters {
            worker,
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    /// Only the server's refusals made before any change roll a migration
    /// back; a timeout does not (the route may have switched).
    #[test]
    fn only_a_refusal_before_any_change_rolls_back() {
        assert!(refused_before_any_change(
            "the server refused: client 8 is not registered on this server"
        ));
        assert!(refused_before_any_change(
            "the server refused: VM 3 is not known here"
        ));
        assert!(!refused_before_any_change(
            "the server refused: a worker did not apply the change within 5 s"
        ));
        assert!(!refused_before_any_change(
            "timed out waiting for the server's answer"
        ));
    }

    /// On a multi-queue interface the plain table shows each queue's
    /// frames, in queue order (10 after 9), as `--json` does; on one
    /// queue it does not.
    #[test]
    fn the_worker_table_shows_each_queue_of_a_multi_queue_interface() {
        let many = [
            worker(
                0,
                &[
                    ("rx", 7),
                    ("rx_queue_10", 1),
                    ("rx_queue_9", 2),
                    ("rx_queue_0", 4),
                ],
            ),
            worker(1, &[("rx", 5), ("rx_queue_0", 3)]),
        ];
        let text = worker_table(&many);
        let head = text.lines().next().unwrap();
        let q0 = head.find("rx_queue_0").expect(head);
        let q9 = head.find("rx_queue_9").expect(head);
        let q10 = head.find("rx_queue_10").expect(head);
        assert!(q0 < q9 && q9 < q10, "{head}");
        let row1: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(&row1[row1.len() - 3..], ["4", "2", "1"], "{text}");
        let row2: Vec<&str> = text.lines().nth(2).unwrap().split_whitespace().collect();
        assert_eq!(&row2[row2.len() - 3..], ["3", "0", "0"], "{text}");
        let one = worker_table(&[worker(0, &[("rx", 7), ("rx_queue_0", 7)])]);
        assert!(!one.contains("rx_queue"), "{one}");
    }
}
