//! virtio-net receive: frames of fuzz-chosen lengths arrive from a scripted "TAP" while a
//! hostile driver's receive chains (any layout, mergeable buffers or not) wait in the ring.
//! What must hold besides no panic: a frame is delivered exactly when it fits the buffers the
//! device offered, and the used ring accounts for exactly the bytes delivered.
//!
//! Input: byte 0 picks how many frames (0-7), then two bytes (little-endian) per frame give
//! its length; the rest is the ring (`ring.rs`), whose free byte picks mergeable buffers
//! (bit 0) and how much buffer space the device gathers first (bits 1-2).
#![no_main]

#[path = "ring.rs"]
mod ring;

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use devices::virtio::net::filter::ETH_HLEN;
use devices::virtio::net::worker::{NetCounters, PairSetup, QueuePair};
use devices::virtio::net::{EgressFilter, NetBackend, VNET_HDR_LEN};
use devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, VolatileSlice};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The smallest frame the device passes on: a virtio-net header and an Ethernet header.
const MIN_FRAME: usize = VNET_HDR_LEN + ETH_HLEN;
const USED: u64 = 0x200;

#[derive(Default)]
struct Expected {
    frames: u64,
    bytes: u64,
    /// A frame was copied over the rings themselves (the guest pointed a buffer there):
    /// the used ring then holds frame bytes, not only what the device wrote.
    rings_overwritten: bool,
}

/// A TAP that hands out the scripted frames, copying as much as the buffers hold (as a TAP
/// does) and noting which frames fit the guest's buffers (all but the last, one-byte,
/// overflow buffer the device adds).
struct ScriptedTap {
    frames: Mutex<VecDeque<usize>>,
    expected: Mutex<Expected>,
    /// Host addresses of the guest memory that holds the rings.
    rings: std::ops::Range<usize>,
}

impl NetBackend for ScriptedTap {
    fn fd(&self) -> RawFd {
        -1
    }

    fn read_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let Some(len) = self.frames.lock().expect("lock").pop_front() else {
            return Err(io::ErrorKind::WouldBlock.into());
        };
        let mut copied = 0;
        let mut over_rings = false;
        for b in bufs {
            if copied == len {
                break;
            }
            let n = b.len().min(len - copied);
            let bytes: Vec<u8> = (copied..copied + n).map(|i| i as u8 ^ 0x5a).collect();
            b.subslice(0, n)
                .expect("within the slice")
                .copy_from(&bytes);
            let start = b.ptr_guard().as_ptr() as usize;
            over_rings |= start < self.rings.end && self.rings.start < start + n;
            copied += n;
        }
        self.expected.lock().expect("lock").rings_overwritten |= over_rings;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let capacity = total - bufs.last().map_or(0, |b| b.len());
        if (MIN_FRAME..=capacity).contains(&copied) {
            let mut e = self.expected.lock().expect("lock");
            e.frames += 1;
            e.bytes += copied as u64;
        }
        Ok(copied)
    }

    fn write_frame(&self, _bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8);
    if rest.len() < 2 * count {
        return;
    }
    let (lens, rest) = rest.split_at(2 * count);
    let frames: VecDeque<usize> = lens
        .chunks_exact(2)
        .map(|l| usize::from(u16::from_le_bytes([l[0], l[1]])))
        .collect();
    let Some((mem, rx, choice)) = ring::build(rest) else {
        return;
    };
    let mem = Arc::new(mem);
    let mergeable = choice & 1 != 0;
    let rx_need = [0, 1526, 4096, 65_562][usize::from((choice >> 1) & 3)];
    let base = mem
        .get_slice(GuestAddress(0), ring::AREA as usize)
        .expect("the rings' memory")
        .ptr_guard()
        .as_ptr() as usize;
    let tap = Arc::new(ScriptedTap {
        frames: Mutex::new(frames),
        expected: Mutex::new(Expected::default()),
        rings: base..base + ring::AREA as usize,
    });
    let counters = Arc::new(NetCounters::default());
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let mut pair = QueuePair::new(PairSetup {
        id: "fuzz".into(),
        mem: mem.clone(),
        rx,
        tx: Queue::new(ring::QSIZE).expect("queue"),
        backend: tap.clone(),
        interrupt,
        counters: counters.clone(),
        filter: Arc::new(EgressFilter::new(Vec::new())),
        mergeable,
        rx_need,
    });
    // Twice: the second pass finds whatever buffers the first left parked.
    let _ = pair.process_rx();
    let _ = pair.process_rx();
    if pair.is_broken() {
        return;
    }

    let expected = tap.expected.lock().expect("lock");
    assert_eq!(
        counters.rx_frames.load(Ordering::Relaxed),
        expected.frames,
        "frames delivered differ from the frames that fit"
    );
    if expected.rings_overwritten {
        return;
    }
    let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).expect("used idx");
    let mut used_bytes = 0u64;
    for i in 0..u64::from(used_idx.min(ring::QSIZE)) {
        let at = GuestAddress(USED + 4 + 8 * i);
        let id: u32 = mem.read_obj(at).expect("used id");
        let len: u32 = mem.read_obj(GuestAddress(at.0 + 4)).expect("used len");
        assert!(
            id < u32::from(ring::QSIZE),
            "used id {id} is not a descriptor"
        );
        used_bytes += u64::from(len);
    }
    if used_idx <= ring::QSIZE {
        assert_eq!(
            used_bytes, expected.bytes,
            "the used ring accounts for other bytes than were delivered"
        );
    }
});
