//! MSHV backend: the Microsoft Hypervisor through Linux's `/dev/mshv` (mshv-ioctls).
//!
//! What differs from KVM, and how this backend bridges it:
//!
//! * **No in-kernel instruction emulation.** An access to unmapped guest memory (an MMIO
//!   register) arrives as a message with the GPA and the instruction bytes; [`decode`]
//!   understands the MOV/MOVZX/MOVSX forms drivers use, the access goes to
//!   [`VmOps`](crate::VmOps), and RIP and the destination register are updated here. Port I/O
//!   messages carry port, size and RAX; string port I/O (INS/OUTS) is not emulated and comes
//!   back as [`VcpuExit::Unhandled`].
//! * **CPUID is computed by the hypervisor.** [`cpuid`] explains which parts of the VMM's
//!   table are registered as overrides.
//! * **Interrupt controllers.** The local APIC lives in the hypervisor; there is no in-kernel
//!   IOAPIC, PIC or PIT. An irqfd's `gsi` is looked up in the partition's MSI routing table,
//!   which [`MshvVm::set_gsi_route`] fills (a user-space IOAPIC calls it when the guest
//!   programs a redirection entry). Until a GSI has a route, signalling its irqfd does nothing.
//! * **No port-I/O ioeventfds** ([`Error::Unsupported`] for `IoEventAddress::Pio`).

pub mod cpuid;
pub mod decode;

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use mshv_bindings as mb;
use mshv_bindings::{
    hv_input_register_intercept_result, hv_intercept_type_HV_INTERCEPT_TYPE_X64_CPUID, hv_message,
    hv_partition_processor_features,
    hv_partition_property_code_HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0,
    hv_partition_property_code_HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1,
    hv_partition_property_code_HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES,
    hv_partition_property_code_HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION, hv_register_assoc,
    hv_register_intercept_result_parameters, hv_register_name_HV_REGISTER_PENDING_INTERRUPTION,
    hv_register_value, hv_register_x64_cpuid_result_parameters,
    hv_register_x64_cpuid_result_parameters__bindgen_ty_1,
    hv_register_x64_cpuid_result_parameters__bindgen_ty_2,
    hv_translate_gva_result_code_HV_TRANSLATE_GVA_SUCCESS,
    hv_unimplemented_msr_action_HV_UNIMPLEMENTED_MSR_ACTION_IGNORE_WRITE_READ_ZERO,
    hv_x64_io_port_intercept_message, hv_x64_memory_intercept_message, mshv_root_hvcall,
    mshv_user_irq_entry, mshv_user_irq_table, mshv_user_mem_region,
    HVCALL_REGISTER_INTERCEPT_RESULT, HV_INTERCEPT_ACCESS_READ, HV_INTERCEPT_ACCESS_WRITE,
    HV_TRANSLATE_GVA_PRIVILEGE_EXEMPT, HV_TRANSLATE_GVA_VALIDATE_READ, HV_X64_PENDING_EXCEPTION,
    MSHV_SET_MEM_BIT_EXECUTABLE, MSHV_SET_MEM_BIT_WRITABLE,
};
use mshv_ioctls::{Mshv, MshvError, NoDatamatch, VcpuFd, VmFd, VmType};
use vmm_sys_util::eventfd::EventFd;

use self::decode::CodeSize;
use crate::arch::*;
use crate::{Error, Hypervisor, HypervisorKind, IoEventAddress, Result, VcpuExit, VmOps};

/// The hypervisor's page size; memory slots must be aligned to it.
const HV_PAGE_SHIFT: u32 = 12;
const HV_PAGE_MASK: u64 = (1 << HV_PAGE_SHIFT) - 1;

/// mshv-ioctls numbers virtual processors with a `u8`.
const MAX_VCPUS: u32 = 256;

/// Local APIC register offsets and delivery modes used to wire LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Turns an mshv-ioctls error into ours, keeping a failed hypercall's status readable
/// (its `io::Error` form would only say EIO).
fn mshv_error(op: &'static str, e: MshvError) -> Error {
    match e {
        MshvError::Errno(_) => Error::os(op, e),
        MshvError::Hypercall { .. } => Error::os(op, io::Error::other(e.to_string())),
    }
}

fn is_retry(e: &MshvError) -> bool {
    matches!(e.errno(), libc::EINTR | libc::EAGAIN)
}

pub struct MshvHypervisor {
    mshv: Mshv,
}

