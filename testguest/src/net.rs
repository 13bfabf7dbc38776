//! A virtio-net driver (virtio 1.x, 5.1), the plainest kind: one queue pair, no offloads, no
//! mergeable buffers, so every frame is one 12-byte `virtio_net_hdr` plus one Ethernet frame
//! in one buffer. Polling only.

use crate::dma::{Pool, Region};
use crate::time::Deadline;
use crate::virtio::queue::DESC_F_WRITE;
use crate::virtio::{Queue, Transport, F_EVENT_IDX};

pub const F_MAC: u64 = 1 << 5;
/// `virtio_net_hdr` with VERSION_1 (`num_buffers` included).
pub const VNET_HDR: usize = 12;
const NRX: u16 = 64;
const NTX: u16 = 64;
const BUF: usize = 2048;
pub const MAX_FRAME: usize = 1514;

pub struct Net {
    pub mac: [u8; 6],
    pub features: u64,
    rx: Queue,
    tx: Queue,
    rxbuf: Region,
    txbuf: Region,
    tx_free: [u16; NTX as usize],
    tx_nfree: usize,
    rx_unnotified: u16,
}

/// A received frame (without the virtio header); give it back with [`Net::release`].
pub struct Frame {
    pub data: Region,
    buf: u16,
}

impl Net {
    pub fn init(t: Transport, pool: &mut Pool) -> Result<Net, &'static str> {
        let features = t.begin_init(F_MAC | F_EVENT_IDX, 0)?;
        let mac = if features & F_MAC != 0 {
            let lo = t.config32(0).to_le_bytes();
            let hi = t.config16(4).to_le_bytes();
            [lo[0], lo[1], lo[2], lo[3], hi[0], hi[1]]
        } else {
            [0x02, 0, 0, 0, 0, 0x42]
        };
        let event_idx = features & F_EVENT_IDX != 0;
        let mut rx = Queue::new(pool, t, 0, (t.queue_max(0) as u16).min(128), event_idx);
        let tx = Queue::new(pool, t, 1, (t.queue_max(1) as u16).min(128), event_idx);
        if rx.size < NRX || tx.size < NTX {
            return Err("net queues smaller than 64 entries");
        }
        t.setup_queue(&rx)?;
        t.setup_queue(&tx)?;
        let rxbuf = pool.alloc(BUF * usize::from(NRX), 4096);
        let txbuf = pool.alloc(BUF * usize::from(NTX), 4096);
        for i in 0..NRX {
            rx.set_desc(
                i,
                rxbuf.addr + (BUF * usize::from(i)) as u64,
                BUF as u32,
                DESC_F_WRITE,
                0,
            );
            rx.push(i);
        }
        rx.publish();
        t.driver_ok()?;
        rx.kick();
        let mut tx_free = [0u16; NTX as usize];
        for (i, f) in tx_free.iter_mut().enumerate() {
            *f = i as u16;
        }
        Ok(Net {
            mac,
            features,
            rx,
            tx,
            rxbuf,
            txbuf,
            tx_free,
            tx_nfree: NTX as usize,
            rx_unnotified: 0,
        })
    }

    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            if id < u32::from(NTX) && self.tx_nfree < NTX as usize {
                self.tx_free[self.tx_nfree] = id as u16;
                self.tx_nfree += 1;
            }
        }
    }

    /// Sends one frame of `len` bytes written by `fill`.
    pub fn send(
        &mut self,
        len: usize,
        deadline: Deadline,
        fill: impl FnOnce(Region),
    ) -> Result<(), &'static str> {
        assert!(len <= MAX_FRAME);
        self.reclaim_tx();
        while self.tx_nfree == 0 {
            if deadline.passed() {
                return Err("no free transmit buffer: the device stopped taking frames");
            }
            self.reclaim_tx();
        }
        self.tx_nfree -= 1;
        let slot = self.tx_free[self.tx_nfree];
        let buf = self.txbuf.sub(BUF * usize::from(slot), BUF);
        buf.sub(0, VNET_HDR).fill(0);
        fill(buf.sub(VNET_HDR, len));
        self.tx
            .set_desc(slot, buf.addr, (VNET_HDR + len) as u32, 0, 0);
        self.tx.push(slot);
        self.tx.kick();
        Ok(())
    }

    /// Hostile mode: one transmit descriptor `(addr, len, flags, next)`; `addr` `None`
    /// means a free slot's own buffer, which `build` fills first.
    pub fn send_raw(
        &mut self,
        addr: Option<u64>,
        len: u32,
        flags: u16,
        next: u16,
        build: impl FnOnce(Region),
    ) {
        self.reclaim_tx();
        let slot = if self.tx_nfree > 0 {
            self.tx_nfree -= 1;
            self.tx_free[self.tx_nfree]
        } else {
            0
        };
        let buf = self.txbuf.sub(BUF * usize::from(slot), BUF);
        build(buf);
        self.tx
            .set_desc(slot, addr.unwrap_or(buf.addr), len, flags, next);
        self.tx.push(slot);
        self.tx.kick();
    }

    /// Hostile mode: rewrites receive descriptor `i` (the device holds them all).
    pub fn set_rx_desc(&mut self, i: u16, addr: u64, len: u32, flags: u16) {
        self.rx.set_desc(i, addr, len, flags, 0);
    }

    pub fn tx_queue(&mut self) -> &mut Queue {
        &mut self.tx
    }

    pub fn tx_in_flight(&self) -> u16 {
        self.tx.in_flight_after_reclaim()
    }

    pub fn recv(&mut self) -> Option<Frame> {
        let Some((id, len)) = self.rx.pop_used() else {
            if self.rx_unnotified > 0 {
                self.rx_unnotified = 0;
                self.rx.kick();
            }
            return None;
        };
        let id = (id % u32::from(NRX)) as u16;
        let buf = self.rxbuf.sub(BUF * usize::from(id), BUF);
        let len = (len as usize).clamp(VNET_HDR, BUF);
        Some(Frame {
            data: buf.sub(VNET_HDR, len - VNET_HDR),
            buf: id,
        })
    }

    pub fn release(&mut self, f: Frame) {
        self.rx.set_desc(
            f.buf,
            self.rxbuf.addr + (BUF * usize::from(f.buf)) as u64,
            BUF as u32,
            DESC_F_WRITE,
            0,
        );
        self.rx.push(f.buf);
        self.rx.publish();
        self.rx_unnotified += 1;
        if self.rx_unnotified >= NRX / 4 {
            self.rx_unnotified = 0;
            self.rx.kick();
        }
    }
}
