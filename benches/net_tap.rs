//! The virtio-net device path against the raw TAP it sits on, host side, no guest.
//!
//! In a network namespace of its own (so nothing reaches the host's interfaces), the bench
//! creates a TAP with podvmm's own code (`IFF_VNET_HDR`, 12-byte header), brings it up, and
//! opens `AF_PACKET` sockets on it for private EtherTypes (0x88b5/6): the "host network".
//!
//! - transmit (guest to host), per batch of 256 frames:
//!   - `tx_device`: the frames sit in guest memory behind 256 transmit descriptors, as a
//!     driver posts them; the timed part is the device's `process_tx` (chain checks, header
//!     copy, deny-list check, one `writev` per frame, used ring, one interrupt) plus reading
//!     the 256 frames from the packet socket;
//!   - `tx_tap`: the same frames, laid out as in guest memory, `write`n to the TAP directly,
//!     then read the same way.
//! - receive (host to guest): 256 frames sent into the packet socket, then
//!   - `rx_device`: the device's `process_rx` moves them into 256 posted receive buffers
//!     (one `readv` each, straight into guest memory, `num_buffers`, used ring, interrupt);
//!   - `rx_tap`: one `read` per frame from the TAP into 256 buffers laid out as the guest's.
//!
//! Frames of 60 bytes (frames per second) and 1514 bytes (throughput). Every path is first
//! run once and its frames checked byte for byte. The closing `podvmm-bench:` lines come
//! from an interleaved set of batches (the paths take turns, so noise hits all alike):
//! per-path frames/s and Gbit/s, per-pair ratios, and `net_ratio_vs_tap`, the worst of the
//! four ratios (device / raw TAP; 1.0 means the device path costs nothing extra).
//!
//! Needs root (a network namespace and a TAP); prints a SKIPPED line otherwise.
//! `PODVMM_BENCH_QUICK=1` (or `--quick`) cuts the sample sizes for CI.

#[path = "support/mod.rs"]
mod support;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{median, mode_from_args, quick_requested, Mode};

use criterion::{Criterion, Throughput};
use devices::virtio::net::tap::{NetBackend, Tap};
use devices::virtio::net::worker::{
    NetCounters, PairSetup, QueuePair, RxState, TxState, RX_NEED_PLAIN,
};
use devices::virtio::net::{EgressFilter, Ipv4Net, VNET_HDR_LEN};
use devices::virtio::testing::{DriverQueue, F_WRITE};
use devices::virtio::Interrupt;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const BATCH: u16 = 256;
/// Local experimental EtherTypes, one per frame size, so each size's socket sees only its own.
const ETHERTYPES: [u16; 2] = [0x88b5, 0x88b6];
const TAP_NAME: &str = "pbench0";
const BUF: u64 = 2048;
const TXQ: u64 = 0x1_0000;
const RXQ: u64 = 0x2_0000;
const TX_BUFS: u64 = 0x10_0000;
const RX_BUFS: u64 = 0x20_0000;
const MEM: usize = 0x40_0000;

fn check(ret: libc::c_int, what: &str) {
    assert!(ret >= 0, "{what}: {}", std::io::Error::last_os_error());
}

/// The guest side of a split queue: a fixed descriptor per buffer, heads posted in batches.
struct Driver(DriverQueue<Arc<GuestMemoryMmap>>);

impl Driver {
    fn new(mem: &Arc<GuestMemoryMmap>, base: u64, bufs: u64, len: u32, write: bool) -> Self {
        let avail = base + 16 * u64::from(BATCH);
        let q = DriverQueue::with_layout(mem.clone(), BATCH, base, avail, base + 0x2000);
        for i in 0..BATCH {
            let flags = if write { F_WRITE } else { 0 };
            q.set_desc(i, bufs + u64::from(i) * BUF, len, flags, 0);
        }
        Driver(q)
    }

    fn queue(&self) -> Queue {
        self.0.queue()
    }

    /// Makes every descriptor available again (the device used them all last time).
    fn post_all(&mut self) {
        for i in 0..BATCH {
            self.0.push_avail(i);
        }
        self.0.publish();
    }
}

