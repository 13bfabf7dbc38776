//! The open API connections and what each is doing, so that a new client always gets in.
//!
//! A shim may keep one connection for a pod's whole life (Kata's Rust runtime does), so a
//! connection that has been served is never closed for being idle. Connections are bounded
//! instead: when a new one arrives at the limit, the one that matters least makes room —
//! first one that never began a request, then one stuck sending a request (each after a
//! [`GRACE`]: a request may be on its way), and, at twice the limit, the connection idle the
//! longest. A connection whose request the VMM is working on, or whose bytes wait unread (the
//! server is behind, not the client: a loaded host), is never touched. When nothing may make
//! room, the newcomer is still let in, up to twice the limit; past that it is refused (503).

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
            // Bytes waiting unread mean the server is behind, not the client: such a
            // connection is as busy as one with the VMM, and is never closed to make room. A
            // connection waiting for its client (fresh and silent, or stuck part-way through a
            // request) past its grace may go at the limit; at twice the limit, the longest idle
            // one too.
            // Each candidate's input is looked at once. A connection whose client closed goes
            // first (its thread has not noticed yet); one busy (with the VMM, or with bytes
            // waiting unread) is never a candidate.
            let hard = live >= 2 * self.max;
            let victim = inner
                .conns
                .iter()
                .filter(|(_, e)| !e.evicted && e.phase != Phase::Handling)
                .map(|(id, e)| (*id, e, input(&e.stream)))
                .filter(|(_, e, inp)| match (inp, e.phase) {
                    (Input::Waiting, _) => false,
                    (Input::Closed, _) => true,
                    (Input::None, Phase::Fresh | Phase::Reading) => {
                        hard || now.duration_since(e.since) >= GRACE
                    }
                    (Input::None, _) => hard,
                })
                .min_by_key(|(_, e, inp)| {
                    let stale = now.duration_since(e.since) >= GRACE;
                    (
                        *inp != Input::Closed,
                        e.phase == Phase::Idle || !stale,
                        e.phase,
                        e.since,
                    )
                })
                .map(|(id, _, _)| id);
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

/// What waits on a connection, looked at without waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Input {
    /// Nothing: the server waits for its client.
    None,
    /// Bytes the server has not read yet: the server is behind, not the client.
    Waiting,
    /// The client hung up.
    Closed,
}

fn input(stream: &UnixStream) -> Input {
    use std::os::fd::AsRawFd;
    let mut byte = 0u8;
    // SAFETY: a one-byte peek into a local, without waiting; nothing is consumed.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        // Bytes first, even from a client that then half-closed: its request stands.
        1.. => Input::Waiting,
        0 => Input::Closed,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Input::None,
            _ => Input::Closed,
        },
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

    #[test]
    fn a_hung_up_client_goes_first_and_a_waiting_request_is_never_closed() {
        use std::io::Write;
        let r = Registry::new(2);
        // One connection with a request waiting unread (its thread is slow: a loaded host),
        // one whose client hung up; both young.
        let (waiting, mut waiting_c) = pair();
        let (gone, gone_c) = pair();
        let _t1 = r.admit(&waiting).unwrap();
        let _t2 = r.admit(&gone).unwrap();
        waiting_c
            .write_all(b"GET /api/v1/vmm.ping HTTP/1.1\r\n\r\n")
            .unwrap();
        drop(gone_c);
        let (n, _nc) = pair();
        let _t3 = r.admit(&n).unwrap();
        // The hung-up one was closed at once, grace or not; the waiting request was not.
        assert_eq!(input(&gone), Input::Closed);
        assert_eq!(r.live(), 2);
        assert_eq!(input(&waiting), Input::Waiting);
    }
}
