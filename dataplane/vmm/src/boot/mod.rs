//! Booting an unmodified Linux kernel (Debian's `linux-image-amd64`
//! bzImage) in the client VMM, through the x86 64-bit boot protocol.
//!
//! A Linux VM is the same KVM VM as the test guests ([`super::kvm`]) with:
//! - the kernel loaded at 1 MiB, entered in 64-bit long mode at its
//!   64-bit entry point (load address + 0x200) with RSI pointing at the
//!   zero page ([`loader`] fills guest memory, [`cpu`] builds the vCPU
//!   state: identity page tables over the first 4 GiB, a flat GDT, FPU,
//!   MSRs, CPUID from `KVM_GET_SUPPORTED_CPUID`);
//! - an e820 map of RAM below 640 KiB, the EBDA/BIOS area
//!   `0x9fc00..0x100000` reserved, and RAM from 1 MiB to the end of guest
//!   memory, which stays below [`MAX_MEM`] (the 32-bit PCI hole above it is
//!   never RAM);
//! - **no ACPI tables and no MP table**: one vCPU in PIC mode. The kernel
//!   finds neither, runs its LAPIC in virtual-wire mode with the 8259 PIC
//!   behind LINT0 (ExtINT, as [`super::kvm`] programs it), and leaves the
//!   IOAPIC alone; devices use ISA lines 0-15 (UART 4, RTC 8, keyboard 1);
//! - the in-kernel PIT ([`super::kvm::Vm::create_pit`]) and LAPIC timer as
//!   the guest's event timers. They stay in the kernel on purpose: a timer
//!   model on a server would put a network round trip on every tick;
//! - the legacy devices from the VM's device map like any other model,
//!   local or remote: the 16550A UART `uart` at `0x3f8` (line 4), the CMOS
//!   RTC `cmos` at `0x70`, the i8042 `i8042` at `0x60`. The guest's serial
//!   output goes to a [`Console`]; the i8042's reset line (Linux's
//!   `reboot=k`) or a triple fault stops the VM.
//!
//! [`GuestFiles::locate`] finds the kernel and initramfs that
//! `scripts/guest-kernel.sh` (run by `scripts/setup.sh`) fetched and built.
//!
//! Two guest kernels, two proofs ([`GuestKernel::for_host`] picks one):
//! - **Debian's generic kernel with a busybox user space** where KVM runs
//!   guest kernel code on the CPU (VMX/SVM): `guest/init` checks the clock,
//!   writes and reads back the disk and powers off.
//! - **A minimal kernel with a minimal init** where `/dev/kvm` emulates
//!   guest kernel code (nested PVM, [`kvm_emulates_kernel_code`]): built
//!   from Debian's `linux-source-6.1` with `make tinyconfig` and
//!   `guest/linux.config` ([`MinimalKernel`]), it boots in tens of seconds
//!   there, from an ext2 root disk and no initramfs
//!   ([`LinuxBoot::from_root_disk`]): it sets its clock from the RTC and
//!   mounts the disk read-write (writing the superblock's mount count and
//!   time), and its `/sbin/init` (`guest/min-init.c`) prints the time,
//!   appends to a file on the disk, syncs it and restarts the machine
//!   through the i8042, which ends the VM. On PVM a stock kernel's user
//!   space cannot make system calls by itself; [`pvm_syscall`] is the trap
//!   that lets it.

pub mod console;
pub mod cpu;
pub mod loader;
pub mod minimal;
pub mod pvm_syscall;
pub mod rootfs;

use std::path::{Path, PathBuf};

pub use console::{Console, ConsoleUart};

use super::kvm::{CpuState, KvmError, Vm};

/// Default guest memory of a Linux VM: 256 MiB.
pub const DEFAULT_MEM: usize = 256 << 20;

/// Most guest memory a Linux VM may have: RAM ends below 3 GiB, where the
/// 32-bit MMIO hole (PCI BARs, LAPIC, IOAPIC) begins.
pub const MAX_MEM: usize = 0xc000_0000;

/// Environment variable naming the directory with the guest kernel and
/// initramfs (default: `target/guest` of this workspace).
pub const GUEST_DIR_ENV: &str = "DEVPLANE_GUEST_DIR";

/// Environment variable overriding [`GuestKernel::for_host`]: `debian` or
/// `minimal`.
pub const GUEST_KERNEL_ENV: &str = "DEVPLANE_GUEST_KERNEL";

