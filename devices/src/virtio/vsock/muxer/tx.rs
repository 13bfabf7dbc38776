//! The tx queue (guest to host): packets parsed from chains, and what each operation does
//! (connect, data, credit, shutdown, reset); the agent-ready signal and CONNECT waits.

use super::*;

impl Muxer {
    pub(super) fn process_tx(&mut self) {
        if self.broken {
            return;
        }
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let chain = match active.tx.iter(mem.as_ref()) {
                Ok(mut it) => it.next(),
                Err(_) => return self.broken_queue("tx"),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let packet = read_packet(&mem, chain);
            if let Some(active) = self.active.as_mut() {
                if active.tx.add_used(mem.as_ref(), head, 0).is_err() {
                    return self.broken_queue("tx");
                }
            }
            self.used_tx = true;
            match packet {
                Ok(p) => self.guest_packet(p),
                Err((hdr, e)) => {
                    self.shared
                        .counters
                        .invalid_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.log
                        .say(format_args!("invalid packet from the guest: {e}"));
                    // Data of a connection was lost: its stream cannot go on.
                    if let Some(h) = hdr.filter(|h| h.src_cid == self.cid) {
                        self.kill(
                            Key {
                                local: h.dst_port,
                                peer: h.src_port,
                            },
                            true,
                        );
                    }
                }
            }
        }
    }

    pub(super) fn broken_queue(&mut self, which: &str) {
        self.broken = true;
        self.shared
            .counters
            .invalid_packets
            .fetch_add(1, Ordering::Relaxed);
        self.log.say(format_args!(
            "the guest's {which} queue is corrupt; device needs a reset"
        ));
        if let Some(a) = &self.active {
            a.interrupt.signal_needs_reset();
        }
    }