impl MshvHypervisor {
    pub fn new() -> Result<Self> {
        let mshv = Mshv::new().map_err(|e| {
            Error::Unavailable(
                HypervisorKind::Mshv,
                format!("{}: {}", crate::MSHV_DEVICE, io::Error::from(e)),
            )
        })?;
        Ok(MshvHypervisor { mshv })
    }

    /// Creates and initializes a partition; [`Hypervisor::create_vm`] wraps it.
    ///
    /// Public so a VMM that knows it runs on MSHV can keep the concrete type and reach
    /// [`MshvVm::set_gsi_route`].
    pub fn create_mshv_vm(&self) -> Result<Arc<MshvVm>> {
        // `make_default_partition_create_arg` and `make_default_synthetic_features_mask`
        // unwrap these host queries; ask first so a failure is an error, not a panic.
        for code in [
            hv_partition_property_code_HV_PARTITION_PROPERTY_PROCESSOR_FEATURES0,
            hv_partition_property_code_HV_PARTITION_PROPERTY_PROCESSOR_FEATURES1,
        ] {
            self.mshv
                .get_host_partition_property(code)
                .map_err(|e| mshv_error("HVCALL_GET_PARTITION_PROPERTY (host features)", e))?;
        }
        self.mshv
            .get_vmm_caps()
            .map_err(|e| mshv_error("HVCALL_GET_PARTITION_PROPERTY_EX (VMM capabilities)", e))?;

        // The host's processor features (minus XSAVE features mshv-ioctls does not vouch
        // for), a LAPIC with x2APIC, large pages. No nested virtualization: enabling it needs
        // a partition flag we do not set.
        let mut args = self.mshv.make_default_partition_create_arg(VmType::Normal);
        let mut disabled = hv_partition_processor_features::default();
        // SAFETY: both union views cover the same two u64 banks; every bit pattern is valid.
        unsafe {
            disabled.as_uint64 = [args.pt_cpu_fbanks[0], args.pt_cpu_fbanks[1]];
            disabled.__bindgen_anon_1.set_nested_virt_support(1);
            args.pt_cpu_fbanks[0] = disabled.as_uint64[0];
            args.pt_cpu_fbanks[1] = disabled.as_uint64[1];
        }
        let synthetic = self.mshv.make_default_synthetic_features_mask();

        let fd = loop {
            match self.mshv.create_vm_with_args(&args) {
                Ok(fd) => break fd,
                Err(e) if e.errno() == libc::EINTR => continue,
                Err(e) => return Err(mshv_error("MSHV_CREATE_PARTITION", e)),
            }
        };
        // Hyper-V enlightenments (reference TSC, synthetic timers, SynIC): an "early"
        // property, settable only before the partition is initialized.
        fd.set_partition_property(
            hv_partition_property_code_HV_PARTITION_PROPERTY_SYNTHETIC_PROC_FEATURES,
            synthetic,
        )
        .map_err(|e| mshv_error("HVCALL_SET_PARTITION_PROPERTY (synthetic features)", e))?;
        fd.initialize()
            .map_err(|e| mshv_error("MSHV_INITIALIZE_PARTITION", e))?;
        // Guests probe MSRs the hypervisor does not implement; by default that is a #GP.
        // Read zero and drop writes instead, as Cloud Hypervisor does.
        fd.set_partition_property(
            hv_partition_property_code_HV_PARTITION_PROPERTY_UNIMPLEMENTED_MSR_ACTION,
            u64::from(
                hv_unimplemented_msr_action_HV_UNIMPLEMENTED_MSR_ACTION_IGNORE_WRITE_READ_ZERO,
            ),
        )
        .map_err(|e| mshv_error("HVCALL_SET_PARTITION_PROPERTY (unimplemented MSRs)", e))?;

        Ok(Arc::new(MshvVm {
            fd,
            routes: Mutex::new(BTreeMap::new()),
        }))
    }
}

impl Hypervisor for MshvHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Mshv
    }

    fn create_vm(&self) -> Result<Arc<dyn crate::Vm>> {
        Ok(self.create_mshv_vm()?)
    }

    /// The host's CPUID for the leaves `set_cpuid` can use (see [`cpuid`]): MSHV computes the
    /// guest's CPUID itself and offers no query for it short of a scratch partition.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        Ok(cpuid::host_cpuid())
    }

    fn max_vcpus(&self) -> u32 {
        MAX_VCPUS
    }
}

