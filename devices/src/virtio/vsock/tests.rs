//! The vsock device driven as Linux's virtio_vsock driver drives it: split queues in guest
//! memory (laid out by the shared test driver, `virtio::testing`), rx buffers posted up front,
//! packets written into tx chains, notifications through the queue events, answers read
//! from the used rings. The host side is real Unix sockets.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::packet::{Header, Op, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use super::*;
use crate::virtio::testing::{DriverQueue, F_NEXT, F_WRITE};
use crate::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};

const QSIZE: u16 = 256;
const CID: u64 = 3;
const RX_BUF: u32 = 4096 + HEADER_LEN as u32;
const RX_AREA: u64 = 0x10_0000;
const RX_SLOT: u64 = 0x2000;
const TX_AREA: u64 = 0x40_0000;
const TX_SLOT: u64 = 0x1_1000;
/// Two descriptors per tx chain (header, payload): 128 chains in flight at most.
const TX_SLOTS: u16 = QSIZE / 2;
const MEM_SIZE: usize = 0x200_0000;
const WAIT: Duration = Duration::from_secs(5);

type Ring = DriverQueue<Arc<GuestMemoryMmap>>;

/// A split queue at `addr` (Linux's `vring_init` layout) and the device's side of it.
fn ring(mem: &Arc<GuestMemoryMmap>, addr: u64) -> (Ring, Queue) {
    let r = DriverQueue::new(mem.clone(), addr, QSIZE);
    let q = r.queue();
    (r, q)
}

/// The next used element (head, len), if the device returned one.
fn pop_used(r: &mut Ring) -> Option<(u16, u32)> {
    r.pop_used().map(|(id, len)| (id as u16, len))
}

/// The simulated guest: its memory, its driver's rings, and the device.
struct Guest {
    mem: Arc<GuestMemoryMmap>,
    rx: Ring,
    tx: Ring,
    kicks: [EventFd; 3],
    interrupt: Arc<Interrupt>,
    pending_queues: Option<Vec<(Queue, EventFd)>>,
    dev: Vsock,
    handle: VsockHandle,
    free_tx: VecDeque<u16>,
    /// Packets read from the rx ring, not yet consumed by a test.
    inbox: VecDeque<(Header, Vec<u8>)>,
    events: Arc<Mutex<Vec<VsockEvent>>>,
    dir: PathBuf,
    socket: PathBuf,
}

fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "podvmm-vsock-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fast_options() -> VsockOptions {
    VsockOptions {
        connect_timeout: Duration::from_secs(5),
        line_timeout: Duration::from_secs(5),
        close_timeout: Duration::from_millis(500),
        buf_alloc: 64 * 1024,
        ..VsockOptions::default()
    }
}

