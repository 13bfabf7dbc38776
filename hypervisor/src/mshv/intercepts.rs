//! What a vCPU does with MSHV's intercept messages: port and memory accesses completed
//! through the buses, exceptions, the instruction lengths MSHV reports.

use super::*;

/// HV_REGISTER_PENDING_INTERRUPTION asking for exception `vector` without an error code:
/// bit 0 pending, bits 1-3 the type (exception), bits 16-31 the vector.
pub(super) fn pending_exception(vector: u8) -> u64 {
    1 | (u64::from(HV_X64_PENDING_EXCEPTION) << 1) | (u64::from(vector) << 16)
}

/// The bytes an OUT of `size` bytes sends: the low bytes of RAX.
pub(super) fn pio_write_data(rax: u64, size: usize) -> ([u8; 4], usize) {
    ((rax as u32).to_le_bytes(), size.min(4))
}

/// RAX after an IN of `data.len()` bytes: AL and AX are merged into RAX like the CPU does,
/// EAX is zero-extended to 64 bits.
pub(super) fn merge_pio_read(rax: u64, data: &[u8]) -> u64 {
    let mut raw = [0u8; 4];
    let n = data.len().min(4);
    raw[..n].copy_from_slice(&data[..n]);
    let v = u64::from(u32::from_le_bytes(raw));
    match n {
        1 => (rax & !0xff) | v,
        2 => (rax & !0xffff) | v,
        _ => v,
    }
}

/// Length of an IN/OUT instruction: the hypervisor's value, or decoded from the bytes if it
/// gave none (prefixes, then `e4`-`e7` with an imm8 port or `ec`-`ef` with DX).
pub(super) fn pio_insn_len(reported: u8, bytes: &[u8]) -> Option<u64> {
    if reported != 0 {
        return Some(u64::from(reported));
    }
    let mut len = 0u64;
    for b in bytes.iter().take(decode::MAX_INSN_LEN) {
        len += 1;
        match b {
            0x66 | 0x67 | 0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x40..=0x4f => {}
            0xe4..=0xe7 => return Some(len + 1),
            0xec..=0xef => return Some(len),
            _ => return None,
        }
    }
    None
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names the MSHV messages that can reach user space but that we do not handle.
pub(super) fn message_name(msg_type: u32) -> &'static str {
    match msg_type {
        mb::hv_message_type_HVMSG_UNACCEPTED_GPA => "unaccepted GPA",
        mb::hv_message_type_HVMSG_GPA_ATTRIBUTE_INTERCEPT => "GPA attribute intercept",
        mb::hv_message_type_HVMSG_TIMER_EXPIRED => "timer expired",
        mb::hv_message_type_HVMSG_INVALID_VP_REGISTER_VALUE => "invalid VP register value",
        mb::hv_message_type_HVMSG_UNSUPPORTED_FEATURE => "unsupported feature",
        mb::hv_message_type_HVMSG_OPAQUE_INTERCEPT => "opaque intercept",
        mb::hv_message_type_HVMSG_HYPERCALL_INTERCEPT => "hypercall intercept",
        mb::hv_message_type_HVMSG_X64_MSR_INTERCEPT => "MSR intercept",
        mb::hv_message_type_HVMSG_X64_CPUID_INTERCEPT => "CPUID intercept",
        mb::hv_message_type_HVMSG_X64_EXCEPTION_INTERCEPT => "exception intercept",
        mb::hv_message_type_HVMSG_X64_LEGACY_FP_ERROR => "legacy FP error",
        mb::hv_message_type_HVMSG_X64_INTERRUPTION_DELIVERABLE => "interruption deliverable",
        mb::hv_message_type_HVMSG_X64_SIPI_INTERCEPT => "SIPI intercept",
        mb::hv_message_type_HVMSG_X64_SEV_VMGEXIT_INTERCEPT => "SEV VMGEXIT",
        _ => "unknown message",
    }
}

impl MshvVcpu {
    /// The code size of the intercepted instruction, from the message header.
    pub(super) fn code_size(header: &mb::hv_x64_intercept_message_header) -> CodeSize {
        let es = header.execution_state;
        // SAFETY: both views of the execution-state union are plain integers.
        let lma = unsafe { es.__bindgen_anon_1 }.efer_lma() != 0;
        let cs = mb::SegmentRegister::from(header.cs_segment);
        CodeSize::from_segment(lma, cs.l != 0, cs.db != 0)
    }

    pub(super) fn update_regs(&self, f: impl FnOnce(&mut mb::StandardRegisters)) -> Result<()> {
        // mshv-ioctls reads and writes the mmap'ed register page when the kernel offers one
        // and falls back to hypercalls; going through the same pair keeps the two coherent.
        let mut regs = self
            .fd
            .get_regs()
            .map_err(|e| mshv_error("HVCALL_GET_VP_REGISTERS", e))?;
        f(&mut regs);
        self.fd
            .set_regs(&regs)
            .map_err(|e| mshv_error("HVCALL_SET_VP_REGISTERS", e))
    }

