//! Disk I/O engines: io_uring (the default) and synchronous system calls (the fallback).
//!
//! Both take requests whose buffers were already validated against guest memory, and
//! report completions as (descriptor head, status, bytes written to the guest).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use io_uring::register::Restriction;
use io_uring::{opcode, types, IoUring};

use super::request::{S_IOERR, S_OK};

/// One piece of I/O, with host addresses of guest buffers.
pub enum Io {
    Read {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    Write {
        offset: u64,
        iovecs: Vec<libc::iovec>,
    },
    Flush,
}

// SAFETY: the iovecs point into guest memory, which outlives every engine (the worker holds
// the memory's Arc); they are plain addresses handed to the kernel.
unsafe impl Send for Io {}

impl Io {
    fn expected(&self) -> i64 {
        match self {
            Io::Read { iovecs, .. } | Io::Write { iovecs, .. } => {
                iovecs.iter().map(|v| v.iov_len as i64).sum()
            }
            Io::Flush => 0,
        }
    }
}

/// A finished request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    pub head: u16,
    pub status: u8,
    /// Bytes written into the guest's buffers (data for reads), not counting the status.
    pub written: u32,
}

/// Which engine serves a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EngineKind {
    IoUring,
    Sync,
}

impl EngineKind {
    pub fn name(self) -> &'static str {
        match self {
            EngineKind::IoUring => "io_uring",
            EngineKind::Sync => "sync",
        }
    }

    /// io_uring if the kernel offers it with opcode restrictions (5.10 and later) and allows
    /// it (seccomp or sysctl may forbid it).
    pub fn detect() -> EngineKind {
        match restricted_ring(2) {
            Ok(_) => EngineKind::IoUring,
            Err(_) => EngineKind::Sync,
        }
    }
}

pub trait Engine: Send {
    /// Queues `io` for request `head`.
    fn submit(&mut self, head: u16, io: Io);
    /// Starts everything queued since the last call.
    fn kick(&mut self);
    /// Moves finished requests into `out`.
    fn reap(&mut self, out: &mut Vec<Completion>);
    /// An fd that becomes readable when completions are ready (None: completions are
    /// available right after `kick`).
    fn completion_fd(&self) -> Option<RawFd>;
    /// Waits until the kernel is done with every submitted request and forgets them all
    /// (the device is being reset: nothing may write guest memory afterwards).
    fn drain(&mut self);
    /// Asks the engine to watch `fd` (an eventfd) and report `token` from [`Engine::wait`]
    /// when it becomes readable. Ok(false): this engine cannot wait; the worker then waits
    /// with epoll on its own.
    fn watch(&mut self, _fd: RawFd, _token: u64) -> std::io::Result<bool> {
        Ok(false)
    }
    /// Submits what is queued, then, if `block`, sleeps until a request finishes or a
    /// watched fd fires (appending its token to `fired`). Finished requests are then ready
    /// for `reap`.
    fn wait(&mut self, _fired: &mut Vec<u64>, _block: bool) -> std::io::Result<()> {
        Ok(())
    }
    /// Hands what is queued to the kernel now, without waiting (a worker about to poll).
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// Whether a completion or a watched fd waits to be collected: cheap enough to call in a
    /// polling loop (no system call).
    fn ready(&mut self) -> bool {
        false
    }
    /// Requests the kernel holds: submitted and not finished (queued ones do not count).
    /// Collects the finished ones first, so they are then `ready`.
    fn held(&mut self) -> usize {
        0
    }
    /// Requests submitted and not yet reaped.
    fn in_flight(&self) -> usize;
}

/// Runs each request with preadv/pwritev/fdatasync on the worker thread.
pub struct SyncEngine {
    file: Arc<File>,
    done: Vec<Completion>,
}

impl SyncEngine {
    pub fn new(file: Arc<File>) -> Self {
        SyncEngine {
            file,
            done: Vec::new(),
        }
    }
}

/// Drops `n` bytes from the front of `iovecs` after a partial transfer.
fn advance(iovecs: &mut Vec<libc::iovec>, mut n: usize) {
    while n > 0 && !iovecs.is_empty() {
        if n >= iovecs[0].iov_len {
            n -= iovecs[0].iov_len;
            iovecs.remove(0);
        } else {
            iovecs[0].iov_base = (iovecs[0].iov_base as usize + n) as *mut libc::c_void;
            iovecs[0].iov_len -= n;
            n = 0;
        }
    }
}

