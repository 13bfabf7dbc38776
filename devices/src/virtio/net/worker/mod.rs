//! One receive/transmit queue pair of a virtio-net device, served by one thread.
//!
//! Transmit: each chain the guest posts is checked (device-readable only, inside guest
//! memory, at least a header and an Ethernet header, at most [`MAX_TX_CHAIN`] bytes), its first
//! bytes are copied (so the egress filter judges exactly what is sent) and the frame is
//! written to the TAP with one `writev` straight from guest memory. All available chains are
//! handled in one pass, with the guest's notifications off, then one interrupt at most.
//!
//! Receive: the worker keeps the guest's receive chains it has popped ("parked") and reads
//! the next frame with one `readv` straight into them. With mergeable receive buffers a frame
//! may fill several chains; `num_buffers` in its header says how many. When the guest has
//! not posted enough buffers for the largest frame the TAP may deliver, the worker stops
//! polling the TAP (frames wait in the TAP's own bounded queue) and re-arms the queue's
//! notification; the guest's next kick resumes it. No frame is ever buffered in the VMM.
//!
//! Hostile chains fail alone: they are returned to the guest with length 0 and counted in
//! [`NetCounters`]; only a corrupt ring itself (which virtio-queue reports) stops the queue.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::filter::{EgressFilter, Verdict, ETH_HLEN, INSPECT_LEN};
use super::tap::{NetBackend, MAX_IOVECS, VNET_HDR_LEN};
use crate::virtio::Interrupt;

mod rx;
mod thread;
mod tx;

pub use thread::{PairControl, PairEvents, SideQueue};

/// The largest Ethernet frame with segmentation offload: 64 KiB of IP plus the Ethernet
/// header and a VLAN tag.
pub const MAX_FRAME: usize = 65_535 + ETH_HLEN + 4;
/// The largest transmit chain accepted: header plus [`MAX_FRAME`].
pub const MAX_TX_CHAIN: usize = VNET_HDR_LEN + MAX_FRAME;
/// Receive buffer space one frame may need without segmentation offload to the guest:
/// header plus a 1500-byte payload, Ethernet header and a VLAN tag.
pub const RX_NEED_PLAIN: usize = VNET_HDR_LEN + 1518;
/// The smallest frame: a header and an Ethernet header.
const MIN_FRAME_CHAIN: usize = VNET_HDR_LEN + ETH_HLEN;
/// Bytes of each transmitted frame copied out of guest memory before the filter looks.
const TX_PREFIX: usize = VNET_HDR_LEN + INSPECT_LEN;
/// Frames handled per queue before the worker looks at its other events.
pub const BUDGET: usize = 256;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// Per-device counters, shared by its queue pairs.
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Workers that stopped on their own (an error or a panic): the device then needs a reset.
    pub worker_failures: Arc<AtomicU64>,
    pub rx_frames: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_frames: AtomicU64,
    pub tx_bytes: AtomicU64,
    /// Transmit chains refused: wrong direction, outside memory, too short, too long.
    pub tx_invalid: AtomicU64,
    /// Receive chains refused for the same reasons.
    pub rx_invalid: AtomicU64,
    /// Frames dropped by the egress deny list (or unreadable IPv4 while it is set).
    pub tx_denied: AtomicU64,
    /// Frames the TAP refused.
    pub tx_errors: AtomicU64,
    /// Frames from the TAP dropped: bigger than the buffers the guest gave, or runts.
    pub rx_dropped: AtomicU64,
    /// Times receive stopped polling the TAP because the guest's queue was out of buffers.
    pub rx_stalls: AtomicU64,
    /// Control-queue commands refused (malformed chains, unknown commands).
    pub ctrl_errors: AtomicU64,
}

impl crate::virtio::DeviceCounters for NetCounters {
    fn snapshot(&self) -> Vec<(&'static str, u64)> {
        crate::virtio::read_counters(&[
            ("rx_frames", &self.rx_frames),
            ("rx_bytes", &self.rx_bytes),
            ("tx_frames", &self.tx_frames),
            ("tx_bytes", &self.tx_bytes),
            ("tx_invalid", &self.tx_invalid),
            ("rx_invalid", &self.rx_invalid),
            ("tx_denied", &self.tx_denied),
            ("tx_errors", &self.tx_errors),
            ("rx_dropped", &self.rx_dropped),
            ("rx_stalls", &self.rx_stalls),
            ("ctrl_errors", &self.ctrl_errors),
            ("worker_failures", &self.worker_failures),
        ])
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Why a chain from the guest was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("descriptor {0} points the wrong way (device-writable in a transmit chain, or read-only in a receive chain)")]
    WrongDirection(usize),
    #[error("descriptor at {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("chain of {0} bytes is too short for a frame")]
    TooShort(usize),
    #[error("chain of more than {0} bytes is too long for a frame")]
    TooLong(usize),
    #[error("chain has more than {0} descriptors")]
    TooManySegments(usize),
}

