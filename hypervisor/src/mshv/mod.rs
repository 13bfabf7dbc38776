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
mod intercepts;
mod regs;

use intercepts::*;
use regs::*;

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
mod tests;
