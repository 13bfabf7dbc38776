//! Loads the kernel, initramfs and command line, and writes the boot-protocol structures.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{bzimage::BzImage, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::*;
use crate::{mptable, regs};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    UnknownFormat { path: PathBuf },
    #[error("cannot load kernel {path}: {source}")]
    LoadKernel {
        path: PathBuf,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("kernel {path} has no PVH entry point and is not a 64-bit ELF")]
    NoEntry { path: PathBuf },
    #[error("cannot open initramfs {path}: {source}")]
    OpenInitramfs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initramfs {path} is empty")]
    EmptyInitramfs { path: PathBuf },
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory above the kernel")]
    InitramfsTooLarge { path: PathBuf, size: u64 },
    #[error("cannot read initramfs {path}: {source}")]
    ReadInitramfs {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error("writing {what} to guest memory at {addr:#x}: {source}")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, EBX -> `hvm_start_info`.
    Pvh,
    /// Linux 64-bit boot protocol: long mode, RSI -> zero page.
    Linux64,
}

/// Where and how the boot vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootInfo {
    pub mode: EntryMode,
    pub entry: u64,
}

/// What to boot.
pub struct KernelSpec<'a> {
    /// Opened and checked (`Input::open`); read from its start whatever its offset.
    pub kernel: &'a crate::Input,
    pub initramfs: Option<&'a crate::Input>,
    pub cmdline: &'a str,
    pub num_cpus: u32,
    pub mem_size: u64,
}

/// Longest command line Linux keeps on x86 (COMMAND_LINE_SIZE, including the NUL).
pub const PVH_CMDLINE_MAX: usize = 2048;
/// hvm_start_info magic ("xEn3" with the high bit set) and version.
const PVH_MAGIC: u32 = 0x336e_c578;
const PVH_VERSION: u32 = 1;

/// Offsets in the zero page (struct boot_params) and its setup header.
mod zp {
    pub const E820_ENTRIES: usize = 0x1e8;
    pub const SETUP_HEADER: usize = 0x1f1;
    pub const BOOT_FLAG: usize = 0x1fe;
    pub const HEADER_MAGIC: usize = 0x202;
    pub const SETUP_HEADER_END_BYTE: usize = 0x201;
    pub const TYPE_OF_LOADER: usize = 0x210;
    pub const LOADFLAGS: usize = 0x211;
    pub const RAMDISK_IMAGE: usize = 0x218;
    pub const RAMDISK_SIZE: usize = 0x21c;
    pub const HEAP_END_PTR: usize = 0x224;
    pub const CMD_LINE_PTR: usize = 0x228;
    pub const INITRD_ADDR_MAX: usize = 0x22c;
    pub const KERNEL_ALIGNMENT: usize = 0x230;
    pub const CMDLINE_SIZE: usize = 0x238;
    pub const E820_TABLE: usize = 0x2d0;
    pub const E820_MAX: usize = 128;
}

const LOADFLAG_CAN_USE_HEAP: u8 = 0x80;

enum Format {
    Elf,
    BzImage,
}

fn detect(mut file: &File, path: &Path) -> Result<Format> {
    let open_err = |source| Error::OpenKernel {
        path: path.to_owned(),
        source,
    };
    let mut head = [0u8; 0x206];
    let n = read_up_to(file, &mut head).map_err(open_err)?;
    file.seek(SeekFrom::Start(0)).map_err(open_err)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    if n >= 0x206 && head[zp::HEADER_MAGIC..zp::HEADER_MAGIC + 4] == *b"HdrS" {
        return Ok(Format::BzImage);
    }
    Err(Error::UnknownFormat {
        path: path.to_owned(),
    })
}

fn read_up_to(mut file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

pub(crate) fn write_mem(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestMemory { what, addr, source })
}

/// Loads everything a boot needs into `mem` and returns where the boot vCPU starts.
pub fn load_kernel(mem: &GuestMemoryMmap, spec: &KernelSpec) -> Result<BootInfo> {
    let path = spec.kernel.path.as_path();
    let mut file = &spec.kernel.file;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| Error::OpenKernel {
            path: path.to_owned(),
            source,
        })?;
    let load_err = |source| Error::LoadKernel {
        path: path.to_owned(),
        source,
    };
    let (boot, setup_header, kernel_end) = match detect(file, path)? {
        Format::Elf => {
            let r = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let boot = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(entry) => BootInfo {
                    mode: EntryMode::Pvh,
                    entry: entry.raw_value(),
                },
                // A vmlinux without the PVH note is entered in long mode at its ELF entry.
                _ => BootInfo {
                    mode: EntryMode::Linux64,
                    entry: r.kernel_load.raw_value(),
                },
            };
            (boot, None, r.kernel_end)
        }
        Format::BzImage => {
            let r = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
                .map_err(load_err)?;
            let mut header = vec![0u8; 0x268 - zp::SETUP_HEADER];
            file.seek(SeekFrom::Start(zp::SETUP_HEADER as u64))
                .and_then(|_| read_up_to(file, &mut header))
                .map_err(|source| Error::OpenKernel {
                    path: path.to_owned(),
                    source,
                })?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            let boot = BootInfo {
                mode: EntryMode::Linux64,
                entry: r.kernel_load.raw_value() + 0x200,
            };
            (boot, Some(header), r.kernel_end)
        }
    };

    let cmdline_max = match &setup_header {
        Some(h) => {
            let size = le_u32(h, zp::CMDLINE_SIZE - zp::SETUP_HEADER) as usize;
            // Protocols before 2.06 do not report it; they allow 255 bytes.
            if size == 0 {
                256
            } else {
                size + 1
            }
        }
        None => PVH_CMDLINE_MAX,
    };
    let cmdline = spec.cmdline.as_bytes();
    if cmdline.contains(&0) {
        return Err(Error::CmdlineNul);
    }
    if cmdline.len() + 1 > cmdline_max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: cmdline_max - 1,
        });
    }
    let mut cmd = cmdline.to_vec();
    cmd.push(0);
    write_mem(mem, "command line", CMDLINE_ADDR, &cmd)?;

    let initrd_max = match &setup_header {
        Some(h) => u64::from(le_u32(h, zp::INITRD_ADDR_MAX - zp::SETUP_HEADER)),
        None => u64::MAX,
    };
    let initrd = match spec.initramfs {
        Some(input) => Some(load_initramfs(
            mem,
            input,
            kernel_end,
            spec.mem_size,
            initrd_max,
        )?),
        None => None,
    };

    mptable::write(mem, spec.num_cpus)?;
    regs::write_tables(mem, boot.mode)?;
    let e820 = e820_map(spec.mem_size);
    match boot.mode {
        EntryMode::Pvh => write_pvh_info(mem, &e820, initrd)?,
        EntryMode::Linux64 => write_zero_page(mem, setup_header.as_deref(), &e820, initrd)?,
    }
    Ok(boot)
}

