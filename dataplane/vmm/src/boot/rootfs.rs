//! The ext2 root disk of a kernel-only boot ([`super::LinuxBoot::kernel_only`]):
//! made empty with e2fsprogs' `mke2fs`, and read back on the host, where
//! the superblock shows what the guest's kernel wrote when it mounted the
//! disk read-write: the mount count (one more per mount) and the time of
//! the write (the guest's clock, which it set from the RTC).

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
    /// `mke2fs` could not be run or failed.
    #[error("mke2fs {path}: {why} (it comes with e2fsprogs; scripts/guest-kernel.sh installs it)")]
    Mkfs {
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
    /// it until the unmount, which a boot that panics never reaches).
    pub clean: bool,
}

/// Makes `path` an empty ext2 file system of `bytes` bytes (1 KiB blocks,
/// no reserved blocks), replacing whatever was there.
pub fn make_ext2(path: &Path, bytes: u64) -> Result<(), RootfsError> {
    let p = path.display().to_string();
    let io = |source| RootfsError::Io {
        path: p.clone(),
        source,
    };
    let f = std::fs::File::create(path).map_err(io)?;
    f.set_len(bytes).map_err(io)?;
    drop(f);
    let out = Command::new(mke2fs())
        .args([
            "-q", "-F", "-t", "ext2", "-b", "1024", "-m", "0", "-L", "devplane",
        ])
        .arg(path)
        .output()
        .map_err(|e| RootfsError::Mkfs {
            path: p.clone(),
            why: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(RootfsError::Mkfs {
            path: p,
            why: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(())
}

/// `mke2fs` on the PATH, else `/sbin/mke2fs` (root's PATH may lack /sbin).
fn mke2fs() -> &'static str {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join("mke2fs").is_file()));
    if on_path { "mke2fs" } else { "/sbin/mke2fs" }
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
    fn mke2fs_makes_a_clean_never_mounted_file_system() {
        let path = std::env::temp_dir().join(format!("dp-rootfs-{}.img", std::process::id()));
        make_ext2(&path, 2 << 20).unwrap();
        let sb = read_superblock(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 << 20);
        let _ = std::fs::remove_file(&path);
        assert_eq!(sb.mount_count, 0);
        assert!(sb.clean);
        let e = read_superblock(Path::new("/nonexistent/devplane.img")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/devplane.img"), "{e}");
    }
}