/// The kernel command line a Linux VM gets unless told otherwise, for boot
/// number `boot_id`. Each parameter is there for a reason:
///
/// - `console=ttyS0`: the kernel log and `/dev/console` on COM1, the UART
///   model whose output is the [`Console`];
/// - `reboot=k`: reboot by pulsing the i8042's reset line (0xFE to port
///   0x64), which the VMM takes as power-off; the default (ACPI, then
///   others) has nothing to talk to here;
/// - `panic=-1`: reboot at once on a panic, so a failed boot ends the VM
///   (the test sees no init marker) instead of hanging until a timeout;
/// - `i8042.noaux`: no PS/2 mouse port to probe (saves the probe's waits);
/// - `pci=conf1`: PCI configuration mechanism #1 only: no BIOS, no ACPI
///   MCFG to try first;
/// - `acpi=off`: there are no ACPI tables; this skips the search for them
///   in the (empty) BIOS areas and says so plainly in the log;
/// - `tsc=reliable`: the TSC is the host's, stable across the one vCPU;
///   without it the clocksource watchdog may judge it by the jittery PIT
///   of a nested guest and fall back to a slow clocksource;
/// - `8250.nr_uarts=1`: only COM1 exists; the 8250 driver then skips
///   probing three empty COM ports;
/// - `devplane.boot=N`: the boot number `guest/init` writes to the disk
///   (the kernel ignores the unknown module parameter and keeps it in
///   `/proc/cmdline`).
/// - `init_on_alloc=0`: Debian zeroes every page and object it allocates
///   by default (a hardening option); the guest's allocations need not be,
///   and zeroing is a large share of boot time where guest code is slow.
///
/// On a host whose `/dev/kvm` emulates guest kernel code
/// ([`kvm_emulates_kernel_code`]), [`EMULATED_KVM_PARAMS`] are added.
pub fn default_cmdline(boot_id: u32) -> String {
    let mut c = format!(
        "console=ttyS0 reboot=k panic=-1 i8042.noaux pci=conf1 acpi=off tsc=reliable \
         8250.nr_uarts=1 init_on_alloc=0 devplane.boot={boot_id}"
    );
    if kvm_emulates_kernel_code() {
        c.push(' ');
        c.push_str(EMULATED_KVM_PARAMS);
    }
    c
}

/// The command line of a boot from the root disk
/// ([`LinuxBoot::from_root_disk`]) of the minimal kernel, whose root file
/// system is the ext2 disk on the virtio-blk device (`/dev/vda`):
///
/// - `console=ttyS0`, `reboot=k`, `i8042.noaux`, `pci=conf1`,
///   `tsc=reliable`, `8250.nr_uarts=1`: as in [`default_cmdline`];
/// - `root=/dev/vda rw`: mount the disk read-write at once (no initramfs:
///   nothing to unpack), which writes its superblock;
/// - `panic=-1`: a failed boot (no init on the disk, say) panics and
///   reboots at once, through the i8042, ending the VM instead of hanging.
///
/// On a host whose `/dev/kvm` emulates guest kernel code,
/// [`EMULATED_KVM_CPU_PARAMS`] are added (the other
/// [`EMULATED_KVM_PARAMS`] name things the minimal kernel does not have).
pub fn root_disk_cmdline() -> String {
    let mut c = String::from(
        "console=ttyS0 root=/dev/vda rw panic=-1 reboot=k i8042.noaux pci=conf1 tsc=reliable \
         8250.nr_uarts=1",
    );
    if kvm_emulates_kernel_code() {
        c.push(' ');
        c.push_str(EMULATED_KVM_CPU_PARAMS);
    }
    c
}

macro_rules! emulated_cpu_params {
    () => {
        "noxsave clearcpuid=smap,popcnt,fsgsbase,rdpid,erms,fsrm mitigations=off"
    };
}

/// The part of [`EMULATED_KVM_PARAMS`] about the CPU, which every kernel
/// needs on such a host.
pub const EMULATED_KVM_CPU_PARAMS: &str = emulated_cpu_params!();

