//! virtio-blk, the hostile way: malformed rings and requests, each one checked to be
//! answered with an error (or DEVICE_NEEDS_RESET, or refused at set-up), and the device
//! checked to work again after a reset. The VMM staying up is shown by this guest going on
//! to the next case and to its `end` line.
//!
//! Every case starts from a freshly reset and initialised device with new rings. Addresses a
//! wrongly accepted request could write to are outside RAM, in the MMIO hole, or in the
//! guard at the top of RAM that nothing uses (`boot::GUARD`).

use core::fmt;

use crate::blk::*;
use crate::boot::GUARD;
use crate::cmdline::Cmdline;
use crate::dma::Pool;
use crate::println;
use crate::report::{Summary, Test};
use crate::tests::Rng;
use crate::time::Clock;
use crate::virtio::mmio::reg;
use crate::virtio::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{status, Queue, Transport, F_INDIRECT_DESC, F_VERSION_1};

/// Far beyond any RAM we are given.
const OUTSIDE: u64 = 0x40_0000_0000;
const WAIT_MS: u64 = 500;

/// What the device did with a case.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The request came back with status OK (or the set-up was accepted).
    Served,
    IoErr,
    Unsupp,
    /// The chain came back but the status byte was not written (no valid status descriptor).
    NoStatus,
    /// The status register shows DEVICE_NEEDS_RESET.
    NeedsReset,
    /// The status register shows FAILED (set-up refused).
    Failed,
    /// FEATURES_OK did not stick (feature negotiation refused).
    Refused,
    /// A used element for a head we never made available.
    BadUsed,
    /// A status byte that is not a virtio-blk status.
    Garbage,
    /// No answer at all.
    Timeout,
    /// The case could not be set up (the device refused a correct initialisation).
    SetupError,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Outcome::Served => "ok",
            Outcome::IoErr => "ioerr",
            Outcome::Unsupp => "unsupp",
            Outcome::NoStatus => "no_status",
            Outcome::NeedsReset => "needs_reset",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
            Outcome::BadUsed => "bad_used",
            Outcome::Garbage => "garbage_status",
            Outcome::Timeout => "timeout",
            Outcome::SetupError => "setup_error",
        })
    }
}

use Outcome::*;

struct Ctx<'a> {
    t: Transport,
    pool: &'a mut Pool,
    clock: &'a Clock,
    ram_end: u64,
    mark: u64,
    rng: Rng,
}

impl Ctx<'_> {
    /// A freshly reset device with new rings (128 entries, so descriptor indexes are known).
    fn blk(&mut self) -> Result<Blk, &'static str> {
        self.pool.release(self.mark);
        Blk::init(self.t, self.pool, 128)
    }

    /// The guard at the top of RAM: in RAM, used by nothing.
    fn guard(&self) -> u64 {
        self.ram_end - GUARD
    }

    fn needs_reset(&self) -> bool {
        self.t.status() & status::NEEDS_RESET != 0
    }
}

/// Waits for chain `head` on queue 0 to come back, or for DEVICE_NEEDS_RESET.
fn wait(cx: &Ctx, blk: &mut Blk, head: u16) -> Outcome {
    let deadline = cx.clock.deadline(WAIT_MS);
    let mut next_status_check = cx.clock.deadline(1);
    loop {
        if let Some((id, _len)) = blk.queue(0).pop_used() {
            if id != u32::from(head) {
                return BadUsed;
            }
            return match blk.slot_status(0) {
                S_OK => Served,
                S_IOERR => IoErr,
                S_UNSUPP => Unsupp,
                S_UNSET => NoStatus,
                _ => Garbage,
            };
        }
        if next_status_check.passed() {
            if cx.needs_reset() {
                return NeedsReset;
            }
            next_status_check = cx.clock.deadline(1);
        }
        if deadline.passed() {
            return if cx.needs_reset() {
                NeedsReset
            } else {
                Timeout
            };
        }
    }
}

