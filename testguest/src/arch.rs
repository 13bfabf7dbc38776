//! The machine-level part: the PVH entry, long mode, the GDT/TSS/IDT, the drop to ring 3,
//! the exception handlers and the ring-0 gate.
//!
//! Everything that runs in ring 0 is here, written in assembly and kept short: under
//! software KVM (PVM) every ring-0 instruction is emulated one at a time, while ring-3 code
//! runs natively. The boot path is about 90 instructions of code (a few hundred executed);
//! then the guest lives in ring 3.
//!
//! Boot sequence:
//! 1. `pvh_start` (32-bit protected mode, paging off, EBX = `hvm_start_info`): loads CR3
//!    with the static page tables (identity map of the low 4 GiB, 2 MiB pages, all
//!    user-accessible), enables PAE, SSE, long mode and paging, loads our GDT and jumps to
//!    64-bit code.
//! 2. `long_mode`: data segments, the ring-0 stack, the TSS descriptor (RSP0 and IST1 point
//!    at the ring-0 stack), the IDT (32 exception vectors, all on IST1), then `iretq` to
//!    [`crate::user_main`] in ring 3 with IOPL 3 (so ring 3 may use port I/O) and interrupts
//!    off.
//! 3. Ring 3 may come back to ring 0 only through the gate ([`ring0_call`]): a `ud2` with a
//!    magic value in RAX, which the #UD handler recognises; every other exception prints a
//!    `TESTGUEST exception ...` line and resets the machine.

use core::arch::{asm, global_asm};

/// Selectors of our GDT (the asm below relies on this layout).
const KERNEL_CS: u16 = 0x08;
const KERNEL_DS: u16 = 0x10;
const USER_SS: u16 = 0x18 | 3;
const USER_CS: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;
/// RFLAGS in ring 3: reserved bit 1 and IOPL 3 (honoured by hardware KVM; PVM ignores it,
/// which is why port I/O goes through the gate), interrupts off.
const USER_RFLAGS: u64 = 0x3002;

/// RAX value that turns a ring-3 `ud2` into a call of a function in ring 0 (RDI), with
/// arguments RSI and RDX.
pub const GATE_MAGIC: u64 = 0x5047_5445_5354_4741; // "PGTESTGA"

