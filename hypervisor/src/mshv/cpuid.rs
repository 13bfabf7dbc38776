//! CPUID under MSHV.
//!
//! KVM lets the VMM load a complete CPUID table. The Microsoft Hypervisor instead computes
//! every leaf itself from the partition's processor features (which `create_vm` derives from
//! the host's) and lets the VMM register *override results* per leaf/subleaf: each register
//! comes with a mask, and the guest sees `(hypervisor_value & !mask) | (value & mask)`.
//!
//! This module decides which parts of the VMM's table become overrides:
//!
//! * **Feature flags** (leaf 1 ECX/EDX, leaf 7 EBX/ECX/EDX and 7.1 EAX, 0x8000_0001 ECX/EDX)
//!   are *intersected* with what the hypervisor offers: for every bit the VMM cleared the mask
//!   bit is set and the value bit is 0, so the VMM can hide features but never advertise one
//!   the partition does not have (a forced AVX-512 bit on a partition without AVX-512 state
//!   would crash the guest). Bits that track guest state — OSXSAVE, OSPKE, the APIC-enabled
//!   bit — are left to the hypervisor.
//! * **Identity and topology** — leaf 1 EBX (APIC ID, logical count), HTT, leaf 4's core
//!   count, leaves 0xB/0x1F, 0x8000_0008 ECX, 0x8000_001E and the brand string — are taken
//!   from the VMM as they are, so the guest's topology matches the VMM's MP table.
//! * Everything else is the hypervisor's: vendor and maximum leaves, family/model, cache
//!   and XSAVE-size leaves (0xD depends on the guest's XCR0), address sizes and the
//!   hypervisor leaves 0x4000_0000.. (MSHV publishes its own Hyper-V interface there; a
//!   KVM signature from the VMM would break the enlightenments Linux uses for its clock).
//!
//! [`host_cpuid`] backs `Hypervisor::supported_cpuid`: MSHV has no "supported CPUID" call
//! (that would need a scratch partition), so like Cloud Hypervisor we read the leaves above
//! with the `cpuid` instruction. The root partition's view is itself virtualized by the
//! hypervisor and close to what a child gets; the intersection rule makes any excess
//! harmless.

use std::arch::x86_64::{__cpuid_count, CpuidResult};

use crate::arch::{CpuIdEntry, CPUID_FLAG_SIGNIFICANT_INDEX};

/// CPUID.1:ECX bits owned by the hypervisor because they mirror CR4 (OSXSAVE).
const LEAF1_ECX_DYNAMIC: u32 = 1 << 27;
/// CPUID.1:ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX bit 9 mirrors IA32_APIC_BASE.EN.
const LEAF1_EDX_DYNAMIC: u32 = 1 << 9;
/// CPUID.1:EDX bit 28 (HTT) is topology, owned by the VMM.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// CPUID.7.0:ECX bit 4 (OSPKE) mirrors CR4.PKE.
const LEAF7_ECX_DYNAMIC: u32 = 1 << 4;
/// CPUID.4:EAX bits 26..32: cores per package - 1.
const LEAF4_EAX_CORES: u32 = 0xfc00_0000;

/// One register of an override: the guest sees `(hv & !mask) | (value & mask)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masked {
    pub value: u32,
    pub mask: u32,
}

impl Masked {
    /// Take the whole register from the VMM.
    fn all(value: u32) -> Self {
        Masked { value, mask: !0 }
    }

    /// Take only the bits in `mask` from the VMM.
    fn bits(value: u32, mask: u32) -> Self {
        Masked {
            value: value & mask,
            mask,
        }
    }

    /// Clear the feature bits the VMM cleared, except `keep` (left to the hypervisor).
    fn and(value: u32, keep: u32) -> Self {
        Masked {
            value: 0,
            mask: !value & !keep,
        }
    }

    /// Leave the register to the hypervisor.
    fn none() -> Self {
        Masked::default()
    }

    /// What the guest sees if the hypervisor computed `hv`.
    pub fn apply(&self, hv: u32) -> u32 {
        (hv & !self.mask) | (self.value & self.mask)
    }
}

/// An override result to register for one leaf (and subleaf, if `subleaf_specific`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidOverride {
    pub function: u32,
    pub index: u32,
    pub subleaf_specific: bool,
    pub eax: Masked,
    pub ebx: Masked,
    pub ecx: Masked,
    pub edx: Masked,
}

