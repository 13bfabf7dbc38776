//! Transmit: the guest's chains checked, filtered and written to the TAP.

use super::*;

impl QueuePair {
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
    pub(super) fn send_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: Chain<'_>,
    ) -> Result<(), FrameError> {
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

    pub(super) fn note_denied(&mut self, what: &str) {
        let first = self.counters.tx_denied.fetch_add(1, Ordering::Relaxed) == 0;
        if first {
            log::warn!(
                "net {}: {what} (egress deny list; further ones are only counted)",
                self.id
            );
        }
    }

    // ------------------------------------------------------------------- receive --
}
