//! A virtio-vsock driver (virtio 1.2, 5.10): stream connections to the host (CID 2), with
//! the credit-based flow control every packet carries. Polling only: received packets are
//! taken from the rx used ring, handed to the caller, and their buffers put back.

use crate::dma::{Pool, Region};
use crate::time::Deadline;
use crate::virtio::queue::DESC_F_WRITE;
use crate::virtio::{Queue, Transport};

pub const HOST_CID: u64 = 2;
pub const HDR: usize = 44;
pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_BOTH: u32 = 3;

const RX_Q: u16 = 0;
const TX_Q: u16 = 1;
const EV_Q: u16 = 2;
const QSIZE: u16 = 128;
/// Receive buffers: header and payload in one 4 KiB device-writable buffer.
const NRX: u16 = 64;
pub const RX_BUF: usize = 4096;
/// Transmit slots: header and payload in one device-readable buffer.
const NTX: u16 = 64;
const TX_SLOT: usize = 8192;
/// Largest payload this driver puts in one packet.
pub const MAX_TX_PAYLOAD: usize = 4096;

/// The 44-byte packet header.
#[derive(Clone, Copy, Default, Debug)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn write(&self, r: Region) {
        r.write64(0, self.src_cid);
        r.write64(8, self.dst_cid);
        r.write32(16, self.src_port);
        r.write32(20, self.dst_port);
        r.write32(24, self.len);
        r.write16(28, self.type_);
        r.write16(30, self.op);
        r.write32(32, self.flags);
        r.write32(36, self.buf_alloc);
        r.write32(40, self.fwd_cnt);
    }

    fn read(r: Region) -> Header {
        Header {
            src_cid: r.read64(0),
            dst_cid: r.read64(8),
            src_port: r.read32(16),
            dst_port: r.read32(20),
            len: r.read32(24),
            type_: r.read16(28),
            op: r.read16(30),
            flags: r.read32(32),
            buf_alloc: r.read32(36),
            fwd_cnt: r.read32(40),
        }
    }
}

/// A received packet; its buffer goes back to the device with [`Vsock::release`].
pub struct Packet {
    pub h: Header,
    /// The payload actually delivered (the used length minus the header).
    pub payload: Region,
    /// The used length is shorter than the header says.
    pub short: bool,
    buf: u16,
}

pub struct Vsock {
    pub cid: u64,
    pub rx: Queue,
    pub tx: Queue,
    /// The event queue: set up with buffers, never read (no transport events are expected).
    _ev: Queue,
    rxbuf: Region,
    txbuf: Region,
    tx_free: [u16; NTX as usize],
    tx_nfree: usize,
    rx_unnotified: u16,
}

