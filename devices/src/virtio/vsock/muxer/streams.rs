//! A connection's host stream: readiness events, forwarding what the guest sent, closing
//! and resetting, and which streams are watched for what (the watch list follows each pass).

use super::*;

impl Muxer {
    pub(super) fn stream_event(&mut self, fd: RawFd, set: EventSet) {
        match self.slots.get(&fd) {
            Some(Slot::Pending) => self.read_connect_line(fd),
            Some(Slot::Conn(key)) => {
                let key = *key;
                self.conn_event(key, set);
            }
            None => {}
        }
    }

    pub(super) fn conn_event(&mut self, key: Key, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let State::Connecting { sent } = c.state {
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
                // The client left before the guest answered.
                self.kill(key, sent);
            }
            return;
        }
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            return self.kill(key, true);
        }
        if set.contains(EventSet::HANG_UP) {
            // The peer is gone for good: whatever it wrote is still readable; after that, EOF.
            // HUP is reported whatever the interest, so the stream leaves the watch list
            // (`update_interest` below).
            c.host_hup = true;
            if !c.host_eof {
                c.host_readable = true;
            } else {
                c.shutdown_flags |= SHUTDOWN_RCV | SHUTDOWN_SEND;
                c.owe |= owe::SHUTDOWN;
            }
            if !c.to_host.is_empty() {
                // Nobody will read it.
                return self.kill(key, true);
            }
            if c.host_eof {
                self.start_closing(key);
            }
        } else if set.contains(EventSet::IN) {
            c.host_readable = true;
        }
        self.update_interest(key);
        self.want_rx(key);
    }

    /// The connection's state changed: its watch follows after this pass (`sync_watches`).
    pub(super) fn update_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let current = if c.host_hup {
            !c.registered
        } else {
            c.registered && c.wanted_interest() == c.interest
        };
        if !current && !c.rewatch {
            c.rewatch = true;
            self.rewatch.push(key);
        }
    }

    /// Brings the watch list up to date after a pass: streams done with leave it (then close),
    /// and each connection that changed is watched for what it waits for now (a stream whose
    /// peer hung up, for nothing: HUP would be reported whatever the interest).
    pub(super) fn sync_watches(&mut self, ops: &mut EventOps) {
        for stream in self.unwatch.drain(..) {
            let _ = ops.remove(Events::empty(&stream));
        }
        let mut rewatch = std::mem::take(&mut self.rewatch);
        for key in rewatch.drain(..) {
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.rewatch = false;
            if c.host_hup {
                if c.registered {
                    let _ = ops.remove(Events::empty(&c.stream));
                    c.registered = false;
                }
                continue;
            }
            let want = c.wanted_interest();
            if c.registered && want == c.interest {
                continue;
            }
            let ev = Events::with_data(&c.stream, STREAM, want);
            let done = if c.registered {
                ops.modify(ev)
            } else {
                ops.add(ev)
            };
            // On failure it is tried again at its next change.
            if done.is_ok() {
                c.interest = want;
                c.registered = true;
            }
        }
        // Its capacity is kept for the next pass.
        self.rewatch = rewatch;
    }

    /// Writes buffered guest data to the host stream.
    pub(super) fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (front, _) = c.to_host.as_slices();
            match send_nosig(&c.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if would_block(&e) => break,
                Err(_) => return self.kill(key, true),
            }
        }
        if c.to_host.is_empty() && c.to_host.capacity() > 64 * 1024 {
            c.to_host.shrink_to(0);
        }
        self.after_forward(key);
    }

    /// After bytes went to the host: credit update, and shutdowns that waited for the flush.
    pub(super) fn after_forward(&mut self, key: Key) {
        let buf_alloc = self.opts.buf_alloc;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let unannounced = (c.fwd_cnt - c.last_fwd_cnt_sent).0;
        let seen_free = buf_alloc
            .saturating_sub(unannounced)
            .saturating_sub(c.to_host.len() as u32);
        if unannounced > 0 && (unannounced >= buf_alloc / 4 || seen_free < buf_alloc / 4) {
            c.owe |= owe::CREDIT_UPDATE;
        }
        if c.to_host.is_empty() && c.peer_shut & SHUTDOWN_SEND != 0 && !c.host_write_shut {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.host_write_shut = true;
        }
        let done = c.to_host.is_empty()
            && c.peer_shut & SHUTDOWN_SEND != 0
            && (c.peer_shut & SHUTDOWN_RCV != 0 || c.host_eof);
        if done {
            // Both directions are over: the guest expects our RST to free its socket.
            return self.kill(key, true);
        }
        self.update_interest(key);
        self.want_rx(key);
    }

    /// Both directions are shut from the host side: wait a while for the guest's RST.
    pub(super) fn start_closing(&mut self, key: Key) {
        let close_timeout = self.opts.close_timeout;
        if let Some(c) = self.conns.get_mut(&key) {
            if c.deadline.is_none() {
                c.deadline = Some(Instant::now() + close_timeout);
            }
        }
    }

    /// Drops a connection; `rst` tells the guest (when its driver is up).
    pub(super) fn kill(&mut self, key: Key, rst: bool) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        self.slots.remove(&c.stream.as_raw_fd());
        if c.host_initiated {
            self.local_ports.remove(&key.local);
        }
        if c.registered {
            // Closed once out of the watch list, after this pass.
            self.unwatch.push(c.stream);
        }
        if rst && self.active.is_some() {
            self.queue_rst(key);
        }
    }

    pub(super) fn queue_rst(&mut self, key: Key) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(key);
        } else {
            self.shared
                .counters
                .dropped_rsts
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(super) fn want_rx(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rx_queue && c.wants_rx() {
                c.in_rx_queue = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    // ----------------------------------------------------------------- guest side --
}