    pub(super) fn guest_packet(&mut self, p: TxPacket) {
        let h = p.hdr;
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            // Not from this guest's address, or not for the host: nothing to route it to.
            self.shared
                .counters
                .invalid_packets
                .fetch_add(1, Ordering::Relaxed);
            self.log.say(format_args!(
                "dropped a packet from cid {} to cid {} (guest cid is {})",
                h.src_cid, h.dst_cid, self.cid
            ));
            return;
        }
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        let op = h.op();
        if h.type_ != TYPE_STREAM {
            self.shared
                .counters
                .invalid_packets
                .fetch_add(1, Ordering::Relaxed);
            if op != Op::Rst {
                self.kill(key, false);
                self.queue_rst(key);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match op {
                Op::Request => self.guest_connect(key, &h),
                Op::Rst => {}
                _ => self.queue_rst(key),
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        // Every packet carries the sender's credit.
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if let State::Connecting { sent } = c.state {
            match op {
                Op::Response if sent => {
                    c.state = State::Established;
                    c.deadline = None;
                    let ok = format!("OK {}\n", key.local);
                    match send_nosig(&c.stream, ok.as_bytes()) {
                        Ok(n) if n == ok.len() => {
                            self.shared
                                .counters
                                .established
                                .fetch_add(1, Ordering::Relaxed);
                            self.update_interest(key);
                        }
                        _ => self.kill(key, true),
                    }
                }
                Op::Rst if sent => {
                    // Nothing listens on that guest port (yet): ask again shortly, until the
                    // deadline. The agent's ready signal makes every waiting CONNECT retry at once.
                    let now = Instant::now();
                    if c.deadline.is_some_and(|d| now >= d) {
                        self.shared
                            .counters
                            .connect_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        let why = refused_why(
                            key.peer,
                            self.shared.agent_ready.get().is_some(),
                            &self.opts,
                        );
                        tell(&c.stream, &why);
                        self.kill(key, false);
                    } else {
                        c.state = State::Connecting { sent: false };
                        c.retry_at = Some(now + c.backoff);
                        c.backoff = (c.backoff * 2).min(RETRY_MAX);
                        self.shared
                            .counters
                            .connect_retries
                            .fetch_add(1, Ordering::Relaxed);
                        if !c.refusal_reported {
                            c.refusal_reported = true;
                            self.shared
                                .emit(VsockEvent::ConnectRefused { port: key.peer });
                        }
                    }
                }
                _ => {
                    tell(&c.stream, "protocol error from the guest");
                    self.kill(key, op != Op::Rst);
                }
            }
            return;
        }
        match op {
            Op::Rw => self.guest_data(key, p.payload),
            Op::CreditUpdate => {}
            Op::CreditRequest => c.owe |= owe::CREDIT_UPDATE,
            Op::Shutdown => {
                c.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shut & SHUTDOWN_RCV != 0 {
                    c.host_readable = false;
                }
                self.after_forward(key);
            }
            Op::Rst => return self.kill(key, false),
            Op::Request | Op::Response | Op::Unknown(_) => {
                self.shared
                    .counters
                    .invalid_packets
                    .fetch_add(1, Ordering::Relaxed);
                return self.kill(key, true);
            }
        }
        self.update_interest(key);
        self.want_rx(key);
    }

    pub(super) fn guest_data(&mut self, key: Key, payload: Vec<u8>) {
        let buf_alloc = self.opts.buf_alloc as usize;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.peer_shut & SHUTDOWN_SEND != 0 {
            self.shared
                .counters
                .invalid_packets
                .fetch_add(1, Ordering::Relaxed);
            return self.kill(key, true);
        }
        // What the guest may send: our buffer size minus what it sent since the last fwd_cnt
        // we told it. (Its view lags ours, so a conforming guest is always within this.)
        let unacked = (c.rx_cnt - c.last_fwd_cnt_sent).0 as usize;
        let allowed = buf_alloc.saturating_sub(unacked);
        if payload.len() > allowed {
            // The guest ignored our credit: the stream cannot stay consistent.
            self.shared
                .counters
                .credit_violations
                .fetch_add(1, Ordering::Relaxed);
            self.log.say(format_args!(
                "guest port {} overran its credit ({} bytes sent, {allowed} allowed); reset",
                key.peer,
                payload.len(),
            ));
            return self.kill(key, true);
        }
        c.rx_cnt += Wrapping(payload.len() as u32);
        let mut written = 0;
        if c.to_host.is_empty() && !c.host_write_shut {
            while written < payload.len() {
                match send_nosig(&c.stream, &payload[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if would_block(&e) => break,
                    // The host peer is gone mid-stream.
                    Err(_) => return self.kill(key, true),
                }
            }
            c.fwd_cnt += Wrapping(written as u32);
        }
        c.to_host.extend(&payload[written..]);
        self.after_forward(key);
    }

    pub(super) fn guest_connect(&mut self, key: Key, h: &Header) {
        if key.local == self.opts.ready_port {
            // The agent's announcement: it listens now. Nothing is forwarded; RST says so.
            self.agent_ready();
            self.queue_rst(key);
            return;
        }
        if self.conns.len() >= self.opts.max_connections {
            self.shared
                .counters
                .refused_guest
                .fetch_add(1, Ordering::Relaxed);
            self.queue_rst(key);
            return;
        }
        let path = hybrid::port_path(&self.socket, key.local);
        let stream = match hybrid::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                self.shared
                    .counters
                    .refused_guest
                    .fetch_add(1, Ordering::Relaxed);
                self.log.say(format_args!(
                    "guest connection to host port {} refused: {}: {e}",
                    key.local,
                    path.display()
                ));
                self.queue_rst(key);
                return;
            }
        };
        let fd = stream.as_raw_fd();
        let mut c = Conn::new(stream, false, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        c.owe |= owe::RESPONSE;
        self.slots.insert(fd, Slot::Conn(key));
        self.conns.insert(key, c);
        self.shared
            .counters
            .established
            .fetch_add(1, Ordering::Relaxed);
        self.update_interest(key);
        self.want_rx(key);
    }

    /// How long a new host CONNECT may wait for the guest: long while the guest boots (no agent
    /// announcement yet), short once the agent is up.
    pub(super) fn connect_wait(&self) -> Duration {
        if self.shared.agent_ready.get().is_some() {
            self.opts.connect_timeout
        } else {
            self.opts.boot_connect_timeout
        }
    }

    pub(super) fn agent_ready(&mut self) {
        let now = Instant::now();
        let first = self.shared.agent_ready.set(now).is_ok();
        self.shared.emit(VsockEvent::AgentReady { first });
        if first {
            // The guest is up: a port that keeps refusing from now on fails in connect_timeout.
            let bound = now + self.opts.connect_timeout;
            for c in self.conns.values_mut() {
                if matches!(c.state, State::Connecting { .. }) {
                    c.deadline = Some(c.deadline.map_or(bound, |d| d.min(bound)));
                }
            }
        }
        // Every CONNECT waiting for a retry goes now.
        let waiting: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Connecting { sent: false })
            .map(|(k, _)| *k)
            .collect();
        if self.active.is_some() {
            for key in waiting {
                self.send_request(key);
            }
        }
    }
}

/// Copies a guest tx chain into a packet, checking it against what the chain holds.
/// On error, the header comes back too when it could be read.
fn read_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<TxPacket, (Option<Header>, PacketError)> {
    let mut reader = Reader::new(mem, chain).map_err(|_| (None, PacketError::Chain))?;
    let avail = reader.available_bytes();
    if avail < HEADER_LEN {
        return Err((None, PacketError::Short(avail)));
    }
    let mut raw = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| (None, PacketError::Chain))?;
    let hdr = Header::decode(&raw);
    let rest = reader.available_bytes();
    let len = hdr.len;
    // Only RW carries data; for other ops a non-zero len is ignored, as Linux does.
    let payload = if hdr.op() == Op::Rw {
        if len > MAX_PAYLOAD || len as usize > rest {
            return Err((
                Some(hdr),
                PacketError::BadLength {
                    len,
                    max: MAX_PAYLOAD,
                    avail: rest,
                },
            ));
        }
        let mut p = vec![0u8; len as usize];
        reader
            .read_exact(&mut p)
            .map_err(|_| (Some(hdr), PacketError::Chain))?;
        p
    } else {
        Vec::new()
    };
    Ok(TxPacket { hdr, payload })
}
