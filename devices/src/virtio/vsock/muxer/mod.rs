//! The vsock device's worker: one thread that owns the queues once the driver is up, the
//! listening Unix socket, every host stream, and the state of every connection.
//!
//! It waits in one epoll on: its control event (activate, reset, stop), the three queue
//! notify events, the listener, and each host stream. After every wake-up it drains the tx
//! queue (guest to host), then fills rx buffers (host to guest) from what is pending, then
//! runs the timers (CONNECT retries and deadlines, close deadlines), and raises the interrupt
//! if it used any buffer.
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
//! This file holds the loop, the connection state and the device's life (activate, reset);
//! the rest is by concern: `host.rs` (accepting and `CONNECT`), `streams.rs` (host stream
//! events, forwarding, closing), `tx.rs` (guest to host), `rx.rs` (host to guest), `timers.rs`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::hybrid::{self, MAX_CONNECT_LINE};
use super::packet::{
    Header, Op, HEADER_LEN, HOST_CID, MAX_PAYLOAD, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::{Shared, VsockEvent, VsockOptions};
use crate::virtio::Interrupt;

mod host;
mod rx;
mod streams;
mod timers;
mod tx;

const TOKEN_WAKE: u64 = 0;
const TOKEN_RXQ: u64 = 1;
const TOKEN_TXQ: u64 = 2;
const TOKEN_EVQ: u64 = 3;
const TOKEN_LISTENER: u64 = 4;
const FIRST_STREAM_TOKEN: u64 = 16;

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
    token: u64,
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
    /// epoll said the host stream is readable and we have not read it dry since.
    host_readable: bool,
    /// Read 0 from the host stream: it sends no more.
    host_eof: bool,
    /// The host peer closed completely (EPOLLHUP): the stream is out of the epoll set.
    host_hup: bool,
    interest: EventSet,
    registered: bool,
    in_rx_queue: bool,
    /// Connecting: give up then. Closing (both sides shut, waiting for the guest's RST): reset then.
    deadline: Option<Instant>,
    retry_at: Option<Instant>,
    backoff: Duration,
    /// The first refusal of a host CONNECT was reported.
    refusal_reported: bool,
}

impl Conn {
    fn new(stream: UnixStream, token: u64, host_initiated: bool, state: State) -> Self {
        Conn {
            stream,
            token,
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

    /// The epoll events this connection needs now.
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

/// A host client that connected and has not finished its CONNECT line.
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
    epoll: Epoll,
    wake: EventFd,
    ctl: Receiver<Control>,
    listener: UnixListener,
    active: Option<Box<Active>>,
    broken: bool,
    conns: HashMap<Key, Conn>,
    local_ports: HashSet<u32>,
    slots: HashMap<u64, Slot>,
    pending: HashMap<u64, PendingHost>,
    rsts: VecDeque<Key>,
    rx_queue: VecDeque<Key>,
    next_local_port: u32,
    next_token: u64,
    used_rx: bool,
    used_tx: bool,
    log: Log,
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
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_WAKE),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_LISTENER),
        )?;
        Ok(Muxer {
            cid,
            socket,
            opts,
            shared,
            epoll,
            wake,
            ctl,
            listener,
            active: None,
            broken: false,
            conns: HashMap::new(),
            local_ports: HashSet::new(),
            slots: HashMap::new(),
            pending: HashMap::new(),
            rsts: VecDeque::new(),
            rx_queue: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            next_token: FIRST_STREAM_TOKEN,
            used_rx: false,
            used_tx: false,
            log: Log { printed: 0 },
        })
    }

    pub(super) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); 64];
        while self.turn(&mut events, None) {}
    }

    /// Waits for events (at most `timeout_ms`; `None`: until the next timer is due), handles
    /// them and makes one pass. False: stop (asked to, or epoll failed).
    pub(super) fn turn(&mut self, events: &mut [EpollEvent], timeout_ms: Option<i32>) -> bool {
        let timeout = timeout_ms.unwrap_or_else(|| self.next_timeout_ms());
        let n = match self.epoll.wait(timeout, events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
            Err(e) => {
                self.log
                    .say(format_args!("epoll failed, device stopped: {e}"));
                return false;
            }
        };
        for ev in &events[..n] {
            let set = ev.event_set();
            match ev.data() {
                TOKEN_WAKE => {
                    let _ = self.wake.read();
                    if !self.control() {
                        return false;
                    }
                }
                TOKEN_RXQ => self.drain_queue_evt(0),
                TOKEN_TXQ => self.drain_queue_evt(1),
                TOKEN_EVQ => self.drain_queue_evt(2),
                TOKEN_LISTENER => self.accept(),
                token => self.stream_event(token, set),
            }
        }
        self.process();
        true
    }

    /// One pass over everything that may have become possible.
    pub(super) fn process(&mut self) {
        self.process_tx();
        self.process_rx();
        self.timers(Instant::now());
        // Timers may have queued packets (retried REQUESTs, RSTs).
        self.process_rx();
        self.notify_guest();
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
    fn control(&mut self) -> bool {
        while let Ok(msg) = self.ctl.try_recv() {
            match msg {
                Control::Activate(active) => self.activate(active),
                Control::Reset(ack) => {
                    self.reset();
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

    pub(super) fn activate(&mut self, active: Box<Active>) {
        self.reset();
        for (evt, token) in active.evts.iter().zip([TOKEN_RXQ, TOKEN_TXQ, TOKEN_EVQ]) {
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                evt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                self.log
                    .say(format_args!("cannot watch a queue, device unusable: {e}"));
                active.interrupt.signal_needs_reset();
                return;
            }
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
    fn reset(&mut self) {
        if let Some(active) = self.active.take() {
            for evt in &active.evts {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    evt.as_raw_fd(),
                    EpollEvent::default(),
                );
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

    // ------------------------------------------------------------------ host side --

    fn new_token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }
}
