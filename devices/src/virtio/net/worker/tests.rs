//! The queue pair against a socketpair standing in for the TAP.

use super::*;
use crate::virtio::net::filter::tests::ipv4_frame;
use crate::virtio::net::filter::Ipv4Net;
use crate::virtio::testing::{Buf, DriverQueue};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

/// A socketpair standing in for the TAP: SOCK_SEQPACKET keeps frame boundaries and,
/// like a TAP, cuts a frame to the buffers a read offers.
pub(crate) struct SocketTap(pub OwnedFd);

impl NetBackend for SocketTap {
    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// The other end of a [`SocketTap`]: the "host network".
pub(crate) struct Peer(pub OwnedFd);

impl Peer {
    pub fn send(&self, b: &[u8]) -> io::Result<usize> {
        // SAFETY: send from our buffer.
        let n = unsafe { libc::send(self.0.as_raw_fd(), b.as_ptr().cast(), b.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    pub fn recv(&self, b: &mut [u8]) -> io::Result<usize> {
        // SAFETY: recv into our buffer.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), b.as_mut_ptr().cast(), b.len(), 0) };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }
}

pub(crate) fn socket_tap() -> (Arc<SocketTap>, Peer) {
    let mut fds = [0; 2];
    // SAFETY: socketpair fills two descriptors; the result is checked.
    let ret = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(ret, 0);
    // SAFETY: fresh descriptors nobody else owns.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    (Arc::new(SocketTap(a)), Peer(b))
}

pub(crate) const MEM_SIZE: u64 = 0x100_0000;
const RXQ: u64 = 0x1000;
const TXQ: u64 = 0x8000;
const BUFS: u64 = 0x10_0000;

pub(crate) struct Rig {
    pub mem: Arc<GuestMemoryMmap>,
    pub pair: QueuePair,
    pub peer: Peer,
    pub counters: Arc<NetCounters>,
    pub irq: EventFd,
    // The driver's view of the rings.
    txq: DriverQueue<Arc<GuestMemoryMmap>>,
    rxq: DriverQueue<Arc<GuestMemoryMmap>>,
}

pub(crate) fn mem() -> Arc<GuestMemoryMmap> {
    Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap())
}

fn rig_with(mergeable: bool, rx_need: usize, deny: Vec<Ipv4Net>, qsize: u16) -> Rig {
    let mem = mem();
    let rxq = DriverQueue::new(mem.clone(), RXQ, qsize);
    let txq = DriverQueue::new(mem.clone(), TXQ, qsize);
    let (backend, peer) = socket_tap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let counters = Arc::new(NetCounters::default());
    let pair = QueuePair::new(PairSetup {
        id: "test".into(),
        mem: mem.clone(),
        rx: rxq.queue(),
        tx: txq.queue(),
        backend,
        interrupt: Arc::new(Interrupt::new(irq.try_clone().unwrap())),
        counters: counters.clone(),
        filter: Arc::new(EgressFilter::new(deny)),
        mergeable,
        rx_need,
    });
    Rig {
        mem,
        pair,
        peer,
        counters,
        irq,
        txq,
        rxq,
    }
}

fn rig() -> Rig {
    rig_with(true, RX_NEED_PLAIN, Vec::new(), 16)
}

fn vnet_hdr() -> [u8; VNET_HDR_LEN] {
    [0; VNET_HDR_LEN]
}

fn frame(payload: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![0xffu8; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9]);
    f.extend_from_slice(&0x88b5u16.to_be_bytes());
    f.extend(std::iter::repeat_n(fill, payload));
    f
}

fn desc(addr: u64, len: u32, write: bool) -> Buf {
    (addr, len, write)
}

impl Rig {
    fn txq(&self) -> &DriverQueue<Arc<GuestMemoryMmap>> {
        &self.txq
    }
    fn rxq(&self) -> &DriverQueue<Arc<GuestMemoryMmap>> {
        &self.rxq
    }

    /// Posts `descs` (chained in order) as one transmit chain at table index `at`.
    fn post_tx(&mut self, at: u16, descs: &[Buf]) {
        post(&mut self.txq, at, descs);
    }
    fn post_rx(&mut self, at: u16, descs: &[Buf]) {
        post(&mut self.rxq, at, descs);
    }

    /// Writes header + frame at `addr` and returns the chain's one descriptor.
    fn tx_buf(&self, addr: u64, frame: &[u8]) -> Buf {
        let mut b = vnet_hdr().to_vec();
        b.extend_from_slice(frame);
        self.mem.write_slice(&b, GuestAddress(addr)).unwrap();
        desc(addr, b.len() as u32, false)
    }

    /// Every used entry so far: (head, len).
    fn used(&self, q: &DriverQueue<Arc<GuestMemoryMmap>>) -> Vec<(u32, u32)> {
        (0..q.used_idx()).map(|i| q.used_elem(i)).collect()
    }

    fn recv_all(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = self.peer.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }
}

/// Writes a chain at descriptor index `at` and makes its head available.
fn post(q: &mut DriverQueue<Arc<GuestMemoryMmap>>, at: u16, descs: &[Buf]) {
    q.set_next_desc(at);
    let head = q.chain(descs);
    q.submit(head);
}

#[test]
fn transmits_a_batch_with_one_interrupt() {
    let mut r = rig();
    let frames: Vec<Vec<u8>> = (0..5).map(|i| frame(60 + i * 100, i as u8)).collect();
    for (i, f) in frames.iter().enumerate() {
        let d = r.tx_buf(BUFS + i as u64 * 0x1000, f);
        r.post_tx(i as u16, &[d]);
    }
    assert_eq!(r.pair.process_tx(), TxState::Done);
    let got = r.recv_all();
    assert_eq!(got.len(), 5);
    for (g, f) in got.iter().zip(&frames) {
        assert_eq!(&g[..VNET_HDR_LEN], &vnet_hdr());
        assert_eq!(&g[VNET_HDR_LEN..], &f[..]);
    }
    let used = r.used(r.txq());
    assert_eq!(used, (0..5).map(|i| (i, 0)).collect::<Vec<_>>());
    assert_eq!(r.irq.read().unwrap(), 1, "one interrupt for the batch");
    assert_eq!(r.counters.tx_frames.load(Ordering::Relaxed), 5);
}

#[test]
fn transmit_gathers_scattered_descriptors() {
    let mut r = rig();
    let f = frame(3000, 7);
    let mut b = vnet_hdr().to_vec();
    b.extend_from_slice(&f);
    // Split at odd places: 5 bytes of header, then the rest of the header and 3 bytes...
    let cuts = [5usize, 10, 40, b.len()];
    let mut descs = Vec::new();
    let mut start = 0;
    for (i, &end) in cuts.iter().enumerate() {
        let addr = BUFS + i as u64 * 0x2000;
        r.mem
            .write_slice(&b[start..end], GuestAddress(addr))
            .unwrap();
        descs.push(desc(addr, (end - start) as u32, false));
        start = end;
    }
    r.post_tx(0, &descs);
    r.pair.process_tx();
    let got = r.recv_all();
    assert_eq!(got, vec![b]);
}

#[test]
fn hostile_transmit_chains_fail_alone() {
    let mut r = rig();
    let good = frame(100, 1);
    let d_good = r.tx_buf(BUFS, &good);
    // 0: device-writable descriptor in a transmit chain.
    r.post_tx(0, &[desc(BUFS, 200, true)]);
    // 1: outside guest memory.
    r.post_tx(1, &[desc(MEM_SIZE - 16, 200, false)]);
    // 2: too short (header and half an Ethernet header).
    r.post_tx(2, &[desc(BUFS, (VNET_HDR_LEN + 7) as u32, false)]);
    // 3: too long: two 40 KiB descriptors.
    r.post_tx(
        3,
        &[
            desc(BUFS, 40 * 1024, false),
            desc(BUFS + 0x10000, 40 * 1024, false),
        ],
    );
    // 5: a good frame after all of them.
    r.post_tx(5, &[d_good]);
    // 6: an address that overflows.
    r.post_tx(6, &[desc(u64::MAX - 4, 100, false)]);
    assert_eq!(r.pair.process_tx(), TxState::Done);
    assert_eq!(r.counters.tx_invalid.load(Ordering::Relaxed), 5);
    assert_eq!(r.counters.tx_frames.load(Ordering::Relaxed), 1);
    let got = r.recv_all();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][VNET_HDR_LEN..], &good[..]);
    // Every chain went back to the guest.
    let heads: Vec<u32> = r.used(r.txq()).iter().map(|u| u.0).collect();
    assert_eq!(heads, vec![0, 1, 2, 3, 5, 6]);
    assert!(!r.pair.is_broken());
}

#[test]
fn deny_list_drops_and_counts() {
    let deny = vec![Ipv4Net::new(Ipv4Addr::new(169, 254, 169, 254), 32).unwrap()];
    let mut r = rig_with(true, RX_NEED_PLAIN, deny, 16);
    let to_md = ipv4_frame(&[], [169, 254, 169, 254]);
    let to_md_vlan = ipv4_frame(&[0x8100], [169, 254, 169, 254]);
    let allowed = ipv4_frame(&[], [10, 0, 0, 1]);
    let d0 = r.tx_buf(BUFS, &to_md);
    let d1 = r.tx_buf(BUFS + 0x1000, &to_md_vlan);
    let d2 = r.tx_buf(BUFS + 0x2000, &allowed);
    r.post_tx(0, &[d0]);
    r.post_tx(1, &[d1]);
    r.post_tx(2, &[d2]);
    // A frame cut right inside its IPv4 header: unreadable, dropped while a list is set.
    let mut cut = vnet_hdr().to_vec();
    cut.extend_from_slice(&allowed[..ETH_HLEN + 10]);
    r.mem
        .write_slice(&cut, GuestAddress(BUFS + 0x3000))
        .unwrap();
    r.post_tx(3, &[desc(BUFS + 0x3000, cut.len() as u32, false)]);
    r.pair.process_tx();
    let got = r.recv_all();
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0][VNET_HDR_LEN..], &allowed[..]);
    assert_eq!(r.counters.tx_denied.load(Ordering::Relaxed), 3);
    assert_eq!(r.counters.tx_invalid.load(Ordering::Relaxed), 0);
    assert_eq!(r.used(r.txq()).len(), 4);
}