/// The override for one entry of the VMM's table, or `None` if the leaf stays the
/// hypervisor's (see the module documentation for the policy).
pub fn override_for(e: &CpuIdEntry) -> Option<CpuidOverride> {
    let indexed = e.flags & CPUID_FLAG_SIGNIFICANT_INDEX != 0;
    let (eax, ebx, ecx, edx) = match (e.function, e.index) {
        (0x1, _) => {
            // Features are intersected; HTT and the identity word in EBX are the VMM's.
            let mut edx = Masked::and(e.edx, LEAF1_EDX_DYNAMIC | LEAF1_EDX_HTT);
            edx.mask |= LEAF1_EDX_HTT;
            edx.value = e.edx & LEAF1_EDX_HTT;
            (
                Masked::none(),
                Masked::all(e.ebx),
                Masked::and(e.ecx, LEAF1_ECX_DYNAMIC),
                edx,
            )
        }
        (0x4, _) => (
            Masked::bits(e.eax, LEAF4_EAX_CORES),
            Masked::none(),
            Masked::none(),
            Masked::none(),
        ),
        (0x7, 0) => (
            Masked::none(),
            Masked::and(e.ebx, 0),
            Masked::and(e.ecx, LEAF7_ECX_DYNAMIC),
            Masked::and(e.edx, 0),
        ),
        (0x7, 1) => (
            Masked::and(e.eax, 0),
            Masked::none(),
            Masked::none(),
            Masked::none(),
        ),
        (0xb, _) | (0x1f, _) | (0x8000_001e, _) | (0x8000_0002..=0x8000_0004, _) => (
            Masked::all(e.eax),
            Masked::all(e.ebx),
            Masked::all(e.ecx),
            Masked::all(e.edx),
        ),
        (0x8000_0001, _) => (
            Masked::none(),
            Masked::none(),
            Masked::and(e.ecx, 0),
            Masked::and(e.edx, 0),
        ),
        (0x8000_0008, _) => (
            Masked::none(),
            Masked::none(),
            Masked::all(e.ecx),
            Masked::none(),
        ),
        _ => return None,
    };
    Some(CpuidOverride {
        function: e.function,
        index: e.index,
        // Topology leaves differ per subleaf; leaf 7 has unrelated subleaves.
        subleaf_specific: indexed || matches!(e.function, 0x4 | 0x7 | 0xb | 0x1f),
        eax,
        ebx,
        ecx,
        edx,
    })
}

