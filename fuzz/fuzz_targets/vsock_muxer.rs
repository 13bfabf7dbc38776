//! virtio-vsock's muxer, the connection state machine between the guest's queues and the
//! host's Unix sockets, driven by a script of guest packets (any header, any payload, any
//! descriptor layout) and host actions (connect with any line, write, half-close, close),
//! one muxer round after each step, in place (no thread: `devices::virtio::vsock::fuzzing`).
//!
//! The input's last byte may also zero the device's time-outs (see `options`).
//!
//! Checks beyond "no panic, no sanitizer report": every packet the device hands the guest
//! fits the buffer it was given, comes from the host to this guest, is a stream packet with
//! a known op and a length that matches the bytes used; the device never writes into the
//! buffers the guest gave it to read.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devices::virtio::testing::DriverQueue;
use devices::virtio::vsock::fuzzing::Harness;
use devices::virtio::vsock::packet::{Header, HEADER_LEN, HOST_CID, TYPE_STREAM};
use devices::virtio::vsock::VsockOptions;
use devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CID: u64 = 3;
const MEM: usize = 1 << 20;
const QSIZE: u16 = 16;
/// Ring bases: rx, tx, event. Each: descriptors, avail ring at +0x100, used ring at +0x200.
const RINGS: [u64; 3] = [0x0, 0x1000, 0x2000];
const RX_BUFS: u64 = 0x1_0000;
const RX_LEN: u32 = 4096 + HEADER_LEN as u32;
const TX_AREA: u64 = 0x4_0000;
/// One 0x1200-byte slot per descriptor pair: a header (up to 0x100), then a payload (up to 4080).
const TX_SLOT: u64 = 0x1200;
const TX_AREA_LEN: usize = 16 * TX_SLOT as usize;
/// A host port the guest may connect to: the harness listens on `<socket>_5000`.
const HOST_PORT: u32 = 5000;

static SEQ: AtomicU64 = AtomicU64::new(0);

/// The guest side of one queue (the devices crate's shared test driver); rings at `base`,
/// avail at +0x100, used at +0x200.
type Driver = DriverQueue<Arc<GuestMemoryMmap>>;

