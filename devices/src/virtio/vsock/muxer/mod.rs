//! The vsock device's worker: one thread that owns the queues once the driver is up, the
//! listening Unix socket, every host stream, and the state of every connection.
//!
//! It is an event-manager subscriber ([`crate::virtio::worker::DeviceLoop`]) watching: its
//! control event (activate, reset, stop), the three queue notify events, the listener, a
//! timerfd, and each host stream. After every event it drains the tx queue (guest to host),
//! fills rx buffers (host to guest) from what is pending, runs the timers (CONNECT retries and
//! deadlines, close deadlines), and raises the interrupt if it used any buffer. Then the host
//! streams' watches follow what each connection now waits for (added, modified or removed
//! through the `EventOps` of that event; a stream leaves the watch list before it is closed),
//! and the timerfd is armed for the nearest deadline: the loop itself never times out.
//!
//! Flow control, per connection:
//! - guest to host: the guest may have at most `buf_alloc` bytes in flight that we have not
//!   written to the host stream (`fwd_cnt` counts what we wrote). What the host stream does
//!   not take at once waits in a buffer bounded by `buf_alloc`; a guest that sends beyond its
//!   credit is reset. So a host peer that stops reading stops the guest, through credit.
//! - host to guest: we read from a host stream only while the guest has credit for it and rx
//!   buffers are posted. Otherwise the bytes stay in the host socket, whose writer then
//!   blocks: back-pressure, never unbounded buffering.
//!
//! This file holds the event handling, the connection state and the device's life (activate,
//! reset); the rest is by concern: `host.rs` (accepting and `CONNECT`), `streams.rs` (host
//! stream events, forwarding, closing, the watch list), `tx.rs` (guest to host), `rx.rs` (host
//! to guest), `timers.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::hybrid::{self, MAX_CONNECT_LINE};
use super::packet::{
    Header, Op, HEADER_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{Shared, VsockEvent, VsockOptions};
use crate::virtio::worker::{DeviceLoop, Failure};
use crate::virtio::Interrupt;

mod host;
mod rx;
mod streams;
mod timers;
mod tx;

// What each watched descriptor is (the data of its event). A host stream is found by its
// descriptor, which every event carries: a connection's key (two ports) does not fit.
const WAKE: u32 = 0;
const RXQ: u32 = 1;
const TXQ: u32 = 2;
const EVQ: u32 = 3;
const LISTENER: u32 = 4;
const TIMER: u32 = 5;
const STREAM: u32 = 6;

/// Host-side ports handed to host-initiated connections start here (as in Firecracker and
/// Cloud Hypervisor), far from the ports guests connect to.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Connection-less RSTs waiting for an rx buffer; beyond this, a flooding guest gets no more.
const MAX_QUEUED_RSTS: usize = 1024;
/// Host clients connected but not yet done with their CONNECT line.
const MAX_PENDING_HOST: usize = 64;
/// First retry delay after the guest refused a host CONNECT, doubled up to the cap.
const RETRY_FIRST: Duration = Duration::from_millis(10);
const RETRY_MAX: Duration = Duration::from_millis(250);

/// What the device (on a vCPU thread) asks of the worker.
pub(super) enum Control {
    Activate(Box<Active>),
    Reset(SyncSender<()>),
    Stop,
}

/// The queues and what goes with them, from activation to reset.
pub(super) struct Active {
    pub mem: Arc<GuestMemoryMmap>,
    pub rx: Queue,
    pub tx: Queue,
    /// The event queue: held, never used (no transport-reset events are ever sent).
    pub _ev: Queue,
    pub evts: [EventFd; 3],
    pub interrupt: Arc<Interrupt>,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
struct Key {
    /// Our end: the host port.
    local: u32,
    /// The guest's port.
    peer: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Host-initiated, waiting for the guest's RESPONSE. `sent`: a REQUEST is outstanding.
    Connecting {
        sent: bool,
    },
    Established,
}

/// Packets a connection owes the guest, sent as rx buffers allow.
mod owe {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
}

struct Conn {
    stream: UnixStream,
    /// Whether the host side asked for it (CONNECT) or the guest did.
    host_initiated: bool,
    state: State,
    owe: u8,
    /// Flags of the SHUTDOWN we owe or sent.
    shutdown_flags: u32,
    /// SHUTDOWN flags received from the guest.
    peer_shut: u32,
    // Guest to host.
    to_host: VecDeque<u8>,
    /// Payload bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    host_write_shut: bool,
    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    /// Its event said the host stream is readable and we have not read it dry since.
    host_readable: bool,
    /// Read 0 from the host stream: it sends no more.
    host_eof: bool,
    /// The host peer closed completely (EPOLLHUP): the stream leaves the watch list.
    host_hup: bool,
    /// What the stream is watched for, if it is in the watch list.
    interest: EventSet,
    registered: bool,
    /// In `Muxer::rewatch`: its watch is brought up to date after this pass.
    rewatch: bool,
    in_rx_queue: bool,
    /// Connecting: give up then. Closing (both sides shut, waiting for the guest's RST): reset then.
    deadline: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The first refusal of a host CONNECT was reported.
    refusal_reported: bool,
}

impl Conn {
    fn new(stream: UnixStream, host_initiated: bool, state: State) -> Self {
        Conn {
            stream,
            host_initiated,
            state,
            owe: 0,
            shutdown_flags: 0,
            peer_shut: 0,
            to_host: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            host_write_shut: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            host_hup: false,
            interest: EventSet::empty(),
            registered: false,
            rewatch: false,
            in_rx_queue: false,
            deadline: None,
            retry_at: None,
            backoff: RETRY_FIRST,
            refusal_reported: false,
        }
    }

    /// Bytes the guest can still take from us.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_send_data(&self) -> bool {
        self.state == State::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    fn wants_rx(&self) -> bool {
        self.owe != 0 || self.can_send_data()
    }

    /// The events this connection's host stream is watched for now.
    fn wanted_interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.state == State::Established
            && !self.host_readable
            && !self.host_eof
            && self.peer_shut & SHUTDOWN_RCV == 0
        {
            ev |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn header(&self, key: Key, guest_cid: u64, op: Op, buf_alloc: u32) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.local,
            dst_port: key.peer,
            len: 0,
            type_: TYPE_STREAM,
            op: op.into(),
            flags: 0,
            buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
        }
    }
}

/// A host client that connected and has not finished its CONNECT line (watched for input
/// from its acceptance on).
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Slot {
    Pending,
    Conn(Key),
}

/// A packet the guest sent, copied out of its buffers.
struct TxPacket {
    hdr: Header,
    payload: Vec<u8>,
}

/// Why a tx chain is not a packet.
#[derive(Debug, thiserror::Error)]
enum PacketError {
    #[error("cannot map the descriptor chain")]
    Chain,
    #[error("chain holds {0} readable bytes, less than the 44-byte header")]
    Short(usize),
    #[error("payload length {len} exceeds {max} or the {avail} bytes present")]
    BadLength { len: u32, max: u32, avail: usize },
}

/// Prints the first few messages of the worker, then only counts them.
struct Log {
    printed: u32,
}

impl Log {
    const LIMIT: u32 = 20;

    fn say(&mut self, msg: std::fmt::Arguments) {
        if self.printed < Self::LIMIT {
            log::warn!("vsock: {msg}");
        } else if self.printed == Self::LIMIT {
            log::warn!("vsock: further messages suppressed (see the device counters)");
        }
        self.printed = self.printed.saturating_add(1);
    }
}

pub(super) struct Muxer {
    cid: u64,
    socket: PathBuf,
    opts: VsockOptions,
    shared: Arc<Shared>,
    wake: EventFd,
    ctl: Receiver<Control>,
    listener: UnixListener,
    /// Expires at the nearest deadline (`timer_at`); disarmed when there is none.
    timer: TimerFd,
    timer_at: Option<Instant>,
    active: Option<Box<Active>>,
    broken: bool,
    conns: HashMap<Key, Conn>,
    local_ports: HashSet<u32>,
    /// Host streams by descriptor: how their events find them.
    slots: HashMap<RawFd, Slot>,
    pending: HashMap<RawFd, PendingHost>,
    /// Connections whose watch may have to change (added, modified, removed) after this pass.
    rewatch: Vec<Key>,
    /// Watched streams done with: they leave the watch list, then close, after this pass (so
    /// that no descriptor number is reused while the watch list still holds it).
    unwatch: Vec<UnixStream>,
    rsts: VecDeque<Key>,
    rx_queue: VecDeque<Key>,
    next_local_port: u32,
    used_rx: bool,
    used_tx: bool,
    log: Log,
    outcome: Option<Result<(), Failure>>,
}

fn would_block(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
    )
}