impl Guest {
    /// Creates the device; the driver is not up until [`Guest::activate`].
    fn create(tag: &str, options: VsockOptions) -> Guest {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap());
        let dir = scratch(tag);
        let socket = dir.join("v.sock");
        let events: Arc<Mutex<Vec<VsockEvent>>> = Arc::default();
        let sink = events.clone();
        let (dev, handle) = Vsock::new(VsockConfig {
            cid: validated::GuestCid::new(CID).unwrap(),
            socket: socket.clone(),
            options,
            events: Some(Arc::new(move |e| sink.lock().unwrap().push(e))),
        })
        .unwrap();
        let (rx, rxq) = ring(&mem, 0x1_0000);
        let (tx, txq) = ring(&mem, 0x2_0000);
        let (_, evq) = ring(&mem, 0x3_0000);
        let kicks = [(); 3].map(|_| EventFd::new(EFD_NONBLOCK).unwrap());
        let queues = vec![
            (rxq, kicks[0].try_clone().unwrap()),
            (txq, kicks[1].try_clone().unwrap()),
            (evq, kicks[2].try_clone().unwrap()),
        ];
        Guest {
            mem,
            rx,
            tx,
            kicks,
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            pending_queues: Some(queues),
            dev,
            handle,
            free_tx: (0..TX_SLOTS).collect(),
            inbox: VecDeque::new(),
            events,
            dir,
            socket,
        }
    }

    fn new(tag: &str, options: VsockOptions) -> Guest {
        let mut g = Guest::create(tag, options);
        g.activate();
        g
    }

    /// DRIVER_OK: the driver posts its rx buffers and hands the queues over.
    fn activate(&mut self) {
        for i in 0..QSIZE {
            self.post_rx(i);
        }
        let queues = self.pending_queues.take().unwrap();
        self.dev
            .activate(ActivateContext {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt.clone(),
                acked_features: VIRTIO_F_VERSION_1,
            })
            .unwrap();
    }

    fn post_rx(&mut self, slot: u16) {
        let addr = RX_AREA + RX_SLOT * u64::from(slot);
        self.rx.set_desc(slot, addr, RX_BUF, F_WRITE, 0);
        self.rx.submit(slot);
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    fn reclaim_tx(&mut self) {
        while let Some((head, _)) = pop_used(&mut self.tx) {
            self.free_tx.push_back(head / 2);
        }
    }

    /// Writes a raw chain of (bytes, device-writable) descriptors into a tx slot.
    fn send_raw(&mut self, parts: &[(&[u8], bool)]) {
        let deadline = Instant::now() + WAIT;
        let slot = loop {
            self.reclaim_tx();
            if let Some(s) = self.free_tx.pop_front() {
                break s;
            }
            assert!(Instant::now() < deadline, "tx ring never drained");
            std::thread::sleep(Duration::from_millis(1));
        };
        let head = slot * 2;
        let mut addr = TX_AREA + TX_SLOT * u64::from(slot);
        assert!(parts.len() <= 2);
        for (i, (bytes, writable)) in parts.iter().enumerate() {
            self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
            let mut flags = if *writable { F_WRITE } else { 0 };
            if i + 1 < parts.len() {
                flags |= F_NEXT;
            }
            self.tx.set_desc(
                head + i as u16,
                addr,
                bytes.len() as u32,
                flags,
                head + i as u16 + 1,
            );
            addr += bytes.len() as u64;
        }
        self.tx.submit(head);
        self.kick(1);
    }

    /// Sends a packet: header and payload in two descriptors (as Linux 6.x does), or one.
    fn send(&mut self, h: Header, payload: &[u8]) {
        let mut h = h;
        h.len = payload.len() as u32;
        let hdr = h.encode();
        if payload.is_empty() {
            self.send_raw(&[(&hdr, false)]);
        } else if payload.len().is_multiple_of(2) {
            self.send_raw(&[(&hdr, false), (payload, false)]);
        } else {
            let mut one = hdr.to_vec();
            one.extend_from_slice(payload);
            self.send_raw(&[(&one, false)]);
        }
    }

    /// Moves whatever the device put in the rx ring into the inbox, reposting the buffers.
    fn poll(&mut self) {
        let mut reposted = false;
        while let Some((head, len)) = pop_used(&mut self.rx) {
            assert!(len as usize >= HEADER_LEN, "rx packet of {len} bytes");
            let addr = RX_AREA + RX_SLOT * u64::from(head);
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let h = Header::decode(&raw);
            assert_eq!(len as usize, HEADER_LEN + h.len as usize, "{h:?}");
            let mut payload = vec![0u8; h.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HEADER_LEN as u64))
                .unwrap();
            assert_eq!(
                (h.src_cid, h.dst_cid, h.type_),
                (HOST_CID, CID, TYPE_STREAM)
            );
            self.inbox.push_back((h, payload));
            self.post_rx(head);
            reposted = true;
        }
        if reposted {
            self.kick(0);
        }
    }

    /// Waits for the first inbox packet that `pred` accepts; others stay in the inbox.
    fn expect(&mut self, what: &str, pred: impl Fn(&Header) -> bool) -> (Header, Vec<u8>) {
        let deadline = Instant::now() + WAIT;
        loop {
            self.poll();
            if let Some(i) = self.inbox.iter().position(|(h, _)| pred(h)) {
                return self.inbox.remove(i).unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "no {what} from the device; got {:?}",
                self.inbox
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Asserts that nothing matching `pred` arrives within `d`.
    fn expect_none(&mut self, d: Duration, what: &str, pred: impl Fn(&Header) -> bool) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            self.poll();
            assert!(
                !self.inbox.iter().any(|(h, _)| pred(h)),
                "unexpected {what}: {:?}",
                self.inbox
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn hdr(&self, src_port: u32, dst_port: u32, op: Op) -> Header {
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op.into(),
            buf_alloc: 64 * 1024,
            ..Header::default()
        }
    }

    fn counter(&self, f: impl Fn(&VsockCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        f(self.handle.counters()).load(Ordering::Relaxed)
    }

    fn host(&self) -> UnixStream {
        let s = UnixStream::connect(&self.socket).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) => panic!("reading a line: {e} (so far {line:?})"),
        }
    }
    String::from_utf8(line).unwrap()
}

fn read_exact_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// At EOF (or reset) within the read timeout.
fn at_eof(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(n) => panic!("expected EOF, read {:?}", &b[..n]),
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
    }
}

/// Host connects with CONNECT `port`; the guest accepts. Returns the stream and the guest's
/// view of the connection (host port, guest port).
fn establish(g: &mut Guest, port: u32, guest_buf: u32) -> (UnixStream, u32) {
    let mut s = g.host();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request && h.dst_port == port);
    assert!(req.src_port >= 1 << 30, "{req:?}");
    assert_eq!(req.buf_alloc, 64 * 1024);
    let mut resp = g.hdr(port, req.src_port, Op::Response);
    resp.buf_alloc = guest_buf;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    (s, req.src_port)
}

