//! Host-side connections: accepting on the hybrid socket, reading a `CONNECT <port>` line,
//! connecting host-initiated streams to the guest (REQUEST) and the local ports they use.

use super::*;

impl Muxer {
    pub(super) fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    // EMFILE and the like: the client stays in the backlog; try later.
                    self.log.say(format_args!("accept failed: {e}"));
                    return;
                }
            };
            self.shared
                .counters
                .host_connections
                .fetch_add(1, Ordering::Relaxed);
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.pending.len() >= MAX_PENDING_HOST
                || self.conns.len() >= self.opts.max_connections
            {
                tell(&stream, "too many connections");
                self.shared
                    .counters
                    .refused_host
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let token = self.new_token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_err()
            {
                tell(&stream, "internal error: cannot watch the connection");
                continue;
            }
            self.slots.insert(token, Slot::Pending);
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + self.opts.line_timeout,
                },
            );
        }
    }

    pub(super) fn drop_pending(&mut self, token: u64, why: Option<String>) {
        self.slots.remove(&token);
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if let Some(why) = why {
                self.shared
                    .counters
                    .bad_connect_lines
                    .fetch_add(1, Ordering::Relaxed);
                self.log.say(format_args!("host connection dropped: {why}"));
                tell(&p.stream, &why);
            }
        }
    }

    /// Reads the CONNECT line, never a byte beyond its newline (what follows is data).
    pub(super) fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - p.line.len();
        let n = match peek(&p.stream, &mut buf[..room]) {
            Ok(0) => return self.drop_pending(token, None), // the client gave up
            Ok(n) => n,
            Err(e) if would_block(&e) => return,
            Err(_) => return self.drop_pending(token, None),
        };
        let newline = buf[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |i| i + 1);
        let mut got = vec![0u8; take];
        if p.stream.read_exact(&mut got).is_err() {
            return self.drop_pending(token, None);
        }
        p.line.extend_from_slice(&got);
        if newline.is_none() {
            if p.line.len() >= MAX_CONNECT_LINE {
                let e = hybrid::HybridError::LineTooLong.to_string();
                self.drop_pending(token, Some(e));
            }
            return;
        }
        let line_len = p.line.len() - 1;
        let parsed = hybrid::parse_connect_line(&p.line[..line_len]);
        match parsed {
            Err(e) => self.drop_pending(token, Some(e.to_string())),
            Ok(port) => self.host_connect(token, port),
        }
    }

    pub(super) fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..self.opts.max_connections + 1 {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.local_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// A host client asked for guest port `port`: ask the guest (now or once its driver is up).
    pub(super) fn host_connect(&mut self, token: u64, port: u32) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Some(local) = self.alloc_local_port() else {
            self.slots.remove(&token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            tell(&p.stream, "too many connections");
            return;
        };
        let key = Key { local, peer: port };
        let mut conn = Conn::new(p.stream, token, true, State::Connecting { sent: false });
        conn.deadline = Some(Instant::now() + self.connect_wait());
        conn.registered = true;
        conn.interest = EventSet::IN;
        self.local_ports.insert(local);
        self.slots.insert(token, Slot::Conn(key));
        self.conns.insert(key, conn);
        // While connecting, only a hang-up matters (EPOLLHUP is always reported); data the
        // client sends early waits in its socket.
        self.update_interest(key);
        if self.active.is_some() {
            self.send_request(key);
        }
    }

    pub(super) fn send_request(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.state = State::Connecting { sent: true };
            c.retry_at = None;
            c.owe |= owe::REQUEST;
        }
        self.want_rx(key);
    }
}
