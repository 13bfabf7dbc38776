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