fn run_sync(fd: RawFd, io: Io) -> (u8, u32) {
    match io {
        Io::Read { offset, iovecs } => rw_all(fd, offset, iovecs, false),
        Io::Write { offset, iovecs } => rw_all(fd, offset, iovecs, true),
        Io::Flush => {
            // SAFETY: fdatasync on a descriptor we own.
            if unsafe { libc::fdatasync(fd) } == 0 {
                (S_OK, 0)
            } else {
                (S_IOERR, 0)
            }
        }
    }
}

fn rw_all(fd: RawFd, mut offset: u64, mut iovecs: Vec<libc::iovec>, write: bool) -> (u8, u32) {
    let total: usize = iovecs.iter().map(|v| v.iov_len).sum();
    let mut done = 0usize;
    while !iovecs.is_empty() {
        let cnt = iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        // SAFETY: every iovec points into mapped guest memory of the stated length (checked
        // when the request was parsed), and the memory outlives this call.
        let n = unsafe {
            if write {
                libc::pwritev(fd, iovecs.as_ptr(), cnt, offset as libc::off_t)
            } else {
                libc::preadv(fd, iovecs.as_ptr(), cnt, offset as libc::off_t)
            }
        };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return (S_IOERR, 0);
        }
        if n == 0 {
            // End of file inside the disk's capacity: the file shrank under us.
            return (S_IOERR, 0);
        }
        done += n as usize;
        offset += n as u64;
        advance(&mut iovecs, n as usize);
    }
    debug_assert_eq!(done, total);
    (S_OK, if write { 0 } else { total as u32 })
}

impl Engine for SyncEngine {
    fn submit(&mut self, head: u16, io: Io) {
        let (status, written) = run_sync(self.file.as_raw_fd(), io);
        self.done.push(Completion {
            head,
            status,
            written,
        });
    }

    fn kick(&mut self) {}

    fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.done);
    }

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn drain(&mut self) {
        self.done.clear();
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}

struct InFlight {
    head: u16,
    io: Io,
}

/// Tags the user data of a watch (an eventfd polled through the ring) apart from I/O slots.
const WATCH_TAG: u64 = 1 << 63;

/// One io_uring per queue. The worker waits in `io_uring_enter` itself (`wait`): the queue's
/// notify eventfd and the kill eventfd are polled through the ring (multishot poll), so one
/// system call submits new requests, sleeps, and returns both finished requests and
/// notifications, as fio's own loop does.
pub struct UringEngine {
    ring: IoUring,
    file: Arc<File>,
    slots: Vec<Option<InFlight>>,
    free: Vec<usize>,
    pending: std::collections::VecDeque<(u16, Io)>,
    done: Vec<Completion>,
    /// Watched fds and their tokens, to re-arm a multishot poll the kernel ended.
    watches: Vec<(RawFd, u64)>,
    fired: Vec<u64>,
    /// Once the worker waits in `wait`, `kick` only fills the submission queue: the next
    /// `wait` submits and sleeps in one system call.
    defer_submit: bool,
}

/// The only operations a disk ring accepts.
const RING_OPS: [u8; 4] = [
    opcode::Readv::CODE,
    opcode::Writev::CODE,
    opcode::Fsync::CODE,
    opcode::PollAdd::CODE,
];

/// A ring that runs only [`RING_OPS`], with no SQE flags, and takes no further
/// registrations: the worker thread may call `io_uring_enter` (its seccomp filter lets it),
/// and io_uring's operations are not seen by seccomp, so the ring itself must refuse what the
/// worker has no business doing (opening files, connecting sockets...).
fn restricted_ring(entries: u32) -> std::io::Result<IoUring> {
    let ring = IoUring::builder().setup_r_disabled().build(entries)?;
    let mut allowed = RING_OPS.map(Restriction::sqe_op);
    ring.submitter().register_restrictions(&mut allowed)?;
    ring.submitter().register_enable_rings()?;
    Ok(ring)
}