#[test]
fn deny_list_sees_headers_split_across_descriptors() {
    let deny = vec![Ipv4Net::new(Ipv4Addr::new(169, 254, 169, 254), 32).unwrap()];
    // 41 descriptors in one chain need a ring of 64.
    let mut r = rig_with(true, RX_NEED_PLAIN, deny, 64);
    let mut b = vnet_hdr().to_vec();
    b.extend_from_slice(&ipv4_frame(&[0x8100], [169, 254, 169, 254]));
    // One byte per descriptor for the first 40 bytes, then the rest.
    let mut descs = Vec::new();
    for i in 0..40usize {
        let addr = BUFS + i as u64 * 16;
        r.mem.write_slice(&b[i..i + 1], GuestAddress(addr)).unwrap();
        descs.push(desc(addr, 1, false));
    }
    r.mem
        .write_slice(&b[40..], GuestAddress(BUFS + 0x1000))
        .unwrap();
    descs.push(desc(BUFS + 0x1000, (b.len() - 40) as u32, false));
    r.post_tx(0, &descs);
    r.pair.process_tx();
    assert!(r.recv_all().is_empty());
    assert_eq!(r.counters.tx_denied.load(Ordering::Relaxed), 1);
    assert_eq!(r.counters.tx_invalid.load(Ordering::Relaxed), 0);
}

