//! Guest physical memory layout. Fixed addresses are below 1 MiB, where a PC keeps its
//! boot-time tables; the kernel loads at 1 MiB; a 1 GiB hole below 4 GiB holds MMIO.

use vm_memory::GuestAddress;

/// The boot GDT (PVH 32-bit or long-mode flat segments) and an empty IDT.
pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
/// PVH `hvm_start_info`, its module list (initramfs) and memory map.
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MODLIST_ADDR: u64 = 0x6040;
pub const PVH_MEMMAP_ADDR: u64 = 0x6080;
/// Linux 64-bit boot protocol `boot_params` ("zero page").
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack for the 64-bit entry (grows down, below the page tables).
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Identity-mapped page tables for the 64-bit entry: PML4, PDPT, one PD of 2 MiB pages.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Low memory reserved for boot tables (the MP configuration table), up to 640 KiB.
pub const RESERVED_LOW_START: u64 = 0x9d000;
/// Where the MP configuration table goes (it outgrows the 1 KiB EBDA with many vCPUs).
pub const MPTABLE_ADDR: u64 = RESERVED_LOW_START;
/// Start of the extended BIOS data area, where Linux looks for the MP floating pointer (639 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// End of conventional memory (the VGA/BIOS hole follows).
pub const LOW_MEM_END: u64 = 0xa0000;
/// Where the kernel is loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// MMIO hole below 4 GiB: local APIC, IO-APIC and virtio-mmio devices live here.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;

/// Smallest guest the layout supports: the fixed tables plus room for a kernel.
pub const MIN_MEMORY: u64 = 16 << 20;

/// The guest RAM ranges for `size` bytes of memory: below the MMIO gap, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut regions = vec![(GuestAddress(0), low as usize)];
    if size > low {
        regions.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    regions
}

/// E820 entry types.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest's memory map as (address, length, type), sorted and non-overlapping.
pub fn e820_map(size: u64) -> Vec<(u64, u64, u32)> {
    let low_end = size.min(MMIO_GAP_START);
    let mut map = vec![
        (0, RESERVED_LOW_START, E820_RAM),
        (
            RESERVED_LOW_START,
            LOW_MEM_END - RESERVED_LOW_START,
            E820_RESERVED,
        ),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if size > low_end {
        map.push((MMIO_GAP_END, size - low_end, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region() {
        assert_eq!(ram_regions(2 << 30), vec![(GuestAddress(0), 2 << 30)]);
        let map = e820_map(2 << 30);
        assert_eq!(
            map.last().unwrap(),
            &(HIMEM_START, (2 << 30) - HIMEM_START, E820_RAM)
        );
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 5u64 << 30;
        assert_eq!(
            ram_regions(size),
            vec![
                (GuestAddress(0), MMIO_GAP_START as usize),
                (GuestAddress(MMIO_GAP_END), (2usize << 30)),
            ]
        );
        let map = e820_map(size);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the 640 KiB - 1 MiB hole is usable RAM.
        assert_eq!(ram, size - (HIMEM_START - RESERVED_LOW_START));
        for w in map.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "sorted and disjoint: {map:?}");
        }
    }
}
