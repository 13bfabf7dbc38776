//! podvmm's backend-neutral registers to and from MSHV's, and the local APIC's LVT wiring.

use super::*;

pub(super) fn regs_to_mshv(r: &StandardRegisters) -> mb::StandardRegisters {
    mb::StandardRegisters {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(super) fn regs_from_mshv(r: &mb::StandardRegisters) -> StandardRegisters {
    StandardRegisters {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
    }
}

pub(super) fn seg_to_mshv(s: &SegmentRegister) -> mb::SegmentRegister {
    mb::SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: s.unusable,
        padding: 0,
    }
}

/// Hyper-V's segment attributes have no "unusable" bit (mshv-bindings reports 0); a segment
/// that is not present is what KVM calls unusable, so derive it from P.
pub(super) fn seg_from_mshv(s: &mb::SegmentRegister) -> SegmentRegister {
    SegmentRegister {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present,
        dpl: s.dpl,
        db: s.db,
        s: s.s,
        l: s.l,
        g: s.g,
        avl: s.avl,
        unusable: u8::from(s.present == 0),
    }
}

pub(super) fn sregs_to_mshv(s: &SpecialRegisters) -> mb::SpecialRegisters {
    mb::SpecialRegisters {
        cs: seg_to_mshv(&s.cs),
        ds: seg_to_mshv(&s.ds),
        es: seg_to_mshv(&s.es),
        fs: seg_to_mshv(&s.fs),
        gs: seg_to_mshv(&s.gs),
        ss: seg_to_mshv(&s.ss),
        tr: seg_to_mshv(&s.tr),
        ldt: seg_to_mshv(&s.ldt),
        gdt: mb::TableRegister {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: mb::TableRegister {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
        // Ignored by mshv-ioctls' set_sregs; pending interrupts live in the hypervisor.
        interrupt_bitmap: [0; 4],
    }
}

pub(super) fn sregs_from_mshv(s: &mb::SpecialRegisters) -> SpecialRegisters {
    SpecialRegisters {
        cs: seg_from_mshv(&s.cs),
        ds: seg_from_mshv(&s.ds),
        es: seg_from_mshv(&s.es),
        fs: seg_from_mshv(&s.fs),
        gs: seg_from_mshv(&s.gs),
        ss: seg_from_mshv(&s.ss),
        tr: seg_from_mshv(&s.tr),
        ldt: seg_from_mshv(&s.ldt),
        gdt: DescriptorTable {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: DescriptorTable {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        apic_base: s.apic_base,
    }
}

/// Replaces the delivery-mode field (bits 8-10) of a local APIC LVT register in the
/// 1 KiB register image that mshv-bindings' `LapicState` uses (the same layout as KVM's).
pub(super) fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}