#[test]
fn receives_into_one_buffer() {
    let mut r = rig();
    r.post_rx(0, &[desc(BUFS, 2048, true)]);
    let mut sent = vnet_hdr().to_vec();
    sent.extend_from_slice(&frame(500, 3));
    r.peer.send(&sent).unwrap();
    // The one buffer is used: the worker stops polling the TAP.
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    assert_eq!(r.used(r.rxq()), vec![(0, sent.len() as u32)]);
    let mut got = vec![0u8; sent.len()];
    r.mem.read_slice(&mut got, GuestAddress(BUFS)).unwrap();
    // num_buffers = 1.
    assert_eq!(&got[10..12], &[1, 0]);
    assert_eq!(&got[VNET_HDR_LEN..], &sent[VNET_HDR_LEN..]);
    assert_eq!(r.irq.read().unwrap(), 1);
    assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 1);
}

#[test]
fn mergeable_buffers_span_chains() {
    // Buffers of 1000 bytes; a 3000-byte frame needs four of them.
    let mut r = rig_with(true, 4000, Vec::new(), 16);
    for i in 0..8u16 {
        r.post_rx(i, &[desc(BUFS + u64::from(i) * 0x1000, 1000, true)]);
    }
    let mut sent = vnet_hdr().to_vec();
    sent.extend_from_slice(&frame(3000 - VNET_HDR_LEN - ETH_HLEN, 9));
    r.peer.send(&sent).unwrap();
    assert_eq!(r.pair.process_rx(), RxState::Drained);
    assert_eq!(
        r.used(r.rxq()),
        vec![(0, 1000), (1, 1000), (2, 1000)],
        "three chains, the last filled exactly"
    );
    let mut got = Vec::new();
    for i in 0..3u64 {
        let mut b = vec![0u8; 1000];
        r.mem
            .read_slice(&mut b, GuestAddress(BUFS + i * 0x1000))
            .unwrap();
        got.extend_from_slice(&b);
    }
    assert_eq!(&got[10..12], &[3, 0], "num_buffers");
    assert_eq!(&got[VNET_HDR_LEN..], &sent[VNET_HDR_LEN..]);
    // The next frame starts in chain 3.
    r.peer.send(&sent[..100]).unwrap();
    r.pair.process_rx();
    assert_eq!(r.used(r.rxq())[3], (3, 100));
}

