//! The vsock muxer driven in place, without its thread, one round at a time: for the fuzz
//! targets (cargo feature `fuzzing`), which need every step to happen inside the call that
//! fed it.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EpollEvent;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::hybrid;
use super::muxer::{Active, Muxer};
use super::{Shared, VsockCounters, VsockError, VsockOptions};
use crate::virtio::Interrupt;

pub struct Harness {
    muxer: Muxer,
    events: Vec<EpollEvent>,
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
        // Nothing is ever sent: activation is done here, and dropping the harness stops it.
        let (_ctl, ctl_rx) = mpsc::channel();
        let mut muxer = Muxer::new(
            cid,
            socket.to_owned(),
            listener,
            options,
            shared.clone(),
            wake,
            ctl_rx,
        )
        .map_err(io("setting up epoll"))?;
        let [rx, tx, ev] = queues;
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(io("creating an eventfd"));
        muxer.activate(Box::new(Active {
            mem,
            rx,
            tx,
            _ev: ev,
            evts: [evt()?, evt()?, evt()?],
            interrupt,
        }));
        Ok(Harness {
            muxer,
            events: vec![EpollEvent::default(); 64],
            shared,
        })
    }

    /// One round without waiting: host sockets that became ready, then the queues.
    pub fn turn(&mut self) -> bool {
        self.muxer.turn(&mut self.events, Some(0))
    }

    pub fn counters(&self) -> &VsockCounters {
        &self.shared.counters
    }
}
