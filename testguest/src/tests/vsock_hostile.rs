//! virtio-vsock, the hostile way: malformed packets and rings. After each case the guest
//! looks at what came back for a while (an RST, nothing, DEVICE_NEEDS_RESET), then resets
//! the device and checks it works again (a connection to a closed host port is refused with
//! RST). The VMM staying up shows in the guest reaching its `end` line.

use crate::boot::GUARD;
use crate::cmdline::Cmdline;
use crate::dma::Pool;
use crate::println;
use crate::report::{Summary, Test};
use crate::time::Clock;
use crate::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{status, Transport};
use crate::vsock::*;

const OUTSIDE: u64 = 0x40_0000_0000;
const LOCAL: u32 = 61_000;
const CLOSED: u32 = 5999;

/// What the device did within the observation window.
#[derive(Clone, Copy, Default)]
struct Seen {
    /// Transmit descriptors the device returned (it took the packet, maybe to drop it).
    tx_returned: u32,
    /// RSTs addressed to our port.
    rst: u32,
    /// Other packets addressed to our port.
    other: u32,
    needs_reset: bool,
    /// The device wrote guest memory it was not given (or not given for writing).
    overwrote: bool,
}

impl Seen {
    fn describe(&self) -> &'static str {
        if self.overwrote {
            return "overwrote_memory";
        }
        match (
            self.needs_reset,
            self.rst > 0,
            self.other > 0,
            self.tx_returned > 0,
        ) {
            (true, ..) => "needs_reset",
            (_, true, _, _) => "rst",
            (_, _, true, _) => "answered",
            (_, _, _, true) => "dropped",
            _ => "nothing",
        }
    }
}

struct Ctx<'a> {
    t: Transport,
    pool: &'a mut Pool,
    clock: &'a Clock,
    mark: u64,
    ram_end: u64,
}

impl Ctx<'_> {
    fn vsock(&mut self) -> Result<Vsock, &'static str> {
        self.pool.release(self.mark);
        Vsock::init(self.t, self.pool)
    }

    /// Watches the queues for `ms` milliseconds.
    fn observe(&self, v: &mut Vsock, ms: u64) -> Seen {
        let mut seen = Seen::default();
        let until = self.clock.deadline(ms);
        let tx_before = v.tx.in_flight();
        while !until.passed() {
            while let Some(p) = v.recv() {
                if p.h.dst_port == LOCAL {
                    if p.h.op == OP_RST {
                        seen.rst += 1;
                    } else {
                        seen.other += 1;
                    }
                }
                v.release(p);
            }
        }
        // Transmit slots the device gave back.
        let _ = v.tx.in_flight();
        seen.tx_returned = u32::from(tx_before.saturating_sub(v.tx.in_flight_after_reclaim()));
        seen.needs_reset = self.t.status() & status::NEEDS_RESET != 0;
        seen
    }
}

fn header(v: &Vsock, op: u16) -> Header {
    Header {
        src_cid: v.cid,
        dst_cid: HOST_CID,
        src_port: LOCAL,
        dst_port: CLOSED,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 65536,
        ..Header::default()
    }
}

/// Sends a packet whose header is `h` (len as given) followed by `payload` bytes, in one
/// descriptor of `desc_len` bytes.
fn packet(cx: &mut Ctx, h: Header, payload: usize, desc_len: u32) -> Seen {
    packet_flags(cx, h, payload, desc_len, 0)
}

fn packet_flags(cx: &mut Ctx, h: Header, payload: usize, desc_len: u32, flags: u16) -> Seen {
    let Ok(mut v) = cx.vsock() else {
        return setup_failed();
    };
    v.send_raw(None, desc_len, flags, 0, |r| {
        h.write(r);
        r.sub(HDR, payload).fill(0x5a);
    });
    cx.observe(&mut v, 300)
}

fn setup_failed() -> Seen {
    Seen {
        other: u32::MAX,
        ..Seen::default()
    }
}

/// A raw transmit descriptor (`addr`, `len`, `flags`, `next`).
fn raw_tx(cx: &mut Ctx, addr: u64, len: u32, flags: u16, next: u16) -> Seen {
    let Ok(mut v) = cx.vsock() else {
        return setup_failed();
    };
    v.send_raw(Some(addr), len, flags, next, |_| {});
    cx.observe(&mut v, 300)
}

/// Replaces every receive buffer with `(addr(i), len, flags)`, then provokes an RST for us.
/// The device may skip the bad buffers (our driver then puts good ones back, so the RST
/// arrives after all) or ask for a reset; what it must not do is write where it may not:
/// `allowed(offset)` says which bytes of the guard at the top of RAM it may change.
fn bad_rx(
    cx: &mut Ctx,
    addr: impl Fn(u16) -> u64,
    len: u32,
    flags: u16,
    allowed: impl Fn(usize) -> bool,
) -> Seen {
    let guard = crate::dma::Region {
        addr: cx.ram_end - GUARD,
        len: 64 * 4096,
    };
    guard.fill(0);
    let Ok(mut v) = cx.vsock() else {
        return setup_failed();
    };
    // The device holds the 64 original buffers; rewriting their descriptors makes them bad.
    for i in 0..64u16 {
        v.rx.set_desc(i, addr(i), len, flags, 0);
    }
    let h = header(&v, OP_REQUEST);
    let d = cx.clock.deadline(500);
    let _ = v.send(&h, 0, d, |_| {});
    let mut seen = cx.observe(&mut v, 300);
    if (0..guard.len).any(|o| !allowed(o) && guard.read8(o) != 0) {
        seen.overwrote = true;
    }
    seen
}

type CaseFn = fn(&mut Ctx) -> Seen;

