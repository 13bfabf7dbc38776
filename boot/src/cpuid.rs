//! The CPUID a guest sees: the host's supported leaves, with per-vCPU topology and with the
//! features filtered that a stock kernel cannot use under software virtualization.
//!
//! Why filter: on hosts whose KVM runs guests through an instruction emulator (PVM, see
//! docs/ARCHITECTURE.md), the guest kernel stops with an emulation failure on instructions
//! the emulator lacks (`cmpxchg16b`, `xsave`/`xrstor`, `popcnt`, `rdrand`, `rdpid`...) or
//! on protection features it cannot model (SMEP/SMAP, PCID). Hiding them makes Linux pick
//! its fallbacks, exactly as `clearcpuid=` would, without touching the command line.

use hypervisor::arch::CPUID_FLAG_SIGNIFICANT_INDEX;
use hypervisor::CpuIdEntry;

/// A feature bit: (leaf, subleaf, register, bit, name).
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u32,
    pub name: &'static str,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

const fn f(leaf: u32, subleaf: u32, reg: Reg, bit: u32, name: &'static str) -> Feature {
    Feature {
        leaf,
        subleaf,
        reg,
        bit,
        name,
    }
}

/// Features hidden from every guest. Each one was seen to stop or break a Linux guest on a
/// software-virtualized KVM; see docs/ARCHITECTURE.md ("CPUID filtering") for the measurements.
pub const HIDDEN_FEATURES: &[Feature] = &[
    f(1, 0, Reg::Ecx, 12, "fma"),
    f(1, 0, Reg::Ecx, 13, "cx16"),
    f(1, 0, Reg::Ecx, 17, "pcid"),
    f(1, 0, Reg::Ecx, 23, "popcnt"),
    f(1, 0, Reg::Ecx, 26, "xsave"),
    f(1, 0, Reg::Ecx, 27, "osxsave"),
    f(1, 0, Reg::Ecx, 28, "avx"),
    f(1, 0, Reg::Ecx, 29, "f16c"),
    f(1, 0, Reg::Ecx, 30, "rdrand"),
    f(7, 0, Reg::Ebx, 0, "fsgsbase"),
    f(7, 0, Reg::Ebx, 5, "avx2"),
    f(7, 0, Reg::Ebx, 7, "smep"),
    f(7, 0, Reg::Ebx, 10, "invpcid"),
    f(7, 0, Reg::Ebx, 16, "avx512f"),
    f(7, 0, Reg::Ebx, 18, "rdseed"),
    f(7, 0, Reg::Ebx, 20, "smap"),
    f(7, 0, Reg::Ecx, 22, "rdpid"),
    f(0x8000_0001, 0, Reg::Edx, 27, "rdtscp"),
];

/// Hidden from the guest under software virtualization only, where they make it slower rather
/// than break it: with them hidden, the kernel copies and clears pages with plain `rep movsq`
/// and `rep stosq` instead of the byte-granular `rep movsb`/`stosb` variants, which PVM
/// emulates slowly. Measured side by side (3 boots each, agent as PID 1, PVM): 8 MiB x 4 `dd`
/// through page faults 18.1-19.7 s instead of 21.3-22.0 s, 20 fork+exec 10.8-11.1 s instead of
/// 12.0-12.2 s, boot to the agent unchanged (25.2-25.4 s against 25.3-25.6 s). On hardware
/// these features are fast: the CPUID filter keeps them.
pub const PVM_SLOW_FEATURES: &[&str] = &["erms", "fsrm"];

/// The kernel parameter that hides [`HIDDEN_FEATURES`] (and [`PVM_SLOW_FEATURES`]) from inside
/// the guest, for hypervisors that do not enforce the CPUID the VMM sets (PVM: see
/// `Hypervisor::cpuid_enforced`).
pub fn clearcpuid_param() -> String {
    let names: Vec<&str> = HIDDEN_FEATURES
        .iter()
        .map(|f| f.name)
        .chain(PVM_SLOW_FEATURES.iter().copied())
        .collect();
    format!("clearcpuid={}", names.join(","))
}