/// Describes descriptors 0.. as given (slot 0's header and status), makes `head` available,
/// notifies and waits.
fn chain(
    cx: &mut Ctx,
    kind: u32,
    sector: u64,
    descs: &[(u64, u32, u16, u16)],
    head: u16,
) -> Outcome {
    let Ok(mut blk) = cx.blk() else {
        return SetupError;
    };
    blk.write_header(0, kind, sector);
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        blk.queue(0).set_desc(i as u16, addr, len, flags, next);
    }
    let q = blk.queue(0);
    q.push(head);
    q.kick();
    wait(cx, &mut blk, head)
}

/// Placeholders resolved per case: slot 0's header, data buffer and status byte.
struct Slot {
    hdr: u64,
    data: u64,
    status: u64,
}

fn slot(cx: &mut Ctx) -> Slot {
    // The addresses do not change between initialisations (same pool mark, same sizes).
    let blk = cx.blk().ok();
    match blk {
        Some(b) => Slot {
            hdr: b.hdr_addr(0),
            data: b.slot_data(0).addr,
            status: b.status_addr(0),
        },
        None => Slot {
            hdr: OUTSIDE,
            data: OUTSIDE,
            status: OUTSIDE,
        },
    }
}

const N: u16 = DESC_F_NEXT;
const W: u16 = DESC_F_WRITE;
const I: u16 = DESC_F_INDIRECT;

/// A three-descriptor read with the data descriptor replaced.
fn bad_read_data(cx: &mut Ctx, addr: u64, len: u32, flags: u16) -> Outcome {
    let s = slot(cx);
    chain(
        cx,
        T_IN,
        0,
        &[
            (s.hdr, 16, N, 1),
            (addr, len, flags | N, 2),
            (s.status, 1, W, 0),
        ],
        0,
    )
}

/// An indirect request whose table is `entries` (written at a fresh table in the pool), or
/// whose descriptor points at `table_override` with `len_override`.
fn indirect(
    cx: &mut Ctx,
    entries: &[(u64, u32, u16, u16)],
    table_override: Option<(u64, u32)>,
    flags: u16,
) -> Outcome {
    let s = slot(cx);
    let Ok(mut blk) = cx.blk() else {
        return SetupError;
    };
    if blk.features & F_INDIRECT_DESC == 0 {
        return Failed;
    }
    let table = cx.pool.alloc(16 * entries.len().max(1), 16);
    for (i, &(addr, len, fl, next)) in entries.iter().enumerate() {
        table.write64(16 * i, addr);
        table.write32(16 * i + 8, len);
        table.write16(16 * i + 12, fl);
        table.write16(16 * i + 14, next);
    }
    let (addr, len) = table_override.unwrap_or((table.addr, (16 * entries.len()) as u32));
    blk.write_header(0, T_IN, 0);
    let _ = s;
    blk.queue(0).set_desc(0, addr, len, flags, 1);
    let q = blk.queue(0);
    q.push(0);
    q.kick();
    wait(cx, &mut blk, 0)
}

fn good_indirect_entries(s: &Slot) -> [(u64, u32, u16, u16); 3] {
    [
        (s.hdr, 16, N, 1),
        (s.data, 4096, N | W, 2),
        (s.status, 1, W, 0),
    ]
}

/// Brings the device up by hand with queue 0 set up by `setup`, sets DRIVER_OK, and reports
/// what the status register says.
fn custom_setup(cx: &mut Ctx, setup: impl FnOnce(&Transport, &Queue)) -> Outcome {
    cx.pool.release(cx.mark);
    let t = cx.t;
    if t.begin_init(F_INDIRECT_DESC, 0).is_err() {
        return SetupError;
    }
    let q = Queue::new(cx.pool, t, 0, 128, false);
    setup(&t, &q);
    t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    let s = t.status();
    if s & status::FAILED != 0 {
        Failed
    } else if s & status::NEEDS_RESET != 0 {
        NeedsReset
    } else {
        Served
    }
}

/// Negotiation with `features(offered)` as the driver's choice.
fn features_case(cx: &mut Ctx, features: impl FnOnce(u64) -> u64) -> Outcome {
    let t = cx.t;
    t.reset();
    t.set_status(status::ACKNOWLEDGE | status::DRIVER);
    let offered = t.device_features();
    t.write_driver_features(features(offered));
    t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
    if t.status() & status::FEATURES_OK == 0 {
        Refused
    } else {
        Served
    }
}