/// Name, accepted outcomes (as `Seen::describe` words), the case.
const CASES: &[(&str, &[&str], CaseFn)] = &[
    ("header_short", &["dropped", "needs_reset"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = header(&v, OP_REQUEST);
        packet(cx, h, 0, 10)
    }),
    (
        "len_beyond_chain",
        &["dropped", "rst", "needs_reset"],
        |cx| {
            let Ok(v) = cx.vsock() else {
                return setup_failed();
            };
            let h = Header {
                len: 4000,
                ..header(&v, OP_RW)
            };
            packet(cx, h, 10, (HDR + 10) as u32)
        },
    ),
    ("len_huge", &["dropped", "rst", "needs_reset"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = Header {
            len: u32::MAX,
            ..header(&v, OP_RW)
        };
        packet(cx, h, 4096, (HDR + 4096) as u32)
    }),
    ("spoofed_source_cid", &["dropped", "nothing"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = Header {
            src_cid: 99,
            ..header(&v, OP_REQUEST)
        };
        packet(cx, h, 0, HDR as u32)
    }),
    ("destination_not_host", &["dropped", "nothing"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = Header {
            dst_cid: 77,
            ..header(&v, OP_REQUEST)
        };
        packet(cx, h, 0, HDR as u32)
    }),
    ("wrong_socket_type", &["rst"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = Header {
            type_: 2,
            ..header(&v, OP_REQUEST)
        };
        packet(cx, h, 0, HDR as u32)
    }),
    ("unknown_op", &["rst"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = header(&v, 99);
        packet(cx, h, 0, HDR as u32)
    }),
    ("data_without_connection", &["rst"], |cx| {
        let Ok(v) = cx.vsock() else {
            return setup_failed();
        };
        let h = Header {
            len: 16,
            ..header(&v, OP_RW)
        };
        packet(cx, h, 16, (HDR + 16) as u32)
    }),
    ("tx_outside_ram", &["dropped", "needs_reset"], |cx| {
        raw_tx(cx, OUTSIDE, 64, 0, 0)
    }),
    ("tx_crosses_ram_end", &["dropped", "needs_reset"], |cx| {
        let a = cx.ram_end - 20;
        raw_tx(cx, a, 64, 0, 0)
    }),
    ("tx_desc_loop", &["dropped", "needs_reset"], |cx| {
        raw_tx(cx, OUTSIDE, 64, DESC_F_NEXT, 0)
    }),
    ("tx_next_out_of_range", &["dropped", "needs_reset"], |cx| {
        raw_tx(cx, OUTSIDE, 64, DESC_F_NEXT, 0x7fff)
    }),
    (
        "tx_device_writable",
        &["dropped", "rst", "needs_reset"],
        |cx| {
            let Ok(v) = cx.vsock() else {
                return setup_failed();
            };
            let h = header(&v, OP_REQUEST);
            packet_flags(cx, h, 0, HDR as u32, DESC_F_WRITE)
        },
    ),
    ("tx_avail_idx_jump", &["needs_reset"], |cx| {
        let Ok(mut v) = cx.vsock() else {
            return setup_failed();
        };
        let jump = v.tx.next_avail().wrapping_add(v.tx.size + 7);
        v.tx.force_avail_idx(jump);
        v.tx.notify();
        cx.observe(&mut v, 300)
    }),
    (
        "rx_buffers_too_small",
        &["needs_reset", "nothing", "rst"],
        |cx| {
            let base = cx.ram_end - GUARD;
            bad_rx(
                cx,
                move |i| base + 64 * u64::from(i),
                8,
                DESC_F_WRITE,
                |o| o % 64 < 8,
            )
        },
    ),
    (
        "rx_buffers_outside_ram",
        &["needs_reset", "nothing", "rst"],
        |cx| bad_rx(cx, |_| OUTSIDE, 4096, DESC_F_WRITE, |_| false),
    ),
    (
        "rx_buffers_not_writable",
        &["needs_reset", "nothing", "rst"],
        |cx| {
            let base = cx.ram_end - GUARD;
            bad_rx(cx, move |i| base + 4096 * u64::from(i), 4096, 0, |_| false)
        },
    ),
];

/// A fresh device refuses a connection to a closed host port with RST.
fn healthy(cx: &mut Ctx) -> bool {
    let Ok(mut v) = cx.vsock() else { return false };
    let h = header(&v, OP_REQUEST);
    if v.send(&h, 0, cx.clock.deadline(500), |_| {}).is_err() {
        return false;
    }
    cx.observe(&mut v, 300).rst > 0
}

pub fn run(
    t: Transport,
    pool: &mut Pool,
    clock: &Clock,
    cmd: &Cmdline,
    ram_end: u64,
    sum: &mut Summary,
) {
    let mut test = Test::new("vsock_hostile");
    let mark = pool.mark();
    let mut cx = Ctx {
        t,
        pool,
        clock,
        mark,
        ram_end,
    };
    let only = cmd.option("case");
    let (mut ran, mut accepted) = (0, 0);
    for &(name, accept, case) in CASES {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        ran += 1;
        let seen = case(&mut cx);
        let outcome = if seen.other == u32::MAX {
            "setup_error"
        } else {
            seen.describe()
        };
        let ok = accept.contains(&outcome);
        let recovered = healthy(&mut cx);
        println!(
            "TESTGUEST vsock_hostile case={name} outcome={outcome} accepted={} recovered={}",
            u8::from(ok),
            u8::from(recovered)
        );
        accepted += u32::from(ok);
        test.check(ok, format_args!("{name}: device answered {outcome}"));
        test.check(
            recovered,
            format_args!("{name}: device does not work after a reset"),
        );
    }
    t.reset();
    cx.pool.release(mark);
    println!("TESTGUEST vsock_hostile cases={ran} accepted={accepted}");
    sum.finish(test);
}
