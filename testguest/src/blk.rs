//! A virtio-blk driver (virtio 1.x, 5.2): request slots of three descriptors (header, data,
//! status), any number in flight, completions found by polling the used ring.

use crate::dma::{Pool, Region};
use crate::time::{Clock, Deadline};
use crate::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE};
use crate::virtio::{Queue, Transport, F_EVENT_IDX, F_INDIRECT_DESC};

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;
/// What a status byte holds until the device writes it.
pub const S_UNSET: u8 = 0xff;

pub const F_SEG_MAX: u64 = 1 << 2;
pub const F_RO: u64 = 1 << 5;
pub const F_BLK_SIZE: u64 = 1 << 6;
pub const F_FLUSH: u64 = 1 << 9;
pub const F_MQ: u64 = 1 << 12;

pub const SECTOR: u64 = 512;
/// Request slots (and so the deepest queue depth).
pub const SLOTS: usize = 64;
/// Bytes of data buffer per slot.
pub const SLOT_DATA: usize = 4096;
pub const MAX_QUEUES: usize = 8;

/// Features this driver asks for (those offered are taken).
pub const WANTED: u64 =
    F_SEG_MAX | F_RO | F_BLK_SIZE | F_FLUSH | F_MQ | F_EVENT_IDX | F_INDIRECT_DESC;

pub struct Blk {
    pub features: u64,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    pub seg_max: u32,
    pub blk_size: u32,
    pub queues: [Option<Queue>; MAX_QUEUES],
    pub num_queues: usize,
    hdr: Region,
    status: Region,
    data: Region,
    /// The request number each busy slot carries.
    slot_req: [u64; SLOTS],
}

/// One request of a [`Job`].
#[derive(Clone, Copy)]
pub struct Req {
    pub kind: u32,
    pub sector: u64,
    pub len: u32,
}

/// A run of requests kept `qd` deep on one queue until `total` completed or `until` passed.
pub struct Job<'a> {
    pub queue: usize,
    pub qd: usize,
    pub total: u64,
    pub until: Option<Deadline>,
    /// Describes request `n`, which goes in slot `slot`, and fills its data buffer (for
    /// writes): `make(n, slot, buffer)`.
    pub make: &'a mut dyn FnMut(u64, usize, Region) -> Req,
    /// Checks request `n`'s outcome (status byte, data for reads); false counts an error:
    /// `done(n, slot, buffer, status)`.
    pub done: &'a mut dyn FnMut(u64, usize, Region, u8) -> bool,
    /// Give up (the device hangs) when no completion arrives for this long.
    pub stall_ms: u64,
}

#[derive(Clone, Copy, Default)]
pub struct RunStats {
    pub ops: u64,
    pub errors: u64,
    pub cycles: u64,
    pub notifies: u64,
    pub suppressed: u64,
}