fn frame(len: usize, ethertype: u16, seq: u16) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x11]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(&seq.to_be_bytes());
    while f.len() < len {
        f.push(f.len() as u8);
    }
    f
}

/// An AF_PACKET socket on the TAP for `ethertype`, with room for whole batches.
fn packet_socket(ifname: &str, ethertype: u16) -> OwnedFd {
    let proto = ethertype.to_be();
    // SAFETY: socket(2); checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto),
        )
    };
    check(fd, "AF_PACKET socket");
    // SAFETY: a fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "{ifname} has no index");
    // SAFETY: sockaddr_ll is plain old data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = index as i32;
    // SAFETY: bind with a sockaddr_ll of its size.
    check(
        unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(sll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        },
        "bind",
    );
    let size: libc::c_int = 32 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with an int.
        check(
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    std::ptr::addr_of!(size).cast(),
                    4,
                )
            },
            "socket buffer size",
        );
    }
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO with a timeval.
    check(
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(tv).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        },
        "SO_RCVTIMEO",
    );
    fd
}

fn recv(fd: RawFd, buf: &mut [u8]) -> usize {
    // SAFETY: recv into our buffer.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(
        n >= 0,
        "a frame went missing: {}",
        std::io::Error::last_os_error()
    );
    n as usize
}

fn send(fd: RawFd, buf: &[u8]) {
    // SAFETY: send from our buffer.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), 0) };
    assert_eq!(n as usize, buf.len(), "{}", std::io::Error::last_os_error());
}

/// Everything one frame size needs.
struct Rig {
    len: usize,
    tap: Arc<Tap>,
    sock: OwnedFd,
    mem: Arc<GuestMemoryMmap>,
    pair: QueuePair,
    counters: Arc<NetCounters>,
    tx: Driver,
    rx: Driver,
    /// header + frame, for the raw TAP writes: 256 of them spaced as the guest's, so both
    /// transmit paths read the same amount of memory.
    raw_frames: Vec<u8>,
    raw_len: usize,
    /// frames as the host sends them.
    host_frames: Vec<Vec<u8>>,
    scratch: Vec<u8>,
    /// Where raw TAP reads land: 256 buffers spaced as the guest's are, so both receive
    /// paths touch the same amount of memory.
    raw_rx: Vec<u8>,
}

