//! The ext2 root disk of a minimal-kernel boot
//! ([`super::LinuxBoot::from_root_disk`]): made with e2fsprogs' `mke2fs`
//! (empty, or from a directory), and read back on the host, where the
//! superblock shows what the guest's kernel wrote when it mounted the disk
//! read-write — the mount count (one more per mount) and the time of the
//! write (the guest's clock, which it set from the RTC) — and `debugfs`
//! reads the files the guest wrote.

use std::io::Read;
use std::path::Path;
use std::process::Command;

/// Where the superblock starts in the image.
const SUPER_OFFSET: usize = 1024;
/// Superblock fields, as offsets into it (all little-endian).
const S_WTIME: usize = 48;
const S_MNT_COUNT: usize = 52;
const S_MAGIC: usize = 56;
const S_STATE: usize = 58;
/// `s_magic` of an ext2/3/4 file system.
const EXT2_MAGIC: u16 = 0xef53;
/// `s_state`: cleanly unmounted.
const EXT2_VALID_FS: u16 = 1;

/// Why a root disk could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// An I/O error on the image.
    #[error("{path}: {source}")]
    Io {
        /// The image.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `mke2fs` or `debugfs` could not be run or failed.
    #[error("{tool} {path}: {why} (it comes with e2fsprogs; scripts/guest-kernel.sh installs it)")]
    Tool {
        /// The program.
        tool: &'static str,
        /// The image.
        path: String,
        /// What went wrong.
        why: String,
    },
    /// The image has no ext2 superblock.
    #[error("{path}: no ext2 superblock (magic {magic:#06x})")]
    NotExt2 {
        /// The image.
        path: String,
        /// What the magic field held.
        magic: u16,
    },
}

/// What the host reads from an ext2 superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superblock {
    /// `s_mnt_count`: mounts since the last check; the kernel adds one
    /// at every read-write mount and writes the superblock at once.
    pub mount_count: u16,
    /// `s_wtime`: when the superblock was last written (seconds since the
    /// epoch, by the writer's clock).
    pub write_time: u32,
    /// Whether `s_state` says cleanly unmounted (a read-write mount clears
    /// it until the unmount, which a boot that ends in a restart or a
    /// panic never reaches).
    pub clean: bool,
}

/// Makes `path` an ext2 file system of `bytes` bytes (1 KiB blocks, no
/// reserved blocks), replacing whatever was there: empty, or holding a
/// copy of the directory `root` (owners and modes kept).
pub fn make_ext2(path: &Path, bytes: u64, root: Option<&Path>) -> Result<(), RootfsError> {
    let p = path.display().to_string();
    let io = |source| RootfsError::Io {
        path: p.clone(),
        source,
    };
    let f = std::fs::File::create(path).map_err(io)?;
    f.set_len(bytes).map_err(io)?;
    drop(f);
    let mut cmd = Command::new(e2fs_tool("mke2fs"));
    cmd.args([
        "-q", "-F", "-t", "ext2", "-b", "1024", "-m", "0", "-L", "devplane",
    ]);
    if let Some(root) = root {
        cmd.arg("-d").arg(root);
    }
    run(cmd.arg(path), "mke2fs", &p)?;
    Ok(())
}

/// The contents of the file `name` (an absolute path inside the file
/// system) of the ext2 image at `path`, read with `debugfs`; `None` if
/// there is no such file.
pub fn read_file(path: &Path, name: &str) -> Result<Option<Vec<u8>>, RootfsError> {
    let p = path.display().to_string();
    let mut stat = Command::new(e2fs_tool("debugfs"));
    stat.arg("-R").arg(format!("stat {name}")).arg(path);
    if !String::from_utf8_lossy(&run(&mut stat, "debugfs", &p)?.stdout).contains("Inode:") {
        return Ok(None);
    }
    let mut cat = Command::new(e2fs_tool("debugfs"));
    cat.arg("-R").arg(format!("cat {name}")).arg(path);
    Ok(Some(run(&mut cat, "debugfs", &p)?.stdout))
}