/// `send(2)` with MSG_NOSIGNAL: a closed peer is an error, never a SIGPIPE.
fn send_nosig(stream: &UnixStream, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes; the descriptor is ours.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn peek(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid and writable for `buf.len()` bytes; the descriptor is ours.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Best effort: tells a host client why it is being dropped.
fn tell(stream: &UnixStream, msg: &str) {
    let _ = send_nosig(stream, format!("ERR {msg}\n").as_bytes());
}

/// Why a CONNECT the guest kept refusing failed.
fn refused_why(port: u32, agent_ready: bool, opts: &VsockOptions) -> String {
    if agent_ready {
        format!(
            "guest port {port} refused the connection (nothing listened within {} ms)",
            opts.connect_timeout.as_millis()
        )
    } else {
        format!(
            "guest port {port} refused the connection: nothing listened and the guest agent did \
             not announce itself within {} ms of boot",
            opts.boot_connect_timeout.as_millis()
        )
    }
}

impl Muxer {
    pub(super) fn new(
        cid: u64,
        socket: PathBuf,
        listener: UnixListener,
        opts: VsockOptions,
        shared: Arc<Shared>,
        wake: EventFd,
        ctl: Receiver<Control>,
    ) -> std::io::Result<Self> {
        Ok(Muxer {
            cid,
            socket,
            opts,
            shared,
            wake,
            ctl,
            listener,
            timer: nonblocking_timer()?,
            timer_at: None,
            active: None,
            broken: false,
            conns: HashMap::new(),
            local_ports: HashSet::new(),
            slots: HashMap::new(),
            pending: HashMap::new(),
            rewatch: Vec::new(),
            unwatch: Vec::new(),
            rsts: VecDeque::new(),
            rx_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            used_rx: false,
            used_tx: false,
            log: Log { printed: 0 },
            outcome: None,
        })
    }

    /// Whether it stopped (asked to, or unable to go on).
    #[cfg(feature = "fuzzing")]
    pub(super) fn stopped(&self) -> bool {
        self.outcome.is_some()
    }

    /// One pass over everything that may have become possible, then the watch list and the
    /// timer brought up to date.
    fn pass(&mut self, ops: &mut EventOps) {
        self.process_tx();
        self.process_rx();
        self.timers(Instant::now());
        // Timers may have queued packets (retried REQUESTs, RSTs).
        self.process_rx();
        self.notify_guest();
        self.sync_watches(ops);
        self.arm_timer();
    }

    fn drain_queue_evt(&mut self, i: usize) {
        if let Some(a) = &self.active {
            let _ = a.evts[i].read();
        }
    }

    /// The VM is going away: every host CONNECT still waiting learns why it will not be answered.
    fn guest_stopped(&mut self) {
        for (key, c) in &self.conns {
            if matches!(c.state, State::Connecting { .. }) {
                tell(
                    &c.stream,
                    &format!("the guest stopped before port {} accepted", key.peer),
                );
            }
        }
    }

    /// Handles control messages; false means stop.
    fn control(&mut self, ops: &mut EventOps) -> bool {
        while let Ok(msg) = self.ctl.try_recv() {
            match msg {
                Control::Activate(active) => self.activate(active, ops),
                Control::Reset(ack) => {
                    self.reset(ops);
                    let _ = ack.send(());
                }
                Control::Stop => {
                    self.guest_stopped();
                    return false;
                }
            }
        }
        true
    }

    fn activate(&mut self, active: Box<Active>, ops: &mut EventOps) {
        self.reset(ops);
        let watches = active
            .evts
            .iter()
            .zip([RXQ, TXQ, EVQ])
            .map(|(evt, data)| Events::with_data(evt, data, EventSet::IN));
        let mut added = Vec::new();
        for ev in watches {
            if let Err(e) = ops.add(ev) {
                // Out of the watch list before they close with `active`.
                for ev in added {
                    let _ = ops.remove(ev);
                }
                self.log
                    .say(format_args!("cannot watch a queue, device unusable: {e}"));
                active.interrupt.signal_needs_reset();
                return;
            }
            added.push(ev);
        }
        self.active = Some(active);
        self.broken = false;
        self.shared.emit(VsockEvent::DriverReady);
        // CONNECTs that arrived before the driver was up go out now.
        let waiting: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Connecting { sent: false })
            .map(|(k, _)| *k)
            .collect();
        for key in waiting {
            self.send_request(key);
        }
    }

    /// The driver reset the device: the guest forgot every connection.
    fn reset(&mut self, ops: &mut EventOps) {
        if let Some(active) = self.active.take() {
            for evt in &active.evts {
                let _ = ops.remove(Events::empty(evt));
            }
        }
        self.rsts.clear();
        self.rx_queue.clear();
        let keys: Vec<Key> = self.conns.keys().copied().collect();
        for key in keys {
            let waiting = self
                .conns
                .get(&key)
                .is_some_and(|c| matches!(c.state, State::Connecting { .. }));
            if waiting {
                // Still within its deadline: asked again once the driver is back.
                if let Some(c) = self.conns.get_mut(&key) {
                    c.state = State::Connecting { sent: false };
                    c.owe = 0;
                    c.in_rx_queue = false;
                    c.retry_at = None;
                }
            } else {
                self.kill(key, false);
            }
        }
    }
}

/// A timerfd whose reads never block: its expiry may already have been consumed by a re-arm
/// when its event is handled.
fn nonblocking_timer() -> std::io::Result<TimerFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: no memory is passed; the result is checked.
    let fd = unsafe {
        libc::timerfd_create(
            libc::CLOCK_MONOTONIC,
            libc::TFD_CLOEXEC | libc::TFD_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new timerfd that nothing else owns.
    Ok(unsafe { TimerFd::from_raw_fd(fd) })
}

impl DeviceLoop for Muxer {
    fn outcome(&mut self) -> Option<Result<(), Failure>> {
        self.outcome.take()
    }
}

impl MutEventSubscriber for Muxer {
    fn init(&mut self, ops: &mut EventOps) {
        let watches = [
            Events::with_data(&self.wake, WAKE, EventSet::IN),
            Events::with_data(&self.listener, LISTENER, EventSet::IN),
            Events::with_data(&self.timer, TIMER, EventSet::IN),
        ];
        for ev in watches {
            if let Err(e) = ops.add(ev) {
                self.outcome = Some(Err(format!("watching its events: {e}")));
                return;
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.outcome.is_some() {
            // Stopped: the rest of this batch is not looked at.
            return;
        }
        match events.data() {
            WAKE => {
                let _ = self.wake.read();
                if !self.control(ops) {
                    self.outcome = Some(Ok(()));
                    return;
                }
            }
            RXQ => self.drain_queue_evt(0),
            TXQ => self.drain_queue_evt(1),
            EVQ => self.drain_queue_evt(2),
            LISTENER => self.accept(ops),
            TIMER => {
                // Expired: no longer armed. (Nothing to read if a re-arm came first.)
                self.timer_at = None;
                let _ = self.timer.wait();
            }
            _ => self.stream_event(events.fd(), events.event_set()),
        }
        self.pass(ops);
    }
}
