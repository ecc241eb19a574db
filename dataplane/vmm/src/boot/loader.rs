//! Puts a kernel, its initramfs, the command line and the zero page
//! (`boot_params`, with the e820 map) into guest memory, following the x86
//! boot protocol (`Documentation/x86/boot.rst`), on rust-vmm's
//! `linux-loader`. The kernel is either a bzImage (entered at its 64-bit
//! entry point, load address + 0x200, where its decompressor starts) or the
//! same kernel already decompressed, a `vmlinux` ELF (entered at
//! `startup_64`, its segments at their physical addresses, 16 MiB on
//! Debian): `scripts/guest-kernel.sh` extracts one from Debian's bzImage,
//! which saves the decompressor's work where guest code is slow (an
//! instruction-emulating `/dev/kvm`).
//!
//! Guest-physical layout (below 1 MiB as most VMMs use it):
//!
//! | range | what |
//! | --- | --- |
//! | `0x500` | GDT ([`super::cpu`]) |
//! | `0x7000` | zero page ([`ZERO_PAGE`]) |
//! | `0x8ff0` | initial stack top ([`super::cpu::BOOT_STACK`]) |
//! | `0x9000..0xf000` | identity page tables ([`super::cpu`]) |
//! | `0x20000` | command line ([`CMDLINE`]) |
//! | `0x9fc00..0x100000` | reserved in e820 (EBDA, VGA, BIOS) |
//! | `0x100000` | a bzImage's protected-mode part (a vmlinux: its segments' addresses) |
//! | top of RAM | the initramfs, page-aligned |
//!
//! The kernel decompresses itself to 16 MiB (or a KASLR-chosen address),
//! using up to `init_size` bytes; the initramfs must stay clear of that.

use std::io::Cursor;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{KernelLoader, bzimage::BzImage};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::{BootError, MAX_MEM};
use crate::kvm::{KvmError, Vm};

/// Where the zero page (`struct boot_params`) goes.
pub const ZERO_PAGE: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x2_0000;
/// Where the protected-mode kernel is loaded (the boot protocol's
/// traditional 1 MiB; the kernel relocates itself from there).
pub const KERNEL_LOAD: u64 = 0x10_0000;
/// Offset of the 64-bit entry point from the load address.
pub const ENTRY_64_OFFSET: u64 = 0x200;
/// Start of the EBDA/VGA/BIOS area, reserved in the e820 map.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of low memory; RAM resumes here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where the kernel decompresses itself unless it is relocated (Debian's
/// `CONFIG_PHYSICAL_START`, also the header's `pref_address`).
const DEFAULT_PHYSICAL_START: u64 = 0x100_0000;

/// e820 entry types.
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// The bzImage header magic "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// `boot_flag`.
const BOOT_FLAG: u16 = 0xaa55;
/// `xloadflags` bit: the kernel has the 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Lowest boot protocol with `xloadflags` (2.12).
const MIN_PROTOCOL: u16 = 0x020c;
/// `type_of_loader`: undefined/other boot loader.
const LOADER_OTHER: u8 = 0xff;
/// `loadflags`: the protected-mode code is loaded at 1 MiB.
const LOADED_HIGH: u8 = 1 << 0;
/// Page size.
const PAGE: u64 = 0x1000;
/// The start of an ELF file.
const ELF_MAGIC: &[u8] = b"\x7fELF";
/// The command-line limit of an x86 kernel (`COMMAND_LINE_SIZE` - 1), for
/// a vmlinux, which has no header to say so.
const ELF_CMDLINE_SIZE: u32 = 2047;

/// Guest memory the loader writes to: a [`Vm`], or plain bytes in tests.
pub trait GuestRam {
    /// Size of guest memory in bytes (RAM from GPA 0).
    fn ram_size(&self) -> usize;
    /// Copies `bytes` to guest-physical `gpa`.
    fn write_ram(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError>;
}

impl GuestRam for Vm {
    fn ram_size(&self) -> usize {
        self.mem_size()
    }

    fn write_ram(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
        self.load(gpa, bytes)
    }
}

/// What to load.
#[derive(Debug, Clone, Copy)]
pub struct Images<'a> {
    /// The bzImage's bytes.
    pub kernel: &'a [u8],
    /// Its path, for error messages.
    pub kernel_path: &'a Path,
    /// The initramfs's bytes, if any.
    pub initrd: Option<&'a [u8]>,
    /// The kernel command line.
    pub cmdline: &'a str,
}