/// Runs an e2fsprogs tool; a failure to start or a non-zero exit is an
/// error naming it.
fn run(
    cmd: &mut Command,
    tool: &'static str,
    path: &str,
) -> Result<std::process::Output, RootfsError> {
    let err = |why: String| RootfsError::Tool {
        tool,
        path: path.to_string(),
        why,
    };
    let out = cmd.output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        return Err(err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out)
}

/// `tool` on the PATH, else in `/sbin` (root's PATH may lack /sbin).
fn e2fs_tool(tool: &str) -> std::path::PathBuf {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()));
    if on_path {
        tool.into()
    } else {
        Path::new("/sbin").join(tool)
    }
}

/// Reads the superblock of the ext2 image at `path`.
pub fn read_superblock(path: &Path) -> Result<Superblock, RootfsError> {
    let p = path.display().to_string();
    let mut buf = [0u8; SUPER_OFFSET + 64];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|source| RootfsError::Io {
            path: p.clone(),
            source,
        })?;
    parse_superblock(&buf[SUPER_OFFSET..]).map_err(|magic| RootfsError::NotExt2 { path: p, magic })
}

/// The fields of a superblock's first 64 bytes, or the bad magic.
fn parse_superblock(sb: &[u8]) -> Result<Superblock, u16> {
    let u16_at = |o: usize| u16::from_le_bytes([sb[o], sb[o + 1]]);
    let magic = u16_at(S_MAGIC);
    if magic != EXT2_MAGIC {
        return Err(magic);
    }
    Ok(Superblock {
        mount_count: u16_at(S_MNT_COUNT),
        write_time: u32::from_le_bytes([
            sb[S_WTIME],
            sb[S_WTIME + 1],
            sb[S_WTIME + 2],
            sb[S_WTIME + 3],
        ]),
        clean: u16_at(S_STATE) & EXT2_VALID_FS != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_fields_the_kernel_writes() {
        let mut sb = [0u8; 64];
        sb[S_MAGIC..S_MAGIC + 2].copy_from_slice(&EXT2_MAGIC.to_le_bytes());
        sb[S_MNT_COUNT..S_MNT_COUNT + 2].copy_from_slice(&3u16.to_le_bytes());
        sb[S_WTIME..S_WTIME + 4].copy_from_slice(&1_800_000_000u32.to_le_bytes());
        sb[S_STATE] = 1;
        assert_eq!(
            parse_superblock(&sb),
            Ok(Superblock {
                mount_count: 3,
                write_time: 1_800_000_000,
                clean: true
            })
        );
        sb[S_STATE] = 0;
        assert!(!parse_superblock(&sb).unwrap().clean);
        sb[S_MAGIC] = 0;
        assert_eq!(parse_superblock(&sb), Err(0xef00));
    }

    /// Needs e2fsprogs (scripts/guest-kernel.sh installs it).
    #[test]
    fn mke2fs_makes_a_clean_never_mounted_file_system_from_a_directory() {
        let pid = std::process::id();
        let path = std::env::temp_dir().join(format!("dp-rootfs-{pid}.img"));
        let dir = std::env::temp_dir().join(format!("dp-rootfs-{pid}.d"));
        std::fs::create_dir_all(dir.join("sbin")).unwrap();
        std::fs::write(dir.join("sbin/init"), b"not really an init").unwrap();
        let made = make_ext2(&path, 2 << 20, Some(&dir));
        let _ = std::fs::remove_dir_all(&dir);
        made.unwrap();
        let sb = read_superblock(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        let init = read_file(&path, "/sbin/init").unwrap();
        let none = read_file(&path, "/devplane-boots").unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(init.as_deref(), Some(&b"not really an init"[..]));
        assert_eq!(none, None);
        assert_eq!(sb.mount_count, 0);
        assert!(sb.clean);
        let e = read_superblock(Path::new("/nonexistent/devplane.img")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/devplane.img"), "{e}");
    }
}
