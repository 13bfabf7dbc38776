//! Initial register state for the two entry modes, and the tables they reference.

use hypervisor::{MsrEntry, SegmentRegister, SpecialRegisters, StandardRegisters};
use vm_memory::GuestMemoryMmap;
#[cfg(test)]
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;
use crate::loader::{write_mem, BootInfo, EntryMode, Result};

/// GDT for the PVH entry: 32-bit flat code and data, and a TSS descriptor.
pub const PVH_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff, // 0x08: code, 32-bit, 4 GiB
    0x00cf_9300_0000_ffff, // 0x10: data, 4 GiB
    0x0000_8b00_0000_0067, // 0x18: 32-bit busy TSS
];

/// GDT for the 64-bit Linux entry: long-mode code, flat data, a TSS descriptor.
pub const LONG_MODE_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08: code, 64-bit
    0x00cf_9300_0000_ffff, // 0x10: data
    0x0000_8b00_0000_0067, // 0x18: TSS
];

const CODE_SEL: u16 = 0x08;
const DATA_SEL: u16 = 0x10;
const TSS_SEL: u16 = 0x18;

const CR0_PE: u64 = 1;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Which GDT an entry mode uses.
pub fn gdt_for(mode: EntryMode) -> &'static [u64; 4] {
    match mode {
        EntryMode::Pvh => &PVH_GDT,
        EntryMode::Linux64 => &LONG_MODE_GDT,
    }
}

/// Writes the GDT, an empty IDT and (for the 64-bit entry) identity page tables covering
/// the first 1 GiB with 2 MiB pages, which is all the kernel touches before it builds its own.
pub fn write_tables(mem: &GuestMemoryMmap, mode: EntryMode) -> Result<()> {
    let write = |what, addr, bytes: &[u8]| write_mem(mem, what, addr, bytes);
    let gdt: Vec<u8> = gdt_for(mode).iter().flat_map(|e| e.to_le_bytes()).collect();
    write("GDT", GDT_ADDR, &gdt)?;
    write("IDT", IDT_ADDR, &[0u8; 8])?;
    if mode == EntryMode::Linux64 {
        // Present + writable; PML4[0] -> PDPT, PDPT[0] -> PD, PD maps 512 x 2 MiB.
        write("PML4", PML4_ADDR, &(PDPT_ADDR | 0x3).to_le_bytes())?;
        write("PDPT", PDPT_ADDR, &(PD_ADDR | 0x3).to_le_bytes())?;
        let pd: Vec<u8> = (0..512u64)
            .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
            .collect();
        write("page directory", PD_ADDR, &pd)?;
    }
    Ok(())
}

/// Segment, control and descriptor-table registers for the entry mode.
pub fn setup_sregs(sregs: &mut SpecialRegisters, mode: EntryMode) {
    let gdt = gdt_for(mode);
    let code = SegmentRegister::from_gdt_entry(CODE_SEL, gdt[1]);
    let data = SegmentRegister::from_gdt_entry(DATA_SEL, gdt[2]);
    let mut tss = SegmentRegister::from_gdt_entry(TSS_SEL, gdt[3]);
    tss.base = 0;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Pvh => {
            // PVH: 32-bit protected mode, paging off.
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Linux64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
    }
}

/// General registers at the kernel entry.
pub fn boot_regs(boot: &BootInfo) -> StandardRegisters {
    let mut regs = StandardRegisters {
        rip: boot.entry,
        rflags: 0x2, // bit 1 is reserved and always set
        ..Default::default()
    };
    match boot.mode {
        // PVH: EBX holds the physical address of hvm_start_info.
        EntryMode::Pvh => regs.rbx = PVH_INFO_ADDR,
        // Linux 64-bit boot protocol: RSI holds the zero page.
        EntryMode::Linux64 => {
            regs.rsi = ZERO_PAGE_ADDR;
            regs.rsp = BOOT_STACK_ADDR;
            regs.rbp = BOOT_STACK_ADDR;
        }
    }
    regs
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// MTRRs enabled, default type write-back: without it a kernel may map RAM uncached.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// MSR values at power-on as the kernel expects them from firmware.
/// IA32_ARCH_CAPABILITIES is deliberately not passed through (some hosts refuse it).
pub fn boot_msrs() -> Vec<MsrEntry> {
    let m = |index, data| MsrEntry { index, data };
    vec![
        m(MSR_IA32_SYSENTER_CS, 0),
        m(MSR_IA32_SYSENTER_ESP, 0),
        m(MSR_IA32_SYSENTER_EIP, 0),
        m(MSR_STAR, 0),
        m(MSR_CSTAR, 0),
        m(MSR_KERNEL_GS_BASE, 0),
        m(MSR_SYSCALL_MASK, 0),
        m(MSR_LSTAR, 0),
        m(MSR_IA32_TSC, 0),
        m(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        m(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvh_state_is_flat_protected_mode_without_paging() {
        let mut s = SpecialRegisters::default();
        setup_sregs(&mut s, EntryMode::Pvh);
        assert_eq!(s.cr0 & CR0_PG, 0);
        assert_eq!(s.cr0 & CR0_PE, 1);
        assert_eq!((s.cs.selector, s.cs.db, s.cs.l), (CODE_SEL, 1, 0));
        assert_eq!(s.cs.limit, 0xffff_ffff);
        assert_eq!(s.ds.selector, DATA_SEL);
        assert_eq!(s.efer, 0);
        let regs = boot_regs(&BootInfo {
            mode: EntryMode::Pvh,
            entry: 0x100_0000,
        });
        assert_eq!(
            (regs.rbx, regs.rip, regs.rflags),
            (PVH_INFO_ADDR, 0x100_0000, 2)
        );
    }

    #[test]
    fn long_mode_state_enables_paging_and_lma() {
        let mut s = SpecialRegisters::default();
        setup_sregs(&mut s, EntryMode::Linux64);
        assert_eq!(s.cr3, PML4_ADDR);
        assert_ne!(s.cr0 & CR0_PG, 0);
        assert_ne!(s.cr4 & CR4_PAE, 0);
        assert_eq!(s.efer, EFER_LME | EFER_LMA);
        assert_eq!((s.cs.l, s.cs.db), (1, 0));
        let regs = boot_regs(&BootInfo {
            mode: EntryMode::Linux64,
            entry: 0x10_0200,
        });
        assert_eq!(regs.rsi, ZERO_PAGE_ADDR);
    }

    #[test]
    fn identity_map_covers_first_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_tables(&mem, EntryMode::Linux64).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 3);
        let last: u64 = mem.read_obj(GuestAddress(PD_ADDR + 511 * 8)).unwrap();
        assert_eq!(last, (511 << 21) | 0x83);
        let code: u64 = mem.read_obj(GuestAddress(GDT_ADDR + 8)).unwrap();
        assert_eq!(code, LONG_MODE_GDT[1]);
    }
}