/// Extra parameters for a host whose KVM emulates guest kernel code. That
/// hypervisor (nested PVM) reports some CPUID features whatever the VMM
/// sets, and its emulator stops the vCPU with an emulation error on a few
/// instructions those features make Linux use; the kernel is told not to:
///
/// - `noxsave`: FXSAVE for the FPU state (its emulator lacks `XRSTOR`);
/// - `clearcpuid=smap,popcnt,fsgsbase,rdpid,erms,fsrm`: its emulator
///   lacks `CLAC`/`STAC` (which SMAP puts at every user-memory access),
///   `POPCNT` (patched in for the bitmap weight functions) and, to be safe,
///   the FSGSBASE and `RDPID` instructions of the entry code; and no
///   byte-wise `rep movsb`/`stosb` string copies (every iteration is
///   emulated);
/// - `mitigations=off`: no return thunks, RSB filling or retpolines; every
///   one of those instructions is emulated there, and the guest runs only
///   the VMM's own init;
/// - `initcall_blacklist=ftrace_check_for_weak_functions`: that check looks
///   up every one of the kernel's ~40,000 ftrace call sites in kallsyms,
///   minutes of emulated work that `init` waits for (it only matters to
///   someone tracing the guest's kernel);
/// - `nowatchdog`: the soft-lockup detector measures emulated time and
///   only adds its own timers and warnings.
///
/// (Its emulator also lacks `CMPXCHG16B`, whose CPUID bit it does let the
/// VMM clear ([`cpu::hidden_cpuid`]), and `INT3`, which the VMM delivers
/// itself ([`super::kvm::Vcpu::run`]).)
pub const EMULATED_KVM_PARAMS: &str = concat!(
    emulated_cpu_params!(),
    " initcall_blacklist=ftrace_check_for_weak_functions nowatchdog"
);

/// Whether `/dev/kvm` belongs to a hypervisor that emulates a guest's
/// kernel-mode code instead of running it on the CPU: nested PVM
/// (`kvm_pvm`), which runs an unmodified kernel (one not built as a PVM
/// guest) through its instruction emulator, at a few million instructions
/// per second. A Linux boot then takes minutes rather than a second.
pub fn kvm_emulates_kernel_code() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// Why a Linux VM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel or initramfs file is missing.
    #[error(
        "{what} {path} not found: run `sudo -E bash scripts/setup.sh` (or scripts/guest-kernel.sh) to fetch Debian's kernel, build the initramfs and, where /dev/kvm is nested PVM or with DEVPLANE_GUEST_MINIMAL=1, the minimal kernel; or set {GUEST_DIR_ENV}"
    )]
    MissingFile {
        /// "guest kernel" or "initramfs".
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Reading the kernel or initramfs failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel image is not a bzImage this loader can boot.
    #[error("{path}: not a bootable bzImage: {why}")]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// Guest memory is too small or too large for the kernel and initramfs.
    #[error("guest memory of {mem:#x} bytes: {why}")]
    Memory {
        /// The VM's memory size.
        mem: usize,
        /// What does not fit.
        why: String,
    },
    /// [`GUEST_KERNEL_ENV`] names no kernel.
    #[error("{GUEST_KERNEL_ENV}={0:?}: expected `debian` or `minimal`")]
    UnknownKernel(String),
    /// The command line is too long or not printable ASCII.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// KVM refused something.
    #[error(transparent)]
    Kvm(#[from] KvmError),
}

/// The guest kernel and initramfs built by `scripts/guest-kernel.sh`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFiles {
    /// Debian's bzImage.
    pub kernel: PathBuf,
    /// The same kernel decompressed (ELF), if present.
    pub vmlinux: Option<PathBuf>,
    /// The busybox initramfs with `guest/init`: the uncompressed
    /// `initramfs.cpio` when present (nothing for the guest to inflate),
    /// else `initramfs.cpio.gz`.
    pub initrd: PathBuf,
}

impl GuestFiles {
    /// The directory `scripts/guest-kernel.sh` writes to:
    /// `$DEVPLANE_GUEST_DIR`, else `target/guest` of the workspace this
    /// crate was built in.
    pub fn default_dir() -> PathBuf {
        match std::env::var_os(GUEST_DIR_ENV) {
            Some(d) if !d.is_empty() => PathBuf::from(d),
            _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest"),
        }
    }

    /// The files in [`GuestFiles::default_dir`]; an error names the missing
    /// one and how to make it.
    pub fn locate() -> Result<GuestFiles, BootError> {
        GuestFiles::in_dir(&GuestFiles::default_dir())
    }