#[test]
fn receive_waits_for_buffers_then_resumes() {
    let mut r = rig();
    let mut sent = vnet_hdr().to_vec();
    sent.extend_from_slice(&frame(100, 1));
    r.peer.send(&sent).unwrap();
    r.peer.send(&sent).unwrap();
    // No buffers: back-pressure, nothing read, the TAP keeps the frames.
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    assert_eq!(r.counters.rx_stalls.load(Ordering::Relaxed), 1);
    // One buffer: one frame, then no buffers again.
    r.post_rx(0, &[desc(BUFS, 2048, true)]);
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 1);
    r.post_rx(1, &[desc(BUFS + 0x1000, 2048, true)]);
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 2);
    r.post_rx(2, &[desc(BUFS + 0x2000, 2048, true)]);
    assert_eq!(r.pair.process_rx(), RxState::Drained);
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 0);
}

#[test]
fn mergeable_receive_makes_do_with_what_the_guest_gave() {
    // 4000 bytes wanted, 3000 posted: read anyway (waiting could deadlock a driver that
    // refills only after an interrupt); what fits is delivered, what does not is dropped.
    let mut r = rig_with(true, 4000, Vec::new(), 16);
    r.post_rx(0, &[desc(BUFS, 1500, true)]);
    r.post_rx(1, &[desc(BUFS + 0x1000, 1500, true)]);
    let mut big = vnet_hdr().to_vec();
    big.extend_from_slice(&frame(3500, 1));
    let mut small = vnet_hdr().to_vec();
    small.extend_from_slice(&frame(100, 2));
    r.peer.send(&big).unwrap();
    r.peer.send(&small).unwrap();
    assert_eq!(r.pair.process_rx(), RxState::Drained);
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 1);
    assert_eq!(r.used(r.rxq()), vec![(0, small.len() as u32)]);
}

