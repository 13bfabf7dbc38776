//! The open API connections and what each is doing, so that a new client always gets in.
//!
//! A shim may keep one connection for a pod's whole life (Kata's Rust runtime does), so a
//! connection that has been served is never closed for being idle. Connections are bounded
//! instead: when a new one arrives at the limit, the one that matters least makes room —
//! first one that never began a request, then one stuck sending a request, then the
//! connection idle the longest. A connection whose request the VMM is working on is never
//! touched, nor one younger than [`GRACE`] that has not begun its request (it may be a client
//! whose request is on its way: threads pick connections up in no set order). When nothing may
//! make room, the newcomer is still let in, up to twice the limit; past that it is refused
//! (503).

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a new connection may take to begin its request before it can be closed to make
/// room for another.
pub(crate) const GRACE: Duration = Duration::from_millis(250);

/// What a connection is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// Accepted, no request begun yet (the first to make room).
    Fresh,
    /// Part of a request received.
    Reading,
    /// Served before, waiting for its next request.
    Idle,
    /// A request is with the VMM or its answer is being written: never closed.
    Handling,
}

struct Entry {
    /// A second handle on the socket, to wake its thread with a shutdown.
    stream: UnixStream,
    phase: Phase,
    since: Instant,
    /// Told to make room; its thread is on its way out.
    evicted: bool,
}

pub(crate) struct Registry {
    max: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next: u64,
    conns: HashMap<u64, Entry>,
}

/// A connection's place in the registry; dropping it (the thread is done) frees the place.
pub(crate) struct Ticket<'a> {
    registry: &'a Registry,
    id: u64,
}

impl Registry {
    pub fn new(max: usize) -> Self {
        Registry {
            max: max.max(1),
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Admits `stream`, making room at the limit; None when every connection is handling a
    /// request (or the stream cannot be duplicated).
    pub fn admit(&self, stream: &UnixStream) -> Option<Ticket<'_>> {
        let handle = stream.try_clone().ok()?;
        let mut inner = self.lock();
        let live = inner.conns.values().filter(|e| !e.evicted).count();
        if live >= self.max {
            let now = Instant::now();
            // A fresh connection whose request is already waiting to be read is a client like
            // any other, only not yet picked up by its thread: rank it as reading.
            let rank = |e: &Entry| match e.phase {
                Phase::Fresh if has_input(&e.stream) => Phase::Reading,
                p => p,
            };
            // At the limit, only a connection that let its grace pass without a whole request
            // makes room; at twice the limit, the longest idle one too, then any but a busy one.
            let hard = live >= 2 * self.max;
            let victim = inner
                .conns
                .iter()
                .filter(|(_, e)| !e.evicted && e.phase != Phase::Handling)
                .filter(|(_, e)| {
                    hard || (rank(e) != Phase::Idle && now.duration_since(e.since) >= GRACE)
                })
                .min_by_key(|(_, e)| {
                    let stale = now.duration_since(e.since) >= GRACE;
                    (!stale && rank(e) != Phase::Idle, rank(e), e.since)
                })
                .map(|(id, _)| *id);
            match victim {
                Some(v) => {
                    if let Some(e) = inner.conns.get_mut(&v) {
                        e.evicted = true;
                        // Wakes its thread (its read sees end-of-file); the thread then leaves.
                        let _ = e.stream.shutdown(Shutdown::Both);
                    }
                }
                None if hard => return None,
                None => {}
            }
        }
        let id = inner.next;
        inner.next += 1;
        inner.conns.insert(
            id,
            Entry {
                stream: handle,
                phase: Phase::Fresh,
                since: Instant::now(),
                evicted: false,
            },
        );
        Some(Ticket { registry: self, id })
    }

    /// Connections not yet told to make room.
    #[cfg(test)]
    pub fn live(&self) -> usize {
        self.lock().conns.values().filter(|e| !e.evicted).count()
    }
}

/// Whether bytes (or a hang-up) wait on `stream`, without waiting.
fn has_input(stream: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    let mut pfd = libc::pollfd {
        fd: stream.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

impl Ticket<'_> {
    pub fn set(&self, phase: Phase) {
        if let Some(e) = self.registry.lock().conns.get_mut(&self.id) {
            e.phase = phase;
            e.since = Instant::now();
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.registry.lock().conns.remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn pair() -> (UnixStream, UnixStream) {
        UnixStream::pair().unwrap()
    }

    /// Whether the peer of `ours` was shut down (a read sees end-of-file at once).
    fn closed(client: &mut UnixStream) -> bool {
        client.set_nonblocking(true).unwrap();
        matches!(client.read(&mut [0u8; 1]), Ok(0))
    }

    #[test]
    fn makes_room_in_order_and_never_closes_a_busy_connection() {
        let r = Registry::new(3);
        let (busy, mut busy_c) = pair();
        let (idle, mut idle_c) = pair();
        let (fresh, mut fresh_c) = pair();
        let t_busy = r.admit(&busy).unwrap();
        t_busy.set(Phase::Handling);
        let t_idle = r.admit(&idle).unwrap();
        t_idle.set(Phase::Idle);
        let _t_fresh = r.admit(&fresh).unwrap();
        assert_eq!(r.live(), 3);
        // At the limit, but the fresh connection is within its grace and the idle one was
        // served: the newcomer gets in over the limit, nobody is closed.
        let (young, _young_c) = pair();
        let t_young = r.admit(&young).unwrap();
        assert_eq!(r.live(), 4);
        assert!(!closed(&mut fresh_c) && !closed(&mut idle_c));
        drop(t_young);
        std::thread::sleep(GRACE);
        // Its grace over, the silent fresh connection makes room.
        let (n1, mut n1c) = pair();
        let t1 = r.admit(&n1).unwrap();
        assert!(closed(&mut fresh_c));
        assert!(!closed(&mut idle_c) && !closed(&mut busy_c));
        assert_eq!(r.live(), 3);
        // A stalled sender goes too, once its grace is over; the served idle one stays.
        t1.set(Phase::Reading);
        std::thread::sleep(GRACE);
        let (n2, mut n2c) = pair();
        let t2 = r.admit(&n2).unwrap();
        assert!(closed(&mut n1c));
        assert!(!closed(&mut idle_c));
        t2.set(Phase::Handling);
        // Nothing left that may make room at the limit: over it, up to twice the limit...
        let extra: Vec<_> = (0..3).map(|_| pair()).collect();
        let tickets: Vec<_> = extra.iter().map(|(s, _)| r.admit(s).unwrap()).collect();
        for t in &tickets {
            t.set(Phase::Handling);
        }
        assert_eq!(r.live(), 6);
        assert!(!closed(&mut idle_c));
        // ...where the longest idle connection makes room,
        let (n3, _n3c) = pair();
        let t3 = r.admit(&n3).unwrap();
        assert!(closed(&mut idle_c));
        t3.set(Phase::Handling);
        // and when every connection is busy the newcomer is refused.
        let (n4, _n4c) = pair();
        assert!(r.admit(&n4).is_none());
        assert!(!closed(&mut busy_c) && !closed(&mut n2c));
        drop((t_busy, t_idle, t2, t3, tickets));
    }
}