impl Blk {
    /// Brings the device up with every queue it has (up to [`MAX_QUEUES`]), each of the
    /// largest size it allows (at most `max_size`).
    pub fn init(t: Transport, pool: &mut Pool, max_size: u16) -> Result<Blk, &'static str> {
        let features = t.begin_init(WANTED, 0)?;
        let capacity = t.config64(0);
        let seg_max = if features & F_SEG_MAX != 0 {
            t.config32(12)
        } else {
            1
        };
        let blk_size = if features & F_BLK_SIZE != 0 {
            t.config32(20)
        } else {
            512
        };
        let num_queues = if features & F_MQ != 0 {
            usize::from(t.config16(34)).clamp(1, MAX_QUEUES)
        } else {
            1
        };
        let mut queues = [const { None }; MAX_QUEUES];
        for (i, slot) in queues.iter_mut().enumerate().take(num_queues) {
            let max = t.queue_max(i as u16);
            if max == 0 || !max.is_power_of_two() {
                return Err("queue maximum size is 0 or not a power of two");
            }
            let size = (max as u16).min(max_size);
            let q = Queue::new(pool, t, i as u16, size, features & F_EVENT_IDX != 0);
            t.setup_queue(&q)?;
            *slot = Some(q);
        }
        t.driver_ok()?;
        Ok(Blk {
            features,
            capacity,
            seg_max,
            blk_size,
            queues,
            num_queues,
            hdr: pool.alloc(16 * SLOTS, 16),
            status: pool.alloc(SLOTS, 8),
            data: pool.alloc(SLOT_DATA * SLOTS, 4096),
            slot_req: [0; SLOTS],
        })
    }

    pub fn queue(&mut self, i: usize) -> &mut Queue {
        self.queues[i].as_mut().expect("queue not set up")
    }

    /// Deepest queue depth queue `qi` allows (three descriptors per request).
    pub fn max_qd(&self, qi: usize) -> usize {
        let size = self.queues[qi].as_ref().map_or(0, |q| usize::from(q.size));
        (size / 3).min(SLOTS)
    }

    pub fn slot_data(&self, slot: usize) -> Region {
        self.data.sub(slot * SLOT_DATA, SLOT_DATA)
    }

    pub fn slot_status(&self, slot: usize) -> u8 {
        self.status.read8(slot)
    }

    pub fn status_addr(&self, slot: usize) -> u64 {
        self.status.addr + slot as u64
    }

    pub fn hdr_addr(&self, slot: usize) -> u64 {
        self.hdr.addr + 16 * slot as u64
    }

    /// Writes slot `slot`'s header and resets its status byte.
    pub fn write_header(&self, slot: usize, kind: u32, sector: u64) {
        self.hdr.write32(16 * slot, kind);
        self.hdr.write32(16 * slot + 4, 0);
        self.hdr.write64(16 * slot + 8, sector);
        self.status.write8(slot, S_UNSET);
    }

    /// Describes request `req` in slot `slot` on queue `qi` (data in the slot's buffer) and
    /// pushes it; the caller publishes.
    pub fn submit(&mut self, qi: usize, slot: usize, req: Req) {
        self.write_header(slot, req.kind, req.sector);
        let (hdr, status) = (self.hdr_addr(slot), self.status_addr(slot));
        let data = self.slot_data(slot).addr;
        let d = (3 * slot) as u16;
        let q = self.queue(qi);
        q.set_desc(d, hdr, 16, DESC_F_NEXT, d + 1);
        if req.len > 0 {
            let dir = if req.kind == T_IN || req.kind == T_GET_ID {
                DESC_F_WRITE
            } else {
                0
            };
            q.set_desc(d + 1, data, req.len, DESC_F_NEXT | dir, d + 2);
            q.set_desc(d + 2, status, 1, DESC_F_WRITE, 0);
        } else {
            q.set_desc(d + 1, status, 1, DESC_F_WRITE, 0);
        }
        q.push(d);
    }

    /// One request on slot 0, waited for: its status byte, or `Err` if it never came back.
    pub fn one(&mut self, qi: usize, req: Req, clock: &Clock, ms: u64) -> Result<u8, &'static str> {
        self.submit(qi, 0, req);
        self.queue(qi).kick();
        let deadline = clock.deadline(ms);
        loop {
            if let Some((id, _len)) = self.queue(qi).pop_used() {
                if id != 0 {
                    return Err("device returned a descriptor head we did not submit");
                }
                return Ok(self.slot_status(0));
            }
            if deadline.passed() {
                return Err("no answer from the device");
            }
        }
    }

    /// Runs `job`: keeps `job.qd` requests in flight, refilling each slot as it completes.
    pub fn run(&mut self, job: &mut Job, clock: &Clock) -> Result<RunStats, &'static str> {
        let qi = job.queue;
        let qd = job.qd.clamp(1, self.max_qd(qi));
        let start_stats = self.queue(qi).stats;
        let mut st = RunStats::default();
        let mut issued = 0u64;
        let t0 = crate::arch::rdtsc();
        let (total, until) = (job.total, job.until);
        let stopping =
            |issued: u64| issued >= total || until.as_ref().is_some_and(Deadline::passed);
        for slot in 0..qd {
            if stopping(issued) {
                break;
            }
            let req = (job.make)(issued, slot, self.slot_data(slot));
            self.slot_req[slot] = issued;
            self.submit(qi, slot, req);
            issued += 1;
        }
        self.queue(qi).kick();
        let stall = clock.cycles(job.stall_ms);
        let mut last_progress = crate::arch::rdtsc();
        let mut spins = 0u32;
        while self.queue(qi).in_flight() > 0 {
            let mut refilled = false;
            while let Some((id, _len)) = self.queue(qi).pop_used() {
                let slot = id as usize / 3;
                if id % 3 != 0 || slot >= qd {
                    return Err("device returned a descriptor head we did not submit");
                }
                let status = self.slot_status(slot);
                if !(job.done)(self.slot_req[slot], slot, self.slot_data(slot), status) {
                    st.errors += 1;
                }
                st.ops += 1;
                if !stopping(issued) {
                    let req = (job.make)(issued, slot, self.slot_data(slot));
                    self.slot_req[slot] = issued;
                    self.submit(qi, slot, req);
                    issued += 1;
                    refilled = true;
                }
            }
            if refilled {
                self.queue(qi).kick();
                last_progress = crate::arch::rdtsc();
            } else {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(1024) && crate::arch::rdtsc() - last_progress > stall {
                    return Err("requests stopped completing");
                }
            }
        }
        st.cycles = crate::arch::rdtsc() - t0;
        let end_stats = self.queue(qi).stats;
        st.notifies = end_stats.notifies - start_stats.notifies;
        st.suppressed = end_stats.suppressed - start_stats.suppressed;
        Ok(st)
    }
}

/// The disk pattern the host writes before a run: every 8-byte little-endian word at disk
/// byte offset `o` holds `o ^ DISK_KEY`.
pub const DISK_KEY: u64 = 0x5445_5354_4755_4553; // "TESTGUES"
/// What this guest writes in its write test: `o ^ WRITE_KEY`.
pub const WRITE_KEY: u64 = 0x5752_4954_5445_5354; // "WRITTEST"

/// The sectors the write test overwrites: 1 MiB from the middle of the disk (4 KiB aligned).
pub fn write_area(capacity: u64) -> (u64, u64) {
    let start = (capacity / 2) & !7;
    (start, 2048.min(capacity - start) & !7)
}

/// A random 4 KiB-aligned sector outside the write area, where the host's pattern holds.
pub fn random_pattern_sector(rng: &mut crate::tests::Rng, capacity: u64) -> u64 {
    let (start, len) = write_area(capacity);
    loop {
        let sector = rng.below(capacity / 8) * 8;
        if sector < start || sector >= start + len {
            return sector;
        }
    }
}

/// Fills `buf` with the pattern for disk offset `disk_off`.
pub fn fill_pattern(buf: Region, len: usize, disk_off: u64, key: u64) {
    for w in 0..len / 8 {
        let o = disk_off + 8 * w as u64;
        buf.write64(8 * w, o ^ key);
    }
}

/// Checks `len` bytes of `buf` against the pattern; `step` words are skipped between
/// checked ones (1 checks everything). Returns the first bad offset.
pub fn check_pattern(buf: Region, len: usize, disk_off: u64, key: u64, step: usize) -> Option<u64> {
    let mut w = 0;
    while w < len / 8 {
        let o = disk_off + 8 * w as u64;
        if buf.read64(8 * w) != o ^ key {
            return Some(o);
        }
        w += step;
    }
    None
}
