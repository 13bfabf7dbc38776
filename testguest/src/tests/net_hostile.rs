//! virtio-net, the hostile way: malformed transmit chains and receive buffers. After each
//! case the guest watches what happens (frames dropped, DEVICE_NEEDS_RESET), checks that no
//! memory it did not offer for writing changed, resets the device and checks it works again
//! (the host answers an ARP request). Needs `testguest.net_ip` and `testguest.net_host`.

use crate::boot::GUARD;
use crate::cmdline::Cmdline;
use crate::dma::{Pool, Region};
use crate::net::{Net, VNET_HDR};
use crate::println;
use crate::report::{Summary, Test};
use crate::tests::net::{arp, classify, parse_ip, Got, Link};
use crate::time::Clock;
use crate::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{status, Transport};

const OUTSIDE: u64 = 0x40_0000_0000;

struct Ctx<'a> {
    t: Transport,
    pool: &'a mut Pool,
    clock: &'a Clock,
    mark: u64,
    ram_end: u64,
    ip: [u8; 4],
    host_ip: [u8; 4],
}

impl Ctx<'_> {
    fn net(&mut self) -> Option<(Net, Link)> {
        self.pool.release(self.mark);
        let net = Net::init(self.t, self.pool).ok()?;
        let link = Link {
            mac: net.mac,
            ip: self.ip,
            host_ip: self.host_ip,
            host_mac: [0; 6],
            arp_answered: 0,
            ignored: 0,
        };
        Some((net, link))
    }

    fn guard(&self) -> Region {
        Region {
            addr: self.ram_end - GUARD,
            len: 64 * 4096,
        }
    }

    /// Sends ARP requests for the host for `ms` ms; true once one is answered.
    fn arp_answered(&self, net: &mut Net, link: &mut Link, ms: u64) -> bool {
        let until = self.clock.deadline(ms);
        while !until.passed() {
            let l = &*link;
            let host_ip = l.host_ip;
            if net
                .send(42, until, |r| arp(r, l, 1, [0; 6], host_ip, [0xff; 6]))
                .is_err()
            {
                return false;
            }
            let retry = self.clock.deadline(100);
            while !retry.passed() {
                let Some(f) = net.recv() else { continue };
                let got = classify(net, link, &f, until);
                net.release(f);
                if let Ok(Got::ArpReply(_)) = got {
                    return true;
                }
            }
        }
        false
    }

    /// What became of the case: the device's status, then whether it still forwards frames.
    fn outcome(&self, net: &mut Net, link: &mut Link, tx_sent: bool) -> &'static str {
        let settle = self.clock.deadline(100);
        while !settle.passed() {
            if let Some(f) = net.recv() {
                net.release(f);
            }
        }
        if self.t.status() & status::NEEDS_RESET != 0 {
            return "needs_reset";
        }
        if tx_sent && net.tx_in_flight() > 0 {
            return "stuck";
        }
        if self.arp_answered(net, link, 500) {
            "dropped_and_working"
        } else {
            "not_working"
        }
    }
}

fn raw_tx(
    cx: &mut Ctx,
    addr: Option<u64>,
    len: u32,
    flags: u16,
    next: u16,
    build: impl FnOnce(Region),
) -> &'static str {
    let Some((mut net, mut link)) = cx.net() else {
        return "setup_error";
    };
    net.send_raw(addr, len, flags, next, build);
    cx.outcome(&mut net, &mut link, true)
}

/// Replaces every receive buffer with `(addr(i), len, flags)` and provokes a frame from the
/// host; `allowed(offset)` says which guard bytes the device may write.
fn bad_rx(
    cx: &mut Ctx,
    addr: impl Fn(u16) -> u64,
    len: u32,
    flags: u16,
    allowed: impl Fn(usize) -> bool,
) -> &'static str {
    let guard = cx.guard();
    guard.fill(0);
    let Some((mut net, mut link)) = cx.net() else {
        return "setup_error";
    };
    for i in 0..64u16 {
        net.set_rx_desc(i, addr(i), len, flags);
    }
    let outcome = cx.outcome(&mut net, &mut link, false);
    if (0..guard.len).any(|o| !allowed(o) && guard.read8(o) != 0) {
        return "overwrote_memory";
    }
    outcome
}

/// A frame with a valid virtio header and `frame` bytes of a broadcast Ethernet frame.
fn frame(r: Region, frame: usize) {
    r.sub(0, VNET_HDR).fill(0);
    let f = r.sub(VNET_HDR, frame.min(r.len - VNET_HDR));
    f.fill(0xff);
}

type CaseFn = fn(&mut Ctx) -> &'static str;

const OK: &[&str] = &["dropped_and_working", "needs_reset"];