global_asm!(
    r#"
    /* PVH entry note: the VMM enters `pvh_start` in 32-bit protected mode. */
    .section .note.Xen, "a"
    .balign 4
    .long 4
    .long 4
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start
    .balign 4

    /* Identity map of the first 4 GiB with 2 MiB pages: present, writable, user. */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 0x7
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x7
    .quad boot_pd + 0x1000 + 0x7
    .quad boot_pd + 0x2000 + 0x7
    .quad boot_pd + 0x3000 + 0x7
    .fill 508, 8, 0
boot_pd:
    .set pd_i, 0
    .rept 2048
    .quad (pd_i << 21) | 0x87
    .set pd_i, pd_i + 1
    .endr

    .section .data, "aw"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: ring-0 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: ring-0 data */
    .quad 0x00cff2000000ffff    /* 0x18: ring-3 data (0x1b) */
    .quad 0x00affa000000ffff    /* 0x20: ring-3 64-bit code (0x23) */
gdt_tss:
    .quad 0                     /* 0x28: TSS, filled in at boot */
    .quad 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
    .balign 8
idt_ptr:
    .word 256 * 16 - 1
    .quad idt
    .balign 16
tss:
    .long 0
    .quad kstack_top            /* RSP0 */
    .quad 0
    .quad 0
    .quad 0
    .quad kstack_top            /* IST1 */
    .fill 6, 8, 0
    .quad 0
    .word 0
    .word 104                   /* no I/O bitmap */
tss_end:

    .section .bss, "aw", @nobits
    .balign 4096
idt:
    .fill 256 * 16, 1, 0
kstack:
    .fill 16384, 1, 0
    .globl kstack_top
kstack_top:
ustack:
    .fill 262144, 1, 0
ustack_top:

    .section .text.boot, "ax"
    .code32
    .globl pvh_start
pvh_start:
    cli                         /* EBX = hvm_start_info, kept for user_main */
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl %cr4, %eax
    orl $0x620, %eax            /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xc0000080, %ecx      /* EFER */
    rdmsr
    orl $0x100, %eax            /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0xfffffffb, %eax      /* EM off */
    orl $0x80010022, %eax       /* PG | WP | NE | MP */
    movl %eax, %cr0
    lgdt gdt_ptr
    ljmpl ${kernel_cs}, $long_mode

    .code64
long_mode:
    movw ${kernel_ds}, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $kstack_top, %rsp

    /* TSS descriptor: limit 103, type 0x89 (available 64-bit TSS). */
    movq $tss, %rax
    movq $gdt_tss, %rdi
    movw $(tss_end - tss - 1), (%rdi)
    movw %ax, 2(%rdi)
    shrq $16, %rax
    movb %al, 4(%rdi)
    movb $0x89, 5(%rdi)
    movb $0, 6(%rdi)
    movb %ah, 7(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    movw ${tss_sel}, %ax
    ltr %ax

    /* IDT: vectors 0-31, interrupt gates on IST1. */
    movq $idt, %rdi
    movq $exception_stubs, %rsi
    movl $32, %ecx
1:
    movq (%rsi), %rax
    movw %ax, (%rdi)
    movw ${kernel_cs}, 2(%rdi)
    movb $1, 4(%rdi)
    movb $0x8e, 5(%rdi)
    shrq $16, %rax
    movw %ax, 6(%rdi)
    shrq $16, %rax
    movl %eax, 8(%rdi)
    addq $8, %rsi
    addq $16, %rdi
    decl %ecx
    jnz 1b
    lidt idt_ptr

    /* To ring 3: SS, RSP, RFLAGS (IOPL 3, IF off), CS, RIP; RDI = hvm_start_info. */
    movl %ebx, %edi
    pushq ${user_ss}
    pushq $(ustack_top - 8)
    pushq ${user_rflags}
    pushq ${user_cs}
    pushq $user_main
    iretq

    /* Exceptions. The frame the handler sees: vector, error code, RIP, CS, RFLAGS, RSP, SS. */
    .macro exc_noerr n
    .balign 16
exc_\n:
    pushq $0
    pushq $\n
    jmp exception_common
    .endm
    .macro exc_err n
    .balign 16
exc_\n:
    pushq $\n
    jmp exception_common
    .endm
    exc_noerr 0
    exc_noerr 1
    exc_noerr 2
    exc_noerr 3
    exc_noerr 4
    exc_noerr 5
    exc_noerr 6
    exc_noerr 7
    exc_err 8
    exc_noerr 9
    exc_err 10
    exc_err 11
    exc_err 12
    exc_err 13
    exc_err 14
    exc_noerr 15
    exc_noerr 16
    exc_err 17
    exc_noerr 18
    exc_noerr 19
    exc_noerr 20
    exc_err 21
    exc_noerr 22
    exc_noerr 23
    exc_noerr 24
    exc_noerr 25
    exc_noerr 26
    exc_noerr 27
    exc_noerr 28
    exc_err 29
    exc_err 30
    exc_noerr 31

exception_common:
    /* The gate: #UD from ring 3 with RAX = GATE_MAGIC calls RDI(RSI) in ring 0. */
    cmpq $6, (%rsp)
    jne 2f
    testb $3, 24(%rsp)
    jz 2f
    movabsq ${gate_magic}, %r11
    cmpq %r11, %rax
    jne 2f
    addq $16, %rsp              /* drop vector and error code: an iretq frame remains */
    addq $2, (%rsp)             /* skip the ud2 */
    subq $8, %rsp               /* align the stack for the call */
    movq %rdi, %rax
    movq %rsi, %rdi
    movq %rdx, %rsi
    call *%rax
    addq $8, %rsp
    iretq
2:
    movq %rsp, %rdi
    andq $-16, %rsp
    call exception_report
3:
    hlt
    jmp 3b

    .section .rodata, "a"
    .balign 8
exception_stubs:
    .quad exc_0, exc_1, exc_2, exc_3, exc_4, exc_5, exc_6, exc_7
    .quad exc_8, exc_9, exc_10, exc_11, exc_12, exc_13, exc_14, exc_15
    .quad exc_16, exc_17, exc_18, exc_19, exc_20, exc_21, exc_22, exc_23
    .quad exc_24, exc_25, exc_26, exc_27, exc_28, exc_29, exc_30, exc_31
    .text
"#,
    gate_magic = const GATE_MAGIC,
    kernel_cs = const KERNEL_CS,
    kernel_ds = const KERNEL_DS,
    user_cs = const USER_CS,
    user_ss = const USER_SS,
    tss_sel = const TSS_SEL,
    user_rflags = const USER_RFLAGS,
    options(att_syntax)
);

/// The frame the exception stubs build on the ring-0 stack.
#[repr(C)]
pub struct ExceptionFrame {
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Reports an unexpected exception on COM1 and resets the machine. Runs in ring 0, where
/// every instruction is emulated under PVM: straight-line code, no formatting machinery.
#[no_mangle]
extern "C" fn exception_report(frame: &ExceptionFrame) -> ! {
    let cr2: u64;
    // SAFETY: reading CR2 in ring 0 has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
    raw_print(b"TESTGUEST exception vector=");
    raw_hex(frame.vector);
    raw_print(b" error=");
    raw_hex(frame.error);
    raw_print(b" rip=");
    raw_hex(frame.rip);
    raw_print(b" cs=");
    raw_hex(frame.cs);
    raw_print(b" rsp=");
    raw_hex(frame.rsp);
    raw_print(b" cr2=");
    raw_hex(cr2);
    raw_print(b"\nTESTGUEST end status=exception\n");
    reset()
}

fn raw_print(s: &[u8]) {
    for &b in s {
        crate::serial::out_byte(b);
    }
}

fn raw_hex(v: u64) {
    raw_print(b"0x");
    let mut shift = 64;
    while shift > 0 {
        shift -= 4;
        let nib = ((v >> shift) & 0xf) as u8;
        crate::serial::out_byte(if nib < 10 {
            b'0' + nib
        } else {
            b'a' + nib - 10
        });
    }
}

/// Pulses the reset line through the i8042 (ends podvmm with status 0), then halts.
pub fn reset() -> ! {
    if cpl() == 0 {
        reset_ring0(0, 0);
    } else {
        ring0_call(reset_ring0, 0, 0);
    }
    loop {
        core::hint::spin_loop();
    }
}

extern "C" fn reset_ring0(_: u64, _: u64) -> u64 {
    // SAFETY: port 0x64 is the i8042 command port; 0xFE pulses the reset line.
    unsafe { asm!("out 0x64, al", in("al") 0xfeu8, options(nomem, nostack)) };
    0
}

/// Calls `f(a, b)` in ring 0 through the #UD gate and returns its result. From ring 3 only.
pub fn ring0_call(f: extern "C" fn(u64, u64) -> u64, a: u64, b: u64) -> u64 {
    let ret: u64;
    // SAFETY: the #UD handler recognises the magic in RAX, calls RDI with RSI on the ring-0
    // stack and returns past the `ud2`; everything the C ABI lets a callee clobber is
    // declared clobbered.
    unsafe {
        asm!(
            "ud2",
            inout("rax") GATE_MAGIC => ret,
            in("rdi") f as usize as u64,
            in("rsi") a,
            in("rdx") b,
            clobber_abi("C"),
        )
    };
    ret
}

/// Runs `f` in ring 0 (through the gate from ring 3, directly if already there) and returns
/// its result. Under PVM everything `f` does is emulated instruction by instruction.
pub fn in_ring0<F: FnMut() -> u64>(mut f: F) -> u64 {
    extern "C" fn trampoline<F: FnMut() -> u64>(closure: u64, _: u64) -> u64 {
        // SAFETY: `closure` is the address of the `F` on the caller's stack, which lives
        // until `ring0_call` returns; nothing else refers to it meanwhile.
        let f = unsafe { &mut *(closure as *mut F) };
        f()
    }
    if cpl() == 0 {
        return f();
    }
    ring0_call(trampoline::<F>, &mut f as *mut F as u64, 0)
}

/// Reads a byte from an I/O port. Ring 0 only (PVM ignores IOPL: `in` faults in ring 3).
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: callers use the PIT/speaker ports only, where a read has no side effect on
    // memory.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags))
    };
    v
}

/// Writes a byte to an I/O port. Ring 0 only.
pub fn outb(port: u16, v: u8) {
    // SAFETY: callers use the PIT/speaker ports only, which touch no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags))
    };
}

/// Reads the time-stamp counter (allowed in ring 3: the guest never sets CR4.TSD).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("lfence", "rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The current privilege level (the low bits of CS).
pub fn cpl() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effect.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs & 3
}
