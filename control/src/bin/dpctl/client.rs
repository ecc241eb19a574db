//! The commands that talk to a running client daemon (`devplane-client`)
//! over its control socket (`--client-socket`): VM launch, shutdown and
//! the list of its VMs.

use std::time::Duration;

use devplane_control::proto::{self, Request, Response, VcpuEnd, VmRunState, VmStatus};
use serde_json::{Value, json};

use super::{Cli, Command, EXIT_FAILED, EXIT_NOT_FOUND, Failure, VmsCmd, table, to_json};

/// Starting or stopping a VM takes a moment (guest memory, threads); the
/// daemon's own limit per request is 10 s.
const TIMEOUT: Duration = Duration::from_secs(15);

pub(super) fn call(cli: &Cli, req: &Request) -> Result<Response, Failure> {
    call_on(&cli.client_socket, req)
}

/// [`call`] to the client daemon listening on `socket`.
pub(super) fn call_on(socket: &std::path::Path, req: &Request) -> Result<Response, Failure> {
    let rsp = proto::call_client(socket, req, TIMEOUT).map_err(|e| Failure {
        code: EXIT_FAILED,
        message: e.to_string(),
    })?;
    match rsp {
        Response::Error { message } => Err(Failure {
            code: EXIT_FAILED,
            message: format!("the client daemon refused: {message}"),
        }),
        Response::NotFound { message } => Err(Failure {
            code: EXIT_NOT_FOUND,
            message,
        }),
        other => Ok(other),
    }
}

pub(super) fn one_vm(cli: &Cli, req: &Request) -> Result<VmStatus, Failure> {
    one_vm_on(&cli.client_socket, req)
}

/// [`one_vm`] from the client daemon listening on `socket`.
pub(super) fn one_vm_on(socket: &std::path::Path, req: &Request) -> Result<VmStatus, Failure> {
    match call_on(socket, req)? {
        Response::Vm { vm } => Ok(vm),
        _ => Err(Failure {
            code: EXIT_FAILED,
            message: "the client daemon answered with something other than a VM".into(),
        }),
    }
}

fn with_action(action: &str, vm: &VmStatus) -> String {
    let mut v = serde_json::to_value(vm).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut v {
        map.insert("action".into(), json!(action));
    }
    to_json(&v)
}

fn vcpus(n: usize) -> String {
    format!("{n} vCPU{}", if n == 1 { "" } else { "s" })
}

/// `done 60000`, `stopped`, `error (why)`.
fn how(e: &VcpuEnd) -> String {
    match (&e.value, &e.error) {
        (Some(v), _) => format!("{} {v}", e.exit),
        (None, Some(err)) => format!("{} ({err})", e.exit),
        (None, None) => e.exit.clone(),
    }
}

/// Runs `cli`'s command if it is one for the client daemon.
pub(super) fn run(cli: &Cli) -> Result<Option<String>, Failure> {
    let out = match &cli.command {
        Command::Vms(VmsCmd::Launch(id)) => {
            let vm = one_vm(cli, &Request::LaunchVm { vm: id.id })?;
            if cli.json {
                with_action("launch", &vm)
            } else {
                format!("launched VM {} ({})\n", vm.vm, vcpus(vm.vcpus))
            }
        }
        Command::Vms(VmsCmd::Shutdown(id)) => {
            let vm = one_vm(cli, &Request::ShutdownVm { vm: id.id })?;
            if cli.json {
                with_action("shutdown", &vm)
            } else {
                let mut out = if vm.by_itself {
                    format!("VM {} had stopped by itself; freed\n", vm.vm)
                } else {
                    format!("shut down VM {}\n", vm.vm)
                };
                out.push_str(&table(
                    &["VCPU", "EXIT", "VALUE", "EXITS", "REMOTE", "LOCAL"],
                    vm.ended
                        .iter()
                        .map(|e| {
                            vec![
                                e.vcpu.to_string(),
                                match &e.error {
                                    Some(err) => format!("{} ({err})", e.exit),
                                    None => e.exit.clone(),
                                },
                                e.value.map_or_else(|| "-".into(), |v| v.to_string()),
                                e.exits.to_string(),
                                e.remote.to_string(),
                                e.local.to_string(),
                            ]
                        })
                        .collect(),
                ));
                out
            }
        }
        Command::Vms(VmsCmd::Snapshot { id, file }) => {
            let path = absolute(file)?;
            one_vm(
                cli,
                &Request::SnapshotVm {
                    vm: id.id,
                    path: path.clone(),
                },
            )?;
            if cli.json {
                to_json(&json!({"action": "snapshot", "vm": id.id, "file": path}))
            } else {
                format!("VM {} snapshotted to {}\n", id.id, path.display())
            }
        }
        Command::Vms(VmsCmd::Running) => {
            let Response::Vms { vms } = call(cli, &Request::ListVms)? else {
                return Err(Failure {
                    code: EXIT_FAILED,
                    message: "the client daemon answered the VM list with something else".into(),
                });
            };
            if cli.json {
                to_json(&serde_json::to_value(&vms).unwrap_or(Value::Null))
            } else {
                running_table(&vms)
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(out))
}

/// `file` as an absolute path (the daemon may run in another directory).
pub(super) fn absolute(file: &std::path::Path) -> Result<std::path::PathBuf, Failure> {
    std::path::absolute(file).map_err(|e| Failure {
        code: EXIT_FAILED,
        message: format!("{}: {e}", file.display()),
    })
}

fn running_table(vms: &[VmStatus]) -> String {
    let rows = vms
        .iter()
        .map(|v| {
            let last = if v.ended.is_empty() {
                "-".to_string()
            } else {
                let ends = v.ended.iter().map(how).collect::<Vec<_>>().join(", ");
                let why = if v.by_itself {
                    "by itself"
                } else {
                    "shut down"
                };
                format!("{ends} ({why})")
            };
            vec![
                v.vm.to_string(),
                v.hypervisor.to_string(),
                v.state.to_string(),
                v.vcpus.to_string(),
                match (v.state, v.uptime_ms) {
                    (VmRunState::Running, Some(ms)) => format!("{:.1}s", ms as f64 / 1000.0),
                    _ => "-".into(),
                },
                v.failed.to_string(),
                last,
            ]
        })
        .collect();
    let mut out = table(
        &[
            "VM",
            "HYPERVISOR",
            "STATE",
            "VCPUS",
            "UPTIME",
            "FAILED",
            "ENDED",
        ],
        rows,
    );
    // The VMs' remote disks (live, or as they ended), below, when there
    // are any.
    let disks: Vec<Vec<String>> = vms
        .iter()
        .flat_map(|v| {
            v.disks.iter().map(|d| {
                vec![
                    v.vm.to_string(),
                    d.model.to_string(),
                    d.store.to_string(),
                    d.submitted.to_string(),
                    d.completed.to_string(),
                    d.errors.to_string(),
                    d.resent.to_string(),
                    d.dropped.to_string(),
                ]
            })
        })
        .collect();
    if !disks.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &[
                "VM",
                "DISK",
                "STORE",
                "SUBMITTED",
                "COMPLETED",
                "ERRORS",
                "RESENT",
                "DROPPED",
            ],
            disks,
        ));
    }
    out
}