/// A correct read on a fresh device after `disturb`: the device must still serve.
fn then_read(cx: &mut Ctx, disturb: impl FnOnce(&mut Blk, &Transport)) -> Outcome {
    let Ok(mut blk) = cx.blk() else {
        return SetupError;
    };
    let t = cx.t;
    disturb(&mut blk, &t);
    match blk.one(
        0,
        Req {
            kind: T_IN,
            sector: 8,
            len: 4096,
        },
        cx.clock,
        WAIT_MS,
    ) {
        Result::Ok(S_OK)
            if check_pattern(blk.slot_data(0), 4096, 8 * SECTOR, DISK_KEY, 1).is_none() =>
        {
            Served
        }
        Result::Ok(S_OK) => Garbage,
        Result::Ok(S_IOERR) => IoErr,
        Result::Ok(_) => Garbage,
        Err(_) if cx.needs_reset() => NeedsReset,
        Err(_) => Timeout,
    }
}

/// 32 reads in flight while their descriptors and available-ring entries are rewritten with
/// bad values: every request must come back (any status), or the device must ask for a reset.
fn rewrite_in_flight(cx: &mut Ctx) -> Outcome {
    let Ok(mut blk) = cx.blk() else {
        return SetupError;
    };
    let qd = 32.min(blk.max_qd(0));
    for slot in 0..qd {
        let sector = random_pattern_sector(&mut cx.rng, blk.capacity);
        blk.submit(
            0,
            slot,
            Req {
                kind: T_IN,
                sector,
                len: 4096,
            },
        );
    }
    blk.queue(0).kick();
    let addrs = [
        blk.slot_data(0).addr,
        OUTSIDE,
        cx.t.base(),
        cx.guard(),
        cx.ram_end - 512,
    ];
    let lens = [0u32, 1, 512, 4096, 0xffff_fe00];
    let deadline = cx.clock.deadline(WAIT_MS);
    let mut returned = 0usize;
    let mut rounds = 0u32;
    while returned < qd {
        if rounds < 20_000 {
            rounds += 1;
            let r = cx.rng.next();
            let d = (r % (3 * qd as u64)) as u16;
            let flags = ((r >> 8) & 7) as u16;
            let next = ((r >> 16) % 140) as u16;
            let addr = addrs[((r >> 32) % addrs.len() as u64) as usize];
            let len = lens[((r >> 40) % lens.len() as u64) as usize];
            blk.queue(0).set_desc(d, addr, len, flags, next);
            if r >> 60 == 0 {
                let q = blk.queue(0);
                q.force_avail_entry((r >> 48) as u16, (r >> 50) as u16 % 200);
            }
            if (r >> 56) & 0xf == 0 {
                blk.queue(0).notify();
            }
        }
        while blk.queue(0).pop_used().is_some() {
            returned += 1;
        }
        if deadline.passed() {
            break;
        }
    }
    if returned >= qd {
        Served
    } else if cx.needs_reset() {
        NeedsReset
    } else {
        println!("TESTGUEST blk_hostile rewrite_in_flight returned={returned} of={qd}");
        Timeout
    }
}

type CaseFn = fn(&mut Ctx) -> Outcome;

