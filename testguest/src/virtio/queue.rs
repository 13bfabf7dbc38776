//! A split virtqueue (virtio 1.x, 2.7) in pool memory, driven by polling: the driver never
//! waits for interrupts (it runs with them off); it publishes requests, notifies the device
//! when the device asks for it (event index) and spins on the used ring.

use core::sync::atomic::{compiler_fence, fence, Ordering};

use super::mmio::{reg, Transport};
use crate::dma::{Pool, Region};

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;
pub const DESC_F_INDIRECT: u16 = 4;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Counters of what the driver side did.
#[derive(Clone, Copy, Default)]
pub struct QueueStats {
    pub notifies: u64,
    pub suppressed: u64,
}

pub struct Queue {
    pub index: u16,
    pub size: u16,
    transport: Transport,
    /// Descriptor table, then the available ring; the used ring on the next page.
    pub mem: Region,
    used_off: usize,
    event_idx: bool,
    /// Next free slot in the available ring (not yet visible to the device until published).
    next_avail: u16,
    /// avail.idx as last published to the device.
    published: u16,
    /// avail.idx when the device was last notified (event-index arithmetic).
    kicked: u16,
    last_used: u16,
    pub stats: QueueStats,
}

pub fn desc_bytes(size: u16) -> usize {
    16 * usize::from(size)
}

impl Queue {
    /// Allocates the rings of queue `index` with `size` entries (a power of two). Interrupts
    /// are suppressed: this driver polls.
    pub fn new(
        pool: &mut Pool,
        transport: Transport,
        index: u16,
        size: u16,
        event_idx: bool,
    ) -> Queue {
        let avail_len = 6 + 2 * usize::from(size);
        let used_off = (desc_bytes(size) + avail_len).next_multiple_of(4096);
        let used_len = 6 + 8 * usize::from(size);
        let mem = pool.alloc(used_off + used_len, 4096);
        let q = Queue {
            index,
            size,
            transport,
            mem,
            used_off,
            event_idx,
            next_avail: 0,
            published: 0,
            kicked: 0,
            last_used: 0,
            stats: QueueStats::default(),
        };
        if event_idx {
            q.set_used_event(0x8000);
        } else {
            q.mem.write16(q.avail_off(), AVAIL_F_NO_INTERRUPT);
        }
        q
    }

    fn avail_off(&self) -> usize {
        desc_bytes(self.size)
    }

    pub fn desc_addr(&self) -> u64 {
        self.mem.addr
    }

    pub fn avail_addr(&self) -> u64 {
        self.mem.addr + self.avail_off() as u64
    }

    pub fn used_addr(&self) -> u64 {
        self.mem.addr + self.used_off as u64
    }

    /// Writes descriptor `i` (any value: hostile mode writes bad ones).
    pub fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let off = 16 * usize::from(i % self.size);
        self.mem.write64(off, addr);
        self.mem.write32(off + 8, len);
        self.mem.write16(off + 12, flags);
        self.mem.write16(off + 14, next);
    }

    /// Queues chain `head` in the available ring (visible after [`Queue::publish`]).
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.next_avail % self.size);
        self.mem.write16(self.avail_off() + 4 + 2 * slot, head);
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Makes everything pushed visible: descriptors and ring entries are written before the
    /// index (x86 keeps stores in order; the compiler fence keeps the compiler from moving
    /// the buffer writes past it).
    pub fn publish(&mut self) {
        compiler_fence(Ordering::Release);
        self.mem.write16(self.avail_off() + 2, self.next_avail);
        self.published = self.next_avail;
    }

    /// Publishes, then notifies the device if it wants to hear about the new entries.
    pub fn kick(&mut self) {
        self.publish();
        // The device's `avail_event`/flags must be read after our index store is visible.
        fence(Ordering::SeqCst);
        let new = self.published;
        let old = self.kicked;
        let need = if self.event_idx {
            let event = self
                .mem
                .read16(self.used_off + 4 + 8 * usize::from(self.size));
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            self.mem.read16(self.used_off) & USED_F_NO_NOTIFY == 0
        };
        if need {
            self.notify();
        } else {
            self.stats.suppressed += 1;
        }
        self.kicked = new;
    }

    /// Writes the queue's index to the notify register unconditionally.
    pub fn notify(&mut self) {
        self.stats.notifies += 1;
        self.transport
            .write(reg::QUEUE_NOTIFY, u32::from(self.index));
    }

    /// The next used element `(id, len)`, if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        let idx = self.mem.read16(self.used_off + 2);
        if idx == self.last_used {
            return None;
        }
        // The element is read after the index (x86 keeps loads in order).
        compiler_fence(Ordering::Acquire);
        let slot = usize::from(self.last_used % self.size);
        let off = self.used_off + 4 + 8 * slot;
        let elem = (self.mem.read32(off), self.mem.read32(off + 4));
        self.last_used = self.last_used.wrapping_add(1);
        if self.event_idx {
            // Keep the device's interrupts away: the next one would be 32768 entries on.
            self.set_used_event(self.last_used.wrapping_add(0x8000));
        }
        Some(elem)
    }

    /// Entries published but not yet returned (as far as we have popped them).
    pub fn in_flight(&self) -> u16 {
        self.published.wrapping_sub(self.last_used)
    }

    /// Entries published that the device has not returned yet (reads its used index).
    pub fn in_flight_after_reclaim(&self) -> u16 {
        self.published
            .wrapping_sub(self.mem.read16(self.used_off + 2))
    }

    fn set_used_event(&self, v: u16) {
        self.mem
            .write16(self.avail_off() + 4 + 2 * usize::from(self.size), v);
    }

    /// Overwrites avail.idx with any value (hostile mode).
    pub fn force_avail_idx(&mut self, idx: u16) {
        compiler_fence(Ordering::Release);
        self.mem.write16(self.avail_off() + 2, idx);
    }

    /// Writes avail ring slot `slot` directly (hostile mode).
    pub fn force_avail_entry(&self, slot: u16, head: u16) {
        let slot = usize::from(slot % self.size);
        self.mem.write16(self.avail_off() + 4 + 2 * slot, head);
    }

    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }
}