const CASES: &[(&str, &[&str], CaseFn)] = &[
    ("header_only", OK, |cx| {
        raw_tx(cx, None, VNET_HDR as u32, 0, 0, |r| frame(r, 0))
    }),
    ("runt_frame", OK, |cx| {
        raw_tx(cx, None, (VNET_HDR + 5) as u32, 0, 0, |r| frame(r, 5))
    }),
    ("frame_too_long", OK, |cx| {
        let g = cx.guard();
        g.fill(0xff);
        g.sub(0, VNET_HDR).fill(0);
        raw_tx(cx, Some(g.addr), 65_000, 0, 0, |_| {})
    }),
    ("bad_gso_header", OK, |cx| {
        raw_tx(cx, None, (VNET_HDR + 60) as u32, 0, 0, |r| {
            frame(r, 60);
            r.write8(1, 1); // gso_type TCPV4, never negotiated
            r.write16(4, 1448);
        })
    }),
    ("tx_outside_ram", OK, |cx| {
        raw_tx(cx, Some(OUTSIDE), 64, 0, 0, |_| {})
    }),
    ("tx_crosses_ram_end", OK, |cx| {
        let a = cx.ram_end - 20;
        raw_tx(cx, Some(a), 64, 0, 0, |_| {})
    }),
    ("tx_desc_loop", OK, |cx| {
        raw_tx(cx, None, 64, DESC_F_NEXT, 0, |r| frame(r, 52))
    }),
    ("tx_next_out_of_range", OK, |cx| {
        raw_tx(cx, None, 64, DESC_F_NEXT, 0x7fff, |r| frame(r, 52))
    }),
    ("tx_device_writable", OK, |cx| {
        raw_tx(cx, None, 64, DESC_F_WRITE, 0, |r| frame(r, 52))
    }),
    ("tx_avail_idx_jump", &["needs_reset"], |cx| {
        let Some((mut net, mut link)) = cx.net() else {
            return "setup_error";
        };
        let q = net.tx_queue();
        let jump = q.next_avail().wrapping_add(q.size + 7);
        q.force_avail_idx(jump);
        q.notify();
        cx.outcome(&mut net, &mut link, false)
    }),
    (
        "rx_buffers_too_small",
        &["needs_reset", "dropped_and_working", "not_working"],
        |cx| {
            let base = cx.ram_end - GUARD;
            bad_rx(
                cx,
                move |i| base + 64 * u64::from(i),
                16,
                DESC_F_WRITE,
                |o| o % 64 < 16,
            )
        },
    ),
    (
        "rx_buffers_outside_ram",
        &["needs_reset", "dropped_and_working", "not_working"],
        |cx| bad_rx(cx, |_| OUTSIDE, 2048, DESC_F_WRITE, |_| false),
    ),
    (
        "rx_buffers_not_writable",
        &["needs_reset", "dropped_and_working", "not_working"],
        |cx| {
            let base = cx.ram_end - GUARD;
            bad_rx(cx, move |i| base + 4096 * u64::from(i), 2048, 0, |_| false)
        },
    ),
];

pub fn run(
    t: Transport,
    pool: &mut Pool,
    clock: &Clock,
    cmd: &Cmdline,
    ram_end: u64,
    sum: &mut Summary,
) {
    let mut test = Test::new("net_hostile");
    let (Some(ip), Some(host_ip)) = (
        cmd.option("net_ip").and_then(parse_ip),
        cmd.option("net_host").and_then(parse_ip),
    ) else {
        test.fail(format_args!(
            "needs testguest.net_ip= and testguest.net_host="
        ));
        return sum.finish(test);
    };
    let mark = pool.mark();
    let mut cx = Ctx {
        t,
        pool,
        clock,
        mark,
        ram_end,
        ip,
        host_ip,
    };
    let only = cmd.option("case");
    let (mut ran, mut accepted) = (0, 0);
    for &(name, accept, case) in CASES {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        ran += 1;
        let outcome = case(&mut cx);
        let ok = accept.contains(&outcome);
        let recovered = match cx.net() {
            Some((mut net, mut link)) => cx.arp_answered(&mut net, &mut link, 2000),
            None => false,
        };
        println!(
            "TESTGUEST net_hostile case={name} outcome={outcome} accepted={} recovered={}",
            u8::from(ok),
            u8::from(recovered)
        );
        accepted += u32::from(ok);
        test.check(ok, format_args!("{name}: {outcome}"));
        test.check(
            recovered,
            format_args!("{name}: device does not work after a reset"),
        );
    }
    t.reset();
    cx.pool.release(mark);
    println!("TESTGUEST net_hostile cases={ran} accepted={accepted}");
    sum.finish(test);
}
