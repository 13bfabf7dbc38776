//! virtio-net transmit: chains a hostile driver posted (virtio-net header and Ethernet frame
//! in guest memory, any layout) through the device's transmit path with an egress deny list,
//! into a backend that checks what reaches the "TAP": never a frame the deny list refuses.
//! The filter alone is also run on the raw bytes.
#![no_main]

#[path = "ring.rs"]
mod ring;

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::sync::Arc;

use devices::virtio::net::filter::Verdict;
use devices::virtio::net::worker::{NetCounters, PairSetup, QueuePair};
use devices::virtio::net::{EgressFilter, Ipv4Net, NetBackend, VNET_HDR_LEN};
use devices::virtio::Interrupt;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::VolatileSlice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

fn deny() -> Arc<EgressFilter> {
    let net = |a: [u8; 4], p| Ipv4Net::new(Ipv4Addr::from(a), p).expect("valid network");
    Arc::new(EgressFilter::new(vec![
        net([169, 254, 169, 254], 32),
        net([10, 0, 0, 0], 8),
    ]))
}

/// A TAP that takes every frame and checks it against the deny list.
struct CheckingTap(Arc<EgressFilter>);

impl NetBackend for CheckingTap {
    fn fd(&self) -> RawFd {
        -1
    }
    fn read_frame(&self, _bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn write_frame(&self, bufs: &[VolatileSlice<'_>]) -> io::Result<usize> {
        let mut frame = Vec::new();
        for b in bufs {
            let mut v = vec![0u8; b.len()];
            b.copy_to(&mut v[..]);
            frame.extend_from_slice(&v);
        }
        assert!(
            frame.len() >= VNET_HDR_LEN,
            "frame without its virtio-net header"
        );
        let verdict = self.0.check(&frame[VNET_HDR_LEN..]);
        assert!(
            matches!(verdict, Verdict::Pass),
            "a frame the deny list refuses reached the TAP: {verdict:?}"
        );
        Ok(frame.len())
    }
}

fuzz_target!(|data: &[u8]| {
    let filter = deny();
    // The filter on the raw bytes, as a frame.
    let _ = filter.check(data);

    let Some((mem, tx, _)) = ring::build(data) else {
        return;
    };
    let rx = Queue::new(ring::QSIZE).expect("queue");
    let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("eventfd")));
    let mut pair = QueuePair::new(PairSetup {
        id: "fuzz".into(),
        mem: Arc::new(mem),
        rx,
        tx,
        backend: Arc::new(CheckingTap(filter.clone())),
        interrupt,
        counters: Arc::new(NetCounters::default()),
        filter,
        mergeable: false,
        rx_need: 0,
    });
    let _ = pair.process_tx();
});
