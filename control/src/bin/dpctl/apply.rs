//! `--apply-to`: after a database change is saved, bring a running
//! server's pinned maps up to date with the database. The database is
//! written first and the maps second; if dpctl dies in between, the
//! database says so (`status`: maps behind) and the next `--apply-to`
//! change, or the server's next start, repairs the maps.

use std::path::Path;

use devplane_control::config::{Mode, ServerConfig};
use devplane_control::db::{Db, ServerSettings, repair};
use devplane_control::maps::AyaMaps;

use super::{EXIT_FAILED, Failure};

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
