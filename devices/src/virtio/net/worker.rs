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
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::filter::{EgressFilter, Verdict, ETH_HLEN, INSPECT_LEN};
use super::tap::{NetBackend, MAX_IOVECS, VNET_HDR_LEN};
use crate::virtio::Interrupt;

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
            eprintln!(
                "podvmm: net {}: {what}: {e} (further ones are only counted)",
                self.id
            );
        }
    }

    fn broken_queue(&mut self) {
        if !self.broken {
            self.broken = true;
            eprintln!(
                "podvmm: net {}: the guest's queue is corrupt; the device needs a reset",
                self.id
            );
            self.interrupt.signal_needs_reset();
        }
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    // ------------------------------------------------------------------ transmit --

    /// Sends every frame the guest has posted (up to [`BUDGET`]).
    pub fn process_tx(&mut self) -> TxState {
        if self.broken {
            return TxState::Done;
        }
        let mem = self.mem.clone();
        let mut used = 0usize;
        let state = 'outer: loop {
            if self.tx.disable_notification(mem.as_ref()).is_err() {
                self.broken_queue();
                break TxState::Done;
            }
            loop {
                if used == BUDGET {
                    break 'outer TxState::Budget;
                }
                let chain = match self.tx.iter(mem.as_ref()) {
                    Ok(mut it) => it.next(),
                    Err(_) => {
                        self.broken_queue();
                        break 'outer TxState::Done;
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if let Err(e) = self.send_chain(&mem, chain) {
                    bump(&self.counters.tx_invalid);
                    self.note_guest_error("invalid transmit chain", &e);
                }
                if self.tx.add_used(mem.as_ref(), head, 0).is_err() {
                    self.broken_queue();
                    break 'outer TxState::Done;
                }
                used += 1;
            }
            match self.tx.enable_notification(mem.as_ref()) {
                Ok(true) => continue,
                Ok(false) => break TxState::Done,
                Err(_) => {
                    self.broken_queue();
                    break TxState::Done;
                }
            }
        };
        if used > 0 {
            Self::notify(&mut self.tx, &mem, &self.interrupt);
        }
        state
    }

    /// Checks one transmit chain and writes its frame to the TAP. Frames the filter or the
    /// TAP refuse are counted here and are no error of the chain.
    fn send_chain(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<(), FrameError> {
        // Index 0 is kept for the copied head of the frame.
        let mut prefix = [0u8; TX_PREFIX];
        let mut bufs: Vec<VolatileSlice<'_>> = Vec::with_capacity(4);
        let mut total = 0usize;
        for (i, desc) in chain.enumerate() {
            if desc.is_write_only() {
                return Err(FrameError::WrongDirection(i));
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            total += len;
            if total > MAX_TX_CHAIN {
                return Err(FrameError::TooLong(MAX_TX_CHAIN));
            }
            let slice = mem
                .get_slice(desc.addr(), len)
                .map_err(|_| FrameError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                })?;
            if bufs.len() == MAX_IOVECS - 1 {
                return Err(FrameError::TooManySegments(MAX_IOVECS - 1));
            }
            bufs.push(slice);
        }
        if total < MIN_FRAME_CHAIN {
            return Err(FrameError::TooShort(total));
        }

        // Copy the first bytes out and send the copy: what the filter judges is what the TAP
        // gets, whatever the guest writes meanwhile.
        let prefix_len = total.min(TX_PREFIX);
        let mut copied = 0;
        let mut first = 0;
        while copied < prefix_len {
            let Some(slice) = bufs.get(first) else { break };
            let n = slice.len().min(prefix_len - copied);
            copied += slice.copy_to(&mut prefix[copied..copied + n]);
            match slice.offset(n) {
                Ok(rest) if !rest.is_empty() => bufs[first] = rest,
                _ => first += 1,
            }
        }
        match self.filter.check(&prefix[VNET_HDR_LEN..prefix_len]) {
            Verdict::Pass => {}
            Verdict::Denied(dst) => {
                self.note_denied(&format!("frame to {dst} dropped by the deny list"));
                return Ok(());
            }
            Verdict::Unreadable => {
                self.note_denied("IPv4 frame too short or too deeply tagged to check, dropped");
                return Ok(());
            }
        }
        // The copy replaces what it came from.
        bufs.drain(..first);
        bufs.insert(0, VolatileSlice::from(&mut prefix[..prefix_len]));
        match self.backend.write_frame(&bufs) {
            Ok(_) => {
                bump(&self.counters.tx_frames);
                self.counters
                    .tx_bytes
                    .fetch_add((total - VNET_HDR_LEN) as u64, Ordering::Relaxed);
            }
            Err(e) => {
                bump(&self.counters.tx_errors);
                self.note_guest_error("the TAP refused a frame", &e);
            }
        }
        Ok(())
    }

    fn note_denied(&mut self, what: &str) {
        let first = self.counters.tx_denied.fetch_add(1, Ordering::Relaxed) == 0;
        if first {
            eprintln!(
                "podvmm: net {}: {what} (egress deny list; further ones are only counted)",
                self.id
            );
        }
    }

    // ------------------------------------------------------------------- receive --

    /// Moves frames from the TAP into the guest's receive buffers (up to [`BUDGET`]).
    pub fn process_rx(&mut self) -> RxState {
        if self.broken {
            return RxState::NoBuffers;
        }
        let mut used = false;
        let mut frames = 0;
        let state = loop {
            if frames == BUDGET {
                break RxState::Budget;
            }
            match self.fill_rx(&mut used) {
                Err(BrokenQueue) => {
                    self.broken_queue();
                    break RxState::NoBuffers;
                }
                Ok(false) => {
                    bump(&self.counters.rx_stalls);
                    break RxState::NoBuffers;
                }
                Ok(true) => {}
            }
            match self.receive_one() {
                Ok(Some(true)) => {
                    used = true;
                    frames += 1;
                }
                Ok(Some(false)) => frames += 1, // dropped, buffers kept
                Ok(None) if self.backend_gone => break RxState::BackendGone,
                Ok(None) => break RxState::Drained,
                Err(BrokenQueue) => {
                    self.broken_queue();
                    break RxState::NoBuffers;
                }
            }
        };
        self.backend_gone = false;
        if used {
            Self::notify(&mut self.rx, &self.mem.clone(), &self.interrupt);
        }
        state
    }

    /// Whether to pop more receive chains before reading a frame: with mergeable buffers,
    /// until they can hold the largest frame the TAP may deliver; otherwise one chain.
    fn want_more_rx(&self) -> bool {
        if self.mergeable {
            self.parked_bytes < self.rx_need
        } else {
            self.parked.is_empty()
        }
    }

    /// Pops receive chains for the next frame. `Ok(false)`: the guest has no buffers at all
    /// (its next kick will tell us). With fewer than the largest frame needs, the frame is
    /// read anyway: waiting could deadlock a driver that only refills after an interrupt, and
    /// a frame that does not fit is dropped and counted, its buffers kept.
    fn fill_rx(&mut self, used: &mut bool) -> Result<bool, BrokenQueue> {
        let mem = self.mem.clone();
        loop {
            while self.want_more_rx() {
                let chain = match self.rx.iter(mem.as_ref()) {
                    Ok(mut it) => it.next(),
                    Err(_) => return Err(BrokenQueue),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                if let Err(e) = self.park(&mem, chain) {
                    bump(&self.counters.rx_invalid);
                    self.note_guest_error("invalid receive chain", &e);
                    self.rx
                        .add_used(mem.as_ref(), head, 0)
                        .map_err(|_| BrokenQueue)?;
                    *used = true;
                }
            }
            if !self.parked.is_empty() {
                return Ok(true);
            }
            match self.rx.enable_notification(mem.as_ref()) {
                Ok(true) => continue,
                Ok(false) => return Ok(false),
                Err(_) => return Err(BrokenQueue),
            }
        }
    }

    /// Validates a receive chain and keeps it for the next frames.
    fn park(&mut self, mem: &GuestMemoryMmap, chain: Chain<'_>) -> Result<(), FrameError> {
        let head = chain.head_index();
        let start = self.parked_segs.len();
        let result = self.park_segments(mem, chain);
        match result {
            Ok(total) => {
                self.parked.push_back(Parked {
                    head,
                    segs: self.parked_segs.len() - start,
                    len: total,
                });
                self.parked_bytes += total;
                Ok(())
            }
            Err(e) => {
                self.parked_segs.truncate(start);
                Err(e)
            }
        }
    }

    /// Appends a receive chain's segments to `parked_segs`; returns its length.
    fn park_segments(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
    ) -> Result<usize, FrameError> {
        let mut total = 0usize;
        let mut segs = 0usize;
        for (i, desc) in chain.enumerate() {
            if !desc.is_write_only() {
                return Err(FrameError::WrongDirection(i));
            }
            let len = desc.len() as usize;
            if len == 0 {
                continue;
            }
            if mem.get_slice(desc.addr(), len).is_err() {
                return Err(FrameError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            // One iovec stays free for the overflow byte of `receive_one`.
            if segs == MAX_IOVECS - 1 {
                return Err(FrameError::TooManySegments(MAX_IOVECS - 1));
            }
            // A chain is at most 4 GiB (virtio-queue stops there), so this cannot overflow.
            total += len;
            segs += 1;
            self.parked_segs.push_back((desc.addr(), len));
        }
        if total < MIN_FRAME_CHAIN {
            return Err(FrameError::TooShort(total));
        }
        Ok(total)
    }

    /// Reads one frame. `Ok(None)`: nothing to read. `Ok(Some(delivered))`.
    fn receive_one(&mut self) -> Result<Option<bool>, BrokenQueue> {
        let mem = self.mem.clone();
        // The buffers: every parked chain's segments (mergeable) or the first chain's. All of
        // them, not just `rx_need` worth: a TAP with a larger MTU may send bigger frames.
        let limit = if self.mergeable {
            self.parked_segs.len()
        } else {
            self.parked.front().map_or(0, |p| p.segs)
        };
        let mut bufs: Vec<VolatileSlice<'_>> = Vec::with_capacity(limit.min(MAX_IOVECS) + 1);
        let mut capacity = 0usize;
        for &(addr, len) in self.parked_segs.iter().take(limit.min(MAX_IOVECS - 1)) {
            // Validated when parked.
            let Ok(slice) = mem.get_slice(addr, len) else {
                return Err(BrokenQueue);
            };
            bufs.push(slice);
            capacity += len;
        }
        // One byte past the guest's buffers: a frame that reaches it did not fit (a TAP cuts
        // what does not fit and reports only what it copied).
        let mut overflow = [0u8; 1];
        bufs.push(VolatileSlice::from(&mut overflow[..]));
        let n = loop {
            match self.backend.read_frame(&bufs) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => {
                    // EBADFD: the queue was detached (multi-queue). Anything else is not
                    // expected either; stop polling rather than spin on it, until the guest's
                    // next kick or a control-queue change.
                    if e.raw_os_error() != Some(libc::EBADFD) {
                        self.note_guest_error("reading the TAP failed", &e);
                    }
                    self.backend_gone = true;
                    return Ok(None);
                }
            }
        };
        if !(MIN_FRAME_CHAIN..=capacity).contains(&n) {
            // A runt, or a frame bigger than the buffers: the guest would get garbage. The
            // buffers stay parked for the next frame.
            bump(&self.counters.rx_dropped);
            return Ok(Some(false));
        }

        // Which chains the frame filled, and how much of each.
        let mut left = n;
        let mut chains = 0usize;
        for p in &self.parked {
            if left == 0 {
                break;
            }
            left -= left.min(p.len);
            chains += 1;
        }
        let num_buffers = u16::try_from(chains).unwrap_or(u16::MAX);
        self.write_frame_bytes(NUM_BUFFERS_OFFSET, &num_buffers.to_le_bytes())?;
        let mut left = n;
        for _ in 0..chains {
            let Some(p) = self.parked.pop_front() else {
                break;
            };
            let this = left.min(p.len);
            left -= this;
            self.parked_bytes -= p.len;
            self.parked_segs.drain(..p.segs.min(self.parked_segs.len()));
            // `this` <= p.len, which came from a u32 sum bounded by the chain.
            self.rx
                .add_used(mem.as_ref(), p.head, this as u32)
                .map_err(|_| BrokenQueue)?;
        }
        bump(&self.counters.rx_frames);
        self.counters
            .rx_bytes
            .fetch_add((n - VNET_HDR_LEN) as u64, Ordering::Relaxed);
        Ok(Some(true))
    }

    /// Writes `bytes` at `offset` of the frame being received (across segments).
    fn write_frame_bytes(&self, mut offset: usize, bytes: &[u8]) -> Result<(), BrokenQueue> {
        let mut done = 0;
        for &(addr, len) in &self.parked_segs {
            if done == bytes.len() {
                break;
            }
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(bytes.len() - done);
            self.mem
                .write_slice(&bytes[done..done + n], addr.unchecked_add_usize(offset))
                .map_err(|_| BrokenQueue)?;
            done += n;
            offset = 0;
        }
        Ok(())
    }

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

// ---------------------------------------------------------------------- the thread --

/// Shared between a pair's thread and whoever enables or disables the pair (the control
/// queue, for multi-queue devices).
pub struct PairControl {
    pub backend: Arc<dyn NetBackend>,
    pub enabled: AtomicBool,
    /// Written after `enabled` changes.
    pub wake: EventFd,
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_WAKE: u64 = 4;
const TOKEN_CTRL: u64 = 5;

/// The events a pair's thread waits on.
pub struct PairEvents {
    pub rx: EventFd,
    pub tx: EventFd,
    pub kill: EventFd,
    pub control: Arc<PairControl>,
}

/// Something else the first pair's thread serves (the control queue).
pub trait SideQueue: Send {
    fn event(&self) -> &EventFd;
    fn process(&mut self);
}

impl QueuePair {
    /// The pair's thread: waits on the queues' notify events and the TAP, until `kill`.
    /// Until `kill`; an error it cannot go on from ends it early (a device error, see
    /// `virtio::worker`).
    pub fn run(
        mut self,
        ev: PairEvents,
        mut side: Option<Box<dyn SideQueue>>,
    ) -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| format!("creating its epoll: {e}"))?;
        let mut fds = vec![
            (ev.rx.as_raw_fd(), TOKEN_RX),
            (ev.tx.as_raw_fd(), TOKEN_TX),
            (ev.kill.as_raw_fd(), TOKEN_KILL),
            (ev.control.wake.as_raw_fd(), TOKEN_WAKE),
        ];
        if let Some(s) = &side {
            fds.push((s.event().as_raw_fd(), TOKEN_CTRL));
        }
        for (fd, token) in fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| format!("watching its events: {e}"))?;
        }
        let tap_fd = self.backend.fd();
        let mut tap_polled = false;
        let set_tap_polled = |on: bool, polled: &mut bool| {
            if on == *polled {
                return;
            }
            let op = if on {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            if epoll
                .ctl(op, tap_fd, EpollEvent::new(EventSet::IN, TOKEN_TAP))
                .is_ok()
            {
                *polled = on;
            }
        };
        let mut events = vec![EpollEvent::default(); 8];
        // Work may be waiting already (a driver that posted before we started).
        let mut tx_pending = true;
        let mut rx_pending = true;
        loop {
            let timeout = if tx_pending || rx_pending { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("waiting for events: {e}")),
            };
            for e in &events[..n] {
                match e.data() {
                    TOKEN_KILL => return Ok(()),
                    TOKEN_TX => {
                        let _ = ev.tx.read();
                        tx_pending = true;
                    }
                    TOKEN_RX => {
                        let _ = ev.rx.read();
                        rx_pending = true;
                    }
                    TOKEN_WAKE => {
                        let _ = ev.control.wake.read();
                        rx_pending = true;
                    }
                    TOKEN_CTRL => {
                        if let Some(s) = side.as_mut() {
                            let _ = s.event().read();
                            s.process();
                        }
                    }
                    _ => rx_pending = true,
                }
            }
            if tx_pending {
                tx_pending = self.process_tx() == TxState::Budget;
            }
            let enabled = ev.control.enabled.load(Ordering::SeqCst);
            if rx_pending {
                rx_pending = false;
                let poll = if enabled {
                    match self.process_rx() {
                        RxState::Drained => true,
                        RxState::Budget => {
                            rx_pending = true;
                            true
                        }
                        RxState::NoBuffers | RxState::BackendGone => false,
                    }
                } else {
                    false
                };
                set_tap_polled(poll, &mut tap_polled);
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::net::filter::tests::ipv4_frame;
    use crate::virtio::net::filter::Ipv4Net;
    use std::net::Ipv4Addr;
    use std::os::fd::{FromRawFd, OwnedFd, RawFd};
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Address;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    /// A socketpair standing in for the TAP: SOCK_SEQPACKET keeps frame boundaries and,
    /// like a TAP, cuts a frame to the buffers a read offers.
    pub(crate) struct SocketTap(pub OwnedFd);

    impl NetBackend for SocketTap {
        fn fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    /// The other end of a [`SocketTap`]: the "host network".
    pub(crate) struct Peer(pub OwnedFd);

    impl Peer {
        pub fn send(&self, b: &[u8]) -> io::Result<usize> {
            // SAFETY: send from our buffer.
            let n = unsafe { libc::send(self.0.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        }

        pub fn recv(&self, b: &mut [u8]) -> io::Result<usize> {
            // SAFETY: recv into our buffer.
            let n = unsafe { libc::recv(self.0.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
            usize::try_from(n).map_err(|_| io::Error::last_os_error())
        }
    }

    pub(crate) fn socket_tap() -> (Arc<SocketTap>, Peer) {
        let mut fds = [0; 2];
        // SAFETY: socketpair fills two descriptors; the result is checked.
        let ret = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(ret, 0);
        // SAFETY: fresh descriptors nobody else owns.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        (Arc::new(SocketTap(a)), Peer(b))
    }

    pub(crate) const MEM_SIZE: u64 = 0x100_0000;
    const RXQ: u64 = 0x1000;
    const TXQ: u64 = 0x8000;
    const BUFS: u64 = 0x10_0000;

    pub(crate) struct Rig {
        pub mem: Arc<GuestMemoryMmap>,
        pub pair: QueuePair,
        pub peer: Peer,
        pub counters: Arc<NetCounters>,
        pub irq: EventFd,
        // The driver's view of the rings (creating one zeroes the ring, so there is one each).
        txq: MockSplitQueue<'static, GuestMemoryMmap>,
        rxq: MockSplitQueue<'static, GuestMemoryMmap>,
    }

    pub(crate) fn mem() -> Arc<GuestMemoryMmap> {
        Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
    }

    fn rig_with(mergeable: bool, rx_need: usize, deny: Vec<Ipv4Net>, qsize: u16) -> Rig {
        let mem = mem();
        // The mock queues borrow the memory for the whole test.
        let leaked: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        let rxq = MockSplitQueue::create(leaked, GuestAddress(RXQ), qsize);
        let txq = MockSplitQueue::create(leaked, GuestAddress(TXQ), qsize);
        let (backend, peer) = socket_tap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let counters = Arc::new(NetCounters::default());
        let pair = QueuePair::new(PairSetup {
            id: "test".into(),
            mem: mem.clone(),
            rx: rxq.create_queue().unwrap(),
            tx: txq.create_queue().unwrap(),
            backend,
            interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
            counters: counters.clone(),
            filter: Arc::new(EgressFilter::new(deny)),
            mergeable,
            rx_need,
        });
        Rig {
            mem,
            pair,
            peer,
            counters,
            irq,
            txq,
            rxq,
        }
    }

    fn rig() -> Rig {
        rig_with(true, RX_NEED_PLAIN, Vec::new(), 16)
    }

    fn vnet_hdr() -> [u8; VNET_HDR_LEN] {
        [0; VNET_HDR_LEN]
    }

    fn frame(payload: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
        f.extend_from_slice(&0x88b5u16.to_be_bytes());
        f.extend(std::iter::repeat_n(fill, payload));
        f
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    impl Rig {
        fn txq(&self) -> &MockSplitQueue<'static, GuestMemoryMmap> {
            &self.txq
        }
        fn rxq(&self) -> &MockSplitQueue<'static, GuestMemoryMmap> {
            &self.rxq
        }

        /// Posts `descs` (chained in order) as one transmit chain at table index `at`.
        fn post_tx(&self, at: u16, descs: &[RawDescriptor]) {
            post(self.txq(), at, descs);
        }
        fn post_rx(&self, at: u16, descs: &[RawDescriptor]) {
            post(self.rxq(), at, descs);
        }

        /// Writes header + frame at `addr` and returns the chain's one descriptor.
        fn tx_buf(&self, addr: u64, frame: &[u8]) -> RawDescriptor {
            let mut b = vnet_hdr().to_vec();
            b.extend_from_slice(frame);
            self.mem.write_slice(&b, GuestAddress(addr)).unwrap();
            desc(addr, b.len() as u32, false)
        }

        fn used(&self, q: &MockSplitQueue<'static, GuestMemoryMmap>) -> Vec<(u32, u32)> {
            let idx = q.used().idx().load();
            (0..idx)
                .map(|i| {
                    let e = q.used().ring().ref_at(i as usize).unwrap().load();
                    (e.id(), e.len())
                })
                .collect()
        }

        fn recv_all(&self) -> Vec<Vec<u8>> {
            let mut out = Vec::new();
            let mut buf = vec![0u8; 70_000];
            while let Ok(n) = self.peer.recv(&mut buf) {
                out.push(buf[..n].to_vec());
            }
            out
        }
    }

    /// Writes a chain at descriptor index `at` and makes its head available.
    fn post(q: &MockSplitQueue<'_, GuestMemoryMmap>, at: u16, descs: &[RawDescriptor]) {
        let chained: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = SplitDescriptor::from(*d);
                let last = i + 1 == descs.len();
                let flags = if last {
                    d.flags() & !1
                } else {
                    d.flags() | 1 // VRING_DESC_F_NEXT
                };
                RawDescriptor::from(SplitDescriptor::new(
                    d.addr().0,
                    d.len(),
                    flags,
                    at + i as u16 + 1,
                ))
            })
            .collect();
        q.add_desc_chains(&chained, at).unwrap();
    }

    #[test]
    fn transmits_a_batch_with_one_interrupt() {
        let mut r = rig();
        let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(60 + i * 100, i as u8)).collect();
        for (i, f) in frames.iter().enumerate() {
            let d = r.tx_buf(BUFS + i as u64 * 0x1000, f);
            r.post_tx(i as u16, &[d]);
        }
        assert_eq!(r.pair.process_tx(), TxState::Done);
        let got = r.recv_all();
        assert_eq!(got.len(), 5);
        for (g, f) in got.iter().zip(&frames) {
            assert_eq!(&g[..VNET_HDR_LEN], &vnet_hdr());
            assert_eq!(&g[VNET_HDR_LEN..], &f[..]);
        }
        let used = r.used(r.txq());
        assert_eq!(used, (0..5).map(|i| (i, 0)).collect::<Vec<_>>());
        assert_eq!(r.irq.read().unwrap(), 1, "one interrupt for the batch");
        assert_eq!(r.counters.tx_frames.load(Ordering::Relaxed), 5);
    }

    #[test]
    fn transmit_gathers_scattered_descriptors() {
        let mut r = rig();
        let f = frame(3000, 7);
        let mut b = vnet_hdr().to_vec();
        b.extend_from_slice(&f);
        // Split at odd places: 5 bytes of header, then the rest of the header and 3 bytes...
        let cuts = [5usize, 10, 40, b.len()];
        let mut descs = Vec::new();
        let mut start = 0;
        for (i, &end) in cuts.iter().enumerate() {
            let addr = BUFS + i as u64 * 0x2000;
            r.mem
                .write_slice(&b[start..end], GuestAddress(addr))
                .unwrap();
            descs.push(desc(addr, (end - start) as u32, false));
            start = end;
        }
        r.post_tx(0, &descs);
        r.pair.process_tx();
        let got = r.recv_all();
        assert_eq!(got, vec![b]);
    }

    #[test]
    fn hostile_transmit_chains_fail_alone() {
        let mut r = rig();
        let good = frame(100, 1);
        let d_good = r.tx_buf(BUFS, &good);
        // 0: device-writable descriptor in a transmit chain.
        r.post_tx(0, &[desc(BUFS, 200, true)]);
        // 1: outside guest memory.
        r.post_tx(1, &[desc(MEM_SIZE - 16, 200, false)]);
        // 2: too short (header and half an Ethernet header).
        r.post_tx(2, &[desc(BUFS, (VNET_HDR_LEN + 7) as u32, false)]);
        // 3: too long: two 40 KiB descriptors.
        r.post_tx(
            3,
            &[
                desc(BUFS, 40 * 1024, false),
                desc(BUFS + 0x10000, 40 * 1024, false),
            ],
        );
        // 5: a good frame after all of them.
        r.post_tx(5, &[d_good]);
        // 6: an address that overflows.
        r.post_tx(6, &[desc(u64::MAX - 4, 100, false)]);
        assert_eq!(r.pair.process_tx(), TxState::Done);
        assert_eq!(r.counters.tx_invalid.load(Ordering::Relaxed), 5);
        assert_eq!(r.counters.tx_frames.load(Ordering::Relaxed), 1);
        let got = r.recv_all();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][VNET_HDR_LEN..], &good[..]);
        // Every chain went back to the guest.
        let heads: Vec<u32> = r.used(r.txq()).iter().map(|u| u.0).collect();
        assert_eq!(heads, vec![0, 1, 2, 3, 5, 6]);
        assert!(!r.pair.is_broken());
    }

    #[test]
    fn deny_list_drops_and_counts() {
        let deny = vec![Ipv4Net::new(Ipv4Addr::new(169, 254, 169, 254), 32).unwrap()];
        let mut r = rig_with(true, RX_NEED_PLAIN, deny, 16);
        let to_md = ipv4_frame(&[], [169, 254, 169, 254]);
        let to_md_vlan = ipv4_frame(&[0x8100], [169, 254, 169, 254]);
        let allowed = ipv4_frame(&[], [10, 0, 0, 1]);
        let d0 = r.tx_buf(BUFS, &to_md);
        let d1 = r.tx_buf(BUFS + 0x1000, &to_md_vlan);
        let d2 = r.tx_buf(BUFS + 0x2000, &allowed);
        r.post_tx(0, &[d0]);
        r.post_tx(1, &[d1]);
        r.post_tx(2, &[d2]);
        // A frame cut right inside its IPv4 header: unreadable, dropped while a list is set.
        let mut cut = vnet_hdr().to_vec();
        cut.extend_from_slice(&allowed[..ETH_HLEN + 10]);
        r.mem
            .write_slice(&cut, GuestAddress(BUFS + 0x3000))
            .unwrap();
        r.post_tx(3, &[desc(BUFS + 0x3000, cut.len() as u32, false)]);
        r.pair.process_tx();
        let got = r.recv_all();
        assert_eq!(got.len(), 1);
        assert_eq!(&got[0][VNET_HDR_LEN..], &allowed[..]);
        assert_eq!(r.counters.tx_denied.load(Ordering::Relaxed), 3);
        assert_eq!(r.counters.tx_invalid.load(Ordering::Relaxed), 0);
        assert_eq!(r.used(r.txq()).len(), 4);
    }

    #[test]
    fn deny_list_sees_headers_split_across_descriptors() {
        let deny = vec![Ipv4Net::new(Ipv4Addr::new(169, 254, 169, 254), 32).unwrap()];
        // 41 descriptors in one chain need a ring of 64.
        let mut r = rig_with(true, RX_NEED_PLAIN, deny, 64);
        let mut b = vnet_hdr().to_vec();
        b.extend_from_slice(&ipv4_frame(&[0x8100], [169, 254, 169, 254]));
        // One byte per descriptor for the first 40 bytes, then the rest.
        let mut descs = Vec::new();
        for i in 0..40usize {
            let addr = BUFS + i as u64 * 16;
            r.mem.write_slice(&b[i..i + 1], GuestAddress(addr)).unwrap();
            descs.push(desc(addr, 1, false));
        }
        r.mem
            .write_slice(&b[40..], GuestAddress(BUFS + 0x1000))
            .unwrap();
        descs.push(desc(BUFS + 0x1000, (b.len() - 40) as u32, false));
        r.post_tx(0, &descs);
        r.pair.process_tx();
        assert!(r.recv_all().is_empty());
        assert_eq!(r.counters.tx_denied.load(Ordering::Relaxed), 1);
        assert_eq!(r.counters.tx_invalid.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn receives_into_one_buffer() {
        let mut r = rig();
        r.post_rx(0, &[desc(BUFS, 2048, true)]);
        let mut sent = vnet_hdr().to_vec();
        sent.extend_from_slice(&frame(500, 3));
        r.peer.send(&sent).unwrap();
        // The one buffer is used: the worker stops polling the TAP.
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
        assert_eq!(r.used(r.rxq()), vec![(0, sent.len() as u32)]);
        let mut got = vec![0u8; sent.len()];
        r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
        // num_buffers = 1.
        assert_eq!(&got[10..12], &[1, 0]);
        assert_eq!(&got[VNET_HDR_LEN..], &sent[VNET_HDR_LEN..]);
        assert_eq!(r.irq.read().unwrap(), 1);
        assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn mergeable_buffers_span_chains() {
        // Buffers of 1000 bytes; a 3000-byte frame needs four of them.
        let mut r = rig_with(true, 4000, Vec::new(), 16);
        for i in 0..8u16 {
            r.post_rx(i, &[desc(BUFS + u64::from(i) * 0x1000, 1000, true)]);
        }
        let mut sent = vnet_hdr().to_vec();
        sent.extend_from_slice(&frame(3000 - VNET_HDR_LEN - ETH_HLEN, 9));
        r.peer.send(&sent).unwrap();
        assert_eq!(r.pair.process_rx(), RxState::Drained);
        assert_eq!(
            r.used(r.rxq()),
            vec![(0, 1000), (1, 1000), (2, 1000)],
            "three chains, the last filled exactly"
        );
        let mut got = Vec::new();
        for i in 0..3u64 {
            let mut b = vec![0u8; 1000];
            r.mem
                .read_slice(&mut b, GuestAddress(BUFS + i * 0x1000))
                .unwrap();
            got.extend_from_slice(&b);
        }
        assert_eq!(&got[10..12], &[3, 0], "num_buffers");
        assert_eq!(&got[VNET_HDR_LEN..], &sent[VNET_HDR_LEN..]);
        // The next frame starts in chain 3.
        r.peer.send(&sent[..100]).unwrap();
        r.pair.process_rx();
        assert_eq!(r.used(r.rxq())[3], (3, 100));
    }

    #[test]
    fn receive_waits_for_buffers_then_resumes() {
        let mut r = rig();
        let mut sent = vnet_hdr().to_vec();
        sent.extend_from_slice(&frame(100, 1));
        r.peer.send(&sent).unwrap();
        r.peer.send(&sent).unwrap();
        // No buffers: back-pressure, nothing read, the TAP keeps the frames.
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
        assert_eq!(r.counters.rx_stalls.load(Ordering::Relaxed), 1);
        // One buffer: one frame, then no buffers again.
        r.post_rx(0, &[desc(BUFS, 2048, true)]);
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
        assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 1);
        r.post_rx(1, &[desc(BUFS + 0x1000, 2048, true)]);
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
        assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 2);
        r.post_rx(2, &[desc(BUFS + 0x2000, 2048, true)]);
        assert_eq!(r.pair.process_rx(), RxState::Drained);
        assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn mergeable_receive_makes_do_with_what_the_guest_gave() {
        // 4000 bytes wanted, 3000 posted: read anyway (waiting could deadlock a driver that
        // refills only after an interrupt); what fits is delivered, what does not is dropped.
        let mut r = rig_with(true, 4000, Vec::new(), 16);
        r.post_rx(0, &[desc(BUFS, 1500, true)]);
        r.post_rx(1, &[desc(BUFS + 0x1000, 1500, true)]);
        let mut big = vnet_hdr().to_vec();
        big.extend_from_slice(&frame(3500, 1));
        let mut small = vnet_hdr().to_vec();
        small.extend_from_slice(&frame(100, 2));
        r.peer.send(&big).unwrap();
        r.peer.send(&small).unwrap();
        assert_eq!(r.pair.process_rx(), RxState::Drained);
        assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 1);
        assert_eq!(r.used(r.rxq()), vec![(0, small.len() as u32)]);
    }

    #[test]
    fn oversized_and_runt_frames_are_dropped_buffers_kept() {
        let mut r = rig_with(false, RX_NEED_PLAIN, Vec::new(), 16);
        r.post_rx(0, &[desc(BUFS, 600, true)]);
        let mut big = vnet_hdr().to_vec();
        big.extend_from_slice(&frame(1000, 1));
        r.peer.send(&big).unwrap();
        r.peer.send(&[0u8; 20]).unwrap();
        let mut ok = vnet_hdr().to_vec();
        ok.extend_from_slice(&frame(100, 2));
        r.peer.send(&ok).unwrap();
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
        assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 2);
        assert_eq!(r.used(r.rxq()), vec![(0, ok.len() as u32)]);
    }

    #[test]
    fn hostile_receive_chains_fail_alone() {
        let mut r = rig();
        r.post_rx(0, &[desc(BUFS, 2048, false)]); // read-only
        r.post_rx(1, &[desc(MEM_SIZE - 100, 2048, true)]); // outside memory
        r.post_rx(2, &[desc(BUFS, 8, true)]); // too short for a header
        r.post_rx(3, &[desc(BUFS, 100, true), desc(BUFS + 200, 100, false)]); // mixed
        r.post_rx(5, &[desc(BUFS + 0x1000, 2048, true)]); // good
        let mut sent = vnet_hdr().to_vec();
        sent.extend_from_slice(&frame(100, 1));
        r.peer.send(&sent).unwrap();
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
        assert_eq!(r.counters.rx_invalid.load(Ordering::Relaxed), 4);
        assert_eq!(
            r.used(r.rxq()),
            vec![(0, 0), (1, 0), (2, 0), (3, 0), (5, sent.len() as u32)]
        );
        assert!(!r.pair.is_broken());
    }

    /// A host end whose reads fail with an unexpected error: the write end of a pipe.
    struct FailingTap {
        write_end: OwnedFd,
        _read_end: OwnedFd,
    }

    impl NetBackend for FailingTap {
        fn fd(&self) -> RawFd {
            self.write_end.as_raw_fd()
        }
    }

    #[test]
    fn a_failing_host_end_stops_polling_instead_of_spinning() {
        let mut r = rig();
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills two descriptors; checked.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: fresh descriptors nobody else owns.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        r.pair.backend = Arc::new(FailingTap {
            write_end: wr,
            _read_end: rd,
        });
        r.post_rx(0, &[desc(BUFS, 2048, true)]);
        assert_eq!(r.pair.process_rx(), RxState::BackendGone);
        assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 0);
        assert!(
            r.used(r.rxq()).is_empty(),
            "the buffer stays with the device"
        );
    }

    #[test]
    fn a_corrupt_ring_needs_reset_without_panicking() {
        let mut r = rig();
        // avail.idx jumps far beyond the ring size: virtio-queue refuses to iterate.
        let q = r.txq();
        r.mem
            .write_obj(1000u16, q.avail_addr().unchecked_add(2))
            .unwrap();
        assert_eq!(r.pair.process_tx(), TxState::Done);
        assert!(r.pair.is_broken());
        assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    }

    #[test]
    fn transmit_budget_leaves_the_rest_for_later() {
        let mut r = rig_with(true, RX_NEED_PLAIN, Vec::new(), 512);
        let f = frame(60, 0);
        let d = r.tx_buf(BUFS, &f);
        // BUDGET + 10 chains, all pointing at the same frame.
        for i in 0..(BUDGET + 10) as u16 {
            r.post_tx(i, &[d]);
        }
        assert_eq!(r.pair.process_tx(), TxState::Budget);
        assert_eq!(r.used(r.txq()).len(), BUDGET);
        assert_eq!(r.pair.process_tx(), TxState::Done);
        assert_eq!(r.used(r.txq()).len(), BUDGET + 10);
        // Whatever the socket buffer took, every frame was either sent or counted.
        let sent = r.counters.tx_frames.load(Ordering::Relaxed);
        let refused = r.counters.tx_errors.load(Ordering::Relaxed);
        assert_eq!(sent + refused, (BUDGET + 10) as u64);
    }
}
