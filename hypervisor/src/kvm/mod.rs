//! KVM backend (kvm-ioctls).

use std::sync::Arc;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_dtable, kvm_msr_entry, kvm_segment, kvm_userspace_memory_region, CpuId,
    Msrs, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, NoDatamatch, VcpuExit as KvmExit, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::*;
use crate::{Error, Hypervisor, HypervisorKind, IoEventAddress, Result, VcpuExit, VmOps};

/// Where KVM on Intel keeps its real-mode TSS: three pages just below the 4 GiB boundary's
/// BIOS area, outside any RAM or MMIO range the VMM hands out.
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// CPUID leaf 1, ECX: the LAPIC timer has TSC-deadline mode.
const TSC_DEADLINE_TIMER: u32 = 1 << 24;

/// Local APIC register offsets and delivery modes used to wire LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// `kvm_run.internal.suberror` for "KVM could not emulate an instruction".
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

pub struct KvmHypervisor {
    kvm: Kvm,
}

impl KvmHypervisor {
    pub fn new() -> Result<Self> {
        let kvm = Kvm::new()
            .map_err(|e| Error::Unavailable(HypervisorKind::Kvm, format!("/dev/kvm: {e}")))?;
        let version = kvm.get_api_version();
        if version != 12 {
            return Err(Error::Unavailable(
                HypervisorKind::Kvm,
                format!("unsupported KVM API version {version}"),
            ));
        }
        Ok(KvmHypervisor { kvm })
    }
}

impl Hypervisor for KvmHypervisor {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Kvm
    }

    fn create_vm(&self) -> Result<Arc<dyn crate::Vm>> {
        let fd = self
            .kvm
            .create_vm()
            .map_err(|e| Error::os("KVM_CREATE_VM", e))?;
        fd.set_tss_address(KVM_TSS_ADDRESS)
            .map_err(|e| Error::os("KVM_SET_TSS_ADDR", e))?;
        Ok(Arc::new(KvmVm { fd }))
    }

    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>> {
        let cpuid = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::os("KVM_GET_SUPPORTED_CPUID", e))?;
        // KVM emulates the TSC-deadline LAPIC timer but leaves advertising it to user space.
        // The guest needs it: with no PIT (see `create_interrupt_controllers`), Linux's LAPIC
        // timer has nothing to be calibrated against, and with this mode it needs none.
        let tsc_deadline = self.kvm.check_extension(Cap::TscDeadlineTimer);
        Ok(cpuid
            .as_slice()
            .iter()
            .map(|e| CpuIdEntry {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: if e.function == 1 && tsc_deadline {
                    e.ecx | TSC_DEADLINE_TIMER
                } else {
                    e.ecx
                },
                edx: e.edx,
            })
            .collect())
    }

    fn max_vcpus(&self) -> u32 {
        self.kvm.get_max_vcpus() as u32
    }

    fn cpuid_enforced(&self) -> bool {
        !is_pvm()
    }

    fn syscall_needs_fixup(&self) -> bool {
        is_pvm()
    }
}

/// Whether this KVM is PVM, the software virtualization used where hardware support is
/// missing (e.g. inside cloud VMs). Under PVM the guest sees some CPUID feature bits (leaf 1
/// ECX, leaf 7 EBX) whatever KVM_SET_CPUID2 says: measured, see docs/ARCHITECTURE.md.
pub fn is_pvm() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

pub struct KvmVm {
    fd: VmFd,
}

impl crate::Vm for KvmVm {
    fn create_interrupt_controllers(&self) -> Result<()> {
        // No PIT, as under Cloud Hypervisor: Linux takes the TSC's rate from kvm-clock and
        // runs its LAPIC timer in TSC-deadline mode (advertised in `supported_cpuid`), so
        // nothing calibrates against the PIT. KVM_CREATE_PIT2 starts a kernel thread: up to
        // 4 ms at start-up when the host must wake an idle CPU for it, and stopping it made
        // up a third of a tiny guest's run (24 -> 16 ms, docs/ARCHITECTURE.md).
        self.fd
            .create_irq_chip()
            .map_err(|e| Error::os("KVM_CREATE_IRQCHIP", e))
    }

    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: if readonly { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
        };
        // SAFETY: the caller guarantees the host range outlives the VM (trait contract).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(|e| Error::os("KVM_SET_USER_MEMORY_REGION", e))
    }

    fn create_vcpu(&self, id: u32) -> Result<Box<dyn crate::Vcpu>> {
        let fd = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|e| Error::os("KVM_CREATE_VCPU", e))?;
        Ok(Box::new(KvmVcpu { fd, id }))
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()> {
        self.fd
            .register_irqfd(fd, gsi)
            .map_err(|e| Error::os("KVM_IRQFD", e))
    }

    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()> {
        let addr = match addr {
            IoEventAddress::Pio(a) => kvm_ioctls::IoEventAddress::Pio(a),
            IoEventAddress::Mmio(a) => kvm_ioctls::IoEventAddress::Mmio(a),
        };
        match datamatch {
            Some(v) => self.fd.register_ioevent(fd, &addr, v),
            None => self.fd.register_ioevent(fd, &addr, NoDatamatch),
        }
        .map_err(|e| Error::os("KVM_IOEVENTFD", e))
    }
}

