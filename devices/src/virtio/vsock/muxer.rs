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
            eprintln!("podvmm: vsock: {msg}");
        } else if self.printed == Self::LIMIT {
            eprintln!("podvmm: vsock: further messages suppressed (see the device counters)");
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

    fn accept(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if would_block(&e) => return,
                Err(e) => {
                    // EMFILE and the like: the client stays in the backlog; try later.
                    self.log.say(format_args!("accept failed: {e}"));
                    return;
                }
            };
            self.shared
                .counters
                .host_connections
                .fetch_add(1, Ordering::Relaxed);
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if self.pending.len() >= MAX_PENDING_HOST
                || self.conns.len() >= self.opts.max_connections
            {
                tell(&stream, "too many connections");
                self.shared
                    .counters
                    .refused_host
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let token = self.new_token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_err()
            {
                tell(&stream, "internal error: cannot watch the connection");
                continue;
            }
            self.slots.insert(token, Slot::Pending);
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    deadline: Instant::now() + self.opts.line_timeout,
                },
            );
        }
    }

    fn drop_pending(&mut self, token: u64, why: Option<String>) {
        self.slots.remove(&token);
        if let Some(p) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if let Some(why) = why {
                self.shared
                    .counters
                    .bad_connect_lines
                    .fetch_add(1, Ordering::Relaxed);
                self.log.say(format_args!("host connection dropped: {why}"));
                tell(&p.stream, &why);
            }
        }
    }

    /// Reads the CONNECT line, never a byte beyond its newline (what follows is data).
    fn read_connect_line(&mut self, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let room = MAX_CONNECT_LINE - p.line.len();
        let n = match peek(&p.stream, &mut buf[..room]) {
            Ok(0) => return self.drop_pending(token, None), // the client gave up
            Ok(n) => n,
            Err(e) if would_block(&e) => return,
            Err(_) => return self.drop_pending(token, None),
        };
        let newline = buf[..n].iter().position(|&b| b == b'\n');
        let take = newline.map_or(n, |i| i + 1);
        let mut got = vec![0u8; take];
        if p.stream.read_exact(&mut got).is_err() {
            return self.drop_pending(token, None);
        }
        p.line.extend_from_slice(&got);
        if newline.is_none() {
            if p.line.len() >= MAX_CONNECT_LINE {
                let e = hybrid::HybridError::LineTooLong.to_string();
                self.drop_pending(token, Some(e));
            }
            return;
        }
        let line_len = p.line.len() - 1;
        let parsed = hybrid::parse_connect_line(&p.line[..line_len]);
        match parsed {
            Err(e) => self.drop_pending(token, Some(e.to_string())),
            Ok(port) => self.host_connect(token, port),
        }
    }

    fn alloc_local_port(&mut self) -> Option<u32> {
        for _ in 0..self.opts.max_connections + 1 {
            let p = self.next_local_port;
            self.next_local_port = if p >= u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            if !self.local_ports.contains(&p) {
                return Some(p);
            }
        }
        None
    }

    /// A host client asked for guest port `port`: ask the guest (now or once its driver is up).
    fn host_connect(&mut self, token: u64, port: u32) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        let Some(local) = self.alloc_local_port() else {
            self.slots.remove(&token);
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                p.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            tell(&p.stream, "too many connections");
            return;
        };
        let key = Key { local, peer: port };
        let mut conn = Conn::new(p.stream, token, true, State::Connecting { sent: false });
        conn.deadline = Some(Instant::now() + self.connect_wait());
        conn.registered = true;
        conn.interest = EventSet::IN;
        self.local_ports.insert(local);
        self.slots.insert(token, Slot::Conn(key));
        self.conns.insert(key, conn);
        // While connecting, only a hang-up matters (EPOLLHUP is always reported); data the
        // client sends early waits in its socket.
        self.update_interest(key);
        if self.active.is_some() {
            self.send_request(key);
        }
    }

    fn send_request(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            c.state = State::Connecting { sent: true };
            c.retry_at = None;
            c.owe |= owe::REQUEST;
        }
        self.want_rx(key);
    }

    fn stream_event(&mut self, token: u64, set: EventSet) {
        match self.slots.get(&token) {
            Some(Slot::Pending) => self.read_connect_line(token),
            Some(Slot::Conn(key)) => {
                let key = *key;
                self.conn_event(key, set);
            }
            None => {}
        }
    }

    fn conn_event(&mut self, key: Key, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if let State::Connecting { sent } = c.state {
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP) {
                // The client left before the guest answered.
                self.kill(key, sent);
            }
            return;
        }
        if set.contains(EventSet::OUT) {
            self.flush_to_host(key);
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            return self.kill(key, true);
        }
        if set.contains(EventSet::HANG_UP) {
            // The peer is gone for good: whatever it wrote is still readable; after that, EOF.
            // HUP is reported whatever the interest, so the stream leaves the epoll set.
            c.host_hup = true;
            if !c.host_eof {
                c.host_readable = true;
            } else {
                c.shutdown_flags |= SHUTDOWN_RCV | SHUTDOWN_SEND;
                c.owe |= owe::SHUTDOWN;
            }
            if c.registered {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
                c.registered = false;
            }
            if !c.to_host.is_empty() {
                // Nobody will read it.
                return self.kill(key, true);
            }
            if c.host_eof {
                self.start_closing(key);
            }
        } else if set.contains(EventSet::IN) {
            c.host_readable = true;
        }
        self.update_interest(key);
        self.want_rx(key);
    }

    fn update_interest(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.host_hup {
            return;
        }
        let want = c.wanted_interest();
        if c.registered && want == c.interest {
            return;
        }
        let op = if c.registered {
            ControlOperation::Modify
        } else {
            ControlOperation::Add
        };
        if self
            .epoll
            .ctl(op, c.stream.as_raw_fd(), EpollEvent::new(want, c.token))
            .is_ok()
        {
            c.interest = want;
            c.registered = true;
        }
    }

    /// Writes buffered guest data to the host stream.
    fn flush_to_host(&mut self, key: Key) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        while !c.to_host.is_empty() {
            let (front, _) = c.to_host.as_slices();
            match send_nosig(&c.stream, front) {
                Ok(0) => break,
                Ok(n) => {
                    c.to_host.drain(..n);
                    c.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if would_block(&e) => break,
                Err(_) => return self.kill(key, true),
            }
        }
        if c.to_host.is_empty() && c.to_host.capacity() > 64 * 1024 {
            c.to_host.shrink_to(0);
        }
        self.after_forward(key);
    }

    /// After bytes went to the host: credit update, and shutdowns that waited for the flush.
    fn after_forward(&mut self, key: Key) {
        let buf_alloc = self.opts.buf_alloc;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        let unannounced = (c.fwd_cnt - c.last_fwd_cnt_sent).0;
        let seen_free = buf_alloc
            .saturating_sub(unannounced)
            .saturating_sub(c.to_host.len() as u32);
        if unannounced > 0 && (unannounced >= buf_alloc / 4 || seen_free < buf_alloc / 4) {
            c.owe |= owe::CREDIT_UPDATE;
        }
        if c.to_host.is_empty() && c.peer_shut & SHUTDOWN_SEND != 0 && !c.host_write_shut {
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            c.host_write_shut = true;
        }
        let done = c.to_host.is_empty()
            && c.peer_shut & SHUTDOWN_SEND != 0
            && (c.peer_shut & SHUTDOWN_RCV != 0 || c.host_eof);
        if done {
            // Both directions are over: the guest expects our RST to free its socket.
            return self.kill(key, true);
        }
        self.update_interest(key);
        self.want_rx(key);
    }

    /// Both directions are shut from the host side: wait a while for the guest's RST.
    fn start_closing(&mut self, key: Key) {
        let close_timeout = self.opts.close_timeout;
        if let Some(c) = self.conns.get_mut(&key) {
            if c.deadline.is_none() {
                c.deadline = Some(Instant::now() + close_timeout);
            }
        }
    }

    /// Drops a connection; `rst` tells the guest (when its driver is up).
    fn kill(&mut self, key: Key, rst: bool) {
        let Some(c) = self.conns.remove(&key) else {
            return;
        };
        if c.registered {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        self.slots.remove(&c.token);
        if c.host_initiated {
            self.local_ports.remove(&key.local);
        }
        if rst && self.active.is_some() {
            self.queue_rst(key);
        }
    }

    fn queue_rst(&mut self, key: Key) {
        if self.rsts.len() < MAX_QUEUED_RSTS {
            self.rsts.push_back(key);
        } else {
            self.shared
                .counters
                .dropped_rsts
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn want_rx(&mut self, key: Key) {
        if let Some(c) = self.conns.get_mut(&key) {
            if !c.in_rx_queue && c.wants_rx() {
                c.in_rx_queue = true;
                self.rx_queue.push_back(key);
            }
        }
    }

    // ----------------------------------------------------------------- guest side --

    fn process_tx(&mut self) {
        if self.broken {
            return;
        }
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let chain = match active.tx.iter(mem.as_ref()) {
                Ok(mut it) => it.next(),
                Err(_) => return self.broken_queue("tx"),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let packet = read_packet(&mem, chain);
            if let Some(active) = self.active.as_mut() {
                if active.tx.add_used(mem.as_ref(), head, 0).is_err() {
                    return self.broken_queue("tx");
                }
            }
            self.used_tx = true;
            match packet {
                Ok(p) => self.guest_packet(p),
                Err((hdr, e)) => {
                    self.shared
                        .counters
                        .invalid_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.log
                        .say(format_args!("invalid packet from the guest: {e}"));
                    // Data of a connection was lost: its stream cannot go on.
                    if let Some(h) = hdr.filter(|h| h.src_cid == self.cid) {
                        self.kill(
                            Key {
                                local: h.dst_port,
                                peer: h.src_port,
                            },
                            true,
                        );
                    }
                }
            }
        }
    }

    fn broken_queue(&mut self, which: &str) {
        self.broken = true;
        self.shared
            .counters
            .invalid_packets
            .fetch_add(1, Ordering::Relaxed);
        self.log.say(format_args!(
            "the guest's {which} queue is corrupt; device needs a reset"
        ));
        if let Some(a) = &self.active {
            a.interrupt.signal_needs_reset();
        }
    }

    fn guest_packet(&mut self, p: TxPacket) {
        let h = p.hdr;
        if h.src_cid != self.cid || h.dst_cid != HOST_CID {
            // Not from this guest's address, or not for the host: nothing to route it to.
            self.shared
                .counters
                .invalid_packets
                .fetch_add(1, Ordering::Relaxed);
            self.log.say(format_args!(
                "dropped a packet from cid {} to cid {} (guest cid is {})",
                h.src_cid, h.dst_cid, self.cid
            ));
            return;
        }
        let key = Key {
            local: h.dst_port,
            peer: h.src_port,
        };
        let op = h.op();
        if h.type_ != TYPE_STREAM {
            self.shared
                .counters
                .invalid_packets
                .fetch_add(1, Ordering::Relaxed);
            if op != Op::Rst {
                self.kill(key, false);
                self.queue_rst(key);
            }
            return;
        }
        if !self.conns.contains_key(&key) {
            match op {
                Op::Request => self.guest_connect(key, &h),
                Op::Rst => {}
                _ => self.queue_rst(key),
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        // Every packet carries the sender's credit.
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        if let State::Connecting { sent } = c.state {
            match op {
                Op::Response if sent => {
                    c.state = State::Established;
                    c.deadline = None;
                    let ok = format!("OK {}\n", key.local);
                    match send_nosig(&c.stream, ok.as_bytes()) {
                        Ok(n) if n == ok.len() => {
                            self.shared
                                .counters
                                .established
                                .fetch_add(1, Ordering::Relaxed);
                            self.update_interest(key);
                        }
                        _ => self.kill(key, true),
                    }
                }
                Op::Rst if sent => {
                    // Nothing listens on that guest port (yet): ask again shortly, until the
                    // deadline. The agent's ready signal makes every waiting CONNECT retry at once.
                    let now = Instant::now();
                    if c.deadline.is_some_and(|d| now >= d) {
                        self.shared
                            .counters
                            .connect_timeouts
                            .fetch_add(1, Ordering::Relaxed);
                        let why = refused_why(
                            key.peer,
                            self.shared.agent_ready.get().is_some(),
                            &self.opts,
                        );
                        tell(&c.stream, &why);
                        self.kill(key, false);
                    } else {
                        c.state = State::Connecting { sent: false };
                        c.retry_at = Some(now + c.backoff);
                        c.backoff = (c.backoff * 2).min(RETRY_MAX);
                        self.shared
                            .counters
                            .connect_retries
                            .fetch_add(1, Ordering::Relaxed);
                        if !c.refusal_reported {
                            c.refusal_reported = true;
                            self.shared
                                .emit(VsockEvent::ConnectRefused { port: key.peer });
                        }
                    }
                }
                _ => {
                    tell(&c.stream, "protocol error from the guest");
                    self.kill(key, op != Op::Rst);
                }
            }
            return;
        }
        match op {
            Op::Rw => self.guest_data(key, p.payload),
            Op::CreditUpdate => {}
            Op::CreditRequest => c.owe |= owe::CREDIT_UPDATE,
            Op::Shutdown => {
                c.peer_shut |= h.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                if c.peer_shut & SHUTDOWN_RCV != 0 {
                    c.host_readable = false;
                }
                self.after_forward(key);
            }
            Op::Rst => return self.kill(key, false),
            Op::Request | Op::Response | Op::Unknown(_) => {
                self.shared
                    .counters
                    .invalid_packets
                    .fetch_add(1, Ordering::Relaxed);
                return self.kill(key, true);
            }
        }
        self.update_interest(key);
        self.want_rx(key);
    }

    fn guest_data(&mut self, key: Key, payload: Vec<u8>) {
        let buf_alloc = self.opts.buf_alloc as usize;
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.peer_shut & SHUTDOWN_SEND != 0 {
            self.shared
                .counters
                .invalid_packets
                .fetch_add(1, Ordering::Relaxed);
            return self.kill(key, true);
        }
        // What the guest may send: our buffer size minus what it sent since the last fwd_cnt
        // we told it. (Its view lags ours, so a conforming guest is always within this.)
        let unacked = (c.rx_cnt - c.last_fwd_cnt_sent).0 as usize;
        let allowed = buf_alloc.saturating_sub(unacked);
        if payload.len() > allowed {
            // The guest ignored our credit: the stream cannot stay consistent.
            self.shared
                .counters
                .credit_violations
                .fetch_add(1, Ordering::Relaxed);
            self.log.say(format_args!(
                "guest port {} overran its credit ({} bytes sent, {allowed} allowed); reset",
                key.peer,
                payload.len(),
            ));
            return self.kill(key, true);
        }
        c.rx_cnt += Wrapping(payload.len() as u32);
        let mut written = 0;
        if c.to_host.is_empty() && !c.host_write_shut {
            while written < payload.len() {
                match send_nosig(&c.stream, &payload[written..]) {
                    Ok(0) => break,
                    Ok(n) => written += n,
                    Err(e) if would_block(&e) => break,
                    // The host peer is gone mid-stream.
                    Err(_) => return self.kill(key, true),
                }
            }
            c.fwd_cnt += Wrapping(written as u32);
        }
        c.to_host.extend(&payload[written..]);
        self.after_forward(key);
    }

    fn guest_connect(&mut self, key: Key, h: &Header) {
        if key.local == self.opts.ready_port {
            // The agent's announcement: it listens now. Nothing is forwarded; RST says so.
            self.agent_ready();
            self.queue_rst(key);
            return;
        }
        if self.conns.len() >= self.opts.max_connections {
            self.shared
                .counters
                .refused_guest
                .fetch_add(1, Ordering::Relaxed);
            self.queue_rst(key);
            return;
        }
        let path = hybrid::port_path(&self.socket, key.local);
        let stream = match hybrid::connect_nonblocking(&path) {
            Ok(s) => s,
            Err(e) => {
                self.shared
                    .counters
                    .refused_guest
                    .fetch_add(1, Ordering::Relaxed);
                self.log.say(format_args!(
                    "guest connection to host port {} refused: {}: {e}",
                    key.local,
                    path.display()
                ));
                self.queue_rst(key);
                return;
            }
        };
        let token = self.new_token();
        let mut c = Conn::new(stream, token, false, State::Established);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = Wrapping(h.fwd_cnt);
        c.owe |= owe::RESPONSE;
        self.slots.insert(token, Slot::Conn(key));
        self.conns.insert(key, c);
        self.shared
            .counters
            .established
            .fetch_add(1, Ordering::Relaxed);
        self.update_interest(key);
        self.want_rx(key);
    }

    /// How long a new host CONNECT may wait for the guest: long while the guest boots (no agent
    /// announcement yet), short once the agent is up.
    fn connect_wait(&self) -> Duration {
        if self.shared.agent_ready.get().is_some() {
            self.opts.connect_timeout
        } else {
            self.opts.boot_connect_timeout
        }
    }

    fn agent_ready(&mut self) {
        let now = Instant::now();
        let first = self.shared.agent_ready.set(now).is_ok();
        self.shared.emit(VsockEvent::AgentReady { first });
        if first {
            // The guest is up: a port that keeps refusing from now on fails in connect_timeout.
            let bound = now + self.opts.connect_timeout;
            for c in self.conns.values_mut() {
                if matches!(c.state, State::Connecting { .. }) {
                    c.deadline = Some(c.deadline.map_or(bound, |d| d.min(bound)));
                }
            }
        }
        // Every CONNECT waiting for a retry goes now.
        let waiting: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.state == State::Connecting { sent: false })
            .map(|(k, _)| *k)
            .collect();
        if self.active.is_some() {
            for key in waiting {
                self.send_request(key);
            }
        }
    }

    /// Fills rx buffers with what connections owe the guest.
    fn process_rx(&mut self) {
        if self.broken || self.active.is_none() {
            return;
        }
        let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
            return;
        };
        let mut buf = Vec::new();
        while !self.rsts.is_empty() || !self.rx_queue.is_empty() {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let chain = match active.rx.iter(mem.as_ref()) {
                Ok(mut it) => it.next(),
                Err(_) => return self.broken_queue("rx"),
            };
            let Some(chain) = chain else {
                // No buffers: the driver notifies the rx queue when it posts more.
                return;
            };
            let head = chain.head_index();
            let mut writer = match Writer::new(mem.as_ref(), chain) {
                Ok(w) if w.available_bytes() >= HEADER_LEN => w,
                _ => {
                    self.shared
                        .counters
                        .invalid_packets
                        .fetch_add(1, Ordering::Relaxed);
                    self.log.say(format_args!(
                        "rx buffer unusable (unmapped or under 44 bytes)"
                    ));
                    self.put_used_rx(&mem, head, 0);
                    continue;
                }
            };
            let room = (writer.available_bytes() - HEADER_LEN).min(MAX_PAYLOAD as usize);
            let Some(hdr) = self.next_rx_packet(room, &mut buf) else {
                // Nothing after all (streams had no data): give the buffer back.
                if let Some(active) = self.active.as_mut() {
                    active.rx.go_to_previous_position();
                }
                return;
            };
            let payload = &buf[..hdr.len as usize];
            let ok = writer.write_all(&hdr.encode()).is_ok() && writer.write_all(payload).is_ok();
            let len = if ok {
                (HEADER_LEN + payload.len()) as u32
            } else {
                0
            };
            self.put_used_rx(&mem, head, len);
        }
    }

    fn put_used_rx(&mut self, mem: &GuestMemoryMmap, head: u16, len: u32) {
        if let Some(active) = self.active.as_mut() {
            if active.rx.add_used(mem, head, len).is_err() {
                return self.broken_queue("rx");
            }
            self.used_rx = true;
        }
    }

    /// The next packet for the guest, with at most `room` payload bytes read into `buf`.
    fn next_rx_packet(&mut self, room: usize, buf: &mut Vec<u8>) -> Option<Header> {
        let buf_alloc = self.opts.buf_alloc;
        if let Some(key) = self.rsts.pop_front() {
            return Some(Header {
                src_cid: HOST_CID,
                dst_cid: self.cid,
                src_port: key.local,
                dst_port: key.peer,
                type_: TYPE_STREAM,
                op: Op::Rst.into(),
                ..Header::default()
            });
        }
        // Each connection queued now gets one chance; those re-queued wait for the next buffer.
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            let Some(c) = self.conns.get_mut(&key) else {
                continue;
            };
            c.in_rx_queue = false;
            let hdr = self.conn_rx_packet(key, room, buf, buf_alloc);
            if let Some(c) = self.conns.get_mut(&key) {
                if hdr.is_some() {
                    c.last_fwd_cnt_sent = c.fwd_cnt;
                    c.owe &= !owe::CREDIT_UPDATE;
                }
            }
            self.update_interest(key);
            // Round robin: back of the line if it has more to say.
            self.want_rx(key);
            if hdr.is_some() {
                return hdr;
            }
            if !self.rsts.is_empty() {
                return self.next_rx_packet(room, buf);
            }
        }
        None
    }

    fn conn_rx_packet(
        &mut self,
        key: Key,
        room: usize,
        buf: &mut Vec<u8>,
        buf_alloc: u32,
    ) -> Option<Header> {
        let cid = self.cid;
        let c = self.conns.get_mut(&key)?;
        for (bit, op) in [
            (owe::REQUEST, Op::Request),
            (owe::RESPONSE, Op::Response),
            (owe::SHUTDOWN, Op::Shutdown),
        ] {
            if c.owe & bit != 0 {
                c.owe &= !bit;
                let mut h = c.header(key, cid, op, buf_alloc);
                if op == Op::Shutdown {
                    h.flags = c.shutdown_flags;
                }
                return Some(h);
            }
        }
        if c.can_send_data() && room > 0 {
            let want = room.min(c.peer_credit() as usize);
            buf.resize(want, 0);
            match c.stream.read(&mut buf[..want]) {
                Ok(0) => {
                    // The host sends no more. A full close (HUP) means it reads no more either.
                    c.host_eof = true;
                    c.host_readable = false;
                    c.shutdown_flags |= SHUTDOWN_SEND;
                    if c.host_hup {
                        c.shutdown_flags |= SHUTDOWN_RCV;
                    }
                    let mut h = c.header(key, cid, Op::Shutdown, buf_alloc);
                    h.flags = c.shutdown_flags;
                    if c.host_hup || c.peer_shut & SHUTDOWN_SEND != 0 {
                        self.start_closing(key);
                    }
                    return Some(h);
                }
                Ok(n) => {
                    c.tx_cnt += Wrapping(n as u32);
                    let mut h = c.header(key, cid, Op::Rw, buf_alloc);
                    h.len = n as u32;
                    return Some(h);
                }
                Err(e) if would_block(&e) => {
                    c.host_readable = false;
                }
                Err(_) => {
                    self.kill(key, true);
                    return None;
                }
            }
        }
        if c.owe & owe::CREDIT_UPDATE != 0 {
            return Some(c.header(key, cid, Op::CreditUpdate, buf_alloc));
        }
        None
    }

    fn notify_guest(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut signal = false;
        for (used, q) in [
            (std::mem::take(&mut self.used_rx), &mut active.rx),
            (std::mem::take(&mut self.used_tx), &mut active.tx),
        ] {
            if used {
                signal |= q.needs_notification(mem.as_ref()).unwrap_or(true);
            }
        }
        if signal {
            active.interrupt.signal_used();
        }
    }

    // ---------------------------------------------------------------------- timers --

    fn next_timeout_ms(&self) -> i32 {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(next.map_or(t, |n: Instant| n.min(t)));
        };
        for p in self.pending.values() {
            consider(p.deadline);
        }
        for c in self.conns.values() {
            if let Some(d) = c.deadline {
                consider(d);
            }
            if let Some(r) = c.retry_at {
                if self.active.is_some() {
                    consider(r);
                }
            }
        }
        match next {
            None => -1,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis();
                // Round up so we never wake just before the deadline.
                (ms + 1).min(i32::MAX as u128) as i32
            }
        }
    }

    fn timers(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for token in late {
            let why = format!(
                "no CONNECT line within {} ms",
                self.opts.line_timeout.as_millis()
            );
            self.drop_pending(token, Some(why));
        }
        let mut expired = Vec::new();
        let mut retry = Vec::new();
        for (k, c) in &self.conns {
            if c.deadline.is_some_and(|d| d <= now) {
                expired.push(*k);
            } else if c.retry_at.is_some_and(|r| r <= now) && self.active.is_some() {
                retry.push(*k);
            }
        }
        for key in expired {
            let Some(c) = self.conns.get(&key) else {
                continue;
            };
            match c.state {
                State::Connecting { sent } => {
                    let ready = self.shared.agent_ready.get().is_some();
                    let why = if c.refusal_reported {
                        refused_why(key.peer, ready, &self.opts)
                    } else {
                        let ms = if ready {
                            self.opts.connect_timeout
                        } else {
                            self.opts.boot_connect_timeout
                        }
                        .as_millis();
                        format!(
                            "timed out after {ms} ms waiting for guest port {} to accept",
                            key.peer
                        )
                    };
                    tell(&c.stream, &why);
                    self.shared
                        .counters
                        .connect_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    self.kill(key, sent);
                }
                // Closing: the guest never sent its RST.
                State::Established => self.kill(key, true),
            }
        }
        for key in retry {
            self.send_request(key);
        }
    }
}

