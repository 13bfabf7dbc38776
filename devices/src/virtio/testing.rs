//! The guest side of a virtio device, for the device tests, the benches and the fuzz targets
//! (cargo feature `testing`; always there for this crate's own tests).
//!
//! [`DriverQueue`] is one split virtqueue as a guest driver keeps it (virtio 1.x, 2.7): it lays
//! out the descriptor table, the avail ring and the used ring in guest memory (zeroed, as a
//! driver allocates them), writes chains (direct or through an indirect table), publishes them
//! with the event-index rule, reaps used entries and reads or writes the rings' flags and
//! event fields. [`bring_up`] is the virtio-mmio handshake of Linux's virtio_mmio driver.
//!
//! It lays out all three rings itself: virtio-queue 0.18's `MockSplitQueue` puts its used ring
//! inside its avail ring (its ring `end()` counts elements, not bytes), which a driver that
//! publishes more than half a queue of chains runs into.
//!
//! Test support: a guest-memory access that fails or a device that breaks the handshake is a
//! bug in the test (or the device), so it panics with a message.

use std::ops::Deref;
use std::os::fd::AsRawFd;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring as ring;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::reg;
use super::status;
use crate::bus::BusDevice;

/// Descriptor flags (virtio 1.x, 2.7.5), as the descriptor stores them.
pub const F_NEXT: u16 = ring::VRING_DESC_F_NEXT as u16;
pub const F_WRITE: u16 = ring::VRING_DESC_F_WRITE as u16;
pub const F_INDIRECT: u16 = ring::VRING_DESC_F_INDIRECT as u16;
/// Avail ring flag: the driver wants no interrupts.
pub const AVAIL_F_NO_INTERRUPT: u16 = ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
/// Used ring flag: the device wants no notifications.
pub const USED_F_NO_NOTIFY: u16 = ring::VRING_USED_F_NO_NOTIFY as u16;

/// One buffer of a chain: guest address, length, whether the device writes it.
pub type Buf = (u64, u32, bool);

/// Writes one descriptor (addr, len, flags, next) at guest address `at`: a slot of a
/// descriptor table or of an indirect table.
pub fn write_desc(mem: &GuestMemoryMmap, at: u64, addr: u64, len: u32, flags: u16, next: u16) {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    mem.write_slice(&d, GuestAddress(at))
        .expect("descriptor outside guest memory");
}

/// `vring_need_event`: whether moving an index from `old` to `new` passed `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One split virtqueue, driver side. `M` is how it holds guest memory (`&GuestMemoryMmap`,
/// `Arc<GuestMemoryMmap>`, ...).
pub struct DriverQueue<M> {
    mem: M,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Where `chain` and `indirect` take their next descriptors (wrapping).
    next_desc: u16,
    /// The driver's avail index: entries made available, published or not.
    avail_idx: u16,
    /// The avail index the device last saw (the last `publish`).
    published: u16,
    /// Used entries taken so far.
    used_seen: u16,
    /// The used index last read: `pop_used` reads the ring's only once it caught up.
    used_known: u16,
}

impl<M: Deref<Target = GuestMemoryMmap>> DriverQueue<M> {
    /// A queue of `size` entries at `base`, laid out as Linux's `vring_init` does: the
    /// descriptor table, the avail ring right after it, the used ring at the next 4 bytes.
    pub fn new(mem: M, base: u64, size: u16) -> Self {
        let avail = base + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Self::with_layout(mem, size, base, avail, used)
    }

    /// A queue of `size` entries with its three parts where the caller puts them, all zeroed.
    pub fn with_layout(mem: M, size: u16, desc: u64, avail: u64, used: u64) -> Self {
        assert!(size.is_power_of_two(), "queue size {size}");
        let n = u64::from(size);
        for (at, len) in [(desc, 16 * n), (avail, 6 + 2 * n), (used, 6 + 8 * n)] {
            mem.write_slice(&vec![0u8; len as usize], GuestAddress(at))
                .expect("ring outside guest memory");
        }
        DriverQueue {
            mem,
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            published: 0,
            used_seen: 0,
            used_known: 0,
        }
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn desc_addr(&self) -> u64 {
        self.desc
    }

    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// The device's side of this queue, set up as the transport would (ready, no event
    /// index: call `set_event_idx` where the driver negotiated it).
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("queue size");
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        assert!(q.is_valid(&*self.mem), "queue outside guest memory");
        q
    }

