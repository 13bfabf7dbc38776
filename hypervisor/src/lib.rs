//! Backend-neutral hypervisor layer.
//!
//! The rest of the VMM talks to a hypervisor only through the [`Hypervisor`], [`Vm`] and
//! [`Vcpu`] traits defined here. Port and memory-mapped I/O exits are dispatched back to the
//! VMM through the small [`VmOps`] callback trait, so the vCPU loop is identical for every
//! backend. This crate knows nothing about devices.
//!
//! Backends: KVM (always built) and MSHV (cargo feature `mshv`). [`new`] probes at run time.

pub mod arch;
pub mod kvm;
#[cfg(feature = "mshv")]
pub mod mshv;

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use arch::{
    CpuIdEntry, DescriptorTable, FpuState, MsrEntry, SegmentRegister, SpecialRegisters,
    StandardRegisters,
};

/// Errors of the hypervisor layer. Each carries the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no usable hypervisor: {0}")]
    NoHypervisor(String),
    #[error("hypervisor {0} is not available: {1}")]
    Unavailable(HypervisorKind, String),
    #[error("hypervisor {0} support was not compiled in (rebuild with --features {0})")]
    NotCompiled(HypervisorKind),
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl Error {
    /// Wraps an OS error with the name of the operation that produced it.
    pub fn os(op: &'static str, source: impl Into<std::io::Error>) -> Self {
        Error::Os {
            op,
            source: source.into(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which hypervisor implementation backs a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorKind {
    Kvm,
    Mshv,
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HypervisorKind::Kvm => "kvm",
            HypervisorKind::Mshv => "mshv",
        })
    }
}

/// What the user asked for with `--hypervisor`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Selection {
    /// `/dev/mshv` if present, else `/dev/kvm`.
    #[default]
    Auto,
    Kvm,
    Mshv,
}

impl FromStr for Selection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Selection::Auto),
            "kvm" => Ok(Selection::Kvm),
            "mshv" => Ok(Selection::Mshv),
            other => Err(format!(
                "unknown hypervisor '{other}' (expected auto, kvm or mshv)"
            )),
        }
    }
}

/// Device nodes probed by [`Selection::Auto`], in order of preference.
pub const MSHV_DEVICE: &str = "/dev/mshv";
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Decides which backend a selection resolves to, given which device nodes exist.
/// Kept separate from [`new`] so the policy is unit-testable without the devices.
pub fn resolve(
    sel: Selection,
    exists: impl Fn(&str) -> bool,
) -> std::result::Result<HypervisorKind, Error> {
    match sel {
        Selection::Kvm => Ok(HypervisorKind::Kvm),
        Selection::Mshv => Ok(HypervisorKind::Mshv),
        Selection::Auto if exists(MSHV_DEVICE) => Ok(HypervisorKind::Mshv),
        Selection::Auto if exists(KVM_DEVICE) => Ok(HypervisorKind::Kvm),
        Selection::Auto => Err(Error::NoHypervisor(format!(
            "neither {MSHV_DEVICE} nor {KVM_DEVICE} exists (is virtualization enabled and the kvm module loaded?)"
        ))),
    }
}

/// Opens the hypervisor the selection asks for.
pub fn new(sel: Selection) -> Result<Arc<dyn Hypervisor>> {
    match resolve(sel, |p| Path::new(p).exists())? {
        HypervisorKind::Kvm => Ok(Arc::new(kvm::KvmHypervisor::new()?)),
        HypervisorKind::Mshv => new_mshv(),
    }
}

#[cfg(feature = "mshv")]
fn new_mshv() -> Result<Arc<dyn Hypervisor>> {
    Ok(Arc::new(mshv::MshvHypervisor::new()?))
}

#[cfg(not(feature = "mshv"))]
fn new_mshv() -> Result<Arc<dyn Hypervisor>> {
    Err(Error::NotCompiled(HypervisorKind::Mshv))
}

/// A hypervisor: creates VMs and reports what the host supports.
pub trait Hypervisor: Send + Sync {
    fn kind(&self) -> HypervisorKind;
    /// Creates a VM with the platform pieces a PC guest needs (interrupt controllers, timer).
    fn create_vm(&self) -> Result<Arc<dyn Vm>>;
    /// CPUID leaves the host can offer a guest, before any VMM filtering.
    fn supported_cpuid(&self) -> Result<Vec<CpuIdEntry>>;
    /// Largest number of vCPUs one VM may have.
    fn max_vcpus(&self) -> u32;
    /// Whether the guest sees exactly the CPUID the VMM sets. False where the hypervisor
    /// overrides feature bits, so hiding a feature needs the guest's cooperation.
    fn cpuid_enforced(&self) -> bool {
        true
    }
    /// Whether a guest's 64-bit `syscall` fails to reach ring 0 (PVM), so a guest kernel needs
    /// the guest kit's fix-up to run user space.
    fn syscall_needs_fixup(&self) -> bool {
        false
    }
}

/// Where an ioeventfd listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEventAddress {
    Pio(u64),
    Mmio(u64),
}