/// The ring itself is unusable (virtio-queue refused to read it).
#[derive(Debug)]
pub struct BrokenQueue;

type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// A receive chain popped from the guest and not yet used.
#[derive(Debug)]
struct Parked {
    head: u16,
    segs: usize,
    len: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The TAP has nothing more to read.
    Drained,
    /// The guest has no (or not enough) buffers: stop polling the TAP until it adds some.
    NoBuffers,
    /// The budget ran out; more frames may wait.
    Budget,
    /// The TAP queue refused to be read (detached from a multi-queue TAP, or an error).
    BackendGone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxState {
    Done,
    /// The budget ran out with chains still available.
    Budget,
}

/// What a queue pair needs to run.
pub struct PairSetup {
    pub id: String,
    pub mem: Arc<GuestMemoryMmap>,
    pub rx: Queue,
    pub tx: Queue,
    pub backend: Arc<dyn NetBackend>,
    pub interrupt: Arc<Interrupt>,
    pub counters: Arc<NetCounters>,
    pub filter: Arc<EgressFilter>,
    /// VIRTIO_NET_F_MRG_RXBUF negotiated.
    pub mergeable: bool,
    /// Receive buffer space to gather before reading a frame.
    pub rx_need: usize,
}

/// One queue pair's state. `process_rx` and `process_tx` may be driven directly (tests,
/// benchmarks) or by [`QueuePair::run`] on the pair's thread.
pub struct QueuePair {
    id: String,
    mem: Arc<GuestMemoryMmap>,
    rx: Queue,
    tx: Queue,
    backend: Arc<dyn NetBackend>,
    interrupt: Arc<Interrupt>,
    counters: Arc<NetCounters>,
    filter: Arc<EgressFilter>,
    mergeable: bool,
    rx_need: usize,
    parked: VecDeque<Parked>,
    parked_segs: VecDeque<(GuestAddress, usize)>,
    parked_bytes: usize,
    /// Whether a guest error was already logged (log once, count always).
    reported: bool,
    broken: bool,
    /// The last read found the TAP queue detached.
    backend_gone: bool,
}

impl QueuePair {
    pub fn new(s: PairSetup) -> Self {
        QueuePair {
            id: s.id,
            mem: s.mem,
            rx: s.rx,
            tx: s.tx,
            backend: s.backend,
            interrupt: s.interrupt,
            counters: s.counters,
            filter: s.filter,
            mergeable: s.mergeable,
            rx_need: s.rx_need.max(MIN_FRAME_CHAIN),
            parked: VecDeque::new(),
            parked_segs: VecDeque::new(),
            parked_bytes: 0,
            reported: false,
            broken: false,
            backend_gone: false,
        }
    }

    fn note_guest_error(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if !self.reported {
            self.reported = true;
            log::warn!(
                "net {}: {what}: {e} (further ones are only counted)",
                self.id
            );
        }
    }

    fn broken_queue(&mut self) {
        if !self.broken {
            self.broken = true;
            log::warn!(
                "net {}: the guest's queue is corrupt; the device needs a reset",
                self.id
            );
            self.interrupt.signal_needs_reset();
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    // ------------------------------------------------------------------ transmit --

    fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &Interrupt) {
        match queue.needs_notification(mem) {
            Ok(false) => {}
            // On an error, interrupt anyway: a spurious interrupt is harmless.
            _ => interrupt.signal_used(),
        }
    }
}

trait AddUsize {
    fn unchecked_add_usize(self, n: usize) -> GuestAddress;
}

impl AddUsize for GuestAddress {
    fn unchecked_add_usize(self, n: usize) -> GuestAddress {
        GuestAddress(self.0.wrapping_add(n as u64))
    }
}

#[cfg(test)]
pub(crate) mod tests;
