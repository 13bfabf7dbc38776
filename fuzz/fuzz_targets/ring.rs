//! A split virtqueue in a small guest memory, laid out from fuzz bytes as a hostile driver
//! could: the descriptor table, the avail ring's heads and the memory the descriptors point
//! at. Shared by the device targets (`#[path]`-included).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM: usize = 1 << 20;
pub const QSIZE: u16 = 16;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// Guest memory the fuzz bytes fill after the rings (headers, frames, indirect tables).
pub const AREA: u64 = 0x1000;
/// Fuzz bytes for the table: 16 descriptors of 12 bytes each: addr (u32, so it can point
/// past the 1 MiB of memory), len (u32), flags (u16), next (u16).
const TABLE: usize = QSIZE as usize * 12;

/// Lays `data` out; returns the memory, a ready queue and the byte after the ring's bytes
/// (a free choice for the target), or None when `data` is too short.
pub fn build(data: &[u8]) -> Option<(GuestMemoryMmap, Queue, u8)> {
    if data.len() < TABLE + 3 {
        return None;
    }
    let (table, rest) = data.split_at(TABLE);
    let choice = rest[0];
    let heads = usize::from(rest[1] % (QSIZE as u8 + 1));
    let (ring, area) = rest[2..].split_at((heads * 2).min(rest.len() - 2));

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    for (i, d) in table.chunks_exact(12).enumerate() {
        let u32_at = |o: usize| u32::from_le_bytes([d[o], d[o + 1], d[o + 2], d[o + 3]]);
        let at = GuestAddress(DESC + 16 * i as u64);
        mem.write_obj(u64::from(u32_at(0)), at).expect("desc addr");
        mem.write_obj(u32_at(4), at.unchecked_add(8))
            .expect("desc len");
        mem.write_obj(u16::from_le_bytes([d[8], d[9]]), at.unchecked_add(12))
            .expect("desc flags");
        mem.write_obj(u16::from_le_bytes([d[10], d[11]]), at.unchecked_add(14))
            .expect("desc next");
    }
    for (i, h) in ring.chunks_exact(2).enumerate() {
        mem.write_obj(
            u16::from_le_bytes([h[0], h[1]]),
            GuestAddress(AVAIL + 4 + 2 * i as u64),
        )
        .expect("avail ring");
    }
    mem.write_obj(heads as u16, GuestAddress(AVAIL + 2))
        .expect("avail idx");
    let area = &area[..area.len().min(MEM - AREA as usize)];
    mem.write_slice(area, GuestAddress(AREA))
        .expect("guest data");

    let mut q = Queue::new(QSIZE).expect("queue");
    q.set_size(QSIZE);
    q.set_desc_table_address(Some(DESC as u32), Some(0));
    q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
    q.set_used_ring_address(Some(USED as u32), Some(0));
    q.set_ready(true);
    assert!(q.is_valid(&mem));
    Some((mem, q, choice))
}
