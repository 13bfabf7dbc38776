//! Receive: the guest's chains parked, frames read from the TAP straight into them.

use super::*;

impl QueuePair {
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
    pub(super) fn want_more_rx(&self) -> bool {
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
    pub(super) fn fill_rx(&mut self, used: &mut bool) -> Result<bool, BrokenQueue> {
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
    pub(super) fn park(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
    ) -> Result<(), FrameError> {
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
    pub(super) fn park_segments(
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
    pub(super) fn receive_one(&mut self) -> Result<Option<bool>, BrokenQueue> {
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
    pub(super) fn write_frame_bytes(
        &self,
        mut offset: usize,
        bytes: &[u8],
    ) -> Result<(), BrokenQueue> {
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
}