#[test]
fn oversized_and_runt_frames_are_dropped_buffers_kept() {
    let mut r = rig_with(false, RX_NEED_PLAIN, Vec::new(), 16);
    r.post_rx(0, &[desc(BUFS, 600, true)]);
    let mut big = vnet_hdr().to_vec();
    big.extend_from_slice(&frame(1000, 1));
    r.peer.send(&big).unwrap();
    r.peer.send(&[0u8; 20]).unwrap();
    let mut ok = vnet_hdr().to_vec();
    ok.extend_from_slice(&frame(100, 2));
    r.peer.send(&ok).unwrap();
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    assert_eq!(r.counters.rx_dropped.load(Ordering::Relaxed), 2);
    assert_eq!(r.used(r.rxq()), vec![(0, ok.len() as u32)]);
}

#[test]
fn hostile_receive_chains_fail_alone() {
    let mut r = rig();
    r.post_rx(0, &[desc(BUFS, 2048, false)]); // read-only
    r.post_rx(1, &[desc(MEM_SIZE - 100, 2048, true)]); // outside memory
    r.post_rx(2, &[desc(BUFS, 8, true)]); // too short for a header
    r.post_rx(3, &[desc(BUFS, 100, true), desc(BUFS + 200, 100, false)]); // mixed
    r.post_rx(5, &[desc(BUFS + 0x1000, 2048, true)]); // good
    let mut sent = vnet_hdr().to_vec();
    sent.extend_from_slice(&frame(100, 1));
    r.peer.send(&sent).unwrap();
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
    assert_eq!(r.counters.rx_invalid.load(Ordering::Relaxed), 4);
    assert_eq!(
        r.used(r.rxq()),
        vec![(0, 0), (1, 0), (2, 0), (3, 0), (5, sent.len() as u32)]
    );
    assert!(!r.pair.is_broken());
}

/// A host end whose reads fail with an unexpected error: the write end of a pipe.
struct FailingTap {
    write_end: OwnedFd,
    _read_end: OwnedFd,
}

impl NetBackend for FailingTap {
    fn fd(&self) -> RawFd {
        self.write_end.as_raw_fd()
    }
}

#[test]
fn a_failing_host_end_stops_polling_instead_of_spinning() {
    let mut r = rig();
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors; checked.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: fresh descriptors nobody else owns.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    r.pair.backend = Arc::new(FailingTap {
        write_end: wr,
        _read_end: rd,
    });
    r.post_rx(0, &[desc(BUFS, 2048, true)]);
    assert_eq!(r.pair.process_rx(), RxState::BackendGone);
    assert_eq!(r.counters.rx_frames.load(Ordering::Relaxed), 0);
    assert!(
        r.used(r.rxq()).is_empty(),
        "the buffer stays with the device"
    );
}

#[test]
fn a_corrupt_ring_needs_reset_without_panicking() {
    let mut r = rig();
    // avail.idx jumps far beyond the ring size: virtio-queue refuses to iterate.
    r.txq.set_avail_idx(1000);
    assert_eq!(r.pair.process_tx(), TxState::Done);
    assert!(r.pair.is_broken());
    assert_eq!(r.pair.process_rx(), RxState::NoBuffers);
}

#[test]
fn transmit_budget_leaves_the_rest_for_later() {
    let mut r = rig_with(true, RX_NEED_PLAIN, Vec::new(), 512);
    let f = frame(60, 0);
    let d = r.tx_buf(BUFS, &f);
    // BUDGET + 10 chains, all pointing at the same frame.
    for i in 0..(BUDGET + 10) as u16 {
        r.post_tx(i, &[d]);
    }
    assert_eq!(r.pair.process_tx(), TxState::Budget);
    assert_eq!(r.used(r.txq()).len(), BUDGET);
    assert_eq!(r.pair.process_tx(), TxState::Done);
    assert_eq!(r.used(r.txq()).len(), BUDGET + 10);
    // Whatever the socket buffer took, every frame was either sent or counted.
    let sent = r.counters.tx_frames.load(Ordering::Relaxed);
    let refused = r.counters.tx_errors.load(Ordering::Relaxed);
    assert_eq!(sent + refused, (BUDGET + 10) as u64);
}