/// Copies a guest tx chain into a packet, checking it against what the chain holds.
/// On error, the header comes back too when it could be read.
fn read_packet(
    mem: &GuestMemoryMmap,
    chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
) -> Result<TxPacket, (Option<Header>, PacketError)> {
    let mut reader = Reader::new(mem, chain).map_err(|_| (None, PacketError::Chain))?;
    let avail = reader.available_bytes();
    if avail < HEADER_LEN {
        return Err((None, PacketError::Short(avail)));
    }
    let mut raw = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut raw)
        .map_err(|_| (None, PacketError::Chain))?;
    let hdr = Header::decode(&raw);
    let rest = reader.available_bytes();
    let len = hdr.len;
    // Only RW carries data; for other ops a non-zero len is ignored, as Linux does.
    let payload = if hdr.op() == Op::Rw {
        if len > MAX_PAYLOAD || len as usize > rest {
            return Err((
                Some(hdr),
                PacketError::BadLength {
                    len,
                    max: MAX_PAYLOAD,
                    avail: rest,
                },
            ));
        }
        let mut p = vec![0u8; len as usize];
        reader
            .read_exact(&mut p)
            .map_err(|_| (Some(hdr), PacketError::Chain))?;
        p
    } else {
        Vec::new()
    };
    Ok(TxPacket { hdr, payload })
}