impl Rig {
    fn new(tap: Arc<Tap>, len: usize, ethertype: u16) -> Rig {
        let mem = Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap());
        let raw_frames: Vec<Vec<u8>> = (0..BATCH)
            .map(|i| {
                let mut b = vec![0u8; VNET_HDR_LEN];
                b.extend_from_slice(&frame(len, ethertype, i));
                b
            })
            .collect();
        let mut spread = vec![0u8; usize::from(BATCH) * BUF as usize];
        for (i, b) in raw_frames.iter().enumerate() {
            mem.write_slice(b, GuestAddress(TX_BUFS + i as u64 * BUF))
                .unwrap();
            spread[i * BUF as usize..][..b.len()].copy_from_slice(b);
        }
        let tx = Driver::new(&mem, TXQ, TX_BUFS, (VNET_HDR_LEN + len) as u32, false);
        let rx = Driver::new(&mem, RXQ, RX_BUFS, BUF as u32, true);
        let counters = Arc::new(NetCounters::default());
        // A deny list the frames never match: the check runs as it would in production.
        let deny = vec![Ipv4Net::new(std::net::Ipv4Addr::new(169, 254, 169, 254), 32).unwrap()];
        let pair = QueuePair::new(PairSetup {
            id: "bench".into(),
            mem: mem.clone(),
            rx: rx.queue(),
            tx: tx.queue(),
            backend: tap.clone(),
            interrupt: Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
            counters: counters.clone(),
            filter: Arc::new(EgressFilter::new(deny)),
            mergeable: true,
            rx_need: RX_NEED_PLAIN,
        });
        Rig {
            len,
            sock: packet_socket(tap.name(), ethertype),
            tap,
            mem,
            pair,
            counters,
            tx,
            rx,
            host_frames: (0..BATCH).map(|i| frame(len, ethertype, i)).collect(),
            raw_frames: spread,
            raw_len: VNET_HDR_LEN + len,
            scratch: vec![0u8; 65_536],
            raw_rx: vec![0u8; usize::from(BATCH) * BUF as usize],
        }
    }

    fn read_batch_from_host(&mut self) {
        for _ in 0..BATCH {
            recv(self.sock.as_raw_fd(), &mut self.scratch);
        }
    }

    /// One timed transmit batch through the device.
    fn tx_device(&mut self) -> Duration {
        self.tx.post_all();
        let start = Instant::now();
        while self.pair.process_tx() == TxState::Budget {}
        self.read_batch_from_host();
        start.elapsed()
    }

    fn tx_tap(&mut self) -> Duration {
        let start = Instant::now();
        for i in 0..usize::from(BATCH) {
            let f = &self.raw_frames[i * BUF as usize..][..self.raw_len];
            // SAFETY: write from our buffer to our TAP.
            let n = unsafe { libc::write(self.tap.fd(), f.as_ptr().cast(), f.len()) };
            assert_eq!(n as usize, f.len());
        }
        self.read_batch_from_host();
        start.elapsed()
    }

    fn rx_device(&mut self) -> Duration {
        self.rx.post_all();
        let before = self.counters.rx_frames.load(Ordering::Relaxed);
        let start = Instant::now();
        for f in &self.host_frames {
            send(self.sock.as_raw_fd(), f);
        }
        while self.counters.rx_frames.load(Ordering::Relaxed) - before < u64::from(BATCH) {
            match self.pair.process_rx() {
                RxState::Drained | RxState::Budget => {}
                other => panic!("receive stopped: {other:?}"),
            }
        }
        start.elapsed()
    }

    fn rx_tap(&mut self) -> Duration {
        let start = Instant::now();
        for f in &self.host_frames {
            send(self.sock.as_raw_fd(), f);
        }
        let mut got = 0;
        while got < usize::from(BATCH) {
            let buf = &mut self.raw_rx[got * BUF as usize..(got + 1) * BUF as usize];
            // SAFETY: read into our buffer from our TAP.
            let n = unsafe { libc::read(self.tap.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 {
                got += 1;
            }
        }
        start.elapsed()
    }

    /// Runs every path once and checks the frames byte for byte.
    fn verify(&mut self) {
        self.tx.post_all();
        while self.pair.process_tx() == TxState::Budget {}
        for f in &self.host_frames {
            let n = recv(self.sock.as_raw_fd(), &mut self.scratch);
            assert_eq!(
                &self.scratch[..n],
                &f[..],
                "device transmit changed a frame"
            );
        }
        self.tx_tap();
        self.rx.post_all();
        for f in &self.host_frames {
            send(self.sock.as_raw_fd(), f);
        }
        let mut delivered = 0;
        while delivered < BATCH {
            let before = self.counters.rx_frames.load(Ordering::Relaxed);
            self.pair.process_rx();
            delivered += (self.counters.rx_frames.load(Ordering::Relaxed) - before) as u16;
        }
        for (i, f) in self.host_frames.iter().enumerate() {
            let mut got = vec![0u8; f.len()];
            let at = RX_BUFS + i as u64 * BUF + VNET_HDR_LEN as u64;
            self.mem.read_slice(&mut got, GuestAddress(at)).unwrap();
            assert_eq!(&got, f, "device receive changed frame {i}");
        }
        self.rx_tap();
        let c = &self.counters;
        assert_eq!(c.tx_invalid.load(Ordering::Relaxed), 0);
        assert_eq!(c.tx_errors.load(Ordering::Relaxed), 0);
        assert_eq!(c.rx_dropped.load(Ordering::Relaxed), 0);
        println!(
            "podvmm-bench: verified net {}-byte frames: device and raw TAP, both directions",
            self.len
        );
    }
}

#[derive(Clone, Copy)]
enum Path {
    TxDevice,
    TxTap,
    RxDevice,
    RxTap,
}

impl Path {
    const ALL: [Path; 4] = [Path::TxDevice, Path::TxTap, Path::RxDevice, Path::RxTap];

    fn name(self) -> &'static str {
        match self {
            Path::TxDevice => "tx_device",
            Path::TxTap => "tx_tap",
            Path::RxDevice => "rx_device",
            Path::RxTap => "rx_tap",
        }
    }

    fn run(self, rig: &mut Rig) -> Duration {
        match self {
            Path::TxDevice => rig.tx_device(),
            Path::TxTap => rig.tx_tap(),
            Path::RxDevice => rig.rx_device(),
            Path::RxTap => rig.rx_tap(),
        }
    }
}

