//! A deliberately small x86 decoder for the instructions guest kernels use on device registers.
//!
//! MSHV reports an access to unmapped guest-physical memory (an MMIO register) with the
//! faulting GPA, the access direction and up to 16 bytes of the instruction, but — unlike
//! KVM — it does not emulate the instruction. User space has to find out which register is
//! read or written, how wide the access is and how long the instruction is.
//!
//! Only what device drivers' `readX`/`writeX` accessors compile to is understood:
//!
//! | opcode    | instruction                                  |
//! | --------- | -------------------------------------------- |
//! | `88`/`89` | `mov m8, r8` / `mov m16/32/64, r16/32/64`    |
//! | `8a`/`8b` | `mov r8, m8` / `mov r16/32/64, m16/32/64`    |
//! | `c6 /0`   | `mov m8, imm8`                               |
//! | `c7 /0`   | `mov m16/32/64, imm16/32` (sign-extended)    |
//! | `0f b6/b7`| `movzx r, m8/m16`                            |
//! | `0f be/bf`| `movsx r, m8/m16`                            |
//!
//! with the operand-size (`66`), address-size (`67`) and segment-override prefixes and, in
//! 64-bit code, a REX prefix. The memory operand's address is never computed — the hypervisor
//! already supplies the GPA — but ModRM, SIB and displacement are parsed to learn the
//! instruction length and reach the immediate. Everything else is an error the caller turns
//! into an unhandled exit that shows the bytes.

use std::fmt;

use crate::arch::StandardRegisters;

/// The longest legal x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// The default operand/address size of the code segment the instruction runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeSize {
    /// Real mode or a 16-bit protected-mode segment.
    Bits16,
    /// A 32-bit protected-mode (or compatibility-mode) segment.
    Bits32,
    /// 64-bit long mode.
    Bits64,
}

impl CodeSize {
    /// Picks the mode from EFER.LMA and the code segment's L and D/B bits.
    pub fn from_segment(efer_lma: bool, cs_l: bool, cs_db: bool) -> Self {
        if efer_lma && cs_l {
            CodeSize::Bits64
        } else if cs_db {
            CodeSize::Bits32
        } else {
            CodeSize::Bits16
        }
    }

    /// Adds `len` to an instruction pointer, wrapping as the mode's IP/EIP/RIP does.
    pub fn advance_ip(self, ip: u64, len: u64) -> u64 {
        let next = ip.wrapping_add(len);
        match self {
            CodeSize::Bits64 => next,
            CodeSize::Bits32 => next & 0xffff_ffff,
            CodeSize::Bits16 => next & 0xffff,
        }
    }
}

/// A general-purpose register operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// Register number 0..=15 (RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15); an 8-bit
    /// operand names its low byte (AL..DIL, R8B..R15B).
    Gpr(u8),
    /// AH, CH, DH or BH: bits 8..16 of register 0..=3 (8-bit operand without a REX prefix).
    HighByte(u8),
}

/// What an MMIO instruction does with the device register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmioOp {
    /// Write the low bytes of a register.
    Store(Reg),
    /// Write an immediate (already sign-extended to 64 bits where the encoding says so).
    StoreImm(u64),
    /// Read into `reg`, widening to `dest_size` bytes (a plain MOV has `dest_size == size`).
    Load {
        reg: Reg,
        dest_size: u8,
        sign_extend: bool,
    },
}

/// A decoded MMIO instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioInsn {
    /// Instruction length in bytes, prefixes included.
    pub len: u8,
    /// Width of the memory access in bytes: 1, 2, 4 or 8.
    pub size: u8,
    pub op: MmioOp,
}

impl MmioInsn {
    pub fn is_write(&self) -> bool {
        !matches!(self.op, MmioOp::Load { .. })
    }

    /// The value a store writes, truncated to the access size. `None` for loads.
    pub fn store_value(&self, regs: &StandardRegisters) -> Option<u64> {
        let v = match self.op {
            MmioOp::Store(reg) => read_reg(regs, reg),
            MmioOp::StoreImm(imm) => imm,
            MmioOp::Load { .. } => return None,
        };
        Some(truncate(v, self.size))
    }

