//! The pair's thread: what it waits on and how it is told to stop or to change.

use super::*;

/// Shared between a pair's thread and whoever enables or disables the pair (the control
/// queue, for multi-queue devices).
pub struct PairControl {
    pub backend: Arc<dyn NetBackend>,
    pub enabled: AtomicBool,
    /// Written after `enabled` changes.
    pub wake: EventFd,
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_TAP: u64 = 2;
const TOKEN_KILL: u64 = 3;
const TOKEN_WAKE: u64 = 4;
const TOKEN_CTRL: u64 = 5;

/// The events a pair's thread waits on.
pub struct PairEvents {
    pub rx: EventFd,
    pub tx: EventFd,
    pub kill: EventFd,
    pub control: Arc<PairControl>,
}

/// Something else the first pair's thread serves (the control queue).
pub trait SideQueue: Send {
    fn event(&self) -> &EventFd;
    fn process(&mut self);
}

impl QueuePair {
    /// The pair's thread: waits on the queues' notify events and the TAP, until `kill`.
    /// Until `kill`; an error it cannot go on from ends it early (a device error, see
    /// `virtio::worker`).
    pub fn run(
        mut self,
        ev: PairEvents,
        mut side: Option<Box<dyn SideQueue>>,
    ) -> Result<(), String> {
        let epoll = Epoll::new().map_err(|e| format!("creating its epoll: {e}"))?;
        let mut fds = vec![
            (ev.rx.as_raw_fd(), TOKEN_RX),
            (ev.tx.as_raw_fd(), TOKEN_TX),
            (ev.kill.as_raw_fd(), TOKEN_KILL),
            (ev.control.wake.as_raw_fd(), TOKEN_WAKE),
        ];
        if let Some(s) = &side {
            fds.push((s.event().as_raw_fd(), TOKEN_CTRL));
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
        let tap_fd = self.backend.fd();
        let mut tap_polled = false;
        let set_tap_polled = |on: bool, polled: &mut bool| {
            if on == *polled {
                return;
            }
            let op = if on {
                ControlOperation::Add
            } else {
                ControlOperation::Delete
            };
            if epoll
                .ctl(op, tap_fd, EpollEvent::new(EventSet::IN, TOKEN_TAP))
                .is_ok()
            {
                *polled = on;
            }
        };
        let mut events = vec![EpollEvent::default(); 8];
        // Work may be waiting already (a driver that posted before we started).
        let mut tx_pending = true;
        let mut rx_pending = true;
        loop {
            let timeout = if tx_pending || rx_pending { 0 } else { -1 };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("waiting for events: {e}")),
            };
            for e in &events[..n] {
                match e.data() {
                    TOKEN_KILL => return Ok(()),
                    TOKEN_TX => {
                        let _ = ev.tx.read();
                        tx_pending = true;
                    }
                    TOKEN_RX => {
                        let _ = ev.rx.read();
                        rx_pending = true;
                    }
                    TOKEN_WAKE => {
                        let _ = ev.control.wake.read();
                        rx_pending = true;
                    }
                    TOKEN_CTRL => {
                        if let Some(s) = side.as_mut() {
                            let _ = s.event().read();
                            s.process();
                        }
                    }
                    _ => rx_pending = true,
                }
            }
            if tx_pending {
                tx_pending = self.process_tx() == TxState::Budget;
            }
            let enabled = ev.control.enabled.load(Ordering::SeqCst);
            if rx_pending {
                rx_pending = false;
                let poll = if enabled {
                    match self.process_rx() {
                        RxState::Drained => true,
                        RxState::Budget => {
                            rx_pending = true;
                            true
                        }
                        RxState::NoBuffers | RxState::BackendGone => false,
                    }
                } else {
                    false
                };
                set_tap_polled(poll, &mut tap_polled);
            }
        }
    }
}
