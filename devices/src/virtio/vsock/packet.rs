//! The virtio-vsock packet header (virtio 1.2, 5.10.6) and its operations.
//!
//! Every packet on the rx and tx queues starts with this 44-byte little-endian header; a
//! `RW` packet's payload follows it, possibly in further descriptors of the same chain.

/// The well-known context id of the host.
pub const HOST_CID: u64 = 2;
/// Size of the header.
pub const HEADER_LEN: usize = 44;
/// Largest payload one packet may carry (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;
/// `type`: the only socket type this device serves (no SEQPACKET feature is offered).
pub const TYPE_STREAM: u16 = 1;

/// `flags` of a SHUTDOWN packet: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of a SHUTDOWN packet: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `op` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Request,
    Response,
    Rst,
    Shutdown,
    Rw,
    CreditUpdate,
    CreditRequest,
    /// Anything else (including 0, `VIRTIO_VSOCK_OP_INVALID`).
    Unknown(u16),
}

impl From<u16> for Op {
    fn from(v: u16) -> Self {
        match v {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            other => Op::Unknown(other),
        }
    }
}

impl From<Op> for u16 {
    fn from(op: Op) -> u16 {
        match op {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
            Op::Unknown(v) => v,
        }
    }
}

/// A decoded header. Fields keep the wire names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from this connection so far (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    pub fn op(&self) -> Op {
        Op::from(self.op)
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_layout() {
        let h = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 0x1122_3344,
            dst_port: 1024,
            len: 5,
            type_: TYPE_STREAM,
            op: Op::Rw.into(),
            flags: SHUTDOWN_SEND,
            buf_alloc: 0x40000,
            fwd_cnt: 7,
        };
        let b = h.encode();
        assert_eq!(Header::decode(&b), h);
        assert_eq!(b[0], 3);
        assert_eq!(&b[16..20], &[0x44, 0x33, 0x22, 0x11]);
        assert_eq!(u16::from_le_bytes([b[30], b[31]]), 5);
        assert_eq!(h.op(), Op::Rw);
        for v in 0..10u16 {
            assert_eq!(u16::from(Op::from(v)), v);
        }
        assert_eq!(Op::from(0), Op::Unknown(0));
    }
}
