//! One queue's worker: it takes chains from the avail ring, hands them to its engine, returns
//! them to the used ring, and between passes polls or sleeps (see [`Worker::look_for_work`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::engine::{Completion, Engine, Io};
use super::request::{
    self, ParseError, Request, RequestType, ID_BYTES, SECTOR_SHIFT, S_IOERR, S_OK, S_UNSUPP,
};
use super::BlockCounters;
use crate::virtio::Interrupt;

/// The disk a queue worker serves: the open image, its size, whether it is read-only.
pub(super) struct OpenDisk {
    pub(super) capacity: u64,
    pub(super) readonly: bool,
    pub(super) id: String,
    pub(super) file: Arc<File>,
}

/// Serves one queue.
pub struct Worker {
    pub(super) queue: Queue,
    queue_evt: EventFd,
    kill_evt: EventFd,
    mem: Arc<GuestMemoryMmap>,
    interrupt: Arc<Interrupt>,
    pub(super) engine: Box<dyn Engine>,
    disk: OpenDisk,
    counters: Arc<BlockCounters>,
    /// Whether a guest error was already logged (log once, count always).
    reported: bool,
    /// The avail ring was corrupt: the queue is not served until the driver resets the device.
    pub(super) broken: bool,
    /// Each submitted request, by descriptor head.
    inflight: Vec<Option<InFlight>>,
    /// Reused for every batch of completions.
    done: Vec<Completion>,
    /// The longest the worker polls for more work before it sleeps (zero: never; see
    /// [`Worker::look_for_work`]), and the window it polls now (adaptive).
    poll_max: Duration,
    poll: Duration,
    /// When the worker last ran out of work with nothing in the kernel (to adapt `poll`).
    idle_since: Option<Instant>,
    /// Passes left before polling is tried again, after requests that did not finish while
    /// they were submitted, or a poll that found nothing.
    skip_polls: u32,
    /// Whether the driver is asked to notify (false after a pass, until the worker sleeps).
    listening: bool,
}

/// What the worker remembers about a request the engine is running.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    status_addr: GuestAddress,
    flush: bool,
}

/// The longest a queue worker polls before it sleeps (see [`Worker::look_for_work`]):
/// QEMU's iothreads poll up to 32 µs by default; a notify exit and a wake-up cost more than
/// that on a nested (PVM) host.
pub const POLL_MAX: Duration = Duration::from_micros(50);
/// The first window adaptive polling tries.
const POLL_START: Duration = Duration::from_micros(4);
/// Passes without polling after a batch the kernel did not finish at once (see
/// [`Worker::look_for_work`]): the disk is slow next to a notify, and a spin would only burn
/// the CPU it takes to answer.
const SLOW_IO_PASSES: u32 = 64;
/// Passes without polling after a poll that found nothing: on a host whose cores are all
/// busy the spin may be what keeps the driver's vCPU from running. Measured (blk_iops, page
/// cache, 2 cores with two CPU hogs): polling on / off 0.95-0.98 with 16, 0.82-1.26 with 4,
/// 0.79 with none; on idle cores 16 costs nothing measurable.
const FAILED_POLL_PASSES: u32 = 16;
/// Checks between two reads of the clock while polling.
const POLL_SPINS: u32 = 256;