/// An MSHV partition.
pub struct MshvVm {
    fd: VmFd,
    /// GSI -> MSI message; the whole table is handed to the kernel on every change.
    routes: Mutex<BTreeMap<u32, mshv_user_irq_entry>>,
}

impl MshvVm {
    /// Routes `gsi` (as used by [`Vm::register_irqfd`](crate::Vm::register_irqfd)) to the MSI
    /// `address`/`data` — for a user-space IOAPIC, the message its redirection entry encodes.
    pub fn set_gsi_route(&self, gsi: u32, address: u64, data: u32) -> Result<()> {
        let mut routes = self
            .routes
            .lock()
            .map_err(|_| Error::Unsupported("MSI routing table lock poisoned".to_string()))?;
        routes.insert(
            gsi,
            mshv_user_irq_entry {
                gsi,
                address_lo: address as u32,
                address_hi: (address >> 32) as u32,
                data,
            },
        );
        self.push_routes(&routes)
    }

    /// Removes the route of `gsi`; its irqfd stops delivering.
    pub fn clear_gsi_route(&self, gsi: u32) -> Result<()> {
        let mut routes = self
            .routes
            .lock()
            .map_err(|_| Error::Unsupported("MSI routing table lock poisoned".to_string()))?;
        routes.remove(&gsi);
        self.push_routes(&routes)
    }

    fn push_routes(&self, routes: &BTreeMap<u32, mshv_user_irq_entry>) -> Result<()> {
        let entries: Vec<mshv_user_irq_entry> = routes.values().copied().collect();
        // The table is an 8-byte header followed by the entries. A buffer of n + 1 entries
        // (16 bytes each, 4-byte aligned like the header) holds both.
        let mut buf = vec![mshv_user_irq_entry::default(); entries.len() + 1];
        let table = buf.as_mut_ptr().cast::<mshv_user_irq_table>();
        // SAFETY: `buf` is 16 * (n + 1) bytes, at least the 8-byte header plus n 16-byte
        // entries, and its alignment (4) is the table's. The header fields and the entry
        // slice lie within it, and `buf` outlives the ioctl.
        unsafe {
            (*table).nr = entries.len() as u32;
            (*table).rsvd = 0;
            (*table)
                .entries
                .as_mut_slice(entries.len())
                .copy_from_slice(&entries);
            self.fd
                .set_msi_routing(&*table)
                .map_err(|e| mshv_error("MSHV_SET_MSI_ROUTING", e))
        }
    }
}

