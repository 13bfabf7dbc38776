//! What the VMM handed over: the PVH `hvm_start_info` (command line, memory map) and the
//! guest-physical memory this program may use for queues and buffers.

use crate::dma::Pool;

const PVH_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
/// The page tables map the low 4 GiB; RAM above the 3 GiB MMIO hole is not used.
const MMIO_HOLE: u64 = 0xc000_0000;
/// Buffers start above the image, at the first 2 MiB boundary past it.
const POOL_ALIGN: u64 = 2 << 20;
/// The top of RAM is left unused: hostile requests aim there, so that a device that
/// wrongly accepted a buffer crossing the end of RAM would scribble on nothing we use.
pub const GUARD: u64 = 1 << 20;

pub struct BootInfo {
    pub cmdline: &'static str,
    /// End of the RAM region that starts at 1 MiB (exclusive).
    pub ram_end: u64,
    /// Where the DMA pool begins (after the image).
    pub pool_start: u64,
}

extern "C" {
    static __image_end: u8;
}

/// Reads a little-endian value from low memory the VMM wrote.
fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: only called for addresses inside `hvm_start_info`, its memory map and the
    // command line, which the VMM placed in low RAM (identity mapped, never written by us).
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

pub fn parse(start_info: u64) -> Result<BootInfo, &'static str> {
    if start_info == 0 || start_info >= 0x10_0000 {
        return Err("hvm_start_info pointer is not in low memory");
    }
    if peek::<u32>(start_info) != PVH_MAGIC {
        return Err("bad hvm_start_info magic");
    }
    let cmdline_paddr: u64 = peek(start_info + 0x18);
    let memmap_paddr: u64 = peek(start_info + 0x28);
    let memmap_entries: u32 = peek(start_info + 0x30);
    if cmdline_paddr == 0 || cmdline_paddr >= 0x10_0000 {
        return Err("command line is not in low memory");
    }
    let mut len = 0usize;
    while len < 4096 && peek::<u8>(cmdline_paddr + len as u64) != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes at `cmdline_paddr` were just read one by one; the VMM never
    // changes them after boot and we never write below 1 MiB, so a 'static borrow holds.
    let bytes = unsafe { core::slice::from_raw_parts(cmdline_paddr as *const u8, len) };
    let cmdline = core::str::from_utf8(bytes).map_err(|_| "command line is not UTF-8")?;

    let mut ram_end = 0;
    for i in 0..u64::from(memmap_entries.min(128)) {
        let e = memmap_paddr + i * 24;
        let (addr, size, kind): (u64, u64, u32) = (peek(e), peek(e + 8), peek(e + 16));
        if kind == E820_RAM && addr <= 0x10_0000 && addr + size > 0x10_0000 {
            ram_end = (addr + size).min(MMIO_HOLE);
        }
    }
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let pool_start = image_end.next_multiple_of(POOL_ALIGN);
    if ram_end < pool_start + GUARD + (4 << 20) {
        return Err("not enough RAM: give the guest at least 16 MiB");
    }
    Ok(BootInfo {
        cmdline,
        ram_end,
        pool_start,
    })
}

impl BootInfo {
    pub fn pool(&self) -> Pool {
        Pool::new(self.pool_start, self.ram_end - GUARD)
    }
}