    /// Writes the value a load read from the device (`raw`, little-endian, `size` bytes
    /// significant) into the destination register with x86's merge/zero-extend rules.
    /// Does nothing for stores.
    pub fn complete_load(&self, regs: &mut StandardRegisters, raw: u64) {
        if let MmioOp::Load {
            reg,
            dest_size,
            sign_extend,
        } = self.op
        {
            let v = if sign_extend {
                sign_extend_from(raw, self.size)
            } else {
                truncate(raw, self.size)
            };
            write_reg(regs, reg, dest_size, v);
        }
    }
}

/// Why an instruction could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes end before the instruction does.
    Truncated,
    /// Not one of the instructions listed in the module documentation.
    Unsupported(String),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Truncated => f.write_str("instruction bytes end mid-instruction"),
            DecodeError::Unsupported(what) => write!(f, "unsupported instruction: {what}"),
        }
    }
}

impl std::error::Error for DecodeError {}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn next(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= MAX_INSN_LEN {
            return Err(DecodeError::Unsupported("longer than 15 bytes".to_string()));
        }
        let b = *self.bytes.get(self.pos).ok_or(DecodeError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), DecodeError> {
        let end = self.pos + n;
        if end > MAX_INSN_LEN {
            return Err(DecodeError::Unsupported("longer than 15 bytes".to_string()));
        }
        if end > self.bytes.len() {
            return Err(DecodeError::Truncated);
        }
        self.pos = end;
        Ok(())
    }

    /// Reads an `n`-byte little-endian immediate.
    fn imm(&mut self, n: usize) -> Result<u64, DecodeError> {
        let start = self.pos;
        self.skip(n)?;
        Ok(self.bytes[start..self.pos]
            .iter()
            .rev()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
}

/// The instruction shapes we accept, before the operand size is known.
#[derive(Clone, Copy)]
enum Shape {
    /// 88/89: reg -> mem. `byte` selects the 8-bit form.
    Store { byte: bool },
    /// 8A/8B: mem -> reg.
    Load { byte: bool },
    /// C6/C7 /0: imm -> mem.
    StoreImm { byte: bool },
    /// 0F B6/B7/BE/BF: mem (1 or 2 bytes) -> wider reg.
    Widen { src: u8, sign: bool },
}

/// Decodes one MMIO instruction from `bytes` for code running in `mode`.
pub fn decode(bytes: &[u8], mode: CodeSize) -> Result<MmioInsn, DecodeError> {
    let mut c = Cursor { bytes, pos: 0 };

    // Legacy prefixes, in any order.
    let mut opsize_prefix = false;
    let mut addr_prefix = false;
    let mut b = c.next()?;
    loop {
        match b {
            0x66 => opsize_prefix = true,
            0x67 => addr_prefix = true,
            // Segment overrides change the linear address, which the hypervisor resolved.
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 => {}
            0xf0 => return Err(DecodeError::Unsupported("LOCK prefix".to_string())),
            0xf2 | 0xf3 => return Err(DecodeError::Unsupported("REP prefix".to_string())),
            _ => break,
        }
        b = c.next()?;
    }

    // REX must come last, just before the opcode, and only exists in 64-bit code (elsewhere
    // 0x40..0x4f are INC/DEC, which we reject as opcodes below).
    let mut rex = 0u8;
    if mode == CodeSize::Bits64 && b & 0xf0 == 0x40 {
        rex = b;
        b = c.next()?;
    }
    let rex_w = rex & 0x8 != 0;
    let rex_r = rex & 0x4 != 0;

    let shape = match b {
        0x88 => Shape::Store { byte: true },
        0x89 => Shape::Store { byte: false },
        0x8a => Shape::Load { byte: true },
        0x8b => Shape::Load { byte: false },
        0xc6 => Shape::StoreImm { byte: true },
        0xc7 => Shape::StoreImm { byte: false },
        0x0f => match c.next()? {
            0xb6 => Shape::Widen {
                src: 1,
                sign: false,
            },
            0xb7 => Shape::Widen {
                src: 2,
                sign: false,
            },
            0xbe => Shape::Widen { src: 1, sign: true },
            0xbf => Shape::Widen { src: 2, sign: true },
            op2 => return Err(DecodeError::Unsupported(format!("opcode 0x0f {op2:#04x}"))),
        },
        op => return Err(DecodeError::Unsupported(format!("opcode {op:#04x}"))),
    };

    // Operand size of the non-byte forms.
    let opsize: u8 = if rex_w {
        8
    } else {
        match (mode, opsize_prefix) {
            (CodeSize::Bits16, false) | (CodeSize::Bits32 | CodeSize::Bits64, true) => 2,
            _ => 4,
        }
    };
    let addr16 = matches!(
        (mode, addr_prefix),
        (CodeSize::Bits16, false) | (CodeSize::Bits32, true)
    );

    // ModRM, then SIB and displacement, which we only need to skip.
    let modrm = c.next()?;
    let md = modrm >> 6;
    let reg_field = (modrm >> 3) & 7;
    let rm = modrm & 7;
    if md == 3 {
        return Err(DecodeError::Unsupported(
            "register operand (no memory access)".to_string(),
        ));
    }
    if addr16 {
        match (md, rm) {
            (0, 6) | (2, _) => c.skip(2)?,
            (1, _) => c.skip(1)?,
            _ => {}
        }
    } else {
        let mut sib_base = 0;
        if rm == 4 {
            sib_base = c.next()? & 7;
        }
        match md {
            // [disp32] / [rip+disp32], or a SIB without base register.
            0 if rm == 5 || (rm == 4 && sib_base == 5) => c.skip(4)?,
            1 => c.skip(1)?,
            2 => c.skip(4)?,
            _ => {}
        }
    }

    // The register operand: an 8-bit register without REX in 4..=7 is AH/CH/DH/BH.
    let reg_operand = |byte: bool| {
        if byte && rex == 0 && (4..8).contains(&reg_field) {
            Reg::HighByte(reg_field - 4)
        } else {
            Reg::Gpr(reg_field | if rex_r { 8 } else { 0 })
        }
    };

    let (size, op) = match shape {
        Shape::Store { byte } => {
            let size = if byte { 1 } else { opsize };
            (size, MmioOp::Store(reg_operand(byte)))
        }
        Shape::Load { byte } => {
            let size = if byte { 1 } else { opsize };
            (
                size,
                MmioOp::Load {
                    reg: reg_operand(byte),
                    dest_size: size,
                    sign_extend: false,
                },
            )
        }
        Shape::StoreImm { byte } => {
            if reg_field != 0 {
                return Err(DecodeError::Unsupported(format!(
                    "opcode {b:#04x} /{reg_field}"
                )));
            }
            if byte {
                (1, MmioOp::StoreImm(c.imm(1)?))
            } else if opsize == 2 {
                (2, MmioOp::StoreImm(c.imm(2)?))
            } else {
                // imm32, sign-extended for a 64-bit store.
                let imm = c.imm(4)?;
                (opsize, MmioOp::StoreImm(sign_extend_from(imm, 4)))
            }
        }
        Shape::Widen { src, sign } => (
            src,
            MmioOp::Load {
                reg: reg_operand(false),
                dest_size: opsize,
                sign_extend: sign,
            },
        ),
    };

    Ok(MmioInsn {
        // `c.pos` never exceeds MAX_INSN_LEN (15), so the cast is lossless.
        len: c.pos as u8,
        size,
        op,
    })
}

fn truncate(v: u64, size: u8) -> u64 {
    match size {
        1 => v & 0xff,
        2 => v & 0xffff,
        4 => v & 0xffff_ffff,
        _ => v,
    }
}

fn sign_extend_from(v: u64, size: u8) -> u64 {
    match size {
        1 => v as u8 as i8 as i64 as u64,
        2 => v as u16 as i16 as i64 as u64,
        4 => v as u32 as i32 as i64 as u64,
        _ => v,
    }
}

fn gpr(regs: &StandardRegisters, n: u8) -> u64 {
    match n & 15 {
        0 => regs.rax,
        1 => regs.rcx,
        2 => regs.rdx,
        3 => regs.rbx,
        4 => regs.rsp,
        5 => regs.rbp,
        6 => regs.rsi,
        7 => regs.rdi,
        8 => regs.r8,
        9 => regs.r9,
        10 => regs.r10,
        11 => regs.r11,
        12 => regs.r12,
        13 => regs.r13,
        14 => regs.r14,
        _ => regs.r15,
    }
}

fn gpr_mut(regs: &mut StandardRegisters, n: u8) -> &mut u64 {
    match n & 15 {
        0 => &mut regs.rax,
        1 => &mut regs.rcx,
        2 => &mut regs.rdx,
        3 => &mut regs.rbx,
        4 => &mut regs.rsp,
        5 => &mut regs.rbp,
        6 => &mut regs.rsi,
        7 => &mut regs.rdi,
        8 => &mut regs.r8,
        9 => &mut regs.r9,
        10 => &mut regs.r10,
        11 => &mut regs.r11,
        12 => &mut regs.r12,
        13 => &mut regs.r13,
        14 => &mut regs.r14,
        _ => &mut regs.r15,
    }
}

/// The current value of a register operand (a high-byte register reads as 0..=255).
pub fn read_reg(regs: &StandardRegisters, reg: Reg) -> u64 {
    match reg {
        Reg::Gpr(n) => gpr(regs, n),
        Reg::HighByte(n) => (gpr(regs, n) >> 8) & 0xff,
    }
}

/// Writes `value` to a register operand of `size` bytes: 8- and 16-bit writes keep the other
/// bits, a 32-bit write clears bits 32..64, a 64-bit write replaces the register.
pub fn write_reg(regs: &mut StandardRegisters, reg: Reg, size: u8, value: u64) {
    match reg {
        Reg::HighByte(n) => {
            let r = gpr_mut(regs, n);
            *r = (*r & !0xff00) | ((value & 0xff) << 8);
        }
        Reg::Gpr(n) => {
            let r = gpr_mut(regs, n);
            *r = match size {
                1 => (*r & !0xff) | (value & 0xff),
                2 => (*r & !0xffff) | (value & 0xffff),
                4 => value & 0xffff_ffff,
                _ => value,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use CodeSize::*;

    fn load(reg: Reg, size: u8) -> MmioOp {
        MmioOp::Load {
            reg,
            dest_size: size,
            sign_extend: false,
        }
    }

    fn ok(bytes: &[u8], mode: CodeSize) -> MmioInsn {
        decode(bytes, mode).unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
    }

    /// (bytes, expected length, access size, operation) in 64-bit mode. Encodings were
    /// checked against GNU objdump.
    #[test]
    fn decodes_64bit_table() {
        let table: &[(&[u8], u8, u8, MmioOp)] = &[
            // mov eax, [rdi]
            (&[0x8b, 0x07], 2, 4, load(Reg::Gpr(0), 4)),
            // mov [rbx+0x10], eax
            (&[0x89, 0x43, 0x10], 3, 4, MmioOp::Store(Reg::Gpr(0))),
            // mov rax, [rsp+8]  (SIB + disp8)
            (&[0x48, 0x8b, 0x44, 0x24, 0x08], 5, 8, load(Reg::Gpr(0), 8)),
            // movzx eax, byte [rdx]
            (
                &[0x0f, 0xb6, 0x02],
                3,
                1,
                MmioOp::Load {
                    reg: Reg::Gpr(0),
                    dest_size: 4,
                    sign_extend: false,
                },
            ),
            // movzx eax, word [rsi+4]
            (
                &[0x0f, 0xb7, 0x46, 0x04],
                4,
                2,
                MmioOp::Load {
                    reg: Reg::Gpr(0),
                    dest_size: 4,
                    sign_extend: false,
                },
            ),
            // movsx rax, byte [rdi]
            (
                &[0x48, 0x0f, 0xbe, 0x07],
                4,
                1,
                MmioOp::Load {
                    reg: Reg::Gpr(0),
                    dest_size: 8,
                    sign_extend: true,
                },
            ),
            // mov dword [rax], 1
            (
                &[0xc7, 0x00, 0x01, 0x00, 0x00, 0x00],
                6,
                4,
                MmioOp::StoreImm(1),
            ),
            // mov word [rax], dx
            (&[0x66, 0x89, 0x10], 3, 2, MmioOp::Store(Reg::Gpr(2))),
            // mov [rdx], cl
            (&[0x88, 0x0a], 2, 1, MmioOp::Store(Reg::Gpr(1))),
            // mov r8d, [rax]  (REX.R)
            (&[0x44, 0x8b, 0x00], 3, 4, load(Reg::Gpr(8), 4)),
            // mov [rax], r9  (REX.W + REX.R)
            (&[0x4c, 0x89, 0x08], 3, 8, MmioOp::Store(Reg::Gpr(9))),
            // mov [rdx], rdi
            (&[0x48, 0x89, 0x3a], 3, 8, MmioOp::Store(Reg::Gpr(7))),
            // mov ah, [rbp+0]
            (&[0x8a, 0x65, 0x00], 3, 1, load(Reg::HighByte(0), 1)),
            // mov spl, [rax]  (any REX turns AH's encoding into SPL)
            (&[0x40, 0x8a, 0x20], 3, 1, load(Reg::Gpr(4), 1)),
            // mov r12b, [r13+0x7f]  (REX.R + REX.B)
            (&[0x45, 0x8a, 0x65, 0x7f], 4, 1, load(Reg::Gpr(12), 1)),
            // mov eax, [0xfee00030]  (SIB without base: disp32)
            (
                &[0x8b, 0x04, 0x25, 0x30, 0x00, 0xe0, 0xfe],
                7,
                4,
                load(Reg::Gpr(0), 4),
            ),
            // mov eax, [rax+rcx*8+0x100]  (SIB + disp32)
            (
                &[0x8b, 0x84, 0xc8, 0x00, 0x01, 0x00, 0x00],
                7,
                4,
                load(Reg::Gpr(0), 4),
            ),
            // mov ecx, [rip+0x200]
            (
                &[0x8b, 0x0d, 0x00, 0x02, 0x00, 0x00],
                6,
                4,
                load(Reg::Gpr(1), 4),
            ),
            // mov byte [rax+4], 0xff
            (&[0xc6, 0x40, 0x04, 0xff], 4, 1, MmioOp::StoreImm(0xff)),
            // mov word [rax], 0x1234
            (
                &[0x66, 0xc7, 0x00, 0x34, 0x12],
                5,
                2,
                MmioOp::StoreImm(0x1234),
            ),
            // mov qword [rip-0x10], -2  (imm32 sign-extended to 64 bits)
            (
                &[
                    0x48, 0xc7, 0x05, 0xf0, 0xff, 0xff, 0xff, 0xfe, 0xff, 0xff, 0xff,
                ],
                11,
                8,
                MmioOp::StoreImm(0xffff_ffff_ffff_fffe),
            ),
            // mov eax, fs:[rax]  (segment override is skipped)
            (&[0x64, 0x8b, 0x00], 3, 4, load(Reg::Gpr(0), 4)),
            // mov eax, [eax]  (address-size prefix, 32-bit addressing in long mode)
            (&[0x67, 0x8b, 0x00], 3, 4, load(Reg::Gpr(0), 4)),
        ];
        for (bytes, len, size, op) in table {
            let insn = ok(bytes, Bits64);
            assert_eq!(
                (insn.len, insn.size, insn.op),
                (*len, *size, *op),
                "{bytes:02x?}"
            );
        }
    }

    #[test]
    fn trailing_bytes_are_not_part_of_the_instruction() {
        // The hypervisor hands over 16 bytes; the next instruction follows.
        let insn = ok(&[0x8b, 0x07, 0x90, 0x90, 0xc3], Bits64);
        assert_eq!(insn.len, 2);
    }

    #[test]
    fn decodes_32bit_and_16bit_code() {
        // 32-bit: same encodings, no REX, 0x66 selects 16-bit operands.
        assert_eq!(ok(&[0x8b, 0x07], Bits32).size, 4);
        assert_eq!(ok(&[0x66, 0x8b, 0x07], Bits32).size, 2);
        // 0x67 in 32-bit code selects 16-bit addressing: [bx] has no displacement...
        assert_eq!(ok(&[0x67, 0x8b, 0x07], Bits32).len, 3);
        // ...and [disp16] has two bytes of it.
        assert_eq!(ok(&[0x67, 0x8b, 0x06, 0x00, 0x10], Bits32).len, 5);
        // 0x48 is DEC EAX outside long mode, not a REX prefix.
        assert!(decode(&[0x48, 0x8b, 0x07], Bits32).is_err());

        // 16-bit: default operand size 2, 0x66 makes it 4.
        let insn = ok(&[0x8b, 0x07], Bits16);
        assert_eq!((insn.len, insn.size), (2, 2));
        assert_eq!(ok(&[0x66, 0x8b, 0x07], Bits16).size, 4);
        // mov ax, [0x1234]
        assert_eq!(ok(&[0x8b, 0x06, 0x34, 0x12], Bits16).len, 4);
        // mov [bp+si+0x10], al  (mod=01 -> disp8)
        assert_eq!(ok(&[0x88, 0x42, 0x10], Bits16).len, 3);
        // mov word [bx], 0x55aa
        let insn = ok(&[0xc7, 0x07, 0xaa, 0x55], Bits16);
        assert_eq!((insn.len, insn.op), (4, MmioOp::StoreImm(0x55aa)));
        // 0x67 in 16-bit code: 32-bit addressing with a SIB byte.
        assert_eq!(ok(&[0x67, 0x8b, 0x04, 0x24], Bits16).len, 4);
    }

    #[test]
    fn rejects_what_it_does_not_know() {
        let bad: &[&[u8]] = &[
            &[0x8b, 0xc0],             // mov eax, eax: no memory operand
            &[0x01, 0x07],             // add [rdi], eax
            &[0xf3, 0xa5],             // rep movsd
            &[0xf0, 0x89, 0x07],       // lock mov
            &[0xc7, 0xc8, 0, 0, 0, 0], // c7 /1 (mod=11 anyway)
            &[0xc7, 0x08, 0, 0, 0, 0], // c7 /1 with a memory operand
            &[0x0f, 0xb8, 0x07],       // 0f b8 (popcnt without its prefix)
            &[0xa1, 0, 0, 0, 0],       // mov eax, moffs32
        ];
        for bytes in bad {
            assert!(
                matches!(decode(bytes, Bits64), Err(DecodeError::Unsupported(_))),
                "{bytes:02x?}"
            );
        }
        let truncated: &[&[u8]] = &[
            &[],
            &[0x66],
            &[0x48],
            &[0x8b],
            &[0x8b, 0x44, 0x24],       // missing disp8
            &[0x8b, 0x84, 0xc8, 0, 1], // missing disp32 bytes
            &[0xc7, 0x00, 0x01, 0x00], // missing imm32 bytes
            &[0x0f],
        ];
        for bytes in truncated {
            assert_eq!(
                decode(bytes, Bits64),
                Err(DecodeError::Truncated),
                "{bytes:02x?}"
            );
        }
        // Sixteen prefixes: longer than any legal instruction.
        assert!(matches!(
            decode(&[0x66; 16], Bits64),
            Err(DecodeError::Unsupported(_))
        ));
    }

    fn regs() -> StandardRegisters {
        StandardRegisters {
            rax: 0x1111_2222_3333_4444,
            rcx: 0x5555_6666_7777_8899,
            rdi: 0x9999_aaaa_bbbb_cccc,
            r8: 0xdddd_eeee_ffff_0000,
            ..Default::default()
        }
    }

    #[test]
    fn loads_merge_or_extend_like_the_cpu() {
        // mov al, [..]: only AL changes.
        let mut r = regs();
        ok(&[0x8a, 0x07], Bits64).complete_load(&mut r, 0xab);
        assert_eq!(r.rax, 0x1111_2222_3333_44ab);
        // mov ah, [..]: only AH changes.
        let mut r = regs();
        ok(&[0x8a, 0x27], Bits64).complete_load(&mut r, 0xab);
        assert_eq!(r.rax, 0x1111_2222_3333_ab44);
        // mov cx, [..]: low 16 bits.
        let mut r = regs();
        ok(&[0x66, 0x8b, 0x0f], Bits64).complete_load(&mut r, 0xbeef);
        assert_eq!(r.rcx, 0x5555_6666_7777_beef);
        // mov r8d, [..]: zero-extends to 64 bits.
        let mut r = regs();
        ok(&[0x44, 0x8b, 0x00], Bits64).complete_load(&mut r, 0xdead_beef);
        assert_eq!(r.r8, 0xdead_beef);
        // mov rdi, [..]: whole register.
        let mut r = regs();
        ok(&[0x48, 0x8b, 0x38], Bits64).complete_load(&mut r, 0x0123_4567_89ab_cdef);
        assert_eq!(r.rdi, 0x0123_4567_89ab_cdef);
        // movzx eax, byte: zero-extends, bits above the access are ignored.
        let mut r = regs();
        ok(&[0x0f, 0xb6, 0x02], Bits64).complete_load(&mut r, 0xffff_ff80);
        assert_eq!(r.rax, 0x80);
        // movsx rax, byte: sign-extends.
        let mut r = regs();
        ok(&[0x48, 0x0f, 0xbe, 0x07], Bits64).complete_load(&mut r, 0x80);
        assert_eq!(r.rax, 0xffff_ffff_ffff_ff80);
        // movsx ax, word in 16-bit code... keeps the upper 48 bits.
        let mut r = regs();
        ok(&[0x0f, 0xbf, 0x07], Bits16).complete_load(&mut r, 0x8000);
        assert_eq!(r.rax, 0x1111_2222_3333_8000);
    }

    #[test]
    fn stores_read_the_right_bytes() {
        let r = regs();
        // mov [rdx], cl
        assert_eq!(ok(&[0x88, 0x0a], Bits64).store_value(&r), Some(0x99));
        // mov [rdx], ch
        assert_eq!(ok(&[0x88, 0x2a], Bits64).store_value(&r), Some(0x88));
        // mov [rax], cx
        assert_eq!(
            ok(&[0x66, 0x89, 0x08], Bits64).store_value(&r),
            Some(0x8899)
        );
        // mov [rbx+0x10], eax
        assert_eq!(
            ok(&[0x89, 0x43, 0x10], Bits64).store_value(&r),
            Some(0x3333_4444)
        );
        // mov [rax], r8
        assert_eq!(
            ok(&[0x4c, 0x89, 0x00], Bits64).store_value(&r),
            Some(0xdddd_eeee_ffff_0000)
        );
        // mov dword [rax], 1
        assert_eq!(
            ok(&[0xc7, 0x00, 0x01, 0x00, 0x00, 0x00], Bits64).store_value(&r),
            Some(1)
        );
        // Loads have no store value and stores leave registers alone.
        assert_eq!(ok(&[0x8b, 0x07], Bits64).store_value(&r), None);
        let mut r2 = regs();
        ok(&[0x89, 0x07], Bits64).complete_load(&mut r2, 0x1234);
        assert_eq!(r2, regs());
    }

    #[test]
    fn mode_selection_and_ip_wrap() {
        assert_eq!(CodeSize::from_segment(true, true, false), Bits64);
        // Compatibility mode: LMA set, CS.L clear.
        assert_eq!(CodeSize::from_segment(true, false, true), Bits32);
        assert_eq!(CodeSize::from_segment(false, false, true), Bits32);
        // CS.L means nothing outside long mode.
        assert_eq!(CodeSize::from_segment(false, true, false), Bits16);
        assert_eq!(Bits64.advance_ip(0xffff_ffff_ffff_fffe, 3), 1);
        assert_eq!(Bits32.advance_ip(0xffff_fffe, 3), 1);
        assert_eq!(Bits16.advance_ip(0xfffe, 3), 1);
        assert_eq!(Bits64.advance_ip(0x1000, 3), 0x1003);
    }
}