impl Vsock {
    pub fn init(t: Transport, pool: &mut Pool) -> Result<Vsock, &'static str> {
        t.begin_init(0, 0)?;
        let cid = t.config64(0);
        let mut qs = [RX_Q, TX_Q, EV_Q].map(|i| {
            let size = (t.queue_max(i) as u16).min(QSIZE);
            Queue::new(pool, t, i, size, false)
        });
        for q in &qs {
            if q.size < NRX.max(NTX) && q.index != EV_Q {
                return Err("vsock queue smaller than 64 entries");
            }
            t.setup_queue(q)?;
        }
        let rxbuf = pool.alloc(RX_BUF * usize::from(NRX), 4096);
        let txbuf = pool.alloc(TX_SLOT * usize::from(NTX), 4096);
        let evbuf = pool.alloc(8 * 4, 8);
        // Every receive buffer and a few event buffers go to the device before DRIVER_OK.
        for i in 0..NRX {
            qs[0].set_desc(
                i,
                rxbuf.addr + RX_BUF as u64 * u64::from(i),
                RX_BUF as u32,
                DESC_F_WRITE,
                0,
            );
            qs[0].push(i);
        }
        qs[0].publish();
        for i in 0..4u16 {
            qs[2].set_desc(i, evbuf.addr + 8 * u64::from(i), 8, DESC_F_WRITE, 0);
            qs[2].push(i);
        }
        qs[2].publish();
        t.driver_ok()?;
        let [rx, tx, ev] = qs;
        let mut tx_free = [0u16; NTX as usize];
        for (i, f) in tx_free.iter_mut().enumerate() {
            *f = i as u16;
        }
        let mut v = Vsock {
            cid,
            rx,
            tx,
            _ev: ev,
            rxbuf,
            txbuf,
            tx_free,
            tx_nfree: NTX as usize,
            rx_unnotified: 0,
        };
        v.rx.kick();
        Ok(v)
    }

    /// Takes back transmit slots the device has finished with.
    fn reclaim_tx(&mut self) {
        while let Some((id, _)) = self.tx.pop_used() {
            if id < u32::from(NTX) && self.tx_nfree < NTX as usize {
                self.tx_free[self.tx_nfree] = id as u16;
                self.tx_nfree += 1;
            }
        }
    }

    /// Sends one packet: `h` with `len` bytes of payload written by `fill` into the slot.
    /// Waits (until `deadline`) for a free transmit slot.
    pub fn send(
        &mut self,
        h: &Header,
        len: usize,
        deadline: Deadline,
        fill: impl FnOnce(Region),
    ) -> Result<(), &'static str> {
        assert!(len <= MAX_TX_PAYLOAD);
        self.reclaim_tx();
        while self.tx_nfree == 0 {
            if deadline.passed() {
                return Err("no free transmit slot: the device stopped taking packets");
            }
            self.reclaim_tx();
        }
        self.tx_nfree -= 1;
        let slot = self.tx_free[self.tx_nfree];
        let buf = self.txbuf.sub(TX_SLOT * usize::from(slot), TX_SLOT);
        let mut h = *h;
        h.len = len as u32;
        h.write(buf);
        fill(buf.sub(HDR, len));
        self.tx.set_desc(slot, buf.addr, (HDR + len) as u32, 0, 0);
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
        let buf = self.txbuf.sub(TX_SLOT * usize::from(slot), TX_SLOT);
        build(buf);
        self.tx
            .set_desc(slot, addr.unwrap_or(buf.addr), len, flags, next);
        self.tx.push(slot);
        self.tx.kick();
    }

    /// The next received packet, if any.
    pub fn recv(&mut self) -> Option<Packet> {
        let Some((id, len)) = self.rx.pop_used() else {
            if self.rx_unnotified > 0 {
                self.rx_unnotified = 0;
                self.rx.kick();
            }
            return None;
        };
        let id = (id % u32::from(NRX)) as u16;
        let buf = self.rxbuf.sub(RX_BUF * usize::from(id), RX_BUF);
        let used = (len as usize).min(RX_BUF);
        if used < HDR {
            return Some(Packet {
                h: Header::default(),
                payload: buf.sub(0, 0),
                short: true,
                buf: id,
            });
        }
        let h = Header::read(buf);
        let plen = (h.len as usize).min(used - HDR);
        Some(Packet {
            h,
            payload: buf.sub(HDR, plen),
            short: plen < h.len as usize,
            buf: id,
        })
    }

    /// Gives a received packet's buffer back to the device.
    pub fn release(&mut self, p: Packet) {
        self.rx.set_desc(
            p.buf,
            self.rxbuf.addr + RX_BUF as u64 * u64::from(p.buf),
            RX_BUF as u32,
            DESC_F_WRITE,
            0,
        );
        self.rx.push(p.buf);
        self.rx.publish();
        self.rx_unnotified += 1;
        if self.rx_unnotified >= NRX / 4 {
            self.rx_unnotified = 0;
            self.rx.kick();
        }
    }
}

/// One stream connection, guest side.
#[derive(Clone, Copy, Default)]
pub struct Conn {
    pub local: u32,
    pub peer: u32,
    /// Our receive buffer, as advertised.
    pub buf_alloc: u32,
    /// Bytes we have consumed (wrapping), and what the peer last heard of it.
    pub fwd_cnt: u32,
    pub announced: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes we have sent (wrapping).
    pub tx_cnt: u32,
    /// Bytes received that the peer sent beyond the credit we gave it.
    pub credit_violations: u64,
    pub credit_updates_received: u64,
}

impl Conn {
    pub fn header(&mut self, cid: u64, op: u16) -> Header {
        self.announced = self.fwd_cnt;
        Header {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: self.local,
            dst_port: self.peer,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Whether `p` belongs to this connection.
    pub fn owns(&self, p: &Packet) -> bool {
        p.h.dst_port == self.local && p.h.src_port == self.peer
    }

    /// Takes the peer's credit information from any of its packets.
    pub fn saw(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        if h.op == OP_CREDIT_UPDATE {
            self.credit_updates_received += 1;
        }
    }

    /// Bytes we may send now.
    pub fn credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Accounts `len` received bytes, which we consume at once; checks they fit the credit
    /// we had announced.
    pub fn consumed(&mut self, len: u32) {
        let outstanding = self.fwd_cnt.wrapping_sub(self.announced).wrapping_add(len);
        if outstanding > self.buf_alloc {
            self.credit_violations += 1;
        }
        self.fwd_cnt = self.fwd_cnt.wrapping_add(len);
    }

    /// Whether we should tell the peer about consumed bytes (half our buffer unannounced).
    pub fn owes_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.announced) >= self.buf_alloc / 2
    }
}