    /// Writes descriptor `index` of the table as given (no checks beyond the table's bounds:
    /// hostile chains are written this way).
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        assert!(index < self.size, "descriptor {index} outside the table");
        write_desc(
            &self.mem,
            self.desc + 16 * u64::from(index),
            addr,
            len,
            flags,
            next,
        );
    }

    /// Writes `bufs` as one chain of consecutive descriptors from the cursor (wrapping);
    /// returns its head. Not yet available.
    pub fn chain(&mut self, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut flags = if write { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.set_desc(index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        head
    }

    /// Writes `bufs` as an indirect table at `table` and one descriptor pointing at it;
    /// returns that descriptor's index. Not yet available.
    pub fn indirect(&mut self, table: u64, bufs: &[Buf]) -> u16 {
        write_table(&self.mem, table, bufs);
        let head = self.next_desc;
        self.set_desc(head, table, 16 * bufs.len() as u32, F_INDIRECT, 0);
        self.next_desc = (head + 1) % self.size;
        head
    }

    /// Makes each of `bufs` a chain of its own and publishes them at once (receive buffers);
    /// returns whether to notify.
    pub fn post_each(&mut self, bufs: &[Buf]) -> bool {
        for &buf in bufs {
            let head = self.chain(&[buf]);
            self.push_avail(head);
        }
        self.publish()
    }

    /// Moves the cursor `chain` and `indirect` take descriptors from.
    pub fn set_next_desc(&mut self, index: u16) {
        self.next_desc = index % self.size;
    }

    /// Puts `head` in the avail ring, unpublished (a batch is published at once).
    pub fn push_avail(&mut self, head: u16) {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes what was pushed since the last publish; returns whether the device wants a
    /// notification for it under event index (its avail_event passed). Without event index
    /// a driver looks at `used_flags` instead.
    pub fn publish(&mut self) -> bool {
        // The ring entries before the index (virtio_wmb).
        fence(Ordering::Release);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
        // The index before reading the device's event field (virtio_mb).
        fence(Ordering::SeqCst);
        let old = std::mem::replace(&mut self.published, self.avail_idx);
        need_event(self.avail_event(), self.avail_idx, old)
    }

    /// `push_avail` and `publish` in one; returns whether to notify (event index).
    pub fn submit(&mut self, head: u16) -> bool {
        self.push_avail(head);
        self.publish()
    }

    /// Writes the avail index as given, unpublished entries or not (hostile drivers).
    pub fn set_avail_idx(&mut self, idx: u16) {
        fence(Ordering::SeqCst);
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
        self.avail_idx = idx;
        self.published = idx;
    }

    /// The driver's avail index (entries made available so far).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used index the device wrote.
    pub fn used_idx(&self) -> u16 {
        let idx = self
            .mem
            .read_obj(GuestAddress(self.used + 2))
            .expect("used idx");
        // The entries after the index (virtio_rmb).
        fence(Ordering::Acquire);
        idx
    }

    /// Used entries taken so far.
    pub fn used_seen(&self) -> u16 {
        self.used_seen
    }

    /// Whether the device returned entries not yet taken.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.used_seen
    }

    /// The next used entry (head, len), if the device returned one.
    pub fn pop_used(&mut self) -> Option<(u32, u32)> {
        if self.used_seen == self.used_known {
            self.used_known = self.used_idx();
            if self.used_seen == self.used_known {
                return None;
            }
        }
        let e = self.used_elem(self.used_seen);
        self.used_seen = self.used_seen.wrapping_add(1);
        Some(e)
    }

    /// Used entries (head, len) returned since the last call.
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        std::iter::from_fn(|| self.pop_used()).collect()
    }

    /// The used ring's entry at position `n` (taken or not): (head, len).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        let id = self.mem.read_obj(GuestAddress(at)).expect("used ring");
        let len = self.mem.read_obj(GuestAddress(at + 4)).expect("used ring");
        (id, len)
    }

    /// Waits for `n` new used entries as a guest's interrupt handler would: on `irq` (the
    /// irqfd), 10 s at most.
    pub fn wait_used(&mut self, irq: &EventFd, n: usize) -> Vec<(u32, u32)> {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < n {
            assert!(Instant::now() < deadline, "no completion in 10 s");
            let mut pfd = libc::pollfd {
                fd: irq.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let _ = irq.read();
            got.extend(self.take_used());
        }
        got
    }

    /// The driver's used_event (event index): interrupt me once the used index passes it.
    pub fn set_used_event(&self, v: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(v, GuestAddress(at)).expect("used_event");
    }

    /// `virtqueue_enable_cb` under event index: asks for an interrupt at the next used entry;
    /// returns whether entries came back meanwhile (take them, they will not interrupt).
    pub fn enable_cb(&self) -> bool {
        self.set_used_event(self.used_seen);
        // used_event before the used index (virtio_mb).
        fence(Ordering::SeqCst);
        self.used_idx() != self.used_seen
    }

    /// The device's avail_event (event index): notify me once the avail index passes it.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(at)).expect("avail_event")
    }

    pub fn avail_flags(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.avail))
            .expect("avail flags")
    }

    pub fn set_avail_flags(&self, flags: u16) {
        self.mem
            .write_obj(flags, GuestAddress(self.avail))
            .expect("avail flags");
        fence(Ordering::SeqCst);
    }

    /// The used ring's flags (`USED_F_NO_NOTIFY`), read after a full fence.
    pub fn used_flags(&self) -> u16 {
        fence(Ordering::SeqCst);
        self.mem
            .read_obj(GuestAddress(self.used))
            .expect("used flags")
    }
}

