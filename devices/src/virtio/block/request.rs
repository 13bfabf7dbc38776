//! Parsing a virtio-blk request out of a descriptor chain, trusting nothing the guest wrote.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

pub const SECTOR_SIZE: u64 = 512;
pub const SECTOR_SHIFT: u32 = 9;

/// Request types (virtio 1.x, 5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

/// Status codes written back to the driver.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// Length of the GET_ID answer.
pub const ID_BYTES: u32 = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            T_IN => RequestType::In,
            T_OUT => RequestType::Out,
            T_FLUSH => RequestType::Flush,
            T_GET_ID => RequestType::GetId,
            T_DISCARD => RequestType::Discard,
            T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

/// Why a chain is not a valid request.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("request header is shorter than 16 bytes or device-writable")]
    BadHeader,
    #[error("cannot read the request header from guest memory")]
    HeaderRead,
    #[error("no device-writable status byte at the end of the chain")]
    NoStatus,
    #[error("data buffer at {0:#x} has the wrong direction for this request")]
    WrongDirection(u64),
    #[error("data buffer at {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory { addr: u64, len: u32 },
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(u64),
    #[error("sectors {sector}+{count} are beyond the disk's {capacity} sectors")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("GET_ID buffer is smaller than {ID_BYTES} bytes")]
    ShortId,
    #[error("malformed discard/write-zeroes segment")]
    BadSegment,
}

/// A validated request: every buffer is inside guest memory and has the right direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status_addr: GuestAddress,
}

/// What the worker knows about a chain it could not parse: where (if anywhere) to write an
/// error status.
#[derive(Debug)]
pub struct Rejected {
    pub error: ParseError,
    pub status_addr: Option<GuestAddress>,
}

/// The header the driver wrote: type, reserved, sector.
fn read_header(mem: &GuestMemoryMmap, d: &Descriptor) -> Result<(u32, u64), ParseError> {
    if d.is_write_only() || d.len() < 16 {
        return Err(ParseError::BadHeader);
    }
    let t: u32 = mem
        .read_obj(d.addr())
        .map_err(|_| ParseError::HeaderRead)?;
    let sector: u64 = mem
        .read_obj(d.addr().unchecked_add(8))
        .map_err(|_| ParseError::HeaderRead)?;
    Ok((t, sector))
}

fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    len > 0 && mem.get_slice(addr, len as usize).is_ok()
}

/// Parses `chain` into a request for a disk of `capacity` sectors.
pub fn parse<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap,
    capacity: u64,
    readonly: bool,
) -> Result<Request, Rejected>
where
    M: std::ops::Deref<Target = GuestMemoryMmap>,
{
    // The iterator stops at the queue size, so a looping chain ends (too short) here.
    let descs: Vec<Descriptor> = chain.collect();
    let reject = |error, status_addr| Rejected { error, status_addr };
    let last = descs.last().ok_or_else(|| reject(ParseError::Empty, None))?;
    let status_addr = if last.is_write_only() && last.len() >= 1 && in_memory(mem, last.addr(), 1)
    {
        last.addr()
    } else {
        return Err(reject(ParseError::NoStatus, None));
    };
    if descs.len() < 2 {
        return Err(reject(ParseError::BadHeader, Some(status_addr)));
    }
    let (t, sector) =
        read_header(mem, &descs[0]).map_err(|e| reject(e, Some(status_addr)))?;
    let kind = RequestType::from(t);
    let data_descs = &descs[1..descs.len() - 1];
    let device_writes = matches!(kind, RequestType::In | RequestType::GetId);
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len: u64 = 0;
    for d in data_descs {
        if d.is_write_only() != device_writes {
            return Err(reject(ParseError::WrongDirection(d.addr().0), Some(status_addr)));
        }
        if !in_memory(mem, d.addr(), d.len()) {
            return Err(reject(
                ParseError::OutOfMemory {
                    addr: d.addr().0,
                    len: d.len(),
                },
                Some(status_addr),
            ));
        }
        data.push((d.addr(), d.len()));
        data_len += u64::from(d.len());
    }
    let check_range = |count: u64| {
        match sector.checked_add(count) {
            Some(end) if end <= capacity => Ok(()),
            _ => Err(ParseError::OutOfRange {
                sector,
                count,
                capacity,
            }),
        }
    };
    let result = match kind {
        RequestType::In | RequestType::Out => {
            if data_len % SECTOR_SIZE != 0 {
                Err(ParseError::Unaligned(data_len))
            } else if kind == RequestType::Out && readonly {
                Err(ParseError::ReadOnly)
            } else {
                check_range(data_len >> SECTOR_SHIFT)
            }
        }
        RequestType::Flush => Ok(()),
        RequestType::GetId if data_len < u64::from(ID_BYTES) => Err(ParseError::ShortId),
        RequestType::GetId => Ok(()),
        RequestType::Discard | RequestType::WriteZeroes => {
            if readonly {
                Err(ParseError::ReadOnly)
            } else if data_len == 0 || data_len % 16 != 0 {
                Err(ParseError::BadSegment)
            } else {
                Ok(())
            }
        }
        RequestType::Unsupported(t) => Err(ParseError::Unsupported(t)),
    };
    result.map_err(|e| reject(e, Some(status_addr)))?;
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status_addr,
    })
}

/// A discard/write-zeroes segment: sector, number of sectors, flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub num_sectors: u32,
    pub flags: u32,
}

/// Reads and range-checks the segments of a discard/write-zeroes request.
pub fn read_segments(
    mem: &GuestMemoryMmap,
    req: &Request,
    capacity: u64,
) -> Result<Vec<Segment>, ParseError> {
    let mut out = Vec::new();
    for &(addr, len) in &req.data {
        for i in 0..u64::from(len) / 16 {
            let base = addr.unchecked_add(i * 16);
            let sector: u64 = mem.read_obj(base).map_err(|_| ParseError::BadSegment)?;
            let num_sectors: u32 = mem
                .read_obj(base.unchecked_add(8))
                .map_err(|_| ParseError::BadSegment)?;
            let flags: u32 = mem
                .read_obj(base.unchecked_add(12))
                .map_err(|_| ParseError::BadSegment)?;
            match sector.checked_add(u64::from(num_sectors)) {
                Some(end) if end <= capacity => {}
                _ => {
                    return Err(ParseError::OutOfRange {
                        sector,
                        count: u64::from(num_sectors),
                        capacity,
                    })
                }
            }
            out.push(Segment {
                sector,
                num_sectors,
                flags,
            });
        }
    }
    Ok(out)
}