/// The kernel parameter of the guest kit's PVM patch (`resources/kernel-patches/`): the guest
/// kernel completes a 64-bit `syscall` that PVM left in user mode (`=off` keeps it off). Unknown
/// to other kernels, which pass it on to init as an argument.
pub const SYSCALL_FIXUP_PARAM: &str = "pvm_syscall_fixup";

/// What a guest needs on its command line because of the hypervisor it runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostQuirks {
    /// The hypervisor overrides some CPUID bits (PVM): hide [`HIDDEN_FEATURES`] from inside.
    pub cpuid_not_enforced: bool,
    /// 64-bit `syscall` does not reach ring 0 (PVM): ask for the kit's syscall fix-up.
    pub syscall_fixup: bool,
}

/// The parameters podvmm adds to `cmdline` for `quirks`, each only where the user did not give
/// it (or its own `clearcpuid=` list) already.
pub fn added_params(cmdline: &str, quirks: HostQuirks) -> Vec<String> {
    let mut added = Vec::new();
    if quirks.cpuid_not_enforced && !cmdline.contains("clearcpuid=") {
        added.push(clearcpuid_param());
    }
    let given = |w: &str| {
        w == SYSCALL_FIXUP_PARAM
            || w.strip_prefix(SYSCALL_FIXUP_PARAM)
                .is_some_and(|v| v.starts_with('='))
    };
    if quirks.syscall_fixup && !cmdline.split_whitespace().any(given) {
        added.push(SYSCALL_FIXUP_PARAM.to_string());
    }
    added
}

/// The command line a guest gets: `cmdline` plus [`added_params`].
pub fn guest_cmdline(cmdline: &str, quirks: HostQuirks) -> String {
    let mut words: Vec<String> = Vec::new();
    if !cmdline.is_empty() {
        words.push(cmdline.to_string());
    }
    words.extend(added_params(cmdline, quirks));
    words.join(" ")
}

/// CPUID.1:ECX bit 31 tells the guest it runs under a hypervisor.
const HYPERVISOR_BIT: u32 = 1 << 31;
/// CPUID.1:EDX bit 28: more than one logical processor per package.
const HTT_BIT: u32 = 1 << 28;