fn main() {
    let mode = mode_from_args();
    if mode == Mode::List {
        return;
    }
    // A network namespace of our own, before any other thread exists.
    // SAFETY: unshare(2) with a flag.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!(
            "podvmm-bench: net_ratio_vs_tap=SKIPPED (needs root for a network namespace and a TAP: {})",
            std::io::Error::last_os_error()
        );
        return;
    }
    let quick = quick_requested();
    let (sample_size, measurement, warm_up, rounds) = if quick {
        (10, Duration::from_secs(1), Duration::from_millis(300), 31)
    } else {
        (30, Duration::from_secs(3), Duration::from_secs(1), 201)
    };
    let rounds = if mode == Mode::Test { 3 } else { rounds };
    let mut criterion = Criterion::default()
        .sample_size(sample_size)
        .measurement_time(measurement)
        .warm_up_time(warm_up)
        .configure_from_args();

    // No IPv6 in the namespace: the host stack would otherwise send its own frames (neighbour
    // discovery, MLD) into the TAP among ours.
    for conf in ["all", "default"] {
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6"), "1");
    }
    let tap = Arc::new(
        Tap::open_named(TAP_NAME, 1)
            .expect("create the TAP")
            .remove(0),
    );
    tap.configure_host(
        std::net::Ipv4Addr::new(10, 99, 0, 1),
        std::net::Ipv4Addr::new(255, 255, 255, 0),
    )
    .expect("bring the TAP up");
    // What a guest with no offloads gets; the TAP then never hands us GSO frames.
    tap.set_offload(0).expect("TUNSETOFFLOAD");

    let mut rigs: Vec<Rig> = [60usize, 1514]
        .into_iter()
        .zip(ETHERTYPES)
        .map(|(len, ethertype)| Rig::new(tap.clone(), len, ethertype))
        .collect();
    for rig in &mut rigs {
        rig.verify();
    }

    for rig in &mut rigs {
        let mut group = criterion.benchmark_group(format!("net_tap_{}B", rig.len));
        group.throughput(Throughput::Elements(u64::from(BATCH)));
        for path in Path::ALL {
            group.bench_function(path.name(), |b| {
                b.iter_custom(|iters| (0..iters).map(|_| path.run(rig)).sum())
            });
        }
        group.finish();
    }
    criterion.final_summary();

    // Interleaved batches: per-frame medians.
    let mut ratios = Vec::new();
    for rig in &mut rigs {
        let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Path::ALL.len()];
        for round in 0..rounds {
            for k in 0..Path::ALL.len() {
                let i = (round + k) % Path::ALL.len();
                let t = Path::ALL[i].run(rig);
                samples[i].push(t.as_secs_f64() / f64::from(BATCH));
            }
        }
        let per_frame: Vec<f64> = samples.iter().map(|s| median(s)).collect();
        let bits = (rig.len * 8) as f64;
        for (path, s) in Path::ALL.iter().zip(&per_frame) {
            println!(
                "podvmm-bench: net {}B {} batches={rounds} frames_per_s={:.0} gbit_per_s={:.3} ns_per_frame={:.0}",
                rig.len,
                path.name(),
                1.0 / s,
                bits / s / 1e9,
                s * 1e9
            );
        }
        for (dir, dev, raw) in [("tx", 0, 1), ("rx", 2, 3)] {
            let ratio = per_frame[raw] / per_frame[dev];
            println!(
                "podvmm-bench: net {}B {dir}_ratio_vs_tap={ratio:.3} (device frames/s over raw TAP frames/s)",
                rig.len
            );
            ratios.push(ratio);
        }
    }
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    println!("podvmm-bench: net_ratio_vs_tap={worst:.3} (worst of tx/rx at 60 and 1514 bytes)");
}