/// Where things went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loaded {
    /// The 64-bit entry point (RIP).
    pub entry: u64,
    /// The zero page (RSI).
    pub zero_page: u64,
    /// Where the initramfs starts and its length (0 without one).
    pub initrd: (u64, u64),
    /// The end of the loaded (compressed) kernel.
    pub kernel_end: u64,
}

/// The e820 map of a VM with `mem` bytes of RAM from GPA 0.
pub fn e820_map(mem: u64) -> Vec<boot_e820_entry> {
    vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
        boot_e820_entry {
            addr: HIMEM_START,
            size: mem.saturating_sub(HIMEM_START),
            r#type: E820_RAM,
        },
    ]
}

/// Loads `images` into `ram` and writes the zero page. Checks the kernel
/// (a bzImage with the 64-bit entry point), the memory size and that the
/// initramfs fits above the kernel's decompression area.
pub fn load<M: GuestRam + ?Sized>(ram: &M, images: &Images<'_>) -> Result<Loaded, BootError> {
    let mem = ram.ram_size();
    if mem > MAX_MEM {
        return Err(BootError::Memory {
            mem,
            why: format!("a Linux VM's RAM must end below the 32-bit hole at {MAX_MEM:#x}"),
        });
    }
    let bad = |why: String| BootError::BadKernel {
        path: images.kernel_path.to_path_buf(),
        why,
    };

    let loaded = if images.kernel.starts_with(ELF_MAGIC) {
        load_elf(ram, images.kernel)
    } else {
        load_bzimage(ram, images.kernel)
    };
    let (mut hdr, entry, kernel_end) = loaded.map_err(|e| match e {
        BootError::BadKernel { why, .. } => bad(why),
        other => other,
    })?;

    // Command line: printable ASCII (checked here), within the kernel's
    // limit (`cmdline_size`, without the NUL; checked by linux-loader).
    let cmdline_size = hdr.cmdline_size as usize;
    if let Some(c) = images.cmdline.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(BootError::Cmdline(format!("{c:?} is not printable ASCII")));
    }
    let cmdline = Cmdline::try_from(images.cmdline, cmdline_size.saturating_add(1))
        .and_then(|c| c.as_cstring())
        .map_err(|e| {
            BootError::Cmdline(format!(
                "{e}: {} bytes, the kernel takes at most {cmdline_size}",
                images.cmdline.len()
            ))
        })?;
    let cmdline = cmdline.as_bytes_with_nul();
    ram.write_ram(CMDLINE, cmdline)?;

    // The decompressed kernel lands at its preferred address (or higher,
    // with KASLR, which avoids the initramfs); the initramfs goes at the top
    // of RAM and must not overlap it.
    let pref = match hdr.pref_address {
        0 => DEFAULT_PHYSICAL_START,
        p => p,
    };
    let decompress_end = pref.max(kernel_end) + u64::from(hdr.init_size);
    let mut initrd = (0u64, 0u64);
    if let Some(rd) = images.initrd.filter(|rd| !rd.is_empty()) {
        let len = rd.len() as u64;
        let top = (mem as u64).min(u64::from(hdr.initrd_addr_max) + 1);
        let start = top
            .checked_sub(len)
            .map(|s| s & !(PAGE - 1))
            .filter(|&s| s >= decompress_end)
            .ok_or_else(|| BootError::Memory {
                mem,
                why: format!(
                    "the {len}-byte initramfs does not fit between the kernel's decompression area (ending at {decompress_end:#x}) and {top:#x}"
                ),
            })?;
        ram.write_ram(start, rd)?;
        initrd = (start, len);
    } else if decompress_end > mem as u64 {
        return Err(BootError::Memory {
            mem,
            why: format!("the kernel needs memory up to {decompress_end:#x} to decompress"),
        });
    }

    hdr.type_of_loader = LOADER_OTHER;
    hdr.loadflags |= LOADED_HIGH;
    hdr.boot_flag = BOOT_FLAG;
    hdr.cmd_line_ptr = CMDLINE as u32;
    hdr.ramdisk_image = initrd.0 as u32;
    hdr.ramdisk_size = initrd.1 as u32;

    let mut params = boot_params {
        hdr,
        ..Default::default()
    };
    let map = e820_map(mem as u64);
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    params.e820_entries = map.len() as u8;
    ram.write_ram(ZERO_PAGE, params.as_slice())?;

    Ok(Loaded {
        entry,
        zero_page: ZERO_PAGE,
        initrd,
        kernel_end,
    })
}