    pub(super) fn handle_pio(
        &self,
        info: &hv_x64_io_port_intercept_message,
        ops: &dyn VmOps,
    ) -> Result<VcpuExit> {
        let header = info.header;
        let port = info.port_number;
        let rax = info.rax;
        let access_info = info.access_info;
        // SAFETY: both views of the access-info union are plain integers.
        let bits = unsafe { access_info.__bindgen_anon_1 };
        let size = usize::from(bits.access_size());
        if bits.string_op() != 0 || bits.rep_prefix() != 0 {
            return Ok(VcpuExit::Unhandled(format!(
                "string port I/O (INS/OUTS{}) on port {port:#x} at rip {:#x}: not emulated by the MSHV backend",
                if bits.rep_prefix() != 0 { " with REP" } else { "" },
                { header.rip }
            )));
        }
        if !matches!(size, 1 | 2 | 4) {
            return Ok(VcpuExit::Unhandled(format!(
                "port I/O of {size} bytes on port {port:#x}"
            )));
        }
        let insn_bytes = info.instruction_bytes;
        let count = usize::from(info.instruction_byte_count).min(insn_bytes.len());
        let Some(len) = pio_insn_len(header.instruction_length(), &insn_bytes[..count]) else {
            return Ok(VcpuExit::Unhandled(format!(
                "port I/O on port {port:#x}: unknown instruction length (bytes {})",
                hex(&insn_bytes[..count])
            )));
        };

        let new_rax = match u32::from(header.intercept_access_type) {
            HV_INTERCEPT_ACCESS_WRITE => {
                let (data, n) = pio_write_data(rax, size);
                ops.pio_write(port, &data[..n]);
                rax
            }
            HV_INTERCEPT_ACCESS_READ => {
                let mut data = [0u8; 4];
                ops.pio_read(port, &mut data[..size]);
                merge_pio_read(rax, &data[..size])
            }
            other => {
                return Ok(VcpuExit::Unhandled(format!(
                    "port I/O on port {port:#x} with access type {other}"
                )))
            }
        };
        let rip = Self::code_size(&header).advance_ip(header.rip, len);
        self.update_regs(|r| {
            r.rax = new_rax;
            r.rip = rip;
        })?;
        Ok(VcpuExit::Continue)
    }

    pub(super) fn handle_mmio(
        &self,
        info: &hv_x64_memory_intercept_message,
        ops: &dyn VmOps,
    ) -> Result<VcpuExit> {
        let header = info.header;
        let gpa = info.guest_physical_address;
        let rip = header.rip;
        let write = match u32::from(header.intercept_access_type) {
            HV_INTERCEPT_ACCESS_READ => false,
            HV_INTERCEPT_ACCESS_WRITE => true,
            other => {
                return Ok(VcpuExit::Unhandled(format!(
                    "memory intercept at gpa {gpa:#x} rip {rip:#x} with access type {other} (execute from MMIO?)"
                )))
            }
        };
        let dir = if write { "write" } else { "read" };
        let insn_bytes = info.instruction_bytes;
        let count = usize::from(info.instruction_byte_count).min(insn_bytes.len());
        let bytes = &insn_bytes[..count];
        let unhandled = |why: &dyn std::fmt::Display| {
            Ok(VcpuExit::Unhandled(format!(
                "MMIO {dir} at gpa {gpa:#x} rip {rip:#x}: {why}; instruction bytes [{}]",
                hex(bytes)
            )))
        };
        if bytes.is_empty() {
            return unhandled(&"the hypervisor supplied no instruction bytes");
        }
        let mode = Self::code_size(&header);
        let insn = match decode::decode(bytes, mode) {
            Ok(i) => i,
            Err(e) => return unhandled(&e),
        };
        if insn.is_write() != write {
            return unhandled(&format!(
                "decoded a {} but the hypervisor reported a {dir}",
                if insn.is_write() { "write" } else { "read" }
            ));
        }

        let size = usize::from(insn.size);
        self.update_regs(|regs| {
            let mut ours = regs_from_mshv(regs);
            if let Some(value) = insn.store_value(&ours) {
                ops.mmio_write(gpa, &value.to_le_bytes()[..size]);
            } else {
                let mut data = [0u8; 8];
                ops.mmio_read(gpa, &mut data[..size]);
                insn.complete_load(&mut ours, u64::from_le_bytes(data));
            }
            ours.rip = mode.advance_ip(rip, u64::from(insn.len));
            *regs = regs_to_mshv(&ours);
        })?;
        Ok(VcpuExit::Continue)
    }

    pub(super) fn register_cpuid_override(&self, o: &cpuid::CpuidOverride) -> Result<()> {
        let input = hv_input_register_intercept_result {
            vp_index: self.id,
            intercept_type: hv_intercept_type_HV_INTERCEPT_TYPE_X64_CPUID,
            parameters: hv_register_intercept_result_parameters {
                cpuid: hv_register_x64_cpuid_result_parameters {
                    input: hv_register_x64_cpuid_result_parameters__bindgen_ty_1 {
                        eax: o.function,
                        ecx: o.index,
                        subleaf_specific: u8::from(o.subleaf_specific),
                        // Apply even where the hypervisor's own value is all zero.
                        always_override: 1,
                        padding: 0,
                    },
                    result: hv_register_x64_cpuid_result_parameters__bindgen_ty_2 {
                        eax: o.eax.value,
                        eax_mask: o.eax.mask,
                        ebx: o.ebx.value,
                        ebx_mask: o.ebx.mask,
                        ecx: o.ecx.value,
                        ecx_mask: o.ecx.mask,
                        edx: o.edx.value,
                        edx_mask: o.edx.mask,
                    },
                },
            },
            // The kernel fills in the partition ID.
            ..Default::default()
        };
        // mshv-ioctls' register_intercept_result_cpuid always uses mask == value, which can
        // only set bits; we need real masks, so issue the same hypercall directly.
        let mut args = mshv_root_hvcall {
            code: HVCALL_REGISTER_INTERCEPT_RESULT as u16,
            in_sz: std::mem::size_of_val(&input) as u16,
            in_ptr: std::ptr::addr_of!(input) as u64,
            ..Default::default()
        };
        self.fd
            .hvcall(&mut args)
            .map_err(|e| mshv_error("HVCALL_REGISTER_INTERCEPT_RESULT (CPUID)", e))
    }
}
