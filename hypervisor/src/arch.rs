//! x86_64 vCPU state in a backend-neutral form. Each backend converts to and from its own
//! binding types; boot code only ever sees these.

/// General-purpose registers, instruction pointer and flags.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StandardRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// A segment register in its hidden (descriptor-cache) form.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SegmentRegister {
    pub base: u64,
    pub limit: u32,
    pub selector: u16,
    pub type_: u8,
    pub present: u8,
    pub dpl: u8,
    pub db: u8,
    pub s: u8,
    pub l: u8,
    pub g: u8,
    pub avl: u8,
    pub unusable: u8,
}

impl SegmentRegister {
    /// Decodes a GDT entry into the register form the hypervisor loads.
    pub fn from_gdt_entry(selector: u16, entry: u64) -> Self {
        let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
        let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
        let g = ((entry >> 55) & 1) as u8;
        SegmentRegister {
            base,
            // With 4 KiB granularity the limit counts pages; hypervisors want bytes.
            limit: if g == 1 {
                ((limit as u32) << 12) | 0xfff
            } else {
                limit as u32
            },
            selector,
            type_: ((entry >> 40) & 0xf) as u8,
            s: ((entry >> 44) & 1) as u8,
            dpl: ((entry >> 45) & 3) as u8,
            present: ((entry >> 47) & 1) as u8,
            avl: ((entry >> 52) & 1) as u8,
            l: ((entry >> 53) & 1) as u8,
            db: ((entry >> 54) & 1) as u8,
            g,
            unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        }
    }
}

/// GDTR / IDTR.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescriptorTable {
    pub base: u64,
    pub limit: u16,
}

/// Segment, control and descriptor-table registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpecialRegisters {
    pub cs: SegmentRegister,
    pub ds: SegmentRegister,
    pub es: SegmentRegister,
    pub fs: SegmentRegister,
    pub gs: SegmentRegister,
    pub ss: SegmentRegister,
    pub tr: SegmentRegister,
    pub ldt: SegmentRegister,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub apic_base: u64,
}

/// The parts of the x87/SSE state a boot needs to set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FpuState {
    pub fcw: u16,
    pub mxcsr: u32,
}

impl Default for FpuState {
    /// The architectural reset values (FNINIT / power-on MXCSR).
    fn default() -> Self {
        FpuState {
            fcw: 0x37f,
            mxcsr: 0x1f80,
        }
    }
}

/// One CPUID leaf/subleaf as handed to the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuIdEntry {
    pub function: u32,
    pub index: u32,
    /// Backend flag bits; bit 0 means "`index` is significant".
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// `CpuIdEntry::flags` bit: the leaf has subleaves selected by ECX.
pub const CPUID_FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// A model-specific register and the value to load.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_flat_64bit_code_segment() {
        // Present, DPL 0, code execute/read accessed, L=1, G=1, limit 0xfffff.
        let seg = SegmentRegister::from_gdt_entry(0x10, 0x00af_9b00_0000_ffff);
        assert_eq!(seg.base, 0);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!((seg.present, seg.s, seg.l, seg.db, seg.g), (1, 1, 1, 0, 1));
        assert_eq!(seg.unusable, 0);
    }

    #[test]
    fn decodes_base_and_byte_granular_limit() {
        // base 0x12345678, limit 0x67, type 0xb (busy TSS), present, byte granular.
        let entry: u64 = 0x1200_8b34_5678_0067;
        let seg = SegmentRegister::from_gdt_entry(0x18, entry);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0x67);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.s, 0);
    }

    #[test]
    fn not_present_is_unusable() {
        assert_eq!(SegmentRegister::from_gdt_entry(0, 0).unusable, 1);
    }
}
