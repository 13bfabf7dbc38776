//! virtio-blk, the polite way: identification, reads and writes at queue depth N checked
//! against the host's pattern, multi-segment and indirect requests, flush, the errors a
//! correct device must give, every queue, and the random-read IOPS figure.
//!
//! The host prepares the disk with the pattern of [`crate::blk::DISK_KEY`]; the write test
//! overwrites sectors `capacity/2 ..` (at most 1 MiB, reported on the `write` line) with
//! [`crate::blk::WRITE_KEY`], so the host can check the file afterwards.

use crate::blk::*;
use crate::cmdline::Cmdline;
use crate::dma::Pool;
use crate::println;
use crate::report::{Summary, Test};
use crate::tests::Rng;
use crate::time::Clock;
use crate::virtio::queue::{DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{Transport, F_INDIRECT_DESC, F_VERSION_1};

const SECTORS_4K: u64 = 4096 / SECTOR;
const WAIT_MS: u64 = 2000;

pub fn run(t: Transport, pool: &mut Pool, clock: &Clock, cmd: &Cmdline, sum: &mut Summary) {
    let mut test = Test::new("blk");
    match Blk::init(t, pool, 256) {
        Ok(mut blk) => exercise(&mut blk, pool, clock, cmd, &mut test),
        Err(e) => test.fail(format_args!("init: {e}")),
    }
    sum.finish(test);
}

fn exercise(blk: &mut Blk, pool: &mut Pool, clock: &Clock, cmd: &Cmdline, test: &mut Test) {
    let qsize = blk.queue(0).size;
    println!(
        "TESTGUEST blk features={:#x} capacity={} seg_max={} blk_size={} queues={} queue_size={} ro={}",
        blk.features,
        blk.capacity,
        blk.seg_max,
        blk.blk_size,
        blk.num_queues,
        qsize,
        u8::from(blk.features & F_RO != 0)
    );
    test.check(
        blk.features & F_VERSION_1 != 0,
        format_args!("VERSION_1 not negotiated"),
    );
    if !test.check(
        blk.capacity >= 2 * 4096,
        format_args!("disk smaller than 4 MiB: {} sectors", blk.capacity),
    ) {
        return;
    }
    let qd = (cmd.num("blk_qd", 32) as usize).clamp(1, blk.max_qd(0));

    // GET_ID: the serial number.
    match blk.one(
        0,
        Req {
            kind: T_GET_ID,
            sector: 0,
            len: 20,
        },
        clock,
        WAIT_MS,
    ) {
        Ok(S_OK) => {
            let d = blk.slot_data(0);
            let mut id = [0u8; 20];
            for (i, b) in id.iter_mut().enumerate() {
                *b = d.read8(i);
            }
            let n = id.iter().position(|&b| b == 0).unwrap_or(20);
            let id = core::str::from_utf8(&id[..n]).unwrap_or("?");
            println!("TESTGUEST blk id={id}");
        }
        Ok(s) => test.fail(format_args!("GET_ID status {s}")),
        Err(e) => test.fail(format_args!("GET_ID: {e}")),
    }

    // Sequential 4 KiB reads of the first 2 MiB at queue depth qd, every byte checked.
    let read_sectors = 4096u64;
    let mut bad = 0u64;
    let mut first_bad = None;
    let r = blk.run(
        &mut Job {
            queue: 0,
            qd,
            total: read_sectors / SECTORS_4K,
            until: None,
            make: &mut |n, _, _| Req {
                kind: T_IN,
                sector: n * SECTORS_4K,
                len: 4096,
            },
            done: &mut |n, _, data, status| {
                let off = n * 4096;
                let wrong = status != S_OK || check_pattern(data, 4096, off, DISK_KEY, 1).is_some();
                if wrong {
                    bad += 1;
                    first_bad.get_or_insert((off, status));
                }
                !wrong
            },
            stall_ms: WAIT_MS,
        },
        clock,
    );
    match r {
        Ok(st) => {
            println!(
                "TESTGUEST blk read qd={qd} ops={} bytes={} errors={} us={} notifies={} suppressed={}",
                st.ops,
                st.ops * 4096,
                st.errors,
                clock.ns(st.cycles) / 1000,
                st.notifies,
                st.suppressed
            );
            test.check(
                st.ops == read_sectors / SECTORS_4K,
                format_args!("read: {} of {} requests", st.ops, read_sectors / SECTORS_4K),
            );
            if let Some((off, status)) = first_bad {
                test.fail(format_args!(
                    "read: {bad} bad requests, first at disk offset {off:#x} status {status}"
                ));
            }
        }
        Err(e) => test.fail(format_args!("read: {e}")),
    }

    multi_segment(blk, clock, test);
    if blk.features & F_INDIRECT_DESC != 0 {
        indirect(blk, pool, clock, test);
    }
    if blk.features & F_RO == 0 {
        write_flush_verify(blk, clock, qd, test);
    } else {
        let s = blk.one(
            0,
            Req {
                kind: T_OUT,
                sector: 0,
                len: 4096,
            },
            clock,
            WAIT_MS,
        );
        println!(
            "TESTGUEST blk readonly write_status={}",
            s.unwrap_or(S_UNSET)
        );
        test.check(
            s == Ok(S_IOERR),
            format_args!("write to a read-only disk: {s:?}, want IOERR"),
        );
    }

    // The errors a correct device gives.
    let s = blk.one(
        0,
        Req {
            kind: T_IN,
            sector: blk.capacity - 1,
            len: 4096,
        },
        clock,
        WAIT_MS,
    );
    test.check(
        s == Ok(S_IOERR),
        format_args!("read past the end: {s:?}, want IOERR"),
    );
    let s = blk.one(
        0,
        Req {
            kind: 0x55,
            sector: 0,
            len: 512,
        },
        clock,
        WAIT_MS,
    );
    test.check(
        s == Ok(S_UNSUPP),
        format_args!("unknown request type: {s:?}, want UNSUPP"),
    );
    let s = blk.one(
        0,
        Req {
            kind: T_IN,
            sector: 0,
            len: 100,
        },
        clock,
        WAIT_MS,
    );
    test.check(
        s == Ok(S_IOERR),
        format_args!("read of 100 bytes: {s:?}, want IOERR"),
    );

    // Every other queue serves too.
    for qi in 1..blk.num_queues {
        let sector = 8 * qi as u64;
        let s = blk.one(
            qi,
            Req {
                kind: T_IN,
                sector,
                len: 4096,
            },
            clock,
            WAIT_MS,
        );
        let ok = s == Ok(S_OK)
            && check_pattern(blk.slot_data(0), 4096, sector * SECTOR, DISK_KEY, 1).is_none();
        test.check(ok, format_args!("read on queue {qi}: {s:?}"));
    }

    iops(blk, clock, cmd, qd, test);
}

/// One 4 KiB read split in eight 512-byte descriptors.
fn multi_segment(blk: &mut Blk, clock: &Clock, test: &mut Test) {
    if blk.seg_max < 8 {
        println!("TESTGUEST blk multi_segment skipped=seg_max");
        return;
    }
    let sector = 24u64;
    blk.write_header(0, T_IN, sector);
    let (hdr, status, data) = (blk.hdr_addr(0), blk.status_addr(0), blk.slot_data(0));
    data.fill(0);
    let q = blk.queue(0);
    q.set_desc(0, hdr, 16, DESC_F_NEXT, 1);
    for i in 0..8u16 {
        q.set_desc(
            1 + i,
            data.addr + 512 * u64::from(i),
            512,
            DESC_F_NEXT | DESC_F_WRITE,
            2 + i,
        );
    }
    q.set_desc(9, status, 1, DESC_F_WRITE, 0);
    let s = wait_head(blk, 0, clock);
    let ok = s == Ok(S_OK)
        && check_pattern(blk.slot_data(0), 4096, sector * SECTOR, DISK_KEY, 1).is_none();
    test.check(ok, format_args!("8-segment read: {s:?}"));
}

/// One 4 KiB read described by an indirect table.
fn indirect(blk: &mut Blk, pool: &mut Pool, clock: &Clock, test: &mut Test) {
    let table = pool.alloc(3 * 16, 16);
    let sector = 40u64;
    blk.write_header(0, T_IN, sector);
    let data = blk.slot_data(0);
    data.fill(0);
    let entries = [
        (blk.hdr_addr(0), 16u32, DESC_F_NEXT, 1u16),
        (data.addr, 4096, DESC_F_NEXT | DESC_F_WRITE, 2),
        (blk.status_addr(0), 1, DESC_F_WRITE, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
        table.write64(16 * i, addr);
        table.write32(16 * i + 8, len);
        table.write16(16 * i + 12, flags);
        table.write16(16 * i + 14, next);
    }
    blk.queue(0).set_desc(0, table.addr, 48, DESC_F_INDIRECT, 0);
    let s = wait_head(blk, 0, clock);
    let ok = s == Ok(S_OK) && check_pattern(data, 4096, sector * SECTOR, DISK_KEY, 1).is_none();
    test.check(ok, format_args!("indirect read: {s:?}"));
}

/// Pushes chain `head` (already described), waits for it and returns slot 0's status.
fn wait_head(blk: &mut Blk, head: u16, clock: &Clock) -> Result<u8, &'static str> {
    let q = blk.queue(0);
    q.push(head);
    q.kick();
    let deadline = clock.deadline(WAIT_MS);
    loop {
        if let Some((id, _)) = blk.queue(0).pop_used() {
            if id != u32::from(head) {
                return Err("wrong head returned");
            }
            return Ok(blk.slot_status(0));
        }
        if deadline.passed() {
            return Err("no answer");
        }
    }
}

/// Writes 1 MiB at capacity/2, flushes, reads it back.
fn write_flush_verify(blk: &mut Blk, clock: &Clock, qd: usize, test: &mut Test) {
    let (start, sectors) = write_area(blk.capacity);
    let total = sectors / SECTORS_4K;
    let mut bad_status = 0u64;
    let w = blk.run(
        &mut Job {
            queue: 0,
            qd,
            total,
            until: None,
            make: &mut |n, _, data| {
                let sector = start + n * SECTORS_4K;
                fill_pattern(data, 4096, sector * SECTOR, WRITE_KEY);
                Req {
                    kind: T_OUT,
                    sector,
                    len: 4096,
                }
            },
            done: &mut |_, _, _, status| {
                if status != S_OK {
                    bad_status += 1;
                }
                status == S_OK
            },
            stall_ms: WAIT_MS,
        },
        clock,
    );
    let flush = blk.one(
        0,
        Req {
            kind: T_FLUSH,
            sector: 0,
            len: 0,
        },
        clock,
        WAIT_MS,
    );
    let mut bad_data = 0u64;
    let r = blk.run(
        &mut Job {
            queue: 0,
            qd,
            total,
            until: None,
            make: &mut |n, _, data| {
                data.fill(0);
                Req {
                    kind: T_IN,
                    sector: start + n * SECTORS_4K,
                    len: 4096,
                }
            },
            done: &mut |n, _, data, status| {
                let off = (start + n * SECTORS_4K) * SECTOR;
                let ok = status == S_OK && check_pattern(data, 4096, off, WRITE_KEY, 1).is_none();
                if !ok {
                    bad_data += 1;
                }
                ok
            },
            stall_ms: WAIT_MS,
        },
        clock,
    );
    match (w, r) {
        (Ok(w), Ok(r)) => {
            println!(
                "TESTGUEST blk write sector={start} sectors={sectors} qd={qd} ops={} errors={} flush_status={} readback_errors={} us={}",
                w.ops,
                w.errors,
                flush.unwrap_or(S_UNSET),
                r.errors,
                clock.ns(w.cycles) / 1000
            );
            test.check(
                w.ops == total && bad_status == 0,
                format_args!("write: {} of {total} ok", w.ops - bad_status),
            );
            test.check(
                bad_data == 0 && r.ops == total,
                format_args!("read back after write: {bad_data} bad"),
            );
        }
        (w, r) => test.fail(format_args!("write/read back: {:?} {:?}", w.err(), r.err())),
    }
    test.check(flush == Ok(S_OK), format_args!("flush: {flush:?}"));
}

/// Random 4 KiB reads over the whole disk at queue depth `qd` for `testguest.blk_ms`
/// milliseconds (or `testguest.blk_ops` requests), the first word of every sector checked.
fn iops(blk: &mut Blk, clock: &Clock, cmd: &Cmdline, qd: usize, test: &mut Test) {
    let ms = cmd.num("blk_ms", 300);
    let ops = cmd.num("blk_ops", u64::MAX);
    let capacity = blk.capacity;
    let mut rng = Rng::new(cmd.num("seed", 0x1234_5678));
    let offsets = [const { core::cell::Cell::new(0u64) }; SLOTS];
    let mut wrong = 0u64;
    let r = blk.run(
        &mut Job {
            queue: 0,
            qd,
            total: ops,
            until: Some(clock.deadline(ms)),
            make: &mut |_, slot, _| {
                let sector = random_pattern_sector(&mut rng, capacity);
                offsets[slot].set(sector * SECTOR);
                Req {
                    kind: T_IN,
                    sector,
                    len: 4096,
                }
            },
            done: &mut |_, slot, data, status| {
                let off = offsets[slot].get();
                let ok = status == S_OK && check_pattern(data, 4096, off, DISK_KEY, 64).is_none();
                if !ok {
                    wrong += 1;
                }
                ok
            },
            stall_ms: WAIT_MS,
        },
        clock,
    );
    match r {
        Ok(st) => {
            println!(
                "TESTGUEST blk iops qd={qd} ops={} ms={} iops={} errors={} notifies={} suppressed={}",
                st.ops,
                clock.ns(st.cycles) / 1_000_000,
                clock.per_sec(st.ops, st.cycles),
                st.errors,
                st.notifies,
                st.suppressed
            );
            test.check(
                st.ops > 0 && wrong == 0,
                format_args!("random reads: {wrong} of {} wrong", st.ops),
            );
        }
        Err(e) => test.fail(format_args!("random reads: {e}")),
    }
}
