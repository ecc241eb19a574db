//! `--apply-to`: after a database change is saved, bring a running
//! server's pinned maps up to date with the database. The database is
//! written first and the maps second; if dpctl dies in between, the
//! database says so (`status`: maps behind) and the next `--apply-to`
//! change, or the server's next start, repairs the maps.

use std::path::Path;

use devplane_control::config::{Mode, ModelConfig, ServerConfig};
use devplane_control::db::{Change, Db, ServerSettings, repair};
use devplane_control::maps::AyaMaps;
use devplane_control::proto::{self, ProtoError, Request, Response};

use super::{Cli, EXIT_FAILED, Failure};

/// A database change that a running server must also act on (not only
/// its maps): a device model to instantiate or drop. With the server it
/// is for.
pub(super) fn live_request(db: &Db, change: &Change) -> Option<(Option<u32>, Request)> {
    match change {
        Change::AddModel(m) => Some((
            Some(m.server),
            Request::AddModel {
                model: ModelConfig {
                    id: m.id,
                    kind: m.kind.clone(),
                    worker: m.worker as usize,
                    line: m.line,
                    vm: m.vm,
                    pio_base: m.pio_base,
                    mmio_base: m.mmio_base,
                    backing: m.backing.clone(),
                },
            },
        )),
        Change::RemoveModel(id) => Some((
            db.state()
                .models
                .iter()
                .find(|m| m.id == *id)
                .map(|m| m.server),
            Request::RemoveModel { model: *id },
        )),
        _ => None,
    }
}

/// Asks the running server configured in `cfg_path` (at `--socket`) to
/// act on `live`. A server that is not running is fine: its next start
/// builds its models from the database.
pub(super) fn to_running(
    cli: &Cli,
    cfg_path: &Path,
    (server, live): (Option<u32>, Request),
) -> Result<(), Failure> {
    let cfg = ServerConfig::from_file(cfg_path)
        .map_err(|e| failed(format!("{}: {e}", cfg_path.display())))?;
    if server.is_some_and(|s| s != cfg.server.id) {
        return Ok(());
    }
    match proto::call(&cli.socket, &live, std::time::Duration::from_secs(10)) {
        Ok(Response::Error { message }) => Err(failed(format!(
            "the change is saved, but the running server refused it: {message}"
        ))),
        Ok(_) | Err(ProtoError::NotRunning { .. }) => Ok(()),
        Err(e) => Err(failed(format!(
            "the change is saved, but the running server did not take it: {e}"
        ))),
    }
}

/// Environment variable for fault injection in tests: `after-db-write`
/// makes dpctl exit (status 70) between the database write and the map
/// update, as a crash there would.
pub(super) const FAULT_ENV: &str = "DPCTL_FAULT";

fn failed(message: String) -> Failure {
    Failure {
        code: EXIT_FAILED,
        message,
    }
}

/// Syncs the pinned maps of the server configured in `cfg_path` to `db`.
pub(super) fn to_server(db: &mut Db, cfg_path: &Path) -> Result<(), Failure> {
    if std::env::var(FAULT_ENV).as_deref() == Ok("after-db-write") {
        eprintln!("dpctl: fault injected after the database write");
        std::process::exit(70);
    }
    let cfg = ServerConfig::from_file(cfg_path)
        .map_err(|e| failed(format!("{}: {e}", cfg_path.display())))?;
    let settings = ServerSettings::from_config(&cfg, cfg.server.mode == Mode::Xdp);
    let pin_dir = cfg.server.effective_pin_dir();
    let mut maps = AyaMaps::from_pinned(&pin_dir).map_err(|e| {
        failed(format!(
            "the change is saved, but server {}'s maps under {} cannot be opened ({e}): is the server running? Its next start applies the change",
            cfg.server.id,
            pin_dir.display()
        ))
    })?;
    repair(db, &settings, &mut maps).map_err(|e| failed(e.to_string()))?;
    Ok(())
}