    /// `vmlinuz` and `initramfs.cpio.gz` in `dir`, both present.
    pub fn in_dir(dir: &Path) -> Result<GuestFiles, BootError> {
        let vmlinux = dir.join("vmlinux");
        let cpio = dir.join("initramfs.cpio");
        let files = GuestFiles {
            kernel: dir.join("vmlinuz"),
            vmlinux: vmlinux.is_file().then_some(vmlinux),
            initrd: if cpio.is_file() {
                cpio
            } else {
                dir.join("initramfs.cpio.gz")
            },
        };
        for (what, path) in [
            ("guest kernel", &files.kernel),
            ("initramfs", &files.initrd),
        ] {
            if !path.is_file() {
                return Err(BootError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        Ok(files)
    }
}

/// The minimal kernel `scripts/guest-kernel.sh` builds from Debian's
/// `linux-source-6.1` with `make tinyconfig` and `guest/linux.config`:
/// `minimal/vmlinux` in the guest directory, and its init, `minimal/init`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MinimalKernel {
    /// The kernel (ELF).
    pub vmlinux: PathBuf,
    /// `guest/min-init.c`, built: the `/sbin/init` for its root disk.
    pub init: PathBuf,
    /// Its source package's version and fragment hash, as the script
    /// recorded them (`minimal/kernel-version`).
    pub version: String,
}

impl MinimalKernel {
    /// The kernel in [`GuestFiles::default_dir`].
    pub fn locate() -> Result<MinimalKernel, BootError> {
        MinimalKernel::in_dir(&GuestFiles::default_dir())
    }

    /// `minimal/vmlinux` and `minimal/init` in `dir`, which must exist.
    pub fn in_dir(dir: &Path) -> Result<MinimalKernel, BootError> {
        let vmlinux = dir.join("minimal/vmlinux");
        let init = dir.join("minimal/init");
        for (what, path) in [("minimal guest kernel", &vmlinux), ("minimal init", &init)] {
            if !path.is_file() {
                return Err(BootError::MissingFile {
                    what,
                    path: path.clone(),
                });
            }
        }
        let version = std::fs::read_to_string(dir.join("minimal/kernel-version"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|_| "version unknown".into());
        Ok(MinimalKernel {
            vmlinux,
            init,
            version,
        })
    }
}

/// Which kernel, and so which proof, a Linux boot runs (see the module
/// documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKernel {
    /// Debian's generic kernel with the busybox initramfs ([`GuestFiles`]):
    /// user space runs `guest/init`.
    Debian,
    /// The minimal kernel ([`MinimalKernel`]) and its init, from its root
    /// disk ([`LinuxBoot::from_root_disk`]).
    Minimal,
}

impl GuestKernel {
    /// [`GUEST_KERNEL_ENV`] when set; else the minimal kernel where
    /// `/dev/kvm` emulates guest kernel code ([`kvm_emulates_kernel_code`])
    /// and Debian's where KVM runs it on the CPU. The string says why, for
    /// a test's output.
    pub fn for_host() -> Result<(GuestKernel, &'static str), BootError> {
        match std::env::var(GUEST_KERNEL_ENV).ok().as_deref() {
            None | Some("") => Ok(if kvm_emulates_kernel_code() {
                (
                    GuestKernel::Minimal,
                    "/dev/kvm is nested PVM (kvm_pvm): it emulates guest kernel code, so Debian's \
                     generic kernel would take many minutes",
                )
            } else {
                (
                    GuestKernel::Debian,
                    "/dev/kvm runs guest kernel code on the CPU",
                )
            }),
            Some("debian") => Ok((GuestKernel::Debian, "chosen by DEVPLANE_GUEST_KERNEL")),
            Some("minimal") => Ok((GuestKernel::Minimal, "chosen by DEVPLANE_GUEST_KERNEL")),
            Some(other) => Err(BootError::UnknownKernel(other.to_string())),
        }
    }
}

/// How a VM boots Linux instead of loading real-mode images.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// The kernel: a bzImage or an uncompressed `vmlinux` (ELF).
    pub kernel: PathBuf,
    /// The initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Where the guest's serial output goes (a local `uart` model feeds it).
    pub console: Console,
}

impl LinuxBoot {
    /// Boots `files` with [`default_cmdline`]`(boot_id)` into a fresh
    /// console that does not echo. The decompressed `vmlinux` is used when
    /// there is one (the same kernel; no decompressor to run), else the
    /// bzImage.
    pub fn new(files: &GuestFiles, boot_id: u32) -> LinuxBoot {
        LinuxBoot {
            kernel: files
                .vmlinux
                .clone()
                .unwrap_or_else(|| files.kernel.clone()),
            initrd: Some(files.initrd.clone()),
            cmdline: default_cmdline(boot_id),
            console: Console::new(),
        }
    }

