//! What a virtio-fs device does once its back-end is gone: every request the guest makes is
//! answered `EIO`, so a process in the guest gets an error instead of waiting forever on a
//! queue nobody serves (the FUSE driver has no timeout).
//!
//! The requests taken by the back-end and never answered are answered too. The back-end's own
//! position died with it, so the rings are taken over from the used index in guest memory:
//! that is exact for a back-end that answers in order, as virtiofsd does with its default
//! single request thread (Kata runs it so: `--thread-pool-size=1`). A back-end that answered
//! out of order could see one request answered twice; the guest driver then stops the queue.

use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// FUSE's request header (`struct fuse_in_header`): 40 bytes, of which the reply needs
/// `unique`.
const IN_HEADER_LEN: usize = 40;
/// `struct fuse_out_header`.
#[derive(Clone, Copy, Default)]
#[repr(C)]
struct OutHeader {
    len: u32,
    error: i32,
    unique: u64,
}
// SAFETY: plain integers, no padding (4 + 4 + 8 bytes).
unsafe impl ByteValued for OutHeader {}

const EIO: i32 = 5;

/// What one pass over a queue did.
#[derive(Default, Debug, PartialEq, Eq)]
pub struct Answered {
    pub requests: u64,
    /// Chains that had no room for a reply (a FORGET, or a driver's mistake): returned unread.
    pub without_reply: u64,
    /// The guest should be interrupted.
    pub notify: bool,
}

/// Puts the queue where the back-end left it: at the used index the guest sees.
pub fn take_over(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), String> {
    let used = queue
        .used_idx(mem, Ordering::Acquire)
        .map_err(|e| format!("reading the used index: {e:?}"))?;
    queue.set_next_avail(used.0);
    queue.set_next_used(used.0);
    Ok(())
}

/// Answers every available request of `queue` with `EIO`.
pub fn answer_all(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Answered, String> {
    let mut done = Answered::default();
    loop {
        answer_available(queue, mem, &mut done)?;
        // With VIRTIO_RING_F_EVENT_IDX the driver kicks only past the index the device last
        // asked for (the back-end's, from before it died): ask for the next one, and serve
        // what arrived meanwhile.
        let more = queue
            .enable_notification(mem)
            .map_err(|e| format!("asking for notifications: {e:?}"))?;
        if !more {
            break;
        }
    }
    done.notify = queue
        .needs_notification(mem)
        .map_err(|e| format!("reading the event index: {e:?}"))?;
    Ok(done)
}

fn answer_available(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    done: &mut Answered,
) -> Result<(), String> {
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let mut header = [0u8; IN_HEADER_LEN];
        let mut got = 0;
        let mut reply_at = None;
        for desc in chain {
            if desc.is_write_only() {
                if desc.len() as usize >= std::mem::size_of::<OutHeader>() {
                    reply_at = Some(desc.addr());
                }
                break;
            }
            let want = (IN_HEADER_LEN - got).min(desc.len() as usize);
            if want > 0
                && mem
                    .read_slice(&mut header[got..got + want], desc.addr())
                    .is_ok()
            {
                got += want;
            }
        }
        let unique = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let len = match reply_at {
            Some(at) if got >= 16 => write_error(mem, at, unique),
            _ => 0,
        };
        if len == 0 {
            done.without_reply += 1;
        } else {
            done.requests += 1;
        }
        queue
            .add_used(mem, head, len)
            .map_err(|e| format!("returning request {head}: {e:?}"))?;
    }
    Ok(())
}

fn write_error(mem: &GuestMemoryMmap, at: GuestAddress, unique: u64) -> u32 {
    let reply = OutHeader {
        len: std::mem::size_of::<OutHeader>() as u32,
        error: -EIO,
        unique,
    };
    match mem.write_obj(reply, at) {
        Ok(()) => reply.len,
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::testing::DriverQueue;

    const MEM: usize = 0x10_0000;

    /// What a hostile or broken driver may post once the back-end is gone: each chain is
    /// returned, with an EIO reply where there is room and a request header to answer.
    #[test]
    fn hostile_chains_are_returned_without_reading_or_writing_out_of_bounds() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let mut vq = DriverQueue::new(&mem, 0, 16);
        let mut header = [0u8; IN_HEADER_LEN];
        header[8..16].copy_from_slice(&77u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(0x8000)).unwrap();
        mem.write_slice(&[0xaa; 64], GuestAddress(0x9000)).unwrap();
        let chains: [&[(u64, u32, bool)]; 5] = [
            // A good request: header, then room for the reply.
            &[(0x8000, 40, false), (0x9000, 64, true)],
            // No room for a reply (a FORGET): returned unread.
            &[(0x8000, 40, false)],
            // A reply buffer too small for the out header.
            &[(0x8000, 40, false), (0xa000, 8, true)],
            // A header outside guest memory: nothing to answer.
            &[(MEM as u64 + 0x1000, 40, false), (0xb000, 64, true)],
            // A reply buffer outside guest memory.
            &[(0x8000, 40, false), (MEM as u64 - 8, 64, true)],
        ];
        for c in chains {
            let head = vq.chain(c);
            vq.push_avail(head);
        }
        vq.publish();
        let mut q: Queue = vq.queue();
        take_over(&mut q, &mem).unwrap();
        let done = answer_all(&mut q, &mem).unwrap();
        assert_eq!(done.requests, 1);
        assert_eq!(done.without_reply, 4);
        assert_eq!(vq.used_idx(), 5);
        let mut reply = [0u8; 16];
        mem.read_slice(&mut reply, GuestAddress(0x9000)).unwrap();
        assert_eq!(u32::from_le_bytes(reply[0..4].try_into().unwrap()), 16);
        assert_eq!(i32::from_le_bytes(reply[4..8].try_into().unwrap()), -EIO);
        assert_eq!(u64::from_le_bytes(reply[8..16].try_into().unwrap()), 77);
        // The too-small buffer was not written.
        let mut small = [0u8; 8];
        mem.read_slice(&mut small, GuestAddress(0xa000)).unwrap();
        assert_eq!(small, [0u8; 8]);
    }
}