/// Name, accepted outcomes, the case.
const CASES: &[(&str, &[Outcome], CaseFn)] = &[
    ("desc_loop", &[IoErr, NoStatus, NeedsReset], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, N | W, 0),
            ],
            0,
        )
    }),
    ("desc_self_loop", &[IoErr, NoStatus, NeedsReset], |cx| {
        let s = slot(cx);
        chain(cx, T_IN, 0, &[(s.hdr, 16, N, 0)], 0)
    }),
    ("next_out_of_range", &[IoErr, NoStatus, NeedsReset], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[(s.hdr, 16, N, 1), (s.data, 4096, N | W, 0x7fff)],
            0,
        )
    }),
    ("head_out_of_range", &[IoErr, NoStatus, NeedsReset], |cx| {
        chain(cx, T_IN, 0, &[], 200)
    }),
    ("data_outside_ram", &[IoErr], |cx| {
        bad_read_data(cx, OUTSIDE, 4096, W)
    }),
    ("data_in_mmio_hole", &[IoErr], |cx| {
        let base = cx.t.base();
        bad_read_data(cx, base, 4096, W)
    }),
    ("data_crosses_ram_end", &[IoErr], |cx| {
        let a = cx.ram_end - 2048;
        bad_read_data(cx, a, 4096, W)
    }),
    ("huge_len", &[IoErr], |cx| {
        let a = cx.guard();
        bad_read_data(cx, a, 0xffff_fe00, W)
    }),
    ("address_wraps", &[IoErr], |cx| {
        bad_read_data(cx, u64::MAX - 0xfff, 0x2000, W)
    }),
    ("zero_len_data", &[Served, IoErr], |cx| {
        let a = cx.guard();
        bad_read_data(cx, a, 0, W)
    }),
    ("unaligned_len", &[IoErr], |cx| {
        let a = cx.guard();
        bad_read_data(cx, a, 100, W)
    }),
    ("read_into_readonly_buffer", &[IoErr], |cx| {
        let a = cx.guard();
        bad_read_data(cx, a, 4096, 0)
    }),
    ("write_from_writable_buffer", &[IoErr], |cx| {
        let s = slot(cx);
        let Ok(blk) = cx.blk() else { return SetupError };
        let sector = write_area(blk.capacity).0;
        chain(
            cx,
            T_OUT,
            sector,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("header_device_writable", &[IoErr], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[
                (s.hdr, 16, N | W, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("header_short", &[IoErr], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[
                (s.hdr, 8, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("header_outside_ram", &[IoErr], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[
                (OUTSIDE, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("status_not_writable", &[NoStatus], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, 0, 0),
            ],
            0,
        )
    }),
    ("status_outside_ram", &[NoStatus], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            0,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (OUTSIDE, 1, W, 0),
            ],
            0,
        )
    }),
    ("status_only", &[IoErr], |cx| {
        let s = slot(cx);
        chain(cx, T_IN, 0, &[(s.status, 1, W, 0)], 0)
    }),
    ("sector_overflow", &[IoErr], |cx| {
        let s = slot(cx);
        chain(
            cx,
            T_IN,
            u64::MAX - 3,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("sector_past_end", &[IoErr], |cx| {
        let s = slot(cx);
        let Ok(blk) = cx.blk() else { return SetupError };
        let cap = blk.capacity;
        chain(
            cx,
            T_IN,
            cap,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 512, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("unknown_type", &[Unsupp], |cx| {
        let s = slot(cx);
        chain(
            cx,
            0xdead,
            0,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 512, N | W, 2),
                (s.status, 1, W, 0),
            ],
            0,
        )
    }),
    ("chain_longer_than_seg_max", &[Served, IoErr], |cx| {
        let s = slot(cx);
        let Ok(blk) = cx.blk() else { return SetupError };
        let n = (blk.seg_max as usize + 1).min(120);
        let mut descs = [(0u64, 0u32, 0u16, 0u16); 122];
        descs[0] = (s.hdr, 16, N, 1);
        let guard = cx.guard();
        for (i, d) in descs.iter_mut().enumerate().skip(1).take(n) {
            *d = (guard + 512 * i as u64, 512, N | W, i as u16 + 1);
        }
        descs[n + 1] = (s.status, 1, W, 0);
        chain(cx, T_IN, 0, &descs[..n + 2], 0)
    }),
    (
        "indirect_len_not_multiple_of_16",
        &[IoErr, NoStatus, NeedsReset],
        |cx| {
            let s = slot(cx);
            let e = good_indirect_entries(&s);
            indirect(cx, &e, None, I).then_with_len(cx, 40)
        },
    ),
    (
        "indirect_outside_ram",
        &[IoErr, NoStatus, NeedsReset],
        |cx| indirect(cx, &[], Some((OUTSIDE, 48)), I),
    ),
    ("indirect_empty", &[IoErr, NoStatus, NeedsReset], |cx| {
        let s = slot(cx);
        let e = good_indirect_entries(&s);
        indirect(cx, &e, None, I).then_with_len(cx, 0)
    }),
    ("indirect_nested", &[IoErr, NoStatus, NeedsReset], |cx| {
        let s = slot(cx);
        indirect(cx, &[(s.hdr, 48, I, 0)], None, I)
    }),
    ("indirect_loop", &[IoErr, NoStatus, NeedsReset], |cx| {
        let s = slot(cx);
        indirect(
            cx,
            &[
                (s.hdr, 16, N, 1),
                (s.data, 4096, N | W, 2),
                (s.status, 1, N | W, 0),
            ],
            None,
            I,
        )
    }),
    (
        "indirect_next_out_of_range",
        &[IoErr, NoStatus, NeedsReset],
        |cx| {
            let s = slot(cx);
            indirect(cx, &[(s.hdr, 16, N, 1), (s.data, 4096, N | W, 9)], None, I)
        },
    ),
    (
        "indirect_and_next",
        &[Served, IoErr, NoStatus, NeedsReset],
        |cx| {
            let s = slot(cx);
            let e = good_indirect_entries(&s);
            indirect(cx, &e, None, I | N)
        },
    ),
    ("avail_idx_jump", &[NeedsReset], |cx| {
        let Ok(mut blk) = cx.blk() else {
            return SetupError;
        };
        let q = blk.queue(0);
        let jump = q.next_avail().wrapping_add(q.size + 10);
        q.force_avail_idx(jump);
        q.notify();
        wait(cx, &mut blk, 0)
    }),
    (
        "rewrite_in_flight",
        &[Served, NeedsReset],
        rewrite_in_flight,
    ),
    ("queue_outside_ram", &[Failed, NeedsReset], |cx| {
        custom_setup(cx, |t, q| {
            t.write(reg::QUEUE_SEL, 0);
            t.write(reg::QUEUE_NUM, u32::from(q.size));
            t.set_queue_addrs(OUTSIDE, OUTSIDE + 0x1000, OUTSIDE + 0x2000);
            t.write(reg::QUEUE_READY, 1);
        })
    }),
    (
        "used_ring_on_device_registers",
        &[Failed, NeedsReset],
        |cx| {
            custom_setup(cx, |t, q| {
                t.write(reg::QUEUE_SEL, 0);
                t.write(reg::QUEUE_NUM, u32::from(q.size));
                t.set_queue_addrs(q.desc_addr(), q.avail_addr(), t.base());
                t.write(reg::QUEUE_READY, 1);
            })
        },
    ),
    ("misaligned_rings", &[Failed, NeedsReset], |cx| {
        custom_setup(cx, |t, q| {
            t.write(reg::QUEUE_SEL, 0);
            t.write(reg::QUEUE_NUM, u32::from(q.size));
            t.set_queue_addrs(q.desc_addr() + 1, q.avail_addr() + 1, q.used_addr() + 1);
            t.write(reg::QUEUE_READY, 1);
        })
    }),
    (
        "queue_size_not_power_of_two",
        &[Served, Failed, NeedsReset],
        |cx| {
            custom_setup(cx, |t, q| {
                t.write(reg::QUEUE_SEL, 0);
                t.write(reg::QUEUE_NUM, 3);
                t.set_queue_addrs(q.desc_addr(), q.avail_addr(), q.used_addr());
                t.write(reg::QUEUE_READY, 1);
            })
        },
    ),
    ("queue_size_too_big", &[Served, Failed, NeedsReset], |cx| {
        custom_setup(cx, |t, q| {
            t.write(reg::QUEUE_SEL, 0);
            t.write(reg::QUEUE_NUM, 0x8000);
            t.set_queue_addrs(q.desc_addr(), q.avail_addr(), q.used_addr());
            t.write(reg::QUEUE_READY, 1);
        })
    }),
    ("features_without_version_1", &[Refused], |cx| {
        features_case(cx, |f| f & !F_VERSION_1)
    }),
    ("features_not_offered", &[Refused], |cx| {
        features_case(cx, |f| f | 1 << 50)
    }),
    ("notify_missing_queue", &[Served], |cx| {
        then_read(cx, |_, t| {
            t.write(reg::QUEUE_NOTIFY, 77);
            t.write(reg::QUEUE_NOTIFY, u32::MAX);
        })
    }),
    ("narrow_register_writes", &[Served], |cx| {
        then_read(cx, |_, t| {
            t.write16(reg::STATUS, 0);
            t.write16(reg::QUEUE_NOTIFY, 0);
        })
    }),
    ("status_bits_cleared", &[Served], |cx| {
        then_read(cx, |_, t| t.set_status(status::ACKNOWLEDGE))
    }),
    ("queue_registers_after_driver_ok", &[Served], |cx| {
        then_read(cx, |_, t| {
            t.write(reg::QUEUE_SEL, 0);
            t.write(reg::QUEUE_NUM, 2);
            t.set_queue_addrs(OUTSIDE, OUTSIDE, OUTSIDE);
            t.write(reg::QUEUE_READY, 0);
        })
    }),
    ("unknown_registers", &[Served], |cx| {
        then_read(cx, |_, t| {
            for off in [
                0x08, 0x0c, 0x18, 0x28, 0x3c, 0x40, 0x48, 0x4c, 0x54, 0xa8, 0xfc,
            ] {
                t.write(off, 0xffff_ffff);
            }
        })
    }),
    (
        "driver_ok_without_features_ok",
        &[Timeout, Failed, NeedsReset],
        |cx| {
            then_read(cx, |_, t| {
                t.reset();
                t.set_status(status::ACKNOWLEDGE | status::DRIVER);
                t.set_status(status::ACKNOWLEDGE | status::DRIVER | status::DRIVER_OK);
            })
        },
    ),
];

/// For the indirect cases that need a descriptor length other than the table's own.
trait WithLen {
    fn then_with_len(self, cx: &mut Ctx, len: u32) -> Outcome;
}

impl WithLen for Outcome {
    /// Runs the good indirect request again with the descriptor's length set to `len`.
    fn then_with_len(self, cx: &mut Ctx, len: u32) -> Outcome {
        if self != Served {
            return SetupError;
        }
        let s = slot(cx);
        let Ok(mut blk) = cx.blk() else {
            return SetupError;
        };
        let table = cx.pool.alloc(64, 16);
        for (i, (addr, l, fl, next)) in good_indirect_entries(&s).into_iter().enumerate() {
            table.write64(16 * i, addr);
            table.write32(16 * i + 8, l);
            table.write16(16 * i + 12, fl);
            table.write16(16 * i + 14, next);
        }
        blk.write_header(0, T_IN, 0);
        blk.queue(0).set_desc(0, table.addr, len, I, 0);
        let q = blk.queue(0);
        q.push(0);
        q.kick();
        wait(cx, &mut blk, 0)
    }
}

pub fn run(
    t: Transport,
    pool: &mut Pool,
    clock: &Clock,
    cmd: &Cmdline,
    ram_end: u64,
    sum: &mut Summary,
) {
    let mut test = Test::new("blk_hostile");
    let mark = pool.mark();
    let mut cx = Ctx {
        t,
        pool,
        clock,
        ram_end,
        mark,
        rng: Rng::new(cmd.num("seed", 99)),
    };
    let only = cmd.option("case");
    let mut accepted = 0;
    let mut ran = 0;
    for &(name, accept, case) in CASES {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        ran += 1;
        let outcome = case(&mut cx);
        let ok = accept.contains(&outcome);
        // Whatever happened, a reset must bring the device back.
        let healthy = then_read(&mut cx, |_, _| {}) == Served;
        println!(
            "TESTGUEST blk_hostile case={name} outcome={outcome} accepted={} recovered={}",
            u8::from(ok),
            u8::from(healthy)
        );
        accepted += u32::from(ok);
        test.check(ok, format_args!("{name}: device answered {outcome}"));
        test.check(
            healthy,
            format_args!("{name}: device does not work after a reset"),
        );
    }
    t.reset();
    println!("TESTGUEST blk_hostile cases={ran} accepted={accepted}");
    cx.pool.release(mark);
    sum.finish(test);
}