    /// Boots the minimal kernel from its root disk: no initramfs, the root
    /// file system on the virtio-blk disk, [`root_disk_cmdline`], a fresh
    /// console that does not echo. The disk holds an ext2 file system
    /// ([`rootfs::make_ext2`]) with the kernel's init as `/sbin/init`.
    pub fn from_root_disk(kernel: &MinimalKernel) -> LinuxBoot {
        LinuxBoot {
            kernel: kernel.vmlinux.clone(),
            initrd: None,
            cmdline: root_disk_cmdline(),
            console: Console::new(),
        }
    }

    /// Loads the kernel, initramfs, command line and boot tables into
    /// `vm`'s memory and returns the state vCPU 0 starts in.
    pub fn prepare(&self, vm: &Vm) -> Result<CpuState, BootError> {
        let kernel = read(&self.kernel, "guest kernel")?;
        let initrd = match &self.initrd {
            Some(p) => Some(read(p, "initramfs")?),
            None => None,
        };
        let loaded = loader::load(
            vm,
            &loader::Images {
                kernel: &kernel,
                kernel_path: &self.kernel,
                initrd: initrd.as_deref(),
                cmdline: &self.cmdline,
            },
        )?;
        cpu::write_tables(vm)?;
        let mut state = cpu::long_mode_state(loaded.entry, loaded.zero_page);
        // A stock kernel's user space needs the system-call trap where
        // /dev/kvm emulates kernel code; it is set only where the kernel
        // has the symbols and the NOP it needs (the minimal kernel).
        if kvm_emulates_kernel_code()
            && let Some(hook) = pvm_syscall::SyscallHook::from_vmlinux(&kernel)
        {
            vm.load(hook.trap_gpa, &[pvm_syscall::INT3])?;
            state.syscall_hook = Some(hook);
        }
        Ok(state)
    }
}

fn read(path: &Path, what: &'static str) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            BootError::MissingFile {
                what,
                path: path.to_path_buf(),
            }
        } else {
            BootError::Read {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_cmdline_names_the_boot() {
        let c = default_cmdline(7);
        assert!(c.starts_with("console=ttyS0 "), "{c}");
        assert!(c.contains(" devplane.boot=7"), "{c}");
        assert_eq!(
            c.contains(EMULATED_KVM_PARAMS),
            kvm_emulates_kernel_code(),
            "{c}"
        );
        assert!(c.contains("reboot=k"));
    }

    #[test]
    fn missing_files_say_how_to_make_them() {
        let e = GuestFiles::in_dir(Path::new("/nonexistent/devplane")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("scripts/setup.sh"), "{msg}");
        assert!(msg.contains("/nonexistent/devplane/vmlinuz"), "{msg}");
        let e = MinimalKernel::in_dir(Path::new("/nonexistent/devplane")).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("DEVPLANE_GUEST_MINIMAL=1"), "{msg}");
        assert!(
            msg.contains("/nonexistent/devplane/minimal/vmlinux"),
            "{msg}"
        );
    }

    #[test]
    fn root_disk_cmdline_mounts_the_disk_and_reboots_on_a_panic() {
        let c = root_disk_cmdline();
        for p in [
            "console=ttyS0",
            "root=/dev/vda",
            "rw",
            "panic=-1",
            "reboot=k",
        ] {
            assert!(c.split(' ').any(|w| w == p), "{p} missing: {c}");
        }
        assert!(!c.contains("initcall_blacklist"), "{c}");
        assert_eq!(
            c.contains(EMULATED_KVM_CPU_PARAMS),
            kvm_emulates_kernel_code(),
            "{c}"
        );
        assert!(EMULATED_KVM_PARAMS.starts_with(EMULATED_KVM_CPU_PARAMS));
    }
}
