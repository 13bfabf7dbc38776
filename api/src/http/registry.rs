//! The open API connections and what each is doing, so that a new client always gets in.
//!
//! A shim may keep one connection for a pod's whole life (Kata's Rust runtime does), so a
//! connection that has been served is never closed for being idle. Connections are bounded
//! instead: when a new one arrives at the limit, the one that matters least makes room —
//! first one that never began a request, then one stuck sending a request, then the
//! connection idle the longest. A connection whose request the VMM is working on is never
//! touched; only when every connection is in that state is the newcomer refused (503).

use std::collections::HashMap;
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::Mutex;
use std::time::Instant;

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
            let victim = inner
                .conns
                .iter()
                .filter(|(_, e)| !e.evicted && e.phase != Phase::Handling)
                .min_by_key(|(_, e)| (e.phase, e.since))
                .map(|(id, _)| *id)?;
            if let Some(e) = inner.conns.get_mut(&victim) {
                e.evicted = true;
                // Wakes its thread (its read sees end-of-file); the thread then leaves.
                let _ = e.stream.shutdown(Shutdown::Both);
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
        // Full: the fresh connection (never began a request) goes first.
        let (n1, _n1c) = pair();
        let t1 = r.admit(&n1).unwrap();
        assert!(closed(&mut fresh_c));
        assert!(!closed(&mut idle_c) && !closed(&mut busy_c));
        assert_eq!(r.live(), 3);
        // Then one part-way through a request, before one idle after being served.
        t1.set(Phase::Reading);
        let (n2, mut n2c) = pair();
        let t2 = r.admit(&n2).unwrap();
        assert!(!closed(&mut idle_c));
        t2.set(Phase::Idle);
        let (n3, _n3c) = pair();
        let t3 = r.admit(&n3).unwrap();
        // The longest idle of the two idle ones goes now (t_idle, older than t2).
        assert!(closed(&mut idle_c));
        assert!(!closed(&mut n2c) && !closed(&mut busy_c));
        // Everyone busy: the newcomer is refused.
        t2.set(Phase::Handling);
        t3.set(Phase::Handling);
        let (n4, _n4c) = pair();
        assert!(r.admit(&n4).is_none());
        assert!(!closed(&mut busy_c));
        // A place freed by a finished thread is taken without closing anyone.
        drop(t3);
        let (n5, _n5c) = pair();
        assert!(r.admit(&n5).is_some());
        assert!(!closed(&mut busy_c) && !closed(&mut n2c));
        drop((t_busy, t_idle, t2));
    }
}
