//! The pair's thread: what it waits on and how it is told to stop or to change.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::*;

/// Shared between a pair's thread and whoever enables or disables the pair (the control
/// queue, for multi-queue devices).
pub struct PairControl {
    pub backend: Arc<dyn NetBackend>,
    pub enabled: AtomicBool,
    /// Written after `enabled` changes.
    pub wake: EventFd,
}

const RX: u32 = 0;
const TX: u32 = 1;
const TAP: u32 = 2;
const KILL: u32 = 3;
const WAKE: u32 = 4;
const CTRL: u32 = 5;
const MORE: u32 = 6;

/// The events a pair's thread waits on.
pub struct PairEvents {
    pub rx: EventFd,
    pub tx: EventFd,
    pub kill: EventFd,
    pub control: Arc<PairControl>,
    /// Written by the thread itself when work is left over a budget.
    pub more: EventFd,
}

/// Something else the first pair's thread serves (the control queue).
pub trait SideQueue: Send {
    fn event(&self) -> &EventFd;
    fn process(&mut self);
}

impl QueuePair {
    /// The pair's thread: waits on the queues' notify events and the TAP, until `kill`; an
    /// error it cannot go on from ends it early (a device error, see `virtio::worker`).
    pub fn run(self, ev: PairEvents, side: Option<Box<dyn SideQueue>>) -> Result<(), String> {
        crate::virtio::worker::event_loop(PairLoop {
            pair: self,
            ev,
            side,
            // Work may be waiting already (a driver that posted before we started).
            tx_pending: true,
            rx_pending: true,
            tap_polled: false,
            outcome: None,
        })
    }
}

/// A pair's thread on event-manager. Each event only marks what is pending; the work is done
/// right after, in the same call, with the TAP watched only while the guest has receive
/// buffers. Work left over a budget re-arms `more`, so the loop comes back without sleeping
/// and other events get their turn.
struct PairLoop {
    pair: QueuePair,
    ev: PairEvents,
    side: Option<Box<dyn SideQueue>>,
    tx_pending: bool,
    rx_pending: bool,
    tap_polled: bool,
    outcome: Option<Result<(), String>>,
}

impl PairLoop {
    fn work(&mut self, ops: &mut EventOps) {
        if self.tx_pending {
            self.tx_pending = self.pair.process_tx() == TxState::Budget;
        }
        if self.rx_pending {
            self.rx_pending = false;
            let poll = if self.ev.control.enabled.load(Ordering::SeqCst) {
                match self.pair.process_rx() {
                    RxState::Drained => true,
                    RxState::Budget => {
                        self.rx_pending = true;
                        true
                    }
                    RxState::NoBuffers | RxState::BackendGone => false,
                }
            } else {
                false
            };
            self.poll_tap(poll, ops);
        }
        if self.tx_pending || self.rx_pending {
            // Fails only if the counter would overflow: a wake-up is pending anyway.
            let _ = self.ev.more.write(1);
        }
    }

    fn poll_tap(&mut self, on: bool, ops: &mut EventOps) {
        if on == self.tap_polled {
            return;
        }
        let tap = Events::with_data_raw(self.pair.backend.fd(), TAP, EventSet::IN);
        let done = if on { ops.add(tap) } else { ops.remove(tap) };
        if done.is_ok() {
            self.tap_polled = on;
        }
    }
}

impl crate::virtio::worker::DeviceLoop for PairLoop {
    fn outcome(&mut self) -> Option<Result<(), String>> {
        self.outcome.take()
    }
}

impl MutEventSubscriber for PairLoop {
    fn init(&mut self, ops: &mut EventOps) {
        let mut watch = vec![
            Events::with_data(&self.ev.rx, RX, EventSet::IN),
            Events::with_data(&self.ev.tx, TX, EventSet::IN),
            Events::with_data(&self.ev.kill, KILL, EventSet::IN),
            Events::with_data(&self.ev.control.wake, WAKE, EventSet::IN),
            Events::with_data(&self.ev.more, MORE, EventSet::IN),
        ];
        if let Some(s) = &self.side {
            watch.push(Events::with_data(s.event(), CTRL, EventSet::IN));
        }
        for e in watch {
            if let Err(e) = ops.add(e) {
                self.outcome = Some(Err(format!("watching its events: {e}")));
                return;
            }
        }
        self.work(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            KILL => {
                self.outcome = Some(Ok(()));
                return;
            }
            TX => {
                let _ = self.ev.tx.read();
                self.tx_pending = true;
            }
            RX => {
                let _ = self.ev.rx.read();
                self.rx_pending = true;
            }
            WAKE => {
                let _ = self.ev.control.wake.read();
                self.rx_pending = true;
            }
            CTRL => {
                if let Some(s) = self.side.as_mut() {
                    let _ = s.event().read();
                    s.process();
                }
            }
            MORE => {
                let _ = self.ev.more.read();
            }
            _ => self.rx_pending = true,
        }
        self.work(ops);
    }
}
