//! podvmm's freestanding test guest: boots through PVH, drops to ring 3 and drives the
//! virtio-mmio devices podvmm announces on the command line through their real registers,
//! polling the used rings. Results go to COM1 as `TESTGUEST ...` lines (see `report`), then
//! the guest resets the machine. docs/testguest.md describes it all.
//!
//! Command-line options (besides the `virtio_mmio.device=` words):
//! - `testguest.mode=normal|hostile|fault`: polite device tests, malformed rings and
//!   requests, or a deliberate page fault in ring 3 (tests the exception path).
//! - `testguest.run=blk,ring,...`: the tests to run (default: one per device found).
//! - `testguest.blk_qd=N` (32), `testguest.blk_ms=N` (300), `testguest.blk_ops=N`,
//!   `testguest.seed=N`: the random-read figure's queue depth, duration, request count, seed.
//! - `testguest.vsock_listen=L`, `testguest.vsock_port=P`, `testguest.vsock_ms=N`,
//!   `testguest.vsock_bulk=N`, `testguest.vsock_closed_port=N`: see `tests::vsock`.
//! - `testguest.net_ip=A.B.C.D`, `testguest.net_host=A.B.C.D`, `testguest.net_ms=N`: see
//!   `tests::net`.

#![no_std]
#![no_main]

mod arch;
mod blk;
mod boot;
mod cmdline;
mod dma;
mod mem;
mod net;
mod report;
mod serial;
mod tests;
mod time;
mod virtio;
mod vsock;

use core::panic::PanicInfo;

use cmdline::Cmdline;
use report::Summary;
use virtio::Transport;

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    println!("TESTGUEST panic {info}");
    println!("TESTGUEST end status=panic");
    arch::reset()
}

/// The prebuilt `core` refers to the unwinding personality routine even though this guest
/// aborts on panic and never unwinds; this satisfies the reference.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

const MAX_DEVICES: usize = 16;
/// Not mapped by the boot page tables (they cover the low 4 GiB).
const FAULT_ADDR: u64 = 0x7_dead_b000;

/// The Rust entry, reached in ring 3 by `iretq` from the boot code; `start_info` is the
/// PVH `hvm_start_info` address.
#[no_mangle]
extern "C" fn user_main(start_info: u64) -> ! {
    let boot = match boot::parse(start_info) {
        Ok(b) => b,
        Err(e) => {
            println!("TESTGUEST fail test=boot what={e}");
            println!("TESTGUEST end status=fail passed=0 failed=1");
            arch::reset()
        }
    };
    let cmd = Cmdline(boot.cmdline);
    let mode = cmd.option("mode").unwrap_or("normal");
    let mut sum = Summary::default();
    let mut pool = boot.pool();

    // Find the devices (quietly: printing costs time, and the vsock phase below is timed).
    let mut devices: [Option<Transport>; MAX_DEVICES] = [None; MAX_DEVICES];
    let mut probe_errors: [Option<&'static str>; MAX_DEVICES] = [None; MAX_DEVICES];
    for (i, d) in cmd.mmio_devices().enumerate().take(MAX_DEVICES) {
        match d
            .map_err(|_| "malformed virtio_mmio.device")
            .and_then(|d| Transport::probe(&d))
        {
            Ok(t) => devices[i] = Some(t),
            Err(e) => probe_errors[i] = Some(e),
        }
    }
    let find = |ty: u32| {
        devices
            .iter()
            .flatten()
            .copied()
            .find(|t| t.device_id() == ty)
    };
    let (blk, vsock) = (find(virtio::TYPE_BLOCK), find(virtio::TYPE_VSOCK));

    // A host program may be waiting to talk to us over vsock: answer it first.
    let early_vsock = match (
        mode,
        vsock,
        cmd.option("vsock_listen").and_then(cmdline::parse_num),
    ) {
        ("normal", Some(t), Some(port)) => Some(tests::vsock::listen_phase(
            t,
            &mut pool,
            &time::Clock::rough(),
            port as u32,
        )),
        _ => None,
    };

    let clock = time::Clock::calibrate(&mut pool);
    let mut count = 0;
    for i in 0..MAX_DEVICES {
        if let Some(t) = devices[i] {
            println!(
                "TESTGUEST device index={i} base={:#x} irq={} type={} id={} vendor={:#x}",
                t.base(),
                t.irq,
                virtio::type_name(t.device_id()),
                t.device_id(),
                t.vendor_id()
            );
            count += 1;
        }
        if let Some(e) = probe_errors[i] {
            println!("TESTGUEST fail test=probe what=device {i}: {e}");
            sum.failed += 1;
        }
    }
    println!(
        "TESTGUEST start tsc_khz={} clock={} ram_mib={} mode={mode} devices={count} cpl={}",
        clock.tsc_khz,
        clock.source,
        boot.ram_end >> 20,
        arch::cpl()
    );

    match mode {
        "normal" => {
            if cmd.lists("run", "blk", blk.is_some()) {
                match blk {
                    Some(t) => tests::blk::run(t, &mut pool, &clock, &cmd, &mut sum),
                    None => sum.skip("blk", "no-virtio-blk-device"),
                }
            }
            if cmd.lists("run", "ring", false) {
                tests::ring::run(blk, &mut pool, &clock, &cmd, &mut sum);
            }
            if cmd.lists("run", "vsock", vsock.is_some()) {
                match vsock {
                    Some(t) => tests::vsock::run(t, early_vsock, &mut pool, &clock, &cmd, &mut sum),
                    None => sum.skip("vsock", "no-virtio-vsock-device"),
                }
            }
            let net = find(virtio::TYPE_NET);
            if cmd.lists("run", "net", net.is_some()) {
                match net {
                    Some(t) => tests::net::run(t, &mut pool, &clock, &cmd, &mut sum),
                    None => sum.skip("net", "no-virtio-net-device"),
                }
            }
        }
        "hostile" => {
            if cmd.lists("run", "blk", blk.is_some()) {
                match blk {
                    Some(t) => {
                        tests::blk_hostile::run(t, &mut pool, &clock, &cmd, boot.ram_end, &mut sum)
                    }
                    None => sum.skip("blk_hostile", "no-virtio-blk-device"),
                }
            }
            if cmd.lists("run", "vsock", vsock.is_some()) {
                match vsock {
                    Some(t) => tests::vsock_hostile::run(
                        t,
                        &mut pool,
                        &clock,
                        &cmd,
                        boot.ram_end,
                        &mut sum,
                    ),
                    None => sum.skip("vsock_hostile", "no-virtio-vsock-device"),
                }
            }
            let net = find(virtio::TYPE_NET);
            if cmd.lists("run", "net", net.is_some()) {
                match net {
                    Some(t) => {
                        tests::net_hostile::run(t, &mut pool, &clock, &cmd, boot.ram_end, &mut sum)
                    }
                    None => sum.skip("net_hostile", "no-virtio-net-device"),
                }
            }
        }
        "fault" => {
            // The exception path: a ring-3 read of an unmapped address (past the 4 GiB the
            // page tables map) must end in the handler's `exception` line and a reset.
            println!("TESTGUEST fault address={FAULT_ADDR:#x}");
            // SAFETY: deliberately faults: the address is not mapped, so the read never
            // returns and no value is produced.
            let v = unsafe { core::ptr::read_volatile(FAULT_ADDR as *const u64) };
            println!("TESTGUEST fail test=fault what=read of an unmapped address returned {v:#x}");
            sum.failed += 1;
        }
        other => {
            println!("TESTGUEST fail test=mode what=unknown mode {other}");
            sum.failed += 1;
        }
    }
    sum.end();
    arch::reset()
}