const TOKEN_QUEUE: u64 = 0;
const TOKEN_KILL: u64 = 1;
const TOKEN_ENGINE: u64 = 2;

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        queue: Queue,
        queue_evt: EventFd,
        kill_evt: EventFd,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<Interrupt>,
        engine: Box<dyn Engine>,
        disk: OpenDisk,
        counters: Arc<BlockCounters>,
        poll_max: Duration,
    ) -> Self {
        let size = usize::from(queue.size());
        Worker {
            queue,
            queue_evt,
            kill_evt,
            mem,
            interrupt,
            engine,
            disk,
            counters,
            reported: false,
            broken: false,
            inflight: vec![None; size],
            done: Vec::with_capacity(size),
            poll_max,
            poll: Duration::ZERO,
            idle_since: None,
            skip_polls: 0,
            listening: true,
        }
    }

    /// Serves the queue until told to stop; an error it cannot go on from ends it early (the
    /// spawner turns that into a device error).
    pub(super) fn run(mut self) -> Result<(), String> {
        // io_uring waits for the notify and kill eventfds itself (one system call submits,
        // sleeps and reaps); other engines leave the waiting to epoll.
        let native = self
            .engine
            .watch(self.queue_evt.as_raw_fd(), TOKEN_QUEUE)
            .and_then(|q| Ok(q && self.engine.watch(self.kill_evt.as_raw_fd(), TOKEN_KILL)?));
        match native {
            Ok(true) => self.run_native(),
            Ok(false) => {
                // Its requests finish inside `kick`: there is nothing to poll for.
                self.poll_max = Duration::ZERO;
                self.run_epoll()
            }
            Err(e) => Err(format!("watching its queue: {e}")),
        }
    }

    /// The driver reset the device: let requests the kernel is running finish, so none
    /// writes into guest memory afterwards; their results are not reported (the rings are
    /// no longer ours).
    fn stop(mut self) {
        self.engine.drain();
    }

    fn run_native(mut self) -> Result<(), String> {
        // Requests may already be waiting (a driver that notified before we started).
        self.process_queue();
        let mut fired = Vec::with_capacity(2);
        loop {
            fired.clear();
            // After a pass that took requests, look for more before sleeping: the driver adds
            // to the avail ring without notifying (each notify is a VM exit), and the
            // completions of what was just submitted may be microseconds away.
            let more = !self.listening && self.look_for_work();
            if let Err(e) = self.engine.wait(&mut fired, !more) {
                self.stop();
                return Err(format!("waiting on its io_uring: {e}"));
            }
            if let Some(since) = self.idle_since.take() {
                self.adapt_poll(since.elapsed());
            }
            if fired.contains(&TOKEN_KILL) {
                self.stop();
                return Ok(());
            }
            if fired.contains(&TOKEN_QUEUE) {
                let _ = self.queue_evt.read();
            }
            if more || fired.contains(&TOKEN_QUEUE) {
                self.process_queue();
            }
            // Always reap: a completion left in the engine would make the next wait return
            // at once, forever.
            self.complete();
        }
    }

    fn run_epoll(mut self) -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| format!("creating its epoll: {e}"))?;
        let mut fds = vec![
            (self.queue_evt.as_raw_fd(), TOKEN_QUEUE),
            (self.kill_evt.as_raw_fd(), TOKEN_KILL),
        ];
        if let Some(fd) = self.engine.completion_fd() {
            fds.push((fd, TOKEN_ENGINE));
        }
        for (fd, token) in fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(|e| format!("watching its events: {e}"))?;
        }
        let mut events = vec![EpollEvent::default(); 4];
        self.process_queue();
        loop {
            let n = match epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.stop();
                    return Err(format!("waiting for events: {e}"));
                }
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_KILL => {
                        self.stop();
                        return Ok(());
                    }
                    TOKEN_QUEUE => {
                        let _ = self.queue_evt.read();
                        self.process_queue();
                    }
                    _ => self.complete(),
                }
            }
        }
    }

    fn note_guest_error(&mut self, e: &ParseError) {
        self.counters
            .invalid_requests
            .fetch_add(1, Ordering::Relaxed);
        if !self.reported {
            self.reported = true;
            log::warn!(
                "disk {}: invalid request from the guest: {e} (further ones are only counted)",
                self.disk.id
            );
        }
    }

    /// Pops every available chain, with notifications off while doing so (event index).
    pub fn process_queue(&mut self) {
        if self.broken {
            return;
        }
        let mem = self.mem.clone();
        // A worker that will not poll after this pass listens again at once, as one without
        // polling does (the driver's next notify then comes as early as it can).
        let may_poll = !self.poll_max.is_zero() && self.skip_polls == 0;
        self.skip_polls = self.skip_polls.saturating_sub(1);
        loop {
            if self.queue.disable_notification(mem.as_ref()).is_err() {
                return self.broken_queue();
            }
            self.listening = false;
            loop {
                let chain = match self.queue.iter(mem.as_ref()) {
                    Ok(mut it) => it.next(),
                    Err(_) => return self.broken_queue(),
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                match request::parse(chain, mem.as_ref(), self.disk.capacity, self.disk.readonly) {
                    Ok(req) => self.start(head, req),
                    Err(rej) => {
                        let status = match rej.error {
                            ParseError::Unsupported(_) => S_UNSUPP,
                            _ => S_IOERR,
                        };
                        self.note_guest_error(&rej.error);
                        self.finish(head, rej.status_addr, status, 0);
                    }
                }
            }
            // One that may poll listens again only when it is about to sleep.
            if may_poll || self.listen() {
                break;
            }
        }
        self.engine.kick();
        self.complete();
    }

    /// Asks the driver to notify again. False: requests arrived meanwhile (take them first);
    /// true also when the queue is broken (nothing more will be taken from it).
    fn listen(&mut self) -> bool {
        match self.queue.enable_notification(self.mem.as_ref()) {
            Ok(true) => false,
            Ok(false) => {
                self.listening = true;
                true
            }
            Err(_) => {
                self.broken_queue();
                true
            }
        }
    }

    /// Called before sleeping while the driver's notifications are off (after a pass that
    /// took requests). True: there is work, do not sleep. Otherwise the driver is asked to
    /// notify again (and if requests raced with that, true after all).
    ///
    /// When the kernel holds none of this queue's requests and finished the last ones while
    /// they were submitted (the page cache, a fast device), the worker first polls, with
    /// notifications still off, for up to its adaptive window: a busy driver's next requests
    /// are then taken without a notify (a VM exit) and a wake-up each. While requests are in
    /// the kernel (a disk), it sleeps at once: polling would only burn the CPU the disk takes
    /// to answer, and split the driver's batches.
    fn look_for_work(&mut self) -> bool {
        if self.broken {
            return false;
        }
        if self.engine.ready() {
            return true;
        }
        // (Without polling, or while it is skipped, `process_queue` listened already and this
        // is not called.)
        if self.engine.held() > 0 {
            return !self.listen();
        }
        // How long until the next work arrives decides the window (see `adapt_poll`).
        self.idle_since = Some(Instant::now());
        if !self.poll.is_zero() {
            // What was queued must reach the kernel before the spin, or it never finishes.
            if self.engine.flush().is_err() {
                return !self.listen();
            }
            if self.engine.held() > 0 {
                // The kernel did not finish them while submitting: a disk, not the page
                // cache. Sleep until they complete, and try polling again only later.
                self.skip_polls = SLOW_IO_PASSES;
                return !self.listen();
            }
            let start = Instant::now();
            loop {
                for _ in 0..POLL_SPINS {
                    if self.engine.ready() || self.avail_pending() {
                        return true;
                    }
                    std::hint::spin_loop();
                }
                if start.elapsed() >= self.poll {
                    break;
                }
            }
            self.skip_polls = FAILED_POLL_PASSES;
        }
        !self.listen()
    }

    /// QEMU's adaptive polling (util/aio-posix.c), for one queue: work that came within the
    /// window needs no change; work that came later, but within `poll_max`, widens the window
    /// (from 4 µs, doubling); work that took longer than `poll_max` (a disk's latency, an
    /// idle driver) turns polling off until short gaps are seen again.
    fn adapt_poll(&mut self, waited: Duration) {
        if waited > self.poll_max {
            self.poll = Duration::ZERO;
        } else if waited > self.poll {
            self.poll = (self.poll * 2).max(POLL_START).min(self.poll_max);
        }
    }

    /// Whether the driver made chains available that the worker has not taken.
    fn avail_pending(&self) -> bool {
        self.queue
            .avail_idx(self.mem.as_ref(), Ordering::Acquire)
            .is_ok_and(|idx| idx.0 != self.queue.next_avail())
    }

    /// The rings themselves are corrupt (an avail index more than a queue ahead, a head
    /// index outside the table): nothing sane can be served from this queue until the driver
    /// resets the device. Other queues keep going.
    fn broken_queue(&mut self) {
        if self.broken {
            return;
        }
        self.broken = true;
        self.note_guest_error(&ParseError::BrokenRing);
        self.interrupt.signal_needs_reset();
    }

    fn iovecs(&self, req: &Request) -> Option<Vec<libc::iovec>> {
        req.data
            .iter()
            .map(|&(addr, len)| {
                let slice = self.mem.get_slice(addr, len as usize).ok()?;
                Some(libc::iovec {
                    iov_base: slice.ptr_guard_mut().as_ptr() as *mut libc::c_void,
                    iov_len: len as usize,
                })
            })
            .collect()
    }

    fn start(&mut self, head: u16, req: Request) {
        let offset = req.sector << SECTOR_SHIFT;
        let status_addr = Some(req.status_addr);
        match req.kind {
            RequestType::In | RequestType::Out => {
                let Some(iovecs) = self.iovecs(&req) else {
                    return self.finish(head, status_addr, S_IOERR, 0);
                };
                self.set_inflight(head, req.status_addr, false);
                if req.kind == RequestType::In {
                    self.counters.reads.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .read_bytes
                        .fetch_add(req.data_len, Ordering::Relaxed);
                    self.engine.submit(head, Io::Read { offset, iovecs });
                } else {
                    self.counters.writes.fetch_add(1, Ordering::Relaxed);
                    self.counters
                        .write_bytes
                        .fetch_add(req.data_len, Ordering::Relaxed);
                    self.engine.submit(head, Io::Write { offset, iovecs });
                }
            }
            RequestType::Flush => {
                self.counters.flushes.fetch_add(1, Ordering::Relaxed);
                if self.disk.readonly {
                    return self.finish(head, status_addr, S_OK, 0);
                }
                self.set_inflight(head, req.status_addr, true);
                self.engine.submit(head, Io::Flush);
            }
            RequestType::GetId => {
                let mut id = [0u8; ID_BYTES as usize];
                let n = self.disk.id.len().min(id.len());
                id[..n].copy_from_slice(&self.disk.id.as_bytes()[..n]);
                // Scattered over the data buffers (parse checked they hold 20 bytes).
                let mut left: &[u8] = &id;
                let mut ok = true;
                for &(addr, len) in &req.data {
                    let n = left.len().min(len as usize);
                    ok &= self.mem.write_slice(&left[..n], addr).is_ok();
                    left = &left[n..];
                }
                let ok = ok && left.is_empty();
                let status = if ok { S_OK } else { S_IOERR };
                self.finish(head, status_addr, status, if ok { ID_BYTES } else { 0 });
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                let status = match request::read_segments(&self.mem, &req, self.disk.capacity) {
                    Ok(segs) => {
                        let mode = if req.kind == RequestType::Discard {
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                        } else {
                            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                        };
                        let ok = segs.iter().all(|s| {
                            // SAFETY: fallocate on our own descriptor with a range inside the disk.
                            unsafe {
                                libc::fallocate(
                                    self.disk.file.as_raw_fd(),
                                    mode,
                                    (s.sector << SECTOR_SHIFT) as libc::off_t,
                                    (u64::from(s.num_sectors) << SECTOR_SHIFT) as libc::off_t,
                                ) == 0
                            }
                        });
                        if ok {
                            S_OK
                        } else {
                            self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
                            S_IOERR
                        }
                    }
                    Err(e) => {
                        self.note_guest_error(&e);
                        if matches!(e, ParseError::SegmentFlags(_)) {
                            S_UNSUPP
                        } else {
                            S_IOERR
                        }
                    }
                };
                self.finish(head, status_addr, status, 0);
            }
            RequestType::Unsupported(_) => self.finish(head, status_addr, S_UNSUPP, 0),
        }
    }

    /// Remembers where a submitted request's status byte goes.
    fn set_inflight(&mut self, head: u16, status_addr: GuestAddress, flush: bool) {
        if let Some(slot) = self.inflight.get_mut(usize::from(head)) {
            *slot = Some(InFlight { status_addr, flush });
        }
    }

    /// Returns every request the engine finished to the driver, then interrupts it once if
    /// it asked for that.
    pub fn complete(&mut self) {
        let mut done = std::mem::take(&mut self.done);
        self.engine.reap(&mut done);
        if done.is_empty() {
            self.done = done;
            return;
        }
        for c in done.drain(..) {
            let inflight = self
                .inflight
                .get_mut(usize::from(c.head))
                .and_then(Option::take);
            if c.status == S_IOERR {
                self.counters.io_errors.fetch_add(1, Ordering::Relaxed);
            } else if inflight.is_some_and(|f| f.flush) {
                // The fdatasync has returned: only now may the driver see the FLUSH done.
                self.counters.syncs.fetch_add(1, Ordering::Release);
            }
            self.write_used(c.head, inflight.map(|f| f.status_addr), c.status, c.written);
        }
        self.done = done;
        self.notify();
    }

    /// Writes the status byte and returns the chain to the driver.
    fn finish(&mut self, head: u16, status_addr: Option<GuestAddress>, status: u8, written: u32) {
        self.write_used(head, status_addr, status, written);
        self.notify();
    }

    fn write_used(
        &mut self,
        head: u16,
        status_addr: Option<GuestAddress>,
        status: u8,
        written: u32,
    ) {
        let mut len = written;
        if let Some(addr) = status_addr {
            if self.mem.write_obj(status, addr).is_ok() {
                len += 1;
            }
        }
        if self.queue.add_used(self.mem.as_ref(), head, len).is_err() {
            self.broken_queue();
        }
    }

    fn notify(&mut self) {
        match self.queue.needs_notification(self.mem.as_ref()) {
            Ok(true) => {
                self.counters.interrupts.fetch_add(1, Ordering::Relaxed);
                self.interrupt.signal_used();
            }
            Ok(false) => {}
            Err(_) => self.broken_queue(),
        }
    }
}