impl crate::Vm for MshvVm {
    /// `slot` has no meaning to MSHV, which identifies regions by guest address.
    unsafe fn map_memory(
        &self,
        _slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> Result<()> {
        if (guest_addr | size | host_addr) & HV_PAGE_MASK != 0 {
            return Err(Error::Unsupported(format!(
                "MSHV maps whole 4 KiB pages: guest {guest_addr:#x}, size {size:#x}, host {host_addr:#x}"
            )));
        }
        // Read-only regions (ROM) stay executable; guest writes to them arrive as GPA
        // intercepts and go to the VMM's MMIO bus, as with KVM.
        let mut flags = 1u8 << MSHV_SET_MEM_BIT_EXECUTABLE;
        if !readonly {
            flags |= 1u8 << MSHV_SET_MEM_BIT_WRITABLE;
        }
        let region = mshv_user_mem_region {
            size,
            guest_pfn: guest_addr >> HV_PAGE_SHIFT,
            userspace_addr: host_addr,
            flags,
            ..Default::default()
        };
        self.fd
            .map_user_memory(region)
            .map_err(|e| mshv_error("MSHV_SET_GUEST_MEMORY", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn crate::Vcpu>> {
        let index = u8::try_from(id).map_err(|_| {
            Error::Unsupported(format!(
                "vCPU {id}: MSHV supports at most {MAX_VCPUS} vCPUs"
            ))
        })?;
        let fd = self
            .fd
            .create_vcpu(index)
            .map_err(|e| mshv_error("MSHV_CREATE_VP", e))?;
        Ok(Box::new(MshvVcpu { fd, id }))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| mshv_error("MSHV_IRQFD", e))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = match addr {
            IoEventAddress::Mmio(a) => mshv_ioctls::IoEventAddress::Mmio(a),
            IoEventAddress::Pio(port) => {
                return Err(Error::Unsupported(format!(
                "MSHV has no port-I/O ioeventfds (port {port:#x}); handle the port through VmOps"
            )))
            }
        };
        // A u32 datamatch makes the kernel compare 4-byte writes, as KVM does.
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| mshv_error("MSHV_IOEVENTFD", e))
    }
}

/// An MSHV virtual processor.
pub struct MshvVcpu {
    fd: VcpuFd,
    id: u32,
}

fn regs_to_mshv(r: &StandardRegisters) -> mb::StandardRegisters {
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

fn regs_from_mshv(r: &mb::StandardRegisters) -> StandardRegisters {
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

fn seg_to_mshv(s: &SegmentRegister) -> mb::SegmentRegister {
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
fn seg_from_mshv(s: &mb::SegmentRegister) -> SegmentRegister {
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

fn sregs_to_mshv(s: &SpecialRegisters) -> mb::SpecialRegisters {
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

fn sregs_from_mshv(s: &mb::SpecialRegisters) -> SpecialRegisters {
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
fn set_lvt_mode(regs: &mut [std::os::raw::c_char], offset: usize, mode: u32) {
    let mut raw = [0u8; 4];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = regs[offset + i] as u8;
    }
    let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
    for (i, b) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *b as std::os::raw::c_char;
    }
}

/// HV_REGISTER_PENDING_INTERRUPTION asking for exception `vector` without an error code:
/// bit 0 pending, bits 1-3 the type (exception), bits 16-31 the vector.
fn pending_exception(vector: u8) -> u64 {
    1 | (u64::from(HV_X64_PENDING_EXCEPTION) << 1) | (u64::from(vector) << 16)
}

/// The bytes an OUT of `size` bytes sends: the low bytes of RAX.
fn pio_write_data(rax: u64, size: usize) -> ([u8; 4], usize) {
    ((rax as u32).to_le_bytes(), size.min(4))
}

/// RAX after an IN of `data.len()` bytes: AL and AX are merged into RAX like the CPU does,
/// EAX is zero-extended to 64 bits.
fn merge_pio_read(rax: u64, data: &[u8]) -> u64 {
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
fn pio_insn_len(reported: u8, bytes: &[u8]) -> Option<u64> {
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

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names the MSHV messages that can reach user space but that we do not handle.
fn message_name(msg_type: u32) -> &'static str {
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
    fn code_size(header: &mb::hv_x64_intercept_message_header) -> CodeSize {
        let es = header.execution_state;
        // SAFETY: both views of the execution-state union are plain integers.
        let lma = unsafe { es.__bindgen_anon_1 }.efer_lma() != 0;
        let cs = mb::SegmentRegister::from(header.cs_segment);
        CodeSize::from_segment(lma, cs.l != 0, cs.db != 0)
    }

    fn update_regs(&self, f: impl FnOnce(&mut mb::StandardRegisters)) -> Result<()> {
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

    fn handle_pio(
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

    fn handle_mmio(
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

    fn register_cpuid_override(&self, o: &cpuid::CpuidOverride) -> Result<()> {
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

impl crate::Vcpu for MshvVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| mshv_error("HVCALL_GET_VP_REGISTERS", e))?;
        Ok(regs_from_mshv(&r))
    }

    fn set_regs(&self, regs: &StandardRegisters) -> Result<()> {
        self.fd
            .set_regs(&regs_to_mshv(regs))
            .map_err(|e| mshv_error("HVCALL_SET_VP_REGISTERS", e))
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| mshv_error("HVCALL_GET_VP_REGISTERS (special)", e))?;
        Ok(sregs_from_mshv(&s))
    }

    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()> {
        self.fd
            .set_sregs(&sregs_to_mshv(sregs))
            .map_err(|e| mshv_error("HVCALL_SET_VP_REGISTERS (special)", e))
    }

    /// Loads FCW and MXCSR; the x87/XMM registers and the other control fields are zeroed
    /// (an empty x87 stack), as after FNINIT.
    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let f = mb::FloatingPointUnit {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd
            .set_fpu(&f)
            .map_err(|e| mshv_error("HVCALL_SET_VP_REGISTERS (FPU)", e))
    }

    /// Registers CPUID override results; see [`cpuid`] for which leaves and bits are taken
    /// from `entries` and which stay the hypervisor's.
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        for o in entries.iter().filter_map(cpuid::override_for) {
            self.register_cpuid_override(&o)?;
        }
        Ok(())
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        if msrs.is_empty() {
            return Ok(());
        }
        let assocs = msrs
            .iter()
            .map(|m| {
                let name = mb::msr_to_hv_reg_name(m.index).map_err(|_| {
                    Error::Unsupported(format!("MSR {:#x} has no MSHV register", m.index))
                })?;
                Ok(hv_register_assoc {
                    name,
                    value: hv_register_value { reg64: m.data },
                    ..Default::default()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        if let Err(batch) = self.fd.set_reg(&assocs) {
            // Name the MSR the hypervisor refused.
            for (m, a) in msrs.iter().zip(&assocs) {
                if let Err(e) = self.fd.set_reg(std::slice::from_ref(a)) {
                    return Err(Error::os(
                        "HVCALL_SET_VP_REGISTERS (MSRs)",
                        io::Error::other(format!("MSR {:#x}: {e}", m.index)),
                    ));
                }
            }
            return Err(mshv_error("HVCALL_SET_VP_REGISTERS (MSRs)", batch));
        }
        Ok(())
    }

    fn setup_lapic(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| mshv_error("MSHV_GET_VP_STATE (LAPIC)", e))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| mshv_error("MSHV_SET_VP_STATE (LAPIC)", e))
    }

    /// Walks the guest page tables for a read, ignoring the privilege level (like
    /// KVM_TRANSLATE, which does not check permissions).
    fn translate_gva(&self, gva: u64) -> Result<u64> {
        let flags = u64::from(HV_TRANSLATE_GVA_VALIDATE_READ | HV_TRANSLATE_GVA_PRIVILEGE_EXEMPT);
        let (gpa, result) = self
            .fd
            .translate_gva(gva, flags)
            .map_err(|e| mshv_error("HVCALL_TRANSLATE_VIRTUAL_ADDRESS", e))?;
        // SAFETY: both views of the translation-result union are plain integers.
        let code = unsafe { result.__bindgen_anon_1 }.result_code;
        if code != hv_translate_gva_result_code_HV_TRANSLATE_GVA_SUCCESS {
            return Err(Error::Unsupported(format!(
                "guest address {gva:#x} is not mapped (MSHV translation result {code})"
            )));
        }
        Ok(gpa)
    }

    /// Sets HV_REGISTER_PENDING_INTERRUPTION, which the hypervisor delivers on the next
    /// entry — the MSHV counterpart of KVM's injected exception in `kvm_vcpu_events`.
    fn inject_exception(&self, vector: u8) -> Result<()> {
        let assoc = hv_register_assoc {
            name: hv_register_name_HV_REGISTER_PENDING_INTERRUPTION,
            value: hv_register_value {
                reg64: pending_exception(vector),
            },
            ..Default::default()
        };
        self.fd
            .set_reg(&[assoc])
            .map_err(|e| mshv_error("HVCALL_SET_VP_REGISTERS (pending interruption)", e))
    }

    fn run(&mut self, ops: &dyn VmOps) -> Result<VcpuExit> {
        let msg: hv_message = match self.fd.run() {
            Ok(m) => m,
            Err(e) if is_retry(&e) => return Ok(VcpuExit::Continue),
            Err(e) => return Err(mshv_error("MSHV_RUN_VP", e)),
        };
        let msg_type = msg.header.message_type;
        match msg_type {
            mb::hv_message_type_HVMSG_X64_IO_PORT_INTERCEPT => {
                let info = msg
                    .to_ioport_info()
                    .map_err(|e| Error::os("MSHV_RUN_VP (I/O port message)", e))?;
                self.handle_pio(&info, ops)
            }
            mb::hv_message_type_HVMSG_UNMAPPED_GPA | mb::hv_message_type_HVMSG_GPA_INTERCEPT => {
                let info = msg
                    .to_memory_info()
                    .map_err(|e| Error::os("MSHV_RUN_VP (memory message)", e))?;
                self.handle_mmio(&info, ops)
            }
            // The hypervisor normally idles a halted VP itself until an interrupt wakes it, so
            // this message is rare; when it comes, hand it on (Cloud Hypervisor treats it as
            // the end of the guest).
            mb::hv_message_type_HVMSG_X64_HALT => Ok(VcpuExit::Halt),
            // Sent on a triple fault.
            mb::hv_message_type_HVMSG_UNRECOVERABLE_EXCEPTION => Ok(VcpuExit::TripleFault),
            // EOIs of level-triggered vectors, for a user-space IOAPIC; nothing to do here.
            mb::hv_message_type_HVMSG_X64_APIC_EOI | mb::hv_message_type_HVMSG_NONE => {
                Ok(VcpuExit::Continue)
            }
            other => Ok(VcpuExit::Unhandled(format!(
                "MSHV message {other:#x} ({})",
                message_name(other)
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
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
}