fn le_u32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        .unwrap_or(0)
}

/// Places the initramfs at the highest page-aligned address that fits, as bootloaders do,
/// so it stays clear of the kernel's decompression area.
fn load_initramfs(
    mem: &GuestMemoryMmap,
    input: &crate::Input,
    kernel_end: u64,
    mem_size: u64,
    addr_max: u64,
) -> Result<(u64, u64)> {
    let path = input.path.as_path();
    let size = input.size;
    let mut file = &input.file;
    file.seek(SeekFrom::Start(0))
        .map_err(|source| Error::OpenInitramfs {
            path: path.to_owned(),
            source,
        })?;
    let too_large = || Error::InitramfsTooLarge {
        path: path.to_owned(),
        size,
    };
    let top = mem_size.min(MMIO_GAP_START).min(addr_max.saturating_add(1));
    let addr = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::ReadInitramfs {
            path: path.to_owned(),
            source,
        })?;
    Ok((addr, size))
}

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut memmap = Vec::with_capacity(e820.len() * 24);
    for &(addr, size, kind) in e820 {
        memmap.extend_from_slice(&addr.to_le_bytes());
        memmap.extend_from_slice(&size.to_le_bytes());
        memmap.extend_from_slice(&kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    write_mem(mem, "PVH memory map", PVH_MEMMAP_ADDR, &memmap)?;
    let nr_modules: u32 = if let Some((addr, size)) = initrd {
        let mut module = Vec::with_capacity(32);
        module.extend_from_slice(&addr.to_le_bytes());
        module.extend_from_slice(&size.to_le_bytes());
        module.extend_from_slice(&[0u8; 16]); // no module command line, reserved
        write_mem(mem, "PVH module list", PVH_MODLIST_ADDR, &module)?;
        1
    } else {
        0
    };
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_MAGIC.to_le_bytes());
    info.extend_from_slice(&PVH_VERSION.to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&nr_modules.to_le_bytes());
    info.extend_from_slice(&PVH_MODLIST_ADDR.to_le_bytes());
    info.extend_from_slice(&CMDLINE_ADDR.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // no ACPI RSDP
    info.extend_from_slice(&PVH_MEMMAP_ADDR.to_le_bytes());
    info.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    write_mem(mem, "PVH start info", PVH_INFO_ADDR, &info)
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    setup_header: Option<&[u8]>,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut zp = vec![0u8; 4096];
    match setup_header {
        // bzImage: start from the kernel's own header, up to where it says it ends.
        Some(h) => {
            let end = (0x202 + usize::from(h[zp::SETUP_HEADER_END_BYTE - zp::SETUP_HEADER]))
                .clamp(0x202, 0x268);
            let len = end - zp::SETUP_HEADER;
            zp[zp::SETUP_HEADER..end].copy_from_slice(&h[..len]);
        }
        // A plain vmlinux has no header; write the fields the kernel checks.
        None => {
            zp[zp::BOOT_FLAG..zp::BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
            zp[zp::HEADER_MAGIC..zp::HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
            put32(&mut zp, zp::KERNEL_ALIGNMENT, 0x100_0000);
            put32(&mut zp, zp::CMDLINE_SIZE, (PVH_CMDLINE_MAX - 1) as u32);
        }
    }
    zp[zp::TYPE_OF_LOADER] = 0xff;
    zp[zp::LOADFLAGS] |= LOADFLAG_CAN_USE_HEAP;
    zp[zp::HEAP_END_PTR..zp::HEAP_END_PTR + 2].copy_from_slice(&0xfe00u16.to_le_bytes());
    put32(&mut zp, zp::CMD_LINE_PTR, CMDLINE_ADDR as u32);
    if let Some((addr, size)) = initrd {
        put32(&mut zp, zp::RAMDISK_IMAGE, addr as u32);
        put32(&mut zp, zp::RAMDISK_SIZE, size as u32);
    }
    let entries = e820.len().min(zp::E820_MAX);
    zp[zp::E820_ENTRIES] = entries as u8;
    for (i, &(addr, size, kind)) in e820.iter().take(entries).enumerate() {
        let off = zp::E820_TABLE + i * 20;
        zp[off..off + 8].copy_from_slice(&addr.to_le_bytes());
        zp[off + 8..off + 16].copy_from_slice(&size.to_le_bytes());
        zp[off + 16..off + 20].copy_from_slice(&kind.to_le_bytes());
    }
    write_mem(mem, "zero page", ZERO_PAGE_ADDR, &zp)
}

fn put32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