impl UringEngine {
    /// Creating a ring is not a worker's (nor a vCPU's) business under seccomp: call this
    /// through `seccomp::setup`.
    pub fn new(file: Arc<File>, depth: u16) -> std::io::Result<Self> {
        let depth = u32::from(depth.max(1)).next_power_of_two();
        // Room for the watches beside a full queue of requests, within the kernel's limit of
        // 32768 entries (its completion queue is twice as deep; requests beyond the
        // submission queue wait in `pending`).
        let ring = restricted_ring((depth + 8).min(32768))?;
        Ok(UringEngine {
            ring,
            file,
            slots: (0..depth).map(|_| None).collect(),
            free: (0..depth as usize).rev().collect(),
            pending: Default::default(),
            done: Vec::new(),
            watches: Vec::new(),
            fired: Vec::new(),
            defer_submit: false,
        })
    }

    fn push_pending(&mut self) {
        while let Some(slot) = self.free.last().copied() {
            let Some((head, io)) = self.pending.pop_front() else {
                break;
            };
            let fd = types::Fd(self.file.as_raw_fd());
            let entry = match &io {
                Io::Read { offset, iovecs } => {
                    opcode::Readv::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                        .offset(*offset)
                        .build()
                }
                Io::Write { offset, iovecs } => {
                    opcode::Writev::new(fd, iovecs.as_ptr(), iovecs.len() as u32)
                        .offset(*offset)
                        .build()
                }
                Io::Flush => opcode::Fsync::new(fd)
                    .flags(types::FsyncFlags::DATASYNC)
                    .build(),
            }
            .user_data(slot as u64);
            // SAFETY: the iovec array and the buffers it names stay alive in `slots` until
            // the kernel reports this entry complete.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                self.pending.push_front((head, io));
                break;
            }
            self.free.pop();
            self.slots[slot] = Some(InFlight { head, io });
        }
    }

    fn arm(&mut self, fd: RawFd, token: u64) -> std::io::Result<()> {
        let entry = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32)
            .multi(true)
            .build()
            .user_data(WATCH_TAG | token);
        // SAFETY: a poll request refers to no memory of ours.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.ring.submit()?;
            // SAFETY: as above.
            unsafe { self.ring.submission().push(&entry) }.map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    "io_uring submission queue full",
                )
            })?;
        }
        Ok(())
    }

    /// Moves every CQE out of the ring: finished requests to `done`, watches to `fired`.
    fn drain_cq(&mut self) {
        let mut rearm = Vec::new();
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            if data & WATCH_TAG != 0 {
                let token = data & !WATCH_TAG;
                if !self.fired.contains(&token) {
                    self.fired.push(token);
                }
                if !io_uring::cqueue::more(cqe.flags()) {
                    rearm.push(token);
                }
                continue;
            }
            let slot = data as usize;
            let Some(inflight) = self.slots.get_mut(slot).and_then(Option::take) else {
                continue;
            };
            self.free.push(slot);
            let expected = inflight.io.expected();
            let (status, written) = match (&inflight.io, i64::from(cqe.result())) {
                (_, r) if r < 0 => (S_IOERR, 0),
                (Io::Flush, _) => (S_OK, 0),
                (Io::Read { .. }, r) if r == expected => (S_OK, r as u32),
                (Io::Write { .. }, r) if r == expected => (S_OK, 0),
                // A short transfer inside the disk: the file changed under us.
                _ => (S_IOERR, 0),
            };
            self.done.push(Completion {
                head: inflight.head,
                status,
                written,
            });
        }
        for token in rearm {
            if let Some(&(fd, _)) = self.watches.iter().find(|w| w.1 == token) {
                // On failure the token has fired anyway; the next wait re-arms nothing, and
                // the worker sees the error from the ring soon enough.
                let _ = self.arm(fd, token);
            }
        }
    }
}

impl Engine for UringEngine {
    fn submit(&mut self, head: u16, io: Io) {
        self.pending.push_back((head, io));
    }

    fn kick(&mut self) {
        if self.defer_submit {
            self.push_pending();
        } else {
            // EBUSY/EAGAIN leave the entries queued; the next kick (after a completion or a
            // notification) submits them again. Any other error shows at the next wait.
            let _ = self.flush();
        }
    }