/// Writes `bufs` as a chained indirect table at `table`.
pub fn write_table(mem: &GuestMemoryMmap, table: u64, bufs: &[Buf]) {
    for (i, &(addr, len, write)) in bufs.iter().enumerate() {
        let mut flags = if write { F_WRITE } else { 0 };
        if i + 1 < bufs.len() {
            flags |= F_NEXT;
        }
        let next = if i + 1 < bufs.len() { i as u16 + 1 } else { 0 };
        write_desc(mem, table + 16 * i as u64, addr, len, flags, next);
    }
}

/// A 32-bit register write, as the guest's `writel`.
pub fn reg_write<T: BusDevice + ?Sized>(t: &mut T, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// A 32-bit register read, as the guest's `readl`.
pub fn reg_read<T: BusDevice + ?Sized>(t: &mut T, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Brings a virtio-mmio device up as Linux's virtio_mmio driver does: ACKNOWLEDGE, DRIVER,
/// the features offered masked by `features`, FEATURES_OK (checked), then queue `i` set up
/// from `queues[i]` (its size within QueueNumMax) and DRIVER_OK (checked: neither FAILED nor
/// NEEDS_RESET). Returns the features accepted.
pub fn bring_up<T, M>(t: &mut T, features: u64, queues: &[&DriverQueue<M>]) -> u64
where
    T: BusDevice + ?Sized,
    M: Deref<Target = GuestMemoryMmap>,
{
    let (accepted, status) = bring_up_status(t, features, queues);
    assert_eq!(
        status & (status::FAILED | status::DEVICE_NEEDS_RESET),
        0,
        "the device failed to start"
    );
    accepted
}

/// `bring_up` for a device that may refuse DRIVER_OK: returns the features accepted and the
/// status read back after DRIVER_OK, unchecked.
pub fn bring_up_status<T, M>(t: &mut T, features: u64, queues: &[&DriverQueue<M>]) -> (u64, u32)
where
    T: BusDevice + ?Sized,
    M: Deref<Target = GuestMemoryMmap>,
{
    reg_write(t, reg::STATUS, status::ACKNOWLEDGE);
    reg_write(t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    reg_write(t, reg::DEVICE_FEATURES_SEL, 1);
    let hi = reg_read(t, reg::DEVICE_FEATURES);
    reg_write(t, reg::DEVICE_FEATURES_SEL, 0);
    let lo = reg_read(t, reg::DEVICE_FEATURES);
    let accepted = features & (u64::from(hi) << 32 | u64::from(lo));
    reg_write(t, reg::DRIVER_FEATURES_SEL, 1);
    reg_write(t, reg::DRIVER_FEATURES, (accepted >> 32) as u32);
    reg_write(t, reg::DRIVER_FEATURES_SEL, 0);
    reg_write(t, reg::DRIVER_FEATURES, accepted as u32);
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    reg_write(t, reg::STATUS, s);
    assert_ne!(
        reg_read(t, reg::STATUS) & status::FEATURES_OK,
        0,
        "FEATURES_OK refused for {accepted:#x}"
    );
    for (i, q) in queues.iter().enumerate() {
        set_up_queue(t, i as u32, q);
    }
    reg_write(t, reg::STATUS, s | status::DRIVER_OK);
    (accepted, reg_read(t, reg::STATUS))
}

/// Selects queue `index` and gives it `q`'s size (checked against QueueNumMax) and rings,
/// then marks it ready.
pub fn set_up_queue<T, M>(t: &mut T, index: u32, q: &DriverQueue<M>)
where
    T: BusDevice + ?Sized,
    M: Deref<Target = GuestMemoryMmap>,
{
    reg_write(t, reg::QUEUE_SEL, index);
    let max = reg_read(t, reg::QUEUE_NUM_MAX);
    assert!(
        u32::from(q.size) <= max,
        "queue {index}: size {} over QueueNumMax {max}",
        q.size
    );
    reg_write(t, reg::QUEUE_NUM, u32::from(q.size));
    for (lo_reg, hi_reg, addr) in [
        (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, q.desc),
        (reg::QUEUE_AVAIL_LOW, reg::QUEUE_AVAIL_HIGH, q.avail),
        (reg::QUEUE_USED_LOW, reg::QUEUE_USED_HIGH, q.used),
    ] {
        reg_write(t, lo_reg, addr as u32);
        reg_write(t, hi_reg, (addr >> 32) as u32);
    }
    reg_write(t, reg::QUEUE_READY, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_and_event_index() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
        mem.write_slice(&[0xff; 0x1000], GuestAddress(0x1000))
            .unwrap();
        let mut q = DriverQueue::new(&mem, 0x1000, 16);
        assert_eq!(
            (q.desc_addr(), q.avail_addr(), q.used_addr()),
            (0x1000, 0x1100, 0x1128)
        );
        // Zeroed: flags, indexes, event fields.
        assert_eq!(
            (q.avail_flags(), q.used_flags(), q.avail_event()),
            (0, 0, 0)
        );
        let head = q.chain(&[(0x8000, 16, false), (0x9000, 1, true)]);
        assert_eq!(head, 0);
        // avail_event 0: the first entry notifies, the second does not.
        assert!(q.submit(head));
        assert!(!q.submit(head));
        assert_eq!(q.indirect(0xa000, &[(0x8000, 16, false)]), 2);
        // A device-side queue sees both chains.
        let mut dq = q.queue();
        assert_eq!(dq.avail_idx(&mem, Ordering::Acquire).unwrap().0, 2);
        let c = dq.pop_descriptor_chain(&mem).unwrap();
        assert_eq!(c.head_index(), 0);
        dq.add_used(&mem, 0, 17).unwrap();
        assert_eq!(q.take_used(), vec![(0, 17)]);
        assert!(!q.has_used());
        assert!(!q.enable_cb());
    }

    #[test]
    fn need_event_wraps() {
        assert!(need_event(0, 1, 0));
        assert!(!need_event(5, 5, 0));
        assert!(need_event(0xffff, 1, 0xfffe));
    }
}