/// A kernel-loading step's error before the path is known.
fn bad_kernel(why: String) -> BootError {
    BootError::BadKernel {
        path: Default::default(),
        why,
    }
}

/// Scratch vm-memory guest memory over `[base, base + len)`:
/// linux-loader loads into vm-memory's `GuestMemory`, and the result is
/// copied into the VM with [`GuestRam::write_ram`].
fn scratch(mem: usize, base: u64, len: u64) -> Result<GuestMemoryMmap<()>, BootError> {
    GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(base), len as usize)]).map_err(|e| {
        BootError::Memory {
            mem,
            why: format!("scratch memory for the kernel: {e}"),
        }
    })
}

/// Copies `[start, end)` of `scratch` into `ram`.
fn copy_out<M: GuestRam + ?Sized>(
    ram: &M,
    scratch: &GuestMemoryMmap<()>,
    start: u64,
    end: u64,
) -> Result<(), BootError> {
    let len = end
        .checked_sub(start)
        .ok_or_else(|| bad_kernel("the kernel ends before it starts".into()))?;
    let mut body = vec![0u8; len as usize];
    scratch
        .read_slice(&mut body, GuestAddress(start))
        .map_err(|e| bad_kernel(format!("copying the kernel out of scratch memory: {e}")))?;
    ram.write_ram(start, &body)?;
    Ok(())
}

/// A bzImage: linux-loader copies the protected-mode kernel to
/// [`KERNEL_LOAD`] and returns its setup header; entry at +0x200.
fn load_bzimage<M: GuestRam + ?Sized>(
    ram: &M,
    kernel: &[u8],
) -> Result<(setup_header, u64, u64), BootError> {
    let mem = ram.ram_size();
    let scratch_len = (kernel.len() as u64).next_multiple_of(PAGE).max(PAGE);
    if KERNEL_LOAD + scratch_len > mem as u64 {
        return Err(BootError::Memory {
            mem,
            why: format!(
                "the {}-byte kernel does not fit at {KERNEL_LOAD:#x}",
                kernel.len()
            ),
        });
    }
    let scratch = scratch(mem, KERNEL_LOAD, scratch_len)?;
    let result = BzImage::load(
        &scratch,
        Some(GuestAddress(KERNEL_LOAD)),
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| bad_kernel(e.to_string()))?;
    let Some(hdr) = result.setup_header else {
        return Err(bad_kernel("no setup header".into()));
    };
    let (magic, version, xloadflags) = (hdr.header, hdr.version, hdr.xloadflags);
    if magic != HDR_MAGIC {
        return Err(bad_kernel(format!("header magic {magic:#x}")));
    }
    if version < MIN_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad_kernel(format!(
            "boot protocol {}.{:02} without the 64-bit entry point (needs 2.12 and XLF_KERNEL_64)",
            version >> 8,
            version & 0xff
        )));
    }
    copy_out(ram, &scratch, KERNEL_LOAD, result.kernel_end)?;
    Ok((hdr, KERNEL_LOAD + ENTRY_64_OFFSET, result.kernel_end))
}

/// An uncompressed `vmlinux` (ELF): linux-loader copies its segments to
/// their physical addresses; the entry point is `startup_64`, entered in
/// long mode like the decompressor would. There is no setup header, so
/// the zero page gets the fields the kernel reads, as a boot loader of the
/// 2.15 protocol would set them.
fn load_elf<M: GuestRam + ?Sized>(
    ram: &M,
    kernel: &[u8],
) -> Result<(setup_header, u64, u64), BootError> {
    let mem = ram.ram_size();
    let scratch = scratch(mem, 0, mem as u64)?;
    let result = Elf::load(
        &scratch,
        None,
        &mut Cursor::new(kernel),
        Some(GuestAddress(HIMEM_START)),
    )
    .map_err(|e| match e {
        linux_loader::loader::Error::Elf(ElfError::ReadKernelImage) => BootError::Memory {
            mem,
            why: "the vmlinux's segments do not fit in guest memory".into(),
        },
        e => bad_kernel(e.to_string()),
    })?;
    copy_out(ram, &scratch, HIMEM_START, result.kernel_end)?;
    let hdr = setup_header {
        boot_flag: BOOT_FLAG,
        header: HDR_MAGIC,
        version: 0x020f,
        loadflags: LOADED_HIGH,
        kernel_alignment: 0x20_0000,
        initrd_addr_max: 0x7fff_ffff,
        xloadflags: XLF_KERNEL_64,
        cmdline_size: ELF_CMDLINE_SIZE,
        ..Default::default()
    };
    Ok((hdr, result.kernel_load.0, result.kernel_end))
}