pub struct KvmVcpu {
    fd: VcpuFd,
    id: u32,
}

fn seg_to_kvm(s: &SegmentRegister) -> kvm_segment {
    kvm_segment {
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

fn seg_from_kvm(s: &kvm_segment) -> SegmentRegister {
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
        unusable: s.unusable,
    }
}

fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

/// Replaces the delivery-mode field (bits 8-10) of a local APIC LVT register.
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

impl crate::Vcpu for KvmVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn get_regs(&self) -> Result<StandardRegisters> {
        let r = self
            .fd
            .get_regs()
            .map_err(|e| Error::os("KVM_GET_REGS", e))?;
        Ok(StandardRegisters {
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
        })
    }

    fn set_regs(&self, r: &StandardRegisters) -> Result<()> {
        let regs = kvm_bindings::kvm_regs {
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
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::os("KVM_SET_REGS", e))
    }

    fn get_sregs(&self) -> Result<SpecialRegisters> {
        let s = self
            .fd
            .get_sregs()
            .map_err(|e| Error::os("KVM_GET_SREGS", e))?;
        Ok(SpecialRegisters {
            cs: seg_from_kvm(&s.cs),
            ds: seg_from_kvm(&s.ds),
            es: seg_from_kvm(&s.es),
            fs: seg_from_kvm(&s.fs),
            gs: seg_from_kvm(&s.gs),
            ss: seg_from_kvm(&s.ss),
            tr: seg_from_kvm(&s.tr),
            ldt: seg_from_kvm(&s.ldt),
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
        })
    }

    fn set_sregs(&self, s: &SpecialRegisters) -> Result<()> {
        // Start from KVM's view so fields we do not model (the pending-interrupt bitmap)
        // keep their values.
        let mut k = self
            .fd
            .get_sregs()
            .map_err(|e| Error::os("KVM_GET_SREGS", e))?;
        k.cs = seg_to_kvm(&s.cs);
        k.ds = seg_to_kvm(&s.ds);
        k.es = seg_to_kvm(&s.es);
        k.fs = seg_to_kvm(&s.fs);
        k.gs = seg_to_kvm(&s.gs);
        k.ss = seg_to_kvm(&s.ss);
        k.tr = seg_to_kvm(&s.tr);
        k.ldt = seg_to_kvm(&s.ldt);
        k.gdt = dtable_to_kvm(&s.gdt);
        k.idt = dtable_to_kvm(&s.idt);
        k.cr0 = s.cr0;
        k.cr2 = s.cr2;
        k.cr3 = s.cr3;
        k.cr4 = s.cr4;
        k.cr8 = s.cr8;
        k.efer = s.efer;
        k.apic_base = s.apic_base;
        self.fd
            .set_sregs(&k)
            .map_err(|e| Error::os("KVM_SET_SREGS", e))
    }

    fn set_fpu(&self, fpu: &FpuState) -> Result<()> {
        let k = kvm_bindings::kvm_fpu {
            fcw: fpu.fcw,
            mxcsr: fpu.mxcsr,
            ..Default::default()
        };
        self.fd.set_fpu(&k).map_err(|e| Error::os("KVM_SET_FPU", e))
    }

    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()> {
        let kvm_entries: Vec<kvm_cpuid_entry2> = entries
            .iter()
            .map(|e| kvm_cpuid_entry2 {
                function: e.function,
                index: e.index,
                flags: e.flags,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
                ..Default::default()
            })
            .collect();
        let cpuid = CpuId::from_entries(&kvm_entries)
            .map_err(|e| Error::Unsupported(format!("too many CPUID entries: {e:?}")))?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::os("KVM_SET_CPUID2", e))
    }

    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()> {
        let entries: Vec<kvm_msr_entry> = msrs
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Unsupported(format!("too many MSRs: {e:?}")))?;
        let written = self
            .fd
            .set_msrs(&kvm_msrs)
            .map_err(|e| Error::os("KVM_SET_MSRS", e))?;
        if written != entries.len() {
            let failed = entries[written].index;
            return Err(Error::Unsupported(format!(
                "KVM refused MSR {failed:#x} ({written} of {} set)",
                entries.len()
            )));
        }
        Ok(())
    }

    fn setup_lapic(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::os("KVM_GET_LAPIC", e))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::os("KVM_SET_LAPIC", e))
    }

    fn translate_gva(&self, gva: u64) -> Result<u64> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(|e| Error::os("KVM_TRANSLATE", e))?;
        if t.valid == 0 {
            return Err(Error::Unsupported(format!(
                "guest address {gva:#x} is not mapped"
            )));
        }
        Ok(t.physical_address)
    }

    fn inject_exception(&self, vector: u8) -> Result<()> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(|e| Error::os("KVM_GET_VCPU_EVENTS", e))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = 0;
        events.exception.error_code = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(|e| Error::os("KVM_SET_VCPU_EVENTS", e))
    }

    fn immediate_exit(&mut self) -> Option<std::ptr::NonNull<u8>> {
        Some(std::ptr::NonNull::from(
            &mut self.fd.get_kvm_run().immediate_exit,
        ))
    }

    fn run(&mut self, ops: &dyn VmOps) -> Result<VcpuExit> {
        let mut internal_error = false;
        let exit = match self.fd.run() {
            Ok(KvmExit::IoOut(port, data)) => {
                ops.pio_write(port, data);
                VcpuExit::Continue
            }
            Ok(KvmExit::IoIn(port, data)) => {
                ops.pio_read(port, data);
                VcpuExit::Continue
            }
            Ok(KvmExit::MmioRead(addr, data)) => {
                ops.mmio_read(addr, data);
                VcpuExit::Continue
            }
            Ok(KvmExit::MmioWrite(addr, data)) => {
                ops.mmio_write(addr, data);
                VcpuExit::Continue
            }
            Ok(KvmExit::Hlt) => VcpuExit::Halt,
            Ok(KvmExit::Shutdown) => VcpuExit::TripleFault,
            Ok(KvmExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => VcpuExit::Shutdown,
                KVM_SYSTEM_EVENT_RESET => VcpuExit::Reset,
                other => VcpuExit::Unhandled(format!("system event {other}")),
            },
            Ok(KvmExit::Intr) => VcpuExit::Continue,
            Ok(KvmExit::InternalError) => {
                internal_error = true;
                VcpuExit::Continue
            }
            Ok(KvmExit::FailEntry(reason, cpu)) => VcpuExit::Unhandled(format!(
                "KVM entry failed: hardware reason {reason:#x} on cpu {cpu}"
            )),
            Ok(other) => VcpuExit::Unhandled(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: the next entry must run the guest again.
                self.fd.set_kvm_immediate_exit(0);
                VcpuExit::Continue
            }
            Err(e) => return Err(Error::os("KVM_RUN", e)),
        };
        // Internal errors carry their detail in the run area, read once the exit's borrow ended.
        if internal_error {
            // SAFETY: after KVM_EXIT_INTERNAL_ERROR the kernel filled the `internal` member of
            // the union; reading it is a plain read of that variant.
            let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
            if suberror == KVM_INTERNAL_ERROR_EMULATION {
                let rip = crate::Vcpu::get_regs(self)?.rip;
                return Ok(VcpuExit::EmulationFailure { rip });
            }
            return Ok(VcpuExit::Unhandled(format!(
                "KVM internal error, suberror {suberror}"
            )));
        }
        Ok(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lvt_mode_replaces_only_delivery_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        // Vector 0x31 and the mask bit set; the mode field must change, the rest must not.
        let initial: u32 = 0x0001_0031 | (0x2 << 8);
        for (i, b) in initial.to_le_bytes().iter().enumerate() {
            regs[APIC_LVT0 + i] = *b as std::os::raw::c_char;
        }
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = regs[APIC_LVT0 + i] as u8;
        }
        assert_eq!(
            u32::from_le_bytes(raw),
            0x0001_0031 | (APIC_MODE_EXTINT << 8)
        );
    }
}