fn entry(function: u32, index: u32, indexed: bool, r: CpuidResult) -> CpuIdEntry {
    CpuIdEntry {
        function,
        index,
        flags: if indexed {
            CPUID_FLAG_SIGNIFICANT_INDEX
        } else {
            0
        },
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// The host's values for the leaves [`override_for`] consumes (plus leaf 0 and the
/// extended maximum so the VMM can tell the vendor and range), read with `cpuid`.
///
/// Per-CPU values are neutralized as KVM's supported CPUID does: APIC IDs are 0 and
/// OSXSAVE is clear; the hypervisor bit is set, as every MSHV guest runs under one.
pub fn host_cpuid() -> Vec<CpuIdEntry> {
    host_cpuid_with(__cpuid_count)
}

/// [`host_cpuid`] over any `cpuid` implementation (tests feed a fake one).
pub fn host_cpuid_with(cpuid: impl Fn(u32, u32) -> CpuidResult) -> Vec<CpuIdEntry> {
    let mut out = Vec::new();
    let max_basic = cpuid(0, 0).eax;
    let max_ext = cpuid(0x8000_0000, 0).eax;

    for leaf in [0x0, 0x1, 0x4, 0x7, 0xb, 0x1f] {
        if leaf > max_basic {
            continue;
        }
        match leaf {
            0x4 => {
                // Cache levels until the "no more caches" type 0.
                for sub in 0..16 {
                    let r = cpuid(leaf, sub);
                    if r.eax & 0x1f == 0 {
                        break;
                    }
                    out.push(entry(leaf, sub, true, r));
                }
            }
            0x7 => {
                let max_sub = cpuid(leaf, 0).eax.min(8);
                for sub in 0..=max_sub {
                    out.push(entry(leaf, sub, true, cpuid(leaf, sub)));
                }
            }
            0xb | 0x1f => {
                // Topology levels, including the terminating invalid level.
                for sub in 0..8 {
                    let mut r = cpuid(leaf, sub);
                    r.edx = 0; // x2APIC ID of the CPU we happen to run on
                    let last = (r.ecx >> 8) & 0xff == 0;
                    out.push(entry(leaf, sub, true, r));
                    if last {
                        break;
                    }
                }
            }
            _ => {
                let mut r = cpuid(leaf, 0);
                if leaf == 1 {
                    r.ebx &= 0x00ff_ffff; // initial APIC ID
                    r.ecx &= !LEAF1_ECX_DYNAMIC;
                    r.ecx |= LEAF1_ECX_HYPERVISOR;
                }
                out.push(entry(leaf, 0, false, r));
            }
        }
    }

    if max_ext >= 0x8000_0000 {
        for leaf in [
            0x8000_0000,
            0x8000_0001,
            0x8000_0002,
            0x8000_0003,
            0x8000_0004,
            0x8000_0008,
            0x8000_001e,
        ] {
            if leaf <= max_ext {
                out.push(entry(leaf, 0, false, cpuid(leaf, 0)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, flags: u32, regs: [u32; 4]) -> CpuIdEntry {
        CpuIdEntry {
            function,
            index,
            flags,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
        }
    }

    #[test]
    fn features_can_only_be_hidden() {
        // The VMM hides ECX bit 26 (XSAVE) and claims bit 5 (VMX) the hypervisor lacks.
        let vmm_ecx = !(1 << 26);
        let o = override_for(&e(1, 0, 0, [0, 0x0203_0800, vmm_ecx, !0])).unwrap();
        let hv_ecx = !(1u32 << 5); // everything but VMX
        let seen = o.ecx.apply(hv_ecx);
        assert_eq!(seen & (1 << 26), 0, "hidden feature must stay hidden");
        assert_eq!(
            seen & (1 << 5),
            0,
            "a feature the hypervisor lacks must not appear"
        );
        assert_ne!(seen & (1 << 20), 0, "other features pass through");
        // OSXSAVE follows the hypervisor even though the VMM cleared it.
        let o = override_for(&e(1, 0, 0, [0, 0, 0, 0])).unwrap();
        assert_eq!(o.ecx.apply(LEAF1_ECX_DYNAMIC), LEAF1_ECX_DYNAMIC);
        // EBX (APIC ID, logical count) is the VMM's, whatever the hypervisor says.
        let o = override_for(&e(1, 0, 0, [0, 0x0203_0800, 0, 0])).unwrap();
        assert_eq!(o.ebx.apply(0xffff_ffff), 0x0203_0800);
        assert_eq!(
            o.eax.apply(0x000a_06a4),
            0x000a_06a4,
            "family/model untouched"
        );
    }

    #[test]
    fn htt_is_topology_and_apic_bit_is_dynamic() {
        // VMM: one vCPU, HTT clear; hypervisor says HTT and APIC.
        let o = override_for(&e(1, 0, 0, [0, 0, 0, !LEAF1_EDX_HTT & !LEAF1_EDX_DYNAMIC])).unwrap();
        let seen = o.edx.apply(!0);
        assert_eq!(seen & LEAF1_EDX_HTT, 0);
        assert_ne!(seen & LEAF1_EDX_DYNAMIC, 0);
        // VMM: several vCPUs, HTT set though the hypervisor had it clear.
        let o = override_for(&e(1, 0, 0, [0, 0, 0, LEAF1_EDX_HTT])).unwrap();
        assert_ne!(o.edx.apply(0) & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn topology_leaves_are_taken_whole_and_per_subleaf() {
        let regs = [1, 2, 0x201, 7];
        for function in [0xb, 0x1f] {
            let o = override_for(&e(function, 1, CPUID_FLAG_SIGNIFICANT_INDEX, regs)).unwrap();
            assert!(o.subleaf_specific);
            assert_eq!(
                [
                    o.eax.apply(9),
                    o.ebx.apply(9),
                    o.ecx.apply(9),
                    o.edx.apply(9)
                ],
                regs
            );
        }
        // Even without the flag, 0xb differs per subleaf.
        assert!(override_for(&e(0xb, 0, 0, regs)).unwrap().subleaf_specific);
        // Leaf 4: only the core count.
        let o = override_for(&e(
            4,
            0,
            CPUID_FLAG_SIGNIFICANT_INDEX,
            [(3 << 26) | 0x121, 0, 0, 0],
        ))
        .unwrap();
        assert_eq!(o.eax.apply(0x0000_4121), (3 << 26) | 0x4121);
        // Brand string.
        let o = override_for(&e(0x8000_0002, 0, 0, [0x6c65_746e, 1, 2, 3])).unwrap();
        assert_eq!(o.eax.apply(0), 0x6c65_746e);
        assert!(!o.subleaf_specific);
    }

    #[test]
    fn hypervisor_owned_leaves_are_skipped() {
        for function in [
            0x0,
            0x2,
            0xd,
            0x4000_0000,
            0x4000_0001,
            0x8000_0000,
            0x8000_0005,
        ] {
            assert_eq!(
                override_for(&e(function, 0, 0, [1, 2, 3, 4])),
                None,
                "{function:#x}"
            );
        }
        // Leaf 7 subleaves other than 0 and 1 are left alone.
        assert_eq!(
            override_for(&e(7, 2, CPUID_FLAG_SIGNIFICANT_INDEX, [1, 2, 3, 4])),
            None
        );
        // 7.0 intersects and keeps OSPKE dynamic.
        let o = override_for(&e(
            7,
            0,
            CPUID_FLAG_SIGNIFICANT_INDEX,
            [0, !(1 << 16), 0, !0],
        ))
        .unwrap();
        assert_eq!(o.ebx.apply(!0) & (1 << 16), 0);
        assert_eq!(o.ecx.apply(LEAF7_ECX_DYNAMIC), LEAF7_ECX_DYNAMIC);
        assert_eq!(o.eax, Masked::none());
    }

    fn fake_cpuid(leaf: u32, sub: u32) -> CpuidResult {
        let r = |eax, ebx, ecx, edx| CpuidResult { eax, ebx, ecx, edx };
        match (leaf, sub) {
            (0, _) => r(0xb, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            (1, _) => r(0x906a4, 0x0510_0800, LEAF1_ECX_DYNAMIC | 1, 1),
            (4, 0..=2) => r(0x121 + sub, 0, 0, 0),
            (4, _) => r(0, 0, 0, 0),
            (7, 0) => r(1, 0xff, 0, 0),
            (7, 1) => r(0x10, 0, 0, 0),
            (0xb, 0) => r(1, 2, 0x100, 5),
            (0xb, 1) => r(4, 8, 0x201, 5),
            (0xb, _) => r(0, 0, sub, 5),
            (0x8000_0000, _) => r(0x8000_0008, 0, 0, 0),
            _ => r(leaf, sub, 0, 0),
        }
    }

    #[test]
    fn host_cpuid_enumerates_subleaves_and_neutralizes_ids() {
        let t = host_cpuid_with(fake_cpuid);
        let find = |f: u32, i: u32| t.iter().find(|e| e.function == f && e.index == i).copied();
        let l1 = find(1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 0, "APIC ID cleared");
        assert_eq!(l1.ebx & 0xff_ffff, 0x10_0800, "rest of EBX kept");
        assert_eq!(l1.ecx & LEAF1_ECX_DYNAMIC, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        // Three cache levels, no terminator.
        assert_eq!(t.iter().filter(|e| e.function == 4).count(), 3);
        // Leaf 7 subleaves 0 and 1, flagged as indexed.
        assert!(find(7, 1).unwrap().flags & CPUID_FLAG_SIGNIFICANT_INDEX != 0);
        assert!(find(7, 2).is_none());
        // Topology: SMT, core, then the invalid terminator; x2APIC IDs cleared.
        assert_eq!(t.iter().filter(|e| e.function == 0xb).count(), 3);
        assert!(t.iter().filter(|e| e.function == 0xb).all(|e| e.edx == 0));
        // 0x1f is above the fake's maximum basic leaf (0xb); 0x8000_001e above its extended.
        assert!(find(0x1f, 0).is_none());
        assert!(find(0x8000_001e, 0).is_none());
        for f in [0x8000_0000, 0x8000_0001, 0x8000_0004, 0x8000_0008] {
            assert!(find(f, 0).is_some(), "{f:#x}");
        }
    }

    #[test]
    fn host_cpuid_runs_on_this_machine() {
        let t = host_cpuid();
        assert!(t.iter().any(|e| e.function == 0));
        let l1 = t.iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 0);
    }
}