#[cfg(test)]
pub(crate) mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Guest memory as a byte vector.
    pub(crate) struct VecRam(pub RefCell<Vec<u8>>);

    impl VecRam {
        pub(crate) fn new(size: usize) -> VecRam {
            VecRam(RefCell::new(vec![0; size]))
        }

        pub(crate) fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
            self.0.borrow()[gpa as usize..gpa as usize + len].to_vec()
        }

        pub(crate) fn u64_at(&self, gpa: u64) -> u64 {
            u64::from_le_bytes(self.bytes(gpa, 8).try_into().unwrap())
        }
    }

    impl GuestRam for VecRam {
        fn ram_size(&self) -> usize {
            self.0.borrow().len()
        }

        fn write_ram(&self, gpa: u64, bytes: &[u8]) -> Result<(), KvmError> {
            let mut m = self.0.borrow_mut();
            let size = m.len();
            let start = gpa as usize;
            let end = start
                .checked_add(bytes.len())
                .filter(|&e| e <= size)
                .ok_or(KvmError::OutOfBounds {
                    gpa,
                    len: bytes.len(),
                    size,
                })?;
            m[start..end].copy_from_slice(bytes);
            Ok(())
        }
    }

    /// A minimal bzImage: 4 setup sectors plus the boot sector, then
    /// `body` as the protected-mode kernel.
    fn bzimage(version: u16, xloadflags: u16, body: &[u8]) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut img = vec![0u8; (usize::from(setup_sects) + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&BOOT_FLAG.to_le_bytes());
        img[0x202..0x206].copy_from_slice(&HDR_MAGIC.to_le_bytes());
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = LOADED_HIGH;
        img[0x214..0x218].copy_from_slice(&(KERNEL_LOAD as u32).to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        img[0x258..0x260].copy_from_slice(&DEFAULT_PHYSICAL_START.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img.extend_from_slice(body);
        img
    }

    fn images<'a>(kernel: &'a [u8], initrd: Option<&'a [u8]>, cmdline: &'a str) -> Images<'a> {
        Images {
            kernel,
            kernel_path: Path::new("/k"),
            initrd,
            cmdline,
        }
    }

    #[test]
    fn loads_kernel_initrd_cmdline_and_zero_page() {
        let ram = VecRam::new(32 << 20);
        let body: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let k = bzimage(0x020f, XLF_KERNEL_64, &body);
        let rd = vec![0xabu8; 3000];
        let l = load(&ram, &images(&k, Some(&rd), "console=ttyS0 x=1")).unwrap();
        assert_eq!(l.entry, KERNEL_LOAD + 0x200);
        assert_eq!(l.zero_page, ZERO_PAGE);
        assert_eq!(ram.bytes(KERNEL_LOAD, body.len()), body);
        assert_eq!(l.kernel_end, KERNEL_LOAD + body.len() as u64);
        // The initramfs is page-aligned at the top of RAM.
        assert_eq!(l.initrd, ((32 << 20) - 0x1000, 3000));
        assert_eq!(ram.bytes(l.initrd.0, 3000), rd);
        assert_eq!(ram.bytes(CMDLINE, 18), b"console=ttyS0 x=1\0");

        let zp = ram.bytes(ZERO_PAGE, std::mem::size_of::<boot_params>());
        let p = boot_params::from_slice(&zp).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.header }, HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, LOADER_OTHER);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ hdr.ramdisk_image }, l.initrd.0 as u32);
        assert_eq!({ hdr.ramdisk_size }, 3000);
        assert_eq!({ hdr.code32_start }, KERNEL_LOAD as u32);
        assert_eq!({ p.e820_entries }, 3);
        let e: Vec<(u64, u64, u32)> = p.e820_table[..3]
            .iter()
            .map(|e| ({ e.addr }, { e.size }, { e.r#type }))
            .collect();
        assert_eq!(
            e,
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED),
                (0x100000, (32 << 20) - 0x100000, E820_RAM),
            ]
        );
    }

    /// A minimal x86-64 ELF with one segment of `body` at physical
    /// 16 MiB (and 4 KiB of bss), entry at its start.
    fn vmlinux(body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(ELF_MAGIC);
        f[4] = 2; // 64-bit
        f[5] = 1; // little-endian
        f[6] = 1; // version
        let put = |f: &mut Vec<u8>, off: usize, v: &[u8]| f[off..off + v.len()].copy_from_slice(v);
        put(&mut f, 16, &2u16.to_le_bytes()); // ET_EXEC
        put(&mut f, 18, &0x3eu16.to_le_bytes()); // x86-64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 24, &DEFAULT_PHYSICAL_START.to_le_bytes()); // e_entry
        put(&mut f, 32, &64u64.to_le_bytes()); // e_phoff
        put(&mut f, 52, &64u16.to_le_bytes()); // e_ehsize
        put(&mut f, 54, &56u16.to_le_bytes()); // e_phentsize
        put(&mut f, 56, &1u16.to_le_bytes()); // e_phnum
        put(&mut f, 58, &64u16.to_le_bytes()); // e_shentsize
        let ph = 64;
        put(&mut f, ph, &1u32.to_le_bytes()); // PT_LOAD
        put(&mut f, ph + 4, &5u32.to_le_bytes()); // R+X
        put(&mut f, ph + 8, &0x1000u64.to_le_bytes()); // p_offset
        put(&mut f, ph + 16, &0xffff_ffff_8100_0000u64.to_le_bytes()); // p_vaddr
        put(&mut f, ph + 24, &DEFAULT_PHYSICAL_START.to_le_bytes()); // p_paddr
        put(&mut f, ph + 32, &(body.len() as u64).to_le_bytes()); // p_filesz
        put(&mut f, ph + 40, &(body.len() as u64 + 0x1000).to_le_bytes()); // p_memsz
        put(&mut f, ph + 48, &0x1000u64.to_le_bytes()); // p_align
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn loads_a_vmlinux_at_its_physical_address() {
        let ram = VecRam::new(32 << 20);
        let body: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let rd = vec![0x5au8; 100];
        let l = load(&ram, &images(&vmlinux(&body), Some(&rd), "console=ttyS0")).unwrap();
        assert_eq!(l.entry, DEFAULT_PHYSICAL_START);
        assert_eq!(l.kernel_end, DEFAULT_PHYSICAL_START + 3000 + 0x1000);
        assert_eq!(ram.bytes(DEFAULT_PHYSICAL_START, body.len()), body);
        assert_eq!(ram.bytes(l.initrd.0, 100), rd);
        let zp = ram.bytes(ZERO_PAGE, std::mem::size_of::<boot_params>());
        let p = boot_params::from_slice(&zp).unwrap();
        let hdr = p.hdr;
        assert_eq!(({ hdr.header }, { hdr.boot_flag }), (HDR_MAGIC, BOOT_FLAG));
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE as u32);
        assert_eq!({ hdr.ramdisk_size }, 100);
        // Segments beyond guest memory are refused.
        let small = VecRam::new(8 << 20);
        assert!(load(&small, &images(&vmlinux(&body), None, "")).is_err());
    }

    #[test]
    fn refuses_what_it_cannot_boot() {
        let ram = VecRam::new(32 << 20);
        let k = bzimage(0x020f, XLF_KERNEL_64, &[0; 100]);
        // Not a bzImage.
        let e = load(&ram, &images(&[0u8; 4096], None, "")).unwrap_err();
        assert!(matches!(e, BootError::BadKernel { .. }), "{e}");
        // Too old for the 64-bit entry point.
        let old = bzimage(0x020a, 0, &[0; 100]);
        let e = load(&ram, &images(&old, None, "")).unwrap_err();
        assert!(e.to_string().contains("64-bit entry point"), "{e}");
        // Command line too long, or not ASCII.
        let long = "x".repeat(3000);
        assert!(matches!(
            load(&ram, &images(&k, None, &long)),
            Err(BootError::Cmdline(_))
        ));
        assert!(matches!(
            load(&ram, &images(&k, None, "caf\u{e9}")),
            Err(BootError::Cmdline(_))
        ));
        // An initramfs that would overlap the decompressed kernel.
        let big = vec![0u8; 16 << 20];
        let e = load(&ram, &images(&k, Some(&big), "")).unwrap_err();
        assert!(matches!(e, BootError::Memory { .. }), "{e}");
        // Memory too small for the kernel to decompress.
        let small = VecRam::new(4 << 20);
        assert!(matches!(
            load(&small, &images(&k, None, "")),
            Err(BootError::Memory { .. })
        ));
        // A truncated image.
        assert!(load(&ram, &images(&k[..0x300], None, "")).is_err());
    }
}
