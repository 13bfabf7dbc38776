//! Deadlines: CONNECT retries and holds, close timeouts, CONNECT lines; and the timerfd that
//! wakes the loop at the nearest one.

use super::*;

impl Muxer {
    /// The nearest deadline, if any.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n: Instant| n.min(t)));
        };
        for p in self.pending.values() {
            consider(p.deadline);
        }
        for c in self.conns.values() {
            if let Some(d) = c.deadline {
                consider(d);
            }
            if let Some(r) = c.retry_at {
                if self.active.is_some() {
                    consider(r);
                }
            }
        }
        next
    }

    /// Arms the timer for the nearest deadline (disarms it if there is none), unless it is
    /// armed for that one already.
    pub(super) fn arm_timer(&mut self) {
        let next = self.next_deadline();
        if next == self.timer_at {
            return;
        }
        let armed = match next {
            None => self.timer.clear(),
            // A zero duration would disarm it: a deadline already past expires at once.
            Some(t) => self.timer.reset(
                t.saturating_duration_since(Instant::now())
                    .max(Duration::from_nanos(1)),
                None,
            ),
        };
        match armed {
            Ok(()) => self.timer_at = next,
            Err(e) => self.outcome = Some(Err(format!("arming its timer: {e}"))),
        }
    }

    pub(super) fn timers(&mut self, now: Instant) {
        let late: Vec<RawFd> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for fd in late {
            let why = format!(
                "no CONNECT line within {} ms",
                self.opts.line_timeout.as_millis()
            );
            self.drop_pending(fd, Some(why));
        }
        let mut expired = Vec::new();
        let mut retry = Vec::new();
        for (k, c) in &self.conns {
            if c.deadline.is_some_and(|d| d <= now) {
                expired.push(*k);
            } else if c.retry_at.is_some_and(|r| r <= now) && self.active.is_some() {
                retry.push(*k);
            }
        }
        for key in expired {
            let Some(c) = self.conns.get(&key) else {
                continue;
            };
            match c.state {
                State::Connecting { sent } => {
                    let ready = self.shared.agent_ready.get().is_some();
                    let why = if c.refusal_reported {
                        refused_why(key.peer, ready, &self.opts)
                    } else {
                        let ms = if ready {
                            self.opts.connect_timeout
                        } else {
                            self.opts.boot_connect_timeout
                        }
                        .as_millis();
                        format!(
                            "timed out after {ms} ms waiting for guest port {} to accept",
                            key.peer
                        )
                    };
                    tell(&c.stream, &why);
                    self.shared
                        .counters
                        .connect_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    self.kill(key, sent);
                }
                // Closing: the guest never sent its RST.
                State::Established => self.kill(key, true),
            }
        }
        for key in retry {
            self.send_request(key);
        }
    }
}