fn driver(mem: &Arc<GuestMemoryMmap>, base: u64) -> Driver {
    DriverQueue::with_layout(mem.clone(), QSIZE, base, base + 0x100, base + 0x200)
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> Option<u8> {
        let (b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(*b)
    }
    fn take(&mut self, n: usize) -> &[u8] {
        let n = n.min(self.0.len());
        let (a, rest) = self.0.split_at(n);
        self.0 = rest;
        a
    }
    fn u32(&mut self) -> u32 {
        let b = self.take(4);
        let mut a = [0u8; 4];
        a[..b.len()].copy_from_slice(b);
        u32::from_le_bytes(a)
    }
}

struct Rig {
    mem: Arc<GuestMemoryMmap>,
    harness: Harness,
    rx: Driver,
    tx: Driver,
    tx_next: u16,
    socket: PathBuf,
    host: Vec<UnixStream>,
    listener: UnixListener,
    /// The last header the device sent the guest: a script can answer it.
    last: Option<Header>,
}

impl Rig {
    fn turn(&mut self) {
        let mut before = vec![0u8; TX_AREA_LEN];
        self.mem
            .read_slice(&mut before, GuestAddress(TX_AREA))
            .unwrap();
        self.harness.turn();
        let mut after = vec![0u8; TX_AREA_LEN];
        self.mem
            .read_slice(&mut after, GuestAddress(TX_AREA))
            .unwrap();
        assert!(
            before == after,
            "the device wrote into a buffer the guest gave it to read"
        );
        self.tx.take_used();
        for (head, len) in self.rx.take_used() {
            let head = u16::try_from(head)
                .ok()
                .filter(|&h| h < QSIZE)
                .unwrap_or_else(|| panic!("used head {head} was never offered"));
            assert!(len <= RX_LEN, "{len} bytes used of a {RX_LEN}-byte buffer");
            assert!(len as usize >= HEADER_LEN, "a {len}-byte packet");
            let mut b = [0u8; HEADER_LEN];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(head) * 0x2000))
                .unwrap();
            let h = Header::decode(&b);
            assert_eq!((h.src_cid, h.dst_cid), (HOST_CID, CID), "{h:?}");
            assert_eq!(h.type_, TYPE_STREAM, "{h:?}");
            assert!((1..=7).contains(&h.op), "{h:?}");
            assert_eq!(h.len as usize + HEADER_LEN, len as usize, "{h:?}");
            self.last = Some(h);
            // The guest takes the packet and offers the buffer again.
            self.rx.submit(head);
        }
        // Host clients read whatever came (the device must not stall on them).
        let mut buf = [0u8; 8192];
        for s in &mut self.host {
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        if let Ok((s, _)) = self.listener.accept() {
            let _ = s.set_nonblocking(true);
            self.host.push(s);
        }
    }

    /// A guest packet: `hdr` and `payload` in one or two descriptors, or a raw chain.
    fn guest_send(&mut self, hdr: &[u8], payload: &[u8], layout: u8) {
        let base = TX_AREA + u64::from(self.tx_next % QSIZE) * TX_SLOT;
        let mem = &self.mem;
        mem.write_slice(hdr, GuestAddress(base)).unwrap();
        mem.write_slice(payload, GuestAddress(base + 0x100))
            .unwrap();
        let head = self.tx_next % QSIZE;
        let second = (head + 1) % QSIZE;
        let tx = &self.tx;
        let hlen = hdr.len() as u32;
        match layout % 4 {
            // Header and payload in one buffer.
            0 => {
                mem.write_slice(payload, GuestAddress(base + u64::from(hlen)))
                    .unwrap();
                tx.set_desc(head, base, hlen + payload.len() as u32, 0, 0);
            }
            // Two descriptors, as Linux does.
            1 => {
                tx.set_desc(head, base, hlen, 1, second);
                tx.set_desc(second, base + 0x100, payload.len() as u32, 0, 0);
            }
            // A loop.
            2 => {
                tx.set_desc(head, base, hlen, 1, second);
                tx.set_desc(second, base + 0x100, payload.len() as u32, 1, head);
            }
            // Device-writable, or pointing past the end of memory.
            _ => {
                tx.set_desc(head, base, hlen, 2, 0);
                tx.set_desc(second, MEM as u64 - 8, 64, 0, 0);
            }
        }
        self.tx.submit(head);
        self.tx_next = self.tx_next.wrapping_add(2);
    }

    /// A header from the host's last packet with the ends swapped: a well-formed answer.
    fn answer(&self, op: u16, len: u32) -> Header {
        let last = self.last.unwrap_or_default();
        Header {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: last.dst_port,
            dst_port: last.src_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 64 * 1024,
            fwd_cnt: 0,
        }
    }
}

