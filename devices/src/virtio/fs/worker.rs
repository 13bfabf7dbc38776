//! The thread of an active virtio-fs device (`fs-<id>`), on event-manager. While the back-end
//! lives it only relays the back-end's used-buffer signals to the guest (virtio-mmio needs the
//! interrupt status set before the interrupt, so the back-end cannot raise it itself) and
//! watches the socket. When the back-end goes, it says so once, and answers the guest's
//! requests itself with `EIO` ([`super::failover`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::failover;
use super::frontend::{Connection, Vring};
use super::FsCounters;
use crate::virtio::Interrupt;

const KILL: u32 = 0;
const SOCKET: u32 = 1;
/// `CALL + i`: the back-end used buffers of queue i.
const CALL: u32 = 0x100;
/// `KICK + i`: the guest added buffers to queue i (watched after the back-end is gone).
const KICK: u32 = 0x200;

pub struct Worker {
    pub id: String,
    pub conn: Arc<Connection>,
    pub mem: Arc<GuestMemoryMmap>,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<Queue>,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub kill: EventFd,
    pub acked_features: u64,
    pub counters: Arc<FsCounters>,
    /// The back-end holds the vrings.
    live: bool,
    done: bool,
    failure: Option<String>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        conn: Arc<Connection>,
        mem: Arc<GuestMemoryMmap>,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        kicks: Vec<EventFd>,
        calls: Vec<EventFd>,
        kill: EventFd,
        acked_features: u64,
        counters: Arc<FsCounters>,
    ) -> Self {
        Worker {
            id,
            conn,
            mem,
            interrupt,
            queues,
            kicks,
            calls,
            kill,
            acked_features,
            counters,
            live: false,
            done: false,
            failure: None,
        }
    }

    /// Hands the rings to the back-end, then serves events until the device is reset.
    pub fn run(self) -> Result<(), String> {
        crate::virtio::worker::event_loop(self)
    }

    fn start(&mut self) -> Result<(), String> {
        let vrings: Vec<Vring<'_>> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                use virtio_queue::QueueT;
                Vring {
                    index: i,
                    max_size: q.max_size(),
                    size: q.size(),
                    desc: q.desc_table(),
                    avail: q.avail_ring(),
                    used: q.used_ring(),
                    base: q.next_avail(),
                    kick: &self.kicks[i],
                    call: &self.calls[i],
                }
            })
            .collect();
        self.conn
            .start(&self.mem, self.acked_features, &vrings)
            .map_err(|e| e.to_string())
    }

    /// The back-end is gone (or never took the rings): the guest's requests fail from now on.
    fn fail_over(&mut self, why: &str, ops: &mut EventOps) {
        self.live = false;
        self.counters.backend_connected.store(0, Ordering::Relaxed);
        self.counters.backend_lost.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "fs {}: the vhost-user back-end at {} {why}; the guest's requests on this share \
             now fail with EIO, the VM goes on",
            self.id,
            self.conn.path().display()
        );
        let _ = ops.remove(Events::empty(self.conn.socket()));
        for call in &self.calls {
            let _ = ops.remove(Events::empty(call));
        }
        for (i, kick) in self.kicks.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(kick, KICK + i as u32, EventSet::IN)) {
                self.failure = Some(format!("watching queue {i}: {e:?}"));
                return;
            }
        }
        for i in 0..self.queues.len() {
            if let Err(e) = failover::take_over(&mut self.queues[i], &self.mem) {
                self.failure = Some(format!("queue {i}: {e}"));
                return;
            }
            self.answer(i);
        }
    }

    fn answer(&mut self, i: usize) {
        match failover::answer_all(&mut self.queues[i], &self.mem) {
            Ok(done) => {
                self.counters
                    .failed_requests
                    .fetch_add(done.requests + done.without_reply, Ordering::Relaxed);
                if done.notify {
                    self.interrupt.signal_used();
                }
            }
            Err(e) => self.failure = Some(format!("queue {i}: {e}")),
        }
    }
}

impl crate::virtio::worker::DeviceLoop for Worker {
    fn outcome(&mut self) -> Option<Result<(), String>> {
        if let Some(why) = self.failure.take() {
            return Some(Err(why));
        }
        if !self.done {
            return None;
        }
        if self.live {
            // Best effort: a back-end that stopped answering is gone anyway.
            if let Err(e) = self.conn.stop(self.queues.len()) {
                log::debug!("fs {}: taking the vrings back: {e}", self.id);
            }
            self.live = false;
        }
        Some(Ok(()))
    }
}

impl MutEventSubscriber for Worker {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.kill, KILL, EventSet::IN)) {
            self.failure = Some(format!("watching its stop event: {e:?}"));
            return;
        }
        if let Err(e) = self.start() {
            return self.fail_over(&format!("could not take the vrings ({e})"), ops);
        }
        self.live = true;
        self.counters.backend_connected.store(1, Ordering::Relaxed);
        let socket = Events::with_data(
            self.conn.socket(),
            SOCKET,
            EventSet::IN | EventSet::HANG_UP | EventSet::READ_HANG_UP | EventSet::ERROR,
        );
        let mut watched = ops.add(socket).map_err(|e| format!("{e:?}"));
        for (i, call) in self.calls.iter().enumerate() {
            if watched.is_ok() {
                watched = ops
                    .add(Events::with_data(call, CALL + i as u32, EventSet::IN))
                    .map_err(|e| format!("{e:?}"));
            }
        }
        if let Err(e) = watched {
            self.failure = Some(format!("watching the back-end: {e}"));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            KILL => {
                let _ = self.kill.read();
                self.done = true;
            }
            // The back-end never writes to this socket unasked: readable means it closed it
            // (or broke the protocol, which ends it as surely).
            SOCKET => self.fail_over("went away", ops),
            d if (CALL..KICK).contains(&d) => {
                if let Some(call) = self.calls.get((d - CALL) as usize) {
                    let _ = call.read();
                    self.interrupt.signal_used();
                }
            }
            d => {
                let i = (d - KICK) as usize;
                if let Some(kick) = self.kicks.get(i) {
                    let _ = kick.read();
                    self.answer(i);
                }
            }
        }
    }
}