fn reg_mut(e: &mut CpuIdEntry, r: Reg) -> &mut u32 {
    match r {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// Bits needed to number `n` items (0 for one).
fn bits_for(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// The CPUID table for vCPU `id` of `num_cpus`: one socket, one thread per core.
pub fn guest_cpuid(host: &[CpuIdEntry], id: u32, num_cpus: u32) -> Vec<CpuIdEntry> {
    let core_bits = bits_for(num_cpus);
    let mut out: Vec<CpuIdEntry> = host
        .iter()
        // Leaf 0x1f repeats 0xb with more levels; one topology source is enough.
        .filter(|e| e.function != 0x1f)
        .copied()
        .collect();
    for e in out.iter_mut() {
        for feat in HIDDEN_FEATURES {
            if feat.leaf == e.function && feat.subleaf == e.index {
                *reg_mut(e, feat.reg) &= !(1 << feat.bit);
            }
        }
        match e.function {
            1 => {
                // Initial APIC ID, logical processor count, and the hypervisor bit.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((num_cpus & 0xff) << 16);
                e.ecx |= HYPERVISOR_BIT;
                if num_cpus > 1 {
                    e.edx |= HTT_BIT;
                } else {
                    e.edx &= !HTT_BIT;
                }
            }
            // Intel deterministic cache parameters: cores per package.
            4 => e.eax = (e.eax & 0x03ff_ffff) | ((num_cpus - 1) << 26),
            // Extended topology: level 0 = SMT (1 thread), level 1 = core.
            0xb => {
                e.flags |= CPUID_FLAG_SIGNIFICANT_INDEX;
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = num_cpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    n => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = n;
                    }
                }
            }
            // AMD: number of cores (NC) and APIC ID size.
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (num_cpus - 1);
            }
            // AMD extended APIC ID; one thread per core.
            0x8000_001e => {
                e.eax = id;
                e.ebx = (e.ebx & !0xff_ff) | (id & 0xff);
                e.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            flags: 0,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
        }
    }

    fn host() -> Vec<CpuIdEntry> {
        vec![
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x1f, 0),
            entry(0x8000_0001, 0),
            entry(0x8000_0008, 0),
        ]
    }

    fn find(t: &[CpuIdEntry], function: u32, index: u32) -> CpuIdEntry {
        *t.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    #[test]
    fn hidden_features_are_cleared_and_others_kept() {
        let t = guest_cpuid(&host(), 0, 1);
        for feat in HIDDEN_FEATURES {
            let mut e = find(&t, feat.leaf, feat.subleaf);
            assert_eq!(
                *reg_mut(&mut e, feat.reg) & (1 << feat.bit),
                0,
                "{}",
                feat.name
            );
        }
        // SSE2 (EDX bit 26) and SSE4.2 (ECX bit 20) stay.
        let l1 = find(&t, 1, 0);
        assert_ne!(l1.edx & (1 << 26), 0);
        assert_ne!(l1.ecx & (1 << 20), 0);
        assert_ne!(l1.ecx & HYPERVISOR_BIT, 0);
    }

    #[test]
    fn topology_is_per_vcpu() {
        let t = guest_cpuid(&host(), 2, 3);
        let l1 = find(&t, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "initial APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 3, "logical count");
        assert_ne!(l1.edx & HTT_BIT, 0);
        let core = find(&t, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.edx), (2, 3, 2));
        assert_eq!((core.ecx >> 8) & 0xff, 2, "core level type");
        assert_eq!(find(&t, 0xb, 0).ebx, 1);
        assert!(t.iter().all(|e| e.function != 0x1f));
        assert_eq!(find(&t, 0x8000_0008, 0).ecx & 0xff, 2);
    }

    #[test]
    fn command_line_workaround_only_where_needed() {
        let none = HostQuirks::default();
        let pvm = HostQuirks {
            cpuid_not_enforced: true,
            syscall_fixup: true,
        };
        assert_eq!(guest_cmdline("console=ttyS0", none), "console=ttyS0");
        let c = guest_cmdline("console=ttyS0", pvm);
        assert!(c.starts_with("console=ttyS0 clearcpuid=fma,cx16,"), "{c}");
        assert!(
            c.contains(",xsave,") && c.ends_with(",rdtscp,erms,fsrm pvm_syscall_fixup"),
            "{c}"
        );
        assert_eq!(
            guest_cmdline("clearcpuid=pcid", pvm),
            "clearcpuid=pcid pvm_syscall_fixup"
        );
        assert_eq!(
            guest_cmdline("", pvm),
            format!("{} pvm_syscall_fixup", clearcpuid_param())
        );
        // Given by the user (or turned off with =off): not twice; a longer word is not it.
        assert_eq!(
            added_params("pvm_syscall_fixup=off", pvm),
            vec![clearcpuid_param()]
        );
        assert_eq!(
            added_params("a pvm_syscall_fixup b", pvm),
            vec![clearcpuid_param()]
        );
        assert_eq!(
            added_params("pvm_syscall_fixupx", pvm)
                .last()
                .map(String::as_str),
            Some("pvm_syscall_fixup")
        );
        let cpuid_only = HostQuirks {
            cpuid_not_enforced: true,
            syscall_fixup: false,
        };
        assert_eq!(guest_cmdline("", cpuid_only), clearcpuid_param());
    }

    #[test]
    fn single_cpu_has_no_htt() {
        let t = guest_cpuid(&host(), 0, 1);
        assert_eq!(find(&t, 1, 0).edx & HTT_BIT, 0);
        assert_eq!(bits_for(1), 0);
        assert_eq!(bits_for(2), 1);
        assert_eq!(bits_for(5), 3);
    }
}