/// The device's options: the defaults, except that the input's last byte may set any of the
/// time-outs to zero (bit 7: connect, bit 6: close, bit 5: CONNECT line), so that they expire
/// within one execution and the paths that end connections on time run too.
fn options(data: &[u8]) -> VsockOptions {
    let last = data.last().copied().unwrap_or(0);
    let mut o = VsockOptions::default();
    if last & 0x80 != 0 {
        o.connect_timeout = Duration::ZERO;
        o.boot_connect_timeout = Duration::ZERO;
    }
    if last & 0x40 != 0 {
        o.close_timeout = Duration::ZERO;
    }
    if last & 0x20 != 0 {
        o.line_timeout = Duration::ZERO;
    }
    o
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let mem = Arc::new(
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory"),
    );
    let dir = std::env::temp_dir().join(format!("podvmm-fuzz-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join(format!("v{}.sock", SEQ.fetch_add(1, Ordering::Relaxed)));
    let port_socket = PathBuf::from(format!("{}_{HOST_PORT}", socket.display()));
    let listener = UnixListener::bind(&port_socket).unwrap();
    listener.set_nonblocking(true).unwrap();
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let [rx, tx, evq] = RINGS.map(|base| driver(&mem, base));
    let harness = Harness::new(
        CID,
        &socket,
        mem.clone(),
        [rx.queue(), tx.queue(), evq.queue()],
        interrupt,
        options(data),
    )
    .expect("vsock harness");
    let mut rig = Rig {
        mem,
        harness,
        rx,
        tx,
        tx_next: 0,
        socket: socket.clone(),
        host: Vec::new(),
        listener,
        last: None,
    };
    for i in 0..QSIZE {
        let addr = RX_BUFS + u64::from(i) * 0x2000;
        rig.rx.set_desc(i, addr, RX_LEN, 2, 0);
        rig.rx.submit(i);
    }
    rig.turn();

    let mut steps = 0;
    while let Some(op) = input.byte() {
        steps += 1;
        if steps > 64 {
            break;
        }
        match op % 8 {
            // A raw guest packet: any header, any payload, any layout.
            0 => {
                let layout = input.byte().unwrap_or(0);
                let hdr = input.take(HEADER_LEN).to_vec();
                let n = input.byte().unwrap_or(0) as usize * 16;
                let payload = input.take(n).to_vec();
                rig.guest_send(&hdr, &payload, layout);
            }
            // A well-addressed packet with a chosen op and ports, and a fuzzed length.
            1 => {
                let pick = input.byte().unwrap_or(0);
                let mut h = rig.answer(u16::from(pick % 8), 0);
                if pick & 0x80 != 0 {
                    h.src_port = input.u32();
                    h.dst_port = if pick & 0x40 != 0 {
                        HOST_PORT
                    } else {
                        input.u32()
                    };
                }
                h.flags = u32::from(input.byte().unwrap_or(0) % 4);
                h.fwd_cnt = input.u32();
                h.buf_alloc = input.u32();
                let n = input.byte().unwrap_or(0) as usize * 8;
                let payload = input.take(n).to_vec();
                h.len = if pick & 0x20 != 0 {
                    input.u32()
                } else {
                    payload.len() as u32
                };
                rig.guest_send(&h.encode(), &payload, 1);
            }
            // A host client connects and says something (often a real CONNECT line).
            2 => {
                if let Ok(mut s) = UnixStream::connect(&rig.socket) {
                    let _ = s.set_nonblocking(true);
                    let line = match input.byte().unwrap_or(0) {
                        b if b < 0xc0 => format!("CONNECT {}\n", u32::from(b) + 1020).into_bytes(),
                        _ => {
                            let n = input.byte().unwrap_or(0) as usize;
                            input.take(n).to_vec()
                        }
                    };
                    let _ = s.write(&line);
                    rig.host.push(s);
                }
            }
            // A host client writes.
            3 => {
                let i = input.byte().unwrap_or(0) as usize;
                let n = input.byte().unwrap_or(0) as usize * 32;
                let bytes = input.take(n).to_vec();
                if !rig.host.is_empty() {
                    let k = i % rig.host.len();
                    let _ = rig.host[k].write(&bytes);
                }
            }
            // A host client half-closes or goes away.
            4 => {
                let i = input.byte().unwrap_or(0) as usize;
                if !rig.host.is_empty() {
                    let k = i % rig.host.len();
                    if i & 1 == 0 {
                        let _ = rig.host[k].shutdown(std::net::Shutdown::Write);
                    } else {
                        rig.host.swap_remove(k);
                    }
                }
            }
            // The guest accepts a host connection, or sends data on the last connection.
            5 => {
                let h = rig.answer(2, 0);
                rig.guest_send(&h.encode(), &[], 1);
            }
            6 => {
                let n = input.byte().unwrap_or(0) as usize * 4;
                let payload = input.take(n).to_vec();
                let h = rig.answer(5, payload.len() as u32);
                rig.guest_send(&h.encode(), &payload, 1);
            }
            // Just a round.
            _ => {}
        }
        rig.turn();
    }
    for _ in 0..3 {
        rig.turn();
    }
    let _ = rig.harness.counters();
    drop(rig);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&port_socket);
});