#[test]
fn config_space_and_identity() {
    let g = Guest::create("ident", fast_options());
    assert_eq!(g.dev.device_type(), crate::virtio::TYPE_VSOCK);
    assert_eq!(g.dev.queue_max_sizes(), vec![QSIZE; 3]);
    assert_ne!(g.dev.features() & VIRTIO_F_VERSION_1, 0);
    let mut cid = [0u8; 8];
    g.dev.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    // The socket exists as soon as the device does, before any guest runs.
    assert!(g.socket.exists());
    // A reserved cid cannot reach the device: `validated::GuestCid` refuses to make one.
    // A live device's socket is never taken over.
    let busy = Vsock::new(VsockConfig {
        cid: validated::GuestCid::new(4).unwrap(),
        socket: g.socket.clone(),
        options: VsockOptions::default(),
        events: None,
    });
    assert!(matches!(
        busy,
        Err(VsockError::Socket(HybridError::InUse { .. }))
    ));
}

#[test]
fn socket_removed_with_handle() {
    let dir = scratch("cleanup");
    let socket = dir.join("v.sock");
    let (dev, handle) = Vsock::new(VsockConfig {
        cid: validated::GuestCid::new(CID).unwrap(),
        socket: socket.clone(),
        options: fast_options(),
        events: None,
    })
    .unwrap();
    drop(dev);
    assert!(socket.exists());
    drop(handle);
    assert!(!socket.exists());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn host_connect_and_data_both_ways() {
    let mut g = Guest::new("basic", fast_options());
    let (mut s, hport) = establish(&mut g, 1024, 64 * 1024);
    s.write_all(b"hello guest").unwrap();
    let (h, data) = g.expect("RW", |h| h.op() == Op::Rw);
    assert_eq!((h.src_port, h.dst_port), (hport, 1024));
    assert_eq!(data, b"hello guest");
    g.send(g.hdr(1024, hport, Op::Rw), b"hello host!");
    assert_eq!(read_exact_n(&mut s, 11), b"hello host!");
    // Odd-sized payload: header and data in one descriptor.
    g.send(g.hdr(1024, hport, Op::Rw), b"abc");
    assert_eq!(read_exact_n(&mut s, 3), b"abc");
    assert_eq!(g.counter(|c| &c.established), 1);
    assert_eq!(
        *g.events.lock().unwrap(),
        vec![VsockEvent::DriverReady],
        "no agent signal yet"
    );
}

#[test]
fn connect_before_driver_waits_for_it() {
    let mut g = Guest::create("early", fast_options());
    let mut s = g.host();
    s.write_all(b"CONNECT 1024\n").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    g.activate();
    let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request);
    g.send(g.hdr(1024, req.src_port, Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
}

#[test]
fn data_sent_with_the_connect_line_is_kept() {
    let mut g = Guest::new("pipelined", fast_options());
    let mut s = g.host();
    s.write_all(b"CONNECT 7\nearly bytes").unwrap();
    let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request);
    assert_eq!(req.dst_port, 7);
    g.send(g.hdr(7, req.src_port, Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {}", req.src_port));
    let (_, data) = g.expect("RW", |h| h.op() == Op::Rw);
    assert_eq!(data, b"early bytes");
}

#[test]
fn refused_connect_is_retried_and_the_ready_signal_hurries_it() {
    let mut g = Guest::new("retry", fast_options());
    let mut s = g.host();
    s.write_all(b"CONNECT 1024\n").unwrap();
    // Nothing listens yet: the guest kernel answers RST, a few times.
    let mut port = 0;
    for _ in 0..6 {
        let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request);
        port = req.src_port;
        g.send(g.hdr(1024, port, Op::Rst), &[]);
    }
    wait_for("six retries", || g.counter(|c| &c.connect_retries) >= 6);
    // The backoff is at its 250 ms cap now. The agent announces itself...
    let t = Instant::now();
    g.send(g.hdr(50000, AGENT_READY_PORT, Op::Request), &[]);
    let (rst, _) = g.expect("RST for the ready signal", |h| h.op() == Op::Rst);
    assert_eq!((rst.src_port, rst.dst_port), (AGENT_READY_PORT, 50000));
    // ...and the waiting CONNECT is asked again at once.
    let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request);
    assert_eq!(req.src_port, port, "same host port on every attempt");
    eprintln!("retry after the ready signal: {:?}", t.elapsed());
    g.send(g.hdr(1024, port, Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {port}"));
    assert!(g.handle.agent_ready().is_some());
    assert_eq!(
        *g.events.lock().unwrap(),
        vec![
            VsockEvent::DriverReady,
            VsockEvent::ConnectRefused { port: 1024 },
            VsockEvent::AgentReady { first: true }
        ]
    );
    // A second announcement (agent restarted) is reported, not recorded as the first.
    g.send(g.hdr(50001, AGENT_READY_PORT, Op::Request), &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 50001);
    assert_eq!(
        g.events.lock().unwrap().last(),
        Some(&VsockEvent::AgentReady { first: false })
    );
}

/// Answers every REQUEST with RST until the host stream has a line to read, and returns it.
fn refuse_until_answered(g: &mut Guest, s: &mut UnixStream) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(i) = g.inbox.iter().position(|(h, _)| h.op() == Op::Request) {
            let (req, _) = g.inbox.remove(i).unwrap();
            g.send(g.hdr(1024, req.src_port, Op::Rst), &[]);
        }
        g.poll();
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let peeked = s.peek_nonblocking(&mut b);
        s.set_nonblocking(false).unwrap();
        if peeked {
            break read_line(s);
        }
        assert!(Instant::now() < deadline, "no error line");
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn connect_gives_up_after_its_timeout() {
    let mut g = Guest::new(
        "timeout",
        VsockOptions {
            connect_timeout: Duration::from_millis(300),
            boot_connect_timeout: Duration::from_millis(300),
            ..fast_options()
        },
    );
    let mut s = g.host();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let line = refuse_until_answered(&mut g, &mut s);
    assert!(line.starts_with("ERR "), "{line}");
    assert!(line.contains("did not announce itself"), "{line}");
    assert!(!line.contains("OK"), "{line}");
    assert!(line.contains("1024"), "{line}");
    assert!(at_eof(&mut s));
    assert_eq!(g.counter(|c| &c.connect_timeouts), 1);
    assert!(g.counter(|c| &c.connect_retries) >= 1);
}

#[test]
fn a_booting_guest_holds_the_connect_past_connect_timeout() {
    // A shim dials right after vm.boot; the guest refuses while it boots. Without the agent's
    // announcement the short timeout does not apply: the CONNECT is still held after it.
    let mut g = Guest::new(
        "boot-wait",
        VsockOptions {
            connect_timeout: Duration::from_millis(200),
            boot_connect_timeout: Duration::from_secs(60),
            ..fast_options()
        },
    );
    let mut s = g.host();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let start = Instant::now();
    let mut port = 0;
    while start.elapsed() < Duration::from_millis(800) {
        g.poll();
        if let Some(i) = g.inbox.iter().position(|(h, _)| h.op() == Op::Request) {
            let (req, _) = g.inbox.remove(i).unwrap();
            port = req.src_port;
            g.send(g.hdr(1024, port, Op::Rst), &[]);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        g.counter(|c| &c.connect_timeouts),
        0,
        "gave up while booting"
    );
    // The agent announces itself, the retry is accepted.
    g.send(g.hdr(50000, AGENT_READY_PORT, Op::Request), &[]);
    let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request && h.dst_port == 1024);
    g.send(g.hdr(1024, req.src_port, Op::Response), &[]);
    assert_eq!(read_line(&mut s), format!("OK {port}"));
}

#[test]
fn after_the_agent_is_up_a_refused_connect_fails_in_connect_timeout() {
    let mut g = Guest::new(
        "after-ready",
        VsockOptions {
            connect_timeout: Duration::from_millis(300),
            boot_connect_timeout: Duration::from_secs(60),
            ..fast_options()
        },
    );
    g.send(g.hdr(50000, AGENT_READY_PORT, Op::Request), &[]);
    g.expect("RST for the ready signal", |h| h.op() == Op::Rst);
    let mut s = g.host();
    s.write_all(b"CONNECT 77\n").unwrap();
    let t = Instant::now();
    let line = refuse_until_answered(&mut g, &mut s);
    assert!(
        line.starts_with("ERR ") && line.contains("port 77"),
        "{line}"
    );
    assert!(line.contains("300 ms"), "{line}");
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
}

#[test]
fn a_connect_still_waiting_when_the_guest_stops_is_told() {
    let mut g = Guest::new("stopped", fast_options());
    let mut s = g.host();
    s.write_all(b"CONNECT 1024\n").unwrap();
    g.expect("REQUEST", |h| h.op() == Op::Request);
    // The device goes away with the VM (its worker stops).
    drop(g);
    let line = read_line(&mut s);
    assert_eq!(line, "ERR the guest stopped before port 1024 accepted");
    assert!(at_eof(&mut s));
}

trait PeekExt {
    fn peek_nonblocking(&self, b: &mut [u8]) -> bool;
}

impl PeekExt for UnixStream {
    fn peek_nonblocking(&self, b: &mut [u8]) -> bool {
        use std::os::fd::AsRawFd;
        // SAFETY: `b` is valid for writes of its length; the descriptor is ours.
        let n = unsafe {
            libc::recv(
                self.as_raw_fd(),
                b.as_mut_ptr().cast(),
                b.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        n > 0
    }
}

#[test]
fn bad_connect_lines_get_an_error_and_the_device_goes_on() {
    let mut g = Guest::new(
        "badlines",
        VsockOptions {
            line_timeout: Duration::from_millis(300),
            ..fast_options()
        },
    );
    let cases: &[(&[u8], &str)] = &[
        (b"HELLO 1024\n", "expected 'CONNECT <port>'"),
        (b"CONNECT\n", "expected 'CONNECT <port>'"),
        (b"CONNECT abc\n", "expected 'CONNECT <port>'"),
        (b"CONNECT 4294967295\n", "out of range"),
        (b"CONNECT 99999999999\n", "out of range"),
        (b"CONNECT \xff\xfe\n", "expected 'CONNECT <port>'"),
        (&[b'x'; 100], "no newline within 64 bytes"),
    ];
    for (input, want) in cases {
        let mut s = g.host();
        s.write_all(input).unwrap();
        let line = read_line(&mut s);
        assert!(
            line.starts_with("ERR ") && line.contains(want),
            "{input:?}: {line}"
        );
        assert!(at_eof(&mut s), "{input:?}");
    }
    // A client that never sends its line is dropped after the line timeout.
    let mut silent = g.host();
    let line = read_line(&mut silent);
    assert!(line.contains("no CONNECT line"), "{line}");
    // A client that leaves half-way through its line is just forgotten.
    let mut gone = g.host();
    gone.write_all(b"CONN").unwrap();
    drop(gone);
    assert_eq!(g.counter(|c| &c.bad_connect_lines), cases.len() as u64 + 1);
    // None of this reached the guest, and the device still serves.
    g.expect_none(Duration::from_millis(50), "packet", |_| true);
    let (mut s, hport) = establish(&mut g, 1024, 64 * 1024);
    g.send(g.hdr(1024, hport, Op::Rw), b"still alive");
    assert_eq!(read_exact_n(&mut s, 11), b"still alive");
}

#[test]
fn guest_connection_goes_to_the_port_socket() {
    let mut g = Guest::new("guestinit", fast_options());
    let listener = UnixListener::bind(hybrid::port_path(&g.socket, 5000)).unwrap();
    g.send(g.hdr(40000, 5000, Op::Request), &[]);
    let (resp, _) = g.expect("RESPONSE", |h| h.op() == Op::Response);
    assert_eq!((resp.src_port, resp.dst_port), (5000, 40000));
    assert_eq!(resp.buf_alloc, 64 * 1024);
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    g.send(g.hdr(40000, 5000, Op::Rw), b"from the guest");
    assert_eq!(read_exact_n(&mut s, 14), b"from the guest");
    s.write_all(b"from the host").unwrap();
    let (_, data) = g.expect("RW", |h| h.op() == Op::Rw);
    assert_eq!(data, b"from the host");
    // The guest closes: SHUTDOWN both ways; the host reads EOF; the device answers RST.
    let mut sd = g.hdr(40000, 5000, Op::Shutdown);
    sd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(sd, &[]);
    assert!(at_eof(&mut s));
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 40000);
    // No listener on that port: RST at once.
    g.send(g.hdr(40001, 5001, Op::Request), &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 40001);
    assert_eq!(g.counter(|c| &c.refused_guest), 1);
}

#[test]
fn credit_updates_and_backpressure_guest_to_host() {
    let mut g = Guest::new("credit-g2h", fast_options());
    let (mut s, hport) = establish(&mut g, 1024, 64 * 1024);
    let buf_alloc = 64 * 1024u32;
    // The guest sends as its credit allows while the host reads nothing.
    let chunk = vec![0x5au8; 4096];
    let mut sent: u32 = 0;
    let mut peer_fwd: u32 = 0;
    let stalled_at = loop {
        let credit = buf_alloc - (sent - peer_fwd);
        if credit >= chunk.len() as u32 {
            g.send(g.hdr(1024, hport, Op::Rw), &chunk);
            sent += chunk.len() as u32;
            continue;
        }
        // Out of credit: wait for an update.
        let deadline = Instant::now() + Duration::from_millis(300);
        let mut updated = false;
        while Instant::now() < deadline {
            g.poll();
            if let Some(i) = g.inbox.iter().position(|(h, _)| h.op() == Op::CreditUpdate) {
                let (h, _) = g.inbox.remove(i).unwrap();
                assert!(h.fwd_cnt >= peer_fwd && h.fwd_cnt <= sent, "{h:?}");
                assert_eq!(h.buf_alloc, buf_alloc);
                peer_fwd = h.fwd_cnt;
                updated = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        if !updated {
            break sent;
        }
        assert!(sent < 64 << 20, "the device never pushed back");
    };
    // Bounded: the host socket's buffer plus at most buf_alloc in the device.
    eprintln!("guest stalled after {stalled_at} bytes (host socket buffer + device buffer)");
    assert!(stalled_at > buf_alloc);
    // A CREDIT_REQUEST gets the current credit.
    g.send(g.hdr(1024, hport, Op::CreditRequest), &[]);
    let (h, _) = g.expect("CREDIT_UPDATE", |h| h.op() == Op::CreditUpdate);
    peer_fwd = h.fwd_cnt;
    assert!(sent - peer_fwd <= buf_alloc);
    // The host reads: the device drains its buffer; everything sent was forwarded.
    let got = read_exact_n(&mut s, stalled_at as usize);
    assert!(got.iter().all(|&b| b == 0x5a));
    g.send(g.hdr(1024, hport, Op::CreditRequest), &[]);
    g.expect("CREDIT_UPDATE", |h| {
        h.op() == Op::CreditUpdate && h.fwd_cnt == sent
    });

    // A guest that ignores its credit while the host reads nothing is reset, and the device
    // never buffers more than buf_alloc for it.
    let (_s2, hport2) = establish(&mut g, 1024, 64 * 1024);
    let mut blasted = 0usize;
    loop {
        g.send(g.hdr(1024, hport2, Op::Rw), &chunk);
        blasted += chunk.len();
        g.poll();
        if g.inbox
            .iter()
            .any(|(h, _)| h.op() == Op::Rst && h.src_port == hport2)
        {
            break;
        }
        assert!(
            blasted < 16 << 20,
            "no reset for a guest overrunning its credit"
        );
    }
    eprintln!("overrunning guest reset after {blasted} bytes");
    assert_eq!(g.counter(|c| &c.credit_violations), 1);
}

#[test]
fn backpressure_host_to_guest() {
    let mut g = Guest::new("credit-h2g", fast_options());
    // The guest's socket buffer is 16 KiB and its application reads nothing.
    let (mut s, hport) = establish(&mut g, 1024, 16 * 1024);
    s.set_nonblocking(true).unwrap();
    let block = vec![7u8; 64 * 1024];
    let mut written = 0usize;
    let start = Instant::now();
    // The host writes until its socket pushes back (EAGAIN): that must happen.
    loop {
        match s.write(&block) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
        assert!(written < 64 << 20, "the host never saw back-pressure");
        assert!(start.elapsed() < WAIT);
    }
    // The guest got exactly its credit's worth, in packets no larger than its buffers.
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        g.poll();
        while let Some(i) = g.inbox.iter().position(|(h, _)| h.op() == Op::Rw) {
            let (h, d) = g.inbox.remove(i).unwrap();
            assert!(h.len <= RX_BUF - HEADER_LEN as u32);
            got += d.len();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(got, 16 * 1024, "host wrote {written}");
    // The guest application reads: its kernel sends a credit update.
    let mut cu = g.hdr(1024, hport, Op::CreditUpdate);
    cu.buf_alloc = 16 * 1024;
    cu.fwd_cnt = 16 * 1024;
    g.send(cu, &[]);
    let mut more = 0usize;
    while more < 16 * 1024 {
        let (_, d) = g.expect("RW", |h| h.op() == Op::Rw);
        more += d.len();
    }
    assert_eq!(more, 16 * 1024);
    g.expect_none(Duration::from_millis(100), "RW beyond credit", |h| {
        h.op() == Op::Rw
    });
}

#[test]
fn host_half_close_and_full_close() {
    let mut g = Guest::new("shutdown", fast_options());
    // Half close: the host sends no more, but still reads.
    let (mut s, hport) = establish(&mut g, 1024, 64 * 1024);
    s.write_all(b"last words").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (_, d) = g.expect("RW", |h| h.op() == Op::Rw);
    assert_eq!(d, b"last words");
    let (sd, _) = g.expect("SHUTDOWN", |h| h.op() == Op::Shutdown);
    assert_eq!(sd.flags, SHUTDOWN_SEND);
    g.send(g.hdr(1024, hport, Op::Rw), b"reply");
    assert_eq!(read_exact_n(&mut s, 5), b"reply");
    // The guest closes too: both directions are over, the device resets the connection.
    let mut gsd = g.hdr(1024, hport, Op::Shutdown);
    gsd.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    g.send(gsd, &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.src_port == hport);
    assert!(at_eof(&mut s));

    // Full close mid-stream: data first, then SHUTDOWN with both flags.
    let (mut s2, hport2) = establish(&mut g, 1024, 64 * 1024);
    s2.write_all(b"bye").unwrap();
    drop(s2);
    let (_, d) = g.expect("RW", |h| h.op() == Op::Rw && h.src_port == hport2);
    assert_eq!(d, b"bye");
    let (sd, _) = g.expect("SHUTDOWN", |h| {
        h.op() == Op::Shutdown && h.src_port == hport2
    });
    assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // The guest answers RST, as Linux does; a late write of the guest gets RST back.
    g.send(g.hdr(1024, hport2, Op::Rst), &[]);
    g.send(g.hdr(1024, hport2, Op::Rw), b"too late");
    g.expect("RST", |h| h.op() == Op::Rst && h.src_port == hport2);
    let _ = &mut s;
}

#[test]
fn host_gone_while_the_guest_writes() {
    let mut g = Guest::new("hostgone", fast_options());
    let (s, hport) = establish(&mut g, 1024, 64 * 1024);
    drop(s);
    let (sd, _) = g.expect("SHUTDOWN", |h| h.op() == Op::Shutdown);
    assert_eq!(sd.flags, SHUTDOWN_RCV | SHUTDOWN_SEND);
    // A guest that ignores the SHUTDOWN and writes is reset.
    g.send(g.hdr(1024, hport, Op::Rw), b"anyone?");
    g.expect("RST", |h| h.op() == Op::Rst);
}

#[test]
fn guest_rst_closes_the_host_stream() {
    let mut g = Guest::new("guestrst", fast_options());
    let (mut s, hport) = establish(&mut g, 1024, 64 * 1024);
    g.send(g.hdr(1024, hport, Op::Rst), &[]);
    assert!(at_eof(&mut s));
    // The close timeout: a guest that never answers our SHUTDOWN is reset.
    let (s2, hport2) = establish(&mut g, 1024, 64 * 1024);
    drop(s2);
    g.expect("SHUTDOWN", |h| {
        h.op() == Op::Shutdown && h.src_port == hport2
    });
    g.expect("RST after the close timeout", |h| {
        h.op() == Op::Rst && h.src_port == hport2
    });
}

#[test]
fn many_connections_at_once() {
    let mut g = Guest::new("many", fast_options());
    let n = 60;
    let mut streams = Vec::new();
    for i in 0..n {
        let mut s = g.host();
        s.write_all(format!("CONNECT {}\n", 2000 + i).as_bytes())
            .unwrap();
        streams.push(s);
    }
    let mut ports = vec![0u32; n];
    for _ in 0..n {
        let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request);
        let i = (req.dst_port - 2000) as usize;
        ports[i] = req.src_port;
        g.send(g.hdr(req.dst_port, req.src_port, Op::Response), &[]);
    }
    for (i, s) in streams.iter_mut().enumerate() {
        assert_eq!(read_line(s), format!("OK {}", ports[i]));
        s.write_all(format!("message {i}").as_bytes()).unwrap();
    }
    let mut seen = vec![false; n];
    for _ in 0..n {
        let (h, d) = g.expect("RW", |h| h.op() == Op::Rw);
        let i = (h.dst_port - 2000) as usize;
        assert_eq!(h.src_port, ports[i]);
        assert_eq!(d, format!("message {i}").as_bytes());
        seen[i] = true;
        let hp = h.src_port;
        g.send(
            g.hdr(h.dst_port, hp, Op::Rw),
            format!("echo {i}").as_bytes(),
        );
    }
    assert!(seen.iter().all(|&x| x));
    for (i, s) in streams.iter_mut().enumerate() {
        let want = format!("echo {i}");
        assert_eq!(read_exact_n(s, want.len()), want.as_bytes());
    }
    assert_eq!(g.counter(|c| &c.established), n as u64);
}

#[test]
fn connection_limit() {
    let mut g = Guest::new(
        "limit",
        VsockOptions {
            max_connections: 2,
            ..fast_options()
        },
    );
    let (_a, _) = establish(&mut g, 1, 4096);
    let (_b, _) = establish(&mut g, 2, 4096);
    let mut c = g.host();
    let line = read_line(&mut c);
    assert!(line.contains("too many connections"), "{line}");
    g.send(g.hdr(40000, 5000, Op::Request), &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 40000);
}

#[test]
fn garbage_from_the_guest() {
    let mut g = Guest::new("garbage", fast_options());
    let (mut s, hport) = establish(&mut g, 1024, 64 * 1024);
    // A chain shorter than a header.
    g.send_raw(&[(&[1u8, 2, 3], false)]);
    // A device-writable tx buffer: nothing readable.
    g.send_raw(&[(&[0u8; 64], true)]);
    // Spoofed source cid, and a packet for another cid: dropped.
    let mut spoof = g.hdr(1024, hport, Op::Rw);
    spoof.src_cid = 99;
    g.send(spoof, b"spoofed");
    let mut other = g.hdr(1024, hport, Op::Rw);
    other.dst_cid = 7;
    g.send(other, b"elsewhere");
    // Unknown op and wrong type on connections nobody knows: RST.
    let mut unknown = g.hdr(33, 44, Op::Rw);
    unknown.op = 77;
    g.send(unknown, &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 33);
    let mut dgram = g.hdr(34, 45, Op::Request);
    dgram.type_ = 2;
    g.send(dgram, &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 34);
    // Data for nobody: RST.
    g.send(g.hdr(35, 46, Op::Rw), b"?");
    g.expect("RST", |h| h.op() == Op::Rst && h.dst_port == 35);
    assert!(g.counter(|c| &c.invalid_packets) >= 5);
    // The real connection is untouched.
    g.send(g.hdr(1024, hport, Op::Rw), b"fine");
    assert_eq!(read_exact_n(&mut s, 4), b"fine");
    // A payload length that lies: the connection it names is reset.
    let mut liar = g.hdr(1024, hport, Op::Rw);
    liar.len = 60000;
    g.send_raw(&[(&liar.encode(), false), (b"short", false)]);
    g.expect("RST", |h| h.op() == Op::Rst && h.src_port == hport);
    assert!(at_eof(&mut s));
    // A second REQUEST on a live connection is a protocol error too.
    let (_s2, hport2) = establish(&mut g, 1024, 64 * 1024);
    g.send(g.hdr(1024, hport2, Op::Request), &[]);
    g.expect("RST", |h| h.op() == Op::Rst && h.src_port == hport2);
    assert!(!g.interrupt.needs_reset());
}

#[test]
fn corrupt_ring_asks_for_a_reset_and_reset_recovers() {
    let mut g = Guest::new("ring", fast_options());
    let (mut s, _) = establish(&mut g, 1024, 64 * 1024);
    // The avail index jumps past the ring size: the queue itself is garbage.
    let bogus = g.tx.avail_idx().wrapping_add(QSIZE + 5);
    g.tx.set_avail_idx(bogus);
    g.kick(1);
    wait_for("NEEDS_RESET", || g.interrupt.needs_reset());
    // The driver resets the device: connections are gone, the socket stays.
    g.dev.reset();
    assert!(at_eof(&mut s));
    // A CONNECT made while the driver is down waits for the next activation.
    let mut s2 = g.host();
    s2.write_all(b"CONNECT 1024\n").unwrap();
    let (rx, rxq) = ring(&g.mem, 0x1_0000);
    let (tx, txq) = ring(&g.mem, 0x2_0000);
    let (_, evq) = ring(&g.mem, 0x3_0000);
    g.rx = rx;
    g.tx = tx;
    g.free_tx = (0..TX_SLOTS).collect();
    g.inbox.clear();
    g.pending_queues = Some(vec![
        (rxq, g.kicks[0].try_clone().unwrap()),
        (txq, g.kicks[1].try_clone().unwrap()),
        (evq, g.kicks[2].try_clone().unwrap()),
    ]);
    g.interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    g.activate();
    let (req, _) = g.expect("REQUEST", |h| h.op() == Op::Request);
    g.send(g.hdr(1024, req.src_port, Op::Response), &[]);
    assert_eq!(read_line(&mut s2), format!("OK {}", req.src_port));
}

#[test]
fn tiny_rx_buffers_are_returned_not_fatal() {
    let mut g = Guest::create("tinyrx", fast_options());
    // One buffer smaller than a header first, then normal ones.
    g.rx.set_desc(0, RX_AREA, 16, F_WRITE, 0);
    g.rx.submit(0);
    for i in 1..QSIZE {
        g.post_rx(i);
    }
    let queues = g.pending_queues.take().unwrap();
    g.dev
        .activate(ActivateContext {
            mem: g.mem.clone(),
            queues,
            interrupt: g.interrupt.clone(),
            acked_features: VIRTIO_F_VERSION_1,
        })
        .unwrap();
    let mut s = g.host();
    s.write_all(b"CONNECT 9\n").unwrap();
    // The tiny buffer comes back empty (len 0); the REQUEST lands in the next one.
    let deadline = Instant::now() + WAIT;
    let first = loop {
        if let Some(u) = pop_used(&mut g.rx) {
            break u;
        }
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!(first, (0, 0));
    g.expect("REQUEST", |h| h.op() == Op::Request && h.dst_port == 9);
    assert_eq!(g.counter(|c| &c.invalid_packets), 1);
}
