//! x86_64 direct kernel boot.
//!
//! Loads a PVH ELF `vmlinux` or a `bzImage` with an optional initramfs and command line into
//! guest memory, writes the tables a guest kernel reads at boot (memory map, MP table, PVH
//! start info or the Linux zero page), and computes each vCPU's initial state (CPUID, MSRs,
//! registers). No firmware is involved.

pub mod cpuid;
pub mod input;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod regs;

pub use input::{Input, InputError};
pub use loader::{load_kernel, BootInfo, EntryMode, KernelSpec};

use hypervisor::{CpuIdEntry, Vcpu};

/// Errors while preparing a boot. Each names what was being done.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Loader(#[from] loader::Error),
    #[error("setting up vCPU {id}: {source}")]
    Vcpu {
        id: u32,
        #[source]
        source: hypervisor::Error,
    },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Puts one vCPU in the state the boot protocol requires.
///
/// Every vCPU gets its CPUID, MSRs and local APIC wiring; the boot processor (id 0) also
/// gets registers pointing at the kernel's entry. Application processors wait for the
/// guest's INIT/SIPI, as on a PC.
pub fn setup_vcpu(
    vcpu: &dyn Vcpu,
    num_cpus: u32,
    host_cpuid: &[CpuIdEntry],
    boot: &BootInfo,
) -> Result<()> {
    let id = vcpu.id();
    let err = |source| Error::Vcpu { id, source };
    vcpu.set_cpuid(&cpuid::guest_cpuid(host_cpuid, id, num_cpus))
        .map_err(err)?;
    vcpu.set_msrs(&regs::boot_msrs()).map_err(err)?;
    if id == 0 {
        let mut sregs = vcpu.get_sregs().map_err(err)?;
        regs::setup_sregs(&mut sregs, boot.mode);
        vcpu.set_sregs(&sregs).map_err(err)?;
        vcpu.set_regs(&regs::boot_regs(boot)).map_err(err)?;
        vcpu.set_fpu(&Default::default()).map_err(err)?;
    }
    vcpu.setup_lapic().map_err(err)?;
    Ok(())
}
