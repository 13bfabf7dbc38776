//! The vsock muxer driven in place, without its thread, one round at a time: for the fuzz
//! targets (cargo feature `fuzzing`), which need every step to happen inside the call that
//! fed it.

use std::path::Path;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, OnceLock};

use event_manager::{EventManager, SubscriberId, SubscriberOps};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::hybrid;
use super::muxer::{Active, Control, Muxer};
use super::{Shared, VsockCounters, VsockError, VsockOptions};
use crate::virtio::Interrupt;

pub struct Harness {
    manager: EventManager<Muxer>,
    id: SubscriberId,
    /// The muxer's control event: written before each round, so that every round makes a pass
    /// (as the device thread does after any event) even when nothing else is ready.
    wake: EventFd,
    /// The muxer's control channel (activation; held open for as long as the harness lives).
    ctl: Sender<Control>,
    shared: Arc<Shared>,
}

impl Harness {
    /// A device with `cid`, its hybrid socket bound at `socket`, already activated with the
    /// three queues (rx, tx, event) in `mem`. Returns the queues' notify events too.
    pub fn new(
        cid: u64,
        socket: &Path,
        mem: Arc<GuestMemoryMmap>,
        queues: [Queue; 3],
        interrupt: Arc<Interrupt>,
        options: VsockOptions,
    ) -> Result<Self, VsockError> {
        let io = |what| move |source| VsockError::Io { what, source };
        let (listener, _id) = hybrid::bind_listener(socket)?;
        let shared = Arc::new(Shared {
            counters: VsockCounters::default(),
            agent_ready: OnceLock::new(),
            events: None,
        });
        let wake = EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"))?;
        let (ctl, ctl_rx) = mpsc::channel();
        let muxer = Muxer::new(
            cid,
            socket.to_owned(),
            listener,
            options,
            shared.clone(),
            wake.try_clone().map_err(io("cloning an eventfd"))?,
            ctl_rx,
        )
        .map_err(io("creating its timer"))?;
        let mut manager = EventManager::new().map_err(|e| VsockError::Io {
            what: "creating its event loop",
            source: std::io::Error::other(e),
        })?;
        let id = manager.add_subscriber(muxer);
        let [rx, tx, ev] = queues;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"));
        let active = Active {
            mem,
            rx,
            tx,
            _ev: ev,
            evts: [evt()?, evt()?, evt()?],
            interrupt,
        };
        let mut harness = Harness {
            manager,
            id,
            wake,
            ctl,
            shared,
        };
        // Activated by the first round, as the device thread is by its control event.
        if harness
            .ctl
            .send(Control::Activate(Box::new(active)))
            .is_err()
            || !harness.turn()
        {
            return Err(VsockError::Io {
                what: "activating the muxer",
                source: std::io::Error::from(std::io::ErrorKind::BrokenPipe),
            });
        }
        Ok(harness)
    }

    /// One round without waiting: host sockets that became ready, then the queues. False once
    /// the muxer stopped.
    pub fn turn(&mut self) -> bool {
        // Fails only if the counter would overflow: a wake-up is pending anyway.
        let _ = self.wake.write(1);
        if self.manager.run_with_timeout(0).is_err() {
            return false;
        }
        self.manager
            .subscriber_mut(self.id)
            .is_ok_and(|m| !m.stopped())
    }

    pub fn counters(&self) -> &VsockCounters {
        &self.shared.counters
    }
}
