//! The MSHV backend's pieces that run without /dev/mshv.

use super::*;

fn sample_sregs() -> SpecialRegisters {
    let code = SegmentRegister::from_gdt_entry(0x10, 0x00af_9b00_0000_ffff);
    let data = SegmentRegister::from_gdt_entry(0x18, 0x00cf_9300_0000_ffff);
    let tss = SegmentRegister::from_gdt_entry(0x20, 0x1200_8b34_5678_0067);
    SpecialRegisters {
        cs: code,
        ds: data,
        es: data,
        fs: SegmentRegister {
            base: 0x7fff_0000_1000,
            ..data
        },
        gs: data,
        ss: data,
        tr: tss,
        // A null LDT: not present, so unusable.
        ldt: SegmentRegister::from_gdt_entry(0, 0),
        gdt: DescriptorTable {
            base: 0x500,
            limit: 0x27,
        },
        idt: DescriptorTable {
            base: 0x520,
            limit: 0xfff,
        },
        cr0: 0x8005_0033,
        cr2: 0xdead_b000,
        cr3: 0x9000,
        cr4: 0x0020_06a0,
        cr8: 0x3,
        efer: 0xd01,
        apic_base: 0xfee0_0900,
    }
}

#[test]
fn standard_registers_round_trip() {
    let r = StandardRegisters {
        rax: 1,
        rbx: 2,
        rcx: 3,
        rdx: 4,
        rsi: 5,
        rdi: 6,
        rsp: 7,
        rbp: 8,
        r8: 9,
        r9: 10,
        r10: 11,
        r11: 12,
        r12: 13,
        r13: 14,
        r14: 15,
        r15: 16,
        rip: 0xffff_ffff_8100_0000,
        rflags: 0x246,
    };
    let m = regs_to_mshv(&r);
    assert_eq!((m.r15, m.rip, m.rflags), (16, r.rip, 0x246));
    assert_eq!(regs_from_mshv(&m), r);
}

#[test]
fn special_registers_round_trip() {
    let s = sample_sregs();
    assert_eq!(sregs_from_mshv(&sregs_to_mshv(&s)), s);
}

#[test]
fn segments_survive_the_hypervisor_encoding() {
    // What the hypervisor stores is hv_x64_segment_register with packed attribute bits;
    // go through it with mshv-bindings' own conversions.
    let s = sample_sregs();
    for seg in [s.cs, s.ds, s.fs, s.tr, s.ldt] {
        let hv: mb::hv_x64_segment_register = seg_to_mshv(&seg).into();
        let back = seg_from_mshv(&mb::SegmentRegister::from(hv));
        assert_eq!(back, seg, "{seg:?}");
    }
    // The 64-bit code segment's attributes land in the right bits: type 0xb, S, P, L, G.
    let hv: mb::hv_x64_segment_register = seg_to_mshv(&s.cs).into();
    // SAFETY: both views of the attribute union are plain integers.
    let attrs = unsafe { hv.__bindgen_anon_1.attributes };
    assert_eq!(attrs, 0xb | 1 << 4 | 1 << 7 | 1 << 13 | 1 << 15);
}

#[test]
fn lvt_mode_replaces_only_delivery_bits() {
    let mut regs = [0 as std::os::raw::c_char; 1024];
    let initial: u32 = 0x0001_0031 | (0x2 << 8);
    for (i, b) in initial.to_le_bytes().iter().enumerate() {
        regs[APIC_LVT1 + i] = *b as std::os::raw::c_char;
    }
    set_lvt_mode(&mut regs, APIC_LVT1, APIC_MODE_NMI);
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[APIC_LVT1 + i] as u8;
    }
    assert_eq!(u32::from_le_bytes(raw), 0x0001_0031 | (APIC_MODE_NMI << 8));
}

