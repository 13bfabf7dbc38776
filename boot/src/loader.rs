//! Loads the kernel, initramfs and command line, and writes the boot-protocol structures.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
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
    #[error("writing the {what}: {source}")]
    BootParams {
        what: &'static str,
        #[source]
        source: linux_loader::configurator::Error,
    },
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

/// `boot_params.hdr.boot_flag` and `header` for a kernel without a setup header of its own.
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
/// `type_of_loader`: a boot loader without an assigned id.
const LOADER_OTHER: u8 = 0xff;

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
    // The setup header's magic, at 0x202 in the file (`boot_params.hdr.header`).
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]]) == HDRS_MAGIC
    {
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
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            let boot = BootInfo {
                mode: EntryMode::Linux64,
                entry: r.kernel_load.raw_value() + 0x200,
            };
            (boot, r.setup_header, r.kernel_end)
        }
    };

    let cmdline_max = match &setup_header {
        Some(h) => {
            let size = h.cmdline_size as usize;
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
        Some(h) => u64::from(h.initrd_addr_max),
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
        EntryMode::Linux64 => write_zero_page(mem, setup_header, &e820, initrd)?,
    }
    Ok(boot)
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

/// The PVH start info, its memory map and module list, through linux-loader's configurator.
fn write_pvh_info(
    mem: &GuestMemoryMmap,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|&(addr, size, type_)| hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let info = hvm_start_info {
        magic: PVH_MAGIC,
        version: PVH_VERSION,
        nr_modules: modules.len() as u32,
        modlist_paddr: PVH_MODLIST_ADDR,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(PVH_MODLIST_ADDR));
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(|source| Error::BootParams {
        what: "PVH start info",
        source,
    })
}

/// The Linux zero page (`boot_params`), through linux-loader's configurator: a bzImage's own
/// setup header, or for a plain vmlinux the fields the kernel checks.
fn write_zero_page(
    mem: &GuestMemoryMmap,
    setup_header: Option<setup_header>,
    e820: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<()> {
    let mut zp = boot_params::default();
    match setup_header {
        Some(h) => zp.hdr = h,
        None => {
            zp.hdr.boot_flag = BOOT_FLAG;
            zp.hdr.header = HDRS_MAGIC;
            zp.hdr.kernel_alignment = 0x100_0000;
            zp.hdr.cmdline_size = (PVH_CMDLINE_MAX - 1) as u32;
        }
    }
    zp.hdr.type_of_loader = LOADER_OTHER;
    zp.hdr.loadflags |= LOADFLAG_CAN_USE_HEAP;
    zp.hdr.heap_end_ptr = 0xfe00;
    zp.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    if let Some((addr, size)) = initrd {
        zp.hdr.ramdisk_image = addr as u32;
        zp.hdr.ramdisk_size = size as u32;
    }
    let entries = e820.len().min(zp.e820_table.len());
    zp.e820_entries = entries as u8;
    for (slot, &(addr, size, type_)) in zp.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    let params = BootParams::new(&zp, GuestAddress(ZERO_PAGE_ADDR));
    LinuxBootConfigurator::write_bootparams(&params, mem).map_err(|source| Error::BootParams {
        what: "zero page",
        source,
    })
}
