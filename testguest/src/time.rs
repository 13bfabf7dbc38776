//! Time from the TSC. Its frequency comes from KVM's paravirtual clock (kvm-clock: KVM
//! writes the TSC-to-nanoseconds scale into guest memory, exactly what Linux uses), or, where
//! that is missing, from a PIT where the VMM has one (podvmm has none), or from CPUID.

use core::arch::asm;

use crate::arch::{in_ring0, inb, outb, rdtsc};
use crate::dma::Pool;

/// `MSR_KVM_SYSTEM_TIME_NEW`: the guest address of a `pvclock_vcpu_time_info`, bit 0 enables.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// The TSC frequency KVM's pvclock states, if the hypervisor offers kvm-clock.
fn kvmclock_khz(pool: &mut Pool) -> Option<u64> {
    let sig = core::arch::x86_64::__cpuid(0x4000_0000);
    if (sig.ebx, sig.ecx, sig.edx) != (0x4b4d_564b, 0x564b_4d56, 0x4d) || sig.eax < 0x4000_0001 {
        return None;
    }
    if core::arch::x86_64::__cpuid(0x4000_0001).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let mark = pool.mark();
    let info = pool.alloc(64, 64);
    let wrmsr = |v: u64| {
        in_ring0(|| {
            // SAFETY: the kvm-clock MSR only makes KVM write 32 bytes at `info` (ours, from
            // the pool) until it is written again with 0; ring 0, where wrmsr is allowed.
            unsafe {
                asm!("wrmsr", in("ecx") MSR_KVM_SYSTEM_TIME_NEW, in("eax") v as u32,
                     in("edx") (v >> 32) as u32, options(nostack))
            };
            0
        })
    };
    wrmsr(info.addr | 1);
    let (mul, shift) = (info.read32(24), info.read8(28) as i8);
    wrmsr(0);
    pool.release(mark);
    if mul == 0 {
        return None;
    }
    let khz = (1_000_000u64 << 32) / u64::from(mul);
    Some(if shift < 0 {
        khz << -shift
    } else {
        khz >> shift
    })
}

const PIT_HZ: u64 = 1_193_182;
/// One calibration window: 10 ms in PIT ticks (fits the 16-bit counter).
const PIT_TICKS: u64 = PIT_HZ / 100;
const ROUNDS: usize = 5;

#[derive(Clone, Copy)]
pub struct Clock {
    pub tsc_khz: u64,
    pub source: &'static str,
}

/// TSC cycles during `PIT_TICKS` ticks of PIT channel 2 (mode 0), or 0 if the channel
/// never fired. Runs in ring 0, where port I/O is allowed. The TSC is read before the
/// write that starts the count and after the poll that sees it end, so a vCPU preempted
/// on the host can only make a round longer: the shortest of a few rounds is the truth.
fn pit_cycles() -> u64 {
    in_ring0(|| {
        let speaker = inb(0x61);
        if speaker == 0xff {
            // Nothing at port 0x61: the bus floats high, and would look like a count that
            // ended at once.
            return 0;
        }
        outb(0x61, (speaker & !0x02) | 0x01); // speaker off, gate 2 on
        let mut best = u64::MAX;
        for _ in 0..ROUNDS {
            outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
            outb(0x42, (PIT_TICKS & 0xff) as u8);
            let t0 = rdtsc();
            outb(0x42, (PIT_TICKS >> 8) as u8);
            let mut spins = 0u64;
            while inb(0x61) & 0x20 == 0 {
                spins += 1;
                if spins > 10_000_000 {
                    return 0;
                }
            }
            best = best.min(rdtsc() - t0);
        }
        best
    })
}

/// The TSC frequency from CPUID leaf 0x15 or 0x16, where the hypervisor passes them on.
fn cpuid_khz() -> Option<u64> {
    let max = core::arch::x86_64::__cpuid(0).eax;
    if max >= 0x15 {
        let l = core::arch::x86_64::__cpuid(0x15);
        if l.eax != 0 && l.ebx != 0 && l.ecx != 0 {
            return Some(u64::from(l.ecx) * u64::from(l.ebx) / u64::from(l.eax) / 1000);
        }
    }
    if max >= 0x16 {
        let l = core::arch::x86_64::__cpuid(0x16);
        if l.eax != 0 {
            return Some(u64::from(l.eax) * 1000);
        }
    }
    None
}

impl Clock {
    /// A clock for time-outs only, before calibration: CPUID's figure, or 3 GHz.
    pub fn rough() -> Clock {
        Clock {
            tsc_khz: cpuid_khz().unwrap_or(3_000_000),
            source: "rough",
        }
    }

    pub fn calibrate(pool: &mut Pool) -> Clock {
        if let Some(khz) = kvmclock_khz(pool) {
            return Clock {
                tsc_khz: khz,
                source: "kvmclock",
            };
        }
        let cycles = pit_cycles();
        if cycles > 0 {
            return Clock {
                tsc_khz: cycles * PIT_HZ / PIT_TICKS / 1000,
                source: "pit",
            };
        }
        match cpuid_khz() {
            Some(khz) => Clock {
                tsc_khz: khz,
                source: "cpuid",
            },
            None => Clock {
                tsc_khz: 2_000_000,
                source: "guessed",
            },
        }
    }

    pub fn cycles(&self, ms: u64) -> u64 {
        ms * self.tsc_khz
    }

    pub fn ns(&self, cycles: u64) -> u64 {
        (u128::from(cycles) * 1_000_000 / u128::from(self.tsc_khz.max(1))) as u64
    }

    /// `count` events in `cycles`, per second.
    pub fn per_sec(&self, count: u64, cycles: u64) -> u64 {
        (u128::from(count) * u128::from(self.tsc_khz) * 1000 / u128::from(cycles.max(1))) as u64
    }

    pub fn deadline(&self, ms: u64) -> Deadline {
        Deadline(rdtsc() + self.cycles(ms))
    }
}

#[derive(Clone, Copy)]
pub struct Deadline(u64);

impl Deadline {
    pub fn passed(&self) -> bool {
        rdtsc() > self.0
    }
}