#[test]
fn pending_exception_encoding_matches_the_bindings() {
    let v = pending_exception(6);
    let reg = mb::hv_x64_pending_interruption_register { as_uint64: v };
    // SAFETY: both views of the union are plain integers.
    let bits = unsafe { reg.__bindgen_anon_1 };
    assert_eq!(bits.interruption_pending(), 1);
    assert_eq!(bits.interruption_type(), HV_X64_PENDING_EXCEPTION);
    assert_eq!(bits.interruption_vector(), 6);
    assert_eq!(bits.deliver_error_code(), 0);
    assert_eq!({ bits.error_code }, 0);
}

#[test]
fn pio_read_merges_into_rax() {
    let rax = 0x1122_3344_5566_7788;
    // IN AL: only AL changes.
    assert_eq!(merge_pio_read(rax, &[0xab]), 0x1122_3344_5566_77ab);
    // IN AX: only AX changes.
    assert_eq!(merge_pio_read(rax, &[0xcd, 0xab]), 0x1122_3344_5566_abcd);
    // IN EAX: a 32-bit write zero-extends.
    assert_eq!(
        merge_pio_read(rax, &[0x78, 0x56, 0x34, 0x12]),
        0x0000_0000_1234_5678
    );
}

#[test]
fn pio_write_sends_the_low_bytes() {
    let (data, n) = pio_write_data(0xffff_ffff_1234_5678, 1);
    assert_eq!(&data[..n], &[0x78]);
    let (data, n) = pio_write_data(0xffff_ffff_1234_5678, 2);
    assert_eq!(&data[..n], &[0x78, 0x56]);
    let (data, n) = pio_write_data(0xffff_ffff_1234_5678, 4);
    assert_eq!(&data[..n], &[0x78, 0x56, 0x34, 0x12]);
}

#[test]
fn pio_instruction_length() {
    // The hypervisor's value wins.
    assert_eq!(pio_insn_len(2, &[0xec]), Some(2));
    // Otherwise decoded: in al, dx / out dx, eax / out 0x80, al / in ax, dx / in eax, 0x71.
    assert_eq!(pio_insn_len(0, &[0xec]), Some(1));
    assert_eq!(pio_insn_len(0, &[0xef]), Some(1));
    assert_eq!(pio_insn_len(0, &[0xe6, 0x80]), Some(2));
    assert_eq!(pio_insn_len(0, &[0x66, 0xed]), Some(2));
    assert_eq!(pio_insn_len(0, &[0xe5, 0x71]), Some(2));
    assert_eq!(pio_insn_len(0, &[0x90]), None);
    assert_eq!(pio_insn_len(0, &[]), None);
    assert_eq!(pio_insn_len(0, &[0x66; 20]), None);
    // And RIP moves past it, wrapping like the mode's instruction pointer.
    assert_eq!(CodeSize::Bits64.advance_ip(0x1000, 1), 0x1001);
    assert_eq!(CodeSize::Bits16.advance_ip(0xffff, 2), 0x1);
}

#[test]
fn unhandled_messages_are_named() {
    assert_eq!(
        message_name(mb::hv_message_type_HVMSG_X64_MSR_INTERCEPT),
        "MSR intercept"
    );
    assert_eq!(message_name(0x1234), "unknown message");
}

#[test]
fn new_without_dev_mshv_is_unavailable() {
    if std::path::Path::new(crate::MSHV_DEVICE).exists() {
        eprintln!("skipping: {} exists on this machine", crate::MSHV_DEVICE);
        return;
    }
    match MshvHypervisor::new() {
        Err(e @ Error::Unavailable(HypervisorKind::Mshv, _)) => {
            let msg = e.to_string();
            assert!(msg.contains("/dev/mshv"), "{msg}");
        }
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!(
            "MshvHypervisor::new() succeeded without {}",
            crate::MSHV_DEVICE
        ),
    }
}

#[test]
fn selecting_mshv_without_the_device_reports_it() {
    if std::path::Path::new(crate::MSHV_DEVICE).exists() {
        return;
    }
    let err = match crate::new(crate::Selection::Mshv) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("mshv must not open without {}", crate::MSHV_DEVICE),
    };
    assert!(err.contains("mshv") && err.contains("/dev/mshv"), "{err}");
}
