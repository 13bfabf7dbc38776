//! Host-side connections: accepting on the hybrid socket, reading a `CONNECT <port>` line,
//! connecting host-initiated streams to the guest (REQUEST) and the local ports they use.

use super::*;

impl Muxer {
    pub(super) fn accept(&mut self, ops: &mut EventOps) {
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
            let fd = stream.as_raw_fd();
            if ops
                .add(Events::with_data(&stream, STREAM, EventSet::IN))
                .is_err()
            {
                tell(&stream, "internal error: cannot watch the connection");
                continue;
            }
            self.slots.insert(fd, Slot::Pending);
            self.pending.insert(
                fd,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + self.opts.line_timeout,
                },
            );
        }
    }

    pub(super) fn drop_pending(&mut self, fd: RawFd, why: Option<String>) {
        self.slots.remove(&fd);
        if let Some(p) = self.pending.remove(&fd) {
            if let Some(why) = why {
                self.shared
                    .counters
                    .bad_connect_lines
                    .fetch_add(1, Ordering::Relaxed);
                self.log.say(format_args!("host connection dropped: {why}"));
                tell(&p.stream, &why);
            }
            self.unwatch.push(p.stream);
        }
    }

    /// Reads the CONNECT line, never a byte beyond its newline (what follows is data).
    pub(super) fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - p.line.len();
        let n = match peek(&p.stream, &mut buf[..room]) {
            Ok(0) => return self.drop_pending(fd, None), // the client gave up
            Ok(n) => n,
            Err(e) if would_block(&e) => return,
            Err(_) => return self.drop_pending(fd, None),
        };
        let newline = buf[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |i| i + 1);
        let mut got = vec![0u8; take];
        if p.stream.read_exact(&mut got).is_err() {
            return self.drop_pending(fd, None);
        }
        p.line.extend_from_slice(&got);
        if newline.is_none() {
            if p.line.len() >= MAX_CONNECT_LINE {
                let e = hybrid::HybridError::LineTooLong.to_string();
                self.drop_pending(fd, Some(e));
            }
            return;
        }
        let line_len = p.line.len() - 1;
        let parsed = hybrid::parse_connect_line(&p.line[..line_len]);
        match parsed {
            Err(e) => self.drop_pending(fd, Some(e.to_string())),
            Ok(port) => self.host_connect(fd, port),
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
    pub(super) fn host_connect(&mut self, fd: RawFd, port: u32) {
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let Some(local) = self.alloc_local_port() else {
            self.slots.remove(&fd);
            tell(&p.stream, "too many connections");
            self.unwatch.push(p.stream);
            return;
        };
        let key = Key { local, peer: port };
        // The stream stays watched as it was while pending.
        let mut conn = Conn::new(p.stream, true, State::Connecting { sent: false });
        conn.deadline = Some(Instant::now() + self.connect_wait());
        conn.registered = true;
        conn.interest = EventSet::IN;
        self.local_ports.insert(local);
        self.slots.insert(fd, Slot::Conn(key));
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