/// A virtual machine: guest memory slots, vCPUs and interrupt plumbing.
pub trait Vm: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at `guest_addr`.
    ///
    /// # Safety
    /// The host range must stay mapped and valid for as long as the VM exists.
    unsafe fn map_memory(
        &self,
        slot: u32,
        guest_addr: u64,
        size: u64,
        host_addr: u64,
        readonly: bool,
    ) -> Result<()>;
    /// Creates the interrupt controllers and timers the hypervisor emulates (KVM: PIC,
    /// IO-APIC, PIT; MSHV: none). Called once, after the memory is mapped (a memory slot
    /// installed before them costs less: KVM then has no in-kernel device to wait for) and
    /// before any vCPU exists.
    fn create_interrupt_controllers(&self) -> Result<()> {
        Ok(())
    }
    fn create_vcpu(&self, id: u32) -> Result<Box<dyn Vcpu>>;
    /// Signalling `fd` raises the guest interrupt line `gsi`.
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<()>;
    /// A guest write to `addr` (of `datamatch`, if given) signals `fd` without a user-space exit.
    fn register_ioevent(
        &self,
        fd: &EventFd,
        addr: IoEventAddress,
        datamatch: Option<u32>,
    ) -> Result<()>;
}

/// Callbacks through which a vCPU hands I/O exits to the VMM's buses.
pub trait VmOps: Send + Sync {
    fn pio_read(&self, port: u16, data: &mut [u8]);
    fn pio_write(&self, port: u16, data: &[u8]);
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Why `Vcpu::run` returned. I/O exits never show up here: they are dispatched to [`VmOps`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuExit {
    /// An I/O exit was handled, or the run was interrupted; call `run` again.
    Continue,
    /// The vCPU executed HLT and the hypervisor handed it to user space.
    Halt,
    /// The guest asked for a reset (a reset system event).
    Reset,
    /// The vCPU triple-faulted: a PC resets, but it almost always means the guest crashed.
    TripleFault,
    /// The guest asked to power off.
    Shutdown,
    /// The hypervisor could not emulate an instruction of the guest.
    EmulationFailure { rip: u64 },
    /// Any other exit the VMM does not handle; the string names it.
    Unhandled(String),
}

/// A virtual CPU. Owned and run by exactly one thread.
pub trait Vcpu: Send {
    fn id(&self) -> u32;
    fn get_regs(&self) -> Result<StandardRegisters>;
    fn set_regs(&self, regs: &StandardRegisters) -> Result<()>;
    fn get_sregs(&self) -> Result<SpecialRegisters>;
    fn set_sregs(&self, sregs: &SpecialRegisters) -> Result<()>;
    fn set_fpu(&self, fpu: &FpuState) -> Result<()>;
    fn set_cpuid(&self, entries: &[CpuIdEntry]) -> Result<()>;
    fn set_msrs(&self, msrs: &[MsrEntry]) -> Result<()>;
    /// Routes the local APIC's LINT0 to ExtINT and LINT1 to NMI, as a PC's firmware would.
    fn setup_lapic(&self) -> Result<()>;
    /// Translates a guest virtual address with the vCPU's current page tables.
    fn translate_gva(&self, gva: u64) -> Result<u64>;
    /// Queues exception `vector` (no error code) for delivery on the next entry.
    fn inject_exception(&self, vector: u8) -> Result<()>;
    /// Runs the vCPU until an exit the VMM must see; I/O exits go to `ops`.
    fn run(&mut self, ops: &dyn VmOps) -> Result<VcpuExit>;
    /// A byte that, set non-zero (from a signal handler on this vCPU's thread), makes the
    /// next entry into the guest return at once (KVM's `kvm_run.immediate_exit`), so a kick
    /// landing just before the entry is not lost; `run` clears it. Valid as long as the vCPU
    /// lives. None where the hypervisor has no such flag (MSHV).
    fn immediate_exit(&mut self) -> Option<std::ptr::NonNull<u8>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_prefers_mshv_then_kvm() {
        assert_eq!(
            resolve(Selection::Auto, |p| p == MSHV_DEVICE || p == KVM_DEVICE).unwrap(),
            HypervisorKind::Mshv
        );
        assert_eq!(
            resolve(Selection::Auto, |p| p == KVM_DEVICE).unwrap(),
            HypervisorKind::Kvm
        );
        let err = resolve(Selection::Auto, |_| false).unwrap_err().to_string();
        assert!(err.contains("/dev/kvm"), "{err}");
    }

    #[test]
    fn explicit_selection_is_honoured() {
        assert_eq!(
            resolve(Selection::Mshv, |_| false).unwrap(),
            HypervisorKind::Mshv
        );
        assert_eq!(
            resolve(Selection::Kvm, |_| false).unwrap(),
            HypervisorKind::Kvm
        );
    }

    #[test]
    fn selection_parses() {
        assert_eq!("auto".parse::<Selection>().unwrap(), Selection::Auto);
        assert_eq!("kvm".parse::<Selection>().unwrap(), Selection::Kvm);
        assert_eq!("mshv".parse::<Selection>().unwrap(), Selection::Mshv);
        assert!("xen".parse::<Selection>().unwrap_err().contains("xen"));
    }

    #[cfg(not(feature = "mshv"))]
    #[test]
    fn mshv_without_feature_says_so() {
        let err = match new(Selection::Mshv) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("mshv must not be available without the feature"),
        };
        assert!(err.contains("--features mshv"), "{err}");
    }
}
