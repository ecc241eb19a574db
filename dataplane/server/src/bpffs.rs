//! bpffs: mounting it when needed, and a directory of pinned maps removed
//! when the server stops.

use std::path::{Path, PathBuf};

use devplane_wire::maps::{CLIENTS_MAP, CONFIG_MAP, ROUTES_MAP, STATS_MAP, VMS_MAP};

use super::ServerError;
use crate::xdp::Program;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where bpffs is mounted.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The maps a server pins (the XSK map holds sockets of this process and is
/// not pinned).
pub const PINNED: &[&str] = &[ROUTES_MAP, CLIENTS_MAP, VMS_MAP, STATS_MAP, CONFIG_MAP];

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `st` is a plain struct the call fills; `c` is NUL-terminated.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers for the duration of the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == BPF_FS_MAGIC
}

/// Mounts bpffs on /sys/fs/bpf unless it is mounted already.
pub fn ensure_mounted() -> std::io::Result<()> {
    let p = Path::new(BPFFS);
    if is_bpffs(p) {
        return Ok(());
    }
    // SAFETY: constant NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A directory of pinned maps; removed on drop.
pub struct PinDir {
    dir: PathBuf,
}

impl PinDir {
    /// Pins the program's maps under `dir` (on bpffs), replacing stale pins.
    pub fn create(dir: &Path, program: &mut Program) -> Result<PinDir, ServerError> {
        let err = |source| ServerError::Pin {
            path: dir.to_path_buf(),
            source,
        };
        if !dir.starts_with(BPFFS) {
            return Err(ServerError::Config(format!(
                "pin_dir {} is not under {BPFFS}",
                dir.display()
            )));
        }
        ensure_mounted().map_err(err)?;
        std::fs::create_dir_all(dir).map_err(err)?;
        let pins = PinDir {
            dir: dir.to_path_buf(),
        };
        for name in PINNED {
            let path = dir.join(name);
            let _ = std::fs::remove_file(&path);
            program.pin_map(name, &path).map_err(|e| ServerError::Pin {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        }
        Ok(pins)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        for name in PINNED {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}