    fn reap(&mut self, out: &mut Vec<Completion>) {
        self.drain_cq();
        out.append(&mut self.done);
        // Freed slots let queued requests go.
        if !self.pending.is_empty() {
            self.kick();
        }
    }

    fn completion_fd(&self) -> Option<RawFd> {
        // The ring itself polls readable while completions wait in it.
        Some(self.ring.as_raw_fd())
    }

    fn watch(&mut self, fd: RawFd, token: u64) -> std::io::Result<bool> {
        self.arm(fd, token)?;
        self.watches.push((fd, token));
        self.ring.submit()?;
        self.defer_submit = true;
        Ok(true)
    }

    fn wait(&mut self, fired: &mut Vec<u64>, block: bool) -> std::io::Result<()> {
        self.push_pending();
        let want = if !block || self.ready() { 0 } else { 1 };
        // Nothing to submit and nothing to wait for: no system call.
        if want == 1 || !self.ring.submission().is_empty() {
            match self.ring.submit_and_wait(want) {
                Ok(_) => {}
                // A signal, or a full completion queue (reaping below makes room).
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR) | Some(libc::EBUSY)) => {}
                Err(e) => return Err(e),
            }
        }
        self.drain_cq();
        fired.append(&mut self.fired);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.push_pending();
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        match self.ring.submit() {
            Ok(_) => Ok(()),
            // Left queued: the next kick or wait submits them.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR) | Some(libc::EBUSY) | Some(libc::EAGAIN)
                ) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    fn ready(&mut self) -> bool {
        !self.done.is_empty() || !self.fired.is_empty() || !self.ring.completion().is_empty()
    }

    fn held(&mut self) -> usize {
        // Finished ones free their slots; pushed entries the kernel has not consumed yet are
        // still ours.
        self.drain_cq();
        let unsubmitted = self.ring.submission().len();
        (self.slots.len() - self.free.len()).saturating_sub(unsubmitted)
    }

    fn drain(&mut self) {
        self.pending.clear();
        self.done.clear();
        while self.slots.len() > self.free.len() {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // The ring is unusable; dropping it still makes the kernel cancel and wait.
                Err(_) => return,
            }
            self.drain_cq();
            self.done.clear();
        }
    }

    fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len() + self.pending.len() + self.done.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_handles_partial_iovecs() {
        let mut buf = [0u8; 16];
        let base = buf.as_mut_ptr() as *mut libc::c_void;
        let mut v = vec![
            libc::iovec {
                iov_base: base,
                iov_len: 4,
            },
            libc::iovec {
                iov_base: (base as usize + 4) as *mut libc::c_void,
                iov_len: 12,
            },
        ];
        advance(&mut v, 6);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].iov_len, 10);
        assert_eq!(v[0].iov_base as usize, base as usize + 6);
        advance(&mut v, 10);
        assert!(v.is_empty());
    }

    #[test]
    fn the_ring_refuses_operations_a_disk_does_not_need() {
        let mut ring = restricted_ring(4).unwrap();
        let path = c"/etc/hostname";
        let open = opcode::OpenAt::new(types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(1);
        let mut buf = [0u8; 8];
        let read = opcode::Read::new(types::Fd(0), buf.as_mut_ptr(), 8)
            .build()
            .user_data(2);
        // A linked fsync: an allowed op with a flag the ring does not allow.
        let fsync = opcode::Fsync::new(types::Fd(0))
            .build()
            .flags(io_uring::squeue::Flags::IO_LINK)
            .user_data(3);
        // One at a time: the kernel stops taking entries at the first one it refuses.
        let mut results = Vec::new();
        for e in [&open, &read, &fsync] {
            // SAFETY: the path and buffer outlive the ring's answer (submit_and_wait below).
            unsafe { ring.submission().push(e) }.unwrap();
            ring.submit_and_wait(1).unwrap();
            results.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        }
        assert_eq!(
            results,
            vec![(1, -libc::EACCES), (2, -libc::EACCES), (3, -libc::EACCES)]
        );
        // And nothing can be registered any more (e.g. files or buffers).
        assert!(ring.submitter().register_files(&[0]).is_err());
    }
}
