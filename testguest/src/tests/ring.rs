//! Ring 0 against ring 3: the same code timed in both. Under PVM ring-3 code runs natively
//! while ring-0 code outside PVM's own range is emulated one instruction at a time; this
//! test measures how much that matters for each part of a device request:
//!
//! - `loop`: a compute loop (no exits), cycles per iteration;
//! - `gate`: one ring 3 -> ring 0 -> ring 3 round trip through the #UD gate;
//! - `mmio_read`: a register read that the VMM's user space answers (an MMIO exit);
//! - `notify`: a queue-notify write, which KVM turns into an ioeventfd signal in the kernel;
//! - `blk_qd1` / `blk_qd32`: whole virtio-blk reads (describe, notify, poll the used ring).
//!
//! The guest only reports; the host test decides what must hold on its hypervisor.

use crate::arch::{in_ring0, rdtsc};
use crate::blk::{check_pattern, random_pattern_sector, Blk, Job, Req, DISK_KEY, SECTOR, S_OK};
use crate::cmdline::Cmdline;
use crate::dma::Pool;
use crate::println;
use crate::report::{Summary, Test};
use crate::tests::Rng;
use crate::time::Clock;
use crate::virtio::mmio::reg;
use crate::virtio::Transport;

fn spin(n: u64) -> u64 {
    let t0 = rdtsc();
    let mut x = 0u64;
    for i in 0..n {
        x = core::hint::black_box(x.wrapping_add(i));
    }
    core::hint::black_box(x);
    rdtsc() - t0
}

/// Cycles per call of `f`, called `n` times, in ring 3 and in ring 0.
fn both(n: u64, mut f: impl FnMut()) -> (u64, u64) {
    let mut timed = || {
        let t0 = rdtsc();
        for _ in 0..n {
            f();
        }
        (rdtsc() - t0) / n
    };
    let r3 = timed();
    let r0 = in_ring0(&mut timed);
    (r3, r0)
}

pub fn run(t: Option<Transport>, pool: &mut Pool, clock: &Clock, cmd: &Cmdline, sum: &mut Summary) {
    let mut test = Test::new("ring");

    let (n3, n0) = (200_000, 2_000);
    let c3 = spin(n3);
    let c0 = in_ring0(|| spin(n0));
    let (l3, l0) = (c3 * 100 / n3, c0 * 100 / n0);
    println!(
        "TESTGUEST ring loop ring3_centicycles_per_iter={l3} ring0_centicycles_per_iter={l0} ring0_over_ring3={}",
        l0 / l3.max(1)
    );
    test.check(c3 > 0 && c0 > 0, format_args!("loop timings are zero"));

    let n = 50;
    let t0 = rdtsc();
    for _ in 0..n {
        in_ring0(|| 0);
    }
    let gate = (rdtsc() - t0) / n;
    println!("TESTGUEST ring gate ns={}", clock.ns(gate));

    let Some(t) = t else {
        println!("TESTGUEST ring device=none");
        sum.finish(test);
        return;
    };
    let (r3, r0) = both(200, || {
        core::hint::black_box(t.read(reg::MAGIC));
    });
    println!(
        "TESTGUEST ring mmio_read ring3_ns={} ring0_ns={}",
        clock.ns(r3),
        clock.ns(r0)
    );

    let mut blk = match Blk::init(t, pool, 256) {
        Ok(b) => b,
        Err(e) => {
            test.fail(format_args!("blk init: {e}"));
            sum.finish(test);
            return;
        }
    };
    // Notifies with nothing queued: the device's worker wakes, finds nothing, sleeps.
    let (w3, w0) = both(200, || t.write(reg::QUEUE_NOTIFY, 0));
    println!(
        "TESTGUEST ring notify ring3_ns={} ring0_ns={}",
        clock.ns(w3),
        clock.ns(w0)
    );

    let capacity = blk.capacity;
    let mut errors = 0u64;
    let mut qd_run = |blk: &mut Blk, qd: usize, ms: u64, seed: u64| {
        let mut rng = Rng::new(seed);
        let offsets = [const { core::cell::Cell::new(0u64) }; crate::blk::SLOTS];
        let mut bad = 0u64;
        let r = blk.run(
            &mut Job {
                queue: 0,
                qd,
                total: u64::MAX,
                until: Some(clock.deadline(ms)),
                make: &mut |_, slot, _| {
                    let sector = random_pattern_sector(&mut rng, capacity);
                    offsets[slot].set(sector * SECTOR);
                    Req {
                        kind: crate::blk::T_IN,
                        sector,
                        len: 4096,
                    }
                },
                done: &mut |_, slot, data, status| {
                    let ok = status == S_OK
                        && check_pattern(data, 4096, offsets[slot].get(), DISK_KEY, 64).is_none();
                    bad += u64::from(!ok);
                    ok
                },
                stall_ms: 5000,
            },
            clock,
        );
        match r {
            Ok(st) if st.ops > 0 => {
                errors += bad;
                (st.ops, st.cycles)
            }
            _ => {
                errors += 1;
                (0, 1)
            }
        }
    };
    let ms = cmd.num("ring_ms", 200);
    let seed = cmd.num("seed", 7);
    for qd in [1usize, 32] {
        let (o3, c3) = qd_run(&mut blk, qd, ms, seed);
        let (o0, c0) = in_ring0_pair(|| qd_run(&mut blk, qd, ms, seed + 1));
        println!(
            "TESTGUEST ring blk_qd{qd} ring3_iops={} ring0_iops={} ring3_us_per_op={} ring0_us_per_op={} ring3_ops={o3} ring0_ops={o0}",
            clock.per_sec(o3, c3),
            clock.per_sec(o0, c0),
            clock.ns(c3 / o3.max(1)) / 1000,
            clock.ns(c0 / o0.max(1)) / 1000,
        );
    }
    test.check(errors == 0, format_args!("{errors} blk reads failed"));
    sum.finish(test);
}

/// [`in_ring0`] for a closure returning two numbers.
fn in_ring0_pair(mut f: impl FnMut() -> (u64, u64)) -> (u64, u64) {
    let mut second = 0;
    let first = in_ring0(|| {
        let (a, b) = f();
        second = b;
        a
    });
    (first, second)
}
