//! The rx queue (host to guest): filling the guest's buffers with pending control packets
//! and host data, within the guest's credit; the interrupt.

use super::*;

impl Muxer {
    /// Fills rx buffers with what connections owe the guest.
    pub(super) fn process_rx(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        let mut buf = Vec::new();
        while !self.rsts.is_empty() || !self.rx_queue.is_empty() {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let chain = match active.rx.iter(mem.as_ref()) {
                Ok(mut it) => it.next(),
                Err(_) => return self.broken_queue("rx"),
            };
            let Some(chain) = chain else {
                // No buffers: the driver notifies the rx queue when it posts more.
                return;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(mem.as_ref(), chain) {
                Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                _ => {
                    self.shared
                        .counters
                        .invalid_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.log.say(format_args!(
                        "rx buffer unusable (unmapped or under 44 bytes)"
                    ));
                    self.put_used_rx(&mem, head, 0);
                    continue;
                }
            };
            let room = (writer.available_bytes() - HEADER_LEN).min(MAX_PAYLOAD as usize);
            let Some(hdr) = self.next_rx_packet(room, &mut buf) else {
                // Nothing after all (streams had no data): give the buffer back.
                if let Some(active) = self.active.as_mut() {
                    active.rx.go_to_previous_position();
                }
                return;
            };
            let payload = &buf[..hdr.len as usize];
            let ok = writer.write_all(&hdr.encode()).is_ok() && writer.write_all(payload).is_ok();
            let len = if ok {
                (HEADER_LEN + payload.len()) as u32
            } else {
                0
            };
            self.put_used_rx(&mem, head, len);
        }
    }

    pub(super) fn put_used_rx(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if let Some(active) = self.active.as_mut() {
            if active.rx.add_used(mem, head, len).is_err() {
                return self.broken_queue("rx");
            }
            self.used_rx = true;
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes read into `buf`.
    pub(super) fn next_rx_packet(&mut self, room: usize, buf: &mut Vec<u8>) -> Option<Header> {
        let buf_alloc = self.opts.buf_alloc;
        if let Some(key) = self.rsts.pop_front() {
            return Some(Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: key.local,
                dst_port: key.peer,
                type_: TYPE_STREAM,
                op: Op::Rst.into(),
                ..Header::default()
            });
        }
        // Each connection queued now gets one chance; those re-queued wait for the next buffer.
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rx_queue = false;
            let hdr = self.conn_rx_packet(key, room, buf, buf_alloc);
            if let Some(c) = self.conns.get_mut(&key) {
                if hdr.is_some() {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    c.owe &= !owe::CREDIT_UPDATE;
                }
            }
            self.update_interest(key);
            // Round robin: back of the line if it has more to say.
            self.want_rx(key);
            if hdr.is_some() {
                return hdr;
            }
            if !self.rsts.is_empty() {
                return self.next_rx_packet(room, buf);
            }
        }
        None
    }

    pub(super) fn conn_rx_packet(
        &mut self,
        key: Key,
        room: usize,
        buf: &mut Vec<u8>,
        buf_alloc: u32,
    ) -> Option<Header> {
        let cid = self.cid;
        let c = self.conns.get_mut(&key)?;
        for (bit, op) in [
            (owe::REQUEST, Op::Request),
            (owe::RESPONSE, Op::Response),
            (owe::SHUTDOWN, Op::Shutdown),
        ] {
            if c.owe & bit != 0 {
                c.owe &= !bit;
                let mut h = c.header(key, cid, op, buf_alloc);
                if op == Op::Shutdown {
                    h.flags = c.shutdown_flags;
                }
                return Some(h);
            }
        }
        if c.can_send_data() && room > 0 {
            let want = room.min(c.peer_credit() as usize);
            buf.resize(want, 0);
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    // The host sends no more. A full close (HUP) means it reads no more either.
                    c.host_eof = true;
                    c.host_readable = false;
                    c.shutdown_flags |= SHUTDOWN_SEND;
                    if c.host_hup {
                        c.shutdown_flags |= SHUTDOWN_RCV;
                    }
                    let mut h = c.header(key, cid, Op::Shutdown, buf_alloc);
                    h.flags = c.shutdown_flags;
                    if c.host_hup || c.peer_shut & SHUTDOWN_SEND != 0 {
                        self.start_closing(key);
                    }
                    return Some(h);
                }
                Ok(n) => {
                    c.tx_cnt += Wrapping(n as u32);
                    let mut h = c.header(key, cid, Op::Rw, buf_alloc);
                    h.len = n as u32;
                    return Some(h);
                }
                Err(e) if would_block(&e) => {
                    c.host_readable = false;
                }
                Err(_) => {
                    self.kill(key, true);
                    return None;
                }
            }
        }
        if c.owe & owe::CREDIT_UPDATE != 0 {
            return Some(c.header(key, cid, Op::CreditUpdate, buf_alloc));
        }
        None
    }

    pub(super) fn notify_guest(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut signal = false;
        for (used, q) in [
            (std::mem::take(&mut self.used_rx), &mut active.rx),
            (std::mem::take(&mut self.used_tx), &mut active.tx),
        ] {
            if used {
                signal |= q.needs_notification(mem.as_ref()).unwrap_or(true);
            }
        }
        if signal {
            active.interrupt.signal_used();
        }
    }

    // ---------------------------------------------------------------------- timers --
}
